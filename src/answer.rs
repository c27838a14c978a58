//! Diia's answer as the gateway keeps it, and the one classification of what it means.
//!
//! Every site that asks "did Diia fail?" (cache TTLs, stale-if-error, the breaker, the
//! back-off, the request outcome, the upstream metric) matches [`AnswerClass`]
//! exhaustively, so one definition decides them all.

use bytes::Bytes;
use http::{HeaderValue, StatusCode};

use crate::error::GatewayError;

/// Diia's answer, owned and compact: the status, then the few headers kept
/// (`Content-Type`, `Diia-Trace-Id`, `Retry-After`, `Location`) already rendered as
/// HTTP/1.1 header lines (with `Content-Length`), and the body, in one buffer. One
/// allocation per answer, no slice of a connection's read buffer (which would pin ~8 KiB
/// per cached entry), and a hit is written to an HTTP/1.1 client by copying the rendered
/// head and the body (see [`crate::h1`]). Shared by every coalesced or cached request.
#[derive(Debug, Clone)]
pub struct Answer {
    /// Diia's status.
    pub status: StatusCode,
    buffer: Bytes,
    /// Where each kept header's value lies in `buffer` (empty: absent).
    values: [(u32, u32); KEPT_HEADERS],
    /// Where the rendered head ends and the body starts.
    head_end: u32,
}

const KEPT_HEADERS: usize = 4;

/// The kept headers' names, in the order of [`Answer::values`].
const KEPT_NAMES: [&[u8]; KEPT_HEADERS] = [
    b"content-type",
    b"diia-trace-id",
    b"retry-after",
    b"location",
];

/// What an answer without a `Content-Type` is sent with.
const DEFAULT_CONTENT_TYPE: &[u8] = b"application/json";

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
    /// Copies the parts into one owned buffer, rendering the head on the way.
    #[must_use]
    pub fn new(status: StatusCode, parts: AnswerParts<'_>) -> Self {
        let headers = [
            parts.content_type,
            parts.trace_id,
            parts.retry_after,
            parts.location,
        ];
        let mut length_digits = itoa::Buffer::new();
        let length_digits = length_digits.format(parts.body.len()).as_bytes();
        let head_length = headers
            .iter()
            .zip(KEPT_NAMES)
            .enumerate()
            .map(|(index, (value, name))| match value {
                Some(value) => name.len() + 4 + value.len(),
                None if index == 0 => name.len() + 4 + DEFAULT_CONTENT_TYPE.len(),
                None => 0,
            })
            .sum::<usize>()
            + 18
            + length_digits.len();
        let mut buffer = Vec::with_capacity(head_length + parts.body.len());
        let mut values = [(0u32, 0u32); KEPT_HEADERS];
        for (index, (span, value)) in values.iter_mut().zip(headers).enumerate() {
            let rendered = match value {
                Some(value) => value,
                None if index == 0 => DEFAULT_CONTENT_TYPE,
                None => continue,
            };
            buffer.extend_from_slice(KEPT_NAMES[index]);
            buffer.extend_from_slice(b": ");
            let start = offset(buffer.len());
            buffer.extend_from_slice(rendered);
            if value.is_some() {
                *span = (start, offset(buffer.len()));
            }
            buffer.extend_from_slice(b"\r\n");
        }
        if has_body(status) {
            buffer.extend_from_slice(b"content-length: ");
            buffer.extend_from_slice(length_digits);
            buffer.extend_from_slice(b"\r\n");
        }
        let head_end = offset(buffer.len());
        buffer.extend_from_slice(parts.body);
        Self {
            status,
            buffer: Bytes::from(buffer),
            values,
            head_end,
        }
    }

    fn value(&self, index: usize) -> Option<&[u8]> {
        let (start, end) = self.values.get(index).copied()?;
        let value = self.buffer.get(start as usize..end as usize)?;
        (!value.is_empty()).then_some(value)
    }

    fn header(&self, index: usize) -> Option<HeaderValue> {
        let (start, end) = self.values.get(index).copied()?;
        if start == end {
            return None;
        }
        let (start, end) = (start as usize, (end as usize).min(self.buffer.len()));
        HeaderValue::from_maybe_shared(self.buffer.slice(start.min(end)..end)).ok()
    }

    /// The body (a view of the shared buffer, no copy).
    #[must_use]
    pub fn body(&self) -> Bytes {
        let start = (self.head_end as usize).min(self.buffer.len());
        self.buffer.slice(start..)
    }

    /// The kept headers and `Content-Length` as HTTP/1.1 header lines, each ending in
    /// CRLF; what the hit fast path writes after the status line.
    #[must_use]
    pub fn rendered_head(&self) -> &[u8] {
        let end = (self.head_end as usize).min(self.buffer.len());
        &self.buffer[..end]
    }

    /// The body as a borrowed slice.
    #[must_use]
    pub fn body_bytes(&self) -> &[u8] {
        let start = (self.head_end as usize).min(self.buffer.len());
        &self.buffer[start..]
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

    /// The answer as bytes for another instance: status, then each kept header and the
    /// body as length-prefixed parts (independent of the rendered layout).
    #[must_use]
    pub fn to_wire(&self) -> Vec<u8> {
        let body = self.body_bytes();
        let mut out = Vec::with_capacity(2 + 4 * (KEPT_HEADERS + 1) + self.buffer.len());
        out.extend_from_slice(&self.status.as_u16().to_be_bytes());
        for index in 0..KEPT_HEADERS {
            let value = self.value(index).unwrap_or_default();
            out.extend_from_slice(&offset(value.len()).to_be_bytes());
            out.extend_from_slice(value);
        }
        out.extend_from_slice(body);
        out
    }

    /// An answer from [`Answer::to_wire`] bytes; `None` when they are not one.
    #[must_use]
    pub fn from_wire(wire: &[u8]) -> Option<Self> {
        let (status, mut rest) = wire.split_at_checked(2)?;
        let status = StatusCode::from_u16(u16::from_be_bytes([status[0], status[1]])).ok()?;
        let mut values: [Option<&[u8]>; KEPT_HEADERS] = [None; KEPT_HEADERS];
        for value in &mut values {
            let (length, tail) = rest.split_at_checked(4)?;
            let length = u32::from_be_bytes([length[0], length[1], length[2], length[3]]);
            let (bytes, tail) = tail.split_at_checked(length as usize)?;
            if HeaderValue::from_bytes(bytes).is_err() {
                return None;
            }
            *value = (!bytes.is_empty()).then_some(bytes);
            rest = tail;
        }
        let [content_type, trace_id, retry_after, location] = values;
        Some(Self::new(
            status,
            AnswerParts {
                body: rest,
                content_type,
                trace_id,
                retry_after,
                location,
            },
        ))
    }

    /// Bytes held beyond the fixed-size struct (for the cache's weigher).
    #[must_use]
    pub fn heap_bytes(&self) -> usize {
        self.buffer.len()
    }
}

