//! The NVML feedback loop: one thread per process, started at the first throttled launch (never
//! at load). Per card one process of the container wins the sampler role (a pid in the shared
//! region, taken over when its heartbeat goes stale); every 100 ms it reads NVML's per-process
//! utilisation, sums the container's processes (`own`) and everyone's (`total`), and publishes
//! the soft-mode target and the rate multiplier that every launch of the container applies.
//!
//! The container's processes are matched by the pid NVML reports, which is the host's pid:
//! gpu-manager publishes the container's host pids in `<state dir>/hostpids` (it sees the
//! host's `/proc` and cgroups), and a process whose own pid appears in NVML's list (the
//! container shares the host's pid namespace) records it in its slot. Where no process can be
//! matched, `own` is unknown and the bucket runs open loop on the event-measured kernel costs.

use std::ffi::CString;
use std::sync::atomic::Ordering;

use gm_limiter_core::config::Mode;
use gm_limiter_core::controller::{self, Feedback, FeedbackInput, SoftConfig, SoftTarget};
use gm_limiter_core::region::card;

use crate::ffi::*;
use crate::launch::now_ns;
use crate::log::{debug, warning};
use crate::shm;
use crate::table::nvml::real;

const TICK_NS: u64 = 100_000_000;
/// Ticks without any new NVML sample after which the card counts as idle for one sample
/// (NVML's per-process sampling period is about 1/6 s, so two 100 ms ticks cover one).
const QUIET_TICKS: u32 = 2;
/// A sampler whose beat is older than this is replaced.
const STALE_NS: u64 = 3 * TICK_NS;

/// Start the thread; if the system refuses a thread, run open loop (launches never depend on
/// it).
pub fn spawn() {
    let r = std::thread::Builder::new()
        .name("vcuda-sampler".into())
        .stack_size(256 * 1024)
        .spawn(run);
    if let Err(e) = r {
        warning!("cannot start the NVML sampler thread ({e}); compute limits run open loop");
    }
}

fn mypid() -> u32 {
    // SAFETY: getpid has no preconditions.
    unsafe { libc::getpid() as u32 }
}

fn run() {
    let Some(active) = crate::state::active() else {
        return;
    };
    let Some((ti, limit)) = active.throttled.clone() else {
        return;
    };
    let Some(init) = real::nvmlInit_v2() else {
        debug!("no NVML: compute limits run open loop");
        return;
    };
    // SAFETY: the real nvmlInit_v2 (reference counted by NVML).
    if unsafe { init() } != NVML_SUCCESS {
        return;
    }
    let (Some(by_uuid), Some(util)) = (
        real::nvmlDeviceGetHandleByUUID(),
        real::nvmlDeviceGetProcessUtilization(),
    ) else {
        return;
    };
    let Ok(uuid) = CString::new(limit.uuid.clone()) else {
        return;
    };
    let mut dev: nvmlDevice_t = std::ptr::null_mut();
    // SAFETY: the real NVML call writing a handle we own.
    if unsafe { by_uuid(uuid.as_ptr(), &mut dev) } != NVML_SUCCESS {
        debug!(
            "NVML does not know {}: compute limits run open loop",
            limit.uuid
        );
        return;
    }
    discover_host_pid(dev);
    let share = f64::from(limit.cores);
    let mut soft = if active.config.mode == Mode::Soft {
        SoftTarget::new(
            share,
            f64::from(limit.core_limit.max(limit.cores)),
            SoftConfig::default(),
        )
    } else {
        SoftTarget::hard(share)
    };
    let mut feedback = Feedback::default();
    let mut samples = vec![nvmlProcessUtilizationSample_t::default(); 512];
    let mut pids = Vec::new();
    let mut last_seen = 0u64;
    let (mut quiet_ticks, mut idle_samples) = (0u32, 0u64);
    let mut hostpids_path = active.state_dir.as_bytes().to_vec();
    hostpids_path.push(b'/');
    hostpids_path.extend_from_slice(gm_limiter_core::hostpids::HOSTPIDS_FILE.as_bytes());
    let hostpids_path = std::path::PathBuf::from(std::ffi::OsString::from(
        <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(&hostpids_path),
    ));
    let me = mypid();
    let mut tick = 0u64;
    loop {
        let start = now_ns();
        tick += 1;
        if tick % 20 == 1 {
            discover_host_pid(dev);
        }
        if elect(ti, me, start) {
            let mut count = samples.len() as u32;
            // SAFETY: the real NVML call filling at most `count` samples of our buffer.
            let r = unsafe { util(dev, samples.as_mut_ptr(), &mut count, last_seen) };
            let (mut own, mut total, mut newest) = (0u64, 0u64, None::<u64>);
            if r == NVML_SUCCESS {
                shm::host_pids(&mut pids);
                pids.extend(published_host_pids(&hostpids_path));
                // The newest sample per pid.
                let got = samples.get(..count as usize).unwrap_or(&[]);
                let mut latest: Vec<(u32, u64, u32)> = Vec::new();
                for s in got {
                    match latest.iter_mut().find(|l| l.0 == s.pid) {
                        Some(l) if l.1 < s.time_stamp => *l = (s.pid, s.time_stamp, s.sm_util),
                        Some(_) => {}
                        None => latest.push((s.pid, s.time_stamp, s.sm_util)),
                    }
                    newest = Some(newest.map_or(s.time_stamp, |n| n.max(s.time_stamp)));
                }
                for (pid, _, sm) in latest {
                    total += u64::from(sm.min(100));
                    if pids.contains(&pid) {
                        own += u64::from(sm.min(100));
                    }
                }
                if let Some(n) = newest {
                    last_seen = n;
                }
            }
            let mut known = newest.is_some() && !pids.is_empty();
            let mut sample_id = newest;
            let mut any_sample = newest.is_some();
            if newest.is_none()
                && (r == NVML_SUCCESS || r == NVML_ERROR_NOT_FOUND)
                && !pids.is_empty()
            {
                // No sample for a period means no process ran in it (the fake NVML answers so,
                // and NVML documents samples of processes that ran): after a sample period
                // with nothing new, that period was idle, and the loop must see it (or lumpy
                // demand would be judged by its busy periods only).
                quiet_ticks += 1;
                if quiet_ticks >= QUIET_TICKS {
                    quiet_ticks = 0;
                    idle_samples += 1;
                    (own, total, known, any_sample) = (0, 0, true, true);
                    sample_id = Some(u64::MAX - idle_samples);
                }
            } else {
                quiet_ticks = 0;
            }
            let own_pct = if known { own.min(100) as f64 } else { f64::NAN };
            let total_pct = if any_sample {
                total.min(100) as f64
            } else {
                f64::NAN
            };
            let target = if known {
                soft.step(own_pct, total_pct)
            } else {
                soft.target_pct()
            };
            let job_ns =
                shm::card_u64(ti, card::MAX_COST).map_or(0, |w| w.swap(0, Ordering::Relaxed));
            let waited = shm::card_u64(ti, card::LAST_THROTTLED)
                .is_some_and(|w| start.saturating_sub(w.load(Ordering::Relaxed)) < TICK_NS);
            let rate = controller::effective_rate_ppm(target, feedback.multiplier_ppm());
            let binding = shm::bucket(ti).is_some_and(|b| {
                controller::would_wait(
                    b.load(Ordering::Acquire),
                    now_ns(),
                    rate,
                    controller::burst_for(job_ns),
                )
            });
            let m = feedback.step(FeedbackInput {
                target_pct: target,
                own_pct,
                sample_id,
                throttled: waited || binding,
                job_ns,
            });
            publish(ti, m, target, own, total, known);
        }
        let spent = now_ns().saturating_sub(start);
        std::thread::sleep(std::time::Duration::from_nanos(
            TICK_NS.saturating_sub(spent).max(10_000_000),
        ));
    }
}

