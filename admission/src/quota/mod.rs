//! GPU quota per model or pool: sources (GpuQuota CRD, old ConfigMap), enforcement at pod
//! creation and the usage published in GpuQuota status. The accounting itself lives in
//! [`gm_core::quota`].

pub mod legacy;
pub(crate) mod sources;
pub(crate) mod status;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gm_core::annotations::PodAnnotations;
use gm_core::quota::{
    exceeded, Amount, ClusterCards, Place, PodPins, PodSites, Quota, QuotaSpecError,
};
use gm_core::PodGpuRequest;
use k8s_openapi::api::core::v1::Pod;

use crate::args::Settings;
use crate::review::{annotations, PodObject};

/// A quota with where it came from, for messages.
#[derive(Debug, Clone)]
pub struct NamedQuota {
    /// e.g. `GpuQuota team-a/gpu` or `gpuquota ConfigMap kube-system/gpuquota (namespace "team-a")`.
    pub source: String,
    pub quota: Result<Quota, QuotaSpecError>,
}

/// What the accounting needs to know about one pod.
#[derive(Debug, Clone)]
pub(crate) struct PodFacts {
    pub uid: String,
    pub request: PodGpuRequest,
    pub pins: PodPins,
    pub sites: PodSites,
}

/// Facts of a live pod; `None` for pods that hold no GPU (no request, invalid request,
/// finished).
pub(crate) fn facts(pod: &Pod, cards: &ClusterCards, settings: &Settings) -> Option<PodFacts> {
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    if matches!(phase, Some("Succeeded" | "Failed")) {
        return None;
    }
    let spec = pod.spec.as_ref()?;
    let request = PodGpuRequest::from_pod_spec(spec, &settings.names).ok()?;
    if request.is_empty() {
        return None;
    }
    let (ann, _) = PodAnnotations::decode(&settings.keys, annotations(&pod.metadata));
    let pins = PodPins::new(spec, ann.filter.models.clone());
    let node = spec
        .node_name
        .as_deref()
        .filter(|n| !n.is_empty())
        .or(ann.node.as_deref());
    let place = match node {
        Some(node) => Place::Node {
            node,
            cards: &ann.cards,
        },
        None => Place::Pending,
    };
    let sites = cards.sites(&request, &pins, &place);
    let uid = pod.metadata.uid.clone().unwrap_or_else(|| {
        format!(
            "{}/{}",
            pod.metadata.namespace.as_deref().unwrap_or_default(),
            pod.metadata.name.as_deref().unwrap_or_default()
        )
    });
    Some(PodFacts {
        uid,
        request,
        pins,
        sites,
    })
}

/// Charges of one pod against every limit of a quota.
pub(crate) fn charges(quota: &Quota, cards: &ClusterCards, pod: &PodFacts) -> Vec<Amount> {
    quota
        .limits()
        .iter()
        .map(|l| cards.charge(&pod.request, &pod.pins, &pod.sites, &l.selector))
        .collect()
}

/// Usage of every limit of a quota by a set of pods.
pub(crate) fn usage<'a>(
    quota: &Quota,
    cards: &ClusterCards,
    pods: impl IntoIterator<Item = &'a PodFacts>,
) -> Vec<Amount> {
    let mut used = vec![Amount::default(); quota.limits().len()];
    for pod in pods {
        for (u, c) in used.iter_mut().zip(charges(quota, cards, pod)) {
            *u = u.plus(c);
        }
    }
    used
}

struct Reservation {
    namespace: String,
    pod: Arc<Pod>,
    at: Instant,
}

/// Admission-time enforcement. Checks and reservations are serialised, so two pods admitted
/// at the same time cannot both take the last of a limit; an admitted pod counts until the
/// cluster cache shows it, or for the reservation TTL.
pub(crate) struct Enforcer {
    reservations: Mutex<HashMap<String, Reservation>>,
    ttl: Duration,
}

/// Why a pod was not admitted under quota.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum QuotaDenial {
    /// Quota state is not known yet.
    NotSynced(String),
    /// A quota forbids or cannot hold the pod.
    Denied(String),
}

impl Enforcer {
    pub(crate) fn new(ttl: Duration) -> Self {
        Self {
            reservations: Mutex::new(HashMap::new()),
            ttl,
        }
    }

