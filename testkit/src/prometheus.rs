//! A real Prometheus server (Debian's `prometheus` package, which `scripts/test.sh` installs
//! when it is missing) on a free port of 127.0.0.1 with a temporary storage directory,
//! scraping one target every second, and the parts of its HTTP API the tests use.
//!
//! A missing `prometheus` (or `promtool`) binary fails the test with the command that
//! installs it; it is never skipped.

use std::fs;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The path of an outside tool on `PATH`, if it is there.
pub fn find_tool(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    })
}

/// The path of `prometheus` or `promtool`, or a test failure telling how to install it.
pub fn tool(name: &str) -> PathBuf {
    find_tool(name).unwrap_or_else(|| {
        panic!(
            "{name} is not installed. Run scripts/test.sh, which installs Debian's prometheus \
             package (prometheus and promtool) when it is missing, or install it yourself: \
             apt-get install prometheus"
        )
    })
}

/// How long [`Prometheus::start`] waits for the server to say it is ready.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// A Prometheus process scraping one target every second; killed (and its storage removed)
/// when dropped. Its log is kept for failure messages.
#[derive(Debug)]
pub struct Prometheus {
    child: Child,
    addr: SocketAddr,
    dir: tempfile::TempDir,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap_or_else(|e| panic!("no free port on 127.0.0.1: {e}"))
        .port()
}

impl Prometheus {
    /// Start Prometheus scraping `target` (its `/metrics`) every second, and wait until it is
    /// ready. Panics with Prometheus' log if it does not start.
    pub async fn start(target: SocketAddr) -> Self {
        let mut dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir for prometheus: {e}"));
        let config = dir.path().join("prometheus.yml");
        fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: gpu-manager\n    metrics_path: /metrics\n    \
                 static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .unwrap_or_else(|e| panic!("write {}: {e}", config.display()));
        let binary = tool("prometheus");
        // The free port may be taken between our probe and Prometheus' bind: try again then.
        let mut attempt = 0;
        loop {
            attempt += 1;
            let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
            let child = spawn(&binary, dir.path(), &config, addr);
            let mut prom = Self { child, addr, dir };
            match prom.wait_ready().await {
                Ok(()) => return prom,
                Err(log) if attempt < 3 && log.contains("address already in use") => {
                    dir = prom.into_dir();
                }
                Err(log) => panic!("prometheus did not become ready on {addr}:\n{log}"),
            }
        }
    }

    /// Stop the process and hand back the storage directory (for a retry).
    fn into_dir(mut self) -> tempfile::TempDir {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let placeholder = tempfile::TempDir::new().unwrap_or_else(|e| panic!("tempdir: {e}"));
        std::mem::replace(&mut self.dir, placeholder)
    }

    async fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("prometheus exited ({status}):\n{}", self.log()));
            }
            if http_get(self.addr, "/-/ready").await.is_some() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "not ready within {READY_TIMEOUT:?}:\n{}",
                    self.log()
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Where Prometheus' HTTP API listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Prometheus' log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// The scrape targets as `/api/v1/targets` shows them (for failure messages).
    pub async fn targets(&self) -> String {
        http_get(self.addr, "/api/v1/targets")
            .await
            .unwrap_or_default()
    }

    /// Run an instant query; the result vector (possibly empty), or `None` while Prometheus
    /// does not answer. Panics if Prometheus refuses the query.
    pub async fn query(&self, promql: &str) -> Option<Vec<serde_json::Value>> {
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

    /// How many series `promql` returns, waiting until it returns some (or `deadline`).
    pub async fn series(&self, promql: &str, deadline: Instant) -> usize {
        loop {
            let n = self.query(promql).await.map_or(0, |r| r.len());
            if n > 0 || Instant::now() > deadline {
                return n;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// The single value of `promql`, waiting until it has one; panics at `deadline` with the
    /// scrape targets and Prometheus' log.
    pub async fn value(&self, promql: &str, deadline: Instant) -> f64 {
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
                panic!(
                    "no value for {promql} in time\ntargets: {}\nprometheus log:\n{}",
                    self.targets().await,
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

fn spawn(binary: &Path, dir: &Path, config: &Path, addr: SocketAddr) -> Child {
    let log = dir.join("prometheus.log");
    let log_file = fs::File::create(&log).unwrap_or_else(|e| panic!("{}: {e}", log.display()));
    let err_file = log_file
        .try_clone()
        .unwrap_or_else(|e| panic!("{}: {e}", log.display()));
    Command::new(binary)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address={addr}"))
        .arg("--log.level=warn")
        .stdin(Stdio::null())
        .stdout(Stdio::from(log_file))
        .stderr(Stdio::from(err_file))
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()))
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Percent-encode a query parameter.
pub fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A plain HTTP/1.0 GET (no chunked encoding to deal with); the body of a 200 answer, `None`
/// for anything else (not listening, another status, a broken answer).
pub async fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
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
