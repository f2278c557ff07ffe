//! The daemon's allocation state: one [`Record`] per container, the per-card usage derived from
//! the distinct device IDs held, the short-lived pairing of a container's two halves, and the
//! decisions the plugins make on top of it.
//!
//! Everything here is synchronous and does no I/O: the plugins snapshot the pod source, lock
//! the state, call one method, unlock, and only then touch files or the network. So an
//! `Allocate` never waits for the API server while the state is locked.
//!
//! ## Pairing the two halves of a container
//!
//! The kubelet allocates a container's resources back to back (one `GetPreferredAllocation` +
//! `Allocate` per resource, in either order) and admits pods one at a time. The first half
//! that arrives opens a pending entry with the cards chosen for the container; the second
//! half pairs with the newest pending entry that still misses it, so the vcuda-memory IDs land
//! on the card of the vcuda-core IDs. Entries expire after the configured TTL.

pub mod checkpoint;
pub mod record;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gm_core::annotations::{encode_bool, encode_cards, Keys};
use gm_core::devices::{
    available_per_card, cards_with_room, core_shape, ledger_from_usage, match_container,
    memory_card, memory_with_cores, preferred_ids, Candidate, CardUse, DeviceKind, IdSet,
    MatchQuality, ShapeError,
};
use gm_core::placement::{self, Policy};
use gm_core::request::{GpuRequest, Slot};
use gm_core::topology::Topology;
use gm_core::{Assignment, NodeInventory, NodeLedger};

use crate::pods::{PodInfo, PodSource};
pub use record::{PodRef, Record};

/// Most IDs a persisted or listed set may hold (64 cards × 100 vcuda-core, or a very large
/// card's memory blocks): a guard against absurd input.
pub const MAX_IDS: usize = 1 << 20;

/// How a refused request maps onto gRPC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// The IDs themselves are wrong (unknown, malformed, straddling, too many).
    InvalidArgument,
    /// The IDs are fine but the node's state forbids them (unhealthy card, assignment mismatch).
    FailedPrecondition,
}

/// A refused request, with a message that says what happened and what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct RequestError {
    pub code: ErrorCode,
    pub message: String,
}

impl RequestError {
    fn invalid(message: String) -> Self {
        Self {
            code: ErrorCode::InvalidArgument,
            message,
        }
    }
    pub(crate) fn precondition(message: String) -> Self {
        Self {
            code: ErrorCode::FailedPrecondition,
            message,
        }
    }
}

/// Settings the state needs.
#[derive(Debug, Clone)]
pub struct StateConfig {
    pub node_name: String,
    pub keys: Keys,
    pub policy: Policy,
    pub pending_ttl: Duration,
    pub gc_grace: Duration,
    /// With an API server, PreStartContainer asks for annotation patches.
    pub patch_pods: bool,
}

/// Time as the state sees it.
#[derive(Debug, Clone, Copy)]
pub struct Now {
    pub instant: Instant,
    pub unix_ms: u64,
}

impl Now {
    /// The current time.
    pub fn current() -> Self {
        Self {
            instant: Instant::now(),
            unix_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
        }
    }
}

/// A pod container a request was matched to, with what the pod says about it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Matched {
    pod: PodRef,
    slot: Slot,
    request: GpuRequest,
    memory_blocks: u64,
    assigned: Option<Vec<u32>>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Half {
    /// A preference was given for this half.
    preferred: bool,
    /// The record holding this half once allocated.
    record: Option<String>,
}

/// A container whose halves are being allocated.
#[derive(Debug, Clone)]
struct Pending {
    at: Instant,
    core: Option<Half>,
    memory: Option<Half>,
    core_size: Option<u32>,
    memory_size: Option<u32>,
    cards: Option<Vec<u32>>,
    request: Option<GpuRequest>,
    matched: Option<Matched>,
    /// Will a vcuda-memory half follow the vcuda-core half?
    expects_memory: Option<bool>,
}

impl Pending {
    fn new(at: Instant) -> Self {
        Self {
            at,
            core: None,
            memory: None,
            core_size: None,
            memory_size: None,
            cards: None,
            request: None,
            matched: None,
            expects_memory: None,
        }
    }

    fn half(&self, kind: DeviceKind) -> &Option<Half> {
        match kind {
            DeviceKind::Core => &self.core,
            DeviceKind::Memory => &self.memory,
        }
    }

    fn half_mut(&mut self, kind: DeviceKind) -> &mut Option<Half> {
        match kind {
            DeviceKind::Core => &mut self.core,
            DeviceKind::Memory => &mut self.memory,
        }
    }

    fn allocated(&self, kind: DeviceKind) -> bool {
        self.half(kind).as_ref().is_some_and(|h| h.record.is_some())
    }

    fn complete(&self) -> bool {
        self.allocated(DeviceKind::Core)
            && (self.allocated(DeviceKind::Memory) || self.expects_memory == Some(false))
    }
}

/// What `Allocate` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Allocated {
    /// The IDs were already recorded (a repeated call): nothing changed.
    Existing(Record),
    /// A new record.
    New(Record),
    /// The vcuda-memory half joined an existing record (its limiter config changes).
    Joined(Record),
}

impl Allocated {
    pub fn record(&self) -> &Record {
        match self {
            Allocated::Existing(r) | Allocated::New(r) | Allocated::Joined(r) => r,
        }
    }
}

/// What PreStartContainer confirmed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Confirmation {
    pub record: Record,
    /// Annotations to merge into the owner pod (namespace, name, annotations).
    pub patch: Option<(String, String, BTreeMap<String, String>)>,
}

/// One container of the kubelet's pod-resources `List`, reduced to our two resources.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedContainer {
    pub namespace: String,
    pub pod: String,
    pub container: String,
    pub core: Vec<String>,
    pub memory: Vec<String>,
}

/// What a reconciliation changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reconciled {
    /// Records created from pod-resources (allocations the state did not know).
    pub adopted: Vec<Record>,
    /// Records released, with the reason.
    pub released: Vec<(Record, String)>,
    /// Annotation patches owed to pods the kubelet has admitted (pod-resources lists their
    /// devices) that do not say `gpu-assigned=true` yet — e.g. because the daemon was killed
    /// between confirming a container and writing its patch. `(namespace, name, annotations)`.
    pub patches: Vec<(String, String, BTreeMap<String, String>)>,
}

