//! Extender decision benches on a large cluster: 5,000 nodes × 8 cards with 40,000 placed pods.
//!
//! * `in_memory`: filter + prioritize of one pod over all 5,000 nodes, calling the same
//!   functions the HTTP handlers call (reasons for the nodes that do not fit included);
//! * `http`: the same two verbs as JSON over HTTP/1.1 on 127.0.0.1 in `NodeNames` mode;
//! * `core`: per-node cost of `gm_core::placement::place` and of the allocation-free
//!   `fit_score` screen on the same node states;
//! * `fgd`: filter + prioritize under `fgd` and `fgd+` (workload learned from the 40,000
//!   pods), with every node's score cached, with one node changed between requests, and cold
//!   (two pod shapes alternating, so every node is scored afresh).
//!
//! Besides criterion's statistics, each group prints p50 / p99 over 2,000 timed runs
//! (criterion reports means and medians, the targets are p99).
//!
//! Run: `cargo bench -p gm-extender --bench decision`

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use gm_core::annotations::CardFilter;
use gm_core::placement::{fit_score, place, Eligibility, NodeView};
use gm_core::topology::Topology;
use gm_core::{GpuRequest, Link, NodeInventory, NodeLedger, PodGpuRequest, Policy};
use gm_extender::wire::ExtenderArgs;
use gm_extender::{App, ClusterState, ExtenderArgs as Flags, ExtenderPolicy, Leadership, Metrics};
use k8s_openapi::api::core::v1::{Node, Pod};
use serde_json::{json, Value};

const NODES: usize = 5000;
const CARDS: usize = 8;
const PODS_PER_NODE: usize = 8;
const SAMPLES: usize = 2000;

fn inventory() -> NodeInventory {
    let mut inv = NodeInventory::uniform(CARDS, "NVIDIA A100-SXM4-80GB", 81920, Link::NvLink(12));
    for c in &mut inv.cards {
        c.numa_node = Some(c.index / 4);
    }
    inv
}

/// Deterministic xorshift.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn pod_object(ns: &str, name: &str, req: GpuRequest, placed: Option<(&str, &[u32])>) -> Value {
    pod_object_cpu(ns, name, req, placed, 4)
}

fn pod_object_cpu(
    ns: &str,
    name: &str,
    req: GpuRequest,
    placed: Option<(&str, &[u32])>,
    cpu_cores: u64,
) -> Value {
    let limits = match req {
        GpuRequest::Share { cores, blocks } => json!({
            "tencent.com/vcuda-core": cores.to_string(), "tencent.com/vcuda-memory": blocks.to_string()}),
        GpuRequest::Whole { cards } => json!({"tencent.com/vcuda-core": (cards * 100).to_string()}),
    };
    let mut ann = serde_json::Map::new();
    let mut spec = json!({"containers": [{"name": "main", "image": "trainer:1", "resources": {
        "limits": limits, "requests": {"cpu": cpu_cores.to_string()}}}]});
    if let Some((node, cards)) = placed {
        let idx: Vec<String> = cards.iter().map(u32::to_string).collect();
        ann.insert(
            "tencent.com/predicate-gpu-idx-0".into(),
            json!(idx.join(",")),
        );
        ann.insert("tencent.com/predicate-node".into(), json!(node));
        ann.insert("tencent.com/gpu-assigned".into(), json!("true"));
        ann.insert(
            "tencent.com/predicate-time".into(),
            json!("1795430000000000000"),
        );
        spec["nodeName"] = json!(node);
    }
    json!({
        "metadata": {"name": name, "namespace": ns, "uid": format!("uid-{ns}-{name}"), "annotations": ann},
        "spec": spec,
        "status": {"phase": if placed.is_some() { "Running" } else { "Pending" }},
    })
}

