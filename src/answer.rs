//! Diia's answer as the gateway keeps it, and the one classification of what it means.
//!
//! Every site that asks "did Diia fail?" (cache TTLs, stale-if-error, the breaker, the
//! back-off, the request outcome, the upstream metric) matches [`AnswerClass`]
//! exhaustively, so one definition decides them all.

use bytes::Bytes;
use http::{HeaderValue, StatusCode};

use crate::error::GatewayError;

/// Diia's answer, buffered and owned: small, shared by every coalesced or cached request,
/// and holding no slice of a connection's read buffer (which would pin ~8 KiB per entry).
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
    /// Diia's `Location` on a redirect, passed on.
    pub location: Option<HeaderValue>,
}

/// What one upstream call produced: Diia's answer, or why there is none.
pub type CallResult = Result<Answer, GatewayError>;

/// What an upstream call's result means for caching, the breaker and the back-off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnswerClass {
    /// 2xx: Diia answered; cacheable for the positive TTL.
    Ok,
    /// 400/404/409/410/422: a definitive refusal (used, expired, not found, invalid);
    /// cacheable for the negative TTL, never a failure of Diia.
    Definitive,
    /// Any other 1xx/3xx/4xx but 429 (401, 403, 405, a redirect…): passed on, not kept,
    /// not Diia's fault.
    Refused,
    /// 429: Diia asks us to slow down.
    Throttled,
    /// 5xx: Diia failed.
    Failed,
    /// No answer at all: unreachable, timeout, invalid HTTP, or refused before the call
    /// (breaker, budget, back-off).
    NoAnswer,
}

impl AnswerClass {
    /// Classifies one call's result.
    #[must_use]
    pub fn of(result: &CallResult) -> Self {
        match result {
            Ok(answer) => Self::of_status(answer.status),
            Err(_) => Self::NoAnswer,
        }
    }

    /// Classifies a status Diia answered with.
    #[must_use]
    pub fn of_status(status: StatusCode) -> Self {
        match status.as_u16() {
            200..=299 => Self::Ok,
            400 | 404 | 409 | 410 | 422 => Self::Definitive,
            429 => Self::Throttled,
            500..=599 => Self::Failed,
            _ => Self::Refused,
        }
    }

    /// Whether Diia could not serve (what stale-if-error covers).
    #[must_use]
    pub fn diia_could_not_serve(self) -> bool {
        match self {
            Self::Throttled | Self::Failed | Self::NoAnswer => true,
            Self::Ok | Self::Definitive | Self::Refused => false,
        }
    }

    /// Whether this counts against the circuit breaker (Diia broken, not busy).
    #[must_use]
    pub fn breaks_circuit(self) -> bool {
        match self {
            Self::Failed | Self::NoAnswer => true,
            Self::Ok | Self::Definitive | Self::Refused | Self::Throttled => false,
        }
    }

    /// Whether a `Retry-After` on this answer pauses every upstream call.
    #[must_use]
    pub fn honours_retry_after(self) -> bool {
        match self {
            Self::Throttled | Self::Failed => true,
            Self::Ok | Self::Definitive | Self::Refused | Self::NoAnswer => false,
        }
    }

    /// The `result` label of `diia_gateway_upstream_calls_total` (errors use their code).
    #[must_use]
    pub fn label(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Definitive => "definitive",
            Self::Refused => "refused",
            Self::Throttled => "throttled",
            Self::Failed => "failed",
            Self::NoAnswer => "no_answer",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_fall_in_one_class_each() {
        let class = |code| AnswerClass::of_status(StatusCode::from_u16(code).expect("status"));
        assert_eq!(class(200), AnswerClass::Ok);
        assert_eq!(class(204), AnswerClass::Ok);
        for code in [400, 404, 409, 410, 422] {
            assert_eq!(class(code), AnswerClass::Definitive, "{code}");
        }
        for code in [301, 401, 403, 405, 413] {
            assert_eq!(class(code), AnswerClass::Refused, "{code}");
        }
        assert_eq!(class(429), AnswerClass::Throttled);
        for code in [500, 502, 503, 504] {
            assert_eq!(class(code), AnswerClass::Failed, "{code}");
        }
        assert_eq!(
            AnswerClass::of(&Err(GatewayError::UpstreamTimeout)),
            AnswerClass::NoAnswer
        );
        assert!(!AnswerClass::Throttled.breaks_circuit());
        assert!(AnswerClass::Throttled.diia_could_not_serve());
    }
}
