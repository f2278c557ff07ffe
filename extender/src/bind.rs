//! The verbs with side effects: bind, and the legacy predicates verb.
//!
//! Both decide and reserve under the state's write lock (so two concurrent requests can never
//! be given the same capacity), then release the lock for the API calls. Whatever fails after
//! the reservation is rolled back: the reservation is cancelled and any annotation we wrote is
//! removed again.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use gm_core::annotations::{encode_placement, Keys};
use gm_core::request::Slot;
use gm_core::Assignment;
use k8s_openapi::api::core::v1::{Binding, ObjectReference, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Patch, PatchParams, PostParams};
use kube::Api;
use serde_json::{Map, Value};

use crate::decide::best;
use crate::metrics::Outcome;
use crate::server::{pod_name, App, Classified};
use crate::state::{GpuPod, Reservation, Uid};
use crate::wire::{ExtenderArgs, ExtenderBindingArgs, ExtenderFilterResult, Mode};

fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The placement annotation keys of a pod that are written for `cards`, plus every other
/// reserved key the pod carries (set to null so stale card lists disappear).
fn annotation_patch(
    uid: &str,
    set: &BTreeMap<String, String>,
    existing_reserved: &[String],
) -> Value {
    let mut ann = Map::new();
    for k in existing_reserved {
        if !set.contains_key(k) {
            ann.insert(k.clone(), Value::Null);
        }
    }
    for (k, v) in set {
        ann.insert(k.clone(), Value::String(v.clone()));
    }
    serde_json::json!({ "metadata": { "uid": uid, "annotations": ann } })
}

/// The patch that removes what `written` added.
fn removal_patch(uid: &str, written: &BTreeMap<String, String>) -> Value {
    let ann: Map<String, Value> = written.keys().map(|k| (k.clone(), Value::Null)).collect();
    serde_json::json!({ "metadata": { "uid": uid, "annotations": ann } })
}

/// Does the pod already carry exactly these annotations?
fn carries(pod: &GpuPod, keys: &Keys, set: &BTreeMap<String, String>) -> bool {
    let a = &pod.annotations;
    let mut cards: BTreeMap<Slot, Vec<u32>> = BTreeMap::new();
    for (k, v) in set {
        if let Some(slot) = keys.parse_gpu_idx_key(k) {
            match gm_core::annotations::decode_cards(k, v) {
                Ok(c) => {
                    cards.insert(slot, c);
                }
                Err(_) => return false,
            }
        }
    }
    a.cards == cards
        && a.node.as_deref() == set.get(&keys.predicate_node).map(String::as_str)
        && a.time.map(|t| t.to_string()).as_deref()
            == set.get(&keys.predicate_time).map(String::as_str)
}

/// A decision made under the lock, to be carried out with API calls.
struct Plan {
    node: String,
    assignment: Assignment,
    annotations: BTreeMap<String, String>,
    /// The annotations still have to be written.
    needs_patch: bool,
    /// We made the reservation in this request (so a failure cancels it).
    reserved_here: bool,
}

fn api_error(what: &str, e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => format!("{what} failed: {} ({})", s.message, s.code),
        other => format!("{what} failed: {other}"),
    }
}

impl App {
    fn pods_api(&self, namespace: &str) -> Api<Pod> {
        Api::namespaced(self.shared().client.clone(), namespace)
    }

    async fn with_timeout<T>(
        &self,
        budget: Duration,
        what: &str,
        fut: impl std::future::Future<Output = Result<T, kube::Error>>,
    ) -> Result<T, String> {
        match tokio::time::timeout(budget, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(api_error(what, &e)),
            Err(_) => Err(format!("{what} timed out after {}ms", budget.as_millis())),
        }
    }

