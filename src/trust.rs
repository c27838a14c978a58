//! Pass-through session tokens as Diia judged them: refused (401) a moment ago, accepted
//! (a 2xx) for the token's life, or not yet seen. Only keyed digests of tokens are kept.
//!
//! Invariant: a token Diia has not accepted never spends the Diia budget. Its calls spend
//! `limits.unverified` (all clients together), and a token Diia refused is answered 401
//! locally for `tokens.refused_ttl`: junk bearer tokens from any number of addresses reach
//! Diia at the unverified rate at most, and cannot starve callers whose tokens work.
//!
//! Logins (the token exchange, which needs no authentication) are judged the same way,
//! by their (acquirer token, credentials) pair: a pair that never had a 2xx spends
//! `limits.unverified`, never the Diia budget nor a client's share of it; a pair Diia
//! refused (401/403) is answered 401 `credentials_refused` locally for
//! `tokens.refused_ttl`; a pair that had a 2xx is verified while it keeps logging in.
//!
//! It also remembers, for each session token its own token exchange handed out, which
//! login it came from ([`LoginId`]: a digest of the acquirer token), so the callback relay
//! can hand a package routed under one session token to the same SDK after it logged in
//! again (a new token for the same acquirer token). Tokens this instance did not hand out
//! have no login.
//!
//! With `[scaleout]` each instance keeps its own sets: a token verified through one
//! instance starts unverified on another until its first 2xx there (one call from the
//! unverified budget), which costs less than a Redis round trip on every call.

use std::time::Duration;

use crate::answer::CallResult;
use crate::diia::SESSION_TOKEN_LIFETIME;
use crate::keys::{CacheKey, HashKey};

/// Tokens verified and refused, by keyed digest.
pub struct TokenTrust {
    keys: HashKey,
    verified: moka::sync::Cache<CacheKey, ()>,
    refused: moka::sync::Cache<CacheKey, ()>,
    /// Login pairs (the token cache's keys) Diia answered a 2xx, kept while they log in.
    verified_logins: moka::sync::Cache<CacheKey, ()>,
    /// Login pairs Diia refused with 401 or 403 within `refused_ttl`.
    refused_logins: moka::sync::Cache<CacheKey, ()>,
    /// Session tokens the token exchange handed out, and the login each came from, for a
    /// session token's life (or until Diia refuses the token).
    issued_for: moka::sync::Cache<CacheKey, LoginId>,
}

/// The login a session token was handed out for: the SHA-256 of the acquirer token it was
/// exchanged for (never the token itself). Unkeyed, so every instance and every restart
/// names a login alike (it is only ever stored sealed, in relay routes).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct LoginId([u8; 32]);

impl std::fmt::Debug for LoginId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LoginId(<redacted>)")
    }
}

impl LoginId {
    /// The login of `acquirer_token` (the path segment of the token exchange, as sent).
    #[must_use]
    pub fn of(acquirer_token: &[u8]) -> Self {
        use sha2::Digest;
        Self(sha2::Sha256::digest(acquirer_token).into())
    }

    /// How a relay route names it (`login:` and the digest in hex).
    #[must_use]
    pub fn relay_owner(&self) -> String {
        format!("login:{}", hex::encode(self.0))
    }
}

/// How long a login pair stays verified without logging in again: a working acquirer
/// logs in every session-token life (2 h); a day leaves room for quiet nights.
const VERIFIED_LOGIN_IDLE: Duration = Duration::from_secs(24 * 60 * 60);

/// Where a call's session token stands with Diia.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// Diia answered a 2xx to it (or the gateway handed it out): the Diia budget.
    Verified,
    /// Not judged yet: the unverified budget.
    Unverified,
    /// Diia refused it with 401 within `tokens.refused_ttl`: answered 401 locally.
    Refused,
}

impl TokenTrust {
    /// Empty sets; refused tokens are remembered for `refused_ttl`.
    #[must_use]
    pub fn new(keys: HashKey, refused_ttl: Duration, max_tracked: u64) -> Self {
        Self {
            keys,
            verified: moka::sync::Cache::builder()
                .max_capacity(max_tracked.max(1))
                .time_to_live(SESSION_TOKEN_LIFETIME)
                .build(),
            refused: moka::sync::Cache::builder()
                .max_capacity(max_tracked.max(1))
                .time_to_live(refused_ttl)
                .build(),
            verified_logins: moka::sync::Cache::builder()
                .max_capacity(max_tracked.max(1))
                .time_to_idle(VERIFIED_LOGIN_IDLE)
                .build(),
            refused_logins: moka::sync::Cache::builder()
                .max_capacity(max_tracked.max(1))
                .time_to_live(refused_ttl)
                .build(),
            issued_for: moka::sync::Cache::builder()
                .max_capacity(max_tracked.max(1))
                .time_to_live(SESSION_TOKEN_LIFETIME)
                .build(),
        }
    }

    /// The keyed digest a token is remembered by.
    #[must_use]
    pub fn digest(&self, token: &[u8]) -> CacheKey {
        self.keys.key("trusted-token").part(token).finish()
    }

    /// Where `token` stands now.
    #[must_use]
    pub fn standing(&self, token: CacheKey) -> Standing {
        if self.refused.contains_key(&token) {
            Standing::Refused
        } else if self.verified.contains_key(&token) {
            Standing::Verified
        } else {
            Standing::Unverified
        }
    }

