//! A minimal HTTP server on `--metrics-addr`: `/healthz` (the process runs) and `/readyz`
//! (both plugins are registered with the kubelet). The metrics server of `gm-metrics` replaces
//! it once wired in.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use gm_core::devices::DeviceKind;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::error::DaemonError;
use crate::shared::Shared;

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(shared): State<Arc<Shared>>) -> (StatusCode, String) {
    if shared.ready() {
        return (StatusCode::OK, "ready\n".into());
    }
    let state = |k: DeviceKind| {
        if shared.is_registered(k) {
            "registered"
        } else {
            "not registered"
        }
    };
    (
        StatusCode::SERVICE_UNAVAILABLE,
        format!(
            "not ready: {} {}, {} {} with the kubelet\n",
            shared.config.names.core(),
            state(DeviceKind::Core),
            shared.config.names.memory(),
            state(DeviceKind::Memory)
        ),
    )
}

/// The router.
pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(shared)
}

/// Bind `addr` and serve until `shutdown` becomes true. Returns the bound address (useful with
/// port 0).
pub async fn serve(
    addr: SocketAddr,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(SocketAddr, JoinHandle<()>), DaemonError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| DaemonError::Listen { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| DaemonError::Listen { addr, source })?;
    let app = router(shared);
    let task = tokio::spawn(async move {
        let stop = async move {
            let _ = shutdown.wait_for(|s| *s).await;
        };
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(stop)
            .await
        {
            tracing::error!(error = %e, "health server failed");
        }
    });
    Ok((bound, task))
}