    /// Check a pod being created against the quotas of its namespace and, unless `dry_run`,
    /// count it from now on.
    pub(crate) fn admit(
        &self,
        obj: &PodObject,
        dry_run: bool,
        quotas: &[NamedQuota],
        cards: &ClusterCards,
        live: impl FnOnce() -> Vec<Arc<Pod>>,
        settings: &Settings,
    ) -> Result<(), QuotaDenial> {
        if quotas.is_empty() {
            return Ok(());
        }
        let pod = Arc::new(obj.to_pod());
        let Some(new) = facts(&pod, cards, settings) else {
            return Ok(());
        };
        let ns = obj.object.namespace.clone().unwrap_or_default();
        let mut problems = Vec::new();
        let Ok(mut reservations) = self.reservations.lock() else {
            return Err(QuotaDenial::NotSynced(
                "the quota reservation table is unavailable after an internal error".into(),
            ));
        };
        // Read the cache under the lock: a reservation is dropped once a read shows its pod,
        // so every later check must see at least that read.
        let live: Vec<PodFacts> = live()
            .iter()
            .filter_map(|p| facts(p, cards, settings))
            .filter(|f| f.uid != new.uid)
            .collect();
        let now = Instant::now();
        reservations.retain(|uid, r| {
            now.duration_since(r.at) < self.ttl && !live.iter().any(|f| &f.uid == uid)
        });
        let reserved: Vec<PodFacts> = reservations
            .iter()
            .filter(|(uid, r)| r.namespace == ns && **uid != new.uid)
            .filter_map(|(_, r)| facts(&r.pod, cards, settings))
            .collect();
        for named in quotas {
            let quota = match &named.quota {
                Ok(q) => q,
                Err(e) => {
                    problems.push(format!(
                        "{} is invalid ({e}), so GPU pods in namespace {ns:?} are denied until it is fixed",
                        named.source
                    ));
                    continue;
                }
            };
            if let Some(p) = restriction(quota, named, cards, &new, settings) {
                problems.push(p);
                continue;
            }
            let used = usage(quota, cards, live.iter().chain(&reserved));
            let request = charges(quota, cards, &new);
            for e in exceeded(quota, &used, &request) {
                let containers = charged_containers(quota, cards, &new, e.limit);
                problems.push(format!(
                    "exceeds {}: {} (requested by {containers})",
                    named.source,
                    e.render(&settings.names)
                ));
            }
        }
        if !problems.is_empty() {
            return Err(QuotaDenial::Denied(problems.join("; ")));
        }
        if !dry_run {
            reservations.insert(
                new.uid.clone(),
                Reservation {
                    namespace: ns,
                    pod,
                    at: now,
                },
            );
        }
        Ok(())
    }

    #[cfg(test)]
    fn reserved(&self) -> usize {
        self.reservations.lock().map(|r| r.len()).unwrap_or(0)
    }
}

/// The allowed-models/pools rule.
fn restriction(
    quota: &Quota,
    named: &NamedQuota,
    cards: &ClusterCards,
    pod: &PodFacts,
    settings: &Settings,
) -> Option<String> {
    if !quota.restricts() {
        return None;
    }
    let allowed = describe_allowed(quota, settings);
    let unplaceable = pod.sites.containers.iter().all(Vec::is_empty);
    if unplaceable {
        if quota.pins_within(&pod.pins, cards.keys()) {
            return None;
        }
        return Some(format!(
            "{}: namespace may only use {allowed}, and no card in the cluster matches this pod yet, so its {} annotation and nodeSelector must stay within them",
            named.source, settings.keys.gpu_models
        ));
    }
    let bad = cards.disallowed(quota, &pod.sites);
    if bad.is_empty() {
        return None;
    }
    let places: Vec<String> = bad
        .iter()
        .map(|c| match &c.pool {
            Some(p) => format!("{} in pool {p:?}", c.model),
            None => format!("{} (no pool)", c.model),
        })
        .collect();
    Some(format!(
        "{}: namespace may only use {allowed}, but this pod could be placed on {}: pin it with the {} annotation and/or nodeSelector {}",
        named.source,
        places.join(", "),
        settings.keys.gpu_models,
        cards.keys().pool_label,
    ))
}

fn describe_allowed(quota: &Quota, _settings: &Settings) -> String {
    let models = match quota.allowed_models() {
        None => "any model".to_string(),
        Some([]) => "no model".to_string(),
        Some(m) => format!("models [{}]", m.join(", ")),
    };
    if quota.allowed_pools().is_empty() {
        models
    } else {
        format!("{models} in pools [{}]", quota.allowed_pools().join(", "))
    }
}

