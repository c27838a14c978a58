//! Where log lines go: per-thread buffers that one background thread swaps out and writes
//! in batches. A request never waits on a log write: a line that would grow its thread's
//! buffer past the bound is dropped and counted (`diia_gateway_log_lines_dropped`).
//!
//! Why not `tracing-appender`'s non-blocking writer: it wakes its writer thread for every
//! line and writes each line with its own syscall; at tens of thousands of access-log lines
//! a second those wake-ups and writes cost more than the request itself (measured with
//! `loadtest/compare-wrk.sh`, docs/performance.md). Why not one queue of lines either (the
//! previous design): an allocation per line, freed on another thread, and a shared channel
//! whose cache lines move between cores on every line cost ~2 µs per request. Here a line
//! is appended to its thread's own buffer (a [`PerThread`] value) under an uncontended lock, behind a sequence
//! number from one shared counter; the writer thread wakes on its own every
//! [`FLUSH_EVERY`], swaps each buffer for an empty one, merges them by sequence and writes
//! everything at once. So lines come out in the order they were logged, across threads
//! (the one exception: two lines logged by different threads within the instant the
//! writer swaps their buffers may land in consecutive batches).
#![cfg_attr(feature = "log-appender", allow(dead_code, unused_imports))]

#[cfg(feature = "log-appender")]
mod appender;
#[cfg(feature = "log-appender")]
pub use appender::{FlushOnDrop, LogSink};

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::per_thread::PerThread;

/// How often the writer thread writes what is buffered.
pub const FLUSH_EVERY: Duration = Duration::from_millis(20);

#[cfg(not(feature = "log-appender"))]
/// A cloneable handle that buffers lines for the writer thread.
#[derive(Clone)]
pub struct LogSink {
    shared: Arc<Shared>,
}

/// What the writers and the writer thread share.
struct Shared {
    /// Every thread's buffer; the writer thread drains them all.
    buffers: PerThread<Vec<u8>>,
    /// Bytes one thread may hold between two flushes.
    per_thread: usize,
    dropped: AtomicU64,
    /// The order lines were logged in, across threads.
    sequence: AtomicU64,
}

/// Bytes before each line in a thread's buffer: its sequence number and its length.
const FRAME: usize = 12;

/// What a thread's buffer starts with.
const BUFFER_CAPACITY: usize = 16 * 1024;

#[cfg(not(feature = "log-appender"))]
/// Stops the writer thread when dropped, after it wrote everything buffered.
pub struct FlushOnDrop {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

#[cfg(not(feature = "log-appender"))]
impl Drop for FlushOnDrop {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(not(feature = "log-appender"))]
impl LogSink {
    /// A sink writing to `out`, each thread holding at most `per_thread` bytes between
    /// two flushes.
    pub fn spawn<W: Write + Send + 'static>(
        out: W,
        per_thread: usize,
    ) -> std::io::Result<(Self, FlushOnDrop)> {
        let shared = Arc::new(Shared {
            buffers: PerThread::new(),
            per_thread,
            dropped: AtomicU64::new(0),
            sequence: AtomicU64::new(0),
        });
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (stop, shared) = (Arc::clone(&stop), Arc::clone(&shared));
            std::thread::Builder::new()
                .name("diia-gateway-log".to_owned())
                .spawn(move || drain(&shared, out, &stop))?
        };
        Ok((
            Self { shared },
            FlushOnDrop {
                stop,
                thread: Some(thread),
            },
        ))
    }

    /// Lines dropped because their thread's buffer was full.
    #[must_use]
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// Appends one line to this thread's buffer; drops and counts it when that is full.
    pub fn push(&self, line: &[u8]) {
        let Ok(length) = u32::try_from(line.len()) else {
            self.shared.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        };
        self.shared.buffers.with(
            // Lines an ended thread left in the slot this thread reuses are kept: they
            // carry their sequence numbers, and the writer merges by those.
            |left| left.unwrap_or_else(|| Vec::with_capacity(BUFFER_CAPACITY)),
            |buffer| match buffer {
                Some(buffer) if buffer.len() + FRAME + line.len() <= self.shared.per_thread => {
                    let sequence = self.shared.sequence.fetch_add(1, Ordering::Relaxed);
                    buffer.extend_from_slice(&sequence.to_le_bytes());
                    buffer.extend_from_slice(&length.to_le_bytes());
                    buffer.extend_from_slice(line);
                }
                // Full, or the thread is being torn down.
                Some(_) | None => {
                    self.shared.dropped.fetch_add(1, Ordering::Relaxed);
                }
            },
        );
    }
}

/// The writer thread: every [`FLUSH_EVERY`], every thread's buffer swapped out, merged
/// by sequence and written in one write. Buffers of threads that have ended are written
/// one last time and dropped.
fn drain<W: Write>(shared: &Shared, mut out: W, stop: &AtomicBool) {
    let mut batch = Vec::with_capacity(64 * 1024);
    let mut taken: Vec<Vec<u8>> = Vec::new();
    loop {
        let stopping = stop.load(Ordering::Acquire);
        let mut swapped = 0;
        // A buffer of a thread that has ended is written this one last time and dropped.
        shared.buffers.retain(|buffer, alive| {
            if taken.len() == swapped {
                taken.push(Vec::new());
            }
            let into = &mut taken[swapped];
            into.clear();
            std::mem::swap(buffer, into);
            swapped += 1;
            alive
        });
        merge(&taken[..swapped], &mut batch);
        if !batch.is_empty() {
            let _ = out.write_all(&batch);
            let _ = out.flush();
            batch.clear();
        }
        if stopping {
            return;
        }
        std::thread::sleep(FLUSH_EVERY);
    }
}