fn publish(ti: usize, m: u32, target: f64, own: u64, total: u64, known: bool) {
    if let Some(w) = shm::card_u32(ti, card::MULTIPLIER_PPM) {
        w.store(m.max(1), Ordering::Relaxed);
    }
    if let Some(w) = shm::card_u32(ti, card::TARGET) {
        w.store((target * 10.0).clamp(1.0, 1000.0) as u32, Ordering::Relaxed);
    }
    if known {
        if let Some(w) = shm::card_u32(ti, card::OWN_UTIL) {
            w.store((own * 10) as u32, Ordering::Relaxed);
        }
    }
    if let Some(w) = shm::card_u32(ti, card::TOTAL_UTIL) {
        w.store((total * 10) as u32, Ordering::Relaxed);
    }
}

/// The host pids gpu-manager published for this container (none if absent or unreadable).
fn published_host_pids(path: &std::path::Path) -> Vec<u32> {
    match std::fs::read(path) {
        Ok(bytes) => gm_limiter_core::hostpids::decode(&bytes).unwrap_or_else(|e| {
            debug!("ignoring {}: {e}", path.display());
            Vec::new()
        }),
        Err(_) => Vec::new(),
    }
}

/// Take or keep the sampler role for this card.
fn elect(ti: usize, me: u32, now: u64) -> bool {
    let (Some(pid), Some(beat)) = (
        shm::card_u32(ti, card::SAMPLER_PID),
        shm::card_u64(ti, card::SAMPLER_BEAT),
    ) else {
        return false;
    };
    let holder = pid.load(Ordering::Acquire);
    let fresh = now.saturating_sub(beat.load(Ordering::Acquire)) < STALE_NS;
    let mine = holder == me
        || ((holder == 0 || !fresh)
            && pid
                .compare_exchange(holder, me, Ordering::AcqRel, Ordering::Acquire)
                .is_ok());
    if mine {
        beat.store(now, Ordering::Release);
    }
    mine
}

/// Record our NVML pid when NVML lists our own pid (same pid namespace).
fn discover_host_pid(dev: nvmlDevice_t) {
    let Some(list) = real::nvmlDeviceGetComputeRunningProcesses_v3() else {
        return;
    };
    let mut procs = vec![nvmlProcessInfo_t::default(); 256];
    let mut count = procs.len() as u32;
    // SAFETY: the real NVML call filling at most `count` entries of our buffer.
    if unsafe { list(dev, &mut count, procs.as_mut_ptr()) } != NVML_SUCCESS {
        return;
    }
    let me = mypid();
    if procs
        .get(..count as usize)
        .unwrap_or(&[])
        .iter()
        .any(|p| p.pid == me)
    {
        shm::set_host_pid(me);
    }
}
