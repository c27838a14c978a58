//! Diia's side of document sharing after the consent push: the customer consents (after
//! `consent_delay`) or refuses, then Diia POSTs the encrypted package to the acquirer's
//! callback URL and retries until the answer is `{"success":true}`.
//!
//! Package shapes (see `shared/diia-api.md` §6), `multipart/form-data`:
//! - barcode sharing: file `encryptedFile` (`application/octet-stream`), text
//!   `encryptedFileName`, text `encodeData`;
//! - deep-link sharing: one file part per document type (`internal-passport`), `encodeData`.
//!
//! Every file and `encodeData` is base64 of a DER CMS `ContentInfo(EnvelopedData)` addressed
//! to the acquirer's certificate; header `X-Document-Request-Trace-Id` carries the requestId.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use http::{HeaderValue, Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full, Limited};
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;
use tokio::sync::{OnceCell, watch};

use crate::acquirer::AcquirerCertificate;

/// The header naming the partner's requestId.
pub const TRACE_HEADER: &str = "x-document-request-trace-id";
/// Size of the fake PDF inside `encryptedFile`: its base64 makes a ~200 KB package.
const FAKE_PDF_BYTES: usize = 150_000;
/// First retry delay; doubles per attempt up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
/// Longest wait between two attempts (also the cap on a partner's `Retry-After`).
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// One attempt: connect, send, read the answer.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(15);

/// The simulated customer's answer to a consent push.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Consent {
    /// Shares the documents: Diia sends the package.
    #[default]
    Accept,
    /// Declines: no package is sent.
    Refuse,
}

/// Which sharing flow a package answers.
#[derive(Debug, Clone)]
pub enum Flow {
    /// `document-request` by barcode (`Some`) or by QR code (`None`).
    Barcode(Option<String>),
    /// `offer-request/dynamic`: the customer opened the deep link.
    DeepLink,
}

/// Callback counters, served in `GET /sim/stats`.
#[derive(Debug, Default)]
pub struct CallbackCounters {
    /// Packages whose first POST was attempted.
    pub sent: AtomicU64,
    /// Packages answered `{"success":true}`.
    pub acknowledged: AtomicU64,
    /// Attempts answered otherwise (status, body, connection error, timeout).
    pub failed_attempts: AtomicU64,
    /// Consent pushes the customer refused (no package).
    pub refused: AtomicU64,
    /// Packages given up after the retry window (or that could not be built).
    pub given_up: AtomicU64,
}

impl CallbackCounters {
    /// The counters as JSON members (no braces).
    pub fn json_members(&self) -> String {
        let n = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        format!(
            r#""callbacks_sent":{},"callbacks_acknowledged":{},"callbacks_failed_attempts":{},"callbacks_refused":{},"callbacks_given_up":{}"#,
            n(&self.sent),
            n(&self.acknowledged),
            n(&self.failed_attempts),
            n(&self.refused),
            n(&self.given_up)
        )
    }

    /// Zeroes the counters.
    pub fn reset(&self) {
        for counter in [
            &self.sent,
            &self.acknowledged,
            &self.failed_attempts,
            &self.refused,
            &self.given_up,
        ] {
            counter.store(0, Ordering::Relaxed);
        }
    }
}

/// A checked `callback_url`: plain `http://` only (the simulator speaks no TLS as a client).
#[derive(Debug, Clone)]
pub struct CallbackTarget {
    authority: String,
    uri: Uri,
}

impl CallbackTarget {
    /// Parses `http://host[:port]/path`.
    pub fn parse(url: &str) -> Result<Self, String> {
        let uri: Uri = url
            .parse()
            .map_err(|e| format!("callback_url {url:?}: {e}"))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some(other) => {
                return Err(format!(
                    "callback_url: scheme {other:?} is not supported (the simulator posts plain http)"
                ));
            }
            None => return Err("callback_url: an absolute http:// URL is needed".to_owned()),
        }
        let authority = uri
            .authority()
            .ok_or_else(|| "callback_url: a host is needed".to_owned())?;
        let port = authority.port_u16().unwrap_or(80);
        Ok(Self {
            authority: format!("{}:{port}", authority.host()),
            uri,
        })
    }
}

