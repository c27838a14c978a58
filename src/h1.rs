//! The gateway's own HTTP/1.1 connection loop, for the requests branch backends send.
//!
//! A request whose head arrived whole, in HTTP/1.1 origin form, with a `Content-Length`
//! body (or none), and with no `Transfer-Encoding`, `Expect` or `Upgrade`, is parsed here
//! with `httparse` (header values are slices of the read buffer, as in hyper), handed to
//! the [`Handler`], and answered in one write: a cached answer from its pre-rendered head
//! ([`Answer::rendered_head`]) and body, without a `HeaderMap`, a boxed service future or
//! hyper's dispatcher. Everything else is handed over, with the bytes already read, to
//! hyper for the rest of the connection (`Served::HandOver`): hyper stays the authority
//! for every HTTP edge (trickled heads and their timeout, 431, chunked bodies,
//! `100-continue`, HTTP/1.0, h2c), and the loop only serves what it recognises whole.
//!
//! Keep-alive, pipelining (requests are answered in order, one at a time) and
//! `Connection: close` work as in hyper; on shutdown an idle connection is closed at once
//! and a busy one after its answer, with `connection: close`. Writes need no timer here:
//! the socket under `io` fails a write that makes no progress for `send_timeout` (a
//! client that stops reading), which ends the loop.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use futures_util::FutureExt;
use http::header;
use http::{HeaderValue, Method, StatusCode, Uri};
use http_body_util::BodyExt;
use smallvec::SmallVec;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::answer::{Answer, has_body};
use crate::head::{Field, RequestHead};
use crate::service::{Handler, Io, Reply, RequestBody, Shutdown};
use crate::tls::ClientCert;

/// What the loop needs to know about the listener's bounds.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LoopLimits {
    /// A longer head goes to hyper, which answers 431.
    pub max_head_bytes: usize,
    /// A connection idle this long between requests is closed.
    pub idle_timeout: Duration,
}

/// How the loop left the connection.
pub(crate) enum Served {
    /// Done: the client left, asked to close, or the connection failed.
    Closed,
    /// hyper takes the connection from here, reading `buffered` first.
    HandOver(BytesMut),
}

/// Headers parsed on the stack; more go to hyper (which allows 100).
const MAX_HEADERS: usize = 48;
/// Read buffer growth per read.
const READ_CHUNK: usize = 8 * 1024;
/// Body chunks queued between the socket and a handler still reading a body.
const BODY_QUEUE: usize = 2;
/// How long a closing connection waits for its close to be sent.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);
/// What a request the loop accepted but cannot turn into `http` types gets.
const BAD_REQUEST: &[u8] =
    b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";

/// One request head the loop serves itself; spans are offsets into the read buffer.
struct Head {
    method: Method,
    path: (usize, usize),
    /// The headers the stages read ([`Field`]); the others are not even named.
    fields: SmallVec<[(Field, (usize, usize)); 8]>,
    length: usize,
    content_length: Option<u64>,
    close: bool,
}

