//! The admission half of `gpu-admission` (DESIGN §7): a validating and mutating webhook for
//! GPU pods and the pod templates of workloads, with per-model/pool GPU quota.
//!
//! * [`review::parse_review`] reads AdmissionReview v1 bodies (pure; fuzzed);
//! * [`rules`] are the request-shape, card-memory and reserved-annotation rules;
//! * [`quota`] enforces GpuQuota ([`crd`]) and the old gpuquota ConfigMap, and publishes usage;
//! * [`mutate`] sets `schedulerName` and a default vcuda-memory (opt-in);
//! * [`tls`] serves the certificate from files and reloads it on change;
//! * [`server`] runs it all over HTTPS ([`run_webhook`]).
//!
//! The binary (`gpu-admission serve`) flattens [`WebhookArgs`] into its command line and
//! passes the extender's cluster cache as a [`ClusterView`].

pub mod args;
pub mod certgen;
pub mod cluster;
pub mod crd;
pub mod mutate;
pub mod quota;
pub mod review;
pub mod rules;
pub mod server;
pub mod tls;
pub mod webhook;

pub use args::{Settings, WebhookArgs};
pub use cluster::{ClusterView, InMemoryCluster};
pub use crd::{crd_yaml, GpuQuota, GpuQuotaLimit, GpuQuotaSpec, GpuQuotaStatus, GpuQuotaUsage};
pub use review::{parse_review, Review, ReviewError};
pub use server::{router, run_webhook, start_webhook, RunningWebhook, WebhookError};
pub use webhook::Webhook;
