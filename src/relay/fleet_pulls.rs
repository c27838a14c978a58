//! The relay's pull side across a gateway fleet (`[scaleout]` on): packages held for
//! pull-only branches are copied to Redis, so a branch's pull that a load balancer sends to
//! another instance than the one Diia posted the callback to still finds its package.
//!
//! Invariants kept here:
//! - **The local record stays the durable one.** The copy is made when the delivery worker
//!   holds a pull-only record for the pull side ([`FleetPulls::copy`]: every pull-only
//!   record passes there once it is routed, whether it arrived routed, was routed by the
//!   fleet's route at ingress, or was an orphan routed later), after the record is
//!   committed. A copy larger than the cap, or one Redis does not take within
//!   `scaleout.command_timeout`, is skipped (counted in
//!   `relay_pull_copies_total{result}`, logged without ids); the package is then pulled
//!   from the instance holding it only.
//! - **Only the caller its route names.** A copy holds the SHA-256 of the route's client
//!   inside its seal; a pull compares it in constant time, and anyone else gets the same
//!   `None` (404) as for no package, after the same wait.
//! - **One acknowledgement settles everywhere.** A pull acknowledged on an instance that
//!   does not hold the record removes the copy and leaves a sealed acknowledgement marker
//!   (`max_age`); the holding instance checks the markers of the records it copied every
//!   [`SWEEP_INTERVAL`] (one round trip per [`MARK_BATCH`]) and settles them delivered, and
//!   checks a record's marker before handing it to a local pull, so an acknowledged package
//!   is not served again. A record re-leased after a restart (its list of copied records
//!   lost) is settled by its marker when the delivery worker holds it again (at the latest
//!   at `max_age`), instead of going dead.
//! - **Nothing in clear in Redis.** Names are MACs under the fleet secret, values and
//!   markers are sealed with it bound to their names (`scaleout::relay_pulls`), and live at
//!   most `max_age`.

use std::collections::BTreeMap;
use std::future::Future;
use std::ops::Bound;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::fleet::SWEEP_INTERVAL;
use super::metrics::RelayMetrics;
use super::{CallbackStore, Envelope, Leased, Owner, RecordId, State, now_ms};

/// The largest body copied to Redis (a larger package is pulled from its instance only):
/// Redis holds every copy in memory until it is acknowledged or `max_age` passes.
pub const PULL_COPY_MAX: usize = 8 * 1024 * 1024;
/// Markers looked up per round trip by the holding instance's sweep.
pub const MARK_BATCH: usize = 512;
/// Most copied records an instance watches for acknowledgements; beyond, a record is
/// settled by its marker only when a local pull or the delivery worker meets it.
const MAX_HELD: usize = 100_000;
/// Pending records listed per page when watching again after a start.
const REWATCH_PAGE: usize = 500;

/// What [`SharedPulls::put`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PullPut {
    /// Stored.
    Stored,
    /// Not stored: Redis down or too slow, or the value could not be sealed.
    Failed,
    /// Not stored: the request was erased after the record arrived.
    Erased,
}

/// A request's copies as listed: `(field, plain)` for each value that opened.
pub type Listed = Vec<(String, Vec<u8>)>;

/// The fleet's store of pull copies, as the relay uses it: plain bytes in, sealed values
/// and keyed names kept inside. Implemented over Redis by the runtime
/// (`crate::scaleout`'s relay pulls), so the relay does not depend on the fleet's modules.
/// Every call is bounded by the fleet's command timeout.
pub trait SharedPulls: Send + Sync {
    /// The name of `(acquirer, request_id)`'s copies (a MAC: neither part recoverable).
    fn key(&self, acquirer: &str, request_id: &str) -> String;

    /// The name of record `id` among its request's copies and of its marker (a MAC).
    fn field(&self, id: RecordId) -> String;

