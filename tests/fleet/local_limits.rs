//! What stays local in scale-out mode: per-branch limits at quota / live instances (no
//! round trip), rescaled when an instance dies; and what is shared although it looks
//! local: the managed-mode session token (one login for the fleet).

use std::time::{Duration, Instant};

use diia_sim::route::Endpoint;
use diia_sim::{DEMO_ACQUIRER_TOKEN, DEMO_AUTH_TOKEN};
use http::{Method, StatusCode};
use sha2::{Digest, Sha256};

use crate::processes::{World, fresh_barcode};
use diia_gateway_testkit::send;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn branch_limits_are_the_quota_divided_by_live_instances() {
    let Some(mut world) = World::start(|config| {
        // A burst of 30 for the fleet: 10 per instance while three are alive.
        config.branch = "{ per_minute = 1, burst = 30 }".to_owned();
        config
            .scaleout_extra
            .push_str("heartbeat_interval = \"200ms\"\ninstance_ttl = \"1s\"\n");
    })
    .await
    else {
        return;
    };
    let token = world.token().await;
    let (http, gateways) = (&world.http, &mut world.gateways);
    let url = gateways[0].url("/api/v1/acquirers/document-identification");
    let scan = |branch: &'static str| {
        let (http, token, url) = (http.clone(), token.clone(), url.clone());
        async move {
            let bearer = format!("Bearer {token}");
            let body = format!(
                r#"{{"branchId":"{branch}","barcode":"{}"}}"#,
                fresh_barcode()
            );
            let headers = [
                ("authorization", bearer.as_str()),
                ("content-type", "application/json"),
            ];
            send(&http, Method::POST, &url, &headers, body).await.status
        }
    };
    let mut admitted = 0;
    while scan("kyiv-001").await == StatusCode::OK {
        admitted += 1;
        assert!(admitted <= 30, "no branch limit at all");
    }
    assert_eq!(admitted, 10, "three live instances: 30 / 3 each");
    // Two instances die: the survivor's share grows to the whole quota.
    gateways[1].kill();
    gateways[2].kill();
    let deadline = Instant::now() + Duration::from_secs(10);
    while gateways[0]
        .metric(http, "diia_gateway_instances_live")
        .await
        != 1.0
    {
        assert!(Instant::now() < deadline, "the dead instances still count");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut admitted = 0;
    while scan("lviv-002").await == StatusCode::OK {
        admitted += 1;
        assert!(admitted <= 31, "no branch limit at all");
    }
    assert_eq!(admitted, 30, "one live instance: the whole quota");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn managed_instances_log_in_once_for_the_fleet() {
    let api_key = "fleet-branch-key-51c9e0";
    let Some(world) = World::start(|config| {
        config.extra = format!(
            "[auth]\nmode = \"managed\"\nacquirer_token = \"{DEMO_ACQUIRER_TOKEN}\"\nauth_token = \"{DEMO_AUTH_TOKEN}\"\n\
             [[auth.api_keys]]\nbranch = \"kyiv-001\"\nsha256 = \"{}\"\n",
            hex::encode(Sha256::digest(api_key.as_bytes()))
        );
    })
    .await
    else {
        return;
    };
    let (sim, http, gateways) = (&world.sim, &world.http, &world.gateways);
    for gateway in gateways {
        let body = format!(
            r#"{{"branchId":"kyiv-001","barcode":"{}"}}"#,
            fresh_barcode()
        );
        let reply = send(
            http,
            Method::POST,
            &gateway.url("/api/v1/acquirers/document-identification"),
            &[("x-api-key", api_key), ("content-type", "application/json")],
            body,
        )
        .await;
        assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    }
    assert_eq!(
        sim.state().requests(Endpoint::TokenExchange),
        1,
        "each instance logged in on its own"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diias_back_off_on_one_instance_brakes_the_whole_fleet() {
    let Some(world) = World::start(|_| {}).await else {
        return;
    };
    let token = world.token().await;
    let (sim, http, gateways) = (&world.sim, &world.http, &world.gateways);
    sim.set_faults(diia_sim::Faults {
        quota_per_second: 1,
        quota_retry_after: Duration::from_secs(2),
        ..diia_sim::Faults::default()
    });
    let first = gateways[0].identify(http, &token, &fresh_barcode()).await;
    assert_eq!(first.status, StatusCode::OK);
    let throttled = gateways[0].identify(http, &token, &fresh_barcode()).await;
    assert_eq!(
        throttled.status,
        StatusCode::TOO_MANY_REQUESTS,
        "Diia's 429 is passed on"
    );
    let calls = sim.state().requests(Endpoint::DocumentIdentification);
    // The pause reaches Redis after the answer; the other instances then send nothing.
    let deadline = Instant::now() + Duration::from_secs(1);
    for gateway in &gateways[1..] {
        loop {
            let braked = gateway.identify(http, &token, &fresh_barcode()).await;
            if braked.status == StatusCode::SERVICE_UNAVAILABLE {
                assert_eq!(braked.gateway_code(), "diia_backoff");
                break;
            }
            assert!(Instant::now() < deadline, "{braked:?}");
        }
    }
    let leaked = sim.state().requests(Endpoint::DocumentIdentification) - calls;
    assert!(
        leaked <= 1,
        "{leaked} calls went to Diia during its back-off"
    );
}

/// The single-instance victim scenario over the fleet: one client floods every instance
/// (a new `branchId` per request), a quiet branch behind another address scans at 10/s.
/// The flood gets at most its share of the fleet's Diia budget; the quiet branch is never
/// refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_client_cannot_starve_a_quiet_branch_across_the_fleet() {
    let Some(world) = World::start(|config| {
        config.diia = r#"{ per_second = 40, burst = 10, max_wait = "200ms" }"#.to_owned();
    })
    .await
    else {
        return;
    };
    let token = world.token().await;
    let urls: Vec<String> = world
        .gateways
        .iter()
        .map(|g| g.url("/api/v1/acquirers/document-identification"))
        .collect();
    let stop = Instant::now() + Duration::from_secs(3);
    let flooders: Vec<_> = (0..24)
        .map(|n| {
            let (url, token) = (urls[n % urls.len()].clone(), token.clone());
            tokio::spawn(async move {
                let client = diia_gateway_testkit::client_from([127, 0, 0, 1]);
                let bearer = format!("Bearer {token}");
                let mut refused = 0u32;
                while Instant::now() < stop {
                    let body = format!(
                        r#"{{"branchId":"flood-{}","barcode":"{}"}}"#,
                        fastrand::u64(..),
                        fresh_barcode()
                    );
                    let headers = [
                        ("authorization", bearer.as_str()),
                        ("content-type", "application/json"),
                    ];
                    if send(&client, Method::POST, &url, &headers, body)
                        .await
                        .status
                        != StatusCode::OK
                    {
                        refused += 1;
                    }
                }
                refused
            })
        })
        .collect();
    let quiet = diia_gateway_testkit::client_from([127, 0, 0, 2]);
    let bearer = format!("Bearer {token}");
    let mut quiet_statuses = Vec::new();
    tokio::time::sleep(Duration::from_millis(300)).await;
    for n in 0..20 {
        let body = format!(r#"{{"branchId":"quiet","barcode":"{}"}}"#, fresh_barcode());
        let headers = [
            ("authorization", bearer.as_str()),
            ("content-type", "application/json"),
        ];
        let reply = send(&quiet, Method::POST, &urls[n % urls.len()], &headers, body).await;
        quiet_statuses.push(reply.status.as_u16());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut flood_refused = 0;
    for flooder in flooders {
        flood_refused += flooder.await.unwrap();
    }
    println!("fleet victim scenario: flood refused {flood_refused}; quiet {quiet_statuses:?}");
    assert!(flood_refused > 0, "the flood was over the Diia budget");
    assert!(
        quiet_statuses.iter().all(|status| *status == 200),
        "quiet branch refused: {quiet_statuses:?}"
    );
}

/// A fleet-size change rebuilds the local budgets at the new share; each branch must start
/// where it stood, scaled, not full: a branch refused on A is still refused right after a
/// third instance joins (it got 7 × 200 when the rebuilt budgets were full).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joining_instance_refills_no_branch_budget() {
    let _serial = crate::processes::SERIAL.lock().await;
    if !crate::processes::redis_available() {
        return;
    }
    let redis = crate::processes::Redis::start(&[]).await;
    let sim = crate::processes::simulator().await;
    let mut config = crate::processes::FleetConfig::new(&sim.base_url(), &redis.url());
    // A burst of 30 for the fleet: 15 per instance while two are alive, 10 with three.
    config.branch = "{ per_minute = 1, burst = 30 }".to_owned();
    config
        .scaleout_extra
        .push_str("heartbeat_interval = \"200ms\"\ninstance_ttl = \"1s\"\n");
    let mut gateways = vec![
        crate::processes::Gateway::start(&config).await,
        crate::processes::Gateway::start(&config).await,
    ];
    let http = diia_gateway_testkit::client();
    crate::processes::wait_for_fleet(&gateways, &http, 2.0).await;
    let token = gateways[0].session_token(&http).await;
    async fn scan(
        gateway: &crate::processes::Gateway,
        http: &diia_gateway_testkit::HttpClient,
        token: &str,
        branch: &str,
    ) -> u16 {
        let body = format!(
            r#"{{"branchId":"{branch}","barcode":"{}"}}"#,
            fresh_barcode()
        );
        let path = "/api/v1/acquirers/document-identification";
        gateway.post(http, path, token, &body).await.status.as_u16()
    }
    let mut admitted = 0;
    while scan(&gateways[0], &http, &token, "kyiv-001").await == 200 {
        admitted += 1;
        assert!(admitted <= 30, "no branch limit at all");
    }
    assert_eq!(admitted, 15, "two live instances: 30 / 2 each");
    gateways.push(crate::processes::Gateway::start(&config).await);
    crate::processes::wait_for_fleet(&gateways, &http, 3.0).await;
    let mut after = Vec::new();
    for _ in 0..5 {
        after.push(scan(&gateways[0], &http, &token, "kyiv-001").await);
    }
    assert!(
        after.iter().all(|status| *status == 429),
        "the spent branch got a fresh burst when the fleet grew: {after:?}"
    );
    // The new share is in force for a branch that had spent nothing.
    let mut admitted = 0;
    while scan(&gateways[0], &http, &token, "lviv-002").await == 200 {
        admitted += 1;
        assert!(admitted <= 30, "no branch limit at all");
    }
    assert_eq!(admitted, 10, "three live instances: 30 / 3 each");
}
