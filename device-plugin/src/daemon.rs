//! Start-up order, the supervised tasks and shutdown.
//!
//! [`Daemon::start`]:
//! 1. checks the directories and reads the inventory from the GPU backend;
//! 2. restores the state from the checkpoint (a missing or corrupt one is reported with a
//!    warning and rebuilt from pod-resources);
//! 3. reconciles once with pod-resources (bounded wait), so a rebuilt state is complete before
//!    the kubelet can call;
//! 4. starts the checkpoint writer, health monitor, re-probe, the `hostpids` publisher,
//!    reconciliation, the API writers (with an API server), the health HTTP server, the
//!    directory watcher and the two plugins (each serves, then registers).
//!
//! [`Daemon::shutdown`] stops the plugins (their sockets are removed), writes a final
//! checkpoint and stops everything else. Dropping a [`Daemon`] (or [`Daemon::kill`]) aborts
//! everything without cleanup, like a crash.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use gm_backend::GpuBackend;
use gm_core::devices::DeviceKind;
use gm_metrics::{NodeSnapshot, SnapshotSource};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::cluster::{spawn_patch_worker, Cluster, RetryPolicy};
use crate::config::DaemonConfig;
use crate::error::DaemonError;
use crate::library::{self, InstalledLibrary};
use crate::limiter::LimiterWriter;
use crate::pods::PodSource;
use crate::response::LimiterDirs;
use crate::shared::{RestoreOutcome, Shared};
use crate::state::checkpoint::{self, Data, PersistedRecord};
use crate::state::{State, StateConfig};
use crate::{gc, health, hostpids, publisher, registration};

/// What the daemon talks to besides the kubelet.
#[derive(Debug, Clone)]
pub struct Dependencies {
    /// The GPUs.
    pub backend: Arc<dyn GpuBackend>,
    /// The pods of this node (`None` in standalone mode).
    pub pods: Option<Arc<dyn PodSource>>,
    /// Writes to the API server (`None` in standalone mode).
    pub cluster: Option<Arc<dyn Cluster>>,
}

/// A cheap, clonable view of a running daemon (for tests, benches and embedding).
#[derive(Debug, Clone)]
pub struct DaemonHandle {
    shared: Arc<Shared>,
    metrics_addr: Option<SocketAddr>,
}

impl DaemonHandle {
    /// The daemon's state as the metrics server sees it.
    pub fn snapshot(&self) -> NodeSnapshot {
        self.shared.snapshot()
    }

    /// Both plugins are registered with the kubelet.
    pub fn ready(&self) -> bool {
        self.shared.ready()
    }

    /// How the state was restored at start.
    pub fn restore_outcome(&self) -> Option<RestoreOutcome> {
        self.shared.restore_outcome()
    }

