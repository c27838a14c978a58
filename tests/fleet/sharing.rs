//! A leader killed while its `document-request` is at Diia: the other instances never
//! send a second consent push, they answer "outcome unknown" (or time out) instead.

use std::time::{Duration, Instant};

use diia_sim::route::Endpoint;
use http::StatusCode;
use serde_json::json;

use crate::processes::{World, fresh_barcode};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_leader_is_never_replaced_for_a_consent_push() {
    let Some(mut world) = World::start(|_| {}).await else {
        return;
    };
    let token = world.token().await;
    let (sim, http, gateways) = (&world.sim, &world.http, &mut world.gateways);
    sim.set_faults(diia_sim::Faults {
        latency: Duration::from_millis(2500),
        ..diia_sim::Faults::default()
    });
    let barcode = fresh_barcode();
    let body =
        json!({"branchId": "kyiv-001", "barcode": barcode, "requestId": "req-e-0001"}).to_string();
    let path = "/api/v1/acquirers/document-request";
    let leader = {
        let (http, token, body, url) = (
            http.clone(),
            token.clone(),
            body.clone(),
            gateways[0].url(path),
        );
        tokio::spawn(async move {
            let bearer = format!("Bearer {token}");
            diia_gateway_testkit::send(
                &http,
                http::Method::POST,
                &url,
                &[
                    ("authorization", bearer.as_str()),
                    ("content-type", "application/json"),
                ],
                body,
            )
            .await
        })
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while sim.state().requests(Endpoint::DocumentRequest) == 0 {
        assert!(
            Instant::now() < deadline,
            "the leader's call never reached Diia"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    gateways[0].kill();
    leader.abort();
    // The other instances find the lease and wait; the push stays one.
    for gateway in &gateways[1..] {
        let reply = gateway.post(http, path, &token, &body).await;
        assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT, "{reply:?}");
        let code = reply.gateway_code();
        assert!(
            code == "sharing_outcome_unknown" || code == "upstream_timeout",
            "{code}"
        );
    }
    sim.set_faults(diia_sim::Faults::default());
    tokio::time::sleep(Duration::from_millis(2600)).await;
    let again = gateways[1].post(http, path, &token, &body).await;
    assert_eq!(again.status, StatusCode::GATEWAY_TIMEOUT, "{again:?}");
    assert_eq!(
        sim.state().requests(Endpoint::DocumentRequest),
        1,
        "a second consent push"
    );
    // Another requestId for the same barcode is refused, as on one instance.
    let other =
        json!({"branchId": "kyiv-001", "barcode": barcode, "requestId": "req-e-0002"}).to_string();
    let reply = gateways[2].post(http, path, &token, &other).await;
    assert_eq!(reply.status, StatusCode::CONFLICT, "{reply:?}");
    assert_eq!(sim.state().requests(Endpoint::DocumentRequest), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sharing_request_is_replayed_by_every_instance() {
    let Some(world) = World::start(|_| {}).await else {
        return;
    };
    let token = world.token().await;
    let (sim, http, gateways) = (&world.sim, &world.http, &world.gateways);
    let body = json!({"branchId": "kyiv-001", "barcode": fresh_barcode(), "requestId": "req-r-1"})
        .to_string();
    let path = "/api/v1/acquirers/document-request";
    let first = gateways[0].post(http, path, &token, &body).await;
    assert_eq!(first.status, StatusCode::OK, "{first:?}");
    // Replayed from Redis (a request during the leader's write-back would join it instead).
    world.redis.settled().await;
    for gateway in &gateways[1..] {
        let replay = gateway.post(http, path, &token, &body).await;
        assert_eq!(replay.status, StatusCode::OK);
        assert_eq!(replay.body, first.body);
        assert!(
            replay.header("cache-status").unwrap().contains("replay"),
            "{replay:?}"
        );
    }
    assert_eq!(sim.state().requests(Endpoint::DocumentRequest), 1);
}