/// Consent, packaging and delivery of callbacks.
pub struct Callbacks {
    target: Option<CallbackTarget>,
    consent_delay: Duration,
    refuse: AtomicBool,
    retry_for: Duration,
    certificate_file: Option<String>,
    certificate: OnceCell<Arc<AcquirerCertificate>>,
    counters: Arc<CallbackCounters>,
    stopped: watch::Receiver<bool>,
}

impl Callbacks {
    /// From the simulator config; packages stop (pending retries too) once `stopped` turns
    /// true.
    pub fn new(
        config: &crate::SimConfig,
        counters: Arc<CallbackCounters>,
        stopped: watch::Receiver<bool>,
    ) -> Result<Self, String> {
        let target = match config.callback_url.as_deref() {
            Some(url) => Some(CallbackTarget::parse(url)?),
            None => None,
        };
        Ok(Self {
            target,
            consent_delay: config.consent_delay,
            refuse: AtomicBool::new(config.consent == Consent::Refuse),
            retry_for: config.callback_retry_for,
            certificate_file: config
                .acquirer_cert_file
                .as_ref()
                .map(|path| path.display().to_string()),
            certificate: OnceCell::new(),
            counters,
            stopped,
        })
    }

    /// Whether packages are sent at all.
    pub fn enabled(&self) -> bool {
        self.target.is_some()
    }

    /// The customer's current answer.
    pub fn consent(&self) -> Consent {
        if self.refuse.load(Ordering::Relaxed) {
            Consent::Refuse
        } else {
            Consent::Accept
        }
    }

    /// Changes the customer's answer for pushes from now on.
    pub fn set_consent(&self, consent: Consent) {
        self.refuse
            .store(consent == Consent::Refuse, Ordering::Relaxed);
    }

    /// The acquirer certificate: loaded from `acquirer_cert_file`, or generated once.
    pub async fn certificate(&self) -> Result<Arc<AcquirerCertificate>, String> {
        self.certificate
            .get_or_try_init(|| async {
                let file = self.certificate_file.clone();
                let made = tokio::task::spawn_blocking(move || match file {
                    Some(path) => std::fs::read_to_string(&path)
                        .map_err(|e| format!("acquirer_cert_file {path}: {e}"))
                        .and_then(|pem| AcquirerCertificate::from_pem(&pem)),
                    None => AcquirerCertificate::generate(),
                })
                .await
                .map_err(|e| format!("certificate task: {e}"))??;
                Ok(Arc::new(made))
            })
            .await
            .cloned()
    }

    /// A consent push reached the customer: answer it in the background.
    pub fn pushed(self: &Arc<Self>, flow: Flow, request_id: &str) {
        if !self.enabled() {
            return;
        }
        let callbacks = Arc::clone(self);
        let request_id = request_id.to_owned();
        let mut stopped = self.stopped.clone();
        tokio::spawn(async move {
            let answer = async {
                tokio::time::sleep(callbacks.consent_delay).await;
                if callbacks.consent() == Consent::Refuse {
                    callbacks.counters.refused.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                if let Err(error) = callbacks.send(flow, request_id).await {
                    callbacks.counters.given_up.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%error, "diia-sim: callback given up");
                }
            };
            tokio::select! {
                () = answer => {}
                _ = stopped.wait_for(|stopped| *stopped) => {}
            }
        });
    }

