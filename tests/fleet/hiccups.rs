//! A Redis that hiccups (a `SIGSTOP` of a few hundred ms, a fork pause) or holds a value
//! that does not open: a sharing request never calls Diia on fleet state it cannot read,
//! and a remote hit is only ever served to its own `requestId`.

use std::time::{Duration, Instant};

use diia_sim::route::Endpoint;
use http::StatusCode;
use redis::AsyncCommands;
use serde_json::json;

use crate::processes::{Redis, World, fresh_barcode};
use diia_gateway_testkit::Reply;

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
    rewrite(redis, key, |value| *value.last_mut().unwrap() ^= 0x01).await;
}

/// Changes a stored value in place, keeping its TTL.
async fn rewrite(redis: &Redis, key: &str, change: impl FnOnce(&mut Vec<u8>)) {
    let mut c = redis.connection().await;
    let mut value: Vec<u8> = c.get(key).await.unwrap();
    let ttl: i64 = c.pttl(key).await.unwrap();
    assert!(ttl > 1000, "{key} has {ttl} ms left");
    change(&mut value);
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
    let retry = spawn_post(&world, 1, SHARE, &token, body.clone());
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

/// One POST in the background (the request is in flight while Redis is stopped).
fn spawn_post(
    world: &World,
    gateway: usize,
    path: &'static str,
    token: &str,
    body: String,
) -> tokio::task::JoinHandle<Reply> {
    let (http, url) = (world.http.clone(), world.gateways[gateway].url(path));
    let bearer = format!("Bearer {token}");
    tokio::spawn(async move {
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
}

/// Longer than the fleet tests' `command_timeout` (250 ms), shorter than `sharing_wait`.
const STALL: Duration = Duration::from_millis(400);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stall_during_a_fresh_share_leaves_no_lease_nobody_owns() {
    // The lookup's own retry finds the lease its lost first try took: it leads.
    fresh_share_through_a_stall(STALL).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_share_refused_in_a_stall_frees_the_lease_its_lost_lookup_took() {
    // Longer than `sharing_wait` (500 ms): refused, and the lease freed behind it.
    fresh_share_through_a_stall(Duration::from_millis(900)).await;
}

/// A fresh share via A while Redis stalls for `stall`: either A's 200 with one push, or
/// A's 503 and then the retry's 200 with one push; never a 504, never two pushes.
async fn fresh_share_through_a_stall(stall: Duration) {
    let Some(world) = World::start(|_| {}).await else {
        return;
    };
    let token = world.token().await;
    let (sim, http, gateways) = (&world.sim, &world.http, &world.gateways);
    for gateway in gateways {
        let warm = gateway.identify(http, &token, &fresh_barcode()).await;
        assert_eq!(warm.status, StatusCode::OK, "{warm:?}");
    }
    world.redis.settled().await;
    let body = share_body(&fresh_barcode(), "req-fresh-1");
    // The lookup is sent while Redis is stopped, times out here, and still runs (taking
    // the lease) when Redis resumes.
    world.redis.stop();
    let first = spawn_post(&world, 0, SHARE, &token, body.clone());
    tokio::time::sleep(stall).await;
    world.redis.resume();
    let first = tokio::time::timeout(Duration::from_secs(10), first)
        .await
        .expect("answered")
        .unwrap();
    assert_ne!(first.status, StatusCode::GATEWAY_TIMEOUT, "{first:?}");
    let pushed = if first.status == StatusCode::OK {
        first.body.clone()
    } else {
        // Refused on fleet state it could not read: the same requestId, through either
        // instance, is then sent (once).
        assert_unavailable(&first);
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut turn = 0;
        loop {
            let retry = gateways[turn % 2].post(http, SHARE, &token, &body).await;
            turn += 1;
            if retry.status == StatusCode::OK {
                break retry.body;
            }
            assert_unavailable(&retry);
            assert!(Instant::now() < deadline, "never sent: {retry:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    assert_eq!(sim.state().requests(Endpoint::DocumentRequest), 1);
    for gateway in &gateways[..2] {
        let replay = gateway.post(http, SHARE, &token, &body).await;
        assert_eq!(replay.status, StatusCode::OK, "{replay:?}");
        assert_eq!(replay.body, pushed);
    }
    assert_eq!(
        sim.state().requests(Endpoint::DocumentRequest),
        1,
        "a second consent push"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_degraded_identification_hands_its_answer_to_the_fleet() {
    let Some(world) = World::start(|_| {}).await else {
        return;
    };
    let token = world.token().await;
    let (sim, http, gateways) = (&world.sim, &world.http, &world.gateways);
    for gateway in gateways {
        let warm = gateway.identify(http, &token, &fresh_barcode()).await;
        assert_eq!(warm.status, StatusCode::OK, "{warm:?}");
    }
    world.redis.settled().await;
    let calls = sim.state().requests(Endpoint::DocumentIdentification);
    let barcode = fresh_barcode();
    let body = format!(r#"{{"branchId":"kyiv-001","barcode":"{barcode}"}}"#);
    world.redis.stop();
    let first = spawn_post(
        &world,
        0,
        "/api/v1/acquirers/document-identification",
        &token,
        body,
    );
    tokio::time::sleep(STALL).await;
    world.redis.resume();
    let first = tokio::time::timeout(Duration::from_secs(10), first)
        .await
        .expect("answered")
        .unwrap();
    // Degraded, never failed.
    assert_eq!(first.status, StatusCode::OK, "{first:?}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The healthy instances serve A's answer: none waits on a lease nobody frees, none
    // calls Diia again with the single-use barcode.
    for gateway in &gateways[1..] {
        let started = Instant::now();
        let again = gateway.identify(http, &token, &barcode).await;
        assert_eq!(again.status, StatusCode::OK, "{again:?}");
        assert_eq!(again.body, first.body);
        assert!(started.elapsed() < Duration::from_secs(2), "{again:?}");
    }
    assert_eq!(
        sim.state().requests(Endpoint::DocumentIdentification),
        calls + 1,
        "a second identification call"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_whose_clear_expiry_was_rewritten_is_held_never_absent() {
    let Some(world) = World::start(|_| {}).await else {
        return;
    };
    let token = world.token().await;
    let (sim, http, gateways) = (&world.sim, &world.http, &world.gateways);
    // A writer makes the clear head say "expired in 1970", keeping the TTL.
    let expired = |value: &mut Vec<u8>| value[1..17].copy_from_slice(b"0000000000000001");
    let before = world.redis.settled().await;
    let body = share_body(&fresh_barcode(), "req-head-1");
    let first = gateways[0].post(http, SHARE, &token, &body).await;
    assert_eq!(first.status, StatusCode::OK, "{first:?}");
    let after = world.redis.settled().await;
    let stored = new_results(&before, &after);
    assert_eq!(stored.len(), 1, "{before:?} {after:?}");
    rewrite(&world.redis, &stored[0], expired).await;
    let retry = gateways[1].post(http, SHARE, &token, &body).await;
    assert_unavailable(&retry);
    assert_eq!(
        sim.state().requests(Endpoint::DocumentRequest),
        1,
        "a second consent push"
    );
    let barcode = fresh_barcode();
    let before = world.redis.settled().await;
    let first = gateways[0].identify(http, &token, &barcode).await;
    assert_eq!(first.status, StatusCode::OK, "{first:?}");
    let after = world.redis.settled().await;
    let stored = new_results(&before, &after);
    assert_eq!(stored.len(), 1, "{before:?} {after:?}");
    rewrite(&world.redis, &stored[0], expired).await;
    let retry = gateways[2].identify(http, &token, &barcode).await;
    assert_eq!(retry.status, StatusCode::SERVICE_UNAVAILABLE, "{retry:?}");
    assert_eq!(retry.gateway_code(), "fleet_answer_unreadable", "{retry:?}");
    assert_eq!(
        sim.state().requests(Endpoint::DocumentIdentification),
        1,
        "a second identification call"
    );
}
