//! Time as the simulated backend sees it: elapsed time since the backend started, and a way
//! to wait. Tests use [`ManualClock`], whose sleeps advance time instantly.

use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A source of "time since start" that can also wait.
pub trait Clock: Send + Sync + fmt::Debug {
    /// Time elapsed since the clock's start.
    fn elapsed(&self) -> Duration;
    /// Wait for `d` (or pretend to).
    fn sleep(&self, d: Duration);
}

/// Wall-clock time since construction.
#[derive(Debug, Clone, Copy)]
pub struct SystemClock {
    start: Instant,
}

impl SystemClock {
    /// A clock starting now.
    pub fn new() -> Self {
        Self {
            start: Instant::now(),
        }
    }

    /// A clock that started at `start`.
    pub fn starting_at(start: Instant) -> Self {
        Self { start }
    }
}

impl Default for SystemClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for SystemClock {
    fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }
    fn sleep(&self, d: Duration) {
        std::thread::sleep(d);
    }
}

/// A clock that only moves when told to, or when someone sleeps on it (the sleep returns at
/// once, with the time advanced).
#[derive(Debug, Default)]
pub struct ManualClock {
    now: Mutex<Duration>,
}

impl ManualClock {
    /// A clock at zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// Move time forward by `d`.
    pub fn advance(&self, d: Duration) {
        let mut now = self.now.lock().unwrap_or_else(|p| p.into_inner());
        *now += d;
    }

    /// Set the time since start.
    pub fn set(&self, t: Duration) {
        let mut now = self.now.lock().unwrap_or_else(|p| p.into_inner());
        *now = t;
    }
}

impl Clock for ManualClock {
    fn elapsed(&self) -> Duration {
        *self.now.lock().unwrap_or_else(|p| p.into_inner())
    }
    fn sleep(&self, d: Duration) {
        self.advance(d);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_only_when_told_or_slept_on() {
        let c = ManualClock::new();
        assert_eq!(c.elapsed(), Duration::ZERO);
        c.advance(Duration::from_millis(1500));
        c.sleep(Duration::from_millis(500));
        assert_eq!(c.elapsed(), Duration::from_secs(2));
        c.set(Duration::from_millis(10));
        assert_eq!(c.elapsed(), Duration::from_millis(10));
    }

    #[test]
    fn system_clock_counts_from_its_start() {
        let c = SystemClock::starting_at(Instant::now() - Duration::from_secs(5));
        assert!(c.elapsed() >= Duration::from_secs(5));
    }
}
