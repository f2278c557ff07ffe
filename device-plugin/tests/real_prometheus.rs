//! A real Prometheus server (Debian's `prometheus` package, installed by scripts/test.sh)
//! scrapes the `gpu-manager` daemon running on a simulated node with workloads; the test
//! queries each of the four TKEStack families (and node, card and dashboard queries) through
//! Prometheus' HTTP API and checks the values.
//!
//! Everything the daemon reports is its own doing: the node is
//! `deploy/examples/nodes/h100-sxm-8.yaml` (plus two application XIDs on card 3), played 40 s
//! into its script so that all four scripted processes run; the pods come from an in-memory
//! pod source carrying the scheduler's card assignment, UIDs, QoS classes and (once running)
//! container IDs; the allocations are made through the kubelet protocol by gm-testkit's
//! device manager (GetPreferredAllocation → Allocate → PreStartContainer, with pod-resources
//! listing them); and a cgroup v2 / systemd / containerd fixture tree puts each scripted PID
//! in its container:
//!
//! | pod (namespace) | container | QoS | request | cards | PID (card: MiB, SM %) |
//! |---|---|---|---|---|---|
//! | train-a (ml) | trainer | Burstable | 30 vcuda-core, 20 vcuda-memory | 0 | 41237 (gpu0: 20480, 45) |
//! | train-b (ml) | worker | Guaranteed | 40 vcuda-core, 32 vcuda-memory | 0 | 41390 (gpu0: 8192, 20) |
//! | notebook (ml) | jupyter | BestEffort | 50 vcuda-core, 48 vcuda-memory | 2 | 60120 (gpu2: 12288, 35) |
//! | big-job (research) | main | Guaranteed | 200 vcuda-core (2 whole cards) | 5, 6 | 52011 (gpu5: 65536, 90) |
//!
//! `notebook`'s container ID is never reported, so the daemon maps its process by pod UID.
//! train-a is the TKEStack documentation's example (30 vcuda-core, 20 vcuda-memory →
//! `container_request_gpu_utilization` 0.3, `container_request_gpu_memory` 5120).

use std::sync::Arc;
use std::time::{Duration, Instant};

use gm_backend::{NodeDescription, SimulatedBackend, SystemClock};
use gm_device_plugin::config::DaemonConfig;
use gm_device_plugin::pods::{InMemoryPods, PodInfo, PodSource};
use gm_device_plugin::{Daemon, Dependencies};
use gm_metrics::cgroup::{CgroupConfig, QosClass};
use gm_metrics::{CgroupDriver, CgroupVersion, MetricsConfig};
use gm_testkit::cgroup::{self, FixtureContainer, Runtime};
use gm_testkit::grafana::dashboard_queries;
use gm_testkit::prometheus::http_get;
use gm_testkit::{
    example_node, DeviceManager, FakeKubelet, FakePodResources, PodRequest, Prometheus, CORE,
    MEMORY, STEP,
};

/// The node's name: the `node` label of every series.
const NODE: &str = "sim-h100";
/// How long Prometheus may take to scrape and answer everything.
const DEADLINE: Duration = Duration::from_secs(20);
/// Card 3 of the H100 node, which reports two application XIDs (31: a page fault).
const CARD3: &str = "GPU-36f675cc-81e7-4ef5-a8e2-5d940ed90475";

/// One GPU container of the simulated workload.
#[derive(Debug, Clone, Copy)]
struct Workload {
    namespace: &'static str,
    pod: &'static str,
    container: &'static str,
    /// Seed of the pod UID and container ID.
    seed: u32,
    qos: QosClass,
    cores: u32,
    blocks: u32,
    /// The scheduler's assignment (`predicate-gpu-idx-0`).
    cards: &'static [u32],
    pid: u32,
    /// Whether the pod's status reports the container ID.
    id_known: bool,
}

