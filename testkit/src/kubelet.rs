//! An in-process kubelet, as far as device plugins see it: a registration server on
//! `kubelet.sock` that dials every registered plugin back (`GetDevicePluginOptions`, then a
//! ListAndWatch stream it records), and client helpers for the calls the kubelet's device
//! manager makes (GetPreferredAllocation, Allocate, PreStartContainer).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use gm_proto::deviceplugin::v1beta1::{
    self as dp,
    device_plugin_client::DevicePluginClient,
    registration_server::{Registration, RegistrationServer},
};
use gm_proto::uds;
use tokio::sync::{broadcast, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_stream::StreamExt;
use tonic::transport::{Channel, Server};
use tonic::{Request, Response, Status};

use crate::error::TestkitError;
use crate::STEP;

/// Lock a mutex, ignoring poisoning (a panicking test thread must not hide what was recorded).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One registration the fake kubelet accepted, with what it learned by dialling back.
#[derive(Debug, Clone)]
pub struct Registered {
    /// The plugin's `Register` request.
    pub request: dp::RegisterRequest,
    /// The `GetDevicePluginOptions` answer.
    pub options: dp::DevicePluginOptions,
    /// When the registration completed.
    pub at: Instant,
}

/// Something the fake kubelet saw, in order (see [`FakeKubelet::events`]).
#[derive(Debug, Clone)]
pub enum KubeletEvent {
    /// A plugin registered and was dialled back.
    Registered(Registered),
    /// A registration was refused (the reason is what the plugin was told).
    Refused {
        /// The resource of the refused registration.
        resource: String,
        /// Why.
        reason: String,
    },
    /// A ListAndWatch message arrived.
    Devices {
        /// The plugin's resource.
        resource: String,
        /// The full device list.
        list: dp::ListAndWatchResponse,
    },
    /// A ListAndWatch stream ended (the plugin stopped or restarted).
    StreamEnded {
        /// The plugin's resource.
        resource: String,
        /// The stream's error, if it ended with one.
        error: Option<String>,
    },
}

#[derive(Debug)]
struct KubeletInner {
    registrations: Mutex<Vec<Registered>>,
    count: watch::Sender<usize>,
    /// Every ListAndWatch message per resource, in order.
    updates: Mutex<HashMap<String, Vec<dp::ListAndWatchResponse>>>,
    update_tick: watch::Sender<u64>,
    events: broadcast::Sender<KubeletEvent>,
    behaviour: Mutex<Behaviour>,
}

impl KubeletInner {
    fn emit(&self, e: KubeletEvent) {
        // No subscriber is fine: events are only for whoever listens.
        let _ = self.events.send(e);
    }
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
            let mut error = None;
            while let Some(next) = stream.next().await {
                let msg = match next {
                    Ok(m) => m,
                    Err(e) => {
                        error = Some(format!("{}: {}", e.code(), e.message()));
                        break;
                    }
                };
                lock(&watcher.updates)
                    .entry(resource.clone())
                    .or_default()
                    .push(msg.clone());
                watcher.update_tick.send_modify(|t| *t += 1);
                watcher.emit(KubeletEvent::Devices {
                    resource: resource.clone(),
                    list: msg,
                });
            }
            watcher.emit(KubeletEvent::StreamEnded { resource, error });
        });
        let registered = Registered {
            request: req,
            options,
            at: Instant::now(),
        };
        let n = {
            let mut regs = lock(&inner.registrations);
            regs.push(registered.clone());
            regs.len()
        };
        inner.count.send_replace(n);
        inner.emit(KubeletEvent::Registered(registered));
        Ok(())
    }

    fn refuse(&self, req: &dp::RegisterRequest, status: Status) -> Status {
        self.inner.emit(KubeletEvent::Refused {
            resource: req.resource_name.clone(),
            reason: status.message().to_string(),
        });
        status
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
            let mut b = lock(&self.inner.behaviour);
            if b.refused < b.refuse {
                b.refused += 1;
                drop(b);
                return Err(self.refuse(
                    &req,
                    Status::invalid_argument("test kubelet refuses this registration"),
                ));
            }
            b.async_dial
        };
        if req.version != dp::VERSION {
            let msg = format!(
                "unsupported API version {:?}; this kubelet speaks {}",
                req.version,
                dp::VERSION
            );
            return Err(self.refuse(&req, Status::invalid_argument(msg)));
        }
        if req.endpoint.contains('/') {
            return Err(self.refuse(
                &req,
                Status::invalid_argument("endpoint must be a file name"),
            ));
        }
        let (dir, inner) = (self.dir.clone(), Arc::clone(&self.inner));
        if async_dial {
            // Like an old kubelet: answer first, dial back afterwards.
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                let resource = req.resource_name.clone();
                if let Err(e) = Self::dial_back(dir, Arc::clone(&inner), req).await {
                    inner.emit(KubeletEvent::Refused {
                        resource,
                        reason: e.message().to_string(),
                    });
                }
            });
        } else {
            // Like a current kubelet: dial back inside Register.
            let resource = req.resource_name.clone();
            if let Err(e) = Self::dial_back(dir, Arc::clone(&inner), req).await {
                inner.emit(KubeletEvent::Refused {
                    resource,
                    reason: e.message().to_string(),
                });
                return Err(e);
            }
        }
        Ok(Response::new(dp::Empty {}))
    }
}

