//! Push delivery: a lease-based worker POSTs each stored callback to its branch's target,
//! byte for byte, signed as Standard Webhooks, until it is delivered or dead.
//!
//! Invariants kept here:
//! - **At least once, one `webhook-id`.** A record is sent only under a lease taken from
//!   the store and settled through it; a worker that dies mid-delivery leaves the lease to
//!   expire, and the next worker sends the record again with the same `webhook-id`
//!   ([`RecordId::webhook_id`]), so a Standard Webhooks receiver can drop the repeat.
//! - **The lease outlives the attempt.** A leased record waits at most `delivery_timeout`
//!   for its target's concurrency permit, then its attempt has `delivery_timeout`; the
//!   lease is both plus a margin, so a live worker settles before anyone else may lease it.
//!   The worker leases no more records than it has delivery slots free.
//! - **Never sent anywhere else.** The target is the one the route names; a target the
//!   settings no longer know makes the record dead (logged by id), never a guess.
//!
//! Outcomes: a 2xx whose body is not `{"success":false}` is delivered; `410` is dead at
//! once; `429`/`503` wait out `Retry-After` (seconds or HTTP-date, capped) or the
//! schedule; anything else waits `retry_schedule` (jittered). A record still failing
//! when `max_age` (from its arrival) has passed is dead.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use http::header::{CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderValue, Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::fleet_pulls::FleetPulls;
use super::settings::{RelaySettings, Target};
use super::{CallbackStore, Leased, Settle, now_ms};
use crate::breaker::Breaker;

pub mod policy;

pub use policy::{Attempt, Jitter};

/// Tuning that `[callback_relay]` does not expose (tests shorten it).
#[derive(Clone, Debug)]
pub struct DeliveryOptions {
    /// Added to the lease beyond the permit wait and the attempt (store latency).
    pub lease_margin: Duration,
    /// How often due records are looked for while none are.
    pub poll_interval: Duration,
    /// Consecutive outages (transport, timeout, 5xx, 429) that open a target's breaker.
    pub breaker_failures: u32,
    /// How long an open breaker holds a target's deliveries back.
    pub breaker_cooldown: Duration,
    /// The longest `Retry-After` honoured.
    pub retry_after_cap: Duration,
    /// How the schedule's pauses are randomised.
    pub jitter: Jitter,
    /// Bytes of a 2xx body read to tell `{"success":false}` apart (a longer body is success).
    pub answer_limit: usize,
    /// Connect timeout toward targets.
    pub connect_timeout: Duration,
}

impl Default for DeliveryOptions {
    fn default() -> Self {
        Self {
            lease_margin: Duration::from_secs(5),
            poll_interval: Duration::from_millis(250),
            breaker_failures: 5,
            breaker_cooldown: Duration::from_secs(30),
            retry_after_cap: Duration::from_secs(600),
            jitter: Jitter::Proportional,
            answer_limit: 64 * 1024,
            connect_timeout: Duration::from_secs(5),
        }
    }
}

/// What a delivery round counted (the `relay_delivery_attempts_total{outcome}` family, for
/// the metrics module to register).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counted {
    /// Attempt: delivered.
    Delivered,
    /// Attempt: 2xx `{"success":false}`.
    Rejected,
    /// Attempt: 429/503.
    Throttled,
    /// Attempt: 410.
    Gone,
    /// Attempt: another status.
    Failed,
    /// Attempt: no answer in time.
    Timeout,
    /// Attempt: connection or protocol failure.
    Transport,
    /// No attempt: the route names a target the settings do not have (dead).
    UnknownTarget,
    /// No attempt: the target's breaker is open (put back).
    BreakerOpen,
    /// No attempt: no concurrency permit in time (put back).
    Busy,
    /// No attempt: the stored values cannot form a request (dead).
    Unsendable,
    /// Settled dead (any reason).
    Dead,
    /// A settle found the lease taken over (another worker has the record).
    LeaseLost,
    /// The store failed a lease or settle call.
    StoreError,
    /// No attempt: the branch pulls its packages; held for the pull side until `max_age`.
    HeldForPull,
}

impl Counted {
    /// Every counter, in index order.
    pub const ALL: [Self; 15] = [
        Self::Delivered,
        Self::Rejected,
        Self::Throttled,
        Self::Gone,
        Self::Failed,
        Self::Timeout,
        Self::Transport,
        Self::UnknownTarget,
        Self::BreakerOpen,
        Self::Busy,
        Self::Unsendable,
        Self::Dead,
        Self::LeaseLost,
        Self::StoreError,
        Self::HeldForPull,
    ];

