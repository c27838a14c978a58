//! The relay's metrics, registered into the gateway's registry by one call
//! ([`RelayMetrics::register`]): callbacks by result, the time to acknowledge one, the
//! store's commits (read from [`SqliteStore::writer_stats`] at scrape time), store errors,
//! queue depth by state and the oldest undelivered record's age, and push delivery
//! attempts by outcome (read from the worker's [`DeliveryCounters`] at scrape time).
//!
//! A scrape never waits on the disk: queue depth and age come from the last
//! [`CallbackStore::stats`] that [`spawn_stats_refresh`] fetched (every
//! [`STATS_REFRESH`]), so a slow or stuck store makes the numbers late, not the scrape.

use std::future::Future;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::task::JoinHandle;

use super::deliver::{Counted, DeliveryCounters};
use super::sqlite::SqliteStore;
use super::{CallbackStore, State, Stats, now_ms};

/// How often [`spawn_stats_refresh`] reads queue depth and age from the store.
pub const STATS_REFRESH: Duration = Duration::from_secs(5);
/// Longest one stats read may take before it counts as a store error (and is retried at
/// the next refresh; the scrape keeps showing the last numbers meanwhile).
const STATS_TIMEOUT: Duration = Duration::from_secs(10);

/// Which store call failed (the `op` label of `relay_store_errors_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreOp {
    /// Ingress could not store a callback (it answered 503).
    Ingest,
    /// The background stats read (queue depth, oldest age).
    Stats,
    /// An admin call (list, redeliver, purge, erase).
    Admin,
}

impl StoreOp {
    /// Every operation, in label order.
    pub const ALL: [Self; 3] = [Self::Ingest, Self::Stats, Self::Admin];

    /// The `op` label.
    #[must_use]
    pub const fn label(self) -> &'static str {
        match self {
            Self::Ingest => "ingest",
            Self::Stats => "stats",
            Self::Admin => "admin",
        }
    }
}

/// How one callback ended at the ingress (the `result` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IngestResult {
    /// Stored, routed (`pending`).
    Stored,
    /// Stored without a route (`orphan`).
    Orphan,
    /// Same (acquirer, requestId, action), same bytes: acknowledged, not stored again.
    Duplicate,
    /// Same (acquirer, requestId, action), other bytes: acknowledged, the first kept.
    Conflict,
    /// 404: no acquirer has this path token (or another path).
    RefusedToken,
    /// 405: not a POST.
    RefusedMethod,
    /// 413: larger than `max_body`.
    RefusedTooLarge,
    /// 400: no `X-Document-Request-Trace-Id`.
    RefusedTrace,
    /// 400: not multipart, or a malformed one.
    RefusedMultipart,
    /// 400: a part is not CMS `EnvelopedData` for the acquirer's certificate.
    RefusedCms,
    /// 503: `max_in_flight_bytes` taken.
    RefusedBusy,
    /// 400: the body broke off or took too long.
    RefusedBody,
    /// 503: the store failed; nothing acknowledged.
    StoreError,
}

impl IngestResult {
    /// Every result, in label order.
    pub const ALL: [Self; 13] = [
        Self::Stored,
        Self::Orphan,
        Self::Duplicate,
        Self::Conflict,
        Self::RefusedToken,
        Self::RefusedMethod,
        Self::RefusedTooLarge,
        Self::RefusedTrace,
        Self::RefusedMultipart,
        Self::RefusedCms,
        Self::RefusedBusy,
        Self::RefusedBody,
        Self::StoreError,
    ];

    /// The `result` label.
    #[must_use]
    pub const fn label(self) -> &'static str {
        match self {
            Self::Stored => "stored",
            Self::Orphan => "orphan",
            Self::Duplicate => "duplicate",
            Self::Conflict => "conflict",
            Self::RefusedToken => "refused_token",
            Self::RefusedMethod => "refused_method",
            Self::RefusedTooLarge => "refused_too_large",
            Self::RefusedTrace => "refused_trace",
            Self::RefusedMultipart => "refused_multipart",
            Self::RefusedCms => "refused_cms",
            Self::RefusedBusy => "refused_busy",
            Self::RefusedBody => "refused_body",
            Self::StoreError => "store_error",
        }
    }
}

type ResultLabel = [(&'static str, &'static str); 1];

/// The relay's metric handles (registered whether or not the relay is on; empty when off).
#[derive(Debug)]
pub struct RelayMetrics {
    ingest: Family<ResultLabel, Counter>,
    ack_seconds: Histogram,
    store_errors: Family<ResultLabel, Counter>,
    store: Arc<StoreCollector>,
    route_copies: Family<ResultLabel, Counter>,
    route_lookups: Family<ResultLabel, Counter>,
    config_mismatch: Gauge,
    pull_copies: Family<ResultLabel, Counter>,
    remote_pulls: Family<ResultLabel, Counter>,
}

