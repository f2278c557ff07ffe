//! Golden cases from the systems we replace (reference/gpu-manager.md §6.9–6.10 and
//! reference/gpu-admission.md §6), as named tests.

use std::collections::BTreeMap;

use gm_core::annotations::{encode_placement, CardFilter, Keys};
use gm_core::inventory::{parse_matrix, Card, NodeInventory};
use gm_core::ledger::{AllocateOutcome, KeyedLedger};
use gm_core::placement::{choose_node, place, NodeView, Unfit};
use gm_core::request::{GpuRequest, PodGpuRequest, Slot};
use gm_core::topology::{fragment, link, Topology};
use gm_core::{Assignment, NodeLedger, Policy};

const T6: &str = "
    GPU0 GPU1 GPU2 GPU3 GPU4 GPU5
GPU0  X   PIX  PHB  PHB  SOC  SOC
GPU1 PIX   X   PHB  PHB  SOC  SOC
GPU2 PHB  PHB   X   PIX  SOC  SOC
GPU3 PHB  PHB  PIX   X   SOC  SOC
GPU4 SOC  SOC  SOC  SOC   X   PIX
GPU5 SOC  SOC  SOC  SOC  PIX   X
";

fn inventory(matrix: &str, memory_mib: u64) -> NodeInventory {
    let links = parse_matrix(matrix).unwrap();
    let cards = (0..links.len() as u32)
        .map(|i| Card {
            index: i,
            uuid: format!("GPU-{i}"),
            model: "Tesla P40".into(),
            memory_mib,
            minor: i,
            numa_node: None,
            pci_bus_id: String::new(),
            healthy: true,
        })
        .collect();
    NodeInventory::new(cards, links).unwrap()
}

fn t6() -> (NodeInventory, Topology) {
    let inv = inventory(T6, 1024);
    let topo = Topology::new(&inv);
    (inv, topo)
}

const ALL6: u64 = 0b11_1111;

fn without(mask: u64, cards: &[u32]) -> u64 {
    cards.iter().fold(mask, |m, c| m & !(1 << c))
}

// ---- gpu-manager §6.9 ----

#[test]
fn l1_link_300_on_fresh_t6_takes_the_phb_subtree_first_three() {
    let (_, topo) = t6();
    assert_eq!(link(&topo, ALL6, 3), Some(vec![0, 1, 2]));
}

#[test]
fn l2_link_200_with_card_2_busy_takes_cards_0_1() {
    let (_, topo) = t6();
    assert_eq!(link(&topo, without(ALL6, &[2]), 2), Some(vec![0, 1]));
}

#[test]
fn f1_fragment_200_on_fresh_t6_takes_the_smaller_subtree() {
    let (_, topo) = t6();
    assert_eq!(fragment(&topo, ALL6, 2), Some(vec![4, 5]));
}

#[test]
fn f2_fragment_100_with_card_4_busy_takes_card_5() {
    let (_, topo) = t6();
    assert_eq!(fragment(&topo, without(ALL6, &[4]), 1), Some(vec![5]));
}

#[test]
fn f3_fragment_100_on_a_single_card_takes_it() {
    let inv = inventory("GPU0\nGPU0 X", 1024);
    let topo = Topology::new(&inv);
    assert_eq!(fragment(&topo, 1, 1), Some(vec![0]));
}

fn share_on(ledger: &NodeLedger, cores: u32, blocks: u32) -> Option<u32> {
    gm_core::placement::share_pick(Policy::Topology, ledger, cores, blocks, u64::MAX)
}

#[test]
fn s1_share_50_on_fresh_cards_takes_card_0() {
    // TKEStack's cards had 1024 bytes of memory: zero whole blocks.
    let ledger = NodeLedger::from_blocks([0; 6]);
    assert_eq!(share_on(&ledger, 50, 0), Some(0));
}

#[test]
fn s2_share_60_after_50_on_card_0_takes_card_1() {
    let mut ledger = NodeLedger::from_blocks([0; 6]);
    ledger.allocate(&Assignment::share(0, 50, 0)).unwrap();
    assert_eq!(share_on(&ledger, 60, 0), Some(1));
}

