//! The NVML backend.
//!
//! `libnvidia-ml.so.1` (or the path in [`NvmlConfig::lib_path`]) is loaded when the backend is
//! opened, never at link time: the crate builds and its tests run on machines without a driver,
//! and a node without NVML gets [`BackendError::NvmlUnavailable`] rather than a crash.
//!
//! What comes from where:
//!
//! * cards: NVML device handles by index, then sorted by PCI bus ID (card index = position);
//!   uuid, name (the model), total memory, minor number and PCI bus ID from NVML;
//! * NUMA node: `nvmlDeviceGetNumaNodeId`, falling back to
//!   `<sysfs_root>/bus/pci/devices/<bus id>/numa_node` (negative or unreadable: unknown);
//! * links: NVLink first. Every active link's far end is looked up by PCI bus ID: a card of
//!   this node counts one link to that card; an NVIDIA device that is not one of the cards is
//!   an NVSwitch, and two cards reaching the same switches count
//!   `min(links of a, links of b)` to those switches (how HGX boards show `NV18` between every
//!   pair). Pairs without NVLink get their PCIe level from the common ancestor
//!   (Internal/Single → PIX, Multiple → PXB, HostBridge → PHB, Node → NODE, System → SYS);
//! * health: one NVML event set for XID critical errors and double-bit ECC errors, waited on by
//!   a background thread; lost cards are found by polling every card at the end of each
//!   [`GpuBackend::wait_events`] (and right away when NVML says a GPU is lost);
//! * processes: running compute processes plus the per-process utilisation samples of the
//!   last few seconds.
//!
//! Static facts (cards, links) are discovered once and cached; if a card was lost during
//! discovery it is left out (with a warning) and discovery is retried on the next
//! [`GpuBackend::inventory`] call.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use gm_core::inventory::{Card, Link, NodeInventory};
use nvml_wrapper::bitmasks::event::EventTypes;
use nvml_wrapper::enum_wrappers::device::TopologyLevel;
use nvml_wrapper::enums::device::UsedGpuMemory;
use nvml_wrapper::enums::event::XidError;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::{Device, EventSet, Nvml};
use tracing::{debug, info, warn};

use crate::error::BackendError;
use crate::pci::PciBusId;
use crate::{CardUsage, GpuBackend, HealthEvent, HealthEventKind, ProbeResult, ProcessSample, MIB};

/// What to check when NVML cannot be loaded.
pub const UNAVAILABLE_HINT: &str = "Is the NVIDIA driver installed and loaded (does nvidia-smi \
work on this host)? Is libnvidia-ml.so.1 on the library path, or given with --nvml-lib? In a \
container, the NVIDIA container runtime must mount it.";

/// NVLink slots per device NVML knows about (`NVML_NVLINK_MAX_LINKS`).
pub const NVLINK_MAX_LINKS: u32 = 18;

/// PCI vendor ID of NVIDIA (far ends of NVLinks with this vendor that are not cards are
/// NVSwitches).
pub const NVIDIA_PCI_VENDOR: u16 = 0x10de;

/// How far back per-process utilisation samples are read.
const PROCESS_SAMPLE_WINDOW: Duration = Duration::from_secs(3);

/// How long the event thread waits in one NVML call before checking for shutdown.
const WATCH_SLICE_MS: u32 = 200;

/// Where to find NVML and sysfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NvmlConfig {
    /// The NVML shared library; `None`: `libnvidia-ml.so.1` through the dynamic loader.
    pub lib_path: Option<PathBuf>,
    /// Root of sysfs, for the NUMA fallback (`/sys` on a host).
    pub sysfs_root: PathBuf,
}

impl Default for NvmlConfig {
    fn default() -> Self {
        Self {
            lib_path: None,
            sysfs_root: PathBuf::from("/sys"),
        }
    }
}

/// The PCIe link level for an NVML common-ancestor level.
pub fn link_for_level(level: TopologyLevel) -> Link {
    match level {
        TopologyLevel::Internal | TopologyLevel::Single => Link::Pix,
        TopologyLevel::Multiple => Link::Pxb,
        TopologyLevel::HostBridge => Link::Phb,
        TopologyLevel::Node => Link::Node,
        TopologyLevel::System => Link::Sys,
    }
}

