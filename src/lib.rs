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
//! - [`config`]: the file as written (serde structs only)
//! - [`settings`]: file → checked [`settings::Settings`]: a [`settings::Hot`] half a reload
//!   swaps and a [`settings::Cold`] half only a restart changes
//! - [`reload`]: config hot reload (SIGHUP, `POST /reload`), refusing cold changes by name
//! - [`diia`]: facts about Diia (barcode and session-token lives), a leaf
//! - [`error`]: [`GatewayError`], the only place statuses, codes and fault are chosen
//! - [`answer`]: Diia's answer and its one classification ([`answer::AnswerClass`])
//! - [`barcode`]: the EAN-13 [`barcode::Barcode`] newtype, redacting
//! - [`head`]: the request head the stages read (method, URI, five headers), parsed at the edge
//! - [`route`]: `(method, path)` → [`route::Endpoint`]; the managed-mode route refusal
//! - [`client`]: who the client is behind a trusted load balancer (PROXY protocol,
//!   `X-Forwarded-For`/`Forwarded`), and its connection count
//! - [`caller`]: who is calling (bearer, API key, mTLS), the one place callers are authenticated
//! - [`request`]: what each endpoint needs, checked into a [`request::Checked`]
//! - [`cache_policy`]: cache keys per endpoint and how long each answer lives
//! - [`keys`]: keyed hashes for cache keys and log fingerprints, redacting secrets
//! - [`cache`]: moka caches with coalescing and replay
//! - [`detach`]: a leader's call runs in its request's task, finishing detached if dropped
//! - [`limit`]: governor limits per branch and toward Diia, and Diia's brake
//! - [`upstream`]: hyper + rustls client toward Diia
//! - [`breaker`]: circuit breaker and retry budget toward Diia
//! - [`trust`]: pass-through session tokens Diia accepted or refused (keyed digests)
//! - [`managed`]: managed token mode (the session token held by the gateway)
//! - [`scaleout`]: several instances as one toward Diia through Redis (shared budget, cache,
//!   leases, logins; degraded to local state when Redis is down)
//! - [`proxy`]: the request lifecycle (stages over one context) over all of the above
//! - [`access`]: the access log line, formatted by hand on the fast path
//! - [`metrics`], [`admin`]: what SREs see; [`logsink`]: log lines written in batches, never waited for
//! - [`server`]: accept loop and graceful shutdown; hands connections hyper must serve to hyper
//! - [`h1`]: the HTTP/1.1 loop for plain requests; cached answers from pre-rendered bytes
//! - [`tls`]: rustls configs, in (termination, mTLS) and out (trust toward Diia)
//!
//! The Diia simulator is its own crate (`diia-sim`), embedded only with the default
//! `embedded-sim` feature.

pub mod access;
pub mod admin;
pub mod answer;
pub mod barcode;
pub mod breaker;
pub mod cache;
pub mod cache_policy;
pub mod caller;
pub mod client;
pub mod config;
pub mod detach;
pub mod diia;
#[cfg(feature = "embedded-sim")]
mod embedded;
pub mod error;
pub mod h1;
pub mod head;
pub mod keys;
pub mod limit;
pub mod logsink;
pub mod managed;
pub mod metrics;
pub mod per_thread;
pub mod proxy;
pub mod reload;
pub mod request;
pub mod route;
pub mod scaleout;
pub mod server;
pub mod settings;
pub mod tls;
pub mod trust;
pub mod upstream;
pub mod worker;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::admin::Admin;
pub use crate::error::GatewayError;
use crate::proxy::Gateway;
use crate::reload::Reloader;
use crate::server::{ConnectionLimits, Shutdown, accept_loop};
pub use crate::settings::Settings;
use crate::settings::UpstreamTarget;

/// How often idle branch budgets are forgotten.
const HOUSEKEEPING_PERIOD: Duration = Duration::from_secs(30);

/// The embedded simulator's handle, when the build has one.
#[cfg(feature = "embedded-sim")]
pub type SimHandle = diia_sim::SimHandle;
/// No simulator in this build.
#[cfg(not(feature = "embedded-sim"))]
pub type SimHandle = std::convert::Infallible;

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
        #[cfg(feature = "embedded-sim")]
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
pub async fn start(settings: Settings) -> std::io::Result<RunningGateway> {
    start_from_file(settings, None).await
}

