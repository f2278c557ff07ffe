//! The HTTP API: the extender verbs under `/scheduler/`, plus `/healthz`, `/readyz` and
//! `/metrics`.
//!
//! | route | body | answer |
//! |---|---|---|
//! | `POST /scheduler/filter` | `ExtenderArgs` | `ExtenderFilterResult`: every node that fits |
//! | `POST /scheduler/prioritize` | `ExtenderArgs` | `HostPriorityList`, 0–10 |
//! | `POST /scheduler/bind` | `ExtenderBindingArgs` | `ExtenderBindingResult` |
//! | `POST /scheduler/predicates` | `ExtenderArgs` | `ExtenderFilterResult` with one node (legacy gpu-admission) |
//!
//! Every logical outcome is HTTP 200 with the verb's JSON (errors in its `Error` field), except
//! a body that is not valid JSON for the verb (400, with the parser's message) and a replica
//! that is not ready (503: caches not synced, or not the leader), which kube-scheduler treats
//! as a failed call and retries.

use std::sync::{Arc, RwLockReadGuard};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use kube::Client;
use serde::Serialize;

use crate::args::Settings;
use crate::decide::{shape_key, PodContext, Reason, Screen};
use crate::leader::Leadership;
use crate::metrics::{Metrics, Outcome};
use crate::policy::ExtenderPolicy;
use crate::state::{ClusterState, GpuPod, Inner, NotGpu};
use crate::wire::{
    ExtenderArgs, ExtenderBindingArgs, ExtenderBindingResult, ExtenderFilterResult, HostPriority,
    Mode,
};

/// Everything a request needs: the state, the API client, settings and metrics. Cheap to clone.
#[derive(Debug, Clone)]
pub struct App {
    shared: Arc<Shared>,
}

pub(crate) struct Shared {
    pub state: Arc<ClusterState>,
    pub client: Client,
    pub policy: ExtenderPolicy,
    pub api_timeout: Duration,
    pub bind_gate_timeout: Duration,
    pub bind_gate_window: Duration,
    pub max_body_bytes: usize,
    pub metrics: Metrics,
    pub leadership: Arc<Leadership>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("policy", &self.policy)
            .field("api_timeout", &self.api_timeout)
            .field("leader", &self.leadership.is_leader())
            .finish_non_exhaustive()
    }
}

/// How a pod request classified.
pub(crate) enum Classified {
    Plain,
    Invalid(String),
    Gpu(Box<GpuPod>, ExtenderPolicy),
}

impl App {
    /// An application over `state`, calling the API server through `client` (used by bind and
    /// predicates only).
    pub fn new(
        state: Arc<ClusterState>,
        client: Client,
        settings: &Settings,
        leadership: Arc<Leadership>,
        metrics: Metrics,
    ) -> Self {
        Self {
            shared: Arc::new(Shared {
                state,
                client,
                policy: settings.policy,
                api_timeout: settings.api_timeout,
                bind_gate_timeout: settings.bind_gate_timeout,
                bind_gate_window: settings.bind_gate_window,
                max_body_bytes: settings.max_body_bytes,
                metrics,
                leadership,
            }),
        }
    }

    pub(crate) fn shared(&self) -> &Shared {
        &self.shared
    }

    /// The cluster state.
    pub fn state(&self) -> &Arc<ClusterState> {
        &self.shared.state
    }

