//! The nvml backend against a fake libnvidia-ml.so (C, compiled by the test), compared with
//! the simulated backend playing the same node description.

mod support;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use gm_backend::node_file::NodeDescription;
use gm_backend::{
    BackendError, GpuBackend, HealthEvent, HealthEventKind, ManualClock, NvmlBackend, NvmlConfig,
    ProbeResult, SimulatedBackend, SystemClock,
};
use support::{example_files, fake_spec, FakeNvml};

/// A node with two cards on different NUMA nodes and a script, in YAML.
fn two_card_node(script: &str) -> NodeDescription {
    let text = format!(
        "\
cards:
  - {{uuid: GPU-bbbb, model: Tesla T4, memoryMiB: 15360, minor: 1, pciBusId: '0000:af:00.0', numaNode: 1}}
  - {{uuid: GPU-aaaa, model: Tesla T4, memoryMiB: 15360, minor: 0, pciBusId: '0000:3b:00.0', numaNode: 0}}
links:
  - [X, SYS]
  - [SYS, X]
{script}"
    );
    NodeDescription::parse(&text, "two-card.yaml").expect("test node parses")
}

/// Open the nvml backend on a fake of `desc` and a simulated backend whose clock started just
/// before the fake's (so the simulated side is never behind).
fn both(desc: &NodeDescription) -> (FakeNvml, NvmlBackend, SimulatedBackend, Instant) {
    let fake = FakeNvml::for_node(desc);
    let t0 = Instant::now();
    let nvml = fake.open();
    let sim = SimulatedBackend::new(desc.clone(), Arc::new(SystemClock::starting_at(t0)));
    (fake, nvml, sim, t0)
}

fn sleep_until(t0: Instant, ms: u64) {
    let target = t0 + Duration::from_millis(ms);
    let now = Instant::now();
    if target > now {
        std::thread::sleep(target - now);
    }
}

/// Wait for events until `done` says enough, or 5 s pass.
fn collect_events(b: &dyn GpuBackend, done: impl Fn(&[HealthEvent]) -> bool) -> Vec<HealthEvent> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut all = Vec::new();
    while !done(&all) && Instant::now() < deadline {
        all.extend(
            b.wait_events(Duration::from_millis(200))
                .expect("wait_events works"),
        );
    }
    all
}

fn sorted(mut events: Vec<HealthEvent>) -> Vec<HealthEvent> {
    events.sort_by_key(|e| format!("{e:?}"));
    events
}

#[test]
fn nvml_backend_matches_simulated_on_every_example_node() {
    let files = example_files();
    assert!(
        files.len() >= 5,
        "expected the example node files, found {files:?}"
    );
    for file in files {
        let desc = NodeDescription::from_file(&file).expect("example parses");
        let (_fake, nvml, sim, _) = both(&desc);
        assert_eq!(nvml.kind(), "nvml");
        let got = nvml.inventory().expect("nvml inventory");
        let want = sim.inventory().expect("simulated inventory");
        assert_eq!(got, want, "{}", file.display());
        assert!(got.cards.iter().all(|c| c.healthy), "{}", file.display());
        assert_eq!(
            nvml.processes().unwrap(),
            sim.processes().unwrap(),
            "{}",
            file.display()
        );
        assert_eq!(
            nvml.card_usage().unwrap(),
            sim.card_usage().unwrap(),
            "{}",
            file.display()
        );
    }
}

#[test]
fn nvml_sorts_cards_by_bus_id_even_when_nvml_enumerates_them_otherwise() {
    let desc = NodeDescription::from_file(support::examples_dir().join("mixed-a100-v100.yaml"))
        .expect("example parses");
    let spec = fake_spec(&desc).unwrap();
    // The fake enumerates in file order: V100s first.
    let first_card = spec.lines().find(|l| l.starts_with("card ")).unwrap();
    assert!(first_card.contains("V100"), "{first_card}");
    let (_fake, nvml, _, _) = both(&desc);
    let inv = nvml.inventory().unwrap();
    let models: Vec<&str> = inv.cards.iter().map(|c| c.model.as_str()).collect();
    assert_eq!(
        models,
        [
            "NVIDIA A100-SXM4-40GB",
            "NVIDIA A100-SXM4-40GB",
            "Tesla V100-SXM2-32GB",
            "Tesla V100-SXM2-32GB"
        ]
    );
    assert_eq!(inv.cards[0].pci_bus_id, "0000:07:00.0");
    assert_eq!(inv.link(0, 1).to_string(), "NV12");
    assert_eq!(inv.link(2, 3).to_string(), "NV2");
    assert_eq!(inv.link(1, 2).to_string(), "SYS");
}

