//! What one delivery attempt's answer means, and when the next attempt is due: the pure
//! rules of push delivery, apart from sockets and the store.

use std::time::{Duration, SystemTime};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use http::StatusCode;

/// How one attempt ended (the `outcome` of the attempt counters).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attempt {
    /// A 2xx whose body is not `{"success":false}`.
    Delivered,
    /// A 2xx whose body is `{"success":false}`: the receiver refused it; retried.
    Rejected,
    /// 429 or 503: retried after `Retry-After` when given (capped), else per the schedule.
    Throttled(Option<Duration>),
    /// 410: the branch says it will never take it; dead at once.
    Gone,
    /// Any other status; retried per the schedule.
    Failed(StatusCode),
    /// No answer within `delivery_timeout`.
    Timeout,
    /// Connect, TLS or protocol failure.
    Transport,
}

impl Attempt {
    /// Whether the target looked down (opens its breaker): transport errors, timeouts,
    /// 5xx and 429. A 4xx or a refusal means the branch is up and answering.
    #[must_use]
    pub fn is_outage(self) -> bool {
        match self {
            Self::Timeout | Self::Transport | Self::Throttled(_) => true,
            Self::Failed(status) => status.is_server_error(),
            Self::Delivered | Self::Rejected | Self::Gone => false,
        }
    }
}

/// Classifies a status and (for 2xx) the first bytes of the body. `retry_after` is the
/// parsed header, used for 429 and 503 only.
#[must_use]
pub fn classify(status: StatusCode, body: &[u8], retry_after: Option<Duration>) -> Attempt {
    if status.is_success() {
        return if refused(body) {
            Attempt::Rejected
        } else {
            Attempt::Delivered
        };
    }
    match status {
        StatusCode::GONE => Attempt::Gone,
        StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE => {
            Attempt::Throttled(retry_after)
        }
        other => Attempt::Failed(other),
    }
}

/// Whether a 2xx body says `{"success":false}`, however spelled (whitespace, key order,
/// other keys): a JSON object whose `success` is `false`. Anything else is success.
#[must_use]
pub fn refused(body: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(body).is_ok_and(|answer| {
        answer
            .as_object()
            .and_then(|fields| fields.get("success"))
            .is_some_and(|success| *success == serde_json::Value::Bool(false))
    })
}

/// `Retry-After` as delay-seconds or an HTTP-date (past dates are zero), capped at `cap`.
#[must_use]
pub fn retry_after(value: &[u8], now: SystemTime, cap: Duration) -> Option<Duration> {
    let text = std::str::from_utf8(value).ok()?.trim();
    let wait = match text.parse::<u64>() {
        Ok(seconds) => Duration::from_secs(seconds),
        Err(_) => {
            let at = httpdate::parse_http_date(text).ok()?;
            at.duration_since(now).unwrap_or(Duration::ZERO)
        }
    };
    Some(wait.min(cap))
}

/// How the schedule's pauses are randomised, so records that failed together do not
/// return together.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Jitter {
    /// Uniform in `[0, pause]` ("full jitter").
    Full,
    /// Uniform in `pause ± 20%`.
    Proportional,
    /// None (the exact pause).
    None,
}

impl Jitter {
    /// A pause randomised.
    #[must_use]
    pub fn apply(self, pause: Duration) -> Duration {
        let ms = u64::try_from(pause.as_millis()).unwrap_or(u64::MAX);
        let ms = match self {
            Self::Full => fastrand::u64(0..=ms),
            Self::Proportional => {
                let spread = ms / 5;
                fastrand::u64(ms - spread..=ms.saturating_add(spread))
            }
            Self::None => ms,
        };
        Duration::from_millis(ms)
    }
}

/// The pause after the `attempts`-th attempt failed: the schedule's entry for it, the last
/// entry repeating (one second if the schedule is empty).
#[must_use]
pub fn pause_after(schedule: &[Duration], attempts: u32) -> Duration {
    let index = usize::try_from(attempts.saturating_sub(1)).unwrap_or(usize::MAX);
    schedule
        .get(index)
        .or_else(|| schedule.last())
        .copied()
        .unwrap_or(Duration::from_secs(1))
}

