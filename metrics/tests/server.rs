//! The :5678 endpoints over a simulated node with workloads, in process.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use gm_backend::{BackendError, CardUsage, GpuBackend, HealthEvent, ProbeResult, ProcessSample};
use gm_core::NodeInventory;
use support::{container_labels, get, parse_samples, sim_node, value, with, workload, NODE};

const PROMETHEUS_ACCEPT: &str = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
const MIB: f64 = 1024.0 * 1024.0;

#[tokio::test]
async fn metric_and_metrics_serve_the_same_prometheus_text() {
    let node = sim_node();
    // One shared sample, so that even the sample duration is the same in both bodies.
    let mut config = node.config();
    config.cache_ttl = Duration::from_secs(60);
    let router = gm_metrics::router(&config, node.source.clone(), node.backend.clone());
    let (s1, h1, a) = get(&router, "/metric", None).await;
    let (s2, _, b) = get(&router, "/metrics", None).await;
    assert_eq!((s1, s2), (StatusCode::OK, StatusCode::OK));
    assert!(a == b, "/metric and /metrics differ");
    assert_eq!(
        h1.get("content-type").and_then(|v| v.to_str().ok()),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    assert!(
        a.contains("# TYPE container_gpu_utilization gauge\n"),
        "{a}"
    );
}

#[tokio::test]
async fn the_four_tkestack_families_carry_usage_per_card_and_total_and_requests() {
    let node = sim_node();
    let (_, _, body) = get(&node.router(), "/metrics", None).await;
    let s = parse_samples(&body);

    let a = container_labels(&workload("train-a"));
    assert_eq!(
        value(&s, "container_gpu_utilization", &with(&a, ("gpu", "gpu0"))),
        Some(45.0)
    );
    assert_eq!(
        value(&s, "container_gpu_utilization", &with(&a, ("gpu", "total"))),
        Some(45.0)
    );
    assert_eq!(
        value(
            &s,
            "container_gpu_memory_total",
            &with(&a, ("gpu_memory", "gpu0"))
        ),
        Some(20480.0)
    );
    assert_eq!(
        value(
            &s,
            "container_request_gpu_utilization",
            &with(&a, ("req_of_gpu", "total"))
        ),
        Some(0.3)
    );
    assert_eq!(
        value(
            &s,
            "container_request_gpu_memory",
            &with(&a, ("req_of_gpu_memory", "total"))
        ),
        Some(5120.0)
    );

    // Two whole cards: per-card series for both (one idle), totals over both.
    let big = container_labels(&workload("big-job"));
    assert_eq!(
        value(
            &s,
            "container_gpu_utilization",
            &with(&big, ("gpu", "gpu5"))
        ),
        Some(90.0)
    );
    assert_eq!(
        value(
            &s,
            "container_gpu_utilization",
            &with(&big, ("gpu", "gpu6"))
        ),
        Some(0.0)
    );
    assert_eq!(
        value(
            &s,
            "container_gpu_utilization",
            &with(&big, ("gpu", "total"))
        ),
        Some(90.0)
    );
    assert_eq!(
        value(
            &s,
            "container_gpu_memory_total",
            &with(&big, ("gpu_memory", "total"))
        ),
        Some(65536.0)
    );
    assert_eq!(
        value(
            &s,
            "container_request_gpu_utilization",
            &with(&big, ("req_of_gpu", "total"))
        ),
        Some(2.0)
    );
    assert_eq!(
        value(
            &s,
            "container_request_gpu_memory",
            &with(&big, ("req_of_gpu_memory", "total"))
        ),
        Some(2.0 * 81559.0)
    );

    // The notebook's container ID is unknown to the daemon: mapped through its pod UID.
    let nb = container_labels(&workload("notebook"));
    assert_eq!(
        value(&s, "container_gpu_utilization", &with(&nb, ("gpu", "gpu2"))),
        Some(35.0)
    );
    assert_eq!(
        value(
            &s,
            "container_gpu_memory_total",
            &with(&nb, ("gpu_memory", "gpu2"))
        ),
        Some(12288.0)
    );

    // Exactly the TKEStack label sets: no other labels on these families.
    for sample in s.iter().filter(|x| x.name.starts_with("container_")) {
        let keys: Vec<&str> = sample.labels.keys().map(String::as_str).collect();
        let extra = match sample.name.as_str() {
            "container_gpu_utilization" => "gpu",
            "container_gpu_memory_total" => "gpu_memory",
            "container_request_gpu_utilization" => "req_of_gpu",
            "container_request_gpu_memory" => "req_of_gpu_memory",
            other => panic!("unexpected family {other}"),
        };
        let mut want = vec!["container_name", extra, "namespace", "node", "pod_name"];
        want.sort_unstable();
        assert_eq!(keys, want, "{sample:?}");
    }
}

#[tokio::test]
async fn card_and_node_families_show_capacity_allocation_health_and_xids() {
    let node = sim_node();
    node.source.update(|s| s.inventory.cards[7].healthy = false);
    let (_, _, body) = get(&node.router(), "/metrics", None).await;
    let s = parse_samples(&body);
    let card = |g: &'static str| vec![("node", NODE), ("gpu", g)];
    assert_eq!(
        value(&s, "gpu_manager_card_vcuda_core_capacity", &card("gpu0")),
        Some(100.0)
    );
    assert_eq!(
        value(&s, "gpu_manager_card_vcuda_core_allocated", &card("gpu0")),
        Some(70.0)
    );
    assert_eq!(
        value(&s, "gpu_manager_card_vcuda_core_allocated", &card("gpu6")),
        Some(100.0)
    );
    assert_eq!(
        value(&s, "gpu_manager_card_vcuda_core_allocated", &card("gpu1")),
        Some(0.0)
    );
    assert_eq!(
        value(&s, "gpu_manager_card_memory_capacity_bytes", &card("gpu0")),
        Some(81559.0 * MIB)
    );
    assert_eq!(
        value(&s, "gpu_manager_card_memory_allocated_bytes", &card("gpu0")),
        Some((5120.0 + 8192.0) * MIB)
    );
    assert_eq!(
        value(&s, "gpu_manager_card_healthy", &card("gpu0")),
        Some(1.0)
    );
    assert_eq!(
        value(&s, "gpu_manager_card_healthy", &card("gpu7")),
        Some(0.0)
    );
    assert_eq!(
        value(
            &s,
            "gpu_manager_card_xid_errors_total",
            &with(&card("gpu3"), ("xid", "31"))
        ),
        Some(2.0)
    );
    assert_eq!(
        value(
            &s,
            "gpu_manager_card_info",
            &with(&card("gpu5"), ("model", "NVIDIA H100 80GB HBM3"))
        ),
        Some(1.0)
    );
    assert_eq!(
        value(&s, "gpu_manager_card_utilization_ratio", &card("gpu0")),
        Some(0.65)
    );
    assert_eq!(
        value(&s, "gpu_manager_card_memory_used_bytes", &card("gpu0")),
        Some(29184.0 * MIB)
    );
    assert_eq!(
        value(&s, "gpu_manager_card_processes", &card("gpu0")),
        Some(2.0)
    );
    assert_eq!(
        value(&s, "gpu_manager_card_unmapped_processes", &card("gpu0")),
        Some(0.0)
    );
    let n = [("node", NODE)];
    assert_eq!(value(&s, "gpu_manager_allocated_containers", &n), Some(4.0));
    assert_eq!(value(&s, "gpu_manager_allocated_pods", &n), Some(4.0));
    assert_eq!(
        value(&s, "gpu_manager_device_plugin_registered", &n),
        Some(1.0)
    );
    assert_eq!(value(&s, "gpu_manager_backend_up", &n), Some(1.0));
    assert_eq!(
        value(
            &s,
            "gpu_manager_device_plugin_registrations_total",
            &[("resource", "tencent.com/vcuda-core")]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &s,
            "gpu_manager_build_info",
            &[("version", "test-1.2.3"), ("backend", "simulated")]
        ),
        Some(1.0)
    );
    let a = container_labels(&workload("train-a"));
    assert_eq!(
        value(
            &s,
            "gpu_manager_container_allocated_vcuda_core",
            &with(&a, ("gpu", "gpu0"))
        ),
        Some(30.0)
    );
    assert_eq!(
        value(
            &s,
            "gpu_manager_container_allocated_memory_bytes",
            &with(&a, ("gpu", "gpu0"))
        ),
        Some(5120.0 * MIB)
    );
}

#[tokio::test]
async fn prometheus_scrapers_get_openmetrics_with_the_same_samples() {
    let node = sim_node();
    let router = node.router();
    let (status, headers, om) = get(&router, "/metrics", Some(PROMETHEUS_ACCEPT)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        headers.get("content-type").and_then(|v| v.to_str().ok()),
        Some("application/openmetrics-text; version=1.0.0; charset=utf-8")
    );
    assert!(om.ends_with("# EOF\n"), "{om}");
    assert!(
        om.contains("# TYPE gpu_manager_card_xid_errors counter\n"),
        "{om}"
    );
    assert!(om.contains("# TYPE gpu_manager_card info\n"), "{om}");
    let (_, _, text) = get(&router, "/metrics", Some("text/plain")).await;
    let mut a = parse_samples(&om);
    let mut b = parse_samples(&text);
    let key = |s: &support::Sample| format!("{}{:?}", s.name, s.labels);
    a.sort_by_key(key);
    b.sort_by_key(key);
    // The sample duration differs between two scrapes; everything else is the same.
    a.retain(|s| s.name != "gpu_manager_usage_sample_duration_seconds");
    b.retain(|s| s.name != "gpu_manager_usage_sample_duration_seconds");
    assert_eq!(a, b);
}

#[tokio::test]
async fn usage_shows_a_table_per_card_and_container_and_json_on_request() {
    let node = sim_node();
    let router = node.router();
    let (status, headers, table) = get(&router, "/usage", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        headers.get("content-type").and_then(|v| v.to_str().ok()),
        Some("text/plain; charset=utf-8")
    );
    assert!(
        table.contains(&format!("node:           {NODE}")),
        "{table}"
    );
    assert!(table.contains("cgroup:         v2/systemd"), "{table}");
    let trainer = table
        .lines()
        .find(|l| l.contains("trainer"))
        .unwrap_or_else(|| panic!("no trainer row in\n{table}"));
    let cells: Vec<&str> = trainer.split_whitespace().collect();
    assert_eq!(
        cells,
        ["ml", "train-a", "trainer", "gpu0", "30", "5120", "45", "20480", "41237"]
    );
    let card0 = table
        .lines()
        .find(|l| l.starts_with("gpu0 "))
        .unwrap_or_else(|| panic!("no gpu0 row in\n{table}"));
    assert!(card0.contains("70/100"), "{card0}");
    assert!(table.contains("total"), "big-job spans two cards: {table}");

    let (status, headers, json) = get(&router, "/usage?format=json", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        headers.get("content-type").and_then(|v| v.to_str().ok()),
        Some("application/json")
    );
    let v: serde_json::Value =
        serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}: {json}"));
    let big = v["containers"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["podName"] == "big-job"))
        .unwrap_or_else(|| panic!("no big-job in {json}"));
    assert_eq!(big["requestCores"], 200);
    assert_eq!(big["usage"]["utilizationPercent"], 90);
    assert_eq!(big["usage"]["pids"], serde_json::json!([52011]));
    assert_eq!(big["cards"][1]["gpu"], "gpu6");
    assert_eq!(big["cards"][1]["usage"]["memoryUsedMib"], 0);
    assert_eq!(v["cards"][0]["coresAllocated"], 70);
    assert_eq!(v["backend"]["up"], true);
}

