//! The outer NVML loop: a log-domain integral controller on the bucket's rate multiplier.
//!
//! Every sampler tick (~100 ms) the FFI passes the container's own NVML `smUtil` sum (percent of
//! the card, NaN when unknown or when no fresh sample arrived), whether the bucket was binding
//! during the tick, and the largest launch cost charged in the tick. On each *fresh* sample the
//! multiplier `m` moves by
//!
//! `Δ ln m = clamp(gain · 6/(N+5) · e, ±max_step)`, with `e = ln(target / own)` for raw samples
//! (`N = 1`) and `e = (target − mean_N(own)) / target` for window means (`N > 1`)
//!
//! outside a deadband of `deadband_pct` points, where `mean_N` is the mean of the last `N` fresh
//! samples. Everything is in utilisation units: the gain does not depend on the SM count, the
//! pool size or the kernel sizes (the peers' step grows with SM², §3.5 #3). Working in `ln m`
//! makes the loop's relative speed the same at 5 % and at 90 % and keeps `m` positive.
//!
//! * **Lag.** NVML samples cover ~1/6 s and are visible about one period late, so a change made
//!   now shows in the sample after next: two samples of dead time. A pure integrator with `d`
//!   samples of dead time is stable for `gain < 2 sin(π / (2(2d+1)))` (0.62 for d = 2); the
//!   default 0.3 is well damped, and the per-step clamp bounds the overshoot of large errors.
//! * **Lumpy demand.** A container running one 200 ms kernel at 5 % is busy 0 % or 100 % in
//!   every NVML period, so single samples say nothing about its average; acting on them (in any
//!   non-linear domain, or with a clamp) is biased and winds the multiplier to a clamp (seen in
//!   the simulation with a log-domain error: ×20 at 5 %). So the
//!   loop acts on the mean of the last `N` samples, where `N` covers four *demand periods*
//!   (`job / target`, with `job` a decaying maximum of the charged launch costs), at most
//!   [`WINDOW`] samples, and scales its gain by `6 / (N + 5)` for the extra averaging delay.
//!   For kernels and graphs of a few ms, `N = 1`: raw samples, full speed.
//! * **Anti-windup.** `m` may only rise when the bucket was binding in each of the last
//!   `windup_ticks` ticks (which spans the sample's age): a container whose demand is below its
//!   target, or whose latest sample still shows an idle phase, never winds the rate up. Falling
//!   is always allowed.
//! * **Open loop.** When `own` is unknown (NVML unavailable, host PIDs not identified, no fresh
//!   sample) `m` holds: the bucket runs open loop on the cost model.

/// Most samples averaged (64 × 1/6 s ≈ 10.7 s).
pub const WINDOW: usize = 64;

/// Tuning of [`Feedback`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FeedbackConfig {
    /// Fraction of the error `e` (see the module doc) applied to `ln m` per fresh sample (for
    /// `N = 1`).
    pub gain: f64,
    /// Largest `|Δ ln m|` per fresh sample.
    pub max_step: f64,
    /// No correction while `|target − own|` is within this many points (raw samples, `N = 1`).
    pub deadband_pct: f64,
    /// Lower clamp of `m`.
    pub min_multiplier: f64,
    /// Upper clamp of `m`.
    pub max_multiplier: f64,
    /// Ticks that must all have been binding before `m` may rise (1..=64).
    pub windup_ticks: u32,
    /// The NVML sampling period, to size the averaging window (1/6 s).
    pub sample_period_ns: u64,
    /// Demand periods covered by the averaging window.
    pub demand_periods: f64,
    /// Per-tick decay of the remembered largest launch cost.
    pub job_decay: f64,
}

impl Default for FeedbackConfig {
    fn default() -> Self {
        Self {
            gain: 0.3,
            max_step: 0.35,
            deadband_pct: 0.5,
            min_multiplier: 0.05,
            max_multiplier: 20.0,
            windup_ticks: 5,
            sample_period_ns: 166_666_667,
            demand_periods: 4.0,
            job_decay: 0.99,
        }
    }
}

