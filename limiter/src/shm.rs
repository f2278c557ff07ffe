//! The per-container shared region (layout in `gm_limiter_core::region`): one `MAP_SHARED`
//! file under the container's read-write state dir, so every process of the container shares
//! one memory cap and one compute bucket per card.
//!
//! Memory is charged per process slot. Check-and-charge on a card is serialised by a lock word
//! holding the holder's pid; a holder that died (kill -9) is detected with `kill(pid, 0)` and
//! its lock taken over, and its slot's charges are released the next time the cap is reached
//! or usage is reported. No lock is ever held across a driver call.

use std::ffi::CStr;
use std::sync::atomic::{AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, Ordering};

use gm_limiter_core::region::{self as layout, card, slot};

static BASE: AtomicPtr<u8> = AtomicPtr::new(std::ptr::null_mut());
/// Our slot index + 1 (0: not registered, e.g. just after fork).
static MY_SLOT: AtomicUsize = AtomicUsize::new(0);
static MY_PID: AtomicU32 = AtomicU32::new(0);

/// Why the region could not be used.
#[derive(Debug)]
pub struct RegionError(pub String);

fn word32(off: usize) -> Option<&'static AtomicU32> {
    let base = BASE.load(Ordering::Acquire);
    if base.is_null() || !off.is_multiple_of(4) || off + 4 > layout::REGION_SIZE {
        return None;
    }
    // SAFETY: `base` maps REGION_SIZE bytes for the life of the process (never unmapped), the
    // offset is in bounds and 4-aligned, and the word is only accessed atomically.
    Some(unsafe { &*(base.add(off) as *const AtomicU32) })
}

fn word64(off: usize) -> Option<&'static AtomicU64> {
    let base = BASE.load(Ordering::Acquire);
    if base.is_null() || !off.is_multiple_of(8) || off + 8 > layout::REGION_SIZE {
        return None;
    }
    // SAFETY: as in `word32`, with an 8-aligned in-bounds offset.
    Some(unsafe { &*(base.add(off) as *const AtomicU64) })
}

/// The bucket word of a card.
pub fn bucket(card_ix: usize) -> Option<&'static AtomicU64> {
    word64(layout::card_field(card_ix, card::BUCKET))
}

/// A 32-bit per-card word.
pub fn card_u32(card_ix: usize, field: usize) -> Option<&'static AtomicU32> {
    word32(layout::card_field(card_ix, field))
}

/// A 64-bit per-card word.
pub fn card_u64(card_ix: usize, field: usize) -> Option<&'static AtomicU64> {
    word64(layout::card_field(card_ix, field))
}

/// Map (creating or rebuilding if needed) the region in `dir`.
pub fn open(dir: &CStr) -> Result<(), RegionError> {
    if !BASE.load(Ordering::Acquire).is_null() {
        return Ok(());
    }
    let mut path = dir.to_bytes().to_vec();
    path.push(b'/');
    path.extend_from_slice(layout::REGION_FILE.as_bytes());
    path.push(0);
    let shown = String::from_utf8_lossy(&path[..path.len() - 1]).into_owned();
    // SAFETY: a NUL-terminated path; the fd is closed below (the mapping outlives it).
    let fd = unsafe {
        libc::open(
            path.as_ptr().cast(),
            libc::O_RDWR | libc::O_CREAT | libc::O_CLOEXEC,
            0o666,
        )
    };
    if fd < 0 {
        return Err(RegionError(format!(
            "cannot open {shown}: {}",
            std::io::Error::last_os_error()
        )));
    }
    let result = map_and_init(fd, &shown);
    // SAFETY: closing our own fd; the MAP_SHARED mapping stays valid.
    unsafe { libc::close(fd) };
    result
}

