//! The two `DevicePlugin` gRPC services (vcuda-core and vcuda-memory).
//!
//! Every RPC follows the same discipline: snapshot the pod source, lock the state, decide,
//! unlock, and only then write files or queue API writes. `GetPreferredAllocation` never
//! fails; `Allocate` answers every container request in order; `PreStartContainer` asks the
//! kubelet's pod-resources API (outside the lock) who holds the devices.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use gm_core::devices::DeviceKind;
use gm_proto::deviceplugin::v1beta1 as dp;
use gm_proto::deviceplugin::v1beta1::device_plugin_server::DevicePlugin;
use tokio::sync::watch;
use tokio_stream::wrappers::WatchStream;
use tonic::{Request, Response, Status};

use crate::cluster::PatchJob;
use crate::podresources::holder;
use crate::pods::PodInfo;
use crate::response::{self, LimiterState, ResponseContext};
use crate::shared::Shared;
use crate::state::{Allocated, ErrorCode, Now, PodRef, Record, RequestError};

/// How long PreStartContainer waits for pod-resources (the kubelet allows 30 s in all).
const PRE_START_LOOKUP: Duration = Duration::from_secs(20);

/// Options both plugins advertise, identically in `Register` and `GetDevicePluginOptions`.
pub fn options() -> dp::DevicePluginOptions {
    dp::DevicePluginOptions {
        pre_start_required: true,
        get_preferred_allocation_available: true,
    }
}

/// One device plugin server instance. `stop` ends its ListAndWatch streams.
#[derive(Debug, Clone)]
pub struct PluginService {
    shared: Arc<Shared>,
    kind: DeviceKind,
    stop: watch::Receiver<bool>,
}

fn to_status(e: RequestError) -> Status {
    match e.code {
        ErrorCode::InvalidArgument => Status::invalid_argument(e.message),
        ErrorCode::FailedPrecondition => Status::failed_precondition(e.message),
    }
}

fn summary(ids: &[String]) -> String {
    match ids {
        [] => "no IDs".into(),
        [one] => one.clone(),
        [first, .., last] => format!("{} IDs {first} … {last}", ids.len()),
    }
}

impl PluginService {
    pub fn new(shared: Arc<Shared>, kind: DeviceKind, stop: watch::Receiver<bool>) -> Self {
        Self { shared, kind, stop }
    }

    fn resource(&self) -> &str {
        match self.kind {
            DeviceKind::Core => self.shared.config.names.core(),
            DeviceKind::Memory => self.shared.config.names.memory(),
        }
    }

    fn context<'a>(&'a self, inv: &'a gm_core::NodeInventory) -> ResponseContext<'a> {
        ResponseContext {
            inventory: inv,
            names: &self.shared.config.names,
            dev_root: &self.shared.config.dev_root,
            limiter_dir: &self.shared.config.limiter_dir,
        }
    }

    /// Allocate one container's IDs.
    pub fn allocate_one(&self, ids: &[String]) -> Result<dp::ContainerAllocateResponse, Status> {
        let pods = self.shared.pods_snapshot();
        self.allocate_with(ids, &pods)
    }

    /// The pods to decide with: the pod source's view, refreshed first when a request of one
    /// of `sizes` belongs to no pod it shows (the pod was bound a moment ago and our watch has
    /// not delivered it yet).
    async fn pods_for(&self, sizes: &[usize]) -> Vec<Arc<PodInfo>> {
        let pods = self.shared.pods_snapshot();
        let Some(source) = self.shared.pods.as_ref() else {
            return pods;
        };
        let kind = self.kind;
        let now = std::time::Instant::now();
        let miss = self.shared.with_state(|st| {
            sizes
                .iter()
                .any(|&size| st.misses_pod(kind, size, &pods, now))
        });
        if miss && source.refresh().await {
            return self.shared.pods_snapshot();
        }
        pods
    }