#[tokio::test]
async fn an_unknown_usage_format_is_refused_naming_the_allowed_ones() {
    let node = sim_node();
    let (status, _, body) = get(&node.router(), "/usage?format=yaml", None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body.contains("\"yaml\""), "{body}");
    assert!(body.contains("format=json"), "{body}");
}

#[tokio::test]
async fn readyz_follows_device_plugin_registration_and_healthz_is_always_ok() {
    let node = sim_node();
    node.source.update(|s| {
        s.registered = false;
        s.unregistered = vec!["tencent.com/vcuda-memory".into()];
    });
    let router = node.router();
    let (status, _, body) = get(&router, "/readyz", None).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        body.contains("tencent.com/vcuda-memory not registered with the kubelet"),
        "{body}"
    );
    assert_eq!(get(&router, "/healthz", None).await.0, StatusCode::OK);
    node.source.update(|s| {
        s.registered = true;
        s.unregistered.clear();
    });
    assert_eq!(get(&router, "/readyz", None).await.0, StatusCode::OK);
    let (_, _, metrics) = get(&router, "/metrics", None).await;
    assert_eq!(
        value(
            &parse_samples(&metrics),
            "gpu_manager_device_plugin_registered",
            &[]
        ),
        Some(1.0)
    );
}

#[tokio::test]
async fn version_names_the_version_backend_and_node_and_unknown_paths_list_the_endpoints() {
    let node = sim_node();
    let router = node.router();
    let (status, _, body) = get(&router, "/version", None).await;
    assert_eq!(status, StatusCode::OK);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        v,
        serde_json::json!({"version": "test-1.2.3", "backend": "simulated", "node": NODE})
    );
    let (status, _, body) = get(&router, "/debug/pprof/", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(
        body.contains("/metrics") && body.contains("/usage"),
        "{body}"
    );
}

