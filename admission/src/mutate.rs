//! Opt-in mutation of GPU pods at creation, as RFC 6902 JSON patches:
//!
//! * `--set-scheduler-name`: GPU pods that use the default scheduler (no `schedulerName`, or
//!   `default-scheduler`) get the configured scheduler. Pods naming another scheduler are left
//!   alone (with a warning).
//! * `--default-vcuda-memory`: a container asking for a share of a card (vcuda-core 1-99)
//!   without vcuda-memory gets the default in `limits` (and in `requests` when it lists
//!   vcuda-core there, since requests must equal limits).
//!
//! Only pods are mutated, never workload templates: changing a Deployment's template would
//! fight GitOps tools that own it, and its pods are mutated when they are created anyway.

use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, Patch, PatchOperation};
use serde_json::{json, Value};

use gm_core::request::{parse_container, RequestErrorKind, Slot};

use crate::args::Settings;
use crate::review::PodObject;
use crate::rules::{containers, mentions_gpu, who};

/// The scheduler Kubernetes uses when a pod names none.
pub const DEFAULT_SCHEDULER: &str = "default-scheduler";

/// Patches and warnings for one pod.
#[derive(Debug, Default)]
pub struct Mutation {
    pub patch: Vec<PatchOperation>,
    pub warnings: Vec<String>,
}

impl Mutation {
    /// The patch, if there is anything to change.
    pub fn into_patch(self) -> (Option<Patch>, Vec<String>) {
        let patch = (!self.patch.is_empty()).then_some(Patch(self.patch));
        (patch, self.warnings)
    }
}

fn add(tokens: &[&str], value: Value) -> PatchOperation {
    PatchOperation::Add(AddOperation {
        path: PointerBuf::from_tokens(tokens.iter().copied()),
        value,
    })
}

/// What to change in a pod being created.
pub fn mutate_pod(pod: &PodObject, settings: &Settings) -> Mutation {
    let mut m = Mutation::default();
    if !mentions_gpu(&pod.spec, settings) {
        return m;
    }
    if let Some(want) = &settings.scheduler_name {
        match pod.spec.scheduler_name.as_deref() {
            Some(s) if s == want => {}
            None | Some(DEFAULT_SCHEDULER) => {
                m.patch
                    .push(add(&["spec", "schedulerName"], Value::String(want.clone())));
            }
            Some(other) => m.warnings.push(format!(
                "schedulerName {other:?} was kept: GPU placement needs the gpu-admission extender, which {want:?} is configured with"
            )),
        }
    }
    if let Some(blocks) = settings.default_memory {
        let mem = settings.names.memory();
        let core = settings.names.core();
        let value = Value::String(blocks.to_string());
        for (slot, c) in containers(&pod.spec) {
            let Err(RequestErrorKind::ShareWithoutMemory { .. }) =
                parse_container(c, &settings.names)
            else {
                continue;
            };
            let (list, i) = match slot {
                Slot::Init(i) => ("initContainers", i.to_string()),
                Slot::App(i) => ("containers", i.to_string()),
            };
            let base = ["spec", list, i.as_str(), "resources"];
            let res = c.resources.as_ref();
            let in_requests = res
                .and_then(|r| r.requests.as_ref())
                .is_some_and(|r| r.contains_key(core));
            match res {
                None => {
                    m.patch
                        .push(add(&base, json!({ "limits": { mem: value } })));
                }
                Some(r) => {
                    if r.limits.is_some() {
                        let mut p = base.to_vec();
                        p.extend(["limits", mem]);
                        m.patch.push(add(&p, value.clone()));
                    } else {
                        let mut p = base.to_vec();
                        p.push("limits");
                        m.patch.push(add(&p, json!({ mem: value })));
                    }
                    if in_requests {
                        let mut p = base.to_vec();
                        p.extend(["requests", mem]);
                        m.patch.push(add(&p, value.clone()));
                    }
                }
            }
            m.warnings.push(format!(
                "{} {:?}: set {mem}={blocks} ({} MiB) from the webhook default, because a share of a card needs memory",
                who(slot),
                c.name,
                u64::from(blocks) * gm_core::resources::BLOCK_MIB
            ));
        }
    }
    m
}
