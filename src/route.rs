//! Which Diia endpoint a request is for: `(method, path)` becomes a typed [`Route`] at the edge.
//!
//! Only Diia's acquirer surface is routed; anything else is a 404 that never leaves the box.
//! Versions follow Diia's public gateway: a version an endpoint does not list has no route.

use http::Method;

use crate::error::GatewayError;

/// A Diia acquirer endpoint the gateway knows; also the `endpoint` label of metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// `GET /api/v1/auth/acquirer/{acquirerToken}`: session-token exchange.
    TokenExchange,
    /// `POST /api/v1/acquirers/document-identification`.
    DocumentIdentification,
    /// `POST /api/v1/acquirers/document-identification/age`.
    DocumentIdentificationAge,
    /// `POST /api/v1/acquirers/document-request` (sharing by barcode or QR code).
    DocumentRequest,
    /// `GET /api/v1/acquirers/document-request/status`.
    DocumentRequestStatus,
    /// Branch CRUD and list under `/api/v1|v2/acquirers/branch(es)`.
    Branches,
    /// Offer create, list and delete under a branch.
    Offers,
    /// `POST /api/v2/acquirers/branch/{branchId}/offer-request/dynamic`.
    OfferRequestDynamic,
    /// `GET /api/v1/acquirers/offer-request/status`.
    OfferRequestStatus,
}

impl Endpoint {
    /// Every endpoint, in label order.
    pub const ALL: [Endpoint; 9] = [
        Self::TokenExchange,
        Self::DocumentIdentification,
        Self::DocumentIdentificationAge,
        Self::DocumentRequest,
        Self::DocumentRequestStatus,
        Self::Branches,
        Self::Offers,
        Self::OfferRequestDynamic,
        Self::OfferRequestStatus,
    ];

    /// Stable label for metrics and logs.
    #[must_use]
    pub fn label(self) -> &'static str {
        match self {
            Self::TokenExchange => "token_exchange",
            Self::DocumentIdentification => "document_identification",
            Self::DocumentIdentificationAge => "document_identification_age",
            Self::DocumentRequest => "document_request",
            Self::DocumentRequestStatus => "document_request_status",
            Self::Branches => "branches",
            Self::Offers => "offers",
            Self::OfferRequestDynamic => "offer_request_dynamic",
            Self::OfferRequestStatus => "offer_request_status",
        }
    }

    /// Index into per-endpoint tables.
    #[must_use]
    pub fn index(self) -> usize {
        self as usize
    }
}

/// A routed request: the endpoint plus what the path itself carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route<'a> {
    /// The endpoint.
    pub endpoint: Endpoint,
    /// The acquirer token (token exchange) or the branch id (branch-scoped paths).
    pub path_param: Option<&'a str>,
}

impl<'a> Route<'a> {
    fn new(endpoint: Endpoint, path_param: Option<&'a str>) -> Self {
        Self {
            endpoint,
            path_param,
        }
    }
}

/// Longest path segment we accept as an id or token; longer is not Diia's.
const MAX_SEGMENT: usize = 512;

fn is_id_segment(segment: &str) -> bool {
    !segment.is_empty()
        && segment.len() <= MAX_SEGMENT
        && segment
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'%'))
}

