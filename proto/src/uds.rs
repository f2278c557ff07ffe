//! tonic over a Unix domain socket (plain HTTP/2, no TLS), the transport of every kubelet API.
//!
//! Client side: [`connect`] dials a socket path and returns a [`Channel`] for any generated
//! client. Server side: [`bind`] creates the socket (replacing a stale one) and [`incoming`]
//! turns the listener into the stream `Server::builder().serve_with_incoming(...)` expects.

use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::{UnixListener, UnixStream};
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::{Channel, Endpoint, Uri};

/// How long [`connect`] waits for the socket to accept and the HTTP/2 connection to come up.
/// Matches the kubelet's own dial timeout for plugin sockets.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Placeholder URI for the channel. The host is only sent as `:authority`; `localhost` is
/// what the kubelet's own gRPC client sends on its Unix sockets.
const DUMMY_URI: &str = "http://localhost";

/// Why a Unix socket could not be dialled or served. Every variant names the socket path.
#[derive(Debug, thiserror::Error)]
pub enum UdsError {
    /// Nothing exists at the path: the server is not running or uses another path.
    #[error("unix socket {} does not exist (is the server running and is the path right?)", path.display())]
    NotFound {
        /// The socket path that was given.
        path: PathBuf,
    },
    /// Something other than a socket exists at the path.
    #[error("{} exists but is not a unix socket", path.display())]
    NotASocket {
        /// The path that was given.
        path: PathBuf,
    },
    /// The path could not be inspected (for example, permission denied).
    #[error("cannot access unix socket {}: {source}", path.display())]
    Access {
        /// The socket path that was given.
        path: PathBuf,
        /// The underlying I/O error.
        source: io::Error,
    },
    /// The socket exists but the connection failed (refused, reset, HTTP/2 failure, ...).
    #[error("cannot connect to unix socket {}: {reason}", path.display())]
    Connect {
        /// The socket path that was given.
        path: PathBuf,
        /// The root cause, flattened into one message.
        reason: String,
    },
    /// The connection did not come up within the timeout.
    #[error("timed out after {timeout:?} connecting to unix socket {}", path.display())]
    Timeout {
        /// The socket path that was given.
        path: PathBuf,
        /// The timeout that expired.
        timeout: Duration,
    },
    /// A stale socket file could not be removed before binding.
    #[error("cannot remove stale unix socket {}: {source}", path.display())]
    RemoveStale {
        /// The socket path that was given.
        path: PathBuf,
        /// The underlying I/O error.
        source: io::Error,
    },
    /// Listening on the path failed.
    #[error("cannot listen on unix socket {}: {source}", path.display())]
    Bind {
        /// The socket path that was given.
        path: PathBuf,
        /// The underlying I/O error.
        source: io::Error,
    },
}

/// Opens a gRPC channel to the server listening on the Unix socket `path`, waiting at most
/// [`DEFAULT_CONNECT_TIMEOUT`].
///
/// Fails fast with an error naming the path if the socket does not exist, is not a socket,
/// or refuses the connection. The channel re-dials the same path if the connection drops later.
pub async fn connect(path: impl AsRef<Path>) -> Result<Channel, UdsError> {
    connect_with_timeout(path, DEFAULT_CONNECT_TIMEOUT).await
}

/// Like [`connect`], with a caller-chosen bound on the whole connection set-up.
pub async fn connect_with_timeout(
    path: impl AsRef<Path>,
    timeout: Duration,
) -> Result<Channel, UdsError> {
    let path = path.as_ref().to_path_buf();
    check_is_socket(&path)?;

    let endpoint = Endpoint::from_static(DUMMY_URI);
    let dial_path = Arc::new(path.clone());
    let connector = tower::service_fn(move |_: Uri| {
        let dial_path = Arc::clone(&dial_path);
        async move {
            let stream = UnixStream::connect(dial_path.as_path()).await?;
            Ok::<_, io::Error>(TokioIo::new(stream))
        }
    });

    match tokio::time::timeout(timeout, endpoint.connect_with_connector(connector)).await {
        Err(_elapsed) => Err(UdsError::Timeout { path, timeout }),
        Ok(Err(err)) => Err(UdsError::Connect {
            path,
            reason: root_cause(&err),
        }),
        Ok(Ok(channel)) => Ok(channel),
    }
}

/// Listens on the Unix socket `path`, first removing a stale socket file left there by an
/// earlier run. Refuses to remove anything that is not a socket.
///
/// Must be called from within a tokio runtime.
pub async fn bind(path: impl AsRef<Path>) -> Result<UnixListener, UdsError> {
    let path = path.as_ref().to_path_buf();
    match check_is_socket(&path) {
        Ok(()) => {
            if let Err(source) = std::fs::remove_file(&path) {
                if source.kind() != io::ErrorKind::NotFound {
                    return Err(UdsError::RemoveStale { path, source });
                }
            }
        }
        Err(UdsError::NotFound { .. }) => {}
        Err(other) => return Err(other),
    }
    UnixListener::bind(&path).map_err(|source| UdsError::Bind { path, source })
}

/// Turns a listener into the connection stream for
/// `tonic::transport::Server::builder().add_service(..).serve_with_incoming(..)`.
pub fn incoming(listener: UnixListener) -> UnixListenerStream {
    UnixListenerStream::new(listener)
}

fn check_is_socket(path: &Path) -> Result<(), UdsError> {
    match std::fs::metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => Ok(()),
        Ok(_) => Err(UdsError::NotASocket {
            path: path.to_path_buf(),
        }),
        Err(source) if source.kind() == io::ErrorKind::NotFound => Err(UdsError::NotFound {
            path: path.to_path_buf(),
        }),
        Err(source) => Err(UdsError::Access {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// The innermost error message of a chain; tonic's own top level only says "transport error".
fn root_cause(err: &(dyn std::error::Error + 'static)) -> String {
    let mut current = err;
    while let Some(next) = current.source() {
        current = next;
    }
    current.to_string()
}
