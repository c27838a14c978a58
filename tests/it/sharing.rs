//! A sharing request never pushes a second consent request to the customer's phone.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::support;

use std::sync::Arc;

use http::StatusCode;
use serde_json::json;
use support::Harness;

async fn pushes(h: &Harness) -> u64 {
    h.sim_stats().await["pushes"].as_u64().expect("pushes")
}

#[tokio::test]
async fn retry_with_the_same_request_id_replays_the_first_answer() {
    let h = Harness::start().await;
    let token = h.session_token().await;
    let barcode = h.issue_barcode().await;
    let first = h
        .share(
            &token,
            "b1",
            &barcode,
            "4f9c6c1e-1b7a-4c1e-9f59-0a4b1f4f7e11",
        )
        .await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(first.json()["success"], true);
    let retry = h
        .share(
            &token,
            "b1",
            &barcode,
            "4f9c6c1e-1b7a-4c1e-9f59-0a4b1f4f7e11",
        )
        .await;
    assert_eq!(retry.status, StatusCode::OK);
    assert_eq!(retry.body, first.body);
    assert_eq!(
        retry.header("cache-status"),
        Some("diia-gateway; hit; detail=replay")
    );
    assert_eq!(pushes(&h).await, 1);
    assert_eq!(h.sim_calls("document_request").await, 1);
}

#[tokio::test]
async fn another_request_id_for_the_same_barcode_is_409_not_a_second_push() {
    let h = Harness::start().await;
    let token = h.session_token().await;
    let barcode = h.issue_barcode().await;
    assert_eq!(
        h.share(&token, "b1", &barcode, "request-a").await.status,
        StatusCode::OK
    );
    let other = h.share(&token, "b1", &barcode, "request-b").await;
    assert_eq!(other.status, StatusCode::CONFLICT);
    assert_eq!(other.gateway_code(), "sharing_already_requested");
    assert_eq!(pushes(&h).await, 1);
    assert_eq!(h.sim_calls("document_request").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_retries_push_once() {
    let h = Arc::new(Harness::start().await);
    let token = h.session_token().await;
    let barcode = h.issue_barcode().await;
    h.set_faults(json!({"latency": "200ms"})).await;
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let h = Arc::clone(&h);
            let (token, barcode) = (token.clone(), barcode.clone());
            // Half retry the same requestId, half come with another one.
            let request_id = if i % 2 == 0 { "same" } else { "different" };
            tokio::spawn(async move { h.share(&token, "b1", &barcode, request_id).await.status })
        })
        .collect();
    let mut statuses = Vec::new();
    for task in tasks {
        statuses.push(task.await.expect("task"));
    }
    let ok = statuses.iter().filter(|s| **s == StatusCode::OK).count();
    let conflict = statuses
        .iter()
        .filter(|s| **s == StatusCode::CONFLICT)
        .count();
    assert_eq!((ok, conflict), (10, 10), "{statuses:?}");
    assert_eq!(pushes(&h).await, 1);
}

#[tokio::test]
async fn sharing_status_is_forwarded() {
    let h = Harness::start().await;
    let token = h.session_token().await;
    let barcode = h.issue_barcode().await;
    assert_eq!(
        h.share(&token, "b1", &barcode, "req-1").await.status,
        StatusCode::OK
    );
    let bearer = format!("Bearer {token}");
    let status = h
        .send(
            http::Method::GET,
            &format!("/api/v1/acquirers/document-request/status?barcode={barcode}&requestId=req-1"),
            &[
                ("authorization", &bearer),
                ("content-type", "application/json"),
            ],
            "",
        )
        .await;
    assert_eq!(status.status, StatusCode::OK);
    assert_eq!(status.json()["status"], "processing");
}

#[tokio::test]
async fn a_failed_push_can_be_retried() {
    let h = Harness::start().await;
    let token = h.session_token().await;
    let barcode = h.issue_barcode().await;
    h.set_faults(json!({"error_rate": 1.0})).await;
    assert_eq!(
        h.share(&token, "b1", &barcode, "r").await.status,
        StatusCode::INTERNAL_SERVER_ERROR
    );
    h.set_faults(json!({})).await;
    // A 5xx is not a definitive answer: the retry goes to Diia and pushes.
    assert_eq!(
        h.share(&token, "b1", &barcode, "r").await.status,
        StatusCode::OK
    );
    assert_eq!(pushes(&h).await, 1);
}

/// Diia pushes, then answers after the gateway's deadline: the outcome is unknown, so the
/// retry with the same `requestId` is answered by the gateway (504
/// `sharing_outcome_unknown`, poll the status) and never reaches Diia; another
/// `requestId` gets 409. The simulator finishes the push although the gateway hung up.
#[tokio::test]
async fn a_timed_out_push_is_never_sent_twice() {
    let h = Harness::with(
        |_| {},
        |c| c.upstream.timeout = std::time::Duration::from_millis(300),
    )
    .await;
    let token = h.session_token().await;
    let barcode = h.issue_barcode().await;
    h.set_faults(json!({"latency": "700ms"})).await;
    let first = h.share(&token, "b1", &barcode, "req-1").await;
    assert_eq!(first.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(first.gateway_code(), "sharing_outcome_unknown");
    h.set_faults(json!({})).await;
    // Let the simulator finish the push it started.
    tokio::time::sleep(std::time::Duration::from_millis(900)).await;
    assert_eq!(pushes(&h).await, 1, "Diia pushed once, after the deadline");

    let retry = h.share(&token, "b1", &barcode, "req-1").await;
    assert_eq!(retry.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(retry.gateway_code(), "sharing_outcome_unknown");
    assert!(
        retry.json()["message"]
            .as_str()
            .unwrap()
            .contains("document-request/status")
    );
    let other = h.share(&token, "b1", &barcode, "req-2").await;
    assert_eq!(other.status, StatusCode::CONFLICT);
    assert_eq!(h.sim_calls("document_request").await, 1);
    assert_eq!(pushes(&h).await, 1);
}