/// Maps a method and path (no query) to a route, or a 404/405 error.
pub fn route<'a>(method: &Method, path: &'a str) -> Result<Route<'a>, GatewayError> {
    let rest = path
        .strip_prefix("/api/")
        .ok_or(GatewayError::UnknownRoute)?;
    let (version, rest) = rest.split_once('/').ok_or(GatewayError::UnknownRoute)?;
    let v1 = version == "v1";
    let v2 = version == "v2";
    if !v1 && !v2 {
        return Err(GatewayError::UnknownRoute);
    }
    let mut segments = rest.split('/');
    let first = segments.next().unwrap_or_default();
    let parts: [Option<&str>; 5] = [
        segments.next(),
        segments.next(),
        segments.next(),
        segments.next(),
        segments.next(),
    ];
    if segments.next().is_some() {
        return Err(GatewayError::UnknownRoute);
    }
    let (endpoint, param, allowed): (Endpoint, Option<&str>, &[Method]) = match (first, parts) {
        ("auth", [Some("acquirer"), Some(token), None, ..]) if v1 => {
            if !is_id_segment(token) {
                return Err(GatewayError::UnknownRoute);
            }
            (Endpoint::TokenExchange, Some(token), &[Method::GET])
        }
        ("acquirers", [Some("document-identification"), None, ..]) if v1 => {
            (Endpoint::DocumentIdentification, None, &[Method::POST])
        }
        ("acquirers", [Some("document-identification"), Some("age"), None, ..]) if v1 => {
            (Endpoint::DocumentIdentificationAge, None, &[Method::POST])
        }
        ("acquirers", [Some("document-request"), None, ..]) if v1 => {
            (Endpoint::DocumentRequest, None, &[Method::POST])
        }
        ("acquirers", [Some("document-request"), Some("status"), None, ..]) if v1 => {
            (Endpoint::DocumentRequestStatus, None, &[Method::GET])
        }
        ("acquirers", [Some("offer-request"), Some("status"), None, ..]) if v1 => {
            (Endpoint::OfferRequestStatus, None, &[Method::GET])
        }
        ("acquirers", [Some("branches"), None, ..]) => (Endpoint::Branches, None, &[Method::GET]),
        ("acquirers", [Some("branch"), None, ..]) => (Endpoint::Branches, None, &[Method::POST]),
        ("acquirers", [Some("branch"), Some(id), tail @ ..]) if is_id_segment(id) => match tail {
            [None, ..] => (
                Endpoint::Branches,
                Some(id),
                &[Method::GET, Method::PUT, Method::DELETE],
            ),
            [Some("offer"), None, ..] if v1 => (Endpoint::Offers, Some(id), &[Method::POST]),
            [Some("offers"), None, ..] if v1 => (Endpoint::Offers, Some(id), &[Method::GET]),
            [Some("offer"), Some(offer), None] if v1 && is_id_segment(offer) => {
                (Endpoint::Offers, Some(id), &[Method::DELETE])
            }
            [Some("offer-request"), Some("dynamic"), None] if v2 => {
                (Endpoint::OfferRequestDynamic, Some(id), &[Method::POST])
            }
            _ => return Err(GatewayError::UnknownRoute),
        },
        _ => return Err(GatewayError::UnknownRoute),
    };
    if allowed.contains(method) {
        Ok(Route::new(endpoint, param))
    } else {
        Err(GatewayError::MethodNotAllowed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok<'a>(method: &Method, path: &'a str) -> Route<'a> {
        route(method, path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    #[test]
    fn routes_the_acquirer_surface() {
        let r = ok(&Method::GET, "/api/v1/auth/acquirer/demo_test_token_1");
        assert_eq!(
            r,
            Route::new(Endpoint::TokenExchange, Some("demo_test_token_1"))
        );
        assert_eq!(
            ok(&Method::POST, "/api/v1/acquirers/document-identification").endpoint,
            Endpoint::DocumentIdentification
        );
        assert_eq!(
            ok(
                &Method::POST,
                "/api/v1/acquirers/document-identification/age"
            )
            .endpoint,
            Endpoint::DocumentIdentificationAge
        );
        assert_eq!(
            ok(&Method::POST, "/api/v1/acquirers/document-request").endpoint,
            Endpoint::DocumentRequest
        );
        assert_eq!(
            ok(&Method::GET, "/api/v1/acquirers/document-request/status").endpoint,
            Endpoint::DocumentRequestStatus
        );
        assert_eq!(
            ok(&Method::GET, "/api/v2/acquirers/branches").endpoint,
            Endpoint::Branches
        );
        assert_eq!(
            ok(&Method::POST, "/api/v2/acquirers/branch").endpoint,
            Endpoint::Branches
        );
        assert_eq!(
            ok(&Method::DELETE, "/api/v2/acquirers/branch/abc").path_param,
            Some("abc")
        );
        assert_eq!(
            ok(&Method::POST, "/api/v1/acquirers/branch/abc/offer").endpoint,
            Endpoint::Offers
        );
        assert_eq!(
            ok(&Method::GET, "/api/v1/acquirers/branch/abc/offers").endpoint,
            Endpoint::Offers
        );
        assert_eq!(
            ok(&Method::DELETE, "/api/v1/acquirers/branch/abc/offer/o1").endpoint,
            Endpoint::Offers
        );
        let dynamic = ok(
            &Method::POST,
            "/api/v2/acquirers/branch/b1/offer-request/dynamic",
        );
        assert_eq!(
            dynamic,
            Route::new(Endpoint::OfferRequestDynamic, Some("b1"))
        );
    }

    #[test]
    fn refuses_paths_outside_the_surface() {
        for path in [
            "/",
            "/api",
            "/api/v3/acquirers/branches",
            "/api/v2/acquirers/document-identification",
            "/api/v1/acquirers/branch/abc/offer-request/dynamic",
            "/api/v1/auth/acquirer/",
            "/api/v1/auth/acquirer/a/b",
            "/api/v1/acquirers/branch/a b",
            "/admin/metrics",
            "/api/v1/acquirers/document-identification/age/extra/x/y/z",
        ] {
            assert_eq!(
                route(&Method::GET, path),
                Err(GatewayError::UnknownRoute),
                "{path}"
            );
            assert_eq!(
                route(&Method::POST, path),
                Err(GatewayError::UnknownRoute),
                "{path}"
            );
        }
    }

    #[test]
    fn wrong_method_is_405() {
        assert_eq!(
            route(&Method::GET, "/api/v1/acquirers/document-identification"),
            Err(GatewayError::MethodNotAllowed)
        );
        assert_eq!(
            route(&Method::POST, "/api/v1/auth/acquirer/tok"),
            Err(GatewayError::MethodNotAllowed)
        );
    }
}
