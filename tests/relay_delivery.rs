//! The relay's push delivery over real sockets: records stored in a real SQLite store, a
//! fake branch (a hyper server on loopback) that records what it receives and plays one
//! behaviour per test, and the delivery worker between them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use diia_gateway::relay::deliver::{Counted, Deliverer, DeliveryOptions, Jitter};
use diia_gateway::relay::settings::{Branches, RelaySettings, Target};
use diia_gateway::relay::{
    CallbackStore, Envelope, Fsync, Ingest, Keyring, PutOutcome, RecordId, Retention, Route,
    SqliteStore, State,
};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{HeaderMap, Request, Response};
use hyper_util::rt::TokioIo;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

const KEY: &str = "k1 = 3f6c1d2e4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0";
const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";
const CONTENT_TYPE: &str = "multipart/form-data; boundary=----DiiaBoundary7MA4YWxkTrZu0gW";
const WAIT: Duration = Duration::from_secs(30);

/// What the fake branch got.
#[derive(Clone)]
struct Received {
    headers: HeaderMap,
    body: Bytes,
    at: Instant,
}

/// The fake branch's answer to its `n`-th request (0-based).
#[derive(Clone)]
enum Reply {
    Status(u16, &'static str, Option<&'static str>),
    /// Answer 200 after a pause.
    Slow(Duration),
    /// Never answer.
    Hold,
}

type Script = Arc<dyn Fn(usize) -> Reply + Send + Sync>;

#[derive(Clone)]
struct Branch {
    url: String,
    received: Arc<Mutex<Vec<Received>>>,
    active: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
    script: Arc<Mutex<Script>>,
}

impl Branch {
    async fn start(script: impl Fn(usize) -> Reply + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        let branch = Self {
            url: format!("http://{addr}/diia/documents"),
            received: Arc::default(),
            active: Arc::default(),
            peak: Arc::default(),
            script: Arc::new(Mutex::new(Arc::new(script))),
        };
        let server = branch.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let server = server.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| server.clone().answer(req));
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        branch
    }

    fn rescript(&self, script: impl Fn(usize) -> Reply + Send + Sync + 'static) {
        *self.script.lock().unwrap() = Arc::new(script);
    }

    async fn answer(
        self,
        req: Request<Incoming>,
    ) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
        let active = self.active.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(active, Ordering::SeqCst);
        let headers = req.headers().clone();
        let body = req.into_body().collect().await.unwrap().to_bytes();
        let n = {
            let mut received = self.received.lock().unwrap();
            received.push(Received {
                headers,
                body,
                at: Instant::now(),
            });
            received.len() - 1
        };
        let reply = (self.script.lock().unwrap())(n);
        let (status, body, retry_after) = match reply {
            Reply::Status(status, body, retry_after) => (status, body, retry_after),
            Reply::Slow(pause) => {
                tokio::time::sleep(pause).await;
                (200, r#"{"success":true}"#, None)
            }
            Reply::Hold => std::future::pending().await,
        };
        self.active.fetch_sub(1, Ordering::SeqCst);
        let mut response = Response::builder().status(status);
        if let Some(value) = retry_after {
            response = response.header("retry-after", value);
        }
        Ok(response
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .unwrap())
    }

    fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }
}

