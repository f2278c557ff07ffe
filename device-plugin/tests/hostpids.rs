//! The daemon publishes the host pids of each share container's GPU processes in its limiter
//! state directory (`/run/vcuda/hostpids` in the container), for libvcuda.so's feedback loop.
//!
//! The node is `deploy/examples/nodes/t4-pcie-4.yaml` with scripted processes, played by the
//! simulated backend; a cgroup v2 / systemd / containerd fixture tree puts each pid in its
//! container; the pods come from an in-memory pod source with the scheduler's card assignment,
//! UIDs and container IDs; the allocations go through the kubelet protocol (gm-testkit's device
//! manager):
//!
//! | pod | container | request | card | pids on the card |
//! |---|---|---|---|---|
//! | infer | server | 30 vcuda-core, 4 vcuda-memory | 0 | 4101, 4102 |
//! | train | main | 100 vcuda-core (a whole card) | 1 | 4201 |
//! | (host) | nvidia-persistenced | — | 0 | 900 |
//!
//! A process "exits" by being left out of the backend's list (the wrapper below), so nothing
//! depends on the wall clock; the files are polled for with a bounded wait.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gm_backend::{
    BackendError, CardUsage, GpuBackend, HealthEvent, NodeDescription, ProbeResult, ProcessSample,
    SimulatedBackend, SystemClock,
};
use gm_device_plugin::config::DaemonConfig;
use gm_device_plugin::pods::{InMemoryPods, PodInfo, PodSource};
use gm_device_plugin::{Daemon, Dependencies};
use gm_limiter_core::hostpids::{decode, HOSTPIDS_FILE};
use gm_metrics::cgroup::{CgroupConfig, QosClass};
use gm_metrics::{CgroupDriver, CgroupVersion, MetricsConfig};
use gm_testkit::cgroup::{self, FixtureContainer, HostProcess, Runtime};
use gm_testkit::{
    example_node, DeviceManager, FakeKubelet, FakePodResources, PodRequest, CORE, MEMORY, STEP,
};

const NODE: &str = "sim-t4";
const CARD0: &str = "GPU-0fd630f1-f29d-4da9-953f-48f1a09f76b5";
const CARD1: &str = "GPU-0cb1e29c-658c-4a14-95e6-0af593bd04cf";

/// The simulated backend, with processes the test can end.
#[derive(Debug)]
struct Exiting {
    inner: SimulatedBackend,
    exited: Mutex<BTreeSet<u32>>,
}

impl Exiting {
    fn exit(&self, pid: u32) {
        self.exited.lock().unwrap().insert(pid);
    }
}

impl GpuBackend for Exiting {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
    fn inventory(&self) -> Result<gm_core::NodeInventory, BackendError> {
        self.inner.inventory()
    }
    fn wait_events(&self, timeout: Duration) -> Result<Vec<HealthEvent>, BackendError> {
        self.inner.wait_events(timeout)
    }
    fn probe(&self, uuid: &str) -> Result<ProbeResult, BackendError> {
        self.inner.probe(uuid)
    }
    fn processes(&self) -> Result<Vec<ProcessSample>, BackendError> {
        let exited = self.exited.lock().unwrap().clone();
        let mut list = self.inner.processes()?;
        list.retain(|p| !exited.contains(&p.pid));
        Ok(list)
    }
    fn card_usage(&self) -> Result<Vec<CardUsage>, BackendError> {
        self.inner.card_usage()
    }
}

fn backend() -> Arc<Exiting> {
    let path = example_node("t4-pcie-4.yaml");
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str(&format!(
        "\nprocesses:\n\
         \x20 - {{card: {CARD0}, pid: 900, usedMemoryMiB: 64}}\n\
         \x20 - {{card: {CARD0}, pid: 4101, usedMemoryMiB: 512, smPercent: 20}}\n\
         \x20 - {{card: {CARD0}, pid: 4102, usedMemoryMiB: 256, smPercent: 5}}\n\
         \x20 - {{card: {CARD1}, pid: 4201, usedMemoryMiB: 4096, smPercent: 80}}\n"
    ));
    let desc = NodeDescription::parse(&text, "t4-pcie-4.yaml with processes").unwrap();
    Arc::new(Exiting {
        inner: SimulatedBackend::new(desc, Arc::new(SystemClock::new())),
        exited: Mutex::new(BTreeSet::new()),
    })
}

struct Workload {
    pod: &'static str,
    container: &'static str,
    seed: u32,
    cores: u32,
    blocks: u32,
    card: u32,
    pids: &'static [u32],
}

const WORKLOADS: [Workload; 2] = [
    Workload {
        pod: "infer",
        container: "server",
        seed: 11,
        cores: 30,
        blocks: 4,
        card: 0,
        pids: &[4101, 4102],
    },
    Workload {
        pod: "train",
        container: "main",
        seed: 12,
        cores: 100,
        blocks: 0,
        card: 1,
        pids: &[4201],
    },
];

