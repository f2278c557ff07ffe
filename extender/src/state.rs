//! The cluster state the extender decides on: every node's card inventory and ledger, every
//! live GPU pod, and the in-flight reservations made at bind.
//!
//! The informers feed it one event at a time and each event touches only the pod's own node, so
//! a request never scans every pod. The ledgers are `gm_core` [`KeyedLedger`]s keyed by pod UID;
//! each pod is charged once, from whichever source is authoritative for it:
//!
//! * an in-flight **reservation** (made at bind or by the legacy predicates verb) until the pod
//!   informer shows the annotations that were written, or until `--reservation-ttl` passes;
//! * otherwise the **informer's view**: the pod's card annotations on `spec.nodeName` (or on
//!   `predicate-node` while it is unbound), charged with [`pod_assignment`].
//!
//! A charge that does not fit its node (the node lost a card, its inventory is missing, or the
//! cluster was over-committed behind our back) is kept as *pending* and retried whenever
//! capacity is released on that node, so the books always converge to the informer's truth.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use gm_core::annotations::{Keys, ModelFilter, PodAnnotations};
use gm_core::fgd::TaskType;
use gm_core::inventory::NodeInventory;
use gm_core::ledger::{pod_assignment, CardState, KeyedLedger};
use gm_core::placement::{Eligibility, NodeView};
use gm_core::request::Slot;
use gm_core::topology::Topology;
use gm_core::{Assignment, NodeLedger, PodGpuRequest, ResourceNames};
use k8s_openapi::api::core::v1::{Node, Pod};

use crate::fgd::{FgdSettings, FgdState, FgdWorkload, NodeFacts};
use crate::hash::{FastMap, NameKey};

/// A pod UID.
pub type Uid = Arc<str>;

/// A callback over GPU nodes: name, labels, inventory.
pub type GpuNodeVisitor<'a> = dyn FnMut(&str, &BTreeMap<String, String>, &NodeInventory) + 'a;

/// What the extender knows about one node's GPUs.
#[derive(Debug, Clone)]
pub(crate) enum NodeGpu {
    /// The node object exists but carries no inventory annotation (or we have not seen the
    /// node object yet).
    Missing,
    /// The inventory annotation does not decode; the message says why.
    Invalid(String),
    /// A valid inventory.
    Ready {
        inv: Arc<NodeInventory>,
        topo: Arc<Topology>,
        /// The eligibility of an unconstrained pod, computed once per inventory.
        all: Eligibility,
    },
}

/// One node.
#[derive(Debug)]
pub(crate) struct NodeSlot {
    pub name: Arc<str>,
    /// The node object exists (false for a node only referenced by pods so far, or deleted).
    pub present: bool,
    pub gpu: NodeGpu,
    pub ledger: KeyedLedger<Uid>,
    /// Charges that did not fit, retried when capacity is released.
    pub pending: BTreeMap<Uid, Assignment>,
    /// The node's labels (quota pools and models), shared with the admission webhook.
    pub labels: Arc<BTreeMap<String, String>>,
    /// `status.allocatable.cpu` in milli-cores, if the node object says.
    pub cpu_allocatable: Option<u64>,
    /// CPU requested by the pods bound (or reserved) here, milli-cores.
    pub cpu_requested: u64,
}

impl NodeSlot {
    fn new(name: Arc<str>) -> Self {
        Self {
            name,
            present: false,
            gpu: NodeGpu::Missing,
            ledger: KeyedLedger::new(NodeLedger::from_blocks([])),
            pending: BTreeMap::new(),
            labels: Arc::default(),
            cpu_allocatable: None,
            cpu_requested: 0,
        }
    }

    /// Unrequested CPU in milli-cores (`None` when the node's allocatable CPU is unknown).
    pub fn cpu_free(&self) -> Option<u64> {
        self.cpu_allocatable
            .map(|a| a.saturating_sub(self.cpu_requested))
    }

    /// The placement view of this node, when it has a usable inventory.
    pub fn view(&self) -> Option<(NodeView<'_>, Eligibility)> {
        match &self.gpu {
            NodeGpu::Ready { inv, topo, all } => Some((
                NodeView {
                    name: &self.name,
                    inventory: inv,
                    topology: topo,
                    ledger: self.ledger.ledger(),
                },
                *all,
            )),
            _ => None,
        }
    }
}

/// The screening view of one slot.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Hot {
    /// The node object exists and has a valid inventory.
    pub ready: bool,
    /// Eligibility of an unconstrained pod.
    pub all: Eligibility,
    /// Where the node's card states are in `Inner::cards`.
    pub start: u32,
    pub len: u32,
    cap: u32,
    /// Bumped whenever the slot changes: a reason worded at one generation is stale after.
    pub generation: u64,
}

/// A reason worded for one slot: valid for the same kind of pod at the same slot generation.
#[derive(Debug, Clone)]
pub(crate) struct CachedReason {
    pub generation: u64,
    pub shape: u64,
    pub text: Arc<str>,
    pub unresolvable: bool,
}

impl Default for Hot {
    fn default() -> Self {
        Self {
            ready: false,
            all: Eligibility {
                allowed: 0,
                healthy: 0,
            },
            start: 0,
            len: 0,
            cap: 0,
            generation: 0,
        }
    }
}

/// A GPU pod as the extender sees it: its request and the annotations we own.
#[derive(Debug, Clone)]
pub(crate) struct GpuPod {
    pub uid: Uid,
    pub namespace: String,
    pub name: String,
    /// `spec.nodeName`
    pub node_name: Option<String>,
    pub request: PodGpuRequest,
    /// The pod's CPU request in milli-cores (0 when it does not say or cannot be read).
    pub cpu_milli: u64,
    pub annotations: PodAnnotations,
    /// Every reserved annotation key the pod carries (ours and the device plugin's), so a
    /// re-placement can remove the ones it does not rewrite.
    pub reserved_keys: Vec<String>,
    /// Pending, not being deleted, and the device plugin has not yet said `gpu-assigned=true`:
    /// the kubelet has still to allocate its devices.
    pub awaits_devices: bool,
}

/// Why a pod is not a GPU pod we can work with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum NotGpu {
    /// No container asks for our resources (or the pod has finished).
    Plain,
    /// It asks for them in a way the resource contract forbids; the message says how.
    Invalid(String),
}

impl GpuPod {
    /// Read a pod object. Finished pods (Succeeded / Failed) are [`NotGpu::Plain`]: they hold
    /// nothing.
    pub fn parse(pod: &Pod, names: &ResourceNames, keys: &Keys) -> Result<Self, NotGpu> {
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
        if matches!(phase, Some("Succeeded") | Some("Failed")) {
            return Err(NotGpu::Plain);
        }
        let Some(spec) = pod.spec.as_ref() else {
            return Err(NotGpu::Plain);
        };
        let request = PodGpuRequest::from_pod_spec(spec, names)
            .map_err(|e| NotGpu::Invalid(e.render(names)))?;
        if request.is_empty() {
            return Err(NotGpu::Plain);
        }
        let meta = &pod.metadata;
        let uid = meta
            .uid
            .as_deref()
            .filter(|u| !u.is_empty())
            .ok_or_else(|| NotGpu::Invalid("the pod has no metadata.uid".into()))?;
        let empty = BTreeMap::new();
        let ann = meta.annotations.as_ref().unwrap_or(&empty);
        // Values of keys we own that do not decode are treated as absent: the pod is then
        // unplaced as far as we are concerned, and a new placement overwrites them.
        let (annotations, _errors) = PodAnnotations::decode(keys, ann);
        let reserved_keys = ann
            .keys()
            .filter(|k| keys.is_reserved(k))
            .cloned()
            .collect();
        let cpu_milli = gm_core::fgd::pod_cpu_milli(spec).unwrap_or_else(|problem| {
            tracing::debug!(pod = uid, %problem, "the pod's CPU request cannot be read; counted as 0");
            0
        });
        let awaits_devices = matches!(phase, None | Some("Pending"))
            && meta.deletion_timestamp.is_none()
            && annotations.assigned != Some(true);
        Ok(Self {
            uid: Arc::from(uid),
            namespace: meta.namespace.clone().unwrap_or_default(),
            name: meta.name.clone().unwrap_or_default(),
            node_name: spec.node_name.clone().filter(|n| !n.is_empty()),
            request,
            cpu_milli,
            annotations,
            reserved_keys,
            awaits_devices,
        })
    }

    /// What the pod's annotations charge, and where: the cards of `predicate-gpu-idx-*` on
    /// `spec.nodeName`, or on `predicate-node` while the pod is unbound. Annotations written
    /// for another node than the one the pod is bound to are stale and charge nothing.
    pub fn charge(&self) -> Result<Option<(String, Assignment)>, String> {
        if self.annotations.cards.is_empty() {
            return Ok(None);
        }
        let node = match (&self.node_name, &self.annotations.node) {
            (Some(bound), Some(predicted)) if bound != predicted => {
                return Err(format!(
                    "its card annotations were written for node {predicted} but it is bound to {bound}; they are ignored"
                ))
            }
            (Some(n), _) | (None, Some(n)) => n.clone(),
            (None, None) => return Ok(None),
        };
        pod_assignment(&self.request, &self.annotations.cards)
            .map(|a| Some((node, a)))
            .map_err(|e| format!("its card annotations do not match its request: {e}"))
    }
}

