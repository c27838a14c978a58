//! Configuration: TOML file → typed, validated [`Config`]; an invalid file names the key and the fix.
//!
//! Every key has a default (see `config/gateway.toml`, which documents each one), so an
//! empty file is a valid production config pointed at Diia's production host.

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::sim::SimConfig;
use crate::token::Secret;

/// A barcode lives 3 minutes at Diia; nothing about it may be remembered longer.
pub const BARCODE_LIFETIME: Duration = Duration::from_secs(180);

/// Diia session tokens live 2 hours.
pub const SESSION_TOKEN_LIFETIME: Duration = Duration::from_secs(2 * 60 * 60);

/// The whole configuration, validated.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Branch-facing and admin listeners, request bounds.
    pub server: ServerConfig,
    /// Diia (or simulator) connection.
    pub upstream: UpstreamConfig,
    /// Verification-result cache.
    pub cache: CacheConfig,
    /// Sharing (`document-request`) replay protection.
    pub sharing: SharingConfig,
    /// Session-token exchange cache.
    pub tokens: TokenConfig,
    /// Rate limits.
    pub limits: LimitsConfig,
    /// Who authenticates branches, and who holds Diia's session token.
    pub auth: AuthConfig,
    /// Logging.
    pub log: LogConfig,
    /// When present, the Diia simulator runs in-process and is the upstream
    /// (`upstream.base_url` is then ignored): the demo and quick tries.
    pub simulator: Option<SimConfig>,
}

/// `[server]`
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Branch-facing listener.
    pub listen: SocketAddr,
    /// Admin listener (`/metrics`, `/healthz`, `/readyz`); keep it off the branch network.
    pub admin_listen: SocketAddr,
    /// Largest request body accepted, in bytes (Diia's own limit is 100 kB).
    pub body_limit: usize,
    /// Time a client has to send its whole body.
    #[serde(with = "humantime_serde")]
    pub body_timeout: Duration,
    /// Longest a request may wait for an answer, including waiting behind a coalesced call.
    #[serde(with = "humantime_serde")]
    pub request_deadline: Duration,
    /// Connections served at once; more wait in the kernel's accept queue.
    pub max_connections: usize,
    /// Requests processed at once; more are shed at once with 503 `overloaded`.
    pub max_in_flight: usize,
    /// Time a client has to send its request headers (slowloris guard).
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// A connection with nothing to read for this long is closed (must exceed request_deadline).
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// On SIGTERM, `/readyz` fails this long before the listener closes, so load balancers
    /// stop sending new traffic first.
    #[serde(with = "humantime_serde")]
    pub drain_delay: Duration,
    /// After the listener closes, time in-flight requests get to finish.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// TLS termination on the branch listener (absent: plain HTTP).
    pub tls: Option<ServerTlsConfig>,
}

/// `[server.tls]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerTlsConfig {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// PEM CA bundle; when set, clients must present a certificate it signed (mTLS).
    pub client_ca: Option<PathBuf>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 9090)),
            body_limit: 100 * 1024,
            body_timeout: Duration::from_secs(5),
            request_deadline: Duration::from_secs(10),
            max_connections: 10_000,
            max_in_flight: 4096,
            header_read_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(60),
            drain_delay: Duration::from_secs(2),
            drain_timeout: Duration::from_secs(15),
            tls: None,
        }
    }
}

/// `[upstream]`
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Diia's base URL; `https://` in production, `http://` only for a simulator.
    pub base_url: String,
    /// TCP + TLS connect deadline.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Deadline for one whole upstream exchange (headers and body).
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Largest upstream response body accepted, in bytes.
    pub max_response_body: usize,
    /// How long an idle pooled connection is kept.
    #[serde(with = "humantime_serde")]
    pub pool_idle_timeout: Duration,
    /// Idle connections kept per host.
    pub pool_max_idle: usize,
    /// PEM CA bundle that alone is trusted for Diia's certificate (absent: system roots).
    pub ca_file: Option<PathBuf>,
    /// Consecutive failures (transport errors, 5xx) that open the circuit breaker.
    pub breaker_failures: u32,
    /// How long the circuit stays open before one probe call is let through.
    #[serde(with = "humantime_serde")]
    pub breaker_cooldown: Duration,
    /// Retries of a safe call (token exchange, identification) after a connect failure.
    pub max_retries: u32,
    /// Retries may spend at most this share of first calls.
    pub retry_ratio: f64,
    /// Retries available at start (and at most) before the ratio applies.
    pub retry_reserve: u32,
    /// First retry backoff; doubles per retry, with full jitter.
    #[serde(with = "humantime_serde")]
    pub retry_backoff: Duration,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            base_url: "https://api2.diia.gov.ua".to_owned(),
            connect_timeout: Duration::from_secs(2),
            timeout: Duration::from_secs(8),
            max_response_body: 4 * 1024 * 1024,
            pool_idle_timeout: Duration::from_secs(90),
            pool_max_idle: 256,
            ca_file: None,
            breaker_failures: 5,
            breaker_cooldown: Duration::from_secs(5),
            max_retries: 2,
            retry_ratio: 0.1,
            retry_reserve: 10,
            retry_backoff: Duration::from_millis(50),
        }
    }
}