/// What a pod source says about a record's pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodState {
    /// The pod exists and has not ended.
    Alive,
    /// The pod is gone, was replaced (new UID) or has ended.
    Gone,
    /// No API server, not synced yet, or no pod known for the record.
    Unknown,
}

/// Should a record be released? `present`: whether pod-resources lists its IDs (`None` when
/// pod-resources could not be asked); `confirmed`: the pod was confirmed by pod-resources (not
/// only matched). A record of a pod the API server reports ended is released once the kubelet
/// no longer lists its IDs: at once when confirmed, else after the grace period. A record missing from pod-resources is released
/// after it has been missing for the grace period, unless its pod is known to be alive (a
/// regular init container is not listed by pod-resources, yet holds its devices).
pub fn release_reason(
    confirmed: bool,
    pod: PodState,
    present: Option<bool>,
    age: Duration,
    missing_for: Duration,
    grace: Duration,
) -> Option<&'static str> {
    // While the kubelet still lists the IDs, it still holds them (a deleted pod terminating).
    if pod == PodState::Gone && present != Some(true) && (confirmed || age >= grace) {
        return Some("its pod has ended or was deleted");
    }
    if present == Some(false) && missing_for >= grace && pod != PodState::Alive {
        return Some("no container holds its IDs any more (kubelet pod-resources)");
    }
    None
}

/// The allocation state of one node.
#[derive(Debug, Clone)]
pub struct State {
    cfg: StateConfig,
    inv: NodeInventory,
    topo: Topology,
    /// Why each card is unhealthy (`None`: healthy).
    reasons: Vec<Option<String>>,
    records: BTreeMap<String, Record>,
    by_core: HashMap<String, String>,
    by_memory: HashMap<String, String>,
    core_refs: Vec<Vec<u16>>,
    memory_refs: Vec<Vec<u16>>,
    usage: Vec<CardUse>,
    pending: Vec<Pending>,
    generation: u64,
}

impl State {
    /// An empty state for the node's cards (health as the inventory says).
    pub fn new(cfg: StateConfig, inv: NodeInventory) -> Self {
        let n = inv.len();
        let reasons = inv
            .cards
            .iter()
            .map(|c| (!c.healthy).then(|| "the card did not answer at start".to_string()))
            .collect();
        let core_refs = (0..n).map(|_| vec![0u16; 100]).collect();
        let memory_refs = inv
            .cards
            .iter()
            .map(|c| vec![0u16; c.blocks() as usize])
            .collect();
        Self {
            topo: Topology::new(&inv),
            cfg,
            reasons,
            records: BTreeMap::new(),
            by_core: HashMap::new(),
            by_memory: HashMap::new(),
            core_refs,
            memory_refs,
            usage: vec![CardUse::default(); n],
            pending: Vec::new(),
            generation: 0,
            inv,
        }
    }

    /// The inventory with current health.
    pub fn inventory(&self) -> &NodeInventory {
        &self.inv
    }

    /// Why a card is unhealthy, if it is.
    pub fn unhealthy_reason(&self, card: u32) -> Option<&str> {
        self.reasons.get(card as usize).and_then(|r| r.as_deref())
    }

    /// Every record, by ID.
    pub fn records(&self) -> &BTreeMap<String, Record> {
        &self.records
    }

    /// Distinct IDs held per card.
    pub fn usage(&self) -> &[CardUse] {
        &self.usage
    }

    /// The ledger implied by the IDs held.
    pub fn ledger(&self) -> NodeLedger {
        ledger_from_usage(&self.inv, &self.usage)
    }

    /// Bumped on every change that must reach the checkpoint.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The record holding exactly these IDs.
    pub fn find(&self, kind: DeviceKind, key: &str) -> Option<&Record> {
        let map = match kind {
            DeviceKind::Core => &self.by_core,
            DeviceKind::Memory => &self.by_memory,
        };
        map.get(key).and_then(|id| self.records.get(id))
    }

    /// Set a card's health. Returns true if it changed.
    pub fn set_health(&mut self, card: u32, healthy: bool, reason: &str) -> bool {
        let Some(c) = self.inv.cards.get_mut(card as usize) else {
            return false;
        };
        if c.healthy == healthy {
            return false;
        }
        c.healthy = healthy;
        self.reasons[card as usize] = (!healthy).then(|| reason.to_string());
        true
    }

    fn healthy_mask(&self) -> u64 {
        self.inv
            .cards
            .iter()
            .take(64)
            .filter(|c| c.healthy)
            .fold(0u64, |m, c| m | (1u64 << c.index))
    }

    // ----------------------------------------------------------------------------------------
    // Records and usage

    fn add_refs(&mut self, kind: DeviceKind, set: &IdSet) {
        self.count_refs(kind, set, true);
    }

    fn remove_refs(&mut self, kind: DeviceKind, set: &IdSet) {
        self.count_refs(kind, set, false);
    }

    /// Count one more (`add`) or one less holder of every ID in `set`; a card's usage changes
    /// when an ID gets its first holder or loses its last.
    fn count_refs(&mut self, kind: DeviceKind, set: &IdSet, add: bool) {
        let refs = match kind {
            DeviceKind::Core => &mut self.core_refs,
            DeviceKind::Memory => &mut self.memory_refs,
        };
        for (&card, ks) in set.per_card() {
            for &k in ks {
                let Some(slot) = refs
                    .get_mut(card as usize)
                    .and_then(|v| v.get_mut(k as usize))
                else {
                    continue;
                };
                let edge = if add {
                    *slot = slot.saturating_add(1);
                    *slot == 1
                } else if *slot == 0 {
                    false
                } else {
                    *slot -= 1;
                    *slot == 0
                };
                if !edge {
                    continue;
                }
                let u = &mut self.usage[card as usize];
                let field = match kind {
                    DeviceKind::Core => &mut u.cores,
                    DeviceKind::Memory => &mut u.blocks,
                };
                if add {
                    *field += 1;
                } else {
                    *field -= 1;
                }
            }
        }
    }

