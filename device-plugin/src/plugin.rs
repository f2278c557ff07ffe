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
use gm_core::annotations::{decode_core_limit, LIMITER_DISABLED};
use gm_core::devices::{CoreShape, DeviceKind};
use gm_proto::deviceplugin::v1beta1 as dp;
use gm_proto::deviceplugin::v1beta1::device_plugin_server::DevicePlugin;
use tokio::sync::watch;
use tokio_stream::wrappers::WatchStream;
use tonic::{Request, Response, Status};

use crate::cluster::PatchJob;
use crate::library::InstalledLibrary;
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

/// What a pod's annotations ask of the limiter for one of its share containers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PodLimits {
    /// `vcuda-limiter: disabled`, allowed by `--limiter-allow-opt-out`.
    pub opted_out: bool,
    /// `vcuda-core-limit`, checked against the share (soft mode).
    pub soft: Option<u32>,
}

/// The limiter annotations of a share's pod (`None`: not known for certain, so the
/// defaults: enforced, hard mode). Logs what it ignores when `log`.
pub fn pod_limits(shared: &Shared, rec: &Record, pod: Option<&PodInfo>, log: bool) -> PodLimits {
    let mut out = PodLimits::default();
    let (Some(pod), Some(CoreShape::Share { .. })) = (pod, &rec.shape) else {
        return out;
    };
    let keys = &shared.keys;
    if pod.annotations.limiter_disabled {
        if shared.config.limiter_allow_opt_out {
            out.opted_out = true;
        } else if log {
            tracing::warn!(
                pod = %pod.key(),
                "the pod asks for {}={LIMITER_DISABLED}, but gpu-manager runs with --limiter-allow-opt-out=false: its memory cap and compute share are enforced",
                keys.limiter
            );
        }
    }
    if let Some(raw) = &pod.annotations.core_limit {
        match decode_core_limit(&keys.core_limit, raw, rec.cores()) {
            Ok(v) => out.soft = Some(v),
            Err(e) => {
                if log {
                    tracing::warn!(pod = %pod.key(), value = %raw, error = %e, "ignoring the soft-mode annotation: the share is limited in hard mode");
                }
            }
        }
    }
    out
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

    fn context<'a>(
        &'a self,
        inv: &'a gm_core::NodeInventory,
        library: Option<&'a InstalledLibrary>,
    ) -> ResponseContext<'a> {
        ResponseContext {
            inventory: inv,
            names: &self.shared.config.names,
            dev_root: &self.shared.config.dev_root,
            limiter_dir: &self.shared.config.limiter_dir,
            state_dir: &self.shared.config.limiter_state_dir,
            library,
        }
    }

    /// The limiter annotations of a share's pod; see [`pod_limits`].
    pub fn pod_limits(&self, rec: &Record, pod: Option<&PodInfo>, log: bool) -> PodLimits {
        pod_limits(&self.shared, rec, pod, log)
    }

    fn library_error(&self, problem: &str, rec: &Record) -> RequestError {
        let who = rec
            .pod()
            .map(|p| format!("pod {}/{} container {:?}", p.namespace, p.name, p.container))
            .unwrap_or_else(|| "this container".to_string());
        let card = rec.cards().first().copied().unwrap_or_default();
        let opt_out = if self.shared.config.limiter_allow_opt_out {
            format!(
                ", or annotate the pod {}={LIMITER_DISABLED} to run it without limits",
                self.shared.keys.limiter
            )
        } else {
            String::new()
        };
        RequestError::precondition(format!(
            "refusing to give {who} a share of card {card} ({} vcuda-core) without the in-container limiter: {problem}. Without libvcuda.so the share's memory cap and compute share would not be enforced. Put the library at --limiter-library (the image ships it at /usr/lib/gpu-manager/libvcuda.so) and restart gpu-manager{opt_out}",
            rec.cores()
        ))
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
        let library_missing = self.shared.library.is_err();
        let decided = self.shared.with_state(|st| {
            // Refusing a share for want of the library must leave no trace of it.
            let backup = (kind == DeviceKind::Core && library_missing).then(|| st.clone());
            let allocated = st.allocate(kind, ids, pods, now)?;
            let rec = allocated.record();
            if rec.shape.is_none() {
                return Ok((allocated, dp::ContainerAllocateResponse::default(), None));
            }
            let pod = st.certain_pod(rec, pods);
            let limits = self.pod_limits(rec, pod.as_deref(), kind == DeviceKind::Core);
            let share = matches!(rec.shape, Some(CoreShape::Share { .. }));
            let library = match &self.shared.library {
                Ok(lib) if share && !limits.opted_out => Some(lib),
                Err(problem) if share && !limits.opted_out && kind == DeviceKind::Core => {
                    let err = self.library_error(problem, rec);
                    if let Some(b) = backup {
                        *st = b;
                    }
                    return Err(err);
                }
                _ => None,
            };
            if share && limits.opted_out && kind == DeviceKind::Core {
                tracing::info!(
                    pod = pod.as_ref().map(|p| p.key()).unwrap_or_default(),
                    record = %rec.id,
                    "the pod opted out of the limiter ({}={LIMITER_DISABLED}): its share runs without a memory cap or compute share",
                    self.shared.keys.limiter
                );
            }
            let inv = st.inventory();
            let resp = response::core_response(rec, &self.context(inv, library));
            let limiter =
                response::limiter_config(rec, inv, LimiterState::Allocated, limits.soft);
            Ok::<_, RequestError>((allocated, resp, Some(limiter)))
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
        let snapshot = self.shared.pods_snapshot();
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
            let limiter = conf.record.shape.is_some().then(|| {
                let pod = st.certain_pod(&conf.record, &snapshot);
                let limits =
                    self.pod_limits(&conf.record, pod.as_deref(), kind == DeviceKind::Core);
                response::limiter_config(&conf.record, st.inventory(), state, limits.soft)
            });
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
                    "cannot write the limiter config in {}: {e}; check that --limiter-dir and --limiter-state-dir are writable and the disk is not full",
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
