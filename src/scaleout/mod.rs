//! Scale-out: N gateway instances act as one toward Diia through one Redis primary.
//!
//! What is shared: the Diia budget (GCRA on Redis's clock) and Diia's brake, stored
//! answers, the lease that makes one instance the leader for a key (coalescing across
//! instances, sharing replay, session tokens), and the live instance count. What stays
//! local: the near cache in front of Redis, per-branch and per-client limits (at quota / N,
//! so abuse protection costs no round trip), the breaker.
//!
//! Redis down fails no identification: the first error marks it down, every instance runs
//! on its local state (budget at rate / N, local coalescing) until the probe finds Redis
//! again. Sharing requests are the exception, because "never a second consent push"
//! outranks "degraded, never failed": on fleet state it cannot read (Redis stalled or down,
//! a value that does not open) an instance never sends one; it retries the lookup for up
//! to `scaleout.sharing_wait`, then answers `503 sharing_unavailable` unless its near
//! cache holds the outcome. A lookup whose reply a stall outlived may still run and take the
//! lease: the same claim's next lookup leads, and a claim given up without leading frees
//! the lease behind it (`Scaleout::abandon`), so no lease is left that nobody owns.
//!
//! Keys are MACs under the fleet secret and values are sealed with it ([`secret`]): Redis
//! never holds a barcode, requestId or token in clear. What Redis hands back is bounded,
//! never trusted: a value opens only under its key, its kind and its absolute expiry on
//! Redis's clock (a replayed or relabelled value is not served), Diia's brake is read for
//! at most `limits.diia.max_backoff`, a budget clock far ahead is reset, and only fleet
//! members signed under the secret count as instances.
//!
//! Layout: `budget` (the shared GCRA and Diia's brake), `membership` (the signed fleet set,
//! the heartbeat, and [`join_fleet`], the probe and heartbeat loop), `shared_cache` (the
//! lookup, the lease and the waiters: [`Scaleout::fetch`]), `sealed` (key names and sealed
//! values), [`link`] (the Redis connections), [`secret`] (subkeys, seals, signed members),
//! `scripts` (the Lua scripts), [`relay_routes`] (the callback relay's routes, so a callback
//! reaching one instance finds the route another recorded), [`relay_config`] (whether the
//! instances agree on what those routes mean), [`relay_pulls`] (the packages held for
//! pull-only branches and their acknowledgements, so a pull reaching any instance finds
//! them).

mod budget;
pub mod link;
mod membership;
pub mod relay_config;
pub mod relay_pulls;
pub mod relay_routes;
mod scripts;
mod sealed;
pub mod secret;
mod shared_cache;

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use crate::keys::Secret;
use crate::metrics::Metrics;
pub use budget::BudgetValues;
pub use link::{LinkError, RedisLink};
pub use membership::join_fleet;
pub use relay_config::{ConfigAgreement, ConfigFingerprint, watch_relay_config};
pub use relay_routes::{FoundRoute, MAX_ROUTE_BATCH, RouteClaim, RouteKey};
pub use secret::{FleetSecret, Members, Sealer};
pub use shared_cache::Shape;

/// `[scaleout]`, checked, with its files read.
#[derive(Debug, Clone, PartialEq)]
pub struct ScaleoutSettings {
    /// `redis://` or `rediss://` URL (without the password).
    pub redis_url: String,
    /// From `scaleout.redis_password_file`.
    pub redis_password: Option<Secret>,
    /// PEM trust roots for `rediss://`.
    pub redis_ca: Option<Vec<u8>>,
    /// The fleet secret.
    pub secret: FleetSecret,
    /// Per-command deadline.
    pub command_timeout: Duration,
    /// Connect deadline.
    pub connect_timeout: Duration,
    /// Probe period while Redis is down.
    pub probe_interval: Duration,
    /// Heartbeat period.
    pub heartbeat_interval: Duration,
    /// An instance silent this long is gone.
    pub instance_ttl: Duration,
    /// A leader's claim on a key (not sharing: those last as long as the barcode).
    pub lease: Duration,
    /// How long a sharing request retries a Redis that does not answer.
    pub sharing_wait: Duration,
}