/// `[cache]`
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheConfig {
    /// Life of a cached positive answer (2xx). At most the barcode's 3 minutes.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// Life of a cached definitive negative (400 used/expired, 404 not found, 422).
    #[serde(with = "humantime_serde")]
    pub negative_ttl: Duration,
    /// Bound on cached answers (each weighs its body size in bytes, at least 1 KiB).
    pub max_bytes: u64,
    /// Opt-in: keep answers this long past `ttl` and serve them when Diia fails.
    /// Off (0s) by default: a barcode lives 3 minutes, so `ttl + stale_if_error` may not
    /// exceed 180s, and an old "valid" answer is only acceptable by explicit choice.
    #[serde(with = "humantime_serde")]
    pub stale_if_error: Duration,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(60),
            negative_ttl: Duration::from_secs(10),
            max_bytes: 256 * 1024 * 1024,
            stale_if_error: Duration::ZERO,
        }
    }
}

/// `[sharing]`
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SharingConfig {
    /// How long a sharing request is remembered for replay and duplicate-push protection.
    #[serde(with = "humantime_serde")]
    pub replay_ttl: Duration,
}

impl Default for SharingConfig {
    fn default() -> Self {
        Self {
            replay_ttl: BARCODE_LIFETIME,
        }
    }
}

/// `[tokens]`
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TokenConfig {
    /// A cached session token is dropped this long before it expires at Diia.
    #[serde(with = "humantime_serde")]
    pub refresh_margin: Duration,
}

impl Default for TokenConfig {
    fn default() -> Self {
        Self {
            refresh_margin: Duration::from_secs(5 * 60),
        }
    }
}

/// `[limits]`
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Per-branch budget.
    pub branch: BranchLimitConfig,
    /// The gateway-wide budget toward Diia.
    pub diia: DiiaLimitConfig,
}

/// `[limits.branch]`
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BranchLimitConfig {
    /// Sustained requests per minute per branch.
    pub per_minute: NonZeroU32,
    /// Requests a branch may make at once above the sustained rate.
    pub burst: NonZeroU32,
}

impl Default for BranchLimitConfig {
    fn default() -> Self {
        Self {
            per_minute: NonZeroU32::new(120).unwrap_or(NonZeroU32::MIN),
            burst: NonZeroU32::new(20).unwrap_or(NonZeroU32::MIN),
        }
    }
}

/// `[limits.diia]`
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DiiaLimitConfig {
    /// Sustained calls per second the gateway sends to Diia.
    pub per_second: NonZeroU32,
    /// Calls that may go at once above the sustained rate.
    pub burst: NonZeroU32,
    /// How long a request waits for budget before a 503.
    #[serde(with = "humantime_serde")]
    pub max_wait: Duration,
    /// Longest gateway-wide pause honoured from Diia's `Retry-After`.
    #[serde(with = "humantime_serde")]
    pub max_backoff: Duration,
}

impl Default for DiiaLimitConfig {
    fn default() -> Self {
        Self {
            per_second: NonZeroU32::new(200).unwrap_or(NonZeroU32::MIN),
            burst: NonZeroU32::new(50).unwrap_or(NonZeroU32::MIN),
            max_wait: Duration::from_millis(250),
            max_backoff: Duration::from_secs(60),
        }
    }
}

