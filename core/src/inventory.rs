//! The node's card inventory: cards, their health and the pairwise link matrix, with the
//! versioned JSON codec published on the Node (DESIGN §3).
//!
//! Cards are identified by **card index**: the position after sorting by PCI bus ID, stable
//! across reboots and driver reorderings.

use std::collections::HashSet;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::resources::{blocks_for_mib, CORES_PER_CARD};

/// The inventory format version this build writes and reads.
pub const INVENTORY_VERSION: u32 = 1;
/// Most cards one node may have (bit masks are `u64`).
pub const MAX_CARDS: usize = 64;

/// How two cards are connected, as `nvidia-smi topo -m` prints it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Link {
    /// The card itself (matrix diagonal).
    SelfLink,
    /// NVLink with this many links (1..=255).
    NvLink(u8),
    /// A single PCIe switch.
    Pix,
    /// Multiple PCIe switches, no host bridge.
    Pxb,
    /// A PCIe host bridge.
    Phb,
    /// Across host bridges within one NUMA node.
    Node,
    /// Across NUMA nodes (the SMP interconnect).
    Sys,
}

impl Link {
    /// Quality rank: lower is tighter. NVLink with more links beats fewer; any NVLink beats
    /// PCIe; PCIe levels order PIX < PXB < PHB < NODE < SYS.
    pub fn rank(self) -> u32 {
        match self {
            Link::SelfLink => 0,
            Link::NvLink(n) => 1 + u32::from(u8::MAX - n),
            Link::Pix => 300,
            Link::Pxb => 400,
            Link::Phb => 500,
            Link::Node => 600,
            Link::Sys => 700,
        }
    }

    pub fn is_nvlink(self) -> bool {
        matches!(self, Link::NvLink(_))
    }
}

impl fmt::Display for Link {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Link::SelfLink => f.write_str("X"),
            Link::NvLink(n) => write!(f, "NV{n}"),
            Link::Pix => f.write_str("PIX"),
            Link::Pxb => f.write_str("PXB"),
            Link::Phb => f.write_str("PHB"),
            Link::Node => f.write_str("NODE"),
            Link::Sys => f.write_str("SYS"),
        }
    }
}

/// A link token was not one `nvidia-smi topo -m` prints.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown link {0:?}: use X, NV<1-255>, PIX, PXB, PHB, NODE (or its old name SOC) or SYS")]
pub struct LinkParseError(pub String);

impl FromStr for Link {
    type Err = LinkParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        let up = t.to_ascii_uppercase();
        Ok(match up.as_str() {
            "X" => Link::SelfLink,
            "PIX" => Link::Pix,
            "PXB" => Link::Pxb,
            "PHB" => Link::Phb,
            // Old nvidia-smi printed SOC; TKEStack maps it to the same-NUMA "CPU" level.
            "NODE" | "SOC" | "CPU" => Link::Node,
            "SYS" => Link::Sys,
            _ => {
                let n = up
                    .strip_prefix("NV")
                    .and_then(|n| n.parse::<u8>().ok())
                    .filter(|n| *n > 0)
                    .ok_or_else(|| LinkParseError(t.to_string()))?;
                Link::NvLink(n)
            }
        })
    }
}

impl Serialize for Link {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Link {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// One physical card.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Card {
    /// Position after sorting the node's cards by PCI bus ID.
    pub index: u32,
    pub uuid: String,
    pub model: String,
    pub memory_mib: u64,
    /// N of `/dev/nvidiaN`.
    pub minor: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub numa_node: Option<u32>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub pci_bus_id: String,
    pub healthy: bool,
}

impl Card {
    /// vcuda-memory blocks this card offers: floor(memory / 256 MiB).
    pub fn blocks(&self) -> u32 {
        blocks_for_mib(self.memory_mib)
    }
}

/// The inventory of one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeInventory {
    pub version: u32,
    pub cards: Vec<Card>,
    /// `links[i][j]`: how card i reaches card j; `X` on the diagonal; symmetric.
    pub links: Vec<Vec<Link>>,
}

/// An inventory that cannot be used, with what was wrong and what is allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InventoryError {
    #[error("inventory is not valid JSON for this format: {0}")]
    Json(String),
    #[error(
        "inventory version {found} is not supported: this build reads version {INVENTORY_VERSION}"
    )]
    Version { found: u32 },
    #[error("inventory has {0} cards; at most {MAX_CARDS} are supported")]
    TooManyCards(usize),
    #[error("card at position {position} has index {index}: indices must be 0..N-1 in order")]
    Index { position: usize, index: u32 },
    #[error("card {index}: {problem}")]
    Card { index: u32, problem: String },
    #[error("cards {a} and {b} share the {what} {value:?}; each card needs its own")]
    Duplicate {
        a: u32,
        b: u32,
        what: &'static str,
        value: String,
    },
    #[error("link matrix: {0}")]
    Links(String),
}

