//! `[upstream]` checked: per-call values, the Diia target or the embedded simulator.

use std::net::SocketAddr;

use super::{ConfigError, UpstreamTarget, UpstreamTunables, invalid};
use crate::config::{FileConfig, LimitsConfig, UpstreamConfig};

/// `[upstream]` per-call values.
pub(super) fn upstream_tunables(
    upstream: &UpstreamConfig,
    limits: &LimitsConfig,
) -> Result<UpstreamTunables, ConfigError> {
    for (key, value) in [
        ("upstream.connect_timeout", upstream.connect_timeout),
        ("upstream.timeout", upstream.timeout),
        ("upstream.breaker_cooldown", upstream.breaker_cooldown),
    ] {
        if value.is_zero() {
            return Err(invalid(key, "must be above 0"));
        }
    }
    if !(0.0..=1.0).contains(&upstream.retry_ratio) {
        return Err(invalid("upstream.retry_ratio", "must be within [0, 1]"));
    }
    if upstream.breaker_failures == 0 {
        return Err(invalid("upstream.breaker_failures", "must be above 0"));
    }
    if upstream.max_response_body == 0 {
        return Err(invalid("upstream.max_response_body", "must be above 0"));
    }
    if let Some(ca) = &upstream.ca_file {
        crate::tls::upstream_roots(Some(ca)).map_err(|p| invalid("upstream.ca_file", p))?;
    }
    Ok(UpstreamTunables {
        timeout: upstream.timeout,
        max_response_body: upstream.max_response_body,
        max_retries: upstream.max_retries,
        retry_backoff: upstream.retry_backoff,
        budget_wait: limits.diia.max_wait,
    })
}

/// `upstream.base_url`, or the embedded simulator of `[simulator]`.
pub(super) fn upstream_target(file: &FileConfig) -> Result<UpstreamTarget, ConfigError> {
    if let Some(table) = &file.simulator {
        return embedded_simulator(table, file.server.listen);
    }
    let uri: http::Uri = file
        .upstream
        .base_url
        .parse()
        .map_err(|e| invalid("upstream.base_url", format!("not a URL: {e}")))?;
    match uri.scheme_str() {
        Some("https" | "http") if uri.host().is_some() => {}
        _ => {
            return Err(invalid(
                "upstream.base_url",
                "must be an absolute http:// or https:// URL, e.g. https://api2.diia.gov.ua",
            ));
        }
    }
    if uri.query().is_some() {
        return Err(invalid("upstream.base_url", "must not carry a query"));
    }
    Ok(UpstreamTarget::Url(file.upstream.base_url.clone()))
}

/// `[simulator]`: only in a build with the simulator, and only for a gateway that listens
/// on loopback (a simulator that says every barcode is valid must never face branches).
#[cfg(feature = "embedded-sim")]
pub(super) fn embedded_simulator(
    table: &toml::Table,
    listen: SocketAddr,
) -> Result<UpstreamTarget, ConfigError> {
    use serde::Deserialize;
    let sim = diia_sim::SimConfig::deserialize(table.clone())
        .map_err(|e| invalid("simulator", e.to_string()))?;
    sim.validate().map_err(|p| invalid("simulator", p))?;
    if !listen.ip().is_loopback() {
        return Err(invalid(
            "simulator",
            "the embedded simulator is for demos and tests: server.listen must be a loopback \
             address while [simulator] is present (remove [simulator] and set upstream.base_url \
             for production)",
        ));
    }
    Ok(UpstreamTarget::Embedded(Box::new(sim)))
}

/// `[simulator]` in a build without it: say so instead of silently ignoring the table.
#[cfg(not(feature = "embedded-sim"))]
pub(super) fn embedded_simulator(
    _table: &toml::Table,
    _listen: SocketAddr,
) -> Result<UpstreamTarget, ConfigError> {
    Err(invalid(
        "simulator",
        "this build has no embedded simulator (built without the `embedded-sim` feature); \
         remove [simulator] and set upstream.base_url",
    ))
}
