//! What a Redis writer can do: replay an expired answer, pull Diia's brake for a day, push
//! the budget's clock far ahead, add members to the fleet. None of it is served or
//! believed beyond its bound: no answer past its sealed expiry, no brake beyond
//! `limits.diia.max_backoff`, no budget debt beyond `burst / rate + max_wait`, no member
//! without the fleet secret's MAC.

use std::time::{Duration, Instant};

use diia_sim::route::Endpoint;
use http::StatusCode;
use redis::AsyncCommands;

use crate::processes::{World, fresh_barcode, wait_for_fleet};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_restored_after_its_expiry_is_not_served() {
    let Some(world) = World::start(|config| {
        config.cache = r#"ttl = "2s"
negative_ttl = "2s""#
            .to_owned();
    })
    .await
    else {
        return;
    };
    let token = world.token().await;
    let (sim, http, gateways, redis) = (&world.sim, &world.http, &world.gateways, &world.redis);
    let barcode = fresh_barcode();
    let before = redis.settled().await;
    let first = gateways[0].identify(http, &token, &barcode).await;
    assert_eq!(first.status, StatusCode::OK, "{first:?}");
    let after = redis.settled().await;
    let stored: Vec<&String> = after
        .iter()
        .filter(|k| k.starts_with("{dg}:r:") && !before.contains(k))
        .collect();
    assert_eq!(stored.len(), 1, "{before:?} {after:?}");
    let key = stored[0].as_str();
    let mut c = redis.connection().await;
    let dump: Vec<u8> = redis::cmd("DUMP")
        .arg(key)
        .query_async(&mut c)
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(6);
    while c.pttl::<_, i64>(key).await.unwrap() != -2 {
        assert!(Instant::now() < deadline, "{key} never expired");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The near caches keep it no longer than Redis did.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _: () = redis::cmd("RESTORE")
        .arg(key)
        .arg(60_000)
        .arg(dump)
        .query_async(&mut c)
        .await
        .unwrap();
    let calls = sim.state().requests(Endpoint::DocumentIdentification);
    let again = gateways[2].identify(http, &token, &barcode).await;
    let cache_status = again.header("cache-status").unwrap_or_default().to_owned();
    assert!(
        !cache_status.contains("hit"),
        "an expired answer was served: {again:?}"
    );
    assert_eq!(
        sim.state().requests(Endpoint::DocumentIdentification),
        calls + 1,
        "{again:?}"
    );
}

/// `limits.diia.max_backoff` of 2 s.
fn short_backoff(config: &mut crate::processes::FleetConfig) {
    config.diia =
        r#"{ per_second = 10000, burst = 10000, max_wait = "200ms", max_backoff = "2s" }"#
            .to_owned();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_day_long_brake_stops_diia_calls_for_at_most_max_backoff() {
    let Some(world) = World::start(short_backoff).await else {
        return;
    };
    // The first instance's token is new to the second one: its calls there spend the
    // unverified budget, which reads the brake on its own; once Diia accepted it on every
    // instance, its calls spend the fleet budget, whose script reads the brake. Both
    // must resume after `max_backoff`.
    let token = world.token().await;
    brake_for_a_day_then_call(&world, &token, "unverified").await;
    brake_for_a_day_then_call(&world, &token, "verified").await;
}

/// Pulls the fleet's brake for a day, then calls through the second instance until Diia
/// is called again (within 6 s), then through every instance.
async fn brake_for_a_day_then_call(world: &World, token: &str, label: &str) {
    let (sim, http, gateways, redis) = (&world.sim, &world.http, &world.gateways, &world.redis);
    let mut c = redis.connection().await;
    let _: () = redis::cmd("SET")
        .arg("{dg}:brake")
        .arg("1")
        .arg("PX")
        .arg(86_400_000)
        .query_async(&mut c)
        .await
        .unwrap();
    let pulled = Instant::now();
    let calls = sim.state().requests(Endpoint::DocumentIdentification);
    let mut refused = 0;
    loop {
        let reply = gateways[1].identify(http, token, &fresh_barcode()).await;
        if reply.status == StatusCode::OK {
            break;
        }
        assert_eq!(reply.gateway_code(), "diia_backoff", "{reply:?}");
        refused += 1;
        assert!(
            pulled.elapsed() < Duration::from_secs(6),
            "{label}: Diia calls still paused after {:?}",
            pulled.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "{label}: a day-long brake: Diia calls resumed after {:?} ({refused} refused)",
        pulled.elapsed()
    );
    assert!(refused > 0, "{label}: the brake was not honoured at all");
    assert_eq!(
        sim.state().requests(Endpoint::DocumentIdentification),
        calls + 1
    );
    // Every instance calls again.
    for gateway in gateways {
        let reply = gateway.identify(http, token, &fresh_barcode()).await;
        assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_clock_pushed_far_ahead_is_reset() {
    let Some(world) = World::start(short_backoff).await else {
        return;
    };
    let token = world.token().await;
    let (http, gateways, redis) = (&world.http, &world.gateways, &world.redis);
    let mut c = redis.connection().await;
    // A lifetime ahead, then not a number: each read as corrupt and reset as a missing key
    // (which starts empty: the first call waits one interval, well within max_wait).
    for forged in ["99999999999999999999", "nan", "junk"] {
        let _: () = c.set("{dg}:budget", forged).await.unwrap();
        for gateway in gateways {
            let reply = gateway.identify(http, &token, &fresh_barcode()).await;
            assert_eq!(reply.status, StatusCode::OK, "{forged}: {reply:?}");
        }
    }
    // A key of another type is replaced, not an error that marks Redis down.
    let _: () = c.del("{dg}:budget").await.unwrap();
    let _: () = c.rpush("{dg}:budget", "x").await.unwrap();
    let reply = gateways[0].identify(http, &token, &fresh_barcode()).await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert_eq!(gateways[0].metric(http, "diia_gateway_redis_up").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fake_fleet_members_do_not_divide_local_limits() {
    let Some(world) = World::start(|_| {}).await else {
        return;
    };
    let (http, gateways, redis) = (&world.http, &world.gateways, &world.redis);
    let mut c = redis.connection().await;
    let (secs, _micros): (u64, u64) = redis::cmd("TIME").query_async(&mut c).await.unwrap();
    // Scored a day ahead, so no heartbeat prunes them.
    let score = (secs + 86_400) * 1000;
    for i in 0..20 {
        let _: () = c
            .zadd("{dg}:fleet", format!("{:016x}", 0xfa4e_0000_u64 + i), score)
            .await
            .unwrap();
    }
    let members: u64 = c.zcard("{dg}:fleet").await.unwrap();
    assert!(members >= 23, "{members}");
    // Three heartbeats later the fleet is still three.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    wait_for_fleet(gateways, http, 3.0).await;
    for gateway in gateways {
        assert_eq!(
            gateway.metric(http, "diia_gateway_instances_live").await,
            3.0
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_no_instance_could_have_written_denies_nothing() {
    let Some(world) = World::start(|_| {}).await else {
        return;
    };
    let token = world.token().await;
    let (sim, http, gateways, redis) = (&world.sim, &world.http, &world.gateways, &world.redis);
    let mut c = redis.connection().await;
    // junk without a TTL; the holder text of an untagged request without a TTL; another
    // type; junk for longer than any lease; junk for a second (a lease's life at most).
    let writes: [(&str, &[&str]); 5] = [
        ("SET", &["junk"]),
        ("SET", &["-:0"]),
        ("LPUSH", &["junk"]),
        ("SET", &["junk", "PX", "86400000"]),
        ("SET", &["junk", "PX", "1000"]),
    ];
    for (command, args) in writes {
        // The barcode's answer is stored; its lease key has the same name but for the kind.
        let barcode = fresh_barcode();
        let before = redis.settled().await;
        let first = gateways[0].identify(http, &token, &barcode).await;
        assert_eq!(first.status, StatusCode::OK, "{first:?}");
        let after = redis.settled().await;
        let stored: Vec<&String> = after
            .iter()
            .filter(|k| k.starts_with("{dg}:r:") && !before.contains(k))
            .collect();
        assert_eq!(stored.len(), 1, "{before:?} {after:?}");
        let lease = stored[0].replacen("{dg}:r:", "{dg}:l:", 1);
        let _: () = c.del(stored[0]).await.unwrap();
        let _: () = redis::cmd(command)
            .arg(&lease)
            .arg(args)
            .query_async(&mut c)
            .await
            .unwrap();
        let calls = sim.state().requests(Endpoint::DocumentIdentification);
        let started = Instant::now();
        let again = gateways[1].identify(http, &token, &barcode).await;
        let took = started.elapsed();
        // Led (Diia asked again: the writer deleted the answer), neither refused as
        // another request's share nor timed out.
        assert_ne!(
            again.status,
            StatusCode::CONFLICT,
            "{command} {args:?}: {again:?}"
        );
        assert_ne!(
            again.status,
            StatusCode::GATEWAY_TIMEOUT,
            "{command} {args:?}: {again:?}"
        );
        assert_eq!(
            sim.state().requests(Endpoint::DocumentIdentification),
            calls + 1,
            "{command} {args:?}: {again:?}"
        );
        assert!(
            took < Duration::from_secs(3),
            "{command} {args:?}: {took:?}"
        );
    }
}
