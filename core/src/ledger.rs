//! Free vcuda-core and memory blocks per card, for one node.
//!
//! The ledger is pure accounting: it says what is free and refuses any charge that would make a
//! card negative or exceed its capacity. Health and user constraints are placement concerns
//! ([`crate::placement`]); a holding recovered from state is always accepted if it fits.

use std::collections::BTreeMap;
use std::fmt;

use crate::inventory::NodeInventory;
use crate::request::{PodGpuRequest, Slot};
use crate::resources::CORES_PER_CARD;

/// What a holder takes from one card.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Charge {
    /// The whole card: all cores and all memory. Only a completely free card can be taken.
    Whole,
    /// A share: `cores` in 1..=99 and `blocks` memory blocks (may be 0 in tests).
    Share { cores: u32, blocks: u32 },
}

impl Charge {
    /// The larger of two charges on the same card (per resource), for init containers, which
    /// run one at a time before the others.
    pub fn peak(self, other: Charge) -> Charge {
        match (self, other) {
            (Charge::Whole, _) | (_, Charge::Whole) => Charge::Whole,
            (
                Charge::Share {
                    cores: a,
                    blocks: b,
                },
                Charge::Share {
                    cores: c,
                    blocks: d,
                },
            ) => Charge::Share {
                cores: a.max(c),
                blocks: b.max(d),
            },
        }
    }
}

/// One card's part of an assignment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CardCharge {
    pub card: u32,
    pub charge: Charge,
}

/// A set of charges, at most one per card, sorted by card.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Assignment {
    charges: Vec<CardCharge>,
}

impl Assignment {
    /// Combine charges that run side by side: shares on one card add up; a whole card cannot
    /// be combined with anything else on that card.
    pub fn new(charges: impl IntoIterator<Item = CardCharge>) -> Result<Self, LedgerError> {
        let mut by_card: BTreeMap<u32, Charge> = BTreeMap::new();
        for c in charges {
            let merged = match (by_card.get(&c.card).copied(), c.charge) {
                (None, ch) => ch,
                (
                    Some(Charge::Share {
                        cores: a,
                        blocks: b,
                    }),
                    Charge::Share { cores, blocks },
                ) => Charge::Share {
                    cores: a.saturating_add(cores),
                    blocks: b.saturating_add(blocks),
                },
                _ => return Err(LedgerError::WholeCardShared { card: c.card }),
            };
            by_card.insert(c.card, merged);
        }
        Ok(Self {
            charges: by_card
                .into_iter()
                .map(|(card, charge)| CardCharge { card, charge })
                .collect(),
        })
    }

    /// One share of one card.
    pub fn share(card: u32, cores: u32, blocks: u32) -> Self {
        Self {
            charges: vec![CardCharge {
                card,
                charge: Charge::Share { cores, blocks },
            }],
        }
    }

    /// Whole cards.
    pub fn whole(cards: &[u32]) -> Self {
        let mut v: Vec<u32> = cards.to_vec();
        v.sort_unstable();
        v.dedup();
        Self {
            charges: v
                .into_iter()
                .map(|card| CardCharge {
                    card,
                    charge: Charge::Whole,
                })
                .collect(),
        }
    }

    pub fn charges(&self) -> &[CardCharge] {
        &self.charges
    }

    pub fn cards(&self) -> impl Iterator<Item = u32> + '_ {
        self.charges.iter().map(|c| c.card)
    }

    pub fn is_empty(&self) -> bool {
        self.charges.is_empty()
    }

    pub fn charge_on(&self, card: u32) -> Option<Charge> {
        self.charges
            .iter()
            .find(|c| c.card == card)
            .map(|c| c.charge)
    }
}

impl fmt::Display for Assignment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self
            .charges
            .iter()
            .map(|c| match c.charge {
                Charge::Whole => format!("card {} (whole)", c.card),
                Charge::Share { cores, blocks } => {
                    format!("card {} ({cores} vcuda-core, {blocks} blocks)", c.card)
                }
            })
            .collect();
        f.write_str(&parts.join(", "))
    }
}

