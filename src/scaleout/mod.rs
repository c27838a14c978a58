//! Scale-out: N gateway instances act as one toward Diia through one Redis primary.
//!
//! What is shared: the Diia budget (GCRA on Redis's clock) and Diia's brake, stored
//! answers, the lease that makes one instance the leader for a key (coalescing across
//! instances, sharing replay, session tokens), and the live instance count. What stays
//! local: the near cache in front of Redis, per-branch and per-client limits (at quota / N,
//! so abuse protection costs no round trip), the breaker.
//!
//! Redis down never fails a request: the first error marks it down, every instance runs
//! on its local state (budget at rate / N, local coalescing) until the probe finds Redis
//! again. Keys are MACs under the fleet secret and values are sealed with it
//! ([`secret`]): Redis never holds a barcode, requestId or token in clear.

pub mod link;
mod scripts;
pub mod secret;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use bytes::Bytes;
use redis::Value;

use crate::answer::{Answer, AnswerClass, CallResult};
use crate::cache::{Fetched, Origin};
use crate::error::GatewayError;
use crate::keys::CacheKey;
use crate::limit::{Share, Standing};
use crate::metrics::Metrics;
use crate::policy::Policy;
use crate::settings::ScaleoutSettings;
pub use link::{LinkError, RedisLink};
pub use secret::{FleetSecret, Sealer};

const BUDGET_KEY: &str = "{dg}:budget";
const BRAKE_KEY: &str = "{dg}:brake";
const FLEET_KEY: &str = "{dg}:fleet";
/// Stored value and message prefixes: positive answer, other stored answer, failure.
const POSITIVE: u8 = b'P';
const NEGATIVE: u8 = b'N';
const FAILURE: u8 = b'F';

/// The Diia budget's values as the shared GCRA takes them.
#[derive(Debug, Clone, Copy)]
pub struct BudgetValues {
    /// Sustained calls per second (fleet-wide).
    pub per_second: u32,
    /// Calls at once above it.
    pub burst: u32,
    /// Longest wait before a 503.
    pub max_wait: Duration,
}

impl BudgetValues {
    /// The same budget queued only half as deep: for a client past its share that is let
    /// through only because it is alone (see [`Standing::Alone`]).
    #[must_use]
    pub fn half_deep(self) -> Self {
        Self {
            max_wait: self.max_wait / 2,
            ..self
        }
    }

    /// Script arguments: emission interval (µs), burst, longest wait (µs), and the weight
    /// of one call (see [`Scaleout::weight`]), never above the burst.
    fn args(self, weight: u32) -> [u64; 4] {
        let interval = 1_000_000 / u64::from(self.per_second.max(1));
        let max_wait = u64::try_from(self.max_wait.as_micros()).unwrap_or(u64::MAX);
        let burst = u64::from(self.burst.max(1));
        [
            interval.max(1),
            burst,
            max_wait,
            u64::from(weight).min(burst),
        ]
    }
}

/// What the shared budget said about one Diia call.
enum Budget {
    /// Go after this wait (already reserved).
    Go(Duration),
    /// Refused: a 503 of ours.
    Refused(GatewayError),
}

fn budget_reply(code: i64, micros: i64) -> Option<Budget> {
    let wait = Duration::from_micros(u64::try_from(micros).unwrap_or(0));
    match code {
        0 => Some(Budget::Refused(GatewayError::DiiaBudgetExhausted {
            retry_after: wait,
        })),
        2 => Some(Budget::Refused(GatewayError::DiiaBackoff {
            retry_after: wait,
        })),
        1 | 4 => Some(Budget::Go(wait)),
        _ => None,
    }
}

/// What a shared lookup found.
enum Found {
    /// A stored answer (already opened), with the life it has left.
    Hit(CallResult, Duration),
    /// Another instance leads; its lease holder text and remaining life.
    Held(Vec<u8>, Duration),
    /// This instance leads after `wait` (budget reserved).
    Lead(Duration),
    /// The budget or Diia's brake refused.
    Refused(GatewayError),
}

/// The fleet side of one gateway instance.
pub struct Scaleout {
    link: Arc<RedisLink>,
    sealer: Sealer,
    lease: Duration,
    instance: String,
    instance_ttl: Duration,
    probe_interval: Duration,
    connect_timeout: Duration,
    live: AtomicU32,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Scaleout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Scaleout")
    }
}

/// One Redis key or channel name, `{dg}:<kind>:<the key in hex>`, built on the stack (one
/// per entry kind on every fleet lookup).
#[derive(Clone, Copy)]
struct Name(link::Channel);

