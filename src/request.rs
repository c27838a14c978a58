//! What each endpoint needs from a request, checked at the edge: the one place that knows
//! which fields an endpoint requires and turns the request into a typed [`Checked`].
//!
//! Bodies are parsed once into views of the client's bytes; the bytes themselves are
//! forwarded to Diia unchanged. Names and string values are JSON-decoded (`\u041a`,
//! `https:\/\/` are what Python's and PHP's encoders send): borrowed when they carry no
//! escape, decoded into an owned string when they do. Fields are kept in name order, so
//! two bodies with the same fields in another order, or with the same values spelled
//! with and without escapes, share a cache key. A body naming a field twice is refused:
//! which of the two Diia reads is not ours to guess.

use std::borrow::Cow;
use std::fmt;

use http::{HeaderValue, Method, Uri};

use crate::head::RequestHead;
use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;
use smallvec::SmallVec;

use crate::barcode::Barcode;
use crate::error::{GatewayError, RequiredField};
use crate::keys::KeyBuilder;
use crate::route::Endpoint;

/// Longest accepted `branchId`, `requestId` or `offerId`.
const MAX_ID: usize = 256;
/// Longest accepted `qrcode` (a `https://diia.app/...` link).
const MAX_QRCODE: usize = 2048;

/// A request as its endpoint needs it, every required field present and well-formed.
/// Lives on the stack for one request: boxing the large variant would cost an allocation
/// per identification.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
pub enum Checked<'a> {
    /// The session-token exchange: the acquirer token from the path.
    TokenExchange {
        /// The acquirer token.
        acquirer_token: &'a str,
    },
    /// `document-identification` (and `/age`): cached per caller and body.
    Identification {
        /// The whole body (every field is part of the cache key).
        body: JsonBody<'a>,
        /// `branchId`.
        branch: Cow<'a, str>,
        /// `barcode`.
        barcode: Barcode,
    },
    /// `document-request`: replayed per caller and barcode (or QR code).
    Sharing {
        /// `branchId`.
        branch: Cow<'a, str>,
        /// The barcode or QR code.
        subject: SharingSubject<'a>,
        /// `requestId`.
        request_id: Cow<'a, str>,
    },
    /// `document-request/status`.
    Status {
        /// The barcode in the query.
        barcode: Barcode,
        /// `requestId` in the query (polls are budgeted per client and `requestId`).
        request_id: &'a str,
    },
    /// `offer-request/status`: forwarded.
    OfferStatus {
        /// `requestId` in the query, when there is one.
        request_id: Option<&'a str>,
    },
    /// Branches, offers, offer requests: forwarded as is once the body (if any) is a
    /// JSON object.
    Forward {
        /// Which of them.
        endpoint: Endpoint,
        /// The branch in the path, if the path names one.
        branch: Option<&'a str>,
        /// `requestId` of an `offer-request/dynamic` (the relay routes its callback).
        request_id: Option<Cow<'a, str>>,
    },
}

impl Checked<'_> {
    /// The barcode the request is about, for the access log (as a keyed fingerprint).
    #[must_use]
    pub fn barcode(&self) -> Option<Barcode> {
        match self {
            Self::Identification { barcode, .. } | Self::Status { barcode, .. } => Some(*barcode),
            Self::Sharing {
                subject: SharingSubject::Barcode(barcode),
                ..
            } => Some(*barcode),
            Self::Sharing { .. }
            | Self::TokenExchange { .. }
            | Self::Forward { .. }
            | Self::OfferStatus { .. } => None,
        }
    }

    /// The branch the request is made for, if it names one (body or path).
    #[must_use]
    pub fn branch(&self) -> Option<&str> {
        match self {
            Self::Identification { branch, .. } | Self::Sharing { branch, .. } => Some(branch),
            Self::Forward { branch, .. } => *branch,
            Self::TokenExchange { .. } | Self::Status { .. } | Self::OfferStatus { .. } => None,
        }
    }

    /// A consent push's branch and `requestId`: what the callback relay routes before the
    /// push leaves (`document-request`, `offer-request/dynamic`).
    #[must_use]
    pub fn consent_push(&self) -> Option<(&str, &str)> {
        match self {
            Self::Sharing {
                branch, request_id, ..
            } => Some((branch, request_id)),
            Self::Forward {
                branch: Some(branch),
                request_id: Some(request_id),
                ..
            } => Some((branch, request_id)),
            Self::Forward { .. }
            | Self::Identification { .. }
            | Self::TokenExchange { .. }
            | Self::Status { .. }
            | Self::OfferStatus { .. } => None,
        }
    }
}

