//! The old gpu-admission quota ConfigMap (data key `gpu_quota`), as an alternative source.
//!
//! ```json
//! {"team-a": {"quota": {"M40": 8, "P100": 2}, "pool": ["public"]}}
//! ```
//!
//! Read the way the old scheduler filter treated it: a namespace listed here may only use the
//! listed models (whole cards each: `M40: 8` allows 800 vcuda-core on M40 cards) and, when
//! `pool` is not empty, only nodes of those pools. Namespaces not listed are unrestricted.

use std::collections::BTreeMap;

use gm_core::quota::{Limit, Max, Quota, Selector};
use gm_core::resources::CORES_PER_CARD;
use serde::Deserialize;

/// The data key of the ConfigMap.
pub const DATA_KEY: &str = "gpu_quota";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    #[serde(default)]
    quota: BTreeMap<String, u64>,
    #[serde(default)]
    pool: Vec<String>,
}

/// The ConfigMap could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("gpu quota ConfigMap {source_name}: {problem}")]
pub struct LegacyError {
    pub source_name: String,
    pub problem: String,
}

/// Parse the `gpu_quota` value into a quota per namespace.
pub fn parse_legacy(source_name: &str, json: &str) -> Result<BTreeMap<String, Quota>, LegacyError> {
    let err = |problem: String| LegacyError {
        source_name: source_name.to_string(),
        problem,
    };
    let raw: BTreeMap<String, Entry> = serde_json::from_str(json).map_err(|e| {
        err(format!(
            "data.{DATA_KEY} is not valid: {e}; expected {{\"<namespace>\": {{\"quota\": {{\"<model>\": <whole cards>}}, \"pool\": [\"<pool>\"]}}}}"
        ))
    })?;
    let mut out = BTreeMap::new();
    for (ns, entry) in raw {
        let models: Vec<String> = entry.quota.keys().cloned().collect();
        let mut limits = Vec::new();
        for (model, cards) in &entry.quota {
            let cores = cards
                .checked_mul(u64::from(CORES_PER_CARD))
                .ok_or_else(|| {
                    err(format!(
                        "namespace {ns:?}: {model}={cards} cards is too large"
                    ))
                })?;
            limits.push(Limit {
                selector: Selector::new(Some(model), None),
                max: Max {
                    cores: Some(cores),
                    ..Max::default()
                },
            });
        }
        let quota = Quota::new(Some(&models), &entry.pool, limits)
            .map_err(|e| err(format!("namespace {ns:?}: {e}")))?;
        out.insert(ns, quota);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_example_becomes_model_limits_and_restrictions() {
        let q = parse_legacy(
            "kube-system/gpuquota",
            r#"{"default":{"quota":{"M40":4,"P100":4},"pool":["public"]},"B":{"quota":{"M40":8,"P100":2},"pool":["wx"]}}"#,
        )
        .unwrap();
        let b = &q["B"];
        assert_eq!(b.allowed_pools(), ["wx"]);
        assert_eq!(b.allowed_models().map(<[String]>::len), Some(2));
        let m40 = &b.limits()[0];
        assert_eq!(m40.selector.model(), Some("M40"));
        assert_eq!(m40.max.cores, Some(800));
    }

    #[test]
    fn malformed_configmaps_name_the_source_and_the_expected_shape() {
        let e = parse_legacy("kube-system/gpuquota", r#"{"a":{"quotas":{}}}"#).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("kube-system/gpuquota"), "{msg}");
        assert!(msg.contains("unknown field `quotas`"), "{msg}");
        assert!(msg.contains("\"quota\""), "{msg}");
        let e = parse_legacy("cm", r#"{"a":{"quota":{"M40":-1}}}"#).unwrap_err();
        assert!(e.to_string().contains("data.gpu_quota is not valid"), "{e}");
    }
}
