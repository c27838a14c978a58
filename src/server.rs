//! The accept loop shared by the gateway and its admin listener.
//!
//! Every connection starts in the gateway's own HTTP/1.1 loop ([`crate::h1`]), which
//! serves plain, complete requests (the branch backends' traffic) and writes cached
//! answers from their pre-rendered bytes. Anything else (HTTP/2, h2c prior knowledge,
//! chunked or `Expect` bodies, upgrades, trickled or oversized heads, malformed HTTP) is
//! handed, with the bytes already read, to hyper-util's auto builder for the rest of the
//! connection. Before any of it, the handler's [`Clients`] read a trusted proxy's PROXY
//! header and count the connection against its client. On shutdown the loop stops accepting, then lets open connections finish
//! their in-flight requests within a bounded drain time.
//!
//! Writing is bounded as reading is: the socket itself (`Socket`) fails a write that
//! makes no progress for `send_timeout` (whichever protocol writes), and hyper's
//! connections have a watchdog (`Streams`) for what the socket cannot see: HTTP/2
//! answers waiting for send window the peer never gives, and an HTTP/2 connection kept
//! open by pings alone.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderValue, Request, Response};
use http_body_util::Full;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_io_timeout::TimeoutStream;
use tokio_rustls::TlsAcceptor;

use crate::answer::Answer;
use crate::client::{Accepted, Clients};
use crate::h1::{self, Served};
use crate::head::RequestHead;
use crate::tls::ClientCert;

/// A connection's byte stream, plain or TLS.
pub(crate) trait Io: AsyncRead + AsyncWrite + Send + Unpin {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What every handler answers: a fully buffered body (answers are small and cacheable).
pub type HttpResponse = Response<Full<Bytes>>;

/// A handler's answer: a response, or one of Diia's answers with its `Cache-Status`,
/// which the HTTP/1.1 loop writes from the answer's pre-rendered head without building
/// a `HeaderMap` (the cache hit's fast path).
pub enum Reply {
    /// Any response.
    Response(HttpResponse),
    /// Diia's answer as stored, plus the `Cache-Status` it is served with, if any.
    Answer {
        /// The answer.
        answer: Answer,
        /// `Cache-Status`, when the answer went through a cache.
        cache_status: Option<&'static HeaderValue>,
    },
}

impl Reply {
    /// The reply as a response (for hyper's connections and in-process callers).
    #[must_use]
    pub fn into_response(self) -> HttpResponse {
        match self {
            Self::Response(response) => response,
            Self::Answer {
                answer,
                cache_status,
            } => {
                let mut response = crate::proxy::answer_response(&answer);
                if let Some(status) = cache_status {
                    response
                        .headers_mut()
                        .insert(crate::proxy::CACHE_STATUS.clone(), status.clone());
                }
                response
            }
        }
    }

    /// The status sent.
    #[must_use]
    pub fn status(&self) -> http::StatusCode {
        match self {
            Self::Response(response) => response.status(),
            Self::Answer { answer, .. } => answer.status,
        }
    }
}

/// A request's body: hyper's (HTTP/2 and handed-over connections), or one the HTTP/1.1
/// loop read whole, or the start of one it is still reading from the socket.
pub struct RequestBody(BodyKind);

enum BodyKind {
    Hyper(Incoming),
    Whole(Option<Bytes>),
    Streamed {
        first: Option<Bytes>,
        rest: mpsc::Receiver<std::io::Result<Bytes>>,
        remaining: u64,
    },
}

impl RequestBody {
    /// A body already read whole (empty bodies included).
    #[must_use]
    pub fn whole(bytes: Bytes) -> Self {
        Self(BodyKind::Whole((!bytes.is_empty()).then_some(bytes)))
    }

