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
    /// A connection with nothing to read for this long is closed.
    pub idle_timeout: Duration,
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
    let mut stream = stream;
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
        secure(Prefixed::new(read, io), handler.tls(), deadline).await
    };
    let Some((io, client_cert)) = io else {
        return;
    };
    let first_request = Arc::new(AtomicBool::new(false));
    let served = serve_protocols(
        io,
        peer,
        client_cert,
        handler,
        builder,
        limits,
        shutdown,
        &first_request,
    );
    let no_first_request = async {
        tokio::time::sleep_until(deadline).await;
        if first_request.load(Ordering::Relaxed) {
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
    first_request: &Arc<AtomicBool>,
) {
    let loop_limits = h1::Limits {
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
        first_request,
    )
    .await
    {
        Served::Closed => return,
        Served::HandOver(buffered) => buffered,
    };
    let seen = Arc::clone(first_request);
    let service = service_fn(move |request: Request<Incoming>| {
        seen.store(true, Ordering::Relaxed);
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
            Ok::<_, Infallible>(reply.into_response())
        }
    });
    // hyper's side gets the idle timeout as a read timeout (re-armed on every read, which
    // the HTTP/1.1 loop avoids: each re-arm wakes the runtime's driver).
    let mut io = TimeoutStream::new(Prefixed::new(buffered, io));
    io.set_read_timeout(Some(limits.idle_timeout));
    let connection = builder
        .serve_connection(TokioIo::new(Box::pin(io)), service)
        .into_owned();
    let mut connection = std::pin::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        () = shutdown.wait() => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(error) = result {
        tracing::debug!(%error, "connection ended with an error");
    }
}

/// A connection whose first bytes were already read: they are read again first.
struct Prefixed {
    read: BytesMut,
    io: Box<dyn Io>,
}

impl Prefixed {
    fn new(read: BytesMut, io: Box<dyn Io>) -> Self {
        Self { read, io }
    }
}

impl AsyncRead for Prefixed {
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

impl AsyncWrite for Prefixed {
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
