//! `loadtest relay`: the callback relay's ingest and delivery, closed or open loop.
//!
//! One real package (CMS `EnvelopedData` for the recipient certificate, built by the
//! simulator's [`Package`] builder) is built up front at the requested size; every callback
//! posts the same body and differs only in its `X-Document-Request-Trace-Id` (the
//! requestId), so each is a new record for the relay (it never decrypts, so the requestId
//! sealed inside the package does not matter to it). Closed loop (the default),
//! `concurrency` workers each post their next callback as soon as the previous one is
//! answered; ack latency is request sent → answer read. Open loop (`--rate R`), callback
//! `i` is due at `i / R` seconds from the start whatever the answers do (`concurrency`
//! then only caps how many are in flight), and its latency runs from when it was due, so
//! a stalled relay's queueing shows in the percentiles instead of slowing the offer
//! (no coordinated omission). Latencies go into an HDR histogram.
//!
//! With `--deliver`, a push-target sink is hosted on loopback (the gateway's
//! `[[callback_relay.target]]` must point at it), and every requestId is first routed the
//! way a branch would: a fresh barcode from the simulator's `POST /sim/barcodes`, then a
//! `document-request` with that requestId through the gateway under one session token.
//! Delivery throughput is deliveries received by the sink over the time from the first
//! callback posted to the last delivery received (ingest and delivery overlap, as in
//! production).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use diia_sim::callback::{Flow, Package, TRACE_HEADER};
use diia_sim::{AcquirerCertificate, DEMO_ACQUIRER_TOKEN, DEMO_AUTH_TOKEN};
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::Serialize;
use tokio::net::TcpListener;

use crate::drive::{HttpClient, Percentiles, histogram};

/// One callback (or route, or sink read) waits at most this long.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// The built package's payload may differ from the requested size by this many bytes
/// (base64 rounding and the cipher's padding).
pub const SIZE_TOLERANCE: usize = 64;

/// What one `loadtest relay` run does.
pub struct Settings {
    /// The relay's ingress URL, `http://host:port{path_prefix}/{token}` (loopback).
    pub url: String,
    /// PEM of the certificate packages are addressed to (the acquirer's
    /// `recipient_cert_file`).
    pub cert: PathBuf,
    /// Callbacks to post.
    pub callbacks: u64,
    /// Callbacks in flight (closed loop), or their cap (open loop).
    pub concurrency: usize,
    /// Callbacks per second offered (open loop), or none (closed loop).
    pub rate: Option<f64>,
    /// Bytes of base64 in the file part plus `encodeData`.
    pub size: usize,
    /// Delivery measurement, when asked for.
    pub deliver: Option<Deliver>,
}

/// `--deliver`: where the sink listens and how routes are recorded.
pub struct Deliver {
    /// The sink's listen address (the gateway's target URL points here).
    pub sink: SocketAddr,
    /// The gateway's branch listener base URL (token exchange, `document-request`).
    pub gateway: String,
    /// The simulator's base URL (`POST /sim/barcodes`).
    pub sim: String,
    /// The branch whose target is the sink.
    pub branch: String,
    /// How long to wait for the last delivery once ingest is done.
    pub timeout: Duration,
}

/// What a run measured (also written as JSON).
#[derive(Debug, Serialize)]
pub struct RelayResult {
    /// Callbacks posted.
    pub callbacks: u64,
    /// Concurrency.
    pub concurrency: usize,
    /// Callbacks per second offered, open loop.
    pub rate: Option<f64>,
    /// Requested payload size (base64 of file part + `encodeData`).
    pub size: usize,
    /// The built package's payload bytes.
    pub payload_bytes: usize,
    /// The whole multipart body's bytes.
    pub body_bytes: usize,
    /// Answered 200.
    pub ok: u64,
    /// Other statuses, by code.
    pub non_200: BTreeMap<u16, u64>,
    /// Connection errors and timeouts.
    pub errors: u64,
    /// The first such error's text, if any.
    pub first_error: Option<String>,
    /// First callback sent → last answer read.
    pub elapsed_s: f64,
    /// 200s per second.
    pub callbacks_per_s: f64,
    /// Body MiB per second acknowledged.
    pub mib_per_s: f64,
    /// Ack latency (send, or when due in open loop → answer read), µs, every answer.
    pub ack_us: Percentiles,
    /// Delivery, with `--deliver`.
    pub delivery: Option<DeliveryResult>,
}

