//! `[server]` and `[auth]` checked: bounds, trusted proxies, TLS, API keys and client
//! certificates, the acquirer's credentials.

use std::sync::Arc;

use tokio_rustls::TlsAcceptor;

use super::{AcquirerCredentials, ConfigError, invalid};
use crate::caller::{ApiKeys, ClientCerts};
use crate::config::{AuthConfig, AuthMode, BranchAuth, ServerConfig};
use crate::keys::Secret;

/// `[server]` bounds.
pub(super) fn check_server(server: &ServerConfig) -> Result<(), ConfigError> {
    if server.body_limit == 0 || server.body_limit > 16 * 1024 * 1024 {
        return Err(invalid(
            "server.body_limit",
            "must be between 1 and 16777216 bytes",
        ));
    }
    for (key, value) in [
        ("server.body_timeout", server.body_timeout),
        ("server.request_deadline", server.request_deadline),
        ("server.header_read_timeout", server.header_read_timeout),
        ("server.drain_timeout", server.drain_timeout),
        ("server.send_timeout", server.send_timeout),
    ] {
        if value.is_zero() {
            return Err(invalid(key, "must be above 0"));
        }
    }
    if server.idle_timeout <= server.request_deadline {
        return Err(invalid(
            "server.idle_timeout",
            "must be longer than server.request_deadline, or a waiting client is cut off",
        ));
    }
    if server.max_connections == 0 {
        return Err(invalid("server.max_connections", "must be above 0"));
    }
    if server.max_connections_per_client == 0 {
        return Err(invalid(
            "server.max_connections_per_client",
            "must be above 0",
        ));
    }
    if !(8192..=1024 * 1024).contains(&server.max_header_bytes) {
        return Err(invalid(
            "server.max_header_bytes",
            "must be between 8192 and 1048576 bytes",
        ));
    }
    if server.workers > 256 {
        return Err(invalid(
            "server.workers",
            "must be at most 256 (one per core is the point)",
        ));
    }
    if server.max_streams_per_connection == 0 {
        return Err(invalid(
            "server.max_streams_per_connection",
            "must be above 0",
        ));
    }
    if server.max_in_flight == 0 {
        return Err(invalid("server.max_in_flight", "must be above 0"));
    }
    if server.listen == server.admin_listen && server.listen.port() != 0 {
        return Err(invalid(
            "server.admin_listen",
            "must differ from server.listen",
        ));
    }
    Ok(())
}

/// `server.trusted_proxies`: CIDRs, or single addresses (a /32 or /128).
pub(super) fn trusted_proxies(server: &ServerConfig) -> Result<Vec<ipnet::IpNet>, ConfigError> {
    let nets = server
        .trusted_proxies
        .iter()
        .map(|entry| {
            let entry = entry.trim();
            entry
                .parse::<ipnet::IpNet>()
                .or_else(|_| entry.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                .map(|net| net.trunc())
                .map_err(|_| {
                    invalid(
                        "server.trusted_proxies",
                        format!("{entry:?} is no CIDR (e.g. \"10.0.0.0/8\") or address"),
                    )
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if server.proxy_protocol && nets.is_empty() {
        return Err(invalid(
            "server.proxy_protocol",
            "needs server.trusted_proxies: the load balancers that send the PROXY header",
        ));
    }
    Ok(nets)
}

/// `[server.tls]`: the acceptor and what its CRLs revoke, built once (and again by each
/// reload, to pick up renewed certificates and new CRLs).
pub(super) type ServerTls = (Option<TlsAcceptor>, Option<Arc<crate::tls::Revoked>>);

pub(super) fn tls_acceptor(server: &ServerConfig) -> Result<ServerTls, ConfigError> {
    let Some(tls) = &server.tls else {
        return Ok((None, None));
    };
    if !tls.client_crl.is_empty() && tls.client_ca.is_none() {
        return Err(invalid(
            "server.tls.client_crl",
            "needs server.tls.client_ca (CRLs revoke client certificates)",
        ));
    }
    let crls = crate::tls::crls(&tls.client_crl)
        .map_err(|problem| invalid("server.tls.client_crl", problem))?;
    let revoked = match (&tls.client_ca, crls.is_empty()) {
        (Some(ca), false) => {
            let revoked = crate::tls::Revoked::new(&crls, ca)
                .map_err(|problem| invalid("server.tls.client_crl", problem))?;
            // Nothing revoked: no per-request lookup.
            (!revoked.is_empty()).then(|| Arc::new(revoked))
        }
        (None, _) | (_, true) => None,
    };
    let config = crate::tls::server_config(&tls.cert, &tls.key, tls.client_ca.as_deref(), &crls)
        .map_err(|problem| invalid("server.tls", problem))?;
    Ok((Some(TlsAcceptor::from(config)), revoked))
}

/// `[auth]`: API keys or client certificate bindings, and the acquirer's credentials in
/// managed mode.
pub(super) type Auth = (
    Option<Arc<ApiKeys>>,
    Option<Arc<ClientCerts>>,
    Option<AcquirerCredentials>,
);

pub(super) fn auth(auth: &AuthConfig, server: &ServerConfig) -> Result<Auth, ConfigError> {
    if !auth.client_certs.is_empty()
        && (auth.mode != AuthMode::Managed || auth.branch_auth != BranchAuth::Mtls)
    {
        return Err(invalid(
            "auth.client_certs",
            "binds client certificates to branches: set auth.mode = \"managed\" and \
             auth.branch_auth = \"mtls\", or remove it",
        ));
    }
    if auth.mode == AuthMode::PassThrough {
        return Ok((None, None, None));
    }
    let credentials = credentials(auth)?;
    match auth.branch_auth {
        BranchAuth::ApiKey => {
            if auth.api_keys.is_empty() {
                return Err(invalid(
                    "auth.api_keys",
                    "managed mode with api-key branch auth needs at least one key",
                ));
            }
            let keys = ApiKeys::new(&auth.api_keys).map_err(|p| invalid("auth.api_keys", p))?;
            Ok((Some(Arc::new(keys)), None, Some(credentials)))
        }
        BranchAuth::Mtls => {
            if server
                .tls
                .as_ref()
                .and_then(|t| t.client_ca.as_ref())
                .is_none()
            {
                return Err(invalid(
                    "auth.branch_auth",
                    "mtls needs server.tls.client_ca",
                ));
            }
            let certs = ClientCerts::new(&auth.client_certs)
                .map_err(|p| invalid("auth.client_certs", p))?;
            Ok((None, Some(Arc::new(certs)), Some(credentials)))
        }
    }
}

/// The acquirer token and auth token, from the file or the environment.
pub(super) fn credentials(auth: &AuthConfig) -> Result<AcquirerCredentials, ConfigError> {
    let from_env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let acquirer_token = auth
        .acquirer_token
        .clone()
        .or_else(|| from_env(&auth.acquirer_token_env))
        .ok_or_else(|| {
            invalid(
                "auth.acquirer_token",
                format!(
                    "managed mode needs auth.acquirer_token or ${}",
                    auth.acquirer_token_env
                ),
            )
        })?;
    let auth_token = auth
        .auth_token
        .clone()
        .or_else(|| from_env(&auth.auth_token_env));
    Ok(AcquirerCredentials {
        acquirer_token: Secret::new(acquirer_token),
        auth_token: auth_token.map(Secret::new),
    })
}
