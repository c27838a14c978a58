//! Every answer the gateway makes up itself: the one place statuses and error codes are chosen.
//!
//! Bodies follow Diia's own error shape (`name`, `message`, `code`) so branch backends
//! that already parse Diia errors need no change, plus `gatewayCode`, a stable
//! machine-readable code of ours. Matches are exhaustive: a new variant cannot silently
//! become a 500.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::Full;

/// A field that a request body must carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequiredField {
    /// `branchId`
    BranchId,
    /// `barcode` (or `qrcode` on `document-request`)
    BarcodeOrQrcode,
    /// `barcode`
    Barcode,
    /// `requestId`
    RequestId,
    /// `offerId`
    OfferId,
}

/// Which rate limit refused a request; each has its own quota, keys, code and policy name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitScope {
    /// Scans and branch-scoped calls, per branch (`limits.branch`).
    Branch,
    /// Every request, per client (`limits.client`).
    Client,
    /// Token exchanges Diia refused, per acquirer token and credentials (`limits.login`).
    Login,
    /// Status polls, per client and `requestId` (`limits.poll`).
    Poll,
}

impl LimitScope {
    /// The name in `RateLimit-Policy` / `RateLimit`.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Branch => "branch",
            Self::Client => "client",
            Self::Login => "login",
            Self::Poll => "poll",
        }
    }
}

/// Who is at fault for an error of ours.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The client sent something we refuse (4xx of ours).
    Client,
    /// A limit of ours or Diia's said no for now (429/503 of ours).
    Limit,
    /// Diia failed to answer usefully (502/504).
    Upstream,
    /// A bug of ours (500).
    Internal,
}