/// A charge the ledger refused, with the numbers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LedgerError {
    #[error("card {card} does not exist: the node has {cards} cards")]
    UnknownCard { card: u32, cards: usize },
    #[error("card {card}: {free_cores} vcuda-core and {free_blocks} memory blocks free, {cores} and {blocks} requested")]
    Insufficient {
        card: u32,
        free_cores: u32,
        free_blocks: u32,
        cores: u32,
        blocks: u32,
    },
    #[error("card {card} is not completely free ({free_cores} of 100 vcuda-core, {free_blocks} of {total_blocks} blocks free), so it cannot be taken whole")]
    NotWhollyFree {
        card: u32,
        free_cores: u32,
        free_blocks: u32,
        total_blocks: u32,
    },
    #[error("card {card} is taken whole and cannot also be shared in the same assignment")]
    WholeCardShared { card: u32 },
    #[error("card {card}: releasing {what} would exceed its capacity; the release does not match an allocation")]
    OverRelease { card: u32, what: String },
    #[error("{holder} already holds {held}; it cannot also take {requested}")]
    AlreadyHeld {
        holder: String,
        held: String,
        requested: String,
    },
    #[error("{slot} has no card assignment")]
    MissingCards { slot: Slot },
    #[error("{slot} asks for {request} but its assignment lists cards {cards:?}")]
    WrongCardCount {
        slot: Slot,
        request: String,
        cards: Vec<u32>,
    },
}

/// Capacity and free amounts of one card.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CardState {
    pub total_blocks: u32,
    pub free_cores: u32,
    pub free_blocks: u32,
}

impl CardState {
    pub fn new(total_blocks: u32) -> Self {
        Self {
            total_blocks,
            free_cores: CORES_PER_CARD,
            free_blocks: total_blocks,
        }
    }

    /// Nothing allocated on the card.
    pub fn is_free(&self) -> bool {
        self.free_cores == CORES_PER_CARD && self.free_blocks == self.total_blocks
    }

    pub fn used_cores(&self) -> u32 {
        CORES_PER_CARD - self.free_cores
    }

    pub fn used_blocks(&self) -> u32 {
        self.total_blocks - self.free_blocks
    }
}

/// Free vcuda-core and memory blocks per card of one node.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NodeLedger {
    cards: Vec<CardState>,
}

impl NodeLedger {
    /// An empty ledger for the node's cards.
    pub fn new(inv: &NodeInventory) -> Self {
        Self::from_blocks(inv.cards.iter().map(|c| c.blocks()))
    }

    /// An empty ledger for cards with these block counts.
    pub fn from_blocks(blocks: impl IntoIterator<Item = u32>) -> Self {
        Self {
            cards: blocks.into_iter().map(CardState::new).collect(),
        }
    }

    pub fn cards(&self) -> &[CardState] {
        &self.cards
    }

    pub fn card(&self, card: u32) -> Option<&CardState> {
        self.cards.get(card as usize)
    }

    pub fn len(&self) -> usize {
        self.cards.len()
    }

    pub fn is_empty(&self) -> bool {
        self.cards.is_empty()
    }

    /// Sum of free vcuda-core over all cards.
    pub fn free_cores(&self) -> u64 {
        self.cards.iter().map(|c| u64::from(c.free_cores)).sum()
    }

    /// Sum of free memory blocks over all cards.
    pub fn free_blocks(&self) -> u64 {
        self.cards.iter().map(|c| u64::from(c.free_blocks)).sum()
    }

    pub fn total_blocks(&self) -> u64 {
        self.cards.iter().map(|c| u64::from(c.total_blocks)).sum()
    }

    /// Bit mask of completely free cards.
    pub fn free_mask(&self) -> u64 {
        self.cards
            .iter()
            .enumerate()
            .take(64)
            .filter(|(_, c)| c.is_free())
            .fold(0, |m, (i, _)| m | (1u64 << i))
    }

