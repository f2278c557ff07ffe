//! The in-memory decisions of every verb, over one consistent view of the cluster state.
//!
//! Screening ([`Inner::screen`]) answers "fits, with what score" for every candidate without
//! allocating or formatting anything per node; reasons for the nodes that do not fit are worded
//! afterwards ([`Inner::explain`]), only when an answer needs them.
//!
//! Whether a pod fits is always the `gm_core::placement` policy's verdict
//! ([`ExtenderPolicy::core`]). Under `fgd` and `fgd+` the nodes that fit are then ranked by
//! `gm_core::fgd` / `gm_core::fgd_plus` ([`Inner::fgd_scores`], cached per node) and bind
//! takes FGD's cards. Prioritize maps the raw scores to 0–10 with
//! `gm_core::placement::extender_priorities`: one node, the policy's best, gets 10.

use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::{Arc, PoisonError};

use gm_core::fgd::{paper_score, FgdNode};
use gm_core::fgd_plus::PlusParts;
use gm_core::placement::{extender_priorities, Eligibility, NodeView, Placement, TieOrder, Unfit};
use gm_core::request::GpuRequest;
use gm_core::NodeLedger;

use crate::fgd::{CacheEntry, FgdModel};
use crate::hash::FastBuild;
use crate::policy::ExtenderPolicy;
use crate::state::{CachedReason, GpuPod, Inner, ListKey, NameList, NodeGpu, NodeSlot, ScreenMemo};
use crate::wire::ExtenderArgs;

