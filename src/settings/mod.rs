//! The config as the gateway runs on it: [`Settings::build`] checks a [`FileConfig`] once and
//! builds every object it implies (TLS acceptor, API keys, resolved secrets, cache policies,
//! quotas). A file that cannot be used is refused with the key and the fix.
//!
//! Settings come in two halves. [`Hot`] is everything a request reads; a reload swaps it
//! whole. [`Cold`] is what only a restart can change (listeners, caps, the pool, the
//! breaker, cache capacity, auth mode); a reload whose cold half differs is refused with
//! the differing keys named, so a reload never reports success while ignoring a change.
//!
//! Checks by table: `server` (`[server]`, `[server.tls]`, `[auth]`), `upstream`
//! (`[upstream]`, `[simulator]`), `fleet` (`[scaleout]`); the rest here.

mod fleet;
mod relay;
mod server;
mod upstream;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio_rustls::TlsAcceptor;

use crate::cache_policy::Policy;
use crate::caller::{ApiKeys, ClientCerts};
use crate::config::{AuthMode, BranchAuth, CacheConfig, FileConfig, LimitsConfig, LogFormat};
use crate::diia::{BARCODE_LIFETIME, SESSION_TOKEN_LIFETIME};
use crate::keys::{HashKey, Secret};
use crate::limit::{BudgetQuota, Limits, fleet_share};
use crate::scaleout::ScaleoutSettings;

use fleet::scaleout;
use server::{auth, check_server, tls_acceptor, trusted_proxies};
use upstream::{upstream_target, upstream_tunables};

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

fn invalid(key: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        problem: problem.into(),
    }
}

/// The checked config: the hot half a reload swaps, the cold half it may not change.
pub struct Settings {
    /// What requests read; swapped whole on reload.
    pub hot: Arc<Hot>,
    /// What needs a restart.
    pub cold: Cold,
    /// The key for cache keys and log fingerprints (random per process; fixed at start).
    pub keys: HashKey,
    /// The callback relay (`None`: `[callback_relay]` absent or off).
    pub relay: Option<Arc<crate::relay::settings::RelaySettings>>,
}

/// Everything a request reads, from one config snapshot.
pub struct Hot {
    /// Largest request body, in bytes.
    pub body_limit: usize,
    /// Time a client has to send its whole body.
    pub body_timeout: Duration,
    /// Longest a request may wait for an answer.
    pub request_deadline: Duration,
    /// Verification answers: TTLs.
    pub answers: Policy,
    /// Opt-in stale-if-error window for verification answers.
    pub stale_if_error: Duration,
    /// Session tokens from the token exchange.
    pub session_tokens: Policy,
    /// A session token is dropped (or, in managed mode, refreshed) this long before expiry.
    pub refresh_margin: Duration,
    /// Sharing requests: the replay window.
    pub sharing: Policy,
    /// Per-call upstream settings.
    pub upstream: UpstreamTunables,
    /// Per-branch and per-client budgets (each kept across a reload that does not change it).
    pub limits: Limits,
    /// The budget toward Diia (kept across a reload that does not change it).
    pub diia_budget: Arc<BudgetQuota>,
    /// TLS for new connections on the branch listener (certificates are re-read on reload).
    pub tls: Option<TlsAcceptor>,
    /// Managed mode with API keys: the keys branches present.
    pub api_keys: Option<Arc<ApiKeys>>,
    /// Managed mode with mTLS: which certificate acts for which branch.
    pub client_certs: Option<Arc<ClientCerts>>,
    /// What `server.tls.client_crl` revokes, checked per request (`None`: no CRL).
    pub revoked_certs: Option<Arc<crate::tls::Revoked>>,
    /// `[limits]` as written (fleet-wide values); `limits` and `diia_budget` hold this
    /// instance's share of them.
    pub limits_config: LimitsConfig,
    /// Live instances the local budgets are divided by (1 without scale-out).
    pub fleet: u32,
}

