//! A kubelet pod-resources server (`v1.PodResourcesLister`) whose `List` answer is scripted:
//! one [`Holding`] per container and the device IDs it holds.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use gm_proto::podresources::v1::{
    self as pr,
    pod_resources_lister_server::{PodResourcesLister, PodResourcesListerServer},
};
use gm_proto::uds;
use tokio::task::JoinHandle;
use tonic::transport::Server;
use tonic::{Request, Response, Status};

use crate::error::TestkitError;
use crate::{CORE, MEMORY};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One container as pod-resources reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holding {
    /// The pod's namespace.
    pub namespace: String,
    /// The pod's name.
    pub pod: String,
    /// The container's name.
    pub container: String,
    /// vcuda-core device IDs held.
    pub core: Vec<String>,
    /// vcuda-memory device IDs held.
    pub memory: Vec<String>,
}

impl Holding {
    /// A container of a pod in namespace `default`.
    pub fn new(pod: &str, container: &str, core: Vec<String>, memory: Vec<String>) -> Self {
        Self::in_namespace("default", pod, container, core, memory)
    }

    /// A container of a pod in `namespace`.
    pub fn in_namespace(
        namespace: &str,
        pod: &str,
        container: &str,
        core: Vec<String>,
        memory: Vec<String>,
    ) -> Self {
        Self {
            namespace: namespace.into(),
            pod: pod.into(),
            container: container.into(),
            core,
            memory,
        }
    }
}

#[derive(Debug)]
struct PodResourcesInner {
    core_resource: String,
    memory_resource: String,
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
        let holdings = lock(&self.0.holdings).clone();
        let mut pods: BTreeMap<(String, String), Vec<pr::ContainerResources>> = BTreeMap::new();
        for h in holdings {
            let mut devices = Vec::new();
            if !h.core.is_empty() {
                devices.push(pr::ContainerDevices {
                    resource_name: self.0.core_resource.clone(),
                    device_ids: h.core,
                    topology: None,
                });
            }
            if !h.memory.is_empty() {
                devices.push(pr::ContainerDevices {
                    resource_name: self.0.memory_resource.clone(),
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

/// A pod-resources server with scripted contents. Stops serving when dropped.
#[derive(Debug)]
pub struct FakePodResources {
    inner: Arc<PodResourcesInner>,
    task: JoinHandle<()>,
}

impl FakePodResources {
    /// Serve at `path` (its directory is created) with the default resource names. Panics if
    /// it cannot (for tests).
    pub async fn start(path: &Path) -> Self {
        Self::try_start(path, CORE, MEMORY)
            .await
            .unwrap_or_else(|e| panic!("fake pod-resources: {e}"))
    }

    /// Serve at `path` (its directory is created), listing vcuda-core and vcuda-memory IDs
    /// under the given resource names. Fails if the directory cannot be created, a live
    /// process serves `path` already (a stale socket file is replaced), or it cannot bind.
    pub async fn try_start(
        path: &Path,
        core_resource: &str,
        memory_resource: &str,
    ) -> Result<Self, TestkitError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|source| TestkitError::Directory {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            return Err(TestkitError::InUse {
                path: path.to_path_buf(),
            });
        }
        let listener = uds::bind(path).await?;
        let inner = Arc::new(PodResourcesInner {
            core_resource: core_resource.to_string(),
            memory_resource: memory_resource.to_string(),
            holdings: Mutex::new(Vec::new()),
            exhausted: AtomicU32::new(0),
            calls: AtomicU32::new(0),
        });
        let svc = PodResourcesService(Arc::clone(&inner));
        let task = tokio::spawn(async move {
            let _ = Server::builder()
                .add_service(PodResourcesListerServer::new(svc))
                .serve_with_incoming(uds::incoming(listener))
                .await;
        });
        Ok(Self { inner, task })
    }

    /// Replace what `List` reports.
    pub fn set(&self, holdings: Vec<Holding>) {
        *lock(&self.inner.holdings) = holdings;
    }

    /// Add one container.
    pub fn add(&self, h: Holding) {
        lock(&self.inner.holdings).push(h);
    }

    /// Add a container, or replace the one with the same namespace, pod and container name.
    pub fn upsert(&self, h: Holding) {
        let mut all = lock(&self.inner.holdings);
        match all
            .iter_mut()
            .find(|x| x.namespace == h.namespace && x.pod == h.pod && x.container == h.container)
        {
            Some(x) => *x = h,
            None => all.push(h),
        }
    }

    /// Remove every container of a pod.
    pub fn remove_pod(&self, namespace: &str, pod: &str) {
        lock(&self.inner.holdings).retain(|h| !(h.namespace == namespace && h.pod == pod));
    }

    /// What `List` reports now.
    pub fn holdings(&self) -> Vec<Holding> {
        lock(&self.inner.holdings).clone()
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