/// What the sink saw.
#[derive(Debug, Serialize)]
pub struct DeliveryResult {
    /// Routes recorded through `document-request` before the run.
    pub routed: u64,
    /// Seconds the routes took (not part of the ingest numbers).
    pub routing_s: f64,
    /// Distinct requestIds delivered.
    pub delivered: u64,
    /// Deliveries of a requestId already delivered (at-least-once repeats).
    pub repeats: u64,
    /// Deliveries whose body differed from the package posted.
    pub changed: u64,
    /// First callback sent → last delivery received.
    pub span_s: f64,
    /// Distinct deliveries per second over that span.
    pub per_s: f64,
    /// Last answer of ingest → last delivery received (the queue's drain time).
    pub drain_s: f64,
}

/// Bytes of payload in a multipart body: every part's value except `encryptedFileName`
/// (the file parts and `encodeData`, each base64 of a CMS `EnvelopedData`).
pub fn payload_bytes(package: &Package) -> Result<usize, String> {
    Ok(payload_parts(package)?
        .iter()
        .filter(|(name, _)| name != "encryptedFileName")
        .map(|(_, value)| value.len())
        .sum())
}

/// The parts of a multipart body as (name, value).
pub fn payload_parts(package: &Package) -> Result<Vec<(String, Bytes)>, String> {
    let boundary = package
        .content_type
        .split_once("boundary=")
        .map(|(_, boundary)| format!("--{boundary}"))
        .ok_or("no boundary in the content type")?;
    let text =
        std::str::from_utf8(&package.body).map_err(|_| "the body is not UTF-8".to_owned())?;
    let mut parts = Vec::new();
    for chunk in text.split(boundary.as_str()).skip(1) {
        if chunk.starts_with("--") {
            break;
        }
        let (head, value) = chunk
            .split_once("\r\n\r\n")
            .ok_or("a part without a blank line")?;
        let name = head
            .split_once("name=\"")
            .and_then(|(_, rest)| rest.split_once('"'))
            .map(|(name, _)| name.to_owned())
            .ok_or("a part without a name")?;
        let value = value
            .strip_suffix("\r\n")
            .ok_or("a part not ended by CRLF")?;
        parts.push((name, Bytes::copy_from_slice(value.as_bytes())));
    }
    Ok(parts)
}

/// Builds one barcode-flow package whose payload is `size` bytes (± [`SIZE_TOLERANCE`]),
/// addressed to the certificate in `cert_pem`: the document size is corrected twice from
/// the measured payload (the CMS and base64 overhead is nearly constant).
pub fn build_package(cert_pem: &str, size: usize) -> Result<Package, String> {
    let certificate = AcquirerCertificate::from_pem(cert_pem)?;
    let flow = Flow::Barcode(Some("0000000000000".to_owned()));
    let request_id = "loadtest-relay";
    let mut document = size / 4 * 3;
    let mut package = Package::build_sized(&certificate, &flow, request_id, document)?;
    for _ in 0..3 {
        let measured = payload_bytes(&package)?;
        if measured.abs_diff(size) <= SIZE_TOLERANCE {
            return Ok(package);
        }
        document = if measured > size {
            document.saturating_sub((measured - size) / 4 * 3)
        } else {
            document + (size - measured) / 4 * 3
        };
        package = Package::build_sized(&certificate, &flow, request_id, document)?;
    }
    let measured = payload_bytes(&package)?;
    if measured.abs_diff(size) <= SIZE_TOLERANCE {
        Ok(package)
    } else {
        Err(format!(
            "--size {size}: the smallest package has {measured} bytes of payload"
        ))
    }
}

/// The requestIds of one run: a per-run nonce, so reruns against one store are new records.
pub fn request_ids(count: u64) -> Vec<HeaderValue> {
    let nonce = fastrand::u32(..);
    (0..count)
        .map(|i| HeaderValue::from_str(&format!("bench-{nonce:08x}-{i:07}")))
        .collect::<Result<_, _>>()
        .unwrap_or_default()
}