/// A backend that fails, hangs or counts its calls, around the simulated one.
#[derive(Debug)]
struct Wrapped {
    inner: Arc<dyn GpuBackend>,
    fail: bool,
    delay: Duration,
    calls: AtomicUsize,
}

impl Wrapped {
    fn new(inner: Arc<dyn GpuBackend>, fail: bool, delay: Duration) -> Arc<Self> {
        Arc::new(Self {
            inner,
            fail,
            delay,
            calls: AtomicUsize::new(0),
        })
    }
}

impl GpuBackend for Wrapped {
    fn kind(&self) -> &'static str {
        "wrapped"
    }
    fn inventory(&self) -> Result<NodeInventory, BackendError> {
        self.inner.inventory()
    }
    fn wait_events(&self, timeout: Duration) -> Result<Vec<HealthEvent>, BackendError> {
        self.inner.wait_events(timeout)
    }
    fn probe(&self, uuid: &str) -> Result<ProbeResult, BackendError> {
        self.inner.probe(uuid)
    }
    fn processes(&self) -> Result<Vec<ProcessSample>, BackendError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(self.delay);
        if self.fail {
            return Err(BackendError::NvmlUnavailable {
                cause: "driver/library version mismatch".into(),
                hint: "reboot the node".into(),
            });
        }
        self.inner.processes()
    }
    fn card_usage(&self) -> Result<Vec<CardUsage>, BackendError> {
        self.inner.card_usage()
    }
}