/// A pod's GPU containers with their cards, as the admission gate compares them (containers
/// without cards are left out: the device plugin places those itself).
fn awaiting_containers<'a>(
    request: &PodGpuRequest,
    cards: &'a BTreeMap<Slot, Vec<u32>>,
) -> Vec<gm_core::devices::AwaitingContainer<'a>> {
    request
        .containers
        .iter()
        .filter_map(|c| {
            cards
                .get(&c.slot)
                .map(|cs| gm_core::devices::AwaitingContainer {
                    request: c.request,
                    cards: cs.as_slice(),
                })
        })
        .collect()
}

/// A live GPU pod.
#[derive(Debug, Clone)]
pub(crate) struct PodRecord {
    pub pod: GpuPod,
    /// What the informer's view charges (see [`GpuPod::charge`]).
    pub charge: Option<(Arc<str>, Assignment)>,
}

/// An in-flight placement the informer has not shown yet.
#[derive(Debug, Clone)]
pub(crate) struct Reservation {
    pub node: Arc<str>,
    pub assignment: Assignment,
    pub cards: BTreeMap<Slot, Vec<u32>>,
    /// The annotations written (or being written) for it.
    pub annotations: BTreeMap<String, String>,
    pub expires: Instant,
    /// Order of reservation (set by [`Inner::reserve`]): a bind waits at the admission gate
    /// only for confusable placements reserved before it.
    pub ticket: u64,
}

/// Where a pod's charge currently sits.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Held {
    node: Arc<str>,
    assignment: Assignment,
    /// In the node's pending list rather than its ledger.
    pending: bool,
}

/// Everything behind the lock.
#[derive(Debug, Default)]
pub(crate) struct Inner {
    /// Bumped by every writer: two reads with the same generation saw the same state.
    pub generation: u64,
    pub index: FastMap<NameKey, usize>,
    pub slots: Vec<NodeSlot>,
    /// Per slot, what the screening loop reads, side by side.
    pub hot: Vec<Hot>,
    /// A copy of every node's card states, side by side (each node's range is in its `Hot`),
    /// so screening thousands of nodes streams through memory instead of chasing pointers.
    pub cards: Vec<CardState>,
    /// Per slot, the last reason worded for it (readers fill it in under the read lock).
    pub reasons: Vec<Mutex<Option<CachedReason>>>,
    pub pods: HashMap<Uid, PodRecord>,
    namespaces: HashMap<String, BTreeSet<Uid>>,
    pub reservations: HashMap<Uid, Reservation>,
    held: HashMap<Uid, Held>,
    /// Card counts by model, then by memory (MiB), over every node with an inventory.
    cards_by_model: BTreeMap<String, BTreeMap<u64, usize>>,
    /// Bumped whenever a node's presence, inventory or labels change (the webhook rebuilds
    /// its per-model card summary only then).
    node_generation: u64,
    /// The GPU pods as the admission webhook reads them: only the fields quota needs.
    slim: HashMap<Uid, Arc<Pod>>,
    /// Every pod (GPU or not) holding CPU on a node: the node's slot and its CPU request.
    cpu: HashMap<Uid, (usize, u64)>,
    /// FGD's workload, per-node access, host counts and score cache.
    pub fgd: FgdState,
    /// Per node, the cached GPU pods placed there whose devices the kubelet has not allocated
    /// yet (see [`GpuPod::awaits_devices`]); the admission gate reads them.
    awaiting: HashMap<Arc<str>, HashSet<Uid>>,
    /// The last reservation ticket handed out.
    last_ticket: u64,
}

impl Inner {
    /// The slot of a node, if the node is known.
    pub fn slot(&self, name: &str) -> Option<&NodeSlot> {
        self.index.get(name.as_bytes()).map(|&i| &self.slots[i])
    }

    fn slot_index(&mut self, name: &str) -> usize {
        if let Some(&i) = self.index.get(name.as_bytes()) {
            return i;
        }
        let name: Arc<str> = Arc::from(name);
        self.slots.push(NodeSlot::new(name.clone()));
        self.hot.push(Hot::default());
        self.reasons.push(Mutex::new(None));
        self.fgd.push_slot();
        let i = self.slots.len() - 1;
        self.index.insert(NameKey::new(&name), i);
        i
    }

    /// Refresh the screening copy of slot `i` after its ledger, inventory or presence changed.
    fn sync(&mut self, i: usize) {
        let slot = &self.slots[i];
        let cards = slot.ledger.ledger().cards();
        let hot = &mut self.hot[i];
        let (ready, all) = match &slot.gpu {
            NodeGpu::Ready { all, .. } if slot.present => (true, *all),
            _ => (false, Hot::default().all),
        };
        hot.ready = ready;
        hot.all = all;
        hot.generation = hot.generation.wrapping_add(1);
        let len = u32::try_from(cards.len()).unwrap_or(u32::MAX);
        if len > hot.cap {
            hot.start = u32::try_from(self.cards.len()).unwrap_or(u32::MAX);
            hot.cap = len;
            self.cards.extend_from_slice(cards);
        } else {
            let start = hot.start as usize;
            self.cards[start..start + cards.len()].copy_from_slice(cards);
        }
        hot.len = len;
        self.fgd_node(i, false);
    }

    /// Tell FGD's bookkeeping that slot `i` changed.
    fn fgd_node(&mut self, i: usize, inventory_changed: bool) {
        if self.fgd.model.is_none() {
            return;
        }
        let slot = &self.slots[i];
        let facts = match &slot.gpu {
            NodeGpu::Ready { inv, all, .. } if slot.present => Some(NodeFacts {
                inventory: inv,
                cards: slot.ledger.ledger().cards(),
                healthy: all.healthy,
                cpu_free: slot.cpu_free(),
                cpu_allocatable: slot.cpu_allocatable,
            }),
            _ => None,
        };
        self.fgd.set_node(i, facts, inventory_changed);
    }

    /// Recompile the learned FGD workload when enough pods came or went.
    fn fgd_maintain(&mut self) {
        if self.fgd.due() {
            self.fgd.recompile();
            for i in 0..self.slots.len() {
                self.fgd_node(i, true);
            }
        }
    }

    /// Move the CPU charge of pod `uid` to `want` (slot, milli-cores), or drop it.
    fn set_cpu(&mut self, uid: &str, want: Option<(usize, u64)>) {
        let have = self.cpu.get(uid).copied();
        if have == want {
            return;
        }
        let key: Uid = match self.cpu.remove_entry(uid) {
            Some((k, _)) => k,
            None => Arc::from(uid),
        };
        if let Some((i, m)) = have {
            self.slots[i].cpu_requested = self.slots[i].cpu_requested.saturating_sub(m);
            self.cpu_changed(i);
        }
        if let Some((i, m)) = want {
            self.cpu.insert(key, (i, m));
            self.slots[i].cpu_requested = self.slots[i].cpu_requested.saturating_add(m);
            self.cpu_changed(i);
        }
    }

    fn cpu_changed(&mut self, i: usize) {
        let hot = &mut self.hot[i];
        hot.generation = hot.generation.wrapping_add(1);
        self.fgd_node(i, false);
    }

    /// Where a GPU pod's CPU is held: with its cards, else on the node it is bound to.
    fn reconcile_cpu(&mut self, uid: &str) {
        let want = self.pods.get(uid).and_then(|rec| {
            let node = match self.held.get(uid) {
                Some(h) => h.node.clone(),
                None => Arc::from(rec.pod.node_name.as_deref()?),
            };
            (rec.pod.cpu_milli > 0).then_some((node, rec.pod.cpu_milli))
        });
        let want = want.map(|(node, m)| (self.slot_index(&node), m));
        self.set_cpu(uid, want);
    }

    /// A pod that is not a GPU pod holds `want` (node, milli-cores) of CPU.
    fn set_plain_cpu(&mut self, uid: &str, want: Option<(&str, u64)>) {
        let want = want.map(|(n, m)| (self.slot_index(n), m));
        self.set_cpu(uid, want);
    }

    /// The free CPU of node `node` as pod `uid` sees it: with its own CPU given back when it
    /// is held there.
    pub(crate) fn cpu_free_seen_by(&self, uid: &str, node: &str) -> Option<u64> {
        let &i = self.index.get(node.as_bytes())?;
        let free = self.slots[i].cpu_free()?;
        Some(match self.cpu.get(uid) {
            Some(&(j, m)) if j == i => free.saturating_add(m),
            _ => free,
        })
    }

    /// Does the plain pod `uid` hold exactly `want` already?
    fn holds_cpu(&self, uid: &str, want: Option<(&str, u64)>) -> bool {
        match (self.cpu.get(uid), want) {
            (None, None) => true,
            (Some(&(i, m)), Some((n, wm))) => m == wm && self.index.get(n.as_bytes()) == Some(&i),
            _ => false,
        }
    }

