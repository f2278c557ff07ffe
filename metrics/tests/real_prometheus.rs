//! A real Prometheus server (Debian's `prometheus` package, installed by scripts/test.sh)
//! scrapes the metrics server of a simulated node with workloads every second; the test then
//! queries each of the four TKEStack families (and a few node families) through Prometheus'
//! HTTP API and checks the values.
//!
//! The target is started by [`start_target`]: today the in-process server over the simulated
//! node of `support` (the `gpu-manager` daemon does not exist yet). When the daemon lands,
//! only that function changes: start the daemon binary on the same node file with a fake
//! kubelet and return its metrics address.

mod fixtures;
mod support;

use std::fs;
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::{sim_node, tool, workload, SimNode, NODE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long Prometheus may take to start, scrape and answer.
const DEADLINE: Duration = Duration::from_secs(25);

/// The scrape target: the metrics server of a simulated node, on 127.0.0.1 and a free port.
/// Returns its address and whatever keeps it alive.
async fn start_target() -> (SocketAddr, SimNode, tokio::task::JoinHandle<()>) {
    let node = sim_node();
    let server =
        gm_metrics::MetricsServer::bind(&node.config(), node.source.clone(), node.backend.clone())
            .await
            .unwrap_or_else(|e| panic!("metrics server: {e}"));
    let addr = server.local_addr().unwrap_or_else(|e| panic!("{e}"));
    let task = tokio::spawn(async move {
        if let Err(e) = server.run(std::future::pending()).await {
            panic!("metrics server stopped: {e}");
        }
    });
    (addr, node, task)
}

/// A Prometheus process, killed when dropped; its log is kept for failure messages.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    log: std::path::PathBuf,
}

impl Prometheus {
    fn start(dir: &Path, target: SocketAddr) -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap_or_else(|e| panic!("no free port: {e}"))
            .port();
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let config = dir.join("prometheus.yml");
        fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: gpu-manager\n    metrics_path: /metrics\n    \
                 static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .unwrap_or_else(|e| panic!("write {}: {e}", config.display()));
        let log = dir.join("prometheus.log");
        let log_file = fs::File::create(&log).unwrap_or_else(|e| panic!("log file: {e}"));
        let err_file = log_file
            .try_clone()
            .unwrap_or_else(|e| panic!("log file: {e}"));
        let child = Command::new(tool("prometheus"))
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            .stdout(Stdio::from(log_file))
            .stderr(Stdio::from(err_file))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start prometheus: {e}"));
        Self { child, addr, log }
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Run an instant query; the result vector (possibly empty) or `None` while Prometheus is
    /// not answering yet.
    async fn query(&self, promql: &str) -> Option<Vec<serde_json::Value>> {
        let body = http_get(
            self.addr,
            &format!("/api/v1/query?query={}", encode(promql)),
        )
        .await?;
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        if v["status"] != "success" {
            panic!("query {promql} failed: {body}");
        }
        v["data"]["result"].as_array().cloned()
    }

