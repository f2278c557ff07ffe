//! One scrape of a busy node: 8 cards × 200 containers (25 per card, one GPU process each).
//!
//! * `scrape/full`: what a `/metrics` request does after the cache: ask the backend (an
//!   in-memory one here; NVML's own latency is not ours to measure), read 200
//!   `/proc/<pid>/cgroup` files of a fixture tree, join with the snapshot, build the families
//!   and encode the Prometheus text.
//! * `scrape/render_text` and `scrape/render_openmetrics`: the same without the sample
//!   (join, families, encoding).
//!
//! Budget: one full scrape ≤ 10 ms.

use gm_testkit::cgroup as fixtures;

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use gm_backend::{BackendError, CardUsage, GpuBackend, HealthEvent, ProbeResult, ProcessSample};
use gm_core::{Link, NodeInventory};
use gm_metrics::cgroup::{CgroupConfig, QosClass};
use gm_metrics::exposition::{encode, Format};
use gm_metrics::families::{metric_families, RenderInfo};
use gm_metrics::{
    CardAllocation, CgroupDriver, CgroupVersion, ContainerAllocation, NodeReport, NodeSnapshot,
    PidResolver, UsageSample,
};

const CARDS: u32 = 8;
const CONTAINERS: u32 = 200;

#[derive(Debug)]
struct Fixed {
    inventory: NodeInventory,
    processes: Vec<ProcessSample>,
}

impl GpuBackend for Fixed {
    fn kind(&self) -> &'static str {
        "bench"
    }
    fn inventory(&self) -> Result<NodeInventory, BackendError> {
        Ok(self.inventory.clone())
    }
    fn wait_events(&self, _: Duration) -> Result<Vec<HealthEvent>, BackendError> {
        Ok(Vec::new())
    }
    fn probe(&self, _: &str) -> Result<ProbeResult, BackendError> {
        Ok(ProbeResult::Healthy)
    }
    fn processes(&self) -> Result<Vec<ProcessSample>, BackendError> {
        Ok(self.processes.clone())
    }
    fn card_usage(&self) -> Result<Vec<CardUsage>, BackendError> {
        Ok(self
            .inventory
            .cards
            .iter()
            .map(|c| CardUsage {
                uuid: c.uuid.clone(),
                sm_percent: 80,
                memory_used_mib: 25 * 1024,
            })
            .collect())
    }
}

fn bench_scrape(c: &mut Criterion) {
    let inventory = NodeInventory::uniform(
        CARDS as usize,
        "NVIDIA H100 80GB HBM3",
        81559,
        Link::NvLink(18),
    );
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let node = fixtures::new_node(dir.path(), CgroupVersion::V2, CgroupDriver::Systemd);
    let mut processes = Vec::new();
    let mut allocations = Vec::new();
    for i in 0..CONTAINERS {
        let card = i % CARDS;
        let pid = 10_000 + i;
        let uid = fixtures::pod_uid(i);
        let id = fixtures::container_id(i);
        node.add_container(&fixtures::FixtureContainer {
            pod_uid: uid.clone(),
            container_id: id.clone(),
            runtime: fixtures::Runtime::Containerd,
            qos: QosClass::Burstable,
            pids: vec![pid],
            nested_pids: vec![],
        });
        processes.push(ProcessSample {
            uuid: inventory.cards[card as usize].uuid.clone(),
            pid,
            used_memory_mib: 1024,
            sm_percent: 1 + i % 4,
        });
        allocations.push(ContainerAllocation {
            record_id: String::new(),
            namespace: format!("team-{}", i % 10),
            pod_name: format!("job-{i}"),
            pod_uid: uid,
            container_name: "worker".into(),
            container_id: Some(format!("containerd://{id}")),
            qos_class: Some("Burstable".into()),
            cards: vec![CardAllocation {
                card,
                cores: 4,
                memory_mib: 2048,
            }],
            request_cores: 4,
            request_memory_mib: 2048,
        });
    }
    let snapshot = NodeSnapshot {
        node: "bench-node".into(),
        inventory: inventory.clone(),
        xid_errors: vec![(1, 31, 4), (2, 79, 1)],
        allocations,
        registrations: vec![
            ("tencent.com/vcuda-core".into(), 1),
            ("tencent.com/vcuda-memory".into(), 1),
        ],
        registered: true,
        unregistered: Vec::new(),
    };
    let backend: Arc<dyn GpuBackend> = Arc::new(Fixed {
        inventory,
        processes,
    });
    let resolver = PidResolver::new(CgroupConfig {
        cgroup_root: node.cgroup_root.clone(),
        proc_root: node.proc_root.clone(),
        version: None,
        driver: None,
    });
    let info = RenderInfo {
        version: "bench",
        backend: "bench",
    };

    let sample = UsageSample::take(backend.as_ref(), &resolver);
    let report = NodeReport::build(&snapshot, &sample);
    assert_eq!(
        report.unmapped_processes.len(),
        0,
        "fixture PIDs must all map"
    );
    let text = encode(&metric_families(&report, info), Format::Prometheus)
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "one scrape: {} bytes, {} samples",
        text.len(),
        text.lines().filter(|l| !l.starts_with('#')).count()
    );

    let mut g = c.benchmark_group("scrape");
    g.bench_function("full", |b| {
        b.iter(|| {
            let sample = UsageSample::take(backend.as_ref(), &resolver);
            let report = NodeReport::build(&snapshot, &sample);
            black_box(encode(&metric_families(&report, info), Format::Prometheus))
        })
    });
    g.bench_function("render_text", |b| {
        b.iter(|| {
            let report = NodeReport::build(&snapshot, &sample);
            black_box(encode(&metric_families(&report, info), Format::Prometheus))
        })
    });
    g.bench_function("render_openmetrics", |b| {
        b.iter(|| {
            let report = NodeReport::build(&snapshot, &sample);
            black_box(encode(&metric_families(&report, info), Format::OpenMetrics))
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(30)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = bench_scrape
}
criterion_main!(benches);