#[test]
fn nvswitch_boards_show_nv18_between_every_pair() {
    let desc = NodeDescription::from_file(support::examples_dir().join("h100-sxm-8.yaml"))
        .expect("example parses");
    // 7 peers x 18 links cannot be direct links: the fake gets one NVSwitch.
    assert!(fake_spec(&desc).unwrap().contains("00000001:"));
    let (_fake, nvml, _, _) = both(&desc);
    let inv = nvml.inventory().unwrap();
    for i in 0..8 {
        for j in 0..8 {
            if i != j {
                assert_eq!(inv.link(i, j).to_string(), "NV18", "{i}-{j}");
            }
        }
    }
}

#[test]
fn processes_and_usage_match_simulated_over_time() {
    let desc = two_card_node(
        "\
processes:
  - {card: GPU-aaaa, pid: 100, usedMemoryMiB: 2048, smPercent: 30, endMs: 1000}
  - {card: GPU-aaaa, pid: 90, usedMemoryMiB: 1024, smPercent: 10}
  - {card: GPU-bbbb, pid: 200, usedMemoryMiB: 4096, smPercent: 60, startMs: 1000}
usage:
  - {card: GPU-aaaa, atMs: 1000, smPercent: 12, memoryUsedMiB: 1300}
",
    );
    let (_fake, nvml, sim, t0) = both(&desc);
    let before = nvml.processes().unwrap();
    assert_eq!(before, sim.processes().unwrap());
    let pids: Vec<u32> = before.iter().map(|p| p.pid).collect();
    assert_eq!(pids, [90, 100], "card 0 (GPU-aaaa) sorted by pid");
    assert_eq!(before[1].used_memory_mib, 2048);
    assert_eq!(before[1].sm_percent, 30);
    let usage = nvml.card_usage().unwrap();
    assert_eq!(usage, sim.card_usage().unwrap());
    assert_eq!((usage[0].sm_percent, usage[0].memory_used_mib), (40, 3072));

    sleep_until(t0, 1300);
    let after = nvml.processes().unwrap();
    assert_eq!(after, sim.processes().unwrap());
    let pids: Vec<(String, u32)> = after.iter().map(|p| (p.uuid.clone(), p.pid)).collect();
    assert_eq!(
        pids,
        [("GPU-aaaa".to_string(), 90), ("GPU-bbbb".to_string(), 200)]
    );
    let usage = nvml.card_usage().unwrap();
    assert_eq!(usage, sim.card_usage().unwrap());
    assert_eq!((usage[0].sm_percent, usage[0].memory_used_mib), (12, 1300));
}

#[test]
fn xid_and_ecc_events_are_delivered_with_card_and_code() {
    let desc = two_card_node(
        "\
events:
  - {atMs: 200, card: GPU-bbbb, kind: xid, code: 63}
  - {atMs: 250, card: GPU-aaaa, kind: doubleBitEcc}
",
    );
    let (_fake, nvml, _, _) = both(&desc);
    let got = collect_events(&nvml, |e| e.len() >= 2);
    // The simulated backend on a manual clock, for the expected list.
    let sim = SimulatedBackend::new(desc, Arc::new(ManualClock::new()));
    let want = collect_events(&sim, |e| e.len() >= 2);
    assert_eq!(sorted(got.clone()), sorted(want));
    assert!(got.contains(&HealthEvent {
        uuid: "GPU-bbbb".into(),
        kind: HealthEventKind::Xid { code: 63 }
    }));
    // Nothing more arrives, and the cards still answer.
    assert!(nvml
        .wait_events(Duration::from_millis(100))
        .unwrap()
        .is_empty());
    assert_eq!(nvml.probe("GPU-bbbb").unwrap(), ProbeResult::Healthy);
}

