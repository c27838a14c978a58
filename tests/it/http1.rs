//! HTTP/1.1 connections on raw sockets: the gateway's own loop (pipelining, bodies that
//! arrive after their head, `Connection: close`, the idle timer) and the hand-over to
//! hyper in the middle of a connection (README "Hostile clients").

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::support;

use std::time::Duration;

use support::Harness;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const IDENT: &str = "/api/v1/acquirers/document-identification";

/// One response read off a raw socket.
#[derive(Debug)]
struct RawResponse {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl RawResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A keep-alive connection that reads responses one by one (`Content-Length` framed).
struct Conn {
    stream: TcpStream,
    buffer: Vec<u8>,
}

impl Conn {
    async fn open(address: std::net::SocketAddr) -> Self {
        Self {
            stream: TcpStream::connect(address).await.unwrap(),
            buffer: Vec::new(),
        }
    }

    async fn write(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    /// The next response, or `None` when the peer closed first (within 5 s).
    async fn response(&mut self) -> Option<RawResponse> {
        tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                if let Some(response) = self.parse() {
                    return Some(response);
                }
                let mut chunk = [0u8; 4096];
                match self.stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => return None,
                    Ok(n) => self.buffer.extend_from_slice(&chunk[..n]),
                }
            }
        })
        .await
        .expect("a response or a close within 5 s")
    }

    fn parse(&mut self) -> Option<RawResponse> {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut response = httparse::Response::new(&mut headers);
        let httparse::Status::Complete(head) = response.parse(&self.buffer).unwrap() else {
            return None;
        };
        let headers: Vec<(String, String)> = response
            .headers
            .iter()
            .map(|h| {
                (
                    h.name.to_ascii_lowercase(),
                    String::from_utf8_lossy(h.value).into_owned(),
                )
            })
            .collect();
        let length: usize = headers
            .iter()
            .find(|(n, _)| n == "content-length")
            .map_or(0, |(_, v)| v.parse().unwrap());
        if self.buffer.len() < head + length {
            return None;
        }
        let status = response.code.unwrap();
        let body = self.buffer[head..head + length].to_vec();
        self.buffer.drain(..head + length);
        Some(RawResponse {
            status,
            headers,
            body,
        })
    }

    /// Whether the peer closes the connection within `wait`.
    async fn closes_within(&mut self, wait: Duration) -> bool {
        let mut chunk = [0u8; 64];
        matches!(
            tokio::time::timeout(wait, self.stream.read(&mut chunk)).await,
            Ok(Ok(0) | Err(_))
        )
    }
}

