//! Per-namespace GPU quota by card model or pool: the pure accounting behind the admission
//! webhook's quota check and the usage it publishes.
//!
//! Plain per-namespace totals (`requests.tencent.com/vcuda-core: 800`) are Kubernetes'
//! own ResourceQuota's job. A [`Quota`] adds what a ResourceQuota cannot express: limits that
//! apply only to the cards of one **model** (`A100`) or one **pool** (a node label value),
//! and optionally the list of models and pools a namespace may use at all.
//!
//! # Which limit a pod counts against
//!
//! The cluster's cards are summarised into a few [`CardClass`]es (model, memory, pool and the
//! node labels a pod can pin). For every GPU container of a pod the accounting works out the
//! classes it runs on (its **sites**):
//!
//! * **Placed** (the pod has `spec.nodeName` or the extender's `predicate-node`): the classes of
//!   the cards named in its `predicate-gpu-idx-*` annotation, or of every card on that node
//!   the pod's model filter allows when the indices are not written yet.
//! * **Pending**: every class the pod *could* be placed on. Pods narrow this down with the
//!   `<domain>/gpu-models` annotation and with `nodeSelector` or required node affinity on
//!   the pool label, the model label or the `<domain>/gpu-model` node label. Requirements on
//!   other labels are ignored, which can only widen the set.
//!
//! A container is charged to a limit when one of its sites matches the limit's selector. So an
//! unpinned pending pod counts against every model limit the cluster has cards for, and only
//! against the right one once it is placed (or pinned). This is what keeps the check sound
//! without help from the scheduler: the charge of a pod only ever shrinks as it is placed, so
//! a limit that held at admission keeps holding. A pending pod that no card in the cluster can
//! take yet counts against every limit its pins do not rule out.
//!
//! Amounts follow the resource contract: `vcuda-core` (100 per whole card), share memory in
//! 256 MiB blocks (whole cards take their card's memory and are limited by `cards`) and whole
//! cards. Init containers count the way the kubelet counts them
//! ([`PodGpuRequest::effective_cores`]).

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use k8s_openapi::api::core::v1::{NodeSelectorRequirement, NodeSelectorTerm, PodSpec};

use crate::annotations::ModelFilter;
use crate::inventory::NodeInventory;
use crate::request::{ContainerGpu, PodGpuRequest, Slot};
use crate::resources::{ResourceNames, CORES_PER_CARD};

/// Resources a pod (or a namespace) holds, as counted by a quota.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Amount {
    /// vcuda-core units (100 per whole card).
    pub cores: u64,
    /// vcuda-memory blocks of 256 MiB held by shares.
    pub blocks: u64,
    /// Whole cards.
    pub cards: u64,
}

impl Amount {
    /// True when nothing is held.
    pub fn is_zero(&self) -> bool {
        *self == Self::default()
    }

    /// The sum of two amounts (saturating).
    pub fn plus(self, other: Amount) -> Amount {
        Amount {
            cores: self.cores.saturating_add(other.cores),
            blocks: self.blocks.saturating_add(other.blocks),
            cards: self.cards.saturating_add(other.cards),
        }
    }
}

/// Upper bounds of one limit; `None` leaves that resource unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Max {
    pub cores: Option<u64>,
    pub blocks: Option<u64>,
    pub cards: Option<u64>,
}

/// Which cards a limit covers: a model, a pool, or the cards of that model in that pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selector {
    model: Option<ModelFilter>,
    pool: Option<String>,
}

impl Selector {
    /// A selector; an empty or blank string counts as not set.
    pub fn new(model: Option<&str>, pool: Option<&str>) -> Self {
        let model = model
            .map(str::trim)
            .filter(|m| !m.is_empty())
            .map(|m| ModelFilter::new([m]));
        let pool = pool
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(str::to_string);
        Self { model, pool }
    }

    /// The model as written, if any.
    pub fn model(&self) -> Option<&str> {
        self.model
            .as_ref()
            .and_then(|m| m.entries().first().map(String::as_str))
    }

    /// The pool, if any.
    pub fn pool(&self) -> Option<&str> {
        self.pool.as_deref()
    }

    /// Does this selector cover cards of `class`? Models match the way the pod annotation
    /// `<domain>/gpu-models` does (whole words, any case: `A100` covers
    /// `NVIDIA A100-SXM4-40GB`).
    pub fn matches(&self, class: &CardClass) -> bool {
        self.model.as_ref().is_none_or(|m| m.matches(&class.model))
            && self
                .pool
                .as_deref()
                .is_none_or(|p| class.pool.as_deref() == Some(p))
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.model(), self.pool()) {
            (Some(m), Some(p)) => write!(f, "model {m:?} in pool {p:?}"),
            (Some(m), None) => write!(f, "model {m:?}"),
            (None, Some(p)) => write!(f, "pool {p:?}"),
            (None, None) => f.write_str("every card"),
        }
    }
}

