//! The request lifecycle, written once:
//!
//! 1. **route**: `(method, path)` → [`Endpoint`], or 404/405 (nothing leaves the box);
//! 2. **identify caller**: bearer session token (401 without), or the acquirer token in
//!    the token-exchange path;
//! 3. **read body**: bounded by size (413) and time (408);
//! 4. **validate**: JSON syntax (400), required fields and barcode (422);
//! 5. **per-branch limit** (429 + `Retry-After`, `RateLimit-Policy`, `RateLimit`);
//! 6. **cache / coalesce / replay** keyed by acquirer + endpoint + fields;
//! 7. **Diia budget** (wait, then 503), Diia's back-off (503), **upstream call** with
//!    deadline (502/504), inside a spawned task that outlives the client;
//! 8. **respond** with Diia's status and body, `Cache-Status`, metrics, redacted access log.
//!
//! Each stage is a plain `async fn` returning `Result<_, GatewayError>`; [`Gateway::serve`]
//! is the one place that turns an error into a response, counts and logs it. Validation
//! comes before the branch limit so that malformed traffic is refused without spending a
//! branch's budget, and the branch limit comes before the cache so that one branch
//! cannot hog the gateway even with cache hits.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::request::Parts;
use http::{HeaderValue, Method, Request, Response, header};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Body;
use hyper::body::Incoming;

use crate::barcode::Barcode;
use crate::cache::{AnswerCache, Lookup, Policy};
use crate::config::Config;
use crate::error::{GatewayError, JSON_CONTENT_TYPE};
use crate::keys::Secrets;
use crate::limit::{BranchIdentity, BranchLimiter};
use crate::metrics::{Metrics, RequestOutcome};
use crate::request::{JsonBody, SharingSubject, bearer_token, status_query};
use crate::route::{Endpoint, route};
use crate::server::{Handler, HttpResponse};
use crate::token::{ApiKeys, TokenManager};
use crate::upstream::{Outcome, Upstream, UpstreamRequest};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

static CACHE_STATUS: header::HeaderName = header::HeaderName::from_static("cache-status");
static DIIA_TRACE_ID: header::HeaderName = header::HeaderName::from_static("diia-trace-id");
static HIT: HeaderValue = HeaderValue::from_static("diia-gateway; hit");
static REPLAY: HeaderValue = HeaderValue::from_static("diia-gateway; hit; detail=replay");
static MISS_STORED: HeaderValue = HeaderValue::from_static("diia-gateway; fwd=miss; stored");
static MISS: HeaderValue = HeaderValue::from_static("diia-gateway; fwd=miss");
static COLLAPSED: HeaderValue = HeaderValue::from_static("diia-gateway; fwd=miss; collapsed");
static STALE: HeaderValue =
    HeaderValue::from_static("diia-gateway; fwd=stale; detail=stale-if-error");

/// The gateway: shared state behind every request. Cheap to share as `Arc<Gateway>`.
pub struct Gateway {
    /// The whole config, swapped as one snapshot on reload; each request reads it once.
    config: ArcSwap<Config>,
    secrets: Secrets,
    answers: AnswerCache,
    tokens: AnswerCache,
    sharing: AnswerCache,
    branches: ArcSwap<BranchLimiter>,
    upstream: Arc<Upstream>,
    metrics: Arc<Metrics>,
    /// Requests being processed; full means shed (503 `overloaded`) rather than queue.
    in_flight: tokio::sync::Semaphore,
    /// Managed token mode, when configured.
    managed: Option<Arc<Managed>>,
}

/// Managed token mode: the session token the gateway holds, and how branches get in.
pub struct Managed {
    /// The acquirer's secrets and session token.
    pub tokens: TokenManager,
    /// Branch API keys; `None` when branches authenticate with mTLS.
    pub keys: Option<ApiKeys>,
}

/// A successful pass through the stages.
struct Reply {
    response: HttpResponse,
    outcome: RequestOutcome,
}

/// What the access log may say about a request: only labels and keyed fingerprints.
#[derive(Default)]
struct Trace {
    endpoint: Option<Endpoint>,
    barcode: Option<Barcode>,
}

/// Renders a keyed fingerprint only when a log line is actually written.
struct Redacted<'a>(&'a Secrets, Option<Barcode>);

impl fmt::Display for Redacted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.1 {
            Some(barcode) => write!(f, "{}", self.0.fingerprint(&barcode.as_u64().to_le_bytes())),
            None => f.write_str("-"),
        }
    }
}

