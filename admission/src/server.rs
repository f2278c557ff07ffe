//! The HTTPS server: rustls + hyper (HTTP/1.1, keep-alive) serving an axum router.
//!
//! Routes: `POST /validate`, `POST /mutate` (AdmissionReview v1) and `GET /healthz`.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use crate::args::{Settings, SettingsError, WebhookArgs};
use crate::cluster::ClusterView;
use crate::quota::sources::QuotaSources;
use crate::quota::status;
use crate::review::ReviewError;
use crate::tls::{CertReloader, TlsError};
use crate::webhook::Webhook;

/// Largest request body accepted (an AdmissionReview carries the object and the old object;
/// etcd objects are at most 1.5 MiB each).
pub const MAX_BODY_BYTES: usize = 8 * 1024 * 1024;
/// Time a client has to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a client has to send request headers (also ends idle keep-alive connections).
const HEADER_TIMEOUT: Duration = Duration::from_secs(60);
/// Time open connections get to finish after shutdown.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// The webhook could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error(transparent)]
    Settings(#[from] SettingsError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Missing(&'static str),
    #[error("the webhook server task failed: {0}")]
    Task(String),
}

/// A started webhook.
#[derive(Debug)]
pub struct RunningWebhook {
    local_addr: SocketAddr,
    task: JoinHandle<Result<(), WebhookError>>,
}

impl RunningWebhook {
    /// The address it listens on (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Wait until it has shut down.
    pub async fn wait(self) -> Result<(), WebhookError> {
        self.task
            .await
            .map_err(|e| WebhookError::Task(e.to_string()))?
    }
}

/// Run the webhook until `shutdown` resolves.
///
/// `cluster` is required unless `--standalone`, and `client` too when quotas are read
/// (`--quota-crd`, the default, or `--quota-configmap`). In standalone mode both are ignored
/// and cluster checks (card memory, quota) are skipped.
pub async fn run_webhook(
    args: WebhookArgs,
    client: Option<kube::Client>,
    cluster: Option<Arc<dyn ClusterView>>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), WebhookError> {
    start_webhook(args, client, cluster, shutdown)
        .await?
        .wait()
        .await
}

/// Start the webhook: check the flags, load the certificate, bind, and serve in the
/// background until `shutdown` resolves.
pub async fn start_webhook(
    args: WebhookArgs,
    client: Option<kube::Client>,
    cluster: Option<Arc<dyn ClusterView>>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<RunningWebhook, WebhookError> {
    let settings = Arc::new(Settings::from_args(&args)?);
    let certs = CertReloader::load(&settings.tls_cert, &settings.tls_key)?;
    let tls = certs.server_config()?;
    let mut tasks: Vec<JoinHandle<()>> = Vec::new();
    let (cluster, quotas, status_client) = if settings.standalone {
        tracing::info!(
            "standalone: no API server; request shape rules and reserved annotations are enforced, checks that need cluster state (card memory, GPU quota) are skipped"
        );
        (None, QuotaSources::none(), None)
    } else {
        let cluster = cluster.ok_or(WebhookError::Missing(
            "the webhook needs the cluster view (nodes and pods) unless --standalone is set",
        ))?;
        let wants_quota = settings.quota_crd || settings.quota_configmap.is_some();
        match (wants_quota, client) {
            (false, _) => {
                tracing::info!("GPU quota is off (--quota-crd=false and no --quota-configmap)");
                (Some(cluster), QuotaSources::none(), None)
            }
            (true, None) => {
                return Err(WebhookError::Missing(
                    "reading GPU quotas needs a Kubernetes client: pass one, or set --quota-crd=false without --quota-configmap, or --standalone",
                ))
            }
            (true, Some(client)) => {
                let (quotas, watchers) = QuotaSources::start(
                    &client,
                    settings.quota_crd,
                    settings.quota_configmap.clone(),
                );
                tasks.extend(watchers);
                let status_client = settings.quota_crd.then_some(client);
                (Some(cluster), quotas, status_client)
            }
        }
    };
    let webhook = Arc::new(Webhook::new(
        settings.clone(),
        cluster.clone(),
        quotas.clone(),
    ));
    if let (Some(view), Some(client)) = (cluster, status_client) {
        tasks.push(tokio::spawn(status::run(
            client,
            quotas,
            view,
            webhook.cards.clone(),
            settings.clone(),
            settings.quota_status_interval,
        )));
    }
    tasks.push(tokio::spawn(
        certs.clone().watch(settings.tls_reload_interval),
    ));
    let listener = TcpListener::bind(settings.addr)
        .await
        .map_err(|source| WebhookError::Bind {
            addr: settings.addr,
            source,
        })?;
    let local_addr = listener.local_addr().map_err(|source| WebhookError::Bind {
        addr: settings.addr,
        source,
    })?;
    tracing::info!(addr = %local_addr, "admission webhook listening (HTTPS)");
    let app = router(webhook);
    let task = tokio::spawn(async move {
        serve(listener, TlsAcceptor::from(tls), app, shutdown).await;
        for t in tasks {
            t.abort();
        }
        Ok(())
    });
    Ok(RunningWebhook { local_addr, task })
}

async fn serve(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    app: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            _ = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok(v) => v,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let service = TowerToHyperService::new(app.clone());
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .keep_alive(true)
                .serve_connection(TokioIo::new(tls), service);
            if let Err(e) = watcher.watch(conn).await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => tracing::info!("admission webhook stopped"),
        _ = tokio::time::sleep(DRAIN_TIMEOUT) => tracing::warn!("admission webhook stopped with connections still open"),
    }
}

/// The webhook's routes.
pub fn router(webhook: Arc<Webhook>) -> Router {
    Router::new()
        .route("/validate", post(validate))
        .route("/mutate", post(mutate))
        .route("/healthz", get(|| async { "ok" }))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(webhook)
}

fn reply(result: Result<Vec<u8>, ReviewError>) -> Response {
    match result {
        Ok(body) => ([(header::CONTENT_TYPE, "application/json")], body).into_response(),
        Err(e @ ReviewError::Encode(_)) => {
            tracing::error!(error = %e, "cannot answer an admission request");
            (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response()
        }
        Err(e) => {
            tracing::warn!(error = %e, "bad admission request");
            (StatusCode::BAD_REQUEST, e.to_string()).into_response()
        }
    }
}

async fn validate(State(w): State<Arc<Webhook>>, body: Bytes) -> Response {
    reply(w.validate_body(&body))
}

async fn mutate(State(w): State<Arc<Webhook>>, body: Bytes) -> Response {
    reply(w.mutate_body(&body))
}
