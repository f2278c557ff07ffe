//! One scrape's worth of data: the backend's usage sample, its PIDs mapped to containers once,
//! joined with the daemon's snapshot. Both `/metrics` and `/usage` render a [`NodeReport`].

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use gm_backend::{CardUsage, GpuBackend, ProcessSample};
use gm_core::resources::CORES_PER_CARD;
use serde::Serialize;

use crate::cgroup::{
    strip_runtime_prefix, CgroupLayout, ContainerIdentity, PidLookup, PidResolver,
};
use crate::snapshot::NodeSnapshot;

/// What the GPU backend said at one instant, with every process's container looked up.
#[derive(Debug, Clone)]
pub struct UsageSample {
    /// Processes using the cards, or why the backend could not list them.
    pub processes: Result<Vec<ProcessSample>, String>,
    /// Card utilisation and memory, or why the backend could not say.
    pub card_usage: Result<Vec<CardUsage>, String>,
    /// The container of every PID in `processes`.
    pub lookups: BTreeMap<u32, PidLookup>,
    /// The cgroup layout used for lookups, or why there is none.
    pub cgroup: Result<CgroupLayout, String>,
    /// How long sampling and mapping took.
    pub duration: Duration,
}

impl UsageSample {
    /// Ask the backend once and map every PID once. Blocking: run it on a blocking thread.
    pub fn take(backend: &dyn GpuBackend, resolver: &PidResolver) -> Self {
        let start = Instant::now();
        let processes = backend.processes().map_err(|e| e.to_string());
        let card_usage = backend.card_usage().map_err(|e| e.to_string());
        let lookups = match &processes {
            Ok(list) => resolver.resolve(list.iter().map(|p| p.pid)),
            Err(_) => BTreeMap::new(),
        };
        Self {
            processes,
            card_usage,
            lookups,
            cgroup: resolver.layout().cloned().map_err(str::to_string),
            duration: start.elapsed(),
        }
    }

    /// A sample that could not be taken (e.g. the backend did not answer in time).
    pub fn unavailable(reason: String) -> Self {
        Self {
            processes: Err(reason.clone()),
            card_usage: Err(reason.clone()),
            lookups: BTreeMap::new(),
            cgroup: Err(reason),
            duration: Duration::ZERO,
        }
    }
}

/// Label value of a card: `gpu<index>`.
pub fn card_label(index: u32) -> String {
    format!("gpu{index}")
}

/// Everything `/metrics` and `/usage` show.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeReport {
    pub node: String,
    pub backend: BackendStatus,
    /// Whether the cgroup tree fallback is usable, and its layout.
    pub cgroup: CgroupStatus,
    /// Both device plugins registered with the kubelet.
    pub registered: bool,
    pub registrations: Vec<Registration>,
    pub cards: Vec<CardReport>,
    /// Sorted by namespace, pod and container name.
    pub containers: Vec<ContainerReport>,
    /// Processes on the cards that belong to no container holding an allocation.
    pub unmapped_processes: Vec<UnmappedProcess>,
}

/// Did the backend answer this time?
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BackendStatus {
    /// Both the process list and the card usage were read.
    pub up: bool,
    /// What failed, when something did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Seconds spent sampling and mapping PIDs.
    pub sample_seconds: f64,
}

/// The cgroup layout used for the tree fallback.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CgroupStatus {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub driver: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Registrations with the kubelet for one resource.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Registration {
    pub resource: String,
    pub count: u64,
}

/// XID errors of one code on one card.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct XidCount {
    pub code: u64,
    pub count: u64,
}

/// One card: inventory, allocations, usage and errors.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CardReport {
    pub index: u32,
    /// `gpu<index>`.
    pub gpu: String,
    pub uuid: String,
    pub model: String,
    pub minor: u32,
    pub pci_bus_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub numa_node: Option<u32>,
    pub healthy: bool,
    pub memory_mib: u64,
    pub cores_capacity: u32,
    pub cores_allocated: u64,
    pub memory_allocated_mib: u64,
    /// Card SM utilisation, percent; `None` when the backend did not say.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub utilization_percent: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_used_mib: Option<u64>,
    /// Processes on the card; `None` when the backend did not list them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub processes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unmapped_processes: Option<u64>,
    pub xid_errors: Vec<XidCount>,
}

