//! Managed token mode: the gateway holds the acquirer token, branches use API keys.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::support;

use std::sync::Arc;

use diia_gateway::config::{ApiKeyConfig, AuthMode};
use diia_sim::{DEMO_ACQUIRER_TOKEN, DEMO_AUTH_TOKEN};
use http::{Method, StatusCode};
use sha2::{Digest, Sha256};
use support::Harness;

const KEY: &str = "kyiv-001-api-key-6f1c2e";

async fn managed() -> Harness {
    Harness::with(
        |_| {},
        |c| {
            c.auth.mode = AuthMode::Managed;
            c.auth.acquirer_token = Some(DEMO_ACQUIRER_TOKEN.to_owned());
            c.auth.auth_token = Some(DEMO_AUTH_TOKEN.to_owned());
            c.auth.api_keys = vec![ApiKeyConfig {
                branch: "kyiv-001".to_owned(),
                sha256: hex::encode(Sha256::digest(KEY.as_bytes())),
            }];
        },
    )
    .await
}

async fn identify(h: &Harness, key: Option<&str>, barcode: &str) -> support::Reply {
    let mut headers = vec![("content-type", "application/json")];
    if let Some(key) = key {
        headers.push(("x-api-key", key));
    }
    h.send(
        Method::POST,
        "/api/v1/acquirers/document-identification",
        &headers,
        &format!(r#"{{"branchId":"kyiv-001","barcode":"{barcode}"}}"#),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn branches_with_an_api_key_are_served_with_one_shared_session() {
    let h = Arc::new(managed().await);
    let mut barcodes = Vec::new();
    for _ in 0..20 {
        barcodes.push(h.issue_barcode().await);
    }
    let tasks: Vec<_> = barcodes
        .into_iter()
        .map(|barcode| {
            let h = Arc::clone(&h);
            tokio::spawn(async move { identify(&h, Some(KEY), &barcode).await.status })
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.unwrap(), StatusCode::OK);
    }
    assert_eq!(
        h.sim_calls("token_exchange").await,
        1,
        "one exchange, single flight"
    );
    assert_eq!(h.sim_calls("document_identification").await, 20);
}

#[tokio::test]
async fn missing_or_wrong_api_key_is_401_without_calling_diia() {
    let h = managed().await;
    let barcode = h.issue_barcode().await;
    for key in [None, Some("wrong-key"), Some("")] {
        let reply = identify(&h, key, &barcode).await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
        assert_eq!(reply.gateway_code(), "invalid_api_key");
    }
    // Branches never see or exchange acquirer tokens in managed mode.
    let exchange = h
        .send(
            Method::GET,
            &format!("/api/v1/auth/acquirer/{DEMO_ACQUIRER_TOKEN}"),
            &[],
            "",
        )
        .await;
    assert_eq!(exchange.status, StatusCode::NOT_FOUND);
    assert_eq!(h.sim_total().await, 0);
}

#[tokio::test]
async fn a_revoked_session_is_refreshed_and_the_call_retried_once() {
    let h = managed().await;
    let first = h.issue_barcode().await;
    assert_eq!(identify(&h, Some(KEY), &first).await.status, StatusCode::OK);
    let client = support::client();
    let revoke = format!("{}/sim/sessions/revoke", h.sim.base_url());
    support::send(&client, Method::POST, &revoke, &[], String::new()).await;

    let second = h.issue_barcode().await;
    let reply = identify(&h, Some(KEY), &second).await;
    assert_eq!(reply.status, StatusCode::OK, "401 → fresh token → retried");
    assert_eq!(h.sim_calls("token_exchange").await, 2);
    assert_eq!(
        h.sim_calls("document_identification").await,
        3,
        "first call, refused call, retry"
    );
}
