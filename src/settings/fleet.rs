//! `[scaleout]` checked: the Redis URL, the fleet secret and password files read.

use std::path::Path;
use std::time::Duration;

use super::{ConfigError, invalid};
use crate::config::FileConfig;
use crate::keys::Secret;
use crate::scaleout::ScaleoutSettings;

/// `[scaleout]`: the URL, the secret and password files read, timings checked.
pub(super) fn scaleout(file: &FileConfig) -> Result<Option<ScaleoutSettings>, ConfigError> {
    let config = &file.scaleout;
    if !config.enabled {
        return Ok(None);
    }
    let url = config.redis_url.trim();
    if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
        return Err(invalid(
            "scaleout.redis_url",
            "must start with redis:// or rediss://",
        ));
    }
    if url.parse::<redis::ConnectionInfo>().is_err() {
        return Err(invalid("scaleout.redis_url", "is not a valid Redis URL"));
    }
    let read = |key: &'static str, path: &Path| {
        std::fs::read(path).map_err(|e| invalid(key, format!("{}: {e}", path.display())))
    };
    let Some(secret_file) = &config.secret_file else {
        return Err(invalid(
            "scaleout.secret_file",
            "is required: 32 random bytes as hex, the same file on every instance",
        ));
    };
    let text = String::from_utf8(read("scaleout.secret_file", secret_file)?)
        .map_err(|_| invalid("scaleout.secret_file", "is not text"))?;
    let secret = crate::scaleout::FleetSecret::parse(&text, &config.secret_id)
        .map_err(|e| invalid("scaleout.secret_file", e.to_string()))?;
    let redis_password = match &config.redis_password_file {
        Some(path) => {
            let text = String::from_utf8(read("scaleout.redis_password_file", path)?)
                .map_err(|_| invalid("scaleout.redis_password_file", "is not text"))?;
            Some(Secret::new(
                text.lines().next().unwrap_or_default().to_owned(),
            ))
        }
        None => None,
    };
    let redis_ca = match &config.redis_ca_file {
        Some(path) => Some(read("scaleout.redis_ca_file", path)?),
        None => None,
    };
    for (key, value) in [
        ("scaleout.command_timeout", config.command_timeout),
        ("scaleout.connect_timeout", config.connect_timeout),
        ("scaleout.probe_interval", config.probe_interval),
        ("scaleout.heartbeat_interval", config.heartbeat_interval),
    ] {
        if value.is_zero() {
            return Err(invalid(key, "must be above 0"));
        }
    }
    if config.instance_ttl <= config.heartbeat_interval {
        return Err(invalid(
            "scaleout.instance_ttl",
            "must be longer than scaleout.heartbeat_interval",
        ));
    }
    let lease = config
        .lease
        .unwrap_or(file.upstream.timeout + file.limits.diia.max_wait + Duration::from_secs(1));
    if lease.is_zero() {
        return Err(invalid("scaleout.lease", "must be above 0"));
    }
    Ok(Some(ScaleoutSettings {
        redis_url: url.to_owned(),
        redis_password,
        redis_ca,
        secret,
        command_timeout: config.command_timeout,
        connect_timeout: config.connect_timeout,
        probe_interval: config.probe_interval,
        heartbeat_interval: config.heartbeat_interval,
        instance_ttl: config.instance_ttl,
        lease,
        sharing_wait: config.sharing_wait,
    }))
}
