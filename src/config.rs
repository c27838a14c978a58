//! The config file as written: serde structs only (`deny_unknown_fields`, every key
//! defaulted and documented in `config/gateway.toml`). Nothing here is checked beyond
//! types; [`crate::settings::Settings::build`] turns it into what the gateway runs on.
//!
//! An empty file is a valid production config pointed at Diia's production host.

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// The whole file.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct FileConfig {
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
    /// Several instances acting as one toward Diia, through Redis (off by default).
    pub scaleout: ScaleoutConfig,
    /// The callback relay (off by default).
    pub callback_relay: CallbackRelayConfig,
    /// When present, the Diia simulator runs in-process and is the upstream
    /// (`upstream.base_url` is then ignored): the demo and quick tries. Kept as a raw
    /// table here; only a build with the `embedded-sim` feature accepts it.
    pub simulator: Option<toml::Table>,
}

impl FileConfig {
    /// Parses TOML text (types and unknown keys only).
    pub fn parse(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }
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
    /// Time from accept to a complete first request head (TLS handshake, h1 headers or
    /// h2 preface + HEADERS), and for each later h1 head (slowloris guard).
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// Largest request head in bytes (one header or all of them); 431 above.
    pub max_header_bytes: usize,
    /// Concurrent HTTP/2 streams per connection.
    pub max_streams_per_connection: u32,
    /// Branch-listener threads, each with its own single-threaded runtime and its own
    /// `SO_REUSEPORT` socket (0: one work-stealing runtime over all cores, as before).
    pub workers: usize,
    /// A connection with nothing to read for this long is closed (must exceed request_deadline).
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// A response that makes no write progress for this long closes its connection (a
    /// reader that stops reading; an HTTP/2 peer that gives no send window).
    #[serde(with = "humantime_serde")]
    pub send_timeout: Duration,
    /// On SIGTERM, `/readyz` fails this long before the listener closes, so load balancers
    /// stop sending new traffic first.
    #[serde(with = "humantime_serde")]
    pub drain_delay: Duration,
    /// After the listener closes, time in-flight requests get to finish.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// TLS termination on the branch listener (absent: plain HTTP).
    pub tls: Option<ServerTlsConfig>,
    /// Load balancers whose word on the client's address is taken (CIDRs or addresses);
    /// from any other peer `X-Forwarded-For`, `Forwarded` and PROXY headers are ignored or
    /// refused. Empty: every client is its TCP peer.
    pub trusted_proxies: Vec<String>,
    /// Trusted proxies open each connection with a PROXY protocol header (v1 or v2), which
    /// names the client; mandatory from them. Off: `forwarded_header` names the client.
    pub proxy_protocol: bool,
    /// Which header a trusted proxy (without `proxy_protocol`) appends the client to.
    pub forwarded_header: ForwardedHeader,
    /// Connections one client may hold at once (the real client behind a trusted proxy;
    /// IPv6 by `limits.ipv6_prefix`); more are closed at accept.
    pub max_connections_per_client: usize,
}

/// The header a trusted load balancer names the client in; only that one is read (a
/// client could write the other one itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum ForwardedHeader {
    /// `X-Forwarded-For: client, proxy1, …`.
    #[default]
    XForwardedFor,
    /// RFC 7239 `Forwarded: for=client, for=proxy1, …`.
    Forwarded,
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
    /// PEM CRL files (one per issuing CA of the client chains); a revoked client
    /// certificate is refused. Re-read on reload: new handshakes fail, and requests on
    /// connections already open get 401 `client_certificate_revoked`.
    #[serde(default)]
    pub client_crl: Vec<PathBuf>,
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
            max_header_bytes: 32 * 1024,
            max_streams_per_connection: 100,
            workers: 0,
            idle_timeout: Duration::from_secs(60),
            send_timeout: Duration::from_secs(10),
            drain_delay: Duration::from_secs(2),
            drain_timeout: Duration::from_secs(15),
            tls: None,
            trusted_proxies: Vec::new(),
            proxy_protocol: false,
            forwarded_header: ForwardedHeader::XForwardedFor,
            max_connections_per_client: 1000,
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
            replay_ttl: Duration::from_secs(180),
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
    /// Pass-through: how long a session token Diia refused with 401 is answered 401 by the
    /// gateway itself, without a Diia call.
    #[serde(with = "humantime_serde")]
    pub refused_ttl: Duration,
}

impl Default for TokenConfig {
    fn default() -> Self {
        Self {
            refresh_margin: Duration::from_secs(5 * 60),
            refused_ttl: Duration::from_secs(60),
        }
    }
}

