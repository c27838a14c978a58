//! Verification answers are cached per acquirer: re-scans work, negatives expire sooner,
//! failures are never kept, and acquirers never see each other's entries.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::support;

use std::time::Duration;

use http::StatusCode;
use serde_json::json;
use support::{Harness, OTHER_ACQUIRER_TOKEN, OTHER_AUTH_TOKEN};

#[tokio::test]
async fn rescan_of_a_used_barcode_is_answered_from_cache() {
    let h = Harness::start().await;
    let token = h.session_token().await;
    let barcode = h.issue_barcode().await;

    let first = h.identify(&token, "branch-1", &barcode).await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(first.json()["success"], true);
    assert_eq!(
        first.header("cache-status"),
        Some("diia-gateway; fwd=miss; stored")
    );

    // The barcode is now used at Diia: only the cache can make this re-scan succeed.
    let rescan = h.identify(&token, "branch-1", &barcode).await;
    assert_eq!(rescan.status, StatusCode::OK);
    assert_eq!(rescan.body, first.body);
    assert_eq!(rescan.header("cache-status"), Some("diia-gateway; hit"));
    assert_eq!(
        rescan.header("diia-trace-id"),
        first.header("diia-trace-id")
    );
    assert_eq!(h.sim_calls("document_identification").await, 1);
}

