//! Every annotation and label key the system owns, with its codec (DESIGN §5).
//!
//! | key (default domain) | on | writer | value |
//! |---|---|---|---|
//! | `tencent.com/predicate-gpu-idx-<i>` | pod | extender at bind | card indices of `spec.containers[i]`, ascending, comma-separated |
//! | `tencent.com/predicate-gpu-idx-init-<i>` | pod | extender at bind | the same for `spec.initContainers[i]` (ours; TKEStack ignored init containers) |
//! | `tencent.com/predicate-node` | pod | extender at bind | node name |
//! | `tencent.com/predicate-time` | pod | extender at bind | unix nanoseconds |
//! | `tencent.com/gpu-assigned` | pod | extender `false`, device plugin `true` | |
//! | `tencent.com/gpu-models` | pod | user | allowed GPU models, comma-separated (see [`ModelFilter`]) |
//! | `tencent.com/gpu-uuid-include` | pod | user | only these card UUIDs, comma-separated |
//! | `tencent.com/gpu-uuid-exclude` | pod | user | never these card UUIDs, comma-separated |
//! | `tencent.com/gpu-policy` | pod | user | placement policy for this pod (`binpack`, `spread`, `topology`, …) |
//! | `tencent.com/vcuda-core-limit` | pod | user | soft mode: a share may use up to this percent of its card while the card has idle time (TKEStack's key; integer, the share's vcuda-core to 100) |
//! | `tencent.com/vcuda-limiter` | pod | user | `disabled`: no in-container limiter for this pod's containers (no memory cap, no compute share); see [`LIMITER_DISABLED`] |
//! | `tencent.com/gpu-inventory` | node | device plugin | the node inventory JSON ([`crate::inventory`]) |
//! | label `tencent.com/gpu-model` | node | device plugin | model of card 0, label-safe |
//! | label `tencent.com/gpu-count` | node | device plugin | number of cards |
//! | label `tencent.com/gpu-memory-mib` | node | device plugin | memory of the largest card in MiB |
//!
//! The `predicate-*` keys and `gpu-assigned` are **reserved**: only the extender and the device
//! plugin may write them, so nobody can steer a pod onto a card another pod holds.

use std::collections::BTreeMap;
use std::fmt;

use crate::inventory::Card;
use crate::request::Slot;
use crate::resources::{ResourceNames, DEFAULT_DOMAIN};

/// Most card indices one annotation value may list.
pub const MAX_CARDS_IN_VALUE: usize = 64;

/// All keys under one domain.
#[derive(Clone, PartialEq, Eq)]
pub struct Keys {
    domain: String,
    idx_prefix: String,
    init_idx_prefix: String,
    pub predicate_node: String,
    pub predicate_time: String,
    pub gpu_assigned: String,
    pub gpu_models: String,
    pub uuid_include: String,
    pub uuid_exclude: String,
    pub policy: String,
    pub core_limit: String,
    pub limiter: String,
    pub inventory: String,
    pub label_model: String,
    pub label_count: String,
    pub label_memory: String,
}

impl fmt::Debug for Keys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keys")
            .field("domain", &self.domain)
            .finish()
    }
}

impl Default for Keys {
    fn default() -> Self {
        Self::for_domain(DEFAULT_DOMAIN)
    }
}

impl Keys {
    /// Keys under the domain of `names`.
    pub fn new(names: &ResourceNames) -> Self {
        Self::for_domain(names.domain())
    }

    fn for_domain(d: &str) -> Self {
        Self {
            domain: d.to_string(),
            idx_prefix: format!("{d}/predicate-gpu-idx-"),
            init_idx_prefix: format!("{d}/predicate-gpu-idx-init-"),
            predicate_node: format!("{d}/predicate-node"),
            predicate_time: format!("{d}/predicate-time"),
            gpu_assigned: format!("{d}/gpu-assigned"),
            gpu_models: format!("{d}/gpu-models"),
            uuid_include: format!("{d}/gpu-uuid-include"),
            uuid_exclude: format!("{d}/gpu-uuid-exclude"),
            policy: format!("{d}/gpu-policy"),
            core_limit: format!("{d}/vcuda-core-limit"),
            limiter: format!("{d}/vcuda-limiter"),
            inventory: format!("{d}/gpu-inventory"),
            label_model: format!("{d}/gpu-model"),
            label_count: format!("{d}/gpu-count"),
            label_memory: format!("{d}/gpu-memory-mib"),
        }
    }

    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// The card-index key of a container slot.
    pub fn gpu_idx(&self, slot: Slot) -> String {
        match slot {
            Slot::App(i) => format!("{}{i}", self.idx_prefix),
            Slot::Init(i) => format!("{}{i}", self.init_idx_prefix),
        }
    }

