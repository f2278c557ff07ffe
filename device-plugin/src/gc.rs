//! Reconciliation: the records are compared with the kubelet's pod-resources `List` and with
//! the API server's view of the pods, every `--gc-interval`.
//!
//! * A container pod-resources lists that the state does not know is adopted (this is how a
//!   lost or corrupt checkpoint is rebuilt).
//! * A record is released when its pod has ended (API server), or when pod-resources has not
//!   listed its IDs for `--gc-grace-period` and its pod is not known to be alive (see
//!   [`crate::state::release_reason`]).
//! * Limiter directories without a record are removed.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;

use crate::cluster::PatchJob;
use crate::plugin::pod_limits;
use crate::podresources::PodResourcesError;
use crate::response::{self, LimiterState};
use crate::shared::Shared;
use crate::state::record::looks_like_record_id;
use crate::state::{Now, Reconciled};

/// One reconciliation pass. Returns what changed, and the pod-resources error if it could not
/// be asked (the pass then only applies what the API server says).
pub async fn reconcile_once(shared: &Shared) -> (Reconciled, Option<PodResourcesError>) {
    let (listed, error) = match shared.podresources.list().await {
        Ok(l) => (Some(l), None),
        Err(e) => (None, Some(e)),
    };
    let pods = shared.pods.clone();
    let snapshot = shared.pods_snapshot();
    let now = Now::current();
    let (out, limiters) = shared.with_state(|st| {
        let out = st.reconcile(listed.as_deref(), pods.as_deref(), now);
        let limiters: Vec<_> = out
            .adopted
            .iter()
            .filter(|r| r.shape.is_some())
            .map(|r| {
                let pod = st.certain_pod(r, &snapshot);
                let soft = pod_limits(shared, r, pod.as_deref(), false).soft;
                response::limiter_config(r, st.inventory(), LimiterState::Confirmed, soft)
            })
            .collect();
        (out, limiters)
    });
    for (rec, reason) in &out.released {
        tracing::info!(
            record = %rec.id,
            pod = rec.pod().map(ToString::to_string).unwrap_or_default(),
            cards = ?rec.cards(),
            %reason,
            "allocation released"
        );
        shared.limiter.remove(&rec.id);
    }
    for rec in &out.adopted {
        tracing::info!(
            record = %rec.id,
            pod = rec.pod().map(ToString::to_string).unwrap_or_default(),
            cards = ?rec.cards(),
            "allocation adopted from the kubelet's pod-resources API"
        );
    }
    for cfg in limiters {
        shared.limiter.queue(cfg);
    }
    for (namespace, name, annotations) in &out.patches {
        tracing::info!(pod = %format!("{namespace}/{name}"), "the kubelet admitted this pod but its annotations do not say so yet; writing them");
        shared.queue_patch(PatchJob {
            namespace: namespace.clone(),
            name: name.clone(),
            annotations: annotations.clone(),
        });
    }
    sweep_limiters(
        shared,
        &[&shared.config.limiter_dir, &shared.config.limiter_state_dir],
    );
    (out, error)
}

/// Remove limiter config and state directories that belong to no record.
fn sweep_limiters(shared: &Shared, dirs: &[&Path]) {
    let mut names: Vec<String> = dirs
        .iter()
        .filter_map(|d| std::fs::read_dir(d).ok())
        .flatten()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| looks_like_record_id(n))
        .collect();
    names.sort();
    names.dedup();
    if names.is_empty() {
        return;
    }
    let orphans: Vec<String> = shared.read_state(|st| {
        names
            .into_iter()
            .filter(|n| !st.records().contains_key(n))
            .collect()
    });
    for name in orphans {
        tracing::debug!(dir = %name, "removing an orphaned limiter directory");
        shared.limiter.remove(&name);
    }
}

/// Reconcile every `every` (the daemon reconciled once at start; `failing` says whether that
/// pass could not reach pod-resources). While pod-resources fails, retry sooner (every second,
/// up to `every`), logging the failure once.
pub fn spawn_gc(shared: Arc<Shared>, every: Duration, failing: bool) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut failing = failing;
        let first = if failing {
            every.min(Duration::from_secs(1))
        } else {
            every
        };
        tokio::time::sleep(first).await;
        loop {
            let (_, error) = reconcile_once(&shared).await;
            let wait = match error {
                Some(e) => {
                    if !failing {
                        tracing::warn!(error = %e, "cannot reconcile allocations with the kubelet; retrying");
                    }
                    failing = true;
                    every.min(Duration::from_secs(1))
                }
                None => {
                    if failing {
                        tracing::info!("the kubelet's pod-resources API answers again");
                    }
                    failing = false;
                    every
                }
            };
            tokio::time::sleep(wait).await;
        }
    })
}
