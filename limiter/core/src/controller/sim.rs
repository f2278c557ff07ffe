//! A virtual-time plant and driver for the controller: no threads, no sleeping.
//!
//! * **Card.** `sms` SMs with `threads_per_sm` threads. Kernels run one at a time, FIFO across
//!   tenants (time-slicing): a launch at `t` starts at `max(t, device_free_at, stream_tail)` and
//!   runs `waves × per_block_ns`. A graph launch enqueues its kernels back to back.
//! * **Tenants.** Each is one process of its own container, with its own limiter (cost table,
//!   bucket word, [`Feedback`], [`SoftTarget`]), a workload ([`Workload`]), an optional on/off
//!   duty cycle, and start/stop times. A launch costs `host_launch_ns` of host time; bucket
//!   sleeps are exact.
//! * **Event timing.** A measured launch reports `end − max(t, stream_tail)`: from the moment the
//!   "before" event completed on its stream to the kernel's end, so it *includes* waiting behind
//!   other tenants' kernels. It becomes visible to the cost model at the tenant's first launch
//!   after the kernel ended.
//! * **NVML.** A per-process sampling grid of `nvml_period_ns` (1/6 s): `smUtil` = 100 × busy
//!   overlap / period, rounded, plus uniform noise of ±`nvml_noise_pct` from a seeded hash,
//!   clamped to [0, 100], visible `nvml_delay_periods` after the period ends. Each tenant's
//!   sampler ticks every `tick_ns`, with a per-tenant phase.
//! * **Truth.** Every kernel interval is accumulated into 10 ms bins per tenant;
//!   [`SimResult::window_shares`] gives the true busy share over any window grid.

use std::collections::VecDeque;

use super::{
    admit, burst_for, effective_rate_ppm, unthrottled, would_wait, CostEstimate, Feedback,
    FeedbackConfig, FeedbackInput, LaunchShape, MeasurePolicy, SoftConfig, SoftTarget,
    DEFAULT_BURST_NS,
};

/// Width of the truth bins.
pub const BIN_NS: u64 = 10_000_000;
/// One millisecond.
pub const MS: u64 = 1_000_000;
/// One second.
pub const SEC: u64 = 1_000_000_000;

/// SplitMix64: the simulation's only randomness, seeded.
#[derive(Clone, Copy, Debug)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix(self.0)
    }

    /// Uniform in `[0, 1)`.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The simulated card.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Card {
    /// Multiprocessors.
    pub sms: u32,
    /// Max resident threads per SM.
    pub threads_per_sm: u32,
}

impl Card {
    /// A card with `sms` SMs and 2048 threads per SM.
    #[must_use]
    pub fn new(sms: u32) -> Self {
        Self {
            sms,
            threads_per_sm: 2048,
        }
    }
}

/// One kernel function's launch: its shape and its true time per wave.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Kernel {
    /// Blocks in the grid.
    pub grid_blocks: u64,
    /// Threads per block.
    pub block_threads: u32,
    /// True GPU time of one block (one wave).
    pub per_block_ns: u64,
}

impl Kernel {
    /// A kernel of this shape that lasts about `duration_ns` on `card`.
    #[must_use]
    pub fn lasting(card: Card, grid_blocks: u64, block_threads: u32, duration_ns: u64) -> Self {
        let mut k = Self {
            grid_blocks,
            block_threads,
            per_block_ns: 1,
        };
        k.per_block_ns = (duration_ns / k.shape(card).waves()).max(1);
        k
    }

    /// The launch shape on `card`.
    #[must_use]
    pub fn shape(&self, card: Card) -> LaunchShape {
        LaunchShape {
            grid_blocks: self.grid_blocks,
            block_threads: self.block_threads,
            sms: card.sms,
            threads_per_sm: card.threads_per_sm,
        }
    }

    /// True duration on `card`.
    #[must_use]
    pub fn duration_ns(&self, card: Card) -> u64 {
        self.shape(card).waves().saturating_mul(self.per_block_ns)
    }
}

