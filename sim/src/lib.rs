//! A Diia simulator: the acquirer surface with Diia's semantics, over a real HTTP socket.
//!
//! Session tokens that expire, barcodes issued with a 3-minute life and single use,
//! Diia-shaped errors, plus fault knobs (latency, error rate, a quota answered with
//! 429 + `Retry-After`) that can be changed at run time, and per-endpoint counters.
//! Tests start it in-process with [`Simulator::start`]; `diia-sim` runs it alone.
//!
//! It shares no code with the gateway (its own route table, EAN-13 check, accept loop):
//! a test double that agrees with the system under test by construction catches nothing.
//! Like Diia, it finishes a call it has started even when the client hangs up, so a
//! consent push happens whether or not anyone reads the answer.
//!
//! Simulator-only routes, under `/sim/`:
//! - `POST /sim/barcodes` `{"documentValid": true}` → `{"barcode": "...", "expiresIn": 180}`
//! - `GET /sim/stats` → `{"requests": {"<endpoint>": n, ...}, "total", "unrouted", "pushes",
//!   "connections", "callbacks_sent", "callbacks_acknowledged", "callbacks_failed_attempts",
//!   "callbacks_refused", "callbacks_given_up"}`
//! - `POST /sim/stats/reset`
//! - `POST /sim/sessions/revoke` → every session token answers 401 from now on
//! - `GET|PUT /sim/faults` → the fault knobs as JSON (see [`Faults`])
//! - `GET /sim/acquirer-certificate` → the acquirer's encryption certificate (PEM)
//! - `GET|PUT /sim/consent` → `{"consent":"accept|refuse"}`, the customer's answer
//! - `POST /sim/branch-inbox` → a stand-in branch backend for pushed document packages
//!   (`{"success":true}`); `GET /sim/branch-inbox` lists what arrived (see [`inbox`])
//!
//! With `callback_url` set, every consent push (barcode or QR `document-request`, and
//! `offer-request/dynamic`) is answered after `consent_delay` by a document package POSTed
//! there, retried until `{"success":true}` (see [`callback`]).

mod acquirer;
mod barcode;
pub mod callback;
pub mod inbox;
pub mod route;
mod serve;
mod state;

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

pub use self::acquirer::AcquirerCertificate;
pub use self::barcode::Code;
use self::callback::{Callbacks, Consent, Flow};
use self::route::{Endpoint, Unmatched};
use self::serve::{SimResponse as HttpResponse, accept_loop};
pub use self::state::{SimError, SimState};

/// Diia's barcode life: 3 minutes.
pub const BARCODE_LIFETIME: Duration = Duration::from_secs(180);
/// Diia's session-token life: 2 hours.
pub const SESSION_TOKEN_LIFETIME: Duration = Duration::from_secs(2 * 60 * 60);

/// An acquirer the simulator knows.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SimAcquirer {
    /// The static acquirer token (path of the token exchange).
    pub token: String,
    /// The auth acquirer token (`base64("acquirer_<id>:<token>")`) required as Basic, if any.
    pub auth_token: Option<String>,
}

/// The demo acquirer's token; the README's curl lines use it.
pub const DEMO_ACQUIRER_TOKEN: &str = "demo_test_token_000001";
/// The demo acquirer's Basic credentials: `base64("acquirer_1:demo_test_token_000001")`.
pub const DEMO_AUTH_TOKEN: &str = "YWNxdWlyZXJfMTpkZW1vX3Rlc3RfdG9rZW5fMDAwMDAx";

