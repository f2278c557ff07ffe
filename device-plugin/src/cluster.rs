//! Writes to the API server: pod annotations (after PreStartContainer) and the node's
//! inventory (see [`crate::publisher`]).
//!
//! [`Cluster`] is the seam: [`KubeCluster`] talks to a real API server, tests plug in a
//! recorder. Every write is retried a bounded number of times with backoff; a pod that no
//! longer exists is dropped at once. Nothing waits on these writes while holding state.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Patch, PatchParams};
use kube::Api;
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinHandle;

/// A boxed future, for the object-safe [`Cluster`] trait.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why a write failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClusterError {
    /// The object does not exist (any more): retrying is pointless.
    #[error("not found: {0}")]
    NotFound(String),
    /// The API server refused the write for good (forbidden, invalid): retrying is pointless.
    #[error("rejected: {0}")]
    Rejected(String),
    /// Worth retrying (conflict, throttling, server error, network).
    #[error("{0}")]
    Transient(String),
}

/// The API server writes the daemon makes.
pub trait Cluster: Send + Sync + std::fmt::Debug + 'static {
    /// Merge `annotations` into a pod's annotations.
    fn patch_pod_annotations<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
        annotations: &'a BTreeMap<String, String>,
    ) -> BoxFuture<'a, Result<(), ClusterError>>;

    /// Merge `labels` and `annotations` into a node's metadata.
    fn patch_node<'a>(
        &'a self,
        name: &'a str,
        labels: &'a BTreeMap<String, String>,
        annotations: &'a BTreeMap<String, String>,
    ) -> BoxFuture<'a, Result<(), ClusterError>>;
}

/// The real API server.
#[derive(Clone)]
pub struct KubeCluster {
    client: kube::Client,
}

impl std::fmt::Debug for KubeCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeCluster").finish_non_exhaustive()
    }
}

impl KubeCluster {
    pub fn new(client: kube::Client) -> Self {
        Self { client }
    }
}

fn classify(e: kube::Error) -> ClusterError {
    match e {
        kube::Error::Api(s) if s.code == 404 => ClusterError::NotFound(s.message),
        kube::Error::Api(s) if s.code == 409 || s.code == 429 || s.code >= 500 => {
            ClusterError::Transient(format!("{} ({})", s.message, s.code))
        }
        kube::Error::Api(s) => ClusterError::Rejected(format!("{} ({})", s.message, s.code)),
        other => ClusterError::Transient(other.to_string()),
    }
}

impl Cluster for KubeCluster {
    fn patch_pod_annotations<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
        annotations: &'a BTreeMap<String, String>,
    ) -> BoxFuture<'a, Result<(), ClusterError>> {
        Box::pin(async move {
            let api: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
            let patch = serde_json::json!({"metadata": {"annotations": annotations}});
            api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .map(|_| ())
                .map_err(classify)
        })
    }

    fn patch_node<'a>(
        &'a self,
        name: &'a str,
        labels: &'a BTreeMap<String, String>,
        annotations: &'a BTreeMap<String, String>,
    ) -> BoxFuture<'a, Result<(), ClusterError>> {
        Box::pin(async move {
            let api: Api<Node> = Api::all(self.client.clone());
            let patch =
                serde_json::json!({"metadata": {"labels": labels, "annotations": annotations}});
            api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .map(|_| ())
                .map_err(classify)
        })
    }
}

/// How often and how patiently a write is retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    pub attempts: u32,
    pub first_delay: Duration,
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            attempts: 6,
            first_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(5),
        }
    }
}

