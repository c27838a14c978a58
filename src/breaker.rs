//! Protection toward a failing Diia: a circuit breaker, and a retry budget that lets
//! retries be at most a share of live traffic, so a Diia outage is never multiplied.
//!
//! Both are lock-free (atomics only): they sit on every upstream call.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How a call was let through the breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Normal traffic.
    Closed,
    /// The one trial call after the cool-down; its result closes or re-opens the breaker.
    Probe,
}

/// Opens after `threshold` consecutive failures (transport errors and 5xx), stays open
/// for `cooldown`, then lets one probe through: success closes it, failure re-opens it.
pub struct Breaker {
    threshold: u32,
    cooldown: Duration,
    origin: Instant,
    failures: AtomicU32,
    /// Nanoseconds after `origin` until which the breaker is open; 0 when closed.
    open_until: AtomicU64,
    probing: AtomicBool,
}

impl Breaker {
    /// A closed breaker.
    #[must_use]
    pub fn new(threshold: u32, cooldown: Duration) -> Self {
        Self {
            threshold: threshold.max(1),
            cooldown,
            origin: Instant::now(),
            failures: AtomicU32::new(0),
            open_until: AtomicU64::new(0),
            probing: AtomicBool::new(false),
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn open_for(&self, wait: Duration) {
        let until = self
            .now()
            .saturating_add(u64::try_from(wait.as_nanos()).unwrap_or(u64::MAX));
        self.open_until.store(until.max(1), Ordering::Release);
    }

    /// Lets a call through, or says how long the breaker stays open.
    pub fn admit(&self) -> Result<Admission, Duration> {
        let until = self.open_until.load(Ordering::Acquire);
        if until == 0 {
            return Ok(Admission::Closed);
        }
        let now = self.now();
        if now < until {
            return Err(Duration::from_nanos(until - now));
        }
        if self
            .probing
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            Ok(Admission::Probe)
        } else {
            // A probe is under way; come back after another cool-down at most.
            Err(self.cooldown)
        }
    }

    /// Records a call's result.
    pub fn record(&self, admission: Admission, success: bool) {
        if success {
            self.failures.store(0, Ordering::Release);
            self.open_until.store(0, Ordering::Release);
            self.probing.store(false, Ordering::Release);
            return;
        }
        match admission {
            Admission::Probe => {
                self.open_for(self.cooldown);
                self.probing.store(false, Ordering::Release);
            }
            Admission::Closed => {
                let failures = self.failures.fetch_add(1, Ordering::AcqRel) + 1;
                if failures >= self.threshold && self.open_until.load(Ordering::Acquire) == 0 {
                    tracing::warn!(
                        failures,
                        cooldown_ms = self.cooldown.as_millis(),
                        "circuit to Diia opened"
                    );
                    self.open_for(self.cooldown);
                }
            }
        }
    }

    /// A call that never reached Diia (budget refused it): frees the probe slot.
    pub fn abandon(&self, admission: Admission) {
        if admission == Admission::Probe {
            self.probing.store(false, Ordering::Release);
        }
    }

    /// Whether the breaker is open now (for metrics).
    #[must_use]
    pub fn is_open(&self) -> bool {
        self.open_until.load(Ordering::Acquire) != 0
    }
}

/// Retries may spend at most `ratio` of first calls, plus a small reserve.
pub struct RetryBudget {
    /// Thousandths of a retry available.
    milli_tokens: AtomicU64,
    deposit: u64,
    cap: u64,
}

impl RetryBudget {
    /// `ratio` of live traffic (e.g. 0.1), with `reserve` retries available at start and as cap.
    #[must_use]
    pub fn new(ratio: f64, reserve: u32) -> Self {
        let cap = u64::from(reserve.max(1)) * 1000;
        Self {
            milli_tokens: AtomicU64::new(cap),
            // In [0, 1000] after the clamp: the cast cannot truncate.
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            deposit: (ratio.clamp(0.0, 1.0) * 1000.0).round() as u64,
            cap,
        }
    }

    /// A first call was made: earn a share of a retry.
    pub fn deposit(&self) {
        let _ = self
            .milli_tokens
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| {
                Some((t + self.deposit).min(self.cap))
            });
    }

    /// Takes one retry, if the budget has one.
    pub fn withdraw(&self) -> bool {
        self.milli_tokens
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| t.checked_sub(1000))
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_threshold_and_probes_after_cooldown() {
        let breaker = Breaker::new(3, Duration::from_millis(30));
        for _ in 0..2 {
            breaker.record(breaker.admit().expect("closed"), false);
        }
        assert_eq!(breaker.admit(), Ok(Admission::Closed));
        breaker.record(Admission::Closed, false);
        assert!(breaker.admit().is_err(), "open after 3 failures");
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(breaker.admit(), Ok(Admission::Probe));
        assert!(breaker.admit().is_err(), "one probe at a time");
        breaker.record(Admission::Probe, false);
        assert!(breaker.admit().is_err(), "a failed probe re-opens");
        std::thread::sleep(Duration::from_millis(40));
        let probe = breaker.admit().expect("probe");
        breaker.record(probe, true);
        assert_eq!(breaker.admit(), Ok(Admission::Closed));
    }

    #[test]
    fn retries_are_a_share_of_traffic() {
        let budget = RetryBudget::new(0.1, 2);
        assert!(budget.withdraw() && budget.withdraw());
        assert!(!budget.withdraw(), "reserve spent");
        for _ in 0..9 {
            budget.deposit();
        }
        assert!(!budget.withdraw(), "0.9 of a retry is not a retry");
        budget.deposit();
        assert!(budget.withdraw(), "10 calls earn one retry");
    }
}