    /// The screening copy of a slot's card states.
    pub fn hot_cards(&self, hot: &Hot) -> &[CardState] {
        let start = hot.start as usize;
        self.cards
            .get(start..start + hot.len as usize)
            .unwrap_or(&[])
    }

    /// Slot index of every name (`u32::MAX` for names not known).
    pub fn resolve(&self, names: &[&str]) -> Vec<u32> {
        names
            .iter()
            .map(|n| {
                self.index
                    .get(n.as_bytes())
                    .map_or(u32::MAX, |&j| u32::try_from(j).unwrap_or(u32::MAX))
            })
            .collect()
    }

    /// Where the pod's charge should sit: its reservation, else the informer's view.
    fn desired(&self, uid: &str) -> Option<(Arc<str>, Assignment)> {
        if let Some(r) = self.reservations.get(uid) {
            return Some((r.node.clone(), r.assignment.clone()));
        }
        self.pods.get(uid).and_then(|p| p.charge.clone())
    }

    /// Node and assignment the pod holds in a ledger (not pending), if any.
    pub fn holding(&self, uid: &str) -> Option<(&Arc<str>, &Assignment)> {
        self.held
            .get(uid)
            .filter(|h| !h.pending)
            .map(|h| (&h.node, &h.assignment))
    }

    /// Move the pod's charges (cards and CPU) to where they should be.
    fn reconcile(&mut self, uid: &Uid) {
        self.reconcile_cards(uid);
        self.reconcile_cpu(uid);
    }

    fn reconcile_cards(&mut self, uid: &Uid) {
        let want = self.desired(uid);
        let have = self
            .held
            .get(uid)
            .map(|h| (h.node.clone(), h.assignment.clone()));
        if want == have {
            return;
        }
        let mut freed = None;
        if let Some(h) = self.held.remove(uid) {
            let i = self.slot_index(&h.node);
            let slot = &mut self.slots[i];
            if h.pending {
                slot.pending.remove(uid);
            } else {
                slot.ledger.release(uid);
                freed = Some(i);
            }
            self.sync(i);
        }
        if let Some((node, assignment)) = want {
            let i = self.slot_index(&node);
            let slot = &mut self.slots[i];
            let pending = match slot.ledger.allocate(uid.clone(), assignment.clone()) {
                Ok(_) => false,
                Err(e) => {
                    tracing::warn!(pod = %uid, node = %node, error = %e, "charge does not fit the node; kept pending");
                    slot.pending.insert(uid.clone(), assignment.clone());
                    true
                }
            };
            self.held.insert(
                uid.clone(),
                Held {
                    node,
                    assignment,
                    pending,
                },
            );
            self.sync(i);
        }
        if let Some(i) = freed {
            self.retry_pending(i);
        }
    }

    /// Charge pending holdings of a node that fit now, in UID order.
    fn retry_pending(&mut self, i: usize) {
        let slot = &mut self.slots[i];
        if slot.pending.is_empty() {
            return;
        }
        let mut placed = Vec::new();
        for (uid, a) in &slot.pending {
            if slot.ledger.ledger().check(a).is_ok()
                && slot.ledger.allocate(uid.clone(), a.clone()).is_ok()
            {
                placed.push(uid.clone());
            }
        }
        for uid in placed {
            slot.pending.remove(&uid);
            if let Some(h) = self.held.get_mut(&uid) {
                h.pending = false;
            }
        }
        self.sync(i);
    }

    fn set_gpu(&mut self, i: usize, gpu: NodeGpu) {
        let old = std::mem::replace(&mut self.slots[i].gpu, gpu);
        if let NodeGpu::Ready { inv, .. } = &old {
            for c in &inv.cards {
                if let Some(m) = self.cards_by_model.get_mut(&c.model) {
                    if let Some(n) = m.get_mut(&c.memory_mib) {
                        *n -= 1;
                        if *n == 0 {
                            m.remove(&c.memory_mib);
                        }
                    }
                    if m.is_empty() {
                        self.cards_by_model.remove(&c.model);
                    }
                }
            }
        }
        let blocks: Vec<u32> = match &self.slots[i].gpu {
            NodeGpu::Ready { inv, .. } => {
                for c in &inv.cards {
                    *self
                        .cards_by_model
                        .entry(c.model.clone())
                        .or_default()
                        .entry(c.memory_mib)
                        .or_default() += 1;
                }
                inv.cards.iter().map(|c| c.blocks()).collect()
            }
            _ => Vec::new(),
        };
        let slot = &mut self.slots[i];
        let same_cards = slot
            .ledger
            .ledger()
            .cards()
            .iter()
            .map(|c| c.total_blocks)
            .eq(blocks.iter().copied());
        if !same_cards {
            let dropped = slot.ledger.rebase(NodeLedger::from_blocks(blocks));
            for (uid, a, e) in dropped {
                tracing::warn!(pod = %uid, node = %slot.name, error = %e, "charge no longer fits the node's cards; kept pending");
                slot.pending.insert(uid.clone(), a);
                if let Some(h) = self.held.get_mut(&uid) {
                    h.pending = true;
                }
            }
        }
        self.retry_pending(i);
        self.sync(i);
        self.fgd_node(i, true);
    }

    fn upsert_pod(&mut self, pod: GpuPod) {
        let uid = pod.uid.clone();
        let charge = match pod.charge() {
            Ok(c) => c.map(|(n, a)| (Arc::<str>::from(n.as_str()), a)),
            Err(problem) => {
                tracing::debug!(pod = %format!("{}/{}", pod.namespace, pod.name), %problem, "pod charges nothing");
                None
            }
        };
        if let Some(r) = self.reservations.get(&uid) {
            if charge
                .as_ref()
                .is_some_and(|(n, a)| *n == r.node && *a == r.assignment)
            {
                // The informer shows what we wrote: the reservation has done its job.
                self.reservations.remove(&uid);
            }
        }
        self.unindex_awaiting(&uid);
        if let (true, Some((node, _))) = (pod.awaits_devices, &charge) {
            self.awaiting
                .entry(node.clone())
                .or_default()
                .insert(uid.clone());
        }
        let old_ns = self.pods.get(&uid).map(|o| o.pod.namespace.clone());
        if let Some(ns) = old_ns.filter(|ns| *ns != pod.namespace) {
            self.unindex_namespace(&uid, &ns);
        }
        self.namespaces
            .entry(pod.namespace.clone())
            .or_default()
            .insert(uid.clone());
        let task = TaskType::of_pod(
            pod.cpu_milli,
            &pod.request,
            pod.annotations.filter.models.entries(),
        );
        self.pods.insert(uid.clone(), PodRecord { pod, charge });
        self.reconcile(&uid);
        if self.fgd.observe(&uid, task) {
            self.fgd_maintain();
        }
    }

    fn unindex_namespace(&mut self, uid: &str, ns: &str) {
        if let Some(set) = self.namespaces.get_mut(ns) {
            set.remove(uid);
            if set.is_empty() {
                self.namespaces.remove(ns);
            }
        }
    }

    /// Take a pod out of the per-node index of pods awaiting devices.
    fn unindex_awaiting(&mut self, uid: &str) {
        let Some((node, _)) = self.pods.get(uid).and_then(|r| r.charge.as_ref()) else {
            return;
        };
        if let Some(set) = self.awaiting.get_mut(node) {
            set.remove(uid);
            if set.is_empty() {
                self.awaiting.remove(node);
            }
        }
    }

    /// The admission gate: the pods whose placement on `node` the kubelet could confuse with
    /// the placement of `uid` (its `request` on `cards`), because they wait for devices too —
    /// cached pods the kubelet has yet to admit, and reservations made before `ticket`.
    /// Empty when `uid` may be bound now. See `gm_core::devices::confusable`.
    ///
    /// A cached pod placed more than `window` before `now_nanos` (its `predicate-time`, unix
    /// nanoseconds) no longer counts: the kubelet admits a bound pod within seconds, and the
    /// device plugin only confirms it at container start, after the image pull — a pod stuck
    /// in `ImagePullBackOff` must not hold up the node for ever.
    #[allow(clippy::too_many_arguments)]
    pub fn gate_blockers(
        &self,
        uid: &Uid,
        node: &str,
        request: &PodGpuRequest,
        cards: &BTreeMap<Slot, Vec<u32>>,
        ticket: u64,
        now_nanos: u64,
        window: Duration,
    ) -> Vec<String> {
        let window_nanos = u64::try_from(window.as_nanos()).unwrap_or(u64::MAX);
        let mine = awaiting_containers(request, cards);
        if mine.is_empty() {
            return Vec::new();
        }
        let mut blockers = Vec::new();
        let mut seen: HashSet<&Uid> = HashSet::new();
        // `rec` placed on `cards` blocks when the kubelet could confuse it with `uid`.
        let check = |rec: &PodRecord, cards: &BTreeMap<Slot, Vec<u32>>, out: &mut Vec<String>| {
            let theirs = awaiting_containers(&rec.pod.request, cards);
            if gm_core::devices::confusable(&mine, &theirs).is_some() {
                out.push(format!("{}/{}", rec.pod.namespace, rec.pod.name));
            }
        };
        let cached = self.awaiting.get(node).into_iter().flatten();
        for other in cached {
            if other == uid {
                continue;
            }
            let Some(rec) = self.pods.get(other) else {
                continue;
            };
            seen.insert(other);
            let placed = rec.pod.annotations.time.unwrap_or(now_nanos);
            if now_nanos.saturating_sub(placed) > window_nanos {
                continue;
            }
            check(rec, &rec.pod.annotations.cards, &mut blockers);
        }
        for (other, r) in &self.reservations {
            if other == uid || r.ticket >= ticket || &*r.node != node || seen.contains(other) {
                continue;
            }
            let Some(rec) = self.pods.get(other) else {
                continue;
            };
            if !rec.pod.awaits_devices {
                continue;
            }
            check(rec, &r.cards, &mut blockers);
        }
        blockers.sort();
        blockers
    }