    fn insert_record(&mut self, rec: Record) {
        self.add_refs(DeviceKind::Core, &rec.core);
        self.add_refs(DeviceKind::Memory, &rec.memory);
        if !rec.core_key.is_empty() {
            self.by_core.insert(rec.core_key.clone(), rec.id.clone());
        }
        if !rec.memory_key.is_empty() {
            self.by_memory
                .insert(rec.memory_key.clone(), rec.id.clone());
        }
        self.records.insert(rec.id.clone(), rec);
        self.generation += 1;
    }

    /// Release a record. Returns it if it existed.
    pub fn release(&mut self, id: &str) -> Option<Record> {
        let rec = self.records.remove(id)?;
        self.remove_refs(DeviceKind::Core, &rec.core);
        self.remove_refs(DeviceKind::Memory, &rec.memory);
        if self.by_core.get(&rec.core_key) == Some(&rec.id) {
            self.by_core.remove(&rec.core_key);
        }
        if self.by_memory.get(&rec.memory_key) == Some(&rec.id) {
            self.by_memory.remove(&rec.memory_key);
        }
        self.generation += 1;
        Some(rec)
    }

    fn attach_memory(&mut self, id: &str, memory: IdSet) -> Option<Record> {
        let rec = self.records.get_mut(id)?;
        rec.set_memory(memory.clone());
        let (key, rid) = (rec.memory_key.clone(), rec.id.clone());
        let copy = rec.clone();
        self.add_refs(DeviceKind::Memory, &memory);
        self.by_memory.insert(key, rid);
        self.generation += 1;
        Some(copy)
    }

    /// Restore records (from the checkpoint), checking each against the node. Returns a
    /// warning per record that could not be restored.
    pub fn restore(&mut self, records: Vec<Record>) -> Vec<String> {
        let mut warnings = Vec::new();
        for rec in records {
            let problem = if rec.core.check(DeviceKind::Core, &self.inv).is_err()
                || rec.memory.check(DeviceKind::Memory, &self.inv).is_err()
            {
                Some("its IDs name cards or positions this node no longer has".to_string())
            } else if !rec.core_key.is_empty() && self.by_core.contains_key(&rec.core_key) {
                Some("its vcuda-core IDs are recorded twice".to_string())
            } else if !rec.memory_key.is_empty() && self.by_memory.contains_key(&rec.memory_key) {
                Some("its vcuda-memory IDs are recorded twice".to_string())
            } else {
                None
            };
            match problem {
                Some(p) => warnings.push(format!("dropped checkpoint record {}: {p}", rec.id)),
                None => self.insert_record(rec),
            }
        }
        warnings
    }

    // ----------------------------------------------------------------------------------------
    // Pairing

    fn prune(&mut self, now: Instant) {
        let ttl = self.cfg.pending_ttl;
        self.pending
            .retain(|p| now.saturating_duration_since(p.at) < ttl && !p.complete());
    }

    /// The pending container a request of `kind` belongs to: the newest one, if it still
    /// misses this half (and, for an `Allocate`, one that only has a preference counts too).
    fn pairable(&self, kind: DeviceKind, for_allocate: bool) -> Option<usize> {
        let i = self.pending.len().checked_sub(1)?;
        let p = &self.pending[i];
        let other = match kind {
            DeviceKind::Core => DeviceKind::Memory,
            DeviceKind::Memory => DeviceKind::Core,
        };
        if kind == DeviceKind::Memory && p.expects_memory == Some(false) {
            return None;
        }
        match p.half(kind) {
            None => p.half(other).is_some().then_some(i),
            Some(h) if for_allocate && h.record.is_none() => Some(i),
            Some(_) => None,
        }
    }

    /// The ledger for decisions: the IDs held plus what pending containers are about to take.
    fn decision_ledger(&self, skip: Option<usize>) -> NodeLedger {
        let mut ledger = self.ledger();
        for (i, p) in self.pending.iter().enumerate() {
            if Some(i) == skip {
                continue;
            }
            let (Some(cards), Some(req)) = (&p.cards, p.request) else {
                continue;
            };
            let core_done = p.allocated(DeviceKind::Core);
            let mem_done = p.allocated(DeviceKind::Memory);
            let a = match req {
                GpuRequest::Whole { .. } if !core_done => Assignment::whole(cards),
                GpuRequest::Share { cores, blocks } => {
                    let cores = if core_done { 0 } else { cores };
                    let blocks = if mem_done { 0 } else { blocks };
                    match cards.first() {
                        Some(&c) if cores + blocks > 0 => Assignment::share(c, cores, blocks),
                        _ => continue,
                    }
                }
                GpuRequest::Whole { .. } => continue,
            };
            let _ = ledger.allocate(&a);
        }
        ledger
    }

    /// Match a request to a pending pod container that nobody holds yet.
    fn match_pod(
        &self,
        kind: DeviceKind,
        size: u32,
        cards: Option<&[u32]>,
        pods: &[Arc<PodInfo>],
        skip_pending: Option<usize>,
    ) -> Option<(Matched, MatchQuality)> {
        let mut taken: HashSet<(&str, &str, &str)> = HashSet::new();
        for r in self.records.values() {
            for p in [r.matched.as_ref(), r.owner.as_ref()].into_iter().flatten() {
                taken.insert((&p.namespace, &p.name, &p.container));
            }
        }
        for (i, p) in self.pending.iter().enumerate() {
            if Some(i) == skip_pending {
                continue;
            }
            if let Some(m) = &p.matched {
                taken.insert((&m.pod.namespace, &m.pod.name, &m.pod.container));
            }
        }
        let mut candidates = Vec::new();
        let mut refs = Vec::new();
        for pod in pods {
            if !pod.awaits_admission()
                || pod
                    .node_name
                    .as_deref()
                    .is_some_and(|n| n != self.cfg.node_name)
            {
                continue;
            }
            for c in &pod.containers {
                if taken.contains(&(pod.namespace.as_str(), pod.name.as_str(), c.name.as_str())) {
                    continue;
                }
                candidates.push(Candidate {
                    time: pod.time,
                    namespace: &pod.namespace,
                    pod: &pod.name,
                    slot: c.slot,
                    request: c.request,
                    cards: pod.assigned_cards(c.slot),
                });
                refs.push((pod, c));
            }
        }
        let (i, quality) = match_container(&candidates, kind, size, cards)?;
        let (pod, c) = refs[i];
        Some((
            Matched {
                pod: PodRef {
                    namespace: pod.namespace.clone(),
                    name: pod.name.clone(),
                    uid: pod.uid.clone(),
                    container: c.name.clone(),
                },
                slot: c.slot,
                request: c.request,
                memory_blocks: c.memory_blocks,
                assigned: pod.assigned_cards(c.slot).map(<[u32]>::to_vec),
            },
            quality,
        ))
    }

