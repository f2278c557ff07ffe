//! The device IDs the two kubelet device plugins advertise, and the pure decisions built on
//! them (DESIGN §4).
//!
//! | resource | IDs per card | form |
//! |---|---|---|
//! | `vcuda-core` | 100 | `vcore-<card>-<k>`, k = 0..99 |
//! | `vcuda-memory` | floor(card MiB / 256) | `vmem-<card>-<k>`, k = 0..blocks-1 |
//!
//! Every ID belongs to exactly one card, so the kubelet's own accounting and checkpoint always
//! say which card a container holds. This module turns ID lists into per-card sets
//! ([`IdSet`]), checks that a container's IDs describe something the resource contract allows
//! ([`core_shape`], [`memory_card`]), derives a ledger from the IDs held ([`ledger_from_usage`]),
//! chooses the IDs to prefer for a set of cards ([`preferred_ids`]) and decides which pending
//! container an anonymous request most likely belongs to ([`match_container`]).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use crate::inventory::NodeInventory;
use crate::ledger::{Assignment, NodeLedger};
use crate::request::{GpuRequest, Slot};
use crate::resources::CORES_PER_CARD;

/// Prefix of vcuda-core device IDs.
pub const CORE_PREFIX: &str = "vcore";
/// Prefix of vcuda-memory device IDs.
pub const MEMORY_PREFIX: &str = "vmem";
/// The kubelet accepts device IDs of at most this many characters.
pub const MAX_ID_LEN: usize = 63;

/// Which of the two resources an ID belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DeviceKind {
    /// `vcuda-core`: 100 IDs per card.
    Core,
    /// `vcuda-memory`: one ID per 256 MiB block of the card.
    Memory,
}

impl DeviceKind {
    /// Both kinds, vcuda-core first.
    pub const ALL: [DeviceKind; 2] = [DeviceKind::Core, DeviceKind::Memory];

    /// The ID prefix (`vcore` / `vmem`).
    pub fn prefix(self) -> &'static str {
        match self {
            DeviceKind::Core => CORE_PREFIX,
            DeviceKind::Memory => MEMORY_PREFIX,
        }
    }

    /// The resource's short name (`vcuda-core` / `vcuda-memory`), for messages.
    pub fn resource(self) -> &'static str {
        match self {
            DeviceKind::Core => "vcuda-core",
            DeviceKind::Memory => "vcuda-memory",
        }
    }

    /// How many IDs of this kind card `card` has (0 for a card the node does not have).
    pub fn per_card(self, inv: &NodeInventory, card: u32) -> u32 {
        match (self, inv.card(card)) {
            (_, None) => 0,
            (DeviceKind::Core, Some(_)) => CORES_PER_CARD,
            (DeviceKind::Memory, Some(c)) => c.blocks(),
        }
    }
}

impl fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.resource())
    }
}

/// One parsed device ID.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId {
    pub kind: DeviceKind,
    /// Card index.
    pub card: u32,
    /// Position of the ID on its card.
    pub k: u32,
}

impl DeviceId {
    /// Parse `vcore-<card>-<k>` or `vmem-<card>-<k>` (decimal, no leading zeros, no signs).
    /// Only the syntax is checked; see [`DeviceId::check`] for the node's ranges.
    pub fn parse(s: &str) -> Option<Self> {
        let (kind, rest) = if let Some(r) = s.strip_prefix("vcore-") {
            (DeviceKind::Core, r)
        } else if let Some(r) = s.strip_prefix("vmem-") {
            (DeviceKind::Memory, r)
        } else {
            return None;
        };
        let (card, k) = rest.split_once('-')?;
        Some(Self {
            kind,
            card: parse_decimal(card)?,
            k: parse_decimal(k)?,
        })
    }

    /// Is this ID one the node advertises?
    pub fn check(&self, inv: &NodeInventory) -> Result<(), DeviceIdError> {
        if inv.card(self.card).is_none() {
            return Err(DeviceIdError::UnknownCard {
                id: self.to_string(),
                cards: inv.len(),
            });
        }
        let max = self.kind.per_card(inv, self.card);
        if self.k >= max {
            return Err(DeviceIdError::OutOfRange {
                id: self.to_string(),
                card: self.card,
                per_card: max,
            });
        }
        Ok(())
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}-{}", self.kind.prefix(), self.card, self.k)
    }
}

fn parse_decimal(s: &str) -> Option<u32> {
    if s.is_empty() || s.len() > 9 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if s.len() > 1 && s.starts_with('0') {
        return None;
    }
    s.parse().ok()
}

/// Every device ID of `kind` the node advertises, card by card, k ascending.
pub fn all_ids(inv: &NodeInventory, kind: DeviceKind) -> Vec<DeviceId> {
    inv.cards
        .iter()
        .flat_map(|c| {
            (0..kind.per_card(inv, c.index)).map(move |k| DeviceId {
                kind,
                card: c.index,
                k,
            })
        })
        .collect()
}