impl NodeInventory {
    /// Build and validate an inventory.
    pub fn new(cards: Vec<Card>, links: Vec<Vec<Link>>) -> Result<Self, InventoryError> {
        let inv = Self {
            version: INVENTORY_VERSION,
            cards,
            links,
        };
        inv.validate()?;
        Ok(inv)
    }

    /// An inventory of `n` identical cards where every pair has the same link (handy for
    /// simulations and tests).
    pub fn uniform(n: usize, model: &str, memory_mib: u64, link: Link) -> Self {
        let cards = (0..n as u32)
            .map(|i| Card {
                index: i,
                uuid: format!("GPU-{model}-{i:04}"),
                model: model.to_string(),
                memory_mib,
                minor: i,
                numa_node: None,
                pci_bus_id: String::new(),
                healthy: true,
            })
            .collect();
        let links = (0..n)
            .map(|i| {
                (0..n)
                    .map(|j| if i == j { Link::SelfLink } else { link })
                    .collect()
            })
            .collect();
        Self {
            version: INVENTORY_VERSION,
            cards,
            links,
        }
    }

    /// Decode and validate the published JSON form. Garbage returns an error, never a panic.
    pub fn from_json(s: &str) -> Result<Self, InventoryError> {
        // Read the version first so a future format gets a version error, not a field error.
        #[derive(Deserialize)]
        struct VersionOnly {
            version: Option<u32>,
        }
        let v: VersionOnly =
            serde_json::from_str(s).map_err(|e| InventoryError::Json(e.to_string()))?;
        match v.version {
            Some(INVENTORY_VERSION) => {}
            Some(found) => return Err(InventoryError::Version { found }),
            None => return Err(InventoryError::Json("missing field `version`".into())),
        }
        let inv: Self = serde_json::from_str(s).map_err(|e| InventoryError::Json(e.to_string()))?;
        inv.validate()?;
        Ok(inv)
    }

