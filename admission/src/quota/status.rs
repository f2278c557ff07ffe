//! Publishes each GpuQuota's usage in its status.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use kube::api::{Patch, PatchParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;

use super::sources::QuotaSources;
use super::{facts, usage, PodFacts};
use crate::args::Settings;
use crate::cluster::{CardCache, ClusterView};
use crate::crd::{GpuQuota, GpuQuotaStatus};

/// The status a GpuQuota should have now (without the `updated` time).
pub(crate) fn compute_status(
    q: &GpuQuota,
    pods: &[PodFacts],
    cards: &gm_core::quota::ClusterCards,
) -> GpuQuotaStatus {
    let generation = q.metadata.generation;
    match q.spec.to_quota() {
        Err(e) => GpuQuotaStatus {
            used: Vec::new(),
            pods: pods.len() as u64,
            observed_generation: generation,
            updated: None,
            error: Some(format!(
                "{e}; GPU pods of this namespace are denied until it is fixed"
            )),
        },
        Ok(quota) => {
            let used = usage(&quota, cards, pods);
            GpuQuotaStatus {
                used: q.spec.usage(&used),
                pods: pods.len() as u64,
                observed_generation: generation,
                updated: None,
                error: None,
            }
        }
    }
}

fn same(a: &GpuQuotaStatus, b: Option<&GpuQuotaStatus>) -> bool {
    let Some(b) = b else {
        return false;
    };
    a.used == b.used
        && a.pods == b.pods
        && a.observed_generation == b.observed_generation
        && a.error == b.error
}

/// Recompute and write changed statuses every `interval` while this replica is the leader.
pub(crate) async fn run(
    client: Client,
    sources: QuotaSources,
    view: Arc<dyn ClusterView>,
    cache: Arc<CardCache>,
    settings: Arc<Settings>,
    interval: Duration,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if !view.synced() || !view.is_leader() || !sources.synced() {
            continue;
        }
        let cards = cache.get(view.as_ref());
        let mut by_ns: HashMap<String, Vec<PodFacts>> = HashMap::new();
        for q in sources.crd_objects() {
            let Some(ns) = q.namespace() else {
                continue;
            };
            let pods = by_ns.entry(ns.clone()).or_insert_with(|| {
                view.namespace_gpu_pods(&ns)
                    .iter()
                    .filter_map(|p| facts(p, &cards, &settings))
                    .collect()
            });
            let mut status = compute_status(&q, pods, &cards);
            if same(&status, q.status.as_ref()) {
                continue;
            }
            status.updated = Some(k8s_openapi::jiff::Timestamp::now().to_string());
            let api: Api<GpuQuota> = Api::namespaced(client.clone(), &ns);
            // A merge patch leaves out keys it does not name: clear a fixed error explicitly.
            let mut body = serde_json::to_value(&status).unwrap_or_else(|_| json!({}));
            if let Some(obj) = body.as_object_mut() {
                obj.entry("error").or_insert(serde_json::Value::Null);
            }
            let patch = json!({ "status": body });
            match api
                .patch_status(
                    &q.name_any(),
                    &PatchParams::default(),
                    &Patch::Merge(&patch),
                )
                .await
            {
                Ok(_) => {
                    tracing::debug!(quota = %format!("{ns}/{}", q.name_any()), "GpuQuota status updated")
                }
                Err(e) => {
                    tracing::warn!(quota = %format!("{ns}/{}", q.name_any()), error = %e, "writing GpuQuota status failed; will retry")
                }
            }
        }
    }
}
