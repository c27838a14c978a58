//! Readers that never read, and answers given before the body was read (README
//! "Connection limits" and "Hostile clients"): a response that makes no write progress for
//! `server.send_timeout` costs the client its connection (the gateway's HTTP/1.1 loop,
//! hyper's HTTP/1.1 and HTTP/2 alike); an HTTP/2 connection without streams is closed after
//! `server.idle_timeout` however faithfully it answers pings; and a refusal given before
//! the body was read still reaches a client that writes its whole body first.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use support::Harness;
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::TcpStream;

const SEND_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a hostile socket may stay open once its attack is in place.
const CLOSE_BOUND: Duration = Duration::from_secs(4);
/// How long the test watches a socket before calling it held.
const WATCH: Duration = Duration::from_secs(20);

/// A connection with a ~1 KiB receive buffer and a small segment size: the gateway's send
/// buffer is sized from the segment size, so it fills after tens of kilobytes instead of
/// megabytes (a client chooses both).
async fn narrow_connection(address: SocketAddr) -> TcpStream {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
    socket.set_recv_buffer_size(1024).unwrap();
    socket.set_tcp_mss(536).unwrap();
    socket.set_nonblocking(true).unwrap();
    let socket = tokio::net::TcpSocket::from_std_stream(std::net::TcpStream::from(socket));
    socket.connect(address).await.unwrap()
}

/// Waits, without reading (the unread answers must stay unread), until the gateway closes
/// or resets the connection; `false` when it is still open after [`WATCH`].
async fn closed_by_peer(stream: &TcpStream) -> bool {
    let deadline = Instant::now() + WATCH;
    while Instant::now() < deadline {
        // Data already waiting keeps the socket readable: look at the closed bits only.
        match tokio::time::timeout(
            Duration::from_millis(50),
            stream.ready(Interest::READABLE | Interest::WRITABLE),
        )
        .await
        {
            Ok(Ok(ready)) if ready.is_read_closed() || ready.is_write_closed() => return true,
            Ok(Err(_)) => return true,
            Ok(Ok(_)) => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(_) => {}
        }
    }
    false
}

/// Pipelines requests on a narrow connection and never reads an answer. Returns how long
/// the gateway kept the connection once the pipeline stalled (the client's writes block:
/// the gateway stopped reading because it cannot write), or `None` when it never closed.
async fn pipeliner(address: SocketAddr, through_hyper: bool) -> Option<Duration> {
    let mut stream = narrow_connection(address).await;
    if through_hyper {
        // A chunked request: the gateway's loop hands the connection to hyper, which then
        // serves the rest of the pipeline itself.
        stream
            .write_all(
                b"POST /nope HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
            )
            .await
            .unwrap();
    }
    let batch = b"GET /nope HTTP/1.1\r\nhost: x\r\n\r\n".repeat(64);
    let started = Instant::now();
    loop {
        match tokio::time::timeout(Duration::from_millis(300), stream.write_all(&batch)).await {
            Ok(Ok(())) => assert!(started.elapsed() < WATCH, "the pipeline never stalled"),
            // Closed already (the gateway's write stalled before the client's did).
            Ok(Err(_)) => return Some(Duration::ZERO),
            Err(_) => break,
        }
    }
    let stalled = Instant::now();
    closed_by_peer(&stream).await.then(|| stalled.elapsed())
}