impl Gateway {
    /// Builds the gateway around an upstream client.
    #[must_use]
    pub fn new(
        config: Arc<Config>,
        secrets: Secrets,
        upstream: Arc<Upstream>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let max_pending =
            config.upstream.timeout + config.limits.diia.max_wait + Duration::from_secs(1);
        let answers = AnswerCache::new(
            verification_policy(&config),
            config.cache.max_bytes,
            max_pending,
            config.cache.stale_if_error,
        );
        let tokens = AnswerCache::new(
            token_policy(&config),
            16 * 1024 * 1024,
            max_pending,
            Duration::ZERO,
        );
        let sharing = AnswerCache::new(
            sharing_policy(&config),
            config.cache.max_bytes / 4,
            max_pending,
            Duration::ZERO,
        );
        Self {
            branches: ArcSwap::from_pointee(BranchLimiter::new(&config.limits.branch)),
            in_flight: tokio::sync::Semaphore::new(config.server.max_in_flight),
            managed: None,
            config: ArcSwap::new(config),
            secrets,
            answers,
            tokens,
            sharing,
            upstream,
            metrics,
        }
    }

    /// Applies a new config snapshot (SIGHUP or `POST /reload`): limits, TTLs, deadlines
    /// and the Diia budget change for the next request; nothing in flight is dropped.
    /// Listeners, pool, breaker thresholds, auth mode and in-flight cap need a restart.
    pub fn apply(&self, config: Config) {
        let old = self.config.load();
        for (key, changed) in [
            ("server.listen", old.server.listen != config.server.listen),
            (
                "server.admin_listen",
                old.server.admin_listen != config.server.admin_listen,
            ),
            (
                "server.max_connections",
                old.server.max_connections != config.server.max_connections,
            ),
            (
                "server.max_in_flight",
                old.server.max_in_flight != config.server.max_in_flight,
            ),
            (
                "upstream.base_url",
                old.upstream.base_url != config.upstream.base_url,
            ),
            ("auth.mode", old.auth.mode != config.auth.mode),
        ] {
            if changed {
                tracing::warn!(
                    key,
                    "changed in the new config but only takes effect after a restart"
                );
            }
        }
        if old.limits.branch.per_minute != config.limits.branch.per_minute
            || old.limits.branch.burst != config.limits.branch.burst
        {
            self.branches
                .store(Arc::new(BranchLimiter::new(&config.limits.branch)));
        }
        self.answers
            .set_policy(verification_policy(&config), config.cache.stale_if_error);
        self.tokens
            .set_policy(token_policy(&config), Duration::ZERO);
        self.sharing
            .set_policy(sharing_policy(&config), Duration::ZERO);
        self.upstream
            .reconfigure(&config.upstream, &config.limits.diia);
        self.config.store(Arc::new(config));
    }

    /// Switches to managed token mode.
    #[must_use]
    pub fn with_managed(mut self, managed: Managed) -> Self {
        self.managed = Some(Arc::new(managed));
        self
    }

    /// The metric handles.
    #[must_use]
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Prometheus text for `/metrics`; settles cache bookkeeping first so counts are exact.
    pub async fn render_metrics(&self) -> String {
        self.answers.sync().await;
        self.tokens.sync().await;
        self.sharing.sync().await;
        self.metrics.render(
            &[
                ("answers", self.answers.entry_count()),
                ("tokens", self.tokens.entry_count()),
                ("sharing", self.sharing.entry_count()),
            ],
            self.branches.load().tracked(),
        )
    }

    /// Periodic upkeep: forget idle branch budgets, settle cache bookkeeping.
    pub async fn housekeeping(&self) {
        self.branches.load().forget_idle();
        self.answers.sync().await;
        self.tokens.sync().await;
        self.sharing.sync().await;
    }

