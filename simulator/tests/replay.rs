//! Small-trace replays: the tuning to 130 %, the invariants of a replay, and behaviour a user
//! of the simulator would notice.

use gm_core::fgd::Demand;
use gm_sim::sim::arrival_order;
use gm_sim::trace::{parse_nodes, parse_pods, TracePod};
use gm_sim::{report, simulate, SimOptions, SimPolicy, Simulator, TieBreak};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

const NODES: &str = "sn,cpu_milli,memory_mib,gpu,model\n\
                     a,32000,131072,4,T4\n\
                     b,16000,65536,2,T4\n\
                     c,64000,262144,8,V100M16\n\
                     d,8000,32768,1,P100\n";

fn pods_csv() -> String {
    let mut s = String::from("name,cpu_milli,memory_mib,num_gpu,gpu_milli,gpu_spec\n");
    let kinds = [
        "2000,4096,1,500,",
        "1000,2048,1,250,",
        "4000,8192,1,1000,",
        "8000,16384,2,1000,",
        "1000,1024,0,0,",
        "2000,4096,1,810,",
        "3000,4096,1,1000,V100M16",
    ];
    for i in 0..24 {
        s.push_str(&format!("p{i:02},{}\n", kinds[i % kinds.len()]));
    }
    s
}

fn total_milli(pods: &[TracePod], order: &[usize]) -> u64 {
    order.iter().map(|&i| pods[i].gpu_milli()).sum()
}

#[test]
fn tuning_appends_clones_up_to_the_target_and_keeps_every_original_pod() {
    let pods = parse_pods("pods.csv", &pods_csv()).unwrap();
    let capacity = 15_000; // 15 GPUs
    let original: u64 = pods.iter().map(TracePod::gpu_milli).sum();
    let target = 1.3 * capacity as f64;
    assert!((original as f64) < target);
    let mut rng = ChaCha8Rng::seed_from_u64(42);
    let order = arrival_order(&pods, capacity, 1.3, &mut rng);
    let total = total_milli(&pods, &order) as f64;
    // The paper's loop checks the drawn pod's per-card milli-GPU, so a multi-card clone can
    // overshoot by its other cards (here at most one card); it stops at the first draw that
    // would overshoot, so it ends within one pod of the target.
    assert!(total <= target + 1000.0, "{total} > {target}");
    assert!(total > target - 2000.0, "{total} stops too early");
    let mut head: Vec<usize> = order[..pods.len()].to_vec();
    head.sort_unstable();
    assert_eq!(head, (0..pods.len()).collect::<Vec<_>>());
    assert!(order.len() > pods.len());
    // Same seed, same order; another seed, another order.
    let again = arrival_order(&pods, capacity, 1.3, &mut ChaCha8Rng::seed_from_u64(42));
    assert_eq!(order, again);
    let other = arrival_order(&pods, capacity, 1.3, &mut ChaCha8Rng::seed_from_u64(43));
    assert_ne!(order, other);
}

#[test]
fn tuning_removes_random_pods_when_the_trace_is_above_the_target() {
    let pods = parse_pods("pods.csv", &pods_csv()).unwrap();
    let capacity = 5_000;
    let order = arrival_order(&pods, capacity, 1.3, &mut ChaCha8Rng::seed_from_u64(7));
    assert!(order.len() < pods.len());
    assert!(total_milli(&pods, &order) as f64 <= 1.3 * capacity as f64);
    let mut seen = order.clone();
    seen.sort_unstable();
    seen.dedup();
    assert_eq!(seen.len(), order.len(), "a pod was submitted twice");
}

#[test]
fn every_policy_replays_a_small_trace_without_overcommitting_anything() {
    let nodes = parse_nodes("nodes.csv", NODES).unwrap();
    let pods = parse_pods("pods.csv", &pods_csv()).unwrap();
    let sim = Simulator::new(&nodes, &pods, SimOptions::default()).unwrap();
    for policy in SimPolicy::ALL {
        let run = sim.run(policy, 42);
        let last = run.steps.last().unwrap();
        assert!(last.arrived_milli as f64 >= 1.2 * run.capacity_milli as f64);
        // The ledger of used GPU agrees with the final node state, and nothing is negative or
        // above capacity.
        let free: u64 = run
            .final_nodes
            .iter()
            .flat_map(|n| n.free.iter().map(|&x| u64::from(x) * 10))
            .sum();
        assert_eq!(run.capacity_milli - free, last.used_milli, "{policy}");
        for (after, node) in run.final_nodes.iter().zip(&nodes) {
            assert!(after.cpu_free <= node.cpu_milli && after.memory_free_mib <= node.memory_mib);
            assert!(after.free.iter().all(|&x| x <= 100));
        }
        // Model constraints are hard: V100M16-only pods land on node c only.
        for s in run
            .steps
            .iter()
            .filter(|s| !pods[s.pod as usize].models.is_empty())
        {
            assert!(s.node.is_none() || s.node == Some(2), "{policy}: {s:?}");
        }
        assert!(run.steps.iter().any(|s| s.placed));
        assert!(last.used_milli <= run.capacity_milli);
        assert_eq!(run.decision_ns.len(), run.steps.len());
    }
}