/// Node-local allocation as gpu-manager does it: one keyed ledger, the `topology` policy.
struct Node {
    inv: NodeInventory,
    topo: Topology,
    ledger: KeyedLedger<String>,
}

impl Node {
    fn new(inv: NodeInventory) -> Self {
        let topo = Topology::new(&inv);
        let ledger = KeyedLedger::new(NodeLedger::new(&inv));
        Self { inv, topo, ledger }
    }

    fn allocate(&mut self, key: &str, request: GpuRequest) -> Result<Vec<u32>, Unfit> {
        let pod = PodGpuRequest::from_app_requests([Some(request)]);
        let view = NodeView {
            name: "n",
            inventory: &self.inv,
            topology: &self.topo,
            ledger: self.ledger.ledger(),
        };
        let p = place(Policy::Topology, &view, &pod, &CardFilter::default())?;
        self.ledger
            .allocate(key.to_string(), p.assignment.clone())
            .unwrap();
        Ok(p.cards[&Slot::App(0)].clone())
    }
}

fn share(cores: u32, blocks: u32) -> GpuRequest {
    GpuRequest::Share { cores, blocks }
}

fn whole(cards: u32) -> GpuRequest {
    GpuRequest::Whole { cards }
}

#[test]
fn a1_tkestack_allocator_sequence_ends_with_every_card_taken() {
    let mut n = Node::new(inventory(T6, 1024));
    assert_eq!(n.allocate("pod-1/c0", whole(3)).unwrap(), vec![0, 1, 2]);
    assert_eq!(n.allocate("pod-2/c0", whole(1)).unwrap(), vec![3]);
    assert_eq!(n.allocate("pod-2/c1", whole(1)).unwrap(), vec![4]);
    assert_eq!(n.allocate("pod-3/c0", whole(1)).unwrap(), vec![5]);
    n.ledger.release(&"pod-2/c0".to_string()).unwrap();
    n.ledger.release(&"pod-2/c1".to_string()).unwrap();
    assert_eq!(n.allocate("pod-4/c0", share(50, 1)).unwrap(), vec![3]);
    assert_eq!(n.allocate("pod-5/c0", share(60, 1)).unwrap(), vec![4]);
    assert_eq!(n.allocate("pod-6/c0", share(50, 1)).unwrap(), vec![3]);
    n.ledger.release(&"pod-5/c0".to_string()).unwrap();
    assert_eq!(n.allocate("pod-7/c0", whole(1)).unwrap(), vec![4]);
    let free: Vec<u32> = n
        .ledger
        .ledger()
        .cards()
        .iter()
        .map(|c| c.free_cores)
        .collect();
    assert_eq!(free, vec![0; 6]);
    assert_eq!(n.ledger.ledger().free_mask(), 0);
}

#[test]
fn allocating_the_same_container_twice_does_not_double_book() {
    let mut n = Node::new(inventory(T6, 1024));
    assert_eq!(
        n.allocate("pod/c", whole(6)).unwrap(),
        vec![0, 1, 2, 3, 4, 5]
    );
    let held = n.ledger.get(&"pod/c".to_string()).unwrap().clone();
    assert_eq!(
        n.ledger.allocate("pod/c".into(), held),
        Ok(AllocateOutcome::AlreadyHeld)
    );
    assert_eq!(n.ledger.ledger().free_cores(), 0);
    assert_eq!(n.ledger.holdings().len(), 1);
}

// ---- gpu-manager §6.10 ----

#[test]
fn six_successive_whole_cards_fill_t6_smallest_subtree_first() {
    let mut n = Node::new(inventory(T6, 1024));
    let picks: Vec<u32> = (0..6)
        .map(|i| n.allocate(&format!("p{i}"), whole(1)).unwrap()[0])
        .collect();
    assert_eq!(picks, vec![4, 5, 0, 1, 2, 3]);
}

#[test]
fn three_successive_card_pairs_take_the_three_pix_pairs() {
    let mut n = Node::new(inventory(T6, 1024));
    let picks: Vec<Vec<u32>> = (0..3)
        .map(|i| n.allocate(&format!("p{i}"), whole(2)).unwrap())
        .collect();
    assert_eq!(picks, vec![vec![0, 1], vec![2, 3], vec![4, 5]]);
}

