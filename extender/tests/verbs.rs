//! The extender verbs over real HTTP, with request bodies shaped exactly like kube-scheduler's
//! (tests/fixtures), in both `nodeCacheCapable` modes, against a fake API server.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use gm_extender::{App, ClusterState, Leadership, Metrics};
use serde_json::{json, Value};

fn fixture(name: &str) -> Value {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap()
}

fn fixture_text(name: &str) -> String {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap()
}

/// A fake API server holding the fixture cluster, and an extender on it.
async fn fixture_cluster() -> (FakeApi, Running) {
    let api = FakeApi::start().await;
    let cluster = fixture("cluster.json");
    for n in cluster["nodes"].as_array().unwrap() {
        api.put_node(n.clone());
    }
    for p in cluster["pods"].as_array().unwrap() {
        api.put_pod(p.clone());
    }
    let ext = start_extender(&api, args()).await;
    // The existing pods are charged once the informer has shown them.
    eventually(Duration::from_secs(5), "existing pods charged", || {
        ext.state.gpu_pod_count() == 3
    })
    .await;
    (api, ext)
}

const INFER_ON_FULL_A100: &str =
    "container \"infer\": card 0: 0 vcuda-core and 0 memory blocks free, 50 and 16 requested";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filter_in_nodes_mode_returns_every_fitting_node_verbatim_and_a_reason_per_failed_node() {
    let (_api, ext) = fixture_cluster().await;
    let request = fixture("filter_nodes_mode.json");
    let (code, text) = call(
        ext.addr,
        "POST",
        "/scheduler/filter",
        fixture_text("filter_nodes_mode.json"),
    )
    .await;
    assert_eq!(code, 200, "{text}");
    let r: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(r["Error"], "");
    assert_eq!(r["NodeNames"], Value::Null);
    // The passing node comes back exactly as the scheduler sent it.
    assert_eq!(r["Nodes"]["items"], json!([request["Nodes"]["items"][0]]));
    assert_eq!(
        r["FailedNodes"],
        json!({ "gpu-node-2": INFER_ON_FULL_A100 })
    );
    let unresolvable = r["FailedAndUnresolvableNodes"]["cpu-node-3"]
        .as_str()
        .unwrap();
    assert!(
        unresolvable.starts_with("node has no GPU"),
        "{unresolvable}"
    );
    ext.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filter_in_node_names_mode_answers_with_names() {
    let (_api, ext) = fixture_cluster().await;
    let r = post(
        ext.addr,
        "/scheduler/filter",
        &fixture("filter_node_names_mode.json"),
    )
    .await;
    assert_eq!(r["Nodes"], Value::Null);
    assert_eq!(r["NodeNames"], json!(["gpu-node-1"]));
    assert_eq!(
        r["FailedNodes"],
        json!({ "gpu-node-2": INFER_ON_FULL_A100 })
    );
    assert!(r["FailedAndUnresolvableNodes"]["cpu-node-3"].is_string());
    ext.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prioritize_scores_every_candidate_zero_to_ten_in_both_modes() {
    let (api, ext) = fixture_cluster().await;
    // A second T4 node, empty: binpack prefers the used gpu-node-1.
    api.add_node("gpu-node-4", Some(&cards(2, 15109)));
    eventually(Duration::from_secs(5), "node 4 seen", || {
        ext.state.gpu_node_count() == 3
    })
    .await;
    let mut req = fixture("prioritize_node_names_mode.json");
    req["NodeNames"] = json!(["gpu-node-1", "gpu-node-2", "gpu-node-4"]);
    let r = post(ext.addr, "/scheduler/prioritize", &req).await;
    assert_eq!(
        r,
        json!([{"Host": "gpu-node-1", "Score": 10}, {"Host": "gpu-node-2", "Score": 0}, {"Host": "gpu-node-4", "Score": 0}])
    );
    let r = post(
        ext.addr,
        "/scheduler/prioritize",
        &fixture("prioritize_nodes_mode.json"),
    )
    .await;
    assert_eq!(
        r,
        json!([{"Host": "gpu-node-1", "Score": 10}, {"Host": "gpu-node-2", "Score": 0}, {"Host": "cpu-node-3", "Score": 0}])
    );
    ext.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bind_chooses_the_cards_writes_the_annotations_and_binds() {
    let (api, ext) = fixture_cluster().await;
    let r = post(ext.addr, "/scheduler/bind", &fixture("bind.json")).await;
    assert_eq!(r, json!({"Error": ""}));
    let pod = api.pod("ml", "infer-7c9f").unwrap();
    assert_eq!(pod["spec"]["nodeName"], "gpu-node-1");
    let ann = &pod["metadata"]["annotations"];
    // Card 0 has 40 cores left after the notebook's 60: the share goes to card 1.
    assert_eq!(ann["tencent.com/predicate-gpu-idx-0"], "1");
    assert_eq!(ann["tencent.com/predicate-node"], "gpu-node-1");
    assert_eq!(ann["tencent.com/gpu-assigned"], "false");
    let t: u64 = ann["tencent.com/predicate-time"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(t > 1_700_000_000_000_000_000);
    // The non-GPU sidecar container gets no card annotation.
    assert!(ann.get("tencent.com/predicate-gpu-idx-1").is_none());
    let cards = ext.state.node_cards("gpu-node-1").unwrap();
    assert_eq!((cards[0].free_cores, cards[1].free_cores), (40, 50));
    ext.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_bind_is_idempotent() {
    let (api, ext) = fixture_cluster().await;
    let r = post(ext.addr, "/scheduler/bind", &fixture("bind.json")).await;
    assert_eq!(r["Error"], "");
    let first = api.pod("ml", "infer-7c9f").unwrap()["metadata"]["annotations"].clone();
    // The scheduler retries (e.g. it timed out waiting for our answer).
    let r = post(ext.addr, "/scheduler/bind", &fixture("bind.json")).await;
    assert_eq!(r["Error"], "");
    let pod = api.pod("ml", "infer-7c9f").unwrap();
    assert_eq!(pod["metadata"]["annotations"], first);
    assert_eq!(pod["spec"]["nodeName"], "gpu-node-1");
    // Charged once.
    let cards = ext.state.node_cards("gpu-node-1").unwrap();
    assert_eq!(cards[1].free_cores, 50);
    // And again once the informer has shown the bound pod.
    eventually(Duration::from_secs(5), "reservation confirmed", || {
        ext.state.reservation_count() == 0
    })
    .await;
    let r = post(ext.addr, "/scheduler/bind", &fixture("bind.json")).await;
    assert_eq!(r["Error"], "");
    assert_eq!(
        ext.state.node_cards("gpu-node-1").unwrap()[1].free_cores,
        50
    );
    assert_eq!(
        api.pod("ml", "infer-7c9f").unwrap()["metadata"]["annotations"],
        first
    );
    ext.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_that_ask_for_no_gpu_pass_through_untouched() {
    let (api, ext) = fixture_cluster().await;
    let req = fixture("filter_plain_pod_node_names_mode.json");
    let r = post(ext.addr, "/scheduler/filter", &req).await;
    assert_eq!(r["NodeNames"], req["NodeNames"]);
    assert_eq!(r["FailedNodes"], json!({}));
    assert_eq!(r["FailedAndUnresolvableNodes"], json!({}));
    let r = post(ext.addr, "/scheduler/prioritize", &req).await;
    assert!(r.as_array().unwrap().iter().all(|h| h["Score"] == 0), "{r}");
    // Nodes mode: the node objects come back unchanged.
    let mut nodes_req = fixture("filter_nodes_mode.json");
    nodes_req["Pod"] = req["Pod"].clone();
    for verb in ["filter", "predicates"] {
        let r = post(ext.addr, &format!("/scheduler/{verb}"), &nodes_req).await;
        assert_eq!(r["Nodes"]["items"], nodes_req["Nodes"]["items"], "{verb}");
    }
    // Binding a plain pod just binds it.
    let bind = json!({"PodName": "batch-cpu-1", "PodNamespace": "default",
                      "PodUID": "3f1e2d4c-5b6a-4978-8a1b-2c3d4e5f6a7c", "Node": "cpu-node-3"});
    let r = post(ext.addr, "/scheduler/bind", &bind).await;
    assert_eq!(r["Error"], "");
    let pod = api.pod("default", "batch-cpu-1").unwrap();
    assert_eq!(pod["spec"]["nodeName"], "cpu-node-3");
    assert!(pod["metadata"]
        .get("annotations")
        .is_none_or(|a| a.as_object().unwrap().is_empty()));
    ext.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_json_gets_400_with_the_parse_error_and_the_server_keeps_serving() {
    let (_api, ext) = fixture_cluster().await;
    for verb in ["filter", "prioritize", "predicates", "bind"] {
        let path = format!("/scheduler/{verb}");
        let (code, text) = call(ext.addr, "POST", &path, "{\"Pod\": ").await;
        assert_eq!(code, 400, "{verb}: {text}");
        let what = if verb == "bind" {
            "ExtenderBindingArgs"
        } else {
            "ExtenderArgs"
        };
        assert!(
            text.contains(&format!(
                "the request body is not a valid {what}: EOF while parsing"
            )),
            "{verb}: {text}"
        );
        let (code, text) = call(
            ext.addr,
            "POST",
            &path,
            "{\"NodeNames\": 5, \"PodName\": 5}",
        )
        .await;
        assert_eq!(code, 400, "{verb}: {text}");
        assert!(text.contains("invalid type: integer `5`"), "{verb}: {text}");
        let (code, _) = call(ext.addr, "POST", &path, vec![0xff, 0xfe]).await;
        assert_eq!(code, 400, "{verb}");
    }
    let (code, text) = call(
        ext.addr,
        "POST",
        "/scheduler/filter",
        "{\"Nodes\":{\"items\":[{\"metadata\":{}}]}}",
    )
    .await;
    assert_eq!(code, 400);
    assert!(
        text.contains("Nodes.items[0]: the node has no metadata.name"),
        "{text}"
    );
    let (code, body) = call(ext.addr, "GET", "/healthz", "").await;
    assert_eq!((code, body.as_str()), (200, "ok"));
    ext.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_pod_or_nodes_and_bad_requests_are_errors_not_panics() {
    let (_api, ext) = fixture_cluster().await;
    let r = post(
        ext.addr,
        "/scheduler/filter",
        &json!({"Pod": null, "NodeNames": ["gpu-node-1"]}),
    )
    .await;
    assert_eq!(r["Error"], "ExtenderArgs has no Pod");
    let pod = fixture("filter_node_names_mode.json")["Pod"].clone();
    let r = post(ext.addr, "/scheduler/filter", &json!({"Pod": pod})).await;
    assert_eq!(r["Error"], "ExtenderArgs has neither Nodes nor NodeNames");
    let mut bad = pod.clone();
    bad["spec"]["containers"][0]["resources"]["limits"]["tencent.com/vcuda-core"] = json!("150");
    bad["spec"]["containers"][0]["resources"]["requests"]["tencent.com/vcuda-core"] = json!("150");
    let r = post(
        ext.addr,
        "/scheduler/filter",
        &json!({"Pod": bad, "NodeNames": ["gpu-node-1"]}),
    )
    .await;
    let e = r["Error"].as_str().unwrap();
    assert!(
        e.contains("container \"infer\": tencent.com/vcuda-core=150 is invalid: use 1-99"),
        "{e}"
    );
    let r = post(
        ext.addr,
        "/scheduler/bind",
        &json!({"PodName": "infer-7c9f"}),
    )
    .await;
    assert!(
        r["Error"]
            .as_str()
            .unwrap()
            .contains("missing PodNamespace, PodUID, Node"),
        "{r}"
    );
    // Binding a pod that was recreated under the same name is refused.
    let mut stale = fixture("bind.json");
    stale["PodUID"] = json!("00000000-0000-0000-0000-000000000000");
    let r = post(ext.addr, "/scheduler/bind", &stale).await;
    assert!(
        r["Error"].as_str().unwrap().contains("it was recreated"),
        "{r}"
    );
    ext.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pod_policy_annotation_overrides_the_default_and_unknown_ones_are_refused() {
    let api = FakeApi::start().await;
    api.add_node("busy", Some(&cards(2, 4096)));
    api.add_node("empty", Some(&cards(2, 4096)));
    api.put_pod(pod_json(
        "default",
        "old",
        &[(50, 2)],
        &[
            ("tencent.com/predicate-gpu-idx-0", "0"),
            ("tencent.com/predicate-node", "busy"),
        ],
    ));
    let ext = start_extender(&api, args()).await;
    eventually(Duration::from_secs(5), "old charged", || {
        ext.state
            .node_cards("busy")
            .is_some_and(|c| c[0].free_cores == 50)
    })
    .await;
    let names = json!(["busy", "empty"]);
    let score = |v: &Value| -> Vec<i64> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|h| h["Score"].as_i64().unwrap())
            .collect()
    };
    let mut pod = pod_json("default", "new", &[(10, 1)], &[]);
    pod["metadata"]["uid"] = json!("u-new");
    let r = post(
        ext.addr,
        "/scheduler/prioritize",
        &json!({"Pod": pod, "NodeNames": names}),
    )
    .await;
    assert_eq!(score(&r), vec![10, 0]);
    let mut spread = pod_json(
        "default",
        "new",
        &[(10, 1)],
        &[("tencent.com/gpu-policy", "spread")],
    );
    spread["metadata"]["uid"] = json!("u-new");
    let r = post(
        ext.addr,
        "/scheduler/prioritize",
        &json!({"Pod": spread, "NodeNames": names}),
    )
    .await;
    assert_eq!(score(&r), vec![0, 10]);
    let mut bad = pod_json(
        "default",
        "new",
        &[(10, 1)],
        &[("tencent.com/gpu-policy", "fastest")],
    );
    bad["metadata"]["uid"] = json!("u-new");
    let r = post(
        ext.addr,
        "/scheduler/filter",
        &json!({"Pod": bad, "NodeNames": names}),
    )
    .await;
    assert_eq!(
        r["Error"],
        "pod default/new: annotation tencent.com/gpu-policy: unknown placement policy \"fastest\": use one of binpack, spread, topology, fgd, fgd+"
    );
    let (code, text) = call(
        ext.addr,
        "POST",
        "/scheduler/prioritize",
        json!({"Pod": bad, "NodeNames": names}).to_string(),
    )
    .await;
    assert_eq!(code, 422, "{text}");
    ext.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_models_are_hard_and_unresolvable_elsewhere() {
    let (_api, ext) = fixture_cluster().await;
    let mut req = fixture("filter_node_names_mode.json");
    req["Pod"]["metadata"]["annotations"] = json!({"tencent.com/gpu-models": "A100"});
    let r = post(ext.addr, "/scheduler/filter", &req).await;
    assert_eq!(r["NodeNames"], json!([]));
    assert_eq!(
        r["FailedAndUnresolvableNodes"]["gpu-node-1"],
        "no card allowed by gpu-models=A100; node has Tesla T4"
    );
    // The A100 node is allowed but full: preemption could help there.
    assert_eq!(r["FailedNodes"]["gpu-node-2"], INFER_ON_FULL_A100);
    ext.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_stays_false_until_the_caches_sync_and_decisions_wait_for_it() {
    let api = FakeApi::start().await;
    let settings = args().settings().unwrap();
    let state = Arc::new(ClusterState::new(
        settings.names.clone(),
        settings.reservation_ttl,
    ));
    let app = App::new(
        state.clone(),
        api.client(),
        &settings,
        Arc::new(Leadership::always()),
        Metrics::new().unwrap(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, gm_extender::router(app)).await });
    let (code, body) = call(addr, "GET", "/readyz", "").await;
    assert_eq!(code, 503);
    assert!(body.contains("caches have not synced"), "{body}");
    let (code, body) = call(
        addr,
        "POST",
        "/scheduler/filter",
        fixture_text("filter_node_names_mode.json"),
    )
    .await;
    assert_eq!(code, 503);
    assert!(body.contains("gpu-admission is not ready"), "{body}");
    assert_eq!(call(addr, "GET", "/healthz", "").await.0, 200);
    state.mark_nodes_synced();
    assert_eq!(call(addr, "GET", "/readyz", "").await.0, 503);
    state.mark_pods_synced();
    assert_eq!(
        call(addr, "GET", "/readyz", "").await,
        (200, "ok".to_string())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_decisions_by_verb_and_outcome() {
    let (_api, ext) = fixture_cluster().await;
    post(
        ext.addr,
        "/scheduler/filter",
        &fixture("filter_node_names_mode.json"),
    )
    .await;
    post(
        ext.addr,
        "/scheduler/filter",
        &fixture("filter_plain_pod_node_names_mode.json"),
    )
    .await;
    call(ext.addr, "POST", "/scheduler/filter", "nope").await;
    post(ext.addr, "/scheduler/bind", &fixture("bind.json")).await;
    let (code, text) = call(ext.addr, "GET", "/metrics", "").await;
    assert_eq!(code, 200);
    for line in [
        "gpu_admission_extender_decisions_total{outcome=\"fit\",verb=\"filter\"} 1",
        "gpu_admission_extender_decisions_total{outcome=\"passthrough\",verb=\"filter\"} 1",
        "gpu_admission_extender_decisions_total{outcome=\"bad_request\",verb=\"filter\"} 1",
        "gpu_admission_extender_decisions_total{outcome=\"bound\",verb=\"bind\"} 1",
        "gpu_admission_extender_decision_seconds_count{verb=\"filter\"} 3",
        "gpu_admission_extender_cache_synced 1",
        "gpu_admission_extender_leader 1",
        "gpu_admission_extender_gpu_nodes 2",
    ] {
        assert!(text.contains(line), "missing {line:?} in\n{text}");
    }
    assert!(
        text.contains("gpu_admission_extender_reservations "),
        "{text}"
    );
    ext.stop().await;
}

// ---- gpu-admission §6.1 (TestDeviceFilter) through the HTTP verbs ----

/// Pod name, containers (vcuda-core, vcuda-memory), expected node, expected card list per container.
type Step<'a> = (&'a str, &'a [(u32, u32)], &'a str, &'a [Option<&'a str>]);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gpu_admission_golden_sequence_through_filter_prioritize_and_bind() {
    let api = FakeApi::start().await;
    // Three nodes, each 2 cards of 4 memory blocks (vcuda-core=200, vcuda-memory=8).
    for n in ["testnode0", "testnode1", "testnode2"] {
        api.add_node(n, Some(&cards(2, 1024)));
    }
    let ext = start_extender(&api, args()).await;
    let nodes: Vec<String> = ["testnode0", "testnode1", "testnode2"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let mut conn = Conn::open(ext.addr).await;
    let steps: [Step; 4] = [
        (
            "pod-0",
            &[(10, 1), (10, 1)],
            "testnode0",
            &[Some("0"), Some("0")],
        ),
        (
            "pod-1",
            &[(100, 3), (80, 3)],
            "testnode1",
            &[Some("0"), Some("1")],
        ),
        (
            "pod-2",
            &[(200, 10), (0, 0)],
            "testnode2",
            &[Some("0,1"), None],
        ),
        ("pod-3", &[(10, 2), (0, 0)], "testnode0", &[Some("0"), None]),
    ];
    for (name, containers, want, idx) in steps {
        api.add_pod("test-ns", name, containers);
        let pod = api.pod("test-ns", name).unwrap();
        if name == "pod-3" {
            let f = post(
                ext.addr,
                "/scheduler/filter",
                &json!({"Pod": pod, "NodeNames": nodes}),
            )
            .await;
            assert_eq!(f["NodeNames"], json!(["testnode0"]));
            assert_eq!(
                f["FailedNodes"]["testnode1"],
                "container \"c0\": card 1: 1 memory blocks free, 2 requested"
            );
            assert_eq!(
                f["FailedNodes"]["testnode2"],
                "container \"c0\": card 0: 0 vcuda-core and 0 memory blocks free, 10 and 2 requested"
            );
        }
        let got = schedule(&mut conn, &pod, &nodes).await.unwrap();
        assert_eq!(got, want, "{name}");
        let ann = api.pod("test-ns", name).unwrap()["metadata"]["annotations"].clone();
        for (i, want_idx) in idx.iter().enumerate() {
            let key = format!("tencent.com/predicate-gpu-idx-{i}");
            assert_eq!(
                ann.get(&key).and_then(Value::as_str),
                *want_idx,
                "{name} {key}"
            );
        }
        assert_eq!(ann["tencent.com/predicate-node"], want);
        assert_eq!(ann["tencent.com/gpu-assigned"], "false");
        assert!(
            ann["tencent.com/predicate-time"]
                .as_str()
                .unwrap()
                .parse::<u64>()
                .unwrap()
                > 0
        );
        api.set_phase("test-ns", name, "Running");
    }
    ext.stop().await;
}

// ---- the legacy predicates verb ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_predicates_writes_the_annotations_at_filter_and_answers_one_node() {
    let (api, ext) = fixture_cluster().await;
    let req = fixture("predicates_nodes_mode.json");
    let r = post(ext.addr, "/scheduler/predicates", &req).await;
    assert_eq!(r["Error"], "");
    assert_eq!(r["Nodes"]["items"], json!([req["Nodes"]["items"][0]]));
    assert_eq!(r["FailedNodes"]["gpu-node-2"], INFER_ON_FULL_A100);
    assert!(r["FailedAndUnresolvableNodes"]["cpu-node-3"].is_string());
    let pod = api.pod("ml", "infer-7c9f").unwrap();
    let ann = &pod["metadata"]["annotations"];
    assert_eq!(ann["tencent.com/predicate-node"], "gpu-node-1");
    assert_eq!(ann["tencent.com/predicate-gpu-idx-0"], "1");
    assert_eq!(ann["tencent.com/gpu-assigned"], "false");
    // The scheduler binds by itself in this mode.
    assert_eq!(pod["spec"].get("nodeName"), None);
    assert_eq!(
        ext.state.node_cards("gpu-node-1").unwrap()[1].free_cores,
        50
    );
    ext.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_refiltered_after_its_assignment_gets_its_node_back() {
    let (api, ext) = fixture_cluster().await;
    let mut req = fixture("filter_node_names_mode.json");
    let r = post(ext.addr, "/scheduler/predicates", &req).await;
    assert_eq!(r["NodeNames"], json!(["gpu-node-1"]));
    let written = api.pod("ml", "infer-7c9f").unwrap();
    let patches = api.calls().patches;
    // gpu-admission answered "pod infer-7c9f had been predicated!" here, forever.
    req["Pod"] = written.clone();
    for _ in 0..2 {
        let r = post(ext.addr, "/scheduler/predicates", &req).await;
        assert_eq!(r["Error"], "");
        assert_eq!(r["NodeNames"], json!(["gpu-node-1"]));
        assert_eq!(
            r["FailedNodes"]["gpu-node-2"],
            "pod 3f1e2d4c-5b6a-4978-8a1b-2c3d4e5f6a7b has already been matched to another node"
        );
    }
    assert_eq!(api.calls().patches, patches, "no new annotation write");
    assert_eq!(
        api.pod("ml", "infer-7c9f").unwrap()["metadata"]["annotations"],
        written["metadata"]["annotations"]
    );
    // Still charged exactly once.
    eventually(Duration::from_secs(5), "informer confirmed", || {
        ext.state.reservation_count() == 0
    })
    .await;
    assert_eq!(
        ext.state.node_cards("gpu-node-1").unwrap()[1].free_cores,
        50
    );
    // If its node is no longer a candidate, it is placed again elsewhere.
    api.add_node("gpu-node-4", Some(&cards(2, 15109)));
    eventually(Duration::from_secs(5), "node 4 seen", || {
        ext.state.gpu_node_count() == 3
    })
    .await;
    req["NodeNames"] = json!(["gpu-node-2", "gpu-node-4"]);
    let r = post(ext.addr, "/scheduler/predicates", &req).await;
    assert_eq!(r["NodeNames"], json!(["gpu-node-4"]));
    let ann = &api.pod("ml", "infer-7c9f").unwrap()["metadata"]["annotations"];
    assert_eq!(ann["tencent.com/predicate-node"], "gpu-node-4");
    assert_eq!(ann["tencent.com/predicate-gpu-idx-0"], "0");
    eventually(Duration::from_secs(5), "old node released", || {
        ext.state.node_cards("gpu-node-1").unwrap()[1].free_cores == 100
    })
    .await;
    ext.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prioritize_right_after_filter_scores_like_a_fresh_prioritize_and_sees_later_changes() {
    let api = FakeApi::start().await;
    api.add_node("n1", Some(&cards(1, 4096)));
    api.add_node("n4", Some(&cards(1, 4096)));
    api.put_pod(pod_json(
        "default",
        "old",
        &[(60, 2)],
        &[
            ("tencent.com/predicate-gpu-idx-0", "0"),
            ("tencent.com/predicate-node", "n1"),
        ],
    ));
    let ext = start_extender(&api, args()).await;
    eventually(Duration::from_secs(5), "old charged", || {
        ext.state
            .node_cards("n1")
            .is_some_and(|c| c[0].free_cores == 40)
    })
    .await;
    let mut pod = pod_json("default", "new", &[(10, 1)], &[]);
    pod["metadata"]["uid"] = json!("u-new");
    let names = json!(["n1", "n4"]);
    let f = post(
        ext.addr,
        "/scheduler/filter",
        &json!({"Pod": pod, "NodeNames": names}),
    )
    .await;
    assert_eq!(f["NodeNames"], names);
    let scores = |v: &Value| -> Vec<i64> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|h| h["Score"].as_i64().unwrap())
            .collect()
    };
    // Straight after the filter (the scheduler's order of calls).
    let after_filter = post(
        ext.addr,
        "/scheduler/prioritize",
        &json!({"Pod": pod, "NodeNames": names}),
    )
    .await;
    assert_eq!(scores(&after_filter), vec![10, 0]);
    // The same request after an unrelated change: computed afresh, same answer.
    api.add_node("n9", None);
    eventually(Duration::from_secs(5), "n9 seen", || {
        ext.state.gpu_node_count() == 2 && ext.state.node_cards("n9").is_some()
    })
    .await;
    let fresh = post(
        ext.addr,
        "/scheduler/prioritize",
        &json!({"Pod": pod, "NodeNames": names}),
    )
    .await;
    assert_eq!(fresh, after_filter);
    // Filter again, then another pod lands on n4 before prioritize: the scores follow the change.
    post(
        ext.addr,
        "/scheduler/filter",
        &json!({"Pod": pod, "NodeNames": names}),
    )
    .await;
    let other = api.add_pod("default", "other", &[(90, 2)]);
    let r = post(
        ext.addr,
        "/scheduler/bind",
        &json!({"PodName": "other", "PodNamespace": "default", "PodUID": other, "Node": "n4"}),
    )
    .await;
    assert_eq!(r["Error"], "");
    let changed = post(
        ext.addr,
        "/scheduler/prioritize",
        &json!({"Pod": pod, "NodeNames": names}),
    )
    .await;
    assert_eq!(scores(&changed), vec![0, 10]);
    ext.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reasons_follow_the_node_when_it_changes() {
    let api = FakeApi::start().await;
    api.add_node("n1", Some(&cards(1, 4096)));
    api.put_pod(pod_json(
        "default",
        "a",
        &[(60, 2)],
        &[
            ("tencent.com/predicate-gpu-idx-0", "0"),
            ("tencent.com/predicate-node", "n1"),
        ],
    ));
    let ext = start_extender(&api, args()).await;
    eventually(Duration::from_secs(5), "a charged", || {
        ext.state
            .node_cards("n1")
            .is_some_and(|c| c[0].free_cores == 40)
    })
    .await;
    let mut x = pod_json("default", "x", &[(50, 1)], &[]);
    x["metadata"]["uid"] = json!("u-x");
    let req = json!({"Pod": x, "NodeNames": ["n1"]});
    for _ in 0..2 {
        let r = post(ext.addr, "/scheduler/filter", &req).await;
        assert_eq!(
            r["FailedNodes"]["n1"],
            "container \"c0\": card 0: 40 vcuda-core free, 50 requested"
        );
    }
    // Another pod of the same kind gets the same wording.
    let mut y = pod_json("default", "y", &[(50, 1)], &[]);
    y["metadata"]["uid"] = json!("u-y");
    let r = post(
        ext.addr,
        "/scheduler/filter",
        &json!({"Pod": y, "NodeNames": ["n1"]}),
    )
    .await;
    assert_eq!(
        r["FailedNodes"]["n1"],
        "container \"c0\": card 0: 40 vcuda-core free, 50 requested"
    );
    // The node changes: the reason follows.
    api.delete_pod("default", "a");
    api.put_pod(pod_json(
        "default",
        "b",
        &[(70, 2)],
        &[
            ("tencent.com/predicate-gpu-idx-0", "0"),
            ("tencent.com/predicate-node", "n1"),
        ],
    ));
    eventually(Duration::from_secs(5), "b charged", || {
        ext.state
            .node_cards("n1")
            .is_some_and(|c| c[0].free_cores == 30)
    })
    .await;
    let r = post(ext.addr, "/scheduler/filter", &req).await;
    assert_eq!(
        r["FailedNodes"]["n1"],
        "container \"c0\": card 0: 30 vcuda-core free, 50 requested"
    );
    ext.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_unknown_at_one_filter_is_seen_by_the_next_with_the_same_list() {
    let api = FakeApi::start().await;
    api.add_node("n1", Some(&cards(1, 4096)));
    let ext = start_extender(&api, args()).await;
    let mut pod = pod_json("default", "x", &[(10, 1)], &[]);
    pod["metadata"]["uid"] = json!("u-x");
    let body = json!({"Pod": pod, "NodeNames": ["n1", "late"]}).to_string();
    let (_, text) = call(ext.addr, "POST", "/scheduler/filter", body.clone()).await;
    let r: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(r["NodeNames"], json!(["n1"]));
    assert_eq!(
        r["FailedNodes"]["late"],
        "node is not in gpu-admission's node cache yet"
    );
    api.add_node("late", Some(&cards(1, 4096)));
    eventually(Duration::from_secs(5), "late seen", || {
        ext.state.gpu_node_count() == 2
    })
    .await;
    let (_, text) = call(ext.addr, "POST", "/scheduler/filter", body).await;
    let r: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(r["NodeNames"], json!(["n1", "late"]));
    ext.stop().await;
}
