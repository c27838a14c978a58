//! The Diia budget shared by the fleet: GCRA on Redis's clock, and Diia's brake.

use std::time::Duration;

use super::{Scaleout, scripts};
use crate::error::GatewayError;

pub(super) const BUDGET_KEY: &str = "{dg}:budget";
pub(super) const BRAKE_KEY: &str = "{dg}:brake";

/// The Diia budget's values as the shared GCRA takes them.
#[derive(Debug, Clone, Copy)]
pub struct BudgetValues {
    /// Sustained calls per second (fleet-wide).
    pub per_second: u32,
    /// Calls at once above it.
    pub burst: u32,
    /// Longest wait before a 503.
    pub max_wait: Duration,
    /// The configured longest wait (`max_wait` of the fullest queue): with the burst, how
    /// far ahead a reservation can ever put the budget's clock; further is corrupt.
    pub queue: Duration,
    /// `limits.diia.max_backoff`: the longest brake read from Redis.
    pub max_backoff: Duration,
}

impl BudgetValues {
    /// The same budget queued only half as deep: for a client past its share that is let
    /// through only because it is alone (see [`crate::limit::Standing::Alone`]).
    #[must_use]
    pub fn half_deep(self) -> Self {
        Self {
            max_wait: self.max_wait / 2,
            ..self
        }
    }

    /// Script arguments: emission interval (µs), burst, longest wait (µs), the weight of
    /// one call (never above the burst), the longest brake (ms) and the furthest ahead the
    /// budget's clock can be (µs).
    pub(super) fn args(self, weight: u32) -> [u64; 6] {
        let interval = (1_000_000 / u64::from(self.per_second.max(1))).max(1);
        let micros = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let burst = u64::from(self.burst.max(1));
        let max_backoff = u64::try_from(self.max_backoff.as_millis()).unwrap_or(u64::MAX);
        let horizon = burst
            .saturating_mul(interval)
            .saturating_add(micros(self.queue.max(self.max_wait)));
        [
            interval,
            burst,
            micros(self.max_wait),
            u64::from(weight).min(burst),
            max_backoff.max(1),
            horizon,
        ]
    }
}

/// What the shared budget said about one Diia call.
pub(super) enum Budget {
    /// Go after this wait (already reserved).
    Go(Duration),
    /// Refused: a 503 of ours.
    Refused(GatewayError),
}

pub(super) fn budget_reply(code: i64, micros: i64) -> Option<Budget> {
    let wait = Duration::from_micros(u64::try_from(micros).unwrap_or(0));
    match code {
        0 => Some(Budget::Refused(GatewayError::DiiaBudgetExhausted {
            retry_after: wait,
        })),
        2 => Some(Budget::Refused(GatewayError::DiiaBackoff {
            retry_after: wait,
        })),
        1 | 4 => Some(Budget::Go(wait)),
        _ => None,
    }
}

impl Scaleout {
    /// One Diia call's worth of the shared budget: `Some(Ok(wait))` (reserved; go after
    /// `wait`), `Some(Err(refusal))`, or `None` when Redis is down (use the local budget).
    pub async fn reserve(&self, budget: BudgetValues) -> Option<Result<Duration, GatewayError>> {
        let args = budget.args(1);
        let (code, micros): (i64, i64) = self
            .link
            .run("budget", |mut c| async move {
                scripts::RESERVE
                    .key(BUDGET_KEY)
                    .key(BRAKE_KEY)
                    .arg(&args[..])
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        match budget_reply(code, micros)? {
            Budget::Go(wait) => Some(Ok(wait)),
            Budget::Refused(refusal) => Some(Err(refusal)),
        }
    }

    /// Diia's pause as the fleet holds it, if any (`None` too when Redis is down): for
    /// calls that spend no fleet budget (unverified session tokens) but must still
    /// honour the brake. Never longer than `max_backoff`, whatever Redis holds.
    pub async fn braked(&self, max_backoff: Duration) -> Option<Duration> {
        let cap = u64::try_from(max_backoff.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        let millis = self
            .link
            .run("brake", |mut c| async move {
                scripts::BRAKE
                    .key(BRAKE_KEY)
                    .arg(cap)
                    .invoke_async::<i64>(&mut c)
                    .await
            })
            .await?;
        let millis = u64::try_from(millis).ok().filter(|millis| *millis > 0)?;
        Some(Duration::from_millis(millis))
    }

    /// Shares Diia's `Retry-After` pause with the fleet (only ever extended).
    pub async fn pause(&self, wait: Duration) {
        let millis = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1);
        let _ = self
            .link
            .run("brake", |mut c| async move {
                scripts::PAUSE
                    .key(BRAKE_KEY)
                    .arg(millis)
                    .invoke_async::<i64>(&mut c)
                    .await
            })
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_budget_clock_horizon_is_burst_over_rate_plus_the_full_wait() {
        let budget = BudgetValues {
            per_second: 100,
            burst: 50,
            max_wait: Duration::from_millis(200),
            queue: Duration::from_millis(200),
            max_backoff: Duration::from_secs(60),
        };
        // 50 × 10 ms + 200 ms, also when queued half as deep.
        assert_eq!(budget.args(1), [10_000, 50, 200_000, 1, 60_000, 700_000]);
        assert_eq!(
            budget.half_deep().args(1),
            [10_000, 50, 100_000, 1, 60_000, 700_000]
        );
    }
}
