//! Container and pod GPU requests, parsed and validated against the resource contract
//! (DESIGN §1):
//!
//! | vcuda-core | meaning | vcuda-memory |
//! |---|---|---|
//! | 0 / absent | no GPU | must be 0 / absent |
//! | 1–99 | a share of one card | required, in 256 MiB blocks |
//! | 100·N | N whole cards | ignored (whole card memory) |
//!
//! Init containers count the way the kubelet counts them: a regular init container runs alone,
//! so the pod needs the largest of them, not their sum. Restartable ("sidecar") init containers
//! keep running beside the app containers and therefore add up with them.

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::api::core::v1::{Container, PodSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity as K8sQuantity;

use crate::quantity::{self, QuantityError};
use crate::resources::{ResourceNames, CORES_PER_CARD};

/// Largest number of whole cards one container may ask for (`vcuda-core` ≤ 6400).
pub const MAX_CARDS_PER_CONTAINER: u32 = 64;

/// What one container asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum GpuRequest {
    /// A share of one card: `cores` in 1..=99 and `blocks` ≥ 1 memory blocks of 256 MiB.
    Share { cores: u32, blocks: u32 },
    /// `cards` ≥ 1 whole cards, each with all of its memory.
    Whole { cards: u32 },
}

impl GpuRequest {
    /// Total vcuda-core units asked for (100 per whole card).
    pub fn cores(&self) -> u32 {
        match *self {
            GpuRequest::Share { cores, .. } => cores,
            GpuRequest::Whole { cards } => cards * CORES_PER_CARD,
        }
    }

    /// Number of cards the request touches.
    pub fn cards(&self) -> u32 {
        match *self {
            GpuRequest::Share { .. } => 1,
            GpuRequest::Whole { cards } => cards,
        }
    }

    /// Memory blocks of a share; whole cards take all the memory of their cards.
    pub fn share_blocks(&self) -> u32 {
        match *self {
            GpuRequest::Share { blocks, .. } => blocks,
            GpuRequest::Whole { .. } => 0,
        }
    }

    pub fn is_share(&self) -> bool {
        matches!(self, GpuRequest::Share { .. })
    }

    /// Classify a (vcuda-core, vcuda-memory) pair. `Ok(None)` means "no GPU".
    pub fn from_units(cores: u64, blocks: u64) -> Result<Option<Self>, RequestErrorKind> {
        match cores {
            0 if blocks == 0 => Ok(None),
            0 => Err(RequestErrorKind::MemoryWithoutCores { blocks }),
            1..=99 if blocks == 0 => Err(RequestErrorKind::ShareWithoutMemory { cores }),
            1..=99 => {
                let blocks = u32::try_from(blocks)
                    .map_err(|_| RequestErrorKind::MemoryTooLarge { blocks })?;
                Ok(Some(GpuRequest::Share {
                    cores: cores as u32,
                    blocks,
                }))
            }
            c if c % u64::from(CORES_PER_CARD) != 0 => {
                Err(RequestErrorKind::InvalidCores { cores: c })
            }
            c => {
                let cards = c / u64::from(CORES_PER_CARD);
                if cards > u64::from(MAX_CARDS_PER_CONTAINER) {
                    return Err(RequestErrorKind::TooManyCards { cores: c });
                }
                Ok(Some(GpuRequest::Whole {
                    cards: cards as u32,
                }))
            }
        }
    }
}

impl fmt::Display for GpuRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GpuRequest::Share { cores, blocks } => {
                write!(f, "{cores} vcuda-core + {blocks} memory blocks of one card")
            }
            GpuRequest::Whole { cards: 1 } => write!(f, "1 whole card"),
            GpuRequest::Whole { cards } => write!(f, "{cards} whole cards"),
        }
    }
}

/// Where a container sits in the pod spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Slot {
    /// `spec.initContainers[i]`
    Init(usize),
    /// `spec.containers[i]`
    App(usize),
}

impl fmt::Display for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Slot::Init(i) => write!(f, "initContainers[{i}]"),
            Slot::App(i) => write!(f, "containers[{i}]"),
        }
    }
}

