//! Test support for the limiter's integration tests: builds the fake driver libraries
//! (`limiter/fakes/`: a fake `libcuda.so.1` and `libnvidia-ml.so.1` over one simulated device
//! shared by processes through a state file), compiles C test programs, finds the
//! `libvcuda.so` cargo built, and reads the fakes' shared state (memory per pid, the ring of
//! kernel executions) back in Rust.
//!
//! The fakes' behaviour and environment variables are documented at the top of
//! `limiter/fakes/fakegpu.h`, `fake_cuda.c`, `fake_cuda_exec.c` and `fake_nvml.c`.

#![allow(dead_code)]

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use tempfile::TempDir;

/// `limiter/fakes`: the fakes' sources and the C headers test programs include
/// (`cuda_api.h`, `nvml_api.h`, `fakegpu.h`).
pub fn fakes_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fakes")
}

/// `limiter/tests/progs`: C test programs.
pub fn progs_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/progs")
}

const CUDA_SOURCES: &[&str] = &[
    "fake_cuda.c",
    "fake_cuda_mem.c",
    "fake_cuda_exec.c",
    "fake_cuda_graph.c",
    "fake_cuda_procaddr.c",
    "fakegpu_state.c",
];
const NVML_SOURCES: &[&str] = &["fake_nvml.c", "fakegpu_state.c"];

/// One directory per test process for the fakes and the compiled programs.
fn build_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir =
            Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("fakegpu-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        dir
    })
}

fn cc() -> String {
    std::env::var("CC").unwrap_or_else(|_| "cc".to_string())
}

/// Run the C compiler; Err with its diagnostics (or a hint when there is no compiler).
fn run_cc(args: &[std::ffi::OsString]) -> Result<(), String> {
    let cc = cc();
    let out = Command::new(&cc).args(args).output().map_err(|e| {
        format!(
            "the limiter tests need a C compiler to build the fake CUDA driver and test \
             programs, but `{cc}` could not be run ({e}): install gcc or set CC"
        )
    })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`{cc} {}` failed:\n{}{}",
            args.iter()
                .map(|a| a.to_string_lossy())
                .collect::<Vec<_>>()
                .join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn build_fake(soname: &str, sources: &[&str]) -> Result<PathBuf, String> {
    let out = build_dir().join(soname);
    let mut args: Vec<std::ffi::OsString> = [
        "-std=gnu11",
        "-shared",
        "-fPIC",
        "-O2",
        "-Wall",
        "-Wextra",
        "-Werror",
        "-Wl,--no-undefined",
        // The fakes hand out their own addresses from cuGetProcAddress even when a preloaded
        // library exports the same names.
        "-Wl,-Bsymbolic",
    ]
    .iter()
    .map(Into::into)
    .collect();
    args.push(format!("-Wl,-soname,{soname}").into());
    args.push("-o".into());
    args.push(out.clone().into());
    for s in sources {
        args.push(fakes_dir().join(s).into());
    }
    args.push("-lpthread".into());
    run_cc(&args)?;
    Ok(out)
}

/// The fake `libcuda.so.1` (soname `libcuda.so.1`), compiled once per test process, with a
/// `libcuda.so` link beside it for `-lcuda`.
pub fn fake_cuda() -> &'static Path {
    static LIB: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let lib = LIB.get_or_init(|| {
        let lib = build_fake("libcuda.so.1", CUDA_SOURCES)?;
        let link = build_dir().join("libcuda.so");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink("libcuda.so.1", &link)
            .map_err(|e| format!("cannot link {}: {e}", link.display()))?;
        Ok(lib)
    });
    match lib {
        Ok(p) => p,
        Err(e) => panic!("{e}"),
    }
}

/// The fake `libnvidia-ml.so.1` (soname `libnvidia-ml.so.1`), compiled once per test process.
pub fn fake_nvml() -> &'static Path {
    static LIB: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match LIB.get_or_init(|| build_fake("libnvidia-ml.so.1", NVML_SOURCES)) {
        Ok(p) => p,
        Err(e) => panic!("{e}"),
    }
}