    /// The metric families.
    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    /// Ready to decide: caches synced and, with leader election, leading.
    pub fn ready(&self) -> Result<(), &'static str> {
        if !self.shared.state.is_synced() {
            return Err("the node and pod caches have not synced yet");
        }
        if !self.shared.leadership.is_leader() {
            return Err("this replica is not the leader");
        }
        Ok(())
    }

    /// Read the pod of a request: not ours, invalid (with the message), or a GPU pod with the
    /// policy that places it.
    pub(crate) fn classify(&self, pod: &k8s_openapi::api::core::v1::Pod) -> Classified {
        let state = &self.shared.state;
        match GpuPod::parse(pod, state.names(), state.keys()) {
            Err(NotGpu::Plain) => Classified::Plain,
            Err(NotGpu::Invalid(m)) => Classified::Invalid(format!("pod {}: {m}", pod_name(pod))),
            Ok(p) => match p.annotations.policy.as_deref().filter(|s| !s.is_empty()) {
                None => Classified::Gpu(Box::new(p), self.shared.policy),
                Some(name) => match name.parse::<ExtenderPolicy>() {
                    Ok(policy) => Classified::Gpu(Box::new(p), policy),
                    Err(e) => Classified::Invalid(format!(
                        "pod {}: annotation {}: {e}",
                        pod_name(pod),
                        state.keys().policy
                    )),
                },
            },
        }
    }

    /// The filter verb: every candidate that fits, and a reason for each one that does not.
    ///
    /// Deciding formats nothing: the reasons are worded when the answer is serialized (or
    /// [`FilterAnswer::into_result`] is called), under the same read lock as the decision.
    pub fn filter<'s, 'a>(&'s self, args: &'a ExtenderArgs<'a>) -> FilterAnswer<'s, 'a> {
        let ready = |outcome, result| FilterAnswer {
            outcome,
            args,
            body: AnswerBody::Ready(result),
        };
        let Some(pod) = args.pod.as_ref() else {
            return ready(
                Outcome::Error,
                ExtenderFilterResult::error("ExtenderArgs has no Pod"),
            );
        };
        if args.nodes.is_none() && args.node_names.is_none() {
            return ready(
                Outcome::Error,
                ExtenderFilterResult::error("ExtenderArgs has neither Nodes nor NodeNames"),
            );
        }
        let (gpu, policy) = match self.classify(pod) {
            Classified::Plain => {
                return ready(
                    Outcome::Passthrough,
                    ExtenderFilterResult::passthrough(args),
                )
            }
            Classified::Invalid(m) => return ready(Outcome::Error, ExtenderFilterResult::error(m)),
            Classified::Gpu(p, policy) => (p, policy),
        };
        let names = args.candidate_names();
        let inner = self.shared.state.read();
        let own_node = inner.context(&gpu, policy).own_node;
        let ctx = PodContext {
            pod: &gpu,
            policy,
            own_node: own_node.clone(),
        };
        let json = args.node_names_json.map(|r| r.get().as_bytes());
        let resolution = self.shared.state.resolve_cached(&inner, &names, json);
        let screen = inner.screen(&ctx, &resolution.slots);
        self.shared
            .state
            .remember(inner.memo(&ctx, &screen, args, &names));
        FilterAnswer {
            outcome: if screen.fits.is_empty() {
                Outcome::NoFit
            } else {
                Outcome::Fit
            },
            args,
            body: AnswerBody::Decided(Box::new(Decided {
                inner,
                pod: gpu,
                policy,
                own_node,
                names,
                screen,
                args,
            })),
        }
    }

    /// The prioritize verb: 0–10 per candidate from the pod's policy (0 for nodes that do not
    /// fit; every node 0 for a pod that is not ours).
    pub fn prioritize<'a>(
        &self,
        args: &'a ExtenderArgs<'_>,
    ) -> Result<(Outcome, Vec<HostPriority<'a>>), String> {
        let pod = args.pod.as_ref().ok_or("ExtenderArgs has no Pod")?;
        let names = args.candidate_names();
        let zero = |names: &[&'a str]| {
            names
                .iter()
                .map(|&host| HostPriority { host, score: 0 })
                .collect()
        };
        let (gpu, policy) = match self.classify(pod) {
            Classified::Plain => return Ok((Outcome::Passthrough, zero(&names))),
            Classified::Invalid(m) => return Err(m),
            Classified::Gpu(p, policy) => (p, policy),
        };
        let memo = self.shared.state.recall();
        let inner = self.shared.state.read();
        let json = args.node_names_json.map(|r| r.get().as_bytes());
        let scores = inner.priorities(&inner.context(&gpu, policy), &names, json, memo.as_deref());
        drop(inner);
        let outcome = if scores.iter().any(|&s| s > 0) || names.is_empty() {
            Outcome::Fit
        } else {
            Outcome::NoFit
        };
        Ok((
            outcome,
            names
                .iter()
                .zip(scores)
                .map(|(&host, score)| HostPriority { host, score })
                .collect(),
        ))
    }
}