    /// Stores `plain` as record `field` of `key` for `ttl`, unless the request was erased
    /// at or after `received_ms` ([`SharedPulls::mark_erased`]).
    fn put<'a>(
        &'a self,
        key: &'a str,
        field: &'a str,
        plain: &'a [u8],
        ttl: Duration,
        received_ms: u64,
    ) -> BoxFuture<'a, PullPut>;

    /// Marks the request of `key` erased now, for `ttl`: a later [`SharedPulls::put`] of a
    /// record that arrived before is refused. `false` when Redis did not answer.
    fn mark_erased<'a>(&'a self, key: &'a str, ttl: Duration) -> BoxFuture<'a, bool>;

    /// The records of `key` that open, as `(field, plain)`; `None`: Redis did not answer.
    fn list<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Option<Listed>>;

    /// Removes record `field` of `key` and sets its marker for `ttl`; `false` when Redis
    /// did not answer.
    fn ack<'a>(&'a self, key: &'a str, field: &'a str, ttl: Duration) -> BoxFuture<'a, bool>;

    /// Whether each field's marker is set (at most [`MARK_BATCH`]); `None`: no answer.
    fn acked<'a>(&'a self, fields: &'a [String]) -> BoxFuture<'a, Option<Vec<bool>>>;
}

/// A copy's plain bytes (sealed by the fleet side): record id, arrival, the SHA-256 of the
/// route's client and of its login when it has one, the branch, and the callback as Diia
/// sent it.
struct Copy {
    id: RecordId,
    received_ms: u64,
    client: [u8; 32],
    login: Option<[u8; 32]>,
    envelope: Envelope,
}

impl Copy {
    fn encode(record: &Leased) -> Option<Vec<u8>> {
        let client: [u8; 32] = Sha256::digest(record.route.client.as_bytes()).into();
        let branch = record.route.branch.as_bytes();
        let envelope = record.envelope.encode()?;
        let mut out = Vec::with_capacity(16 + 8 + 65 + 4 + branch.len() + envelope.len());
        out.extend_from_slice(&record.id.0);
        out.extend_from_slice(&record.received_ms.to_be_bytes());
        out.extend_from_slice(&client);
        match &record.route.login {
            Some(login) => {
                out.push(1);
                out.extend_from_slice(&Sha256::digest(login.as_bytes()));
            }
            None => out.push(0),
        }
        out.extend_from_slice(&u32::try_from(branch.len()).ok()?.to_be_bytes());
        out.extend_from_slice(branch);
        out.extend_from_slice(&envelope);
        Some(out)
    }

    fn decode(plain: &[u8]) -> Option<Self> {
        let (id, rest) = plain.split_first_chunk::<16>()?;
        let (received, rest) = rest.split_first_chunk::<8>()?;
        let (client, rest) = rest.split_first_chunk::<32>()?;
        let (flag, rest) = rest.split_first()?;
        let (login, rest) = match flag {
            0 => (None, rest),
            1 => {
                let (login, rest) = rest.split_first_chunk::<32>()?;
                (Some(*login), rest)
            }
            _ => return None,
        };
        let (branch_len, rest) = rest.split_first_chunk::<4>()?;
        let branch_len = usize::try_from(u32::from_be_bytes(*branch_len)).ok()?;
        let envelope = Envelope::decode(rest.get(branch_len..)?)?;
        Some(Self {
            id: RecordId(*id),
            received_ms: u64::from_be_bytes(*received),
            client: *client,
            login,
            envelope,
        })
    }

    /// Whether `owner` is the route's caller, by its client or by the login the route
    /// names ([`Owner`]; SHA-256 digests compared in constant time).
    fn names(&self, owner: &Owner) -> bool {
        let client: [u8; 32] = Sha256::digest(owner.client.as_bytes()).into();
        let by_client: bool = self.client.ct_eq(&client).into();
        let by_login = match (&self.login, &owner.login) {
            (Some(ours), Some(theirs)) => {
                let theirs: [u8; 32] = Sha256::digest(theirs.as_bytes()).into();
                ours.ct_eq(&theirs).into()
            }
            _ => false,
        };
        by_client | by_login
    }
}

/// A record this instance copied and still holds: what settling it by its marker takes.
struct Held {
    acquirer: String,
    request_id: String,
    owner: Owner,
    /// Past this (ms since the epoch) the copy is gone and the record is the worker's.
    until_ms: u64,
}

/// The relay's shared pull side: copies, remote pulls and acknowledgements.
pub struct FleetPulls {
    shared: Arc<dyn SharedPulls>,
    metrics: Arc<RelayMetrics>,
    /// How long a marker lives (`callback_relay.max_age`: no record is held longer).
    max_age: Duration,
    /// Bodies larger than this are not copied.
    max_copy: usize,
    /// Records copied and held here, by id, and where the last sweep stopped. A `Mutex`
    /// held only to insert, remove or copy out one batch, never across an await.
    held: Mutex<(BTreeMap<RecordId, Held>, Option<RecordId>)>,
    /// The configured acquirers' names: an erase without one covers them all.
    acquirers: Vec<String>,
}

