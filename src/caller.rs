//! Who is calling: the one place callers are authenticated (bearer session token in
//! pass-through mode; API key or client certificate in managed mode).
//!
//! The caller's identity is part of every cache key, so a cached answer is only ever
//! found by the acquirer whose request made it.
//!
//! A client certificate is bound exactly as an API key is: `auth.client_certs` maps a
//! certificate name to a branch (or to the whole acquirer), and a branch certificate acts
//! only as its branch. Revocation is checked twice: by rustls at the handshake (CRLs in
//! force then), and here on every request (CRLs loaded since, so a reload also stops the
//! revoked certificate's open connections).

use std::collections::HashMap;
use std::sync::Arc;

use http::Method;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::{ApiKeyConfig, AuthMode, ClientCertConfig};
use crate::error::GatewayError;
use crate::head::RequestHead;
use crate::request::Checked;
use crate::route::Endpoint;
use crate::tls::Revoked;

/// An authenticated caller.
#[derive(Debug, Clone)]
pub enum Caller {
    /// Pass-through: a branch backend with its own Diia session token (its
    /// `Authorization: Bearer …` header, checked well-formed, stays in the request).
    Session,
    /// Pass-through token exchange: whoever holds the acquirer token in the path.
    Exchange,
    /// Managed mode: a caller that proved itself to the gateway (API key or mTLS).
    Branch {
        /// What its key lets it do.
        scope: Arc<Scope>,
        /// Its client certificate's name, when it proved itself with one: the key of an
        /// acquirer-wide certificate's budgets (instead of its address).
        certificate: Option<Arc<str>>,
    },
}

/// What a managed-mode key may do.
#[derive(Debug, PartialEq, Eq)]
pub enum Scope {
    /// Act as this one branch only.
    Branch(String),
    /// Act for the whole acquirer (an acquirer-wide key or client certificate).
    Acquirer,
}

impl Caller {
    /// Who cached answers belong to: the session token in `head` (pass-through) or, in
    /// managed mode, the acquirer (`acquirer`), shared by all its branches.
    #[must_use]
    pub fn identity<'a>(&self, acquirer: &'a [u8], head: &'a RequestHead) -> &'a [u8] {
        match self {
            // Authenticated already: the token was checked by `Gate::authenticate`.
            Self::Session => bearer_credential(head),
            Self::Exchange | Self::Branch { .. } => acquirer,
        }
    }

    /// Who the callback relay hands this caller's documents to: the same session token,
    /// API key or client certificate, as a digest (`None` for the token exchange, which
    /// pushes nothing). Sealed in the route; the pull side compares it in constant time.
    #[must_use]
    pub fn relay_client(&self, head: &RequestHead) -> Option<String> {
        use sha2::Digest;
        let (kind, digest): (&str, [u8; 32]) = match self {
            Self::Exchange => return None,
            Self::Session => (
                "session",
                sha2::Sha256::digest(bearer_credential(head)).into(),
            ),
            Self::Branch { .. } => match (&head.client_cert, &head.api_key) {
                (_, Some(key)) => ("key", sha2::Sha256::digest(key.as_bytes()).into()),
                (Some(cert), None) => ("cert", cert.identity()),
                (None, None) => return None,
            },
        };
        Some(format!("{kind}:{}", hex::encode(digest)))
    }

    /// Whether this caller may make this request: in managed mode a per-branch key acts
    /// only as its own branch and never makes acquirer-wide calls. Pass-through callers
    /// are Diia's to judge (their session token is the acquirer's).
    pub fn may(&self, method: &Method, checked: &Checked<'_>) -> Result<(), GatewayError> {
        let Self::Branch { scope, .. } = self else {
            return Ok(());
        };
        let Scope::Branch(own) = scope.as_ref() else {
            return Ok(());
        };
        let named = match checked {
            Checked::Identification { branch, .. } | Checked::Sharing { branch, .. } => {
                Some(branch.as_ref())
            }
            Checked::Forward {
                endpoint: Endpoint::OfferRequestDynamic,
                branch,
                ..
            } => *branch,
            Checked::Forward {
                endpoint: Endpoint::Branches,
                branch: Some(branch),
                ..
            } if method == Method::GET => Some(*branch),
            Checked::Forward { .. } | Checked::TokenExchange { .. } => {
                return Err(GatewayError::AcquirerKeyRequired);
            }
            Checked::Status { .. } | Checked::OfferStatus { .. } => return Ok(()),
        };
        match named {
            Some(branch) if branch == own => Ok(()),
            _ => Err(GatewayError::BranchMismatch),
        }
    }
}

