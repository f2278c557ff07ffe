//! One trace replay: the arrival order (seeded shuffle, tuning to a share of GPU capacity) and
//! the sequential placement of every pod, following `shared/reference/fgd.md` §1.6.

use std::time::{Duration, Instant};

use gm_core::annotations::{CardFilter, ModelFilter};
use gm_core::fgd::{paper_score, CardPick, Demand, Fgd, NodeAccess, TargetWorkload, MAX_CARDS};
use gm_core::placement::{extender_priorities, normalize_scores, place, NodeView};
use gm_core::resources::CORES_PER_CARD;
use gm_core::topology::Topology;
use gm_core::{Assignment, GpuRequest, Link, NodeInventory, NodeLedger, PodGpuRequest};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::policy::SimPolicy;
use crate::trace::{TraceNode, TracePod};
use gm_core::fgd_plus::{CapAccess, FgdPlus, PlusConfig, Scarcity};

/// The paper's normalisers: the largest node has 128 cores and 8 GPUs.
const MAX_SPEC_CPU: f64 = 128_000.0;
const MAX_SPEC_GPU_MILLI: f64 = 8_000.0;
/// Memory given to each simulated card. The trace has no GPU memory and shares take no blocks,
/// so the value only has to be non-zero.
const CARD_MIB: u64 = 16 * 1024;

/// Why a simulation cannot run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SimError {
    #[error("the node list has no GPUs: the allocation ratio is undefined")]
    NoGpus,
    #[error("the node list has {0} distinct GPU models; at most 64 are supported")]
    TooManyModels(usize),
    #[error("the pod list is empty")]
    NoPods,
    #[error("tuning ratio {0} is out of range: use a number in (0, 10], e.g. 1.3")]
    Ratio(String),
    #[error("target workload: {0}")]
    Workload(String),
}

/// How a policy's equally scored best nodes are told apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TieBreak {
    /// The first of them in a node order drawn at random once per seed (the paper's simulator
    /// behaves this way: see `docs/simulator.md`, "Validation").
    #[default]
    NodeOrder,
    /// Uniformly at random at every decision.
    Random,
    /// kube-scheduler with the gpu-admission extender and neutral score plugins: every
    /// feasible node gets the extender's 0–10 priority from
    /// `gm_core::placement::extender_priorities` (the code the extender runs: the policy's best
    /// node, ties in the policy's fixed order, alone at 10), then one of the nodes with the
    /// highest priority is drawn at random, as kube-scheduler's `selectHost` does.
    Extender,
    /// The same with a plain min–max normalisation to 0–10
    /// (`gm_core::placement::normalize_scores`, what the extender did before): every best node
    /// gets 10 and kube-scheduler draws among them at random.
    ExtenderMinMax,
}

impl std::str::FromStr for TieBreak {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "order" | "node-order" => Ok(TieBreak::NodeOrder),
            "random" => Ok(TieBreak::Random),
            "extender" => Ok(TieBreak::Extender),
            "extender-minmax" | "minmax" => Ok(TieBreak::ExtenderMinMax),
            _ => Err(format!(
                "unknown tie rule {s:?}: use order, random, extender or extender-minmax"
            )),
        }
    }
}

/// Options of a replay.
#[derive(Debug, Clone)]
pub struct SimOptions {
    /// How equally scored best nodes are told apart.
    pub ties: TieBreak,
    /// Tune the workload to this multiple of GPU capacity (the paper: 1.3).
    pub tune_ratio: f64,
    /// The target workload for FGD, `fgd+` and the fragmentation metric; `None` learns it from
    /// the pod list (before shuffling and cloning) with [`SimOptions::coverage`].
    pub workload: Option<TargetWorkload>,
    /// Share of pods the learned target workload covers (the paper: 0.95).
    pub coverage: f64,
    /// Settings of `fgd+` (the default is the published policy).
    pub plus: PlusConfig,
}

impl Default for SimOptions {
    fn default() -> Self {
        Self {
            ties: TieBreak::NodeOrder,
            tune_ratio: 1.3,
            workload: None,
            coverage: gm_core::fgd::PAPER_COVERAGE,
            plus: PlusConfig::default(),
        }
    }
}