    /// Where `/healthz` and `/readyz` are served, if anywhere.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The shared core (state, pod source, ...).
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Wait until the checkpoint holds every change made so far (or `timeout` passes).
    /// Returns whether it does.
    pub async fn wait_persisted(&self, timeout: Duration) -> bool {
        let target = self.shared.read_state(|st| st.generation());
        let mut rx = self.shared.persisted();
        tokio::time::timeout(timeout, rx.wait_for(|g| *g >= target))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Run one reconciliation pass now (as the periodic task does).
    pub async fn reconcile_now(&self) -> crate::state::Reconciled {
        gc::reconcile_once(&self.shared).await.0
    }
}

/// The running daemon.
#[derive(Debug)]
pub struct Daemon {
    handle: DaemonHandle,
    shutdown: watch::Sender<bool>,
    plugins: Vec<JoinHandle<()>>,
    tasks: Vec<JoinHandle<()>>,
    health_stop: Arc<AtomicBool>,
    health_thread: Option<std::thread::JoinHandle<()>>,
}

fn ensure_dir(path: &std::path::Path) -> Result<(), DaemonError> {
    std::fs::create_dir_all(path).map_err(|source| DaemonError::Directory {
        path: path.to_path_buf(),
        source,
    })
}

/// Install `--limiter-library` into `--limiter-install-dir`. A failure does not stop the
/// daemon (whole cards need no limiter) but is logged, and share containers are refused.
async fn install_library(config: &DaemonConfig) -> Result<InstalledLibrary, String> {
    let source = config.limiter_library.clone();
    let dir = config.limiter_install_dir.clone();
    let installed = tokio::task::spawn_blocking(move || {
        library::install(&source, &dir, env!("CARGO_PKG_VERSION"))
    })
    .await
    .map_err(|e| format!("installing the limiter library failed: {e}"))
    .and_then(|r| r.map_err(|e| e.to_string()));
    match &installed {
        Ok(lib) => {
            let older = library::other_versions(&config.limiter_install_dir, &lib.path);
            tracing::info!(
                library = %lib.path.display(),
                preload = %lib.preload.display(),
                sha256 = %lib.sha256,
                new = lib.written,
                older_versions_kept = older.len(),
                "limiter library installed"
            );
        }
        Err(e) => tracing::error!(
            "{e}; share containers (vcuda-core 1-99) will be refused at Allocate until gpu-manager is restarted with the library in place, because they would run without their memory cap and compute share"
        ),
    }
    installed
}

fn restore(config: &DaemonConfig, state: &mut State) -> RestoreOutcome {
    let path = config.checkpoint_path();
    let rebuild = "rebuilding the allocations from the kubelet's pod-resources API";
    match checkpoint::load(&path) {
        Ok(Some(data)) => {
            let mut dropped = Vec::new();
            let mut records = Vec::new();
            for p in data.records {
                match p.into_record() {
                    Ok(r) => records.push(r),
                    Err(e) => dropped.push(format!("dropped checkpoint record: {e}")),
                }
            }
            let count = records.len();
            dropped.extend(state.restore(records));
            for w in &dropped {
                tracing::warn!("{w}");
            }
            let records = count.saturating_sub(dropped.len());
            tracing::info!(checkpoint = %path.display(), records, "allocations restored from the checkpoint");
            RestoreOutcome::Restored { records, dropped }
        }
        Ok(None) => {
            let warning = format!(
                "no checkpoint at {} (first start, or it was removed); {rebuild}",
                path.display()
            );
            tracing::warn!("{warning}");
            RestoreOutcome::Rebuilt { warning }
        }
        Err(e) => {
            let warning = format!("{e}; ignoring it and {rebuild}");
            tracing::warn!("{warning}");
            RestoreOutcome::Rebuilt { warning }
        }
    }
}

fn write_checkpoint(shared: &Shared) -> (u64, Result<(), checkpoint::CheckpointError>) {
    let (generation, data) = shared.read_state(|st| {
        (
            st.generation(),
            Data {
                node: shared.config.node_name.clone(),
                records: st
                    .records()
                    .values()
                    .map(PersistedRecord::from_record)
                    .collect(),
            },
        )
    });
    let bytes = checkpoint::encode(data);
    (
        generation,
        checkpoint::store(&shared.config.checkpoint_path(), &bytes),
    )
}

/// How long the checkpoint writer waits after a change for more changes to batch.
const CHECKPOINT_DEBOUNCE: Duration = Duration::from_millis(50);

fn spawn_checkpoint_writer(shared: Arc<Shared>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut requests = shared.persist_requests();
        let mut failing = false;
        loop {
            let wanted = *requests.borrow_and_update();
            if *shared.persisted.borrow() < wanted || wanted == 0 {
                let s = Arc::clone(&shared);
                match tokio::task::spawn_blocking(move || write_checkpoint(&s)).await {
                    Ok((generation, Ok(()))) => {
                        failing = false;
                        shared.persisted.send_replace(generation);
                    }
                    Ok((_, Err(e))) => {
                        if !failing {
                            tracing::error!(error = %e, "cannot write the checkpoint; allocations would be rebuilt from pod-resources after a restart");
                        }
                        failing = true;
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                    Err(e) => tracing::error!(error = %e, "checkpoint writer failed"),
                }
            }
            if requests.changed().await.is_err() {
                return;
            }
            // Batch a burst of changes into one write. Nothing is lost if the daemon dies in
            // between: allocations the checkpoint misses are adopted from pod-resources at start.
            tokio::time::sleep(CHECKPOINT_DEBOUNCE).await;
        }
    })
}