#[test]
fn large_card_sets_on_fresh_t6_grow_by_index_within_the_tightest_domain() {
    let (_, topo) = t6();
    assert_eq!(link(&topo, ALL6, 4), Some(vec![0, 1, 2, 3]));
    assert_eq!(link(&topo, ALL6, 5), Some(vec![0, 1, 2, 3, 4]));
    assert_eq!(link(&topo, ALL6, 6), Some(vec![0, 1, 2, 3, 4, 5]));
}

#[test]
fn with_card_0_busy_four_cards_spill_to_the_cpu_domain_and_six_do_not_fit() {
    let (_, topo) = t6();
    let free = without(ALL6, &[0]);
    assert_eq!(link(&topo, free, 4), Some(vec![1, 2, 3, 4]));
    assert_eq!(link(&topo, free, 6), None);
}

// ---- gpu-admission §6.1: TestDeviceFilter ----

struct Cluster {
    names: Vec<String>,
    invs: Vec<NodeInventory>,
    topos: Vec<Topology>,
    ledgers: Vec<NodeLedger>,
}

impl Cluster {
    fn new(names: &[&str], invs: Vec<NodeInventory>) -> Self {
        let topos = invs.iter().map(Topology::new).collect();
        let ledgers = invs.iter().map(NodeLedger::new).collect();
        Self {
            names: names.iter().map(|s| s.to_string()).collect(),
            invs,
            topos,
            ledgers,
        }
    }

    fn views(&self) -> Vec<NodeView<'_>> {
        (0..self.names.len())
            .map(|i| NodeView {
                name: &self.names[i],
                inventory: &self.invs[i],
                topology: &self.topos[i],
                ledger: &self.ledgers[i],
            })
            .collect()
    }

    /// Schedule with binpack; returns the node name, the annotations written, and the reasons
    /// of the nodes that did not fit.
    fn schedule(
        &mut self,
        pod: &PodGpuRequest,
    ) -> (String, BTreeMap<String, String>, BTreeMap<String, String>) {
        let (choice, unfit) =
            choose_node(Policy::Binpack, &self.views(), pod, &CardFilter::default());
        let choice = choice.expect("pod fits somewhere");
        let unfit = unfit
            .into_iter()
            .map(|(i, e)| (self.names[i].clone(), e.to_string()))
            .collect();
        self.ledgers[choice.node]
            .allocate(&choice.placement.assignment)
            .unwrap();
        let name = self.names[choice.node].clone();
        let ann = encode_placement(&Keys::default(), &name, &choice.placement.cards, 1);
        (name, ann, unfit)
    }
}

fn idx(ann: &BTreeMap<String, String>, i: usize) -> Option<&str> {
    ann.get(&format!("tencent.com/predicate-gpu-idx-{i}"))
        .map(String::as_str)
}

#[test]
fn gpu_admission_device_filter_picks_testnode0_1_2_0() {
    // Three nodes, each 2 cards with 4 memory blocks (capacity vcuda-core=200, vcuda-memory=8).
    let inv = NodeInventory::uniform(2, "Tesla T4", 1024, gm_core::Link::Phb);
    let mut c = Cluster::new(
        &["testnode0", "testnode1", "testnode2"],
        vec![inv.clone(), inv.clone(), inv],
    );
    let pod = |reqs: &[Option<GpuRequest>]| PodGpuRequest::from_app_requests(reqs.to_vec());

    let (n, ann, unfit) = c.schedule(&pod(&[Some(share(10, 1)), Some(share(10, 1))]));
    assert_eq!(n, "testnode0");
    assert_eq!((idx(&ann, 0), idx(&ann, 1)), (Some("0"), Some("0")));
    assert_eq!(ann["tencent.com/predicate-node"], "testnode0");
    assert_eq!(ann["tencent.com/gpu-assigned"], "false");
    assert!(unfit.is_empty());

    let (n, ann, unfit) = c.schedule(&pod(&[Some(whole(1)), Some(share(80, 3))]));
    assert_eq!(n, "testnode1");
    assert_eq!((idx(&ann, 0), idx(&ann, 1)), (Some("0"), Some("1")));
    assert_eq!(
        unfit["testnode0"],
        "container \"c1\": card 0: 2 memory blocks free, 3 requested"
    );

    let (n, ann, _) = c.schedule(&pod(&[Some(whole(2)), None]));
    assert_eq!(n, "testnode2");
    assert_eq!((idx(&ann, 0), idx(&ann, 1)), (Some("0,1"), None));

    let (n, ann, unfit) = c.schedule(&pod(&[Some(share(10, 2)), None]));
    assert_eq!(n, "testnode0");
    assert_eq!(idx(&ann, 0), Some("0"));
    let failed: Vec<&String> = unfit.keys().collect();
    assert_eq!(failed, ["testnode1", "testnode2"]);
    assert_eq!(
        unfit["testnode1"],
        "container \"c0\": card 1: 1 memory blocks free, 2 requested"
    );
}

