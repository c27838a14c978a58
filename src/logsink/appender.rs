//! The same `LogSink` face over `tracing-appender`'s non-blocking writer and a `BufWriter`
//! (feature `log-appender`): the reference `loadtest/compare-wrk.sh` measures the batched
//! sink against. Lines go to one bounded channel (lossy: a full channel drops and counts),
//! a writer thread writes them into the `BufWriter` and flushes it whenever the channel
//! runs empty.

use std::io::{BufWriter, Write};

use tracing_appender::non_blocking::{NonBlocking, NonBlockingBuilder, WorkerGuard};

/// A cloneable handle that queues lines for the writer thread.
#[derive(Clone)]
pub struct LogSink {
    writer: NonBlocking,
}

/// Flushes what is queued and stops the writer thread when dropped.
pub struct FlushOnDrop {
    _guard: WorkerGuard,
}

/// Lines the channel holds: `tracing-appender`'s default.
const QUEUED_LINES: usize = 128_000;

impl LogSink {
    /// A sink writing to `out` through a `BufWriter`; `_per_thread` (the batched sink's
    /// bound) has no counterpart here: the channel holds [`QUEUED_LINES`].
    pub fn spawn<W: Write + Send + 'static>(
        out: W,
        _per_thread: usize,
    ) -> std::io::Result<(Self, FlushOnDrop)> {
        let (writer, guard) = NonBlockingBuilder::default()
            .lossy(true)
            .buffered_lines_limit(QUEUED_LINES)
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
