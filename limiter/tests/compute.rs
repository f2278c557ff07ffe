//! The compute path through libvcuda.so against the fake device, end to end: launches are
//! throttled to the share, a whole card is not, and the NVML sampler finds the container's
//! processes through the host pids gpu-manager publishes (the fake reports pids shifted by
//! 100000, as a pid namespace would). Shares are measured in the fake's model time; the bands
//! are wide because this is real time on a shared machine (the accuracy figures come from
//! `cargo bench -p gm-limiter --bench share`).

mod probe;
mod support;

use gm_limiter_core::region::{self, card};
use probe::Probe;
use support::{monotonic_ns, FakeGpu};

fn region_u32(p: &Probe, field: usize) -> u32 {
    let bytes = std::fs::read(p.dir.path().join(region::REGION_FILE)).expect("the region exists");
    let off = region::card_field(0, field);
    u32::from_le_bytes(bytes[off..off + 4].try_into().expect("4 bytes"))
}

fn busy_share(gpu: &FakeGpu, pid: u32, from: u64, to: u64) -> f64 {
    100.0 * gpu.busy_ns_by_pid(from, to).get(&pid).copied().unwrap_or(0) as f64 / (to - from) as f64
}

#[test]
fn a_share_is_throttled_and_the_sampler_sees_the_containers_use_through_published_host_pids() {
    let gpu = FakeGpu::new().pid_offset(100_000);
    let p = Probe::new()
        .share(30)
        .fake_state(gpu.state_path())
        .env("FAKEGPU_PID_OFFSET", "100000")
        .prepare();
    let t0 = monotonic_ns();
    let child = p.spawn(&["busy", "2000", "2.5", "4"]);
    let pid = child.id();
    std::fs::write(
        p.dir.path().join(gm_limiter_core::hostpids::HOSTPIDS_FILE),
        gm_limiter_core::hostpids::encode(&[pid + 100_000]),
    )
    .expect("publish host pids");
    let out = Probe::wait(child);
    assert!(out.get("launched").is_some(), "{out:?}");
    let share = busy_share(&gpu, pid, t0 + 500_000_000, t0 + 2_500_000_000);
    assert!(
        (15.0..45.0).contains(&share),
        "a 30 % share used {share:.1} % of the card"
    );
    let own = region_u32(&p, card::OWN_UTIL);
    assert!(
        own >= 100,
        "the sampler measured the container's own use: {own} per mille"
    );
}

#[test]
fn without_host_pids_the_sampler_cannot_tell_its_own_use_and_leaves_the_rate_alone() {
    let gpu = FakeGpu::new().pid_offset(100_000);
    let p = Probe::new()
        .share(30)
        .fake_state(gpu.state_path())
        .env("FAKEGPU_PID_OFFSET", "100000");
    let out = p.run(&["busy", "2000", "1.5", "4"]);
    assert!(out.get("launched").is_some(), "{out:?}");
    assert_eq!(region_u32(&p, card::OWN_UTIL), 0, "nothing matched");
    let m = region_u32(&p, card::MULTIPLIER_PPM);
    assert!(
        m == 0 || m == 1_000_000,
        "open loop keeps the multiplier at 1: {m}"
    );
}

#[test]
fn a_whole_card_container_is_never_throttled() {
    let gpu = FakeGpu::new();
    let p = Probe::new()
        .share(100)
        .fake_state(gpu.state_path())
        .prepare();
    let t0 = monotonic_ns();
    let child = p.spawn(&["busy", "2000", "1.5", "4"]);
    let pid = child.id();
    let out = Probe::wait(child);
    assert!(out.get("launched").is_some(), "{out:?}");
    let share = busy_share(&gpu, pid, t0 + 300_000_000, t0 + 1_500_000_000);
    assert!(share > 85.0, "a whole card used only {share:.1} %");
}

#[test]
fn per_thread_stream_and_graph_launches_are_throttled_too() {
    for mode in ["ptsz", "graph", "large"] {
        let gpu = FakeGpu::new();
        let p = Probe::new()
            .share(30)
            .fake_state(gpu.state_path())
            .prepare();
        let kernel_us = if mode == "large" { "100000" } else { "2000" };
        let depth = if mode == "large" { "1" } else { "4" };
        let t0 = monotonic_ns();
        let child = p.spawn(&["busy", kernel_us, "2.5", depth, mode]);
        let pid = child.id();
        let out = Probe::wait(child);
        assert!(out.get("launched").is_some(), "{mode}: {out:?}");
        let share = busy_share(&gpu, pid, t0 + 700_000_000, t0 + 2_500_000_000);
        assert!(
            (10.0..50.0).contains(&share),
            "{mode}: a 30 % share used {share:.1} %"
        );
    }
}

#[test]
fn soft_mode_uses_an_idle_card_up_to_its_limit() {
    let gpu = FakeGpu::new().pid_offset(100_000);
    let p = Probe::new()
        .share(30)
        .soft(90)
        .fake_state(gpu.state_path())
        .env("FAKEGPU_PID_OFFSET", "100000")
        .prepare();
    let t0 = monotonic_ns();
    let child = p.spawn(&["busy", "2000", "5", "4"]);
    let pid = child.id();
    std::fs::write(
        p.dir.path().join(gm_limiter_core::hostpids::HOSTPIDS_FILE),
        gm_limiter_core::hostpids::encode(&[pid + 100_000]),
    )
    .expect("publish host pids");
    let out = Probe::wait(child);
    assert!(out.get("launched").is_some(), "{out:?}");
    let late = busy_share(&gpu, pid, t0 + 3_500_000_000, t0 + 5_000_000_000);
    assert!(
        late > 45.0,
        "alone on the card, a 30 % share with a 90 % soft limit used only {late:.1} %"
    );
    let target = region_u32(&p, card::TARGET);
    assert!(
        target > 300,
        "the soft target rose above the share: {target} per mille"
    );
}