#[test]
fn lost_card_is_reported_probes_lost_and_recovers() {
    let desc = two_card_node(
        "\
processes:
  - {card: GPU-bbbb, pid: 300, usedMemoryMiB: 512, smPercent: 5}
events:
  - {atMs: 200, card: GPU-bbbb, kind: xid, code: 79}
  - {atMs: 200, card: GPU-bbbb, kind: lost}
  - {atMs: 1200, card: GPU-bbbb, kind: recovered}
",
    );
    let (_fake, nvml, sim, t0) = both(&desc);
    assert_eq!(nvml.probe("GPU-bbbb").unwrap(), ProbeResult::Healthy);

    // The XID and the loss happen at the same instant and may arrive in separate batches:
    // wait for both.
    let got = collect_events(&nvml, |e| {
        e.iter().any(|e| e.kind == HealthEventKind::Lost)
            && e.iter()
                .any(|e| e.kind == HealthEventKind::Xid { code: 79 })
    });
    assert_eq!(
        sorted(got),
        sorted(vec![
            HealthEvent {
                uuid: "GPU-bbbb".into(),
                kind: HealthEventKind::Xid { code: 79 }
            },
            HealthEvent {
                uuid: "GPU-bbbb".into(),
                kind: HealthEventKind::Lost
            },
        ])
    );
    assert!(
        t0.elapsed() < Duration::from_millis(1100),
        "the lost card was reported only after {:?}",
        t0.elapsed()
    );
    assert_eq!(nvml.probe("GPU-bbbb").unwrap(), ProbeResult::Lost);
    assert_eq!(nvml.probe("GPU-aaaa").unwrap(), ProbeResult::Healthy);
    let inv = nvml.inventory().unwrap();
    assert_eq!(inv, sim.inventory().unwrap());
    assert!(!inv.card_by_uuid("GPU-bbbb").unwrap().healthy);
    assert_eq!(nvml.processes().unwrap(), sim.processes().unwrap());
    assert!(nvml.processes().unwrap().is_empty());
    assert_eq!(nvml.card_usage().unwrap(), sim.card_usage().unwrap());
    // The loss is reported once.
    assert!(nvml
        .wait_events(Duration::from_millis(50))
        .unwrap()
        .is_empty());

    sleep_until(t0, 1400);
    assert_eq!(nvml.probe("GPU-bbbb").unwrap(), ProbeResult::Healthy);
    assert_eq!(nvml.inventory().unwrap(), sim.inventory().unwrap());
    assert!(nvml.inventory().unwrap().cards.iter().all(|c| c.healthy));
    assert_eq!(nvml.processes().unwrap().len(), 1);
}

#[test]
fn cards_without_event_support_are_still_watched_by_polling() {
    let desc = two_card_node(
        "\
events:
  - {atMs: 150, card: GPU-aaaa, kind: lost}
",
    );
    let spec = format!(
        "{}events_supported 0 0\nevents_supported 1 0\n",
        fake_spec(&desc).unwrap()
    );
    let fake = FakeNvml::with_spec(&spec);
    let nvml = fake.open();
    let got = collect_events(&nvml, |e| !e.is_empty());
    assert_eq!(
        got,
        [HealthEvent {
            uuid: "GPU-aaaa".into(),
            kind: HealthEventKind::Lost
        }]
    );
}

#[test]
fn numa_falls_back_to_sysfs_when_nvml_cannot_tell() {
    let desc = NodeDescription::from_file(support::examples_dir().join("t4-pcie-4.yaml"))
        .expect("example parses");
    let spec = format!("numa_api unsupported\n{}", fake_spec(&desc).unwrap());
    let fake = FakeNvml::with_spec(&spec);
    for card in &desc.cards {
        let dir = fake
            .sysfs()
            .join("bus/pci/devices")
            .join(card.pci_bus_id.unwrap().to_string());
        std::fs::create_dir_all(&dir).unwrap();
        let numa = card.numa_node.map_or(-1, i64::from);
        std::fs::write(dir.join("numa_node"), format!("{numa}\n")).unwrap();
    }
    let inv = fake.open().inventory().unwrap();
    assert_eq!(inv, desc.inventory());
    let numas: Vec<Option<u32>> = inv.cards.iter().map(|c| c.numa_node).collect();
    assert_eq!(numas, [Some(0), Some(0), Some(1), Some(1)]);

    // Without the sysfs files the NUMA node is unknown, not an error.
    let bare = FakeNvml::with_spec(&spec);
    let inv = bare.open().inventory().unwrap();
    assert!(inv.cards.iter().all(|c| c.numa_node.is_none()));
}