/// One launch unit: a kernel, or a graph (its kernels in order, charged as one).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Job {
    /// Kernels run back to back on the tenant's stream.
    pub kernels: Vec<Kernel>,
}

impl Job {
    /// A single kernel.
    #[must_use]
    pub fn kernel(k: Kernel) -> Self {
        Self { kernels: vec![k] }
    }

    /// True duration on `card`.
    #[must_use]
    pub fn duration_ns(&self, card: Card) -> u64 {
        self.kernels.iter().map(|k| k.duration_ns(card)).sum()
    }

    /// The cold-start estimate the FFI would use: the kernel's prior, or for a graph the sum of
    /// its nodes' priors.
    #[must_use]
    pub fn prior(&self, card: Card) -> CostEstimate {
        match self.kernels.as_slice() {
            [k] => CostEstimate::prior(&k.shape(card)),
            ks => CostEstimate::with_total(
                ks.iter()
                    .map(|k| CostEstimate::prior(&k.shape(card)).estimate_ns())
                    .sum(),
            ),
        }
    }
}

/// How a tenant's host thread drives its jobs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Workload {
    /// Asynchronous launches, at most `depth` jobs in flight (the host waits for the oldest when
    /// full); jobs picked round-robin (`random == false`) or uniformly at random.
    Stream {
        /// The launch units.
        jobs: Vec<Job>,
        /// In-flight bound.
        depth: usize,
        /// Random pick instead of round-robin.
        random: bool,
    },
    /// Launch one job, synchronize, think `think_ns`, repeat.
    Sync {
        /// The launch unit.
        job: Job,
        /// Host time between iterations.
        think_ns: u64,
    },
}

impl Workload {
    /// Many small kernels (4096 blocks of 256 threads, ~200 µs), 8 in flight.
    #[must_use]
    pub fn small_kernels(card: Card) -> Self {
        Self::Stream {
            jobs: vec![Job::kernel(Kernel::lasting(card, 4096, 256, 200_000))],
            depth: 8,
            random: false,
        }
    }

    /// One large kernel (65536 × 256, ~200 ms) + synchronize per iteration: the shape that
    /// bypasses grid-count buckets.
    #[must_use]
    pub fn large_sync(card: Card) -> Self {
        Self::Sync {
            job: Job::kernel(Kernel::lasting(card, 65_536, 256, 200 * MS)),
            think_ns: 100_000,
        }
    }

    /// CUDA graphs: one launch = 10 kernels of mixed sizes (~3.5 ms in all), 4 graphs in
    /// flight.
    #[must_use]
    pub fn graphs(card: Card) -> Self {
        let us = [100u64, 300, 500, 200, 800, 150, 400, 250, 600, 200];
        let grids = [
            1024u64, 4096, 8192, 2048, 16384, 512, 4096, 2048, 8192, 1024,
        ];
        let kernels = us
            .iter()
            .zip(grids.iter())
            .map(|(&u, &g)| Kernel::lasting(card, g, 256, u * 1000))
            .collect();
        Self::Stream {
            jobs: vec![Job { kernels }],
            depth: 4,
            random: false,
        }
    }

    /// Mixed kernel functions (30 µs, 150 µs, 700 µs, 3 ms), picked at random, 8 in flight.
    #[must_use]
    pub fn mixed(card: Card) -> Self {
        let jobs = [
            (256u64, 30_000u64),
            (2048, 150_000),
            (8192, 700_000),
            (32768, 3 * MS),
        ]
        .iter()
        .map(|&(g, d)| Job::kernel(Kernel::lasting(card, g, 128, d)))
        .collect();
        Self::Stream {
            jobs,
            depth: 8,
            random: true,
        }
    }

    /// The longest launch unit, which sets the granularity of any share measurement.
    #[must_use]
    pub fn max_job_ns(&self, card: Card) -> u64 {
        match self {
            Self::Stream { jobs, .. } => {
                jobs.iter().map(|j| j.duration_ns(card)).max().unwrap_or(0)
            }
            Self::Sync { job, .. } => job.duration_ns(card),
        }
    }
}