impl std::fmt::Debug for FleetPulls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FleetPulls")
    }
}

impl FleetPulls {
    /// The pull side over `shared`: markers live `max_age`, bodies above `max_copy` stay
    /// local.
    #[must_use]
    pub fn new(
        shared: Arc<dyn SharedPulls>,
        metrics: Arc<RelayMetrics>,
        max_age: Duration,
        max_copy: usize,
        acquirers: Vec<String>,
    ) -> Self {
        Self {
            shared,
            metrics,
            max_age,
            max_copy,
            acquirers,
            held: Mutex::new((BTreeMap::new(), None)),
        }
    }

    /// Copies a pull-only record the delivery worker holds until `until_ms` to Redis (one
    /// round trip, bounded by `scaleout.command_timeout`). Never fails the hold: a copy
    /// skipped or not stored is counted and logged, and the local record still serves.
    /// `true` when the request was erased (on any instance) after the record arrived: not
    /// copied, and the record is to be settled.
    pub async fn copy(&self, record: &Leased, until_ms: u64) -> bool {
        let left = until_ms.saturating_sub(now_ms());
        if left == 0 {
            return false;
        }
        if record.envelope.body.len() > self.max_copy {
            self.metrics.pull_copy("skipped");
            tracing::info!(acquirer = %record.acquirer, size = record.envelope.body.len(), "relay: package too large to copy to the fleet; pulled from this instance only");
            return false;
        }
        let Some(plain) = Copy::encode(record) else {
            self.metrics.pull_copy("skipped");
            return false;
        };
        let key = self
            .shared
            .key(&record.acquirer, &record.envelope.request_id);
        let field = self.shared.field(record.id);
        let put = self
            .shared
            .put(
                &key,
                &field,
                &plain,
                Duration::from_millis(left),
                record.received_ms,
            )
            .await;
        match put {
            PullPut::Stored => {}
            PullPut::Erased => {
                tracing::info!(record = %record.id, acquirer = %record.acquirer, "relay: package erased by an admin on another instance before it was copied; settled");
                return true;
            }
            PullPut::Failed => {
                self.metrics.pull_copy("failed");
                tracing::warn!(acquirer = %record.acquirer, "relay: package not copied to the fleet (Redis unavailable or too slow); pulled from this instance only");
                return false;
            }
        }
        self.metrics.pull_copy("stored");
        if let Ok(mut held) = self.held.lock()
            && held.0.len() < MAX_HELD
        {
            held.0.insert(
                record.id,
                Held {
                    acquirer: record.acquirer.clone(),
                    request_id: record.envelope.request_id.clone(),
                    owner: Owner {
                        client: record.route.client.clone(),
                        login: record.route.login.clone(),
                    },
                    until_ms,
                },
            );
        }
        false
    }

    /// Whether record `id` was acknowledged on another instance (its marker is set);
    /// `false` when Redis does not answer (the local record then serves: at least once).
    pub async fn acked_elsewhere(&self, id: RecordId) -> bool {
        let field = [self.shared.field(id)];
        let acked = self
            .shared
            .acked(&field)
            .await
            .is_some_and(|marks| marks.first().copied().unwrap_or(false));
        if acked {
            self.metrics.remote_pull("settled", 1);
        }
        acked
    }

    /// The caller's oldest package among the request's copies (those of this instance's
    /// records included), as `(id, received_ms, envelope)`; `None` for none, for another
    /// caller's, and when Redis does not answer. Count it with [`FleetPulls::served`] when
    /// it is the one handed out.
    pub async fn find(
        &self,
        acquirer: &str,
        request_id: &str,
        owner: &Owner,
    ) -> Option<(RecordId, u64, Envelope)> {
        let found = self.oldest(acquirer, request_id, owner, None).await?;
        found.map(|copy| (copy.id, copy.received_ms, copy.envelope))
    }

    /// Counts a package served from its copy.
    pub fn served(&self) {
        self.metrics.remote_pull("served", 1);
    }

