//! Rate limits: per branch first, then the budget toward Diia, and Diia's own brake.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use serde_json::json;
use support::Harness;

#[tokio::test]
async fn branch_over_its_budget_gets_429_with_headers() {
    let h = Harness::with(
        |_| {},
        |c| {
            c.limits.branch.per_minute = 6.try_into().unwrap();
            c.limits.branch.burst = 2.try_into().unwrap();
        },
    )
    .await;
    let token = h.session_token().await;
    let barcode = h.issue_barcode().await;
    assert_eq!(
        h.identify(&token, "busy", &barcode).await.status,
        StatusCode::OK
    );
    assert_eq!(
        h.identify(&token, "busy", &barcode).await.status,
        StatusCode::OK
    );
    let limited = h.identify(&token, "busy", &barcode).await;
    assert_eq!(limited.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(limited.gateway_code(), "branch_rate_limited");
    let retry_after: u64 = limited
        .header("retry-after")
        .expect("Retry-After")
        .parse()
        .expect("seconds");
    assert!((1..=10).contains(&retry_after), "Retry-After {retry_after}");
    assert_eq!(
        limited.header("ratelimit-policy"),
        Some("\"branch\";q=6;w=60")
    );
    assert_eq!(
        limited.header("ratelimit"),
        Some(format!("\"branch\";r=0;t={retry_after}").as_str())
    );
    // Another branch has its own budget (Diia answers it: the code is used by now).
    let quiet = h.identify(&token, "quiet", &barcode).await;
    assert_eq!(quiet.status, StatusCode::BAD_REQUEST);
    assert_eq!(quiet.json()["message"], "This code has been used already!");
    assert_eq!(
        h.sim_calls("document_identification").await,
        2,
        "the limited request cost Diia nothing"
    );
}

#[tokio::test]
async fn empty_diia_budget_waits_then_503() {
    let h = Harness::with(
        |_| {},
        |c| {
            c.limits.diia.per_second = 1.try_into().unwrap();
            c.limits.diia.burst = 1.try_into().unwrap();
            c.limits.diia.max_wait = Duration::from_millis(100);
        },
    )
    .await;
    // The first login of these credentials spends `limits.unverified`, not the Diia budget.
    let token = h.session_token().await;
    let first = h.issue_barcode().await;
    let second = h.issue_barcode().await;
    assert_eq!(h.identify(&token, "b", &first).await.status, StatusCode::OK);
    let started = std::time::Instant::now();
    let refused = h.identify(&token, "b", &second).await;
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(refused.gateway_code(), "diia_budget_exhausted");
    assert!(refused.header("retry-after").is_some_and(|v| v != "0"));
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "waited at most max_wait"
    );
    assert_eq!(h.sim_calls("document_identification").await, 1);
    // The budget refills at 1/s: a short wait is absorbed instead of refused.
    tokio::time::sleep(Duration::from_millis(950)).await;
    let h2 = h.identify(&token, "b", &second).await;
    assert_eq!(h2.status, StatusCode::OK, "{:?}", h2.body);
}

#[tokio::test]
async fn a_short_wait_for_diia_budget_is_absorbed() {
    let h = Harness::with(
        |_| {},
        |c| {
            c.limits.diia.per_second = 5.try_into().unwrap();
            c.limits.diia.burst = 1.try_into().unwrap();
            c.limits.diia.max_wait = Duration::from_millis(500);
        },
    )
    .await;
    let (spend, barcode) = (h.issue_barcode().await, h.issue_barcode().await);
    // The first login spends `limits.unverified`; this scan spends the burst.
    let token = h.session_token().await;
    assert_eq!(h.identify(&token, "b", &spend).await.status, StatusCode::OK);
    let started = std::time::Instant::now();
    // The budget refills one call every 200ms: this request waits, then goes through.
    let reply = h.identify(&token, "b", &barcode).await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    assert!(
        started.elapsed() >= Duration::from_millis(100),
        "it had to wait for budget"
    );
    assert_eq!(h.sim_calls("document_identification").await, 2);
}