/// The cluster: every node gets 8 pods placed by binpack on its own cards.
fn cluster() -> (Arc<ClusterState>, Vec<String>, Vec<NodeLedger>) {
    let settings = Flags::default().settings().unwrap();
    let state = Arc::new(ClusterState::new(
        settings.names.clone(),
        settings.reservation_ttl,
    ));
    let inv = inventory();
    let topo = Topology::new(&inv);
    let inv_json = inv.to_json();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut names = Vec::with_capacity(NODES);
    let mut ledgers = Vec::with_capacity(NODES);
    for n in 0..NODES {
        let name = format!("gpu-node-{n:05}");
        let node: Node = serde_json::from_value(json!({
            "metadata": {"name": name, "annotations": {"tencent.com/gpu-inventory": inv_json}},
            "status": {"allocatable": {"cpu": "128"}},
        }))
        .unwrap();
        state.apply_node(&node);
        let mut ledger = NodeLedger::new(&inv);
        let mut placed = 0;
        let mut tries = 0;
        while placed < PODS_PER_NODE && tries < 100 {
            tries += 1;
            let req = match rng.below(10) {
                0 => GpuRequest::Whole { cards: 2 },
                1 | 2 => GpuRequest::Whole { cards: 1 },
                _ => GpuRequest::Share {
                    cores: 10 * (1 + rng.below(9) as u32),
                    blocks: 16 * (1 + rng.below(12) as u32),
                },
            };
            let pod = PodGpuRequest::from_app_requests([Some(req)]);
            let view = NodeView {
                name: &name,
                inventory: &inv,
                topology: &topo,
                ledger: &ledger,
            };
            let Ok(p) = place(Policy::Binpack, &view, &pod, &CardFilter::default()) else {
                continue;
            };
            ledger.allocate(&p.assignment).unwrap();
            let cards = &p.cards[&gm_core::request::Slot::App(0)];
            let obj = pod_object_cpu(
                "load",
                &format!("p-{n:05}-{placed}"),
                req,
                Some((&name, cards)),
                2 + rng.below(10),
            );
            let pod: Pod = serde_json::from_value(obj).unwrap();
            state.apply_pod(&pod);
            placed += 1;
        }
        names.push(name);
        ledgers.push(ledger);
    }
    state.mark_nodes_synced();
    state.mark_pods_synced();
    (state, names, ledgers)
}

fn the_pod() -> Value {
    pod_object(
        "bench",
        "candidate",
        GpuRequest::Share {
            cores: 50,
            blocks: 96,
        },
        None,
    )
}

fn app(state: Arc<ClusterState>) -> App {
    app_with(state, Flags::default())
}

fn app_with(state: Arc<ClusterState>, flags: Flags) -> App {
    gm_extender::ensure_crypto_provider();
    // Filter and prioritize never call the API; the client points nowhere.
    let config = kube::Config::new("http://127.0.0.1:9".parse().unwrap());
    let client = kube::Client::try_from(config).unwrap();
    let settings = flags.settings().unwrap();
    App::new(
        state,
        client,
        &settings,
        Arc::new(Leadership::always()),
        Metrics::new().unwrap(),
    )
}

/// Time `f` SAMPLES times.
fn sample(mut f: impl FnMut()) -> Vec<Duration> {
    (0..SAMPLES)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .collect()
}

fn percentiles(mut v: Vec<Duration>) -> (Duration, Duration, Duration) {
    v.sort_unstable();
    let at = |q: f64| v[((v.len() as f64 * q) as usize).min(v.len() - 1)];
    (v[0], at(0.50), at(0.99))
}

fn report(what: &str, samples: Vec<Duration>) {
    let (min, p50, p99) = percentiles(samples);
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    eprintln!(
        "{what}: p50 {:.1} µs, p99 {:.1} µs, min {:.1} µs ({SAMPLES} runs)",
        us(p50),
        us(p99),
        us(min)
    );
}

