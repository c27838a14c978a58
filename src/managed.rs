//! Managed token mode: the gateway holds the acquirer's secrets, fetches the session token
//! itself (single flight, refreshed before Diia's 2-hour expiry), injects it upstream, and
//! retries a call once after a 401 with a fresh token. Branch backends authenticate to the
//! gateway instead (see [`crate::caller`]).

use std::fmt;
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http::{HeaderValue, Method, StatusCode};
use serde::Deserialize;

use crate::answer::CallResult;
use crate::cache::Origin;
use crate::diia::{SESSION_TOKEN_LIFETIME, TokenLife, token_life};
use crate::error::GatewayError;
use crate::keys::{CacheKey, Secret};
use crate::route::Endpoint;
use crate::scaleout::{Scaleout, Shape};
use crate::settings::{AcquirerCredentials, Hot};
use crate::upstream::{Upstream, UpstreamRequest};

/// The session token in use and when to replace it.
struct Current {
    bearer: HeaderValue,
    refresh_at: Instant,
}

/// Holds the acquirer's secrets and the session token.
pub struct ManagedSession {
    acquirer_token: Secret,
    auth_token: Option<Secret>,
    current: ArcSwapOption<Current>,
    refresh: tokio::sync::Mutex<()>,
    /// Scale-out: logins go through the fleet (one per refresh for every instance), under
    /// this key.
    login: Option<(Arc<Scaleout>, CacheKey)>,
}

impl fmt::Debug for ManagedSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ManagedSession(<redacted>)")
    }
}

impl ManagedSession {
    /// A manager with no token yet; the first call fetches one.
    #[must_use]
    pub fn new(
        credentials: &AcquirerCredentials,
        login: Option<(Arc<Scaleout>, CacheKey)>,
    ) -> Self {
        Self {
            acquirer_token: credentials.acquirer_token.clone(),
            auth_token: credentials.auth_token.clone(),
            current: ArcSwapOption::empty(),
            refresh: tokio::sync::Mutex::new(()),
            login,
        }
    }

    /// The acquirer identity for cache keys: constant across token refreshes.
    #[must_use]
    pub fn identity(&self) -> &[u8] {
        self.acquirer_token.expose().as_bytes()
    }

    /// A valid `Bearer` header, fetching a session token if none is fresh. Concurrent
    /// callers wait for one exchange (the mutex), never start their own.
    pub async fn bearer(
        &self,
        hot: &Hot,
        upstream: &Upstream,
    ) -> Result<HeaderValue, GatewayError> {
        if let Some(current) = self.current.load_full()
            && Instant::now() < current.refresh_at
        {
            return Ok(current.bearer.clone());
        }
        let _single_flight = self.refresh.lock().await;
        if let Some(current) = self.current.load_full()
            && Instant::now() < current.refresh_at
        {
            return Ok(current.bearer.clone());
        }
        let fresh = self.exchange(hot, upstream).await?;
        let bearer = fresh.bearer.clone();
        self.current.store(Some(Arc::new(fresh)));
        Ok(bearer)
    }

    /// Forgets `bearer` if it is still the current token (after Diia refused it).
    pub fn invalidate(&self, bearer: &HeaderValue) {
        let current = self.current.load_full();
        if current.is_some_and(|c| c.bearer == *bearer) {
            self.current.store(None);
            if let Some((fleet, key)) = &self.login {
                let (fleet, key) = (Arc::clone(fleet), *key);
                tokio::spawn(async move { fleet.forget(key).await });
            }
        }
    }

    async fn exchange(&self, hot: &Hot, upstream: &Upstream) -> Result<Current, GatewayError> {
        let authorization = match &self.auth_token {
            Some(auth) => Some(
                HeaderValue::try_from(format!("Basic {}", auth.expose()))
                    .map_err(|_| GatewayError::Internal)?,
            ),
            None => None,
        };
        let request = UpstreamRequest {
            endpoint: Endpoint::TokenExchange,
            method: Method::GET,
            path_and_query: format!("/api/v1/auth/acquirer/{}", self.acquirer_token.expose()),
            authorization,
            trace_id: None,
            content_type: None,
            body: Bytes::new(),
            share: None,
            prepaid: None,
            unverified: false,
        };
        let (answer, fleet_fresh) = match &self.login {
            None => (upstream.call(hot, request).await?, None),
            Some((fleet, key)) => {
                let shape = Shape {
                    policy: hot.session_tokens,
                    budget: hot.fleet_budget(),
                    longest_call: hot.upstream.longest_call(),
                    sharing: false,
                    share: None,
                    unverified: false,
                };
                let fetched = Arc::clone(fleet)
                    .fetch(*key, None, shape, |prepaid| {
                        let mut request = request;
                        request.prepaid = prepaid;
                        upstream.call(hot, request)
                    })
                    .await;
                let fresh = match fetched.origin {
                    Origin::RemoteHit { fresh_for } => Some(fresh_for),
                    Origin::RemoteWait { fresh_for } => fresh_for,
                    Origin::Diia => None,
                };
                (fetched.result?, fresh)
            }
        };
        if answer.status != StatusCode::OK {
            tracing::error!(
                status = answer.status.as_u16(),
                "Diia refused the managed acquirer token"
            );
            return Err(GatewayError::UpstreamAuth);
        }
        #[derive(Deserialize)]
        struct TokenBody {
            token: String,
        }
        let body: TokenBody =
            serde_json::from_slice(&answer.body()).map_err(|_| GatewayError::UpstreamProtocol)?;
        let bearer = HeaderValue::try_from(format!("Bearer {}", body.token))
            .map_err(|_| GatewayError::UpstreamProtocol)?;
        let life = match token_life(&body.token) {
            TokenLife::Left(left) => left,
            TokenLife::Unknown => SESSION_TOKEN_LIFETIME,
            TokenLife::Expired => {
                // A fresh token that looks expired means clock skew; Diia's 2 h is the
                // best guess, and a 401 still triggers a refresh.
                tracing::warn!("fresh session token looks expired; check the clock");
                SESSION_TOKEN_LIFETIME
            }
        };
        // Another instance's token: the fleet entry's life already has the margin off.
        let refresh_in = fleet_fresh.unwrap_or_else(|| life.saturating_sub(hot.refresh_margin));
        let refresh_at = Instant::now() + refresh_in;
        tracing::info!(
            refresh_in_s = refresh_in.as_secs(),
            "managed session token refreshed"
        );
        Ok(Current { bearer, refresh_at })
    }

    /// Calls Diia with the managed token; after a 401, once more with a fresh token.
    pub async fn call(
        &self,
        hot: &Hot,
        upstream: &Upstream,
        mut request: UpstreamRequest,
    ) -> CallResult {
        let bearer = self.bearer(hot, upstream).await?;
        request.authorization = Some(bearer.clone());
        let result = upstream.call(hot, request.clone()).await;
        if matches!(&result, Ok(answer) if answer.status == StatusCode::UNAUTHORIZED) {
            self.invalidate(&bearer);
            let fresh = self.bearer(hot, upstream).await?;
            request.authorization = Some(fresh);
            return upstream.call(hot, request).await;
        }
        result
    }
}