/// One GPU container of a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerGpu {
    pub slot: Slot,
    pub name: String,
    pub request: GpuRequest,
    /// A restartable init container (`restartPolicy: Always`): it runs beside the app
    /// containers for the pod's whole life.
    pub sidecar: bool,
}

impl ContainerGpu {
    /// True for containers that run for the pod's whole life (app containers and sidecars);
    /// their requests add up. Regular init containers run one at a time before them.
    pub fn long_running(&self) -> bool {
        matches!(self.slot, Slot::App(_)) || self.sidecar
    }
}

/// The GPU containers of one pod, in the order the kubelet allocates them: init containers in
/// spec order, then app containers in spec order. Non-GPU containers are left out.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodGpuRequest {
    pub containers: Vec<ContainerGpu>,
}

impl PodGpuRequest {
    /// A pod with the given app-container requests (index = position), no init containers.
    pub fn from_app_requests(requests: impl IntoIterator<Item = Option<GpuRequest>>) -> Self {
        let containers = requests
            .into_iter()
            .enumerate()
            .filter_map(|(i, r)| {
                r.map(|request| ContainerGpu {
                    slot: Slot::App(i),
                    name: format!("c{i}"),
                    request,
                    sidecar: false,
                })
            })
            .collect();
        Self { containers }
    }

    /// Parse a pod spec. Every invalid container is reported, not just the first.
    pub fn from_pod_spec(spec: &PodSpec, names: &ResourceNames) -> Result<Self, RequestErrors> {
        let mut containers = Vec::new();
        let mut errors = Vec::new();
        let inits = spec.init_containers.iter().flatten().enumerate();
        let inits = inits.map(|(i, c)| (Slot::Init(i), c));
        let apps = spec
            .containers
            .iter()
            .enumerate()
            .map(|(i, c)| (Slot::App(i), c));
        for (slot, c) in inits.chain(apps) {
            match parse_container(c, names) {
                Ok(Some(request)) => containers.push(ContainerGpu {
                    slot,
                    name: c.name.clone(),
                    request,
                    sidecar: matches!(slot, Slot::Init(_))
                        && c.restart_policy.as_deref() == Some("Always"),
                }),
                Ok(None) => {}
                Err(kind) => errors.push(RequestError {
                    container: c.name.clone(),
                    slot,
                    kind,
                }),
            }
        }
        if errors.is_empty() {
            Ok(Self { containers })
        } else {
            Err(RequestErrors(errors))
        }
    }

    /// True when no container asks for a GPU.
    pub fn is_empty(&self) -> bool {
        self.containers.is_empty()
    }

    /// The GPU container in `slot`, if any.
    pub fn container(&self, slot: Slot) -> Option<&ContainerGpu> {
        self.containers.iter().find(|c| c.slot == slot)
    }

    /// vcuda-core the pod needs at once, counted the kubelet's way.
    pub fn effective_cores(&self) -> u64 {
        self.effective(|r| u64::from(r.cores()))
    }

    /// Share memory blocks the pod needs at once, counted the kubelet's way (whole cards'
    /// memory depends on the cards and is not included).
    pub fn effective_share_blocks(&self) -> u64 {
        self.effective(|r| u64::from(r.share_blocks()))
    }

    /// Largest card count any single container needs.
    pub fn max_cards(&self) -> u32 {
        self.containers
            .iter()
            .map(|c| c.request.cards())
            .max()
            .unwrap_or(0)
    }

    fn effective(&self, f: impl Fn(&GpuRequest) -> u64) -> u64 {
        // Kubernetes' rule: walk init containers in order keeping the sum of sidecars started so
        // far; a regular init container needs itself plus those sidecars. The steady state is
        // all sidecars plus all app containers.
        let mut sidecars = 0u64;
        let mut peak = 0u64;
        for c in &self.containers {
            match c.slot {
                Slot::Init(_) if c.sidecar => sidecars += f(&c.request),
                Slot::Init(_) => peak = peak.max(sidecars + f(&c.request)),
                Slot::App(_) => {}
            }
        }
        let steady: u64 = sidecars
            + self
                .containers
                .iter()
                .filter(|c| matches!(c.slot, Slot::App(_)))
                .map(|c| f(&c.request))
                .sum::<u64>();
        peak.max(steady)
    }
}