    /// The pod to bind: from the cache when it knows this UID, else from the API server.
    async fn pod_for_bind(
        &self,
        args: &ExtenderBindingArgs,
        deadline: Instant,
    ) -> Result<Option<GpuPod>, String> {
        let state = self.state();
        if let Some(rec) = state.read().pods.get(args.pod_uid.as_str()) {
            if rec.pod.namespace == args.pod_namespace && rec.pod.name == args.pod_name {
                return Ok(Some(rec.pod.clone()));
            }
        }
        let budget = deadline.saturating_duration_since(Instant::now());
        let pod = self
            .with_timeout(
                budget,
                "reading the pod",
                self.pods_api(&args.pod_namespace).get(&args.pod_name),
            )
            .await?;
        let uid = pod.metadata.uid.as_deref().unwrap_or("");
        if uid != args.pod_uid {
            return Err(format!(
                "pod {}/{} now has UID {uid:?}, not {:?}: it was recreated",
                args.pod_namespace, args.pod_name, args.pod_uid
            ));
        }
        match self.classify(&pod) {
            Classified::Plain => Ok(None),
            Classified::Invalid(m) => Err(m),
            Classified::Gpu(p, _) => Ok(Some(*p)),
        }
    }

    /// Bind a pod to the node the scheduler chose: choose its cards with the pod's policy,
    /// reserve them, write the annotations, create the Binding. Idempotent for retries of the
    /// same pod; rolls everything back on failure.
    pub async fn bind(&self, args: &ExtenderBindingArgs) -> Result<(), String> {
        args.validate()?;
        let deadline = Instant::now() + self.shared().api_timeout;
        let who = format!("pod {}/{}", args.pod_namespace, args.pod_name);
        let Some(pod) = self.pod_for_bind(args, deadline).await? else {
            return self.create_binding(args, deadline).await;
        };
        let policy = match pod.annotations.policy.as_deref().filter(|s| !s.is_empty()) {
            None => self.shared().policy,
            Some(p) => p
                .parse()
                .map_err(|e| format!("{who}: annotation {}: {e}", self.state().keys().policy))?,
        };
        let plan = self
            .plan_bind(&pod, policy, &args.node)
            .map_err(|e| format!("{who}: {e}"))?;
        let uid: Uid = pod.uid.clone();
        if let Err(e) = self.admission_gate(&pod, &args.node).await {
            self.roll_back(&pod, &uid, &plan, false).await;
            return Err(format!("{who}: {e}"));
        }
        let deadline = Instant::now() + self.shared().api_timeout;
        let mut patched = false;
        let result = async {
            if plan.needs_patch {
                let patch = annotation_patch(&pod.uid, &plan.annotations, &pod.reserved_keys);
                let budget = deadline.saturating_duration_since(Instant::now());
                self.with_timeout(
                    budget,
                    "writing the placement annotations",
                    self.pods_api(&pod.namespace).patch(
                        &pod.name,
                        &PatchParams::default(),
                        &Patch::Merge(&patch),
                    ),
                )
                .await?;
                patched = true;
            }
            self.create_binding(args, deadline).await
        }
        .await;
        match result {
            Ok(()) => {
                tracing::debug!(pod = %who, node = %args.node, "bound");
                Ok(())
            }
            Err(e) => {
                self.roll_back(&pod, &uid, &plan, patched).await;
                Err(format!("{who}: {e}"))
            }
        }
    }

