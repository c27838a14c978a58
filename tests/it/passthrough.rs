//! Branches, offers and deep links are forwarded unchanged (drop-in upstream).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::support;

use http::{Method, StatusCode};
use support::Harness;

#[tokio::test]
async fn branch_and_offer_lifecycle_through_the_gateway() {
    let h = Harness::start().await;
    let token = h.session_token().await;
    let bearer = format!("Bearer {token}");
    let auth = [
        ("authorization", bearer.as_str()),
        ("content-type", "application/json"),
    ];

    let created = h
        .send(
            Method::POST,
            "/api/v2/acquirers/branch",
            &auth,
            r#"{"name":"Kyiv 1","scopes":{"sharing":["passport"]}}"#,
        )
        .await;
    assert_eq!(created.status, StatusCode::OK, "{:?}", created.body);
    let branch_id = created.json()["_id"].as_str().expect("_id").to_owned();
    assert!(created.header("diia-trace-id").is_some());

    let fetched = h
        .send(
            Method::GET,
            &format!("/api/v2/acquirers/branch/{branch_id}"),
            &auth,
            "",
        )
        .await;
    assert_eq!(fetched.json()["name"], "Kyiv 1");
    let list = h
        .send(
            Method::GET,
            "/api/v2/acquirers/branches?skip=0&limit=10",
            &auth,
            "",
        )
        .await;
    assert_eq!(list.json()["total"], 1);

    let offer = h
        .send(
            Method::POST,
            &format!("/api/v1/acquirers/branch/{branch_id}/offer"),
            &auth,
            r#"{"name":"Parcel","scopes":{"sharing":["passport"]}}"#,
        )
        .await;
    let offer_id = offer.json()["_id"].as_str().expect("_id").to_owned();
    let offers = h
        .send(
            Method::GET,
            &format!("/api/v1/acquirers/branch/{branch_id}/offers"),
            &auth,
            "",
        )
        .await;
    assert_eq!(offers.json()["total"], 1);

    let link = h
        .send(
            Method::POST,
            &format!("/api/v2/acquirers/branch/{branch_id}/offer-request/dynamic"),
            &auth,
            &format!(r#"{{"offerId":"{offer_id}","requestId":"r-1"}}"#),
        )
        .await;
    assert!(
        link.json()["deeplink"]
            .as_str()
            .expect("deeplink")
            .starts_with("https://diia.app/")
    );

    let deleted = h
        .send(
            Method::DELETE,
            &format!("/api/v1/acquirers/branch/{branch_id}/offer/{offer_id}"),
            &auth,
            "",
        )
        .await;
    assert_eq!(deleted.status, StatusCode::OK);
    let gone = h
        .send(
            Method::DELETE,
            &format!("/api/v2/acquirers/branch/{branch_id}"),
            &auth,
            "",
        )
        .await;
    assert_eq!(gone.status, StatusCode::NO_CONTENT);
    let missing = h
        .send(
            Method::GET,
            &format!("/api/v2/acquirers/branch/{branch_id}"),
            &auth,
            "",
        )
        .await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    assert_eq!(
        missing.json()["name"],
        "NotFoundError",
        "Diia's own error body is passed on"
    );
}

#[tokio::test]
async fn diia_401_is_passed_on_unchanged() {
    let h = Harness::start().await;
    let reply = h
        .send(
            Method::GET,
            "/api/v2/acquirers/branches",
            &[("authorization", "Bearer expired.token.x")],
            "",
        )
        .await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert_eq!(reply.json()["message"], "Not authorized");
    assert_eq!(h.sim_calls("branches").await, 1);
}

#[tokio::test]
async fn diia_trace_id_is_forwarded_both_ways() {
    let h = Harness::start().await;
    let token = h.session_token().await;
    let barcode = h.issue_barcode().await;
    let bearer = format!("Bearer {token}");
    let trace = "0f8fad5b-d9cb-469f-a165-70867728950e";
    let reply = h
        .send(
            Method::POST,
            "/api/v1/acquirers/document-identification",
            &[
                ("authorization", &bearer),
                ("content-type", "application/json"),
                ("diia-trace-id", trace),
            ],
            &format!(r#"{{"branchId":"b","barcode":"{barcode}"}}"#),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    // The simulator echoes the trace id it received: it reached Diia and came back.
    assert_eq!(reply.header("diia-trace-id"), Some(trace));
}