impl Daemon {
    /// Start the daemon on the current tokio runtime.
    pub async fn start(config: DaemonConfig, deps: Dependencies) -> Result<Self, DaemonError> {
        if config.checkpoint_dir == config.kubelet_dir {
            return Err(DaemonError::CheckpointInKubeletDir {
                path: config.checkpoint_dir.clone(),
            });
        }
        ensure_dir(&config.kubelet_dir)?;
        ensure_dir(&config.checkpoint_dir)?;
        ensure_dir(&config.limiter_dir)?;
        ensure_dir(&config.limiter_state_dir)?;
        let library = install_library(&config).await;

        let backend = Arc::clone(&deps.backend);
        let inventory = tokio::task::spawn_blocking(move || backend.inventory())
            .await
            .map_err(|e| DaemonError::Inventory(format!("reading the inventory failed: {e}")))??;
        if inventory.is_empty() {
            return Err(DaemonError::NoCards {
                backend: deps.backend.kind().to_string(),
            });
        }
        let standalone = config.standalone;
        let state_config = StateConfig {
            node_name: config.node_name.clone(),
            keys: gm_core::annotations::Keys::new(&config.names),
            policy: config.policy,
            pending_ttl: config.pending_ttl,
            gc_grace: config.gc_grace,
            patch_pods: !standalone && deps.cluster.is_some(),
        };
        let mut state = State::new(state_config, inventory);
        let outcome = restore(&config, &mut state);

        let (shutdown, shutdown_rx) = watch::channel(false);
        let mut tasks = Vec::new();
        let patches = match (&deps.cluster, standalone) {
            (Some(cluster), false) => {
                let (tx, task) = spawn_patch_worker(Arc::clone(cluster), RetryPolicy::default());
                tasks.push(task);
                Some(tx)
            }
            _ => None,
        };
        let pods = if standalone { None } else { deps.pods.clone() };
        let limiter = LimiterWriter::spawn(LimiterDirs::new(
            config.limiter_dir.clone(),
            config.limiter_state_dir.clone(),
        ))
        .map_err(|e| {
            DaemonError::Inventory(format!("cannot start the limiter writer thread: {e}"))
        })?;
        let shared = Arc::new(Shared::new(
            config.clone(),
            Arc::clone(&deps.backend),
            pods,
            patches,
            limiter,
            library,
            state,
        ));
        *shared.restore.lock().unwrap_or_else(|p| p.into_inner()) = Some(outcome.clone());

        // Rebuild before the kubelet can call us (bounded: the kubelet may not be up yet).
        let start_pass =
            tokio::time::timeout(Duration::from_secs(3), gc::reconcile_once(&shared)).await;
        let reconciled = matches!(start_pass, Ok((_, None)));
        match start_pass {
            Ok((done, None)) => {
                if !done.adopted.is_empty() {
                    tracing::info!(
                        adopted = done.adopted.len(),
                        "allocations rebuilt from pod-resources"
                    );
                }
            }
            Ok((_, Some(e))) if matches!(outcome, RestoreOutcome::Rebuilt { .. }) => {
                tracing::warn!(error = %e, "pod-resources is not reachable yet; allocations will be rebuilt as soon as it answers");
            }
            Ok((_, Some(e))) => tracing::debug!(error = %e, "pod-resources not reachable at start"),
            Err(_) => tracing::warn!(
                "pod-resources did not answer within 3s at start; reconciling in the background"
            ),
        }

        tasks.push(spawn_checkpoint_writer(Arc::clone(&shared)));
        let health_stop = Arc::new(AtomicBool::new(false));
        let health_thread =
            health::spawn_event_thread(Arc::clone(&shared), Arc::clone(&health_stop)).map_err(
                |e| DaemonError::Inventory(format!("cannot start the health thread: {e}")),
            )?;
        tasks.push(health::spawn_reprobe(
            Arc::clone(&shared),
            config.health_reprobe_interval,
        ));
        tasks.push(hostpids::spawn_publisher(
            Arc::clone(&shared),
            config.limiter_pids_interval,
        ));
        tasks.push(gc::spawn_gc(
            Arc::clone(&shared),
            config.gc_interval,
            !reconciled,
        ));
        if let (Some(cluster), false) = (&deps.cluster, standalone) {
            tasks.push(publisher::spawn_publisher(
                Arc::clone(cluster),
                config.node_name.clone(),
                shared.keys.clone(),
                shared.inventory(),
                RetryPolicy::default(),
                Duration::from_secs(60),
            ));
        }
        let mut metrics_addr = None;
        if let Some(mcfg) = &config.metrics {
            let source: Arc<dyn SnapshotSource> = Arc::clone(&shared) as Arc<dyn SnapshotSource>;
            let server = gm_metrics::MetricsServer::bind(mcfg, source, Arc::clone(&deps.backend))
                .await
                .map_err(|e| DaemonError::Metrics(e.to_string()))?;
            metrics_addr = Some(
                server
                    .local_addr()
                    .map_err(|e| DaemonError::Metrics(e.to_string()))?,
            );
            let mut stop = shutdown_rx.clone();
            tasks.push(tokio::spawn(async move {
                let shutdown = async move {
                    let _ = stop.wait_for(|s| *s).await;
                };
                if let Err(e) = server.run(shutdown).await {
                    tracing::error!(error = %e, "metrics server failed");
                }
            }));
        }
        let (dir, watcher) =
            registration::spawn_watcher(config.kubelet_dir.clone(), config.watch_poll_interval);
        tasks.push(watcher);
        let plugins = DeviceKind::ALL
            .iter()
            .map(|&kind| {
                tokio::spawn(registration::run_plugin(
                    Arc::clone(&shared),
                    kind,
                    dir.clone(),
                    shutdown_rx.clone(),
                ))
            })
            .collect();
        Ok(Self {
            handle: DaemonHandle {
                shared,
                metrics_addr,
            },
            shutdown,
            plugins,
            tasks,
            health_stop,
            health_thread: Some(health_thread),
        })
    }

