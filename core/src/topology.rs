//! Link-quality domains of a node, derived from the link matrix.
//!
//! TKEStack builds a tree from NVML's PCIe common-ancestor levels (PIX < PXB < PHB < CPU < SYS)
//! and ignores NVLink. We build the same kind of tree, but:
//!
//! * from the full link rank ([`Link::rank`]): NVLink (more links = tighter) before PCIe;
//! * with NUMA as a sub-level: two cards on different NUMA nodes are one step looser than the
//!   same link within one NUMA node (this only matters for NVLink, since PCIe levels already say
//!   NODE/SYS);
//! * order-independently: a domain at threshold `t` is a connected component of the graph whose
//!   edges are the card pairs with rank ≤ `t` (TKEStack's joining depends on pair order).
//!
//! Domains at increasing thresholds are nested, so they form a tree: the root holds every card,
//! leaves are single cards. On TKEStack's T6 matrix this gives exactly its tree.

use crate::inventory::NodeInventory;

/// Rank of a card pair: link rank, plus one NUMA sub-step when the cards sit on different
/// known NUMA nodes. Lower is tighter.
pub fn pair_rank(inv: &NodeInventory, a: u32, b: u32) -> u32 {
    let link = inv.link(a, b).rank() * 2;
    let (ca, cb) = (&inv.cards[a as usize], &inv.cards[b as usize]);
    let cross_numa = matches!((ca.numa_node, cb.numa_node), (Some(x), Some(y)) if x != y);
    link + u32::from(cross_numa)
}

/// A set of cards connected by links no looser than `level`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Domain {
    /// Bit i set = card i is a member.
    pub members: u64,
    /// The pair-rank threshold this domain was formed at (lower = tighter).
    pub level: u32,
    /// Enclosing domain, `None` for the root.
    pub parent: Option<usize>,
    /// Directly enclosed domains (not single cards).
    pub children: Vec<usize>,
}

impl Domain {
    pub fn len(&self) -> u32 {
        self.members.count_ones()
    }

    pub fn is_empty(&self) -> bool {
        self.members == 0
    }

    pub fn contains(&self, card: u32) -> bool {
        card < 64 && self.members & (1u64 << card) != 0
    }
}

/// The domain tree of one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    domains: Vec<Domain>,
    /// Per card: the domains containing it, tightest first (ends with the root).
    chains: Vec<Vec<usize>>,
    root: Option<usize>,
}

impl Topology {
    /// Build the tree. Cost is O(n² log n) for n cards; compute it once per inventory.
    pub fn new(inv: &NodeInventory) -> Self {
        let n = inv.cards.len().min(64);
        let mut domains: Vec<Domain> = Vec::new();
        if n == 0 {
            return Self {
                domains,
                chains: Vec::new(),
                root: None,
            };
        }
        let mut pairs: Vec<(u32, u32, u32)> = Vec::new();
        for a in 0..n as u32 {
            for b in a + 1..n as u32 {
                pairs.push((pair_rank(inv, a, b), a, b));
            }
        }
        pairs.sort_unstable();
        // Kruskal-style sweep: after all pairs of one rank are joined, every component with at
        // least two cards that was not seen before becomes a domain at that rank.
        let mut parent: Vec<usize> = (0..n).collect();
        fn find(p: &mut [usize], mut x: usize) -> usize {
            while p[x] != x {
                p[x] = p[p[x]];
                x = p[x];
            }
            x
        }
        let mut i = 0;
        while i < pairs.len() {
            let level = pairs[i].0;
            while i < pairs.len() && pairs[i].0 == level {
                let (_, a, b) = pairs[i];
                let (ra, rb) = (find(&mut parent, a as usize), find(&mut parent, b as usize));
                if ra != rb {
                    parent[ra.max(rb)] = ra.min(rb);
                }
                i += 1;
            }
            let mut masks: Vec<u64> = vec![0; n];
            for c in 0..n {
                let r = find(&mut parent, c);
                masks[r] |= 1u64 << c;
            }
            for m in masks {
                if m.count_ones() >= 2 && !domains.iter().any(|d| d.members == m) {
                    domains.push(Domain {
                        members: m,
                        level,
                        parent: None,
                        children: Vec::new(),
                    });
                }
            }
        }
        let all: u64 = if n == 64 { u64::MAX } else { (1u64 << n) - 1 };
        if !domains.iter().any(|d| d.members == all) {
            // One card (no pairs): the root is that card's own domain.
            domains.push(Domain {
                members: all,
                level: u32::MAX,
                parent: None,
                children: Vec::new(),
            });
        }
        // Domains were created in non-decreasing level order and components only grow, so the
        // parent of a domain is the first later domain that contains it.
        for d in 0..domains.len() {
            let m = domains[d].members;
            let p = (d + 1..domains.len()).find(|&q| domains[q].members & m == m);
            domains[d].parent = p;
            if let Some(p) = p {
                domains[p].children.push(d);
            }
        }
        let root = domains.iter().position(|d| d.parent.is_none());
        let chains = (0..n as u32)
            .map(|c| {
                let mut chain: Vec<usize> = (0..domains.len())
                    .filter(|&d| domains[d].contains(c))
                    .collect();
                chain.sort_by_key(|&d| (domains[d].len(), domains[d].level));
                chain
            })
            .collect();
        Self {
            domains,
            chains,
            root,
        }
    }