/// [`start`], remembering the config file so SIGHUP and `POST /reload` can re-read it.
pub async fn start_from_file(
    settings: Settings,
    path: Option<PathBuf>,
) -> std::io::Result<RunningGateway> {
    // A reload compares against the cold half as the file says it, before the embedded
    // simulator's address replaces it.
    let file_cold = settings.cold.clone();
    let (settings, simulator) = start_upstream(settings).await?;
    let gateway = Arc::new(Gateway::build(&settings)?);
    let listeners = BranchListeners::bind(settings.cold.listen, settings.cold.workers)?;
    let admin_listener = TcpListener::bind(settings.cold.admin_listen).await?;
    let (addr, admin_addr) = (listeners.addr, admin_listener.local_addr()?);
    let draining = Shutdown::new();
    let closing = Shutdown::new();
    let reloader = path.map(|path| Arc::new(Reloader::new(path, file_cold, Arc::clone(&gateway))));
    let admin = Arc::new(Admin::new(
        Arc::clone(&gateway),
        draining.clone(),
        reloader.clone(),
    ));
    let limits = ConnectionLimits {
        max_connections: settings.cold.max_connections,
        header_read_timeout: settings.cold.header_read_timeout,
        idle_timeout: settings.cold.idle_timeout,
        send_timeout: settings.cold.send_timeout,
        drain_timeout: settings.cold.drain_timeout,
        max_header_bytes: settings.cold.max_header_bytes,
        max_streams: settings.cold.max_streams_per_connection,
    };
    let mut tasks = vec![
        spawn_drain_phases(&draining, &closing, settings.cold.drain_delay),
        spawn_housekeeping(&gateway, &closing),
    ];
    if let Some(fleet) = &settings.cold.scaleout {
        tasks.push(join_fleet(&gateway, &closing, fleet).await);
    }
    tasks.extend(spawn_listeners(
        (listeners, admin_listener),
        (&gateway, admin),
        &closing,
        limits,
    ));
    let upstream = settings.cold.upstream.url().unwrap_or("embedded simulator");
    tracing::info!(%addr, %admin_addr, upstream, embedded_simulator = simulator.is_some(), "diia-gateway listening");
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

/// Starts the embedded simulator when the settings ask for one and points the settings
/// at it.
async fn start_upstream(settings: Settings) -> std::io::Result<(Settings, Option<SimHandle>)> {
    match &settings.cold.upstream {
        UpstreamTarget::Url(_) => Ok((settings, None)),
        #[cfg(feature = "embedded-sim")]
        UpstreamTarget::Embedded(config) => {
            let simulator = embedded::start(config.clone()).await?;
            let url = simulator.base_url();
            Ok((settings.with_upstream_url(url), Some(simulator)))
        }
    }
}

/// Phase 1 of a drain (readyz fails) → after `delay`, phase 2 (listeners close).
fn spawn_drain_phases(draining: &Shutdown, closing: &Shutdown, delay: Duration) -> JoinHandle<()> {
    let (draining, closing) = (draining.clone(), closing.clone());
    tokio::spawn(async move {
        draining.wait().await;
        tracing::info!(
            delay_ms = delay.as_millis(),
            "draining: /readyz fails, listener closes after the delay"
        );
        tokio::time::sleep(delay).await;
        closing.trigger();
    })
}

fn spawn_housekeeping(gateway: &Arc<Gateway>, closing: &Shutdown) -> JoinHandle<()> {
    let gateway = Arc::clone(gateway);
    let shutdown = closing.clone();
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(HOUSEKEEPING_PERIOD);
        loop {
            tokio::select! {
                _ = ticks.tick() => gateway.housekeeping(),
                () = shutdown.wait() => break,
            }
        }
    })
}

/// Scale-out: a first probe and heartbeat (bounded by the Redis timeouts; the gateway
/// starts degraded when Redis is down), then the probe and heartbeat loop.
async fn join_fleet(
    gateway: &Arc<Gateway>,
    closing: &Shutdown,
    settings: &settings::ScaleoutSettings,
) -> JoinHandle<()> {
    let gateway = Arc::clone(gateway);
    let shutdown = closing.clone();
    let (probe_every, beat_every) = (settings.probe_interval, settings.heartbeat_interval);
    let Some(fleet) = gateway.scaleout().cloned() else {
        return tokio::spawn(async {});
    };
    if !fleet.link().probe().await {
        tracing::warn!(
            "Redis unreachable at start; running degraded on local state until it answers"
        );
    } else if let Some(live) = fleet.heartbeat().await {
        gateway.rescale(live);
    }
    tokio::spawn(async move {
        let mut probes = tokio::time::interval(probe_every);
        let mut beats = tokio::time::interval(beat_every);
        let mut up = fleet.link().watch();
        loop {
            tokio::select! {
                changed = up.changed() => {
                    if changed.is_ok() && !*up.borrow_and_update() {
                        gateway.empty_local_budget();
                    }
                }
                _ = probes.tick() => {
                    if !fleet.link().is_up() && fleet.link().probe().await
                        && let Some(live) = fleet.heartbeat().await
                    {
                        gateway.rescale(live);
                    }
                }
                _ = beats.tick() => {
                    if let Some(live) = fleet.heartbeat().await {
                        gateway.rescale(live);
                    }
                }
                () = shutdown.wait() => {
                    fleet.leave().await;
                    break;
                }
            }
        }
    })
}

