//! diia-gateway: a verification gateway in front of Diia's acquirer API.
//!
//! Branch backends point their Diia base URL at the gateway and change nothing else.
//! The gateway refuses malformed requests before they leave the box, answers repeated
//! verifications from a short-lived cache (so a re-scan of a single-use barcode still
//! works), makes one Diia call for any number of identical concurrent requests, never
//! pushes a second consent request for the same barcode, shares session tokens between
//! branches, and rate-limits per branch and toward Diia.
//!
//! # Layout
//! - [`config`]: TOML → validated [`Config`]
//! - [`error`]: [`GatewayError`], the only place statuses and error codes are chosen
//! - [`barcode`]: the EAN-13 [`barcode::Barcode`] newtype, redacting
//! - [`route`]: `(method, path)` → [`route::Endpoint`]
//! - [`request`]: header and body validation
//! - [`keys`]: keyed hashes for cache keys and log fingerprints
//! - [`cache`]: moka caches with coalescing and replay
//! - [`limit`]: governor limits per branch and toward Diia
//! - [`upstream`]: hyper + rustls client toward Diia
//! - [`breaker`]: circuit breaker and retry budget toward Diia
//! - [`token`]: managed token mode (session token held by the gateway, branch API keys)
//! - [`proxy`]: the request lifecycle (stages) over all of the above
//! - [`metrics`], [`admin`]: what SREs see
//! - [`reload`]: config hot reload (SIGHUP, `POST /reload`)
//! - [`server`]: accept loop and graceful shutdown
//! - [`tls`]: rustls configs, in (termination, mTLS) and out (trust toward Diia)
//! - [`sim`]: the Diia simulator

pub mod admin;
pub mod barcode;
pub mod breaker;
pub mod cache;
pub mod config;
pub mod error;
pub mod keys;
pub mod limit;
pub mod metrics;
pub mod proxy;
pub mod reload;
pub mod request;
pub mod route;
pub mod server;
pub mod sim;
pub mod tls;
pub mod token;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::admin::Admin;
pub use crate::config::Config;
use crate::config::{AuthMode, BranchAuth};
pub use crate::error::GatewayError;
use crate::keys::Secrets;
use crate::limit::DiiaBudget;
use crate::metrics::Metrics;
use crate::proxy::{Gateway, Managed};
use crate::reload::Reloader;
use crate::server::{ConnectionLimits, Shutdown, accept_loop};
use crate::sim::{SimHandle, Simulator};
use crate::token::{ApiKeys, TokenManager};
use crate::upstream::Upstream;

/// How often idle branch budgets are forgotten.
const HOUSEKEEPING_PERIOD: Duration = Duration::from_secs(30);

/// A running gateway (and, with `[simulator]`, its in-process simulator).
pub struct RunningGateway {
    addr: SocketAddr,
    admin_addr: SocketAddr,
    gateway: Arc<Gateway>,
    /// Phase 1 of a drain: `/readyz` fails, traffic is still served.
    draining: Shutdown,
    /// Phase 2: listeners close, in-flight requests finish, tasks end.
    closing: Shutdown,
    tasks: Vec<JoinHandle<()>>,
    simulator: Option<SimHandle>,
    reloader: Option<Arc<Reloader>>,
}

impl RunningGateway {
    /// The branch-facing address.
    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The admin address.
    #[must_use]
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The embedded simulator, when the config asked for one.
    #[must_use]
    pub fn simulator(&self) -> Option<&SimHandle> {
        self.simulator.as_ref()
    }

    /// The gateway's shared state (metrics, for tests and the load tool).
    #[must_use]
    pub fn gateway(&self) -> &Arc<Gateway> {
        &self.gateway
    }

    /// Re-reads the config file the gateway was started from (what SIGHUP does).
    pub fn reload(&self) -> Result<(), String> {
        match &self.reloader {
            Some(reloader) => reloader.reload(),
            None => Err("started without a config file; nothing to reload".to_owned()),
        }
    }

    /// The reloader, for a SIGHUP handler.
    #[must_use]
    pub fn reload_handle(&self) -> Option<Arc<Reloader>> {
        self.reloader.clone()
    }

    /// A handle that starts the drain when triggered (what SIGTERM does): `/readyz` fails
    /// at once, the listener closes `server.drain_delay` later, in-flight requests get
    /// `server.drain_timeout` to finish.
    #[must_use]
    pub fn shutdown_handle(&self) -> Shutdown {
        self.draining.clone()
    }

    /// Drains (as [`RunningGateway::shutdown_handle`]) and waits until everything stopped.
    pub async fn stop(self) {
        self.draining.trigger();
        self.wait().await;
    }

    /// Waits until a drain started by the shutdown handle has finished.
    pub async fn wait(mut self) {
        self.closing.wait().await;
        for task in self.tasks.drain(..) {
            let _ = task.await;
        }
        if let Some(simulator) = self.simulator.take() {
            simulator.stop().await;
        }
    }
}

