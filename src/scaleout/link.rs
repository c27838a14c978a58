//! The connections to Redis: the primary one carries the Pub/Sub pattern subscription, the
//! probe and the commands of the shared runtime, a RESP3 `ConnectionManager` (it
//! reconnects and resubscribes by itself). Each `server.workers` thread sends its commands
//! on a lane of its own, a connection whose driver runs on that thread's runtime: through
//! the primary, every command would cross to another thread and back (two wake-ups, ~90 µs
//! per paced command on a 2-vCPU VM, measured by `benches/scaleout.rs`). Every command runs under
//! `scaleout.command_timeout`; the first error or timeout marks Redis down (one log line),
//! and from then on callers skip Redis at once instead of waiting on it. A background probe
//! marks it up again, and each lane is opened afresh after that.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{PushInfo, PushKind, RedisResult, Value};
use tokio::sync::watch;

use super::ScaleoutSettings;
use crate::metrics::Metrics;
use crate::per_thread::PerThread;

/// Pattern every instance subscribes to: one channel per key, named after the key.
pub const CHANNEL_PATTERN: &str = "{dg}:c:*";

/// A key's Redis entry or channel name: `{dg}:<kind>:` and the key in hex (fixed length,
/// kept on the stack).
pub type Channel = [u8; 39];

/// Local waiters for keys led by another instance, woken by the channel message.
#[derive(Default)]
pub struct Waiters {
    channels: Mutex<HashMap<Channel, watch::Sender<Option<Bytes>>>>,
}

/// One registration; dropping it forgets the channel when nobody else waits on it.
pub struct Waiting {
    waiters: Arc<Waiters>,
    channel: Channel,
    /// Receives the leader's message.
    pub message: watch::Receiver<Option<Bytes>>,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if let Ok(mut channels) = self.waiters.channels.lock()
            && channels
                .get(&self.channel)
                .is_some_and(|sender| sender.receiver_count() <= 1)
        {
            channels.remove(&self.channel);
        }
    }
}

impl Waiters {
    /// Registers interest in `channel` (before the lookup, so no message is missed).
    pub fn register(self: &Arc<Self>, channel: Channel) -> Option<Waiting> {
        let mut channels = self.channels.lock().ok()?;
        let message = channels
            .entry(channel)
            .or_insert_with(|| watch::channel(None).0)
            .subscribe();
        Some(Waiting {
            waiters: Arc::clone(self),
            channel,
            message,
        })
    }

    fn deliver(&self, push: &PushInfo, health: &Health) {
        if push.kind == PushKind::Disconnection {
            // Waiters must not sit out a lease on a connection that is gone.
            health.down("connection", "disconnected");
            return;
        }
        if push.kind != PushKind::PMessage {
            return;
        }
        let [
            _pattern,
            Value::BulkString(channel),
            Value::BulkString(payload),
        ] = push.data.as_slice()
        else {
            return;
        };
        let Ok(channel) = Channel::try_from(channel.as_slice()) else {
            return;
        };
        if let Ok(channels) = self.channels.lock()
            && let Some(sender) = channels.get(&channel)
        {
            sender.send_replace(Some(Bytes::copy_from_slice(payload)));
        }
    }

    /// Registered channels (tests and metrics).
    #[must_use]
    pub fn len(&self) -> usize {
        self.channels.lock().map_or(0, |c| c.len())
    }

    /// Whether nobody waits.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Whether Redis answers, with one log line and a gauge per transition.
struct Health {
    up: watch::Sender<bool>,
    metrics: Arc<Metrics>,
    origin: Instant,
    /// When Redis last came (back) up, in nanoseconds after `origin`.
    up_since: AtomicU64,
    /// Times Redis came (back) up: a lane opened before the last time is opened afresh.
    ups: AtomicU64,
}

impl Health {
    /// Marks Redis down; watchers hear only of a change, never of a repeat.
    fn down(&self, op: &'static str, why: &str) {
        if self.up.send_if_modified(|up| std::mem::replace(up, false)) {
            self.metrics.set_redis_up(false);
            tracing::warn!(
                op,
                error = why,
                "Redis unavailable; running degraded on local state (budget / live instances)"
            );
        }
    }

    fn up(&self) {
        if self.up.send_if_modified(|up| !std::mem::replace(up, true)) {
            let since = u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX);
            self.up_since.store(since, Ordering::Release);
            self.ups.fetch_add(1, Ordering::AcqRel);
            self.metrics.set_redis_up(true);
            tracing::info!("Redis reachable; shared mode resumed");
        }
    }
}

