//! `scripts/quickstart.sh --once` with prebuilt binaries (`--bin-dir`): it starts gpu-manager on
//! the simulated 8 x H100 node and kubelet-sim with the demo pods, prints the allocations,
//! `/usage` and the four TKEStack families, then stops both processes and removes its
//! temporary directory. Bad input stops it before anything starts, with a message.
//!
//! kubelet-sim is this package's binary. gpu-manager belongs to gm-device-plugin: the copy next
//! to kubelet-sim is used when it is newer than every source it is built from (as after
//! `cargo test --workspace`), otherwise it is built first with `cargo build`.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime};

const KUBELET_SIM: &str = env!("CARGO_BIN_EXE_kubelet-sim");

fn script() -> PathBuf {
    gm_testkit::repo_root().join("scripts/quickstart.sh")
}

/// The newest modification time of the files under `dir`.
fn newest(dir: &Path) -> SystemTime {
    let mut t = SystemTime::UNIX_EPOCH;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return std::fs::metadata(dir)
            .and_then(|m| m.modified())
            .unwrap_or(t);
    };
    for e in entries.flatten() {
        let p = e.path();
        let m = if p.is_dir() {
            newest(&p)
        } else {
            e.metadata()
                .and_then(|m| m.modified())
                .unwrap_or(SystemTime::UNIX_EPOCH)
        };
        t = t.max(m);
    }
    t
}

/// A gpu-manager binary built from the current sources.
fn gpu_manager() -> PathBuf {
    let sim = PathBuf::from(KUBELET_SIM);
    let profile_dir = sim.parent().unwrap_or_else(|| Path::new("."));
    let candidate = profile_dir.join("gpu-manager");
    let root = gm_testkit::repo_root();
    let sources = [
        "device-plugin",
        "metrics",
        "core",
        "backend",
        "proto",
        "Cargo.lock",
    ]
    .iter()
    .map(|p| newest(&root.join(p)))
    .max()
    .unwrap_or(SystemTime::UNIX_EPOCH);
    let built = std::fs::metadata(&candidate).and_then(|m| m.modified());
    if built.is_ok_and(|b| b >= sources) {
        return candidate;
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&root).args([
        "build",
        "-p",
        "gm-device-plugin",
        "--bin",
        "gpu-manager",
        "--message-format=json-render-diagnostics",
    ]);
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("cannot run cargo to build gpu-manager: {e}"));
    assert!(out.status.success(), "building gpu-manager failed");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"]["name"] == "gpu-manager")
        .find_map(|v| v["executable"].as_str().map(PathBuf::from))
        .unwrap_or_else(|| panic!("cargo built no gpu-manager executable"))
}

/// A directory with both binaries and a stand-in libvcuda.so (kubelet-sim runs no containers,
/// so gpu-manager only installs it and names it in the mounts), as `--bin-dir` wants it.
fn bin_dir(under: &Path) -> PathBuf {
    let dir = under.join("bin");
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    for (name, target) in [
        ("gpu-manager", gpu_manager()),
        ("kubelet-sim", KUBELET_SIM.into()),
    ] {
        std::os::unix::fs::symlink(&target, dir.join(name))
            .unwrap_or_else(|e| panic!("symlink {}: {e}", target.display()));
    }
    std::fs::write(dir.join("libvcuda.so"), b"\x7fELF stand-in for libvcuda.so")
        .unwrap_or_else(|e| panic!("libvcuda.so: {e}"));
    dir
}

/// Run the script with `args`, its temporary directories under `tmp`; fails the test if it
/// does not finish within `limit`.
fn run(args: &[&str], tmp: &Path, limit: Duration) -> Output {
    let mut child = Command::new("bash")
        .arg(script())
        .args(args)
        .env("TMPDIR", tmp)
        .env_remove("GM_QUICKSTART_METRICS_PORT")
        .env_remove("GM_QUICKSTART_BIN_DIR")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script().display()));
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() > deadline => {
                let _ = child.kill();
                let out = child.wait_with_output().ok();
                panic!(
                    "quickstart.sh did not finish within {limit:?}; output: {:?}",
                    out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                );
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => panic!("waiting for quickstart.sh: {e}"),
        }
    }
    child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("quickstart.sh output: {e}"))
}

