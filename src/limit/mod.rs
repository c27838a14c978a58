//! Rate limits (governor): a budget per branch, checked first, and one gateway-wide budget
//! toward Diia for everything sent upstream, plus the brake Diia itself can pull.
//!
//! Per-branch keys are keyed 64-bit digests of the branch id (or client address), so a
//! check allocates nothing. The Diia budget waits a little for a token instead of failing
//! at once: a short queue smooths bursts without letting latency grow unbounded.
//!
//! Invariant: a budget rebuilt for new values (a fleet-size change, a reload) starts each
//! key where the old budget left it, scaled to the new quota: no change of quota ever
//! hands a spent key a fresh burst. (Client shares of the Diia budget are the exception:
//! they only divide the Diia budget, which is never refilled.)
//!
//! Here: the keyed budgets (per branch, client, login, poll; failures; unverified calls),
//! [`Limits`] and [`fleet_share`], a fleet instance's part of them. The Diia budget, each
//! client's share of it and Diia's brake live in `diia`.

mod diia;

use std::hash::{BuildHasher, Hasher};
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use http::HeaderValue;

use crate::config::{LimitsConfig, RateConfig, UnverifiedLimitConfig};
use crate::error::GatewayError;
pub use crate::error::LimitScope;
use crate::keys::CacheKey;
pub use diia::{BudgetQuota, DiiaBrake, KeyedShare, Share, Standing};

/// Who a keyed budget belongs to.
#[derive(Debug, Clone, Copy)]
pub enum Who<'a> {
    /// A branch id from the body or path.
    Branch(&'a str),
    /// A client address (IPv6 by its `limits.ipv6_prefix`).
    Address(IpAddr),
    /// A managed-mode API key's branch.
    Key(&'a str),
    /// A keyed digest made by the caller (a login's acquirer token and credentials).
    Digest(CacheKey),
}

impl Who<'_> {
    fn digest(self, hasher: &foldhash::quality::RandomState, ipv6_prefix: u8) -> u64 {
        let mut hasher = hasher.build_hasher();
        self.write(&mut hasher, ipv6_prefix);
        hasher.finish()
    }

    fn write(self, hasher: &mut impl Hasher, ipv6_prefix: u8) {
        match self {
            Self::Branch(id) => {
                hasher.write_u8(0);
                hasher.write(id.as_bytes());
            }
            Self::Address(ip) => match crate::client::aggregate(ip, ipv6_prefix) {
                IpAddr::V4(ip) => {
                    hasher.write_u8(4);
                    hasher.write(&ip.octets());
                }
                IpAddr::V6(ip) => {
                    hasher.write_u8(6);
                    hasher.write(&ip.octets());
                }
            },
            Self::Key(name) => {
                hasher.write_u8(1);
                hasher.write(name.as_bytes());
            }
            Self::Digest(key) => {
                hasher.write_u8(2);
                hasher.write(key.as_bytes());
            }
        }
    }
}

/// One GCRA cell. The state-information middleware lets a rebuilt budget read how much a
/// cell had left (governor has no other read access to a cell's state).
type Cell = RateLimiter<NotKeyed, InMemoryState, DefaultClock, StateInformationMiddleware>;

/// A full cell for `quota`.
fn full_cell(quota: Quota) -> Cell {
    RateLimiter::direct(quota).with_middleware::<StateInformationMiddleware>()
}

/// What is left of `old`'s burst, as a share carried to a new cell of `quota`. Reading
/// takes one call's worth from `old` (a retired cell; the read is the only way governor
/// offers); `None` when the new cell would be full anyway.
fn carried(old: &Cell, old_quota: Quota, quota: Quota) -> Option<Cell> {
    let remaining = match old.check() {
        Ok(snapshot) => snapshot.remaining_burst_capacity().saturating_add(1),
        Err(_) => 0,
    };
    let (old_burst, burst) = (old_quota.burst_size().get(), quota.burst_size().get());
    let kept = u64::from(remaining.min(old_burst)) * u64::from(burst) / u64::from(old_burst);
    let spent = NonZeroU32::new(burst - u32::try_from(kept).unwrap_or(burst).min(burst))?;
    let cell = full_cell(quota);
    let _ = cell.check_n(spent);
    Some(cell)
}

