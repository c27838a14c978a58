//! The callback relay's durable half: Diia's document packages, sealed at rest, from the
//! moment they are acknowledged until their branch has them.
//!
//! Invariants kept here:
//! - **Acknowledged means durable.** [`CallbackStore::put`] resolves only after the
//!   transaction holding the record has committed (with `fsync = always`, synced), so a
//!   `200` sent after it survives `kill -9` and, with `always`, power loss.
//! - **Nothing in clear at rest.** Payload, requestId, action, `Content-Type` and route are
//!   sealed ([`seal`]) with the record id, the acquirer and the column as associated data;
//!   requestIds and payloads appear only as keyed MACs. The acquirer's configured name,
//!   times, sizes, counters and states are the only clear columns.
//! - **Nothing kept longer than delivery needs.** Delivery deletes the payload and the route
//!   in the same transaction, leaving a tombstone (MACs, times, state) for `tombstone_ttl`;
//!   `secure_delete` zeroes freed pages and [`sqlite::SqliteStore::checkpoint`] truncates
//!   the WAL, so no sealed byte outlives its record either.
//! - **At least once, one identity.** A record keeps its [`RecordId`] (and so its
//!   `webhook-id`) across leases; a lease that is not settled before it expires returns
//!   the record to `pending`, and a late settle with the old [`LeaseToken`] changes nothing.
//!
//! # Lifecycle
//! ```text
//! put (routed) ──► pending ──lease──► delivering ──delivered──► delivered (tombstone) ──tombstone_ttl──► gone
//! put (no route) ► orphan ──route_orphans──► pending     │  ├──retry_later──► pending (due later)
//!        │                                                │  ├──lease expires─► pending
//!   orphan_retention ──► gone                             │  └──dead─────────► dead ──dead_retention──► gone
//!                                                         │                      └──redeliver──► pending
//! erase(requestId) / purge(id): gone at once, from any state
//! ```
//! A put without a route takes the request's live route, if one is recorded, in the same
//! transaction; [`CallbackStore::record_route`] routes the request's orphans in the same
//! transaction as the route. So a route and its callback may arrive in either order.
//! The pull side takes a record with [`CallbackStore::take_for`] and settles it with
//! [`CallbackStore::ack_pulled`] (pending or delivering → delivered), both only for the
//! caller its route names (or the login its route names, [`Route::login`]).
//! With `[scaleout]` on, routes are also copied to Redis ([`fleet`]), so an instance
//! that receives a callback finds the route another instance recorded, and packages held
//! for pull-only branches are copied there too ([`fleet_pulls`]), so a pull reaching any
//! instance finds them.
//!
//! # Schema (SQLite, `{data_dir}/relay.db`, WAL)
//! ```sql
//! CREATE TABLE records (
//!   id          BLOB PRIMARY KEY,   -- 16 random bytes (RecordId)
//!   acquirer    TEXT NOT NULL,      -- the acquirer's configured name (clear)
//!   key_id      TEXT NOT NULL,      -- the seal key that wrote the row (clear)
//!   dedup       BLOB NOT NULL,      -- MAC(acquirer, requestId, action) under key_id
//!   request_mac BLOB NOT NULL,      -- MAC(acquirer, requestId) under key_id: routing, erase
//!   body_mac    BLOB NOT NULL,      -- MAC(Content-Type, body) under key_id: conflicts
//!   size        INTEGER NOT NULL,   -- body bytes
//!   state       INTEGER NOT NULL,   -- State as u8: 0 pending, 1 delivering, 2 delivered, 3 dead, 4 orphan
//!   received_ms INTEGER NOT NULL,   -- when put (ms since the Unix epoch)
//!   updated_ms  INTEGER NOT NULL,   -- last state change
//!   due_ms      INTEGER NOT NULL,   -- pending: next attempt; delivering: lease expiry
//!   attempts    INTEGER NOT NULL,   -- leases taken
//!   lease       INTEGER,            -- the current lease's token, while delivering
//!   duplicates  INTEGER NOT NULL,   -- same (requestId, action), same bytes, seen again
//!   conflicts   INTEGER NOT NULL,   -- same (requestId, action), other bytes, refused
//!   request     BLOB,               -- sealed requestId (orphan routing); NULL once delivered
//!   envelope    BLOB,               -- sealed Envelope; NULL once delivered
//!   route       BLOB                -- sealed Route; NULL for orphans and once delivered
//! );
//! CREATE UNIQUE INDEX records_dedup ON records (acquirer, dedup);
//! CREATE INDEX records_request ON records (acquirer, request_mac);
//! CREATE INDEX records_due ON records (state, due_ms);
//! ```
//! Routes (schema version 2; a version 1 file gains the table when opened, its records kept):
//! ```sql
//! CREATE TABLE routes (
//!   acquirer    TEXT NOT NULL,      -- the acquirer's configured name (clear)
//!   request_mac BLOB NOT NULL,      -- MAC(acquirer, requestId) under key_id
//!   key_id      TEXT NOT NULL,      -- the seal key that wrote the row (clear)
//!   route       BLOB NOT NULL,      -- sealed Route, bound to request_mac
//!   created_ms  INTEGER NOT NULL,   -- when recorded
//!   expires_ms  INTEGER NOT NULL,   -- created_ms + route_ttl (a retried push extends it)
//!   PRIMARY KEY (acquirer, request_mac)
//! );
//! CREATE INDEX routes_expires ON routes (expires_ms);
//! ```
//! `PRAGMA user_version` is the schema's version (2). Pragmas: `journal_mode=WAL`,
//! `synchronous=FULL` (`fsync = always`) or `NORMAL` (`fsync = batch`: a commit reaches
//! the OS, so `kill -9` loses nothing, but the last commits before a power loss may),
//! `secure_delete=ON`.