/// The NUMA node of a PCI device according to sysfs (`None` when the file is missing,
/// unreadable or negative).
pub fn sysfs_numa_node(sysfs_root: &Path, bus: PciBusId) -> Option<u32> {
    let path = sysfs_root
        .join("bus/pci/devices")
        .join(bus.to_string())
        .join("numa_node");
    let text = std::fs::read_to_string(&path).ok()?;
    let value: i64 = text.trim().parse().ok()?;
    u32::try_from(value).ok()
}

/// The far end of one active NVLink.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NvLinkEnd {
    /// PCI bus ID of the far end.
    pub remote: PciBusId,
    /// PCI vendor ID of the far end.
    pub vendor: u16,
}

/// NVLink counts between cards (`counts[i][j]`), from each card's active links.
///
/// `buses[i]` is card i's PCI bus ID and `ends[i]` its active links. A link whose far end is a
/// card counts towards that card. Links to NVIDIA devices that are not cards are switch links:
/// two cards that reach a common set of switches count the smaller of their link totals to
/// those switches. Links to anything else (e.g. a CPU) are ignored.
pub fn nvlink_counts(buses: &[PciBusId], ends: &[Vec<NvLinkEnd>]) -> Vec<Vec<u32>> {
    let n = buses.len();
    let position: HashMap<PciBusId, usize> =
        buses.iter().enumerate().map(|(i, b)| (*b, i)).collect();
    let mut direct = vec![vec![0u32; n]; n];
    let mut switch: Vec<BTreeMap<PciBusId, u32>> = vec![BTreeMap::new(); n];
    for (i, links) in ends.iter().enumerate().take(n) {
        for end in links {
            match position.get(&end.remote) {
                Some(&j) if j != i => direct[i][j] += 1,
                Some(_) => {}
                None if end.vendor == NVIDIA_PCI_VENDOR => {
                    *switch[i].entry(end.remote).or_default() += 1;
                }
                None => {}
            }
        }
    }
    let mut counts = vec![vec![0u32; n]; n];
    for i in 0..n {
        for j in (i + 1)..n {
            let d = direct[i][j].max(direct[j][i]);
            let shared: Vec<&PciBusId> = switch[i]
                .keys()
                .filter(|s| switch[j].contains_key(*s))
                .collect();
            let via_i: u32 = shared.iter().map(|s| switch[i][*s]).sum();
            let via_j: u32 = shared.iter().map(|s| switch[j][*s]).sum();
            let total = d + via_i.min(via_j);
            counts[i][j] = total;
            counts[j][i] = total;
        }
    }
    counts
}

/// One discovered card and where NVML has it.
#[derive(Debug, Clone)]
struct Slot {
    nvml_index: u32,
    uuid: String,
}

/// The static part of the inventory.
#[derive(Debug, Clone)]
struct Discovered {
    inventory: NodeInventory,
    /// Card-index order.
    slots: Vec<Slot>,
    /// Every card NVML counts answered.
    complete: bool,
}

/// A card as read from NVML, before sorting.
#[derive(Debug)]
struct Described {
    nvml_index: u32,
    uuid: String,
    model: String,
    memory_mib: u64,
    minor: u32,
    bus: PciBusId,
    numa: Option<u32>,
    nvlinks: Vec<NvLinkEnd>,
}

enum DescribeError {
    Lost,
    Failed(BackendError),
}

