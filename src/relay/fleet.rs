//! The relay across a gateway fleet (`[scaleout]` on): routes copied to Redis, so a
//! callback that reaches another instance than the one its consent push went through is
//! still delivered.
//!
//! - **One owner fleet-wide.** [`FleetRoutes::claim`] stores the route under a key named by
//!   a MAC of (acquirer, requestId) only if none is stored (one script), so two instances
//!   routing the same requestId agree on the first; a route naming another client or
//!   branch is [`Claim::Taken`] (the push is refused with 409 as for a local route).
//! - **Redis never holds a push back.** Down, slow (`scaleout.command_timeout`) or
//!   unreadable, the claim is [`Claim::Failed`]: counted
//!   (`relay_route_copies_total{result="failed"}`), logged, and the local route alone
//!   counts; the push proceeds.
//! - **Nothing in clear in Redis.** Keys are MACs under the fleet secret, values are sealed
//!   with it bound to their key (`scaleout::relay_routes`); TTL is `route_ttl`.
//! - **Either order.** Ingress adopts the fleet's route before storing a callback with no
//!   local route ([`FleetRoutes::adopt`]); a callback that arrived before any instance had
//!   recorded its route is an orphan, and [`FleetRoutes::sweep`] routes it once the route
//!   shows up in Redis. Each sweep looks up the next page of orphans in record order (a
//!   cursor that wraps after the newest), so every orphan is looked up within
//!   `ceil(orphans / SWEEP_BATCH)` sweeps however many wait.
//!
//! The pull side is shared by `super::fleet_pulls` (pull-only packages copied to Redis).

use std::collections::HashSet;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::sync::Notify;

use super::metrics::RelayMetrics;
use super::{CallbackStore, OrphanCursor, Route, RouteOutcome, StoreResult, now_ms};

/// How often local orphans are looked up in Redis.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(2);
/// Orphans looked up per sweep (one round trip).
pub const SWEEP_BATCH: usize = 512;

/// What [`SharedRoutes::claim`] found.
#[derive(Debug)]
pub enum Stored {
    /// Nothing was stored: this value (as stored) is the fleet's now.
    Claimed(Vec<u8>),
    /// A route was stored already: its plain bytes, and the value as stored.
    Held {
        /// The route's bytes.
        plain: Vec<u8>,
        /// The value as the shared store holds it.
        value: Vec<u8>,
    },
    /// A value that does not open under the fleet secret.
    Unreadable,
}

/// The fleet's shared store of routes, as the relay uses it: plain route bytes in, sealed
/// values and keyed names kept inside. Implemented over Redis by the runtime
/// (`crate::scaleout`'s relay routes), so the relay does not depend on the fleet's modules.
/// Every call is bounded by the fleet's command timeout; `None` means "did not answer".
pub trait SharedRoutes: Send + Sync {
    /// The name of `(acquirer, request_id)`'s entry (a MAC: neither part recoverable).
    fn key(&self, acquirer: &str, request_id: &str) -> String;

    /// Stores `plain` under `key` for `ttl` unless a route is stored there already.
    fn claim<'a>(
        &'a self,
        key: &'a str,
        plain: &'a [u8],
        ttl: Duration,
    ) -> BoxFuture<'a, Option<Stored>>;

    /// Replaces the stored value `held` with `plain` for `ttl`, only while it is still held;
    /// the value stored now (to give it back with), `None` when it was not replaced.
    fn refresh<'a>(
        &'a self,
        key: &'a str,
        held: &'a [u8],
        plain: &'a [u8],
        ttl: Duration,
    ) -> BoxFuture<'a, Option<Vec<u8>>>;

    /// Deletes `key` only while it holds exactly `value` (a claim given back).
    fn release<'a>(&'a self, key: &'a str, value: &'a [u8]) -> BoxFuture<'a, ()>;

    /// The routes under `keys` (at most [`SWEEP_BATCH`]), in order, with the life left on
    /// each; `None` for a key with nothing usable.
    #[allow(clippy::type_complexity)]
    fn find<'a>(
        &'a self,
        keys: &'a [String],
    ) -> BoxFuture<'a, Option<Vec<Option<(Vec<u8>, Duration)>>>>;
}

