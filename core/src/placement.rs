//! Placement policies: pure functions over (inventory, ledger, request) that choose cards and
//! score a node. The extender, the device plugin's standalone mode and the simulator all call
//! these, so a pod is placed the same way everywhere.
//!
//! | policy | share of a card | whole cards | node preference |
//! |---|---|---|---|
//! | `binpack` | best fit: fewest free cores, then fewest free blocks | fully free cards, fewest blocks first (gpu-admission) | most used node first (gpu-admission) |
//! | `spread` | worst fit: most free cores, then most free blocks | fully free cards by index | least used node first |
//! | `topology` | best fit | 1 card: TKEStack `fragment`; N ≥ 2: TKEStack `link`, over NVLink/PCIe/NUMA domains | tightest multi-card set, then most used node |
//!
//! Every tie is broken by the lowest card index, then (between nodes) the lowest node name, so
//! placement is deterministic.

use std::cmp::Reverse;
use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use crate::annotations::CardFilter;
use crate::inventory::NodeInventory;
use crate::ledger::{pod_assignment, Assignment, CardState, Charge, LedgerError, NodeLedger};
use crate::request::{ContainerGpu, GpuRequest, PodGpuRequest, Slot};
use crate::resources::CORES_PER_CARD;
use crate::topology::{self, Topology};

/// A placement policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Policy {
    Binpack,
    Spread,
    Topology,
}

impl Policy {
    pub const ALL: [Policy; 3] = [Policy::Binpack, Policy::Spread, Policy::Topology];

    pub fn name(self) -> &'static str {
        match self {
            Policy::Binpack => "binpack",
            Policy::Spread => "spread",
            Policy::Topology => "topology",
        }
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An unknown policy name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown placement policy {0:?}: use binpack, spread or topology")]
pub struct PolicyParseError(pub String);

impl FromStr for Policy {
    type Err = PolicyParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "binpack" => Ok(Policy::Binpack),
            "spread" => Ok(Policy::Spread),
            "topology" => Ok(Policy::Topology),
            _ => Err(PolicyParseError(s.to_string())),
        }
    }
}

/// What the placement needs to know about one node.
#[derive(Debug, Clone, Copy)]
pub struct NodeView<'a> {
    pub name: &'a str,
    pub inventory: &'a NodeInventory,
    pub topology: &'a Topology,
    pub ledger: &'a NodeLedger,
}

/// The chosen cards of every GPU container and the node's score (higher is better; only
/// comparable between nodes under the same policy and pod).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub cards: BTreeMap<Slot, Vec<u32>>,
    pub assignment: Assignment,
    pub score: i64,
}

/// Why a pod does not fit a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unfit {
    /// The node has no cards.
    NoGpu,
    /// None of the node's cards is allowed by the pod's model / UUID constraints.
    NoAllowedCard { wanted: String, node_has: String },
    /// A container asks for more than any allowed card, or more cards than the node allows it.
    TooLarge { container: String, detail: String },
    /// The capacity exists but is in use (or unhealthy) right now.
    Shortfall { container: String, detail: String },
}

impl Unfit {
    /// True when preemption cannot help (the scheduler's `FailedAndUnresolvableNodes`).
    pub fn unresolvable(&self) -> bool {
        !matches!(self, Unfit::Shortfall { .. })
    }
}

impl fmt::Display for Unfit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unfit::NoGpu => f.write_str("node has no GPU cards"),
            Unfit::NoAllowedCard { wanted, node_has } => {
                write!(f, "no card allowed by {wanted}; node has {node_has}")
            }
            Unfit::TooLarge { container, detail } | Unfit::Shortfall { container, detail } => {
                write!(f, "container {container:?}: {detail}")
            }
        }
    }
}

/// The cards of one node a pod may use: those its [`CardFilter`] allows, and among them the
/// healthy ones (bit i = card i). Callers that evaluate one pod against many nodes can compute
/// this once per distinct inventory and pass it to [`place_with`] and [`fit_score`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Eligibility {
    /// Cards the pod's model / UUID constraints allow.
    pub allowed: u64,
    /// Allowed cards that are healthy: the only ones placement may choose.
    pub healthy: u64,
}

impl Eligibility {
    /// The eligibility of `inv`'s cards for a pod with constraints `filter`.
    pub fn of(inv: &NodeInventory, filter: &CardFilter) -> Self {
        let mut allowed = 0u64;
        let mut healthy = 0u64;
        for c in inv.cards.iter().take(64) {
            if filter.allows(c) {
                allowed |= 1 << c.index;
                if c.healthy {
                    healthy |= 1 << c.index;
                }
            }
        }
        Self { allowed, healthy }
    }

    /// The eligibility for an unconstrained pod: every card allowed, the healthy ones usable.
    pub fn unconstrained(inv: &NodeInventory) -> Self {
        Self::of(inv, &CardFilter::default())
    }
}

fn describe_filter(filter: &CardFilter) -> String {
    let mut parts = Vec::new();
    if !filter.models.is_empty() {
        parts.push(format!("gpu-models={}", filter.models.entries().join(",")));
    }
    if !filter.include_uuids.is_empty() {
        parts.push(format!(
            "gpu-uuid-include={}",
            filter.include_uuids.join(",")
        ));
    }
    if !filter.exclude_uuids.is_empty() {
        parts.push(format!(
            "gpu-uuid-exclude={}",
            filter.exclude_uuids.join(",")
        ));
    }
    parts.join(" and ")
}

/// Choose cards for every GPU container of `pod` on one node.
pub fn place(
    policy: Policy,
    node: &NodeView<'_>,
    pod: &PodGpuRequest,
    filter: &CardFilter,
) -> Result<Placement, Unfit> {
    place_with(
        policy,
        node,
        pod,
        filter,
        Eligibility::of(node.inventory, filter),
    )
}

/// [`place`] with the pod's [`Eligibility`] on this node already computed (it must be
/// `Eligibility::of(node.inventory, filter)`; `filter` is only used to word the reason when no
/// card is allowed).
pub fn place_with(
    policy: Policy,
    node: &NodeView<'_>,
    pod: &PodGpuRequest,
    filter: &CardFilter,
    elig: Eligibility,
) -> Result<Placement, Unfit> {
    let inv = node.inventory;
    if inv.is_empty() {
        return Err(Unfit::NoGpu);
    }
    let Eligibility { allowed, healthy } = elig;
    if allowed == 0 {
        let models = inv.models().join(", ");
        return Err(Unfit::NoAllowedCard {
            wanted: describe_filter(filter),
            node_has: if models.is_empty() {
                "no cards".into()
            } else {
                models
            },
        });
    }
    // The common pod, one long-running GPU container: nothing to accumulate, so decide on the
    // node's own ledger without copying it.
    if let [c] = pod.containers.as_slice() {
        if c.long_running() {
            let chosen = choose(policy, node.topology, node.ledger, healthy, c.request)
                .ok_or_else(|| explain(inv, node.ledger, allowed, healthy, c))?;
            let multi_level = if chosen.len() > 1 {
                node.topology.span_level(mask_of(&chosen))
            } else {
                0
            };
            let assignment = Assignment::new(
                crate::ledger::container_charges(c.slot, &c.request, &chosen)
                    .map_err(|e| internal(c, e))?,
            )
            .map_err(|e| internal(c, e))?;
            node.ledger.check(&assignment).map_err(|e| internal(c, e))?;
            let mut cards = BTreeMap::new();
            cards.insert(c.slot, chosen);
            return Ok(Placement {
                cards,
                assignment,
                score: node_score(policy, node.ledger, multi_level),
            });
        }
    }
    let mut scratch = node.ledger.clone();
    let mut cards: BTreeMap<Slot, Vec<u32>> = BTreeMap::new();
    let mut multi_level = 0u32;
    // Long-running containers (sidecars, then app containers) add up.
    for c in pod.containers.iter().filter(|c| c.long_running()) {
        let chosen = choose(policy, node.topology, &scratch, healthy, c.request)
            .ok_or_else(|| explain(inv, &scratch, allowed, healthy, c))?;
        if chosen.len() > 1 {
            multi_level = multi_level.max(node.topology.span_level(mask_of(&chosen)));
        }
        let a = Assignment::new(
            crate::ledger::container_charges(c.slot, &c.request, &chosen)
                .map_err(|e| internal(c, e))?,
        )
        .map_err(|e| internal(c, e))?;
        scratch.allocate(&a).map_err(|e| internal(c, e))?;
        cards.insert(c.slot, chosen);
    }
    // Regular init containers run one at a time before the others: a card must hold the larger
    // of the init container's charge and what the pod's long-running containers put there. Try
    // the cards the pod already uses first, so the kubelet can hand the init container's devices
    // on to the app containers.
    let steady = scratch.clone();
    let pod_cards: Vec<u32> = {
        let mut v: Vec<u32> = cards.values().flatten().copied().collect();
        v.sort_unstable();
        v.dedup();
        v
    };
    for c in pod.containers.iter().filter(|c| !c.long_running()) {
        let chosen = choose_init(policy, node, &steady, healthy, c, &pod_cards)
            .ok_or_else(|| explain(inv, &steady, allowed, healthy, c))?;
        cards.insert(c.slot, chosen);
    }
    let assignment = pod_assignment(pod, &cards).map_err(|e| Unfit::Shortfall {
        container: String::new(),
        detail: e.to_string(),
    })?;
    node.ledger
        .check(&assignment)
        .map_err(|e| Unfit::Shortfall {
            container: String::new(),
            detail: e.to_string(),
        })?;
    let score = node_score(policy, node.ledger, multi_level);
    Ok(Placement {
        cards,
        assignment,
        score,
    })
}

