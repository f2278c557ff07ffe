//! `fgd+`: FGD plus *capability protection* (see `docs/simulator.md` for the method, the
//! experiments and the numbers).
//!
//! FGD ranks nodes by the fragmentation gradient Δ over the target workload (the most popular
//! types, 95 % of pods). It is blind to rare but large pods — 8 whole cards with 120 cores fit
//! only the 39 128-core 8-card nodes of the openb cluster — and those fail first when any small
//! pod lands on such a node. `fgd+` adds to Δ the *capability loss* of the placement:
//!
//! * the **capability** of a node is the set of GPU task types of the whole observed workload
//!   (coverage 1) that still fit it ([`Capability`]); a placement that makes type m stop fitting
//!   loses `p_m · cards_m · 100 vcuda-core` ([`CapWeight::Cards`]: the type's probability times
//!   the cards it occupies, a share counting as one card);
//! * times the type's **scarcity** `nodes / hosts_m`, where hosts_m is the number of nodes of
//!   the cluster that can host m right now ([`Scarcity::Dynamic`]). This is the one global
//!   input: the caller keeps the per-type host counts (one fit check per type when a node
//!   changes) and passes the factors with every decision.
//!
//! Nodes then rank by `−round((Δ + loss) / 10 vcuda-core)` ([`Primary::Rounded`]); equal keys
//! are left to a consistent node order (the simulator's per-seed order; in the extender a stable
//! hash of the node name) — the coarse key plus a consistent order is what packs whole-card pods.
//! The card of a share is the one with the smallest exact gradient. Everything is deterministic.
//!
//! [`PlusConfig`] keeps the research knobs (the copies measure, other secondary keys, weights)
//! so that the experiments in `docs/simulator.md` can be re-run.

use std::fmt;
use std::str::FromStr;

use crate::annotations::{CardFilter, ModelFilter};
use crate::fgd::{
    healthy_cards, paper_score, pod_demand, CardPick, Demand, Fgd, FgdNode, FgdPlacement,
    FreeCards, Measure, NodeAccess, TargetWorkload, MAX_CARDS,
};
use crate::ledger::CardState;
use crate::request::{GpuRequest, PodGpuRequest};
use crate::resources::CORES_PER_CARD;

/// How nodes are ranked first.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Primary {
    /// `−round(Δ / granularity)`, Δ in vcuda-core (granularity > 0).
    Rounded { granularity: f64 },
    /// The paper's truncated sigmoid score.
    Paper,
}

/// How nodes with equal primary keys are ranked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Secondary {
    /// Leave ties to the caller.
    None,
    /// Least `½·cpu_left/max_cpu + ½·gpu_left/max_gpu` after the placement.
    BestFit,
    /// Least idle GPU capacity left on the node after the placement.
    GpuLeft,
    /// Least idle share of the node's GPU capacity after the placement (fullest node).
    GpuFraction,
    /// Least capability loss (see [`Capability`]).
    Capability,
}

/// How the capability loss weighs a task type that stops fitting a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CapWeight {
    /// Its probability × 100 vcuda-core.
    Prob,
    /// Its probability × its GPU demand (vcuda-core).
    Demand,
    /// Its probability × the cards it occupies × 100 vcuda-core (a share counts as one card).
    Cards,
}

/// How much the capability loss of a type is amplified by how few nodes can host it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scarcity {
    /// Not at all.
    None,
    /// `nodes / hosts` with hosts counted on the empty cluster (the inventory alone).
    Static,
    /// `nodes / hosts` with hosts counted on the current cluster state.
    Dynamic,
}

/// Knobs of `fgd+`; [`PlusConfig::default`] is the published policy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PlusConfig {
    /// Fragmentation measure of the gradient.
    pub measure: Measure,
    pub primary: Primary,
    pub secondary: Secondary,
    /// Capability loss (vcuda-core) added to the gradient before rounding, times this.
    pub cap_weight: f64,
    /// How the capability loss weighs a type.
    pub cap: CapWeight,
    /// Amplification of rare capabilities (the caller computes the factors).
    pub scarcity: Scarcity,
    /// Largest node CPU, milli-cores (best-fit normaliser).
    pub max_cpu_milli: u64,
    /// Largest node GPU capacity, vcuda-core (best-fit normaliser).
    pub max_gpu_cores: u64,
}

impl Default for PlusConfig {
    fn default() -> Self {
        Self {
            measure: Measure::Paper,
            primary: Primary::Rounded { granularity: 10.0 },
            secondary: Secondary::None,
            cap_weight: 1.0,
            cap: CapWeight::Cards,
            scarcity: Scarcity::Dynamic,
            max_cpu_milli: 128_000,
            max_gpu_cores: 800,
        }
    }
}

/// A `fgd+` configuration string that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid fgd+ setting {0:?}: use comma-separated key=value with measure=copies|paper, primary=paper or primary=<granularity in vcuda-core, > 0>, secondary=best-fit|gpu-left|gpu-fraction|capability|none, cap-weight=<number >= 0>, cap=cards|demand|prob, scarcity=dynamic|static|none, max-cpu=<milli-cores>, max-gpu=<vcuda-core>")]
pub struct PlusConfigError(pub String);

