//! Rate limits (governor): a budget per branch, checked first, and one gateway-wide budget
//! toward Diia for everything sent upstream, plus the brake Diia itself can pull.
//!
//! Per-branch keys are keyed 64-bit digests of the branch id (or client address), so a
//! check allocates nothing. The Diia budget waits a little for a token instead of failing
//! at once: a short queue smooths bursts without letting latency grow unbounded.

use std::hash::{BuildHasher, Hasher};
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwap;
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};
use http::HeaderValue;

use crate::config::{BranchLimitConfig, DiiaLimitConfig};
use crate::error::GatewayError;

/// Who a per-branch budget belongs to.
#[derive(Debug, Clone, Copy)]
pub enum BranchIdentity<'a> {
    /// `branchId` from the body or path.
    Branch(&'a str),
    /// No branch id in the request: the client address stands in.
    Client(IpAddr),
}

/// Per-branch budgets.
pub struct BranchLimiter {
    limiter: DefaultKeyedRateLimiter<u64>,
    hasher: foldhash::quality::RandomState,
    policy: HeaderValue,
    clock: DefaultClock,
}

impl BranchLimiter {
    /// Builds the limiter and its `RateLimit-Policy` header once.
    #[must_use]
    pub fn new(config: &BranchLimitConfig) -> Self {
        let quota = Quota::per_minute(config.per_minute).allow_burst(config.burst);
        let policy = HeaderValue::try_from(format!("\"branch\";q={};w=60", config.per_minute))
            .unwrap_or_else(|_| HeaderValue::from_static("\"branch\""));
        Self {
            limiter: RateLimiter::keyed(quota),
            hasher: foldhash::quality::RandomState::default(),
            policy,
            clock: DefaultClock::default(),
        }
    }

    /// Spends one request of this branch's budget, or says when to come back.
    pub fn check(&self, who: BranchIdentity<'_>) -> Result<(), GatewayError> {
        let mut hasher = self.hasher.build_hasher();
        match who {
            BranchIdentity::Branch(id) => {
                hasher.write_u8(0);
                hasher.write(id.as_bytes());
            }
            BranchIdentity::Client(IpAddr::V4(ip)) => {
                hasher.write_u8(4);
                hasher.write(&ip.octets());
            }
            BranchIdentity::Client(IpAddr::V6(ip)) => {
                hasher.write_u8(6);
                hasher.write(&ip.octets());
            }
        }
        self.limiter
            .check_key(&hasher.finish())
            .map_err(|not_until| GatewayError::BranchRateLimited {
                retry_after: not_until.wait_time_from(self.clock.now()),
                policy: self.policy.clone(),
            })
    }

    /// Forgets branches whose budget is full again; call periodically to bound memory.
    pub fn forget_idle(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }

    /// Branches currently tracked.
    #[must_use]
    pub fn tracked(&self) -> usize {
        self.limiter.len()
    }
}

struct BudgetSettings {
    limiter: DefaultDirectRateLimiter,
    max_wait: Duration,
    max_backoff: Duration,
}

impl BudgetSettings {
    fn new(config: &DiiaLimitConfig) -> Self {
        Self {
            limiter: RateLimiter::direct(
                Quota::per_second(config.per_second).allow_burst(config.burst),
            ),
            max_wait: config.max_wait,
            max_backoff: config.max_backoff,
        }
    }
}

/// The gateway-wide budget toward Diia, and Diia's own back-off requests.
pub struct DiiaBudget {
    /// The limiter and its waits, swapped whole on a config reload.
    settings: ArcSwap<BudgetSettings>,
    clock: DefaultClock,
    origin: Instant,
    /// Nanoseconds after `origin` until which no call may go to Diia (0: none).
    paused_until: AtomicU64,
}

impl DiiaBudget {
    /// A full budget.
    #[must_use]
    pub fn new(config: &DiiaLimitConfig) -> Self {
        Self {
            settings: ArcSwap::from_pointee(BudgetSettings::new(config)),
            clock: DefaultClock::default(),
            origin: Instant::now(),
            paused_until: AtomicU64::new(0),
        }
    }

    /// New quota and waits (a config reload); the budget starts full, a pause stays.
    pub fn reconfigure(&self, config: &DiiaLimitConfig) {
        self.settings.store(Arc::new(BudgetSettings::new(config)));
    }

    fn now_nanos(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Remaining gateway-wide pause, if Diia asked for one.
    #[must_use]
    pub fn paused_for(&self) -> Option<Duration> {
        let until = self.paused_until.load(Ordering::Acquire);
        let now = self.now_nanos();
        (until > now).then(|| Duration::from_nanos(until - now))
    }

    /// Pauses every upstream call for `wait` (capped at `max_backoff`); a longer pause wins.
    pub fn pause(&self, wait: Duration) {
        let wait = wait.min(self.settings.load().max_backoff);
        let until = self
            .now_nanos()
            .saturating_add(u64::try_from(wait.as_nanos()).unwrap_or(u64::MAX));
        self.paused_until.fetch_max(until, Ordering::AcqRel);
    }

    /// Takes one call's worth of budget, waiting up to `max_wait` for it.
    pub async fn acquire(&self) -> Result<(), GatewayError> {
        let started = Instant::now();
        let settings = self.settings.load_full();
        loop {
            if let Some(retry_after) = self.paused_for() {
                return Err(GatewayError::DiiaBackoff { retry_after });
            }
            let wait = match settings.limiter.check() {
                Ok(()) => return Ok(()),
                Err(not_until) => not_until.wait_time_from(self.clock.now()),
            };
            if started.elapsed() + wait > settings.max_wait {
                return Err(GatewayError::DiiaBudgetExhausted { retry_after: wait });
            }
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::num::NonZeroU32;

    #[test]
    fn branch_budget_is_per_branch() {
        let limiter = BranchLimiter::new(&BranchLimitConfig {
            per_minute: NonZeroU32::new(60).expect("nonzero"),
            burst: NonZeroU32::new(2).expect("nonzero"),
        });
        assert!(limiter.check(BranchIdentity::Branch("a")).is_ok());
        assert!(limiter.check(BranchIdentity::Branch("a")).is_ok());
        let err = limiter
            .check(BranchIdentity::Branch("a"))
            .expect_err("third is over budget");
        assert!(err.retry_after().expect("retry after") > Duration::ZERO);
        assert!(limiter.check(BranchIdentity::Branch("b")).is_ok());
        assert!(
            limiter
                .check(BranchIdentity::Client([127, 0, 0, 1].into()))
                .is_ok()
        );
    }

    #[tokio::test]
    async fn pause_blocks_and_longer_pause_wins() {
        let budget = DiiaBudget::new(&DiiaLimitConfig::default());
        assert!(budget.acquire().await.is_ok());
        budget.pause(Duration::from_secs(5));
        budget.pause(Duration::from_secs(1));
        let paused = budget.paused_for().expect("paused");
        assert!(paused > Duration::from_secs(4));
        assert!(matches!(
            budget.acquire().await,
            Err(GatewayError::DiiaBackoff { .. })
        ));
    }
}