/// Runs one measurement.
pub async fn run(settings: &Settings) -> Result<RelayResult, String> {
    let pem = std::fs::read_to_string(&settings.cert)
        .map_err(|e| format!("{}: {e}", settings.cert.display()))?;
    let size = settings.size;
    let package = tokio::task::spawn_blocking(move || build_package(&pem, size))
        .await
        .map_err(|e| format!("package task: {e}"))??;
    let payload = payload_bytes(&package)?;
    let ids = Arc::new(request_ids(settings.callbacks));
    if ids.len() as u64 != settings.callbacks {
        return Err("requestIds could not be made".to_owned());
    }
    let client: HttpClient =
        hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http();

    let mut routing = None;
    let sink = match &settings.deliver {
        Some(deliver) => {
            let sink = Sink::start(deliver.sink, package.body.clone()).await?;
            let started = Instant::now();
            eprintln!(
                "routing {} requestIds through {} (branch {})",
                ids.len(),
                deliver.gateway,
                deliver.branch
            );
            route_all(&client, deliver, &ids, settings.concurrency).await?;
            routing = Some(started.elapsed().as_secs_f64());
            Some(sink)
        }
        None => None,
    };

    eprintln!(
        "posting {} callbacks of {} bytes ({payload} of payload) at concurrency {}",
        ids.len(),
        package.body.len(),
        settings.concurrency
    );
    let ingest = ingest(&client, settings, &package, &ids).await?;

    let delivery = match (sink, &settings.deliver, routing) {
        (Some(sink), Some(deliver), Some(routing_s)) => {
            let deadline = Instant::now() + deliver.timeout;
            while sink.state.delivered.load(Ordering::Relaxed) < ingest.ok
                && Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Some(sink.result(ids.len() as u64, routing_s, &ingest))
        }
        _ => None,
    };

    let elapsed_s = ingest.elapsed.as_secs_f64();
    Ok(RelayResult {
        callbacks: settings.callbacks,
        concurrency: settings.concurrency,
        rate: settings.rate,
        size: settings.size,
        payload_bytes: payload,
        body_bytes: package.body.len(),
        ok: ingest.ok,
        non_200: ingest.non_200,
        errors: ingest.errors,
        first_error: ingest.first_error,
        elapsed_s,
        callbacks_per_s: ingest.ok as f64 / elapsed_s,
        mib_per_s: (ingest.ok as f64 * package.body.len() as f64) / elapsed_s / 1_048_576.0,
        ack_us: Percentiles::of(&ingest.histogram)?,
        delivery,
    })
}

/// What the closed loop counted.
struct Ingest {
    started: Instant,
    elapsed: Duration,
    ok: u64,
    non_200: BTreeMap<u16, u64>,
    errors: u64,
    first_error: Option<String>,
    histogram: Arc<Mutex<hdrhistogram::Histogram<u64>>>,
}