/// Appends the lines of every framed buffer to `batch`, lowest sequence first.
fn merge(buffers: &[Vec<u8>], batch: &mut Vec<u8>) {
    let mut cursors = vec![0usize; buffers.len()];
    loop {
        let next = buffers
            .iter()
            .zip(&cursors)
            .enumerate()
            .filter_map(|(index, (buffer, &at))| Some((frame(buffer, at)?.0, index)))
            .min();
        let Some((_, index)) = next else { return };
        let at = cursors[index];
        let Some((_, line)) = frame(&buffers[index], at) else {
            return;
        };
        batch.extend_from_slice(line);
        cursors[index] = at + FRAME + line.len();
    }
}

/// The sequence number and line framed at `at`, if one is there whole.
fn frame(buffer: &[u8], at: usize) -> Option<(u64, &[u8])> {
    let header = buffer.get(at..at + FRAME)?;
    let sequence = u64::from_le_bytes(header[..8].try_into().ok()?);
    let length = u32::from_le_bytes(header[8..].try_into().ok()?) as usize;
    let line = buffer.get(at + FRAME..at + FRAME + length)?;
    Some((sequence, line))
}

#[cfg(not(feature = "log-appender"))]
impl Write for LogSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.push(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(not(feature = "log-appender"))]
impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogSink {
    type Writer = LogSink;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

#[cfg(not(feature = "log-appender"))]
#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .map_err(|_| std::io::ErrorKind::Other)?
                .extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_arrive_in_order_and_a_full_buffer_drops_and_counts() {
        let out = Shared::default();
        let (mut sink, guard) = LogSink::spawn(out.clone(), 64).expect("thread");
        for n in 0..1000 {
            sink.write_all(format!("line {n}\n").as_bytes())
                .expect("never fails");
        }
        let dropped = sink.dropped();
        drop(guard);
        let written = String::from_utf8(out.0.lock().expect("lock").clone()).expect("utf-8");
        let lines: Vec<&str> = written.lines().collect();
        assert_eq!(lines.len() as u64 + dropped, 1000);
        assert!(dropped > 0, "a 64-byte buffer overflowed");
        assert_eq!(lines[0], "line 0");
        let numbers: Vec<u32> = lines
            .iter()
            .map(|l| l.trim_start_matches("line ").parse().expect("n"))
            .collect();
        assert!(numbers.windows(2).all(|w| w[0] < w[1]), "in order");
    }

    #[test]
    fn lines_of_different_threads_come_out_in_logging_order() {
        let out = Shared::default();
        let (sink, guard) = LogSink::spawn(out.clone(), 1 << 20).expect("thread");
        // Two threads take turns: even numbers on one, odd on the other.
        let (to_odd, odd_turn) = std::sync::mpsc::channel::<u32>();
        let (to_even, even_turn) = std::sync::mpsc::channel::<u32>();
        let odd = {
            let sink = sink.clone();
            std::thread::spawn(move || {
                while let Ok(n) = odd_turn.recv() {
                    sink.push(format!("{n}\n").as_bytes());
                    if to_even.send(n + 1).is_err() {
                        return;
                    }
                }
            })
        };
        for n in (0..40).step_by(2) {
            sink.push(format!("{n}\n").as_bytes());
            to_odd.send(n + 1).expect("odd thread");
            assert_eq!(even_turn.recv().expect("odd thread"), n + 2);
        }
        drop(to_odd);
        odd.join().expect("thread");
        drop(guard);
        let written = String::from_utf8(out.0.lock().expect("lock").clone()).expect("utf-8");
        let numbers: Vec<u32> = written.lines().map(|l| l.parse().expect("n")).collect();
        assert_eq!(numbers, (0..40).collect::<Vec<_>>());
    }

    #[test]
    fn every_thread_is_written_including_threads_that_ended() {
        let out = Shared::default();
        let (sink, guard) = LogSink::spawn(out.clone(), 1 << 20).expect("thread");
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let sink = sink.clone();
                std::thread::spawn(move || {
                    for n in 0..100 {
                        sink.push(format!("t{t} {n}\n").as_bytes());
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().expect("thread");
        }
        std::thread::sleep(FLUSH_EVERY * 3);
        assert_eq!(
            sink.shared.buffers.len(),
            0,
            "ended threads' buffers are released"
        );
        drop(guard);
        let written = String::from_utf8(out.0.lock().expect("lock").clone()).expect("utf-8");
        assert_eq!(written.lines().count(), 400);
        for t in 0..4 {
            let mine: Vec<u32> = written
                .lines()
                .filter_map(|l| l.strip_prefix(&format!("t{t} ")))
                .map(|n| n.parse().expect("n"))
                .collect();
            assert_eq!(mine, (0..100).collect::<Vec<_>>(), "thread {t} in order");
        }
    }
}