/// Simulator settings (the `[simulator]` table of the gateway config, or `diia-sim --config`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SimConfig {
    /// Where the simulator listens; port 0 picks a free one.
    pub listen: SocketAddr,
    /// Known acquirers.
    pub acquirers: Vec<SimAcquirer>,
    /// Session-token life (Diia: 2h).
    #[serde(with = "humantime_serde")]
    pub session_ttl: Duration,
    /// Barcode life (Diia: 3 minutes).
    #[serde(with = "humantime_serde")]
    pub barcode_ttl: Duration,
    /// Treat any well-formed unknown barcode as freshly issued (load tests).
    pub auto_issue: bool,
    /// Fault knobs at start.
    pub faults: Faults,
    /// Where document packages are POSTed after consent (`http://…`); absent: none are.
    pub callback_url: Option<String>,
    /// How long the simulated customer takes to answer a consent push.
    #[serde(with = "humantime_serde")]
    pub consent_delay: Duration,
    /// The customer's answer: `accept` (a package is sent) or `refuse` (none is).
    pub consent: Consent,
    /// How long a package is retried before it is given up.
    #[serde(with = "humantime_serde")]
    pub callback_retry_for: Duration,
    /// The acquirer's encryption certificate (PEM, RSA key); absent: one is generated.
    pub acquirer_cert_file: Option<std::path::PathBuf>,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8090)),
            acquirers: vec![SimAcquirer {
                token: DEMO_ACQUIRER_TOKEN.to_owned(),
                auth_token: Some(DEMO_AUTH_TOKEN.to_owned()),
            }],
            session_ttl: SESSION_TOKEN_LIFETIME,
            barcode_ttl: BARCODE_LIFETIME,
            auto_issue: false,
            faults: Faults::default(),
            callback_url: None,
            consent_delay: Duration::from_secs(2),
            consent: Consent::Accept,
            callback_retry_for: Duration::from_secs(600),
            acquirer_cert_file: None,
        }
    }
}

impl SimConfig {
    /// Checks values serde cannot.
    pub fn validate(&self) -> Result<(), String> {
        if self.acquirers.is_empty() {
            return Err("acquirers: at least one acquirer is needed".to_owned());
        }
        if self.session_ttl.is_zero() || self.barcode_ttl.is_zero() {
            return Err("session_ttl and barcode_ttl must be above 0".to_owned());
        }
        if let Some(url) = &self.callback_url {
            callback::CallbackTarget::parse(url)?;
        }
        self.faults.validate()
    }
}

/// How the latency jitter is drawn.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Distribution {
    /// Uniform in `[0, latency_jitter]`.
    #[default]
    Uniform,
    /// Exponential with mean `latency_jitter` (a long tail, like a real service).
    Exponential,
}

/// Fault knobs, changeable at run time with `PUT /sim/faults`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// Fixed latency added to every answer.
    #[serde(with = "humantime_serde")]
    pub latency: Duration,
    /// Random latency on top of `latency`.
    #[serde(with = "humantime_serde")]
    pub latency_jitter: Duration,
    /// Shape of the jitter.
    pub latency_distribution: Distribution,
    /// Share of requests answered 500, in `[0, 1]`.
    pub error_rate: f64,
    /// Requests per second before 429 + `Retry-After`; 0 means no quota.
    pub quota_per_second: u32,
    /// `Retry-After` sent with a quota 429.
    #[serde(with = "humantime_serde")]
    pub quota_retry_after: Duration,
}

impl Default for Faults {
    fn default() -> Self {
        Self {
            latency: Duration::ZERO,
            latency_jitter: Duration::ZERO,
            latency_distribution: Distribution::Uniform,
            error_rate: 0.0,
            quota_per_second: 0,
            quota_retry_after: Duration::from_secs(1),
        }
    }
}

impl Faults {
    /// Checks values serde cannot.
    pub fn validate(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.error_rate) {
            return Err("faults.error_rate must be within [0, 1]".to_owned());
        }
        Ok(())
    }

    fn sample_latency(&self) -> Duration {
        let jitter = self.latency_jitter.as_secs_f64();
        let extra = match self.latency_distribution {
            Distribution::Uniform => fastrand::f64() * jitter,
            Distribution::Exponential => -jitter * (1.0 - fastrand::f64()).ln(),
        };
        self.latency + Duration::from_secs_f64(extra.clamp(0.0, 60.0))
    }
}

/// Faults plus the quota limiter built from them, swapped as one.
struct FaultState {
    faults: Faults,
    quota: Option<DefaultDirectRateLimiter>,
}

