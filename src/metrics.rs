//! Prometheus metrics: handles registered once with bounded label sets, so the hot path
//! is a relaxed atomic add on a handle fetched by array index.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::error::Fault;
use crate::route::{CallClass, Endpoint};

/// How one request ended, from the gateway's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestOutcome {
    /// Answered from cache.
    Hit,
    /// Sent to Diia (cache-eligible endpoint).
    Miss,
    /// Waited for an identical request's Diia call.
    Coalesced,
    /// A repeated sharing request answered with the first answer.
    Replayed,
    /// Forwarded to Diia without caching (branches, offers, status).
    Passthrough,
    /// Refused by validation (4xx of ours); never reached Diia.
    Rejected,
    /// Refused by a rate limit, Diia's budget or Diia's back-off.
    Limited,
    /// Diia failed: unreachable, timeout, invalid answer.
    UpstreamError,
    /// Diia failed and a stored answer past its TTL was served (stale-if-error, opt-in).
    Stale,
    /// A bug of ours (500).
    Internal,
    /// Answered by the callback relay's pull side; never reached Diia.
    Relayed,
}

impl RequestOutcome {
    const ALL: [Self; 11] = [
        Self::Hit,
        Self::Miss,
        Self::Coalesced,
        Self::Replayed,
        Self::Passthrough,
        Self::Rejected,
        Self::Limited,
        Self::UpstreamError,
        Self::Stale,
        Self::Internal,
        Self::Relayed,
    ];

    /// The `outcome` label.
    #[must_use]
    pub fn label(self) -> &'static str {
        match self {
            Self::Hit => "hit",
            Self::Miss => "miss",
            Self::Coalesced => "coalesced",
            Self::Replayed => "replayed",
            Self::Passthrough => "passthrough",
            Self::Rejected => "rejected",
            Self::Limited => "limited",
            Self::UpstreamError => "upstream_error",
            Self::Stale => "stale",
            Self::Internal => "internal",
            Self::Relayed => "relayed",
        }
    }

    /// Whether this outcome spared Diia a call.
    #[must_use]
    pub fn saved_a_call(self) -> bool {
        matches!(self, Self::Hit | Self::Coalesced | Self::Replayed)
    }

    /// The outcome of a request the gateway answered with its own error.
    #[must_use]
    pub fn of_fault(fault: Fault) -> Self {
        match fault {
            Fault::Client => Self::Rejected,
            Fault::Limit => Self::Limited,
            Fault::Upstream => Self::UpstreamError,
            Fault::Internal => Self::Internal,
        }
    }
}

/// One counter per (endpoint or none) × outcome, fetched by index on the hot path.
fn request_table(
    family: &Family<EndpointOutcome, Counter>,
) -> Vec<[Counter; RequestOutcome::ALL.len()]> {
    let endpoint_labels = Endpoint::ALL.iter().map(|e| e.label()).chain(["none"]);
    endpoint_labels
        .map(|endpoint| {
            RequestOutcome::ALL.map(|outcome| {
                family
                    .get_or_create(&EndpointOutcome {
                        endpoint,
                        outcome: outcome.label(),
                    })
                    .clone()
            })
        })
        .collect()
}

/// Registers `metric` and hands back the handle the hot path keeps.
fn registered<M: prometheus_client::registry::Metric + Clone>(
    registry: &mut Registry,
    name: &str,
    help: &str,
    metric: M,
) -> M {
    registry.register(name, help, metric.clone());
    metric
}

/// Label sets, named after what they hold; each field is a label, in exposition order.
/// Every value is a `&'static str` from a closed list, so each family stays bounded.
mod labels {
    use super::EncodeLabelSet;

    /// `requests_total`.
    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    pub struct EndpointOutcome {
        pub endpoint: &'static str,
        pub outcome: &'static str,
    }