fn ok(_: usize) -> Reply {
    Reply::Status(200, r#"{"success":true}"#, None)
}

struct Relay {
    _dir: tempfile::TempDir,
    store: Arc<SqliteStore>,
}

impl Relay {
    fn open() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path(), Keyring::parse(KEY).unwrap(), Fsync::Batch)
            .expect("store");
        Self {
            _dir: dir,
            store: Arc::new(store),
        }
    }

    fn dyn_store(&self) -> Arc<dyn CallbackStore> {
        Arc::clone(&self.store) as Arc<dyn CallbackStore>
    }

    async fn put(
        &self,
        request_id: &str,
        action: Option<&str>,
        body: &[u8],
        target: &str,
    ) -> RecordId {
        let ingest = Ingest {
            acquirer: "acq".to_owned(),
            envelope: Envelope {
                request_id: request_id.to_owned(),
                action: action.map(str::to_owned),
                content_type: CONTENT_TYPE.to_owned(),
                body: Bytes::copy_from_slice(body),
            },
            route: Some(Route {
                client: "key:branch-client".to_owned(),
                branch: "b-1".to_owned(),
                target: target.to_owned(),
                login: None,
            }),
        };
        match self
            .store
            .put(ingest, diia_gateway::relay::now_ms())
            .await
            .unwrap()
        {
            PutOutcome::Stored(id, State::Pending) => id,
            other => panic!("not stored pending: {other:?}"),
        }
    }

    async fn state(&self, id: RecordId) -> State {
        self.store.fetch(id).await.unwrap().unwrap().meta.state
    }

    /// Waits (bounded) until the record is in `state`.
    async fn until(&self, id: RecordId, state: State) {
        let start = Instant::now();
        loop {
            if self.state(id).await == state {
                return;
            }
            assert!(
                start.elapsed() < WAIT,
                "record {id} not {state:?} within {WAIT:?} (is {:?})",
                self.state(id).await
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn settings(branch_url: &str, schedule: &[u64], max_age: Duration) -> RelaySettings {
    RelaySettings {
        listen: "127.0.0.1:0".parse().unwrap(),
        path_prefix: "/diia/callback".to_owned(),
        max_body: 16 << 20,
        max_in_flight_bytes: 64 << 20,
        data_dir: std::env::temp_dir(),
        fsync: Fsync::Batch,
        max_db_bytes: None,
        tls: None,
        keys: Arc::new(Keyring::parse(KEY).unwrap()),
        route_ttl: Duration::from_secs(3600),
        retry_schedule: schedule
            .iter()
            .map(|ms| Duration::from_millis(*ms))
            .collect(),
        max_age,
        delivery_timeout: Duration::from_secs(1),
        per_target_concurrency: 4,
        retention: Retention {
            tombstone_ttl: Duration::from_secs(3600),
            dead_retention: Duration::from_secs(3600),
            orphan_retention: Duration::from_secs(3600),
        },
        acquirers: Vec::new(),
        targets: vec![Arc::new(Target {
            name: "branch-backend".to_owned(),
            url: branch_url.parse().unwrap(),
            signing_secret: SECRET.to_vec(),
            branches: Branches::All,
        })],
    }
}

fn options() -> DeliveryOptions {
    DeliveryOptions {
        lease_margin: Duration::from_millis(300),
        poll_interval: Duration::from_millis(20),
        breaker_failures: 1000,
        breaker_cooldown: Duration::from_millis(100),
        jitter: Jitter::None,
        ..DeliveryOptions::default()
    }
}

/// A worker that stops when the returned sender is dropped or fired.
fn start(
    relay: &Relay,
    settings: &RelaySettings,
    options: DeliveryOptions,
) -> (
    oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
    Arc<diia_gateway::relay::deliver::DeliveryCounters>,
) {
    let worker = Deliverer::new(relay.dyn_store(), settings, options).unwrap();
    let counters = worker.counters();
    let (stop, stopped) = oneshot::channel::<()>();
    let handle = worker.spawn(async move {
        let _ = stopped.await;
    });
    (stop, handle, counters)
}

fn header<'a>(r: &'a Received, name: &str) -> &'a str {
    r.headers.get(name).map_or("", |v| v.to_str().unwrap())
}

/// A barcode-sharing package shaped as Diia sends it (base64 text parts), plus bytes that
/// are not UTF-8, to prove nothing is re-encoded on the way.
fn package() -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(b"------DiiaBoundary7MA4YWxkTrZu0gW\r\nContent-Disposition: form-data; name=\"encryptedFile\"; filename=\"doc\"\r\nContent-Type: application/octet-stream\r\n\r\n");
    body.extend_from_slice(
        base64::engine::general_purpose::STANDARD
            .encode([0x30u8, 0x82, 0x01, 0x00].repeat(4096))
            .as_bytes(),
    );
    body.extend_from_slice(b"\r\n------DiiaBoundary7MA4YWxkTrZu0gW\r\nContent-Disposition: form-data; name=\"encodeData\"\r\n\r\nMIIB\xff\xfe\x00\x01\r\n------DiiaBoundary7MA4YWxkTrZu0gW--\r\n");
    body
}

fn independent_signature(id: &str, timestamp: &str, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, SECRET);
    let mut signed = Vec::new();
    signed.extend_from_slice(format!("{id}.{timestamp}.").as_bytes());
    signed.extend_from_slice(body);
    let tag = ring::hmac::sign(&key, &signed);
    format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(tag.as_ref())
    )
}