    /// The metric label.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Delivered => "delivered",
            Self::Rejected => "rejected",
            Self::Throttled => "throttled",
            Self::Gone => "gone",
            Self::Failed => "failed",
            Self::Timeout => "timeout",
            Self::Transport => "transport",
            Self::UnknownTarget => "unknown_target",
            Self::BreakerOpen => "breaker_open",
            Self::Busy => "busy",
            Self::Unsendable => "unsendable",
            Self::Dead => "dead",
            Self::LeaseLost => "lease_lost",
            Self::StoreError => "store_error",
            Self::HeldForPull => "held_for_pull",
        }
    }

    const fn index(self) -> usize {
        self as usize
    }

    const fn of(attempt: Attempt) -> Self {
        match attempt {
            Attempt::Delivered => Self::Delivered,
            Attempt::Rejected => Self::Rejected,
            Attempt::Throttled(_) => Self::Throttled,
            Attempt::Gone => Self::Gone,
            Attempt::Failed(_) => Self::Failed,
            Attempt::Timeout => Self::Timeout,
            Attempt::Transport => Self::Transport,
        }
    }
}

/// Delivery counters: plain atomics, read by the metrics module at scrape time.
#[derive(Default)]
pub struct DeliveryCounters {
    counts: [AtomicU64; Counted::ALL.len()],
}

impl DeliveryCounters {
    /// One more of `what`.
    pub fn add(&self, what: Counted) {
        self.counts[what.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// How many of `what` so far.
    #[must_use]
    pub fn get(&self, what: Counted) -> u64 {
        self.counts[what.index()].load(Ordering::Relaxed)
    }
}

type Pool = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// One target: its settings, its concurrency cap and its breaker.
struct Lane {
    target: Arc<Target>,
    permits: Arc<Semaphore>,
    breaker: Breaker,
}

/// The delivery worker; [`Deliverer::run`] is its loop.
pub struct Deliverer {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn CallbackStore>,
    client: Pool,
    lanes: HashMap<String, Lane>,
    schedule: Vec<Duration>,
    max_age: Duration,
    timeout: Duration,
    lease: Duration,
    slots: Arc<Semaphore>,
    options: DeliveryOptions,
    counters: Arc<DeliveryCounters>,
    /// The fleet's pull copies (`[scaleout]` on), attached once before the worker runs.
    pulls: OnceLock<Arc<FleetPulls>>,
}

impl Deliverer {
    /// A worker over `store` for the targets in `settings`; targets are verified against
    /// the system's plus Mozilla's roots.
    pub fn new(
        store: Arc<dyn CallbackStore>,
        settings: &RelaySettings,
        options: DeliveryOptions,
    ) -> std::io::Result<Self> {
        let per_target = settings.per_target_concurrency.max(1);
        let lanes: HashMap<String, Lane> = settings
            .targets
            .iter()
            .map(|t| {
                let lane = Lane {
                    target: Arc::clone(t),
                    permits: Arc::new(Semaphore::new(per_target)),
                    breaker: Breaker::new(options.breaker_failures, options.breaker_cooldown),
                };
                (t.name.clone(), lane)
            })
            .collect();
        let slots = per_target.saturating_mul(lanes.len().max(1));
        let timeout = settings.delivery_timeout;
        Ok(Self {
            inner: Arc::new(Inner {
                store,
                client: client(options.connect_timeout)?,
                lanes,
                schedule: settings.retry_schedule.clone(),
                max_age: settings.max_age,
                timeout,
                lease: timeout
                    .saturating_mul(2)
                    .saturating_add(options.lease_margin),
                slots: Arc::new(Semaphore::new(slots)),
                counters: Arc::new(DeliveryCounters::default()),
                options,
                pulls: OnceLock::new(),
            }),
        })
    }

    /// With a fleet: a pull-only record held for the pull side is also copied to Redis,
    /// and one acknowledged on another instance is settled delivered when held again
    /// (once; later calls change nothing).
    pub fn attach_pull_copies(&self, pulls: Arc<FleetPulls>) {
        let _ = self.inner.pulls.set(pulls);
    }

    /// The counters this worker adds to.
    #[must_use]
    pub fn counters(&self) -> Arc<DeliveryCounters> {
        Arc::clone(&self.inner.counters)
    }

    /// Leases and delivers until `shutdown` resolves; then lets deliveries under way
    /// finish (each is bounded by its lease), abandoning them if the task is dropped.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) {
        let inner = self.inner;
        let mut shutdown = std::pin::pin!(shutdown);
        let mut tasks = JoinSet::new();
        loop {
            while tasks.try_join_next().is_some() {}
            let free = inner.slots.available_permits();
            let leased = inner.lease_batch(free).await;
            let full = free > 0 && leased.len() == free;
            for record in leased {
                let Ok(slot) = Arc::clone(&inner.slots).try_acquire_owned() else {
                    // Cannot happen (only this loop takes slots); the lease will expire.
                    break;
                };
                let inner = Arc::clone(&inner);
                tasks.spawn(async move {
                    inner.deliver(record).await;
                    drop(slot);
                });
            }
            if full {
                // More may be due: look again as soon as a slot frees.
                tokio::select! {
                    () = &mut shutdown => break,
                    _ = Arc::clone(&inner.slots).acquire_owned() => continue,
                }
            }
            tokio::select! {
                () = &mut shutdown => break,
                () = tokio::time::sleep(inner.options.poll_interval) => {}
            }
        }
        while tasks.join_next().await.is_some() {}
    }

    /// [`Deliverer::run`] on a new task.
    pub fn spawn(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(self.run(shutdown))
    }
}

fn client(connect_timeout: Duration) -> std::io::Result<Pool> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(connect_timeout));
    http.set_nodelay(true);
    let roots = crate::tls::upstream_roots(None).map_err(std::io::Error::other)?;
    let tls = crate::tls::client_config(roots).map_err(std::io::Error::other)?;
    let connector = HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .build(connector))
}

