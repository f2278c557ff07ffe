//! The daemon's state as the metrics server sees it: a consistent, owned snapshot taken
//! without holding the daemon's locks while rendering.

use gm_core::NodeInventory;
use serde::Serialize;

/// One container's share of one card.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CardAllocation {
    /// Card index (position after sorting by PCI bus ID); metrics label `gpu<index>`.
    pub card: u32,
    /// vcuda-core units held on this card (100 for a whole card).
    pub cores: u32,
    /// Memory held on this card in MiB (blocks × 256, or the whole card's memory).
    pub memory_mib: u64,
}

/// One container's allocation, as the daemon knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ContainerAllocation {
    /// The daemon's record of this allocation (it names the container's limiter directories);
    /// empty when the allocation does not come from a record (tests, other embedders).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub record_id: String,
    pub namespace: String,
    pub pod_name: String,
    /// Empty until the pod's UID is known (standalone mode may never learn it).
    pub pod_uid: String,
    pub container_name: String,
    /// Container ID as the runtime reports it (`containerd://…`), when known; helps map PIDs.
    pub container_id: Option<String>,
    /// Pod QoS class (`Guaranteed`, `Burstable`, `BestEffort`), when known; selects the
    /// cgroup path.
    pub qos_class: Option<String>,
    pub cards: Vec<CardAllocation>,
    /// Requested vcuda-core (e.g. 30, or 200 for two whole cards).
    pub request_cores: u32,
    /// Requested GPU memory in MiB (blocks × 256; whole cards: the sum of their memory).
    pub request_memory_mib: u64,
}

/// Everything the metrics server renders, taken at one instant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeSnapshot {
    pub node: String,
    /// Cards with their current health.
    pub inventory: NodeInventory,
    /// XID errors seen since start: (card index, XID code, count).
    pub xid_errors: Vec<(u32, u64, u64)>,
    pub allocations: Vec<ContainerAllocation>,
    /// Successful registrations with the kubelet per resource name since start.
    pub registrations: Vec<(String, u64)>,
    /// True once both device plugins are registered with the kubelet.
    pub registered: bool,
    /// Resources whose device plugin is not registered with the kubelet right now.
    pub unregistered: Vec<String>,
}

/// Implemented by the daemon.
pub trait SnapshotSource: Send + Sync + 'static {
    fn snapshot(&self) -> NodeSnapshot;
}
