//! `fgd` and `fgd+` through the HTTP verbs, and the unique top priority every policy gives,
//! against a fake API server.

mod common;

use std::time::Duration;

use common::*;
use gm_core::fgd::{Demand, TaskType};
use gm_core::placement::tie_hash;
use gm_extender::{ExtenderArgs, ExtenderPolicy};
use serde_json::{json, Value};

/// A target workload of one kind of pod: a 40-core share with 1 CPU core.
const SHARES_OF_40: &str =
    r#"{"types": [{"cpuMilli": 1000, "gpus": 1, "gpuCores": 40, "weight": 1}]}"#;

fn workload_file(dir: &tempfile::TempDir, text: &str) -> std::path::PathBuf {
    let path = dir.path().join("workload.json");
    std::fs::write(&path, text).unwrap();
    path
}

fn scores(v: &Value) -> Vec<(String, i64)> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a HostPriorityList: {v}"))
        .iter()
        .map(|h| {
            (
                h["Host"].as_str().unwrap().to_string(),
                h["Score"].as_i64().unwrap(),
            )
        })
        .collect()
}

fn top(v: &Value) -> String {
    let s = scores(v);
    let tens: Vec<&String> = s.iter().filter(|(_, x)| *x == 10).map(|(h, _)| h).collect();
    assert_eq!(tens.len(), 1, "exactly one node must get 10: {s:?}");
    tens[0].clone()
}

/// `used`: one card with 60 of its 100 vcuda-core taken (binpack's favourite, the fullest
/// node); `empty`: two free cards; `pair`: two cards, 60 vcuda-core of card 0 taken.
async fn three_nodes(api: &FakeApi) {
    api.add_node("used", Some(&cards(1, 4096)));
    api.add_node("empty", Some(&cards(2, 4096)));
    api.add_node("pair", Some(&cards(2, 4096)));
    for node in ["used", "pair"] {
        api.put_pod(pod_json(
            "default",
            &format!("old-{node}"),
            &[(60, 2)],
            &[
                ("tencent.com/predicate-gpu-idx-0", "0"),
                ("tencent.com/predicate-node", node),
            ],
        ));
    }
}

async fn charged(ext: &Running) {
    eventually(Duration::from_secs(5), "old pods charged", || {
        ["used", "pair"].iter().all(|n| {
            ext.state
                .node_cards(n)
                .is_some_and(|c| c[0].free_cores == 40)
        })
    })
    .await;
}