fn internal(c: &ContainerGpu, e: LedgerError) -> Unfit {
    Unfit::Shortfall {
        container: c.name.clone(),
        detail: e.to_string(),
    }
}

fn mask_of(cards: &[u32]) -> u64 {
    cards.iter().fold(0, |m, c| m | (1u64 << c))
}

/// Does `pod` fit the node, and with what score? Always equal to
/// `place_with(policy, node, pod, filter, elig).ok().map(|p| p.score)`, but for a pod with one
/// long-running GPU container (nearly every pod) it allocates nothing and never formats a
/// reason, so a scheduler can screen thousands of nodes per request and ask [`place_with`] for
/// the cards (or the reason) only where it needs them.
pub fn fit_score(
    policy: Policy,
    node: &NodeView<'_>,
    pod: &PodGpuRequest,
    elig: Eligibility,
) -> Option<i64> {
    if let Some(answer) = fit_score_from_cards(policy, node.ledger.cards(), pod, elig) {
        return answer;
    }
    match pod.containers.as_slice() {
        [c] if c.long_running() => {
            // Several whole cards under `topology`: the score depends on the set chosen.
            let GpuRequest::Whole { cards: n } = c.request else {
                return None;
            };
            let ledger = node.ledger;
            if (ledger.free_mask() & elig.healthy).count_ones() < n {
                return None;
            }
            let chosen = choose(policy, node.topology, ledger, elig.healthy, c.request)?;
            Some(node_score(
                policy,
                ledger,
                node.topology.span_level(mask_of(&chosen)),
            ))
        }
        _ => place_with(policy, node, pod, &CardFilter::default(), elig)
            .ok()
            .map(|p| p.score),
    }
}

/// The part of [`fit_score`] that needs nothing but the node's card states (its ledger's
/// `cards()`, or a copy of them): `Some(answer)` when that decides it, `None` when the caller
/// must ask [`fit_score`] (several containers, init containers, or several whole cards under
/// `topology`). One pass over the cards, no allocation: callers that keep the card states of
/// many nodes side by side can screen them at memory speed.
pub fn fit_score_from_cards(
    policy: Policy,
    cards: &[CardState],
    pod: &PodGpuRequest,
    elig: Eligibility,
) -> Option<Option<i64>> {
    // `allowed` is 0 for a node without cards (`elig` comes from this node's inventory).
    if elig.allowed == 0 {
        return Some(None);
    }
    let [c] = pod.containers.as_slice() else {
        return None;
    };
    if !c.long_running() {
        return None;
    }
    let (mut free_cores, mut free_blocks) = (0u64, 0u64);
    match c.request {
        GpuRequest::Share { cores, blocks } => {
            let mut fits = false;
            for (i, s) in cards.iter().enumerate() {
                free_cores += u64::from(s.free_cores);
                free_blocks += u64::from(s.free_blocks);
                fits |= i < 64
                    && elig.healthy & (1u64 << i) != 0
                    && s.free_cores >= cores
                    && s.free_blocks >= blocks;
            }
            Some(fits.then(|| score_from(policy, free_cores, free_blocks, 0)))
        }
        GpuRequest::Whole { cards: n } => {
            let mut free = 0u64;
            for (i, s) in cards.iter().enumerate() {
                free_cores += u64::from(s.free_cores);
                free_blocks += u64::from(s.free_blocks);
                if i < 64 && s.is_free() {
                    free |= 1u64 << i;
                }
            }
            if (free & elig.healthy).count_ones() < n {
                return Some(None);
            }
            if policy == Policy::Topology && n > 1 {
                return None;
            }
            // Every other policy takes any n free cards; the score is the node's.
            Some(Some(score_from(policy, free_cores, free_blocks, 0)))
        }
    }
}

/// The node-order rule shared by every caller: a higher score wins, equal scores go to the
/// lowest node name. True when `(score_a, name_a)` is preferred over `(score_b, name_b)`.
pub fn prefer(score_a: i64, name_a: &str, score_b: i64, name_b: &str) -> bool {
    (score_a, Reverse(name_a)) > (score_b, Reverse(name_b))
}

/// Pick cards for one container on `ledger` among `eligible` cards.
pub fn choose(
    policy: Policy,
    topo: &Topology,
    ledger: &NodeLedger,
    eligible: u64,
    request: GpuRequest,
) -> Option<Vec<u32>> {
    match request {
        GpuRequest::Share { cores, blocks } => {
            share_pick(policy, ledger, cores, blocks, eligible).map(|c| vec![c])
        }
        GpuRequest::Whole { cards: n } => {
            let free = ledger.free_mask() & eligible;
            if free.count_ones() < n {
                return None;
            }
            match policy {
                Policy::Binpack => {
                    // gpu-admission: fully free cards ordered by (free blocks, index).
                    let mut v: Vec<u32> = topology::bits(free).collect();
                    v.sort_by_key(|&i| (ledger.cards()[i as usize].free_blocks, i));
                    v.truncate(n as usize);
                    v.sort_unstable();
                    Some(v)
                }
                Policy::Spread => topology::lowest_bits(free, n),
                Policy::Topology if n == 1 => topology::fragment(topo, free, 1),
                Policy::Topology => topology::link(topo, free, n),
            }
        }
    }
}

/// The card a share goes to: best fit (binpack, topology) or worst fit (spread).
pub fn share_pick(
    policy: Policy,
    ledger: &NodeLedger,
    cores: u32,
    blocks: u32,
    eligible: u64,
) -> Option<u32> {
    let fitting = ledger
        .cards()
        .iter()
        .enumerate()
        .take(64)
        .filter(|(i, s)| {
            eligible & (1u64 << i) != 0 && s.free_cores >= cores && s.free_blocks >= blocks
        })
        .map(|(i, s)| (i as u32, s));
    match policy {
        Policy::Spread => fitting
            .min_by_key(|(i, s)| (Reverse(s.free_cores), Reverse(s.free_blocks), *i))
            .map(|(i, _)| i),
        Policy::Binpack | Policy::Topology => fitting
            .min_by_key(|(i, s)| (s.free_cores, s.free_blocks, *i))
            .map(|(i, _)| i),
    }
}