/// A device ID the plugin did not advertise, or an ID list it cannot accept.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceIdError {
    #[error("device ID {id:?} is not a {kind} ID: this plugin advertises {prefix}-<card>-<k>", prefix = kind.prefix())]
    Malformed { id: String, kind: DeviceKind },
    #[error("device ID {id:?} names a card this node does not have (it has {cards} cards, 0..{last})", last = cards.saturating_sub(1))]
    UnknownCard { id: String, cards: usize },
    #[error("device ID {id:?} is out of range: card {card} has IDs 0..{last} only", last = per_card.saturating_sub(1))]
    OutOfRange {
        id: String,
        card: u32,
        per_card: u32,
    },
    #[error("device ID {id:?} is listed twice")]
    Duplicate { id: String },
    #[error("no device IDs were given")]
    Empty,
}

/// A set of device IDs of one kind, grouped by card.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IdSet {
    per_card: BTreeMap<u32, BTreeSet<u32>>,
}

impl IdSet {
    /// Parse and check a list of IDs of `kind` against the node. Rejects malformed or unknown
    /// IDs, IDs of the other kind, duplicates and an empty list, naming the offending ID.
    pub fn parse<S: AsRef<str>>(
        kind: DeviceKind,
        ids: &[S],
        inv: &NodeInventory,
    ) -> Result<Self, DeviceIdError> {
        if ids.is_empty() {
            return Err(DeviceIdError::Empty);
        }
        let mut set = Self::default();
        for s in ids {
            let s = s.as_ref();
            let id = DeviceId::parse(s)
                .filter(|d| d.kind == kind)
                .ok_or_else(|| DeviceIdError::Malformed {
                    id: s.to_string(),
                    kind,
                })?;
            id.check(inv)?;
            if !set.insert(id.card, id.k) {
                return Err(DeviceIdError::Duplicate { id: s.to_string() });
            }
        }
        Ok(set)
    }

    /// Parse leniently: IDs that are malformed, of the other kind or not on this node are
    /// skipped, duplicates merged.
    pub fn parse_lenient<S: AsRef<str>>(kind: DeviceKind, ids: &[S], inv: &NodeInventory) -> Self {
        let mut set = Self::default();
        for s in ids {
            if let Some(id) = DeviceId::parse(s.as_ref()) {
                if id.kind == kind && id.check(inv).is_ok() {
                    set.insert(id.card, id.k);
                }
            }
        }
        set
    }

    /// Add one ID; false if it was already there.
    pub fn insert(&mut self, card: u32, k: u32) -> bool {
        self.per_card.entry(card).or_default().insert(k)
    }

    /// Number of IDs.
    pub fn len(&self) -> usize {
        self.per_card.values().map(BTreeSet::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.per_card.values().all(BTreeSet::is_empty)
    }

    /// The cards the IDs lie on, ascending.
    pub fn cards(&self) -> Vec<u32> {
        self.per_card
            .iter()
            .filter(|(_, ks)| !ks.is_empty())
            .map(|(c, _)| *c)
            .collect()
    }

    /// How many IDs lie on `card`.
    pub fn count_on(&self, card: u32) -> u32 {
        self.per_card.get(&card).map_or(0, |ks| ks.len() as u32)
    }

    /// The positions on each card.
    pub fn per_card(&self) -> &BTreeMap<u32, BTreeSet<u32>> {
        &self.per_card
    }

    /// Does the set contain this ID?
    pub fn contains(&self, card: u32, k: u32) -> bool {
        self.per_card.get(&card).is_some_and(|ks| ks.contains(&k))
    }

    /// The IDs as strings, card by card, k ascending.
    pub fn ids(&self, kind: DeviceKind) -> Vec<String> {
        self.per_card
            .iter()
            .flat_map(|(&card, ks)| {
                ks.iter()
                    .map(move |&k| DeviceId { kind, card, k }.to_string())
            })
            .collect()
    }

    /// A compact, canonical text form: `card:ranges` per card, separated by `;`, ranges as
    /// `a-b` or `a`, e.g. `0:0-29,31;2:5`. Equal sets give equal strings.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        for (card, ks) in self.per_card.iter().filter(|(_, ks)| !ks.is_empty()) {
            if !out.is_empty() {
                out.push(';');
            }
            out.push_str(&format!("{card}:"));
            let mut first = true;
            let mut iter = ks.iter().copied().peekable();
            while let Some(start) = iter.next() {
                let mut end = start;
                while iter.peek() == Some(&(end + 1)) {
                    end += 1;
                    iter.next();
                }
                if !first {
                    out.push(',');
                }
                first = false;
                if start == end {
                    out.push_str(&start.to_string());
                } else {
                    out.push_str(&format!("{start}-{end}"));
                }
            }
        }
        out
    }

    /// Decode [`IdSet::encode`]'s form. Ranges must be ascending; at most `limit` IDs in all
    /// (a guard against absurd input).
    pub fn decode(s: &str, limit: usize) -> Result<Self, String> {
        let mut set = Self::default();
        let mut count = 0usize;
        if s.is_empty() {
            return Ok(set);
        }
        for part in s.split(';') {
            let (card, ranges) = part
                .split_once(':')
                .ok_or_else(|| format!("{part:?} is not card:ranges"))?;
            let card = parse_decimal(card).ok_or_else(|| format!("{card:?} is not a card"))?;
            for r in ranges.split(',') {
                let (a, b) = match r.split_once('-') {
                    Some((a, b)) => (a, b),
                    None => (r, r),
                };
                let a = parse_decimal(a).ok_or_else(|| format!("{r:?} is not a range"))?;
                let b = parse_decimal(b).ok_or_else(|| format!("{r:?} is not a range"))?;
                if b < a {
                    return Err(format!("range {r:?} is descending"));
                }
                count = count.saturating_add((b - a + 1) as usize);
                if count > limit {
                    return Err(format!("more than {limit} IDs"));
                }
                for k in a..=b {
                    set.insert(card, k);
                }
            }
        }
        Ok(set)
    }

    /// Check every ID against the node's ranges.
    pub fn check(&self, kind: DeviceKind, inv: &NodeInventory) -> Result<(), DeviceIdError> {
        for (&card, ks) in &self.per_card {
            for &k in ks {
                DeviceId { kind, card, k }.check(inv)?;
            }
        }
        Ok(())
    }
}

