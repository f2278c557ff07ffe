//! Node description files for the simulated backend.
//!
//! A YAML document describing one node: its cards, the link matrix in `nvidia-smi topo -m`
//! tokens, and optionally a script over time (health events, utilisation samples, processes).
//! The format is documented field by field in `deploy/examples/nodes/README.md`.
//!
//! Every problem is reported with the file name, the line (and column) where the YAML parser
//! can tell, the field path (e.g. `links[3][1]`), what is wrong and what is allowed. Checks that
//! concern one entry run while that entry is parsed, so they point at its line; checks across
//! sections point at the entry that references something unknown.
//!
//! Cards may be listed in any order; the link matrix rows and columns follow the order of the
//! `cards` list. After parsing, cards are sorted by `pciBusId` (card index = position after the
//! sort) and the matrix is permuted to match. If no card has a `pciBusId`, file order is kept;
//! giving some cards a bus ID and not others is an error.

mod parse;

use std::path::Path;
use std::time::Duration;

use gm_core::inventory::{Card, Link, NodeInventory};

use crate::error::BackendError;
use crate::pci::PciBusId;
use crate::{CardUsage, ProcessSample};

/// One card as described in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CardSpec {
    /// Position in the file's `cards` list (0-based).
    pub file_position: usize,
    /// The card's uuid (`GPU-…`).
    pub uuid: String,
    /// Model name as NVML reports it.
    pub model: String,
    /// Total memory, MiB.
    pub memory_mib: u64,
    /// N of `/dev/nvidiaN`.
    pub minor: u32,
    /// PCI address, if given.
    pub pci_bus_id: Option<PciBusId>,
    /// NUMA node, if known.
    pub numa_node: Option<u32>,
}

/// A process using one card during a time window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessSpec {
    /// Card uuid.
    pub card: String,
    /// Host PID.
    pub pid: u32,
    /// Memory the process holds, MiB.
    pub used_memory_mib: u64,
    /// SM utilisation of the process, percent.
    pub sm_percent: u32,
    /// When the process appears, ms after start.
    pub start_ms: u64,
    /// When it exits, ms after start (`None`: never).
    pub end_ms: Option<u64>,
}

impl ProcessSpec {
    /// Whether the process runs at `t_ms`.
    pub fn active_at(&self, t_ms: u64) -> bool {
        self.start_ms <= t_ms && self.end_ms.is_none_or(|end| t_ms < end)
    }
}

/// A utilisation sample of one card, valid from `at_ms` until the card's next sample.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageSpec {
    /// Card uuid.
    pub card: String,
    /// When the sample takes effect, ms after start.
    pub at_ms: u64,
    /// SM utilisation, percent.
    pub sm_percent: u32,
    /// Memory in use, MiB.
    pub memory_used_mib: u64,
}

/// A scripted health change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScriptedEvent {
    /// When it happens, ms after start.
    pub at_ms: u64,
    /// Card uuid.
    pub card: String,
    /// What happens.
    pub kind: ScriptedEventKind,
}

/// What a scripted event does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScriptedEventKind {
    /// An XID error is reported.
    Xid {
        /// XID number.
        code: u64,
    },
    /// A double-bit ECC error is reported.
    DoubleBitEcc,
    /// The card stops answering (reported as a lost-card event; probes say lost).
    Lost,
    /// The card answers again (no event; the next probe says healthy).
    Recovered,
}

/// A parsed and validated node description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeDescription {
    /// The file name used in messages.
    pub name: String,
    /// Cards in card-index order (sorted by PCI bus ID, or file order without bus IDs).
    pub cards: Vec<CardSpec>,
    /// Link matrix in card-index order.
    pub links: Vec<Vec<Link>>,
    /// Processes, in file order.
    pub processes: Vec<ProcessSpec>,
    /// Utilisation samples, in file order.
    pub usage: Vec<UsageSpec>,
    /// Scripted events sorted by time (file order among equal times).
    pub events: Vec<ScriptedEvent>,
}

impl NodeDescription {
    /// Read and parse a node file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, BackendError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| BackendError::ReadNodeFile {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parse a node description; `name` is used in error messages in place of a file name.
    pub fn parse(text: &str, name: &str) -> Result<Self, BackendError> {
        parse::parse(text, name)
    }

