//! The callback relay's ingress over real sockets: a forged or malformed callback is
//! refused before anything is stored; a real one (CMS `EnvelopedData` for the acquirer's
//! certificate) is stored and only then acknowledged; duplicates and conflicts are counted;
//! a failing store answers 503 while identification keeps being served. Its helpers (the
//! test acquirer, a relay-enabled gateway, a valid package) are shared with the relay's
//! admin and ops tests.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::support;
pub(crate) use crate::support::cms::enveloped_for;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use diia_gateway::config::{CallbackRelayConfig, FileConfig};
use diia_gateway::relay::CallbackStore;
use diia_gateway::relay::State;
use http::{Method, StatusCode};
use std::time::{Duration, Instant};
use support::{Harness, Reply};
use tempfile::TempDir;
use tokio::io::AsyncWriteExt;

pub(crate) const TOKEN: &str = "8f1c2b7d4e6a9f0b3c5d7e9f1a2b4c6d8e0f1a3b5c7d9e1f2a4b6c8d0e2f4a6b";
pub(crate) const BOUNDARY: &str = "diia-test-boundary-7d3f";
pub(crate) const REQUEST_ID: &str = "5b8f7a3e-2c1d-4e6f-9a0b-1c2d3e4f5a6b";

/// A test acquirer's files: relay seal keys, its path token, its encryption certificate.
pub(crate) struct Acquirer {
    pub(crate) dir: TempDir,
    pub(crate) cert_der: Vec<u8>,
}

impl Acquirer {
    pub(crate) fn new() -> Self {
        let dir = TempDir::new().unwrap();
        let certified = rcgen::generate_simple_self_signed(vec!["acquirer.test".into()]).unwrap();
        std::fs::write(dir.path().join("cert.pem"), certified.cert.pem()).unwrap();
        std::fs::write(
            dir.path().join("keys"),
            "k1 = 3a7f0c9e1b2d4f6a8c0e2b4d6f8a1c3e5b7d9f0a2c4e6b8d0f1a3c5e7b9d1f2a\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("token"), format!("{TOKEN}\n")).unwrap();
        std::fs::create_dir(dir.path().join("data")).unwrap();
        Self {
            cert_der: certified.cert.der().to_vec(),
            dir,
        }
    }

    pub(crate) fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }
}

/// Turns the relay on for `acquirer` (`max_body` 256 KiB).
pub(crate) fn relay_on(config: &mut FileConfig, acquirer: &Acquirer) {
    let relay = &mut config.callback_relay;
    relay.enabled = true;
    relay.listen = "127.0.0.1:0".parse().unwrap();
    relay.data_dir = acquirer.path("data");
    relay.seal_key_file = Some(acquirer.path("keys"));
    relay.max_body = 256 * 1024;
    relay.acquirer = vec![diia_gateway::config::RelayAcquirerConfig {
        name: "acquirer-1".into(),
        path_token_file: acquirer.path("token"),
        recipient_cert_file: acquirer.path("cert.pem"),
        default_target: None,
    }];
}

/// A gateway (and simulator) with the relay on for `acquirer`, tweaked.
pub(crate) async fn start_with(
    acquirer: &Acquirer,
    tweak: impl FnOnce(&mut CallbackRelayConfig),
) -> Harness {
    Harness::with(
        |_| {},
        |config| {
            relay_on(config, acquirer);
            tweak(&mut config.callback_relay);
        },
    )
    .await
}

/// A gateway (and simulator) with the relay on for `acquirer`.
pub(crate) async fn start(acquirer: &Acquirer, max_db_bytes: u64) -> Harness {
    start_with(acquirer, |relay| relay.max_db_bytes = max_db_bytes).await
}

/// A barcode-sharing callback body: `encryptedFile`, `encryptedFileName`, `encodeData`.
pub(crate) fn barcode_package(file: &str, encode_data: &str) -> String {
    format!(
        "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"encryptedFile\"; filename=\"doc.p7s.p7e\"\r\n\
         Content-Type: application/octet-stream\r\n\r\n{file}\r\n\
         --{BOUNDARY}\r\nContent-Disposition: form-data; name=\"encryptedFileName\"\r\n\r\ndoc.p7s.p7e\r\n\
         --{BOUNDARY}\r\nContent-Disposition: form-data; name=\"encodeData\"\r\n\r\n{encode_data}\r\n\
         --{BOUNDARY}--\r\n"
    )
}