#[derive(Debug)]
enum WatchMsg {
    Event(HealthEvent),
    CheckLost,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn call_err(call: &'static str, target: impl Into<String>, source: NvmlError) -> BackendError {
    BackendError::Nvml {
        call,
        target: target.into(),
        source,
    }
}

fn unavailable(lib: &str, e: NvmlError) -> BackendError {
    let cause = match &e {
        NvmlError::LibloadingError(inner) => format!("cannot load {lib}: {inner}"),
        NvmlError::FailedToLoadSymbol(_) | NvmlError::FunctionNotFound => {
            format!("{lib} is not a usable NVML library ({e})")
        }
        other => format!("initialising {lib} failed: {other}"),
    };
    BackendError::NvmlUnavailable {
        cause,
        hint: UNAVAILABLE_HINT.to_string(),
    }
}

fn is_gone(e: &NvmlError) -> bool {
    matches!(e, NvmlError::GpuLost | NvmlError::NotFound)
}

/// The [`GpuBackend`] over NVML.
#[derive(Debug)]
pub struct NvmlBackend {
    nvml: Arc<Nvml>,
    config: NvmlConfig,
    driver_version: String,
    discovered: Mutex<Discovered>,
    /// Cards the lost-card poll found lost (to report each loss once).
    lost: Mutex<HashSet<String>>,
    /// Events from the watcher thread; `None` when no card supports health events.
    events: Option<Mutex<mpsc::Receiver<WatchMsg>>>,
    stop: Arc<AtomicBool>,
}

impl Drop for NvmlBackend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl NvmlBackend {
    /// Load NVML, discover the cards and start watching health events.
    pub fn open(config: NvmlConfig) -> Result<Self, BackendError> {
        let lib_name = config.lib_path.as_ref().map_or_else(
            || "libnvidia-ml.so.1".to_string(),
            |p| p.display().to_string(),
        );
        let mut builder = Nvml::builder();
        if let Some(path) = &config.lib_path {
            builder.lib_path(path.as_os_str());
        }
        let nvml = Arc::new(builder.init().map_err(|e| unavailable(&lib_name, e))?);
        let driver_version = nvml.sys_driver_version().unwrap_or_else(|e| {
            warn!(error = %e, "cannot read the NVIDIA driver version");
            "unknown".to_string()
        });
        let discovered = discover(&nvml, &config.sysfs_root)?;
        info!(
            driver = %driver_version,
            cards = discovered.inventory.len(),
            "NVML opened\n{}",
            discovered.inventory.render_links()
        );
        let stop = Arc::new(AtomicBool::new(false));
        let events = start_watcher(
            Arc::clone(&nvml),
            discovered.slots.clone(),
            Arc::clone(&stop),
        )?
        .map(Mutex::new);
        Ok(Self {
            nvml,
            config,
            driver_version,
            discovered: Mutex::new(discovered),
            lost: Mutex::new(HashSet::new()),
            events,
            stop,
        })
    }

    /// The driver version NVML reports.
    pub fn driver_version(&self) -> &str {
        &self.driver_version
    }

    fn slots(&self) -> Vec<Slot> {
        lock(&self.discovered).slots.clone()
    }

    fn discovered(&self) -> Result<Discovered, BackendError> {
        {
            let d = lock(&self.discovered);
            if d.complete {
                return Ok(d.clone());
            }
        }
        let fresh = discover(&self.nvml, &self.config.sysfs_root)?;
        *lock(&self.discovered) = fresh.clone();
        Ok(fresh)
    }

    /// Is the card present and answering?
    fn check_card(&self, uuid: &str) -> ProbeResult {
        let answer = self
            .nvml
            .device_by_uuid(uuid)
            .and_then(|dev| dev.memory_info().map(|_| ()));
        match answer {
            Ok(()) => ProbeResult::Healthy,
            Err(e) if is_gone(&e) => ProbeResult::Lost,
            Err(e) => ProbeResult::Failing {
                reason: e.to_string(),
            },
        }
    }

    /// Report cards that stopped answering since the last poll.
    fn poll_lost(&self) -> Vec<HealthEvent> {
        let mut out = Vec::new();
        for slot in self.slots() {
            let state = self.check_card(&slot.uuid);
            let mut lost = lock(&self.lost);
            match state {
                ProbeResult::Lost => {
                    if lost.insert(slot.uuid.clone()) {
                        warn!(card = %slot.uuid, "card is lost");
                        out.push(HealthEvent {
                            uuid: slot.uuid,
                            kind: HealthEventKind::Lost,
                        });
                    }
                }
                ProbeResult::Healthy => {
                    lost.remove(&slot.uuid);
                }
                ProbeResult::Failing { reason } => {
                    debug!(card = %slot.uuid, %reason, "card check failed");
                }
            }
        }
        out
    }