#[test]
fn nvml_reporting_no_numa_node_means_unknown() {
    let desc = two_card_node("");
    let spec = fake_spec(&desc)
        .unwrap()
        .replace(" 1 1 15360 ", " 1 -1 15360 ");
    let inv = FakeNvml::with_spec(&spec).open().inventory().unwrap();
    let b = inv.card_by_uuid("GPU-bbbb").unwrap();
    assert_eq!(b.numa_node, None);
    assert_eq!(inv.card_by_uuid("GPU-aaaa").unwrap().numa_node, Some(0));
}

#[test]
fn probing_an_unknown_card_names_the_known_ones() {
    let desc = two_card_node("");
    let (_fake, nvml, sim, _) = both(&desc);
    for b in [&nvml as &dyn GpuBackend, &sim] {
        let e = b.probe("GPU-nope").unwrap_err();
        assert!(matches!(e, BackendError::UnknownCard { .. }), "{e}");
        let msg = e.to_string();
        assert!(
            msg.contains("GPU-nope") && msg.contains("GPU-aaaa") && msg.contains("GPU-bbbb"),
            "{msg}"
        );
    }
}

#[test]
fn missing_nvml_library_is_a_clear_error_not_a_crash() {
    let e = NvmlBackend::open(NvmlConfig {
        lib_path: Some(PathBuf::from("/definitely/not/here/libnvidia-ml.so.1")),
        sysfs_root: PathBuf::from("/sys"),
    })
    .unwrap_err();
    let msg = e.to_string();
    assert!(msg.starts_with("NVML not available: "), "{msg}");
    assert!(
        msg.contains("libnvidia-ml.so.1") && msg.contains("--nvml-lib"),
        "{msg}"
    );
}

#[test]
fn a_file_that_is_not_nvml_is_reported_as_nvml_not_available() {
    let dir = tempfile::tempdir().unwrap();
    let bogus = dir.path().join("libnvidia-ml.so.1");
    std::fs::write(&bogus, "not a shared library").unwrap();
    let msg = NvmlBackend::open(NvmlConfig {
        lib_path: Some(bogus),
        sysfs_root: PathBuf::from("/sys"),
    })
    .unwrap_err()
    .to_string();
    assert!(msg.starts_with("NVML not available: "), "{msg}");
}

#[test]
fn fake_with_a_broken_spec_fails_to_initialise_cleanly() {
    let fake = FakeNvml::with_spec("card not enough fields\n");
    let msg = NvmlBackend::open(NvmlConfig {
        lib_path: Some(fake.lib.clone()),
        sysfs_root: fake.sysfs(),
    })
    .unwrap_err()
    .to_string();
    assert!(msg.starts_with("NVML not available: "), "{msg}");
}

#[test]
fn the_fake_spec_lists_cards_in_file_order_with_nvml_bus_ids() {
    let desc = two_card_node("");
    let spec = fake_spec(&desc).unwrap();
    let cards: Vec<&str> = spec.lines().filter(|l| l.starts_with("card ")).collect();
    assert_eq!(
        cards,
        [
            "card 00000000:AF:00.0 GPU-bbbb 1 1 15360 Tesla T4",
            "card 00000000:3B:00.0 GPU-aaaa 0 0 15360 Tesla T4"
        ]
    );
    let by_kind: BTreeMap<&str, usize> = spec
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .fold(BTreeMap::new(), |mut m, k| {
            *m.entry(k).or_default() += 1;
            m
        });
    assert_eq!(by_kind.get("topo"), Some(&1));
}
