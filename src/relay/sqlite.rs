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
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::oneshot;

use super::seal::{Keyring, Mac};
use super::{
    CallbackStore, Envelope, Ingest, LeaseToken, Leased, Opened, Orphan, Purged, PutOutcome,
    RecordId, RecordMeta, Retention, Route, Settle, State, Stats, StoreError, StoreResult,
};

/// The database file's name inside `data_dir`.
pub const DB_FILE: &str = "relay.db";
/// The schema's version (`PRAGMA user_version`).
const SCHEMA_VERSION: i64 = 1;
/// Most writes in one commit.
const MAX_GROUP: usize = 256;

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

/// One queued write: runs inside the group's transaction, answers after its commit.
trait Work: Send {
    fn apply(&mut self, conn: &Connection, keys: &Keyring);
    fn failed(&self) -> bool;
    fn finish(self: Box<Self>, committed: Result<(), String>);
}

struct Task<T, F> {
    run: F,
    out: Option<StoreResult<T>>,
    reply: oneshot::Sender<StoreResult<T>>,
}

impl<T, F> Work for Task<T, F>
where
    T: Send,
    F: Fn(&Connection, &Keyring) -> StoreResult<T> + Send,
{
    fn apply(&mut self, conn: &Connection, keys: &Keyring) {
        self.out = Some((self.run)(conn, keys));
    }

    fn failed(&self) -> bool {
        !matches!(self.out, Some(Ok(_)))
    }

    fn finish(self: Box<Self>, committed: Result<(), String>) {
        let out = match committed {
            Ok(()) => self.out.unwrap_or(Err(StoreError::Closed)),
            Err(e) => Err(StoreError::Commit(e)),
        };
        let _ = self.reply.send(out);
    }
}

/// Counters of the writer thread (for metrics and tests).
#[derive(Debug, Default)]
pub struct WriterStats {
    commits: AtomicU64,
    writes: AtomicU64,
    commit_micros: AtomicU64,
}

impl WriterStats {
    /// Commits made (each holds one or more writes).
    pub fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }

    /// Writes committed or refused.
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }

    /// Total time spent in `COMMIT`, in microseconds.
    pub fn commit_micros(&self) -> u64 {
        self.commit_micros.load(Ordering::Relaxed)
    }
}

struct Inner {
    writer: Mutex<Option<mpsc::Sender<Box<dyn Work>>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
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
        writer_conn.execute_batch(SCHEMA)?;
        writer_conn.execute_batch(&format!("PRAGMA user_version={SCHEMA_VERSION}"))?;
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

/// Takes the first queued write (blocking), then whatever else is queued, and commits them
/// together; answers each only after the commit.
fn writer_loop(
    conn: &Connection,
    keys: &Keyring,
    rx: &mpsc::Receiver<Box<dyn Work>>,
    stats: &WriterStats,
) {
    while let Ok(first) = rx.recv() {
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(work) => group.push(work),
                Err(_) => break,
            }
        }
        let mut dropped = vec![false; group.len()];
        let committed = commit_group(conn, keys, &mut group, &mut dropped, stats);
        stats
            .writes
            .fetch_add(group.len() as u64, Ordering::Relaxed);
        for (work, dropped) in group.into_iter().zip(dropped) {
            // A dropped write answers its own error, whatever became of the group.
            work.finish(if dropped { Ok(()) } else { committed.clone() });
        }
    }
}

/// Runs the group in one transaction, each write in a savepoint, and commits. Some errors
/// (`SQLITE_FULL`, I/O) make SQLite roll back the whole transaction, not just the
/// statement: then the write that failed is dropped from the group (marked in `dropped`,
/// its error kept) and the others are run again, so one write cannot cost the others.
fn commit_group(
    conn: &Connection,
    keys: &Keyring,
    group: &mut [Box<dyn Work>],
    dropped: &mut [bool],
    stats: &WriterStats,
) -> Result<(), String> {
    'group: loop {
        conn.execute_batch("BEGIN IMMEDIATE")
            .map_err(|e| e.to_string())?;
        for (work, dropped) in group.iter_mut().zip(dropped.iter_mut()) {
            if *dropped {
                continue;
            }
            let saved = conn.execute_batch("SAVEPOINT w");
            if let Err(e) = saved {
                let _ = conn.execute_batch("ROLLBACK");
                return Err(e.to_string());
            }
            work.apply(conn, keys);
            if work.failed() && conn.is_autocommit() {
                // The transaction is gone: run the group again without this write.
                *dropped = true;
                continue 'group;
            }
            let closed = if work.failed() {
                conn.execute_batch("ROLLBACK TO w; RELEASE w")
            } else {
                conn.execute_batch("RELEASE w")
            };
            if let Err(e) = closed {
                let _ = conn.execute_batch("ROLLBACK");
                return Err(e.to_string());
            }
        }
        break;
    }
    let started = Instant::now();
    let done = conn.execute_batch("COMMIT");
    stats.commit_micros.fetch_add(
        u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
        Ordering::Relaxed,
    );
    match done {
        Ok(()) => {
            stats.commits.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK");
            Err(e.to_string())
        }
    }
}