    /// A body of `length` bytes whose first part is `first` and the rest arrives on `rest`
    /// (a read error or a closed channel before `length` bytes is a broken body).
    pub(crate) fn streamed(
        first: Bytes,
        rest: mpsc::Receiver<std::io::Result<Bytes>>,
        length: u64,
    ) -> Self {
        let remaining = length.saturating_sub(first.len() as u64);
        Self(BodyKind::Streamed {
            first: (!first.is_empty()).then_some(first),
            rest,
            remaining,
        })
    }
}

impl From<Incoming> for RequestBody {
    fn from(body: Incoming) -> Self {
        Self(BodyKind::Hyper(body))
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.get_mut().0 {
            BodyKind::Hyper(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
            BodyKind::Whole(bytes) => Poll::Ready(bytes.take().map(|data| Ok(Frame::data(data)))),
            BodyKind::Streamed {
                first,
                rest,
                remaining,
            } => {
                if let Some(data) = first.take() {
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                if *remaining == 0 {
                    return Poll::Ready(None);
                }
                match rest.poll_recv(cx) {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(Some(Ok(data))) => {
                        *remaining = remaining.saturating_sub(data.len() as u64);
                        Poll::Ready(Some(Ok(Frame::data(data))))
                    }
                    Poll::Ready(Some(Err(error))) => Poll::Ready(Some(Err(error.into()))),
                    Poll::Ready(None) => {
                        Poll::Ready(Some(Err("connection closed mid-body".into())))
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.0 {
            BodyKind::Hyper(body) => body.is_end_stream(),
            BodyKind::Whole(bytes) => bytes.is_none(),
            BodyKind::Streamed {
                first, remaining, ..
            } => first.is_none() && *remaining == 0,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            BodyKind::Hyper(body) => body.size_hint(),
            BodyKind::Whole(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
            BodyKind::Streamed {
                first, remaining, ..
            } => SizeHint::with_exact(first.as_ref().map_or(0, |b| b.len() as u64) + remaining),
        }
    }
}

/// A request handler: request plus its client's address in (the TCP peer, or whom a
/// trusted proxy names, see [`crate::client`]), reply out, never an error.
pub trait Handler: Send + Sync + 'static {
    /// Answers one request. Borrows the handler: the HTTP/1.1 loop awaits the future in
    /// place, so no owning wrapper (one level less of a kilobytes-large future built per
    /// request).
    fn handle(
        &self,
        head: RequestHead,
        body: RequestBody,
        peer: SocketAddr,
    ) -> impl Future<Output = Reply> + Send + '_;

    /// TLS for a new connection (`None`: plain HTTP). Read at accept time, so a reload
    /// changes certificates for new connections, never for open ones.
    fn tls(&self) -> Option<TlsAcceptor> {
        None
    }

    /// Who connects: trusted proxies' PROXY headers and connections per client (`None`:
    /// every peer is its own client, uncapped; the admin listener).
    fn clients(&self) -> Option<&Clients> {
        None
    }
}

/// Signals shutdown to every loop holding a receiver; cheap to clone.
#[derive(Clone, Debug)]
pub struct Shutdown {
    sender: Arc<watch::Sender<bool>>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self::new()
    }
}

impl Shutdown {
    /// A fresh, untriggered signal.
    #[must_use]
    pub fn new() -> Self {
        let (sender, _) = watch::channel(false);
        Self {
            sender: Arc::new(sender),
        }
    }

    /// Starts shutdown everywhere.
    pub fn trigger(&self) {
        self.sender.send_replace(true);
    }

    /// Whether shutdown has started.
    #[must_use]
    pub fn is_triggered(&self) -> bool {
        *self.sender.borrow()
    }

    /// Resolves once shutdown has started.
    pub async fn wait(&self) {
        let mut receiver = self.sender.subscribe();
        // An error means the sender is gone, which only happens when we are gone too.
        let _ = receiver.wait_for(|triggered| *triggered).await;
    }
}

/// Per-listener connection bounds.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Connections served at once; further clients wait in the kernel's accept queue.
    pub max_connections: usize,
    /// Time from accept to a complete first request head (TLS handshake, protocol
    /// sniffing, h1 headers or h2 preface + HEADERS included), and for each later h1 head.
    pub header_read_timeout: Duration,
    /// A connection with nothing to read for this long is closed; so is an HTTP/2
    /// connection without open streams, however faithfully it answers pings.
    pub idle_timeout: Duration,
    /// A write that makes no progress for this long fails and resets the connection; an
    /// HTTP/2 connection whose answers got no send window for this long is closed.
    pub send_timeout: Duration,
    /// After shutdown, time open connections get to finish in-flight requests.
    pub drain_timeout: Duration,
    /// Largest request head (h1 read buffer, h2 header list), in bytes; 431 above.
    pub max_header_bytes: usize,
    /// Concurrent h2 streams per connection.
    pub max_streams: u32,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            max_connections: 10_000,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(120),
            send_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(15),
            max_header_bytes: 32 * 1024,
            max_streams: 100,
        }
    }
}

/// hyper's HTTP/1.1 read buffer cannot be smaller.
const MIN_HEADER_BYTES: usize = 8192;

fn connection_builder(limits: &ConnectionLimits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes.max(MIN_HEADER_BYTES));
    let max_header_list = u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_streams)
        .max_header_list_size(max_header_list)
        // A peer that stops answering pings is gone: close instead of holding the slot.
        .keep_alive_interval(limits.idle_timeout / 2)
        .keep_alive_timeout(limits.header_read_timeout);
    builder
}

/// Accepts connections until `shutdown`, then drains for at most `limits.drain_timeout`.
pub async fn accept_loop<H: Handler>(
    listener: TcpListener,
    handler: Arc<H>,
    shutdown: Shutdown,
    limits: ConnectionLimits,
) {
    let builder = connection_builder(&limits);
    let max_connections = limits.max_connections.max(1);
    let slots = Arc::new(Semaphore::new(max_connections));
    loop {
        // Wait for a connection slot first: at the limit, new clients queue in the kernel
        // instead of being accepted and starved.
        let permit = tokio::select! {
            permit = Arc::clone(&slots).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            () = shutdown.wait() => break,
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.wait() => break,
        };
        let (stream, peer) = match accepted {
            Ok(pair) => pair,
            Err(error) => {
                // EMFILE and friends: back off briefly instead of spinning.
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let connection = serve_connection(
            stream,
            peer,
            Arc::clone(&handler),
            builder.clone(),
            limits,
            shutdown.clone(),
        );
        tokio::spawn(async move {
            connection.await;
            drop(permit);
        });
    }
    drop(listener);
    // Every connection holds a slot until it ends; all slots back means all drained.
    let drained = slots.acquire_many(u32::try_from(max_connections).unwrap_or(u32::MAX));
    if tokio::time::timeout(limits.drain_timeout, drained)
        .await
        .is_err()
    {
        tracing::warn!("drain deadline passed with connections still open");
    }
}

/// One connection: the client (a trusted proxy's PROXY header) and its per-client
/// connection count, then the TLS handshake when the handler asks for it, then the HTTP/1.1 loop,
/// and hyper (HTTP/1.1 or h2) for whatever that loop hands over, until the client leaves
/// or the drain ends it. The first request head must be complete within
/// `header_read_timeout` of accept, however the bytes trickle in: the idle timer alone
/// resets on every byte, and hyper's own header timer starts only once HTTP/1 is chosen.
async fn serve_connection<H: Handler>(
    stream: TcpStream,
    peer: SocketAddr,
    handler: Arc<H>,
    builder: auto::Builder<TokioExecutor>,
    limits: ConnectionLimits,
    shutdown: Shutdown,
) {
    let deadline = tokio::time::Instant::now() + limits.header_read_timeout;
    let _ = stream.set_nodelay(true);
    bound_unsent_data(&stream, limits.send_timeout);
    let state = Arc::new(ConnectionState::default());
    let mut stream = Socket::new(stream, limits.send_timeout, Arc::clone(&state));
    // The client first (a trusted proxy's PROXY header comes before TLS), then its place
    // in the per-client connection count, held until the connection ends.
    let accepted = match handler.clients() {
        None => Accepted {
            client: peer,
            slot: None,
            read: BytesMut::new(),
        },
        Some(clients) => {
            match tokio::time::timeout_at(deadline, clients.accept(&mut stream, peer)).await {
                Ok(Ok(accepted)) => accepted,
                Ok(Err(refused)) => {
                    tracing::debug!(%peer, %refused, "connection refused at accept");
                    clients.refused(&refused);
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "no PROXY header within header_read_timeout; closed");
                    clients.refused(&crate::client::Refused::ProxyHeader("timed out"));
                    return;
                }
            }
        }
    };
    let Accepted {
        client: peer,
        slot: _slot,
        read,
    } = accepted;
    let io = if read.is_empty() {
        secure(stream, handler.tls(), deadline).await
    } else {
        let io: Box<dyn Io> = Box::new(stream);
        secure(Rewind::new(read, io), handler.tls(), deadline).await
    };
    let Some((io, client_cert)) = io else {
        return;
    };
    let served = serve_protocols(
        io,
        peer,
        client_cert,
        handler,
        builder,
        limits,
        shutdown,
        &state,
    );
    let no_first_request = async {
        tokio::time::sleep_until(deadline).await;
        if state.first_request.load(Ordering::Relaxed) {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        () = served => {}
        () = no_first_request => {
            tracing::debug!("no complete request head within header_read_timeout of accept; closed");
        }
    }
}

/// Lets the kernel itself give up on data the peer does not take for `send_timeout`
/// (`TCP_USER_TIMEOUT`: unacknowledged, or held back by a zero window): the gateway's own
/// write deadline ([`Socket`]) ends a connection whose writes stall, but answers already in
/// the kernel's send buffer (which grows to hundreds of kilobytes) outlive the close, and
/// a reader that stops reading would otherwise keep them, and the orphaned socket, for as
/// long as it answers window probes.
fn bound_unsent_data(stream: &TcpStream, send_timeout: Duration) {
    #[cfg(any(target_os = "linux", target_os = "android", target_os = "fuchsia"))]
    if let Err(error) = socket2::SockRef::from(stream).set_tcp_user_timeout(Some(send_timeout)) {
        tracing::debug!(%error, "TCP_USER_TIMEOUT not set");
    }
    #[cfg(not(any(target_os = "linux", target_os = "android", target_os = "fuchsia")))]
    let _ = (stream, send_timeout);
}

/// The TLS handshake within `deadline` when `tls` is on, and the client certificate it
/// verified (read once for the whole connection); `None`: the handshake failed.
async fn secure<S: Io + 'static>(
    stream: S,
    tls: Option<TlsAcceptor>,
    deadline: tokio::time::Instant,
) -> Option<(Box<dyn Io>, Option<Arc<ClientCert>>)> {
    let Some(acceptor) = tls else {
        return Some((Box::new(stream), None));
    };
    match tokio::time::timeout_at(deadline, acceptor.accept(stream)).await {
        Ok(Ok(tls_stream)) => {
            let cert = tls_stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| Some(Arc::new(ClientCert::from_der(chain.first()?))));
            Some((Box::new(tls_stream), cert))
        }
        Ok(Err(error)) => {
            tracing::debug!(%error, "TLS handshake failed");
            None
        }
        Err(_) => {
            tracing::debug!("TLS handshake timed out");
            None
        }
    }
}

/// The gateway's HTTP/1.1 loop first; hyper for the rest of the connection when the loop
/// hands it over. Every request head carries the connection's client certificate.
#[allow(clippy::too_many_arguments)]
async fn serve_protocols<H: Handler>(
    mut io: Box<dyn Io>,
    peer: SocketAddr,
    client_cert: Option<Arc<ClientCert>>,
    handler: Arc<H>,
    builder: auto::Builder<TokioExecutor>,
    limits: ConnectionLimits,
    shutdown: Shutdown,
    state: &Arc<ConnectionState>,
) {
    let loop_limits = h1::LoopLimits {
        max_head_bytes: limits.max_header_bytes.max(MIN_HEADER_BYTES),
        idle_timeout: limits.idle_timeout,
    };
    let buffered = match h1::serve(
        &mut io,
        peer,
        client_cert.as_ref(),
        &handler,
        &shutdown,
        loop_limits,
        &state.first_request,
    )
    .await
    {
        Served::Closed => return,
        Served::HandOver(buffered) => buffered,
    };
    let streams = Arc::new(Streams::new());
    let seen = Arc::clone(state);
    let watched = Arc::clone(&streams);
    let service = service_fn(move |request: Request<Incoming>| {
        seen.first_request.store(true, Ordering::Relaxed);
        let stream = Streams::open(&watched);
        let split = request.version() == http::Version::HTTP_2;
        let handler = Arc::clone(&handler);
        let (parts, body) = request.into_parts();
        let peer = match handler.clients().filter(|c| c.reads_forwarding(peer.ip())) {
            Some(clients) => {
                let lines = parts.headers.get_all(clients.forwarding_header()).iter();
                clients.client_of(peer, lines.rev().map(HeaderValue::as_bytes))
            }
            None => peer,
        };
        let mut head = RequestHead::from_parts(parts);
        head.client_cert.clone_from(&client_cert);
        async move {
            let reply = handler.handle(head, RequestBody::from(body), peer).await;
            let answer = stream.answered();
            Ok::<_, Infallible>(
                reply
                    .into_response()
                    .map(|body| Watched::new(body, answer, split)),
            )
        }
    });
    // hyper's side gets the idle timeout as a read timeout (re-armed on every read, which
    // the HTTP/1.1 loop avoids: each re-arm wakes the runtime's driver).
    let mut io = TimeoutStream::new(Rewind::new(buffered, io));
    io.set_read_timeout(Some(limits.idle_timeout));
    let connection = builder
        .serve_connection(TokioIo::new(Box::pin(io)), service)
        .into_owned();
    let mut connection = std::pin::pin!(connection);
    let mut closing = false;
    let result = loop {
        tokio::select! {
            result = connection.as_mut() => break result,
            () = shutdown.wait(), if !closing => {
                connection.as_mut().graceful_shutdown();
                closing = true;
            }
            verdict = streams.watch(&limits) => {
                tracing::debug!(?verdict, "closing the connection");
                if !closing {
                    connection.as_mut().graceful_shutdown();
                }
                match tokio::time::timeout(CLOSE_GRACE, connection.as_mut()).await {
                    Ok(result) => break result,
                    Err(_) => {
                        // Streams still stuck after the GOAWAY: drop them, resetting.
                        state.reset.store(true, Ordering::Relaxed);
                        return;
                    }
                }
            }
        }
    };
    if let Err(error) = result {
        tracing::debug!(%error, "connection ended with an error");
    }
}

/// How long a connection the watchdog closes gets to finish after its GOAWAY (or, for
/// HTTP/1.1, its last answer) before it is dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// What one connection's parts share.
#[derive(Default)]
struct ConnectionState {
    /// A first request head arrived (the `header_read_timeout` from accept is over).
    first_request: AtomicBool,
    /// Drop the connection with a reset, not a close ([`Socket`]).
    reset: AtomicBool,
}

/// The connection's TCP socket, carrying the send deadline every protocol shares: a write,
/// flush or shutdown that makes no progress for `send_timeout` fails with `TimedOut` (a
/// reader that stopped reading while the kernel's buffers are full). A connection that
/// ends that way, or that the stream watchdog cuts off, is reset when dropped instead of
/// closed (`SO_LINGER` 0, as NGINX's `reset_timedout_connection`): its unsent bytes are
/// thrown away at once, not retried by the kernel for minutes to a peer that never reads.
///
/// The timer is armed only when a write cannot go out at once (none on the usual path).
struct Socket {
    stream: TcpStream,
    send_timeout: Duration,
    /// Runs while a write is pending; kept for the next stall once allocated.
    stall: Option<Pin<Box<tokio::time::Sleep>>>,
    armed: bool,
    state: Arc<ConnectionState>,
}

impl Socket {
    fn new(stream: TcpStream, send_timeout: Duration, state: Arc<ConnectionState>) -> Self {
        Self {
            stream,
            send_timeout,
            stall: None,
            armed: false,
            state,
        }
    }