impl Name {
    fn new(kind: u8, key: CacheKey) -> Self {
        let mut name = *b"{dg}:?:00000000000000000000000000000000";
        name[5] = kind;
        // 16 bytes always fill the 32 digits: the lengths are fixed by the types.
        let _ = hex::encode_to_slice(key.as_bytes(), &mut name[7..]);
        Self(name)
    }

    fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

/// Names of one key's Redis entries.
struct Names {
    result: Name,
    lease: Name,
    channel: Name,
}

impl Names {
    fn of(key: CacheKey) -> Self {
        Self {
            result: Name::new(b'r', key),
            lease: Name::new(b'l', key),
            channel: Name::new(b'c', key),
        }
    }
}

/// The lease holder text: the tag (a MAC, or `-`) and a random id of this claim.
fn holder(tag: Option<CacheKey>) -> String {
    let tag = tag.map_or_else(|| "-".to_owned(), |t| hex::encode(t.as_bytes()));
    format!("{tag}:{:016x}", fastrand::u64(..))
}

fn tag_of_holder(holder: &[u8]) -> &[u8] {
    holder.split(|b| *b == b':').next().unwrap_or_default()
}

fn tag_text(tag: Option<CacheKey>) -> Vec<u8> {
    tag.map_or_else(|| b"-".to_vec(), |t| hex::encode(t.as_bytes()).into_bytes())
}

impl Scaleout {
    /// The fleet side, not yet connected: the first probe and heartbeat come from the
    /// start-up loop (`lib.rs`), so a gateway starts with Redis down.
    pub fn new(settings: &ScaleoutSettings, metrics: Arc<Metrics>) -> Result<Self, LinkError> {
        let link = Arc::new(RedisLink::new(settings, Arc::clone(&metrics))?);
        metrics.set_instances(1);
        Ok(Self {
            link,
            sealer: settings.secret.sealer(),
            lease: settings.lease,
            instance: format!("{:016x}", fastrand::u64(..)),
            instance_ttl: settings.instance_ttl,
            probe_interval: settings.probe_interval,
            connect_timeout: settings.connect_timeout,
            live: AtomicU32::new(1),
            metrics,
        })
    }

    /// The Redis link.
    #[must_use]
    pub fn link(&self) -> &Arc<RedisLink> {
        &self.link
    }

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

