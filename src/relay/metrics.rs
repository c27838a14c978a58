//! The relay's metrics, registered into the gateway's registry by one call
//! ([`RelayMetrics::register`]): callbacks by result, the time to acknowledge one, and the
//! store's commits (read from [`SqliteStore::writer_stats`] at scrape time).

use std::sync::{Arc, OnceLock};

use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use super::sqlite::SqliteStore;

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
    store: Arc<StoreCollector>,
    route_copies: Family<ResultLabel, Counter>,
    route_lookups: Family<ResultLabel, Counter>,
}

/// Reads the store's writer counters at scrape time, once a store is attached.
#[derive(Default)]
struct StoreCollector {
    store: OnceLock<SqliteStore>,
}

impl std::fmt::Debug for StoreCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let attached = self.store.get().is_some();
        write!(f, "StoreCollector(attached={attached})")
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
        Self {
            ingest,
            ack_seconds,
            store,
            route_copies,
            route_lookups,
        }
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

    /// Makes the store's commit counters visible (once; later calls change nothing).
    pub fn attach_store(&self, store: &SqliteStore) {
        let _ = self.store.store.set(store.clone());
    }
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
        Ok(())
    }
}