#[test]
fn fgd_pairs_two_half_shares_so_a_whole_card_still_fits_where_spread_does_not() {
    let nodes = parse_nodes(
        "n",
        "sn,cpu_milli,memory_mib,gpu,model\nx,16000,65536,2,T4\n",
    )
    .unwrap();
    let pods = parse_pods(
        "p",
        "name,cpu_milli,memory_mib,num_gpu,gpu_milli\na,1000,1024,1,500\nb,1000,1024,1,500\nc,1000,1024,1,1000\n",
    )
    .unwrap();
    // The trace is exactly 100 % of capacity: tuning to 1.0 adds nothing.
    let opts = SimOptions {
        tune_ratio: 1.0,
        ..SimOptions::default()
    };
    let seeds: Vec<u64> = (1..=20).collect();
    let (sums, runs) = simulate(
        &nodes,
        &pods,
        &[
            SimPolicy::Fgd,
            SimPolicy::FgdPlus,
            SimPolicy::Core(gm_core::Policy::Spread),
        ],
        &seeds,
        opts,
        2,
    )
    .unwrap();
    for r in runs
        .iter()
        .filter(|r| r.policy != SimPolicy::Core(gm_core::Policy::Spread))
    {
        assert_eq!(r.steps.len(), 3);
        assert_eq!(r.failed(), 0, "{} seed {}", r.policy, r.seed);
    }
    // Spread puts the two shares on different cards whenever they arrive first.
    let spread = &sums[2];
    assert!(spread.failed.contains(&1));
    assert_eq!(
        sums[0].alloc_100.iter().copied().fold(f64::MAX, f64::min),
        100.0
    );
}

#[test]
fn the_json_report_has_exactly_the_documented_shape() {
    let nodes = parse_nodes("nodes.csv", NODES).unwrap();
    // Small shares only, so the replay passes through the 100 % and 130 % buckets.
    let mut text = String::from("name,cpu_milli,memory_mib,num_gpu,gpu_milli\n");
    for i in 0..30 {
        let milli = if i % 3 == 0 { 100 } else { 250 };
        text.push_str(&format!("p{i},500,512,1,{milli}\n"));
    }
    let pods = parse_pods("pods.csv", &text).unwrap();
    let (sums, _) = simulate(
        &nodes,
        &pods,
        &[SimPolicy::BestFit],
        &[1, 2, 3],
        SimOptions::default(),
        1,
    )
    .unwrap();
    let v = serde_json::to_value(sums[0].json()).unwrap();
    let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(keys.len(), 6, "{keys:?}");
    assert_eq!(v["policy"], "best-fit");
    assert_eq!(v["seeds"], 3);
    for k in ["alloc_ratio_at_100", "alloc_ratio_at_130"] {
        let m = v[k]["median"].as_f64().unwrap();
        assert!((0.0..=100.0).contains(&m), "{k} {m}");
        assert!(v[k]["mean"].is_f64());
    }
    assert!(v["decision_us_p50"].as_f64().unwrap() > 0.0);
    assert!(v["decision_us_p99"].as_f64().unwrap() >= v["decision_us_p50"].as_f64().unwrap());
}

#[test]
fn fgd_plus_keeps_the_only_node_that_fits_a_rare_big_pod_free_where_fgd_does_not() {
    // Three 96-core and one 128-core 8-card node; 24 one-card pods and one 8-card pod with
    // 120 cores (4 % of pods, so outside FGD's 95 % target workload): exactly 100 % of GPUs.
    let nodes = parse_nodes(
        "n",
        "sn,cpu_milli,memory_mib,gpu,model\n\
         a,96000,393216,8,G2\nb,96000,393216,8,G2\nc,96000,393216,8,G2\nd,128000,786432,8,G3\n",
    )
    .unwrap();
    let mut text = String::from("name,cpu_milli,memory_mib,num_gpu,gpu_milli\n");
    for i in 0..24 {
        text.push_str(&format!("s{i:02},10000,16384,1,1000\n"));
    }
    text.push_str("big,120000,262144,8,1000\n");
    let pods = parse_pods("p", &text).unwrap();
    let opts = SimOptions {
        tune_ratio: 1.0,
        ..SimOptions::default()
    };
    let seeds: Vec<u64> = (1..=20).collect();
    let (sums, _) = simulate(
        &nodes,
        &pods,
        &[SimPolicy::Fgd, SimPolicy::FgdPlus],
        &seeds,
        opts,
        2,
    )
    .unwrap();
    assert!(
        sums[0].failed.iter().any(|&f| f > 0),
        "FGD leaves the 128-core node to its node order: {:?}",
        sums[0].failed
    );
    assert!(
        sums[1].failed.iter().all(|&f| f == 0),
        "{:?}",
        sums[1].failed
    );
}