/// Whether a response with this status carries a body (and so a `Content-Length`).
#[must_use]
pub fn has_body(status: StatusCode) -> bool {
    !(status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED)
}

/// A buffer offset as stored (answers are far below 4 GiB; larger saturates).
fn offset(position: usize) -> u32 {
    u32::try_from(position).unwrap_or(u32::MAX)
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
        let mut control = answer.to_wire();
        // content-type's first byte: a control character is no header value.
        control[6] = 0x01;
        assert!(Answer::from_wire(&control).is_none());
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
        assert_eq!(
            answer.rendered_head(),
            &b"content-type: application/json\r\nretry-after: 3\r\ncontent-length: 16\r\n"[..]
        );
        assert_eq!(answer.body_bytes(), &br#"{"success":true}"#[..]);
    }

    #[test]
    fn rendered_head_defaults_the_content_type_and_skips_length_without_body() {
        let answer = Answer::new(StatusCode::NO_CONTENT, AnswerParts::default());
        assert_eq!(answer.content_type(), None);
        assert_eq!(
            answer.rendered_head(),
            &b"content-type: application/json\r\n"[..]
        );
        let answer = Answer::new(
            StatusCode::OK,
            AnswerParts {
                body: b"{}",
                trace_id: Some(b"t-1"),
                location: Some(b"/x"),
                ..AnswerParts::default()
            },
        );
        assert_eq!(
            answer.rendered_head(),
            &b"content-type: application/json\r\ndiia-trace-id: t-1\r\nlocation: /x\r\ncontent-length: 2\r\n"[..]
        );
        assert_eq!(answer.trace_id(), Some(HeaderValue::from_static("t-1")));
        let back = Answer::from_wire(&answer.to_wire()).unwrap();
        assert_eq!(back.rendered_head(), answer.rendered_head());
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