/// Why the gateway answered instead of Diia (or on Diia's behalf).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GatewayError {
    /// No route of Diia's acquirer API matches the path.
    #[error("unknown route")]
    UnknownRoute,
    /// The path exists but not with this method.
    #[error("method not allowed")]
    MethodNotAllowed {
        /// The route's methods, for `Allow`.
        allow: &'static str,
    },
    /// No `Authorization` header where Diia needs one.
    #[error("missing authorization")]
    MissingAuthorization,
    /// `Authorization` is not `Bearer <session token>`.
    #[error("invalid authorization")]
    InvalidAuthorization,
    /// Pass-through: Diia refused this session token with 401 a moment ago
    /// (`tokens.refused_ttl`); answered by the gateway without a Diia call.
    #[error("session token refused")]
    SessionTokenRefused,
    /// Pass-through: Diia refused these credentials (acquirer token + `Authorization`) with
    /// 401 or 403 a moment ago (`tokens.refused_ttl`); answered without a Diia call.
    #[error("credentials refused")]
    CredentialsRefused,
    /// Managed mode: no `X-Api-Key`, or not one of the configured keys.
    #[error("invalid api key")]
    InvalidApiKey,
    /// Managed mode: a per-branch key sent another branch's id.
    #[error("branch mismatch")]
    BranchMismatch,
    /// Managed mode: an acquirer-wide call made with a per-branch key.
    #[error("acquirer-wide key required")]
    AcquirerKeyRequired,
    /// Managed mode with mTLS: the connection carries no client certificate.
    #[error("client certificate required")]
    ClientCertificateRequired,
    /// Managed mode with mTLS: the certificate chains to `server.tls.client_ca` but its
    /// name matches no single `auth.client_certs` entry.
    #[error("client certificate not listed")]
    ClientCertificateNotListed,
    /// The connection's client certificate is revoked by a CRL loaded after its handshake.
    #[error("client certificate revoked")]
    ClientCertificateRevoked,
    /// Managed mode: Diia refused the gateway's own acquirer token.
    #[error("upstream refused the acquirer token")]
    UpstreamAuth,
    /// The acquirer token in the token-exchange path is empty or malformed.
    #[error("invalid acquirer token")]
    InvalidAcquirerToken,
    /// The body is larger than the configured cap.
    #[error("body too large")]
    BodyTooLarge,
    /// The client did not send its body within the deadline.
    #[error("body read timed out")]
    BodyTimeout,
    /// The body could not be read from the connection.
    #[error("body read failed")]
    BodyRead,
    /// The body is not a JSON object.
    #[error("invalid json")]
    InvalidJson,
    /// A required field is missing or not a string.
    #[error("missing field {0:?}")]
    MissingField(RequiredField),
    /// The barcode is not a 13-digit EAN-13 code.
    #[error("invalid barcode")]
    InvalidBarcode,
    /// `document-request` with both `barcode` and `qrcode`.
    #[error("barcode and qrcode")]
    BarcodeAndQrcode,
    /// A JSON route got a body that is not declared `application/json`.
    #[error("unsupported media type")]
    UnsupportedMediaType,
    /// A field value is out of shape (too long, not a string, control characters).
    #[error("invalid field")]
    InvalidField,
    /// A query parameter required by the endpoint is missing or malformed.
    #[error("invalid query")]
    InvalidQuery,
    /// A sharing request with another `requestId` is already under way for this barcode.
    #[error("sharing already requested")]
    SharingAlreadyRequested,
    /// The callback relay routes this `requestId` to another client or branch already: its
    /// documents must not be diverted, so the push does not leave.
    #[error("request id routed elsewhere")]
    RequestIdRouted,
    /// The relay's pull side has no package for this caller and `requestId` (none yet,
    /// none left, or not this caller's: all answered alike).
    #[error("callback not found")]
    CallbackNotFound,
    /// The relay's store failed, or too many pulls wait: nothing was recorded or taken.
    #[error("relay unavailable")]
    RelayUnavailable,
    /// The relay's pull path or query is malformed.
    #[error("invalid relay query")]
    InvalidRelayQuery,
    /// A sharing request whose Diia call was sent but not answered in time (or answered
    /// with garbage): the push may have happened, so the request is never sent again.
    #[error("sharing outcome unknown")]
    SharingOutcomeUnknown,
    /// Scale-out: a sharing request while the fleet's state cannot be read (Redis stalled
    /// or down past `scaleout.sharing_wait`, or its stored value does not open), and this
    /// instance holds no outcome: a second consent push is worse than a refusal.
    #[error("sharing unavailable")]
    SharingUnavailable {
        /// When the fleet's state may be readable again.
        retry_after: Duration,
    },
    /// Scale-out: the answer another instance stored does not open (corrupted, or written
    /// by someone without the fleet secret); the barcode is not sent to Diia again.
    #[error("fleet answer unreadable")]
    FleetAnswerUnreadable {
        /// The stored value's remaining life.
        retry_after: Duration,
    },
    /// A branch or client spent one of its budgets.
    #[error("rate limited")]
    RateLimited {
        /// Which budget.
        scope: LimitScope,
        /// When the branch may try again.
        retry_after: Duration,
        /// Pre-rendered `RateLimit-Policy` header value.
        policy: HeaderValue,
    },
    /// The gateway-wide budget toward Diia stayed empty for the configured wait.
    #[error("diia budget exhausted")]
    DiiaBudgetExhausted {
        /// Estimated time until the budget refills.
        retry_after: Duration,
    },
    /// Pass-through: the budget for Diia calls with session tokens Diia has not accepted
    /// yet (`limits.unverified`, shared by all clients) is empty.
    #[error("unverified budget exhausted")]
    UnverifiedBudgetExhausted {
        /// Estimated time until the budget has room.
        retry_after: Duration,
    },
    /// Diia asked us to back off (429/503 with `Retry-After`); every upstream call waits.
    #[error("diia asked to back off")]
    DiiaBackoff {
        /// Remaining back-off time.
        retry_after: Duration,
    },
    /// Diia failed repeatedly; the circuit is open and calls are refused until a probe passes.
    #[error("circuit open")]
    CircuitOpen {
        /// Remaining open time.
        retry_after: Duration,
    },
    /// More requests in flight than `server.max_in_flight`: shed before any work.
    #[error("overloaded")]
    Overloaded,
    /// Diia could not be reached (connect, TLS or connection failure).
    #[error("upstream unreachable")]
    UpstreamUnreachable,
    /// Diia answered with something that is not valid HTTP or is too large.
    #[error("upstream protocol error")]
    UpstreamProtocol,
    /// Diia did not answer within the upstream deadline (or the request deadline passed).
    #[error("upstream timeout")]
    UpstreamTimeout,
    /// A bug: should never be seen. Logged with detail, rendered without.
    #[error("internal error")]
    Internal,
}

