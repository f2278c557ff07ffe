//! GetPreferredAllocation, Allocate and PreStartContainer over real unix sockets.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use gm_device_plugin::response::LimiterConfig;
use support::*;
use tonic::Code;

const H100: &str = "h100-sxm-8.yaml";
const UUID3: &str = "GPU-36f675cc-81e7-4ef5-a8e2-5d940ed90475";
const UUID0: &str = "GPU-6513270e-269e-4d37-b2a7-4de452e6b438";
const UUID1: &str = "GPU-d23f0824-128b-4f33-8c5c-7fd0a6a3a450";

fn all(prefix: &str, cards: u32, per: u32) -> Vec<String> {
    (0..cards).flat_map(|c| ids(prefix, c, 0..per)).collect()
}

fn cards_of(v: &[String]) -> Vec<u32> {
    let set: BTreeSet<u32> = v
        .iter()
        .map(|s| s.split('-').nth(1).unwrap().parse().unwrap())
        .collect();
    set.into_iter().collect()
}

/// The container's limiter config once it satisfies `pred` (it is written off the request
/// path, right after Allocate).
async fn limiter_when(
    h: &Harness,
    resp: &gm_proto::deviceplugin::v1beta1::ContainerAllocateResponse,
    pred: impl Fn(&LimiterConfig) -> bool,
) -> LimiterConfig {
    let dir = std::path::PathBuf::from(&resp.mounts[0].host_path);
    assert!(dir.starts_with(h.config().limiter_dir));
    let t = std::time::Instant::now();
    loop {
        if let Ok(bytes) = std::fs::read(dir.join("limits.json")) {
            let cfg: LimiterConfig = serde_json::from_slice(&bytes).unwrap();
            if pred(&cfg) {
                return cfg;
            }
        }
        assert!(
            t.elapsed() < STEP,
            "limits.json in {} never matched",
            dir.display()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn limiter(
    h: &Harness,
    resp: &gm_proto::deviceplugin::v1beta1::ContainerAllocateResponse,
) -> LimiterConfig {
    limiter_when(h, resp, |_| true).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preferred_allocation_steers_both_halves_to_the_annotated_card() {
    let h = Harness::new(example_node(H100)).await;
    h.pods.insert(pod_info(
        "train",
        serde_json::json!([gpu_container("main", 30, 8)]),
        serde_json::json!({"tencent.com/predicate-gpu-idx-0": "5", "tencent.com/predicate-node": "node-a",
                           "tencent.com/gpu-assigned": "false", "tencent.com/predicate-time": "10"}),
    ));
    h.pods.insert(pod_info(
        "big",
        serde_json::json!([gpu_container("main", 200, 0)]),
        serde_json::json!({"tencent.com/predicate-gpu-idx-0": "2,3", "tencent.com/predicate-time": "20"}),
    ));
    let _d = h.daemon(true).await;
    let core = h
        .kubelet
        .preferred(CORE, &all("vcore", 8, 100), &[], 30)
        .await;
    assert_eq!(core, ids("vcore", 5, 0..30));
    let mem = h
        .kubelet
        .preferred(MEMORY, &all("vmem", 8, 318), &[], 8)
        .await;
    assert_eq!(mem, ids("vmem", 5, 0..8));
    h.kubelet.allocate(CORE, &core).await.unwrap();
    h.kubelet.allocate(MEMORY, &mem).await.unwrap();
    // The whole-card pod gets every ID of both of its cards, the kubelet's must-include first.
    let must = vec!["vcore-3-7".to_string()];
    let big = h
        .kubelet
        .preferred(CORE, &all("vcore", 8, 100), &must, 200)
        .await;
    assert_eq!(big.len(), 200);
    assert_eq!(big[0], "vcore-3-7");
    assert_eq!(cards_of(&big), vec![2, 3]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_assignment_the_node_local_policy_chooses() {
    let h = Harness::new(example_node(H100)).await;
    let _d = h.daemon(false).await;
    let first = h
        .kubelet
        .preferred(CORE, &all("vcore", 8, 100), &[], 30)
        .await;
    assert_eq!(cards_of(&first), vec![0]);
    h.kubelet.allocate(CORE, &first).await.unwrap();
    let mem = h
        .kubelet
        .preferred(MEMORY, &all("vmem", 8, 318), &[], 4)
        .await;
    assert_eq!(cards_of(&mem), vec![0], "memory follows its cores");
    h.kubelet.allocate(MEMORY, &mem).await.unwrap();
    // Best fit: the next share stacks on the busy card.
    let mut avail = all("vcore", 8, 100);
    avail.retain(|i| !first.contains(i));
    let second = h.kubelet.preferred(CORE, &avail, &[], 50).await;
    assert_eq!(second, ids("vcore", 0, 30..80));
    // Whole cards avoid it.
    let whole = h.kubelet.preferred(CORE, &avail, &[], 100).await;
    assert_eq!(whole.len(), 100);
    assert_ne!(cards_of(&whole), vec![0]);
    // A preference never fails, even for nonsense.
    assert!(h
        .kubelet
        .preferred(CORE, &["bogus".into()], &[], 5)
        .await
        .is_empty());
    assert_eq!(h.kubelet.preferred(CORE, &avail, &[], 150).await.len(), 150);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allocate_returns_devices_env_limiter_mount_and_annotations() {
    let h = Harness::new(example_node(H100)).await;
    let dev = h.config().dev_root;
    std::fs::write(dev.join("nvidiactl"), b"").unwrap();
    std::fs::write(dev.join("nvidia-uvm"), b"").unwrap();
    let _d = h.daemon(false).await;
    let core = ids("vcore", 3, 0..30);
    let resp = h.kubelet.allocate(CORE, &core).await.unwrap();
    let devices: Vec<(String, String, String)> = resp
        .devices
        .iter()
        .map(|d| {
            (
                d.container_path.clone(),
                d.host_path.clone(),
                d.permissions.clone(),
            )
        })
        .collect();
    let host = |n: &str| dev.join(n).to_string_lossy().into_owned();
    assert_eq!(
        devices,
        [
            ("/dev/nvidia3".into(), host("nvidia3"), "rw".into()),
            ("/dev/nvidiactl".into(), host("nvidiactl"), "rw".into()),
            ("/dev/nvidia-uvm".into(), host("nvidia-uvm"), "rw".into()),
        ],
        "nvidia-uvm-tools does not exist under --dev-root, so it is left out"
    );
    assert_eq!(resp.envs["NVIDIA_VISIBLE_DEVICES"], UUID3);
    assert_eq!(resp.envs["VCUDA_CONFIG"], "/etc/vcuda/limits.json");
    let mounts: Vec<(&str, bool)> = resp
        .mounts
        .iter()
        .map(|m| (m.container_path.as_str(), m.read_only))
        .collect();
    assert_eq!(
        mounts,
        [
            ("/etc/vcuda", true),
            ("/usr/local/vcuda/libvcuda.so", true),
            ("/etc/ld.so.preload", true),
            ("/run/vcuda", false),
        ],
        "a share gets its config, the limiter and a state directory"
    );
    assert_eq!(resp.annotations["tencent.com/vcuda-core"], "30");
    assert_eq!(resp.annotations["tencent.com/vcuda-device"], "/dev/nvidia3");
    let cfg = limiter(&h, &resp).await;
    assert_eq!(cfg.cards.len(), 1);
    assert_eq!(
        (
            cfg.cards[0].index,
            cfg.cards[0].minor,
            cfg.cards[0].cores_limit
        ),
        (3, 3, 30)
    );
    assert_eq!(cfg.cards[0].uuid, UUID3);
    assert_eq!(
        cfg.cards[0].memory_limit_bytes, None,
        "memory half not allocated yet"
    );

    // The memory half: an empty response (no duplicate mounts), and the limiter learns it.
    let mem = h
        .kubelet
        .allocate(MEMORY, &ids("vmem", 3, 0..8))
        .await
        .unwrap();
    assert!(mem.devices.is_empty() && mem.mounts.is_empty() && mem.envs.is_empty());
    let cfg = limiter_when(&h, &resp, |c| c.cards[0].memory_limit_bytes.is_some()).await;
    assert_eq!(cfg.cards[0].memory_limit_bytes, Some(8 * 256 * 1024 * 1024));

    // Allocate again (as after a node reboot): the same limiter directory, no second record.
    let again = h.kubelet.allocate(CORE, &core).await.unwrap();
    assert_eq!(again.mounts, resp.mounts);
    assert_eq!(again.devices, resp.devices);
    assert_eq!(again.envs, resp.envs);
    assert_eq!(
        again.annotations["tencent.com/vcuda-memory"],
        (8u64 * 256 * 1024 * 1024).to_string()
    );
    assert_eq!(_d.handle().snapshot().allocations.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_cards_list_every_uuid_in_card_order_with_all_their_memory() {
    let h = Harness::new(example_node(H100)).await;
    let _d = h.daemon(false).await;
    let mut v = ids("vcore", 1, 0..100);
    v.extend(ids("vcore", 0, 0..100));
    let resp = h.kubelet.allocate(CORE, &v).await.unwrap();
    assert_eq!(
        resp.envs["NVIDIA_VISIBLE_DEVICES"],
        format!("{UUID0},{UUID1}")
    );
    assert_eq!(resp.devices[0].container_path, "/dev/nvidia0");
    assert_eq!(resp.devices[1].container_path, "/dev/nvidia1");
    assert_eq!(resp.annotations["tencent.com/vcuda-core"], "200");
    assert_eq!(
        resp.annotations["tencent.com/vcuda-memory"],
        (2 * 81559u64 * 1024 * 1024).to_string()
    );
    assert_eq!(resp.mounts.len(), 1, "whole cards get no limiter");
    assert_eq!(resp.mounts[0].container_path, "/etc/vcuda");
    let cfg = limiter(&h, &resp).await;
    assert!(cfg.cards.iter().all(|c| c.cores_limit == 100));
    assert_eq!(cfg.cards[0].memory_limit_bytes, Some(81559 * 1024 * 1024));
}

async fn refused(h: &Harness, resource: &str, ids: Vec<String>) -> tonic::Status {
    h.kubelet.allocate(resource, &ids).await.unwrap_err()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_allocations_are_refused_with_what_happened_and_what_to_do() {
    let h = Harness::new(example_node(H100)).await;
    let _d = h.daemon(false).await;

    let mut straddle = ids("vcore", 0, 0..30);
    straddle.extend(ids("vcore", 1, 0..20));
    let e = refused(&h, CORE, straddle).await;
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().starts_with("the 50 vcuda-core IDs straddle cards (30 on card 0, 20 on card 1): a share of a card (1-99 vcuda-core) must lie on one card."), "{}", e.message());
    assert!(
        e.message()
            .contains("delete the pod so that it is scheduled again"),
        "{}",
        e.message()
    );

    let e = refused(&h, CORE, vec!["vcore-9-0".into()]).await;
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().starts_with(
            "device ID \"vcore-9-0\" names a card this node does not have (it has 8 cards, 0..7)"
        ),
        "{}",
        e.message()
    );
    assert!(
        e.message().contains("restart the kubelet"),
        "{}",
        e.message()
    );

    let e = refused(&h, CORE, vec!["tencent.com/vcuda-core-1".into()]).await;
    assert!(
        e.message()
            .contains("this plugin advertises vcore-<card>-<k>"),
        "{}",
        e.message()
    );

    let mut odd = ids("vcore", 2, 0..100);
    odd.extend(ids("vcore", 3, 0..50));
    let e = refused(&h, CORE, odd).await;
    assert!(e.message().starts_with("150 vcuda-core is not a valid request: use 1-99 for a share of one card or a multiple of 100 for whole cards."), "{}", e.message());

    let mut big = ids("vmem", 4, 0..318);
    big.extend(ids("vmem", 5, 0..10));
    let e = refused(&h, MEMORY, big).await;
    assert!(e.message().starts_with("328 vcuda-memory blocks do not fit on one card: the largest card of this node has 318 blocks (81559 MiB). Lower the container's vcuda-memory limit to at most 318"), "{}", e.message());

    let e = h
        .kubelet
        .client(CORE)
        .await
        .allocate(gm_proto::deviceplugin::v1beta1::AllocateRequest {
            container_requests: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);

    // Nothing was recorded by any of these.
    assert!(_d.handle().snapshot().allocations.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unhealthy_card_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("lost.yaml");
    std::fs::write(
        &file,
        "cards:\n  - {uuid: GPU-0000, model: Tesla T4, memoryMiB: 15360, minor: 0}\n  - {uuid: GPU-1111, model: Tesla T4, memoryMiB: 15360, minor: 1}\nlinks:\n  - [X, PIX]\n  - [PIX, X]\nevents:\n  - {atMs: 0, card: GPU-1111, kind: lost}\n",
    )
    .unwrap();
    let h = Harness::new(file).await;
    let _d = h.daemon(false).await;
    let e = refused(&h, CORE, ids("vcore", 1, 0..10)).await;
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(
        e.message().starts_with("card 1 (GPU-1111) is unhealthy:"),
        "{}",
        e.message()
    );
    assert!(
        e.message()
            .contains("delete the pod so that it is admitted again on a healthy card"),
        "{}",
        e.message()
    );
    h.kubelet
        .allocate(CORE, &ids("vcore", 0, 0..10))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_on_another_card_than_the_annotation_are_refused() {
    let h = Harness::new(example_node(H100)).await;
    h.pods.insert(pod_info(
        "train",
        serde_json::json!([gpu_container("main", 30, 8)]),
        serde_json::json!({"tencent.com/predicate-gpu-idx-0": "5"}),
    ));
    let _d = h.daemon(true).await;
    let e = refused(&h, CORE, ids("vcore", 1, 0..30)).await;
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().starts_with("pod default/train container \"main\" was assigned card(s) 5 by the scheduler (tencent.com/predicate-gpu-idx-0=5) but the kubelet allocated devices of card(s) 1"), "{}", e.message());
    h.kubelet
        .allocate(CORE, &ids("vcore", 5, 0..30))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_allocations_never_over_allocate_a_card() {
    let h = Arc::new(Harness::new(example_node(H100)).await);
    let d = h.daemon(false).await;
    // The kubelet's side: free IDs, handed out one admission at a time by preference.
    let mut free: BTreeSet<String> = all("vcore", 8, 100).into_iter().collect();
    let mut chosen = Vec::new();
    for _ in 0..50 {
        let avail: Vec<String> = free.iter().cloned().collect();
        let mut got = h.kubelet.preferred(CORE, &avail, &[], 16).await;
        got.truncate(16);
        for id in &got {
            free.remove(id);
        }
        chosen.push(got);
    }
    // Fire all Allocate calls at once, plus ten repeats.
    let mut calls: Vec<Vec<String>> = chosen.clone();
    calls.extend(chosen.iter().take(10).cloned());
    let tasks: Vec<_> = calls
        .into_iter()
        .map(|ids| {
            let h = Arc::clone(&h);
            tokio::spawn(async move { (ids.clone(), h.kubelet.allocate(CORE, &ids).await) })
        })
        .collect();
    let mut ok = BTreeSet::new();
    let mut refused = 0;
    for t in tasks {
        let (ids, r) = t.await.unwrap();
        match r {
            Ok(_) => {
                ok.insert(ids);
            }
            Err(e) => {
                assert!(e.message().contains("straddle cards"), "{}", e.message());
                refused += 1;
            }
        }
    }
    // Six 16-core shares fit on each of the 8 cards; the last two cannot fit on one card.
    assert_eq!(ok.len(), 48);
    assert_eq!(refused, 2);
    let snap = d.handle().snapshot();
    assert_eq!(snap.allocations.len(), 48);
    let mut per_card: BTreeMap<u32, u32> = BTreeMap::new();
    for a in &snap.allocations {
        assert_eq!(a.cards.len(), 1);
        *per_card.entry(a.cards[0].card).or_default() += a.cards[0].cores;
    }
    assert_eq!(per_card.len(), 8);
    assert!(per_card.values().all(|&c| c == 96), "{per_card:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prestart_confirms_through_pod_resources_and_marks_the_pod_assigned() {
    let h = Harness::new(example_node(H100)).await;
    h.pods.insert(pod_info(
        "train",
        serde_json::json!([gpu_container("main", 30, 8)]),
        serde_json::json!({}),
    ));
    let _d = h.daemon(true).await;
    let core = h
        .kubelet
        .preferred(CORE, &all("vcore", 8, 100), &[], 30)
        .await;
    let mem = h
        .kubelet
        .preferred(MEMORY, &all("vmem", 8, 318), &[], 8)
        .await;
    let card = cards_of(&core)[0];
    assert_eq!(cards_of(&mem), vec![card]);
    let resp = h.kubelet.allocate(CORE, &core).await.unwrap();
    h.kubelet.allocate(MEMORY, &mem).await.unwrap();
    h.podres.set(vec![Holding::new(
        "train",
        "main",
        core.clone(),
        mem.clone(),
    )]);
    // The kubelet rate-limits pod-resources: two refusals are absorbed by the backoff.
    h.podres.exhaust_next(2);
    h.kubelet.prestart(CORE, &core).await.unwrap();
    h.kubelet.prestart(MEMORY, &mem).await.unwrap();
    assert!(h.podres.calls() >= 3);
    h.cluster
        .wait_for("gpu-assigned patch", |c| {
            !c.pod_patches.lock().unwrap().is_empty()
        })
        .await;
    let (ns, name, ann) = h.cluster.pod_patches.lock().unwrap()[0].clone();
    assert_eq!((ns.as_str(), name.as_str()), ("default", "train"));
    assert_eq!(ann["tencent.com/gpu-assigned"], "true");
    // The pod had no scheduler annotations: the actual card is written for the extender.
    assert_eq!(ann["tencent.com/predicate-gpu-idx-0"], card.to_string());
    assert_eq!(ann["tencent.com/predicate-node"], "node-a");
    let cfg = limiter(&h, &resp).await;
    assert_eq!(
        cfg.state,
        gm_device_plugin::response::LimiterState::Confirmed
    );
    let pod = cfg.pod.unwrap();
    assert_eq!(
        (pod.name.as_str(), pod.uid.as_str(), pod.container.as_str()),
        ("train", "uid-train", "main")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prestart_fails_naming_both_pods_when_the_kubelet_swapped_them() {
    let h = Harness::new(example_node(H100)).await;
    h.pods.insert(pod_info(
        "a",
        serde_json::json!([gpu_container("c", 30, 8)]),
        serde_json::json!({"tencent.com/predicate-time": "1"}),
    ));
    h.pods.insert(pod_info(
        "b",
        serde_json::json!([gpu_container("c", 30, 8)]),
        serde_json::json!({"tencent.com/predicate-time": "2", "tencent.com/predicate-gpu-idx-0": "6"}),
    ));
    let _d = h.daemon(true).await;
    let core = ids("vcore", 1, 0..30);
    h.kubelet.allocate(CORE, &core).await.unwrap();
    h.podres
        .set(vec![Holding::new("b", "c", core.clone(), vec![])]);
    let e = h.kubelet.prestart(CORE, &core).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().starts_with("the kubelet gave devices of card(s) 1 to pod default/b container \"c\" (gpu-manager had matched them to pod default/a container \"c\" at Allocate), but the scheduler assigned that container card(s) 6 (tencent.com/predicate-gpu-idx-0=6)"), "{}", e.message());
    assert!(
        e.message()
            .ends_with("Delete pod default/b so that it is scheduled again"),
        "{}",
        e.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_inventory_is_published_at_start_and_on_health_changes() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("n.yaml");
    std::fs::write(
        &file,
        "cards:\n  - {uuid: GPU-0000, model: NVIDIA A100-SXM4-40GB, memoryMiB: 40960, minor: 0}\n  - {uuid: GPU-1111, model: NVIDIA A100-SXM4-40GB, memoryMiB: 40960, minor: 1}\nlinks:\n  - [X, NV12]\n  - [NV12, X]\nevents:\n  - {atMs: 300, card: GPU-1111, kind: xid, code: 79}\n",
    )
    .unwrap();
    let h = Harness::new(file).await;
    let _d = h.daemon(true).await;
    h.cluster
        .wait_for("a node patch with card 1 unhealthy", |c| {
            c.node_patches.lock().unwrap().iter().any(|(_, _, a)| {
                gm_core::NodeInventory::from_json(&a["tencent.com/gpu-inventory"])
                    .map(|i| !i.cards[1].healthy)
                    .unwrap_or(false)
            })
        })
        .await;
    let patches = h.cluster.node_patches.lock().unwrap().clone();
    let (node, labels, ann) = &patches[0];
    assert_eq!(node, "node-a");
    assert_eq!(labels["tencent.com/gpu-model"], "NVIDIA-A100-SXM4-40GB");
    assert_eq!(labels["tencent.com/gpu-count"], "2");
    assert_eq!(labels["tencent.com/gpu-memory-mib"], "40960");
    let first = gm_core::NodeInventory::from_json(&ann["tencent.com/gpu-inventory"]).unwrap();
    assert!(first.cards.iter().all(|c| c.healthy));
    tokio::time::sleep(Duration::from_millis(50)).await;
}