    /// Encode as compact JSON (the node annotation value).
    pub fn to_json(&self) -> String {
        // Serialising plain structs, strings and integers cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Check every invariant the rest of the system relies on.
    pub fn validate(&self) -> Result<(), InventoryError> {
        if self.version != INVENTORY_VERSION {
            return Err(InventoryError::Version {
                found: self.version,
            });
        }
        let n = self.cards.len();
        if n > MAX_CARDS {
            return Err(InventoryError::TooManyCards(n));
        }
        let mut uuids = std::collections::HashMap::new();
        let mut minors = std::collections::HashMap::new();
        for (pos, c) in self.cards.iter().enumerate() {
            if c.index as usize != pos {
                return Err(InventoryError::Index {
                    position: pos,
                    index: c.index,
                });
            }
            let bad = |problem: &str| InventoryError::Card {
                index: c.index,
                problem: problem.to_string(),
            };
            if c.uuid.trim().is_empty() {
                return Err(bad("uuid is empty"));
            }
            if c.model.trim().is_empty() {
                return Err(bad("model is empty"));
            }
            if c.blocks() == 0 {
                return Err(bad(
                    "memoryMib must be at least 256 (one vcuda-memory block)",
                ));
            }
            if let Some(prev) = uuids.insert(c.uuid.as_str(), c.index) {
                return Err(InventoryError::Duplicate {
                    a: prev,
                    b: c.index,
                    what: "uuid",
                    value: c.uuid.clone(),
                });
            }
            if let Some(prev) = minors.insert(c.minor, c.index) {
                return Err(InventoryError::Duplicate {
                    a: prev,
                    b: c.index,
                    what: "minor",
                    value: c.minor.to_string(),
                });
            }
        }
        if self.links.len() != n {
            return Err(InventoryError::Links(format!(
                "has {} rows for {n} cards; it must be {n}x{n}",
                self.links.len()
            )));
        }
        for (i, row) in self.links.iter().enumerate() {
            if row.len() != n {
                return Err(InventoryError::Links(format!(
                    "row {i} has {} entries; it must have {n}",
                    row.len()
                )));
            }
            for (j, l) in row.iter().enumerate() {
                if (i == j) != (*l == Link::SelfLink) {
                    return Err(InventoryError::Links(format!(
                        "entry [{i}][{j}] is {l}; X belongs on the diagonal and only there"
                    )));
                }
                if self.links[j][i] != *l {
                    return Err(InventoryError::Links(format!(
                        "entry [{i}][{j}] is {l} but [{j}][{i}] is {}; the matrix must be symmetric",
                        self.links[j][i]
                    )));
                }
            }
        }
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.cards.len()
    }

    pub fn is_empty(&self) -> bool {
        self.cards.is_empty()
    }

    pub fn link(&self, a: u32, b: u32) -> Link {
        self.links[a as usize][b as usize]
    }

    pub fn card(&self, index: u32) -> Option<&Card> {
        self.cards.get(index as usize)
    }

    pub fn card_by_uuid(&self, uuid: &str) -> Option<&Card> {
        self.cards.iter().find(|c| c.uuid == uuid)
    }

    pub fn card_by_minor(&self, minor: u32) -> Option<&Card> {
        self.cards.iter().find(|c| c.minor == minor)
    }

    pub fn total_cores(&self) -> u64 {
        self.cards.len() as u64 * u64::from(CORES_PER_CARD)
    }

    pub fn total_blocks(&self) -> u64 {
        self.cards.iter().map(|c| u64::from(c.blocks())).sum()
    }

    pub fn largest_card_mib(&self) -> u64 {
        self.cards.iter().map(|c| c.memory_mib).max().unwrap_or(0)
    }

    /// Distinct models, in card order.
    pub fn models(&self) -> Vec<&str> {
        let mut seen = HashSet::new();
        self.cards
            .iter()
            .map(|c| c.model.as_str())
            .filter(|m| seen.insert(*m))
            .collect()
    }

    /// Render the link matrix the way `nvidia-smi topo -m` does (for logs and `/usage`).
    pub fn render_links(&self) -> String {
        let mut out = String::from("      ");
        for j in 0..self.cards.len() {
            out.push_str(&format!("{:>6}", format!("GPU{j}")));
        }
        for (i, row) in self.links.iter().enumerate() {
            out.push('\n');
            out.push_str(&format!("{:<6}", format!("GPU{i}")));
            for l in row {
                out.push_str(&format!("{:>6}", l.to_string()));
            }
        }
        out
    }
}

/// Parse a link matrix written like `nvidia-smi topo -m` (one row per line, tokens separated by
/// whitespace; a leading `GPUn` row label and a header line of `GPUn` names are allowed).
pub fn parse_matrix(text: &str) -> Result<Vec<Vec<Link>>, InventoryError> {
    let mut rows = Vec::new();
    for (lineno, line) in text.lines().enumerate() {
        let toks: Vec<&str> = line.split_whitespace().collect();
        if toks.is_empty()
            || toks
                .iter()
                .all(|t| t.to_ascii_uppercase().starts_with("GPU"))
        {
            continue;
        }
        let toks = match toks.first() {
            Some(t) if t.to_ascii_uppercase().starts_with("GPU") => &toks[1..],
            _ => &toks[..],
        };
        let row = toks
            .iter()
            .map(|t| t.parse::<Link>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| InventoryError::Links(format!("line {}: {e}", lineno + 1)))?;
        rows.push(row);
    }
    Ok(rows)
}

/// A label-safe form of a model name: `NVIDIA A100-SXM4-40GB` → `NVIDIA-A100-SXM4-40GB`.
/// At most 63 characters of `[A-Za-z0-9._-]`, starting and ending alphanumeric.
pub fn model_label_value(model: &str) -> String {
    let mut out = String::with_capacity(model.len());
    for ch in model.chars() {
        let c = if ch.is_ascii_alphanumeric() || ch == '.' || ch == '_' || ch == '-' {
            ch
        } else {
            '-'
        };
        if c == '-' && out.ends_with('-') {
            continue;
        }
        out.push(c);
    }
    let trimmed: String = out
        .trim_matches(|c: char| !c.is_ascii_alphanumeric())
        .chars()
        .take(63)
        .collect();
    trimmed
        .trim_end_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn two_cards() -> NodeInventory {
        NodeInventory::new(
            vec![
                Card {
                    index: 0,
                    uuid: "GPU-a".into(),
                    model: "NVIDIA A100-SXM4-40GB".into(),
                    memory_mib: 40960,
                    minor: 0,
                    numa_node: Some(0),
                    pci_bus_id: "0000:07:00.0".into(),
                    healthy: true,
                },
                Card {
                    index: 1,
                    uuid: "GPU-b".into(),
                    model: "Tesla V100-SXM2-32GB".into(),
                    memory_mib: 32768,
                    minor: 1,
                    numa_node: None,
                    pci_bus_id: String::new(),
                    healthy: false,
                },
            ],
            vec![
                vec![Link::SelfLink, Link::NvLink(12)],
                vec![Link::NvLink(12), Link::SelfLink],
            ],
        )
        .unwrap()
    }

    #[test]
    fn json_round_trip_keeps_everything() {
        let inv = two_cards();
        let json = inv.to_json();
        assert!(json.contains("\"NV12\""), "{json}");
        assert!(json.contains("\"memoryMib\":40960"), "{json}");
        assert_eq!(NodeInventory::from_json(&json).unwrap(), inv);
    }

    #[test]
    fn future_version_is_refused_by_version_not_by_field() {
        let json = r#"{"version":2,"cards":[],"links":[],"newField":1}"#;
        assert_eq!(
            NodeInventory::from_json(json),
            Err(InventoryError::Version { found: 2 })
        );
    }

    #[test]
    fn garbage_is_an_error() {
        for s in [
            "",
            "null",
            "[]",
            "{",
            "{\"version\":1}",
            "{\"version\":\"1\"}",
        ] {
            assert!(NodeInventory::from_json(s).is_err(), "{s}");
        }
    }

    #[test]
    fn asymmetric_or_misshapen_matrices_are_rejected() {
        let mut inv = two_cards();
        inv.links[0][1] = Link::Pix;
        let e = inv.validate().unwrap_err().to_string();
        assert!(e.contains("symmetric"), "{e}");
        let mut inv = two_cards();
        inv.links[1].pop();
        assert!(inv.validate().unwrap_err().to_string().contains("row 1"));
        let mut inv = two_cards();
        inv.links[0][0] = Link::Pix;
        assert!(inv.validate().unwrap_err().to_string().contains("diagonal"));
    }

    #[test]
    fn duplicate_uuid_and_bad_index_are_rejected() {
        let mut inv = two_cards();
        inv.cards[1].uuid = "GPU-a".into();
        assert!(matches!(
            inv.validate(),
            Err(InventoryError::Duplicate { what: "uuid", .. })
        ));
        let mut inv = two_cards();
        inv.cards[1].index = 5;
        assert!(matches!(inv.validate(), Err(InventoryError::Index { .. })));
        let mut inv = two_cards();
        inv.cards[0].memory_mib = 100;
        assert!(inv.validate().unwrap_err().to_string().contains("256"));
    }

    #[test]
    fn link_tokens_parse_like_nvidia_smi() {
        assert_eq!("NV18".parse::<Link>(), Ok(Link::NvLink(18)));
        assert_eq!("soc".parse::<Link>(), Ok(Link::Node));
        assert_eq!("SYS".parse::<Link>(), Ok(Link::Sys));
        assert!("NV0".parse::<Link>().is_err());
        assert!("PCI"
            .parse::<Link>()
            .unwrap_err()
            .to_string()
            .contains("PIX"));
    }

    #[test]
    fn link_ranks_order_nvlink_first_then_pcie_levels() {
        let order = [
            Link::NvLink(18),
            Link::NvLink(2),
            Link::Pix,
            Link::Pxb,
            Link::Phb,
            Link::Node,
            Link::Sys,
        ];
        for w in order.windows(2) {
            assert!(w[0].rank() < w[1].rank(), "{} vs {}", w[0], w[1]);
        }
    }

    #[test]
    fn matrices_parse_with_or_without_labels() {
        let m = parse_matrix("      GPU0 GPU1\nGPU0  X    NV4\nGPU1  NV4  X\n").unwrap();
        assert_eq!(
            m,
            vec![
                vec![Link::SelfLink, Link::NvLink(4)],
                vec![Link::NvLink(4), Link::SelfLink]
            ]
        );
        let e = parse_matrix("X PIX\nPIX Y").unwrap_err().to_string();
        assert!(e.contains("line 2") && e.contains("\"Y\""), "{e}");
    }

    #[test]
    fn model_labels_are_label_safe() {
        assert_eq!(
            model_label_value("NVIDIA A100-SXM4-40GB"),
            "NVIDIA-A100-SXM4-40GB"
        );
        assert_eq!(model_label_value("  Tesla T4 "), "Tesla-T4");
        assert_eq!(
            model_label_value("NVIDIA H100 80GB HBM3"),
            "NVIDIA-H100-80GB-HBM3"
        );
        assert_eq!(model_label_value(&"x".repeat(100)).len(), 63);
    }

    proptest! {
        #[test]
        fn decoding_arbitrary_text_never_panics(s in "\\PC{0,200}") {
            let _ = NodeInventory::from_json(&s);
        }

        #[test]
        fn uniform_inventories_are_valid(n in 0usize..=16, mem in 256u64..200_000) {
            let inv = NodeInventory::uniform(n, "T4", mem, Link::Phb);
            prop_assert!(inv.validate().is_ok());
            prop_assert_eq!(NodeInventory::from_json(&inv.to_json()).unwrap(), inv);
        }
    }
}
