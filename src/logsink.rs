//! Where log lines go: `tracing-appender`'s non-blocking writer over a `BufWriter`, lossy.
//! A request never waits on a log write: a line that finds the channel full
//! ([`QUEUED_LINES`] lines) is dropped and counted (`diia_gateway_log_lines_dropped`); one
//! writer thread writes lines in the order they were queued and flushes the `BufWriter`
//! whenever the channel runs empty.
//!
//! A hand-written batched sink (per-thread buffers swapped out by the writer thread) was
//! measured against this in `loadtest/compare-wrk.sh` (alternating rounds, one run): its
//! medians were ~10 % better, but its rounds overlapped this writer's in two runs on the
//! shared 2-vCPU VM, so the crate is used ([performance](../docs/performance.md)).

use std::io::{BufWriter, Write};

use tracing_appender::non_blocking::{NonBlocking, NonBlockingBuilder, WorkerGuard};

/// Lines the channel holds before new ones are dropped: `tracing-appender`'s default.
pub const QUEUED_LINES: usize = 128_000;

/// A cloneable handle that queues lines for the writer thread.
#[derive(Clone)]
pub struct LogSink {
    writer: NonBlocking,
}

/// Writes what is queued and stops the writer thread when dropped.
pub struct FlushOnDrop {
    _guard: WorkerGuard,
}

impl LogSink {
    /// A sink writing to `out` through a `BufWriter`, holding at most `queued_lines` lines
    /// not written yet.
    pub fn spawn<W: Write + Send + 'static>(
        out: W,
        queued_lines: usize,
    ) -> std::io::Result<(Self, FlushOnDrop)> {
        let (writer, guard) = NonBlockingBuilder::default()
            .lossy(true)
            .buffered_lines_limit(queued_lines.max(1))
            .thread_name("diia-gateway-log")
            .finish(BufWriter::new(out));
        Ok((Self { writer }, FlushOnDrop { _guard: guard }))
    }

    /// Lines dropped because the channel was full.
    #[must_use]
    pub fn dropped(&self) -> u64 {
        u64::try_from(self.writer.error_counter().dropped_lines()).unwrap_or(u64::MAX)
    }

    /// Queues one line; drops and counts it when the channel is full.
    pub fn push(&self, line: &[u8]) {
        let _ = self.writer.clone().write_all(line);
    }
}

impl Write for LogSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.writer.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.writer.flush()
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogSink {
    type Writer = LogSink;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// An output that can be held up until the test lets it go.
    #[derive(Clone, Default)]
    struct Shared {
        lines: Arc<Mutex<Vec<u8>>>,
        gate: Arc<Mutex<()>>,
    }

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let _open = self.gate.lock().map_err(|_| std::io::ErrorKind::Other)?;
            self.lines
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
    fn lines_arrive_in_order_and_a_full_channel_drops_and_counts() {
        let out = Shared::default();
        // The writer is held up: once its `BufWriter` (8 KiB) is full, 16 queued lines
        // fill the channel.
        let held = out.gate.lock().expect("gate");
        let (mut sink, guard) = LogSink::spawn(out.clone(), 16).expect("thread");
        for n in 0..5000 {
            sink.write_all(format!("line {n}\n").as_bytes())
                .expect("never fails");
        }
        let dropped = sink.dropped();
        drop(held);
        drop(guard);
        let written = String::from_utf8(out.lines.lock().expect("lock").clone()).expect("utf-8");
        let lines: Vec<&str> = written.lines().collect();
        assert_eq!(lines.len() as u64 + dropped, 5000);
        assert!(dropped > 0, "a 16-line channel overflowed");
        assert_eq!(lines[0], "line 0");
        let numbers: Vec<u32> = lines
            .iter()
            .map(|l| l.trim_start_matches("line ").parse().expect("n"))
            .collect();
        assert!(numbers.windows(2).all(|w| w[0] < w[1]), "in order");
    }

    #[test]
    fn every_thread_is_written() {
        let out = Shared::default();
        let (sink, guard) = LogSink::spawn(out.clone(), QUEUED_LINES).expect("thread");
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
        drop(guard);
        let written = String::from_utf8(out.lines.lock().expect("lock").clone()).expect("utf-8");
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
