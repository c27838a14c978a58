//! The shared cache protocol: stored answers sealed under the fleet secret, the lease that
//! makes one instance the leader for a key, and the waiters its message answers.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use redis::Value;

use super::budget::{BRAKE_KEY, BUDGET_KEY, Budget, BudgetValues, budget_reply};
use super::sealed::{Names, Stored, holder, tag_of_holder, tag_text, tags_match};
use super::{Scaleout, link, scripts};
use crate::answer::CallResult;
use crate::cache::{Fetched, Origin};
use crate::cache_policy::Policy;
use crate::error::GatewayError;
use crate::keys::CacheKey;
use crate::limit::{Share, Standing};

/// How much earlier than a waiter's lookup a leader's message may have been sealed (the
/// leader seals, then its write-back runs; instances' estimates of Redis's clock differ
/// by a round trip): an older message is a replay and is ignored.
const MESSAGE_SKEW: u64 = 1_000;
/// Pause between two lookups of a sharing request while Redis does not answer.
const SHARING_RETRY: Duration = Duration::from_millis(20);
/// How many values past their sealed expiry one request drops before it counts the next
/// as unreadable.
const MAX_DROPS: u32 = 3;
/// After a given-up claim's release first reached Redis, how long until it is tried once
/// more: the lost lookup may have waited on a connection since replaced.
const ABANDON_AGAIN: Duration = Duration::from_millis(250);

/// Redis's clock as a script read it, and when the reply arrived here.
#[derive(Debug, Clone, Copy)]
struct RedisClock {
    ms: u64,
    at: Instant,
}

impl RedisClock {
    fn read(value: Option<&Value>) -> Self {
        let ms = match value {
            Some(Value::Int(ms)) => u64::try_from(*ms).unwrap_or(0),
            _ => 0,
        };
        Self {
            ms,
            at: Instant::now(),
        }
    }

    /// Redis's clock now, estimated from the reading and the local clock since.
    fn now_ms(&self) -> u64 {
        let since = u64::try_from(self.at.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.ms.saturating_add(since)
    }
}

/// What a shared lookup found.
enum Found {
    /// A stored value (still sealed), its TTL and Redis's clock.
    Hit(Vec<u8>, Duration, RedisClock),
    /// Another instance leads; its lease holder text, remaining life, and Redis's clock.
    Held(Vec<u8>, Duration, RedisClock),
    /// This instance leads after `wait` (budget reserved).
    Lead(Duration, RedisClock),
    /// The budget or Diia's brake refused.
    Refused(GatewayError),
}

impl Scaleout {
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

    /// One lookup round trip for `key` (stored answer, lease, budget), as a leader would
    /// make it; `true` when it found a stored answer. For `benches/scaleout.rs`, which
    /// reports each Redis operation's latency on its own.
    pub async fn lookup_once(&self, key: CacheKey, budget: BudgetValues) -> bool {
        let names = Names::of(key);
        let found = self
            .lookup(&names, &holder(None), self.lease, budget, true, false)
            .await;
        matches!(found, Some(Found::Hit(..)))
    }

    /// One write-back round trip (store, release, publish), as a leader makes it after
    /// its call; for `benches/scaleout.rs`.
    pub async fn write_back_once(&self, key: CacheKey, result: CallResult, ttl: Duration) {
        let clock = RedisClock {
            ms: self.redis_now_ms(),
            at: Instant::now(),
        };
        let write = WriteBack {
            holder: holder(None),
            ttl: Some(ttl),
            tag: None,
            clock,
            patience: Duration::ZERO,
        };
        self.finish(Names::of(key), result, write).await;
    }

    /// One lookup round trip (stored value, lease, budget); `None` when Redis did not
    /// answer. `anyway`: try even while Redis counts as down.
    async fn lookup(
        &self,
        names: &Names,
        holder: &str,
        lease: Duration,
        budget: BudgetValues,
        reserve: bool,
        anyway: bool,
    ) -> Option<Found> {
        let args = budget.args(u32::from(reserve));
        let lease_ms = u64::try_from(lease.as_millis()).unwrap_or(u64::MAX).max(1);
        let call = |mut c: redis::aio::ConnectionManager| async move {
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
        };
        let mut reply: Vec<Value> = if anyway {
            self.link.run_anyway("lookup", call).await?
        } else {
            self.link.run("lookup", call).await?
        };
        let int = |v: Option<&Value>| match v {
            Some(Value::Int(n)) => *n,
            _ => -1,
        };
        let millis = |v: Option<&Value>| Duration::from_millis(u64::try_from(int(v)).unwrap_or(0));
        let code = int(reply.first());
        let (left, clock) = (millis(reply.get(2)), RedisClock::read(reply.get(3)));
        // The value or holder moves out of the reply (no copy of a stored answer).
        match (code, reply.get_mut(1)) {
            (1, Some(Value::BulkString(value))) => {
                Some(Found::Hit(std::mem::take(value), left, clock))
            }
            (3, Some(Value::BulkString(holder))) => {
                Some(Found::Held(std::mem::take(holder), left, clock))
            }
            (code, _) => match budget_reply(code, int(reply.get(1)))? {
                Budget::Go(wait) => Some(Found::Lead(wait, RedisClock::read(reply.get(2)))),
                Budget::Refused(refusal) => Some(Found::Refused(refusal)),
            },
        }
    }