/// `[limits]`
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Per-branch budget for scans (identification, sharing) and branch-scoped calls.
    pub branch: BranchLimitConfig,
    /// Per-client budget over every request (client address, or the managed-mode API key):
    /// rotating `branchId`s cannot get around it.
    pub client: ClientLimitConfig,
    /// Per-client budget for token exchanges that reach Diia (a cached login is never refused).
    pub login: LoginLimitConfig,
    /// Per-client budget for status polls (`document-request/status`, `offer-request/status`).
    pub poll: PollLimitConfig,
    /// Keys tracked per budget at most; past it the longest-idle key is forgotten first.
    pub max_tracked: u64,
    /// The gateway-wide budget toward Diia.
    pub diia: DiiaLimitConfig,
    /// Pass-through: Diia calls carrying a session token Diia has not accepted yet spend
    /// this budget (all clients together), never `diia`.
    pub unverified: UnverifiedLimitConfig,
    /// IPv6 clients count as one per this prefix length (0..=128): whoever holds a /64
    /// holds every address in it.
    pub ipv6_prefix: u8,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            branch: BranchLimitConfig::default(),
            client: ClientLimitConfig::default(),
            login: LoginLimitConfig::default(),
            poll: PollLimitConfig::default(),
            max_tracked: 50_000,
            diia: DiiaLimitConfig::default(),
            unverified: UnverifiedLimitConfig::default(),
            ipv6_prefix: 64,
        }
    }
}

/// `[limits.unverified]`
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct UnverifiedLimitConfig {
    /// Sustained Diia calls per second with not-yet-accepted session tokens.
    pub per_second: NonZeroU32,
    /// Such calls allowed at once above the sustained rate.
    pub burst: NonZeroU32,
}

impl Default for UnverifiedLimitConfig {
    fn default() -> Self {
        Self {
            per_second: NonZeroU32::new(5).unwrap_or(NonZeroU32::MIN),
            burst: NonZeroU32::new(10).unwrap_or(NonZeroU32::MIN),
        }
    }
}

/// A sustained rate per minute and a burst.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateConfig {
    /// Sustained requests per minute.
    pub per_minute: NonZeroU32,
    /// Requests allowed at once above the sustained rate.
    pub burst: NonZeroU32,
}

impl RateConfig {
    /// A rate; zeros become 1.
    #[must_use]
    pub fn new(per_minute: u32, burst: u32) -> Self {
        Self {
            per_minute: NonZeroU32::new(per_minute).unwrap_or(NonZeroU32::MIN),
            burst: NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN),
        }
    }
}

/// Declares one `[limits.*]` rate section with its own defaults (a partial table keeps
/// the section's default for the key it leaves out).
macro_rules! rate_section {
    ($(#[$doc:meta])* $name:ident, $per_minute:literal, $burst:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
        #[serde(default, deny_unknown_fields)]
        pub struct $name {
            /// Sustained requests per minute.
            pub per_minute: NonZeroU32,
            /// Requests allowed at once above the sustained rate.
            pub burst: NonZeroU32,
        }

        impl Default for $name {
            fn default() -> Self {
                let rate = RateConfig::new($per_minute, $burst);
                Self {
                    per_minute: rate.per_minute,
                    burst: rate.burst,
                }
            }
        }

        impl From<$name> for RateConfig {
            fn from(section: $name) -> Self {
                Self {
                    per_minute: section.per_minute,
                    burst: section.burst,
                }
            }
        }
    };
}

rate_section!(
    /// `[limits.branch]`
    BranchLimitConfig,
    120,
    20
);
rate_section!(
    /// `[limits.login]`
    LoginLimitConfig,
    60,
    20
);
rate_section!(
    /// `[limits.poll]`
    PollLimitConfig,
    600,
    60
);

/// `[limits.client]`
#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ClientLimitConfig {
    /// Sustained requests per minute per client.
    pub per_minute: NonZeroU32,
    /// Burst per client.
    pub burst: NonZeroU32,
    /// The largest share of the Diia budget one client's calls may take, in `(0, 1]`: a
    /// flood from one client leaves the rest for everyone else. Set 1.0 when one backend
    /// serves every branch.
    pub diia_share: f64,
}