/// Measured use of one card (or of all cards) by one container.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Usage {
    /// Sum of the SM percentages of the container's processes (may exceed 100 for a total
    /// over several cards).
    pub utilization_percent: u64,
    /// Sum of the GPU memory of the container's processes, MiB.
    pub memory_used_mib: u64,
    /// The container's processes seen on the card(s).
    pub pids: Vec<u32>,
}

impl Usage {
    fn add(&mut self, p: &ProcessSample) {
        self.utilization_percent += u64::from(p.sm_percent);
        self.memory_used_mib += p.used_memory_mib;
        if !self.pids.contains(&p.pid) {
            self.pids.push(p.pid);
            self.pids.sort_unstable();
        }
    }
}

/// One container's part of one card.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerCard {
    pub card: u32,
    /// `gpu<index>`.
    pub gpu: String,
    /// vcuda-core held on the card (0 for a card the container uses without holding it).
    pub cores: u32,
    /// Memory held on the card, MiB.
    pub memory_mib: u64,
    /// `None` when the backend did not list processes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

/// One container holding an allocation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerReport {
    pub namespace: String,
    pub pod_name: String,
    pub pod_uid: String,
    pub container_name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qos_class: Option<String>,
    pub request_cores: u32,
    pub request_memory_mib: u64,
    pub cards: Vec<ContainerCard>,
    /// Over all cards; `None` when the backend did not list processes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

/// A process on a card that no allocated container owns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UnmappedProcess {
    /// `gpu<index>`, or empty when the card is not in the inventory.
    pub gpu: String,
    pub uuid: String,
    pub pid: u32,
    pub used_memory_mib: u64,
    pub sm_percent: u32,
    /// Why it could not be attributed.
    pub reason: String,
}

/// Finds the allocation a container identity belongs to.
struct AllocationIndex<'a> {
    by_container: HashMap<String, usize>,
    by_pod: HashMap<&'a str, Vec<usize>>,
    snapshot: &'a NodeSnapshot,
}

impl<'a> AllocationIndex<'a> {
    fn new(snapshot: &'a NodeSnapshot) -> Self {
        let mut by_container = HashMap::new();
        let mut by_pod: HashMap<&str, Vec<usize>> = HashMap::new();
        for (i, a) in snapshot.allocations.iter().enumerate() {
            if let Some(id) = a.container_id.as_deref().filter(|s| !s.is_empty()) {
                by_container.insert(strip_runtime_prefix(id), i);
            }
            if !a.pod_uid.is_empty() {
                by_pod.entry(a.pod_uid.as_str()).or_default().push(i);
            }
        }
        Self {
            by_container,
            by_pod,
            snapshot,
        }
    }

    /// The container ID decides; without it, the pod decides when it has exactly one
    /// allocation without a container ID, or exactly one allocation at all (a restarted
    /// container whose new ID the daemon has not learnt yet).
    fn find(&self, id: &ContainerIdentity) -> Result<usize, String> {
        if let Some(i) = self.by_container.get(&id.container_id) {
            return Ok(*i);
        }
        let Some(pod) = self.by_pod.get(id.pod_uid.as_str()) else {
            return Err(format!(
                "container {} of pod {} holds no GPU allocation known to gpu-manager",
                short(&id.container_id),
                id.pod_uid
            ));
        };
        let unknown: Vec<usize> = pod
            .iter()
            .copied()
            .filter(|i| self.snapshot.allocations[*i].container_id.is_none())
            .collect();
        match (unknown.as_slice(), pod.as_slice()) {
            ([one], _) | (_, [one]) => Ok(*one),
            _ => Err(format!(
                "pod {} has several GPU containers and none is known by container ID {}",
                id.pod_uid,
                short(&id.container_id)
            )),
        }
    }
}