/// `[auth]`
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// `pass-through`: branches send Diia's own headers. `managed`: the gateway holds the
    /// acquirer token and injects the session token; branches authenticate to the gateway.
    pub mode: AuthMode,
    /// The acquirer token (prefer the environment variable below: config files leak).
    pub acquirer_token: Option<Secret>,
    /// The auth acquirer token (Basic credentials), if Diia issued one.
    pub auth_token: Option<Secret>,
    /// Environment variable read for the acquirer token when `acquirer_token` is absent.
    pub acquirer_token_env: String,
    /// Environment variable read for the auth acquirer token when `auth_token` is absent.
    pub auth_token_env: String,
    /// How branches authenticate in managed mode: `api-key` (header `X-Api-Key`) or `mtls`.
    pub branch_auth: BranchAuth,
    /// Per-branch API keys, as SHA-256 hex digests (`printf %s KEY | sha256sum`).
    pub api_keys: Vec<ApiKeyConfig>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            mode: AuthMode::PassThrough,
            acquirer_token: None,
            auth_token: None,
            acquirer_token_env: "DIIA_ACQUIRER_TOKEN".to_owned(),
            auth_token_env: "DIIA_AUTH_ACQUIRER_TOKEN".to_owned(),
            branch_auth: BranchAuth::ApiKey,
            api_keys: Vec::new(),
        }
    }
}

impl AuthConfig {
    /// The acquirer token and auth token, from the file or the environment.
    pub fn secrets(&self) -> Result<(Secret, Option<Secret>), String> {
        let from_env = |name: &str| {
            std::env::var(name)
                .ok()
                .filter(|v| !v.is_empty())
                .map(Secret::new)
        };
        let acquirer = self
            .acquirer_token
            .clone()
            .or_else(|| from_env(&self.acquirer_token_env))
            .ok_or_else(|| {
                format!(
                    "managed mode needs auth.acquirer_token or ${}",
                    self.acquirer_token_env
                )
            })?;
        let auth = self
            .auth_token
            .clone()
            .or_else(|| from_env(&self.auth_token_env));
        Ok((acquirer, auth))
    }
}

/// Token handling mode.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum AuthMode {
    /// Branches exchange and send session tokens themselves.
    PassThrough,
    /// The gateway holds the acquirer token and manages the session token.
    Managed,
}

/// How branches prove who they are in managed mode.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum BranchAuth {
    /// `X-Api-Key: <key>`, checked against `auth.api_keys`.
    ApiKey,
    /// A client certificate verified by `server.tls.client_ca`.
    Mtls,
}

/// One branch's API key.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyConfig {
    /// Who holds it (for operators; never logged with the key).
    pub branch: String,
    /// SHA-256 of the key, hex.
    pub sha256: String,
}

/// `[log]`
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `json` (one object per line) or `text`.
    pub format: LogFormat,
    /// A `tracing` filter, e.g. `info` or `diia_gateway=debug,info`.
    pub filter: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Json,
            filter: "info".to_owned(),
        }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One JSON object per line, for log shippers.
    Json,
    /// Human-readable lines, for a terminal.
    Text,
}

