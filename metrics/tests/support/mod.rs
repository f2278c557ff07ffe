//! A simulated node with workloads, for the server, promtool and dashboard tests.
//!
//! The node is `deploy/examples/nodes/h100-sxm-8.yaml` played by gm-backend's simulated
//! backend at a fixed time (40 s after start, so all four scripted processes run). Four
//! containers hold allocations computed with gm-core's ledger rules, and a cgroup v2 / systemd /
//! containerd fixture tree puts each scripted PID in its container:
//!
//! | pod (namespace) | container | request | cards | PID (card: MiB, SM %) |
//! |---|---|---|---|---|
//! | train-a (ml) | trainer | 30 vcuda-core, 20 blocks | 0 | 41237 (gpu0: 20480, 45) |
//! | train-b (ml) | worker | 40 vcuda-core, 32 blocks | 0 | 41390 (gpu0: 8192, 20) |
//! | notebook (ml) | jupyter | 50 vcuda-core, 48 blocks | 2 | 60120 (gpu2: 12288, 35) |
//! | big-job (research) | main | 2 whole cards | 5, 6 | 52011 (gpu5: 65536, 90) |
//!
//! `notebook`'s container ID is unknown to the daemon (mapped by pod UID).
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode};
use axum::Router;
use gm_backend::{GpuBackend, ManualClock, NodeDescription, SimulatedBackend};
use gm_core::ledger::{container_charges, Charge};
use gm_core::request::{GpuRequest, Slot};
use gm_core::NodeInventory;
use gm_metrics::cgroup::{CgroupConfig, QosClass};
use gm_metrics::{
    CardAllocation, CgroupDriver, CgroupVersion, ContainerAllocation, MetricsConfig, NodeSnapshot,
    SnapshotSource,
};
use tower::ServiceExt;

use gm_testkit::cgroup::{self as fixtures, FixtureContainer, FixtureNode, Runtime};
#[allow(unused_imports)] // used by the promtool and dashboard tests
pub use gm_testkit::{
    grafana::{dashboard, dashboard_queries},
    prometheus::tool,
};

/// The node name in the snapshot and in every `node` label.
pub const NODE: &str = "sim-h100";

/// The simulated node file.
pub fn node_file() -> PathBuf {
    gm_testkit::example_node("h100-sxm-8.yaml")
}

/// One container of the simulated workload.
#[derive(Debug, Clone)]
pub struct Workload {
    pub namespace: &'static str,
    pub pod: &'static str,
    pub container: &'static str,
    pub seed: u32,
    pub qos: QosClass,
    pub request: GpuRequest,
    pub cards: Vec<u32>,
    pub pids: Vec<u32>,
    /// Whether the daemon knows the container ID.
    pub id_known: bool,
}

impl Workload {
    pub fn pod_uid(&self) -> String {
        fixtures::pod_uid(self.seed)
    }
    pub fn container_id(&self) -> String {
        fixtures::container_id(self.seed)
    }
}

/// The four workloads of the table above.
pub fn workloads() -> Vec<Workload> {
    vec![
        Workload {
            namespace: "ml",
            pod: "train-a",
            container: "trainer",
            seed: 1,
            qos: QosClass::Burstable,
            request: GpuRequest::Share {
                cores: 30,
                blocks: 20,
            },
            cards: vec![0],
            pids: vec![41237],
            id_known: true,
        },
        Workload {
            namespace: "ml",
            pod: "train-b",
            container: "worker",
            seed: 2,
            qos: QosClass::Guaranteed,
            request: GpuRequest::Share {
                cores: 40,
                blocks: 32,
            },
            cards: vec![0],
            pids: vec![41390],
            id_known: true,
        },
        Workload {
            namespace: "ml",
            pod: "notebook",
            container: "jupyter",
            seed: 3,
            qos: QosClass::BestEffort,
            request: GpuRequest::Share {
                cores: 50,
                blocks: 48,
            },
            cards: vec![2],
            pids: vec![60120],
            id_known: false,
        },
        Workload {
            namespace: "research",
            pod: "big-job",
            container: "main",
            seed: 4,
            qos: QosClass::Guaranteed,
            request: GpuRequest::Whole { cards: 2 },
            cards: vec![5, 6],
            pids: vec![52011],
            id_known: true,
        },
    ]
}