/// Run `op` until it succeeds, fails for good, or the attempts are used up.
pub async fn with_retries<F>(retry: RetryPolicy, mut op: F) -> Result<(), ClusterError>
where
    F: FnMut() -> BoxFuture<'static, Result<(), ClusterError>>,
{
    let mut delay = retry.first_delay;
    let mut last = ClusterError::Transient("no attempt made".into());
    for attempt in 1..=retry.attempts.max(1) {
        match op().await {
            Ok(()) => return Ok(()),
            Err(e @ (ClusterError::NotFound(_) | ClusterError::Rejected(_))) => return Err(e),
            Err(e) => {
                tracing::debug!(attempt, error = %e, "API write failed; retrying");
                last = e;
            }
        }
        if attempt < retry.attempts {
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(retry.max_delay);
        }
    }
    Err(last)
}

/// Annotations to merge into a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PatchJob {
    pub namespace: String,
    pub name: String,
    pub annotations: BTreeMap<String, String>,
}

/// Start the asynchronous pod-annotation writer. Jobs run concurrently (at most 4 at once),
/// each with bounded retries; a pod that is gone is dropped.
pub fn spawn_patch_worker(
    cluster: Arc<dyn Cluster>,
    retry: RetryPolicy,
) -> (mpsc::Sender<PatchJob>, JoinHandle<()>) {
    let (tx, mut rx) = mpsc::channel::<PatchJob>(1024);
    let limit = Arc::new(Semaphore::new(4));
    let task = tokio::spawn(async move {
        while let Some(job) = rx.recv().await {
            let Ok(permit) = Arc::clone(&limit).acquire_owned().await else {
                return;
            };
            let cluster = Arc::clone(&cluster);
            tokio::spawn(async move {
                let _permit = permit;
                let job = Arc::new(job);
                let result = with_retries(retry, || {
                    let (cluster, job) = (Arc::clone(&cluster), Arc::clone(&job));
                    Box::pin(async move {
                        cluster
                            .patch_pod_annotations(&job.namespace, &job.name, &job.annotations)
                            .await
                    })
                })
                .await;
                let pod = format!("{}/{}", job.namespace, job.name);
                match result {
                    Ok(()) => tracing::debug!(%pod, "pod annotations written"),
                    Err(ClusterError::NotFound(_)) => {
                        tracing::info!(%pod, "pod is gone; its annotations were not written")
                    }
                    Err(e) => tracing::warn!(
                        %pod, error = %e,
                        "could not write the pod's GPU annotations; the scheduler extender may count its cards late"
                    ),
                }
            });
        }
    });
    (tx, task)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn fast() -> RetryPolicy {
        RetryPolicy {
            attempts: 4,
            first_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(2),
        }
    }

    #[tokio::test]
    async fn transient_failures_are_retried_a_bounded_number_of_times() {
        let calls = Arc::new(AtomicU32::new(0));
        let c = Arc::clone(&calls);
        let r = with_retries(fast(), move || {
            let c = Arc::clone(&c);
            Box::pin(async move {
                c.fetch_add(1, Ordering::SeqCst);
                Err(ClusterError::Transient("503".into()))
            })
        })
        .await;
        assert_eq!(r, Err(ClusterError::Transient("503".into())));
        assert_eq!(calls.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn a_missing_pod_is_not_retried_and_success_stops_retrying() {
        let calls = Arc::new(AtomicU32::new(0));
        let c = Arc::clone(&calls);
        let r = with_retries(fast(), move || {
            let c = Arc::clone(&c);
            Box::pin(async move {
                c.fetch_add(1, Ordering::SeqCst);
                Err(ClusterError::NotFound("pods \"x\" not found".into()))
            })
        })
        .await;
        assert!(matches!(r, Err(ClusterError::NotFound(_))));
        assert_eq!(calls.load(Ordering::SeqCst), 1);

        let calls = Arc::new(AtomicU32::new(0));
        let c = Arc::clone(&calls);
        let r = with_retries(fast(), move || {
            let c = Arc::clone(&c);
            Box::pin(async move {
                if c.fetch_add(1, Ordering::SeqCst) < 1 {
                    Err(ClusterError::Transient("conflict".into()))
                } else {
                    Ok(())
                }
            })
        })
        .await;
        assert_eq!(r, Ok(()));
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }
}