    /// Answers one request: the outer layer that renders, counts and logs. Generic over
    /// the body so benchmarks and tests can drive it without a socket.
    pub async fn serve<B>(&self, request: Request<B>, peer: SocketAddr) -> HttpResponse
    where
        B: Body<Data = Bytes> + Send,
        B::Error: Into<BoxError>,
    {
        let started = Instant::now();
        let mut trace = Trace::default();
        // Shed before any work: under overload a fast 503 beats a queue that makes every
        // request late (and a barcode lives only 3 minutes).
        let permit = self.in_flight.try_acquire();
        let result = match permit {
            Ok(_) => self.process(request, peer, started, &mut trace).await,
            Err(_) => Err(GatewayError::Overloaded),
        };
        let (response, outcome, error) = match result {
            Ok(Reply { response, outcome }) => (response, outcome, None),
            Err(error) => {
                if error == GatewayError::Internal {
                    tracing::error!("internal error while answering a request");
                }
                (
                    error.to_response(),
                    RequestOutcome::of_error(&error),
                    Some(error),
                )
            }
        };
        self.metrics
            .request(trace.endpoint, outcome, error.as_ref());
        tracing::info!(
            target: "diia_gateway::access",
            endpoint = trace.endpoint.map_or("none", Endpoint::label),
            status = response.status().as_u16(),
            outcome = outcome.label(),
            code = error.as_ref().map_or("-", GatewayError::code),
            micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
            barcode = %Redacted(&self.secrets, trace.barcode),
            peer = %peer.ip(),
        );
        response
    }

    async fn process<B>(
        &self,
        request: Request<B>,
        peer: SocketAddr,
        started: Instant,
        trace: &mut Trace,
    ) -> Result<Reply, GatewayError>
    where
        B: Body<Data = Bytes> + Send,
        B::Error: Into<BoxError>,
    {
        let (parts, body) = request.into_parts();
        let routed = route(&parts.method, parts.uri.path())?;
        trace.endpoint = Some(routed.endpoint);
        let deadline =
            tokio::time::Instant::from_std(started + self.config.load().server.request_deadline);
        if routed.endpoint == Endpoint::TokenExchange {
            if self.managed.is_some() {
                // Branches never hold acquirer tokens in managed mode.
                return Err(GatewayError::UnknownRoute);
            }
            let acquirer_token = routed
                .path_param
                .ok_or(GatewayError::InvalidAcquirerToken)?;
            return self
                .token_exchange(&parts, acquirer_token, peer, deadline)
                .await;
        }
        let token = match &self.managed {
            Some(managed) => {
                if let Some(keys) = &managed.keys {
                    let presented = parts
                        .headers
                        .get("x-api-key")
                        .ok_or(GatewayError::InvalidApiKey)?;
                    if !keys.admits(presented.as_bytes()) {
                        return Err(GatewayError::InvalidApiKey);
                    }
                }
                managed.tokens.identity()
            }
            None => bearer_token(&parts.headers)?,
        };
        let body = self.read_body(&parts, body).await?;
        match routed.endpoint {
            Endpoint::DocumentIdentification | Endpoint::DocumentIdentificationAge => {
                self.identify(routed.endpoint, &parts, token, body, deadline, trace)
                    .await
            }
            Endpoint::DocumentRequest => self.share(&parts, token, body, deadline, trace).await,
            endpoint => {
                self.pass_through(
                    endpoint,
                    &parts,
                    routed.path_param,
                    body,
                    peer,
                    deadline,
                    trace,
                )
                .await
            }
        }
    }