fn map_and_init(fd: i32, shown: &str) -> Result<(), RegionError> {
    let err = |what: &str| {
        RegionError(format!(
            "{what} {shown}: {}",
            std::io::Error::last_os_error()
        ))
    };
    // SAFETY: flock on our fd; it serialises first-time initialisation between processes.
    if unsafe { libc::flock(fd, libc::LOCK_EX) } != 0 {
        return Err(err("cannot lock"));
    }
    // SAFETY: fstat into a zeroed stat struct owned by this frame.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Err(err("cannot stat"));
    }
    let size = layout::REGION_SIZE;
    if (st.st_size as u64) < size as u64 {
        // SAFETY: growing our own file; new bytes read as zero.
        if unsafe { libc::ftruncate(fd, size as libc::off_t) } != 0 {
            return Err(err("cannot size"));
        }
    }
    // SAFETY: a fresh shared read-write mapping of `size` bytes of a file at least that long.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(err("cannot map"));
    }
    BASE.store(p.cast(), Ordering::Release);
    let ok = word32(layout::header::MAGIC).map(|w| w.load(Ordering::Acquire))
        == Some(layout::MAGIC)
        && word32(layout::header::VERSION).map(|w| w.load(Ordering::Acquire))
            == Some(layout::VERSION)
        && word32(layout::header::READY).map(|w| w.load(Ordering::Acquire)) == Some(1);
    if !ok {
        // First user (or an incompatible leftover): zero and stamp it, still under the flock.
        // SAFETY: the mapping is REGION_SIZE bytes; no other process reads it before READY=1
        // (they wait on the same flock).
        unsafe { std::ptr::write_bytes(p.cast::<u8>(), 0, size) };
        if let (Some(m), Some(v), Some(s), Some(r)) = (
            word32(layout::header::MAGIC),
            word32(layout::header::VERSION),
            word64(layout::header::SIZE),
            word32(layout::header::READY),
        ) {
            m.store(layout::MAGIC, Ordering::Release);
            v.store(layout::VERSION, Ordering::Release);
            s.store(size as u64, Ordering::Release);
            r.store(1, Ordering::Release);
        }
    }
    // SAFETY: unlocking our own flock.
    unsafe { libc::flock(fd, libc::LOCK_UN) };
    Ok(())
}

/// Is `pid` (in our pid namespace) gone?
fn dead(pid: u32) -> bool {
    if pid == 0 {
        return false;
    }
    // SAFETY: signal 0 only checks for existence and permission.
    let r = unsafe { libc::kill(pid as libc::pid_t, 0) };
    r != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
}

fn getpid() -> u32 {
    // SAFETY: getpid has no preconditions.
    unsafe { libc::getpid() as u32 }
}

/// Our slot, registering on first use (and again in a fork child).
pub fn my_slot() -> Option<usize> {
    let pid = getpid();
    let s = MY_SLOT.load(Ordering::Acquire);
    if s != 0 && MY_PID.load(Ordering::Acquire) == pid {
        return Some(s - 1);
    }
    for attempt in 0..2 {
        for i in 0..layout::MAX_SLOTS {
            let w = word32(layout::slot_field(i, slot::PID))?;
            if w.compare_exchange(0, pid, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                for c in 0..layout::MAX_CARDS {
                    if let Some(u) = word64(layout::slot_used(i, c)) {
                        u.store(0, Ordering::Release);
                    }
                }
                if let Some(h) = word32(layout::slot_field(i, slot::HOST_PID)) {
                    h.store(0, Ordering::Release);
                }
                if let Some(high) = word32(layout::header::SLOTS_HIGH) {
                    high.fetch_max(i as u32 + 1, Ordering::AcqRel);
                }
                MY_PID.store(pid, Ordering::Release);
                MY_SLOT.store(i + 1, Ordering::Release);
                return Some(i);
            }
        }
        if attempt == 0 {
            reap_dead();
        }
    }
    None
}

/// Slots that were ever used (scans stop there).
fn slots_in_use() -> usize {
    word32(layout::header::SLOTS_HIGH).map_or(layout::MAX_SLOTS, |w| {
        (w.load(Ordering::Acquire) as usize).min(layout::MAX_SLOTS)
    })
}

/// Release the charges and slots of processes that no longer exist.
pub fn reap_dead() {
    for i in 0..slots_in_use() {
        let Some(w) = word32(layout::slot_field(i, slot::PID)) else {
            return;
        };
        let pid = w.load(Ordering::Acquire);
        if pid != 0 && dead(pid) {
            for c in 0..layout::MAX_CARDS {
                if let Some(u) = word64(layout::slot_used(i, c)) {
                    u.store(0, Ordering::Release);
                }
            }
            let _ = w.compare_exchange(pid, 0, Ordering::AcqRel, Ordering::Acquire);
        }
    }
}

/// Bytes charged on a card by every live slot.
pub fn used_on(card_ix: usize) -> u64 {
    let mut total = 0u64;
    for i in 0..slots_in_use() {
        let (Some(w), Some(u)) = (
            word32(layout::slot_field(i, slot::PID)),
            word64(layout::slot_used(i, card_ix)),
        ) else {
            break;
        };
        if w.load(Ordering::Acquire) != 0 {
            total = total.saturating_add(u.load(Ordering::Acquire));
        }
    }
    total
}