/// The number after `prefix` in `text` (e.g. a pid).
fn number_after(text: &str, prefix: &str) -> u32 {
    let start = text
        .find(prefix)
        .unwrap_or_else(|| panic!("no {prefix:?} in the output:\n{text}"))
        + prefix.len();
    text[start..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .unwrap_or_else(|e| panic!("{prefix:?} is not followed by a number: {e}"))
}

#[test]
fn the_quick_start_admits_the_demo_pods_shows_their_families_and_cleans_up() {
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let bins = bin_dir(tmp.path());
    let scratch = tmp.path().join("tmp");
    std::fs::create_dir_all(&scratch).unwrap_or_else(|e| panic!("{e}"));
    let out = run(
        &[
            "--once",
            "--metrics-port",
            "0",
            "--bin-dir",
            &bins.to_string_lossy(),
        ],
        &scratch,
        Duration::from_secs(90),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "quickstart.sh failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    // The allocations, as kubelet-sim saw them.
    assert!(stdout.contains("pod demo/train admitted"), "{stdout}");
    assert!(stdout.contains("4 of 4 pods admitted"), "{stdout}");
    assert!(
        stdout.contains("container main: cards 2,3; tencent.com/vcuda-core 200"),
        "{stdout}"
    );
    assert!(stdout.contains("limiter mount: "), "{stdout}");
    // The share of demo/train gets the limiter; its state directory is the one read-write mount.
    for m in [
        "-> /etc/vcuda (read-only)",
        "-> /usr/local/vcuda/libvcuda.so (read-only)",
        "/ld.so.preload -> /etc/ld.so.preload (read-only)",
        "-> /run/vcuda (read-write)",
    ] {
        assert!(stdout.contains(m), "no {m:?} in:\n{stdout}");
    }
    // /usage of the daemon.
    assert!(stdout.contains("node:           gpu-node-1"), "{stdout}");
    // The four families, with the TKEStack example's request values.
    let labels =
        "{pod_name=\"train\",namespace=\"demo\",node=\"gpu-node-1\",container_name=\"main\"";
    for line in [
        format!("container_request_gpu_utilization{labels},req_of_gpu=\"total\"}} 0.3"),
        format!("container_request_gpu_memory{labels},req_of_gpu_memory=\"total\"}} 5120"),
        format!("container_gpu_utilization{labels},gpu=\"gpu0\"}} 0"),
        format!("container_gpu_memory_total{labels},gpu_memory=\"total\"}} 0"),
    ] {
        assert!(
            stdout.lines().any(|l| l == line),
            "no line {line:?} in:\n{stdout}"
        );
    }
    // Both processes are gone and the temporary directory is removed.
    assert!(
        stdout.contains("quickstart: stopped gpu-manager and kubelet-sim"),
        "{stdout}"
    );
    for name in ["kubelet-sim pid ", "gpu-manager pid "] {
        let pid = number_after(&stdout, name);
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "{name}{pid} is still running"
        );
    }
    let left: Vec<_> = std::fs::read_dir(&scratch)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn bad_input_and_a_busy_port_stop_the_quick_start_before_anything_starts() {
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let busy = TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("bind: {e}"));
    let port = busy
        .local_addr()
        .unwrap_or_else(|e| panic!("{e}"))
        .port()
        .to_string();
    let missing = tmp.path().join("no-such-dir");
    let missing = missing.to_string_lossy();
    let cases: [(&[&str], String); 4] = [
        (
            &["--metrics-port", &port, "--bin-dir", &missing],
            format!("port {port} on 127.0.0.1 is in use"),
        ),
        (
            &["--metrics-port", "http"],
            "--metrics-port 'http' is not a port number".into(),
        ),
        (&["--fast"], "unknown argument '--fast'".into()),
        (
            &["--metrics-port", "0", "--bin-dir", &missing],
            format!("{missing}/gpu-manager does not exist"),
        ),
    ];
    for (args, message) in cases {
        let out = run(args, tmp.path(), Duration::from_secs(30));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains(&message), "{args:?}: {stderr}");
    }
    let left: Vec<_> = std::fs::read_dir(tmp.path())
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "left behind: {left:?}");
    drop(busy);
}
