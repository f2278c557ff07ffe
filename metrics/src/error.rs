//! Errors of the metrics server.

use std::net::SocketAddr;

/// What can stop the metrics server from starting or running.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// A flag has a value that cannot be used.
    #[error("invalid metrics configuration: {0}")]
    Config(String),
    /// The listen address could not be bound.
    #[error("cannot listen on {addr} for metrics: {source}; choose another --metrics-addr or stop whatever uses the port")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The server failed while running.
    #[error("metrics server failed: {0}")]
    Serve(#[source] std::io::Error),
}
