//! Trace-replay simulator (`gpu-admission simulate`).
//!
//! Replays an openb pod list on an openb node list through the same `gm-core` code the
//! extender runs (FGD, `fgd+`, binpack, spread, topology) and through the paper's baselines
//! (Random-fit, Best-fit, Dot-product, GPU Packing, GPU Clustering), following
//! `shared/reference/fgd.md` §1.6, and reports the GPU allocation ratio at 100 % and 130 %
//! arrived workload (median and mean over seeds), fragmentation and decision latency.
//!
//! * [`trace`]: CSV parsing with file/line errors;
//! * [`sim`]: the arrival order and the replay engine ([`sim::Simulator`]);
//! * [`policy`]: the policy names;
//! * [`report`]: bucketing, aggregation and outputs;
//! * [`SimulateArgs`] / [`run`]: the command; [`simulate`]: the same as a library call.

pub mod policy;
pub mod report;
pub mod sim;
pub mod trace;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use anyhow::Context;

pub use policy::SimPolicy;
pub use report::PolicySummary;
pub use sim::{SeedRun, SimError, SimOptions, Simulator, TieBreak};

/// `gpu-admission simulate`: replay a trace and report allocation ratio, fragmentation and
/// decision latency.
#[derive(Debug, Clone, clap::Args)]
pub struct SimulateArgs {
    /// Node list CSV (openb format: sn,cpu_milli,memory_mib,gpu,model).
    #[arg(long, env = "GM_SIM_NODES")]
    pub nodes: PathBuf,
    /// Pod list CSV (openb format: name,cpu_milli,memory_mib,num_gpu,gpu_milli[,gpu_spec,…]).
    #[arg(long, env = "GM_SIM_PODS")]
    pub pods: PathBuf,
    /// Policy, or a comma-separated list: random-fit, best-fit, dot-product, gpu-packing,
    /// gpu-clustering, fgd, fgd+, binpack, spread, topology, or all.
    #[arg(long, env = "GM_SIM_POLICY", default_value = "fgd")]
    pub policy: String,
    /// Seeds: an inclusive range `42..51` (= `42..=51`), a list `42,45`, or one seed.
    #[arg(long, env = "GM_SIM_SEEDS", default_value = "42..51")]
    pub seeds: String,
    /// Print one JSON object per policy (one line each) instead of the table.
    #[arg(long, env = "GM_SIM_JSON")]
    pub json: bool,
    /// Write steps.csv (every pod event), buckets.csv (per arrived %) and alloc.svg here.
    #[arg(long, env = "GM_SIM_OUT")]
    pub out: Option<PathBuf>,
    /// Tune the workload to this multiple of GPU capacity (the paper: 1.3).
    #[arg(long, env = "GM_SIM_TUNE", default_value_t = 1.3)]
    pub tune: f64,
    /// Share of pods the learned FGD target workload covers (the paper: 0.95).
    #[arg(long, env = "GM_SIM_COVERAGE", default_value_t = gm_core::fgd::PAPER_COVERAGE)]
    pub coverage: f64,
    /// Use this configured target workload (JSON, see docs/simulator.md) instead of learning
    /// it from the pod list.
    #[arg(long, env = "GM_SIM_WORKLOAD")]
    pub workload: Option<PathBuf>,
    /// How a policy's equally scored best nodes are told apart: `order` (the first in a node
    /// order drawn once per seed, as the paper's simulator does), `random` (every time),
    /// `extender` (kube-scheduler with the extender's 0-10 priorities: one node at 10, then a
    /// random draw among the highest) or `extender-minmax` (the same with a min-max 0-10
    /// normalisation, where every best node gets 10).
    #[arg(long, env = "GM_SIM_TIES", default_value = "order")]
    pub ties: sim::TieBreak,
    /// fgd+ settings, e.g. `primary=4,secondary=best-fit` (see docs/simulator.md); empty = the
    /// published policy.
    #[arg(long, env = "GM_SIM_PLUS_CONFIG", default_value = "")]
    pub plus_config: String,
    /// Replays to run in parallel (decision latencies are only comparable at 1).
    #[arg(long, env = "GM_SIM_JOBS", default_value_t = 1)]
    pub jobs: usize,
}

/// Bad `--seeds`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid seeds {0:?}: use an inclusive range such as 42..51 (or 42..=51), a comma-separated list such as 42,45, or one seed; at most 10000 seeds")]
pub struct SeedsError(pub String);

