//! The HTTP server on `--metrics-addr` (default `0.0.0.0:5678`).
//!
//! | path | answer |
//! |---|---|
//! | `/metrics`, `/metric` | the metric families; OpenMetrics when `Accept` asks for it, Prometheus text otherwise |
//! | `/usage` | a table per card and per container; JSON with `?format=json` |
//! | `/healthz` | 200 while the server runs |
//! | `/readyz` | 200 once both device plugins are registered with the kubelet, 503 before |
//! | `/version` | JSON: version, GPU backend kind, node |
//!
//! The GPU backend is asked at most once per scrape (and at most once per
//! [`MetricsConfig::cache_ttl`]), on a blocking thread, with a deadline; a backend that hangs
//! never holds up a scrape for longer than [`MetricsConfig::sample_timeout`], and no second
//! call is started while the first is still stuck.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use gm_backend::GpuBackend;
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;
use tokio::task::JoinHandle;

use crate::cgroup::{parse_choice, CgroupConfig, CgroupError, PidResolver};
use crate::error::MetricsError;
use crate::exposition::{encode, Format};
use crate::families::{metric_families, RenderInfo};
use crate::report::{NodeReport, UsageSample};
use crate::snapshot::SnapshotSource;
use crate::usage_table;

/// Default listen address, as TKEStack's `--query-port`.
pub const DEFAULT_ADDR: &str = "0.0.0.0:5678";

/// Everything the metrics server needs besides the snapshot source and the backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsConfig {
    /// Listen address.
    pub addr: SocketAddr,
    /// Where the cgroup and proc files are, and what to assume about them.
    pub cgroup: CgroupConfig,
    /// Version string shown by `/version` and `gpu_manager_build_info`.
    pub version: String,
    /// How long one usage sample is reused by later scrapes (0: every scrape samples).
    pub cache_ttl: Duration,
    /// How long a scrape waits for the GPU backend before answering without usage.
    pub sample_timeout: Duration,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            addr: SocketAddr::from(([0, 0, 0, 0], 5678)),
            cgroup: CgroupConfig::default(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            cache_ttl: Duration::from_secs(1),
            sample_timeout: Duration::from_secs(5),
        }
    }
}

/// The metrics flags, for the daemon to `#[command(flatten)]`. Every flag is also an
/// environment variable.
#[derive(Debug, Clone, clap::Args)]
pub struct MetricsArgs {
    /// Address of the metrics, usage and health endpoints.
    #[arg(long, env = "GPU_MANAGER_METRICS_ADDR", default_value = DEFAULT_ADDR)]
    pub metrics_addr: SocketAddr,
    /// Mount point of the host's cgroup filesystem.
    #[arg(
        long,
        env = "GPU_MANAGER_CGROUP_ROOT",
        default_value = "/sys/fs/cgroup"
    )]
    pub cgroup_root: PathBuf,
    /// The host's /proc (the daemon needs hostPID: true to see container processes).
    #[arg(long, env = "GPU_MANAGER_PROC_ROOT", default_value = "/proc")]
    pub proc_root: PathBuf,
    /// The kubelet's cgroup driver: auto, cgroupfs or systemd.
    #[arg(long, env = "GPU_MANAGER_CGROUP_DRIVER", default_value = "auto")]
    pub cgroup_driver: String,
    /// cgroup version: auto, v1 or v2.
    #[arg(long, env = "GPU_MANAGER_CGROUP_VERSION", default_value = "auto")]
    pub cgroup_version: String,
    /// Milliseconds one usage sample is reused by later scrapes (0: sample on every scrape).
    #[arg(long, env = "GPU_MANAGER_METRICS_CACHE_TTL_MS", default_value_t = 1000)]
    pub metrics_cache_ttl_ms: u64,
    /// Milliseconds a scrape waits for the GPU backend before answering without usage.
    #[arg(
        long,
        env = "GPU_MANAGER_USAGE_SAMPLE_TIMEOUT_MS",
        default_value_t = 5000
    )]
    pub usage_sample_timeout_ms: u64,
}

impl MetricsArgs {
    /// The configuration these flags describe; `version` is the daemon's version string.
    pub fn into_config(self, version: impl Into<String>) -> Result<MetricsConfig, MetricsError> {
        if self.usage_sample_timeout_ms == 0 {
            return Err(MetricsError::Config(
                "--usage-sample-timeout-ms must be at least 1 (milliseconds)".into(),
            ));
        }
        Ok(MetricsConfig {
            addr: self.metrics_addr,
            cgroup: CgroupConfig {
                cgroup_root: self.cgroup_root,
                proc_root: self.proc_root,
                version: parse_choice(&self.cgroup_version).map_err(cgroup_flag)?,
                driver: parse_choice(&self.cgroup_driver).map_err(cgroup_flag)?,
            },
            version: version.into(),
            cache_ttl: Duration::from_millis(self.metrics_cache_ttl_ms),
            sample_timeout: Duration::from_millis(self.usage_sample_timeout_ms),
        })
    }
}