impl GatewayError {
    /// A failure another instance published (scale-out): the errors a Diia call can end
    /// in, by [`GatewayError::code`]; anything else reads as a protocol error.
    #[must_use]
    pub fn from_remote(code: &str, retry_after: Duration) -> Self {
        match code {
            "upstream_timeout" => Self::UpstreamTimeout,
            "upstream_unreachable" => Self::UpstreamUnreachable,
            "sharing_outcome_unknown" => Self::SharingOutcomeUnknown,
            "diia_budget_exhausted" => Self::DiiaBudgetExhausted { retry_after },
            "unverified_budget_exhausted" => Self::UnverifiedBudgetExhausted { retry_after },
            "session_token_refused" => Self::SessionTokenRefused,
            "credentials_refused" => Self::CredentialsRefused,
            "diia_backoff" => Self::DiiaBackoff { retry_after },
            "sharing_unavailable" => Self::SharingUnavailable { retry_after },
            "diia_circuit_open" => Self::CircuitOpen { retry_after },
            "upstream_auth_failed" => Self::UpstreamAuth,
            _ => Self::UpstreamProtocol,
        }
    }

    /// The HTTP status the client sees.
    #[must_use]
    pub fn status(&self) -> StatusCode {
        match self {
            Self::UnknownRoute => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Self::MissingAuthorization
            | Self::InvalidAuthorization
            | Self::InvalidApiKey
            | Self::ClientCertificateRequired
            | Self::ClientCertificateRevoked
            | Self::SessionTokenRefused
            | Self::CredentialsRefused => StatusCode::UNAUTHORIZED,
            Self::BranchMismatch | Self::AcquirerKeyRequired | Self::ClientCertificateNotListed => {
                StatusCode::FORBIDDEN
            }
            Self::InvalidAcquirerToken
            | Self::MissingField(_)
            | Self::InvalidBarcode
            | Self::BarcodeAndQrcode
            | Self::InvalidField
            | Self::InvalidQuery
            | Self::InvalidRelayQuery => StatusCode::UNPROCESSABLE_ENTITY,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            Self::BodyRead | Self::InvalidJson => StatusCode::BAD_REQUEST,
            Self::SharingAlreadyRequested | Self::RequestIdRouted => StatusCode::CONFLICT,
            Self::CallbackNotFound => StatusCode::NOT_FOUND,
            Self::RelayUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::SharingOutcomeUnknown => StatusCode::GATEWAY_TIMEOUT,
            Self::SharingUnavailable { .. } | Self::FleetAnswerUnreadable { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::DiiaBudgetExhausted { .. }
            | Self::UnverifiedBudgetExhausted { .. }
            | Self::DiiaBackoff { .. }
            | Self::CircuitOpen { .. }
            | Self::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
            Self::UpstreamUnreachable | Self::UpstreamProtocol | Self::UpstreamAuth => {
                StatusCode::BAD_GATEWAY
            }
            Self::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Our stable machine-readable code, also the `outcome` detail in logs.
    #[must_use]
    pub fn code(&self) -> &'static str {
        match self {
            Self::UnknownRoute => "unknown_route",
            Self::MethodNotAllowed { .. } => "method_not_allowed",
            Self::MissingAuthorization => "missing_authorization",
            Self::InvalidAuthorization => "invalid_authorization",
            Self::InvalidApiKey => "invalid_api_key",
            Self::SessionTokenRefused => "session_token_refused",
            Self::CredentialsRefused => "credentials_refused",
            Self::BranchMismatch => "branch_mismatch",
            Self::AcquirerKeyRequired => "acquirer_key_required",
            Self::ClientCertificateRequired => "client_certificate_required",
            Self::ClientCertificateNotListed => "client_certificate_not_listed",
            Self::ClientCertificateRevoked => "client_certificate_revoked",
            Self::UpstreamAuth => "upstream_auth_failed",
            Self::InvalidAcquirerToken => "invalid_acquirer_token",
            Self::BodyTooLarge => "body_too_large",
            Self::BodyTimeout => "body_timeout",
            Self::BodyRead => "body_read_failed",
            Self::InvalidJson => "invalid_json",
            Self::MissingField(_) => "missing_field",
            Self::InvalidBarcode => "invalid_barcode",
            Self::BarcodeAndQrcode => "barcode_and_qrcode",
            Self::UnsupportedMediaType => "unsupported_media_type",
            Self::InvalidField => "invalid_field",
            Self::InvalidQuery => "invalid_query",
            Self::SharingAlreadyRequested => "sharing_already_requested",
            Self::RequestIdRouted => "request_id_routed",
            Self::CallbackNotFound => "callback_not_found",
            Self::RelayUnavailable => "relay_unavailable",
            Self::InvalidRelayQuery => "invalid_relay_query",
            Self::SharingOutcomeUnknown => "sharing_outcome_unknown",
            Self::SharingUnavailable { .. } => "sharing_unavailable",
            Self::FleetAnswerUnreadable { .. } => "fleet_answer_unreadable",
            Self::RateLimited { scope, .. } => match scope {
                LimitScope::Branch => "branch_rate_limited",
                LimitScope::Client => "client_rate_limited",
                LimitScope::Login => "login_rate_limited",
                LimitScope::Poll => "poll_rate_limited",
            },
            Self::DiiaBudgetExhausted { .. } => "diia_budget_exhausted",
            Self::UnverifiedBudgetExhausted { .. } => "unverified_budget_exhausted",
            Self::DiiaBackoff { .. } => "diia_backoff",
            Self::Overloaded => "overloaded",
            Self::CircuitOpen { .. } => "diia_circuit_open",
            Self::UpstreamUnreachable => "upstream_unreachable",
            Self::UpstreamProtocol => "upstream_protocol_error",
            Self::UpstreamTimeout => "upstream_timeout",
            Self::Internal => "internal_error",
        }
    }

    /// Who caused the error; the request outcome in metrics is derived from it.
    #[must_use]
    pub fn fault(&self) -> Fault {
        match self {
            Self::UnknownRoute
            | Self::MethodNotAllowed { .. }
            | Self::MissingAuthorization
            | Self::InvalidAuthorization
            | Self::InvalidApiKey
            | Self::SessionTokenRefused
            | Self::CredentialsRefused
            | Self::BranchMismatch
            | Self::AcquirerKeyRequired
            | Self::ClientCertificateRequired
            | Self::ClientCertificateNotListed
            | Self::ClientCertificateRevoked
            | Self::InvalidAcquirerToken
            | Self::BodyTooLarge
            | Self::BodyTimeout
            | Self::BodyRead
            | Self::InvalidJson
            | Self::MissingField(_)
            | Self::InvalidBarcode
            | Self::BarcodeAndQrcode
            | Self::UnsupportedMediaType
            | Self::InvalidField
            | Self::InvalidQuery
            | Self::SharingAlreadyRequested
            | Self::RequestIdRouted
            | Self::CallbackNotFound
            | Self::InvalidRelayQuery => Fault::Client,
            Self::RateLimited { .. }
            | Self::DiiaBudgetExhausted { .. }
            | Self::UnverifiedBudgetExhausted { .. }
            | Self::DiiaBackoff { .. }
            | Self::CircuitOpen { .. }
            | Self::Overloaded
            | Self::SharingUnavailable { .. }
            | Self::FleetAnswerUnreadable { .. }
            | Self::RelayUnavailable => Fault::Limit,
            Self::UpstreamAuth
            | Self::UpstreamUnreachable
            | Self::UpstreamProtocol
            | Self::UpstreamTimeout
            | Self::SharingOutcomeUnknown => Fault::Upstream,
            Self::Internal => Fault::Internal,
        }
    }

    /// Diia's `name` for an error of this status, so SDK error handling keeps working.
    #[must_use]
    pub fn name(&self) -> &'static str {
        match self {
            Self::UnknownRoute => "NotFoundError",
            Self::MethodNotAllowed { .. } => "MethodNotAllowedError",
            Self::MissingAuthorization
            | Self::InvalidAuthorization
            | Self::InvalidApiKey
            | Self::ClientCertificateRequired
            | Self::ClientCertificateRevoked
            | Self::SessionTokenRefused
            | Self::CredentialsRefused => "UnauthorizedError",
            Self::BranchMismatch | Self::AcquirerKeyRequired | Self::ClientCertificateNotListed => {
                "AccessDeniedError"
            }
            Self::InvalidAcquirerToken
            | Self::MissingField(_)
            | Self::InvalidBarcode
            | Self::BarcodeAndQrcode
            | Self::InvalidField
            | Self::InvalidQuery
            | Self::InvalidRelayQuery => "ValidationError",
            Self::UnsupportedMediaType => "UnsupportedMediaTypeError",
            Self::BodyTooLarge => "PayloadTooLargeError",
            Self::BodyTimeout => "RequestTimeoutError",
            Self::BodyRead | Self::InvalidJson => "BadRequestError",
            Self::SharingAlreadyRequested | Self::RequestIdRouted => "ConflictError",
            Self::CallbackNotFound => "NotFoundError",
            Self::RateLimited { .. } => "TooManyRequestsError",
            Self::DiiaBudgetExhausted { .. }
            | Self::UnverifiedBudgetExhausted { .. }
            | Self::DiiaBackoff { .. }
            | Self::CircuitOpen { .. }
            | Self::Overloaded
            | Self::SharingUnavailable { .. }
            | Self::FleetAnswerUnreadable { .. }
            | Self::RelayUnavailable => "ServiceUnavailableError",
            Self::UpstreamUnreachable | Self::UpstreamProtocol | Self::UpstreamAuth => {
                "BadGatewayError"
            }
            Self::UpstreamTimeout | Self::SharingOutcomeUnknown => "GatewayTimeoutError",
            Self::Internal => "InternalServerError",
        }
    }

    /// A human sentence; never carries request data (so it is safe to render and log).
    fn message(&self) -> &'static str {
        match self {
            Self::UnknownRoute => "No such route in Diia's acquirer API",
            Self::MethodNotAllowed { .. } => "Method not allowed on this route",
            Self::MissingAuthorization => "Empty token",
            Self::InvalidAuthorization => "Authorization must be 'Bearer <session token>'",
            Self::InvalidApiKey => "X-Api-Key is missing or unknown",
            Self::CredentialsRefused => {
                "Diia refused these credentials a moment ago; check the acquirer token and \
                 Authorization"
            }
            Self::SessionTokenRefused => {
                "Diia refused this session token; exchange the acquirer token for a new one"
            }
            Self::BranchMismatch => "This API key or certificate may only act for its own branch",
            Self::AcquirerKeyRequired => "This call needs an acquirer-wide API key or certificate",
            Self::ClientCertificateRequired => "A client certificate is required",
            Self::ClientCertificateNotListed => {
                "This client certificate is not listed in the gateway's auth.client_certs"
            }
            Self::ClientCertificateRevoked => "This client certificate has been revoked",
            Self::UpstreamAuth => "Diia refused the gateway's acquirer token",
            Self::InvalidAcquirerToken => "Acquirer token in the path is empty or malformed",
            Self::BodyTooLarge => "Request body exceeds the gateway's limit",
            Self::BodyTimeout => "Request body was not received in time",
            Self::BodyRead => "Request body could not be read",
            Self::InvalidJson => "Request body is not a JSON object",
            Self::MissingField(RequiredField::BranchId) => "Field branchId is required",
            Self::MissingField(RequiredField::Barcode) => "Field barcode is required",
            Self::MissingField(RequiredField::BarcodeOrQrcode) => {
                "Field barcode or qrcode is required"
            }
            Self::MissingField(RequiredField::RequestId) => "Field requestId is required",
            Self::MissingField(RequiredField::OfferId) => "Field offerId is required",
            Self::InvalidBarcode => "Barcode must be 13 digits with a valid EAN-13 check digit",
            Self::BarcodeAndQrcode => "Send either barcode or qrcode, not both",
            Self::UnsupportedMediaType => "Content-Type must be application/json",
            Self::InvalidField => "A field has an invalid value",
            Self::InvalidQuery => "Query must carry barcode (13-digit EAN-13) and requestId",
            Self::SharingAlreadyRequested => {
                "A sharing request with another requestId is already under way for this barcode"
            }
            Self::RequestIdRouted => {
                "The callback relay routes this requestId to another client or branch; use a new requestId"
            }
            Self::CallbackNotFound => {
                "No document package for this caller and requestId (none yet, or already acknowledged)"
            }
            Self::RelayUnavailable => "The callback relay cannot serve this now, retry later",
            Self::InvalidRelayQuery => {
                "Relay pull: requestId must be UTF-8 (percent-encoded), wait a duration such as 30s, id 32 hex digits"
            }
            Self::SharingOutcomeUnknown => {
                "Diia did not confirm this sharing request in time; the consent push may have been sent. Do not resend: poll document-request/status with this requestId"
            }
            Self::SharingUnavailable { .. } => {
                "The gateway fleet cannot tell whether this sharing request was already sent; it is not sent again. Retry later with the same requestId"
            }
            Self::FleetAnswerUnreadable { .. } => {
                "The gateway fleet holds an answer for this request that it cannot read; the request is not sent to Diia again. Retry later"
            }
            Self::RateLimited { scope, .. } => match scope {
                LimitScope::Branch => "Too many requests from this branch",
                LimitScope::Client => "Too many requests from this client",
                LimitScope::Login => "Too many refused logins with these credentials",
                LimitScope::Poll => "Too many status polls for this requestId",
            },
            Self::DiiaBudgetExhausted { .. } => "Diia request budget exhausted, retry later",
            Self::UnverifiedBudgetExhausted { .. } => {
                "Too many calls with session tokens or credentials Diia has not accepted yet, retry later"
            }
            Self::DiiaBackoff { .. } => "Diia asked to back off, retry later",
            Self::Overloaded => "Gateway overloaded, retry later",
            Self::CircuitOpen { .. } => "Diia is failing; calls are paused, retry later",
            Self::UpstreamUnreachable => "Diia is unreachable",
            Self::UpstreamProtocol => "Diia answered with an invalid response",
            Self::UpstreamTimeout => "Diia did not answer in time",
            Self::Internal => "Internal gateway error",
        }
    }

