//! Diia's answer as the gateway keeps it, and the one classification of what it means.
//!
//! Every site that asks "did Diia fail?" (cache TTLs, stale-if-error, the breaker, the
//! back-off, the request outcome, the upstream metric) matches [`AnswerClass`]
//! exhaustively, so one definition decides them all.

use bytes::Bytes;
use http::{HeaderValue, StatusCode};

use crate::error::GatewayError;

/// Diia's answer, owned and compact: the status, then the few headers kept
/// (`Content-Type`, `Diia-Trace-Id`, `Retry-After`, `Location`) and the body in one
/// buffer. One allocation per answer, and no slice of a connection's read buffer (which
/// would pin ~8 KiB per cached entry). Shared by every coalesced or cached request.
#[derive(Debug, Clone)]
pub struct Answer {
    /// Diia's status.
    pub status: StatusCode,
    buffer: Bytes,
    /// Where each kept header ends in `buffer`; the body follows the last.
    ends: [u32; KEPT_HEADERS],
}

const KEPT_HEADERS: usize = 4;

/// What an answer is built from.
#[derive(Debug, Default, Clone, Copy)]
pub struct AnswerParts<'a> {
    /// The body, unchanged.
    pub body: &'a [u8],
    /// `Content-Type`.
    pub content_type: Option<&'a [u8]>,
    /// `Diia-Trace-Id`, kept so a cached answer still points at the call that made it.
    pub trace_id: Option<&'a [u8]>,
    /// `Retry-After`, passed on to the client.
    pub retry_after: Option<&'a [u8]>,
    /// `Location` on a redirect, passed on.
    pub location: Option<&'a [u8]>,
}

impl Answer {
    /// Copies the parts into one owned buffer.
    #[must_use]
    pub fn new(status: StatusCode, parts: AnswerParts<'_>) -> Self {
        let headers = [
            parts.content_type,
            parts.trace_id,
            parts.retry_after,
            parts.location,
        ];
        let length = headers.iter().flatten().map(|h| h.len()).sum::<usize>() + parts.body.len();
        let mut buffer = Vec::with_capacity(length);
        let mut ends = [0u32; KEPT_HEADERS];
        for (end, header) in ends.iter_mut().zip(headers) {
            buffer.extend_from_slice(header.unwrap_or_default());
            *end = u32::try_from(buffer.len()).unwrap_or(u32::MAX);
        }
        buffer.extend_from_slice(parts.body);
        Self {
            status,
            buffer: Bytes::from(buffer),
            ends,
        }
    }

    fn part(&self, index: usize) -> Bytes {
        let start = if index == 0 { 0 } else { self.ends[index - 1] };
        let end = self.ends.get(index).copied().unwrap_or(u32::MAX);
        let (start, end) = (start as usize, (end as usize).min(self.buffer.len()));
        self.buffer.slice(start.min(end)..end)
    }

    fn header(&self, index: usize) -> Option<HeaderValue> {
        let value = self.part(index);
        if value.is_empty() {
            return None;
        }
        HeaderValue::from_maybe_shared(value).ok()
    }

    /// The body (a view of the shared buffer, no copy).
    #[must_use]
    pub fn body(&self) -> Bytes {
        let start = self.ends[KEPT_HEADERS - 1] as usize;
        self.buffer.slice(start.min(self.buffer.len())..)
    }

    /// `Content-Type`.
    #[must_use]
    pub fn content_type(&self) -> Option<HeaderValue> {
        self.header(0)
    }

    /// `Diia-Trace-Id`.
    #[must_use]
    pub fn trace_id(&self) -> Option<HeaderValue> {
        self.header(1)
    }

    /// `Retry-After`.
    #[must_use]
    pub fn retry_after(&self) -> Option<HeaderValue> {
        self.header(2)
    }

    /// `Location`.
    #[must_use]
    pub fn location(&self) -> Option<HeaderValue> {
        self.header(3)
    }

    /// The answer as bytes for another instance: status, header ends, buffer.
    #[must_use]
    pub fn to_wire(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(2 + 4 * KEPT_HEADERS + self.buffer.len());
        out.extend_from_slice(&self.status.as_u16().to_be_bytes());
        for end in self.ends {
            out.extend_from_slice(&end.to_be_bytes());
        }
        out.extend_from_slice(&self.buffer);
        out
    }

    /// An answer from [`Answer::to_wire`] bytes; `None` when they are not one.
    #[must_use]
    pub fn from_wire(wire: &[u8]) -> Option<Self> {
        let (status, rest) = wire.split_at_checked(2)?;
        let status = StatusCode::from_u16(u16::from_be_bytes([status[0], status[1]])).ok()?;
        let (ends_bytes, buffer) = rest.split_at_checked(4 * KEPT_HEADERS)?;
        let mut ends = [0u32; KEPT_HEADERS];
        let mut previous = 0;
        for (end, bytes) in ends.iter_mut().zip(ends_bytes.chunks_exact(4)) {
            *end = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
            if *end < previous || *end as usize > buffer.len() {
                return None;
            }
            previous = *end;
        }
        Some(Self {
            status,
            buffer: Bytes::copy_from_slice(buffer),
            ends,
        })
    }

    /// Bytes held beyond the fixed-size struct (for the cache's weigher).
    #[must_use]
    pub fn heap_bytes(&self) -> usize {
        self.buffer.len()
    }
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
    fn wire_form_round_trips_and_refuses_garbage() {
        let answer = Answer::new(
            StatusCode::CONFLICT,
            AnswerParts {
                body: b"{\"x\":1}",
                content_type: Some(b"application/json"),
                trace_id: None,
                retry_after: Some(b"3"),
                location: None,
            },
        );
        let back = Answer::from_wire(&answer.to_wire()).unwrap();
        assert_eq!(back.status, StatusCode::CONFLICT);
        assert_eq!(back.body(), answer.body());
        assert_eq!(back.retry_after(), answer.retry_after());
        assert_eq!(back.trace_id(), None);
        assert!(Answer::from_wire(b"\x01").is_none());
        let mut bad = answer.to_wire();
        bad[5] = 0xff;
        assert!(Answer::from_wire(&bad).is_none());
    }

    #[test]
    fn parts_come_back_out_of_one_buffer() {
        let answer = Answer::new(
            StatusCode::OK,
            AnswerParts {
                body: br#"{"success":true}"#,
                content_type: Some(b"application/json"),
                trace_id: None,
                retry_after: Some(b"3"),
                location: None,
            },
        );
        assert_eq!(answer.body(), &br#"{"success":true}"#[..]);
        assert_eq!(
            answer.content_type(),
            Some(HeaderValue::from_static("application/json"))
        );
        assert_eq!(answer.trace_id(), None);
        assert_eq!(answer.retry_after(), Some(HeaderValue::from_static("3")));
        assert_eq!(answer.location(), None);
        assert_eq!(answer.heap_bytes(), 16 + 16 + 1);
    }

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
