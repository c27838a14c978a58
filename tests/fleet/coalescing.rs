//! Three instances, 50 identical concurrent requests each, per fresh barcode: one Diia
//! call per barcode for the whole fleet; re-scans on every instance cost nothing.

use std::sync::Arc;
use std::time::{Duration, Instant};

use diia_sim::route::Endpoint;
use futures_util::future::join_all;
use http::StatusCode;

use crate::processes::{World, fresh_barcode};

const BARCODES: usize = 200;
const PER_INSTANCE: usize = 50;
/// Barcodes scanned at once (each by 150 requests).
const AT_ONCE: usize = 4;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_make_one_diia_call_per_barcode() {
    let Some(mut world) = World::start(|_| {}).await else {
        return;
    };
    let token = world.token().await;
    let (sim, http) = (&world.sim, world.http.clone());
    let gateways = Arc::new(std::mem::take(&mut world.gateways));
    assert_eq!(
        gateways[1].session_token(&http).await,
        token,
        "one token fleet-wide"
    );
    let before = sim.state().requests(Endpoint::DocumentIdentification);
    let barcodes: Vec<String> = (0..BARCODES).map(|_| fresh_barcode()).collect();
    for batch in barcodes.chunks(AT_ONCE) {
        let mut calls = Vec::new();
        for barcode in batch {
            for gateway in 0..3 {
                for _ in 0..PER_INSTANCE {
                    let (gateways, http, token, barcode) = (
                        Arc::clone(&gateways),
                        http.clone(),
                        token.clone(),
                        barcode.clone(),
                    );
                    calls.push(tokio::spawn(async move {
                        gateways[gateway].identify(&http, &token, &barcode).await
                    }));
                }
            }
        }
        for reply in join_all(calls).await {
            let reply = reply.unwrap();
            assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
        }
    }
    let calls = sim.state().requests(Endpoint::DocumentIdentification) - before;
    assert_eq!(
        calls, BARCODES as u64,
        "one Diia call per barcode for the fleet"
    );
    // A re-scan on each instance: answered from the near cache or Redis.
    for barcode in &barcodes[..20] {
        for gateway in gateways.iter() {
            let reply = gateway.identify(&http, &token, barcode).await;
            assert_eq!(reply.status, StatusCode::OK);
            assert!(
                reply.header("cache-status").unwrap().contains("hit"),
                "{reply:?}"
            );
        }
    }
    let after = sim.state().requests(Endpoint::DocumentIdentification) - before;
    assert_eq!(after, BARCODES as u64, "re-scans reached Diia");
    let remote: f64 = {
        let mut sum = 0.0;
        for gateway in gateways.iter() {
            sum += gateway
                .metric(
                    &http,
                    r#"diia_gateway_shared_lookups_total{result="remote_wait"}"#,
                )
                .await;
        }
        sum
    };
    assert!(remote > 0.0, "no instance waited on another's call");
}

/// `server.workers = 2` (one single-threaded runtime per `SO_REUSEPORT` listener) on every
/// instance: the Redis link created on the main runtime serves the workers' requests, and
/// the answers are shared across workers and instances (checked by hand before this test).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_runtimes_share_the_fleet_cache() {
    let Some(world) = World::start(|config| config.server_extra = "workers = 2".to_owned()).await
    else {
        return;
    };
    let token = world.token().await;
    let (sim, http, gateways) = (&world.sim, &world.http, &world.gateways);
    let before = sim.state().requests(Endpoint::DocumentIdentification);
    let barcode = fresh_barcode();
    let first = gateways[0].identify(http, &token, &barcode).await;
    assert_eq!(first.status, StatusCode::OK, "{first:?}");
    assert!(first.header("cache-status").unwrap().contains("fwd=miss"));
    world.redis.settled().await;
    let remote = gateways[1].identify(http, &token, &barcode).await;
    assert_eq!(
        remote.header("cache-status"),
        Some("diia-gateway; hit; detail=remote")
    );
    let near = gateways[1].identify(http, &token, &barcode).await;
    assert!(near.header("cache-status").unwrap().contains("hit"));
    // Many connections at once on the third instance (spread over its two workers): one
    // call for a fresh barcode.
    let fresh = fresh_barcode();
    let replies = join_all((0..20).map(|_| gateways[2].identify(http, &token, &fresh))).await;
    for reply in &replies {
        assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    }
    let calls = sim.state().requests(Endpoint::DocumentIdentification) - before;
    assert_eq!(
        calls, 2,
        "one Diia call per barcode across workers and instances"
    );
}

/// Connections without a pattern subscription (worker lanes) whose last command was the
/// lookup script.
async fn lanes_with_lookups(world: &World) -> usize {
    let list = world
        .redis
        .reply(&["CLIENT", "LIST"])
        .await
        .unwrap_or_default();
    list.lines()
        .filter(|line| line.contains(" psub=0 ") && line.contains(" cmd=evalsha "))
        .count()
}

/// Scans fresh barcodes, many connections at once (the kernel spreads them over both
/// workers of each instance), until two lanes have carried lookups.
async fn until_lanes_carry_lookups(world: &World, token: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let barcodes: Vec<String> = (0..12).map(|_| fresh_barcode()).collect();
        let replies = join_all(
            barcodes
                .iter()
                .enumerate()
                .map(|(n, barcode)| world.gateways[n % 3].identify(&world.http, token, barcode)),
        )
        .await;
        for reply in &replies {
            assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
        }
        if lanes_with_lookups(world).await >= 2 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no worker lane carried a lookup: {:?}",
            world.redis.reply(&["CLIENT", "LIST"]).await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// With `server.workers = 2`, each worker thread sends its Redis commands on a connection of
/// its own (a lane), not through the primary connection that holds the Pub/Sub
/// subscription: a fleet lookup must not cross threads twice. Seen from Redis: connections
/// without a pattern subscription that ran the lookup script.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_threads_send_their_lookups_on_their_own_connections() {
    let Some(world) = World::start(|config| config.server_extra = "workers = 2".to_owned()).await
    else {
        return;
    };
    let token = world.token().await;
    until_lanes_carry_lookups(&world, &token).await;
}

/// A Redis restart kills every lane's connection: lanes are opened afresh once Redis is
/// back, so the fleet goes down once and up once (no second outage when a dead lane is
/// first used), and the lanes carry lookups again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_lanes_reopen_after_a_redis_restart_without_a_second_outage() {
    let Some(mut world) =
        World::start(|config| config.server_extra = "workers = 2".to_owned()).await
    else {
        return;
    };
    let token = world.token().await;
    until_lanes_carry_lookups(&world, &token).await;
    world.redis.kill();
    // Every instance notices (a heartbeat or a request fails), then Redis returns.
    for gateway in &world.gateways {
        let barcode = fresh_barcode();
        let reply = gateway.identify(&world.http, &token, &barcode).await;
        assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
        gateway.wait_for_log("Redis unavailable").await;
    }
    // Down for longer than a connection's own reconnect attempts last.
    tokio::time::sleep(Duration::from_secs(2)).await;
    world.redis.restart().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    for gateway in &world.gateways {
        // The first line is from the start-up.
        while gateway.log().matches("Redis reachable").count() < 2 {
            assert!(Instant::now() < deadline, "not back on Redis");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    until_lanes_carry_lookups(&world, &token).await;
    for gateway in &world.gateways {
        let log = gateway.log();
        assert_eq!(
            log.matches("Redis unavailable").count(),
            1,
            "one outage, one line: {log}"
        );
        assert_eq!(log.matches("Redis reachable").count(), 2, "{log}");
    }
}
