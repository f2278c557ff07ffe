//! Where the daemon learns about the pods bound to its node.
//!
//! The kubelet never says which pod an `Allocate` serves, so the daemon matches requests to
//! the pending pods of its node. [`PodSource`] is that view: in production a watch on the API
//! server ([`kube::KubePods`], field selector `spec.nodeName=<node>`), in tests and in
//! `--standalone` mode an in-memory store ([`InMemoryPods`]) or nothing at all.
//!
//! Pods are converted once, when they change, into the small [`PodInfo`] the daemon needs, so a
//! snapshot is a cheap copy of reference-counted pointers.

pub mod kube;

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use gm_core::annotations::{Keys, PodAnnotations};
use gm_core::quantity;
use gm_core::request::{GpuRequest, PodGpuRequest, Slot};
use gm_core::ResourceNames;
use k8s_openapi::api::core::v1::Pod;

/// Lifecycle phase of a pod (`status.phase`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodPhase {
    Pending,
    Running,
    Succeeded,
    Failed,
    Unknown,
}

impl PodPhase {
    fn parse(s: Option<&str>) -> Self {
        match s {
            Some("Pending") | None => PodPhase::Pending,
            Some("Running") => PodPhase::Running,
            Some("Succeeded") => PodPhase::Succeeded,
            Some("Failed") => PodPhase::Failed,
            Some(_) => PodPhase::Unknown,
        }
    }
}

/// One GPU container of a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerInfo {
    pub slot: Slot,
    pub name: String,
    pub request: GpuRequest,
    /// The raw vcuda-memory count in the spec (whole-card requests ignore it, but the kubelet
    /// still allocates it).
    pub memory_blocks: u64,
}

/// What the daemon needs to know about one pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInfo {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub node_name: Option<String>,
    pub phase: PodPhase,
    /// `metadata.deletionTimestamp` is set.
    pub deleting: bool,
    /// GPU containers in the kubelet's allocation order (init containers, then app containers).
    pub containers: Vec<ContainerInfo>,
    /// Why the pod's GPU request is invalid, if it is (such a pod never matches a request).
    pub request_error: Option<String>,
    /// Our annotations, decoded.
    pub annotations: PodAnnotations,
    /// When the pod was scheduled: the extender's predicate time, else its creation time
    /// (unix nanoseconds); orders pods the way the kubelet admits them.
    pub time: u64,
    /// `status.qosClass` (selects the cgroup path when metrics map processes to containers).
    pub qos_class: Option<String>,
    /// Container name → runtime container ID (`containerd://…`) from the container statuses.
    pub container_ids: BTreeMap<String, String>,
}

