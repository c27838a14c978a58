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
    let request = format!(
        "POST {path} HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer t\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
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
    let gateway = diia_gateway::start_with(config, Some(file.path().to_owned()))
        .await
        .unwrap();
    (sim, file, gateway)
}

#[tokio::test]
async fn new_limits_apply_on_an_open_connection() {
    let (sim, file, gateway) = start_from_file().await;
    let mut stream = TcpStream::connect(gateway.addr()).await.unwrap();
    let path = "/api/v1/acquirers/document-identification";
    let body = r#"{"branchId":"busy","barcode":"3389798072091"}"#;
    for _ in 0..3 {
        assert_ne!(on_connection(&mut stream, path, body).await, 429);
    }

    rewrite(&file, &config_text(&sim.base_url(), 1, 1, "60s"));
    let client = support::client();
    let admin = format!("http://{}/reload", gateway.admin_addr());
    let reloaded = support::send(&client, Method::POST, &admin, &[], String::new()).await;
    assert_eq!(reloaded.status, StatusCode::OK);

    // Same connection, new limits: one request, then the branch is over its budget.
    assert_ne!(on_connection(&mut stream, path, body).await, 429);
    assert_eq!(on_connection(&mut stream, path, body).await, 429);
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