/// What a container's vcuda-core IDs amount to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CoreShape {
    /// A share of one card.
    Share { card: u32, cores: u32 },
    /// Whole cards (each with all 100 of its IDs), ascending.
    Whole { cards: Vec<u32> },
}

impl CoreShape {
    /// The cards, ascending.
    pub fn cards(&self) -> Vec<u32> {
        match self {
            CoreShape::Share { card, .. } => vec![*card],
            CoreShape::Whole { cards } => cards.clone(),
        }
    }

    /// vcuda-core units.
    pub fn cores(&self) -> u32 {
        match self {
            CoreShape::Share { cores, .. } => *cores,
            CoreShape::Whole { cards } => cards.len() as u32 * CORES_PER_CARD,
        }
    }

    pub fn is_share(&self) -> bool {
        matches!(self, CoreShape::Share { .. })
    }
}

/// A container's IDs do not describe something the resource contract allows.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShapeError {
    #[error("{count} vcuda-core is not a valid request: use 1-99 for a share of one card or a multiple of 100 for whole cards")]
    InvalidCores { count: u32 },
    #[error(
        "the {count} {kind} IDs straddle cards ({}): {rule}",
        describe_split(split)
    )]
    Straddle {
        kind: DeviceKind,
        count: u32,
        /// (card, IDs on it), ascending by card.
        split: Vec<(u32, u32)>,
        rule: &'static str,
    },
    #[error("{blocks} vcuda-memory blocks do not fit on one card: the largest card of this node has {largest} blocks ({largest_mib} MiB)")]
    MemoryTooLarge {
        blocks: u32,
        largest: u32,
        largest_mib: u64,
    },
    #[error(
        "the vcuda-memory IDs lie on card{} {} but the container's vcuda-core IDs are on card{} {}",
        plural(memory_cards),
        list(memory_cards),
        plural(core_cards),
        list(core_cards)
    )]
    Apart {
        memory_cards: Vec<u32>,
        core_cards: Vec<u32>,
    },
}

fn plural(v: &[u32]) -> &'static str {
    if v.len() == 1 {
        ""
    } else {
        "s"
    }
}

fn list(v: &[u32]) -> String {
    v.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
}