    pub fn domains(&self) -> &[Domain] {
        &self.domains
    }

    pub fn root(&self) -> Option<usize> {
        self.root
    }

    /// Domains containing `card`, tightest first, ending with the root.
    pub fn chain(&self, card: u32) -> &[usize] {
        self.chains.get(card as usize).map_or(&[], Vec::as_slice)
    }

    /// The level of the tightest domain containing every card of `mask` (0 for one card).
    pub fn span_level(&self, mask: u64) -> u32 {
        if mask.count_ones() <= 1 {
            return 0;
        }
        let first = mask.trailing_zeros();
        self.chain(first)
            .iter()
            .map(|&d| &self.domains[d])
            .find(|d| d.members & mask == mask)
            .map_or(u32::MAX, |d| d.level)
    }
}

/// Indices of the set bits of `mask`, ascending.
pub fn bits(mask: u64) -> impl Iterator<Item = u32> {
    let mut m = mask;
    std::iter::from_fn(move || {
        if m == 0 {
            None
        } else {
            let b = m.trailing_zeros();
            m &= m - 1;
            Some(b)
        }
    })
}

/// The lowest `n` set bits of `mask`, or `None` when it has fewer.
pub fn lowest_bits(mask: u64, n: u32) -> Option<Vec<u32>> {
    if mask.count_ones() < n {
        return None;
    }
    Some(bits(mask).take(n as usize).collect())
}

/// TKEStack's `link` evaluator, generalised: for N ≥ 2 whole cards, each card proposes the
/// tightest domain around it that still has N free cards; the tightest proposal wins, then the
/// one with the fewest free cards (best fit), then the lowest free card index. The first N free
/// cards of the winner, by index, are taken.
pub fn link(topo: &Topology, free: u64, n: u32) -> Option<Vec<u32>> {
    if n == 0 || free.count_ones() < n {
        return None;
    }
    let mut best: Option<(u32, u32, u32, u64)> = None;
    for chain in &topo.chains {
        let Some(d) = chain
            .iter()
            .map(|&d| &topo.domains[d])
            .find(|d| (d.members & free).count_ones() >= n)
        else {
            continue;
        };
        let avail = d.members & free;
        let key = (d.level, avail.count_ones(), avail.trailing_zeros(), avail);
        if best.is_none_or(|b| (key.0, key.1, key.2) < (b.0, b.1, b.2)) {
            best = Some(key);
        }
    }
    best.and_then(|(_, _, _, avail)| lowest_bits(avail, n))
}