    /// The `Retry-After` this error asks the client to honour, if any.
    #[must_use]
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::RateLimited { retry_after, .. }
            | Self::DiiaBudgetExhausted { retry_after }
            | Self::UnverifiedBudgetExhausted { retry_after }
            | Self::DiiaBackoff { retry_after }
            | Self::CircuitOpen { retry_after }
            | Self::SharingUnavailable { retry_after }
            | Self::FleetAnswerUnreadable { retry_after } => Some(*retry_after),
            Self::Overloaded | Self::RelayUnavailable => Some(Duration::from_secs(1)),
            _ => None,
        }
    }

    /// Renders the JSON error response.
    #[must_use]
    pub fn to_response(&self) -> Response<Full<Bytes>> {
        let status = self.status();
        let body = format!(
            r#"{{"name":"{}","message":"{}","code":{},"gatewayCode":"{}"}}"#,
            self.name(),
            self.message(),
            status.as_u16(),
            self.code()
        );
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, JSON_CONTENT_TYPE.clone());
        if let Some(wait) = self.retry_after() {
            let secs = retry_after_secs(wait);
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
            if let Self::RateLimited { scope, policy, .. } = self {
                headers.insert("ratelimit-policy", policy.clone());
                let remaining = format!("\"{}\";r=0;t={secs}", scope.name());
                if let Ok(value) = HeaderValue::try_from(remaining) {
                    headers.insert("ratelimit", value);
                }
            }
        }
        if let Self::MethodNotAllowed { allow } = self {
            headers.insert(header::ALLOW, HeaderValue::from_static(allow));
        }
        response
    }
}