/// The per-call settings toward Diia that a reload may change.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UpstreamTunables {
    /// Deadline for one whole exchange.
    pub timeout: Duration,
    /// Largest answer body accepted.
    pub max_response_body: usize,
    /// Retries of a safe call after a connect failure.
    pub max_retries: u32,
    /// First retry backoff (doubles, full jitter).
    pub retry_backoff: Duration,
    /// The longest a Diia budget wait can take (part of a pending call's lock age).
    pub budget_wait: Duration,
}

impl UpstreamTunables {
    /// The longest one upstream call can take, budget waits, retries and (managed mode)
    /// a token refresh plus the retry after a 401 included: how long a pending cache entry
    /// may block its key (the "lock age").
    #[must_use]
    pub fn longest_call(&self) -> Duration {
        let attempts = 3 + self.max_retries;
        (self.timeout + self.budget_wait + self.retry_backoff * 4) * attempts
            + Duration::from_secs(1)
    }
}

impl Hot {
    /// The same settings with the local budgets at 1/`fleet` of the configured ones: each
    /// instance enforces its share locally, so abuse protection costs no round trip.
    #[must_use]
    pub fn for_fleet(&self, fleet: u32) -> Self {
        let fleet = fleet.max(1);
        let share = fleet_share(&self.limits_config, fleet);
        // Each key starts where it stood, scaled: a fleet-size change refills nothing.
        self.rebuilt(
            Limits::new(&share).carry_over(&self.limits),
            Arc::new(BudgetQuota::empty(&share.diia)),
            fleet,
        )
    }

    /// The same settings with the local Diia budget emptied (scale-out: Redis just went
    /// down, and this instance's share starts at the sustained rate, without a burst).
    #[must_use]
    pub fn with_empty_budget(&self) -> Self {
        let share = fleet_share(&self.limits_config, self.fleet);
        let limits = Limits {
            branches: Arc::clone(&self.limits.branches),
            clients: Arc::clone(&self.limits.clients),
            logins: Arc::clone(&self.limits.logins),
            polls: Arc::clone(&self.limits.polls),
            diia_shares: self.limits.diia_shares.clone(),
            unverified: Arc::clone(&self.limits.unverified),
        };
        self.rebuilt(
            limits,
            Arc::new(BudgetQuota::empty(&share.diia)),
            self.fleet,
        )
    }

    fn rebuilt(&self, limits: Limits, diia_budget: Arc<BudgetQuota>, fleet: u32) -> Self {
        Self {
            body_limit: self.body_limit,
            body_timeout: self.body_timeout,
            request_deadline: self.request_deadline,
            answers: self.answers,
            stale_if_error: self.stale_if_error,
            session_tokens: self.session_tokens,
            refresh_margin: self.refresh_margin,
            sharing: self.sharing,
            upstream: self.upstream,
            limits,
            diia_budget,
            tls: self.tls.clone(),
            api_keys: self.api_keys.clone(),
            client_certs: self.client_certs.clone(),
            revoked_certs: self.revoked_certs.clone(),
            limits_config: self.limits_config.clone(),
            fleet,
        }
    }

    /// The fleet-wide Diia budget, for the shared GCRA.
    #[must_use]
    pub fn fleet_budget(&self) -> crate::scaleout::BudgetValues {
        let diia = &self.limits_config.diia;
        crate::scaleout::BudgetValues {
            per_second: diia.per_second.get(),
            burst: diia.burst.get(),
            max_wait: diia.max_wait,
            queue: diia.max_wait,
            max_backoff: diia.max_backoff,
        }
    }

    /// Keeps the old limiters (and so their state) where the values did not change: a
    /// reload must not hand every branch a fresh burst.
    #[must_use]
    pub fn carry_over(mut self, old: &Hot) -> Self {
        self.limits = self.limits.carry_over(&old.limits);
        if self.diia_budget.same_values(&old.diia_budget) {
            self.diia_budget = Arc::clone(&old.diia_budget);
        }
        self
    }
}

/// Where Diia is.
#[derive(Debug, Clone, PartialEq)]
pub enum UpstreamTarget {
    /// A real base URL.
    Url(String),
    /// The simulator embedded in this process (`[simulator]`), not yet started.
    #[cfg(feature = "embedded-sim")]
    Embedded(Box<diia_sim::SimConfig>),
}