    /// Which container slot a card-index key belongs to, if it is one.
    pub fn parse_gpu_idx_key(&self, key: &str) -> Option<Slot> {
        if let Some(rest) = key.strip_prefix(&self.init_idx_prefix) {
            return parse_index(rest).map(Slot::Init);
        }
        let rest = key.strip_prefix(&self.idx_prefix)?;
        parse_index(rest).map(Slot::App)
    }

    /// True for keys only the extender and the device plugin may set.
    pub fn is_reserved(&self, key: &str) -> bool {
        key == self.predicate_node
            || key == self.predicate_time
            || key == self.gpu_assigned
            || key.starts_with(&self.idx_prefix)
    }
}

fn parse_index(s: &str) -> Option<usize> {
    if s.is_empty() || s.len() > 4 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if s.len() > 1 && s.starts_with('0') {
        return None;
    }
    s.parse().ok()
}

/// An annotation value could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("annotation {key}={value:?} is invalid: {problem}")]
pub struct AnnotationError {
    pub key: String,
    pub value: String,
    pub problem: String,
}

impl AnnotationError {
    fn new(key: &str, value: &str, problem: impl Into<String>) -> Self {
        Self {
            key: key.to_string(),
            value: value.to_string(),
            problem: problem.into(),
        }
    }
}

/// Encode card indices: ascending, de-duplicated, comma-separated, no spaces (`0,1`).
pub fn encode_cards(cards: &[u32]) -> String {
    let mut v = cards.to_vec();
    v.sort_unstable();
    v.dedup();
    let parts: Vec<String> = v.iter().map(u32::to_string).collect();
    parts.join(",")
}