/// The answer of the filter verb, holding the decision until it is written out.
pub struct FilterAnswer<'s, 'a> {
    outcome: Outcome,
    args: &'a ExtenderArgs<'a>,
    body: AnswerBody<'s, 'a>,
}

enum AnswerBody<'s, 'a> {
    Ready(ExtenderFilterResult<'a>),
    Decided(Box<Decided<'s, 'a>>),
}

struct Decided<'s, 'a> {
    inner: RwLockReadGuard<'s, Inner>,
    pod: Box<GpuPod>,
    policy: ExtenderPolicy,
    own_node: Option<Arc<str>>,
    names: Vec<&'a str>,
    screen: Screen,
    args: &'a ExtenderArgs<'a>,
}

impl std::fmt::Debug for FilterAnswer<'_, '_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FilterAnswer")
            .field("outcome", &self.outcome)
            .field("passing", &self.passing().len())
            .finish_non_exhaustive()
    }
}

impl<'a> Decided<'_, 'a> {
    fn result(&self) -> ExtenderFilterResult<'a> {
        let ctx = PodContext {
            pod: &self.pod,
            policy: self.policy,
            own_node: self.own_node.clone(),
        };
        let names = &self.names;
        let mut out = ExtenderFilterResult::default();
        match self.args.mode() {
            Mode::NodeNames => {
                out.node_names = Some(self.screen.fits.iter().map(|&(i, _)| names[i]).collect())
            }
            Mode::Nodes => {
                let items = self
                    .args
                    .nodes
                    .as_ref()
                    .map(|l| l.items.as_slice())
                    .unwrap_or(&[]);
                out.nodes = Some(
                    self.screen
                        .fits
                        .iter()
                        .map(|&(i, _)| items[i].raw)
                        .collect(),
                );
            }
        }
        let shape = shape_key(&ctx);
        for &(i, j, miss) in &self.screen.misses {
            let Reason { text, unresolvable } = self.inner.explain_cached(&ctx, shape, j, miss);
            if unresolvable {
                out.failed_and_unresolvable.push((names[i], text));
            } else {
                out.failed_nodes.push((names[i], text));
            }
        }
        out
    }
}

impl<'a> FilterAnswer<'_, 'a> {
    /// How the request turned out.
    pub fn outcome(&self) -> Outcome {
        self.outcome
    }

    /// The names of the nodes that pass, in request order.
    pub fn passing(&self) -> Vec<&'a str> {
        match &self.body {
            AnswerBody::Ready(r) => match &r.node_names {
                Some(n) => n.clone(),
                None if self.outcome == Outcome::Passthrough => self.args.candidate_names(),
                None => Vec::new(),
            },
            AnswerBody::Decided(d) => d.screen.fits.iter().map(|&(i, _)| d.names[i]).collect(),
        }
    }

    /// Word every reason and release the lock.
    pub fn into_result(self) -> ExtenderFilterResult<'a> {
        match self.body {
            AnswerBody::Ready(r) => r,
            AnswerBody::Decided(d) => d.result(),
        }
    }
}

impl Serialize for FilterAnswer<'_, '_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match &self.body {
            AnswerBody::Ready(r) => r.serialize(s),
            AnswerBody::Decided(d) => d.result().serialize(s),
        }
    }
}

/// `namespace/name` of a pod object.
pub(crate) fn pod_name(pod: &k8s_openapi::api::core::v1::Pod) -> String {
    format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or(""),
        pod.metadata.name.as_deref().unwrap_or("")
    )
}

/// The extender's routes over `app`.
pub fn router(app: App) -> Router {
    let limit = app.shared.max_body_bytes;
    Router::new()
        .route("/scheduler/filter", post(filter_handler))
        .route("/scheduler/prioritize", post(prioritize_handler))
        .route("/scheduler/bind", post(bind_handler))
        .route("/scheduler/predicates", post(predicates_handler))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz_handler))
        .route("/metrics", get(metrics_handler))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(app)
}

#[derive(Serialize)]
struct ErrorBody {
    #[serde(rename = "Error")]
    error: String,
}