    /// Would `a` fit? Checks every card before anything changes.
    pub fn check(&self, a: &Assignment) -> Result<(), LedgerError> {
        for cc in a.charges() {
            let st = self.state(cc.card)?;
            match cc.charge {
                Charge::Whole => {
                    if !st.is_free() {
                        return Err(LedgerError::NotWhollyFree {
                            card: cc.card,
                            free_cores: st.free_cores,
                            free_blocks: st.free_blocks,
                            total_blocks: st.total_blocks,
                        });
                    }
                }
                Charge::Share { cores, blocks } => {
                    if cores > st.free_cores || blocks > st.free_blocks {
                        return Err(LedgerError::Insufficient {
                            card: cc.card,
                            free_cores: st.free_cores,
                            free_blocks: st.free_blocks,
                            cores,
                            blocks,
                        });
                    }
                }
            }
        }
        Ok(())
    }

    /// Take `a`, all or nothing.
    pub fn allocate(&mut self, a: &Assignment) -> Result<(), LedgerError> {
        self.check(a)?;
        for cc in a.charges() {
            let st = &mut self.cards[cc.card as usize];
            match cc.charge {
                Charge::Whole => {
                    st.free_cores = 0;
                    st.free_blocks = 0;
                }
                Charge::Share { cores, blocks } => {
                    st.free_cores -= cores;
                    st.free_blocks -= blocks;
                }
            }
        }
        Ok(())
    }

    /// Give `a` back, all or nothing. Refuses a release that would exceed capacity (it cannot
    /// match an allocation).
    pub fn release(&mut self, a: &Assignment) -> Result<(), LedgerError> {
        for cc in a.charges() {
            let st = self.state(cc.card)?;
            let ok = match cc.charge {
                Charge::Whole => st.free_cores == 0 && st.free_blocks == 0,
                Charge::Share { cores, blocks } => {
                    st.free_cores + cores <= CORES_PER_CARD
                        && u64::from(st.free_blocks) + u64::from(blocks)
                            <= u64::from(st.total_blocks)
                }
            };
            if !ok {
                return Err(LedgerError::OverRelease {
                    card: cc.card,
                    what: cc.to_string(),
                });
            }
        }
        for cc in a.charges() {
            let st = &mut self.cards[cc.card as usize];
            match cc.charge {
                Charge::Whole => {
                    st.free_cores = CORES_PER_CARD;
                    st.free_blocks = st.total_blocks;
                }
                Charge::Share { cores, blocks } => {
                    st.free_cores += cores;
                    st.free_blocks += blocks;
                }
            }
        }
        Ok(())
    }

    fn state(&self, card: u32) -> Result<&CardState, LedgerError> {
        self.cards
            .get(card as usize)
            .ok_or(LedgerError::UnknownCard {
                card,
                cards: self.cards.len(),
            })
    }
}

impl fmt::Display for CardCharge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.charge {
            Charge::Whole => write!(f, "the whole of card {}", self.card),
            Charge::Share { cores, blocks } => write!(
                f,
                "{cores} vcuda-core and {blocks} blocks of card {}",
                self.card
            ),
        }
    }
}

/// The charges of a whole pod given its card indices per container slot, counted the kubelet's
/// way: long-running containers (app containers and sidecars) add up; each regular init
/// container runs alone, so a card carries the larger of its charge and theirs.
pub fn pod_assignment(
    pod: &PodGpuRequest,
    cards: &BTreeMap<Slot, Vec<u32>>,
) -> Result<Assignment, LedgerError> {
    let mut long = Vec::new();
    let mut inits: Vec<Assignment> = Vec::new();
    for c in &pod.containers {
        let list = cards
            .get(&c.slot)
            .ok_or(LedgerError::MissingCards { slot: c.slot })?;
        let charges = container_charges(c.slot, &c.request, list)?;
        if c.long_running() {
            long.extend(charges);
        } else {
            inits.push(Assignment::new(charges)?);
        }
    }
    let steady = Assignment::new(long)?;
    let mut per_card: BTreeMap<u32, Charge> = steady
        .charges()
        .iter()
        .map(|c| (c.card, c.charge))
        .collect();
    for init in &inits {
        for cc in init.charges() {
            per_card
                .entry(cc.card)
                .and_modify(|ch| *ch = ch.peak(cc.charge))
                .or_insert(cc.charge);
        }
    }
    Ok(Assignment {
        charges: per_card
            .into_iter()
            .map(|(card, charge)| CardCharge { card, charge })
            .collect(),
    })
}