    /// A device handle by uuid; `None` when the card is gone.
    fn device(&self, uuid: &str, call: &'static str) -> Result<Option<Device<'_>>, BackendError> {
        match self.nvml.device_by_uuid(uuid) {
            Ok(d) => Ok(Some(d)),
            Err(e) if is_gone(&e) => Ok(None),
            Err(e) => Err(call_err(call, uuid, e)),
        }
    }
}

fn describe(nvml: &Nvml, sysfs_root: &Path, index: u32) -> Result<Described, DescribeError> {
    let target = || format!("the card at NVML index {index}");
    let fail = |call: &'static str| {
        move |e: NvmlError| {
            if matches!(e, NvmlError::GpuLost) {
                DescribeError::Lost
            } else {
                DescribeError::Failed(call_err(call, target(), e))
            }
        }
    };
    let dev = nvml
        .device_by_index(index)
        .map_err(fail("device_by_index"))?;
    let uuid = dev.uuid().map_err(fail("uuid"))?;
    let model = dev.name().map_err(fail("name"))?.trim().to_string();
    let memory_mib = dev.memory_info().map_err(fail("memory_info"))?.total / MIB;
    let minor = dev.minor_number().map_err(fail("minor_number"))?;
    let pci = dev.pci_info().map_err(fail("pci_info"))?;
    let bus: PciBusId = pci.bus_id.parse().map_err(|e| {
        DescribeError::Failed(BackendError::NvmlValue(format!(
            "an unreadable PCI bus ID for card {uuid}: {e}"
        )))
    })?;
    let numa = match dev.numa_node_id() {
        Ok(n) if i32::try_from(n).is_ok() => Some(n),
        Ok(_) => sysfs_numa_node(sysfs_root, bus),
        Err(e) => {
            debug!(card = %uuid, error = %e, "NVML has no NUMA node; reading sysfs");
            sysfs_numa_node(sysfs_root, bus)
        }
    };
    let nvlinks = nvlink_ends(&dev).map_err(fail("nvlink"))?;
    Ok(Described {
        nvml_index: index,
        uuid,
        model,
        memory_mib,
        minor,
        bus,
        numa,
        nvlinks,
    })
}

fn discover(nvml: &Nvml, sysfs_root: &Path) -> Result<Discovered, BackendError> {
    let count = nvml
        .device_count()
        .map_err(|e| call_err("device_count", "the system", e))?;
    let mut found = Vec::new();
    let mut complete = true;
    for index in 0..count {
        match describe(nvml, sysfs_root, index) {
            Ok(d) => found.push(d),
            Err(DescribeError::Lost) => {
                complete = false;
                warn!(
                    nvml_index = index,
                    "card is lost; it is left out of the inventory until it answers"
                );
            }
            Err(DescribeError::Failed(e)) => return Err(e),
        }
    }
    found.sort_by_key(|d| d.bus);
    let buses: Vec<PciBusId> = found.iter().map(|d| d.bus).collect();
    let ends: Vec<Vec<NvLinkEnd>> = found.iter().map(|d| d.nvlinks.clone()).collect();
    let counts = nvlink_counts(&buses, &ends);
    let n = found.len();
    let mut links = vec![vec![Link::SelfLink; n]; n];
    for i in 0..n {
        for j in (i + 1)..n {
            let link = if counts[i][j] > 0 {
                Link::NvLink(u8::try_from(counts[i][j]).unwrap_or(u8::MAX))
            } else {
                let (link, lost) = pcie_level(nvml, &found[i], &found[j]);
                complete &= !lost;
                link
            };
            links[i][j] = link;
            links[j][i] = link;
        }
    }
    let cards = found
        .iter()
        .enumerate()
        .map(|(i, d)| Card {
            index: i as u32,
            uuid: d.uuid.clone(),
            model: d.model.clone(),
            memory_mib: d.memory_mib,
            minor: d.minor,
            numa_node: d.numa,
            pci_bus_id: d.bus.to_string(),
            healthy: true,
        })
        .collect();
    let inventory = NodeInventory::new(cards, links)?;
    Ok(Discovered {
        inventory,
        slots: found
            .iter()
            .map(|d| Slot {
                nvml_index: d.nvml_index,
                uuid: d.uuid.clone(),
            })
            .collect(),
        complete,
    })
}

/// PCIe level between two cards; on failure a guess from their NUMA nodes (and whether a
/// card was lost while asking).
fn pcie_level(nvml: &Nvml, a: &Described, b: &Described) -> (Link, bool) {
    let guess = if a.numa.is_some() && a.numa == b.numa {
        Link::Node
    } else {
        Link::Sys
    };
    let level = nvml.device_by_index(a.nvml_index).and_then(|da| {
        let db = nvml.device_by_index(b.nvml_index)?;
        da.topology_common_ancestor(db)
    });
    match level {
        Ok(level) => (link_for_level(level), false),
        Err(e) => {
            warn!(a = %a.uuid, b = %b.uuid, error = %e, guess = %guess,
                  "NVML cannot tell how these cards are connected; guessing from NUMA");
            (guess, matches!(e, NvmlError::GpuLost))
        }
    }
}

/// Active NVLinks of a device and their far ends.
fn nvlink_ends(dev: &Device<'_>) -> Result<Vec<NvLinkEnd>, NvmlError> {
    let mut ends = Vec::new();
    for link in 0..NVLINK_MAX_LINKS {
        let wrapper = dev.link_wrapper_for(link);
        match wrapper.is_active() {
            Ok(true) => {}
            Ok(false) | Err(NvmlError::NotSupported | NvmlError::InvalidArg) => continue,
            // No NVLink support in this driver or on this card at all.
            Err(NvmlError::FailedToLoadSymbol(_) | NvmlError::FunctionNotFound) => break,
            Err(e) => return Err(e),
        }
        let info = match wrapper.remote_pci_info() {
            Ok(info) => info,
            Err(NvmlError::NotSupported | NvmlError::InvalidArg) => continue,
            Err(e) => return Err(e),
        };
        match info.bus_id.parse::<PciBusId>() {
            Ok(remote) => ends.push(NvLinkEnd {
                remote,
                vendor: (info.pci_device_id & 0xffff) as u16,
            }),
            Err(e) => warn!(link, error = %e, "ignoring an NVLink with an unreadable far end"),
        }
    }
    Ok(ends)
}

/// Start the event thread. `Ok(None)`: no card supports health events.
fn start_watcher(
    nvml: Arc<Nvml>,
    slots: Vec<Slot>,
    stop: Arc<AtomicBool>,
) -> Result<Option<mpsc::Receiver<WatchMsg>>, BackendError> {
    let (tx, rx) = mpsc::channel();
    let (ready_tx, ready_rx) = mpsc::sync_channel::<Result<bool, BackendError>>(1);
    std::thread::Builder::new()
        .name("nvml-events".to_string())
        .spawn(move || {
            let set = match register_events(&nvml, &slots) {
                Ok(set) => set,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let _ = ready_tx.send(Ok(set.is_some()));
            if let Some(set) = set {
                watch(&set, &tx, &stop);
            }
        })
        .map_err(|e| BackendError::WatcherStopped(format!("cannot start the event thread: {e}")))?;
    let watching = ready_rx.recv().map_err(|_| {
        BackendError::WatcherStopped("the event thread ended before registering events".into())
    })??;
    Ok(watching.then_some(rx))
}

/// One event set for every card that supports XID and double-bit ECC events. Cards that do
/// not support them (or are lost) are left out with a warning.
fn register_events<'n>(
    nvml: &'n Nvml,
    slots: &[Slot],
) -> Result<Option<EventSet<'n>>, BackendError> {
    let wanted = EventTypes::CRITICAL_XID_ERROR | EventTypes::DOUBLE_BIT_ECC_ERROR;
    let mut skipped: HashSet<u32> = HashSet::new();
    // A failed registration frees the set, so start over without the card that failed.
    'attempt: loop {
        let mut set = nvml
            .create_event_set()
            .map_err(|e| call_err("create_event_set", "the system", e))?;
        let mut any = false;
        for slot in slots {
            if skipped.contains(&slot.nvml_index) {
                continue;
            }
            let skip = |skipped: &mut HashSet<u32>, why: &dyn std::fmt::Display| {
                warn!(card = %slot.uuid, reason = %why,
                      "no health events from this card; it is only checked by polling");
                skipped.insert(slot.nvml_index);
            };
            let dev = match nvml.device_by_index(slot.nvml_index) {
                Ok(d) => d,
                Err(e) => {
                    skip(&mut skipped, &e);
                    continue;
                }
            };
            let supported = match dev.supported_event_types() {
                Ok(s) => s & wanted,
                Err(e @ (NvmlError::NotSupported | NvmlError::GpuLost)) => {
                    skip(&mut skipped, &e);
                    continue;
                }
                Err(e) => return Err(call_err("supported_event_types", slot.uuid.clone(), e)),
            };
            if supported.is_empty() {
                skip(
                    &mut skipped,
                    &"XID and double-bit ECC events are not supported",
                );
                continue;
            }
            set = match dev.register_events(supported, set) {
                Ok(set) => set,
                Err(e) if matches!(e.error, NvmlError::NotSupported | NvmlError::GpuLost) => {
                    skip(&mut skipped, &e.error);
                    continue 'attempt;
                }
                Err(e) => return Err(call_err("register_events", slot.uuid.clone(), e.error)),
            };
            any = true;
        }
        return Ok(any.then_some(set));
    }
}

