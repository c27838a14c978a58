//! The accept loop shared by the gateway and its admin listener.
//!
//! HTTP/1.1 and HTTP/2 (h2c prior knowledge) on one port via hyper-util's auto builder.
//! On shutdown the loop stops accepting, then lets open connections finish their
//! in-flight requests (hyper's graceful shutdown) within a bounded drain time.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio_io_timeout::TimeoutStream;
use tokio_rustls::TlsAcceptor;

/// A connection's byte stream, plain or TLS.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}

impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> Io for T {}

/// What every handler answers: a fully buffered body (answers are small and cacheable).
pub type HttpResponse = Response<Full<Bytes>>;

/// A request handler: request plus peer address in, response out, never an error.
pub trait Handler: Send + Sync + 'static {
    /// Answers one request.
    fn handle(
        self: Arc<Self>,
        request: Request<Incoming>,
        peer: SocketAddr,
    ) -> impl Future<Output = HttpResponse> + Send + 'static;

    /// TLS for a new connection (`None`: plain HTTP). Read at accept time, so a reload
    /// changes certificates for new connections, never for open ones.
    fn tls(&self) -> Option<TlsAcceptor> {
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
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
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
            graceful.watcher(),
        );
        tokio::spawn(async move {
            connection.await;
            drop(permit);
        });
    }
    drop(listener);
    if tokio::time::timeout(limits.drain_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("drain deadline passed with connections still open");
    }
}

/// One connection: TLS handshake when the handler asks for it, then HTTP/1.1 or h2 until
/// the client leaves or the drain ends it. The first request head must be complete within
/// `header_read_timeout` of accept, however the bytes trickle in: the idle timer alone
/// resets on every byte, and hyper's own header timer starts only once HTTP/1 is chosen.
async fn serve_connection<H: Handler>(
    stream: TcpStream,
    peer: SocketAddr,
    handler: Arc<H>,
    builder: auto::Builder<TokioExecutor>,
    limits: ConnectionLimits,
    watcher: Watcher,
) {
    let deadline = tokio::time::Instant::now() + limits.header_read_timeout;
    let _ = stream.set_nodelay(true);
    let mut stream = TimeoutStream::new(stream);
    stream.set_read_timeout(Some(limits.idle_timeout));
    let stream = Box::pin(stream);
    let io: Box<dyn Io> = match handler.tls() {
        Some(acceptor) => match tokio::time::timeout_at(deadline, acceptor.accept(stream)).await {
            Ok(Ok(tls_stream)) => Box::new(tls_stream),
            Ok(Err(error)) => {
                tracing::debug!(%error, "TLS handshake failed");
                return;
            }
            Err(_) => {
                tracing::debug!("TLS handshake timed out");
                return;
            }
        },
        None => Box::new(stream),
    };
    let first_request = Arc::new(AtomicBool::new(false));
    let seen = Arc::clone(&first_request);
    let service = service_fn(move |request| {
        seen.store(true, Ordering::Relaxed);
        let handler = Arc::clone(&handler);
        async move { Ok::<_, Infallible>(handler.handle(request, peer).await) }
    });
    let connection = builder
        .serve_connection(TokioIo::new(io), service)
        .into_owned();
    let served = watcher.watch(connection);
    let no_first_request = async {
        tokio::time::sleep_until(deadline).await;
        if first_request.load(Ordering::Relaxed) {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        result = served => {
            if let Err(error) = result {
                tracing::debug!(%error, "connection ended with an error");
            }
        }
        () = no_first_request => {
            tracing::debug!("no complete request head within header_read_timeout of accept; closed");
        }
    }
}
