//! The `gpu-admission` binary as an operator runs it.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{denial, fixture, HttpsClient, Pki};
use serde_json::json;

const BIN: &str = env!("CARGO_BIN_EXE_gpu-admission");

#[test]
fn crd_subcommand_prints_the_gpuquota_crd() {
    let out = Command::new(BIN).arg("crd").output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(text.trim(), gm_admission::crd_yaml().unwrap().trim());
}

#[test]
fn serve_without_certificates_fails_at_start_saying_what_is_needed() {
    let out = Command::new(BIN)
        .args(["serve", "--standalone", "--webhook-addr", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--tls-cert and --tls-key are required"),
        "{err}"
    );
}

#[test]
fn an_invalid_flag_value_names_the_flag_and_the_allowed_values() {
    let out = Command::new(BIN)
        .args(["serve", "--policy", "fastest"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--policy") && err.contains("binpack"), "{err}");
}

/// A free port on 127.0.0.1.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn standalone_serve_rejects_an_invalid_pod_over_https_and_stops_on_sigterm() {
    let pki = Pki::new();
    let port = free_port();
    let mut child = Child(
        Command::new(BIN)
            .args(["--log-format", "json", "serve", "--standalone"])
            .args(["--webhook-addr", &format!("127.0.0.1:{port}")])
            .arg("--tls-cert")
            .arg(&pki.cert_path)
            .arg("--tls-key")
            .arg(&pki.key_path)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(Instant::now() < deadline, "webhook did not start listening");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut client = HttpsClient::connect(addr, pki.ca_der()).await;
    let mut review = fixture("pod_create.json");
    review["request"]["object"]["spec"]["containers"][0]["resources"] = json!({
        "limits": {"tencent.com/vcuda-core": "150"}
    });
    let resp = client.review("/validate", &review).await;
    let msg = denial(&resp);
    assert!(
        msg.contains("tencent.com/vcuda-core=150 is invalid: use 1-99 for a share of one card or a multiple of 100 for whole cards"),
        "{msg}"
    );
    // SIGTERM: a clean exit.
    let pid = child.0.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            assert!(status.success(), "exit status {status}");
            break;
        }
        assert!(Instant::now() < deadline, "did not stop on SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut err = String::new();
    use std::io::Read;
    child
        .0
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(
        err.contains("\"level\":\"WARN\"") && err.contains("--standalone"),
        "{err}"
    );
}

#[test]
fn simulate_prints_one_json_object_with_the_documented_keys() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = dir.path().join("nodes.csv");
    let pods = dir.path().join("pods.csv");
    let mut n = String::from("sn,cpu_milli,memory_mib,gpu,model\n");
    // 100 cards and pods of a quarter, half or one card: every step moves the arrived
    // workload by at most 1 %, so both buckets (100 % and 130 %) have events.
    for i in 0..50 {
        n.push_str(&format!("node-{i},32000,131072,2,T4\n"));
    }
    std::fs::write(&nodes, n).unwrap();
    let mut p = String::from("name,cpu_milli,memory_mib,num_gpu,gpu_milli,gpu_spec\n");
    for i in 0..200 {
        let milli = [500, 1000, 250][i % 3];
        p.push_str(&format!("pod-{i},1000,1024,1,{milli},\n"));
    }
    std::fs::write(&pods, p).unwrap();
    let out = Command::new(BIN)
        .args([
            "simulate", "--policy", "best-fit", "--seeds", "42..43", "--json",
        ])
        .arg("--nodes")
        .arg(&nodes)
        .arg("--pods")
        .arg(&pods)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    assert_eq!(v["policy"], "best-fit");
    assert_eq!(v["seeds"], 2);
    for key in ["alloc_ratio_at_100", "alloc_ratio_at_130"] {
        let median = v[key]["median"].as_f64().unwrap();
        assert!((0.0..=100.0).contains(&median), "{key}: {median}");
        assert!(v[key]["mean"].is_number());
    }
    assert!(v["decision_us_p99"].as_f64().unwrap() >= 0.0);
}
