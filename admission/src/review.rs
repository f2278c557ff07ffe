//! Reading `AdmissionReview` v1 requests into the objects the rules look at.
//!
//! [`parse_review`] is a pure function of the request body: it is what the HTTP handlers and
//! the fuzz target call. It never panics; anything it cannot read is a [`ReviewError`] that
//! says what was wrong and what is accepted.

use std::fmt;

use k8s_openapi::api::core::v1::{Pod, PodSpec, PodTemplateSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::core::admission::{AdmissionRequest, AdmissionReview, Operation};
use kube::core::DynamicObject;
use serde::Deserialize;

use crate::crd::{GpuQuotaSpec, GROUP as QUOTA_GROUP, KIND as QUOTA_KIND};

/// The kinds whose pods the webhook checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WorkloadKind {
    Pod,
    Deployment,
    StatefulSet,
    DaemonSet,
    ReplicaSet,
    Job,
    CronJob,
}

impl WorkloadKind {
    /// The kind for an API group and kind name, if the webhook handles it.
    pub fn from_group_kind(group: &str, kind: &str) -> Option<Self> {
        Some(match (group, kind) {
            ("", "Pod") => Self::Pod,
            ("apps", "Deployment") => Self::Deployment,
            ("apps", "StatefulSet") => Self::StatefulSet,
            ("apps", "DaemonSet") => Self::DaemonSet,
            ("apps", "ReplicaSet") => Self::ReplicaSet,
            ("batch", "Job") => Self::Job,
            ("batch", "CronJob") => Self::CronJob,
            _ => return None,
        })
    }

    /// The kind's name, e.g. `Deployment`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pod => "Pod",
            Self::Deployment => "Deployment",
            Self::StatefulSet => "StatefulSet",
            Self::DaemonSet => "DaemonSet",
            Self::ReplicaSet => "ReplicaSet",
            Self::Job => "Job",
            Self::CronJob => "CronJob",
        }
    }

    /// JSON pointer of the pod template inside the object (empty for a pod itself).
    pub fn template_path(self) -> &'static str {
        match self {
            Self::Pod => "",
            Self::CronJob => "/spec/jobTemplate/spec/template",
            _ => "/spec/template",
        }
    }
}

impl fmt::Display for WorkloadKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `Kind namespace/name`, the way every denial names its object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectRef {
    pub kind: String,
    pub namespace: Option<String>,
    /// The name, or `<generateName><generated>` when the API server has not named it yet.
    pub name: String,
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{} {ns}/{}", self.kind, self.name),
            None => write!(f, "{} {}", self.kind, self.name),
        }
    }
}

/// A pod, or the pod template of a workload.
#[derive(Debug, Clone, PartialEq)]
pub struct PodObject {
    pub kind: WorkloadKind,
    pub object: ObjectRef,
    /// The pod's UID (set by the API server before validating admission).
    pub uid: Option<String>,
    /// Metadata of the pod, or of the pod template.
    pub meta: ObjectMeta,
    pub spec: PodSpec,
}

impl PodObject {
    /// JSON pointer of the pod template (empty for a pod).
    pub fn template_path(&self) -> &'static str {
        self.kind.template_path()
    }

    /// The object as a `Pod` (for a workload: a pod made from its template).
    pub fn to_pod(&self) -> Pod {
        let mut meta = self.meta.clone();
        if meta.namespace.is_none() {
            meta.namespace = self.object.namespace.clone();
        }
        if meta.name.is_none() {
            meta.name = Some(self.object.name.clone());
        }
        if meta.uid.is_none() {
            meta.uid = self.uid.clone();
        }
        Pod {
            metadata: meta,
            spec: Some(self.spec.clone()),
            status: None,
        }
    }
}

/// A GpuQuota under review.
#[derive(Debug, Clone, PartialEq)]
pub struct QuotaObject {
    pub object: ObjectRef,
    pub spec: GpuQuotaSpec,
}

/// What a request is about.
#[derive(Debug, Clone, PartialEq)]
pub enum Subject {
    Pods(Box<PodObject>),
    Quota(Box<QuotaObject>),
}

/// A parsed review: kube's request plus the objects the rules read.
#[derive(Debug, Clone)]
pub struct Review {
    pub request: AdmissionRequest<DynamicObject>,
    /// `request.object`, when it is a kind the webhook handles.
    pub object: Option<Subject>,
    /// `request.oldObject` (UPDATE), when it is a kind the webhook handles.
    pub old_object: Option<Subject>,
}

impl Review {
    /// The requesting user's name (empty when the API server did not say).
    pub fn username(&self) -> &str {
        self.request.user_info.username.as_deref().unwrap_or("")
    }

    pub fn operation(&self) -> &Operation {
        &self.request.operation
    }
}