/// One tenant (a container with one process).
#[derive(Clone, Debug, PartialEq)]
pub struct TenantSpec {
    /// `vcuda-core` share, percent.
    pub share_pct: u32,
    /// Soft-mode ceiling (`vcuda-core-limit`); `None` is hard mode.
    pub limit_pct: Option<u32>,
    /// What it runs.
    pub workload: Workload,
    /// `(on_ns, off_ns)`: bursty demand, starting with an on-phase at `start_ns`.
    pub duty: Option<(u64, u64)>,
    /// When the process starts.
    pub start_ns: u64,
    /// When it stops launching (`u64::MAX`: never).
    pub stop_ns: u64,
}

impl TenantSpec {
    /// A hard-mode tenant running from 0 to the end.
    #[must_use]
    pub fn hard(share_pct: u32, workload: Workload) -> Self {
        Self {
            share_pct,
            limit_pct: None,
            workload,
            duty: None,
            start_ns: 0,
            stop_ns: u64::MAX,
        }
    }

    /// Whether the tenant wants the GPU at `t` (started, not stopped, in an on-phase).
    #[must_use]
    pub fn demands_at(&self, t: u64) -> bool {
        if t < self.start_ns || t >= self.stop_ns {
            return false;
        }
        match self.duty {
            Some((on, off)) if on.saturating_add(off) > 0 => (t - self.start_ns) % (on + off) < on,
            _ => true,
        }
    }
}

/// The whole simulation's parameters.
#[derive(Clone, Debug, PartialEq)]
pub struct SimConfig {
    /// The card.
    pub card: Card,
    /// The tenants.
    pub tenants: Vec<TenantSpec>,
    /// Virtual time simulated.
    pub duration_ns: u64,
    /// Seed of noise and random picks.
    pub seed: u64,
    /// NVML sampling period.
    pub nvml_period_ns: u64,
    /// Periods between a sample's end and its visibility.
    pub nvml_delay_periods: u64,
    /// Uniform noise amplitude of each sample, points.
    pub nvml_noise_pct: f64,
    /// Whether NVML sees the tenants at all (false: open loop).
    pub nvml_available: bool,
    /// Sampler tick.
    pub tick_ns: u64,
    /// Host time of one launch call.
    pub host_launch_ns: u64,
    /// Bucket depth, GPU-ns: each launch uses `max(burst_ns, burst_for(cost))`.
    pub burst_ns: u64,
    /// Outer loop tuning.
    pub feedback: FeedbackConfig,
    /// Soft-mode tuning.
    pub soft: SoftConfig,
    /// Which launches are timed.
    pub measure: MeasurePolicy,
}

impl SimConfig {
    /// Defaults: NVML period 1/6 s visible one period late with ±2 points of noise, 100 ms
    /// ticks, 3 µs per launch, default burst, loop and policy.
    #[must_use]
    pub fn new(card: Card, tenants: Vec<TenantSpec>, duration_ns: u64) -> Self {
        Self {
            card,
            tenants,
            duration_ns,
            seed: 0x5EED,
            nvml_period_ns: SEC / 6,
            nvml_delay_periods: 1,
            nvml_noise_pct: 2.0,
            nvml_available: true,
            tick_ns: 100 * MS,
            host_launch_ns: 3_000,
            burst_ns: DEFAULT_BURST_NS,
            feedback: FeedbackConfig::default(),
            soft: SoftConfig::default(),
            measure: MeasurePolicy::default(),
        }
    }
}

/// One sampler tick of one tenant, for inspection.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TickTrace {
    /// Tick time.
    pub t_ns: u64,
    /// The target in force after the tick.
    pub target_pct: f64,
    /// The multiplier after the tick.
    pub multiplier: f64,
    /// The fresh own sample used (NaN: none).
    pub own_pct: f64,
}