fn meta(row: &rusqlite::Row<'_>) -> rusqlite::Result<RecordMeta> {
    let id: Vec<u8> = row.get(0)?;
    let state: i64 = row.get(2)?;
    Ok(RecordMeta {
        id: RecordId(id.try_into().unwrap_or([0; 16])),
        acquirer: row.get(1)?,
        state: State::from_code(state).unwrap_or(State::Dead),
        size: unms(row.get(3)?),
        received_ms: unms(row.get(4)?),
        updated_ms: unms(row.get(5)?),
        due_ms: unms(row.get(6)?),
        attempts: small(row.get(7)?),
        duplicates: small(row.get(8)?),
        conflicts: small(row.get(9)?),
        key_id: row.get(10)?,
    })
}

fn random_lease() -> StoreResult<i64> {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).map_err(|_| StoreError::Seal)?;
    Ok(i64::from_be_bytes(b))
}

/// What a put carries to the writer: everything sealed or MACed already.
struct Sealed {
    id: RecordId,
    acquirer: String,
    key_id: String,
    dedup: Vec<(String, Mac)>,
    body: Vec<(String, Mac)>,
    request_mac: Mac,
    size: i64,
    request: Vec<u8>,
    envelope: Vec<u8>,
    route: Option<Vec<u8>>,
}

fn seal_ingest(keys: &Keyring, ingest: &Ingest) -> StoreResult<Sealed> {
    let id = RecordId::random().ok_or(StoreError::Seal)?;
    let acq = ingest.acquirer.as_str();
    let env = &ingest.envelope;
    let request_id = env.request_id.as_bytes();
    // `None` and `Some("")` must not collide: a leading flag byte.
    let action: Vec<u8> = match &env.action {
        Some(a) => [&[1u8][..], a.as_bytes()].concat(),
        None => vec![0u8],
    };
    let plain = env.encode().ok_or(StoreError::Seal)?;
    let envelope = keys
        .seal(id, acq, FIELD_ENVELOPE, &plain)
        .ok_or(StoreError::Seal)?;
    let request = keys
        .seal(id, acq, FIELD_REQUEST, request_id)
        .ok_or(StoreError::Seal)?;
    let route = match &ingest.route {
        Some(route) => Some(
            keys.seal(
                id,
                acq,
                FIELD_ROUTE,
                &route.encode().ok_or(StoreError::Seal)?,
            )
            .ok_or(StoreError::Seal)?,
        ),
        None => None,
    };
    Ok(Sealed {
        id,
        acquirer: ingest.acquirer.clone(),
        key_id: keys.current_id().to_owned(),
        dedup: keys.macs(MAC_DEDUP, &[acq.as_bytes(), request_id, &action]),
        body: keys.macs(MAC_BODY, &[env.content_type.as_bytes(), &env.body]),
        request_mac: keys.mac(MAC_REQUEST, &[acq.as_bytes(), request_id]),
        size: i64::try_from(env.body.len()).unwrap_or(i64::MAX),
        request,
        envelope,
        route,
    })
}