    /// The inventory this description yields, every card healthy.
    pub fn inventory(&self) -> NodeInventory {
        let cards = self
            .cards
            .iter()
            .enumerate()
            .map(|(i, c)| Card {
                index: i as u32,
                uuid: c.uuid.clone(),
                model: c.model.clone(),
                memory_mib: c.memory_mib,
                minor: c.minor,
                numa_node: c.numa_node,
                pci_bus_id: c.pci_bus_id.map(|b| b.to_string()).unwrap_or_default(),
                healthy: true,
            })
            .collect();
        NodeInventory {
            version: gm_core::inventory::INVENTORY_VERSION,
            cards,
            links: self.links.clone(),
        }
    }

    /// Whether the card is lost at `t`: its latest `lost`/`recovered` event at or before `t`
    /// is `lost`.
    pub fn lost_at(&self, uuid: &str, t: Duration) -> bool {
        let t_ms = millis(t);
        self.events
            .iter()
            .filter(|e| e.card == uuid && e.at_ms <= t_ms)
            .fold(false, |lost, e| match e.kind {
                ScriptedEventKind::Lost => true,
                ScriptedEventKind::Recovered => false,
                _ => lost,
            })
    }

    /// Processes running at `t` on cards that answer, in card-index order then by pid.
    pub fn processes_at(&self, t: Duration) -> Vec<ProcessSample> {
        let t_ms = millis(t);
        let mut out = Vec::new();
        for card in self.cards.iter().filter(|c| !self.lost_at(&c.uuid, t)) {
            let mut procs: Vec<ProcessSample> = self
                .processes
                .iter()
                .filter(|p| p.card == card.uuid && p.active_at(t_ms))
                .map(|p| ProcessSample {
                    uuid: p.card.clone(),
                    pid: p.pid,
                    used_memory_mib: p.used_memory_mib,
                    sm_percent: p.sm_percent,
                })
                .collect();
            procs.sort_by_key(|p| p.pid);
            out.extend(procs);
        }
        out
    }

    /// Usage of every card that answers at `t`, in card-index order: the card's latest usage
    /// sample at or before `t`, or, before its first sample, the sum of its running processes
    /// (memory capped at the card's memory, SM at 100 %).
    pub fn usage_at(&self, t: Duration) -> Vec<CardUsage> {
        let t_ms = millis(t);
        let processes = self.processes_at(t);
        self.cards
            .iter()
            .filter(|c| !self.lost_at(&c.uuid, t))
            .map(|card| {
                let sample = self
                    .usage
                    .iter()
                    .filter(|u| u.card == card.uuid && u.at_ms <= t_ms)
                    .max_by_key(|u| u.at_ms);
                match sample {
                    Some(u) => CardUsage {
                        uuid: card.uuid.clone(),
                        sm_percent: u.sm_percent,
                        memory_used_mib: u.memory_used_mib,
                    },
                    None => {
                        let mine = processes.iter().filter(|p| p.uuid == card.uuid);
                        let (sm, mem) = mine.fold((0u32, 0u64), |(s, m), p| {
                            (
                                s.saturating_add(p.sm_percent),
                                m.saturating_add(p.used_memory_mib),
                            )
                        });
                        CardUsage {
                            uuid: card.uuid.clone(),
                            sm_percent: sm.min(100),
                            memory_used_mib: mem.min(card.memory_mib),
                        }
                    }
                }
            })
            .collect()
    }
}

/// Whole milliseconds of `d`, saturating.
pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) const TWO: &str = "\
cards:
  - uuid: GPU-b
    model: Tesla T4
    memoryMiB: 15360
    minor: 1
    pciBusId: 0000:5e:00.0
  - uuid: GPU-a
    model: Tesla T4
    memoryMiB: 15360
    minor: 0
    pciBusId: 0000:3b:00.0
links:
  - [X, PIX]
  - [PIX, X]
