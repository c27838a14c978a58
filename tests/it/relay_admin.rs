//! The relay's admin surface over real sockets: records listed by state (metadata only,
//! never a requestId or payload), paged, redelivered, purged and erased by requestId; bad
//! input refused with 400 JSON; `404 relay_off` while the relay is off; and the relay's
//! queue, age, delivery and store-error metrics on `/metrics`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::relay_flow::{push_consent, scripted_backend, target_at, wait_for_state};
use crate::relay_ingress::{
    Acquirer, REQUEST_ID, callback, ingress_path, package_of, records, start, start_with,
    valid_package,
};
use crate::support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use diia_gateway::relay::{CallbackStore, Route, State};
use http::{Method, StatusCode};
use support::{Harness, Reply};

const OTHER_REQUEST_ID: &str = "9c4d2e1f-7a6b-4c3d-8e2f-0a1b2c3d4e5f";
const THIRD_REQUEST_ID: &str = "1a2b3c4d-5e6f-4a7b-8c9d-0e1f2a3b4c5d";

async fn admin(h: &Harness, method: Method, path_and_query: &str, body: &str) -> Reply {
    let url = format!("http://{}{path_and_query}", h.gateway.admin_addr());
    let headers: &[(&str, &str)] = if body.is_empty() {
        &[]
    } else {
        &[("content-type", "application/json")]
    };
    support::send(&support::client(), method, &url, headers, body.to_owned()).await
}

