//! Errors that stop the daemon from starting or running.

use std::path::PathBuf;

/// Why the daemon could not start (or had to stop). Every message names what failed and what
/// to check.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The GPU backend failed; its message is shown as is (it names the node file, line and
    /// problem for the simulated backend).
    #[error("{0}")]
    Backend(#[from] gm_backend::BackendError),

    /// A directory the daemon needs could not be created or used.
    #[error("cannot use directory {}: {source}; check that it exists and is writable by the daemon", path.display())]
    Directory {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The kubelet directory is the checkpoint directory: the kubelet deletes files there.
    #[error("--checkpoint-dir {} is the kubelet's device-plugin directory, which the kubelet cleans on restart; use a directory of its own such as /var/lib/gpu-manager", path.display())]
    CheckpointInKubeletDir { path: PathBuf },

    /// The node has no GPU cards.
    #[error("the {backend} backend found no GPU cards on this node; nothing to serve")]
    NoCards { backend: String },

    /// The metrics server could not start (e.g. --metrics-addr is taken).
    #[error("metrics server: {0}")]
    Metrics(String),

    /// The inventory the backend produced is too large for device IDs.
    #[error("{0}")]
    Inventory(String),
}