    /// Passes a write-side poll through, timing how long it stays pending.
    fn watch<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<std::io::Result<T>>,
    ) -> Poll<std::io::Result<T>> {
        if polled.is_ready() {
            self.armed = false;
            return polled;
        }
        if !self.armed {
            self.armed = true;
            let deadline = tokio::time::Instant::now() + self.send_timeout;
            match &mut self.stall {
                Some(stall) => stall.as_mut().reset(deadline),
                None => self.stall = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
        }
        let expired = self
            .stall
            .as_mut()
            .is_some_and(|stall| stall.as_mut().poll(cx).is_ready());
        if !expired {
            return Poll::Pending;
        }
        self.armed = false;
        self.state.reset.store(true, Ordering::Relaxed);
        tracing::debug!("no write progress for send_timeout; the connection is reset");
        Poll::Ready(Err(std::io::ErrorKind::TimedOut.into()))
    }
}

impl Drop for Socket {
    fn drop(&mut self) {
        if self.state.reset.load(Ordering::Relaxed) {
            let _ = self.stream.set_zero_linger();
        }
    }
}

impl AsyncRead for Socket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Socket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.stream).poll_write(cx, buf);
        this.watch(cx, polled)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        this.watch(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.stream).poll_flush(cx);
        this.watch(cx, polled)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.stream).poll_shutdown(cx);
        this.watch(cx, polled)
    }
}