use std::fmt;
use std::time::Duration;

use futures_util::future::BoxFuture;

pub mod admin;
pub mod budget;
pub mod cms;
pub mod deliver;
pub mod desk;
pub mod fleet;
pub mod fleet_pulls;
pub mod ingress;
pub mod metrics;
pub mod record;
pub mod seal;
pub mod settings;
pub mod sqlite;

pub use record::{Envelope, Owner, Route};
pub use seal::{KeyFileError, Keyring};
pub use sqlite::{Fsync, Options, SqliteStore};

/// A record's identity: 16 random bytes, shown as 32 hex digits. Stable across
/// deliveries, so it names the `webhook-id` and the log lines about the record.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RecordId(pub [u8; 16]);

impl RecordId {
    /// A fresh random id (`None` only when the OS has no randomness to give).
    #[must_use]
    pub fn random() -> Option<Self> {
        let mut id = [0u8; 16];
        getrandom::fill(&mut id).ok()?;
        Some(Self(id))
    }

    /// Parses 32 hex digits.
    #[must_use]
    pub fn parse(text: &str) -> Option<Self> {
        let mut id = [0u8; 16];
        hex::decode_to_slice(text, &mut id).ok()?;
        Some(Self(id))
    }

    /// The Standard Webhooks `webhook-id`: the same for every attempt.
    #[must_use]
    pub fn webhook_id(self) -> String {
        format!("msg_{self}")
    }
}

impl fmt::Display for RecordId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for RecordId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RecordId({self})")
    }
}

/// Where a record is in its life (stored as the `u8` shown).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum State {
    /// Routed, waiting for its next attempt.
    Pending,
    /// Leased to a delivery worker until the lease expires.
    Delivering,
    /// Delivered: a tombstone without payload or route.
    Delivered,
    /// Given up on (schedule exhausted, `410`, or admin): payload kept for `dead_retention`.
    Dead,
    /// Received for a requestId with no route: never delivered until routed.
    Orphan,
}

impl State {
    /// Every state, in the order of [`Stats::counts`].
    pub const ALL: [Self; 5] = [
        Self::Pending,
        Self::Delivering,
        Self::Delivered,
        Self::Dead,
        Self::Orphan,
    ];

    /// The stored code.
    #[must_use]
    pub const fn code(self) -> u8 {
        match self {
            Self::Pending => 0,
            Self::Delivering => 1,
            Self::Delivered => 2,
            Self::Dead => 3,
            Self::Orphan => 4,
        }
    }

