//! The embedded backend: SQLite in WAL mode, one writer thread that commits in groups,
//! reads on their own connection.
//!
//! Why one writer: SQLite serialises writers anyway, and a single thread lets every write
//! queued while the previous commit was syncing share the next commit (group commit): one
//! fsync for a burst of callbacks instead of one each. Each write runs inside its own
//! savepoint, so one failing write does not undo the others in its group; each waiter is
//! answered only after the group's `COMMIT` returned (with `synchronous=FULL`, after the
//! WAL was synced). Large values are sealed by the caller before they reach the thread, so
//! the thread spends its time on SQLite alone.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::Duration;

use futures_util::future::BoxFuture;
use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::oneshot;

use super::seal::{Keyring, Mac, Macs};

mod checkpointer;
mod routes;
mod rows;
mod writer;

use super::{
    CallbackStore, Envelope, Ingest, LeaseToken, Leased, Opened, Orphan, OrphanCursor, Orphans,
    Owner, Purged, PutOutcome, RecordId, RecordMeta, Retention, Route, RouteOutcome, Settle, State,
    Stats, StoreError, StoreResult,
};
use routes::{ROUTES_SCHEMA, request_macs};
use rows::{lease_rows, meta, open_lease, put_sealed, seal_ingest, settle_row};
pub use writer::WriterStats;
use writer::{Task, Work, writer_loop};

/// The database file's name inside `data_dir`.
pub const DB_FILE: &str = "relay.db";
/// The schema's version (`PRAGMA user_version`): 1 had `records`; 2 adds `routes`.
const SCHEMA_VERSION: i64 = 2;
/// Most writes in one commit.
const MAX_GROUP: usize = 256;
/// The writer's page cache (16 MiB, in KiB as SQLite counts a negative size) and
/// in-memory temporary files: a group of 200 KiB callbacks is written once, at commit.
const WRITER_PRAGMAS: &str = "PRAGMA cache_size=-16384; PRAGMA temp_store=MEMORY;";

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS records (
  id          BLOB PRIMARY KEY,
  acquirer    TEXT NOT NULL,
  key_id      TEXT NOT NULL,
  dedup       BLOB NOT NULL,
  request_mac BLOB NOT NULL,
  body_mac    BLOB NOT NULL,
  size        INTEGER NOT NULL,
  state       INTEGER NOT NULL,
  received_ms INTEGER NOT NULL,
  updated_ms  INTEGER NOT NULL,
  due_ms      INTEGER NOT NULL,
  attempts    INTEGER NOT NULL,
  lease       INTEGER,
  duplicates  INTEGER NOT NULL,
  conflicts   INTEGER NOT NULL,
  request     BLOB,
  envelope    BLOB,
  route       BLOB
);
CREATE UNIQUE INDEX IF NOT EXISTS records_dedup ON records (acquirer, dedup);
CREATE INDEX IF NOT EXISTS records_request ON records (acquirer, request_mac);
CREATE INDEX IF NOT EXISTS records_due ON records (state, due_ms);
";

const META_COLUMNS: &str = "id, acquirer, state, size, received_ms, updated_ms, due_ms, \
                            attempts, duplicates, conflicts, key_id";

/// When a commit is synced to disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Fsync {
    /// Every commit synced before its waiters are answered (`synchronous=FULL`).
    #[default]
    Always,
    /// Commits reach the OS at once and the disk at checkpoints (`synchronous=NORMAL`):
    /// survives a crash of the process, not necessarily of the machine.
    Batch,
}

/// How a store is opened.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Options {
    /// When commits are synced.
    pub fsync: Fsync,
    /// The most the database file may grow to; a write beyond it fails (`SQLITE_FULL`,
    /// so ingress answers 503) without touching the other writes of its group. `None`:
    /// only the disk limits it.
    pub max_db_bytes: Option<u64>,
}

/// MAC purposes (distinct domains under one key).
const MAC_DEDUP: &str = "dedup";
const MAC_REQUEST: &str = "request";
const MAC_BODY: &str = "body";

/// Sealed-field names (bound into the associated data).
const FIELD_ENVELOPE: &str = "envelope";
const FIELD_ROUTE: &str = "route";
const FIELD_REQUEST: &str = "request";