/// The pod as the API server shows it: bound with its card assignment; once running, with its
/// container's ID.
fn pod(w: &Workload, order: u64, running: bool) -> PodInfo {
    let mut limits = serde_json::Map::new();
    limits.insert(CORE.into(), w.cores.to_string().into());
    if w.blocks > 0 {
        limits.insert(MEMORY.into(), w.blocks.to_string().into());
    }
    let mut status = serde_json::json!({"phase": "Pending", "qosClass": "Guaranteed"});
    if running {
        status["phase"] = "Running".into();
        status["containerStatuses"] = serde_json::json!([{
            "name": w.container, "image": "cuda-app", "imageID": "", "ready": true,
            "restartCount": 0,
            "containerID": Runtime::Containerd.status_id(&cgroup::container_id(w.seed)),
        }]);
    }
    let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(serde_json::json!({
        "metadata": {
            "name": w.pod, "namespace": "ml", "uid": cgroup::pod_uid(w.seed),
            "creationTimestamp": "2024-01-01T00:00:00Z",
            "annotations": {
                "tencent.com/predicate-gpu-idx-0": w.card.to_string(),
                "tencent.com/predicate-node": NODE,
                "tencent.com/predicate-time": (1_700_000_000_000_000_000u64 + order).to_string(),
            },
        },
        "spec": {"nodeName": NODE, "containers": [
            {"name": w.container, "image": "cuda-app", "resources": {"limits": limits}}
        ]},
        "status": status,
    }))
    .unwrap();
    PodInfo::from_pod(
        &pod,
        &gm_core::ResourceNames::default(),
        &gm_core::annotations::Keys::default(),
    )
    .unwrap()
}

/// Poll `path` until it decodes to `want` (bounded by [`STEP`]).
async fn wait_for_pids(path: &Path, want: &[u32]) {
    let deadline = Instant::now() + STEP;
    let mut last = None;
    while Instant::now() < deadline {
        last = std::fs::read(path).ok().map(|b| decode(&b));
        if matches!(&last, Some(Ok(p)) if p == want) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!(
        "{} should list {want:?} within {STEP:?}; last read: {last:?}",
        path.display()
    );
}

fn record_dirs(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_share_containers_gpu_pids_are_published_for_its_limiter_and_a_whole_card_gets_none() {
    let root = tempfile::tempdir().unwrap();
    let mut config = DaemonConfig::under(root.path(), NODE);
    std::fs::write(&config.limiter_library, b"\x7fELF stand-in for libvcuda.so").unwrap();
    let kubelet = FakeKubelet::start(&config.kubelet_dir).await;
    let podres = FakePodResources::start(&config.pod_resources_socket).await;
    let fixture = cgroup::new_node(
        &root.path().join("host"),
        CgroupVersion::V2,
        CgroupDriver::Systemd,
    );
    fixture.add_host_process(&HostProcess {
        pid: 900,
        cgroup: "/system.slice/nvidia-persistenced.service".into(),
    });
    let pods = Arc::new(InMemoryPods::new());
    for (i, w) in WORKLOADS.iter().enumerate() {
        pods.insert(pod(w, i as u64, false));
        fixture.add_container(&FixtureContainer {
            pod_uid: cgroup::pod_uid(w.seed),
            container_id: cgroup::container_id(w.seed),
            runtime: Runtime::Containerd,
            qos: QosClass::Guaranteed,
            pids: w.pids.to_vec(),
            nested_pids: vec![],
        });
    }
    config.standalone = false;
    config.gc_interval = Duration::from_secs(3600);
    config.limiter_pids_interval = Duration::from_millis(50);
    config.metrics = Some(MetricsConfig {
        addr: ([127, 0, 0, 1], 0).into(),
        cgroup: CgroupConfig {
            cgroup_root: fixture.cgroup_root.clone(),
            proc_root: fixture.proc_root.clone(),
            version: None,
            driver: None,
        },
        version: "test".into(),
        cache_ttl: Duration::ZERO,
        sample_timeout: Duration::from_secs(2),
    });
    let state_dir = config.limiter_state_dir.clone();
    let backend = backend();
    let daemon = Daemon::start(
        config,
        Dependencies {
            backend: Arc::clone(&backend) as Arc<dyn GpuBackend>,
            pods: Some(Arc::clone(&pods) as Arc<dyn PodSource>),
            cluster: None,
        },
    )
    .await
    .unwrap();
    kubelet.wait_registrations(2).await;
    kubelet
        .wait_devices(CORE, STEP, |m| m.devices.len() == 400)
        .await;
    kubelet
        .wait_devices(MEMORY, STEP, |m| !m.devices.is_empty())
        .await;

    let mut dm = DeviceManager::new(&kubelet, &podres, gm_core::ResourceNames::default());
    let mut run_vcuda = Vec::new();
    for (i, w) in WORKLOADS.iter().enumerate() {
        let request = PodRequest::single("ml", w.pod, w.container, w.cores, w.blocks);
        let admitted = dm.admit(&request).await.unwrap();
        let c = admitted.container(w.container).unwrap();
        assert_eq!(c.cards(), [w.card], "{}", w.pod);
        run_vcuda.push(
            c.mounts()
                .iter()
                .find(|m| m.container_path == "/run/vcuda")
                .map(|m| PathBuf::from(&m.host_path)),
        );
        pods.insert(pod(w, i as u64, true));
    }
    let share_dir = run_vcuda[0].clone().expect("the share mounts /run/vcuda");
    assert_eq!(run_vcuda[1], None, "a whole card gets no limiter state");

    // The share's two processes, not the host's pid 900 on the same card.
    let file = share_dir.join(HOSTPIDS_FILE);
    wait_for_pids(&file, &[4101, 4102]).await;
    // The whole card's container has no state directory, so no file: the share's is the only
    // one (both were published by the same pass).
    assert_eq!(record_dirs(&state_dir), std::slice::from_ref(&share_dir));

    // A process that exits leaves the file; when the last one exits, the list is empty.
    backend.exit(4102);
    wait_for_pids(&file, &[4101]).await;
    backend.exit(4101);
    wait_for_pids(&file, &[]).await;

    daemon.shutdown().await;
}