impl Default for ClientLimitConfig {
    fn default() -> Self {
        let rate = RateConfig::new(600_000, 10_000);
        Self {
            per_minute: rate.per_minute,
            burst: rate.burst,
            diia_share: 0.5,
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
#[derive(Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// `pass-through`: branches send Diia's own headers. `managed`: the gateway holds the
    /// acquirer token and injects the session token; branches authenticate to the gateway.
    pub mode: AuthMode,
    /// The acquirer token (prefer the environment variable below: config files leak).
    pub acquirer_token: Option<String>,
    /// The auth acquirer token (Basic credentials), if Diia issued one.
    pub auth_token: Option<String>,
    /// Environment variable read for the acquirer token when `acquirer_token` is absent.
    pub acquirer_token_env: String,
    /// Environment variable read for the auth acquirer token when `auth_token` is absent.
    pub auth_token_env: String,
    /// How branches authenticate in managed mode: `api-key` (header `X-Api-Key`) or `mtls`.
    pub branch_auth: BranchAuth,
    /// Per-branch API keys, as SHA-256 hex digests (`printf %s KEY | sha256sum`).
    pub api_keys: Vec<ApiKeyConfig>,
    /// `branch_auth = "mtls"`: which client certificate acts for which branch. Empty: every
    /// certificate `server.tls.client_ca` signed is acquirer-wide. Otherwise a certificate
    /// none of whose names is listed is refused (403 `client_certificate_not_listed`).
    pub client_certs: Vec<ClientCertConfig>,
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
            client_certs: Vec::new(),
        }
    }
}

impl std::fmt::Debug for AuthConfig {
    /// The tokens are never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthConfig")
            .field("mode", &self.mode)
            .field(
                "acquirer_token",
                &self.acquirer_token.as_ref().map(|_| "<redacted>"),
            )
            .field(
                "auth_token",
                &self.auth_token.as_ref().map(|_| "<redacted>"),
            )
            .field("acquirer_token_env", &self.acquirer_token_env)
            .field("auth_token_env", &self.auth_token_env)
            .field("branch_auth", &self.branch_auth)
            .field("api_keys", &self.api_keys)
            .field("client_certs", &self.client_certs)
            .finish()
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
    /// An acquirer-wide key (back office): may act for any branch and make the
    /// acquirer-wide calls (branch create/update/delete, lists, offers). A per-branch key
    /// (the default) may only send its own `branch` as `branchId`.
    #[serde(default)]
    pub acquirer_wide: bool,
}

/// One client certificate identity (`auth.client_certs`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientCertConfig {
    /// The branch it acts for (its budgets' key), as a per-branch API key does.
    pub branch: String,
    /// The certificate's name: one of its DNS subject alternative names or, for a
    /// certificate without any, its subject common name. Exact, case-insensitive.
    pub name: String,
    /// An acquirer-wide certificate (back office): any branch, and the acquirer-wide
    /// calls; its budgets are keyed on `name`.
    #[serde(default)]
    pub acquirer_wide: bool,
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

/// `[scaleout]`: several gateway instances share the Diia budget, cache, coalescing,
/// sharing replay and session tokens through one Redis (or Valkey) primary.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScaleoutConfig {
    /// Off by default: every instance stands alone.
    pub enabled: bool,
    /// `redis://host:port[/db]` or `rediss://` (TLS). A user name may be given in the URL
    /// (`redis://gateway@host:6379`); the password comes from `redis_password_file`.
    pub redis_url: String,
    /// A file holding the Redis password (first line), for a `requirepass` or ACL user.
    pub redis_password_file: Option<PathBuf>,
    /// PEM trust roots for `rediss://` (default: the system's).
    pub redis_ca_file: Option<PathBuf>,
    /// A file holding 32 random bytes as 64 hex digits, the same on every instance: keys in
    /// Redis are MACs under it and values are sealed with it. Required.
    pub secret_file: Option<PathBuf>,
    /// Names the secret (rotation: instances with another id do not read its values).
    pub secret_id: String,
    /// Longest a Redis command may take before Redis counts as down.
    #[serde(with = "humantime_serde")]
    pub command_timeout: Duration,
    /// Longest a connection to Redis may take.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// How often a down Redis is probed.
    #[serde(with = "humantime_serde")]
    pub probe_interval: Duration,
    /// How often this instance says it is alive (the live count divides local budgets).
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// An instance not heard from for this long no longer counts.
    #[serde(with = "humantime_serde")]
    pub instance_ttl: Duration,
    /// How long a leader's claim on a key lasts when it never finishes (default:
    /// `upstream.timeout` + `limits.diia.max_wait` + 1 s). Sharing claims last 3 minutes.
    #[serde(with = "humantime_serde::option")]
    pub lease: Option<Duration>,
    /// How long a sharing request waits out a Redis that does not answer (a stall, a fork
    /// pause) before `503 sharing_unavailable`: it is never sent on unknown fleet state.
    #[serde(with = "humantime_serde")]
    pub sharing_wait: Duration,
}

impl Default for ScaleoutConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            redis_url: "redis://127.0.0.1:6379".to_owned(),
            redis_password_file: None,
            redis_ca_file: None,
            secret_file: None,
            secret_id: "1".to_owned(),
            command_timeout: Duration::from_millis(25),
            connect_timeout: Duration::from_millis(250),
            probe_interval: Duration::from_millis(500),
            heartbeat_interval: Duration::from_secs(1),
            instance_ttl: Duration::from_secs(5),
            lease: None,
            sharing_wait: Duration::from_millis(500),
        }
    }
}