    /// The pod a record belongs to, when that is certain: its owner confirmed through
    /// pod-resources, or the pod it was matched to at Allocate while no other pod waiting on
    /// this node has an unmatched container of the same size (which the kubelet's anonymous
    /// request could have been for). `None` otherwise, or when the pod source does not show it.
    pub fn certain_pod(&self, rec: &Record, pods: &[Arc<PodInfo>]) -> Option<Arc<PodInfo>> {
        let find = |p: &PodRef| {
            pods.iter()
                .find(|i| {
                    i.namespace == p.namespace
                        && i.name == p.name
                        && (p.uid.is_empty() || i.uid.is_empty() || i.uid == p.uid)
                })
                .cloned()
        };
        if let Some(owner) = &rec.owner {
            return find(owner);
        }
        let matched = rec.matched.as_ref()?;
        let pod = find(matched)?;
        let size = rec.cores();
        let mut taken: HashSet<(&str, &str, &str)> = HashSet::new();
        for r in self.records.values() {
            for p in [r.matched.as_ref(), r.owner.as_ref()].into_iter().flatten() {
                taken.insert((&p.namespace, &p.name, &p.container));
            }
        }
        for p in &self.pending {
            if let Some(m) = &p.matched {
                taken.insert((&m.pod.namespace, &m.pod.name, &m.pod.container));
            }
        }
        let rival = pods.iter().any(|other| {
            !(other.namespace == pod.namespace && other.name == pod.name)
                && other.awaits_admission()
                && other
                    .node_name
                    .as_deref()
                    .is_none_or(|n| n == self.cfg.node_name)
                && other.containers.iter().any(|c| {
                    c.request.cores() == size
                        && !taken.contains(&(
                            other.namespace.as_str(),
                            other.name.as_str(),
                            c.name.as_str(),
                        ))
                })
        });
        (!rival).then_some(pod)
    }

    fn mismatch(&self, m: &Matched, cards: &[u32]) -> Option<RequestError> {
        let assigned = m.assigned.as_ref()?;
        if assigned.as_slice() == cards {
            return None;
        }
        let key = self.cfg.keys.gpu_idx(m.slot);
        Some(RequestError::precondition(format!(
            "pod {}/{} container {:?} was assigned card(s) {} by the scheduler ({key}={}) but the kubelet allocated devices of card(s) {}; the node's free capacity changed after scheduling or the kubelet ignored the preferred allocation. Delete the pod so that it is scheduled again",
            m.pod.namespace,
            m.pod.name,
            m.pod.container,
            encode_cards(assigned),
            encode_cards(assigned),
            encode_cards(cards),
        )))
    }

    fn check_health(&self, cards: &[u32]) -> Result<(), RequestError> {
        for &c in cards {
            if let Some(reason) = self.unhealthy_reason(c) {
                let uuid = self.inv.card(c).map_or("?", |c| c.uuid.as_str());
                return Err(RequestError::precondition(format!(
                    "card {c} ({uuid}) is unhealthy: {reason}. Its devices are reported Unhealthy to the kubelet, which stops offering them once it has processed the update; delete the pod so that it is admitted again on a healthy card"
                )));
            }
        }
        Ok(())
    }

    /// True when a request of `size` IDs of `kind` belongs to no pod the pod source shows:
    /// neither the other half of a container in progress nor any container waiting for
    /// devices. The caller then refreshes the pod source before deciding (the kubelet's watch
    /// can deliver a newly bound pod a little before ours).
    pub fn misses_pod(
        &mut self,
        kind: DeviceKind,
        size: usize,
        pods: &[Arc<PodInfo>],
        now: Instant,
    ) -> bool {
        self.prune(now);
        let size32 = u32::try_from(size).unwrap_or(u32::MAX);
        if size32 == 0 {
            return false;
        }
        let pi = self.pairable(kind, true);
        if pi.is_some_and(|i| self.pending[i].matched.is_some()) {
            return false;
        }
        self.match_pod(kind, size32, None, pods, pi).is_none()
    }

    // ----------------------------------------------------------------------------------------
    // GetPreferredAllocation

