//! The policies the simulator can replay a trace with.
//!
//! | name | where it lives | node score (higher wins; ties broken uniformly at random) | card choice |
//! |---|---|---|---|
//! | `random-fit` | here (paper baseline) | none: a uniformly random feasible node | a random fitting card |
//! | `best-fit` | here (paper baseline) | `trunc(100·(1 − ½·cpu_left/128 cores − ½·gpu_left/8 GPUs))`, leftovers after placement | tightest fit |
//! | `dot-product` | here (paper baseline) | `trunc(100·(1 − (c_n·c + R_n·R)/2))`, free node vector · demand vector, normalised by 128 cores and 8 GPUs | tightest fit |
//! | `gpu-packing` | here (paper baseline) | three tiers: fits on used cards > needs free cards of a used node > idle node | tightest fit |
//! | `gpu-clustering` | here (paper baseline) | four tiers by the classes of GPU pods already on the node, + fullness | tightest fit |
//! | `fgd` | `gm_core::fgd` | the paper's `trunc(100·sigmoid(−Δ/1000 milli))` | smallest gradient (the paper's quantised rule) |
//! | `fgd+` | `gm_core::fgd` | see `docs/simulator.md` | smallest exact gradient |
//! | `binpack`, `spread`, `topology` | `gm_core::placement` | `Placement::score` | the policy's own |
//!
//! The baselines follow `shared/reference/fgd.md` §2.5 including the integer truncation of
//! their scores (it creates the ties that are then broken at random, as kube-scheduler does).

use std::fmt;
use std::str::FromStr;

use gm_core::placement::TieOrder;
use gm_core::Policy;

/// A policy the simulator replays a trace with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SimPolicy {
    RandomFit,
    BestFit,
    DotProduct,
    GpuPacking,
    GpuClustering,
    Fgd,
    FgdPlus,
    /// One of `gm_core::placement`'s policies.
    Core(Policy),
}

impl SimPolicy {
    /// Every policy, paper baselines first.
    pub const ALL: [SimPolicy; 10] = [
        SimPolicy::RandomFit,
        SimPolicy::DotProduct,
        SimPolicy::GpuClustering,
        SimPolicy::GpuPacking,
        SimPolicy::BestFit,
        SimPolicy::Fgd,
        SimPolicy::FgdPlus,
        SimPolicy::Core(Policy::Binpack),
        SimPolicy::Core(Policy::Spread),
        SimPolicy::Core(Policy::Topology),
    ];

    pub fn name(self) -> &'static str {
        match self {
            SimPolicy::RandomFit => "random-fit",
            SimPolicy::BestFit => "best-fit",
            SimPolicy::DotProduct => "dot-product",
            SimPolicy::GpuPacking => "gpu-packing",
            SimPolicy::GpuClustering => "gpu-clustering",
            SimPolicy::Fgd => "fgd",
            SimPolicy::FgdPlus => "fgd+",
            SimPolicy::Core(p) => p.name(),
        }
    }

    /// The order of equally scored nodes under `--ties extender`: the extender's own rule for
    /// the policies it runs (by name for binpack, spread and topology; by a stable hash of the
    /// name for FGD and `fgd+`), the hash order for the paper's baselines.
    pub fn tie_order(self) -> TieOrder {
        match self {
            SimPolicy::Core(_) => TieOrder::Name,
            _ => TieOrder::NameHash,
        }
    }

    /// Parse a comma-separated list; `all` stands for every policy.
    pub fn parse_list(s: &str) -> Result<Vec<SimPolicy>, PolicyError> {
        let mut out = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            if part.eq_ignore_ascii_case("all") {
                out.extend(Self::ALL);
            } else {
                out.push(part.parse()?);
            }
        }
        if out.is_empty() {
            return Err(PolicyError(s.to_string()));
        }
        let mut seen = Vec::new();
        out.retain(|p| {
            let new = !seen.contains(p);
            seen.push(*p);
            new
        });
        Ok(out)
    }
}

impl fmt::Display for SimPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An unknown policy name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown policy {0:?}: use random-fit, best-fit, dot-product, gpu-packing, gpu-clustering, fgd, fgd+, binpack, spread, topology (comma-separated), or all")]
pub struct PolicyError(pub String);

impl FromStr for SimPolicy {
    type Err = PolicyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let norm = s.trim().to_ascii_lowercase().replace('_', "-");
        Ok(match norm.as_str() {
            "random-fit" | "random" => SimPolicy::RandomFit,
            "best-fit" | "bestfit" => SimPolicy::BestFit,
            "dot-product" | "dotprod" => SimPolicy::DotProduct,
            "gpu-packing" | "packing" => SimPolicy::GpuPacking,
            "gpu-clustering" | "clustering" => SimPolicy::GpuClustering,
            "fgd" => SimPolicy::Fgd,
            "fgd+" | "fgd-plus" | "fgdplus" => SimPolicy::FgdPlus,
            other => match other.parse::<Policy>() {
                Ok(p) => SimPolicy::Core(p),
                Err(_) => return Err(PolicyError(s.to_string())),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_lists_parse_names_aliases_and_all() {
        assert_eq!(
            SimPolicy::parse_list("fgd, Best_Fit,binpack").unwrap(),
            vec![
                SimPolicy::Fgd,
                SimPolicy::BestFit,
                SimPolicy::Core(Policy::Binpack)
            ]
        );
        assert_eq!(SimPolicy::parse_list("all").unwrap().len(), 10);
        assert_eq!(
            SimPolicy::parse_list("fgd,fgd").unwrap(),
            vec![SimPolicy::Fgd]
        );
        for p in SimPolicy::ALL {
            assert_eq!(p.name().parse::<SimPolicy>().unwrap(), p);
        }
        let e = SimPolicy::parse_list("fgd,worst-fit")
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"worst-fit\"") && e.contains("best-fit"), "{e}");
        assert!(SimPolicy::parse_list(" , ").is_err());
    }
}
