//! The callback relay across a fleet: two gateways on one Redis, the relay on both (their
//! own stores, the same seal keys, acquirer token and certificate, and the same push
//! target). A callback that reaches B for a consent push that went through A is delivered,
//! once, byte for byte, whichever arrives first; a requestId routed through A cannot be
//! taken through B; and Redis holds neither the requestId nor the branch in clear.
//! Without a push target (the branch pulls), a package that reached B is pulled and
//! acknowledged through A, B's record settles, and only the route's caller gets it.

use diia_gateway_testkit::cms::enveloped_for;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use diia_gateway::RunningGateway;
use diia_gateway::config::{CallbackRelayConfig, RelayAcquirerConfig, RelayTargetConfig};
use diia_gateway::relay::{CallbackStore, Envelope, Ingest, State};
use diia_gateway_testkit::{HttpClient, Reply, client, gateway_config, send, start_gateway};
use diia_gateway_testkit::{OTHER_ACQUIRER_TOKEN, OTHER_AUTH_TOKEN};
use diia_sim::{DEMO_ACQUIRER_TOKEN, DEMO_AUTH_TOKEN, SimHandle};
use http::{HeaderMap, Method, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tempfile::TempDir;
use tokio::net::TcpListener;

use crate::nothing_in_clear_in_redis::ACL;
use crate::processes::{Redis, SERIAL, fresh_barcode, redis_available, simulator};

const PATH_TOKEN: &str = "8f1c2b7d4e6a9f0b3c5d7e9f1a2b4c6d8e0f1a3b5c7d9e1f2a4b6c8d0e2f4a6b";
const BOUNDARY: &str = "diia-fleet-boundary-41c9";
const BRANCH: &str = "branch-fleet-7731";
const SECRET: &str = "9f9f9f9f9f9f9f9f9f9f9f9f9f9f9f9f3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c";

/// What the branch backend received: headers and body.
type Received = Arc<Mutex<Vec<(HeaderMap, Bytes)>>>;

/// A branch backend on loopback that records every POST and answers `{"success":true}`.
async fn branch_backend() -> (SocketAddr, Received) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let received: Received = Arc::default();
    let sink = Arc::clone(&received);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let sink = Arc::clone(&sink);
            tokio::spawn(async move {
                let service = service_fn(move |request: http::Request<hyper::body::Incoming>| {
                    let sink = Arc::clone(&sink);
                    async move {
                        let (parts, body) = request.into_parts();
                        let body = body.collect().await?.to_bytes();
                        sink.lock().unwrap().push((parts.headers, body));
                        Ok::<_, hyper::Error>(http::Response::new(Full::new(Bytes::from_static(
                            br#"{"success":true}"#,
                        ))))
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, received)
}

/// The files both instances share: fleet secret, relay seal keys, the acquirer's path
/// token and certificate, the target's signing secret.
struct Shared {
    dir: TempDir,
    cert_der: Vec<u8>,
}

impl Shared {
    fn new() -> Self {
        let dir = TempDir::new().unwrap();
        let certified = rcgen::generate_simple_self_signed(vec!["acquirer.test".into()]).unwrap();
        let write = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).unwrap();
        write("cert.pem", &certified.cert.pem());
        write(
            "keys",
            "k1 = 3a7f0c9e1b2d4f6a8c0e2b4d6f8a1c3e5b7d9f0a2c4e6b8d0f1a3c5e7b9d1f2a\n",
        );
        write("token", &format!("{PATH_TOKEN}\n"));
        write("fleet-secret", SECRET);
        write("redis-password", "gateway-test-password\n");
        write(
            "whsec",
            &format!("whsec_{}\n", STANDARD.encode(b"branch-backoffice-secret")),
        );
        Self {
            cert_der: certified.cert.der().to_vec(),
            dir,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// One fleet instance with the relay on; `data` is its own store's directory; `tweak`
/// changes its relay config. Without a `target`, the branch pulls its packages.
async fn instance(
    sim: &SimHandle,
    redis: &Redis,
    shared: &Shared,
    target: Option<SocketAddr>,
    data: &TempDir,
    tweak: impl FnOnce(&mut CallbackRelayConfig),
) -> RunningGateway {
    let mut config = gateway_config(&sim.base_url());
    let fleet = &mut config.scaleout;
    fleet.enabled = true;
    // The restricted ACL user the docs give is enough for the relay's routes too.
    fleet.redis_url = format!("redis://diia-gateway@127.0.0.1:{}", redis.port);
    fleet.redis_password_file = Some(shared.path("redis-password"));
    fleet.secret_file = Some(shared.path("fleet-secret"));
    // Debug builds on two shared cores: keep Redis from counting as down on noise alone.
    fleet.command_timeout = Duration::from_millis(250);
    let relay = &mut config.callback_relay;
    relay.enabled = true;
    relay.listen = "127.0.0.1:0".parse().unwrap();
    relay.data_dir = data.path().to_owned();
    relay.seal_key_file = Some(shared.path("keys"));
    relay.max_body = 256 * 1024;
    relay.acquirer = vec![RelayAcquirerConfig {
        name: "acquirer-1".into(),
        path_token_file: shared.path("token"),
        recipient_cert_file: shared.path("cert.pem"),
        default_target: None,
    }];
    relay.target = target
        .map(|target| RelayTargetConfig {
            name: "backoffice".into(),
            url: format!("http://{target}/diia/documents"),
            signing_secret_file: shared.path("whsec"),
            branch_ids: vec![BRANCH.into()],
        })
        .into_iter()
        .collect();
    tweak(relay);
    start_gateway(config).await
}

/// Redis, a simulator, a branch backend and two relay-enabled gateways (A, B) that both
/// see Redis up.
struct World {
    redis: Redis,
    _sim: SimHandle,
    shared: Shared,
    a: RunningGateway,
    b: RunningGateway,
    received: Received,
    http: HttpClient,
    _dirs: (TempDir, TempDir),
    _serial: tokio::sync::MutexGuard<'static, ()>,
}

impl World {
    async fn start() -> Option<Self> {
        Self::start_with(true, |_| {}).await
    }

    /// Pull-only: no target serves the branch.
    async fn start_pull() -> Option<Self> {
        Self::start_with(false, |_| {}).await
    }

    /// Pushing to the target (or pull-only), with B's relay config changed by `tweak_b`.
    async fn start_with(
        push: bool,
        tweak_b: impl FnOnce(&mut CallbackRelayConfig),
    ) -> Option<Self> {
        let serial = SERIAL.lock().await;
        if !redis_available() {
            return None;
        }
        let redis = Redis::start(&["--rdbcompression", "no"]).await;
        assert_eq!(redis.command(ACL).await.as_deref(), Some("+OK"));
        let sim = simulator().await;
        let shared = Shared::new();
        let (target, received) = branch_backend().await;
        let dirs = (TempDir::new().unwrap(), TempDir::new().unwrap());
        let target = push.then_some(target);
        let a = instance(&sim, &redis, &shared, target, &dirs.0, |_| {}).await;
        let b = instance(&sim, &redis, &shared, target, &dirs.1, tweak_b).await;
        let world = Self {
            redis,
            _sim: sim,
            shared,
            a,
            b,
            received,
            http: client(),
            _dirs: dirs,
            _serial: serial,
        };
        for gateway in [&world.a, &world.b] {
            let deadline = Instant::now() + Duration::from_secs(10);
            while world.metric(gateway, "diia_gateway_redis_up").await != 1.0 {
                assert!(Instant::now() < deadline, "Redis never up for an instance");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Some(world)
    }

    async fn metric(&self, gateway: &RunningGateway, name: &str) -> f64 {
        let url = format!("http://{}/metrics", gateway.admin_addr());
        let reply = send(&self.http, Method::GET, &url, &[], String::new()).await;
        diia_gateway_testkit::metric_value(&String::from_utf8_lossy(&reply.body), name)
    }

    async fn session_token(&self, gateway: &RunningGateway, acquirer: &str, basic: &str) -> String {
        let url = format!("http://{}/api/v1/auth/acquirer/{acquirer}", gateway.addr());
        let basic = format!("Basic {basic}");
        let reply = send(
            &self.http,
            Method::GET,
            &url,
            &[("authorization", basic.as_str())],
            String::new(),
        )
        .await;
        assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
        reply.json()["token"].as_str().unwrap().to_owned()
    }

    /// A consent push (`document-request`) for `barcode` through `gateway`.
    async fn push(
        &self,
        gateway: &RunningGateway,
        token: &str,
        barcode: &str,
        request_id: &str,
    ) -> Reply {
        let url = format!(
            "http://{}/api/v1/acquirers/document-request",
            gateway.addr()
        );
        let bearer = format!("Bearer {token}");
        let body = format!(
            r#"{{"branchId":"{BRANCH}","barcode":"{barcode}","requestId":"{request_id}"}}"#
        );
        send(
            &self.http,
            Method::POST,
            &url,
            &[
                ("authorization", bearer.as_str()),
                ("content-type", "application/json"),
            ],
            body,
        )
        .await
    }

    /// Diia's callback for `request_id`, POSTed to `gateway`'s relay listener.
    async fn callback(&self, gateway: &RunningGateway, request_id: &str, body: &str) -> Reply {
        let addr = gateway.relay_addr().expect("relay listens");
        let url = format!("http://{addr}/diia/callback/{PATH_TOKEN}");
        let content_type = format!("multipart/form-data; boundary={BOUNDARY}");
        send(
            &self.http,
            Method::POST,
            &url,
            &[
                ("content-type", content_type.as_str()),
                ("x-document-request-trace-id", request_id),
            ],
            body.to_owned(),
        )
        .await
    }

    /// The branch's pull (`GET`, waiting up to `wait`) or acknowledgement (`DELETE`) of
    /// `request_id` through `gateway`'s branch listener.
    async fn pull(
        &self,
        gateway: &RunningGateway,
        method: Method,
        token: &str,
        request_id: &str,
        query: &str,
    ) -> Reply {
        let url = format!(
            "http://{}/relay/v1/callbacks/{request_id}{query}",
            gateway.addr()
        );
        let bearer = format!("Bearer {token}");
        send(
            &self.http,
            method,
            &url,
            &[("authorization", bearer.as_str())],
            String::new(),
        )
        .await
    }

    /// Waits (10 s at most) until `gateway`'s metric `name` reaches `value`.
    async fn wait_metric(&self, gateway: &RunningGateway, name: &str, value: f64) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let now = self.metric(gateway, name).await;
            if now >= value {
                return;
            }
            assert!(Instant::now() < deadline, "{name} is {now}, not {value}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A pull-only package for `request_id`: its consent push through A under `token`,
    /// then Diia's callback (package `fill`) through B, which holds the record and copies
    /// it to Redis (the `copies`-th copy). Returns the body posted.
    async fn pushed_on_a_stored_on_b(
        &self,
        token: &str,
        request_id: &str,
        fill: u8,
        copies: f64,
    ) -> String {
        let pushed = self
            .push(&self.a, token, &fresh_barcode(), request_id)
            .await;
        assert_eq!(pushed.status, StatusCode::OK, "{pushed:?}");
        let body = self.package(fill);
        let stored = self.callback(&self.b, request_id, &body).await;
        assert_eq!(stored.status, StatusCode::OK, "{stored:?}");
        self.wait_metric(&self.b, COPIES_STORED, copies).await;
        body
    }

    /// Diia's callback (package `fill`) for `request_id` through `gateway`: acknowledged,
    /// then delivered by that instance to the branch's target, once, byte for byte.
    async fn callback_is_delivered(&self, gateway: &RunningGateway, request_id: &str, fill: u8) {
        let body = self.package(fill);
        let stored = self.callback(gateway, request_id, &body).await;
        assert_eq!(stored.status, StatusCode::OK, "{stored:?}");
        self.wait_for(gateway, State::Delivered, 1).await;
        assert_byte_for_byte(&self.delivered(1).await, &body, request_id);
    }

    /// A package for the shared acquirer certificate.
    fn package(&self, fill: u8) -> String {
        let file = enveloped_for(&self.shared.cert_der, &vec![fill; 32 * 1024]);
        let data = enveloped_for(&self.shared.cert_der, &[fill; 64]);
        format!(
            "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"encryptedFile\"; filename=\"doc.p7s.p7e\"\r\n\
             Content-Type: application/octet-stream\r\n\r\n{file}\r\n\
             --{BOUNDARY}\r\nContent-Disposition: form-data; name=\"encryptedFileName\"\r\n\r\ndoc.p7s.p7e\r\n\
             --{BOUNDARY}\r\nContent-Disposition: form-data; name=\"encodeData\"\r\n\r\n{data}\r\n\
             --{BOUNDARY}--\r\n"
        )
    }

    /// Waits (10 s at most) until `gateway`'s store holds `count` records in `state`.
    async fn wait_for(&self, gateway: &RunningGateway, state: State, count: u64) {
        let store = gateway.relay_store().expect("relay store");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let counts = store
                .stats(diia_gateway::relay::now_ms())
                .await
                .unwrap()
                .counts;
            if counts[state.code() as usize] == count {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "no {count} {state:?} records in time: {counts:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the backend has `count` deliveries, then a little longer to see that no
    /// more follow.
    async fn delivered(&self, count: usize) -> Vec<(HeaderMap, Bytes)> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.received.lock().unwrap().len() < count {
            assert!(Instant::now() < deadline, "not delivered in time");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(600)).await;
        self.received.lock().unwrap().clone()
    }
}

fn assert_byte_for_byte(delivered: &[(HeaderMap, Bytes)], body: &str, request_id: &str) {
    assert_eq!(delivered.len(), 1, "delivered exactly once");
    let (headers, bytes) = &delivered[0];
    assert!(bytes.as_ref() == body.as_bytes(), "body changed on the way");
    assert_eq!(
        headers["content-type"],
        format!("multipart/form-data; boundary={BOUNDARY}")
    );
    assert_eq!(headers["x-document-request-trace-id"], request_id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callback_reaching_another_instance_is_delivered_once_and_redis_holds_nothing_in_clear() {
    let Some(world) = World::start().await else {
        return;
    };
    let token = world
        .session_token(&world.a, DEMO_ACQUIRER_TOKEN, DEMO_AUTH_TOKEN)
        .await;
    let request_id = "fleet-relay-req-5c1e9a";
    let pushed = world
        .push(&world.a, &token, &fresh_barcode(), request_id)
        .await;
    assert_eq!(pushed.status, StatusCode::OK, "{pushed:?}");
    assert_eq!(
        world
            .metric(
                &world.a,
                "diia_gateway_relay_route_copies_total{result=\"stored\"}"
            )
            .await,
        1.0
    );

    let body = world.package(3);
    let stored = world.callback(&world.b, request_id, &body).await;
    assert_eq!(stored.status, StatusCode::OK, "{stored:?}");
    // Routed at ingress by the route found in Redis, not left an orphan for the sweep.
    assert_eq!(
        world
            .metric(
                &world.b,
                "diia_gateway_relay_ingest_total{result=\"stored\"}"
            )
            .await,
        1.0
    );
    assert_eq!(
        world
            .metric(
                &world.b,
                "diia_gateway_relay_route_lookups_total{result=\"found\"}"
            )
            .await,
        1.0
    );
    world.wait_for(&world.b, State::Delivered, 1).await;
    assert_byte_for_byte(&world.delivered(1).await, &body, request_id);
    // A holds the route, not the callback: nothing for it to deliver.
    let a_store = world.a.relay_store().unwrap();
    let counts = a_store.stats(diia_gateway::relay::now_ms()).await.unwrap();
    assert_eq!(counts.counts, [0; 5]);

    // Nothing in clear in Redis: neither in key names nor in values (a dump of all).
    let keys = world.redis.keys().await;
    assert!(
        keys.iter().any(|k| k.starts_with("{dg}:relay-route:")),
        "no route copied: {keys:?}"
    );
    assert_eq!(world.redis.command(&["SAVE"]).await.as_deref(), Some("+OK"));
    let dump = std::fs::read(world.redis.dir().join("dump.rdb")).unwrap();
    let dump = String::from_utf8_lossy(&dump);
    assert!(
        dump.contains("{dg}:relay-route:"),
        "the dump holds no route"
    );
    for secret in [request_id, BRANCH, token.as_str(), "backoffice", PATH_TOKEN] {
        assert!(!dump.contains(secret), "{secret} is in the Redis dump");
        for key in &keys {
            assert!(!key.contains(secret), "{secret} in a key name");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callback_that_reaches_another_instance_before_the_push_is_delivered_once_routed() {
    let Some(world) = World::start().await else {
        return;
    };
    let token = world
        .session_token(&world.a, DEMO_ACQUIRER_TOKEN, DEMO_AUTH_TOKEN)
        .await;
    let request_id = "fleet-relay-orphan-77b2";
    let body = world.package(4);
    let stored = world.callback(&world.b, request_id, &body).await;
    assert_eq!(stored.status, StatusCode::OK, "{stored:?}");
    world.wait_for(&world.b, State::Orphan, 1).await;
    assert!(world.received.lock().unwrap().is_empty());

    let pushed = world
        .push(&world.a, &token, &fresh_barcode(), request_id)
        .await;
    assert_eq!(pushed.status, StatusCode::OK, "{pushed:?}");
    // B's sweep finds the route A copied to Redis (every 2 s).
    world.wait_for(&world.b, State::Delivered, 1).await;
    assert_byte_for_byte(&world.delivered(1).await, &body, request_id);
    world.wait_for(&world.b, State::Orphan, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_id_routed_through_one_instance_is_409_through_another_for_another_caller() {
    let Some(world) = World::start().await else {
        return;
    };
    let token = world
        .session_token(&world.a, DEMO_ACQUIRER_TOKEN, DEMO_AUTH_TOKEN)
        .await;
    let other = world
        .session_token(&world.b, OTHER_ACQUIRER_TOKEN, OTHER_AUTH_TOKEN)
        .await;
    let request_id = "fleet-relay-taken-3d04";
    let barcode = fresh_barcode();
    let pushed = world.push(&world.a, &token, &barcode, request_id).await;
    assert_eq!(pushed.status, StatusCode::OK, "{pushed:?}");

    let taken = world
        .push(&world.b, &other, &fresh_barcode(), request_id)
        .await;
    assert_eq!(taken.status, StatusCode::CONFLICT, "{taken:?}");
    assert_eq!(taken.gateway_code(), "request_id_routed");
    // B recorded nothing of its own: a later callback to B still goes to A's caller.
    let b_store = world.b.relay_store().unwrap();
    let route = b_store
        .route(
            "acquirer-1".into(),
            request_id.into(),
            diia_gateway::relay::now_ms(),
        )
        .await
        .unwrap();
    assert!(route.is_none(), "B kept a route of the refused caller");
    assert_eq!(
        world
            .metric(
                &world.b,
                "diia_gateway_relay_route_copies_total{result=\"taken\"}"
            )
            .await,
        1.0
    );
    // The owner's retry through B is accepted (the fleet's route is the same).
    let retry = world.push(&world.b, &token, &barcode, request_id).await;
    assert_eq!(retry.status, StatusCode::OK, "{retry:?}");
    world.callback_is_delivered(&world.b, request_id, 5).await;
}

/// A junk session token's push through A reserves the requestId fleet-wide while it is
/// under way; Diia refuses it, and the reservation goes from Redis as well as from A's
/// store, so the legitimate caller's push of the same requestId through B is accepted and
/// the package reaches its branch (before the fix, B found A's claim and answered 409
/// until `route_ttl`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_junk_push_leaves_no_fleet_claim_behind() {
    let Some(world) = World::start().await else {
        return;
    };
    let request_id = "fleet-relay-junk-9e41";
    let junk = format!("junk-session-token-{}", fastrand::u64(..));
    let refused = world
        .push(&world.a, &junk, &fresh_barcode(), request_id)
        .await;
    assert!(
        matches!(
            refused.status,
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN
        ),
        "{refused:?}"
    );
    assert_eq!(
        world
            .metric(
                &world.a,
                "diia_gateway_relay_route_copies_total{result=\"stored\"}"
            )
            .await,
        1.0,
        "the junk push's route was not claimed in Redis at all"
    );
    let keys = world.redis.keys().await;
    assert!(
        !keys.iter().any(|k| k.starts_with("{dg}:relay-route:")),
        "the refused push's claim is still in Redis: {keys:?}"
    );

    let token = world
        .session_token(&world.b, DEMO_ACQUIRER_TOKEN, DEMO_AUTH_TOKEN)
        .await;
    let pushed = world
        .push(&world.b, &token, &fresh_barcode(), request_id)
        .await;
    assert_eq!(pushed.status, StatusCode::OK, "{pushed:?}");
    world.callback_is_delivered(&world.a, request_id, 6).await;
}

/// More orphans wait on B than one sweep looks up (512), none of them with a route in
/// Redis; then the newest one's push goes through A. B's sweeps page through its orphans
/// (a cursor that wraps), so the newest is routed and delivered within a couple of sweeps
/// (before the fix, every sweep took the oldest 512 and never looked the newest up).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_newest_of_more_orphans_than_one_sweep_takes_is_still_routed() {
    let Some(world) = World::start().await else {
        return;
    };
    let b_store = world.b.relay_store().unwrap();
    // Received in the minute before, so the real callback below is the newest.
    let base = diia_gateway::relay::now_ms();
    let content_type = format!("multipart/form-data; boundary={BOUNDARY}");
    let puts = (0..600u64).map(|n| {
        let ingest = Ingest {
            acquirer: "acquirer-1".into(),
            envelope: Envelope {
                request_id: format!("fleet-relay-unrouted-{n}"),
                action: None,
                content_type: content_type.clone(),
                body: Bytes::from_static(b"never routed"),
            },
            route: None,
        };
        b_store.put(ingest, base - 60_000 + n)
    });
    for put in futures_util::future::join_all(puts).await {
        put.unwrap();
    }
    let request_id = "fleet-relay-newest-orphan-2a7c";
    let body = world.package(7);
    assert_eq!(
        world.callback(&world.b, request_id, &body).await.status,
        StatusCode::OK
    );
    world.wait_for(&world.b, State::Orphan, 601).await;

    let token = world
        .session_token(&world.a, DEMO_ACQUIRER_TOKEN, DEMO_AUTH_TOKEN)
        .await;
    let pushed = world
        .push(&world.a, &token, &fresh_barcode(), request_id)
        .await;
    assert_eq!(pushed.status, StatusCode::OK, "{pushed:?}");
    // Sweeps run every 2 s; two cover 601 orphans (512 + 89), three leave room for one
    // that was under way when the route appeared.
    let started = Instant::now();
    world.wait_for(&world.b, State::Delivered, 1).await;
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "routed only after {:?}",
        started.elapsed()
    );
    assert_byte_for_byte(&world.delivered(1).await, &body, request_id);
    world.wait_for(&world.b, State::Orphan, 600).await;
}

const MISMATCH: &str = "diia_gateway_relay_config_mismatch";

/// Waits (10 s at most: heartbeats are 1 s) until `gateway`'s `relay_config_mismatch` is
/// `value`.
async fn wait_for_mismatch(world: &World, gateway: &RunningGateway, value: f64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let seen = world.metric(gateway, MISMATCH).await;
        if seen == value {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{MISMATCH} stayed {seen}, not {value}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// B's target serves another branch than A's: both instances report the disagreement
/// (without refusing anything: a push through either still works), and Redis holds only
/// keyed fingerprints, never the branch or target names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_whose_targets_differ_both_report_a_config_mismatch() {
    let Some(world) = World::start_with(true, |relay| {
        relay.target[0].branch_ids = vec!["branch-fleet-other-5150".into()];
    })
    .await
    else {
        return;
    };
    wait_for_mismatch(&world, &world.a, 1.0).await;
    wait_for_mismatch(&world, &world.b, 1.0).await;
    // Reported, not refused.
    let token = world
        .session_token(&world.a, DEMO_ACQUIRER_TOKEN, DEMO_AUTH_TOKEN)
        .await;
    let pushed = world
        .push(&world.a, &token, &fresh_barcode(), "fleet-relay-mismatch-1")
        .await;
    assert_eq!(pushed.status, StatusCode::OK, "{pushed:?}");

    let entries = world
        .redis
        .reply(&["ZRANGE", "{dg}:relay-config", "0", "-1"])
        .await
        .unwrap();
    for secret in [
        BRANCH,
        "branch-fleet-other-5150",
        "backoffice",
        "acquirer-1",
        "/diia/callback",
    ] {
        assert!(!entries.contains(secret), "{secret} in Redis: {entries}");
    }
}

/// The same config on both: after each has compared with the other (a few heartbeats),
/// neither reports a mismatch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_with_the_same_config_report_no_mismatch() {
    let Some(world) = World::start().await else {
        return;
    };
    // Both entries are in Redis, so each instance's next heartbeat compares with the other.
    let deadline = Instant::now() + Duration::from_secs(10);
    while world
        .redis
        .command(&["ZCARD", "{dg}:relay-config"])
        .await
        .as_deref()
        != Some(":2")
    {
        assert!(Instant::now() < deadline, "no two config entries in Redis");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;
    for gateway in [&world.a, &world.b] {
        assert_eq!(world.metric(gateway, MISMATCH).await, 0.0);
    }
}

/// SHA-256 of a reply's body and `Content-Type`: what the branch must get byte for byte.
fn package_digest(body: &[u8], content_type: &str) -> [u8; 32] {
    use sha2::Digest;
    let mut hash = sha2::Sha256::new();
    hash.update(body);
    hash.update(b"\n");
    hash.update(content_type.as_bytes());
    hash.finalize().into()
}

const COPIES_STORED: &str = "diia_gateway_relay_pull_copies_total{result=\"stored\"}";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_package_that_reached_another_instance_is_pulled_and_acknowledged_through_any() {
    let Some(world) = World::start_pull().await else {
        return;
    };
    let token = world
        .session_token(&world.a, DEMO_ACQUIRER_TOKEN, DEMO_AUTH_TOKEN)
        .await;
    let request_id = "fleet-pull-req-9e31d0";
    let pushed = world
        .push(&world.a, &token, &fresh_barcode(), request_id)
        .await;
    assert_eq!(pushed.status, StatusCode::OK, "{pushed:?}");

    // The branch waits on A; Diia's callback reaches B: A's long poll finds B's copy.
    let waiting = {
        let (http, addr, token) = (world.http.clone(), world.a.addr(), token.clone());
        tokio::spawn(async move {
            let url = format!("http://{addr}/relay/v1/callbacks/{request_id}?wait=15s");
            let bearer = format!("Bearer {token}");
            send(
                &http,
                Method::GET,
                &url,
                &[("authorization", bearer.as_str())],
                String::new(),
            )
            .await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let body = world.package(6);
    let stored = world.callback(&world.b, request_id, &body).await;
    assert_eq!(stored.status, StatusCode::OK, "{stored:?}");
    let pulled = tokio::time::timeout(Duration::from_secs(20), waiting)
        .await
        .expect("the long poll answers")
        .unwrap();
    assert_eq!(pulled.status, StatusCode::OK, "{pulled:?}");
    let content_type = format!("multipart/form-data; boundary={BOUNDARY}");
    assert_eq!(
        package_digest(&pulled.body, pulled.header("content-type").unwrap()),
        package_digest(body.as_bytes(), &content_type),
        "the package changed on the way"
    );
    assert_eq!(
        pulled.header("x-document-request-trace-id"),
        Some(request_id)
    );
    let id = pulled.header("x-relay-record-id").unwrap().to_owned();
    assert_eq!(world.metric(&world.b, COPIES_STORED).await, 1.0);
    assert_eq!(
        world
            .metric(
                &world.a,
                "diia_gateway_relay_remote_pulls_total{result=\"served\"}"
            )
            .await,
        1.0
    );
    // A holds the route only; B holds the package, pending for the pull side.
    let a_store = world.a.relay_store().unwrap();
    let counts = a_store.stats(diia_gateway::relay::now_ms()).await.unwrap();
    assert_eq!(counts.counts, [0; 5]);
    world.wait_for(&world.b, State::Pending, 1).await;

    // Nothing in clear in Redis while the copy is held: key names and a dump.
    let keys = world.redis.keys().await;
    assert!(
        keys.iter().any(|k| k.starts_with("{dg}:relay-pull:")),
        "no copy: {keys:?}"
    );
    assert_eq!(world.redis.command(&["SAVE"]).await.as_deref(), Some("+OK"));
    let dump = std::fs::read(world.redis.dir().join("dump.rdb")).unwrap();
    let dump = String::from_utf8_lossy(&dump);
    assert!(dump.contains("{dg}:relay-pull:"), "the dump holds no copy");
    for secret in [
        request_id,
        BRANCH,
        token.as_str(),
        BOUNDARY,
        "encryptedFileName",
        &body[body.len() / 2..body.len() / 2 + 40],
        id.as_str(),
    ] {
        assert!(!dump.contains(secret), "{secret} is in the Redis dump");
        for key in &keys {
            assert!(!key.contains(secret), "{secret} in a key name");
        }
    }

    // Acknowledged through A: B's record settles delivered (its sweep, every 2 s), the
    // copy is gone, and a second pull through either instance is a 404.
    let acked = world
        .pull(
            &world.a,
            Method::DELETE,
            &token,
            request_id,
            &format!("?id={id}"),
        )
        .await;
    assert_eq!(acked.status, StatusCode::NO_CONTENT, "{acked:?}");
    world.wait_for(&world.b, State::Delivered, 1).await;
    world
        .wait_metric(
            &world.b,
            "diia_gateway_relay_remote_pulls_total{result=\"settled\"}",
            1.0,
        )
        .await;
    for gateway in [&world.a, &world.b] {
        let again = world
            .pull(gateway, Method::GET, &token, request_id, "")
            .await;
        assert_eq!(again.status, StatusCode::NOT_FOUND, "{again:?}");
    }
    let keys = world.redis.keys().await;
    assert!(
        !keys.iter().any(|k| k.starts_with("{dg}:relay-pull:")),
        "the copy outlived its acknowledgement: {keys:?}"
    );
    assert!(keys.iter().any(|k| k.starts_with("{dg}:relay-pull-ack:")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_caller_pulling_through_another_instance_gets_404_never_the_package() {
    let Some(world) = World::start_pull().await else {
        return;
    };
    let token = world
        .session_token(&world.a, DEMO_ACQUIRER_TOKEN, DEMO_AUTH_TOKEN)
        .await;
    let other = world
        .session_token(&world.a, OTHER_ACQUIRER_TOKEN, OTHER_AUTH_TOKEN)
        .await;
    let request_id = "fleet-pull-other-51a7";
    let body = world
        .pushed_on_a_stored_on_b(&token, request_id, 7, 1.0)
        .await;

    // Through A (the copy) and B (the record): the same 404 as for "nothing yet".
    for gateway in [&world.a, &world.b] {
        let stolen = world
            .pull(gateway, Method::GET, &other, request_id, "")
            .await;
        assert_eq!(stolen.status, StatusCode::NOT_FOUND, "{stolen:?}");
        let piece = &body.as_bytes()[body.len() / 2..body.len() / 2 + 40];
        assert!(!stolen.body.windows(piece.len()).any(|w| w == piece));
        assert_eq!(stolen.gateway_code(), "callback_not_found");
        let acked = world
            .pull(gateway, Method::DELETE, &other, request_id, "")
            .await;
        assert_eq!(acked.status, StatusCode::NOT_FOUND, "{acked:?}");
    }
    assert_eq!(
        world
            .metric(
                &world.a,
                "diia_gateway_relay_remote_pulls_total{result=\"served\"}"
            )
            .await,
        0.0
    );
    // The owner still gets it, through A.
    let pulled = world
        .pull(&world.a, Method::GET, &token, request_id, "")
        .await;
    assert_eq!(pulled.status, StatusCode::OK, "{pulled:?}");
    assert!(pulled.body.as_ref() == body.as_bytes());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_stopped_the_holding_instance_still_serves_and_acknowledges_its_package() {
    let Some(world) = World::start_pull().await else {
        return;
    };
    let token = world
        .session_token(&world.a, DEMO_ACQUIRER_TOKEN, DEMO_AUTH_TOKEN)
        .await;
    let request_id = "fleet-pull-down-0c44";
    let body = world
        .pushed_on_a_stored_on_b(&token, request_id, 8, 1.0)
        .await;

    world.redis.stop();
    let started = Instant::now();
    let pulled = world
        .pull(&world.b, Method::GET, &token, request_id, "")
        .await;
    assert_eq!(pulled.status, StatusCode::OK, "{pulled:?}");
    assert!(pulled.body.as_ref() == body.as_bytes());
    let id = pulled.header("x-relay-record-id").unwrap().to_owned();
    let acked = world
        .pull(
            &world.b,
            Method::DELETE,
            &token,
            request_id,
            &format!("?id={id}"),
        )
        .await;
    assert_eq!(acked.status, StatusCode::NO_CONTENT, "{acked:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "Redis held the local pull back: {:?}",
        started.elapsed()
    );
    world.wait_for(&world.b, State::Delivered, 1).await;
    world.redis.resume();
}

/// Right to erasure in a fleet: a pull-only package reached B and was copied to Redis;
/// an erase by requestId on A (which holds no record of it) removes the copy and marks
/// it, so B settles its record (the payload deleted) and no instance serves it again.
/// Then a purge on the holding instance removes that record's copy as well.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_erase_or_purge_on_any_instance_reaches_the_fleet_s_pull_copies() {
    let Some(world) = World::start_pull().await else {
        return;
    };
    let token = world
        .session_token(&world.a, DEMO_ACQUIRER_TOKEN, DEMO_AUTH_TOKEN)
        .await;
    let admin = |gateway: &RunningGateway, method: Method, path: &str, body: String| {
        let url = format!("http://{}{path}", gateway.admin_addr());
        let http = world.http.clone();
        async move {
            send(
                &http,
                method,
                &url,
                &[("content-type", "application/json")],
                body,
            )
            .await
        }
    };
    let copies = || async {
        world
            .redis
            .keys()
            .await
            .into_iter()
            .filter(|k| k.starts_with("{dg}:relay-pull:"))
            .count()
    };

    let erased_id = "fleet-pull-erase-4d21";
    world
        .pushed_on_a_stored_on_b(&token, erased_id, 9, 1.0)
        .await;
    assert_eq!(copies().await, 1);

    let erased = admin(
        &world.a,
        Method::POST,
        "/relay/erase",
        format!(r#"{{"requestId":"{erased_id}"}}"#),
    )
    .await;
    assert_eq!(erased.status, StatusCode::OK, "{erased:?}");
    assert_eq!(copies().await, 0, "the copy outlived the erase");
    // B's sweep (every 2 s) settles its record by the marker: payload gone there too.
    world.wait_for(&world.b, State::Delivered, 1).await;
    for gateway in [&world.a, &world.b] {
        let again = world
            .pull(gateway, Method::GET, &token, erased_id, "")
            .await;
        assert_eq!(again.status, StatusCode::NOT_FOUND, "{again:?}");
    }

    // A purge on the holder (B) takes its copy along.
    let purged_id = "fleet-pull-purge-8b02";
    world
        .pushed_on_a_stored_on_b(&token, purged_id, 10, 2.0)
        .await;
    assert_eq!(copies().await, 1);
    world.wait_for(&world.b, State::Pending, 1).await;
    let listed = admin(
        &world.b,
        Method::GET,
        "/relay/records?state=pending",
        String::new(),
    )
    .await;
    let listed: serde_json::Value = serde_json::from_slice(&listed.body).unwrap();
    let id = listed["records"][0]["id"].as_str().unwrap().to_owned();
    let purged = admin(
        &world.b,
        Method::DELETE,
        &format!("/relay/records/{id}"),
        String::new(),
    )
    .await;
    assert_eq!(purged.status, StatusCode::OK, "{purged:?}");
    assert_eq!(copies().await, 0, "the copy outlived the purge");
    let again = world
        .pull(&world.a, Method::GET, &token, purged_id, "")
        .await;
    assert_eq!(again.status, StatusCode::NOT_FOUND, "{again:?}");
}

/// The holding instance restarts while its pull-only package waits: it watches the
/// records it holds again, so an acknowledgement made through another instance after the
/// restart settles its record (payload deleted) at its next sweep, not at `max_age`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_holder_settles_a_package_acknowledged_through_another_instance() {
    let Some(world) = World::start_pull().await else {
        return;
    };
    let token = world
        .session_token(&world.a, DEMO_ACQUIRER_TOKEN, DEMO_AUTH_TOKEN)
        .await;
    let request_id = "fleet-pull-restart-61c9";
    world
        .pushed_on_a_stored_on_b(&token, request_id, 11, 1.0)
        .await;

    // B restarts on the same store: nothing in memory says it holds the copied record.
    let World {
        redis,
        _sim: sim,
        shared,
        a,
        b,
        received,
        http,
        _dirs: dirs,
        _serial,
    } = world;
    b.stop().await;
    let b = instance(&sim, &redis, &shared, None, &dirs.1, |_| {}).await;
    let world = World {
        redis,
        _sim: sim,
        shared,
        a,
        b,
        received,
        http,
        _dirs: dirs,
        _serial,
    };
    world.wait_for(&world.b, State::Pending, 1).await;

    let pulled = world
        .pull(&world.a, Method::GET, &token, request_id, "")
        .await;
    assert_eq!(pulled.status, StatusCode::OK, "{pulled:?}");
    let id = pulled.header("x-relay-record-id").unwrap().to_owned();
    let acked = world
        .pull(
            &world.a,
            Method::DELETE,
            &token,
            request_id,
            &format!("?id={id}"),
        )
        .await;
    assert_eq!(acked.status, StatusCode::NO_CONTENT, "{acked:?}");
    // Sweeps run every 2 s.
    world.wait_for(&world.b, State::Delivered, 1).await;
}

/// Diia's callback for `request_id` with action `action` (a second callback of one
/// requestId is another record only under another action).
async fn callback_as(
    world: &World,
    gateway: &RunningGateway,
    request_id: &str,
    action: &str,
    body: &str,
) -> Reply {
    let addr = gateway.relay_addr().expect("relay listens");
    let url = format!("http://{addr}/diia/callback/{PATH_TOKEN}");
    let content_type = format!("multipart/form-data; boundary={BOUNDARY}");
    send(
        &world.http,
        Method::POST,
        &url,
        &[
            ("content-type", content_type.as_str()),
            ("x-document-request-trace-id", request_id),
            ("x-diia-id-action", action),
        ],
        body.to_owned(),
    )
    .await
}

/// Two packages of one requestId (two actions): the older reached A, the newer B, both
/// copied. A pull through B is answered the caller's oldest (A's), as the contract says,
/// and an acknowledgement without `?id=` through A (a load balancer need not send the
/// `DELETE` where the `GET` went) takes what was served, so the package not yet pulled is
/// the one left. Before the fix each instance answered its own record first: B served the
/// newer, A's `DELETE` then acknowledged the older, never served, and it was gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_oldest_package_is_served_and_acknowledged_whichever_instance_holds_it() {
    let Some(world) = World::start_pull().await else {
        return;
    };
    let token = world
        .session_token(&world.a, DEMO_ACQUIRER_TOKEN, DEMO_AUTH_TOKEN)
        .await;
    let request_id = "fleet-pull-oldest-3f18";
    let pushed = world
        .push(&world.a, &token, &fresh_barcode(), request_id)
        .await;
    assert_eq!(pushed.status, StatusCode::OK, "{pushed:?}");
    let older = world.package(21);
    let stored = callback_as(&world, &world.a, request_id, "hashedFilesSigning", &older).await;
    assert_eq!(stored.status, StatusCode::OK, "{stored:?}");
    world.wait_metric(&world.a, COPIES_STORED, 1.0).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let newer = world.package(22);
    let stored = callback_as(
        &world,
        &world.b,
        request_id,
        "documentIdentification",
        &newer,
    )
    .await;
    assert_eq!(stored.status, StatusCode::OK, "{stored:?}");
    world.wait_metric(&world.b, COPIES_STORED, 1.0).await;

    let first = world
        .pull(&world.b, Method::GET, &token, request_id, "")
        .await;
    assert_eq!(first.status, StatusCode::OK, "{first:?}");
    let acked = world
        .pull(&world.a, Method::DELETE, &token, request_id, "")
        .await;
    assert_eq!(acked.status, StatusCode::NO_CONTENT, "{acked:?}");
    let second = world
        .pull(&world.b, Method::GET, &token, request_id, "")
        .await;
    assert_eq!(second.status, StatusCode::OK, "{second:?}");
    assert!(
        second.body != first.body,
        "the package served first is served again: the acknowledgement took the other one"
    );
    assert!(
        first.body.as_ref() == older.as_bytes(),
        "not the oldest first"
    );
    assert!(second.body.as_ref() == newer.as_bytes());
}

/// An admin erase through A right after Diia's callback reached B, before B's delivery
/// worker copied the package to Redis (it looks every 250 ms): the erase answers 200, and
/// the package must not turn up afterwards through either instance, and B's record is
/// settled. Three requestIds, so at least one erase lands before its copy. Before the fix
/// the erase found no copy to mark, the copy came after it, and the erased package was
/// served through both instances until `max_age`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_erase_right_after_the_callback_is_not_undone_by_the_late_copy() {
    let Some(world) = World::start_pull().await else {
        return;
    };
    let token = world
        .session_token(&world.a, DEMO_ACQUIRER_TOKEN, DEMO_AUTH_TOKEN)
        .await;
    let ids = [
        "fleet-pull-erase-race-1",
        "fleet-pull-erase-race-2",
        "fleet-pull-erase-race-3",
    ];
    for (n, request_id) in (30u8..).zip(ids) {
        let pushed = world
            .push(&world.a, &token, &fresh_barcode(), request_id)
            .await;
        assert_eq!(pushed.status, StatusCode::OK, "{pushed:?}");
        let body = world.package(n);
        let stored = world.callback(&world.b, request_id, &body).await;
        assert_eq!(stored.status, StatusCode::OK, "{stored:?}");
        let url = format!("http://{}/relay/erase", world.a.admin_addr());
        let erased = send(
            &world.http,
            Method::POST,
            &url,
            &[("content-type", "application/json")],
            format!(r#"{{"requestId":"{request_id}"}}"#),
        )
        .await;
        assert_eq!(erased.status, StatusCode::OK, "{erased:?}");
    }
    // B's worker has held (and copied) all of them by now, and its sweep has run.
    tokio::time::sleep(Duration::from_millis(2600)).await;
    for request_id in ids {
        for gateway in [&world.a, &world.b] {
            let again = world
                .pull(gateway, Method::GET, &token, request_id, "")
                .await;
            assert_eq!(
                again.status,
                StatusCode::NOT_FOUND,
                "{request_id} served after its erase"
            );
        }
    }
    world.wait_for(&world.b, State::Pending, 0).await;
}
