//! The runtime: listeners bound, worker threads started, the drain's two phases, and the
//! [`RunningGateway`] handle tests and the binary hold.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::admin::{Admin, RelayAdmin};
use crate::gateway::Gateway;
use crate::relay::deliver::{Deliverer, DeliveryOptions};
use crate::relay::desk::RelayDesk;
use crate::relay::fleet::{FleetRoutes, SharedRoutes, Stored};
use crate::relay::fleet_pulls::{FleetPulls, Listed, PULL_COPY_MAX, PullPut, SharedPulls};
use crate::relay::ingress::{self, Ingress};
use crate::relay::metrics::{RelayMetrics, spawn_stats_refresh};
use crate::relay::settings::RelaySettings;
use crate::relay::{self, CallbackStore, Options, Retention, SqliteStore};
use crate::reload::Reloader;
use crate::scaleout::relay_pulls::PullPut as Copied;
use crate::scaleout::{RouteClaim, Scaleout};
use crate::server::{ConnectionLimits, accept_loop};
use crate::service::Shutdown;
use crate::settings::{Settings, UpstreamTarget};
use crate::{scaleout, worker};

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
    relay: Option<(SocketAddr, SqliteStore)>,
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

    /// The callback relay's listener, when `[callback_relay]` is on.
    #[must_use]
    pub fn relay_addr(&self) -> Option<SocketAddr> {
        self.relay.as_ref().map(|(addr, _)| *addr)
    }

    /// The callback relay's store, when `[callback_relay]` is on.
    #[must_use]
    pub fn relay_store(&self) -> Option<&SqliteStore> {
        self.relay.as_ref().map(|(_, store)| store)
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
        // The store's last clone joins its writer thread: not on the runtime.
        if let Some((_, store)) = self.relay.take() {
            let _ = tokio::task::spawn_blocking(move || drop(store)).await;
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
    if let (Some(fleet_settings), Some(fleet)) =
        (&settings.cold.scaleout, gateway.scaleout().cloned())
    {
        let (rescale, down, closing) =
            (Arc::clone(&gateway), Arc::clone(&gateway), closing.clone());
        tasks.push(
            scaleout::join_fleet(
                fleet,
                fleet_settings,
                async move { closing.wait().await },
                move |live| rescale.rescale(live),
                move || down.empty_local_budget(),
            )
            .await,
        );
    }
    let relay = match &settings.relay {
        Some(relay) => {
            let drain = settings.cold.drain_timeout;
            let started = start_relay(relay, &gateway, &closing, drain).await?;
            Some(serve_relay(started, &gateway, &admin, &closing, &mut tasks))
        }
        None => None,
    };
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
        relay,
    })
}

/// Opens the relay's store (refusing to start when it cannot), connects the gateway's
/// routes and pull side to it, serves its ingress on its own listener, and runs the push
/// worker and the store's housekeeping (and, with `[scaleout]`, the sweep that routes
/// orphans by the fleet's routes), all until `closing`.
async fn start_relay(
    relay: &Arc<RelaySettings>,
    gateway: &Arc<Gateway>,
    closing: &Shutdown,
    drain_timeout: Duration,
) -> std::io::Result<StartedRelay> {
    let store = open_relay_store(relay).await?;
    let listener = TcpListener::bind(relay.listen).await.map_err(|error| {
        std::io::Error::new(
            error.kind(),
            format!("callback_relay.listen {}: {error}", relay.listen),
        )
    })?;
    let addr = listener.local_addr()?;
    let metrics = Arc::clone(&gateway.metrics().relay);
    metrics.attach_store(&store);
    let shared: Arc<dyn CallbackStore> = Arc::new(store.clone());
    let (fleet, pulls) = relay_fleet(relay, gateway, &metrics);
    let mut desk = RelayDesk::new(Arc::clone(relay), Arc::clone(&shared));
    let mut ingress = Ingress::new(
        Arc::clone(relay),
        Arc::clone(&shared),
        metrics,
        desk.arrivals(),
    );
    if let Some(fleet) = &fleet {
        desk = desk.with_fleet(Arc::clone(fleet));
        ingress = ingress.with_fleet(Arc::clone(fleet));
    }
    let deliverer = Deliverer::new(Arc::clone(&shared), relay, DeliveryOptions::default())?;
    if let Some(pulls) = &pulls {
        desk = desk.with_fleet_pulls(Arc::clone(pulls));
        deliverer.attach_pull_copies(Arc::clone(pulls));
    }
    let (desk, ingress) = (Arc::new(desk), Arc::new(ingress));
    gateway.attach_relay(Arc::clone(&desk));
    let until_closing = |closing: &Shutdown| {
        let closing = closing.clone();
        async move { closing.wait().await }
    };
    gateway
        .metrics()
        .relay
        .attach_delivery(deliverer.counters());
    let mut tasks = vec![
        tokio::spawn(ingress::serve(
            listener,
            ingress,
            relay.tls.clone(),
            until_closing(closing),
            drain_timeout,
        )),
        deliverer.spawn(until_closing(closing)),
        tokio::spawn(relay_housekeeping(
            store.clone(),
            relay.retention,
            until_closing(closing),
        )),
    ];
    tasks.extend(watch_relay_config(relay, gateway, until_closing(closing)));
    if let (Some(fleet), Some(pulls)) = (fleet, pulls.clone()) {
        let (store, arrivals) = (Arc::clone(&shared), desk.arrivals());
        tasks.push(tokio::spawn(fleet.sweep(
            store,
            arrivals,
            until_closing(closing),
        )));
        let settle = pulls.settle(Arc::clone(&shared), until_closing(closing));
        tasks.push(tokio::spawn(settle));
    }
    tracing::info!(relay_addr = %addr, acquirers = relay.acquirers.len(), targets = relay.targets.len(), "callback relay listening");
    Ok(StartedRelay {
        tasks,
        addr,
        store,
        pulls,
    })
}

