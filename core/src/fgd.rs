//! Fragmentation gradient descent (FGD), Weng et al., USENIX ATC '23 (see
//! `shared/reference/fgd.md` §2), as pure functions usable by the extender and the simulator.
//!
//! * A **target workload** is a set of task types with probabilities. It is learned from the
//!   pods a cluster has seen ([`WorkloadLearner`]) or read from a configured distribution
//!   ([`TargetWorkload::from_config_json`]); either way the most popular types are kept until
//!   they cover a share of all pods (the paper keeps 95 %), and their probabilities are
//!   renormalised.
//! * The **fragmentation** of a node is the expected amount of its idle GPU capacity that a task
//!   drawn from the target workload could not use ([`Fgd::fragmentation`]):
//!   - a CPU-only type, a type whose allowed models exclude the node's cards, or a type that
//!     does not fit (too little CPU, too few cards with enough free capacity) sees *all* idle GPU
//!     capacity as fragment;
//!   - a type that fits sees only the cards too small for it (`free < per-card demand`) as
//!     fragment.
//! * The **fragmentation gradient** of placing a pod on a node is the increase of that node's
//!   fragmentation ([`Fgd::evaluate`]); FGD places the pod where it is smallest. A share goes to
//!   the card giving the smallest increase; whole cards are the lowest-indexed free ones.
//!
//! Units: GPU capacity is counted in vcuda-core (100 per card), CPU in milli-cores. The paper
//! counts milli-GPU (1000 per card); [`paper_score`] converts the gradient to the paper's node
//! score `trunc(100 · sigmoid(−Δ_milli / 1000))`.
//!
//! The improved policy `fgd+` is described in `docs/simulator.md`.
//!
//! For the extender, [`Fgd::place_pod`] scores one node for a whole [`PodGpuRequest`] and picks
//! its cards; [`NodeAccess`] is computed once per node inventory (it only depends on the card
//! models) and may be cached.

use std::cmp::Ordering;
use std::collections::{BTreeMap, HashMap};
use std::fmt;

use serde::Deserialize;

use k8s_openapi::api::core::v1::{Container, PodSpec};

use crate::annotations::{CardFilter, ModelFilter};
use crate::inventory::NodeInventory;
use crate::ledger::{container_charges, pod_assignment, Assignment, CardState, NodeLedger};
use crate::quantity::{self, QuantityError};
use crate::request::{GpuRequest, PodGpuRequest, Slot};
use crate::resources::CORES_PER_CARD;

/// Share of all pods the paper's target workload covers.
pub const PAPER_COVERAGE: f64 = 0.95;

/// Most cards of one node FGD handles (card masks are `u64`).
pub const MAX_CARDS: usize = 64;

/// What a task asks of the GPUs of one node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Demand {
    /// No GPU at all (CPU-only task).
    CpuOnly,
    /// A share of one card, `cores` in 1..=99 vcuda-core.
    Share { cores: u32 },
    /// `cards` ≥ 1 whole cards.
    Whole { cards: u32 },
}

impl Demand {
    /// vcuda-core each used card must have free (0 for CPU-only).
    pub fn per_card(self) -> u32 {
        match self {
            Demand::CpuOnly => 0,
            Demand::Share { cores } => cores,
            Demand::Whole { .. } => CORES_PER_CARD,
        }
    }

    /// Number of cards used.
    pub fn cards(self) -> u32 {
        match self {
            Demand::CpuOnly => 0,
            Demand::Share { .. } => 1,
            Demand::Whole { cards } => cards,
        }
    }

    /// Total vcuda-core taken.
    pub fn total_cores(self) -> u64 {
        u64::from(self.per_card()) * u64::from(self.cards())
    }

    /// The demand of one container request.
    pub fn of_request(r: &GpuRequest) -> Self {
        match *r {
            GpuRequest::Share { cores, .. } => Demand::Share { cores },
            GpuRequest::Whole { cards } => Demand::Whole { cards },
        }
    }
}

impl fmt::Display for Demand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Demand::CpuOnly => f.write_str("no GPU"),
            Demand::Share { cores } => write!(f, "{cores} vcuda-core of one card"),
            Demand::Whole { cards } => {
                write!(
                    f,
                    "{cards} whole card{}",
                    if *cards == 1 { "" } else { "s" }
                )
            }
        }
    }
}

/// One task type of the target workload: CPU, GPU demand and allowed GPU models (empty = any).
/// Memory is deliberately not part of the type (the paper ignores it).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TaskType {
    pub cpu_milli: u64,
    pub demand: Demand,
    /// Allowed GPU models with [`ModelFilter`] semantics; trimmed, sorted and de-duplicated.
    pub models: Vec<String>,
}

impl TaskType {
    /// A task type; the model list is normalised so equal lists give equal types.
    pub fn new<S: AsRef<str>>(
        cpu_milli: u64,
        demand: Demand,
        models: impl IntoIterator<Item = S>,
    ) -> Self {
        let mut models: Vec<String> = models
            .into_iter()
            .map(|m| m.as_ref().trim().to_string())
            .filter(|m| !m.is_empty())
            .collect();
        models.sort();
        models.dedup();
        Self {
            cpu_milli,
            demand,
            models,
        }
    }
}

/// A target workload that cannot be used, naming the entry and what is allowed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum WorkloadError {
    #[error("workload configuration is not valid JSON for this format: {0}")]
    Json(String),
    #[error("workload type #{index}: {problem}")]
    Entry { index: usize, problem: String },
    #[error("coverage {0} is out of range: use a number in (0, 1], e.g. 0.95")]
    Coverage(f64),
    #[error("the workload is empty: give at least one task type with a positive weight")]
    Empty,
}

/// A task type with its probability in the target workload.
#[derive(Debug, Clone, PartialEq)]
pub struct WeightedType {
    pub task: TaskType,
    pub probability: f64,
}

