//! Added cost of the hooks on the hot paths, against the fake driver's no-op launch:
//! `cargo bench -p gm-limiter --bench hotpath`.
//!
//! Each sample runs the C probe (`tests/progs/probe.c`) for `iters` operations in one process
//! and reports the probe's own loop time, so process start-up is not measured. Cases:
//! * `launch/bare`: `cuLaunchKernel` of the fake's `noop` kernel, no limiter;
//! * `launch/inert`: the limiter loaded without a config (pass-through);
//! * `launch/share100`: a whole-card config (never throttled);
//! * `paced/bare`, `paced/share30`: one launch every 5 µs, timing only the launch call, so a
//!   30 % share's bucket (1 µs minimum cost → 3.3 µs of bucket per launch) never has to wait:
//!   the cost of the full throttling path (clock, cost lookup, CAS) when tokens are plentiful;
//! * `alloc/bare`, `alloc/share30`: `cuMemAlloc_v2` + `cuMemFree_v2` of 1 MiB.
//!
//! Under `cargo test --all-targets` criterion runs each case once.

#[path = "../tests/probe/mod.rs"]
mod probe;
#[path = "../tests/support/mod.rs"]
mod support;

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use probe::{Probe, MIB};

fn per_op(p: &Probe, preload: bool, cmd: &str, key: &str, iters: u64) -> Duration {
    let n = iters.max(1).to_string();
    let out = if preload {
        p.run(&[cmd, &n])
    } else {
        p.run_bare(&[cmd, &n])
    };
    let ns: f64 = out
        .get(key)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{out:?}"));
    Duration::from_nanos((ns * iters.max(1) as f64) as u64)
}

fn hotpath(c: &mut Criterion) {
    let share30 = Probe::new()
        .cap(64 * 1024 * MIB)
        .physical(128 * 1024 * MIB)
        .share(30);
    let share100 = Probe::new()
        .cap(64 * 1024 * MIB)
        .physical(128 * 1024 * MIB)
        .share(100);
    let inert = Probe::new().no_config();
    let mut g = c.benchmark_group("launch");
    g.sample_size(20);
    g.bench_function("bare", |b| {
        b.iter_custom(|n| per_op(&share30, false, "launches", "ns_per_launch", n))
    });
    g.bench_function("inert", |b| {
        b.iter_custom(|n| per_op(&inert, true, "launches", "ns_per_launch", n))
    });
    g.bench_function("share100", |b| {
        b.iter_custom(|n| per_op(&share100, true, "launches", "ns_per_launch", n))
    });
    g.finish();
    let mut g = c.benchmark_group("paced");
    g.sample_size(10);
    let paced = |p: &Probe, preload: bool, n: u64| {
        let iters = n.max(1).to_string();
        let out = if preload {
            p.run(&["paced", &iters, "5000"])
        } else {
            p.run_bare(&["paced", &iters, "5000"])
        };
        let ns: f64 = out
            .get("ns_per_launch")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{out:?}"));
        Duration::from_nanos((ns * n.max(1) as f64) as u64)
    };
    g.bench_function("bare", |b| b.iter_custom(|n| paced(&share30, false, n)));
    g.bench_function("share30", |b| b.iter_custom(|n| paced(&share30, true, n)));
    g.finish();
    let mut g = c.benchmark_group("alloc");
    g.sample_size(20);
    g.bench_function("bare", |b| {
        b.iter_custom(|n| per_op(&share30, false, "allocs", "ns_per_pair", n))
    });
    g.bench_function("share30", |b| {
        b.iter_custom(|n| per_op(&share30, true, "allocs", "ns_per_pair", n))
    });
    g.finish();
}

criterion_group!(benches, hotpath);
criterion_main!(benches);
