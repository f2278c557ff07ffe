//! Stand-alone `gm-sim`: the same as `gpu-admission simulate`, for running the simulator
//! without the rest of the system.

use clap::Parser;

/// Replay an openb trace and report GPU allocation ratio, fragmentation and decision latency.
#[derive(Debug, Parser)]
#[command(name = "gm-sim", version)]
struct Cli {
    #[command(flatten)]
    args: gm_sim::SimulateArgs,
}

fn main() -> anyhow::Result<()> {
    gm_sim::run(Cli::parse().args)
}
