//! The extender's Prometheus metrics, served on `/metrics`.
//!
//! | family | type | labels | meaning |
//! |---|---|---|---|
//! | `gpu_admission_extender_decision_seconds` | histogram | `verb` | time to answer one request, parse to response |
//! | `gpu_admission_extender_decisions_total` | counter | `verb`, `outcome` | answers by outcome |
//! | `gpu_admission_extender_bind_gate_seconds` | histogram | | time binds waited at the admission gate (only binds that waited) |
//! | `gpu_admission_extender_bind_gate_timeouts_total` | counter | | binds refused because the gate stayed closed for `--bind-gate-timeout` |
//! | `gpu_admission_extender_reservations` | gauge | | in-flight reservations |
//! | `gpu_admission_extender_pending_charges` | gauge | | pod charges that do not fit their node |
//! | `gpu_admission_extender_gpu_pods` | gauge | | live GPU pods known |
//! | `gpu_admission_extender_gpu_nodes` | gauge | | nodes with a valid inventory |
//! | `gpu_admission_extender_cache_synced` | gauge | | 1 once both informers listed |
//! | `gpu_admission_extender_leader` | gauge | | 1 while this replica leads (always 1 without `--leader-elect`) |

use std::time::Duration;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};

use crate::state::ClusterState;

/// Outcomes counted per verb.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// At least one node fits (filter / predicates) or scores were given (prioritize).
    Fit,
    /// No node fits.
    NoFit,
    /// Not a GPU pod: every candidate passed unchanged.
    Passthrough,
    /// The pod was bound.
    Bound,
    /// The request was refused (bad input, invalid pod, bind failure).
    Error,
    /// Not ready (cache not synced, or not the leader).
    Unavailable,
    /// The body was not valid JSON for the verb.
    BadRequest,
}

impl Outcome {
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Fit => "fit",
            Outcome::NoFit => "no_fit",
            Outcome::Passthrough => "passthrough",
            Outcome::Bound => "bound",
            Outcome::Error => "error",
            Outcome::Unavailable => "unavailable",
            Outcome::BadRequest => "bad_request",
        }
    }
}

/// The metric families, in their own registry.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    latency: HistogramVec,
    outcomes: IntCounterVec,
    gate_wait: Histogram,
    gate_timeouts: IntCounter,
    reservations: IntGauge,
    pending: IntGauge,
    pods: IntGauge,
    nodes: IntGauge,
    synced: IntGauge,
    leader: IntGauge,
}

impl Metrics {
    /// Create and register every family.
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "gpu_admission_extender_decision_seconds",
                "Time to answer one extender request, from body to response, by verb.",
            )
            .buckets(vec![
                0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1,
                0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
            &["verb"],
        )?;
        let outcomes = IntCounterVec::new(
            Opts::new(
                "gpu_admission_extender_decisions_total",
                "Extender answers by verb and outcome.",
            ),
            &["verb", "outcome"],
        )?;
        let gate_wait = Histogram::with_opts(
            HistogramOpts::new(
                "gpu_admission_extender_bind_gate_seconds",
                "Time binds waited at the admission gate for same-sized pods on other cards to get their devices (binds that waited).",
            )
            .buckets(vec![0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
        )?;
        let gate_timeouts = IntCounter::new(
            "gpu_admission_extender_bind_gate_timeouts_total",
            "Binds refused because the admission gate stayed closed for --bind-gate-timeout.",
        )?;
        let gauge = |name: &str, help: &str| IntGauge::new(name, help);
        let reservations = gauge(
            "gpu_admission_extender_reservations",
            "In-flight reservations the pod informer has not shown yet.",
        )?;
        let pending = gauge(
            "gpu_admission_extender_pending_charges",
            "Pod charges that do not fit their node's cards (over-commit or missing inventory).",
        )?;
        let pods = gauge("gpu_admission_extender_gpu_pods", "Live GPU pods known.")?;
        let nodes = gauge(
            "gpu_admission_extender_gpu_nodes",
            "Nodes with a valid card inventory.",
        )?;
        let synced = gauge(
            "gpu_admission_extender_cache_synced",
            "1 once the node and pod informers have listed everything.",
        )?;
        let leader = gauge(
            "gpu_admission_extender_leader",
            "1 while this replica is the leader and serves decisions.",
        )?;
        registry.register(Box::new(latency.clone()))?;
        registry.register(Box::new(outcomes.clone()))?;
        registry.register(Box::new(gate_wait.clone()))?;
        registry.register(Box::new(gate_timeouts.clone()))?;
        for g in [&reservations, &pending, &pods, &nodes, &synced, &leader] {
            registry.register(Box::new(g.clone()))?;
        }
        Ok(Self {
            registry,
            latency,
            outcomes,
            gate_wait,
            gate_timeouts,
            reservations,
            pending,
            pods,
            nodes,
            synced,
            leader,
        })
    }

    /// Count one answer.
    pub fn observe(&self, verb: &str, outcome: Outcome, elapsed: Duration) {
        self.latency
            .with_label_values(&[verb])
            .observe(elapsed.as_secs_f64());
        self.outcomes
            .with_label_values(&[verb, outcome.label()])
            .inc();
    }

    /// A bind that waited at the admission gate: for `waited`, then passed or timed out.
    pub fn observe_gate(&self, waited: Duration, timed_out: bool) {
        self.gate_wait.observe(waited.as_secs_f64());
        if timed_out {
            self.gate_timeouts.inc();
        }
    }

    /// The text exposition, with the gauges read from `state` now.
    pub fn render(&self, state: &ClusterState, leader: bool) -> String {
        let clamp = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        self.reservations.set(clamp(state.reservation_count()));
        self.pending.set(clamp(state.pending_charge_count()));
        self.pods.set(clamp(state.gpu_pod_count()));
        self.nodes.set(clamp(state.gpu_node_count()));
        self.synced.set(i64::from(state.is_synced()));
        self.leader.set(i64::from(leader));
        let mut buf = Vec::new();
        // Encoding our own families into a Vec cannot fail; an error would only drop the body.
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::warn!(error = %e, "cannot encode metrics");
        }
        String::from_utf8_lossy(&buf).into_owned()
    }

    /// The registry, for a binary that wants to serve these families elsewhere too.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }
}