impl FromStr for PlusConfig {
    type Err = PlusConfigError;
    /// `primary=4,secondary=best-fit,max-cpu=128000,max-gpu=800` (any subset; the rest default).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut c = PlusConfig::default();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let err = || PlusConfigError(part.to_string());
            let (k, v) = part.split_once('=').ok_or_else(err)?;
            let v = v.trim();
            match k.trim() {
                "measure" => {
                    c.measure = match v {
                        "paper" => Measure::Paper,
                        "copies" => Measure::Copies,
                        _ => return Err(err()),
                    }
                }
                "primary" if v == "paper" => c.primary = Primary::Paper,
                "primary" => {
                    let g: f64 = v.parse().map_err(|_| err())?;
                    if !(g.is_finite() && g > 0.0) {
                        return Err(err());
                    }
                    c.primary = Primary::Rounded { granularity: g };
                }
                "secondary" => {
                    c.secondary = match v {
                        "best-fit" => Secondary::BestFit,
                        "gpu-left" => Secondary::GpuLeft,
                        "gpu-fraction" => Secondary::GpuFraction,
                        "capability" => Secondary::Capability,
                        "none" => Secondary::None,
                        _ => return Err(err()),
                    }
                }
                "cap-weight" => {
                    c.cap_weight = v
                        .parse()
                        .ok()
                        .filter(|x: &f64| x.is_finite() && *x >= 0.0)
                        .ok_or_else(err)?
                }
                "scarcity" => {
                    c.scarcity = match v {
                        "none" => Scarcity::None,
                        "static" => Scarcity::Static,
                        "dynamic" => Scarcity::Dynamic,
                        _ => return Err(err()),
                    }
                }
                "cap" => {
                    c.cap = match v {
                        "prob" => CapWeight::Prob,
                        "demand" => CapWeight::Demand,
                        "cards" => CapWeight::Cards,
                        _ => return Err(err()),
                    }
                }
                "max-cpu" => c.max_cpu_milli = v.parse().ok().filter(|&x| x > 0).ok_or_else(err)?,
                "max-gpu" => c.max_gpu_cores = v.parse().ok().filter(|&x| x > 0).ok_or_else(err)?,
                _ => return Err(err()),
            }
        }
        Ok(c)
    }
}

impl fmt::Display for PlusConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = match self.measure {
            Measure::Paper => "paper",
            Measure::Copies => "copies",
        };
        write!(f, "measure={m},")?;
        match self.primary {
            Primary::Paper => f.write_str("primary=paper")?,
            Primary::Rounded { granularity } => write!(f, "primary={granularity}")?,
        }
        let sec = match self.secondary {
            Secondary::None => "none",
            Secondary::BestFit => "best-fit",
            Secondary::GpuLeft => "gpu-left",
            Secondary::GpuFraction => "gpu-fraction",
            Secondary::Capability => "capability",
        };
        let cap = match self.cap {
            CapWeight::Prob => "prob",
            CapWeight::Demand => "demand",
            CapWeight::Cards => "cards",
        };
        let sc = match self.scarcity {
            Scarcity::None => "none",
            Scarcity::Static => "static",
            Scarcity::Dynamic => "dynamic",
        };
        write!(f, ",cap-weight={},cap={cap},scarcity={sc}", self.cap_weight)?;
        write!(
            f,
            ",secondary={sec},max-cpu={},max-gpu={}",
            self.max_cpu_milli, self.max_gpu_cores
        )
    }
}

/// Which task types still fit a node, weighted: the node's *capability*. A placement that
/// makes a type stop fitting loses that type's weight. Built over the whole observed workload
/// (coverage 1), so rare but large types (8 whole cards with 120 cores) count even though the
/// target workload of the gradient leaves them out.
#[derive(Debug, Clone)]
pub struct Capability {
    cpu: Vec<u64>,
    per_card: Vec<u32>,
    cards: Vec<u32>,
    weight: Vec<f64>,
    filters: Vec<ModelFilter>,
}

/// Per node (cache it per inventory, like [`NodeAccess`]): the cards each capability type may
/// use (bit i = card i).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapAccess {
    masks: Vec<u64>,
}

impl CapAccess {
    /// Cards type `i` may use (none for a type this access was not built for).
    fn mask(&self, i: usize) -> u64 {
        self.masks.get(i).copied().unwrap_or(0)
    }
}

impl Capability {
    /// The GPU types of `workload` (CPU-only types never stop fitting for GPU reasons and are
    /// left out), weighted as `weighting` says.
    pub fn new(workload: &TargetWorkload, weighting: CapWeight) -> Self {
        let mut c = Self {
            cpu: Vec::new(),
            per_card: Vec::new(),
            cards: Vec::new(),
            weight: Vec::new(),
            filters: Vec::new(),
        };
        for w in workload.types() {
            let d = w.task.demand;
            if d == Demand::CpuOnly {
                continue;
            }
            c.cpu.push(w.task.cpu_milli);
            c.per_card.push(d.per_card());
            c.cards.push(d.cards());
            c.weight.push(
                w.probability
                    * match weighting {
                        CapWeight::Prob => f64::from(CORES_PER_CARD),
                        CapWeight::Demand => d.total_cores() as f64,
                        CapWeight::Cards => f64::from(d.cards() * CORES_PER_CARD),
                    },
            );
            c.filters.push(ModelFilter::new(&w.task.models));
        }
        c
    }