async fn ingest(
    client: &HttpClient,
    settings: &Settings,
    package: &Package,
    ids: &Arc<Vec<HeaderValue>>,
) -> Result<Ingest, String> {
    let uri: http::Uri = settings
        .url
        .parse()
        .map_err(|e| format!("--url {}: {e}", settings.url))?;
    let content_type = HeaderValue::from_str(&package.content_type)
        .map_err(|_| "the content type is not a header value".to_owned())?;
    let next = Arc::new(AtomicU64::new(0));
    let histogram = histogram()?;
    let started = Instant::now();
    let rate = settings.rate;
    let mut workers = Vec::with_capacity(settings.concurrency);
    for _ in 0..settings.concurrency.max(1) {
        let (client, uri, content_type, body) = (
            client.clone(),
            uri.clone(),
            content_type.clone(),
            package.body.clone(),
        );
        let (ids, next, histogram) = (Arc::clone(ids), Arc::clone(&next), Arc::clone(&histogram));
        workers.push(tokio::spawn(async move {
            let mut mine = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 120_000_000, 3)
                .map_err(|e| e.to_string())?;
            let (mut ok, mut errors, mut non_200) = (0_u64, 0_u64, BTreeMap::<u16, u64>::new());
            let mut first_error = None;
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                let Some(id) = usize::try_from(index).ok().and_then(|i| ids.get(i)) else {
                    break;
                };
                let request = Request::post(uri.clone())
                    .header(header::CONTENT_TYPE, content_type.clone())
                    .header(TRACE_HEADER, id.clone())
                    .body(Full::new(body.clone()))
                    .map_err(|e| e.to_string())?;
                let sent = match rate {
                    Some(rate) => {
                        let due = started + Duration::from_secs_f64(index as f64 / rate);
                        tokio::time::sleep_until(due.into()).await;
                        due
                    }
                    None => Instant::now(),
                };
                let answer = tokio::time::timeout(REQUEST_TIMEOUT, async {
                    let response = client.request(request).await.map_err(|e| chain(&e))?;
                    let status = response.status();
                    response
                        .into_body()
                        .collect()
                        .await
                        .map_err(|e| e.to_string())?;
                    Ok::<_, String>(status)
                })
                .await;
                let micros = u64::try_from(sent.elapsed().as_micros()).unwrap_or(u64::MAX);
                mine.saturating_record(micros.max(1));
                match answer {
                    Ok(Ok(StatusCode::OK)) => ok += 1,
                    Ok(Ok(status)) => *non_200.entry(status.as_u16()).or_default() += 1,
                    Ok(Err(error)) => {
                        errors += 1;
                        first_error.get_or_insert(error);
                    }
                    Err(_) => {
                        errors += 1;
                        first_error.get_or_insert_with(|| "timed out".to_owned());
                    }
                }
            }
            histogram
                .lock()
                .map_err(|_| "histogram lock poisoned".to_owned())?
                .add(&mine)
                .map_err(|e| e.to_string())?;
            Ok::<_, String>((ok, errors, non_200, first_error))
        }));
    }
    let (mut ok, mut errors, mut non_200, mut first_error) = (0, 0, BTreeMap::new(), None);
    for worker in workers {
        let (o, e, n, first) = worker.await.map_err(|e| format!("worker: {e}"))??;
        ok += o;
        errors += e;
        first_error = first_error.or(first);
        for (status, count) in n {
            *non_200.entry(status).or_default() += count;
        }
    }
    Ok(Ingest {
        started,
        elapsed: started.elapsed(),
        ok,
        non_200,
        errors,
        first_error,
        histogram,
    })
}

/// An error with its sources ("client error (SendRequest): connection closed …").
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// One buffered answer.
async fn send(
    client: &HttpClient,
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: String,
) -> Result<(StatusCode, Bytes), String> {
    let mut request = Request::builder().method(method).uri(url);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| format!("{url}: {e}"))?;
    tokio::time::timeout(REQUEST_TIMEOUT, async {
        let response = client
            .request(request)
            .await
            .map_err(|e| format!("{url}: {e}"))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("{url}: {e}"))?
            .to_bytes();
        Ok((status, body))
    })
    .await
    .map_err(|_| format!("{url}: timed out"))?
}

fn json_field(body: &[u8], field: &str) -> Option<String> {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()?
        .get(field)?
        .as_str()
        .map(str::to_owned)
}

