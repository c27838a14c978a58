//! What is cached and for how long: the one place that derives cache keys per endpoint
//! and decides each answer's life.
//!
//! Keys are keyed digests over the caller's identity (the bearer session token, or the
//! acquirer in managed mode), the endpoint and every body field in key order: a key can
//! never match a request of another acquirer, and any field that could change Diia's
//! answer is part of it.

use std::time::Duration;

use serde::Deserialize;

use crate::answer::{Answer, AnswerClass, CallResult};
use crate::diia::{SESSION_TOKEN_LIFETIME, TokenLife, token_life};
use crate::error::GatewayError;
use crate::keys::{CacheKey, HashKey};
use crate::request::{Checked, SharingSubject};
use crate::route::Endpoint;

/// How long answers of one cache live, by what they say.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Policy {
    /// Identification results: positive answers for `ttl`, definitive negatives shorter.
    Verification {
        /// Life of a 2xx answer.
        ttl: Duration,
        /// Life of a 400/404/409/410/422 answer (used, expired, not found, invalid).
        negative_ttl: Duration,
    },
    /// Session tokens: until `margin` before the token's own expiry.
    SessionToken {
        /// Drop the token this long before Diia would.
        margin: Duration,
    },
    /// Sharing requests: every definitive answer is replayed for `ttl`.
    Sharing {
        /// The barcode's remaining life at most.
        ttl: Duration,
    },
}

impl Policy {
    /// What a finished call leaves behind. For sharing, a call whose outcome is unknown
    /// (sent, then no valid answer in time) becomes [`GatewayError::SharingOutcomeUnknown`]:
    /// the consent push may have happened, so it is remembered and never sent again.
    pub fn settle(&self, result: CallResult) -> CallResult {
        match (self, &result) {
            (
                Self::Sharing { .. },
                Err(GatewayError::UpstreamTimeout | GatewayError::UpstreamProtocol),
            ) => Err(GatewayError::SharingOutcomeUnknown),
            _ => result,
        }
    }

    /// How long a result may be kept; `None` means never (5xx, 429, 401, timeouts).
    #[must_use]
    pub fn ttl(&self, result: &CallResult) -> Option<Duration> {
        if let (Self::Sharing { ttl }, Err(GatewayError::SharingOutcomeUnknown)) = (self, result) {
            return Some(*ttl);
        }
        let class = AnswerClass::of(result);
        let answer = result.as_ref().ok()?;
        let ttl = match (*self, class) {
            (_, AnswerClass::Refused | AnswerClass::Throttled)
            | (_, AnswerClass::Failed | AnswerClass::NoAnswer) => return None,
            (Self::Verification { ttl, .. }, AnswerClass::Ok) => ttl,
            (Self::Verification { negative_ttl, .. }, AnswerClass::Definitive) => negative_ttl,
            (Self::SessionToken { margin }, AnswerClass::Ok) if answer.status == 200 => {
                session_token_ttl(answer, margin)?
            }
            (Self::SessionToken { .. }, AnswerClass::Ok | AnswerClass::Definitive) => {
                return None;
            }
            (Self::Sharing { ttl }, AnswerClass::Ok | AnswerClass::Definitive) => ttl,
        };
        (!ttl.is_zero()).then_some(ttl)
    }
}

/// The time a session token may be served from cache: its JWT `exp` (read, not trusted
/// for anything else) minus `margin`, never beyond Diia's 2-hour life minus `margin`.
fn session_token_ttl(answer: &Answer, margin: Duration) -> Option<Duration> {
    #[derive(Deserialize)]
    struct TokenBody<'a> {
        #[serde(borrow)]
        token: std::borrow::Cow<'a, str>,
    }
    let ceiling = SESSION_TOKEN_LIFETIME.checked_sub(margin)?;
    let bytes = answer.body();
    let body: TokenBody<'_> = serde_json::from_slice(&bytes).ok()?;
    match token_life(&body.token) {
        TokenLife::Unknown => Some(ceiling),
        TokenLife::Left(left) => Some(left.checked_sub(margin)?.min(ceiling)),
        TokenLife::Expired => None,
    }
}

/// Which cache a request is answered from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Store {
    /// Identification answers.
    Answers,
    /// Sharing requests (replay, never a second push).
    Sharing,
    /// Session tokens of the token exchange.
    SessionTokens,
}

/// Where a cacheable request lives in its cache.
#[derive(Debug, Clone, Copy)]
pub struct Slot {
    /// Which cache.
    pub store: Store,
    /// The entry's key.
    pub key: CacheKey,
    /// A second key the entry must match (the sharing `requestId`).
    pub tag: Option<CacheKey>,
}

