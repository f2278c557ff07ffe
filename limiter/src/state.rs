//! Initialisation, run once at the first CUDA or NVML symbol (never at load): find the config,
//! open the real driver, map the shared region, register the fork handler.
//!
//! | config (`/etc/vcuda/vcuda.cfg`, or `$VCUDA_CFG` when that file does not exist) | mode |
//! |---|---|
//! | absent | **inert**: every hook forwards unchanged |
//! | present and valid | **active**: memory cap and compute share enforced |
//! | present but unreadable, invalid, of an unknown version, or incomplete | **refusing**: one line on stderr naming the file and the problem; `cuInit` and every hooked allocation or launch fail, so the container never runs unlimited by accident |
//!
//! In production the daemon mounts `/etc/vcuda/vcuda.cfg`; then the `VCUDA_*` path overrides
//! (meant for tests and standalone use) are ignored, so a process cannot point itself at a
//! config or a region of its own choosing.

use std::cell::Cell;
use std::ffi::{CStr, CString};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;

use gm_limiter_core::config::{CardLimit, Config, Mode};

use crate::log::{error, info};

/// The config the daemon mounts.
pub const DEFAULT_CONFIG: &str = "/etc/vcuda/vcuda.cfg";
/// The per-container read-write state dir the daemon mounts.
pub const DEFAULT_STATE_DIR: &str = "/run/vcuda";

const UNINIT: u8 = 0;
const BUSY: u8 = 1;
const INERT: u8 = 2;
const ACTIVE: u8 = 3;
const REFUSING: u8 = 4;

static STATE: AtomicU8 = AtomicU8::new(UNINIT);

thread_local! {
    /// Depth of our own init on this thread: a nested dlsym/cu* call made by the driver's
    /// constructors during our dlopen gets the real symbol instead of re-entering init.
    static IN_INIT: Cell<u32> = const { Cell::new(0) };
}

/// The limits in force, once active.
#[derive(Debug)]
pub struct Active {
    pub config: Config,
    /// The one card whose launches are throttled (a share is always exactly one card), with
    /// its position in `config.cards`.
    pub throttled: Option<(usize, CardLimit)>,
    /// The container's state dir (region, and the host pids gpu-manager publishes).
    pub state_dir: CString,
}

static ACTIVE_CFG: OnceLock<Active> = OnceLock::new();

/// Has init finished (in any mode)?
pub fn initialised() -> bool {
    STATE.load(Ordering::Acquire) >= INERT
}

/// Is this thread inside our own init (answer with real symbols)?
pub fn in_init() -> bool {
    IN_INIT.with(|d| d.get() > 0)
}

/// What the hooks should do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode2 {
    /// Forward unchanged.
    Inert,
    /// Enforce.
    Active,
    /// Fail: the config is present but unusable.
    Refusing,
}

/// Initialise if needed and say what to do. Safe to call from any thread, any number of times.
pub fn ensure() -> Mode2 {
    loop {
        match STATE.load(Ordering::Acquire) {
            INERT => return Mode2::Inert,
            ACTIVE => return Mode2::Active,
            REFUSING => return Mode2::Refusing,
            BUSY => {
                if in_init() {
                    return Mode2::Inert;
                }
                std::thread::yield_now();
            }
            _ => {
                if STATE
                    .compare_exchange(UNINIT, BUSY, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    IN_INIT.with(|d| d.set(d.get() + 1));
                    let next = init();
                    IN_INIT.with(|d| d.set(d.get().saturating_sub(1)));
                    STATE.store(next, Ordering::Release);
                }
            }
        }
    }
}

/// The active limits (None unless `ensure()` said Active).
pub fn active() -> Option<&'static Active> {
    ACTIVE_CFG.get()
}

fn env_path(name: &str) -> Option<CString> {
    std::env::var_os(name)
        .and_then(|v| CString::new(std::os::unix::ffi::OsStrExt::as_bytes(v.as_os_str())).ok())
}