    /// The IDs to prefer for one container: never an error (an error would fail the pod's
    /// admission). At most `size` IDs, `must_include` first.
    pub fn prefer(
        &mut self,
        kind: DeviceKind,
        available: &[String],
        must_include: &[String],
        size: usize,
        pods: &[Arc<PodInfo>],
        now: Instant,
    ) -> Vec<String> {
        self.prune(now);
        let size32 = u32::try_from(size).unwrap_or(u32::MAX);
        if size == 0 {
            return Vec::new();
        }
        let avail = available_per_card(kind, available, &self.inv);
        let healthy = self.healthy_mask();
        let pi = self.pairable(kind, false);
        let room = |cards: &[u32]| -> bool {
            match (kind, cards) {
                (_, [c]) => avail.get(*c as usize).copied().unwrap_or(0) >= size32,
                (DeviceKind::Core, cs) => {
                    !cs.is_empty() && cs.iter().all(|c| avail.get(*c as usize) == Some(&100))
                }
                (DeviceKind::Memory, cs) => {
                    cs.iter()
                        .map(|c| avail.get(*c as usize).copied().unwrap_or(0))
                        .sum::<u32>()
                        >= size32
                }
            }
        };
        let ok = |cards: &[u32]| cards.iter().all(|c| healthy & (1u64 << c) != 0) && room(cards);

        let mut matched = pi.and_then(|i| self.pending[i].matched.clone());
        let mut request = pi.and_then(|i| self.pending[i].request);
        let mut cards = pi
            .and_then(|i| self.pending[i].cards.clone())
            .filter(|c| ok(c));
        if cards.is_none() {
            if matched.is_none() {
                matched = self.match_pod(kind, size32, None, pods, pi).map(|(m, _)| m);
            }
            if let Some(m) = &matched {
                request = Some(m.request);
                cards = m.assigned.clone().filter(|c| ok(c));
            }
            if cards.is_none() {
                let other_size = pi.and_then(|i| match kind {
                    DeviceKind::Core => self.pending[i].memory_size,
                    DeviceKind::Memory => self.pending[i].core_size,
                });
                cards = self.local_choice(kind, size32, request, other_size, &avail, healthy, pi);
                if request.is_none() {
                    request = derive_request(kind, size32, other_size);
                }
            }
        }
        // Remember the decision for the other half.
        let idx = match pi {
            Some(i) => i,
            None => {
                self.pending.push(Pending::new(now));
                self.pending.len() - 1
            }
        };
        let p = &mut self.pending[idx];
        *p.half_mut(kind) = Some(Half {
            preferred: true,
            record: None,
        });
        match kind {
            DeviceKind::Core => p.core_size = Some(size32),
            DeviceKind::Memory => p.memory_size = Some(size32),
        }
        if cards.is_some() {
            p.cards = cards.clone();
        }
        if p.request.is_none() {
            p.request = request;
        }
        if p.matched.is_none() {
            if let Some(m) = &matched {
                p.expects_memory = Some(m.memory_blocks > 0);
            }
            p.matched = matched;
        }
        preferred_ids(
            kind,
            available,
            must_include,
            size,
            cards.as_deref().unwrap_or(&[]),
        )
    }

    /// The node-local policy's choice for a request nobody assigned.
    #[allow(clippy::too_many_arguments)]
    fn local_choice(
        &self,
        kind: DeviceKind,
        size: u32,
        request: Option<GpuRequest>,
        other_size: Option<u32>,
        avail: &[u32],
        healthy: u64,
        skip: Option<usize>,
    ) -> Option<Vec<u32>> {
        let ledger = self.decision_ledger(skip);
        let mut policy = self.cfg.policy;
        let request = match request {
            Some(r) => r,
            None => match kind {
                DeviceKind::Core => derive_request(kind, size, other_size)?,
                DeviceKind::Memory => match other_size {
                    Some(cores) => derive_request(DeviceKind::Core, cores, Some(size))?,
                    None => {
                        // The cores are not known yet: take the card with the most free cores
                        // among those with room, so the vcuda-core half will fit there too.
                        policy = Policy::Spread;
                        GpuRequest::Share {
                            cores: 1,
                            blocks: size,
                        }
                    }
                },
            },
        };
        let eligible = healthy
            & match kind {
                DeviceKind::Core => cards_with_room(avail, request),
                DeviceKind::Memory => avail
                    .iter()
                    .enumerate()
                    .take(64)
                    .filter(|(_, &n)| n >= size || !request.is_share())
                    .fold(0u64, |m, (i, _)| m | (1u64 << i)),
            };
        let request = match (kind, request) {
            // Memory blocks of a whole-card container go to its cards; nothing to choose here.
            (DeviceKind::Memory, GpuRequest::Whole { .. }) => return None,
            (_, r) => r,
        };
        placement::choose(policy, &self.topo, &ledger, eligible, request)
    }

    // ----------------------------------------------------------------------------------------
    // Allocate

    /// Record a container's IDs of `kind`. Idempotent: the same IDs again return the
    /// existing record.
    pub fn allocate(
        &mut self,
        kind: DeviceKind,
        ids: &[String],
        pods: &[Arc<PodInfo>],
        now: Now,
    ) -> Result<Allocated, RequestError> {
        self.prune(now.instant);
        let set = IdSet::parse(kind, ids, &self.inv).map_err(|e| {
            RequestError::invalid(format!(
                "{e}. The kubelet offered a device this gpu-manager does not advertise: its device list may predate a change of the node's cards; restart the kubelet so that it takes the current device list"
            ))
        })?;
        match kind {
            DeviceKind::Core => self.allocate_core(set, pods, now),
            DeviceKind::Memory => self.allocate_memory(set, pods, now),
        }
    }

    fn allocate_core(
        &mut self,
        set: IdSet,
        pods: &[Arc<PodInfo>],
        now: Now,
    ) -> Result<Allocated, RequestError> {
        let key = set.encode();
        if let Some(rec) = self.find(DeviceKind::Core, &key) {
            return Ok(Allocated::Existing(rec.clone()));
        }
        let shape = core_shape(&set).map_err(shape_error)?;
        let cards = shape.cards();
        self.check_health(&cards)?;
        let size = set.len() as u32;
        let pi = self.pairable(DeviceKind::Core, true);
        let from_pending = pi.and_then(|i| self.pending[i].matched.clone());
        let matched = match from_pending {
            Some(m) if m.request.cores() == size => Some(m),
            _ => self
                .match_pod(DeviceKind::Core, size, Some(&cards), pods, pi)
                .map(|(m, _)| m),
        };
        if let Some(err) = matched.as_ref().and_then(|m| self.mismatch(m, &cards)) {
            return Err(err);
        }
        // A vcuda-memory half allocated first joins this record.
        let memory_record = pi
            .and_then(|i| self.pending[i].memory.as_ref())
            .and_then(|h| h.record.clone())
            .and_then(|id| self.records.get(&id).cloned())
            .filter(|r| r.shape.is_none());
        if let Some(m) = &memory_record {
            memory_with_cores(&m.memory, &cards).map_err(apart_error)?;
        }
        let mut rec = Record::for_core(set, shape.clone(), now.unix_ms);
        rec.matched = matched.as_ref().map(|m| m.pod.clone());
        if let Some(m) = memory_record {
            rec.owner = m.owner.clone();
            if rec.matched.is_none() {
                rec.matched = m.matched.clone();
            }
            self.release(&m.id);
            rec.set_memory(m.memory);
        }
        self.insert_record(rec.clone());
        let idx = match pi {
            Some(i) => i,
            None => {
                self.pending.push(Pending::new(now.instant));
                self.pending.len() - 1
            }
        };
        let p = &mut self.pending[idx];
        p.core = Some(Half {
            preferred: p.core.as_ref().is_some_and(|h| h.preferred),
            record: Some(rec.id.clone()),
        });
        p.core_size = Some(size);
        p.cards = Some(cards);
        if p.matched.is_none() {
            p.matched = matched.clone();
        }
        p.expects_memory = Some(match (&matched, &shape) {
            _ if !rec.memory.is_empty() => false,
            (Some(m), _) => m.memory_blocks > 0,
            (None, s) => s.is_share(),
        });
        if p.request.is_none() {
            p.request = matched
                .as_ref()
                .map(|m| m.request)
                .or_else(|| derive_request(DeviceKind::Core, size, p.memory_size));
        }
        if p.complete() {
            self.pending.remove(idx);
        }
        Ok(Allocated::New(rec))
    }

