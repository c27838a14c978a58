//! The Diia budget: one gateway-wide GCRA toward Diia, each client's share of it, and the
//! brake Diia itself can pull.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

use super::{Cell, Cells, Who, cells, full_cell};
use crate::config::DiiaLimitConfig;
use crate::error::GatewayError;

/// Each client's share of the Diia budget: a GCRA cell per client at `diia_share` of the
/// budget's rate and burst, so one client's flood leaves the rest for everyone else.
/// Enforced only while more than one client is calling Diia (seen in the last 10 s): a
/// lone client (one backend serving every branch) keeps the whole budget.
pub struct KeyedShare {
    cells: Cells,
    quota: Quota,
    hasher: foldhash::quality::RandomState,
    ipv6_prefix: u8,
    pub(super) values: (u32, u32, u64, u8),
}

impl KeyedShare {
    pub(super) fn new(
        diia: &DiiaLimitConfig,
        share: f64,
        max_tracked: u64,
        ipv6_prefix: u8,
    ) -> Option<Self> {
        if share >= 1.0 {
            return None;
        }
        let scale = |n: NonZeroU32| {
            let scaled = (f64::from(n.get()) * share).ceil();
            // `share` is in (0, 1): the product fits a u32 and is at least 1.
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            NonZeroU32::new(scaled as u32).unwrap_or(NonZeroU32::MIN)
        };
        let (rate, burst) = (scale(diia.per_second), scale(diia.burst));
        Some(Self {
            cells: cells(max_tracked, Duration::from_secs(10)),
            quota: Quota::per_second(rate).allow_burst(burst),
            hasher: foldhash::quality::RandomState::default(),
            ipv6_prefix,
            values: (rate.get(), burst.get(), max_tracked, ipv6_prefix),
        })
    }

    /// A client's share, for its next Diia call.
    #[must_use]
    pub fn share(self: &Arc<Self>, who: Who<'_>) -> Share {
        let entry = self
            .cells
            .entry(who.digest(&self.hasher, self.ipv6_prefix))
            .or_insert_with(|| Arc::new(full_cell(self.quota)));
        if entry.is_fresh() {
            // A new client: count it now, not at the cache's next housekeeping.
            self.cells.run_pending_tasks();
        }
        Share {
            cell: entry.into_value(),
            shares: Arc::clone(self),
        }
    }

    /// Whether more than one client calls Diia now.
    fn contended(&self) -> bool {
        self.cells.entry_count() >= 2
    }
}

/// Where a client stands against its share of the Diia budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// Within its share.
    Within,
    /// Past it, let through because no other client calls Diia now. In scale-out mode such
    /// a call queues only half as deep in the fleet's budget, so a client that shows up
    /// finds room before the longest wait.
    Alone,
    /// Past it while others call Diia: it waits for its share.
    Over,
}

/// One client's share of the Diia budget. Always spent, so that a client that had the
/// budget to itself is already at its share when a second client shows up; only enforced
/// while the budget is contended.
pub struct Share {
    cell: Arc<Cell>,
    shares: Arc<KeyedShare>,
}

impl std::fmt::Debug for Share {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Share")
    }
}

impl Share {
    /// Takes from the share without waiting, and says where the client stands.
    #[must_use]
    pub fn standing(&self) -> Standing {
        match self.cell.check() {
            Ok(_) => Standing::Within,
            Err(_) if !self.shares.contended() => Standing::Alone,
            Err(_) => Standing::Over,
        }
    }

    /// Takes from the share: `Ok(true)` within it, `Ok(false)` past it while this client
    /// is alone (let through), otherwise how long until it has room.
    fn take(&self, clock: &DefaultClock) -> Result<bool, Duration> {
        match self.cell.check() {
            Ok(_) => Ok(true),
            Err(_) if !self.shares.contended() => Ok(false),
            Err(not_until) => Err(not_until.wait_time_from(clock.now())),
        }
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

    /// A budget for these values with its burst already spent: calls go at the sustained
    /// rate from the first one. Scale-out uses it when an instance takes over its share
    /// locally (Redis down), so the switch adds no burst on top of the fleet's.
    #[must_use]
    pub fn empty(config: &DiiaLimitConfig) -> Self {
        let budget = Self::new(config);
        let _ = budget.limiter.check_n(config.burst);
        budget
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
    ///
    /// With `share` (the calling client's [`Share`]), the client's own share is taken
    /// first, within the same wait: a client past its share waits for its share, not
    /// ahead of everyone else in the common queue.
    pub async fn acquire(
        &self,
        quota: &BudgetQuota,
        share: Option<&Share>,
    ) -> Result<(), GatewayError> {
        let started = Instant::now();
        // Let through past its share only because it was alone: if another client shows
        // up while this one waits in the common queue, it goes back to waiting for its
        // share instead of taking the newcomer's turn.
        let mut unearned = false;
        if let Some(share) = share {
            self.wait_for(started, quota, || {
                unearned = !share.take(&self.clock)?;
                Ok(())
            })
            .await?;
        }
        self.wait_for(started, quota, || {
            if let Some(share) = share.filter(|_| unearned) {
                unearned = !share.take(&self.clock)?;
            }
            quota
                .limiter
                .check()
                .map_err(|not_until| not_until.wait_time_from(self.clock.now()))
        })
        .await
    }

    /// Scale-out: the calling client's share alone (the fleet's budget is in Redis),
    /// waiting up to the quota's `max_wait`; `Ok(true)` when the client was let through
    /// past its share only because it is alone.
    pub async fn acquire_share(
        &self,
        quota: &BudgetQuota,
        share: &Share,
    ) -> Result<bool, GatewayError> {
        let mut alone = false;
        self.wait_for(Instant::now(), quota, || {
            alone = !share.take(&self.clock)?;
            Ok(())
        })
        .await?;
        Ok(alone)
    }

    /// Retries `take` until it succeeds, Diia's pause refuses, or the wait would pass
    /// the quota's `max_wait` since `started`.
    async fn wait_for(
        &self,
        started: Instant,
        quota: &BudgetQuota,
        mut take: impl FnMut() -> Result<(), Duration>,
    ) -> Result<(), GatewayError> {
        loop {
            if let Some(retry_after) = self.paused_for() {
                return Err(GatewayError::DiiaBackoff { retry_after });
            }
            let Err(wait) = take() else {
                return Ok(());
            };
            if started.elapsed() + wait > quota.values.max_wait {
                return Err(GatewayError::DiiaBudgetExhausted { retry_after: wait });
            }
            tokio::time::sleep(wait).await;
        }
    }
}