fn put_sealed(conn: &Connection, s: &Sealed, now: i64) -> StoreResult<PutOutcome> {
    for (key_id, dedup) in &s.dedup {
        let found: Option<(Vec<u8>, Vec<u8>)> = conn
            .query_row(
                "SELECT id, body_mac FROM records WHERE acquirer = ?1 AND dedup = ?2 AND key_id = ?3",
                params![s.acquirer, dedup.as_slice(), key_id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let Some((id, body_mac)) = found else {
            continue;
        };
        let id = RecordId(id.try_into().unwrap_or([0; 16]));
        let same = s
            .body
            .iter()
            .any(|(k, m)| k == key_id && m.as_slice() == body_mac.as_slice());
        let column = if same { "duplicates" } else { "conflicts" };
        conn.execute(
            &format!("UPDATE records SET {column} = {column} + 1 WHERE id = ?1"),
            params![id.0.as_slice()],
        )?;
        return Ok(if same {
            PutOutcome::Duplicate(id)
        } else {
            PutOutcome::Conflict(id)
        });
    }
    let state = if s.route.is_some() {
        State::Pending
    } else {
        State::Orphan
    };
    let dedup = s.dedup.first().map(|(_, m)| *m).ok_or(StoreError::Seal)?;
    let body = s.body.first().map(|(_, m)| *m).ok_or(StoreError::Seal)?;
    conn.execute(
        "INSERT INTO records (id, acquirer, key_id, dedup, request_mac, body_mac, size, state,
           received_ms, updated_ms, due_ms, attempts, lease, duplicates, conflicts,
           request, envelope, route)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?9, ?9, 0, NULL, 0, 0, ?10, ?11, ?12)",
        params![
            s.id.0.as_slice(),
            s.acquirer,
            s.key_id,
            dedup.as_slice(),
            s.request_mac.as_slice(),
            body.as_slice(),
            s.size,
            state.code(),
            now,
            s.request,
            s.envelope,
            s.route,
        ],
    )?;
    Ok(PutOutcome::Stored(s.id, state))
}

/// A leased row before opening.
struct RawLease {
    id: RecordId,
    acquirer: String,
    attempts: u32,
    received_ms: u64,
    lease: LeaseToken,
    envelope: Option<Vec<u8>>,
    route: Option<Vec<u8>>,
}