    fn remove_pod(&mut self, uid: &str) {
        let Some(key) = self
            .pods
            .get_key_value(uid)
            .map(|(k, _)| k.clone())
            .or_else(|| self.reservations.get_key_value(uid).map(|(k, _)| k.clone()))
        else {
            self.set_cpu(uid, None);
            return;
        };
        self.unindex_awaiting(uid);
        if let Some(rec) = self.pods.remove(uid) {
            self.unindex_namespace(uid, &rec.pod.namespace);
        }
        self.slim.remove(uid);
        self.reservations.remove(uid);
        self.reconcile(&key);
        self.fgd.forget(uid);
        self.fgd_maintain();
    }

    /// Record a reservation for `uid` and charge it (releasing whatever the pod held before).
    pub fn reserve(&mut self, uid: &Uid, mut r: Reservation) -> Result<(), String> {
        r.ticket = match self.reservations.get(uid) {
            Some(old) if old.node == r.node => old.ticket,
            _ => {
                self.last_ticket += 1;
                self.last_ticket
            }
        };
        let (node, assignment) = (r.node.clone(), r.assignment.clone());
        self.reservations.insert(uid.clone(), r);
        self.reconcile(uid);
        match self.held.get(uid) {
            Some(h) if !h.pending && h.node == node && h.assignment == assignment => Ok(()),
            _ => {
                self.reservations.remove(uid);
                self.reconcile(uid);
                Err(format!(
                    "the cards chosen on node {node} are no longer free"
                ))
            }
        }
    }

    /// Drop the pod's reservation if it is still the one described, and give its cards back
    /// unless the informer shows the pod holding them.
    pub fn cancel(&mut self, uid: &Uid, node: &str, assignment: &Assignment) {
        let ours = self
            .reservations
            .get(uid)
            .is_some_and(|r| &*r.node == node && r.assignment == *assignment);
        if ours {
            self.reservations.remove(uid);
            self.reconcile(uid);
        }
    }

    /// Forget the informer's charge of a pod whose annotations we just removed.
    pub fn forget_charge(&mut self, uid: &Uid) {
        if let Some(rec) = self.pods.get_mut(uid) {
            rec.charge = None;
        }
        self.reconcile(uid);
    }
}

/// The shared cluster state. Cheap to read concurrently; every writer holds the lock only for
/// in-memory work, never across an API call.
#[derive(Debug)]
pub struct ClusterState {
    names: ResourceNames,
    keys: Keys,
    reservation_ttl: Duration,
    inner: RwLock<Inner>,
    nodes_synced: AtomicBool,
    pods_synced: AtomicBool,
    memo: Mutex<Option<Arc<ScreenMemo>>>,
    resolution: Mutex<Option<Arc<Resolution>>>,
}

/// Node names back to back in one buffer, so a request's list can be checked against a
/// remembered one in one sequential scan.
#[derive(Debug, Default)]
pub(crate) struct NameList {
    names: String,
    /// End offset of each name in `names`.
    ends: Vec<u32>,
}

impl NameList {
    pub fn new<'a>(names: impl ExactSizeIterator<Item = &'a str>) -> Self {
        let mut list = Self {
            names: String::with_capacity(names.len() * 16),
            ends: Vec::with_capacity(names.len()),
        };
        for n in names {
            list.names.push_str(n);
            list.ends
                .push(u32::try_from(list.names.len()).unwrap_or(u32::MAX));
        }
        list
    }

    /// Exactly these names, in this order?
    pub fn matches(&self, names: &[&str]) -> bool {
        if names.len() != self.ends.len() {
            return false;
        }
        let buf = self.names.as_bytes();
        let mut start = 0usize;
        for (n, &end) in names.iter().zip(&self.ends) {
            let end = end as usize;
            if buf.get(start..end) != Some(n.as_bytes()) {
                return false;
            }
            start = end;
        }
        true
    }
}

/// A node list to recognise later: its exact JSON text when it came as `NodeNames` (checked
/// with one comparison of bytes), else the names themselves.
#[derive(Debug)]
pub(crate) enum ListKey {
    Json(Vec<u8>),
    Names(NameList),
}

impl ListKey {
    /// The key of `names[i]` for each `i` of `pick`, as kube-scheduler would send them in
    /// `NodeNames`. A name borrowed from a request body had no escapes there, so it is written
    /// as is; others go through the JSON encoder.
    pub fn of(names: &[std::borrow::Cow<'_, str>], pick: impl Iterator<Item = usize>) -> Self {
        let mut out = Vec::with_capacity(names.len() * 18 + 2);
        out.push(b'[');
        for (k, i) in pick.enumerate() {
            if k > 0 {
                out.push(b',');
            }
            match &names[i] {
                std::borrow::Cow::Borrowed(n) => {
                    out.push(b'"');
                    out.extend_from_slice(n.as_bytes());
                    out.push(b'"');
                }
                std::borrow::Cow::Owned(n) => {
                    // Writing a string into a Vec cannot fail.
                    let _ = serde_json::to_writer(&mut out, n);
                }
            }
        }
        out.push(b']');
        ListKey::Json(out)
    }

    /// Is `names` (whose `NodeNames` text is `json`, when known) exactly this list?
    pub fn matches(&self, names: &[&str], json: Option<&[u8]>) -> bool {
        match (self, json) {
            (ListKey::Json(a), Some(b)) => a.as_slice() == b,
            (ListKey::Json(a), None) => {
                let cows: Vec<std::borrow::Cow<'_, str>> = names
                    .iter()
                    .map(|n| std::borrow::Cow::Owned(n.to_string()))
                    .collect();
                matches!(ListKey::of(&cows, 0..cows.len()), ListKey::Json(b) if *a == b)
            }
            (ListKey::Names(list), _) => list.matches(names),
        }
    }
}

/// The fitting nodes and their raw scores one filter found for one pod, in answer order,
/// valid while the state's generation is unchanged. kube-scheduler calls prioritize right
/// after filter with exactly those nodes, so prioritize need not screen them again.
#[derive(Debug)]
pub(crate) struct ScreenMemo {
    pub uid: Uid,
    pub policy: crate::policy::ExtenderPolicy,
    pub generation: u64,
    pub nodes: ListKey,
    pub scores: Vec<i64>,
}

/// The slots of one candidate list. A name never changes slot, so this stays right for as long
/// as it has no unknown names, or the set of slots has not grown. kube-scheduler sends its node
/// list in the same order request after request: the lookups are done once, and a repeated list
/// is recognised by comparing its JSON text in one go.
#[derive(Debug)]
pub(crate) struct Resolution {
    nodes: ListKey,
    pub slots: Vec<u32>,
    slot_count: usize,
    complete: bool,
}

/// One card a pod is placed on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlacedCard {
    pub index: u32,
    pub model: String,
    pub memory_mib: u64,
}

/// A live GPU pod, for the admission webhook (quota) and for diagnostics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuPodInfo {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// What the pod asks for, per container.
    pub request: PodGpuRequest,
    /// The node it is bound to or placed on (`None` while unplaced).
    pub node: Option<String>,
    /// The cards of each GPU container, when placed.
    pub cards: BTreeMap<Slot, Vec<u32>>,
    /// The distinct cards it is placed on, with their model (empty while unplaced or when the
    /// node's inventory is unknown).
    pub placed_cards: Vec<PlacedCard>,
    /// True while the placement is an in-flight reservation the informer has not shown yet.
    pub in_flight: bool,
}

impl ClusterState {
    /// An empty state for resources under `names`. Reservations expire after `reservation_ttl`.
    pub fn new(names: ResourceNames, reservation_ttl: Duration) -> Self {
        Self {
            keys: Keys::new(&names),
            names,
            reservation_ttl,
            inner: RwLock::new(Inner::default()),
            nodes_synced: AtomicBool::new(false),
            pods_synced: AtomicBool::new(false),
            memo: Mutex::new(None),
            resolution: Mutex::new(None),
        }
    }

    pub fn names(&self) -> &ResourceNames {
        &self.names
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    pub fn reservation_ttl(&self) -> Duration {
        self.reservation_ttl
    }

    pub(crate) fn read(&self) -> RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn write(&self) -> RwLockWriteGuard<'_, Inner> {
        let mut inner = self.write_quiet();
        inner.generation = inner.generation.wrapping_add(1);
        inner
    }