/// An in-process kubelet: a registration server on `kubelet.sock` that dials back, plus
/// device-plugin client helpers.
#[derive(Debug)]
pub struct FakeKubelet {
    /// The device-plugin directory (holds `kubelet.sock` and the plugins' sockets).
    pub dir: PathBuf,
    inner: Arc<KubeletInner>,
    count_rx: watch::Receiver<usize>,
    tick_rx: watch::Receiver<u64>,
    server: Option<(oneshot::Sender<()>, JoinHandle<()>)>,
}

impl FakeKubelet {
    /// Serve `kubelet.sock` in `dir` (created if needed). Panics if it cannot (for tests).
    pub async fn start(dir: &Path) -> Self {
        Self::try_start(dir)
            .await
            .unwrap_or_else(|e| panic!("fake kubelet: {e}"))
    }

    /// Serve `kubelet.sock` in `dir` (created if needed). Fails if the directory cannot be
    /// created, if a live process already serves `kubelet.sock` there (a stale socket file is
    /// replaced), or if the socket cannot be bound.
    pub async fn try_start(dir: &Path) -> Result<Self, TestkitError> {
        std::fs::create_dir_all(dir).map_err(|source| TestkitError::Directory {
            path: dir.to_path_buf(),
            source,
        })?;
        let socket = dir.join(dp::KUBELET_SOCKET);
        if tokio::net::UnixStream::connect(&socket).await.is_ok() {
            return Err(TestkitError::InUse { path: socket });
        }
        let (count, count_rx) = watch::channel(0usize);
        let (update_tick, tick_rx) = watch::channel(0u64);
        let (events, _) = broadcast::channel(1024);
        let inner = Arc::new(KubeletInner {
            registrations: Mutex::new(Vec::new()),
            count,
            updates: Mutex::new(HashMap::new()),
            update_tick,
            events,
            behaviour: Mutex::new(Behaviour::default()),
        });
        let mut k = Self {
            dir: dir.to_path_buf(),
            inner,
            count_rx,
            tick_rx,
            server: None,
        };
        k.serve().await?;
        Ok(k)
    }

