//! Runs `tests/progs/probe.c` against the fake driver, with or without libvcuda.so preloaded,
//! in a private fake device, config and state dir.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;

use gm_limiter_core::config::{CardLimit, Config, Mode};

use crate::support;

pub const MIB: u64 = 1 << 20;

/// The probe binary, compiled once per test process.
pub fn probe_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/progs/probe.c");
        support::compile_program("probe", &src, false)
    })
}

/// The probe linked directly against the fake `libcuda.so.1` (`-lcuda`).
pub fn linked_probe_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/progs/probe.c");
        support::compile_program("probe-linked", &src, true)
    })
}

/// The UUID the fake gives device 0 (read through the fake without the limiter).
pub fn fake_uuid() -> &'static str {
    static U: OnceLock<String> = OnceLock::new();
    U.get_or_init(|| {
        let p = Probe::new();
        let out = p.run_bare(&["uuid"]);
        out.get("uuid")
            .expect("the fake reports a UUID")
            .to_string()
    })
}

/// One probe setup.
#[derive(Debug)]
pub struct Probe {
    pub dir: tempfile::TempDir,
    cap: u64,
    cores: u32,
    core_limit: Option<u32>,
    physical: u64,
    config: Option<Vec<u8>>,
    write_config: bool,
    linked: bool,
    fake_state: Option<PathBuf>,
    extra_env: Vec<(String, String)>,
}

/// A probe's output: `key value` lines, plus stderr.
#[derive(Debug)]
pub struct Output {
    pub lines: Vec<(String, String)>,
    pub stderr: String,
    pub status: Option<i32>,
}

impl Output {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.lines
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
    pub fn all(&self, key: &str) -> Vec<&str> {
        self.lines
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect()
    }
    pub fn num(&self, key: &str) -> u64 {
        self.get(key)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no number {key} in {self:?}"))
    }
}

fn parse(stdout: &[u8], stderr: &[u8], status: Option<i32>) -> Output {
    let text = String::from_utf8_lossy(stdout);
    let lines = text
        .lines()
        .filter_map(|l| {
            // Keys may contain one space ("cuMemAlloc_v2 handle"): the value is the last word.
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.to_string()))
        })
        .collect();
    Output {
        lines,
        stderr: String::from_utf8_lossy(stderr).into_owned(),
        status,
    }
}

impl Default for Probe {
    fn default() -> Self {
        Self::new()
    }
}

impl Probe {
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("temp dir"),
            cap: 1024 * MIB,
            cores: 30,
            core_limit: None,
            physical: 8192 * MIB,
            config: None,
            write_config: true,
            linked: false,
            fake_state: None,
            extra_env: Vec::new(),
        }
    }
    pub fn cap(mut self, bytes: u64) -> Self {
        self.cap = bytes;
        self
    }
    pub fn share(mut self, cores: u32) -> Self {
        self.cores = cores;
        self
    }
    pub fn soft(mut self, limit: u32) -> Self {
        self.core_limit = Some(limit);
        self
    }
    pub fn physical(mut self, bytes: u64) -> Self {
        self.physical = bytes;
        self
    }
    /// Share the fake device of another setup (several containers on one card).
    pub fn fake_state(mut self, path: &Path) -> Self {
        self.fake_state = Some(path.to_path_buf());
        self
    }
    /// Use the probe linked against the driver instead of the dlopen one.
    pub fn linked(mut self) -> Self {
        self.linked = true;
        self
    }
    pub fn no_config(mut self) -> Self {
        self.write_config = false;
        self
    }
    pub fn corrupt_config(mut self, bytes: &[u8]) -> Self {
        self.config = Some(bytes.to_vec());
        self
    }
    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.extra_env.push((k.into(), v.into()));
        self
    }
    pub fn config_path(&self) -> String {
        self.dir.path().join("vcuda.cfg").display().to_string()
    }
    pub fn state_file(&self) -> PathBuf {
        self.fake_state
            .clone()
            .unwrap_or_else(|| self.dir.path().join("fakegpu.state"))
    }

    /// The encoded config this probe would write.
    pub fn config_bytes(&self) -> Vec<u8> {
        let uuid = fake_uuid().to_string();
        Config {
            mode: if self.core_limit.is_some() {
                Mode::Soft
            } else {
                Mode::Hard
            },
            incomplete: false,
            pod_uid: "5b7c1d2e-0000-4000-8000-000000000001".into(),
            namespace: "ml".into(),
            container: "main".into(),
            cards: vec![CardLimit {
                index: 0,
                minor: 0,
                uuid,
                cores: self.cores,
                core_limit: self.core_limit.unwrap_or(self.cores),
                memory_limit: self.cap,
            }],
        }
        .encode()
        .expect("a valid config")
    }

    fn command(&self, preload: bool, args: &[&str]) -> Command {
        let mut c = Command::new(if self.linked {
            linked_probe_bin()
        } else {
            probe_bin()
        });
        c.args(args);
        let fakes = support::fake_cuda()
            .parent()
            .expect("fake dir")
            .to_path_buf();
        c.env("LD_LIBRARY_PATH", &fakes)
            .env("FAKEGPU_STATE", self.state_file())
            .env("FAKEGPU_MEM_BYTES", self.physical.to_string())
            .env("VCUDA_REAL_CUDA", support::fake_cuda())
            .env("VCUDA_REAL_NVML", support::fake_nvml())
            .env("VCUDA_STATE_DIR", self.dir.path())
            .env_remove("VCUDA_CFG")
            .env_remove("LD_PRELOAD");
        for (k, v) in &self.extra_env {
            c.env(k, v);
        }
        if preload {
            c.env("LD_PRELOAD", support::limiter_so());
            if self.write_config {
                let path = self.config_path();
                if !Path::new(&path).exists() {
                    let bytes = self.config.clone().unwrap_or_else(|| self.config_bytes());
                    std::fs::write(&path, bytes).expect("write config");
                }
                c.env("VCUDA_CFG", path);
            }
        }
        c.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    }

    /// Compile the probe, learn the fake's UUID and write the config now, so a timed run that
    /// follows starts at once.
    pub fn prepare(self) -> Self {
        let _ = probe_bin();
        let _ = fake_uuid();
        let _ = self.command(true, &["idle"]);
        self
    }

    /// Run with the limiter preloaded.
    pub fn run(&self, args: &[&str]) -> Output {
        let out = self.command(true, args).output().expect("run probe");
        parse(&out.stdout, &out.stderr, out.status.code())
    }

    /// Run without the limiter (the baseline).
    pub fn run_bare(&self, args: &[&str]) -> Output {
        let out = self.command(false, args).output().expect("run probe");
        parse(&out.stdout, &out.stderr, out.status.code())
    }

    /// Start with the limiter preloaded, without waiting.
    pub fn spawn(&self, args: &[&str]) -> Child {
        self.command(true, args).spawn().expect("spawn probe")
    }

    /// Collect a spawned probe.
    pub fn wait(child: Child) -> Output {
        let out = child.wait_with_output().expect("wait probe");
        parse(&out.stdout, &out.stderr, out.status.code())
    }
}
