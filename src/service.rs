//! The contract between the connection loops and the gateway: a [`Handler`] answers a
//! request head and [`RequestBody`] with a [`Reply`]; [`Shutdown`] tells every loop to stop.
//! A leaf: the loops (`server`, `h1`, `admin`) and the gateway import it, it imports neither.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderValue, Response, header};
use http_body_util::Full;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsAcceptor;

use crate::answer::Answer;
use crate::client::Clients;
use crate::error::JSON_CONTENT_TYPE;
use crate::head::{DIIA_TRACE_ID, RequestHead};

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
                let mut response = answer_response(&answer);
                if let Some(status) = cache_status {
                    response
                        .headers_mut()
                        .insert(CACHE_STATUS.clone(), status.clone());
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

pub(crate) static CACHE_STATUS: header::HeaderName =
    header::HeaderName::from_static("cache-status");

/// Diia's answer as a response: status, body, content type, trace id, retry-after,
/// location. Built per request: a pre-rendered `HeaderMap` cloned per hit costs the same
/// two allocations and saves ~nothing (the `hit_response` bench group keeps both).
pub fn answer_response(answer: &Answer) -> HttpResponse {
    let mut response = Response::new(Full::new(answer.body()));
    *response.status_mut() = answer.status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        answer
            .content_type()
            .unwrap_or_else(|| JSON_CONTENT_TYPE.clone()),
    );
    if let Some(trace_id) = answer.trace_id() {
        headers.insert(DIIA_TRACE_ID.clone(), trace_id);
    }
    if let Some(retry_after) = answer.retry_after() {
        headers.insert(header::RETRY_AFTER, retry_after);
    }
    if let Some(location) = answer.location() {
        headers.insert(header::LOCATION, location);
    }
    response
}