impl UpstreamTarget {
    /// The base URL, once there is one (an embedded simulator gets it when it listens).
    #[must_use]
    pub fn url(&self) -> Option<&str> {
        match self {
            Self::Url(url) => Some(url),
            #[cfg(feature = "embedded-sim")]
            Self::Embedded(_) => None,
        }
    }
}

/// The acquirer's credentials in managed mode, from the file or the environment.
#[derive(Debug, Clone, PartialEq)]
pub struct AcquirerCredentials {
    /// The acquirer token (path of the token exchange).
    pub acquirer_token: Secret,
    /// The auth acquirer token (Basic credentials), if Diia issued one.
    pub auth_token: Option<Secret>,
}

/// Declares [`Cold`] and the dotted key of each field in one list, so the diff that names
/// changed keys can never miss a field.
macro_rules! cold_settings {
    ($( $(#[$doc:meta])* $field:ident : $ty:ty = $key:literal, )*) => {
        /// What only a restart can change.
        #[derive(Debug, Clone, PartialEq)]
        pub struct Cold {
            $( $(#[$doc])* pub $field: $ty, )*
        }

        impl Cold {
            /// The dotted keys whose values differ between two cold halves.
            #[must_use]
            pub fn changed_keys(&self, other: &Self) -> Vec<&'static str> {
                let mut keys = Vec::new();
                $( if self.$field != other.$field { keys.push($key); } )*
                keys
            }

            /// Every key (or key group) only a restart can change, in declaration order.
            #[must_use]
            pub fn cold_keys() -> &'static [&'static str] { &[$( $key, )*] }
        }
    };
}

cold_settings! {
    /// Branch-facing listener.
    listen: SocketAddr = "server.listen",
    /// How long a session token Diia refused is answered 401 locally.
    refused_ttl: Duration = "tokens.refused_ttl",
    /// Admin listener.
    admin_listen: SocketAddr = "server.admin_listen",
    /// Connections served at once.
    max_connections: usize = "server.max_connections",
    /// Requests processed at once.
    max_in_flight: usize = "server.max_in_flight",
    /// Time from accept to a complete request head.
    header_read_timeout: Duration = "server.header_read_timeout",
    /// Idle connection timeout.
    idle_timeout: Duration = "server.idle_timeout",
    /// Longest a response may make no write progress.
    send_timeout: Duration = "server.send_timeout",
    /// Largest request head.
    max_header_bytes: usize = "server.max_header_bytes",
    /// Concurrent h2 streams per connection.
    max_streams_per_connection: u32 = "server.max_streams_per_connection",
    /// Branch-listener worker threads (0: the shared runtime).
    workers: usize = "server.workers",
    /// Readiness-fail time before the listener closes on SIGTERM.
    drain_delay: Duration = "server.drain_delay",
    /// Time in-flight requests get after the listener closes.
    drain_timeout: Duration = "server.drain_timeout",
    /// Whether the branch listener speaks TLS.
    tls: bool = "server.tls",
    /// Whether clients must present a certificate (mTLS).
    client_certificates: bool = "server.tls.client_ca",
    /// Diia's address, or the embedded simulator.
    upstream: UpstreamTarget = "upstream.base_url / [simulator]",
    /// TCP + TLS connect deadline.
    connect_timeout: Duration = "upstream.connect_timeout",
    /// Idle pooled connection life.
    pool_idle_timeout: Duration = "upstream.pool_idle_timeout",
    /// Idle pooled connections per host.
    pool_max_idle: usize = "upstream.pool_max_idle",
    /// Trust store toward Diia.
    ca_file: Option<PathBuf> = "upstream.ca_file",
    /// Consecutive failures that open the circuit.
    breaker_failures: u32 = "upstream.breaker_failures",
    /// Open time before a probe.
    breaker_cooldown: Duration = "upstream.breaker_cooldown",
    /// Retry share of first calls.
    retry_ratio: f64 = "upstream.retry_ratio",
    /// Retries available at start.
    retry_reserve: u32 = "upstream.retry_reserve",
    /// Bound on cached answers, in bytes.
    cache_max_bytes: u64 = "cache.max_bytes",
    /// Pass-through or managed.
    auth_mode: AuthMode = "auth.mode",
    /// API keys or mTLS (managed mode).
    branch_auth: BranchAuth = "auth.branch_auth",
    /// The acquirer's credentials (managed mode).
    credentials: Option<AcquirerCredentials> = "auth.acquirer_token / auth.auth_token",
    /// Log line format.
    log_format: LogFormat = "log.format",
    /// Log filter.
    log_filter: String = "log.filter",
    /// Several instances as one through Redis (`None`: off).
    scaleout: Option<ScaleoutSettings> = "scaleout",
    /// Load balancers whose word on the client is taken.
    trusted_proxies: Vec<ipnet::IpNet> = "server.trusted_proxies",
    /// Trusted proxies open connections with a PROXY protocol header.
    proxy_protocol: bool = "server.proxy_protocol",
    /// The header trusted proxies name the client in (without the PROXY protocol).
    forwarded_header: crate::config::ForwardedHeader = "server.forwarded_header",
    /// Connections one client may hold at once.
    max_connections_per_client: usize = "server.max_connections_per_client",
    /// The callback relay as written (`None`: off).
    callback_relay: Option<crate::config::CallbackRelayConfig> = "callback_relay",
}

impl Settings {
    /// Reads, parses and builds a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_toml(&text)
    }

    /// Parses and builds TOML text.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let file = FileConfig::parse(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        Self::build(&file)
    }

    /// Checks the whole file and builds everything it implies; nothing is built twice.
    pub fn build(file: &FileConfig) -> Result<Self, ConfigError> {
        let (answers, stale_if_error, session_tokens, sharing) = cache_policies(file)?;
        check_server(&file.server)?;
        let upstream = upstream_tunables(&file.upstream, &file.limits)?;
        let (limits, diia_budget) = limiters(&file.limits)?;
        let (tls, revoked_certs) = tls_acceptor(&file.server)?;
        let (api_keys, client_certs, credentials) = auth(&file.auth, &file.server)?;
        let target = upstream_target(file)?;
        let hot = Hot {
            body_limit: file.server.body_limit,
            body_timeout: file.server.body_timeout,
            request_deadline: file.server.request_deadline,
            answers,
            stale_if_error,
            session_tokens,
            refresh_margin: file.tokens.refresh_margin,
            sharing,
            upstream,
            limits,
            diia_budget,
            tls,
            api_keys,
            client_certs,
            revoked_certs,
            limits_config: file.limits.clone(),
            fleet: 1,
        };
        let scaleout = scaleout(file)?;
        let keys = match &scaleout {
            Some(scaleout) => scaleout.secret.hash_key(),
            None => HashKey::random().map_err(|e| invalid("keys", e.to_string()))?,
        };
        let cold = Cold {
            trusted_proxies: trusted_proxies(&file.server)?,
            ..cold(file, target, credentials, scaleout)
        };
        Ok(Self {
            hot: Arc::new(hot),
            cold,
            keys,
            relay: relay::relay(file)?,
        })
    }

    /// The same settings with another upstream (the embedded simulator once it listens).
    #[must_use]
    pub fn with_upstream_url(mut self, url: String) -> Self {
        self.cold.upstream = UpstreamTarget::Url(url);
        self
    }
}

