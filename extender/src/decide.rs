//! The in-memory decisions of every verb, over one consistent view of the cluster state.
//!
//! Screening ([`Inner::screen`]) answers "fits, with what score" for every candidate without
//! allocating or formatting anything per node; reasons for the nodes that do not fit are worded
//! afterwards ([`Inner::explain`]), only when an answer needs them.

use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::{Arc, PoisonError};

use gm_core::placement::{normalize_scores, prefer, Eligibility, NodeView, Placement};
use gm_core::NodeLedger;

use crate::hash::FastBuild;
use crate::policy::ExtenderPolicy;
use crate::state::{CachedReason, GpuPod, Inner, ListKey, NameList, NodeGpu, NodeSlot, ScreenMemo};
use crate::wire::ExtenderArgs;

/// A pod, the policy that places it, and the node where it already holds cards (if any).
#[derive(Debug, Clone)]
pub(crate) struct PodContext<'a> {
    pub pod: &'a GpuPod,
    pub policy: ExtenderPolicy,
    pub own_node: Option<Arc<str>>,
}

/// Why a candidate was screened out (worded later by [`Inner::explain`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Miss {
    /// The node is not in our cache.
    Unknown,
    /// The node publishes no inventory.
    NoInventory,
    /// The node's inventory does not decode.
    BadInventory,
    /// The pod does not fit the node's cards.
    Unfit,
}

/// The outcome of screening candidates: indices into the candidate list.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Screen {
    pub fits: Vec<(usize, i64)>,
    /// Candidate index, slot (`u32::MAX` when unknown) and why.
    pub misses: Vec<(usize, u32, Miss)>,
}

/// A reason a node was rejected, and whether preemption could help.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Reason {
    pub text: Arc<str>,
    pub unresolvable: bool,
}

/// What a reason depends on besides the node: the policy, the pod's GPU containers and its
/// card constraints. Reasons are cached per node under this key (a collision could only
/// re-use another pod kind's wording, never change a decision).
pub(crate) fn shape_key(ctx: &PodContext<'_>) -> u64 {
    let mut h = FastBuild.build_hasher();
    ctx.policy.name().hash(&mut h);
    for c in &ctx.pod.request.containers {
        (c.slot, c.name.as_str(), c.request, c.sidecar).hash(&mut h);
    }
    let f = &ctx.pod.annotations.filter;
    (f.models.entries(), &f.include_uuids, &f.exclude_uuids).hash(&mut h);
    h.finish()
}

