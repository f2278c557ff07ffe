//! Soft mode: the target between the share and the `vcuda-core-limit` ceiling.
//!
//! The container may use idle capacity up to `limit`, but only while the *other* tenants of the
//! card (`others = total − own`, from the same NVML sample) have stayed below a small threshold
//! for `idle_samples` consecutive fresh samples. The target drops back to the share **at once**
//! when a sample shows another tenant busy, or when the utilisation is unknown (NVML missing:
//! nothing proves the card idle), and climbs back towards the limit by a fraction of
//! `limit − share` per idle sample.

use std::cmp::Ordering;

/// Tuning of [`SoftTarget`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SoftConfig {
    /// Others above this many points (of the card) count as busy.
    pub busy_threshold_pct: f64,
    /// Consecutive idle samples before the target starts to climb.
    pub idle_samples: u32,
    /// Fraction of `limit − share` added per idle sample once climbing.
    pub climb_fraction: f64,
}

impl Default for SoftConfig {
    fn default() -> Self {
        Self {
            busy_threshold_pct: 5.0,
            idle_samples: 3,
            climb_fraction: 0.125,
        }
    }
}

/// The soft-mode target of one (container, card). Hard mode is `limit == share`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SoftTarget {
    cfg: SoftConfig,
    share: f64,
    limit: f64,
    current: f64,
    idle_run: u32,
}

/// Percent, clamped to `[0, 100]` (NaN → 0).
fn pct(v: f64) -> f64 {
    if v.is_nan() {
        0.0
    } else {
        v.clamp(0.0, 100.0)
    }
}

impl SoftTarget {
    /// Share and limit in percent of the card; a limit below the share is raised to it (hard).
    #[must_use]
    pub fn new(share_pct: f64, limit_pct: f64, cfg: SoftConfig) -> Self {
        let share = pct(share_pct);
        let limit = pct(limit_pct).max(share);
        Self {
            cfg,
            share,
            limit,
            current: share,
            idle_run: 0,
        }
    }

    /// Hard mode: the target is always the share.
    #[must_use]
    pub fn hard(share_pct: f64) -> Self {
        Self::new(share_pct, share_pct, SoftConfig::default())
    }

    /// The current target in percent.
    #[must_use]
    pub fn target_pct(&self) -> f64 {
        self.current
    }

    /// Feeds one *fresh* NVML sample (percent sums; NaN when unknown) and returns the target.
    pub fn step(&mut self, own_pct: f64, total_pct: f64) -> f64 {
        if self.limit <= self.share {
            self.current = self.share;
            return self.current;
        }
        let others = if own_pct.is_nan() {
            f64::NAN
        } else {
            total_pct - own_pct.max(0.0)
        };
        let threshold = if self.cfg.busy_threshold_pct.is_finite() {
            self.cfg.busy_threshold_pct
        } else {
            SoftConfig::default().busy_threshold_pct
        };
        // `!(others <= threshold)` is also true for NaN: unknown counts as busy.
        let idle = matches!(
            others.partial_cmp(&threshold),
            Some(Ordering::Less | Ordering::Equal)
        );
        if !idle {
            self.current = self.share;
            self.idle_run = 0;
            return self.current;
        }
        self.idle_run = self.idle_run.saturating_add(1);
        if self.idle_run >= self.cfg.idle_samples {
            let frac = if self.cfg.climb_fraction.is_finite() && self.cfg.climb_fraction > 0.0 {
                self.cfg.climb_fraction.min(1.0)
            } else {
                SoftConfig::default().climb_fraction
            };
            let climbed = self.current + frac * (self.limit - self.share);
            self.current = climbed.clamp(self.share, self.limit);
        }
        self.current
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn alone_the_target_climbs_to_the_limit() {
        let mut s = SoftTarget::new(30.0, 90.0, SoftConfig::default());
        assert_eq!(s.step(30.0, 31.0), 30.0);
        assert_eq!(s.step(30.0, 31.0), 30.0);
        let mut t = 0.0;
        for _ in 0..20 {
            t = s.step(t, t + 1.0);
        }
        assert_eq!(t, 90.0);
    }

    #[test]
    fn a_busy_competitor_reverts_to_the_share_at_once() {
        let mut s = SoftTarget::new(30.0, 90.0, SoftConfig::default());
        for _ in 0..20 {
            s.step(80.0, 81.0);
        }
        assert_eq!(s.target_pct(), 90.0);
        assert_eq!(s.step(80.0, 88.0), 30.0);
    }

    #[test]
    fn unknown_utilisation_reverts_to_the_share() {
        let mut s = SoftTarget::new(30.0, 90.0, SoftConfig::default());
        for _ in 0..20 {
            s.step(80.0, 81.0);
        }
        assert_eq!(s.step(f64::NAN, 81.0), 30.0);
        for _ in 0..20 {
            s.step(80.0, 81.0);
        }
        assert_eq!(s.step(80.0, f64::NAN), 30.0);
    }

    #[test]
    fn hard_mode_never_moves() {
        let mut s = SoftTarget::hard(40.0);
        for _ in 0..20 {
            assert_eq!(s.step(0.0, 0.0), 40.0);
        }
        let mut low = SoftTarget::new(40.0, 10.0, SoftConfig::default());
        assert_eq!(low.step(0.0, 0.0), 40.0);
    }

    proptest! {
        #[test]
        fn target_stays_between_share_and_limit(share: f64, limit: f64,
                steps in proptest::collection::vec((any::<f64>(), any::<f64>()), 0..30)) {
            let mut s = SoftTarget::new(share, limit, SoftConfig::default());
            let lo = pct(share);
            let hi = pct(limit).max(lo);
            for (o, t) in steps {
                let v = s.step(o, t);
                prop_assert!(v >= lo && v <= hi);
            }
        }
    }
}
