//! Client of the kubelet's pod-resources API: which container holds which device IDs.
//!
//! The kubelet rate-limits the API (100 QPS, burst 10) and answers `RESOURCE_EXHAUSTED` when
//! the bucket is empty. This client keeps well below that with its own token bucket and, if
//! the kubelet still refuses, backs off and retries a bounded number of times.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use gm_core::ResourceNames;
use gm_proto::podresources::v1 as pr;
use gm_proto::podresources::v1::pod_resources_lister_client::PodResourcesListerClient;
use tonic::transport::Channel;
use tonic::Code;

use crate::state::ListedContainer;

/// Our own limit: at most this many calls per second on average...
const RATE_PER_SEC: f64 = 20.0;
/// ...and at most this many in a burst.
const BURST: f64 = 5.0;
/// Attempts when the kubelet answers RESOURCE_EXHAUSTED.
const EXHAUSTED_ATTEMPTS: u32 = 6;
/// First backoff after RESOURCE_EXHAUSTED (doubles each time).
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
/// Responses larger than the default 4 MiB happen on busy nodes.
const MAX_MESSAGE: usize = 16 * 1024 * 1024;

/// Why pod-resources could not answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PodResourcesError {
    #[error("cannot reach the kubelet's pod-resources API at {}: {reason}; check --pod-resources-socket and that /var/lib/kubelet/pod-resources is mounted", path.display())]
    Connect { path: PathBuf, reason: String },
    #[error("the kubelet's pod-resources API at {} is rate-limiting us (RESOURCE_EXHAUSTED) after {attempts} attempts", path.display())]
    Exhausted { path: PathBuf, attempts: u32 },
    #[error("the kubelet's pod-resources List at {} failed: {status}", path.display())]
    Call { path: PathBuf, status: String },
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// A rate-limited pod-resources client that (re)connects on demand.
#[derive(Debug)]
pub struct PodResourcesClient {
    path: PathBuf,
    names: ResourceNames,
    channel: tokio::sync::Mutex<Option<Channel>>,
    bucket: std::sync::Mutex<Bucket>,
}

impl PodResourcesClient {
    /// A client for the socket at `path`; nothing is dialled until the first call.
    pub fn new(path: impl Into<PathBuf>, names: ResourceNames) -> Self {
        Self {
            path: path.into(),
            names,
            channel: tokio::sync::Mutex::new(None),
            bucket: std::sync::Mutex::new(Bucket {
                tokens: BURST,
                at: Instant::now(),
            }),
        }
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    async fn take_token(&self) {
        loop {
            let wait = {
                let mut b = self.bucket.lock().unwrap_or_else(|p| p.into_inner());
                let now = Instant::now();
                let refill = now.duration_since(b.at).as_secs_f64() * RATE_PER_SEC;
                b.tokens = (b.tokens + refill).min(BURST);
                b.at = now;
                if b.tokens >= 1.0 {
                    b.tokens -= 1.0;
                    return;
                }
                Duration::from_secs_f64((1.0 - b.tokens) / RATE_PER_SEC)
            };
            tokio::time::sleep(wait).await;
        }
    }

    async fn channel(&self) -> Result<Channel, PodResourcesError> {
        let mut guard = self.channel.lock().await;
        if let Some(ch) = guard.as_ref() {
            return Ok(ch.clone());
        }
        let ch = gm_proto::uds::connect_with_timeout(&self.path, Duration::from_secs(3))
            .await
            .map_err(|e| PodResourcesError::Connect {
                path: self.path.clone(),
                reason: e.to_string(),
            })?;
        *guard = Some(ch.clone());
        Ok(ch)
    }

    async fn forget_channel(&self) {
        *self.channel.lock().await = None;
    }

    /// Every container holding devices of our two resources.
    pub async fn list(&self) -> Result<Vec<ListedContainer>, PodResourcesError> {
        let mut backoff = FIRST_BACKOFF;
        for attempt in 1..=EXHAUSTED_ATTEMPTS {
            self.take_token().await;
            let channel = self.channel().await?;
            let mut client =
                PodResourcesListerClient::new(channel).max_decoding_message_size(MAX_MESSAGE);
            let call = client.list(pr::ListPodResourcesRequest {});
            match tokio::time::timeout(Duration::from_secs(10), call).await {
                Ok(Ok(resp)) => return Ok(self.reduce(resp.into_inner())),
                Ok(Err(status)) if status.code() == Code::ResourceExhausted => {
                    if attempt == EXHAUSTED_ATTEMPTS {
                        break;
                    }
                    tracing::debug!(attempt, "pod-resources rate limit hit; backing off");
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                }
                Ok(Err(status)) => {
                    if matches!(status.code(), Code::Unavailable | Code::Unknown) {
                        self.forget_channel().await;
                    }
                    return Err(PodResourcesError::Call {
                        path: self.path.clone(),
                        status: format!("{:?}: {}", status.code(), status.message()),
                    });
                }
                Err(_) => {
                    self.forget_channel().await;
                    return Err(PodResourcesError::Call {
                        path: self.path.clone(),
                        status: "no answer within 10s".into(),
                    });
                }
            }
        }
        Err(PodResourcesError::Exhausted {
            path: self.path.clone(),
            attempts: EXHAUSTED_ATTEMPTS,
        })
    }

    fn reduce(&self, resp: pr::ListPodResourcesResponse) -> Vec<ListedContainer> {
        let mut out = Vec::new();
        for pod in resp.pod_resources {
            for c in pod.containers {
                let mut core = Vec::new();
                let mut memory = Vec::new();
                for d in c.devices {
                    if d.resource_name == self.names.core() {
                        core.extend(d.device_ids);
                    } else if d.resource_name == self.names.memory() {
                        memory.extend(d.device_ids);
                    }
                }
                if core.is_empty() && memory.is_empty() {
                    continue;
                }
                out.push(ListedContainer {
                    namespace: pod.namespace.clone(),
                    pod: pod.name.clone(),
                    container: c.name,
                    core,
                    memory,
                });
            }
        }
        out
    }
}

/// Which listed container holds exactly these IDs of `resource` (order-insensitive).
pub fn holder<'a>(
    listed: &'a [ListedContainer],
    core: bool,
    ids: &[String],
) -> Option<&'a ListedContainer> {
    let mut want: Vec<&str> = ids.iter().map(String::as_str).collect();
    want.sort_unstable();
    want.dedup();
    listed.iter().find(|c| {
        let list = if core { &c.core } else { &c.memory };
        let mut have: Vec<&str> = list.iter().map(String::as_str).collect();
        have.sort_unstable();
        have.dedup();
        have == want
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_holder_is_found_by_set_equality() {
        let listed = vec![
            ListedContainer {
                namespace: "a".into(),
                pod: "p".into(),
                container: "c".into(),
                core: vec!["vcore-0-1".into(), "vcore-0-0".into()],
                memory: vec![],
            },
            ListedContainer {
                namespace: "a".into(),
                pod: "q".into(),
                container: "d".into(),
                core: vec!["vcore-0-2".into()],
                memory: vec!["vmem-0-0".into()],
            },
        ];
        let ids = vec!["vcore-0-0".to_string(), "vcore-0-1".to_string()];
        assert_eq!(holder(&listed, true, &ids).unwrap().pod, "p");
        assert_eq!(
            holder(&listed, false, &["vmem-0-0".to_string()])
                .unwrap()
                .pod,
            "q"
        );
        assert!(holder(&listed, true, &["vcore-0-0".to_string()]).is_none());
    }
}