/// The cache slot of a checked request, or `None` when its endpoint is never cached.
/// `identity` is who the answer belongs to (see [`crate::caller::Caller::identity`]);
/// `credentials` is the token exchange's `Authorization` header.
#[must_use]
pub fn slot_for(
    keys: &HashKey,
    endpoint: Endpoint,
    identity: &[u8],
    checked: &Checked<'_>,
    credentials: &[u8],
) -> Option<Slot> {
    let untagged = |store, key| {
        Some(Slot {
            store,
            key,
            tag: None,
        })
    };
    match checked {
        Checked::TokenExchange { acquirer_token } => untagged(
            Store::SessionTokens,
            keys.key("session-token")
                .part(acquirer_token.as_bytes())
                .part(credentials)
                .finish(),
        ),
        Checked::Identification { body, .. } => {
            let mut key = keys.key("answer");
            key.part(identity).part(endpoint.label().as_bytes());
            body.key_into(&mut key);
            untagged(Store::Answers, key.finish())
        }
        Checked::Sharing {
            subject,
            request_id,
            ..
        } => {
            let mut key = keys.key("sharing");
            key.part(identity);
            match subject {
                SharingSubject::Barcode(barcode) => {
                    key.part(b"barcode").part(&barcode.as_u64().to_le_bytes())
                }
                SharingSubject::Qrcode(code) => key.part(b"qrcode").part(code.as_bytes()),
            };
            let tag = keys
                .key("sharing-request")
                .part(request_id.as_bytes())
                .finish();
            Some(Slot {
                store: Store::Sharing,
                key: key.finish(),
                tag: Some(tag),
            })
        }
        Checked::Status { .. } | Checked::OfferStatus { .. } | Checked::Forward { .. } => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::answer::AnswerParts;
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use http::StatusCode;
    use std::time::{SystemTime, UNIX_EPOCH};

    fn answer(status: u16, body: &str) -> CallResult {
        Ok(Answer::new(
            StatusCode::from_u16(status).expect("status"),
            AnswerParts {
                body: body.as_bytes(),
                ..AnswerParts::default()
            },
        ))
    }

    #[test]
    fn verification_policy_keeps_only_definitive_answers() {
        let policy = Policy::Verification {
            ttl: Duration::from_secs(60),
            negative_ttl: Duration::from_secs(10),
        };
        assert_eq!(
            policy.ttl(&answer(200, "{}")),
            Some(Duration::from_secs(60))
        );
        assert_eq!(
            policy.ttl(&answer(400, "{}")),
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            policy.ttl(&answer(404, "{}")),
            Some(Duration::from_secs(10))
        );
        for status in [401, 403, 429, 500, 502, 503, 504] {
            assert_eq!(policy.ttl(&answer(status, "{}")), None, "{status}");
        }
        assert_eq!(policy.ttl(&Err(GatewayError::UpstreamTimeout)), None);
    }

    #[test]
    fn an_unknown_sharing_outcome_is_remembered() {
        let sharing = Policy::Sharing {
            ttl: Duration::from_secs(180),
        };
        for unknown in [
            GatewayError::UpstreamTimeout,
            GatewayError::UpstreamProtocol,
        ] {
            let settled = sharing.settle(Err(unknown));
            assert_eq!(
                settled.as_ref().err(),
                Some(&GatewayError::SharingOutcomeUnknown)
            );
            assert_eq!(sharing.ttl(&settled), Some(Duration::from_secs(180)));
        }
        // Never sent: a retry may push.
        let unsent = sharing.settle(Err(GatewayError::UpstreamUnreachable));
        assert_eq!(sharing.ttl(&unsent), None);
        let verification = Policy::Verification {
            ttl: Duration::from_secs(60),
            negative_ttl: Duration::from_secs(10),
        };
        let timeout = verification.settle(Err(GatewayError::UpstreamTimeout));
        assert_eq!(verification.ttl(&timeout), None);
    }

    #[test]
    fn session_token_ttl_follows_the_jwt_exp() {
        let margin = Duration::from_secs(300);
        let policy = Policy::SessionToken { margin };
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .as_secs();
        let payload = URL_SAFE_NO_PAD.encode(format!(r#"{{"exp":{}}}"#, now + 1000));
        let body = format!(r#"{{"token":"h.{payload}.s"}}"#);
        let ttl = policy.ttl(&answer(200, &body)).expect("cacheable");
        assert!(
            ttl <= Duration::from_secs(700) && ttl >= Duration::from_secs(690),
            "{ttl:?}"
        );
        let opaque = policy
            .ttl(&answer(200, r#"{"token":"opaque"}"#))
            .expect("cacheable");
        assert_eq!(opaque, SESSION_TOKEN_LIFETIME - margin);
        let expired = URL_SAFE_NO_PAD.encode(format!(r#"{{"exp":{}}}"#, now + 10));
        assert_eq!(
            policy.ttl(&answer(200, &format!(r#"{{"token":"h.{expired}.s"}}"#))),
            None
        );
        assert_eq!(policy.ttl(&answer(401, "{}")), None);
    }
}
