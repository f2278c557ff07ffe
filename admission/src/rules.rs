//! The validation rules for pods and pod templates, as pure functions.
//!
//! Every rule returns *problems*: one line each, naming the container (or annotation), the
//! value and the rule. The caller prefixes them with the object (`Deployment team-a/train: `).
//! On UPDATE only problems the old object did not already have deny the request, so objects
//! created before the webhook was installed can still be scaled, labelled or have their status
//! written.

use std::collections::BTreeMap;

use gm_core::annotations::{decode_core_limit, decode_limiter_disabled, PodAnnotations};
use gm_core::quota::{ClusterCards, PodPins};
use gm_core::request::{parse_container, GpuRequest, RequestError, RequestErrorKind, Slot};
use gm_core::resources::{blocks_for_mib, BLOCK_MIB};
use k8s_openapi::api::core::v1::{Container, PodSpec};

use crate::args::Settings;
use crate::review::{annotations, PodObject, WorkloadKind};

/// Problems and warnings found in one pod object.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Findings {
    pub problems: Vec<String>,
    pub warnings: Vec<String>,
}

/// The containers of a pod spec with their slots: init containers, then app containers.
pub fn containers(spec: &PodSpec) -> impl Iterator<Item = (Slot, &Container)> {
    let inits = spec
        .init_containers
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, c)| (Slot::Init(i), c));
    let apps = spec
        .containers
        .iter()
        .enumerate()
        .map(|(i, c)| (Slot::App(i), c));
    inits.chain(apps)
}

/// `container` or `init container`, for messages.
pub fn who(slot: Slot) -> &'static str {
    match slot {
        Slot::Init(_) => "init container",
        Slot::App(_) => "container",
    }
}

/// Render MiB as GiB when whole.
pub fn fmt_mib(mib: u64) -> String {
    if mib.is_multiple_of(1024) {
        format!("{} GiB", mib / 1024)
    } else {
        format!("{mib} MiB")
    }
}

/// The request shape rules (DESIGN §1, messages from core) and the card-memory rule.
///
/// `cards` is the cluster's card summary (`None` in standalone mode: the memory rule is
/// skipped).
pub fn shape(obj: &PodObject, settings: &Settings, cards: Option<&ClusterCards>) -> Findings {
    let names = &settings.names;
    let mut out = Findings::default();
    let mut shares: Vec<(Slot, &str, u32)> = Vec::new();
    for (slot, c) in containers(&obj.spec) {
        match parse_container(c, names) {
            Ok(Some(GpuRequest::Share { blocks, .. })) => shares.push((slot, &c.name, blocks)),
            Ok(_) => {}
            Err(RequestErrorKind::ShareWithoutMemory { cores })
                if settings.default_memory.is_some() && obj.kind != WorkloadKind::Pod =>
            {
                let blocks = settings.default_memory.unwrap_or_default();
                out.warnings.push(format!(
                    "{} {:?} asks for {}={cores} without {}: its pods get {}={blocks} ({}) from the webhook's default",
                    who(slot),
                    c.name,
                    names.core(),
                    names.memory(),
                    names.memory(),
                    fmt_mib(u64::from(blocks) * BLOCK_MIB)
                ));
            }
            Err(kind) => {
                let hint = matches!(kind, RequestErrorKind::ShareWithoutMemory { .. })
                    && settings.default_memory.is_some();
                let mut msg = RequestError {
                    container: c.name.clone(),
                    slot,
                    kind,
                }
                .render(names);
                if hint {
                    msg.push_str(
                        " (the mutating webhook fills it in from its default: check that /mutate is registered for pods)",
                    );
                }
                out.problems.push(msg);
            }
        }
    }
    if let Some(cards) = cards {
        memory_rule(obj, settings, cards, &shares, &mut out);
    }
    limiter_rule(obj, settings, &mut out);
    out
}

/// The limiter annotations of a GPU pod: `vcuda-limiter` is `disabled` or `enabled`, and
/// `vcuda-core-limit` (soft mode) is an integer from each share's vcuda-core to 100. gpu-manager
/// would ignore invalid values (limiting in hard mode), so the user hears of them here.
fn limiter_rule(obj: &PodObject, settings: &Settings, out: &mut Findings) {
    if !mentions_gpu(&obj.spec, settings) {
        return;
    }
    let keys = &settings.keys;
    let ann = annotations(&obj.meta);
    if let Some(v) = ann.get(&keys.limiter) {
        if let Err(e) = decode_limiter_disabled(&keys.limiter, v) {
            out.problems.push(e.to_string());
        }
    }
    let Some(v) = ann.get(&keys.core_limit) else {
        return;
    };
    let mut shares = 0;
    for (slot, c) in containers(&obj.spec) {
        if let Ok(Some(GpuRequest::Share { cores, .. })) = parse_container(c, &settings.names) {
            shares += 1;
            if let Err(e) = decode_core_limit(&keys.core_limit, v, cores) {
                out.problems
                    .push(format!("{} {:?}: {e}", who(slot), c.name));
            }
        }
    }
    if shares == 0 {
        out.warnings.push(format!(
            "annotation {}={v:?} has no effect: it sets soft mode for shares (1-99 vcuda-core), and this pod has none",
            keys.core_limit
        ));
    }
}