/// The allocation the daemon would hold for `w` on `inv` (gm-core's charge rules).
pub fn allocation(inv: &NodeInventory, w: &Workload) -> ContainerAllocation {
    let charges = container_charges(Slot::App(0), &w.request, &w.cards)
        .unwrap_or_else(|e| panic!("workload {}: {e}", w.pod));
    let cards: Vec<CardAllocation> = charges
        .iter()
        .map(|c| {
            let card_mib = inv.card(c.card).map_or(0, |x| x.memory_mib);
            match c.charge {
                Charge::Whole => CardAllocation {
                    card: c.card,
                    cores: 100,
                    memory_mib: card_mib,
                },
                Charge::Share { cores, blocks } => CardAllocation {
                    card: c.card,
                    cores,
                    memory_mib: u64::from(blocks) * 256,
                },
            }
        })
        .collect();
    ContainerAllocation {
        record_id: String::new(),
        namespace: w.namespace.into(),
        pod_name: w.pod.into(),
        pod_uid: w.pod_uid(),
        container_name: w.container.into(),
        container_id: w
            .id_known
            .then(|| Runtime::Containerd.status_id(&w.container_id())),
        qos_class: Some(w.qos.to_string()),
        request_cores: w.request.cores(),
        request_memory_mib: cards.iter().map(|c| c.memory_mib).sum(),
        cards,
    }
}

/// A snapshot source the test can change.
#[derive(Debug)]
pub struct StaticSource(pub Mutex<NodeSnapshot>);

impl StaticSource {
    pub fn update(&self, f: impl FnOnce(&mut NodeSnapshot)) {
        let mut s = self.0.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut s);
    }
}