#[tokio::test]
async fn the_branch_gets_the_package_byte_for_byte_signed_as_standard_webhooks() {
    let relay = Relay::open();
    let branch = Branch::start(ok).await;
    let body = package();
    let id = relay
        .put(
            "req-exact-1",
            Some("hashedFilesSigning"),
            &body,
            "branch-backend",
        )
        .await;
    let text = br#"{"documents":"eyJ0eXBlIjoiaW50ZXJuYWwtcGFzc3BvcnQifQ=="}"#;
    let id2 = relay.put("req-exact-2", None, text, "branch-backend").await;
    let s = settings(&branch.url, &[100], Duration::from_secs(60));
    let (_stop, _worker, counters) = start(&relay, &s, options());
    relay.until(id, State::Delivered).await;
    relay.until(id2, State::Delivered).await;

    let received = branch.received();
    assert_eq!(received.len(), 2);
    let first = received
        .iter()
        .find(|r| header(r, "webhook-id") == id.webhook_id())
        .unwrap();
    assert_eq!(
        Sha256::digest(&first.body),
        Sha256::digest(&body),
        "body changed on the way"
    );
    assert_eq!(header(first, "content-type"), CONTENT_TYPE);
    assert_eq!(header(first, "x-document-request-trace-id"), "req-exact-1");
    assert_eq!(header(first, "x-diia-id-action"), "hashedFilesSigning");
    let timestamp = header(first, "webhook-timestamp");
    let now = diia_gateway::relay::now_ms() / 1000;
    assert!(timestamp.parse::<u64>().unwrap().abs_diff(now) < 60);
    assert_eq!(
        header(first, "webhook-signature"),
        independent_signature(&id.webhook_id(), timestamp, &body)
    );

    // The reference verifier (the `standardwebhooks` crate an SDK receiver would use).
    let second = received
        .iter()
        .find(|r| header(r, "webhook-id") == id2.webhook_id())
        .unwrap();
    assert!(second.headers.get("x-diia-id-action").is_none());
    assert_eq!(second.body.as_ref(), text);
    standardwebhooks::Webhook::from_bytes(SECRET.to_vec())
        .unwrap()
        .verify(&second.body, &second.headers)
        .expect("signature verifies");
    assert_eq!(counters.get(Counted::Delivered), 2);
}

