//! The scheduler extender of `gpu-admission` (DESIGN §6): kube-scheduler's extender v1 HTTP API
//! over an informer-fed, in-memory cluster state.
//!
//! * [`wire`]: the extender JSON types, written by hand (no crate provides them);
//! * [`state`]: per-node card ledgers, live GPU pods and in-flight reservations, updated one
//!   informer event at a time ([`informer`]);
//! * [`server`]: the routes — `filter`, `prioritize`, `bind`, the legacy `predicates`,
//!   `/healthz`, `/readyz`, `/metrics`;
//! * [`policy`]: which placement policy decides (flag `--policy`, pod annotation
//!   `<domain>/gpu-policy`); the placement itself is `gm_core::placement`, `gm_core::fgd` and
//!   `gm_core::fgd_plus`;
//! * [`fgd`]: FGD's target workload (configured or learned from the GPU pods), per-node
//!   access, `fgd+`'s host counts and the per-node score cache;
//! * [`leader`]: Lease-based leader election for several replicas;
//! * [`args`]: the flags, mounted by the `gpu-admission` binary.
//!
//! The binary wires it as:
//!
//! ```no_run
//! # async fn example(args: gm_extender::ExtenderArgs, client: kube::Client) -> Result<(), gm_extender::ExtenderError> {
//! let extender = gm_extender::Extender::new(&args)?;
//! let state = extender.state(); // hand to the admission webhook
//! extender.run(client, async { let _ = tokio::signal::ctrl_c().await; }).await
//! # }
//! ```

pub mod args;
mod bind;
mod decide;
pub mod error;
pub mod fgd;
pub mod hash;
pub mod informer;
pub mod leader;
pub mod metrics;
pub mod policy;
pub mod server;
pub mod state;
pub mod wire;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kube::Client;
use tokio::sync::watch;

pub use args::{ExtenderArgs, Settings};
pub use error::ExtenderError;
pub use fgd::{FgdSettings, FgdWorkload};
pub use leader::Leadership;
pub use metrics::Metrics;
pub use policy::ExtenderPolicy;
pub use server::{router, App, FilterAnswer};
pub use state::{ClusterState, GpuPodInfo, PlacedCard};

/// Make sure rustls has a process-wide crypto provider (ring) before kube builds its TLS
/// connector; several crates enable both of rustls' providers, and then rustls will not pick
/// one by itself. Does nothing when one is installed already.
pub fn ensure_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Losing a race with another installer is fine: some provider is installed either way.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

/// The extender, configured but not yet running.
#[derive(Debug)]
pub struct Extender {
    settings: Settings,
    state: Arc<ClusterState>,
    leadership: Arc<Leadership>,
    metrics: Metrics,
}

impl Extender {
    /// Check the flags and create the (empty) cluster state.
    pub fn new(args: &ExtenderArgs) -> Result<Self, ExtenderError> {
        let settings = args.settings()?;
        ensure_crypto_provider();
        let state = Arc::new(
            ClusterState::new(settings.names.clone(), settings.reservation_ttl)
                .with_fgd(settings.fgd.clone()),
        );
        let leadership = Arc::new(if settings.lease.is_some() {
            Leadership::elected()
        } else {
            Leadership::always()
        });
        Ok(Self {
            settings,
            state,
            leadership,
            metrics: Metrics::new()?,
        })
    }

    /// The cluster state, for readers such as the admission webhook. It fills once
    /// [`Extender::run`] has started the informers; see [`ClusterState::is_synced`].
    pub fn state(&self) -> Arc<ClusterState> {
        self.state.clone()
    }

    /// Whether this replica leads (always true without `--leader-elect`).
    pub fn leadership(&self) -> Arc<Leadership> {
        self.leadership.clone()
    }

    /// The resolved settings.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Start the informers, the reservation sweeper and (with `--leader-elect`) the election,
    /// serve the HTTP API on `--extender-addr`, and run until `shutdown` completes. On shutdown
    /// the server drains, and a leader releases its Lease.
    pub async fn run(
        self,
        client: Client,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ExtenderError> {
        let listener = tokio::net::TcpListener::bind(self.settings.addr)
            .await
            .map_err(|source| ExtenderError::Listen {
                addr: self.settings.addr,
                source,
            })?;
        self.serve(listener, client, shutdown).await
    }

    /// [`Extender::run`] on a listener the caller opened (tests bind port 0).
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        client: Client,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ExtenderError> {
        let (stop_tx, stop_rx) = watch::channel(false);
        tokio::spawn(async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        });
        let mut background = vec![
            tokio::spawn(informer::run_nodes(self.state.clone(), client.clone())),
            tokio::spawn(informer::run_pods(self.state.clone(), client.clone())),
            tokio::spawn(sweep_reservations(self.state.clone())),
        ];
        let election = self.settings.lease.clone().map(|lease| {
            tokio::spawn(leader::run_election(
                client.clone(),
                lease,
                self.leadership.clone(),
                stop_rx.clone(),
            ))
        });
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(%addr, policy = %self.settings.policy, "scheduler extender listening");
        }
        let app = App::new(
            self.state.clone(),
            client,
            &self.settings,
            self.leadership.clone(),
            self.metrics.clone(),
        );
        let mut stop = stop_rx.clone();
        let served = axum::serve(listener, router(app))
            .with_graceful_shutdown(async move {
                let _ = stop.wait_for(|s| *s).await;
            })
            .await
            .map_err(ExtenderError::Serve);
        if let Some(e) = election {
            let _ = tokio::time::timeout(Duration::from_secs(5), e).await;
        }
        for task in background.drain(..) {
            task.abort();
        }
        served
    }
}

/// Convenience: [`Extender::new`] then [`Extender::run`].
pub async fn run(
    args: &ExtenderArgs,
    client: Client,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ExtenderError> {
    Extender::new(args)?.run(client, shutdown).await
}

/// End expired reservations once a second.
async fn sweep_reservations(state: Arc<ClusterState>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        state.expire_reservations(Instant::now());
    }
}
