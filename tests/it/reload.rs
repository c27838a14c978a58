//! Hot reload: a new config applies to the next request without dropping connections; an
//! invalid one is refused and the old one keeps serving.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::support;

use std::io::Write;
use std::time::Duration;

use diia_gateway::RunningGateway;
use diia_gateway::Settings;
use diia_sim::{SimHandle, Simulator};
use http::{Method, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn config_text(sim: &str, per_minute: u32, burst: u32, ttl: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         [upstream]\nbase_url = \"{sim}\"\n\
         [cache]\nttl = \"{ttl}\"\nnegative_ttl = \"{ttl}\"\n\
         [limits.branch]\nper_minute = {per_minute}\nburst = {burst}\n"
    )
}

fn rewrite(file: &tempfile::NamedTempFile, text: &str) {
    let mut handle = std::fs::File::create(file.path()).unwrap();
    handle.write_all(text.as_bytes()).unwrap();
}

/// One request on an open connection; returns the status (the body is read and dropped).
async fn on_connection(stream: &mut TcpStream, path: &str, body: &str) -> u16 {
    on_connection_as(stream, path, body, "t").await
}

/// [`on_connection`] with a given session token.
async fn on_connection_as(stream: &mut TcpStream, path: &str, body: &str, token: &str) -> u16 {
    let request = format!(
        "POST {path} HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer {token}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(support::REQUEST_BOUND, stream.read(&mut byte))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(n, 1, "connection closed");
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    let length: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse().unwrap())
        })
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).await.unwrap();
    head[9..12].parse().unwrap()
}

/// A simulator, a config file with generous limits and a 60 s TTL, and a gateway started
/// from that file (so it can be reloaded).
async fn start_from_file() -> (SimHandle, tempfile::NamedTempFile, RunningGateway) {
    let sim = Simulator::start(support::sim_config()).await.unwrap();
    let file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    rewrite(&file, &config_text(&sim.base_url(), 100_000, 10_000, "60s"));
    let config = Settings::load(file.path()).unwrap();
    let gateway = diia_gateway::start_from_file(config, Some(file.path().to_owned()))
        .await
        .unwrap();
    (sim, file, gateway)
}