/// Carries every cell of `old` into `new` (see [`carried`]).
fn carry_cells(old: &Cells, old_quota: Quota, new: &Cells, quota: Quota) {
    for (key, cell) in old {
        if let Some(cell) = carried(&cell, old_quota, quota) {
            new.insert(*key, Arc::new(cell));
        }
    }
}

type Cells = moka::sync::Cache<u64, Arc<Cell>>;

/// GCRA cells by key digest: at most `max_tracked`, the longest-idle forgotten first, and
/// any idle for `idle` forgotten anyway.
fn cells(max_tracked: u64, idle: Duration) -> Cells {
    moka::sync::Cache::builder()
        .max_capacity(max_tracked.max(1))
        .eviction_policy(moka::policy::EvictionPolicy::lru())
        .time_to_idle(idle)
        .build()
}

/// One budget per key (a governor GCRA cell each), at most `max_tracked` keys: past that
/// the longest-idle key is forgotten first, and a key idle long enough for its budget to
/// be full again is forgotten anyway (forgetting it changes nothing).
pub struct KeyedBudget {
    cells: Cells,
    quota: Quota,
    hasher: foldhash::quality::RandomState,
    policy: HeaderValue,
    clock: DefaultClock,
    bucket: LimitScope,
    ipv6_prefix: u8,
    values: (RateConfig, u64, u8),
}

impl KeyedBudget {
    /// A budget of `rate` per key; builds its `RateLimit-Policy` header once.
    #[must_use]
    pub fn new(bucket: LimitScope, rate: RateConfig, max_tracked: u64) -> Self {
        let quota = Quota::per_minute(rate.per_minute).allow_burst(rate.burst);
        let policy =
            HeaderValue::try_from(format!("\"{}\";q={};w=60", bucket.name(), rate.per_minute))
                .unwrap_or_else(|_| HeaderValue::from_static("\"limit\""));
        // A cell untouched for one full replenish of its burst is as good as new.
        let refill = quota.replenish_interval() * rate.burst.get();
        Self {
            cells: cells(max_tracked, refill.max(Duration::from_secs(1))),
            quota,
            hasher: foldhash::quality::RandomState::default(),
            policy,
            clock: DefaultClock::default(),
            bucket,
            ipv6_prefix: 128,
            values: (rate, max_tracked, 128),
        }
    }

    /// The same budget counting IPv6 clients by `prefix` bits (128: each address alone).
    #[must_use]
    pub fn with_ipv6_prefix(mut self, prefix: u8) -> Self {
        self.ipv6_prefix = prefix;
        self.values.2 = prefix;
        self
    }

    /// Whether this budget was built from the same values (a reload keeps it then).
    #[must_use]
    pub fn same_values(&self, other: &Self) -> bool {
        self.values == other.values && self.bucket == other.bucket
    }

    /// Starts every key `old` tracks where it stood there, scaled to this budget's quota
    /// (a fleet-size change or a reload rebuilds budgets; neither may refill them). Keys
    /// are digests under `old`'s hasher, so this budget takes that hasher over; it must
    /// not have been used yet.
    pub fn carry_from(&mut self, old: &Self) {
        self.hasher = old.hasher.clone();
        carry_cells(&old.cells, old.quota, &self.cells, self.quota);
    }

    /// Spends one request of `who`'s budget, or says when to come back.
    pub fn check(&self, who: Who<'_>) -> Result<(), GatewayError> {
        self.spend(who.digest(&self.hasher, self.ipv6_prefix))
    }

    /// Spends one request of the budget of `who` for `tag` (a status poll's `requestId`):
    /// each tag of a client has a budget of its own.
    pub fn check_tagged(&self, who: Who<'_>, tag: &[u8]) -> Result<(), GatewayError> {
        let mut hasher = self.hasher.build_hasher();
        who.write(&mut hasher, self.ipv6_prefix);
        hasher.write(tag);
        self.spend(hasher.finish())
    }

