//! Unit tests of the allocation state: pairing, decisions, idempotence, confirmation and
//! reconciliation, without sockets.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use gm_core::annotations::{Keys, PodAnnotations};
use gm_core::devices::DeviceKind;
use gm_core::request::{GpuRequest, Slot};
use gm_core::{Link, NodeInventory, Policy};

use super::*;
use crate::pods::{ContainerInfo, InMemoryPods, PodInfo, PodPhase};

const GRACE: Duration = Duration::from_secs(120);

fn state(cards: usize) -> State {
    State::new(
        StateConfig {
            node_name: "node-a".into(),
            keys: Keys::default(),
            policy: Policy::Binpack,
            pending_ttl: Duration::from_secs(30),
            gc_grace: GRACE,
            patch_pods: true,
        },
        NodeInventory::uniform(cards, "T", 16384, Link::Phb),
    )
}

fn ids(prefix: &str, card: u32, ks: std::ops::Range<u32>) -> Vec<String> {
    ks.map(|k| format!("{prefix}-{card}-{k}")).collect()
}

fn all(prefix: &str, cards: u32, per: u32) -> Vec<String> {
    (0..cards).flat_map(|c| ids(prefix, c, 0..per)).collect()
}

fn now_at(ms: u64) -> Now {
    Now {
        instant: Instant::now(),
        unix_ms: ms,
    }
}

fn pod(name: &str, time: u64, containers: Vec<(&str, GpuRequest, Option<Vec<u32>>)>) -> PodInfo {
    let mut annotations = PodAnnotations::default();
    let containers = containers
        .into_iter()
        .enumerate()
        .map(|(i, (cname, request, cards))| {
            if let Some(c) = cards {
                annotations.cards.insert(Slot::App(i), c);
            }
            ContainerInfo {
                slot: Slot::App(i),
                name: cname.to_string(),
                request,
                memory_blocks: u64::from(request.share_blocks()),
            }
        })
        .collect();
    PodInfo {
        namespace: "ns".into(),
        name: name.into(),
        uid: format!("uid-{name}"),
        node_name: Some("node-a".into()),
        phase: PodPhase::Pending,
        deleting: false,
        containers,
        request_error: None,
        annotations,
        time,
        qos_class: None,
        container_ids: Default::default(),
    }
}

fn share(cores: u32, blocks: u32) -> GpuRequest {
    GpuRequest::Share { cores, blocks }
}

fn cards_of(v: &[String]) -> Vec<u32> {
    let mut c: Vec<u32> = v
        .iter()
        .map(|s| gm_core::devices::DeviceId::parse(s).unwrap().card)
        .collect();
    c.sort_unstable();
    c.dedup();
    c
}

#[test]
fn both_halves_of_an_annotated_container_are_steered_to_its_card() {
    let mut st = state(4);
    let pods = vec![Arc::new(pod(
        "a",
        1,
        vec![("c", share(30, 8), Some(vec![2]))],
    ))];
    let now = Instant::now();
    let core = st.prefer(DeviceKind::Core, &all("vcore", 4, 100), &[], 30, &pods, now);
    assert_eq!(core, ids("vcore", 2, 0..30));
    let mem = st.prefer(DeviceKind::Memory, &all("vmem", 4, 64), &[], 8, &pods, now);
    assert_eq!(mem, ids("vmem", 2, 0..8));
}

#[test]
fn whole_card_preferences_take_every_id_of_the_assigned_cards() {
    let mut st = state(4);
    let pods = vec![Arc::new(pod(
        "w",
        1,
        vec![("c", GpuRequest::Whole { cards: 2 }, Some(vec![1, 3]))],
    ))];
    let got = st.prefer(
        DeviceKind::Core,
        &all("vcore", 4, 100),
        &[],
        200,
        &pods,
        Instant::now(),
    );
    assert_eq!(cards_of(&got), vec![1, 3]);
    assert_eq!(got.len(), 200);
}

#[test]
fn without_an_assignment_the_local_policy_packs_shares_onto_the_busiest_card() {
    let mut st = state(3);
    let now = now_at(1);
    // Card 1 already carries a share.
    st.allocate(DeviceKind::Core, &ids("vcore", 1, 0..50), &[], now)
        .unwrap();
    st.allocate(DeviceKind::Memory, &ids("vmem", 1, 0..10), &[], now)
        .unwrap();
    let mut avail = all("vcore", 3, 100);
    avail.retain(|id| !ids("vcore", 1, 0..50).contains(id));
    let got = st.prefer(DeviceKind::Core, &avail, &[], 20, &[], Instant::now());
    assert_eq!(got, ids("vcore", 1, 50..70));
}