/// The Standard Webhooks `webhook-signature` (`v1,<base64 HMAC-SHA256 of id.timestamp.body>`).
///
/// Signed with ring's HMAC rather than the `standardwebhooks` crate: its `sign` (1.0.1)
/// refuses a body that is not UTF-8 and copies the whole body into a `String` first; a
/// multipart package is bytes, up to megabytes. The crate verifies these signatures in
/// the tests.
#[must_use]
pub fn sign(secret: &[u8], id: &str, timestamp: u64, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let mut ctx = ring::hmac::Context::with_key(&key);
    let mut digits = itoa::Buffer::new();
    ctx.update(id.as_bytes());
    ctx.update(b".");
    ctx.update(digits.format(timestamp).as_bytes());
    ctx.update(b".");
    ctx.update(body);
    format!("v1,{}", STANDARD.encode(ctx.sign().as_ref()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn signature_matches_the_specification_vector() {
        let secret = STANDARD.decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        assert_eq!(
            sign(
                &secret,
                "msg_p5jXN8AQM9LWM0D4loKWxJek",
                1_614_265_330,
                br#"{"test": 2432232314}"#
            ),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn success_false_is_recognised_however_spelled() {
        for body in [
            &br#"{"success":false}"#[..],
            b" {\n  \"success\" :  false }\r\n",
            br#"{"error":"busy","success":false}"#,
        ] {
            assert!(refused(body), "{}", String::from_utf8_lossy(body));
        }
        for body in [
            &br#"{"success":true}"#[..],
            b"",
            b"OK",
            br#"{"success":"false"}"#,
            br#"[false]"#,
            br#"{"other":false}"#,
        ] {
            assert!(!refused(body), "{}", String::from_utf8_lossy(body));
        }
        assert_eq!(
            classify(StatusCode::OK, br#"{ "success": false }"#, None),
            Attempt::Rejected
        );
        assert_eq!(
            classify(StatusCode::NO_CONTENT, b"", None),
            Attempt::Delivered
        );
        assert_eq!(classify(StatusCode::GONE, b"", None), Attempt::Gone);
        assert_eq!(
            classify(StatusCode::INTERNAL_SERVER_ERROR, b"", Some(Duration::ZERO)),
            Attempt::Failed(StatusCode::INTERNAL_SERVER_ERROR)
        );
    }

    #[test]
    fn retry_after_reads_seconds_and_dates_and_is_capped() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        let cap = Duration::from_secs(600);
        assert_eq!(retry_after(b" 7 ", now, cap), Some(Duration::from_secs(7)));
        assert_eq!(retry_after(b"86400", now, cap), Some(cap));
        let date = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(
            retry_after(date.as_bytes(), now, cap),
            Some(Duration::from_secs(30))
        );
        let past = httpdate::fmt_http_date(now - Duration::from_secs(30));
        assert_eq!(retry_after(past.as_bytes(), now, cap), Some(Duration::ZERO));
        assert_eq!(retry_after(b"soon", now, cap), None);
    }

    #[test]
    fn schedule_repeats_its_last_pause_and_jitter_stays_in_bounds() {
        let s = [Duration::from_secs(1), Duration::from_secs(5)];
        assert_eq!(pause_after(&s, 1), Duration::from_secs(1));
        assert_eq!(pause_after(&s, 2), Duration::from_secs(5));
        assert_eq!(pause_after(&s, 9), Duration::from_secs(5));
        assert_eq!(pause_after(&[], 1), Duration::from_secs(1));
        for _ in 0..200 {
            let p = Jitter::Proportional.apply(Duration::from_secs(10));
            assert!((8_000..=12_000).contains(&p.as_millis()));
            assert!(Jitter::Full.apply(Duration::from_secs(10)) <= Duration::from_secs(10));
        }
    }
}
