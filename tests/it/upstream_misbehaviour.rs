//! Misbehaving upstreams on raw sockets, and Diia down or slow: each fault gets a
//! documented answer (502/504) within the deadline, never a hang or a panic. Each test
//! server is named after the fault it plays.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use serde_json::json;
use support::{Harness, dead_port, gateway_config};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Serves every connection with `fault` after reading the request head.
async fn faulty_upstream(fault: &'static [u8], close_after: bool) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = vec![0u8; 8192];
                let _ = stream.read(&mut head).await;
                let _ = stream.write_all(fault).await;
                if close_after {
                    let _ = stream.shutdown().await;
                } else {
                    // Keep the socket open and silent.
                    tokio::time::sleep(Duration::from_secs(30)).await;
                }
            });
        }
    });
    addr
}

async fn identify_through(upstream: SocketAddr) -> (support::Reply, Duration) {
    let mut config = support::gateway_config(&format!("http://{upstream}"));
    config.upstream.timeout = Duration::from_millis(500);
    let gateway = support::start_gateway(config).await;
    let client = support::client();
    let url = format!(
        "http://{}/api/v1/acquirers/document-identification",
        gateway.addr()
    );
    let started = Instant::now();
    let reply = support::send(
        &client,
        Method::POST,
        &url,
        &[
            ("authorization", "Bearer t"),
            ("content-type", "application/json"),
        ],
        r#"{"branchId":"b","barcode":"3389798072091"}"#.to_owned(),
    )
    .await;
    let elapsed = started.elapsed();
    // Printed for the fault matrix (`cargo test --test it upstream_misbehaviour -- --nocapture`).
    eprintln!(
        "fault answer: {} {} in {elapsed:?}",
        reply.status.as_u16(),
        reply.header("content-type").map_or("", |_| "json")
    );
    (reply, elapsed)
}

#[tokio::test]
async fn stalled_upstream_is_504_at_the_deadline() {
    let (reply, elapsed) = identify_through(faulty_upstream(b"", false).await).await;
    assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(reply.gateway_code(), "upstream_timeout");
    assert!(elapsed < Duration::from_millis(1500), "{elapsed:?}");
}

#[tokio::test]
async fn stall_after_headers_is_504() {
    let fault =
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"succ";
    let (reply, elapsed) = identify_through(faulty_upstream(fault, false).await).await;
    assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT);
    assert!(elapsed < Duration::from_millis(1500), "{elapsed:?}");
}

#[tokio::test]
async fn reset_mid_body_is_502() {
    let fault =
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"succ";
    let (reply, elapsed) = identify_through(faulty_upstream(fault, true).await).await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
    assert_eq!(reply.gateway_code(), "upstream_protocol_error");
    assert!(elapsed < Duration::from_millis(1500), "{elapsed:?}");
}

#[tokio::test]
async fn garbage_bytes_are_502() {
    let (reply, _) =
        identify_through(faulty_upstream(b"\x00\x01garbage\xff\r\n\r\n", true).await).await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
    assert_eq!(reply.gateway_code(), "upstream_protocol_error");
}

#[tokio::test]
async fn huge_headers_are_502() {
    let mut fault = b"HTTP/1.1 200 OK\r\n".to_vec();
    for i in 0..2000 {
        fault.extend_from_slice(format!("x-filler-{i}: {}\r\n", "a".repeat(100)).as_bytes());
    }
    fault.extend_from_slice(b"content-length: 2\r\n\r\n{}");
    let fault: &'static [u8] = Box::leak(fault.into_boxed_slice());
    let (reply, _) = identify_through(faulty_upstream(fault, true).await).await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
}

#[tokio::test]
async fn content_length_shorter_than_the_body_passes_the_declared_part() {
    // The extra bytes are the next response on a keep-alive connection as far as HTTP/1.1
    // goes; the answer is the declared body, and nothing hangs.
    let fault = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 16\r\n\r\n{\"success\":true}trailing-junk";
    let (reply, _) = identify_through(faulty_upstream(fault, true).await).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json()["success"], true);
}

#[tokio::test]
async fn oversized_upstream_body_is_502() {
    let mut fault = b"HTTP/1.1 200 OK\r\ncontent-length: 5000000\r\n\r\n".to_vec();
    fault.extend(std::iter::repeat_n(b'x', 5_000_000));
    let fault: &'static [u8] = Box::leak(fault.into_boxed_slice());
    let (reply, _) = identify_through(faulty_upstream(fault, true).await).await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
    assert_eq!(reply.gateway_code(), "upstream_protocol_error");
}

#[tokio::test]
async fn unreachable_diia_is_502() {
    let dead = dead_port();
    let config = gateway_config(&format!("http://{dead}"));
    let gateway = support::start_gateway(config).await;
    let client = support::client();
    let url = format!(
        "http://{}/api/v1/acquirers/document-identification",
        gateway.addr()
    );
    let reply = support::send(
        &client,
        http::Method::POST,
        &url,
        &[
            ("authorization", "Bearer t"),
            ("content-type", "application/json"),
        ],
        r#"{"branchId":"b","barcode":"3389798072091"}"#.to_owned(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
    assert_eq!(reply.gateway_code(), "upstream_unreachable");
    let metrics = gateway.gateway().render_metrics(true);
    assert!(metrics.contains(r#"diia_gateway_requests_total{endpoint="document_identification",outcome="upstream_error"} 1"#));
}

#[tokio::test]
async fn slow_diia_is_504_at_the_upstream_deadline() {
    let h = Harness::with(|_| {}, |c| c.upstream.timeout = Duration::from_millis(300)).await;
    let token = h.session_token().await;
    let barcode = h.issue_barcode().await;
    h.set_faults(json!({"latency": "2s"})).await;
    let started = Instant::now();
    let reply = h.identify(&token, "b", &barcode).await;
    assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(reply.gateway_code(), "upstream_timeout");
    assert!(started.elapsed() < Duration::from_millis(1500));
    // A timeout is not cached: once Diia is fast again the same request goes through.
    h.set_faults(json!({})).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let again = h.identify(&token, "b", &barcode).await;
    assert_ne!(again.status, StatusCode::GATEWAY_TIMEOUT);
}
