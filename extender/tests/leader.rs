//! High availability: several replicas elect one leader on a coordination.k8s.io Lease.

mod common;

use std::time::{Duration, Instant};

use common::*;
use gm_extender::ExtenderArgs;
use serde_json::json;

fn elect(identity: &str, duration_ms: u64, retry_ms: u64) -> ExtenderArgs {
    ExtenderArgs {
        leader_elect: true,
        identity: Some(identity.into()),
        lease_namespace: Some("gpu-system".into()),
        lease_duration: Duration::from_millis(duration_ms),
        lease_retry_period: Duration::from_millis(retry_ms),
        ..args()
    }
}

async fn ready(r: &Running) -> bool {
    call(r.addr, "GET", "/readyz", "").await.0 == 200
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_leader_is_ready_and_serves_and_a_clean_shutdown_hands_over_at_once() {
    let api = FakeApi::start().await;
    api.add_node("n1", Some(&cards(1, 4096)));
    let a = start_extender(&api, elect("replica-a", 3000, 200)).await;
    eventually(Duration::from_secs(3), "a leads", || {
        a.leadership.is_leader()
    })
    .await;
    let b = start_extender(&api, elect("replica-b", 3000, 200)).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(!b.leadership.is_leader());
    assert!(ready(&a).await);
    assert!(!ready(&b).await);
    let (code, body) = call(b.addr, "GET", "/readyz", "").await;
    assert_eq!(code, 503);
    assert!(body.contains("not the leader"), "{body}");
    let filter =
        json!({"Pod": pod_json("default", "p", &[(10, 1)], &[]), "NodeNames": ["n1"]}).to_string();
    let (code, body) = call(b.addr, "POST", "/scheduler/filter", filter.clone()).await;
    assert_eq!(code, 503, "a follower does not decide: {body}");
    let lease = api.lease("gpu-system", "gpu-admission").unwrap();
    assert_eq!(lease["spec"]["holderIdentity"], "replica-a");
    // The leader stops and releases the Lease: the follower takes over within a retry or two,
    // long before the 3 s lease duration.
    let stopped = Instant::now();
    a.stop().await;
    eventually(Duration::from_secs(2), "b leads", || {
        b.leadership.is_leader()
    })
    .await;
    assert!(
        stopped.elapsed() < Duration::from_millis(2000),
        "{:?}",
        stopped.elapsed()
    );
    assert!(ready(&b).await);
    let lease = api.lease("gpu-system", "gpu-admission").unwrap();
    assert_eq!(lease["spec"]["holderIdentity"], "replica-b");
    assert_eq!(lease["spec"]["leaseTransitions"], 1);
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_leaders_lease_is_taken_over_once_it_expires() {
    let api = FakeApi::start().await;
    // A replica that died holding the Lease (its record never changes again).
    let lease = json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "gpu-admission", "namespace": "gpu-system"},
        "spec": {"holderIdentity": "crashed", "leaseDurationSeconds": 2,
                 "renewTime": "2026-11-23T09:00:00.000000Z", "acquireTime": "2026-11-23T09:00:00.000000Z",
                 "leaseTransitions": 4},
    });
    let client = api.client();
    let leases: kube::Api<k8s_openapi::api::coordination::v1::Lease> =
        kube::Api::namespaced(client, "gpu-system");
    leases
        .create(&Default::default(), &serde_json::from_value(lease).unwrap())
        .await
        .unwrap();
    let started = Instant::now();
    let b = start_extender(&api, elect("replica-b", 2000, 250)).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(
        !b.leadership.is_leader(),
        "took over a live-looking lease too early"
    );
    eventually(Duration::from_secs(3), "b leads", || {
        b.leadership.is_leader()
    })
    .await;
    // Within the lease duration (2 s) plus two retry periods of first seeing it.
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_millis(3200),
        "{took:?}"
    );
    let lease = api.lease("gpu-system", "gpu-admission").unwrap();
    assert_eq!(lease["spec"]["holderIdentity"], "replica-b");
    assert_eq!(lease["spec"]["leaseTransitions"], 5);
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_cannot_renew_steps_down_before_its_lease_expires() {
    let api = FakeApi::start().await;
    let a = start_extender(&api, elect("replica-a", 1500, 200)).await;
    eventually(Duration::from_secs(3), "a leads", || {
        a.leadership.is_leader()
    })
    .await;
    api.faults().leases_down = true;
    let cut = Instant::now();
    eventually(Duration::from_secs(3), "a steps down", || {
        !a.leadership.is_leader()
    })
    .await;
    // Renew deadline = 2/3 of the lease duration: it stops deciding before anyone may take over.
    let took = cut.elapsed();
    assert!(took < Duration::from_millis(1500), "{took:?}");
    assert!(!ready(&a).await);
    api.faults().leases_down = false;
    eventually(Duration::from_secs(3), "a leads again", || {
        a.leadership.is_leader()
    })
    .await;
    a.stop().await;
}