fn assert_admin_error(reply: &Reply, status: StatusCode, code: &str) {
    assert_eq!(
        reply.status,
        status,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    assert_eq!(reply.header("content-type"), Some("application/json"));
    assert_eq!(reply.json()["error"], code);
}

async fn ingest(h: &Harness, acquirer: &Acquirer, request_id: &str, fill: u8) {
    let body = valid_package(acquirer, fill);
    let reply = callback(h, &ingress_path(), Some(request_id), body).await;
    assert_eq!(reply.status, StatusCode::OK);
}

/// Waits (bounded: a few stats refreshes) until `metric` reads `want`.
async fn wait_for_metric(h: &Harness, metric: &str, want: f64) {
    let started = Instant::now();
    loop {
        let value = h.metric(metric).await;
        if (value - want).abs() < 1e-9 {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{metric} is {value}, not {want}, after 20 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn records_are_listed_by_state_without_request_id_or_payload_then_purged_and_erased() {
    let acquirer = Acquirer::new();
    let h = start(&acquirer, 0).await;
    ingest(&h, &acquirer, REQUEST_ID, 1).await;
    ingest(&h, &acquirer, OTHER_REQUEST_ID, 2).await;

    let listed = admin(&h, Method::GET, "/relay/records?state=orphan", "").await;
    assert_eq!(listed.status, StatusCode::OK);
    assert_eq!(listed.header("content-type"), Some("application/json"));
    let text = String::from_utf8_lossy(&listed.body).into_owned();
    assert!(!text.contains(REQUEST_ID) && !text.contains(OTHER_REQUEST_ID));
    assert!(!text.contains("encryptedFile") && !text.contains("multipart"));
    let json = listed.json();
    assert_eq!(json["next"], serde_json::Value::Null);
    let list = json["records"].as_array().unwrap();
    assert_eq!(list.len(), 2);
    let mut fields: Vec<&str> = list[0]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    fields.sort_unstable();
    assert_eq!(
        fields,
        [
            "acquirer",
            "attempts",
            "conflicts",
            "due_ms",
            "duplicates",
            "id",
            "key_id",
            "received_ms",
            "size",
            "state",
            "updated_ms"
        ]
    );
    assert_eq!(list[0]["state"], "orphan");
    assert_eq!(list[0]["acquirer"], "acquirer-1");
    assert_eq!(list[0]["key_id"], "k1");
    assert!(list[0]["size"].as_u64().unwrap() > 8 * 1024);
    let (first, second) = (
        list[0]["id"].as_str().unwrap().to_owned(),
        list[1]["id"].as_str().unwrap().to_owned(),
    );

    // Paging: one a page, `next` names the last id given.
    let page = admin(&h, Method::GET, "/relay/records?state=orphan&limit=1", "").await;
    assert_eq!(page.json()["records"][0]["id"], first.as_str());
    assert_eq!(page.json()["next"], first.as_str());
    let page = admin(
        &h,
        Method::GET,
        &format!("/relay/records?state=orphan&limit=1&after={first}"),
        "",
    )
    .await;
    assert_eq!(page.json()["records"][0]["id"], second.as_str());
    let empty = admin(&h, Method::GET, "/relay/records?state=pending", "").await;
    assert_eq!(
        empty.json(),
        serde_json::json!({"records": [], "next": null})
    );

    // An orphan is not dead: 409; an unknown id: 404.
    let not_dead = admin(
        &h,
        Method::POST,
        &format!("/relay/records/{first}/redeliver"),
        "",
    )
    .await;
    assert_admin_error(&not_dead, StatusCode::CONFLICT, "not_dead");
    let unknown = "0".repeat(32);
    let missing = admin(
        &h,
        Method::POST,
        &format!("/relay/records/{unknown}/redeliver"),
        "",
    )
    .await;
    assert_admin_error(&missing, StatusCode::NOT_FOUND, "record_not_found");

    // Purge one by id; a second purge finds nothing.
    let purged = admin(&h, Method::DELETE, &format!("/relay/records/{first}"), "").await;
    assert_eq!(purged.status, StatusCode::OK);
    assert_eq!(purged.json(), serde_json::json!({"purged": first}));
    let again = admin(&h, Method::DELETE, &format!("/relay/records/{first}"), "").await;
    assert_admin_error(&again, StatusCode::NOT_FOUND, "record_not_found");
    assert_eq!(records(&h).await[usize::from(State::Orphan.code())], 1);

    // Erase by requestId: another acquirer's name erases nothing, the right one (or none) all.
    let body = serde_json::json!({"requestId": REQUEST_ID, "acquirer": "acquirer-9"}).to_string();
    let none = admin(&h, Method::POST, "/relay/erase", &body).await;
    assert_eq!(none.json(), serde_json::json!({"erased": 0}));
    let erase_rest = |id: &str| serde_json::json!({"requestId": id}).to_string();
    // Which of the two was purged by id is random (ids are): erasing both requestIds
    // erases the one left.
    let mut erased = 0;
    for id in [REQUEST_ID, OTHER_REQUEST_ID] {
        let reply = admin(&h, Method::POST, "/relay/erase", &erase_rest(id)).await;
        erased += reply.json()["erased"].as_u64().unwrap();
    }
    assert_eq!(erased, 1);
    assert_eq!(records(&h).await, [0; 5]);
    let erased = admin(&h, Method::POST, "/relay/erase", &erase_rest(REQUEST_ID)).await;
    assert_eq!(erased.json(), serde_json::json!({"erased": 0}));
}

#[tokio::test]
async fn a_dead_letter_is_redelivered_by_admin_and_then_delivered() {
    let acquirer = Acquirer::new();
    // The branch backend first answers 410 (dead at once), later 200.
    let status = Arc::new(AtomicU16::new(410));
    let (addr, received) = scripted_backend(Arc::clone(&status)).await;
    let target = target_at(&acquirer, addr);
    let h = start_with(&acquirer, |relay| relay.target = vec![target]).await;
    let token = h.session_token().await;
    push_consent(&h, &token, REQUEST_ID).await;
    ingest(&h, &acquirer, REQUEST_ID, 1).await;
    wait_for_state(&h, State::Dead, 1).await;
    let dead = admin(&h, Method::GET, "/relay/records?state=dead", "").await;
    let id = dead.json()["records"][0]["id"].as_str().unwrap().to_owned();
    assert_eq!(dead.json()["records"][0]["attempts"], 1);

    status.store(200, Ordering::SeqCst);
    let redelivered = admin(
        &h,
        Method::POST,
        &format!("/relay/records/{id}/redeliver"),
        "",
    )
    .await;
    assert_eq!(redelivered.status, StatusCode::OK);
    assert_eq!(redelivered.json(), serde_json::json!({"redelivered": id}));
    wait_for_state(&h, State::Delivered, 1).await;
    let received = received.lock().unwrap().clone();
    assert_eq!(received.len(), 2, "the 410 attempt, then the redelivery");
    assert_eq!(received[0].0["webhook-id"], received[1].0["webhook-id"]);
    let twice = admin(
        &h,
        Method::POST,
        &format!("/relay/records/{id}/redeliver"),
        "",
    )
    .await;
    assert_admin_error(&twice, StatusCode::CONFLICT, "not_dead");
}

#[tokio::test]
async fn bad_admin_input_is_400_json_and_changes_nothing() {
    let acquirer = Acquirer::new();
    let h = start(&acquirer, 0).await;
    ingest(&h, &acquirer, REQUEST_ID, 1).await;
    let before = records(&h).await;
    for (query, code) in [
        ("/relay/records", "bad_state"),
        ("/relay/records?state=lost", "bad_state"),
        ("/relay/records?state=dead&limit=0", "bad_limit"),
        ("/relay/records?state=dead&limit=1001", "bad_limit"),
        ("/relay/records?state=dead&limit=ten", "bad_limit"),
        ("/relay/records?state=dead&after=00ff", "bad_after"),
        ("/relay/records?state=dead&payload=1", "bad_query"),
        ("/relay/records?state=dead&state=orphan", "bad_query"),
    ] {
        let reply = admin(&h, Method::GET, query, "").await;
        assert_admin_error(&reply, StatusCode::BAD_REQUEST, code);
    }
    for (method, path) in [
        (Method::DELETE, "/relay/records/not-an-id"),
        (
            Method::DELETE,
            "/relay/records/0123456789abcdef0123456789abcdeZ",
        ),
        (Method::POST, "/relay/records/0123/redeliver"),
    ] {
        let reply = admin(&h, method, path, "").await;
        assert_admin_error(&reply, StatusCode::BAD_REQUEST, "bad_id");
    }
    let long = "x".repeat(300);
    for body in [
        String::new(),
        "not json".to_owned(),
        r#"{"acquirer":"acquirer-1"}"#.to_owned(),
        r#"{"requestId":""}"#.to_owned(),
        r#"{"requestId":42}"#.to_owned(),
        format!(r#"{{"requestId":"{long}"}}"#),
        format!(r#"{{"requestId":"{REQUEST_ID}","acquirer":""}}"#),
        format!(r#"{{"requestId":"{REQUEST_ID}","everything":true}}"#),
        format!(r#"{{"requestId":"{}"}}"#, "y".repeat(5000)),
    ] {
        let reply = admin(&h, Method::POST, "/relay/erase", &body).await;
        assert_admin_error(&reply, StatusCode::BAD_REQUEST, "bad_body");
    }
    let wrong_method = admin(&h, Method::GET, "/relay/erase", "").await;
    assert_admin_error(
        &wrong_method,
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
    );
    let nowhere = admin(&h, Method::GET, "/relay/everything", "").await;
    assert_admin_error(&nowhere, StatusCode::NOT_FOUND, "not_found");
    assert_eq!(records(&h).await, before, "nothing changed");
}

#[tokio::test]
async fn relay_endpoints_are_404_json_when_the_relay_is_off() {
    let h = Harness::start().await;
    for (method, path) in [
        (Method::GET, "/relay/records?state=dead"),
        (Method::POST, "/relay/erase"),
        (
            Method::DELETE,
            "/relay/records/00112233445566778899aabbccddeeff",
        ),
    ] {
        let reply = admin(&h, method, path, "").await;
        assert_admin_error(&reply, StatusCode::NOT_FOUND, "relay_off");
    }
    // The rest of the admin listener is unchanged.
    let health = admin(&h, Method::GET, "/healthz", "").await;
    assert_eq!(health.status, StatusCode::OK);
    let metrics = h.metrics().await;
    assert!(!metrics.contains("diia_gateway_relay_records"));
}

#[tokio::test]
async fn queue_depth_age_delivery_attempts_and_store_errors_are_exported() {
    let acquirer = Acquirer::new();
    // Room for small packages, not for a large one.
    let h = start(&acquirer, 160 * 1024).await;
    ingest(&h, &acquirer, REQUEST_ID, 1).await;
    wait_for_metric(&h, r#"diia_gateway_relay_records{state="orphan"}"#, 1.0).await;
    let text = h.metrics().await;
    for state in ["pending", "delivering", "delivered", "dead"] {
        let line = format!("diia_gateway_relay_records{{state=\"{state}\"}} 0");
        assert!(text.contains(&line), "{line} missing:\n{text}");
    }
    assert!(text.contains("diia_gateway_relay_oldest_pending_seconds 0"));
    for op in ["ingest", "stats", "admin"] {
        let line = format!("diia_gateway_relay_store_errors_total{{op=\"{op}\"}} 0");
        assert!(text.contains(&line), "{line} missing:\n{text}");
    }
    // The delivery worker's counters are exported from the start.
    assert!(text.contains(r#"diia_gateway_relay_delivery_attempts_total{outcome="delivered"} 0"#));

    // A record routed for pull waits as pending (held for its caller): its age shows.
    let store = h.gateway.relay_store().unwrap().clone();
    let now = diia_gateway::relay::now_ms();
    let route = Route {
        client: "client-1".into(),
        branch: "branch-1".into(),
        target: String::new(),
        login: None,
    };
    store
        .record_route(
            "acquirer-1".into(),
            OTHER_REQUEST_ID.into(),
            route,
            Duration::from_secs(600),
            now,
        )
        .await
        .unwrap();
    ingest(&h, &acquirer, OTHER_REQUEST_ID, 2).await;
    wait_for_metric(&h, r#"diia_gateway_relay_records{state="pending"}"#, 1.0).await;
    let age = h.metric("diia_gateway_relay_oldest_pending_seconds").await;
    assert!((0.0..60.0).contains(&age), "oldest pending age {age}");

    wait_for_metric(
        &h,
        r#"diia_gateway_relay_delivery_attempts_total{outcome="held_for_pull"}"#,
        1.0,
    )
    .await;

    // A record routed to a target the settings do not have: dead, never sent elsewhere.
    store
        .record_route(
            "acquirer-1".into(),
            THIRD_REQUEST_ID.into(),
            Route {
                client: "client-1".into(),
                branch: "branch-1".into(),
                target: "no-such-target".into(),
                login: None,
            },
            Duration::from_secs(600),
            now,
        )
        .await
        .unwrap();
    ingest(&h, &acquirer, THIRD_REQUEST_ID, 3).await;
    wait_for_metric(&h, r#"diia_gateway_relay_records{state="dead"}"#, 1.0).await;
    let text = h.metrics().await;
    for (outcome, want) in [
        ("unknown_target", 1),
        ("dead", 1),
        ("held_for_pull", 1),
        ("delivered", 0),
    ] {
        let line =
            format!("diia_gateway_relay_delivery_attempts_total{{outcome=\"{outcome}\"}} {want}");
        assert!(text.contains(&line), "{line} missing:\n{text}");
    }

    // A package the store has no room for: 503, and one ingest store error.
    let big = package_of(&acquirer, 3, 150 * 1024);
    let refused = callback(&h, &ingress_path(), Some("3e1f0a2b-store-full"), big).await;
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
    let errors = h
        .metric(r#"diia_gateway_relay_store_errors_total{op="ingest"}"#)
        .await;
    assert!((errors - 1.0).abs() < 1e-9, "store errors {errors}");
}
