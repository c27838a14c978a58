//! The watchdog over hyper's connections: HTTP/2 answers stuck without send window, and
//! connections kept open with no stream.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::{Body, Frame, SizeHint};

/// What the streams of one of hyper's connections are doing, for its watchdog: HTTP/2's
/// flow control happens inside hyper, where a stream whose peer gives no send window just
/// waits (the socket stays writable, and the peer keeps answering pings), so the
/// connection itself has to notice.
///
/// A stream is open from its request head to the moment hyper has taken its answer whole
/// (for HTTP/2: its last frame got send window), and waiting from its answer being ready
/// to that moment.
pub(crate) struct Streams {
    state: std::sync::Mutex<StreamCounts>,
}

pub(crate) struct StreamCounts {
    open: u32,
    waiting: u32,
    /// When `open` last changed (when it is 0: since when the connection is idle).
    changed: tokio::time::Instant,
    /// The last send progress: an answer taken whole or in part, or the first one to wait.
    progressed: tokio::time::Instant,
}

/// Why the watchdog ends a connection.
#[derive(Debug)]
pub(crate) enum Verdict {
    /// Answers have been waiting for send window for `send_timeout`, with no progress.
    Stalled,
    /// No stream open for `idle_timeout`.
    Idle,
}

impl Streams {
    pub(crate) fn new() -> Self {
        let now = tokio::time::Instant::now();
        Self {
            state: std::sync::Mutex::new(StreamCounts {
                open: 0,
                waiting: 0,
                changed: now,
                progressed: now,
            }),
        }
    }

    /// The counts; nothing panics while they are held, so a poisoned lock is still sound.
    fn counts(&self) -> std::sync::MutexGuard<'_, StreamCounts> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A request head arrived.
    pub(crate) fn open(this: &Arc<Self>) -> StreamGuard {
        let mut counts = this.counts();
        counts.open += 1;
        counts.changed = tokio::time::Instant::now();
        drop(counts);
        StreamGuard {
            streams: Arc::clone(this),
            waiting: false,
        }
    }

    /// Resolves when the connection should end: its answers stalled for `send_timeout`, or
    /// it sat without a stream for `idle_timeout`.
    pub(crate) async fn watch(&self, send_timeout: Duration, idle_timeout: Duration) -> Verdict {
        loop {
            let now = tokio::time::Instant::now();
            // Counts change while this sleeps: an answer that gets ready from now on
            // cannot stall before `now + send_timeout`, and streams that all end from now
            // on leave the connection idle no sooner than `now + idle_timeout`; looking
            // again by the sooner of the two finds either in time.
            let soonest = now + send_timeout.min(idle_timeout);
            let deadline = {
                let counts = self.counts();
                if counts.waiting > 0 {
                    let stalled = counts.progressed + send_timeout;
                    if stalled <= now {
                        return Verdict::Stalled;
                    }
                    stalled
                } else if counts.open == 0 {
                    let idle = counts.changed + idle_timeout;
                    if idle <= now {
                        return Verdict::Idle;
                    }
                    idle
                } else {
                    soonest
                }
            };
            tokio::time::sleep_until(deadline.min(soonest)).await;
        }
    }
}

/// One open stream; dropped when hyper has taken its answer whole (or the stream ended).
pub(crate) struct StreamGuard {
    streams: Arc<Streams>,
    waiting: bool,
}

impl StreamGuard {
    /// The answer is ready: from now on it waits to be sent.
    pub(crate) fn answered(mut self) -> Self {
        let mut counts = self.streams.counts();
        counts.waiting += 1;
        if counts.waiting == 1 {
            counts.progressed = tokio::time::Instant::now();
        }
        drop(counts);
        self.waiting = true;
        self
    }

    /// Part of the answer went out.
    fn progressed(&self) {
        self.streams.counts().progressed = tokio::time::Instant::now();
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let mut counts = self.streams.counts();
        let now = tokio::time::Instant::now();
        counts.open = counts.open.saturating_sub(1);
        counts.changed = now;
        if self.waiting {
            counts.waiting = counts.waiting.saturating_sub(1);
            counts.progressed = now;
        }
    }
}

/// An answer's body that keeps its stream open until hyper has taken all of it, and tells
/// the watchdog of its progress.
///
/// hyper's HTTP/2 side asks for the next data frame as soon as it has queued the previous
/// one, and queues a frame once it has any send window for it (holding back what the
/// window does not cover). So for HTTP/2 the data goes in frames of at most [`H2_PIECE`]
/// bytes, the last byte alone: a frame is asked for only once the one before the previous
/// was sent whole, which makes each ask from the third on proof that the peer took one
/// more frame's worth (the second only proves one byte of window: no progress); and the
/// body, with its stream, is dropped only once every byte but the last was sent. A peer
/// that gives no window, or one byte per stream and no more, keeps its bodies without
/// progress, and the watchdog sees the stall. HTTP/1.1 answers go as they are.
pub(crate) struct Watched {
    body: Full<Bytes>,
    /// HTTP/2: what is left of the data, still to be cut into pieces.
    rest: Bytes,
    /// Pieces handed to hyper so far.
    pieces: u32,
    split: bool,
    stream: Option<StreamGuard>,
}

/// HTTP/2's default largest frame: pieces this size add no frames but the last byte's.
const H2_PIECE: usize = 16 * 1024;

impl Watched {
    pub(crate) fn new(body: Full<Bytes>, stream: StreamGuard, split: bool) -> Self {
        Self {
            body,
            rest: Bytes::new(),
            pieces: 0,
            split,
            stream: Some(stream),
        }
    }

    /// The next piece of `rest`: at most [`H2_PIECE`] bytes, and the last byte alone.
    fn piece(&mut self) -> Bytes {
        self.pieces = self.pieces.saturating_add(1);
        let left = self.rest.len();
        let take = if left <= 1 {
            left
        } else {
            (left - 1).min(H2_PIECE)
        };
        self.rest.split_to(take)
    }
}

impl Body for Watched {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if !this.rest.is_empty() {
            if let Some(stream) = this.stream.as_ref().filter(|_| this.pieces >= 2) {
                stream.progressed();
            }
            return Poll::Ready(Some(Ok(Frame::data(this.piece()))));
        }
        match Pin::new(&mut this.body).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                Ok(data) if this.split => {
                    this.rest = data;
                    Poll::Ready(Some(Ok(Frame::data(this.piece()))))
                }
                Ok(data) => Poll::Ready(Some(Ok(Frame::data(data)))),
                Err(frame) => Poll::Ready(Some(Ok(frame))),
            },
            Poll::Ready(None) => {
                this.stream = None;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(never))) => match never {},
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty() && self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let rest = self.rest.len() as u64;
        let body = self.body.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(body.lower() + rest);
        if let Some(upper) = body.upper() {
            hint.set_upper(upper + rest);
        }
        hint
    }
}
