//! Test support: an in-process fake kubelet (registration server + device-plugin client), a
//! scripted pod-resources server, a recording API server, and a harness that runs the daemon
//! in-process against them over real unix sockets.
//!
//! Shared by the integration tests and the benchmarks (`#[path]`-included), so some helpers are
//! unused in each.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gm_backend::{GpuBackend, SimulatedBackend};
use gm_device_plugin::cluster::{BoxFuture, Cluster, ClusterError};
use gm_device_plugin::config::DaemonConfig;
use gm_device_plugin::pods::{InMemoryPods, PodInfo, PodSource};
use gm_device_plugin::{Daemon, Dependencies};
use gm_proto::deviceplugin::v1beta1::{
    self as dp,
    device_plugin_client::DevicePluginClient,
    registration_server::{Registration, RegistrationServer},
};
use gm_proto::podresources::v1::{
    self as pr,
    pod_resources_lister_server::{PodResourcesLister, PodResourcesListerServer},
};
use gm_proto::uds;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio_stream::StreamExt;
use tonic::transport::{Channel, Server};
use tonic::{Request, Response, Status};

/// Upper bound for any single wait in a test.
pub const STEP: Duration = Duration::from_secs(10);

/// Path of an example node file shipped in deploy/examples/nodes.
pub fn example_node(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/examples/nodes")
        .join(name)
}

// ---------------------------------------------------------------------------------------------
// Fake kubelet

/// One registration the fake kubelet accepted, with what it learned by dialling back.
#[derive(Debug, Clone)]
pub struct Registered {
    pub request: dp::RegisterRequest,
    /// The `GetDevicePluginOptions` answer.
    pub options: dp::DevicePluginOptions,
    pub at: Instant,
}

#[derive(Debug, Default)]
struct KubeletInner {
    registrations: Mutex<Vec<Registered>>,
    count: Mutex<Option<watch::Sender<usize>>>,
    /// Every ListAndWatch message per resource, in order.
    updates: Mutex<HashMap<String, Vec<dp::ListAndWatchResponse>>>,
    update_tick: Mutex<Option<watch::Sender<u64>>>,
    behaviour: Mutex<Behaviour>,
}

struct KubeletService {
    dir: PathBuf,
    inner: Arc<KubeletInner>,
}

/// How the fake kubelet answers `Register`.
#[derive(Debug, Default)]
struct Behaviour {
    /// Dial back after `Register` returned, like kubelets before 1.26 did.
    async_dial: bool,
    /// Refuse this many registrations first.
    refuse: u32,
    refused: u32,
}