/// What the fleet said to a route about to be recorded locally.
#[derive(Debug)]
pub enum Claim {
    /// The route is the fleet's now (its key and value); [`FleetRoutes::release`] gives it
    /// back if the local store refuses it.
    Claimed(String, Vec<u8>),
    /// The fleet holds the same client and branch already (a retried push): its life is
    /// extended, and the value stored now is the refresh's (its key and value; `None`
    /// when the refresh did not take).
    Same(Option<(String, Vec<u8>)>),
    /// The fleet holds a route naming another client or branch: refuse the push.
    Taken,
    /// Redis down, slow, or holding a value that does not open: the local route alone
    /// counts.
    Failed,
}

/// The relay's fleet side: the shared routes of `[scaleout]` and the relay's counters.
pub struct FleetRoutes {
    fleet: Arc<dyn SharedRoutes>,
    metrics: Arc<RelayMetrics>,
    /// Where the next sweep's page of orphans starts (`None`: the oldest). A plain mutex:
    /// read and written between awaits, never held across one.
    sweep_from: Mutex<Option<OrphanCursor>>,
}

impl std::fmt::Debug for FleetRoutes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FleetRoutes")
    }
}

impl FleetRoutes {
    /// The relay's routes over `fleet`.
    #[must_use]
    pub fn new(fleet: Arc<dyn SharedRoutes>, metrics: Arc<RelayMetrics>) -> Self {
        Self {
            fleet,
            metrics,
            sweep_from: Mutex::new(None),
        }
    }

    /// Claims `(acquirer, request_id)` for `route` fleet-wide for `ttl` (one round trip,
    /// bounded by `scaleout.command_timeout`). Call before the local store records it.
    pub async fn claim(
        &self,
        acquirer: &str,
        request_id: &str,
        route: &Route,
        ttl: Duration,
    ) -> Claim {
        let Some(plain) = route.encode() else {
            return self.failed(acquirer, "route too large to encode");
        };
        let key = self.fleet.key(acquirer, request_id);
        match self.fleet.claim(&key, &plain, ttl).await {
            Some(Stored::Claimed(value)) => {
                self.metrics.route_copy("stored");
                Claim::Claimed(key, value)
            }
            Some(Stored::Held { plain: held, value }) => match Route::decode(&held) {
                Some(held) if same_owner(&held, route) => {
                    self.metrics.route_copy("same");
                    let stored = self.fleet.refresh(&key, &value, &plain, ttl).await;
                    Claim::Same(stored.map(|stored| (key, stored)))
                }
                Some(_) => {
                    self.metrics.route_copy("taken");
                    Claim::Taken
                }
                None => self.failed(acquirer, "stored route does not decode"),
            },
            Some(Stored::Unreadable) => self.failed(
                acquirer,
                "stored route does not open under the fleet secret",
            ),
            None => self.failed(acquirer, "Redis unavailable or too slow"),
        }
    }

    fn failed(&self, acquirer: &str, why: &'static str) -> Claim {
        self.metrics.route_copy("failed");
        tracing::warn!(
            %acquirer,
            error = why,
            "relay: route not copied to the fleet; the local route alone counts"
        );
        Claim::Failed
    }

    /// Gives back a claim the local store refused (best effort; it expires otherwise). A
    /// [`Claim::Same`] is kept: the route was the caller's before this push.
    pub async fn release(&self, claim: Claim) {
        if let Claim::Claimed(key, value) = claim {
            self.fleet.release(&key, &value).await;
        }
    }