struct Inner {
    writer: Mutex<Option<mpsc::Sender<Box<dyn Work>>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    /// Ends after the writer thread (its connection holds the checkpointer's wake-up).
    checkpointer: Mutex<Option<JoinHandle<()>>>,
    reader: Arc<Mutex<Connection>>,
    keys: Arc<Keyring>,
    stats: Arc<WriterStats>,
    path: PathBuf,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Ok(mut writer) = self.writer.lock() {
            writer.take();
        }
        if let Some(thread) = self.thread.lock().ok().and_then(|mut t| t.take()) {
            let _ = thread.join();
        }
        if let Some(thread) = self.checkpointer.lock().ok().and_then(|mut t| t.take()) {
            let _ = thread.join();
        }
    }
}

/// The SQLite [`CallbackStore`]; cheap to clone (one writer thread per opened store).
/// Dropping the last clone waits for the writes already queued to commit (it joins the
/// writer thread): drop it at shutdown, or from `spawn_blocking`, not on a busy runtime.
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SqliteStore({})", self.inner.path.display())
    }
}

fn ms(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn unms(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn small(v: i64) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}

fn configure(conn: &Connection, fsync: Fsync) -> rusqlite::Result<()> {
    conn.busy_timeout(Duration::from_secs(5))?;
    let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(rusqlite::Error::InvalidQuery);
    }
    let sync = match fsync {
        Fsync::Always => "FULL",
        Fsync::Batch => "NORMAL",
    };
    conn.execute_batch(&format!(
        "PRAGMA synchronous={sync}; PRAGMA secure_delete=ON; PRAGMA journal_size_limit=67108864;"
    ))
}

#[cfg(unix)]
fn prepare_dir(dir: &Path, file: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    // SQLite creates its files with the process umask; create the database 0600 first.
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(file)?;
    Ok(())
}

#[cfg(not(unix))]
fn prepare_dir(dir: &Path, _file: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)
}

impl SqliteStore {
    /// Opens (creating) `{dir}/relay.db`, applies the schema and starts the writer thread.
    /// Blocking: call it at startup or in `spawn_blocking`.
    pub fn open(dir: &Path, keys: Keyring, fsync: Fsync) -> StoreResult<Self> {
        Self::open_with(
            dir,
            keys,
            Options {
                fsync,
                ..Options::default()
            },
        )
    }

    /// [`SqliteStore::open`] with every option (the keyring owned or shared).
    pub fn open_with(
        dir: &Path,
        keys: impl Into<Arc<Keyring>>,
        options: Options,
    ) -> StoreResult<Self> {
        let Options {
            fsync,
            max_db_bytes,
        } = options;
        let path = dir.join(DB_FILE);
        prepare_dir(dir, &path)?;
        let writer_conn = Connection::open(&path)?;
        configure(&writer_conn, fsync)?;
        if let Some(max) = max_db_bytes {
            let page: i64 = writer_conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
            let pages = i64::try_from(max).unwrap_or(i64::MAX) / page.max(1);
            let _: i64 = writer_conn.query_row(
                &format!("PRAGMA max_page_count={}", pages.max(1)),
                [],
                |r| r.get(0),
            )?;
        }
        let version: i64 = writer_conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if version > SCHEMA_VERSION {
            return Err(StoreError::Sqlite(rusqlite::Error::InvalidQuery));
        }
        // A new file gets every table; a version 1 file gains `routes` (its records stay),
        // in one transaction with the version bump.
        writer_conn.execute_batch(&format!(
            "BEGIN IMMEDIATE; {SCHEMA} {ROUTES_SCHEMA} PRAGMA user_version={SCHEMA_VERSION}; COMMIT;"
        ))?;
        // A group of large callbacks fits in the writer's page cache (no spill into the WAL
        // mid-transaction) and its savepoints' journals stay in memory.
        writer_conn.execute_batch(WRITER_PRAGMAS)?;
        let mut writer_conn = writer_conn;
        let checkpointer = checkpointer::start(&mut writer_conn, &path, fsync)?;
        let reader = Connection::open(&path)?;
        configure(&reader, fsync)?;

        let keys: Arc<Keyring> = keys.into();
        let stats = Arc::new(WriterStats::default());
        let (tx, rx) = mpsc::channel::<Box<dyn Work>>();
        let thread = {
            let keys = Arc::clone(&keys);
            let stats = Arc::clone(&stats);
            std::thread::Builder::new()
                .name("relay-store".into())
                .spawn(move || writer_loop(&writer_conn, &keys, &rx, &stats))?
        };
        Ok(Self {
            inner: Arc::new(Inner {
                writer: Mutex::new(Some(tx)),
                thread: Mutex::new(Some(thread)),
                checkpointer: Mutex::new(Some(checkpointer)),
                reader: Arc::new(Mutex::new(reader)),
                keys,
                stats,
                path,
            }),
        })
    }

