//! Callers nobody has authenticated, and budgets that one caller's failures must not
//! spend for another: junk bearer tokens from many addresses, a token Diia refused,
//! polls of one `requestId`, logins with made-up credentials. Real gateway, real simulator,
//! real sockets.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use diia_sim::DEMO_ACQUIRER_TOKEN;
use http::{Method, StatusCode};

use crate::support::{Harness, client, client_from, send};

/// An EAN-13 barcode the simulator (with `auto_issue`) treats as freshly issued.
fn barcode(n: u64) -> String {
    let base = 480_000_000_000 + n;
    let sum: u64 = base
        .to_string()
        .bytes()
        .enumerate()
        .map(|(i, d)| u64::from(d - b'0') * if i % 2 == 0 { 1 } else { 3 })
        .sum();
    format!("{base}{}", (10 - sum % 10) % 10)
}

/// The issue's attack: the Diia budget at 40/s; 40 source addresses (127.0.1.1 to
/// 127.0.1.40) send identifications with a fresh junk bearer token each; a legitimate
/// backend with a real session token (from the gateway's own token exchange) scans at
/// 30/s. It keeps ≥ 95 % 200, and Diia sees junk calls at the unverified rate at most.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn junk_tokens_from_forty_addresses_cannot_starve_a_real_token() {
    let h = Harness::with(
        |sim| sim.auto_issue = true,
        |config| {
            config.limits.diia.per_second = 40.try_into().unwrap();
            config.limits.diia.burst = 10.try_into().unwrap();
        },
    )
    .await;
    let token = h.session_token().await;
    let url = h.url("/api/v1/acquirers/document-identification");
    let before = h.sim_calls("document_identification").await;
    let seconds = 4;
    let started = Instant::now();
    let stop = Instant::now() + Duration::from_secs(seconds);
    let junk_sent = Arc::new(AtomicU64::new(0));
    let flooders: Vec<_> = (1..=40u8)
        .map(|n| {
            let (url, sent) = (url.clone(), Arc::clone(&junk_sent));
            tokio::spawn(async move {
                let http = client_from([127, 0, 1, n]);
                let mut i = 0u64;
                while Instant::now() < stop {
                    i += 1;
                    let bearer = format!("Bearer junk-{n}-{i}-{}", fastrand::u64(..));
                    let body = format!(
                        r#"{{"branchId":"junk-{n}","barcode":"{}"}}"#,
                        barcode(u64::from(n) * 1_000_000 + i)
                    );
                    let headers = [
                        ("authorization", bearer.as_str()),
                        ("content-type", "application/json"),
                    ];
                    send(&http, Method::POST, &url, &headers, body).await;
                    sent.fetch_add(1, Ordering::Relaxed);
                    // ~20 req/s per address, 800/s in all: twenty times the Diia budget.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
        })
        .collect();
    let statuses = legitimate_scans(&h, &token, stop, 900_000_000).await;
    let ok = statuses.get(&200).copied().unwrap_or(0);
    for flooder in flooders {
        flooder.await.unwrap();
    }
    let elapsed = started.elapsed().as_secs() + 1;
    let total = statuses.values().sum::<u64>();
    let diia = h.sim_calls("document_identification").await - before;
    // Each legitimate 200 is one Diia call (fresh barcodes); everything else was junk.
    let junk_calls = diia.saturating_sub(ok);
    #[allow(clippy::cast_precision_loss)]
    let (ratio, junk_rate) = (ok as f64 / total as f64, junk_calls as f64 / seconds as f64);
    println!(
        "junk flood: legit {ok}/{total} 200 ({:.1} %, statuses {statuses:?}); junk sent {}, \
         junk Diia calls {junk_calls} ({junk_rate:.1}/s)",
        ratio * 100.0,
        junk_sent.load(Ordering::Relaxed)
    );
    assert!(ratio >= 0.95, "legit 200s {ok}/{total}: {statuses:?}");
    // limits.unverified defaults: 5/s, burst 10 (over the whole measured time, rounded up).
    assert!(
        junk_calls <= 5 * elapsed + 10,
        "{junk_calls} junk calls reached Diia in {elapsed} s"
    );
}

/// A session token Diia refused with 401 is answered 401 by the gateway itself the next
/// time, with its own code, and Diia sees no second call.
#[tokio::test]
async fn a_refused_session_token_is_answered_locally() {
    let h = Harness::start().await;
    let barcode = h.issue_barcode().await;
    let first = h
        .identify("dead-session-token-1", "kyiv-001", &barcode)
        .await;
    assert_eq!(first.status, StatusCode::UNAUTHORIZED, "{first:?}");
    let calls = h.sim_calls("document_identification").await;
    let second = h
        .identify("dead-session-token-1", "kyiv-001", &barcode)
        .await;
    assert_eq!(second.status, StatusCode::UNAUTHORIZED, "{second:?}");
    assert_eq!(second.gateway_code(), "session_token_refused");
    assert_eq!(
        h.sim_calls("document_identification").await,
        calls,
        "the refused token reached Diia again"
    );
    // A token that works is not affected.
    let token = h.session_token().await;
    let ok = h.identify(&token, "kyiv-001", &barcode).await;
    assert_eq!(ok.status, StatusCode::OK, "{ok:?}");
}

/// Status polls are budgeted per client and `requestId`: a client hammering one request's
/// status is refused for that one only; its other requests still poll.
#[tokio::test]
async fn polling_one_request_id_does_not_refuse_another() {
    let h = Harness::with(
        |_| {},
        |config| {
            config.limits.poll.per_minute = 6.try_into().unwrap();
            config.limits.poll.burst = 3.try_into().unwrap();
        },
    )
    .await;
    let token = h.session_token().await;
    let bearer = format!("Bearer {token}");
    let poll = |request_id: &str| {
        let url = h.url(&format!(
            "/api/v1/acquirers/document-request/status?barcode={}&requestId={request_id}",
            barcode(77)
        ));
        let bearer = bearer.clone();
        async move {
            send(
                &client(),
                Method::GET,
                &url,
                &[("authorization", bearer.as_str())],
                String::new(),
            )
            .await
        }
    };
    let mut refused = None;
    for _ in 0..10 {
        let reply = poll("flood-x").await;
        if reply.status == StatusCode::TOO_MANY_REQUESTS {
            refused = Some(reply);
            break;
        }
    }
    let refused = refused.expect("polling one requestId is limited");
    assert_eq!(refused.gateway_code(), "poll_rate_limited");
    let other = poll("quiet-y").await;
    assert_ne!(
        other.status,
        StatusCode::TOO_MANY_REQUESTS,
        "another requestId of the same client was refused: {other:?}"
    );
}

/// Behind a load balancer every branch is one client: 20 logins with made-up credentials
/// must not get the real credentials' uncached login refused. Made-up credentials tried
/// again and again are refused without a Diia call once Diia refused them
/// (`credentials_refused`, for `tokens.refused_ttl`).
#[tokio::test]
async fn failed_logins_do_not_refuse_working_credentials() {
    let h = Harness::with(
        |_| {},
        |config| {
            config.limits.login.per_minute = 1.try_into().unwrap();
            config.limits.login.burst = 20.try_into().unwrap();
            // Room for every made-up login to reach Diia (they spend the unverified
            // budget; the flood case is `junk_logins_from_forty_addresses_…`).
            config.limits.unverified.per_second = 100.try_into().unwrap();
            config.limits.unverified.burst = 100.try_into().unwrap();
        },
    )
    .await;
    let url = h.url(&format!("/api/v1/auth/acquirer/{DEMO_ACQUIRER_TOKEN}"));
    let login = |basic: String| {
        let url = url.clone();
        async move {
            send(
                &client(),
                Method::GET,
                &url,
                &[("authorization", basic.as_str())],
                String::new(),
            )
            .await
        }
    };
    for n in 0..20 {
        let junk = login(format!("Basic junk-credential-{n}-{}", fastrand::u64(..))).await;
        assert_eq!(junk.status, StatusCode::UNAUTHORIZED, "{junk:?}");
    }
    // The real credentials' first login: not cached, so it must reach Diia.
    let real = h.session_token().await;
    assert!(!real.is_empty());
    // One made-up credential tried 25 times: Diia refuses it once, the gateway the rest.
    let calls = h.sim_calls("token_exchange").await;
    let mut local = 0;
    for _ in 0..25 {
        let reply = login("Basic the-same-wrong-credential".to_owned()).await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{reply:?}");
        if reply.gateway_code() == "credentials_refused" {
            local += 1;
        }
    }
    let reached = h.sim_calls("token_exchange").await - calls;
    assert_eq!(local, 24, "refused locally after Diia's refusal");
    assert_eq!(reached, 1, "refused logins reached Diia");
    // The real credentials still log in (cached now, and never refused).
    assert!(!h.session_token().await.is_empty());
}

/// The token exchange needs no authentication: 40 addresses (127.0.1.1 to 127.0.1.40)
/// send it with made-up acquirer tokens and Basic credentials while a legitimate backend
/// scans at 30/s with a real session token. Logins whose credentials never worked spend
/// `limits.unverified` (5/s), never the Diia budget: the scans keep ≥ 95 % 200, and Diia
/// sees the junk logins at the unverified rate at most.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn junk_logins_from_forty_addresses_cannot_starve_a_real_token() {
    let h = Harness::with(
        |sim| sim.auto_issue = true,
        |config| {
            config.limits.diia.per_second = 40.try_into().unwrap();
            config.limits.diia.burst = 10.try_into().unwrap();
        },
    )
    .await;
    let token = h.session_token().await;
    let exchanges_before = h.sim_calls("token_exchange").await;
    let seconds = 4;
    let started = Instant::now();
    let stop = Instant::now() + Duration::from_secs(seconds);
    let flooders: Vec<_> = (1..=40u8)
        .map(|n| {
            let base = h.url("/api/v1/auth/acquirer");
            tokio::spawn(async move {
                let http = client_from([127, 0, 1, n]);
                let mut i = 0u64;
                while Instant::now() < stop {
                    i += 1;
                    let url = format!("{base}/junk{n}_{i}_{}", fastrand::u32(..));
                    let basic = format!("Basic {:x}", fastrand::u64(..));
                    send(
                        &http,
                        Method::GET,
                        &url,
                        &[("authorization", basic.as_str())],
                        String::new(),
                    )
                    .await;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
        })
        .collect();
    let statuses = legitimate_scans(&h, &token, stop, 800_000_000).await;
    for flooder in flooders {
        flooder.await.unwrap();
    }
    let elapsed = started.elapsed().as_secs() + 1;
    let ok = statuses.get(&200).copied().unwrap_or(0);
    let total = statuses.values().sum::<u64>();
    let junk = h.sim_calls("token_exchange").await - exchanges_before;
    println!("junk logins: legit {ok}/{total} 200 ({statuses:?}); junk logins at Diia {junk}");
    #[allow(clippy::cast_precision_loss)]
    let ratio = ok as f64 / total as f64;
    assert!(ratio >= 0.95, "legit 200s {ok}/{total}: {statuses:?}");
    assert!(
        junk <= 5 * elapsed + 10,
        "{junk} junk logins reached Diia in {elapsed} s"
    );
}

/// Credentials Diia refused are answered 401 `credentials_refused` by the gateway for
/// `tokens.refused_ttl`, without a Diia call; the working credentials still log in.
#[tokio::test]
async fn refused_credentials_are_answered_locally() {
    let h = Harness::start().await;
    let url = h.url(&format!("/api/v1/auth/acquirer/{DEMO_ACQUIRER_TOKEN}"));
    let login = |basic: &str| {
        let (url, basic) = (url.clone(), basic.to_owned());
        async move {
            send(
                &client(),
                Method::GET,
                &url,
                &[("authorization", basic.as_str())],
                String::new(),
            )
            .await
        }
    };
    let first = login("Basic wrong-credential").await;
    assert_eq!(first.status, StatusCode::UNAUTHORIZED, "{first:?}");
    let calls = h.sim_calls("token_exchange").await;
    let second = login("Basic wrong-credential").await;
    assert_eq!(second.status, StatusCode::UNAUTHORIZED, "{second:?}");
    assert_eq!(second.gateway_code(), "credentials_refused");
    assert_eq!(h.sim_calls("token_exchange").await, calls, "reached Diia");
    assert!(!h.session_token().await.is_empty());
}

/// Junk or refused session tokens naming a branch must not spend that branch's budget:
/// 60 identifications with junk tokens (half of them one token Diia refused) for a victim
/// branch, then the real token's scan for that branch is still answered 200.
#[tokio::test]
async fn junk_tokens_cannot_lock_a_branch_out() {
    let h = Harness::with(
        |sim| sim.auto_issue = true,
        |config| {
            // The reference config's branch budget.
            config.limits.branch.per_minute = 120.try_into().unwrap();
            config.limits.branch.burst = 20.try_into().unwrap();
        },
    )
    .await;
    let token = h.session_token().await;
    let url = h.url("/api/v1/acquirers/document-identification");
    let attacker = client_from([127, 0, 2, 1]);
    let mut codes = std::collections::BTreeMap::<String, u64>::new();
    for i in 0..60u64 {
        let bearer = if i % 2 == 0 {
            format!("Bearer junk-{i}")
        } else {
            "Bearer junk-refused".to_owned()
        };
        let body = format!(
            r#"{{"branchId":"victim-1","barcode":"{}"}}"#,
            barcode(700_000_000 + i)
        );
        let headers = [
            ("authorization", bearer.as_str()),
            ("content-type", "application/json"),
        ];
        let reply = send(&attacker, Method::POST, &url, &headers, body).await;
        *codes
            .entry(format!("{} {}", reply.status, reply.gateway_code()))
            .or_default() += 1;
    }
    println!("attacker: {codes:?}");
    assert!(
        !codes.keys().any(|code| code.starts_with("429")),
        "junk tokens spent a budget: {codes:?}"
    );
    for k in 0..3 {
        let scan = h.identify(&token, "victim-1", &barcode(800_000 + k)).await;
        assert_eq!(scan.status, StatusCode::OK, "{scan:?}");
    }
}

/// Only refusals (401/403) count against a login: Diia failing (500) is not the
/// credentials' fault, so once it recovers the real credentials log in.
#[tokio::test]
async fn a_failing_diia_does_not_count_as_a_refused_login() {
    let h = Harness::with(
        |_| {},
        |config| {
            config.limits.login.per_minute = 1.try_into().unwrap();
            config.limits.login.burst = 2.try_into().unwrap();
            config.upstream.breaker_failures = 1000;
        },
    )
    .await;
    h.set_faults(serde_json::json!({"error_rate": 1.0})).await;
    let url = format!("/api/v1/auth/acquirer/{DEMO_ACQUIRER_TOKEN}");
    let basic = format!("Basic {}", diia_sim::DEMO_AUTH_TOKEN);
    for _ in 0..4 {
        let reply = h
            .send(Method::GET, &url, &[("authorization", basic.as_str())], "")
            .await;
        assert_ne!(reply.status, StatusCode::OK, "{reply:?}");
    }
    h.set_faults(serde_json::json!({})).await;
    let reply = h
        .send(Method::GET, &url, &[("authorization", basic.as_str())], "")
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
}

/// The legitimate backend of the flood tests: one scan of a fresh barcode (numbered from
/// `first`) every 33 ms from 127.0.0.1 until `stop`, each on its own task so that a slow
/// answer does not slow the rate. Returns the count of each status.
async fn legitimate_scans(
    h: &Harness,
    token: &str,
    stop: Instant,
    first: u64,
) -> std::collections::BTreeMap<u16, u64> {
    let (legit, url) = (
        client_from([127, 0, 0, 1]),
        h.url("/api/v1/acquirers/document-identification"),
    );
    let bearer = format!("Bearer {token}");
    let mut scans = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(33));
    let mut n = 0u64;
    while Instant::now() < stop {
        tick.tick().await;
        n += 1;
        let (http, url, bearer) = (legit.clone(), url.clone(), bearer.clone());
        scans.push(tokio::spawn(async move {
            let body = format!(
                r#"{{"branchId":"kyiv-001","barcode":"{}"}}"#,
                barcode(first + n)
            );
            let headers = [
                ("authorization", bearer.as_str()),
                ("content-type", "application/json"),
            ];
            send(&http, Method::POST, &url, &headers, body).await.status
        }));
    }
    let mut statuses = std::collections::BTreeMap::new();
    for scan in scans {
        *statuses.entry(scan.await.unwrap().as_u16()).or_default() += 1;
    }
    statuses
}