// ---- gpu-admission §6.2: derived cases on one 4-card node ----

fn node_x() -> (NodeInventory, Topology, NodeLedger) {
    let inv = NodeInventory::uniform(4, "Tesla T4", 16 * 256, gm_core::Link::Phb);
    let topo = Topology::new(&inv);
    let mut ledger = NodeLedger::new(&inv);
    ledger.allocate(&Assignment::share(2, 50, 4)).unwrap(); // pod A
    ledger.allocate(&Assignment::share(0, 30, 8)).unwrap(); // pod B
    (inv, topo, ledger)
}

fn place_x(reqs: &[Option<GpuRequest>]) -> BTreeMap<Slot, Vec<u32>> {
    let (inv, topo, ledger) = node_x();
    let view = NodeView {
        name: "X",
        inventory: &inv,
        topology: &topo,
        ledger: &ledger,
    };
    let pod = PodGpuRequest::from_app_requests(reqs.to_vec());
    place(Policy::Binpack, &view, &pod, &CardFilter::default())
        .unwrap()
        .cards
}

#[test]
fn binpack_share_goes_to_the_fullest_card_that_fits() {
    assert_eq!(place_x(&[Some(share(40, 4))])[&Slot::App(0)], vec![2]);
    assert_eq!(place_x(&[Some(share(40, 13))])[&Slot::App(0)], vec![1]);
}

#[test]
fn binpack_whole_cards_take_the_completely_free_ones() {
    assert_eq!(place_x(&[Some(whole(2))])[&Slot::App(0)], vec![1, 3]);
}

#[test]
fn binpack_later_containers_see_earlier_ones() {
    let cards = place_x(&[Some(share(60, 8)), Some(share(60, 8))]);
    assert_eq!(cards[&Slot::App(0)], vec![0]);
    assert_eq!(cards[&Slot::App(1)], vec![1]);
}

#[test]
fn binpack_tries_the_most_used_node_first() {
    let inv = NodeInventory::uniform(2, "Tesla T4", 16 * 256, gm_core::Link::Phb);
    let mut c = Cluster::new(&["P", "Q", "R"], vec![inv.clone(), inv.clone(), inv]);
    c.ledgers[0].allocate(&Assignment::share(0, 50, 1)).unwrap(); // P: 150 free
    c.ledgers[1].allocate(&Assignment::share(0, 50, 9)).unwrap(); // Q: 150 free, less memory
    c.ledgers[2].allocate(&Assignment::whole(&[0])).unwrap(); // R: 100 free
    c.ledgers[2].allocate(&Assignment::share(1, 50, 1)).unwrap(); // R: 50 free
    let pod = PodGpuRequest::from_app_requests([Some(share(10, 1))]);
    let mut order = Vec::new();
    for _ in 0..3 {
        let views = c.views();
        let (choice, _) = choose_node(Policy::Binpack, &views, &pod, &CardFilter::default());
        let i = choice.unwrap().node;
        order.push(c.names[i].clone());
        // Remove the winner from the next round by filling it up.
        let full: Vec<u32> = (0..2).collect();
        c.ledgers[i] = NodeLedger::new(&c.invs[i]);
        c.ledgers[i].allocate(&Assignment::whole(&full)).unwrap();
    }
    assert_eq!(order, ["R", "Q", "P"]);
}