    /// A sharing request's lookup: Redis not answering is waited out for up to
    /// `scaleout.sharing_wait` (a stall, a fork pause), retrying even while Redis counts as
    /// down; `None` only when it never answered.
    async fn lookup_patiently(
        &self,
        names: &Names,
        holder: &str,
        lease: Duration,
        budget: BudgetValues,
        reserve: bool,
    ) -> Option<Found> {
        let until = Instant::now() + self.sharing_wait;
        loop {
            let found = self
                .lookup(names, holder, lease, budget, reserve, true)
                .await;
            if found.is_some() {
                return found;
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            tokio::time::sleep(SHARING_RETRY.min(left)).await;
        }
    }

    /// The leader's write-back, after its client has its answer: store (when kept), free
    /// the lease, tell the waiters. Tried even while Redis counts as down (the lease is
    /// ours to free), within the write's patience.
    async fn finish(&self, names: Names, result: CallResult, write: WriteBack) {
        let stamp = write.clock.now_ms();
        let Some(stored) = self.stored(&names, &result, stamp, write.ttl, write.tag) else {
            return;
        };
        let until = Instant::now() + write.patience;
        loop {
            let done = self
                .write(&scripts::FINISH, names, &write.holder, &stored)
                .await;
            let left = until.saturating_duration_since(Instant::now());
            if done.is_some() || left.is_zero() {
                return;
            }
            tokio::time::sleep(SHARING_RETRY.min(left)).await;
        }
    }

    /// One cacheable request's call, fleet-wide: a stored answer in Redis, or the answer
    /// of the instance that leads the key, or this instance leads and `call` goes to Diia
    /// (given the wait the shared budget reserved). Degrades to `call(None)` (local
    /// budget) whenever Redis is down, except for a sharing request, which is refused
    /// rather than sent on fleet state nobody could read.
    ///
    /// Rounds of lookup → lead | hit | wait, each step a method below, until one answers;
    /// then, if Redis could not help, the degraded call.
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
        let mut state = Claims::new(key, tag, &shape, self.lease);
        loop {
            let Some(waiting) = self.link.waiters.register(state.names.channel.0) else {
                break;
            };
            let claim = holder(tag);
            let (reserve, budget) = shape.reservation();
            let found = self
                .look_up(&mut state, &shape, &claim, budget, reserve)
                .await;
            let next = match found {
                None if shape.sharing => Next::Done(self.refuse_unknown(&state, claim)),
                None => Next::Degrade,
                Some(Found::Hit(value, ttl, clock)) => {
                    self.hit(&mut state, &shape, value, ttl, clock).await
                }
                Some(Found::Refused(refusal)) => {
                    self.metrics.shared_lookup("leader");
                    Next::Done(Fetched::diia(Err(refusal)))
                }
                Some(Found::Lead(wait, clock)) => {
                    drop(waiting);
                    let prepaid = reserve.then_some(wait);
                    return self.lead(&state, shape, claim, prepaid, clock, call).await;
                }
                Some(Found::Held(holder_text, left, clock)) => {
                    let held = (holder_text.as_slice(), left, clock);
                    self.follow(&mut state, &shape, waiting, held).await
                }
            };
            match next {
                Next::Done(fetched) => return fetched,
                Next::Again => {}
                Next::Degrade => break,
            }
        }
        self.degrade(state, &shape, call).await
    }

