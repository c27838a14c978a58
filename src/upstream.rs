//! The client toward Diia: pooled hyper client over rustls, HTTP/1.1 and HTTP/2 (ALPN),
//! connect and total deadlines, Diia's budget spent per call, and Diia's back-off honoured.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Uri, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::answer::{Answer, AnswerClass, AnswerParts, CallResult};
use crate::breaker::{Breaker, RetryBudget};
use crate::error::GatewayError;
use crate::head::DIIA_TRACE_ID;
use crate::limit::{DiiaBrake, Share};
use crate::metrics::Metrics;
use crate::per_thread::PerThread;
use crate::route::{CallClass, Endpoint};
use crate::scaleout::Scaleout;
use crate::settings::{Cold, Hot};

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
    /// The calling client's share of the Diia budget (`limits.client.diia_share`), if any.
    pub share: Option<Arc<Share>>,
    /// Scale-out: the wait the shared budget already reserved for the first attempt.
    pub prepaid: Option<Duration>,
    /// Pass-through: the session token has not been accepted by Diia yet, so the call
    /// spends `limits.unverified` instead of the Diia budget (and no client share).
    pub unverified: bool,
}

/// A pool of connections to Diia.
type Pool = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// How a pool is made: the shared runtime's pool and each worker thread's own pool are
/// made alike.
#[derive(Clone)]
struct PoolRecipe {
    connector: HttpsConnector<HttpConnector>,
    idle_timeout: Duration,
    max_idle: usize,
}

impl PoolRecipe {
    fn pool(&self) -> Pool {
        Client::builder(TokioExecutor::new())
            .pool_idle_timeout(self.idle_timeout)
            .pool_max_idle_per_host(self.max_idle)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(self.connector.clone())
    }
}

/// The pooled client plus what every call needs. Per-call settings (deadlines, retries,
/// the Diia budget) come from the hot settings each call is given.
pub struct Upstream {
    /// The shared runtime's pool.
    client: Pool,
    recipe: PoolRecipe,
    /// A `server.workers` thread's own pool: a connection's task runs on the runtime that
    /// opened it, so a pool shared across worker runtimes would hand each call's I/O to
    /// another thread and back.
    pools: PerThread<Pool>,
    base: String,
    brake: DiiaBrake,
    metrics: Arc<Metrics>,
    /// One breaker per call class (see [`CallClass`]).
    breakers: [Breaker; CallClass::ALL.len()],
    retries: RetryBudget,
    /// Scale-out: the fleet-wide budget and brake (the local ones while Redis is down).
    shared: Option<Arc<Scaleout>>,
}

static ACCEPT_JSON: HeaderValue = HeaderValue::from_static("application/json");