    async fn read_body<B>(&self, parts: &Parts, body: B) -> Result<Bytes, GatewayError>
    where
        B: Body<Data = Bytes> + Send,
        B::Error: Into<BoxError>,
    {
        let config = self.config.load();
        let limit = config.server.body_limit;
        let declared = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|length| length > limit as u64) {
            return Err(GatewayError::BodyTooLarge);
        }
        let collected = tokio::time::timeout(
            config.server.body_timeout,
            read_all(Limited::new(body, limit)),
        )
        .await
        .map_err(|_| GatewayError::BodyTimeout)?;
        match collected {
            Ok(bytes) => Ok(bytes),
            Err(error) if error.downcast_ref::<LengthLimitError>().is_some() => {
                Err(GatewayError::BodyTooLarge)
            }
            Err(_) => Err(GatewayError::BodyRead),
        }
    }

    async fn token_exchange(
        &self,
        parts: &Parts,
        acquirer_token: &str,
        peer: SocketAddr,
        deadline: tokio::time::Instant,
    ) -> Result<Reply, GatewayError> {
        self.branches
            .load()
            .check(BranchIdentity::Client(peer.ip()))?;
        let credentials = parts
            .headers
            .get(header::AUTHORIZATION)
            .map_or(&b""[..], HeaderValue::as_bytes);
        let key = self
            .secrets
            .key("session-token")
            .part(acquirer_token.as_bytes())
            .part(credentials)
            .finish();
        let (outcome, lookup) = self
            .tokens
            .get_or_fetch(key, None, deadline, || {
                self.fetch(upstream_request(
                    Endpoint::TokenExchange,
                    parts,
                    Bytes::new(),
                ))
            })
            .await?;
        reply(&outcome, lookup, false)
    }

    async fn identify(
        &self,
        endpoint: Endpoint,
        parts: &Parts,
        token: &[u8],
        body: Bytes,
        deadline: tokio::time::Instant,
        trace: &mut Trace,
    ) -> Result<Reply, GatewayError> {
        let json = JsonBody::parse(&body)?;
        let branch = json.branch_id()?;
        trace.barcode = Some(json.barcode()?);
        self.branches.load().check(BranchIdentity::Branch(branch))?;
        let mut key = self.secrets.key("answer");
        key.part(token).part(endpoint.label().as_bytes());
        json.key_into(&mut key);
        let (outcome, lookup) = self
            .answers
            .get_or_fetch(key.finish(), None, deadline, || {
                self.fetch(upstream_request(endpoint, parts, body.clone()))
            })
            .await?;
        reply(&outcome, lookup, false)
    }

    async fn share(
        &self,
        parts: &Parts,
        token: &[u8],
        body: Bytes,
        deadline: tokio::time::Instant,
        trace: &mut Trace,
    ) -> Result<Reply, GatewayError> {
        let json = JsonBody::parse(&body)?;
        let branch = json.branch_id()?;
        let subject = json.sharing_subject()?;
        let request_id = json.request_id()?;
        self.branches.load().check(BranchIdentity::Branch(branch))?;
        let mut key = self.secrets.key("sharing");
        key.part(token);
        match subject {
            SharingSubject::Barcode(barcode) => {
                trace.barcode = Some(barcode);
                key.part(b"barcode").part(&barcode.as_u64().to_le_bytes())
            }
            SharingSubject::Qrcode(code) => key.part(b"qrcode").part(code.as_bytes()),
        };
        let tag = self
            .secrets
            .key("sharing-request")
            .part(request_id.as_bytes())
            .finish();
        let (outcome, lookup) = self
            .sharing
            .get_or_fetch(key.finish(), Some(tag), deadline, || {
                self.fetch(upstream_request(
                    Endpoint::DocumentRequest,
                    parts,
                    body.clone(),
                ))
            })
            .await?;
        reply(&outcome, lookup, true)
    }

    #[allow(clippy::too_many_arguments)]
    async fn pass_through(
        &self,
        endpoint: Endpoint,
        parts: &Parts,
        path_branch: Option<&str>,
        body: Bytes,
        peer: SocketAddr,
        deadline: tokio::time::Instant,
        trace: &mut Trace,
    ) -> Result<Reply, GatewayError> {
        match endpoint {
            Endpoint::DocumentRequestStatus => {
                trace.barcode = Some(status_query(parts.uri.query())?.0);
            }
            Endpoint::OfferRequestDynamic => {
                let json = JsonBody::parse(&body)?;
                json.offer_id()?;
                json.request_id()?;
            }
            _ if matches!(parts.method, Method::POST | Method::PUT) => {
                JsonBody::parse(&body)?;
            }
            _ => {}
        }
        let who = match path_branch {
            Some(id) => BranchIdentity::Branch(id),
            None => BranchIdentity::Client(peer.ip()),
        };
        self.branches.load().check(who)?;
        let request = upstream_request(endpoint, parts, body);
        let answer = tokio::time::timeout_at(deadline, self.fetch(request))
            .await
            .map_err(|_| GatewayError::UpstreamTimeout)??;
        let mut response = answer_response(&answer);
        if answer.status.is_server_error() {
            response.headers_mut().remove(&CACHE_STATUS);
            return Ok(Reply {
                response,
                outcome: RequestOutcome::UpstreamError,
            });
        }
        Ok(Reply {
            response,
            outcome: RequestOutcome::Passthrough,
        })
    }

    /// The leader's call, as an owned future that can run in its own task.
    fn fetch(&self, request: UpstreamRequest) -> impl Future<Output = Outcome> + Send + 'static {
        let upstream = Arc::clone(&self.upstream);
        let managed = self.managed.clone();
        async move {
            match managed {
                Some(managed) => managed.tokens.call(&upstream, request).await,
                None => upstream.call(request).await,
            }
        }
    }
}