fn short(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

/// Who one listed process belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attribution<'a> {
    pub process: &'a ProcessSample,
    /// The process's card index, when its card is in the inventory.
    pub card: Option<u32>,
    /// `(index into snapshot.allocations, card index)`, or why no allocation owns the process.
    pub owner: Result<(usize, u32), String>,
}

/// Join a sample's processes with the snapshot's allocations (through the container each PID
/// was mapped to), in the sample's order. `None` when the backend did not list processes.
/// Everything that attributes GPU processes to containers uses this one join: the metrics,
/// `/usage`, and the daemon's `hostpids` files for the in-container limiter.
pub fn attribute<'a>(
    snapshot: &NodeSnapshot,
    sample: &'a UsageSample,
) -> Option<Vec<Attribution<'a>>> {
    let list = sample.processes.as_ref().ok()?;
    let index_of: HashMap<&str, u32> = snapshot
        .inventory
        .cards
        .iter()
        .map(|c| (c.uuid.as_str(), c.index))
        .collect();
    let allocations = AllocationIndex::new(snapshot);
    Some(
        list.iter()
            .map(|p| {
                let card = index_of.get(p.uuid.as_str()).copied();
                let owner = match (card, sample.lookups.get(&p.pid)) {
                    (None, _) => Err(format!("card {} is not in the inventory", p.uuid)),
                    (Some(c), Some(PidLookup::Found { identity, .. })) => {
                        allocations.find(identity).map(|a| (a, c))
                    }
                    (Some(_), Some(PidLookup::NotFound { reason })) => Err(reason.clone()),
                    (Some(_), None) => Err("the PID was not looked up".to_string()),
                };
                Attribution {
                    process: p,
                    card,
                    owner,
                }
            })
            .collect(),
    )
}

/// The host PIDs each allocation owns, per card: element `i` belongs to
/// `snapshot.allocations[i]` and maps a card index to its PIDs there (ascending, distinct;
/// cards without a process of the container are absent). `None` when the backend did not list
/// processes: the PIDs are then unknown, which is not the same as none.
pub fn host_pids(
    snapshot: &NodeSnapshot,
    sample: &UsageSample,
) -> Option<Vec<BTreeMap<u32, Vec<u32>>>> {
    let mut out = vec![BTreeMap::<u32, Vec<u32>>::new(); snapshot.allocations.len()];
    for a in attribute(snapshot, sample)? {
        if let Ok((i, card)) = a.owner {
            out[i].entry(card).or_default().push(a.process.pid);
        }
    }
    for pids in out.iter_mut().flat_map(|m| m.values_mut()) {
        pids.sort_unstable();
        pids.dedup();
    }
    Some(out)
}