/// The charges of one container on the listed cards.
pub fn container_charges(
    slot: Slot,
    request: &crate::request::GpuRequest,
    cards: &[u32],
) -> Result<Vec<CardCharge>, LedgerError> {
    use crate::request::GpuRequest;
    let wrong = || LedgerError::WrongCardCount {
        slot,
        request: request.to_string(),
        cards: cards.to_vec(),
    };
    match *request {
        GpuRequest::Share { cores, blocks } => match cards {
            [card] => Ok(vec![CardCharge {
                card: *card,
                charge: Charge::Share { cores, blocks },
            }]),
            _ => Err(wrong()),
        },
        GpuRequest::Whole { cards: n } => {
            let mut v = cards.to_vec();
            v.sort_unstable();
            v.dedup();
            if v.len() != n as usize {
                return Err(wrong());
            }
            Ok(v.into_iter()
                .map(|card| CardCharge {
                    card,
                    charge: Charge::Whole,
                })
                .collect())
        }
    }
}

/// A ledger plus who holds what, so holdings can be released by key and re-applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyedLedger<K: Ord> {
    ledger: NodeLedger,
    holdings: BTreeMap<K, Assignment>,
}

/// Result of [`KeyedLedger::allocate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AllocateOutcome {
    /// The charge was taken.
    Taken,
    /// The key already held exactly this assignment; nothing changed (a retry).
    AlreadyHeld,
}

impl<K: Ord + Clone + fmt::Display> KeyedLedger<K> {
    pub fn new(ledger: NodeLedger) -> Self {
        Self {
            ledger,
            holdings: BTreeMap::new(),
        }
    }

    pub fn ledger(&self) -> &NodeLedger {
        &self.ledger
    }

    pub fn holdings(&self) -> &BTreeMap<K, Assignment> {
        &self.holdings
    }

    pub fn get(&self, key: &K) -> Option<&Assignment> {
        self.holdings.get(key)
    }

    /// Take `a` for `key`. Idempotent for an identical retry; a different assignment for a key
    /// that already holds one is refused.
    pub fn allocate(&mut self, key: K, a: Assignment) -> Result<AllocateOutcome, LedgerError> {
        if let Some(held) = self.holdings.get(&key) {
            if *held == a {
                return Ok(AllocateOutcome::AlreadyHeld);
            }
            return Err(LedgerError::AlreadyHeld {
                holder: key.to_string(),
                held: held.to_string(),
                requested: a.to_string(),
            });
        }
        self.ledger.allocate(&a)?;
        self.holdings.insert(key, a);
        Ok(AllocateOutcome::Taken)
    }

    /// Give back what `key` holds, if anything.
    pub fn release(&mut self, key: &K) -> Option<Assignment> {
        let a = self.holdings.remove(key)?;
        // Holdings were charged on this ledger, so the release always matches.
        let released = self.ledger.release(&a);
        debug_assert!(released.is_ok(), "{released:?}");
        Some(a)
    }

