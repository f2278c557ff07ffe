//! Compute share in real time against the fake device: several containers (each its own
//! config and state dir, like pods) run `busy` kernels on one simulated card, and the fake's
//! ring of kernel executions gives each process's measured busy share.
//!
//! `cargo bench -p gm-limiter --bench share` runs 12 s per case (the first 3 s are settling);
//! under `cargo test --all-targets` it runs each case for 1.5 s and only checks that every
//! tenant ran. Prints one line per tenant: target, measured share, error.

#[path = "../tests/probe/mod.rs"]
mod probe;
#[path = "../tests/support/mod.rs"]
mod support;

use probe::Probe;
use support::{monotonic_ns, FakeGpu};

fn case(
    name: &str,
    shares: &[u32],
    kernel_us: u64,
    large: bool,
    seconds: f64,
    settle: f64,
) -> Vec<(u32, f64)> {
    let gpu = FakeGpu::new();
    let tenants: Vec<Probe> = shares
        .iter()
        .map(|&s| Probe::new().share(s).fake_state(gpu.state_path()).prepare())
        .collect();
    let t0 = monotonic_ns();
    let secs = seconds.to_string();
    let kus = kernel_us.to_string();
    let args: Vec<&str> = if large {
        vec!["busy", &kus, &secs, "1", "large"]
    } else {
        vec!["busy", &kus, &secs, "4"]
    };
    let children: Vec<_> = tenants.iter().map(|t| t.spawn(&args)).collect();
    let pids: Vec<u32> = children.iter().map(|c| c.id()).collect();
    for c in children {
        let out = Probe::wait(c);
        assert!(
            out.get("launched").is_some(),
            "{name}: a tenant did not run: {out:?}"
        );
    }
    let from = t0 + (settle * 1e9) as u64;
    let to = t0 + (seconds * 1e9) as u64;
    let busy = gpu.busy_ns_by_pid(from, to);
    let span = (to - from) as f64;
    let mut result = Vec::new();
    for (&share, pid) in shares.iter().zip(pids) {
        let got = 100.0 * busy.get(&pid).copied().unwrap_or(0) as f64 / span;
        println!(
            "{name}: target {share:>2} %  measured {got:5.1} %  error {:+5.1}",
            got - f64::from(share)
        );
        result.push((share, got));
    }
    result
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let (seconds, settle) = if bench { (12.0, 3.0) } else { (1.5, 0.5) };
    let mut worst: f64 = 0.0;
    for (name, shares, kernel_us, large) in [
        ("alone 30 %, 2 ms kernels", vec![30], 2_000, false),
        (
            "alone 30 %, one 200 ms kernel + sync",
            vec![30],
            200_000,
            true,
        ),
        (
            "two tenants 30/70, 2 ms kernels",
            vec![30, 70],
            2_000,
            false,
        ),
        (
            "three tenants 20/30/50, 2 ms kernels",
            vec![20, 30, 50],
            2_000,
            false,
        ),
        (
            "two tenants 30/70, 200 us kernels",
            vec![30, 70],
            200,
            false,
        ),
    ] {
        for (share, got) in case(name, &shares, kernel_us, large, seconds, settle) {
            worst = worst.max((got - f64::from(share)).abs());
        }
    }
    println!("worst error {worst:.1} points");
}
