//! Which Diia endpoint a request is for: `(method, path)` becomes a typed [`Route`] at the edge.
//!
//! Only Diia's acquirer surface is routed; anything else is a 404 that never leaves the box.
//! Versions follow Diia's public gateway: a version an endpoint does not list has no route.

use std::ops::Range;

use http::Method;

use crate::config::AuthMode;
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
    /// `GET` / `DELETE /relay/v1/callbacks/{requestId}`: the callback relay's pull side
    /// (the gateway's own, never forwarded; 404 while the relay is off).
    RelayCallbacks,
}

impl Endpoint {
    /// Every endpoint, in label order.
    pub const ALL: [Endpoint; 10] = [
        Self::TokenExchange,
        Self::DocumentIdentification,
        Self::DocumentIdentificationAge,
        Self::DocumentRequest,
        Self::DocumentRequestStatus,
        Self::Branches,
        Self::Offers,
        Self::OfferRequestDynamic,
        Self::OfferRequestStatus,
        Self::RelayCallbacks,
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
            Self::RelayCallbacks => "relay_callbacks",
        }
    }

    /// Index into per-endpoint tables.
    #[must_use]
    pub fn index(self) -> usize {
        self as usize
    }
}

/// Which circuit breaker an endpoint's calls count toward: Diia failing on management
/// routes must not stop verifications, and the other way round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallClass {
    /// Identification (and `/age`).
    Verification,
    /// Sharing and its status.
    Sharing,
    /// The session-token exchange.
    Token,
    /// Branches, offers, offer requests.
    Management,
}

impl CallClass {
    /// Every class, in index order.
    pub const ALL: [Self; 4] = [
        Self::Verification,
        Self::Sharing,
        Self::Token,
        Self::Management,
    ];

    /// The class of an endpoint.
    #[must_use]
    pub fn of(endpoint: Endpoint) -> Self {
        match endpoint {
            Endpoint::DocumentIdentification | Endpoint::DocumentIdentificationAge => {
                Self::Verification
            }
            Endpoint::DocumentRequest | Endpoint::DocumentRequestStatus => Self::Sharing,
            Endpoint::TokenExchange => Self::Token,
            Endpoint::Branches
            | Endpoint::Offers
            | Endpoint::OfferRequestDynamic
            | Endpoint::OfferRequestStatus
            | Endpoint::RelayCallbacks => Self::Management,
        }
    }

    /// The `class` label.
    #[must_use]
    pub fn label(self) -> &'static str {
        match self {
            Self::Verification => "verification",
            Self::Sharing => "sharing",
            Self::Token => "token",
            Self::Management => "management",
        }
    }

    /// Index into per-class tables.
    #[must_use]
    pub fn index(self) -> usize {
        self as usize
    }
}

/// A routed request: the endpoint plus where the path's id sits (so the route can live
/// beside the request it was read from).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The endpoint.
    pub endpoint: Endpoint,
    /// Byte range in the path of the acquirer token (token exchange) or the branch id.
    param: Option<Range<usize>>,
}

impl Route {
    fn new(endpoint: Endpoint, path: &str, param: Option<&str>) -> Self {
        // `param` is a sub-slice of `path`: its offset is a pointer difference.
        let param = param.map(|p| {
            let start = p.as_ptr() as usize - path.as_ptr() as usize;
            start..start + p.len()
        });
        Self { endpoint, param }
    }

    /// The acquirer token or branch id, read from the same path that was routed.
    #[must_use]
    pub fn param<'p>(&self, path: &'p str) -> Option<&'p str> {
        self.param.clone().and_then(|range| path.get(range))
    }
}

/// Longest acquirer token we accept in the path; longer is not Diia's.
const MAX_TOKEN_SEGMENT: usize = 512;
/// Longest percent-encoded requestId in the relay's pull path (a 256-byte id, encoded).
const MAX_REQUEST_ID_SEGMENT: usize = 3 * 256;
/// Longest branch or offer id (Diia's are 24-hex ObjectIds).
const MAX_ID_SEGMENT: usize = 64;

/// Branch and offer ids: `[A-Za-z0-9_-]{1,64}`. No dot and no percent sign, so `..`,
/// `%2e%2e` or `%2F` never reach Diia and no two spellings name one rate-limit key.
fn is_id_segment(segment: &str) -> bool {
    !segment.is_empty()
        && segment.len() <= MAX_ID_SEGMENT
        && segment
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
}