#[tokio::test]
async fn diia_429_pauses_all_upstream_calls() {
    let h = Harness::start().await;
    let token = h.session_token().await;
    let barcodes = [
        h.issue_barcode().await,
        h.issue_barcode().await,
        h.issue_barcode().await,
    ];
    h.set_faults(json!({"quota_per_second": 1, "quota_retry_after": "2s"}))
        .await;
    assert_eq!(
        h.identify(&token, "b", &barcodes[0]).await.status,
        StatusCode::OK
    );
    let throttled = h.identify(&token, "b", &barcodes[1]).await;
    assert_eq!(
        throttled.status,
        StatusCode::TOO_MANY_REQUESTS,
        "Diia's 429 is passed on"
    );
    assert_eq!(throttled.header("retry-after"), Some("2"));
    let calls_before = h.sim_calls("document_identification").await;
    // Gateway-wide brake: the next call, for another barcode and branch, is not sent.
    let braked = h.identify(&token, "other-branch", &barcodes[2]).await;
    assert_eq!(braked.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(braked.gateway_code(), "diia_backoff");
    let wait: u64 = braked
        .header("retry-after")
        .expect("Retry-After")
        .parse()
        .expect("seconds");
    assert!((1..=2).contains(&wait));
    assert_eq!(h.sim_calls("document_identification").await, calls_before);
    // Cache hits are still served during the pause.
    assert_eq!(
        h.identify(&token, "b", &barcodes[0]).await.status,
        StatusCode::OK
    );
    tokio::time::sleep(Duration::from_millis(2100)).await;
    h.set_faults(json!({})).await;
    assert_eq!(
        h.identify(&token, "other-branch", &barcodes[2])
            .await
            .status,
        StatusCode::OK
    );
}

fn random_barcode() -> String {
    loop {
        if let Some(code) = diia_sim::Code::issue(fastrand::u64(100_000_000_000..=999_999_999_999))
        {
            return code.digits();
        }
    }
}

/// The victim scenario: one client floods with a new `branchId` on every request (so no
/// branch budget ever stops it), another branch behind another address scans at a quiet
/// 10/s. The flooder gets at most its share of the Diia budget; the quiet branch is
/// never refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_client_cannot_starve_a_quiet_branch() {
    let h = Arc::new(
        Harness::with(
            |s| s.auto_issue = true,
            |c| {
                c.limits.diia.per_second = 40.try_into().unwrap();
                c.limits.diia.burst = 10.try_into().unwrap();
                c.limits.diia.max_wait = Duration::from_millis(200);
            },
        )
        .await,
    );
    let token = h.session_token().await;
    let url = h.url("/api/v1/acquirers/document-identification");
    let stop = Instant::now() + Duration::from_secs(3);
    let flooders: Vec<_> = (0..32)
        .map(|_| {
            let (url, token) = (url.clone(), token.clone());
            tokio::spawn(async move {
                let client = support::client_from([127, 0, 0, 1]);
                let bearer = format!("Bearer {token}");
                let (mut ok, mut refused) = (0u32, 0u32);
                while Instant::now() < stop {
                    let body = format!(
                        r#"{{"branchId":"flood-{}","barcode":"{}"}}"#,
                        fastrand::u64(..),
                        random_barcode()
                    );
                    let headers = [
                        ("authorization", bearer.as_str()),
                        ("content-type", "application/json"),
                    ];
                    let reply = support::send(&client, Method::POST, &url, &headers, body).await;
                    if reply.status == StatusCode::OK {
                        ok += 1;
                    } else {
                        refused += 1;
                    }
                }
                (ok, refused)
            })
        })
        .collect();
    let quiet = support::client_from([127, 0, 0, 2]);
    let bearer = format!("Bearer {token}");
    let mut quiet_statuses = Vec::new();
    tokio::time::sleep(Duration::from_millis(300)).await;
    for _ in 0..20 {
        let body = format!(r#"{{"branchId":"quiet","barcode":"{}"}}"#, random_barcode());
        let headers = [
            ("authorization", bearer.as_str()),
            ("content-type", "application/json"),
        ];
        let reply = support::send(&quiet, Method::POST, &url, &headers, body).await;
        quiet_statuses.push(reply.status.as_u16());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (mut flood_ok, mut flood_refused) = (0, 0);
    for flooder in flooders {
        let (ok, refused) = flooder.await.unwrap();
        flood_ok += ok;
        flood_refused += refused;
    }
    println!(
        "victim scenario: flooder {flood_ok} ok / {flood_refused} refused; quiet {quiet_statuses:?}"
    );
    assert!(flood_refused > 0, "the flood was over the Diia budget");
    assert!(
        quiet_statuses.iter().all(|status| *status == 200),
        "quiet branch refused: {quiet_statuses:?}"
    );
}

/// Status polls, logins and scans spend separate budgets: a client that polled its
/// budget away still logs in (a cached login is never refused), and new logins are
/// limited on their own.
#[tokio::test]
async fn polls_logins_and_scans_do_not_share_a_budget() {
    let h = Harness::with(
        |_| {},
        |c| {
            c.limits.poll.per_minute = 10.try_into().unwrap();
            c.limits.poll.burst = 5.try_into().unwrap();
            c.limits.login.per_minute = 1.try_into().unwrap();
            c.limits.login.burst = 2.try_into().unwrap();
        },
    )
    .await;
    let token = h.session_token().await;
    let bearer = format!("Bearer {token}");
    let barcode = h.issue_barcode().await;
    let status = format!("/api/v1/acquirers/document-request/status?barcode={barcode}&requestId=r");
    let mut limited = 0;
    for _ in 0..25 {
        let reply = h
            .send(Method::GET, &status, &[("authorization", &bearer)], "")
            .await;
        if reply.status == StatusCode::TOO_MANY_REQUESTS {
            assert_eq!(reply.gateway_code(), "poll_rate_limited");
            assert_eq!(reply.header("ratelimit-policy"), Some("\"poll\";q=10;w=60"));
            limited += 1;
        }
    }
    assert!(limited >= 15, "{limited} polls limited");
    // The login is answered from cache: never refused, however much this client polled.
    for _ in 0..5 {
        assert_eq!(h.session_token().await, token);
    }
    // Scans are not touched by the polls either.
    assert_eq!(
        h.identify(&token, "b", &barcode).await.status,
        StatusCode::OK
    );
    // Logins are refused only for Diia's refusals of the same credentials (answered
    // `credentials_refused` locally once Diia refused them): logins that work spend nothing.
    let other = h
        .session_token_for(support::OTHER_ACQUIRER_TOKEN, support::OTHER_AUTH_TOKEN)
        .await;
    assert_ne!(other, token);
    let path = format!("/api/v1/auth/acquirer/{}", support::OTHER_ACQUIRER_TOKEN);
    let mut statuses = Vec::new();
    for _ in 0..3 {
        let wrong = h
            .send(
                Method::GET,
                &path,
                &[("authorization", "Basic d3Jvbmc6d3Jvbmc=")],
                "",
            )
            .await;
        statuses.push((wrong.status.as_u16(), wrong.gateway_code()));
    }
    let local = (401, "credentials_refused".to_owned());
    assert_eq!(statuses, [(401, String::new()), local.clone(), local]);
}

/// Random `branchId`s cannot grow the limiter without bound: at most
/// `limits.max_tracked` keys per budget, the longest idle forgotten first.
#[tokio::test]
async fn tracked_branches_are_capped() {
    let h = Harness::with(|_| {}, |c| c.limits.max_tracked = 50).await;
    let token = h.session_token().await;
    for n in 0..300 {
        h.identify(&token, &format!("random-{n}"), "3389798072090")
            .await;
    }
    // Refused as invalid before any budget is spent: use valid barcodes instead.
    for n in 0..300 {
        let barcode = diia_sim::Code::issue(338_979_807_000 + n).unwrap().digits();
        h.identify(&token, &format!("random-{n}"), &barcode).await;
    }
    let tracked = h.metric("diia_gateway_branches_tracked").await;
    assert!(tracked > 0.0 && tracked <= 50.0, "{tracked}");
}

/// Rotating `branchId`s gets around no limit: the client's own budget still applies.
#[tokio::test]
async fn a_client_rotating_branch_ids_meets_its_client_budget() {
    let h = Harness::with(
        |s| s.auto_issue = true,
        |c| {
            c.limits.client.per_minute = 60.try_into().unwrap();
            c.limits.client.burst = 5.try_into().unwrap();
        },
    )
    .await;
    let token = h.session_token().await; // a login spends no client budget
    let mut statuses = Vec::new();
    for n in 0..8u64 {
        let barcode = diia_sim::Code::issue(338_979_807_300 + n).unwrap().digits();
        let reply = h.identify(&token, &format!("rotating-{n}"), &barcode).await;
        if reply.status == StatusCode::TOO_MANY_REQUESTS {
            assert_eq!(reply.gateway_code(), "client_rate_limited");
            assert_eq!(
                reply.header("ratelimit-policy"),
                Some("\"client\";q=60;w=60")
            );
        }
        statuses.push(reply.status.as_u16());
    }
    assert_eq!(statuses, [200, 200, 200, 200, 200, 429, 429, 429]);
    assert_eq!(h.sim_calls("document_identification").await, 5);
}
