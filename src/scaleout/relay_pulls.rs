//! The callback relay's pull-side copies in Redis: the packages held for pull-only branches,
//! so a branch's pull answered by any instance finds a package another instance received,
//! and the acknowledgement markers that tell the holding instance its package was taken.
//! The fleet side only names, seals and moves bytes; `crate::relay::fleet_pulls` decides
//! what they mean.
//!
//! Nothing in clear: a request's copies are one hash, `{dg}:relay-pull:` and an
//! HMAC-SHA256 (truncated to 16 bytes) of the acquirer and the requestId under a subkey of
//! the fleet secret of its own (so pull keys cannot be linked to route keys); each record
//! is a field named by a MAC of its record id under the same subkey, its value sealed under
//! the fleet secret with the key's and the field's names as associated data and its
//! absolute expiry (Redis's clock, as this instance estimates it) inside. An
//! acknowledgement is `{dg}:relay-pull-ack:` and the record's field name, its value sealed
//! to that name, so a Redis writer can neither forge a package nor an acknowledgement.

use std::time::Duration;

use redis::Value;
use ring::hmac;

use super::{Scaleout, scripts};

/// Every pull-copy key starts so (the `{dg}` hash tag and the ACL's `~{dg}:*` cover it).
pub const PULL_PREFIX: &str = "{dg}:relay-pull:";
/// Every acknowledgement marker starts so.
pub const PULL_ACK_PREFIX: &str = "{dg}:relay-pull-ack:";
/// Bytes of the MACs that name copies and records.
const PULL_MAC_LEN: usize = 16;
/// Most records one request's copies hand back (a requestId gets a few callbacks; more is
/// a Redis writer's, and is cut).
pub const MAX_PULL_RECORDS: usize = 64;
/// Most markers one look-up asks for.
pub const MAX_MARK_BATCH: usize = 512;
/// What an acknowledgement marker seals (with its expiry ahead of it).
const ACK_MARK: &[u8] = b"acked";
/// Every erase marker starts so (then the hex of its request's copies' name).
pub const PULL_ERASED_PREFIX: &str = "{dg}:relay-pull-erased:";
/// What an erase marker seals (then the erase's time, ms on Redis's clock).
const ERASED_MARK: &[u8] = b"erased";

/// What [`Scaleout::put_pull`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PullPut {
    /// Stored.
    Stored,
    /// Not stored: Redis down, too slow, or the value could not be sealed.
    Failed,
    /// Not stored: the request was erased after the record arrived.
    Erased,
}

/// The HMAC key that names pull copies and their records.
pub(super) fn pull_mac_key(secret: &super::FleetSecret) -> hmac::Key {
    let key: [u8; 32] = secret.subkey("relay-pulls");
    hmac::Key::new(hmac::HMAC_SHA256, &key)
}

/// `prefix` and the hex of the first [`PULL_MAC_LEN`] bytes of the MAC of `parts`
/// (length-prefixed, after a domain `tag`).
fn mac_name(key: &hmac::Key, prefix: &str, tag: u8, parts: &[&[u8]]) -> String {
    let mut context = hmac::Context::with_key(key);
    context.update(&[tag]);
    for part in parts {
        context.update(&(part.len() as u64).to_be_bytes());
        context.update(part);
    }
    let tag = context.sign();
    let mac = tag.as_ref().get(..PULL_MAC_LEN).unwrap_or_default();
    let mut name = String::with_capacity(prefix.len() + 2 * PULL_MAC_LEN);
    name.push_str(prefix);
    name.push_str(&hex::encode(mac));
    name
}

impl Scaleout {
    /// The Redis key of `(acquirer, request_id)`'s pull copies: the same on every instance
    /// with this fleet secret, neither part recoverable from it.
    #[must_use]
    pub fn pull_key(&self, acquirer: &str, request_id: &str) -> String {
        mac_name(
            &self.pull_mac,
            PULL_PREFIX,
            b'q',
            &[acquirer.as_bytes(), request_id.as_bytes()],
        )
    }

