//! FGD and `fgd+` in the extender: the target workload (configured with `--fgd-workload`, or
//! learned from the GPU pods the informer shows), each node's card access under it, `fgd+`'s
//! per-task-type host counts, and a per-node cache of scores. The arithmetic is
//! `gm_core::fgd` / `gm_core::fgd_plus`; this module only keeps their inputs up to date.
//!
//! * **Learning.** Every live GPU pod counts once with its task type (CPU request, steady GPU
//!   demand, allowed models), from the moment the informer shows it until it is deleted or
//!   finishes. CPU-only pods are not learned: they never reach the extender (it only manages
//!   GPU resources), and a cluster's CPU-only pods — DaemonSets on every node, services on CPU
//!   nodes — would swamp the 95 % coverage. The workload is recompiled once the pods counted or
//!   forgotten since the last compile reach 1 % of the pods counted (at least one), and only
//!   after the first complete pod list, so a busy cluster does not invalidate every cached
//!   score on every event.
//! * **`fgd+` host counts.** For every node the set of capability types it can host now
//!   (`Capability::fits`, one check per type), updated whenever the node's cards, CPU or
//!   inventory change; the scarcity vector `nodes / hosts_m` changes (and gets a new version)
//!   only when some count changes.
//! * **Cache.** Per node: its fragmentation, valid for one (node state, workload version), and
//!   the last pod shape's score, valid for one (node state, workload version, pod shape). For
//!   `fgd+` the cached part is what does not depend on the scarcity (gradient, cards, the
//!   capability types lost) and only its weighing is redone, so a bind that changes some host
//!   count does not make every node cold. kube-scheduler's prioritize right after filter, and
//!   the next replica of a Deployment, find every node but the one that changed already
//!   scored.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use gm_core::fgd::{Fgd, FreeCards, NodeAccess, TargetWorkload, TaskType, WorkloadLearner};
use gm_core::fgd_plus::{CapAccess, FgdPlus, PlusConfig, PlusParts, Scarcity};
use gm_core::inventory::NodeInventory;
use gm_core::ledger::CardState;

use crate::state::Uid;

/// How FGD and `fgd+` get their target workload.
#[derive(Debug, Clone, PartialEq)]
pub struct FgdSettings {
    /// `--fgd-workload`: a configured distribution (also `fgd+`'s capability workload);
    /// `None` learns it from the GPU pods the informer shows.
    pub workload: Option<TargetWorkload>,
    /// `--fgd-coverage`: share of the learned pods the target workload covers.
    pub coverage: f64,
    /// `--fgd-plus-config`: `fgd+`'s knobs.
    pub plus: PlusConfig,
}

impl Default for FgdSettings {
    fn default() -> Self {
        Self {
            workload: None,
            coverage: gm_core::fgd::PAPER_COVERAGE,
            plus: PlusConfig::default(),
        }
    }
}

/// A compiled target workload.
#[derive(Debug)]
pub(crate) struct FgdModel {
    /// Changes with every compile: part of every cache key.
    pub version: u64,
    pub fgd: Fgd,
    pub plus: FgdPlus,
}

/// One node's card access under a model (it only depends on the card models).
#[derive(Debug)]
pub(crate) struct NodeAccesses {
    pub fgd: NodeAccess,
    pub cap: CapAccess,
}

/// What the host counts need to know about one node.
#[derive(Debug, Clone, Copy)]
pub(crate) struct NodeFacts<'a> {
    pub inventory: &'a NodeInventory,
    pub cards: &'a [CardState],
    pub healthy: u64,
    pub cpu_free: Option<u64>,
    pub cpu_allocatable: Option<u64>,
}

/// The cached scoring of one node.
#[derive(Debug, Clone, Default)]
pub(crate) struct CacheEntry {
    /// The node's state (its `Hot::generation`) and the model version the entry is for.
    pub node: u64,
    pub model: u64,
    /// The node's fragmentation under FGD's measure and under `fgd+`'s.
    pub base: Option<f64>,
    pub base_plus: Option<f64>,
    /// Pod shape (policy, request, constraints, CPU) and scarcity version of `score`.
    pub shape: u64,
    pub scarcity: u64,
    /// `Some(raw score)`, `Some(None)` when FGD cannot place the pod there.
    pub score: Option<Option<i64>>,
    /// `fgd+` on a one-container pod: what does not depend on the scarcity (its weighing is
    /// redone on every request), `Some(None)` when it cannot place the pod there.
    pub parts: Option<Option<PlusParts>>,
}

