//! Which placement policy decides, and the one place that dispatches to it.
//!
//! The cluster-wide default comes from `--policy`; a pod may choose another with the
//! `<domain>/gpu-policy` annotation. Feasibility is always decided (and explained) by a
//! `gm_core::placement` policy ([`ExtenderPolicy::core`]): the node-local policies also rank
//! and place with it, while `fgd` and `fgd+` rank the nodes that fit and choose the cards with
//! `gm_core::fgd` / `gm_core::fgd_plus` (see `crate::decide`).

use std::fmt;
use std::str::FromStr;

use gm_core::annotations::CardFilter;
use gm_core::ledger::CardState;
use gm_core::placement::{self, Eligibility, NodeView, Placement, TieOrder, Unfit};
use gm_core::{PodGpuRequest, Policy};

/// A placement policy the extender can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExtenderPolicy {
    /// One of the node-local policies of `gm_core::placement` (`binpack`, `spread`,
    /// `topology`), scored per node.
    Core(Policy),
    /// Fragmentation gradient descent (`gm_core::fgd`), the paper's node score.
    Fgd,
    /// `fgd+`: FGD plus capability protection (`gm_core::fgd_plus`).
    FgdPlus,
}

impl ExtenderPolicy {
    /// Every policy, in the order they are listed to users.
    pub const ALL: [ExtenderPolicy; 5] = [
        ExtenderPolicy::Core(Policy::Binpack),
        ExtenderPolicy::Core(Policy::Spread),
        ExtenderPolicy::Core(Policy::Topology),
        ExtenderPolicy::Fgd,
        ExtenderPolicy::FgdPlus,
    ];

    /// The name used by `--policy` and the pod annotation.
    pub fn name(self) -> &'static str {
        match self {
            ExtenderPolicy::Core(p) => p.name(),
            ExtenderPolicy::Fgd => "fgd",
            ExtenderPolicy::FgdPlus => "fgd+",
        }
    }

    /// The `gm_core::placement` policy that decides whether a pod fits a node and words why
    /// not: the policy itself, or binpack for `fgd` and `fgd+` (which then rank the nodes that
    /// fit, and also place like binpack until a target workload is known).
    pub fn core(self) -> Policy {
        match self {
            ExtenderPolicy::Core(p) => p,
            ExtenderPolicy::Fgd | ExtenderPolicy::FgdPlus => Policy::Binpack,
        }
    }

    /// True for `fgd` and `fgd+`.
    pub fn is_fgd(self) -> bool {
        matches!(self, ExtenderPolicy::Fgd | ExtenderPolicy::FgdPlus)
    }

    /// How equally scored nodes are ordered: by name for the node-local policies
    /// (gpu-admission's rule), by a stable hash of the name for FGD (a fixed order that looks
    /// random, as in the validation of `docs/simulator.md`).
    pub fn tie_order(self) -> TieOrder {
        match self {
            ExtenderPolicy::Core(_) => TieOrder::Name,
            ExtenderPolicy::Fgd | ExtenderPolicy::FgdPlus => TieOrder::NameHash,
        }
    }

    /// Does the pod fit the node, and how good is the node under [`ExtenderPolicy::core`]
    /// (higher is better)? Never formats a reason; see [`ExtenderPolicy::place`] for the cards
    /// or the reason.
    pub fn fit_score(
        self,
        node: &NodeView<'_>,
        pod: &PodGpuRequest,
        elig: Eligibility,
    ) -> Option<i64> {
        placement::fit_score(self.core(), node, pod, elig)
    }

    /// [`ExtenderPolicy::fit_score`] from a copy of the node's card states alone, when they
    /// decide it (`None`: ask `fit_score` with the full node view).
    pub fn fit_score_from_cards(
        self,
        cards: &[CardState],
        pod: &PodGpuRequest,
        elig: Eligibility,
    ) -> Option<Option<i64>> {
        placement::fit_score_from_cards(self.core(), cards, pod, elig)
    }

    /// Choose the cards on one node with [`ExtenderPolicy::core`], or say why the pod does
    /// not fit (FGD's own card choice is made by the caller, which holds the workload).
    pub fn place(
        self,
        node: &NodeView<'_>,
        pod: &PodGpuRequest,
        filter: &CardFilter,
        elig: Eligibility,
    ) -> Result<Placement, Unfit> {
        placement::place_with(self.core(), node, pod, filter, elig)
    }
}

impl fmt::Display for ExtenderPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An unknown policy name, with the names that exist.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown placement policy {given:?}: use one of {}", names())]
pub struct UnknownPolicy {
    pub given: String,
}

fn names() -> String {
    let v: Vec<&str> = ExtenderPolicy::ALL.iter().map(|p| p.name()).collect();
    v.join(", ")
}

impl FromStr for ExtenderPolicy {
    type Err = UnknownPolicy;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        let t = match t.to_ascii_lowercase().as_str() {
            "fgd-plus" | "fgdplus" | "fgd_plus" => "fgd+",
            _ => t,
        };
        ExtenderPolicy::ALL
            .into_iter()
            .find(|p| p.name().eq_ignore_ascii_case(t))
            .ok_or_else(|| UnknownPolicy {
                given: s.to_string(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_ones_list_the_choices() {
        for p in ExtenderPolicy::ALL {
            assert_eq!(p.name().parse::<ExtenderPolicy>(), Ok(p));
        }
        assert_eq!(
            " Spread ".parse::<ExtenderPolicy>(),
            Ok(ExtenderPolicy::Core(Policy::Spread))
        );
        assert_eq!(
            "FGD+".parse::<ExtenderPolicy>(),
            Ok(ExtenderPolicy::FgdPlus)
        );
        assert_eq!(
            "fgd-plus".parse::<ExtenderPolicy>(),
            Ok(ExtenderPolicy::FgdPlus)
        );
        let e = "fastest".parse::<ExtenderPolicy>().unwrap_err().to_string();
        assert_eq!(
            e,
            "unknown placement policy \"fastest\": use one of binpack, spread, topology, fgd, fgd+"
        );
    }

    #[test]
    fn fgd_ranks_with_its_own_tie_order_but_binpack_decides_the_fit() {
        for p in [ExtenderPolicy::Fgd, ExtenderPolicy::FgdPlus] {
            assert!(p.is_fgd());
            assert_eq!(p.core(), Policy::Binpack);
            assert_eq!(p.tie_order(), TieOrder::NameHash);
        }
        assert_eq!(
            ExtenderPolicy::Core(Policy::Spread).tie_order(),
            TieOrder::Name
        );
    }
}