/// The branch listener: one socket on the shared runtime (`server.workers = 0`), or one
/// `SO_REUSEPORT` socket per worker thread, each served by its own current-thread runtime
/// (the kernel spreads connections over them; no request hops between threads).
struct BranchListeners {
    addr: SocketAddr,
    shared: Option<TcpListener>,
    per_worker: Vec<std::net::TcpListener>,
}

impl BranchListeners {
    fn bind(listen: SocketAddr, workers: usize) -> std::io::Result<Self> {
        if workers == 0 {
            let listener = std::net::TcpListener::bind(listen)?;
            listener.set_nonblocking(true)?;
            let listener = TcpListener::from_std(listener)?;
            return Ok(Self {
                addr: listener.local_addr()?,
                shared: Some(listener),
                per_worker: Vec::new(),
            });
        }
        let mut addr = listen;
        let mut per_worker = Vec::with_capacity(workers);
        for _ in 0..workers {
            let socket = if addr.is_ipv4() {
                tokio::net::TcpSocket::new_v4()?
            } else {
                tokio::net::TcpSocket::new_v6()?
            };
            socket.set_reuseaddr(true)?;
            #[cfg(unix)]
            socket.set_reuseport(true)?;
            socket.bind(addr)?;
            // Port 0 picks a port once; every other worker binds that same port.
            addr = socket.local_addr()?;
            per_worker.push(socket.listen(1024)?.into_std()?);
        }
        Ok(Self {
            addr,
            shared: None,
            per_worker,
        })
    }
}

/// Serves the branch listeners; resolves when every accept loop has drained.
fn serve_branch(
    listeners: BranchListeners,
    gateway: &Arc<Gateway>,
    closing: &Shutdown,
    limits: ConnectionLimits,
) -> JoinHandle<()> {
    if let Some(listener) = listeners.shared {
        return tokio::spawn(accept_loop(
            listener,
            Arc::clone(gateway),
            closing.clone(),
            limits,
        ));
    }
    let threads: Vec<_> = listeners
        .per_worker
        .into_iter()
        .enumerate()
        .filter_map(|(n, listener)| {
            let (gateway, closing) = (Arc::clone(gateway), closing.clone());
            std::thread::Builder::new()
                .name(format!("diia-gateway-worker-{n}"))
                .spawn(move || {
                    worker::enter();
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build();
                    let Ok(runtime) = runtime else {
                        tracing::error!("cannot start a worker runtime");
                        return;
                    };
                    runtime.block_on(async move {
                        match TcpListener::from_std(listener) {
                            Ok(listener) => accept_loop(listener, gateway, closing, limits).await,
                            Err(error) => tracing::error!(%error, "worker listener unusable"),
                        }
                    });
                })
                .map_err(|error| tracing::error!(%error, "cannot start a worker thread"))
                .ok()
        })
        .collect();
    tokio::task::spawn_blocking(move || {
        for thread in threads {
            let _ = thread.join();
        }
    })
}

/// The branch and admin accept loops. The admin listener outlives the branch listener's
/// drain, so probes see the 503.
fn spawn_listeners(
    (listeners, admin_listener): (BranchListeners, TcpListener),
    (gateway, admin): (&Arc<Gateway>, Arc<Admin>),
    closing: &Shutdown,
    limits: ConnectionLimits,
) -> [JoinHandle<()>; 2] {
    let admin_closing = Shutdown::new();
    let gateway_loop = serve_branch(listeners, gateway, closing, limits);
    let branch_side = {
        let admin_closing = admin_closing.clone();
        tokio::spawn(async move {
            let _ = gateway_loop.await;
            admin_closing.trigger();
        })
    };
    let admin_side = tokio::spawn(accept_loop(
        admin_listener,
        admin,
        admin_closing,
        ConnectionLimits::default(),
    ));
    [branch_side, admin_side]
}