    /// The write lock without a new generation: the caller bumps it if a decision could see
    /// the change.
    fn write_quiet(&self) -> RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Use `settings` for FGD and `fgd+` (a configured workload is compiled at once). Call
    /// before the informers start.
    pub fn with_fgd(self, settings: FgdSettings) -> Self {
        {
            let mut inner = self.write();
            let slots = inner.slots.len();
            inner.fgd = FgdState::new(settings);
            for _ in 0..slots {
                inner.fgd.push_slot();
            }
            for i in 0..slots {
                inner.fgd_node(i, true);
            }
        }
        self
    }

    /// Remember the nodes a filter found fitting, for the prioritize call that follows.
    pub(crate) fn remember(&self, memo: ScreenMemo) {
        *self.memo.lock().unwrap_or_else(PoisonError::into_inner) = Some(Arc::new(memo));
    }

    /// The slots of `names` (whose JSON text is `json`, when known), from the last filter's
    /// lookups when it had the same list.
    pub(crate) fn resolve_cached(
        &self,
        inner: &Inner,
        names: &[&str],
        json: Option<&[u8]>,
    ) -> Arc<Resolution> {
        let cached = self
            .resolution
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if let Some(r) = cached {
            if (r.complete || r.slot_count == inner.slots.len()) && r.nodes.matches(names, json) {
                return r;
            }
        }
        let slots = inner.resolve(names);
        let r = Arc::new(Resolution {
            nodes: match json {
                Some(j) => ListKey::Json(j.to_vec()),
                None => ListKey::Names(NameList::new(names.iter().copied())),
            },
            complete: slots.iter().all(|&j| j != u32::MAX),
            slots,
            slot_count: inner.slots.len(),
        });
        *self
            .resolution
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(r.clone());
        r
    }

