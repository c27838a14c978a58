//! What Redis holds: no barcode, requestId, token or credential in clear, even in a
//! dump; the same secret gives the same keys (and log fingerprints) on every instance, and
//! another secret other keys; a restricted ACL user is enough.

use http::StatusCode;
use serde_json::json;

use crate::processes::{
    FleetConfig, Gateway, Redis, SERIAL, fresh_barcode, redis_available, simulator, wait_for_fleet,
};
use diia_gateway_testkit::client;
use diia_sim::{DEMO_ACQUIRER_TOKEN, DEMO_AUTH_TOKEN};

/// The ACL line the README documents (password here: `gateway-test-password`).
pub const ACL: &[&str] = &[
    "ACL",
    "SETUSER",
    "diia-gateway",
    "on",
    ">gateway-test-password",
    "resetkeys",
    "~{dg}:*",
    "resetchannels",
    "&{dg}:c:*",
    "-@all",
    "+@connection",
    "+get",
    "+set",
    "+del",
    "+pttl",
    "+zadd",
    "+zrem",
    "+zremrangebyscore",
    "+zrangebyscore",
    "+pexpire",
    "+hset",
    "+hgetall",
    "+hdel",
    "+publish",
    "+psubscribe",
    "+punsubscribe",
    "+time",
    "+eval",
    "+evalsha",
    "+script|load",
];

fn barcode_fingerprints(log: &str, line_filter: &str) -> Vec<String> {
    log.lines()
        .filter(|line| line.contains("document_identification") && line.contains(line_filter))
        .filter_map(|line| {
            let value: serde_json::Value = serde_json::from_str(line).ok()?;
            let fields = value.get("fields").unwrap_or(&value);
            fields.get("barcode")?.as_str().map(str::to_owned)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_holds_nothing_in_clear_and_keys_follow_the_secret() {
    let _serial = SERIAL.lock().await;
    if !redis_available() {
        return;
    }
    let redis = Redis::start(&["--rdbcompression", "no"]).await;
    assert_eq!(redis.command(ACL).await.as_deref(), Some("+OK"));
    let sim = simulator().await;
    let mut config = FleetConfig::new(
        &sim.base_url(),
        &format!("redis://diia-gateway@127.0.0.1:{}", redis.port),
    );
    let password_dir = tempfile::tempdir().unwrap();
    let password_file = password_dir.path().join("redis-password");
    std::fs::write(&password_file, "gateway-test-password\n").unwrap();
    config.scaleout_extra = format!("redis_password_file = \"{}\"", password_file.display());
    let mut other_secret = config.clone();
    other_secret.secret = "5a".repeat(16) + &"c4".repeat(16);
    let gateways = vec![
        Gateway::start(&config).await,
        Gateway::start(&config).await,
        Gateway::start(&other_secret).await,
    ];
    let http = client();
    // Fleet members are signed under the secret: each secret counts its own instances.
    wait_for_fleet(&gateways[..2], &http, 2.0).await;
    wait_for_fleet(&gateways[2..], &http, 1.0).await;
    let (one, two, three) = (&gateways[0], &gateways[1], &gateways[2]);
    for gateway in &gateways {
        assert_eq!(
            gateway.metric(&http, "diia_gateway_redis_up").await,
            1.0,
            "{}",
            gateway.log()
        );
    }
    let token = one.session_token(&http).await;
    let barcode = fresh_barcode();
    let first = one.identify(&http, &token, &barcode).await;
    assert_eq!(first.status, StatusCode::OK);
    let keys_before = redis.settled().await;
    let second = two.identify(&http, &token, &barcode).await;
    assert_eq!(second.status, StatusCode::OK);
    assert_eq!(
        second.header("cache-status"),
        Some("diia-gateway; hit; detail=remote")
    );
    assert_eq!(
        redis.keys().await,
        keys_before,
        "the same secret found the same key"
    );
    // Another secret: another key (it misses, reaches Diia, which says "used").
    let third = three.identify(&http, &token, &barcode).await;
    assert_ne!(
        third.header("cache-status"),
        Some("diia-gateway; hit; detail=remote")
    );
    let keys_after = redis.settled().await;
    let new: Vec<_> = keys_after
        .iter()
        .filter(|k| !keys_before.contains(k))
        .collect();
    assert!(new.iter().any(|k| k.starts_with("{dg}:r:")), "{new:?}");
    // A sharing request, so a requestId passed through too.
    let request_id = "req-privacy-7f3a";
    let share = json!({"branchId": "branch-secret-42", "barcode": fresh_barcode(), "requestId": request_id}).to_string();
    let shared = one
        .post(&http, "/api/v1/acquirers/document-request", &token, &share)
        .await;
    assert_eq!(shared.status, StatusCode::OK, "{shared:?}");
    // Log fingerprints agree across instances with the same secret.
    // Log lines are written in batches: wait until each instance's access line is out.
    let logged = std::time::Instant::now();
    while [one, two, three]
        .iter()
        .any(|g| barcode_fingerprints(&g.log(), "").is_empty())
    {
        assert!(
            logged.elapsed() < std::time::Duration::from_secs(3),
            "access lines missing"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let (log_one, log_two, log_three) = (one.log(), two.log(), three.log());
    let print = |log: &str| barcode_fingerprints(log, "");
    assert!(!print(&log_one).is_empty(), "no access line: {log_one}");
    assert_eq!(
        print(&log_one)[0],
        print(&log_two)[0],
        "fingerprints differ across instances"
    );
    assert_ne!(print(&log_one)[0], print(&log_three)[0]);
    for log in [&log_one, &log_two, &log_three] {
        assert!(!log.contains(&barcode) && !log.contains(&token));
    }
    // A dump of everything Redis holds.
    assert_eq!(redis.command(&["SAVE"]).await.as_deref(), Some("+OK"));
    let dump = std::fs::read(redis.dir().join("dump.rdb")).unwrap();
    assert!(dump.len() > 200, "empty dump");
    let dump = String::from_utf8_lossy(&dump);
    for secret in [
        barcode.as_str(),
        &barcode[..12],
        token.as_str(),
        request_id,
        "branch-secret-42",
        DEMO_ACQUIRER_TOKEN,
        DEMO_AUTH_TOKEN,
        "gateway-test-password",
    ] {
        assert!(!dump.contains(secret), "{secret} is in the Redis dump");
    }
}