    fn allocate_memory(
        &mut self,
        set: IdSet,
        pods: &[Arc<PodInfo>],
        now: Now,
    ) -> Result<Allocated, RequestError> {
        let key = set.encode();
        if let Some(rec) = self.find(DeviceKind::Memory, &key) {
            return Ok(Allocated::Existing(rec.clone()));
        }
        let pi = self.pairable(DeviceKind::Memory, true);
        let core_record = pi
            .and_then(|i| self.pending[i].core.as_ref())
            .and_then(|h| h.record.clone())
            .and_then(|id| self.records.get(&id).cloned())
            .filter(|r| r.shape.is_some() && r.memory.is_empty());
        if let Some(core) = core_record {
            memory_with_cores(&set, &core.cards()).map_err(apart_error)?;
            self.check_health(&set.cards())?;
            let joined = self.attach_memory(&core.id, set);
            if let Some(i) = pi {
                if let Some(p) = self.pending.get_mut(i) {
                    p.memory = Some(Half {
                        preferred: p.memory.as_ref().is_some_and(|h| h.preferred),
                        record: Some(core.id.clone()),
                    });
                    if p.complete() {
                        self.pending.remove(i);
                    }
                }
            }
            return joined.map(Allocated::Joined).ok_or_else(|| {
                RequestError::precondition("the container's record vanished".into())
            });
        }
        // The memory half came first (or its vcuda-core half is unknown).
        let card = memory_card(&set, &self.inv).map_err(shape_error)?;
        self.check_health(&[card])?;
        let size = set.len() as u32;
        let matched = match pi.and_then(|i| self.pending[i].matched.clone()) {
            Some(m) => Some(m),
            None => self
                .match_pod(DeviceKind::Memory, size, Some(&[card]), pods, pi)
                .map(|(m, _)| m),
        };
        if let Some(m) = &matched {
            if let Some(assigned) = &m.assigned {
                if !assigned.contains(&card) {
                    if let Some(err) = self.mismatch(m, &[card]) {
                        return Err(err);
                    }
                }
            }
        }
        let mut rec = Record::for_memory(set, now.unix_ms);
        rec.matched = matched.as_ref().map(|m| m.pod.clone());
        self.insert_record(rec.clone());
        let idx = match pi {
            Some(i) => i,
            None => {
                self.pending.push(Pending::new(now.instant));
                self.pending.len() - 1
            }
        };
        let p = &mut self.pending[idx];
        p.memory = Some(Half {
            preferred: p.memory.as_ref().is_some_and(|h| h.preferred),
            record: Some(rec.id.clone()),
        });
        p.memory_size = Some(size);
        if p.cards.is_none() {
            p.cards = Some(vec![card]);
        }
        if p.matched.is_none() {
            p.matched = matched;
        }
        Ok(Allocated::New(rec))
    }

    // ----------------------------------------------------------------------------------------
    // PreStartContainer

