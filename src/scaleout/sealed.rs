//! What Redis holds for a key: its names, and values sealed under the fleet secret with
//! their kind, absolute expiry and tag, so that a value opens only where it was written.

use std::time::Duration;

use super::{Scaleout, link};
use crate::answer::{Answer, AnswerClass, CallResult};
use crate::error::GatewayError;
use crate::keys::CacheKey;

/// Stored value and message prefixes: positive answer, other stored answer, failure.
pub(super) const POSITIVE: u8 = b'P';
pub(super) const NEGATIVE: u8 = b'N';
pub(super) const FAILURE: u8 = b'F';
/// A value's clear head: its kind and its absolute expiry (16 digits, ms on Redis's clock),
/// read by the lookup script and bound to the value by the seal.
pub(super) const HEAD: usize = 17;
/// A value or message opened: what it holds, sealed with it.
pub(super) struct Sealed {
    pub(super) result: CallResult,
    /// Absolute expiry on Redis's clock (ms); the stamp itself when it was not stored.
    pub(super) expires_ms: u64,
    /// When it was sealed, on Redis's clock as the sealer estimated it (ms).
    pub(super) stamp_ms: u64,
    pub(super) tag: Vec<u8>,
}

/// A value's clear head: kind and absolute expiry in 16 digits.
pub(super) fn head(kind: u8, expires_ms: u64) -> [u8; HEAD] {
    let mut head = [b'0'; HEAD];
    head[0] = kind;
    let mut n = expires_ms.min(9_999_999_999_999_999);
    for digit in head[1..].iter_mut().rev() {
        *digit = b'0' + u8::try_from(n % 10).unwrap_or(0);
        n /= 10;
    }
    head
}

/// One Redis key or channel name, `{dg}:<kind>:<the key in hex>`, built on the stack (one
/// per entry kind on every fleet lookup).
#[derive(Clone, Copy)]
pub(super) struct Name(pub(super) link::Channel);

impl Name {
    pub(super) fn new(kind: u8, key: CacheKey) -> Self {
        let mut name = *b"{dg}:?:00000000000000000000000000000000";
        name[5] = kind;
        // 16 bytes always fill the 32 digits: the lengths are fixed by the types.
        let _ = hex::encode_to_slice(key.as_bytes(), &mut name[7..]);
        Self(name)
    }

    pub(super) fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

/// A sealed answer as the write-back scripts take it.
pub(super) struct Stored {
    /// What to store (empty: not kept).
    pub(super) value: Vec<u8>,
    pub(super) ttl_ms: u64,
    /// `"1"` for a positive answer (a negative one never replaces it).
    pub(super) positive: &'static str,
    /// What the waiters are told.
    pub(super) message: Vec<u8>,
}

/// Names of one key's Redis entries.
#[derive(Clone, Copy)]
pub(super) struct Names {
    pub(super) result: Name,
    pub(super) lease: Name,
    pub(super) channel: Name,
}

impl Names {
    pub(super) fn of(key: CacheKey) -> Self {
        Self {
            result: Name::new(b'r', key),
            lease: Name::new(b'l', key),
            channel: Name::new(b'c', key),
        }
    }
}

/// The lease holder text: the tag (a MAC, or `-`) and a random id of this claim.
pub(super) fn holder(tag: Option<CacheKey>) -> String {
    let tag = tag.map_or_else(|| "-".to_owned(), |t| hex::encode(t.as_bytes()));
    format!("{tag}:{:016x}", fastrand::u64(..))
}

pub(super) fn tag_of_holder(holder: &[u8]) -> &[u8] {
    holder.split(|b| *b == b':').next().unwrap_or_default()
}

pub(super) fn tag_text(tag: Option<CacheKey>) -> Vec<u8> {
    tag.map_or_else(|| b"-".to_vec(), |t| hex::encode(t.as_bytes()).into_bytes())
}

impl Scaleout {
    /// Seals a result: the clear head (kind, absolute expiry), then sealed
    /// `stamp_ms ‖ tag ‖ payload`, with the key and the head as associated data. Not stored
    /// (`ttl` none): it expires as it is sealed, and lives only as a message.
    pub(super) fn seal(
        &self,
        names: &Names,
        result: &CallResult,
        stamp_ms: u64,
        ttl: Option<Duration>,
        tag: Option<CacheKey>,
    ) -> Option<Vec<u8>> {
        let mut plain = Vec::with_capacity(64);
        plain.extend_from_slice(&stamp_ms.to_be_bytes());
        let tag = tag_text(tag);
        plain.push(u8::try_from(tag.len()).ok()?);
        plain.extend_from_slice(&tag);
        let kind = match result {
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
        let life = ttl.map_or(0, |ttl| u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX));
        let head = head(kind, stamp_ms.saturating_add(life));
        let mut out = head.to_vec();
        out.extend(self.sealer.seal(&associated(names, &head), &plain)?);
        Some(out)
    }

