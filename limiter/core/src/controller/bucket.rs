//! The launch-path token bucket, in GPU time, as one CAS-able `u64` (GCRA).
//!
//! The state is a *theoretical arrival time* (TAT) in nanoseconds of `CLOCK_MONOTONIC`: the
//! instant at which every launch charged so far would have been paid for at the current rate.
//! With rate `r` (fraction of the card) and burst `B` (GPU-ns), the balance at time `t` is
//! `B − r · max(0, TAT − t)`.
//!
//! A launch of estimated cost `c` first **charges** itself, `TAT' = max(TAT, now) + c / r` (one
//! CAS, so every other process of the container sees the debt at once), then sleeps until the
//! balance *before its own charge* is back to zero, `wait = max(0, TAT − B / r − now)`, and
//! launches. The bucket is therefore in debt by at most the one kernel just admitted, which the
//! next launch pays before it starts ("check after the charge": the peers test a grid-count
//! counter before charging and poll it every 10 ms, so one launch can overdraw without bound).
//! Idle time banks at most `B` (`TAT` is never moved below `now`), so over any span `[t0, T]`
//! the admitted GPU time is at most `r · (T − t0) + B + one kernel`, whatever the kernel sizes
//! (see the property tests).
//!
//! Why the launch pays for its predecessors and not for itself: a "launch + synchronize" loop
//! cannot launch while its own kernel runs. If each launch also waited for its own cost, the
//! kernel's run time would overlap nothing it had paid for and the loop would get
//! `r / (1 + r)` of the card (33 % at a 50 % share) instead of `r`.
//!
//! Refill is implicit in elapsed time, so liveness does not depend on any watcher thread.

/// Parts per million of one card: `1_000_000` is the whole card.
pub const PPM: u32 = 1_000_000;

/// Default burst, in GPU-nanoseconds (2 ms of the whole card).
///
/// At rate `r` this lets a container run `2 ms / r` of wall time ahead of its schedule (40 ms at
/// 5 %, 2.9 ms at 70 %): enough to absorb sleep overshoot of the caller (the bucket is
/// self-correcting as long as the oversleep stays below `B / r`), small enough that an idle
/// period banks at most 2 points of a 100 ms window.
pub const DEFAULT_BURST_NS: u64 = 2_000_000;

/// The burst to pass with a launch of estimated cost `cost_ns`: [`DEFAULT_BURST_NS`], or the
/// launch's own cost when larger.
///
/// With a burst smaller than one kernel, a container whose launch queues behind another
/// tenant's 200 ms kernel (a non-preemptive, time-sliced card) cannot bank the share it is
/// owed meanwhile, and loses it for good (a 70 % tenant got 66 % against a 30 % one in the
/// simulation). One kernel of credit is also the granularity any limiter has for such kernels.
#[must_use]
pub fn burst_for(cost_ns: u64) -> u64 {
    cost_ns.max(DEFAULT_BURST_NS)
}

/// What one launch must do: store `new_state` (CAS against the value read), then sleep `wait_ns`,
/// then launch.
///
/// When `new_state` equals the state read (unthrottled), the caller may skip the CAS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Admission {
    /// The bucket's new theoretical arrival time.
    pub new_state: u64,
    /// Nanoseconds to sleep before launching (0: launch now).
    pub wait_ns: u64,
}

/// `ceil(ns · 10⁶ / rate_ppm)`, saturating at `u64::MAX`; `rate_ppm` is at least 1 here.
fn per_rate_ceil(ns: u64, rate_ppm: u32) -> u64 {
    let num = u128::from(ns) * u128::from(PPM);
    let den = u128::from(rate_ppm.max(1));
    let q = num / den + u128::from(num % den != 0);
    u64::try_from(q).unwrap_or(u64::MAX)
}

/// `floor(ns · 10⁶ / rate_ppm)`, saturating at `u64::MAX`.
fn per_rate_floor(ns: u64, rate_ppm: u32) -> u64 {
    let num = u128::from(ns) * u128::from(PPM);
    let q = num / u128::from(rate_ppm.max(1));
    u64::try_from(q).unwrap_or(u64::MAX)
}

