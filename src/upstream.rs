//! The client toward Diia: pooled hyper client over rustls, HTTP/1.1 and HTTP/2 (ALPN),
//! connect and total deadlines, Diia's budget spent per call, and Diia's back-off honoured.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::breaker::{Breaker, RetryBudget};
use crate::config::UpstreamConfig;
use crate::error::GatewayError;
use crate::limit::DiiaBudget;
use crate::metrics::Metrics;
use crate::route::Endpoint;

/// Diia's answer, buffered: small, and shared by every coalesced or cached request.
#[derive(Debug, Clone)]
pub struct Answer {
    /// Diia's status.
    pub status: StatusCode,
    /// Diia's body, unchanged.
    pub body: Bytes,
    /// Diia's `Content-Type`.
    pub content_type: Option<HeaderValue>,
    /// Diia's `Diia-Trace-Id`, kept so a cached answer still points at the call that made it.
    pub trace_id: Option<HeaderValue>,
    /// Diia's `Retry-After`, passed on to the client.
    pub retry_after: Option<HeaderValue>,
}

/// What one upstream call produced: Diia's answer, or why there is none.
pub type Outcome = Result<Answer, GatewayError>;

/// Everything needed to repeat a client's request toward Diia; owned, so the call can
/// outlive the client.
#[derive(Debug, Clone)]
pub struct UpstreamRequest {
    /// Which endpoint, for metrics.
    pub endpoint: Endpoint,
    /// The client's method.
    pub method: Method,
    /// The client's path and query, unchanged.
    pub path_and_query: String,
    /// `Authorization`, forwarded as is.
    pub authorization: Option<HeaderValue>,
    /// `Diia-Trace-Id`, forwarded as is.
    pub trace_id: Option<HeaderValue>,
    /// `Content-Type`, forwarded as is.
    pub content_type: Option<HeaderValue>,
    /// The client's body bytes, unchanged.
    pub body: Bytes,
}

/// The pooled client plus what every call needs.
pub struct Upstream {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    base: String,
    /// Deadlines and retry settings, swapped whole on a config reload.
    tunables: arc_swap::ArcSwap<Tunables>,
    budget: DiiaBudget,
    metrics: Arc<Metrics>,
    breaker: Breaker,
    retries: RetryBudget,
}

/// The per-call settings a reload may change.
struct Tunables {
    timeout: Duration,
    max_response_body: usize,
    max_retries: u32,
    retry_backoff: Duration,
}

impl Tunables {
    fn new(config: &UpstreamConfig) -> Self {
        Self {
            timeout: config.timeout,
            max_response_body: config.max_response_body,
            max_retries: config.max_retries,
            retry_backoff: config.retry_backoff,
        }
    }
}

static DIIA_TRACE_ID: header::HeaderName = header::HeaderName::from_static("diia-trace-id");
static ACCEPT_JSON: HeaderValue = HeaderValue::from_static("application/json");

impl Upstream {
    /// Builds the client; Diia's certificate is verified against `upstream.ca_file`, or the
    /// system's plus Mozilla's bundled roots.
    pub fn new(
        config: &UpstreamConfig,
        base_url: &str,
        budget: DiiaBudget,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Self> {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(config.connect_timeout));
        http.set_nodelay(true);
        let roots =
            crate::tls::upstream_roots(config.ca_file.as_deref()).map_err(std::io::Error::other)?;
        let tls = crate::tls::client_config(roots).map_err(std::io::Error::other)?;
        let connector = HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(config.pool_idle_timeout)
            .pool_max_idle_per_host(config.pool_max_idle)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(connector);
        Ok(Self {
            client,
            base: base_url.trim_end_matches('/').to_owned(),
            tunables: arc_swap::ArcSwap::from_pointee(Tunables::new(config)),
            budget,
            metrics,
            breaker: Breaker::new(config.breaker_failures, config.breaker_cooldown),
            retries: RetryBudget::new(config.retry_ratio, config.retry_reserve),
        })
    }

    /// New deadlines, retry settings and Diia budget (a config reload). The connection
    /// pool, TLS roots, breaker thresholds and base URL need a restart.
    pub fn reconfigure(&self, config: &UpstreamConfig, budget: &crate::config::DiiaLimitConfig) {
        self.tunables.store(Arc::new(Tunables::new(config)));
        self.budget.reconfigure(budget);
    }

    /// The budget toward Diia (shared with token refreshes and retries).
    #[must_use]
    pub fn budget(&self) -> &DiiaBudget {
        &self.budget
    }