fn describe_split(split: &[(u32, u32)]) -> String {
    split
        .iter()
        .map(|(c, n)| format!("{n} on card {c}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Validate a container's vcuda-core IDs: 1-99 IDs on one card (a share), or all 100 IDs of
/// each of N cards (whole cards).
pub fn core_shape(set: &IdSet) -> Result<CoreShape, ShapeError> {
    let count = set.len() as u32;
    let split: Vec<(u32, u32)> = set
        .cards()
        .into_iter()
        .map(|c| (c, set.count_on(c)))
        .collect();
    if count < CORES_PER_CARD {
        return match split.as_slice() {
            [(card, cores)] => Ok(CoreShape::Share {
                card: *card,
                cores: *cores,
            }),
            _ => Err(ShapeError::Straddle {
                kind: DeviceKind::Core,
                count,
                split,
                rule: "a share of a card (1-99 vcuda-core) must lie on one card",
            }),
        };
    }
    // `u32::is_multiple_of` needs Rust 1.87; the workspace supports 1.85.
    #[allow(clippy::manual_is_multiple_of)]
    let partial = count % CORES_PER_CARD != 0;
    if partial {
        return Err(ShapeError::InvalidCores { count });
    }
    if split.iter().any(|(_, n)| *n != CORES_PER_CARD) {
        return Err(ShapeError::Straddle {
            kind: DeviceKind::Core,
            count,
            split,
            rule: "whole cards need all 100 vcuda-core IDs of each card",
        });
    }
    Ok(CoreShape::Whole {
        cards: split.into_iter().map(|(c, _)| c).collect(),
    })
}

/// Validate a share's vcuda-memory IDs: all on one card. Returns that card.
pub fn memory_card(set: &IdSet, inv: &NodeInventory) -> Result<u32, ShapeError> {
    let count = set.len() as u32;
    let largest = inv.cards.iter().map(|c| c.blocks()).max().unwrap_or(0);
    if count > largest {
        return Err(ShapeError::MemoryTooLarge {
            blocks: count,
            largest,
            largest_mib: inv.largest_card_mib(),
        });
    }
    match set.cards().as_slice() {
        [card] => Ok(*card),
        _ => Err(ShapeError::Straddle {
            kind: DeviceKind::Memory,
            count,
            split: set
                .cards()
                .into_iter()
                .map(|c| (c, set.count_on(c)))
                .collect(),
            rule: "a share's memory must lie on the card of its vcuda-core",
        }),
    }
}

/// Check that a container's vcuda-memory IDs lie on the cards of its vcuda-core IDs.
pub fn memory_with_cores(memory: &IdSet, core_cards: &[u32]) -> Result<(), ShapeError> {
    let memory_cards = memory.cards();
    if memory_cards.iter().all(|c| core_cards.contains(c)) {
        return Ok(());
    }
    Err(ShapeError::Apart {
        memory_cards,
        core_cards: core_cards.to_vec(),
    })
}

/// Per-card usage derived from the distinct IDs held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CardUse {
    /// Distinct vcuda-core IDs of the card held by anyone.
    pub cores: u32,
    /// Distinct vcuda-memory IDs of the card held by anyone.
    pub blocks: u32,
}

/// The ledger implied by the distinct IDs held per card (`usage[i]` for card i): a card whose
/// 100 vcuda-core IDs are all held is taken whole; otherwise it carries a share of the held
/// cores and blocks. This matches the kubelet's own accounting, so devices an init container
/// hands on to an app container count once, not twice.
pub fn ledger_from_usage(inv: &NodeInventory, usage: &[CardUse]) -> NodeLedger {
    let mut ledger = NodeLedger::new(inv);
    for (card, u) in usage.iter().enumerate().take(inv.len()) {
        let card = card as u32;
        let a = if u.cores >= CORES_PER_CARD {
            Assignment::whole(&[card])
        } else if u.cores > 0 || u.blocks > 0 {
            let total = inv.cards[card as usize].blocks();
            Assignment::share(card, u.cores, u.blocks.min(total))
        } else {
            continue;
        };
        // A fresh ledger has room for any one card's usage within its capacity.
        let _ = ledger.allocate(&a);
    }
    ledger
}

/// The IDs to prefer for a container: `must_include` first, then available IDs on `cards`
/// (in the given card order, k ascending), then — only to reach `size` — other available IDs,
/// from the cards with the most available IDs first. Never more than `size`; fewer only when
/// fewer are available. IDs outside `available` are never returned (except `must_include`,
/// which the kubelet guarantees to be available).
pub fn preferred_ids(
    kind: DeviceKind,
    available: &[String],
    must_include: &[String],
    size: usize,
    cards: &[u32],
) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(size);
    let mut taken: BTreeSet<&str> = BTreeSet::new();
    for id in must_include {
        if out.len() >= size {
            break;
        }
        if taken.insert(id.as_str()) {
            out.push(id.clone());
        }
    }
    // Available IDs of this kind, per card, k ascending.
    let mut per_card: BTreeMap<u32, Vec<(u32, &str)>> = BTreeMap::new();
    for id in available {
        if let Some(d) = DeviceId::parse(id).filter(|d| d.kind == kind) {
            if !taken.contains(id.as_str()) {
                per_card.entry(d.card).or_default().push((d.k, id.as_str()));
            }
        }
    }
    for v in per_card.values_mut() {
        v.sort_unstable();
        v.dedup();
    }
    // The chosen cards in the given order, then (only to reach `size`) the others, fullest
    // first.
    let mut order: Vec<u32> = Vec::new();
    for &card in cards {
        if !order.contains(&card) {
            order.push(card);
        }
    }
    let mut rest: Vec<(usize, u32)> = per_card
        .iter()
        .filter(|(c, _)| !order.contains(c))
        .map(|(c, v)| (v.len(), *c))
        .collect();
    rest.sort_by_key(|&(n, c)| (std::cmp::Reverse(n), c));
    order.extend(rest.into_iter().map(|(_, c)| c));
    for card in order {
        let Some(v) = per_card.get(&card) else {
            continue;
        };
        for &(_, id) in v {
            if out.len() >= size {
                return out;
            }
            if taken.insert(id) {
                out.push(id.to_string());
            }
        }
    }
    out
}

/// Number of available IDs of `kind` per card (index = card), from a list of ID strings.
pub fn available_per_card(kind: DeviceKind, available: &[String], inv: &NodeInventory) -> Vec<u32> {
    let set = IdSet::parse_lenient(kind, available, inv);
    (0..inv.len() as u32).map(|c| set.count_on(c)).collect()
}

/// Cards that can hold `request` given the available IDs per card: a share needs `cores`
/// available vcuda-core IDs on the card; a whole card needs all 100. The result is a bit mask.
pub fn cards_with_room(core_available: &[u32], request: GpuRequest) -> u64 {
    let need = match request {
        GpuRequest::Share { cores, .. } => cores,
        GpuRequest::Whole { .. } => CORES_PER_CARD,
    };
    core_available
        .iter()
        .enumerate()
        .take(64)
        .filter(|(_, &n)| n >= need)
        .fold(0u64, |m, (i, _)| m | (1u64 << i))
}

/// A GPU container of a pending pod that a request might belong to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate<'a> {
    /// Scheduling time of the pod (the extender's predicate time, else its creation time), ns.
    pub time: u64,
    pub namespace: &'a str,
    pub pod: &'a str,
    pub slot: Slot,
    pub request: GpuRequest,
    /// Cards the scheduler assigned to this container, if any.
    pub cards: Option<&'a [u32]>,
}