/// The learned counts, the compiled model and everything kept per node.
#[derive(Debug, Default)]
pub(crate) struct FgdState {
    settings: FgdSettings,
    learner: WorkloadLearner,
    learned: HashMap<Uid, TaskType>,
    /// Pods counted or forgotten since the model was compiled.
    changes: u64,
    /// The pod informer has delivered its first complete list.
    synced: bool,
    versions: u64,
    pub model: Option<Arc<FgdModel>>,
    by_models: HashMap<Vec<String>, Arc<NodeAccesses>>,
    /// Per slot: the node's access under the model (`None` without inventory or model).
    pub access: Vec<Option<Arc<NodeAccesses>>>,
    /// Per slot: which capability types the node hosts (empty when not counted).
    hosts: Vec<Vec<bool>>,
    host_count: Vec<u32>,
    /// Nodes with an access, the numerator of the scarcity.
    counted_nodes: u32,
    pub scarcity: Vec<f64>,
    pub scarcity_version: u64,
    /// Per slot.
    pub cache: Mutex<Vec<CacheEntry>>,
}

/// Share of the counted pods whose arrival or departure triggers a recompile.
const RELEARN_SHARE: u64 = 100;

impl FgdState {
    /// A state for `settings`; a configured workload is compiled at once.
    pub fn new(settings: FgdSettings) -> Self {
        let mut s = Self {
            settings,
            ..Self::default()
        };
        if let Some(w) = s.settings.workload.clone() {
            s.versions += 1;
            let fgd = Fgd::new(w.clone());
            let plus = FgdPlus::with_config(fgd.clone(), s.settings.plus).with_capability(&w);
            s.install(Some(Arc::new(FgdModel {
                version: s.versions,
                fgd,
                plus,
            })));
        }
        s
    }

    /// A new slot was created.
    pub fn push_slot(&mut self) {
        self.access.push(None);
        self.hosts.push(Vec::new());
        self.cache
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .push(CacheEntry::default());
    }

    /// Count a live GPU pod (again, if its type changed). True when something changed.
    pub fn observe(&mut self, uid: &Uid, task: TaskType) -> bool {
        if self.settings.workload.is_some() {
            return false;
        }
        match self.learned.get(uid) {
            Some(t) if *t == task => return false,
            Some(t) => {
                self.learner.forget(t);
            }
            None => {}
        }
        self.learner.observe(task.clone());
        self.learned.insert(uid.clone(), task);
        self.changes += 1;
        true
    }

    /// Uncount a pod that was deleted or finished.
    pub fn forget(&mut self, uid: &str) {
        if let Some(t) = self.learned.remove(uid) {
            self.learner.forget(&t);
            self.changes += 1;
        }
    }

    /// Is a recompile of the learned workload due?
    pub fn due(&self) -> bool {
        self.settings.workload.is_none()
            && self.synced
            && self.changes > 0
            && self.changes >= (self.learner.total() / RELEARN_SHARE).max(1)
    }

    /// The pod informer has listed everything: learning may compile from now on.
    pub fn mark_synced(&mut self) {
        self.synced = true;
    }

    /// Compile the learned counts into a new model (none while no GPU pod is counted). The
    /// caller then refreshes every node with [`FgdState::set_node`].
    pub fn recompile(&mut self) {
        self.changes = 0;
        let coverage = self.settings.coverage;
        let model = match (self.learner.target(coverage), self.learner.target(1.0)) {
            (Ok(Some(target)), Ok(Some(everything))) => {
                self.versions += 1;
                let fgd = Fgd::new(target);
                let plus = FgdPlus::with_config(fgd.clone(), self.settings.plus)
                    .with_capability(&everything);
                Some(Arc::new(FgdModel {
                    version: self.versions,
                    fgd,
                    plus,
                }))
            }
            (Err(e), _) | (_, Err(e)) => {
                // Coverage is checked at start-up, so this cannot happen; keep the old model.
                tracing::warn!(error = %e, "cannot compile the learned FGD workload");
                return;
            }
            _ => None,
        };
        if let Some(m) = &model {
            tracing::debug!(
                version = m.version,
                pods = self.learner.total(),
                types = m.fgd.workload().len(),
                "FGD target workload recompiled"
            );
        }
        self.install(model);
    }

    /// Use `model` from now on; the caller then refreshes every node with
    /// [`FgdState::set_node`].
    fn install(&mut self, model: Option<Arc<FgdModel>>) {
        self.model = model;
        self.by_models.clear();
        let n = self.model.as_ref().map_or(0, |m| {
            m.plus
                .capability()
                .map_or(0, gm_core::fgd_plus::Capability::len)
        });
        self.host_count = vec![0; n];
        self.counted_nodes = 0;
        for h in &mut self.hosts {
            h.clear();
        }
        for a in &mut self.access {
            *a = None;
        }
        self.scarcity_version += 1;
        self.recompute_scarcity();
    }

