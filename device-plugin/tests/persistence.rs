//! State across restarts: checkpoint restore, rebuild from pod-resources, garbage collection.

mod support;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::instrument::WithSubscriber;

use gm_device_plugin::shared::RestoreOutcome;
use gm_device_plugin::Daemon;
use support::*;

const H100: &str = "h100-sxm-8.yaml";

/// Captures log output written on the current thread.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// The tests of this file run one at a time: they check what start-up logs, and tracing
/// caches each log site's interest across the process, so a daemon starting concurrently in
/// another test (with no subscriber) could make a site skip this test's subscriber.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Start a daemon while capturing what it logs during start-up.
async fn start_logged(h: &Harness) -> (Daemon, String) {
    let cap = Captured::default();
    let writer = cap.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let before = h.kubelet.registrations().len();
    // The subscriber follows the start-up future across the runtime's worker threads (a
    // thread-local default would miss whatever it logs after an await resumed elsewhere).
    let d = h
        .daemon_with(h.config(), false)
        .with_subscriber(subscriber)
        .await;
    h.kubelet.wait_registrations(before + 2).await;
    (d, cap.text())
}

async fn wait_until(what: &str, cond: impl Fn() -> bool) {
    let t = Instant::now();
    while !cond() {
        assert!(t.elapsed() < STEP, "{what}: not within {STEP:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn summary(d: &Daemon) -> Vec<(String, Vec<u32>, u32)> {
    let mut v: Vec<_> = d
        .handle()
        .snapshot()
        .allocations
        .into_iter()
        .map(|a| {
            (
                a.pod_name,
                a.cards.iter().map(|c| c.card).collect(),
                a.request_cores,
            )
        })
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_daemon_restarts_with_its_allocations() {
    let _serial = SERIAL.lock().await;
    let h = Harness::new(example_node(H100)).await;
    let d = h.daemon(false).await;
    let share = ids("vcore", 2, 0..40);
    let share_mem = ids("vmem", 2, 0..16);
    let mut whole = ids("vcore", 5, 0..100);
    whole.extend(ids("vcore", 6, 0..100));
    let share_resp = h.kubelet.allocate(CORE, &share).await.unwrap();
    h.kubelet.allocate(MEMORY, &share_mem).await.unwrap();
    let whole_resp = h.kubelet.allocate(CORE, &whole).await.unwrap();
    let before = summary(&d);
    assert!(d.handle().wait_persisted(STEP).await);
    d.kill();
    let dir = h.config().kubelet_dir;
    assert!(
        dir.join("vcore.sock").exists(),
        "a crash leaves the socket behind"
    );

    let d = h.daemon(false).await;
    assert_eq!(
        d.handle().restore_outcome(),
        Some(RestoreOutcome::Restored {
            records: 2,
            dropped: vec![]
        })
    );
    assert_eq!(summary(&d), before);
    let ledger = d.handle().shared().read_state(|st| st.ledger());
    assert_eq!(ledger.card(2).unwrap().free_cores, 60);
    assert_eq!(ledger.card(2).unwrap().free_blocks, 318 - 16);
    assert_eq!(
        ledger.free_mask() & 0b0110_0000,
        0,
        "cards 5 and 6 stay taken"
    );
    // The kubelet asks again (e.g. after a node reboot): same answers, nothing doubled.
    let again = h.kubelet.allocate(CORE, &share).await.unwrap();
    assert_eq!(again.mounts, share_resp.mounts);
    assert_eq!(again.devices, share_resp.devices);
    assert_eq!(again.envs, share_resp.envs);
    // The memory half is known by now, so its size joins the annotations.
    assert_eq!(
        again.annotations["tencent.com/vcuda-memory"],
        (16u64 * 256 * 1024 * 1024).to_string()
    );
    assert_eq!(
        h.kubelet.allocate(CORE, &whole).await.unwrap().mounts,
        whole_resp.mounts
    );
    assert_eq!(summary(&d), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_checkpoint_is_rebuilt_from_pod_resources_with_a_warning() {
    let _serial = SERIAL.lock().await;
    let h = Harness::new(example_node(H100)).await;
    let d = h.daemon(false).await;
    let a = ids("vcore", 1, 0..25);
    let a_mem = ids("vmem", 1, 0..4);
    let b = ids("vcore", 7, 0..100);
    let a_resp = h.kubelet.allocate(CORE, &a).await.unwrap();
    h.kubelet.allocate(MEMORY, &a_mem).await.unwrap();
    h.kubelet.allocate(CORE, &b).await.unwrap();
    assert!(d.handle().wait_persisted(STEP).await);
    d.kill();

    let cp = h.config().checkpoint_path();
    let mut bytes = std::fs::read(&cp).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 0x5a;
    bytes.truncate(n - 3);
    std::fs::write(&cp, &bytes).unwrap();
    h.podres.set(vec![
        Holding::new("alpha", "main", a.clone(), a_mem.clone()),
        Holding::new("beta", "main", b.clone(), vec![]),
    ]);

    let (d, logs) = start_logged(&h).await;
    let Some(RestoreOutcome::Rebuilt { warning }) = d.handle().restore_outcome() else {
        panic!("expected a rebuild");
    };
    assert!(
        warning.starts_with(&format!("checkpoint {} is corrupt:", cp.display())),
        "{warning}"
    );
    assert!(
        warning.ends_with(
            "ignoring it and rebuilding the allocations from the kubelet's pod-resources API"
        ),
        "{warning}"
    );
    assert!(logs.contains("WARN") && logs.contains(&warning), "{logs}");
    assert_eq!(
        summary(&d),
        [
            ("alpha".to_string(), vec![1], 25),
            ("beta".to_string(), vec![7], 100)
        ]
    );
    let snap = d.handle().snapshot();
    let alpha = snap
        .allocations
        .iter()
        .find(|x| x.pod_name == "alpha")
        .unwrap();
    assert_eq!(alpha.request_memory_mib, 4 * 256);
    // Record IDs are derived from the device IDs, so the limiter directory is the same one.
    let again = h.kubelet.allocate(CORE, &a).await.unwrap();
    assert_eq!(again.mounts, a_resp.mounts);
    assert_eq!(d.handle().snapshot().allocations.len(), 2);
    // And the rebuilt state is written back.
    assert!(d.handle().wait_persisted(STEP).await);
    assert!(gm_device_plugin::state::checkpoint::load(&cp)
        .unwrap()
        .is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_checkpoint_is_reported_and_rebuilt() {
    let _serial = SERIAL.lock().await;
    let h = Harness::new(example_node(H100)).await;
    h.podres.set(vec![Holding::new(
        "gamma",
        "c",
        ids("vcore", 4, 10..20),
        vec![],
    )]);
    let (d, logs) = start_logged(&h).await;
    let Some(RestoreOutcome::Rebuilt { warning }) = d.handle().restore_outcome() else {
        panic!("expected a rebuild");
    };
    assert!(warning.starts_with("no checkpoint at "), "{warning}");
    assert!(logs.contains(&warning), "{logs}");
    assert_eq!(summary(&d), [("gamma".to_string(), vec![4], 10)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allocations_missing_from_the_checkpoint_are_adopted_not_doubled() {
    let _serial = SERIAL.lock().await;
    let h = Harness::new(example_node(H100)).await;
    let d = h.daemon(false).await;
    let a = ids("vcore", 0, 0..10);
    h.kubelet.allocate(CORE, &a).await.unwrap();
    assert!(d.handle().wait_persisted(STEP).await);
    d.kill();
    // An allocation the checkpoint never saw (the write was lost in the crash).
    let b = ids("vcore", 0, 10..30);
    h.podres.set(vec![
        Holding::new("a", "c", a.clone(), vec![]),
        Holding::new("b", "c", b.clone(), vec![]),
    ]);
    let d = h.daemon(false).await;
    assert_eq!(
        summary(&d),
        [
            ("a".to_string(), vec![0], 10),
            ("b".to_string(), vec![0], 20)
        ]
    );
    let ledger = d.handle().shared().read_state(|st| st.ledger());
    assert_eq!(ledger.card(0).unwrap().free_cores, 70);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ended_allocations_are_released_and_their_limiter_directories_removed() {
    let _serial = SERIAL.lock().await;
    let h = Harness::new(example_node(H100)).await;
    let mut cfg = h.config();
    cfg.gc_interval = Duration::from_millis(100);
    cfg.gc_grace = Duration::from_millis(400);
    let d = h.daemon_with(cfg, true).await;
    h.kubelet.wait_registrations(2).await;
    // Kept: listed by pod-resources. Released: never listed.
    let kept = ids("vcore", 0, 0..10);
    let gone = ids("vcore", 1, 0..10);
    h.podres
        .set(vec![Holding::new("kept", "c", kept.clone(), vec![])]);
    h.kubelet.allocate(CORE, &kept).await.unwrap();
    let gone_resp = h.kubelet.allocate(CORE, &gone).await.unwrap();
    let gone_dir = std::path::PathBuf::from(&gone_resp.mounts[0].host_path);
    let gone_state = std::path::PathBuf::from(&gone_resp.mounts[3].host_path);
    assert_eq!(gone_resp.mounts[3].container_path, "/run/vcuda");
    wait_until("the limiter directory is written", || gone_dir.exists()).await;
    wait_until("the state directory is made", || gone_state.exists()).await;
    let t = Instant::now();
    while d.handle().snapshot().allocations.len() != 1 {
        assert!(
            t.elapsed() < STEP,
            "the unlisted allocation was not released"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        t.elapsed() >= Duration::from_millis(300),
        "released before the grace period"
    );
    wait_until("the limiter directory is removed", || !gone_dir.exists()).await;
    wait_until("the state directory is removed", || !gone_state.exists()).await;
    assert_eq!(summary(&d), [("kept".to_string(), vec![0], 10)]);
    // The API server says the kept pod was deleted: released at once.
    h.pods.insert(pod_info(
        "kept",
        serde_json::json!([gpu_container("c", 10, 1)]),
        serde_json::json!({}),
    ));
    d.handle().reconcile_now().await;
    assert_eq!(d.handle().snapshot().allocations[0].pod_uid, "uid-kept");
    h.pods.remove("default", "kept");
    // While the kubelet still lists it (the pod is terminating), it is kept.
    assert!(d.handle().reconcile_now().await.released.is_empty());
    h.podres.set(vec![]);
    let out = d.handle().reconcile_now().await;
    assert_eq!(out.released.len(), 1);
    assert_eq!(out.released[0].1, "its pod has ended or was deleted");
    assert!(d.handle().snapshot().allocations.is_empty());
}
