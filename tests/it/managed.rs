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
const LVIV_KEY: &str = "lviv-002-api-key-0b7d11";
const BACK_OFFICE_KEY: &str = "back-office-key-93ac5e";

fn key(branch: &str, key: &str, acquirer_wide: bool) -> ApiKeyConfig {
    ApiKeyConfig {
        branch: branch.to_owned(),
        sha256: hex::encode(Sha256::digest(key.as_bytes())),
        acquirer_wide,
    }
}

async fn managed() -> Harness {
    Harness::with(
        |_| {},
        |c| {
            c.auth.mode = AuthMode::Managed;
            c.auth.acquirer_token = Some(DEMO_ACQUIRER_TOKEN.to_owned());
            c.auth.auth_token = Some(DEMO_AUTH_TOKEN.to_owned());
            c.auth.api_keys = vec![
                key("kyiv-001", KEY, false),
                key("lviv-002", LVIV_KEY, false),
                key("back-office", BACK_OFFICE_KEY, true),
            ];
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

/// A per-branch key acts only as its own branch: another branch's id is 403 (so another
/// branch's cached answer is out of reach), and acquirer-wide calls need an
/// acquirer-wide key. Nothing refused reaches Diia.
#[tokio::test]
async fn a_branch_key_acts_only_as_its_own_branch() {
    let h = managed().await;
    let barcode = h.issue_barcode().await;
    let body = |branch: &str| format!(r#"{{"branchId":"{branch}","barcode":"{barcode}"}}"#);
    let as_key = |key: &'static str| [("x-api-key", key), ("content-type", "application/json")];
    let ident = "/api/v1/acquirers/document-identification";
    let lviv = h
        .send(Method::POST, ident, &as_key(LVIV_KEY), &body("lviv-002"))
        .await;
    assert_eq!(lviv.status, StatusCode::OK);
    let stolen = h
        .send(Method::POST, ident, &as_key(KEY), &body("lviv-002"))
        .await;
    assert_eq!(stolen.status, StatusCode::FORBIDDEN);
    assert_eq!(stolen.gateway_code(), "branch_mismatch");

    let create = h
        .send(
            Method::POST,
            "/api/v2/acquirers/branch",
            &as_key(KEY),
            r#"{"name":"rogue"}"#,
        )
        .await;
    assert_eq!(create.status, StatusCode::FORBIDDEN);
    assert_eq!(create.gateway_code(), "acquirer_key_required");
    let list = h
        .send(Method::GET, "/api/v2/acquirers/branches", &as_key(KEY), "")
        .await;
    assert_eq!(list.gateway_code(), "acquirer_key_required");
    let other_branch = h
        .send(
            Method::GET,
            "/api/v2/acquirers/branch/lviv-002",
            &as_key(KEY),
            "",
        )
        .await;
    assert_eq!(other_branch.gateway_code(), "branch_mismatch");
    assert_eq!(h.sim_calls("branches").await, 0);
    assert_eq!(h.sim_calls("document_identification").await, 1);

    let back_office = h
        .send(
            Method::POST,
            "/api/v2/acquirers/branch",
            &as_key(BACK_OFFICE_KEY),
            r#"{"name":"Kyiv 2"}"#,
        )
        .await;
    assert_eq!(back_office.status, StatusCode::OK, "{:?}", back_office.body);
}
