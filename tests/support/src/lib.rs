//! Shared test harness of `tests/it` and `tests/fleet`: a real simulator and a real
//! gateway on loopback, and an HTTP client that talks to them over sockets; or a bare
//! gateway in front of any upstream (raw-socket fault servers). Every wait is bounded.

#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod cms;
pub mod prometheus;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use diia_gateway::config::FileConfig;
use diia_gateway::{RunningGateway, Settings, start};
use diia_sim::{
    DEMO_ACQUIRER_TOKEN, DEMO_AUTH_TOKEN, SimAcquirer, SimConfig, SimHandle, Simulator,
};
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

/// A second acquirer, for isolation tests.
pub const OTHER_ACQUIRER_TOKEN: &str = "other_test_token_000002";
/// Basic credentials of the second acquirer.
pub const OTHER_AUTH_TOKEN: &str = "YWNxdWlyZXJfMjpvdGhlcl90ZXN0X3Rva2VuXzAwMDAwMg==";

/// Longest any single test request may take before the test fails instead of hanging.
pub const REQUEST_BOUND: Duration = Duration::from_secs(20);

/// A simulator config on a free loopback port with two acquirers.
pub fn sim_config() -> SimConfig {
    SimConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        acquirers: vec![
            SimAcquirer {
                token: DEMO_ACQUIRER_TOKEN.to_owned(),
                auth_token: Some(DEMO_AUTH_TOKEN.to_owned()),
            },
            SimAcquirer {
                token: OTHER_ACQUIRER_TOKEN.to_owned(),
                auth_token: Some(OTHER_AUTH_TOKEN.to_owned()),
            },
        ],
        ..SimConfig::default()
    }
}

/// A gateway config on free loopback ports pointed at `base_url`.
pub fn gateway_config(base_url: &str) -> FileConfig {
    let mut config = FileConfig::default();
    config.server.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    config.server.admin_listen = SocketAddr::from(([127, 0, 0, 1], 0));
    config.upstream.base_url = base_url.to_owned();
    config.limits.branch.per_minute = 100_000.try_into().unwrap();
    config.limits.branch.burst = 10_000.try_into().unwrap();
    config.limits.client.per_minute = 1_000_000.try_into().unwrap();
    config.limits.client.burst = 100_000.try_into().unwrap();
    config
}

/// An answer as the test sees it.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    /// The body as JSON (panics with the body text when it is not).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    /// A header as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Our `gatewayCode`, for gateway-made errors.
    pub fn gateway_code(&self) -> String {
        self.json()["gatewayCode"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }
}

/// Simulator + gateway + client.
pub struct Harness {
    pub sim: SimHandle,
    pub gateway: RunningGateway,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Harness {
    /// Defaults everywhere.
    pub async fn start() -> Self {
        Self::with(|_| {}, |_| {}).await
    }

    /// Tweaks the simulator and gateway configs before starting them.
    pub async fn with(
        sim: impl FnOnce(&mut SimConfig),
        gateway: impl FnOnce(&mut FileConfig),
    ) -> Self {
        let mut sim_config = sim_config();
        sim(&mut sim_config);
        let sim = Simulator::start(sim_config)
            .await
            .expect("simulator starts");
        let mut config = gateway_config(&sim.base_url());
        gateway(&mut config);
        let gateway = start_gateway(config).await;
        Self {
            sim,
            gateway,
            client: client(),
        }
    }

    /// `http://gateway/path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.gateway.addr())
    }