/// The cluster state after one pod event.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Step {
    /// Index of the pod in the pod list.
    pub pod: u32,
    pub placed: bool,
    /// Index of the node in the node list it was placed on.
    pub node: Option<u32>,
    /// GPU requests of all pods submitted so far (placed or not), milli-GPU.
    pub arrived_milli: u64,
    /// GPU capacity allocated, milli-GPU.
    pub used_milli: u64,
    /// Cluster fragmentation with respect to the target workload, milli-GPU.
    pub frag_milli: f64,
}

/// The result of one seed.
#[derive(Debug, Clone)]
pub struct SeedRun {
    pub policy: SimPolicy,
    pub seed: u64,
    /// Total GPU capacity in milli-GPU.
    pub capacity_milli: u64,
    pub steps: Vec<Step>,
    /// Wall time of each pod decision (filter + score + choice), nanoseconds.
    pub decision_ns: Vec<u64>,
    /// Wall time of the whole replay (excluding reading the files).
    pub elapsed: Duration,
    /// Every node's state after the last pod, in node-list order.
    pub final_nodes: Vec<NodeAfter>,
}

/// A node's free resources after a replay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeAfter {
    pub cpu_free: u64,
    pub memory_free_mib: u64,
    /// Free vcuda-core per card.
    pub free: Vec<u32>,
}

impl SeedRun {
    pub fn failed(&self) -> usize {
        self.steps.iter().filter(|s| !s.placed).count()
    }
}

/// The arrival order: pods sorted by name, shuffled with `rng`, then tuned to `ratio` × GPU
/// capacity — random clones (uniform, with replacement, from the original list) appended while
/// the total stays within the target, or random pods removed while it is above. As in the
/// paper's simulator, the append loop stops at the first draw whose *per-card* milli-GPU would
/// overshoot. Returns indices into `pods` (a clone repeats an index).
pub fn arrival_order(
    pods: &[TracePod],
    capacity_milli: u64,
    ratio: f64,
    rng: &mut impl Rng,
) -> Vec<usize> {
    let mut order: Vec<usize> = (0..pods.len()).collect();
    order.sort_by(|&a, &b| pods[a].name.cmp(&pods[b].name));
    order.shuffle(rng);
    let target = ratio * capacity_milli as f64;
    let mut total: u64 = pods.iter().map(TracePod::gpu_milli).sum();
    if (total as f64) < target {
        loop {
            let i = rng.random_range(0..pods.len());
            if (total + pods[i].per_card_milli()) as f64 > target {
                break;
            }
            total += pods[i].gpu_milli();
            order.push(i);
        }
    } else {
        while total as f64 > target && !order.is_empty() {
            let k = rng.random_range(0..order.len());
            total -= pods[order.remove(k)].gpu_milli();
        }
    }
    order
}

/// The learned target workload of a pod list: every pod counts once, CPU-only pods included.
pub fn learn_workload(pods: &[TracePod], coverage: f64) -> Result<TargetWorkload, SimError> {
    TargetWorkload::select(pods.iter().map(|p| (p.task_type(), 1.0)), coverage)
        .map_err(|e| SimError::Workload(e.to_string()))
}

/// A pod prepared for fast filtering.
#[derive(Debug, Clone)]
struct SimPod {
    cpu: u64,
    mem: u64,
    demand: Demand,
    /// Node model ids the pod accepts (bit i = model i).
    models: u64,
    /// Class for GPU clustering (bit), 0 for CPU-only.
    class: u8,
    request: PodGpuRequest,
    gpu_milli: u64,
}

#[derive(Debug, Clone)]
struct SimNode {
    name: String,
    cpu_free: u64,
    mem_free: u64,
    free: Vec<u32>,
    /// Model id, or `u8::MAX` for a node without GPUs.
    model: u8,
    /// Index into the shared inventories / accesses.
    shape: usize,
    ledger: NodeLedger,
    frag: f64,
    /// Fragmentation under `fgd+`'s measure.
    frag_plus: f64,
    classes: u8,
}

struct Shape {
    inventory: NodeInventory,
    topology: Topology,
    access: NodeAccess,
    plus_access: NodeAccess,
    cap_access: CapAccess,
}

