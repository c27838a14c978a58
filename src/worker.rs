//! Which thread a request runs on. Each `server.workers` thread runs a current-thread
//! runtime of its own and keeps its own connections (Redis lanes, Diia pools): a
//! connection's driver task runs on the runtime that opened it, so a request using a
//! connection of another thread's runtime waits for two cross-thread wake-ups per round trip
//! (40–100 µs per round trip on a 2-vCPU VM, `benches/scaleout.rs`).

use std::cell::Cell;

thread_local! {
    static WORKER: Cell<bool> = const { Cell::new(false) };
}

/// Marks this thread as a `server.workers` thread (one current-thread runtime), so the
/// connections it uses are its own.
pub fn enter() {
    WORKER.with(|worker| worker.set(true));
}

/// Whether this thread is a `server.workers` thread.
#[must_use]
pub fn is_worker() -> bool {
    WORKER.with(Cell::get)
}
