//! Errors of starting and running the extender.

use std::net::SocketAddr;

/// Why the extender could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ExtenderError {
    /// A flag has a value that cannot work.
    #[error("{flag}: {problem}")]
    Flag { flag: &'static str, problem: String },
    /// The HTTP listener could not be opened.
    #[error("cannot listen on {addr} for the extender API: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// The HTTP server failed.
    #[error("extender HTTP server failed: {0}")]
    Serve(#[source] std::io::Error),
    /// The metrics registry refused a family (a programming error, reported instead of a panic).
    #[error("metrics registry: {0}")]
    Metrics(#[from] prometheus::Error),
}