    /// The state of a stored code.
    #[must_use]
    pub const fn from_code(code: i64) -> Option<Self> {
        match code {
            0 => Some(Self::Pending),
            1 => Some(Self::Delivering),
            2 => Some(Self::Delivered),
            3 => Some(Self::Dead),
            4 => Some(Self::Orphan),
            _ => None,
        }
    }

    /// The label used in metrics and admin output.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Delivering => "delivering",
            Self::Delivered => "delivered",
            Self::Dead => "dead",
            Self::Orphan => "orphan",
        }
    }
}

/// A callback to store: what ingress checked, and its route if one was recorded.
#[derive(Clone, Debug)]
pub struct Ingest {
    /// The acquirer the path token named.
    pub acquirer: String,
    /// The callback as received.
    pub envelope: Envelope,
    /// The route recorded for its requestId; `None` stores an orphan.
    pub route: Option<Route>,
}

/// What [`CallbackStore::put`] did; every variant means "durable: answer 200".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PutOutcome {
    /// Stored as a new record, `pending` or `orphan`.
    Stored(RecordId, State),
    /// Same (acquirer, requestId, action) and same bytes as an earlier record: not stored again.
    Duplicate(RecordId),
    /// Same (acquirer, requestId, action), different bytes: the first is kept.
    Conflict(RecordId),
}

/// What [`CallbackStore::record_route`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouteOutcome {
    /// A new route, durable; the request's orphans already stored now carry it (`pending`).
    Recorded,
    /// The request was already routed to the same client and branch (a retried push): the
    /// first route is kept, its expiry moved to `now + ttl` if that is later.
    Same,
    /// The request is routed to another client or branch until its route expires: refused
    /// (the proxy answers `409`), nothing changed.
    Taken,
}

/// Proof of a lease; settling a record takes the token of its current lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseToken(pub i64);

/// A record leased for one delivery attempt.
#[derive(Clone, Debug)]
pub struct Leased {
    /// The record (and its `webhook-id`).
    pub id: RecordId,
    /// Its acquirer.
    pub acquirer: String,
    /// Attempts including this one.
    pub attempts: u32,
    /// When it was received (ms since the epoch): `max_age` runs from here.
    pub received_ms: u64,
    /// The lease to settle with.
    pub lease: LeaseToken,
    /// The callback to replay.
    pub envelope: Envelope,
    /// Where it goes.
    pub route: Route,
}

/// How a delivery attempt ended, for [`CallbackStore::settle`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Settle {
    /// Delivered: drop payload and route, keep a tombstone.
    Delivered,
    /// Failed: try again at this time (ms since the epoch).
    RetryAt(u64),
    /// Given up: keep the payload for `dead_retention` (admin may redeliver).
    Dead,
}

/// A record's metadata: what admin may see (no sealed field, no MAC).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordMeta {
    /// The record.
    pub id: RecordId,
    /// Its acquirer.
    pub acquirer: String,
    /// Its state.
    pub state: State,
    /// Body bytes.
    pub size: u64,
    /// When received (ms since the epoch).
    pub received_ms: u64,
    /// Last state change.
    pub updated_ms: u64,
    /// Next attempt (pending) or lease expiry (delivering).
    pub due_ms: u64,
    /// Leases taken.
    pub attempts: u32,
    /// Duplicates seen.
    pub duplicates: u32,
    /// Conflicts refused.
    pub conflicts: u32,
    /// The seal key that wrote it.
    pub key_id: String,
}

/// A stored record opened: metadata, and the payload and route while they are kept.
#[derive(Clone, Debug)]
pub struct Opened {
    /// Metadata.
    pub meta: RecordMeta,
    /// The callback (none once delivered).
    pub envelope: Option<Envelope>,
    /// The route (none for orphans and once delivered).
    pub route: Option<Route>,
}

/// An orphan waiting for a route: what routing needs to look one up.
#[derive(Clone, Debug)]
pub struct Orphan {
    /// The record.
    pub id: RecordId,
    /// Its acquirer.
    pub acquirer: String,
    /// The requestId to look a route up for.
    pub request_id: String,
    /// When received (ms since the epoch).
    pub received_ms: u64,
}