    /// Gives back what a reservation's push claimed or refreshed (Diia did not accept the
    /// push), compare-and-delete: only while Redis still holds the value this push stored,
    /// so a route stored since by anyone else stays. Best effort: on failure the claim
    /// expires after `route_ttl`.
    pub async fn give_back(&self, claim: Claim) {
        match claim {
            Claim::Claimed(key, value) | Claim::Same(Some((key, value))) => {
                self.fleet.release(&key, &value).await;
            }
            Claim::Same(None) | Claim::Taken | Claim::Failed => {}
        }
    }

    /// The fleet's route for `(acquirer, request_id)` and the life left on it; `None` when
    /// there is none or Redis did not answer.
    pub async fn find(&self, acquirer: &str, request_id: &str) -> Option<(Route, Duration)> {
        let key = self.fleet.key(acquirer, request_id);
        let Some(found) = self.fleet.find(std::slice::from_ref(&key)).await else {
            self.metrics.route_lookup("failed", 1);
            return None;
        };
        let found = found
            .into_iter()
            .next()
            .flatten()
            .and_then(|(plain, left)| Some((Route::decode(&plain)?, left)));
        self.metrics
            .route_lookup(if found.is_some() { "found" } else { "missing" }, 1);
        found
    }

    /// Before ingress stores a callback: when the local store has no live route for it,
    /// the fleet's is recorded locally (so the callback is stored `pending` with it). A
    /// failure here changes nothing: the callback is stored as an orphan and swept later.
    pub async fn adopt(&self, store: &dyn CallbackStore, acquirer: &str, request_id: &str) {
        let now = now_ms();
        match store
            .route(acquirer.to_owned(), request_id.to_owned(), now)
            .await
        {
            Ok(Some(_)) => return,
            Ok(None) => {}
            Err(error) => {
                tracing::warn!(%acquirer, %error, "relay: local route lookup failed");
                return;
            }
        }
        let Some((route, left)) = self.find(acquirer, request_id).await else {
            return;
        };
        let recorded = store
            .record_route(acquirer.to_owned(), request_id.to_owned(), route, left, now)
            .await;
        match recorded {
            Ok(RouteOutcome::Recorded | RouteOutcome::Same) => {}
            Ok(RouteOutcome::Taken) => {
                tracing::warn!(%acquirer, "relay: the fleet's route differs from a local one; the local one kept");
            }
            Err(error) => {
                tracing::warn!(%acquirer, %error, "relay: the fleet's route not recorded locally");
            }
        }
    }

    /// One sweep: the next page of up to `limit` local orphans (after the last sweep's, from
    /// the oldest again once a page reached the newest) looked up in Redis (one round
    /// trip); those whose route is found become `pending`. Returns how many records were
    /// routed.
    pub async fn sweep_once(&self, store: &dyn CallbackStore, limit: usize) -> StoreResult<usize> {
        let from = self.sweep_from.lock().map_or(None, |from| *from);
        let page = store.orphans(from, limit.min(SWEEP_BATCH)).await?;
        if let Ok(mut from) = self.sweep_from.lock() {
            *from = page.next;
        }
        let mut seen = HashSet::new();
        let requests: Vec<(String, String)> = page
            .found
            .into_iter()
            .map(|orphan| (orphan.acquirer, orphan.request_id))
            .filter(|request| seen.insert(request.clone()))
            .collect();
        if requests.is_empty() {
            return Ok(0);
        }
        let keys: Vec<String> = requests
            .iter()
            .map(|(acquirer, request_id)| self.fleet.key(acquirer, request_id))
            .collect();
        let Some(found) = self.fleet.find(&keys).await else {
            self.metrics.route_lookup("failed", requests.len() as u64);
            return Ok(0);
        };
        let (mut routed, mut hits) = (0, 0u64);
        for ((acquirer, request_id), found) in requests.into_iter().zip(found) {
            let Some(route) = found.and_then(|(plain, _)| Route::decode(&plain)) else {
                continue;
            };
            hits += 1;
            let ids = store
                .route_orphans(acquirer.clone(), request_id, route, now_ms())
                .await?;
            if !ids.is_empty() {
                tracing::info!(%acquirer, records = ids.len(), "relay: orphans routed by the fleet's route");
            }
            routed += ids.len();
        }
        self.metrics.route_lookup("found", hits);
        self.metrics
            .route_lookup("missing", keys.len() as u64 - hits);
        Ok(routed)
    }