impl NodeReport {
    /// Join the daemon's snapshot with a usage sample.
    pub fn build(snapshot: &NodeSnapshot, sample: &UsageSample) -> Self {
        let inv = &snapshot.inventory;
        // Per (allocation, card) usage, and per-card process counts.
        let mut used: HashMap<(usize, u32), Usage> = HashMap::new();
        let mut procs_on: HashMap<u32, (u64, u64)> = HashMap::new();
        let mut unmapped = Vec::new();
        for a in attribute(snapshot, sample).unwrap_or_default() {
            let p = a.process;
            if let Some(c) = a.card {
                procs_on.entry(c).or_default().0 += 1;
            }
            match a.owner {
                Ok(owner) => used.entry(owner).or_default().add(p),
                Err(reason) => {
                    if let Some(c) = a.card {
                        procs_on.entry(c).or_default().1 += 1;
                    }
                    unmapped.push(UnmappedProcess {
                        gpu: a.card.map(card_label).unwrap_or_default(),
                        uuid: p.uuid.clone(),
                        pid: p.pid,
                        used_memory_mib: p.used_memory_mib,
                        sm_percent: p.sm_percent,
                        reason,
                    });
                }
            }
        }
        let processes_listed = sample.processes.is_ok();

        let mut containers: Vec<ContainerReport> = snapshot
            .allocations
            .iter()
            .enumerate()
            .map(|(i, a)| {
                let mut cards: Vec<ContainerCard> = a
                    .cards
                    .iter()
                    .map(|c| ContainerCard {
                        card: c.card,
                        gpu: card_label(c.card),
                        cores: c.cores,
                        memory_mib: c.memory_mib,
                        usage: None,
                    })
                    .collect();
                // Cards the container uses without holding them (should not happen; shown
                // rather than hidden).
                for &(ai, c) in used.keys() {
                    if ai == i && !cards.iter().any(|x| x.card == c) {
                        cards.push(ContainerCard {
                            card: c,
                            gpu: card_label(c),
                            cores: 0,
                            memory_mib: 0,
                            usage: None,
                        });
                    }
                }
                cards.sort_by_key(|c| c.card);
                let mut total = processes_listed.then(Usage::default);
                for c in &mut cards {
                    if processes_listed {
                        let u = used.get(&(i, c.card)).cloned().unwrap_or_default();
                        if let Some(t) = total.as_mut() {
                            t.utilization_percent += u.utilization_percent;
                            t.memory_used_mib += u.memory_used_mib;
                            t.pids.extend(&u.pids);
                        }
                        c.usage = Some(u);
                    }
                }
                if let Some(t) = total.as_mut() {
                    t.pids.sort_unstable();
                    t.pids.dedup();
                }
                ContainerReport {
                    namespace: a.namespace.clone(),
                    pod_name: a.pod_name.clone(),
                    pod_uid: a.pod_uid.clone(),
                    container_name: a.container_name.clone(),
                    container_id: a.container_id.clone(),
                    qos_class: a.qos_class.clone(),
                    request_cores: a.request_cores,
                    request_memory_mib: a.request_memory_mib,
                    cards,
                    usage: total,
                }
            })
            .collect();
        containers.sort_by(|a, b| {
            (&a.namespace, &a.pod_name, &a.container_name).cmp(&(
                &b.namespace,
                &b.pod_name,
                &b.container_name,
            ))
        });

        let mut allocated: HashMap<u32, (u64, u64)> = HashMap::new();
        for a in &snapshot.allocations {
            for c in &a.cards {
                let e = allocated.entry(c.card).or_default();
                e.0 += u64::from(c.cores);
                e.1 += c.memory_mib;
            }
        }
        let card_usage: HashMap<&str, &CardUsage> = match &sample.card_usage {
            Ok(list) => list.iter().map(|u| (u.uuid.as_str(), u)).collect(),
            Err(_) => HashMap::new(),
        };
        let cards = inv
            .cards
            .iter()
            .map(|c| {
                let (cores_allocated, memory_allocated_mib) =
                    allocated.get(&c.index).copied().unwrap_or_default();
                let u = card_usage.get(c.uuid.as_str());
                let (procs, unm) = procs_on.get(&c.index).copied().unwrap_or_default();
                let mut xid_errors: Vec<XidCount> = snapshot
                    .xid_errors
                    .iter()
                    .filter(|(card, _, _)| *card == c.index)
                    .map(|&(_, code, count)| XidCount { code, count })
                    .collect();
                xid_errors.sort_by_key(|x| x.code);
                CardReport {
                    index: c.index,
                    gpu: card_label(c.index),
                    uuid: c.uuid.clone(),
                    model: c.model.clone(),
                    minor: c.minor,
                    pci_bus_id: c.pci_bus_id.clone(),
                    numa_node: c.numa_node,
                    healthy: c.healthy,
                    memory_mib: c.memory_mib,
                    cores_capacity: CORES_PER_CARD,
                    cores_allocated,
                    memory_allocated_mib,
                    utilization_percent: u.map(|u| u.sm_percent),
                    memory_used_mib: u.map(|u| u.memory_used_mib),
                    processes: processes_listed.then_some(procs),
                    unmapped_processes: processes_listed.then_some(unm),
                    xid_errors,
                }
            })
            .collect();

        let error = match (&sample.processes, &sample.card_usage) {
            (Ok(_), Ok(_)) => None,
            (Err(e), Ok(_)) => Some(format!("listing GPU processes failed: {e}")),
            (Ok(_), Err(e)) => Some(format!("reading card usage failed: {e}")),
            (Err(a), Err(b)) if a == b => Some(a.clone()),
            (Err(a), Err(b)) => Some(format!(
                "listing GPU processes failed: {a}; reading card usage failed: {b}"
            )),
        };
        let cgroup = match &sample.cgroup {
            Ok(l) => CgroupStatus {
                version: Some(l.version.to_string()),
                driver: Some(l.driver.to_string()),
                error: None,
            },
            Err(e) => CgroupStatus {
                version: None,
                driver: None,
                error: Some(e.clone()),
            },
        };
        Self {
            node: snapshot.node.clone(),
            backend: BackendStatus {
                up: error.is_none(),
                error,
                sample_seconds: sample.duration.as_secs_f64(),
            },
            cgroup,
            registered: snapshot.registered,
            registrations: snapshot
                .registrations
                .iter()
                .map(|(resource, count)| Registration {
                    resource: resource.clone(),
                    count: *count,
                })
                .collect(),
            cards,
            containers,
            unmapped_processes: unmapped,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use gm_core::{Link, NodeInventory};

    use super::*;
    use crate::cgroup::{ContainerIdentity, LookupSource, QosClass};
    use crate::snapshot::{CardAllocation, ContainerAllocation};

    fn alloc(pod_uid: &str, name: &str, id: Option<&str>, card: u32) -> ContainerAllocation {
        ContainerAllocation {
            record_id: String::new(),
            namespace: "ns".into(),
            pod_name: format!("pod-{pod_uid}"),
            pod_uid: pod_uid.into(),
            container_name: name.into(),
            container_id: id.map(|i| format!("containerd://{i}")),
            qos_class: None,
            cards: vec![CardAllocation {
                card,
                cores: 10,
                memory_mib: 256,
            }],
            request_cores: 10,
            request_memory_mib: 256,
        }
    }

    fn snapshot(allocations: Vec<ContainerAllocation>) -> NodeSnapshot {
        NodeSnapshot {
            node: "n".into(),
            inventory: NodeInventory::uniform(2, "Tesla T4", 15360, Link::Pix),
            xid_errors: vec![],
            allocations,
            registrations: vec![],
            registered: true,
            unregistered: Vec::new(),
        }
    }

    /// One process per (pid, card, container identity).
    fn sample(inv: &NodeInventory, procs: &[(u32, u32, &str, &str)]) -> UsageSample {
        let mut lookups = BTreeMap::new();
        let processes = procs
            .iter()
            .map(|&(pid, card, pod, cid)| {
                lookups.insert(
                    pid,
                    PidLookup::Found {
                        identity: ContainerIdentity {
                            pod_uid: pod.into(),
                            container_id: cid.into(),
                            qos: QosClass::Guaranteed,
                        },
                        source: LookupSource::Proc,
                    },
                );
                ProcessSample {
                    uuid: inv.cards[card as usize].uuid.clone(),
                    pid,
                    used_memory_mib: 100,
                    sm_percent: 10,
                }
            })
            .collect();
        UsageSample {
            processes: Ok(processes),
            card_usage: Ok(vec![]),
            lookups,
            cgroup: Err("not needed".into()),
            duration: Duration::ZERO,
        }
    }

    fn used_by<'a>(r: &'a NodeReport, container: &str) -> Option<&'a Usage> {
        r.containers
            .iter()
            .find(|c| c.container_name == container)
            .and_then(|c| c.usage.as_ref())
    }