/// What the streams of one of hyper's connections are doing, for its watchdog: HTTP/2's
/// flow control happens inside hyper, where a stream whose peer gives no send window just
/// waits (the socket stays writable, and the peer keeps answering pings), so the
/// connection itself has to notice.
///
/// A stream is open from its request head to the moment hyper has taken its answer whole
/// (for HTTP/2: its last frame got send window), and waiting from its answer being ready
/// to that moment.
struct Streams {
    state: std::sync::Mutex<StreamCounts>,
}

struct StreamCounts {
    open: u32,
    waiting: u32,
    /// When `open` last changed (when it is 0: since when the connection is idle).
    changed: tokio::time::Instant,
    /// The last send progress: an answer taken whole or in part, or the first one to wait.
    progressed: tokio::time::Instant,
}

/// Why the watchdog ends a connection.
#[derive(Debug)]
enum Verdict {
    /// Answers have been waiting for send window for `send_timeout`, with no progress.
    Stalled,
    /// No stream open for `idle_timeout`.
    Idle,
}

impl Streams {
    fn new() -> Self {
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
    fn open(this: &Arc<Self>) -> StreamGuard {
        let mut counts = this.counts();
        counts.open += 1;
        counts.changed = tokio::time::Instant::now();
        drop(counts);
        StreamGuard {
            streams: Arc::clone(this),
            waiting: false,
        }
    }

    /// Resolves when the connection should end: its answers stalled, or it sat idle.
    async fn watch(&self, limits: &ConnectionLimits) -> Verdict {
        loop {
            let now = tokio::time::Instant::now();
            // Counts change while this sleeps: an answer that gets ready from now on
            // cannot stall before `now + send_timeout`, and streams that all end from now
            // on leave the connection idle no sooner than `now + idle_timeout`; looking
            // again by the sooner of the two finds either in time.
            let soonest = now + limits.send_timeout.min(limits.idle_timeout);
            let deadline = {
                let counts = self.counts();
                if counts.waiting > 0 {
                    let stalled = counts.progressed + limits.send_timeout;
                    if stalled <= now {
                        return Verdict::Stalled;
                    }
                    stalled
                } else if counts.open == 0 {
                    let idle = counts.changed + limits.idle_timeout;
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
struct StreamGuard {
    streams: Arc<Streams>,
    waiting: bool,
}

impl StreamGuard {
    /// The answer is ready: from now on it waits to be sent.
    fn answered(mut self) -> Self {
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
struct Watched {
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
    fn new(body: Full<Bytes>, stream: StreamGuard, split: bool) -> Self {
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

/// A connection whose first bytes were already read: they are read again first.
struct Rewind {
    read: BytesMut,
    io: Box<dyn Io>,
}

impl Rewind {
    fn new(read: BytesMut, io: Box<dyn Io>) -> Self {
        Self { read, io }
    }
}

impl AsyncRead for Rewind {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.read.is_empty() {
            return Pin::new(&mut this.io).poll_read(cx, buf);
        }
        let n = this.read.len().min(buf.remaining());
        buf.put_slice(&this.read[..n]);
        this.read.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Rewind {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}
