//! The request head the stages read, parsed once at the edge: method, URI and the five
//! headers the gateway acts on. Nothing else of a request is read or forwarded (Diia gets
//! `Authorization`, `Content-Type` and `diia-trace-id`, see [`crate::upstream`]).
//!
//! The HTTP/1.1 loop fills it straight from the parsed bytes (values share the read
//! buffer: no `HeaderMap`, no allocation); requests hyper serves (HTTP/2, chunked, …) are
//! converted from their `HeaderMap`. Repeated headers keep their first value, as
//! `HeaderMap::get` does. The connection's client certificate, when it showed one, rides
//! along (for [`crate::caller`]).

use std::sync::Arc;

use http::header::{self, HeaderName};
use http::request::Parts;
use http::{HeaderValue, Method, Uri};

use crate::tls::ClientCert;

/// `x-api-key`: a branch's key in managed mode.
pub static API_KEY: HeaderName = HeaderName::from_static("x-api-key");
/// `diia-trace-id`: passed to Diia and back, for tracing a call across both.
pub static DIIA_TRACE_ID: HeaderName = HeaderName::from_static("diia-trace-id");

/// Method, URI and the headers the stages read.
#[derive(Debug, Clone, Default)]
pub struct RequestHead {
    /// The method.
    pub method: Method,
    /// Origin-form URI (path and query).
    pub uri: Uri,
    /// `Authorization` (a Diia session token, or `Basic` for the token exchange).
    pub authorization: Option<HeaderValue>,
    /// `x-api-key` (managed mode).
    pub api_key: Option<HeaderValue>,
    /// `Content-Type`.
    pub content_type: Option<HeaderValue>,
    /// `Content-Length`, when declared and a number.
    pub content_length: Option<u64>,
    /// `diia-trace-id`.
    pub trace_id: Option<HeaderValue>,
    /// The connection's verified client certificate (mTLS), set by the accept loop, never
    /// from a header.
    pub client_cert: Option<Arc<ClientCert>>,
}

/// Which field of [`RequestHead`] a header fills, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    /// `Authorization`.
    Authorization,
    /// `x-api-key`.
    ApiKey,
    /// `Content-Type`.
    ContentType,
    /// `Content-Length`.
    ContentLength,
    /// `diia-trace-id`.
    TraceId,
}

impl Field {
    /// The field a header name (any case) fills; `None` for a header the stages ignore.
    #[must_use]
    pub fn of(name: &[u8]) -> Option<Self> {
        // By length first: most headers a client sends are ruled out by one compare.
        let (field, wanted): (Self, &[u8]) = match name.len() {
            13 => (Self::Authorization, b"authorization"),
            9 => (Self::ApiKey, b"x-api-key"),
            12 => (Self::ContentType, b"content-type"),
            14 => (Self::ContentLength, b"content-length"),
            // `diia-trace-id` is 13 long too.
            _ => return None,
        };
        if name.eq_ignore_ascii_case(wanted) {
            Some(field)
        } else if field == Self::Authorization && name.eq_ignore_ascii_case(b"diia-trace-id") {
            Some(Self::TraceId)
        } else {
            None
        }
    }
}

impl RequestHead {
    /// A head for `method` and `uri`, without headers yet.
    #[must_use]
    pub fn new(method: Method, uri: Uri) -> Self {
        Self {
            method,
            uri,
            ..Self::default()
        }
    }

    /// Sets `field` unless an earlier header already did (the first value counts).
    pub fn set(&mut self, field: Field, value: HeaderValue) {
        let slot = match field {
            Field::Authorization => &mut self.authorization,
            Field::ApiKey => &mut self.api_key,
            Field::ContentType => &mut self.content_type,
            Field::TraceId => &mut self.trace_id,
            Field::ContentLength => {
                if self.content_length.is_none() {
                    self.content_length = value.to_str().ok().and_then(|v| v.parse().ok());
                }
                return;
            }
        };
        if slot.is_none() {
            *slot = Some(value);
        }
    }

    /// The head of a request hyper parsed. Values are moved out of its `HeaderMap`, not
    /// cloned (a clone of a value that owns its bytes would allocate).
    #[must_use]
    pub fn from_parts(parts: Parts) -> Self {
        let Parts {
            method,
            uri,
            mut headers,
            ..
        } = parts;
        Self {
            method,
            uri,
            content_length: headers
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok()),
            authorization: headers.remove(header::AUTHORIZATION),
            api_key: headers.remove(&API_KEY),
            content_type: headers.remove(header::CONTENT_TYPE),
            trace_id: headers.remove(&DIIA_TRACE_ID),
            client_cert: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_field_is_found_in_any_case_and_others_are_ignored() {
        for (name, field) in [
            (&b"Authorization"[..], Some(Field::Authorization)),
            (b"X-API-Key", Some(Field::ApiKey)),
            (b"content-TYPE", Some(Field::ContentType)),
            (b"Content-Length", Some(Field::ContentLength)),
            (b"Diia-Trace-Id", Some(Field::TraceId)),
            (b"host", None),
            (b"authorisation", None),
            (b"x-api-keys", None),
            (b"content-typo", None),
            (b"", None),
        ] {
            assert_eq!(Field::of(name), field, "{}", String::from_utf8_lossy(name));
        }
    }

    #[test]
    fn the_first_value_of_a_repeated_header_counts() {
        let mut head = RequestHead::default();
        head.set(
            Field::Authorization,
            HeaderValue::from_static("Bearer first"),
        );
        head.set(
            Field::Authorization,
            HeaderValue::from_static("Bearer second"),
        );
        head.set(Field::ContentLength, HeaderValue::from_static("12"));
        head.set(Field::ContentLength, HeaderValue::from_static("99"));
        assert_eq!(
            head.authorization.as_ref().map(HeaderValue::as_bytes),
            Some(&b"Bearer first"[..])
        );
        assert_eq!(head.content_length, Some(12));

        let mut request = http::Request::new(());
        let headers = request.headers_mut();
        for value in ["Bearer first", "Bearer second"] {
            headers.append(header::AUTHORIZATION, HeaderValue::from_static(value));
        }
        headers.append(header::CONTENT_LENGTH, HeaderValue::from_static("12"));
        let from_hyper = RequestHead::from_parts(request.into_parts().0);
        assert_eq!(from_hyper.authorization, head.authorization);
        assert_eq!(from_hyper.content_length, Some(12));
    }
}
