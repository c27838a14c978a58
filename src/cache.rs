//! Short-lived answers and in-flight calls, one cache per kind: identical requests
//! coalesce into one Diia call, and a cached answer is only ever found by its own acquirer.
//!
//! Finished answers live in moka (bounded by bytes, expiring per entry); calls under way
//! live in a small table beside it, one pending call per key, whose shared outcome the
//! waiters join. The first request runs the call in its own task (no hand-off to another
//! task or thread), inside a [`Detachable`]: if that request goes away mid-call (client
//! gone, deadline), the rest of the call is spawned, so the call still finishes and fills
//! the cache: a single-use barcode must never be sent to Diia twice. Waiters are woken
//! through the shared future (no polling) and bounded by their own request deadline. A
//! call's hold on its key ends when it settles, and at the latest after the longest an
//! upstream call can take (the "lock age"), so a lost call never blocks a key forever.
//!
//! Keys are keyed digests that include the bearer session token (see [`crate::keys`]);
//! a key can therefore never match a request of another acquirer.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};
use http::HeaderValue;
use moka::Expiry;

use crate::answer::{Answer, AnswerClass, CallResult};
use crate::cache_policy::Policy;
use crate::detach::Detachable;
use crate::error::GatewayError;
use crate::keys::CacheKey;

/// How the entries of one call live: the answer's TTL policy, the stale-if-error window
/// and the lock age of the pending call, all from the settings the request started with.
#[derive(Debug, Clone, Copy)]
pub struct Lifetimes {
    /// TTLs by answer class.
    pub policy: Policy,
    /// Kept this long past the TTL for stale-if-error (zero: off).
    pub stale_if_error: Duration,
    /// The longest the call can take; a pending entry expires after it.
    pub longest_call: Duration,
}

/// Where a call's result came from (scale-out adds the fleet to Diia).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// This instance called Diia (or refused before calling).
    Diia,
    /// An answer stored in Redis by another instance, fresh for `fresh_for` more.
    RemoteHit {
        /// Its remaining life; the near cache keeps it no longer.
        fresh_for: Duration,
    },
    /// The answer another instance's call produced, published to its waiters.
    RemoteWait {
        /// Its life, when it was stored.
        fresh_for: Option<Duration>,
    },
}

/// A fetch's result and where it came from.
#[derive(Debug)]
pub struct Fetched {
    /// The result.
    pub result: CallResult,
    /// Its origin.
    pub origin: Origin,
}

impl Fetched {
    /// A result of this instance's own call.
    #[must_use]
    pub fn diia(result: CallResult) -> Self {
        Self {
            result,
            origin: Origin::Diia,
        }
    }
}

type SharedOutcome = Shared<BoxFuture<'static, (Arc<CallResult>, Origin)>>;

/// A cached answer past its freshness, kept for stale-if-error until `until`.
#[derive(Clone)]
struct Stale {
    outcome: Arc<CallResult>,
    until: Instant,
}

/// A finished answer, as the answer cache holds it.
#[derive(Clone)]
struct Ready {
    tag: Option<CacheKey>,
    outcome: Arc<CallResult>,
    /// Served as a hit until then.
    fresh_until: Instant,
    /// Kept (for stale-if-error) until then.
    expires_at: Instant,
}

impl Ready {
    fn is_fresh(&self, now: Instant) -> bool {
        self.fresh_until > now
    }
}

/// A call under way: its waiters join `outcome`.
#[derive(Clone)]
struct Pending {
    id: u64,
    tag: Option<CacheKey>,
    outcome: SharedOutcome,
    /// The answer this call refreshes, served if the call fails.
    stale: Option<Stale>,
    /// The lock age: a lost call stops blocking its key then.
    expires_at: Instant,
}

struct ReadyExpiry;

impl Expiry<CacheKey, Ready> for ReadyExpiry {
    fn expire_after_create(
        &self,
        _key: &CacheKey,
        ready: &Ready,
        _created_at: Instant,
    ) -> Option<Duration> {
        Some(ready.expires_at.saturating_duration_since(Instant::now()))
    }

