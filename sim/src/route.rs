//! The simulator's route table: Diia's acquirer paths as the public docs list them, matched
//! on whole segments. Independent of the gateway's router on purpose.

use http::Method;

/// An acquirer endpoint; the label is the key in `GET /sim/stats`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `GET /api/v1/auth/acquirer/{acquirerToken}`
    TokenExchange,
    /// `POST /api/v1/acquirers/document-identification`
    DocumentIdentification,
    /// `POST /api/v1/acquirers/document-identification/age`
    DocumentIdentificationAge,
    /// `POST /api/v1/acquirers/document-request`
    DocumentRequest,
    /// `GET /api/v1/acquirers/document-request/status`
    DocumentRequestStatus,
    /// Branch create, read, update, delete, list.
    Branches,
    /// Offer create, list, delete.
    Offers,
    /// `POST /api/v2/acquirers/branch/{id}/offer-request/dynamic`
    OfferRequestDynamic,
    /// `GET /api/v1/acquirers/offer-request/status`
    OfferRequestStatus,
}

impl Endpoint {
    /// Every endpoint, in the order of the stats JSON.
    pub const ALL: [Self; 9] = [
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

    /// The stats key.
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

    pub(crate) fn slot(self) -> usize {
        self as usize
    }
}

/// A matched request: the endpoint and the ids in its path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Matched {
    /// The endpoint.
    pub endpoint: Endpoint,
    /// The acquirer token or branch id in the path.
    pub id: Option<String>,
    /// The offer id in `DELETE …/offer/{offerId}`.
    pub offer: Option<String>,
}

/// Why a request matched nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unmatched {
    /// No such path.
    NotFound,
    /// The path exists with other methods.
    Method,
}

/// Matches a request line against the table.
pub fn find(method: &Method, path: &str) -> Result<Matched, Unmatched> {
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let m = method.as_str();
    let one = |endpoint| Matched {
        endpoint,
        id: None,
        offer: None,
    };
    let with = |endpoint, id: &str| Matched {
        endpoint,
        id: Some(id.to_owned()),
        offer: None,
    };
    let (found, methods): (Matched, &[&str]) = match segments.as_slice() {
        ["api", "v1", "auth", "acquirer", token] if !token.is_empty() => {
            (with(Endpoint::TokenExchange, token), &["GET"])
        }
        ["api", "v1", "acquirers", "document-identification"] => {
            (one(Endpoint::DocumentIdentification), &["POST"])
        }
        ["api", "v1", "acquirers", "document-identification", "age"] => {
            (one(Endpoint::DocumentIdentificationAge), &["POST"])
        }
        ["api", "v1", "acquirers", "document-request"] => {
            (one(Endpoint::DocumentRequest), &["POST"])
        }
        ["api", "v1", "acquirers", "document-request", "status"] => {
            (one(Endpoint::DocumentRequestStatus), &["GET"])
        }
        ["api", "v1", "acquirers", "offer-request", "status"] => {
            (one(Endpoint::OfferRequestStatus), &["GET"])
        }
        ["api", "v1" | "v2", "acquirers", "branches"] => (one(Endpoint::Branches), &["GET"]),
        ["api", "v1" | "v2", "acquirers", "branch"] => (one(Endpoint::Branches), &["POST"]),
        ["api", "v1" | "v2", "acquirers", "branch", id] if is_id(id) => {
            (with(Endpoint::Branches, id), &["GET", "PUT", "DELETE"])
        }
        ["api", "v1", "acquirers", "branch", id, "offer"] if is_id(id) => {
            (with(Endpoint::Offers, id), &["POST"])
        }
        ["api", "v1", "acquirers", "branch", id, "offers"] if is_id(id) => {
            (with(Endpoint::Offers, id), &["GET"])
        }
        ["api", "v1", "acquirers", "branch", id, "offer", offer] if is_id(id) && is_id(offer) => (
            Matched {
                endpoint: Endpoint::Offers,
                id: Some((*id).to_owned()),
                offer: Some((*offer).to_owned()),
            },
            &["DELETE"],
        ),
        [
            "api",
            "v2",
            "acquirers",
            "branch",
            id,
            "offer-request",
            "dynamic",
        ] if is_id(id) => (with(Endpoint::OfferRequestDynamic, id), &["POST"]),
        _ => return Err(Unmatched::NotFound),
    };
    if methods.contains(&m) {
        Ok(found)
    } else {
        Err(Unmatched::Method)
    }
}

/// Diia ids are 24-hex ObjectIds; the simulator's are 24 hex digits too, but accept the
/// looser charset branch backends may use for their own branch ids.
fn is_id(segment: &str) -> bool {
    !segment.is_empty()
        && segment.len() <= 64
        && segment
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_matches_the_acquirer_surface() {
        let found = find(&Method::GET, "/api/v1/auth/acquirer/tok_1").expect("route");
        assert_eq!(found.endpoint, Endpoint::TokenExchange);
        assert_eq!(found.id.as_deref(), Some("tok_1"));
        assert_eq!(
            find(&Method::DELETE, "/api/v1/acquirers/branch/b1/offer/o1")
                .expect("route")
                .offer
                .as_deref(),
            Some("o1")
        );
        assert_eq!(
            find(&Method::GET, "/api/v1/acquirers/document-identification"),
            Err(Unmatched::Method)
        );
        assert_eq!(
            find(&Method::GET, "/api/v1/acquirers/branch/../x"),
            Err(Unmatched::NotFound)
        );
    }
}
