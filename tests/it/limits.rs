//! Rate limits: per branch first, then the budget toward Diia, and Diia's own brake.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::support;

use std::time::Duration;

use http::StatusCode;
use serde_json::json;
use support::Harness;

#[tokio::test]
async fn branch_over_its_budget_gets_429_with_headers() {
    let h = Harness::with(
        |_| {},
        |c| {
            c.limits.branch.per_minute = 6.try_into().unwrap();
            c.limits.branch.burst = 2.try_into().unwrap();
        },
    )
    .await;
    let token = h.session_token().await;
    let barcode = h.issue_barcode().await;
    assert_eq!(
        h.identify(&token, "busy", &barcode).await.status,
        StatusCode::OK
    );
    assert_eq!(
        h.identify(&token, "busy", &barcode).await.status,
        StatusCode::OK
    );
    let limited = h.identify(&token, "busy", &barcode).await;
    assert_eq!(limited.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(limited.gateway_code(), "branch_rate_limited");
    let retry_after: u64 = limited
        .header("retry-after")
        .expect("Retry-After")
        .parse()
        .expect("seconds");
    assert!((1..=10).contains(&retry_after), "Retry-After {retry_after}");
    assert_eq!(
        limited.header("ratelimit-policy"),
        Some("\"branch\";q=6;w=60")
    );
    assert_eq!(
        limited.header("ratelimit"),
        Some(format!("\"branch\";r=0;t={retry_after}").as_str())
    );
    // Another branch has its own budget (Diia answers it: the code is used by now).
    let quiet = h.identify(&token, "quiet", &barcode).await;
    assert_eq!(quiet.status, StatusCode::BAD_REQUEST);
    assert_eq!(quiet.json()["message"], "This code has been used already!");
    assert_eq!(
        h.sim_calls("document_identification").await,
        2,
        "the limited request cost Diia nothing"
    );
}

#[tokio::test]
async fn empty_diia_budget_waits_then_503() {
    let h = Harness::with(
        |_| {},
        |c| {
            c.limits.diia.per_second = 1.try_into().unwrap();
            c.limits.diia.burst = 2.try_into().unwrap();
            c.limits.diia.max_wait = Duration::from_millis(100);
        },
    )
    .await;
    let token = h.session_token().await; // spends 1 of the burst of 2
    let first = h.issue_barcode().await;
    let second = h.issue_barcode().await;
    assert_eq!(h.identify(&token, "b", &first).await.status, StatusCode::OK);
    let started = std::time::Instant::now();
    let refused = h.identify(&token, "b", &second).await;
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(refused.gateway_code(), "diia_budget_exhausted");
    assert!(refused.header("retry-after").is_some_and(|v| v != "0"));
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "waited at most max_wait"
    );
    assert_eq!(h.sim_calls("document_identification").await, 1);
    // The budget refills at 1/s: a short wait is absorbed instead of refused.
    tokio::time::sleep(Duration::from_millis(950)).await;
    let h2 = h.identify(&token, "b", &second).await;
    assert_eq!(h2.status, StatusCode::OK, "{:?}", h2.body);
}

#[tokio::test]
async fn a_short_wait_for_diia_budget_is_absorbed() {
    let h = Harness::with(
        |_| {},
        |c| {
            c.limits.diia.per_second = 5.try_into().unwrap();
            c.limits.diia.burst = 1.try_into().unwrap();
            c.limits.diia.max_wait = Duration::from_millis(500);
        },
    )
    .await;
    let barcode = h.issue_barcode().await;
    let token = h.session_token().await; // spends the burst
    let started = std::time::Instant::now();
    // The budget refills one call every 200ms: this request waits, then goes through.
    let reply = h.identify(&token, "b", &barcode).await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    assert!(
        started.elapsed() >= Duration::from_millis(100),
        "it had to wait for budget"
    );
    assert_eq!(h.sim_calls("document_identification").await, 1);
}

#[tokio::test]
async fn diia_429_pauses_all_upstream_calls() {
    let h = Harness::start().await;
    let token = h.session_token().await;
    let barcodes = [
        h.issue_barcode().await,
        h.issue_barcode().await,
        h.issue_barcode().await,
    ];
    h.set_faults(json!({"quota_per_second": 1, "quota_retry_after": "2s"}))
        .await;
    assert_eq!(
        h.identify(&token, "b", &barcodes[0]).await.status,
        StatusCode::OK
    );
    let throttled = h.identify(&token, "b", &barcodes[1]).await;
    assert_eq!(
        throttled.status,
        StatusCode::TOO_MANY_REQUESTS,
        "Diia's 429 is passed on"
    );
    assert_eq!(throttled.header("retry-after"), Some("2"));
    let calls_before = h.sim_calls("document_identification").await;
    // Gateway-wide brake: the next call, for another barcode and branch, is not sent.
    let braked = h.identify(&token, "other-branch", &barcodes[2]).await;
    assert_eq!(braked.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(braked.gateway_code(), "diia_backoff");
    let wait: u64 = braked
        .header("retry-after")
        .expect("Retry-After")
        .parse()
        .expect("seconds");
    assert!((1..=2).contains(&wait));
    assert_eq!(h.sim_calls("document_identification").await, calls_before);
    // Cache hits are still served during the pause.
    assert_eq!(
        h.identify(&token, "b", &barcodes[0]).await.status,
        StatusCode::OK
    );
    tokio::time::sleep(Duration::from_millis(2100)).await;
    h.set_faults(json!({})).await;
    assert_eq!(
        h.identify(&token, "other-branch", &barcodes[2])
            .await
            .status,
        StatusCode::OK
    );
}