    /// `errors_total`: the gateway's own answers by `gatewayCode`.
    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    pub struct EndpointCode {
        pub endpoint: &'static str,
        pub code: &'static str,
    }

    /// `upstream_calls_total`.
    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    pub struct EndpointResult {
        pub endpoint: &'static str,
        pub result: &'static str,
    }

    /// `upstream_latency_seconds`.
    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    pub struct OfEndpoint {
        pub endpoint: &'static str,
    }

    /// `cache_entries`, `cache_weighted_bytes`.
    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    pub struct OfCache {
        pub cache: &'static str,
    }

    /// `connections_refused_total`.
    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    pub struct RefusedReason {
        pub reason: &'static str,
    }

    /// `circuit_open`.
    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    pub struct OfCallClass {
        pub class: &'static str,
    }

    /// `redis_op_seconds`.
    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    pub struct RedisOp {
        pub op: &'static str,
    }

    /// `shared_lookups_total`.
    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    pub struct LookupResult {
        pub result: &'static str,
    }
}

use labels::{
    EndpointCode, EndpointOutcome, EndpointResult, LookupResult, OfCache, OfCallClass, OfEndpoint,
    RedisOp, RefusedReason,
};

/// Slots in the request table: one per endpoint plus one for requests that matched none.
const ENDPOINT_SLOTS: usize = Endpoint::ALL.len() + 1;

/// All metric handles.
pub struct Metrics {
    registry: Registry,
    requests: Vec<[Counter; RequestOutcome::ALL.len()]>,
    errors: Family<EndpointCode, Counter>,
    upstream_latency: Vec<Histogram>,
    upstream_calls: Family<EndpointResult, Counter>,
    saved: Counter,
    retries: Counter,
    /// Connections closed at accept, by [`crate::error::Refused::label`].
    connections_refused: [Counter; crate::error::Refused::LABELS.len()],
    breaker_open: [Gauge; CallClass::ALL.len()],
    gauges: Gauges,
    /// Scale-out (Redis) metrics; registered only when `[scaleout]` is on.
    fleet: Option<FleetMetrics>,
    /// The callback relay's metrics (empty while the relay is off).
    pub relay: std::sync::Arc<crate::relay::metrics::RelayMetrics>,
    /// Reads the log writer's dropped-line count (set by the binary).
    dropped_log_lines: std::sync::OnceLock<Box<dyn Fn() -> u64 + Send + Sync>>,
}

/// The gauges set from a [`Snapshot`] at scrape time.
struct Gauges {
    cache_entries: Family<OfCache, Gauge>,
    branches_tracked: Gauge,
    cache_bytes: Family<OfCache, Gauge>,
    in_flight: Gauge,
    ready: Gauge,
    diia_backoff: Gauge<f64, std::sync::atomic::AtomicU64>,
    log_lines_dropped: Gauge,
}

impl Gauges {
    fn register(registry: &mut Registry) -> Self {
        Self {
            cache_entries: registered(
                registry,
                "cache_entries",
                "Entries held per cache (answers and calls under way)",
                Family::<OfCache, Gauge>::default(),
            ),
            branches_tracked: registered(
                registry,
                "branches_tracked",
                "Branches with a rate-limit state in memory",
                Gauge::default(),
            ),
            cache_bytes: registered(
                registry,
                "cache_weighted_bytes",
                "Bytes the cache's weigher counts per cache (bounded by cache.max_bytes)",
                Family::<OfCache, Gauge>::default(),
            ),
            in_flight: registered(
                registry,
                "in_flight",
                "Requests being processed (bounded by server.max_in_flight)",
                Gauge::default(),
            ),
            ready: registered(
                registry,
                "ready",
                "1 while /readyz answers 200, 0 once a drain started",
                Gauge::default(),
            ),
            diia_backoff: registered(
                registry,
                "diia_backoff_seconds",
                "Remaining gateway-wide pause Diia asked for with Retry-After (0: none)",
                Gauge::<f64, std::sync::atomic::AtomicU64>::default(),
            ),
            log_lines_dropped: registered(
                registry,
                "log_lines_dropped",
                "Log lines dropped because the log sink could not keep up (requests never wait for it)",
                Gauge::default(),
            ),
        }
    }
}

