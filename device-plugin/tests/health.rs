//! Card health reaches the kubelet through ListAndWatch.

mod support;

use std::time::Duration;

use gm_proto::deviceplugin::v1beta1 as dp;
use support::*;

const NODE: &str = r#"
cards:
  - {uuid: GPU-0000, model: Tesla T4, memoryMiB: 15360, minor: 0, pciBusId: "0000:01:00.0", numaNode: 0}
  - {uuid: GPU-1111, model: Tesla T4, memoryMiB: 15360, minor: 1, pciBusId: "0000:02:00.0", numaNode: 0}
  - {uuid: GPU-2222, model: Tesla T4, memoryMiB: 15360, minor: 2, pciBusId: "0000:03:00.0", numaNode: 1}
links:
  - [X, PIX, SYS]
  - [PIX, X, SYS]
  - [SYS, SYS, X]
events:
  - {atMs: 200, card: GPU-1111, kind: xid, code: 31}
  - {atMs: 400, card: GPU-2222, kind: xid, code: 79}
  - {atMs: 400, card: GPU-2222, kind: lost}
  - {atMs: 1500, card: GPU-2222, kind: recovered}
"#;

fn health_of(m: &dp::ListAndWatchResponse, card: u32) -> Vec<&str> {
    let prefix = format!("-{card}-");
    let mut h: Vec<&str> = m
        .devices
        .iter()
        .filter(|d| d.id.contains(&prefix))
        .map(|d| d.health.as_str())
        .collect();
    h.dedup();
    h
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_critical_xid_marks_the_card_unhealthy_and_recovery_marks_it_healthy() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("xid.yaml");
    std::fs::write(&file, NODE).unwrap();
    let h = Harness::new(file).await;
    let _d = h.daemon(false).await;

    for resource in [CORE, MEMORY] {
        let (at, sick) = h
            .kubelet
            .wait_devices_from(resource, 0, Duration::from_secs(5), |m| {
                health_of(m, 2) == ["Unhealthy"]
            })
            .await;
        // Only card 2's devices changed; the application XID 31 on card 1 was ignored.
        assert_eq!(health_of(&sick, 0), ["Healthy"]);
        assert_eq!(health_of(&sick, 1), ["Healthy"]);
        let (_, back) = h
            .kubelet
            .wait_devices_from(resource, at + 1, Duration::from_secs(5), |m| {
                health_of(m, 2) == ["Healthy"]
            })
            .await;
        assert_eq!(
            back.devices.len(),
            sick.devices.len(),
            "no device is ever left out"
        );
    }
    // The sequence seen by the kubelet: healthy, unhealthy, healthy again (never card 1).
    let updates = h.kubelet.updates(CORE);
    let card2: Vec<Vec<&str>> = updates.iter().map(|m| health_of(m, 2)).collect();
    let first_sick = card2.iter().position(|h| h == &["Unhealthy"]).unwrap();
    assert!(card2[..first_sick].iter().all(|h| h == &["Healthy"]));
    assert!(card2[first_sick..].iter().any(|h| h == &["Healthy"]));
    assert!(updates.iter().all(|m| health_of(m, 1) == ["Healthy"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_xid_counts_reach_the_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("xid.yaml");
    std::fs::write(&file, NODE).unwrap();
    let h = Harness::new(file).await;
    let d = h.daemon(false).await;
    h.kubelet
        .wait_devices(CORE, Duration::from_secs(5), |m| {
            health_of(m, 2) == ["Unhealthy"]
        })
        .await;
    let snap = d.handle().snapshot();
    assert!(
        snap.xid_errors.contains(&(1, 31, 1)),
        "{:?}",
        snap.xid_errors
    );
    assert!(
        snap.xid_errors.contains(&(2, 79, 1)),
        "{:?}",
        snap.xid_errors
    );
}