/// One limit of a quota.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limit {
    pub selector: Selector,
    pub max: Max,
}

/// A namespace's GPU quota: limits per model or pool, and optionally the only models and
/// pools its GPU pods may use. Build it with [`Quota::new`], which checks it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Quota {
    /// `None`: any model. `Some` with no entries: no model at all.
    allowed_models: Option<ModelFilter>,
    allowed_pools: Vec<String>,
    limits: Vec<Limit>,
}

/// A quota that cannot be used, with every problem found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", .problems.join("; "))]
pub struct QuotaSpecError {
    pub problems: Vec<String>,
}

impl Quota {
    /// A checked quota. `limits[i]` must name a model or a pool (plain totals belong in a
    /// ResourceQuota) and bound at least one resource; no two limits may have the same
    /// selector. `allowed_models: None` allows every model, `Some(&[])` none; an empty
    /// `allowed_pools` allows every pool.
    pub fn new(
        allowed_models: Option<&[String]>,
        allowed_pools: &[String],
        limits: Vec<Limit>,
    ) -> Result<Self, QuotaSpecError> {
        let mut problems = Vec::new();
        for (i, l) in limits.iter().enumerate() {
            if l.selector.model.is_none() && l.selector.pool.is_none() {
                problems.push(format!(
                    "limits[{i}] names neither a model nor a pool: set model and/or pool \
                     (plain per-namespace totals belong in a ResourceQuota, e.g. \
                     requests.tencent.com/vcuda-core)"
                ));
            }
            if l.max == Max::default() {
                problems.push(format!(
                    "limits[{i}] ({}) bounds nothing: set at least one of vcudaCore, vcudaMemory or cards",
                    l.selector
                ));
            }
            if let Some(j) = limits[..i].iter().position(|o| o.selector == l.selector) {
                problems.push(format!(
                    "limits[{i}] repeats the selector of limits[{j}] ({}): merge them into one limit",
                    l.selector
                ));
            }
        }
        for (i, m) in allowed_models.unwrap_or_default().iter().enumerate() {
            if ModelFilter::new([m]).is_empty() {
                problems.push(format!(
                    "allowedModels[{i}]={m:?} has no letters or digits: use a model name such as A100 or \"Tesla T4\""
                ));
            }
        }
        for (i, p) in allowed_pools.iter().enumerate() {
            if p.trim().is_empty() {
                problems.push(format!(
                    "allowedPools[{i}] is empty: use a pool label value"
                ));
            }
        }
        if !problems.is_empty() {
            return Err(QuotaSpecError { problems });
        }
        Ok(Self {
            allowed_models: allowed_models.map(ModelFilter::new),
            allowed_pools: allowed_pools.iter().map(|p| p.trim().to_string()).collect(),
            limits,
        })
    }

    pub fn limits(&self) -> &[Limit] {
        &self.limits
    }

    /// Models the namespace may use (`None`: any).
    pub fn allowed_models(&self) -> Option<&[String]> {
        self.allowed_models.as_ref().map(ModelFilter::entries)
    }

    fn model_allowed(&self, model: &str) -> bool {
        self.allowed_models
            .as_ref()
            .is_none_or(|f| !f.is_empty() && f.matches(model))
    }

    fn pool_allowed(&self, pool: Option<&str>) -> bool {
        self.allowed_pools.is_empty()
            || pool.is_some_and(|p| self.allowed_pools.iter().any(|a| a == p))
    }

    /// Pools the namespace may use (empty: any).
    pub fn allowed_pools(&self) -> &[String] {
        &self.allowed_pools
    }

    /// May the namespace use cards of this class at all?
    pub fn allows(&self, class: &CardClass) -> bool {
        self.model_allowed(&class.model) && self.pool_allowed(class.pool.as_deref())
    }

    /// True when the quota restricts models or pools.
    pub fn restricts(&self) -> bool {
        self.allowed_models.is_some() || !self.allowed_pools.is_empty()
    }

    /// For a pod no card in the cluster can take yet: do its pins alone keep it within the
    /// allowed models and pools? Every model entry of its `gpu-models` must be an allowed
    /// model, and a pool restriction needs a `nodeSelector` on the pool label.
    pub fn pins_within(&self, pins: &PodPins, keys: &QuotaKeys) -> bool {
        let models_ok = match &self.allowed_models {
            None => true,
            Some(allowed) => {
                !pins.models.is_empty()
                    && !allowed.is_empty()
                    && pins.models.entries().iter().all(|e| allowed.matches(e))
            }
        };
        let pools_ok = self.allowed_pools.is_empty()
            || self.pool_allowed(pins.node_selector.get(&keys.pool_label).map(String::as_str));
        models_ok && pools_ok
    }
}

