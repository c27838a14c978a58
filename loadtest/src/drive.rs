//! The open-loop driver: requests leave on a fixed schedule whatever the server does, and
//! each latency is measured from the moment its request was *due*, not sent, so a slow
//! server cannot hide its latency behind a slowed-down client (no coordinated omission).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use diia_sim::{Code, DEMO_ACQUIRER_TOKEN, DEMO_AUTH_TOKEN};
use hdrhistogram::Histogram;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::{Deserialize, Serialize};

use crate::scenario::Scenario;
use crate::target::Target;

/// The load generator's HTTP client.
pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// A request waits at most this long before it counts as a timeout.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// A re-scan reuses a branch's previous barcode only while it is this young (below the
/// gateway's default 60 s cache TTL, as a real operator's re-scan would be).
const RESCAN_WINDOW: Duration = Duration::from_secs(45);

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Percentiles {
    /// Median.
    pub p50: u64,
    /// 90th.
    pub p90: u64,
    /// 99th.
    pub p99: u64,
    /// 99.9th.
    pub p999: u64,
    /// Largest seen.
    pub max: u64,
    /// Mean.
    pub mean: f64,
}

impl Percentiles {
    /// Reads a shared histogram.
    pub fn of(histogram: &Mutex<Histogram<u64>>) -> Result<Self, String> {
        let histogram = histogram
            .lock()
            .map_err(|_| "histogram lock poisoned".to_owned())?;
        Ok(Self {
            p50: histogram.value_at_quantile(0.50),
            p90: histogram.value_at_quantile(0.90),
            p99: histogram.value_at_quantile(0.99),
            p999: histogram.value_at_quantile(0.999),
            max: histogram.max(),
            mean: histogram.mean(),
        })
    }
}

/// An empty latency histogram, 1 µs to 120 s at 3 significant digits.
pub fn histogram() -> Result<Arc<Mutex<Histogram<u64>>>, String> {
    Histogram::<u64>::new_with_bounds(1, 120_000_000, 3)
        .map(|h| Arc::new(Mutex::new(h)))
        .map_err(|e| e.to_string())
}

/// What one run at one offered rate measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunResult {
    /// Requests per second the schedule offered.
    pub offered_rate: f64,
    /// Measured seconds.
    pub duration_s: f64,
    /// Requests sent.
    pub sent: u64,
    /// Requests answered as expected (200 for real scans, 422 for mistyped barcodes).
    pub ok: u64,
    /// Expected answers per second.
    pub throughput: f64,
    /// Latency of every answered request, from its due time.
    pub latency_us: Percentiles,
    /// Unexpected answers by kind (`status_503`, `timeout`, `connect`).
    pub errors: BTreeMap<String, u64>,
    /// Requests by what they were (identification, sharing, rescan, invalid).
    pub requests_by_kind: BTreeMap<String, u64>,
    /// Calls that reached Diia (the simulator's count).
    pub diia_calls: u64,
    /// Diia calls per branch request.
    pub diia_calls_per_request: f64,
    /// Diia calls per second: the quota this load needs.
    pub diia_calls_per_second: f64,
    /// Branch requests answered without a Diia call (cache, coalescing, replay, validation).
    pub calls_saved: u64,
    /// Gateway CPU time over the run, in cores, all instances together (only when the
    /// tool started the gateways).
    pub gateway_cores: Option<f64>,
    /// Gateway instances the load was spread over.
    #[serde(default = "one")]
    pub instances: usize,
    /// What the shared Redis did (scale-out runs started by the tool).
    #[serde(default)]
    pub redis: Option<RedisLoad>,
}

fn one() -> usize {
    1
}

/// Redis's share of a scale-out run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RedisLoad {
    /// Commands processed per second (`INFO stats`), scripts counted once per call.
    pub ops_per_second: f64,
    /// redis-server CPU time over the run, in cores.
    pub cores: f64,
}

/// The request a scan turns into.
#[derive(Clone)]
pub struct Scan {
    /// What it is, for counts.
    pub kind: &'static str,
    /// Path on the proxy.
    pub path: &'static str,
    /// JSON body.
    pub body: Bytes,
    /// The status a correct proxy answers.
    pub expected: StatusCode,
}

impl Scan {
    /// An identification request.
    pub fn identification(kind: &'static str, branch_id: &str, barcode: &str) -> Self {
        Self {
            kind,
            path: "/api/v1/acquirers/document-identification",
            body: Bytes::from(format!(
                r#"{{"branchId":"{branch_id}","barcode":"{barcode}"}}"#
            )),
            expected: StatusCode::OK,
        }
    }
}

/// Per-branch memory for re-scans; owned by the scheduling task alone.
struct Branches {
    last: Vec<Option<(Scan, Instant)>>,
}