/// The target workload: the most popular task types and their renormalised probabilities,
/// most probable first.
#[derive(Debug, Clone, PartialEq)]
pub struct TargetWorkload {
    types: Vec<WeightedType>,
    /// Share of the input weight the kept types carried before renormalising.
    covered: f64,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ConfigFile {
    #[serde(default)]
    coverage: Option<f64>,
    types: Vec<ConfigType>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ConfigType {
    #[serde(default)]
    cpu_milli: u64,
    #[serde(default)]
    gpus: u32,
    #[serde(default)]
    gpu_cores: u32,
    #[serde(default)]
    models: Vec<String>,
    weight: f64,
}

impl TargetWorkload {
    /// Keep the heaviest types until they cover at least `coverage` of the total weight, then
    /// renormalise. Ties in weight are ordered by type, so the result is deterministic.
    pub fn select(
        weights: impl IntoIterator<Item = (TaskType, f64)>,
        coverage: f64,
    ) -> Result<Self, WorkloadError> {
        if !(coverage > 0.0 && coverage <= 1.0) {
            return Err(WorkloadError::Coverage(coverage));
        }
        let mut merged: HashMap<TaskType, f64> = HashMap::new();
        for (i, (t, w)) in weights.into_iter().enumerate() {
            if !(w.is_finite() && w >= 0.0) {
                return Err(WorkloadError::Entry {
                    index: i,
                    problem: format!("weight {w} is not a finite non-negative number"),
                });
            }
            if w > 0.0 {
                *merged.entry(t).or_insert(0.0) += w;
            }
        }
        let total: f64 = merged.values().sum();
        if merged.is_empty() || total <= 0.0 {
            return Err(WorkloadError::Empty);
        }
        let mut all: Vec<(TaskType, f64)> = merged.into_iter().collect();
        all.sort_by(|a, b| {
            b.1.partial_cmp(&a.1)
                .unwrap_or(Ordering::Equal)
                .then_with(|| b.0.cmp(&a.0))
        });
        let goal = coverage * total * (1.0 - 1e-12);
        let mut kept = 0.0;
        let mut n = 0;
        while n < all.len() && kept < goal {
            kept += all[n].1;
            n += 1;
        }
        all.truncate(n);
        Ok(Self {
            types: all
                .into_iter()
                .map(|(task, w)| WeightedType {
                    task,
                    probability: w / kept,
                })
                .collect(),
            covered: kept / total,
        })
    }

    /// Read a configured distribution (see `docs/simulator.md` for the format):
    ///
    /// ```json
    /// {"coverage": 1.0, "types": [
    ///   {"cpuMilli": 4000, "gpus": 1, "gpuCores": 50, "models": ["T4"], "weight": 3},
    ///   {"cpuMilli": 8000, "gpus": 2, "gpuCores": 100, "weight": 1},
    ///   {"cpuMilli": 2000, "weight": 1}
    /// ]}
    /// ```
    ///
    /// `gpus` 0 (or absent) is a CPU-only type; `gpuCores` is the per-card demand in
    /// vcuda-core (1–99 = a share of one card, only with `gpus` 1; 100 = whole cards). Weights
    /// are relative. `coverage` defaults to 1 (keep every type).
    pub fn from_config_json(text: &str) -> Result<Self, WorkloadError> {
        let file: ConfigFile =
            serde_json::from_str(text).map_err(|e| WorkloadError::Json(e.to_string()))?;
        let mut weights = Vec::with_capacity(file.types.len());
        for (index, t) in file.types.iter().enumerate() {
            let bad = |problem: String| WorkloadError::Entry { index, problem };
            let demand = match (t.gpus, t.gpu_cores) {
                (0, 0) => Demand::CpuOnly,
                (0, c) => {
                    return Err(bad(format!(
                        "gpuCores {c} without gpus: set gpus ≥ 1, or gpuCores 0 for a CPU-only type"
                    )))
                }
                (_, 0) => {
                    return Err(bad(
                        "gpus without gpuCores: set gpuCores (1-99 for a share, 100 for whole cards)"
                            .into(),
                    ))
                }
                (1, c) if c < CORES_PER_CARD => Demand::Share { cores: c },
                (g, CORES_PER_CARD) if g as usize <= MAX_CARDS => Demand::Whole { cards: g },
                (g, CORES_PER_CARD) => {
                    return Err(bad(format!("gpus {g} is more than {MAX_CARDS} cards")))
                }
                (g, c) if c > CORES_PER_CARD => {
                    return Err(bad(format!(
                        "gpuCores {c} is more than one card: use 1-99 for a share or 100 with gpus {g} for whole cards"
                    )))
                }
                (g, c) => {
                    return Err(bad(format!(
                        "gpus {g} with gpuCores {c}: a share (gpuCores 1-99) uses exactly one card"
                    )))
                }
            };
            if !(t.weight.is_finite() && t.weight > 0.0) {
                return Err(bad(format!(
                    "weight {} must be a positive number",
                    t.weight
                )));
            }
            weights.push((TaskType::new(t.cpu_milli, demand, &t.models), t.weight));
        }
        Self::select(weights, file.coverage.unwrap_or(1.0))
    }

    /// The kept types, most probable first.
    pub fn types(&self) -> &[WeightedType] {
        &self.types
    }

    /// Share of the input weight that the kept types carried.
    pub fn covered(&self) -> f64 {
        self.covered
    }

    pub fn len(&self) -> usize {
        self.types.len()
    }

    pub fn is_empty(&self) -> bool {
        self.types.is_empty()
    }
}

/// Counts of the task types seen so far, updated incrementally (the extender observes every pod
/// the cluster schedules); [`WorkloadLearner::target`] turns them into a [`TargetWorkload`].
#[derive(Debug, Clone, Default)]
pub struct WorkloadLearner {
    counts: HashMap<TaskType, u64>,
    total: u64,
}

impl WorkloadLearner {
    pub fn new() -> Self {
        Self::default()
    }

    /// Count one pod of this type.
    pub fn observe(&mut self, task: TaskType) {
        *self.counts.entry(task).or_insert(0) += 1;
        self.total += 1;
    }

    /// Uncount one pod of this type (e.g. a pod deleted before it ran). Returns false when no
    /// such pod was counted.
    pub fn forget(&mut self, task: &TaskType) -> bool {
        match self.counts.get_mut(task) {
            Some(c) => {
                *c -= 1;
                if *c == 0 {
                    self.counts.remove(task);
                }
                self.total -= 1;
                true
            }
            None => false,
        }
    }

    /// Pods counted.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Distinct task types counted.
    pub fn distinct(&self) -> usize {
        self.counts.len()
    }

    /// The target workload over the counts (`None` before the first pod).
    pub fn target(&self, coverage: f64) -> Result<Option<TargetWorkload>, WorkloadError> {
        if self.total == 0 {
            return Ok(None);
        }
        TargetWorkload::select(
            self.counts.iter().map(|(t, &c)| (t.clone(), c as f64)),
            coverage,
        )
        .map(Some)
    }
}

/// Which cards of one node each GPU task type of the workload may use (by card model). It only
/// depends on the node's inventory, so callers compute it once per node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeAccess {
    masks: Vec<u64>,
    all: u64,
    uniform: bool,
}

impl NodeAccess {
    /// True when every type sees either all cards or none (a single-model node).
    pub fn is_uniform(&self) -> bool {
        self.uniform
    }
}

/// How a node's fragmentation is measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Measure {
    /// The paper's (§2.2): a type that fits at least once sees only the cards too small for it
    /// as fragment.
    #[default]
    Paper,
    /// Copies (`fgd+`): a type can only use what copies of it could actually take — on each
    /// card `⌊free/d⌋·d` for a share, the free cards for whole cards — and no more copies than
    /// the node's free CPU can feed (`⌊cpu_free/c⌋`); the rest of the idle capacity is
    /// fragment. It sees the 19 vcuda-core a 81-core share leaves on an empty card, and idle
    /// cards a node can no longer feed with CPU, before they become unusable.
    Copies,
}

/// How the card of a share is chosen within a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CardPick {
    /// The paper's simulator: the card with the best [`paper_score`], lowest index on ties.
    Paper,
    /// The card with the smallest exact gradient, lowest index on ties.
    Exact,
}

/// The result of evaluating one pod on one node.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Evaluation {
    /// Fragmentation gradient: increase of the node's fragmentation, in vcuda-core.
    pub delta: f64,
    /// Node fragmentation after the placement, in vcuda-core.
    pub frag_after: f64,
    /// Cards used (bit i = card i); 0 for a CPU-only pod.
    pub cards: u64,
}

impl Evaluation {
    /// The cards as indices, ascending.
    pub fn card_list(&self) -> Vec<u32> {
        bits(self.cards).collect()
    }
}

fn bits(mut m: u64) -> impl Iterator<Item = u32> {
    std::iter::from_fn(move || {
        if m == 0 {
            return None;
        }
        let b = m.trailing_zeros();
        m &= m - 1;
        Some(b)
    })
}

/// The paper's node score for a gradient in vcuda-core: `trunc(100 · sigmoid(−Δ_milli/1000))`
/// with Δ_milli = 10 · Δ. 0..=100, higher is better; gradients closer than ~4 vcuda-core
/// often get the same score.
pub fn paper_score(delta: f64) -> i64 {
    (100.0 / (1.0 + (delta / 100.0).exp())) as i64
}