/// A request body that is not a usable AdmissionReview.
#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    #[error("the body is not an AdmissionReview JSON document: {0}")]
    Json(#[source] serde_json::Error),
    #[error(
        "apiVersion {api_version:?} kind {kind:?} is not supported: send an admission.k8s.io/v1 \
         AdmissionReview (admissionReviewVersions: [\"v1\"] in the webhook configuration)"
    )]
    Version { api_version: String, kind: String },
    #[error("the AdmissionReview has no request")]
    NoRequest,
    #[error("cannot encode the AdmissionReview response: {0}")]
    Encode(#[source] serde_json::Error),
    #[error("request.{field} is not a valid {kind}: {problem}")]
    Object {
        field: &'static str,
        kind: String,
        problem: String,
    },
}

/// Parse an AdmissionReview v1 request body.
pub fn parse_review(body: &[u8]) -> Result<Review, ReviewError> {
    let review: AdmissionReview<DynamicObject> =
        serde_json::from_slice(body).map_err(ReviewError::Json)?;
    if review.types.api_version != kube::core::admission::META_API_VERSION_V1
        || review.types.kind != kube::core::admission::META_KIND
    {
        return Err(ReviewError::Version {
            api_version: review.types.api_version,
            kind: review.types.kind,
        });
    }
    let request: AdmissionRequest<DynamicObject> =
        review.try_into().map_err(|_| ReviewError::NoRequest)?;
    let object = request
        .object
        .as_ref()
        .map(|o| subject(&request, o, "object"))
        .transpose()?
        .flatten();
    let old_object = request
        .old_object
        .as_ref()
        .map(|o| subject(&request, o, "oldObject"))
        .transpose()?
        .flatten();
    Ok(Review {
        request,
        object,
        old_object,
    })
}

fn subject(
    req: &AdmissionRequest<DynamicObject>,
    obj: &DynamicObject,
    field: &'static str,
) -> Result<Option<Subject>, ReviewError> {
    let (group, kind) = (req.kind.group.as_str(), req.kind.kind.as_str());
    let invalid = |problem: String| ReviewError::Object {
        field,
        kind: kind.to_string(),
        problem,
    };
    let namespace = req
        .namespace
        .clone()
        .filter(|n| !n.is_empty())
        .or_else(|| obj.metadata.namespace.clone());
    let object = ObjectRef {
        kind: kind.to_string(),
        namespace,
        name: display_name(&req.name, &obj.metadata),
    };
    if group == QUOTA_GROUP && kind == QUOTA_KIND {
        let spec = obj
            .data
            .get("spec")
            .ok_or_else(|| invalid("it has no spec".into()))?;
        let spec = GpuQuotaSpec::deserialize(spec).map_err(|e| invalid(format!("spec: {e}")))?;
        return Ok(Some(Subject::Quota(Box::new(QuotaObject { object, spec }))));
    }
    let Some(wk) = WorkloadKind::from_group_kind(group, kind) else {
        return Ok(None);
    };
    let (meta, spec) = if wk == WorkloadKind::Pod {
        let spec = obj
            .data
            .get("spec")
            .ok_or_else(|| invalid("it has no spec".into()))?;
        let spec = PodSpec::deserialize(spec).map_err(|e| invalid(format!("spec: {e}")))?;
        (obj.metadata.clone(), spec)
    } else {
        let path = wk.template_path();
        let template = obj
            .data
            .pointer(path)
            .ok_or_else(|| invalid(format!("it has no pod template at {path}")))?;
        let template = PodTemplateSpec::deserialize(template)
            .map_err(|e| invalid(format!("pod template at {path}: {e}")))?;
        let spec = template
            .spec
            .ok_or_else(|| invalid(format!("the pod template at {path} has no spec")))?;
        (template.metadata.unwrap_or_default(), spec)
    };
    Ok(Some(Subject::Pods(Box::new(PodObject {
        kind: wk,
        object,
        uid: obj.metadata.uid.clone(),
        meta,
        spec,
    }))))
}

fn display_name(request_name: &str, meta: &ObjectMeta) -> String {
    if !request_name.is_empty() {
        return request_name.to_string();
    }
    match (&meta.name, &meta.generate_name) {
        (Some(n), _) if !n.is_empty() => n.clone(),
        (_, Some(g)) if !g.is_empty() => format!("{g}<generated>"),
        _ => "<unnamed>".to_string(),
    }
}

/// The annotations of a pod object (empty when it has none).
pub fn annotations(meta: &ObjectMeta) -> &std::collections::BTreeMap<String, String> {
    static EMPTY: std::collections::BTreeMap<String, String> = std::collections::BTreeMap::new();
    meta.annotations.as_ref().unwrap_or(&EMPTY)
}