impl Drop for RunningGateway {
    fn drop(&mut self) {
        // Dropped without a drain (tests): stop serving at once.
        self.draining.trigger();
        self.closing.trigger();
    }
}

/// Binds the listeners and starts serving; returns once both accept connections.
pub async fn start(config: Config) -> std::io::Result<RunningGateway> {
    start_with(config, None).await
}

/// [`start`], remembering the config file so SIGHUP and `POST /reload` can re-read it.
pub async fn start_with(
    config: Config,
    path: Option<std::path::PathBuf>,
) -> std::io::Result<RunningGateway> {
    let simulator = match &config.simulator {
        Some(sim_config) => Some(Simulator::start(sim_config.clone()).await?),
        None => None,
    };
    let base_url = simulator
        .as_ref()
        .map_or_else(|| config.upstream.base_url.clone(), SimHandle::base_url);
    let config = Arc::new(config);
    let metrics = Arc::new(Metrics::new());
    let budget = DiiaBudget::new(&config.limits.diia);
    let upstream = Arc::new(Upstream::new(
        &config.upstream,
        &base_url,
        budget,
        Arc::clone(&metrics),
    )?);
    let mut gateway = Gateway::new(Arc::clone(&config), Secrets::random()?, upstream, metrics);
    if config.auth.mode == AuthMode::Managed {
        let (acquirer_token, auth_token) = config.auth.secrets().map_err(std::io::Error::other)?;
        let keys = match config.auth.branch_auth {
            BranchAuth::ApiKey => {
                Some(ApiKeys::new(&config.auth.api_keys).map_err(std::io::Error::other)?)
            }
            BranchAuth::Mtls => None,
        };
        let tokens = TokenManager::new(acquirer_token, auth_token, config.tokens.refresh_margin);
        gateway = gateway.with_managed(Managed { tokens, keys });
    }
    let gateway = Arc::new(gateway);

    let listener = TcpListener::bind(config.server.listen).await?;
    let admin_listener = TcpListener::bind(config.server.admin_listen).await?;
    let addr = listener.local_addr()?;
    let admin_addr = admin_listener.local_addr()?;
    let draining = Shutdown::new();
    let closing = Shutdown::new();
    let limits = ConnectionLimits {
        max_connections: config.server.max_connections,
        header_read_timeout: config.server.header_read_timeout,
        idle_timeout: config.server.idle_timeout,
        drain_timeout: config.server.drain_timeout,
    };
    let tls = match &config.server.tls {
        Some(tls) => Some(Arc::new(arc_swap::ArcSwap::from_pointee(
            tokio_rustls::TlsAcceptor::from(
                crate::tls::server_config(&tls.cert, &tls.key, tls.client_ca.as_deref())
                    .map_err(std::io::Error::other)?,
            ),
        ))),
        None => None,
    };
    let reloader =
        path.map(|path| Arc::new(Reloader::new(path, Arc::clone(&gateway), tls.clone())));
    let admin = Arc::new(Admin::new(
        Arc::clone(&gateway),
        draining.clone(),
        reloader.clone(),
    ));
    let phases = {
        let (draining, closing) = (draining.clone(), closing.clone());
        let delay = config.server.drain_delay;
        tokio::spawn(async move {
            draining.wait().await;
            tracing::info!(
                delay_ms = delay.as_millis(),
                "draining: /readyz fails, listener closes after the delay"
            );
            tokio::time::sleep(delay).await;
            closing.trigger();
        })
    };
    let housekeeping = {
        let gateway = Arc::clone(&gateway);
        let shutdown = closing.clone();
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(HOUSEKEEPING_PERIOD);
            loop {
                tokio::select! {
                    _ = ticks.tick() => gateway.housekeeping().await,
                    () = shutdown.wait() => break,
                }
            }
        })
    };
    // The admin listener outlives the branch listener's drain, so probes see the 503.
    let admin_closing = Shutdown::new();
    let gateway_loop = tokio::spawn(accept_loop(
        listener,
        Arc::clone(&gateway),
        closing.clone(),
        limits,
        tls,
    ));
    let branch_side = {
        let admin_closing = admin_closing.clone();
        tokio::spawn(async move {
            let _ = gateway_loop.await;
            admin_closing.trigger();
        })
    };
    let tasks = vec![
        branch_side,
        tokio::spawn(accept_loop(
            admin_listener,
            admin,
            admin_closing,
            ConnectionLimits::default(),
            None,
        )),
        housekeeping,
        phases,
    ];
    tracing::info!(%addr, %admin_addr, upstream = %base_url, embedded_simulator = simulator.is_some(), "diia-gateway listening");
    Ok(RunningGateway {
        addr,
        admin_addr,
        gateway,
        draining,
        closing,
        tasks,
        simulator,
        reloader,
    })
}