impl Branches {
    fn next(&mut self, scenario: &Scenario) -> Scan {
        let branch = fastrand::usize(..self.last.len());
        let branch_id = format!("branch-{branch:05}");
        if fastrand::f64() < scenario.invalid_share {
            // A mistyped barcode: the last digit is off by one, so the check digit fails.
            let good: u64 = random_barcode()
                .digits()
                .parse()
                .unwrap_or(3_389_798_072_091);
            let bad = if good % 10 == 9 { good - 1 } else { good + 1 };
            return Scan {
                kind: "invalid",
                path: "/api/v1/acquirers/document-identification",
                body: Bytes::from(format!(r#"{{"branchId":"{branch_id}","barcode":"{bad}"}}"#)),
                expected: StatusCode::UNPROCESSABLE_ENTITY,
            };
        }
        if let Some((scan, at)) = &self.last[branch]
            && at.elapsed() < RESCAN_WINDOW
            && fastrand::f64() < scenario.rescan_probability
        {
            return Scan {
                kind: "rescan",
                ..scan.clone()
            };
        }
        let barcode = random_barcode().digits();
        let scan = if fastrand::f64() < scenario.sharing_share {
            let request_id = format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..));
            Scan {
                kind: "sharing",
                path: "/api/v1/acquirers/document-request",
                body: Bytes::from(format!(
                    r#"{{"branchId":"{branch_id}","barcode":"{barcode}","requestId":"{request_id}"}}"#
                )),
                expected: StatusCode::OK,
            }
        } else {
            Scan {
                kind: "identification",
                path: "/api/v1/acquirers/document-identification",
                body: Bytes::from(format!(
                    r#"{{"branchId":"{branch_id}","barcode":"{barcode}"}}"#
                )),
                expected: StatusCode::OK,
            }
        };
        self.last[branch] = Some((scan.clone(), Instant::now()));
        scan
    }
}

/// A fresh valid barcode (the simulator runs with `auto_issue`).
pub fn random_barcode() -> Code {
    loop {
        if let Some(barcode) = Code::issue(fastrand::u64(100_000_000_000..=999_999_999_999)) {
            return barcode;
        }
    }
}

/// A pooled HTTP/1.1 client sized for open-loop load.
pub fn client() -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(4096)
        .build(connector)
}

async fn fetch(
    client: &HttpClient,
    request: Request<Full<Bytes>>,
) -> Result<(StatusCode, Bytes), String> {
    let response = tokio::time::timeout(REQUEST_TIMEOUT, client.request(request))
        .await
        .map_err(|_| "timeout".to_owned())?
        .map_err(|e| {
            if e.is_connect() {
                "connect".to_owned()
            } else {
                "transport".to_owned()
            }
        })?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|_| "transport".to_owned())?
        .to_bytes();
    Ok((status, body))
}

/// The demo acquirer's session token, through the gateway.
pub async fn session_token(client: &HttpClient, gateway: &str) -> Result<String, String> {
    let request = Request::get(format!(
        "{gateway}/api/v1/auth/acquirer/{DEMO_ACQUIRER_TOKEN}"
    ))
    .header("authorization", format!("Basic {DEMO_AUTH_TOKEN}"))
    .body(Full::default())
    .map_err(|e| e.to_string())?;
    let (status, body) = fetch(client, request).await?;
    if status != StatusCode::OK {
        return Err(format!("token exchange answered {status}"));
    }
    let json: serde_json::Value = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
    json["token"]
        .as_str()
        .map(|t| format!("Bearer {t}"))
        .ok_or_else(|| "no token in the answer".to_owned())
}

/// Requests the simulator has seen in all.
pub async fn diia_calls(client: &HttpClient, sim: &str) -> Result<u64, String> {
    let request = Request::get(format!("{sim}/sim/stats"))
        .body(Full::default())
        .map_err(|e| e.to_string())?;
    let (_, body) = fetch(client, request).await?;
    let json: serde_json::Value = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
    json["total"]
        .as_u64()
        .ok_or_else(|| "no total in /sim/stats".to_owned())
}

/// Answers as expected, and the rest by kind.
#[derive(Default)]
pub struct Tally {
    /// Expected answers.
    pub ok: u64,
    /// Unexpected ones by kind.
    pub errors: BTreeMap<String, u64>,
}