#[tokio::test]
async fn unavailable_then_ok_is_two_attempts_following_the_schedule() {
    let relay = Relay::open();
    let branch = Branch::start(|n| match n {
        0 => Reply::Status(503, "", None),
        _ => Reply::Status(200, r#"{"success":true}"#, None),
    })
    .await;
    let id = relay.put("req-503", None, b"pkg", "branch-backend").await;
    let s = settings(&branch.url, &[400, 5_000], Duration::from_secs(60));
    let (_stop, _worker, counters) = start(&relay, &s, options());
    relay.until(id, State::Delivered).await;
    let received = branch.received();
    assert_eq!(received.len(), 2);
    let gap = received[1].at - received[0].at;
    assert!(
        gap >= Duration::from_millis(380),
        "retried after {gap:?}, schedule says 400ms"
    );
    assert!(gap < Duration::from_secs(4), "retried after {gap:?}");
    assert_eq!(
        header(&received[0], "webhook-id"),
        header(&received[1], "webhook-id")
    );
    assert_eq!(counters.get(Counted::Throttled), 1);
}

#[tokio::test]
async fn retry_after_is_honoured_over_the_schedule() {
    let relay = Relay::open();
    let branch = Branch::start(|n| match n {
        0 => Reply::Status(429, "", Some("2")),
        _ => Reply::Status(200, "", None),
    })
    .await;
    let id = relay.put("req-429", None, b"pkg", "branch-backend").await;
    let s = settings(&branch.url, &[50], Duration::from_secs(60));
    let (_stop, _worker, _) = start(&relay, &s, options());
    relay.until(id, State::Delivered).await;
    let received = branch.received();
    assert_eq!(received.len(), 2);
    let gap = received[1].at - received[0].at;
    assert!(
        gap >= Duration::from_millis(1_900),
        "Retry-After: 2 not honoured: {gap:?}"
    );
}

#[tokio::test]
async fn failing_forever_is_dead_after_max_age_and_redelivered_on_request() {
    let relay = Relay::open();
    let branch = Branch::start(|_| Reply::Status(500, "oops", None)).await;
    let id = relay.put("req-500", None, b"pkg", "branch-backend").await;
    let max_age = Duration::from_millis(900);
    let s = settings(&branch.url, &[100, 200], max_age);
    let (_stop, _worker, counters) = start(&relay, &s, options());
    relay.until(id, State::Dead).await;
    let received = branch.received();
    assert!(received.len() >= 3, "only {} attempts", received.len());
    let meta = relay.store.fetch(id).await.unwrap().unwrap().meta;
    assert!(
        meta.updated_ms >= meta.received_ms + 900,
        "dead {} ms after arrival, before max_age",
        meta.updated_ms - meta.received_ms
    );
    assert!(counters.get(Counted::Failed) >= 3);
    assert_eq!(counters.get(Counted::Dead), 1);

    branch.rescript(ok);
    assert!(
        relay
            .store
            .redeliver(id, diia_gateway::relay::now_ms())
            .await
            .unwrap()
    );
    relay.until(id, State::Delivered).await;
    let ids: Vec<_> = branch
        .received()
        .iter()
        .map(|r| header(r, "webhook-id").to_owned())
        .collect();
    assert!(ids.iter().all(|i| *i == id.webhook_id()));
}

#[tokio::test]
async fn gone_is_dead_at_once() {
    let relay = Relay::open();
    let branch = Branch::start(|_| Reply::Status(410, "", None)).await;
    let id = relay.put("req-410", None, b"pkg", "branch-backend").await;
    let s = settings(&branch.url, &[50], Duration::from_secs(60));
    let (_stop, _worker, counters) = start(&relay, &s, options());
    relay.until(id, State::Dead).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(branch.received().len(), 1);
    assert_eq!(counters.get(Counted::Gone), 1);
}

#[tokio::test]
async fn success_false_is_a_failure_however_spelled() {
    let relay = Relay::open();
    let branch = Branch::start(|n| match n {
        0 => Reply::Status(
            200,
            "{ \"reason\": \"busy\",\n  \"success\" : false }",
            None,
        ),
        _ => Reply::Status(200, r#"{"success":true}"#, None),
    })
    .await;
    let id = relay.put("req-false", None, b"pkg", "branch-backend").await;
    let s = settings(&branch.url, &[100], Duration::from_secs(60));
    let (_stop, _worker, counters) = start(&relay, &s, options());
    relay.until(id, State::Delivered).await;
    assert_eq!(branch.received().len(), 2);
    assert_eq!(counters.get(Counted::Rejected), 1);
    assert_eq!(counters.get(Counted::Delivered), 1);
}

#[tokio::test]
async fn a_route_to_an_unknown_target_is_dead_and_sent_nowhere() {
    let relay = Relay::open();
    let branch = Branch::start(ok).await;
    let id = relay
        .put("req-nowhere", None, b"pkg", "decommissioned")
        .await;
    let s = settings(&branch.url, &[50], Duration::from_secs(60));
    let (_stop, _worker, counters) = start(&relay, &s, options());
    relay.until(id, State::Dead).await;
    assert!(branch.received().is_empty());
    assert_eq!(counters.get(Counted::UnknownTarget), 1);
}

#[tokio::test]
async fn a_worker_lost_mid_delivery_is_replaced_and_resends_the_same_webhook_id() {
    let relay = Relay::open();
    let branch = Branch::start(|n| if n == 0 { Reply::Hold } else { ok(n) }).await;
    let id = relay.put("req-crash", None, b"pkg", "branch-backend").await;
    let s = settings(&branch.url, &[50], Duration::from_secs(60));
    let (_stop, worker, _) = start(&relay, &s, options());
    let start_wait = Instant::now();
    while branch.received().is_empty() {
        assert!(start_wait.elapsed() < WAIT, "first delivery never arrived");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The worker dies while the branch holds the request (as a process killed mid-call).
    worker.abort();
    let _ = worker.await;
    assert_eq!(relay.state(id).await, State::Delivering);

    let (_stop2, _worker2, counters) = start(&relay, &s, options());
    relay.until(id, State::Delivered).await;
    let received = branch.received();
    assert_eq!(received.len(), 2);
    assert_eq!(header(&received[0], "webhook-id"), id.webhook_id());
    assert_eq!(header(&received[1], "webhook-id"), id.webhook_id());
    assert_eq!(counters.get(Counted::Delivered), 1);
}

#[tokio::test]
async fn per_target_concurrency_is_never_exceeded() {
    let relay = Relay::open();
    let busy = Branch::start(|_| Reply::Slow(Duration::from_millis(150))).await;
    let quiet = Branch::start(|_| Reply::Slow(Duration::from_millis(150))).await;
    let mut ids = Vec::new();
    for i in 0..10 {
        ids.push(
            relay
                .put(&format!("req-c{i}"), None, b"pkg", "branch-backend")
                .await,
        );
    }
    ids.push(relay.put("req-q", None, b"pkg", "quiet-branch").await);
    let mut s = settings(&busy.url, &[50], Duration::from_secs(60));
    s.per_target_concurrency = 2;
    // A second target: the worker has 4 delivery slots, the busy target may use only 2.
    s.targets.push(Arc::new(Target {
        name: "quiet-branch".to_owned(),
        url: quiet.url.parse().unwrap(),
        signing_secret: SECRET.to_vec(),
        branches: Branches::All,
    }));
    let (_stop, _worker, _) = start(&relay, &s, options());
    for id in &ids {
        relay.until(*id, State::Delivered).await;
    }
    assert_eq!(busy.received().len(), 10);
    assert_eq!(quiet.received().len(), 1);
    assert_eq!(
        busy.peak.load(Ordering::SeqCst),
        2,
        "cap 2 not used or exceeded"
    );
}

#[tokio::test]
async fn an_open_breaker_holds_a_failing_targets_deliveries_back() {
    let relay = Relay::open();
    let branch = Branch::start(|_| Reply::Status(500, "", None)).await;
    let id = relay
        .put("req-breaker", None, b"pkg", "branch-backend")
        .await;
    let s = settings(&branch.url, &[20], Duration::from_secs(60));
    let breaker = DeliveryOptions {
        breaker_failures: 2,
        breaker_cooldown: Duration::from_secs(2),
        ..options()
    };
    let (_stop, _worker, counters) = start(&relay, &s, breaker);
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    // Without the breaker: one attempt every ~20 ms. With it: two, then none until the
    // cool-down ends.
    assert_eq!(
        branch.received().len(),
        2,
        "breaker did not hold attempts back"
    );
    assert!(counters.get(Counted::BreakerOpen) >= 1);
    assert_eq!(relay.state(id).await, State::Pending);
}

#[tokio::test]
async fn the_worker_stops_on_shutdown_and_leaves_later_records_pending() {
    let relay = Relay::open();
    let branch = Branch::start(ok).await;
    let s = settings(&branch.url, &[50], Duration::from_secs(60));
    let (stop, worker, _) = start(&relay, &s, options());
    let first = relay
        .put("req-before", None, b"pkg", "branch-backend")
        .await;
    relay.until(first, State::Delivered).await;
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), worker)
        .await
        .expect("worker did not stop")
        .unwrap();
    let later = relay.put("req-after", None, b"pkg", "branch-backend").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(relay.state(later).await, State::Pending);
    assert_eq!(branch.received().len(), 1);
}

#[tokio::test]
async fn a_pull_only_record_is_held_until_max_age_even_across_an_unsettled_lease_then_dead() {
    let relay = Relay::open();
    let max_age = Duration::from_millis(1500);
    let settings = settings("http://127.0.0.1:9/unused", &[10], max_age);
    // A lease taken and never settled (a worker that crashed mid-hold).
    let id = relay.put("req-pull-1", None, b"package", "").await;
    let crashed = relay
        .store
        .lease_due(diia_gateway::relay::now_ms(), Duration::from_millis(50), 10)
        .await
        .unwrap();
    assert_eq!(crashed.len(), 1);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (_stop, _worker, counters) = start(&relay, &settings, options());
    // The next lease (the second attempt) still holds it for the pull side.
    let held = Instant::now();
    while counters.get(Counted::HeldForPull) == 0 {
        assert!(held.elapsed() < WAIT, "never held");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(relay.state(id).await, State::Pending);
    assert_eq!(counters.get(Counted::Dead), 0, "not dead before max_age");
    // Past max_age nobody pulled it: a dead letter, never pushed anywhere.
    relay.until(id, State::Dead).await;
    assert!(held.elapsed() >= max_age - Duration::from_millis(200));
    assert_eq!(counters.get(Counted::UnknownTarget), 0);
}