impl PodInfo {
    /// Convert an API object. Pods without a name are skipped.
    pub fn from_pod(pod: &Pod, names: &ResourceNames, keys: &Keys) -> Option<Self> {
        let meta = &pod.metadata;
        let name = meta.name.clone()?;
        let namespace = meta.namespace.clone().unwrap_or_else(|| "default".into());
        let (annotations, _errors) = match &meta.annotations {
            Some(a) => PodAnnotations::decode(keys, a),
            None => Default::default(),
        };
        let created = meta
            .creation_timestamp
            .as_ref()
            .map(|t| t.0.as_nanosecond())
            .and_then(|ns| u64::try_from(ns).ok())
            .unwrap_or(0);
        let (containers, request_error) = match pod.spec.as_ref() {
            None => (Vec::new(), None),
            Some(spec) => match PodGpuRequest::from_pod_spec(spec, names) {
                Ok(req) => {
                    let raw_blocks = |slot: Slot| {
                        let c = match slot {
                            Slot::Init(i) => spec.init_containers.as_ref().and_then(|v| v.get(i)),
                            Slot::App(i) => spec.containers.get(i),
                        };
                        c.and_then(|c| c.resources.as_ref())
                            .and_then(|r| r.limits.as_ref().or(r.requests.as_ref()))
                            .and_then(|m| m.get(names.memory()))
                            .and_then(|q| quantity::parse_count(&q.0).ok())
                            .unwrap_or(0)
                    };
                    let containers = req
                        .containers
                        .iter()
                        .map(|c| ContainerInfo {
                            slot: c.slot,
                            name: c.name.clone(),
                            request: c.request,
                            memory_blocks: raw_blocks(c.slot),
                        })
                        .collect();
                    (containers, None)
                }
                Err(e) => (Vec::new(), Some(e.to_string())),
            },
        };
        let status = pod.status.as_ref();
        let container_ids = status
            .into_iter()
            .flat_map(|s| {
                s.init_container_statuses
                    .iter()
                    .flatten()
                    .chain(s.container_statuses.iter().flatten())
            })
            .filter_map(|cs| Some((cs.name.clone(), cs.container_id.clone()?)))
            .collect();
        Some(Self {
            namespace,
            name,
            uid: meta.uid.clone().unwrap_or_default(),
            node_name: pod.spec.as_ref().and_then(|s| s.node_name.clone()),
            phase: PodPhase::parse(status.and_then(|s| s.phase.as_deref())),
            deleting: meta.deletion_timestamp.is_some(),
            time: annotations.time.unwrap_or(created),
            annotations,
            containers,
            request_error,
            qos_class: status.and_then(|s| s.qos_class.clone()),
            container_ids,
        })
    }

    /// The pod has ended: its containers no longer hold devices.
    pub fn has_ended(&self) -> bool {
        matches!(self.phase, PodPhase::Succeeded | PodPhase::Failed)
    }

    /// The kubelet may still be admitting this pod: pending, not being deleted, and not yet
    /// confirmed by a device plugin (`gpu-assigned` is not `true`).
    pub fn awaits_admission(&self) -> bool {
        self.phase == PodPhase::Pending && !self.deleting && self.annotations.assigned != Some(true)
    }

    /// The GPU container called `name`.
    pub fn container(&self, name: &str) -> Option<&ContainerInfo> {
        self.containers.iter().find(|c| c.name == name)
    }

    /// The GPU container in `slot`.
    pub fn container_in(&self, slot: Slot) -> Option<&ContainerInfo> {
        self.containers.iter().find(|c| c.slot == slot)
    }

    /// Cards the scheduler assigned to `slot` (`predicate-gpu-idx-*`).
    pub fn assigned_cards(&self, slot: Slot) -> Option<&[u32]> {
        self.annotations.cards.get(&slot).map(Vec::as_slice)
    }

    /// `namespace/name`
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// The pods bound to this node, as far as the daemon knows.
pub trait PodSource: Send + Sync + std::fmt::Debug + 'static {
    /// Every known pod of the node (a cheap copy).
    fn snapshot(&self) -> Vec<Arc<PodInfo>>;
    /// One pod by namespace and name.
    fn get(&self, namespace: &str, name: &str) -> Option<Arc<PodInfo>>;
    /// True once the source holds a complete list (after the first full list from the API
    /// server). Before that, a missing pod proves nothing.
    fn synced(&self) -> bool;
    /// Read the node's pods from the source of truth now, when the kubelet asks about a pod
    /// the watch has not delivered yet (the kubelet's own watch can be a few milliseconds
    /// ahead). Returns true when the store was refreshed. Sources without a server: no-op.
    fn refresh(&self) -> futures::future::BoxFuture<'_, bool> {
        Box::pin(async { false })
    }
}

type PodMap = BTreeMap<(String, String), Arc<PodInfo>>;

/// A pod source that holds what it is given: for tests, and for embedding the daemon.
#[derive(Debug, Default)]
pub struct InMemoryPods {
    pods: RwLock<PodMap>,
}

impl InMemoryPods {
    pub fn new() -> Self {
        Self::default()
    }

    /// Add or replace a pod.
    pub fn insert(&self, pod: PodInfo) {
        let mut map = self.pods.write().unwrap_or_else(|p| p.into_inner());
        map.insert((pod.namespace.clone(), pod.name.clone()), Arc::new(pod));
    }