fn choose_init(
    policy: Policy,
    node: &NodeView<'_>,
    steady: &NodeLedger,
    healthy: u64,
    c: &ContainerGpu,
    pod_cards: &[u32],
) -> Option<Vec<u32>> {
    let base = node.ledger;
    // A card the pod already uses can take the init container if, without this pod, it has
    // room for the larger of the init container's charge and the pod's charge there.
    let fits_on = |p: u32| -> bool {
        let (b, s) = (base.cards()[p as usize], steady.cards()[p as usize]);
        let used = Charge::Share {
            cores: b.free_cores - s.free_cores,
            blocks: b.free_blocks - s.free_blocks,
        };
        let combined = match c.request {
            GpuRequest::Share { cores, blocks } => used.peak(Charge::Share { cores, blocks }),
            GpuRequest::Whole { .. } => Charge::Whole,
        };
        match combined {
            Charge::Whole => b.is_free(),
            Charge::Share { cores, blocks } => b.free_cores >= cores && b.free_blocks >= blocks,
        }
    };
    let reuse: Vec<u32> = pod_cards
        .iter()
        .copied()
        .filter(|&p| healthy & (1u64 << p) != 0 && fits_on(p))
        .collect();
    let n = c.request.cards() as usize;
    if reuse.len() >= n {
        return Some(reuse[..n].to_vec());
    }
    // Otherwise any card with room in the steady state, as for a long-running container.
    choose(policy, node.topology, steady, healthy, c.request)
}

/// Explain why `c` does not fit, naming the shortfall. One pass over the cards and one
/// formatted string: filter answers word this for every node that does not fit.
fn explain(
    inv: &NodeInventory,
    ledger: &NodeLedger,
    allowed: u64,
    healthy: u64,
    c: &ContainerGpu,
) -> Unfit {
    use std::fmt::Write;
    let container = c.name.clone();
    let allowed_cards = || {
        ledger
            .cards()
            .iter()
            .enumerate()
            .take(64)
            .filter(move |(i, _)| allowed & (1u64 << i) != 0)
            .map(|(i, s)| (i as u32, s))
    };
    let present = allowed_cards().fold(0u64, |m, (i, _)| m | (1u64 << i));
    let unhealthy = present & !healthy;
    let mut sick = String::new();
    if unhealthy != 0 {
        let plural = if unhealthy.count_ones() > 1 { "s" } else { "" };
        let _ = write!(sick, " (unhealthy: card{plural} ");
        for (k, i) in topology::bits(unhealthy).enumerate() {
            let _ = write!(sick, "{}{i}", if k > 0 { "," } else { "" });
        }
        sick.push(')');
    }
    match c.request {
        GpuRequest::Share { cores, blocks } => {
            let largest = allowed_cards()
                .map(|(i, _)| inv.cards.get(i as usize).map_or(0, |card| card.blocks()))
                .max()
                .unwrap_or(0);
            if blocks > largest {
                return Unfit::TooLarge {
                    container,
                    detail: format!(
                        "{blocks} memory blocks requested but the largest allowed card has {largest}"
                    ),
                };
            }
            // The closest healthy card: enough memory but too few cores, else enough cores but
            // too little memory, else the one with the most free cores (ties: lowest index).
            let mut by_mem: Option<(u32, &CardState)> = None;
            let mut by_cores: Option<(u32, &CardState)> = None;
            let mut any: Option<(u32, &CardState)> = None;
            for (i, st) in allowed_cards().filter(|(i, _)| healthy & (1u64 << i) != 0) {
                if st.free_blocks >= blocks
                    && by_mem.is_none_or(|(_, b)| st.free_cores > b.free_cores)
                {
                    by_mem = Some((i, st));
                }
                if st.free_cores >= cores
                    && by_cores.is_none_or(|(_, b)| st.free_blocks > b.free_blocks)
                {
                    by_cores = Some((i, st));
                }
                if any.is_none_or(|(_, b)| st.free_cores > b.free_cores) {
                    any = Some((i, st));
                }
            }
            let detail = if let Some((i, s)) = by_mem {
                format!(
                    "card {i}: {} vcuda-core free, {cores} requested{sick}",
                    s.free_cores
                )
            } else if let Some((i, s)) = by_cores {
                format!(
                    "card {i}: {} memory blocks free, {blocks} requested{sick}",
                    s.free_blocks
                )
            } else if let Some((i, s)) = any {
                format!(
                    "card {i}: {} vcuda-core and {} memory blocks free, {cores} and {blocks} requested{sick}",
                    s.free_cores, s.free_blocks
                )
            } else {
                format!("no healthy card{sick}")
            };
            Unfit::Shortfall { container, detail }
        }
        GpuRequest::Whole { cards: n } => {
            let count = present.count_ones();
            if n > count {
                return Unfit::TooLarge {
                    container,
                    detail: format!(
                        "{n} whole cards requested but the node has {count} allowed card{}",
                        if count == 1 { "" } else { "s" }
                    ),
                };
            }
            let free = allowed_cards()
                .filter(|(i, st)| st.is_free() && healthy & (1u64 << i) != 0)
                .fold(0u64, |m, (i, _)| m | (1u64 << i));
            let mut detail = format!(
                "{n} whole card{} requested, {} completely free",
                if n == 1 { "" } else { "s" },
                free.count_ones()
            );
            if free != 0 {
                let plural = if free.count_ones() > 1 { "s" } else { "" };
                let _ = write!(detail, " (card{plural} ");
                for (k, i) in topology::bits(free).enumerate() {
                    let _ = write!(detail, "{}{i}", if k > 0 { "," } else { "" });
                }
                detail.push(')');
            }
            detail.push_str(&sick);
            Unfit::Shortfall { container, detail }
        }
    }
}

/// The node's score under `policy`, from its state before the pod (higher is better).
/// `multi_level` is the domain level of the pod's widest multi-card container (0 if none).
pub fn node_score(policy: Policy, ledger: &NodeLedger, multi_level: u32) -> i64 {
    score_from(
        policy,
        ledger.free_cores(),
        ledger.free_blocks(),
        multi_level,
    )
}

/// [`node_score`] from the node's free totals.
fn score_from(policy: Policy, free_cores: u64, free_blocks: u64, multi_level: u32) -> i64 {
    // Free cores fit in 13 bits per card × 64 cards < 2^13; blocks < 2^24 per node.
    let fill = (free_cores as i64) << 24 | (free_blocks as i64 & 0xff_ffff);
    match policy {
        Policy::Binpack => -fill,
        Policy::Spread => fill,
        Policy::Topology => -((i64::from(multi_level)) << 40) - fill,
    }
}

/// Map raw scores to the extender's 0–10 range: the best node gets 10, the worst 0, linearly in
/// between (all 10 when they are equal).
pub fn normalize_scores(scores: &[i64]) -> Vec<u8> {
    let (Some(&min), Some(&max)) = (scores.iter().min(), scores.iter().max()) else {
        return Vec::new();
    };
    if min == max {
        return vec![10; scores.len()];
    }
    let span = (max as i128) - (min as i128);
    // The usual case: the arithmetic fits 64 bits, and 128-bit division is many times slower.
    if let Ok(span64) = i64::try_from(span) {
        if span64 <= i64::MAX / 16 {
            return scores
                .iter()
                .map(|&s| (((s - min) * 10 + span64 / 2) / span64) as u8)
                .collect();
        }
    }
    scores
        .iter()
        .map(|&s| ((((s as i128) - (min as i128)) * 10 + span / 2) / span) as u8)
        .collect()
}