/// Checks a routed request against what its endpoint needs. `path_param` is the route's
/// path id (acquirer token or branch id).
pub fn check<'a>(
    endpoint: Endpoint,
    path_param: Option<&'a str>,
    head: &'a RequestHead,
    body: &'a [u8],
) -> Result<Checked<'a>, GatewayError> {
    let json = || -> Result<JsonBody<'a>, GatewayError> {
        require_json_content_type(head.content_type.as_ref())?;
        JsonBody::parse(body)
    };
    match endpoint {
        Endpoint::TokenExchange => Ok(Checked::TokenExchange {
            acquirer_token: path_param.ok_or(GatewayError::InvalidAcquirerToken)?,
        }),
        Endpoint::DocumentIdentification | Endpoint::DocumentIdentificationAge => {
            refuse_query(&head.uri)?;
            let body = json()?;
            Ok(Checked::Identification {
                branch: body.branch_id()?,
                barcode: body.barcode()?,
                body,
            })
        }
        Endpoint::DocumentRequest => {
            refuse_query(&head.uri)?;
            let body = json()?;
            Ok(Checked::Sharing {
                branch: body.branch_id()?,
                subject: body.sharing_subject()?,
                request_id: body.request_id()?,
            })
        }
        Endpoint::DocumentRequestStatus => {
            let (barcode, request_id) = status_query(head.uri.query())?;
            Ok(Checked::Status {
                barcode,
                request_id,
            })
        }
        Endpoint::OfferRequestStatus => Ok(Checked::OfferStatus {
            request_id: query_request_id(head.uri.query()),
        }),
        Endpoint::OfferRequestDynamic => {
            let body = json()?;
            body.offer_id()?;
            Ok(Checked::Forward {
                endpoint,
                branch: path_param,
                request_id: Some(body.request_id()?),
            })
        }
        Endpoint::Branches | Endpoint::Offers => {
            if matches!(head.method, Method::POST | Method::PUT) {
                json()?;
            }
            Ok(Checked::Forward {
                endpoint,
                branch: path_param,
                request_id: None,
            })
        }
        // Answered by the relay's pull stage before any check; never reaches here.
        Endpoint::RelayCallbacks => Err(GatewayError::UnknownRoute),
    }
}

/// Cached POST routes take no query: it is not part of the cache key, so it must not be
/// forwarded either.
fn refuse_query(uri: &Uri) -> Result<(), GatewayError> {
    match uri.query() {
        None | Some("") => Ok(()),
        Some(_) => Err(GatewayError::InvalidQuery),
    }
}

/// JSON routes take `application/json` (parameters such as `charset` allowed): a body sent
/// as anything else is refused before it can fill a cache entry.
fn require_json_content_type(content_type: Option<&HeaderValue>) -> Result<(), GatewayError> {
    let value = content_type
        .ok_or(GatewayError::UnsupportedMediaType)?
        .as_bytes();
    let essence = value.split(|&b| b == b';').next().unwrap_or_default();
    if essence
        .trim_ascii()
        .eq_ignore_ascii_case(b"application/json")
    {
        Ok(())
    } else {
        Err(GatewayError::UnsupportedMediaType)
    }
}

/// Top-level fields of a body, inline up to this many (Diia bodies carry 2 to 6).
const INLINE_FIELDS: usize = 8;

/// A JSON string, borrowed when it has no escape, decoded when it has.
struct Text<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Text<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct TextVisitor;
        impl<'de> Visitor<'de> for TextVisitor {
            type Value = Text<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, text: &'de str) -> Result<Self::Value, E> {
                Ok(Text(Cow::Borrowed(text)))
            }
            fn visit_str<E>(self, text: &str) -> Result<Self::Value, E> {
                Ok(Text(Cow::Owned(text.to_owned())))
            }
        }
        deserializer.deserialize_str(TextVisitor)
    }
}