    /// The field naming record `id` in its request's copies (and, after
    /// [`PULL_ACK_PREFIX`], its acknowledgement marker).
    #[must_use]
    pub fn pull_field(&self, id: &[u8; 16]) -> String {
        mac_name(&self.pull_mac, "", b'r', &[id])
    }

    fn ack_key(field: &str) -> String {
        let mut name = String::with_capacity(PULL_ACK_PREFIX.len() + field.len());
        name.push_str(PULL_ACK_PREFIX);
        name.push_str(field);
        name
    }

    /// The erase marker of the copies under `key`.
    fn erased_key(key: &str) -> String {
        let suffix = key.strip_prefix(PULL_PREFIX).unwrap_or(key);
        let mut name = String::with_capacity(PULL_ERASED_PREFIX.len() + suffix.len());
        name.push_str(PULL_ERASED_PREFIX);
        name.push_str(suffix);
        name
    }

    /// When the request of `key` was erased, as its sealed erase marker `sealed` says;
    /// `None` when it does not open (a Redis writer's) or has expired.
    fn erased_at(&self, marker: &str, sealed: &[u8]) -> Option<u64> {
        let plain = self.open_expiring(marker.as_bytes(), sealed)?;
        let at = plain.strip_prefix(ERASED_MARK)?;
        Some(u64::from_be_bytes(at.try_into().ok()?))
    }

    fn pull_context(key: &str, field: &str) -> Vec<u8> {
        let mut context = Vec::with_capacity(key.len() + 1 + field.len());
        context.extend_from_slice(key.as_bytes());
        context.push(b'/');
        context.extend_from_slice(field.as_bytes());
        context
    }

    /// `plain` sealed for `context`, expiring `ttl` from now on Redis's clock.
    fn seal_expiring(&self, context: &[u8], plain: &[u8], ttl: Duration) -> Option<Vec<u8>> {
        let life = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        let expires_ms = self.redis_now_ms().saturating_add(life);
        let mut framed = Vec::with_capacity(8 + plain.len());
        framed.extend_from_slice(&expires_ms.to_be_bytes());
        framed.extend_from_slice(plain);
        self.sealer.seal(context, &framed)
    }

    /// What [`Scaleout::seal_expiring`] sealed for `context`; `None` when it does not open
    /// or its sealed expiry has passed.
    fn open_expiring(&self, context: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
        let framed = self.sealer.open(context, sealed)?;
        let (expires, plain) = framed.split_first_chunk::<8>()?;
        (u64::from_be_bytes(*expires) > self.redis_now_ms()).then(|| plain.to_vec())
    }

    /// Stores `plain` as record `field` of the copies under `key` for `ttl` (the hash lives
    /// as long as its longest-lived record), unless the request was erased (a valid erase
    /// marker, [`Scaleout::erase_pulls`]) at or after `received_ms`: then
    /// [`PullPut::Erased`]. An erase marker that does not open is ignored. One round trip
    /// (two after an erase) under `scaleout.command_timeout`.
    pub async fn put_pull(
        &self,
        key: &str,
        field: &str,
        plain: &[u8],
        ttl: Duration,
        received_ms: u64,
    ) -> PullPut {
        let Some(sealed) = self.seal_expiring(&Self::pull_context(key, field), plain, ttl) else {
            return PullPut::Failed;
        };
        let marker = Self::erased_key(key);
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        for force in [false, true] {
            let reply: Option<Value> = self
                .link
                .run("relay_pull", |mut c| {
                    let (sealed, marker) = (&sealed, &marker);
                    async move {
                        scripts::PULL_PUT
                            .key(key)
                            .key(marker.as_str())
                            .arg(field)
                            .arg(sealed.as_slice())
                            .arg(ttl_ms)
                            .arg(if force { "1" } else { "0" })
                            .invoke_async(&mut c)
                            .await
                    }
                })
                .await;
            match reply {
                Some(Value::Int(1)) => return PullPut::Stored,
                Some(Value::BulkString(mark)) if !force => {
                    if self
                        .erased_at(&marker, &mark)
                        .is_some_and(|at| at >= received_ms)
                    {
                        return PullPut::Erased;
                    }
                    // Erased before this record arrived, or not an erase: stored anyway.
                }
                _ => return PullPut::Failed,
            }
        }
        PullPut::Failed
    }