    fn expire_after_update(
        &self,
        _key: &CacheKey,
        ready: &Ready,
        _updated_at: Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        Some(ready.expires_at.saturating_duration_since(Instant::now()))
    }
}

/// How a request was answered by the cache layer; drives `Cache-Status` and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// A stored answer.
    Hit,
    /// This request made the upstream call; `stored` when its answer was kept.
    Miss {
        /// Whether the answer was stored.
        stored: bool,
    },
    /// Joined another request's call under way.
    Coalesced,
    /// Diia failed; a stored answer past its TTL was served (stale-if-error).
    Stale,
    /// The key is taken by a request with another tag (another sharing `requestId`).
    TagMismatch,
    /// Scale-out: an answer another instance stored in Redis.
    RemoteHit,
    /// Scale-out: joined another instance's call under way.
    RemoteCoalesced,
}

// The `Cache-Status` values (RFC 9211), one per way a request is answered.
static HIT: HeaderValue = HeaderValue::from_static("diia-gateway; hit");
static REPLAY: HeaderValue = HeaderValue::from_static("diia-gateway; hit; detail=replay");
static MISS_STORED: HeaderValue = HeaderValue::from_static("diia-gateway; fwd=miss; stored");
static MISS: HeaderValue = HeaderValue::from_static("diia-gateway; fwd=miss");
static COLLAPSED: HeaderValue = HeaderValue::from_static("diia-gateway; fwd=miss; collapsed");
static REMOTE_HIT: HeaderValue = HeaderValue::from_static("diia-gateway; hit; detail=remote");
static REMOTE_REPLAY: HeaderValue =
    HeaderValue::from_static("diia-gateway; hit; detail=\"replay remote\"");
static REMOTE_COLLAPSED: HeaderValue =
    HeaderValue::from_static("diia-gateway; fwd=miss; collapsed; detail=remote");
static STALE: HeaderValue =
    HeaderValue::from_static("diia-gateway; fwd=stale; detail=stale-if-error");

impl Lookup {
    /// The `Cache-Status` a request answered this way is served with; `sharing`: the
    /// answer is a sharing request's, served again (a replay). `None` for
    /// [`Lookup::TagMismatch`], which is refused instead.
    #[must_use]
    pub fn cache_status(self, sharing: bool) -> Option<&'static HeaderValue> {
        Some(match self {
            Self::Hit if sharing => &REPLAY,
            Self::Hit => &HIT,
            Self::Miss { stored: true } => &MISS_STORED,
            Self::Miss { stored: false } => &MISS,
            Self::Coalesced => &COLLAPSED,
            Self::Stale => &STALE,
            Self::RemoteHit if sharing => &REMOTE_REPLAY,
            Self::RemoteHit => &REMOTE_HIT,
            Self::RemoteCoalesced => &REMOTE_COLLAPSED,
            Self::TagMismatch => return None,
        })
    }
}

/// A coalescing, TTL-bounded answer cache.
#[derive(Clone)]
pub struct AnswerCache {
    /// Finished answers. moka's synchronous cache: its `get` is a plain call where the
    /// async one is an 800-byte future inside every request's state.
    answers: moka::sync::Cache<CacheKey, Ready>,
    /// Calls under way, one per key. Apart from the answers: a call is taken and settled
    /// with one short lock each here, where moka's per-key compute costs several
    /// concurrent-map operations and allocations (most of a miss's CPU on the cache side).
    /// At most one entry per request in flight, so it needs no bound of its own.
    calls: Arc<Mutex<HashMap<CacheKey, Pending>>>,
    next_id: Arc<AtomicU64>,
}

/// Whether a result means Diia could not serve (what stale-if-error covers).
fn is_failure(result: &CallResult) -> bool {
    AnswerClass::of(result).diia_could_not_serve()
}