/// How branches prove who they are, from the settings in force.
pub enum Gate<'a> {
    /// Pass-through: Diia's own headers.
    PassThrough,
    /// Managed mode with API keys.
    ApiKeys(&'a ApiKeys),
    /// Managed mode with client certificates (verified in the TLS handshake), bound by
    /// `auth.client_certs` (`None`: every certificate is acquirer-wide).
    Mtls(Option<&'a ClientCerts>),
}

impl<'a> Gate<'a> {
    /// The gate for an auth mode and the current keys and certificate bindings.
    #[must_use]
    pub fn new(mode: AuthMode, keys: Option<&'a ApiKeys>, certs: Option<&'a ClientCerts>) -> Self {
        match (mode, keys) {
            (AuthMode::PassThrough, _) => Self::PassThrough,
            (AuthMode::Managed, Some(keys)) => Self::ApiKeys(keys),
            (AuthMode::Managed, None) => Self::Mtls(certs),
        }
    }

    /// Authenticates the caller of `endpoint` from its headers and client certificate.
    /// A certificate `revoked` lists is refused whatever the mode (it may have passed its
    /// handshake before the CRL was loaded).
    pub fn authenticate(
        &self,
        endpoint: Endpoint,
        head: &RequestHead,
        revoked: Option<&Revoked>,
    ) -> Result<Caller, GatewayError> {
        if let (Some(cert), Some(revoked)) = (&head.client_cert, revoked)
            && revoked.contains(cert)
        {
            return Err(GatewayError::ClientCertificateRevoked);
        }
        match self {
            Self::PassThrough if endpoint == Endpoint::TokenExchange => Ok(Caller::Exchange),
            Self::PassThrough => {
                bearer_token(head)?;
                Ok(Caller::Session)
            }
            Self::ApiKeys(keys) => {
                let presented = head.api_key.as_ref().ok_or(GatewayError::InvalidApiKey)?;
                let scope = keys
                    .find(presented.as_bytes())
                    .ok_or(GatewayError::InvalidApiKey)?;
                Ok(Caller::Branch {
                    scope: Arc::clone(scope),
                    certificate: None,
                })
            }
            Self::Mtls(certs) => {
                let cert = head
                    .client_cert
                    .as_ref()
                    .ok_or(GatewayError::ClientCertificateRequired)?;
                match certs {
                    Some(certs) if !certs.is_empty() => {
                        let (name, scope) = certs
                            .find(cert.names())
                            .ok_or(GatewayError::ClientCertificateNotListed)?;
                        Ok(Caller::Branch {
                            scope: Arc::clone(scope),
                            certificate: Some(Arc::clone(name)),
                        })
                    }
                    // No bindings: acquirer-wide, as before `auth.client_certs` existed.
                    Some(_) | None => Ok(Caller::Branch {
                        scope: certs.map_or_else(
                            || Arc::new(Scope::Acquirer),
                            |certs| Arc::clone(&certs.acquirer),
                        ),
                        certificate: cert.name().cloned(),
                    }),
                }
            }
        }
    }
}

/// `auth.client_certs`: certificate names (lowercase) to what they may do.
#[derive(Debug)]
pub struct ClientCerts {
    by_name: HashMap<Arc<str>, Arc<Scope>>,
    /// The scope of every certificate when there are no bindings (one allocation, shared).
    acquirer: Arc<Scope>,
}

impl ClientCerts {
    /// From config entries; names are unique (case-insensitively) and exact (no wildcard).
    pub fn new(entries: &[ClientCertConfig]) -> Result<Self, String> {
        let mut by_name = HashMap::with_capacity(entries.len());
        for entry in entries {
            let name = entry.name.to_ascii_lowercase();
            if name.is_empty() || name.contains('*') {
                return Err(format!(
                    "client cert for '{}': name must be the certificate's exact DNS name or CN",
                    entry.branch
                ));
            }
            if entry.branch.is_empty() {
                return Err(format!("client cert '{name}': branch must not be empty"));
            }
            let scope = if entry.acquirer_wide {
                Scope::Acquirer
            } else {
                Scope::Branch(entry.branch.clone())
            };
            if by_name
                .insert(Arc::<str>::from(name.as_str()), Arc::new(scope))
                .is_some()
            {
                return Err(format!("client cert '{name}' is listed twice"));
            }
        }
        Ok(Self {
            by_name,
            acquirer: Arc::new(Scope::Acquirer),
        })
    }

    /// Whether no certificate is bound (every one is then acquirer-wide).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// The one entry a certificate with these names is bound to: `None` when no name is
    /// listed, or when its names are listed for different branches (a certificate is
    /// never read as whichever branch suits the request).
    #[must_use]
    pub fn find(&self, names: &[Arc<str>]) -> Option<(&Arc<str>, &Arc<Scope>)> {
        let mut found: Option<(&Arc<str>, &Arc<Scope>)> = None;
        for name in names {
            let Some(entry) = self.by_name.get_key_value(name.as_ref()) else {
                continue;
            };
            match found {
                None => found = Some(entry),
                Some((_, scope)) if scope == entry.1 => {}
                Some(_) => return None,
            }
        }
        found
    }
}

/// Per-branch API keys, stored as SHA-256 digests and compared in constant time.
#[derive(Debug)]
pub struct ApiKeys {
    entries: Vec<([u8; 32], Arc<Scope>)>,
}

impl ApiKeys {
    /// From config entries (hex SHA-256 of each key).
    pub fn new(keys: &[ApiKeyConfig]) -> Result<Self, String> {
        let entries = keys
            .iter()
            .map(|key| {
                let bytes = hex::decode(&key.sha256)
                    .map_err(|_| format!("api key '{}': sha256 is not hex", key.branch))?;
                let digest = <[u8; 32]>::try_from(bytes)
                    .map_err(|_| format!("api key '{}': sha256 must be 32 bytes", key.branch))?;
                let scope = if key.acquirer_wide {
                    Scope::Acquirer
                } else {
                    Scope::Branch(key.branch.clone())
                };
                Ok((digest, Arc::new(scope)))
            })
            .collect::<Result<_, String>>()?;
        Ok(Self { entries })
    }

    /// The scope of `presented`, if it is one of the keys. Every configured digest is
    /// compared (no early exit), each in constant time.
    #[must_use]
    pub fn find(&self, presented: &[u8]) -> Option<&Arc<Scope>> {
        let digest: [u8; 32] = Sha256::digest(presented).into();
        let mut found = None;
        for (known, scope) in &self.entries {
            if bool::from(known.ct_eq(&digest)) {
                found = Some(scope);
            }
        }
        found
    }
}

/// Longest accepted bearer token.
const MAX_TOKEN: usize = 8192;

/// What follows `Bearer ` in `Authorization`, unchecked: for a caller [`bearer_token`]
/// already accepted (the check scans the whole token; once per request is enough).
#[must_use]
pub fn bearer_credential(head: &RequestHead) -> &[u8] {
    head.authorization
        .as_ref()
        .and_then(|value| value.as_bytes().get(7..))
        .unwrap_or_default()
}

/// The session token from `Authorization: Bearer <token>` (scheme case-insensitive, as Diia).
pub fn bearer_token(head: &RequestHead) -> Result<&[u8], GatewayError> {
    let value = head
        .authorization
        .as_ref()
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

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn bearer_parsing_follows_diia() {
        let mut head = RequestHead::default();
        assert_eq!(bearer_token(&head), Err(GatewayError::MissingAuthorization));
        let mut with = |value: &'static str| {
            head.authorization = Some(HeaderValue::from_static(value));
            bearer_token(&head).map(<[u8]>::to_vec)
        };
        assert_eq!(with("bearer abc.def"), Ok(b"abc.def".to_vec()));
        assert_eq!(with("Basic abc"), Err(GatewayError::InvalidAuthorization));
        assert_eq!(with("Bearer "), Err(GatewayError::InvalidAuthorization));
    }

    #[test]
    fn api_keys_match_by_digest() {
        let digest = hex::encode(Sha256::digest(b"branch-key-1"));
        let keys = ApiKeys::new(&[ApiKeyConfig {
            branch: "kyiv-001".to_owned(),
            sha256: digest,
            acquirer_wide: false,
        }])
        .expect("valid");
        assert_eq!(
            keys.find(b"branch-key-1").map(AsRef::as_ref),
            Some(&Scope::Branch("kyiv-001".to_owned()))
        );
        assert!(keys.find(b"branch-key-2").is_none());
        assert!(keys.find(b"").is_none());
        assert!(
            ApiKeys::new(&[ApiKeyConfig {
                branch: "x".to_owned(),
                sha256: "zz".to_owned(),
                acquirer_wide: false,
            }])
            .is_err()
        );
    }

    #[test]
    fn a_certificate_is_bound_to_one_entry_or_none() {
        let entry = |branch: &str, name: &str, acquirer_wide| ClientCertConfig {
            branch: branch.to_owned(),
            name: name.to_owned(),
            acquirer_wide,
        };
        let certs = ClientCerts::new(&[
            entry("kyiv-001", "Kyiv.Example", false),
            entry("kyiv-001", "kyiv-renewed.example", false),
            entry("lviv-002", "lviv.example", false),
            entry("office", "office.example", true),
        ])
        .expect("valid");
        let names = |list: &[&str]| list.iter().map(|n| Arc::from(*n)).collect::<Vec<_>>();
        let scope = |list: &[&str]| certs.find(&names(list)).map(|(_, scope)| scope.as_ref());
        let kyiv = Scope::Branch("kyiv-001".to_owned());
        assert_eq!(scope(&["kyiv.example"]), Some(&kyiv));
        assert_eq!(scope(&["other", "kyiv.example"]), Some(&kyiv));
        assert_eq!(
            scope(&["kyiv.example", "kyiv-renewed.example"]),
            Some(&kyiv)
        );
        assert_eq!(scope(&["office.example"]), Some(&Scope::Acquirer));
        assert_eq!(
            scope(&["kyiv.example", "lviv.example"]),
            None,
            "two branches"
        );
        assert_eq!(scope(&["kyiv.example", "office.example"]), None);
        assert_eq!(scope(&["nobody.example"]), None);
        assert_eq!(scope(&[]), None);
        for bad in [
            vec![entry("a", "*.example", false)],
            vec![entry("a", "", false)],
            vec![entry("", "a.example", false)],
            vec![
                entry("a", "a.example", false),
                entry("b", "A.example", false),
            ],
        ] {
            assert!(ClientCerts::new(&bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn session_identity_is_the_token() {
        let head = RequestHead {
            authorization: Some(HeaderValue::from_static("Bearer abc")),
            ..RequestHead::default()
        };
        let caller = Gate::PassThrough
            .authenticate(Endpoint::DocumentIdentification, &head, None)
            .expect("bearer");
        assert_eq!(caller.identity(b"acq", &head), b"abc");
        let missing =
            Gate::PassThrough.authenticate(Endpoint::Branches, &RequestHead::default(), None);
        assert_eq!(missing.err(), Some(GatewayError::MissingAuthorization));
    }
}