impl Orphan {
    /// Where this orphan sits in record order, for [`CallbackStore::orphans`] paging.
    #[must_use]
    pub fn cursor(&self) -> OrphanCursor {
        OrphanCursor {
            received_ms: self.received_ms,
            id: self.id,
        }
    }
}

/// A place in record order (received, then id) among the orphans: a page of
/// [`CallbackStore::orphans`] starts after it. Stable while orphans come and go, so a
/// reader that pages through advances past the ones it has seen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct OrphanCursor {
    /// When the record was received (ms since the epoch).
    pub received_ms: u64,
    /// The record.
    pub id: RecordId,
}

/// One page of orphans.
#[derive(Clone, Debug, Default)]
pub struct Orphans {
    /// The page's orphans that open, in record order.
    pub found: Vec<Orphan>,
    /// Where the next page starts (the page's last row, whether it opened or not); `None`
    /// when this page reached the newest orphan (start over from the oldest).
    pub next: Option<OrphanCursor>,
}

/// How long settled records are kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention {
    /// Delivered tombstones, from delivery.
    pub tombstone_ttl: Duration,
    /// Dead records, from when they died.
    pub dead_retention: Duration,
    /// Orphans, from when they were received.
    pub orphan_retention: Duration,
}

/// Rows removed by [`CallbackStore::purge_expired`], by state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Purged {
    /// Tombstones.
    pub delivered: u64,
    /// Dead records.
    pub dead: u64,
    /// Orphans.
    pub orphan: u64,
    /// Routes past their `route_ttl`.
    pub routes: u64,
}

/// Queue depth and age, for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Records per state, in [`State::ALL`] order.
    pub counts: [u64; 5],
    /// Age of the oldest record not yet delivered (pending or delivering).
    pub oldest_pending: Option<Duration>,
}

impl Stats {
    /// Records in `state`.
    #[must_use]
    pub const fn count(&self, state: State) -> u64 {
        self.counts[state.code() as usize]
    }
}

/// Why the store could not do what was asked. Ingress answers `503` to any of these.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite refused (disk full, unwritable, corrupt).
    #[error("store: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The data directory could not be prepared.
    #[error("store directory: {0}")]
    Io(#[from] std::io::Error),
    /// The group's `COMMIT` failed: nothing in it is stored.
    #[error("store commit: {0}")]
    Commit(String),
    /// The writer thread is gone (shut down or panicked).
    #[error("store writer stopped")]
    Closed,
    /// No randomness for a record id, nonce or lease, or a value too large to frame.
    #[error("store: could not seal a record")]
    Seal,
    /// A stored value does not open under any listed key, or is malformed.
    #[error("store: record {0} does not open under the listed keys")]
    Unreadable(RecordId),
}

/// Result of a store call.
pub type StoreResult<T> = Result<T, StoreError>;

/// The durable half of the relay. Times are milliseconds since the Unix epoch, passed in
/// so the caller's clock (a paused one in tests) rules. Every write resolves after its
/// commit. Object safe: hold it as `Arc<dyn CallbackStore>`.
pub trait CallbackStore: Send + Sync {
    /// Stores a callback sealed, `pending` if routed or `orphan` if not, unless the
    /// (acquirer, requestId, action) is already stored (see [`PutOutcome`]).
    fn put(&self, ingest: Ingest, now_ms: u64) -> BoxFuture<'static, StoreResult<PutOutcome>>;

    /// Leases up to `limit` records due at `now_ms` (pending ones, and delivering ones
    /// whose lease expired) until `now_ms + lease`, oldest due first. A record that no
    /// longer opens is moved to `dead` and logged by id, not returned.
    fn lease_due(
        &self,
        now_ms: u64,
        lease: Duration,
        limit: usize,
    ) -> BoxFuture<'static, StoreResult<Vec<Leased>>>;

    /// Settles a leased record; `false` (nothing changed) when the lease is no longer the
    /// record's current one.
    fn settle(
        &self,
        id: RecordId,
        lease: LeaseToken,
        outcome: Settle,
        now_ms: u64,
    ) -> BoxFuture<'static, StoreResult<bool>>;