/// One sampler tick's input.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FeedbackInput {
    /// The container's target in percent of the card ([`super::SoftTarget`] or the share).
    pub target_pct: f64,
    /// Σ NVML `smUtil` of the container's processes, percent of the card; NaN when unknown or
    /// when no fresh sample arrived this tick.
    pub own_pct: f64,
    /// Identity of the sample (its NVML timestamp): a sample seen before is ignored. `None`
    /// disables the check (the caller guarantees freshness).
    pub sample_id: Option<u64>,
    /// Whether the bucket was binding during this tick: a launch waited, or a launch at the
    /// tick would wait ([`super::would_wait`]).
    pub throttled: bool,
    /// The largest estimated launch cost charged during the tick, GPU-ns (0: none).
    pub job_ns: u64,
}

/// The feedback state of one (container, card). Call [`Feedback::step`] once per tick.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Feedback {
    cfg: FeedbackConfig,
    ln_m: f64,
    last_sample: Option<u64>,
    throttled_bits: u64,
    job_ns: f64,
    ring: [f64; WINDOW],
    /// Fresh samples pushed so far (the ring's write position is `pushed % WINDOW`).
    pushed: u64,
}

impl Default for Feedback {
    fn default() -> Self {
        Self::new(FeedbackConfig::default())
    }
}

/// `m` in ppm of 1.0 (`1_000_000` = ×1), saturating.
fn to_ppm(m: f64) -> u32 {
    let v = m * 1e6;
    if v.is_nan() {
        1_000_000
    } else {
        v.clamp(1.0, f64::from(u32::MAX)) as u32
    }
}

impl Feedback {
    /// A loop at `m = 1`. Non-finite or inconsistent config values are replaced by defaults.
    #[must_use]
    pub fn new(cfg: FeedbackConfig) -> Self {
        let d = FeedbackConfig::default();
        let pos = |v: f64, dflt: f64| if v.is_finite() && v > 0.0 { v } else { dflt };
        let mut cfg = FeedbackConfig {
            gain: pos(cfg.gain, d.gain),
            max_step: pos(cfg.max_step, d.max_step),
            deadband_pct: if cfg.deadband_pct.is_finite() && cfg.deadband_pct >= 0.0 {
                cfg.deadband_pct
            } else {
                d.deadband_pct
            },
            min_multiplier: pos(cfg.min_multiplier, d.min_multiplier),
            max_multiplier: pos(cfg.max_multiplier, d.max_multiplier),
            windup_ticks: cfg.windup_ticks.clamp(1, 64),
            sample_period_ns: if cfg.sample_period_ns == 0 {
                d.sample_period_ns
            } else {
                cfg.sample_period_ns
            },
            demand_periods: pos(cfg.demand_periods, d.demand_periods),
            job_decay: if (0.0..=1.0).contains(&cfg.job_decay) {
                cfg.job_decay
            } else {
                d.job_decay
            },
        };
        if cfg.min_multiplier > cfg.max_multiplier {
            cfg.min_multiplier = d.min_multiplier;
            cfg.max_multiplier = d.max_multiplier;
        }
        let ln_m = 0.0f64.clamp(cfg.min_multiplier.ln(), cfg.max_multiplier.ln());
        Self {
            cfg,
            ln_m,
            last_sample: None,
            throttled_bits: 0,
            job_ns: 0.0,
            ring: [0.0; WINDOW],
            pushed: 0,
        }
    }

    /// The current multiplier (1.0 = trust the cost model).
    #[must_use]
    pub fn multiplier(&self) -> f64 {
        self.ln_m.exp()
    }

    /// The current multiplier in ppm of 1.0.
    #[must_use]
    pub fn multiplier_ppm(&self) -> u32 {
        to_ppm(self.multiplier())
    }

    /// Samples averaged for `target` (1..=[`WINDOW`]).
    #[must_use]
    pub fn window(&self, target_pct: f64) -> usize {
        let t = if target_pct.is_finite() {
            target_pct.clamp(0.1, 100.0)
        } else {
            100.0
        };
        let demand_period = self.job_ns * 100.0 / t;
        let n = (self.cfg.demand_periods * demand_period / self.cfg.sample_period_ns as f64).ceil();
        if n.is_nan() {
            1
        } else {
            n.clamp(1.0, WINDOW as f64) as usize
        }
    }