/// TKEStack's `fragment` evaluator: starting at the root, descend into the child domain with
/// the fewest free cards that still has N (ties: lowest free index), while such a child exists;
/// then take the first N free cards of the domain reached. Single-card jobs thereby fill the
/// most-used corner and keep large free domains intact for multi-card jobs.
pub fn fragment(topo: &Topology, free: u64, n: u32) -> Option<Vec<u32>> {
    let mut cur = topo.root?;
    if (topo.domains[cur].members & free).count_ones() < n || n == 0 {
        return None;
    }
    loop {
        let next = topo.domains[cur]
            .children
            .iter()
            .map(|&c| (c, topo.domains[c].members & free))
            .filter(|(_, avail)| avail.count_ones() >= n)
            .min_by_key(|(_, avail)| (avail.count_ones(), avail.trailing_zeros()));
        match next {
            Some((c, _)) => cur = c,
            None => break,
        }
    }
    lowest_bits(topo.domains[cur].members & free, n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::{Card, Link};

    /// TKEStack's canonical six-card matrix (reference gpu-manager.md §6.3).
    pub(crate) fn t6() -> NodeInventory {
        let rows = [
            "X PIX PHB PHB SOC SOC",
            "PIX X PHB PHB SOC SOC",
            "PHB PHB X PIX SOC SOC",
            "PHB PHB PIX X SOC SOC",
            "SOC SOC SOC SOC X PIX",
            "SOC SOC SOC SOC PIX X",
        ];
        matrix_inventory(&rows, &[None; 6])
    }

    pub(crate) fn matrix_inventory(rows: &[&str], numa: &[Option<u32>]) -> NodeInventory {
        let links: Vec<Vec<Link>> = rows
            .iter()
            .map(|r| r.split_whitespace().map(|t| t.parse().unwrap()).collect())
            .collect();
        let cards = (0..rows.len() as u32)
            .map(|i| Card {
                index: i,
                uuid: format!("GPU-{i}"),
                model: "Tesla T4".into(),
                memory_mib: 1024,
                minor: i,
                numa_node: numa[i as usize],
                pci_bus_id: String::new(),
                healthy: true,
            })
            .collect();
        NodeInventory::new(cards, links).unwrap()
    }

    fn mask(cards: &[u32]) -> u64 {
        cards.iter().fold(0, |m, c| m | (1 << c))
    }

    #[test]
    fn t6_builds_tkestacks_tree() {
        let topo = Topology::new(&t6());
        let sets: Vec<u64> = topo.domains().iter().map(|d| d.members).collect();
        assert_eq!(
            sets,
            vec![
                mask(&[0, 1]),
                mask(&[2, 3]),
                mask(&[4, 5]),
                mask(&[0, 1, 2, 3]),
                mask(&[0, 1, 2, 3, 4, 5])
            ]
        );
        let root = topo.root().unwrap();
        let mut kids: Vec<u64> = topo.domains()[root]
            .children
            .iter()
            .map(|&c| topo.domains()[c].members)
            .collect();
        kids.sort_unstable();
        assert_eq!(kids, vec![mask(&[0, 1, 2, 3]), mask(&[4, 5])]);
        assert_eq!(topo.chain(4).len(), 2);
    }

    #[test]
    fn tree_does_not_depend_on_pair_order() {
        // Cards 0-2 and 1-3 tight, 0-1 looser: union-find joins regardless of listing order.
        let rows = [
            "X PHB PIX SYS",
            "PHB X SYS PIX",
            "PIX SYS X SYS",
            "SYS PIX SYS X",
        ];
        let topo = Topology::new(&matrix_inventory(&rows, &[None; 4]));
        let sets: Vec<u64> = topo.domains().iter().map(|d| d.members).collect();
        assert_eq!(
            sets,
            vec![mask(&[0, 2]), mask(&[1, 3]), mask(&[0, 1, 2, 3])]
        );
    }

    #[test]
    fn numa_splits_an_nvlink_mesh() {
        let n = 8;
        let rows: Vec<String> = (0..n)
            .map(|i| {
                (0..n)
                    .map(|j| if i == j { "X" } else { "NV18" })
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect();
        let rows: Vec<&str> = rows.iter().map(String::as_str).collect();
        let numa: Vec<Option<u32>> = (0..n).map(|i| Some(u32::from(i >= 4))).collect();
        let topo = Topology::new(&matrix_inventory(&rows, &numa));
        let sets: Vec<u64> = topo.domains().iter().map(|d| d.members).collect();
        assert_eq!(sets, vec![mask(&[0, 1, 2, 3]), mask(&[4, 5, 6, 7]), 0xff]);
        // Two cards with 3 and 4,5 free: stay on one NUMA node.
        assert_eq!(link(&topo, mask(&[3, 4, 5]), 2), Some(vec![4, 5]));
    }

    #[test]
    fn single_card_node_has_a_root() {
        let topo = Topology::new(&matrix_inventory(&["X"], &[None]));
        assert_eq!(topo.root(), Some(0));
        assert_eq!(fragment(&topo, 1, 1), Some(vec![0]));
        assert_eq!(link(&topo, 1, 2), None);
    }

    #[test]
    fn span_level_reports_the_tightest_enclosing_domain() {
        let inv = t6();
        let topo = Topology::new(&inv);
        assert_eq!(span_level_rank(&topo, &[0, 1]), Link::Pix.rank() * 2);
        assert_eq!(span_level_rank(&topo, &[0, 2]), Link::Phb.rank() * 2);
        assert_eq!(span_level_rank(&topo, &[0, 4]), Link::Node.rank() * 2);
        assert_eq!(span_level_rank(&topo, &[3]), 0);
    }

    fn span_level_rank(topo: &Topology, cards: &[u32]) -> u32 {
        topo.span_level(mask(cards))
    }

    #[test]
    fn bit_helpers() {
        assert_eq!(bits(0b1011).collect::<Vec<_>>(), vec![0, 1, 3]);
        assert_eq!(lowest_bits(0b1011, 2), Some(vec![0, 1]));
        assert_eq!(lowest_bits(0b1011, 4), None);
    }
}