/// Serves requests on `io` until the client leaves, shutdown, or a request the loop does
/// not serve itself (then hands over).
pub(crate) async fn serve<H: Handler>(
    io: &mut Box<dyn Io>,
    peer: SocketAddr,
    client_cert: Option<&Arc<ClientCert>>,
    handler: &Arc<H>,
    shutdown: &Shutdown,
    limits: LoopLimits,
    first_request: &AtomicBool,
) -> Served {
    let mut read = BytesMut::with_capacity(READ_CHUNK);
    let mut out = Vec::with_capacity(1024);
    // One shutdown watch for the connection's life: registering a fresh one per idle
    // wait cost a cross-thread wake-up (an eventfd write) per request.
    let mut shutting_down = std::pin::pin!(shutdown.wait());
    // One idle timer, moved only when it fires early (re-arming a timer per read wakes
    // the runtime's driver through an eventfd write: a syscall per request).
    let mut idle = std::pin::pin!(tokio::time::sleep(limits.idle_timeout));
    let mut last_read = Instant::now();
    // Whether this peer's forwarding headers name the client (a trusted proxy); for any
    // other peer they are not even recorded.
    let forwarding = handler
        .clients()
        .is_some_and(|clients| clients.reads_forwarding(peer.ip()));
    loop {
        while read.is_empty() {
            if shutdown.is_triggered() {
                return Served::Closed;
            }
            read.reserve(READ_CHUNK);
            let received = tokio::select! {
                // In this order, and no random start (`biased`): a read is the usual case.
                biased;
                received = io.read_buf(&mut read) => received,
                () = shutting_down.as_mut() => return Served::Closed,
                () = idle.as_mut() => {
                    let deadline = last_read + limits.idle_timeout;
                    if deadline <= Instant::now() {
                        return Served::Closed;
                    }
                    idle.as_mut().reset(deadline);
                    continue;
                }
            };
            if !matches!(received, Ok(n) if n > 0) {
                return Served::Closed;
            }
            last_read = Instant::now();
        }
        let Some(head) = parse(&read, limits, forwarding) else {
            return Served::HandOver(read);
        };
        first_request.store(true, Ordering::Relaxed);
        let head_bytes = read.split_to(head.length).freeze();
        let Some(mut request) = build(&head, &head_bytes) else {
            let _ = io.write_all(BAD_REQUEST).await;
            close(io).await;
            return Served::Closed;
        };
        request.client_cert = client_cert.cloned();
        let Ok(content_length) = usize::try_from(head.content_length.unwrap_or(0)) else {
            return Served::Closed;
        };
        let peer = if forwarding {
            client(handler.as_ref(), peer, &head, &head_bytes)
        } else {
            peer
        };
        let exchange = if read.len() >= content_length {
            let body = RequestBody::whole(read.split_to(content_length).freeze());
            let reply = handler.handle(request, body, peer).await;
            Exchange {
                reply,
                body_left: false,
            }
        } else {
            stream_body(io, &mut read, head.content_length.unwrap_or(0), |body| {
                handler.handle(request, body, peer)
            })
            .await
        };
        let close_after = head.close || exchange.body_left || shutdown.is_triggered();
        out.clear();
        encode(exchange.reply, close_after, &mut out);
        if io.write_all(&out).await.is_err() || io.flush().await.is_err() {
            return Served::Closed;
        }
        if out.capacity() > 64 * 1024 {
            out = Vec::with_capacity(1024);
        }
        if close_after {
            close(io).await;
            return Served::Closed;
        }
    }
}

/// The request's client: `peer`, or, when `peer` is a trusted proxy that names clients
/// in a forwarding header, the client it names (read in place from the head's bytes;
/// other peers' headers are not looked at).
fn client<H: Handler>(handler: &H, peer: SocketAddr, head: &Head, bytes: &Bytes) -> SocketAddr {
    let Some(clients) = handler.clients().filter(|c| c.reads_forwarding(peer.ip())) else {
        return peer;
    };
    let field = clients.forwarding_field();
    let lines = head
        .fields
        .iter()
        .rev()
        .filter(|(named, _)| *named == field)
        .filter_map(|(_, (start, end))| bytes.get(*start..*end));
    clients.client_of(peer, lines)
}

/// A handler's reply, and whether part of the request body was never read (the
/// connection cannot be reused then).
struct Exchange {
    reply: Reply,
    body_left: bool,
}

