//! The simulated backend: example node files and scripted behaviour over (manual) time.

mod support;

use std::sync::Arc;
use std::time::Duration;

use gm_backend::node_file::NodeDescription;
use gm_backend::{
    BackendChoice, BackendError, Clock, GpuBackend, HealthEvent, HealthEventKind, ManualClock,
    ProbeResult, SimulatedBackend,
};
use gm_core::Link;
use proptest::prelude::*;
use support::{example_files, examples_dir};

fn example(name: &str) -> NodeDescription {
    NodeDescription::from_file(examples_dir().join(name)).expect("example parses")
}

fn on_manual_clock(name: &str) -> (SimulatedBackend, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new());
    (SimulatedBackend::new(example(name), clock.clone()), clock)
}

fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

#[test]
fn every_example_node_file_loads() {
    let names: Vec<String> = example_files()
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for want in [
        "h100-sxm-8.yaml",
        "h100-sxm-8-xid.yaml",
        "t4-pcie-4.yaml",
        "mixed-a100-v100.yaml",
        "t6.yaml",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "{want} missing from {names:?}"
        );
    }
    for file in example_files() {
        let b = BackendChoice::Simulated {
            node_file: file.clone(),
        }
        .open()
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(b.kind(), "simulated");
        let inv = b.inventory().unwrap();
        inv.validate().unwrap();
        assert!(inv.cards.iter().all(|c| c.healthy), "{}", file.display());
        assert!(
            inv.cards.iter().all(|c| !c.pci_bus_id.is_empty()),
            "{}",
            file.display()
        );
    }
}

#[test]
fn h100_example_is_an_nv18_mesh_split_over_two_numa_nodes() {
    let inv = example("h100-sxm-8.yaml").inventory();
    assert_eq!(inv.len(), 8);
    for c in &inv.cards {
        assert_eq!(c.model, "NVIDIA H100 80GB HBM3");
        assert_eq!(c.memory_mib, 81559);
        assert_eq!(c.numa_node, Some(if c.index < 4 { 0 } else { 1 }));
    }
    for i in 0..8 {
        for j in 0..8 {
            let want = if i == j {
                Link::SelfLink
            } else {
                Link::NvLink(18)
            };
            assert_eq!(inv.link(i, j), want);
        }
    }
}

#[test]
fn xid_example_has_the_same_cards_and_links_as_the_quick_start_file() {
    assert_eq!(
        example("h100-sxm-8-xid.yaml").inventory(),
        example("h100-sxm-8.yaml").inventory()
    );
    assert!(example("h100-sxm-8.yaml").events.is_empty());
}

#[test]
fn t4_example_pairs_cards_behind_switches_on_two_numa_nodes() {
    let inv = example("t4-pcie-4.yaml").inventory();
    assert_eq!(inv.len(), 4);
    assert!(inv
        .cards
        .iter()
        .all(|c| c.model == "Tesla T4" && c.memory_mib == 15360));
    assert_eq!(inv.link(0, 1), Link::Pix);
    assert_eq!(inv.link(2, 3), Link::Pix);
    for (a, b) in [(0, 2), (0, 3), (1, 2), (1, 3)] {
        assert_eq!(inv.link(a, b), Link::Sys);
    }
    let numa: Vec<Option<u32>> = inv.cards.iter().map(|c| c.numa_node).collect();
    assert_eq!(numa, [Some(0), Some(0), Some(1), Some(1)]);
}

#[test]
fn mixed_example_orders_a100s_first_by_bus_id() {
    let inv = example("mixed-a100-v100.yaml").inventory();
    let summary: Vec<(&str, u64, u32)> = inv
        .cards
        .iter()
        .map(|c| (c.model.as_str(), c.memory_mib, c.minor))
        .collect();
    assert_eq!(
        summary,
        [
            ("NVIDIA A100-SXM4-40GB", 40960, 0),
            ("NVIDIA A100-SXM4-40GB", 40960, 1),
            ("Tesla V100-SXM2-32GB", 32768, 2),
            ("Tesla V100-SXM2-32GB", 32768, 3),
        ]
    );
    assert_eq!(inv.link(0, 1), Link::NvLink(12));
    assert_eq!(inv.link(2, 3), Link::NvLink(2));
    assert_eq!(inv.link(0, 2), Link::Sys);
    assert_eq!(inv.link(1, 3), Link::Sys);
}