/// The replay engine for one trace; reusable across seeds and policies.
#[derive(Debug)]
pub struct Simulator<'a> {
    nodes: &'a [TraceNode],
    pods: &'a [TracePod],
    fgd: Fgd,
    plus: FgdPlus,
    models: Vec<String>,
    capacity_milli: u64,
    opts: SimOptions,
}

impl std::fmt::Debug for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shape").finish_non_exhaustive()
    }
}

impl<'a> Simulator<'a> {
    /// Check the inputs and learn (or take) the target workload.
    pub fn new(
        nodes: &'a [TraceNode],
        pods: &'a [TracePod],
        opts: SimOptions,
    ) -> Result<Self, SimError> {
        if !(opts.tune_ratio > 0.0 && opts.tune_ratio <= 10.0) {
            return Err(SimError::Ratio(opts.tune_ratio.to_string()));
        }
        if pods.is_empty() {
            return Err(SimError::NoPods);
        }
        let gpus: u64 = nodes.iter().map(|n| u64::from(n.gpus)).sum();
        if gpus == 0 {
            return Err(SimError::NoGpus);
        }
        let mut models: Vec<String> = nodes
            .iter()
            .filter(|n| n.gpus > 0)
            .map(|n| n.model.clone())
            .collect();
        models.sort();
        models.dedup();
        if models.len() > 64 {
            return Err(SimError::TooManyModels(models.len()));
        }
        let workload = match &opts.workload {
            Some(w) => w.clone(),
            None => learn_workload(pods, opts.coverage)?,
        };
        // fgd+'s capability covers every type of the pod list (or the configured workload).
        let everything = match &opts.workload {
            Some(w) => w.clone(),
            None => learn_workload(pods, 1.0)?,
        };
        let fgd = Fgd::new(workload);
        let plus = FgdPlus::with_config(fgd.clone(), opts.plus).with_capability(&everything);
        Ok(Self {
            nodes,
            pods,
            fgd,
            plus,
            models,
            capacity_milli: gpus * 1000,
            opts,
        })
    }

    /// The compiled target workload.
    pub fn fgd(&self) -> &Fgd {
        &self.fgd
    }

    /// Total GPU capacity, milli-GPU.
    pub fn capacity_milli(&self) -> u64 {
        self.capacity_milli
    }

