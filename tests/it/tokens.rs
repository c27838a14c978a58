//! The session-token exchange is shared by every branch of an acquirer.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::support;

use std::sync::Arc;

use http::{Method, StatusCode};
use serde_json::json;
use support::{Harness, OTHER_ACQUIRER_TOKEN, OTHER_AUTH_TOKEN};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_branches_logging_in_cost_one_exchange() {
    let h = Arc::new(Harness::start().await);
    h.set_faults(json!({"latency": "100ms"})).await;
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let h = Arc::clone(&h);
            tokio::spawn(async move { h.session_token().await })
        })
        .collect();
    let mut tokens = Vec::new();
    for task in tasks {
        tokens.push(task.await.expect("task"));
    }
    for _ in 0..10 {
        tokens.push(h.session_token().await);
    }
    assert!(
        tokens.windows(2).all(|w| w[0] == w[1]),
        "every branch got the same token"
    );
    assert_eq!(h.sim_calls("token_exchange").await, 1);
    // And the shared token works.
    let barcode = h.issue_barcode().await;
    assert_eq!(
        h.identify(&tokens[0], "b", &barcode).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn credentials_are_part_of_the_key() {
    let h = Harness::start().await;
    let good = h.session_token().await;
    let path = format!("/api/v1/auth/acquirer/{}", diia_sim::DEMO_ACQUIRER_TOKEN);
    // Wrong Basic credentials for a token someone else already exchanged: no cached token.
    for _ in 0..2 {
        let wrong = h
            .send(
                Method::GET,
                &path,
                &[("authorization", "Basic d3Jvbmc6d3Jvbmc=")],
                "",
            )
            .await;
        assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
    }
    let missing = h.send(Method::GET, &path, &[], "").await;
    assert_eq!(missing.status, StatusCode::UNAUTHORIZED);
    // Failures are not cached; the same wrong credentials are refused by the gateway
    // once Diia refused them (`credentials_refused`), other ones still reach Diia.
    assert_eq!(h.sim_calls("token_exchange").await, 3);
    // Each acquirer gets its own token.
    let other = h
        .session_token_for(OTHER_ACQUIRER_TOKEN, OTHER_AUTH_TOKEN)
        .await;
    assert_ne!(other, good);
    assert_eq!(h.session_token().await, good);
    assert_eq!(h.sim_calls("token_exchange").await, 4);
}

#[tokio::test]
async fn a_token_is_dropped_before_it_expires() {
    // Simulated tokens live 4s (JWT exp in whole seconds); with a 2.5s margin the gateway
    // keeps them between 0.5s and 1.5s.
    let h = Harness::with(
        |s| s.session_ttl = std::time::Duration::from_secs(4),
        |c| c.tokens.refresh_margin = std::time::Duration::from_millis(2500),
    )
    .await;
    let first = h.session_token().await;
    assert_eq!(h.session_token().await, first);
    tokio::time::sleep(std::time::Duration::from_millis(1600)).await;
    let refreshed = h.session_token().await;
    assert_ne!(refreshed, first, "refreshed before Diia's expiry");
    assert_eq!(h.sim_calls("token_exchange").await, 2);
}

/// Diia revoked its sessions: the first call with the cached token gets Diia's 401, and
/// the next login reaches Diia (once, for everyone) instead of handing out the dead token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_diia_refuses_is_dropped_from_the_cache() {
    let h = Arc::new(Harness::start().await);
    let dead = h.session_token().await;
    let client = support::client();
    let revoke = format!("{}/sim/sessions/revoke", h.sim.base_url());
    support::send(&client, Method::POST, &revoke, &[], String::new()).await;
    let barcode = h.issue_barcode().await;
    let refused = h.identify(&dead, "b", &barcode).await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED);

    let logins: Vec<_> = (0..10)
        .map(|_| {
            let h = Arc::clone(&h);
            tokio::spawn(async move { h.session_token().await })
        })
        .collect();
    let mut fresh = Vec::new();
    for login in logins {
        fresh.push(login.await.unwrap());
    }
    assert!(
        fresh.iter().all(|token| *token != dead),
        "no dead token handed out"
    );
    assert!(fresh.windows(2).all(|w| w[0] == w[1]));
    assert_eq!(
        h.sim_calls("token_exchange").await,
        2,
        "one new login for all"
    );
    assert_eq!(
        h.identify(&fresh[0], "b", &barcode).await.status,
        StatusCode::OK
    );
}