/// The event thread's loop: forward events until told to stop or nobody listens.
fn watch(set: &EventSet<'_>, tx: &mpsc::Sender<WatchMsg>, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        let msg = match set.wait(WATCH_SLICE_MS) {
            Ok(data) => {
                let kind = if data.event_type.contains(EventTypes::CRITICAL_XID_ERROR) {
                    HealthEventKind::Xid {
                        code: match data.event_data {
                            Some(XidError::Value(v)) => v,
                            _ => 999,
                        },
                    }
                } else if data.event_type.contains(EventTypes::DOUBLE_BIT_ECC_ERROR) {
                    HealthEventKind::DoubleBitEcc
                } else {
                    continue;
                };
                match data.device.uuid() {
                    Ok(uuid) => {
                        warn!(card = %uuid, event = %kind, "health event");
                        WatchMsg::Event(HealthEvent { uuid, kind })
                    }
                    Err(e) => {
                        warn!(event = %kind, error = %e,
                              "health event from a card whose uuid cannot be read; checking all cards");
                        WatchMsg::CheckLost
                    }
                }
            }
            Err(NvmlError::Timeout) => continue,
            Err(e) => {
                if !matches!(e, NvmlError::GpuLost) {
                    warn!(error = %e, "waiting for NVML events failed; checking all cards");
                }
                if tx.send(WatchMsg::CheckLost).is_err() {
                    break;
                }
                // Do not spin if NVML keeps failing.
                std::thread::sleep(Duration::from_millis(u64::from(WATCH_SLICE_MS)));
                continue;
            }
        };
        if tx.send(msg).is_err() {
            break;
        }
    }
}