    /// The lookup step: one round trip, or (sharing) as many as `scaleout.sharing_wait`
    /// allows. A lookup sent but never answered leaves its claim in `state.lost`.
    async fn look_up(
        &self,
        state: &mut Claims,
        shape: &Shape,
        claim: &str,
        budget: BudgetValues,
        reserve: bool,
    ) -> Option<Found> {
        if shape.sharing {
            return self
                .lookup_patiently(&state.names, claim, state.lease, budget, reserve)
                .await;
        }
        // While Redis counts as down the lookup is not even sent.
        let sent = self.link.is_up();
        let found = self
            .lookup(&state.names, claim, state.lease, budget, reserve, false)
            .await;
        if found.is_none() && sent {
            state.lost = Some(claim.to_owned());
        }
        found
    }

    /// A sharing request whose lookup Redis never answered: refused, never sent.
    fn refuse_unknown(self: &Arc<Self>, state: &Claims, claim: String) -> Fetched {
        // Never a second push: unknown fleet state is not "nothing sent".
        self.metrics.shared_lookup("unavailable");
        let refusal = Err(GatewayError::SharingUnavailable {
            retry_after: self.probe_interval,
        });
        // A lost lookup may take the lease when Redis resumes: free it, or every retry of
        // this requestId would wait on a leader that never calls.
        self.abandon(state.names, claim, &refusal, None, state.tag, state.lease);
        Fetched::diia(refusal)
    }

    /// The hit step: a stored value, served only if it opens and its sealed expiry is
    /// ahead.
    async fn hit(
        &self,
        state: &mut Claims,
        shape: &Shape,
        value: Vec<u8>,
        ttl: Duration,
        clock: RedisClock,
    ) -> Next {
        let now = clock.ms;
        match self.unseal(&state.names, &value) {
            // Opened, and past the expiry sealed with it (replayed with a new TTL, or at
            // the end of its life): absent. Dropped if still there, then looked up again.
            Some(sealed) if sealed.expires_ms <= now && state.dropped < MAX_DROPS => {
                state.dropped += 1;
                self.drop_expired(&state.names, value).await;
                Next::Again
            }
            // Its sealed expiry, not the TTL Redis reports, bounds its life.
            Some(sealed) if sealed.expires_ms > now => {
                self.metrics.shared_lookup("remote_hit");
                if !tags_match(&sealed.tag, &state.ours) {
                    return Next::Done(Fetched::diia(Err(GatewayError::SharingAlreadyRequested)));
                }
                let left = Duration::from_millis(sealed.expires_ms - now);
                Next::Done(Fetched {
                    result: sealed.result,
                    origin: Origin::RemoteHit {
                        fresh_for: left.min(ttl),
                    },
                })
            }
            // Does not open (or expired again and again): held, never absent.
            Some(_) | None => {
                self.metrics.shared_lookup("unreadable");
                match unreadable(shape, ttl) {
                    Some(refusal) => Next::Done(Fetched::diia(Err(refusal))),
                    None => Next::Degrade,
                }
            }
        }
    }

    /// The lead step: this instance holds the lease, calls Diia, answers its client, then
    /// writes the result back in the background.
    async fn lead<F, Fut>(
        self: Arc<Self>,
        state: &Claims,
        shape: Shape,
        claim: String,
        prepaid: Option<Duration>,
        clock: RedisClock,
        call: F,
    ) -> Fetched
    where
        F: FnOnce(Option<Duration>) -> Fut,
        Fut: Future<Output = CallResult>,
    {
        self.metrics.shared_lookup("leader");
        let result = shape.policy.settle(call(prepaid).await);
        let write = WriteBack {
            holder: claim,
            ttl: shape.policy.ttl(&result),
            tag: state.tag,
            clock,
            patience: if shape.sharing {
                self.sharing_wait
            } else {
                Duration::ZERO
            },
        };
        let names = state.names;
        let kept = result.clone();
        tokio::spawn(async move {
            // The clients first: their answers leave before the write-back takes the
            // worker.
            tokio::task::yield_now().await;
            self.finish(names, kept, write).await;
        });
        Fetched::diia(result)
    }