impl FaultState {
    fn new(faults: Faults) -> Self {
        let quota = NonZeroU32::new(faults.quota_per_second)
            .map(|rate| RateLimiter::direct(Quota::per_second(rate).allow_burst(rate)));
        Self { faults, quota }
    }
}

/// The simulator's request handler.
pub struct Simulator {
    state: SimState,
    faults: ArcSwap<FaultState>,
    callbacks: Arc<Callbacks>,
    inbox: inbox::BranchInbox,
}

/// A running simulator; dropping it stops the listener.
pub struct SimHandle {
    addr: SocketAddr,
    simulator: Arc<Simulator>,
    stop: tokio::sync::watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

impl SimHandle {
    /// The bound address.
    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://addr`, for an upstream base URL.
    #[must_use]
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Direct access to the state (counters, barcode issuing) for in-process users.
    #[must_use]
    pub fn state(&self) -> &SimState {
        &self.simulator.state
    }

    /// The acquirer's encryption certificate (loaded or generated on first use).
    pub async fn acquirer_certificate(&self) -> Result<Arc<AcquirerCertificate>, String> {
        self.simulator.callbacks.certificate().await
    }

    /// Changes the simulated customer's answer to consent pushes from now on.
    pub fn set_consent(&self, consent: Consent) {
        self.simulator.callbacks.set_consent(consent);
    }

    /// Replaces the fault knobs.
    pub fn set_faults(&self, faults: Faults) {
        self.simulator
            .faults
            .store(Arc::new(FaultState::new(faults)));
    }