#[test]
fn memory_first_chooses_a_card_and_the_cores_follow_it() {
    let mut st = state(3);
    let now = Instant::now();
    let mem = st.prefer(DeviceKind::Memory, &all("vmem", 3, 64), &[], 4, &[], now);
    let card = cards_of(&mem);
    assert_eq!(card.len(), 1);
    st.allocate(DeviceKind::Memory, &mem, &[], now_at(5))
        .unwrap();
    let core = st.prefer(DeviceKind::Core, &all("vcore", 3, 100), &[], 25, &[], now);
    assert_eq!(cards_of(&core), card);
    let done = st
        .allocate(DeviceKind::Core, &core, &[], now_at(6))
        .unwrap();
    // The memory-only record joined the vcuda-core record.
    let Allocated::New(rec) = done else {
        panic!("expected a new record")
    };
    assert_eq!(rec.memory.len(), 4);
    assert_eq!(st.records().len(), 1);
    assert_eq!(st.usage()[card[0] as usize].blocks, 4);
    assert_eq!(st.usage()[card[0] as usize].cores, 25);
}

#[test]
fn memory_away_from_the_cores_is_refused_with_both_cards() {
    let mut st = state(3);
    st.allocate(DeviceKind::Core, &ids("vcore", 0, 0..30), &[], now_at(1))
        .unwrap();
    let e = st
        .allocate(DeviceKind::Memory, &ids("vmem", 2, 0..4), &[], now_at(2))
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::FailedPrecondition);
    assert!(
        e.message.starts_with(
            "the vcuda-memory IDs lie on card 2 but the container's vcuda-core IDs are on card 0"
        ),
        "{}",
        e.message
    );
}

#[test]
fn allocate_is_idempotent_and_does_not_double_count() {
    let mut st = state(2);
    let v = ids("vcore", 0, 0..40);
    let first = st.allocate(DeviceKind::Core, &v, &[], now_at(1)).unwrap();
    let again = st.allocate(DeviceKind::Core, &v, &[], now_at(2)).unwrap();
    assert!(matches!(first, Allocated::New(_)));
    assert_eq!(again, Allocated::Existing(first.record().clone()));
    assert_eq!(st.records().len(), 1);
    assert_eq!(st.usage()[0].cores, 40);
}

#[test]
fn devices_an_init_container_hands_on_count_once() {
    let mut st = state(1);
    st.allocate(DeviceKind::Core, &ids("vcore", 0, 0..60), &[], now_at(1))
        .unwrap();
    // The app container reuses 40 of them and takes 20 more.
    let mut app = ids("vcore", 0, 0..40);
    app.extend(ids("vcore", 0, 60..80));
    st.allocate(DeviceKind::Core, &app, &[], now_at(2)).unwrap();
    assert_eq!(st.records().len(), 2);
    assert_eq!(st.usage()[0].cores, 80);
    assert_eq!(st.ledger().card(0).unwrap().free_cores, 20);
}

#[test]
fn a_record_of_all_100_ids_takes_the_card_whole() {
    let mut st = state(2);
    st.allocate(DeviceKind::Core, &ids("vcore", 1, 0..100), &[], now_at(1))
        .unwrap();
    let l = st.ledger();
    assert_eq!(l.card(1).unwrap().free_blocks, 0);
    assert!(l.card(0).unwrap().is_free());
}

#[test]
fn an_unhealthy_card_is_refused_with_the_reason() {
    let mut st = state(2);
    assert!(st.set_health(1, false, "critical XID 79"));
    assert!(!st.set_health(1, false, "critical XID 79"));
    let e = st
        .allocate(DeviceKind::Core, &ids("vcore", 1, 0..10), &[], now_at(1))
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::FailedPrecondition);
    assert!(
        e.message
            .starts_with("card 1 (GPU-T-0001) is unhealthy: critical XID 79."),
        "{}",
        e.message
    );
    // Preferences avoid it.
    let got = st.prefer(
        DeviceKind::Core,
        &all("vcore", 2, 100),
        &[],
        10,
        &[],
        Instant::now(),
    );
    assert_eq!(cards_of(&got), vec![0]);
}