#[test]
fn t6_example_matches_the_reference_matrix() {
    // reference/gpu-manager.md §6.3, with SOC read as NODE.
    let reference = "\
X PIX PHB PHB SOC SOC
PIX X PHB PHB SOC SOC
PHB PHB X PIX SOC SOC
PHB PHB PIX X SOC SOC
SOC SOC SOC SOC X PIX
SOC SOC SOC SOC PIX X";
    let want: Vec<Vec<Link>> = reference
        .lines()
        .map(|l| l.split_whitespace().map(|t| t.parse().unwrap()).collect())
        .collect();
    let inv = example("t6.yaml").inventory();
    assert_eq!(inv.links, want);
    assert_eq!(inv.link(0, 4), Link::Node);
    assert!(inv.cards.iter().all(|c| c.numa_node.unwrap_or(0) == 0));
}

#[test]
fn scripted_xid_is_delivered_once_at_its_time() {
    let (b, clock) = on_manual_clock("h100-sxm-8-xid.yaml");
    let card1 = "GPU-d23f0824-128b-4f33-8c5c-7fd0a6a3a450";
    let card3 = "GPU-36f675cc-81e7-4ef5-a8e2-5d940ed90475";
    // Nothing in the first second.
    assert!(b.wait_events(Duration::from_secs(1)).unwrap().is_empty());
    assert_eq!(clock.elapsed(), Duration::from_secs(1));
    // A long wait returns as soon as the first event is due.
    let first = b.wait_events(Duration::from_secs(60)).unwrap();
    assert_eq!(clock.elapsed(), Duration::from_secs(3));
    assert_eq!(
        first,
        [HealthEvent {
            uuid: card1.into(),
            kind: HealthEventKind::Xid { code: 31 }
        }]
    );
    let second = b.wait_events(Duration::from_secs(60)).unwrap();
    assert_eq!(clock.elapsed(), Duration::from_secs(5));
    assert_eq!(
        second,
        [
            HealthEvent {
                uuid: card3.into(),
                kind: HealthEventKind::Xid { code: 79 }
            },
            HealthEvent {
                uuid: card3.into(),
                kind: HealthEventKind::Lost
            },
        ]
    );
    // Recovery produces no event: the wait runs to its timeout.
    assert!(b.wait_events(Duration::from_secs(30)).unwrap().is_empty());
    assert_eq!(clock.elapsed(), Duration::from_secs(35));
}

#[test]
fn lost_card_is_unhealthy_and_probes_lost_until_it_recovers() {
    let (b, clock) = on_manual_clock("h100-sxm-8-xid.yaml");
    let card3 = "GPU-36f675cc-81e7-4ef5-a8e2-5d940ed90475";
    assert_eq!(b.probe(card3).unwrap(), ProbeResult::Healthy);
    assert_eq!(b.processes().unwrap().len(), 1);

    clock.set(ms(5000));
    assert_eq!(b.probe(card3).unwrap(), ProbeResult::Lost);
    let inv = b.inventory().unwrap();
    assert!(!inv.card(3).unwrap().healthy);
    assert_eq!(inv.cards.iter().filter(|c| c.healthy).count(), 7);
    assert!(
        b.processes().unwrap().is_empty(),
        "the lost card's process is not visible"
    );
    assert!(b.card_usage().unwrap().iter().all(|u| u.uuid != card3));
    assert_eq!(b.card_usage().unwrap().len(), 7);

    clock.set(ms(19_999));
    assert_eq!(b.probe(card3).unwrap(), ProbeResult::Lost);
    clock.set(ms(20_000));
    assert!(b.probe(card3).unwrap().is_healthy());
    assert!(b.inventory().unwrap().cards.iter().all(|c| c.healthy));
    assert_eq!(b.elapsed(), clock.elapsed());
}