impl Candidate<'_> {
    fn size(&self, kind: DeviceKind) -> u32 {
        match kind {
            DeviceKind::Core => self.request.cores(),
            DeviceKind::Memory => self.request.share_blocks(),
        }
    }

    fn agrees(&self, kind: DeviceKind, cards: &[u32]) -> Option<bool> {
        let assigned = self.cards?;
        Some(match kind {
            DeviceKind::Core => assigned == cards,
            DeviceKind::Memory => cards.iter().all(|c| assigned.contains(c)),
        })
    }
}

/// How a request was matched to a candidate container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatchQuality {
    /// The container's assigned cards are the request's cards.
    Agrees,
    /// The container has no card assignment (no extender, or not yet written).
    Unassigned,
    /// Only containers assigned to other cards have this size; the first of them is returned.
    Disagrees,
    /// The request's cards are not known yet (a preference is being chosen).
    Unknown,
}

/// Which pending container an anonymous request of `size` IDs of `kind` belongs to.
///
/// The kubelet admits pods one at a time in the order the scheduler bound them, and allocates a
/// pod's containers in order (init containers, then app containers). So candidates are taken in
/// order of (pod time, namespace, pod name, slot), and only containers of the right size count
/// (vcuda-core units, or share memory blocks). When the request's `cards` are known (at
/// Allocate), a container assigned exactly those cards wins over an unassigned one, which wins
/// over one assigned elsewhere; this keeps two same-sized pods apart, where TKEStack relied on
/// the order alone. Returns the candidate's position in `candidates`.
pub fn match_container(
    candidates: &[Candidate<'_>],
    kind: DeviceKind,
    size: u32,
    cards: Option<&[u32]>,
) -> Option<(usize, MatchQuality)> {
    let mut order: Vec<usize> = (0..candidates.len())
        .filter(|&i| candidates[i].size(kind) == size && size > 0)
        .collect();
    order.sort_by(|&a, &b| {
        let (x, y) = (&candidates[a], &candidates[b]);
        (x.time, x.namespace, x.pod, x.slot).cmp(&(y.time, y.namespace, y.pod, y.slot))
    });
    let Some(cards) = cards else {
        return order.first().map(|&i| (i, MatchQuality::Unknown));
    };
    let find = |want: Option<bool>| {
        order
            .iter()
            .copied()
            .find(|&i| candidates[i].agrees(kind, cards) == want)
    };
    if let Some(i) = find(Some(true)) {
        return Some((i, MatchQuality::Agrees));
    }
    if let Some(i) = find(None) {
        return Some((i, MatchQuality::Unassigned));
    }
    order.first().map(|&i| (i, MatchQuality::Disagrees))
}

/// One GPU container the kubelet has yet to allocate devices for: its request and the cards
/// the scheduler assigned it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AwaitingContainer<'a> {
    pub request: GpuRequest,
    pub cards: &'a [u32],
}