/// Decode card indices strictly: decimal, comma-separated, no spaces, no duplicates, not empty,
/// at most [`MAX_CARDS_IN_VALUE`]. The result is ascending.
pub fn decode_cards(key: &str, value: &str) -> Result<Vec<u32>, AnnotationError> {
    const FORM: &str = "use card indices such as 0 or 0,1 (decimal, comma-separated, no spaces)";
    if value.is_empty() {
        return Err(AnnotationError::new(
            key,
            value,
            format!("it is empty; {FORM}"),
        ));
    }
    let mut out = Vec::new();
    for part in value.split(',') {
        let ok = !part.is_empty()
            && part.len() <= 3
            && part.bytes().all(|b| b.is_ascii_digit())
            && !(part.len() > 1 && part.starts_with('0'));
        if !ok {
            return Err(AnnotationError::new(
                key,
                value,
                format!("{part:?} is not a card index; {FORM}"),
            ));
        }
        let idx: u32 = part
            .parse()
            .map_err(|_| AnnotationError::new(key, value, FORM))?;
        if out.contains(&idx) {
            return Err(AnnotationError::new(
                key,
                value,
                format!("card {idx} is listed twice"),
            ));
        }
        out.push(idx);
        if out.len() > MAX_CARDS_IN_VALUE {
            return Err(AnnotationError::new(
                key,
                value,
                format!("more than {MAX_CARDS_IN_VALUE} cards"),
            ));
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// Encode a predicate time (unix nanoseconds).
pub fn encode_time(unix_nanos: u64) -> String {
    unix_nanos.to_string()
}

/// Decode a predicate time (unix nanoseconds, decimal).
pub fn decode_time(key: &str, value: &str) -> Result<u64, AnnotationError> {
    if value.is_empty() || value.len() > 20 || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(AnnotationError::new(
            key,
            value,
            "use unix time in nanoseconds, e.g. 1597394179983794058",
        ));
    }
    value
        .parse()
        .map_err(|_| AnnotationError::new(key, value, "the number is too large"))
}

/// The value of the `vcuda-limiter` annotation that turns the limiter off for a pod.
pub const LIMITER_DISABLED: &str = "disabled";
/// The value of the `vcuda-limiter` annotation that asks for the limiter (the default).
pub const LIMITER_ENABLED: &str = "enabled";

/// Decode the `vcuda-limiter` annotation: `true` when the pod opts out of the limiter.
pub fn decode_limiter_disabled(key: &str, value: &str) -> Result<bool, AnnotationError> {
    match value {
        LIMITER_DISABLED => Ok(true),
        LIMITER_ENABLED => Ok(false),
        _ => Err(AnnotationError::new(
            key,
            value,
            format!("use {LIMITER_DISABLED:?} to run the pod without the limiter (no memory cap, no compute share) or {LIMITER_ENABLED:?} (the default)"),
        )),
    }
}

/// Decode TKEStack's `vcuda-core-limit` (soft mode) for a share of `cores` percent: a decimal
/// integer from `cores` to 100.
pub fn decode_core_limit(key: &str, value: &str, cores: u32) -> Result<u32, AnnotationError> {
    let form = || format!("use a whole percentage from the share's vcuda-core ({cores}) to 100");
    let v = value.trim();
    if v.is_empty() || v.len() > 3 || !v.bytes().all(|b| b.is_ascii_digit()) {
        return Err(AnnotationError::new(
            key,
            value,
            format!("it is not an integer; {}", form()),
        ));
    }
    let n: u32 = v
        .parse()
        .map_err(|_| AnnotationError::new(key, value, form()))?;
    if n < cores || n > 100 {
        return Err(AnnotationError::new(
            key,
            value,
            format!("{n} is outside {cores} to 100; {}", form()),
        ));
    }
    Ok(n)
}

/// Encode the assigned flag.
pub fn encode_bool(v: bool) -> &'static str {
    if v {
        "true"
    } else {
        "false"
    }
}

/// Decode the assigned flag (`true` / `false`, exactly).
pub fn decode_bool(key: &str, value: &str) -> Result<bool, AnnotationError> {
    match value {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(AnnotationError::new(key, value, "use true or false")),
    }
}

/// Split a user list (`a, b,c`) into trimmed non-empty entries.
pub fn decode_list(value: &str) -> Vec<String> {
    value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// Which GPU models a pod accepts. An entry matches a card when it equals the model name, or
/// when its words appear as consecutive words of the model name; both ignore case, and words
/// are split on anything that is not a letter or digit. So `A100` and `a100-sxm4` match
/// `NVIDIA A100-SXM4-40GB`, `T4` matches `Tesla T4`, but `T4` does not match `RTX 4090` and
/// `V100M16` does not match `V100M32`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModelFilter {
    entries: Vec<Vec<String>>,
    raw: Vec<String>,
}

fn words(s: &str) -> Vec<String> {
    s.split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_ascii_lowercase)
        .collect()
}

impl ModelFilter {
    /// A filter from entries; an empty list accepts every model.
    pub fn new<S: AsRef<str>>(entries: impl IntoIterator<Item = S>) -> Self {
        let raw: Vec<String> = entries
            .into_iter()
            .map(|s| s.as_ref().trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
        let entries = raw
            .iter()
            .map(|e| words(e))
            .filter(|w| !w.is_empty())
            .collect();
        Self { entries, raw }
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entries as the user wrote them.
    pub fn entries(&self) -> &[String] {
        &self.raw
    }

    pub fn matches(&self, model: &str) -> bool {
        if self.entries.is_empty() {
            return true;
        }
        let m = words(model);
        self.entries
            .iter()
            .any(|e| m.windows(e.len()).any(|w| w == e.as_slice()))
    }
}

/// The user's placement constraints on a pod, from its annotations.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CardFilter {
    pub models: ModelFilter,
    pub include_uuids: Vec<String>,
    pub exclude_uuids: Vec<String>,
}

impl CardFilter {
    /// May the pod use this card?
    pub fn allows(&self, card: &Card) -> bool {
        self.models.matches(&card.model)
            && (self.include_uuids.is_empty() || self.include_uuids.contains(&card.uuid))
            && !self.exclude_uuids.contains(&card.uuid)
    }

