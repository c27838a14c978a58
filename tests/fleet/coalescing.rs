//! (b) Three instances, 50 identical concurrent requests each, per fresh barcode: one Diia
//! call per barcode for the whole fleet; re-scans on every instance cost nothing.

use std::sync::Arc;

use diia_sim::route::Endpoint;
use futures_util::future::join_all;
use http::StatusCode;

use crate::support::{World, fresh_barcode};

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