impl Upstream {
    /// Builds the client; Diia's certificate is verified against `upstream.ca_file`, or the
    /// system's plus Mozilla's bundled roots.
    pub fn new(
        cold: &Cold,
        base_url: &str,
        metrics: Arc<Metrics>,
        shared: Option<Arc<Scaleout>>,
    ) -> std::io::Result<Self> {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(cold.connect_timeout));
        http.set_nodelay(true);
        let roots =
            crate::tls::upstream_roots(cold.ca_file.as_deref()).map_err(std::io::Error::other)?;
        let tls = crate::tls::client_config(roots).map_err(std::io::Error::other)?;
        let connector = HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let recipe = PoolRecipe {
            connector,
            idle_timeout: cold.pool_idle_timeout,
            max_idle: cold.pool_max_idle,
        };
        Ok(Self {
            client: recipe.pool(),
            recipe,
            pools: PerThread::new(),
            base: base_url.trim_end_matches('/').to_owned(),
            brake: DiiaBrake::new(),
            metrics,
            breakers: CallClass::ALL
                .map(|_| Breaker::new(cold.breaker_failures, cold.breaker_cooldown)),
            retries: RetryBudget::new(cold.retry_ratio, cold.retry_reserve),
            shared,
        })
    }

    /// Diia's brake (its `Retry-After` pauses), shared by every call.
    #[must_use]
    pub fn brake(&self) -> &DiiaBrake {
        &self.brake
    }

    /// Runs `use_pool` with this thread's pool: its own on a `server.workers` thread
    /// (made on first use), the shared one elsewhere.
    fn with_pool<T>(&self, use_pool: impl FnOnce(&Pool) -> T) -> T {
        if !crate::worker::is_worker() {
            return use_pool(&self.client);
        }
        // A pool left by an ended thread holds connections of its ended runtime: dropped.
        self.pools.with(
            |_left| self.recipe.pool(),
            |pool| use_pool(pool.map_or(&self.client, |pool| &*pool)),
        )
    }

    /// One call to Diia: breaker, then budget, then the exchange under the upstream
    /// deadline; safe calls are retried after a connect failure within the retry budget.
    pub async fn call(&self, hot: &Hot, mut request: UpstreamRequest) -> CallResult {
        let class = CallClass::of(request.endpoint);
        let breaker = &self.breakers[class.index()];
        let admission = breaker
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
        let tunables = &hot.upstream;
        let mut attempt = 0;
        let mut prepaid = request.prepaid.take();
        loop {
            if let Err(error) = self.admit(hot, &request, prepaid.take()).await {
                breaker.abandon(admission);
                return Err(error);
            }
            let outcome = self.attempt(hot, request.clone()).await;
            let unreachable = matches!(outcome, Err(GatewayError::UpstreamUnreachable));
            if retryable && unreachable && attempt < tunables.max_retries && self.retries.withdraw()
            {
                attempt += 1;
                self.metrics.upstream_retry();
                let ceiling = tunables.retry_backoff.saturating_mul(1 << attempt.min(8));
                tokio::time::sleep(ceiling.mul_f64(fastrand::f64())).await;
                continue;
            }
            let failed = AnswerClass::of(&outcome).breaks_circuit();
            breaker.record(admission, !failed);
            self.metrics.set_breaker_open(class, breaker.is_open());
            return outcome;
        }
    }

    /// One call's worth of the Diia budget: the wait already reserved, else the fleet's
    /// budget, else (no scale-out, or Redis down) the local one.
    async fn admit(
        &self,
        hot: &Hot,
        request: &UpstreamRequest,
        prepaid: Option<Duration>,
    ) -> Result<(), GatewayError> {
        if request.unverified {
            // Never the Diia budget (local or the fleet's): the unverified one, at once.
            if let Some(retry_after) = self.brake.paused_for() {
                return Err(GatewayError::DiiaBackoff { retry_after });
            }
            hot.limits.unverified.spend()?;
            // The fleet's brake too (read only after the local budget said yes, so a
            // junk flood costs Redis nothing).
            if let Some(shared) = &self.shared
                && let Some(wait) = shared.braked(hot.limits_config.diia.max_backoff).await
            {
                self.brake.pause(&hot.diia_budget, wait);
                let retry_after = self.brake.paused_for().unwrap_or(wait);
                return Err(GatewayError::DiiaBackoff { retry_after });
            }
            return Ok(());
        }
        let Some(shared) = &self.shared else {
            return self
                .brake
                .acquire(&hot.diia_budget, request.share.as_deref())
                .await;
        };
        if let Some(retry_after) = self.brake.paused_for() {
            return Err(GatewayError::DiiaBackoff { retry_after });
        }
        // The client's share is taken once: before the fleet's budget, or (Redis down) with
        // the local one.
        let mut share = request.share.as_deref();
        let reserved = match prepaid {
            Some(wait) => Some(Ok(wait)),
            None if !shared.link().is_up() => None,
            None => {
                // The client's own share first: a flood waits for its share, not ahead of
                // everyone in the fleet's budget.
                let alone = match share.take() {
                    Some(share) => self.brake.acquire_share(&hot.diia_budget, share).await?,
                    None => false,
                };
                let budget = hot.fleet_budget();
                shared
                    .reserve(if alone { budget.half_deep() } else { budget })
                    .await
            }
        };
        match reserved {
            Some(Ok(wait)) if shared.rejoining() => {
                // Others may still spend their local shares: spend ours as well.
                let started = Instant::now();
                self.brake.acquire(&hot.diia_budget, None).await?;
                pause(wait.saturating_sub(started.elapsed())).await;
                Ok(())
            }
            Some(Ok(wait)) => {
                pause(wait).await;
                Ok(())
            }
            Some(Err(GatewayError::DiiaBackoff { retry_after })) => {
                self.brake.pause(&hot.diia_budget, retry_after);
                Err(GatewayError::DiiaBackoff { retry_after })
            }
            Some(Err(refusal)) => Err(refusal),
            None => {
                let admitted = self.brake.acquire(&hot.diia_budget, share).await;
                if admitted.is_ok() {
                    self.metrics.budget_fallback_admit();
                }
                admitted
            }
        }
    }

    /// One exchange with Diia under the upstream deadline; honours Diia's back-off.
    async fn attempt(&self, hot: &Hot, request: UpstreamRequest) -> CallResult {
        let endpoint = request.endpoint;
        let started = Instant::now();
        let limit = hot.upstream.max_response_body;
        let result =
            tokio::time::timeout(hot.upstream.timeout, self.exchange(request, limit)).await;
        let outcome = result.unwrap_or(Err(GatewayError::UpstreamTimeout));
        let class = AnswerClass::of(&outcome);
        let label = match &outcome {
            Ok(_) => class.label(),
            Err(error) => error.code(),
        };
        self.metrics
            .upstream_call(endpoint, started.elapsed(), label);
        let backoff = outcome
            .as_ref()
            .ok()
            .filter(|_| class.honours_retry_after())
            .and_then(retry_after);
        if let Some(wait) = backoff {
            tracing::warn!(
                wait_ms = wait.as_millis(),
                "Diia asked to back off; pausing upstream calls"
            );
            self.brake.pause(&hot.diia_budget, wait);
            if let Some(shared) = &self.shared {
                let shared = Arc::clone(shared);
                let wait = wait.min(hot.limits_config.diia.max_backoff);
                tokio::spawn(async move { shared.pause(wait).await });
            }
        }
        outcome
    }

    async fn exchange(&self, request: UpstreamRequest, body_limit: usize) -> CallResult {
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
            .with_pool(|pool| pool.request(upstream_request))
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
        let body = Limited::new(body, body_limit)
            .collect()
            .await
            .map_err(|_| GatewayError::UpstreamProtocol)?
            .to_bytes();
        // One owned copy: a slice of hyper's read buffer would keep the whole buffer
        // alive for as long as the answer is cached.
        let kept = |name: &header::HeaderName| parts.headers.get(name).map(HeaderValue::as_bytes);
        Ok(Answer::new(
            parts.status,
            AnswerParts {
                body: &body,
                content_type: kept(&header::CONTENT_TYPE),
                trace_id: kept(&DIIA_TRACE_ID),
                retry_after: kept(&header::RETRY_AFTER),
                location: if parts.status.is_redirection() {
                    kept(&header::LOCATION)
                } else {
                    None
                },
            },
        ))
    }
}

/// Waits out a reserved delay; none at all for a zero one (a zero `sleep` still waits
/// for the timer wheel's next millisecond tick).
async fn pause(wait: Duration) {
    if !wait.is_zero() {
        tokio::time::sleep(wait).await;
    }
}

/// `Retry-After` as delay-seconds; the HTTP-date form is ignored (no known Diia use).
fn retry_after(answer: &Answer) -> Option<Duration> {
    let seconds: u64 = answer.retry_after()?.to_str().ok()?.trim().parse().ok()?;
    (seconds > 0).then(|| Duration::from_secs(seconds))
}