    /// How many series `promql` returns, waiting until it returns some (or the deadline).
    async fn series(&self, promql: &str, deadline: Instant) -> usize {
        loop {
            let n = self.query(promql).await.map_or(0, |r| r.len());
            if n > 0 || Instant::now() > deadline {
                return n;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// The single value of `promql`, waiting until it has one.
    async fn value(&self, promql: &str, deadline: Instant) -> f64 {
        loop {
            if let Some(result) = self.query(promql).await {
                match result.as_slice() {
                    [one] => {
                        let text = one["value"][1].as_str().unwrap_or_default().to_string();
                        return text
                            .parse()
                            .unwrap_or_else(|e| panic!("{promql}: value {text:?}: {e}"));
                    }
                    [] => {}
                    many => panic!("{promql} matched several series: {many:?}"),
                }
            }
            if Instant::now() > deadline {
                let targets = http_get(self.addr, "/api/v1/targets")
                    .await
                    .unwrap_or_default();
                panic!(
                    "no value for {promql} within {DEADLINE:?}\ntargets: {targets}\nprometheus \
                     log:\n{}",
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Percent-encode a query parameter.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A plain HTTP/1.0 GET (no chunked encoding to deal with); the body of a 200 answer.
async fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    let req = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    stream.write_all(req.as_bytes()).await.ok()?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.ok()?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n")?;
    let ok = head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200");
    ok.then(|| body.to_string())
}

fn series(family: &str, pod: &str, extra: (&str, &str)) -> String {
    let w = workload(pod);
    format!(
        "{family}{{pod_name=\"{}\",namespace=\"{}\",node=\"{NODE}\",container_name=\"{}\",{}=\"{}\"}}",
        w.pod, w.namespace, w.container, extra.0, extra.1
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_the_node_and_answers_each_tkestack_family() {
    let (target, node, _server) = start_target().await;
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let prom = Prometheus::start(dir.path(), target);
    let deadline = Instant::now() + DEADLINE;

    // The target is up, and Prometheus kept every sample of a scrape.
    assert_eq!(prom.value("up{job=\"gpu-manager\"}", deadline).await, 1.0);
    let (_, _, text) = support::get(&node.router(), "/metrics", None).await;
    let exposed = support::parse_samples(&text).len() as f64;
    assert_eq!(
        prom.value("scrape_samples_scraped{job=\"gpu-manager\"}", deadline)
            .await,
        exposed,
        "Prometheus kept a different number of samples than the server exposes"
    );

    let checks: Vec<(String, f64)> = vec![
        (series("container_gpu_utilization", "train-a", ("gpu", "gpu0")), 45.0),
        (series("container_gpu_utilization", "big-job", ("gpu", "gpu5")), 90.0),
        (series("container_gpu_utilization", "big-job", ("gpu", "total")), 90.0),
        (series("container_gpu_memory_total", "train-b", ("gpu_memory", "gpu0")), 8192.0),
        (series("container_gpu_memory_total", "notebook", ("gpu_memory", "total")), 12288.0),
        (series("container_request_gpu_utilization", "train-a", ("req_of_gpu", "total")), 0.3),
        (series("container_request_gpu_utilization", "big-job", ("req_of_gpu", "total")), 2.0),
        (series("container_request_gpu_memory", "train-a", ("req_of_gpu_memory", "total")), 5120.0),
        (
            series("container_request_gpu_memory", "big-job", ("req_of_gpu_memory", "total")),
            163118.0,
        ),
        // Node and card families, including the counter and the info family (OpenMetrics
        // `counter` and `info` types on the wire).
        (format!("gpu_manager_card_vcuda_core_allocated{{node=\"{NODE}\",gpu=\"gpu0\"}}"), 70.0),
        (format!("gpu_manager_card_xid_errors_total{{node=\"{NODE}\",gpu=\"gpu3\",xid=\"31\"}}"), 2.0),
        (format!("gpu_manager_card_info{{node=\"{NODE}\",gpu=\"gpu5\",model=\"NVIDIA H100 80GB HBM3\"}}"), 1.0),
        (format!("gpu_manager_device_plugin_registered{{node=\"{NODE}\"}}"), 1.0),
    ];
    for (promql, want) in &checks {
        let got = prom.value(promql, deadline).await;
        assert!(
            (got - want).abs() < 1e-9,
            "{promql}: Prometheus says {got}, want {want}"
        );
    }
    // An aggregation over a family, as a dashboard would run it.
    let requested = prom
        .value(
            "sum(container_request_gpu_utilization{namespace=\"ml\"})",
            deadline,
        )
        .await;
    assert!(
        (requested - 1.2).abs() < 1e-9,
        "ml requests {requested}, want 0.3+0.4+0.5"
    );

    // Every query of the Grafana dashboard returns data from this node.
    for (title, promql) in support::dashboard_queries() {
        let n = prom.series(&promql, deadline).await;
        assert!(
            n > 0,
            "dashboard panel {title:?}: {promql} returned nothing"
        );
    }
}