fn cold(
    file: &FileConfig,
    upstream: UpstreamTarget,
    credentials: Option<AcquirerCredentials>,
    scaleout: Option<ScaleoutSettings>,
) -> Cold {
    let (server, up) = (&file.server, &file.upstream);
    Cold {
        listen: server.listen,
        refused_ttl: file.tokens.refused_ttl,
        admin_listen: server.admin_listen,
        max_connections: server.max_connections,
        max_in_flight: server.max_in_flight,
        header_read_timeout: server.header_read_timeout,
        idle_timeout: server.idle_timeout,
        send_timeout: server.send_timeout,
        max_header_bytes: server.max_header_bytes,
        max_streams_per_connection: server.max_streams_per_connection,
        workers: server.workers,
        drain_delay: server.drain_delay,
        drain_timeout: server.drain_timeout,
        tls: server.tls.is_some(),
        client_certificates: server.tls.as_ref().is_some_and(|t| t.client_ca.is_some()),
        upstream,
        connect_timeout: up.connect_timeout,
        pool_idle_timeout: up.pool_idle_timeout,
        pool_max_idle: up.pool_max_idle,
        ca_file: up.ca_file.clone(),
        breaker_failures: up.breaker_failures,
        breaker_cooldown: up.breaker_cooldown,
        retry_ratio: up.retry_ratio,
        retry_reserve: up.retry_reserve,
        cache_max_bytes: file.cache.max_bytes,
        auth_mode: file.auth.mode,
        branch_auth: file.auth.branch_auth,
        credentials,
        log_format: file.log.format,
        log_filter: file.log.filter.clone(),
        scaleout,
        trusted_proxies: Vec::new(),
        proxy_protocol: server.proxy_protocol,
        forwarded_header: server.forwarded_header,
        max_connections_per_client: server.max_connections_per_client,
        callback_relay: file
            .callback_relay
            .enabled
            .then(|| file.callback_relay.clone()),
    }
}