    async fn serve(&mut self) -> Result<(), TestkitError> {
        let listener = uds::bind(self.dir.join(dp::KUBELET_SOCKET)).await?;
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
        Ok(())
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
        let entries = std::fs::read_dir(&self.dir)
            .unwrap_or_else(|e| panic!("fake kubelet: cannot list {}: {e}", self.dir.display()));
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_socket()).unwrap_or(false) {
                let _ = std::fs::remove_file(e.path());
            }
        }
        self.serve()
            .await
            .unwrap_or_else(|e| panic!("fake kubelet: cannot serve again: {e}"));
        Instant::now()
    }

    /// Answer `Register` at once and dial back afterwards, as kubelets before 1.26 did.
    pub fn dial_back_asynchronously(&self) {
        lock(&self.inner.behaviour).async_dial = true;
    }

    /// Refuse the next `n` registrations.
    pub fn refuse_next(&self, n: u32) {
        let mut b = lock(&self.inner.behaviour);
        b.refuse = n;
        b.refused = 0;
    }

    /// Registrations refused so far.
    pub fn refused(&self) -> u32 {
        lock(&self.inner.behaviour).refused
    }

    /// Stop serving and remove `kubelet.sock`.
    pub async fn stop(&mut self) {
        self.stop_server().await;
        let _ = std::fs::remove_file(self.dir.join(dp::KUBELET_SOCKET));
    }

    /// Every registration so far.
    pub fn registrations(&self) -> Vec<Registered> {
        lock(&self.inner.registrations).clone()
    }

    /// Everything the kubelet sees from now on, in order.
    pub fn events(&self) -> broadcast::Receiver<KubeletEvent> {
        self.inner.events.subscribe()
    }

    /// Wait until at least `n` registrations happened (panics after [`STEP`]).
    pub async fn wait_registrations(&self, n: usize) -> Vec<Registered> {
        let mut rx = self.count_rx.clone();
        let waited = tokio::time::timeout(STEP, rx.wait_for(|c| *c >= n)).await;
        if !matches!(waited, Ok(Ok(_))) {
            panic!(
                "expected {n} registrations within {STEP:?}, saw {}",
                self.registrations().len()
            );
        }
        self.registrations()
    }

    /// Every ListAndWatch message seen for `resource`.
    pub fn updates(&self, resource: &str) -> Vec<dp::ListAndWatchResponse> {
        lock(&self.inner.updates)
            .get(resource)
            .cloned()
            .unwrap_or_default()
    }

    /// The latest ListAndWatch message for `resource`, if any.
    pub fn latest(&self, resource: &str) -> Option<dp::ListAndWatchResponse> {
        lock(&self.inner.updates)
            .get(resource)
            .and_then(|v| v.last().cloned())
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
    pub async fn try_client(
        &self,
        resource: &str,
    ) -> Result<DevicePluginClient<Channel>, TestkitError> {
        let regs = self.registrations();
        let Some(reg) = regs
            .iter()
            .rev()
            .find(|r| r.request.resource_name == resource)
        else {
            let mut names: Vec<&str> = regs
                .iter()
                .map(|r| r.request.resource_name.as_str())
                .collect();
            names.sort_unstable();
            names.dedup();
            return Err(TestkitError::NotRegistered {
                resource: resource.to_string(),
                registered: if names.is_empty() {
                    "none".into()
                } else {
                    names.join(", ")
                },
            });
        };
        let ch = uds::connect(self.dir.join(&reg.request.endpoint)).await?;
        Ok(DevicePluginClient::new(ch))
    }

    /// A client for the plugin registered for `resource` (panics if there is none).
    pub async fn client(&self, resource: &str) -> DevicePluginClient<Channel> {
        self.try_client(resource)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    async fn status_client(&self, resource: &str) -> Result<DevicePluginClient<Channel>, Status> {
        self.try_client(resource)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))
    }

    /// GetPreferredAllocation for one container.
    pub async fn try_preferred(
        &self,
        resource: &str,
        available: &[String],
        must_include: &[String],
        size: usize,
    ) -> Result<Vec<String>, Status> {
        let size = i32::try_from(size)
            .map_err(|_| Status::invalid_argument(format!("allocation size {size} is too big")))?;
        let resp = self
            .status_client(resource)
            .await?
            .get_preferred_allocation(dp::PreferredAllocationRequest {
                container_requests: vec![dp::ContainerPreferredAllocationRequest {
                    available_device_i_ds: available.to_vec(),
                    must_include_device_i_ds: must_include.to_vec(),
                    allocation_size: size,
                }],
            })
            .await?
            .into_inner();
        match <[_; 1]>::try_from(resp.container_responses) {
            Ok([one]) => Ok(one.device_i_ds),
            Err(v) => Err(Status::internal(format!(
                "the plugin answered {} container responses to a request for 1",
                v.len()
            ))),
        }
    }

    /// GetPreferredAllocation for one container (panics if the call fails: it must never).
    pub async fn preferred(
        &self,
        resource: &str,
        available: &[String],
        must_include: &[String],
        size: usize,
    ) -> Vec<String> {
        self.try_preferred(resource, available, must_include, size)
            .await
            .unwrap_or_else(|e| panic!("GetPreferredAllocation must never fail: {e}"))
    }

    /// Allocate one container.
    pub async fn allocate(
        &self,
        resource: &str,
        ids: &[String],
    ) -> Result<dp::ContainerAllocateResponse, Status> {
        let resp = self
            .status_client(resource)
            .await?
            .allocate(dp::AllocateRequest {
                container_requests: vec![dp::ContainerAllocateRequest {
                    devices_ids: ids.to_vec(),
                }],
            })
            .await?
            .into_inner();
        match <[_; 1]>::try_from(resp.container_responses) {
            Ok([one]) => Ok(one),
            Err(v) => Err(Status::internal(format!(
                "the plugin answered {} container responses to a request for 1",
                v.len()
            ))),
        }
    }

    /// PreStartContainer for one container.
    pub async fn prestart(&self, resource: &str, ids: &[String]) -> Result<(), Status> {
        self.status_client(resource)
            .await?
            .pre_start_container(dp::PreStartContainerRequest {
                devices_ids: ids.to_vec(),
            })
            .await
            .map(|_| ())
    }
}

/// Device IDs `<prefix>-<card>-<k>` for k in `ks` (e.g. `ids("vcore", 0, 0..30)`).
pub fn ids(prefix: &str, card: u32, ks: std::ops::Range<u32>) -> Vec<String> {
    ks.map(|k| format!("{prefix}-{card}-{k}")).collect()
}

/// The IDs of a ListAndWatch message.
pub fn device_ids(m: &dp::ListAndWatchResponse) -> Vec<String> {
    m.devices.iter().map(|d| d.id.clone()).collect()
}