/// The connections, the up/down state and the waiters.
pub struct RedisLink {
    /// Pub/Sub, probe, and commands from the shared runtime.
    manager: ConnectionManager,
    /// How a worker thread's lane is made (no Pub/Sub on it).
    client: redis::Client,
    lane_config: ConnectionManagerConfig,
    connect_timeout: Duration,
    /// Each worker thread's lane (shared with the task that opens it).
    lanes: Arc<PerThread<Lane>>,
    health: Arc<Health>,
    command_timeout: Duration,
    metrics: Arc<Metrics>,
    /// Local waiters woken by Pub/Sub.
    pub waiters: Arc<Waiters>,
}

/// Why the link could not be built (bad URL, unreadable CA): a config error at start.
#[derive(Debug, thiserror::Error)]
#[error("scaleout.redis_url: {0}")]
pub struct LinkError(String);

impl RedisLink {
    /// Builds the link without connecting: the gateway starts (degraded) with Redis down.
    pub fn new(settings: &ScaleoutSettings, metrics: Arc<Metrics>) -> Result<Self, LinkError> {
        let mut info: redis::ConnectionInfo = settings
            .redis_url
            .parse()
            .map_err(|e: redis::RedisError| LinkError(e.to_string()))?;
        let mut redis_settings = info
            .redis_settings()
            .clone()
            .set_protocol(redis::ProtocolVersion::RESP3);
        if let Some(password) = &settings.redis_password {
            redis_settings = redis_settings.set_password(password.expose());
        }
        // Commands are small and latency-bound (a lookup sits before every miss's Diia
        // call): no Nagle delay behind an unacknowledged write of another command.
        let tcp = info.tcp_settings().clone().set_nodelay(true);
        info = info
            .set_redis_settings(redis_settings)
            .set_tcp_settings(tcp);
        let client = match &settings.redis_ca {
            Some(ca) => redis::Client::build_with_tls(
                info,
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(ca.clone()),
                },
            ),
            None => redis::Client::open(info),
        }
        .map_err(|e| LinkError(e.to_string()))?;
        let waiters = Arc::new(Waiters::default());
        let sink = Arc::clone(&waiters);
        let health = Arc::new(Health {
            up: watch::channel(false).0,
            metrics: Arc::clone(&metrics),
            origin: Instant::now(),
            up_since: AtomicU64::new(0),
            ups: AtomicU64::new(0),
        });
        let watcher = Arc::clone(&health);
        // No response timeout of the client's own: every command already runs under
        // `command_timeout` (`attempt`), and a second timer per command costs on each one.
        let lane_config = ConnectionManagerConfig::new()
            .set_response_timeout(None)
            .set_connection_timeout(Some(settings.connect_timeout))
            .set_min_delay(Duration::from_millis(20))
            .set_max_delay(settings.probe_interval)
            .set_number_of_retries(2);
        let config = lane_config
            .clone()
            .set_push_sender(move |push: PushInfo| {
                sink.deliver(&push, &watcher);
                Ok::<(), std::convert::Infallible>(())
            })
            .set_automatic_resubscription();
        let manager = ConnectionManager::new_lazy_with_config(client.clone(), config)
            .map_err(|e| LinkError(e.to_string()))?;
        metrics.set_redis_up(false);
        Ok(Self {
            manager,
            client,
            lane_config,
            connect_timeout: settings.connect_timeout,
            lanes: Arc::new(PerThread::new()),
            health,
            command_timeout: settings.command_timeout,
            metrics,
            waiters,
        })
    }

    /// Whether Redis answered last time.
    #[must_use]
    pub fn is_up(&self) -> bool {
        *self.health.up.borrow()
    }

    /// Whether Redis came (back) up less than `window` ago. Other instances may still be on
    /// their local budgets until their own probe sees Redis (within one probe interval), so
    /// for that long this instance spends both budgets: the fleet never sends more than the
    /// shared rate while it rejoins.
    #[must_use]
    pub fn rejoining(&self, window: Duration) -> bool {
        let since = Duration::from_nanos(self.health.up_since.load(Ordering::Acquire));
        self.is_up() && self.health.origin.elapsed() < since + window
    }

    /// Changes of the up/down state (waiters fall back at once when Redis goes down).
    #[must_use]
    pub fn watch(&self) -> watch::Receiver<bool> {
        self.health.up.subscribe()
    }

    /// Runs one operation under the command timeout; `None` (and Redis marked down) on
    /// error or timeout, `None` at once while Redis is down.
    pub async fn run<T, F, Fut>(&self, op: &'static str, call: F) -> Option<T>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        if !self.is_up() {
            return None;
        }
        self.attempt(op, call).await
    }

    /// Runs one operation under the command timeout even while Redis counts as down (a
    /// sharing request that must read the fleet's state rather than guess, a leader's
    /// write-back); `None` on error or timeout. Success does not mark Redis up: only the
    /// probe does, after resubscribing.
    pub async fn run_anyway<T, F, Fut>(&self, op: &'static str, call: F) -> Option<T>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        self.attempt(op, call).await
    }

    async fn attempt<T, F, Fut>(&self, op: &'static str, call: F) -> Option<T>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let started = Instant::now();
        let manager = self.lane().unwrap_or_else(|| self.manager.clone());
        let result = tokio::time::timeout(self.command_timeout, call(manager)).await;
        self.metrics.redis_op(op, started.elapsed());
        match result {
            Ok(Ok(value)) => Some(value),
            Ok(Err(error)) => {
                self.health.down(op, &format!("{:?}", error.kind()));
                None
            }
            Err(_) => {
                self.health.down(op, "timeout");
                None
            }
        }
    }

    /// One probe: PING and (re)subscribe; marks Redis up when both succeed.
    pub async fn probe(&self) -> bool {
        let answered = self
            .attempt("probe", |mut manager| async move {
                redis::cmd("PING").query_async::<()>(&mut manager).await?;
                manager.psubscribe(CHANNEL_PATTERN).await
            })
            .await
            .is_some();
        if answered {
            self.health.up();
        }
        answered
    }
}

