//! Serving the two plugins and registering them with the kubelet, again and again.
//!
//! For each plugin: serve on its socket first, then `Register` (version `v1beta1`, endpoint =
//! the socket's file name, resource name, options). A kubelet restart shows as our socket being
//! deleted and `kubelet.sock` being created again; the [`spawn_watcher`] task notices either
//! through inotify at once, or through its poll (a safety net, since inotify events can be
//! missed when the host path is remounted). The plugin then stops its old server (ending old
//! ListAndWatch streams), serves again and registers again.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use gm_core::devices::DeviceKind;
use gm_proto::deviceplugin::v1beta1 as dp;
use gm_proto::deviceplugin::v1beta1::device_plugin_server::DevicePluginServer;
use gm_proto::deviceplugin::v1beta1::registration_client::RegistrationClient;
use gm_proto::uds;
use notify::{RecursiveMode, Watcher};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tonic::transport::Server;

use crate::config::{CORE_SOCKET, MEMORY_SOCKET};
use crate::fsutil::FileId;
use crate::plugin::{options, PluginService};
use crate::shared::Shared;

/// First wait after a failed `Register`; doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Bound on one `Register` call (current kubelets dial back inside it, with a 10 s timeout).
const REGISTER_TIMEOUT: Duration = Duration::from_secs(15);

/// What the watcher saw in the kubelet's directory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DirState {
    /// Identity of `kubelet.sock`, if it exists.
    pub kubelet: Option<FileId>,
    /// Bumped on every look (event or poll), so plugins re-check their own sockets.
    pub tick: u64,
}

/// The socket file name of a plugin.
pub fn socket_name(kind: DeviceKind) -> &'static str {
    match kind {
        DeviceKind::Core => CORE_SOCKET,
        DeviceKind::Memory => MEMORY_SOCKET,
    }
}

/// Watch `dir` for `kubelet.sock` (re)creation and anything else happening there: inotify for
/// speed plus a poll every `poll`.
pub fn spawn_watcher(dir: PathBuf, poll: Duration) -> (watch::Receiver<DirState>, JoinHandle<()>) {
    let kubelet = dir.join(dp::KUBELET_SOCKET);
    let (tx, rx) = watch::channel(DirState {
        kubelet: FileId::of(&kubelet),
        tick: 0,
    });
    let task = tokio::spawn(async move {
        let (ev_tx, mut ev_rx) = mpsc::unbounded_channel::<()>();
        let watcher = notify::recommended_watcher(move |_res: notify::Result<notify::Event>| {
            let _ = ev_tx.send(());
        })
        .and_then(|mut w| w.watch(&dir, RecursiveMode::NonRecursive).map(|()| w));
        let _watcher = match watcher {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot watch the kubelet directory with inotify; relying on polling every {poll:?}");
                None
            }
        };
        loop {
            tokio::select! {
                ev = ev_rx.recv() => if ev.is_none() { tokio::time::sleep(poll).await },
                _ = tokio::time::sleep(poll) => {}
            }
            let id = FileId::of(&kubelet);
            tx.send_modify(|s| {
                s.kubelet = id;
                s.tick = s.tick.wrapping_add(1);
            });
        }
    });
    (rx, task)
}

async fn register(shared: &Shared, kind: DeviceKind) -> Result<(), String> {
    let path = shared.config.kubelet_dir.join(dp::KUBELET_SOCKET);
    let channel = uds::connect_with_timeout(&path, Duration::from_secs(3))
        .await
        .map_err(|e| e.to_string())?;
    let resource_name = match kind {
        DeviceKind::Core => shared.config.names.core(),
        DeviceKind::Memory => shared.config.names.memory(),
    };
    let request = dp::RegisterRequest {
        version: dp::VERSION.to_string(),
        endpoint: socket_name(kind).to_string(),
        resource_name: resource_name.to_string(),
        options: Some(options()),
    };
    let mut client = RegistrationClient::new(channel);
    match tokio::time::timeout(REGISTER_TIMEOUT, client.register(request)).await {
        Err(_) => Err(format!(
            "the kubelet did not answer within {REGISTER_TIMEOUT:?}"
        )),
        Ok(Err(status)) => Err(format!(
            "the kubelet refused: {:?}: {}",
            status.code(),
            status.message()
        )),
        Ok(Ok(_)) => Ok(()),
    }
}