/// The card's allocation lock, released on drop.
struct CardLock(&'static AtomicU32, u32);

impl Drop for CardLock {
    fn drop(&mut self) {
        let _ = self
            .0
            .compare_exchange(self.1, 0, Ordering::AcqRel, Ordering::Acquire);
    }
}

fn lock_card(card_ix: usize) -> Option<CardLock> {
    let w = card_u32(card_ix, card::MEM_LOCK)?;
    let me = getpid();
    let mut spins = 0u32;
    loop {
        match w.compare_exchange_weak(0, me, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => return Some(CardLock(w, me)),
            Err(holder) => {
                spins = spins.wrapping_add(1);
                if holder == me {
                    // Left behind by our pre-fork parent with our pid? Impossible (pids differ);
                    // a holder equal to us means a bug or pid reuse after a crash: take it.
                    let _ = w.compare_exchange(holder, 0, Ordering::AcqRel, Ordering::Acquire);
                } else if spins.is_multiple_of(256) && dead(holder) {
                    let _ = w.compare_exchange(holder, 0, Ordering::AcqRel, Ordering::Acquire);
                } else if spins.is_multiple_of(16) {
                    std::thread::yield_now();
                } else {
                    std::hint::spin_loop();
                }
            }
        }
    }
}

/// Outcome of a charge attempt.
#[derive(Debug, PartialEq, Eq)]
pub enum Charge {
    /// Charged; call the driver (and `uncharge` if it fails).
    Ok,
    /// The container's cap would be exceeded: answer CUDA_ERROR_OUT_OF_MEMORY.
    OverCap { used: u64 },
    /// No region or no free slot: refuse (never run unlimited).
    NoRegion,
}

/// Charge `bytes` on a card against `cap`, exactly: the check and the charge happen under the
/// card's lock, so concurrent processes never exceed the cap together.
pub fn charge(card_ix: usize, bytes: u64, cap: u64) -> Charge {
    let Some(me) = my_slot() else {
        return Charge::NoRegion;
    };
    let Some(mine) = word64(layout::slot_used(me, card_ix)) else {
        return Charge::NoRegion;
    };
    let Some(_lock) = lock_card(card_ix) else {
        return Charge::NoRegion;
    };
    let mut used = used_on(card_ix);
    if used.saturating_add(bytes) > cap {
        reap_dead();
        used = used_on(card_ix);
        if used.saturating_add(bytes) > cap {
            return Charge::OverCap { used };
        }
    }
    mine.fetch_add(bytes, Ordering::AcqRel);
    Charge::Ok
}

/// Give back `bytes` on a card (a free, or a driver that refused after we charged).
pub fn uncharge(card_ix: usize, bytes: u64) {
    let Some(me) = my_slot() else { return };
    let Some(mine) = word64(layout::slot_used(me, card_ix)) else {
        return;
    };
    let _ = mine.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
        Some(v.saturating_sub(bytes))
    });
}

/// Usage for reporting (cuMemGetInfo, NVML): dead processes' charges are released first.
pub fn reported_used(card_ix: usize) -> u64 {
    reap_dead();
    used_on(card_ix)
}

/// Record the pid NVML reports for us.
pub fn set_host_pid(host_pid: u32) {
    if let Some(s) = my_slot() {
        if let Some(w) = word32(layout::slot_field(s, slot::HOST_PID)) {
            w.store(host_pid, Ordering::Release);
        }
    }
}

/// Host pids of the container's live processes (0 entries skipped).
pub fn host_pids(out: &mut Vec<u32>) {
    out.clear();
    for i in 0..slots_in_use() {
        let (Some(p), Some(h)) = (
            word32(layout::slot_field(i, slot::PID)),
            word32(layout::slot_field(i, slot::HOST_PID)),
        ) else {
            break;
        };
        let (pid, host) = (p.load(Ordering::Acquire), h.load(Ordering::Acquire));
        if pid != 0 && host != 0 && !dead(pid) {
            out.push(host);
        }
    }
}

/// In a fork child: forget our parent's slot (the child registers its own on first use; its
/// parent's device memory is not the child's).
pub fn after_fork_in_child() {
    MY_SLOT.store(0, Ordering::Release);
    MY_PID.store(0, Ordering::Release);
}