/// Hands a started relay's tasks to the runtime's, its store (and fleet pull copies) to
/// the admin listener, and keeps the store's gauges fresh; the ingress address and the
/// store are the running gateway's.
fn serve_relay(
    started: StartedRelay,
    gateway: &Arc<Gateway>,
    admin: &Admin,
    closing: &Shutdown,
    tasks: &mut Vec<JoinHandle<()>>,
) -> (SocketAddr, SqliteStore) {
    let StartedRelay {
        tasks: relay_tasks,
        addr,
        store,
        pulls,
    } = started;
    tasks.extend(relay_tasks);
    admin.attach_relay(RelayAdmin {
        store: Arc::new(store.clone()),
        pulls,
    });
    let (metrics, closed) = (Arc::clone(&gateway.metrics().relay), closing.clone());
    tasks.push(spawn_stats_refresh(
        Arc::new(store.clone()),
        metrics,
        async move { closed.wait().await },
    ));
    (addr, store)
}

/// What [`start_relay`] started: its tasks, the ingress address, the store, and with
/// `[scaleout]` the fleet's pull copies (the admin's erase and purge reach them too).
struct StartedRelay {
    tasks: Vec<JoinHandle<()>>,
    addr: SocketAddr,
    store: SqliteStore,
    pulls: Option<Arc<FleetPulls>>,
}

/// The relay's store, opened off the runtime's threads (it may create the file and run
/// the schema); an error names `callback_relay.data_dir`.
async fn open_relay_store(relay: &RelaySettings) -> std::io::Result<SqliteStore> {
    let (dir, keys) = (relay.data_dir.clone(), Arc::clone(&relay.keys));
    let options = Options {
        fsync: relay.fsync,
        max_db_bytes: relay.max_db_bytes,
    };
    let opened = tokio::task::spawn_blocking(move || SqliteStore::open_with(&dir, keys, options))
        .await
        .map_err(std::io::Error::other)?;
    opened.map_err(|error| {
        std::io::Error::other(format!(
            "callback_relay.data_dir {}: cannot open the relay store: {error}",
            relay.data_dir.display()
        ))
    })
}

/// With `[scaleout]`: compares this instance's relay routing config with the fleet's on
/// every heartbeat until `closing` (`diia_gateway_relay_config_mismatch`). Instances of
/// one fleet must agree on what routes mean; a difference is reported, never refused.
fn watch_relay_config(
    relay: &RelaySettings,
    gateway: &Gateway,
    closing: impl std::future::Future<Output = ()> + Send + 'static,
) -> Option<JoinHandle<()>> {
    let fleet = gateway.scaleout()?;
    let fingerprint = fleet.relay_config_fingerprint(&relay.routing_config());
    let metrics = Arc::clone(&gateway.metrics().relay);
    Some(scaleout::watch_relay_config(
        Arc::clone(fleet),
        fingerprint,
        closing,
        move |agreement| metrics.config_mismatch(agreement.mismatch()),
    ))
}

/// With `[scaleout]`, the relay's fleet side over Redis: routes, so any instance can route
/// a callback, and packages held for pull-only branches, so a pull reaching any instance
/// finds them.
fn relay_fleet(
    relay: &RelaySettings,
    gateway: &Gateway,
    metrics: &Arc<RelayMetrics>,
) -> (Option<Arc<FleetRoutes>>, Option<Arc<FleetPulls>>) {
    let Some(fleet) = gateway.scaleout() else {
        return (None, None);
    };
    let routes: Arc<dyn SharedRoutes> = Arc::new(RedisRoutes(Arc::clone(fleet)));
    let pulls: Arc<dyn SharedPulls> = Arc::new(RedisPulls(Arc::clone(fleet)));
    let max_copy = relay.max_body.min(PULL_COPY_MAX);
    let names = relay.acquirers.iter().map(|a| a.name.clone()).collect();
    (
        Some(Arc::new(FleetRoutes::new(routes, Arc::clone(metrics)))),
        Some(Arc::new(FleetPulls::new(
            pulls,
            Arc::clone(metrics),
            relay.max_age,
            max_copy,
            names,
        ))),
    )
}

