//! Memory accounting for the hooks: charge before the driver sees a request, remember what
//! each successful allocation charged (so its free gives back exactly that), give back on a
//! driver failure.

use std::collections::HashMap;

use crate::ffi::{CUresult, CUDA_ERROR_NOT_INITIALIZED, CUDA_ERROR_OUT_OF_MEMORY};
use crate::log::{debug, warning};
use crate::shm::{self, Charge};
use crate::spin::SpinLock;
use crate::state::{self, Mode2};

/// What kind of handle an allocation is known by (the key spaces differ).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// A device pointer (`cuMemAlloc*`, managed, async, pool, pitched).
    Ptr,
    /// A `CUarray` or `CUmipmappedArray`.
    Array,
    /// A VMM physical allocation handle (`cuMemCreate`).
    Handle,
}

/// Live allocations: handle → (card, bytes charged).
type Live = HashMap<(Kind, u64), (usize, u64)>;
static LIVE: SpinLock<Option<Live>> = SpinLock::new(None);

/// What a hook should do with an allocation request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// Not ours to limit (inert, or a card we cannot tell): call the driver unchanged.
    Forward,
    /// Answer this code without calling the driver.
    Refuse(CUresult),
    /// Charged on this card: call the driver, then `record` or `undo`.
    Charged(usize, u64),
}

/// Charge `bytes` on `card` (or the current context's card) before the driver call.
pub fn before(bytes: u64, card: Option<usize>) -> Gate {
    match state::ensure() {
        Mode2::Inert => return Gate::Forward,
        Mode2::Refusing => return Gate::Refuse(CUDA_ERROR_NOT_INITIALIZED),
        Mode2::Active => {}
    }
    let Some(a) = state::active() else {
        return Gate::Forward;
    };
    let Some(card) = card.or_else(state::current_card) else {
        return Gate::Forward;
    };
    let Some(limit) = a.config.cards.get(card) else {
        return Gate::Forward;
    };
    match shm::charge(card, bytes, limit.memory_limit) {
        Charge::Ok => Gate::Charged(card, bytes),
        Charge::OverCap { used } => {
            debug!(
                "refused {bytes} bytes on card {}: {used} of {} in use by this container",
                limit.index, limit.memory_limit
            );
            Gate::Refuse(CUDA_ERROR_OUT_OF_MEMORY)
        }
        Charge::NoRegion => {
            warning!("refused {bytes} bytes: no free process slot in the shared region");
            Gate::Refuse(CUDA_ERROR_OUT_OF_MEMORY)
        }
    }
}

/// The driver allocated: remember the charge under the allocation's handle.
pub fn record(kind: Kind, key: u64, card: usize, bytes: u64) {
    let mut live = LIVE.lock();
    let previous = live
        .get_or_insert_with(HashMap::new)
        .insert((kind, key), (card, bytes));
    drop(live);
    if let Some((c, b)) = previous {
        // The driver reused a handle we thought live (a free we missed): never double-charge.
        shm::uncharge(c, b);
    }
}

/// The driver refused after we charged: give the charge back.
pub fn undo(card: usize, bytes: u64) {
    shm::uncharge(card, bytes);
}

/// Finish a request: record on success, undo on failure.
pub fn settle(gate: Gate, result: CUresult, kind: Kind, key: Option<u64>) {
    if let Gate::Charged(card, bytes) = gate {
        match (result, key) {
            (0, Some(k)) => record(kind, k, card, bytes),
            _ => undo(card, bytes),
        }
    }
}

/// The driver freed `key`: give back what it charged (nothing if we never charged it).
pub fn release(kind: Kind, key: u64) {
    let found = LIVE.lock().as_mut().and_then(|m| m.remove(&(kind, key)));
    if let Some((card, bytes)) = found {
        shm::uncharge(card, bytes);
    }
}

/// In a fork child: the parent's allocations are not the child's.
pub fn after_fork_in_child() {
    LIVE.force_unlock();
    *LIVE.lock() = None;
}
