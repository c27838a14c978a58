//! Short-lived answers and in-flight calls, one moka cache per kind: identical requests
//! coalesce into one Diia call, and a cached answer is only ever found by its own acquirer.
//!
//! Each entry is a [`Slot`]: either a pending call (a shared future over a spawned task)
//! or a finished answer. The task is spawned, not driven by the first client, so a
//! leader whose client hangs up still finishes the call and fills the cache: a
//! single-use barcode must never be sent to Diia twice. Waiters are woken by the shared
//! future (no polling) and bounded by their own request deadline. A pending entry
//! expires after `max_pending` (the longest an upstream call can take), the "lock age"
//! that stops a lost task from blocking a key forever.
//!
//! Keys are keyed digests that include the bearer session token (see [`crate::keys`]);
//! a key can therefore never match a request of another acquirer.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};
use moka::Expiry;
use moka::ops::compute::{CompResult, Op};
use serde::Deserialize;

use crate::config::SESSION_TOKEN_LIFETIME;
use crate::error::GatewayError;
use crate::keys::CacheKey;
use crate::token::{TokenLife, token_life};
use crate::upstream::{Answer, Outcome};

/// How long answers of one cache live, by what they say.
#[derive(Debug, Clone, Copy)]
pub enum Policy {
    /// Identification results: positive answers for `ttl`, definitive negatives shorter.
    Verification {
        /// Life of a 2xx answer.
        ttl: Duration,
        /// Life of a 400/404/410/422 answer (used, expired, not found, invalid).
        negative_ttl: Duration,
    },
    /// Session tokens: until `margin` before the token's own expiry.
    SessionToken {
        /// Drop the token this long before Diia would.
        margin: Duration,
    },
    /// Sharing requests: every definitive answer is replayed for `ttl`.
    Sharing {
        /// The barcode's remaining life at most.
        ttl: Duration,
    },
}

impl Policy {
    /// How long an outcome may be kept; `None` means never (5xx, 429, 401, timeouts).
    #[must_use]
    pub fn ttl(&self, outcome: &Outcome) -> Option<Duration> {
        let answer = outcome.as_ref().ok()?;
        let status = answer.status.as_u16();
        let definitive_negative = matches!(status, 400 | 404 | 409 | 410 | 422);
        let ttl = match *self {
            Self::Verification { ttl, negative_ttl } => match status {
                200..=299 => ttl,
                _ if definitive_negative => negative_ttl,
                _ => return None,
            },
            Self::SessionToken { margin } if status == 200 => session_token_ttl(answer, margin)?,
            Self::SessionToken { .. } => return None,
            Self::Sharing { ttl } if (200..=299).contains(&status) || definitive_negative => ttl,
            Self::Sharing { .. } => return None,
        };
        (!ttl.is_zero()).then_some(ttl)
    }
}

/// The time a session token may be served from cache: its JWT `exp` (read, not trusted
/// for anything else) minus `margin`, never beyond Diia's 2-hour life minus `margin`.
fn session_token_ttl(answer: &Answer, margin: Duration) -> Option<Duration> {
    #[derive(Deserialize)]
    struct TokenBody<'a> {
        #[serde(borrow)]
        token: &'a str,
    }
    let ceiling = SESSION_TOKEN_LIFETIME.checked_sub(margin)?;
    let body: TokenBody<'_> = serde_json::from_slice(&answer.body).ok()?;
    match token_life(body.token) {
        TokenLife::Unknown => Some(ceiling),
        TokenLife::Left(left) => Some(left.checked_sub(margin)?.min(ceiling)),
        TokenLife::Expired => None,
    }
}

type SharedOutcome = Shared<BoxFuture<'static, Arc<Outcome>>>;