/// Parse one container. Limits are authoritative; requests, when present, must equal them.
pub fn parse_container(
    c: &Container,
    names: &ResourceNames,
) -> Result<Option<GpuRequest>, RequestErrorKind> {
    let res = c.resources.as_ref();
    let limits = res.and_then(|r| r.limits.as_ref());
    let requests = res.and_then(|r| r.requests.as_ref());
    let cores = resource_value(names.core(), limits, requests)?;
    let blocks = resource_value(names.memory(), limits, requests)?;
    GpuRequest::from_units(cores, blocks)
}

fn resource_value(
    name: &str,
    limits: Option<&BTreeMap<String, K8sQuantity>>,
    requests: Option<&BTreeMap<String, K8sQuantity>>,
) -> Result<u64, RequestErrorKind> {
    let parse = |q: &K8sQuantity| {
        quantity::parse_count(&q.0).map_err(|source| RequestErrorKind::BadQuantity {
            resource: name.to_string(),
            value: q.0.clone(),
            source,
        })
    };
    let limit = limits.and_then(|m| m.get(name)).map(parse).transpose()?;
    let request = requests.and_then(|m| m.get(name)).map(parse).transpose()?;
    match (limit, request) {
        (Some(l), Some(r)) if l != r => Err(RequestErrorKind::LimitRequestMismatch {
            resource: name.to_string(),
            limit: l,
            request: r,
        }),
        (Some(v), _) | (None, Some(v)) => Ok(v),
        (None, None) => Ok(0),
    }
}

/// Why a container's GPU request is invalid. Rendered inside [`RequestError`], which adds the
/// container name and resource names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestErrorKind {
    BadQuantity {
        resource: String,
        value: String,
        source: QuantityError,
    },
    InvalidCores {
        cores: u64,
    },
    TooManyCards {
        cores: u64,
    },
    MemoryWithoutCores {
        blocks: u64,
    },
    ShareWithoutMemory {
        cores: u64,
    },
    MemoryTooLarge {
        blocks: u64,
    },
    LimitRequestMismatch {
        resource: String,
        limit: u64,
        request: u64,
    },
}

/// An invalid GPU request of one container, with a message that names the container, the
/// value and the allowed forms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestError {
    pub container: String,
    pub slot: Slot,
    pub kind: RequestErrorKind,
}

impl RequestError {
    /// Render with explicit resource names (the default domain is used by `Display`).
    pub fn render(&self, names: &ResourceNames) -> String {
        let who = match self.slot {
            Slot::Init(_) => "init container",
            Slot::App(_) => "container",
        };
        let (core, mem) = (names.core(), names.memory());
        let what = match &self.kind {
            RequestErrorKind::BadQuantity {
                resource,
                value,
                source,
            } => format!("{resource}={value:?} is invalid: {source}"),
            RequestErrorKind::InvalidCores { cores } => format!(
                "{core}={cores} is invalid: use 1-99 for a share of one card or a multiple of 100 for whole cards"
            ),
            RequestErrorKind::TooManyCards { cores } => format!(
                "{core}={cores} is invalid: at most {} whole cards ({}) fit one container",
                MAX_CARDS_PER_CONTAINER,
                MAX_CARDS_PER_CONTAINER * CORES_PER_CARD
            ),
            RequestErrorKind::MemoryWithoutCores { blocks } => format!(
                "{mem}={blocks} is invalid without {core}: set {core} to 1-99 for a share of one card (with {mem} in 256 MiB blocks) or to a multiple of 100 for whole cards"
            ),
            RequestErrorKind::ShareWithoutMemory { cores } => format!(
                "{core}={cores} asks for a share of one card, which needs {mem}: set {mem} to the number of 256 MiB blocks the container may use"
            ),
            RequestErrorKind::MemoryTooLarge { blocks } => {
                format!("{mem}={blocks} is invalid: it is larger than any card")
            }
            RequestErrorKind::LimitRequestMismatch {
                resource,
                limit,
                request,
            } => format!(
                "{resource} has requests={request} but limits={limit}: extended resources need requests equal to limits (or set limits only)"
            ),
        };
        format!("{who} {:?}: {what}", self.container)
    }
}