    fn allocate_with(
        &self,
        ids: &[String],
        pods: &[Arc<PodInfo>],
    ) -> Result<dp::ContainerAllocateResponse, Status> {
        let now = Now::current();
        let kind = self.kind;
        let decided = self.shared.with_state(|st| {
            let allocated = st.allocate(kind, ids, pods, now)?;
            let rec = allocated.record();
            let inv = st.inventory();
            let (resp, limiter) = if rec.shape.is_some() {
                (
                    response::core_response(rec, &self.context(inv)),
                    Some(response::limiter_config(rec, inv, LimiterState::Allocated)),
                )
            } else {
                (dp::ContainerAllocateResponse::default(), None)
            };
            Ok::<_, RequestError>((allocated, resp, limiter))
        });
        let (allocated, resp, limiter) = decided.map_err(|e| {
            tracing::warn!(resource = self.resource(), ids = %summary(ids), error = %e.message, "Allocate refused");
            to_status(e)
        })?;
        let (core_resp, limiter) = match (kind, limiter) {
            (DeviceKind::Core, l) => (resp, l),
            // The vcuda-memory response stays empty: the mounts and devices come with the
            // vcuda-core half (duplicates would break the container).
            (DeviceKind::Memory, l) => (dp::ContainerAllocateResponse::default(), l),
        };
        // The file is written off the request path; PreStartContainer waits for its own
        // (durable) rewrite before the container starts.
        if let Some(cfg) = limiter {
            match &allocated {
                Allocated::New(_) | Allocated::Joined(_) => self.shared.limiter.queue(cfg),
                Allocated::Existing(_) => self.shared.limiter.queue_if_missing(cfg),
            }
        }
        if let Allocated::New(r) | Allocated::Joined(r) = &allocated {
            tracing::info!(
                resource = self.resource(), record = %r.id, cards = ?r.cards(),
                pod = r.pod().map(ToString::to_string).unwrap_or_default(),
                "allocated"
            );
        }
        Ok(core_resp)
    }

    /// Confirm one container's IDs before it starts.
    pub async fn pre_start(&self, ids: &[String]) -> Result<(), Status> {
        let listed = match tokio::time::timeout(PRE_START_LOOKUP, self.shared.podresources.list())
            .await
        {
            Ok(Ok(l)) => Some(l),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "PreStartContainer cannot confirm the container's devices");
                None
            }
            Err(_) => {
                tracing::warn!("PreStartContainer: pod-resources did not answer in time");
                None
            }
        };
        let actual = listed
            .as_deref()
            .and_then(|l| holder(l, self.kind == DeviceKind::Core, ids))
            .map(|c| PodRef {
                namespace: c.namespace.clone(),
                name: c.pod.clone(),
                uid: String::new(),
                container: c.container.clone(),
            });
        if actual.is_none() && listed.is_some() {
            tracing::debug!(
                ids = %summary(ids),
                "pod-resources does not list these devices (a regular init container?); starting without confirmation"
            );
        }
        let actual_pod = actual.as_ref().and_then(|a| {
            self.shared
                .pods
                .as_ref()
                .and_then(|p| p.get(&a.namespace, &a.name))
        });
        let kind = self.kind;
        let now = Now::current();
        let pods = self.shared.pods.clone();
        let result = self.shared.with_state(|st| {
            if let Some(l) = &listed {
                // An allocation the state lost (checkpoint removed) is adopted here.
                st.adopt_all(l, pods.as_deref(), now);
            }
            let conf = st.confirm(kind, ids, actual.clone(), actual_pod.as_deref())?;
            let state = if conf.record.owner.is_some() {
                LimiterState::Confirmed
            } else {
                LimiterState::Allocated
            };
            let limiter = conf
                .record
                .shape
                .is_some()
                .then(|| response::limiter_config(&conf.record, st.inventory(), state));
            Ok::<_, RequestError>((conf, limiter))
        });
        let (conf, limiter) = result.map_err(|e| {
            tracing::warn!(resource = self.resource(), ids = %summary(ids), error = %e.message, "PreStartContainer refused");
            to_status(e)
        })?;
        if let Some(cfg) = limiter {
            if let Err(e) = self.shared.limiter.write(cfg).await {
                let dir =
                    response::limiter_host_dir(&self.shared.config.limiter_dir, &conf.record.id);
                return Err(Status::internal(format!(
                    "cannot write the limiter config in {}: {e}; check that --limiter-dir is writable and the disk is not full",
                    dir.display()
                )));
            }
        }
        if let Some((namespace, name, annotations)) = conf.patch {
            self.shared.queue_patch(PatchJob {
                namespace,
                name,
                annotations,
            });
        }
        log_confirmed(self.resource(), &conf.record);
        Ok(())
    }
}

