//! Rate limits (governor): a budget per branch, checked first, and one gateway-wide budget
//! toward Diia for everything sent upstream, plus the brake Diia itself can pull.
//!
//! Per-branch keys are keyed 64-bit digests of the branch id (or client address), so a
//! check allocates nothing. The Diia budget waits a little for a token instead of failing
//! at once: a short queue smooths bursts without letting latency grow unbounded.

use std::hash::{BuildHasher, Hasher};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};

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
    values: (std::num::NonZeroU32, std::num::NonZeroU32),
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
            values: (config.per_minute, config.burst),
        }
    }

    /// Whether this limiter was built from the same values (a reload keeps it then).
    #[must_use]
    pub fn same_values(&self, other: &Self) -> bool {
        self.values == other.values
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

/// The Diia budget's quota and waits, built from one config snapshot. Part of the hot
/// settings: a reload with the same values keeps this limiter (and its state).
pub struct BudgetQuota {
    limiter: DefaultDirectRateLimiter,
    values: DiiaLimitConfig,
}

impl BudgetQuota {
    /// A full budget for these values.
    #[must_use]
    pub fn new(config: &DiiaLimitConfig) -> Self {
        Self {
            limiter: RateLimiter::direct(
                Quota::per_second(config.per_second).allow_burst(config.burst),
            ),
            values: config.clone(),
        }
    }

    /// Whether this limiter was built from the same values (a reload keeps it then).
    #[must_use]
    pub fn same_values(&self, other: &Self) -> bool {
        let (a, b) = (&self.values, &other.values);
        a.per_second == b.per_second
            && a.burst == b.burst
            && a.max_wait == b.max_wait
            && a.max_backoff == b.max_backoff
    }
}

/// Diia's own brake: a gateway-wide pause Diia asked for with `Retry-After`. Lives for the
/// whole process (a reload never lifts a pause).
pub struct DiiaBrake {
    clock: DefaultClock,
    origin: Instant,
    /// Nanoseconds after `origin` until which no call may go to Diia (0: none).
    paused_until: AtomicU64,
}

impl Default for DiiaBrake {
    fn default() -> Self {
        Self::new()
    }
}

impl DiiaBrake {
    /// No pause.
    #[must_use]
    pub fn new() -> Self {
        Self {
            clock: DefaultClock::default(),
            origin: Instant::now(),
            paused_until: AtomicU64::new(0),
        }
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

    /// Pauses every upstream call for `wait` (capped at the quota's `max_backoff`); a longer
    /// pause wins.
    pub fn pause(&self, quota: &BudgetQuota, wait: Duration) {
        let wait = wait.min(quota.values.max_backoff);
        let until = self
            .now_nanos()
            .saturating_add(u64::try_from(wait.as_nanos()).unwrap_or(u64::MAX));
        self.paused_until.fetch_max(until, Ordering::AcqRel);
    }

    /// Takes one call's worth of `quota`, waiting up to its `max_wait`; refused at once
    /// while Diia's pause lasts.
    pub async fn acquire(&self, quota: &BudgetQuota) -> Result<(), GatewayError> {
        let started = Instant::now();
        loop {
            if let Some(retry_after) = self.paused_for() {
                return Err(GatewayError::DiiaBackoff { retry_after });
            }
            let wait = match quota.limiter.check() {
                Ok(()) => return Ok(()),
                Err(not_until) => not_until.wait_time_from(self.clock.now()),
            };
            if started.elapsed() + wait > quota.values.max_wait {
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
        let quota = BudgetQuota::new(&DiiaLimitConfig::default());
        let brake = DiiaBrake::new();
        assert!(brake.acquire(&quota).await.is_ok());
        brake.pause(&quota, Duration::from_secs(5));
        brake.pause(&quota, Duration::from_secs(1));
        let paused = brake.paused_for().expect("paused");
        assert!(paused > Duration::from_secs(4));
        assert!(matches!(
            brake.acquire(&quota).await,
            Err(GatewayError::DiiaBackoff { .. })
        ));
    }
}