";

    #[test]
    fn cards_are_indexed_by_pci_bus_id_order() {
        let d = NodeDescription::parse(TWO, "two.yaml").unwrap();
        let uuids: Vec<&str> = d.cards.iter().map(|c| c.uuid.as_str()).collect();
        assert_eq!(uuids, ["GPU-a", "GPU-b"]);
        assert_eq!(d.cards[0].file_position, 1);
        let inv = d.inventory();
        assert_eq!(inv.cards[0].pci_bus_id, "0000:3b:00.0");
        assert_eq!(inv.cards[1].index, 1);
    }

    #[test]
    fn matrix_follows_the_cards_when_they_are_sorted() {
        let text = "\
cards:
  - {uuid: GPU-c, model: M, memoryMiB: 1024, minor: 2, pciBusId: '0000:af:00.0'}
  - {uuid: GPU-a, model: M, memoryMiB: 1024, minor: 0, pciBusId: '0000:18:00.0'}
  - {uuid: GPU-b, model: M, memoryMiB: 1024, minor: 1, pciBusId: '0000:3b:00.0'}
links:
  - [X,   SYS, NV4]
  - [SYS, X,   PIX]
  - [NV4, PIX, X]
";
        let d = NodeDescription::parse(text, "t").unwrap();
        // Sorted: a(18), b(3b), c(af). a-b PIX, a-c SYS, b-c NV4.
        let inv = d.inventory();
        assert_eq!(inv.link(0, 1), Link::Pix);
        assert_eq!(inv.link(0, 2), Link::Sys);
        assert_eq!(inv.link(1, 2), Link::NvLink(4));
        assert_eq!(inv.link(2, 1), Link::NvLink(4));
    }

    #[test]
    fn without_bus_ids_file_order_is_kept() {
        let text = "\
cards:
  - {uuid: GPU-z, model: M, memoryMiB: 1024, minor: 5}
  - {uuid: GPU-y, model: M, memoryMiB: 1024, minor: 3}
links: [[X, PHB], [PHB, X]]
";
        let d = NodeDescription::parse(text, "t").unwrap();
        assert_eq!(d.cards[0].uuid, "GPU-z");
        assert_eq!(d.inventory().cards[1].pci_bus_id, "");
    }

    #[test]
    fn lost_and_recovered_events_drive_the_lost_state() {
        let d = NodeDescription::parse(
            &format!(
                "{TWO}events:\n  - {{atMs: 2000, card: GPU-a, kind: recovered}}\n  - {{atMs: 1000, card: GPU-a, kind: lost}}\n  - {{atMs: 1000, card: GPU-a, kind: xid, code: 79}}\n"
            ),
            "t",
        )
        .unwrap();
        let ms = Duration::from_millis;
        assert!(!d.lost_at("GPU-a", ms(999)));
        assert!(d.lost_at("GPU-a", ms(1000)));
        assert!(d.lost_at("GPU-a", ms(1999)));
        assert!(!d.lost_at("GPU-a", ms(2000)));
        assert!(!d.lost_at("GPU-b", ms(1500)));
        assert_eq!(d.events[0].at_ms, 1000);
        assert_eq!(d.events[2].kind, ScriptedEventKind::Recovered);
    }

    #[test]
    fn usage_comes_from_samples_or_from_running_processes() {
        let text = format!(
            "{TWO}processes:\n  - {{card: GPU-a, pid: 30, usedMemoryMiB: 1000, smPercent: 70}}\n  - {{card: GPU-a, pid: 20, usedMemoryMiB: 500, smPercent: 50, endMs: 100}}\nusage:\n  - {{card: GPU-b, atMs: 50, smPercent: 9, memoryUsedMiB: 99}}\n"
        );
        let d = NodeDescription::parse(&text, "t").unwrap();
        let at = |ms| d.usage_at(Duration::from_millis(ms));
        let u = at(10);
        assert_eq!((u[0].sm_percent, u[0].memory_used_mib), (100, 1500));
        assert_eq!((u[1].sm_percent, u[1].memory_used_mib), (0, 0));
        let u = at(100);
        assert_eq!((u[0].sm_percent, u[0].memory_used_mib), (70, 1000));
        assert_eq!((u[1].sm_percent, u[1].memory_used_mib), (9, 99));
        let pids: Vec<u32> = d
            .processes_at(Duration::from_millis(10))
            .iter()
            .map(|p| p.pid)
            .collect();
        assert_eq!(pids, [20, 30]);
    }
}
