//! Placement policy benches: one pod on one 8-card node, and one pod over 1,000 nodes.
//!
//! Run: `cargo bench -p gm-benches --bench placement`

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use gm_core::annotations::CardFilter;
use gm_core::placement::{choose_node, place, NodeView};
use gm_core::topology::Topology;
use gm_core::{Assignment, GpuRequest, Link, NodeInventory, NodeLedger, PodGpuRequest, Policy};

fn h100() -> NodeInventory {
    let mut inv = NodeInventory::uniform(8, "NVIDIA H100 80GB HBM3", 81559, Link::NvLink(18));
    for c in &mut inv.cards {
        c.numa_node = Some(c.index / 4);
    }
    inv
}

/// A node with some cards partly used, some whole, some free.
fn busy_ledger(inv: &NodeInventory, seed: u32) -> NodeLedger {
    let mut l = NodeLedger::new(inv);
    for card in 0..inv.len() as u32 {
        match (card + seed) % 4 {
            0 => l
                .allocate(&Assignment::share(card, 30 + (seed % 40), 40))
                .unwrap(),
            1 => l.allocate(&Assignment::whole(&[card])).unwrap(),
            2 => l.allocate(&Assignment::share(card, 70, 100)).unwrap(),
            _ => {}
        }
    }
    l
}

fn requests() -> Vec<(&'static str, GpuRequest)> {
    vec![
        (
            "share",
            GpuRequest::Share {
                cores: 25,
                blocks: 40,
            },
        ),
        ("whole1", GpuRequest::Whole { cards: 1 }),
        ("whole2", GpuRequest::Whole { cards: 2 }),
    ]
}

fn one_node(c: &mut Criterion) {
    let inv = h100();
    let topo = Topology::new(&inv);
    let ledger = busy_ledger(&inv, 1);
    let view = NodeView {
        name: "node",
        inventory: &inv,
        topology: &topo,
        ledger: &ledger,
    };
    let filter = CardFilter::default();
    let mut g = c.benchmark_group("place_one_pod_on_8_card_node");
    for policy in Policy::ALL {
        for (name, req) in requests() {
            let pod = PodGpuRequest::from_app_requests([Some(req)]);
            g.bench_with_input(BenchmarkId::new(policy.name(), name), &pod, |b, pod| {
                b.iter(|| place(policy, black_box(&view), black_box(pod), &filter))
            });
        }
    }
    g.finish();
}

fn thousand_nodes(c: &mut Criterion) {
    let inv = h100();
    let topo = Topology::new(&inv);
    let names: Vec<String> = (0..1000).map(|i| format!("node-{i:04}")).collect();
    let ledgers: Vec<NodeLedger> = (0..1000).map(|i| busy_ledger(&inv, i)).collect();
    let views: Vec<NodeView<'_>> = (0..1000)
        .map(|i| NodeView {
            name: &names[i],
            inventory: &inv,
            topology: &topo,
            ledger: &ledgers[i],
        })
        .collect();
    let filter = CardFilter::default();
    let mut g = c.benchmark_group("choose_node_over_1000_nodes");
    for policy in Policy::ALL {
        for (name, req) in requests() {
            let pod = PodGpuRequest::from_app_requests([Some(req)]);
            g.bench_with_input(BenchmarkId::new(policy.name(), name), &pod, |b, pod| {
                b.iter(|| choose_node(policy, black_box(&views), black_box(pod), &filter))
            });
        }
    }
    g.finish();
}

criterion_group!(benches, one_node, thousand_nodes);
criterion_main!(benches);