    /// The wait step: another instance leads; wait for its message (the lease is the
    /// fallback when a message is lost, and Redis going down ends the wait at once).
    async fn follow(
        &self,
        state: &mut Claims,
        shape: &Shape,
        waiting: link::Waiting,
        (holder_text, left, clock): (&[u8], Duration, RedisClock),
    ) -> Next {
        // Only a request with a tag (sharing) compares it: any other waits for the
        // leader, whatever a Redis writer put in the holder text.
        if state.tag.is_some() && tag_of_holder(holder_text) != state.ours.as_slice() {
            return Next::Done(Fetched::diia(Err(GatewayError::SharingAlreadyRequested)));
        }
        self.metrics.shared_lookup("remote_wait");
        let cap = if shape.sharing {
            shape.longest_call.saturating_sub(state.waited)
        } else {
            // Never a hot loop on a lease at its last millisecond.
            left.max(SHARING_RETRY) + Duration::from_millis(5)
        };
        let started = tokio::time::Instant::now();
        match self.wait(waiting, cap).await {
            Waited::Message(value) => {
                // Only a message sealed after this lookup (less the skew) is the leader's
                // answer; an older one is a replay and is ignored.
                let floor = clock.ms.saturating_sub(MESSAGE_SKEW);
                if let Some(sealed) = self.unseal(&state.names, &value)
                    && sealed.stamp_ms >= floor
                {
                    if !tags_match(&sealed.tag, &state.ours) {
                        return Next::Done(Fetched::diia(Err(
                            GatewayError::SharingAlreadyRequested,
                        )));
                    }
                    let fresh_for = (sealed.expires_ms > sealed.stamp_ms).then(|| {
                        Duration::from_millis(sealed.expires_ms.saturating_sub(clock.now_ms()))
                    });
                    return Next::Done(Fetched {
                        result: sealed.result,
                        origin: Origin::RemoteWait { fresh_for },
                    });
                }
            }
            Waited::Down if shape.sharing => {
                return Next::Done(Fetched::diia(Err(GatewayError::SharingOutcomeUnknown)));
            }
            Waited::Down => return Next::Degrade,
            Waited::Expired if shape.sharing => {
                return Next::Done(Fetched::diia(Err(GatewayError::SharingOutcomeUnknown)));
            }
            Waited::Expired => {}
        }
        state.waited += started.elapsed();
        if state.waited >= shape.longest_call {
            return Next::Done(Fetched::diia(Err(GatewayError::UpstreamTimeout)));
        }
        Next::Again
    }

    /// Redis could not help: a sharing request is refused; any other calls Diia on the
    /// local budget, and a claim whose lookup was lost hands that answer on.
    async fn degrade<F, Fut>(self: &Arc<Self>, state: Claims, shape: &Shape, call: F) -> Fetched
    where
        F: FnOnce(Option<Duration>) -> Fut,
        Fut: Future<Output = CallResult>,
    {
        if shape.sharing {
            self.metrics.shared_lookup("unavailable");
            return Fetched::diia(Err(GatewayError::SharingUnavailable {
                retry_after: self.probe_interval,
            }));
        }
        self.metrics.shared_lookup("degraded");
        let result = call(None).await;
        if let Some(claim) = state.lost {
            // The lost lookup may have made this claim the leader when Redis resumed: hand
            // its waiters this answer (and store it), as a leader would.
            let ttl = shape.policy.ttl(&result);
            self.abandon(state.names, claim, &result, ttl, state.tag, state.lease);
        }
        Fetched::diia(result)
    }

    /// Drops a value that opened past its sealed expiry, if it is still the stored one.
    async fn drop_expired(&self, names: &Names, value: Vec<u8>) {
        let _ = self
            .link
            .run("lookup", |mut c| async move {
                scripts::DROP
                    .key(names.result.as_bytes())
                    .arg(value)
                    .invoke_async::<i64>(&mut c)
                    .await
            })
            .await;
    }

    /// A claim given up without leading, whose lookup was sent but never answered: when
    /// Redis resumes it may still run and give the claim the lease, which nobody would then
    /// free (every later request for the key would wait on a leader that never calls).
    /// In the background, while the lease is still this claim's: store `result` (when
    /// `ttl`), free the lease, publish `result` to the waiters. Tried until Redis answers
    /// (a lookup queued before it on the same connection has then run) and once more
    /// shortly after (it may have been queued on a connection since replaced), for at most
    /// the lease's life. A claim that led is never passed here.
    fn abandon(
        self: &Arc<Self>,
        names: Names,
        claim: String,
        result: &CallResult,
        ttl: Option<Duration>,
        tag: Option<CacheKey>,
        life: Duration,
    ) {
        let Some(stored) = self.stored(&names, result, self.redis_now_ms(), ttl, tag) else {
            return;
        };
        let me = Arc::clone(self);
        tokio::spawn(async move {
            let until = Instant::now() + life;
            let mut pause = SHARING_RETRY;
            let mut answered = false;
            loop {
                let done = me.write(&scripts::ABANDON, names, &claim, &stored).await;
                match done {
                    Some(1) => return,
                    Some(_) if answered => return,
                    Some(_) => {
                        answered = true;
                        tokio::time::sleep(ABANDON_AGAIN).await;
                    }
                    None if Instant::now() >= until => return,
                    None => {
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(me.probe_interval);
                    }
                }
            }
        });
    }