    /// A token the gateway handed out itself (a 200 of the token exchange), for the login
    /// of `acquirer_token`.
    pub fn issued(&self, token: &[u8], acquirer_token: &[u8]) {
        let digest = self.digest(token);
        self.verified.insert(digest, ());
        self.issued_for.insert(digest, LoginId::of(acquirer_token));
    }

    /// The login `token` was handed out for by this instance's token exchange; `None` for
    /// a token it did not hand out (or no longer remembers, or Diia refused since).
    #[must_use]
    pub fn login_of(&self, token: &[u8]) -> Option<LoginId> {
        self.issued_for.get(&self.digest(token))
    }

    /// Learns from Diia's answer to a call made with `token`: a 2xx verifies it, a 401
    /// refuses it (and forgets that it was verified).
    pub fn settle(&self, token: CacheKey, result: &CallResult) {
        let Ok(answer) = result else {
            return;
        };
        if answer.status.is_success() {
            if !self.verified.contains_key(&token) {
                self.verified.insert(token, ());
            }
        } else if answer.status == http::StatusCode::UNAUTHORIZED {
            self.verified.invalidate(&token);
            self.issued_for.invalidate(&token);
            self.refused.insert(token, ());
        }
    }

    /// Where a login pair (the token cache's key for an acquirer token and credentials)
    /// stands now.
    #[must_use]
    pub fn login_standing(&self, pair: CacheKey) -> Standing {
        if self.refused_logins.contains_key(&pair) {
            Standing::Refused
        } else if self.verified_logins.contains_key(&pair) {
            Standing::Verified
        } else {
            Standing::Unverified
        }
    }

    /// Learns from Diia's answer to a login: a 2xx verifies the pair; a 401 or 403 (these
    /// credentials are wrong) refuses it. Anything else (a 5xx, a timeout) says nothing
    /// about the credentials.
    pub fn settle_login(&self, pair: CacheKey, result: &CallResult) {
        let Ok(answer) = result else {
            return;
        };
        if answer.status.is_success() {
            // Touched on each login, so a pair in use stays verified.
            self.verified_logins.insert(pair, ());
        } else if refuses_login(answer.status) {
            self.verified_logins.invalidate(&pair);
            self.refused_logins.insert(pair, ());
        }
    }
}

/// Whether Diia's answer to a login says the credentials are wrong (as opposed to Diia
/// failing): 401 or 403 only.
#[must_use]
pub fn refuses_login(status: http::StatusCode) -> bool {
    matches!(
        status,
        http::StatusCode::UNAUTHORIZED | http::StatusCode::FORBIDDEN
    )
}

#[cfg(test)]
mod tests {
    use http::StatusCode;

    use super::*;
    use crate::answer::{Answer, AnswerParts};
    use crate::error::GatewayError;

    fn answered(status: StatusCode) -> CallResult {
        Ok(Answer::new(status, AnswerParts::default()))
    }

    #[test]
    fn only_401_and_403_refuse_a_login_pair() {
        let keys = HashKey::fixed([3; 16]);
        let trust = TokenTrust::new(keys.clone(), Duration::from_secs(60), 100);
        let pair = |n: u8| keys.key("pair").part(&[n]).finish();
        trust.settle_login(pair(1), &answered(StatusCode::INTERNAL_SERVER_ERROR));
        trust.settle_login(pair(1), &Err(GatewayError::UpstreamTimeout));
        assert_eq!(trust.login_standing(pair(1)), Standing::Unverified);
        trust.settle_login(pair(1), &answered(StatusCode::OK));
        assert_eq!(trust.login_standing(pair(1)), Standing::Verified);
        trust.settle_login(pair(2), &answered(StatusCode::FORBIDDEN));
        assert_eq!(trust.login_standing(pair(2)), Standing::Refused);
        // A verified pair Diia refuses later is refused; the others are untouched.
        trust.settle_login(pair(1), &answered(StatusCode::UNAUTHORIZED));
        assert_eq!(trust.login_standing(pair(1)), Standing::Refused);
        assert_eq!(trust.login_standing(pair(3)), Standing::Unverified);
        // Login pairs and session tokens are separate sets.
        assert_eq!(trust.standing(pair(1)), Standing::Unverified);
    }

    #[test]
    fn an_issued_token_names_its_login_until_diia_refuses_it() {
        let trust = TokenTrust::new(HashKey::fixed([5; 16]), Duration::from_secs(60), 100);
        trust.issued(b"token-1", b"acquirer-a");
        trust.issued(b"token-2", b"acquirer-a");
        trust.issued(b"token-3", b"acquirer-b");
        let login = |token: &[u8]| trust.login_of(token);
        assert_eq!(login(b"token-1"), Some(LoginId::of(b"acquirer-a")));
        assert_eq!(login(b"token-1"), login(b"token-2"));
        assert_ne!(login(b"token-1"), login(b"token-3"));
        assert_eq!(login(b"never-issued"), None);
        assert!(!format!("{:?}", login(b"token-1")).contains("acquirer"));
        assert!(
            !LoginId::of(b"acquirer-a")
                .relay_owner()
                .contains("acquirer-a")
        );
        trust.settle(
            trust.digest(b"token-1"),
            &answered(StatusCode::UNAUTHORIZED),
        );
        assert_eq!(login(b"token-1"), None);
    }
}