pub(crate) fn valid_package(acquirer: &Acquirer, fill: u8) -> String {
    package_of(acquirer, fill, 8 * 1024)
}

pub(crate) fn package_of(acquirer: &Acquirer, fill: u8, size: usize) -> String {
    let file = enveloped_for(&acquirer.cert_der, &vec![fill; size]);
    let data = enveloped_for(&acquirer.cert_der, &[fill; 64]);
    barcode_package(&file, &data)
}

pub(crate) async fn callback(h: &Harness, path: &str, trace: Option<&str>, body: String) -> Reply {
    let addr = h.gateway.relay_addr().expect("relay listens");
    let content_type = format!("multipart/form-data; boundary={BOUNDARY}");
    let mut headers = vec![("content-type", content_type.as_str())];
    if let Some(trace) = trace {
        headers.push(("x-document-request-trace-id", trace));
    }
    let url = format!("http://{addr}{path}");
    support::send(&support::client(), Method::POST, &url, &headers, body).await
}

pub(crate) fn ingress_path() -> String {
    format!("/diia/callback/{TOKEN}")
}

pub(crate) async fn records(h: &Harness) -> [u64; 5] {
    let store = h.gateway.relay_store().expect("relay store");
    store
        .stats(diia_gateway::relay::now_ms())
        .await
        .unwrap()
        .counts
}

async fn ingested(h: &Harness, result: &str) -> f64 {
    h.metric(&format!(
        "diia_gateway_relay_ingest_total{{result=\"{result}\"}}"
    ))
    .await
}

