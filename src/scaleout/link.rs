//! The one connection to Redis: commands and the Pub/Sub pattern subscription share a
//! RESP3 `ConnectionManager` (it reconnects and resubscribes by itself). Every command
//! runs under `scaleout.command_timeout`; the first error or timeout marks Redis down
//! (one log line), and from then on callers skip Redis at once instead of waiting on it.
//! A background probe marks it up again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{PushInfo, PushKind, RedisResult, Value};
use tokio::sync::watch;

use crate::metrics::Metrics;
use crate::settings::ScaleoutSettings;

/// Pattern every instance subscribes to: one channel per key, named after the key.
pub const CHANNEL_PATTERN: &str = "{dg}:c:*";

/// Local waiters for keys led by another instance, woken by the channel message.
#[derive(Default)]
pub struct Waiters {
    channels: Mutex<HashMap<Vec<u8>, watch::Sender<Option<Bytes>>>>,
}

/// One registration; dropping it forgets the channel when nobody else waits on it.
pub struct Waiting {
    waiters: Arc<Waiters>,
    channel: Vec<u8>,
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
    pub fn register(self: &Arc<Self>, channel: &[u8]) -> Option<Waiting> {
        let mut channels = self.channels.lock().ok()?;
        let message = channels
            .entry(channel.to_vec())
            .or_insert_with(|| watch::channel(None).0)
            .subscribe();
        Some(Waiting {
            waiters: Arc::clone(self),
            channel: channel.to_vec(),
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
        if let Ok(channels) = self.channels.lock()
            && let Some(sender) = channels.get(channel.as_slice())
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
            self.metrics.set_redis_up(true);
            tracing::info!("Redis reachable; shared mode resumed");
        }
    }
}

/// The connection, its up/down state and its waiters.
pub struct RedisLink {
    manager: ConnectionManager,
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
        });
        let watcher = Arc::clone(&health);
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(settings.command_timeout))
            .set_connection_timeout(Some(settings.connect_timeout))
            .set_min_delay(Duration::from_millis(20))
            .set_max_delay(settings.probe_interval)
            .set_number_of_retries(2)
            .set_push_sender(move |push: PushInfo| {
                sink.deliver(&push, &watcher);
                Ok::<(), std::convert::Infallible>(())
            })
            .set_automatic_resubscription();
        let manager = ConnectionManager::new_lazy_with_config(client, config)
            .map_err(|e| LinkError(e.to_string()))?;
        metrics.set_redis_up(false);
        Ok(Self {
            manager,
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

    async fn attempt<T, F, Fut>(&self, op: &'static str, call: F) -> Option<T>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let started = Instant::now();
        let result = tokio::time::timeout(self.command_timeout, call(self.manager.clone())).await;
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