/// A session token from the gateway's own token exchange: one Diia accepted, so its calls
/// spend branch budgets (a made-up token's never do).
async fn real_token(gateway: &RunningGateway) -> String {
    let url = format!(
        "http://{}/api/v1/auth/acquirer/{}",
        gateway.addr(),
        diia_sim::DEMO_ACQUIRER_TOKEN
    );
    let basic = format!("Basic {}", diia_sim::DEMO_AUTH_TOKEN);
    let reply = support::send(
        &support::client(),
        Method::GET,
        &url,
        &[("authorization", basic.as_str())],
        String::new(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    reply.json()["token"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn new_limits_apply_on_an_open_connection() {
    let (sim, file, gateway) = start_from_file().await;
    let token = real_token(&gateway).await;
    let mut stream = TcpStream::connect(gateway.addr()).await.unwrap();
    let path = "/api/v1/acquirers/document-identification";
    let body = r#"{"branchId":"busy","barcode":"3389798072091"}"#;
    for _ in 0..3 {
        assert_ne!(on_connection_as(&mut stream, path, body, &token).await, 429);
    }

    rewrite(&file, &config_text(&sim.base_url(), 1, 1, "60s"));
    let client = support::client();
    let admin = format!("http://{}/reload", gateway.admin_addr());
    let reloaded = support::send(&client, Method::POST, &admin, &[], String::new()).await;
    assert_eq!(reloaded.status, StatusCode::OK);

    // Same connection, new limits: one request, then the branch is over its budget.
    assert_ne!(on_connection_as(&mut stream, path, body, &token).await, 429);
    assert_eq!(on_connection_as(&mut stream, path, body, &token).await, 429);
}

#[tokio::test]
async fn an_invalid_config_is_refused_and_the_old_one_keeps_serving() {
    let (sim, file, gateway) = start_from_file().await;
    rewrite(&file, &config_text(&sim.base_url(), 1, 1, "10m"));
    let problem = gateway.reload().expect_err("refused");
    assert!(problem.starts_with("cache.ttl"), "{problem}");
    rewrite(&file, "this is [not toml");
    assert!(gateway.reload().is_err());
    let client = support::client();
    let admin = format!("http://{}/reload", gateway.admin_addr());
    let refused = support::send(&client, Method::POST, &admin, &[], String::new()).await;
    assert_eq!(refused.status, StatusCode::BAD_REQUEST);

    // Still the old limits (the refused file had 1/min).
    let mut stream = TcpStream::connect(gateway.addr()).await.unwrap();
    for _ in 0..3 {
        let status = on_connection(
            &mut stream,
            "/api/v1/acquirers/document-identification",
            r#"{"branchId":"b","barcode":"3389798072091"}"#,
        )
        .await;
        assert_ne!(status, 429);
    }
}

#[tokio::test]
async fn a_new_ttl_applies_to_answers_stored_after_the_reload() {
    let (sim, file, gateway) = start_from_file().await;
    rewrite(
        &file,
        &config_text(&sim.base_url(), 100_000, 10_000, "300ms"),
    );
    gateway.reload().unwrap();
    let client = support::client();
    let token_url = format!(
        "http://{}/api/v1/auth/acquirer/{}",
        gateway.addr(),
        diia_sim::DEMO_ACQUIRER_TOKEN
    );
    let basic = format!("Basic {}", diia_sim::DEMO_AUTH_TOKEN);
    let reply = support::send(
        &client,
        Method::GET,
        &token_url,
        &[("authorization", &basic)],
        String::new(),
    )
    .await;
    let bearer = format!("Bearer {}", reply.json()["token"].as_str().unwrap());
    let url = format!(
        "http://{}/api/v1/acquirers/document-identification",
        gateway.addr()
    );
    // A never-issued barcode: Diia answers 404, a definitive negative that is cached.
    let body = r#"{"branchId":"b","barcode":"3389798072091"}"#;
    let headers = [
        ("authorization", bearer.as_str()),
        ("content-type", "application/json"),
    ];
    let first = support::send(&client, Method::POST, &url, &headers, body.to_owned()).await;
    assert_eq!(first.status, StatusCode::NOT_FOUND);
    let second = support::send(&client, Method::POST, &url, &headers, body.to_owned()).await;
    assert_eq!(second.header("cache-status"), Some("diia-gateway; hit"));
    tokio::time::sleep(Duration::from_millis(450)).await;
    let third = support::send(&client, Method::POST, &url, &headers, body.to_owned()).await;
    assert_eq!(
        third.header("cache-status"),
        Some("diia-gateway; fwd=miss; stored"),
        "expired at the new TTL"
    );
}

#[tokio::test]
async fn a_new_upstream_deadline_applies_to_the_next_call() {
    let (sim, file, gateway) = start_from_file().await;
    sim.set_faults(diia_sim::Faults {
        latency: Duration::from_millis(1500),
        ..diia_sim::Faults::default()
    });
    // Put a short deadline under [upstream] (the helper writes base_url there).
    let text = config_text(&sim.base_url(), 100_000, 10_000, "60s").replace(
        &format!("base_url = \"{}\"\n", sim.base_url()),
        &format!("base_url = \"{}\"\ntimeout = \"300ms\"\n", sim.base_url()),
    );
    rewrite(&file, &text);
    gateway.reload().unwrap();
    let client = support::client();
    let url = format!(
        "http://{}/api/v1/acquirers/document-identification",
        gateway.addr()
    );
    let started = std::time::Instant::now();
    let reply = support::send(
        &client,
        Method::POST,
        &url,
        &[
            ("authorization", "Bearer t"),
            ("content-type", "application/json"),
        ],
        r#"{"branchId":"b","barcode":"3389798072091"}"#.to_owned(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT);
    assert!(
        started.elapsed() < Duration::from_millis(1200),
        "the reloaded 300ms deadline applied"
    );
}

/// Each class of cold setting (listeners, caps, pool, breaker, cache capacity, auth mode,
/// log): a reload that changes it is refused naming the key, over SIGHUP's path and over
/// `POST /reload`, and nothing else in that file is applied either.
#[tokio::test]
async fn a_cold_change_is_refused_by_name_and_nothing_is_applied() {
    let (sim, file, gateway) = start_from_file().await;
    let base = config_text(&sim.base_url(), 1, 1, "60s");
    let with = |section: &str, line: &str| {
        base.replace(&format!("[{section}]\n"), &format!("[{section}]\n{line}\n"))
    };
    let cases = [
        (
            base.replace(
                "[server]\nlisten = \"127.0.0.1:0\"",
                "[server]\nlisten = \"127.0.0.1:1\"",
            ),
            "server.listen",
        ),
        (with("server", "max_in_flight = 7"), "server.max_in_flight"),
        (
            with("upstream", "pool_max_idle = 3"),
            "upstream.pool_max_idle",
        ),
        (
            with("upstream", "breaker_failures = 9"),
            "upstream.breaker_failures",
        ),
        (
            base.replace("[cache]\n", "[cache]\nmax_bytes = 2097152\n"),
            "cache.max_bytes",
        ),
        (format!("{base}[log]\nformat = \"text\"\n"), "log.format"),
    ];
    let client = support::client();
    let admin = format!("http://{}/reload", gateway.admin_addr());
    for (text, key) in &cases {
        rewrite(&file, text);
        let problem = gateway.reload().expect_err("cold change refused");
        assert!(problem.starts_with(key), "{key}: {problem}");
        let refused = support::send(&client, Method::POST, &admin, &[], String::new()).await;
        assert_eq!(refused.status, StatusCode::BAD_REQUEST);
        let body = String::from_utf8_lossy(&refused.body).into_owned();
        assert!(body.contains(key), "{key}: {body}");
    }
    // Every refused file also had 1/min branch limits: none of them applied.
    let mut stream = TcpStream::connect(gateway.addr()).await.unwrap();
    for _ in 0..3 {
        let status = on_connection(
            &mut stream,
            "/api/v1/acquirers/document-identification",
            r#"{"branchId":"cold","barcode":"3389798072091"}"#,
        )
        .await;
        assert_ne!(status, 429);
    }
}

#[tokio::test]
async fn a_new_diia_budget_applies_to_the_next_call() {
    let (sim, file, gateway) = start_from_file().await;
    let text = format!(
        "{}[limits.diia]\nper_second = 1\nburst = 1\nmax_wait = \"1ms\"\n",
        config_text(&sim.base_url(), 100_000, 10_000, "60s")
    );
    // A token the gateway handed out: its calls spend the Diia budget (a token Diia has
    // not accepted spends `limits.unverified` instead).
    let token = support::client();
    let exchange = format!(
        "http://{}/api/v1/auth/acquirer/{}",
        gateway.addr(),
        diia_sim::DEMO_ACQUIRER_TOKEN
    );
    let basic = format!("Basic {}", diia_sim::DEMO_AUTH_TOKEN);
    let reply = support::send(
        &token,
        http::Method::GET,
        &exchange,
        &[("authorization", basic.as_str())],
        String::new(),
    )
    .await;
    let token = reply.json()["token"].as_str().unwrap().to_owned();
    rewrite(&file, &text);
    gateway.reload().unwrap();
    let mut stream = TcpStream::connect(gateway.addr()).await.unwrap();
    let path = "/api/v1/acquirers/document-identification";
    let mut statuses = Vec::new();
    for base in [338_979_807_209, 482_000_000_000, 482_000_000_001] {
        let barcode = diia_sim::Code::issue(base).unwrap().digits();
        let body = format!(r#"{{"branchId":"b","barcode":"{barcode}"}}"#);
        statuses.push(on_connection_as(&mut stream, path, &body, &token).await);
    }
    // One call a second with no wait: the first goes to Diia (404: never issued), the
    // next distinct ones find the budget empty.
    assert_ne!(statuses[0], 503, "{statuses:?}");
    assert_eq!(&statuses[1..], [503, 503], "{statuses:?}");
}

fn managed_text(sim: &str, key: &str) -> String {
    use sha2::Digest;
    let digest = hex::encode(sha2::Sha256::digest(key.as_bytes()));
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         [upstream]\nbase_url = \"{sim}\"\n\
         [limits.branch]\nper_minute = 100000\nburst = 10000\n\
         [auth]\nmode = \"managed\"\nacquirer_token = \"{}\"\nauth_token = \"{}\"\n\
         [[auth.api_keys]]\nbranch = \"kyiv-001\"\nsha256 = \"{digest}\"\n",
        diia_sim::DEMO_ACQUIRER_TOKEN,
        diia_sim::DEMO_AUTH_TOKEN,
    )
}

/// Managed mode: replacing a branch's key in the file and reloading takes effect at once
/// (the old key is refused, the new one served).
#[tokio::test]
async fn api_key_rotation_by_reload_applies_at_once() {
    let sim = Simulator::start(support::sim_config()).await.unwrap();
    let file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    rewrite(&file, &managed_text(&sim.base_url(), "old-key-1"));
    let settings = Settings::load(file.path()).unwrap();
    let gateway = diia_gateway::start_from_file(settings, Some(file.path().to_owned()))
        .await
        .unwrap();
    let client = support::client();
    let url = format!(
        "http://{}/api/v1/acquirers/document-identification",
        gateway.addr()
    );
    let identify = |key: &'static str, barcode: String| {
        let client = client.clone();
        let url = url.clone();
        async move {
            support::send(
                &client,
                Method::POST,
                &url,
                &[("x-api-key", key), ("content-type", "application/json")],
                format!(r#"{{"branchId":"kyiv-001","barcode":"{barcode}"}}"#),
            )
            .await
        }
    };
    let first = sim.state().issue_barcode(true).digits();
    assert_eq!(identify("old-key-1", first).await.status, StatusCode::OK);

    rewrite(&file, &managed_text(&sim.base_url(), "new-key-2"));
    gateway.reload().unwrap();
    let second = sim.state().issue_barcode(true).digits();
    let old = identify("old-key-1", second.clone()).await;
    assert_eq!(old.status, StatusCode::UNAUTHORIZED);
    assert_eq!(old.gateway_code(), "invalid_api_key");
    assert_eq!(identify("new-key-2", second).await.status, StatusCode::OK);
}

/// A reload that changes a limit rebuilds that budget; each branch starts where it stood,
/// scaled to the new quota, never full: a spent branch stays refused.
#[tokio::test]
async fn a_changed_limit_does_not_refill_a_spent_branch() {
    let (sim, file, gateway) = start_from_file().await;
    let token = real_token(&gateway).await;
    rewrite(&file, &config_text(&sim.base_url(), 1, 3, "60s"));
    gateway.reload().unwrap();
    let mut stream = TcpStream::connect(gateway.addr()).await.unwrap();
    let path = "/api/v1/acquirers/document-identification";
    let body = r#"{"branchId":"spent","barcode":"3389798072091"}"#;
    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(on_connection_as(&mut stream, path, body, &token).await);
    }
    assert_eq!(statuses[3], 429, "{statuses:?}");
    assert!(statuses[..3].iter().all(|s| *s != 429), "{statuses:?}");
    // Twice the burst: the spent branch is still spent; a fresh one gets the new burst.
    rewrite(&file, &config_text(&sim.base_url(), 1, 6, "60s"));
    gateway.reload().unwrap();
    assert_eq!(on_connection_as(&mut stream, path, body, &token).await, 429);
    let fresh = r#"{"branchId":"fresh","barcode":"3389798072091"}"#;
    for _ in 0..6 {
        assert_ne!(
            on_connection_as(&mut stream, path, fresh, &token).await,
            429
        );
    }
}