/// The fleet side of one gateway instance.
pub struct Scaleout {
    link: Arc<RedisLink>,
    sealer: Sealer,
    members: Members,
    /// Names the callback relay's routes ([`relay_routes`]).
    route_mac: ring::hmac::Key,
    /// Fingerprints and signs the relay's routing config ([`relay_config`]).
    relay_config: relay_config::ConfigKeys,
    /// `scaleout.heartbeat_interval`: how often the relay config entry is refreshed.
    heartbeat_interval: Duration,
    /// Names the callback relay's pull copies ([`relay_pulls`]).
    pull_mac: ring::hmac::Key,
    lease: Duration,
    sharing_wait: Duration,
    instance: String,
    /// This instance's signed member in the fleet set, as last written.
    member: Mutex<Option<String>>,
    instance_ttl: Duration,
    probe_interval: Duration,
    connect_timeout: Duration,
    live: AtomicU32,
    /// Redis's clock minus `origin`'s age (ms), from the last heartbeat: stamps values
    /// sealed without a lookup's reading and this instance's fleet member.
    clock_offset: AtomicU64,
    origin: Instant,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Scaleout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Scaleout")
    }
}

impl Scaleout {
    /// The fleet side, not yet connected: the first probe and heartbeat come from the
    /// start-up loop ([`join_fleet`]), so a gateway starts with Redis down.
    pub fn new(settings: &ScaleoutSettings, metrics: Arc<Metrics>) -> Result<Self, LinkError> {
        let link = Arc::new(RedisLink::new(settings, Arc::clone(&metrics))?);
        metrics.set_instances(1);
        // Until Redis is heard from, its clock is taken to be this host's.
        let wall = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        Ok(Self {
            link,
            sealer: settings.secret.sealer(),
            members: settings.secret.members(),
            route_mac: relay_routes::route_mac_key(&settings.secret),
            relay_config: relay_config::ConfigKeys::new(&settings.secret),
            heartbeat_interval: settings.heartbeat_interval,
            pull_mac: relay_pulls::pull_mac_key(&settings.secret),
            lease: settings.lease,
            sharing_wait: settings.sharing_wait,
            instance: format!("{:016x}", fastrand::u64(..)),
            member: Mutex::new(None),
            instance_ttl: settings.instance_ttl,
            probe_interval: settings.probe_interval,
            connect_timeout: settings.connect_timeout,
            live: AtomicU32::new(1),
            clock_offset: AtomicU64::new(u64::try_from(wall.as_millis()).unwrap_or(0)),
            origin: Instant::now(),
            metrics,
        })
    }

    /// The Redis link.
    #[must_use]
    pub fn link(&self) -> &Arc<RedisLink> {
        &self.link
    }

    /// Redis's clock now, as last read by a heartbeat (ms).
    fn redis_now_ms(&self) -> u64 {
        let age = u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.clock_offset
            .load(Ordering::Relaxed)
            .saturating_add(age)
    }
}

/// An instance of a fleet whose Redis is never there (nothing listens on port 1), for the
/// unit tests of what it names and seals; and two fleet secrets.
#[cfg(test)]
pub(crate) mod test_fleet {
    #![allow(clippy::unwrap_used)]
    use std::sync::Arc;
    use std::time::Duration;

    use super::{FleetSecret, Scaleout, ScaleoutSettings};
    use crate::metrics::Metrics;

    pub(crate) const ONE: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
    pub(crate) const TWO: &str = "1f1e1d1c1b1a191817161514131211100f0e0d0c0b0a09080706050403020100";

    pub(crate) fn instance(secret: &str) -> Scaleout {
        let settings = ScaleoutSettings {
            redis_url: "redis://127.0.0.1:1".to_owned(),
            redis_password: None,
            redis_ca: None,
            secret: FleetSecret::parse(secret, "1").unwrap(),
            command_timeout: Duration::from_millis(25),
            connect_timeout: Duration::from_millis(25),
            probe_interval: Duration::from_millis(500),
            heartbeat_interval: Duration::from_secs(1),
            instance_ttl: Duration::from_secs(5),
            lease: Duration::from_secs(1),
            sharing_wait: Duration::from_millis(500),
        };
        Scaleout::new(&settings, Arc::new(Metrics::with_fleet(true))).unwrap()
    }
}