/// Runs the handler while the rest of its body is read from the socket and queued to it.
async fn stream_body<F, Fut>(
    io: &mut Box<dyn Io>,
    read: &mut BytesMut,
    content_length: u64,
    handle: F,
) -> Exchange
where
    F: FnOnce(RequestBody) -> Fut,
    Fut: Future<Output = Reply>,
{
    let first = read.split().freeze();
    let mut remaining = content_length.saturating_sub(first.len() as u64);
    let (sender, receiver) = mpsc::channel(BODY_QUEUE);
    let reply = handle(RequestBody::streamed(first, receiver, content_length));
    let mut reply = std::pin::pin!(reply);
    let mut sender = Some(sender);
    loop {
        let forward = async {
            let Some(queue) = sender.as_ref() else {
                return std::future::pending().await;
            };
            let Ok(permit) = queue.reserve().await else {
                // The handler dropped the body: stop reading it.
                return Forwarded::Stopped;
            };
            read.reserve(READ_CHUNK);
            match io.read_buf(read).await {
                Ok(n) if n > 0 => {
                    let take = read
                        .len()
                        .min(usize::try_from(remaining).unwrap_or(usize::MAX));
                    let chunk = read.split_to(take).freeze();
                    permit.send(Ok(chunk));
                    Forwarded::Chunk(take as u64)
                }
                Ok(_) => {
                    permit.send(Err(std::io::ErrorKind::UnexpectedEof.into()));
                    Forwarded::Stopped
                }
                Err(error) => {
                    permit.send(Err(error));
                    Forwarded::Stopped
                }
            }
        };
        tokio::select! {
            reply = reply.as_mut() => {
                return Exchange { reply, body_left: remaining > 0 };
            }
            forwarded = forward => match forwarded {
                Forwarded::Chunk(taken) => {
                    remaining = remaining.saturating_sub(taken);
                    if remaining == 0 {
                        sender = None;
                    }
                }
                Forwarded::Stopped => sender = None,
            },
        }
    }
}

/// What one step of body forwarding did.
enum Forwarded {
    Chunk(u64),
    Stopped,
}