    /// Wait until the kubelet cannot confuse this pod's placement on `node` with another one's:
    /// no pod placed there before it, still waiting for devices, has a request of the same size
    /// on other cards (`ClusterState` `gate_blockers`). The kubelet's device requests name no
    /// pod, so binding such a pair at once lets it admit them in either order and hand each the
    /// other's cards. Same-sized pods on the same cards, and pods of other sizes, pass at once.
    async fn admission_gate(&self, pod: &GpuPod, node: &str) -> Result<(), String> {
        let timeout = self.shared().bind_gate_timeout;
        let start = Instant::now();
        let mut logged = false;
        loop {
            let blockers = {
                let inner = self.state().read();
                match inner.reservations.get(&pod.uid) {
                    Some(r) if &*r.node == node => inner.gate_blockers(
                        &pod.uid,
                        node,
                        &pod.request,
                        &r.cards,
                        r.ticket,
                        unix_nanos(),
                        self.shared().bind_gate_window,
                    ),
                    _ => Vec::new(),
                }
            };
            let waited = start.elapsed();
            if blockers.is_empty() {
                if logged {
                    self.shared().metrics.observe_gate(waited, false);
                    tracing::debug!(pod = %format!("{}/{}", pod.namespace, pod.name), node, waited_ms = waited.as_millis() as u64, "admission gate open");
                }
                return Ok(());
            }
            if waited >= timeout {
                self.shared().metrics.observe_gate(waited, true);
                return Err(format!(
                    "not bound to node {node} yet: pod(s) {} placed there before it still wait for the kubelet to allocate their devices and ask for as many vcuda-core or vcuda-memory as it does on other cards, so the kubelet could swap their devices (waited {}ms, --bind-gate-timeout); the scheduler retries the pod",
                    blockers.join(", "),
                    waited.as_millis()
                ));
            }
            if !logged {
                tracing::debug!(pod = %format!("{}/{}", pod.namespace, pod.name), node, blockers = %blockers.join(","), "waiting at the admission gate");
                logged = true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Decide and reserve under the write lock.
    fn plan_bind(
        &self,
        pod: &GpuPod,
        policy: crate::policy::ExtenderPolicy,
        node: &str,
    ) -> Result<Plan, String> {
        let state = self.state();
        let keys = state.keys();
        let mut inner = state.write();
        // A retry of a bind we are already carrying out or have carried out.
        if let Some(r) = inner.reservations.get(&pod.uid) {
            if &*r.node == node {
                return Ok(Plan {
                    node: node.to_string(),
                    assignment: r.assignment.clone(),
                    needs_patch: !carries(pod, keys, &r.annotations),
                    annotations: r.annotations.clone(),
                    reserved_here: false,
                });
            }
        }
        // Already placed on this node by its annotations, and holding those cards.
        if pod.annotations.node.as_deref() == Some(node) {
            if let Ok(Some((n, a))) = pod.charge() {
                if n == node
                    && inner
                        .holding(&pod.uid)
                        .is_some_and(|(hn, ha)| **hn == *node && *ha == a)
                {
                    let annotations = encode_placement(
                        keys,
                        node,
                        &pod.annotations.cards,
                        pod.annotations.time.unwrap_or_else(unix_nanos),
                    );
                    return Ok(Plan {
                        node: node.to_string(),
                        needs_patch: !carries(pod, keys, &annotations),
                        assignment: a,
                        annotations,
                        reserved_here: false,
                    });
                }
            }
        }
        let ctx = inner.context(pod, policy);
        let placement = inner
            .plan(&ctx, node)
            .map_err(|r| format!("does not fit node {node}: {}", r.text))?;
        let annotations = encode_placement(keys, node, &placement.cards, unix_nanos());
        let node_arc = inner
            .slot(node)
            .map(|s| s.name.clone())
            .ok_or_else(|| format!("node {node} is not in gpu-admission's node cache"))?;
        inner.reserve(
            &pod.uid,
            Reservation {
                node: node_arc,
                assignment: placement.assignment.clone(),
                cards: placement.cards,
                annotations: annotations.clone(),
                expires: Instant::now() + state.reservation_ttl(),
                ticket: 0,
            },
        )?;
        Ok(Plan {
            node: node.to_string(),
            assignment: placement.assignment,
            annotations,
            needs_patch: true,
            reserved_here: true,
        })
    }

    /// Create the Binding; a 409 for a pod already bound to this node is success (a retry).
    async fn create_binding(
        &self,
        args: &ExtenderBindingArgs,
        deadline: Instant,
    ) -> Result<(), String> {
        let binding = Binding {
            metadata: ObjectMeta {
                name: Some(args.pod_name.clone()),
                namespace: Some(args.pod_namespace.clone()),
                uid: Some(args.pod_uid.clone()),
                ..Default::default()
            },
            target: ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Node".into()),
                name: Some(args.node.clone()),
                ..Default::default()
            },
        };
        let api = self.pods_api(&args.pod_namespace);
        let budget = deadline.saturating_duration_since(Instant::now());
        let created = tokio::time::timeout(
            budget,
            api.create_subresource::<_, Value>(
                "binding",
                &args.pod_name,
                &PostParams::default(),
                &binding,
            ),
        )
        .await;
        let failure = match created {
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(e)) => api_error("creating the Binding", &e),
            Err(_) => format!(
                "creating the Binding timed out after {}ms",
                budget.as_millis()
            ),
        };
        // The Binding may exist already (a retry, or a lost answer): then the pod says so.
        let check =
            Duration::from_millis(500).max(deadline.saturating_duration_since(Instant::now()));
        if let Ok(Ok(pod)) = tokio::time::timeout(check, api.get(&args.pod_name)).await {
            let bound_here =
                pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(args.node.as_str());
            if bound_here && pod.metadata.uid.as_deref() == Some(args.pod_uid.as_str()) {
                return Ok(());
            }
        }
        Err(failure)
    }

    /// Undo a failed bind: cancel the reservation and remove the annotations we wrote.
    async fn roll_back(&self, pod: &GpuPod, uid: &Uid, plan: &Plan, patched: bool) {
        if plan.reserved_here || patched {
            self.state()
                .write()
                .cancel(uid, &plan.node, &plan.assignment);
        }
        if patched {
            let patch = removal_patch(&pod.uid, &plan.annotations);
            let budget = self.shared().api_timeout / 2;
            match self
                .with_timeout(
                    budget,
                    "removing the placement annotations",
                    self.pods_api(&pod.namespace).patch(
                        &pod.name,
                        &PatchParams::default(),
                        &Patch::Merge(&patch),
                    ),
                )
                .await
            {
                Ok(_) => self.state().write().forget_charge(uid),
                Err(e) => {
                    tracing::warn!(pod = %format!("{}/{}", pod.namespace, pod.name), error = %e,
                    "could not remove the annotations of a failed bind; the next placement overwrites them")
                }
            }
        }
    }

    /// The legacy `predicates` verb (gpu-admission's only verb): choose one node and its cards,
    /// write the annotations now, answer with that node alone. A pod that already holds a
    /// placement on one of the candidates gets that node back (gpu-admission failed such pods
    /// forever with "had been predicated!").
    pub async fn predicates<'a>(
        &self,
        args: &'a ExtenderArgs<'_>,
    ) -> (Outcome, ExtenderFilterResult<'a>) {
        let Some(pod_obj) = args.pod.as_ref() else {
            return (
                Outcome::Error,
                ExtenderFilterResult::error("ExtenderArgs has no Pod"),
            );
        };
        if args.nodes.is_none() && args.node_names.is_none() {
            return (
                Outcome::Error,
                ExtenderFilterResult::error("ExtenderArgs has neither Nodes nor NodeNames"),
            );
        }
        let (pod, policy) = match self.classify(pod_obj) {
            Classified::Plain => {
                return (
                    Outcome::Passthrough,
                    ExtenderFilterResult::passthrough(args),
                )
            }
            Classified::Invalid(m) => return (Outcome::Error, ExtenderFilterResult::error(m)),
            Classified::Gpu(p, policy) => (p, policy),
        };
        let names = args.candidate_names();
        let matched: std::sync::Arc<str> =
            format!("pod {} has already been matched to another node", pod.uid).into();
        let state = self.state();
        let keys = state.keys();
        let mut out = ExtenderFilterResult::default();
        // Decide and reserve under the lock; word the reasons while the view is consistent.
        let decided = {
            let mut inner = state.write();
            let ctx = inner.context(&pod, policy);
            let mut winner: Option<(usize, Plan)> = None;
            // Re-filtered after a placement: give the node back if the pod still holds it.
            if let (Some(node), Ok(Some((_, assignment)))) =
                (pod.annotations.node.as_deref(), pod.charge())
            {
                if let Some(i) = names.iter().position(|n| *n == node) {
                    let holds = inner
                        .holding(&pod.uid)
                        .is_some_and(|(n, a)| **n == *node && *a == assignment)
                        || inner
                            .reservations
                            .get(&pod.uid)
                            .is_some_and(|r| &*r.node == node);
                    let annotations = encode_placement(
                        keys,
                        node,
                        &pod.annotations.cards,
                        pod.annotations.time.unwrap_or_else(unix_nanos),
                    );
                    let kept = holds
                        || match inner.slot(node).map(|s| s.name.clone()) {
                            Some(node_arc) => inner
                                .reserve(
                                    &pod.uid,
                                    Reservation {
                                        node: node_arc,
                                        assignment: assignment.clone(),
                                        cards: pod.annotations.cards.clone(),
                                        annotations: annotations.clone(),
                                        expires: Instant::now() + state.reservation_ttl(),
                                        ticket: 0,
                                    },
                                )
                                .is_ok(),
                            None => false,
                        };
                    if kept {
                        winner = Some((
                            i,
                            Plan {
                                node: node.to_string(),
                                assignment,
                                annotations,
                                needs_patch: false,
                                reserved_here: false,
                            },
                        ));
                    }
                }
            }
            let mut screen = None;
            let mut plan_failed = None;
            if winner.is_none() {
                let s = inner.screen(&ctx, &inner.resolve(&names));
                if let Some(i) = best(&s, &names, policy.tie_order()) {
                    match inner.plan(&ctx, names[i]) {
                        Ok(p) => {
                            let annotations =
                                encode_placement(keys, names[i], &p.cards, unix_nanos());
                            let node_arc = inner.slot(names[i]).map(|s| s.name.clone());
                            let reserved = node_arc.ok_or_else(String::new).and_then(|node| {
                                inner.reserve(
                                    &pod.uid,
                                    Reservation {
                                        node,
                                        assignment: p.assignment.clone(),
                                        cards: p.cards.clone(),
                                        annotations: annotations.clone(),
                                        expires: Instant::now() + state.reservation_ttl(),
                                        ticket: 0,
                                    },
                                )
                            });
                            if reserved.is_ok() {
                                winner = Some((
                                    i,
                                    Plan {
                                        node: names[i].to_string(),
                                        assignment: p.assignment,
                                        annotations,
                                        needs_patch: true,
                                        reserved_here: true,
                                    },
                                ));
                            }
                        }
                        Err(r) => {
                            plan_failed = Some(i);
                            out.failed_nodes.push((names[i], r.text));
                        }
                    }
                }
                screen = Some(s);
            }
            let mut explained = vec![false; names.len()];
            if let Some(i) = plan_failed {
                explained[i] = true;
            }
            if let Some(s) = &screen {
                for &(i, _, miss) in &s.misses {
                    explained[i] = true;
                    let r = inner.explain(&ctx, names[i], miss);
                    if r.unresolvable {
                        out.failed_and_unresolvable.push((names[i], r.text));
                    } else {
                        out.failed_nodes.push((names[i], r.text));
                    }
                }
            }
            let won = winner.as_ref().map(|(i, _)| *i);
            for (i, name) in names.iter().enumerate() {
                if Some(i) != won && !explained[i] {
                    out.failed_nodes.push((name, matched.clone()));
                }
            }
            winner
        };
        let Some((i, plan)) = decided else {
            set_nodes(&mut out, args, &names, None);
            return (Outcome::NoFit, out);
        };
        if plan.needs_patch {
            let patch = annotation_patch(&pod.uid, &plan.annotations, &pod.reserved_keys);
            let written = self
                .with_timeout(
                    self.shared().api_timeout,
                    "writing the placement annotations",
                    self.pods_api(&pod.namespace).patch(
                        &pod.name,
                        &PatchParams::default(),
                        &Patch::Merge(&patch),
                    ),
                )
                .await;
            if let Err(e) = written {
                tracing::warn!(pod = %pod_name(pod_obj), error = %e, "legacy predicates: annotation write failed");
                self.roll_back(&pod, &pod.uid, &plan, false).await;
                out.failed_nodes.push((
                    names[i],
                    format!("update pod annotation failed: {e}").into(),
                ));
                set_nodes(&mut out, args, &names, None);
                return (Outcome::Error, out);
            }
        }
        set_nodes(&mut out, args, &names, Some(i));
        (Outcome::Fit, out)
    }
}

/// Answer with the winner alone (or nothing), in the request's mode.
fn set_nodes<'a>(
    out: &mut ExtenderFilterResult<'a>,
    args: &'a ExtenderArgs<'_>,
    names: &[&'a str],
    winner: Option<usize>,
) {
    match args.mode() {
        Mode::NodeNames => {
            out.node_names = Some(winner.map(|i| vec![names[i]]).unwrap_or_default())
        }
        Mode::Nodes => {
            let items = args
                .nodes
                .as_ref()
                .map(|l| l.items.as_slice())
                .unwrap_or(&[]);
            out.nodes = Some(winner.map(|i| vec![items[i].raw]).unwrap_or_default());
        }
    }
}