/// What a run produced.
#[derive(Clone, Debug, PartialEq)]
pub struct SimResult {
    /// Virtual time simulated.
    pub duration_ns: u64,
    /// Per tenant, true busy ns per [`BIN_NS`] bin.
    pub busy: Vec<Vec<u64>>,
    /// Per tenant, every sampler tick.
    pub ticks: Vec<Vec<TickTrace>>,
    /// Per tenant, launches made.
    pub launches: Vec<u64>,
    /// Per tenant, launches timed with events.
    pub measured: Vec<u64>,
}

/// Error statistics of a tenant's windowed share against its target.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Accuracy {
    /// Windows evaluated.
    pub windows: usize,
    /// Mean absolute error, points.
    pub mae: f64,
    /// 95th percentile absolute error, points.
    pub p95: f64,
    /// Largest absolute error, points.
    pub max: f64,
    /// Mean share, percent.
    pub mean: f64,
    /// Smallest `share / target` over the windows (starvation check).
    pub min_ratio: f64,
}

impl SimResult {
    /// True busy share (percent) of `tenant` over consecutive windows of `window_ns` covering
    /// `[from_ns, to_ns)`, as `(window_start, share)`; `window_ns` is rounded to whole bins.
    #[must_use]
    pub fn window_shares(
        &self,
        tenant: usize,
        window_ns: u64,
        from_ns: u64,
        to_ns: u64,
    ) -> Vec<(u64, f64)> {
        let Some(bins) = self.busy.get(tenant) else {
            return Vec::new();
        };
        let per = (window_ns / BIN_NS).max(1) as usize;
        let first = (from_ns / BIN_NS) as usize;
        let last = (to_ns.min(self.duration_ns) / BIN_NS) as usize;
        let mut out = Vec::new();
        let mut b = first;
        while b + per <= last {
            let busy: u64 = bins.get(b..b + per).map_or(0, |s| s.iter().sum());
            out.push((
                b as u64 * BIN_NS,
                100.0 * busy as f64 / (per as u64 * BIN_NS) as f64,
            ));
            b += per;
        }
        out
    }

    /// Accuracy of `tenant` over windows of `window_ns` in `[from_ns, to_ns)`, against
    /// `target(window_start)` (`None` skips the window, e.g. an off-phase).
    pub fn accuracy(
        &self,
        tenant: usize,
        window_ns: u64,
        from_ns: u64,
        to_ns: u64,
        target: impl Fn(u64) -> Option<f64>,
    ) -> Accuracy {
        let mut errs = Vec::new();
        let mut sum = 0.0;
        let mut min_ratio = f64::INFINITY;
        for (start, share) in self.window_shares(tenant, window_ns, from_ns, to_ns) {
            if let Some(t) = target(start) {
                errs.push((share - t).abs());
                sum += share;
                if t > 0.0 {
                    min_ratio = min_ratio.min(share / t);
                }
            }
        }
        errs.sort_by(f64::total_cmp);
        let n = errs.len();
        let nf = n.max(1) as f64;
        Accuracy {
            windows: n,
            mae: errs.iter().sum::<f64>() / nf,
            p95: percentile(&errs, 0.95),
            max: errs.last().copied().unwrap_or(0.0),
            mean: sum / nf,
            min_ratio,
        }
    }

    /// Settling time: the start (relative to `from_ns`) of the first window after which every
    /// window of `window_ns` up to `to_ns` is within `band_pct` of its target. `None`: never.
    pub fn settle_ns(
        &self,
        tenant: usize,
        window_ns: u64,
        band_pct: f64,
        from_ns: u64,
        to_ns: u64,
        target: impl Fn(u64) -> Option<f64>,
    ) -> Option<u64> {
        let shares = self.window_shares(tenant, window_ns, from_ns, to_ns);
        let mut settled = Some(from_ns);
        for (start, share) in &shares {
            if let Some(t) = target(*start) {
                if (share - t).abs() > band_pct {
                    settled = None;
                } else if settled.is_none() {
                    settled = Some(*start);
                }
            }
        }
        settled.map(|s| s - from_ns)
    }
}