fn log_confirmed(resource: &str, rec: &Record) {
    match &rec.owner {
        Some(o) => {
            tracing::info!(resource, record = %rec.id, pod = %o, "container start confirmed")
        }
        None => {
            tracing::info!(resource, record = %rec.id, "container start (owner not listed by pod-resources)")
        }
    }
}

type DeviceStream = Pin<Box<dyn Stream<Item = Result<dp::ListAndWatchResponse, Status>> + Send>>;

#[tonic::async_trait]
impl DevicePlugin for PluginService {
    async fn get_device_plugin_options(
        &self,
        _request: Request<dp::Empty>,
    ) -> Result<Response<dp::DevicePluginOptions>, Status> {
        Ok(Response::new(options()))
    }

    type ListAndWatchStream = DeviceStream;

    async fn list_and_watch(
        &self,
        _request: Request<dp::Empty>,
    ) -> Result<Response<DeviceStream>, Status> {
        let mut stop = self.stop.clone();
        let stopped = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        let resource = self.resource().to_string();
        let stream = WatchStream::new(self.shared.devices(self.kind))
            .map(move |list| {
                let unhealthy = list.devices.iter().filter(|d| d.health != dp::HEALTHY).count();
                tracing::debug!(resource = %resource, devices = list.devices.len(), unhealthy, "ListAndWatch update");
                Ok((*list).clone())
            })
            .take_until(stopped);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn get_preferred_allocation(
        &self,
        request: Request<dp::PreferredAllocationRequest>,
    ) -> Result<Response<dp::PreferredAllocationResponse>, Status> {
        let kind = self.kind;
        let request = request.into_inner();
        let sizes: Vec<usize> = request
            .container_requests
            .iter()
            .map(|c| usize::try_from(c.allocation_size).unwrap_or(0))
            .collect();
        let pods = self.pods_for(&sizes).await;
        let container_responses = request
            .container_requests
            .into_iter()
            .map(|c| {
                let size = usize::try_from(c.allocation_size).unwrap_or(0);
                let ids = self.shared.with_state(|st| {
                    st.prefer(
                        kind,
                        &c.available_device_i_ds,
                        &c.must_include_device_i_ds,
                        size,
                        &pods,
                        std::time::Instant::now(),
                    )
                });
                dp::ContainerPreferredAllocationResponse { device_i_ds: ids }
            })
            .collect();
        Ok(Response::new(dp::PreferredAllocationResponse {
            container_responses,
        }))
    }

    async fn allocate(
        &self,
        request: Request<dp::AllocateRequest>,
    ) -> Result<Response<dp::AllocateResponse>, Status> {
        let reqs = request.into_inner().container_requests;
        if reqs.is_empty() {
            return Err(Status::invalid_argument(
                "AllocateRequest has no container requests; the kubelet sends one per container",
            ));
        }
        let sizes: Vec<usize> = reqs.iter().map(|c| c.devices_ids.len()).collect();
        let pods = self.pods_for(&sizes).await;
        let mut container_responses = Vec::with_capacity(reqs.len());
        for c in reqs {
            container_responses.push(self.allocate_with(&c.devices_ids, &pods)?);
        }
        Ok(Response::new(dp::AllocateResponse {
            container_responses,
        }))
    }

    async fn pre_start_container(
        &self,
        request: Request<dp::PreStartContainerRequest>,
    ) -> Result<Response<dp::PreStartContainerResponse>, Status> {
        let ids = request.into_inner().devices_ids;
        self.pre_start(&ids).await?;
        Ok(Response::new(dp::PreStartContainerResponse {}))
    }
}