    /// The last filter's fitting nodes, if any.
    pub(crate) fn recall(&self) -> Option<Arc<ScreenMemo>> {
        self.memo
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    // ---- informer input ----

    /// A node was added or changed.
    pub fn apply_node(&self, node: &Node) {
        let Some(name) = node.metadata.name.as_deref().filter(|n| !n.is_empty()) else {
            return;
        };
        let gpu = node_gpu(node, &self.keys);
        let labels = node.metadata.labels.clone().unwrap_or_default();
        let cpu = allocatable_cpu(node);
        let mut inner = self.write();
        let i = inner.slot_index(name);
        if inner.slots[i].cpu_allocatable != cpu {
            inner.slots[i].cpu_allocatable = cpu;
            inner.cpu_changed(i);
        }
        if !inner.slots[i].present {
            inner.slots[i].present = true;
            inner.sync(i);
            inner.node_generation += 1;
        }
        if *inner.slots[i].labels != labels {
            inner.slots[i].labels = Arc::new(labels);
            inner.node_generation += 1;
        }
        let unchanged = match (&inner.slots[i].gpu, &gpu) {
            (NodeGpu::Ready { inv: a, .. }, NodeGpu::Ready { inv: b, .. }) => a == b,
            (NodeGpu::Missing, NodeGpu::Missing) => true,
            (NodeGpu::Invalid(a), NodeGpu::Invalid(b)) => a == b,
            _ => false,
        };
        if !unchanged {
            if let NodeGpu::Invalid(problem) = &gpu {
                tracing::warn!(node = name, %problem, "node inventory is invalid; the node gets no GPU pods");
            }
            inner.set_gpu(i, gpu);
            inner.node_generation += 1;
        }
    }

    /// A node was deleted.
    pub fn delete_node(&self, name: &str) {
        let mut inner = self.write();
        if let Some(&i) = inner.index.get(name.as_bytes()) {
            inner.node_generation += 1;
            inner.slots[i].present = false;
            inner.set_gpu(i, NodeGpu::Missing);
            inner.sync(i);
        }
    }

    /// After a full relist of nodes: every node not in `seen` was deleted.
    pub fn retain_nodes(&self, seen: &HashSet<String>) {
        let gone: Vec<String> = {
            let inner = self.read();
            inner
                .slots
                .iter()
                .filter(|s| s.present && !seen.contains(&*s.name))
                .map(|s| s.name.to_string())
                .collect()
        };
        for n in gone {
            self.delete_node(&n);
        }
    }

    /// A pod was added or changed.
    pub fn apply_pod(&self, pod: &Pod) {
        let Some(uid) = pod.metadata.uid.as_deref().filter(|u| !u.is_empty()) else {
            return;
        };
        match GpuPod::parse(pod, &self.names, &self.keys) {
            Ok(p) => {
                let slim = Arc::new(slim_pod(pod));
                let mut inner = self.write();
                inner.upsert_pod(p);
                inner.slim.insert(Uid::from(uid), slim);
            }
            Err(not_gpu) => {
                if let NotGpu::Invalid(problem) = not_gpu {
                    tracing::debug!(pod = uid, %problem, "pod's GPU request is invalid; it is not accounted");
                }
                // Its CPU still counts on its node (FGD's fragmentation reads the node's CPU).
                let cpu = plain_cpu(pod);
                let want = cpu.as_ref().map(|(n, m)| (n.as_str(), *m));
                {
                    let inner = self.read();
                    let known =
                        inner.pods.contains_key(uid) || inner.reservations.contains_key(uid);
                    if !known && inner.holds_cpu(uid, want) {
                        return;
                    }
                }
                let mut inner = self.write_quiet();
                let ready_before = inner.cpu.get(uid).is_some_and(|&(i, _)| inner.hot[i].ready);
                if inner.pods.contains_key(uid) || inner.reservations.contains_key(uid) {
                    inner.generation = inner.generation.wrapping_add(1);
                    inner.remove_pod(uid);
                }
                inner.set_plain_cpu(uid, want);
                let ready_after = inner.cpu.get(uid).is_some_and(|&(i, _)| inner.hot[i].ready);
                if ready_before || ready_after {
                    inner.generation = inner.generation.wrapping_add(1);
                }
            }
        }
    }

    /// A pod was deleted.
    pub fn delete_pod(&self, uid: &str) {
        self.write().remove_pod(uid);
    }

    /// After a full relist of pods: every pod not in `seen` (UIDs) is gone.
    pub fn retain_pods(&self, seen: &HashSet<String>) {
        let mut inner = self.write();
        let gone: Vec<Uid> = inner
            .pods
            .keys()
            .chain(inner.reservations.keys())
            .chain(inner.cpu.keys())
            .filter(|u| !seen.contains(&***u))
            .cloned()
            .collect();
        for uid in gone {
            inner.remove_pod(&uid);
        }
    }

    /// The node informer has delivered its first complete list.
    pub fn mark_nodes_synced(&self) {
        self.nodes_synced.store(true, Ordering::Release);
    }

    /// The pod informer has delivered its first complete list (the learned FGD workload is
    /// compiled now).
    pub fn mark_pods_synced(&self) {
        {
            let mut inner = self.write();
            inner.fgd.mark_synced();
            inner.fgd_maintain();
        }
        self.pods_synced.store(true, Ordering::Release);
    }

    /// Both informers have delivered a complete list.
    pub fn is_synced(&self) -> bool {
        self.nodes_synced.load(Ordering::Acquire) && self.pods_synced.load(Ordering::Acquire)
    }

    /// End reservations whose time is up (the informer never showed them). Returns how many.
    pub fn expire_reservations(&self, now: Instant) -> usize {
        let mut inner = self.write();
        let expired: Vec<Uid> = inner
            .reservations
            .iter()
            .filter(|(_, r)| r.expires <= now)
            .map(|(u, _)| u.clone())
            .collect();
        for uid in &expired {
            tracing::info!(pod = %uid, "reservation expired before the informer showed the pod's annotations");
            inner.reservations.remove(uid);
            inner.reconcile(uid);
        }
        expired.len()
    }

    // ---- reads for the webhook, metrics and tests ----

    /// The memory of the largest card in the cluster, in MiB.
    pub fn largest_card_mib(&self) -> Option<u64> {
        let inner = self.read();
        inner
            .cards_by_model
            .values()
            .filter_map(|m| m.keys().next_back())
            .max()
            .copied()
    }

    /// The memory of the largest card of each model, in MiB.
    pub fn largest_card_mib_by_model(&self) -> BTreeMap<String, u64> {
        let inner = self.read();
        inner
            .cards_by_model
            .iter()
            .filter_map(|(model, m)| m.keys().next_back().map(|&mib| (model.clone(), mib)))
            .collect()
    }

    /// The memory of the largest card whose model `models` accepts (see
    /// `gm_core::annotations::ModelFilter`), in MiB.
    pub fn largest_card_mib_matching(&self, models: &ModelFilter) -> Option<u64> {
        let inner = self.read();
        inner
            .cards_by_model
            .iter()
            .filter(|(model, _)| models.matches(model))
            .filter_map(|(_, m)| m.keys().next_back())
            .max()
            .copied()
    }

    /// Changes whenever a node appears or disappears, or its inventory or labels change.
    pub fn node_generation(&self) -> u64 {
        self.read().node_generation
    }

    /// Visit every present node with a valid GPU inventory: name, labels, inventory.
    pub fn for_each_gpu_node(&self, visit: &mut GpuNodeVisitor<'_>) {
        let inner = self.read();
        for slot in inner.slots.iter().filter(|s| s.present) {
            if let NodeGpu::Ready { inv, .. } = &slot.gpu {
                visit(&slot.name, &slot.labels, inv);
            }
        }
    }

    /// The live GPU pods of a namespace as Pod objects reduced to what quota accounting reads
    /// (metadata, containers' resources, node name and selectors, affinity, phase).
    pub fn namespace_gpu_pods(&self, namespace: &str) -> Vec<Arc<Pod>> {
        let inner = self.read();
        inner
            .namespaces
            .get(namespace)
            .into_iter()
            .flatten()
            .filter_map(|uid| inner.slim.get(uid).cloned())
            .collect()
    }

    /// The live GPU pods of a namespace (not Succeeded or Failed), sorted by name, with their
    /// requests and placement.
    pub fn gpu_pods_in_namespace(&self, namespace: &str) -> Vec<GpuPodInfo> {
        let inner = self.read();
        let Some(uids) = inner.namespaces.get(namespace) else {
            return Vec::new();
        };
        let mut out: Vec<GpuPodInfo> = uids
            .iter()
            .filter_map(|uid| inner.pods.get(uid).map(|rec| info(&inner, rec)))
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// One pod by namespace and name, if it is a live GPU pod.
    pub fn gpu_pod(&self, namespace: &str, name: &str) -> Option<GpuPodInfo> {
        let inner = self.read();
        let uids = inner.namespaces.get(namespace)?;
        uids.iter()
            .filter_map(|u| inner.pods.get(u))
            .find(|r| r.pod.name == name)
            .map(|rec| info(&inner, rec))
    }

    /// A copy of a node's ledger (free cores and blocks per card), if the node is known.
    pub fn node_ledger(&self, node: &str) -> Option<NodeLedger> {
        self.read().slot(node).map(|s| s.ledger.ledger().clone())
    }

    /// Free state of every card of a node.
    pub fn node_cards(&self, node: &str) -> Option<Vec<CardState>> {
        self.node_ledger(node).map(|l| l.cards().to_vec())
    }

    /// Number of in-flight reservations.
    pub fn reservation_count(&self) -> usize {
        self.read().reservations.len()
    }

    /// Number of charges that do not fit their node right now.
    pub fn pending_charge_count(&self) -> usize {
        self.read().slots.iter().map(|s| s.pending.len()).sum()
    }

    /// The FGD target workload decisions use now (configured or learned).
    pub fn fgd_workload(&self) -> FgdWorkload {
        self.read().fgd.summary()
    }

    /// A node's allocatable CPU (if known) and the CPU requested by the pods on it, in
    /// milli-cores.
    pub fn node_cpu(&self, node: &str) -> Option<(Option<u64>, u64)> {
        self.read()
            .slot(node)
            .map(|s| (s.cpu_allocatable, s.cpu_requested))
    }

    /// Number of live GPU pods known.
    pub fn gpu_pod_count(&self) -> usize {
        self.read().pods.len()
    }

    /// Number of nodes with a valid inventory.
    pub fn gpu_node_count(&self) -> usize {
        self.read()
            .slots
            .iter()
            .filter(|s| s.present && matches!(s.gpu, NodeGpu::Ready { .. }))
            .count()
    }
}

fn info(inner: &Inner, rec: &PodRecord) -> GpuPodInfo {
    let res = inner.reservations.get(&rec.pod.uid);
    let (node, cards) = match (res, &rec.charge) {
        (Some(r), _) => (Some(r.node.to_string()), r.cards.clone()),
        (None, Some((n, _))) => (Some(n.to_string()), rec.pod.annotations.cards.clone()),
        (None, None) => (rec.pod.node_name.clone(), BTreeMap::new()),
    };
    let mut indices: Vec<u32> = cards.values().flatten().copied().collect();
    indices.sort_unstable();
    indices.dedup();
    let placed_cards = match node.as_deref().and_then(|n| inner.slot(n)).map(|s| &s.gpu) {
        Some(NodeGpu::Ready { inv, .. }) => indices
            .iter()
            .filter_map(|&i| inv.card(i))
            .map(|c| PlacedCard {
                index: c.index,
                model: c.model.clone(),
                memory_mib: c.memory_mib,
            })
            .collect(),
        _ => Vec::new(),
    };
    GpuPodInfo {
        namespace: rec.pod.namespace.clone(),
        name: rec.pod.name.clone(),
        uid: rec.pod.uid.to_string(),
        request: rec.pod.request.clone(),
        node,
        cards,
        placed_cards,
        in_flight: res.is_some(),
    }
}

/// Decode a node's inventory annotation.
/// A copy of a pod with only what the admission webhook's quota accounting reads, so keeping
/// every GPU pod costs a fraction of the full object.
fn slim_pod(pod: &Pod) -> Pod {
    use k8s_openapi::api::core::v1::{Container, PodSpec, PodStatus, ResourceRequirements};
    let slim_container = |c: &Container| Container {
        name: c.name.clone(),
        resources: c.resources.as_ref().map(|r| ResourceRequirements {
            limits: r.limits.clone(),
            requests: r.requests.clone(),
            ..Default::default()
        }),
        restart_policy: c.restart_policy.clone(),
        ..Default::default()
    };
    let m = &pod.metadata;
    Pod {
        metadata: kube::api::ObjectMeta {
            name: m.name.clone(),
            namespace: m.namespace.clone(),
            uid: m.uid.clone(),
            annotations: m.annotations.clone(),
            labels: m.labels.clone(),
            deletion_timestamp: m.deletion_timestamp.clone(),
            ..Default::default()
        },
        spec: pod.spec.as_ref().map(|s| PodSpec {
            containers: s.containers.iter().map(slim_container).collect(),
            init_containers: s
                .init_containers
                .as_ref()
                .map(|v| v.iter().map(slim_container).collect()),
            node_name: s.node_name.clone(),
            node_selector: s.node_selector.clone(),
            affinity: s.affinity.clone(),
            scheduler_name: s.scheduler_name.clone(),
            ..Default::default()
        }),
        status: pod.status.as_ref().map(|s| PodStatus {
            phase: s.phase.clone(),
            ..Default::default()
        }),
    }
}

/// `status.allocatable.cpu` in milli-cores.
fn allocatable_cpu(node: &Node) -> Option<u64> {
    let q = node.status.as_ref()?.allocatable.as_ref()?.get("cpu")?;
    match gm_core::fgd::cpu_milli(&q.0) {
        Ok(m) => Some(m),
        Err(e) => {
            tracing::debug!(node = ?node.metadata.name, error = %e, "the node's allocatable CPU cannot be read");
            None
        }
    }
}

/// Where a pod that is not a GPU pod holds CPU: its node and CPU request, unless it has
/// finished, is not bound or requests none.
fn plain_cpu(pod: &Pod) -> Option<(String, u64)> {
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    if matches!(phase, Some("Succeeded") | Some("Failed")) {
        return None;
    }
    let spec = pod.spec.as_ref()?;
    let node = spec.node_name.clone().filter(|n| !n.is_empty())?;
    let milli = gm_core::fgd::pod_cpu_milli(spec).unwrap_or(0);
    (milli > 0).then_some((node, milli))
}

fn node_gpu(node: &Node, keys: &Keys) -> NodeGpu {
    let Some(raw) = node
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(&keys.inventory))
    else {
        return NodeGpu::Missing;
    };
    match NodeInventory::from_json(raw) {
        Ok(inv) => {
            let topo = Topology::new(&inv);
            let all = Eligibility::unconstrained(&inv);
            NodeGpu::Ready {
                inv: Arc::new(inv),
                topo: Arc::new(topo),
                all,
            }
        }
        Err(e) => NodeGpu::Invalid(format!("its {} annotation is invalid: {e}", keys.inventory)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gm_core::Link;
    use serde_json::json;

    fn state() -> ClusterState {
        ClusterState::new(ResourceNames::default(), Duration::from_secs(60))
    }

    fn node(name: &str, inv: Option<&NodeInventory>) -> Node {
        let ann = inv.map(|i| json!({"tencent.com/gpu-inventory": i.to_json()}));
        serde_json::from_value(json!({"metadata": {"name": name, "annotations": ann}})).unwrap()
    }

    fn inv(n: usize, model: &str, mib: u64) -> NodeInventory {
        NodeInventory::uniform(n, model, mib, Link::Phb)
    }

    /// A pod with one container asking for `cores`/`blocks`, optionally placed.
    fn pod(
        ns: &str,
        name: &str,
        cores: u32,
        blocks: u32,
        node: Option<&str>,
        idx: Option<&str>,
    ) -> Pod {
        let mut ann = serde_json::Map::new();
        if let (Some(n), Some(i)) = (node, idx) {
            ann.insert("tencent.com/predicate-node".into(), json!(n));
            ann.insert("tencent.com/predicate-gpu-idx-0".into(), json!(i));
        }
        let mut limits = serde_json::Map::new();
        if cores > 0 {
            limits.insert("tencent.com/vcuda-core".into(), json!(cores.to_string()));
        }
        if blocks > 0 {
            limits.insert("tencent.com/vcuda-memory".into(), json!(blocks.to_string()));
        }
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": ns, "uid": format!("uid-{ns}-{name}"), "annotations": ann},
            "spec": {"containers": [{"name": "c", "resources": {"limits": limits}}], "nodeName": node},
            "status": {"phase": "Running"},
        }))
        .unwrap()
    }