/// The `q` quantile of sorted values (nearest rank).
#[must_use]
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted
        .get(rank.saturating_sub(1).min(sorted.len() - 1))
        .copied()
        .unwrap_or(0.0)
}

fn add_interval(bins: &mut [u64], width: u64, s: u64, e: u64) {
    if e <= s || width == 0 {
        return;
    }
    let mut b = s / width;
    let last = (e - 1) / width;
    while b <= last {
        let lo = s.max(b * width);
        let hi = e.min((b + 1) * width);
        match bins.get_mut(b as usize) {
            Some(slot) => *slot += hi - lo,
            None => return,
        }
        b += 1;
    }
}

#[derive(Clone, Copy, Debug)]
enum Phase {
    Admit,
    Launch(usize),
}

#[derive(Debug)]
struct Tenant {
    spec: TenantSpec,
    costs: Vec<CostEstimate>,
    counters: Vec<u64>,
    durations: Vec<Vec<u64>>,
    bucket: u64,
    feedback: Feedback,
    soft: SoftTarget,
    target_pct: f64,
    multiplier_ppm: u32,
    stream_tail: u64,
    inflight: VecDeque<u64>,
    pending: VecDeque<(u64, usize, u64)>,
    next_at: u64,
    phase: Phase,
    throttled: bool,
    job_ns: u64,
    last_launch: Option<u64>,
    rr: usize,
    rng: SplitMix64,
    next_tick: u64,
    last_k: Option<u64>,
    busy_fine: Vec<u64>,
    busy_nvml: Vec<u64>,
    ticks: Vec<TickTrace>,
    launches: u64,
    measured: u64,
}

impl Tenant {
    fn jobs(&self) -> &[Job] {
        match &self.spec.workload {
            Workload::Stream { jobs, .. } => jobs,
            Workload::Sync { job, .. } => std::slice::from_ref(job),
        }
    }
}

fn nvml_util(cfg: &SimConfig, tenants: &[Tenant], j: usize, k: u64) -> Option<f64> {
    let t = tenants.get(j)?;
    let p = cfg.nvml_period_ns.max(1);
    let (ps, pe) = (k * p, (k + 1) * p);
    // NVML reports a process while it exists.
    if t.spec.start_ns >= pe || t.spec.stop_ns <= ps {
        return None;
    }
    let busy = t.busy_nvml.get(k as usize).copied().unwrap_or(0);
    let noise = (2.0 * SplitMix64(mix(cfg.seed ^ ((j as u64) << 48) ^ k)).next_f64() - 1.0)
        * cfg.nvml_noise_pct;
    Some(
        (100.0 * busy as f64 / p as f64 + noise)
            .round()
            .clamp(0.0, 100.0),
    )
}