    /// Stops the listener and waits for it.
    pub async fn stop(mut self) {
        self.stop.send_replace(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for SimHandle {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}

impl Simulator {
    /// Binds `config.listen` and serves until the handle is dropped or stopped.
    /// With `callback_url` set, the acquirer certificate is made (or loaded) first, so a
    /// bad `acquirer_cert_file` (or `callback_url`) fails the start. Stopping the simulator
    /// also ends its pending callbacks.
    pub async fn start(config: SimConfig) -> std::io::Result<SimHandle> {
        let listener = TcpListener::bind(config.listen).await?;
        let addr = listener.local_addr()?;
        let state = SimState::new(config);
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let callbacks = Callbacks::new(state.config(), state.callback_counters(), stopped.clone())
            .map_err(std::io::Error::other)?;
        let callbacks = Arc::new(callbacks);
        if callbacks.enabled() || state.config().acquirer_cert_file.is_some() {
            callbacks
                .certificate()
                .await
                .map_err(std::io::Error::other)?;
        }
        let simulator = Arc::new(Self {
            faults: ArcSwap::from_pointee(FaultState::new(state.config().faults.clone())),
            state,
            callbacks,
            inbox: inbox::BranchInbox::default(),
        });
        let task = tokio::spawn(accept_loop(listener, Arc::clone(&simulator), stopped));
        Ok(SimHandle {
            addr,
            simulator,
            stop,
            task: Some(task),
        })
    }

    async fn answer(&self, request: Request<Incoming>) -> HttpResponse {
        let (parts, body) = request.into_parts();
        let limit = if parts.uri.path() == "/sim/branch-inbox" {
            inbox::MAX_PACKAGE
        } else {
            100 * 1024
        };
        let body = match Limited::new(body, limit).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(_) => {
                return error(&SimError::new(
                    413,
                    "PayloadTooLargeError",
                    "request entity too large",
                ));
            }
        };
        let path = parts.uri.path();
        if let Some(sim_path) = path.strip_prefix("/sim/") {
            if parts.method == Method::GET && sim_path == "acquirer-certificate" {
                return self.certificate_pem().await;
            }
            if sim_path == "branch-inbox" && parts.method == Method::POST {
                self.inbox.take(&parts.headers, &body);
                return json(StatusCode::OK, r#"{"success":true}"#.to_owned());
            }
            return self.sim_route(&parts.method, sim_path, &body);
        }
        let routed = match route::find(&parts.method, path) {
            Ok(routed) => routed,
            Err(unmatched) => {
                self.state.count(None);
                return error(&match unmatched {
                    Unmatched::NotFound => SimError::new(404, "NotFoundError", "Route not found"),
                    Unmatched::Method => {
                        SimError::new(405, "MethodNotAllowedError", "Method not allowed")
                    }
                });
            }
        };
        self.state.count(Some(routed.endpoint));

        let faults = self.faults.load_full();
        if let Some(quota) = &faults.quota
            && quota.check().is_err()
        {
            let mut response = error(&SimError::new(
                429,
                "TooManyRequestsError",
                "Too many requests",
            ));
            let wait = faults.faults.quota_retry_after;
            let secs = (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1);
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
            return response;
        }
        let latency = faults.faults.sample_latency();
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        if faults.faults.error_rate > 0.0 && fastrand::f64() < faults.faults.error_rate {
            return error(&SimError::new(
                500,
                "InternalServerError",
                "Internal server error",
            ));
        }

        let authorization = parts
            .headers
            .get(header::AUTHORIZATION)
            .map(HeaderValue::as_bytes);
        let result = if routed.endpoint == Endpoint::TokenExchange {
            let token = routed.id.as_deref().unwrap_or_default();
            self.state
                .exchange_token(token, authorization)
                .map(|token| (StatusCode::OK, format!(r#"{{"token":"{token}"}}"#)))
        } else {
            match self.state.authenticate(authorization) {
                Ok(()) => self.dispatch(&parts.method, &routed, parts.uri.query(), &body),
                Err(refusal) => Err(refusal),
            }
        };
        match result {
            Ok((status, body)) => json(status, body),
            Err(refusal) => error(&refusal),
        }
    }

    fn dispatch(
        &self,
        method: &Method,
        routed: &route::Matched,
        query: Option<&str>,
        body: &[u8],
    ) -> Result<(StatusCode, String), SimError> {
        let ok = |body: String| Ok((StatusCode::OK, body));
        let path_param = routed.id.as_deref();
        let branch_id = path_param.unwrap_or_default();
        match routed.endpoint {
            Endpoint::TokenExchange => {
                Err(SimError::new(500, "InternalServerError", "unreachable"))
            }
            Endpoint::DocumentIdentification | Endpoint::DocumentIdentificationAge => {
                let fields = BodyFields::parse(body)?;
                fields.require_branch()?;
                let barcode = fields.barcode()?;
                let success = self.state.identify(barcode)?;
                ok(format!(r#"{{"success":{success}}}"#))
            }
            Endpoint::DocumentRequest => {
                let fields = BodyFields::parse(body)?;
                fields.require_branch()?;
                let request_id = fields.request_id()?;
                let flow = if fields.qrcode.as_deref().is_some_and(|q| !q.is_empty()) {
                    self.state.share_qrcode();
                    Flow::Barcode(None)
                } else {
                    let barcode = fields.barcode()?;
                    self.state.share_barcode(barcode, request_id)?;
                    Flow::Barcode(Some(barcode.digits()))
                };
                self.callbacks.pushed(flow, request_id);
                ok(r#"{"success":true}"#.to_owned())
            }
            Endpoint::DocumentRequestStatus => {
                let (barcode, request_id) = status_query(query)?;
                let status = self.state.sharing_status(barcode, &request_id)?;
                ok(format!(r#"{{"status":"{status}"}}"#))
            }
            Endpoint::OfferRequestStatus => ok(r#"{"status":"processing"}"#.to_owned()),
            Endpoint::OfferRequestDynamic => {
                let fields = BodyFields::parse(body)?;
                if fields.offer_id.is_none() {
                    return Err(validation("offerId"));
                }
                let request_id = fields.request_id()?;
                let link = self.state.deeplink(branch_id, request_id);
                self.callbacks.pushed(Flow::DeepLink, request_id);
                ok(format!(r#"{{"deeplink":"{link}"}}"#))
            }
            Endpoint::Branches => {
                let text = || String::from_utf8_lossy(body).into_owned();
                match (method, path_param) {
                    (&Method::GET, None) => ok(self.state.branches_json()),
                    (&Method::POST, None) => ok(format!(
                        r#"{{"_id":"{}"}}"#,
                        self.state.create_branch(text())
                    )),
                    (&Method::GET, Some(id)) => ok(self.state.branch(id)?),
                    (&Method::PUT, Some(id)) => {
                        self.state.update_branch(id, text())?;
                        ok(format!(r#"{{"_id":"{id}"}}"#))
                    }
                    (_, Some(id)) => {
                        self.state.delete_branch(id)?;
                        Ok((StatusCode::NO_CONTENT, String::new()))
                    }
                    _ => Err(SimError::new(
                        405,
                        "MethodNotAllowedError",
                        "Method not allowed",
                    )),
                }
            }
            Endpoint::Offers => match *method {
                Method::POST => {
                    let id = self
                        .state
                        .create_offer(branch_id, String::from_utf8_lossy(body).into_owned())?;
                    ok(format!(r#"{{"_id":"{id}"}}"#))
                }
                Method::GET => ok(self.state.offers_json(branch_id)),
                _ => {
                    let offer_id = routed.offer.as_deref().unwrap_or_default();
                    self.state.delete_offer(branch_id, offer_id)?;
                    ok(r#"{"success":true}"#.to_owned())
                }
            },
        }
    }

    fn sim_route(&self, method: &Method, path: &str, body: &[u8]) -> HttpResponse {
        match (method, path) {
            (&Method::POST, "barcodes") => {
                #[derive(Deserialize, Default)]
                #[serde(rename_all = "camelCase", default)]
                struct Issue {
                    document_valid: Option<bool>,
                }
                let issue: Issue = if body.is_empty() {
                    Issue::default()
                } else {
                    match serde_json::from_slice(body) {
                        Ok(issue) => issue,
                        Err(_) => return error(&validation("documentValid")),
                    }
                };
                let barcode = self
                    .state
                    .issue_barcode(issue.document_valid.unwrap_or(true));
                json(
                    StatusCode::CREATED,
                    format!(
                        r#"{{"barcode":"{}","expiresIn":{}}}"#,
                        barcode.digits(),
                        self.state.config().barcode_ttl.as_secs()
                    ),
                )
            }
            (&Method::GET, "stats") => json(StatusCode::OK, self.state.stats_json()),
            (&Method::GET, "branch-inbox") => json(StatusCode::OK, self.inbox.json()),
            (&Method::POST, "sessions/revoke") => {
                self.state.revoke_sessions();
                json(StatusCode::OK, r#"{"revoked":true}"#.to_owned())
            }
            (&Method::POST, "stats/reset") => {
                self.state.reset_counters();
                json(StatusCode::OK, self.state.stats_json())
            }
            (&Method::GET, "faults") => json(
                StatusCode::OK,
                serde_json::to_string(&self.faults.load().faults).unwrap_or_default(),
            ),
            (&Method::PUT, "faults") => match serde_json::from_slice::<Faults>(body) {
                Ok(faults) if faults.validate().is_ok() => {
                    let text = serde_json::to_string(&faults).unwrap_or_default();
                    self.faults.store(Arc::new(FaultState::new(faults)));
                    json(StatusCode::OK, text)
                }
                _ => error(&validation("faults")),
            },
            (&Method::GET, "consent") => json(StatusCode::OK, self.consent_json()),
            (&Method::PUT, "consent") => {
                #[derive(Deserialize)]
                #[serde(deny_unknown_fields)]
                struct Knob {
                    consent: Consent,
                }
                match serde_json::from_slice::<Knob>(body) {
                    Ok(knob) => {
                        self.callbacks.set_consent(knob.consent);
                        json(StatusCode::OK, self.consent_json())
                    }
                    Err(_) => error(&validation("consent")),
                }
            }
            _ => error(&SimError::new(404, "NotFoundError", "Route not found")),
        }
    }
}

impl Simulator {
    fn consent_json(&self) -> String {
        let consent = match self.callbacks.consent() {
            Consent::Accept => "accept",
            Consent::Refuse => "refuse",
        };
        format!(r#"{{"consent":"{consent}"}}"#)
    }

    async fn certificate_pem(&self) -> HttpResponse {
        match self.callbacks.certificate().await {
            Ok(certificate) => {
                let mut response = json(StatusCode::OK, certificate.pem().to_owned());
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/x-pem-file"),
                );
                response
            }
            Err(reason) => {
                tracing::warn!(%reason, "diia-sim: no acquirer certificate");
                error(&SimError::new(
                    500,
                    "InternalServerError",
                    "Internal server error",
                ))
            }
        }
    }

    /// Answers one request in its own task: a client that hangs up does not cancel the
    /// work (a consent push still happens), as at Diia.
    async fn handle(self: Arc<Self>, request: Request<Incoming>) -> HttpResponse {
        // Like Diia's gateway, keep the caller's trace id when it sends one.
        let trace_id = request.headers().get("diia-trace-id").cloned();
        let work = tokio::spawn(async move { self.answer(request).await });
        let mut response = work.await.unwrap_or_else(|_| {
            error(&SimError::new(
                500,
                "InternalServerError",
                "Internal server error",
            ))
        });
        if let Some(trace_id) = trace_id {
            response.headers_mut().insert("diia-trace-id", trace_id);
        }
        response
    }
}

/// The body fields Diia's acquirer endpoints read.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct BodyFields {
    branch_id: Option<String>,
    barcode: Option<String>,
    qrcode: Option<String>,
    request_id: Option<String>,
    offer_id: Option<String>,
}

impl BodyFields {
    fn parse(body: &[u8]) -> Result<Self, SimError> {
        serde_json::from_slice(body)
            .map_err(|_| SimError::new(400, "BadRequestError", "Invalid JSON"))
    }

    fn require_branch(&self) -> Result<(), SimError> {
        self.branch_id
            .as_ref()
            .map(|_| ())
            .ok_or_else(|| validation("branchId"))
    }

    fn barcode(&self) -> Result<Code, SimError> {
        let text = self
            .barcode
            .as_deref()
            .ok_or_else(|| validation("barcode"))?;
        Code::read(text).ok_or_else(|| validation("barcode"))
    }

    fn request_id(&self) -> Result<&str, SimError> {
        self.request_id
            .as_deref()
            .ok_or_else(|| validation("requestId"))
    }
}

/// `barcode` and `requestId` from the status query (percent-decoding is not needed: both
/// are plain ASCII ids at Diia).
fn status_query(query: Option<&str>) -> Result<(Code, String), SimError> {
    let mut barcode = None;
    let mut request_id = None;
    for pair in query.unwrap_or_default().split('&') {
        match pair.split_once('=') {
            Some(("barcode", value)) => barcode = Code::read(value),
            Some(("requestId", value)) if !value.is_empty() => {
                request_id = Some(value.to_owned());
            }
            _ => {}
        }
    }
    match (barcode, request_id) {
        (Some(barcode), Some(request_id)) => Ok((barcode, request_id)),
        (None, _) => Err(validation("barcode")),
        (_, None) => Err(validation("requestId")),
    }
}

fn validation(field: &'static str) -> SimError {
    SimError {
        data: format!(
            r#"{{"errors":[{{"type":"required","field":"{field}","message":"The '{field}' field is invalid."}}]}}"#
        ),
        ..SimError::new(422, "ValidationError", "Parameters validation error!")
    }
}

fn json(status: StatusCode, body: String) -> HttpResponse {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    let trace_id = format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        fastrand::u32(..),
        fastrand::u16(..),
        fastrand::u16(..0x1000),
        fastrand::u16(0x8000..0xc000),
        fastrand::u64(..1 << 48)
    );
    if let Ok(value) = HeaderValue::try_from(trace_id) {
        headers.insert("diia-trace-id", value);
    }
    response
}

fn error(refusal: &SimError) -> HttpResponse {
    let status = StatusCode::from_u16(refusal.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json(status, refusal.body())
}