    /// The node in slot `i` changed (cards, CPU, inventory or presence); `node` is `None` when
    /// it has no usable inventory. Keeps its access and its host bits up to date.
    pub fn set_node(&mut self, i: usize, node: Option<NodeFacts<'_>>, inventory_changed: bool) {
        let Some(model) = self.model.clone() else {
            return;
        };
        let had = self.access.get(i).is_some_and(Option::is_some);
        let access = match node {
            None => None,
            Some(f) if inventory_changed || !had => Some(self.access_for(&model, f.inventory)),
            Some(_) => self.access.get(i).cloned().flatten(),
        };
        if let Some(slot) = self.access.get_mut(i) {
            *slot = access.clone();
        }
        let has = access.is_some();
        let mut changed = false;
        if has != had {
            if has {
                self.counted_nodes += 1;
            } else {
                self.counted_nodes = self.counted_nodes.saturating_sub(1);
            }
            changed = true;
        }
        let bits = match (node, &access, model.plus.capability()) {
            (Some(f), Some(a), Some(cap)) => {
                let mode = model.plus.config().scarcity;
                let (cpu, free) = match mode {
                    // Counted on the empty node: every healthy card free, all its CPU.
                    Scarcity::Static => {
                        let full: Vec<CardState> = f
                            .cards
                            .iter()
                            .map(|c| CardState::new(c.total_blocks))
                            .collect();
                        (f.cpu_allocatable, FreeCards::of(&full, f.healthy))
                    }
                    _ => (f.cpu_free, FreeCards::of(f.cards, f.healthy)),
                };
                let cpu = cpu.unwrap_or(u64::MAX);
                (0..cap.len())
                    .map(|t| cap.fits(t, &a.cap, cpu, free.as_slice()))
                    .collect()
            }
            _ => Vec::new(),
        };
        if let Some(old) = self.hosts.get_mut(i) {
            if *old != bits {
                for (t, &was) in old.iter().enumerate() {
                    if was {
                        if let Some(c) = self.host_count.get_mut(t) {
                            *c = c.saturating_sub(1);
                        }
                    }
                }
                for (t, &now) in bits.iter().enumerate() {
                    if now {
                        if let Some(c) = self.host_count.get_mut(t) {
                            *c += 1;
                        }
                    }
                }
                *old = bits;
                changed = true;
            }
        }
        if changed {
            self.recompute_scarcity();
        }
    }

    fn access_for(&mut self, model: &FgdModel, inventory: &NodeInventory) -> Arc<NodeAccesses> {
        let models: Vec<String> = inventory.cards.iter().map(|c| c.model.clone()).collect();
        if let Some(a) = self.by_models.get(&models) {
            return a.clone();
        }
        let a = Arc::new(NodeAccesses {
            fgd: model.fgd.access(models.iter().map(String::as_str)),
            cap: model.plus.cap_access(models.iter().map(String::as_str)),
        });
        self.by_models.insert(models, a.clone());
        a
    }

    fn recompute_scarcity(&mut self) {
        let mode = self
            .model
            .as_ref()
            .map_or(Scarcity::None, |m| m.plus.config().scarcity);
        let next: Vec<f64> = if mode == Scarcity::None {
            Vec::new()
        } else {
            let nodes = f64::from(self.counted_nodes.max(1));
            self.host_count
                .iter()
                .map(|&h| nodes / f64::from(h.max(1)))
                .collect()
        };
        if next != self.scarcity {
            self.scarcity = next;
            self.scarcity_version += 1;
        }
    }

    /// What the workload looks like now, for diagnostics and tests.
    pub fn summary(&self) -> FgdWorkload {
        FgdWorkload {
            configured: self.settings.workload.is_some(),
            pods_counted: self.learner.total(),
            version: self.model.as_ref().map(|m| m.version),
            types: self
                .model
                .as_ref()
                .map(|m| {
                    m.fgd
                        .workload()
                        .types()
                        .iter()
                        .map(|w| (w.task.clone(), w.probability))
                        .collect()
                })
                .unwrap_or_default(),
            scarcity: self.scarcity.clone(),
        }
    }
}

/// The FGD target workload the extender decides with.
#[derive(Debug, Clone, PartialEq)]
pub struct FgdWorkload {
    /// From `--fgd-workload` (else learned).
    pub configured: bool,
    /// Live GPU pods counted by the learner (0 with a configured workload).
    pub pods_counted: u64,
    /// Version of the compiled workload; `None` before there is one (FGD and `fgd+` then
    /// place like binpack).
    pub version: Option<u64>,
    /// The target workload's task types and probabilities, most probable first.
    pub types: Vec<(TaskType, f64)>,
    /// `fgd+`'s scarcity factor per capability type (`nodes / hosts`).
    pub scarcity: Vec<f64>,
}