/// Runs the simulation.
#[must_use]
pub fn run(cfg: &SimConfig) -> SimResult {
    let card = cfg.card;
    let period = cfg.nvml_period_ns.max(1);
    let fine_len = (cfg.duration_ns / BIN_NS + 2) as usize;
    let nvml_len = (cfg.duration_ns / period + 2) as usize;
    let mut tenants: Vec<Tenant> = cfg
        .tenants
        .iter()
        .enumerate()
        .map(|(i, spec)| {
            let jobs: Vec<Job> = match &spec.workload {
                Workload::Stream { jobs, .. } => jobs.clone(),
                Workload::Sync { job, .. } => vec![job.clone()],
            };
            let share = f64::from(spec.share_pct);
            let soft = match spec.limit_pct {
                Some(l) => SoftTarget::new(share, f64::from(l), cfg.soft),
                None => SoftTarget::hard(share),
            };
            Tenant {
                costs: jobs.iter().map(|j| j.prior(card)).collect(),
                counters: vec![0; jobs.len()],
                durations: jobs
                    .iter()
                    .map(|j| j.kernels.iter().map(|k| k.duration_ns(card)).collect())
                    .collect(),
                spec: spec.clone(),
                bucket: 0,
                feedback: Feedback::new(cfg.feedback),
                target_pct: soft.target_pct(),
                soft,
                multiplier_ppm: 1_000_000,
                stream_tail: 0,
                inflight: VecDeque::new(),
                pending: VecDeque::new(),
                next_at: spec.start_ns,
                phase: Phase::Admit,
                throttled: false,
                job_ns: 0,
                last_launch: None,
                rr: 0,
                rng: SplitMix64(mix(cfg.seed.wrapping_add(i as u64 + 1))),
                next_tick: spec.start_ns + (i as u64 * 17 * MS) % cfg.tick_ns.max(1),
                last_k: None,
                busy_fine: vec![0; fine_len],
                busy_nvml: vec![0; nvml_len],
                ticks: Vec::new(),
                launches: 0,
                measured: 0,
            }
        })
        .collect();
    let mut device_free = 0u64;
    let end = cfg.duration_ns;

    loop {
        // The earliest pending event (host step or sampler tick) over all tenants.
        let mut best: Option<(u64, usize, bool)> = None;
        for (i, t) in tenants.iter().enumerate() {
            for (at, tick) in [(t.next_at, false), (t.next_tick, true)] {
                if best.is_none_or(|(b, _, _)| at < b) {
                    best = Some((at, i, tick));
                }
            }
        }
        let Some((now, i, is_tick)) = best else { break };
        if now >= end {
            break;
        }
        if is_tick {
            sampler_tick(cfg, &mut tenants, i, now);
        } else {
            host_step(cfg, &mut tenants, i, now, &mut device_free);
        }
    }

    SimResult {
        duration_ns: end,
        busy: tenants.iter().map(|t| t.busy_fine.clone()).collect(),
        ticks: tenants
            .iter_mut()
            .map(|t| std::mem::take(&mut t.ticks))
            .collect(),
        launches: tenants.iter().map(|t| t.launches).collect(),
        measured: tenants.iter().map(|t| t.measured).collect(),
    }
}

fn sampler_tick(cfg: &SimConfig, tenants: &mut [Tenant], i: usize, now: u64) {
    let period = cfg.nvml_period_ns.max(1);
    let visible = (now / period).checked_sub(1 + cfg.nvml_delay_periods);
    let fresh = match (visible, tenants.get(i).and_then(|t| t.last_k)) {
        (Some(k), Some(last)) if k <= last => None,
        (Some(k), _) => Some(k),
        (None, _) => None,
    };
    let sample = if cfg.nvml_available {
        fresh.and_then(|k| {
            let own = nvml_util(cfg, tenants, i, k)?;
            let total: f64 = (0..tenants.len())
                .filter_map(|j| nvml_util(cfg, tenants, j, k))
                .sum();
            Some((k, own, total))
        })
    } else {
        None
    };
    let Some(t) = tenants.get_mut(i) else { return };
    if let Some(k) = fresh {
        t.last_k = Some(k);
    }
    let own = match sample {
        Some((_, own, total)) => {
            t.target_pct = t.soft.step(own, total);
            own
        }
        None => f64::NAN,
    };
    let rate = effective_rate_ppm(t.target_pct, t.multiplier_ppm);
    let biggest = t
        .costs
        .iter()
        .map(CostEstimate::estimate_ns)
        .max()
        .unwrap_or(0);
    let burst = burst_for(biggest).max(cfg.burst_ns);
    let binding = t.throttled || would_wait(t.bucket, now, rate, burst);
    t.multiplier_ppm = t.feedback.step(FeedbackInput {
        target_pct: t.target_pct,
        own_pct: own,
        sample_id: sample.map(|(k, _, _)| k),
        throttled: binding,
        job_ns: t.job_ns,
    });
    t.throttled = false;
    t.job_ns = 0;
    t.ticks.push(TickTrace {
        t_ns: now,
        target_pct: t.target_pct,
        multiplier: t.feedback.multiplier(),
        own_pct: own,
    });
    t.next_tick = now.saturating_add(cfg.tick_ns.max(1));
}