/// Parse `--seeds`.
pub fn parse_seeds(s: &str) -> Result<Vec<u64>, SeedsError> {
    let err = || SeedsError(s.to_string());
    let t = s.trim();
    let seeds: Vec<u64> = if let Some((a, b)) = t.split_once("..") {
        let b = b.strip_prefix('=').unwrap_or(b);
        let a: u64 = a.trim().parse().map_err(|_| err())?;
        let b: u64 = b.trim().parse().map_err(|_| err())?;
        if b < a || b - a >= 10_000 {
            return Err(err());
        }
        (a..=b).collect()
    } else {
        t.split(',')
            .map(|p| p.trim().parse::<u64>().map_err(|_| err()))
            .collect::<Result<_, _>>()?
    };
    if seeds.is_empty() || seeds.len() > 10_000 {
        return Err(err());
    }
    Ok(seeds)
}

/// Replay `pods` on `nodes` with every policy and seed; `jobs` replays run in parallel.
/// Returns one summary per policy (in the given order) and every run.
pub fn simulate(
    nodes: &[trace::TraceNode],
    pods: &[trace::TracePod],
    policies: &[SimPolicy],
    seeds: &[u64],
    opts: SimOptions,
    jobs: usize,
) -> Result<(Vec<PolicySummary>, Vec<SeedRun>), SimError> {
    let sim = Simulator::new(nodes, pods, opts)?;
    let work: Vec<(SimPolicy, u64)> = policies
        .iter()
        .flat_map(|&p| seeds.iter().map(move |&s| (p, s)))
        .collect();
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<SeedRun>>> = Mutex::new(vec![None; work.len()]);
    std::thread::scope(|scope| {
        for _ in 0..jobs.clamp(1, work.len().max(1)) {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(&(p, s)) = work.get(i) else { break };
                let run = sim.run(p, s);
                if let Ok(mut r) = results.lock() {
                    r[i] = Some(run);
                }
            });
        }
    });
    let runs: Vec<SeedRun> = results
        .into_inner()
        .unwrap_or_else(|e| e.into_inner())
        .into_iter()
        .flatten()
        .collect();
    let summaries = policies
        .iter()
        .map(|&p| {
            let mine: Vec<SeedRun> = runs.iter().filter(|r| r.policy == p).cloned().collect();
            PolicySummary::from_runs(p, &mine)
        })
        .collect();
    Ok((summaries, runs))
}

/// Run the command: read the traces, replay, print the report, write `--out`.
pub fn run(args: SimulateArgs) -> anyhow::Result<()> {
    let policies = SimPolicy::parse_list(&args.policy)?;
    let seeds = parse_seeds(&args.seeds)?;
    if args.jobs == 0 {
        anyhow::bail!("--jobs 0: use at least 1");
    }
    let nodes = trace::read_nodes(&args.nodes)?;
    let pods = trace::read_pods(&args.pods)?;
    let workload = match &args.workload {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            Some(
                gm_core::fgd::TargetWorkload::from_config_json(&text)
                    .with_context(|| format!("{}", path.display()))?,
            )
        }
        None => None,
    };
    let opts = SimOptions {
        ties: args.ties,
        tune_ratio: args.tune,
        workload,
        coverage: args.coverage,
        plus: args.plus_config.parse()?,
    };
    let (summaries, runs) = simulate(&nodes, &pods, &policies, &seeds, opts, args.jobs)?;
    if args.json {
        for s in &summaries {
            println!("{}", serde_json::to_string(&s.json())?);
        }
    } else {
        println!(
            "trace {} on {} ({} pods, {} nodes), seeds {}",
            file_name(&args.pods),
            file_name(&args.nodes),
            pods.len(),
            nodes.len(),
            args.seeds
        );
        print!("{}", report::text_table(&summaries));
    }
    if let Some(dir) = &args.out {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let steps = dir.join("steps.csv");
        report::write_steps_csv(&steps, &runs)
            .with_context(|| format!("cannot write {}", steps.display()))?;
        let buckets = dir.join("buckets.csv");
        report::write_buckets_csv(&buckets, &summaries)
            .with_context(|| format!("cannot write {}", buckets.display()))?;
        let svg = dir.join("alloc.svg");
        let title = format!(
            "{}: GPU allocation vs arrived workload (median of {} seeds)",
            file_name(&args.pods),
            seeds.len()
        );
        std::fs::write(&svg, report::svg_plot(&summaries, &title))
            .with_context(|| format!("cannot write {}", svg.display()))?;
    }
    Ok(())
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_else(|| p.display().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_accept_inclusive_ranges_lists_and_single_values() {
        assert_eq!(
            parse_seeds("42..51").unwrap(),
            (42..=51).collect::<Vec<_>>()
        );
        assert_eq!(parse_seeds("42..=44").unwrap(), vec![42, 43, 44]);
        assert_eq!(parse_seeds("7, 9").unwrap(), vec![7, 9]);
        assert_eq!(parse_seeds("5").unwrap(), vec![5]);
        for bad in ["", "51..42", "a..b", "1,x", "0..20000"] {
            let e = parse_seeds(bad).unwrap_err().to_string();
            assert!(e.contains("inclusive range such as 42..51"), "{bad}: {e}");
        }
    }
}