/// Node label keys the accounting reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaKeys {
    /// Node label whose value is the node's pool (e.g. `tkestack.io/gpu-pool`).
    pub pool_label: String,
    /// Node label whose value replaces the card model for quota purposes (the old
    /// gpu-admission `GPUModelLabel`); `None` uses the model from the node inventory.
    pub model_label: Option<String>,
    /// Further node labels pods pin with (e.g. `tencent.com/gpu-model`).
    pub pin_labels: Vec<String>,
}

impl QuotaKeys {
    fn pin_keys(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.pool_label.as_str())
            .chain(self.model_label.as_deref())
            .chain(self.pin_labels.iter().map(String::as_str))
    }

    fn is_pin_key(&self, key: &str) -> bool {
        self.pin_keys().any(|k| k == key)
    }
}

/// Cards that are the same for quota purposes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CardClass {
    /// Card model (or the node's model label when [`QuotaKeys::model_label`] is set).
    pub model: String,
    pub memory_mib: u64,
    /// The node's pool label value.
    pub pool: Option<String>,
    /// Values of the pin labels ([`QuotaKeys`]) on the node; absent labels are left out.
    pub labels: BTreeMap<String, String>,
}

impl CardClass {
    /// Share memory blocks one card of this class offers.
    pub fn blocks(&self) -> u64 {
        self.memory_mib / crate::resources::BLOCK_MIB
    }
}

/// The cluster's GPU cards reduced to classes, and the class of every card of every node.
#[derive(Debug, Clone)]
pub struct ClusterCards {
    keys: QuotaKeys,
    classes: Vec<CardClass>,
    index: HashMap<CardClass, usize>,
    nodes: HashMap<String, Vec<usize>>,
}

impl ClusterCards {
    /// An empty cluster.
    pub fn new(keys: QuotaKeys) -> Self {
        Self {
            keys,
            classes: Vec::new(),
            index: HashMap::new(),
            nodes: HashMap::new(),
        }
    }

    pub fn keys(&self) -> &QuotaKeys {
        &self.keys
    }

    /// Add (or replace) a node with its labels and card inventory.
    pub fn add_node(&mut self, name: &str, labels: &BTreeMap<String, String>, inv: &NodeInventory) {
        let pool = labels.get(&self.keys.pool_label).cloned();
        let label_model = self
            .keys
            .model_label
            .as_ref()
            .and_then(|k| labels.get(k))
            .cloned();
        let pins: BTreeMap<String, String> = self
            .keys
            .pin_keys()
            .filter_map(|k| labels.get(k).map(|v| (k.to_string(), v.clone())))
            .collect();
        let mut cards = Vec::with_capacity(inv.cards.len());
        for card in &inv.cards {
            let class = CardClass {
                model: label_model.clone().unwrap_or_else(|| card.model.clone()),
                memory_mib: card.memory_mib,
                pool: pool.clone(),
                labels: pins.clone(),
            };
            let next = self.classes.len();
            let idx = *self.index.entry(class.clone()).or_insert(next);
            if idx == next {
                self.classes.push(class);
            }
            cards.push(idx);
        }
        self.nodes.insert(name.to_string(), cards);
    }

    /// Every distinct class.
    pub fn classes(&self) -> &[CardClass] {
        &self.classes
    }

    /// Number of GPU nodes.
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// Class indices of a node's cards, by card index.
    pub fn node_cards(&self, node: &str) -> Option<&[usize]> {
        self.nodes.get(node).map(Vec::as_slice)
    }

