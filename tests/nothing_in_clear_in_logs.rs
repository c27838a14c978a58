//! Logs of a full run over every endpoint never show a barcode, token or name in clear.
//!
//! Its own test binary: it installs the process-wide tracing subscriber at TRACE for
//! every crate (ours, hyper, rustls, moka), the most a misconfigured SRE could turn on.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use diia_gateway_testkit as support;

use std::io::Write;
use std::sync::{Arc, Mutex};

use http::Method;
use support::Harness;

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_or_personal_value_reaches_the_logs() {
    let capture = Capture::default();
    let writer = capture.clone();
    tracing_subscriber::fmt()
        .json()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .init();

    let h = Harness::start().await;
    let token = h.session_token().await;
    let bearer = format!("Bearer {token}");
    let barcode = h.issue_barcode().await;
    let shared = h.issue_barcode().await;
    let name = "Шевченко";
    let request_id = "9b2f7a4e-secret-request";

    h.identify(&token, "branch-7", &barcode).await;
    h.identify(&token, "branch-7", &barcode).await;
    h.post(
        "/api/v1/acquirers/document-identification/age",
        &token,
        &format!(r#"{{"branchId":"branch-7","barcode":"{barcode}","lastName":"{name}","age":18}}"#),
    )
    .await;
    h.share(&token, "branch-7", &shared, request_id).await;
    h.share(&token, "branch-7", &shared, "another-request")
        .await;
    h.send(
        Method::GET,
        &format!(
            "/api/v1/acquirers/document-request/status?barcode={shared}&requestId={request_id}"
        ),
        &[("authorization", &bearer)],
        "",
    )
    .await;
    h.post(
        "/api/v2/acquirers/branch",
        &token,
        &format!(r#"{{"name":"{name}"}}"#),
    )
    .await;
    // Rejections carry the bad values too.
    h.identify(&token, "branch-7", "3389798072090").await;
    h.identify("forged-bearer-token-xyz", "branch-7", &barcode)
        .await;
    h.send(
        Method::POST,
        "/api/v1/acquirers/document-identification",
        &[("authorization", "Basic c2VjcmV0")],
        "{}",
    )
    .await;

    // Managed mode: the gateway holds the acquirer secrets, branches send API keys.
    let api_key = "branch-api-key-7d2f9c1b";
    let managed = Harness::with(
        |_| {},
        |c| {
            c.auth.mode = diia_gateway::config::AuthMode::Managed;
            c.auth.acquirer_token = Some(diia_sim::DEMO_ACQUIRER_TOKEN.to_owned());
            c.auth.auth_token = Some(diia_sim::DEMO_AUTH_TOKEN.to_owned());
            c.auth.api_keys = vec![diia_gateway::config::ApiKeyConfig {
                branch: "kyiv-001".to_owned(),
                sha256: hex::encode(<sha2::Sha256 as sha2::Digest>::digest(api_key.as_bytes())),
                acquirer_wide: false,
            }];
        },
    )
    .await;
    let managed_barcode = managed.issue_barcode().await;
    let body = format!(r#"{{"branchId":"kyiv-001","barcode":"{managed_barcode}"}}"#);
    for key in [api_key, "wrong-api-key-3e8a"] {
        managed
            .send(
                Method::POST,
                "/api/v1/acquirers/document-identification",
                &[("x-api-key", key)],
                &body,
            )
            .await;
    }

    let logs = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    assert!(
        logs.contains("diia_gateway::access"),
        "the access log was captured"
    );
    assert!(
        logs.contains("\"barcode\""),
        "fingerprints stand in for barcodes"
    );
    assert!(
        logs.contains("\"level\":\"TRACE\""),
        "TRACE events from every crate were captured"
    );
    for secret in [
        barcode.as_str(),
        shared.as_str(),
        "3389798072090",
        token.as_str(),
        diia_sim::DEMO_ACQUIRER_TOKEN,
        diia_sim::DEMO_AUTH_TOKEN,
        "forged-bearer-token-xyz",
        "c2VjcmV0",
        request_id,
        name,
        api_key,
        "wrong-api-key-3e8a",
        managed_barcode.as_str(),
    ] {
        assert!(!logs.contains(secret), "a secret value appears in the logs");
    }
    // The session token's pieces (JWT segments) must not appear either.
    for segment in token.split('.') {
        assert!(
            !logs.contains(segment),
            "a token segment appears in the logs"
        );
    }
}