    /// Replay the trace once with `policy` and `seed`.
    pub fn run(&self, policy: SimPolicy, seed: u64) -> SeedRun {
        let started = Instant::now();
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let order = arrival_order(
            self.pods,
            self.capacity_milli,
            self.opts.tune_ratio,
            &mut rng,
        );
        let sim_pods: Vec<SimPod> = self.pods.iter().map(|p| self.prepare(p)).collect();
        let (shapes, mut nodes) = self.build_nodes();
        let mut frag_total: f64 = nodes.iter().map(|n| n.frag).sum();
        let mut arrived = 0u64;
        let mut used = 0u64;
        let mut steps = Vec::with_capacity(order.len());
        let mut decision_ns = Vec::with_capacity(order.len());
        let mut ties: Vec<(usize, u64)> = Vec::with_capacity(nodes.len());
        let mut rank: Vec<u32> = (0..nodes.len() as u32).collect();
        rank.shuffle(&mut rng);
        // fgd+'s scarcity factors: nodes / nodes able to host each capability type.
        let cap_len = self.plus.capability().map_or(0, |c| c.len());
        let scarcity_mode = if policy == SimPolicy::FgdPlus {
            self.opts.plus.scarcity
        } else {
            Scarcity::None
        };
        let mut hosts: Vec<Vec<bool>> = Vec::new();
        let mut host_count = vec![0u32; cap_len];
        if let (Some(cap), false) = (self.plus.capability(), scarcity_mode == Scarcity::None) {
            for n in &nodes {
                let f: Vec<bool> = (0..cap_len)
                    .map(|i| cap.fits(i, &shapes[n.shape].cap_access, n.cpu_free, &n.free))
                    .collect();
                for (i, &b) in f.iter().enumerate() {
                    host_count[i] += u32::from(b);
                }
                hosts.push(f);
            }
        }
        let total_nodes = nodes.len() as f64;
        let scarcity_of = |count: &[u32]| -> Vec<f64> {
            count
                .iter()
                .map(|&h| total_nodes / f64::from(h.max(1)))
                .collect()
        };
        let mut scarcity: Vec<f64> = if scarcity_mode == Scarcity::None {
            Vec::new()
        } else {
            scarcity_of(&host_count)
        };
        for &pi in &order {
            let pod = &sim_pods[pi];
            let t0 = Instant::now();
            let choice = self.decide(
                policy,
                (&shapes, &rank, &scarcity),
                &nodes,
                pod,
                &mut ties,
                &mut rng,
            );
            decision_ns.push(t0.elapsed().as_nanos() as u64);
            arrived += pod.gpu_milli;
            if let Some((ni, cards)) = choice {
                let node = &mut nodes[ni];
                let shape = &shapes[node.shape];
                node.cpu_free -= pod.cpu;
                node.mem_free -= pod.mem;
                let per = pod.demand.per_card();
                let mut assignment_cards = Vec::new();
                for g in bits(cards) {
                    node.free[g as usize] -= per;
                    assignment_cards.push(g);
                }
                let a = match pod.demand {
                    Demand::CpuOnly => Assignment::default(),
                    Demand::Share { cores } => Assignment::share(assignment_cards[0], cores, 0),
                    Demand::Whole { .. } => Assignment::whole(&assignment_cards),
                };
                // The choice was checked against the same state, so this cannot fail; the
                // ledger only feeds the gm-core policies.
                let _ = node.ledger.allocate(&a);
                node.classes |= pod.class;
                let f = self
                    .fgd
                    .fragmentation(&shape.access, node.cpu_free, &node.free);
                frag_total += f - node.frag;
                node.frag = f;
                if policy == SimPolicy::FgdPlus {
                    node.frag_plus = self.plus.fgd().fragmentation(
                        &shape.plus_access,
                        node.cpu_free,
                        &node.free,
                    );
                    if let (Some(cap), Scarcity::Dynamic) = (self.plus.capability(), scarcity_mode)
                    {
                        for (t, was) in hosts[ni].iter_mut().enumerate() {
                            let now = cap.fits(t, &shape.cap_access, node.cpu_free, &node.free);
                            if now != *was {
                                host_count[t] = host_count[t] + u32::from(now) - u32::from(*was);
                                *was = now;
                            }
                        }
                        scarcity = scarcity_of(&host_count);
                    }
                }
                used += pod.gpu_milli;
            }
            steps.push(Step {
                pod: pi as u32,
                placed: choice.is_some(),
                node: choice.map(|(n, _)| n as u32),
                arrived_milli: arrived,
                used_milli: used,
                frag_milli: frag_total.max(0.0) * 10.0,
            });
        }
        SeedRun {
            policy,
            seed,
            capacity_milli: self.capacity_milli,
            steps,
            decision_ns,
            elapsed: started.elapsed(),
            final_nodes: nodes
                .into_iter()
                .map(|n| NodeAfter {
                    cpu_free: n.cpu_free,
                    memory_free_mib: n.mem_free,
                    free: n.free,
                })
                .collect(),
        }
    }

    fn prepare(&self, p: &TracePod) -> SimPod {
        let filter = ModelFilter::new(&p.models);
        let models = self
            .models
            .iter()
            .enumerate()
            .filter(|(_, m)| filter.matches(m))
            .fold(0u64, |acc, (i, _)| acc | 1 << i);
        let class = match p.demand {
            Demand::CpuOnly => 0,
            Demand::Share { .. } => 1,
            Demand::Whole { cards: 1 } => 2,
            Demand::Whole { cards: 2 } => 4,
            Demand::Whole { cards: 4 } => 8,
            Demand::Whole { cards: 8 } => 16,
            Demand::Whole { .. } => 32,
        };
        let request = match p.demand {
            Demand::CpuOnly => PodGpuRequest::default(),
            Demand::Share { cores } => {
                PodGpuRequest::from_app_requests([Some(GpuRequest::Share { cores, blocks: 0 })])
            }
            Demand::Whole { cards } => {
                PodGpuRequest::from_app_requests([Some(GpuRequest::Whole { cards })])
            }
        };
        SimPod {
            cpu: p.cpu_milli,
            mem: p.memory_mib,
            demand: p.demand,
            models,
            class,
            request,
            gpu_milli: p.gpu_milli(),
        }
    }