impl Inner {
    async fn lease_batch(&self, free: usize) -> Vec<Leased> {
        if free == 0 {
            return Vec::new();
        }
        match self.store.lease_due(now_ms(), self.lease, free).await {
            Ok(leased) => leased,
            Err(e) => {
                self.counters.add(Counted::StoreError);
                tracing::warn!(error = %e, "relay delivery: leasing due records failed");
                Vec::new()
            }
        }
    }

    /// One record: attempt, then settle under its lease.
    async fn deliver(&self, record: Leased) {
        let outcome = self.attempt(&record).await;
        if outcome == Settle::Dead {
            self.counters.add(Counted::Dead);
            tracing::warn!(record = %record.id, acquirer = %record.acquirer, attempts = record.attempts, "relay delivery: dead letter");
        }
        match self
            .store
            .settle(record.id, record.lease, outcome, now_ms())
            .await
        {
            Ok(true) => {}
            Ok(false) => {
                self.counters.add(Counted::LeaseLost);
                tracing::warn!(record = %record.id, acquirer = %record.acquirer, "relay delivery: lease lost before settling");
            }
            Err(e) => {
                // The lease expires and the record is delivered again (same webhook-id).
                self.counters.add(Counted::StoreError);
                tracing::warn!(record = %record.id, acquirer = %record.acquirer, error = %e, "relay delivery: settle failed");
            }
        }
    }

    async fn attempt(&self, record: &Leased) -> Settle {
        if record.route.is_pull() {
            return self.hold_pull(record).await;
        }
        let Some(lane) = self.lanes.get(&record.route.target) else {
            self.counters.add(Counted::UnknownTarget);
            tracing::warn!(record = %record.id, acquirer = %record.acquirer, delivery_target = %record.route.target, "relay delivery: route names an unknown target");
            return Settle::Dead;
        };
        let permit =
            tokio::time::timeout(self.timeout, Arc::clone(&lane.permits).acquire_owned()).await;
        let Ok(Ok(_permit)) = permit else {
            self.counters.add(Counted::Busy);
            return self.later(record, self.options.poll_interval, false);
        };
        let admission = match lane.breaker.admit() {
            Ok(admission) => admission,
            Err(wait) => {
                self.counters.add(Counted::BreakerOpen);
                return self.later(record, wait, false);
            }
        };
        let Some(request) = request(&lane.target, record) else {
            lane.breaker.abandon(admission);
            self.counters.add(Counted::Unsendable);
            tracing::warn!(record = %record.id, acquirer = %record.acquirer, "relay delivery: stored values do not form a request");
            return Settle::Dead;
        };
        let attempt = self.send(request).await;
        let was_open = lane.breaker.is_open();
        lane.breaker.record(admission, !attempt.is_outage());
        if !was_open && lane.breaker.is_open() {
            // The breaker's own line speaks of Diia; this one names the target.
            tracing::warn!(delivery_target = %lane.target.name, "relay delivery: target's breaker opened");
        }
        self.counters.add(Counted::of(attempt));
        tracing::debug!(record = %record.id, acquirer = %record.acquirer, delivery_target = %lane.target.name, attempt = record.attempts, outcome = Counted::of(attempt).as_str(), "relay delivery attempt");
        match attempt {
            Attempt::Delivered => Settle::Delivered,
            Attempt::Gone => Settle::Dead,
            Attempt::Throttled(Some(wait)) => self.later(record, wait, true),
            Attempt::Throttled(None)
            | Attempt::Rejected
            | Attempt::Failed(_)
            | Attempt::Timeout
            | Attempt::Transport => {
                let pause = policy::pause_after(&self.schedule, record.attempts);
                self.later(record, self.options.jitter.apply(pause), false)
            }
        }
    }

