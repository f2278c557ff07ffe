//! The `GpuQuota` custom resource (`gpu.tkestack.io/v1alpha1`, namespaced).
//!
//! ```yaml
//! apiVersion: gpu.tkestack.io/v1alpha1
//! kind: GpuQuota
//! metadata: {name: gpu, namespace: team-a}
//! spec:
//!   allowedModels: [A100, T4]     # optional: the only models the namespace may use
//!   allowedPools: [public]        # optional: the only pools (node label) it may use
//!   limits:
//!   - model: A100                 # card model, matched by whole words like tencent.com/gpu-models
//!     vcudaCore: 800              # 100 = one whole card
//!     cards: 8                    # whole cards
//!   - pool: public                # value of the pool node label (--quota-pool-label)
//!     vcudaMemory: 256            # share memory, 256 MiB blocks
//! status:                         # written by gpu-admission
//!   used: [{model: A100, vcudaCore: 300, vcudaMemory: 0, cards: 3}, {pool: public, ...}]
//!   pods: 5
//! ```
//!
//! See the crate README for how pods map to limits and how this fits with ResourceQuota.

use gm_core::quota::{Amount, Limit, Max, Quota, QuotaSpecError, Selector};
use kube::CustomResource;
use kube::CustomResourceExt;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// API group of the CRD.
pub const GROUP: &str = "gpu.tkestack.io";
/// API version of the CRD.
pub const VERSION: &str = "v1alpha1";
/// Kind of the CRD.
pub const KIND: &str = "GpuQuota";

/// Spec of a `GpuQuota`: limits per GPU model or pool for the namespace it lives in.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "gpu.tkestack.io",
    version = "v1alpha1",
    kind = "GpuQuota",
    plural = "gpuquotas",
    shortname = "gq",
    namespaced,
    status = "GpuQuotaStatus",
    printcolumn = r#"{"name":"Pods","type":"integer","jsonPath":".status.pods"}"#,
    printcolumn = r#"{"name":"Error","type":"string","jsonPath":".status.error"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct GpuQuotaSpec {
    /// The only GPU models pods of this namespace may use (empty: any). Matched by whole
    /// words, ignoring case: `A100` covers `NVIDIA A100-SXM4-40GB`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_models: Vec<String>,
    /// The only pools (values of the pool node label) pods of this namespace may use
    /// (empty: any).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_pools: Vec<String>,
    /// Limits per model and/or pool.
    #[serde(default)]
    pub limits: Vec<GpuQuotaLimit>,
}

/// One limit: the cards it covers and the bounds.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GpuQuotaLimit {
    /// Card model, matched by whole words ignoring case (`A100`, `Tesla T4`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Pool: value of the pool node label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// Most vcuda-core in use at once (100 per whole card).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcuda_core: Option<u64>,
    /// Most share memory in use at once, in 256 MiB blocks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcuda_memory: Option<u64>,
    /// Most whole cards in use at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cards: Option<u64>,
}

/// Usage published by gpu-admission.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GpuQuotaStatus {
    /// Usage per limit, in the order of `spec.limits`.
    #[serde(default)]
    pub used: Vec<GpuQuotaUsage>,
    /// Live GPU pods of the namespace counted.
    #[serde(default)]
    pub pods: u64,
    /// `metadata.generation` of the spec this status was computed for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// When the usage last changed (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated: Option<String>,
    /// Why the spec cannot be enforced (GPU pods of the namespace are denied until it is
    /// fixed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Usage of one limit.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GpuQuotaUsage {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    pub vcuda_core: u64,
    pub vcuda_memory: u64,
    pub cards: u64,
}

impl GpuQuotaSpec {
    /// The checked core quota.
    pub fn to_quota(&self) -> Result<Quota, QuotaSpecError> {
        let limits = self
            .limits
            .iter()
            .map(|l| Limit {
                selector: Selector::new(l.model.as_deref(), l.pool.as_deref()),
                max: Max {
                    cores: l.vcuda_core,
                    blocks: l.vcuda_memory,
                    cards: l.cards,
                },
            })
            .collect();
        let models = (!self.allowed_models.is_empty()).then_some(self.allowed_models.as_slice());
        Quota::new(models, &self.allowed_pools, limits)
    }

    /// Status entries for the given usage (one per limit).
    pub fn usage(&self, used: &[Amount]) -> Vec<GpuQuotaUsage> {
        self.limits
            .iter()
            .zip(used)
            .map(|(l, a)| GpuQuotaUsage {
                model: l.model.clone(),
                pool: l.pool.clone(),
                vcuda_core: a.cores,
                vcuda_memory: a.blocks,
                cards: a.cards,
            })
            .collect()
    }
}

/// The `CustomResourceDefinition` of `GpuQuota` as YAML, ready for `kubectl apply -f -`.
pub fn crd_yaml() -> Result<String, serde_yaml_ng::Error> {
    serde_yaml_ng::to_string(&GpuQuota::crd())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crd_is_namespaced_with_a_status_subresource() {
        let yaml = crd_yaml().unwrap();
        let v: serde_json::Value = serde_yaml_ng::from_str(&yaml).unwrap();
        assert_eq!(v["kind"], "CustomResourceDefinition");
        assert_eq!(v["metadata"]["name"], "gpuquotas.gpu.tkestack.io");
        assert_eq!(v["spec"]["scope"], "Namespaced");
        let version = &v["spec"]["versions"][0];
        assert_eq!(version["name"], "v1alpha1");
        assert!(version["subresources"]["status"].is_object(), "{yaml}");
        let limits =
            &version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["limits"];
        assert_eq!(limits["type"], "array", "{yaml}");
    }

    #[test]
    fn spec_reads_camel_case_fields() {
        let spec: GpuQuotaSpec = serde_json::from_str(
            r#"{"allowedModels":["T4"],"limits":[{"model":"T4","vcudaCore":200,"vcudaMemory":64,"cards":1}]}"#,
        )
        .unwrap();
        let q = spec.to_quota().unwrap();
        assert_eq!(q.allowed_models(), Some(&["T4".to_string()][..]));
        assert_eq!(q.limits()[0].max.blocks, Some(64));
        assert_eq!(q.limits()[0].selector.model(), Some("T4"));
    }
}
