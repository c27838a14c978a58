//! The gateway: the shared state behind every request, how it is built from settings,
//! what a reload or a fleet change swaps in, and what `/metrics` renders.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::access::AccessLog;
use crate::cache::AnswerCache;
use crate::cache_policy::Store;
use crate::client::Clients;
use crate::config::AuthMode;
use crate::diia::SESSION_TOKEN_LIFETIME;
use crate::head::RequestHead;
use crate::keys::{CacheKey, HashKey};
use crate::managed::ManagedSession;
use crate::metrics::{Metrics, Snapshot};
use crate::relay::desk::RelayDesk;
use crate::scaleout::Scaleout;
use crate::service::{Handler, Reply, RequestBody};
use crate::settings::{Hot, Settings};
use crate::trust::TokenTrust;
use crate::upstream::Upstream;

/// The gateway: shared state behind every request. Cheap to share as `Arc<Gateway>`.
/// Its fields are the crate's so the stages in [`crate::proxy`] read them directly.
pub struct Gateway {
    /// What requests read; a reload swaps it whole. Each request loads it once.
    pub(crate) hot: ArcSwap<Hot>,
    pub(crate) auth_mode: AuthMode,
    pub(crate) keys: HashKey,
    pub(crate) answers: AnswerCache,
    pub(crate) session_tokens: AnswerCache,
    pub(crate) sharing: AnswerCache,
    pub(crate) upstream: Arc<Upstream>,
    pub(crate) metrics: Arc<Metrics>,
    /// Requests being processed; full means shed (503 `overloaded`) rather than queue.
    pub(crate) in_flight: tokio::sync::Semaphore,
    pub(crate) max_in_flight: usize,
    /// Managed token mode, when configured.
    pub(crate) managed: Option<Arc<ManagedSession>>,
    /// Pass-through: which token-cache entry handed out a session token (keyed digest of
    /// the token), so a token Diia refuses with 401 is dropped and the next login reaches
    /// Diia instead of getting the dead token again.
    pub(crate) issued_tokens: moka::future::Cache<CacheKey, CacheKey>,
    /// Pass-through: session tokens Diia accepted or refused (keyed digests).
    pub(crate) trust: Arc<TokenTrust>,
    /// The binary's fast access-log path, when installed.
    pub(crate) access_log: std::sync::OnceLock<AccessLog>,
    /// Scale-out: the fleet through Redis, when `[scaleout]` is on.
    pub(crate) scaleout: Option<Arc<Scaleout>>,
    /// Who the client is behind a trusted proxy; connections per client.
    pub(crate) clients: Clients,
    /// The callback relay's routes and pull side, once its store is open (`[callback_relay]`).
    pub(crate) relay: std::sync::OnceLock<Arc<RelayDesk>>,
}

impl Gateway {
    /// Builds the gateway from settings: the one wiring used by the binary, the tests and
    /// the benchmarks. The upstream must be a URL (start an embedded simulator first).
    pub fn build(settings: &Settings) -> std::io::Result<Self> {
        let Some(base_url) = settings.cold.upstream.url() else {
            return Err(std::io::Error::other(
                "the embedded simulator must be started before the gateway is built",
            ));
        };
        let metrics = Arc::new(Metrics::with_fleet(settings.cold.scaleout.is_some()));
        let scaleout = match &settings.cold.scaleout {
            Some(fleet) => Some(Arc::new(
                Scaleout::new(fleet, Arc::clone(&metrics)).map_err(std::io::Error::other)?,
            )),
            None => None,
        };
        let upstream = Arc::new(Upstream::new(
            &settings.cold,
            base_url,
            Arc::clone(&metrics),
            scaleout.clone(),
        )?);
        let managed = settings.cold.credentials.as_ref().map(|credentials| {
            let login = scaleout.as_ref().map(|fleet| {
                let key = settings
                    .keys
                    .key("managed-login")
                    .part(credentials.acquirer_token.expose().as_bytes())
                    .finish();
                (Arc::clone(fleet), key)
            });
            Arc::new(ManagedSession::new(credentials, login))
        });
        let max_bytes = settings.cold.cache_max_bytes;
        let clients = Clients::new(
            settings.cold.trusted_proxies.clone(),
            settings.cold.proxy_protocol,
            settings.cold.forwarded_header,
            settings.cold.max_connections_per_client,
            settings.hot.limits_config.ipv6_prefix,
            Arc::clone(&metrics),
        );
        Ok(Self {
            hot: ArcSwap::new(Arc::clone(&settings.hot)),
            auth_mode: settings.cold.auth_mode,
            keys: settings.keys.clone(),
            answers: AnswerCache::new(max_bytes),
            session_tokens: AnswerCache::new(16 * 1024 * 1024),
            sharing: AnswerCache::new(max_bytes / 4),
            upstream,
            metrics,
            in_flight: tokio::sync::Semaphore::new(settings.cold.max_in_flight),
            max_in_flight: settings.cold.max_in_flight,
            managed,
            issued_tokens: moka::future::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(SESSION_TOKEN_LIFETIME)
                .build(),
            trust: Arc::new(TokenTrust::new(
                settings.keys.clone(),
                settings.cold.refused_ttl,
                100_000,
            )),
            access_log: std::sync::OnceLock::new(),
            relay: std::sync::OnceLock::new(),
            scaleout,
            clients,
        })
    }

