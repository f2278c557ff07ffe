//! Why a fake could not start or a call could not be made.

use std::path::PathBuf;

/// An error of the fakes' fallible constructors and calls.
#[derive(Debug, thiserror::Error)]
pub enum TestkitError {
    /// A directory could not be created.
    #[error("cannot create directory {}: {source}", path.display())]
    Directory {
        /// The directory.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// A socket could not be served or dialled.
    #[error(transparent)]
    Socket(#[from] gm_proto::uds::UdsError),
    /// Something else is already serving a socket we were asked to serve.
    #[error("{} is already served by another process (a kubelet or another kubelet-sim); stop it or use another directory", path.display())]
    InUse {
        /// The socket path.
        path: PathBuf,
    },
    /// No plugin registered the resource.
    #[error("no device plugin registered {resource} with this kubelet (registered: {registered})")]
    NotRegistered {
        /// The resource asked for.
        resource: String,
        /// What is registered, comma-separated, or `none`.
        registered: String,
    },
}