/// What SREs watch in scale-out mode.
pub struct FleetMetrics {
    redis_up: Gauge,
    redis_op: Family<RedisOp, Histogram>,
    /// One handle per known operation, resolved once (no label hashing per round trip).
    redis_ops: [(&'static str, Histogram); REDIS_OPS.len()],
    /// One handle per lookup result, resolved once (a near hit costs one atomic add).
    lookups: [(&'static str, Counter); LOOKUP_RESULTS.len()],
    fallback_admits: Counter,
    instances: Gauge,
}

/// The `result` labels of `shared_lookups_total`.
const LOOKUP_RESULTS: [&str; 7] = [
    "near_hit",
    "remote_hit",
    "leader",
    "remote_wait",
    "degraded",
    "unavailable",
    "unreadable",
];

/// The `op` labels of `redis_op_seconds` that the link records.
const REDIS_OPS: [&str; 6] = ["lookup", "finish", "budget", "brake", "heartbeat", "probe"];

impl FleetMetrics {
    fn register(registry: &mut Registry) -> Self {
        let redis_op = registered(
            registry,
            "redis_op_seconds",
            "Redis round trips by operation (lookup, finish, budget, brake, heartbeat, probe)",
            Family::<RedisOp, Histogram>::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.000_025, 2.0, 14))
            }),
        );
        let lookups = registered(
            registry,
            "shared_lookups",
            "Cache lookups in scale-out mode by result (near_hit, remote_hit, leader, remote_wait, degraded, unavailable, unreadable)",
            Family::<LookupResult, Counter>::default(),
        );
        Self {
            redis_up: registered(
                registry,
                "redis_up",
                "1 while Redis answers (shared mode), 0 while the gateway runs degraded on local state",
                Gauge::default(),
            ),
            redis_ops: REDIS_OPS.map(|op| (op, redis_op.get_or_create(&RedisOp { op }).clone())),
            redis_op,
            lookups: LOOKUP_RESULTS.map(|result| {
                (
                    result,
                    lookups.get_or_create(&LookupResult { result }).clone(),
                )
            }),
            fallback_admits: registered(
                registry,
                "budget_fallback_admits",
                "Diia calls admitted by the local budget (rate / live instances) while Redis was down",
                Counter::default(),
            ),
            instances: registered(
                registry,
                "instances_live",
                "Gateway instances alive in the fleet (heartbeats); local budgets are divided by it",
                Gauge::default(),
            ),
        }
    }
}