/// Reads the store's writer counters, the last stats and the delivery counters at scrape
/// time, once each is attached. The stats sit behind a `Mutex` held only to copy a few
/// words (never across an await or a store call).
#[derive(Default)]
struct StoreCollector {
    store: OnceLock<SqliteStore>,
    stats: Mutex<Option<Stats>>,
    delivery: OnceLock<Arc<DeliveryCounters>>,
}

impl std::fmt::Debug for StoreCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let attached = self.store.get().is_some();
        let delivery = self.delivery.get().is_some();
        write!(
            f,
            "StoreCollector(attached={attached}, delivery={delivery})"
        )
    }
}

impl RelayMetrics {
    /// Registers the relay's metrics in `registry`.
    #[must_use]
    pub fn register(registry: &mut Registry) -> Self {
        let ingest = Family::<ResultLabel, Counter>::default();
        registry.register(
            "relay_ingest",
            "Callbacks received by the relay, by result",
            ingest.clone(),
        );
        // 1 ms to ~8 s.
        let ack_seconds = Histogram::new(
            prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 14),
        );
        registry.register(
            "relay_ack_seconds",
            "Time from a callback's head to its 200 (read, checked, stored, committed)",
            ack_seconds.clone(),
        );
        let store_errors = Family::<ResultLabel, Counter>::default();
        registry.register(
            "relay_store_errors",
            "Store calls that failed, by operation (ingest answered 503; stats are late; admin answered 503)",
            store_errors.clone(),
        );
        let store = Arc::new(StoreCollector::default());
        registry.register_collector(Box::new(Arc::clone(&store)));
        let route_copies = Family::<ResultLabel, Counter>::default();
        registry.register(
            "relay_route_copies",
            "Routes copied to the fleet's Redis, by result (stored, same, taken, failed)",
            route_copies.clone(),
        );
        let route_lookups = Family::<ResultLabel, Counter>::default();
        registry.register(
            "relay_route_lookups",
            "Routes looked up in the fleet's Redis for callbacks without a local route, by result (found, missing, failed)",
            route_lookups.clone(),
        );
        let config_mismatch = Gauge::default();
        registry.register(
            "relay_config_mismatch",
            "1 while another live fleet instance publishes a different relay routing config (acquirer names, path_prefix, targets and their branch_ids), else 0",
            config_mismatch.clone(),
        );
        let pull_copies = Family::<ResultLabel, Counter>::default();
        registry.register(
            "relay_pull_copies",
            "Packages held for pull-only branches copied to the fleet's Redis, by result (stored, skipped, failed)",
            pull_copies.clone(),
        );
        let remote_pulls = Family::<ResultLabel, Counter>::default();
        registry.register(
            "relay_remote_pulls",
            "Pull-side work through the fleet's Redis, by result (served: a package from another instance's copy; acked: such a package acknowledged; settled: a local record settled by an acknowledgement made elsewhere; failed: Redis did not answer)",
            remote_pulls.clone(),
        );
        Self {
            ingest,
            ack_seconds,
            store_errors,
            store,
            route_copies,
            route_lookups,
            config_mismatch,
            pull_copies,
            remote_pulls,
        }
    }

    /// Counts one failed store call.
    pub fn store_failed(&self, op: StoreOp) {
        self.store_errors.get_or_create(&[("op", op.label())]).inc();
    }

    /// Failed store calls of `op` so far (tests).
    #[must_use]
    pub fn store_errors(&self, op: StoreOp) -> u64 {
        self.store_errors.get_or_create(&[("op", op.label())]).get()
    }

    /// The queue depth and oldest age the next scrapes show (what the refresh task calls).
    pub fn refresh(&self, stats: Stats) {
        if let Ok(mut last) = self.store.stats.lock() {
            *last = Some(stats);
        }
    }

    /// Makes a delivery worker's counters visible as `relay_delivery_attempts_total`
    /// (once; later calls change nothing).
    pub fn attach_delivery(&self, counters: Arc<DeliveryCounters>) {
        let _ = self.store.delivery.set(counters);
    }

    /// Counts one callback.
    pub fn count(&self, result: IngestResult) {
        self.ingest
            .get_or_create(&[("result", result.label())])
            .inc();
    }

    /// Records the time to acknowledge one stored callback.
    pub fn acked(&self, elapsed: std::time::Duration) {
        self.ack_seconds.observe(elapsed.as_secs_f64());
    }

    /// Callbacks counted with `result` so far (tests, admin).
    #[must_use]
    pub fn ingested(&self, result: IngestResult) -> u64 {
        self.ingest
            .get_or_create(&[("result", result.label())])
            .get()
    }

    /// Counts one route copied to the fleet's Redis (`relay::fleet`).
    pub fn route_copy(&self, result: &'static str) {
        self.route_copies.get_or_create(&[("result", result)]).inc();
    }

    /// Counts routes looked up in the fleet's Redis (`relay::fleet`).
    pub fn route_lookup(&self, result: &'static str, n: u64) {
        self.route_lookups
            .get_or_create(&[("result", result)])
            .inc_by(n);
    }

    /// Whether another live fleet instance's relay routing config differs from this one's
    /// (`scaleout::relay_config`).
    pub fn config_mismatch(&self, mismatch: bool) {
        self.config_mismatch.set(i64::from(mismatch));
    }

    /// Counts one package copied (or not) to the fleet's Redis (`relay::fleet_pulls`).
    pub fn pull_copy(&self, result: &'static str) {
        self.pull_copies.get_or_create(&[("result", result)]).inc();
    }

    /// Packages counted with `result` by [`RelayMetrics::pull_copy`] so far (tests).
    #[must_use]
    pub fn pull_copies(&self, result: &'static str) -> u64 {
        self.pull_copies.get_or_create(&[("result", result)]).get()
    }

    /// Counts pull-side work through the fleet's Redis (`relay::fleet_pulls`).
    pub fn remote_pull(&self, result: &'static str, n: u64) {
        if n > 0 {
            self.remote_pulls
                .get_or_create(&[("result", result)])
                .inc_by(n);
        }
    }

    /// Makes the store's commit counters visible (once; later calls change nothing), and
    /// starts every `relay_store_errors_total` series at 0 so the first error is an increase.
    pub fn attach_store(&self, store: &SqliteStore) {
        let _ = self.store.store.set(store.clone());
        for op in StoreOp::ALL {
            let _ = self.store_errors.get_or_create(&[("op", op.label())]);
        }
    }
}