    fn build_nodes(&self) -> (Vec<Shape>, Vec<SimNode>) {
        let mut keys: Vec<(String, u32)> = Vec::new();
        let mut shapes: Vec<Shape> = Vec::new();
        let mut nodes = Vec::with_capacity(self.nodes.len());
        for n in self.nodes {
            let key = (n.model.clone(), n.gpus);
            let shape = match keys.iter().position(|k| *k == key) {
                Some(i) => i,
                None => {
                    let inventory =
                        NodeInventory::uniform(n.gpus as usize, &n.model, CARD_MIB, Link::Phb);
                    let topology = Topology::new(&inventory);
                    let access = self.fgd.access_uniform(&n.model, n.gpus as usize);
                    let plus_access = self.plus.fgd().access_uniform(&n.model, n.gpus as usize);
                    let cap_access = self
                        .plus
                        .cap_access(std::iter::repeat_n(n.model.as_str(), n.gpus as usize));
                    keys.push(key);
                    shapes.push(Shape {
                        inventory,
                        topology,
                        access,
                        plus_access,
                        cap_access,
                    });
                    shapes.len() - 1
                }
            };
            let free = vec![CORES_PER_CARD; n.gpus.min(MAX_CARDS as u32) as usize];
            let model = if n.gpus == 0 {
                u8::MAX
            } else {
                self.models.iter().position(|m| *m == n.model).unwrap_or(0) as u8
            };
            let frag = self
                .fgd
                .fragmentation(&shapes[shape].access, n.cpu_milli, &free);
            let frag_plus =
                self.plus
                    .fgd()
                    .fragmentation(&shapes[shape].plus_access, n.cpu_milli, &free);
            nodes.push(SimNode {
                name: n.name.clone(),
                cpu_free: n.cpu_milli,
                mem_free: n.memory_mib,
                ledger: NodeLedger::new(&shapes[shape].inventory),
                free,
                model,
                shape,
                frag,
                frag_plus,
                classes: 0,
            });
        }
        (shapes, nodes)
    }

    /// Filter, score and choose: the node index and the cards (bit mask), or `None`.
    fn decide(
        &self,
        policy: SimPolicy,
        (shapes, rank, scarcity): (&[Shape], &[u32], &[f64]),
        nodes: &[SimNode],
        pod: &SimPod,
        ties: &mut Vec<(usize, u64)>,
        rng: &mut ChaCha8Rng,
    ) -> Option<(usize, u64)> {
        ties.clear();
        if policy != SimPolicy::RandomFit
            && matches!(
                self.opts.ties,
                TieBreak::Extender | TieBreak::ExtenderMinMax
            )
        {
            return self.decide_as_scheduler(policy, (shapes, scarcity), nodes, pod, rng);
        }
        let mut best = i64::MIN;
        for (i, n) in nodes.iter().enumerate() {
            if !fits(n, pod) {
                continue;
            }
            let Some((score, cards)) = self.score(policy, (shapes, scarcity), n, pod) else {
                continue;
            };
            if score > best {
                best = score;
                ties.clear();
            }
            if score == best {
                ties.push((i, cards));
            }
        }
        if ties.is_empty() {
            return None;
        }
        // Random-fit draws its node at random whatever the tie rule (the paper's plugin gives
        // one random feasible node the top score).
        let random = policy == SimPolicy::RandomFit || self.opts.ties == TieBreak::Random;
        let (ni, mut cards) = if random {
            ties[rng.random_range(0..ties.len())]
        } else {
            *ties
                .iter()
                .min_by_key(|(i, _)| rank.get(*i).copied().unwrap_or(u32::MAX))
                .unwrap_or(&ties[0])
        };
        if policy == SimPolicy::RandomFit {
            cards = random_cards(&nodes[ni], pod, rng);
        }
        Some((ni, cards))
    }