    async fn send(&self, flow: Flow, request_id: String) -> Result<(), String> {
        let target = self.target.clone().ok_or("no callback_url")?;
        let trace = HeaderValue::from_str(&request_id)
            .map_err(|_| "the requestId cannot be a header value".to_owned())?;
        let certificate = self.certificate().await?;
        let package =
            tokio::task::spawn_blocking(move || Package::build(&certificate, &flow, &request_id))
                .await
                .map_err(|e| format!("package task: {e}"))??;
        self.counters.sent.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let mut backoff = FIRST_BACKOFF;
        for attempt in 1_u32.. {
            let wait = match post(&target, &trace, &package).await {
                Ok(()) => {
                    self.counters.acknowledged.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
                Err(failure) => {
                    self.counters
                        .failed_attempts
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::info!(attempt, reason = %failure.reason, "diia-sim: callback not acknowledged");
                    failure.retry_after.unwrap_or_else(|| jittered(backoff))
                }
            };
            if started.elapsed() + wait > self.retry_for {
                return Err(format!("not acknowledged after {attempt} attempts"));
            }
            tokio::time::sleep(wait).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
        Err("attempts exhausted".to_owned())
    }
}

/// `delay` ± 20 %.
fn jittered(delay: Duration) -> Duration {
    delay.mul_f64(0.8 + 0.4 * fastrand::f64())
}

/// One built package: the multipart body and its content type.
pub struct Package {
    /// `multipart/form-data; boundary=…`
    pub content_type: String,
    /// The whole body.
    pub body: Bytes,
}

impl Package {
    /// Encrypts the fake document and metadata to `certificate` and lays out the parts.
    pub fn build(
        certificate: &AcquirerCertificate,
        flow: &Flow,
        request_id: &str,
    ) -> Result<Self, String> {
        Self::build_sized(certificate, flow, request_id, FAKE_PDF_BYTES)
    }

    /// As [`Package::build`], with a fake document of `document_bytes` (before encryption
    /// and base64), so load tools can post packages of a chosen size. Below the fake PDF's
    /// fixed header and trailer (about 90 bytes) the document is just those.
    pub fn build_sized(
        certificate: &AcquirerCertificate,
        flow: &Flow,
        request_id: &str,
        document_bytes: usize,
    ) -> Result<Self, String> {
        let document_type = "internal-passport";
        let stamp = diia_timestamp(SystemTime::now());
        let barcode = match flow {
            Flow::Barcode(Some(barcode)) => barcode.as_str(),
            Flow::Barcode(None) | Flow::DeepLink => "0000000000000",
        };
        let file_name = format!("{document_type}-{barcode}-{stamp}.pdf.p7s.p7e");
        let document =
            STANDARD.encode(certificate.envelope(&fake_pdf(request_id, document_bytes))?);
        let metadata =
            STANDARD.encode(certificate.envelope(metadata(flow, request_id).as_bytes())?);
        let boundary = format!(
            "diia-sim-{:016x}{:016x}",
            fastrand::u64(..),
            fastrand::u64(..)
        );
        let mut body = String::with_capacity(document.len() + metadata.len() + 1024);
        let mut part = |disposition: String, content_type: Option<&str>, value: &str| {
            body.push_str(&format!(
                "--{boundary}\r\nContent-Disposition: form-data; {disposition}\r\n"
            ));
            if let Some(content_type) = content_type {
                body.push_str(&format!("Content-Type: {content_type}\r\n"));
            }
            body.push_str("\r\n");
            body.push_str(value);
            body.push_str("\r\n");
        };
        let octets = Some("application/octet-stream");
        match flow {
            Flow::Barcode(_) => {
                let file = format!(r#"name="encryptedFile"; filename="{file_name}""#);
                part(file, octets, &document);
                part(r#"name="encryptedFileName""#.to_owned(), None, &file_name);
            }
            Flow::DeepLink => {
                let file = format!(r#"name="{document_type}"; filename="{file_name}""#);
                part(file, octets, &document);
            }
        }
        part(r#"name="encodeData""#.to_owned(), None, &metadata);
        body.push_str(&format!("--{boundary}--\r\n"));
        Ok(Self {
            content_type: format!("multipart/form-data; boundary={boundary}"),
            body: Bytes::from(body),
        })
    }
}

/// The metadata JSON Diia encrypts into `encodeData` (fields as in the SDKs' test data).
fn metadata(flow: &Flow, request_id: &str) -> String {
    let passport = serde_json::json!({
        "taxpayerNumber": "1234567890", "residenceUA": "м. Київ", "docNumber": "000000001",
        "genderUA": "Ч", "nationalityUA": "Україна", "lastNameUA": "Тестовий",
        "firstNameUA": "Тест", "middleNameUA": "Тестович", "birthday": "01.01.1990",
        "birthPlaceUA": "м. Київ", "issueDate": "01.01.2020", "expirationDate": "01.01.2030",
        "recordNumber": "19900101-00001", "department": "0000", "genderEN": "M",
        "lastNameEN": "Testovyi", "firstNameEN": "Test",
    });
    let value = match flow {
        Flow::Barcode(barcode) => serde_json::json!({
            "requestId": request_id, "barcode": barcode,
            "documentTypes": ["internal-passport"], "data": {"internal-passport": passport},
        }),
        Flow::DeepLink => serde_json::json!({
            "requestId": request_id,
            "documentTypes": ["internal-passport"], "data": {"internal-passport": [passport]},
        }),
    };
    value.to_string()
}

/// A deterministic fake PDF of `size` bytes, or just its header and trailer when `size` is
/// smaller (same requestId and size, same bytes).
fn fake_pdf(request_id: &str, size: usize) -> Vec<u8> {
    let mut pdf = Vec::with_capacity(size);
    pdf.extend_from_slice(
        b"%PDF-1.4\n% diia-sim fake document\n1 0 obj\n<< /Length 0 >>\nstream\n",
    );
    let mut seed = request_id.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let tail = b"\nendstream\nendobj\n%%EOF\n";
    while pdf.len() + tail.len() < size {
        seed = seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        pdf.push(b'!' + (seed >> 58) as u8);
    }
    pdf.extend_from_slice(tail);
    pdf
}

/// `dd.MM.yyyy-HH_mm_ss` (UTC), as in Diia's file names.
fn diia_timestamp(now: SystemTime) -> String {
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    format!(
        "{day:02}.{month:02}.{year}-{:02}_{:02}_{:02}",
        rest / 3600,
        rest / 60 % 60,
        rest % 60
    )
}

/// Why one attempt failed, and how long the partner asked us to wait.
struct Failure {
    reason: String,
    retry_after: Option<Duration>,
}

impl Failure {
    fn new(reason: impl Into<String>) -> Self {
        Self {
            reason: reason.into(),
            retry_after: None,
        }
    }
}

/// One POST of the package; `Ok` only for a 2xx answer whose JSON has `"success": true`.
async fn post(
    target: &CallbackTarget,
    trace: &HeaderValue,
    package: &Package,
) -> Result<(), Failure> {
    let attempt = async {
        let stream = TcpStream::connect(&target.authority)
            .await
            .map_err(|e| Failure::new(format!("connect: {e}")))?;
        let _ = stream.set_nodelay(true);
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| Failure::new(format!("handshake: {e}")))?;
        tokio::spawn(connection);
        let mut request = Request::post(target.uri.clone())
            .header(
                header::HOST,
                target.uri.authority().map_or("", |a| a.as_str()),
            )
            .header(header::CONTENT_TYPE, &package.content_type)
            .header(TRACE_HEADER, trace.clone())
            .body(Full::new(package.body.clone()))
            .map_err(|e| Failure::new(format!("request: {e}")))?;
        *request.uri_mut() = target
            .uri
            .path_and_query()
            .map_or_else(|| Uri::from_static("/"), |p| Uri::from(p.clone()));
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| Failure::new(format!("send: {e}")))?;
        let status = response.status();
        let retry_after = retry_after(status, response.headers().get(header::RETRY_AFTER));
        let body = Limited::new(response.into_body(), 64 * 1024)
            .collect()
            .await
            .map_err(|e| Failure::new(format!("answer body: {e}")))?
            .to_bytes();
        let success = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|json| json.get("success").and_then(serde_json::Value::as_bool));
        if status.is_success() && success == Some(true) {
            Ok(())
        } else {
            Err(Failure {
                reason: format!("answered {status}"),
                retry_after,
            })
        }
    };
    tokio::time::timeout(ATTEMPT_TIMEOUT, attempt)
        .await
        .unwrap_or_else(|_| Err(Failure::new("timed out")))
}

/// `Retry-After` seconds on a 429 or 503, capped at [`MAX_BACKOFF`].
fn retry_after(status: StatusCode, value: Option<&HeaderValue>) -> Option<Duration> {
    if status != StatusCode::TOO_MANY_REQUESTS && status != StatusCode::SERVICE_UNAVAILABLE {
        return None;
    }
    let secs: u64 = value?.to_str().ok()?.trim().parse().ok()?;
    Some(Duration::from_secs(secs).clamp(FIRST_BACKOFF, MAX_BACKOFF))
}