impl KubeletService {
    async fn dial_back(
        dir: PathBuf,
        inner: Arc<KubeletInner>,
        req: dp::RegisterRequest,
    ) -> Result<(), Status> {
        let channel = uds::connect(dir.join(&req.endpoint))
            .await
            .map_err(|e| Status::unavailable(format!("dial back failed: {e}")))?;
        let mut client = DevicePluginClient::new(channel);
        let options = client
            .get_device_plugin_options(dp::Empty {})
            .await?
            .into_inner();
        let mut stream = client
            .clone()
            .max_decoding_message_size(64 << 20)
            .list_and_watch(dp::Empty {})
            .await?
            .into_inner();
        let watcher = Arc::clone(&inner);
        let resource = req.resource_name.clone();
        tokio::spawn(async move {
            while let Some(Ok(msg)) = stream.next().await {
                watcher
                    .updates
                    .lock()
                    .unwrap()
                    .entry(resource.clone())
                    .or_default()
                    .push(msg);
                if let Some(tx) = watcher.update_tick.lock().unwrap().as_ref() {
                    tx.send_modify(|t| *t += 1);
                }
            }
        });
        let n = {
            let mut regs = inner.registrations.lock().unwrap();
            regs.push(Registered {
                request: req,
                options,
                at: Instant::now(),
            });
            regs.len()
        };
        if let Some(tx) = inner.count.lock().unwrap().as_ref() {
            tx.send_replace(n);
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl Registration for KubeletService {
    async fn register(
        &self,
        request: Request<dp::RegisterRequest>,
    ) -> Result<Response<dp::Empty>, Status> {
        let req = request.into_inner();
        let async_dial = {
            let mut b = self.inner.behaviour.lock().unwrap();
            if b.refused < b.refuse {
                b.refused += 1;
                return Err(Status::invalid_argument(
                    "test kubelet refuses this registration",
                ));
            }
            b.async_dial
        };
        if req.version != dp::VERSION {
            return Err(Status::invalid_argument(format!(
                "unsupported API version {:?}",
                req.version
            )));
        }
        if req.endpoint.contains('/') {
            return Err(Status::invalid_argument("endpoint must be a file name"));
        }
        let (dir, inner) = (self.dir.clone(), Arc::clone(&self.inner));
        if async_dial {
            // Like an old kubelet: answer first, dial back afterwards.
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                let _ = Self::dial_back(dir, inner, req).await;
            });
        } else {
            // Like a current kubelet: dial back inside Register.
            Self::dial_back(dir, inner, req).await?;
        }
        Ok(Response::new(dp::Empty {}))
    }
}

/// An in-process kubelet: a registration server on `kubelet.sock` that dials back, plus
/// device-plugin client helpers.
pub struct FakeKubelet {
    pub dir: PathBuf,
    inner: Arc<KubeletInner>,
    count_rx: watch::Receiver<usize>,
    tick_rx: watch::Receiver<u64>,
    server: Option<(oneshot::Sender<()>, JoinHandle<()>)>,
}

impl FakeKubelet {
    /// Serve `kubelet.sock` in `dir` (created if needed).
    pub async fn start(dir: &Path) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let (count_tx, count_rx) = watch::channel(0usize);
        let (tick_tx, tick_rx) = watch::channel(0u64);
        let inner = Arc::new(KubeletInner::default());
        *inner.count.lock().unwrap() = Some(count_tx);
        *inner.update_tick.lock().unwrap() = Some(tick_tx);
        let mut k = Self {
            dir: dir.to_path_buf(),
            inner,
            count_rx,
            tick_rx,
            server: None,
        };
        k.serve().await;
        k
    }

    async fn serve(&mut self) {
        let listener = uds::bind(self.dir.join(dp::KUBELET_SOCKET)).await.unwrap();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let svc = KubeletService {
            dir: self.dir.clone(),
            inner: Arc::clone(&self.inner),
        };
        let task = tokio::spawn(async move {
            let _ = Server::builder()
                .add_service(RegistrationServer::new(svc))
                .serve_with_incoming_shutdown(uds::incoming(listener), async {
                    let _ = stop_rx.await;
                })
                .await;
        });
        self.server = Some((stop_tx, task));
    }

    async fn stop_server(&mut self) {
        if let Some((stop, task)) = self.server.take() {
            let _ = stop.send(());
            let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
        }
    }

    /// Restart like a kubelet: stop serving, delete every socket in the directory (ours and the
    /// plugins'), then create `kubelet.sock` again. Returns when the new socket exists.
    pub async fn restart(&mut self) -> Instant {
        self.stop_server().await;
        use std::os::unix::fs::FileTypeExt;
        for e in std::fs::read_dir(&self.dir).unwrap().flatten() {
            if e.file_type().map(|t| t.is_socket()).unwrap_or(false) {
                let _ = std::fs::remove_file(e.path());
            }
        }
        self.serve().await;
        Instant::now()
    }

    /// Answer `Register` at once and dial back afterwards, as kubelets before 1.26 did.
    pub fn dial_back_asynchronously(&self) {
        self.inner.behaviour.lock().unwrap().async_dial = true;
    }

    /// Refuse the next `n` registrations.
    pub fn refuse_next(&self, n: u32) {
        let mut b = self.inner.behaviour.lock().unwrap();
        b.refuse = n;
        b.refused = 0;
    }

    /// Registrations refused so far.
    pub fn refused(&self) -> u32 {
        self.inner.behaviour.lock().unwrap().refused
    }

    /// Stop serving and remove `kubelet.sock`.
    pub async fn stop(&mut self) {
        self.stop_server().await;
        let _ = std::fs::remove_file(self.dir.join(dp::KUBELET_SOCKET));
    }

    /// Every registration so far.
    pub fn registrations(&self) -> Vec<Registered> {
        self.inner.registrations.lock().unwrap().clone()
    }

