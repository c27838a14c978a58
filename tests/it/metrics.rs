//! SREs see what the gateway does: counters move, health endpoints answer.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::support;

use http::{Method, StatusCode};
use support::Harness;

#[tokio::test]
async fn counters_move_with_traffic() {
    let h = Harness::start().await;
    let token = h.session_token().await;
    let barcode = h.issue_barcode().await;
    h.identify(&token, "b", &barcode).await;
    h.identify(&token, "b", &barcode).await;
    h.identify(&token, "b", "3389798072090").await;

    let text = h.metrics().await;
    let value = |name: &str| support::metric_value(&text, name);
    assert_eq!(
        value(r#"diia_gateway_requests_total{endpoint="document_identification",outcome="miss"}"#),
        1.0
    );
    assert_eq!(
        value(r#"diia_gateway_requests_total{endpoint="document_identification",outcome="hit"}"#),
        1.0
    );
    assert_eq!(
        value(
            r#"diia_gateway_requests_total{endpoint="document_identification",outcome="rejected"}"#
        ),
        1.0
    );
    assert_eq!(
        value(r#"diia_gateway_requests_total{endpoint="token_exchange",outcome="miss"}"#),
        1.0
    );
    assert_eq!(
        value(
            r#"diia_gateway_errors_total{endpoint="document_identification",code="invalid_barcode"}"#
        ),
        1.0
    );
    assert_eq!(value("diia_gateway_diia_calls_saved_total"), 1.0);
    assert_eq!(
        value(
            r#"diia_gateway_upstream_calls_total{endpoint="document_identification",result="ok"}"#
        ),
        1.0
    );
    assert_eq!(
        value(r#"diia_gateway_upstream_latency_seconds_count{endpoint="document_identification"}"#),
        1.0
    );
    assert!(value(r#"diia_gateway_cache_entries{cache="answers"}"#) >= 1.0);
}

#[tokio::test]
async fn health_and_readiness() {
    let h = Harness::start().await;
    let client = support::client();
    for path in ["/healthz", "/readyz"] {
        let url = format!("http://{}{path}", h.gateway.admin_addr());
        let reply = support::send(&client, Method::GET, &url, &[], String::new()).await;
        assert_eq!(reply.status, StatusCode::OK, "{path}");
    }
    // The admin surface is not reachable through the branch-facing port.
    assert_eq!(
        h.send(Method::GET, "/metrics", &[], "").await.status,
        StatusCode::NOT_FOUND
    );
}