    pub fn is_unconstrained(&self) -> bool {
        self.models.is_empty() && self.include_uuids.is_empty() && self.exclude_uuids.is_empty()
    }
}

/// Everything the system reads from a pod's annotations.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodAnnotations {
    /// Card indices per container slot, from `predicate-gpu-idx-*`.
    pub cards: BTreeMap<Slot, Vec<u32>>,
    pub node: Option<String>,
    pub time: Option<u64>,
    pub assigned: Option<bool>,
    pub filter: CardFilter,
    pub policy: Option<String>,
    /// `vcuda-core-limit` as written (checked against each share with [`decode_core_limit`]).
    pub core_limit: Option<String>,
    /// `vcuda-limiter=disabled`: the pod opts out of the in-container limiter.
    pub limiter_disabled: bool,
}

impl PodAnnotations {
    /// Decode every key we own. Invalid values are returned as errors next to the values that
    /// did decode, so callers can both act and report.
    pub fn decode(
        keys: &Keys,
        annotations: &BTreeMap<String, String>,
    ) -> (Self, Vec<AnnotationError>) {
        let mut out = Self::default();
        let mut errors = Vec::new();
        for (k, v) in annotations {
            if let Some(slot) = keys.parse_gpu_idx_key(k) {
                match decode_cards(k, v) {
                    Ok(c) => {
                        out.cards.insert(slot, c);
                    }
                    Err(e) => errors.push(e),
                }
            } else if *k == keys.predicate_node {
                if v.is_empty() {
                    errors.push(AnnotationError::new(k, v, "use the node name"));
                } else {
                    out.node = Some(v.clone());
                }
            } else if *k == keys.predicate_time {
                match decode_time(k, v) {
                    Ok(t) => out.time = Some(t),
                    Err(e) => errors.push(e),
                }
            } else if *k == keys.gpu_assigned {
                match decode_bool(k, v) {
                    Ok(b) => out.assigned = Some(b),
                    Err(e) => errors.push(e),
                }
            } else if *k == keys.gpu_models {
                out.filter.models = ModelFilter::new(decode_list(v));
            } else if *k == keys.uuid_include {
                out.filter.include_uuids = decode_list(v);
            } else if *k == keys.uuid_exclude {
                out.filter.exclude_uuids = decode_list(v);
            } else if *k == keys.policy {
                out.policy = Some(v.trim().to_string());
            } else if *k == keys.core_limit {
                out.core_limit = Some(v.clone());
            } else if *k == keys.limiter {
                match decode_limiter_disabled(k, v) {
                    Ok(d) => out.limiter_disabled = d,
                    Err(e) => errors.push(e),
                }
            }
        }
        (out, errors)
    }

    /// True when the extender has placed the pod (it carries a node and card indices).
    pub fn is_placed(&self) -> bool {
        self.node.is_some() && !self.cards.is_empty()
    }
}