    /// [`Inner::hold_for_pull`], and with a fleet: a record leased again (after a restart,
    /// or at `max_age`) that was acknowledged on another instance is delivered; a record
    /// held is copied to Redis for as long as it is held.
    async fn hold_pull(&self, record: &Leased) -> Settle {
        let Some(pulls) = self.pulls.get() else {
            return self.hold_for_pull(record);
        };
        if record.attempts > 1 && pulls.acked_elsewhere(record.id).await {
            tracing::info!(record = %record.id, acquirer = %record.acquirer, "relay: pulled package acknowledged on another instance; settled");
            return Settle::Delivered;
        }
        let settle = self.hold_for_pull(record);
        if let Settle::RetryAt(until) = settle
            && pulls.copy(record, until).await
        {
            // Erased (an admin, on another instance) before it could be copied.
            return Settle::Delivered;
        }
        settle
    }

    /// A pull-only record is held for the pull side until `max_age` from its arrival, then
    /// dead. A lease that was not settled (a crash) holds it again until the same deadline;
    /// an admin redelivery (attempts reset, so this is the first lease since) past the
    /// deadline holds it for another `max_age` from now.
    fn hold_for_pull(&self, record: &Leased) -> Settle {
        let now = now_ms();
        let deadline = record.received_ms.saturating_add(millis(self.max_age));
        if now < deadline {
            self.counters.add(Counted::HeldForPull);
            return Settle::RetryAt(deadline);
        }
        if record.attempts <= 1 {
            self.counters.add(Counted::HeldForPull);
            return Settle::RetryAt(now.saturating_add(millis(self.max_age)));
        }
        tracing::warn!(record = %record.id, acquirer = %record.acquirer, "relay: package not pulled within max_age; dead letter");
        Settle::Dead
    }

    /// Due again after `wait`, or dead once `max_age` since arrival has passed. A wait the
    /// receiver asked for (`exact`) is kept even past the deadline; the schedule's is cut
    /// to it, so the last attempt falls on the deadline.
    fn later(&self, record: &Leased, wait: Duration, exact: bool) -> Settle {
        let now = now_ms();
        let deadline = record.received_ms.saturating_add(millis(self.max_age));
        if now >= deadline {
            return Settle::Dead;
        }
        let at = now.saturating_add(millis(wait));
        Settle::RetryAt(if exact { at } else { at.min(deadline) })
    }

    async fn send(&self, request: Request<Full<Bytes>>) -> Attempt {
        let exchange = async {
            let Ok(response) = self.client.request(request).await else {
                return Attempt::Transport;
            };
            let status = response.status();
            let wait = response.headers().get(RETRY_AFTER).and_then(|v| {
                policy::retry_after(
                    v.as_bytes(),
                    SystemTime::now(),
                    self.options.retry_after_cap,
                )
            });
            let mut body = response.into_body();
            let mut head = BytesMut::new();
            while head.len() <= self.options.answer_limit {
                match body.frame().await {
                    None => break,
                    Some(Ok(frame)) => {
                        if let Ok(data) = frame.into_data() {
                            head.extend_from_slice(&data);
                        }
                    }
                    Some(Err(_)) => return Attempt::Transport,
                }
            }
            policy::classify(status, &head, wait)
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .unwrap_or(Attempt::Timeout)
    }
}

/// The POST for one attempt: the stored body and `Content-Type` as Diia sent them, the
/// trace and action headers, and a fresh Standard Webhooks signature under the stable id.
fn request(target: &Target, record: &Leased) -> Option<Request<Full<Bytes>>> {
    let envelope = &record.envelope;
    let id = record.id.webhook_id();
    let timestamp = now_ms() / 1000;
    let signature = policy::sign(&target.signing_secret, &id, timestamp, &envelope.body);
    let mut builder = Request::builder()
        .method(Method::POST)
        .uri(target.url.clone())
        .header(
            CONTENT_TYPE,
            HeaderValue::from_str(&envelope.content_type).ok()?,
        )
        .header(
            "x-document-request-trace-id",
            HeaderValue::from_str(&envelope.request_id).ok()?,
        )
        .header("webhook-id", HeaderValue::from_str(&id).ok()?)
        .header("webhook-timestamp", timestamp)
        .header("webhook-signature", HeaderValue::from_str(&signature).ok()?);
    if let Some(action) = &envelope.action {
        builder = builder.header("x-diia-id-action", HeaderValue::from_str(action).ok()?);
    }
    builder.body(Full::new(envelope.body.clone())).ok()
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