/// `[callback_relay]`: Diia's document packages received, stored sealed, and delivered to
/// the branch that asked (off by default). Only a restart applies a change.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CallbackRelayConfig {
    /// Off by default: no relay listener, no store.
    pub enabled: bool,
    /// The relay's own listener (TLS through `[server.tls]` when set).
    pub listen: SocketAddr,
    /// The ingress path is `{path_prefix}/{token}`.
    pub path_prefix: String,
    /// Largest callback body, in bytes (413 above).
    pub max_body: usize,
    /// Memory for callbacks in flight, each charged three times its length; beyond, 503 +
    /// `Retry-After`.
    pub max_in_flight_bytes: usize,
    /// Where the store keeps `relay.db`.
    pub data_dir: PathBuf,
    /// `always` (every commit synced) or `batch`.
    pub fsync: FsyncMode,
    /// Seal and MAC keys, `id = <64 hex>` lines, newest first. Required.
    pub seal_key_file: Option<PathBuf>,
    /// The most the database may grow to, in bytes (0: the disk is the limit); beyond,
    /// callbacks are answered 503 and Diia retries.
    pub max_db_bytes: u64,
    /// How long a recorded route waits for its callback.
    #[serde(with = "humantime_serde")]
    pub route_ttl: Duration,
    /// Pauses between delivery attempts (`["1s", "5s", …]`); the last repeats.
    pub retry_schedule: Vec<String>,
    /// An undelivered record this old is dead.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// One delivery attempt's deadline.
    #[serde(with = "humantime_serde")]
    pub delivery_timeout: Duration,
    /// Deliveries in flight per target.
    pub per_target_concurrency: usize,
    /// How long a delivered record's tombstone is kept.
    #[serde(with = "humantime_serde")]
    pub tombstone_ttl: Duration,
    /// How long a dead record is kept (admin may redeliver it).
    #[serde(with = "humantime_serde")]
    pub dead_retention: Duration,
    /// How long an unrouted record is kept.
    #[serde(with = "humantime_serde")]
    pub orphan_retention: Duration,
    /// `[[callback_relay.acquirer]]`
    pub acquirer: Vec<RelayAcquirerConfig>,
    /// `[[callback_relay.target]]`
    pub target: Vec<RelayTargetConfig>,
}

/// `callback_relay.fsync`
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FsyncMode {
    /// Every commit synced before the 200.
    Always,
    /// Commits reach the OS; the disk at checkpoints.
    Batch,
}

impl Default for CallbackRelayConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            listen: SocketAddr::from(([127, 0, 0, 1], 8070)),
            path_prefix: "/diia/callback".to_owned(),
            max_body: 16 * 1024 * 1024,
            max_in_flight_bytes: 64 * 1024 * 1024,
            data_dir: PathBuf::from("/var/lib/diia-gateway/relay"),
            fsync: FsyncMode::Always,
            seal_key_file: None,
            max_db_bytes: 0,
            route_ttl: Duration::from_secs(3600),
            retry_schedule: ["1s", "5s", "30s", "2m", "10m"].map(str::to_owned).to_vec(),
            max_age: Duration::from_secs(24 * 3600),
            delivery_timeout: Duration::from_secs(15),
            per_target_concurrency: 8,
            tombstone_ttl: Duration::from_secs(24 * 3600),
            dead_retention: Duration::from_secs(7 * 24 * 3600),
            orphan_retention: Duration::from_secs(24 * 3600),
            acquirer: Vec::new(),
            target: Vec::new(),
        }
    }
}

/// `[[callback_relay.acquirer]]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayAcquirerConfig {
    /// The acquirer's name (logs, metrics, the store's clear column).
    pub name: String,
    /// A file holding the 256-bit path token (64 hex digits or 43 base64url characters).
    pub path_token_file: PathBuf,
    /// The PEM certificate Diia encrypts this acquirer's packages to.
    pub recipient_cert_file: PathBuf,
    /// The target for branches no target lists.
    #[serde(default)]
    pub default_target: Option<String>,
}

/// `[[callback_relay.target]]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayTargetConfig {
    /// The target's name.
    pub name: String,
    /// Where packages are POSTed (`http://` or `https://`).
    pub url: String,
    /// A file holding the Standard Webhooks secret (`whsec_<base64>`).
    pub signing_secret_file: PathBuf,
    /// The branch ids it serves, or `["*"]`.
    pub branch_ids: Vec<String>,
}
