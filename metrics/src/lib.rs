//! Metric families, per-container usage collection and the :5678 server.
//!
//! The `gpu-manager` daemon owns the allocation state; it hands this crate a read-only
//! [`SnapshotSource`] and its [`gm_backend::GpuBackend`], and the crate serves metrics,
//! `/usage` and health from them:
//!
//! * [`cgroup`]: host PID → container, through `/proc/<pid>/cgroup` or the cgroup tree
//!   (cgroup v1 and v2, cgroupfs and systemd drivers, containerd, CRI-O and Docker);
//! * [`report`]: one usage sample joined with the snapshot ([`NodeReport`]);
//! * [`families`]: the TKEStack families and the `gpu_manager_` families;
//! * [`exposition`]: Prometheus text and OpenMetrics;
//! * [`usage_table`]: the human-readable `/usage`;
//! * [`server`]: the HTTP endpoints ([`serve`], [`router`], [`MetricsServer`]).
//!
//! ```no_run
//! # async fn run(
//! #     source: std::sync::Arc<dyn gm_metrics::SnapshotSource>,
//! #     backend: std::sync::Arc<dyn gm_backend::GpuBackend>,
//! # ) -> Result<(), gm_metrics::MetricsError> {
//! let config = gm_metrics::MetricsConfig::default(); // or MetricsArgs::into_config
//! gm_metrics::serve(config, source, backend, async {
//!     let _ = tokio::signal::ctrl_c().await;
//! })
//! .await
//! # }
//! ```

pub mod cgroup;
pub mod error;
pub mod exposition;
pub mod families;
pub mod report;
pub mod server;
pub mod snapshot;
pub mod usage_table;

pub use cgroup::{CgroupConfig, CgroupDriver, CgroupVersion, PidResolver};
pub use error::MetricsError;
pub use exposition::Format;
pub use report::{NodeReport, UsageSample};
pub use server::{router, serve, MetricsArgs, MetricsConfig, MetricsServer};
pub use snapshot::{CardAllocation, ContainerAllocation, NodeSnapshot, SnapshotSource};
