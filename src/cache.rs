//! Short-lived answers and in-flight calls, one moka cache per kind: identical requests
//! coalesce into one Diia call, and a cached answer is only ever found by its own acquirer.
//!
//! Each entry is a [`Slot`]: either a pending call (a shared future its waiters join) or
//! a finished answer. The first request runs the call in its own task (no hand-off to
//! another task or thread), inside a [`Detachable`]: if that request goes away mid-call
//! (client gone, deadline), the rest of the call is spawned, so the call still finishes
//! and fills the cache: a single-use barcode must never be sent to Diia twice. Waiters
//! are woken through the shared future (no polling) and bounded by their own request
//! deadline. A pending entry
//! expires after the longest an upstream call can take (the "lock age"), which stops a
//! lost task from blocking a key forever.
//!
//! Keys are keyed digests that include the bearer session token (see [`crate::keys`]);
//! a key can therefore never match a request of another acquirer.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};
use moka::Expiry;
use moka::ops::compute::{CompResult, Op};

use crate::answer::{Answer, AnswerClass, CallResult};
use crate::detach::Detachable;
use crate::error::GatewayError;
use crate::keys::CacheKey;
use crate::policy::Policy;

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

/// A cache entry: a call under way, or its answer.
#[derive(Clone)]
enum Slot {
    Pending {
        id: u64,
        tag: Option<CacheKey>,
        outcome: SharedOutcome,
        /// The answer this call refreshes, served if the call fails.
        stale: Option<Stale>,
        /// The lock age: a lost call stops blocking its key then.
        expires_at: Instant,
    },
    Ready {
        tag: Option<CacheKey>,
        outcome: Arc<CallResult>,
        /// Served as a hit until then.
        fresh_until: Instant,
        /// Kept (for stale-if-error) until then.
        expires_at: Instant,
    },
}

impl Slot {
    fn tag(&self) -> Option<CacheKey> {
        match self {
            Self::Pending { tag, .. } | Self::Ready { tag, .. } => *tag,
        }
    }
}

struct SlotExpiry;

impl SlotExpiry {
    fn life(slot: &Slot) -> Option<Duration> {
        match slot {
            Slot::Pending { expires_at, .. } | Slot::Ready { expires_at, .. } => {
                Some(expires_at.saturating_duration_since(Instant::now()))
            }
        }
    }
}

impl Expiry<CacheKey, Slot> for SlotExpiry {
    fn expire_after_create(
        &self,
        _key: &CacheKey,
        slot: &Slot,
        _created_at: Instant,
    ) -> Option<Duration> {
        Self::life(slot)
    }