fn json<T: Serialize>(status: StatusCode, body: &T) -> Response {
    match serde_json::to_vec(body) {
        Ok(bytes) => (status, [(header::CONTENT_TYPE, "application/json")], bytes).into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot encode the answer: {e}"),
        )
            .into_response(),
    }
}

fn error_response(status: StatusCode, message: String) -> Response {
    json(status, &ErrorBody { error: message })
}

/// Refuse politely when not ready, so the scheduler retries (on the leader).
fn gate(app: &App, verb: &'static str, start: Instant) -> Option<Response> {
    let why = app.ready().err()?;
    app.metrics()
        .observe(verb, Outcome::Unavailable, start.elapsed());
    Some(error_response(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("gpu-admission is not ready: {why}; retry"),
    ))
}

fn bad_request(
    app: &App,
    verb: &'static str,
    what: &str,
    e: serde_json::Error,
    start: Instant,
) -> Response {
    app.metrics()
        .observe(verb, Outcome::BadRequest, start.elapsed());
    error_response(
        StatusCode::BAD_REQUEST,
        format!("the request body is not a valid {what}: {e}"),
    )
}

async fn filter_handler(State(app): State<App>, body: Bytes) -> Response {
    let start = Instant::now();
    if let Some(r) = gate(&app, "filter", start) {
        return r;
    }
    let args: ExtenderArgs<'_> = match serde_json::from_slice(&body) {
        Ok(a) => a,
        Err(e) => return bad_request(&app, "filter", "ExtenderArgs", e, start),
    };
    let answer = app.filter(&args);
    let response = json(StatusCode::OK, &answer);
    let outcome = answer.outcome();
    drop(answer);
    app.metrics().observe("filter", outcome, start.elapsed());
    response
}

async fn prioritize_handler(State(app): State<App>, body: Bytes) -> Response {
    let start = Instant::now();
    if let Some(r) = gate(&app, "prioritize", start) {
        return r;
    }
    let args: ExtenderArgs<'_> = match serde_json::from_slice(&body) {
        Ok(a) => a,
        Err(e) => return bad_request(&app, "prioritize", "ExtenderArgs", e, start),
    };
    let response = match app.prioritize(&args) {
        Ok((outcome, list)) => {
            let r = json(StatusCode::OK, &list);
            app.metrics()
                .observe("prioritize", outcome, start.elapsed());
            r
        }
        Err(m) => {
            // HostPriorityList has no error field: a non-200 answer is the only way to say it.
            app.metrics()
                .observe("prioritize", Outcome::Error, start.elapsed());
            error_response(StatusCode::UNPROCESSABLE_ENTITY, m)
        }
    };
    response
}

async fn bind_handler(State(app): State<App>, body: Bytes) -> Response {
    let start = Instant::now();
    if let Some(r) = gate(&app, "bind", start) {
        return r;
    }
    let args: ExtenderBindingArgs = match serde_json::from_slice(&body) {
        Ok(a) => a,
        Err(e) => return bad_request(&app, "bind", "ExtenderBindingArgs", e, start),
    };
    let (outcome, error) = match app.bind(&args).await {
        Ok(()) => (Outcome::Bound, String::new()),
        Err(e) => (Outcome::Error, e),
    };
    app.metrics().observe("bind", outcome, start.elapsed());
    json(StatusCode::OK, &ExtenderBindingResult { error })
}

async fn predicates_handler(State(app): State<App>, body: Bytes) -> Response {
    let start = Instant::now();
    if let Some(r) = gate(&app, "predicates", start) {
        return r;
    }
    let args: ExtenderArgs<'_> = match serde_json::from_slice(&body) {
        Ok(a) => a,
        Err(e) => return bad_request(&app, "predicates", "ExtenderArgs", e, start),
    };
    let (outcome, result) = app.predicates(&args).await;
    let response = json(StatusCode::OK, &result);
    app.metrics()
        .observe("predicates", outcome, start.elapsed());
    response
}

async fn readyz_handler(State(app): State<App>) -> Response {
    match app.ready() {
        Ok(()) => (StatusCode::OK, "ok").into_response(),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}")).into_response(),
    }
}

async fn metrics_handler(State(app): State<App>) -> Response {
    let body = app
        .metrics()
        .render(app.state(), app.shared.leadership.is_leader());
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        body,
    )
        .into_response()
}