/// Records a route for every requestId: a session token once, then per requestId a fresh
/// barcode and a `document-request`, `concurrency` at a time. Any failure stops the run.
async fn route_all(
    client: &HttpClient,
    deliver: &Deliver,
    ids: &Arc<Vec<HeaderValue>>,
    concurrency: usize,
) -> Result<(), String> {
    let basic = format!("Basic {DEMO_AUTH_TOKEN}");
    let url = format!(
        "{}/api/v1/auth/acquirer/{DEMO_ACQUIRER_TOKEN}",
        deliver.gateway
    );
    let (status, body) = send(
        client,
        Method::GET,
        &url,
        &[("authorization", &basic)],
        String::new(),
    )
    .await?;
    let token = json_field(&body, "token")
        .filter(|_| status == StatusCode::OK)
        .ok_or_else(|| format!("token exchange answered {status}"))?;
    let bearer = Arc::new(format!("Bearer {token}"));
    let next = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for _ in 0..concurrency.max(1) {
        let (client, ids, next, bearer) = (
            client.clone(),
            Arc::clone(ids),
            Arc::clone(&next),
            Arc::clone(&bearer),
        );
        let barcodes = format!("{}/sim/barcodes", deliver.sim);
        let share = format!("{}/api/v1/acquirers/document-request", deliver.gateway);
        let branch = deliver.branch.clone();
        workers.push(tokio::spawn(async move {
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                let Some(id) = usize::try_from(index).ok().and_then(|i| ids.get(i)) else {
                    return Ok::<_, String>(());
                };
                let id = id.to_str().map_err(|e| e.to_string())?;
                let (status, body) =
                    send(&client, Method::POST, &barcodes, &[], String::new()).await?;
                let barcode = json_field(&body, "barcode")
                    .filter(|_| status == StatusCode::CREATED)
                    .ok_or_else(|| format!("POST /sim/barcodes answered {status}"))?;
                let request = serde_json::json!({
                    "branchId": branch, "barcode": barcode, "requestId": id,
                })
                .to_string();
                let (status, body) = send(
                    &client,
                    Method::POST,
                    &share,
                    &[
                        ("authorization", bearer.as_str()),
                        ("content-type", "application/json"),
                    ],
                    request,
                )
                .await?;
                if status != StatusCode::OK {
                    return Err(format!(
                        "document-request answered {status}: {}",
                        String::from_utf8_lossy(&body)
                    ));
                }
            }
        }));
    }
    for worker in workers {
        worker.await.map_err(|e| format!("route worker: {e}"))??;
    }
    Ok(())
}

/// The push target's counters.
struct SinkState {
    expected: Bytes,
    seen: Mutex<std::collections::HashSet<Bytes>>,
    delivered: AtomicU64,
    repeats: AtomicU64,
    changed: AtomicU64,
    last: Mutex<Option<Instant>>,
}

/// A push target on loopback: answers every POST `200 {"success":true}` once its body is
/// read, and counts deliveries per requestId.
struct Sink {
    state: Arc<SinkState>,
}