    fn spend(&self, key: u64) -> Result<(), GatewayError> {
        let cell = self.cell(key);
        match cell.check() {
            Ok(_) => Ok(()),
            Err(not_until) => Err(GatewayError::RateLimited {
                scope: self.bucket,
                retry_after: not_until.wait_time_from(self.clock.now()),
                policy: self.policy.clone(),
            }),
        }
    }

    /// The cell of key digest `key`, created full on first use.
    fn cell(&self, key: u64) -> Arc<Cell> {
        // `get` first: `get_with` boxes the key even when it is present (an allocation
        // per request on the hot path).
        self.cells
            .get(&key)
            .unwrap_or_else(|| self.cells.get_with(key, || Arc::new(full_cell(self.quota))))
    }

    /// Settles idle and over-cap evictions now (the cache does it lazily otherwise).
    pub fn run_pending_tasks(&self) {
        self.cells.run_pending_tasks();
    }

    /// Keys currently tracked.
    #[must_use]
    pub fn tracked(&self) -> u64 {
        self.cells.entry_count()
    }
}

/// A budget of failures per key: spent only when something failed (a login Diia
/// refused), and checked before trying without spending, so a key that works is never
/// refused because of others' failures. A GCRA kept by hand (a theoretical arrival time
/// per key): governor cannot test a cell without spending it.
pub struct FailureBudget {
    tats: moka::sync::Cache<u64, Arc<AtomicU64>>,
    origin: Instant,
    /// Nanoseconds one failure takes to be forgiven.
    interval: u64,
    burst: u32,
    hasher: foldhash::quality::RandomState,
    policy: HeaderValue,
    bucket: LimitScope,
    values: (RateConfig, u64),
}