    /// A clonable view of the daemon.
    pub fn handle(&self) -> DaemonHandle {
        self.handle.clone()
    }

    /// Stop gracefully: unregister (sockets removed, ListAndWatch streams ended), write a final
    /// checkpoint, stop every task.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        for p in self.plugins.drain(..) {
            let _ = tokio::time::timeout(Duration::from_secs(5), p).await;
        }
        let shared = Arc::clone(&self.handle.shared);
        if let Ok((_, Err(e))) =
            tokio::task::spawn_blocking(move || write_checkpoint(&shared)).await
        {
            tracing::error!(error = %e, "cannot write the final checkpoint");
        }
        self.stop_everything();
        if let Some(t) = self.health_thread.take() {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
        tracing::info!("gpu-manager stopped");
    }

    /// Stop at once without any cleanup, as a crash would (sockets and a possibly stale
    /// checkpoint are left behind).
    pub fn kill(self) {
        drop(self);
    }

    fn stop_everything(&mut self) {
        self.health_stop.store(true, Ordering::SeqCst);
        for t in self.plugins.drain(..).chain(self.tasks.drain(..)) {
            t.abort();
        }
        let servers = std::mem::take(
            &mut *self
                .handle
                .shared
                .servers
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        for s in servers {
            s.abort();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop_everything();
    }
}