fn unix_micros_ago(d: Duration) -> u64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    u64::try_from(now.saturating_sub(d).as_micros()).unwrap_or(u64::MAX)
}

impl GpuBackend for NvmlBackend {
    fn kind(&self) -> &'static str {
        "nvml"
    }

    fn inventory(&self) -> Result<NodeInventory, BackendError> {
        let mut inv = self.discovered()?.inventory;
        for card in &mut inv.cards {
            card.healthy = self.check_card(&card.uuid).is_healthy();
        }
        Ok(inv)
    }

    fn wait_events(&self, timeout: Duration) -> Result<Vec<HealthEvent>, BackendError> {
        let mut out = Vec::new();
        match &self.events {
            Some(rx) => {
                let rx = lock(rx);
                let mut take = |msg: WatchMsg| {
                    if let WatchMsg::Event(e) = msg {
                        out.push(e);
                    }
                };
                match rx.recv_timeout(timeout) {
                    Ok(msg) => take(msg),
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => {
                        return Err(BackendError::WatcherStopped(
                            "the event thread ended; restart the daemon".into(),
                        ))
                    }
                }
                while let Ok(msg) = rx.try_recv() {
                    take(msg);
                }
            }
            None => std::thread::sleep(timeout),
        }
        out.extend(self.poll_lost());
        Ok(out)
    }

    fn probe(&self, uuid: &str) -> Result<ProbeResult, BackendError> {
        let slots = self.slots();
        if !slots.iter().any(|s| s.uuid == uuid) {
            return Err(BackendError::UnknownCard {
                uuid: uuid.to_string(),
                known: slots
                    .iter()
                    .map(|s| s.uuid.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
        Ok(self.check_card(uuid))
    }

    fn processes(&self) -> Result<Vec<ProcessSample>, BackendError> {
        let since = unix_micros_ago(PROCESS_SAMPLE_WINDOW);
        let mut out = Vec::new();
        for slot in self.slots() {
            let Some(dev) = self.device(&slot.uuid, "device_by_uuid")? else {
                continue;
            };
            let procs = match dev.running_compute_processes() {
                Ok(p) => p,
                Err(NvmlError::NotSupported) => Vec::new(),
                Err(e) if is_gone(&e) => continue,
                Err(e) => return Err(call_err("running_compute_processes", slot.uuid, e)),
            };
            if procs.is_empty() {
                continue;
            }
            let samples = match dev.process_utilization_stats(since) {
                Ok(s) => s,
                Err(NvmlError::NotFound | NvmlError::NotSupported) => Vec::new(),
                Err(NvmlError::GpuLost) => continue,
                Err(e) => return Err(call_err("process_utilization_stats", slot.uuid, e)),
            };
            let mut latest: HashMap<u32, (u64, u32)> = HashMap::new();
            for s in samples {
                let entry = latest.entry(s.pid).or_insert((s.timestamp, s.sm_util));
                if s.timestamp >= entry.0 {
                    *entry = (s.timestamp, s.sm_util);
                }
            }
            let mut memory: BTreeMap<u32, u64> = BTreeMap::new();
            for p in procs {
                let used = match p.used_gpu_memory {
                    UsedGpuMemory::Used(bytes) => bytes / MIB,
                    UsedGpuMemory::Unavailable => 0,
                };
                *memory.entry(p.pid).or_default() += used;
            }
            out.extend(memory.into_iter().map(|(pid, used)| ProcessSample {
                uuid: slot.uuid.clone(),
                pid,
                used_memory_mib: used,
                sm_percent: latest.get(&pid).map_or(0, |(_, sm)| (*sm).min(100)),
            }));
        }
        Ok(out)
    }

    fn card_usage(&self) -> Result<Vec<CardUsage>, BackendError> {
        let mut out = Vec::new();
        for slot in self.slots() {
            let Some(dev) = self.device(&slot.uuid, "device_by_uuid")? else {
                continue;
            };
            let sm = match dev.utilization_rates() {
                Ok(u) => u.gpu.min(100),
                Err(NvmlError::NotSupported) => 0,
                Err(e) if is_gone(&e) => continue,
                Err(e) => return Err(call_err("utilization_rates", slot.uuid, e)),
            };
            let used = match dev.memory_info() {
                Ok(m) => m.used / MIB,
                Err(e) if is_gone(&e) => continue,
                Err(e) => return Err(call_err("memory_info", slot.uuid, e)),
            };
            out.push(CardUsage {
                uuid: slot.uuid,
                sm_percent: sm,
                memory_used_mib: used,
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bus(s: &str) -> PciBusId {
        s.parse().unwrap()
    }

    fn end(remote: &str, vendor: u16) -> NvLinkEnd {
        NvLinkEnd {
            remote: bus(remote),
            vendor,
        }
    }

    #[test]
    fn nvml_levels_map_to_nvidia_smi_tokens() {
        assert_eq!(link_for_level(TopologyLevel::Internal), Link::Pix);
        assert_eq!(link_for_level(TopologyLevel::Single), Link::Pix);
        assert_eq!(link_for_level(TopologyLevel::Multiple), Link::Pxb);
        assert_eq!(link_for_level(TopologyLevel::HostBridge), Link::Phb);
        assert_eq!(link_for_level(TopologyLevel::Node), Link::Node);
        assert_eq!(link_for_level(TopologyLevel::System), Link::Sys);
    }

    #[test]
    fn direct_nvlinks_are_counted_per_peer() {
        let buses = [
            bus("0000:07:00.0"),
            bus("0000:0f:00.0"),
            bus("0000:47:00.0"),
        ];
        let mut a = vec![end("0000:0f:00.0", NVIDIA_PCI_VENDOR); 12];
        a.push(end("0000:47:00.0", NVIDIA_PCI_VENDOR));
        let b = vec![end("0000:07:00.0", NVIDIA_PCI_VENDOR); 12];
        let c = vec![end("0000:07:00.0", NVIDIA_PCI_VENDOR)];
        let counts = nvlink_counts(&buses, &[a, b, c]);
        assert_eq!(counts[0][1], 12);
        assert_eq!(counts[1][0], 12);
        assert_eq!(counts[0][2], 1);
        assert_eq!(counts[1][2], 0);
    }

    #[test]
    fn cards_on_the_same_nvswitches_count_their_switch_links() {
        let buses = [
            bus("0000:18:00.0"),
            bus("0000:2a:00.0"),
            bus("0000:3a:00.0"),
        ];
        let switches = [
            "0001:00:00.0",
            "0001:01:00.0",
            "0001:02:00.0",
            "0001:03:00.0",
        ];
        // 18 links spread 5/4/4/5 over four switches, like an HGX H100 board.
        let spread = |take: &[usize]| -> Vec<NvLinkEnd> {
            take.iter()
                .zip(switches)
                .flat_map(|(n, s)| vec![end(s, NVIDIA_PCI_VENDOR); *n])
                .collect()
        };
        let full = spread(&[5, 4, 4, 5]);
        let half = spread(&[5, 4, 0, 0]);
        let counts = nvlink_counts(&buses, &[full.clone(), full, half]);
        assert_eq!(counts[0][1], 18);
        assert_eq!(counts[0][2], 9);
    }

    #[test]
    fn links_to_non_nvidia_devices_are_ignored() {
        let buses = [bus("0000:04:00.0"), bus("0000:05:00.0")];
        let cpu = 0x1014; // IBM NPU on POWER9
        let counts = nvlink_counts(
            &buses,
            &[
                vec![end("0007:00:00.0", cpu); 3],
                vec![end("0007:00:00.0", cpu); 3],
            ],
        );
        assert_eq!(counts[0][1], 0);
    }

    #[test]
    fn sysfs_numa_node_reads_the_pci_device_file() {
        let dir = tempfile::tempdir().unwrap();
        let write = |b: &str, v: &str| {
            let p = dir.path().join("bus/pci/devices").join(b);
            std::fs::create_dir_all(&p).unwrap();
            std::fs::write(p.join("numa_node"), v).unwrap();
        };
        write("0000:3b:00.0", "1\n");
        write("0000:5e:00.0", "-1\n");
        write("0000:af:00.0", "garbage");
        assert_eq!(
            sysfs_numa_node(dir.path(), bus("00000000:3B:00.0")),
            Some(1)
        );
        assert_eq!(sysfs_numa_node(dir.path(), bus("0000:5e:00.0")), None);
        assert_eq!(sysfs_numa_node(dir.path(), bus("0000:af:00.0")), None);
        assert_eq!(sysfs_numa_node(dir.path(), bus("0000:d8:00.0")), None);
    }

    #[test]
    fn missing_library_is_reported_as_nvml_not_available() {
        let err = NvmlBackend::open(NvmlConfig {
            lib_path: Some(PathBuf::from("/nonexistent/libnvidia-ml.so.1")),
            ..NvmlConfig::default()
        })
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("NVML not available: "), "{err}");
        assert!(err.contains("/nonexistent/libnvidia-ml.so.1"), "{err}");
        assert!(
            err.contains("--nvml-lib") && err.contains("driver"),
            "{err}"
        );
    }
}