    /// One call to Diia: breaker, then budget, then the exchange under the upstream
    /// deadline; safe calls are retried after a connect failure within the retry budget.
    pub async fn call(&self, request: UpstreamRequest) -> Outcome {
        let admission = self
            .breaker
            .admit()
            .map_err(|retry_after| GatewayError::CircuitOpen { retry_after })?;
        self.retries.deposit();
        // Only calls that are safe to repeat, and only when Diia never saw the request.
        let retryable = matches!(
            request.endpoint,
            Endpoint::TokenExchange
                | Endpoint::DocumentIdentification
                | Endpoint::DocumentIdentificationAge
        );
        let tunables = self.tunables.load_full();
        let mut attempt = 0;
        loop {
            if let Err(error) = self.budget.acquire().await {
                self.breaker.abandon(admission);
                return Err(error);
            }
            let outcome = self.attempt(request.clone()).await;
            let unreachable = matches!(outcome, Err(GatewayError::UpstreamUnreachable));
            if retryable && unreachable && attempt < tunables.max_retries && self.retries.withdraw()
            {
                attempt += 1;
                self.metrics.upstream_retry();
                let ceiling = tunables.retry_backoff.saturating_mul(1 << attempt.min(8));
                tokio::time::sleep(ceiling.mul_f64(fastrand::f64())).await;
                continue;
            }
            let failed = match &outcome {
                Ok(answer) => answer.status.is_server_error(),
                Err(_) => true,
            };
            self.breaker.record(admission, !failed);
            self.metrics.set_breaker_open(self.breaker.is_open());
            return outcome;
        }
    }

    /// One exchange with Diia under the upstream deadline; honours Diia's back-off.
    async fn attempt(&self, request: UpstreamRequest) -> Outcome {
        let endpoint = request.endpoint;
        let started = Instant::now();
        let result =
            tokio::time::timeout(self.tunables.load().timeout, self.exchange(request)).await;
        let outcome = result.unwrap_or(Err(GatewayError::UpstreamTimeout));
        self.metrics
            .upstream_call(endpoint, started.elapsed(), &outcome);
        let backoff = outcome
            .as_ref()
            .ok()
            .filter(|a| {
                matches!(
                    a.status,
                    StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
                )
            })
            .and_then(retry_after);
        if let Some(wait) = backoff {
            tracing::warn!(
                wait_ms = wait.as_millis(),
                "Diia asked to back off; pausing upstream calls"
            );
            self.budget.pause(wait);
        }
        outcome
    }

    async fn exchange(&self, request: UpstreamRequest) -> Outcome {
        let uri: Uri = format!("{}{}", self.base, request.path_and_query)
            .parse()
            .map_err(|_| GatewayError::Internal)?;
        let mut builder = Request::builder().method(request.method).uri(uri);
        if let Some(headers) = builder.headers_mut() {
            headers.insert(header::ACCEPT, ACCEPT_JSON.clone());
            for (name, value) in [
                (header::AUTHORIZATION, request.authorization),
                (DIIA_TRACE_ID.clone(), request.trace_id),
                (header::CONTENT_TYPE, request.content_type),
            ] {
                if let Some(value) = value {
                    headers.insert(name, value);
                }
            }
        }
        let upstream_request = builder
            .body(Full::new(request.body))
            .map_err(|_| GatewayError::Internal)?;
        let response = self
            .client
            .request(upstream_request)
            .await
            .map_err(|error| {
                tracing::debug!(connect = error.is_connect(), "upstream request failed");
                if error.is_connect() {
                    GatewayError::UpstreamUnreachable
                } else {
                    GatewayError::UpstreamProtocol
                }
            })?;
        let (parts, body) = response.into_parts();
        let body = Limited::new(body, self.tunables.load().max_response_body)
            .collect()
            .await
            .map_err(|_| GatewayError::UpstreamProtocol)?
            .to_bytes();
        Ok(Answer {
            status: parts.status,
            body,
            content_type: parts.headers.get(header::CONTENT_TYPE).cloned(),
            trace_id: parts.headers.get(&DIIA_TRACE_ID).cloned(),
            retry_after: parts.headers.get(header::RETRY_AFTER).cloned(),
        })
    }
}

/// `Retry-After` as delay-seconds; the HTTP-date form is ignored (no known Diia use).
fn retry_after(answer: &Answer) -> Option<Duration> {
    let seconds: u64 = answer
        .retry_after
        .as_ref()?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    (seconds > 0).then(|| Duration::from_secs(seconds))
}
