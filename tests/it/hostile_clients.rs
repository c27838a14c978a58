//! Hostile and unusual clients, each played on a raw socket or with exact bytes: the
//! gateway's promises hold at the edges (README "Hostile clients").

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::support;

use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use support::Harness;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const IDENT: &str = "/api/v1/acquirers/document-identification";

/// Writes `bytes` one at a time, `gap` apart, until the peer closes; returns how long the
/// peer kept the connection open.
async fn trickle(address: std::net::SocketAddr, bytes: &[u8], gap: Duration) -> Duration {
    let started = Instant::now();
    let mut stream = TcpStream::connect(address).await.unwrap();
    for byte in bytes {
        if stream.write_all(&[*byte]).await.is_err() {
            return started.elapsed();
        }
        let mut probe = [0u8; 64];
        if let Ok(Ok(0) | Err(_)) = tokio::time::timeout(gap, stream.read(&mut probe)).await {
            return started.elapsed();
        }
    }
    started.elapsed()
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

#[tokio::test]
async fn an_h2_preface_trickled_byte_by_byte_is_closed_at_the_header_deadline() {
    let h = Harness::with(
        |_| {},
        |c| c.server.header_read_timeout = Duration::from_millis(500),
    )
    .await;
    // 24 bytes, 150 ms apart: 3.6 s if the server let it run; each byte resets the
    // idle timer, so only a deadline from accept can end it.
    let open = trickle(h.gateway.addr(), H2_PREFACE, Duration::from_millis(150)).await;
    assert!(
        open < Duration::from_millis(1500),
        "closed {open:?} after accept"
    );
}

#[tokio::test]
async fn an_h1_head_trickled_byte_by_byte_is_closed_at_the_header_deadline() {
    let h = Harness::with(
        |_| {},
        |c| c.server.header_read_timeout = Duration::from_millis(500),
    )
    .await;
    let head = b"POST /api/v1/acquirers/document-identification HTTP/1.1\r\nhost: x\r\n\r\n";
    let open = trickle(h.gateway.addr(), head, Duration::from_millis(100)).await;
    assert!(
        open < Duration::from_millis(1500),
        "closed {open:?} after accept"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trickling_sockets_cannot_fill_the_connection_cap() {
    let h = Harness::with(
        |_| {},
        |c| {
            c.server.header_read_timeout = Duration::from_millis(500);
            c.server.max_connections = 20;
        },
    )
    .await;
    let address = h.gateway.addr();
    let tricklers: Vec<_> = (0..30)
        .map(|_| {
            tokio::spawn(
                async move { trickle(address, H2_PREFACE, Duration::from_millis(200)).await },
            )
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let token = tokio::time::timeout(Duration::from_secs(4), h.session_token())
        .await
        .expect("a normal client gets in once the tricklers are cut off");
    assert!(!token.is_empty());
    for trickler in tricklers {
        assert!(trickler.await.unwrap() < Duration::from_secs(3));
    }
}

/// Opens a connection that sends its head and 1 byte of a 100-byte body, then stalls.
async fn slow_upload(address: std::net::SocketAddr) -> TcpStream {
    let mut stream = TcpStream::connect(address).await.unwrap();
    let head = format!(
        "POST {IDENT} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer t\r\n\
         content-type: application/json\r\ncontent-length: 100\r\n\r\n{{"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_uploads_do_not_hold_processing_slots() {
    let h = Harness::with(|_| {}, |c| c.server.max_in_flight = 4).await;
    let mut stalled = Vec::new();
    for _ in 0..12 {
        stalled.push(slow_upload(h.gateway.addr()).await);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let token = h.session_token().await;
    let barcode = h.issue_barcode().await;
    let reply = h.identify(&token, "b1", &barcode).await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    drop(stalled);
}

/// Writes the whole oversized request, as Python's urllib does, then reads the answer.
async fn oversized_then_read(address: std::net::SocketAddr, size: usize) -> Option<u16> {
    let mut stream = TcpStream::connect(address).await.ok()?;
    let head = format!(
        "POST {IDENT} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer t\r\n\
         content-type: application/json\r\ncontent-length: {size}\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.ok()?;
    let body = vec![b' '; size];
    stream.write_all(&body).await.ok()?;
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), async {
        let mut buffer = [0u8; 4096];
        loop {
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    answer.extend_from_slice(&buffer[..n]);
                    if answer.windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
            }
        }
    });
    read.await.ok()?;
    let text = String::from_utf8_lossy(&answer);
    text.get(9..12)?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_body_written_whole_before_reading_gets_its_413() {
    let h = Harness::start().await;
    let mut seen = 0;
    for _ in 0..30 {
        if oversized_then_read(h.gateway.addr(), 2 * 1024 * 1024).await == Some(413) {
            seen += 1;
        }
    }
    assert!(seen >= 29, "{seen}/30 clients saw their 413");
    assert_eq!(h.sim_total().await, 0);
}

#[tokio::test]
async fn one_header_over_the_limit_is_431() {
    let h = Harness::with(|_| {}, |c| c.server.max_header_bytes = 16 * 1024).await;
    let huge = "x".repeat(20 * 1024);
    let reply = h
        .send(
            Method::POST,
            IDENT,
            &[
                ("authorization", "Bearer t"),
                ("content-type", "application/json"),
                ("x-huge", &huge),
            ],
            r#"{"branchId":"b","barcode":"3389798072091"}"#,
        )
        .await;
    assert_eq!(reply.status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    assert_eq!(h.sim_total().await, 0);
}

#[tokio::test]
async fn escaped_json_is_decoded_and_shares_the_cache_entry() {
    let h = Harness::start().await;
    let token = h.session_token().await;
    let barcode = h.issue_barcode().await;
    let plain = h
        .post(
            IDENT,
            &token,
            &format!(r#"{{"branchId":"Київ-1","barcode":"{barcode}"}}"#),
        )
        .await;
    assert_eq!(plain.status, StatusCode::OK, "{:?}", plain.body);
    // Python's json.dumps: non-ASCII escaped, spaces after separators, other key order.
    let escaped_barcode: String = barcode
        .chars()
        .map(|c| format!("\\u{:04x}", c as u32))
        .collect();
    let python = h
        .post(
            IDENT,
            &token,
            &format!(
                r#"{{"barcode": "{escaped_barcode}", "branchId": "\u041a\u0438\u0457\u0432-1"}}"#
            ),
        )
        .await;
    assert_eq!(python.status, StatusCode::OK, "{:?}", python.body);
    assert_eq!(python.header("cache-status"), Some("diia-gateway; hit"));
    assert_eq!(h.sim_calls("document_identification").await, 1);
}

#[tokio::test]
async fn escaped_qrcode_from_php_is_accepted() {
    let h = Harness::start().await;
    let token = h.session_token().await;
    let reply = h
        .post(
            "/api/v1/acquirers/document-request",
            &token,
            r#"{"branchId":"b1","qrcode":"https:\/\/diia.app\/documents\/x\/1\/verify\/2","requestId":"r1"}"#,
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
}

#[tokio::test]
async fn duplicate_member_names_are_400_and_never_forwarded() {
    let h = Harness::start().await;
    let token = h.session_token().await;
    let a = h.issue_barcode().await;
    let b = h.issue_barcode().await;
    for body in [
        format!(r#"{{"branchId":"b","barcode":"{a}","barcode":"{b}"}}"#),
        format!(r#"{{"branchId":"b","barcode":"{a}","barcod\u0065":"{b}"}}"#),
    ] {
        let reply = h.post(IDENT, &token, &body).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(reply.gateway_code(), "invalid_json");
    }
    assert_eq!(h.sim_calls("document_identification").await, 0);
}

#[tokio::test]
async fn barcode_and_qrcode_together_are_422() {
    let h = Harness::start().await;
    let token = h.session_token().await;
    let barcode = h.issue_barcode().await;
    let reply = h
        .post(
            "/api/v1/acquirers/document-request",
            &token,
            &format!(
                r#"{{"branchId":"b","barcode":"{barcode}","qrcode":"https://diia.app/x","requestId":"r"}}"#
            ),
        )
        .await;
    assert_eq!(reply.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(reply.gateway_code(), "barcode_and_qrcode");
    assert_eq!(h.sim_stats().await["pushes"], 0);
}

#[tokio::test]
async fn a_body_not_declared_json_is_415_and_fills_no_cache_entry() {
    let h = Harness::start().await;
    let token = h.session_token().await;
    let barcode = h.issue_barcode().await;
    let body = format!(r#"{{"branchId":"b","barcode":"{barcode}"}}"#);
    let bearer = format!("Bearer {token}");
    for content_type in [
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        None,
    ] {
        let mut headers = vec![("authorization", bearer.as_str())];
        if let Some(content_type) = content_type {
            headers.push(("content-type", content_type));
        }
        let reply = h.send(Method::POST, IDENT, &headers, &body).await;
        assert_eq!(reply.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
        assert_eq!(reply.gateway_code(), "unsupported_media_type");
    }
    let json = h
        .send(
            Method::POST,
            IDENT,
            &[
                ("authorization", bearer.as_str()),
                ("content-type", "application/json; charset=UTF-8"),
            ],
            &body,
        )
        .await;
    assert_eq!(json.status, StatusCode::OK);
    assert_eq!(
        json.header("cache-status"),
        Some("diia-gateway; fwd=miss; stored")
    );
}

/// Sends one raw request line and returns the status.
async fn raw_status(address: std::net::SocketAddr, method: &str, path: &str) -> u16 {
    let mut stream = TcpStream::connect(address).await.unwrap();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer t\r\nconnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer))
        .await
        .unwrap()
        .unwrap();
    String::from_utf8_lossy(&answer)[9..12].parse().unwrap()
}

#[tokio::test]
async fn dot_segments_and_encoded_ids_are_404_and_never_forwarded() {
    let h = Harness::start().await;
    for path in [
        "/api/v2/acquirers/branch/..",
        "/api/v2/acquirers/branch/.",
        "/api/v2/acquirers/branch/%2e%2e",
        "/api/v2/acquirers/branch/a%2Fb",
        "/api/v2/acquirers/branch/%61bc",
        "/api/v1/acquirers/branch/../offers",
        "/api/v1/auth/acquirer/..",
    ] {
        assert_eq!(
            raw_status(h.gateway.addr(), "GET", path).await,
            404,
            "{path}"
        );
    }
    assert_eq!(h.sim_total().await, 0);
}

#[tokio::test]
async fn method_not_allowed_names_the_routes_methods_and_cached_posts_take_no_query() {
    let h = Harness::start().await;
    let wrong = h
        .send(Method::GET, IDENT, &[("authorization", "Bearer t")], "")
        .await;
    assert_eq!(wrong.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(wrong.header("allow"), Some("POST"));
    assert_eq!(wrong.json()["name"], "MethodNotAllowedError");
    let branch = h
        .send(
            Method::POST,
            "/api/v2/acquirers/branch/abc",
            &[("authorization", "Bearer t")],
            "",
        )
        .await;
    assert_eq!(branch.header("allow"), Some("GET, PUT, DELETE"));

    let token = h.session_token().await;
    let barcode = h.issue_barcode().await;
    let with_query = h
        .post(
            &format!("{IDENT}?x=1"),
            &token,
            &format!(r#"{{"branchId":"b","barcode":"{barcode}"}}"#),
        )
        .await;
    assert_eq!(with_query.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(with_query.gateway_code(), "invalid_query");
    assert_eq!(h.sim_calls("document_identification").await, 0);
}

/// A Diia stand-in that redirects every request.
fn redirecting(_path: &str) -> (u16, &'static [(&'static str, &'static str)], &'static str) {
    (302, &[("location", "https://diia.app/moved")], "")
}

#[tokio::test]
async fn a_diia_redirect_keeps_its_location() {
    let upstream = support::stand_in_upstream(redirecting).await;
    let gateway =
        support::start_gateway(support::gateway_config(&format!("http://{upstream}"))).await;
    let client = support::client();
    let url = format!("http://{}/api/v2/acquirers/branch/abc", gateway.addr());
    let reply = support::send(
        &client,
        Method::GET,
        &url,
        &[("authorization", "Bearer t")],
        String::new(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::FOUND);
    assert_eq!(reply.header("location"), Some("https://diia.app/moved"));
}

/// The exact requests of Diia's official Python SDK (`requests`, `json.dumps` defaults):
/// login with `Authorization: Bearer <acquirer token>`, the branch list, identification
/// twice (a re-scan), then sharing.
#[tokio::test]
async fn the_official_python_sdk_works_through_the_gateway() {
    let h = Harness::start().await;
    let sdk_headers = |auth: String| {
        vec![
            ("user-agent".to_owned(), "python-requests/2.31.0".to_owned()),
            ("accept".to_owned(), "application/json".to_owned()),
            ("content-type".to_owned(), "application/json".to_owned()),
            ("authorization".to_owned(), auth),
        ]
    };
    let send = |method: Method, path: String, headers: Vec<(String, String)>, body: String| {
        let h = &h;
        async move {
            let headers: Vec<(&str, &str)> = headers
                .iter()
                .map(|(n, v)| (n.as_str(), v.as_str()))
                .collect();
            h.send(method, &path, &headers, &body).await
        }
    };
    let login = send(
        Method::GET,
        format!("/api/v1/auth/acquirer/{}", diia_sim::DEMO_ACQUIRER_TOKEN),
        sdk_headers(format!("Bearer {}", diia_sim::DEMO_ACQUIRER_TOKEN)),
        String::new(),
    )
    .await;
    assert_eq!(login.status, StatusCode::OK, "{:?}", login.body);
    let token = login.json()["token"].as_str().unwrap().to_owned();
    let bearer = format!("Bearer {token}");

    let branches = send(
        Method::GET,
        "/api/v2/acquirers/branches".to_owned(),
        sdk_headers(bearer.clone()),
        String::new(),
    )
    .await;
    assert_eq!(branches.status, StatusCode::OK, "{:?}", branches.body);

    let barcode = h.issue_barcode().await;
    let body = format!(r#"{{"branchId": "\u041a\u0438\u0457\u0432-1", "barcode": "{barcode}"}}"#);
    for (scan, cache) in [
        (1, "diia-gateway; fwd=miss; stored"),
        (2, "diia-gateway; hit"),
    ] {
        let reply = send(
            Method::POST,
            IDENT.to_owned(),
            sdk_headers(bearer.clone()),
            body.clone(),
        )
        .await;
        assert_eq!(
            reply.status,
            StatusCode::OK,
            "scan {scan}: {:?}",
            reply.body
        );
        assert_eq!(reply.json()["success"], true);
        assert_eq!(reply.header("cache-status"), Some(cache));
    }
    let shared = h.issue_barcode().await;
    let share = send(
        Method::POST,
        "/api/v1/acquirers/document-request".to_owned(),
        sdk_headers(bearer),
        format!(
            r#"{{"branchId": "\u041a\u0438\u0457\u0432-1", "barcode": "{shared}", "requestId": "3f1c2d4e-5f60-4b8e-9a59-7d1e3c5a0b9f"}}"#
        ),
    )
    .await;
    assert_eq!(share.status, StatusCode::OK, "{:?}", share.body);
    assert_eq!(h.sim_stats().await["pushes"], 1);
}