    /// Largest card memory among the given classes.
    pub fn largest_mib<'a>(&self, classes: impl IntoIterator<Item = &'a usize>) -> Option<u64> {
        classes
            .into_iter()
            .filter_map(|&i| self.classes.get(i))
            .map(|c| c.memory_mib)
            .max()
    }

    /// Classes a pending pod with these pins could be placed on.
    pub fn candidates(&self, pins: &PodPins) -> Vec<usize> {
        (0..self.classes.len())
            .filter(|&i| pins.allows(&self.classes[i], &self.keys))
            .collect()
    }

    /// Where every GPU container of a pod runs, or may run ([`PodGpuRequest::containers`]
    /// order).
    pub fn sites(&self, pod: &PodGpuRequest, pins: &PodPins, place: &Place<'_>) -> PodSites {
        let candidates = || self.candidates(pins);
        match place {
            Place::Pending => {
                let c = candidates();
                PodSites {
                    pending: true,
                    containers: vec![c; pod.containers.len()],
                }
            }
            Place::Node { node, cards } => match self.nodes.get(*node) {
                // A node without an inventory: the pod's pins still held when it was placed.
                None => {
                    let c = candidates();
                    PodSites {
                        pending: c.is_empty(),
                        containers: vec![c; pod.containers.len()],
                    }
                }
                Some(node_cards) => {
                    let mut allowed: Vec<usize> = node_cards
                        .iter()
                        .copied()
                        .filter(|&i| pins.models.matches(&self.classes[i].model))
                        .collect();
                    if allowed.is_empty() {
                        allowed = node_cards.clone();
                    }
                    allowed.sort_unstable();
                    allowed.dedup();
                    let containers = pod
                        .containers
                        .iter()
                        .map(|c| {
                            let named: Vec<usize> = cards
                                .get(&c.slot)
                                .map(|idx| {
                                    idx.iter()
                                        .filter_map(|&i| node_cards.get(i as usize).copied())
                                        .collect()
                                })
                                .unwrap_or_default();
                            if named.is_empty() {
                                allowed.clone()
                            } else {
                                named
                            }
                        })
                        .collect();
                    PodSites {
                        pending: false,
                        containers,
                    }
                }
            },
        }
    }

    /// What a pod with these sites is charged against `selector`.
    pub fn charge(
        &self,
        pod: &PodGpuRequest,
        pins: &PodPins,
        sites: &PodSites,
        selector: &Selector,
    ) -> Amount {
        // A pod no card can take yet may land on a card that joins later: charge it to every
        // selector its pins do not rule out.
        let unplaceable = sites.pending && sites.containers.iter().all(Vec::is_empty);
        let hypothetical = unplaceable && pins.may_use(selector, &self.keys);
        let matched: Vec<ContainerGpu> = pod
            .containers
            .iter()
            .zip(&sites.containers)
            .filter(|(_, s)| {
                hypothetical
                    || s.iter()
                        .any(|&i| self.classes.get(i).is_some_and(|c| selector.matches(c)))
            })
            .map(|(c, _)| c.clone())
            .collect();
        amount_of(matched)
    }

    /// Classes among a pod's sites that the quota does not allow.
    pub fn disallowed(&self, quota: &Quota, sites: &PodSites) -> Vec<&CardClass> {
        let mut out: Vec<&CardClass> = Vec::new();
        for s in &sites.containers {
            for &i in s {
                if let Some(c) = self.classes.get(i) {
                    if !quota.allows(c) && !out.contains(&c) {
                        out.push(c);
                    }
                }
            }
        }
        out
    }
}

/// The resources a set of containers holds at once.
fn amount_of(containers: Vec<ContainerGpu>) -> Amount {
    let whole: Vec<ContainerGpu> = containers
        .iter()
        .filter(|c| !c.request.is_share())
        .cloned()
        .collect();
    let all = PodGpuRequest { containers };
    let whole = PodGpuRequest { containers: whole };
    Amount {
        cores: all.effective_cores(),
        blocks: all.effective_share_blocks(),
        cards: whole.effective_cores() / u64::from(CORES_PER_CARD),
    }
}

/// Everything a pod holds, whatever the cards.
pub fn pod_amount(pod: &PodGpuRequest) -> Amount {
    amount_of(pod.containers.clone())
}

/// Where a pod is.
#[derive(Debug, Clone, Copy)]
pub enum Place<'a> {
    /// Not on a node yet.
    Pending,
    /// On `node`, with the card indices of its containers where known.
    Node {
        node: &'a str,
        cards: &'a BTreeMap<Slot, Vec<u32>>,
    },
}

/// The classes each GPU container of a pod runs on or may run on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodSites {
    /// True when the pod is not placed yet.
    pub pending: bool,
    /// Class indices per GPU container, in [`PodGpuRequest::containers`] order.
    pub containers: Vec<Vec<usize>>,
}

/// How a pod narrows down the cards it may run on: its model filter and its node
/// requirements (`nodeSelector` and required node affinity).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PodPins {
    pub models: ModelFilter,
    node_selector: BTreeMap<String, String>,
    /// `None`: no required node affinity. Terms are ORed.
    terms: Option<Vec<NodeSelectorTerm>>,
}

impl PodPins {
    /// Pins from a pod spec and its `<domain>/gpu-models` filter.
    pub fn new(spec: &PodSpec, models: ModelFilter) -> Self {
        let terms = spec
            .affinity
            .as_ref()
            .and_then(|a| a.node_affinity.as_ref())
            .and_then(|n| {
                n.required_during_scheduling_ignored_during_execution
                    .as_ref()
            })
            .map(|s| s.node_selector_terms.clone());
        Self {
            models,
            node_selector: spec.node_selector.clone().unwrap_or_default(),
            terms,
        }
    }

    /// Could the pod be placed on a card of `class`? Only requirements on the pin keys are
    /// evaluated; the rest are assumed to hold.
    pub fn allows(&self, class: &CardClass, keys: &QuotaKeys) -> bool {
        self.models.matches(&class.model)
            && self.nodes_allow(keys, |k| class.labels.get(k).map(String::as_str))
    }

