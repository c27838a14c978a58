//! Who is calling: the one place callers are authenticated (bearer session token in
//! pass-through mode; API key or client certificate in managed mode).
//!
//! The caller's identity is part of every cache key, so a cached answer is only ever
//! found by the acquirer whose request made it.

use std::sync::Arc;

use http::Method;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::{ApiKeyConfig, AuthMode};
use crate::error::GatewayError;
use crate::head::RequestHead;
use crate::request::{Checked, bearer_credential, bearer_token};
use crate::route::Endpoint;

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
    },
}

/// What a managed-mode key may do.
#[derive(Debug, PartialEq, Eq)]
pub enum Scope {
    /// Act as this one branch only.
    Branch(String),
    /// Act for the whole acquirer (an acquirer-wide key, or a client certificate).
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

    /// Whether this caller may make this request: in managed mode a per-branch key acts
    /// only as its own branch and never makes acquirer-wide calls. Pass-through callers
    /// are Diia's to judge (their session token is the acquirer's).
    pub fn may(&self, method: &Method, checked: &Checked<'_>) -> Result<(), GatewayError> {
        let Self::Branch { scope } = self else {
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
            } => *branch,
            Checked::Forward {
                endpoint: Endpoint::Branches,
                branch: Some(branch),
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
    /// Managed mode with client certificates (checked in the TLS handshake).
    Mtls,
}

impl<'a> Gate<'a> {
    /// The gate for an auth mode and the current keys.
    #[must_use]
    pub fn new(mode: AuthMode, keys: Option<&'a ApiKeys>) -> Self {
        match (mode, keys) {
            (AuthMode::PassThrough, _) => Self::PassThrough,
            (AuthMode::Managed, Some(keys)) => Self::ApiKeys(keys),
            (AuthMode::Managed, None) => Self::Mtls,
        }
    }

    /// Authenticates the caller of `endpoint` from its headers.
    pub fn authenticate(
        &self,
        endpoint: Endpoint,
        head: &RequestHead,
    ) -> Result<Caller, GatewayError> {
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
                })
            }
            Self::Mtls => Ok(Caller::Branch {
                scope: Arc::new(Scope::Acquirer),
            }),
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

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
    fn session_identity_is_the_token() {
        let head = RequestHead {
            authorization: Some(HeaderValue::from_static("Bearer abc")),
            ..RequestHead::default()
        };
        let caller = Gate::PassThrough
            .authenticate(Endpoint::DocumentIdentification, &head)
            .expect("bearer");
        assert_eq!(caller.identity(b"acq", &head), b"abc");
        let missing = Gate::PassThrough.authenticate(Endpoint::Branches, &RequestHead::default());
        assert_eq!(missing.err(), Some(GatewayError::MissingAuthorization));
    }
}
