//! Request bodies and headers, checked at the edge: what Diia needs is present and well-formed.
//!
//! Bodies are parsed once into borrowed views of the client's bytes (no copies); the
//! bytes themselves are forwarded to Diia unchanged. Top-level fields are kept in key
//! order so that two bodies with the same fields in another order share a cache key.

use std::fmt;

use http::HeaderMap;
use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;
use smallvec::SmallVec;

use crate::barcode::Barcode;
use crate::error::{GatewayError, RequiredField};
use crate::keys::KeyBuilder;

/// Longest accepted `branchId`, `requestId` or `offerId`.
const MAX_ID: usize = 256;
/// Longest accepted `qrcode` (a `https://diia.app/...` link).
const MAX_QRCODE: usize = 2048;
/// Longest accepted bearer token.
const MAX_TOKEN: usize = 8192;

/// The session token from `Authorization: Bearer <token>` (scheme case-insensitive, as Diia).
pub fn bearer_token(headers: &HeaderMap) -> Result<&[u8], GatewayError> {
    let value = headers
        .get(http::header::AUTHORIZATION)
        .ok_or(GatewayError::MissingAuthorization)?
        .as_bytes();
    let (scheme, token) = value
        .split_at_checked(7)
        .ok_or(GatewayError::InvalidAuthorization)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return Err(GatewayError::InvalidAuthorization);
    }
    if token.is_empty() || token.len() > MAX_TOKEN || !token.iter().all(u8::is_ascii_graphic) {
        return Err(GatewayError::InvalidAuthorization);
    }
    Ok(token)
}

/// Top-level fields of a body, inline up to this many (Diia bodies carry 2 to 6).
const INLINE_FIELDS: usize = 8;

/// `(name, raw value)` pairs sorted by name, the last of duplicate names kept (as
/// JavaScript's `JSON.parse`, and so Diia, does). Inline storage: no heap allocation for
/// an ordinary body (a `BTreeMap` here cost one per request; see the `allocations` bench).
#[derive(Debug, Default)]
struct Fields<'a>(SmallVec<[(&'a str, &'a RawValue); INLINE_FIELDS]>);

impl<'de> Deserialize<'de> for Fields<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct FieldsVisitor;
        impl<'de> Visitor<'de> for FieldsVisitor {
            type Value = Fields<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Self::Value, M::Error> {
                let mut fields: SmallVec<[(&'de str, &'de RawValue); INLINE_FIELDS]> =
                    SmallVec::new();
                while let Some(entry) = map.next_entry::<&'de str, &'de RawValue>()? {
                    fields.push(entry);
                }
                // Reverse, then stable-sort: among equal names the last one comes first,
                // and `dedup_by` keeps the first of each run.
                fields.reverse();
                fields.sort_by(|a, b| a.0.cmp(b.0));
                fields.dedup_by(|a, b| a.0 == b.0);
                Ok(Fields(fields))
            }
        }
        deserializer.deserialize_map(FieldsVisitor)
    }
}

/// A JSON object body, borrowed from the request bytes, fields sorted by key.
#[derive(Debug)]
pub struct JsonBody<'a> {
    fields: Fields<'a>,
}

