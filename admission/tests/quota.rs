//! GPU quota end to end: GpuQuota objects and the old ConfigMap served by a fake API server,
//! live pods from an in-memory cluster view, reviews over real HTTPS.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use gm_admission::InMemoryCluster;
use serde_json::{json, Value};

/// A pod-create review in team-a asking for `cores` vcuda-core (whole cards) on `models`.
fn create(uid: &str, cores: &str, models: Option<&str>, dry_run: bool) -> Value {
    let mut r = fixture("pod_create.json");
    r["request"]["uid"] = json!(format!("req-{uid}"));
    r["request"]["dryRun"] = json!(dry_run);
    r["request"]["name"] = json!(uid);
    let obj = &mut r["request"]["object"];
    obj["metadata"]["uid"] = json!(uid);
    obj["metadata"]["name"] = json!(uid);
    obj["metadata"]["annotations"] = match models {
        Some(m) => json!({"tencent.com/gpu-models": m}),
        None => json!({}),
    };
    obj["spec"]["containers"][0]["resources"] =
        json!({"limits": {"tencent.com/vcuda-core": cores}});
    r
}

/// Send until the quota sources have synced (the first answers may say they have not).
async fn review_synced(c: &mut HttpsClient, review: &Value) -> Value {
    for _ in 0..100 {
        let resp = c.review("/validate", review).await;
        let msg = resp["status"]["message"].as_str().unwrap_or_default();
        if !msg.contains("has not synced") {
            return resp;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("quota sources never synced");
}

async fn crd_server(
    quotas: Vec<Value>,
    cluster: Arc<InMemoryCluster>,
    flags: &[&str],
) -> (Server, Arc<ApiState>) {
    let api = Arc::new(ApiState::default());
    *api.quotas.lock().unwrap() = quotas;
    let client = fake_api(api.clone()).await;
    let server = Server::start(flags, Some(client), Some(cluster)).await;
    (server, api)
}

#[tokio::test]
async fn quota_denial_names_the_quota_used_requested_and_limit() {
    let cluster = cluster();
    cluster.upsert_pod(live_pod(
        "team-a",
        "running",
        Some("a100-0"),
        &[("tencent.com/vcuda-core", "100")],
        &[],
    ));
    // Other namespaces do not count.
    cluster.upsert_pod(live_pod(
        "team-b",
        "other",
        Some("a100-0"),
        &[("tencent.com/vcuda-core", "300")],
        &[],
    ));
    let q = gpu_quota(
        "team-a",
        "gpu",
        json!({"limits": [{"model": "A100", "vcudaCore": 200}]}),
    );
    let (server, _api) = crd_server(vec![q], cluster, &[]).await;
    let mut c = server.client().await;

    let resp = review_synced(&mut c, &create("p1", "200", Some("A100"), false)).await;
    assert_eq!(resp["status"]["code"], 403);
    assert_eq!(
        denial(&resp),
        "Pod team-a/p1: exceeds GpuQuota team-a/gpu: limits[0] (model \"A100\"): \
         tencent.com/vcuda-core used 100 + requested 200 > limit 200 \
         (requested by container \"infer\": 2 whole cards)"
    );
    // One card fits; a T4-pinned pod is not charged to the A100 limit at all.
    assert_allowed(
        &c.review("/validate", &create("p2", "100", Some("A100"), false))
            .await,
    );
    assert_allowed(
        &c.review("/validate", &create("p3", "200", Some("T4"), false))
            .await,
    );
    // An unpinned pod could land on an A100, so it counts there too: the limit is full now.
    let msg = denial(
        &c.review("/validate", &create("p4", "100", None, false))
            .await,
    );
    assert!(
        msg.contains("used 200 + requested 100 > limit 200"),
        "{msg}"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn dry_run_admission_is_not_counted() {
    let q = gpu_quota(
        "team-a",
        "gpu",
        json!({"limits": [{"model": "A100", "cards": 1}]}),
    );
    let (server, _api) = crd_server(vec![q], cluster(), &[]).await;
    let mut c = server.client().await;
    assert_allowed(&review_synced(&mut c, &create("d1", "100", Some("A100"), true)).await);
    assert_allowed(
        &c.review("/validate", &create("d2", "100", Some("A100"), true))
            .await,
    );
    assert_allowed(
        &c.review("/validate", &create("r1", "100", Some("A100"), false))
            .await,
    );
    let msg = denial(
        &c.review("/validate", &create("r2", "100", Some("A100"), false))
            .await,
    );
    assert!(
        msg.contains("whole cards used 1 + requested 1 > limit 1"),
        "{msg}"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn usage_is_published_in_the_gpuquota_status() {
    let cluster = cluster();
    cluster.upsert_pod(live_pod(
        "team-a",
        "share",
        Some("t4-0"),
        &[
            ("tencent.com/vcuda-core", "30"),
            ("tencent.com/vcuda-memory", "8"),
        ],
        &[
            ("tencent.com/predicate-gpu-idx-0", "1"),
            ("tencent.com/predicate-node", "t4-0"),
        ],
    ));
    cluster.upsert_pod(live_pod(
        "team-a",
        "whole",
        Some("a100-0"),
        &[("tencent.com/vcuda-core", "200")],
        &[],
    ));
    let q = gpu_quota(
        "team-a",
        "gpu",
        json!({"limits": [
            {"model": "T4", "vcudaCore": 100, "vcudaMemory": 64},
            {"pool": "private", "cards": 4}
        ]}),
    );
    let (server, api) = crd_server(vec![q], cluster, &["--quota-status-interval", "100ms"]).await;
    let patch = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Some(p) = api.status_patches.lock().unwrap().first().cloned() {
                return p;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("no status patch within 10s");
    assert_eq!((patch.0.as_str(), patch.1.as_str()), ("team-a", "gpu"));
    let status = &patch.2["status"];
    assert_eq!(status["pods"], 2);
    assert_eq!(
        status["used"],
        json!([
            {"model": "T4", "vcudaCore": 30, "vcudaMemory": 8, "cards": 0},
            {"pool": "private", "vcudaCore": 200, "vcudaMemory": 0, "cards": 2}
        ])
    );
    assert_eq!(status["observedGeneration"], 1);
    assert!(status["error"].is_null());
    assert!(status["updated"].as_str().is_some_and(|t| t.ends_with('Z')));
    server.shutdown().await;
}

#[tokio::test]
async fn old_gpuquota_configmap_limits_models_and_cards() {
    let api = Arc::new(ApiState::default());
    api.configmaps.lock().unwrap().push(json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "gpuquota", "namespace": "kube-system", "resourceVersion": "9"},
        "data": {"gpu_quota": "{\"team-a\":{\"quota\":{\"T4\":1},\"pool\":[]}}"}
    }));
    let client = fake_api(api.clone()).await;
    let server = Server::start(
        &[
            "--quota-crd=false",
            "--quota-configmap",
            "kube-system/gpuquota",
        ],
        Some(client),
        Some(cluster()),
    )
    .await;
    let mut c = server.client().await;
    // Unpinned: the pod could land on an A100, which team-a may not use.
    let msg = denial(&review_synced(&mut c, &create("u1", "100", None, false)).await);
    assert!(
        msg.contains("gpu quota ConfigMap kube-system/gpuquota (namespace \"team-a\")"),
        "{msg}"
    );
    assert!(msg.contains("may only use models [T4]"), "{msg}");
    assert!(
        msg.contains("NVIDIA A100-SXM4-40GB in pool \"private\""),
        "{msg}"
    );
    assert!(
        msg.contains("pin it with the tencent.com/gpu-models annotation"),
        "{msg}"
    );
    // Pinned to T4: one card's worth (100 vcuda-core) fits, the second does not.
    assert_allowed(
        &c.review("/validate", &create("t1", "100", Some("T4"), false))
            .await,
    );
    let msg = denial(
        &c.review("/validate", &create("t2", "100", Some("T4"), false))
            .await,
    );
    assert!(
        msg.contains("tencent.com/vcuda-core used 100 + requested 100 > limit 100"),
        "{msg}"
    );
    // Namespaces the ConfigMap does not list are not limited.
    let mut other = create("o1", "400", None, false);
    other["request"]["namespace"] = json!("team-z");
    other["request"]["object"]["metadata"]["namespace"] = json!("team-z");
    assert_allowed(&c.review("/validate", &other).await);
    server.shutdown().await;
}

#[tokio::test]
async fn gpu_pods_wait_while_cluster_state_is_not_synced() {
    let cluster = cluster();
    cluster.set_synced(false);
    let q = gpu_quota(
        "team-a",
        "gpu",
        json!({"limits": [{"model": "T4", "cards": 1}]}),
    );
    let (server, _api) = crd_server(vec![q], cluster.clone(), &[]).await;
    let mut c = server.client().await;
    let review = create("w1", "100", Some("T4"), false);
    // Quota objects sync first; then the cluster cache is what is missing.
    let resp = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let resp = c.review("/validate", &review).await;
            if resp["status"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("the cluster cache"))
            {
                return resp;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("never reported the unsynced cluster cache");
    assert_eq!(resp["status"]["code"], 503);
    assert!(denial(&resp).contains("retry in a few seconds"));
    cluster.set_synced(true);
    assert_allowed(&c.review("/validate", &review).await);
    server.shutdown().await;
}

#[tokio::test]
async fn pods_without_gpu_requests_ignore_quota_entirely() {
    let q = gpu_quota(
        "team-a",
        "gpu",
        json!({"limits": [{"model": "T4", "cards": 0}]}),
    );
    let (server, _api) = crd_server(vec![q], cluster(), &[]).await;
    let mut c = server.client().await;
    let mut review = create("cpu", "100", None, false);
    review["request"]["object"]["spec"]["containers"][0]["resources"] =
        json!({"limits": {"cpu": "2"}});
    assert_allowed(&c.review("/validate", &review).await);
    server.shutdown().await;
}