fn benches(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _guard = rt.enter();
    let t = Instant::now();
    let (state, names, ledgers) = cluster();
    eprintln!(
        "cluster: {} nodes, {} GPU pods, built in {:.1}s",
        state.gpu_node_count(),
        state.gpu_pod_count(),
        t.elapsed().as_secs_f64()
    );
    let app = app(state);
    // The request bodies kube-scheduler would send, parsed the way the handlers parse them.
    let filter_body =
        Bytes::from(json!({"Pod": the_pod(), "Nodes": null, "NodeNames": names}).to_string());
    let args: ExtenderArgs = serde_json::from_slice(&filter_body).unwrap();
    let f = app.filter(&args).into_result();
    let passing: Vec<String> = f
        .node_names
        .clone()
        .unwrap()
        .iter()
        .map(|s| s.to_string())
        .collect();
    eprintln!(
        "candidate pod (50 vcuda-core, 96 blocks): {} of {NODES} nodes fit, {} do not",
        passing.len(),
        f.failed_nodes.len() + f.failed_and_unresolvable.len()
    );
    let prio_body =
        Bytes::from(json!({"Pod": the_pod(), "Nodes": null, "NodeNames": passing}).to_string());
    let prio_args: ExtenderArgs = serde_json::from_slice(&prio_body).unwrap();
    // A pod of another shape, to defeat the per-node reason cache.
    let other_pod = pod_object(
        "bench",
        "other",
        GpuRequest::Share {
            cores: 55,
            blocks: 96,
        },
        None,
    );
    let other_body =
        Bytes::from(json!({"Pod": other_pod, "Nodes": null, "NodeNames": names}).to_string());
    let other_args: ExtenderArgs = serde_json::from_slice(&other_body).unwrap();

    // ---- in memory ----
    let decide = || {
        let passing = app.filter(black_box(&args)).passing().len();
        let p = app.prioritize(black_box(&prio_args)).unwrap();
        black_box((passing, p.1.len()))
    };
    report(
        "in-memory filter+prioritize, 5,000 nodes",
        sample(|| {
            decide();
        }),
    );
    // The same, with a state change between the two calls (prioritize cannot reuse the
    // filter's screen and checks every node again).
    let other: Node = serde_json::from_value(json!({"metadata": {"name": "unrelated"}})).unwrap();
    let mut wall = Vec::new();
    for _ in 0..SAMPLES {
        let t = Instant::now();
        let passing = black_box(app.filter(black_box(&args)).passing().len());
        let f = t.elapsed();
        app.state().apply_node(&other);
        let t = Instant::now();
        let p = app.prioritize(black_box(&prio_args)).unwrap();
        black_box((passing, p.1.len()));
        wall.push(f + t.elapsed());
    }
    report(
        "in-memory filter+prioritize, state changed in between",
        wall,
    );
    report(
        "in-memory filter with every reason worded, reasons cached",
        sample(|| {
            black_box(
                app.filter(black_box(&args))
                    .into_result()
                    .failed_nodes
                    .len(),
            );
        }),
    );
    let mut flip = false;
    report(
        "in-memory filter with every reason worded, cold (alternating pod shapes)",
        sample(|| {
            flip = !flip;
            let a = if flip { &other_args } else { &args };
            black_box(app.filter(black_box(a)).into_result().failed_nodes.len());
        }),
    );
    let mut g = c.benchmark_group("in_memory");
    g.bench_function("filter_prioritize_5000_nodes", |b| b.iter(decide));
    g.finish();

    fgd_benches(c, &app, &args, &prio_args, &other_args, &names);

    // ---- over HTTP ----
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let router = gm_extender::router(app.clone());
    rt.spawn(async move { axum::serve(listener, router).await });
    eprintln!(
        "request bodies: filter {} KiB, prioritize {} KiB",
        filter_body.len() / 1024,
        prio_body.len() / 1024
    );
    let mut sender = rt.block_on(async {
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        let (sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(conn);
        sender
    });
    let mut round_trip = |path: &'static str, body: Bytes| {
        rt.block_on(async {
            use http_body_util::BodyExt;
            let req = http::Request::post(path)
                .header("host", "bench")
                .header("content-type", "application/json")
                .body(http_body_util::Full::new(body))
                .unwrap();
            sender.ready().await.unwrap();
            let resp = sender.send_request(req).await.unwrap();
            assert_eq!(resp.status(), 200);
            resp.into_body().collect().await.unwrap().to_bytes().len()
        })
    };
    let mut both = Vec::with_capacity(SAMPLES);
    let mut filter_only = Vec::with_capacity(SAMPLES);
    let mut prio_only = Vec::with_capacity(SAMPLES);
    for _ in 0..SAMPLES {
        let t = Instant::now();
        black_box(round_trip("/scheduler/filter", filter_body.clone()));
        let f = t.elapsed();
        let t = Instant::now();
        black_box(round_trip("/scheduler/prioritize", prio_body.clone()));
        let p = t.elapsed();
        filter_only.push(f);
        prio_only.push(p);
        both.push(f + p);
    }
    report("HTTP NodeNames filter round trip", filter_only);
    report("HTTP NodeNames prioritize round trip", prio_only);
    report("HTTP NodeNames filter+prioritize", both);
    let mut g = c.benchmark_group("http");
    g.sample_size(50);
    g.bench_function("filter_node_names_5000", |b| {
        b.iter(|| round_trip("/scheduler/filter", filter_body.clone()))
    });
    g.bench_function("prioritize_node_names_fitting", |b| {
        b.iter(|| round_trip("/scheduler/prioritize", prio_body.clone()))
    });
    g.finish();

    // ---- core, per node ----
    let inv = inventory();
    let topo = Topology::new(&inv);
    let views: Vec<NodeView<'_>> = names
        .iter()
        .zip(&ledgers)
        .map(|(n, l)| NodeView {
            name: n,
            inventory: &inv,
            topology: &topo,
            ledger: l,
        })
        .collect();
    let request = PodGpuRequest::from_app_requests([Some(GpuRequest::Share {
        cores: 50,
        blocks: 96,
    })]);
    let filter = CardFilter::default();
    let elig = Eligibility::unconstrained(&inv);
    let mut g = c.benchmark_group("core_5000_nodes");
    g.bench_function("place_every_node", |b| {
        b.iter(|| {
            views
                .iter()
                .filter(|v| place(Policy::Binpack, v, black_box(&request), &filter).is_ok())
                .count()
        })
    });
    g.bench_function("fit_score_every_node", |b| {
        b.iter(|| {
            views
                .iter()
                .filter_map(|v| fit_score(Policy::Binpack, v, black_box(&request), elig))
                .count()
        })
    });
    g.finish();
}

