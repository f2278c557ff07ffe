//! The webhook over real HTTPS on 127.0.0.1, with AdmissionReview v1 bodies shaped like the
//! ones kube-apiserver sends (tests/fixtures).

mod common;

use std::sync::Arc;

use base64::Engine as _;
use common::*;
use serde_json::{json, Value};

fn set_limits(review: &mut Value, pointer: &str, limits: Value) {
    *review.pointer_mut(pointer).unwrap() = limits;
}

const POD_LIMITS: &str = "/request/object/spec/containers/0/resources";

#[tokio::test]
async fn valid_share_pod_is_admitted() {
    let server = Server::with_cluster(&[], cluster()).await;
    let mut c = server.client().await;
    let resp = c.review("/validate", &fixture("pod_create.json")).await;
    assert_allowed(&resp);
    server.shutdown().await;
}

#[tokio::test]
async fn deployment_with_150_cores_is_denied_naming_object_container_value_and_rule() {
    let server = Server::with_cluster(&[], cluster()).await;
    let mut c = server.client().await;
    let resp = c
        .review("/validate", &fixture("deployment_create.json"))
        .await;
    assert_eq!(
        denial(&resp),
        "Deployment team-a/trainer: container \"train\": tencent.com/vcuda-core=150 is invalid: \
         use 1-99 for a share of one card or a multiple of 100 for whole cards"
    );
    assert_eq!(resp["status"]["code"], 422);
    server.shutdown().await;
}

#[tokio::test]
async fn cronjob_share_without_memory_is_denied_at_apply_time_even_in_dry_run() {
    let server = Server::with_cluster(&[], cluster()).await;
    let mut c = server.client().await;
    let review = fixture("cronjob_create.json");
    assert_eq!(review["request"]["dryRun"], true);
    let msg = denial(&c.review("/validate", &review).await);
    assert!(
        msg.starts_with("CronJob team-b/nightly-eval: container \"eval\": "),
        "{msg}"
    );
    assert!(msg.contains("tencent.com/vcuda-core=30 asks for a share of one card, which needs tencent.com/vcuda-memory"), "{msg}");
    server.shutdown().await;
}