    /// The fleet side, in scale-out mode.
    #[must_use]
    pub fn scaleout(&self) -> Option<&Arc<Scaleout>> {
        self.scaleout.as_ref()
    }

    /// Scale-out: Redis just went down; the local Diia budget takes over without a burst.
    pub fn empty_local_budget(&self) {
        let hot = self.hot.load().with_empty_budget();
        self.hot.store(Arc::new(hot));
    }

    /// Divides the local budgets by the live instance count (scale-out heartbeat).
    pub fn rescale(&self, live: u32) {
        let hot = self.hot.load().for_fleet(live);
        self.hot.store(Arc::new(hot));
        tracing::info!(
            live,
            "fleet size changed; local budgets are 1/live of the configured ones"
        );
    }

    /// Swaps in the hot half of a reloaded config; the next request reads it.
    pub fn swap_hot(&self, hot: Hot) {
        let hot = match &self.scaleout {
            Some(fleet) => hot.for_fleet(fleet.live()),
            None => hot,
        };
        let hot = hot.carry_over(&self.hot.load());
        self.clients.set_ipv6_prefix(hot.limits_config.ipv6_prefix);
        self.hot.store(Arc::new(hot));
    }

    /// The settings requests read now.
    #[must_use]
    pub fn hot(&self) -> Arc<Hot> {
        self.hot.load_full()
    }

    /// Connects the callback relay (once): consent pushes record routes from now on, and
    /// the pull side answers.
    pub fn attach_relay(&self, desk: Arc<RelayDesk>) {
        let _ = self.relay.set(desk);
    }

    /// The metric handles.
    #[must_use]
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Prometheus text for `/metrics`; settles cache bookkeeping first so counts are exact.
    /// `ready` is what `/readyz` answers.
    pub fn render_metrics(&self, ready: bool) -> String {
        self.sync_caches();
        let hot = self.hot.load();
        hot.limits.run_pending_tasks();
        let cache = |name, cache: &AnswerCache| (name, cache.entry_count(), cache.weighted_bytes());
        let available = self.in_flight.available_permits();
        self.metrics.render(&Snapshot {
            caches: vec![
                cache("answers", &self.answers),
                cache("tokens", &self.session_tokens),
                cache("sharing", &self.sharing),
            ],
            branches_tracked: hot.limits.tracked(),
            in_flight: u64::try_from(self.max_in_flight.saturating_sub(available)).unwrap_or(0),
            ready,
            diia_backoff: self.upstream.brake().paused_for().unwrap_or_default(),
        })
    }

    /// Periodic upkeep: forget idle branch budgets, settle cache bookkeeping.
    pub fn housekeeping(&self) {
        self.hot.load().limits.run_pending_tasks();
        self.sync_caches();
    }

    fn sync_caches(&self) {
        self.answers.sync();
        self.session_tokens.sync();
        self.sharing.sync();
    }

    /// Sends access lines straight to the binary's log sink (formatted by hand) instead of
    /// through `tracing`'s formatter.
    pub fn log_access_to(&self, log: AccessLog) {
        let _ = self.access_log.set(log);
    }

    /// The cache a slot's answers live in.
    pub(crate) fn cache(&self, store: Store) -> &AnswerCache {
        match store {
            Store::Answers => &self.answers,
            Store::Sharing => &self.sharing,
            Store::SessionTokens => &self.session_tokens,
        }
    }
}

impl Handler for Gateway {
    fn handle(
        &self,
        head: RequestHead,
        body: RequestBody,
        peer: SocketAddr,
    ) -> impl Future<Output = Reply> + Send + '_ {
        self.reply_to(head, body, peer)
    }

    fn tls(&self) -> Option<tokio_rustls::TlsAcceptor> {
        self.hot.load().tls.clone()
    }

    fn clients(&self) -> Option<&Clients> {
        Some(&self.clients)
    }
}