    /// Confirm the record of these IDs. `actual` is the container pod-resources says holds
    /// them (`None` when it could not say), `actual_pod` what the pod source knows about its
    /// pod. Fails, naming both, when the IDs' cards disagree with the actual pod's assignment.
    pub fn confirm(
        &mut self,
        kind: DeviceKind,
        ids: &[String],
        actual: Option<PodRef>,
        actual_pod: Option<&PodInfo>,
    ) -> Result<Confirmation, RequestError> {
        let set = IdSet::parse(kind, ids, &self.inv).map_err(|e| {
            RequestError::invalid(format!(
                "{e}. PreStartContainer was called with devices this gpu-manager does not advertise"
            ))
        })?;
        let key = set.encode();
        let Some(id) = self.find(kind, &key).map(|r| r.id.clone()) else {
            return Err(RequestError::precondition(format!(
                "no allocation is recorded for these {} devices ({}); gpu-manager lost track of it (its checkpoint was removed and pod-resources does not list it yet). Delete the pod so that it is admitted again",
                kind,
                key
            )));
        };
        let Some(actual) = actual else {
            let record = self.records.get(&id).cloned().ok_or_else(|| {
                RequestError::precondition("the container's record vanished".into())
            })?;
            return Ok(Confirmation {
                record,
                patch: None,
            });
        };
        let cards = self.records.get(&id).map(Record::cards).unwrap_or_default();
        let container = actual_pod.and_then(|p| p.container(&actual.container));
        let assigned = match (actual_pod, container) {
            (Some(p), Some(c)) => p.assigned_cards(c.slot).map(<[u32]>::to_vec),
            _ => None,
        };
        let matched = self.records.get(&id).and_then(|r| r.matched.clone());
        if let Some(assigned) = &assigned {
            let agrees = match kind {
                DeviceKind::Core => *assigned == cards,
                DeviceKind::Memory => cards.iter().all(|c| assigned.contains(c)),
            };
            if !agrees {
                let guess = match &matched {
                    Some(m) if !m.same_container(&actual) => format!(
                        " (gpu-manager had matched them to pod {}/{} container {:?} at Allocate)",
                        m.namespace, m.name, m.container
                    ),
                    _ => String::new(),
                };
                let slot = container.map(|c| c.slot).unwrap_or(Slot::App(0));
                return Err(RequestError::precondition(format!(
                    "the kubelet gave devices of card(s) {} to pod {}/{} container {:?}{guess}, but the scheduler assigned that container card(s) {} ({}={}); the kubelet admitted pods in another order than they were bound. Delete pod {}/{} so that it is scheduled again",
                    encode_cards(&cards),
                    actual.namespace,
                    actual.name,
                    actual.container,
                    encode_cards(assigned),
                    self.cfg.keys.gpu_idx(slot),
                    encode_cards(assigned),
                    actual.namespace,
                    actual.name,
                )));
            }
        }
        let uid = actual_pod.map(|p| p.uid.clone()).unwrap_or_default();
        let owner = PodRef { uid, ..actual };
        let Some(rec) = self.records.get_mut(&id) else {
            return Err(RequestError::precondition(
                "the container's record vanished".into(),
            ));
        };
        if rec.owner.as_ref() != Some(&owner) || rec.matched.as_ref() != Some(&owner) {
            rec.owner = Some(owner.clone());
            rec.matched = Some(owner.clone());
            self.generation += 1;
        }
        let record = rec.clone();
        let patch = (self.cfg.patch_pods && kind == DeviceKind::Core).then(|| {
            let mut ann = BTreeMap::new();
            ann.insert(
                self.cfg.keys.gpu_assigned.clone(),
                encode_bool(true).to_string(),
            );
            if let (Some(c), None) = (container, &assigned) {
                ann.insert(self.cfg.keys.gpu_idx(c.slot), encode_cards(&cards));
                ann.insert(
                    self.cfg.keys.predicate_node.clone(),
                    self.cfg.node_name.clone(),
                );
            }
            (owner.namespace.clone(), owner.name.clone(), ann)
        });
        Ok(Confirmation { record, patch })
    }

    // ----------------------------------------------------------------------------------------
    // Reconciliation

    /// Reconcile with the kubelet's pod-resources `List` (`None` when it could not be asked)
    /// and the pod source: adopt containers the state does not know, set owners, release
    /// records per [`release_reason`].
    pub fn reconcile(
        &mut self,
        listed: Option<&[ListedContainer]>,
        pods: Option<&dyn PodSource>,
        now: Now,
    ) -> Reconciled {
        let mut out = Reconciled::default();
        let grace = self.cfg.gc_grace;
        let mut present_core: HashMap<String, &ListedContainer> = HashMap::new();
        let mut present_memory: HashMap<String, &ListedContainer> = HashMap::new();
        for c in listed.unwrap_or(&[]) {
            if !c.core.is_empty() {
                let set = IdSet::parse_lenient(DeviceKind::Core, &c.core, &self.inv);
                present_core.insert(set.encode(), c);
            }
            if !c.memory.is_empty() {
                let set = IdSet::parse_lenient(DeviceKind::Memory, &c.memory, &self.inv);
                present_memory.insert(set.encode(), c);
            }
        }
        let pod_ref = |c: &ListedContainer| {
            let uid = pods
                .and_then(|s| s.get(&c.namespace, &c.pod))
                .map(|p| p.uid.clone())
                .unwrap_or_default();
            PodRef {
                namespace: c.namespace.clone(),
                name: c.pod.clone(),
                uid,
                container: c.container.clone(),
            }
        };
        // Owners and presence.
        let ids: Vec<String> = self.records.keys().cloned().collect();
        let mut to_release = Vec::new();
        for id in &ids {
            let Some(rec) = self.records.get(id) else {
                continue;
            };
            let listing = if rec.core_key.is_empty() {
                present_memory.get(&rec.memory_key)
            } else {
                present_core.get(&rec.core_key)
            }
            .copied();
            let present = listed.map(|_| listing.is_some());
            let owner = listing.map(pod_ref);
            let mut changed = false;
            let rec = match self.records.get_mut(id) {
                Some(r) => r,
                None => continue,
            };
            if let Some(o) = owner {
                let learns_uid = rec
                    .owner
                    .as_ref()
                    .is_some_and(|cur| cur.uid.is_empty() && !o.uid.is_empty());
                if learns_uid || rec.owner.as_ref().is_none_or(|cur| !cur.same_container(&o)) {
                    rec.owner = Some(o.clone());
                    rec.matched = Some(o);
                    changed = true;
                }
            }
            match present {
                Some(true) if rec.missing_since_ms.is_some() => {
                    rec.missing_since_ms = None;
                    changed = true;
                }
                Some(false) if rec.missing_since_ms.is_none() => {
                    rec.missing_since_ms = Some(now.unix_ms);
                    changed = true;
                }
                _ => {}
            }
            let state = pod_state(rec.pod(), pods);
            let age = Duration::from_millis(now.unix_ms.saturating_sub(rec.created_ms));
            let missing_for = Duration::from_millis(
                rec.missing_since_ms
                    .map_or(0, |m| now.unix_ms.saturating_sub(m)),
            );
            if let Some(reason) =
                release_reason(rec.owner.is_some(), state, present, age, missing_for, grace)
            {
                to_release.push((id.clone(), reason.to_string()));
            }
            // A memory half pod-resources knows but the record does not.
            let join = listing
                .filter(|_| rec.shape.is_some() && rec.memory.is_empty())
                .map(|l| IdSet::parse_lenient(DeviceKind::Memory, &l.memory, &self.inv))
                .filter(|m| {
                    !m.is_empty()
                        && !self.by_memory.contains_key(&m.encode())
                        && memory_with_cores(m, &rec.cards()).is_ok()
                });
            if changed {
                self.generation += 1;
            }
            if let Some(m) = join {
                self.attach_memory(id, m);
            }
        }
        for (id, reason) in to_release {
            if let Some(rec) = self.release(&id) {
                out.released.push((rec, reason));
            }
        }
        out.adopted = self.adopt_all(listed.unwrap_or(&[]), pods, now);
        if let (Some(listed), Some(source)) = (listed, pods.filter(|s| s.synced())) {
            out.patches = self.owed_patches(listed, source);
        }
        out
    }

