//! The per-kernel cost model: estimated GPU nanoseconds per launch.
//!
//! A cold-start prior from the launch shape (waves × an assumed time per wave), replaced by the
//! first measurement and then tracked by an EWMA of **windowed minima** of event-measured
//! elapsed times.
//!
//! Measured elapsed times can include time spent queued behind other tenants (time-slicing).
//! An EWMA of raw samples then tracks the *contention*, not the kernel: when a competitor's
//! queue drains, the estimate drops, the container's admitted rate jumps, the competitor's
//! samples inflate in turn, and the two tenants oscillate faster than any NVML loop can follow
//! (seen in the simulation: 30/70 tenants swinging ±25 points). The least-delayed sample of a
//! window of [`MIN_WINDOW`] samples is close to the kernel's own duration whenever any of them
//! ran uncontended, and is stable when none did. So: the estimate falls at once to any lower
//! sample, and otherwise moves by [`ALPHA`] towards each completed window's minimum (so a kernel
//! that really became slower is followed within a few windows). Whatever bias remains is
//! constant and is removed by the NVML feedback multiplier ([`super::Feedback`]); the SM count
//! enters only here, through the wave count of the prior.

/// The shape of one launch, as the FFI sees it at `cuLaunchKernel`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct LaunchShape {
    /// Blocks in the grid (`gridDimX · gridDimY · gridDimZ`).
    pub grid_blocks: u64,
    /// Threads per block (`blockDimX · blockDimY · blockDimZ`).
    pub block_threads: u32,
    /// Multiprocessors on the card (`CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT`).
    pub sms: u32,
    /// `CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_MULTIPROCESSOR` (2048 on H100/H200).
    pub threads_per_sm: u32,
}

impl LaunchShape {
    /// `ceil(grid / (SMs × max(1, threads_per_SM / block_threads)))`, at least 1.
    #[must_use]
    pub fn waves(&self) -> u64 {
        let per_sm = self
            .threads_per_sm
            .checked_div(self.block_threads)
            .unwrap_or(1)
            .max(1);
        let slots = u64::from(self.sms.max(1)).saturating_mul(u64::from(per_sm));
        self.grid_blocks.div_ceil(slots).max(1)
    }
}

/// Prior GPU time of one wave, before any measurement (a short kernel body).
pub const PRIOR_NS_PER_WAVE: f64 = 20_000.0;
/// Floor of any estimate: a launch is never free.
pub const MIN_COST_NS: f64 = 1_000.0;
/// Ceiling of any estimate (10 s): a runaway measurement cannot block a container for hours.
pub const MAX_COST_NS: f64 = 10_000_000_000.0;
/// Fraction of the gap closed by a sample below the estimate.
pub const FALL: f64 = 1.0;
/// Samples per minimum window.
pub const MIN_WINDOW: u32 = 16;
/// EWMA weight of each completed window's minimum.
pub const ALPHA: f64 = 0.125;

/// Estimated GPU time of one launch of one (function, grid), plain `Copy` data for the FFI's
/// table. The estimate is kept per wave so that [`CostEstimate::estimate`] can scale it to
/// another grid of the same function.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CostEstimate {
    /// Estimated GPU-ns per wave.
    ns_per_wave: f64,
    /// Waves of the shape the estimate was made for (≥ 1).
    waves: u64,
    /// Measurements folded in so far (saturating).
    samples: u32,
    /// Minimum per-wave sample of the current window.
    window_min: f64,
    /// Samples in the current window.
    window_len: u32,
}

impl Default for CostEstimate {
    fn default() -> Self {
        Self::prior(&LaunchShape::default())
    }
}

fn clamp_cost(ns: f64) -> f64 {
    if ns.is_nan() {
        MIN_COST_NS
    } else {
        ns.clamp(MIN_COST_NS, MAX_COST_NS)
    }
}

impl CostEstimate {
    /// The cold-start prior for `shape`: `waves × PRIOR_NS_PER_WAVE`.
    #[must_use]
    pub fn prior(shape: &LaunchShape) -> Self {
        Self {
            ns_per_wave: PRIOR_NS_PER_WAVE,
            waves: shape.waves(),
            samples: 0,
            window_min: f64::INFINITY,
            window_len: 0,
        }
    }

    /// A prior with an explicit total (e.g. a CUDA graph: the sum of its nodes' estimates).
    #[must_use]
    pub fn with_total(total_ns: u64) -> Self {
        Self {
            ns_per_wave: clamp_cost(total_ns as f64),
            waves: 1,
            samples: 0,
            window_min: f64::INFINITY,
            window_len: 0,
        }
    }

    /// Folds in one measured elapsed time of a launch of the estimate's own shape. The first
    /// measurement replaces the prior. Zero, absurd (> 10 s) and non-finite samples are clamped.
    pub fn observe(&mut self, measured_ns: u64) {
        let waves = self.waves.max(1) as f64;
        let sample = clamp_cost(measured_ns as f64) / waves;
        let current = self.ns_per_wave;
        self.window_min = if self.window_min.is_nan() {
            sample
        } else {
            self.window_min.min(sample)
        };
        self.window_len = self.window_len.saturating_add(1);
        let mut next = if self.samples == 0 || !current.is_finite() {
            sample
        } else if sample < current {
            current + FALL * (sample - current)
        } else {
            current
        };
        if self.window_len >= MIN_WINDOW {
            next += ALPHA * (self.window_min - next);
            self.window_min = f64::INFINITY;
            self.window_len = 0;
        }
        self.ns_per_wave = clamp_cost(next * waves) / waves;
        self.samples = self.samples.saturating_add(1);
    }

    /// Measurements folded in so far.
    #[must_use]
    pub fn samples(&self) -> u32 {
        self.samples
    }