    #[test]
    fn a_pod_with_several_gpu_containers_and_no_known_ids_leaves_the_pid_unmapped() {
        let snap = snapshot(vec![alloc("p1", "a", None, 0), alloc("p1", "b", None, 0)]);
        let r = NodeReport::build(&snap, &sample(&snap.inventory, &[(7, 0, "p1", "c0ffee")]));
        assert_eq!(r.unmapped_processes.len(), 1);
        assert!(
            r.unmapped_processes[0]
                .reason
                .contains("several GPU containers"),
            "{}",
            r.unmapped_processes[0].reason
        );
        assert_eq!(r.cards[0].unmapped_processes, Some(1));
        assert_eq!(used_by(&r, "a").map(|u| u.memory_used_mib), Some(0));
    }

    #[test]
    fn a_restarted_container_with_a_new_id_still_maps_to_the_pods_only_allocation() {
        let snap = snapshot(vec![alloc("p1", "a", Some("0a0a0a"), 1)]);
        let r = NodeReport::build(&snap, &sample(&snap.inventory, &[(7, 1, "p1", "0b0b0b")]));
        assert!(
            r.unmapped_processes.is_empty(),
            "{:?}",
            r.unmapped_processes
        );
        assert_eq!(used_by(&r, "a").map(|u| u.pids.clone()), Some(vec![7]));
    }