/// kube-scheduler's `MaxExtenderPriority`: an extender scores nodes 0..=10.
pub const MAX_EXTENDER_PRIORITY: u8 = 10;

/// How a policy orders nodes whose scores are equal. Either way the order is fixed: the same
/// node wins the same tie in every request, in every replica, after every restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TieOrder {
    /// The lowest node name first (binpack, spread, topology; gpu-admission's rule, see
    /// [`prefer`]).
    Name,
    /// The lowest [`tie_hash`] of the node name first, then the lowest name: a fixed order that
    /// looks random, like the per-seed node order under which FGD was validated (FGD and
    /// `fgd+`; see `docs/simulator.md`, "Validation").
    NameHash,
}

/// A stable 64-bit hash of a node name, the same on every platform and in every release: the
/// tie order [`TieOrder::NameHash`]. FNV-1a followed by MurmurHash3's 64-bit finaliser: FNV-1a
/// alone barely moves the high bits when only the last characters differ, so `node-0001`,
/// `node-0002`, … would stay in runs of neighbours (a near-sequential order, not one that looks
/// random); the finaliser spreads every input bit over the whole word.
pub fn tie_hash(name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

impl TieOrder {
    /// True when `(score_a, name_a)` ranks above `(score_b, name_b)`: a higher score wins,
    /// equal scores are ordered by this rule.
    pub fn prefer(self, score_a: i64, name_a: &str, score_b: i64, name_b: &str) -> bool {
        if score_a != score_b {
            return score_a > score_b;
        }
        match self {
            TieOrder::Name => name_a < name_b,
            TieOrder::NameHash => (tie_hash(name_a), name_a) < (tie_hash(name_b), name_b),
        }
    }

    /// The position of the best node of `scores` (`names[i]` scores `scores[i]`), ties
    /// ordered by this rule; `None` when there is no node.
    pub fn best(self, scores: &[i64], names: &[&str]) -> Option<usize> {
        let mut best: Option<usize> = None;
        // The hash of the current best, computed only when a tie needs it.
        let mut best_hash: Option<u64> = None;
        for (i, (&s, &n)) in scores.iter().zip(names).enumerate() {
            let Some(b) = best else {
                best = Some(i);
                continue;
            };
            let better = match s.cmp(&scores[b]) {
                std::cmp::Ordering::Greater => true,
                std::cmp::Ordering::Less => false,
                std::cmp::Ordering::Equal => match self {
                    TieOrder::Name => n < names[b],
                    TieOrder::NameHash => {
                        let hb = *best_hash.get_or_insert_with(|| tie_hash(names[b]));
                        let h = tie_hash(n);
                        let wins = (h, n) < (hb, names[b]);
                        if wins {
                            best_hash = Some(h);
                        }
                        wins
                    }
                },
            };
            if better {
                if s != scores[b] {
                    best_hash = None;
                }
                best = Some(i);
            }
        }
        best
    }
}

/// The extender's priorities (0..=[`MAX_EXTENDER_PRIORITY`]) of nodes with raw policy scores
/// `scores` (higher is better; `names[i]` scores `scores[i]`).
///
/// Exactly **one** node gets 10: the policy's best, ties ordered by `order`. Every other node
/// gets 0..=9, linearly between the lowest raw score (0) and the best one (9), rounded; a node
/// scoring as much as the best gets 9. kube-scheduler adds `priority × weight × 10` to its own
/// plugins' scores and picks at random among the nodes with the highest total: with a unique
/// top and a weight above what the other plugins can add up to, that random choice cannot
/// override the policy (a plain min–max normalisation gives every tied best node 10 and lets
/// the scheduler choose among them at random, which costs FGD ≈ 5.5 pp of allocation).
pub fn extender_priorities(scores: &[i64], names: &[&str], order: TieOrder) -> Vec<u8> {
    let Some(top) = order.best(scores, names) else {
        return Vec::new();
    };
    let max = scores[top];
    let min = scores.iter().copied().min().unwrap_or(max);
    let below = MAX_EXTENDER_PRIORITY - 1;
    let span = (max as i128) - (min as i128);
    let mut out: Vec<u8> = if span == 0 {
        vec![below; scores.len()]
    } else if let Some(span64) = i64::try_from(span).ok().filter(|&x| x <= i64::MAX / 16) {
        // The usual case: 64-bit arithmetic (128-bit division is many times slower).
        let b = i64::from(below);
        scores
            .iter()
            .map(|&s| (((s - min) * b + span64 / 2) / span64) as u8)
            .collect()
    } else {
        let b = i128::from(below);
        scores
            .iter()
            .map(|&s| ((((s as i128) - (min as i128)) * b + span / 2) / span) as u8)
            .collect()
    };
    out[top] = MAX_EXTENDER_PRIORITY;
    out
}

/// The result of choosing among nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeChoice {
    /// Position of the chosen node in the input.
    pub node: usize,
    pub placement: Placement,
}

/// Place the pod on the best node: the highest score, ties broken by the lowest node name.
/// Returns the choice (if any) and the reason for every node that does not fit.
pub fn choose_node(
    policy: Policy,
    nodes: &[NodeView<'_>],
    pod: &PodGpuRequest,
    filter: &CardFilter,
) -> (Option<NodeChoice>, Vec<(usize, Unfit)>) {
    // Screen every node cheaply, then place only the winner.
    let mut fitting: Vec<(i64, usize)> = Vec::new();
    let mut unfit = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        let elig = Eligibility::of(n.inventory, filter);
        match fit_score(policy, n, pod, elig) {
            Some(score) => fitting.push((score, i)),
            None => {
                if let Err(e) = place_with(policy, n, pod, filter, elig) {
                    unfit.push((i, e));
                }
            }
        }
    }
    fitting.sort_by(|a, b| {
        if prefer(a.0, nodes[a.1].name, b.0, nodes[b.1].name) {
            std::cmp::Ordering::Less
        } else if prefer(b.0, nodes[b.1].name, a.0, nodes[a.1].name) {
            std::cmp::Ordering::Greater
        } else {
            std::cmp::Ordering::Equal
        }
    });
    let mut best = None;
    for (_, i) in fitting {
        if best.is_some() {
            break;
        }
        let n = &nodes[i];
        match place_with(policy, n, pod, filter, Eligibility::of(n.inventory, filter)) {
            Ok(placement) => best = Some(NodeChoice { node: i, placement }),
            Err(e) => unfit.push((i, e)),
        }
    }
    unfit.sort_by_key(|(i, _)| *i);
    (best, unfit)
}

