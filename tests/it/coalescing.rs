//! Identical concurrent requests make one Diia call, and that call survives its client.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::support;

use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use serde_json::json;
use support::Harness;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_identical_requests_make_one_diia_call() {
    let h = Arc::new(Harness::start().await);
    let token = h.session_token().await;
    let barcode = h.issue_barcode().await;
    h.set_faults(json!({"latency": "300ms"})).await;

    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let h = Arc::clone(&h);
            let (token, barcode) = (token.clone(), barcode.clone());
            tokio::spawn(async move { h.identify(&token, "branch-1", &barcode).await })
        })
        .collect();
    let mut coalesced = 0;
    for task in tasks {
        let reply = task.await.expect("task");
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.json()["success"], true);
        if reply.header("cache-status") == Some("diia-gateway; fwd=miss; collapsed") {
            coalesced += 1;
        }
    }
    assert_eq!(
        h.sim_calls("document_identification").await,
        1,
        "exactly one call reached Diia"
    );
    assert!(
        coalesced > 0,
        "some requests must have waited behind the leader"
    );
    let saved = h.metric("diia_gateway_diia_calls_saved_total").await;
    assert_eq!(
        saved, 99.0,
        "99 of 100 requests were answered without a Diia call"
    );
}

#[tokio::test]
async fn leader_call_finishes_after_its_client_hangs_up() {
    let h = Arc::new(Harness::start().await);
    let token = h.session_token().await;
    let barcode = h.issue_barcode().await;
    h.set_faults(json!({"latency": "400ms"})).await;

    let leader = {
        let h = Arc::clone(&h);
        let (token, barcode) = (token.clone(), barcode.clone());
        tokio::spawn(async move { h.identify(&token, "b", &barcode).await })
    };
    // The branch backend gives up; the connection is dropped.
    abandon_then_rescan(&h, leader, &token, &barcode).await;
}

/// Aborts the leader's client mid-call (Diia takes 400 ms), then checks that the abandoned
/// call still completed and filled the cache: the re-scan is a hit, and the single-use
/// barcode was sent to Diia exactly once.
async fn abandon_then_rescan(
    h: &Harness,
    leader: tokio::task::JoinHandle<support::Reply>,
    token: &str,
    barcode: &str,
) {
    tokio::time::sleep(Duration::from_millis(100)).await;
    leader.abort();
    let _ = leader.await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    h.set_faults(json!({})).await;
    let rescan = h.identify(token, "b", barcode).await;
    assert_eq!(rescan.status, StatusCode::OK);
    assert_eq!(rescan.header("cache-status"), Some("diia-gateway; hit"));
    assert_eq!(h.sim_calls("document_identification").await, 1);
}

/// HTTP/2 resets the stream of a request its client gave up on, and the server drops that
/// request's handler mid-call; the leader's call runs in that handler, so it must go on
/// detached and still fill the cache (and never send the single-use barcode twice).
#[tokio::test]
async fn leader_call_finishes_after_its_http2_stream_is_reset() {
    let h = Arc::new(Harness::start().await);
    let token = h.session_token().await;
    let barcode = h.issue_barcode().await;
    h.set_faults(json!({"latency": "400ms"})).await;

    let h2: support::HttpClient =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .http2_only(true)
            .build_http();
    let leader = {
        let (url, bearer) = (
            h.url("/api/v1/acquirers/document-identification"),
            format!("Bearer {token}"),
        );
        let body = format!(r#"{{"branchId":"b","barcode":"{barcode}"}}"#);
        let h2 = h2.clone();
        tokio::spawn(async move {
            support::send(
                &h2,
                http::Method::POST,
                &url,
                &[
                    ("authorization", &bearer),
                    ("content-type", "application/json"),
                ],
                body,
            )
            .await
        })
    };
    // RST_STREAM: the gateway drops the handler, the connection stays.
    abandon_then_rescan(&h, leader, &token, &barcode).await;
    drop(h2);
}

#[tokio::test]
async fn a_leader_past_its_deadline_answers_504_and_its_call_still_fills_the_cache() {
    let h = Arc::new(
        Harness::with(
            |_| {},
            |c| {
                c.server.request_deadline = Duration::from_millis(300);
                c.upstream.timeout = Duration::from_secs(5);
            },
        )
        .await,
    );
    let token = h.session_token().await;
    let barcode = h.issue_barcode().await;
    h.set_faults(json!({"latency": "1500ms"})).await;
    let started = std::time::Instant::now();
    let reply = h.identify(&token, "b", &barcode).await;
    assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(reply.gateway_code(), "upstream_timeout");
    assert!(
        started.elapsed() < Duration::from_millis(1400),
        "answered at the deadline, not after Diia"
    );
    // The leader's call, which ran in the request that timed out, went on by itself and
    // filled the cache: the re-scan is a hit, and Diia saw the barcode once.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    h.set_faults(json!({})).await;
    let rescan = h.identify(&token, "b", &barcode).await;
    assert_eq!(rescan.status, StatusCode::OK, "{rescan:?}");
    assert_eq!(rescan.header("cache-status"), Some("diia-gateway; hit"));
    assert_eq!(h.sim_calls("document_identification").await, 1);
}