    fn expire_after_update(
        &self,
        _key: &CacheKey,
        slot: &Slot,
        _updated_at: Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        Self::life(slot)
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

/// A coalescing, TTL-bounded answer cache.
#[derive(Clone)]
pub struct AnswerCache {
    /// moka's synchronous cache: nothing here needs to wait (the compute closures only
    /// decide and spawn), and its `get` is a plain call where the async one is an
    /// 800-byte future inside every request's state.
    inner: moka::sync::Cache<CacheKey, Slot>,
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

impl AnswerCache {
    /// A cache bounded to about `max_bytes` of answers.
    #[must_use]
    pub fn new(max_bytes: u64) -> Self {
        let inner = moka::sync::Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|_key: &CacheKey, slot: &Slot| -> u32 {
                let body = match slot {
                    Slot::Ready { outcome, .. } => {
                        outcome.as_ref().as_ref().map_or(0, Answer::heap_bytes)
                    }
                    Slot::Pending { .. } => 0,
                };
                u32::try_from(body + ENTRY_OVERHEAD).unwrap_or(u32::MAX)
            })
            .expire_after(SlotExpiry)
            .build();
        Self {
            inner,
            next_id: Arc::new(AtomicU64::new(1)),
        }
    }

    /// Entries (answers and pending calls) currently held; approximate, for metrics.
    #[must_use]
    pub fn entry_count(&self) -> u64 {
        self.inner.entry_count()
    }

    /// Whether the key holds an answer or a call under way (a request for it will not
    /// need a Diia call of its own).
    #[must_use]
    pub fn holds(&self, key: CacheKey) -> bool {
        self.inner.contains_key(&key)
    }

    /// Drops a stored answer (a session token Diia has since refused); a call under way
    /// for the key is left alone.
    pub fn forget_answer(&self, key: CacheKey) {
        self.inner.entry(key).and_compute_with(|current| {
            match current.as_ref().map(moka::Entry::value) {
                Some(Slot::Ready { .. }) => Op::Remove,
                Some(Slot::Pending { .. }) | None => Op::Nop,
            }
        });
    }

    /// Bytes the weigher counts over all entries.
    #[must_use]
    pub fn weighted_bytes(&self) -> u64 {
        self.inner.weighted_size()
    }

    /// Runs moka's deferred maintenance now; tests use it for exact counts.
    pub fn sync(&self) {
        self.inner.run_pending_tasks();
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
        if let Some(found) = self.stored(key, tag) {
            return Ok(found);
        }
        // Boxed: waiting (for the leader, or as the leader) takes futures that would
        // otherwise make every request's state, hits included, kilobytes larger, and that
        // state is copied whole as each request's futures are built.
        Box::pin(async move {
            // Join the call under way, or become the leader (no entry, or a stale one).
            if let Some(slot) = self.inner.get(&key)
                && !is_stale(&slot)
            {
                return join(slot, tag, deadline).await;
            }
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            let mut leading = None;
            let result = self.inner.entry(key).and_compute_with(|current| {
                let stale = match current.map(moka::Entry::into_value) {
                    None => None,
                    Some(Slot::Ready {
                        outcome,
                        fresh_until,
                        expires_at,
                        ..
                    }) if fresh_until <= Instant::now() => {
                        (expires_at > Instant::now()).then_some(Stale {
                            outcome,
                            until: expires_at,
                        })
                    }
                    Some(_) => return Op::Nop,
                };
                let (slot, work) = self.start_call(key, id, tag, lifetimes, stale, fetch());
                leading = Some(work);
                Op::Put(slot)
            });
            let slot = match result {
                CompResult::Inserted(entry) | CompResult::ReplacedWith(entry) => entry.into_value(),
                CompResult::Unchanged(entry) => {
                    return join(entry.into_value(), tag, deadline).await;
                }
                CompResult::StillNone(_) | CompResult::Removed(_) => {
                    return Err(GatewayError::Internal);
                }
            };
            let (Slot::Pending { stale, .. }, Some(work)) = (slot, leading) else {
                return Err(GatewayError::Internal);
            };
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

    /// A fresh stored answer for `key` (or the refusal of a mismatched tag), without
    /// waiting and without a future: `None` when the key holds a call under way, nothing,
    /// or only a stale answer.
    fn stored(&self, key: CacheKey, tag: Option<CacheKey>) -> Option<(Arc<CallResult>, Lookup)> {
        let slot = self.inner.get(&key)?;
        if is_stale(&slot) {
            return None;
        }
        if slot.tag() != tag {
            return Some(tag_mismatch());
        }
        match slot {
            Slot::Ready { outcome, .. } => Some((outcome, Lookup::Hit)),
            Slot::Pending { .. } => None,
        }
    }

    /// The pending slot for a new call, and the call itself: the leader awaits it, its
    /// waiters join the slot's shared outcome, which the call sends when it has settled
    /// and stored its answer.
    fn start_call<Fut>(
        &self,
        key: CacheKey,
        id: u64,
        tag: Option<CacheKey>,
        lifetimes: Lifetimes,
        stale: Option<Stale>,
        call: Fut,
    ) -> (Slot, Detachable<(Arc<CallResult>, Origin)>)
    where
        Fut: Future<Output = Fetched> + Send + 'static,
    {
        let cache = self.inner.clone();
        let kept = stale.clone();
        let Lifetimes {
            policy,
            stale_if_error,
            longest_call,
        } = lifetimes;
        let (settled_tx, settled_rx) = tokio::sync::oneshot::channel();
        let work = Detachable::new(async move {
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
            let settled = Arc::clone(&outcome);
            let failed = is_failure(&outcome);
            cache.entry(key).and_compute_with(|current| {
                // Ours: still our pending call, or nothing (our lock aged out or was
                // evicted; nobody else started a call meanwhile).
                let ours = match current.as_ref().map(moka::Entry::value) {
                    None => true,
                    Some(Slot::Pending { id: current_id, .. }) => *current_id == id,
                    Some(Slot::Ready { .. }) => false,
                };
                let now = Instant::now();
                match (ours, ttl, kept) {
                    (false, _, _) => Op::Nop,
                    (true, Some(ttl), _) => Op::Put(Slot::Ready {
                        tag,
                        outcome: settled,
                        fresh_until: now + ttl,
                        expires_at: now + ttl + stale_if_error,
                    }),
                    // Diia failed: put the stale answer back for the next requests.
                    (true, None, Some(stale)) if failed && stale.until > now => {
                        Op::Put(Slot::Ready {
                            tag,
                            outcome: stale.outcome,
                            fresh_until: now,
                            expires_at: stale.until,
                        })
                    }
                    (true, None, _) => Op::Remove,
                }
            });
            // No waiter left is fine: the answer is stored for the next request.
            let _ = settled_tx.send((Arc::clone(&outcome), origin));
            (outcome, origin)
        });
        let outcome = settled_rx
            .map(|sent| {
                sent.unwrap_or_else(|_| (Arc::new(Err(GatewayError::Internal)), Origin::Diia))
            })
            .boxed()
            .shared();
        let slot = Slot::Pending {
            id,
            tag,
            outcome,
            stale,
            expires_at: Instant::now() + longest_call,
        };
        (slot, work)
    }
}

/// What a request gets for a key taken by another tag (another sharing `requestId`).
fn tag_mismatch() -> (Arc<CallResult>, Lookup) {
    (
        Arc::new(Err(GatewayError::SharingAlreadyRequested)),
        Lookup::TagMismatch,
    )
}

/// A stored answer past its freshness (kept only for stale-if-error).
fn is_stale(slot: &Slot) -> bool {
    matches!(slot, Slot::Ready { fresh_until, .. } if *fresh_until <= Instant::now())
}

async fn join(
    slot: Slot,
    tag: Option<CacheKey>,
    deadline: tokio::time::Instant,
) -> Result<(Arc<CallResult>, Lookup), GatewayError> {
    if slot.tag() != tag {
        return Ok(tag_mismatch());
    }
    match slot {
        Slot::Ready { outcome, .. } => Ok((outcome, Lookup::Hit)),
        Slot::Pending { outcome, stale, .. } => {
            let (outcome, _) = tokio::time::timeout_at(deadline, outcome)
                .await
                .map_err(|_| GatewayError::UpstreamTimeout)?;
            match stale {
                Some(stale) if is_failure(&outcome) => Ok((stale.outcome, Lookup::Stale)),
                _ => Ok((outcome, Lookup::Coalesced)),
            }
        }
    }
}