    /// Acknowledges the caller's copy `id` (or its oldest) of the request: the copy is
    /// removed and its marker set, so the holding instance settles it. `Some(false)` when
    /// the caller has no such copy, `None` when Redis does not answer.
    pub async fn ack(
        &self,
        acquirer: &str,
        request_id: &str,
        owner: &Owner,
        id: Option<RecordId>,
    ) -> Option<bool> {
        let Some(copy) = self.oldest(acquirer, request_id, owner, id).await? else {
            return Some(false);
        };
        let key = self.shared.key(acquirer, request_id);
        let field = self.shared.field(copy.id);
        if !self.shared.ack(&key, &field, self.max_age).await {
            self.metrics.remote_pull("failed", 1);
            return None;
        }
        self.metrics.remote_pull("acked", 1);
        Some(true)
    }

    /// Erase by requestId (the admin's `POST /relay/erase`), for `acquirer` or every
    /// acquirer: the request is marked erased (for `max_age`), so an instance that copies
    /// one of its records later settles the record instead, then each copy of the request
    /// is removed and marked acknowledged, so the instance holding its record settles it
    /// (its payload deleted) at its next sweep. `false` when Redis did not answer for one
    /// of them (the operator retries).
    pub async fn erase(&self, acquirer: Option<&str>, request_id: &str) -> bool {
        let names: Vec<&str> = match acquirer {
            Some(name) => vec![name],
            None => self.acquirers.iter().map(String::as_str).collect(),
        };
        let mut all = true;
        for name in names {
            if let Ok(mut held) = self.held.lock() {
                held.0
                    .retain(|_, h| !(h.acquirer == name && h.request_id == request_id));
            }
            let key = self.shared.key(name, request_id);
            if !self.shared.mark_erased(&key, self.max_age).await {
                all = false;
                continue;
            }
            let Some(listed) = self.shared.list(&key).await else {
                all = false;
                continue;
            };
            for (field, _) in listed {
                all &= self.shared.ack(&key, &field, self.max_age).await;
            }
        }
        all
    }

    /// After a local acknowledgement or purge of record `id`: its copy removed and its
    /// marker set (so an instance holding it settles it), best effort; the record is no
    /// longer watched. `false` when Redis did not answer.
    pub async fn forget(&self, acquirer: &str, request_id: &str, id: RecordId) -> bool {
        if let Ok(mut held) = self.held.lock() {
            held.0.remove(&id);
        }
        let key = self.shared.key(acquirer, request_id);
        let field = self.shared.field(id);
        let removed = self.shared.ack(&key, &field, self.max_age).await;
        if !removed {
            tracing::warn!(%acquirer, "relay: a package's fleet copy was not removed; it expires with max_age");
        }
        removed
    }

    /// The caller's copy `id`, or its oldest when `id` is `None`; `Some(None)` for none,
    /// `None` when Redis does not answer.
    async fn oldest(
        &self,
        acquirer: &str,
        request_id: &str,
        owner: &Owner,
        id: Option<RecordId>,
    ) -> Option<Option<Copy>> {
        let key = self.shared.key(acquirer, request_id);
        let Some(listed) = self.shared.list(&key).await else {
            self.metrics.remote_pull("failed", 1);
            return None;
        };
        let mut best: Option<Copy> = None;
        for (field, plain) in listed {
            let Some(copy) = Copy::decode(&plain) else {
                continue;
            };
            // A value moved to another record's field does not open; this also holds when
            // the id inside was chosen by whoever sealed it (an instance).
            if field != self.shared.field(copy.id)
                || copy.envelope.request_id != request_id
                || id.is_some_and(|id| id != copy.id)
                || !copy.names(owner)
            {
                continue;
            }
            if best
                .as_ref()
                .is_none_or(|b| (copy.received_ms, copy.id) < (b.received_ms, b.id))
            {
                best = Some(copy);
            }
        }
        Some(best)
    }