    /// Routes the acquirer's orphans for `request_id`: they become `pending`, due now.
    fn route_orphans(
        &self,
        acquirer: String,
        request_id: String,
        route: Route,
        now_ms: u64,
    ) -> BoxFuture<'static, StoreResult<Vec<RecordId>>>;

    /// Durably routes `(acquirer, request_id)` to `route` until `now_ms + ttl`, unless a live
    /// route names another client or branch ([`RouteOutcome::Taken`]). A new route turns
    /// the request's orphans into `pending` records carrying it, in the same transaction.
    fn record_route(
        &self,
        acquirer: String,
        request_id: String,
        route: Route,
        ttl: Duration,
        now_ms: u64,
    ) -> BoxFuture<'static, StoreResult<RouteOutcome>>;

    /// Removes the request's live route if it names `client` (a route recorded before a
    /// push Diia did not accept); `false` when there is none or it names someone else.
    fn release_route(
        &self,
        acquirer: String,
        request_id: String,
        client: String,
        now_ms: u64,
    ) -> BoxFuture<'static, StoreResult<bool>>;

    /// The request's route if it has not expired at `now_ms`.
    fn route(
        &self,
        acquirer: String,
        request_id: String,
        now_ms: u64,
    ) -> BoxFuture<'static, StoreResult<Option<Route>>>;

    /// The pull side: the request's oldest routed, undelivered record (pending or
    /// delivering) whose route `owner` owns (its client, or its login: compared as MACs in
    /// constant time, see [`Route::owned_by`]), opened. `None` for another caller, as for
    /// no record: the pull side answers 404 alike. Changes nothing;
    /// [`CallbackStore::ack_pulled`] settles.
    fn take_for(
        &self,
        acquirer: String,
        request_id: String,
        owner: Owner,
    ) -> BoxFuture<'static, StoreResult<Option<(RecordId, Envelope)>>>;

    /// The pull side's acknowledgement: record `id` of the request, if `owner` owns its
    /// route (as for [`CallbackStore::take_for`]) and it is not delivered yet, becomes a
    /// tombstone (payload and route gone) as a push delivery would; `false` (nothing
    /// changed) otherwise.
    fn ack_pulled(
        &self,
        acquirer: String,
        request_id: String,
        owner: Owner,
        id: RecordId,
        now_ms: u64,
    ) -> BoxFuture<'static, StoreResult<bool>>;

    /// Up to `limit` orphans in record order (received, then id) after `after` (from the
    /// oldest when `None`), with their requestIds (to look routes up), and where the next
    /// page starts.
    fn orphans(
        &self,
        after: Option<OrphanCursor>,
        limit: usize,
    ) -> BoxFuture<'static, StoreResult<Orphans>>;

    /// Metadata of up to `limit` records in `state`, by id, after `after` (paging).
    fn list(
        &self,
        state: State,
        after: Option<RecordId>,
        limit: usize,
    ) -> BoxFuture<'static, StoreResult<Vec<RecordMeta>>>;

    /// One record opened (the pull side, admin); `None` when there is no such record.
    fn fetch(&self, id: RecordId) -> BoxFuture<'static, StoreResult<Option<Opened>>>;

    /// A dead record back to `pending`, due now, attempts reset; `false` if it is not dead.
    fn redeliver(&self, id: RecordId, now_ms: u64) -> BoxFuture<'static, StoreResult<bool>>;

    /// Removes one record, whatever its state; `false` if there was none.
    fn purge(&self, id: RecordId) -> BoxFuture<'static, StoreResult<bool>>;

    /// Removes every record (tombstones too) and route for `request_id`, of one acquirer or
    /// of all; returns how many records.
    fn erase(
        &self,
        acquirer: Option<String>,
        request_id: String,
    ) -> BoxFuture<'static, StoreResult<u64>>;

    /// Removes tombstones, dead records and orphans past their retention, and expired routes.
    fn purge_expired(
        &self,
        now_ms: u64,
        retention: Retention,
    ) -> BoxFuture<'static, StoreResult<Purged>>;

    /// Counts by state and the oldest undelivered record's age.
    fn stats(&self, now_ms: u64) -> BoxFuture<'static, StoreResult<Stats>>;
}

/// Milliseconds since the Unix epoch now (what callers pass as `now_ms` in production).
#[must_use]
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