fn memory_rule(
    obj: &PodObject,
    settings: &Settings,
    cards: &ClusterCards,
    shares: &[(Slot, &str, u32)],
    out: &mut Findings,
) {
    if shares.is_empty() {
        return;
    }
    if cards.node_count() == 0 {
        out.warnings.push(
            "no node publishes a GPU inventory yet, so vcuda-memory was not checked against card sizes"
                .to_string(),
        );
        return;
    }
    let (ann, _) = PodAnnotations::decode(&settings.keys, annotations(&obj.meta));
    let pins = PodPins::new(&obj.spec, ann.filter.models.clone());
    let candidates = cards.candidates(&pins);
    let pinned = !ann.filter.models.is_empty() || candidates.len() < cards.classes().len();
    let Some(largest) = candidates
        .iter()
        .filter_map(|&i| cards.classes().get(i))
        .max_by_key(|c| c.memory_mib)
    else {
        out.warnings.push(format!(
            "no GPU in the cluster matches this pod's {} annotation or node selector; it stays Pending until one joins",
            settings.keys.gpu_models
        ));
        return;
    };
    let max_blocks = u64::from(blocks_for_mib(largest.memory_mib));
    let scope = if pinned {
        "the largest card this pod may use (after its GPU model and node constraints)"
    } else {
        "the largest card in the cluster"
    };
    for &(slot, name, blocks) in shares {
        if u64::from(blocks) > max_blocks {
            out.problems.push(format!(
                "{} {name:?}: {}={blocks} ({}) is larger than {scope}, {} with {} = {max_blocks} blocks of 256 MiB: ask for at most {max_blocks}",
                who(slot),
                settings.names.memory(),
                fmt_mib(u64::from(blocks) * BLOCK_MIB),
                largest.model,
                fmt_mib(largest.memory_mib),
            ));
        }
    }
}

/// The reserved-annotation rule: only privileged users may set, change or remove the
/// placement annotations (DESIGN §5). On UPDATE, keys the old object already had with the
/// same value pass.
pub fn reserved(
    new: &PodObject,
    old: Option<&PodObject>,
    user: &str,
    settings: &Settings,
) -> Vec<String> {
    if settings.privileged.contains(user) {
        return Vec::new();
    }
    let keys = &settings.keys;
    let new_ann = annotations(&new.meta);
    let empty = BTreeMap::new();
    let old_ann = old.map(|o| annotations(&o.meta)).unwrap_or(&empty);
    let owners = settings
        .privileged
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(", ");
    let user = if user.is_empty() { "<unknown>" } else { user };
    let mut out = Vec::new();
    let mut seen: Vec<&String> = new_ann.keys().chain(old_ann.keys()).collect();
    seen.sort();
    seen.dedup();
    for key in seen {
        if !keys.is_reserved(key) {
            continue;
        }
        let (was, now) = (old_ann.get(key), new_ann.get(key));
        if was == now {
            continue;
        }
        let what = match keys.parse_gpu_idx_key(key) {
            Some(slot) => {
                let name = container_name(&new.spec, slot)
                    .map(|n| format!("{} {n:?}", who(slot)))
                    .unwrap_or_else(|| format!("{slot}, which does not exist"));
                format!("annotation {key} (card indices of {name})")
            }
            None => format!("annotation {key}"),
        };
        let action = match (was, now) {
            (None, Some(v)) => format!("may not set it to {v:?}"),
            (Some(w), Some(v)) => format!("may not change it from {w:?} to {v:?}"),
            (Some(w), None) => format!("may not remove it (it was {w:?})"),
            (None, None) => continue,
        };
        out.push(format!(
            "{what} is reserved for the GPU scheduler extender and device plugin ({owners}); user {user:?} {action}: remove it from the object (placement is chosen at scheduling time)"
        ));
    }
    out
}

fn container_name(spec: &PodSpec, slot: Slot) -> Option<&str> {
    match slot {
        Slot::App(i) => spec.containers.get(i).map(|c| c.name.as_str()),
        Slot::Init(i) => spec
            .init_containers
            .as_ref()
            .and_then(|v| v.get(i))
            .map(|c| c.name.as_str()),
    }
}

/// True when any container mentions one of our resources (valid or not).
pub fn mentions_gpu(spec: &PodSpec, settings: &Settings) -> bool {
    let names = [settings.names.core(), settings.names.memory()];
    containers(spec).any(|(_, c)| {
        c.resources.as_ref().is_some_and(|r| {
            [r.limits.as_ref(), r.requests.as_ref()]
                .into_iter()
                .flatten()
                .any(|m| names.iter().any(|n| m.contains_key(*n)))
        })
    })
}
