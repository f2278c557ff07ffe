//! The daemon's own checkpoint: versioned JSON with a SHA-256 checksum, written atomically
//! (temporary file, fsync, rename, fsync of the directory).
//!
//! ```json
//! {"version":1,"checksum":"<sha256 of the data's JSON>","data":{
//!   "node":"gpu-node-1",
//!   "records":[{"id":"r-…","core":"3:0-29","memory":"3:0-7",
//!               "matched":{"namespace":"ml","name":"train","uid":"…","container":"main"},
//!               "owner":{…},"createdMs":1700000000000}]}}
//! ```
//!
//! ID sets use the compact form of [`gm_core::devices::IdSet::encode`].

use std::io;
use std::path::{Path, PathBuf};

use gm_core::devices::{core_shape, IdSet};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::record::{record_id, PodRef, Record};
use super::MAX_IDS;
use crate::fsutil::write_atomic;
use gm_core::devices::DeviceKind;

/// The checkpoint format this build writes and reads.
pub const CHECKPOINT_VERSION: u32 = 1;

/// The checkpoint could not be used.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("cannot read checkpoint {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("checkpoint {} is corrupt: {reason}", path.display())]
    Corrupt { path: PathBuf, reason: String },
    #[error("cannot write checkpoint {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

#[derive(Debug, Serialize, Deserialize)]
struct Envelope {
    version: u32,
    checksum: String,
    data: Data,
}

#[derive(Debug, Serialize, Deserialize)]
struct VersionOnly {
    version: Option<u32>,
}

/// What the checkpoint holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Data {
    pub node: String,
    pub records: Vec<PersistedRecord>,
}

/// One record as persisted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PersistedRecord {
    pub id: String,
    #[serde(default)]
    pub core: String,
    #[serde(default)]
    pub memory: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub matched: Option<PodRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<PodRef>,
    pub created_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub missing_since_ms: Option<u64>,
}

impl PersistedRecord {
    /// Persist a record.
    pub fn from_record(r: &Record) -> Self {
        Self {
            id: r.id.clone(),
            core: r.core_key.clone(),
            memory: r.memory_key.clone(),
            matched: r.matched.clone(),
            owner: r.owner.clone(),
            created_ms: r.created_ms,
            missing_since_ms: r.missing_since_ms,
        }
    }

    /// Back to a record; checks the ID sets' syntax, shape and ID (not the node's ranges).
    pub fn into_record(self) -> Result<Record, String> {
        let core = IdSet::decode(&self.core, MAX_IDS)
            .map_err(|e| format!("record {}: vcuda-core IDs: {e}", self.id))?;
        let memory = IdSet::decode(&self.memory, MAX_IDS)
            .map_err(|e| format!("record {}: vcuda-memory IDs: {e}", self.id))?;
        let mut rec = if core.is_empty() {
            if memory.is_empty() {
                return Err(format!("record {} holds no IDs", self.id));
            }
            Record::for_memory(memory, self.created_ms)
        } else {
            let shape = core_shape(&core).map_err(|e| format!("record {}: {e}", self.id))?;
            let mut r = Record::for_core(core, shape, self.created_ms);
            if !memory.is_empty() {
                r.set_memory(memory);
            }
            r
        };
        let expected = if rec.core_key.is_empty() {
            record_id(DeviceKind::Memory, &rec.memory_key)
        } else {
            record_id(DeviceKind::Core, &rec.core_key)
        };
        if expected != self.id {
            return Err(format!(
                "record {} does not match its IDs (expected {expected})",
                self.id
            ));
        }
        rec.matched = self.matched;
        rec.owner = self.owner;
        rec.missing_since_ms = self.missing_since_ms;
        Ok(rec)
    }
}

fn checksum(data: &Data) -> String {
    // Serialising plain structs, strings and integers cannot fail.
    let bytes = serde_json::to_vec(data).unwrap_or_default();
    hex::encode(Sha256::digest(&bytes))
}

/// The bytes of a checkpoint holding `data`.
pub fn encode(data: Data) -> Vec<u8> {
    let env = Envelope {
        version: CHECKPOINT_VERSION,
        checksum: checksum(&data),
        data,
    };
    serde_json::to_vec(&env).unwrap_or_default()
}