#[tokio::test]
async fn cronjob_share_without_memory_passes_with_a_warning_when_a_default_is_configured() {
    let server = Server::with_cluster(&["--default-vcuda-memory", "8"], cluster()).await;
    let mut c = server.client().await;
    let resp = c.review("/validate", &fixture("cronjob_create.json")).await;
    assert_allowed(&resp);
    let warning = resp["warnings"][0].as_str().unwrap();
    assert!(
        warning.contains("tencent.com/vcuda-memory=8 (2 GiB)"),
        "{warning}"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn memory_without_cores_and_limits_unlike_requests_are_denied() {
    let server = Server::with_cluster(&[], cluster()).await;
    let mut c = server.client().await;
    let mut review = fixture("pod_create.json");
    set_limits(
        &mut review,
        POD_LIMITS,
        json!({"limits": {"tencent.com/vcuda-memory": "4"}}),
    );
    let msg = denial(&c.review("/validate", &review).await);
    assert!(msg.starts_with("Pod team-a/infer-7d9c5: container \"infer\": tencent.com/vcuda-memory=4 is invalid without tencent.com/vcuda-core"), "{msg}");

    set_limits(
        &mut review,
        POD_LIMITS,
        json!({"limits": {"tencent.com/vcuda-core": "40", "tencent.com/vcuda-memory": "4"},
               "requests": {"tencent.com/vcuda-core": "30", "tencent.com/vcuda-memory": "4"}}),
    );
    let msg = denial(&c.review("/validate", &review).await);
    assert!(
        msg.contains("tencent.com/vcuda-core has requests=30 but limits=40"),
        "{msg}"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn memory_larger_than_the_largest_card_is_denied_per_model() {
    let server = Server::with_cluster(&[], cluster()).await;
    let mut c = server.client().await;
    // The fixture pins the pod to T4 (15 GiB = 60 blocks): 61 blocks cannot fit.
    let mut review = fixture("pod_create.json");
    let big = json!({"limits": {"tencent.com/vcuda-core": "50", "tencent.com/vcuda-memory": "61"}});
    set_limits(&mut review, POD_LIMITS, big.clone());
    let msg = denial(&c.review("/validate", &review).await);
    assert!(msg.contains("container \"infer\": tencent.com/vcuda-memory=61 (15616 MiB) is larger than the largest card this pod may use"), "{msg}");
    assert!(msg.contains("Tesla T4 with 15 GiB = 60 blocks"), "{msg}");
    // Unpinned, the A100's 40 GiB is the bound: 61 blocks fit, 161 do not.
    review["request"]["object"]["metadata"]["annotations"] = json!({});
    assert_allowed(&c.review("/validate", &review).await);
    set_limits(
        &mut review,
        POD_LIMITS,
        json!({"limits": {"tencent.com/vcuda-core": "50", "tencent.com/vcuda-memory": "161"}}),
    );
    let msg = denial(&c.review("/validate", &review).await);
    assert!(msg.contains("larger than the largest card in the cluster, NVIDIA A100-SXM4-40GB with 40 GiB = 160 blocks"), "{msg}");
    server.shutdown().await;
}

#[tokio::test]
async fn invalid_limiter_annotations_are_denied_naming_the_value_and_the_rule() {
    let server = Server::with_cluster(&[], cluster()).await;
    let mut c = server.client().await;
    let mut review = fixture("pod_create.json");
    review["request"]["object"]["metadata"]["annotations"] = json!({
        "tencent.com/vcuda-core-limit": "80",
        "tencent.com/vcuda-limiter": "disabled"
    });
    assert_allowed(&c.review("/validate", &review).await);
    review["request"]["object"]["metadata"]["annotations"] = json!({
        "tencent.com/vcuda-core-limit": "40",
        "tencent.com/vcuda-limiter": "off"
    });
    let resp = c.review("/validate", &review).await;
    let msg = denial(&resp);
    assert!(
        msg.contains("annotation tencent.com/vcuda-limiter=\"off\" is invalid: use \"disabled\""),
        "{msg}"
    );
    assert!(
        msg.contains("container \"infer\": annotation tencent.com/vcuda-core-limit=\"40\" is invalid: 40 is outside 50 to 100"),
        "{msg}"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn user_setting_a_reserved_annotation_on_create_is_denied() {
    let server = Server::with_cluster(&[], cluster()).await;
    let mut c = server.client().await;
    let mut review = fixture("pod_create.json");
    review["request"]["userInfo"]["username"] = json!("mallory");
    review["request"]["object"]["metadata"]["annotations"] = json!({
        "tencent.com/predicate-gpu-idx-0": "1",
        "tencent.com/predicate-node": "t4-0"
    });
    let resp = c.review("/validate", &review).await;
    let msg = denial(&resp);
    assert_eq!(resp["status"]["code"], 403);
    assert!(msg.starts_with("Pod team-a/infer-7d9c5: annotation tencent.com/predicate-gpu-idx-0 (card indices of container \"infer\") is reserved"), "{msg}");
    assert!(
        msg.contains("user \"mallory\" may not set it to \"1\""),
        "{msg}"
    );
    assert!(
        msg.contains("annotation tencent.com/predicate-node is reserved"),
        "{msg}"
    );
    // The extender's service account may.
    review["request"]["userInfo"]["username"] =
        json!("system:serviceaccount:kube-system:gpu-admission");
    assert_allowed(&c.review("/validate", &review).await);
    server.shutdown().await;
}

#[tokio::test]
async fn update_that_keeps_reserved_annotations_written_by_the_system_passes() {
    let server = Server::with_cluster(&[], cluster()).await;
    let mut c = server.client().await;
    // alice adds a label to a running pod whose placement annotations the system wrote.
    let review = fixture("pod_update.json");
    assert_allowed(&c.review("/validate", &review).await);
    server.shutdown().await;
}

#[tokio::test]
async fn update_that_moves_a_pod_to_another_card_or_strips_its_assignment_is_denied() {
    let server = Server::with_cluster(&[], cluster()).await;
    let mut c = server.client().await;
    let mut review = fixture("pod_update.json");
    review["request"]["object"]["metadata"]["annotations"]["tencent.com/predicate-gpu-idx-0"] =
        json!("0");
    let msg = denial(&c.review("/validate", &review).await);
    assert!(
        msg.contains("user \"alice\" may not change it from \"2\" to \"0\""),
        "{msg}"
    );

    let mut review = fixture("pod_update.json");
    review["request"]["object"]["metadata"]["annotations"] = json!({});
    let msg = denial(&c.review("/validate", &review).await);
    assert!(
        msg.contains("may not remove it (it was \"gpu-node-3\")"),
        "{msg}"
    );

    // The device plugin's service account may rewrite them.
    let mut review = fixture("pod_update.json");
    review["request"]["userInfo"]["username"] =
        json!("system:serviceaccount:kube-system:gpu-manager");
    review["request"]["object"]["metadata"]["annotations"]["tencent.com/predicate-gpu-idx-0"] =
        json!("1");
    assert_allowed(&c.review("/validate", &review).await);
    server.shutdown().await;
}

#[tokio::test]
async fn update_of_a_pod_that_was_already_invalid_is_not_blocked() {
    let server = Server::with_cluster(&[], cluster()).await;
    let mut c = server.client().await;
    let mut review = fixture("pod_update.json");
    // Created before the webhook existed with an invalid request; a label change must pass.
    for which in ["object", "oldObject"] {
        review["request"][which]["spec"]["containers"][0]["resources"] =
            json!({"limits": {"tencent.com/vcuda-core": "150"}});
    }
    assert_allowed(&c.review("/validate", &review).await);
    server.shutdown().await;
}

#[tokio::test]
async fn standalone_still_enforces_shape_rules_and_reserved_annotations() {
    let server = Server::start(&["--standalone"], None, None).await;
    let mut c = server.client().await;
    let msg = denial(
        &c.review("/validate", &fixture("deployment_create.json"))
            .await,
    );
    assert!(
        msg.contains("tencent.com/vcuda-core=150 is invalid"),
        "{msg}"
    );
    let mut review = fixture("pod_create.json");
    // No cluster: a memory request larger than any card cannot be judged and passes.
    set_limits(
        &mut review,
        POD_LIMITS,
        json!({"limits": {"tencent.com/vcuda-core": "50", "tencent.com/vcuda-memory": "4000"}}),
    );
    assert_allowed(&c.review("/validate", &review).await);
    review["request"]["object"]["metadata"]["annotations"] =
        json!({"tencent.com/gpu-assigned": "true"});
    let msg = denial(&c.review("/validate", &review).await);
    assert!(
        msg.contains("annotation tencent.com/gpu-assigned is reserved"),
        "{msg}"
    );
    server.shutdown().await;
}

fn decode_patch(resp: &Value) -> json_patch::Patch {
    assert_eq!(resp["patchType"], "JSONPatch");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(resp["patch"].as_str().unwrap())
        .unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

#[tokio::test]
async fn mutation_sets_scheduler_name_and_fills_default_memory() {
    let server = Server::with_cluster(
        &[
            "--set-scheduler-name",
            "gpu-scheduler",
            "--default-vcuda-memory",
            "4",
        ],
        cluster(),
    )
    .await;
    let mut c = server.client().await;
    let mut review = fixture("pod_create.json");
    set_limits(
        &mut review,
        POD_LIMITS,
        json!({"limits": {"tencent.com/vcuda-core": "30"}, "requests": {"tencent.com/vcuda-core": "30"}}),
    );
    let resp = c.review("/mutate", &review).await;
    assert_allowed(&resp);
    let mut pod = review["request"]["object"].clone();
    json_patch::patch(&mut pod, &decode_patch(&resp)).unwrap();
    assert_eq!(pod["spec"]["schedulerName"], "gpu-scheduler");
    let res = &pod["spec"]["containers"][0]["resources"];
    assert_eq!(res["limits"]["tencent.com/vcuda-memory"], "4");
    assert_eq!(res["requests"]["tencent.com/vcuda-memory"], "4");
    // The mutated pod passes validation.
    review["request"]["object"] = pod;
    assert_allowed(&c.review("/validate", &review).await);

    // A container with no resources block at all, and a non-GPU pod left alone.
    let mut review = fixture("pod_create.json");
    set_limits(&mut review, POD_LIMITS, json!({}));
    let resp = c.review("/mutate", &review).await;
    assert!(resp.get("patch").is_none(), "non-GPU pod mutated: {resp}");
    server.shutdown().await;
}

#[tokio::test]
async fn mutation_keeps_an_explicit_other_scheduler() {
    let server = Server::with_cluster(&["--set-scheduler-name", "gpu-scheduler"], cluster()).await;
    let mut c = server.client().await;
    let mut review = fixture("pod_create.json");
    review["request"]["object"]["spec"]["schedulerName"] = json!("volcano");
    let resp = c.review("/mutate", &review).await;
    assert!(resp.get("patch").is_none(), "{resp}");
    assert!(resp["warnings"][0]
        .as_str()
        .unwrap()
        .contains("\"volcano\" was kept"));
    server.shutdown().await;
}

#[tokio::test]
async fn malformed_and_wrong_version_reviews_get_400_with_the_reason() {
    let server = Server::with_cluster(&[], cluster()).await;
    let mut c = server.client().await;
    let (status, body) = c.post_raw("/validate", b"{\"kind\": ".to_vec()).await;
    assert_eq!(status, 400);
    assert!(String::from_utf8_lossy(&body).contains("not an AdmissionReview JSON document"));
    let mut review = fixture("pod_create.json");
    review["apiVersion"] = json!("admission.k8s.io/v1beta1");
    let (status, body) = c
        .post_raw("/validate", serde_json::to_vec(&review).unwrap())
        .await;
    assert_eq!(status, 400);
    let body = String::from_utf8_lossy(&body);
    assert!(body.contains("admissionReviewVersions"), "{body}");
    // The connection survives bad requests (keep-alive).
    assert_allowed(&c.review("/validate", &fixture("pod_create.json")).await);
    server.shutdown().await;
}

#[tokio::test]
async fn webhook_refuses_to_start_without_cluster_state_unless_standalone() {
    let pki = Pki::new();
    let args = gm_admission::WebhookArgs::try_from_flags([
        "--webhook-addr",
        "127.0.0.1:0",
        "--tls-cert",
        &pki.cert_path.display().to_string(),
        "--tls-key",
        &pki.key_path.display().to_string(),
    ])
    .unwrap();
    let err = gm_admission::start_webhook(args, None, None, async {})
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("unless --standalone"), "{err}");
}

#[tokio::test]
async fn webhook_refuses_to_start_with_a_key_that_does_not_match_its_certificate() {
    let pki = Pki::new();
    let (_, other_key) = pki.leaf("other");
    std::fs::write(&pki.key_path, other_key).unwrap();
    let args = gm_admission::WebhookArgs::try_from_flags([
        "--webhook-addr",
        "127.0.0.1:0",
        "--standalone",
        "--tls-cert",
        &pki.cert_path.display().to_string(),
        "--tls-key",
        &pki.key_path.display().to_string(),
    ])
    .unwrap();
    let err = gm_admission::start_webhook(args, None, None, async {})
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("does not belong to the certificate"), "{err}");
}

#[tokio::test]
async fn invalid_gpuquota_objects_are_denied_with_every_problem() {
    let server = Server::with_cluster(&[], cluster()).await;
    let mut c = server.client().await;
    let mut review = fixture("deployment_create.json");
    review["request"]["kind"] =
        json!({"group": "gpu.tkestack.io", "version": "v1alpha1", "kind": "GpuQuota"});
    review["request"]["resource"] =
        json!({"group": "gpu.tkestack.io", "version": "v1alpha1", "resource": "gpuquotas"});
    review["request"]["name"] = json!("gpu");
    review["request"]["object"] = gpu_quota(
        "team-a",
        "gpu",
        json!({"limits": [{"vcudaCore": 400}, {"model": "T4"}]}),
    );
    let msg = denial(&c.review("/validate", &review).await);
    assert!(
        msg.starts_with(
            "GpuQuota team-a/gpu: spec is invalid: limits[0] names neither a model nor a pool"
        ),
        "{msg}"
    );
    assert!(
        msg.contains("limits[1] (model \"T4\") bounds nothing"),
        "{msg}"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn health_endpoint_answers_over_tls() {
    let server = Server::start(&["--standalone"], None, None).await;
    let mut c = server.client().await;
    let (status, body) = c.get("/healthz").await;
    assert_eq!((status, body.as_slice()), (200, &b"ok"[..]));
    let (status, _) = c.get("/validate").await;
    assert_eq!(status, 405, "reviews are POSTed");
    server.shutdown().await;
}

#[tokio::test]
async fn delete_requests_are_admitted_untouched() {
    let server = Server::with_cluster(&[], Arc::new(gm_admission::InMemoryCluster::new())).await;
    let mut c = server.client().await;
    let mut review = fixture("pod_update.json");
    review["request"]["operation"] = json!("DELETE");
    review["request"]["oldObject"] = review["request"]["object"].clone();
    review["request"]["object"] = Value::Null;
    review["request"]["options"] = json!({"kind": "DeleteOptions", "apiVersion": "meta.k8s.io/v1"});
    assert_allowed(&c.review("/validate", &review).await);
    server.shutdown().await;
}

#[tokio::test]
async fn gpuquota_status_writes_and_metadata_edits_of_an_invalid_quota_pass() {
    let server = Server::with_cluster(&[], cluster()).await;
    let mut c = server.client().await;
    let bad = gpu_quota("team-a", "gpu", json!({"limits": [{"vcudaCore": 400}]}));
    let mut review = fixture("pod_update.json");
    review["request"]["kind"] =
        json!({"group": "gpu.tkestack.io", "version": "v1alpha1", "kind": "GpuQuota"});
    review["request"]["resource"] =
        json!({"group": "gpu.tkestack.io", "version": "v1alpha1", "resource": "gpuquotas"});
    review["request"]["name"] = json!("gpu");
    review["request"]["object"] = bad.clone();
    review["request"]["oldObject"] = bad.clone();
    review["request"]["object"]["metadata"]["labels"] = json!({"team": "a"});
    assert_allowed(&c.review("/validate", &review).await);
    // Changing the spec to another invalid one is denied.
    review["request"]["object"]["spec"] = json!({"limits": [{"model": "T4"}]});
    let msg = denial(&c.review("/validate", &review).await);
    assert!(msg.contains("bounds nothing"), "{msg}");
    // The status subresource is never blocked by the spec.
    review["request"]["subResource"] = json!("status");
    assert_allowed(&c.review("/validate", &review).await);
    server.shutdown().await;
}