fn cgroup_flag(e: CgroupError) -> MetricsError {
    MetricsError::Config(e.to_string())
}

struct SamplerState {
    last: Option<(Instant, Arc<UsageSample>)>,
    /// A sample that outlived its scrape's deadline, with its start time.
    in_flight: Option<(Instant, JoinHandle<UsageSample>)>,
}

struct Inner {
    source: Arc<dyn SnapshotSource>,
    backend: Arc<dyn GpuBackend>,
    resolver: Arc<PidResolver>,
    version: String,
    cache_ttl: Duration,
    sample_timeout: Duration,
    sampler: Mutex<SamplerState>,
}

/// Shared by the handlers.
#[derive(Clone)]
struct AppState(Arc<Inner>);

impl AppState {
    /// The current usage sample: cached, or taken now on a blocking thread with a deadline.
    async fn sample(&self) -> Arc<UsageSample> {
        let inner = &self.0;
        let mut st = inner.sampler.lock().await;
        if let Some((at, s)) = &st.last {
            if at.elapsed() < inner.cache_ttl {
                return s.clone();
            }
        }
        let (started, mut handle) = match st.in_flight.take() {
            Some((started, handle)) if !handle.is_finished() => {
                let waited = started.elapsed().as_secs_f64();
                st.in_flight = Some((started, handle));
                return Arc::new(UsageSample::unavailable(format!(
                    "the GPU backend has not answered for {waited:.1} s (the sample started \
                     then is still running; no new one is started until it returns)"
                )));
            }
            Some(done) => done,
            None => {
                let backend = inner.backend.clone();
                let resolver = inner.resolver.clone();
                let handle = tokio::task::spawn_blocking(move || {
                    UsageSample::take(backend.as_ref(), &resolver)
                });
                (Instant::now(), handle)
            }
        };
        match tokio::time::timeout(inner.sample_timeout, &mut handle).await {
            Ok(Ok(sample)) => {
                let sample = Arc::new(sample);
                st.last = Some((Instant::now(), sample.clone()));
                sample
            }
            Ok(Err(e)) => {
                tracing::error!("usage sampling task failed: {e}");
                Arc::new(UsageSample::unavailable(format!(
                    "usage sampling failed: {e}"
                )))
            }
            Err(_) => {
                tracing::warn!(
                    timeout_ms = inner.sample_timeout.as_millis() as u64,
                    "the GPU backend did not answer in time; answering without usage"
                );
                st.in_flight = Some((started, handle));
                Arc::new(UsageSample::unavailable(format!(
                    "the GPU backend did not answer within {} ms",
                    inner.sample_timeout.as_millis()
                )))
            }
        }
    }

    async fn report(&self) -> NodeReport {
        let sample = self.sample().await;
        let snapshot = self.0.source.snapshot();
        NodeReport::build(&snapshot, &sample)
    }
}

/// The router with every endpoint, for the daemon or for in-process tests.
pub fn router(
    config: &MetricsConfig,
    source: Arc<dyn SnapshotSource>,
    backend: Arc<dyn GpuBackend>,
) -> Router {
    let state = AppState(Arc::new(Inner {
        source,
        backend,
        resolver: Arc::new(PidResolver::new(config.cgroup.clone())),
        version: config.version.clone(),
        cache_ttl: config.cache_ttl,
        sample_timeout: config.sample_timeout,
        sampler: Mutex::new(SamplerState {
            last: None,
            in_flight: None,
        }),
    }));
    Router::new()
        .route("/metrics", get(metrics))
        .route("/metric", get(metrics))
        .route("/usage", get(usage))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/version", get(version))
        .fallback(not_found)
        .with_state(state)
}

async fn metrics(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let format = Format::from_accept(headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()));
    let report = state.report().await;
    let info = RenderInfo {
        version: &state.0.version,
        backend: state.0.backend.kind(),
    };
    match encode(&metric_families(&report, info), format) {
        Ok(body) => (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static(format.content_type()),
            )],
            body,
        )
            .into_response(),
        Err(e) => {
            tracing::error!("{e}");
            (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response()
        }
    }
}

#[derive(Debug, Deserialize)]
struct UsageQuery {
    format: Option<String>,
}

async fn usage(State(state): State<AppState>, Query(q): Query<UsageQuery>) -> Response {
    let json = match q.format.as_deref().map(str::trim) {
        None | Some("") | Some("text") | Some("table") => false,
        Some("json") => true,
        Some(other) => {
            return (
                StatusCode::BAD_REQUEST,
                format!("unknown format {other:?}: use format=text (the default) or format=json\n"),
            )
                .into_response()
        }
    };
    let report = state.report().await;
    if json {
        Json(report).into_response()
    } else {
        (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            )],
            usage_table::render(&report),
        )
            .into_response()
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(state): State<AppState>) -> Response {
    let snapshot = state.0.source.snapshot();
    if snapshot.registered {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        let which = if snapshot.unregistered.is_empty() {
            "the device plugins are not".to_string()
        } else {
            format!("{} not", snapshot.unregistered.join(", "))
        };
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {which} registered with the kubelet (is kubelet.sock in the device-plugin directory?)\n"),
        )
            .into_response()
    }
}