    /// One try of a write-back script ([`scripts::FINISH`] or [`scripts::ABANDON`]: the
    /// same keys and arguments) for `holder`, even while Redis counts as down.
    async fn write(
        &self,
        script: &redis::Script,
        names: Names,
        holder: &str,
        stored: &Stored,
    ) -> Option<i64> {
        self.link
            .run_anyway("finish", |mut c| async move {
                script
                    .key(names.result.as_bytes())
                    .key(names.lease.as_bytes())
                    .arg(holder)
                    .arg(&stored.value)
                    .arg(stored.ttl_ms)
                    .arg(stored.positive)
                    .arg(names.channel.as_bytes())
                    .arg(&stored.message)
                    .invoke_async::<i64>(&mut c)
                    .await
            })
            .await
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

/// What a leader's write-back needs besides the result.
struct WriteBack {
    /// The lease holder text this leader claimed.
    holder: String,
    /// How long the result is stored (`None`: only published).
    ttl: Option<Duration>,
    tag: Option<CacheKey>,
    /// Redis's clock at the leader's lookup: the stamp and expiry are sealed on it.
    clock: RedisClock,
    /// How long to keep trying while Redis does not answer.
    patience: Duration,
}

/// What a request gets for a stored value that does not open: it counts as held, never as
/// absent. A sharing request or an identification (a single-use barcode) is refused, not
/// sent again; a login (`None`) may be repeated, so it runs degraded.
fn unreadable(shape: &Shape, ttl: Duration) -> Option<GatewayError> {
    let retry_after = ttl.clamp(Duration::from_secs(1), crate::diia::BARCODE_LIFETIME);
    if shape.sharing {
        return Some(GatewayError::SharingUnavailable { retry_after });
    }
    match shape.policy {
        Policy::Sharing { .. } => Some(GatewayError::SharingUnavailable { retry_after }),
        Policy::Verification { .. } => Some(GatewayError::FleetAnswerUnreadable { retry_after }),
        Policy::SessionToken { .. } => None,
    }
}

/// One fetch's state across its rounds.
struct Claims {
    names: Names,
    tag: Option<CacheKey>,
    /// The tag as stored and compared (hex, or `-`).
    ours: Vec<u8>,
    /// How long a claim holds the key.
    lease: Duration,
    /// Time spent waiting on leaders so far.
    waited: Duration,
    /// The claim of a lookup that was sent but whose reply never came: Redis may still run
    /// it when it resumes and give that claim the lease.
    lost: Option<String>,
    /// Values past their sealed expiry dropped so far (a writer restoring them again and
    /// again gets no loop: past a few, they count as unreadable).
    dropped: u32,
}

impl Claims {
    fn new(key: CacheKey, tag: Option<CacheKey>, shape: &Shape, lease: Duration) -> Self {
        Self {
            names: Names::of(key),
            tag,
            ours: tag_text(tag),
            lease: if shape.sharing {
                shape.policy_ttl_ceiling()
            } else {
                lease
            },
            waited: Duration::ZERO,
            lost: None,
            dropped: 0,
        }
    }
}

/// Where one step of a fetch leaves it.
enum Next {
    /// Answered (or refused): the fetch ends with this.
    Done(Fetched),
    /// Look up again (an expired value dropped, a wait that ended without an answer).
    Again,
    /// Redis cannot help: the degraded call.
    Degrade,
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
    /// Whether a lookup reserves the fleet's budget, and the budget it reserves from.
    /// A client past its share of the Diia budget takes the lease without reserving the
    /// fleet's budget: it waits for its share first (see `Upstream::admit`), so a flood
    /// cannot spend the budget a quiet branch needs.
    fn reservation(&self) -> (bool, BudgetValues) {
        let standing = self
            .share
            .as_ref()
            .map_or(Standing::Within, |share| share.standing());
        let reserve = standing != Standing::Over && !self.unverified;
        let budget = match standing {
            Standing::Alone => self.budget.half_deep(),
            Standing::Within | Standing::Over => self.budget,
        };
        (reserve, budget)
    }

    fn policy_ttl_ceiling(&self) -> Duration {
        match self.policy {
            Policy::Sharing { ttl } => ttl.max(crate::diia::BARCODE_LIFETIME),
            Policy::Verification { ttl, .. } => ttl,
            Policy::SessionToken { .. } => self.longest_call,
        }
    }
}