/// An h2c peer that advertises `SETTINGS_INITIAL_WINDOW_SIZE = window` (and never opens
/// it further), asks for one answer with a body, and then for another one every `every`
/// if given, keeping every stream; the h2 crate answers every PING while the connection
/// is polled. Returns how long the gateway kept the connection once the first answer's
/// head arrived, or `None` when it never closed.
async fn small_window_peer(
    address: SocketAddr,
    window: u32,
    every: Option<Duration>,
) -> Option<Duration> {
    let tcp = TcpStream::connect(address).await.unwrap();
    let (client, connection) = h2::client::Builder::new()
        .initial_window_size(window)
        .handshake::<_, Bytes>(tcp)
        .await
        .unwrap();
    let mut connection = tokio::spawn(connection);
    let mut client = client.ready().await.unwrap();
    let request = || {
        Request::get(format!("http://{address}/nope"))
            .body(())
            .unwrap()
    };
    let (response, _) = client.send_request(request(), true).unwrap();
    let response = response.await.unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let held = Instant::now();
    let mut kept = vec![response];
    let asking = async {
        while let Some(every) = every {
            tokio::time::sleep(every).await;
            let Ok(mut ready) = client.clone().ready().await else {
                break;
            };
            let Ok((response, _)) = ready.send_request(request(), true) else {
                break;
            };
            match response.await {
                Ok(response) => kept.push(response),
                Err(_) => break,
            }
        }
        std::future::pending::<()>().await;
    };
    let ended = tokio::time::timeout(WATCH, async {
        tokio::select! {
            _ = &mut connection => {}
            () = asking => {}
        }
    })
    .await
    .is_ok();
    drop((client, kept));
    ended.then(|| held.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_readers_and_zero_window_h2_peers_lose_their_connections_after_send_timeout() {
    let h = Harness::with(
        |_| {},
        |c| {
            c.server.max_connections = 50;
            c.server.send_timeout = SEND_TIMEOUT;
            c.server.idle_timeout = Duration::from_secs(3);
            c.server.request_deadline = Duration::from_secs(2);
        },
    )
    .await;
    let address = h.gateway.addr();
    let mut attackers = Vec::new();
    for i in 0..20 {
        attackers.push(tokio::spawn(pipeliner(address, i % 2 == 1)));
    }
    for _ in 0..20 {
        attackers.push(tokio::spawn(small_window_peer(address, 0, None)));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    let asked = Instant::now();
    let client = support::client();
    let login = tokio::time::timeout(
        Duration::from_secs(2),
        support::send(
            &client,
            Method::GET,
            &h.url(&format!(
                "/api/v1/auth/acquirer/{}",
                diia_sim::DEMO_ACQUIRER_TOKEN
            )),
            &[(
                "authorization",
                &format!("Basic {}", diia_sim::DEMO_AUTH_TOKEN),
            )],
            String::new(),
        ),
    )
    .await
    .expect("a normal request is answered within 2 s");
    assert_eq!(login.status, StatusCode::OK, "{:?}", login.body);
    let answered = asked.elapsed();

    let mut held = Vec::new();
    for (i, attacker) in attackers.into_iter().enumerate() {
        let kind = match i {
            0..20 if i % 2 == 0 => "h1 loop pipeliner",
            0..20 => "hyper h1 pipeliner",
            _ => "zero-window h2 peer",
        };
        held.push((kind, attacker.await.unwrap()));
    }
    eprintln!("normal request answered in {answered:?}; hostile sockets held: {held:?}");
    for (kind, open) in held {
        let open = open.unwrap_or_else(|| panic!("a {kind} kept its connection past {WATCH:?}"));
        assert!(open <= CLOSE_BOUND, "a {kind} kept its connection {open:?}");
    }

    // Every slot is back: 50 connections at once are all served.
    let fresh: Vec<_> = (0..50)
        .map(|_| tokio::spawn(answered_on_a_held_connection(address)))
        .collect();
    let mut connections = Vec::new();
    for connection in fresh {
        connections.push(connection.await.unwrap());
    }
    drop(connections);
}

/// One request on a fresh connection, answered within 2 s; the connection is kept (the
/// caller holds it, so the connections count at once).
async fn answered_on_a_held_connection(address: SocketAddr) -> TcpStream {
    let mut stream = TcpStream::connect(address).await.unwrap();
    stream
        .write_all(b"GET /nope HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut answer = [0u8; 12];
    tokio::time::timeout(Duration::from_secs(2), stream.read_exact(&mut answer))
        .await
        .expect("answered within 2 s")
        .unwrap();
    assert_eq!(&answer[9..], b"404");
    stream
}

/// A peer that gives one byte of window and then none: the answer is past hyper but not
/// sent, which must count as a stall, not as an idle connection; and a new stream every
/// 700 ms (one more byte each) is no progress either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_peers_that_give_one_byte_of_window_lose_their_connections_after_send_timeout() {
    let h = Harness::with(
        |_| {},
        |c| {
            c.server.send_timeout = SEND_TIMEOUT;
            c.server.idle_timeout = Duration::from_secs(10);
            c.server.request_deadline = Duration::from_secs(2);
        },
    )
    .await;
    let address = h.gateway.addr();
    // Quiet ones, and ones that ask for a new answer every 700 ms (each gets one byte).
    let peers: Vec<_> = [None, Some(Duration::from_millis(700))]
        .into_iter()
        .cycle()
        .take(6)
        .map(|every| tokio::spawn(small_window_peer(address, 1, every)))
        .collect();
    for peer in peers {
        let open = peer.await.unwrap().expect("closed");
        assert!(open <= CLOSE_BOUND, "kept its connection {open:?}");
    }
}

/// 256 KiB of JSON, as a Diia stand-in answers it.
fn large_answer(_path: &str) -> (u16, &'static [(&'static str, &'static str)], &'static str) {
    static BODY: std::sync::LazyLock<String> =
        std::sync::LazyLock::new(|| format!(r#"{{"data":"{}"}}"#, "x".repeat(256 * 1024)));
    (200, &[("content-type", "application/json")], BODY.as_str())
}

/// An h2 reader that takes a large answer slowly but steadily (16 KiB every 300 ms, 5 s in
/// all) makes progress, so `send_timeout = 1s` does not cut it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_but_steady_h2_reader_keeps_its_connection() {
    let upstream = support::stand_in_upstream(large_answer).await;
    let mut config = support::gateway_config(&format!("http://{upstream}"));
    config.server.send_timeout = Duration::from_secs(1);
    let gateway = support::start_gateway(config).await;
    let address = gateway.addr();
    let tcp = TcpStream::connect(address).await.unwrap();
    let (client, connection) = h2::client::Builder::new()
        .initial_window_size(16 * 1024)
        .handshake::<_, Bytes>(tcp)
        .await
        .unwrap();
    let connection = tokio::spawn(connection);
    let mut client = client.ready().await.unwrap();
    let request = Request::get(format!("http://{address}/api/v2/acquirers/branch/abc"))
        .header("authorization", "Bearer t")
        .body(())
        .unwrap();
    let (response, _) = client.send_request(request, true).unwrap();
    let response = tokio::time::timeout(WATCH, response)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let started = Instant::now();
    let mut body = response.into_body();
    let mut received = 0;
    while let Some(chunk) = tokio::time::timeout(WATCH, body.data()).await.unwrap() {
        let chunk = chunk.expect("the answer arrives whole");
        received += chunk.len();
        tokio::time::sleep(Duration::from_millis(300 * chunk.len() as u64 / 16384)).await;
        body.flow_control().release_capacity(chunk.len()).unwrap();
    }
    assert_eq!(received, 256 * 1024 + 11);
    assert!(
        started.elapsed() > Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert!(!connection.is_finished(), "the connection lives on");
    drop(client);
}

/// Reads an h2 answer's body whole, giving window as it comes.
async fn h2_body(response: http::Response<h2::RecvStream>) -> Vec<u8> {
    let mut body = response.into_body();
    let mut received = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.unwrap();
        body.flow_control().release_capacity(chunk.len()).unwrap();
        received.extend_from_slice(&chunk);
    }
    received
}

/// The default `send_timeout` (10s) is much longer than `idle_timeout` here, and the
/// second request is in flight when the connection has been open for `idle_timeout`: the
/// idle clock must start when it ends, not 10 s later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_connection_without_streams_is_closed_after_idle_timeout_despite_pings() {
    let idle = Duration::from_millis(1500);
    let h = Harness::with(
        |_| {},
        |c| {
            c.server.idle_timeout = idle;
            c.server.request_deadline = Duration::from_secs(1);
        },
    )
    .await;
    let address = h.gateway.addr();
    let tcp = TcpStream::connect(address).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    let connection = tokio::spawn(connection);
    let mut client = client.ready().await.unwrap();
    let opened = Instant::now();
    let request = Request::get(format!("http://{address}/nope"))
        .body(())
        .unwrap();
    let (response, _) = client.send_request(request, true).unwrap();
    let response = response.await.unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    // Whole, though its last byte travels in a frame of its own.
    let error: serde_json::Value = serde_json::from_slice(&h2_body(response).await).unwrap();
    assert_eq!(error["gatewayCode"], "unknown_route", "{error}");

    h.set_faults(serde_json::json!({"latency": "600ms"})).await;
    tokio::time::sleep_until((opened + Duration::from_secs(1)).into()).await;
    let login = Request::get(format!(
        "http://{address}/api/v1/auth/acquirer/{}",
        diia_sim::DEMO_ACQUIRER_TOKEN
    ))
    .header(
        "authorization",
        format!("Basic {}", diia_sim::DEMO_AUTH_TOKEN),
    )
    .body(())
    .unwrap();
    let mut client = client.ready().await.unwrap();
    let (response, _) = client.send_request(login, true).unwrap();
    let response = response.await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    h2_body(response).await;
    assert!(opened.elapsed() > idle, "in flight past idle_timeout");

    // No stream open from here on; the h2 crate answers the gateway's keep-alive pings.
    let quiet = Instant::now();
    let ended = tokio::time::timeout(WATCH, connection).await;
    assert!(ended.is_ok(), "still open {WATCH:?} after its last stream");
    let open = quiet.elapsed();
    assert!(
        open <= idle + Duration::from_secs(2),
        "closed after {open:?}"
    );
    drop(client);
}

/// Writes a request with a 2 MB body whole before reading (as Python's urllib does), with
/// `content-length` (the gateway's own loop) or chunked (hyper's side), then reads the
/// status; `None` when the connection failed first (a reset instead of the answer).
async fn whole_body_then_status(
    address: SocketAddr,
    path: &str,
    authorization: bool,
    chunked: bool,
) -> Option<u16> {
    const SIZE: usize = 2 * 1024 * 1024;
    /// What urllib writes at a time (`http.client`'s `blocksize`).
    const CHUNK: usize = 8 * 1024;
    let mut stream = TcpStream::connect(address).await.ok()?;
    let framing = if chunked {
        "transfer-encoding: chunked".to_owned()
    } else {
        format!("content-length: {SIZE}")
    };
    let authorization = if authorization {
        "authorization: Bearer t\r\n"
    } else {
        ""
    };
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: x\r\n{authorization}content-type: application/json\r\n{framing}\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.ok()?;
    let chunk = vec![b' '; CHUNK];
    for _ in 0..SIZE / CHUNK {
        if chunked {
            stream
                .write_all(format!("{CHUNK:x}\r\n").as_bytes())
                .await
                .ok()?;
        }
        stream.write_all(&chunk).await.ok()?;
        if chunked {
            stream.write_all(b"\r\n").await.ok()?;
        }
    }
    if chunked {
        stream.write_all(b"0\r\n\r\n").await.ok()?;
    }
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), async {
        let mut buffer = [0u8; 4096];
        while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buffer[..n]),
            }
        }
    });
    read.await.ok()?;
    String::from_utf8_lossy(&answer).get(9..12)?.parse().ok()
}