    /// Could the pod land on cards a selector covers, judged from its pins alone (for cards
    /// that are not in the cluster yet)?
    pub fn may_use(&self, selector: &Selector, keys: &QuotaKeys) -> bool {
        let model_ok = match selector.model() {
            None => true,
            Some(m) => {
                self.models.is_empty()
                    || self.models.matches(m)
                    || self
                        .models
                        .entries()
                        .iter()
                        .any(|e| ModelFilter::new([m]).matches(e))
            }
        };
        // Only the pool label's value is known for a hypothetical card.
        let pool = selector.pool();
        model_ok
            && self.nodes_allow(keys, |k| {
                if k == keys.pool_label {
                    pool
                } else {
                    Some(UNKNOWN)
                }
            })
    }

    fn nodes_allow<'a>(&self, keys: &QuotaKeys, value: impl Fn(&str) -> Option<&'a str>) -> bool {
        for (k, want) in &self.node_selector {
            if keys.is_pin_key(k) {
                match value(k) {
                    Some(UNKNOWN) => {}
                    v => {
                        if v != Some(want.as_str()) {
                            return false;
                        }
                    }
                }
            }
        }
        match &self.terms {
            None => true,
            Some(terms) => terms.iter().any(|t| term_allows(t, keys, &value)),
        }
    }
}

/// Stands for "some value we cannot know": every requirement on it holds.
const UNKNOWN: &str = "\u{0}unknown";

fn term_allows<'a>(
    term: &NodeSelectorTerm,
    keys: &QuotaKeys,
    value: &impl Fn(&str) -> Option<&'a str>,
) -> bool {
    let exprs = term.match_expressions.as_deref().unwrap_or_default();
    let fields = term.match_fields.as_deref().unwrap_or_default();
    if exprs.is_empty() && fields.is_empty() {
        // Kubernetes: an empty term matches no node.
        return false;
    }
    exprs.iter().all(|r| {
        if !keys.is_pin_key(&r.key) {
            return true;
        }
        match value(&r.key) {
            Some(UNKNOWN) => true,
            v => requirement_holds(r, v),
        }
    })
}

fn requirement_holds(r: &NodeSelectorRequirement, value: Option<&str>) -> bool {
    let values = r.values.as_deref().unwrap_or_default();
    let int = |s: &str| s.parse::<i64>().ok();
    match r.operator.as_str() {
        "In" => value.is_some_and(|v| values.iter().any(|x| x == v)),
        "NotIn" => value.is_none_or(|v| !values.iter().any(|x| x == v)),
        "Exists" => value.is_some(),
        "DoesNotExist" => value.is_none(),
        "Gt" | "Lt" => {
            let (Some(v), Some(bound)) = (value.and_then(int), values.first().and_then(|s| int(s)))
            else {
                return false;
            };
            if r.operator == "Gt" {
                v > bound
            } else {
                v < bound
            }
        }
        // An operator we do not know: assume it holds (the set can only get wider).
        _ => true,
    }
}

/// A limit a pod would exceed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exceeded {
    /// Index into [`Quota::limits`].
    pub limit: usize,
    pub selector: String,
    pub resource: QuotaResource,
    pub used: u64,
    pub requested: u64,
    pub max: u64,
}

/// A resource a limit bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaResource {
    Cores,
    Memory,
    Cards,
}

impl QuotaResource {
    /// Its name in messages, e.g. `tencent.com/vcuda-core`.
    pub fn name(self, names: &ResourceNames) -> String {
        match self {
            QuotaResource::Cores => names.core().to_string(),
            QuotaResource::Memory => names.memory().to_string(),
            QuotaResource::Cards => "whole cards".to_string(),
        }
    }
}

impl Exceeded {
    /// `limits[0] (model "A100"): tencent.com/vcuda-core used 300 + requested 200 > limit 400`
    pub fn render(&self, names: &ResourceNames) -> String {
        format!(
            "limits[{}] ({}): {} used {} + requested {} > limit {}",
            self.limit,
            self.selector,
            self.resource.name(names),
            self.used,
            self.requested,
            self.max
        )
    }
}