    /// Replace the underlying cards (e.g. the inventory changed) and re-apply every holding in
    /// key order. Holdings that no longer fit are dropped and returned with the reason.
    pub fn rebase(&mut self, ledger: NodeLedger) -> Vec<(K, Assignment, LedgerError)> {
        self.ledger = ledger;
        let mut dropped = Vec::new();
        let holdings = std::mem::take(&mut self.holdings);
        for (k, a) in holdings {
            match self.ledger.allocate(&a) {
                Ok(()) => {
                    self.holdings.insert(k, a);
                }
                Err(e) => dropped.push((k, a, e)),
            }
        }
        dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::{ContainerGpu, GpuRequest};
    use proptest::prelude::*;

    fn ledger(n: usize, blocks: u32) -> NodeLedger {
        NodeLedger::from_blocks(std::iter::repeat_n(blocks, n))
    }

    #[test]
    fn a_share_reduces_only_its_card() {
        let mut l = ledger(2, 64);
        l.allocate(&Assignment::share(1, 30, 20)).unwrap();
        assert_eq!(l.card(1).unwrap().free_cores, 70);
        assert_eq!(l.card(1).unwrap().free_blocks, 44);
        assert!(l.card(0).unwrap().is_free());
        assert_eq!(l.free_cores(), 170);
    }

    #[test]
    fn a_whole_card_needs_a_completely_free_card() {
        let mut l = ledger(2, 64);
        l.allocate(&Assignment::share(0, 1, 0)).unwrap();
        let e = l.allocate(&Assignment::whole(&[0])).unwrap_err();
        assert!(e.to_string().contains("not completely free"), "{e}");
        l.allocate(&Assignment::whole(&[1])).unwrap();
        assert_eq!(l.card(1).unwrap().free_blocks, 0);
        assert_eq!(l.free_mask(), 0);
    }

    #[test]
    fn over_allocation_is_refused_with_the_numbers_and_changes_nothing() {
        let mut l = ledger(2, 8);
        l.allocate(&Assignment::share(0, 60, 4)).unwrap();
        let before = l.clone();
        let a = Assignment::new([
            CardCharge {
                card: 1,
                charge: Charge::Share {
                    cores: 10,
                    blocks: 1,
                },
            },
            CardCharge {
                card: 0,
                charge: Charge::Share {
                    cores: 50,
                    blocks: 1,
                },
            },
        ])
        .unwrap();
        let e = l.allocate(&a).unwrap_err();
        assert_eq!(
            e.to_string(),
            "card 0: 40 vcuda-core and 4 memory blocks free, 50 and 1 requested"
        );
        assert_eq!(l, before);
    }

    #[test]
    fn unknown_cards_and_over_release_are_refused() {
        let mut l = ledger(1, 8);
        assert!(matches!(
            l.allocate(&Assignment::whole(&[3])),
            Err(LedgerError::UnknownCard { card: 3, cards: 1 })
        ));
        assert!(matches!(
            l.release(&Assignment::share(0, 1, 0)),
            Err(LedgerError::OverRelease { .. })
        ));
        assert!(matches!(
            l.release(&Assignment::whole(&[0])),
            Err(LedgerError::OverRelease { .. })
        ));
    }

    #[test]
    fn shares_on_one_card_merge_but_a_whole_card_cannot_be_shared() {
        let a = Assignment::new([
            CardCharge {
                card: 0,
                charge: Charge::Share {
                    cores: 10,
                    blocks: 1,
                },
            },
            CardCharge {
                card: 0,
                charge: Charge::Share {
                    cores: 10,
                    blocks: 2,
                },
            },
        ])
        .unwrap();
        assert_eq!(
            a.charge_on(0),
            Some(Charge::Share {
                cores: 20,
                blocks: 3
            })
        );
        let e = Assignment::new([
            CardCharge {
                card: 0,
                charge: Charge::Whole,
            },
            CardCharge {
                card: 0,
                charge: Charge::Share {
                    cores: 1,
                    blocks: 1,
                },
            },
        ]);
        assert_eq!(e, Err(LedgerError::WholeCardShared { card: 0 }));
    }

    fn container(slot: Slot, request: GpuRequest, sidecar: bool) -> ContainerGpu {
        ContainerGpu {
            slot,
            name: format!("{slot}"),
            request,
            sidecar,
        }
    }

    #[test]
    fn pod_charges_take_the_larger_of_init_and_app_per_card() {
        let pod = PodGpuRequest {
            containers: vec![
                container(
                    Slot::Init(0),
                    GpuRequest::Share {
                        cores: 80,
                        blocks: 2,
                    },
                    false,
                ),
                container(
                    Slot::App(0),
                    GpuRequest::Share {
                        cores: 30,
                        blocks: 4,
                    },
                    false,
                ),
                container(
                    Slot::App(1),
                    GpuRequest::Share {
                        cores: 20,
                        blocks: 1,
                    },
                    false,
                ),
            ],
        };
        let cards: BTreeMap<Slot, Vec<u32>> = [
            (Slot::Init(0), vec![0]),
            (Slot::App(0), vec![0]),
            (Slot::App(1), vec![0]),
        ]
        .into();
        let a = pod_assignment(&pod, &cards).unwrap();
        assert_eq!(
            a.charge_on(0),
            Some(Charge::Share {
                cores: 80,
                blocks: 5
            })
        );
    }

    #[test]
    fn pod_charges_need_an_assignment_for_every_gpu_container() {
        let pod = PodGpuRequest::from_app_requests([Some(GpuRequest::Whole { cards: 2 })]);
        let e = pod_assignment(&pod, &BTreeMap::new()).unwrap_err();
        assert_eq!(e.to_string(), "containers[0] has no card assignment");
        let cards: BTreeMap<Slot, Vec<u32>> = [(Slot::App(0), vec![1])].into();
        let e = pod_assignment(&pod, &cards).unwrap_err();
        assert!(e.to_string().contains("2 whole cards"), "{e}");
    }

    #[test]
    fn keyed_ledger_retries_are_idempotent_and_conflicts_refused() {
        let mut k: KeyedLedger<String> = KeyedLedger::new(ledger(2, 8));
        let a = Assignment::share(0, 50, 2);
        assert_eq!(
            k.allocate("p".into(), a.clone()),
            Ok(AllocateOutcome::Taken)
        );
        assert_eq!(
            k.allocate("p".into(), a.clone()),
            Ok(AllocateOutcome::AlreadyHeld)
        );
        assert_eq!(k.ledger().card(0).unwrap().free_cores, 50);
        let e = k
            .allocate("p".into(), Assignment::share(1, 50, 2))
            .unwrap_err();
        assert!(e.to_string().starts_with("p already holds card 0"), "{e}");
        assert_eq!(k.release(&"p".into()), Some(a));
        assert!(k.ledger().card(0).unwrap().is_free());
        assert_eq!(k.release(&"p".into()), None);
    }

    #[test]
    fn rebase_drops_holdings_that_no_longer_fit() {
        let mut k: KeyedLedger<u32> = KeyedLedger::new(ledger(2, 8));
        k.allocate(1, Assignment::whole(&[0])).unwrap();
        k.allocate(2, Assignment::whole(&[1])).unwrap();
        let dropped = k.rebase(ledger(1, 8));
        assert_eq!(dropped.len(), 1);
        assert_eq!(dropped[0].0, 2);
        assert_eq!(k.holdings().len(), 1);
    }

    fn arb_charge(n: u32, blocks: u32) -> impl Strategy<Value = CardCharge> {
        (0..n, prop::bool::weighted(0.3), 1u32..100, 0..=blocks).prop_map(
            |(card, whole, cores, b)| CardCharge {
                card,
                charge: if whole {
                    Charge::Whole
                } else {
                    Charge::Share { cores, blocks: b }
                },
            },
        )
    }

    proptest! {
        /// Over any sequence of allocations and releases, no card ever goes negative or above
        /// capacity, a whole card is only ever taken when completely free, and releasing an
        /// allocation restores the ledger exactly.
        #[test]
        fn ledger_invariants_hold(
            ops in prop::collection::vec((arb_charge(4, 16), prop::bool::ANY), 1..60)
        ) {
            let mut l = ledger(4, 16);
            let mut held: Vec<Assignment> = Vec::new();
            for (cc, release) in ops {
                if release && !held.is_empty() {
                    let a = held.remove(0);
                    l.release(&a).unwrap();
                } else {
                    let a = Assignment::new([cc]).unwrap();
                    let before = l.clone();
                    let was_free = l.card(cc.card).unwrap().is_free();
                    match l.allocate(&a) {
                        Ok(()) => {
                            if cc.charge == Charge::Whole {
                                prop_assert!(was_free);
                            }
                            let mut undo = l.clone();
                            undo.release(&a).unwrap();
                            prop_assert_eq!(&undo, &before);
                            held.push(a);
                        }
                        Err(_) => prop_assert_eq!(&l, &before),
                    }
                }
                for c in l.cards() {
                    prop_assert!(c.free_cores <= 100);
                    prop_assert!(c.free_blocks <= c.total_blocks);
                }
            }
            for a in held.drain(..).rev() {
                l.release(&a).unwrap();
            }
            prop_assert_eq!(l, ledger(4, 16));
        }
    }
}
