//! Every validation rule answers with a documented JSON error and costs Diia nothing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::support;

use http::{Method, StatusCode};
use support::{Harness, Reply};

const IDENT: &str = "/api/v1/acquirers/document-identification";
const SHARE: &str = "/api/v1/acquirers/document-request";
const BEARER: &str = "Bearer some.session.token";

fn assert_error(reply: &Reply, status: StatusCode, code: &str) {
    assert_eq!(
        reply.status,
        status,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    let json = reply.json();
    assert_eq!(json["gatewayCode"], code);
    assert_eq!(json["code"], status.as_u16());
    assert!(json["name"].is_string() && json["message"].is_string());
    assert_eq!(
        reply.header("content-type"),
        Some("application/json; charset=utf-8")
    );
}

async fn post(h: &Harness, path: &str, body: &str) -> Reply {
    h.send(
        Method::POST,
        path,
        &[
            ("authorization", BEARER),
            ("content-type", "application/json"),
        ],
        body,
    )
    .await
}

#[tokio::test]
async fn each_rule_rejects_without_calling_diia() {
    let h = Harness::start().await;
    let valid = r#"{"branchId":"b1","barcode":"3389798072091"}"#;

    assert_error(
        &h.send(Method::GET, "/", &[], "").await,
        StatusCode::NOT_FOUND,
        "unknown_route",
    );
    assert_error(
        &h.send(
            Method::GET,
            "/api/v3/acquirers/branches",
            &[("authorization", BEARER)],
            "",
        )
        .await,
        StatusCode::NOT_FOUND,
        "unknown_route",
    );
    let wrong_method = h
        .send(Method::GET, IDENT, &[("authorization", BEARER)], "")
        .await;
    assert_error(
        &wrong_method,
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
    );
    assert!(wrong_method.header("allow").is_some());

    assert_error(
        &h.send(Method::POST, IDENT, &[], valid).await,
        StatusCode::UNAUTHORIZED,
        "missing_authorization",
    );
    assert_error(
        &h.send(
            Method::POST,
            IDENT,
            &[("authorization", "Basic abc")],
            valid,
        )
        .await,
        StatusCode::UNAUTHORIZED,
        "invalid_authorization",
    );
    assert_error(
        &post(&h, IDENT, "{not json").await,
        StatusCode::BAD_REQUEST,
        "invalid_json",
    );
    assert_error(
        &post(&h, IDENT, "[1,2]").await,
        StatusCode::BAD_REQUEST,
        "invalid_json",
    );
    assert_error(
        &post(&h, IDENT, "").await,
        StatusCode::BAD_REQUEST,
        "invalid_json",
    );
    assert_error(
        &post(&h, IDENT, r#"{"barcode":"3389798072091"}"#).await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "missing_field",
    );
    assert_error(
        &post(&h, IDENT, r#"{"branchId":"b1"}"#).await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "missing_field",
    );
    for barcode in [
        "3389798072090",
        "0000000000000",
        "338979807209",
        "33897980720911",
        "33897980720a1",
        "",
        " 3389798072091",
    ] {
        let reply = post(
            &h,
            IDENT,
            &format!(r#"{{"branchId":"b1","barcode":"{barcode}"}}"#),
        )
        .await;
        let code = if barcode.is_empty() {
            "missing_field"
        } else {
            "invalid_barcode"
        };
        assert_error(&reply, StatusCode::UNPROCESSABLE_ENTITY, code);
    }
    assert_error(
        &post(&h, IDENT, r#"{"branchId":"b1","barcode":3389798072091}"#).await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_field",
    );
    assert_error(
        &post(&h, SHARE, r#"{"branchId":"b1","barcode":"3389798072091"}"#).await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "missing_field",
    );
    assert_error(
        &post(&h, SHARE, r#"{"branchId":"b1","requestId":"r1"}"#).await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "missing_field",
    );
    assert_error(
        &h.send(
            Method::GET,
            "/api/v1/acquirers/document-request/status?barcode=3389798072090&requestId=r1",
            &[("authorization", BEARER)],
            "",
        )
        .await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_query",
    );
    assert_error(
        &post(
            &h,
            "/api/v2/acquirers/branch/b1/offer-request/dynamic",
            r#"{"requestId":"r1"}"#,
        )
        .await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "missing_field",
    );
    assert_error(
        &post(&h, "/api/v2/acquirers/branch", "{oops").await,
        StatusCode::BAD_REQUEST,
        "invalid_json",
    );

    assert_eq!(h.sim_total().await, 0, "no rejected request may reach Diia");
}

#[tokio::test]
async fn body_too_large_is_413_without_calling_diia() {
    let h = Harness::with(|_| {}, |c| c.server.body_limit = 1024).await;
    let padding = "x".repeat(2048);
    let big = format!(r#"{{"branchId":"b1","barcode":"3389798072091","pad":"{padding}"}}"#);
    assert_error(
        &post(&h, IDENT, &big).await,
        StatusCode::PAYLOAD_TOO_LARGE,
        "body_too_large",
    );
    assert_eq!(h.sim_total().await, 0);
}

#[tokio::test]
async fn chunked_body_over_the_limit_is_413() {
    use bytes::Bytes;
    use http_body_util::StreamBody;
    use hyper::body::Frame;
    let h = Harness::with(|_| {}, |c| c.server.body_limit = 1024).await;
    let chunks: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = (0..8)
        .map(|_| Ok(Frame::data(Bytes::from(vec![b' '; 512]))))
        .collect();
    let body = StreamBody::new(futures_util::stream::iter(chunks));
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http();
    let request = http::Request::post(h.url(IDENT))
        .header("authorization", BEARER)
        .body(body)
        .unwrap();
    let response = tokio::time::timeout(support::REQUEST_BOUND, client.request(request))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(h.sim_total().await, 0);
}