impl SnapshotSource for StaticSource {
    fn snapshot(&self) -> NodeSnapshot {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// The simulated node: backend, snapshot source and cgroup fixture.
pub struct SimNode {
    pub dir: tempfile::TempDir,
    pub fixture: FixtureNode,
    pub backend: Arc<SimulatedBackend>,
    pub source: Arc<StaticSource>,
}

impl SimNode {
    /// Server configuration pointing at the fixture (no caching, 2 s backend deadline).
    pub fn config(&self) -> MetricsConfig {
        MetricsConfig {
            addr: ([127, 0, 0, 1], 0).into(),
            cgroup: CgroupConfig {
                cgroup_root: self.fixture.cgroup_root.clone(),
                proc_root: self.fixture.proc_root.clone(),
                version: None,
                driver: None,
            },
            version: "test-1.2.3".into(),
            cache_ttl: Duration::ZERO,
            sample_timeout: Duration::from_secs(2),
        }
    }

    /// The router over this node.
    pub fn router(&self) -> Router {
        self.router_with(self.backend.clone())
    }

    /// The router over this node's snapshot with another backend.
    pub fn router_with(&self, backend: Arc<dyn GpuBackend>) -> Router {
        gm_metrics::router(&self.config(), self.source.clone(), backend)
    }
}

/// Build the simulated node, registered with the kubelet, with one XID 31 on card 3.
pub fn sim_node() -> SimNode {
    let desc = NodeDescription::from_file(node_file())
        .unwrap_or_else(|e| panic!("{}: {e}", node_file().display()));
    let clock = Arc::new(ManualClock::new());
    clock.set(Duration::from_secs(40));
    let backend = Arc::new(SimulatedBackend::new(desc, clock));
    let inventory = backend
        .inventory()
        .unwrap_or_else(|e| panic!("inventory: {e}"));
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let fixture = fixtures::new_node(dir.path(), CgroupVersion::V2, CgroupDriver::Systemd);
    for w in workloads() {
        fixture.add_container(&FixtureContainer {
            pod_uid: w.pod_uid(),
            container_id: w.container_id(),
            runtime: Runtime::Containerd,
            qos: w.qos,
            pids: w.pids.clone(),
            nested_pids: vec![],
        });
    }
    let allocations = workloads()
        .iter()
        .map(|w| allocation(&inventory, w))
        .collect();
    let snapshot = NodeSnapshot {
        node: NODE.into(),
        inventory,
        xid_errors: vec![(3, 31, 2)],
        allocations,
        registrations: vec![
            ("tencent.com/vcuda-core".into(), 1),
            ("tencent.com/vcuda-memory".into(), 1),
        ],
        registered: true,
        unregistered: Vec::new(),
    };
    SimNode {
        dir,
        fixture,
        backend,
        source: Arc::new(StaticSource(Mutex::new(snapshot))),
    }
}

/// GET `path` from the router.
pub async fn get(
    router: &Router,
    path: &str,
    accept: Option<&str>,
) -> (StatusCode, HeaderMap, String) {
    let mut req = Request::builder().uri(path);
    if let Some(a) = accept {
        req = req.header("accept", a);
    }
    let req = req
        .body(Body::empty())
        .unwrap_or_else(|e| panic!("request: {e}"));
    let resp = router
        .clone()
        .oneshot(req)
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = axum::body::to_bytes(resp.into_body(), 64 << 20)
        .await
        .unwrap_or_else(|e| panic!("body of {path}: {e}"));
    (
        status,
        headers,
        String::from_utf8_lossy(&bytes).into_owned(),
    )
}

/// One sample line of the Prometheus text format.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Parse the sample lines of a Prometheus text or OpenMetrics exposition (comments skipped).
/// Panics on a line it cannot read, naming it.
pub fn parse_samples(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("no value in {line:?}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|e| panic!("bad value in {line:?}: {e}"));
        let (name, labels) = match series.split_once('{') {
            None => (series.to_string(), BTreeMap::new()),
            Some((name, rest)) => {
                let body = rest
                    .strip_suffix('}')
                    .unwrap_or_else(|| panic!("unclosed labels in {line:?}"));
                (name.to_string(), parse_labels(body, line))
            }
        };
        out.push(Sample {
            name,
            labels,
            value,
        });
    }
    out
}

fn parse_labels(body: &str, line: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut chars = body.chars().peekable();
    loop {
        let name: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if name.is_empty() {
            break;
        }
        assert_eq!(
            chars.next(),
            Some('"'),
            "label {name} not quoted in {line:?}"
        );
        let mut value = String::new();
        loop {
            match chars.next() {
                Some('\\') => match chars.next() {
                    Some('n') => value.push('\n'),
                    Some(c) => value.push(c),
                    None => panic!("dangling escape in {line:?}"),
                },
                Some('"') => break,
                Some(c) => value.push(c),
                None => panic!("unterminated label value in {line:?}"),
            }
        }
        out.insert(name.trim_start_matches(',').to_string(), value);
        if chars.peek() == Some(&',') {
            chars.next();
        }
    }
    out
}

/// The value of the one sample named `name` whose labels include `labels`.
pub fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let hits: Vec<&Sample> = samples
        .iter()
        .filter(|s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .collect();
    assert!(
        hits.len() <= 1,
        "several samples match {name} {labels:?}: {hits:?}"
    );
    hits.first().map(|s| s.value)
}

/// The container labels of a workload, as the TKEStack families carry them.
pub fn container_labels(w: &Workload) -> Vec<(&'static str, &'static str)> {
    vec![
        ("pod_name", w.pod),
        ("namespace", w.namespace),
        ("node", NODE),
        ("container_name", w.container),
    ]
}

/// A workload by pod name.
pub fn workload(pod: &str) -> Workload {
    workloads()
        .into_iter()
        .find(|w| w.pod == pod)
        .unwrap_or_else(|| panic!("no workload {pod}"))
}

/// `labels` plus one more.
pub fn with(
    labels: &[(&'static str, &'static str)],
    extra: (&'static str, &'static str),
) -> Vec<(&'static str, &'static str)> {
    let mut v = labels.to_vec();
    v.push(extra);
    v
}
