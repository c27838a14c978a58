//! The accept loop shared by the gateway and its admin listener.
//!
//! Every connection starts in the gateway's own HTTP/1.1 loop ([`crate::h1`]), which
//! serves plain, complete requests (the branch backends' traffic) and writes cached
//! answers from their pre-rendered bytes. Anything else (HTTP/2, h2c prior knowledge,
//! chunked or `Expect` bodies, upgrades, trickled or oversized heads, malformed HTTP) is
//! handed, with the bytes already read, to hyper-util's auto builder for the rest of the
//! connection. Before any of it, the handler's [`crate::client::Clients`] read a trusted
//! proxy's PROXY header and count the connection against its client. On shutdown the loop
//! stops accepting, then lets open connections finish their in-flight requests within a
//! bounded drain time.
//!
//! Writing is bounded as reading is: the socket itself (`Socket`, in `socket.rs`) fails
//! a write that makes no progress for `send_timeout` (whichever protocol writes), and
//! hyper's connections have a watchdog (`Streams`, in `watchdog.rs`) for what the socket
//! cannot see: HTTP/2 answers waiting for send window the peer never gives, and an HTTP/2
//! connection kept open by pings alone. What a handler is and answers lives in
//! [`crate::service`], which this loop and the gateway both import.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::BytesMut;
use http::{HeaderValue, Request};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_io_timeout::TimeoutStream;
use tokio_rustls::TlsAcceptor;

use crate::client::Accepted;
use crate::h1::{self, Served};
use crate::head::RequestHead;
use crate::service::{Handler, Io, RequestBody, Shutdown};
use crate::socket::{ConnectionState, Rewind, Socket};
use crate::tls::ClientCert;
use crate::watchdog::{Streams, Watched};

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
            verdict = streams.watch(limits.send_timeout, limits.idle_timeout) => {
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
