//! The Diia budget is fleet-wide: three instances offered 3 × 150 calls/s against a 200/s,
//! burst 50 budget send 200/s to Diia (±5 %), never more than rate + burst in any second.
//! The same run with Redis SIGKILLed at +10 s and restarted at +20 s: the outage seconds
//! stay at 200/s (local budgets at rate / 3), transitions stay under rate + burst, only
//! documented statuses, ≤ 3 calls per key while Redis is down, and every instance is back
//! on Redis within a second of the restart. And a remote waiter falls back when Redis dies
//! instead of sitting out the lease.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use diia_sim::SimHandle;
use diia_sim::route::Endpoint;
use futures_util::future::join_all;
use http::StatusCode;

use crate::processes::{
    FleetConfig, Gateway, Redis, SERIAL, World, fresh_barcode, redis_available, simulator,
};
use diia_gateway_testkit::{HttpClient, client};

const RATE: u64 = 200;
const BURST: u64 = 50;
const PER_INSTANCE: f64 = 150.0;
const SAMPLE: Duration = Duration::from_millis(100);

/// The budget under test: 200/s, burst 50, 100 ms of waiting at most.
fn budget(config: &mut FleetConfig) {
    config.diia = format!(r#"{{ per_second = {RATE}, burst = {BURST}, max_wait = "100ms" }}"#);
}

/// Statuses (by code) and Diia calls sampled every 100 ms.
struct Run {
    statuses: BTreeMap<u16, u64>,
    samples: Vec<u64>,
}

impl Run {
    /// Diia calls in the second starting at `second`.
    fn second(&self, second: usize) -> u64 {
        let per_second = (Duration::from_secs(1).as_millis() / SAMPLE.as_millis()) as usize;
        self.samples[(second + 1) * per_second] - self.samples[second * per_second]
    }

    /// Every listed second at most 5 % over the rate and at most 10 % under it (a 100-ms
    /// sample that lands late on a loaded 2-core machine shifts a few calls into the next
    /// second; running over is what the budget forbids), no 1-s window above rate + burst,
    /// and only documented statuses.
    fn assert_within_budget(&self, steady: impl Iterator<Item = usize>) {
        let seconds: Vec<u64> = (0..self.samples.len() / 10)
            .map(|s| self.second(s))
            .collect();
        eprintln!(
            "Diia calls per second: {seconds:?}; max 1-s window {}; statuses {:?}",
            self.max_window(),
            self.statuses
        );
        for second in steady {
            let calls = seconds[second];
            assert!(
                (RATE - RATE / 10..=RATE + RATE / 20).contains(&calls),
                "second {second}: {calls} calls ({seconds:?})"
            );
        }
        assert!(
            self.max_window() <= RATE + BURST,
            "a 1-s window had {}",
            self.max_window()
        );
        let documented = [200, 503];
        assert!(
            self.statuses.keys().all(|s| documented.contains(s)),
            "{:?}",
            self.statuses
        );
    }

    /// The most Diia calls in any 1-s window (sliding by 100 ms).
    fn max_window(&self) -> u64 {
        self.samples
            .windows(11)
            .map(|w| w[10] - w[0])
            .max()
            .unwrap_or(0)
    }
}

/// Offers `PER_INSTANCE` fresh identifications per second to each gateway for `length`.
async fn offer(
    gateways: &Arc<Vec<Gateway>>,
    http: &HttpClient,
    token: &str,
    sim: &SimHandle,
    length: Duration,
) -> Run {
    let statuses = Arc::new(Mutex::new(BTreeMap::new()));
    let started = Instant::now();
    let mut senders = Vec::new();
    for index in 0..gateways.len() {
        let (gateways, http, token, statuses) = (
            Arc::clone(gateways),
            http.clone(),
            token.to_owned(),
            Arc::clone(&statuses),
        );
        senders.push(tokio::spawn(async move {
            let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / PER_INSTANCE));
            let mut calls = Vec::new();
            while started.elapsed() < length {
                ticks.tick().await;
                let (gateways, http, token, statuses) = (
                    Arc::clone(&gateways),
                    http.clone(),
                    token.clone(),
                    Arc::clone(&statuses),
                );
                calls.push(tokio::spawn(async move {
                    let reply = gateways[index]
                        .identify(&http, &token, &fresh_barcode())
                        .await;
                    *statuses
                        .lock()
                        .unwrap()
                        .entry(reply.status.as_u16())
                        .or_insert(0) += 1;
                }));
            }
            join_all(calls).await;
        }));
    }
    let mut samples = Vec::new();
    let mut ticks = tokio::time::interval(SAMPLE);
    while started.elapsed() < length + SAMPLE {
        ticks.tick().await;
        samples.push(sim.state().requests(Endpoint::DocumentIdentification));
    }
    join_all(senders).await;
    let statuses = statuses.lock().unwrap().clone();
    Run { statuses, samples }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_share_one_diia_budget() {
    let Some(mut world) = World::start(budget).await else {
        return;
    };
    let token = world.verified_token().await;
    let (sim, http) = (&world.sim, &world.http);
    let gateways = Arc::new(std::mem::take(&mut world.gateways));
    let run = offer(&gateways, http, &token, sim, Duration::from_secs(20)).await;
    run.assert_within_budget(2..19);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_dying_mid_run_degrades_to_local_budgets_and_recovers() {
    let Some(mut world) = World::start(budget).await else {
        return;
    };
    let token = world.verified_token().await;
    let (sim, http, redis) = (&world.sim, world.http.clone(), &mut world.redis);
    let gateways = Arc::new(std::mem::take(&mut world.gateways));
    let age_calls = || sim.state().requests(Endpoint::DocumentIdentificationAge);
    let chaos = {
        let (gateways, http, token) = (Arc::clone(&gateways), http.clone(), token.clone());
        async move {
            tokio::time::sleep(Duration::from_secs(10)).await;
            redis.kill();
            // While down: identical requests on every instance make ≤ 3 Diia calls.
            tokio::time::sleep(Duration::from_secs(3)).await;
            let before = age_calls();
            let barcode = fresh_barcode();
            let mut probes = Vec::new();
            for index in 0..3 {
                for _ in 0..10 {
                    let (gateways, http, token, barcode) = (
                        Arc::clone(&gateways),
                        http.clone(),
                        token.clone(),
                        barcode.clone(),
                    );
                    probes.push(tokio::spawn(async move {
                        gateways[index]
                            .post(
                                &http,
                                "/api/v1/acquirers/document-identification/age",
                                &token,
                                &format!(r#"{{"branchId":"kyiv-002","barcode":"{barcode}"}}"#),
                            )
                            .await
                            .status
                    }));
                }
            }
            let statuses: Vec<StatusCode> = join_all(probes)
                .await
                .into_iter()
                .map(Result::unwrap)
                .collect();
            let outage_calls = age_calls() - before;
            tokio::time::sleep(Duration::from_secs(7)).await;
            redis.restart().await;
            let restarted = Instant::now();
            for gateway in gateways.iter() {
                while gateway.metric(&http, "diia_gateway_redis_up").await != 1.0 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            (redis, statuses, outage_calls, restarted.elapsed())
        }
    };
    let (run, (_redis, probe_statuses, outage_calls, back_after)) = tokio::join!(
        offer(&gateways, &http, &token, sim, Duration::from_secs(30)),
        chaos
    );
    for gateway in gateways.iter() {
        eprintln!(
            "instance: {} fallback admits, {} live",
            gateway
                .metric(&http, "diia_gateway_budget_fallback_admits_total")
                .await,
            gateway.metric(&http, "diia_gateway_instances_live").await
        );
    }
    eprintln!("back on Redis after {back_after:?}");
    // The transition seconds (10, 20, 21) may differ; never above rate + burst.
    run.assert_within_budget((2..10).chain(11..20).chain(22..29));
    // Diia's own 400 ("used already") is passed on: each instance coalesced on its own.
    assert!(
        probe_statuses
            .iter()
            .all(|s| [200, 400, 503].contains(&s.as_u16())),
        "{probe_statuses:?}"
    );
    assert!(
        outage_calls <= 3,
        "{outage_calls} Diia calls for one key while Redis was down"
    );
    assert!(
        back_after <= Duration::from_secs(1),
        "back on Redis after {back_after:?}"
    );
    for gateway in gateways.iter() {
        assert!(!gateway.log().contains("panicked"), "{}", gateway.log());
        let degraded = gateway
            .metric(
                &http,
                r#"diia_gateway_shared_lookups_total{result="degraded"}"#,
            )
            .await;
        assert!(degraded > 0.0, "instance never ran degraded");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_waiter_falls_back_at_once_when_redis_dies() {
    let Some(mut world) = World::start(|_| {}).await else {
        return;
    };
    let token = world.token().await;
    let (sim, http, gateways, redis) = (&world.sim, &world.http, &world.gateways, &mut world.redis);
    sim.set_faults(diia_sim::Faults {
        latency: Duration::from_millis(1200),
        ..diia_sim::Faults::default()
    });
    let barcode = fresh_barcode();
    let (leader, waiter) = (gateways[0].identify(http, &token, &barcode), async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let started = Instant::now();
        let reply = gateways[1].identify(http, &token, &barcode).await;
        (reply, started.elapsed())
    });
    let killer = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        redis.kill();
    };
    let (leader, (reply, waited), ()) = tokio::join!(leader, waiter, killer);
    assert_eq!(leader.status, StatusCode::OK);
    // The lease is 3 s + 10 ms + 1 s here; the waiter answered on its own call instead.
    assert_ne!(reply.status, StatusCode::GATEWAY_TIMEOUT, "{reply:?}");
    assert!(waited < Duration::from_millis(2500), "waited {waited:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_starts_ready_without_redis_and_joins_when_it_appears() {
    let _serial = SERIAL.lock().await;
    if !redis_available() {
        return;
    }
    let port = diia_gateway_testkit::port_outside_ephemeral_range();
    let sim = simulator().await;
    // Gateway::start waits for /readyz: it must turn ready with nothing on the port.
    let gateway = Gateway::start(&FleetConfig::new(
        &sim.base_url(),
        &format!("redis://127.0.0.1:{port}"),
    ))
    .await;
    let http = client();
    assert_eq!(gateway.metric(&http, "diia_gateway_redis_up").await, 0.0);
    let token = gateway.session_token(&http).await;
    let barcode = fresh_barcode();
    let first = gateway.identify(&http, &token, &barcode).await;
    assert_eq!(first.status, StatusCode::OK, "{first:?}");
    let again = gateway.identify(&http, &token, &barcode).await;
    assert_eq!(again.header("cache-status"), Some("diia-gateway; hit"));
    gateway.wait_for_log("Redis unreachable at start").await;
    let redis = Redis::start_on(port, &[]).await;
    let appeared = Instant::now();
    while gateway.metric(&http, "diia_gateway_redis_up").await != 1.0 {
        assert!(
            appeared.elapsed() < Duration::from_secs(3),
            "{}",
            gateway.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let shared = gateway.identify(&http, &token, &fresh_barcode()).await;
    assert_eq!(shared.status, StatusCode::OK);
    // The leader writes back after answering its client.
    let keys = redis.settled().await;
    assert!(
        keys.iter().any(|k| k.starts_with("{dg}:r:")),
        "answer never stored in Redis: {keys:?}"
    );
    gateway.wait_for_log("Redis reachable").await;
    assert_eq!(gateway.log().matches("Redis reachable").count(), 1);
}
