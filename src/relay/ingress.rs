//! The relay's ingress: where Diia POSTs document packages (`{path_prefix}/{token}`, on
//! the relay's own listener). A callback is answered `200 {"success":true}` only once it is
//! checked and durably stored; anything else is refused before a byte is stored.
//!
//! Order of checks: path token (constant time; unknown → 404) → method (405) → trace
//! header (400) → declared length (413) → in-flight byte budget (503 + `Retry-After`) →
//! bounded read (413 / 400) → multipart, every file part and `encodeData` a CMS
//! `EnvelopedData` for the acquirer's certificate (400) → with a fleet, the route another
//! instance recorded when there is no local one ([`FleetRoutes::adopt`]) → store (503 on
//! failure) → 200.
//! The token is never logged; log lines carry the record id and the acquirer only.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;

use super::budget::ByteBudget;
use super::cms::{PartError, check_part};
use super::fleet::FleetRoutes;
use super::metrics::{IngestResult, RelayMetrics, StoreOp};
use super::settings::{RelayAcquirer, RelaySettings};
use super::{CallbackStore, Envelope, Ingest, PutOutcome, State, now_ms};

/// `X-Document-Request-Trace-Id`: the partner's requestId.
pub static TRACE_HEADER: HeaderName = HeaderName::from_static("x-document-request-trace-id");
/// `X-Diia-Id-Action`: Diia ID callbacks.
pub static ACTION_HEADER: HeaderName = HeaderName::from_static("x-diia-id-action");

/// Longest a header value kept in the envelope may be (a requestId is a UUID or so).
const MAX_HEADER_VALUE: usize = 256;
/// Longest `Content-Type` kept (a multipart boundary is at most 70 characters).
const MAX_CONTENT_TYPE: usize = 1024;
/// Most parts a callback may have (five per document type, a few types, `encodeData`).
const MAX_PARTS: usize = 64;
/// Time a client has to send a whole callback body.
const BODY_TIMEOUT: Duration = Duration::from_secs(60);
/// Time from accept to a complete request head (and the TLS handshake).
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections the relay serves at once; more wait in the kernel's accept queue (Diia
/// sends a few callbacks at a time; this bounds what a flood of idle sockets can hold).
const MAX_CONNECTIONS: usize = 1024;
/// Times its length a callback is charged against `max_in_flight_bytes`: while it is
/// checked and stored, the body, the part being decoded and the sealed copy are held at
/// once (peak RSS grew by 2.8 bytes per budget byte when only the body was charged).
const IN_FLIGHT_COPIES: usize = 3;
/// Largest read buffer per HTTP/1 connection. hyper's default lets it grow to ~400 KiB on
/// a fast upload, outside any budget: 512 connections lingering on refused bodies held
/// 78 MiB with 64 KiB, 18 MiB with 16 KiB, and ingest throughput did not change.
const READ_BUFFER: usize = 16 * 1024;
/// Longest a refused callback's body is read and dropped before the refusal goes out.
const LINGER: Duration = Duration::from_secs(5);

/// Why a callback was not acknowledged; each has its status and code (the one place they
/// are chosen for the relay's listener).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// No acquirer has this path token, or the path is not an ingress path.
    NotFound,
    /// Not a POST.
    MethodNotAllowed,
    /// No usable `X-Document-Request-Trace-Id`.
    MissingTrace,
    /// Declared or read body larger than `max_body`.
    TooLarge,
    /// `max_in_flight_bytes` is taken.
    Busy,
    /// The body broke off or took too long.
    BodyRead,
    /// Not `multipart/form-data`, malformed, or with no package part.
    NotMultipart,
    /// A part that is not CMS `EnvelopedData` for the acquirer's certificate.
    Part(PartError),
    /// The store failed: nothing acknowledged.
    Store,
}

