//! Fleet membership: the signed instance set in Redis, the live count, the heartbeat.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::task::JoinHandle;

use super::{Scaleout, ScaleoutSettings, scripts};

const FLEET_KEY: &str = "{dg}:fleet";

impl Scaleout {
    /// Whether this instance is rejoining after Redis came back: until every instance has
    /// had time to see Redis again (two probe intervals and a connect), the others may
    /// still spend their local shares, so this one spends its local share as well.
    #[must_use]
    pub fn rejoining(&self) -> bool {
        self.link
            .rejoining(self.probe_interval * 2 + self.connect_timeout)
    }

    /// Live instances from the last heartbeat (at least 1; kept while Redis is down).
    #[must_use]
    pub fn live(&self) -> u32 {
        self.live.load(Ordering::Relaxed).max(1)
    }

    /// The last member this instance wrote (empty when none).
    fn current_member(&self) -> String {
        self.member
            .lock()
            .map(|member| member.clone().unwrap_or_default())
            .unwrap_or_default()
    }

    /// Replaces this instance's `previous` signed entry in the sorted set `key` with
    /// `entry`, drops entries older than `ttl_ms`, and reads Redis's clock (ms) and every
    /// entry left (one script: the fleet's membership and the relay config fingerprints
    /// are kept alike). `None` when Redis is down or did not answer in time.
    pub(super) async fn publish_entry(
        &self,
        op: &'static str,
        key: &'static str,
        entry: String,
        previous: String,
        ttl_ms: u64,
    ) -> Option<(u64, Vec<Vec<u8>>)> {
        self.link
            .run(op, |mut c| {
                let (entry, previous) = (entry.clone(), previous.clone());
                async move {
                    scripts::HEARTBEAT
                        .key(key)
                        .arg(entry)
                        .arg(previous)
                        .arg(ttl_ms)
                        .invoke_async(&mut c)
                        .await
                }
            })
            .await
    }

    /// Says this instance is alive and reads the live count; `Some(n)` when it changed.
    /// Only members signed under the fleet secret and stamped within the instance ttl
    /// count: a Redis writer cannot divide every local limit by adding members.
    pub async fn heartbeat(&self) -> Option<u32> {
        let ttl = u64::try_from(self.instance_ttl.as_millis()).unwrap_or(u64::MAX);
        let member = self.members.sign(&self.instance, self.redis_now_ms());
        let previous = self.current_member();
        let (now, members) = self
            .publish_entry("heartbeat", FLEET_KEY, member.clone(), previous, ttl)
            .await?;
        let age = u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.clock_offset
            .store(now.saturating_sub(age), Ordering::Relaxed);
        if let Ok(mut current) = self.member.lock() {
            *current = Some(member);
        }
        let mut instances: Vec<&[u8]> = members
            .iter()
            .filter_map(|member| self.members.open(member))
            .filter(|(_, stamp)| {
                stamp.saturating_add(ttl) >= now && *stamp <= now.saturating_add(ttl)
            })
            .map(|(instance, _)| instance)
            .collect();
        instances.sort_unstable();
        instances.dedup();
        let mut live = u32::try_from(instances.len()).unwrap_or(u32::MAX).max(1);
        if self.link.rejoining(self.instance_ttl) {
            // A restarted Redis lost the fleet set: instances reappear one heartbeat at a
            // time, and a count that drops meanwhile would hand out larger local shares.
            live = live.max(self.live());
        }
        self.metrics.set_instances(live);
        (self.live.swap(live, Ordering::Relaxed) != live).then_some(live)
    }

    /// Leaves the fleet (on shutdown), so the others take over its share at once.
    pub async fn leave(&self) {
        let instance = self.current_member();
        let _ = self
            .link
            .run("heartbeat", |mut c| async move {
                redis::cmd("ZREM")
                    .arg(FLEET_KEY)
                    .arg(instance)
                    .query_async::<i64>(&mut c)
                    .await
            })
            .await;
    }
}

/// Scale-out: a first probe and heartbeat (bounded by the Redis timeouts; the gateway
/// starts degraded when Redis is down), then the probe and heartbeat loop until
/// `shutdown`, when this instance leaves the fleet. `rescale` gets each new live count;
/// `redis_down` runs when Redis is seen going down.
pub async fn join_fleet(
    fleet: Arc<Scaleout>,
    settings: &ScaleoutSettings,
    shutdown: impl Future<Output = ()> + Send + 'static,
    rescale: impl Fn(u32) + Send + 'static,
    redis_down: impl Fn() + Send + 'static,
) -> JoinHandle<()> {
    let (probe_every, beat_every) = (settings.probe_interval, settings.heartbeat_interval);
    if !fleet.link().probe().await {
        tracing::warn!(
            "Redis unreachable at start; running degraded on local state until it answers"
        );
    } else if let Some(live) = fleet.heartbeat().await {
        rescale(live);
    }
    tokio::spawn(async move {
        let mut probes = tokio::time::interval(probe_every);
        let mut beats = tokio::time::interval(beat_every);
        let mut up = fleet.link().watch();
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            tokio::select! {
                changed = up.changed() => {
                    if changed.is_ok() && !*up.borrow_and_update() {
                        redis_down();
                    }
                }
                _ = probes.tick() => {
                    if !fleet.link().is_up() && fleet.link().probe().await
                        && let Some(live) = fleet.heartbeat().await
                    {
                        rescale(live);
                    }
                }
                _ = beats.tick() => {
                    if let Some(live) = fleet.heartbeat().await {
                        rescale(live);
                    }
                }
                () = &mut shutdown => {
                    fleet.leave().await;
                    break;
                }
            }
        }
    })
}
