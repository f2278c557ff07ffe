//! Test support: the daemon-specific pieces (a recording API server, pod builders and a
//! harness that runs the daemon in-process over real unix sockets) on top of gm-testkit's
//! fake kubelet and pod-resources server, which are re-exported here.
//!
//! Shared by the integration tests and the benchmarks (`#[path]`-included), so some helpers are
//! unused in each.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gm_backend::{GpuBackend, SimulatedBackend};
use gm_device_plugin::cluster::{BoxFuture, Cluster, ClusterError};
use gm_device_plugin::config::DaemonConfig;
use gm_device_plugin::pods::{InMemoryPods, PodInfo, PodSource};
use gm_device_plugin::{Daemon, Dependencies};
use tokio::sync::watch;

// Each test uses some of these.
#[allow(unused_imports)]
pub use gm_testkit::kubelet::{device_ids, ids};
#[allow(unused_imports)]
pub use gm_testkit::{
    example_node, FakeKubelet, FakePodResources, Holding, Registered, CORE, MEMORY, STEP,
};

// ---------------------------------------------------------------------------------------------
// Recording API server

/// Labels or annotations.
pub type Map = BTreeMap<String, String>;
/// A recorded pod patch: namespace, name, annotations.
pub type PodPatch = (String, String, Map);
/// A recorded node patch: name, labels, annotations.
pub type NodePatch = (String, Map, Map);

/// Records the daemon's API writes.
#[derive(Debug, Default)]
pub struct RecordingCluster {
    pub pod_patches: Mutex<Vec<PodPatch>>,
    pub node_patches: Mutex<Vec<NodePatch>>,
    tick: Mutex<Option<watch::Sender<u64>>>,
    rx: Mutex<Option<watch::Receiver<u64>>>,
}

impl RecordingCluster {
    pub fn new() -> Arc<Self> {
        let (tx, rx) = watch::channel(0);
        let c = Self::default();
        *c.tick.lock().unwrap() = Some(tx);
        *c.rx.lock().unwrap() = Some(rx);
        Arc::new(c)
    }

    fn bump(&self) {
        if let Some(tx) = self.tick.lock().unwrap().as_ref() {
            tx.send_modify(|t| *t += 1);
        }
    }

    /// Wait until `pred` holds for the recorded writes.
    pub async fn wait_for(&self, what: &str, pred: impl Fn(&Self) -> bool) {
        let mut rx = self.rx.lock().unwrap().clone().unwrap();
        let deadline = Instant::now() + STEP;
        while !pred(self) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                panic!("{what}: not seen within {STEP:?}");
            }
            let _ = tokio::time::timeout(left, rx.changed()).await;
        }
    }
}

impl Cluster for RecordingCluster {
    fn patch_pod_annotations<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
        annotations: &'a BTreeMap<String, String>,
    ) -> BoxFuture<'a, Result<(), ClusterError>> {
        Box::pin(async move {
            self.pod_patches.lock().unwrap().push((
                namespace.to_string(),
                name.to_string(),
                annotations.clone(),
            ));
            self.bump();
            Ok(())
        })
    }

    fn patch_node<'a>(
        &'a self,
        name: &'a str,
        labels: &'a BTreeMap<String, String>,
        annotations: &'a BTreeMap<String, String>,
    ) -> BoxFuture<'a, Result<(), ClusterError>> {
        Box::pin(async move {
            self.node_patches.lock().unwrap().push((
                name.to_string(),
                labels.clone(),
                annotations.clone(),
            ));
            self.bump();
            Ok(())
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Pods

/// A pending pod of `node-a` built from JSON containers and annotations.
pub fn pod_info(
    name: &str,
    containers: serde_json::Value,
    annotations: serde_json::Value,
) -> PodInfo {
    let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "namespace": "default", "uid": format!("uid-{name}"),
                     "creationTimestamp": "2024-01-01T00:00:00Z", "annotations": annotations},
        "spec": {"nodeName": "node-a", "containers": containers},
        "status": {"phase": "Pending"}
    }))
    .unwrap();
    PodInfo::from_pod(
        &pod,
        &gm_core::ResourceNames::default(),
        &gm_core::annotations::Keys::default(),
    )
    .unwrap()
}