const WORKLOADS: [Workload; 4] = [
    Workload {
        namespace: "ml",
        pod: "train-a",
        container: "trainer",
        seed: 1,
        qos: QosClass::Burstable,
        cores: 30,
        blocks: 20,
        cards: &[0],
        pid: 41237,
        id_known: true,
    },
    Workload {
        namespace: "ml",
        pod: "train-b",
        container: "worker",
        seed: 2,
        qos: QosClass::Guaranteed,
        cores: 40,
        blocks: 32,
        cards: &[0],
        pid: 41390,
        id_known: true,
    },
    Workload {
        namespace: "ml",
        pod: "notebook",
        container: "jupyter",
        seed: 3,
        qos: QosClass::BestEffort,
        cores: 50,
        blocks: 48,
        cards: &[2],
        pid: 60120,
        id_known: false,
    },
    Workload {
        namespace: "research",
        pod: "big-job",
        container: "main",
        seed: 4,
        qos: QosClass::Guaranteed,
        cores: 200,
        blocks: 0,
        cards: &[5, 6],
        pid: 52011,
        id_known: true,
    },
];

fn workload(pod: &str) -> Workload {
    WORKLOADS
        .into_iter()
        .find(|w| w.pod == pod)
        .unwrap_or_else(|| panic!("no workload {pod}"))
}

/// The pod as the API server would show it: bound to this node by the scheduler (with its
/// card assignment), pending until admitted, then running with its container's ID.
fn pod(w: &Workload, order: usize, running: bool) -> PodInfo {
    let mut limits = serde_json::Map::new();
    limits.insert(CORE.into(), w.cores.to_string().into());
    if w.blocks > 0 {
        limits.insert(MEMORY.into(), w.blocks.to_string().into());
    }
    let cards: Vec<String> = w.cards.iter().map(u32::to_string).collect();
    let mut status = serde_json::json!({"phase": "Pending", "qosClass": w.qos.to_string()});
    if running {
        status["phase"] = "Running".into();
        let mut cs = serde_json::json!({"name": w.container, "image": "cuda-app", "imageID": "",
                                        "ready": true, "restartCount": 0});
        if w.id_known {
            cs["containerID"] = Runtime::Containerd
                .status_id(&cgroup::container_id(w.seed))
                .into();
        }
        status["containerStatuses"] = serde_json::json!([cs]);
    }
    let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(serde_json::json!({
        "metadata": {
            "name": w.pod, "namespace": w.namespace, "uid": cgroup::pod_uid(w.seed),
            "creationTimestamp": "2024-01-01T00:00:00Z",
            "annotations": {
                "tencent.com/predicate-gpu-idx-0": cards.join(","),
                "tencent.com/predicate-node": NODE,
                "tencent.com/predicate-time": (1_700_000_000_000_000_000u64 + order as u64).to_string(),
            },
        },
        "spec": {"nodeName": NODE, "containers": [
            {"name": w.container, "image": "cuda-app", "resources": {"limits": limits}}
        ]},
        "status": status,
    }))
    .unwrap_or_else(|e| panic!("pod {}: {e}", w.pod));
    PodInfo::from_pod(
        &pod,
        &gm_core::ResourceNames::default(),
        &gm_core::annotations::Keys::default(),
    )
    .unwrap_or_else(|| panic!("pod {} has no name", w.pod))
}

/// The simulated node 40 s into its script (all four processes run), with two XID 31 on card 3
/// at start. The clock is real, so the health thread and the script run as in production.
fn backend() -> Arc<SimulatedBackend> {
    let path = example_node("h100-sxm-8.yaml");
    let mut text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.push_str(&format!(
        "\nevents:\n  - {{atMs: 0, card: {CARD3}, kind: xid, code: 31}}\n  - {{atMs: 1, card: {CARD3}, kind: xid, code: 31}}\n"
    ));
    let desc = NodeDescription::parse(&text, "h100-sxm-8.yaml with two XID 31 on card 3")
        .unwrap_or_else(|e| panic!("{e}"));
    let start = Instant::now()
        .checked_sub(Duration::from_secs(40))
        .unwrap_or_else(|| panic!("the machine has been up for less than 40 s"));
    Arc::new(SimulatedBackend::new(
        desc,
        Arc::new(SystemClock::starting_at(start)),
    ))
}

