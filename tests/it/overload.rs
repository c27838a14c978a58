//! Overload protection: in-flight shedding, connection cap, slow-header clients.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::StatusCode;
use serde_json::json;
use support::Harness;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_over_max_in_flight_are_shed_at_once() {
    let h = Arc::new(Harness::with(|_| {}, |c| c.server.max_in_flight = 2).await);
    let token = h.session_token().await;
    let mut barcodes = Vec::new();
    for _ in 0..6 {
        barcodes.push(h.issue_barcode().await);
    }
    h.set_faults(json!({"latency": "600ms"})).await;
    let tasks: Vec<_> = barcodes
        .into_iter()
        .enumerate()
        .map(|(i, barcode)| {
            let (h, token) = (Arc::clone(&h), token.clone());
            tokio::spawn(async move {
                // The first two go in first and hold the two slots.
                tokio::time::sleep(Duration::from_millis(if i < 2 { 0 } else { 150 })).await;
                let started = Instant::now();
                let reply = h.identify(&token, &format!("b{i}"), &barcode).await;
                (reply, started.elapsed())
            })
        })
        .collect();
    let mut ok = 0;
    let mut shed = 0;
    for task in tasks {
        let (reply, elapsed) = task.await.unwrap();
        match reply.status {
            StatusCode::OK => ok += 1,
            StatusCode::SERVICE_UNAVAILABLE => {
                assert_eq!(reply.gateway_code(), "overloaded");
                assert_eq!(reply.header("retry-after"), Some("1"));
                assert!(
                    elapsed < Duration::from_millis(400),
                    "shed without waiting: {elapsed:?}"
                );
                shed += 1;
            }
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!((ok, shed), (2, 4));
    assert_eq!(
        h.sim_calls("document_identification").await,
        2,
        "shed requests cost Diia nothing"
    );
}

#[tokio::test]
async fn a_client_that_never_finishes_its_headers_is_cut_off() {
    let h = Harness::with(
        |_| {},
        |c| c.server.header_read_timeout = Duration::from_millis(300),
    )
    .await;
    let mut stream = TcpStream::connect(h.gateway.addr()).await.unwrap();
    stream
        .write_all(b"POST /api/v1/acquirers/document-identification HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let mut buffer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut buffer)).await;
    assert!(read.is_ok(), "the server closed the connection");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "closed near the header timeout"
    );
    // Hyper answers 408 before closing, or closes outright; either way no request was made.
    let text = String::from_utf8_lossy(&buffer);
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 408"),
        "{text}"
    );
    assert_eq!(h.sim_total().await, 0);
}

#[tokio::test]
async fn connections_over_the_cap_wait_for_a_slot() {
    let h = Harness::with(
        |_| {},
        |c| {
            c.server.max_connections = 1;
            c.server.header_read_timeout = Duration::from_secs(5);
        },
    )
    .await;
    // One client holds the only slot with an open, idle connection.
    let holder = TcpStream::connect(h.gateway.addr()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let client = support::client();
    let url = h.url("/nope");
    let waiting = tokio::spawn(async move {
        support::send(&client, http::Method::GET, &url, &[], String::new())
            .await
            .status
    });
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(
        !waiting.is_finished(),
        "the second connection is not served while the first holds the slot"
    );
    drop(holder);
    let status = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "served once the slot was free"
    );
}

#[tokio::test]
async fn an_idle_connection_is_closed_after_the_idle_timeout() {
    let h = Harness::with(
        |_| {},
        |c| {
            c.server.request_deadline = Duration::from_millis(200);
            c.server.idle_timeout = Duration::from_millis(500);
        },
    )
    .await;
    let mut stream = TcpStream::connect(h.gateway.addr()).await.unwrap();
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buffer = [0u8; 1024];
    let n = stream.read(&mut buffer).await.unwrap();
    assert!(String::from_utf8_lossy(&buffer[..n]).starts_with("HTTP/1.1 404"));
    let started = Instant::now();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest)).await;
    assert!(
        closed.is_ok(),
        "the server closed the idle keep-alive connection"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "not before the idle timeout"
    );
}

#[tokio::test]
async fn malformed_and_oversized_requests_get_an_answer_not_a_hang() {
    let h = Harness::start().await;
    let cases: [(&[u8], &str); 3] = [
        (b"GARBAGE\r\n\r\n", "HTTP/1.1 400"),
        (b"POST /api/v1/acquirers/document-identification HTTP/1.1\r\nhost: x\r\ncontent-length: abc\r\n\r\n", "HTTP/1.1 400"),
        (b"", "HTTP/1.1 431"),
    ];
    for (raw, expected) in cases {
        let request = if raw.is_empty() {
            // 200 KB of headers.
            let mut huge = b"GET /healthz HTTP/1.1\r\nhost: x\r\n".to_vec();
            for i in 0..2000 {
                huge.extend_from_slice(format!("x-filler-{i}: {}\r\n", "a".repeat(100)).as_bytes());
            }
            huge.extend_from_slice(b"\r\n");
            huge
        } else {
            raw.to_vec()
        };
        let mut stream = TcpStream::connect(h.gateway.addr()).await.unwrap();
        let _ = stream.write_all(&request).await;
        let mut answer = Vec::new();
        let read =
            tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await;
        assert!(read.is_ok(), "answered and closed within the bound");
        let text = String::from_utf8_lossy(&answer);
        assert!(
            text.starts_with(expected),
            "expected {expected}, got {text:?}"
        );
    }
    assert_eq!(h.sim_total().await, 0);
}
