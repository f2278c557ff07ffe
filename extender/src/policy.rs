//! Which placement policy decides, and the one place that dispatches to it.
//!
//! The cluster-wide default comes from `--policy`; a pod may choose another with the
//! `<domain>/gpu-policy` annotation. Every verb (filter, prioritize, bind, predicates) goes
//! through [`ExtenderPolicy::fit_score`] and [`ExtenderPolicy::place`], so a new policy is one
//! new variant here plus its arms.

use std::fmt;
use std::str::FromStr;

use gm_core::annotations::CardFilter;
use gm_core::ledger::CardState;
use gm_core::placement::{self, Eligibility, NodeView, Placement, Unfit};
use gm_core::{PodGpuRequest, Policy};

/// A placement policy the extender can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExtenderPolicy {
    /// One of the node-local policies of `gm_core::placement` (`binpack`, `spread`,
    /// `topology`), scored per node.
    Core(Policy),
}

impl ExtenderPolicy {
    /// Every policy, in the order they are listed to users.
    pub const ALL: [ExtenderPolicy; 3] = [
        ExtenderPolicy::Core(Policy::Binpack),
        ExtenderPolicy::Core(Policy::Spread),
        ExtenderPolicy::Core(Policy::Topology),
    ];

    /// The name used by `--policy` and the pod annotation.
    pub fn name(self) -> &'static str {
        match self {
            ExtenderPolicy::Core(p) => p.name(),
        }
    }

    /// Does the pod fit the node, and how good is the node (higher is better)? Never formats a
    /// reason; see [`ExtenderPolicy::place`] for the cards or the reason.
    pub fn fit_score(
        self,
        node: &NodeView<'_>,
        pod: &PodGpuRequest,
        elig: Eligibility,
    ) -> Option<i64> {
        match self {
            ExtenderPolicy::Core(p) => placement::fit_score(p, node, pod, elig),
        }
    }

    /// [`ExtenderPolicy::fit_score`] from a copy of the node's card states alone, when they
    /// decide it (`None`: ask `fit_score` with the full node view).
    pub fn fit_score_from_cards(
        self,
        cards: &[CardState],
        pod: &PodGpuRequest,
        elig: Eligibility,
    ) -> Option<Option<i64>> {
        match self {
            ExtenderPolicy::Core(p) => placement::fit_score_from_cards(p, cards, pod, elig),
        }
    }

    /// Choose the cards on one node, or say why the pod does not fit.
    pub fn place(
        self,
        node: &NodeView<'_>,
        pod: &PodGpuRequest,
        filter: &CardFilter,
        elig: Eligibility,
    ) -> Result<Placement, Unfit> {
        match self {
            ExtenderPolicy::Core(p) => placement::place_with(p, node, pod, filter, elig),
        }
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
        let e = "fastest".parse::<ExtenderPolicy>().unwrap_err().to_string();
        assert_eq!(
            e,
            "unknown placement policy \"fastest\": use one of binpack, spread, topology"
        );
    }
}
