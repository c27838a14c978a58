//! A Redis that hiccups (a `SIGSTOP` of a few hundred ms, a fork pause) or holds a value
//! that does not open: a sharing request never calls Diia on fleet state it cannot read,
//! and a remote hit is only ever served to its own `requestId`.

use std::time::{Duration, Instant};

use diia_sim::route::Endpoint;
use http::StatusCode;
use redis::AsyncCommands;
use serde_json::json;

use crate::it_support::Reply;
use crate::support::{Redis, World, fresh_barcode};

const SHARE: &str = "/api/v1/acquirers/document-request";

fn share_body(barcode: &str, request_id: &str) -> String {
    json!({"branchId": "kyiv-001", "barcode": barcode, "requestId": request_id}).to_string()
}

/// The `{dg}:r:` entries that are in `after` and not in `before`.
fn new_results(before: &[String], after: &[String]) -> Vec<String> {
    after
        .iter()
        .filter(|k| k.starts_with("{dg}:r:") && !before.contains(k))
        .cloned()
        .collect()
}

/// Flips the last byte of a stored value, keeping its TTL (a corrupted or tampered value).
async fn flip_last_byte(redis: &Redis, key: &str) {
    let mut c = redis.connection().await;
    let mut value: Vec<u8> = c.get(key).await.unwrap();
    let ttl: i64 = c.pttl(key).await.unwrap();
    assert!(ttl > 1000, "{key} has {ttl} ms left");
    *value.last_mut().unwrap() ^= 0x01;
    let _: () = redis::cmd("SET")
        .arg(key)
        .arg(value)
        .arg("PX")
        .arg(ttl)
        .query_async(&mut c)
        .await
        .unwrap();
}