#[test]
fn ids_of_another_card_than_the_assignment_are_refused_naming_both() {
    let mut st = state(4);
    let pods = vec![Arc::new(pod(
        "a",
        1,
        vec![("main", share(30, 8), Some(vec![3]))],
    ))];
    let e = st
        .allocate(DeviceKind::Core, &ids("vcore", 1, 0..30), &pods, now_at(1))
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::FailedPrecondition);
    assert!(
        e.message.starts_with(
            "pod ns/a container \"main\" was assigned card(s) 3 by the scheduler (tencent.com/predicate-gpu-idx-0=3) but the kubelet allocated devices of card(s) 1"
        ),
        "{}",
        e.message
    );
}

#[test]
fn same_sized_pods_are_told_apart_by_their_cards() {
    let mut st = state(4);
    let pods = vec![
        Arc::new(pod("first", 1, vec![("c", share(30, 8), Some(vec![0]))])),
        Arc::new(pod("second", 2, vec![("c", share(30, 8), Some(vec![3]))])),
    ];
    // The kubelet admits the second pod first.
    let got = st
        .allocate(DeviceKind::Core, &ids("vcore", 3, 0..30), &pods, now_at(1))
        .unwrap();
    assert_eq!(got.record().matched.as_ref().unwrap().name, "second");
    let got = st
        .allocate(DeviceKind::Core, &ids("vcore", 0, 0..30), &pods, now_at(2))
        .unwrap();
    assert_eq!(got.record().matched.as_ref().unwrap().name, "first");
}

#[test]
fn confirmation_names_both_pods_when_the_kubelet_swapped_them() {
    let mut st = state(4);
    let pods = vec![
        Arc::new(pod("a", 1, vec![("c", share(30, 8), None)])),
        Arc::new(pod("b", 2, vec![("c", share(30, 8), Some(vec![2]))])),
    ];
    let v = ids("vcore", 1, 0..30);
    let rec = st
        .allocate(DeviceKind::Core, &v, &pods, now_at(1))
        .unwrap()
        .record()
        .clone();
    assert_eq!(rec.matched.as_ref().unwrap().name, "a");
    let actual = PodRef {
        namespace: "ns".into(),
        name: "b".into(),
        uid: String::new(),
        container: "c".into(),
    };
    let e = st
        .confirm(DeviceKind::Core, &v, Some(actual), Some(&pods[1]))
        .unwrap_err();
    assert!(
        e.message.starts_with(
            "the kubelet gave devices of card(s) 1 to pod ns/b container \"c\" (gpu-manager had matched them to pod ns/a container \"c\" at Allocate), but the scheduler assigned that container card(s) 2"
        ),
        "{}",
        e.message
    );
}