    #[test]
    fn the_container_id_decides_between_containers_of_one_pod() {
        let snap = snapshot(vec![
            alloc("p1", "a", Some("0a0a0a"), 0),
            alloc("p1", "b", Some("0b0b0b"), 0),
        ]);
        let s = sample(
            &snap.inventory,
            &[
                (7, 0, "p1", "0b0b0b"),
                (8, 0, "p1", "0b0b0b"),
                (9, 0, "p1", "0a0a0a"),
            ],
        );
        let r = NodeReport::build(&snap, &s);
        assert_eq!(used_by(&r, "b").map(|u| u.pids.clone()), Some(vec![7, 8]));
        assert_eq!(used_by(&r, "b").map(|u| u.utilization_percent), Some(20));
        assert_eq!(used_by(&r, "a").map(|u| u.pids.clone()), Some(vec![9]));
    }

    #[test]
    fn a_process_on_a_card_the_container_does_not_hold_is_shown_on_that_card() {
        let snap = snapshot(vec![alloc("p1", "a", Some("0a0a0a"), 0)]);
        let r = NodeReport::build(&snap, &sample(&snap.inventory, &[(7, 1, "p1", "0a0a0a")]));
        let c = &r.containers[0];
        let cards: Vec<(&str, u32)> = c.cards.iter().map(|x| (x.gpu.as_str(), x.cores)).collect();
        assert_eq!(cards, [("gpu0", 10), ("gpu1", 0)]);
        assert_eq!(
            c.cards[1].usage.as_ref().map(|u| u.memory_used_mib),
            Some(100)
        );
    }

    #[test]
    fn host_pids_are_per_allocation_and_card_and_unknown_when_processes_are_not_listed() {
        let snap = snapshot(vec![
            alloc("p1", "a", Some("0a0a0a"), 0),
            alloc("p2", "b", Some("0b0b0b"), 1),
        ]);
        let s = sample(
            &snap.inventory,
            &[
                (9, 0, "p1", "0a0a0a"),
                (7, 0, "p1", "0a0a0a"),
                (8, 1, "p2", "0b0b0b"),
                (5, 1, "p3", "0c0c0c"),
            ],
        );
        let pids = host_pids(&snap, &s).unwrap();
        assert_eq!(pids[0], BTreeMap::from([(0, vec![7, 9])]));
        assert_eq!(pids[1], BTreeMap::from([(1, vec![8])]));
        // The same join as the report: what it attributes, host_pids attributes.
        let r = NodeReport::build(&snap, &s);
        assert_eq!(used_by(&r, "a").map(|u| u.pids.clone()), Some(vec![7, 9]));
        assert_eq!(r.unmapped_processes.len(), 1);
        let failed = UsageSample::unavailable("NVML did not answer".into());
        assert_eq!(host_pids(&snap, &failed), None);
    }

    #[test]
    fn a_process_on_a_card_missing_from_the_inventory_is_unmapped_and_named() {
        let snap = snapshot(vec![alloc("p1", "a", Some("0a0a0a"), 0)]);
        let mut s = sample(&snap.inventory, &[(7, 0, "p1", "0a0a0a")]);
        if let Ok(list) = s.processes.as_mut() {
            list[0].uuid = "GPU-gone".into();
        }
        let r = NodeReport::build(&snap, &s);
        assert_eq!(
            r.unmapped_processes[0].reason,
            "card GPU-gone is not in the inventory"
        );
        assert_eq!(r.unmapped_processes[0].gpu, "");
    }
}