/// The directory holding both fakes (for `LD_LIBRARY_PATH`); builds them.
pub fn fake_lib_dir() -> &'static Path {
    fake_cuda();
    fake_nvml();
    build_dir()
}

/// Compile the C program `src` into this test process's build directory as `name` (once per
/// name and process), with `-I limiter/fakes`, `-ldl -lpthread`, and, if `link_fake_cuda`,
/// linked against the fake (`-L dir -Wl,--no-as-needed -lcuda -Wl,-rpath,dir`).
pub fn compile_program(name: &str, src: &Path, link_fake_cuda: bool) -> PathBuf {
    static BUILT: Mutex<Vec<(String, PathBuf)>> = Mutex::new(Vec::new());
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, p)) = built.iter().find(|(n, _)| n == name) {
        return p.clone();
    }
    let out = build_dir().join(name);
    let mut args: Vec<std::ffi::OsString> = ["-std=gnu11", "-O2", "-Wall", "-Wextra", "-Werror"]
        .iter()
        .map(Into::into)
        .collect();
    args.push(format!("-I{}", fakes_dir().display()).into());
    args.push("-o".into());
    args.push(out.clone().into());
    args.push(src.into());
    if link_fake_cuda {
        fake_cuda();
        let dir = build_dir();
        args.push(format!("-L{}", dir.display()).into());
        // A program may reference the driver only weakly (to tell whether it was linked);
        // it must still get DT_NEEDED libcuda.so.1 where the toolchain defaults to as-needed.
        args.push("-Wl,--no-as-needed".into());
        args.push("-lcuda".into());
        args.push(format!("-Wl,-rpath,{}", dir.display()).into());
    }
    args.push("-ldl".into());
    args.push("-lpthread".into());
    if let Err(e) = run_cc(&args) {
        panic!("{e}");
    }
    built.push((name.to_string(), out.clone()));
    out
}

/// The `libvcuda.so` cargo built for this test run (`target/<profile>/deps/libvcuda.so`, next
/// to the test binary).
pub fn limiter_so() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    let deps = exe.parent().expect("the test binary's directory");
    for dir in [deps, deps.parent().unwrap_or(deps)] {
        let so = dir.join("libvcuda.so");
        if so.exists() {
            return so;
        }
    }
    panic!(
        "libvcuda.so is not in {} (nor its parent): cargo builds it for integration tests of \
         gm-limiter (crate-type cdylib); run the tests with `cargo test -p gm-limiter`",
        deps.display()
    );
}

/// CLOCK_MONOTONIC in nanoseconds: the fakes' model clock.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_MONOTONIC)");
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Layout of the shared state file (`limiter/fakes/fakegpu.h`; pinned by the self-test
/// against the C compiler's offsets).
pub mod layout {
    pub const MAGIC: u64 = 0x3155_5047_454b_4146;
    pub const VERSION: u64 = 1;
    pub const MAX_DEVICES: usize = 4;
    pub const MAX_PROCS: usize = 256;
    pub const RING_SIZE: usize = 65536;
    pub const OFF_VERSION: usize = 8;
    pub const OFF_SIZE: usize = 16;
    pub const OFF_DEVICE_COUNT: usize = 24;
    pub const OFF_REALTIME_OFFSET: usize = 40;
    pub const OFF_DEVICES: usize = 64;
    pub const DEVICE_SIZE: usize = 192;
    pub const DEV_USED_BYTES: usize = 112;
    pub const DEV_DEVICE_FREE_AT: usize = 128;
    pub const OFF_PROCS: usize = OFF_DEVICES + MAX_DEVICES * DEVICE_SIZE;
    pub const PROC_SIZE: usize = 72;
    pub const PROC_USED: usize = 8;
    pub const PROC_CONTEXTS: usize = 40;
    pub const OFF_RING_WRITE: usize = OFF_PROCS + MAX_PROCS * PROC_SIZE;
    pub const OFF_RING: usize = OFF_RING_WRITE + 64;
    pub const ENTRY_SIZE: usize = 32;
    pub const STATE_SIZE: usize = OFF_RING + RING_SIZE * ENTRY_SIZE;
    pub const PID_RECLAIMING: u64 = u64::MAX;
}

/// One kernel execution from the ring, in model time (CLOCK_MONOTONIC ns).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelRun {
    pub pid: u32,
    pub device: u32,
    pub start_ns: u64,
    pub end_ns: u64,
}