    /// The database file.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The keyring records are sealed with.
    #[must_use]
    pub fn keys(&self) -> &Keyring {
        &self.inner.keys
    }

    /// The writer thread's counters.
    #[must_use]
    pub fn writer_stats(&self) -> &WriterStats {
        &self.inner.stats
    }

    /// Queues a write; resolves after the commit that holds it. `run` may run more than
    /// once: when another write in its group made SQLite roll the whole transaction back,
    /// the group is run again without that write.
    fn write<T, F>(&self, run: F) -> BoxFuture<'static, StoreResult<T>>
    where
        T: Send + 'static,
        F: Fn(&Connection, &Keyring) -> StoreResult<T> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let task: Box<dyn Work> = Box::new(Task {
            run,
            out: None,
            reply,
        });
        let sent = self
            .inner
            .writer
            .lock()
            .ok()
            .and_then(|w| w.as_ref().map(|w| w.send(task).is_ok()))
            .unwrap_or(false);
        Box::pin(async move {
            if !sent {
                return Err(StoreError::Closed);
            }
            answer.await.map_err(|_| StoreError::Closed)?
        })
    }

    /// Runs a read on the read connection, off the async threads.
    fn read<T, F>(&self, run: F) -> BoxFuture<'static, StoreResult<T>>
    where
        T: Send + 'static,
        F: FnOnce(&Connection, &Keyring) -> StoreResult<T> + Send + 'static,
    {
        let reader = Arc::clone(&self.inner.reader);
        let keys = Arc::clone(&self.inner.keys);
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                let conn = reader.lock().map_err(|_| StoreError::Closed)?;
                run(&conn, &keys)
            })
            .await
            .map_err(|_| StoreError::Closed)?
        })
    }

    /// Copies the WAL into the database and truncates the WAL to zero bytes, so sealed
    /// values of deleted records no longer sit in old WAL frames. Returns whether the
    /// checkpoint completed (readers may hold it back). Runs on the read connection: a
    /// checkpoint cannot run inside the writer's transaction, and waits for it instead.
    pub fn checkpoint(&self) -> BoxFuture<'static, StoreResult<bool>> {
        self.read(|conn, _| {
            let busy: i64 = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0))?;
            Ok(busy == 0)
        })
    }

    /// Records still sealed under each key id (a key may leave the key file at zero).
    pub fn count_by_key(&self) -> BoxFuture<'static, StoreResult<Vec<(String, u64)>>> {
        self.read(|conn, _| {
            let mut stmt = conn.prepare(
                "SELECT key_id, COUNT(*) FROM records WHERE envelope IS NOT NULL GROUP BY key_id",
            )?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, unms(r.get(1)?))))?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }
}

