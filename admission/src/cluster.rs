//! What the webhook needs to know about the cluster, and an in-memory implementation.
//!
//! The `gpu-admission serve` binary hands the webhook the extender's cluster-state cache as a
//! [`ClusterView`]; tests, benches and tools use [`InMemoryCluster`].

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use gm_core::quota::{ClusterCards, QuotaKeys};
use gm_core::NodeInventory;
use k8s_openapi::api::core::v1::Pod;

/// Node labels.
pub type Labels = BTreeMap<String, String>;

/// Called with a GPU node's name, labels and card inventory.
pub type NodeVisitor<'a> = dyn FnMut(&str, &Labels, &NodeInventory) + 'a;

/// Read access to cluster state: GPU nodes (labels + card inventory) and live GPU pods.
///
/// Implementations must be cheap to call on every admission request: `namespace_gpu_pods`
/// should use a per-namespace index, and `for_each_gpu_node` is only called when
/// `nodes_generation` changed.
pub trait ClusterView: Send + Sync {
    /// True once the caches hold a complete list of nodes and pods. Until then the webhook
    /// denies GPU pods in namespaces that may have a quota, saying it has not synced yet.
    fn synced(&self) -> bool;

    /// A number that changes whenever a GPU node is added or removed, or its labels or
    /// inventory change. The webhook rebuilds its card summary only when it changes.
    fn nodes_generation(&self) -> u64;

    /// Visit every node that publishes a valid GPU inventory: name, labels, inventory.
    fn for_each_gpu_node(&self, visit: &mut NodeVisitor<'_>);

    /// Live pods of `namespace` that ask for vcuda resources: every pod whose phase is not
    /// `Succeeded` or `Failed`, pending ones included (terminating pods still hold their
    /// cards and count too).
    fn namespace_gpu_pods(&self, namespace: &str) -> Vec<Arc<Pod>>;

    /// Whether this replica should write shared state (GpuQuota status). With leader
    /// election, only the leader.
    fn is_leader(&self) -> bool {
        true
    }
}

/// A [`ClusterView`] held in memory: for tests, benches and tools.
#[derive(Debug, Default)]
pub struct InMemoryCluster {
    nodes: RwLock<BTreeMap<String, (Labels, NodeInventory)>>,
    pods: RwLock<BTreeMap<(String, String), Arc<Pod>>>,
    generation: AtomicU64,
    synced: AtomicBool,
}

impl InMemoryCluster {
    /// An empty, synced cluster.
    pub fn new() -> Self {
        let c = Self::default();
        c.synced.store(true, Ordering::SeqCst);
        c
    }

    /// Mark the cluster synced or not.
    pub fn set_synced(&self, synced: bool) {
        self.synced.store(synced, Ordering::SeqCst);
    }

    /// Add or replace a GPU node.
    pub fn upsert_node(
        &self,
        name: &str,
        labels: BTreeMap<String, String>,
        inventory: NodeInventory,
    ) {
        if let Ok(mut n) = self.nodes.write() {
            n.insert(name.to_string(), (labels, inventory));
        }
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    /// Remove a node.
    pub fn remove_node(&self, name: &str) {
        if let Ok(mut n) = self.nodes.write() {
            n.remove(name);
        }
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    /// Add or replace a pod (keyed by namespace and name).
    pub fn upsert_pod(&self, pod: Pod) {
        let key = (
            pod.metadata.namespace.clone().unwrap_or_default(),
            pod.metadata.name.clone().unwrap_or_default(),
        );
        if let Ok(mut p) = self.pods.write() {
            p.insert(key, Arc::new(pod));
        }
    }

    /// Remove a pod.
    pub fn remove_pod(&self, namespace: &str, name: &str) {
        if let Ok(mut p) = self.pods.write() {
            p.remove(&(namespace.to_string(), name.to_string()));
        }
    }
}

impl ClusterView for InMemoryCluster {
    fn synced(&self) -> bool {
        self.synced.load(Ordering::SeqCst)
    }

    fn nodes_generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    fn for_each_gpu_node(&self, visit: &mut NodeVisitor<'_>) {
        if let Ok(nodes) = self.nodes.read() {
            for (name, (labels, inv)) in nodes.iter() {
                visit(name, labels, inv);
            }
        }
    }

    fn namespace_gpu_pods(&self, namespace: &str) -> Vec<Arc<Pod>> {
        let Ok(pods) = self.pods.read() else {
            return Vec::new();
        };
        pods.range((namespace.to_string(), String::new())..)
            .take_while(|((ns, _), _)| ns == namespace)
            .filter(|(_, p)| {
                let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
                !matches!(phase, Some("Succeeded" | "Failed"))
            })
            .map(|(_, p)| p.clone())
            .collect()
    }
}

/// The card summary of a cluster, rebuilt when the node generation changes.
pub(crate) struct CardCache {
    keys: QuotaKeys,
    current: Mutex<Option<(u64, Arc<ClusterCards>)>>,
}

impl CardCache {
    pub(crate) fn new(keys: QuotaKeys) -> Self {
        Self {
            keys,
            current: Mutex::new(None),
        }
    }

    /// The summary for the view's current node generation.
    pub(crate) fn get(&self, view: &dyn ClusterView) -> Arc<ClusterCards> {
        let generation = view.nodes_generation();
        if let Ok(cur) = self.current.lock() {
            if let Some((g, cards)) = cur.as_ref() {
                if *g == generation {
                    return cards.clone();
                }
            }
        }
        let mut cards = ClusterCards::new(self.keys.clone());
        view.for_each_gpu_node(&mut |name, labels, inv| cards.add_node(name, labels, inv));
        let cards = Arc::new(cards);
        if let Ok(mut cur) = self.current.lock() {
            *cur = Some((generation, cards.clone()));
        }
        cards
    }
}
