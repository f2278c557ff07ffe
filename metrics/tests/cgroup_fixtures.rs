//! PID → container mapping on fixture trees, one per combination of cgroup version, driver,
//! runtime and QoS class (built by `gm_testkit::cgroup`).

use gm_metrics::cgroup::{
    detect_layout, CgroupConfig, LookupSource, PidLookup, PidResolver, QosClass,
};
use gm_metrics::{CgroupDriver, CgroupVersion};
use gm_testkit::cgroup::{
    self as fixtures, all_combos, combo_node, container_id, pod_uid, FixtureContainer, HostProcess,
};

fn gpu_container(seed: u32, combo: fixtures::Combo) -> FixtureContainer {
    FixtureContainer {
        pod_uid: pod_uid(seed),
        container_id: container_id(seed),
        runtime: combo.runtime,
        qos: combo.qos,
        pids: vec![1000 + seed, 2000 + seed],
        nested_pids: vec![3000 + seed],
    }
}

fn config(node: &fixtures::FixtureNode) -> CgroupConfig {
    CgroupConfig {
        cgroup_root: node.cgroup_root.clone(),
        proc_root: node.proc_root.clone(),
        version: None,
        driver: None,
    }
}

/// Each combination's tree is built once (file creation dominates the run time) and checked
/// for everything that depends on the combination.
#[test]
fn every_combination_is_detected_and_maps_container_sandbox_and_helper_pids() {
    for (i, combo) in all_combos().into_iter().enumerate() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let c = gpu_container(i as u32, combo);
        let node = combo_node(dir.path(), combo, &c);
        detected_with_its_version_and_driver(combo, &node);
        container_pids_map_through_proc(combo, &node, &c);
        container_pids_map_through_the_tree_when_proc_has_no_entry(combo, &node, &c, dir.path());
        sandbox_maps_to_the_sandbox_and_conmon_to_no_container(combo, &node, &c);
    }
}

fn detected_with_its_version_and_driver(combo: fixtures::Combo, node: &fixtures::FixtureNode) {
    let layout = detect_layout(&config(node)).unwrap_or_else(|e| panic!("{combo}: {e}"));
    assert_eq!(layout.version, combo.version, "{combo}");
    assert_eq!(layout.driver, combo.driver, "{combo}");
    assert!(layout.detected, "{combo}");
}

fn container_pids_map_through_proc(
    combo: fixtures::Combo,
    node: &fixtures::FixtureNode,
    c: &FixtureContainer,
) {
    let resolver = PidResolver::new(config(node));
    let all: Vec<u32> = c.pids.iter().chain(&c.nested_pids).copied().collect();
    let found = resolver.resolve(all.iter().copied());
    for pid in &all {
        match found.get(pid) {
            Some(PidLookup::Found { identity, source }) => {
                assert_eq!(identity.pod_uid, c.pod_uid, "{combo} pid {pid}");
                assert_eq!(identity.container_id, c.container_id, "{combo} pid {pid}");
                assert_eq!(identity.qos, combo.qos, "{combo} pid {pid}");
                assert_eq!(*source, LookupSource::Proc, "{combo} pid {pid}");
            }
            other => panic!("{combo}: pid {pid} not mapped: {other:?}"),
        }
    }
}

fn container_pids_map_through_the_tree_when_proc_has_no_entry(
    combo: fixtures::Combo,
    node: &fixtures::FixtureNode,
    c: &FixtureContainer,
    dir: &std::path::Path,
) {
    let empty_proc = dir.join("empty-proc");
    std::fs::create_dir_all(&empty_proc).unwrap_or_else(|e| panic!("mkdir: {e}"));
    let resolver = PidResolver::new(CgroupConfig {
        proc_root: empty_proc,
        ..config(node)
    });
    let all: Vec<u32> = c.pids.iter().chain(&c.nested_pids).copied().collect();
    let found = resolver.resolve(all.iter().copied());
    for pid in &all {
        match found.get(pid) {
            Some(PidLookup::Found { identity, source }) => {
                assert_eq!(identity.container_id, c.container_id, "{combo} pid {pid}");
                assert_eq!(identity.pod_uid, c.pod_uid, "{combo} pid {pid}");
                assert_eq!(identity.qos, combo.qos, "{combo} pid {pid}");
                assert_eq!(*source, LookupSource::CgroupTree, "{combo} pid {pid}");
            }
            other => panic!("{combo}: pid {pid} not mapped through the tree: {other:?}"),
        }
    }
}