    /// Sends a request to the gateway.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Reply {
        send(
            &self.client,
            method,
            &self.url(path),
            headers,
            body.to_owned(),
        )
        .await
    }

    /// A session token for the demo acquirer, through the gateway.
    pub async fn session_token(&self) -> String {
        self.session_token_for(DEMO_ACQUIRER_TOKEN, DEMO_AUTH_TOKEN)
            .await
    }

    /// A session token for an acquirer, through the gateway.
    pub async fn session_token_for(&self, acquirer: &str, basic: &str) -> String {
        let reply = self
            .send(
                Method::GET,
                &format!("/api/v1/auth/acquirer/{acquirer}"),
                &[("authorization", &format!("Basic {basic}"))],
                "",
            )
            .await;
        assert_eq!(
            reply.status,
            StatusCode::OK,
            "token exchange: {:?}",
            reply.body
        );
        reply.json()["token"].as_str().expect("token").to_owned()
    }

    /// POSTs JSON with a bearer token.
    pub async fn post(&self, path: &str, token: &str, body: &str) -> Reply {
        let bearer = format!("Bearer {token}");
        self.send(
            Method::POST,
            path,
            &[
                ("authorization", &bearer),
                ("content-type", "application/json"),
            ],
            body,
        )
        .await
    }

    /// `document-identification` for a branch and barcode.
    pub async fn identify(&self, token: &str, branch: &str, barcode: &str) -> Reply {
        self.post(
            "/api/v1/acquirers/document-identification",
            token,
            &format!(r#"{{"branchId":"{branch}","barcode":"{barcode}"}}"#),
        )
        .await
    }

    /// `document-request` by barcode.
    pub async fn share(&self, token: &str, branch: &str, barcode: &str, request_id: &str) -> Reply {
        self.post(
            "/api/v1/acquirers/document-request",
            token,
            &format!(
                r#"{{"branchId":"{branch}","barcode":"{barcode}","requestId":"{request_id}"}}"#
            ),
        )
        .await
    }

    /// Issues a barcode at the simulator over HTTP, as the phone app would.
    pub async fn issue_barcode(&self) -> String {
        let url = format!("{}/sim/barcodes", self.sim.base_url());
        let reply = send(&self.client, Method::POST, &url, &[], String::new()).await;
        assert_eq!(reply.status, StatusCode::CREATED);
        reply.json()["barcode"]
            .as_str()
            .expect("barcode")
            .to_owned()
    }

    /// The simulator's counters over HTTP.
    pub async fn sim_stats(&self) -> Value {
        let url = format!("{}/sim/stats", self.sim.base_url());
        send(&self.client, Method::GET, &url, &[], String::new())
            .await
            .json()
    }

    /// Requests the simulator saw for one endpoint label.
    pub async fn sim_calls(&self, endpoint: &str) -> u64 {
        self.sim_stats().await["requests"][endpoint]
            .as_u64()
            .expect("counter")
    }

    /// Requests the simulator saw in all.
    pub async fn sim_total(&self) -> u64 {
        self.sim_stats().await["total"].as_u64().expect("counter")
    }

    /// Replaces the simulator's fault knobs over HTTP.
    pub async fn set_faults(&self, faults: Value) {
        let url = format!("{}/sim/faults", self.sim.base_url());
        let reply = send(&self.client, Method::PUT, &url, &[], faults.to_string()).await;
        assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    }

    /// The admin `/metrics` text.
    pub async fn metrics(&self) -> String {
        let url = format!("http://{}/metrics", self.gateway.admin_addr());
        let reply = send(&self.client, Method::GET, &url, &[], String::new()).await;
        String::from_utf8(reply.body.to_vec()).expect("utf-8")
    }

    /// A counter value from `/metrics` (0 when absent).
    pub async fn metric(&self, name_and_labels: &str) -> f64 {
        metric_value(&self.metrics().await, name_and_labels)
    }
}

/// A bare gateway from a file config (no simulator): fault, reload and validation tests
/// point it at their own upstreams.
pub async fn start_gateway(config: FileConfig) -> RunningGateway {
    let settings = Settings::build(&config).expect("test config is valid");
    start(settings).await.expect("gateway starts")
}

/// The value of the exposition line starting with `name_and_labels`.
pub fn metric_value(text: &str, name_and_labels: &str) -> f64 {
    text.lines()
        .find_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            (name == name_and_labels)
                .then(|| value.parse().ok())
                .flatten()
        })
        .unwrap_or(0.0)
}