/// Parses the head at the start of `buffer`, if it is one the loop serves (`None`: not
/// yet a whole head, or not one the loop serves: hyper's). Forwarding headers are recorded
/// only when `forwarding` (the peer is a trusted proxy that names clients in them).
fn parse(buffer: &[u8], limits: LoopLimits, forwarding: bool) -> Option<Head> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let length = match request.parse(buffer) {
        Ok(httparse::Status::Complete(length)) if length <= limits.max_head_bytes => length,
        _ => return None,
    };
    if request.version != Some(1) {
        return None;
    }
    let method = match request.method {
        Some("GET") => Method::GET,
        Some("POST") => Method::POST,
        Some("PUT") => Method::PUT,
        Some("DELETE") => Method::DELETE,
        Some("PATCH") => Method::PATCH,
        _ => return None,
    };
    let path = request.path.filter(|path| path.starts_with('/'))?;
    let path = span(buffer, path.as_bytes())?;
    let mut head = Head {
        method,
        path,
        fields: SmallVec::new(),
        length,
        content_length: None,
        close: false,
    };
    for parsed in request.headers.iter() {
        let name = parsed.name.as_bytes();
        if let Some(field) = Field::of(name) {
            if field == Field::ContentLength {
                match (head.content_length, decimal(parsed.value)) {
                    (None, Some(value)) => head.content_length = Some(value),
                    _ => return None,
                }
            } else if matches!(field, Field::XForwardedFor | Field::Forwarded) {
                if forwarding {
                    head.fields.push((field, span(buffer, parsed.value)?));
                }
            } else {
                head.fields.push((field, span(buffer, parsed.value)?));
            }
        } else if name.eq_ignore_ascii_case(b"connection") {
            if parsed.value.eq_ignore_ascii_case(b"close") {
                head.close = true;
            } else if !parsed.value.eq_ignore_ascii_case(b"keep-alive") {
                return None;
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding")
            || name.eq_ignore_ascii_case(b"expect")
            || name.eq_ignore_ascii_case(b"upgrade")
        {
            return None;
        }
    }
    Some(head)
}

/// A `Content-Length` value: ASCII digits only, no sign, no list, no overflow.
fn decimal(value: &[u8]) -> Option<u64> {
    if value.is_empty() || value.len() > 19 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(value).ok()?.parse().ok()
}

/// Where `part` lies inside `whole` (it always does: httparse hands out sub-slices).
fn span(whole: &[u8], part: &[u8]) -> Option<(usize, usize)> {
    let start = (part.as_ptr() as usize).checked_sub(whole.as_ptr() as usize)?;
    let end = start.checked_add(part.len())?;
    (end <= whole.len()).then_some((start, end))
}

/// The request head the stages read, its values sharing the head's buffer (no
/// `HeaderMap`, no allocation).
fn build(head: &Head, bytes: &Bytes) -> Option<RequestHead> {
    let slice =
        |(start, end): (usize, usize)| bytes.get(start..end).map(|_| bytes.slice(start..end));
    let uri = Uri::from_maybe_shared(slice(head.path)?).ok()?;
    let mut request = RequestHead::new(head.method.clone(), uri);
    request.content_length = head.content_length;
    for (field, value) in &head.fields {
        if matches!(field, Field::XForwardedFor | Field::Forwarded) {
            // Read by `client`, not kept in the head.
            continue;
        }
        request.set(*field, HeaderValue::from_maybe_shared(slice(*value)?).ok()?);
    }
    Some(request)
}

/// The loop's reading of the head at the start of `buffer` (no trusted proxy), for the
/// differential check against hyper (`fuzz/`, `tests/h1_differential`): `None`, handed to
/// hyper; `Some(None)`, answered 400 here; `Some(Some(head))`, what the stages are given.
#[doc(hidden)]
#[must_use]
pub fn recognise(buffer: &[u8], max_head_bytes: usize) -> Option<Option<RequestHead>> {
    let limits = LoopLimits {
        max_head_bytes,
        idle_timeout: Duration::ZERO,
    };
    let head = parse(buffer, limits, false)?;
    let bytes = Bytes::copy_from_slice(buffer.get(..head.length)?);
    Some(build(&head, &bytes))
}

/// Renders `reply` as an HTTP/1.1 response into `out`.
fn encode(reply: Reply, close: bool, out: &mut Vec<u8>) {
    match reply {
        Reply::Answer {
            answer,
            cache_status,
        } => encode_answer(&answer, cache_status, close, out),
        Reply::Response(response) => {
            let (parts, body) = response.into_parts();
            // A `Full` body is ready at once; anything else would be a bug, sent empty.
            let body = match body.collect().now_or_never() {
                Some(Ok(collected)) => collected.to_bytes(),
                _ => Bytes::new(),
            };
            status_line(parts.status, out);
            for (name, value) in &parts.headers {
                header_line(name.as_str().as_bytes(), value.as_bytes(), out);
            }
            if has_body(parts.status) && !parts.headers.contains_key(header::CONTENT_LENGTH) {
                let mut digits = itoa::Buffer::new();
                header_line(b"content-length", digits.format(body.len()).as_bytes(), out);
            }
            if !parts.headers.contains_key(header::DATE) {
                date_line(out);
            }
            end_head(close, out);
            if has_body(parts.status) {
                out.extend_from_slice(&body);
            }
        }
    }
}

/// A stored answer: status line, `Cache-Status`, the pre-rendered head, date, body.
pub fn encode_answer(
    answer: &Answer,
    cache_status: Option<&HeaderValue>,
    close: bool,
    out: &mut Vec<u8>,
) {
    status_line(answer.status, out);
    if let Some(status) = cache_status {
        header_line(b"cache-status", status.as_bytes(), out);
    }
    out.extend_from_slice(answer.rendered_head());
    date_line(out);
    end_head(close, out);
    if has_body(answer.status) {
        out.extend_from_slice(answer.body_bytes());
    }
}

fn status_line(status: StatusCode, out: &mut Vec<u8>) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
}