fn identify(token: &str, barcode: &str, extra: &str) -> Vec<u8> {
    let body = format!(r#"{{"branchId":"b1","barcode":"{barcode}"}}"#);
    format!(
        "POST {IDENT} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {token}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n{extra}\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// The same request with a chunked body (one the HTTP/1.1 loop hands to hyper).
fn identify_chunked(token: &str, barcode: &str, extra: &str) -> Vec<u8> {
    let body = format!(r#"{{"branchId":"b1","barcode":"{barcode}"}}"#);
    format!(
        "POST {IDENT} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {token}\r\n\
         content-type: application/json\r\ntransfer-encoding: chunked\r\n{extra}\r\n\
         {:x}\r\n{body}\r\n0\r\n\r\n",
        body.len()
    )
    .into_bytes()
}

/// A harness, a session token, a fresh barcode and one raw connection to the gateway.
async fn scene(h: Harness) -> (Harness, String, String, Conn) {
    let token = h.session_token().await;
    let barcode = h.issue_barcode().await;
    let conn = Conn::open(h.gateway.addr()).await;
    (h, token, barcode, conn)
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    let (h, token, barcode, mut conn) = scene(Harness::start().await).await;
    let mut burst = identify(&token, &barcode, "");
    burst.extend(identify(&token, &barcode, ""));
    burst.extend(b"GET /nowhere HTTP/1.1\r\nhost: x\r\n\r\n");
    conn.write(&burst).await;
    let first = conn.response().await.unwrap();
    let second = conn.response().await.unwrap();
    let third = conn.response().await.unwrap();
    assert_eq!(first.status, 200, "{first:?}");
    assert!(first.header("cache-status").unwrap().contains("fwd=miss"));
    assert_eq!(second.status, 200);
    assert_eq!(second.header("cache-status"), Some("diia-gateway; hit"));
    assert_eq!(second.body, first.body);
    assert_eq!(third.status, 404);
    assert!(third.header("date").is_some());
    assert_eq!(h.sim_calls("document_identification").await, 1);
}

#[tokio::test]
async fn a_body_written_after_its_head_is_read_from_the_socket() {
    let (_h, token, barcode, mut conn) = scene(Harness::start().await).await;
    let request = identify(&token, &barcode, "");
    let split = request.len() - 20;
    conn.write(&request[..split]).await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    conn.write(&request[split..split + 7]).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    conn.write(&request[split + 7..]).await;
    let answer = conn.response().await.unwrap();
    assert_eq!(answer.status, 200, "{answer:?}");
    // The connection stays usable: the next request on it is a hit.
    conn.write(&request).await;
    let again = conn.response().await.unwrap();
    assert_eq!(again.header("cache-status"), Some("diia-gateway; hit"));
}

#[tokio::test]
async fn a_body_slower_than_body_timeout_is_408_and_the_connection_closes() {
    let (h, token, barcode, mut conn) = scene(
        Harness::with(
            |_| {},
            |c| c.server.body_timeout = Duration::from_millis(300),
        )
        .await,
    )
    .await;
    let request = identify(&token, &barcode, "");
    conn.write(&request[..request.len() - 5]).await;
    let answer = conn.response().await.unwrap();
    assert_eq!(answer.status, 408, "{answer:?}");
    assert_eq!(answer.header("connection"), Some("close"));
    assert!(conn.closes_within(Duration::from_secs(2)).await);
    assert_eq!(h.sim_calls("document_identification").await, 0);
}

#[tokio::test]
async fn a_chunked_request_mid_connection_is_handed_to_hyper_and_the_connection_lives_on() {
    let (h, token, barcode, mut conn) = scene(Harness::start().await).await;
    conn.write(&identify(&token, &barcode, "")).await;
    assert_eq!(conn.response().await.unwrap().status, 200);
    conn.write(&identify_chunked(&token, &barcode, "")).await;
    let chunked_answer = conn.response().await.unwrap();
    assert_eq!(chunked_answer.status, 200, "{chunked_answer:?}");
    assert_eq!(
        chunked_answer.header("cache-status"),
        Some("diia-gateway; hit")
    );
    conn.write(&identify(&token, &barcode, "")).await;
    let after = conn.response().await.unwrap();
    assert_eq!(after.header("cache-status"), Some("diia-gateway; hit"));
    assert_eq!(h.sim_calls("document_identification").await, 1);
}

#[tokio::test]
async fn connection_close_is_answered_then_closed() {
    let (_h, token, barcode, mut conn) = scene(Harness::start().await).await;
    conn.write(&identify(&token, &barcode, "connection: close\r\n"))
        .await;
    let answer = conn.response().await.unwrap();
    assert_eq!(answer.status, 200);
    assert_eq!(answer.header("connection"), Some("close"));
    assert!(conn.closes_within(Duration::from_secs(2)).await);
}

#[tokio::test]
async fn http_1_0_is_answered_by_hyper() {
    let h = Harness::start().await;
    let mut conn = Conn::open(h.gateway.addr()).await;
    conn.write(b"GET /nowhere HTTP/1.0\r\n\r\n").await;
    let answer = conn.response().await.unwrap();
    assert_eq!(answer.status, 404);
}

#[tokio::test]
async fn idle_connections_close_after_idle_timeout_and_busy_ones_stay_open() {
    let idle = Duration::from_millis(400);
    let h = Harness::with(
        |_| {},
        |c| {
            c.server.request_deadline = Duration::from_millis(200);
            c.server.idle_timeout = idle;
        },
    )
    .await;
    let token = h.session_token().await;
    let barcode = h.issue_barcode().await;
    // Busy: a request every idle/4 for 3 × idle, all on one connection.
    let mut busy = Conn::open(h.gateway.addr()).await;
    for _ in 0..12 {
        busy.write(&identify(&token, &barcode, "")).await;
        assert_eq!(busy.response().await.unwrap().status, 200);
        tokio::time::sleep(idle / 4).await;
    }
    // Idle after one request: closed within the idle timeout (plus the timer's slack).
    let mut quiet = Conn::open(h.gateway.addr()).await;
    quiet.write(&identify(&token, &barcode, "")).await;
    assert_eq!(quiet.response().await.unwrap().status, 200);
    let started = std::time::Instant::now();
    assert!(quiet.closes_within(Duration::from_secs(3)).await);
    let waited = started.elapsed();
    assert!(
        waited >= idle - Duration::from_millis(50) && waited < idle * 3,
        "closed after {waited:?}"
    );
}

/// A client that repeats `Authorization` cannot make the gateway key a request by one value
/// and send Diia the other: the first value counts for both, in the HTTP/1.1 loop and in
/// hyper (a chunked body), so a forged first token never reads another token's answer.
#[tokio::test]
async fn a_repeated_authorization_counts_by_its_first_value_for_the_key_and_for_diia() {
    let (_h, token, barcode, mut conn) = scene(Harness::start().await).await;
    // The real token first: keyed and forwarded by it.
    conn.write(&identify(
        &token,
        &barcode,
        "authorization: Bearer forged\r\n",
    ))
    .await;
    let first = conn.response().await.unwrap();
    assert_eq!(first.status, 200, "{first:?}");
    assert!(first.header("cache-status").unwrap().contains("fwd=miss"));
    // The forged token first, the real one second: never the real token's cached answer.
    let forged_first = identify(
        "forged",
        &barcode,
        &format!("authorization: Bearer {token}\r\n"),
    );
    conn.write(&forged_first).await;
    let forged = conn.response().await.unwrap();
    assert_eq!(forged.status, 401, "{forged:?}");
    assert_ne!(forged.header("cache-status"), Some("diia-gateway; hit"));
    // The same through hyper (chunked body, handed over mid-connection).
    conn.write(&identify_chunked(
        "forged",
        &barcode,
        &format!("authorization: Bearer {token}\r\n"),
    ))
    .await;
    let through_hyper = conn.response().await.unwrap();
    assert_eq!(through_hyper.status, 401, "{through_hyper:?}");
    assert_ne!(
        through_hyper.header("cache-status"),
        Some("diia-gateway; hit")
    );
    // And the real token alone still reads its answer.
    conn.write(&identify(&token, &barcode, "")).await;
    let hit = conn.response().await.unwrap();
    assert_eq!(hit.header("cache-status"), Some("diia-gateway; hit"));
}