#[derive(Debug, Serialize)]
struct VersionBody<'a> {
    version: &'a str,
    backend: &'a str,
    node: String,
}

async fn version(State(state): State<AppState>) -> Response {
    Json(VersionBody {
        version: &state.0.version,
        backend: state.0.backend.kind(),
        node: state.0.source.snapshot().node,
    })
    .into_response()
}

async fn not_found() -> (StatusCode, &'static str) {
    (
        StatusCode::NOT_FOUND,
        "not found: use /metrics (or /metric), /usage[?format=json], /healthz, /readyz or /version\n",
    )
}

/// A bound, not yet running server (bind first to learn the port when `addr` has port 0).
pub struct MetricsServer {
    listener: tokio::net::TcpListener,
    router: Router,
}

impl std::fmt::Debug for MetricsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsServer")
            .field("listener", &self.listener)
            .finish_non_exhaustive()
    }
}

impl MetricsServer {
    /// Bind `config.addr`.
    pub async fn bind(
        config: &MetricsConfig,
        source: Arc<dyn SnapshotSource>,
        backend: Arc<dyn GpuBackend>,
    ) -> Result<Self, MetricsError> {
        let listener = tokio::net::TcpListener::bind(config.addr)
            .await
            .map_err(|source| MetricsError::Bind {
                addr: config.addr,
                source,
            })?;
        Ok(Self {
            listener,
            router: router(config, source, backend),
        })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> Result<SocketAddr, MetricsError> {
        self.listener.local_addr().map_err(MetricsError::Serve)
    }

    /// Serve until `shutdown` completes, then finish the requests in progress.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), MetricsError> {
        if let Ok(addr) = self.listener.local_addr() {
            tracing::info!(%addr, "metrics server listening");
        }
        axum::serve(self.listener, self.router)
            .with_graceful_shutdown(shutdown)
            .await
            .map_err(MetricsError::Serve)
    }
}

/// Bind `config.addr` and serve until `shutdown` completes.
pub async fn serve(
    config: MetricsConfig,
    source: Arc<dyn SnapshotSource>,
    backend: Arc<dyn GpuBackend>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), MetricsError> {
    MetricsServer::bind(&config, source, backend)
        .await?
        .run(shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cgroup::CgroupDriver;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        metrics: MetricsArgs,
    }

    fn parse(args: &[&str]) -> Result<MetricsConfig, String> {
        let cli = Cli::try_parse_from(std::iter::once("gpu-manager").chain(args.iter().copied()))
            .map_err(|e| e.to_string())?;
        cli.metrics.into_config("v9").map_err(|e| e.to_string())
    }

    // One test, because it sets environment variables the other cases would see.
    #[test]
    fn flags_and_their_environment_variables_configure_the_server() {
        // Defaults: port 5678 on every address, auto-detected cgroups.
        let config = parse(&[]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config.addr.to_string(), "0.0.0.0:5678");
        assert_eq!(config.cgroup, CgroupConfig::default());
        assert_eq!(config.version, "v9");
        assert_eq!(config.cache_ttl, Duration::from_secs(1));

        let config = parse(&[
            "--metrics-addr=127.0.0.1:9400",
            "--cgroup-driver=systemd",
            "--proc-root=/host/proc",
            "--metrics-cache-ttl-ms=0",
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config.addr.to_string(), "127.0.0.1:9400");
        assert_eq!(config.cgroup.driver, Some(CgroupDriver::Systemd));
        assert_eq!(config.cgroup.proc_root, PathBuf::from("/host/proc"));
        assert_eq!(config.cache_ttl, Duration::ZERO);

        assert_eq!(
            parse(&["--cgroup-version=v3"]).err().as_deref(),
            Some(
                "invalid metrics configuration: invalid cgroup version \"v3\": use auto, v1 or v2"
            )
        );
        let zero = parse(&["--usage-sample-timeout-ms=0"])
            .err()
            .unwrap_or_default();
        assert!(zero.contains("at least 1"), "{zero}");
        let bare_port = parse(&["--metrics-addr=5678"]).err().unwrap_or_default();
        assert!(bare_port.contains("--metrics-addr"), "{bare_port}");

        std::env::set_var("GPU_MANAGER_CGROUP_ROOT", "/host/sys/fs/cgroup");
        std::env::set_var("GPU_MANAGER_USAGE_SAMPLE_TIMEOUT_MS", "750");
        let from_env = parse(&[]);
        std::env::remove_var("GPU_MANAGER_CGROUP_ROOT");
        std::env::remove_var("GPU_MANAGER_USAGE_SAMPLE_TIMEOUT_MS");
        let config = from_env.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            config.cgroup.cgroup_root,
            PathBuf::from("/host/sys/fs/cgroup")
        );
        assert_eq!(config.sample_timeout, Duration::from_millis(750));
    }
}