    /// Remove a pod (it was deleted).
    pub fn remove(&self, namespace: &str, name: &str) {
        let mut map = self.pods.write().unwrap_or_else(|p| p.into_inner());
        map.remove(&(namespace.to_string(), name.to_string()));
    }
}

impl PodSource for InMemoryPods {
    fn snapshot(&self) -> Vec<Arc<PodInfo>> {
        let map = self.pods.read().unwrap_or_else(|p| p.into_inner());
        map.values().cloned().collect()
    }

    fn get(&self, namespace: &str, name: &str) -> Option<Arc<PodInfo>> {
        let map = self.pods.read().unwrap_or_else(|p| p.into_inner());
        map.get(&(namespace.to_string(), name.to_string())).cloned()
    }

    fn synced(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(json: serde_json::Value) -> Pod {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn a_pod_converts_with_requests_annotations_and_scheduling_time() {
        let names = ResourceNames::default();
        let keys = Keys::default();
        let p = pod(serde_json::json!({
            "metadata": {
                "name": "train", "namespace": "ml", "uid": "u-1",
                "creationTimestamp": "2024-01-01T00:00:00Z",
                "annotations": {
                    "tencent.com/predicate-gpu-idx-1": "3",
                    "tencent.com/predicate-time": "42",
                    "tencent.com/gpu-assigned": "false"
                }
            },
            "spec": {
                "nodeName": "n1",
                "containers": [
                    {"name": "sidecar"},
                    {"name": "main", "resources": {"limits": {
                        "tencent.com/vcuda-core": "30", "tencent.com/vcuda-memory": "8"}}},
                    {"name": "whole", "resources": {"limits": {
                        "tencent.com/vcuda-core": "100", "tencent.com/vcuda-memory": "4"}}}
                ]
            },
            "status": {"phase": "Pending"}
        }));
        let info = PodInfo::from_pod(&p, &names, &keys).unwrap();
        assert_eq!(info.key(), "ml/train");
        assert_eq!(info.time, 42);
        assert!(info.awaits_admission());
        assert_eq!(info.containers.len(), 2);
        let main = info.container("main").unwrap();
        assert_eq!(main.slot, Slot::App(1));
        assert_eq!(
            main.request,
            GpuRequest::Share {
                cores: 30,
                blocks: 8
            }
        );
        assert_eq!(info.assigned_cards(Slot::App(1)), Some(&[3u32][..]));
        let whole = info.container("whole").unwrap();
        assert_eq!(whole.request, GpuRequest::Whole { cards: 1 });
        assert_eq!(whole.memory_blocks, 4);
    }

    #[test]
    fn an_invalid_request_is_kept_as_a_reason_and_never_matches() {
        let p = pod(serde_json::json!({
            "metadata": {"name": "bad", "namespace": "d"},
            "spec": {"containers": [{"name": "c", "resources": {"limits": {
                "tencent.com/vcuda-core": "150"}}}]}
        }));
        let info = PodInfo::from_pod(&p, &ResourceNames::default(), &Keys::default()).unwrap();
        assert!(info.containers.is_empty());
        assert!(info.request_error.unwrap().contains("150"));
    }

    #[test]
    fn ended_and_assigned_pods_do_not_await_admission() {
        let mk = |phase: &str, assigned: &str| {
            let p = pod(serde_json::json!({
                "metadata": {"name": "x", "annotations": {"tencent.com/gpu-assigned": assigned}},
                "spec": {"containers": []},
                "status": {"phase": phase}
            }));
            PodInfo::from_pod(&p, &ResourceNames::default(), &Keys::default()).unwrap()
        };
        assert!(!mk("Pending", "true").awaits_admission());
        assert!(!mk("Running", "false").awaits_admission());
        assert!(mk("Succeeded", "false").has_ended());
        assert!(mk("Pending", "false").awaits_admission());
    }
}