    /// After a start: the pending pull-only records this instance holds are watched again
    /// (the watch list lives in memory), so one acknowledged through another instance
    /// before or after the restart is settled by its marker at the next sweep instead of
    /// keeping its payload until `max_age`. Pages through the store's pending records
    /// (metadata, then each record opened); a store error ends the pass, logged.
    pub async fn rewatch(&self, store: &dyn CallbackStore) -> usize {
        let mut after = None;
        let mut watched = 0;
        loop {
            let page = match store.list(State::Pending, after, REWATCH_PAGE).await {
                Ok(page) => page,
                Err(error) => {
                    tracing::warn!(%error, "relay: pending pull-only records not watched again after the start");
                    return watched;
                }
            };
            for meta in &page {
                let Ok(Some(opened)) = store.fetch(meta.id).await else {
                    continue;
                };
                let (Some(envelope), Some(route)) = (opened.envelope, opened.route) else {
                    continue;
                };
                if !route.is_pull() {
                    continue;
                }
                let until_ms = meta
                    .received_ms
                    .saturating_add(u64::try_from(self.max_age.as_millis()).unwrap_or(u64::MAX));
                let Ok(mut held) = self.held.lock() else {
                    return watched;
                };
                if held.0.len() >= MAX_HELD {
                    return watched;
                }
                held.0.insert(
                    meta.id,
                    Held {
                        acquirer: meta.acquirer.clone(),
                        request_id: envelope.request_id,
                        owner: Owner {
                            client: route.client,
                            login: route.login,
                        },
                        until_ms,
                    },
                );
                watched += 1;
            }
            if page.len() < REWATCH_PAGE {
                return watched;
            }
            after = page.last().map(|meta| meta.id);
        }
    }

    /// One sweep on the holding instance: the markers of up to [`MARK_BATCH`] copied
    /// records (one round trip, continuing where the last sweep stopped); those
    /// acknowledged elsewhere are settled delivered. Returns how many were settled.
    pub async fn settle_once(&self, store: &dyn CallbackStore) -> usize {
        let now = now_ms();
        let batch: Vec<(RecordId, String, String, Owner)> = {
            let Ok(mut guard) = self.held.lock() else {
                return 0;
            };
            let (held, cursor) = &mut *guard;
            held.retain(|_, h| h.until_ms > now);
            let after = cursor.map_or(Bound::Unbounded, Bound::Excluded);
            let mut batch: Vec<_> = held
                .range((after, Bound::Unbounded))
                .chain(held.range(..))
                .take(MARK_BATCH.min(held.len()))
                .map(|(id, h)| {
                    (
                        *id,
                        h.acquirer.clone(),
                        h.request_id.clone(),
                        h.owner.clone(),
                    )
                })
                .collect();
            batch.dedup_by_key(|(id, ..)| *id);
            *cursor = batch.last().map(|(id, ..)| *id);
            batch
        };
        if batch.is_empty() {
            return 0;
        }
        let fields: Vec<String> = batch
            .iter()
            .map(|(id, ..)| self.shared.field(*id))
            .collect();
        let Some(marks) = self.shared.acked(&fields).await else {
            return 0;
        };
        let mut settled = 0;
        for ((id, acquirer, request_id, owner), acked) in batch.into_iter().zip(marks) {
            if !acked {
                continue;
            }
            match store
                .ack_pulled(acquirer.clone(), request_id, owner, id, now_ms())
                .await
            {
                Ok(done) => {
                    if let Ok(mut held) = self.held.lock() {
                        held.0.remove(&id);
                    }
                    if done {
                        settled += 1;
                        tracing::info!(record = %id, %acquirer, "relay: pulled package acknowledged on another instance; settled");
                    }
                }
                Err(error) => {
                    tracing::warn!(record = %id, %acquirer, %error, "relay: a package acknowledged elsewhere was not settled; retried");
                }
            }
        }
        self.metrics.remote_pull("settled", settled as u64);
        settled
    }

