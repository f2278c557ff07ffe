//! What every part of the running daemon shares: the locked allocation state, the published
//! device lists and inventory, the pod source and the outbound queues.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use gm_backend::GpuBackend;
use gm_core::annotations::Keys;
use gm_core::devices::{DeviceId, DeviceKind};
use gm_core::resources::BLOCK_MIB;
use gm_core::NodeInventory;
use gm_metrics::{CardAllocation, ContainerAllocation, NodeSnapshot, SnapshotSource};
use gm_proto::deviceplugin::v1beta1 as dp;
use tokio::sync::{mpsc, watch};

use crate::cluster::PatchJob;
use crate::config::DaemonConfig;
use crate::library::InstalledLibrary;
use crate::limiter::LimiterWriter;
use crate::podresources::PodResourcesClient;
use crate::pods::{PodInfo, PodSource};
use crate::state::State;

/// How the state was restored at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RestoreOutcome {
    /// The checkpoint was read; `records` restored, `dropped` warnings.
    Restored {
        records: usize,
        dropped: Vec<String>,
    },
    /// No usable checkpoint: the state is rebuilt from pod-resources. `warning` is what was
    /// logged.
    Rebuilt { warning: String },
}

/// Index of a resource in per-resource arrays.
pub fn slot(kind: DeviceKind) -> usize {
    match kind {
        DeviceKind::Core => 0,
        DeviceKind::Memory => 1,
    }
}

/// The full device list of one resource.
pub fn device_list(inv: &NodeInventory, kind: DeviceKind) -> dp::ListAndWatchResponse {
    let mut devices = Vec::new();
    for card in &inv.cards {
        let health = if card.healthy {
            dp::HEALTHY
        } else {
            dp::UNHEALTHY
        };
        let topology = card.numa_node.map(|n| dp::TopologyInfo {
            nodes: vec![dp::NumaNode { id: i64::from(n) }],
        });
        for k in 0..kind.per_card(inv, card.index) {
            devices.push(dp::Device {
                id: DeviceId {
                    kind,
                    card: card.index,
                    k,
                }
                .to_string(),
                health: health.to_string(),
                topology: topology.clone(),
            });
        }
    }
    dp::ListAndWatchResponse { devices }
}

/// The daemon's shared core.
pub struct Shared {
    pub config: DaemonConfig,
    pub keys: Keys,
    pub backend: Arc<dyn GpuBackend>,
    pub pods: Option<Arc<dyn PodSource>>,
    pub podresources: PodResourcesClient,
    pub patches: Option<mpsc::Sender<PatchJob>>,
    /// Writes the limiter config files, in order, off the request path.
    pub limiter: LimiterWriter,
    /// The installed `libvcuda.so`, or why it could not be installed (share containers are
    /// then refused unless their pod opted out of the limiter).
    pub library: Result<InstalledLibrary, String>,
    state: Mutex<State>,
    devices: [watch::Sender<Arc<dp::ListAndWatchResponse>>; 2],
    inventory: watch::Sender<Arc<NodeInventory>>,
    persist: watch::Sender<u64>,
    pub(crate) persisted: watch::Sender<u64>,
    registered: [AtomicBool; 2],
    registrations: [AtomicU64; 2],
    xids: Mutex<BTreeMap<(u32, u64), u64>>,
    pub(crate) restore: Mutex<Option<RestoreOutcome>>,
    /// "Waiting for the kubelet" was logged (once for both plugins).
    pub(crate) waiting_logged: AtomicBool,
    /// Plugin server tasks, aborted when the daemon is killed.
    pub(crate) servers: Mutex<Vec<tokio::task::AbortHandle>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("node", &self.config.node_name)
            .finish_non_exhaustive()
    }
}

