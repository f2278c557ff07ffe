//! One container's allocation as the daemon records it.

use gm_core::devices::{CoreShape, DeviceKind, IdSet};
use gm_core::resources::BLOCK_BYTES;
use gm_core::NodeInventory;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// A container of a pod.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    /// Empty when unknown (pod-resources does not report UIDs; standalone never learns them).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub uid: String,
    pub container: String,
}

impl std::fmt::Display for PodRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}/{} container {:?}",
            self.namespace, self.name, self.container
        )
    }
}

impl PodRef {
    /// Same pod and container, ignoring an unknown UID on either side.
    pub fn same_container(&self, other: &PodRef) -> bool {
        self.same_pod(other) && self.container == other.container
    }

    /// Same pod, ignoring an unknown UID on either side.
    pub fn same_pod(&self, other: &PodRef) -> bool {
        self.namespace == other.namespace
            && self.name == other.name
            && (self.uid.is_empty() || other.uid.is_empty() || self.uid == other.uid)
    }
}

/// One container's allocation: its vcuda-core IDs and (once known) its vcuda-memory IDs.
///
/// A record is keyed by its vcuda-core ID set, which is unique per container (the kubelet
/// never hands the same IDs to two containers, except an init container's to the app
/// containers of the same pod). A container whose vcuda-memory half was allocated first has a
/// memory-only record until its vcuda-core half arrives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Deterministic from the IDs: `r-…` from the vcuda-core IDs, `m-…` for a memory-only record.
    /// Names the limiter directory.
    pub id: String,
    pub core: IdSet,
    /// [`IdSet::encode`] of `core` (empty for a memory-only record).
    pub core_key: String,
    pub memory: IdSet,
    /// [`IdSet::encode`] of `memory` (empty while unknown).
    pub memory_key: String,
    /// What the vcuda-core IDs amount to (`None` for a memory-only record).
    pub shape: Option<CoreShape>,
    /// The pod container the request was matched to at allocation time (a best guess).
    pub matched: Option<PodRef>,
    /// The pod container the kubelet's pod-resources API says holds the IDs (authoritative).
    pub owner: Option<PodRef>,
    /// When the record was created (unix milliseconds).
    pub created_ms: u64,
    /// Since when the IDs are missing from pod-resources (unix milliseconds), if they are.
    pub missing_since_ms: Option<u64>,
}

impl Record {
    /// A record for a container's vcuda-core IDs.
    pub fn for_core(core: IdSet, shape: CoreShape, created_ms: u64) -> Self {
        let core_key = core.encode();
        Self {
            id: record_id(DeviceKind::Core, &core_key),
            core,
            core_key,
            memory: IdSet::default(),
            memory_key: String::new(),
            shape: Some(shape),
            matched: None,
            owner: None,
            created_ms,
            missing_since_ms: None,
        }
    }

    /// A memory-only record.
    pub fn for_memory(memory: IdSet, created_ms: u64) -> Self {
        let memory_key = memory.encode();
        Self {
            id: record_id(DeviceKind::Memory, &memory_key),
            core: IdSet::default(),
            core_key: String::new(),
            memory,
            memory_key,
            shape: None,
            matched: None,
            owner: None,
            created_ms,
            missing_since_ms: None,
        }
    }

    /// Set the vcuda-memory half.
    pub fn set_memory(&mut self, memory: IdSet) {
        self.memory_key = memory.encode();
        self.memory = memory;
    }

    /// The cards the container uses, ascending.
    pub fn cards(&self) -> Vec<u32> {
        match &self.shape {
            Some(s) => s.cards(),
            None => self.memory.cards(),
        }
    }

    /// The container holding the IDs: the confirmed owner, else the matched guess.
    pub fn pod(&self) -> Option<&PodRef> {
        self.owner.as_ref().or(self.matched.as_ref())
    }

    /// vcuda-core units held (0 for a memory-only record).
    pub fn cores(&self) -> u32 {
        self.shape.as_ref().map_or(0, CoreShape::cores)
    }

    /// Memory limit in bytes on `card`: a share gets its blocks, a whole card all of its
    /// memory. `None` while a share's memory half is unknown.
    pub fn memory_bytes_on(&self, card: u32, inv: &NodeInventory) -> Option<u64> {
        match &self.shape {
            Some(CoreShape::Whole { .. }) => inv.card(card).map(|c| c.memory_mib * 1024 * 1024),
            _ if self.memory.is_empty() => None,
            _ => Some(u64::from(self.memory.count_on(card)) * BLOCK_BYTES),
        }
    }

    /// Total memory in bytes the container may use, when known.
    pub fn memory_bytes(&self, inv: &NodeInventory) -> Option<u64> {
        let cards = self.cards();
        let mut total = 0u64;
        for c in cards {
            total += self.memory_bytes_on(c, inv)?;
        }
        Some(total)
    }

    /// Cores limit on `card` (100 for a whole card).
    pub fn cores_on(&self, card: u32) -> u32 {
        match &self.shape {
            Some(CoreShape::Share { card: c, cores }) if *c == card => *cores,
            Some(CoreShape::Whole { cards }) if cards.contains(&card) => 100,
            _ => 0,
        }
    }
}

/// The record ID for an encoded ID set: a prefix (`r` for vcuda-core, `m` for memory-only)
/// and the first 20 hex digits of the SHA-256 of the canonical set. Equal sets always give
/// the same ID, so a repeated `Allocate` (after a node reboot) finds the same directory.
pub fn record_id(kind: DeviceKind, key: &str) -> String {
    let mut h = Sha256::new();
    h.update(kind.prefix().as_bytes());
    h.update(b":");
    h.update(key.as_bytes());
    let digest = hex::encode(h.finalize());
    let prefix = match kind {
        DeviceKind::Core => "r",
        DeviceKind::Memory => "m",
    };
    format!("{prefix}-{}", &digest[..20])
}

/// Is `name` shaped like a record ID (so the limiter GC only ever removes our directories)?
pub fn looks_like_record_id(name: &str) -> bool {
    let b = name.as_bytes();
    b.len() == 22
        && (b[0] == b'r' || b[0] == b'm')
        && b[1] == b'-'
        && b[2..]
            .iter()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_ids_are_deterministic_and_recognisable() {
        let a = record_id(DeviceKind::Core, "0:0-29");
        assert_eq!(a, record_id(DeviceKind::Core, "0:0-29"));
        assert_ne!(a, record_id(DeviceKind::Core, "0:0-28"));
        assert_ne!(a, record_id(DeviceKind::Memory, "0:0-29"));
        assert!(a.starts_with("r-"));
        assert!(looks_like_record_id(&a));
        assert!(looks_like_record_id(&record_id(DeviceKind::Memory, "1:3")));
        for not in [
            "r-x",
            "lost+found",
            "r-0123456789abcdef012G",
            "x-0123456789abcdef0123",
        ] {
            assert!(!looks_like_record_id(not), "{not}");
        }
    }

    #[test]
    fn pod_refs_with_an_unknown_uid_still_match() {
        let a = PodRef {
            namespace: "n".into(),
            name: "p".into(),
            uid: String::new(),
            container: "c".into(),
        };
        let b = PodRef {
            uid: "u1".into(),
            ..a.clone()
        };
        let c = PodRef {
            uid: "u2".into(),
            ..a.clone()
        };
        assert!(a.same_container(&b));
        assert!(!b.same_container(&c));
    }
}