    /// Says this instance is alive and reads the live count; `Some(n)` when it changed.
    pub async fn heartbeat(&self) -> Option<u32> {
        let ttl = u64::try_from(self.instance_ttl.as_millis()).unwrap_or(u64::MAX);
        let instance = self.instance.clone();
        let live: u32 = self
            .link
            .run("heartbeat", |mut c| async move {
                scripts::HEARTBEAT
                    .key(FLEET_KEY)
                    .arg(instance)
                    .arg(ttl)
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        let mut live = live.max(1);
        if self.link.rejoining(self.instance_ttl) {
            // A restarted Redis lost the fleet set: instances reappear one heartbeat at a
            // time, and a count that drops meanwhile would hand out larger local shares.
            live = live.max(self.live());
        }
        self.metrics.set_instances(live);
        (self.live.swap(live, Ordering::Relaxed) != live).then_some(live)
    }

    /// Counts a near-cache hit (answered without Redis).
    pub fn note_near_hit(&self) {
        self.metrics.shared_lookup("near_hit");
    }

    /// Drops a stored answer fleet-wide (a session token Diia has since refused).
    pub async fn forget(&self, key: CacheKey) {
        let names = Names::of(key);
        let _ = self
            .link
            .run("finish", |mut c| async move {
                redis::cmd("DEL")
                    .arg(names.result.as_bytes())
                    .query_async::<i64>(&mut c)
                    .await
            })
            .await;
    }

    /// Leaves the fleet (on shutdown), so the others take over its share at once.
    pub async fn leave(&self) {
        let instance = self.instance.clone();
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

    /// One Diia call's worth of the shared budget: `Some(Ok(wait))` (reserved; go after
    /// `wait`), `Some(Err(refusal))`, or `None` when Redis is down (use the local budget).
    pub async fn reserve(&self, budget: BudgetValues) -> Option<Result<Duration, GatewayError>> {
        let args = budget.args(1);
        let (code, micros): (i64, i64) = self
            .link
            .run("budget", |mut c| async move {
                scripts::RESERVE
                    .key(BUDGET_KEY)
                    .key(BRAKE_KEY)
                    .arg(&args[..])
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        match budget_reply(code, micros)? {
            Budget::Go(wait) => Some(Ok(wait)),
            Budget::Refused(refusal) => Some(Err(refusal)),
        }
    }

    /// One lookup round trip for `key` (stored answer, lease, budget), as a leader would
    /// make it; `true` when it found a stored answer. For `benches/scaleout.rs`, which
    /// reports each Redis operation's latency on its own.
    pub async fn lookup_once(&self, key: CacheKey, budget: BudgetValues) -> bool {
        let names = Names::of(key);
        let found = self
            .lookup(&names, &holder(None), self.lease, budget, true)
            .await;
        matches!(found, Some(Found::Hit(..)))
    }

    /// One write-back round trip (store, release, publish), as a leader makes it after
    /// its call; for `benches/scaleout.rs`.
    pub async fn write_back_once(&self, key: CacheKey, result: CallResult, ttl: Duration) {
        self.finish(Names::of(key), holder(None), result, Some(ttl), None)
            .await;
    }

    /// Diia's pause as the fleet holds it, if any (`None` too when Redis is down): for
    /// calls that spend no fleet budget (unverified session tokens) but must still
    /// honour the brake.
    pub async fn braked(&self) -> Option<Duration> {
        let millis = self
            .link
            .run("brake", |mut c| async move {
                redis::cmd("PTTL")
                    .arg(BRAKE_KEY)
                    .query_async::<i64>(&mut c)
                    .await
            })
            .await?;
        let millis = u64::try_from(millis).ok().filter(|millis| *millis > 0)?;
        Some(Duration::from_millis(millis))
    }

    /// Shares Diia's `Retry-After` pause with the fleet (only ever extended).
    pub async fn pause(&self, wait: Duration) {
        let millis = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1);
        let _ = self
            .link
            .run("brake", |mut c| async move {
                scripts::PAUSE
                    .key(BRAKE_KEY)
                    .arg(millis)
                    .invoke_async::<i64>(&mut c)
                    .await
            })
            .await;
    }

    async fn lookup(
        &self,
        names: &Names,
        holder: &str,
        lease: Duration,
        budget: BudgetValues,
        reserve: bool,
    ) -> Option<Found> {
        let args = budget.args(u32::from(reserve));
        let lease_ms = u64::try_from(lease.as_millis()).unwrap_or(u64::MAX).max(1);
        let reply: Vec<Value> = self
            .link
            .run("lookup", |mut c| async move {
                scripts::LOOKUP
                    .key(BUDGET_KEY)
                    .key(BRAKE_KEY)
                    .key(names.result.as_bytes())
                    .key(names.lease.as_bytes())
                    .arg(&args[..])
                    .arg(holder)
                    .arg(lease_ms)
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        let int = |v: Option<&Value>| match v {
            Some(Value::Int(n)) => *n,
            _ => -1,
        };
        let millis = |v: Option<&Value>| Duration::from_millis(u64::try_from(int(v)).unwrap_or(0));
        match (int(reply.first()), reply.get(1)) {
            (1, Some(Value::BulkString(value))) => {
                let (result, _, _) = self.open(names, value)?;
                Some(Found::Hit(result, millis(reply.get(2))))
            }
            (3, Some(Value::BulkString(holder))) => {
                Some(Found::Held(holder.clone(), millis(reply.get(2))))
            }
            (code, _) => match budget_reply(code, int(reply.get(1)))? {
                Budget::Go(wait) => Some(Found::Lead(wait)),
                Budget::Refused(refusal) => Some(Found::Refused(refusal)),
            },
        }
    }

    /// Seals a result: prefix byte, then sealed `fresh_ms ‖ tag ‖ kind ‖ payload`.
    fn seal(
        &self,
        names: &Names,
        result: &CallResult,
        fresh: Duration,
        tag: Option<CacheKey>,
    ) -> Option<Vec<u8>> {
        let mut plain = Vec::with_capacity(64);
        plain.extend_from_slice(&u64::try_from(fresh.as_millis()).unwrap_or(0).to_be_bytes());
        let tag = tag_text(tag);
        plain.push(u8::try_from(tag.len()).ok()?);
        plain.extend_from_slice(&tag);
        let prefix = match result {
            Ok(answer) => {
                plain.extend_from_slice(&answer.to_wire());
                if AnswerClass::of_status(answer.status) == AnswerClass::Ok {
                    POSITIVE
                } else {
                    NEGATIVE
                }
            }
            Err(error) => {
                let wait = error.retry_after().unwrap_or_default();
                plain
                    .extend_from_slice(&u64::try_from(wait.as_millis()).unwrap_or(0).to_be_bytes());
                plain.extend_from_slice(error.code().as_bytes());
                FAILURE
            }
        };
        let mut out = vec![prefix];
        out.extend(self.sealer.seal(names.result.as_bytes(), &plain)?);
        Some(out)
    }

    /// Opens a value or message: the result, its freshness left, its tag text.
    fn open(&self, names: &Names, value: &[u8]) -> Option<(CallResult, Duration, Vec<u8>)> {
        let (&prefix, sealed) = value.split_first()?;
        let plain = self.sealer.open(names.result.as_bytes(), sealed)?;
        let (fresh, rest) = plain.split_at_checked(8)?;
        let fresh = Duration::from_millis(u64::from_be_bytes(fresh.try_into().ok()?));
        let (&tag_len, rest) = rest.split_first()?;
        let (tag, payload) = rest.split_at_checked(usize::from(tag_len))?;
        let result = if prefix == FAILURE {
            let (wait, code) = payload.split_at_checked(8)?;
            let wait = Duration::from_millis(u64::from_be_bytes(wait.try_into().ok()?));
            Err(GatewayError::from_remote(
                std::str::from_utf8(code).ok()?,
                wait,
            ))
        } else {
            Ok(Answer::from_wire(payload)?)
        };
        Some((result, fresh, tag.to_vec()))
    }

    /// The leader's write-back, after its client has its answer: store (when kept), free
    /// the lease, tell the waiters.
    async fn finish(
        &self,
        names: Names,
        holder: String,
        result: CallResult,
        ttl: Option<Duration>,
        tag: Option<CacheKey>,
    ) {
        let Some(message) = self.seal(&names, &result, ttl.unwrap_or_default(), tag) else {
            return;
        };
        let positive = if message.first() == Some(&POSITIVE) {
            "1"
        } else {
            "0"
        };
        let (value, ttl_ms) = match ttl {
            Some(ttl) => (
                message.clone(),
                u64::try_from(ttl.as_millis()).unwrap_or(1).max(1),
            ),
            None => (Vec::new(), 1),
        };
        let _ = self
            .link
            .run("finish", |mut c| async move {
                scripts::FINISH
                    .key(names.result.as_bytes())
                    .key(names.lease.as_bytes())
                    .arg(holder)
                    .arg(value)
                    .arg(ttl_ms)
                    .arg(positive)
                    .arg(names.channel.as_bytes())
                    .arg(message)
                    .invoke_async::<i64>(&mut c)
                    .await
            })
            .await;
    }

    /// One cacheable request's call, fleet-wide: a stored answer in Redis, or the answer
    /// of the instance that leads the key, or this instance leads and `call` goes to Diia
    /// (given the wait the shared budget reserved). Degrades to `call(None)` (local
    /// budget) whenever Redis is down.
    pub async fn fetch<F, Fut>(
        self: Arc<Self>,
        key: CacheKey,
        tag: Option<CacheKey>,
        shape: Shape,
        call: F,
    ) -> Fetched
    where
        F: FnOnce(Option<Duration>) -> Fut,
        Fut: Future<Output = CallResult>,
    {
        let names = Names::of(key);
        let lease = if shape.sharing {
            shape.policy_ttl_ceiling()
        } else {
            self.lease
        };
        let mut call = Some(call);
        let mut waited = Duration::ZERO;
        loop {
            let Some(waiting) = self.link.waiters.register(names.channel.0) else {
                break;
            };
            let claim = holder(tag);
            // A client past its share of the Diia budget takes the lease without reserving
            // the fleet's budget: it waits for its share first (see `Upstream::admit`), so a
            // flood cannot spend the budget a quiet branch needs.
            let standing = shape
                .share
                .as_ref()
                .map_or(Standing::Within, |share| share.standing());
            let reserve = standing != Standing::Over && !shape.unverified;
            let budget = match standing {
                Standing::Alone => shape.budget.half_deep(),
                Standing::Within | Standing::Over => shape.budget,
            };
            let found = self.lookup(&names, &claim, lease, budget, reserve).await;
            let (holder_text, left) = match found {
                None => break,
                Some(Found::Hit(result, fresh)) => {
                    self.metrics.shared_lookup("remote_hit");
                    return Fetched {
                        result,
                        origin: Origin::RemoteHit { fresh_for: fresh },
                    };
                }
                Some(Found::Refused(refusal)) => {
                    self.metrics.shared_lookup("leader");
                    return Fetched::diia(Err(refusal));
                }
                Some(Found::Lead(wait)) => {
                    self.metrics.shared_lookup("leader");
                    drop(waiting);
                    let Some(call) = call.take() else {
                        return Fetched::diia(Err(GatewayError::Internal));
                    };
                    let prepaid = reserve.then_some(wait);
                    let result = shape.policy.settle(call(prepaid).await);
                    let ttl = shape.policy.ttl(&result);
                    let me = Arc::clone(&self);
                    let kept = result.clone();
                    tokio::spawn(async move {
                        // The clients first: their answers leave before the write-back
                        // takes the worker.
                        tokio::task::yield_now().await;
                        me.finish(names, claim, kept, ttl, tag).await;
                    });
                    return Fetched::diia(result);
                }
                Some(Found::Held(holder_text, left)) => (holder_text, left),
            };
            if tag_of_holder(&holder_text) != tag_text(tag).as_slice() {
                return Fetched::diia(Err(GatewayError::SharingAlreadyRequested));
            }
            self.metrics.shared_lookup("remote_wait");
            // Wait for the leader's message; the lease is the fallback when a message is
            // lost, and Redis going down ends the wait at once.
            let cap = if shape.sharing {
                shape.longest_call.saturating_sub(waited)
            } else {
                left + Duration::from_millis(5)
            };
            let started = tokio::time::Instant::now();
            match self.wait(waiting, cap).await {
                Waited::Message(value) => {
                    if let Some((result, fresh, _)) = self.open(&names, &value) {
                        let fresh_for = (!fresh.is_zero()).then_some(fresh);
                        return Fetched {
                            result,
                            origin: Origin::RemoteWait { fresh_for },
                        };
                    }
                }
                Waited::Down if shape.sharing => {
                    return Fetched::diia(Err(GatewayError::SharingOutcomeUnknown));
                }
                Waited::Down => break,
                Waited::Expired if shape.sharing => {
                    return Fetched::diia(Err(GatewayError::SharingOutcomeUnknown));
                }
                Waited::Expired => {}
            }
            waited += started.elapsed();
            if waited >= shape.longest_call {
                return Fetched::diia(Err(GatewayError::UpstreamTimeout));
            }
        }
        self.metrics.shared_lookup("degraded");
        match call.take() {
            Some(call) => Fetched::diia(call(None).await),
            None => Fetched::diia(Err(GatewayError::Internal)),
        }
    }

    async fn wait(&self, mut waiting: link::Waiting, cap: Duration) -> Waited {
        let mut up = self.link.watch();
        let until = tokio::time::Instant::now() + cap;
        loop {
            tokio::select! {
                changed = waiting.message.changed() => {
                    if changed.is_err() {
                        return Waited::Expired;
                    }
                    if let Some(value) = waiting.message.borrow_and_update().clone() {
                        return Waited::Message(value);
                    }
                }
                changed = up.changed() => {
                    if changed.is_err() || !*up.borrow_and_update() {
                        return Waited::Down;
                    }
                }
                () = tokio::time::sleep_until(until) => return Waited::Expired,
            }
        }
    }
}

/// How a remote wait ended.
enum Waited {
    Message(Bytes),
    Down,
    Expired,
}

/// What a shared fetch needs to know about the cache it fills.
#[derive(Debug, Clone)]
pub struct Shape {
    /// The cache's TTL policy (settles the leader's result, decides what is stored).
    pub policy: Policy,
    /// The Diia budget (fleet-wide values).
    pub budget: BudgetValues,
    /// The longest a leader's call can take.
    pub longest_call: Duration,
    /// Sharing: the lease lives as long as the barcode and a dead leader is never replaced.
    pub sharing: bool,
    /// The calling client's share of the Diia budget, when shares are enforced.
    pub share: Option<Arc<Share>>,
    /// The call spends the local unverified budget, never the fleet's (see
    /// [`crate::trust`]): its lease reserves nothing.
    pub unverified: bool,
}

impl Shape {
    fn policy_ttl_ceiling(&self) -> Duration {
        match self.policy {
            Policy::Sharing { ttl } => ttl.max(crate::diia::BARCODE_LIFETIME),
            Policy::Verification { ttl, .. } => ttl,
            Policy::SessionToken { .. } => self.longest_call,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_the_kind_and_the_key_in_hex_under_the_hash_tag() {
        let key = crate::keys::HashKey::fixed([1; 16]).key("t").finish();
        let hex = hex::encode(key.as_bytes());
        let names = Names::of(key);
        for (name, kind) in [
            (names.result, "r"),
            (names.lease, "l"),
            (names.channel, "c"),
        ] {
            assert_eq!(name.as_bytes(), format!("{{dg}}:{kind}:{hex}").as_bytes());
        }
    }
}
