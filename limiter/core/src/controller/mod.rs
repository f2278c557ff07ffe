//! The compute-share controller: a token bucket in **GPU time**, corrected by an NVML loop.
//!
//! # How the FFI uses it
//!
//! Time is nanoseconds of `CLOCK_MONOTONIC` (`u64`); shares and targets are percent of one card
//! (`f64`, the `vcuda-core` value 1–99); rates and multipliers are parts per million (`u32`,
//! `1_000_000` = the whole card, or ×1).
//!
//! 1. [`unthrottled`]`(share)`: whole cards (share ≥ 100) skip everything below.
//! 2. Per launch: look up the [`CostEstimate`] of (function, grid) (create it with
//!    [`CostEstimate::prior`]; a graph launch uses [`CostEstimate::with_total`] of its nodes'
//!    estimates), read the container's bucket word, [`admit`] with
//!    `rate = `[`effective_rate_ppm`]`(target, multiplier)` and `burst = `[`burst_for`]`(cost)`,
//!    CAS the new state (retry on
//!    failure), sleep `wait_ns`, launch. If [`should_measure`] says so, record events around the
//!    kernel and later feed the elapsed time to [`CostEstimate::observe`].
//! 3. Per sampler tick (~100 ms, per container and card): sum NVML `smUtil` into `own`/`total`,
//!    feed fresh samples to [`SoftTarget::step`] (soft mode) and every tick to
//!    [`Feedback::step`]; publish the target and multiplier for the launch path.
//!
//! # Why this is accurate where the peers are not (reference §3.5)
//!
//! * **The charge is time, not grid blocks.** A launch costs its estimated GPU-ns, so a 200 ms
//!   kernel costs 200 ms and a 10 µs kernel 10 µs, whatever their grids; the budget is
//!   `rate × wall time`. The grid only shapes the cold-start prior (waves), replaced by the first
//!   event measurement.
//! * **Check after the charge** ([`admit`]): a launch waits until its own cost is paid, and idle
//!   time banks at most one burst, so no kernel size and no "launch + synchronize" loop can
//!   bypass the bucket (the GAP problem of the peers needs no special path).
//! * **Gain independent of the card.** The outer loop works in utilisation points and
//!   log-multipliers; the SM count never enters it (the peers' step grows with SM², which made
//!   188-SM cards bang-bang at 100 %).
//! * **Lag-aware loop.** A damped log-domain integrator with a per-step clamp, deadband,
//!   de-duplicated samples and anti-windup tied to actual throttling (see [`Feedback`]), instead
//!   of a large proportional step acting on one-second-old data.
//! * **Event timings are biased, the loop removes the bias.** Under time-slicing the measured
//!   elapsed time includes waiting behind other tenants; the EWMA of windowed minima follows the
//!   lower envelope (stable under contention) and the multiplier absorbs what remains (it
//!   converges to the ratio between the estimated and the true cost).
//!
//! [`sim`] holds the virtual-time plant (time-sliced FIFO card, NVML sampling grid with delay and
//! noise) and a driver that runs N limited tenants against it; the tests in
//! `limiter/core/tests/controller_sim.rs` sweep it.

mod bucket;
mod cost;
mod feedback;
pub mod sim;
mod soft;

pub use bucket::{admit, burst_for, would_wait, Admission, DEFAULT_BURST_NS, PPM};
pub use cost::{
    should_measure, CostEstimate, LaunchShape, MeasurePolicy, ALPHA, MAX_COST_NS, MIN_COST_NS,
    MIN_WINDOW, PRIOR_NS_PER_WAVE,
};
pub use feedback::{Feedback, FeedbackConfig, FeedbackInput, WINDOW};
pub use soft::{SoftConfig, SoftTarget};

/// Whether a container with this `vcuda-core` share is never throttled (a whole card or more).
#[must_use]
pub fn unthrottled(share_pct: u32) -> bool {
    share_pct >= 100
}

/// The bucket rate for `target_pct` percent of the card corrected by `multiplier_ppm`
/// (`1_000_000` = ×1): `target/100 × multiplier`, in ppm, clamped to `[1, 1_000_000]`.
/// `1_000_000` means unthrottled ([`admit`] then never waits). NaN or negative targets give the
/// minimum rate of 1 ppm.
#[must_use]
pub fn effective_rate_ppm(target_pct: f64, multiplier_ppm: u32) -> u32 {
    let t = if target_pct.is_nan() {
        0.0
    } else {
        target_pct.clamp(0.0, 100.0)
    };
    let v = t * 1e4 * (f64::from(multiplier_ppm) / 1e6);
    v.clamp(1.0, f64::from(PPM)) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_cards_are_unthrottled() {
        assert!(!unthrottled(1));
        assert!(!unthrottled(99));
        assert!(unthrottled(100));
        assert!(unthrottled(400));
    }

    #[test]
    fn effective_rate_scales_the_target_by_the_multiplier() {
        assert_eq!(effective_rate_ppm(30.0, 1_000_000), 300_000);
        assert_eq!(effective_rate_ppm(30.0, 2_000_000), 600_000);
        assert_eq!(effective_rate_ppm(60.0, 2_000_000), PPM);
        assert_eq!(effective_rate_ppm(f64::NAN, 1_000_000), 1);
        assert_eq!(effective_rate_ppm(-5.0, u32::MAX), 1);
        assert_eq!(effective_rate_ppm(f64::INFINITY, u32::MAX), PPM);
        assert_eq!(effective_rate_ppm(5.0, 0), 1);
    }
}
