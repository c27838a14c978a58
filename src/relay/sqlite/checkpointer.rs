//! Checkpoints off the commit path. SQLite's automatic checkpoint runs inside the commit
//! that crosses its threshold, so one callback in every few dozen waited for a copy of the
//! whole WAL into the database (and its fsync): the ack latency's p99 was that copy. Here
//! the writer's connection only signals, through its WAL hook, that the log has grown past
//! [`CHECKPOINT_PAGES`], and a thread of its own runs a `PASSIVE` checkpoint on another
//! connection while the writer goes on committing. A log only restarts from its start
//! once a checkpoint has caught up with it, which a checkpoint racing a busy writer never
//! quite does; so past [`CATCH_UP_PAGES`] the writer copies the remaining tail itself
//! (most of the log is in the database already) and its next commit restarts the log.

use std::path::Path;
use std::sync::mpsc;
use std::thread::JoinHandle;

use rusqlite::Connection;
use rusqlite::wal::CheckpointMode;

use super::super::StoreResult;
use super::{Fsync, configure};

/// Frames in the WAL that ask for a checkpoint (SQLite's own default threshold).
pub(super) const CHECKPOINT_PAGES: i32 = 1000;
/// Frames past which the writer catches up inline (16 MiB of 4 KiB pages).
pub(super) const CATCH_UP_PAGES: i32 = 4 * CHECKPOINT_PAGES;

/// Installs the writer's WAL hook (which also turns SQLite's automatic checkpoint off on
/// that connection) and starts the checkpoint thread. The thread ends when the writer's
/// connection is dropped (the hook, and the sender inside it, go with it).
pub(super) fn start(
    writer: &mut Connection,
    path: &Path,
    fsync: Fsync,
) -> StoreResult<JoinHandle<()>> {
    let conn = Connection::open(path)?;
    configure(&conn, fsync)?;
    let (kick, kicked) = mpsc::sync_channel::<()>(1);
    writer.wal_hook(Some(move |wal: &mut rusqlite::hooks::Wal, frames: i32| {
        if frames >= CATCH_UP_PAGES {
            // Busy when the thread is checkpointing right now: the next commit tries again.
            let _ = wal.checkpoint_v2(CheckpointMode::PASSIVE);
        } else if frames >= CHECKPOINT_PAGES {
            // Full: a checkpoint is asked for already.
            let _ = kick.try_send(());
        }
        Ok(())
    }))?;
    let thread = std::thread::Builder::new()
        .name("relay-checkpoint".into())
        .spawn(move || {
            while kicked.recv().is_ok() {
                let done = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                    r.get::<_, i64>(0)
                });
                if let Err(error) = done {
                    tracing::warn!(%error, "relay: WAL checkpoint failed; retried at the next commit");
                }
            }
        })?;
    Ok(thread)
}