/// A config that cannot be used, naming the key and what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The path given.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// TOML syntax, an unknown key, or a value of the wrong type.
    #[error("{0}")]
    Parse(String),
    /// A value of the right type that makes no sense.
    #[error("{key}: {problem}")]
    Invalid {
        /// Dotted key, e.g. `cache.ttl`.
        key: &'static str,
        /// What is wrong and how to fix it.
        problem: String,
    },
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_toml(&text)
    }

    /// Parses and validates TOML text.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let config: Self = toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks what types alone cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        fn invalid(key: &'static str, problem: impl Into<String>) -> ConfigError {
            ConfigError::Invalid {
                key,
                problem: problem.into(),
            }
        }
        let cache = &self.cache;
        if cache.ttl.is_zero() || cache.ttl > BARCODE_LIFETIME {
            return Err(invalid(
                "cache.ttl",
                format!(
                    "{} must be above 0 and at most 180s: a barcode lives 3 minutes",
                    humantime::format_duration(cache.ttl)
                ),
            ));
        }
        if cache.negative_ttl > cache.ttl {
            return Err(invalid(
                "cache.negative_ttl",
                "must not be longer than cache.ttl: negative answers are kept shorter",
            ));
        }
        if cache.ttl + cache.stale_if_error > BARCODE_LIFETIME {
            return Err(invalid(
                "cache.stale_if_error",
                "cache.ttl + cache.stale_if_error must not exceed 180s: a barcode lives 3 minutes",
            ));
        }
        if cache.max_bytes < 1024 * 1024 {
            return Err(invalid(
                "cache.max_bytes",
                "must be at least 1048576 (1 MiB)",
            ));
        }
        if self.sharing.replay_ttl.is_zero() || self.sharing.replay_ttl > BARCODE_LIFETIME {
            return Err(invalid(
                "sharing.replay_ttl",
                "must be above 0 and at most 180s: a barcode lives 3 minutes",
            ));
        }
        if self.tokens.refresh_margin >= SESSION_TOKEN_LIFETIME {
            return Err(invalid(
                "tokens.refresh_margin",
                "must be shorter than the 2h token life",
            ));
        }
        let server = &self.server;
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
            ("upstream.connect_timeout", self.upstream.connect_timeout),
            ("upstream.timeout", self.upstream.timeout),
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
        if server.max_connections == 0 || server.max_in_flight == 0 {
            return Err(invalid(
                "server.max_connections",
                "and server.max_in_flight must be above 0",
            ));
        }
        if server.listen == server.admin_listen && server.listen.port() != 0 {
            return Err(invalid(
                "server.admin_listen",
                "must differ from server.listen",
            ));
        }
        if self.simulator.is_none() {
            let uri: http::Uri = self
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
        }
        if !(0.0..=1.0).contains(&self.upstream.retry_ratio) {
            return Err(invalid("upstream.retry_ratio", "must be within [0, 1]"));
        }
        if self.upstream.breaker_failures == 0 || self.upstream.breaker_cooldown.is_zero() {
            return Err(invalid(
                "upstream.breaker_failures",
                "and upstream.breaker_cooldown must be above 0",
            ));
        }
        if self.upstream.max_response_body == 0 {
            return Err(invalid("upstream.max_response_body", "must be above 0"));
        }
        if self.limits.diia.max_backoff.is_zero() {
            return Err(invalid("limits.diia.max_backoff", "must be above 0"));
        }
        if let Some(tls) = &server.tls {
            crate::tls::server_config(&tls.cert, &tls.key, tls.client_ca.as_deref())
                .map_err(|problem| invalid("server.tls", problem))?;
        }
        if let Some(ca) = &self.upstream.ca_file {
            crate::tls::upstream_roots(Some(ca))
                .map_err(|problem| invalid("upstream.ca_file", problem))?;
        }
        if self.auth.mode == AuthMode::Managed {
            self.auth
                .secrets()
                .map_err(|problem| invalid("auth.acquirer_token", problem))?;
            match self.auth.branch_auth {
                BranchAuth::ApiKey => {
                    if self.auth.api_keys.is_empty() {
                        return Err(invalid(
                            "auth.api_keys",
                            "managed mode with api-key branch auth needs at least one key",
                        ));
                    }
                    crate::token::ApiKeys::new(&self.auth.api_keys)
                        .map_err(|problem| invalid("auth.api_keys", problem))?;
                }
                BranchAuth::Mtls => {
                    if server
                        .tls
                        .as_ref()
                        .and_then(|tls| tls.client_ca.as_ref())
                        .is_none()
                    {
                        return Err(invalid(
                            "auth.branch_auth",
                            "mtls needs server.tls.client_ca",
                        ));
                    }
                }
            }
        }
        if let Some(sim) = &self.simulator {
            sim.validate()
                .map_err(|problem| invalid("simulator", problem))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problem(text: &str) -> String {
        Config::from_toml(text)
            .expect_err("config must be refused")
            .to_string()
    }

    #[test]
    fn empty_file_is_a_valid_production_config() {
        let config = Config::from_toml("").expect("defaults are valid");
        assert_eq!(config.cache.ttl, Duration::from_secs(60));
        assert_eq!(config.upstream.base_url, "https://api2.diia.gov.ua");
    }

    #[test]
    fn errors_name_the_key() {
        assert!(problem("[cache]\nttl = \"5m\"").starts_with("cache.ttl:"));
        assert!(
            problem("[cache]\nttl = \"20s\"\nnegative_ttl = \"30s\"")
                .starts_with("cache.negative_ttl:")
        );
        assert!(problem("[upstream]\nbase_url = \"ftp://x\"").starts_with("upstream.base_url:"));
        assert!(problem("[server]\nbody_limit = 0").starts_with("server.body_limit:"));
        assert!(problem("[cache]\nttl_typo = \"5s\"").contains("ttl_typo"));
        assert!(problem("[limits.branch]\nper_minute = 0").contains("per_minute"));
        assert!(problem("[sharing]\nreplay_ttl = \"10m\"").starts_with("sharing.replay_ttl:"));
    }

    #[test]
    fn shipped_configs_load() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).expect("config dir") {
            let path = entry.expect("entry").path();
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            if name.ends_with(".toml") && !name.starts_with("sim") && !name.starts_with("scenario")
            {
                Config::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                seen += 1;
            }
        }
        assert!(seen >= 2, "gateway.toml and demo.toml must be shipped");
    }
}