/// A compiled target workload, ready for fragmentation arithmetic.
#[derive(Debug, Clone)]
pub struct Fgd {
    workload: TargetWorkload,
    measure: Measure,
    /// Summed probability of the CPU-only types.
    cpu_only: f64,
    cpu: Vec<u64>,
    per_card: Vec<u32>,
    cards: Vec<u32>,
    prob: Vec<f64>,
    filters: Vec<ModelFilter>,
    /// Per GPU type: `⌊free / per_card⌋` for free = 0..=100 (the copies measure's hot loop).
    slots: Vec<[u8; CORES_PER_CARD as usize + 1]>,
}

impl Fgd {
    pub fn new(workload: TargetWorkload) -> Self {
        let mut s = Self {
            measure: Measure::Paper,
            workload: TargetWorkload {
                types: Vec::new(),
                covered: workload.covered,
            },
            cpu_only: 0.0,
            cpu: Vec::new(),
            per_card: Vec::new(),
            cards: Vec::new(),
            prob: Vec::new(),
            filters: Vec::new(),
            slots: Vec::new(),
        };
        for w in &workload.types {
            match w.task.demand {
                Demand::CpuOnly => s.cpu_only += w.probability,
                d => {
                    s.cpu.push(w.task.cpu_milli);
                    s.per_card.push(d.per_card());
                    s.cards.push(d.cards());
                    s.prob.push(w.probability);
                    s.filters.push(ModelFilter::new(&w.task.models));
                    let per = d.per_card().max(1);
                    let mut table = [0u8; CORES_PER_CARD as usize + 1];
                    for (x, t) in table.iter_mut().enumerate() {
                        *t = (x as u32 / per).min(u32::from(u8::MAX)) as u8;
                    }
                    s.slots.push(table);
                }
            }
        }
        s.workload = workload;
        s
    }

    /// The same workload under another fragmentation measure.
    pub fn with_measure(mut self, measure: Measure) -> Self {
        self.measure = measure;
        self
    }

    /// The fragmentation measure in use.
    pub fn measure(&self) -> Measure {
        self.measure
    }

    /// The workload this was compiled from.
    pub fn workload(&self) -> &TargetWorkload {
        &self.workload
    }