    /// Sweeps every [`SWEEP_INTERVAL`] until `closing`.
    pub async fn settle(
        self: Arc<Self>,
        store: Arc<dyn CallbackStore>,
        closing: impl Future<Output = ()>,
    ) {
        let mut closing = std::pin::pin!(closing);
        let watched = self.rewatch(store.as_ref()).await;
        if watched > 0 {
            tracing::info!(
                watched,
                "relay: pull-only records held here watched again for acknowledgements made elsewhere"
            );
        }
        let mut tick = tokio::time::interval(SWEEP_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = &mut closing => return,
                _ = tick.tick() => {}
            }
            self.settle_once(store.as_ref()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::relay::{LeaseToken, Route};
    use bytes::Bytes;

    fn leased(client: &str, body: &[u8]) -> Leased {
        Leased {
            id: RecordId([9; 16]),
            acquirer: "acquirer-1".into(),
            attempts: 1,
            received_ms: 1_700_000_000_000,
            lease: LeaseToken(1),
            envelope: Envelope {
                request_id: "req-1".into(),
                action: Some("hashedFilesSigning".into()),
                content_type: "multipart/form-data; boundary=x".into(),
                body: Bytes::copy_from_slice(body),
            },
            route: Route {
                client: client.into(),
                branch: "b-1".into(),
                target: String::new(),
                login: None,
            },
        }
    }

    #[test]
    fn a_copy_round_trips_and_names_only_its_caller() {
        let record = leased("key:abc", b"\x00package\xff");
        let plain = Copy::encode(&record).unwrap();
        assert!(!String::from_utf8_lossy(&plain).contains("key:abc"));
        let copy = Copy::decode(&plain).unwrap();
        assert_eq!(copy.id, record.id);
        assert_eq!(copy.received_ms, record.received_ms);
        assert_eq!(copy.envelope, record.envelope);
        assert!(copy.names(&"key:abc".into()));
        assert!(!copy.names(&"key:abd".into()) && !copy.names(&"".into()));
        assert!(Copy::decode(&plain[..40]).is_none());
    }

    /// A route recorded with a login (pass-through, a session token this gateway issued):
    /// a later session token for the same login is its caller too, another login is not,
    /// and the login is not in the copy's bytes in clear.
    #[test]
    fn a_copy_names_the_login_its_route_was_recorded_for() {
        let mut record = leased("session:first", b"package");
        record.route.login = Some("login:digest-of-acquirer-token".into());
        let plain = Copy::encode(&record).unwrap();
        assert!(!String::from_utf8_lossy(&plain).contains("login:"));
        let copy = Copy::decode(&plain).unwrap();
        let relogged = Owner {
            client: "session:second".into(),
            login: Some("login:digest-of-acquirer-token".into()),
        };
        let stranger = Owner {
            client: "session:third".into(),
            login: Some("login:another".into()),
        };
        assert!(copy.names(&relogged));
        assert!(!copy.names(&stranger));
        assert!(!copy.names(&"session:second".into()));
        let mut flag = plain;
        flag[16 + 8 + 32] = 7;
        assert!(
            Copy::decode(&flag).is_none(),
            "an unknown login flag decodes"
        );
    }

    /// A shared store that never answers (Redis down).
    struct Down;

    impl SharedPulls for Down {
        fn key(&self, acquirer: &str, request_id: &str) -> String {
            format!("{acquirer}:{request_id}")
        }
        fn field(&self, id: RecordId) -> String {
            id.to_string()
        }
        fn put<'a>(
            &'a self,
            _: &'a str,
            _: &'a str,
            _: &'a [u8],
            _: Duration,
            _: u64,
        ) -> BoxFuture<'a, PullPut> {
            Box::pin(async { PullPut::Failed })
        }
        fn mark_erased<'a>(&'a self, _: &'a str, _: Duration) -> BoxFuture<'a, bool> {
            Box::pin(async { false })
        }
        fn list<'a>(&'a self, _: &'a str) -> BoxFuture<'a, Option<Listed>> {
            Box::pin(async { None })
        }
        fn ack<'a>(&'a self, _: &'a str, _: &'a str, _: Duration) -> BoxFuture<'a, bool> {
            Box::pin(async { false })
        }
        fn acked<'a>(&'a self, _: &'a [String]) -> BoxFuture<'a, Option<Vec<bool>>> {
            Box::pin(async { None })
        }
    }

    #[tokio::test]
    async fn redis_down_copies_nothing_finds_nothing_and_settles_nothing() {
        let metrics = Arc::new(RelayMetrics::register(
            &mut prometheus_client::registry::Registry::default(),
        ));
        let pulls = FleetPulls::new(
            Arc::new(Down),
            Arc::clone(&metrics),
            Duration::from_secs(60),
            16,
            vec!["acquirer-1".into()],
        );
        let record = leased("key:abc", b"small");
        assert!(!pulls.copy(&record, now_ms() + 60_000).await);
        assert_eq!(metrics.pull_copies("failed"), 1);
        pulls
            .copy(&leased("key:abc", &[0; 17]), now_ms() + 60_000)
            .await;
        assert_eq!(metrics.pull_copies("skipped"), 1);
        assert!(
            pulls
                .find("acquirer-1", "req-1", &"key:abc".into())
                .await
                .is_none()
        );
        assert_eq!(
            pulls
                .ack("acquirer-1", "req-1", &"key:abc".into(), None)
                .await,
            None
        );
        assert!(!pulls.acked_elsewhere(record.id).await);
        assert!(
            !pulls.erase(None, "req-1").await,
            "an erase Redis did not answer"
        );
        assert!(pulls.held.lock().unwrap().0.is_empty());
    }
}