#[test]
fn confirmation_sets_the_owner_and_asks_for_the_annotations() {
    let mut st = state(4);
    let pods = vec![Arc::new(pod("a", 1, vec![("c", share(30, 8), None)]))];
    let v = ids("vcore", 1, 0..30);
    st.allocate(DeviceKind::Core, &v, &pods, now_at(1)).unwrap();
    let actual = PodRef {
        namespace: "ns".into(),
        name: "a".into(),
        uid: String::new(),
        container: "c".into(),
    };
    let conf = st
        .confirm(DeviceKind::Core, &v, Some(actual), Some(&pods[0]))
        .unwrap();
    assert_eq!(conf.record.owner.as_ref().unwrap().uid, "uid-a");
    let (ns, name, ann) = conf.patch.unwrap();
    assert_eq!((ns.as_str(), name.as_str()), ("ns", "a"));
    let want: BTreeMap<String, String> = [
        ("tencent.com/gpu-assigned", "true"),
        ("tencent.com/predicate-gpu-idx-0", "1"),
        ("tencent.com/predicate-node", "node-a"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    assert_eq!(ann, want);
}

#[test]
fn unknown_ids_at_prestart_say_the_allocation_is_unknown() {
    let mut st = state(1);
    let e = st
        .confirm(DeviceKind::Core, &ids("vcore", 0, 0..5), None, None)
        .unwrap_err();
    assert!(
        e.message.starts_with("no allocation is recorded"),
        "{}",
        e.message
    );
}

fn listed(pod: &str, core: Vec<String>, memory: Vec<String>) -> ListedContainer {
    ListedContainer {
        namespace: "ns".into(),
        pod: pod.into(),
        container: "c".into(),
        core,
        memory,
    }
}

#[test]
fn reconciliation_adopts_unknown_containers_with_their_memory() {
    let mut st = state(2);
    let l = vec![listed("p", ids("vcore", 1, 0..20), ids("vmem", 1, 0..3))];
    let out = st.reconcile(Some(&l), None, now_at(1_000));
    assert_eq!(out.adopted.len(), 1);
    let rec = &out.adopted[0];
    assert_eq!(rec.owner.as_ref().unwrap().name, "p");
    assert_eq!(rec.memory.len(), 3);
    // A second pass changes nothing.
    let again = st.reconcile(Some(&l), None, now_at(2_000));
    assert!(again.adopted.is_empty() && again.released.is_empty());
    assert_eq!(st.records().len(), 1);
}

#[test]
fn records_missing_from_pod_resources_are_released_after_the_grace_period() {
    let mut st = state(2);
    st.allocate(DeviceKind::Core, &ids("vcore", 0, 0..20), &[], now_at(0))
        .unwrap();
    let none: Vec<ListedContainer> = Vec::new();
    let out = st.reconcile(Some(&none), None, now_at(10_000));
    assert!(out.released.is_empty(), "missing only just now");
    let out = st.reconcile(Some(&none), None, now_at(10_000 + GRACE.as_millis() as u64));
    assert_eq!(out.released.len(), 1);
    assert!(st.records().is_empty());
    assert_eq!(st.usage()[0].cores, 0);
    // When pod-resources cannot be asked, nothing is released.
    st.allocate(DeviceKind::Core, &ids("vcore", 0, 0..20), &[], now_at(0))
        .unwrap();
    let out = st.reconcile(None, None, now_at(1_000_000));
    assert!(out.released.is_empty());
}

#[test]
fn the_api_server_ends_records_of_deleted_pods_and_keeps_running_init_containers() {
    let mut st = state(2);
    let pods = InMemoryPods::new();
    let mut running = pod("run", 1, vec![("c", share(20, 1), None)]);
    running.phase = PodPhase::Running;
    pods.insert(running);
    let v = ids("vcore", 0, 0..20);
    st.allocate(DeviceKind::Core, &v, &[], now_at(0)).unwrap();
    let l = vec![listed("run", v.clone(), vec![])];
    st.reconcile(Some(&l), Some(&pods), now_at(1)); // owner confirmed
                                                    // Not listed any more (like a regular init container) but the pod runs: kept.
    let none: Vec<ListedContainer> = Vec::new();
    st.reconcile(Some(&none), Some(&pods), now_at(2));
    let out = st.reconcile(Some(&none), Some(&pods), now_at(10_000_000));
    assert!(out.released.is_empty());
    // The pod is deleted: released at once.
    pods.remove("ns", "run");
    let out = st.reconcile(Some(&none), Some(&pods), now_at(10_000_001));
    assert_eq!(out.released.len(), 1);
    assert_eq!(out.released[0].1, "its pod has ended or was deleted");
}

#[test]
fn release_rules() {
    let g = Duration::from_secs(60);
    let s = Duration::from_secs;
    // Confirmed pod ended: at once, once the kubelet no longer lists it.
    assert!(release_reason(true, PodState::Gone, Some(false), s(1), s(0), g).is_some());
    assert!(release_reason(true, PodState::Gone, None, s(1), s(0), g).is_some());
    assert!(release_reason(true, PodState::Gone, Some(true), s(1), s(0), g).is_none());
    // Only matched: wait for the grace period (informer lag).
    assert!(release_reason(false, PodState::Gone, None, s(1), s(0), g).is_none());
    assert!(release_reason(false, PodState::Gone, None, s(61), s(0), g).is_some());
    // Missing long enough and the pod is not known to be alive.
    assert!(release_reason(false, PodState::Unknown, Some(false), s(999), s(60), g).is_some());
    assert!(release_reason(false, PodState::Unknown, Some(false), s(999), s(59), g).is_none());
    assert!(release_reason(true, PodState::Alive, Some(false), s(999), s(999), g).is_none());
}

#[test]
fn restore_drops_records_that_no_longer_fit_the_node() {
    let mut big = state(4);
    big.allocate(DeviceKind::Core, &ids("vcore", 3, 0..10), &[], now_at(1))
        .unwrap();
    big.allocate(DeviceKind::Core, &ids("vcore", 0, 0..10), &[], now_at(1))
        .unwrap();
    let records: Vec<Record> = big.records().values().cloned().collect();
    let mut small = state(2);
    let warnings = small.restore(records);
    assert_eq!(warnings.len(), 1);
    assert!(warnings[0].contains("no longer has"), "{}", warnings[0]);
    assert_eq!(small.records().len(), 1);
}

#[test]
fn pending_halves_expire() {
    let mut st = state(2);
    let t0 = Instant::now();
    st.prefer(DeviceKind::Memory, &all("vmem", 2, 64), &[], 4, &[], t0);
    assert_eq!(st.pending.len(), 1);
    st.prune(t0 + Duration::from_secs(31));
    assert!(st.pending.is_empty());
}

#[test]
fn a_request_for_a_pod_the_watch_has_not_delivered_asks_for_a_refresh() {
    let mut st = state(4);
    let now = Instant::now();
    // The kubelet admits a 30-core pod the watch has not shown yet: a miss.
    assert!(st.misses_pod(DeviceKind::Core, 30, &[], now));
    // Pods of other sizes do not count.
    let other = vec![Arc::new(pod(
        "b",
        1,
        vec![("c", share(20, 4), Some(vec![1]))],
    ))];
    assert!(st.misses_pod(DeviceKind::Core, 30, &other, now));
    // Once the pod is known, no refresh is needed, and its card is preferred.
    let pods = vec![
        other[0].clone(),
        Arc::new(pod("a", 2, vec![("c", share(30, 8), Some(vec![2]))])),
    ];
    assert!(!st.misses_pod(DeviceKind::Core, 30, &pods, now));
    let core = st.prefer(DeviceKind::Core, &all("vcore", 4, 100), &[], 30, &pods, now);
    assert_eq!(core, ids("vcore", 2, 0..30));
    // The memory half pairs with the core half in progress: no miss even though the pod's
    // container is already matched.
    assert!(!st.misses_pod(DeviceKind::Memory, 8, &pods, now));
    // A zero-sized request never triggers a list.
    assert!(!st.misses_pod(DeviceKind::Memory, 0, &[], now));
}

#[test]
fn a_pod_the_kubelet_admitted_but_never_marked_gets_its_annotations_at_reconciliation() {
    let mut st = state(4);
    let source = InMemoryPods::new();
    // "placed": the scheduler chose card 2; gpu-manager died before writing gpu-assigned.
    source.insert(pod("placed", 1, vec![("c", share(30, 8), Some(vec![2]))]));
    // "local": no scheduler annotations at all.
    source.insert(pod("local", 2, vec![("c", share(10, 2), None)]));
    // "done": already marked.
    let mut done = pod("done", 3, vec![("c", share(20, 4), Some(vec![1]))]);
    done.annotations.assigned = Some(true);
    source.insert(done);
    let l = vec![
        listed("placed", ids("vcore", 2, 0..30), ids("vmem", 2, 0..8)),
        listed("local", ids("vcore", 3, 0..10), ids("vmem", 3, 0..2)),
        listed("done", ids("vcore", 1, 0..20), ids("vmem", 1, 0..4)),
    ];
    let out = st.reconcile(Some(&l), Some(&source), now_at(1_000));
    assert_eq!(out.adopted.len(), 3);
    let keys = Keys::default();
    let by_pod: BTreeMap<&str, &BTreeMap<String, String>> = out
        .patches
        .iter()
        .map(|(_, name, ann)| (name.as_str(), ann))
        .collect();
    assert_eq!(by_pod.len(), 2, "{:?}", out.patches);
    let placed = by_pod["placed"];
    assert_eq!(
        placed.get(&keys.gpu_assigned).map(String::as_str),
        Some("true")
    );
    assert!(
        !placed.contains_key(&keys.gpu_idx(Slot::App(0))),
        "{placed:?}"
    );
    let local = by_pod["local"];
    assert_eq!(
        local.get(&keys.gpu_assigned).map(String::as_str),
        Some("true")
    );
    assert_eq!(
        local.get(&keys.gpu_idx(Slot::App(0))).map(String::as_str),
        Some("3")
    );
    assert_eq!(
        local.get(&keys.predicate_node).map(String::as_str),
        Some("node-a")
    );
    // Without pod-resources nothing is owed: only the kubelet's word counts.
    let out = st.reconcile(None, Some(&source), now_at(2_000));
    assert!(out.patches.is_empty());
}