/// Wait until `shutdown` becomes true.
async fn until_true(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

struct Serving {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
    socket: Option<FileId>,
}

impl Serving {
    async fn start(shared: &Arc<Shared>, kind: DeviceKind, path: &Path) -> Result<Self, String> {
        let listener = uds::bind(path).await.map_err(|e| e.to_string())?;
        let socket = FileId::of(path);
        let (stop, stop_rx) = watch::channel(false);
        let svc = PluginService::new(Arc::clone(shared), kind, stop_rx.clone());
        let task = tokio::spawn(async move {
            let served = Server::builder()
                .add_service(DevicePluginServer::new(svc))
                .serve_with_incoming_shutdown(uds::incoming(listener), until_true(stop_rx))
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "device plugin server failed");
            }
        });
        {
            let mut servers = shared.servers.lock().unwrap_or_else(|p| p.into_inner());
            servers.retain(|h| !h.is_finished());
            servers.push(task.abort_handle());
        }
        Ok(Self { stop, task, socket })
    }

    async fn stop(self) {
        let _ = self.stop.send(true);
        let mut task = self.task;
        if tokio::time::timeout(Duration::from_secs(2), &mut task)
            .await
            .is_err()
        {
            task.abort();
        }
    }
}

/// Serve one plugin and keep it registered until `shutdown`; removes its socket at the end.
pub async fn run_plugin(
    shared: Arc<Shared>,
    kind: DeviceKind,
    mut dir: watch::Receiver<DirState>,
    mut shutdown: watch::Receiver<bool>,
) {
    let path = shared.config.socket_path(socket_name(kind));
    let resource = match kind {
        DeviceKind::Core => shared.config.names.core().to_string(),
        DeviceKind::Memory => shared.config.names.memory().to_string(),
    };
    let kubelet_path = shared.config.kubelet_dir.join(dp::KUBELET_SOCKET);
    let mut waiting_logged = false;
    let mut last_socket: Option<FileId> = None;
    'serve: while !*shutdown.borrow() {
        let serving = match Serving::start(&shared, kind, &path).await {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(resource = %resource, error = %e, "cannot serve the device plugin; retrying in 1s");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue 'serve,
                    _ = shutdown.changed() => break 'serve,
                }
            }
        };
        last_socket = serving.socket;
        // Register, retrying with backoff; a new kubelet.sock cuts the wait short.
        let mut backoff = FIRST_BACKOFF;
        let registered_with = loop {
            if *shutdown.borrow() {
                serving.stop().await;
                break 'serve;
            }
            if FileId::of(&path) != serving.socket {
                tracing::info!(resource = %resource, socket = %path.display(), "our socket disappeared before registration; serving again");
                serving.stop().await;
                continue 'serve;
            }
            let seen = dir.borrow_and_update().kubelet;
            if seen.is_none() {
                if !waiting_logged {
                    waiting_logged = true;
                    if !shared.waiting_logged.swap(true, Ordering::SeqCst) {
                        tracing::info!(socket = %kubelet_path.display(), "waiting for the kubelet: its registration socket does not exist yet");
                    }
                }
                tokio::select! {
                    _ = dir.changed() => {}
                    _ = shutdown.changed() => {}
                }
                continue;
            }
            match register(&shared, kind).await {
                Ok(()) => break FileId::of(&kubelet_path),
                Err(e) => {
                    tracing::warn!(resource = %resource, error = %e, "registering with the kubelet failed; retrying in {backoff:?}");
                    let sleep = tokio::time::sleep(backoff);
                    tokio::pin!(sleep);
                    loop {
                        tokio::select! {
                            _ = &mut sleep => break,
                            r = dir.changed() => {
                                if r.is_err() || dir.borrow().kubelet != seen { break }
                            }
                            _ = shutdown.changed() => break,
                        }
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        };
        waiting_logged = false;
        shared.waiting_logged.store(false, Ordering::SeqCst);
        shared.set_registered(kind, true);
        tracing::info!(resource = %resource, endpoint = socket_name(kind), "registered with the kubelet");
        // Stay registered until the kubelet restarts or our socket disappears.
        loop {
            tokio::select! {
                r = dir.changed() => {
                    if r.is_err() { break }
                    let now = dir.borrow_and_update().kubelet;
                    if now != registered_with {
                        tracing::info!(resource = %resource, "kubelet.sock was recreated (kubelet restart); registering again");
                        break;
                    }
                    if FileId::of(&path) != serving.socket {
                        tracing::info!(resource = %resource, socket = %path.display(), "our socket was removed (kubelet restart); serving and registering again");
                        break;
                    }
                }
                _ = shutdown.changed() => if *shutdown.borrow() { break },
            }
        }
        shared.set_registered(kind, false);
        serving.stop().await;
    }
    // Remove our socket, but only if it is still the one we created.
    if last_socket.is_some() && FileId::of(&path) == last_socket {
        let _ = std::fs::remove_file(&path);
    }
}
