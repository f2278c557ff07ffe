//! `overhead`: host cost of an asynchronous empty launch, of a 1 MiB alloc+free pair, and of
//! `cuInit`.

use std::time::Instant;

use crate::args::Args;
use crate::cuda::{Gpu, LaunchApi};
use crate::error::Result;
use crate::json::Line;
use crate::stats;
use crate::Global;

pub fn run(g: &Global, mut a: Args) -> Result<()> {
    let launches: u64 = a.num("launches", 200_000u64)?;
    let batch: u64 = a.num("batch", 1000u64)?.max(1);
    let pairs: u64 = a.num("alloc-pairs", 10_000u64)?;
    let alloc_bytes = a.bytes("alloc-bytes")?.unwrap_or(1 << 20).max(1);
    let api = LaunchApi::parse(a.opt("api")?.as_deref().unwrap_or("legacy"))?;
    a.finish()?;

    let mut gpu = Gpu::open(&g.cuda_lib, g.device)?;
    let k = gpu.kernels()?;
    let c = &gpu.cuda;
    let l = c.launcher(api)?;
    let stream = c.stream_create()?;

    // Warm-up: first launches pay for module upload and lazy driver state.
    for _ in 0..batch.min(launches).max(100) {
        gpu.launch_noop(&k, &l, stream)?;
    }
    c.stream_synchronize(stream)?;

    let mut per_launch_ns: Vec<f64> = Vec::new();
    let t_all = Instant::now();
    let mut done = 0u64;
    while done < launches {
        let n = batch.min(launches - done);
        let t = Instant::now();
        for _ in 0..n {
            gpu.launch_noop(&k, &l, stream)?;
        }
        per_launch_ns.push(t.elapsed().as_nanos() as f64 / n as f64);
        done += n;
    }
    let submit_ms = t_all.elapsed().as_secs_f64() * 1e3;
    let t_drain = Instant::now();
    c.stream_synchronize(stream)?;
    let drain_ms = t_drain.elapsed().as_secs_f64() * 1e3;

    let mut pair_ns: Vec<f64> = Vec::with_capacity(pairs as usize);
    for _ in 0..pairs {
        let t = Instant::now();
        let p = c.mem_alloc(alloc_bytes as usize)?;
        c.mem_free(p)?;
        pair_ns.push(t.elapsed().as_nanos() as f64);
    }

    Line::new("overhead")
        .set("api", l.name)
        .set("launches", launches)
        .set("batch", batch)
        .set("launch_ns_p50", stats::median(&per_launch_ns))
        .set("launch_ns_p99", stats::percentile(&per_launch_ns, 99.0))
        .set("launch_ns_mean", stats::mean(&per_launch_ns))
        .set("submit_ms", submit_ms)
        .set("drain_ms", drain_ms)
        .set("alloc_pairs", pairs)
        .set("alloc_bytes", alloc_bytes)
        .set("alloc_free_ns_p50", stats::median(&pair_ns))
        .set("alloc_free_ns_p99", stats::percentile(&pair_ns, 99.0))
        .set("cuinit_ms", gpu.init_latency.as_secs_f64() * 1e3)
        .emit();
    Ok(())
}