/// `(name, raw value)` pairs sorted by name. Inline storage: no heap allocation for an
/// ordinary body (see the `allocations` bench).
#[derive(Debug, Default)]
struct Fields<'a>(SmallVec<[(Cow<'a, str>, &'a RawValue); INLINE_FIELDS]>);

impl<'de> Deserialize<'de> for Fields<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct FieldsVisitor;
        impl<'de> Visitor<'de> for FieldsVisitor {
            type Value = Fields<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Self::Value, M::Error> {
                let mut fields: SmallVec<[(Cow<'de, str>, &'de RawValue); INLINE_FIELDS]> =
                    SmallVec::new();
                while let Some((Text(name), value)) =
                    map.next_entry::<Text<'de>, &'de RawValue>()?
                {
                    // A raw value is only checked for syntax: numbers out of range (1e400)
                    // and escapes that decode to nothing (a lone surrogate) are refused
                    // here, as serde_json refuses them. A plain string, the usual field,
                    // costs nothing more.
                    let raw = value.get();
                    if raw.starts_with('"') {
                        if decoded_string(value).is_none() {
                            return Err(serde::de::Error::custom("undecodable string"));
                        }
                    } else if !matches!(raw, "null" | "true" | "false") {
                        serde_json::from_str::<serde_json::Value>(raw)
                            .map_err(serde::de::Error::custom)?;
                    }
                    fields.push((name, value));
                }
                fields.sort_by(|a, b| a.0.cmp(&b.0));
                if fields.windows(2).any(|pair| pair[0].0 == pair[1].0) {
                    return Err(serde::de::Error::custom("duplicate member name"));
                }
                Ok(Fields(fields))
            }
        }
        deserializer.deserialize_map(FieldsVisitor)
    }
}

/// A JSON object body, viewed over the request bytes, fields sorted by name.
#[derive(Debug)]
pub struct JsonBody<'a> {
    fields: Fields<'a>,
}

impl<'a> JsonBody<'a> {
    /// Parses a body that must be one JSON object with distinct member names.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, GatewayError> {
        let fields = serde_json::from_slice(bytes).map_err(|_| GatewayError::InvalidJson)?;
        Ok(Self { fields })
    }

    fn get(&self, name: &str) -> Option<&'a RawValue> {
        self.fields
            .0
            .binary_search_by(|(field, _)| field.as_ref().cmp(name))
            .ok()
            .map(|index| self.fields.0[index].1)
    }

    /// A string field, decoded: `Ok(None)` when absent or null, an error when not a plain
    /// string or when it carries control characters.
    fn string(&self, name: &str, max: usize) -> Result<Option<Cow<'a, str>>, GatewayError> {
        let Some(raw) = self.get(name) else {
            return Ok(None);
        };
        if raw.get() == "null" {
            return Ok(None);
        }
        let text = decoded_string(raw).ok_or(GatewayError::InvalidField)?;
        if text.len() > max || text.chars().any(char::is_control) {
            return Err(GatewayError::InvalidField);
        }
        Ok(Some(text))
    }

    fn required(
        &self,
        name: &str,
        field: RequiredField,
        max: usize,
    ) -> Result<Cow<'a, str>, GatewayError> {
        match self.string(name, max)? {
            Some(text) if !text.is_empty() => Ok(text),
            _ => Err(GatewayError::MissingField(field)),
        }
    }

    /// `branchId`, required by every barcode endpoint.
    pub fn branch_id(&self) -> Result<Cow<'a, str>, GatewayError> {
        self.required("branchId", RequiredField::BranchId, MAX_ID)
    }

    /// `barcode`, required and checked.
    pub fn barcode(&self) -> Result<Barcode, GatewayError> {
        let text = self.required("barcode", RequiredField::Barcode, 64)?;
        Barcode::parse(&text).map_err(|_| GatewayError::InvalidBarcode)
    }

    /// `requestId`, required.
    pub fn request_id(&self) -> Result<Cow<'a, str>, GatewayError> {
        self.required("requestId", RequiredField::RequestId, MAX_ID)
    }

    /// `offerId`, required.
    pub fn offer_id(&self) -> Result<Cow<'a, str>, GatewayError> {
        self.required("offerId", RequiredField::OfferId, MAX_ID)
    }

    /// `barcode` or `qrcode`, exactly one of them: with both, the gateway would key the
    /// request on one while Diia may act on the other.
    pub fn sharing_subject(&self) -> Result<SharingSubject<'a>, GatewayError> {
        let present = |name| self.get(name).is_some_and(|raw| raw.get() != "null");
        match (present("barcode"), present("qrcode")) {
            (true, true) => Err(GatewayError::BarcodeAndQrcode),
            (true, false) => self.barcode().map(SharingSubject::Barcode),
            (false, _) => match self.string("qrcode", MAX_QRCODE)? {
                Some(code) if !code.is_empty() => Ok(SharingSubject::Qrcode(code)),
                _ => Err(GatewayError::MissingField(RequiredField::BarcodeOrQrcode)),
            },
        }
    }

    /// Feeds every field, in name order, into a cache key: any field may change Diia's
    /// answer. String values go in decoded, so `\/` and `/` spell the same key.
    pub fn key_into(&self, key: &mut KeyBuilder) {
        for (name, value) in &self.fields.0 {
            key.part(name.as_bytes());
            match decoded_string(value) {
                Some(text) => key.part(b"s").part(text.as_bytes()),
                None => key.part(b"r").part(value.get().as_bytes()),
            };
        }
    }

    /// Every top-level field with its decoded string value, or its raw JSON text when it
    /// is not a string (the differential fuzz target compares this with `serde_json`).
    #[must_use]
    pub fn decoded_fields(&self) -> Vec<(String, Result<String, String>)> {
        self.fields
            .0
            .iter()
            .map(|(name, value)| {
                let decoded = decoded_string(value)
                    .map(Cow::into_owned)
                    .ok_or_else(|| value.get().to_owned());
                (name.clone().into_owned(), decoded)
            })
            .collect()
    }
}