impl Handler for Gateway {
    async fn handle(self: Arc<Self>, request: Request<Incoming>, peer: SocketAddr) -> HttpResponse {
        self.serve(request, peer).await
    }
}

/// The whole body as one `Bytes`. A body that arrives in one frame (the usual case for a
/// small JSON request) is passed on without a copy or an allocation, which
/// `http_body_util::Collected` (a frame list) cannot do; trailers are ignored.
async fn read_all<B: Body<Data = Bytes>>(body: B) -> Result<Bytes, B::Error> {
    let mut body = std::pin::pin!(body);
    let mut first: Option<Bytes> = None;
    let mut joined: Option<bytes::BytesMut> = None;
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        match (&first, &mut joined) {
            (None, _) => first = Some(data),
            (Some(head), None) => {
                let mut buffer = bytes::BytesMut::with_capacity(head.len() + data.len());
                buffer.extend_from_slice(head);
                buffer.extend_from_slice(&data);
                joined = Some(buffer);
            }
            (Some(_), Some(buffer)) => buffer.extend_from_slice(&data),
        }
    }
    Ok(joined
        .map(bytes::BytesMut::freeze)
        .or(first)
        .unwrap_or_default())
}

fn upstream_request(endpoint: Endpoint, parts: &Parts, body: Bytes) -> UpstreamRequest {
    UpstreamRequest {
        endpoint,
        method: parts.method.clone(),
        path_and_query: parts
            .uri
            .path_and_query()
            .map_or_else(|| parts.uri.path().to_owned(), |pq| pq.as_str().to_owned()),
        authorization: parts.headers.get(header::AUTHORIZATION).cloned(),
        trace_id: parts.headers.get(&DIIA_TRACE_ID).cloned(),
        content_type: parts.headers.get(header::CONTENT_TYPE).cloned(),
        body,
    }
}

/// TTLs of verification answers, from one config snapshot (used at start and on reload).
fn verification_policy(config: &Config) -> Policy {
    Policy::Verification {
        ttl: config.cache.ttl,
        negative_ttl: config.cache.negative_ttl,
    }
}

/// Life of cached session tokens.
fn token_policy(config: &Config) -> Policy {
    Policy::SessionToken {
        margin: config.tokens.refresh_margin,
    }
}

/// Replay window of sharing requests.
fn sharing_policy(config: &Config) -> Policy {
    Policy::Sharing {
        ttl: config.sharing.replay_ttl,
    }
}

/// Diia's answer as a response: status, body, content type, trace id, retry-after.
fn answer_response(answer: &crate::upstream::Answer) -> HttpResponse {
    let mut response = Response::new(Full::new(answer.body.clone()));
    *response.status_mut() = answer.status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        answer
            .content_type
            .clone()
            .unwrap_or_else(|| JSON_CONTENT_TYPE.clone()),
    );
    if let Some(trace_id) = &answer.trace_id {
        headers.insert(DIIA_TRACE_ID.clone(), trace_id.clone());
    }
    if let Some(retry_after) = &answer.retry_after {
        headers.insert(header::RETRY_AFTER, retry_after.clone());
    }
    response
}

/// Turns a cache-layer result into a reply with `Cache-Status`.
fn reply(outcome: &Outcome, lookup: Lookup, sharing: bool) -> Result<Reply, GatewayError> {
    let answer = match outcome {
        Ok(answer) => answer,
        Err(error) => return Err(error.clone()),
    };
    let (status, outcome) = match lookup {
        Lookup::Hit if sharing => (&REPLAY, RequestOutcome::Replayed),
        Lookup::Hit => (&HIT, RequestOutcome::Hit),
        Lookup::Miss { stored: true } => (&MISS_STORED, RequestOutcome::Miss),
        Lookup::Miss { stored: false } => (&MISS, RequestOutcome::Miss),
        Lookup::Coalesced => (&COLLAPSED, RequestOutcome::Coalesced),
        Lookup::Stale => (&STALE, RequestOutcome::Stale),
        Lookup::TagMismatch => return Err(GatewayError::SharingAlreadyRequested),
    };
    let outcome = if answer.status.is_server_error() && outcome == RequestOutcome::Miss {
        RequestOutcome::UpstreamError
    } else {
        outcome
    };
    let mut response = answer_response(answer);
    response
        .headers_mut()
        .insert(CACHE_STATUS.clone(), status.clone());
    Ok(Reply { response, outcome })
}