/// `container "a" (2 whole cards), container "b" (30 vcuda-core + 4 memory blocks of one card)`
fn charged_containers(quota: &Quota, cards: &ClusterCards, pod: &PodFacts, limit: usize) -> String {
    let Some(l) = quota.limits().get(limit) else {
        return String::new();
    };
    let mut out = Vec::new();
    for (i, c) in pod.request.containers.iter().enumerate() {
        let single = PodGpuRequest {
            containers: vec![c.clone()],
        };
        let one = PodSites {
            pending: pod.sites.pending,
            containers: vec![pod.sites.containers.get(i).cloned().unwrap_or_default()],
        };
        if !cards
            .charge(&single, &pod.pins, &one, &l.selector)
            .is_zero()
        {
            out.push(format!(
                "{} {:?}: {}",
                crate::rules::who(c.slot),
                c.name,
                c.request
            ));
        }
    }
    out.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::args::WebhookArgs;
    use crate::review::{ObjectRef, WorkloadKind};
    use gm_core::inventory::Link;
    use gm_core::quota::{Limit, Max, QuotaKeys, Selector};
    use gm_core::NodeInventory;
    use k8s_openapi::api::core::v1::{Container, PodSpec, ResourceRequirements};
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn settings() -> Settings {
        let a = WebhookArgs::try_from_flags(["--tls-cert", "c", "--tls-key", "k"]).unwrap();
        Settings::from_args(&a).unwrap()
    }

    fn cards() -> ClusterCards {
        let mut c = ClusterCards::new(QuotaKeys {
            pool_label: "tkestack.io/gpu-pool".into(),
            model_label: None,
            pin_labels: vec![],
        });
        let inv = NodeInventory::uniform(4, "NVIDIA A100-SXM4-40GB", 40960, Link::NvLink(12));
        c.add_node("a100", &Default::default(), &inv);
        c
    }

    fn pod(uid: &str, cores: &str) -> PodObject {
        PodObject {
            kind: WorkloadKind::Pod,
            object: ObjectRef {
                kind: "Pod".into(),
                namespace: Some("team-a".into()),
                name: uid.into(),
            },
            uid: Some(uid.into()),
            meta: ObjectMeta::default(),
            spec: PodSpec {
                containers: vec![Container {
                    name: "train".into(),
                    resources: Some(ResourceRequirements {
                        limits: Some(
                            [("tencent.com/vcuda-core".to_string(), Quantity(cores.into()))]
                                .into_iter()
                                .collect(),
                        ),
                        ..Default::default()
                    }),
                    ..Default::default()
                }],
                ..Default::default()
            },
        }
    }

    fn quota(cores: u64) -> Vec<NamedQuota> {
        vec![NamedQuota {
            source: "GpuQuota team-a/gpu".into(),
            quota: Quota::new(
                None,
                &[],
                vec![Limit {
                    selector: Selector::new(Some("A100"), None),
                    max: Max {
                        cores: Some(cores),
                        ..Max::default()
                    },
                }],
            ),
        }]
    }

    #[test]
    fn concurrent_admissions_cannot_share_the_last_of_a_limit() {
        let (s, c, q) = (settings(), cards(), quota(200));
        let e = Enforcer::new(Duration::from_secs(30));
        assert_eq!(
            e.admit(&pod("p1", "100"), false, &q, &c, Vec::new, &s),
            Ok(())
        );
        assert_eq!(
            e.admit(&pod("p2", "100"), false, &q, &c, Vec::new, &s),
            Ok(())
        );
        // Neither pod is in the cluster cache yet; the reservations still count.
        let Err(QuotaDenial::Denied(msg)) = e.admit(&pod("p3", "100"), false, &q, &c, Vec::new, &s)
        else {
            panic!("third pod admitted");
        };
        assert!(msg.contains("exceeds GpuQuota team-a/gpu"), "{msg}");
        assert!(
            msg.contains("used 200 + requested 100 > limit 200"),
            "{msg}"
        );
        assert!(msg.contains("container \"train\": 1 whole card"), "{msg}");
    }

    #[test]
    fn dry_run_admissions_leave_no_reservation() {
        let (s, c, q) = (settings(), cards(), quota(100));
        let e = Enforcer::new(Duration::from_secs(30));
        assert_eq!(
            e.admit(&pod("p1", "100"), true, &q, &c, Vec::new, &s),
            Ok(())
        );
        assert_eq!(e.reserved(), 0);
        assert_eq!(
            e.admit(&pod("p2", "100"), false, &q, &c, Vec::new, &s),
            Ok(())
        );
        assert_eq!(e.reserved(), 1);
    }

    #[test]
    fn reservations_end_when_the_cache_shows_the_pod_or_expire() {
        let (s, c, q) = (settings(), cards(), quota(100));
        let e = Enforcer::new(Duration::from_millis(50));
        assert_eq!(
            e.admit(&pod("p1", "100"), false, &q, &c, Vec::new, &s),
            Ok(())
        );
        std::thread::sleep(Duration::from_millis(80));
        assert_eq!(
            e.admit(&pod("p2", "100"), false, &q, &c, Vec::new, &s),
            Ok(())
        );
        // p2 is now live in the cache: counted once, not twice.
        let live = || vec![Arc::new(pod("p2", "100").to_pod())];
        let e2 = e.admit(&pod("p3", "100"), false, &q, &c, live, &s);
        assert!(
            matches!(e2, Err(QuotaDenial::Denied(ref m)) if m.contains("used 100 + requested 100")),
            "{e2:?}"
        );
        assert_eq!(
            e.reserved(),
            0,
            "p2's reservation ended when the cache showed it"
        );
    }

    #[test]
    fn an_invalid_quota_denies_gpu_pods_with_its_problem() {
        let (s, c) = (settings(), cards());
        let q = vec![NamedQuota {
            source: "GpuQuota team-a/bad".into(),
            quota: Quota::new(
                None,
                &[],
                vec![Limit {
                    selector: Selector::new(None, None),
                    max: Max::default(),
                }],
            ),
        }];
        let e = Enforcer::new(Duration::from_secs(30));
        let r = e.admit(&pod("p1", "100"), false, &q, &c, Vec::new, &s);
        assert!(
            matches!(r, Err(QuotaDenial::Denied(ref m)) if m.contains("GpuQuota team-a/bad is invalid")),
            "{r:?}"
        );
    }
}
