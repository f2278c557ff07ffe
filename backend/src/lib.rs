//! GPU backends behind one trait.
//!
//! The node daemon discovers cards, watches their health and samples their usage through a
//! [`GpuBackend`]. Two implementations exist:
//!
//! * [`nvml::NvmlBackend`]: the real thing, through NVML. The library is loaded at run time,
//!   so this crate builds and tests on machines without a driver; on such a machine opening the
//!   backend returns [`BackendError::NvmlUnavailable`] instead of crashing.
//! * [`simulated::SimulatedBackend`]: a node described in a YAML file (cards, link matrix,
//!   scripted health events, utilisation and processes over time). See
//!   `deploy/examples/nodes/README.md` for the file format.
//!
//! All methods are synchronous and may block (NVML calls, [`GpuBackend::wait_events`]); async
//! callers run them on a blocking thread.

pub mod clock;
pub mod error;
pub mod node_file;
pub mod nvml;
pub mod pci;
pub mod simulated;

use std::path::PathBuf;
use std::time::Duration;

use gm_core::NodeInventory;
use serde::{Deserialize, Serialize};

pub use clock::{Clock, ManualClock, SystemClock};
pub use error::BackendError;
pub use node_file::NodeDescription;
pub use nvml::{NvmlBackend, NvmlConfig};
pub use pci::PciBusId;
pub use simulated::SimulatedBackend;

/// What the node daemon needs from the GPUs of its node.
///
/// Cards are named by uuid in everything but [`GpuBackend::inventory`], which also fixes their
/// card index (position after sorting by PCI bus ID).
pub trait GpuBackend: Send + Sync + std::fmt::Debug {
    /// Short name of the backend: `"nvml"` or `"simulated"`.
    fn kind(&self) -> &'static str;

    /// The node's cards sorted by PCI bus ID (card index = position), with the full pairwise
    /// link matrix. `healthy` says whether the card is present and answering right now; XID
    /// policy is the caller's business.
    fn inventory(&self) -> Result<NodeInventory, BackendError>;

    /// Block up to `timeout` for health events and return those that occurred since the last
    /// call (possibly none). Returns early as soon as at least one event is available.
    fn wait_events(&self, timeout: Duration) -> Result<Vec<HealthEvent>, BackendError>;

    /// Re-probe one card: is it present and answering? Used to recover cards that an event
    /// marked unhealthy. An uuid that is not in the inventory is an error.
    fn probe(&self, uuid: &str) -> Result<ProbeResult, BackendError>;

    /// Processes using the cards right now, in card-index order then by pid. Lost cards are
    /// left out.
    fn processes(&self) -> Result<Vec<ProcessSample>, BackendError>;

    /// Utilisation and memory use of every answering card, in card-index order.
    fn card_usage(&self) -> Result<Vec<CardUsage>, BackendError>;
}

/// Something that happened to a card.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HealthEvent {
    /// The card's uuid.
    pub uuid: String,
    /// What happened.
    pub kind: HealthEventKind,
}

/// The kinds of health event a backend reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "type")]
pub enum HealthEventKind {
    /// An XID error from the driver. NVML's "unknown XID" is reported as code 999.
    Xid {
        /// The XID number (e.g. 79: the card fell off the bus).
        code: u64,
    },
    /// An uncorrectable (double-bit) ECC memory error.
    DoubleBitEcc,
    /// The card stopped answering (NVML: GPU is lost).
    Lost,
}

impl std::fmt::Display for HealthEventKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HealthEventKind::Xid { code } => write!(f, "XID {code}"),
            HealthEventKind::DoubleBitEcc => f.write_str("double-bit ECC error"),
            HealthEventKind::Lost => f.write_str("card lost"),
        }
    }
}

/// The answer of [`GpuBackend::probe`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "state")]
pub enum ProbeResult {
    /// Present and answering.
    Healthy,
    /// Gone: fell off the bus or otherwise unreachable.
    Lost,
    /// Present but a query failed for another reason.
    Failing {
        /// What failed.
        reason: String,
    },
}

impl ProbeResult {
    /// Whether the card may be used again.
    pub fn is_healthy(&self) -> bool {
        matches!(self, ProbeResult::Healthy)
    }
}

/// One process using one card.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProcessSample {
    /// The card's uuid.
    pub uuid: String,
    /// Host PID of the process.
    pub pid: u32,
    /// GPU memory the process holds on this card, MiB.
    pub used_memory_mib: u64,
    /// Share of the card's SM time the process used recently, percent (0 when NVML has no
    /// sample for it).
    pub sm_percent: u32,
}

/// Utilisation of one card.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CardUsage {
    /// The card's uuid.
    pub uuid: String,
    /// Share of time a kernel was running, percent.
    pub sm_percent: u32,
    /// Memory in use, MiB.
    pub memory_used_mib: u64,
}

/// Which backend to open (what the daemon's flags select).
#[derive(Debug, Clone)]
pub enum BackendChoice {
    /// NVML through the given configuration.
    Nvml(NvmlConfig),
    /// A simulated node described by this file.
    Simulated {
        /// Path of the node description (YAML).
        node_file: PathBuf,
    },
}

impl BackendChoice {
    /// Open the chosen backend.
    pub fn open(&self) -> Result<Box<dyn GpuBackend>, BackendError> {
        Ok(match self {
            BackendChoice::Nvml(config) => Box::new(NvmlBackend::open(config.clone())?),
            BackendChoice::Simulated { node_file } => {
                Box::new(SimulatedBackend::from_file(node_file)?)
            }
        })
    }
}

/// Bytes in a MiB.
pub(crate) const MIB: u64 = 1024 * 1024;