    /// kube-scheduler + the extender: the extender's 0–10 priority for every feasible node, then
    /// a uniformly random node among those with the highest priority.
    fn decide_as_scheduler(
        &self,
        policy: SimPolicy,
        (shapes, scarcity): (&[Shape], &[f64]),
        nodes: &[SimNode],
        pod: &SimPod,
        rng: &mut ChaCha8Rng,
    ) -> Option<(usize, u64)> {
        let mut feasible: Vec<(usize, u64)> = Vec::new();
        let mut scores: Vec<i64> = Vec::new();
        for (i, n) in nodes.iter().enumerate() {
            if !fits(n, pod) {
                continue;
            }
            if let Some((score, cards)) = self.score(policy, (shapes, scarcity), n, pod) {
                feasible.push((i, cards));
                scores.push(score);
            }
        }
        if feasible.is_empty() {
            return None;
        }
        let priorities = if self.opts.ties == TieBreak::Extender {
            let names: Vec<&str> = feasible
                .iter()
                .map(|&(i, _)| nodes[i].name.as_str())
                .collect();
            extender_priorities(&scores, &names, policy.tie_order())
        } else {
            normalize_scores(&scores)
        };
        let top = priorities.iter().copied().max().unwrap_or(0);
        let best: Vec<usize> = (0..priorities.len())
            .filter(|&k| priorities[k] == top)
            .collect();
        let k = best[rng.random_range(0..best.len())];
        Some(feasible[k])
    }

    fn score(
        &self,
        policy: SimPolicy,
        (shapes, scarcity): (&[Shape], &[f64]),
        n: &SimNode,
        pod: &SimPod,
    ) -> Option<(i64, u64)> {
        Some(match policy {
            SimPolicy::RandomFit => (0, 0),
            SimPolicy::BestFit => {
                let cpu_left = (n.cpu_free - pod.cpu) as f64;
                let gpu_left = ((free_total(n) - pod.demand.total_cores()) * 10) as f64;
                let mut s = 0.0;
                s += cpu_left / MAX_SPEC_CPU * 0.5;
                s += gpu_left / MAX_SPEC_GPU_MILLI * 0.5;
                (((1.0 - s) * 100.0) as i64, tightest(n, pod))
            }
            SimPolicy::DotProduct => {
                let node = [
                    n.cpu_free as f64 / MAX_SPEC_CPU,
                    (free_total(n) * 10) as f64 / MAX_SPEC_GPU_MILLI,
                ];
                let want = [
                    pod.cpu as f64 / MAX_SPEC_CPU,
                    pod.gpu_milli as f64 / MAX_SPEC_GPU_MILLI,
                ];
                let dot = node[0] * want[0] + node[1] * want[1];
                (((1.0 - dot / 2.0) * 100.0) as i64, tightest(n, pod))
            }
            SimPolicy::GpuPacking => (packing_score(n, pod), tightest(n, pod)),
            SimPolicy::GpuClustering => (clustering_score(n, pod), tightest(n, pod)),
            SimPolicy::Fgd => {
                let access = &shapes[n.shape].access;
                let e = self.fgd.evaluate(
                    access,
                    n.cpu_free,
                    &n.free,
                    n.frag,
                    pod.cpu,
                    pod.demand,
                    u64::MAX,
                    CardPick::Paper,
                )?;
                (paper_score(e.delta), e.cards)
            }
            SimPolicy::FgdPlus => {
                let access = &shapes[n.shape].plus_access;
                let c = self.plus.score(
                    access,
                    &shapes[n.shape].cap_access,
                    scarcity,
                    n.cpu_free,
                    &n.free,
                    n.frag_plus,
                    pod.cpu,
                    pod.demand,
                    u64::MAX,
                )?;
                (c.key, c.cards)
            }
            SimPolicy::Core(p) => {
                let shape = &shapes[n.shape];
                let view = NodeView {
                    name: &n.name,
                    inventory: &shape.inventory,
                    topology: &shape.topology,
                    ledger: &n.ledger,
                };
                let placed = place(p, &view, &pod.request, &CardFilter::default()).ok()?;
                let cards = placed
                    .cards
                    .values()
                    .flatten()
                    .fold(0u64, |m, &c| m | 1u64 << c);
                (placed.score, cards)
            }
        })
    }
}

fn bits(mut m: u64) -> impl Iterator<Item = u32> {
    std::iter::from_fn(move || {
        if m == 0 {
            return None;
        }
        let b = m.trailing_zeros();
        m &= m - 1;
        Some(b)
    })
}