/// Charges one launch of estimated GPU cost `cost_ns` against the bucket `state`.
///
/// * `now_ns`: `CLOCK_MONOTONIC` now.
/// * `rate_ppm`: the container's effective rate (target × feedback multiplier, see
///   [`super::effective_rate_ppm`]); `>= 1_000_000` means unthrottled (state unchanged, no wait);
///   0 is treated as 1 ppm.
/// * `burst_ns`: bucket depth in GPU-ns ([`DEFAULT_BURST_NS`]).
///
/// Total on any input: saturating arithmetic, no panic. A state of 0 is a full bucket.
#[must_use]
pub fn admit(state: u64, now_ns: u64, cost_ns: u64, rate_ppm: u32, burst_ns: u64) -> Admission {
    if rate_ppm >= PPM {
        return Admission {
            new_state: state,
            wait_ns: 0,
        };
    }
    let interval = per_rate_ceil(cost_ns, rate_ppm);
    let tau = per_rate_floor(burst_ns, rate_ppm);
    let base = state.max(now_ns);
    let wait_ns = base.saturating_sub(tau).saturating_sub(now_ns);
    Admission {
        new_state: base.saturating_add(interval),
        wait_ns,
    }
}

/// Whether a launch of zero cost at `now_ns` would wait: the bucket is binding (the balance is
/// below zero). The sampler reports this as "throttled" together with actual waits, so a
/// launch-and-synchronize loop whose every launch waits counts as throttled between waits.
#[must_use]
pub fn would_wait(state: u64, now_ns: u64, rate_ppm: u32, burst_ns: u64) -> bool {
    admit(state, now_ns, 0, rate_ppm, burst_ns).wait_ns > 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_full_bucket_admits_the_burst_and_one_kernel_without_waiting() {
        // 25 % rate, 2 ms burst: 2 ms (the burst) + one more 1 ms kernel go now; the next waits
        // until that kernel's debt is paid (4 ms).
        let now = 1_000_000_000;
        let mut state = 0;
        for _ in 0..3 {
            let a = admit(state, now, 1_000_000, 250_000, 2_000_000);
            assert_eq!(a.wait_ns, 0);
            state = a.new_state;
        }
        let d = admit(state, now, 1_000_000, 250_000, 2_000_000);
        assert_eq!(d.wait_ns, 4_000_000);
    }

    #[test]
    fn a_kernel_larger_than_the_burst_makes_the_next_launch_wait_for_its_cost() {
        // The "200 ms kernel + synchronize" bypass of grid-count buckets: launch 1 runs at once,
        // launch 2 (after the synchronize, 200 ms later) waits until 4 s − 40 ms.
        let a = admit(0, 0, 200_000_000, 50_000, DEFAULT_BURST_NS);
        assert_eq!(a.wait_ns, 0);
        let b = admit(
            a.new_state,
            200_000_000,
            200_000_000,
            50_000,
            DEFAULT_BURST_NS,
        );
        assert_eq!(b.wait_ns, 4_000_000_000 - 40_000_000 - 200_000_000);
    }

    #[test]
    fn idle_time_banks_at_most_the_burst() {
        let a = admit(0, 10, 1_000_000, 100_000, 2_000_000);
        // A day later the bucket holds only B (+ the kernel in debt): 2 ms + 1 ms go now, the
        // next must wait 10 ms.
        let day = 86_400_000_000_000;
        let b = admit(a.new_state, day, 2_000_000, 100_000, 2_000_000);
        assert_eq!(b.wait_ns, 0);
        let c = admit(b.new_state, day, 1_000_000, 100_000, 2_000_000);
        assert_eq!(c.wait_ns, 0);
        let d = admit(c.new_state, day, 1_000_000, 100_000, 2_000_000);
        assert_eq!(d.wait_ns, 10_000_000);
    }

    #[test]
    fn the_bucket_binds_while_in_debt_beyond_the_burst() {
        let a = admit(0, 0, 200_000_000, 500_000, 2_000_000);
        assert!(would_wait(a.new_state, 0, 500_000, 2_000_000));
        assert!(would_wait(a.new_state, 395_000_000, 500_000, 2_000_000));
        assert!(!would_wait(a.new_state, 396_000_000, 500_000, 2_000_000));
        assert!(!would_wait(a.new_state, 0, PPM, 2_000_000));
    }

    #[test]
    fn full_rate_is_unthrottled_and_leaves_the_state_alone() {
        let a = admit(77, 5, u64::MAX, PPM, 0);
        assert_eq!(
            a,
            Admission {
                new_state: 77,
                wait_ns: 0
            }
        );
        let b = admit(77, 5, u64::MAX, u32::MAX, 0);
        assert_eq!(
            b,
            Admission {
                new_state: 77,
                wait_ns: 0
            }
        );
    }

    #[test]
    fn zero_rate_and_extreme_inputs_saturate_instead_of_panicking() {
        let a = admit(u64::MAX, u64::MAX, u64::MAX, 0, u64::MAX);
        assert_eq!(a.new_state, u64::MAX);
        let b = admit(0, 0, u64::MAX, 0, 0);
        assert_eq!(b.new_state, u64::MAX);
        assert_eq!(admit(b.new_state, 0, 1, 0, 0).wait_ns, u64::MAX);
    }

    proptest! {
        #[test]
        fn admit_never_panics(state: u64, now: u64, cost: u64, rate: u32, burst: u64) {
            let a = admit(state, now, cost, rate, burst);
            prop_assert!(a.new_state >= state.min(now) || rate >= PPM);
        }

        #[test]
        fn wait_is_monotone_in_cost(state: u64, now: u64, c1: u64, c2: u64, rate: u32,
                                    burst: u64, later: u64, next: u64) {
            let (lo, hi) = (c1.min(c2), c1.max(c2));
            let (a, b) = (admit(state, now, lo, rate, burst), admit(state, now, hi, rate, burst));
            prop_assert!(a.wait_ns <= b.wait_ns);
            prop_assert!(a.new_state <= b.new_state);
            // The debt a launch leaves is paid by the next one: a costlier kernel never makes
            // its successor wait less.
            let then = now.saturating_add(later);
            prop_assert!(admit(a.new_state, then, next, rate, burst).wait_ns
                <= admit(b.new_state, then, next, rate, burst).wait_ns);
        }

        /// Over any prefix of a launch sequence (callers arriving at non-decreasing times, each
        /// launching after its wait), the GPU time admitted by time `T` is at most
        /// `rate · (T − t0) + burst + one kernel`.
        #[test]
        fn never_admits_more_than_rate_times_elapsed_plus_burst(
            t0 in 0u64..1u64 << 50,
            rate in 1u32..PPM,
            burst in 0u64..50_000_000,
            steps in proptest::collection::vec((0u64..20_000_000, 1u64..300_000_000), 1..60),
        ) {
            let mut state = 0u64;
            let mut now = t0;
            let mut admitted: u128 = 0;
            let mut last_launch = 0u64;
            let mut biggest = 0u64;
            for (dt, cost) in steps {
                now += dt;
                let a = admit(state, now, cost, rate, burst);
                state = a.new_state;
                let launch = now + a.wait_ns;
                prop_assert!(launch >= last_launch, "launches keep their order");
                last_launch = launch;
                admitted += u128::from(cost);
                biggest = biggest.max(cost);
                // admitted · 10⁶ ≤ rate · (launch − t0) + (burst + one kernel) · 10⁶
                let budget = u128::from(rate) * u128::from(launch - t0)
                    + u128::from(burst + biggest) * u128::from(PPM);
                prop_assert!(admitted * u128::from(PPM) <= budget,
                    "admitted {admitted} ns by {launch} from {t0} at {rate} ppm, burst {burst}");
            }
        }
    }
}
