//! Errors of the GPU backends.

use std::path::PathBuf;

use nvml_wrapper::error::NvmlError;

/// What can go wrong in a backend. Every message names what failed and, where the user can
/// act, what to do.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The NVML library could not be loaded or initialised.
    #[error("NVML not available: {cause}. {hint}")]
    NvmlUnavailable {
        /// What NVML or the loader said.
        cause: String,
        /// What to check.
        hint: String,
    },

    /// An NVML call failed.
    #[error("NVML call {call} failed for {target}: {source}")]
    Nvml {
        /// The NVML function (wrapper name).
        call: &'static str,
        /// The card (uuid or NVML index) or "the system".
        target: String,
        /// NVML's error.
        #[source]
        source: NvmlError,
    },

    /// The node description file could not be read.
    #[error("cannot read node file {}: {source}", path.display())]
    ReadNodeFile {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },

    /// The node description is invalid.
    #[error("node file {file}{}: {message}", location(*line, *column))]
    NodeFile {
        /// The file name (or the name given to `from_str`).
        file: String,
        /// 1-based line of the problem, when known.
        line: Option<usize>,
        /// 1-based column of the problem, when known.
        column: Option<usize>,
        /// What is wrong and what is allowed.
        message: String,
    },

    /// The cards reported by NVML do not form a valid inventory.
    #[error("NVML reported an inconsistent inventory: {0}")]
    Inventory(#[from] gm_core::inventory::InventoryError),

    /// NVML answered with a value that makes no sense.
    #[error("NVML reported {0}")]
    NvmlValue(String),

    /// A card uuid the backend does not know.
    #[error("unknown card {uuid:?}: this node's cards are {known}")]
    UnknownCard {
        /// The uuid asked for.
        uuid: String,
        /// The uuids the backend knows, comma-separated.
        known: String,
    },

    /// The NVML event watcher thread is gone.
    #[error("NVML event watcher stopped: {0}")]
    WatcherStopped(String),
}

fn location(line: Option<usize>, column: Option<usize>) -> String {
    match (line, column) {
        (Some(l), Some(c)) => format!(", line {l} column {c}"),
        (Some(l), None) => format!(", line {l}"),
        _ => String::new(),
    }
}