impl FailureBudget {
    /// `rate.burst` failures at once per key, forgiven at `rate.per_minute`.
    #[must_use]
    pub fn new(bucket: LimitScope, rate: RateConfig, max_tracked: u64) -> Self {
        let interval = Duration::from_secs(60) / rate.per_minute.get();
        let policy =
            HeaderValue::try_from(format!("\"{}\";q={};w=60", bucket.name(), rate.per_minute))
                .unwrap_or_else(|_| HeaderValue::from_static("\"limit\""));
        let refill = interval * rate.burst.get();
        Self {
            tats: moka::sync::Cache::builder()
                .max_capacity(max_tracked.max(1))
                .eviction_policy(moka::policy::EvictionPolicy::lru())
                .time_to_idle(refill.max(Duration::from_secs(1)))
                .build(),
            origin: Instant::now(),
            interval: u64::try_from(interval.as_nanos())
                .unwrap_or(u64::MAX)
                .max(1),
            burst: rate.burst.get(),
            hasher: foldhash::quality::RandomState::default(),
            policy,
            bucket,
            values: (rate, max_tracked),
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn limit(&self) -> u64 {
        self.interval.saturating_mul(u64::from(self.burst))
    }

    /// Refused while `who` has failed `burst` times recently; spends nothing.
    pub fn check(&self, who: Who<'_>) -> Result<(), GatewayError> {
        let Some(tat) = self.tats.get(&who.digest(&self.hasher, 128)) else {
            return Ok(());
        };
        // GCRA: `burst` failures at one instant put the arrival time `burst` intervals
        // ahead; one more try is allowed while it is at most `burst - 1` ahead.
        let tolerance = self.limit().saturating_sub(self.interval);
        let ahead = tat.load(Ordering::Acquire).saturating_sub(self.now());
        if ahead <= tolerance {
            return Ok(());
        }
        // Until the oldest failure is forgiven.
        let wait = ahead - tolerance;
        Err(GatewayError::RateLimited {
            scope: self.bucket,
            retry_after: Duration::from_nanos(wait),
            policy: self.policy.clone(),
        })
    }

    /// Counts one failure of `who`.
    pub fn fail(&self, who: Who<'_>) {
        let tat = self.tats.get_with(who.digest(&self.hasher, 128), || {
            Arc::new(AtomicU64::new(0))
        });
        self.add(&tat, 1);
    }

    /// Adds `failures` to a key's arrival time, never further ahead than the burst.
    fn add(&self, tat: &AtomicU64, failures: u64) {
        let now = self.now();
        let step = self.interval.saturating_mul(failures);
        let _ = tat.fetch_update(Ordering::AcqRel, Ordering::Acquire, |tat| {
            Some(
                tat.max(now)
                    .saturating_add(step)
                    .min(now.saturating_add(self.limit())),
            )
        });
    }

    /// Whether this budget was built from the same values (a reload keeps it then).
    #[must_use]
    pub fn same_values(&self, other: &Self) -> bool {
        self.values == other.values && self.bucket == other.bucket
    }

    /// Starts every key `old` tracks with the failures it holds there, scaled to this
    /// budget's burst (see [`KeyedBudget::carry_from`]).
    pub fn carry_from(&mut self, old: &Self) {
        self.hasher = old.hasher.clone();
        let now = old.now();
        for (key, tat) in &old.tats {
            let ahead = tat.load(Ordering::Acquire).saturating_sub(now);
            // Failures outstanding, rounded up, scaled to this burst.
            let held = ahead.div_ceil(old.interval).min(u64::from(old.burst));
            let failures = (held * u64::from(self.burst)).div_ceil(u64::from(old.burst));
            if failures > 0 {
                let cell = Arc::new(AtomicU64::new(0));
                self.add(&cell, failures);
                self.tats.insert(*key, cell);
            }
        }
    }

    /// Settles idle and over-cap evictions now.
    pub fn run_pending_tasks(&self) {
        self.tats.run_pending_tasks();
    }
}

/// The budget for Diia calls carrying a session token Diia has not accepted yet: one
/// for all clients, apart from (and never spending) the Diia budget, so junk tokens from
/// any number of addresses reach Diia at this rate at most.
pub struct UnverifiedBudget {
    cell: Cell,
    quota: Quota,
    clock: DefaultClock,
    values: UnverifiedLimitConfig,
}

impl UnverifiedBudget {
    /// A full budget.
    #[must_use]
    pub fn new(config: UnverifiedLimitConfig) -> Self {
        let quota = Quota::per_second(config.per_second).allow_burst(config.burst);
        Self {
            cell: full_cell(quota),
            quota,
            clock: DefaultClock::default(),
            values: config,
        }
    }

    /// Spends one call, or 503 `unverified_budget_exhausted` with when to come back.
    pub fn spend(&self) -> Result<(), GatewayError> {
        match self.cell.check() {
            Ok(_) => Ok(()),
            Err(not_until) => Err(GatewayError::UnverifiedBudgetExhausted {
                retry_after: not_until.wait_time_from(self.clock.now()),
            }),
        }
    }

    /// This budget, started where `old` stood (scaled).
    #[must_use]
    fn carried_from(self, old: &Self) -> Self {
        match carried(&old.cell, old.quota, self.quota) {
            Some(cell) => Self { cell, ..self },
            None => self,
        }
    }
}

/// 1/`fleet` of every local rate (rounded up, at least 1): with scale-out, each instance
/// enforces its share locally, so abuse protection costs no round trip.
#[must_use]
pub fn fleet_share(config: &LimitsConfig, fleet: u32) -> LimitsConfig {
    let part = |n: std::num::NonZeroU32| {
        std::num::NonZeroU32::new(n.get().div_ceil(fleet)).unwrap_or(std::num::NonZeroU32::MIN)
    };
    let mut share = config.clone();
    share.branch.per_minute = part(config.branch.per_minute);
    share.branch.burst = part(config.branch.burst);
    share.client.per_minute = part(config.client.per_minute);
    share.client.burst = part(config.client.burst);
    share.login.per_minute = part(config.login.per_minute);
    share.login.burst = part(config.login.burst);
    share.poll.per_minute = part(config.poll.per_minute);
    share.poll.burst = part(config.poll.burst);
    share.diia.per_second = part(config.diia.per_second);
    share.diia.burst = part(config.diia.burst);
    share.unverified.per_second = part(config.unverified.per_second);
    share.unverified.burst = part(config.unverified.burst);
    share
}

/// Every keyed budget of one config snapshot.
pub struct Limits {
    /// Per branch.
    pub branches: Arc<KeyedBudget>,
    /// Per client.
    pub clients: Arc<KeyedBudget>,
    /// Per (acquirer token, credentials): logins Diia refused.
    pub logins: Arc<FailureBudget>,
    /// Per (client, `requestId`), status polls.
    pub polls: Arc<KeyedBudget>,
    /// Per client, its share of the Diia budget (absent when the share is the whole).
    pub diia_shares: Option<Arc<KeyedShare>>,
    /// Diia calls with a session token Diia has not accepted yet, all clients together.
    pub unverified: Arc<UnverifiedBudget>,
}

impl Limits {
    /// Builds every budget from `[limits]`.
    #[must_use]
    pub fn new(config: &LimitsConfig) -> Self {
        let keyed = |bucket, rate| {
            Arc::new(
                KeyedBudget::new(bucket, rate, config.max_tracked)
                    .with_ipv6_prefix(config.ipv6_prefix),
            )
        };
        let client = RateConfig {
            per_minute: config.client.per_minute,
            burst: config.client.burst,
        };
        Self {
            branches: keyed(LimitScope::Branch, config.branch.into()),
            clients: keyed(LimitScope::Client, client),
            logins: Arc::new(FailureBudget::new(
                LimitScope::Login,
                config.login.into(),
                config.max_tracked,
            )),
            polls: keyed(LimitScope::Poll, config.poll.into()),
            diia_shares: KeyedShare::new(
                &config.diia,
                config.client.diia_share,
                config.max_tracked,
                config.ipv6_prefix,
            )
            .map(Arc::new),
            unverified: Arc::new(UnverifiedBudget::new(config.unverified)),
        }
    }

    /// Keeps the old budgets (and their state) where the values did not change; where
    /// they did, the new budget starts where the old one stood, scaled to the new quota.
    #[must_use]
    pub fn carry_over(mut self, old: &Limits) -> Self {
        for (new, old) in [
            (&mut self.branches, &old.branches),
            (&mut self.clients, &old.clients),
            (&mut self.polls, &old.polls),
        ] {
            if new.same_values(old) {
                *new = Arc::clone(old);
            } else if let Some(fresh) = Arc::get_mut(new) {
                fresh.carry_from(old);
            }
        }
        if self.logins.same_values(&old.logins) {
            self.logins = Arc::clone(&old.logins);
        } else if let Some(fresh) = Arc::get_mut(&mut self.logins) {
            fresh.carry_from(&old.logins);
        }
        // Client shares start afresh when their values change: they only divide the Diia
        // budget (which a rebuild never refills), and carrying spent shares into a fleet
        // of another size made the fleet's Diia calls uneven (the fleet budget test).
        if let (Some(new), Some(old)) = (&self.diia_shares, &old.diia_shares)
            && new.values == old.values
        {
            self.diia_shares = Some(Arc::clone(old));
        }
        if self.unverified.values == old.unverified.values {
            self.unverified = Arc::clone(&old.unverified);
        } else if let Some(fresh) = Arc::into_inner(std::mem::replace(
            &mut self.unverified,
            Arc::clone(&old.unverified),
        )) {
            self.unverified = Arc::new(fresh.carried_from(&old.unverified));
        }
        self
    }

    /// Settles lazy evictions of every budget.
    pub fn run_pending_tasks(&self) {
        for budget in [&self.branches, &self.clients, &self.polls] {
            budget.run_pending_tasks();
        }
        self.logins.run_pending_tasks();
    }

    /// Branches tracked by the branch budget.
    #[must_use]
    pub fn tracked(&self) -> u64 {
        self.branches.tracked()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DiiaLimitConfig;

    #[test]
    fn keyed_budgets_are_per_key() {
        let budget = KeyedBudget::new(LimitScope::Branch, RateConfig::new(60, 2), 100);
        assert!(budget.check(Who::Branch("a")).is_ok());
        assert!(budget.check(Who::Branch("a")).is_ok());
        let err = budget
            .check(Who::Branch("a"))
            .expect_err("third is over budget");
        assert!(err.retry_after().expect("retry after") > Duration::ZERO);
        assert_eq!(err.code(), "branch_rate_limited");
        assert!(budget.check(Who::Branch("b")).is_ok());
        assert!(budget.check(Who::Address([127, 0, 0, 1].into())).is_ok());
    }

    #[test]
    fn tracked_keys_are_capped_oldest_idle_first() {
        let budget = KeyedBudget::new(LimitScope::Branch, RateConfig::new(60, 1), 100);
        budget.check(Who::Branch("first")).expect("fresh");
        for n in 0..1000 {
            budget.check(Who::Branch(&format!("b{n}"))).expect("fresh");
        }
        budget.run_pending_tasks();
        assert!(budget.tracked() <= 100, "{}", budget.tracked());
        // The oldest idle key was forgotten: it starts full again.
        assert!(budget.check(Who::Branch("first")).is_ok());
    }

    #[test]
    fn ipv6_clients_are_counted_by_prefix() {
        let budget =
            KeyedBudget::new(LimitScope::Client, RateConfig::new(60, 2), 100).with_ipv6_prefix(64);
        let one: IpAddr = "2001:db8:1:2::1".parse().expect("ip");
        let same_64: IpAddr = "2001:db8:1:2:ffff::9".parse().expect("ip");
        let other_64: IpAddr = "2001:db8:1:3::1".parse().expect("ip");
        budget.check(Who::Address(one)).expect("fresh");
        budget
            .check(Who::Address(same_64))
            .expect("second of the burst");
        assert!(
            budget.check(Who::Address(one)).is_err(),
            "one /64, one budget"
        );
        assert!(budget.check(Who::Address(other_64)).is_ok());
        let whole: IpAddr = "2001:db8::ff".parse().expect("ip");
        assert_eq!(
            crate::client::aggregate(whole, 0),
            IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)
        );
        assert_eq!(crate::client::aggregate(whole, 128), whole);
    }

    #[test]
    fn a_rebuilt_budget_starts_where_the_old_one_stood() {
        let old = KeyedBudget::new(LimitScope::Branch, RateConfig::new(1, 15), 100);
        for _ in 0..15 {
            old.check(Who::Branch("spent")).expect("within the burst");
        }
        for _ in 0..5 {
            old.check(Who::Branch("half")).expect("within the burst");
        }
        old.run_pending_tasks();
        let mut new = KeyedBudget::new(LimitScope::Branch, RateConfig::new(1, 30), 100);
        new.carry_from(&old);
        assert!(new.check(Who::Branch("spent")).is_err(), "no fresh burst");
        // 10 of 15 left scale to 20 of 30.
        let mut left = 0;
        while new.check(Who::Branch("half")).is_ok() {
            left += 1;
        }
        assert_eq!(left, 20);
        let mut fresh = 0;
        while new.check(Who::Branch("new")).is_ok() {
            fresh += 1;
        }
        assert_eq!(fresh, 30, "an untracked key starts full at the new quota");
    }

    #[test]
    fn failures_alone_spend_a_failure_budget() {
        let budget = FailureBudget::new(LimitScope::Login, RateConfig::new(1, 3), 100);
        let key = Who::Branch("credentials");
        for _ in 0..10 {
            budget.check(key).expect("successes spend nothing");
        }
        for _ in 0..3 {
            budget.check(key).expect("within the failures allowed");
            budget.fail(key);
        }
        let err = budget.check(key).expect_err("three failures");
        assert_eq!(err.code(), "login_rate_limited");
        assert!(err.retry_after().expect("retry after") <= Duration::from_secs(60));
        assert!(budget.check(Who::Branch("other")).is_ok());
        let mut carried = FailureBudget::new(LimitScope::Login, RateConfig::new(1, 6), 100);
        carried.carry_from(&budget);
        assert!(carried.check(key).is_err(), "carried over, scaled");
    }

    #[tokio::test]
    async fn pause_blocks_and_longer_pause_wins() {
        let quota = BudgetQuota::new(&DiiaLimitConfig::default());
        let brake = DiiaBrake::new();
        assert!(brake.acquire(&quota, None).await.is_ok());
        brake.pause(&quota, Duration::from_secs(5));
        brake.pause(&quota, Duration::from_secs(1));
        let paused = brake.paused_for().expect("paused");
        assert!(paused > Duration::from_secs(4));
        assert!(matches!(
            brake.acquire(&quota, None).await,
            Err(GatewayError::DiiaBackoff { .. })
        ));
    }
}