/// `[cache]`, `[sharing]`, `[tokens]`: how long answers live, all bounded by Diia's facts.
fn cache_policies(file: &FileConfig) -> Result<(Policy, Duration, Policy, Policy), ConfigError> {
    let CacheConfig {
        ttl,
        negative_ttl,
        max_bytes,
        stale_if_error,
    } = file.cache;
    if ttl.is_zero() || ttl > BARCODE_LIFETIME {
        return Err(invalid(
            "cache.ttl",
            format!(
                "{} must be above 0 and at most 180s: a barcode lives 3 minutes",
                humantime::format_duration(ttl)
            ),
        ));
    }
    if negative_ttl > ttl {
        return Err(invalid(
            "cache.negative_ttl",
            "must not be longer than cache.ttl: negative answers are kept shorter",
        ));
    }
    if ttl + stale_if_error > BARCODE_LIFETIME {
        return Err(invalid(
            "cache.stale_if_error",
            "cache.ttl + cache.stale_if_error must not exceed 180s: a barcode lives 3 minutes",
        ));
    }
    if max_bytes < 1024 * 1024 {
        return Err(invalid(
            "cache.max_bytes",
            "must be at least 1048576 (1 MiB)",
        ));
    }
    let replay_ttl = file.sharing.replay_ttl;
    if replay_ttl.is_zero() || replay_ttl > BARCODE_LIFETIME {
        return Err(invalid(
            "sharing.replay_ttl",
            "must be above 0 and at most 180s: a barcode lives 3 minutes",
        ));
    }
    let refused = file.tokens.refused_ttl;
    if refused.is_zero() || refused > SESSION_TOKEN_LIFETIME {
        return Err(invalid(
            "tokens.refused_ttl",
            "must be above 0 and at most the 2h token life",
        ));
    }
    let margin = file.tokens.refresh_margin;
    if margin >= SESSION_TOKEN_LIFETIME {
        return Err(invalid(
            "tokens.refresh_margin",
            "must be shorter than the 2h token life",
        ));
    }
    Ok((
        Policy::Verification { ttl, negative_ttl },
        stale_if_error,
        Policy::SessionToken { margin },
        Policy::Sharing { ttl: replay_ttl },
    ))
}