/// Resident bytes of an entry beyond its answer's buffer: the key, the slot, the shared
/// answer and moka's bookkeeping (access and write order nodes, timer node, hash-map
/// bucket), as measured by `loadtest memory` with the binary's allocator (mimalloc):
/// ~650 bytes per answer in all, so `cache.max_bytes` bounds real memory.
const ENTRY_OVERHEAD: usize = 600;

/// What the answers hold for a key.
enum Held {
    /// A fresh answer (or the refusal of a mismatched tag): served at once.
    Fresh((Arc<CallResult>, Lookup)),
    /// Only an answer past its freshness, kept for stale-if-error.
    Stale(Stale),
    /// Nothing.
    Nothing,
}

/// What a request does about a key with no fresh answer.
enum Turn {
    /// Joins the call under way.
    Join(Pending),
    /// Leads: makes the one call, and settles it through `settled`.
    Lead {
        id: u64,
        stale: Option<Stale>,
        settled: tokio::sync::oneshot::Sender<(Arc<CallResult>, Origin)>,
    },
}

impl AnswerCache {
    /// A cache bounded to about `max_bytes` of answers.
    #[must_use]
    pub fn new(max_bytes: u64) -> Self {
        let answers = moka::sync::Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|_key: &CacheKey, ready: &Ready| -> u32 {
                let body = ready
                    .outcome
                    .as_ref()
                    .as_ref()
                    .map_or(0, Answer::heap_bytes);
                u32::try_from(body + ENTRY_OVERHEAD).unwrap_or(u32::MAX)
            })
            .expire_after(ReadyExpiry)
            .build();
        Self {
            answers,
            calls: Arc::default(),
            next_id: Arc::new(AtomicU64::new(1)),
        }
    }

    /// Entries (answers and calls under way) currently held; approximate, for metrics.
    #[must_use]
    pub fn entry_count(&self) -> u64 {
        let calls = self.calls().len();
        self.answers.entry_count() + calls as u64
    }

    /// Whether the key holds an answer or a call under way (a request for it will not
    /// need a Diia call of its own).
    #[must_use]
    pub fn holds(&self, key: CacheKey) -> bool {
        self.answers.contains_key(&key) || self.calls().contains_key(&key)
    }

    /// Whether the key holds a stored answer (a call under way does not count: it may be
    /// one made with a token Diia has not judged yet).
    #[must_use]
    pub fn stores(&self, key: CacheKey) -> bool {
        self.answers.contains_key(&key)
    }

    /// Drops a stored answer (a session token Diia has since refused); a call under way
    /// for the key is left alone.
    pub fn forget_answer(&self, key: CacheKey) {
        self.answers.invalidate(&key);
    }

    /// Bytes the weigher counts over all entries.
    #[must_use]
    pub fn weighted_bytes(&self) -> u64 {
        self.answers.weighted_size()
    }

    /// Runs moka's deferred maintenance now; tests use it for exact counts.
    pub fn sync(&self) {
        self.answers.run_pending_tasks();
    }

    /// A stored answer for `key`, or joins the call under way, or starts `fetch` as the
    /// one call for everyone. `tag` must match the tag of whoever created the entry.
    /// Waiting ends at `deadline` with [`GatewayError::UpstreamTimeout`].
    pub async fn get_or_fetch<F, Fut>(
        &self,
        key: CacheKey,
        tag: Option<CacheKey>,
        lifetimes: Lifetimes,
        deadline: tokio::time::Instant,
        fetch: F,
    ) -> Result<(Arc<CallResult>, Lookup), GatewayError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Fetched> + Send + 'static,
    {
        let stale = match self.held(key, tag) {
            Held::Fresh(found) => return Ok(found),
            Held::Stale(stale) => Some(stale),
            Held::Nothing => None,
        };
        // Boxed: waiting (for the leader, or as the leader) takes futures that would
        // otherwise make every request's state, hits included, kilobytes larger, and that
        // state is copied whole as each request's futures are built.
        Box::pin(async move {
            let (id, stale, settled) = match self.take_turn(key, tag, lifetimes, stale) {
                Turn::Join(pending) => return join(pending, tag, deadline).await,
                Turn::Lead { id, stale, settled } => (id, stale, settled),
            };
            // An earlier leader may have stored its answer and left between our look at
            // the answers and taking the key: then that answer is ours too.
            if let Held::Fresh((outcome, lookup)) = self.held(key, tag) {
                let _ = settled.send((Arc::clone(&outcome), Origin::Diia));
                self.release(key, id);
                return Ok((outcome, lookup));
            }
            let work = self.settle_call(key, id, tag, lifetimes, stale.clone(), settled, fetch());
            // The call runs here, in this request's task; past the deadline (or if this
            // request is dropped) it goes on detached and still fills the cache.
            let (outcome, origin) = tokio::time::timeout_at(deadline, work)
                .await
                .map_err(|_| GatewayError::UpstreamTimeout)?;
            if is_failure(&outcome)
                && let Some(stale) = stale
            {
                return Ok((stale.outcome, Lookup::Stale));
            }
            let lookup = match origin {
                Origin::Diia => Lookup::Miss {
                    stored: lifetimes.policy.ttl(&outcome).is_some(),
                },
                Origin::RemoteHit { .. } => Lookup::RemoteHit,
                Origin::RemoteWait { .. } => Lookup::RemoteCoalesced,
            };
            Ok((outcome, lookup))
        })
        .await
    }

    /// The table of calls under way. Nothing panics while holding it, so a poisoned lock
    /// (impossible today) would still hold a consistent table: keep serving.
    fn calls(&self) -> std::sync::MutexGuard<'_, HashMap<CacheKey, Pending>> {
        self.calls
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// What the answers hold for `key`, without waiting and without a future.
    fn held(&self, key: CacheKey, tag: Option<CacheKey>) -> Held {
        let Some(ready) = self.answers.get(&key) else {
            return Held::Nothing;
        };
        let now = Instant::now();
        if !ready.is_fresh(now) {
            if ready.expires_at <= now {
                return Held::Nothing;
            }
            return Held::Stale(Stale {
                outcome: ready.outcome,
                until: ready.expires_at,
            });
        }
        if ready.tag != tag {
            return Held::Fresh(tag_mismatch());
        }
        Held::Fresh((ready.outcome, Lookup::Hit))
    }

    /// Joins the key's call under way, or takes the key for a new call (none under way,
    /// or one past its lock age).
    fn take_turn(
        &self,
        key: CacheKey,
        tag: Option<CacheKey>,
        lifetimes: Lifetimes,
        stale: Option<Stale>,
    ) -> Turn {
        let now = Instant::now();
        let mut calls = self.calls();
        if let Some(pending) = calls.get(&key)
            && pending.expires_at > now
        {
            return Turn::Join(pending.clone());
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (settled, settled_rx) = tokio::sync::oneshot::channel();
        let outcome = settled_rx
            .map(|sent| {
                sent.unwrap_or_else(|_| (Arc::new(Err(GatewayError::Internal)), Origin::Diia))
            })
            .boxed()
            .shared();
        calls.insert(
            key,
            Pending {
                id,
                tag,
                outcome,
                stale: stale.clone(),
                expires_at: now + lifetimes.longest_call,
            },
        );
        Turn::Lead { id, stale, settled }
    }

    /// Frees the key for the next call, if it is still ours (not taken over past its lock
    /// age).
    fn release(&self, key: CacheKey, id: u64) {
        let mut calls = self.calls();
        if calls.get(&key).is_some_and(|pending| pending.id == id) {
            calls.remove(&key);
        }
    }

    /// The leader's call, settled: its answer stored (or, when Diia failed, the stale one
    /// left in place), the key freed, the waiters told. If it is dropped unfinished (the runtime is going away),
    /// the key is freed all the same.
    #[expect(
        clippy::too_many_arguments,
        reason = "one call's whole context, used once"
    )]
    fn settle_call<Fut>(
        &self,
        key: CacheKey,
        id: u64,
        tag: Option<CacheKey>,
        lifetimes: Lifetimes,
        stale: Option<Stale>,
        settled: tokio::sync::oneshot::Sender<(Arc<CallResult>, Origin)>,
        call: Fut,
    ) -> Detachable<(Arc<CallResult>, Origin)>
    where
        Fut: Future<Output = Fetched> + Send + 'static,
    {
        let claim = Claim {
            cache: self.clone(),
            key,
            id,
        };
        let Lifetimes {
            policy,
            stale_if_error,
            ..
        } = lifetimes;
        Detachable::new(async move {
            let Fetched { result, origin } = call.await;
            let outcome = Arc::new(policy.settle(result));
            // A fleet answer lives no longer here than it does in Redis.
            let ttl = match origin {
                Origin::Diia | Origin::RemoteWait { fresh_for: None } => policy.ttl(&outcome),
                Origin::RemoteHit { fresh_for }
                | Origin::RemoteWait {
                    fresh_for: Some(fresh_for),
                } => policy
                    .ttl(&outcome)
                    .map(|ttl| ttl.min(fresh_for))
                    .filter(|ttl| !ttl.is_zero()),
            };
            if claim.is_ours() {
                let now = Instant::now();
                match (ttl, stale) {
                    (Some(ttl), _) => claim.cache.answers.insert(
                        key,
                        Ready {
                            tag,
                            outcome: Arc::clone(&outcome),
                            fresh_until: now + ttl,
                            expires_at: now + ttl + stale_if_error,
                        },
                    ),
                    // Diia failed: the stale answer stays for the next requests.
                    (None, Some(stale)) if is_failure(&outcome) && stale.until > now => {}
                    (None, _) => claim.cache.answers.invalidate(&key),
                }
            }
            // The key is free before the waiters hear: a request that finds it free finds
            // the answer stored.
            drop(claim);
            // No waiter left is fine: the answer is stored for the next request.
            let _ = settled.send((Arc::clone(&outcome), origin));
            (outcome, origin)
        })
    }
}