    /// Estimated GPU-ns of a launch of the estimate's own shape.
    #[must_use]
    pub fn estimate_ns(&self) -> u64 {
        let total = clamp_cost(self.ns_per_wave * self.waves.max(1) as f64);
        total as u64
    }

    /// Estimated GPU-ns of a launch of `shape` (scaled by its wave count).
    #[must_use]
    pub fn estimate(&self, shape: &LaunchShape) -> u64 {
        let total = clamp_cost(self.ns_per_wave * shape.waves() as f64);
        total as u64
    }
}

/// Which launches to time with events.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MeasurePolicy {
    /// Every launch of a function until it has this many samples.
    pub warmup_samples: u32,
    /// Then one launch in `every` (a power of two is cheapest; 0 is treated as 1).
    pub every: u64,
    /// And any launch after this much host idle time (probably uncontended, and a new phase).
    pub idle_gap_ns: u64,
}

impl Default for MeasurePolicy {
    fn default() -> Self {
        Self {
            warmup_samples: 4,
            every: 16,
            idle_gap_ns: 50_000_000,
        }
    }
}

impl MeasurePolicy {
    /// Whether the launch numbered `launch_counter` (per function, from 0), arriving
    /// `idle_gap_ns` after the previous launch of the process, should be timed, given that its
    /// estimate has `samples` measurements.
    #[must_use]
    pub fn should_measure(&self, launch_counter: u64, idle_gap_ns: u64, samples: u32) -> bool {
        samples < self.warmup_samples
            || idle_gap_ns >= self.idle_gap_ns
            || launch_counter.is_multiple_of(self.every.max(1))
    }
}

/// [`MeasurePolicy::should_measure`] with the default policy (4 warm-up samples, 1 in 16,
/// idle gap 50 ms).
#[must_use]
pub fn should_measure(launch_counter: u64, idle_gap_ns: u64, samples: u32) -> bool {
    MeasurePolicy::default().should_measure(launch_counter, idle_gap_ns, samples)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn shape(grid: u64, block: u32, sms: u32) -> LaunchShape {
        LaunchShape {
            grid_blocks: grid,
            block_threads: block,
            sms,
            threads_per_sm: 2048,
        }
    }

    #[test]
    fn waves_count_resident_blocks_per_sm() {
        assert_eq!(shape(132 * 8, 256, 132).waves(), 1);
        assert_eq!(shape(132 * 8 + 1, 256, 132).waves(), 2);
        assert_eq!(shape(4096, 256, 16).waves(), 32);
        // A block larger than an SM's thread budget still places one block per SM.
        assert_eq!(shape(100, 4096, 10).waves(), 10);
        assert_eq!(shape(0, 0, 0).waves(), 1);
        assert!(shape(u64::MAX, 1, u32::MAX).waves() > 0);
    }

    #[test]
    fn the_first_measurement_replaces_the_prior() {
        let mut c = CostEstimate::prior(&shape(4096, 256, 132));
        assert_eq!(c.estimate_ns(), 4 * 20_000);
        c.observe(200_000_000);
        assert_eq!(c.estimate_ns(), 200_000_000);
        assert_eq!(c.samples(), 1);
    }

    #[test]
    fn queueing_inflation_does_not_move_the_estimate() {
        let mut c = CostEstimate::with_total(1_000_000);
        c.observe(1_000_000);
        // Queued behind another tenant most of the time, uncontended once per window.
        for i in 0..100u64 {
            c.observe(if i % 8 == 3 {
                1_000_000
            } else {
                1_000_000 + 2_000_000 * (i % 3)
            });
            assert_eq!(c.estimate_ns(), 1_000_000);
        }
    }

    #[test]
    fn the_estimate_falls_at_once_and_follows_a_slower_kernel_within_windows() {
        let mut c = CostEstimate::with_total(1);
        c.observe(2_000_000);
        c.observe(1_000_000);
        assert_eq!(c.estimate_ns(), 1_000_000);
        for _ in 0..(30 * MIN_WINDOW) {
            c.observe(3_000_000);
        }
        let e = c.estimate_ns();
        assert!((2_900_000..=3_000_000).contains(&e), "{e}");
    }

    #[test]
    fn the_estimate_scales_with_the_waves_of_another_grid() {
        let mut c = CostEstimate::prior(&shape(1056, 256, 132));
        c.observe(100_000);
        assert_eq!(c.estimate(&shape(1056 * 3, 256, 132)), 300_000);
    }

    #[test]
    fn policy_times_warmup_sampled_and_post_idle_launches() {
        let p = MeasurePolicy::default();
        assert!(p.should_measure(5, 0, 0));
        assert!(!p.should_measure(5, 0, 9));
        assert!(p.should_measure(32, 0, 9));
        assert!(p.should_measure(5, 60_000_000, 9));
        let every0 = MeasurePolicy { every: 0, ..p };
        assert!(every0.should_measure(7, 0, 9));
    }

    proptest! {
        #[test]
        fn estimates_stay_finite_and_bounded(grid: u64, block: u32, sms: u32, tps: u32,
                                             samples in proptest::collection::vec(any::<u64>(), 0..20)) {
            let s = LaunchShape { grid_blocks: grid, block_threads: block, sms, threads_per_sm: tps };
            let mut c = CostEstimate::prior(&s);
            for m in samples {
                c.observe(m);
                let e = c.estimate_ns();
                prop_assert!((MIN_COST_NS as u64..=MAX_COST_NS as u64).contains(&e));
            }
            let e = c.estimate(&s);
            prop_assert!((MIN_COST_NS as u64..=MAX_COST_NS as u64).contains(&e));
        }
    }
}