impl Refusal {
    /// The status sent.
    #[must_use]
    pub const fn status(self) -> StatusCode {
        match self {
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::MissingTrace | Self::BodyRead | Self::NotMultipart | Self::Part(_) => {
                StatusCode::BAD_REQUEST
            }
            Self::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Busy | Self::Store => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The stable code in the body.
    #[must_use]
    pub const fn code(self) -> &'static str {
        match self {
            Self::NotFound => "not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::MissingTrace => "missing_trace_id",
            Self::TooLarge => "body_too_large",
            Self::Busy => "relay_busy",
            Self::BodyRead => "body_read",
            Self::NotMultipart => "invalid_multipart",
            Self::Part(error) => error.label(),
            Self::Store => "store_unavailable",
        }
    }

    /// The metrics result.
    #[must_use]
    pub const fn result(self) -> IngestResult {
        match self {
            Self::NotFound => IngestResult::RefusedToken,
            Self::MethodNotAllowed => IngestResult::RefusedMethod,
            Self::MissingTrace => IngestResult::RefusedTrace,
            Self::TooLarge => IngestResult::RefusedTooLarge,
            Self::Busy => IngestResult::RefusedBusy,
            Self::BodyRead => IngestResult::RefusedBody,
            Self::NotMultipart => IngestResult::RefusedMultipart,
            Self::Part(_) => IngestResult::RefusedCms,
            Self::Store => IngestResult::StoreError,
        }
    }

    /// The response: `{"success":false,"error":code}`, with `Retry-After` on a 503 and
    /// `Allow` on a 405.
    #[must_use]
    pub fn response(self) -> Response<Full<Bytes>> {
        let body = format!(r#"{{"success":false,"error":"{}"}}"#, self.code());
        let mut response = json(self.status(), body);
        let headers = response.headers_mut();
        match self {
            Self::Busy => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            Self::Store => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
            }
            Self::MethodNotAllowed => {
                headers.insert(header::ALLOW, HeaderValue::from_static("POST"));
            }
            Self::NotFound
            | Self::MissingTrace
            | Self::TooLarge
            | Self::BodyRead
            | Self::NotMultipart
            | Self::Part(_) => {}
        }
        response
    }
}

fn json(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// The ingress: settings, the store, the in-flight byte budget, metrics.
pub struct Ingress {
    settings: Arc<RelaySettings>,
    store: Arc<dyn CallbackStore>,
    budget: ByteBudget,
    metrics: Arc<RelayMetrics>,
    arrivals: Arc<Notify>,
    /// The fleet's routes (`[scaleout]` on): looked up for callbacks with no local route.
    fleet: Option<Arc<FleetRoutes>>,
}

impl Ingress {
    /// An ingress storing into `store`; `arrivals` is woken after each stored callback
    /// (the pull side's long polls wait on it).
    #[must_use]
    pub fn new(
        settings: Arc<RelaySettings>,
        store: Arc<dyn CallbackStore>,
        metrics: Arc<RelayMetrics>,
        arrivals: Arc<Notify>,
    ) -> Self {
        Self {
            budget: ByteBudget::new(settings.max_in_flight_bytes),
            settings,
            store,
            metrics,
            arrivals,
            fleet: None,
        }
    }

    /// A callback with no local route takes the fleet's route, when Redis has one.
    #[must_use]
    pub fn with_fleet(mut self, fleet: Arc<FleetRoutes>) -> Self {
        self.fleet = Some(fleet);
        self
    }

    /// Answers one request (never an error: refusals are responses).
    pub async fn handle(&self, request: Request<Incoming>) -> Response<Full<Bytes>> {
        let started = Instant::now();
        match self.ingest(request).await {
            Ok((outcome, acquirer)) => {
                let (id, result) = match outcome {
                    PutOutcome::Stored(id, State::Orphan) => (id, IngestResult::Orphan),
                    PutOutcome::Stored(id, _) => (id, IngestResult::Stored),
                    PutOutcome::Duplicate(id) => (id, IngestResult::Duplicate),
                    PutOutcome::Conflict(id) => (id, IngestResult::Conflict),
                };
                self.metrics.count(result);
                self.metrics.acked(started.elapsed());
                if result == IngestResult::Stored {
                    self.arrivals.notify_waiters();
                }
                tracing::info!(record = %id, acquirer = %acquirer.name, result = result.label(), "relay: callback acknowledged");
                json(StatusCode::OK, r#"{"success":true}"#.to_owned())
            }
            Err(refusal) => {
                self.metrics.count(refusal.result());
                refusal.response()
            }
        }
    }

    /// The acquirer whose token ends the path, compared in constant time with every one.
    fn acquirer(&self, path: &str) -> Option<&Arc<RelayAcquirer>> {
        let rest = path.strip_prefix(self.settings.path_prefix.as_str())?;
        let token = rest.strip_prefix('/')?;
        let presented = decode_token(token)?;
        let mut found = None;
        for acquirer in &self.settings.acquirers {
            if bool::from(acquirer.path_token.ct_eq(&presented)) {
                found = Some(acquirer);
            }
        }
        found
    }

    /// The checks made on the request head alone, and the callback's share of the byte
    /// budget: [`IN_FLIGHT_COPIES`] times its declared length (`max_body` when it
    /// declares none), at most the whole budget so that one callback always fits.
    fn admit(&self, head: &http::request::Parts) -> Result<Admitted, Refusal> {
        let acquirer = self
            .acquirer(head.uri.path())
            .ok_or(Refusal::NotFound)?
            .clone();
        if head.method != Method::POST {
            return Err(Refusal::MethodNotAllowed);
        }
        let headers = &head.headers;
        let request_id =
            header_text(headers, &TRACE_HEADER, MAX_HEADER_VALUE).ok_or(Refusal::MissingTrace)?;
        let action = header_text(headers, &ACTION_HEADER, MAX_HEADER_VALUE);
        let content_type = header_text(headers, &header::CONTENT_TYPE, MAX_CONTENT_TYPE)
            .ok_or(Refusal::NotMultipart)?;
        let max_body = self.settings.max_body;
        let declared = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|length| length > max_body as u64) {
            return Err(Refusal::TooLarge);
        }
        let declared = declared.and_then(|n| usize::try_from(n).ok());
        let need = declared
            .unwrap_or(max_body)
            .saturating_mul(IN_FLIGHT_COPIES);
        let permit = self.budget.try_take(need).ok_or(Refusal::Busy)?;
        Ok(Admitted {
            acquirer,
            request_id,
            action,
            content_type,
            declared,
            permit,
        })
    }

    async fn ingest(
        &self,
        request: Request<Incoming>,
    ) -> Result<(PutOutcome, Arc<RelayAcquirer>), Refusal> {
        let (head, body) = request.into_parts();
        let admitted = match self.admit(&head) {
            Ok(admitted) => admitted,
            Err(refusal) => {
                // HTTP/2 answers the stream and resets it with NO_ERROR, which its sender
                // reads as the end of its request: nothing to linger for, and lingering
                // held up to 200 streams a connection, heads and all, for anyone. A sender
                // waiting for `100 Continue` has sent no body: reading it would ask for it.
                if refusal != Refusal::TooLarge
                    && head.version < http::Version::HTTP_2
                    && !expects_continue(&head.headers)
                {
                    drop(head);
                    linger(body, self.settings.max_body).await;
                }
                return Err(refusal);
            }
        };
        let Admitted {
            acquirer,
            request_id,
            action,
            content_type,
            declared,
            permit: _permit,
        } = admitted;
        let body = read_body(body, self.settings.max_body, declared).await?;
        check_multipart(&content_type, body.clone(), &acquirer).await?;
        let envelope = Envelope {
            request_id,
            action,
            content_type,
            body,
        };
        if let Some(fleet) = &self.fleet {
            // Before the put, which takes the request's live local route in its transaction.
            fleet
                .adopt(self.store.as_ref(), &acquirer.name, &envelope.request_id)
                .await;
        }
        let ingest = Ingest {
            acquirer: acquirer.name.clone(),
            envelope,
            route: None,
        };
        match self.store.put(ingest, now_ms()).await {
            Ok(outcome) => Ok((outcome, acquirer)),
            Err(error) => {
                self.metrics.store_failed(StoreOp::Ingest);
                tracing::error!(acquirer = %acquirer.name, %error, "relay: callback not stored; answered 503");
                Err(Refusal::Store)
            }
        }
    }
}

/// A path token: 64 hex digits or 43 base64url characters.
fn decode_token(text: &str) -> Option<[u8; 32]> {
    let mut token = [0u8; 32];
    match text.len() {
        64 => hex::decode_to_slice(text, &mut token).ok()?,
        43 => token = <[u8; 32]>::try_from(URL_SAFE_NO_PAD.decode(text).ok()?).ok()?,
        _ => return None,
    }
    Some(token)
}

/// A header's value as visible ASCII text of at most `max` bytes; `None` when absent,
/// empty or unusable.
fn header_text(headers: &HeaderMap, name: &HeaderName, max: usize) -> Option<String> {
    let value = headers.get(name)?.to_str().ok()?.trim();
    (!value.is_empty() && value.len() <= max).then(|| value.to_owned())
}

/// Whether the sender waits for `100 Continue` before its body (hyper sends it when the
/// body is first read).
fn expects_continue(headers: &HeaderMap) -> bool {
    headers
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
}

/// A callback whose head passed [`Ingress::admit`], holding its share of the budget.
struct Admitted {
    acquirer: Arc<RelayAcquirer>,
    request_id: String,
    action: Option<String>,
    content_type: String,
    declared: Option<usize>,
    permit: OwnedSemaphorePermit,
}

/// The body into one buffer sized by its declared length up front: chunks are copied in
/// as they arrive and freed, instead of all held until a second, contiguous copy.
async fn read_body(
    body: Incoming,
    max_body: usize,
    declared: Option<usize>,
) -> Result<Bytes, Refusal> {
    let read = tokio::time::timeout(BODY_TIMEOUT, async {
        let mut body = Limited::new(body, max_body);
        let mut buffer = BytesMut::with_capacity(declared.unwrap_or(0).min(max_body));
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame?.into_data() {
                buffer.extend_from_slice(&data);
            }
        }
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(buffer.freeze())
    })
    .await;
    match read {
        Ok(Ok(body)) => Ok(body),
        Ok(Err(error)) if error.is::<http_body_util::LengthLimitError>() => Err(Refusal::TooLarge),
        Ok(Err(_)) | Err(_) => Err(Refusal::BodyRead),
    }
}

/// Reads and drops what is left of an HTTP/1.1 callback refused on its head (at most
/// `max_body` bytes, for at most [`LINGER`]): answered while its body is still arriving,
/// the client would see the connection reset under the refusal instead of reading it. A
/// body over `max_body` is not read (the 413 goes out and the connection closes).
async fn linger(body: Incoming, max_body: usize) {
    let _ = tokio::time::timeout(LINGER, async {
        let mut body = Limited::new(body, max_body);
        while let Some(Ok(_)) = body.frame().await {}
    })
    .await;
}

/// Every file part and `encodeData` is CMS `EnvelopedData` for the acquirer; at least one.
async fn check_multipart(
    content_type: &str,
    body: Bytes,
    acquirer: &RelayAcquirer,
) -> Result<(), Refusal> {
    let boundary = multer::parse_boundary(content_type).map_err(|_| Refusal::NotMultipart)?;
    let stream = futures_util::stream::once(async move { Ok::<Bytes, Infallible>(body) });
    let mut multipart = multer::Multipart::new(stream, boundary);
    let (mut parts, mut packages) = (0usize, 0usize);
    while let Some(field) = multipart
        .next_field()
        .await
        .map_err(|_| Refusal::NotMultipart)?
    {
        parts += 1;
        if parts > MAX_PARTS {
            return Err(Refusal::NotMultipart);
        }
        let package = field.file_name().is_some() || field.name() == Some("encodeData");
        let bytes = field.bytes().await.map_err(|_| Refusal::NotMultipart)?;
        if package {
            check_part(&bytes, &acquirer.recipient).map_err(Refusal::Part)?;
            packages += 1;
        }
    }
    if packages == 0 {
        return Err(Refusal::NotMultipart);
    }
    Ok(())
}

/// Serves the ingress on `listener` (TLS when `tls` is set, HTTP/1.1 and HTTP/2) until
/// `closing` resolves, then gives open connections `drain_timeout` to finish.
pub async fn serve(
    listener: TcpListener,
    ingress: Arc<Ingress>,
    tls: Option<TlsAcceptor>,
    closing: impl Future<Output = ()> + Send,
    drain_timeout: Duration,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEAD_TIMEOUT)
        .max_buf_size(READ_BUFFER);
    builder.http2().timer(TokioTimer::new());
    let builder = Arc::new(builder);
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    tokio::pin!(closing);
    loop {
        let slot = tokio::select! {
            slot = Arc::clone(&slots).acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break,
            },
            () = &mut closing => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "relay: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut closing => break,
        };
        let watcher = graceful.watcher();
        let (ingress, builder, tls) = (Arc::clone(&ingress), Arc::clone(&builder), tls.clone());
        tokio::spawn(async move {
            serve_connection(stream, peer, ingress, &builder, tls, watcher).await;
            drop(slot);
        });
    }
    drop(listener);
    if tokio::time::timeout(drain_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("relay: connections still open after the drain timeout; closed");
    }
}