/// A worker thread's own connection for one link.
struct Lane {
    /// `None` while it is being opened.
    manager: Option<ConnectionManager>,
    /// The link's count of Redis coming up when the lane was opened; `None`: not opened
    /// (or its opening failed, to be retried on a later command).
    ups: Option<u64>,
}

impl Lane {
    /// A lane not opened yet; what an ended thread left (its driver ran on that thread's
    /// runtime) is dropped.
    fn closed(_left: Option<Self>) -> Self {
        Self {
            manager: None,
            ups: None,
        }
    }
}

impl RedisLink {
    /// This worker thread's lane, when it has one ready; `None` off worker threads and
    /// while the lane opens (the primary carries those commands meanwhile).
    fn lane(&self) -> Option<ConnectionManager> {
        let ups = self.health.ups.load(Ordering::Acquire);
        if !crate::worker::is_worker() {
            return None;
        }
        self.lanes.with(Lane::closed, |lane| {
            let lane = lane?;
            if lane.ups == Some(ups) {
                return lane.manager.clone();
            }
            // Not opened yet, or opened before Redis last came back: its connection may be
            // a dead one.
            *lane = Lane {
                manager: None,
                ups: Some(ups),
            };
            self.open_lane(ups);
            None
        })
    }

    /// Opens a lane in a task of this thread's runtime (so its driver lives here) and
    /// installs it once it answers; a lane that cannot open is retried on a later command.
    /// The task holds the lanes weakly: a link dropped meanwhile drops the new lane too.
    fn open_lane(&self, ups: u64) {
        let (client, config) = (self.client.clone(), self.lane_config.clone());
        let (lanes, connect_timeout) = (Arc::downgrade(&self.lanes), self.connect_timeout);
        tokio::spawn(async move {
            let opened = async {
                let mut manager = ConnectionManager::new_with_config(client, config).await?;
                redis::cmd("PING").query_async::<()>(&mut manager).await?;
                Ok::<_, redis::RedisError>(manager)
            };
            let opened = tokio::time::timeout(connect_timeout, opened).await;
            let Some(lanes) = Weak::upgrade(&lanes) else {
                return;
            };
            lanes.peek(|lane| {
                let Some(lane) = lane.filter(|lane| lane.ups == Some(ups)) else {
                    return;
                };
                match opened {
                    Ok(Ok(manager)) => lane.manager = Some(manager),
                    Ok(Err(_)) | Err(_) => lane.ups = None,
                }
            });
        });
    }

    /// Whether this thread has a lane open for this link (tests).
    #[must_use]
    pub fn lane_open_here(&self) -> bool {
        self.lanes
            .peek(|lane| lane.is_some_and(|lane| lane.manager.is_some()))
    }
}
