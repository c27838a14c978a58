//! The writer thread: one transaction per group of queued writes, each in a savepoint,
//! every waiter answered after the group's commit.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::Instant;

use rusqlite::Connection;
use tokio::sync::oneshot;

use super::super::{StoreError, StoreResult};
use super::{Keyring, MAX_GROUP};

/// One queued write: runs inside the group's transaction, answers after its commit.
pub(super) trait Work: Send {
    fn apply(&mut self, conn: &Connection, keys: &Keyring);
    fn failed(&self) -> bool;
    fn finish(self: Box<Self>, committed: Result<(), String>);
}

pub(super) struct Task<T, F> {
    pub(super) run: F,
    pub(super) out: Option<StoreResult<T>>,
    pub(super) reply: oneshot::Sender<StoreResult<T>>,
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

/// Takes the first queued write (blocking), then whatever else is queued, and commits them
/// together; answers each only after the commit.
pub(super) fn writer_loop(
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