    fn throttled_throughout(&self) -> bool {
        let n = self.cfg.windup_ticks.clamp(1, 64);
        let mask = if n >= 64 { u64::MAX } else { (1u64 << n) - 1 };
        self.throttled_bits & mask == mask
    }

    fn mean_of_last(&self, n: usize) -> Option<f64> {
        let n = n.clamp(1, WINDOW);
        if self.pushed < n as u64 {
            return None;
        }
        let mut sum = 0.0;
        for back in 1..=n as u64 {
            let idx = ((self.pushed - back) % WINDOW as u64) as usize;
            sum += self.ring.get(idx).copied().unwrap_or(0.0);
        }
        Some(sum / n as f64)
    }

    /// One sampler tick; returns the multiplier in ppm (`1_000_000` = ×1).
    pub fn step(&mut self, input: FeedbackInput) -> u32 {
        self.throttled_bits = (self.throttled_bits << 1) | u64::from(input.throttled);
        self.job_ns = (self.job_ns * self.cfg.job_decay).max(input.job_ns as f64);
        if !self.job_ns.is_finite() {
            self.job_ns = 0.0;
        }
        let FeedbackInput {
            target_pct: target,
            own_pct: own,
            ..
        } = input;
        if !(own.is_finite() && own >= 0.0) {
            return self.multiplier_ppm();
        }
        if let Some(id) = input.sample_id {
            if self.last_sample == Some(id) {
                return self.multiplier_ppm();
            }
            self.last_sample = Some(id);
        }
        let idx = (self.pushed % WINDOW as u64) as usize;
        if let Some(slot) = self.ring.get_mut(idx) {
            *slot = own.min(1e4);
        }
        self.pushed = self.pushed.saturating_add(1);
        if !(target.is_finite() && target > 0.0) {
            return self.multiplier_ppm();
        }
        let n = self.window(target);
        let Some(avg) = self.mean_of_last(n) else {
            return self.multiplier_ppm();
        };
        // The deadband is for raw samples only: a window average of lumpy samples takes a few
        // discrete values around the target, and a deadband that swallows those on one side
        // only would bias the loop (it wound a 5 % tenant to ×20).
        if n == 1 && (target - avg).abs() <= self.cfg.deadband_pct {
            return self.multiplier_ppm();
        }
        // Raw samples of smooth demand: the log ratio (symmetric: ×2 and ÷2 are equal steps).
        // Window averages of lumpy demand: the relative error, linear in `avg`, so an on-target
        // average gives a zero-mean step (a log or clamped error would be biased).
        let e = if n == 1 {
            (target / avg.max((0.05 * target).max(0.05))).ln()
        } else {
            (target - avg) / target
        };
        let gain = self.cfg.gain * 6.0 / (n as f64 + 5.0);
        let mut step = (gain * e).clamp(-self.cfg.max_step, self.cfg.max_step);
        if step > 0.0 && !self.throttled_throughout() {
            step = 0.0;
        }
        let lo = self.cfg.min_multiplier.ln();
        let hi = self.cfg.max_multiplier.ln();
        let next = self.ln_m + step;
        self.ln_m = if next.is_finite() {
            next.clamp(lo, hi)
        } else {
            self.ln_m
        };
        self.multiplier_ppm()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn input(target: f64, own: f64, id: u64, throttled: bool) -> FeedbackInput {
        FeedbackInput {
            target_pct: target,
            own_pct: own,
            sample_id: Some(id),
            throttled,
            job_ns: 100_000,
        }
    }

    fn warmed() -> Feedback {
        let mut f = Feedback::default();
        for _ in 0..5 {
            f.step(input(30.0, f64::NAN, 0, true));
        }
        f
    }

    #[test]
    fn under_target_while_throttled_raises_the_multiplier() {
        let mut f = warmed();
        let m = f.step(input(30.0, 15.0, 1, true));
        assert!(m > 1_000_000);
        // ln 2 · gain 0.3
        assert!((f.multiplier() - (0.3 * 2f64.ln()).exp()).abs() < 1e-9);
    }

    #[test]
    fn under_target_without_throttling_does_not_wind_up() {
        let mut f = Feedback::default();
        for i in 0..20 {
            assert_eq!(f.step(input(30.0, 10.0, i, false)), 1_000_000);
        }
        // A single throttled tick after an idle phase is not enough either (the sample is old).
        assert_eq!(f.step(input(30.0, 0.0, 99, true)), 1_000_000);
    }

    #[test]
    fn over_target_lowers_the_multiplier_even_when_unthrottled() {
        let mut f = Feedback::default();
        let m = f.step(input(30.0, 150.0, 1, false));
        assert!(m < 1_000_000);
        assert!(
            (f.multiplier() - (-0.35f64).exp()).abs() < 1e-9,
            "clamped step"
        );
    }

    #[test]
    fn unknown_stale_and_deadband_samples_hold() {
        let mut f = warmed();
        assert_eq!(f.step(input(30.0, f64::NAN, 1, true)), 1_000_000);
        assert_eq!(f.step(input(30.0, 30.4, 2, true)), 1_000_000);
        let m = f.step(input(30.0, 20.0, 3, true));
        assert_eq!(f.step(input(30.0, 20.0, 3, true)), m, "same sample twice");
    }

    #[test]
    fn the_multiplier_is_clamped() {
        let mut f = warmed();
        for i in 0..200 {
            f.step(input(30.0, 0.0, i, true));
        }
        assert!((f.multiplier() - 20.0).abs() < 1e-6);
        for i in 200..400 {
            f.step(input(30.0, 100.0, i, true));
        }
        assert!((f.multiplier() - 0.05).abs() < 1e-6);
    }

    #[test]
    fn lumpy_demand_is_averaged_over_several_demand_periods() {
        // One 200 ms kernel at 5 %: one NVML period in 24 reads 100 %, the others 0 %.
        let mut f = Feedback::default();
        let job = |t: f64, own: f64, id: u64| FeedbackInput {
            target_pct: t,
            own_pct: own,
            sample_id: Some(id),
            throttled: true,
            job_ns: 200_000_000,
        };
        f.step(job(5.0, f64::NAN, 0));
        assert_eq!(f.window(5.0), WINDOW);
        assert_eq!(f.window(90.0), 6);
        for i in 1..2000u64 {
            // Mean exactly 5: (100 + 23 · 20/23) / 24.
            let own = if i % 24 == 0 { 100.0 } else { 20.0 / 23.0 };
            f.step(job(5.0, own, i));
        }
        let m = f.multiplier();
        assert!(
            (0.8..1.25).contains(&m),
            "no wind-up on an on-target lumpy signal: {m}"
        );
        let mut small = Feedback::default();
        small.step(input(5.0, f64::NAN, 0, true));
        assert_eq!(small.window(5.0), 1, "100 µs kernels act on raw samples");
    }

    #[test]
    fn the_step_does_not_depend_on_the_card() {
        // No SM count anywhere in the interface: the same error gives the same step at 5 % and
        // 90 % in relative terms.
        let mut a = warmed();
        let mut b = warmed();
        a.step(input(5.0, 2.5, 1, true));
        b.step(input(90.0, 45.0, 1, true));
        assert!((a.multiplier() - b.multiplier()).abs() < 1e-12);
    }

    proptest! {
        #[test]
        fn step_is_total(t: f64, o: f64, id: Option<u64>, th: bool, gain: f64, step: f64,
                         db: f64, lo: f64, hi: f64, w: u32, p: u64, dp: f64, jd: f64, job: u64) {
            let mut f = Feedback::new(FeedbackConfig {
                gain, max_step: step, deadband_pct: db, min_multiplier: lo, max_multiplier: hi,
                windup_ticks: w, sample_period_ns: p, demand_periods: dp, job_decay: jd,
            });
            for _ in 0..3 {
                let m = f.step(FeedbackInput { target_pct: t, own_pct: o, sample_id: id, throttled: th, job_ns: job });
                prop_assert!(f.window(t) >= 1 && f.window(t) <= WINDOW);
                prop_assert!(m >= 1);
                prop_assert!(f.multiplier().is_finite());
            }
        }
    }
}
