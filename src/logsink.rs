//! Where log lines go: a bounded queue drained by one background thread that writes them in
//! batches. A request never waits on a log write: when the queue is full the line is
//! dropped and counted (`diia_gateway_log_lines_dropped`).
//!
//! Why not `tracing-appender`'s non-blocking writer: it wakes its writer thread for every
//! line and writes each line with its own syscall; at tens of thousands of access-log lines
//! a second those wake-ups and writes cost more than the request itself (measured with
//! `loadtest/compare-wrk.sh`, README "Benchmarks"). Here the writer thread wakes on its
//! own every [`FLUSH_EVERY`], so senders never wake it, and writes everything queued at
//! once.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::thread::JoinHandle;
use std::time::Duration;

/// How often the writer thread writes what is queued.
pub const FLUSH_EVERY: Duration = Duration::from_millis(20);

/// A cloneable handle that queues lines for the writer thread.
#[derive(Clone)]
pub struct LogSink {
    lines: SyncSender<Vec<u8>>,
    dropped: Arc<AtomicU64>,
}

/// Stops the writer thread when dropped, after it wrote everything queued.
pub struct FlushOnDrop {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for FlushOnDrop {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl LogSink {
    /// A sink writing to `out` through a queue of at most `capacity` lines.
    pub fn spawn<W: Write + Send + 'static>(
        out: W,
        capacity: usize,
    ) -> std::io::Result<(Self, FlushOnDrop)> {
        let (lines, queue) = sync_channel(capacity);
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = Arc::clone(&stop);
            std::thread::Builder::new()
                .name("diia-gateway-log".to_owned())
                .spawn(move || drain(&queue, out, &stop))?
        };
        let sink = Self {
            lines,
            dropped: Arc::new(AtomicU64::new(0)),
        };
        Ok((
            sink,
            FlushOnDrop {
                stop,
                thread: Some(thread),
            },
        ))
    }

    /// Lines dropped because the queue was full.
    #[must_use]
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// The writer thread: every [`FLUSH_EVERY`], everything queued in one write.
fn drain<W: Write>(queue: &Receiver<Vec<u8>>, mut out: W, stop: &AtomicBool) {
    let mut batch = Vec::with_capacity(64 * 1024);
    loop {
        let stopping = stop.load(Ordering::Acquire);
        while let Ok(line) = queue.try_recv() {
            batch.extend_from_slice(&line);
        }
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

impl LogSink {
    /// Queues one line (a copy of it); drops and counts it when the queue is full.
    pub fn push(&self, line: &[u8]) {
        match self.lines.try_send(line.to_vec()) {
            Ok(()) | Err(TrySendError::Disconnected(_)) => {}
            Err(TrySendError::Full(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

impl Write for LogSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.push(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
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
    fn lines_arrive_in_order_and_a_full_queue_drops_and_counts() {
        let out = Shared::default();
        let (mut sink, guard) = LogSink::spawn(out.clone(), 4).expect("thread");
        for n in 0..1000 {
            sink.write_all(format!("line {n}\n").as_bytes())
                .expect("never fails");
        }
        let dropped = sink.dropped();
        drop(guard);
        let written = String::from_utf8(out.0.lock().expect("lock").clone()).expect("utf-8");
        let lines: Vec<&str> = written.lines().collect();
        assert_eq!(lines.len() as u64 + dropped, 1000);
        assert!(dropped > 0, "a 4-line queue overflowed");
        assert_eq!(lines[0], "line 0");
        let numbers: Vec<u32> = lines
            .iter()
            .map(|l| l.trim_start_matches("line ").parse().expect("n"))
            .collect();
        assert!(numbers.windows(2).all(|w| w[0] < w[1]), "in order");
    }
}