    /// Which cards each GPU type may use, given each card's model.
    pub fn access<'a>(&self, card_models: impl IntoIterator<Item = &'a str>) -> NodeAccess {
        let models: Vec<&str> = card_models.into_iter().take(MAX_CARDS).collect();
        let all = if models.len() == MAX_CARDS {
            u64::MAX
        } else {
            (1u64 << models.len()) - 1
        };
        let masks: Vec<u64> = self
            .filters
            .iter()
            .map(|f| {
                models
                    .iter()
                    .enumerate()
                    .filter(|(_, m)| f.matches(m))
                    .fold(0u64, |acc, (i, _)| acc | 1 << i)
            })
            .collect();
        let uniform = masks.iter().all(|&m| m == 0 || m == all);
        NodeAccess {
            masks,
            all,
            uniform,
        }
    }

    /// Access for a node whose cards all have one model.
    pub fn access_uniform(&self, model: &str, cards: usize) -> NodeAccess {
        self.access(std::iter::repeat_n(model, cards.min(MAX_CARDS)))
    }

    /// Expected idle GPU capacity (vcuda-core) of a node that a task drawn from the target
    /// workload could not use. `free[i]` is card i's free vcuda-core (0..=100); a card the
    /// node cannot offer at all (unhealthy) should be given as 0 free.
    pub fn fragmentation(&self, access: &NodeAccess, cpu_free: u64, free: &[u32]) -> f64 {
        match self.measure {
            Measure::Paper => self.fragmentation_paper(access, cpu_free, free),
            Measure::Copies => self.fragmentation_copies(access, cpu_free, free),
        }
    }

    fn fragmentation_copies(&self, access: &NodeAccess, cpu_free: u64, free: &[u32]) -> f64 {
        let total: u32 = free.iter().sum();
        if total == 0 {
            return 0.0;
        }
        let all = f64::from(total);
        let mut frag = self.cpu_only * all;
        for i in 0..self.prob.len() {
            let p = self.prob[i];
            let mask = access.masks[i];
            let c = self.cpu[i];
            if mask == 0 || cpu_free < c {
                frag += p * all;
                continue;
            }
            // Copies of the type the node's CPU can feed (at least one: checked above).
            let copies = cpu_free.checked_div(c).unwrap_or(u64::MAX);
            let d = self.per_card[i];
            let k = u64::from(self.cards[i]);
            let usable = if d < CORES_PER_CARD {
                let table = &self.slots[i];
                let mut slots = 0u64;
                for (g, &x) in free.iter().enumerate() {
                    if (mask >> g) & 1 == 1 {
                        slots += u64::from(table[x.min(CORES_PER_CARD) as usize]);
                    }
                }
                slots.min(copies) * u64::from(d)
            } else {
                let full = free
                    .iter()
                    .enumerate()
                    .filter(|(g, &x)| x == CORES_PER_CARD && (mask >> g) & 1 == 1)
                    .count() as u64;
                if full < k {
                    0
                } else {
                    full.min(copies.saturating_mul(k)) * u64::from(CORES_PER_CARD)
                }
            };
            frag += p * (all - usable as f64);
        }
        frag
    }

    fn fragmentation_paper(&self, access: &NodeAccess, cpu_free: u64, free: &[u32]) -> f64 {
        let total: u32 = free.iter().sum();
        if total == 0 {
            return 0.0;
        }
        let all = f64::from(total);
        let mut frag = self.cpu_only * all;
        for i in 0..self.prob.len() {
            let p = self.prob[i];
            let mask = access.masks[i];
            if mask == 0 || cpu_free < self.cpu[i] {
                frag += p * all;
                continue;
            }
            let d = self.per_card[i];
            let mut fit = 0u32;
            let mut usable = 0u32;
            for (g, &x) in free.iter().enumerate() {
                if x >= d && (mask >> g) & 1 == 1 {
                    fit += 1;
                    usable += x;
                }
            }
            frag += p * if fit >= self.cards[i] {
                f64::from(total - usable)
            } else {
                all
            };
        }
        frag
    }

    /// Evaluate placing a pod (`pod_cpu` milli-cores, `demand`) on a node whose fragmentation
    /// is `base`. `eligible` are the cards the pod may use (allowed model, healthy, enough
    /// memory). Returns `None` when the pod does not fit (CPU, or no suitable cards).
    #[allow(clippy::too_many_arguments)]
    pub fn evaluate(
        &self,
        access: &NodeAccess,
        cpu_free: u64,
        free: &[u32],
        base: f64,
        pod_cpu: u64,
        demand: Demand,
        eligible: u64,
        pick: CardPick,
    ) -> Option<Evaluation> {
        if cpu_free < pod_cpu || free.len() > MAX_CARDS {
            return None;
        }
        let cpu_after = cpu_free - pod_cpu;
        match demand {
            Demand::CpuOnly => {
                let after = self.fragmentation(access, cpu_after, free);
                Some(Evaluation {
                    delta: after - base,
                    frag_after: after,
                    cards: 0,
                })
            }
            Demand::Whole { cards } => {
                let mut chosen = 0u64;
                let mut n = 0;
                for (g, &x) in free.iter().enumerate() {
                    if n == cards {
                        break;
                    }
                    if x == CORES_PER_CARD && (eligible >> g) & 1 == 1 {
                        chosen |= 1 << g;
                        n += 1;
                    }
                }
                if n < cards {
                    return None;
                }
                let mut buf = [0u32; MAX_CARDS];
                let buf = &mut buf[..free.len()];
                buf.copy_from_slice(free);
                for g in bits(chosen) {
                    buf[g as usize] = 0;
                }
                let after = self.fragmentation(access, cpu_after, buf);
                Some(Evaluation {
                    delta: after - base,
                    frag_after: after,
                    cards: chosen,
                })
            }
            Demand::Share { cores } => {
                let mut buf = [0u32; MAX_CARDS];
                let buf = &mut buf[..free.len()];
                buf.copy_from_slice(free);
                let mut seen: u128 = 0;
                let mut best: Option<(Evaluation, i64)> = None;
                for (g, &x) in free.iter().enumerate() {
                    if x < cores || (eligible >> g) & 1 == 0 {
                        continue;
                    }
                    if access.uniform && x <= 127 {
                        // Cards with equal free capacity give the same result on such nodes.
                        if (seen >> x) & 1 == 1 {
                            continue;
                        }
                        seen |= 1 << x;
                    }
                    buf[g] = x - cores;
                    let after = self.fragmentation(access, cpu_after, buf);
                    buf[g] = x;
                    let e = Evaluation {
                        delta: after - base,
                        frag_after: after,
                        cards: 1 << g,
                    };
                    let q = match pick {
                        CardPick::Paper => paper_score(e.delta),
                        CardPick::Exact => 0,
                    };
                    let better = match &best {
                        None => true,
                        Some((b, bq)) => match pick {
                            CardPick::Paper => q > *bq,
                            CardPick::Exact => e.delta < b.delta,
                        },
                    };
                    if better {
                        best = Some((e, q));
                    }
                }
                best.map(|(e, _)| e)
            }
        }
    }

    /// Score one node for a whole pod, for the extender: choose the cards of every GPU
    /// container by smallest gradient and return the placement with the total gradient.
    ///
    /// * `pod_cpu`: the pod's CPU request in milli-cores.
    /// * `filter`: the pod's model and UUID constraints (hard); unhealthy cards are never used.
    ///
    /// Long-running containers are placed one after the other; a regular init container goes
    /// on a card the pod already uses if it fits there beside the pod (the larger of the two
    /// charges counts), else on the best card of the steady state. Returns `None` when the pod
    /// does not fit; use [`crate::placement::place`] to explain why.
    pub fn place_pod(
        &self,
        node: &FgdNode<'_>,
        pod_cpu: u64,
        pod: &PodGpuRequest,
        filter: &CardFilter,
    ) -> Option<FgdPlacement> {
        let FgdNode {
            access,
            inventory,
            ledger,
            cpu_free,
        } = *node;
        let cpu = cpu_free.unwrap_or(u64::MAX);
        if cpu < pod_cpu || ledger.len() > MAX_CARDS || inventory.len() != ledger.len() {
            return None;
        }
        let allowed: u64 = inventory
            .cards
            .iter()
            .filter(|c| c.healthy && filter.allows(c))
            .fold(0, |m, c| m | 1u64 << c.index);
        let free_of = |l: &NodeLedger| -> Vec<u32> {
            l.cards()
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    if inventory.cards[i].healthy {
                        c.free_cores
                    } else {
                        0
                    }
                })
                .collect()
        };
        let eligible_for = |l: &NodeLedger, r: &GpuRequest| -> u64 {
            l.cards()
                .iter()
                .enumerate()
                .filter(|(i, c)| {
                    (allowed >> i) & 1 == 1
                        && match *r {
                            GpuRequest::Share { cores, blocks } => {
                                c.free_cores >= cores && c.free_blocks >= blocks
                            }
                            GpuRequest::Whole { .. } => c.is_free(),
                        }
                })
                .fold(0, |m, (i, _)| m | 1u64 << i)
        };
        let base = self.fragmentation(access, cpu, &free_of(ledger));
        let mut scratch = ledger.clone();
        let mut cards: BTreeMap<Slot, Vec<u32>> = BTreeMap::new();
        let cpu_left = cpu - pod_cpu;
        for c in pod.containers.iter().filter(|c| c.long_running()) {
            let free = free_of(&scratch);
            let here = self.fragmentation(access, cpu_left, &free);
            let e = self.evaluate(
                access,
                cpu_left,
                &free,
                here,
                0,
                Demand::of_request(&c.request),
                eligible_for(&scratch, &c.request),
                CardPick::Exact,
            )?;
            let list = e.card_list();
            let a = Assignment::new(container_charges(c.slot, &c.request, &list).ok()?).ok()?;
            scratch.allocate(&a).ok()?;
            cards.insert(c.slot, list);
        }
        let steady = scratch;
        let pod_cards: Vec<u32> = {
            let mut v: Vec<u32> = cards.values().flatten().copied().collect();
            v.sort_unstable();
            v.dedup();
            v
        };
        for c in pod.containers.iter().filter(|c| !c.long_running()) {
            let mut chosen = None;
            if let GpuRequest::Share { .. } = c.request {
                for &p in &pod_cards {
                    let mut trial = cards.clone();
                    trial.insert(c.slot, vec![p]);
                    let partial = PodGpuRequest {
                        containers: pod
                            .containers
                            .iter()
                            .filter(|x| trial.contains_key(&x.slot))
                            .cloned()
                            .collect(),
                    };
                    let fits = (allowed >> p) & 1 == 1
                        && pod_assignment(&partial, &trial)
                            .ok()
                            .is_some_and(|a| ledger.check(&a).is_ok());
                    if fits {
                        chosen = Some(vec![p]);
                        break;
                    }
                }
            }
            let list = match chosen {
                Some(l) => l,
                None => {
                    let free = free_of(&steady);
                    let here = self.fragmentation(access, cpu_left, &free);
                    self.evaluate(
                        access,
                        cpu_left,
                        &free,
                        here,
                        0,
                        Demand::of_request(&c.request),
                        eligible_for(&steady, &c.request),
                        CardPick::Exact,
                    )?
                    .card_list()
                }
            };
            cards.insert(c.slot, list);
        }
        let assignment = pod_assignment(pod, &cards).ok()?;
        ledger.check(&assignment).ok()?;
        let mut after = ledger.clone();
        after.allocate(&assignment).ok()?;
        let frag_after = self.fragmentation(access, cpu - pod_cpu, &free_of(&after));
        let delta = frag_after - base;
        Some(FgdPlacement {
            cards,
            assignment,
            delta,
            score: paper_score(delta),
        })
    }
}

/// One node as [`Fgd::place_pod`] sees it.
#[derive(Debug, Clone, Copy)]
pub struct FgdNode<'a> {
    /// From [`Fgd::access`] over the node's card models (cache it per inventory).
    pub access: &'a NodeAccess,
    pub inventory: &'a NodeInventory,
    pub ledger: &'a NodeLedger,
    /// The node's unrequested CPU in milli-cores; `None` if unknown (CPU is then not a
    /// constraint and never makes a type not fit).
    pub cpu_free: Option<u64>,
}

/// FGD's choice for a pod on one node.
#[derive(Debug, Clone, PartialEq)]
pub struct FgdPlacement {
    /// Chosen cards per container slot.
    pub cards: BTreeMap<Slot, Vec<u32>>,
    /// The pod's charges on the node.
    pub assignment: Assignment,
    /// Fragmentation gradient in vcuda-core (smaller is better).
    pub delta: f64,
    /// The paper's 0..=100 node score of `delta` (higher is better).
    pub score: i64,
}

/// Free vcuda-core per card as FGD reads a node: a card's free capacity when it is healthy,
/// 0 when it is not (a card the node cannot offer). At most [`MAX_CARDS`] cards.
#[derive(Debug, Clone, Copy)]
pub struct FreeCards {
    free: [u32; MAX_CARDS],
    len: usize,
}

impl FreeCards {
    /// From a node's card states; bit i of `healthy` says card i is healthy.
    pub fn of(cards: &[CardState], healthy: u64) -> Self {
        let mut free = [0u32; MAX_CARDS];
        let len = cards.len().min(MAX_CARDS);
        for (i, c) in cards.iter().take(len).enumerate() {
            if (healthy >> i) & 1 == 1 {
                free[i] = c.free_cores;
            }
        }
        Self { free, len }
    }

