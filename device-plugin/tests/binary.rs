//! The real `gpu-manager` binary: the quick-start command registers with a (fake) kubelet and
//! stops cleanly on SIGTERM; bad input fails at start with a message naming what is wrong.

mod support;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

const BIN: &str = env!("CARGO_BIN_EXE_gpu-manager");

fn base_args(root: &std::path::Path) -> Vec<String> {
    [
        "--node-name",
        "node-a",
        "--kubelet-dir",
        &root.join("device-plugins").to_string_lossy(),
        "--pod-resources-socket",
        &root.join("pod-resources/kubelet.sock").to_string_lossy(),
        "--checkpoint-dir",
        &root.join("checkpoint").to_string_lossy(),
        "--limiter-dir",
        &root.join("vcuda").to_string_lossy(),
        "--metrics-addr",
        "127.0.0.1:0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn run_to_end(args: &[String]) -> (i32, String) {
    let out = Command::new(BIN)
        .args(args)
        .env_remove("NODE_NAME")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_quick_start_command_registers_and_stops_cleanly_on_sigterm() {
    let root = tempfile::tempdir().unwrap();
    let kubelet = FakeKubelet::start(&root.path().join("device-plugins")).await;
    let mut args = base_args(root.path());
    args.extend(
        [
            "--backend",
            "simulated",
            "--node-file",
            example_node("h100-sxm-8.yaml").to_str().unwrap(),
            "--standalone",
        ]
        .map(String::from),
    );
    let mut child = Command::new(BIN)
        .args(&args)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let regs = kubelet.wait_registrations(2).await;
    let mut names: Vec<&str> = regs
        .iter()
        .map(|r| r.request.resource_name.as_str())
        .collect();
    names.sort();
    assert_eq!(names, [CORE, MEMORY]);
    let devices = kubelet
        .wait_devices(CORE, STEP, |m| m.devices.len() == 800)
        .await;
    assert_eq!(devices.devices.len(), 800);

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let t = Instant::now();
    let exit = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(t.elapsed() < STEP, "gpu-manager did not stop on SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(exit.success(), "{stderr}");
    for want in [
        "on node \"node-a\": backend simulated, standalone",
        "cards: 8 x NVIDIA H100 80GB HBM3 (81559 MiB)",
        "devices: 800 x tencent.com/vcuda-core, 2544 x tencent.com/vcuda-memory",
        "sockets: vcore.sock and vmemory.sock in",
        "registered with the kubelet",
    ] {
        assert!(stderr.contains(want), "missing {want:?} in:\n{stderr}");
    }
    let dir = root.path().join("device-plugins");
    assert!(!dir.join("vcore.sock").exists() && !dir.join("vmemory.sock").exists());
    assert!(root
        .path()
        .join("checkpoint/gpu-manager.checkpoint.json")
        .exists());
}

#[test]
fn a_bad_node_file_fails_at_start_naming_the_file_and_line() {
    let root = tempfile::tempdir().unwrap();
    let file = root.path().join("bad-node.yaml");
    std::fs::write(
        &file,
        "cards:\n  - {uuid: GPU-a, model: T4, memoryMiB: 15360, minor: 0}\n  - {uuid: GPU-b, model: T4, memoryMiB: 15360, minor: 0}\n",
    )
    .unwrap();
    let mut args = base_args(root.path());
    args.extend(
        [
            "--backend",
            "simulated",
            "--node-file",
            file.to_str().unwrap(),
            "--standalone",
        ]
        .map(String::from),
    );
    let (code, stderr) = run_to_end(&args);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("bad-node.yaml"), "{stderr}");
    assert!(stderr.contains("line 3"), "{stderr}");
    assert!(stderr.contains("minor 0 is already used"), "{stderr}");

    let missing = root.path().join("nowhere.yaml");
    let mut args = base_args(root.path());
    args.extend(
        [
            "--backend",
            "simulated",
            "--node-file",
            missing.to_str().unwrap(),
            "--standalone",
        ]
        .map(String::from),
    );
    let (code, stderr) = run_to_end(&args);
    assert_eq!(code, 1);
    assert!(
        stderr.contains("cannot read node file") && stderr.contains("nowhere.yaml"),
        "{stderr}"
    );
}

#[test]
fn bad_flags_fail_at_start_with_the_allowed_values() {
    let root = tempfile::tempdir().unwrap();
    let mut args = base_args(root.path());
    args.extend(["--backend", "gpu"].map(String::from));
    let (code, stderr) = run_to_end(&args);
    assert_eq!(code, 2, "clap's usage error code");
    assert!(
        stderr.contains("'gpu'") && stderr.contains("nvml") && stderr.contains("simulated"),
        "{stderr}"
    );

    let mut args = base_args(root.path());
    args.extend(["--backend", "simulated"].map(String::from));
    let (code, stderr) = run_to_end(&args);
    assert_eq!(code, 1);
    assert!(
        stderr.contains("--backend simulated needs --node-file"),
        "{stderr}"
    );

    // Flags are also read from the environment.
    let out = Command::new(BIN)
        .args(base_args(root.path()))
        .env("GPU_MANAGER_POLICY", "fastest")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr.contains("binpack, spread or topology"), "{stderr}");
}