/// The raw score of a node FGD cannot place the pod on although it fits (possible for pods of
/// several containers): below every FGD score, so such nodes are chosen last (with binpack's
/// cards).
const FGD_FALLBACK: i64 = i64::MIN / 2;

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
        f: impl FnOnce(&NodeView<'_>, Eligibility, Option<u64>) -> R,
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
        let cpu_free = self.cpu_free_seen_by(&ctx.pod.uid, &slot.name);
        if own_here {
            let mut mine = slot.ledger.clone();
            mine.release(&ctx.pod.uid);
            let ledger: NodeLedger = mine.ledger().clone();
            let view = NodeView {
                ledger: &ledger,
                ..view
            };
            return Ok(f(&view, elig, cpu_free));
        }
        Ok(f(&view, elig, cpu_free))
    }

    /// Screen every candidate (`slots` from [`Inner::resolve`]): which fit, with the policy's
    /// raw score. This is the hot loop of filter and prioritize: it reads the side-by-side copy
    /// of each node's card states and allocates nothing per node.
    pub fn screen(&self, ctx: &PodContext<'_>, slots: &[u32]) -> Screen {
        let mut out = self.screen_fit(ctx, slots);
        if ctx.policy.is_fgd() {
            if let Some(model) = self.fgd.model.clone() {
                self.fgd_scores(ctx, &model, slots, &mut out.fits);
            }
        }
        out
    }

    /// [`Inner::screen`] under the pod's core policy.
    fn screen_fit(&self, ctx: &PodContext<'_>, slots: &[u32]) -> Screen {
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
        self.as_seen_by(ctx, slot, |v, e, _| {
            ctx.policy.fit_score(v, &ctx.pod.request, e)
        })
    }

    /// Replace the core scores of the fitting candidates by FGD's (`fgd`: the paper's node
    /// score, 0–100; `fgd+`: its ranking key), from each node's cache when it still holds.
    fn fgd_scores(
        &self,
        ctx: &PodContext<'_>,
        model: &FgdModel,
        slots: &[u32],
        fits: &mut [(usize, i64)],
    ) {
        let key = fgd_key(ctx);
        let plus = ctx.policy == ExtenderPolicy::FgdPlus;
        let scarcity_version = if plus { self.fgd.scarcity_version } else { 0 };
        let simple_request = match ctx.pod.request.containers.as_slice() {
            [c] if c.long_running() && ctx.pod.annotations.filter.is_unconstrained() => {
                Some(c.request)
            }
            _ => None,
        };
        let own = ctx
            .own_node
            .as_deref()
            .and_then(|n| self.index.get(n.as_bytes()).copied());
        let mut cache = self
            .fgd
            .cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for (i, score) in fits.iter_mut() {
            let j = slots[*i] as usize;
            if own == Some(j) {
                // The pod's own cards given back: not the node's state, never cached.
                *score = self.fgd_full(ctx, model, j).unwrap_or(FGD_FALLBACK);
                continue;
            }
            let (Some(hot), Some(entry)) = (self.hot.get(j), cache.get_mut(j)) else {
                *score = FGD_FALLBACK;
                continue;
            };
            if entry.node != hot.generation || entry.model != model.version {
                *entry = CacheEntry {
                    node: hot.generation,
                    model: model.version,
                    ..CacheEntry::default()
                };
            }
            if entry.shape != key {
                entry.shape = key;
                entry.score = None;
                entry.parts = None;
            }
            let s = match simple_request.filter(|_| hot.ready) {
                // fgd+: the scarcity-free parts are kept; only their weighing is redone when
                // the scarcity changed (it does whenever any node gains or loses a type).
                Some(r) if plus => {
                    if entry.parts.is_none() {
                        entry.parts = Some(self.fgd_plus_parts(ctx, model, j, &r, entry));
                    }
                    match entry.parts.as_ref().and_then(Option::as_ref) {
                        Some(parts) => self.fgd_plus_choose(ctx, model, j, &r, parts),
                        None => None,
                    }
                }
                simple => {
                    if entry.score.is_none() || entry.scarcity != scarcity_version {
                        let s = match simple {
                            Some(r) => self.fgd_simple(ctx, model, j, &r, entry),
                            None => self.fgd_full(ctx, model, j),
                        };
                        entry.score = Some(s);
                        entry.scarcity = scarcity_version;
                    }
                    entry.score.flatten()
                }
            };
            *score = s.unwrap_or(FGD_FALLBACK);
        }
    }

    /// The node's free CPU for the pod and its fragmentation under the policy's measure (from
    /// the cache when it holds). CPU is kube-scheduler's constraint, not ours: a node it let
    /// through but we see short is scored as if the pod took its last CPU (that base is not
    /// the node's, so it is not cached).
    fn fgd_base(
        &self,
        ctx: &PodContext<'_>,
        model: &FgdModel,
        j: usize,
        entry: &mut CacheEntry,
    ) -> Option<(Option<u64>, f64)> {
        let acc = self.fgd.access.get(j)?.as_ref()?;
        let slot = self.slots.get(j)?;
        let hot = self.hot.get(j)?;
        let pod_cpu = ctx.pod.cpu_milli;
        let free = slot.cpu_free();
        let short = free.is_some_and(|c| c < pod_cpu);
        let cpu = free.map(|c| c.max(pod_cpu));
        let plus = ctx.policy == ExtenderPolicy::FgdPlus;
        let cached = if plus { entry.base_plus } else { entry.base };
        let base = match cached {
            Some(b) if !short => b,
            _ => {
                let f = if plus { model.plus.fgd() } else { &model.fgd };
                let b = f.node_fragmentation(&acc.fgd, self.hot_cards(hot), hot.all.healthy, cpu);
                if !short {
                    if plus {
                        entry.base_plus = Some(b);
                    } else {
                        entry.base = Some(b);
                    }
                }
                b
            }
        };
        Some((cpu, base))
    }

    /// FGD's score of an unconstrained one-container pod, from the node's card states.
    fn fgd_simple(
        &self,
        ctx: &PodContext<'_>,
        model: &FgdModel,
        j: usize,
        request: &GpuRequest,
        entry: &mut CacheEntry,
    ) -> Option<i64> {
        let (cpu, base) = self.fgd_base(ctx, model, j, entry)?;
        let acc = self.fgd.access.get(j)?.as_ref()?;
        let hot = self.hot.get(j)?;
        let healthy = hot.all.healthy;
        model
            .fgd
            .evaluate_cards(
                &acc.fgd,
                self.hot_cards(hot),
                healthy,
                healthy,
                cpu,
                base,
                ctx.pod.cpu_milli,
                request,
            )
            .map(|e| paper_score(e.delta))
    }

    /// `fgd+`'s scarcity-free verdict on an unconstrained one-container pod (`None` inside:
    /// FGD cannot place it there).
    fn fgd_plus_parts(
        &self,
        ctx: &PodContext<'_>,
        model: &FgdModel,
        j: usize,
        request: &GpuRequest,
        entry: &mut CacheEntry,
    ) -> Option<PlusParts> {
        let (cpu, base) = self.fgd_base(ctx, model, j, entry)?;
        let acc = self.fgd.access.get(j)?.as_ref()?;
        let hot = self.hot.get(j)?;
        let healthy = hot.all.healthy;
        model.plus.parts_cards(
            &acc.fgd,
            &acc.cap,
            self.hot_cards(hot),
            (healthy, healthy),
            cpu,
            base,
            ctx.pod.cpu_milli,
            request,
        )
    }

    /// `fgd+`'s ranking key from its parts under the current scarcity.
    fn fgd_plus_choose(
        &self,
        ctx: &PodContext<'_>,
        model: &FgdModel,
        j: usize,
        request: &GpuRequest,
        parts: &PlusParts,
    ) -> Option<i64> {
        let slot = self.slots.get(j)?;
        let hot = self.hot.get(j)?;
        let pod_cpu = ctx.pod.cpu_milli;
        let cpu = slot.cpu_free().map(|c| c.max(pod_cpu));
        Some(
            model
                .plus
                .choose(
                    parts,
                    &self.fgd.scarcity,
                    self.hot_cards(hot),
                    hot.all.healthy,
                    cpu,
                    pod_cpu,
                    request,
                )
                .key,
        )
    }

    /// FGD's score of any pod on slot `j`, from a full placement.
    fn fgd_full(&self, ctx: &PodContext<'_>, model: &FgdModel, j: usize) -> Option<i64> {
        let slot = self.slots.get(j)?;
        self.as_seen_by(ctx, slot, |v, _, cpu| {
            self.fgd_place(ctx, model, j, v, cpu).map(|p| p.score)
        })
        .ok()
        .flatten()
    }

    /// FGD's placement of the pod on slot `j` (seen as `view`, with `cpu_free`), if FGD can
    /// place it there. `score` is the raw FGD score.
    fn fgd_place(
        &self,
        ctx: &PodContext<'_>,
        model: &FgdModel,
        j: usize,
        view: &NodeView<'_>,
        cpu_free: Option<u64>,
    ) -> Option<Placement> {
        let acc = self.fgd.access.get(j)?.as_ref()?;
        let pod_cpu = ctx.pod.cpu_milli;
        let node = FgdNode {
            access: &acc.fgd,
            inventory: view.inventory,
            ledger: view.ledger,
            cpu_free: cpu_free.map(|c| c.max(pod_cpu)),
        };
        let filter = &ctx.pod.annotations.filter;
        let request = &ctx.pod.request;
        match ctx.policy {
            ExtenderPolicy::FgdPlus => model
                .plus
                .place_pod(
                    &node,
                    &acc.cap,
                    &self.fgd.scarcity,
                    pod_cpu,
                    request,
                    filter,
                )
                .map(|p| Placement {
                    cards: p.placement.cards,
                    assignment: p.placement.assignment,
                    score: p.choice.key,
                }),
            _ => model
                .fgd
                .place_pod(&node, pod_cpu, request, filter)
                .map(|p| Placement {
                    cards: p.cards,
                    assignment: p.assignment,
                    score: p.score,
                }),
        }
    }

    /// The pod's placement on slot `j` under its policy: the core policy's, or for `fgd` and
    /// `fgd+` FGD's cards wherever the core policy says it fits (the core policy's cards when
    /// FGD cannot place it, or before a target workload is known).
    fn place_on(
        &self,
        ctx: &PodContext<'_>,
        j: usize,
        view: &NodeView<'_>,
        elig: Eligibility,
        cpu_free: Option<u64>,
    ) -> Result<Placement, Unfit> {
        let filter = &ctx.pod.annotations.filter;
        let core = ctx.policy.place(view, &ctx.pod.request, filter, elig)?;
        if !ctx.policy.is_fgd() {
            return Ok(core);
        }
        Ok(self
            .fgd
            .model
            .as_deref()
            .and_then(|m| self.fgd_place(ctx, m, j, view, cpu_free))
            .unwrap_or(core))
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
                match self.as_seen_by(ctx, s, |v, e, _| {
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
        let Some(&j) = self.index.get(node.as_bytes()) else {
            return Err(self.explain(ctx, node, Miss::Unknown));
        };
        let Some(slot) = self.slots.get(j).filter(|s| s.present) else {
            return Err(self.explain(ctx, node, Miss::Unknown));
        };
        match self.as_seen_by(ctx, slot, |v, e, cpu| self.place_on(ctx, j, v, e, cpu)) {
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
                return extender_priorities(&m.scores, names, ctx.policy.tie_order())
                    .into_iter()
                    .map(i64::from)
                    .collect();
            }
        }
        let screen = self.screen(ctx, &self.resolve(names));
        let raw: Vec<i64> = screen.fits.iter().map(|&(_, s)| s).collect();
        let fit_names: Vec<&str> = screen.fits.iter().map(|&(i, _)| names[i]).collect();
        let mut out = vec![0i64; names.len()];
        for (&(i, _), n) in screen.fits.iter().zip(extender_priorities(
            &raw,
            &fit_names,
            ctx.policy.tie_order(),
        )) {
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

/// The best fitting candidate of a screen: the highest score, ties in `order` — the node
/// prioritize would give the top priority.
pub(crate) fn best(screen: &Screen, names: &[&str], order: TieOrder) -> Option<usize> {
    let mut best: Option<(usize, i64)> = None;
    for &(i, s) in &screen.fits {
        if best.is_none_or(|(b, bs)| order.prefer(s, names[i], bs, names[b])) {
            best = Some((i, s));
        }
    }
    best.map(|(i, _)| i)
}

/// What an FGD score depends on besides the node and the workload: the pod's shape and CPU.
fn fgd_key(ctx: &PodContext<'_>) -> u64 {
    let mut h = FastBuild.build_hasher();
    shape_key(ctx).hash(&mut h);
    ctx.pod.cpu_milli.hash(&mut h);
    // 0 is the key of an empty cache entry.
    h.finish().max(1)
}