/// One container requesting `cores` vcuda-core and `blocks` vcuda-memory.
pub fn gpu_container(name: &str, cores: u32, blocks: u32) -> serde_json::Value {
    let mut limits = serde_json::Map::new();
    limits.insert("tencent.com/vcuda-core".into(), cores.to_string().into());
    if blocks > 0 {
        limits.insert("tencent.com/vcuda-memory".into(), blocks.to_string().into());
    }
    serde_json::json!({"name": name, "resources": {"limits": limits}})
}

// ---------------------------------------------------------------------------------------------
// Harness

/// A stand-in for libvcuda.so (an ELF header is all the daemon checks before installing it).
pub const DUMMY_LIBRARY: &[u8] = b"\x7fELF stand-in for libvcuda.so (tests)";

/// Write [`DUMMY_LIBRARY`] at `path`.
pub fn write_dummy_library(path: &std::path::Path) {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).unwrap();
    }
    std::fs::write(path, DUMMY_LIBRARY).unwrap();
}

/// A temp directory with a fake kubelet and pod-resources server; starts daemons on it.
pub struct Harness {
    pub root: tempfile::TempDir,
    pub kubelet: FakeKubelet,
    pub podres: FakePodResources,
    pub pods: Arc<InMemoryPods>,
    pub cluster: Arc<RecordingCluster>,
    pub node_file: PathBuf,
}

impl Harness {
    /// Fake kubelet and pod-resources up, no daemon yet.
    pub async fn new(node_file: PathBuf) -> Self {
        let root = tempfile::tempdir().unwrap();
        let cfg = DaemonConfig::under(root.path(), "node-a");
        std::fs::create_dir_all(&cfg.dev_root).unwrap();
        write_dummy_library(&cfg.limiter_library);
        let kubelet = FakeKubelet::start(&cfg.kubelet_dir).await;
        let podres = FakePodResources::start(&cfg.pod_resources_socket).await;
        Self {
            root,
            kubelet,
            podres,
            pods: Arc::new(InMemoryPods::new()),
            cluster: RecordingCluster::new(),
            node_file,
        }
    }

    /// The daemon configuration for this harness: fast polls, no periodic GC surprises.
    pub fn config(&self) -> DaemonConfig {
        let mut c = DaemonConfig::under(self.root.path(), "node-a");
        c.watch_poll_interval = Duration::from_millis(250);
        c.gc_interval = Duration::from_secs(3600);
        c.health_reprobe_interval = Duration::from_millis(200);
        c
    }

    /// A backend playing the harness' node file from now.
    pub fn backend(&self) -> Arc<dyn GpuBackend> {
        Arc::new(SimulatedBackend::from_file(&self.node_file).unwrap())
    }

    /// Start a daemon. With `api`, it gets the in-memory pods and the recording cluster.
    pub async fn daemon_with(&self, config: DaemonConfig, api: bool) -> Daemon {
        let deps = Dependencies {
            backend: self.backend(),
            pods: api.then(|| Arc::clone(&self.pods) as Arc<dyn PodSource>),
            cluster: api.then(|| Arc::clone(&self.cluster) as Arc<dyn Cluster>),
        };
        let mut config = config;
        config.standalone = !api;
        Daemon::start(config, deps).await.unwrap()
    }

    /// Start a daemon with the default harness config and wait for both registrations.
    pub async fn daemon(&self, api: bool) -> Daemon {
        let before = self.kubelet.registrations().len();
        let d = self.daemon_with(self.config(), api).await;
        self.kubelet.wait_registrations(before + 2).await;
        d
    }
}