/// `application/json; charset=utf-8`, as Diia sends.
pub static JSON_CONTENT_TYPE: HeaderValue =
    HeaderValue::from_static("application/json; charset=utf-8");

/// Whole seconds for `Retry-After`, rounded up and never 0 (a 0 invites a hot retry loop).
#[must_use]
pub fn retry_after_secs(wait: Duration) -> u64 {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    secs.max(1)
}

/// Why a connection is closed at accept.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    /// A trusted proxy's connection without a valid PROXY header.
    #[error("no valid PROXY protocol header from a trusted proxy: {0}")]
    ProxyHeader(&'static str),
    /// The client already holds `server.max_connections_per_client` connections.
    #[error("client holds server.max_connections_per_client connections already")]
    TooManyConnections,
}

impl Refused {
    /// Every [`Refused::label`], in order (the metric's label set).
    pub const LABELS: [&'static str; 2] = ["proxy_header", "per_client"];

    /// The metric label.
    #[must_use]
    pub fn label(&self) -> &'static str {
        match self {
            Self::ProxyHeader(_) => Self::LABELS[0],
            Self::TooManyConnections => Self::LABELS[1],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_is_never_zero_and_rounds_up() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1001)), 2);
        assert_eq!(retry_after_secs(Duration::from_secs(3)), 3);
    }

    #[test]
    fn error_body_is_diia_shaped_json() {
        let response = GatewayError::InvalidBarcode.to_response();
        assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
        let body = response.into_body();
        let bytes = futures_util::FutureExt::now_or_never(http_body_util::BodyExt::collect(body))
            .expect("full body is ready")
            .expect("infallible")
            .to_bytes();
        let json: serde_json::Value = serde_json::from_slice(&bytes).expect("json");
        assert_eq!(json["code"], 422);
        assert_eq!(json["name"], "ValidationError");
        assert_eq!(json["gatewayCode"], "invalid_barcode");
    }

    #[test]
    fn names_follow_the_status() {
        for (error, name) in [
            (
                GatewayError::MethodNotAllowed { allow: "GET" },
                "MethodNotAllowedError",
            ),
            (GatewayError::BodyTimeout, "RequestTimeoutError"),
            (GatewayError::BodyTooLarge, "PayloadTooLargeError"),
            (GatewayError::Internal, "InternalServerError"),
            (GatewayError::UpstreamTimeout, "GatewayTimeoutError"),
        ] {
            assert_eq!(error.name(), name);
        }
    }

    #[test]
    fn branch_limit_carries_ratelimit_headers() {
        let err = GatewayError::RateLimited {
            scope: LimitScope::Branch,
            retry_after: Duration::from_millis(1500),
            policy: HeaderValue::from_static("\"branch\";q=60;w=60"),
        };
        let response = err.to_response();
        assert_eq!(response.headers()[header::RETRY_AFTER], "2");
        assert_eq!(response.headers()["ratelimit"], "\"branch\";r=0;t=2");
        assert_eq!(
            response.headers()["ratelimit-policy"],
            "\"branch\";q=60;w=60"
        );
    }
}
