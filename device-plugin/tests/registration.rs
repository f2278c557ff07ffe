//! Registration with the kubelet over real unix sockets: payloads, device lists, kubelet
//! restarts and shutdown.

mod support;

use std::time::{Duration, Instant};

use gm_proto::deviceplugin::v1beta1 as dp;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_plugins_register_with_the_tkestack_names_and_identical_options() {
    let h = Harness::new(example_node("h100-sxm-8.yaml")).await;
    let _d = h.daemon(false).await;
    let regs = h.kubelet.registrations();
    let mut seen: Vec<(String, String)> = regs
        .iter()
        .map(|r| (r.request.resource_name.clone(), r.request.endpoint.clone()))
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        [
            (CORE.to_string(), "vcore.sock".to_string()),
            (MEMORY.to_string(), "vmemory.sock".to_string())
        ]
    );
    for r in &regs {
        assert_eq!(r.request.version, "v1beta1");
        let want = dp::DevicePluginOptions {
            pre_start_required: true,
            get_preferred_allocation_available: true,
        };
        assert_eq!(r.request.options, Some(want));
        assert_eq!(
            r.options, want,
            "GetDevicePluginOptions must match Register"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listandwatch_lists_every_card_id_with_its_numa_node() {
    let h = Harness::new(example_node("h100-sxm-8.yaml")).await;
    let _d = h.daemon(false).await;
    let core = h
        .kubelet
        .wait_devices(CORE, STEP, |m| !m.devices.is_empty())
        .await;
    assert_eq!(core.devices.len(), 800);
    assert!(core.devices.iter().all(|d| d.health == "Healthy"));
    let d = core.devices.iter().find(|d| d.id == "vcore-5-99").unwrap();
    assert_eq!(
        d.topology.as_ref().unwrap().nodes[0].id,
        1,
        "card 5 is on NUMA node 1"
    );
    let d = core.devices.iter().find(|d| d.id == "vcore-0-0").unwrap();
    assert_eq!(d.topology.as_ref().unwrap().nodes[0].id, 0);
    let mem = h
        .kubelet
        .wait_devices(MEMORY, STEP, |m| !m.devices.is_empty())
        .await;
    // floor(81559 / 256) = 318 blocks per card.
    assert_eq!(mem.devices.len(), 8 * 318);
    assert!(device_ids(&mem).contains(&"vmem-7-317".to_string()));
    assert!(!device_ids(&mem).contains(&"vmem-7-318".to_string()));
    assert!(mem.devices.iter().all(|d| d.id.len() <= 63));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cards_without_a_known_numa_node_carry_no_topology() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("node.yaml");
    std::fs::write(
        &file,
        "cards:\n  - {uuid: GPU-aaaa, model: Tesla T4, memoryMiB: 15360, minor: 0}\n",
    )
    .unwrap();
    let h = Harness::new(file).await;
    let _d = h.daemon(false).await;
    let core = h
        .kubelet
        .wait_devices(CORE, STEP, |m| !m.devices.is_empty())
        .await;
    assert!(core.devices.iter().all(|d| d.topology.is_none()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kubelet_restart_is_followed_by_registration_within_one_second() {
    let mut h = Harness::new(example_node("t4-pcie-4.yaml")).await;
    let _d = h.daemon(false).await;
    for round in 1..=3 {
        let recreated = h.kubelet.restart().await;
        let regs = h.kubelet.wait_registrations(2 + 2 * round).await;
        let latest = &regs[regs.len() - 2..];
        for r in latest {
            let after = r.at.duration_since(recreated);
            assert!(
                after <= Duration::from_secs(1),
                "{} registered {after:?} after kubelet.sock was recreated",
                r.request.resource_name
            );
        }
        // The new streams carry the full device list again.
        let t = Instant::now();
        h.kubelet
            .wait_devices(CORE, STEP, |m| m.devices.len() == 400)
            .await;
        assert!(t.elapsed() < STEP);
    }
    // One registration per plugin per restart, no more (no restart storms).
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(h.kubelet.registrations().len(), 2 + 2 * 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_waits_for_a_kubelet_that_starts_later() {
    let mut h = Harness::new(example_node("t4-pcie-4.yaml")).await;
    h.kubelet.stop().await;
    let d = h.daemon_with(h.config(), false).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(!d.handle().ready());
    assert!(h.kubelet.registrations().is_empty());
    let started = h.kubelet.restart().await;
    let regs = h.kubelet.wait_registrations(2).await;
    assert!(regs
        .iter()
        .all(|r| r.at.duration_since(started) < Duration::from_secs(1)));
    let t = Instant::now();
    while !d.handle().ready() && t.elapsed() < STEP {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(d.handle().ready());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_removes_our_sockets_and_ends_the_streams() {
    let h = Harness::new(example_node("t4-pcie-4.yaml")).await;
    let d = h.daemon(false).await;
    let dir = h.config().kubelet_dir;
    assert!(dir.join("vcore.sock").exists() && dir.join("vmemory.sock").exists());
    d.shutdown().await;
    assert!(!dir.join("vcore.sock").exists());
    assert!(!dir.join("vmemory.sock").exists());
    assert!(
        dir.join("kubelet.sock").exists(),
        "the kubelet's socket is not ours"
    );
    assert!(h.config().checkpoint_path().exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_reports_registration() {
    let mut h = Harness::new(example_node("t4-pcie-4.yaml")).await;
    h.kubelet.stop().await;
    let mut cfg = h.config();
    cfg.metrics = Some(gm_metrics::MetricsConfig {
        addr: "127.0.0.1:0".parse().unwrap(),
        ..Default::default()
    });
    let d = h.daemon_with(cfg, false).await;
    let addr = d.handle().metrics_addr().unwrap();
    let get = |path: &'static str| async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    };
    assert!(get("/healthz").await.starts_with("HTTP/1.0 200"));
    let r = get("/readyz").await;
    assert!(r.starts_with("HTTP/1.0 503"), "{r}");
    assert!(
        r.contains("tencent.com/vcuda-core, tencent.com/vcuda-memory not registered"),
        "{r}"
    );
    h.kubelet.restart().await;
    h.kubelet.wait_registrations(2).await;
    let t = Instant::now();
    loop {
        let r = get("/readyz").await;
        if r.starts_with("HTTP/1.0 200") {
            break;
        }
        assert!(t.elapsed() < STEP, "{r}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_kubelet_that_dials_back_after_register_works_too() {
    let h = Harness::new(example_node("t4-pcie-4.yaml")).await;
    h.kubelet.dial_back_asynchronously();
    let _d = h.daemon(false).await;
    let core = h
        .kubelet
        .wait_devices(CORE, STEP, |m| m.devices.len() == 400)
        .await;
    assert!(core.devices.iter().all(|d| d.health == "Healthy"));
    h.kubelet
        .allocate(CORE, &ids("vcore", 0, 0..10))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_registration_is_retried_with_backoff() {
    let h = Harness::new(example_node("t4-pcie-4.yaml")).await;
    h.kubelet.refuse_next(3);
    let t = Instant::now();
    let d = h.daemon(false).await;
    assert!(h.kubelet.refused() >= 3);
    // 100 ms, 200 ms, 400 ms of backoff for one plugin at most, then success.
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    while !d.handle().ready() {
        assert!(t.elapsed() < STEP, "never ready after the refusals");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