    pub fn as_slice(&self) -> &[u32] {
        &self.free[..self.len]
    }
}

/// The healthy cards of an inventory (bit i = card i; cards beyond [`MAX_CARDS`] left out).
pub fn healthy_cards(inventory: &NodeInventory) -> u64 {
    inventory
        .cards
        .iter()
        .filter(|c| c.healthy && (c.index as usize) < MAX_CARDS)
        .fold(0, |m, c| m | 1u64 << c.index)
}

/// The cards a container request may use among `usable` (bit i = card i): enough free
/// vcuda-core and memory blocks for a share, completely free for whole cards.
pub fn eligible_cards(cards: &[CardState], usable: u64, request: &GpuRequest) -> u64 {
    cards
        .iter()
        .take(MAX_CARDS)
        .enumerate()
        .filter(|(i, c)| {
            (usable >> i) & 1 == 1
                && match *request {
                    GpuRequest::Share { cores, blocks } => {
                        c.free_cores >= cores && c.free_blocks >= blocks
                    }
                    GpuRequest::Whole { .. } => c.is_free(),
                }
        })
        .fold(0, |m, (i, _)| m | 1u64 << i)
}

/// What a whole pod asks of a node's GPUs in its steady state, as one [`Demand`] (the unit of
/// a task type): nothing for a pod whose only GPU containers are regular init containers;
/// one share for a single share (or several shares that add up to less than a card); else
/// whole cards — the whole cards of all long-running containers plus the shares rounded up to
/// cards.
pub fn pod_demand(pod: &PodGpuRequest) -> Demand {
    let (mut whole, mut share_cores, mut shares) = (0u32, 0u32, 0u32);
    for c in pod.containers.iter().filter(|c| c.long_running()) {
        match c.request {
            GpuRequest::Whole { cards } => whole = whole.saturating_add(cards),
            GpuRequest::Share { cores, .. } => {
                share_cores = share_cores.saturating_add(cores);
                shares += 1;
            }
        }
    }
    match (whole, shares) {
        (0, 0) => Demand::CpuOnly,
        (0, _) if share_cores < CORES_PER_CARD => Demand::Share { cores: share_cores },
        (w, _) => Demand::Whole {
            cards: w.saturating_add(share_cores.div_ceil(CORES_PER_CARD)),
        },
    }
}

impl TaskType {
    /// The task type of a pod: its CPU request (milli-cores), its [`pod_demand`] and its
    /// allowed GPU models (the `gpu-models` annotation; empty = any).
    pub fn of_pod<S: AsRef<str>>(
        cpu_milli: u64,
        pod: &PodGpuRequest,
        models: impl IntoIterator<Item = S>,
    ) -> Self {
        Self::new(cpu_milli, pod_demand(pod), models)
    }
}

/// A CPU quantity (`"500m"`, `"2"`, `"1.5"`, `"2k"`, `"1e3"`) in milli-cores, rounded up.
pub fn cpu_milli(quantity: &str) -> Result<u64, QuantityError> {
    let t = quantity.trim();
    let body = t.strip_prefix(['+', '-']).unwrap_or(t);
    let num_len = body
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(body.len());
    let suffix = &body[num_len..];
    let number = &t[..t.len() - suffix.len()];
    // × 1000: the next decimal suffix up, or the exponent plus 3.
    let shifted = match suffix {
        "" => Some("k"),
        "n" => Some("u"),
        "u" => Some("m"),
        "m" => Some(""),
        "k" => Some("M"),
        "M" => Some("G"),
        "G" => Some("T"),
        "T" => Some("P"),
        "P" => Some("E"),
        "E" => Some("e21"),
        _ => None,
    };
    let milli = match shifted {
        Some(suf) => quantity::parse(&format!("{number}{suf}"))?.ceil,
        None => match suffix
            .strip_prefix(['e', 'E'])
            .and_then(|e| e.parse::<i32>().ok())
        {
            Some(e) => quantity::parse(&format!("{number}e{}", e.saturating_add(3)))?.ceil,
            // Binary suffixes (Ki, Mi, ...) and anything the parser refuses.
            None => quantity::parse(t)?
                .ceil
                .checked_mul(1000)
                .ok_or_else(|| QuantityError::TooLarge(quantity.to_string()))?,
        },
    };
    u64::try_from(milli).map_err(|_| QuantityError::Negative(quantity.to_string()))
}

/// A pod's CPU request in milli-cores, counted as kube-scheduler counts it: the app
/// containers and restartable (sidecar) init containers add up, a regular init container needs
/// itself plus the sidecars started before it, the larger of the two counts, plus the pod
/// overhead. A container without a CPU request counts its CPU limit (the API server's
/// default), else 0. The error names the container and the value.
pub fn pod_cpu_milli(spec: &PodSpec) -> Result<u64, String> {
    let of = |c: &Container| -> Result<u64, String> {
        let r = c.resources.as_ref();
        let q = r
            .and_then(|r| r.requests.as_ref())
            .and_then(|m| m.get("cpu"))
            .or_else(|| r.and_then(|r| r.limits.as_ref()).and_then(|m| m.get("cpu")));
        match q {
            None => Ok(0),
            Some(q) => cpu_milli(&q.0).map_err(|e| format!("container {:?}: cpu: {e}", c.name)),
        }
    };
    let mut sidecars = 0u64;
    let mut peak = 0u64;
    for c in spec.init_containers.iter().flatten() {
        let m = of(c)?;
        if c.restart_policy.as_deref() == Some("Always") {
            sidecars = sidecars.saturating_add(m);
        } else {
            peak = peak.max(sidecars.saturating_add(m));
        }
    }
    let mut steady = sidecars;
    for c in &spec.containers {
        steady = steady.saturating_add(of(c)?);
    }
    let overhead = match spec.overhead.as_ref().and_then(|o| o.get("cpu")) {
        Some(q) => cpu_milli(&q.0).map_err(|e| format!("overhead: cpu: {e}"))?,
        None => 0,
    };
    Ok(peak.max(steady).saturating_add(overhead))
}

impl Fgd {
    /// The node's fragmentation as [`Fgd::place_pod`] measures it before placing anything:
    /// from its card states, `healthy` its healthy cards, `cpu_free` as in [`FgdNode`]. It
    /// only changes with the node, so callers may cache it.
    pub fn node_fragmentation(
        &self,
        access: &NodeAccess,
        cards: &[CardState],
        healthy: u64,
        cpu_free: Option<u64>,
    ) -> f64 {
        self.fragmentation(
            access,
            cpu_free.unwrap_or(u64::MAX),
            FreeCards::of(cards, healthy).as_slice(),
        )
    }

    /// [`Fgd::place_pod`]'s gradient and cards for a pod whose only GPU container is the
    /// long-running `request`, from the node's card states alone and without allocating:
    /// `healthy` the node's healthy cards, `usable` the healthy cards the pod's constraints
    /// allow, `base` the node's [`Fgd::node_fragmentation`]. `None` when it does not fit.
    #[allow(clippy::too_many_arguments)]
    pub fn evaluate_cards(
        &self,
        access: &NodeAccess,
        cards: &[CardState],
        healthy: u64,
        usable: u64,
        cpu_free: Option<u64>,
        base: f64,
        pod_cpu: u64,
        request: &GpuRequest,
    ) -> Option<Evaluation> {
        if cards.len() > MAX_CARDS {
            return None;
        }
        let cpu = cpu_free.unwrap_or(u64::MAX);
        let free = FreeCards::of(cards, healthy);
        let eligible = eligible_cards(cards, usable, request);
        match (self.measure, *request) {
            (Measure::Paper, GpuRequest::Share { cores, .. }) => self.evaluate_share_paper(
                access,
                cpu,
                free.as_slice(),
                base,
                pod_cpu,
                cores,
                eligible,
            ),
            _ => self.evaluate(
                access,
                cpu,
                free.as_slice(),
                base,
                pod_cpu,
                Demand::of_request(request),
                eligible,
                CardPick::Exact,
            ),
        }
    }