impl Shared {
    /// Build the shared core around an initial state.
    pub fn new(
        config: DaemonConfig,
        backend: Arc<dyn GpuBackend>,
        pods: Option<Arc<dyn PodSource>>,
        patches: Option<mpsc::Sender<PatchJob>>,
        limiter: LimiterWriter,
        library: Result<InstalledLibrary, String>,
        state: State,
    ) -> Self {
        let inv = state.inventory().clone();
        let generation = state.generation();
        Self {
            keys: Keys::new(&config.names),
            podresources: PodResourcesClient::new(
                config.pod_resources_socket.clone(),
                config.names.clone(),
            ),
            config,
            backend,
            pods,
            patches,
            limiter,
            library,
            devices: [
                watch::Sender::new(Arc::new(device_list(&inv, DeviceKind::Core))),
                watch::Sender::new(Arc::new(device_list(&inv, DeviceKind::Memory))),
            ],
            inventory: watch::Sender::new(Arc::new(inv)),
            persist: watch::Sender::new(generation),
            persisted: watch::Sender::new(0),
            state: Mutex::new(state),
            registered: [AtomicBool::new(false), AtomicBool::new(false)],
            registrations: [AtomicU64::new(0), AtomicU64::new(0)],
            xids: Mutex::new(BTreeMap::new()),
            restore: Mutex::new(None),
            waiting_logged: AtomicBool::new(false),
            servers: Mutex::new(Vec::new()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Run `f` on the locked state; afterwards ask the checkpoint writer to persist any change.
    /// `f` must not block: no I/O, no waiting.
    pub fn with_state<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        let (out, generation) = {
            let mut st = self.lock();
            let out = f(&mut st);
            (out, st.generation())
        };
        self.persist.send_if_modified(|g| {
            let changed = *g != generation;
            *g = generation;
            changed
        });
        out
    }

    /// Read the locked state.
    pub fn read_state<R>(&self, f: impl FnOnce(&State) -> R) -> R {
        f(&self.lock())
    }

    /// The pods of this node right now (empty without a pod source).
    pub fn pods_snapshot(&self) -> Vec<Arc<PodInfo>> {
        self.pods.as_ref().map(|p| p.snapshot()).unwrap_or_default()
    }

    /// Change a card's health; on a change, publish new device lists and inventory.
    pub fn set_health(&self, card: u32, healthy: bool, reason: &str) -> bool {
        let inv = self.with_state(|st| {
            st.set_health(card, healthy, reason)
                .then(|| st.inventory().clone())
        });
        let Some(inv) = inv else {
            return false;
        };
        for kind in DeviceKind::ALL {
            self.devices[slot(kind)].send_replace(Arc::new(device_list(&inv, kind)));
        }
        self.inventory.send_replace(Arc::new(inv));
        true
    }

    /// Subscribe to a resource's device list.
    pub fn devices(&self, kind: DeviceKind) -> watch::Receiver<Arc<dp::ListAndWatchResponse>> {
        self.devices[slot(kind)].subscribe()
    }

    /// Subscribe to the inventory (with health).
    pub fn inventory(&self) -> watch::Receiver<Arc<NodeInventory>> {
        self.inventory.subscribe()
    }

    /// Subscribe to the generation the state wants persisted.
    pub fn persist_requests(&self) -> watch::Receiver<u64> {
        self.persist.subscribe()
    }

    /// Subscribe to the generation the checkpoint holds.
    pub fn persisted(&self) -> watch::Receiver<u64> {
        self.persisted.subscribe()
    }

    /// Record a (de)registration of a plugin with the kubelet.
    pub fn set_registered(&self, kind: DeviceKind, registered: bool) {
        self.registered[slot(kind)].store(registered, Ordering::SeqCst);
        if registered {
            self.registrations[slot(kind)].fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Is this plugin registered with the kubelet right now?
    pub fn is_registered(&self, kind: DeviceKind) -> bool {
        self.registered[slot(kind)].load(Ordering::SeqCst)
    }

    /// Both plugins registered.
    pub fn ready(&self) -> bool {
        DeviceKind::ALL.iter().all(|k| self.is_registered(*k))
    }

    /// Count an XID seen on a card.
    pub fn count_xid(&self, card: u32, xid: u64) {
        let mut m = self.xids.lock().unwrap_or_else(|p| p.into_inner());
        *m.entry((card, xid)).or_insert(0) += 1;
    }

    /// How the state was restored at start.
    pub fn restore_outcome(&self) -> Option<RestoreOutcome> {
        self.restore
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Queue annotations for a pod (dropped in standalone mode).
    pub fn queue_patch(&self, job: PatchJob) {
        let Some(tx) = &self.patches else {
            return;
        };
        if let Err(e) = tx.try_send(job) {
            tracing::warn!(error = %e, "pod annotation queue is full; dropping an annotation write");
        }
    }
}

impl SnapshotSource for Shared {
    fn snapshot(&self) -> NodeSnapshot {
        // Container IDs and QoS come from the API server's view of the pods (absent standalone).
        let pods: BTreeMap<(String, String), Arc<PodInfo>> = self
            .pods_snapshot()
            .into_iter()
            .map(|p| ((p.namespace.clone(), p.name.clone()), p))
            .collect();
        let (inventory, allocations) = self.read_state(|st| {
            let inv = st.inventory().clone();
            let allocations = st
                .records()
                .values()
                .map(|r| {
                    let pod = r.pod();
                    let cards: Vec<CardAllocation> = r
                        .cards()
                        .into_iter()
                        .map(|c| CardAllocation {
                            card: c,
                            cores: r.cores_on(c),
                            memory_mib: r.memory_bytes_on(c, &inv).unwrap_or(0) / (1024 * 1024),
                        })
                        .collect();
                    let info = pod.and_then(|p| pods.get(&(p.namespace.clone(), p.name.clone())));
                    ContainerAllocation {
                        record_id: r.id.clone(),
                        namespace: pod.map(|p| p.namespace.clone()).unwrap_or_default(),
                        pod_name: pod.map(|p| p.name.clone()).unwrap_or_default(),
                        pod_uid: pod.map(|p| p.uid.clone()).unwrap_or_default(),
                        container_name: pod.map(|p| p.container.clone()).unwrap_or_default(),
                        container_id: pod.and_then(|p| {
                            info.and_then(|i| i.container_ids.get(&p.container).cloned())
                        }),
                        qos_class: info.and_then(|i| i.qos_class.clone()),
                        request_cores: r.cores(),
                        request_memory_mib: r
                            .memory_bytes(&inv)
                            .map(|b| b / (1024 * 1024))
                            .unwrap_or_else(|| u64::from(r.memory.len() as u32) * BLOCK_MIB),
                        cards,
                    }
                })
                .collect();
            (inv, allocations)
        });
        let xid_errors = self
            .xids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(&(card, xid), &n)| (card, xid, n))
            .collect();
        NodeSnapshot {
            node: self.config.node_name.clone(),
            inventory,
            xid_errors,
            allocations,
            registrations: DeviceKind::ALL
                .iter()
                .map(|k| {
                    let name = match k {
                        DeviceKind::Core => self.config.names.core(),
                        DeviceKind::Memory => self.config.names.memory(),
                    };
                    (
                        name.to_string(),
                        self.registrations[slot(*k)].load(Ordering::SeqCst),
                    )
                })
                .collect(),
            registered: self.ready(),
            unregistered: DeviceKind::ALL
                .iter()
                .filter(|k| !self.is_registered(**k))
                .map(|k| match k {
                    DeviceKind::Core => self.config.names.core().to_string(),
                    DeviceKind::Memory => self.config.names.memory().to_string(),
                })
                .collect(),
        }
    }
}