    /// Opens a value or message sealed for this key; `None` when it does not open.
    pub(super) fn unseal(&self, names: &Names, value: &[u8]) -> Option<Sealed> {
        let (head, sealed) = value.split_at_checked(HEAD)?;
        let head: [u8; HEAD] = head.try_into().ok()?;
        let plain = self.sealer.open(&associated(names, &head), sealed)?;
        let expires_ms = std::str::from_utf8(&head[1..]).ok()?.parse().ok()?;
        let (stamp, rest) = plain.split_at_checked(8)?;
        let stamp_ms = u64::from_be_bytes(stamp.try_into().ok()?);
        let (&tag_len, rest) = rest.split_first()?;
        let (tag, payload) = rest.split_at_checked(usize::from(tag_len))?;
        let result = match head[0] {
            FAILURE => {
                let (wait, code) = payload.split_at_checked(8)?;
                let wait = Duration::from_millis(u64::from_be_bytes(wait.try_into().ok()?));
                Err(GatewayError::from_remote(
                    std::str::from_utf8(code).ok()?,
                    wait,
                ))
            }
            POSITIVE | NEGATIVE => Ok(Answer::from_wire(payload)?),
            _ => return None,
        };
        Some(Sealed {
            result,
            expires_ms,
            stamp_ms,
            tag: tag.to_vec(),
        })
    }

    /// `result` sealed as a write-back sends it: the value to store (empty when it is not
    /// kept), its life, whether it is positive, and the waiters' message.
    pub(super) fn stored(
        &self,
        names: &Names,
        result: &CallResult,
        stamp: u64,
        ttl: Option<Duration>,
        tag: Option<CacheKey>,
    ) -> Option<Stored> {
        let message = self.seal(names, result, stamp, ttl, tag)?;
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
        Some(Stored {
            value,
            ttl_ms,
            positive,
            message,
        })
    }
}

/// The seal's associated data: the Redis key and the value's clear head.
pub(super) fn associated(names: &Names, head: &[u8; HEAD]) -> [u8; 39 + HEAD] {
    let mut aad = [0u8; 39 + HEAD];
    aad[..39].copy_from_slice(names.result.as_bytes());
    aad[39..].copy_from_slice(head);
    aad
}

/// Whether a stored tag is the request's (both MACs in hex, or `-`).
pub(super) fn tags_match(stored: &[u8], ours: &[u8]) -> bool {
    bool::from(subtle::ConstantTimeEq::ct_eq(stored, ours))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scaleout::test_fleet::{ONE, instance as fleet_instance};

    /// An instance that never connects (the link is lazy).
    fn instance() -> Scaleout {
        fleet_instance(ONE)
    }

    #[test]
    fn the_head_is_the_kind_and_sixteen_digits() {
        assert_eq!(&head(POSITIVE, 1_764_000_000_123), b"P0001764000000123");
        assert_eq!(&head(FAILURE, u64::MAX)[1..], b"9999999999999999");
    }

    #[tokio::test]
    async fn a_value_opens_only_with_its_key_kind_and_expiry() {
        let fleet = instance();
        let key = crate::keys::HashKey::fixed([1; 16]).key("t").finish();
        let names = Names::of(key);
        let answer = Answer::new(
            http::StatusCode::OK,
            crate::answer::AnswerParts {
                body: b"{\"success\":true}",
                content_type: None,
                trace_id: None,
                retry_after: None,
                location: None,
            },
        );
        let tag = Some(crate::keys::HashKey::fixed([2; 16]).key("tag").finish());
        let value = fleet
            .seal(
                &names,
                &Ok(answer),
                1_000,
                Some(Duration::from_secs(2)),
                tag,
            )
            .unwrap();
        assert_eq!(&value[..HEAD], b"P0000000000003000");
        let sealed = fleet.unseal(&names, &value).unwrap();
        assert_eq!((sealed.stamp_ms, sealed.expires_ms), (1_000, 3_000));
        assert_eq!(sealed.tag, tag_text(tag));
        assert!(sealed.result.is_ok());
        // Relabelled as another kind, given a longer life, moved, or altered: no.
        let mut relabelled = value.clone();
        relabelled[0] = NEGATIVE;
        assert!(fleet.unseal(&names, &relabelled).is_none());
        let mut longer = value.clone();
        longer[5] = b'9';
        assert!(fleet.unseal(&names, &longer).is_none());
        let other = Names::of(crate::keys::HashKey::fixed([1; 16]).key("u").finish());
        assert!(fleet.unseal(&other, &value).is_none());
        let mut flipped = value;
        *flipped.last_mut().unwrap() ^= 1;
        assert!(fleet.unseal(&names, &flipped).is_none());
        // Not stored: it expires as it is sealed.
        let message = fleet
            .seal(
                &names,
                &Err(GatewayError::UpstreamTimeout),
                5_000,
                None,
                None,
            )
            .unwrap();
        let sealed = fleet.unseal(&names, &message).unwrap();
        assert_eq!((sealed.stamp_ms, sealed.expires_ms), (5_000, 5_000));
        assert!(matches!(sealed.result, Err(GatewayError::UpstreamTimeout)));
    }

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