impl Sink {
    async fn start(addr: SocketAddr, expected: Bytes) -> Result<Self, String> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| format!("sink {addr}: {e}"))?;
        let state = Arc::new(SinkState {
            expected,
            seen: Mutex::new(std::collections::HashSet::new()),
            delivered: AtomicU64::new(0),
            repeats: AtomicU64::new(0),
            changed: AtomicU64::new(0),
            last: Mutex::new(None),
        });
        let shared = Arc::clone(&state);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let state = Arc::clone(&shared);
                tokio::spawn(async move {
                    let service = service_fn(move |request: Request<Incoming>| {
                        let state = Arc::clone(&state);
                        async move { Ok::<_, std::convert::Infallible>(state.take(request).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(Self { state })
    }

    fn result(&self, routed: u64, routing_s: f64, ingest: &Ingest) -> DeliveryResult {
        let delivered = self.state.delivered.load(Ordering::Relaxed);
        let last = self.state.last.lock().ok().and_then(|last| *last);
        let span_s = last.map_or(0.0, |last| {
            last.saturating_duration_since(ingest.started).as_secs_f64()
        });
        let drain_s = last.map_or(0.0, |last| {
            last.saturating_duration_since(ingest.started + ingest.elapsed)
                .as_secs_f64()
        });
        DeliveryResult {
            routed,
            routing_s,
            delivered,
            repeats: self.state.repeats.load(Ordering::Relaxed),
            changed: self.state.changed.load(Ordering::Relaxed),
            span_s,
            per_s: if span_s > 0.0 {
                delivered as f64 / span_s
            } else {
                0.0
            },
            drain_s,
        }
    }
}

impl SinkState {
    async fn take(&self, request: Request<Incoming>) -> Response<Full<Bytes>> {
        let id = request
            .headers()
            .get(TRACE_HEADER)
            .map(|id| Bytes::copy_from_slice(id.as_bytes()));
        let body = request.into_body().collect().await.map(|b| b.to_bytes());
        let (Some(id), Ok(body)) = (id, body) else {
            return answer(StatusCode::BAD_REQUEST, r#"{"success":false}"#);
        };
        if body != self.expected {
            self.changed.fetch_add(1, Ordering::Relaxed);
        }
        let fresh = self.seen.lock().is_ok_and(|mut seen| seen.insert(id));
        if fresh {
            self.delivered.fetch_add(1, Ordering::Relaxed);
        } else {
            self.repeats.fetch_add(1, Ordering::Relaxed);
        }
        if let Ok(mut last) = self.last.lock() {
            *last = Some(Instant::now());
        }
        answer(StatusCode::OK, r#"{"success":true}"#)
    }
}

fn answer(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// The run as a few lines of text.
pub fn summary(result: &RelayResult) -> String {
    let ms = |us: u64| us as f64 / 1000.0;
    let mut text = format!(
        "callbacks {} × {} B body ({} B payload), {}\n\
         200: {}  non-200: {:?}  errors: {}{}\n\
         ingest: {:.1} callbacks/s ({:.1} MiB/s) in {:.2} s\n\
         ack ms: p50 {:.2}  p90 {:.2}  p99 {:.2}  max {:.2}\n",
        result.callbacks,
        result.body_bytes,
        result.payload_bytes,
        match result.rate {
            Some(rate) => format!(
                "open loop at {rate:.0}/s (at most {} in flight)",
                result.concurrency
            ),
            None => format!("closed loop at concurrency {}", result.concurrency),
        },
        result.ok,
        result.non_200,
        result.errors,
        result
            .first_error
            .as_ref()
            .map_or_else(String::new, |error| format!(" (first: {error})")),
        result.callbacks_per_s,
        result.mib_per_s,
        result.elapsed_s,
        ms(result.ack_us.p50),
        ms(result.ack_us.p90),
        ms(result.ack_us.p99),
        ms(result.ack_us.max),
    );
    if let Some(delivery) = &result.delivery {
        text.push_str(&format!(
            "delivery: {} of {} routed delivered ({} repeats, {} changed) in {:.2} s from the first callback: {:.1}/s; drained {:.2} s after ingest (routing took {:.2} s, not counted)\n",
            delivery.delivered,
            delivery.routed,
            delivery.repeats,
            delivery.changed,
            delivery.span_s,
            delivery.per_s,
            delivery.drain_s,
            delivery.routing_s,
        ));
    }
    text
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn demo_cert() -> String {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../sim/demo/acquirer-cert.pem");
        std::fs::read_to_string(path).unwrap()
    }

    #[test]
    fn a_package_has_the_requested_payload_in_cms_parts() {
        for size in [16 * 1024, 200 * 1024, 1024 * 1024] {
            let package = build_package(&demo_cert(), size).unwrap();
            let payload = payload_bytes(&package).unwrap();
            assert!(
                payload.abs_diff(size) <= SIZE_TOLERANCE,
                "asked {size}, built {payload}"
            );
            let parts = payload_parts(&package).unwrap();
            let names: Vec<_> = parts.iter().map(|(name, _)| name.as_str()).collect();
            assert_eq!(
                names,
                ["encryptedFile", "encryptedFileName", "encodeData"],
                "the barcode flow's parts"
            );
            for (name, value) in &parts {
                if name == "encryptedFileName" {
                    continue;
                }
                // base64 of DER: a SEQUENCE with a long-form length ("MII…" / "MIA…").
                assert!(value.len() % 4 == 0, "{name} is not padded base64");
                assert!(value.starts_with(b"MI"), "{name} is not base64 of DER");
                assert!(
                    value
                        .iter()
                        .all(|b| b.is_ascii_alphanumeric() || b"+/=".contains(b)),
                    "{name} is not base64"
                );
            }
        }
    }

    #[test]
    fn a_size_below_the_smallest_package_is_refused() {
        assert!(build_package(&demo_cert(), 100).is_err());
    }

    #[test]
    fn request_ids_are_distinct_header_values() {
        let ids = request_ids(1000);
        assert_eq!(ids.len(), 1000);
        let distinct: std::collections::HashSet<_> = ids.iter().collect();
        assert_eq!(distinct.len(), 1000);
        assert!(ids[0].to_str().unwrap().starts_with("bench-"));
    }
}