/// `[limits]`: the governor limiters.
fn limiters(limits: &LimitsConfig) -> Result<(Limits, Arc<BudgetQuota>), ConfigError> {
    if limits.diia.max_backoff.is_zero() {
        return Err(invalid("limits.diia.max_backoff", "must be above 0"));
    }
    let share = limits.client.diia_share;
    if !(share > 0.0 && share <= 1.0) {
        return Err(invalid(
            "limits.client.diia_share",
            "must be within (0, 1]: the largest share of the Diia budget one client may take",
        ));
    }
    if limits.max_tracked == 0 {
        return Err(invalid("limits.max_tracked", "must be above 0"));
    }
    if limits.ipv6_prefix > 128 {
        return Err(invalid(
            "limits.ipv6_prefix",
            "must be within 0..=128 (an IPv6 prefix length; 64 is one subscriber's network)",
        ));
    }
    Ok((
        Limits::new(limits),
        Arc::new(BudgetQuota::new(&limits.diia)),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problem(text: &str) -> String {
        match Settings::from_toml(text) {
            Ok(_) => panic!("config must be refused: {text}"),
            Err(error) => error.to_string(),
        }
    }

    #[test]
    fn empty_file_is_a_valid_production_config() {
        let settings = Settings::from_toml("").expect("defaults are valid");
        assert!(matches!(
            settings.hot.answers,
            Policy::Verification { ttl, .. } if ttl == Duration::from_secs(60)
        ));
        assert_eq!(
            settings.cold.upstream,
            UpstreamTarget::Url("https://api2.diia.gov.ua".to_owned())
        );
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
        assert!(
            problem("[auth]\nmode = \"managed\"\nacquirer_token = \"t\"")
                .starts_with("auth.api_keys:")
        );
    }

    #[test]
    fn client_certificate_keys_need_mtls() {
        let tls = "[server.tls]\ncert = \"c.pem\"\nkey = \"k.pem\"\n";
        assert!(
            problem(&format!("{tls}client_crl = [\"crl.pem\"]\n"))
                .starts_with("server.tls.client_crl:")
        );
        let bindings = "client_certs = [{ branch = \"a\", name = \"a.example\" }]\n";
        assert!(problem(&format!("[auth]\n{bindings}")).starts_with("auth.client_certs:"));
        assert!(
            problem(&format!(
                "[auth]\nmode = \"managed\"\nacquirer_token = \"t\"\n{bindings}"
            ))
            .starts_with("auth.client_certs:"),
            "api-key branch auth"
        );
    }

    #[cfg(feature = "embedded-sim")]
    #[test]
    fn simulator_needs_a_loopback_listener() {
        let text = "[server]\nlisten = \"0.0.0.0:8080\"\n[simulator]\nauto_issue = true\n";
        assert!(problem(text).starts_with("simulator:"));
        assert!(Settings::from_toml("[simulator]\nauto_issue = true\n").is_ok());
        assert!(problem("[simulator]\nauto_isue = true\n").starts_with("simulator:"));
    }

    #[test]
    fn client_identity_keys_are_checked() {
        assert!(
            problem("[server]\ntrusted_proxies = [\"10.0.0.0/33\"]")
                .starts_with("server.trusted_proxies:")
        );
        assert!(
            problem("[server]\ntrusted_proxies = [\"lb.example\"]")
                .starts_with("server.trusted_proxies:")
        );
        assert!(problem("[server]\nproxy_protocol = true").starts_with("server.proxy_protocol:"));
        assert!(
            problem("[server]\nmax_connections_per_client = 0")
                .starts_with("server.max_connections_per_client:")
        );
        assert!(problem("[limits]\nipv6_prefix = 129").starts_with("limits.ipv6_prefix:"));
        let settings = Settings::from_toml(
            "[server]\ntrusted_proxies = [\"10.1.2.3/8\", \"192.0.2.7\", \"2001:db8::/32\"]\n\
             proxy_protocol = true\nforwarded_header = \"forwarded\"\n",
        )
        .expect("valid");
        let nets: Vec<String> = settings
            .cold
            .trusted_proxies
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(nets, ["10.0.0.0/8", "192.0.2.7/32", "2001:db8::/32"]);
        assert!(settings.cold.proxy_protocol);
    }

    #[test]
    fn cold_diff_names_every_changed_key() {
        let a = Settings::from_toml("").expect("valid").cold;
        let b = Settings::from_toml("[server]\nmax_in_flight = 7\n[upstream]\npool_max_idle = 3\n")
            .expect("valid")
            .cold;
        assert_eq!(
            a.changed_keys(&b),
            ["server.max_in_flight", "upstream.pool_max_idle"]
        );
        assert!(a.changed_keys(&a.clone()).is_empty());
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
            // scaleout.toml names files under /etc (tests/it/cli.rs checks it with them).
            if name.ends_with(".toml")
                && !name.starts_with("sim")
                && !name.starts_with("scenario")
                && name != "scaleout.toml"
            {
                if let Err(error) = Settings::load(&path) {
                    panic!("{}: {error}", path.display());
                }
                seen += 1;
            }
        }
        assert!(seen >= 2, "gateway.toml and demo.toml must be shipped");
    }
}