fn series(family: &str, pod: &str, extra: (&str, &str)) -> String {
    let w = workload(pod);
    format!(
        "{family}{{pod_name=\"{}\",namespace=\"{}\",node=\"{NODE}\",container_name=\"{}\",{}=\"{}\"}}",
        w.pod, w.namespace, w.container, extra.0, extra.1
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_the_daemon_and_answers_each_tkestack_family() {
    // The node: kubelet, pod-resources, pods, cgroup tree, and the daemon with its metrics
    // server on a free port.
    let root = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let mut config = DaemonConfig::under(root.path(), NODE);
    std::fs::write(&config.limiter_library, b"\x7fELF stand-in for libvcuda.so")
        .unwrap_or_else(|e| panic!("library: {e}"));
    let kubelet = FakeKubelet::start(&config.kubelet_dir).await;
    let podres = FakePodResources::start(&config.pod_resources_socket).await;
    let fixture = cgroup::new_node(
        &root.path().join("host"),
        CgroupVersion::V2,
        CgroupDriver::Systemd,
    );
    let pods = Arc::new(InMemoryPods::new());
    for (i, w) in WORKLOADS.iter().enumerate() {
        pods.insert(pod(w, i, false));
        fixture.add_container(&FixtureContainer {
            pod_uid: cgroup::pod_uid(w.seed),
            container_id: cgroup::container_id(w.seed),
            runtime: Runtime::Containerd,
            qos: w.qos,
            pids: vec![w.pid],
            nested_pids: vec![],
        });
    }
    config.standalone = false;
    config.gc_interval = Duration::from_secs(3600);
    config.metrics = Some(MetricsConfig {
        addr: ([127, 0, 0, 1], 0).into(),
        cgroup: CgroupConfig {
            cgroup_root: fixture.cgroup_root.clone(),
            proc_root: fixture.proc_root.clone(),
            version: None,
            driver: None,
        },
        version: "test".into(),
        cache_ttl: Duration::ZERO,
        sample_timeout: Duration::from_secs(2),
    });
    let daemon = Daemon::start(
        config,
        Dependencies {
            backend: backend(),
            pods: Some(Arc::clone(&pods) as Arc<dyn PodSource>),
            cluster: None,
        },
    )
    .await
    .unwrap_or_else(|e| panic!("daemon: {e}"));
    let target = daemon
        .handle()
        .metrics_addr()
        .unwrap_or_else(|| panic!("the daemon serves no metrics"));
    kubelet.wait_registrations(2).await;
    kubelet
        .wait_devices(CORE, STEP, |m| m.devices.len() == 800)
        .await;
    kubelet
        .wait_devices(MEMORY, STEP, |m| !m.devices.is_empty())
        .await;

    // The kubelet admits the pods one at a time, in the order they were bound; the daemon
    // places each on the cards the scheduler assigned. Then the containers run.
    let mut dm = DeviceManager::new(&kubelet, &podres, gm_core::ResourceNames::default());
    for (i, w) in WORKLOADS.iter().enumerate() {
        let request = PodRequest::single(w.namespace, w.pod, w.container, w.cores, w.blocks);
        let admitted = dm
            .admit(&request)
            .await
            .unwrap_or_else(|e| panic!("admitting {}: {e}", w.pod));
        let c = admitted
            .container(w.container)
            .unwrap_or_else(|| panic!("{} has no container {}", w.pod, w.container));
        assert_eq!(c.cards(), w.cards, "{}: cards", w.pod);
        pods.insert(pod(w, i, true));
    }

    let prom = Prometheus::start(target).await;
    let deadline = Instant::now() + DEADLINE;

    // The target is up, and Prometheus kept every sample of a scrape.
    assert_eq!(prom.value("up{job=\"gpu-manager\"}", deadline).await, 1.0);
    let text = http_get(target, "/metrics")
        .await
        .unwrap_or_else(|| panic!("GET http://{target}/metrics failed"));
    let exposed = text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .count() as f64;
    assert_eq!(
        prom.value("scrape_samples_scraped{job=\"gpu-manager\"}", deadline)
            .await,
        exposed,
        "Prometheus kept a different number of samples than the daemon exposes"
    );

    #[rustfmt::skip]
    let checks: Vec<(String, f64)> = vec![
        // Usage per card and in total: the processes' SM % and MiB, mapped through cgroups.
        (series("container_gpu_utilization", "train-a", ("gpu", "gpu0")), 45.0),
        (series("container_gpu_utilization", "train-a", ("gpu", "total")), 45.0),
        (series("container_gpu_utilization", "train-b", ("gpu", "gpu0")), 20.0),
        (series("container_gpu_utilization", "notebook", ("gpu", "gpu2")), 35.0),
        (series("container_gpu_utilization", "big-job", ("gpu", "gpu5")), 90.0),
        (series("container_gpu_utilization", "big-job", ("gpu", "gpu6")), 0.0),
        (series("container_gpu_utilization", "big-job", ("gpu", "total")), 90.0),
        (series("container_gpu_memory_total", "train-a", ("gpu_memory", "gpu0")), 20480.0),
        (series("container_gpu_memory_total", "train-b", ("gpu_memory", "gpu0")), 8192.0),
        (series("container_gpu_memory_total", "train-b", ("gpu_memory", "total")), 8192.0),
        (series("container_gpu_memory_total", "notebook", ("gpu_memory", "total")), 12288.0),
        (series("container_gpu_memory_total", "big-job", ("gpu_memory", "gpu6")), 0.0),
        (series("container_gpu_memory_total", "big-job", ("gpu_memory", "total")), 65536.0),
        // Requests: vcuda-core / 100 and vcuda-memory × 256 MiB (whole cards: all of them).
        (series("container_request_gpu_utilization", "train-a", ("req_of_gpu", "total")), 0.3),
        (series("container_request_gpu_utilization", "train-b", ("req_of_gpu", "total")), 0.4),
        (series("container_request_gpu_utilization", "notebook", ("req_of_gpu", "total")), 0.5),
        (series("container_request_gpu_utilization", "big-job", ("req_of_gpu", "total")), 2.0),
        (series("container_request_gpu_memory", "train-a", ("req_of_gpu_memory", "total")), 5120.0),
        (series("container_request_gpu_memory", "train-b", ("req_of_gpu_memory", "total")), 8192.0),
        (series("container_request_gpu_memory", "notebook", ("req_of_gpu_memory", "total")), 12288.0),
        (series("container_request_gpu_memory", "big-job", ("req_of_gpu_memory", "total")), 163118.0),
        // Node and card families, including the XID counter and the card info family
        // (OpenMetrics `counter` and `info` types on the wire).
        (format!("gpu_manager_card_vcuda_core_allocated{{node=\"{NODE}\",gpu=\"gpu0\"}}"), 70.0),
        (format!("gpu_manager_card_vcuda_core_allocated{{node=\"{NODE}\",gpu=\"gpu6\"}}"), 100.0),
        (format!("gpu_manager_card_xid_errors_total{{node=\"{NODE}\",gpu=\"gpu3\",xid=\"31\"}}"), 2.0),
        (format!("gpu_manager_card_healthy{{node=\"{NODE}\",gpu=\"gpu3\"}}"), 1.0),
        (format!("gpu_manager_card_info{{node=\"{NODE}\",gpu=\"gpu5\",model=\"NVIDIA H100 80GB HBM3\"}}"), 1.0),
        (format!("gpu_manager_allocated_containers{{node=\"{NODE}\"}}"), 4.0),
        (format!("gpu_manager_card_unmapped_processes{{node=\"{NODE}\",gpu=\"gpu0\"}}"), 0.0),
        (format!("gpu_manager_device_plugin_registered{{node=\"{NODE}\"}}"), 1.0),
    ];
    for (promql, want) in &checks {
        let got = prom.value(promql, deadline).await;
        assert!(
            (got - want).abs() < 1e-9,
            "{promql}: Prometheus says {got}, want {want}"
        );
    }
    // Aggregations over the families, as a dashboard would run them.
    let requested = prom
        .value(
            "sum(container_request_gpu_utilization{namespace=\"ml\"})",
            deadline,
        )
        .await;
    assert!(
        (requested - 1.2).abs() < 1e-9,
        "ml requests {requested}, want 0.3+0.4+0.5"
    );
    let per_card = prom
        .series(
            &format!("container_gpu_utilization{{node=\"{NODE}\",gpu!=\"total\"}}"),
            deadline,
        )
        .await;
    assert_eq!(
        per_card, 5,
        "one usage series per held card (train-a, train-b, notebook, big-job ×2)"
    );

    // Every query of the Grafana dashboard returns data from this node.
    for (title, promql) in dashboard_queries() {
        let n = prom.series(&promql, deadline).await;
        assert!(
            n > 0,
            "dashboard panel {title:?}: {promql} returned nothing"
        );
    }
    daemon.shutdown().await;
}