/// Decode checkpoint bytes, checking version and checksum.
pub fn decode(path: &Path, bytes: &[u8]) -> Result<Data, CheckpointError> {
    let corrupt = |reason: String| CheckpointError::Corrupt {
        path: path.to_path_buf(),
        reason,
    };
    let v: VersionOnly =
        serde_json::from_slice(bytes).map_err(|e| corrupt(format!("not valid JSON: {e}")))?;
    match v.version {
        Some(CHECKPOINT_VERSION) => {}
        Some(other) => {
            return Err(corrupt(format!(
                "it has format version {other}; this build reads version {CHECKPOINT_VERSION}"
            )))
        }
        None => return Err(corrupt("it has no format version".into())),
    }
    let env: Envelope =
        serde_json::from_slice(bytes).map_err(|e| corrupt(format!("unexpected content: {e}")))?;
    let actual = checksum(&env.data);
    if actual != env.checksum {
        return Err(corrupt(format!(
            "checksum mismatch (recorded {}, computed {actual})",
            env.checksum
        )));
    }
    Ok(env.data)
}

/// Read the checkpoint at `path`. `Ok(None)`: there is none.
pub fn load(path: &Path) -> Result<Option<Data>, CheckpointError> {
    match std::fs::read(path) {
        Ok(bytes) => decode(path, &bytes).map(Some),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(CheckpointError::Read {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Write the checkpoint durably and atomically.
pub fn store(path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
    write_atomic(path, bytes, true).map_err(|source| CheckpointError::Write {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use gm_core::devices::DeviceKind;

    fn data() -> Data {
        let core = IdSet::parse(
            DeviceKind::Core,
            &(0..30).map(|k| format!("vcore-1-{k}")).collect::<Vec<_>>(),
            &gm_core::NodeInventory::uniform(2, "T", 16384, gm_core::Link::Phb),
        )
        .unwrap();
        let shape = core_shape(&core).unwrap();
        let mut r = Record::for_core(core, shape, 17);
        r.owner = Some(PodRef {
            namespace: "ns".into(),
            name: "p".into(),
            uid: "u".into(),
            container: "c".into(),
        });
        Data {
            node: "n1".into(),
            records: vec![PersistedRecord::from_record(&r)],
        }
    }

    #[test]
    fn a_checkpoint_round_trips_through_disk() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("cp.json");
        assert!(load(&p).unwrap().is_none());
        store(&p, &encode(data())).unwrap();
        let back = load(&p).unwrap().unwrap();
        assert_eq!(back, data());
        let rec = back.records[0].clone().into_record().unwrap();
        assert_eq!(rec.core_key, "1:0-29");
        assert_eq!(rec.owner.unwrap().container, "c");
    }

    #[test]
    fn tampering_is_detected_by_the_checksum() {
        let bytes = String::from_utf8(encode(data())).unwrap();
        let tampered = bytes.replace("1:0-29", "1:0-39");
        let e = decode(Path::new("/x/cp.json"), tampered.as_bytes()).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("checkpoint /x/cp.json is corrupt: checksum mismatch"),
            "{e}"
        );
    }

    #[test]
    fn garbage_and_future_versions_are_reported_as_corrupt() {
        let e = decode(Path::new("cp"), b"{\"version\":1,\"chec").unwrap_err();
        assert!(e.to_string().contains("not valid JSON"), "{e}");
        let e = decode(Path::new("cp"), br#"{"version":7}"#).unwrap_err();
        assert!(e.to_string().contains("format version 7"), "{e}");
        let e = decode(Path::new("cp"), br#"{"records":[]}"#).unwrap_err();
        assert!(e.to_string().contains("no format version"), "{e}");
    }

    #[test]
    fn a_record_whose_id_does_not_match_its_ids_is_refused() {
        let mut d = data();
        d.records[0].id = "r-00000000000000000000".into();
        let e = d.records[0].clone().into_record().unwrap_err();
        assert!(e.contains("does not match its IDs"), "{e}");
    }
}