/// Every limit `request` would push over its bound, given what is `used` (both indexed like
/// [`Quota::limits`]). A limit already over its bound still admits pods it does not charge.
pub fn exceeded(quota: &Quota, used: &[Amount], request: &[Amount]) -> Vec<Exceeded> {
    let mut out = Vec::new();
    for (i, limit) in quota.limits.iter().enumerate() {
        let u = used.get(i).copied().unwrap_or_default();
        let r = request.get(i).copied().unwrap_or_default();
        let checks = [
            (QuotaResource::Cores, limit.max.cores, u.cores, r.cores),
            (QuotaResource::Memory, limit.max.blocks, u.blocks, r.blocks),
            (QuotaResource::Cards, limit.max.cards, u.cards, r.cards),
        ];
        for (resource, max, used, requested) in checks {
            if let Some(max) = max {
                if requested > 0 && used.saturating_add(requested) > max {
                    out.push(Exceeded {
                        limit: i,
                        selector: limit.selector.to_string(),
                        resource,
                        used,
                        requested,
                        max,
                    });
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::{Link, NodeInventory};
    use crate::request::GpuRequest;
    use k8s_openapi::api::core::v1::{Affinity, NodeAffinity, NodeSelector};

    fn keys() -> QuotaKeys {
        QuotaKeys {
            pool_label: "pool".into(),
            model_label: None,
            pin_labels: vec!["tencent.com/gpu-model".into()],
        }
    }

    fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// a100-0 (public), a100-1 (private), t4-0 (public): 2 cards each.
    fn cluster() -> ClusterCards {
        let mut c = ClusterCards::new(keys());
        let a100 = NodeInventory::uniform(2, "NVIDIA A100-SXM4-40GB", 40960, Link::NvLink(12));
        let t4 = NodeInventory::uniform(2, "Tesla T4", 15360, Link::Phb);
        c.add_node("a100-0", &labels(&[("pool", "public")]), &a100);
        c.add_node("a100-1", &labels(&[("pool", "private")]), &a100);
        c.add_node("t4-0", &labels(&[("pool", "public")]), &t4);
        c
    }

    fn share(cores: u32, blocks: u32) -> Option<GpuRequest> {
        Some(GpuRequest::Share { cores, blocks })
    }

    fn whole(cards: u32) -> Option<GpuRequest> {
        Some(GpuRequest::Whole { cards })
    }

    fn limit(model: Option<&str>, pool: Option<&str>, cores: u64) -> Limit {
        Limit {
            selector: Selector::new(model, pool),
            max: Max {
                cores: Some(cores),
                ..Max::default()
            },
        }
    }

    #[test]
    fn model_limits_match_card_models_by_whole_words() {
        let c = cluster();
        let a100 = Selector::new(Some("a100"), None);
        let t4 = Selector::new(Some("T4"), None);
        let models: Vec<&str> = c
            .classes()
            .iter()
            .filter(|k| a100.matches(k))
            .map(|k| k.model.as_str())
            .collect();
        assert_eq!(models, ["NVIDIA A100-SXM4-40GB", "NVIDIA A100-SXM4-40GB"]);
        assert!(c.classes().iter().any(|k| t4.matches(k)));
        assert!(!Selector::new(Some("A10"), None).matches(&c.classes()[0]));
    }

    #[test]
    fn unpinned_pending_pod_counts_against_every_model_it_could_land_on() {
        let c = cluster();
        let pod = PodGpuRequest::from_app_requests([whole(1)]);
        let pins = PodPins::default();
        let sites = c.sites(&pod, &pins, &Place::Pending);
        let a100 = c.charge(&pod, &pins, &sites, &Selector::new(Some("A100"), None));
        let t4 = c.charge(&pod, &pins, &sites, &Selector::new(Some("T4"), None));
        assert_eq!(a100.cards, 1);
        assert_eq!(t4.cards, 1);
        let v100 = c.charge(&pod, &pins, &sites, &Selector::new(Some("V100"), None));
        assert!(
            v100.is_zero(),
            "no V100 in the cluster and the pod can be placed"
        );
    }

    #[test]
    fn pinned_pending_pod_counts_only_where_its_pins_allow() {
        let c = cluster();
        let pod = PodGpuRequest::from_app_requests([share(50, 8)]);
        let pins = PodPins::new(&PodSpec::default(), ModelFilter::new(["T4"]));
        let sites = c.sites(&pod, &pins, &Place::Pending);
        let t4 = c.charge(&pod, &pins, &sites, &Selector::new(Some("T4"), None));
        assert_eq!(
            t4,
            Amount {
                cores: 50,
                blocks: 8,
                cards: 0
            }
        );
        let a100 = c.charge(&pod, &pins, &sites, &Selector::new(Some("A100"), None));
        assert!(a100.is_zero());
        // Pool by nodeSelector: public only, so the private pool is not charged.
        let spec = PodSpec {
            node_selector: Some(labels(&[("pool", "public"), ("zone", "a")])),
            ..Default::default()
        };
        let pins = PodPins::new(&spec, ModelFilter::default());
        let sites = c.sites(&pod, &pins, &Place::Pending);
        let private = c.charge(&pod, &pins, &sites, &Selector::new(None, Some("private")));
        let public = c.charge(&pod, &pins, &sites, &Selector::new(None, Some("public")));
        assert!(private.is_zero());
        assert_eq!(public.cores, 50);
    }

    #[test]
    fn node_affinity_on_the_pool_label_is_honoured() {
        let c = cluster();
        let pod = PodGpuRequest::from_app_requests([whole(1)]);
        let term = |op: &str, vals: &[&str]| NodeSelectorTerm {
            match_expressions: Some(vec![NodeSelectorRequirement {
                key: "pool".into(),
                operator: op.into(),
                values: Some(vals.iter().map(|s| s.to_string()).collect()),
            }]),
            match_fields: None,
        };
        let spec = |terms: Vec<NodeSelectorTerm>| PodSpec {
            affinity: Some(Affinity {
                node_affinity: Some(NodeAffinity {
                    required_during_scheduling_ignored_during_execution: Some(NodeSelector {
                        node_selector_terms: terms,
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let private = Selector::new(None, Some("private"));
        for (terms, charged) in [
            (vec![term("In", &["public"])], false),
            (vec![term("NotIn", &["public"])], true),
            (
                vec![term("In", &["public"]), term("In", &["private"])],
                true,
            ),
            (vec![term("DoesNotExist", &[])], false),
        ] {
            let pins = PodPins::new(&spec(terms.clone()), ModelFilter::default());
            let sites = c.sites(&pod, &pins, &Place::Pending);
            let got = !c.charge(&pod, &pins, &sites, &private).is_zero();
            assert_eq!(got, charged, "{terms:?}");
        }
    }

    #[test]
    fn placed_pod_counts_only_against_the_cards_it_holds() {
        let mut c = cluster();
        let mixed = NodeInventory::new(
            vec![
                crate::inventory::Card {
                    index: 0,
                    uuid: "GPU-a".into(),
                    model: "A100".into(),
                    memory_mib: 40960,
                    minor: 0,
                    numa_node: None,
                    pci_bus_id: String::new(),
                    healthy: true,
                },
                crate::inventory::Card {
                    index: 1,
                    uuid: "GPU-v".into(),
                    model: "V100".into(),
                    memory_mib: 16384,
                    minor: 1,
                    numa_node: None,
                    pci_bus_id: String::new(),
                    healthy: true,
                },
            ],
            vec![
                vec![Link::SelfLink, Link::Sys],
                vec![Link::Sys, Link::SelfLink],
            ],
        )
        .unwrap();
        c.add_node("mixed", &labels(&[("pool", "public")]), &mixed);
        let pod = PodGpuRequest::from_app_requests([share(30, 4), share(20, 2)]);
        let cards: BTreeMap<Slot, Vec<u32>> = [(Slot::App(0), vec![1]), (Slot::App(1), vec![0])]
            .into_iter()
            .collect();
        let pins = PodPins::default();
        let place = Place::Node {
            node: "mixed",
            cards: &cards,
        };
        let sites = c.sites(&pod, &pins, &place);
        let v100 = c.charge(&pod, &pins, &sites, &Selector::new(Some("V100"), None));
        let a100 = c.charge(&pod, &pins, &sites, &Selector::new(Some("A100"), None));
        assert_eq!((v100.cores, v100.blocks), (30, 4));
        assert_eq!((a100.cores, a100.blocks), (20, 2));
        // Without card indices the whole node counts (both models).
        let none = BTreeMap::new();
        let sites = c.sites(
            &pod,
            &pins,
            &Place::Node {
                node: "mixed",
                cards: &none,
            },
        );
        let v100 = c.charge(&pod, &pins, &sites, &Selector::new(Some("V100"), None));
        assert_eq!(v100.cores, 50);
    }

    #[test]
    fn pod_no_card_can_take_yet_counts_against_limits_its_pins_allow() {
        let c = cluster();
        let pod = PodGpuRequest::from_app_requests([whole(2)]);
        let pins = PodPins::new(&PodSpec::default(), ModelFilter::new(["H100"]));
        let sites = c.sites(&pod, &pins, &Place::Pending);
        assert!(sites.containers[0].is_empty());
        let h100 = c.charge(&pod, &pins, &sites, &Selector::new(Some("H100"), None));
        assert_eq!(h100.cards, 2);
        let t4 = c.charge(&pod, &pins, &sites, &Selector::new(Some("T4"), None));
        assert!(t4.is_zero());
    }

    #[test]
    fn exceeding_a_limit_reports_used_requested_and_limit() {
        let q = Quota::new(None, &[], vec![limit(Some("A100"), None, 400)]).unwrap();
        let used = [Amount {
            cores: 300,
            blocks: 0,
            cards: 3,
        }];
        let ok = [Amount {
            cores: 100,
            blocks: 0,
            cards: 1,
        }];
        assert!(exceeded(&q, &used, &ok).is_empty());
        let big = [Amount {
            cores: 200,
            blocks: 0,
            cards: 2,
        }];
        let e = exceeded(&q, &used, &big);
        assert_eq!(e.len(), 1);
        assert_eq!(
            e[0].render(&ResourceNames::default()),
            "limits[0] (model \"A100\"): tencent.com/vcuda-core used 300 + requested 200 > limit 400"
        );
        // A pod the limit does not charge passes even when the limit is already over.
        let over = [Amount {
            cores: 900,
            blocks: 0,
            cards: 9,
        }];
        assert!(exceeded(&q, &over, &[Amount::default()]).is_empty());
    }

    #[test]
    fn invalid_quotas_are_rejected_with_every_problem() {
        let e = Quota::new(
            Some(&["  ".into()]),
            &[],
            vec![
                limit(None, None, 100),
                Limit {
                    selector: Selector::new(Some("T4"), None),
                    max: Max::default(),
                },
                limit(Some("T4"), None, 100),
            ],
        )
        .unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("limits[0] names neither a model nor a pool"),
            "{msg}"
        );
        assert!(msg.contains("ResourceQuota"), "{msg}");
        assert!(
            msg.contains("limits[1] (model \"T4\") bounds nothing"),
            "{msg}"
        );
        assert!(
            msg.contains("limits[2] repeats the selector of limits[1]"),
            "{msg}"
        );
        assert!(msg.contains("allowedModels[0]"), "{msg}");
    }

    #[test]
    fn allowed_models_and_pools_restrict_classes() {
        let c = cluster();
        let q = Quota::new(Some(&["T4".into()]), &["public".into()], vec![]).unwrap();
        let allowed: Vec<(&str, Option<&str>)> = c
            .classes()
            .iter()
            .filter(|k| q.allows(k))
            .map(|k| (k.model.as_str(), k.pool.as_deref()))
            .collect();
        assert_eq!(allowed, [("Tesla T4", Some("public"))]);
        let pod = PodGpuRequest::from_app_requests([whole(1)]);
        let sites = c.sites(&pod, &PodPins::default(), &Place::Pending);
        assert_eq!(c.disallowed(&q, &sites).len(), 2);
        let pins = PodPins::new(&PodSpec::default(), ModelFilter::new(["T4"]));
        let sites = c.sites(&pod, &pins, &Place::Pending);
        assert!(c.disallowed(&q, &sites).is_empty());
        // An empty allowed list (the old ConfigMap with no models) allows nothing.
        let none = Quota::new(Some(&[]), &[], vec![]).unwrap();
        assert!(c.classes().iter().all(|k| !none.allows(k)));
    }

    #[test]
    fn pods_no_card_can_take_must_pin_within_the_allowed_models_and_pools() {
        let q = Quota::new(Some(&["M40".into()]), &["public".into()], vec![]).unwrap();
        let pinned = PodSpec {
            node_selector: Some(labels(&[("pool", "public")])),
            ..Default::default()
        };
        let ok = PodPins::new(&pinned, ModelFilter::new(["Tesla M40"]));
        assert!(q.pins_within(&ok, &keys()));
        let wrong_model = PodPins::new(&pinned, ModelFilter::new(["P100"]));
        assert!(!q.pins_within(&wrong_model, &keys()));
        let no_pool = PodPins::new(&PodSpec::default(), ModelFilter::new(["M40"]));
        assert!(!q.pins_within(&no_pool, &keys()));
    }

    #[test]
    fn init_containers_count_as_the_kubelet_counts_them() {
        let c = cluster();
        let mut pod = PodGpuRequest::from_app_requests([whole(1)]);
        pod.containers.insert(
            0,
            ContainerGpu {
                slot: Slot::Init(0),
                name: "warmup".into(),
                request: GpuRequest::Whole { cards: 2 },
                sidecar: false,
            },
        );
        let pins = PodPins::default();
        let sites = c.sites(&pod, &pins, &Place::Pending);
        let a = c.charge(&pod, &pins, &sites, &Selector::new(Some("A100"), None));
        assert_eq!((a.cores, a.cards), (200, 2));
        assert_eq!(pod_amount(&pod).cards, 2);
    }

    #[test]
    fn model_label_replaces_the_inventory_model() {
        let mut c = ClusterCards::new(QuotaKeys {
            pool_label: "pool".into(),
            model_label: Some("gaia.tencent.com/gpu-model".into()),
            pin_labels: vec![],
        });
        let inv = NodeInventory::uniform(1, "GeForce GTX 1080 Ti", 11264, Link::Phb);
        c.add_node(
            "n",
            &labels(&[("gaia.tencent.com/gpu-model", "1080ti")]),
            &inv,
        );
        assert!(Selector::new(Some("1080ti"), None).matches(&c.classes()[0]));
        let spec = PodSpec {
            node_selector: Some(labels(&[("gaia.tencent.com/gpu-model", "M40")])),
            ..Default::default()
        };
        let pins = PodPins::new(&spec, ModelFilter::default());
        assert!(c.candidates(&pins).is_empty());
    }
}