/// Acquirer tokens: the id charset plus `.` and `~` (never `.` or `..` alone, never `%`).
fn is_token_segment(segment: &str) -> bool {
    !segment.is_empty()
        && segment.len() <= MAX_TOKEN_SEGMENT
        && segment != "."
        && segment != ".."
        && segment
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~'))
}

/// Routes for the auth mode in force: in managed mode the token exchange does not exist
/// for branches (they never hold acquirer tokens), so it is a 404 like any unknown path.
pub fn route_for(mode: AuthMode, method: &Method, path: &str) -> Result<Route, GatewayError> {
    let routed = route(method, path)?;
    match (mode, routed.endpoint) {
        (AuthMode::Managed, Endpoint::TokenExchange) => Err(GatewayError::UnknownRoute),
        _ => Ok(routed),
    }
}

/// The relay's pull path: `/relay/v1/callbacks/{requestId}`, the id percent-encoded as
/// needed (decoded by the pull stage).
const RELAY_CALLBACKS: &str = "/relay/v1/callbacks/";

/// Maps a method and path (no query) to a route, or a 404/405 error.
pub fn route(method: &Method, path: &str) -> Result<Route, GatewayError> {
    if let Some(id) = path.strip_prefix(RELAY_CALLBACKS) {
        return relay_route(method, path, id);
    }
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
            if !is_token_segment(token) {
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
        Ok(Route::new(endpoint, path, param))
    } else {
        Err(GatewayError::MethodNotAllowed {
            allow: allow_header(allowed),
        })
    }
}

/// The relay's pull path: GET (pull) and DELETE (acknowledge) of one requestId.
fn relay_route(method: &Method, path: &str, id: &str) -> Result<Route, GatewayError> {
    if id.is_empty() || id.len() > MAX_REQUEST_ID_SEGMENT || id.contains('/') {
        return Err(GatewayError::UnknownRoute);
    }
    if matches!(*method, Method::GET | Method::DELETE) {
        Ok(Route::new(Endpoint::RelayCallbacks, path, Some(id)))
    } else {
        Err(GatewayError::MethodNotAllowed {
            allow: "GET, DELETE",
        })
    }
}

/// The `Allow` value for a route's method set.
fn allow_header(allowed: &[Method]) -> &'static str {
    match allowed {
        [Method::GET] => "GET",
        [Method::POST] => "POST",
        [Method::DELETE] => "DELETE",
        _ => "GET, PUT, DELETE",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(method: &Method, path: &str) -> Route {
        route(method, path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    fn param<'p>(method: &Method, path: &'p str) -> Option<&'p str> {
        ok(method, path).param(path)
    }

    #[test]
    fn routes_the_acquirer_surface() {
        let path = "/api/v1/auth/acquirer/demo_test_token_1";
        assert_eq!(ok(&Method::GET, path).endpoint, Endpoint::TokenExchange);
        assert_eq!(param(&Method::GET, path), Some("demo_test_token_1"));
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
            param(&Method::DELETE, "/api/v2/acquirers/branch/abc"),
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
        let dynamic = "/api/v2/acquirers/branch/b1/offer-request/dynamic";
        assert_eq!(
            ok(&Method::POST, dynamic).endpoint,
            Endpoint::OfferRequestDynamic
        );
        assert_eq!(param(&Method::POST, dynamic), Some("b1"));
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
            "/api/v2/acquirers/branch/..",
            "/api/v2/acquirers/branch/.",
            "/api/v2/acquirers/branch/%2e%2e",
            "/api/v2/acquirers/branch/a%2Fb",
            "/api/v1/acquirers/branch/a.b/offers",
            "/api/v1/auth/acquirer/..",
            "/api/v1/auth/acquirer/a%2F",
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
            Err(GatewayError::MethodNotAllowed { allow: "POST" })
        );
        assert_eq!(
            route(&Method::POST, "/api/v1/auth/acquirer/tok"),
            Err(GatewayError::MethodNotAllowed { allow: "GET" })
        );
        assert_eq!(
            route(&Method::POST, "/api/v2/acquirers/branch/b1"),
            Err(GatewayError::MethodNotAllowed {
                allow: "GET, PUT, DELETE"
            })
        );
    }
}