/// Refreshes `metrics`' queue depth and age from `store` now and every [`STATS_REFRESH`]
/// until `shutdown` resolves. A failed or late read is counted
/// (`relay_store_errors_total{op="stats"}`) and logged; the last numbers stay.
pub fn spawn_stats_refresh(
    store: Arc<dyn CallbackStore>,
    metrics: Arc<RelayMetrics>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        tokio::pin!(shutdown);
        let mut ticks = tokio::time::interval(STATS_REFRESH);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                () = &mut shutdown => break,
            }
            let read = tokio::select! {
                read = tokio::time::timeout(STATS_TIMEOUT, store.stats(now_ms())) => read,
                () = &mut shutdown => break,
            };
            match read {
                Ok(Ok(stats)) => metrics.refresh(stats),
                Ok(Err(error)) => {
                    metrics.store_failed(StoreOp::Stats);
                    tracing::warn!(%error, "relay: queue stats not read; metrics keep the last");
                }
                Err(_) => {
                    metrics.store_failed(StoreOp::Stats);
                    tracing::warn!(
                        timeout_ms = STATS_TIMEOUT.as_millis(),
                        "relay: queue stats read timed out; metrics keep the last"
                    );
                }
            }
        }
    })
}

impl prometheus_client::collector::Collector for StoreCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(store) = self.store.get() else {
            return Ok(());
        };
        let stats = store.writer_stats();
        let commits = ConstCounter::new(stats.commits());
        commits.encode(encoder.encode_descriptor(
            "relay_store_commits",
            "Store transactions committed (each holds one or more writes)",
            None,
            MetricType::Counter,
        )?)?;
        #[allow(clippy::cast_precision_loss)]
        let seconds = ConstCounter::new(stats.commit_micros() as f64 / 1e6);
        seconds.encode(encoder.encode_descriptor(
            "relay_store_commit_seconds",
            "Time spent committing (with fsync); divided by commits, the mean commit latency",
            None,
            MetricType::Counter,
        )?)?;
        let last = self.stats.lock().ok().and_then(|last| *last);
        if let Some(stats) = last {
            encode_stats(&mut encoder, &stats)?;
        }
        if let Some(counters) = self.delivery.get() {
            let mut family = encoder.encode_descriptor(
                "relay_delivery_attempts",
                "Push delivery rounds by outcome: attempts (delivered, rejected, throttled, gone, failed, timeout, transport), rounds without an attempt, records settled dead, lost leases, store failures",
                None,
                MetricType::Counter,
            )?;
            for what in Counted::ALL {
                let labels = [("outcome", what.as_str())];
                ConstCounter::new(counters.get(what)).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

/// Queue depth by state and the oldest undelivered record's age (0 when none waits).
fn encode_stats(encoder: &mut DescriptorEncoder, stats: &Stats) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(
        "relay_records",
        "Records in the relay's store, by state (as of the last background read)",
        None,
        MetricType::Gauge,
    )?;
    for state in State::ALL {
        let labels = [("state", state.as_str())];
        let count = i64::try_from(stats.count(state)).unwrap_or(i64::MAX);
        ConstGauge::new(count).encode(family.encode_family(&labels)?)?;
    }
    let age = stats.oldest_pending.map_or(0.0, |age| age.as_secs_f64());
    ConstGauge::new(age).encode(encoder.encode_descriptor(
        "relay_oldest_pending_seconds",
        "Age of the oldest record not yet delivered (pending or delivering); 0 when none",
        None,
        MetricType::Gauge,
    )?)?;
    Ok(())
}