/// The annotations the extender writes at bind.
pub fn encode_placement(
    keys: &Keys,
    node: &str,
    cards: &BTreeMap<Slot, Vec<u32>>,
    unix_nanos: u64,
) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for (slot, c) in cards {
        out.insert(keys.gpu_idx(*slot), encode_cards(c));
    }
    out.insert(keys.predicate_node.clone(), node.to_string());
    out.insert(keys.predicate_time.clone(), encode_time(unix_nanos));
    out.insert(keys.gpu_assigned.clone(), encode_bool(false).to_string());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn keys_are_tkestack_compatible() {
        let k = Keys::default();
        assert_eq!(k.gpu_idx(Slot::App(0)), "tencent.com/predicate-gpu-idx-0");
        assert_eq!(
            k.gpu_idx(Slot::Init(2)),
            "tencent.com/predicate-gpu-idx-init-2"
        );
        assert_eq!(k.predicate_node, "tencent.com/predicate-node");
        assert_eq!(k.predicate_time, "tencent.com/predicate-time");
        assert_eq!(k.gpu_assigned, "tencent.com/gpu-assigned");
    }

    #[test]
    fn keys_follow_the_configured_domain() {
        let k = Keys::new(&ResourceNames::new("gpu.example.org").unwrap());
        assert_eq!(
            k.gpu_idx(Slot::App(3)),
            "gpu.example.org/predicate-gpu-idx-3"
        );
        assert!(k.is_reserved("gpu.example.org/gpu-assigned"));
        assert!(!k.is_reserved("tencent.com/gpu-assigned"));
    }

    #[test]
    fn reserved_keys_are_exactly_the_scheduler_and_plugin_ones() {
        let k = Keys::default();
        for key in [
            "tencent.com/predicate-gpu-idx-0",
            "tencent.com/predicate-gpu-idx-init-1",
            "tencent.com/predicate-node",
            "tencent.com/predicate-time",
            "tencent.com/gpu-assigned",
        ] {
            assert!(k.is_reserved(key), "{key}");
        }
        for key in [
            "tencent.com/gpu-models",
            "tencent.com/gpu-uuid-exclude",
            "tencent.com/vcuda-core-limit",
            "example.com/predicate-node",
            "my.tencent.com/predicate-node-x",
        ] {
            assert!(!k.is_reserved(key), "{key}");
        }
    }

    #[test]
    fn idx_keys_map_back_to_slots() {
        let k = Keys::default();
        assert_eq!(
            k.parse_gpu_idx_key("tencent.com/predicate-gpu-idx-12"),
            Some(Slot::App(12))
        );
        assert_eq!(
            k.parse_gpu_idx_key("tencent.com/predicate-gpu-idx-init-0"),
            Some(Slot::Init(0))
        );
        for bad in [
            "tencent.com/predicate-gpu-idx-",
            "tencent.com/predicate-gpu-idx--1",
            "tencent.com/predicate-gpu-idx-01",
            "tencent.com/predicate-gpu-idx-x",
            "tencent.com/predicate-node",
        ] {
            assert_eq!(k.parse_gpu_idx_key(bad), None, "{bad}");
        }
    }

    #[test]
    fn card_lists_encode_ascending_without_spaces() {
        assert_eq!(encode_cards(&[3, 1, 2, 1]), "1,2,3");
        assert_eq!(encode_cards(&[0]), "0");
    }

    #[test]
    fn malformed_card_lists_name_the_key_and_the_form() {
        for bad in ["", "0, 1", "0,x", "-1", "0,,1", "1,1", "01", "1000"] {
            let e = decode_cards("k", bad).unwrap_err();
            assert!(e.to_string().starts_with("annotation k="), "{e}");
        }
        assert_eq!(decode_cards("k", "3,0,1"), Ok(vec![0, 1, 3]));
    }

    #[test]
    fn time_and_flag_codecs_are_strict() {
        assert_eq!(
            decode_time("t", "1597394179983794058"),
            Ok(1597394179983794058)
        );
        assert!(decode_time("t", "-1").is_err());
        assert!(decode_time("t", "99999999999999999999").is_err());
        assert_eq!(decode_bool("a", "true"), Ok(true));
        assert!(decode_bool("a", "True").is_err());
    }

    #[test]
    fn model_filter_matches_whole_words_ignoring_case() {
        let f = ModelFilter::new(["A100"]);
        assert!(f.matches("NVIDIA A100-SXM4-40GB"));
        assert!(!f.matches("Tesla V100-SXM2-32GB"));
        let f = ModelFilter::new(["t4"]);
        assert!(f.matches("Tesla T4"));
        assert!(!f.matches("NVIDIA GeForce RTX 4090"));
        let f = ModelFilter::new(["V100M16"]);
        assert!(!f.matches("V100M32"));
        let f = ModelFilter::new(["a100-sxm4", "H100"]);
        assert!(f.matches("NVIDIA A100-SXM4-80GB"));
        assert!(f.matches("NVIDIA H100 80GB HBM3"));
        assert!(ModelFilter::new(Vec::<String>::new()).matches("anything"));
    }

    #[test]
    fn decode_collects_values_and_errors_side_by_side() {
        let k = Keys::default();
        let ann: BTreeMap<String, String> = [
            ("tencent.com/predicate-gpu-idx-0", "1,0"),
            ("tencent.com/predicate-gpu-idx-1", "0, 1"),
            ("tencent.com/predicate-node", "n1"),
            ("tencent.com/predicate-time", "42"),
            ("tencent.com/gpu-assigned", "false"),
            ("tencent.com/gpu-models", "A100, H100"),
            ("tencent.com/gpu-uuid-exclude", "GPU-x"),
            ("unrelated", "v"),
        ]
        .into_iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
        let (p, errs) = PodAnnotations::decode(&k, &ann);
        assert_eq!(p.cards.get(&Slot::App(0)), Some(&vec![0, 1]));
        assert!(!p.cards.contains_key(&Slot::App(1)));
        assert_eq!(errs.len(), 1);
        assert_eq!(p.node.as_deref(), Some("n1"));
        assert_eq!(p.time, Some(42));
        assert_eq!(p.assigned, Some(false));
        assert_eq!(p.filter.models.entries(), ["A100", "H100"]);
        assert_eq!(p.filter.exclude_uuids, ["GPU-x"]);
        assert!(p.is_placed());
    }

    #[test]
    fn limiter_annotations_decode_strictly() {
        let k = Keys::default();
        assert_eq!(k.core_limit, "tencent.com/vcuda-core-limit");
        assert_eq!(k.limiter, "tencent.com/vcuda-limiter");
        assert!(!k.is_reserved(&k.limiter));
        let ann: BTreeMap<String, String> = [
            ("tencent.com/vcuda-core-limit", "80"),
            ("tencent.com/vcuda-limiter", "disabled"),
        ]
        .into_iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
        let (p, errs) = PodAnnotations::decode(&k, &ann);
        assert!(errs.is_empty());
        assert!(p.limiter_disabled);
        assert_eq!(p.core_limit.as_deref(), Some("80"));
        let mut bad = ann.clone();
        bad.insert(k.limiter.clone(), "off".into());
        let (p, errs) = PodAnnotations::decode(&k, &bad);
        assert!(
            !p.limiter_disabled,
            "anything but `disabled` keeps the limiter"
        );
        assert!(
            errs[0].to_string().contains("use \"disabled\""),
            "{}",
            errs[0]
        );
        assert_eq!(decode_limiter_disabled("k", "enabled"), Ok(false));

        assert_eq!(decode_core_limit("k", "80", 30), Ok(80));
        assert_eq!(decode_core_limit("k", "30", 30), Ok(30));
        assert_eq!(decode_core_limit("k", "100", 30), Ok(100));
        for (bad, why) in [
            ("20", "outside 30 to 100"),
            ("101", "outside 30 to 100"),
            ("8O", "not an integer"),
            ("-5", "not an integer"),
            ("", "not an integer"),
            ("50%", "not an integer"),
        ] {
            let e = decode_core_limit("tencent.com/vcuda-core-limit", bad, 30).unwrap_err();
            assert!(e.to_string().contains(why), "{bad}: {e}");
            assert!(
                e.to_string()
                    .contains("from the share's vcuda-core (30) to 100"),
                "{e}"
            );
        }
    }

    #[test]
    fn placement_round_trips_through_annotations() {
        let k = Keys::default();
        let cards: BTreeMap<Slot, Vec<u32>> =
            [(Slot::App(0), vec![2, 0]), (Slot::Init(0), vec![2])].into();
        let ann = encode_placement(&k, "node-a", &cards, 7);
        assert_eq!(ann["tencent.com/predicate-gpu-idx-0"], "0,2");
        assert_eq!(ann["tencent.com/gpu-assigned"], "false");
        let (p, errs) = PodAnnotations::decode(&k, &ann);
        assert!(errs.is_empty());
        assert_eq!(p.cards[&Slot::App(0)], vec![0, 2]);
        assert_eq!(p.cards[&Slot::Init(0)], vec![2]);
        assert_eq!((p.node.as_deref(), p.time), (Some("node-a"), Some(7)));
    }

    proptest! {
        #[test]
        fn card_lists_round_trip(mut v in proptest::collection::btree_set(0u32..64, 1..8)) {
            let cards: Vec<u32> = std::mem::take(&mut v).into_iter().collect();
            prop_assert_eq!(decode_cards("k", &encode_cards(&cards)).unwrap(), cards);
        }

        #[test]
        fn decoding_never_panics(s in "\\PC{0,30}") {
            let _ = decode_cards("k", &s);
            let _ = decode_time("k", &s);
            let _ = ModelFilter::new([s.as_str()]).matches("NVIDIA A100");
        }
    }
}