fn assert_refused(reply: &Reply, status: StatusCode, code: &str) {
    assert_eq!(
        reply.status,
        status,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    assert_eq!(reply.json()["success"], false);
    assert_eq!(reply.json()["error"], code);
}

#[tokio::test]
async fn a_wrong_token_is_404_and_stores_nothing() {
    let acquirer = Acquirer::new();
    let h = start(&acquirer, 0).await;
    let body = valid_package(&acquirer, 1);
    let other = "0".repeat(63) + "1";
    for path in [
        format!("/diia/callback/{other}"),
        "/diia/callback/short".to_owned(),
        format!("/elsewhere/{TOKEN}"),
        format!("/diia/callback/{TOKEN}/more"),
    ] {
        let reply = callback(&h, &path, Some(REQUEST_ID), body.clone()).await;
        assert_refused(&reply, StatusCode::NOT_FOUND, "not_found");
    }
    assert_eq!(records(&h).await, [0; 5]);
    // The right token with another method: 405, still nothing stored.
    let addr = h.gateway.relay_addr().unwrap();
    let url = format!("http://{addr}{}", ingress_path());
    let reply = support::send(&support::client(), Method::GET, &url, &[], String::new()).await;
    assert_refused(&reply, StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed");
    assert_eq!(records(&h).await, [0; 5]);
}

#[tokio::test]
async fn parts_that_are_not_cms_for_this_acquirer_are_400_and_store_nothing() {
    let acquirer = Acquirer::new();
    let stranger = Acquirer::new();
    let h = start(&acquirer, 0).await;
    let good = enveloped_for(&acquirer.cert_der, b"x");
    let cases = [
        (barcode_package("not base64 at all!", &good), "not_base64"),
        (
            barcode_package(&STANDARD.encode(b"plain bytes, no CMS"), &good),
            "not_cms",
        ),
        (
            barcode_package(&good, &enveloped_for(&stranger.cert_der, b"x")),
            "other_recipient",
        ),
        (
            barcode_package(&enveloped_for(&stranger.cert_der, b"x"), &good),
            "other_recipient",
        ),
    ];
    for (body, code) in cases {
        let reply = callback(&h, &ingress_path(), Some(REQUEST_ID), body).await;
        assert_refused(&reply, StatusCode::BAD_REQUEST, code);
    }
    let reply = callback(&h, &ingress_path(), Some(REQUEST_ID), "no multipart".into()).await;
    assert_refused(&reply, StatusCode::BAD_REQUEST, "invalid_multipart");
    assert_eq!(records(&h).await, [0; 5]);
    assert_eq!(ingested(&h, "refused_cms").await, 4.0);
}

#[tokio::test]
async fn base64_wrapped_in_lines_is_a_package_and_whitespace_alone_is_not() {
    let acquirer = Acquirer::new();
    let h = start(&acquirer, 0).await;
    let one_line = enveloped_for(&acquirer.cert_der, &[7u8; 4096]);
    // MIME style: 76 characters a line, CRLF between.
    let wrapped = one_line
        .as_bytes()
        .chunks(76)
        .map(|line| std::str::from_utf8(line).unwrap())
        .collect::<Vec<_>>()
        .join("\r\n");
    assert!(wrapped.len() > one_line.len(), "the text has line breaks");
    let good = enveloped_for(&acquirer.cert_der, b"x");
    let reply = callback(
        &h,
        &ingress_path(),
        Some(REQUEST_ID),
        barcode_package(&wrapped, &good),
    )
    .await;
    assert_eq!(
        reply.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    let broken = format!("{} !{}", &one_line[..100], &one_line[100..]);
    let reply = callback(
        &h,
        &ingress_path(),
        Some("another-request"),
        barcode_package(&broken, &good),
    )
    .await;
    assert_refused(&reply, StatusCode::BAD_REQUEST, "not_base64");
}

#[tokio::test]
async fn a_missing_trace_header_is_400_and_an_oversized_body_413() {
    let acquirer = Acquirer::new();
    let h = start(&acquirer, 0).await;
    let reply = callback(&h, &ingress_path(), None, valid_package(&acquirer, 1)).await;
    assert_refused(&reply, StatusCode::BAD_REQUEST, "missing_trace_id");
    let huge = barcode_package(&"A".repeat(300 * 1024), "x");
    let reply = callback(&h, &ingress_path(), Some(REQUEST_ID), huge).await;
    assert_refused(&reply, StatusCode::PAYLOAD_TOO_LARGE, "body_too_large");
    assert_eq!(records(&h).await, [0; 5]);
}

#[tokio::test]
async fn a_valid_package_is_stored_then_acknowledged_and_repeats_are_counted() {
    let acquirer = Acquirer::new();
    let h = start(&acquirer, 0).await;
    let body = valid_package(&acquirer, 1);
    let reply = callback(&h, &ingress_path(), Some(REQUEST_ID), body.clone()).await;
    assert_eq!(
        reply.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    assert_eq!(reply.json(), serde_json::json!({"success": true}));
    let mut orphan_only = [0; 5];
    orphan_only[usize::from(State::Orphan.code())] = 1;
    assert_eq!(
        records(&h).await,
        orphan_only,
        "one record, an orphan (no route)"
    );
    assert_eq!(ingested(&h, "orphan").await, 1.0);

    let again = callback(&h, &ingress_path(), Some(REQUEST_ID), body).await;
    assert_eq!(again.status, StatusCode::OK);
    assert_eq!(again.json()["success"], true);
    assert_eq!(ingested(&h, "duplicate").await, 1.0);

    let other_bytes = valid_package(&acquirer, 2);
    let conflict = callback(&h, &ingress_path(), Some(REQUEST_ID), other_bytes).await;
    assert_eq!(conflict.status, StatusCode::OK);
    assert_eq!(ingested(&h, "conflict").await, 1.0);
    assert_eq!(
        records(&h).await,
        orphan_only,
        "the first is kept, nothing added"
    );
}

#[tokio::test]
async fn a_failing_store_is_503_and_identification_is_still_served() {
    let acquirer = Acquirer::new();
    // Room for the schema, not for a package.
    let h = start(&acquirer, 48 * 1024).await;
    let big = {
        let file = enveloped_for(&acquirer.cert_der, &[3u8; 120 * 1024]);
        barcode_package(&file, &enveloped_for(&acquirer.cert_der, b"x"))
    };
    let reply = callback(&h, &ingress_path(), Some(REQUEST_ID), big).await;
    assert_refused(&reply, StatusCode::SERVICE_UNAVAILABLE, "store_unavailable");
    assert!(reply.header("retry-after").is_some());
    assert_eq!(ingested(&h, "store_error").await, 1.0);

    let token = h.session_token().await;
    let barcode = h.issue_barcode().await;
    let identified = h.identify(&token, "b1", &barcode).await;
    assert_eq!(identified.status, StatusCode::OK);
}

#[tokio::test]
async fn bytes_in_flight_beyond_the_budget_are_503_with_retry_after() {
    let acquirer = Acquirer::new();
    let h = start_with(&acquirer, |relay| relay.max_in_flight_bytes = 256 * 1024).await;
    let addr = h.gateway.relay_addr().unwrap();
    // A slow callback declares 200 KiB and sends a few bytes: its share stays taken.
    let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST {} HTTP/1.1\r\nhost: relay\r\ncontent-type: multipart/form-data; boundary={BOUNDARY}\r\n\
         x-document-request-trace-id: {REQUEST_ID}\r\ncontent-length: {}\r\n\r\n--{BOUNDARY}",
        ingress_path(),
        200 * 1024
    );
    slow.write_all(head.as_bytes()).await.unwrap();
    let body = package_of(&acquirer, 1, 80 * 1024);
    assert!(
        body.len() > 60 * 1024,
        "the second callback must not fit beside the first"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let busy = loop {
        let reply = callback(&h, &ingress_path(), Some(REQUEST_ID), body.clone()).await;
        if reply.status == StatusCode::SERVICE_UNAVAILABLE || Instant::now() > deadline {
            break reply;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_refused(&busy, StatusCode::SERVICE_UNAVAILABLE, "relay_busy");
    assert_eq!(busy.header("retry-after"), Some("1"));
    assert_eq!(records(&h).await, [0; 5], "nothing stored while busy");
    // The slow client goes away: its share is given back.
    drop(slow);
    let deadline = Instant::now() + Duration::from_secs(10);
    let stored = loop {
        let reply = callback(&h, &ingress_path(), Some(REQUEST_ID), body.clone()).await;
        if reply.status == StatusCode::OK || Instant::now() > deadline {
            break reply;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(stored.status, StatusCode::OK);
}

/// One HTTP/1.1 answer read off a raw socket: its status line and JSON body.
async fn read_answer(stream: &mut tokio::net::TcpStream) -> (String, String) {
    use tokio::io::AsyncReadExt;
    let mut bytes = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(at) = bytes.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        let n = stream.read(&mut chunk).await.unwrap();
        assert!(n > 0, "connection closed before an answer");
        bytes.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&bytes[..head_end]).to_lowercase();
    let length: usize = head
        .lines()
        .find_map(|line| line.strip_prefix("content-length:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    while bytes.len() < head_end + length {
        let n = stream.read(&mut chunk).await.unwrap();
        assert!(n > 0, "connection closed inside an answer");
        bytes.extend_from_slice(&chunk[..n]);
    }
    let status = head.lines().next().unwrap().to_owned();
    let body = String::from_utf8_lossy(&bytes[head_end..head_end + length]).into_owned();
    (status, body)
}

/// A callback refused on its head (a wrong token, the budget taken) while its body is
/// still arriving: the refusal is read whole and the connection stays usable, instead of
/// a reset under the answer that the sender could only count as a network error.
#[tokio::test]
async fn a_refusal_while_the_body_arrives_is_read_whole_and_the_connection_kept() {
    let acquirer = Acquirer::new();
    let h = start_with(&acquirer, |_| {}).await;
    let addr = h.gateway.relay_addr().unwrap();
    let body = package_of(&acquirer, 1, 120 * 1024);
    let wrong = format!("{}/{}", "/diia/callback", "0".repeat(64));
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST {wrong} HTTP/1.1\r\nhost: relay\r\ncontent-type: multipart/form-data; boundary={BOUNDARY}\r\n\
         x-document-request-trace-id: {REQUEST_ID}\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    for piece in body.as_bytes().chunks(body.len() / 4 + 1) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        stream.write_all(piece).await.unwrap();
    }
    let (status, answer) = tokio::time::timeout(Duration::from_secs(10), read_answer(&mut stream))
        .await
        .unwrap();
    assert!(status.contains(" 404 "), "{status}");
    assert!(answer.contains("not_found"), "{answer}");

    // The same connection carries the next callback, which is stored.
    let head = format!(
        "POST {} HTTP/1.1\r\nhost: relay\r\ncontent-type: multipart/form-data; boundary={BOUNDARY}\r\n\
         x-document-request-trace-id: {REQUEST_ID}\r\ncontent-length: {}\r\n\r\n",
        ingress_path(),
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(body.as_bytes()).await.unwrap();
    let (status, answer) = tokio::time::timeout(Duration::from_secs(10), read_answer(&mut stream))
        .await
        .unwrap();
    assert!(status.contains(" 200 "), "{status}: {answer}");
    assert_eq!(answer, r#"{"success":true}"#);
}

#[tokio::test]
async fn a_store_that_cannot_be_opened_stops_the_start_with_the_key() {
    let acquirer = Acquirer::new();
    let mut config = support::gateway_config("http://127.0.0.1:9");
    relay_on(&mut config, &acquirer);
    // A file where the data directory should be.
    let file = acquirer.path("not-a-dir");
    std::fs::write(&file, b"x").unwrap();
    config.callback_relay.data_dir = file;
    let settings = diia_gateway::Settings::build(&config).expect("valid config");
    let Err(error) = diia_gateway::start(settings).await else {
        panic!("the gateway must refuse to start without its relay store");
    };
    assert!(
        error.to_string().contains("callback_relay.data_dir"),
        "{error}"
    );
}

#[tokio::test]
async fn the_relay_speaks_tls_with_the_branch_certificate_and_asks_no_client_certificate() {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    use rustls::pki_types::CertificateDer;

    let acquirer = Acquirer::new();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, &ca_key);
    let server_key = KeyPair::generate().unwrap();
    let server = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    let server_cert = server.signed_by(&server_key, &issuer).unwrap();
    let write = |name: &str, text: String| {
        let path = acquirer.path(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let tls = diia_gateway::config::ServerTlsConfig {
        cert: write("server.pem", server_cert.pem()),
        key: write("server-key.pem", server_key.serialize_pem()),
        // Branches must show a certificate; Diia, on the relay, need not.
        client_ca: Some(write("ca.pem", ca_cert.pem())),
        client_crl: Vec::new(),
    };
    let h = Harness::with(
        |_| {},
        |config| {
            relay_on(config, &acquirer);
            config.server.tls = Some(tls);
        },
    )
    .await;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from(ca_cert.der().to_vec()))
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(config)
        .https_only()
        .enable_http1()
        .enable_http2()
        .build();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build(connector);
    let port = h.gateway.relay_addr().unwrap().port();
    let request = http::Request::post(format!("https://localhost:{port}{}", ingress_path()))
        .header(
            "content-type",
            format!("multipart/form-data; boundary={BOUNDARY}"),
        )
        .header("x-document-request-trace-id", REQUEST_ID)
        .body(http_body_util::Full::new(bytes::Bytes::from(
            valid_package(&acquirer, 1),
        )))
        .unwrap();
    let response = tokio::time::timeout(support::REQUEST_BOUND, client.request(request))
        .await
        .expect("answer within bound")
        .expect("TLS exchange without a client certificate");
    assert_eq!(response.status(), StatusCode::OK);
}

#[tokio::test]
async fn the_relay_listener_closes_with_the_gateway_drain() {
    let acquirer = Acquirer::new();
    let h = Harness::with(
        |_| {},
        |config| {
            relay_on(config, &acquirer);
            config.server.drain_delay = Duration::from_millis(100);
        },
    )
    .await;
    let addr = h.gateway.relay_addr().unwrap();
    let Harness { gateway, .. } = h;
    tokio::time::timeout(Duration::from_secs(20), gateway.stop())
        .await
        .expect("the drain ends");
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

/// Log lines, captured.
#[derive(Clone, Default)]
struct Capture(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn the_path_token_and_the_request_id_never_reach_the_logs() {
    let capture = Capture::default();
    let writer = capture.clone();
    // This test's thread (and so the gateway's tasks on its runtime) logs at TRACE here.
    let subscriber = tracing_subscriber::fmt()
        .json()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let acquirer = Acquirer::new();
    let h = start(&acquirer, 0).await;
    let body = valid_package(&acquirer, 1);
    for _ in 0..2 {
        let reply = callback(&h, &ingress_path(), Some(REQUEST_ID), body.clone()).await;
        assert_eq!(reply.status, StatusCode::OK);
    }
    let wrong = format!("/diia/callback/{}", TOKEN.replace('8', "9"));
    callback(&h, &wrong, Some(REQUEST_ID), body).await;
    let not_cms = barcode_package("bm90IGNtcw==", "bm90IGNtcw==");
    callback(&h, &ingress_path(), Some(REQUEST_ID), not_cms).await;
    let logs = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    assert!(
        logs.contains("callback acknowledged") && logs.contains("acquirer-1"),
        "the capture sees the relay's lines"
    );
    assert!(!logs.contains(TOKEN), "the path token is logged");
    assert!(
        !logs.contains(&TOKEN.replace('8', "9")),
        "a wrong token is logged"
    );
    assert!(!logs.contains(REQUEST_ID), "the requestId is logged");
}