impl fmt::Display for RequestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.render(&ResourceNames::default()))
    }
}

impl std::error::Error for RequestError {}

/// Every invalid container of a pod (never empty).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestErrors(pub Vec<RequestError>);

impl RequestErrors {
    pub fn render(&self, names: &ResourceNames) -> String {
        let parts: Vec<String> = self.0.iter().map(|e| e.render(names)).collect();
        parts.join("; ")
    }
}

impl fmt::Display for RequestErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.render(&ResourceNames::default()))
    }
}

impl std::error::Error for RequestErrors {}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ResourceRequirements;
    use proptest::prelude::*;

    fn container(name: &str, limits: &[(&str, &str)], requests: &[(&str, &str)]) -> Container {
        let map = |kv: &[(&str, &str)]| {
            (!kv.is_empty()).then(|| {
                kv.iter()
                    .map(|(k, v)| (k.to_string(), K8sQuantity(v.to_string())))
                    .collect()
            })
        };
        Container {
            name: name.into(),
            resources: Some(ResourceRequirements {
                limits: map(limits),
                requests: map(requests),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    const CORE: &str = "tencent.com/vcuda-core";
    const MEM: &str = "tencent.com/vcuda-memory";

    fn parse(limits: &[(&str, &str)]) -> Result<Option<GpuRequest>, RequestErrorKind> {
        parse_container(&container("c", limits, &[]), &ResourceNames::default())
    }

    #[test]
    fn share_needs_cores_below_100_and_memory() {
        assert_eq!(
            parse(&[(CORE, "30"), (MEM, "20")]),
            Ok(Some(GpuRequest::Share {
                cores: 30,
                blocks: 20
            }))
        );
    }

    #[test]
    fn multiples_of_100_are_whole_cards_and_memory_is_ignored() {
        assert_eq!(
            parse(&[(CORE, "100")]),
            Ok(Some(GpuRequest::Whole { cards: 1 }))
        );
        assert_eq!(
            parse(&[(CORE, "200"), (MEM, "7")]),
            Ok(Some(GpuRequest::Whole { cards: 2 }))
        );
    }

    #[test]
    fn no_gpu_resources_means_no_request() {
        assert_eq!(parse(&[]), Ok(None));
        assert_eq!(parse(&[("cpu", "2")]), Ok(None));
        assert_eq!(parse(&[(CORE, "0"), (MEM, "0")]), Ok(None));
    }

    #[test]
    fn rejection_names_container_value_and_allowed_forms() {
        let spec = PodSpec {
            containers: vec![container("train", &[(CORE, "150")], &[])],
            ..Default::default()
        };
        let err = PodGpuRequest::from_pod_spec(&spec, &ResourceNames::default()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "container \"train\": tencent.com/vcuda-core=150 is invalid: use 1-99 for a share of one card or a multiple of 100 for whole cards"
        );
    }

    #[test]
    fn memory_without_cores_is_rejected() {
        let e = parse(&[(MEM, "8")]).unwrap_err();
        assert_eq!(e, RequestErrorKind::MemoryWithoutCores { blocks: 8 });
    }

    #[test]
    fn share_without_memory_is_rejected_with_the_rule() {
        let spec = PodSpec {
            containers: vec![container("infer", &[(CORE, "30")], &[])],
            ..Default::default()
        };
        let msg = PodGpuRequest::from_pod_spec(&spec, &ResourceNames::default())
            .unwrap_err()
            .to_string();
        assert!(msg.contains("\"infer\""), "{msg}");
        assert!(msg.contains("needs tencent.com/vcuda-memory"), "{msg}");
    }

    #[test]
    fn limits_must_equal_requests() {
        let c = container("x", &[(CORE, "40"), (MEM, "1")], &[(CORE, "30")]);
        let e = parse_container(&c, &ResourceNames::default()).unwrap_err();
        assert_eq!(
            e,
            RequestErrorKind::LimitRequestMismatch {
                resource: CORE.into(),
                limit: 40,
                request: 30
            }
        );
    }

    #[test]
    fn requests_alone_are_accepted() {
        let c = container("x", &[], &[(CORE, "30"), (MEM, "2")]);
        assert_eq!(
            parse_container(&c, &ResourceNames::default()),
            Ok(Some(GpuRequest::Share {
                cores: 30,
                blocks: 2
            }))
        );
    }

    #[test]
    fn fractional_and_garbage_quantities_are_rejected() {
        let e = parse(&[(CORE, "0.5")]).unwrap_err();
        assert!(matches!(e, RequestErrorKind::BadQuantity { .. }), "{e:?}");
        let e = parse(&[(CORE, "lots")]).unwrap_err();
        assert!(matches!(e, RequestErrorKind::BadQuantity { .. }), "{e:?}");
    }

    #[test]
    fn custom_domain_is_used_for_lookup_and_messages() {
        let names = ResourceNames::new("example.com").unwrap();
        let c = container("x", &[("example.com/vcuda-core", "250")], &[]);
        let kind = parse_container(&c, &names).unwrap_err();
        let err = RequestError {
            container: "x".into(),
            slot: Slot::App(0),
            kind,
        };
        assert!(err.render(&names).contains("example.com/vcuda-core=250"));
        // The default domain's resources are not ours under a custom domain.
        let c = container("x", &[(CORE, "250")], &[]);
        assert_eq!(parse_container(&c, &names), Ok(None));
    }

    #[test]
    fn every_invalid_container_is_reported() {
        let spec = PodSpec {
            init_containers: Some(vec![container("init", &[(MEM, "1")], &[])]),
            containers: vec![
                container("a", &[(CORE, "150")], &[]),
                container("ok", &[(CORE, "100")], &[]),
            ],
            ..Default::default()
        };
        let errs = PodGpuRequest::from_pod_spec(&spec, &ResourceNames::default()).unwrap_err();
        assert_eq!(errs.0.len(), 2);
        assert!(errs.to_string().starts_with("init container \"init\""));
    }

    #[test]
    fn init_containers_count_as_their_largest_not_their_sum() {
        let mut init_a = container("a", &[(CORE, "60"), (MEM, "4")], &[]);
        init_a.restart_policy = None;
        let init_b = container("b", &[(CORE, "80"), (MEM, "2")], &[]);
        let spec = PodSpec {
            init_containers: Some(vec![init_a, init_b]),
            containers: vec![container("main", &[(CORE, "30"), (MEM, "1")], &[])],
            ..Default::default()
        };
        let pod = PodGpuRequest::from_pod_spec(&spec, &ResourceNames::default()).unwrap();
        assert_eq!(pod.containers.len(), 3);
        assert_eq!(pod.effective_cores(), 80);
        assert_eq!(pod.effective_share_blocks(), 4);
    }

    #[test]
    fn sidecar_init_containers_add_up_with_app_containers() {
        let mut sidecar = container("proxy", &[(CORE, "20"), (MEM, "1")], &[]);
        sidecar.restart_policy = Some("Always".into());
        let spec = PodSpec {
            init_containers: Some(vec![sidecar]),
            containers: vec![container("main", &[(CORE, "30"), (MEM, "1")], &[])],
            ..Default::default()
        };
        let pod = PodGpuRequest::from_pod_spec(&spec, &ResourceNames::default()).unwrap();
        assert!(pod.containers[0].sidecar && pod.containers[0].long_running());
        assert_eq!(pod.effective_cores(), 50);
    }

    proptest! {
        #[test]
        fn classification_follows_the_contract(cores in 0u64..10_000, blocks in 0u64..1_000) {
            match GpuRequest::from_units(cores, blocks) {
                Ok(None) => prop_assert!(cores == 0 && blocks == 0),
                Ok(Some(GpuRequest::Share { cores: c, blocks: b })) => {
                    prop_assert!((1..100).contains(&c) && b >= 1);
                    prop_assert_eq!(u64::from(c), cores);
                }
                Ok(Some(GpuRequest::Whole { cards })) => {
                    prop_assert_eq!(u64::from(cards) * 100, cores);
                }
                Err(_) => prop_assert!(
                    (cores == 0) != (blocks == 0) && cores < 100
                        || cores % 100 != 0 && cores > 100
                        || cores > 6400
                ),
            }
        }
    }
}
