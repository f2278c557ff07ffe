//! The launch path: every kernel and graph launch of a throttled card is charged its estimated
//! GPU time against the container's shared bucket (`gm_limiter_core::controller::admit`),
//! sleeping first when the bucket is empty. A sampled subset of launches is timed with events
//! to keep the per-kernel estimates honest. Nothing here holds a lock across a driver call.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use gm_limiter_core::controller::{self, CostEstimate, LaunchShape};
use gm_limiter_core::region::card;

use crate::ffi::*;
use crate::shm;
use crate::spin::SpinLock;
use crate::state::{self, Mode2};
use crate::table::cuda::real;

/// What a launch hook must do.
#[derive(Debug)]
pub enum Plan {
    /// Launch unchanged (inert, unthrottled card, stream capture).
    Forward,
    /// Do not launch; answer this code.
    Refuse(CUresult),
    /// Launch; if `Some`, bracket it with these events so its duration is measured.
    Launch(Option<Timing>),
}

/// A launch being timed.
#[derive(Debug)]
pub struct Timing {
    key: (usize, u64),
    start: CUevent,
    end: CUevent,
}

// SAFETY: CUDA event handles may be used from any thread of the process that created them.
unsafe impl Send for Timing {}

/// Per (function or graph, grid size): the estimate and how many launches it has seen. Keyed
/// by pointers and sizes the process itself made, so a cheap multiplicative hash will do
/// (SipHash's flood resistance costs ~20 ns a launch here for nothing).
type CostTable = HashMap<(usize, u64), (CostEstimate, u64), BuildHasherDefault<KeyHasher>>;

/// A multiply-rotate hasher for the cost table's integer keys.
#[derive(Default)]
struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0.rotate_left(26) ^ v).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
    fn write_usize(&mut self, v: usize) {
        self.write_u64(v as u64);
    }
}
static COSTS: SpinLock<Option<CostTable>> = SpinLock::new(None);
static PENDING: SpinLock<Vec<Timing>> = SpinLock::new(Vec::new());
static PENDING_COUNT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
static EVENTS: SpinLock<Vec<usize>> = SpinLock::new(Vec::new());
static LAST_LAUNCH: AtomicU64 = AtomicU64::new(0);
static LAUNCHES: AtomicU64 = AtomicU64::new(0);
static SMS: AtomicU32 = AtomicU32::new(0);
static THREADS_PER_SM: AtomicU32 = AtomicU32::new(0);
/// Streams being captured into graphs by this process: their launches do not run now and are
/// charged when the graph is launched.
static CAPTURING: SpinLock<Vec<usize>> = SpinLock::new(Vec::new());
static CAPTURE_COUNT: AtomicU32 = AtomicU32::new(0);
static SAMPLER: AtomicBool = AtomicBool::new(false);

pub fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writing into a timespec we own (vDSO, no syscall).
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