    /// Marks the request of `key` erased now for `ttl` (sealed to its name), so a copy an
    /// instance makes later of a record that arrived before is refused
    /// ([`Scaleout::put_pull`]). `false` when Redis did not answer.
    pub async fn erase_pulls(&self, key: &str, ttl: Duration) -> bool {
        let marker = Self::erased_key(key);
        let mut plain = ERASED_MARK.to_vec();
        plain.extend_from_slice(&self.redis_now_ms().to_be_bytes());
        let Some(sealed) = self.seal_expiring(marker.as_bytes(), &plain, ttl) else {
            return false;
        };
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let done: Option<()> = self
            .link
            .run("relay_pull", |mut c| {
                let (marker, sealed) = (&marker, &sealed);
                async move {
                    redis::cmd("SET")
                        .arg(marker.as_str())
                        .arg(sealed.as_slice())
                        .arg("PX")
                        .arg(ttl_ms)
                        .query_async(&mut c)
                        .await
                }
            })
            .await;
        done.is_some()
    }

    /// The records stored under `key` that open (at most [`MAX_PULL_RECORDS`]), as
    /// `(field, plain)`; a value that does not open or is past its sealed expiry is left
    /// out. `None` when Redis is down or did not answer in time.
    pub async fn list_pulls(&self, key: &str) -> Option<Vec<(String, Vec<u8>)>> {
        let reply: Value = self
            .link
            .run("relay_pull", |mut c| async move {
                scripts::PULL_LIST
                    .key(key)
                    .arg(MAX_PULL_RECORDS)
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        let Value::Array(items) = reply else {
            return Some(Vec::new());
        };
        let mut out = Vec::new();
        for pair in items.chunks_exact(2) {
            let (Value::BulkString(field), Value::BulkString(sealed)) = (&pair[0], &pair[1]) else {
                continue;
            };
            let Ok(field) = String::from_utf8(field.clone()) else {
                continue;
            };
            if let Some(plain) = self.open_expiring(&Self::pull_context(key, &field), sealed) {
                out.push((field, plain));
            }
        }
        Some(out)
    }

    /// Record `field` taken: removed from the copies under `key`, and its acknowledgement
    /// marker set for `ttl` (sealed to its name). One round trip; `false` when Redis did
    /// not answer.
    pub async fn ack_pull(&self, key: &str, field: &str, ttl: Duration) -> bool {
        let marker = Self::ack_key(field);
        let Some(sealed) = self.seal_expiring(marker.as_bytes(), ACK_MARK, ttl) else {
            return false;
        };
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let done: Option<i64> = self
            .link
            .run("relay_pull", |mut c| {
                let (marker, sealed) = (&marker, &sealed);
                async move {
                    scripts::PULL_ACK
                        .key(key)
                        .key(marker.as_str())
                        .arg(field)
                        .arg(sealed.as_slice())
                        .arg(ttl_ms)
                        .invoke_async(&mut c)
                        .await
                }
            })
            .await;
        done == Some(1)
    }

    /// Whether each record field in `fields` (at most [`MAX_MARK_BATCH`]) has a valid
    /// acknowledgement marker, in order (one round trip). A marker that does not open
    /// counts as none. `None` when Redis is down or did not answer in time.
    pub async fn pulls_acked(&self, fields: &[String]) -> Option<Vec<bool>> {
        let fields = fields.get(..fields.len().min(MAX_MARK_BATCH))?;
        if fields.is_empty() {
            return Some(Vec::new());
        }
        let markers: Vec<String> = fields.iter().map(|f| Self::ack_key(f)).collect();
        let values: Vec<Option<Vec<u8>>> = self
            .link
            .run("relay_pull", |mut c| {
                let markers = &markers;
                async move {
                    // The routes' look-up script: one GET per key, nothing else.
                    let mut find = scripts::ROUTE_FIND.prepare_invoke();
                    for marker in markers {
                        find.key(marker.as_str());
                    }
                    find.invoke_async(&mut c).await
                }
            })
            .await?;
        Some(
            markers
                .iter()
                .zip(values)
                .map(|(marker, value)| {
                    value.is_some_and(|sealed| {
                        self.open_expiring(marker.as_bytes(), &sealed)
                            .is_some_and(|plain| plain == ACK_MARK)
                    })
                })
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
    async fn pull_names_follow_the_secret_and_differ_from_route_names() {
        let (one, again, two) = (instance(ONE), instance(ONE), instance(TWO));
        let key = one.pull_key("acquirer-1", "req-42");
        assert_eq!(key, again.pull_key("acquirer-1", "req-42"));
        assert_ne!(key, two.pull_key("acquirer-1", "req-42"));
        assert_ne!(key, one.pull_key("acquirer-1r", "eq-42"));
        assert!(key.starts_with(PULL_PREFIX) && key.len() == PULL_PREFIX.len() + 32);
        assert!(!key.contains("req-42") && !key.contains("acquirer"));
        let route = one.route_key("acquirer-1", "req-42").into_string();
        assert_ne!(&key[PULL_PREFIX.len()..], &route[route.len() - 32..]);
        let field = one.pull_field(&[7; 16]);
        assert_eq!(field, again.pull_field(&[7; 16]));
        assert_ne!(field, one.pull_field(&[8; 16]));
        assert_eq!(field.len(), 32);
    }

    #[tokio::test]
    async fn a_sealed_copy_opens_only_under_its_key_field_secret_and_life() {
        let (one, two) = (instance(ONE), instance(TWO));
        let key = one.pull_key("a", "r");
        let field = one.pull_field(&[1; 16]);
        let context = Scaleout::pull_context(&key, &field);
        let sealed = one
            .seal_expiring(&context, b"package", Duration::from_secs(60))
            .unwrap();
        assert_eq!(one.open_expiring(&context, &sealed).unwrap(), b"package");
        assert!(!String::from_utf8_lossy(&sealed).contains("package"));
        let moved = Scaleout::pull_context(&key, &one.pull_field(&[2; 16]));
        assert!(one.open_expiring(&moved, &sealed).is_none());
        assert!(two.open_expiring(&context, &sealed).is_none());
        let done = one.seal_expiring(&context, b"x", Duration::ZERO).unwrap();
        assert!(one.open_expiring(&context, &done).is_none());
        // A marker sealed for one record does not acknowledge another.
        let marker = Scaleout::ack_key(&field);
        let mark = one
            .seal_expiring(marker.as_bytes(), ACK_MARK, Duration::from_secs(60))
            .unwrap();
        let other = Scaleout::ack_key(&one.pull_field(&[2; 16]));
        assert!(one.open_expiring(other.as_bytes(), &mark).is_none());
    }

    #[tokio::test]
    async fn redis_down_stores_lists_and_acknowledges_nothing_at_once() {
        let one = instance(ONE);
        let started = std::time::Instant::now();
        let key = one.pull_key("a", "r");
        let field = one.pull_field(&[1; 16]);
        assert_eq!(
            one.put_pull(&key, &field, b"p", Duration::from_secs(5), 0)
                .await,
            PullPut::Failed
        );
        assert!(!one.erase_pulls(&key, Duration::from_secs(5)).await);
        assert!(one.list_pulls(&key).await.is_none());
        assert!(!one.ack_pull(&key, &field, Duration::from_secs(5)).await);
        assert!(one.pulls_acked(&[field]).await.is_none());
        assert!(started.elapsed() < Duration::from_secs(1));
    }
}