#[test]
fn random_ties_and_node_order_ties_are_both_reproducible_per_seed() {
    let nodes = parse_nodes("nodes.csv", NODES).unwrap();
    let pods = parse_pods("pods.csv", &pods_csv()).unwrap();
    for ties in [TieBreak::NodeOrder, TieBreak::Random] {
        let opts = SimOptions {
            ties,
            ..SimOptions::default()
        };
        let sim = Simulator::new(&nodes, &pods, opts).unwrap();
        let a = sim.run(SimPolicy::Fgd, 9);
        let b = sim.run(SimPolicy::Fgd, 9);
        assert_eq!(a.steps, b.steps);
    }
}

#[test]
fn through_the_extender_one_node_takes_every_tie_and_through_min_max_a_random_one_does() {
    // Six identical empty nodes: every policy scores them all the same for the first pod.
    let mut csv = String::from("sn,cpu_milli,memory_mib,gpu,model\n");
    let names = ["n0", "n1", "n2", "n3", "n4", "n5"];
    for n in names {
        csv.push_str(&format!("{n},32000,131072,2,T4\n"));
    }
    let nodes = parse_nodes("nodes.csv", &csv).unwrap();
    let pods = parse_pods(
        "pods.csv",
        "name,cpu_milli,memory_mib,num_gpu,gpu_milli,gpu_spec\np0,2000,4096,1,1000,\np1,1000,2048,1,500,\n",
    )
    .unwrap();
    let first_node = |ties: TieBreak, policy: SimPolicy, seed: u64| {
        let opts = SimOptions {
            ties,
            ..SimOptions::default()
        };
        let run = Simulator::new(&nodes, &pods, opts)
            .unwrap()
            .run(policy, seed);
        names[run.steps[0].node.unwrap() as usize]
    };
    let hashed = *names
        .iter()
        .min_by_key(|n| (gm_core::placement::tie_hash(n), **n))
        .unwrap();
    for seed in 0..10 {
        assert_eq!(first_node(TieBreak::Extender, SimPolicy::Fgd, seed), hashed);
        assert_eq!(
            first_node(TieBreak::Extender, SimPolicy::FgdPlus, seed),
            hashed
        );
        assert_eq!(
            first_node(
                TieBreak::Extender,
                SimPolicy::Core(gm_core::Policy::Binpack),
                seed
            ),
            "n0"
        );
    }
    let drawn: std::collections::BTreeSet<&str> = (0..10)
        .map(|seed| first_node(TieBreak::ExtenderMinMax, SimPolicy::Fgd, seed))
        .collect();
    assert!(
        drawn.len() >= 3,
        "min-max leaves the tie to chance: {drawn:?}"
    );
    assert_eq!("extender".parse::<TieBreak>(), Ok(TieBreak::Extender));
    assert_eq!(
        "extender-minmax".parse::<TieBreak>(),
        Ok(TieBreak::ExtenderMinMax)
    );
    assert!("coin"
        .parse::<TieBreak>()
        .unwrap_err()
        .contains("extender-minmax"));
}

#[test]
fn the_command_writes_the_csv_and_svg_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = dir.path().join("nodes.csv");
    let pods = dir.path().join("pods.csv");
    std::fs::write(&nodes, NODES).unwrap();
    std::fs::write(&pods, pods_csv()).unwrap();
    let out = dir.path().join("out");
    let args = gm_sim::SimulateArgs {
        nodes,
        pods,
        policy: "fgd,best-fit".into(),
        seeds: "1..2".into(),
        json: true,
        out: Some(out.clone()),
        tune: 1.3,
        coverage: 0.95,
        workload: None,
        ties: TieBreak::NodeOrder,
        plus_config: String::new(),
        jobs: 1,
    };
    gm_sim::run(args).unwrap();
    let steps = std::fs::read_to_string(out.join("steps.csv")).unwrap();
    assert!(
        steps.starts_with("policy,seed,step,pod,node,arrived_pct,alloc_pct,frag_pct,decision_us\n")
    );
    assert!(steps.lines().any(|l| l.starts_with("best-fit,2,")));
    let svg = std::fs::read_to_string(out.join("alloc.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    assert_eq!(svg.matches("<polyline").count(), 2);
    let buckets = std::fs::read_to_string(out.join("buckets.csv")).unwrap();
    assert_eq!(buckets.lines().count(), 1 + 2 * 2 * (report::MAX_X + 1));
}

#[test]
fn bad_inputs_are_refused_with_a_reason() {
    let nodes = parse_nodes("n", "sn,cpu_milli,memory_mib,gpu,model\nx,1000,1000,0,\n").unwrap();
    let pods = parse_pods(
        "p",
        "name,cpu_milli,memory_mib,num_gpu,gpu_milli\na,1,1,0,0\n",
    )
    .unwrap();
    let e = Simulator::new(&nodes, &pods, SimOptions::default()).unwrap_err();
    assert_eq!(
        e.to_string(),
        "the node list has no GPUs: the allocation ratio is undefined"
    );
    let nodes = parse_nodes("n", NODES).unwrap();
    let e = Simulator::new(
        &nodes,
        &pods,
        SimOptions {
            tune_ratio: 0.0,
            ..SimOptions::default()
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("tuning ratio 0 is out of range"));
    assert_eq!(pods[0].demand, Demand::CpuOnly);
}