/// A raw value's string, JSON-decoded: `None` when the value is not a string. A string
/// without escapes is its raw text between the quotes (no parse, no copy); the body parser
/// has already refused escapes that do not decode.
fn decoded_string<'a>(raw: &'a RawValue) -> Option<Cow<'a, str>> {
    let text = raw.get();
    let inner = text.strip_prefix('"')?.strip_suffix('"')?;
    if inner.contains('\\') {
        serde_json::from_str::<Text<'a>>(text)
            .ok()
            .map(|Text(decoded)| decoded)
    } else {
        Some(Cow::Borrowed(inner))
    }
}

/// What a sharing request points at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SharingSubject<'a> {
    /// A scanned barcode.
    Barcode(Barcode),
    /// A scanned share QR code, decoded.
    Qrcode(Cow<'a, str>),
}

/// `requestId` from a query string, if it carries a well-formed one.
fn query_request_id(query: Option<&str>) -> Option<&str> {
    query
        .unwrap_or_default()
        .split('&')
        .find_map(|pair| match pair.split_once('=') {
            Some(("requestId", value)) if !value.is_empty() && value.len() <= MAX_ID => Some(value),
            _ => None,
        })
}

/// `barcode` and `requestId` from the status query string.
pub fn status_query(query: Option<&str>) -> Result<(Barcode, &str), GatewayError> {
    let mut barcode = None;
    let mut request_id = None;
    for pair in query.unwrap_or_default().split('&') {
        match pair.split_once('=') {
            Some(("barcode", value)) => {
                barcode = Some(Barcode::parse(value).map_err(|_| GatewayError::InvalidQuery)?);
            }
            Some(("requestId", value)) if !value.is_empty() && value.len() <= MAX_ID => {
                request_id = Some(value);
            }
            _ => {}
        }
    }
    match (barcode, request_id) {
        (Some(barcode), Some(request_id)) => Ok((barcode, request_id)),
        _ => Err(GatewayError::InvalidQuery),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::HashKey;

    #[test]
    fn fields_are_checked() {
        let body =
            JsonBody::parse(br#"{"branchId":"b1","barcode":"3389798072091"}"#).expect("json");
        assert_eq!(body.branch_id().as_deref(), Ok("b1"));
        assert!(body.barcode().is_ok());
        assert_eq!(
            body.request_id(),
            Err(GatewayError::MissingField(RequiredField::RequestId))
        );
        let bad = JsonBody::parse(br#"{"branchId":7,"barcode":"3389798072090"}"#).expect("json");
        assert_eq!(bad.branch_id(), Err(GatewayError::InvalidField));
        assert_eq!(bad.barcode(), Err(GatewayError::InvalidBarcode));
        assert_eq!(
            JsonBody::parse(b"[1]").err(),
            Some(GatewayError::InvalidJson)
        );
        assert_eq!(JsonBody::parse(b"{").err(), Some(GatewayError::InvalidJson));
        let empty = JsonBody::parse(br#"{"branchId":""}"#).expect("json");
        assert_eq!(
            empty.branch_id(),
            Err(GatewayError::MissingField(RequiredField::BranchId))
        );
    }

    #[test]
    fn duplicate_names_are_refused_even_when_spelled_differently() {
        for body in [
            &br#"{"branchId":"first","z":1,"branchId":"last"}"#[..],
            br#"{"barcode":"3389798072091","barcod\u0065":"4820000000001"}"#,
        ] {
            assert_eq!(
                JsonBody::parse(body).err(),
                Some(GatewayError::InvalidJson),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        let many = JsonBody::parse(
            br#"{"k1":1,"k2":2,"k3":3,"k4":4,"k5":5,"k6":6,"k7":7,"k8":8,"k9":9,"branchId":"b"}"#,
        )
        .expect("more fields than inline storage");
        assert_eq!(many.branch_id().as_deref(), Ok("b"));
    }

    #[test]
    fn escaped_strings_are_decoded() {
        let body = JsonBody::parse(
            br#"{"branchId":"\u041a\u0438\u0457\u0432-1","qrcode":"https:\/\/diia.app\/x"}"#,
        )
        .expect("json");
        assert_eq!(body.branch_id().as_deref(), Ok("Київ-1"));
        assert_eq!(
            body.sharing_subject(),
            Ok(SharingSubject::Qrcode(Cow::Owned(
                "https://diia.app/x".to_owned()
            )))
        );
        let control = JsonBody::parse(br#"{"branchId":"a\nb"}"#).expect("json");
        assert_eq!(control.branch_id(), Err(GatewayError::InvalidField));
    }

    #[test]
    fn sharing_takes_barcode_or_qrcode_not_both() {
        let qr = JsonBody::parse(br#"{"qrcode":"https://diia.app/documents/x/1/verify/2"}"#)
            .expect("json");
        assert!(matches!(
            qr.sharing_subject(),
            Ok(SharingSubject::Qrcode(_))
        ));
        let none = JsonBody::parse(br#"{"branchId":"b"}"#).expect("json");
        assert_eq!(
            none.sharing_subject(),
            Err(GatewayError::MissingField(RequiredField::BarcodeOrQrcode))
        );
        let both = JsonBody::parse(br#"{"barcode":"3389798072091","qrcode":"https://diia.app/x"}"#)
            .expect("json");
        assert_eq!(both.sharing_subject(), Err(GatewayError::BarcodeAndQrcode));
    }

    #[test]
    fn field_order_and_escapes_do_not_change_the_key() {
        let keys = HashKey::fixed([3; 16]);
        let key = |bytes: &[u8]| {
            let mut builder = keys.key("t");
            JsonBody::parse(bytes).expect("json").key_into(&mut builder);
            builder.finish()
        };
        let a = key(br#"{"branchId":"b1","barcode":"3389798072091"}"#);
        let b = key(br#"{ "barcode": "3389798072091", "branchId": "b1" }"#);
        let escaped = key(br#"{"barcode":"\u0033389798072091","branch\u0049d":"b1"}"#);
        let c = key(br#"{"branchId":"b2","barcode":"3389798072091"}"#);
        assert_eq!(a, b);
        assert_eq!(a, escaped);
        assert_ne!(a, c);
        assert_ne!(key(br#"{"n":"1"}"#), key(br#"{"n":1}"#));
    }

    #[test]
    fn status_query_needs_both_parameters() {
        assert!(status_query(Some("barcode=3389798072091&requestId=r1")).is_ok());
        assert_eq!(
            status_query(Some("barcode=3389798072091")),
            Err(GatewayError::InvalidQuery)
        );
        assert_eq!(
            status_query(Some("barcode=1&requestId=r")),
            Err(GatewayError::InvalidQuery)
        );
        assert_eq!(status_query(None), Err(GatewayError::InvalidQuery));
    }
}