fn new_pod(cores: u32, annotations: &[(&str, &str)]) -> Value {
    let mut pod = pod_json("default", "new", &[(cores, 1)], annotations);
    pod["metadata"]["uid"] = json!("u-new");
    pod
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fgd_chosen_by_flag_keeps_the_room_a_half_card_pod_needs() {
    let api = FakeApi::start().await;
    three_nodes(&api).await;
    let dir = tempfile::tempdir().unwrap();
    let ext = start_extender(
        &api,
        ExtenderArgs {
            policy: ExtenderPolicy::Fgd,
            fgd_workload: Some(workload_file(&dir, SHARES_OF_40)),
            ..args()
        },
    )
    .await;
    charged(&ext).await;
    let names = json!(["used", "empty"]);
    // A 30-core share on "used" would leave 10 cores there that no 40-core share can use;
    // on "empty" it leaves 70, which still can.
    let r = post(
        ext.addr,
        "/scheduler/prioritize",
        &json!({"Pod": new_pod(30, &[]), "NodeNames": names}),
    )
    .await;
    assert_eq!(scores(&r), [("used".into(), 0), ("empty".into(), 10)]);
    // fgd+ (by annotation) agrees here; binpack (by annotation) takes the fullest node.
    for (policy, want) in [("fgd+", "empty"), ("binpack", "used")] {
        let pod = new_pod(30, &[("tencent.com/gpu-policy", policy)]);
        let r = post(
            ext.addr,
            "/scheduler/prioritize",
            &json!({"Pod": pod, "NodeNames": names}),
        )
        .await;
        assert_eq!(top(&r), want, "{policy}");
    }
    ext.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fgd_chosen_by_annotation_overrides_the_binpack_default() {
    let api = FakeApi::start().await;
    three_nodes(&api).await;
    let dir = tempfile::tempdir().unwrap();
    let ext = start_extender(
        &api,
        ExtenderArgs {
            fgd_workload: Some(workload_file(&dir, SHARES_OF_40)),
            ..args()
        },
    )
    .await;
    charged(&ext).await;
    let names = json!(["used", "empty"]);
    let ask = |pod: Value| {
        let body = json!({"Pod": pod, "NodeNames": names});
        async move { top(&post(ext.addr, "/scheduler/prioritize", &body).await) }
    };
    assert_eq!(ask(new_pod(30, &[])).await, "used");
    assert_eq!(
        ask(new_pod(30, &[("tencent.com/gpu-policy", "fgd")])).await,
        "empty"
    );
    assert_eq!(
        ask(new_pod(30, &[("tencent.com/gpu-policy", "FGD+")])).await,
        "empty"
    );
    ext.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bind_under_fgd_takes_the_card_fgd_chose_not_binpacks() {
    let api = FakeApi::start().await;
    // a and b are the same size on different cards: b's bind passes the admission gate once
    // the kubelet has admitted a.
    api.faults().kubelet_admits = true;
    three_nodes(&api).await;
    let dir = tempfile::tempdir().unwrap();
    let ext = start_extender(
        &api,
        ExtenderArgs {
            fgd_workload: Some(workload_file(&dir, SHARES_OF_40)),
            ..args()
        },
    )
    .await;
    charged(&ext).await;
    // On "pair", binpack's tightest card is card 0 (40 free); FGD keeps card 0's 40 cores
    // for a 40-core share and takes card 1, which still fits one afterwards.
    for (name, policy, want) in [("a", "fgd", "1"), ("b", "binpack", "0")] {
        let uid = api.put_pod(pod_json(
            "default",
            name,
            &[(20, 1)],
            &[("tencent.com/gpu-policy", policy)],
        ));
        eventually(Duration::from_secs(5), "pod listed", || {
            ext.state.gpu_pod("default", name).is_some()
        })
        .await;
        let r = post(
            ext.addr,
            "/scheduler/bind",
            &json!({"PodName": name, "PodNamespace": "default", "PodUID": uid, "Node": "pair"}),
        )
        .await;
        assert_eq!(r, json!({"Error": ""}), "{policy}");
        let pod = api.pod("default", name).unwrap();
        assert_eq!(
            pod["metadata"]["annotations"]["tencent.com/predicate-gpu-idx-0"], want,
            "{policy}"
        );
        assert_eq!(pod["spec"]["nodeName"], "pair");
    }
    // FGD's card is charged: card 1 holds the fgd pod, card 0 the old pod and the binpack one.
    let c = ext.state.node_cards("pair").unwrap();
    assert_eq!((c[0].free_cores, c[1].free_cores), (20, 80));
    ext.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_one_node_gets_ten_and_the_same_node_wins_every_tie() {
    let api = FakeApi::start().await;
    let nodes = ["gpu-a", "gpu-b", "gpu-c", "gpu-d", "gpu-e"];
    for n in nodes {
        api.add_node(n, Some(&cards(2, 4096)));
    }
    let dir = tempfile::tempdir().unwrap();
    let ext = start_extender(
        &api,
        ExtenderArgs {
            fgd_workload: Some(workload_file(&dir, SHARES_OF_40)),
            ..args()
        },
    )
    .await;
    // Five identical empty nodes: every policy scores them all the same.
    let hashed = *nodes.iter().min_by_key(|n| (tie_hash(n), **n)).unwrap();
    for (policy, want) in [
        ("binpack", "gpu-a"),
        ("spread", "gpu-a"),
        ("topology", "gpu-a"),
        ("fgd", hashed),
        ("fgd+", hashed),
    ] {
        let pod = new_pod(30, &[("tencent.com/gpu-policy", policy)]);
        for order in [nodes.to_vec(), nodes.iter().rev().copied().collect()] {
            // Straight after a filter (the screen is reused) and afresh.
            let body = json!({"Pod": pod, "NodeNames": order});
            let f = post(ext.addr, "/scheduler/filter", &body).await;
            assert_eq!(f["NodeNames"].as_array().unwrap().len(), 5);
            let after_filter = post(ext.addr, "/scheduler/prioritize", &body).await;
            let fresh = post(ext.addr, "/scheduler/prioritize", &body).await;
            assert_eq!(scores(&after_filter), scores(&fresh), "{policy}");
            assert_eq!(top(&fresh), want, "{policy} {order:?}");
            for (host, s) in scores(&fresh) {
                assert!(host == want || s == 9, "{policy}: {host} got {s}");
            }
        }
    }
    // A node that is really better still wins over the tie order: the fullest for binpack.
    api.put_pod(pod_json(
        "default",
        "busy",
        &[(50, 1)],
        &[
            ("tencent.com/predicate-gpu-idx-0", "0"),
            ("tencent.com/predicate-node", "gpu-e"),
        ],
    ));
    eventually(Duration::from_secs(5), "busy charged", || {
        ext.state
            .node_cards("gpu-e")
            .is_some_and(|c| c[0].free_cores == 50)
    })
    .await;
    let r = post(
        ext.addr,
        "/scheduler/prioritize",
        &json!({"Pod": new_pod(30, &[]), "NodeNames": nodes}),
    )
    .await;
    assert_eq!(top(&r), "gpu-e");
    assert!(scores(&r).iter().all(|(h, s)| h == "gpu-e" || *s == 0));
    ext.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_learned_workload_follows_the_gpu_pods_the_informer_shows() {
    let api = FakeApi::start().await;
    api.add_node("n1", Some(&cards(2, 4096)));
    let mut big = pod_json("ml", "train", &[(200, 0)], &[]);
    big["spec"]["containers"][0]["resources"]["requests"] = json!({"cpu": "8"});
    api.put_pod(big);
    let ext = start_extender(
        &api,
        ExtenderArgs {
            policy: ExtenderPolicy::Fgd,
            ..args()
        },
    )
    .await;
    // The initial list is learned as soon as the caches sync.
    let w = ext.state.fgd_workload();
    assert!(!w.configured);
    assert_eq!(w.pods_counted, 1);
    assert_eq!(
        w.types,
        vec![(
            TaskType::new(8000, Demand::Whole { cards: 2 }, [""; 0]),
            1.0
        )]
    );
    let v1 = w.version.unwrap();
    // New pods are counted as the informer shows them; a deleted one is forgotten.
    for i in 0..3 {
        api.put_pod(pod_json(
            "ml",
            &format!("infer-{i}"),
            &[(25, 1)],
            &[("tencent.com/gpu-models", "T4")],
        ));
    }
    eventually(Duration::from_secs(5), "three more pods learned", || {
        ext.state.fgd_workload().pods_counted == 4
    })
    .await;
    let w = ext.state.fgd_workload();
    assert!(w.version.unwrap() > v1);
    assert_eq!(
        w.types[0],
        (TaskType::new(0, Demand::Share { cores: 25 }, ["T4"]), 0.75)
    );
    api.delete_pod("ml", "train");
    eventually(Duration::from_secs(5), "the deleted pod forgotten", || {
        let w = ext.state.fgd_workload();
        w.pods_counted == 3 && w.types.len() == 1
    })
    .await;
    ext.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fgd_places_like_binpack_until_it_has_seen_a_gpu_pod() {
    let api = FakeApi::start().await;
    api.add_node("used", Some(&cards(2, 4096)));
    api.add_node("empty", Some(&cards(2, 4096)));
    api.put_pod(pod_json("default", "cpu-only", &[(0, 0)], &[]));
    let ext = start_extender(
        &api,
        ExtenderArgs {
            policy: ExtenderPolicy::FgdPlus,
            ..args()
        },
    )
    .await;
    assert_eq!(ext.state.fgd_workload().version, None);
    let r = post(
        ext.addr,
        "/scheduler/prioritize",
        &json!({"Pod": new_pod(30, &[]), "NodeNames": ["used", "empty"]}),
    )
    .await;
    // Both nodes are empty and equal: one gets 10, the other 9.
    let s = scores(&r);
    assert_eq!(s.iter().map(|(_, x)| x).sum::<i64>(), 19, "{s:?}");
    ext.stop().await;
}