    /// Sweeps every [`SWEEP_INTERVAL`] until `closing`, waking waiting pulls when a sweep
    /// routed something.
    pub async fn sweep(
        self: Arc<Self>,
        store: Arc<dyn CallbackStore>,
        arrivals: Arc<Notify>,
        closing: impl Future<Output = ()>,
    ) {
        let mut closing = std::pin::pin!(closing);
        let mut tick = tokio::time::interval(SWEEP_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = &mut closing => return,
                _ = tick.tick() => {}
            }
            match self.sweep_once(store.as_ref(), SWEEP_BATCH).await {
                Ok(0) => {}
                Ok(_) => arrivals.notify_waiters(),
                Err(error) => tracing::warn!(%error, "relay: orphan sweep failed"),
            }
        }
    }
}

/// Whether `held` has the same owner as `ours` (the same branch, and the same client or
/// login, compared in constant time): as the local store decides it.
fn same_owner(held: &Route, ours: &Route) -> bool {
    held.same_owner(ours)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A shared store that never answers (Redis down).
    struct Down;

    impl SharedRoutes for Down {
        fn key(&self, acquirer: &str, request_id: &str) -> String {
            format!("{acquirer}:{request_id}")
        }
        fn claim<'a>(
            &'a self,
            _: &'a str,
            _: &'a [u8],
            _: Duration,
        ) -> BoxFuture<'a, Option<Stored>> {
            Box::pin(async { None })
        }
        fn refresh<'a>(
            &'a self,
            _: &'a str,
            _: &'a [u8],
            _: &'a [u8],
            _: Duration,
        ) -> BoxFuture<'a, Option<Vec<u8>>> {
            Box::pin(async { None })
        }
        fn release<'a>(&'a self, _: &'a str, _: &'a [u8]) -> BoxFuture<'a, ()> {
            Box::pin(async {})
        }
        fn find<'a>(
            &'a self,
            _: &'a [String],
        ) -> BoxFuture<'a, Option<Vec<Option<(Vec<u8>, Duration)>>>> {
            Box::pin(async { None })
        }
    }

    fn unreachable() -> (FleetRoutes, Arc<RelayMetrics>) {
        let metrics = Arc::new(RelayMetrics::register(
            &mut prometheus_client::registry::Registry::default(),
        ));
        (
            FleetRoutes::new(Arc::new(Down), Arc::clone(&metrics)),
            metrics,
        )
    }

    #[tokio::test]
    async fn redis_down_fails_the_copy_at_once_and_finds_nothing() {
        let (routes, _metrics) = unreachable();
        let route = Route {
            client: "key:abc".into(),
            branch: "b-1".into(),
            target: "t".into(),
            login: None,
        };
        let started = std::time::Instant::now();
        let claim = routes
            .claim("acquirer-1", "req-1", &route, Duration::from_secs(60))
            .await;
        assert!(matches!(claim, Claim::Failed), "{claim:?}");
        assert!(routes.find("acquirer-1", "req-1").await.is_none());
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn the_same_owner_is_the_same_client_and_branch_whatever_the_target() {
        let ours = Route {
            client: "key:abc".into(),
            branch: "b-1".into(),
            target: "t".into(),
            login: None,
        };
        let pull = Route {
            target: String::new(),
            ..ours.clone()
        };
        assert!(same_owner(&pull, &ours));
        let other_branch = Route {
            branch: "b-2".into(),
            ..ours.clone()
        };
        let other_client = Route {
            client: "key:abd".into(),
            ..ours.clone()
        };
        assert!(!same_owner(&other_branch, &ours) && !same_owner(&other_client, &ours));
    }
}