/// A cached answer past its freshness, kept for stale-if-error until `until`.
#[derive(Clone)]
struct Stale {
    outcome: Arc<Outcome>,
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
    },
    Ready {
        tag: Option<CacheKey>,
        outcome: Arc<Outcome>,
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

struct SlotExpiry {
    max_pending: Duration,
}

impl SlotExpiry {
    fn life(&self, slot: &Slot) -> Option<Duration> {
        Some(match slot {
            Slot::Pending { .. } => self.max_pending,
            Slot::Ready { expires_at, .. } => expires_at.saturating_duration_since(Instant::now()),
        })
    }
}

impl Expiry<CacheKey, Slot> for SlotExpiry {
    fn expire_after_create(
        &self,
        _key: &CacheKey,
        slot: &Slot,
        _created_at: Instant,
    ) -> Option<Duration> {
        self.life(slot)
    }

    fn expire_after_update(
        &self,
        _key: &CacheKey,
        slot: &Slot,
        _updated_at: Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        self.life(slot)
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
}

/// A coalescing, TTL-bounded answer cache.
#[derive(Clone)]
pub struct AnswerCache {
    inner: moka::future::Cache<CacheKey, Slot>,
    /// TTL policy and stale-if-error window; swapped whole on a config reload.
    settings: Arc<ArcSwap<CacheSettings>>,
    next_id: Arc<AtomicU64>,
}

/// What decides how long answers live.
#[derive(Debug, Clone, Copy)]
struct CacheSettings {
    policy: Policy,
    stale_if_error: Duration,
}

/// Whether an outcome means Diia failed (what stale-if-error covers).
fn is_failure(outcome: &Outcome) -> bool {
    match outcome {
        Ok(answer) => answer.status.is_server_error() || answer.status.as_u16() == 429,
        Err(_) => true,
    }
}

/// Weight of an entry beyond its body: key, slot and bookkeeping.
const ENTRY_OVERHEAD: usize = 256;

impl AnswerCache {
    /// A cache bounded to about `max_bytes` of answers; pending calls expire after
    /// `max_pending`; answers are kept `stale_if_error` past their TTL (zero: off) to be
    /// served when Diia fails.
    #[must_use]
    pub fn new(
        policy: Policy,
        max_bytes: u64,
        max_pending: Duration,
        stale_if_error: Duration,
    ) -> Self {
        let inner = moka::future::Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|_key: &CacheKey, slot: &Slot| -> u32 {
                let body = match slot {
                    Slot::Ready { outcome, .. } => {
                        outcome.as_ref().as_ref().map_or(0, |a| a.body.len())
                    }
                    Slot::Pending { .. } => 0,
                };
                u32::try_from(body + ENTRY_OVERHEAD).unwrap_or(u32::MAX)
            })
            .expire_after(SlotExpiry { max_pending })
            .build();
        Self {
            inner,
            settings: Arc::new(ArcSwap::from_pointee(CacheSettings {
                policy,
                stale_if_error,
            })),
            next_id: Arc::new(AtomicU64::new(1)),
        }
    }

    /// New TTLs for answers stored from now on (a config reload); stored ones keep theirs.
    pub fn set_policy(&self, policy: Policy, stale_if_error: Duration) {
        self.settings.store(Arc::new(CacheSettings {
            policy,
            stale_if_error,
        }));
    }

    /// Entries (answers and pending calls) currently held; approximate, for metrics.
    #[must_use]
    pub fn entry_count(&self) -> u64 {
        self.inner.entry_count()
    }

    /// Runs moka's deferred maintenance now; tests use it for exact counts.
    pub async fn sync(&self) {
        self.inner.run_pending_tasks().await;
    }

    /// A stored answer for `key`, or joins the call under way, or starts `fetch` as the
    /// one call for everyone. `tag` must match the tag of whoever created the entry.
    /// Waiting ends at `deadline` with [`GatewayError::UpstreamTimeout`].
    pub async fn get_or_fetch<F, Fut>(
        &self,
        key: CacheKey,
        tag: Option<CacheKey>,
        deadline: tokio::time::Instant,
        fetch: F,
    ) -> Result<(Arc<Outcome>, Lookup), GatewayError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Outcome> + Send + 'static,
    {
        // Fast path: a fresh answer or a call under way, without the key lock.
        if let Some(slot) = self.inner.get(&key).await
            && !is_stale(&slot)
        {
            return join(slot, tag, deadline).await;
        }
        // Become the leader (no entry, or only a stale one), or find who already is.
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let result = self
            .inner
            .entry(key)
            .and_compute_with(|current| {
                let op = match current.map(moka::Entry::into_value) {
                    None => Op::Put(self.spawn_call(key, id, tag, None, fetch())),
                    Some(Slot::Ready {
                        outcome,
                        fresh_until,
                        expires_at,
                        ..
                    }) if fresh_until <= Instant::now() => {
                        let stale = (expires_at > Instant::now()).then_some(Stale {
                            outcome,
                            until: expires_at,
                        });
                        Op::Put(self.spawn_call(key, id, tag, stale, fetch()))
                    }
                    Some(_) => Op::Nop,
                };
                std::future::ready(op)
            })
            .await;
        let slot = match result {
            CompResult::Inserted(entry) | CompResult::ReplacedWith(entry) => entry.into_value(),
            CompResult::Unchanged(entry) => return join(entry.into_value(), tag, deadline).await,
            CompResult::StillNone(_) | CompResult::Removed(_) => {
                return Err(GatewayError::Internal);
            }
        };
        let Slot::Pending { outcome, stale, .. } = slot else {
            return Err(GatewayError::Internal);
        };
        let outcome = tokio::time::timeout_at(deadline, outcome)
            .await
            .map_err(|_| GatewayError::UpstreamTimeout)?;
        if is_failure(&outcome)
            && let Some(stale) = stale
        {
            return Ok((stale.outcome, Lookup::Stale));
        }
        let stored = self.settings.load().policy.ttl(&outcome).is_some();
        Ok((outcome, Lookup::Miss { stored }))
    }

    fn spawn_call<Fut>(
        &self,
        key: CacheKey,
        id: u64,
        tag: Option<CacheKey>,
        stale: Option<Stale>,
        call: Fut,
    ) -> Slot
    where
        Fut: Future<Output = Outcome> + Send + 'static,
    {
        let cache = self.inner.clone();
        let settings = Arc::clone(&self.settings);
        let kept = stale.clone();
        let task = tokio::spawn(async move {
            let outcome = Arc::new(call.await);
            let CacheSettings {
                policy,
                stale_if_error,
            } = **settings.load();
            let ttl = policy.ttl(&outcome);
            let settled = Arc::clone(&outcome);
            let failed = is_failure(&outcome);
            cache
                .entry(key)
                .and_compute_with(|current| {
                    let ours = matches!(
                        current.as_ref().map(moka::Entry::value),
                        Some(Slot::Pending { id: current_id, .. }) if *current_id == id
                    );
                    let now = Instant::now();
                    let op = match (ours, ttl, kept) {
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
                    };
                    std::future::ready(op)
                })
                .await;
            outcome
        });
        let outcome = task
            .map(|joined| joined.unwrap_or_else(|_| Arc::new(Err(GatewayError::Internal))))
            .boxed()
            .shared();
        Slot::Pending {
            id,
            tag,
            outcome,
            stale,
        }
    }
}

/// A stored answer past its freshness (kept only for stale-if-error).
fn is_stale(slot: &Slot) -> bool {
    matches!(slot, Slot::Ready { fresh_until, .. } if *fresh_until <= Instant::now())
}

async fn join(
    slot: Slot,
    tag: Option<CacheKey>,
    deadline: tokio::time::Instant,
) -> Result<(Arc<Outcome>, Lookup), GatewayError> {
    if slot.tag() != tag {
        return Ok((
            Arc::new(Err(GatewayError::SharingAlreadyRequested)),
            Lookup::TagMismatch,
        ));
    }
    match slot {
        Slot::Ready { outcome, .. } => Ok((outcome, Lookup::Hit)),
        Slot::Pending { outcome, stale, .. } => {
            let outcome = tokio::time::timeout_at(deadline, outcome)
                .await
                .map_err(|_| GatewayError::UpstreamTimeout)?;
            match stale {
                Some(stale) if is_failure(&outcome) => Ok((stale.outcome, Lookup::Stale)),
                _ => Ok((outcome, Lookup::Coalesced)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use bytes::Bytes;
    use http::StatusCode;
    use std::time::{SystemTime, UNIX_EPOCH};

    fn answer(status: u16, body: &str) -> Outcome {
        Ok(Answer {
            status: StatusCode::from_u16(status).expect("status"),
            body: Bytes::copy_from_slice(body.as_bytes()),
            content_type: None,
            trace_id: None,
            retry_after: None,
        })
    }

    #[test]
    fn verification_policy_keeps_only_definitive_answers() {
        let policy = Policy::Verification {
            ttl: Duration::from_secs(60),
            negative_ttl: Duration::from_secs(10),
        };
        assert_eq!(
            policy.ttl(&answer(200, "{}")),
            Some(Duration::from_secs(60))
        );
        assert_eq!(
            policy.ttl(&answer(400, "{}")),
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            policy.ttl(&answer(404, "{}")),
            Some(Duration::from_secs(10))
        );
        for status in [401, 403, 429, 500, 502, 503, 504] {
            assert_eq!(policy.ttl(&answer(status, "{}")), None, "{status}");
        }
        assert_eq!(policy.ttl(&Err(GatewayError::UpstreamTimeout)), None);
    }

    #[test]
    fn session_token_ttl_follows_the_jwt_exp() {
        let margin = Duration::from_secs(300);
        let policy = Policy::SessionToken { margin };
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .as_secs();
        let payload = URL_SAFE_NO_PAD.encode(format!(r#"{{"exp":{}}}"#, now + 1000));
        let body = format!(r#"{{"token":"h.{payload}.s"}}"#);
        let ttl = policy.ttl(&answer(200, &body)).expect("cacheable");
        assert!(
            ttl <= Duration::from_secs(700) && ttl >= Duration::from_secs(690),
            "{ttl:?}"
        );
        let opaque = policy
            .ttl(&answer(200, r#"{"token":"opaque"}"#))
            .expect("cacheable");
        assert_eq!(opaque, SESSION_TOKEN_LIFETIME - margin);
        let expired = URL_SAFE_NO_PAD.encode(format!(r#"{{"exp":{}}}"#, now + 10));
        assert_eq!(
            policy.ttl(&answer(200, &format!(r#"{{"token":"h.{expired}.s"}}"#))),
            None
        );
        assert_eq!(policy.ttl(&answer(401, "{}")), None);
    }
}