/// filter + prioritize under `fgd` and `fgd+` over the same 5,000 nodes.
fn fgd_benches(
    c: &mut Criterion,
    base: &App,
    args: &ExtenderArgs<'_>,
    prio_args: &ExtenderArgs<'_>,
    other_args: &ExtenderArgs<'_>,
    names: &[String],
) {
    let w = base.state().fgd_workload();
    eprintln!(
        "fgd: learned workload v{:?} from {} pods, {} task types kept",
        w.version,
        w.pods_counted,
        w.types.len()
    );
    for policy in [ExtenderPolicy::Fgd, ExtenderPolicy::FgdPlus] {
        let app = app_with(
            base.state().clone(),
            Flags {
                policy,
                ..Flags::default()
            },
        );
        let decide = |a: &ExtenderArgs<'_>, p: &ExtenderArgs<'_>| {
            let passing = app.filter(black_box(a)).passing().len();
            let s = app.prioritize(black_box(p)).unwrap();
            black_box((passing, s.1.len()))
        };
        decide(args, prio_args);
        report(
            &format!("{policy}: in-memory filter+prioritize, 5,000 nodes, scores cached"),
            sample(|| {
                decide(args, prio_args);
            }),
        );
        // Between two decisions a pod takes (then gives back) a whole free card on one node,
        // as the previous pod's bind would: that node is scored again, and under fgd+ the host
        // counts (so the scarcity of every type) usually change.
        let mut k = 0usize;
        let mut placed: Option<()> = None;
        let mut scarcity_changes = 0usize;
        let mut wall = Vec::with_capacity(SAMPLES);
        for _ in 0..SAMPLES {
            let before = app.state().fgd_workload().scarcity;
            if placed.take().is_some() {
                app.state().delete_pod("uid-bench-churn");
            } else {
                let (node, card) = loop {
                    k = (k + 7919) % names.len();
                    let cards = app.state().node_cards(&names[k]).unwrap();
                    if let Some(c) = cards.iter().position(|c| c.free_cores == 100) {
                        break (&names[k], c as u32);
                    }
                };
                let churn: Pod = serde_json::from_value(pod_object_cpu(
                    "bench",
                    "churn",
                    GpuRequest::Whole { cards: 1 },
                    Some((node, &[card])),
                    8,
                ))
                .unwrap();
                app.state().apply_pod(&churn);
                placed = Some(());
            }
            if app.state().fgd_workload().scarcity != before {
                scarcity_changes += 1;
            }
            let t = Instant::now();
            decide(args, prio_args);
            wall.push(t.elapsed());
        }
        eprintln!(
            "{policy}: the scarcity changed before {scarcity_changes} of {SAMPLES} decisions"
        );
        report(
            &format!("{policy}: in-memory filter+prioritize, one node's cards changed in between"),
            wall,
        );
        let mut flip = false;
        report(
            &format!("{policy}: in-memory filter alone, cold (every node scored; prioritize then reuses it)"),
            sample(|| {
                flip = !flip;
                let a = if flip { other_args } else { args };
                let passing = app.filter(black_box(a)).passing().len();
                black_box(passing);
            }),
        );
        let mut g = c.benchmark_group(format!("fgd_{}", policy.name().replace('+', "_plus")));
        g.sample_size(30);
        g.bench_function("filter_prioritize_cached", |b| {
            b.iter(|| decide(args, prio_args))
        });
        g.finish();
    }
}

criterion_group!(decision, benches);
criterion_main!(decision);
