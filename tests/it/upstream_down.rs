//! Diia down or slow: documented 502/504 answers within the deadline.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::support;

use std::time::{Duration, Instant};

use http::StatusCode;
use serde_json::json;
use support::{Harness, dead_port, gateway_config};

#[tokio::test]
async fn unreachable_diia_is_502() {
    let config = gateway_config(&format!("http://{}", dead_port()));
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
