//! The callback relay's routes in Redis: `(acquirer, requestId) → route`, so the instance a
//! callback reaches finds a route another instance recorded. The fleet side only moves
//! bytes; `crate::relay::fleet` decides what they mean.
//!
//! Nothing in clear: the key is `{dg}:relay-route:` and an HMAC-SHA256 (truncated to 16
//! bytes) of the acquirer and the requestId under a subkey of the fleet secret; the value
//! is sealed under the fleet secret with the key's name as associated data, holding its
//! absolute expiry on Redis's clock (as this instance estimates it) ahead of the route,
//! so a value moved to another key or replayed after its life does not open.

use std::time::Duration;

use redis::Value;
use ring::hmac;

use super::{Scaleout, scripts};

/// Every route key starts so (the `{dg}` hash tag and the ACL's `~{dg}:*` cover it).
pub const ROUTE_PREFIX: &str = "{dg}:relay-route:";
/// Bytes of the MAC that names a route.
const ROUTE_MAC_LEN: usize = 16;
/// Most keys one lookup asks for (the orphan sweep's batch).
pub const MAX_ROUTE_BATCH: usize = 512;

/// A route's Redis key: [`ROUTE_PREFIX`] and the MAC in hex. Shows only its first digits.
#[derive(Clone, PartialEq, Eq)]
pub struct RouteKey(String);

impl std::fmt::Debug for RouteKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let digits = self.0.get(ROUTE_PREFIX.len()..ROUTE_PREFIX.len() + 8);
        write!(f, "RouteKey({}…)", digits.unwrap_or_default())
    }
}

impl RouteKey {
    /// The key's name as Redis sees it.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name, owned.
    #[must_use]
    pub fn into_string(self) -> String {
        self.0
    }
}

/// What a claim found in Redis.
#[derive(Debug)]
pub enum RouteClaim {
    /// None was stored: this value is the fleet's now (kept, sealed, to give it back or
    /// refresh it with).
    Claimed(Vec<u8>),
    /// A route was stored already: its plain bytes, and the sealed value as stored.
    Held {
        /// The route's bytes.
        plain: Vec<u8>,
        /// The value as Redis holds it.
        sealed: Vec<u8>,
    },
    /// A value that does not open (another writer, or past its sealed expiry): neither
    /// this instance's nor usable.
    Unreadable,
}

/// A route found by [`Scaleout::find_routes`]: its bytes and the life left on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundRoute {
    /// The route's bytes.
    pub plain: Vec<u8>,
    /// Until its sealed expiry, on Redis's clock.
    pub left: Duration,
}

/// The HMAC key that names routes (a subkey of the fleet secret of its own).
pub(super) fn route_mac_key(secret: &super::FleetSecret) -> hmac::Key {
    let key: [u8; 32] = secret.subkey("relay-routes");
    hmac::Key::new(hmac::HMAC_SHA256, &key)
}

impl Scaleout {
    /// The Redis key of `(acquirer, request_id)`'s route: the same on every instance with
    /// this fleet secret, and neither part recoverable from it.
    #[must_use]
    pub fn route_key(&self, acquirer: &str, request_id: &str) -> RouteKey {
        let mut context = hmac::Context::with_key(&self.route_mac);
        // Length-prefixed, so ("ab", "c") and ("a", "bc") differ.
        for part in [acquirer.as_bytes(), request_id.as_bytes()] {
            context.update(&(part.len() as u64).to_be_bytes());
            context.update(part);
        }
        let tag = context.sign();
        let mac = tag.as_ref().get(..ROUTE_MAC_LEN).unwrap_or_default();
        let mut name = String::with_capacity(ROUTE_PREFIX.len() + 2 * ROUTE_MAC_LEN);
        name.push_str(ROUTE_PREFIX);
        name.push_str(&hex::encode(mac));
        RouteKey(name)
    }

    /// `plain` sealed for `key`, expiring `ttl` from now on Redis's clock.
    fn seal_route(&self, key: &str, plain: &[u8], ttl: Duration) -> Option<Vec<u8>> {
        let life = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        let expires_ms = self.redis_now_ms().saturating_add(life);
        let mut framed = Vec::with_capacity(8 + plain.len());
        framed.extend_from_slice(&expires_ms.to_be_bytes());
        framed.extend_from_slice(plain);
        self.sealer.seal(key.as_bytes(), &framed)
    }

    /// Opens a value stored under `key`: the route's bytes and the life left on it; `None`
    /// when it does not open or its sealed expiry has passed.
    fn open_route(&self, key: &str, sealed: &[u8]) -> Option<FoundRoute> {
        let framed = self.sealer.open(key.as_bytes(), sealed)?;
        let (expires, plain) = framed.split_first_chunk::<8>()?;
        let left = u64::from_be_bytes(*expires).checked_sub(self.redis_now_ms())?;
        (left > 0).then(|| FoundRoute {
            plain: plain.to_vec(),
            left: Duration::from_millis(left),
        })
    }