    /// Which cards each type may use, given each card's model.
    pub fn access<'a>(&self, card_models: impl IntoIterator<Item = &'a str>) -> CapAccess {
        let models: Vec<&str> = card_models.into_iter().take(MAX_CARDS).collect();
        CapAccess {
            masks: self
                .filters
                .iter()
                .map(|f| {
                    models
                        .iter()
                        .enumerate()
                        .filter(|(_, m)| f.matches(m))
                        .fold(0u64, |acc, (i, _)| acc | 1 << i)
                })
                .collect(),
        }
    }

    /// Number of types.
    pub fn len(&self) -> usize {
        self.cpu.len()
    }

    /// True without GPU types.
    pub fn is_empty(&self) -> bool {
        self.cpu.is_empty()
    }

    /// Whether type `i` fits a node with `cpu_free` milli-cores and `free` vcuda-core per card.
    /// False for an unknown type index, and for cards `access` does not cover.
    pub fn fits(&self, i: usize, access: &CapAccess, cpu_free: u64, free: &[u32]) -> bool {
        if i >= self.len() || cpu_free < self.cpu[i] {
            return false;
        }
        let (d, mask) = (self.per_card[i], access.mask(i));
        let mut n = 0;
        for (g, &x) in free.iter().enumerate() {
            if x >= d && (mask >> g) & 1 == 1 {
                n += 1;
            }
        }
        n >= self.cards[i]
    }

    /// Summed weight of the types that fit the node, each times `factor[i]` (1 where `factor`
    /// is shorter).
    pub fn hosted(&self, access: &CapAccess, cpu_free: u64, free: &[u32], factor: &[f64]) -> f64 {
        self.hosted_except(access, cpu_free, free, factor, None)
    }

    /// True when a pod of `cpu` milli-cores and `demand` needs at least as much of everything
    /// as type `i`: if such a pod takes the node's last room for type i, it uses that room
    /// itself rather than fragmenting it.
    pub fn dominated_by(&self, i: usize, cpu: u64, demand: Demand) -> bool {
        demand != Demand::CpuOnly
            && self.cpu[i] <= cpu
            && self.cards[i] <= demand.cards()
            && self.per_card[i] <= demand.per_card()
    }

    /// [`Capability::hosted`] leaving out the types dominated by the pod `except` (CPU,
    /// demand), see [`Capability::dominated_by`].
    pub fn hosted_except(
        &self,
        access: &CapAccess,
        cpu_free: u64,
        free: &[u32],
        factor: &[f64],
        except: Option<(u64, Demand)>,
    ) -> f64 {
        (0..self.len())
            .filter(|&i| except.is_none_or(|(c, d)| !self.dominated_by(i, c, d)))
            .filter(|&i| self.fits(i, access, cpu_free, free))
            .map(|i| self.weight[i] * factor.get(i).copied().unwrap_or(1.0))
            .sum()
    }

    /// Weighted capability loss of a node going from (`cpu_before`, `before`) to
    /// (`cpu_after`, `after`): the summed weight × `factor[i]` of the types that fit before
    /// and not after, leaving out the types the placed pod `except` dominates. Equal to the
    /// difference of [`Capability::hosted_except`] before and after, in one pass.
    #[allow(clippy::too_many_arguments)]
    pub fn loss(
        &self,
        access: &CapAccess,
        before: (u64, &[u32]),
        after: (u64, &[u32]),
        factor: &[f64],
        except: Option<(u64, Demand)>,
    ) -> f64 {
        let mut loss = 0.0;
        self.each_lost(access, before, after, except, |i| {
            loss += self.weight[i] * factor.get(i).copied().unwrap_or(1.0);
        });
        loss
    }

    /// The types [`Capability::loss`] counts, ascending: they fit before and not after, and
    /// the pod `except` does not dominate them. Weigh them with [`Capability::weigh`] — the
    /// scarcity factors can change while the set stays valid.
    pub fn lost_types(
        &self,
        access: &CapAccess,
        before: (u64, &[u32]),
        after: (u64, &[u32]),
        except: Option<(u64, Demand)>,
    ) -> Vec<u32> {
        let mut lost = Vec::new();
        self.each_lost(access, before, after, except, |i| lost.push(i as u32));
        lost
    }

    /// The weighted loss of `lost` (from [`Capability::lost_types`]) under `factor`: equal to
    /// [`Capability::loss`] with the same arguments.
    pub fn weigh(&self, lost: &[u32], factor: &[f64]) -> f64 {
        let mut loss = 0.0;
        for &i in lost {
            let i = i as usize;
            if let Some(w) = self.weight.get(i) {
                loss += w * factor.get(i).copied().unwrap_or(1.0);
            }
        }
        loss
    }

    fn each_lost(
        &self,
        access: &CapAccess,
        (cpu_before, before): (u64, &[u32]),
        (cpu_after, after): (u64, &[u32]),
        except: Option<(u64, Demand)>,
        mut lost: impl FnMut(usize),
    ) {
        let n = before.len().min(MAX_CARDS);
        let all = if n == MAX_CARDS {
            u64::MAX
        } else {
            (1u64 << n) - 1
        };
        // Free capacity sorted high to low: on a type that may use every card, it fits iff
        // its k-th largest card has enough free.
        let sorted = |x: &[u32]| {
            let mut v = [0u32; MAX_CARDS];
            let m = x.len().min(n);
            v[..m].copy_from_slice(&x[..m]);
            v[..m].sort_unstable_by(|a, b| b.cmp(a));
            v
        };
        let (sb, sa) = (sorted(before), sorted(after));
        let fits = |i: usize, cpu: u64, free: &[u32], s: &[u32; MAX_CARDS]| -> bool {
            if cpu < self.cpu[i] {
                return false;
            }
            let k = self.cards[i] as usize;
            if access.mask(i) == all && free.len() == n {
                return k <= n && (k == 0 || s[k - 1] >= self.per_card[i]);
            }
            self.fits(i, access, cpu, free)
        };
        for i in 0..self.len() {
            if except.is_some_and(|(c, d)| self.dominated_by(i, c, d)) {
                continue;
            }
            if fits(i, cpu_before, before, &sb) && !fits(i, cpu_after, after, &sa) {
                lost(i);
            }
        }
    }
}

