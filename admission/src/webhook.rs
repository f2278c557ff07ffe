//! The admission decisions: `/validate` and `/mutate` for one parsed review.

use std::sync::Arc;

use kube::core::admission::{AdmissionResponse, AdmissionReview, Operation};
use kube::core::{DynamicObject, Status};

use crate::args::Settings;
use crate::cluster::{CardCache, ClusterView};
use crate::mutate::mutate_pod;
use crate::quota::sources::QuotaSources;
use crate::quota::{Enforcer, QuotaDenial};
use crate::review::{parse_review, PodObject, Review, ReviewError, Subject, WorkloadKind};
use crate::rules;

/// The webhook's state: settings, cluster view, quota sources and reservations.
pub struct Webhook {
    pub(crate) settings: Arc<Settings>,
    pub(crate) cluster: Option<Arc<dyn ClusterView>>,
    pub(crate) cards: Arc<CardCache>,
    pub(crate) quotas: QuotaSources,
    enforcer: Enforcer,
}

impl std::fmt::Debug for Webhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhook")
            .field("standalone", &self.cluster.is_none())
            .finish()
    }
}

/// HTTP status code and reason of a denial.
#[derive(Debug, Clone, Copy)]
enum Why {
    /// The object breaks a request rule (422 Invalid).
    Invalid,
    /// The user may not do this (403 Forbidden): reserved annotations, quota.
    Forbidden,
    /// State is not known yet; retry (503).
    Unavailable,
}

fn deny(resp: AdmissionResponse, why: Why, message: String) -> AdmissionResponse {
    let (code, reason) = match why {
        Why::Invalid => (422, "Invalid"),
        Why::Forbidden => (403, "Forbidden"),
        Why::Unavailable => (503, "ServiceUnavailable"),
    };
    let mut r = resp.deny(&message);
    r.result = Status::failure(&message, reason).with_code(code);
    r
}

fn with_warnings(mut resp: AdmissionResponse, warnings: Vec<String>) -> AdmissionResponse {
    if !warnings.is_empty() {
        resp.warnings = Some(warnings);
    }
    resp
}

impl Webhook {
    pub(crate) fn new(
        settings: Arc<Settings>,
        cluster: Option<Arc<dyn ClusterView>>,
        quotas: QuotaSources,
    ) -> Self {
        Self {
            cards: Arc::new(CardCache::new(settings.quota_keys.clone())),
            enforcer: Enforcer::new(settings.quota_reservation_ttl),
            settings,
            cluster,
            quotas,
        }
    }

    /// A webhook without cluster state or quota (what `--standalone` serves), for tools,
    /// benches and fuzzing.
    pub fn standalone(settings: Settings) -> Self {
        Self::new(Arc::new(settings), None, QuotaSources::none())
    }

    /// Answer a `/validate` body with the encoded response review.
    pub fn validate_body(&self, body: &[u8]) -> Result<Vec<u8>, ReviewError> {
        let review = parse_review(body)?;
        encode_review(&self.validate(&review).into_review())
    }

    /// Answer a `/mutate` body with the encoded response review.
    pub fn mutate_body(&self, body: &[u8]) -> Result<Vec<u8>, ReviewError> {
        let review = parse_review(body)?;
        encode_review(&self.mutate(&review).into_review())
    }

    /// The validating decision.
    pub fn validate(&self, review: &Review) -> AdmissionResponse {
        let resp = AdmissionResponse::from(&review.request);
        let op = review.operation();
        if !matches!(op, Operation::Create | Operation::Update) {
            return resp;
        }
        let out = match &review.object {
            Some(Subject::Pods(obj)) => self.validate_pods(review, obj, resp),
            // Status writes (a subresource) never depend on the spec being valid.
            Some(Subject::Quota(_)) if review.request.sub_resource.is_some() => resp,
            Some(Subject::Quota(q)) => match q.spec.to_quota() {
                Ok(_) => resp,
                Err(e) => {
                    let unchanged = match &review.old_object {
                        Some(Subject::Quota(old)) => old
                            .spec
                            .to_quota()
                            .err()
                            .is_some_and(|o| o.to_string() == e.to_string()),
                        _ => false,
                    };
                    if unchanged {
                        // Metadata-only edits of a quota that was already invalid.
                        resp
                    } else {
                        deny(
                            resp,
                            Why::Invalid,
                            format!("{}: spec is invalid: {e}", q.object),
                        )
                    }
                }
            },
            None => resp,
        };
        if !out.allowed {
            tracing::info!(
                uid = %review.request.uid,
                user = %review.username(),
                dry_run = review.request.dry_run,
                reason = %out.result.message,
                "denied"
            );
        }
        out
    }