    /// The `gpu-assigned=true` patches (plus the card annotations, for pods no scheduler
    /// placed) owed to pods whose containers pod-resources lists — the kubelet's own word that
    /// it allocated their devices — but whose annotations do not say so yet.
    fn owed_patches(
        &self,
        listed: &[ListedContainer],
        source: &dyn PodSource,
    ) -> Vec<(String, String, BTreeMap<String, String>)> {
        if !self.cfg.patch_pods {
            return Vec::new();
        }
        let keys = &self.cfg.keys;
        let mut owed: BTreeMap<(String, String), BTreeMap<String, String>> = BTreeMap::new();
        for c in listed {
            if c.core.is_empty() {
                continue;
            }
            let Some(pod) = source.get(&c.namespace, &c.pod) else {
                continue;
            };
            if pod.has_ended() || pod.annotations.assigned == Some(true) {
                continue;
            }
            let core = IdSet::parse_lenient(DeviceKind::Core, &c.core, &self.inv);
            if !self.by_core.contains_key(&core.encode()) {
                continue;
            }
            let ann = owed
                .entry((pod.namespace.clone(), pod.name.clone()))
                .or_default();
            ann.insert(keys.gpu_assigned.clone(), encode_bool(true).to_string());
            if let Some(container) = pod.container(&c.container) {
                if pod.assigned_cards(container.slot).is_none() {
                    let cards: Vec<u32> = core.per_card().keys().copied().collect();
                    ann.insert(keys.gpu_idx(container.slot), encode_cards(&cards));
                    ann.insert(keys.predicate_node.clone(), self.cfg.node_name.clone());
                }
            }
        }
        owed.into_iter()
            .map(|((namespace, name), ann)| (namespace, name, ann))
            .collect()
    }

    /// Create records for listed containers whose IDs the state does not know (allocations
    /// lost with a checkpoint, or made while the state was being rebuilt).
    pub fn adopt_all(
        &mut self,
        listed: &[ListedContainer],
        pods: Option<&dyn PodSource>,
        now: Now,
    ) -> Vec<Record> {
        let mut adopted = Vec::new();
        for c in listed {
            let uid = pods
                .and_then(|s| s.get(&c.namespace, &c.pod))
                .map(|p| p.uid.clone())
                .unwrap_or_default();
            let owner = PodRef {
                namespace: c.namespace.clone(),
                name: c.pod.clone(),
                uid,
                container: c.container.clone(),
            };
            if let Some(rec) = self.adopt(c, owner, now) {
                adopted.push(rec);
            }
        }
        adopted
    }

    fn adopt(&mut self, c: &ListedContainer, owner: PodRef, now: Now) -> Option<Record> {
        let core = IdSet::parse(DeviceKind::Core, &c.core, &self.inv).ok();
        let memory = IdSet::parse(DeviceKind::Memory, &c.memory, &self.inv).ok();
        let mut rec = match (core, memory) {
            (Some(core), memory) => {
                if self.by_core.contains_key(&core.encode()) {
                    return None;
                }
                let shape = core_shape(&core).ok()?;
                let mut rec = Record::for_core(core, shape, now.unix_ms);
                if let Some(m) = memory {
                    if !self.by_memory.contains_key(&m.encode())
                        && memory_with_cores(&m, &rec.cards()).is_ok()
                    {
                        rec.set_memory(m);
                    }
                }
                rec
            }
            (None, Some(memory)) => {
                if self.by_memory.contains_key(&memory.encode()) {
                    return None;
                }
                Record::for_memory(memory, now.unix_ms)
            }
            (None, None) => return None,
        };
        rec.owner = Some(owner.clone());
        rec.matched = Some(owner);
        self.insert_record(rec.clone());
        Some(rec)
    }
}

fn pod_state(pod: Option<&PodRef>, source: Option<&dyn PodSource>) -> PodState {
    let (Some(pod), Some(source)) = (pod, source) else {
        return PodState::Unknown;
    };
    if !source.synced() {
        return PodState::Unknown;
    }
    match source.get(&pod.namespace, &pod.name) {
        None => PodState::Gone,
        Some(p) if !pod.uid.is_empty() && !p.uid.is_empty() && p.uid != pod.uid => PodState::Gone,
        Some(p) if p.has_ended() => PodState::Gone,
        Some(_) => PodState::Alive,
    }
}

/// The request implied by a size when no pod says more.
fn derive_request(kind: DeviceKind, size: u32, other: Option<u32>) -> Option<GpuRequest> {
    let (cores, blocks) = match kind {
        DeviceKind::Core => (size, other.unwrap_or(0)),
        DeviceKind::Memory => (other?, size),
    };
    match cores {
        0 => None,
        1..=99 => Some(GpuRequest::Share { cores, blocks }),
        c if c % 100 == 0 => Some(GpuRequest::Whole { cards: c / 100 }),
        _ => None,
    }
}

fn shape_error(e: ShapeError) -> RequestError {
    let advice = match &e {
        ShapeError::InvalidCores { .. } => {
            "Fix the container's vcuda-core limit and create the pod again".to_string()
        }
        ShapeError::MemoryTooLarge { largest, .. } => format!(
            "Lower the container's vcuda-memory limit to at most {largest} and create the pod again"
        ),
        ShapeError::Straddle { .. } | ShapeError::Apart { .. } => {
            "This happens when the kubelet does not follow gpu-manager's preferred allocation (too few free devices on one card, or a topology-manager policy); delete the pod so that it is scheduled again".to_string()
        }
    };
    RequestError::invalid(format!("{e}. {advice}"))
}

fn apart_error(e: ShapeError) -> RequestError {
    RequestError::precondition(format!(
        "{e}: a container's memory must be on the card of its cores. This happens when the kubelet does not follow gpu-manager's preferred allocation; delete the pod so that it is admitted again"
    ))
}

#[cfg(test)]
mod tests;