/// The `fgd+` policy over a compiled target workload.
#[derive(Debug, Clone)]
pub struct FgdPlus {
    fgd: Fgd,
    config: PlusConfig,
    capability: Option<Capability>,
}

/// `fgd+`'s verdict on one node.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PlusChoice {
    /// Ranking key: higher is better; equal keys are equally good.
    pub key: i64,
    /// Fragmentation gradient, vcuda-core.
    pub delta: f64,
    /// Capability loss, vcuda-core (0 without a capability).
    pub loss: f64,
    /// Cards to use (bit i = card i).
    pub cards: u64,
}

/// `fgd+`'s placement of a whole pod on one node.
#[derive(Debug, Clone, PartialEq)]
pub struct PlusPlacement {
    /// The cards and charges ([`FgdPlacement::delta`] is the gradient under `fgd+`'s measure).
    pub placement: FgdPlacement,
    /// The ranking key (higher is better), gradient and capability loss.
    pub choice: PlusChoice,
}

/// What [`FgdPlus::parts_cards`] finds, valid whatever the scarcity factors are.
#[derive(Debug, Clone, PartialEq)]
pub struct PlusParts {
    /// Fragmentation gradient, vcuda-core.
    pub delta: f64,
    /// Cards to use (bit i = card i).
    pub cards: u64,
    /// Capability types the placement loses (ascending).
    pub lost: Vec<u32>,
}

/// Range of the secondary key.
const SECONDARY_SPAN: i64 = 1 << 24;

impl FgdPlus {
    pub fn new(fgd: Fgd) -> Self {
        Self::with_config(fgd, PlusConfig::default())
    }

    /// `fgd` is used with the measure of `config`.
    pub fn with_config(fgd: Fgd, config: PlusConfig) -> Self {
        Self {
            fgd: fgd.with_measure(config.measure),
            config,
            capability: None,
        }
    }

    /// Protect the capability over `workload` (normally the whole observed workload,
    /// coverage 1); without it the capability terms are 0.
    pub fn with_capability(mut self, workload: &TargetWorkload) -> Self {
        self.capability = Some(Capability::new(workload, self.config.cap));
        self
    }

    /// The capability in use, if any.
    pub fn capability(&self) -> Option<&Capability> {
        self.capability.as_ref()
    }