/// Issues a barcode at the simulator listening on `sim` (`host:port`).
pub async fn issue_barcode_at(client: &Client<HttpConnector, Full<Bytes>>, sim: &str) -> String {
    let url = format!("http://{sim}/sim/barcodes");
    let reply = send(client, Method::POST, &url, &[], String::new()).await;
    assert_eq!(reply.status, StatusCode::CREATED);
    reply.json()["barcode"]
        .as_str()
        .expect("barcode")
        .to_owned()
}

/// The test client type.
pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// A client bound to another loopback address (`127.0.0.2`, …), so the gateway sees
/// another client.
pub fn client_from(address: [u8; 4]) -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_local_address(Some(std::net::IpAddr::from(address)));
    Client::builder(TokioExecutor::new()).build(connector)
}

/// A plain HTTP/1.1 client.
pub fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// Sends one request and buffers the answer, failing the test after [`REQUEST_BOUND`].
pub async fn send(
    client: &Client<HttpConnector, Full<Bytes>>,
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: String,
) -> Reply {
    let mut builder = Request::builder().method(method).uri(url);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let request = builder.body(Full::new(Bytes::from(body))).expect("request");
    let response = tokio::time::timeout(REQUEST_BOUND, client.request(request))
        .await
        .expect("answer within bound")
        .expect("HTTP exchange");
    let (parts, body) = response.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// What a stand-in upstream answers to a path: status, extra headers, body.
pub type StandIn = fn(&str) -> (u16, &'static [(&'static str, &'static str)], &'static str);

/// A Diia stand-in (not the simulator) on a free loopback port: a plain hyper server that
/// answers every request with `answer(path)`.
pub async fn stand_in_upstream(answer: StandIn) -> SocketAddr {
    use hyper::service::service_fn;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let service = service_fn(move |request: Request<hyper::body::Incoming>| async move {
                let (status, headers, body) = answer(request.uri().path());
                let mut response =
                    http::Response::new(Full::new(Bytes::from_static(body.as_bytes())));
                *response.status_mut() = StatusCode::from_u16(status).unwrap();
                for (name, value) in headers {
                    response
                        .headers_mut()
                        .insert(*name, http::HeaderValue::from_static(value));
                }
                Ok::<_, std::convert::Infallible>(response)
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service),
            );
        }
    });
    addr
}

/// A loopback port with nothing listening on it, held for as long as the value lives:
/// the socket is bound but never listens, so a connection is refused, and no other bind
/// (the kernel's `:0` picks included) can take the port meanwhile.
pub struct DeadPort(socket2::Socket);

impl DeadPort {
    /// The refused address.
    pub fn addr(&self) -> SocketAddr {
        self.0
            .local_addr()
            .expect("bound")
            .as_socket()
            .expect("an IP address")
    }
}

impl std::fmt::Display for DeadPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.addr().fmt(f)
    }
}

/// A [`DeadPort`]; keep it in a variable for as long as the port must stay dead.
pub fn dead_port() -> DeadPort {
    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    socket
        .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .expect("bind");
    DeadPort(socket)
}

/// A loopback port for a server that cannot be handed a bound socket (`redis-server`):
/// drawn at random from below the kernel's ephemeral range, so no `:0` bind and no
/// outgoing connection of this machine is ever given it (those come from that range).
/// Two draws can still meet, and a foreign process may hold one: the caller sees its
/// server exit on "address in use" and draws again.
pub fn port_outside_ephemeral_range() -> u16 {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| {
            let mut bounds = text.split_whitespace().map(|n| n.parse::<u16>().ok());
            Some((bounds.next()??, bounds.next()??))
        })
        .unwrap_or((32768, 60999));
    let (low, high) = range;
    if low >= 11_024 {
        fastrand::u16(low - 10_000..low)
    } else {
        assert!(high < 64_535, "no port range outside {low}-{high}");
        fastrand::u16(high + 1..=65_535)
    }
}