#[tokio::test]
async fn a_failing_backend_drops_usage_series_keeps_requests_and_says_why() {
    let node = sim_node();
    let router = node.router_with(Wrapped::new(node.backend.clone(), true, Duration::ZERO));
    let (status, _, body) = get(&router, "/metrics", None).await;
    assert_eq!(status, StatusCode::OK);
    let s = parse_samples(&body);
    assert_eq!(value(&s, "gpu_manager_backend_up", &[]), Some(0.0));
    assert!(
        !s.iter().any(|x| x.name == "container_gpu_utilization"),
        "{body}"
    );
    assert!(
        !s.iter().any(|x| x.name == "container_gpu_memory_total"),
        "{body}"
    );
    let a = container_labels(&workload("train-a"));
    assert_eq!(
        value(
            &s,
            "container_request_gpu_utilization",
            &with(&a, ("req_of_gpu", "total"))
        ),
        Some(0.3)
    );
    let (_, _, table) = get(&router, "/usage", None).await;
    assert!(
        table.contains("DOWN: listing GPU processes failed: NVML not available"),
        "{table}"
    );
}

#[tokio::test]
async fn a_hanging_backend_delays_a_scrape_only_until_the_deadline_and_is_not_called_again() {
    let node = sim_node();
    let slow = Wrapped::new(node.backend.clone(), false, Duration::from_millis(1500));
    let mut config = node.config();
    config.sample_timeout = Duration::from_millis(200);
    let router = gm_metrics::router(&config, node.source.clone(), slow.clone());
    let start = Instant::now();
    let (_, _, first) = get(&router, "/metrics", None).await;
    assert!(
        start.elapsed() < Duration::from_millis(1000),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(
        value(&parse_samples(&first), "gpu_manager_backend_up", &[]),
        Some(0.0)
    );
    let (_, _, second) = get(&router, "/usage", None).await;
    assert!(second.contains("has not answered for"), "{second}");
    assert_eq!(
        slow.calls.load(Ordering::SeqCst),
        1,
        "a second call was started"
    );
    // Once the stuck call returns, its sample is used.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (_, _, third) = get(&router, "/metrics", None).await;
    assert_eq!(
        value(&parse_samples(&third), "gpu_manager_backend_up", &[]),
        Some(1.0)
    );
    assert_eq!(slow.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn scrapes_within_the_cache_ttl_share_one_backend_sample() {
    let node = sim_node();
    let counted = Wrapped::new(node.backend.clone(), false, Duration::ZERO);
    let mut config = node.config();
    config.cache_ttl = Duration::from_secs(60);
    let router = gm_metrics::router(&config, node.source.clone(), counted.clone());
    for _ in 0..3 {
        get(&router, "/metrics", None).await;
    }
    get(&router, "/usage", None).await;
    assert_eq!(counted.calls.load(Ordering::SeqCst), 1);

    let uncached = Wrapped::new(node.backend.clone(), false, Duration::ZERO);
    let router = gm_metrics::router(&node.config(), node.source.clone(), uncached.clone());
    for _ in 0..3 {
        get(&router, "/metrics", None).await;
    }
    assert_eq!(uncached.calls.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn a_host_process_on_a_card_is_counted_unmapped_with_its_reason() {
    let node = sim_node();
    // PID 41390 now runs outside Kubernetes (e.g. a debugging session on the host).
    node.fixture
        .add_host_process(&gm_testkit::cgroup::HostProcess {
            pid: 41390,
            cgroup: "/user.slice/user-0.slice/session-4.scope".into(),
        });
    let router = node.router();
    let (_, _, body) = get(&router, "/metrics", None).await;
    let s = parse_samples(&body);
    let card0 = [("node", NODE), ("gpu", "gpu0")];
    assert_eq!(
        value(&s, "gpu_manager_card_unmapped_processes", &card0),
        Some(1.0)
    );
    let b = container_labels(&workload("train-b"));
    assert_eq!(
        value(&s, "container_gpu_utilization", &with(&b, ("gpu", "total"))),
        Some(0.0)
    );
    let (_, _, json) = get(&router, "/usage?format=json", None).await;
    let v: serde_json::Value = serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(v["unmappedProcesses"][0]["pid"], 41390);
    let reason = v["unmappedProcesses"][0]["reason"]
        .as_str()
        .unwrap_or_default();
    assert!(reason.contains("not a Kubernetes pod"), "{reason}");
}

#[tokio::test]
async fn the_server_binds_serves_over_tcp_and_shuts_down_on_request() {
    let node = sim_node();
    let server =
        gm_metrics::MetricsServer::bind(&node.config(), node.source.clone(), node.backend.clone())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    let addr = server.local_addr().unwrap_or_else(|e| panic!("{e}"));
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server.run(async {
        let _ = rx.await;
    }));
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream
        .write_all(b"GET /healthz HTTP/1.0\r\nHost: x\r\n\r\n")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut resp = String::new();
    stream
        .read_to_string(&mut resp)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        resp.starts_with("HTTP/1.0 200") && resp.ends_with("ok\n"),
        "{resp}"
    );
    let _ = tx.send(());
    let done = tokio::time::timeout(Duration::from_secs(5), task).await;
    assert!(matches!(done, Ok(Ok(Ok(())))), "{done:?}");
    // A second server cannot take the same port; the error names it.
    let mut config = node.config();
    config.addr = addr;
    let held = tokio::net::TcpListener::bind(addr).await;
    if held.is_ok() {
        let err =
            gm_metrics::MetricsServer::bind(&config, node.source.clone(), node.backend.clone())
                .await
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
        assert!(
            err.contains(&addr.to_string()) && err.contains("--metrics-addr"),
            "{err}"
        );
    }
}