/// Offers `rate` requests per second for `duration` and measures everything.
pub async fn run(
    target: &Target,
    scenario: &Scenario,
    rate: f64,
    duration: Duration,
) -> Result<RunResult, String> {
    let client = client();
    let token: Arc<str> = session_token(&client, &target.gateway).await?.into();
    let mut branches = Branches {
        last: vec![None; usize::try_from(scenario.branches).unwrap_or(1)],
    };
    let mut next = || branches.next(scenario);
    let gateways: Vec<&str> = target.gateways.iter().map(String::as_str).collect();
    // Warm-up: same schedule, not measured.
    offer_many(
        &client,
        &gateways,
        &token,
        &mut next,
        rate,
        scenario.warmup,
        None,
    )
    .await;

    let calls_before = diia_calls(&client, &target.sim).await?;
    let cpu_before = target.gateway_cpu_seconds();
    let redis_before = target.redis_usage().await;
    let histogram = histogram()?;
    let started = Instant::now();
    let (sent, tally, kinds) = offer_many(
        &client,
        &gateways,
        &token,
        &mut next,
        rate,
        duration,
        Some(Arc::clone(&histogram)),
    )
    .await;
    let elapsed = started.elapsed().as_secs_f64();
    let cpu_after = target.gateway_cpu_seconds();
    let redis_after = target.redis_usage().await;
    let calls = diia_calls(&client, &target.sim)
        .await?
        .saturating_sub(calls_before);

    let histogram = histogram
        .lock()
        .map_err(|_| "histogram lock poisoned".to_owned())?;
    let latency_us = Percentiles {
        p50: histogram.value_at_quantile(0.50),
        p90: histogram.value_at_quantile(0.90),
        p99: histogram.value_at_quantile(0.99),
        p999: histogram.value_at_quantile(0.999),
        max: histogram.max(),
        mean: histogram.mean(),
    };
    let sent_f = sent as f64;
    Ok(RunResult {
        offered_rate: rate,
        duration_s: elapsed,
        sent,
        ok: tally.ok,
        throughput: tally.ok as f64 / elapsed,
        latency_us,
        errors: tally.errors,
        requests_by_kind: kinds,
        diia_calls: calls,
        diia_calls_per_request: if sent == 0 {
            0.0
        } else {
            calls as f64 / sent_f
        },
        diia_calls_per_second: calls as f64 / elapsed,
        calls_saved: sent.saturating_sub(calls),
        gateway_cores: cpu_before
            .zip(cpu_after)
            .map(|(before, after)| (after - before) / elapsed),
        instances: target.gateways.len(),
        redis: redis_before
            .zip(redis_after)
            .map(|(before, after)| RedisLoad {
                ops_per_second: after.commands.saturating_sub(before.commands) as f64 / elapsed,
                cores: (after.cpu_seconds - before.cpu_seconds) / elapsed,
            }),
    })
}

/// Sends what `next` makes on schedule; returns requests sent, their tally and counts by kind.
pub async fn offer(
    client: &HttpClient,
    gateway: &str,
    token: &Arc<str>,
    next: &mut dyn FnMut() -> Scan,
    rate: f64,
    duration: Duration,
    histogram: Option<Arc<Mutex<Histogram<u64>>>>,
) -> (u64, Tally, BTreeMap<String, u64>) {
    offer_many(client, &[gateway], token, next, rate, duration, histogram).await
}

/// [`offer`] spread round-robin over several gateway instances, as a load balancer that
/// cannot see the barcode (it is in the body) would: a re-scan lands anywhere.
pub async fn offer_many(
    client: &HttpClient,
    gateways: &[&str],
    token: &Arc<str>,
    next: &mut dyn FnMut() -> Scan,
    rate: f64,
    duration: Duration,
    histogram: Option<Arc<Mutex<Histogram<u64>>>>,
) -> (u64, Tally, BTreeMap<String, u64>) {
    let total = (rate * duration.as_secs_f64()).round() as u64;
    let interval = 1.0 / rate;
    let tally = Arc::new(Mutex::new(Tally::default()));
    let mut kinds = BTreeMap::new();
    let mut tasks = tokio::task::JoinSet::new();
    let start = tokio::time::Instant::now();
    for i in 0..total {
        let due = start + Duration::from_secs_f64(i as f64 * interval);
        tokio::time::sleep_until(due).await;
        let scan = next();
        *kinds.entry(scan.kind.to_owned()).or_insert(0) += 1;
        let request = Request::builder()
            .method(Method::POST)
            .uri(format!(
                "{}{}",
                gateways[usize::try_from(i).unwrap_or(0) % gateways.len().max(1)],
                scan.path
            ))
            .header("authorization", &**token)
            .header("content-type", "application/json")
            .body(Full::new(scan.body.clone()));
        let Ok(request) = request else { continue };
        let client = client.clone();
        let tally = Arc::clone(&tally);
        let histogram = histogram.clone();
        tasks.spawn(async move {
            let result = fetch(&client, request).await;
            let latency = due.elapsed();
            let mut tally = match tally.lock() {
                Ok(tally) => tally,
                Err(poisoned) => poisoned.into_inner(),
            };
            match result {
                Ok((status, _)) if status == scan.expected => tally.ok += 1,
                Ok((status, _)) => {
                    *tally
                        .errors
                        .entry(format!("status_{}", status.as_u16()))
                        .or_insert(0) += 1;
                }
                Err(kind) => *tally.errors.entry(kind).or_insert(0) += 1,
            }
            if let Some(histogram) = histogram
                && let Ok(mut histogram) = histogram.lock()
            {
                let micros = u64::try_from(latency.as_micros())
                    .unwrap_or(u64::MAX)
                    .max(1);
                let _ = histogram.record(micros.min(120_000_000));
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let tally = match Arc::try_unwrap(tally) {
        Ok(mutex) => mutex
            .into_inner()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
        Err(shared) => std::mem::take(
            &mut *shared
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        ),
    };
    (total, tally, kinds)
}
