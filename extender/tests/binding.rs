//! Binding under concurrency, failure and informer lag, against the fake API server.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use gm_extender::ExtenderArgs;
use serde_json::{json, Value};

const CORE: &str = "tencent.com/vcuda-core";
const MEM: &str = "tencent.com/vcuda-memory";

fn limit(c: &Value, key: &str) -> u32 {
    c["resources"]["limits"][key]
        .as_str()
        .map_or(0, |v| v.parse().unwrap())
}

/// Per node and card: (cores, blocks, whole-card holders, share holders), from the fake's pods.
fn usage(pods: &[Value]) -> BTreeMap<(String, u32), (u32, u32, u32, u32)> {
    let mut out: BTreeMap<(String, u32), (u32, u32, u32, u32)> = BTreeMap::new();
    for p in pods {
        let Some(node) = p["spec"]["nodeName"].as_str() else {
            continue;
        };
        for (i, c) in p["spec"]["containers"]
            .as_array()
            .unwrap()
            .iter()
            .enumerate()
        {
            let key = format!("tencent.com/predicate-gpu-idx-{i}");
            let Some(idx) = p["metadata"]["annotations"][&key].as_str() else {
                continue;
            };
            let (cores, blocks) = (limit(c, CORE), limit(c, MEM));
            for card in idx.split(',').map(|s| s.parse::<u32>().unwrap()) {
                let e = out.entry((node.to_string(), card)).or_default();
                if cores >= 100 {
                    e.0 += 100;
                    e.2 += 1;
                } else {
                    e.0 += cores;
                    e.1 += blocks;
                    e.3 += 1;
                }
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_pods_bound_64_at_a_time_never_overcommit_a_card() {
    let api = FakeApi::start().await;
    api.faults().kubelet_admits = true;
    // 40 nodes × 8 cards of 16 GiB (64 blocks each): 32,000 vcuda-core.
    let nodes: Vec<String> = (0..40).map(|i| format!("node-{i:02}")).collect();
    for n in &nodes {
        api.add_node(n, Some(&cards(8, 16384)));
    }
    // 1,000 pods: 950 shares (10-40 cores, 1-12 blocks) and 50 whole cards, about 85% of the
    // cluster, in a fixed pseudo-random order.
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut requests = BTreeMap::new();
    for i in 0..1000 {
        let r = next();
        let (cores, blocks) = if i % 20 == 7 {
            (100, 0)
        } else {
            (10 * (1 + r % 4) as u32, 1 + (r >> 8) as u32 % 12)
        };
        let name = format!("pod-{i:04}");
        api.add_pod("load", &name, &[(cores, blocks)]);
        requests.insert(name, (cores, blocks));
    }
    let ext = start_extender(&api, args()).await;
    eventually(Duration::from_secs(10), "pods listed", || {
        ext.state.gpu_pod_count() == 1000
    })
    .await;

    let queue = Arc::new(std::sync::Mutex::new(
        requests.keys().cloned().collect::<Vec<_>>(),
    ));
    let mut workers = Vec::new();
    for _ in 0..64 {
        let (queue, api, nodes, addr) = (queue.clone(), api.clone(), nodes.clone(), ext.addr);
        workers.push(tokio::spawn(async move {
            let mut conn = Conn::open(addr).await;
            let (mut bound, mut unschedulable, mut retries) = (0, 0, 0);
            loop {
                let Some(name) = queue.lock().unwrap().pop() else {
                    break;
                };
                let pod = api.pod("load", &name).unwrap();
                // The scheduler retries a pod whose bind lost a race, with fresh state.
                let mut attempt = 0;
                loop {
                    match schedule(&mut conn, &pod, &nodes).await {
                        Ok(_) => {
                            bound += 1;
                            break;
                        }
                        Err(e) if e.starts_with("no node fits") => {
                            unschedulable += 1;
                            break;
                        }
                        Err(e) if attempt < 50 => {
                            assert!(e.contains("does not fit node"), "{name}: {e}");
                            attempt += 1;
                            retries += 1;
                        }
                        Err(e) => panic!("{name}: gave up: {e}"),
                    }
                }
            }
            (bound, unschedulable, retries)
        }));
    }
    let (mut bound, mut unschedulable, mut retries) = (0, 0, 0);
    for w in workers {
        let (b, u, r) = w.await.unwrap();
        bound += b;
        unschedulable += u;
        retries += r;
    }
    assert_eq!(bound + unschedulable, 1000);
    assert!(
        bound >= 950,
        "only {bound} of 1000 bound ({unschedulable} unschedulable, {retries} retries)"
    );

    // No card over-allocated, whole cards exclusive.
    let pods = api.pods();
    for ((node, card), (cores, blocks, whole, shares)) in usage(&pods) {
        assert!(
            cores <= 100 && blocks <= 64,
            "{node} card {card}: {cores} cores, {blocks} blocks"
        );
        assert!(
            whole == 0 || (whole == 1 && shares == 0),
            "{node} card {card}: {whole} whole + {shares} shares"
        );
    }
    // Every annotation consistent with the binding and the request.
    let mut bound_in_api = 0;
    for p in &pods {
        let name = p["metadata"]["name"].as_str().unwrap();
        let ann = &p["metadata"]["annotations"];
        match p["spec"]["nodeName"].as_str() {
            Some(node) => {
                bound_in_api += 1;
                assert_eq!(ann["tencent.com/predicate-node"], node, "{name}");
                // The extender wrote "false"; the fake kubelet's device plugin admitted the pod.
                assert_eq!(ann["tencent.com/gpu-assigned"], "true", "{name}");
                assert!(
                    ann["tencent.com/predicate-time"]
                        .as_str()
                        .unwrap()
                        .parse::<u64>()
                        .is_ok(),
                    "{name}"
                );
                let idx = ann["tencent.com/predicate-gpu-idx-0"].as_str().unwrap();
                let n = idx.split(',').count();
                let (cores, _) = requests[name];
                assert_eq!(
                    n,
                    if cores >= 100 {
                        (cores / 100) as usize
                    } else {
                        1
                    },
                    "{name}: {idx}"
                );
            }
            None => assert!(
                ann.as_object()
                    .is_none_or(|a| a.keys().all(|k| !k.contains("predicate"))),
                "unbound {name} carries placement annotations: {ann}"
            ),
        }
    }
    assert_eq!(bound_in_api, bound);
    // Once the informer has caught up, the extender's books equal the API's truth.
    eventually(Duration::from_secs(10), "reservations confirmed", || {
        ext.state.reservation_count() == 0
    })
    .await;
    let truth = usage(&pods);
    for n in &nodes {
        let ledger = ext.state.node_cards(n).unwrap();
        for (card, st) in ledger.iter().enumerate() {
            let (cores, blocks, whole, _) = truth
                .get(&(n.clone(), card as u32))
                .copied()
                .unwrap_or_default();
            let (used_cores, used_blocks) = (100 - st.free_cores, st.total_blocks - st.free_blocks);
            if whole > 0 {
                assert_eq!((used_cores, used_blocks), (100, 64), "{n} card {card}");
            } else {
                assert_eq!(
                    (used_cores, used_blocks),
                    (cores, blocks),
                    "{n} card {card}"
                );
            }
        }
    }
    assert_eq!(ext.state.pending_charge_count(), 0);
    ext.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_binding_rolls_back_the_reservation_and_the_annotations() {
    let api = FakeApi::start().await;
    api.add_node("solo", Some(&cards(1, 4096)));
    let uid = api.add_pod("default", "victim", &[(100, 0)]);
    api.add_pod("default", "next", &[(100, 0)]);
    let ext = start_extender(&api, args()).await;
    api.faults().fail_binding.insert("victim".into());
    let bind = |name: &str, uid: &str| json!({"PodName": name, "PodNamespace": "default", "PodUID": uid, "Node": "solo"});
    let r = post(ext.addr, "/scheduler/bind", &bind("victim", &uid)).await;
    let e = r["Error"].as_str().unwrap();
    assert!(
        e.contains("pod default/victim: creating the Binding failed: injected binding failure"),
        "{e}"
    );
    // The annotations were written, then removed again.
    assert_eq!(api.calls().patches, 2);
    let victim = api.pod("default", "victim").unwrap();
    assert!(
        victim["metadata"]["annotations"]
            .as_object()
            .unwrap()
            .is_empty(),
        "{victim}"
    );
    assert_eq!(victim["spec"].get("nodeName"), None);
    // The card is free again, at once, for the next pod.
    assert_eq!(ext.state.reservation_count(), 0);
    assert!(ext.state.node_cards("solo").unwrap()[0].free_cores == 100);
    let next = api.pod("default", "next").unwrap();
    let r = post(
        ext.addr,
        "/scheduler/bind",
        &bind("next", next["metadata"]["uid"].as_str().unwrap()),
    )
    .await;
    assert_eq!(r["Error"], "");
    assert_eq!(
        api.pod("default", "next").unwrap()["metadata"]["annotations"]
            ["tencent.com/predicate-gpu-idx-0"],
        "0"
    );
    ext.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_annotation_write_releases_the_reservation() {
    let api = FakeApi::start().await;
    api.add_node("solo", Some(&cards(1, 4096)));
    let uid = api.add_pod("default", "victim", &[(30, 2)]);
    let ext = start_extender(&api, args()).await;
    api.faults().fail_patch.insert("victim".into());
    let r = post(
        ext.addr,
        "/scheduler/bind",
        &json!({"PodName": "victim", "PodNamespace": "default", "PodUID": uid, "Node": "solo"}),
    )
    .await;
    let e = r["Error"].as_str().unwrap();
    assert!(
        e.contains("writing the placement annotations failed: injected patch failure (500)"),
        "{e}"
    );
    assert_eq!(api.calls().bindings, 0, "no Binding without annotations");
    assert_eq!(ext.state.reservation_count(), 0);
    assert_eq!(ext.state.node_cards("solo").unwrap()[0].free_cores, 100);
    // Once the API recovers, the scheduler's retry succeeds.
    api.faults().fail_patch.clear();
    let r = post(
        ext.addr,
        "/scheduler/bind",
        &json!({"PodName": "victim", "PodNamespace": "default", "PodUID": uid, "Node": "solo"}),
    )
    .await;
    assert_eq!(r["Error"], "");
    ext.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reservations_survive_informer_lag() {
    let api = FakeApi::start().await;
    api.add_node("solo", Some(&cards(1, 4096)));
    let a = api.add_pod("default", "a", &[(100, 0)]);
    let b = api.add_pod("default", "b", &[(100, 0)]);
    let ext = start_extender(&api, args()).await;
    eventually(Duration::from_secs(5), "pods listed", || {
        ext.state.gpu_pod_count() == 2
    })
    .await;
    api.set_lag(Duration::from_millis(600));
    let bind = |name: &str, uid: &str| json!({"PodName": name, "PodNamespace": "default", "PodUID": uid, "Node": "solo"});
    assert_eq!(
        post(ext.addr, "/scheduler/bind", &bind("a", &a)).await["Error"],
        ""
    );
    // The informer has not shown a's annotations or binding yet; b must still not get the card.
    let pod_b = api.pod("default", "b").unwrap();
    let f = post(
        ext.addr,
        "/scheduler/filter",
        &json!({"Pod": pod_b, "NodeNames": ["solo"]}),
    )
    .await;
    assert_eq!(f["NodeNames"], json!([]));
    assert_eq!(
        f["FailedNodes"]["solo"],
        "container \"c0\": 1 whole card requested, 0 completely free"
    );
    let r = post(ext.addr, "/scheduler/bind", &bind("b", &b)).await;
    assert!(
        r["Error"]
            .as_str()
            .unwrap()
            .contains("does not fit node solo"),
        "{r}"
    );
    assert_eq!(ext.state.reservation_count(), 1);
    // When the informer catches up, the reservation ends and the informer's view holds the card.
    eventually(Duration::from_secs(5), "reservation confirmed", || {
        ext.state.reservation_count() == 0
    })
    .await;
    assert_eq!(ext.state.node_cards("solo").unwrap()[0].free_cores, 0);
    // a finishes: once the informer shows that, b fits.
    api.set_phase("default", "a", "Succeeded");
    eventually(Duration::from_secs(5), "card released", || {
        ext.state.node_cards("solo").unwrap()[0].free_cores == 100
    })
    .await;
    assert_eq!(
        post(ext.addr, "/scheduler/bind", &bind("b", &b)).await["Error"],
        ""
    );
    ext.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reservation_the_informer_never_confirms_expires_after_the_ttl() {
    let api = FakeApi::start().await;
    api.add_node("solo", Some(&cards(1, 4096)));
    let a = api.add_pod("default", "a", &[(40, 2)]);
    let ext = start_extender(
        &api,
        ExtenderArgs {
            reservation_ttl: Duration::from_secs(1),
            api_timeout: Duration::from_millis(500),
            ..args()
        },
    )
    .await;
    eventually(Duration::from_secs(5), "pod listed", || {
        ext.state.gpu_pod_count() == 1
    })
    .await;
    api.set_lag(Duration::from_secs(60));
    let r = post(
        ext.addr,
        "/scheduler/bind",
        &json!({"PodName": "a", "PodNamespace": "default", "PodUID": a, "Node": "solo"}),
    )
    .await;
    assert_eq!(r["Error"], "");
    assert_eq!(ext.state.node_cards("solo").unwrap()[0].free_cores, 60);
    eventually(Duration::from_secs(4), "reservation expired", || {
        ext.state.reservation_count() == 0
    })
    .await;
    assert_eq!(ext.state.node_cards("solo").unwrap()[0].free_cores, 100);
    // When the informer finally shows the pod, its charge is back.
    api.set_lag(Duration::ZERO);
    eventually(Duration::from_secs(5), "charged from the informer", || {
        ext.state.node_cards("solo").unwrap()[0].free_cores == 60
    })
    .await;
    ext.stop().await;
}

fn card_of(api: &FakeApi, name: &str) -> String {
    api.pod("gate", name).unwrap()["metadata"]["annotations"]["tencent.com/predicate-gpu-idx-0"]
        .as_str()
        .unwrap()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_same_sized_pod_for_another_card_is_bound_only_after_the_kubelet_admitted_the_first() {
    let api = FakeApi::start().await;
    api.add_node("n1", Some(&cards(2, 16384)));
    // a and b ask for the same 4 memory blocks but cannot share a card (50 + 60 > 100).
    api.add_pod("gate", "a", &[(50, 4)]);
    api.add_pod("gate", "b", &[(60, 4)]);
    api.add_pod("gate", "c", &[(30, 2)]);
    let mut flags = args();
    flags.bind_gate_timeout = Duration::from_secs(20);
    let ext = start_extender(&api, flags).await;
    eventually(Duration::from_secs(10), "pods listed", || {
        ext.state.gpu_pod_count() == 3
    })
    .await;
    let nodes = vec!["n1".to_string()];
    let mut conn = Conn::open(ext.addr).await;
    schedule(&mut conn, &api.pod("gate", "a").unwrap(), &nodes)
        .await
        .unwrap();
    eventually(Duration::from_secs(5), "a bound in the cache", || {
        api.pod("gate", "a").unwrap()["spec"]["nodeName"] == "n1"
    })
    .await;

    // b waits: the kubelet has not allocated a's devices, and could hand b a's card.
    let (b_pod, addr) = (api.pod("gate", "b").unwrap(), ext.addr);
    let nodes_b = nodes.clone();
    let b = tokio::spawn(async move {
        let mut conn = Conn::open(addr).await;
        schedule(&mut conn, &b_pod, &nodes_b).await
    });
    // Meanwhile c (other sizes) binds at once.
    schedule(&mut conn, &api.pod("gate", "c").unwrap(), &nodes)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(
        !b.is_finished(),
        "b was bound while a still waited for devices"
    );
    assert!(api.pod("gate", "b").unwrap()["spec"]["nodeName"].is_null());

    api.admit("gate", "a");
    assert_eq!(b.await.unwrap(), Ok("n1".to_string()));
    assert_ne!(card_of(&api, "a"), card_of(&api, "b"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bind_that_waits_too_long_at_the_gate_fails_naming_the_pod_it_waited_for() {
    let api = FakeApi::start().await;
    api.add_node("n1", Some(&cards(2, 16384)));
    api.add_pod("gate", "first", &[(100, 0)]);
    api.add_pod("gate", "second", &[(100, 0)]);
    let mut flags = args();
    flags.bind_gate_timeout = Duration::from_millis(300);
    let ext = start_extender(&api, flags).await;
    eventually(Duration::from_secs(10), "pods listed", || {
        ext.state.gpu_pod_count() == 2
    })
    .await;
    let nodes = vec!["n1".to_string()];
    let mut conn = Conn::open(ext.addr).await;
    schedule(&mut conn, &api.pod("gate", "first").unwrap(), &nodes)
        .await
        .unwrap();
    eventually(Duration::from_secs(5), "first bound in the cache", || {
        ext.state.gpu_pod_count() == 2
            && api.pod("gate", "first").unwrap()["spec"]["nodeName"] == "n1"
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let e = schedule(&mut conn, &api.pod("gate", "second").unwrap(), &nodes)
        .await
        .unwrap_err();
    assert!(
        e.contains("not bound to node n1 yet: pod(s) gate/first placed there before it")
            && e.contains("--bind-gate-timeout")
            && e.contains("the scheduler retries the pod"),
        "{e}"
    );
    // Nothing of the refused bind stays behind: no annotations, no binding, cards free.
    let second = api.pod("gate", "second").unwrap();
    assert!(second["spec"]["nodeName"].is_null());
    assert!(second["metadata"]["annotations"]["tencent.com/predicate-node"].is_null());
    // Once the kubelet admitted the first, the retry binds the other whole card.
    api.admit("gate", "first");
    let mut bound = Err(String::new());
    for _ in 0..50 {
        bound = schedule(&mut conn, &api.pod("gate", "second").unwrap(), &nodes).await;
        if bound.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(bound, Ok("n1".to_string()));
    assert_ne!(card_of(&api, "first"), card_of(&api, "second"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_placed_long_ago_and_never_confirmed_does_not_hold_up_the_gate() {
    let api = FakeApi::start().await;
    api.add_node("n1", Some(&cards(2, 16384)));
    // Bound to card 0 an hour ago; its image never pulls, so the device plugin never
    // confirms it (no gpu-assigned=true) and it stays Pending.
    let an_hour_ago = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
        - 3_600_000_000_000;
    let mut stuck = pod_json(
        "gate",
        "stuck",
        &[(60, 4)],
        &[
            ("tencent.com/predicate-node", "n1"),
            ("tencent.com/predicate-gpu-idx-0", "0"),
            ("tencent.com/predicate-time", &an_hour_ago.to_string()),
            ("tencent.com/gpu-assigned", "false"),
        ],
    );
    stuck["spec"]["nodeName"] = json!("n1");
    api.put_pod(stuck);
    // Same size, and it can only go to card 1.
    api.add_pod("gate", "next", &[(60, 4)]);
    let mut flags = args();
    flags.bind_gate_timeout = Duration::from_millis(500);
    let ext = start_extender(&api, flags).await;
    eventually(Duration::from_secs(10), "pods listed", || {
        ext.state.gpu_pod_count() == 2
    })
    .await;
    let mut conn = Conn::open(ext.addr).await;
    let started = std::time::Instant::now();
    let node = schedule(
        &mut conn,
        &api.pod("gate", "next").unwrap(),
        &["n1".to_string()],
    )
    .await;
    assert_eq!(node, Ok("n1".to_string()));
    assert!(started.elapsed() < Duration::from_millis(500));
    assert_eq!(card_of(&api, "next"), "1");
}