    fn validate_pods(
        &self,
        review: &Review,
        obj: &PodObject,
        resp: AdmissionResponse,
    ) -> AdmissionResponse {
        let settings = &self.settings;
        let old = match &review.old_object {
            Some(Subject::Pods(o)) => Some(o.as_ref()),
            _ => None,
        };
        let view = self.cluster.as_deref();
        let view_synced = view.is_some_and(|v| v.synced());
        let cards = match view {
            Some(v) if view_synced => Some(self.cards.get(v)),
            _ => None,
        };
        let mut found = rules::shape(obj, settings, cards.as_deref());
        if view.is_some() && !view_synced && rules::mentions_gpu(&obj.spec, settings) {
            found.warnings.push(
                "the cluster cache has not synced yet, so vcuda-memory was not checked against card sizes".into(),
            );
        }
        if let Some(old) = old {
            let before = rules::shape(old, settings, cards.as_deref());
            found.problems.retain(|p| !before.problems.contains(p));
        }
        let reserved = rules::reserved(obj, old, review.username(), settings);
        let why = if reserved.is_empty() {
            Why::Invalid
        } else {
            Why::Forbidden
        };
        let mut problems = found.problems;
        problems.extend(reserved);
        if !problems.is_empty() {
            return deny(
                resp,
                why,
                format!("{}: {}", obj.object, problems.join("; ")),
            );
        }
        let quota_applies = *review.operation() == Operation::Create
            && obj.kind == WorkloadKind::Pod
            && review.request.sub_resource.is_none()
            && self.quotas.enabled();
        if quota_applies {
            if let Some(view) = view {
                if let Err(d) = self.check_quota(review, obj, view, cards.as_deref()) {
                    let (why, msg) = match d {
                        QuotaDenial::NotSynced(m) => (Why::Unavailable, m),
                        QuotaDenial::Denied(m) => (Why::Forbidden, m),
                    };
                    return deny(resp, why, format!("{}: {msg}", obj.object));
                }
            }
        }
        with_warnings(resp, found.warnings)
    }

    fn check_quota(
        &self,
        review: &Review,
        obj: &PodObject,
        view: &dyn ClusterView,
        cards: Option<&gm_core::quota::ClusterCards>,
    ) -> Result<(), QuotaDenial> {
        if !rules::mentions_gpu(&obj.spec, &self.settings) {
            return Ok(());
        }
        let not_synced = |what: &str| {
            QuotaDenial::NotSynced(format!(
                "GPU quota cannot be checked because {what} has not synced yet; retry in a few seconds"
            ))
        };
        if !self.quotas.synced() {
            return Err(not_synced(
                "the list of quotas (GpuQuota objects / quota ConfigMap)",
            ));
        }
        let ns = obj.object.namespace.as_deref().unwrap_or_default();
        let quotas = self.quotas.quotas_for(ns);
        if quotas.is_empty() {
            return Ok(());
        }
        let Some(cards) = cards else {
            return Err(not_synced("the cluster cache (nodes and pods)"));
        };
        self.enforcer.admit(
            obj,
            review.request.dry_run,
            &quotas,
            cards,
            || view.namespace_gpu_pods(ns),
            &self.settings,
        )
    }

    /// The mutating decision.
    pub fn mutate(&self, review: &Review) -> AdmissionResponse {
        let resp = AdmissionResponse::from(&review.request);
        if *review.operation() != Operation::Create || review.request.sub_resource.is_some() {
            return resp;
        }
        let Some(Subject::Pods(obj)) = &review.object else {
            return resp;
        };
        if obj.kind != WorkloadKind::Pod {
            return resp;
        }
        let (patch, warnings) = mutate_pod(obj, &self.settings).into_patch();
        let resp = match patch {
            None => resp,
            Some(p) => match resp.clone().with_patch(p) {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(error = %e, "cannot serialise a JSON patch; admitting unchanged");
                    resp
                }
            },
        };
        with_warnings(resp, warnings)
    }
}

/// Encode a response review the way the API server reads it: `response.patch` is a
/// base64 string (kube's type would write the bytes as a JSON array of numbers).
pub fn encode_review(review: &AdmissionReview<DynamicObject>) -> Result<Vec<u8>, ReviewError> {
    use base64::Engine as _;
    let Some(patch) = review.response.as_ref().and_then(|r| r.patch.as_ref()) else {
        return serde_json::to_vec(review).map_err(ReviewError::Encode);
    };
    let mut v = serde_json::to_value(review).map_err(ReviewError::Encode)?;
    if let Some(slot) = v.pointer_mut("/response/patch") {
        *slot = serde_json::Value::String(base64::engine::general_purpose::STANDARD.encode(patch));
    }
    serde_json::to_vec(&v).map_err(ReviewError::Encode)
}