    /// Wait until at least `n` registrations happened.
    pub async fn wait_registrations(&self, n: usize) -> Vec<Registered> {
        let mut rx = self.count_rx.clone();
        tokio::time::timeout(STEP, rx.wait_for(|c| *c >= n))
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "expected {n} registrations within {STEP:?}, saw {}",
                    self.registrations().len()
                )
            })
            .unwrap();
        self.registrations()
    }

    /// Every ListAndWatch message seen for `resource`.
    pub fn updates(&self, resource: &str) -> Vec<dp::ListAndWatchResponse> {
        self.inner
            .updates
            .lock()
            .unwrap()
            .get(resource)
            .cloned()
            .unwrap_or_default()
    }

    /// Wait until a ListAndWatch message for `resource` satisfies `pred`; returns it.
    pub async fn wait_devices(
        &self,
        resource: &str,
        timeout: Duration,
        pred: impl Fn(&dp::ListAndWatchResponse) -> bool,
    ) -> dp::ListAndWatchResponse {
        self.wait_devices_from(resource, 0, timeout, pred).await.1
    }

    /// Like [`Self::wait_devices`], only looking at messages from position `from` on; returns
    /// the first match and its position.
    pub async fn wait_devices_from(
        &self,
        resource: &str,
        from: usize,
        timeout: Duration,
        pred: impl Fn(&dp::ListAndWatchResponse) -> bool,
    ) -> (usize, dp::ListAndWatchResponse) {
        let mut rx = self.tick_rx.clone();
        let deadline = Instant::now() + timeout;
        loop {
            let found = self
                .updates(resource)
                .into_iter()
                .enumerate()
                .skip(from)
                .find(|(_, m)| pred(m));
            if let Some(found) = found {
                return found;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                panic!("no matching ListAndWatch update for {resource} within {timeout:?}");
            }
            let _ = tokio::time::timeout(left, rx.changed()).await;
        }
    }

    /// A client for the plugin registered for `resource` (latest registration).
    pub async fn client(&self, resource: &str) -> DevicePluginClient<Channel> {
        let endpoint = self
            .registrations()
            .into_iter()
            .rev()
            .find(|r| r.request.resource_name == resource)
            .unwrap_or_else(|| panic!("{resource} is not registered"))
            .request
            .endpoint;
        let ch = uds::connect(self.dir.join(endpoint)).await.unwrap();
        DevicePluginClient::new(ch)
    }

    /// GetPreferredAllocation for one container.
    pub async fn preferred(
        &self,
        resource: &str,
        available: &[String],
        must_include: &[String],
        size: usize,
    ) -> Vec<String> {
        let resp = self
            .client(resource)
            .await
            .get_preferred_allocation(dp::PreferredAllocationRequest {
                container_requests: vec![dp::ContainerPreferredAllocationRequest {
                    available_device_i_ds: available.to_vec(),
                    must_include_device_i_ds: must_include.to_vec(),
                    allocation_size: size as i32,
                }],
            })
            .await
            .expect("GetPreferredAllocation must never fail")
            .into_inner();
        assert_eq!(resp.container_responses.len(), 1);
        resp.container_responses[0].device_i_ds.clone()
    }

    /// Allocate one container.
    pub async fn allocate(
        &self,
        resource: &str,
        ids: &[String],
    ) -> Result<dp::ContainerAllocateResponse, Status> {
        let mut resp = self
            .client(resource)
            .await
            .allocate(dp::AllocateRequest {
                container_requests: vec![dp::ContainerAllocateRequest {
                    devices_ids: ids.to_vec(),
                }],
            })
            .await?
            .into_inner();
        assert_eq!(resp.container_responses.len(), 1);
        Ok(resp.container_responses.remove(0))
    }

    /// PreStartContainer for one container.
    pub async fn prestart(&self, resource: &str, ids: &[String]) -> Result<(), Status> {
        self.client(resource)
            .await
            .pre_start_container(dp::PreStartContainerRequest {
                devices_ids: ids.to_vec(),
            })
            .await
            .map(|_| ())
    }
}

// ---------------------------------------------------------------------------------------------
// Fake pod-resources

/// One container as pod-resources reports it.
#[derive(Debug, Clone)]
pub struct Holding {
    pub namespace: String,
    pub pod: String,
    pub container: String,
    pub core: Vec<String>,
    pub memory: Vec<String>,
}

impl Holding {
    pub fn new(pod: &str, container: &str, core: Vec<String>, memory: Vec<String>) -> Self {
        Self {
            namespace: "default".into(),
            pod: pod.into(),
            container: container.into(),
            core,
            memory,
        }
    }
}