fn sandbox_maps_to_the_sandbox_and_conmon_to_no_container(
    combo: fixtures::Combo,
    node: &fixtures::FixtureNode,
    c: &FixtureContainer,
) {
    let resolver = PidResolver::new(config(node));
    let sandbox_pid = c.pids[0] + 50_000;
    let conmon_pid = c.pids[0] + 60_000;
    let found = resolver.resolve([sandbox_pid, conmon_pid]);
    match found.get(&sandbox_pid) {
        Some(PidLookup::Found { identity, .. }) => {
            assert_eq!(identity.pod_uid, c.pod_uid, "{combo}");
            assert_ne!(identity.container_id, c.container_id, "{combo}");
        }
        other => panic!("{combo}: sandbox not mapped: {other:?}"),
    }
    if combo.runtime == fixtures::Runtime::CriO {
        match found.get(&conmon_pid) {
            Some(PidLookup::NotFound { reason }) => {
                assert!(reason.contains("runtime helper"), "{combo}: {reason}")
            }
            other => panic!("{combo}: conmon mapped: {other:?}"),
        }
    }
}

#[test]
fn a_host_process_is_not_mapped_and_the_reason_says_so() {
    let combo = all_combos()[0];
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let node = combo_node(dir.path(), combo, &gpu_container(1, combo));
    node.add_host_process(&HostProcess {
        pid: 777,
        cgroup: "/system.slice/nvidia-persistenced.service".into(),
    });
    let found = PidResolver::new(config(&node)).resolve([777, 424242]);
    match found.get(&777) {
        Some(PidLookup::NotFound { reason }) => {
            assert!(reason.contains("not a Kubernetes pod"), "{reason}")
        }
        other => panic!("host process mapped: {other:?}"),
    }
    match found.get(&424242) {
        Some(PidLookup::NotFound { reason }) => {
            assert!(reason.contains("hostPID"), "{reason}");
            assert!(reason.contains("cgroup.procs"), "{reason}");
        }
        other => panic!("unknown pid mapped: {other:?}"),
    }
}

#[test]
fn a_configured_driver_or_version_overrides_detection() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let node = fixtures::new_node(dir.path(), CgroupVersion::V2, CgroupDriver::Systemd);
    let forced = CgroupConfig {
        version: Some(CgroupVersion::V2),
        driver: Some(CgroupDriver::Systemd),
        ..config(&node)
    };
    let layout = detect_layout(&forced).unwrap_or_else(|e| panic!("{e}"));
    assert!(!layout.detected);
    // Forcing the driver the node does not use is an error that names both directories.
    let wrong = CgroupConfig {
        driver: Some(CgroupDriver::Cgroupfs),
        ..config(&node)
    };
    let err = detect_layout(&wrong)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("kubepods.slice (systemd driver)"), "{err}");
    assert!(err.contains("kubepods (cgroupfs driver)"), "{err}");
}

#[test]
fn a_directory_that_is_not_a_cgroup_mount_is_refused_with_the_fix() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let err = detect_layout(&CgroupConfig {
        cgroup_root: dir.path().to_path_buf(),
        ..CgroupConfig::default()
    })
    .err()
    .map(|e| e.to_string())
    .unwrap_or_default();
    assert!(err.contains("is not a cgroup mount"), "{err}");
    assert!(err.contains("--cgroup-root"), "{err}");
    // The per-PID path still works without a usable cgroup root.
    let resolver = PidResolver::new(CgroupConfig {
        cgroup_root: dir.path().to_path_buf(),
        proc_root: dir.path().to_path_buf(),
        ..CgroupConfig::default()
    });
    assert!(resolver.layout().is_err());
    let found = resolver.resolve([5]);
    match found.get(&5) {
        Some(PidLookup::NotFound { reason }) => {
            assert!(
                reason.contains("cgroup tree cannot be searched"),
                "{reason}"
            )
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn pods_of_every_qos_class_on_one_node_map_to_their_own_containers() {
    for (version, driver) in [
        (CgroupVersion::V1, CgroupDriver::Cgroupfs),
        (CgroupVersion::V2, CgroupDriver::Systemd),
    ] {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let node = fixtures::new_node(dir.path(), version, driver);
        let qos = [
            QosClass::Guaranteed,
            QosClass::Burstable,
            QosClass::BestEffort,
        ];
        let containers: Vec<FixtureContainer> = qos
            .iter()
            .enumerate()
            .map(|(i, q)| FixtureContainer {
                pod_uid: pod_uid(i as u32),
                container_id: container_id(i as u32),
                runtime: fixtures::Runtime::Containerd,
                qos: *q,
                pids: vec![100 + i as u32],
                nested_pids: vec![],
            })
            .collect();
        for c in &containers {
            node.add_container(c);
        }
        let found = PidResolver::new(config(&node)).resolve([100, 101, 102]);
        for c in &containers {
            match found.get(&c.pids[0]) {
                Some(PidLookup::Found { identity, .. }) => {
                    assert_eq!(identity.container_id, c.container_id);
                    assert_eq!(identity.qos, c.qos);
                }
                other => panic!("{version}/{driver}: {other:?}"),
            }
        }
    }
}