fn init() -> u8 {
    register_atfork();
    let production = std::path::Path::new(DEFAULT_CONFIG).exists();
    let pick = |var: &str, default: &str| -> CString {
        if production {
            CString::new(default).unwrap_or_default()
        } else {
            env_path(var).unwrap_or_else(|| CString::new(default).unwrap_or_default())
        }
    };
    let cuda_lib = pick("VCUDA_REAL_CUDA", "libcuda.so.1");
    let nvml_lib = pick("VCUDA_REAL_NVML", "libnvidia-ml.so.1");
    crate::real::load(&cuda_lib, &nvml_lib);

    let cfg_path = if production {
        Some(CString::new(DEFAULT_CONFIG).unwrap_or_default())
    } else {
        env_path("VCUDA_CFG")
    };
    let Some(cfg_path) = cfg_path else {
        return INERT;
    };
    let shown = cfg_path.to_string_lossy().into_owned();
    let bytes = match std::fs::read(std::ffi::OsStr::new(&shown)) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !production => return INERT,
        Err(e) => return refuse(&shown, &format!("cannot read it: {e}")),
    };
    let config = match Config::decode(&bytes) {
        Ok(c) => c,
        Err(e) => return refuse(&shown, &e.to_string()),
    };
    if config.incomplete {
        return refuse(&shown, "incomplete (the container's vcuda-memory is not allocated yet); gpu-manager completes it before the container starts");
    }
    let state_dir = pick("VCUDA_STATE_DIR", DEFAULT_STATE_DIR);
    if let Err(e) = crate::shm::open(&state_dir) {
        return refuse(&shown, &format!("the shared state is unusable: {}", e.0));
    }
    let throttled = config
        .cards
        .iter()
        .enumerate()
        .find(|(_, c)| !gm_limiter_core::controller::unthrottled(c.cores))
        .map(|(i, c)| (i, c.clone()));
    info!(
        "active: {} card(s), {} mode, config {shown}",
        config.cards.len(),
        if config.mode == Mode::Soft {
            "soft"
        } else {
            "hard"
        }
    );
    let _ = ACTIVE_CFG.set(Active {
        config,
        throttled,
        state_dir,
    });
    ACTIVE
}

fn refuse(file: &str, problem: &str) -> u8 {
    error!("cannot use {file}: {problem}; CUDA calls fail so this container does not run without its GPU limits");
    REFUSING
}

extern "C" fn child_after_fork() {
    crate::real::after_fork_in_child();
    crate::shm::after_fork_in_child();
    crate::launch::after_fork_in_child();
    crate::mem::after_fork_in_child();
}

fn register_atfork() {
    // SAFETY: registers a plain function with no preconditions; it runs in the child only.
    unsafe {
        libc::pthread_atfork(None, None, Some(child_after_fork));
    }
}

/// Map a CUDA device ordinal to its card in the config, by UUID (`NVIDIA_VISIBLE_DEVICES`
/// orders the same cards the same way, so the ordinal is the fallback).
pub fn card_of_device(dev: i32) -> Option<usize> {
    let a = active()?;
    let uuid = crate::hooks::device_uuid(dev);
    if let Some(u) = uuid {
        if let Some(i) = a
            .config
            .cards
            .iter()
            .position(|c| c.uuid.eq_ignore_ascii_case(&u))
        {
            return Some(i);
        }
    }
    usize::try_from(dev)
        .ok()
        .filter(|&i| i < a.config.cards.len())
}

/// The card of the calling thread's current context.
pub fn current_card() -> Option<usize> {
    let a = active()?;
    if a.config.cards.len() == 1 {
        return Some(0);
    }
    let get = crate::table::cuda::real::cuCtxGetDevice()?;
    let mut dev = 0i32;
    // SAFETY: the real cuCtxGetDevice writing one int we own.
    if unsafe { get(&mut dev) } != 0 {
        return None;
    }
    card_of_device(dev)
}

/// Parse a C string argument for routing (None if absent or not UTF-8).
pub fn c_name<'a>(p: *const std::ffi::c_char) -> Option<&'a str> {
    if p.is_null() {
        return None;
    }
    // SAFETY: the caller passed a NUL-terminated symbol name, valid for this call.
    unsafe { CStr::from_ptr(p) }.to_str().ok()
}
