//! A failing Diia: the circuit opens and answers fast, probes close it again, and retries
//! stay within their budget and never touch requests that are unsafe to repeat.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::support;

use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use serde_json::json;
use support::{Harness, dead_port, gateway_config};

#[tokio::test]
async fn circuit_opens_after_consecutive_failures_and_a_probe_closes_it() {
    let h = Harness::with(
        |_| {},
        |c| {
            c.upstream.breaker_failures = 3;
            c.upstream.breaker_cooldown = Duration::from_millis(400);
        },
    )
    .await;
    let token = h.session_token().await;
    let mut barcodes = Vec::new();
    for _ in 0..6 {
        barcodes.push(h.issue_barcode().await);
    }
    h.set_faults(json!({"error_rate": 1.0})).await;
    for barcode in &barcodes[..3] {
        assert_eq!(
            h.identify(&token, "b", barcode).await.status,
            StatusCode::INTERNAL_SERVER_ERROR
        );
    }
    let started = Instant::now();
    let open = h.identify(&token, "b", &barcodes[3]).await;
    assert_eq!(open.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(open.gateway_code(), "diia_circuit_open");
    assert!(open.header("retry-after").is_some());
    assert!(
        started.elapsed() < Duration::from_millis(200),
        "answered fast while open"
    );
    assert_eq!(
        h.sim_calls("document_identification").await,
        3,
        "nothing reached Diia while open"
    );
    assert_eq!(
        h.metric(r#"diia_gateway_circuit_open{class="verification"}"#)
            .await,
        1.0
    );

    // After the cool-down one probe goes through; Diia is still failing, so it re-opens.
    tokio::time::sleep(Duration::from_millis(450)).await;
    assert_eq!(
        h.identify(&token, "b", &barcodes[3]).await.status,
        StatusCode::INTERNAL_SERVER_ERROR
    );
    assert_eq!(
        h.identify(&token, "b", &barcodes[4]).await.gateway_code(),
        "diia_circuit_open"
    );
    assert_eq!(h.sim_calls("document_identification").await, 4);

    // Diia recovers: the next probe succeeds and traffic flows again.
    h.set_faults(json!({})).await;
    tokio::time::sleep(Duration::from_millis(450)).await;
    assert_eq!(
        h.identify(&token, "b", &barcodes[4]).await.status,
        StatusCode::OK
    );
    assert_eq!(
        h.identify(&token, "b", &barcodes[5]).await.status,
        StatusCode::OK
    );
    assert_eq!(
        h.metric(r#"diia_gateway_circuit_open{class="verification"}"#)
            .await,
        0.0
    );
}

async fn post(gateway: &diia_gateway::RunningGateway, path: &str, body: &str) -> support::Reply {
    let client = support::client();
    let url = format!("http://{}{path}", gateway.addr());
    support::send(
        &client,
        Method::POST,
        &url,
        &[
            ("authorization", "Bearer t"),
            ("content-type", "application/json"),
        ],
        body.to_owned(),
    )
    .await
}

#[tokio::test]
async fn safe_calls_are_retried_within_the_budget() {
    let dead = dead_port();
    let mut config = gateway_config(&format!("http://{dead}"));
    config.upstream.max_retries = 2;
    config.upstream.retry_reserve = 3;
    config.upstream.retry_ratio = 0.0;
    config.upstream.retry_backoff = Duration::from_millis(5);
    config.upstream.breaker_failures = 1000;
    let gateway = support::start_gateway(config).await;
    let body = |n: u64| {
        let barcode = diia_gateway::barcode::Barcode::from_base(338_979_807_000 + n)
            .unwrap()
            .digits();
        format!(r#"{{"branchId":"b","barcode":"{barcode}"}}"#)
    };
    let first = post(
        &gateway,
        "/api/v1/acquirers/document-identification",
        &body(1),
    )
    .await;
    assert_eq!(first.gateway_code(), "upstream_unreachable");
    let metrics = gateway.gateway().render_metrics(true);
    assert!(
        metrics.contains("diia_gateway_upstream_retries_total 2"),
        "two retries for the first call"
    );
    for n in 2..10 {
        post(
            &gateway,
            "/api/v1/acquirers/document-identification",
            &body(n),
        )
        .await;
    }
    let metrics = gateway.gateway().render_metrics(true);
    assert!(
        metrics.contains("diia_gateway_upstream_retries_total 3"),
        "the budget of 3 caps retries: {}",
        metrics
            .lines()
            .find(|l| l.starts_with("diia_gateway_upstream_retries_total"))
            .unwrap_or_default()
    );
}

#[tokio::test]
async fn sharing_requests_are_never_retried() {
    let dead = dead_port();
    let mut config = gateway_config(&format!("http://{dead}"));
    config.upstream.retry_backoff = Duration::from_millis(5);
    let gateway = support::start_gateway(config).await;
    let reply = post(
        &gateway,
        "/api/v1/acquirers/document-request",
        r#"{"branchId":"b","barcode":"3389798072091","requestId":"r"}"#,
    )
    .await;
    assert_eq!(reply.gateway_code(), "upstream_unreachable");
    let metrics = gateway.gateway().render_metrics(true);
    assert!(metrics.contains("diia_gateway_upstream_retries_total 0"));
}

/// A Diia stand-in (not the simulator): 500 on every management route, a valid answer on
/// identification.
fn management_broken(path: &str) -> (u16, &'static [(&'static str, &'static str)], &'static str) {
    if path.contains("/branch") {
        (500, &[], r#"{"name":"InternalServerError","code":500}"#)
    } else {
        (200, &[], r#"{"success":true}"#)
    }
}

#[tokio::test]
async fn failures_on_management_routes_never_stop_verifications() {
    let upstream = support::stand_in_upstream(management_broken).await;
    let mut config = gateway_config(&format!("http://{upstream}"));
    config.upstream.breaker_failures = 3;
    let gateway = support::start_gateway(config).await;
    let client = support::client();
    let auth = [
        ("authorization", "Bearer t"),
        ("content-type", "application/json"),
    ];
    let branch = format!("http://{}/api/v2/acquirers/branch/abc123", gateway.addr());
    for _ in 0..5 {
        let reply = support::send(&client, Method::GET, &branch, &auth, String::new()).await;
        assert!(reply.status.is_server_error());
    }
    let open = support::send(&client, Method::GET, &branch, &auth, String::new()).await;
    assert_eq!(open.gateway_code(), "diia_circuit_open");
    let identify = format!(
        "http://{}/api/v1/acquirers/document-identification",
        gateway.addr()
    );
    let reply = support::send(
        &client,
        Method::POST,
        &identify,
        &auth,
        r#"{"branchId":"b","barcode":"3389798072091"}"#.to_owned(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
}