fn lease_rows(conn: &Connection, now: i64, until: i64, limit: i64) -> StoreResult<Vec<RawLease>> {
    conn.execute(
        "UPDATE records SET state = ?1, lease = NULL WHERE state = ?2 AND due_ms <= ?3",
        params![State::Pending.code(), State::Delivering.code(), now],
    )?;
    let mut stmt = conn.prepare_cached(
        "SELECT id, acquirer, attempts, received_ms, envelope, route FROM records
         WHERE state = ?1 AND due_ms <= ?2 ORDER BY due_ms LIMIT ?3",
    )?;
    let rows = stmt
        .query_map(params![State::Pending.code(), now, limit], |r| {
            let id: Vec<u8> = r.get(0)?;
            Ok(RawLease {
                id: RecordId(id.try_into().unwrap_or([0; 16])),
                acquirer: r.get(1)?,
                attempts: small(r.get(2)?).saturating_add(1),
                received_ms: unms(r.get(3)?),
                lease: LeaseToken(0),
                envelope: r.get(4)?,
                route: r.get(5)?,
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let mut leased = Vec::with_capacity(rows.len());
    for mut row in rows {
        row.lease = LeaseToken(random_lease()?);
        conn.execute(
            "UPDATE records SET state = ?1, due_ms = ?2, attempts = attempts + 1, lease = ?3,
               updated_ms = ?4 WHERE id = ?5",
            params![
                State::Delivering.code(),
                until,
                row.lease.0,
                now,
                row.id.0.as_slice()
            ],
        )?;
        leased.push(row);
    }
    Ok(leased)
}

fn open_lease(keys: &Keyring, raw: RawLease) -> Result<Leased, RecordId> {
    let id = raw.id;
    let envelope = raw
        .envelope
        .and_then(|e| keys.open(id, &raw.acquirer, FIELD_ENVELOPE, &e))
        .and_then(|p| Envelope::decode(&p))
        .ok_or(id)?;
    let route = raw
        .route
        .and_then(|r| keys.open(id, &raw.acquirer, FIELD_ROUTE, &r))
        .and_then(|p| Route::decode(&p))
        .ok_or(id)?;
    Ok(Leased {
        id,
        acquirer: raw.acquirer,
        attempts: raw.attempts,
        received_ms: raw.received_ms,
        lease: raw.lease,
        envelope,
        route,
    })
}

fn settle_row(
    conn: &Connection,
    id: RecordId,
    lease: LeaseToken,
    outcome: Settle,
    now: i64,
) -> StoreResult<bool> {
    let changed = match outcome {
        Settle::Delivered => conn.execute(
            "UPDATE records SET state = ?1, updated_ms = ?2, due_ms = ?2, lease = NULL,
               request = NULL, envelope = NULL, route = NULL
             WHERE id = ?3 AND state = ?4 AND lease = ?5",
            params![
                State::Delivered.code(),
                now,
                id.0.as_slice(),
                State::Delivering.code(),
                lease.0
            ],
        )?,
        Settle::RetryAt(due) => conn.execute(
            "UPDATE records SET state = ?1, updated_ms = ?2, due_ms = ?3, lease = NULL
             WHERE id = ?4 AND state = ?5 AND lease = ?6",
            params![
                State::Pending.code(),
                now,
                ms(due),
                id.0.as_slice(),
                State::Delivering.code(),
                lease.0
            ],
        )?,
        Settle::Dead => conn.execute(
            "UPDATE records SET state = ?1, updated_ms = ?2, due_ms = ?2, lease = NULL
             WHERE id = ?3 AND state = ?4 AND lease = ?5",
            params![
                State::Dead.code(),
                now,
                id.0.as_slice(),
                State::Delivering.code(),
                lease.0
            ],
        )?,
    };
    Ok(changed == 1)
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
        self.write(move |conn, _| put_sealed(conn, &sealed, ms(now_ms)))
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
            let plain = route.encode().ok_or(StoreError::Seal)?;
            let mut routed = Vec::new();
            for (key_id, mac) in
                keys.macs(MAC_REQUEST, &[acquirer.as_bytes(), request_id.as_bytes()])
            {
                let mut stmt = conn.prepare_cached(
                    "SELECT id FROM records WHERE acquirer = ?1 AND request_mac = ?2
                       AND key_id = ?3 AND state = ?4",
                )?;
                let ids = stmt
                    .query_map(
                        params![acquirer, mac.as_slice(), key_id, State::Orphan.code()],
                        |r| r.get::<_, Vec<u8>>(0),
                    )?
                    .collect::<Result<Vec<_>, _>>()?;
                for id in ids {
                    let id = RecordId(id.try_into().unwrap_or([0; 16]));
                    let sealed = keys
                        .seal(id, &acquirer, FIELD_ROUTE, &plain)
                        .ok_or(StoreError::Seal)?;
                    conn.execute(
                        "UPDATE records SET state = ?1, route = ?2, due_ms = ?3, updated_ms = ?3
                         WHERE id = ?4",
                        params![State::Pending.code(), sealed, ms(now_ms), id.0.as_slice()],
                    )?;
                    routed.push(id);
                }
            }
            Ok(routed)
        })
    }

    fn orphans(&self, limit: usize) -> BoxFuture<'static, StoreResult<Vec<Orphan>>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read(move |conn, keys| {
            let mut stmt = conn.prepare_cached(
                "SELECT id, acquirer, request, received_ms FROM records WHERE state = ?1
                 ORDER BY received_ms LIMIT ?2",
            )?;
            let rows = stmt
                .query_map(params![State::Orphan.code(), limit], |r| {
                    let id: Vec<u8> = r.get(0)?;
                    Ok((
                        RecordId(id.try_into().unwrap_or([0; 16])),
                        r.get::<_, String>(1)?,
                        r.get::<_, Option<Vec<u8>>>(2)?,
                        unms(r.get(3)?),
                    ))
                })?
                .collect::<Result<Vec<_>, _>>()?;
            let mut out = Vec::with_capacity(rows.len());
            for (id, acquirer, request, received_ms) in rows {
                let request_id = request
                    .and_then(|r| keys.open(id, &acquirer, FIELD_REQUEST, &r))
                    .and_then(|p| String::from_utf8(p).ok());
                match request_id {
                    Some(request_id) => out.push(Orphan {
                        id,
                        acquirer,
                        request_id,
                        received_ms,
                    }),
                    None => tracing::error!(record = %id, "relay orphan does not open under the listed keys"),
                }
            }
            Ok(out)
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
                    let mut stmt = conn.prepare("SELECT DISTINCT acquirer FROM records")?;
                    stmt.query_map([], |r| r.get(0))?
                        .collect::<Result<Vec<_>, _>>()?
                }
            };
            let mut removed = 0u64;
            for acq in acquirers {
                for (key_id, mac) in keys.macs(MAC_REQUEST, &[acq.as_bytes(), request_id.as_bytes()]) {
                    removed += conn.execute(
                        "DELETE FROM records WHERE acquirer = ?1 AND request_mac = ?2 AND key_id = ?3",
                        params![acq, mac.as_slice(), key_id],
                    )? as u64;
                }
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
