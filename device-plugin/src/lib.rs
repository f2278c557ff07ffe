//! `gpu-manager`: the node daemon serving the kubelet device plugins for `vcuda-core` and
//! `vcuda-memory` (DESIGN §3–§5).
//!
//! The daemon is a library so that tests and benchmarks can run it in-process; the
//! `gpu-manager` binary only parses flags, builds the dependencies and calls [`Daemon::start`].
//!
//! | module | does |
//! |---|---|
//! | [`cli`] | flags (every one also an environment variable) → [`DaemonConfig`]; logging |
//! | [`daemon`] | start-up order, the supervised tasks, graceful shutdown |
//! | [`plugin`] | the two `DevicePlugin` gRPC services |
//! | [`registration`] | serve, register with the kubelet, watch for kubelet restarts |
//! | [`state`] | allocation records, the derived ledger, pairing and decisions, the checkpoint |
//! | [`response`] | `ContainerAllocateResponse` contents and the limiter config file |
//! | [`limiter`] | the ordered writer of limiter config files |
//! | [`hostpids`] | publishes each share container's host pids for the limiter's feedback loop |
//! | [`library`] | installs `libvcuda.so` on the host at a versioned, immutable path |
//! | [`pods`] | the pod source: API server watch or in-memory |
//! | [`podresources`] | the kubelet's pod-resources client (rate-limited) |
//! | [`health`] | XID / lost-card monitoring and re-probing |
//! | [`cluster`] | writes to the API server: pod annotations, with bounded retries |
//! | [`publisher`] | the node's inventory annotation and labels |
//! | [`shared`] | what the running parts share: locked state, device lists, queues |
//! | [`gc`] | reconciling records against pod-resources and the API server |

pub mod cli;
pub mod cluster;
pub mod config;
pub mod daemon;
pub mod error;
pub mod fsutil;
pub mod gc;
pub mod health;
pub mod hostpids;
pub mod library;
pub mod limiter;
pub mod plugin;
pub mod podresources;
pub mod pods;
pub mod publisher;
pub mod registration;
pub mod response;
pub mod shared;
pub mod state;

pub use config::DaemonConfig;
pub use daemon::{Daemon, DaemonHandle, Dependencies};
pub use error::DaemonError;