    /// [`Fgd::evaluate`] of a share under the paper's measure with [`CardPick::Exact`], in
    /// O(types) per candidate card instead of O(types × cards): each type's fitting cards and
    /// their free capacity are counted once, and a candidate only moves one card. The
    /// arithmetic (and the order of the floating-point sums) is the same, so the result is
    /// identical.
    #[allow(clippy::too_many_arguments)]
    fn evaluate_share_paper(
        &self,
        access: &NodeAccess,
        cpu_free: u64,
        free: &[u32],
        base: f64,
        pod_cpu: u64,
        cores: u32,
        eligible: u64,
    ) -> Option<Evaluation> {
        if cpu_free < pod_cpu || free.len() > MAX_CARDS {
            return None;
        }
        let cpu_after = cpu_free - pod_cpu;
        let total: u32 = free.iter().sum();
        let n = self.prob.len();
        // Per type: cards it may use with enough free capacity, and their free capacity.
        let mut fit = Vec::with_capacity(n);
        let mut usable = Vec::with_capacity(n);
        for i in 0..n {
            let (mask, d) = (access.masks[i], self.per_card[i]);
            let (mut f, mut u) = (0u32, 0u32);
            for (g, &x) in free.iter().enumerate() {
                if x >= d && (mask >> g) & 1 == 1 {
                    f += 1;
                    u += x;
                }
            }
            fit.push(f);
            usable.push(u);
        }
        let mut seen: u128 = 0;
        let mut best: Option<Evaluation> = None;
        for (g, &x) in free.iter().enumerate() {
            if x < cores || (eligible >> g) & 1 == 0 {
                continue;
            }
            if access.uniform && x <= 127 {
                // Cards with equal free capacity give the same result on such nodes.
                if (seen >> x) & 1 == 1 {
                    continue;
                }
                seen |= 1 << x;
            }
            let y = x - cores;
            let t = total - cores;
            let after = if t == 0 {
                0.0
            } else {
                let all = f64::from(t);
                let mut frag = self.cpu_only * all;
                for i in 0..n {
                    let p = self.prob[i];
                    let mask = access.masks[i];
                    if mask == 0 || cpu_after < self.cpu[i] {
                        frag += p * all;
                        continue;
                    }
                    let d = self.per_card[i];
                    let (mut f, mut u) = (fit[i], usable[i]);
                    if (mask >> g) & 1 == 1 {
                        if x >= d {
                            f -= 1;
                            u -= x;
                        }
                        if y >= d {
                            f += 1;
                            u += y;
                        }
                    }
                    frag += p * if f >= self.cards[i] {
                        f64::from(t - u)
                    } else {
                        all
                    };
                }
                frag
            };
            let e = Evaluation {
                delta: after - base,
                frag_after: after,
                cards: 1 << g,
            };
            if best.as_ref().is_none_or(|b| e.delta < b.delta) {
                best = Some(e);
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::Link;

    /// CPU-only 1 core (p 0.2), a 50-core share with 1 core (p 0.4), one whole card with
    /// 4 cores (p 0.4).
    fn workload() -> Fgd {
        let w = TargetWorkload::select(
            [
                (TaskType::new(1000, Demand::CpuOnly, [""; 0]), 2.0),
                (
                    TaskType::new(1000, Demand::Share { cores: 50 }, [""; 0]),
                    4.0,
                ),
                (
                    TaskType::new(4000, Demand::Whole { cards: 1 }, [""; 0]),
                    4.0,
                ),
            ],
            1.0,
        )
        .unwrap();
        Fgd::new(w)
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn fragmentation_follows_the_papers_three_cases() {
        let f = workload();
        let acc = f.access_uniform("T4", 2);
        // Empty node: only the CPU-only type sees the idle GPUs as fragment: 0.2 × 200.
        assert!(close(f.fragmentation(&acc, 8000, &[100, 100]), 40.0));
        // [30, 100]: CPU-only 0.2×130; the share and the whole card fit, the 30-core card is
        // too small for both: 0.4×30 + 0.4×30.
        assert!(close(
            f.fragmentation(&acc, 8000, &[30, 100]),
            26.0 + 12.0 + 12.0
        ));
        // [30, 60]: the whole-card type no longer fits, so all 90 idle cores are fragment for it.
        assert!(close(
            f.fragmentation(&acc, 8000, &[30, 60]),
            18.0 + 12.0 + 36.0
        ));
        // Too little CPU for the whole-card type (4 cores): all idle GPU is fragment for it.
        assert!(close(f.fragmentation(&acc, 2000, &[100, 100]), 40.0 + 80.0));
        // No idle GPU, no fragmentation.
        assert!(close(f.fragmentation(&acc, 8000, &[0, 0]), 0.0));
    }

    #[test]
    fn types_that_exclude_the_node_model_see_all_idle_gpu_as_fragment() {
        let w = TargetWorkload::select(
            [(
                TaskType::new(0, Demand::Share { cores: 10 }, ["V100M16"]),
                1.0,
            )],
            1.0,
        )
        .unwrap();
        let f = Fgd::new(w);
        let t4 = f.access_uniform("T4", 2);
        let v100 = f.access_uniform("V100M16", 2);
        assert!(close(f.fragmentation(&t4, 1000, &[100, 50]), 150.0));
        assert!(close(f.fragmentation(&v100, 1000, &[100, 5]), 5.0));
        // Mixed node: only the V100 card is usable for the type.
        let mixed = f.access(["T4", "V100M16"]);
        assert!(!mixed.is_uniform());
        assert!(close(f.fragmentation(&mixed, 1000, &[100, 100]), 100.0));
    }

    #[test]
    fn a_share_goes_to_the_card_and_node_that_lower_fragmentation() {
        let f = workload();
        let acc = f.access_uniform("T4", 2);
        let share = Demand::Share { cores: 50 };
        // Empty node: F 40 -> [50,100]: 30 + 0 + 20 = 50, Δ = +10, on card 0 (both equal).
        let base = f.fragmentation(&acc, 8000, &[100, 100]);
        let e = f
            .evaluate(
                &acc,
                8000,
                &[100, 100],
                base,
                1000,
                share,
                u64::MAX,
                CardPick::Paper,
            )
            .unwrap();
        assert!(close(e.delta, 10.0));
        assert_eq!(e.card_list(), vec![0]);
        // [60,100]: F 56. Card 0 -> [10,100]: 22 + 4 + 4 = 30 (Δ −26); card 1 -> [60,50]:
        // 22 + 0 + 44 = 66 (Δ +10). FGD takes card 0.
        let base = f.fragmentation(&acc, 8000, &[60, 100]);
        assert!(close(base, 56.0));
        let e = f
            .evaluate(
                &acc,
                8000,
                &[60, 100],
                base,
                1000,
                share,
                u64::MAX,
                CardPick::Exact,
            )
            .unwrap();
        assert!(close(e.delta, -26.0));
        assert_eq!(e.cards, 1);
        // The paper's score ranks the second node higher: trunc(100·σ(0.26)) = 56 vs 47.
        assert_eq!(paper_score(-26.0), 56);
        assert_eq!(paper_score(10.0), 47);
        // Only card 1 eligible (e.g. memory): the pod still fits there.
        let e = f
            .evaluate(
                &acc,
                8000,
                &[60, 100],
                base,
                1000,
                share,
                0b10,
                CardPick::Exact,
            )
            .unwrap();
        assert_eq!(e.cards, 0b10);
        // Nothing fits: no card with 50 free, or too little CPU.
        assert!(f
            .evaluate(
                &acc,
                8000,
                &[40, 30],
                0.0,
                1000,
                share,
                u64::MAX,
                CardPick::Exact
            )
            .is_none());
        assert!(f
            .evaluate(
                &acc,
                500,
                &[100, 100],
                0.0,
                1000,
                share,
                u64::MAX,
                CardPick::Exact
            )
            .is_none());
    }

    #[test]
    fn whole_cards_and_cpu_only_pods_have_gradients_too() {
        let f = workload();
        let acc = f.access_uniform("T4", 2);
        // Whole card on [30,100]: takes card 1 -> [30,0]: 6 + 12 + 12 = 30; Δ = 30 − 50.
        let base = f.fragmentation(&acc, 8000, &[30, 100]);
        let e = f
            .evaluate(
                &acc,
                8000,
                &[30, 100],
                base,
                0,
                Demand::Whole { cards: 1 },
                u64::MAX,
                CardPick::Paper,
            )
            .unwrap();
        assert!(close(e.delta, -20.0));
        assert_eq!(e.card_list(), vec![1]);
        assert!(f
            .evaluate(
                &acc,
                8000,
                &[30, 100],
                base,
                0,
                Demand::Whole { cards: 2 },
                u64::MAX,
                CardPick::Paper
            )
            .is_none());
        // A CPU-only pod that leaves 4 cores changes nothing; one that leaves 3 makes the
        // whole-card type (4 cores) not fit: +0.4 × 200.
        let base = f.fragmentation(&acc, 8000, &[100, 100]);
        let cpu = |c| {
            f.evaluate(
                &acc,
                8000,
                &[100, 100],
                base,
                c,
                Demand::CpuOnly,
                u64::MAX,
                CardPick::Paper,
            )
            .unwrap()
            .delta
        };
        assert!(close(cpu(4000), 0.0));
        assert!(close(cpu(5000), 80.0));
    }

    #[test]
    fn the_copies_measure_sees_what_a_share_leaves_and_what_cpu_cannot_feed() {
        let w = TargetWorkload::select(
            [(
                TaskType::new(2000, Demand::Share { cores: 81 }, [""; 0]),
                1.0,
            )],
            1.0,
        )
        .unwrap();
        let paper = Fgd::new(w.clone());
        let copies = Fgd::new(w).with_measure(Measure::Copies);
        let acc = paper.access_uniform("G2", 2);
        // An empty card fits one 81-core share: the paper sees no fragment, copies sees 19.
        assert!(close(paper.fragmentation(&acc, 8000, &[100, 100]), 0.0));
        assert!(close(copies.fragmentation(&acc, 8000, &[100, 100]), 38.0));
        // CPU for one copy only: the second card cannot be fed.
        assert!(close(copies.fragmentation(&acc, 3000, &[100, 100]), 119.0));
        assert!(close(paper.fragmentation(&acc, 3000, &[100, 100]), 0.0));
    }

    #[test]
    fn the_target_keeps_the_most_popular_types_up_to_the_coverage() {
        let t = |c| TaskType::new(c, Demand::Share { cores: 10 }, [""; 0]);
        let w = TargetWorkload::select([(t(1), 5.0), (t(2), 3.0), (t(3), 1.0), (t(4), 1.0)], 0.8)
            .unwrap();
        assert_eq!(w.len(), 2);
        assert_eq!(w.types()[0].task, t(1));
        assert!(close(w.types()[0].probability, 5.0 / 8.0));
        assert!(close(w.covered(), 0.8));
        // 95 % of 10 is 9.5: the fourth type is needed.
        let w = TargetWorkload::select([(t(1), 5.0), (t(2), 3.0), (t(3), 1.0), (t(4), 1.0)], 0.95)
            .unwrap();
        assert_eq!(w.len(), 4);
        assert_eq!(
            TargetWorkload::select([(t(1), 1.0)], 0.0).unwrap_err(),
            WorkloadError::Coverage(0.0)
        );
        assert_eq!(
            TargetWorkload::select([(t(1), 0.0)], 1.0).unwrap_err(),
            WorkloadError::Empty
        );
    }

    #[test]
    fn the_learner_counts_pods_incrementally() {
        let a = TaskType::new(1000, Demand::Share { cores: 50 }, ["T4", " T4 "]);
        assert_eq!(a.models, vec!["T4"]);
        let b = TaskType::new(2000, Demand::Whole { cards: 1 }, [""; 0]);
        let mut l = WorkloadLearner::new();
        assert_eq!(l.target(0.95).unwrap(), None);
        for _ in 0..3 {
            l.observe(a.clone());
        }
        l.observe(b.clone());
        let t = l.target(1.0).unwrap().unwrap();
        assert!(close(t.types()[0].probability, 0.75));
        assert!(l.forget(&b));
        assert!(!l.forget(&b));
        assert_eq!((l.total(), l.distinct()), (3, 1));
        assert_eq!(l.target(1.0).unwrap().unwrap().len(), 1);
    }

    #[test]
    fn configured_workloads_parse_and_bad_entries_are_named() {
        let w = TargetWorkload::from_config_json(
            r#"{"types": [
                {"cpuMilli": 4000, "gpus": 1, "gpuCores": 50, "models": ["T4"], "weight": 3},
                {"cpuMilli": 8000, "gpus": 2, "gpuCores": 100, "weight": 1},
                {"cpuMilli": 2000, "weight": 1}]}"#,
        )
        .unwrap();
        assert_eq!(w.len(), 3);
        assert!(close(w.types()[0].probability, 0.6));
        assert_eq!(w.types()[0].task.models, vec!["T4"]);
        let bad = |json: &str| {
            TargetWorkload::from_config_json(json)
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            bad(r#"{"types":[{"weight":1},{"gpus":2,"gpuCores":50,"weight":1}]}"#),
            "workload type #1: gpus 2 with gpuCores 50: a share (gpuCores 1-99) uses exactly one card"
        );
        assert!(bad(r#"{"types":[{"gpus":1,"gpuCores":150,"weight":1}]}"#)
            .starts_with("workload type #0: gpuCores 150 is more than one card"));
        assert!(bad(r#"{"types":[{"gpus":1,"weight":1}]}"#).contains("gpus without gpuCores"));
        assert!(bad(r#"{"types":[{"gpus":1,"gpuCores":10,"weight":0}]}"#)
            .contains("weight 0 must be a positive number"));
        assert!(bad(r#"{"types":[{"gpu":1,"weight":1}]}"#).contains("unknown field `gpu`"));
        assert!(bad(r#"{"coverage":2,"types":[{"weight":1}]}"#).contains("coverage 2"));
        assert!(bad("[").starts_with("workload configuration is not valid JSON"));
    }

    #[test]
    fn place_pod_scores_a_node_for_the_extender() {
        let f = workload();
        let mut inv = NodeInventory::uniform(2, "Tesla T4", 16 * 1024, Link::Phb);
        let acc = f.access(inv.cards.iter().map(|c| c.model.as_str()));
        let mut ledger = NodeLedger::new(&inv);
        ledger.allocate(&Assignment::share(1, 40, 4)).unwrap();
        let pod = PodGpuRequest::from_app_requests([Some(GpuRequest::Share {
            cores: 50,
            blocks: 4,
        })]);
        let filter = CardFilter::default();
        fn node<'a>(
            access: &'a NodeAccess,
            inventory: &'a NodeInventory,
            ledger: &'a NodeLedger,
            cpu_free: Option<u64>,
        ) -> FgdNode<'a> {
            FgdNode {
                access,
                inventory,
                ledger,
                cpu_free,
            }
        }
        // The share goes next to the existing one on card 1 ([100, 60] -> [100, 10]).
        let p = f
            .place_pod(&node(&acc, &inv, &ledger, Some(8000)), 1000, &pod, &filter)
            .unwrap();
        assert_eq!(p.cards[&Slot::App(0)], vec![1]);
        assert!(ledger.check(&p.assignment).is_ok());
        assert!(p.delta < 0.0);
        assert_eq!(p.score, paper_score(p.delta));
        // Not enough CPU, or card 1 unhealthy and card 0 excluded by UUID: no placement.
        assert!(f
            .place_pod(&node(&acc, &inv, &ledger, Some(500)), 1000, &pod, &filter)
            .is_none());
        inv.cards[1].healthy = false;
        let not0 = CardFilter {
            exclude_uuids: vec![inv.cards[0].uuid.clone()],
            ..Default::default()
        };
        assert!(f
            .place_pod(&node(&acc, &inv, &ledger, None), 1000, &pod, &not0)
            .is_none());
        // Two 50-core containers share one card, leaving the other whole.
        inv.cards[1].healthy = true;
        let empty = NodeLedger::new(&inv);
        let two = PodGpuRequest::from_app_requests([
            Some(GpuRequest::Share {
                cores: 50,
                blocks: 1,
            }),
            Some(GpuRequest::Share {
                cores: 50,
                blocks: 1,
            }),
        ]);
        let p = f
            .place_pod(&node(&acc, &inv, &empty, None), 0, &two, &filter)
            .unwrap();
        assert_eq!(p.cards[&Slot::App(0)], p.cards[&Slot::App(1)]);
        assert!(empty.check(&p.assignment).is_ok());
    }

    #[test]
    fn cpu_quantities_read_in_milli_cores_rounded_up() {
        for (q, want) in [
            ("500m", 500),
            ("2", 2000),
            ("1.5", 1500),
            ("0.0015", 2),
            ("1.5m", 2),
            ("2k", 2_000_000),
            ("1e3", 1_000_000),
            ("1E-3", 1),
            ("1Ki", 1_024_000),
            ("250000u", 250),
            ("+3", 3000),
        ] {
            assert_eq!(cpu_milli(q), Ok(want), "{q}");
        }
        for bad in ["", "abc", "1x", "-2", "1e"] {
            assert!(cpu_milli(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_pods_cpu_counts_sidecars_init_peaks_limits_and_overhead() {
        let spec: PodSpec = serde_json::from_value(serde_json::json!({
            "initContainers": [
                {"name": "side", "restartPolicy": "Always", "resources": {"requests": {"cpu": "500m"}}},
                {"name": "init", "resources": {"limits": {"cpu": "4"}}},
            ],
            "containers": [
                {"name": "a", "resources": {"requests": {"cpu": "1"}, "limits": {"cpu": "8"}}},
                {"name": "b"},
            ],
            "overhead": {"cpu": "100m"},
        }))
        .unwrap();
        // Init peak 0.5 + 4 = 4.5 cores beats the steady 0.5 + 1; plus 0.1 overhead.
        assert_eq!(pod_cpu_milli(&spec), Ok(4600));
        let bad: PodSpec = serde_json::from_value(serde_json::json!({
            "containers": [{"name": "a", "resources": {"requests": {"cpu": "lots"}}}],
        }))
        .unwrap();
        let e = pod_cpu_milli(&bad).unwrap_err();
        assert!(e.starts_with("container \"a\": cpu: \"lots\""), "{e}");
    }

    #[test]
    fn a_pods_demand_is_its_steady_gpu_use() {
        let share = |cores| Some(GpuRequest::Share { cores, blocks: 1 });
        let whole = |cards| Some(GpuRequest::Whole { cards });
        let d = |reqs: Vec<Option<GpuRequest>>| pod_demand(&PodGpuRequest::from_app_requests(reqs));
        assert_eq!(d(vec![share(30)]), Demand::Share { cores: 30 });
        assert_eq!(d(vec![share(30), share(40)]), Demand::Share { cores: 70 });
        assert_eq!(d(vec![share(60), share(60)]), Demand::Whole { cards: 2 });
        assert_eq!(d(vec![whole(2), share(10)]), Demand::Whole { cards: 3 });
        assert_eq!(d(vec![None]), Demand::CpuOnly);
        let t = TaskType::of_pod(2000, &PodGpuRequest::from_app_requests([whole(1)]), ["T4"]);
        assert_eq!(t, TaskType::new(2000, Demand::Whole { cards: 1 }, ["T4"]));
    }

    /// A node of `n` cards, each with (used cores, used blocks, healthy, V100 rather than
    /// T4), and its ledger.
    fn node_state(cards: &[(u32, u32, bool, bool)]) -> (NodeInventory, NodeLedger) {
        let mut inv = NodeInventory::uniform(cards.len(), "Tesla T4", 16 * 1024, Link::Phb);
        let mut ledger = NodeLedger::new(&inv);
        for (i, &(cores, blocks, healthy, v100)) in cards.iter().enumerate() {
            inv.cards[i].healthy = healthy;
            if v100 {
                inv.cards[i].model = "Tesla V100".into();
            }
            let total = ledger.cards()[i].total_blocks;
            let a = if cores >= CORES_PER_CARD {
                Assignment::whole(&[i as u32])
            } else {
                Assignment::share(i as u32, cores, blocks.min(total))
            };
            if cores > 0 {
                ledger.allocate(&a).unwrap();
            }
        }
        (inv, ledger)
    }

    /// `workload()` plus a 30-core share that only runs on V100s.
    fn mixed_workload() -> Fgd {
        let mut types: Vec<(TaskType, f64)> = workload()
            .workload()
            .types()
            .iter()
            .map(|w| (w.task.clone(), w.probability))
            .collect();
        types.push((
            TaskType::new(500, Demand::Share { cores: 30 }, ["V100"]),
            0.3,
        ));
        Fgd::new(TargetWorkload::select(types, 1.0).unwrap())
    }

    use proptest::prelude::*;

    proptest! {
        /// The allocation-free single-container path decides exactly what place_pod decides.
        #[test]
        fn evaluating_card_states_matches_place_pod(
            cards in prop::collection::vec((0u32..=10, 0u32..80, prop::bool::weighted(0.9), prop::bool::weighted(0.3)), 1..9),
            req in prop_oneof![
                (1u32..100, 0u32..40).prop_map(|(c, b)| GpuRequest::Share { cores: c, blocks: b }),
                (1u32..4).prop_map(|n| GpuRequest::Whole { cards: n }),
            ],
            cpu in prop::option::of(0u64..20_000),
            pod_cpu in 0u64..8000,
            mixed in any::<bool>(),
        ) {
            let cards: Vec<(u32, u32, bool, bool)> = cards.into_iter().map(|(c, b, h, v)| (c * 10, b, h, v)).collect();
            let (inv, ledger) = node_state(&cards);
            let f = if mixed { mixed_workload() } else { workload() };
            let acc = f.access(inv.cards.iter().map(|c| c.model.as_str()));
            let healthy = healthy_cards(&inv);
            let node = FgdNode { access: &acc, inventory: &inv, ledger: &ledger, cpu_free: cpu };
            let pod = PodGpuRequest::from_app_requests([Some(req)]);
            let full = f.place_pod(&node, pod_cpu, &pod, &CardFilter::default());
            let base = f.node_fragmentation(&acc, ledger.cards(), healthy, cpu);
            let quick = f.evaluate_cards(&acc, ledger.cards(), healthy, healthy, cpu, base, pod_cpu, &req);
            prop_assert_eq!(full.is_some(), quick.is_some());
            if let (Some(p), Some(e)) = (full, quick) {
                prop_assert_eq!(&p.cards[&Slot::App(0)], &e.card_list());
                prop_assert!((p.delta - e.delta).abs() < 1e-9);
            }
        }
    }
}