#[derive(Debug, Default)]
struct PodResourcesInner {
    holdings: Mutex<Vec<Holding>>,
    exhausted: AtomicU32,
    calls: AtomicU32,
}

struct PodResourcesService(Arc<PodResourcesInner>);

#[tonic::async_trait]
impl PodResourcesLister for PodResourcesService {
    async fn list(
        &self,
        _r: Request<pr::ListPodResourcesRequest>,
    ) -> Result<Response<pr::ListPodResourcesResponse>, Status> {
        self.0.calls.fetch_add(1, Ordering::SeqCst);
        if self
            .0
            .exhausted
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(Status::resource_exhausted("rejected by rate limit"));
        }
        let holdings = self.0.holdings.lock().unwrap().clone();
        let mut pods: BTreeMap<(String, String), Vec<pr::ContainerResources>> = BTreeMap::new();
        for h in holdings {
            let mut devices = Vec::new();
            if !h.core.is_empty() {
                devices.push(pr::ContainerDevices {
                    resource_name: "tencent.com/vcuda-core".into(),
                    device_ids: h.core,
                    topology: None,
                });
            }
            if !h.memory.is_empty() {
                devices.push(pr::ContainerDevices {
                    resource_name: "tencent.com/vcuda-memory".into(),
                    device_ids: h.memory,
                    topology: None,
                });
            }
            pods.entry((h.namespace, h.pod))
                .or_default()
                .push(pr::ContainerResources {
                    name: h.container,
                    devices,
                    ..Default::default()
                });
        }
        Ok(Response::new(pr::ListPodResourcesResponse {
            pod_resources: pods
                .into_iter()
                .map(|((namespace, name), containers)| pr::PodResources {
                    name,
                    namespace,
                    containers,
                    ..Default::default()
                })
                .collect(),
        }))
    }

    async fn get_allocatable_resources(
        &self,
        _r: Request<pr::AllocatableResourcesRequest>,
    ) -> Result<Response<pr::AllocatableResourcesResponse>, Status> {
        Err(Status::unimplemented("not needed"))
    }

    async fn get(
        &self,
        _r: Request<pr::GetPodResourcesRequest>,
    ) -> Result<Response<pr::GetPodResourcesResponse>, Status> {
        Err(Status::unimplemented("not needed"))
    }
}

/// A pod-resources server with scripted contents.
pub struct FakePodResources {
    inner: Arc<PodResourcesInner>,
    task: JoinHandle<()>,
}

impl FakePodResources {
    pub async fn start(path: &Path) -> Self {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let listener = uds::bind(path).await.unwrap();
        let inner = Arc::new(PodResourcesInner::default());
        let svc = PodResourcesService(Arc::clone(&inner));
        let task = tokio::spawn(async move {
            let _ = Server::builder()
                .add_service(PodResourcesListerServer::new(svc))
                .serve_with_incoming(uds::incoming(listener))
                .await;
        });
        Self { inner, task }
    }

    /// Replace what `List` reports.
    pub fn set(&self, holdings: Vec<Holding>) {
        *self.inner.holdings.lock().unwrap() = holdings;
    }

    /// Add one container.
    pub fn add(&self, h: Holding) {
        self.inner.holdings.lock().unwrap().push(h);
    }

    /// Answer the next `n` calls with RESOURCE_EXHAUSTED.
    pub fn exhaust_next(&self, n: u32) {
        self.inner.exhausted.store(n, Ordering::SeqCst);
    }

    /// Calls made so far.
    pub fn calls(&self) -> u32 {
        self.inner.calls.load(Ordering::SeqCst)
    }
}

impl Drop for FakePodResources {
    fn drop(&mut self) {
        self.task.abort();
    }
}

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

/// Device IDs `vcore-<card>-<k>` / `vmem-<card>-<k>` for k in `ks`.
pub fn ids(prefix: &str, card: u32, ks: std::ops::Range<u32>) -> Vec<String> {
    ks.map(|k| format!("{prefix}-{card}-{k}")).collect()
}

/// The IDs of a ListAndWatch message.
pub fn device_ids(m: &dp::ListAndWatchResponse) -> Vec<String> {
    m.devices.iter().map(|d| d.id.clone()).collect()
}

pub const CORE: &str = "tencent.com/vcuda-core";
pub const MEMORY: &str = "tencent.com/vcuda-memory";

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