/// Could the kubelet's anonymous device requests hand a container of `a` the devices meant
/// for a container of `b` (or the other way round)?
///
/// `GetPreferredAllocation` and `Allocate` name no pod, and the kubelet admits the pods bound
/// to a node in an order the device plugin cannot see (each watch batch sorted by creation
/// time, which has one-second resolution). [`match_container`] tells containers apart by
/// request size alone (vcuda-core IDs; share memory blocks), so two containers waiting for
/// devices at the same time are interchangeable only when they have the same cards. Returns
/// the first pair (positions in `a` and `b`) with equal vcuda-core counts or equal share memory
/// blocks on different cards; `None` when the kubelet may admit them in any order.
pub fn confusable(
    a: &[AwaitingContainer<'_>],
    b: &[AwaitingContainer<'_>],
) -> Option<(usize, usize)> {
    for (i, x) in a.iter().enumerate() {
        for (j, y) in b.iter().enumerate() {
            if x.cards == y.cards {
                continue;
            }
            let same_cores = x.request.cores() == y.request.cores();
            let same_blocks = x.request.is_share()
                && y.request.is_share()
                && x.request.share_blocks() == y.request.share_blocks();
            if same_cores || same_blocks {
                return Some((i, j));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::{Card, Link};
    use proptest::prelude::*;

    /// Two 16 GiB cards (64 blocks each) and one 4 GiB card (16 blocks).
    fn node() -> NodeInventory {
        let mut inv = NodeInventory::uniform(3, "T", 16384, Link::Phb);
        inv.cards[2] = Card {
            memory_mib: 4096,
            ..inv.cards[2].clone()
        };
        inv
    }

    fn ids(prefix: &str, card: u32, ks: std::ops::Range<u32>) -> Vec<String> {
        ks.map(|k| format!("{prefix}-{card}-{k}")).collect()
    }

    fn waiting(request: GpuRequest, cards: &[u32]) -> AwaitingContainer<'_> {
        AwaitingContainer { request, cards }
    }

    #[test]
    fn same_sized_containers_on_different_cards_are_confusable_and_on_one_card_are_not() {
        let share = |cores, blocks| GpuRequest::Share { cores, blocks };
        let c5 = [5u32];
        let c6 = [6u32];
        // Same vcuda-core count, different cards: the kubelet may swap them.
        assert_eq!(
            confusable(&[waiting(share(10, 4), &c5)], &[waiting(share(10, 8), &c6)]),
            Some((0, 0))
        );
        // Same memory blocks, different cards: the memory half may be swapped.
        assert_eq!(
            confusable(&[waiting(share(10, 4), &c5)], &[waiting(share(20, 4), &c6)]),
            Some((0, 0))
        );
        // Same card: whichever the kubelet admits first gets devices of the right card.
        assert_eq!(
            confusable(&[waiting(share(10, 4), &c5)], &[waiting(share(10, 4), &c5)]),
            None
        );
        // Different sizes in both halves: told apart by size.
        assert_eq!(
            confusable(&[waiting(share(10, 4), &c5)], &[waiting(share(20, 8), &c6)]),
            None
        );
        // Whole cards: one card each on different cards are confusable; 1 vs 2 cards are not.
        let w = |cards| GpuRequest::Whole { cards };
        assert_eq!(
            confusable(&[waiting(w(1), &[0])], &[waiting(w(1), &[1])]),
            Some((0, 0))
        );
        assert_eq!(
            confusable(&[waiting(w(1), &[0])], &[waiting(w(2), &[1, 2])]),
            None
        );
        // The pair named is the first confusable one, by position.
        assert_eq!(
            confusable(
                &[waiting(share(30, 2), &c5), waiting(share(10, 1), &c5)],
                &[waiting(share(50, 9), &c6), waiting(share(10, 3), &c6)]
            ),
            Some((1, 1))
        );
    }

    #[test]
    fn ids_round_trip_and_reject_garbage() {
        let d = DeviceId::parse("vcore-3-42").unwrap();
        assert_eq!(
            d,
            DeviceId {
                kind: DeviceKind::Core,
                card: 3,
                k: 42
            }
        );
        assert_eq!(d.to_string(), "vcore-3-42");
        assert_eq!(
            DeviceId::parse("vmem-0-0").unwrap().kind,
            DeviceKind::Memory
        );
        for bad in [
            "",
            "vcore",
            "vcore-1",
            "vcore-1-",
            "vcore--1",
            "vcore-01-2",
            "vcore-1-+2",
            "vcore-1-2-3",
            "tencent.com/vcuda-core-7",
            "vgpu-1-2",
        ] {
            assert_eq!(DeviceId::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn every_card_advertises_100_core_ids_and_one_memory_id_per_block() {
        let inv = node();
        assert_eq!(all_ids(&inv, DeviceKind::Core).len(), 300);
        let mem = all_ids(&inv, DeviceKind::Memory);
        assert_eq!(mem.len(), 64 + 64 + 16);
        assert_eq!(mem.last().unwrap().to_string(), "vmem-2-15");
        assert!(mem.iter().all(|d| d.to_string().len() <= MAX_ID_LEN));
    }

    #[test]
    fn unknown_ids_are_rejected_with_the_node_ranges() {
        let inv = node();
        let e = IdSet::parse(DeviceKind::Core, &["vcore-7-1"], &inv).unwrap_err();
        assert_eq!(
            e.to_string(),
            "device ID \"vcore-7-1\" names a card this node does not have (it has 3 cards, 0..2)"
        );
        let e = IdSet::parse(DeviceKind::Memory, &["vmem-2-16"], &inv).unwrap_err();
        assert_eq!(
            e.to_string(),
            "device ID \"vmem-2-16\" is out of range: card 2 has IDs 0..15 only"
        );
        let e = IdSet::parse(DeviceKind::Core, &["vmem-0-1"], &inv).unwrap_err();
        assert!(e.to_string().contains("is not a vcuda-core ID"), "{e}");
        let e = IdSet::parse(DeviceKind::Core, &["vcore-0-1", "vcore-0-1"], &inv).unwrap_err();
        assert_eq!(
            e,
            DeviceIdError::Duplicate {
                id: "vcore-0-1".into()
            }
        );
        let none: [&str; 0] = [];
        assert_eq!(
            IdSet::parse(DeviceKind::Core, &none, &inv),
            Err(DeviceIdError::Empty)
        );
    }

    #[test]
    fn a_share_lies_on_one_card() {
        let inv = node();
        let set = IdSet::parse(DeviceKind::Core, &ids("vcore", 1, 10..40), &inv).unwrap();
        assert_eq!(
            core_shape(&set),
            Ok(CoreShape::Share { card: 1, cores: 30 })
        );
    }

    #[test]
    fn a_share_that_straddles_cards_is_refused_with_the_split() {
        let inv = node();
        let mut v = ids("vcore", 0, 0..30);
        v.extend(ids("vcore", 2, 0..20));
        let set = IdSet::parse(DeviceKind::Core, &v, &inv).unwrap();
        let e = core_shape(&set).unwrap_err();
        assert_eq!(
            e.to_string(),
            "the 50 vcuda-core IDs straddle cards (30 on card 0, 20 on card 2): a share of a card (1-99 vcuda-core) must lie on one card"
        );
    }

    #[test]
    fn whole_cards_need_every_id_of_each_card() {
        let inv = node();
        let mut v = ids("vcore", 0, 0..100);
        v.extend(ids("vcore", 2, 0..100));
        let set = IdSet::parse(DeviceKind::Core, &v, &inv).unwrap();
        assert_eq!(core_shape(&set), Ok(CoreShape::Whole { cards: vec![0, 2] }));
        let mut v = ids("vcore", 0, 0..50);
        v.extend(ids("vcore", 1, 0..100));
        v.extend(ids("vcore", 2, 0..50));
        let e = core_shape(&IdSet::parse(DeviceKind::Core, &v, &inv).unwrap()).unwrap_err();
        assert!(
            e.to_string()
                .contains("whole cards need all 100 vcuda-core IDs of each card"),
            "{e}"
        );
        let mut v = ids("vcore", 0, 0..100);
        v.extend(ids("vcore", 1, 0..50));
        let e = core_shape(&IdSet::parse(DeviceKind::Core, &v, &inv).unwrap()).unwrap_err();
        assert_eq!(e, ShapeError::InvalidCores { count: 150 });
    }

    #[test]
    fn memory_larger_than_any_card_is_named_as_such() {
        let inv = node();
        let mut v = ids("vmem", 0, 0..64);
        v.extend(ids("vmem", 1, 0..6));
        let set = IdSet::parse(DeviceKind::Memory, &v, &inv).unwrap();
        let e = memory_card(&set, &inv).unwrap_err();
        assert_eq!(
            e.to_string(),
            "70 vcuda-memory blocks do not fit on one card: the largest card of this node has 64 blocks (16384 MiB)"
        );
        let set = IdSet::parse(DeviceKind::Memory, &ids("vmem", 2, 0..4), &inv).unwrap();
        assert_eq!(memory_card(&set, &inv), Ok(2));
    }

    #[test]
    fn memory_away_from_the_cores_is_refused() {
        let inv = node();
        let mem = IdSet::parse(DeviceKind::Memory, &ids("vmem", 1, 0..4), &inv).unwrap();
        assert_eq!(memory_with_cores(&mem, &[1]), Ok(()));
        let e = memory_with_cores(&mem, &[0]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "the vcuda-memory IDs lie on card 1 but the container's vcuda-core IDs are on card 0"
        );
    }

    #[test]
    fn the_compact_form_round_trips_and_is_canonical() {
        let inv = node();
        let mut v = ids("vcore", 2, 5..9);
        v.extend(ids("vcore", 0, 0..30));
        v.push("vcore-0-31".into());
        let set = IdSet::parse(DeviceKind::Core, &v, &inv).unwrap();
        assert_eq!(set.encode(), "0:0-29,31;2:5-8");
        assert_eq!(IdSet::decode(&set.encode(), 1000), Ok(set.clone()));
        assert_eq!(IdSet::decode("", 10), Ok(IdSet::default()));
        assert!(IdSet::decode("0:5-1", 10)
            .unwrap_err()
            .contains("descending"));
        assert!(IdSet::decode("0:0-99", 10)
            .unwrap_err()
            .contains("more than 10"));
        assert!(IdSet::decode("x", 10).is_err());
    }

    #[test]
    fn the_ledger_counts_distinct_ids_and_all_100_make_a_whole_card() {
        let inv = node();
        let usage = [
            CardUse {
                cores: 100,
                blocks: 3,
            },
            CardUse {
                cores: 30,
                blocks: 8,
            },
            CardUse::default(),
        ];
        let l = ledger_from_usage(&inv, &usage);
        assert_eq!(l.card(0).unwrap().free_cores, 0);
        assert_eq!(l.card(0).unwrap().free_blocks, 0);
        assert_eq!(l.card(1).unwrap().free_cores, 70);
        assert_eq!(l.card(1).unwrap().free_blocks, 56);
        assert!(l.card(2).unwrap().is_free());
    }

    #[test]
    fn preferred_ids_fill_the_chosen_card_lowest_first_after_must_include() {
        let available: Vec<String> = [ids("vcore", 0, 0..100), ids("vcore", 1, 0..100)].concat();
        let must = vec!["vcore-1-50".to_string()];
        let got = preferred_ids(DeviceKind::Core, &available, &must, 4, &[1]);
        assert_eq!(got, ["vcore-1-50", "vcore-1-0", "vcore-1-1", "vcore-1-2"]);
        // k is ordered numerically, not as text.
        let avail = vec!["vcore-0-10".to_string(), "vcore-0-9".to_string()];
        assert_eq!(
            preferred_ids(DeviceKind::Core, &avail, &[], 2, &[0]),
            ["vcore-0-9", "vcore-0-10"]
        );
    }

    #[test]
    fn preferred_ids_fill_a_shortfall_from_the_fullest_other_card() {
        let available: Vec<String> = [
            ids("vmem", 0, 0..2),
            ids("vmem", 1, 0..5),
            ids("vmem", 2, 0..3),
        ]
        .concat();
        let got = preferred_ids(DeviceKind::Memory, &available, &[], 4, &[0]);
        assert_eq!(got, ["vmem-0-0", "vmem-0-1", "vmem-1-0", "vmem-1-1"]);
        // Never more than is available.
        assert_eq!(
            preferred_ids(DeviceKind::Memory, &available, &[], 50, &[]).len(),
            10
        );
    }

    #[test]
    fn cards_with_room_follow_the_available_ids() {
        assert_eq!(
            cards_with_room(
                &[100, 40, 0],
                GpuRequest::Share {
                    cores: 40,
                    blocks: 1
                }
            ),
            0b011
        );
        assert_eq!(
            cards_with_room(&[100, 40, 0], GpuRequest::Whole { cards: 1 }),
            0b001
        );
    }

    fn cand<'a>(
        time: u64,
        pod: &'a str,
        slot: Slot,
        request: GpuRequest,
        cards: Option<&'a [u32]>,
    ) -> Candidate<'a> {
        Candidate {
            time,
            namespace: "ns",
            pod,
            slot,
            request,
            cards,
        }
    }

    #[test]
    fn matching_takes_the_earliest_pod_of_the_right_size() {
        let share = GpuRequest::Share {
            cores: 30,
            blocks: 4,
        };
        let c = [
            cand(5, "late", Slot::App(0), share, None),
            cand(
                1,
                "whole",
                Slot::App(0),
                GpuRequest::Whole { cards: 1 },
                None,
            ),
            cand(2, "early", Slot::App(1), share, None),
            cand(2, "early", Slot::Init(0), share, None),
        ];
        assert_eq!(
            match_container(&c, DeviceKind::Core, 30, None),
            Some((3, MatchQuality::Unknown))
        );
        assert_eq!(
            match_container(&c, DeviceKind::Memory, 4, None),
            Some((3, MatchQuality::Unknown))
        );
        assert_eq!(
            match_container(&c, DeviceKind::Core, 100, None),
            Some((1, MatchQuality::Unknown))
        );
        assert_eq!(match_container(&c, DeviceKind::Core, 31, None), None);
    }

    #[test]
    fn matching_uses_the_cards_to_tell_same_sized_pods_apart() {
        let share = GpuRequest::Share {
            cores: 30,
            blocks: 4,
        };
        let (on2, on5) = ([2u32], [5u32]);
        let c = [
            cand(1, "a", Slot::App(0), share, Some(&on2)),
            cand(2, "b", Slot::App(0), share, Some(&on5)),
            cand(3, "c", Slot::App(0), share, None),
        ];
        assert_eq!(
            match_container(&c, DeviceKind::Core, 30, Some(&[5])),
            Some((1, MatchQuality::Agrees))
        );
        assert_eq!(
            match_container(&c, DeviceKind::Core, 30, Some(&[7])),
            Some((2, MatchQuality::Unassigned))
        );
        assert_eq!(
            match_container(&c[..2], DeviceKind::Core, 30, Some(&[7])),
            Some((0, MatchQuality::Disagrees))
        );
    }

    fn any_request() -> impl Strategy<Value = GpuRequest> {
        prop_oneof![
            (1u32..100, 1u32..16).prop_map(|(cores, blocks)| GpuRequest::Share { cores, blocks }),
            (1u32..4).prop_map(|cards| GpuRequest::Whole { cards }),
        ]
    }

    proptest! {
        /// Confusability does not depend on which side is asked or on the order of the
        /// containers, and a container on its own cards is never confused with itself.
        #[test]
        fn confusable_is_symmetric_and_matches_the_size_and_card_rule(
            a in prop::collection::vec((any_request(), prop::collection::vec(0u32..4, 1..3)), 0..4),
            b in prop::collection::vec((any_request(), prop::collection::vec(0u32..4, 1..3)), 0..4),
        ) {
            let xs: Vec<AwaitingContainer<'_>> =
                a.iter().map(|(r, c)| AwaitingContainer { request: *r, cards: c }).collect();
            let ys: Vec<AwaitingContainer<'_>> =
                b.iter().map(|(r, c)| AwaitingContainer { request: *r, cards: c }).collect();
            let ab = confusable(&xs, &ys).is_some();
            prop_assert_eq!(ab, confusable(&ys, &xs).is_some());
            // Swapping the containers of one side's pods changes nothing either.
            let mut xr = xs.clone();
            xr.reverse();
            prop_assert_eq!(ab, confusable(&xr, &ys).is_some());
            // A container is never confusable with itself on the same cards.
            prop_assert!(xs.iter().all(|x| confusable(&[*x], &[*x]).is_none()));
        }

        /// Any set survives the compact form, and the parsed form of its IDs is the set.
        #[test]
        fn compact_form_round_trips(
            entries in prop::collection::btree_set((0u32..3, 0u32..64), 1..120)
        ) {
            let inv = node();
            let mut set = IdSet::default();
            for (c, k) in &entries {
                set.insert(*c, *k % DeviceKind::Memory.per_card(&inv, *c));
            }
            let enc = set.encode();
            prop_assert_eq!(IdSet::decode(&enc, 10_000), Ok(set.clone()));
            let strings = set.ids(DeviceKind::Memory);
            prop_assert_eq!(IdSet::parse(DeviceKind::Memory, &strings, &inv), Ok(set));
        }

        /// Preferred IDs never exceed the size, never repeat, and only come from the inputs.
        #[test]
        fn preferred_ids_are_a_subset_of_size(
            avail in prop::collection::vec((0u32..3, 0u32..100), 0..150),
            size in 0usize..120,
            cards in prop::collection::vec(0u32..4, 0..3),
        ) {
            let available: Vec<String> =
                avail.iter().map(|(c, k)| format!("vcore-{c}-{k}")).collect();
            let got = preferred_ids(DeviceKind::Core, &available, &[], size, &cards);
            let distinct: BTreeSet<&String> = available.iter().collect();
            prop_assert!(got.len() <= size);
            prop_assert_eq!(got.len(), size.min(distinct.len()));
            let uniq: BTreeSet<&String> = got.iter().collect();
            prop_assert_eq!(uniq.len(), got.len());
            prop_assert!(got.iter().all(|g| distinct.contains(g)));
        }
    }
}