/// Sum of vcuda-core a ledger has handed out.
pub fn used_cores(ledger: &NodeLedger) -> u64 {
    ledger.len() as u64 * u64::from(CORES_PER_CARD) - ledger.free_cores()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::annotations::ModelFilter;
    use crate::inventory::Link;
    use proptest::prelude::*;

    struct Fixture {
        inv: NodeInventory,
        topo: Topology,
        ledger: NodeLedger,
    }

    impl Fixture {
        fn new(inv: NodeInventory) -> Self {
            let topo = Topology::new(&inv);
            let ledger = NodeLedger::new(&inv);
            Self { inv, topo, ledger }
        }
        fn view(&self) -> NodeView<'_> {
            NodeView {
                name: "n",
                inventory: &self.inv,
                topology: &self.topo,
                ledger: &self.ledger,
            }
        }
        fn place(&self, policy: Policy, reqs: &[GpuRequest]) -> Result<Placement, Unfit> {
            let pod = PodGpuRequest::from_app_requests(reqs.iter().copied().map(Some));
            place(policy, &self.view(), &pod, &CardFilter::default())
        }
    }

    fn h100() -> NodeInventory {
        let mut inv = NodeInventory::uniform(8, "NVIDIA H100 80GB HBM3", 81559, Link::NvLink(18));
        for c in &mut inv.cards {
            c.numa_node = Some(c.index / 4);
        }
        inv
    }

    fn share(cores: u32, blocks: u32) -> GpuRequest {
        GpuRequest::Share { cores, blocks }
    }

    #[test]
    fn policy_names_parse_and_unknown_ones_list_the_choices() {
        assert_eq!("Binpack".parse(), Ok(Policy::Binpack));
        assert_eq!(" topology ".parse(), Ok(Policy::Topology));
        let e = "fastest".parse::<Policy>().unwrap_err().to_string();
        assert!(e.contains("binpack, spread or topology"), "{e}");
    }

    #[test]
    fn spread_puts_a_share_on_the_emptiest_card() {
        let mut f = Fixture::new(NodeInventory::uniform(3, "T4", 4096, Link::Phb));
        f.ledger.allocate(&Assignment::share(0, 50, 1)).unwrap();
        f.ledger.allocate(&Assignment::share(2, 10, 1)).unwrap();
        let p = f.place(Policy::Spread, &[share(20, 1)]).unwrap();
        assert_eq!(p.cards[&Slot::App(0)], vec![1]);
        let p = f.place(Policy::Binpack, &[share(20, 1)]).unwrap();
        assert_eq!(p.cards[&Slot::App(0)], vec![0]);
    }

    #[test]
    fn spread_prefers_the_emptiest_node_and_binpack_the_fullest() {
        let mut a = Fixture::new(NodeInventory::uniform(2, "T4", 4096, Link::Phb));
        let b = Fixture::new(NodeInventory::uniform(2, "T4", 4096, Link::Phb));
        a.ledger.allocate(&Assignment::share(0, 50, 1)).unwrap();
        let views = [
            NodeView {
                name: "a",
                ..a.view()
            },
            NodeView {
                name: "b",
                ..b.view()
            },
        ];
        let pod = PodGpuRequest::from_app_requests([Some(share(10, 1))]);
        let pick = |p| {
            choose_node(p, &views, &pod, &CardFilter::default())
                .0
                .unwrap()
                .node
        };
        assert_eq!(pick(Policy::Spread), 1);
        assert_eq!(pick(Policy::Binpack), 0);
    }

    #[test]
    fn equal_nodes_tie_break_on_the_lowest_name() {
        let a = Fixture::new(NodeInventory::uniform(2, "T4", 4096, Link::Phb));
        let views = [
            NodeView {
                name: "zeta",
                ..a.view()
            },
            NodeView {
                name: "alpha",
                ..a.view()
            },
        ];
        let pod = PodGpuRequest::from_app_requests([Some(share(10, 1))]);
        for p in Policy::ALL {
            let c = choose_node(p, &views, &pod, &CardFilter::default())
                .0
                .unwrap();
            assert_eq!(c.node, 1, "{p}");
        }
    }

    #[test]
    fn topology_keeps_a_card_pair_on_one_numa_node() {
        let mut f = Fixture::new(h100());
        f.ledger.allocate(&Assignment::whole(&[0, 1, 2])).unwrap();
        f.ledger.allocate(&Assignment::whole(&[6, 7])).unwrap();
        // Free: 3 (NUMA 0), 4 and 5 (NUMA 1).
        let p = f
            .place(Policy::Topology, &[GpuRequest::Whole { cards: 2 }])
            .unwrap();
        assert_eq!(p.cards[&Slot::App(0)], vec![4, 5]);
        // binpack ignores topology and takes the lowest free indices.
        let p = f
            .place(Policy::Binpack, &[GpuRequest::Whole { cards: 2 }])
            .unwrap();
        assert_eq!(p.cards[&Slot::App(0)], vec![3, 4]);
    }

    #[test]
    fn topology_prefers_nvlinked_pairs_over_pcie() {
        let rows = "X NV12 SYS SYS\nNV12 X SYS SYS\nSYS SYS X NV2\nSYS SYS NV2 X";
        let mut inv = NodeInventory::uniform(4, "A100", 40960, Link::Sys);
        inv.links = crate::inventory::parse_matrix(rows).unwrap();
        let mut f = Fixture::new(inv);
        f.ledger.allocate(&Assignment::whole(&[0])).unwrap();
        // Card 1 is alone on its NVLink pair; 2-3 are NVLinked.
        let p = f
            .place(Policy::Topology, &[GpuRequest::Whole { cards: 2 }])
            .unwrap();
        assert_eq!(p.cards[&Slot::App(0)], vec![2, 3]);
        // One card goes where it breaks no pair: card 1.
        let p = f
            .place(Policy::Topology, &[GpuRequest::Whole { cards: 1 }])
            .unwrap();
        assert_eq!(p.cards[&Slot::App(0)], vec![1]);
    }

    #[test]
    fn shortfall_names_the_card_the_free_and_the_requested() {
        let mut f = Fixture::new(NodeInventory::uniform(4, "T4", 4096, Link::Phb));
        for c in 0..3 {
            f.ledger.allocate(&Assignment::whole(&[c])).unwrap();
        }
        f.ledger.allocate(&Assignment::share(3, 60, 1)).unwrap();
        let e = f.place(Policy::Binpack, &[share(60, 1)]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "container \"c0\": card 3: 40 vcuda-core free, 60 requested"
        );
        assert!(!e.unresolvable());
        let e = f
            .place(Policy::Binpack, &[GpuRequest::Whole { cards: 2 }])
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "container \"c0\": 2 whole cards requested, 0 completely free"
        );
    }

    #[test]
    fn requests_larger_than_the_node_are_unresolvable() {
        let f = Fixture::new(NodeInventory::uniform(2, "T4", 4096, Link::Phb));
        let e = f.place(Policy::Binpack, &[share(10, 17)]).unwrap_err();
        assert!(e.unresolvable());
        assert!(e
            .to_string()
            .contains("17 memory blocks requested but the largest allowed card has 16"));
        let e = f
            .place(Policy::Binpack, &[GpuRequest::Whole { cards: 3 }])
            .unwrap_err();
        assert!(e.unresolvable());
        assert!(
            e.to_string().contains("the node has 2 allowed cards"),
            "{e}"
        );
    }

    #[test]
    fn model_and_uuid_constraints_are_hard() {
        let mut inv = NodeInventory::uniform(2, "Tesla T4", 4096, Link::Phb);
        inv.cards[1].model = "NVIDIA A100-SXM4-40GB".into();
        let f = Fixture::new(inv);
        let pod = PodGpuRequest::from_app_requests([Some(share(10, 1))]);
        let only_a100 = CardFilter {
            models: ModelFilter::new(["A100"]),
            ..Default::default()
        };
        let p = place(Policy::Binpack, &f.view(), &pod, &only_a100).unwrap();
        assert_eq!(p.cards[&Slot::App(0)], vec![1]);
        let h100 = CardFilter {
            models: ModelFilter::new(["H100"]),
            ..Default::default()
        };
        let e = place(Policy::Binpack, &f.view(), &pod, &h100).unwrap_err();
        assert!(e.unresolvable());
        assert_eq!(
            e.to_string(),
            "no card allowed by gpu-models=H100; node has Tesla T4, NVIDIA A100-SXM4-40GB"
        );
        let not_first = CardFilter {
            exclude_uuids: vec![f.inv.cards[0].uuid.clone()],
            ..Default::default()
        };
        let p = place(Policy::Binpack, &f.view(), &pod, &not_first).unwrap();
        assert_eq!(p.cards[&Slot::App(0)], vec![1]);
        let only_first = CardFilter {
            include_uuids: vec![f.inv.cards[0].uuid.clone()],
            ..Default::default()
        };
        let p = place(Policy::Binpack, &f.view(), &pod, &only_first).unwrap();
        assert_eq!(p.cards[&Slot::App(0)], vec![0]);
    }

    #[test]
    fn unhealthy_cards_get_nothing_and_are_named() {
        let mut inv = NodeInventory::uniform(2, "T4", 4096, Link::Phb);
        inv.cards[0].healthy = false;
        let mut f = Fixture::new(inv);
        let p = f.place(Policy::Binpack, &[share(10, 1)]).unwrap();
        assert_eq!(p.cards[&Slot::App(0)], vec![1]);
        f.ledger.allocate(&Assignment::whole(&[1])).unwrap();
        let e = f.place(Policy::Binpack, &[share(10, 1)]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "container \"c0\": card 1: 0 vcuda-core and 0 memory blocks free, 10 and 1 requested (unhealthy: card 0)"
        );
    }

    #[test]
    fn no_cards_at_all_is_no_gpu() {
        let f = Fixture::new(NodeInventory::uniform(0, "T4", 4096, Link::Phb));
        let e = f.place(Policy::Binpack, &[share(10, 1)]).unwrap_err();
        assert_eq!(e, Unfit::NoGpu);
        assert!(e.unresolvable());
    }

    #[test]
    fn an_init_container_reuses_the_app_containers_card() {
        let mut f = Fixture::new(NodeInventory::uniform(2, "T4", 4096, Link::Phb));
        f.ledger.allocate(&Assignment::share(0, 20, 1)).unwrap();
        let pod = PodGpuRequest {
            containers: vec![
                ContainerGpu {
                    slot: Slot::Init(0),
                    name: "init".into(),
                    request: share(70, 2),
                    sidecar: false,
                },
                ContainerGpu {
                    slot: Slot::App(0),
                    name: "main".into(),
                    request: share(30, 4),
                    sidecar: false,
                },
            ],
        };
        let p = place(Policy::Binpack, &f.view(), &pod, &CardFilter::default()).unwrap();
        // main goes to card 0 (best fit); init fits next to it there as max(70,30)=70 ≤ 80.
        assert_eq!(p.cards[&Slot::App(0)], vec![0]);
        assert_eq!(p.cards[&Slot::Init(0)], vec![0]);
        assert_eq!(
            p.assignment.charge_on(0),
            Some(Charge::Share {
                cores: 70,
                blocks: 4
            })
        );
    }

    #[test]
    fn scores_normalise_to_zero_to_ten() {
        assert_eq!(normalize_scores(&[-5, 0, 5]), vec![0, 5, 10]);
        assert_eq!(normalize_scores(&[3, 3]), vec![10, 10]);
        assert_eq!(normalize_scores(&[]), Vec::<u8>::new());
        assert_eq!(normalize_scores(&[i64::MIN, i64::MAX]), vec![0, 10]);
    }

    fn arb_state() -> impl Strategy<Value = (Vec<(u32, u32, bool)>, Vec<bool>)> {
        // Per card: used cores (0..=100; 100 = whole), used blocks, plus health.
        (
            prop::collection::vec((0u32..=100, 0u32..=16, prop::bool::weighted(0.2)), 1..8),
            prop::collection::vec(prop::bool::weighted(0.9), 8),
        )
    }

    fn arb_request() -> impl Strategy<Value = GpuRequest> {
        prop_oneof![
            (1u32..100, 1u32..=18).prop_map(|(cores, blocks)| GpuRequest::Share { cores, blocks }),
            (1u32..=4).prop_map(|cards| GpuRequest::Whole { cards }),
        ]
    }

    fn build(state: &(Vec<(u32, u32, bool)>, Vec<bool>)) -> Fixture {
        let (cards, health) = state;
        let mut inv = NodeInventory::uniform(cards.len(), "T4", 16 * 256, Link::Phb);
        for (i, c) in inv.cards.iter_mut().enumerate() {
            c.healthy = health[i];
            c.numa_node = Some((i / 2) as u32);
        }
        let mut f = Fixture::new(inv);
        for (i, &(cores, blocks, whole)) in cards.iter().enumerate() {
            let a = if whole || cores == 100 {
                Assignment::whole(&[i as u32])
            } else if cores == 0 {
                continue;
            } else {
                Assignment::share(i as u32, cores, blocks)
            };
            f.ledger.allocate(&a).unwrap();
        }
        f
    }

    #[test]
    fn equal_scores_prefer_the_lowest_name_and_higher_scores_win() {
        assert!(prefer(5, "b", 4, "a"));
        assert!(prefer(5, "a", 5, "b"));
        assert!(!prefer(5, "b", 5, "a"));
        assert!(!prefer(5, "a", 5, "a"));
    }

    #[test]
    fn fit_score_screens_without_the_cards_but_agrees_with_place() {
        let mut f = Fixture::new(NodeInventory::uniform(4, "T4", 4096, Link::Phb));
        f.ledger.allocate(&Assignment::whole(&[0, 1, 2])).unwrap();
        f.ledger.allocate(&Assignment::share(3, 60, 1)).unwrap();
        let elig = Eligibility::unconstrained(&f.inv);
        let fits = |reqs: &[GpuRequest]| {
            let pod = PodGpuRequest::from_app_requests(reqs.iter().copied().map(Some));
            fit_score(Policy::Binpack, &f.view(), &pod, elig)
        };
        assert_eq!(
            fits(&[share(40, 1)]),
            Some(f.place(Policy::Binpack, &[share(40, 1)]).unwrap().score)
        );
        assert_eq!(fits(&[share(41, 1)]), None);
        assert_eq!(fits(&[GpuRequest::Whole { cards: 1 }]), None);
        assert_eq!(
            fits(&[share(20, 1), share(20, 1)]),
            Some(
                f.place(Policy::Binpack, &[share(20, 1), share(20, 1)])
                    .unwrap()
                    .score
            )
        );
        assert_eq!(fits(&[share(20, 1), share(21, 1)]), None);
    }

    #[test]
    fn choose_node_reports_every_unfit_node_in_input_order() {
        let full = {
            let mut f = Fixture::new(NodeInventory::uniform(2, "T4", 4096, Link::Phb));
            f.ledger.allocate(&Assignment::whole(&[0, 1])).unwrap();
            f
        };
        let free = Fixture::new(NodeInventory::uniform(2, "T4", 4096, Link::Phb));
        let none = Fixture::new(NodeInventory::uniform(0, "T4", 4096, Link::Phb));
        let views = [
            NodeView {
                name: "c",
                ..full.view()
            },
            NodeView {
                name: "b",
                ..free.view()
            },
            NodeView {
                name: "a",
                ..none.view()
            },
            NodeView {
                name: "d",
                ..full.view()
            },
        ];
        let pod = PodGpuRequest::from_app_requests([Some(share(10, 1))]);
        let (best, unfit) = choose_node(Policy::Binpack, &views, &pod, &CardFilter::default());
        assert_eq!(best.unwrap().node, 1);
        let order: Vec<usize> = unfit.iter().map(|(i, _)| *i).collect();
        assert_eq!(order, vec![0, 2, 3]);
        assert_eq!(unfit[1].1, Unfit::NoGpu);
    }

    /// The wording of `explain` before it was made single-pass, kept to check that the fast
    /// version says exactly the same.
    fn explain_reference(
        inv: &NodeInventory,
        ledger: &NodeLedger,
        allowed: u64,
        healthy: u64,
        c: &ContainerGpu,
    ) -> Unfit {
        let container = c.name.clone();
        let cards: Vec<(u32, &CardState)> = ledger
            .cards()
            .iter()
            .enumerate()
            .take(64)
            .filter(|(i, _)| allowed & (1u64 << i) != 0)
            .map(|(i, s)| (i as u32, s))
            .collect();
        let unhealthy: Vec<u32> = cards
            .iter()
            .map(|(i, _)| *i)
            .filter(|i| healthy & (1u64 << i) == 0)
            .collect();
        let sick = if unhealthy.is_empty() {
            String::new()
        } else {
            format!(
                " (unhealthy: card{} {})",
                if unhealthy.len() > 1 { "s" } else { "" },
                unhealthy
                    .iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(",")
            )
        };
        match c.request {
            GpuRequest::Share { cores, blocks } => {
                let largest = cards
                    .iter()
                    .map(|(i, _)| inv.cards[*i as usize].blocks())
                    .max()
                    .unwrap_or(0);
                if blocks > largest {
                    return Unfit::TooLarge {
                        container,
                        detail: format!(
                            "{blocks} memory blocks requested but the largest allowed card has {largest}"
                        ),
                    };
                }
                // The closest healthy card: enough memory but too few cores, else enough cores but
                // too little memory, else the one with the most free cores.
                let healthy_cards: Vec<(u32, &CardState)> = cards
                    .iter()
                    .filter(|(i, _)| healthy & (1u64 << i) != 0)
                    .map(|(i, s)| (*i, *s))
                    .collect();
                let most = |pred: &dyn Fn(&CardState) -> bool, key: &dyn Fn(&CardState) -> u32| {
                    healthy_cards
                        .iter()
                        .filter(|(_, s)| pred(s))
                        .max_by_key(|(i, s)| (key(s), Reverse(*i)))
                        .copied()
                };
                let detail = if let Some((i, s)) =
                    most(&|s| s.free_blocks >= blocks, &|s| s.free_cores)
                {
                    format!(
                        "card {i}: {} vcuda-core free, {cores} requested{sick}",
                        s.free_cores
                    )
                } else if let Some((i, s)) = most(&|s| s.free_cores >= cores, &|s| s.free_blocks) {
                    format!(
                        "card {i}: {} memory blocks free, {blocks} requested{sick}",
                        s.free_blocks
                    )
                } else if let Some((i, s)) = most(&|_| true, &|s| s.free_cores) {
                    format!(
                        "card {i}: {} vcuda-core and {} memory blocks free, {cores} and {blocks} requested{sick}",
                        s.free_cores, s.free_blocks
                    )
                } else {
                    format!("no healthy card{sick}")
                };
                Unfit::Shortfall { container, detail }
            }
            GpuRequest::Whole { cards: n } => {
                if n as usize > cards.len() {
                    return Unfit::TooLarge {
                        container,
                        detail: format!(
                            "{n} whole cards requested but the node has {} allowed card{}",
                            cards.len(),
                            if cards.len() == 1 { "" } else { "s" }
                        ),
                    };
                }
                let free: Vec<String> = cards
                    .iter()
                    .filter(|(i, s)| s.is_free() && healthy & (1u64 << i) != 0)
                    .map(|(i, _)| i.to_string())
                    .collect();
                let list = if free.is_empty() {
                    String::new()
                } else {
                    format!(
                        " (card{} {})",
                        if free.len() > 1 { "s" } else { "" },
                        free.join(",")
                    )
                };
                Unfit::Shortfall {
                    container,
                    detail: format!(
                        "{n} whole card{} requested, {} completely free{list}{sick}",
                        if n == 1 { "" } else { "s" },
                        free.len()
                    ),
                }
            }
        }
    }

    fn arb_pod() -> impl Strategy<Value = PodGpuRequest> {
        let container = (arb_request(), 0u8..4);
        prop::collection::vec(container, 0..4).prop_map(|cs| {
            let mut containers = Vec::new();
            let (mut inits, mut apps) = (0, 0);
            for (request, kind) in cs {
                // 0,1: app container; 2: regular init container; 3: sidecar.
                let slot = if kind < 2 {
                    apps += 1;
                    Slot::App(apps - 1)
                } else {
                    inits += 1;
                    Slot::Init(inits - 1)
                };
                containers.push(ContainerGpu {
                    slot,
                    name: format!("{slot}"),
                    request,
                    sidecar: kind == 3,
                });
            }
            containers.sort_by_key(|c| c.slot);
            PodGpuRequest { containers }
        })
    }

    fn arb_filter() -> impl Strategy<Value = CardFilter> {
        prop_oneof![
            3 => Just(CardFilter::default()),
            1 => Just(CardFilter { models: ModelFilter::new(["H100"]), ..Default::default() }),
            1 => (0u32..8).prop_map(|i| CardFilter {
                exclude_uuids: vec![format!("GPU-T4-{i:04}")],
                ..Default::default()
            }),
        ]
    }

    #[test]
    fn exactly_one_node_gets_the_top_priority_and_ties_follow_a_fixed_order() {
        let names = ["n-a", "n-b", "n-c", "n-d"];
        // All equal: one node gets 10, the others 9.
        for order in [TieOrder::Name, TieOrder::NameHash] {
            let p = extender_priorities(&[7, 7, 7, 7], &names, order);
            assert_eq!(
                p.iter().filter(|&&x| x == 10).count(),
                1,
                "{order:?}: {p:?}"
            );
            assert_eq!(p.iter().filter(|&&x| x == 9).count(), 3, "{order:?}: {p:?}");
        }
        // Name order: the lowest name; hash order: the lowest hash.
        let p = extender_priorities(&[7, 7, 7, 7], &names, TieOrder::Name);
        assert_eq!(p, vec![10, 9, 9, 9]);
        let p = extender_priorities(&[7, 7, 7, 7], &names, TieOrder::NameHash);
        let top = names.iter().min_by_key(|n| (tie_hash(n), **n)).unwrap();
        assert_eq!(p[names.iter().position(|n| n == top).unwrap()], 10);
        // The same node wins whatever order the candidates come in.
        let rev: Vec<&str> = names.iter().rev().copied().collect();
        let q = extender_priorities(&[7, 7, 7, 7], &rev, TieOrder::NameHash);
        assert_eq!(rev[q.iter().position(|&x| x == 10).unwrap()], *top);
        // The best raw score always wins; the rest spread over 0..=9.
        let p = extender_priorities(&[0, 50, 100, 100], &names, TieOrder::Name);
        assert_eq!(p, vec![0, 5, 10, 9]);
        assert_eq!(
            extender_priorities(&[i64::MIN, 0, i64::MAX], &names[..3], TieOrder::NameHash),
            vec![0, 5, 10]
        );
        assert_eq!(extender_priorities(&[3], &["x"], TieOrder::Name), vec![10]);
        assert!(extender_priorities(&[], &[], TieOrder::Name).is_empty());
    }

    #[test]
    fn the_tie_hash_is_stable_and_spreads_numbered_nodes() {
        // Reference values: the order must not change between releases.
        assert_eq!(tie_hash(""), 0xefd0_1f60_ba99_2926);
        assert_eq!(tie_hash("a"), 0x82a2_a958_a9be_ce5b);
        // Nodes numbered in sequence do not come out in runs of neighbours.
        let names: Vec<String> = (0..1000).map(|i| format!("gpu-node-{i:04}")).collect();
        let mut order: Vec<usize> = (0..names.len()).collect();
        order.sort_by_key(|&i| (tie_hash(&names[i]), i));
        let neighbours = order
            .windows(2)
            .filter(|w| w[0].abs_diff(w[1]) < 10)
            .count();
        assert!(
            neighbours < 50,
            "{neighbours} of 999 neighbours in the order"
        );
        assert!(TieOrder::NameHash.prefer(5, "x", 4, "a"));
        assert!(TieOrder::Name.prefer(5, "b", 5, "c"));
        assert!(!TieOrder::Name.prefer(5, "c", 5, "b"));
    }

    proptest! {
        /// Whatever the node state, a placement only uses healthy cards, fits the ledger,
        /// is deterministic, and exists whenever some card set could hold the request.
        #[test]
        fn placements_are_sound_complete_and_deterministic(
            state in arb_state(),
            req in arb_request(),
            policy in prop::sample::select(Policy::ALL.to_vec()),
        ) {
            let f = build(&state);
            let healthy: Vec<u32> = f.inv.cards.iter().filter(|c| c.healthy).map(|c| c.index).collect();
            let feasible = match req {
                GpuRequest::Share { cores, blocks } => healthy.iter().any(|&i| {
                    let s = f.ledger.cards()[i as usize];
                    s.free_cores >= cores && s.free_blocks >= blocks
                }),
                GpuRequest::Whole { cards } => healthy
                    .iter()
                    .filter(|&&i| f.ledger.cards()[i as usize].is_free())
                    .count() >= cards as usize,
            };
            let r1 = f.place(policy, &[req]);
            let r2 = f.place(policy, &[req]);
            prop_assert_eq!(&r1, &r2);
            match r1 {
                Ok(p) => {
                    prop_assert!(feasible);
                    let cards = &p.cards[&Slot::App(0)];
                    prop_assert_eq!(cards.len() as u32, req.cards());
                    prop_assert!(cards.iter().all(|c| healthy.contains(c)));
                    prop_assert!(f.ledger.check(&p.assignment).is_ok());
                    let mut l = f.ledger.clone();
                    l.allocate(&p.assignment).unwrap();
                    l.release(&p.assignment).unwrap();
                    prop_assert_eq!(l, f.ledger.clone());
                }
                Err(e) => {
                    prop_assert!(!feasible, "{}", e);
                    let expected = matches!(e, Unfit::Shortfall { .. } | Unfit::TooLarge { .. });
                    prop_assert!(expected);
                }
            }
        }

        /// The fast screen and the full placement never disagree, whatever the pod shape,
        /// constraints, node state or policy.
        #[test]
        fn fit_score_is_exactly_place_without_the_cards(
            state in arb_state(),
            pod in arb_pod(),
            filter in arb_filter(),
            policy in prop::sample::select(Policy::ALL.to_vec()),
        ) {
            let f = build(&state);
            let elig = Eligibility::of(&f.inv, &filter);
            let full = place(policy, &f.view(), &pod, &filter).ok().map(|p| p.score);
            prop_assert_eq!(fit_score(policy, &f.view(), &pod, elig), full);
        }

        /// The single-pass reason is word for word the reason the original wording produced.
        #[test]
        fn reasons_are_worded_exactly_as_before(
            state in arb_state(),
            req in arb_request(),
            filter in arb_filter(),
        ) {
            let f = build(&state);
            let elig = Eligibility::of(&f.inv, &filter);
            let c = ContainerGpu { slot: Slot::App(0), name: "c0".into(), request: req, sidecar: false };
            prop_assert_eq!(
                explain(&f.inv, &f.ledger, elig.allowed, elig.healthy, &c),
                explain_reference(&f.inv, &f.ledger, elig.allowed, elig.healthy, &c)
            );
        }

        /// Whenever the card states alone decide, they decide what placing would.
        #[test]
        fn card_states_alone_never_disagree_with_place(
            state in arb_state(),
            pod in arb_pod(),
            filter in arb_filter(),
            policy in prop::sample::select(Policy::ALL.to_vec()),
        ) {
            let f = build(&state);
            let elig = Eligibility::of(&f.inv, &filter);
            let full = place(policy, &f.view(), &pod, &filter).ok().map(|p| p.score);
            if let Some(quick) = fit_score_from_cards(policy, f.ledger.cards(), &pod, elig) {
                prop_assert_eq!(quick, full);
            } else {
                let simple = matches!(pod.containers.as_slice(), [c] if c.long_running()
                    && !(policy == Policy::Topology && c.request.cards() > 1));
                prop_assert!(!simple || elig.allowed == 0, "a simple pod was not decided");
            }
        }

        /// Scores normalise the same with 64-bit and 128-bit arithmetic.
        #[test]
        fn normalized_scores_match_the_wide_arithmetic(scores in prop::collection::vec(any::<i64>(), 1..20), small in prop::collection::vec(-(1i64 << 40)..(1i64 << 40), 1..20)) {
            for v in [scores, small] {
                let (min, max) = (*v.iter().min().unwrap(), *v.iter().max().unwrap());
                let span = (max as i128) - (min as i128);
                let wide: Vec<u8> = if span == 0 {
                    vec![10; v.len()]
                } else {
                    v.iter().map(|&s| ((((s as i128) - (min as i128)) * 10 + span / 2) / span) as u8).collect()
                };
                prop_assert_eq!(normalize_scores(&v), wide);
            }
        }

        /// One node gets 10 and it is a best-scored one; a better raw score never gets a lower
        /// priority; 64-bit and 128-bit arithmetic agree.
        #[test]
        fn extender_priorities_rank_consistently(
            scores in prop::collection::vec(prop_oneof![any::<i64>(), -50i64..50], 1..30),
            order in prop::sample::select(vec![TieOrder::Name, TieOrder::NameHash]),
        ) {
            let names: Vec<String> = (0..scores.len()).map(|i| format!("node-{i}")).collect();
            let refs: Vec<&str> = names.iter().map(String::as_str).collect();
            let p = extender_priorities(&scores, &refs, order);
            prop_assert_eq!(p.iter().filter(|&&x| x == 10).count(), 1);
            let top = p.iter().position(|&x| x == 10).unwrap();
            prop_assert_eq!(Some(top), order.best(&scores, &refs));
            prop_assert_eq!(scores[top], *scores.iter().max().unwrap());
            for i in 0..scores.len() {
                for j in 0..scores.len() {
                    if scores[i] > scores[j] {
                        prop_assert!(p[i] >= p[j], "{:?} -> {:?}", scores, p);
                    }
                }
            }
            let (min, max) = (*scores.iter().min().unwrap() as i128, scores[top] as i128);
            for (i, &s) in scores.iter().enumerate() {
                if i != top {
                    let want = if max == min { 9 } else { (((s as i128) - min) * 9 + (max - min) / 2) / (max - min) };
                    prop_assert_eq!(i128::from(p[i]), want);
                }
            }
        }

        /// choose_node picks what placing on every node and keeping the best would pick.
        #[test]
        fn choose_node_matches_placing_everywhere(
            states in prop::collection::vec(arb_state(), 1..5),
            pod in arb_pod(),
            policy in prop::sample::select(Policy::ALL.to_vec()),
        ) {
            let fixtures: Vec<Fixture> = states.iter().map(build).collect();
            let names: Vec<String> = (0..fixtures.len()).map(|i| format!("n{}", (i * 7) % 5)).collect();
            let views: Vec<NodeView<'_>> = fixtures
                .iter()
                .zip(&names)
                .map(|(f, n)| NodeView { name: n, ..f.view() })
                .collect();
            let filter = CardFilter::default();
            let mut best: Option<(usize, Placement)> = None;
            let mut unfit = Vec::new();
            for (i, v) in views.iter().enumerate() {
                match place(policy, v, &pod, &filter) {
                    Ok(p) => {
                        let better = best.as_ref().is_none_or(|(b, bp)| {
                            prefer(p.score, v.name, bp.score, views[*b].name)
                        });
                        if better {
                            best = Some((i, p));
                        }
                    }
                    Err(e) => unfit.push((i, e)),
                }
            }
            let (choice, got_unfit) = choose_node(policy, &views, &pod, &filter);
            prop_assert_eq!(choice.map(|c| (c.node, c.placement)), best);
            prop_assert_eq!(got_unfit, unfit);
        }

        #[test]
        fn multi_container_pods_never_overcommit_a_card(
            state in arb_state(),
            reqs in prop::collection::vec(arb_request(), 1..4),
            policy in prop::sample::select(Policy::ALL.to_vec()),
        ) {
            let f = build(&state);
            if let Ok(p) = f.place(policy, &reqs) {
                let mut l = f.ledger.clone();
                prop_assert!(l.allocate(&p.assignment).is_ok());
                prop_assert_eq!(p.cards.len(), reqs.len());
            }
        }
    }
}