fn sleep_ns(ns: u64) {
    let ts = libc::timespec {
        tv_sec: (ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (ns % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: a relative sleep with a valid timespec; EINTR just ends it early (the bucket
    // makes up for it on the next launch).
    unsafe { libc::clock_nanosleep(libc::CLOCK_MONOTONIC, 0, &ts, std::ptr::null_mut()) };
}

fn device_shape() -> (u32, u32) {
    let sms = SMS.load(Ordering::Relaxed);
    if sms != 0 {
        return (sms, THREADS_PER_SM.load(Ordering::Relaxed));
    }
    let (mut s, mut t) = (132, 2048);
    if let (Some(attr), Some(getdev)) = (real::cuDeviceGetAttribute(), real::cuCtxGetDevice()) {
        let mut dev = 0;
        // SAFETY: real driver calls writing ints we own.
        unsafe {
            if getdev(&mut dev) == CUDA_SUCCESS {
                let (mut a, mut b) = (0, 0);
                if attr(&mut a, CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, dev) == CUDA_SUCCESS
                    && a > 0
                {
                    s = a as u32;
                }
                if attr(
                    &mut b,
                    CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_MULTIPROCESSOR,
                    dev,
                ) == CUDA_SUCCESS
                    && b > 0
                {
                    t = b as u32;
                }
            }
        }
    }
    THREADS_PER_SM.store(t, Ordering::Relaxed);
    SMS.store(s, Ordering::Relaxed);
    (s, t)
}

fn is_capturing(stream: CUstream) -> bool {
    CAPTURE_COUNT.load(Ordering::Acquire) != 0 && CAPTURING.lock().contains(&(stream as usize))
}

/// A stream started capturing (after the driver accepted it).
pub fn capture_began(stream: CUstream) {
    CAPTURING.lock().push(stream as usize);
    CAPTURE_COUNT.fetch_add(1, Ordering::AcqRel);
}

/// A stream stopped capturing.
pub fn capture_ended(stream: CUstream) {
    let mut c = CAPTURING.lock();
    if let Some(i) = c.iter().position(|&s| s == stream as usize) {
        c.swap_remove(i);
        CAPTURE_COUNT.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Decide a launch of `func` (a CUfunction or, for graphs, the CUgraphExec) with this shape.
pub fn plan(func: usize, grid_blocks: u64, block_threads: u32, stream: CUstream) -> Plan {
    match state::ensure() {
        Mode2::Inert => return Plan::Forward,
        Mode2::Refusing => return Plan::Refuse(CUDA_ERROR_NOT_INITIALIZED),
        Mode2::Active => {}
    }
    let Some(active) = state::active() else {
        return Plan::Forward;
    };
    let Some((ti, limit)) = active.throttled.as_ref() else {
        return Plan::Forward;
    };
    if active.config.cards.len() > 1 && state::current_card() != Some(*ti) {
        return Plan::Forward;
    }
    if is_capturing(stream) {
        return Plan::Forward;
    }
    ensure_sampler();
    let now = now_ns();
    let idle = now.saturating_sub(LAST_LAUNCH.swap(now, Ordering::Relaxed));
    let n = LAUNCHES.fetch_add(1, Ordering::Relaxed);
    // Fold finished timings in every 8 launches, and at once after the host waited (a sync
    // loop launches rarely, and its first measurements matter most).
    if PENDING_COUNT.load(Ordering::Relaxed) > 0 && (n.is_multiple_of(8) || idle > 1_000_000) {
        poll_timings();
    }
    let key = (func, grid_blocks);
    let (cost, samples, count) = {
        let mut costs = COSTS.lock();
        let map = costs.get_or_insert_with(HashMap::default);
        let entry = map.entry(key).or_insert_with(|| {
            let (sms, tps) = device_shape();
            (
                CostEstimate::prior(&LaunchShape {
                    grid_blocks,
                    block_threads,
                    sms,
                    threads_per_sm: tps,
                }),
                0,
            )
        });
        entry.1 = entry.1.wrapping_add(1);
        (entry.0.estimate_ns(), entry.0.samples(), entry.1 - 1)
    };
    let target = match shm::card_u32(*ti, card::TARGET).map(|w| w.load(Ordering::Relaxed)) {
        Some(t) if t > 0 => f64::from(t) / 10.0,
        _ => f64::from(limit.cores),
    };
    let mult = match shm::card_u32(*ti, card::MULTIPLIER_PPM).map(|w| w.load(Ordering::Relaxed)) {
        Some(m) if m > 0 => m,
        _ => controller::PPM,
    };
    let rate = controller::effective_rate_ppm(target, mult);
    if let Some(w) = shm::card_u64(*ti, card::MAX_COST) {
        if w.load(Ordering::Relaxed) < cost {
            w.fetch_max(cost, Ordering::Relaxed);
        }
    }
    if let Some(bucket) = shm::bucket(*ti) {
        let mut cur = bucket.load(Ordering::Acquire);
        loop {
            let a = controller::admit(cur, now, cost, rate, controller::burst_for(cost));
            if a.new_state == cur {
                break;
            }
            match bucket.compare_exchange_weak(
                cur,
                a.new_state,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    if a.wait_ns > 0 {
                        if let Some(w) = shm::card_u64(*ti, card::LAST_THROTTLED) {
                            w.store(now, Ordering::Relaxed);
                        }
                        sleep_ns(a.wait_ns);
                    }
                    break;
                }
                Err(seen) => cur = seen,
            }
        }
    }
    if controller::should_measure(count, idle, samples) {
        if let Some((start, end)) = event_pair() {
            return Plan::Launch(Some(Timing { key, start, end }));
        }
    }
    Plan::Launch(None)
}

fn event_pair() -> Option<(CUevent, CUevent)> {
    let mut pool = EVENTS.lock();
    if pool.len() >= 2 {
        let a = pool.pop()? as CUevent;
        let b = pool.pop()? as CUevent;
        return Some((a, b));
    }
    drop(pool);
    let create = real::cuEventCreate()?;
    let (mut a, mut b): (CUevent, CUevent) = (std::ptr::null_mut(), std::ptr::null_mut());
    // SAFETY: real cuEventCreate writing handles we own.
    unsafe {
        if create(&mut a, CU_EVENT_DEFAULT) != CUDA_SUCCESS
            || create(&mut b, CU_EVENT_DEFAULT) != CUDA_SUCCESS
        {
            return None;
        }
    }
    Some((a, b))
}

fn record(ev: CUevent, stream: CUstream, per_thread: bool) -> bool {
    let f = if per_thread {
        real::cuEventRecord_ptsz().or_else(real::cuEventRecord)
    } else {
        real::cuEventRecord()
    };
    // SAFETY: recording our own event on the caller's stream.
    f.is_some_and(|f| unsafe { f(ev, stream) } == CUDA_SUCCESS)
}

/// Run `launch` under the plan.
pub fn run(
    plan: Plan,
    stream: CUstream,
    per_thread: bool,
    launch: impl FnOnce() -> CUresult,
) -> CUresult {
    match plan {
        Plan::Forward | Plan::Launch(None) => launch(),
        Plan::Refuse(code) => code,
        Plan::Launch(Some(t)) => {
            let began = record(t.start, stream, per_thread);
            let r = launch();
            if began && r == CUDA_SUCCESS && record(t.end, stream, per_thread) {
                PENDING.lock().push(t);
                PENDING_COUNT.fetch_add(1, Ordering::Relaxed);
            } else {
                EVENTS.lock().extend([t.start as usize, t.end as usize]);
            }
            r
        }
    }
}

/// Fold finished timings into the estimates.
fn poll_timings() {
    let (Some(query), Some(elapsed)) = (real::cuEventQuery(), real::cuEventElapsedTime()) else {
        return;
    };
    let mut done = Vec::new();
    {
        let mut p = PENDING.lock();
        let mut i = 0;
        while i < p.len() {
            // SAFETY: querying our own recorded event.
            if unsafe { query(p[i].end) } == CUDA_SUCCESS {
                done.push(p.swap_remove(i));
                PENDING_COUNT.fetch_sub(1, Ordering::Relaxed);
            } else {
                i += 1;
            }
        }
    }
    for t in done {
        let mut ms = 0f32;
        // SAFETY: both events are ours and complete.
        let ok = unsafe { elapsed(&mut ms, t.start, t.end) } == CUDA_SUCCESS;
        if ok && ms.is_finite() && ms >= 0.0 {
            let ns = (f64::from(ms) * 1e6) as u64;
            if let Some(e) = COSTS.lock().as_mut().and_then(|m| m.get_mut(&t.key)) {
                e.0.observe(ns);
            }
        }
        EVENTS.lock().extend([t.start as usize, t.end as usize]);
    }
}

fn ensure_sampler() {
    if !SAMPLER.load(Ordering::Relaxed)
        && SAMPLER
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    {
        crate::sampler::spawn();
    }
}

/// In a fork child: the parent's events and streams are not the child's, and its sampler
/// thread did not survive the fork.
pub fn after_fork_in_child() {
    COSTS.force_unlock();
    PENDING.force_unlock();
    EVENTS.force_unlock();
    CAPTURING.force_unlock();
    PENDING.lock().clear();
    PENDING_COUNT.store(0, Ordering::Relaxed);
    EVENTS.lock().clear();
    CAPTURING.lock().clear();
    CAPTURE_COUNT.store(0, Ordering::Release);
    SAMPLER.store(false, Ordering::Release);
}