impl Inner {
    /// The context of one request for `pod`.
    pub fn context<'p>(&self, pod: &'p GpuPod, policy: ExtenderPolicy) -> PodContext<'p> {
        PodContext {
            pod,
            policy,
            own_node: self.holding(&pod.uid).map(|(n, _)| n.clone()),
        }
    }

    /// Evaluate `f` on the node as the pod sees it: with whatever the pod itself already
    /// holds there given back (a pod re-scheduled after a failed bind must not compete with
    /// its own old charge).
    fn as_seen_by<R>(
        &self,
        ctx: &PodContext<'_>,
        slot: &NodeSlot,
        f: impl FnOnce(&NodeView<'_>, Eligibility) -> R,
    ) -> Result<R, Miss> {
        let (view, all) = match &slot.gpu {
            NodeGpu::Ready { .. } => slot.view().ok_or(Miss::NoInventory)?,
            NodeGpu::Missing => return Err(Miss::NoInventory),
            NodeGpu::Invalid(_) => return Err(Miss::BadInventory),
        };
        let filter = &ctx.pod.annotations.filter;
        let elig = if filter.is_unconstrained() {
            all
        } else {
            Eligibility::of(view.inventory, filter)
        };
        let own_here = ctx.own_node.as_deref().is_some_and(|n| n == &*slot.name);
        if own_here {
            let mut mine = slot.ledger.clone();
            mine.release(&ctx.pod.uid);
            let ledger: NodeLedger = mine.ledger().clone();
            let view = NodeView {
                ledger: &ledger,
                ..view
            };
            return Ok(f(&view, elig));
        }
        Ok(f(&view, elig))
    }

    /// Screen every candidate (`slots` from [`Inner::resolve`]): which fit, with the policy's
    /// raw score. This is the hot loop of filter and prioritize: it reads the side-by-side copy
    /// of each node's card states and allocates nothing per node.
    pub fn screen(&self, ctx: &PodContext<'_>, slots: &[u32]) -> Screen {
        let mut out = Screen {
            fits: Vec::with_capacity(slots.len()),
            misses: Vec::new(),
        };
        let filter = &ctx.pod.annotations.filter;
        let unconstrained = filter.is_unconstrained();
        let own = ctx
            .own_node
            .as_deref()
            .and_then(|n| self.index.get(n.as_bytes()).copied());
        let request = &ctx.pod.request;
        for (i, &j) in slots.iter().enumerate() {
            let j = j as usize;
            let Some(hot) = self.hot.get(j) else {
                out.misses.push((i, u32::MAX, Miss::Unknown));
                continue;
            };
            let quick = if hot.ready && unconstrained && own != Some(j) {
                ctx.policy
                    .fit_score_from_cards(self.hot_cards(hot), request, hot.all)
            } else {
                None
            };
            let score = match quick {
                Some(answer) => answer,
                None => match self.evaluate(ctx, &self.slots[j]) {
                    Ok(answer) => answer,
                    Err(m) => {
                        out.misses.push((i, j as u32, m));
                        continue;
                    }
                },
            };
            match score {
                Some(score) => out.fits.push((i, score)),
                None => out.misses.push((i, j as u32, Miss::Unfit)),
            }
        }
        out
    }

    /// The full check of one node (constraints, the pod's own cards, multi-container pods).
    fn evaluate(&self, ctx: &PodContext<'_>, slot: &NodeSlot) -> Result<Option<i64>, Miss> {
        if !slot.present {
            return Err(Miss::Unknown);
        }
        self.as_seen_by(ctx, slot, |v, e| {
            ctx.policy.fit_score(v, &ctx.pod.request, e)
        })
    }

    /// Word why `node` was screened out.
    pub fn explain(&self, ctx: &PodContext<'_>, node: &str, miss: Miss) -> Reason {
        let slot = self.slot(node).filter(|s| s.present);
        let (text, unresolvable): (String, bool) = match (miss, slot) {
            (Miss::Unknown, _) | (_, None) => (
                "node is not in gpu-admission's node cache yet".to_string(),
                false,
            ),
            (Miss::NoInventory, Some(_)) => (
                "node has no GPU: it publishes no card inventory (is gpu-manager running there?)"
                    .to_string(),
                true,
            ),
            (Miss::BadInventory, Some(s)) => match &s.gpu {
                NodeGpu::Invalid(problem) => (format!("node has no usable GPU: {problem}"), true),
                _ => ("node has no usable GPU inventory".to_string(), true),
            },
            (Miss::Unfit, Some(s)) => {
                let filter = &ctx.pod.annotations.filter;
                match self.as_seen_by(ctx, s, |v, e| {
                    ctx.policy.place(v, &ctx.pod.request, filter, e)
                }) {
                    Ok(Err(unfit)) => (unfit.to_string(), unfit.unresolvable()),
                    Ok(Ok(_)) => (
                        "the node's free cards changed during the request; retry".to_string(),
                        false,
                    ),
                    Err(m) => return self.explain(ctx, node, m),
                }
            }
        };
        Reason {
            text: text.into(),
            unresolvable,
        }
    }

    /// [`Inner::explain`] for slot `j`, reusing the reason worded for the same kind of pod
    /// (`shape`, see [`shape_key`]) while the slot has not changed.
    pub fn explain_cached(&self, ctx: &PodContext<'_>, shape: u64, j: u32, miss: Miss) -> Reason {
        let (Some(slot), Some(hot), Some(cache)) = (
            self.slots.get(j as usize),
            self.hot.get(j as usize),
            self.reasons.get(j as usize),
        ) else {
            return self.explain(ctx, "", Miss::Unknown);
        };
        if ctx.own_node.as_deref() == Some(&*slot.name) {
            return self.explain(ctx, &slot.name, miss);
        }
        if let Some(c) = cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
        {
            if c.generation == hot.generation && c.shape == shape {
                return Reason {
                    text: c.text.clone(),
                    unresolvable: c.unresolvable,
                };
            }
        }
        let r = self.explain(ctx, &slot.name, miss);
        *cache.lock().unwrap_or_else(PoisonError::into_inner) = Some(CachedReason {
            generation: hot.generation,
            shape,
            text: r.text.clone(),
            unresolvable: r.unresolvable,
        });
        r
    }

    /// Choose the cards on one node for the pod, or say why it does not fit.
    pub fn plan(&self, ctx: &PodContext<'_>, node: &str) -> Result<Placement, Reason> {
        let Some(slot) = self.slot(node).filter(|s| s.present) else {
            return Err(self.explain(ctx, node, Miss::Unknown));
        };
        let filter = &ctx.pod.annotations.filter;
        match self.as_seen_by(ctx, slot, |v, e| {
            ctx.policy.place(v, &ctx.pod.request, filter, e)
        }) {
            Ok(Ok(p)) => Ok(p),
            Ok(Err(unfit)) => Err(Reason {
                unresolvable: unfit.unresolvable(),
                text: unfit.to_string().into(),
            }),
            Err(m) => Err(self.explain(ctx, node, m)),
        }
    }

    /// Prioritize: a 0-10 score per candidate, in candidate order (nodes that do not fit get 0).
    pub fn priorities(
        &self,
        ctx: &PodContext<'_>,
        names: &[&str],
        json: Option<&[u8]>,
        memo: Option<&ScreenMemo>,
    ) -> Vec<i64> {
        // The usual call: right after this pod's filter, with exactly the nodes it passed, and
        // nothing changed since.
        if let Some(m) = memo {
            let same = *m.uid == *ctx.pod.uid
                && m.policy == ctx.policy
                && m.generation == self.generation
                && m.nodes.matches(names, json);
            if same {
                return normalize_scores(&m.scores)
                    .into_iter()
                    .map(i64::from)
                    .collect();
            }
        }
        let screen = self.screen(ctx, &self.resolve(names));
        let raw: Vec<i64> = screen.fits.iter().map(|&(_, s)| s).collect();
        let mut out = vec![0i64; names.len()];
        for (&(i, _), n) in screen.fits.iter().zip(normalize_scores(&raw)) {
            out[i] = i64::from(n);
        }
        out
    }

    /// What prioritize needs to remember of a filter's screen of `args`.
    pub fn memo(
        &self,
        ctx: &PodContext<'_>,
        screen: &Screen,
        args: &ExtenderArgs<'_>,
        names: &[&str],
    ) -> ScreenMemo {
        let nodes = match &args.node_names {
            Some(cows) => ListKey::of(cows, screen.fits.iter().map(|&(i, _)| i)),
            None => ListKey::Names(NameList::new(screen.fits.iter().map(|&(i, _)| names[i]))),
        };
        ScreenMemo {
            uid: ctx.pod.uid.clone(),
            policy: ctx.policy,
            generation: self.generation,
            nodes,
            scores: screen.fits.iter().map(|&(_, s)| s).collect(),
        }
    }
}

/// The best fitting candidate of a screen: the highest score, ties to the lowest name.
pub(crate) fn best(screen: &Screen, names: &[&str]) -> Option<usize> {
    let mut best: Option<(usize, i64)> = None;
    for &(i, s) in &screen.fits {
        if best.is_none_or(|(b, bs)| prefer(s, names[i], bs, names[b])) {
            best = Some((i, s));
        }
    }
    best.map(|(i, _)| i)
}