/// A read-only mapping of an initialised state file.
#[derive(Debug)]
struct StateMap {
    ptr: *const u8,
    len: usize,
}

impl StateMap {
    /// None when the file does not exist yet or is not an initialised state of this layout.
    fn open(path: &Path) -> Option<StateMap> {
        let file = File::open(path).ok()?;
        let len = file.metadata().ok()?.len() as usize;
        if len != layout::STATE_SIZE {
            return None;
        }
        // SAFETY: mapping a regular file we opened, read-only and shared, over its whole
        // length; the fd may be closed afterwards (the mapping keeps the file).
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return None;
        }
        let map = StateMap {
            ptr: ptr as *const u8,
            len,
        };
        (map.u64(0) == layout::MAGIC
            && map.u64(layout::OFF_VERSION) == layout::VERSION
            && map.u64(layout::OFF_SIZE) == layout::STATE_SIZE as u64)
            .then_some(map)
    }

    fn atomic(&self, off: usize) -> &AtomicU64 {
        assert!(
            off.is_multiple_of(8) && off + 8 <= self.len,
            "offset {off} outside the state"
        );
        // SAFETY: in bounds and 8-byte aligned (mmap is page aligned, offsets are multiples of
        // 8); the C side only accesses these words as lock-free 64-bit atomics, and the
        // mapping lives as long as `self`.
        unsafe { &*(self.ptr.add(off) as *const AtomicU64) }
    }

    fn u64(&self, off: usize) -> u64 {
        self.atomic(off).load(Ordering::Acquire)
    }

    fn device_count(&self) -> usize {
        (self.u64(layout::OFF_DEVICE_COUNT) as usize).min(layout::MAX_DEVICES)
    }

    fn ring(&self) -> Vec<KernelRun> {
        let w = self.u64(layout::OFF_RING_WRITE);
        let lo = w.saturating_sub(layout::RING_SIZE as u64);
        let mut runs = Vec::new();
        for idx in lo..w {
            let base = layout::OFF_RING + (idx as usize % layout::RING_SIZE) * layout::ENTRY_SIZE;
            let seq = self.atomic(base).load(Ordering::Acquire);
            let pid_dev = self.atomic(base + 8).load(Ordering::Relaxed);
            let start_ns = self.atomic(base + 16).load(Ordering::Relaxed);
            let end_ns = self.atomic(base + 24).load(Ordering::Relaxed);
            std::sync::atomic::fence(Ordering::Acquire);
            if seq != idx + 1 || self.atomic(base).load(Ordering::Relaxed) != seq {
                continue; // overwritten or being written
            }
            runs.push(KernelRun {
                pid: pid_dev as u32,
                device: (pid_dev >> 32) as u32,
                start_ns,
                end_ns,
            });
        }
        runs
    }
}

impl Drop for StateMap {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping made in `open`, which nothing borrows any more.
        unsafe {
            libc::munmap(self.ptr as *mut libc::c_void, self.len);
        }
    }
}