#[tokio::test]
async fn field_order_and_whitespace_share_one_entry() {
    let h = Harness::start().await;
    let token = h.session_token().await;
    let barcode = h.issue_barcode().await;
    let path = "/api/v1/acquirers/document-identification";
    let a = h
        .post(
            path,
            &token,
            &format!(r#"{{"branchId":"b","barcode":"{barcode}"}}"#),
        )
        .await;
    let b = h
        .post(
            path,
            &token,
            &format!(r#"{{ "barcode" : "{barcode}", "branchId" : "b" }}"#),
        )
        .await;
    assert_eq!((a.status, b.status), (StatusCode::OK, StatusCode::OK));
    assert_eq!(b.header("cache-status"), Some("diia-gateway; hit"));
    // A different branch is a different question (its scopes may differ).
    let c = h
        .post(
            path,
            &token,
            &format!(r#"{{"branchId":"c","barcode":"{barcode}"}}"#),
        )
        .await;
    assert_eq!(
        c.header("cache-status"),
        Some("diia-gateway; fwd=miss; stored")
    );
    assert_eq!(h.sim_calls("document_identification").await, 2);
}

#[tokio::test]
async fn entries_expire_after_the_ttl() {
    let h = Harness::with(
        |_| {},
        |c| {
            c.cache.ttl = Duration::from_millis(600);
            c.cache.negative_ttl = Duration::from_millis(300);
        },
    )
    .await;
    let token = h.session_token().await;
    let barcode = h.issue_barcode().await;
    assert_eq!(
        h.identify(&token, "b", &barcode).await.status,
        StatusCode::OK
    );
    assert_eq!(
        h.identify(&token, "b", &barcode)
            .await
            .header("cache-status"),
        Some("diia-gateway; hit")
    );
    tokio::time::sleep(Duration::from_millis(900)).await;
    // Expired: the gateway asks Diia again, which now says the code was used.
    let after = h.identify(&token, "b", &barcode).await;
    assert_eq!(after.status, StatusCode::BAD_REQUEST);
    assert_eq!(after.json()["message"], "This code has been used already!");
    assert_eq!(h.sim_calls("document_identification").await, 2);
}

#[tokio::test]
async fn definitive_negatives_are_cached_for_the_shorter_ttl() {
    let h = Harness::with(
        |_| {},
        |c| {
            c.cache.ttl = Duration::from_secs(30);
            c.cache.negative_ttl = Duration::from_millis(400);
        },
    )
    .await;
    let token = h.session_token().await;
    let unknown = "3389798072091"; // well-formed, never issued: Diia says 404
    let first = h.identify(&token, "b", unknown).await;
    assert_eq!(first.status, StatusCode::NOT_FOUND);
    assert_eq!(first.json()["message"], "No record with presented code!");
    let second = h.identify(&token, "b", unknown).await;
    assert_eq!(second.status, StatusCode::NOT_FOUND);
    assert_eq!(second.header("cache-status"), Some("diia-gateway; hit"));
    assert_eq!(h.sim_calls("document_identification").await, 1);
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(
        h.identify(&token, "b", unknown).await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        h.sim_calls("document_identification").await,
        2,
        "negative entry expired"
    );
}

#[tokio::test]
async fn server_errors_are_never_cached() {
    let h = Harness::start().await;
    let token = h.session_token().await;
    let barcode = h.issue_barcode().await;
    h.set_faults(json!({"error_rate": 1.0})).await;
    for _ in 0..3 {
        let reply = h.identify(&token, "b", &barcode).await;
        assert_eq!(reply.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(reply.header("cache-status"), Some("diia-gateway; fwd=miss"));
    }
    assert_eq!(h.sim_calls("document_identification").await, 3);
    h.set_faults(json!({})).await;
    assert_eq!(
        h.identify(&token, "b", &barcode).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn two_acquirers_never_share_an_entry() {
    let h = Harness::start().await;
    let ours = h.session_token().await;
    let theirs = h
        .session_token_for(OTHER_ACQUIRER_TOKEN, OTHER_AUTH_TOKEN)
        .await;
    assert_ne!(ours, theirs);
    let barcode = h.issue_barcode().await;

    assert_eq!(
        h.identify(&ours, "b", &barcode).await.status,
        StatusCode::OK
    );
    // Same barcode, same branch id, same body, other acquirer: must go to Diia (and fail
    // there, the code being used), never get our cached "success".
    let other = h.identify(&theirs, "b", &barcode).await;
    assert_eq!(other.status, StatusCode::BAD_REQUEST);
    assert_ne!(other.header("cache-status"), Some("diia-gateway; hit"));
    assert_eq!(h.sim_calls("document_identification").await, 2);

    // A made-up bearer token gets nothing from the cache either.
    let forged = h.identify("forged.token.value", "b", &barcode).await;
    assert_eq!(forged.status, StatusCode::UNAUTHORIZED);
    assert_eq!(h.sim_calls("document_identification").await, 3);
}

#[tokio::test]
async fn stale_if_error_serves_an_expired_answer_only_when_diia_fails() {
    let h = Harness::with(
        |_| {},
        |c| {
            c.cache.ttl = Duration::from_millis(300);
            c.cache.negative_ttl = Duration::from_millis(300);
            c.cache.stale_if_error = Duration::from_millis(1500);
        },
    )
    .await;
    let token = h.session_token().await;
    let barcode = h.issue_barcode().await;
    assert_eq!(
        h.identify(&token, "b", &barcode).await.status,
        StatusCode::OK
    );
    tokio::time::sleep(Duration::from_millis(400)).await;

    // Past the TTL and Diia fails: the stored answer is served, marked stale.
    h.set_faults(json!({"error_rate": 1.0})).await;
    for _ in 0..2 {
        let stale = h.identify(&token, "b", &barcode).await;
        assert_eq!(stale.status, StatusCode::OK);
        assert_eq!(stale.json()["success"], true);
        assert_eq!(
            stale.header("cache-status"),
            Some("diia-gateway; fwd=stale; detail=stale-if-error")
        );
    }
    assert_eq!(
        h.sim_calls("document_identification").await,
        3,
        "each stale answer first asked Diia"
    );
    assert_eq!(
        h.metric(
            r#"diia_gateway_requests_total{endpoint="document_identification",outcome="stale"}"#
        )
        .await,
        2.0
    );

    // Past the stale bound the failure is passed on.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let failed = h.identify(&token, "b", &barcode).await;
    assert_eq!(failed.status, StatusCode::INTERNAL_SERVER_ERROR);
}

#[tokio::test]
async fn without_stale_if_error_an_expired_answer_is_never_served() {
    let h = Harness::with(
        |_| {},
        |c| {
            c.cache.ttl = Duration::from_millis(300);
            c.cache.negative_ttl = Duration::from_millis(300);
        },
    )
    .await;
    let token = h.session_token().await;
    let barcode = h.issue_barcode().await;
    assert_eq!(
        h.identify(&token, "b", &barcode).await.status,
        StatusCode::OK
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    h.set_faults(json!({"error_rate": 1.0})).await;
    assert_eq!(
        h.identify(&token, "b", &barcode).await.status,
        StatusCode::INTERNAL_SERVER_ERROR
    );
}