impl CallbackStore for SqliteStore {
    fn put(&self, ingest: Ingest, now_ms: u64) -> BoxFuture<'static, StoreResult<PutOutcome>> {
        // Sealing (a copy and a pass over up to `max_body` bytes) happens here, on the
        // caller's task, so the writer thread only writes.
        let sealed = match seal_ingest(&self.inner.keys, &ingest) {
            Ok(sealed) => sealed,
            Err(e) => return Box::pin(async move { Err(e) }),
        };
        drop(ingest);
        self.write(move |conn, keys| put_sealed(conn, keys, &sealed, ms(now_ms)))
    }

    fn lease_due(
        &self,
        now_ms: u64,
        lease: Duration,
        limit: usize,
    ) -> BoxFuture<'static, StoreResult<Vec<Leased>>> {
        let until = now_ms.saturating_add(u64::try_from(lease.as_millis()).unwrap_or(u64::MAX));
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let raw = self.write(move |conn, _| lease_rows(conn, ms(now_ms), ms(until), limit));
        let store = self.clone();
        Box::pin(async move {
            let raw = raw.await?;
            let keys = Arc::clone(&store.inner.keys);
            let mut leased = Vec::with_capacity(raw.len());
            let mut unreadable = Vec::new();
            for row in raw {
                let lease = row.lease;
                match open_lease(&keys, row) {
                    Ok(l) => leased.push(l),
                    Err(id) => unreadable.push((id, lease)),
                }
            }
            for (id, lease) in unreadable {
                tracing::error!(record = %id, "relay record does not open under the listed keys; moved to dead");
                store.settle(id, lease, Settle::Dead, now_ms).await?;
            }
            Ok(leased)
        })
    }

    fn settle(
        &self,
        id: RecordId,
        lease: LeaseToken,
        outcome: Settle,
        now_ms: u64,
    ) -> BoxFuture<'static, StoreResult<bool>> {
        self.write(move |conn, _| settle_row(conn, id, lease, outcome, ms(now_ms)))
    }

    fn route_orphans(
        &self,
        acquirer: String,
        request_id: String,
        route: Route,
        now_ms: u64,
    ) -> BoxFuture<'static, StoreResult<Vec<RecordId>>> {
        self.write(move |conn, keys| {
            let macs = request_macs(keys, &acquirer, &request_id);
            routes::route_orphans(conn, keys, &acquirer, &macs, &route, ms(now_ms))
        })
    }

    fn record_route(
        &self,
        acquirer: String,
        request_id: String,
        route: Route,
        ttl: Duration,
        now_ms: u64,
    ) -> BoxFuture<'static, StoreResult<RouteOutcome>> {
        let expires = routes::expiry(now_ms, ttl);
        self.write(move |conn, keys| {
            let macs = request_macs(keys, &acquirer, &request_id);
            routes::record_route(conn, keys, &acquirer, &macs, &route, ms(now_ms), expires)
        })
    }

    fn release_route(
        &self,
        acquirer: String,
        request_id: String,
        client: String,
        now_ms: u64,
    ) -> BoxFuture<'static, StoreResult<bool>> {
        self.write(move |conn, keys| {
            let macs = request_macs(keys, &acquirer, &request_id);
            routes::release_route(conn, keys, &acquirer, &macs, &client, ms(now_ms))
        })
    }

    fn route(
        &self,
        acquirer: String,
        request_id: String,
        now_ms: u64,
    ) -> BoxFuture<'static, StoreResult<Option<Route>>> {
        self.read(move |conn, keys| {
            let macs = request_macs(keys, &acquirer, &request_id);
            routes::live_route(conn, keys, &acquirer, &macs, ms(now_ms))
        })
    }

    fn take_for(
        &self,
        acquirer: String,
        request_id: String,
        owner: Owner,
    ) -> BoxFuture<'static, StoreResult<Option<(RecordId, Envelope)>>> {
        self.read(move |conn, keys| {
            let macs = request_macs(keys, &acquirer, &request_id);
            routes::take_for(conn, keys, &acquirer, &macs, &owner)
        })
    }

    fn ack_pulled(
        &self,
        acquirer: String,
        request_id: String,
        owner: Owner,
        id: RecordId,
        now_ms: u64,
    ) -> BoxFuture<'static, StoreResult<bool>> {
        self.write(move |conn, keys| {
            let macs = request_macs(keys, &acquirer, &request_id);
            routes::ack_pulled(conn, keys, &acquirer, &macs, &owner, id, ms(now_ms))
        })
    }

    fn orphans(
        &self,
        after: Option<OrphanCursor>,
        limit: usize,
    ) -> BoxFuture<'static, StoreResult<Orphans>> {
        let wanted = limit;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        // Before every row: a time no record has, and the empty blob (below any id).
        let (after_ms, after_id) = after.map_or((-1, Vec::new()), |cursor| {
            (ms(cursor.received_ms), cursor.id.0.to_vec())
        });
        self.read(move |conn, keys| {
            let mut stmt = conn.prepare_cached(
                "SELECT id, acquirer, request, received_ms FROM records WHERE state = ?1
                   AND (received_ms, id) > (?2, ?3)
                 ORDER BY received_ms, id LIMIT ?4",
            )?;
            let rows = stmt
                .query_map(
                    params![State::Orphan.code(), after_ms, after_id, limit],
                    |r| {
                        let id: Vec<u8> = r.get(0)?;
                        Ok((
                            RecordId(id.try_into().unwrap_or([0; 16])),
                            r.get::<_, String>(1)?,
                            r.get::<_, Option<Vec<u8>>>(2)?,
                            unms(r.get(3)?),
                        ))
                    },
                )?
                .collect::<Result<Vec<_>, _>>()?;
            let next = if rows.len() < wanted {
                None
            } else {
                rows.last().map(|(id, _, _, received_ms)| OrphanCursor {
                    received_ms: *received_ms,
                    id: *id,
                })
            };
            let mut found = Vec::with_capacity(rows.len());
            for (id, acquirer, request, received_ms) in rows {
                let request_id = request
                    .and_then(|r| keys.open(id, &acquirer, FIELD_REQUEST, &r))
                    .and_then(|p| String::from_utf8(p).ok());
                match request_id {
                    Some(request_id) => found.push(Orphan {
                        id,
                        acquirer,
                        request_id,
                        received_ms,
                    }),
                    None => tracing::error!(record = %id, "relay orphan does not open under the listed keys"),
                }
            }
            Ok(Orphans { found, next })
        })
    }

    fn list(
        &self,
        state: State,
        after: Option<RecordId>,
        limit: usize,
    ) -> BoxFuture<'static, StoreResult<Vec<RecordMeta>>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let after = after.map_or([0u8; 16], |a| a.0);
        let inclusive = after == [0u8; 16];
        self.read(move |conn, _| {
            let op = if inclusive { ">=" } else { ">" };
            let mut stmt = conn.prepare(&format!(
                "SELECT {META_COLUMNS} FROM records WHERE state = ?1 AND id {op} ?2
                 ORDER BY id LIMIT ?3"
            ))?;
            let rows = stmt
                .query_map(params![state.code(), after.as_slice(), limit], meta)?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
    }

    fn fetch(&self, id: RecordId) -> BoxFuture<'static, StoreResult<Option<Opened>>> {
        self.read(move |conn, keys| {
            let row = conn
                .query_row(
                    &format!("SELECT {META_COLUMNS}, envelope, route FROM records WHERE id = ?1"),
                    params![id.0.as_slice()],
                    |r| {
                        Ok((
                            meta(r)?,
                            r.get::<_, Option<Vec<u8>>>(11)?,
                            r.get::<_, Option<Vec<u8>>>(12)?,
                        ))
                    },
                )
                .optional()?;
            let Some((meta, envelope, route)) = row else {
                return Ok(None);
            };
            let envelope = match envelope {
                Some(e) => Some(
                    keys.open(id, &meta.acquirer, FIELD_ENVELOPE, &e)
                        .and_then(|p| Envelope::decode(&p))
                        .ok_or(StoreError::Unreadable(id))?,
                ),
                None => None,
            };
            let route = match route {
                Some(r) => Some(
                    keys.open(id, &meta.acquirer, FIELD_ROUTE, &r)
                        .and_then(|p| Route::decode(&p))
                        .ok_or(StoreError::Unreadable(id))?,
                ),
                None => None,
            };
            Ok(Some(Opened {
                meta,
                envelope,
                route,
            }))
        })
    }

    fn redeliver(&self, id: RecordId, now_ms: u64) -> BoxFuture<'static, StoreResult<bool>> {
        self.write(move |conn, _| {
            let changed = conn.execute(
                "UPDATE records SET state = ?1, due_ms = ?2, updated_ms = ?2, attempts = 0
                 WHERE id = ?3 AND state = ?4 AND envelope IS NOT NULL AND route IS NOT NULL",
                params![
                    State::Pending.code(),
                    ms(now_ms),
                    id.0.as_slice(),
                    State::Dead.code()
                ],
            )?;
            Ok(changed == 1)
        })
    }

    fn purge(&self, id: RecordId) -> BoxFuture<'static, StoreResult<bool>> {
        self.write(move |conn, _| {
            Ok(conn.execute(
                "DELETE FROM records WHERE id = ?1",
                params![id.0.as_slice()],
            )? == 1)
        })
    }

    fn erase(
        &self,
        acquirer: Option<String>,
        request_id: String,
    ) -> BoxFuture<'static, StoreResult<u64>> {
        self.write(move |conn, keys| {
            let acquirers: Vec<String> = match &acquirer {
                Some(a) => vec![a.clone()],
                None => {
                    let mut stmt = conn.prepare(
                        "SELECT acquirer FROM records UNION SELECT acquirer FROM routes",
                    )?;
                    stmt.query_map([], |r| r.get(0))?
                        .collect::<Result<Vec<_>, _>>()?
                }
            };
            let mut removed = 0u64;
            for acq in acquirers {
                let macs = request_macs(keys, &acq, &request_id);
                for (key_id, mac) in &macs {
                    removed += conn.execute(
                        "DELETE FROM records WHERE acquirer = ?1 AND request_mac = ?2 AND key_id = ?3",
                        params![acq, mac.as_slice(), key_id],
                    )? as u64;
                }
                routes::erase_routes(conn, &acq, &macs)?;
            }
            Ok(removed)
        })
    }

    fn purge_expired(
        &self,
        now_ms: u64,
        retention: Retention,
    ) -> BoxFuture<'static, StoreResult<Purged>> {
        // May be negative: nothing is older than a retention longer than the epoch.
        let before = |d: Duration| {
            ms(now_ms).saturating_sub(i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        };
        let tombstones = before(retention.tombstone_ttl);
        let dead = before(retention.dead_retention);
        let orphans = before(retention.orphan_retention);
        self.write(move |conn, _| {
            let gone = |state: State, column: &str, cutoff: i64| -> StoreResult<u64> {
                Ok(conn.execute(
                    &format!("DELETE FROM records WHERE state = ?1 AND {column} <= ?2"),
                    params![state.code(), cutoff],
                )? as u64)
            };
            Ok(Purged {
                delivered: gone(State::Delivered, "updated_ms", tombstones)?,
                dead: gone(State::Dead, "updated_ms", dead)?,
                orphan: gone(State::Orphan, "received_ms", orphans)?,
                routes: routes::purge_routes(conn, ms(now_ms))?,
            })
        })
    }

    fn stats(&self, now_ms: u64) -> BoxFuture<'static, StoreResult<Stats>> {
        self.read(move |conn, _| {
            let mut stats = Stats::default();
            let mut stmt =
                conn.prepare_cached("SELECT state, COUNT(*) FROM records GROUP BY state")?;
            let rows = stmt
                .query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))?
                .collect::<Result<Vec<_>, _>>()?;
            for (state, count) in rows {
                if let Some(state) = State::from_code(state) {
                    stats.counts[usize::from(state.code())] = unms(count);
                }
            }
            let oldest: Option<i64> = conn.query_row(
                "SELECT MIN(received_ms) FROM records WHERE state IN (?1, ?2)",
                params![State::Pending.code(), State::Delivering.code()],
                |r| r.get(0),
            )?;
            stats.oldest_pending =
                oldest.map(|t| Duration::from_millis(now_ms.saturating_sub(unms(t))));
            Ok(stats)
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn pragmas_follow_the_fsync_mode() {
        let dir = tempfile::tempdir().unwrap();
        for (fsync, synchronous) in [(Fsync::Always, 2), (Fsync::Batch, 1)] {
            let conn = Connection::open(dir.path().join("p.db")).unwrap();
            configure(&conn, fsync).unwrap();
            let get = |pragma: &str| -> String {
                conn.query_row(&format!("PRAGMA {pragma}"), [], |r| {
                    r.get::<_, rusqlite::types::Value>(0)
                })
                .map(|v| match v {
                    rusqlite::types::Value::Integer(i) => i.to_string(),
                    rusqlite::types::Value::Text(t) => t,
                    other => format!("{other:?}"),
                })
                .unwrap()
            };
            assert_eq!(get("journal_mode"), "wal");
            assert_eq!(get("synchronous"), synchronous.to_string());
            assert_eq!(get("secure_delete"), "1");
        }
    }
}