/// The relay's shared routes over the fleet's Redis: the glue between `relay::fleet` (which
/// does not depend on the fleet's modules: those reach the relay through the metrics) and
/// `scaleout::relay_routes`.
struct RedisRoutes(Arc<Scaleout>);

impl SharedRoutes for RedisRoutes {
    fn key(&self, acquirer: &str, request_id: &str) -> String {
        self.0.route_key(acquirer, request_id).into_string()
    }

    fn claim<'a>(
        &'a self,
        key: &'a str,
        plain: &'a [u8],
        ttl: Duration,
    ) -> BoxFuture<'a, Option<Stored>> {
        Box::pin(async move {
            Some(match self.0.claim_route(key, plain, ttl).await? {
                RouteClaim::Claimed(value) => Stored::Claimed(value),
                RouteClaim::Held { plain, sealed } => Stored::Held {
                    plain,
                    value: sealed,
                },
                RouteClaim::Unreadable => Stored::Unreadable,
            })
        })
    }

    fn refresh<'a>(
        &'a self,
        key: &'a str,
        held: &'a [u8],
        plain: &'a [u8],
        ttl: Duration,
    ) -> BoxFuture<'a, Option<Vec<u8>>> {
        Box::pin(self.0.refresh_route(key, held, plain, ttl))
    }

    fn release<'a>(&'a self, key: &'a str, value: &'a [u8]) -> BoxFuture<'a, ()> {
        Box::pin(self.0.release_route(key, value))
    }

    fn find<'a>(
        &'a self,
        keys: &'a [String],
    ) -> BoxFuture<'a, Option<Vec<Option<(Vec<u8>, Duration)>>>> {
        Box::pin(async move {
            let found = self.0.find_routes(keys).await?;
            Some(
                found
                    .into_iter()
                    .map(|found| found.map(|found| (found.plain, found.left)))
                    .collect(),
            )
        })
    }
}

/// The relay's pull copies over the fleet's Redis: the glue between `relay::fleet_pulls`
/// and `scaleout::relay_pulls`, as [`RedisRoutes`] is for the routes.
struct RedisPulls(Arc<Scaleout>);

impl SharedPulls for RedisPulls {
    fn key(&self, acquirer: &str, request_id: &str) -> String {
        self.0.pull_key(acquirer, request_id)
    }

    fn field(&self, id: crate::relay::RecordId) -> String {
        self.0.pull_field(&id.0)
    }

    fn put<'a>(
        &'a self,
        key: &'a str,
        field: &'a str,
        plain: &'a [u8],
        ttl: Duration,
        received_ms: u64,
    ) -> BoxFuture<'a, PullPut> {
        Box::pin(async move {
            match self.0.put_pull(key, field, plain, ttl, received_ms).await {
                Copied::Stored => PullPut::Stored,
                Copied::Failed => PullPut::Failed,
                Copied::Erased => PullPut::Erased,
            }
        })
    }

    fn mark_erased<'a>(&'a self, key: &'a str, ttl: Duration) -> BoxFuture<'a, bool> {
        Box::pin(self.0.erase_pulls(key, ttl))
    }

    fn list<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Option<Listed>> {
        Box::pin(self.0.list_pulls(key))
    }

    fn ack<'a>(&'a self, key: &'a str, field: &'a str, ttl: Duration) -> BoxFuture<'a, bool> {
        Box::pin(self.0.ack_pull(key, field, ttl))
    }

    fn acked<'a>(&'a self, fields: &'a [String]) -> BoxFuture<'a, Option<Vec<bool>>> {
        Box::pin(self.0.pulls_acked(fields))
    }
}

/// How often the relay's store drops what its retention no longer keeps and truncates
/// its WAL (so deleted payload pages do not linger in it).
const RELAY_HOUSEKEEPING: Duration = Duration::from_secs(60);

/// Retention and checkpoints for the relay's store until `closing`.
async fn relay_housekeeping(
    store: SqliteStore,
    retention: Retention,
    closing: impl std::future::Future<Output = ()>,
) {
    let mut closing = std::pin::pin!(closing);
    let mut tick = tokio::time::interval(RELAY_HOUSEKEEPING);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = &mut closing => return,
            _ = tick.tick() => {}
        }
        match store.purge_expired(relay::now_ms(), retention).await {
            Ok(purged) => tracing::debug!(
                delivered = purged.delivered,
                dead = purged.dead,
                orphan = purged.orphan,
                routes = purged.routes,
                "relay: expired records purged"
            ),
            Err(error) => tracing::warn!(%error, "relay: purging expired records failed"),
        }
        if let Err(error) = store.checkpoint().await {
            tracing::warn!(%error, "relay: WAL checkpoint failed");
        }
    }
}

/// Starts the embedded simulator when the settings ask for one and points the settings
/// at it.
async fn start_upstream(settings: Settings) -> std::io::Result<(Settings, Option<SimHandle>)> {
    match &settings.cold.upstream {
        UpstreamTarget::Url(_) => Ok((settings, None)),
        #[cfg(feature = "embedded-sim")]
        UpstreamTarget::Embedded(config) => {
            let simulator = crate::embedded::start((**config).clone()).await?;
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