fn pid_alive(pid: u64) -> bool {
    if pid == 0 || pid > i32::MAX as u64 {
        return false;
    }
    // SAFETY: kill with signal 0 only checks whether the process exists.
    let rc = unsafe { libc::kill(pid as libc::pid_t, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

/// Every environment variable the fakes read (removed from child commands unless set here).
const FAKEGPU_VARS: &[&str] = &[
    "FAKEGPU_STATE",
    "FAKEGPU_DEVICES",
    "FAKEGPU_SMS",
    "FAKEGPU_THREADS_PER_SM",
    "FAKEGPU_MEM_BYTES",
    "FAKEGPU_CTX_OVERHEAD",
    "FAKEGPU_DRIVER_VERSION",
    "FAKEGPU_PID_OFFSET",
    "FAKEGPU_SAMPLE_PERIOD_US",
    "FAKEGPU_SAMPLE_DELAY_US",
    "FAKEGPU_SAMPLE_NOISE",
    "FAKEGPU_PROCESS_UTIL_UNSUPPORTED",
    "FAKEGPU_PROCESSES_UTIL_INFO_UNSUPPORTED",
    "FAKEGPU_DRIVER_STRING",
];

/// A simulated set of GPUs: a state file in a temporary directory plus the profile and NVML
/// settings the fakes read from the environment. The first process that loads a fake creates
/// and initialises the file from these variables; pass [`FakeGpu::env`] (or
/// [`FakeGpu::apply`]) to every process of one test.
#[derive(Debug)]
pub struct FakeGpu {
    dir: TempDir,
    state: PathBuf,
    vars: Vec<(String, String)>,
}

impl Default for FakeGpu {
    fn default() -> Self {
        Self::new()
    }
}

impl FakeGpu {
    /// One device with the default profile (132 SMs, 2048 threads per SM, 140 GiB).
    pub fn new() -> FakeGpu {
        let dir = tempfile::Builder::new()
            .prefix("fakegpu-")
            .tempdir()
            .expect("a temporary dir");
        let state = dir.path().join("fakegpu.state");
        FakeGpu {
            dir,
            state,
            vars: Vec::new(),
        }
    }

    fn set(mut self, key: &str, value: impl ToString) -> FakeGpu {
        self.vars.retain(|(k, _)| k != key);
        self.vars.push((key.to_string(), value.to_string()));
        self
    }

    pub fn devices(self, n: u32) -> FakeGpu {
        self.set("FAKEGPU_DEVICES", n)
    }
    pub fn sms(self, n: u32) -> FakeGpu {
        self.set("FAKEGPU_SMS", n)
    }
    pub fn threads_per_sm(self, n: u32) -> FakeGpu {
        self.set("FAKEGPU_THREADS_PER_SM", n)
    }
    pub fn mem_bytes(self, bytes: u64) -> FakeGpu {
        self.set("FAKEGPU_MEM_BYTES", bytes)
    }
    pub fn ctx_overhead(self, bytes: u64) -> FakeGpu {
        self.set("FAKEGPU_CTX_OVERHEAD", bytes)
    }
    pub fn driver_version(self, v: u32) -> FakeGpu {
        self.set("FAKEGPU_DRIVER_VERSION", v)
    }
    pub fn sample_period_us(self, us: u64) -> FakeGpu {
        self.set("FAKEGPU_SAMPLE_PERIOD_US", us)
    }
    pub fn sample_delay_us(self, us: u64) -> FakeGpu {
        self.set("FAKEGPU_SAMPLE_DELAY_US", us)
    }
    /// ±k percentage points of deterministic noise on every process-utilisation sample.
    pub fn sample_noise(self, k: u32) -> FakeGpu {
        self.set("FAKEGPU_SAMPLE_NOISE", k)
    }
    /// Added to every pid NVML reports (a container's processes seen from the host).
    pub fn pid_offset(self, offset: u32) -> FakeGpu {
        self.set("FAKEGPU_PID_OFFSET", offset)
    }
    /// nvmlDeviceGetProcessUtilization answers NVML_ERROR_NOT_SUPPORTED.
    pub fn process_util_unsupported(self, yes: bool) -> FakeGpu {
        self.set("FAKEGPU_PROCESS_UTIL_UNSUPPORTED", u8::from(yes))
    }
    /// nvmlDeviceGetProcessesUtilizationInfo answers NVML_ERROR_NOT_SUPPORTED.
    pub fn processes_util_info_unsupported(self, yes: bool) -> FakeGpu {
        self.set("FAKEGPU_PROCESSES_UTIL_INFO_UNSUPPORTED", u8::from(yes))
    }

    /// The state file (created by the first process that loads a fake).
    pub fn state_path(&self) -> &Path {
        &self.state
    }

    /// A scratch directory that lives as long as this device.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// FAKEGPU_STATE and every setting made with the builder methods.
    pub fn env(&self) -> Vec<(String, String)> {
        let mut env = vec![(
            "FAKEGPU_STATE".to_string(),
            self.state.display().to_string(),
        )];
        env.extend(self.vars.iter().cloned());
        env
    }

    /// Put [`FakeGpu::env`] on a command, removing the fakes' other variables it would inherit.
    pub fn apply<'a>(&self, cmd: &'a mut Command) -> &'a mut Command {
        for v in FAKEGPU_VARS {
            cmd.env_remove(v);
        }
        cmd.envs(self.env())
    }

    fn map(&self) -> Option<StateMap> {
        StateMap::open(&self.state)
    }

    /// Every kernel execution still in the ring, oldest first.
    pub fn kernel_runs(&self) -> Vec<KernelRun> {
        self.map().map(|m| m.ring()).unwrap_or_default()
    }

    /// Busy time per pid (real pids, all devices) of kernels overlapping [from_ns, to_ns).
    pub fn busy_ns_by_pid(&self, from_ns: u64, to_ns: u64) -> HashMap<u32, u64> {
        let mut busy = HashMap::new();
        for r in self.kernel_runs() {
            let (a, b) = (r.start_ns.max(from_ns), r.end_ns.min(to_ns));
            if b > a {
                *busy.entry(r.pid).or_insert(0) += b - a;
            }
        }
        busy
    }

    /// Device bytes charged to each live pid, summed over devices.
    pub fn used_bytes_by_pid(&self) -> HashMap<u32, u64> {
        let mut used = HashMap::new();
        for d in 0..layout::MAX_DEVICES {
            for (pid, bytes) in self.used_bytes_by_pid_on(d) {
                *used.entry(pid).or_insert(0) += bytes;
            }
        }
        used
    }

    /// Device bytes charged to each live pid on one device (pids with nothing there omitted).
    pub fn used_bytes_by_pid_on(&self, device: usize) -> HashMap<u32, u64> {
        let mut used = HashMap::new();
        let Some(m) = self.map() else { return used };
        if device >= m.device_count() {
            return used;
        }
        for i in 0..layout::MAX_PROCS {
            let base = layout::OFF_PROCS + i * layout::PROC_SIZE;
            let pid = m.u64(base);
            if pid == 0 || pid == layout::PID_RECLAIMING || !pid_alive(pid) {
                continue;
            }
            let bytes = m.u64(base + layout::PROC_USED + 8 * device);
            if bytes > 0 {
                *used.entry(pid as u32).or_insert(0) += bytes;
            }
        }
        used
    }

    /// The device's charged bytes as the fakes' allocator sees them (dead processes' bytes
    /// included until a fake reclaims them).
    pub fn device_used_bytes(&self, device: usize) -> u64 {
        self.map()
            .map(|m| {
                m.u64(layout::OFF_DEVICES + device * layout::DEVICE_SIZE + layout::DEV_USED_BYTES)
            })
            .unwrap_or(0)
    }

    /// Model time at which the device's last queued kernel ends.
    pub fn device_free_at_ns(&self, device: usize) -> u64 {
        self.map()
            .map(|m| {
                m.u64(
                    layout::OFF_DEVICES + device * layout::DEVICE_SIZE + layout::DEV_DEVICE_FREE_AT,
                )
            })
            .unwrap_or(0)
    }

    /// NVML's timestamp (epoch µs, as the fake NVML computes it) for a model time.
    pub fn sample_timestamp_us(&self, mono_ns: u64) -> u64 {
        let offset = self
            .map()
            .map(|m| m.u64(layout::OFF_REALTIME_OFFSET) as i64)
            .unwrap_or(0);
        ((mono_ns as i64 + offset) / 1000) as u64
    }
}
