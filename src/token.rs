//! Managed token mode: the gateway holds the acquirer's secrets, fetches the session token
//! itself (single flight, refreshed before Diia's 2-hour expiry), injects it upstream, and
//! retries a call once after a 401 with a fresh token. Branch backends authenticate to the
//! gateway with per-branch API keys (or mTLS) instead.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwapOption;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use http::{HeaderValue, Method, StatusCode};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::{ApiKeyConfig, SESSION_TOKEN_LIFETIME};
use crate::error::GatewayError;
use crate::route::Endpoint;
use crate::upstream::{Outcome, Upstream, UpstreamRequest};

/// A secret string whose `Debug` never shows it.
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    #[must_use]
    pub fn new(value: String) -> Self {
        Self(value)
    }

    /// The secret itself; for building requests only.
    #[must_use]
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// The session token in use and when to replace it.
struct Current {
    bearer: HeaderValue,
    refresh_at: Instant,
}

/// Holds the acquirer's secrets and the session token.
pub struct TokenManager {
    acquirer_token: Secret,
    auth_token: Option<Secret>,
    margin: Duration,
    current: ArcSwapOption<Current>,
    refresh: tokio::sync::Mutex<()>,
}

impl fmt::Debug for TokenManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TokenManager(<redacted>)")
    }
}

impl TokenManager {
    /// A manager with no token yet; the first call fetches one.
    #[must_use]
    pub fn new(acquirer_token: Secret, auth_token: Option<Secret>, margin: Duration) -> Self {
        Self {
            acquirer_token,
            auth_token,
            margin,
            current: ArcSwapOption::empty(),
            refresh: tokio::sync::Mutex::new(()),
        }
    }

    /// The acquirer identity for cache keys: constant across token refreshes.
    #[must_use]
    pub fn identity(&self) -> &[u8] {
        self.acquirer_token.expose().as_bytes()
    }

    /// A valid `Bearer` header, fetching a session token if none is fresh. Concurrent
    /// callers wait for one exchange (the mutex), never start their own.
    pub async fn bearer(&self, upstream: &Upstream) -> Result<HeaderValue, GatewayError> {
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
        let fresh = self.exchange(upstream).await?;
        let bearer = fresh.bearer.clone();
        self.current.store(Some(Arc::new(fresh)));
        Ok(bearer)
    }

    /// Forgets `bearer` if it is still the current token (after Diia refused it).
    pub fn invalidate(&self, bearer: &HeaderValue) {
        let current = self.current.load_full();
        if current.is_some_and(|c| c.bearer == *bearer) {
            self.current.store(None);
        }
    }

    async fn exchange(&self, upstream: &Upstream) -> Result<Current, GatewayError> {
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
        };
        let answer = upstream.call(request).await?;
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
            serde_json::from_slice(&answer.body).map_err(|_| GatewayError::UpstreamProtocol)?;
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
        let refresh_at = Instant::now() + life.saturating_sub(self.margin);
        tracing::info!(
            refresh_in_s = life.saturating_sub(self.margin).as_secs(),
            "managed session token refreshed"
        );
        Ok(Current { bearer, refresh_at })
    }

    /// Calls Diia with the managed token; after a 401, once more with a fresh token.
    pub async fn call(&self, upstream: &Upstream, mut request: UpstreamRequest) -> Outcome {
        let bearer = self.bearer(upstream).await?;
        request.authorization = Some(bearer.clone());
        let outcome = upstream.call(request.clone()).await;
        if matches!(&outcome, Ok(answer) if answer.status == StatusCode::UNAUTHORIZED) {
            self.invalidate(&bearer);
            let fresh = self.bearer(upstream).await?;
            request.authorization = Some(fresh);
            return upstream.call(request).await;
        }
        outcome
    }
}

/// What a session token's JWT `exp` says about its life (read, never trusted for anything
/// else: Diia checks the signature, we only plan refreshes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenLife {
    /// Not a JWT, or no `exp`: assume Diia's 2 hours.
    Unknown,
    /// Time left, at most Diia's 2 hours.
    Left(Duration),
    /// `exp` is already past (or our clock is ahead).
    Expired,
}

/// Reads the `exp` claim of a session token.
#[must_use]
pub fn token_life(token: &str) -> TokenLife {
    #[derive(Deserialize)]
    struct Claims {
        exp: Option<u64>,
    }
    let exp = token
        .split('.')
        .nth(1)
        .and_then(|payload| URL_SAFE_NO_PAD.decode(payload).ok())
        .and_then(|json| serde_json::from_slice::<Claims>(&json).ok())
        .and_then(|claims| claims.exp);
    let (Some(exp), Ok(now)) = (exp, SystemTime::now().duration_since(UNIX_EPOCH)) else {
        return TokenLife::Unknown;
    };
    match Duration::from_secs(exp).checked_sub(now) {
        Some(left) if !left.is_zero() => TokenLife::Left(left.min(SESSION_TOKEN_LIFETIME)),
        _ => TokenLife::Expired,
    }
}

/// Per-branch API keys, stored as SHA-256 digests and compared in constant time.
pub struct ApiKeys {
    digests: Vec<[u8; 32]>,
}

impl ApiKeys {
    /// From config entries (hex SHA-256 of each key).
    pub fn new(keys: &[ApiKeyConfig]) -> Result<Self, String> {
        let digests = keys
            .iter()
            .map(|key| {
                let bytes = hex::decode(&key.sha256)
                    .map_err(|_| format!("api key '{}': sha256 is not hex", key.branch))?;
                <[u8; 32]>::try_from(bytes)
                    .map_err(|_| format!("api key '{}': sha256 must be 32 bytes", key.branch))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { digests })
    }

    /// Whether `presented` is one of the keys. Every configured digest is compared (no
    /// early exit), each in constant time.
    #[must_use]
    pub fn admits(&self, presented: &[u8]) -> bool {
        let digest: [u8; 32] = Sha256::digest(presented).into();
        let mut found = subtle::Choice::from(0);
        for known in &self.digests {
            found |= known.ct_eq(&digest);
        }
        found.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_keys_match_by_digest() {
        let digest = hex::encode(Sha256::digest(b"branch-key-1"));
        let keys = ApiKeys::new(&[ApiKeyConfig {
            branch: "kyiv-001".to_owned(),
            sha256: digest,
        }])
        .expect("valid");
        assert!(keys.admits(b"branch-key-1"));
        assert!(!keys.admits(b"branch-key-2"));
        assert!(!keys.admits(b""));
        assert!(
            ApiKeys::new(&[ApiKeyConfig {
                branch: "x".to_owned(),
                sha256: "zz".to_owned()
            }])
            .is_err()
        );
    }

    #[test]
    fn secrets_do_not_debug_print() {
        let secret = Secret::new("acquirer_test_token".to_owned());
        assert!(!format!("{secret:?}").contains("acquirer"));
    }
}