fn host_step(cfg: &SimConfig, tenants: &mut [Tenant], i: usize, now: u64, device_free: &mut u64) {
    let period = cfg.nvml_period_ns.max(1);
    let Some(t) = tenants.get_mut(i) else { return };
    if now >= t.spec.stop_ns {
        t.next_at = u64::MAX;
        return;
    }
    // Off-phase of a bursty tenant: sleep until the next on-phase (a launch already admitted
    // still goes).
    if matches!(t.phase, Phase::Admit) && !t.spec.demands_at(now) {
        if let Some((on, off)) = t.spec.duty {
            let cycle = (on + off).max(1);
            let since = now - t.spec.start_ns;
            t.next_at = t.spec.start_ns + (since / cycle + 1) * cycle;
        } else {
            t.next_at = u64::MAX;
        }
        return;
    }
    match t.phase {
        Phase::Admit => {
            while t.inflight.front().is_some_and(|&e| e <= now) {
                t.inflight.pop_front();
            }
            while let Some(&(avail, job, m)) = t.pending.front() {
                if avail > now {
                    break;
                }
                if let Some(c) = t.costs.get_mut(job) {
                    c.observe(m);
                }
                t.pending.pop_front();
            }
            let (depth, random) = match &t.spec.workload {
                Workload::Stream { depth, random, .. } => (*depth, *random),
                Workload::Sync { .. } => (1, false),
            };
            if t.inflight.len() >= depth.max(1) {
                t.next_at = t.inflight.front().copied().unwrap_or(now).max(now);
                return;
            }
            let n = t.jobs().len().max(1);
            let job = if random {
                (t.rng.next_u64() % n as u64) as usize
            } else {
                t.rr = (t.rr + 1) % n;
                t.rr
            };
            let wait = if unthrottled(t.spec.share_pct) {
                0
            } else {
                let cost = t.costs.get(job).map_or(0, CostEstimate::estimate_ns);
                t.job_ns = t.job_ns.max(cost);
                let rate = effective_rate_ppm(t.target_pct, t.multiplier_ppm);
                let burst = burst_for(cost).max(cfg.burst_ns);
                let a = admit(t.bucket, now, cost, rate, burst);
                t.bucket = a.new_state;
                a.wait_ns
            };
            if wait > 0 {
                t.throttled = true;
                t.phase = Phase::Launch(job);
                t.next_at = now.saturating_add(wait);
                return;
            }
            launch(cfg, t, job, now, device_free, period);
        }
        Phase::Launch(job) => launch(cfg, t, job, now, device_free, period),
    }
}

fn launch(
    cfg: &SimConfig,
    t: &mut Tenant,
    job: usize,
    now: u64,
    device_free: &mut u64,
    period: u64,
) {
    let before = now.max(t.stream_tail);
    let mut s = now.max(*device_free).max(t.stream_tail);
    let durations = t.durations.get(job).cloned().unwrap_or_default();
    for d in durations {
        let e = s + d;
        add_interval(&mut t.busy_fine, BIN_NS, s, e);
        add_interval(&mut t.busy_nvml, period, s, e);
        s = e;
    }
    let end = s;
    *device_free = end;
    t.stream_tail = end;
    let counter = t.counters.get(job).copied().unwrap_or(0);
    let gap = t.last_launch.map_or(u64::MAX, |l| now.saturating_sub(l));
    let samples = t.costs.get(job).map_or(0, CostEstimate::samples);
    if cfg.measure.should_measure(counter, gap, samples) {
        t.pending.push_back((end, job, end - before));
        t.measured += 1;
    }
    if let Some(c) = t.counters.get_mut(job) {
        *c += 1;
    }
    t.last_launch = Some(now);
    t.launches += 1;
    t.phase = Phase::Admit;
    match &t.spec.workload {
        Workload::Sync { think_ns, .. } => {
            t.next_at = end + cfg.host_launch_ns + think_ns;
        }
        Workload::Stream { .. } => {
            t.inflight.push_back(end);
            t.next_at = now + cfg.host_launch_ns;
        }
    }
}
