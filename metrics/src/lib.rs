//! Metric families, per-container usage collection and the :5678 server.
//!
//! The `gpu-manager` daemon owns the allocation state; it hands this crate a read-only
//! [`SnapshotSource`] and the crate renders metrics, `/usage` and health from it. The GPU
//! backend's process samples are mapped to containers through cgroup files (see the issue for
//! the metrics work).

pub mod snapshot;

pub use snapshot::{CardAllocation, ContainerAllocation, NodeSnapshot, SnapshotSource};