fn free_total(n: &SimNode) -> u64 {
    n.free.iter().map(|&x| u64::from(x)).sum()
}

/// CPU, memory, GPU model and GPU capacity.
fn fits(n: &SimNode, pod: &SimPod) -> bool {
    if n.cpu_free < pod.cpu || n.mem_free < pod.mem {
        return false;
    }
    match pod.demand {
        Demand::CpuOnly => true,
        Demand::Share { cores } => {
            n.model != u8::MAX
                && (pod.models >> n.model) & 1 == 1
                && n.free.iter().any(|&x| x >= cores)
        }
        Demand::Whole { cards } => {
            n.model != u8::MAX
                && (pod.models >> n.model) & 1 == 1
                && n.free.iter().filter(|&&x| x == CORES_PER_CARD).count() >= cards as usize
        }
    }
}

/// Tightest fit: a share goes to the fitting card with the least free capacity (lowest index on
/// ties); whole cards are the lowest-indexed free ones.
fn tightest(n: &SimNode, pod: &SimPod) -> u64 {
    match pod.demand {
        Demand::CpuOnly => 0,
        Demand::Share { cores } => n
            .free
            .iter()
            .enumerate()
            .filter(|(_, &x)| x >= cores)
            .min_by_key(|(i, &x)| (x, *i))
            .map(|(i, _)| 1u64 << i)
            .unwrap_or(0),
        Demand::Whole { cards } => lowest_free(n, cards),
    }
}

fn lowest_free(n: &SimNode, cards: u32) -> u64 {
    n.free
        .iter()
        .enumerate()
        .filter(|(_, &x)| x == CORES_PER_CARD)
        .take(cards as usize)
        .fold(0u64, |m, (i, _)| m | 1 << i)
}

/// Random-fit's card: a uniformly random fitting card for a share.
fn random_cards(n: &SimNode, pod: &SimPod, rng: &mut ChaCha8Rng) -> u64 {
    match pod.demand {
        Demand::CpuOnly => 0,
        Demand::Share { cores } => {
            let fitting: Vec<usize> = (0..n.free.len()).filter(|&i| n.free[i] >= cores).collect();
            if fitting.is_empty() {
                0
            } else {
                1u64 << fitting[rng.random_range(0..fitting.len())]
            }
        }
        Demand::Whole { cards } => lowest_free(n, cards),
    }
}

/// GPU Packing (fgd.md §2.5): 100 − (free share of the used partial cards)/10, floor 50, when
/// the pod fits on partly used cards; 50 − (free cards it needs), floor 33, on a partly used
/// node; 33 − (cards) on an idle node; 0 for CPU-only pods.
fn packing_score(n: &SimNode, pod: &SimPod) -> i64 {
    if pod.demand == Demand::CpuOnly {
        return 0;
    }
    let full = n.free.iter().filter(|&&x| x == CORES_PER_CARD).count() as i64;
    if full == n.free.len() as i64 {
        return (33 - full).max(full);
    }
    let mut order: Vec<usize> = (0..n.free.len()).collect();
    order.sort_by_key(|&i| n.free[i]);
    let per = pod.demand.per_card();
    let mut need = pod.demand.cards();
    let mut full_used = 0i64;
    let mut ratio = 0i64;
    for i in order {
        if need == 0 {
            break;
        }
        let x = n.free[i];
        if per <= x {
            need -= 1;
            ratio += i64::from(x);
            if x == CORES_PER_CARD {
                full_used += 1;
            }
        }
    }
    if full_used > 0 {
        (50 - full_used).max(33)
    } else {
        (100 - ratio / 10).max(50)
    }
}

/// GPU Clustering (fgd.md §2.5): tiers by the classes of GPU pods already on the node, plus
/// `25·(8000 − free milli)/8000`; 0 for CPU-only pods.
fn clustering_score(n: &SimNode, pod: &SimPod) -> i64 {
    if pod.class == 0 {
        return 0;
    }
    let free_milli = (free_total(n) * 10) as i64;
    let fill = 25 * (8000 - free_milli) / 8000;
    if n.classes & pod.class != 0 {
        if n.classes == pod.class {
            fill + 75
        } else {
            fill + 50
        }
    } else if n.classes == 0 {
        fill + 25
    } else {
        fill
    }
}