fn header_line(name: &[u8], value: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

fn end_head(close: bool, out: &mut Vec<u8>) {
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// `date`, rendered once per second per thread (as hyper does).
fn date_line(out: &mut Vec<u8>) {
    thread_local! {
        static DATE: RefCell<(u64, Vec<u8>)> = const { RefCell::new((u64::MAX, Vec::new())) };
    }
    let now = SystemTime::now();
    let second = now
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs());
    DATE.with_borrow_mut(|(rendered_at, text)| {
        if *rendered_at != second {
            *rendered_at = second;
            text.clear();
            text.extend_from_slice(httpdate::fmt_http_date(now).as_bytes());
        }
        header_line(b"date", text, out);
    });
}

/// Sends what is left and closes, within [`CLOSE_TIMEOUT`].
async fn close(io: &mut Box<dyn Io>) {
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, io.shutdown()).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: LoopLimits = LoopLimits {
        max_head_bytes: 8192,
        idle_timeout: Duration::from_secs(1),
    };

    fn simple(raw: &[u8]) -> Option<Head> {
        parse(raw, LIMITS, false)
    }

    #[test]
    fn forwarding_headers_are_recorded_only_for_a_trusted_proxy() {
        let raw = b"GET / HTTP/1.1\r\nX-Forwarded-For: 10.0.0.1\r\nforwarded: for=10.0.0.2\r\nx-forwarded-for: 10.0.0.3\r\n\r\n";
        assert!(simple(raw).expect("served here").fields.is_empty());
        let head = parse(raw, LIMITS, true).expect("served here");
        let fields: Vec<_> = head
            .fields
            .iter()
            .map(|(field, (start, end))| (*field, &raw[*start..*end]))
            .collect();
        assert_eq!(
            fields,
            [
                (Field::XForwardedFor, &b"10.0.0.1"[..]),
                (Field::Forwarded, b"for=10.0.0.2"),
                (Field::XForwardedFor, b"10.0.0.3"),
            ]
        );
    }

    #[test]
    fn a_plain_post_is_served_here_with_its_length() {
        let raw = b"POST /api/v1/x?q=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 12\r\nAUTHORIZATION: Bearer t\r\nContent-Type: application/json\r\nDiia-Trace-Id: 42\r\nConnection: keep-alive\r\nAuthorization: Bearer second\r\n\r\n{\"a\":\"b\"}   ";
        let head = simple(raw).expect("simple");
        assert_eq!(head.method, Method::POST);
        assert_eq!(head.content_length, Some(12));
        assert!(!head.close);
        assert_eq!(head.length, raw.len() - 12);
        let bytes = Bytes::copy_from_slice(&raw[..head.length]);
        let request = build(&head, &bytes).expect("request");
        assert_eq!(request.uri.path(), "/api/v1/x");
        assert_eq!(request.uri.query(), Some("q=1"));
        assert_eq!(request.content_length, Some(12));
        let value = |v: &Option<HeaderValue>| v.as_ref().map(|v| v.as_bytes().to_vec());
        assert_eq!(value(&request.authorization), Some(b"Bearer t".to_vec()));
        assert_eq!(
            value(&request.content_type),
            Some(b"application/json".to_vec())
        );
        assert_eq!(value(&request.trace_id), Some(b"42".to_vec()));
        assert_eq!(request.api_key, None);
    }

    #[test]
    fn anything_unusual_goes_to_hyper() {
        for raw in [
            &b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n",
            b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: +1\r\n\r\n",
            b"GET / HTTP/1.0\r\n\r\n",
            b"HEAD / HTTP/1.1\r\n\r\n",
            b"OPTIONS * HTTP/1.1\r\n\r\n",
            b"GET http://a/ HTTP/1.1\r\n\r\n",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            b"PRI * HTT",
            b"POST / HTTP/1.1\r\nHost: a\r\n",
            b"GET /\x01 HTTP/1.1\r\n\r\n",
        ] {
            assert!(simple(raw).is_none(), "{}", String::from_utf8_lossy(raw));
        }
        let long = format!("GET / HTTP/1.1\r\nX-Long: {}\r\n\r\n", "a".repeat(9000));
        assert!(simple(long.as_bytes()).is_none());
    }

    #[test]
    fn connection_close_is_honoured() {
        let head = simple(b"GET /x HTTP/1.1\r\nConnection: Close\r\n\r\n").expect("simple");
        assert!(head.close);
        assert_eq!(head.content_length, None);
    }

    #[test]
    fn a_stored_answer_renders_as_http() {
        let answer = Answer::new(
            StatusCode::OK,
            crate::answer::AnswerParts {
                body: b"{}",
                ..Default::default()
            },
        );
        let mut out = Vec::new();
        encode_answer(
            &answer,
            Some(&HeaderValue::from_static("g; hit")),
            true,
            &mut out,
        );
        let text = String::from_utf8(out).expect("utf-8");
        assert!(text.starts_with("HTTP/1.1 200 OK\r\ncache-status: g; hit\r\ncontent-type: application/json\r\ncontent-length: 2\r\ndate: "), "{text}");
        assert!(
            text.ends_with(" GMT\r\nconnection: close\r\n\r\n{}"),
            "{text}"
        );
    }
}