    /// Stores `plain` under the key named `key` for `ttl` unless a route is stored there already (one
    /// round trip, under `scaleout.command_timeout`); `None` when Redis is down, did not
    /// answer in time, or the value could not be sealed.
    pub async fn claim_route(&self, key: &str, plain: &[u8], ttl: Duration) -> Option<RouteClaim> {
        let sealed = self.seal_route(key, plain, ttl)?;
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let reply: Value = self
            .link
            .run("relay_route", |mut c| {
                let (name, value) = (key, &sealed);
                async move {
                    scripts::ROUTE_CLAIM
                        .key(name)
                        .arg(value.as_slice())
                        .arg(ttl_ms)
                        .invoke_async(&mut c)
                        .await
                }
            })
            .await?;
        Some(match reply {
            Value::BulkString(held) => match self.open_route(key, &held) {
                Some(found) => RouteClaim::Held {
                    plain: found.plain,
                    sealed: held,
                },
                None => RouteClaim::Unreadable,
            },
            _ => RouteClaim::Claimed(sealed),
        })
    }

    /// A retried push's refresh: `plain` for `ttl` from now replaces the stored value while
    /// it is still `held`; the sealed value stored now (to give back with
    /// [`Scaleout::release_route`]), `None` when it was not replaced (or Redis did not
    /// answer).
    pub async fn refresh_route(
        &self,
        key: &str,
        held: &[u8],
        plain: &[u8],
        ttl: Duration,
    ) -> Option<Vec<u8>> {
        let sealed = self.seal_route(key, plain, ttl)?;
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let swapped: Option<i64> = self
            .link
            .run("relay_route", |mut c| {
                let (name, sealed) = (key, &sealed);
                async move {
                    scripts::ROUTE_SWAP
                        .key(name)
                        .arg(held)
                        .arg(sealed.as_slice())
                        .arg(ttl_ms)
                        .invoke_async(&mut c)
                        .await
                }
            })
            .await;
        (swapped == Some(1)).then_some(sealed)
    }

    /// Gives back a claim (the value [`RouteClaim::Claimed`] carried): deleted only while
    /// Redis still holds exactly it. Best effort: a claim not given back expires.
    pub async fn release_route(&self, key: &str, sealed: &[u8]) {
        let _: Option<i64> = self
            .link
            .run("relay_route", |mut c| {
                let name = key;
                async move {
                    scripts::ROUTE_RELEASE
                        .key(name)
                        .arg(sealed)
                        .invoke_async(&mut c)
                        .await
                }
            })
            .await;
    }

    /// The routes stored under the key names `keys` (at most [`MAX_ROUTE_BATCH`], one script), in
    /// order: `None` for a key with no route or a value that does not open. `None` when
    /// Redis is down or did not answer in time.
    pub async fn find_routes(&self, keys: &[String]) -> Option<Vec<Option<FoundRoute>>> {
        let keys = keys.get(..keys.len().min(MAX_ROUTE_BATCH))?;
        if keys.is_empty() {
            return Some(Vec::new());
        }
        let values: Vec<Option<Vec<u8>>> = self
            .link
            .run("relay_route", |mut c| async move {
                let mut find = scripts::ROUTE_FIND.prepare_invoke();
                for key in keys {
                    find.key(key.as_str());
                }
                find.invoke_async(&mut c).await
            })
            .await?;
        Some(
            keys.iter()
                .zip(values)
                .map(|(key, value)| self.open_route(key, &value?))
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::scaleout::test_fleet::{ONE, TWO, instance};

    #[tokio::test]
    async fn route_keys_follow_the_secret_and_name_nothing_in_clear() {
        let (one, again, two) = (instance(ONE), instance(ONE), instance(TWO));
        let key = one.route_key("acquirer-1", "req-42");
        assert_eq!(key, again.route_key("acquirer-1", "req-42"));
        assert_ne!(key, two.route_key("acquirer-1", "req-42"));
        assert_ne!(key, one.route_key("acquirer-1r", "eq-42"));
        assert_ne!(key, one.route_key("acquirer-2", "req-42"));
        let name = key.as_str();
        assert!(name.starts_with(ROUTE_PREFIX));
        assert_eq!(name.len(), ROUTE_PREFIX.len() + 32);
        assert!(!name.contains("req-42") && !name.contains("acquirer"));
        assert!(!format!("{key:?}").contains(&name[ROUTE_PREFIX.len() + 8..]));
    }

    #[tokio::test]
    async fn a_sealed_route_opens_only_under_its_key_secret_and_life() {
        let (one, two) = (instance(ONE), instance(TWO));
        let key = one.route_key("a", "r").into_string();
        let key = key.as_str();
        let sealed = one
            .seal_route(key, b"route-bytes", Duration::from_secs(60))
            .unwrap();
        let found = one.open_route(key, &sealed).unwrap();
        assert_eq!(found.plain, b"route-bytes");
        assert!(found.left > Duration::from_secs(59));
        assert!(!String::from_utf8_lossy(&sealed).contains("route-bytes"));
        // Moved to another key, opened with another secret, or altered: no.
        assert!(
            one.open_route(one.route_key("a", "s").as_str(), &sealed)
                .is_none()
        );
        assert!(two.open_route(key, &sealed).is_none());
        let mut flipped = sealed;
        *flipped.last_mut().unwrap() ^= 1;
        assert!(one.open_route(key, &flipped).is_none());
        // Past its sealed life: no.
        let done = one.seal_route(key, b"x", Duration::ZERO).unwrap();
        assert!(one.open_route(key, &done).is_none());
    }
}