#[test]
fn processes_and_usage_follow_the_timeline() {
    let (b, clock) = on_manual_clock("h100-sxm-8.yaml");
    let card2 = "GPU-9531985d-5d9d-49f8-9818-e811892f902b";
    let at = |t: u64| {
        clock.set(ms(t));
        (b.processes().unwrap(), b.card_usage().unwrap())
    };
    let (procs, usage) = at(0);
    let pids: Vec<u32> = procs.iter().map(|p| p.pid).collect();
    assert_eq!(pids, [41237, 41390, 52011]);
    assert_eq!(usage.len(), 8);
    assert_eq!((usage[0].sm_percent, usage[0].memory_used_mib), (65, 29184));
    assert_eq!((usage[1].sm_percent, usage[1].memory_used_mib), (0, 0));

    let (procs, usage) = at(30_000);
    assert!(procs
        .iter()
        .any(|p| p.pid == 60120 && p.uuid == card2 && p.sm_percent == 35));
    assert_eq!((usage[2].sm_percent, usage[2].memory_used_mib), (35, 12800));

    let (procs, usage) = at(90_000);
    assert!(procs.iter().all(|p| p.pid != 60120));
    assert_eq!((usage[2].sm_percent, usage[2].memory_used_mib), (0, 0));
}

#[test]
fn zero_timeout_returns_due_events_without_waiting() {
    let (b, clock) = on_manual_clock("h100-sxm-8-xid.yaml");
    assert!(b.wait_events(Duration::ZERO).unwrap().is_empty());
    assert_eq!(clock.elapsed(), Duration::ZERO);
    clock.set(ms(6000));
    assert_eq!(b.wait_events(Duration::ZERO).unwrap().len(), 3);
    assert_eq!(clock.elapsed(), ms(6000));
}

#[test]
fn unknown_card_probe_is_an_error_listing_known_cards() {
    let (b, _) = on_manual_clock("t4-pcie-4.yaml");
    let e = b.probe("GPU-unknown").unwrap_err();
    assert!(matches!(e, BackendError::UnknownCard { .. }));
    let msg = e.to_string();
    assert!(
        msg.contains("GPU-unknown") && msg.contains("GPU-0fd630f1"),
        "{msg}"
    );
}

#[test]
fn missing_node_file_names_the_path() {
    let e = SimulatedBackend::from_file("/no/such/node.yaml").unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("/no/such/node.yaml"), "{msg}");
}

#[test]
fn invalid_node_file_error_names_the_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.yaml");
    let text = std::fs::read_to_string(examples_dir().join("t4-pcie-4.yaml"))
        .unwrap()
        .replace("  - [PIX, X,   SYS, SYS]", "  - [PIX, X,   SYS, NVX]");
    std::fs::write(&path, &text).unwrap();
    let line = text.lines().position(|l| l.contains("NVX")).unwrap() + 1;
    let msg = SimulatedBackend::from_file(&path).unwrap_err().to_string();
    assert!(msg.contains(&path.display().to_string()), "{msg}");
    assert!(msg.contains(&format!("line {line}")), "{msg}");
    assert!(msg.contains("\"NVX\"") && msg.contains("PIX"), "{msg}");
}

#[test]
fn from_str_uses_the_given_name_in_errors() {
    let e = SimulatedBackend::from_str("cards: 3\n", "inline-node").unwrap_err();
    let msg = e.to_string();
    assert!(msg.starts_with("node file inline-node, line 1"), "{msg}");
    assert!(msg.contains("list of cards"), "{msg}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn parsing_arbitrary_text_never_panics(s in "\\PC{0,300}") {
        let _ = NodeDescription::parse(&s, "fuzz");
    }

    #[test]
    fn mutated_example_files_never_panic(cut in 0usize..3000, junk in "[\\[\\]{}:,#\\- a-zA-Z0-9]{0,12}") {
        let text = std::fs::read_to_string(examples_dir().join("h100-sxm-8.yaml")).unwrap();
        let mut at = cut.min(text.len());
        while !text.is_char_boundary(at) {
            at -= 1;
        }
        let mutated = format!("{}{}{}", &text[..at], junk, &text[at..]);
        let _ = NodeDescription::parse(&mutated, "fuzz");
    }
}
