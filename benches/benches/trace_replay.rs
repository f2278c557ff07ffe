//! Full default-trace replay (openb_pod_list_default: 8,152 pods tuned to ≈ 10.8 k, 1,213
//! nodes) with `fgd`, `fgd+` and `best-fit`, one seed per iteration. Target: < 10 s per seed
//! with `fgd` (issue 4, item 6).
//!
//! Run: `cargo bench -p gm-benches --bench trace_replay`
//! The traces are read from `../shared/data/openb` beside the repository; without them the
//! bench says so and measures nothing.

use std::path::PathBuf;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use gm_sim::{trace, SimOptions, SimPolicy, Simulator};

fn openb() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/openb")
}

fn replay(c: &mut Criterion) {
    let dir = openb();
    let (nodes, pods) = match (
        trace::read_nodes(&dir.join("openb_node_list_gpu_node.csv")),
        trace::read_pods(&dir.join("openb_pod_list_default.csv")),
    ) {
        (Ok(n), Ok(p)) => (n, p),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("trace_replay: skipped, the openb traces are not readable: {e}");
            return;
        }
    };
    let sim = match Simulator::new(&nodes, &pods, SimOptions::default()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("trace_replay: skipped: {e}");
            return;
        }
    };
    let mut g = c.benchmark_group("default_trace_replay_one_seed");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(30));
    for policy in [SimPolicy::Fgd, SimPolicy::FgdPlus, SimPolicy::BestFit] {
        g.bench_function(policy.name(), |b| {
            let mut seed = 42;
            b.iter(|| {
                seed += 1;
                sim.run(policy, seed)
            })
        });
    }
    g.finish();
}

criterion_group!(benches, replay);
criterion_main!(benches);