/// A leader's hold on its key; dropping it frees the key (if still ours), also when the
/// call is dropped unfinished, so a lost call never blocks its key.
struct Claim {
    cache: AnswerCache,
    key: CacheKey,
    id: u64,
}

impl Claim {
    /// Whether the key is still ours: not taken over past its lock age (only its own
    /// claim ever frees a key, so a free key means a later call took it and settled).
    fn is_ours(&self) -> bool {
        self.cache
            .calls()
            .get(&self.key)
            .is_some_and(|pending| pending.id == self.id)
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.cache.release(self.key, self.id);
    }
}

/// What a request gets for a key taken by another tag (another sharing `requestId`).
fn tag_mismatch() -> (Arc<CallResult>, Lookup) {
    (
        Arc::new(Err(GatewayError::SharingAlreadyRequested)),
        Lookup::TagMismatch,
    )
}

async fn join(
    pending: Pending,
    tag: Option<CacheKey>,
    deadline: tokio::time::Instant,
) -> Result<(Arc<CallResult>, Lookup), GatewayError> {
    if pending.tag != tag {
        return Ok(tag_mismatch());
    }
    let (outcome, _) = tokio::time::timeout_at(deadline, pending.outcome)
        .await
        .map_err(|_| GatewayError::UpstreamTimeout)?;
    match pending.stale {
        Some(stale) if is_failure(&outcome) => Ok((stale.outcome, Lookup::Stale)),
        _ => Ok((outcome, Lookup::Coalesced)),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU32;

    use super::*;
    use crate::answer::AnswerParts;

    fn lifetimes(ttl: Duration) -> Lifetimes {
        Lifetimes {
            policy: Policy::Verification {
                ttl,
                negative_ttl: ttl,
            },
            stale_if_error: Duration::ZERO,
            longest_call: Duration::from_secs(10),
        }
    }

    fn ok() -> CallResult {
        Ok(Answer::new(
            http::StatusCode::OK,
            AnswerParts {
                body: br#"{"success":true}"#,
                ..AnswerParts::default()
            },
        ))
    }

    fn key(n: u64) -> CacheKey {
        crate::keys::HashKey::fixed([5; 16])
            .key("test")
            .part(&n.to_le_bytes())
            .finish()
    }

    /// Many requests for one key on two threads, with a call that settles at once (the
    /// widest window for a request to look at the answers just before a leader stores its
    /// answer and frees the key): one call per key, never two.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_key_freed_between_look_and_take_is_answered_not_called_again() {
        let cache = AnswerCache::new(64 << 20);
        let calls = Arc::new(AtomicU32::new(0));
        let keys = 20_000u64;
        let mut requests = tokio::task::JoinSet::new();
        for n in 0..keys {
            for _ in 0..6 {
                let (cache, calls) = (cache.clone(), Arc::clone(&calls));
                requests.spawn(async move {
                    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
                    cache
                        .get_or_fetch(
                            key(n),
                            None,
                            lifetimes(Duration::from_secs(60)),
                            deadline,
                            || {
                                calls.fetch_add(1, Ordering::SeqCst);
                                async { Fetched::diia(ok()) }
                            },
                        )
                        .await
                        .map(|(outcome, _)| outcome.is_ok())
                });
            }
        }
        while let Some(answered) = requests.join_next().await {
            assert_eq!(answered.unwrap(), Ok(true));
        }
        assert_eq!(u64::from(calls.load(Ordering::SeqCst)), keys);
        assert!(cache.calls.lock().unwrap().is_empty(), "every key freed");
    }

    /// A result that is not kept frees the key: the next request calls again.
    #[tokio::test]
    async fn an_unkept_result_frees_the_key_for_the_next_call() {
        let cache = AnswerCache::new(1 << 20);
        let calls = AtomicU32::new(0);
        for _ in 0..2 {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
            let (outcome, lookup) = cache
                .get_or_fetch(key(1), None, lifetimes(Duration::ZERO), deadline, || {
                    calls.fetch_add(1, Ordering::SeqCst);
                    async { Fetched::diia(Err(GatewayError::UpstreamTimeout)) }
                })
                .await
                .unwrap();
            assert!(outcome.is_err());
            assert_eq!(lookup, Lookup::Miss { stored: false });
        }
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert!(!cache.holds(key(1)));
    }

    /// A call past its lock age no longer blocks its key, and its late answer does not
    /// replace the answer of the call that took over.
    #[tokio::test]
    async fn a_call_past_its_lock_age_is_taken_over() {
        let cache = AnswerCache::new(1 << 20);
        let short = Lifetimes {
            longest_call: Duration::from_millis(100),
            ..lifetimes(Duration::from_secs(60))
        };
        let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
        let first = {
            let cache = cache.clone();
            tokio::spawn(async move {
                let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
                cache
                    .get_or_fetch(key(2), None, short, deadline, || async move {
                        let _ = release_rx.await;
                        Fetched::diia(Err(GatewayError::UpstreamTimeout))
                    })
                    .await
            })
        };
        tokio::task::yield_now().await;
        assert!(cache.holds(key(2)));
        std::thread::sleep(Duration::from_millis(120));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
        let (second, lookup) = cache
            .get_or_fetch(key(2), None, short, deadline, || async {
                Fetched::diia(ok())
            })
            .await
            .unwrap();
        assert!(second.is_ok());
        assert_eq!(lookup, Lookup::Miss { stored: true });
        release_tx.send(()).unwrap();
        assert!(first.await.unwrap().unwrap().0.is_err());
        let (kept, lookup) = cache
            .get_or_fetch(key(2), None, short, deadline, || async {
                Fetched::diia(ok())
            })
            .await
            .unwrap();
        assert_eq!(lookup, Lookup::Hit);
        assert!(kept.is_ok(), "the late failure did not replace the answer");
    }
}