/// What a connection's watchdog reads: requests under way, and when the last one ended.
#[derive(Default)]
struct Activity {
    in_flight: std::sync::atomic::AtomicUsize,
    /// Milliseconds since the connection was accepted.
    last_ms: std::sync::atomic::AtomicU64,
}

/// Counts one request under way until dropped (also when its future is dropped).
struct Busy<'a>(&'a Activity, Instant);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        let elapsed = u64::try_from(self.1.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.0.last_ms.store(elapsed, Ordering::Relaxed);
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Resolves once the connection has had no request under way for [`HEAD_TIMEOUT`]: from
/// accept (a socket that never sends a request, whatever the protocol sniffing or an
/// HTTP/2 preface do) or from its last answer (an idle keep-alive or HTTP/2 connection).
/// A connection slot is never held by a silent peer longer than that.
async fn idle(activity: &Activity, accepted: Instant) {
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        if activity.in_flight.load(Ordering::Relaxed) > 0 {
            continue;
        }
        let last = Duration::from_millis(activity.last_ms.load(Ordering::Relaxed));
        if accepted.elapsed().saturating_sub(last) >= HEAD_TIMEOUT {
            return;
        }
    }
}

async fn serve_connection(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    ingress: Arc<Ingress>,
    builder: &auto::Builder<TokioExecutor>,
    tls: Option<TlsAcceptor>,
    watcher: hyper_util::server::graceful::Watcher,
) {
    let accepted = Instant::now();
    let activity = Arc::new(Activity::default());
    let counted = Arc::clone(&activity);
    let service = hyper::service::service_fn(move |request| {
        let (ingress, activity) = (Arc::clone(&ingress), Arc::clone(&counted));
        async move {
            activity.in_flight.fetch_add(1, Ordering::Relaxed);
            let _busy = Busy(&activity, accepted);
            Ok::<_, Infallible>(ingress.handle(request).await)
        }
    });
    let served = match tls {
        None => {
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                served = watcher.watch(connection.into_owned()) => served,
                () = idle(&activity, accepted) => {
                    tracing::debug!(%peer, "relay: connection idle past the head timeout; closed");
                    return;
                }
            }
        }
        Some(acceptor) => {
            let Ok(Ok(stream)) = tokio::time::timeout(HEAD_TIMEOUT, acceptor.accept(stream)).await
            else {
                tracing::debug!(%peer, "relay: TLS handshake failed or timed out");
                return;
            };
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                served = watcher.watch(connection.into_owned()) => served,
                () = idle(&activity, accepted) => {
                    tracing::debug!(%peer, "relay: connection idle past the head timeout; closed");
                    return;
                }
            }
        }
    };
    if let Err(error) = served {
        tracing::debug!(%peer, %error, "relay: connection ended with an error");
    }
}
