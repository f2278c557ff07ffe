//! The memory cap through libvcuda.so against the fake driver: every allocation path, the
//! reported values, several processes at once, kill -9 and fork.

mod probe;
mod support;

use probe::{Probe, MIB};

const PATHS: &[&str] = &[
    "cuMemAlloc_v2",
    "cuMemAlloc",
    "cuMemAllocManaged",
    "cuMemAllocPitch_v2",
    "cuMemAllocAsync",
    "cuMemAllocAsync_ptsz",
    "cuMemAllocFromPoolAsync",
    "cuArrayCreate_v2",
    "cuArray3DCreate_v2",
    "cuMemCreate",
];

#[test]
fn every_allocation_path_stops_exactly_at_the_cap_with_out_of_memory() {
    let cap = 1024 * MIB;
    let chunk = 64 * MIB;
    for path in PATHS {
        let p = Probe::new().cap(cap).physical(4096 * MIB);
        let out = p.run(&["fill", path, &chunk.to_string()]);
        assert_eq!(out.num("obtained"), cap, "{path}: {out:?}");
        assert_eq!(
            out.get("error"),
            Some("2"),
            "{path}: CUDA_ERROR_OUT_OF_MEMORY: {out:?}"
        );
        // Without the limiter the same program gets the whole physical card, so the refusal
        // above was ours, not the driver's. (Not for the 32-bit v1 API: its pointers cannot
        // span 4 GiB of addresses.)
        if *path == "cuMemAlloc" {
            continue;
        }
        let bare = p.run_bare(&["fill", path, &chunk.to_string()]);
        assert_eq!(
            bare.num("obtained"),
            4096 * MIB,
            "{path} unlimited: {bare:?}"
        );
    }
}

#[test]
fn memory_freed_is_available_again() {
    // fill frees everything at the end; a second fill in the same container gets the cap again.
    let p = Probe::new().cap(512 * MIB);
    for _ in 0..2 {
        let out = p.run(&["fill", "cuMemAlloc_v2", &(32 * MIB).to_string()]);
        assert_eq!(out.num("obtained"), 512 * MIB, "{out:?}");
    }
}

#[test]
fn cuda_and_nvml_report_the_cap_and_the_containers_use() {
    let p = Probe::new().cap(1024 * MIB).physical(8192 * MIB);
    let holder = p.spawn(&["hold", &(256 * MIB).to_string(), "5"]);
    wait_for_charge(&p, 256 * MIB);
    let out = p.run(&["meminfo"]);
    assert_eq!(out.num("total"), 1024 * MIB, "{out:?}");
    assert_eq!(
        out.num("free"),
        768 * MIB,
        "the other process's 256 MiB count: {out:?}"
    );
    assert_eq!(out.num("device_total"), 1024 * MIB, "{out:?}");
    assert_eq!(out.num("total_v1"), 1024 * MIB, "{out:?}");
    assert_eq!(
        out.num("nvml_total"),
        1024 * MIB,
        "nvidia-smi's view: {out:?}"
    );
    assert_eq!(out.num("nvml_used"), 256 * MIB, "{out:?}");
    assert_eq!(out.num("nvml_free"), 768 * MIB, "{out:?}");
    kill9(holder);
}

#[test]
fn an_nvml_only_process_like_nvidia_smi_sees_the_cap() {
    let p = Probe::new().cap(2048 * MIB).physical(8192 * MIB);
    let out = p.run(&["nvml"]);
    assert_eq!(out.get("init"), Some("0"), "{out:?}");
    assert_eq!(out.num("nvml_total"), 2048 * MIB, "{out:?}");
    let bare = p.run_bare(&["nvml"]);
    assert_eq!(bare.num("nvml_total"), 8192 * MIB, "{bare:?}");
}

#[test]
fn a_cap_above_the_physical_memory_reports_the_physical_memory() {
    let p = Probe::new().cap(16384 * MIB).physical(2048 * MIB);
    let out = p.run(&["meminfo"]);
    assert_eq!(out.num("total"), 2048 * MIB, "{out:?}");
    assert_eq!(out.num("nvml_total"), 2048 * MIB, "{out:?}");
}

#[test]
fn concurrent_processes_never_exceed_the_cap_together() {
    let cap = 512 * MIB;
    let p = Probe::new().cap(cap).physical(8192 * MIB);
    let children: Vec<_> = (0..6)
        .map(|_| p.spawn(&["race", &(16 * MIB).to_string()]))
        .collect();
    let total: u64 = children
        .into_iter()
        .map(|c| Probe::wait(c).num("obtained"))
        .sum();
    assert!(total <= cap, "{total} bytes obtained together, cap {cap}");
    assert!(total >= cap / 2, "the processes did get memory: {total}");
}

#[test]
fn a_killed_processes_charge_is_released() {
    let p = Probe::new().cap(1024 * MIB);
    let holder = p.spawn(&["hold", &(768 * MIB).to_string(), "60"]);
    wait_for_charge(&p, 768 * MIB);
    let while_alive = p.run(&["fill", "cuMemAlloc_v2", &(64 * MIB).to_string()]);
    assert_eq!(while_alive.num("obtained"), 256 * MIB, "{while_alive:?}");
    kill9(holder);
    let after = p.run(&["fill", "cuMemAlloc_v2", &(64 * MIB).to_string()]);
    assert_eq!(
        after.num("obtained"),
        1024 * MIB,
        "the dead process's 768 MiB are free: {after:?}"
    );
}

#[test]
fn a_forked_child_shares_its_parents_cap() {
    let p = Probe::new().cap(1024 * MIB);
    let out = p.run(&["fork", &(600 * MIB).to_string()]);
    assert_eq!(out.get("parent"), Some("0"), "{out:?}");
    assert_eq!(
        out.get("child"),
        Some("2"),
        "600 + 600 MiB exceed the 1 GiB cap: {out:?}"
    );
    assert_eq!(out.get("child_exit"), Some("0"), "{out:?}");
}

/// Wait until the container's charged memory (as cuMemGetInfo shows it) reaches `bytes`.
fn wait_for_charge(p: &Probe, bytes: u64) {
    for _ in 0..200 {
        let out = p.run(&["meminfo"]);
        if out.num("total").saturating_sub(out.num("free")) >= bytes {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    panic!("the holder never charged {bytes} bytes");
}

fn kill9(mut child: std::process::Child) {
    let _ = child.kill();
    let _ = child.wait();
}