/// 30 clients per refusal: an unknown route (404) and a real route without
/// `Authorization` (401), each answered before the body was read.
async fn early_refusals_are_delivered(chunked: bool) {
    let h = Harness::start().await;
    let address = h.gateway.addr();
    for (path, authorization, status) in [
        ("/api/v1/nope", true, 404),
        ("/api/v1/acquirers/document-identification", false, 401),
    ] {
        let mut seen = 0;
        let mut got = Vec::new();
        for _ in 0..30 {
            let answer = whole_body_then_status(address, path, authorization, chunked).await;
            if answer == Some(status) {
                seen += 1;
            }
            got.push(answer);
        }
        eprintln!("chunked: {chunked}: {seen}/30 clients saw their {status} on {path}");
        assert!(
            seen >= 29,
            "{seen}/30 clients saw their {status} on {path}: {got:?}"
        );
    }
    assert_eq!(h.sim_total().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_refusals_reach_clients_that_write_the_whole_body_first() {
    early_refusals_are_delivered(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_refusals_reach_chunked_clients_that_write_the_whole_body_first() {
    early_refusals_are_delivered(true).await;
}

/// A reader that stops reading once the gateway's answers fill the kernel's buffers: on
/// loopback the gateway's send buffer grows to hundreds of kilobytes, so hundreds of
/// pipelined answers are queued in the kernel without any write of the gateway's ever
/// stalling, and the connection is later closed (idle) with them still queued. Those
/// answers must not outlive the connection by more than `send_timeout` (the kernel's
/// `TCP_USER_TIMEOUT`): before, the orphaned socket kept them, and delivered every byte to
/// a reader that came back whenever it liked (a few bytes every few seconds was enough to
/// keep ~490 KB per socket pinned, beyond `max_connections_per_client`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_a_reader_never_took_do_not_outlive_the_connection() {
    use socket2::{Domain, Protocol, Socket, Type};
    let h = Harness::with(
        |_| {},
        |c| {
            c.server.send_timeout = SEND_TIMEOUT;
            c.server.idle_timeout = Duration::from_secs(3);
            c.server.request_deadline = Duration::from_secs(2);
        },
    )
    .await;
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
    socket.set_recv_buffer_size(1024).unwrap();
    socket.set_nonblocking(true).unwrap();
    let socket = tokio::net::TcpSocket::from_std_stream(std::net::TcpStream::from(socket));
    let mut stream = socket.connect(h.gateway.addr()).await.unwrap();
    // 2,000 requests for 404s (~300 KB of answers), written without reading any.
    let batch = b"GET /api/v1/nothing-here HTTP/1.1\r\nhost: x\r\n\r\n".repeat(100);
    for _ in 0..20 {
        match tokio::time::timeout(Duration::from_millis(500), stream.write_all(&batch)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) | Err(_) => break,
        }
    }
    // The gateway answers, goes idle, closes; then send_timeout for the kernel, and slack.
    tokio::time::sleep(Duration::from_secs(3) + SEND_TIMEOUT + Duration::from_secs(4)).await;
    let mut taken = 0usize;
    let mut buffer = vec![0u8; 64 * 1024];
    let reading = Instant::now();
    while reading.elapsed() < Duration::from_secs(3) {
        match tokio::time::timeout(Duration::from_millis(500), stream.read(&mut buffer)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => taken += n,
            Err(_) => {}
        }
    }
    assert!(
        taken < 64 * 1024,
        "{taken} bytes of answers were still delivered {:?} after the gateway let the \
         connection go",
        SEND_TIMEOUT + Duration::from_secs(7)
    );
}