    /// Card access of the capability types for a node (empty without a capability).
    pub fn cap_access<'a>(&self, card_models: impl IntoIterator<Item = &'a str>) -> CapAccess {
        match &self.capability {
            Some(c) => c.access(card_models),
            None => CapAccess { masks: Vec::new() },
        }
    }

    pub fn fgd(&self) -> &Fgd {
        &self.fgd
    }

    pub fn config(&self) -> PlusConfig {
        self.config
    }

    /// Score one node for a pod; `None` when it does not fit. Arguments as for
    /// [`Fgd::evaluate`]; `base` is the node's fragmentation under this policy's measure
    /// (`self.fgd().fragmentation(..)`).
    #[allow(clippy::too_many_arguments)]
    pub fn score(
        &self,
        access: &NodeAccess,
        cap_access: &CapAccess,
        scarcity: &[f64],
        cpu_free: u64,
        free: &[u32],
        base: f64,
        pod_cpu: u64,
        demand: Demand,
        eligible: u64,
    ) -> Option<PlusChoice> {
        let e = self.fgd.evaluate(
            access,
            cpu_free,
            free,
            base,
            pod_cpu,
            demand,
            eligible,
            CardPick::Exact,
        )?;
        let c = &self.config;
        let loss = match &self.capability {
            Some(cap) if c.cap_weight > 0.0 || c.secondary == Secondary::Capability => {
                let mut buf = [0u32; MAX_CARDS];
                let after = free_after(free, e.cards, demand.per_card(), &mut buf);
                // Types the pod dominates lose nothing: the pod uses their room itself.
                cap.loss(
                    cap_access,
                    (cpu_free, free),
                    (cpu_free - pod_cpu, after),
                    scarcity,
                    Some((pod_cpu, demand)),
                )
            }
            _ => 0.0,
        };
        Some(self.key(e.delta, loss, e.cards, cpu_free, free, pod_cpu, demand))
    }

    /// [`FgdPlus::score`] for a pod whose only GPU container is the long-running `request`, from
    /// the node's card states alone: `healthy` the node's healthy cards, `usable` the healthy
    /// cards the pod's constraints allow, `cpu_free` as in [`FgdNode`] (`None` = not a
    /// constraint), `base` the node's fragmentation under this policy's measure
    /// (`self.fgd().node_fragmentation(..)`). Equal to [`FgdPlus::place_pod`]'s choice for such
    /// a pod. The same as [`FgdPlus::parts_cards`] then [`FgdPlus::choose`].
    #[allow(clippy::too_many_arguments)]
    pub fn score_cards(
        &self,
        access: &NodeAccess,
        cap_access: &CapAccess,
        scarcity: &[f64],
        cards: &[CardState],
        (healthy, usable): (u64, u64),
        cpu_free: Option<u64>,
        base: f64,
        pod_cpu: u64,
        request: &GpuRequest,
    ) -> Option<PlusChoice> {
        let parts = self.parts_cards(
            access,
            cap_access,
            cards,
            (healthy, usable),
            cpu_free,
            base,
            pod_cpu,
            request,
        )?;
        Some(self.choose(&parts, scarcity, cards, healthy, cpu_free, pod_cpu, request))
    }

    /// The part of [`FgdPlus::score_cards`] that does not depend on the scarcity factors: the
    /// gradient, the cards and the capability types the placement loses. A caller may keep it
    /// while the node and the pod are the same and re-[`choose`](FgdPlus::choose) when only the
    /// scarcity changed (it changes whenever any node gains or loses a type).
    #[allow(clippy::too_many_arguments)]
    pub fn parts_cards(
        &self,
        access: &NodeAccess,
        cap_access: &CapAccess,
        cards: &[CardState],
        (healthy, usable): (u64, u64),
        cpu_free: Option<u64>,
        base: f64,
        pod_cpu: u64,
        request: &GpuRequest,
    ) -> Option<PlusParts> {
        if cards.len() > MAX_CARDS {
            return None;
        }
        let e = self.fgd.evaluate_cards(
            access, cards, healthy, usable, cpu_free, base, pod_cpu, request,
        )?;
        let cpu = cpu_free.unwrap_or(u64::MAX);
        let demand = Demand::of_request(request);
        let c = &self.config;
        let lost = match &self.capability {
            Some(cap) if c.cap_weight > 0.0 || c.secondary == Secondary::Capability => {
                let free = FreeCards::of(cards, healthy);
                let free = free.as_slice();
                let mut buf = [0u32; MAX_CARDS];
                let after = free_after(free, e.cards, demand.per_card(), &mut buf);
                // Types the pod dominates lose nothing: the pod uses their room itself.
                cap.lost_types(
                    cap_access,
                    (cpu, free),
                    (cpu - pod_cpu, after),
                    Some((pod_cpu, demand)),
                )
            }
            _ => Vec::new(),
        };
        Some(PlusParts {
            delta: e.delta,
            cards: e.cards,
            lost,
        })
    }

    /// The choice of [`FgdPlus::score_cards`] from its [`PlusParts`] under the current
    /// `scarcity` (the other arguments as for `score_cards`).
    #[allow(clippy::too_many_arguments)]
    pub fn choose(
        &self,
        parts: &PlusParts,
        scarcity: &[f64],
        cards: &[CardState],
        healthy: u64,
        cpu_free: Option<u64>,
        pod_cpu: u64,
        request: &GpuRequest,
    ) -> PlusChoice {
        let loss = self
            .capability
            .as_ref()
            .map_or(0.0, |cap| cap.weigh(&parts.lost, scarcity));
        let free = FreeCards::of(cards, healthy);
        self.key(
            parts.delta,
            loss,
            parts.cards,
            cpu_free.unwrap_or(u64::MAX),
            free.as_slice(),
            pod_cpu,
            Demand::of_request(request),
        )
    }

    /// Place a whole pod on one node, for the extender: the cards of [`Fgd::place_pod`] under
    /// this policy's measure (smallest exact gradient), and the ranking key of that placement
    /// with its capability loss (`scarcity` as for [`FgdPlus::score`]; the pod counts as its
    /// [`pod_demand`]). `None` when the pod does not fit.
    pub fn place_pod(
        &self,
        node: &FgdNode<'_>,
        cap_access: &CapAccess,
        scarcity: &[f64],
        pod_cpu: u64,
        pod: &PodGpuRequest,
        filter: &CardFilter,
    ) -> Option<PlusPlacement> {
        let placement = self.fgd.place_pod(node, pod_cpu, pod, filter)?;
        let cpu = node.cpu_free.unwrap_or(u64::MAX);
        let healthy = healthy_cards(node.inventory);
        let before = FreeCards::of(node.ledger.cards(), healthy);
        let mut after_ledger = node.ledger.clone();
        after_ledger.allocate(&placement.assignment).ok()?;
        let after = FreeCards::of(after_ledger.cards(), healthy);
        let demand = pod_demand(pod);
        let c = &self.config;
        let loss = match &self.capability {
            Some(cap) if c.cap_weight > 0.0 || c.secondary == Secondary::Capability => cap.loss(
                cap_access,
                (cpu, before.as_slice()),
                (cpu - pod_cpu, after.as_slice()),
                scarcity,
                Some((pod_cpu, demand)),
            ),
            _ => 0.0,
        };
        let cards = placement
            .cards
            .values()
            .flatten()
            .filter(|&&g| (g as usize) < MAX_CARDS)
            .fold(0u64, |m, &g| m | 1u64 << g);
        let choice = self.key(
            placement.delta,
            loss,
            cards,
            cpu,
            before.as_slice(),
            pod_cpu,
            demand,
        );
        Some(PlusPlacement { placement, choice })
    }

    /// The ranking key of a placement with gradient `delta` and capability loss `loss`.
    #[allow(clippy::too_many_arguments)]
    fn key(
        &self,
        delta: f64,
        loss: f64,
        cards: u64,
        cpu_free: u64,
        free: &[u32],
        pod_cpu: u64,
        demand: Demand,
    ) -> PlusChoice {
        let raw = delta;
        let delta = raw + self.config.cap_weight * loss;
        let primary = match self.config.primary {
            Primary::Paper => paper_score(delta),
            Primary::Rounded { granularity } => -(delta / granularity).round() as i64,
        };
        let cpu_left = cpu_free.saturating_sub(pod_cpu) as f64;
        let gpu_left = (free.iter().map(|&x| u64::from(x)).sum::<u64>())
            .saturating_sub(demand.total_cores()) as f64;
        let c = &self.config;
        let leftover = match c.secondary {
            Secondary::None => 0.0,
            Secondary::BestFit => {
                0.5 * cpu_left / c.max_cpu_milli as f64 + 0.5 * gpu_left / c.max_gpu_cores as f64
            }
            Secondary::GpuLeft => gpu_left / c.max_gpu_cores as f64,
            Secondary::GpuFraction => {
                gpu_left / (free.len().max(1) as f64 * f64::from(CORES_PER_CARD))
            }
            Secondary::Capability => loss / f64::from(CORES_PER_CARD * MAX_CARDS as u32),
        };
        let secondary = ((1.0 - leftover.clamp(0.0, 1.0)) * (SECONDARY_SPAN - 1) as f64) as i64;
        PlusChoice {
            key: primary
                .saturating_mul(SECONDARY_SPAN)
                .saturating_add(secondary),
            delta: raw,
            loss,
            cards,
        }
    }
}