fn assert_unavailable(reply: &Reply) {
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "{reply:?}");
    assert_eq!(reply.gateway_code(), "sharing_unavailable", "{reply:?}");
    assert!(reply.header("retry-after").is_some(), "{reply:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_stall_never_sends_a_second_push() {
    let Some(world) = World::start(|_| {}).await else {
        return;
    };
    let token = world.token().await;
    let (sim, http, gateways) = (&world.sim, &world.http, &world.gateways);
    let body = share_body(&fresh_barcode(), "req-stall-1");
    let first = gateways[0].post(http, SHARE, &token, &body).await;
    assert_eq!(first.status, StatusCode::OK, "{first:?}");
    world.redis.settled().await;
    world.redis.stop();
    let started = Instant::now();
    let retry = gateways[1].post(http, SHARE, &token, &body).await;
    let took = started.elapsed();
    // Identification keeps running degraded meanwhile.
    let identified = gateways[2].identify(http, &token, &fresh_barcode()).await;
    world.redis.resume();
    assert_eq!(identified.status, StatusCode::OK, "{identified:?}");
    // Never a second push: the stall is waited out (up to `scaleout.sharing_wait`), then
    // the request is refused, never sent to Diia on fleet state nobody could read.
    assert_unavailable(&retry);
    assert!(took < Duration::from_secs(3), "refused after {took:?}");
    assert_eq!(
        sim.state().requests(Endpoint::DocumentRequest),
        1,
        "a second consent push"
    );
    // The first requester's replay is its own 200.
    let replay = gateways[0].post(http, SHARE, &token, &body).await;
    assert_eq!(replay.status, StatusCode::OK, "{replay:?}");
    assert_eq!(replay.body, first.body);
    // Once Redis answers again, every instance replays it.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let again = gateways[1].post(http, SHARE, &token, &body).await;
        if again.status == StatusCode::OK {
            assert_eq!(again.body, first.body);
            break;
        }
        assert_unavailable(&again);
        assert!(Instant::now() < deadline, "never replayed: {again:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(sim.state().requests(Endpoint::DocumentRequest), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stall_shorter_than_sharing_wait_is_waited_out() {
    let Some(world) = World::start(|config| {
        config.scaleout_extra = r#"sharing_wait = "4s""#.to_owned();
    })
    .await
    else {
        return;
    };
    let token = world.token().await;
    let (sim, http, gateways) = (&world.sim, &world.http, &world.gateways);
    let body = share_body(&fresh_barcode(), "req-stall-2");
    let first = gateways[0].post(http, SHARE, &token, &body).await;
    assert_eq!(first.status, StatusCode::OK, "{first:?}");
    world.redis.settled().await;
    world.redis.stop();
    let retry = {
        let (http, token, body, url) = (
            http.clone(),
            token.clone(),
            body.clone(),
            gateways[1].url(SHARE),
        );
        tokio::spawn(async move {
            let bearer = format!("Bearer {token}");
            crate::it_support::send(
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
    tokio::time::sleep(Duration::from_millis(800)).await;
    world.redis.resume();
    let retry = tokio::time::timeout(Duration::from_secs(10), retry)
        .await
        .expect("answered")
        .unwrap();
    assert_eq!(retry.status, StatusCode::OK, "{retry:?}");
    assert_eq!(retry.body, first.body);
    assert!(
        retry.header("cache-status").unwrap().contains("replay"),
        "{retry:?}"
    );
    assert_eq!(sim.state().requests(Endpoint::DocumentRequest), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_value_that_does_not_open_is_held_never_called_again() {
    let Some(world) = World::start(|_| {}).await else {
        return;
    };
    let token = world.token().await;
    let (sim, http, gateways) = (&world.sim, &world.http, &world.gateways);
    // Sharing: the value is flipped, another instance must not push again.
    let before = world.redis.settled().await;
    let body = share_body(&fresh_barcode(), "req-flip-1");
    let first = gateways[0].post(http, SHARE, &token, &body).await;
    assert_eq!(first.status, StatusCode::OK, "{first:?}");
    let after = world.redis.settled().await;
    let stored = new_results(&before, &after);
    assert_eq!(stored.len(), 1, "{before:?} {after:?}");
    flip_last_byte(&world.redis, &stored[0]).await;
    let retry = gateways[1].post(http, SHARE, &token, &body).await;
    assert_unavailable(&retry);
    assert_eq!(
        sim.state().requests(Endpoint::DocumentRequest),
        1,
        "a second consent push"
    );
    let replay = gateways[0].post(http, SHARE, &token, &body).await;
    assert_eq!(replay.status, StatusCode::OK, "{replay:?}");
    assert_eq!(replay.body, first.body);
    // Identification: a single-use barcode is not sent again either.
    let barcode = fresh_barcode();
    let before = world.redis.settled().await;
    let first = gateways[0].identify(http, &token, &barcode).await;
    assert_eq!(first.status, StatusCode::OK, "{first:?}");
    let after = world.redis.settled().await;
    let stored = new_results(&before, &after);
    assert_eq!(stored.len(), 1, "{before:?} {after:?}");
    flip_last_byte(&world.redis, &stored[0]).await;
    let retry = gateways[2].identify(http, &token, &barcode).await;
    assert_eq!(retry.status, StatusCode::SERVICE_UNAVAILABLE, "{retry:?}");
    assert_eq!(retry.gateway_code(), "fleet_answer_unreadable", "{retry:?}");
    assert_eq!(
        sim.state().requests(Endpoint::DocumentIdentification),
        1,
        "a second identification call"
    );
    // Redis stayed up throughout: a value that does not open is not an outage.
    assert_eq!(gateways[2].metric(http, "diia_gateway_redis_up").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_hit_is_replayed_only_to_its_own_request_id() {
    let Some(world) = World::start(|_| {}).await else {
        return;
    };
    let token = world.token().await;
    let (sim, http, gateways) = (&world.sim, &world.http, &world.gateways);
    let barcode = fresh_barcode();
    let first = gateways[0]
        .post(http, SHARE, &token, &share_body(&barcode, "req-u1"))
        .await;
    assert_eq!(first.status, StatusCode::OK, "{first:?}");
    world.redis.settled().await;
    // Another requestId for the same barcode, through another instance: refused.
    let other = gateways[1]
        .post(http, SHARE, &token, &share_body(&barcode, "req-u2"))
        .await;
    assert_eq!(other.status, StatusCode::CONFLICT, "{other:?}");
    assert_eq!(other.gateway_code(), "sharing_already_requested");
    // The first requester is still replayed there, and on the third instance.
    for gateway in &gateways[1..] {
        let replay = gateway
            .post(http, SHARE, &token, &share_body(&barcode, "req-u1"))
            .await;
        assert_eq!(replay.status, StatusCode::OK, "{replay:?}");
        assert_eq!(replay.body, first.body);
    }
    // And the other requestId stays refused, also from the near cache.
    let other = gateways[1]
        .post(http, SHARE, &token, &share_body(&barcode, "req-u2"))
        .await;
    assert_eq!(other.status, StatusCode::CONFLICT, "{other:?}");
    assert_eq!(sim.state().requests(Endpoint::DocumentRequest), 1);
}