    fn free(s: &ClusterState, node: &str) -> Vec<u32> {
        s.node_cards(node)
            .unwrap()
            .iter()
            .map(|c| c.free_cores)
            .collect()
    }

    #[test]
    fn the_webhook_sees_the_largest_card_overall_per_model_and_per_filter() {
        let s = state();
        assert_eq!(s.largest_card_mib(), None);
        s.apply_node(&node("a", Some(&inv(2, "NVIDIA A100-SXM4-40GB", 40960))));
        s.apply_node(&node("b", Some(&inv(1, "NVIDIA A100-SXM4-80GB", 81920))));
        s.apply_node(&node("c", Some(&inv(4, "Tesla T4", 15109))));
        s.apply_node(&node("d", None));
        assert_eq!(s.largest_card_mib(), Some(81920));
        let by_model = s.largest_card_mib_by_model();
        assert_eq!(by_model["Tesla T4"], 15109);
        assert_eq!(by_model.len(), 3);
        assert_eq!(
            s.largest_card_mib_matching(&ModelFilter::new(["A100-SXM4-40GB"])),
            Some(40960)
        );
        assert_eq!(
            s.largest_card_mib_matching(&ModelFilter::new(["T4"])),
            Some(15109)
        );
        assert_eq!(
            s.largest_card_mib_matching(&ModelFilter::new(["H100"])),
            None
        );
        s.delete_node("b");
        assert_eq!(s.largest_card_mib(), Some(40960));
        // An inventory change replaces the node's cards in the index.
        s.apply_node(&node("c", Some(&inv(4, "Tesla T4", 16384))));
        assert_eq!(s.largest_card_mib_by_model()["Tesla T4"], 16384);
        assert_eq!(s.gpu_node_count(), 2);
    }