impl<'a> JsonBody<'a> {
    /// Parses a body that must be one JSON object.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, GatewayError> {
        let fields = serde_json::from_slice(bytes).map_err(|_| GatewayError::InvalidJson)?;
        Ok(Self { fields })
    }

    fn get(&self, name: &str) -> Option<&'a RawValue> {
        self.fields
            .0
            .binary_search_by(|(field, _)| (*field).cmp(name))
            .ok()
            .map(|index| self.fields.0[index].1)
    }

    /// A string field: `Ok(None)` when absent or null, an error when not a plain string.
    fn string(&self, name: &str, max: usize) -> Result<Option<&'a str>, GatewayError> {
        let Some(raw) = self.get(name) else {
            return Ok(None);
        };
        if raw.get() == "null" {
            return Ok(None);
        }
        let text: &str = serde_json::from_str(raw.get()).map_err(|_| GatewayError::InvalidField)?;
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
    ) -> Result<&'a str, GatewayError> {
        match self.string(name, max)? {
            Some(text) if !text.is_empty() => Ok(text),
            _ => Err(GatewayError::MissingField(field)),
        }
    }

    /// `branchId`, required by every barcode endpoint.
    pub fn branch_id(&self) -> Result<&'a str, GatewayError> {
        self.required("branchId", RequiredField::BranchId, MAX_ID)
    }

    /// `barcode`, required and checked.
    pub fn barcode(&self) -> Result<Barcode, GatewayError> {
        let text = self.required("barcode", RequiredField::Barcode, 64)?;
        Barcode::parse(text).map_err(|_| GatewayError::InvalidBarcode)
    }

    /// `requestId`, required.
    pub fn request_id(&self) -> Result<&'a str, GatewayError> {
        self.required("requestId", RequiredField::RequestId, MAX_ID)
    }

    /// `offerId`, required.
    pub fn offer_id(&self) -> Result<&'a str, GatewayError> {
        self.required("offerId", RequiredField::OfferId, MAX_ID)
    }

    /// `barcode` or `qrcode` (sharing accepts either; a barcode wins when both are sent).
    pub fn sharing_subject(&self) -> Result<SharingSubject<'a>, GatewayError> {
        if self.get("barcode").is_some() {
            return self.barcode().map(SharingSubject::Barcode);
        }
        match self.string("qrcode", MAX_QRCODE)? {
            Some(code) if !code.is_empty() => Ok(SharingSubject::Qrcode(code)),
            _ => Err(GatewayError::MissingField(RequiredField::BarcodeOrQrcode)),
        }
    }

    /// Feeds every field, in key order, into a cache key: any field may change Diia's answer.
    pub fn key_into(&self, key: &mut KeyBuilder) {
        for (name, value) in &self.fields.0 {
            key.part(name.as_bytes()).part(value.get().as_bytes());
        }
    }
}

/// What a sharing request points at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SharingSubject<'a> {
    /// A scanned barcode.
    Barcode(Barcode),
    /// A scanned share QR code.
    Qrcode(&'a str),
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
    use crate::keys::Secrets;

    #[test]
    fn bearer_parsing_follows_diia() {
        let mut headers = HeaderMap::new();
        assert_eq!(
            bearer_token(&headers),
            Err(GatewayError::MissingAuthorization)
        );
        headers.insert("authorization", "bearer abc.def".parse().expect("header"));
        assert_eq!(bearer_token(&headers), Ok(&b"abc.def"[..]));
        headers.insert("authorization", "Basic abc".parse().expect("header"));
        assert_eq!(
            bearer_token(&headers),
            Err(GatewayError::InvalidAuthorization)
        );
        headers.insert("authorization", "Bearer ".parse().expect("header"));
        assert_eq!(
            bearer_token(&headers),
            Err(GatewayError::InvalidAuthorization)
        );
    }

    #[test]
    fn fields_are_checked() {
        let body =
            JsonBody::parse(br#"{"branchId":"b1","barcode":"3389798072091"}"#).expect("json");
        assert_eq!(body.branch_id(), Ok("b1"));
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
    fn the_last_of_duplicate_fields_wins() {
        let body = JsonBody::parse(br#"{"branchId":"first","z":1,"branchId":"last","a":2}"#)
            .expect("json");
        assert_eq!(body.branch_id(), Ok("last"));
        let names: Vec<&str> = body.fields.0.iter().map(|(name, _)| *name).collect();
        assert_eq!(names, ["a", "branchId", "z"]);
        let many = JsonBody::parse(
            br#"{"k1":1,"k2":2,"k3":3,"k4":4,"k5":5,"k6":6,"k7":7,"k8":8,"k9":9,"branchId":"b"}"#,
        )
        .expect("more fields than inline storage");
        assert_eq!(many.branch_id(), Ok("b"));
    }

    #[test]
    fn sharing_takes_barcode_or_qrcode() {
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
    }

    #[test]
    fn field_order_does_not_change_the_key() {
        let secrets = Secrets::fixed([3; 16]);
        let key = |bytes: &[u8]| {
            let mut builder = secrets.key("t");
            JsonBody::parse(bytes).expect("json").key_into(&mut builder);
            builder.finish()
        };
        let a = key(br#"{"branchId":"b1","barcode":"3389798072091"}"#);
        let b = key(br#"{ "barcode": "3389798072091", "branchId": "b1" }"#);
        let c = key(br#"{"branchId":"b2","barcode":"3389798072091"}"#);
        assert_eq!(a, b);
        assert_ne!(a, c);
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