/// Point-in-time values read when `/metrics` is scraped.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Per cache: name, entries, weighted bytes.
    pub caches: Vec<(&'static str, u64, u64)>,
    /// Branches with a rate-limit state.
    pub branches_tracked: u64,
    /// Requests being processed.
    pub in_flight: u64,
    /// Whether `/readyz` answers 200.
    pub ready: bool,
    /// Remaining pause Diia asked for (zero: none).
    pub diia_backoff: Duration,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The accept-time refusals and the breaker gauges, one handle per label value.
fn register_edges(
    registry: &mut Registry,
) -> (
    [Counter; crate::error::Refused::LABELS.len()],
    [Gauge; CallClass::ALL.len()],
) {
    let refused_family = registered(
        registry,
        "connections_refused",
        "Connections closed at accept: no valid PROXY header from a trusted proxy (proxy_header), or the client's max_connections_per_client reached (per_client)",
        Family::<RefusedReason, Counter>::default(),
    );
    let connections_refused = crate::error::Refused::LABELS.map(|reason| {
        refused_family
            .get_or_create(&RefusedReason { reason })
            .clone()
    });
    let breaker_family = registered(
        registry,
        "circuit_open",
        "1 while the circuit breaker toward Diia is open, per call class",
        Family::<OfCallClass, Gauge>::default(),
    );
    let breaker_open = CallClass::ALL.map(|class| {
        breaker_family
            .get_or_create(&OfCallClass {
                class: class.label(),
            })
            .clone()
    });
    (connections_refused, breaker_open)
}

impl Metrics {
    /// Registers every metric.
    #[must_use]
    pub fn new() -> Self {
        Self::with_fleet(false)
    }

    /// Registers every metric, plus the scale-out ones when `fleet` is set.
    #[must_use]
    pub fn with_fleet(fleet: bool) -> Self {
        let mut registry = Registry::with_prefix("diia_gateway");
        let requests_family = registered(
            &mut registry,
            "requests",
            "Requests by endpoint and outcome (hit, miss, coalesced, replayed, passthrough, rejected, limited, upstream_error, stale, internal)",
            Family::<EndpointOutcome, Counter>::default(),
        );
        let requests = request_table(&requests_family);
        let errors = registered(
            &mut registry,
            "errors",
            "Answers the gateway made up itself, by endpoint and gatewayCode",
            Family::<EndpointCode, Counter>::default(),
        );
        let latency_family = registered(
            &mut registry,
            "upstream_latency_seconds",
            "Time from sending a request to Diia to having its whole answer",
            Family::<OfEndpoint, Histogram>::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.000_5, 2.0, 16))
            }),
        );
        let upstream_latency = Endpoint::ALL
            .iter()
            .map(|e| {
                latency_family
                    .get_or_create(&OfEndpoint {
                        endpoint: e.label(),
                    })
                    .clone()
            })
            .collect();
        let upstream_calls = registered(
            &mut registry,
            "upstream_calls",
            "Calls made to Diia by endpoint and result (ok, definitive, refused, throttled, failed, or the gateway error)",
            Family::<EndpointResult, Counter>::default(),
        );
        let saved = registered(
            &mut registry,
            "diia_calls_saved",
            "Requests answered without a Diia call (hit, coalesced, replayed)",
            Counter::default(),
        );
        let retries = registered(
            &mut registry,
            "upstream_retries",
            "Retries of safe calls after a connect failure (within the retry budget)",
            Counter::default(),
        );
        let (connections_refused, breaker_open) = register_edges(&mut registry);
        let gauges = Gauges::register(&mut registry);
        let fleet = fleet.then(|| FleetMetrics::register(&mut registry));
        let relay = crate::relay::metrics::RelayMetrics::register(&mut registry).into();
        Self {
            registry,
            requests,
            errors,
            upstream_latency,
            upstream_calls,
            saved,
            retries,
            connections_refused,
            breaker_open,
            gauges,
            fleet,
            relay,
            dropped_log_lines: std::sync::OnceLock::new(),
        }
    }

    /// Where to read the count of log lines dropped by a non-blocking log writer.
    pub fn count_dropped_log_lines(&self, read: impl Fn() -> u64 + Send + Sync + 'static) {
        let _ = self.dropped_log_lines.set(Box::new(read));
    }

    /// Counts one finished request.
    pub fn request(
        &self,
        endpoint: Option<Endpoint>,
        outcome: RequestOutcome,
        error_code: Option<&'static str>,
    ) {
        let slot = endpoint.map_or(ENDPOINT_SLOTS - 1, Endpoint::index);
        if let Some(row) = self.requests.get(slot) {
            row[outcome as usize].inc();
        }
        if outcome.saved_a_call() {
            self.saved.inc();
        }
        if let Some(code) = error_code {
            let endpoint = endpoint.map_or("none", Endpoint::label);
            self.errors
                .get_or_create(&EndpointCode { endpoint, code })
                .inc();
        }
    }

    /// Counts one call to Diia and its latency; `result` is the answer's class label or the
    /// gateway error's code.
    pub fn upstream_call(&self, endpoint: Endpoint, elapsed: Duration, result: &'static str) {
        if let Some(histogram) = self.upstream_latency.get(endpoint.index()) {
            histogram.observe(elapsed.as_secs_f64());
        }
        self.upstream_calls
            .get_or_create(&EndpointResult {
                endpoint: endpoint.label(),
                result,
            })
            .inc();
    }

    /// Records whether Redis answers.
    pub fn set_redis_up(&self, up: bool) {
        if let Some(fleet) = &self.fleet {
            fleet.redis_up.set(i64::from(up));
        }
    }

    /// Records one Redis round trip.
    pub fn redis_op(&self, op: &'static str, elapsed: Duration) {
        if let Some(fleet) = &self.fleet {
            let seconds = elapsed.as_secs_f64();
            match fleet.redis_ops.iter().find(|(name, _)| *name == op) {
                Some((_, histogram)) => histogram.observe(seconds),
                None => fleet
                    .redis_op
                    .get_or_create(&RedisOp { op })
                    .observe(seconds),
            }
        }
    }

    /// Counts one scale-out cache lookup by result.
    pub fn shared_lookup(&self, result: &'static str) {
        if let Some(fleet) = &self.fleet
            && let Some((_, counter)) = fleet.lookups.iter().find(|(name, _)| *name == result)
        {
            counter.inc();
        }
    }

    /// Counts one Diia call admitted by the local fallback budget.
    pub fn budget_fallback_admit(&self) {
        if let Some(fleet) = &self.fleet {
            fleet.fallback_admits.inc();
        }
    }

    /// Records the live instance count.
    pub fn set_instances(&self, live: u32) {
        if let Some(fleet) = &self.fleet {
            fleet.instances.set(i64::from(live));
        }
    }

    /// Counts one connection closed at accept.
    pub fn connection_refused(&self, refused: &crate::error::Refused) {
        let index = crate::error::Refused::LABELS
            .iter()
            .position(|label| *label == refused.label())
            .unwrap_or(0);
        if let Some(counter) = self.connections_refused.get(index) {
            counter.inc();
        }
    }

    /// Counts one retry toward Diia.
    pub fn upstream_retry(&self) {
        self.retries.inc();
    }

    /// Sets a call class's breaker gauge.
    pub fn set_breaker_open(&self, class: CallClass, open: bool) {
        self.breaker_open[class.index()].set(i64::from(open));
    }

    /// Requests counted for an endpoint and outcome (tests and the load tool read this).
    #[must_use]
    pub fn requests(&self, endpoint: Endpoint, outcome: RequestOutcome) -> u64 {
        self.requests
            .get(endpoint.index())
            .map_or(0, |row| row[outcome as usize].get())
    }

    /// Prometheus text exposition, with point-in-time gauges refreshed first.
    #[must_use]
    pub fn render(&self, now: &Snapshot) -> String {
        let gauge = |value: u64| i64::try_from(value).unwrap_or(i64::MAX);
        let gauges = &self.gauges;
        for (cache, entries, bytes) in &now.caches {
            gauges
                .cache_entries
                .get_or_create(&OfCache { cache })
                .set(gauge(*entries));
            gauges
                .cache_bytes
                .get_or_create(&OfCache { cache })
                .set(gauge(*bytes));
        }
        gauges.branches_tracked.set(gauge(now.branches_tracked));
        gauges.in_flight.set(gauge(now.in_flight));
        gauges.ready.set(i64::from(now.ready));
        gauges.diia_backoff.set(now.diia_backoff.as_secs_f64());
        if let Some(read) = self.dropped_log_lines.get() {
            gauges.log_lines_dropped.set(gauge(read()));
        }
        let mut text = String::with_capacity(16 * 1024);
        if encode(&mut text, &self.registry).is_err() {
            text.clear();
        }
        text
    }
}