    #[test]
    fn the_webhook_lists_a_namespaces_live_gpu_pods_with_requests_nodes_and_models() {
        let s = state();
        s.apply_node(&node("n1", Some(&inv(2, "Tesla T4", 15109))));
        s.apply_pod(&pod("ml", "placed", 30, 4, Some("n1"), Some("1")));
        s.apply_pod(&pod("ml", "waiting", 100, 0, None, None));
        s.apply_pod(&pod("ml", "cpu-only", 0, 0, Some("n1"), None));
        s.apply_pod(&pod("other", "x", 10, 1, Some("n1"), Some("0")));
        let mut done = pod("ml", "done", 10, 1, Some("n1"), Some("0"));
        done.status.as_mut().unwrap().phase = Some("Succeeded".into());
        s.apply_pod(&done);
        let pods = s.gpu_pods_in_namespace("ml");
        let names: Vec<&str> = pods.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["placed", "waiting"]);
        let placed = &pods[0];
        assert_eq!(placed.node.as_deref(), Some("n1"));
        assert_eq!(placed.request.effective_cores(), 30);
        assert_eq!(
            placed.placed_cards,
            vec![PlacedCard {
                index: 1,
                model: "Tesla T4".into(),
                memory_mib: 15109
            }]
        );
        assert!(!placed.in_flight);
        assert_eq!(pods[1].node, None);
        assert!(pods[1].placed_cards.is_empty());
        assert_eq!(
            s.gpu_pod("other", "x").unwrap().cards[&Slot::App(0)],
            vec![0]
        );
        // A finished pod gives its card back.
        assert_eq!(free(&s, "n1"), vec![90, 70]);
        let mut placed_done = pod("ml", "placed", 30, 4, Some("n1"), Some("1"));
        placed_done.status.as_mut().unwrap().phase = Some("Failed".into());
        s.apply_pod(&placed_done);
        assert_eq!(free(&s, "n1"), vec![90, 100]);
        assert_eq!(s.gpu_pods_in_namespace("ml").len(), 1);
    }

    #[test]
    fn the_webhook_sees_gpu_nodes_with_labels_and_a_generation_that_moves_on_change() {
        let s = state();
        let g0 = s.node_generation();
        let mut labelled = node("n1", Some(&inv(2, "Tesla T4", 15109)));
        labelled.metadata.labels = Some([("pool".to_string(), "public".to_string())].into());
        s.apply_node(&labelled);
        s.apply_node(&node("cpu", None));
        let g1 = s.node_generation();
        assert!(g1 > g0);
        let mut seen = Vec::new();
        s.for_each_gpu_node(&mut |name, labels, inv| {
            seen.push((name.to_string(), labels.get("pool").cloned(), inv.len()));
        });
        assert_eq!(seen, [("n1".to_string(), Some("public".to_string()), 2)]);
        // The same object again changes nothing; a label change does.
        s.apply_node(&labelled);
        assert_eq!(s.node_generation(), g1);
        labelled.metadata.labels = Some([("pool".to_string(), "private".to_string())].into());
        s.apply_node(&labelled);
        assert!(s.node_generation() > g1);
        let g2 = s.node_generation();
        s.delete_node("n1");
        assert!(s.node_generation() > g2);
    }

    #[test]
    fn the_webhook_reads_slim_gpu_pods_of_a_namespace_until_they_end() {
        let s = state();
        s.apply_node(&node("n1", Some(&inv(2, "Tesla T4", 15109))));
        let mut p = pod("ml", "train", 30, 4, Some("n1"), Some("1"));
        p.spec.as_mut().unwrap().containers[0].image = Some("big/image".into());
        s.apply_pod(&p);
        s.apply_pod(&pod("ml", "cpu-only", 0, 0, Some("n1"), None));
        let pods = s.namespace_gpu_pods("ml");
        assert_eq!(pods.len(), 1);
        let slim = &pods[0];
        assert_eq!(slim.metadata.name.as_deref(), Some("train"));
        let c = &slim.spec.as_ref().unwrap().containers[0];
        assert_eq!(c.image, None, "only what quota reads is kept");
        assert!(c
            .resources
            .as_ref()
            .unwrap()
            .limits
            .as_ref()
            .unwrap()
            .contains_key("tencent.com/vcuda-core"));
        assert_eq!(
            slim.metadata.annotations.as_ref().unwrap()["tencent.com/predicate-gpu-idx-0"],
            "1"
        );
        p.status.as_mut().unwrap().phase = Some("Succeeded".into());
        s.apply_pod(&p);
        assert!(s.namespace_gpu_pods("ml").is_empty());
        s.apply_pod(&pod("ml", "again", 30, 4, None, None));
        s.delete_pod("uid-ml-again");
        assert!(s.namespace_gpu_pods("ml").is_empty());
    }

    #[test]
    fn a_charge_that_does_not_fit_waits_and_lands_when_capacity_frees() {
        let s = state();
        s.apply_node(&node("n1", Some(&inv(1, "T4", 4096))));
        s.apply_pod(&pod("a", "first", 100, 0, Some("n1"), Some("0")));
        // Someone else put a second pod on the same card (over-commit behind our back).
        s.apply_pod(&pod("a", "second", 60, 1, Some("n1"), Some("0")));
        assert_eq!(s.pending_charge_count(), 1);
        assert_eq!(free(&s, "n1"), vec![0]);
        s.delete_pod("uid-a-first");
        assert_eq!(s.pending_charge_count(), 0);
        assert_eq!(free(&s, "n1"), vec![40]);
    }

    #[test]
    fn a_node_that_loses_a_card_keeps_the_holding_pending_until_it_returns() {
        let s = state();
        s.apply_node(&node("n1", Some(&inv(2, "T4", 4096))));
        s.apply_pod(&pod("a", "p", 50, 2, Some("n1"), Some("1")));
        s.apply_node(&node("n1", Some(&inv(1, "T4", 4096))));
        assert_eq!(s.pending_charge_count(), 1);
        assert_eq!(free(&s, "n1"), vec![100]);
        s.apply_node(&node("n1", Some(&inv(2, "T4", 4096))));
        assert_eq!(s.pending_charge_count(), 0);
        assert_eq!(free(&s, "n1"), vec![100, 50]);
        // Without an inventory the node has no cards at all; the charge waits again.
        s.apply_node(&node("n1", None));
        assert_eq!(s.pending_charge_count(), 1);
        assert_eq!(s.gpu_node_count(), 0);
    }

    #[test]
    fn pods_seen_before_their_node_are_charged_when_it_appears() {
        let s = state();
        s.apply_pod(&pod("a", "early", 20, 1, Some("late-node"), Some("0")));
        assert_eq!(s.pending_charge_count(), 1);
        s.apply_node(&node("late-node", Some(&inv(1, "T4", 4096))));
        assert_eq!(s.pending_charge_count(), 0);
        assert_eq!(free(&s, "late-node"), vec![80]);
    }

    #[test]
    fn card_annotations_written_for_another_node_charge_nothing() {
        let s = state();
        s.apply_node(&node("n1", Some(&inv(1, "T4", 4096))));
        s.apply_node(&node("n2", Some(&inv(1, "T4", 4096))));
        let mut p = pod("a", "moved", 100, 0, Some("n2"), Some("0"));
        p.metadata
            .annotations
            .as_mut()
            .unwrap()
            .insert("tencent.com/predicate-node".into(), "n1".into());
        s.apply_pod(&p);
        assert_eq!(free(&s, "n1"), vec![100]);
        assert_eq!(free(&s, "n2"), vec![100]);
    }

    #[test]
    fn a_relist_drops_what_it_no_longer_lists() {
        let s = state();
        s.apply_node(&node("n1", Some(&inv(1, "T4", 4096))));
        s.apply_node(&node("gone", Some(&inv(1, "T4", 4096))));
        s.apply_pod(&pod("a", "kept", 10, 1, Some("n1"), Some("0")));
        s.apply_pod(&pod("a", "deleted", 10, 1, Some("n1"), Some("0")));
        s.retain_pods(&HashSet::from(["uid-a-kept".to_string()]));
        s.retain_nodes(&HashSet::from(["n1".to_string()]));
        assert_eq!(free(&s, "n1"), vec![90]);
        assert_eq!(s.gpu_pod_count(), 1);
        assert_eq!(s.gpu_node_count(), 1);
    }

    #[test]
    fn a_reservation_holds_until_the_informer_shows_it_then_the_pod_does() {
        let s = state();
        s.apply_node(&node("n1", Some(&inv(1, "T4", 4096))));
        let uid: Uid = Arc::from("uid-a-p");
        let assignment = Assignment::share(0, 30, 2);
        let reservation = Reservation {
            node: Arc::from("n1"),
            assignment: assignment.clone(),
            cards: [(Slot::App(0), vec![0])].into(),
            annotations: BTreeMap::new(),
            expires: Instant::now() + Duration::from_secs(60),
            ticket: 0,
        };
        s.write().reserve(&uid, reservation.clone()).unwrap();
        // A second reservation for the same cards is refused and changes nothing.
        let other: Uid = Arc::from("uid-a-q");
        let too_much = Reservation {
            assignment: Assignment::share(0, 80, 1),
            ..reservation.clone()
        };
        assert!(s.write().reserve(&other, too_much).is_err());
        assert_eq!(free(&s, "n1"), vec![70]);
        // The informer shows the pod without annotations yet (lag): still reserved.
        s.apply_pod(&pod("a", "p", 30, 2, None, None));
        assert_eq!((s.reservation_count(), free(&s, "n1")), (1, vec![70]));
        // Now with them: the reservation ends, the charge stays.
        s.apply_pod(&pod("a", "p", 30, 2, Some("n1"), Some("0")));
        assert_eq!((s.reservation_count(), free(&s, "n1")), (0, vec![70]));
        // An expired reservation gives the cards back unless the informer holds them.
        s.write()
            .reserve(
                &other,
                Reservation {
                    assignment: Assignment::share(0, 10, 1),
                    expires: Instant::now(),
                    ..reservation
                },
            )
            .unwrap();
        assert_eq!(free(&s, "n1"), vec![60]);
        assert_eq!(s.expire_reservations(Instant::now()), 1);
        assert_eq!(free(&s, "n1"), vec![70]);
    }

    fn node_with_cpu(name: &str, inv: &NodeInventory, cpu: &str) -> Node {
        let mut n = node(name, Some(inv));
        n.status = Some(serde_json::from_value(json!({"allocatable": {"cpu": cpu}})).unwrap());
        n
    }

    fn with_cpu(mut p: Pod, cpu: &str) -> Pod {
        let c = &mut p.spec.as_mut().unwrap().containers[0];
        let r = c.resources.get_or_insert_with(Default::default);
        r.requests = Some(
            [(
                "cpu".to_string(),
                k8s_openapi::apimachinery::pkg::api::resource::Quantity(cpu.into()),
            )]
            .into(),
        );
        p
    }

    #[test]
    fn every_bound_pods_cpu_counts_on_its_node_until_it_ends() {
        let s = state();
        s.apply_node(&node_with_cpu("n1", &inv(2, "T4", 4096), "16"));
        assert_eq!(s.node_cpu("n1"), Some((Some(16_000), 0)));
        // A GPU pod and a CPU-only pod bound to n1; a pending pod holds nothing.
        s.apply_pod(&with_cpu(
            pod("a", "gpu", 30, 1, Some("n1"), Some("0")),
            "4",
        ));
        s.apply_pod(&with_cpu(pod("a", "web", 0, 0, Some("n1"), None), "1500m"));
        s.apply_pod(&with_cpu(pod("a", "waiting", 0, 0, None, None), "2"));
        assert_eq!(s.node_cpu("n1"), Some((Some(16_000), 5_500)));
        // The same event again changes nothing; a finished pod and a deleted pod give it back.
        s.apply_pod(&with_cpu(pod("a", "web", 0, 0, Some("n1"), None), "1500m"));
        assert_eq!(s.node_cpu("n1").unwrap().1, 5_500);
        let mut done = with_cpu(pod("a", "web", 0, 0, Some("n1"), None), "1500m");
        done.status.as_mut().unwrap().phase = Some("Succeeded".into());
        s.apply_pod(&done);
        assert_eq!(s.node_cpu("n1").unwrap().1, 4_000);
        s.delete_pod("uid-a-gpu");
        assert_eq!(s.node_cpu("n1").unwrap().1, 0);
        // A relist drops CPU-only pods it no longer lists.
        s.apply_pod(&with_cpu(pod("a", "web2", 0, 0, Some("n1"), None), "1"));
        s.retain_pods(&HashSet::new());
        assert_eq!(s.node_cpu("n1").unwrap().1, 0);
    }

    #[test]
    fn the_workload_is_learned_from_gpu_pods_once_the_pods_are_listed() {
        let s = state();
        s.apply_node(&node("n1", Some(&inv(2, "T4", 4096))));
        s.apply_pod(&with_cpu(pod("a", "p1", 30, 1, None, None), "2"));
        s.apply_pod(&with_cpu(pod("a", "p2", 30, 1, None, None), "2"));
        s.apply_pod(&pod("a", "cpu-only", 0, 0, Some("n1"), None));
        // Counted, but nothing is compiled before the first complete list.
        let w = s.fgd_workload();
        assert_eq!((w.pods_counted, w.version), (2, None));
        s.mark_pods_synced();
        let w = s.fgd_workload();
        let v1 = w.version.expect("compiled at sync");
        assert_eq!(
            w.types,
            vec![(
                TaskType::new(2000, gm_core::fgd::Demand::Share { cores: 30 }, [""; 0]),
                1.0
            )]
        );
        // A new kind of pod changes the target; forgetting it changes it back.
        s.apply_pod(&pod("a", "big", 200, 0, None, None));
        let w = s.fgd_workload();
        assert!(w.version.unwrap() > v1);
        assert_eq!(w.types.len(), 2);
        assert!((w.types[0].1 - 2.0 / 3.0).abs() < 1e-9);
        s.delete_pod("uid-a-big");
        assert_eq!(s.fgd_workload().types.len(), 1);
        // Status updates of a counted pod do not count it twice.
        s.apply_pod(&with_cpu(pod("a", "p1", 30, 1, Some("n1"), Some("0")), "2"));
        assert_eq!(s.fgd_workload().pods_counted, 2);
    }

    #[test]
    fn fgd_plus_scarcity_follows_the_nodes_that_can_host_each_type() {
        let text = r#"{"types": [
            {"cpuMilli": 1000, "gpus": 1, "gpuCores": 100, "weight": 3},
            {"cpuMilli": 1000, "gpus": 2, "gpuCores": 100, "weight": 1}]}"#;
        let settings = FgdSettings {
            workload: Some(gm_core::fgd::TargetWorkload::from_config_json(text).unwrap()),
            ..FgdSettings::default()
        };
        let s = state().with_fgd(settings);
        for n in ["n1", "n2"] {
            s.apply_node(&node_with_cpu(n, &inv(2, "T4", 4096), "8"));
        }
        // Both nodes host both types (most probable type first).
        assert_eq!(s.fgd_workload().scarcity, vec![1.0, 1.0]);
        // One whole card taken on n1: only n2 can still host two whole cards.
        s.apply_pod(&pod("a", "one", 100, 0, Some("n1"), Some("1")));
        assert_eq!(s.fgd_workload().scarcity, vec![1.0, 2.0]);
        // CPU counts too: n2 without free CPU hosts nothing.
        s.apply_pod(&with_cpu(pod("a", "hog", 0, 0, Some("n2"), None), "8"));
        assert_eq!(s.fgd_workload().scarcity, vec![2.0, 2.0]);
        s.delete_pod("uid-a-one");
        s.delete_pod("uid-a-hog");
        assert_eq!(s.fgd_workload().scarcity, vec![1.0, 1.0]);
    }
}