/// The cards' free capacity after taking `per` from each card in the bit mask `cards`
/// (written into `buf`, which must hold `free.len()` entries).
fn free_after<'a>(free: &[u32], cards: u64, per: u32, buf: &'a mut [u32; MAX_CARDS]) -> &'a [u32] {
    let after = &mut buf[..free.len()];
    after.copy_from_slice(free);
    let mut m = cards;
    while m != 0 {
        let g = m.trailing_zeros() as usize;
        m &= m - 1;
        after[g] = after[g].saturating_sub(per);
    }
    after
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fgd::{TargetWorkload, TaskType};

    fn plus(config: PlusConfig) -> FgdPlus {
        let w = TargetWorkload::select(
            [
                (
                    TaskType::new(1000, Demand::Share { cores: 50 }, [""; 0]),
                    1.0,
                ),
                (
                    TaskType::new(4000, Demand::Whole { cards: 1 }, [""; 0]),
                    1.0,
                ),
            ],
            1.0,
        )
        .unwrap();
        FgdPlus::with_config(Fgd::new(w), config)
    }

    #[test]
    fn settings_parse_print_and_reject_nonsense() {
        let c: PlusConfig = "primary=paper,secondary=best-fit,measure=paper"
            .parse()
            .unwrap();
        assert_eq!(c.primary, Primary::Paper);
        assert_eq!(c.secondary, Secondary::BestFit);
        assert_eq!(c.measure, Measure::Paper);
        assert_eq!(c.to_string().parse::<PlusConfig>().unwrap(), c);
        assert_eq!("".parse::<PlusConfig>().unwrap(), PlusConfig::default());
        let c: PlusConfig = "cap-weight=0.5,cap=prob,scarcity=static,secondary=capability"
            .parse()
            .unwrap();
        assert_eq!(
            (c.cap_weight, c.cap, c.scarcity, c.secondary),
            (
                0.5,
                CapWeight::Prob,
                Scarcity::Static,
                Secondary::Capability
            )
        );
        assert_eq!(c.to_string().parse::<PlusConfig>().unwrap(), c);
        for bad in [
            "primary=0",
            "primary=x",
            "secondary=worst",
            "speed=1",
            "measure",
            "cap-weight=-1",
            "cap=gpus",
            "scarcity=global",
        ] {
            let e = bad.parse::<PlusConfig>().unwrap_err().to_string();
            assert!(e.contains("use comma-separated key=value"), "{bad}: {e}");
        }
    }

    #[test]
    fn a_smaller_gradient_ranks_higher_and_ties_fall_to_the_secondary_key() {
        let p = plus(PlusConfig {
            measure: Measure::Paper,
            primary: Primary::Rounded { granularity: 10.0 },
            secondary: Secondary::BestFit,
            ..PlusConfig::default()
        });
        let acc = p.fgd().access_uniform("T4", 2);
        let cap = p.cap_access(["T4"; 2]);
        let share = Demand::Share { cores: 50 };
        let score = |cpu: u64, free: &[u32]| {
            let base = p.fgd().fragmentation(&acc, cpu, free);
            p.score(&acc, &cap, &[], cpu, free, base, 1000, share, u64::MAX)
                .unwrap()
        };
        // Filling a half-used card beats opening a fresh one.
        let half = score(8000, &[50, 100]);
        let fresh = score(8000, &[100, 100]);
        assert!(half.delta < fresh.delta && half.key > fresh.key);
        assert_eq!(half.cards, 1);
        // Same gradient, less CPU left afterwards: best fit prefers it.
        let lean = score(5000, &[50, 100]);
        assert_eq!(lean.delta, half.delta);
        assert!(lean.key > half.key);
        // With no secondary key they tie.
        let p2 = plus(PlusConfig {
            secondary: Secondary::None,
            ..p.config()
        });
        let k = |cpu| {
            let base = p2.fgd().fragmentation(&acc, cpu, &[50, 100]);
            p2.score(
                &acc,
                &cap,
                &[],
                cpu,
                &[50, 100],
                base,
                1000,
                share,
                u64::MAX,
            )
            .unwrap()
            .key
        };
        assert_eq!(k(5000), k(8000));
    }

    /// Target workload: whole cards with 10 cores only. Observed workload: the same type
    /// (p 0.9) and a rare 8-card type with 120 cores (p 0.1) that fits only 128-core nodes.
    fn with_rare_big_type(config: PlusConfig) -> FgdPlus {
        let one = TaskType::new(10_000, Demand::Whole { cards: 1 }, [""; 0]);
        let big = TaskType::new(120_000, Demand::Whole { cards: 8 }, [""; 0]);
        let target = TargetWorkload::select([(one.clone(), 1.0)], 1.0).unwrap();
        let seen = TargetWorkload::select([(one, 9.0), (big, 1.0)], 1.0).unwrap();
        FgdPlus::with_config(Fgd::new(target), config).with_capability(&seen)
    }

    fn key_for(p: &FgdPlus, cpu: u64, scarcity: &[f64]) -> PlusChoice {
        let acc = p.fgd().access_uniform("G", 8);
        let cap = p.cap_access(["G"; 8]);
        let free = [100u32; 8];
        let base = p.fgd().fragmentation(&acc, cpu, &free);
        p.score(
            &acc,
            &cap,
            scarcity,
            cpu,
            &free,
            base,
            10_000,
            Demand::Whole { cards: 1 },
            u64::MAX,
        )
        .unwrap()
    }

    #[test]
    fn a_small_pod_avoids_the_only_kind_of_node_that_hosts_a_rare_big_pod() {
        let p = with_rare_big_type(PlusConfig::default());
        // One 128-core node hosts the big type, three 96-core nodes do not: scarcity 4.
        let scarcity = [1.0, 4.0];
        let rich = key_for(&p, 128_000, &scarcity);
        let lean = key_for(&p, 96_000, &scarcity);
        assert_eq!(rich.delta, lean.delta, "FGD alone sees no difference");
        // p 0.1 × 8 cards × 100 × scarcity 4.
        assert!((rich.loss - 320.0).abs() < 1e-9, "{}", rich.loss);
        assert_eq!(lean.loss, 0.0);
        assert!(lean.key > rich.key);
        // Without capability protection the two nodes tie (left to the node order).
        let plain = FgdPlus::with_config(p.fgd().clone(), PlusConfig::default());
        assert_eq!(
            key_for(&plain, 128_000, &scarcity).key,
            key_for(&plain, 96_000, &scarcity).key
        );
    }

    #[test]
    fn the_capability_loss_grows_as_hosts_of_a_type_become_scarce() {
        let p = with_rare_big_type(PlusConfig::default());
        let common = key_for(&p, 128_000, &[1.0, 1.0]);
        let scarce = key_for(&p, 128_000, &[1.0, 10.0]);
        assert!(scarce.loss > common.loss);
        assert!(scarce.key < common.key);
        // A weight of 0 switches the protection off.
        let off = with_rare_big_type(PlusConfig {
            cap_weight: 0.0,
            ..PlusConfig::default()
        });
        assert_eq!(
            key_for(&off, 128_000, &[1.0, 10.0]).key,
            key_for(&off, 96_000, &[1.0, 10.0]).key
        );
    }

    #[test]
    fn capability_counts_the_types_that_still_fit_a_node() {
        let w = TargetWorkload::select(
            [
                (
                    TaskType::new(1000, Demand::Share { cores: 50 }, [""; 0]),
                    1.0,
                ),
                (TaskType::new(4000, Demand::Whole { cards: 2 }, ["T4"]), 1.0),
                (TaskType::new(1000, Demand::CpuOnly, [""; 0]), 2.0),
            ],
            1.0,
        )
        .unwrap();
        let cap = Capability::new(&w, CapWeight::Cards);
        assert_eq!(
            cap.len(),
            2,
            "CPU-only types never stop fitting for GPU reasons"
        );
        let t4 = cap.access(["T4"; 2]);
        let v100 = cap.access(["V100"; 2]);
        // Share p 0.25 × 1 card, two cards p 0.25 × 2 cards (× 100 vcuda-core).
        assert!((cap.hosted(&t4, 8000, &[100, 100], &[]) - 75.0).abs() < 1e-9);
        assert!((cap.hosted(&t4, 8000, &[100, 100], &[2.0, 2.0]) - 150.0).abs() < 1e-9);
        assert!((cap.hosted(&t4, 8000, &[60, 100], &[]) - 25.0).abs() < 1e-9);
        assert!((cap.hosted(&t4, 3000, &[100, 100], &[]) - 25.0).abs() < 1e-9);
        assert!((cap.hosted(&v100, 8000, &[100, 100], &[]) - 25.0).abs() < 1e-9);
        assert_eq!(cap.hosted(&t4, 500, &[100, 100], &[]), 0.0);
    }

    #[test]
    fn the_loss_is_what_stops_fitting_except_what_the_pod_itself_needs() {
        let w = TargetWorkload::select(
            [
                (
                    TaskType::new(2000, Demand::Share { cores: 30 }, [""; 0]),
                    1.0,
                ),
                (
                    TaskType::new(8000, Demand::Whole { cards: 1 }, [""; 0]),
                    1.0,
                ),
                (
                    TaskType::new(12000, Demand::Whole { cards: 2 }, ["T4"]),
                    2.0,
                ),
            ],
            1.0,
        )
        .unwrap();
        let cap = Capability::new(&w, CapWeight::Cards);
        for models in [["T4", "T4"], ["T4", "A10"]] {
            let acc = cap.access(models);
            let before: (u64, &[u32]) = (16_000, &[100, 100]);
            // A whole card with 8 cores: the one-card type is dominated (no loss); the share
            // still fits the other card.
            let after: (u64, &[u32]) = (8_000, &[0, 100]);
            let pod = Some((8000, Demand::Whole { cards: 1 }));
            let diff = cap.hosted_except(&acc, before.0, before.1, &[], pod)
                - cap.hosted_except(&acc, after.0, after.1, &[], pod);
            let loss = cap.loss(&acc, before, after, &[], pod);
            assert!((loss - diff).abs() < 1e-9, "{models:?}: {loss} vs {diff}");
            // Only the two-card type (p 0.5 × 2 cards) is lost on the all-T4 node.
            let expect = if models[1] == "T4" { 100.0 } else { 0.0 };
            assert!((loss - expect).abs() < 1e-9, "{models:?}: {loss}");
            // Without the dominance rule a share pod taking the last room also counts.
            let share = cap.loss(&acc, (4000, &[30, 0]), (2000, &[0, 0]), &[], None);
            assert!((share - 25.0).abs() < 1e-9, "{share}");
            let own = cap.loss(
                &acc,
                (4000, &[30, 0]),
                (2000, &[0, 0]),
                &[],
                Some((2000, Demand::Share { cores: 30 })),
            );
            assert_eq!(own, 0.0);
        }
    }

    use crate::inventory::{Link, NodeInventory};
    use crate::ledger::{Assignment, NodeLedger};
    use crate::request::Slot;
    use proptest::prelude::*;

    proptest! {
        /// The allocation-free single-container path ranks and places exactly as place_pod.
        #[test]
        fn scoring_card_states_matches_place_pod(
            used in prop::collection::vec((0u32..=10, prop::bool::weighted(0.9)), 1..9),
            req in prop_oneof![
                (1u32..100).prop_map(|c| GpuRequest::Share { cores: c, blocks: 1 }),
                (1u32..4).prop_map(|n| GpuRequest::Whole { cards: n }),
            ],
            cpu in prop::option::of(0u64..40_000),
            pod_cpu in 0u64..12_000,
            scarce in 1.0f64..8.0,
        ) {
            let mut inv = NodeInventory::uniform(used.len(), "G", 16 * 1024, Link::Phb);
            let mut ledger = NodeLedger::new(&inv);
            for (i, &(u, healthy)) in used.iter().enumerate() {
                inv.cards[i].healthy = healthy;
                if u == 10 {
                    ledger.allocate(&Assignment::whole(&[i as u32])).unwrap();
                } else if u > 0 {
                    ledger.allocate(&Assignment::share(i as u32, u * 10, 1)).unwrap();
                }
            }
            let p = with_rare_big_type(PlusConfig::default());
            let models: Vec<&str> = inv.cards.iter().map(|c| c.model.as_str()).collect();
            let acc = p.fgd().access(models.iter().copied());
            let cap = p.cap_access(models.iter().copied());
            let scarcity = [1.0, scarce];
            let healthy = crate::fgd::healthy_cards(&inv);
            let node = FgdNode { access: &acc, inventory: &inv, ledger: &ledger, cpu_free: cpu };
            let pod = PodGpuRequest::from_app_requests([Some(req)]);
            let full = p.place_pod(&node, &cap, &scarcity, pod_cpu, &pod, &CardFilter::default());
            let base = p.fgd().node_fragmentation(&acc, ledger.cards(), healthy, cpu);
            let quick = p.score_cards(&acc, &cap, &scarcity, ledger.cards(), (healthy, healthy), cpu, base, pod_cpu, &req);
            prop_assert_eq!(full.is_some(), quick.is_some());
            if let (Some(f), Some(q)) = (full, quick) {
                prop_assert_eq!(f.choice.key, q.key);
                prop_assert_eq!(f.choice.cards, q.cards);
                prop_assert!((f.choice.loss - q.loss).abs() < 1e-9);
                let listed: Vec<u32> = (0..64).filter(|g| (q.cards >> g) & 1 == 1).collect();
                prop_assert_eq!(&f.placement.cards[&Slot::App(0)], &listed);
            }
        }
    }
}
