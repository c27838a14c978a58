//! The fleet secret: one 32-byte key shared by every instance, from which HKDF derives
//! the subkeys for Redis keys and cache keys, for sealing values, and for log
//! fingerprints. Keys therefore match across instances (a re-scan on another instance
//! finds the answer), yet nothing in Redis names a barcode, a requestId or a token.
//!
//! Values are sealed with ChaCha20-Poly1305 under a random 96-bit nonce, with the Redis
//! key, the value's kind and its absolute expiry as associated data: a value moved to
//! another key, relabelled, or given a longer life does not open. Fleet members carry an
//! HMAC under the secret, so a Redis writer cannot add instances to the fleet.

use std::fmt;

use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::hkdf::{HKDF_SHA256, KeyType, Salt};
use ring::hmac;
use subtle::ConstantTimeEq;

use crate::keys::HashKey;

/// Domain of every derived key; a new layout of what is stored gets a new salt.
const SALT: &[u8] = b"diia-gateway scaleout v1";
/// The first byte of every sealed value: the layout version (2: kind and expiry bound).
const SEAL_VERSION: u8 = 2;
/// Bytes of a fleet member's MAC (truncated HMAC-SHA256).
const MEMBER_MAC_LEN: usize = 16;

/// The shared secret as read from `scaleout.secret_file`.
#[derive(Clone)]
pub struct FleetSecret {
    bytes: [u8; 32],
    id: String,
}

impl fmt::Debug for FleetSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FleetSecret(id={}, <redacted>)", self.id)
    }
}

impl PartialEq for FleetSecret {
    fn eq(&self, other: &Self) -> bool {
        bool::from(self.bytes.ct_eq(&other.bytes)) && self.id == other.id
    }
}

/// Why a secret file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// Not 64 hex digits.
    #[error("must hold 32 random bytes as 64 hex digits (e.g. `openssl rand -hex 32`)")]
    Format,
    /// All bytes equal: a placeholder, not a secret.
    #[error("holds a placeholder (all bytes equal), not a random secret")]
    Placeholder,
}

struct Length(usize);

impl KeyType for Length {
    fn len(&self) -> usize {
        self.0
    }
}

impl FleetSecret {
    /// Parses the file's text: 64 hex digits, surrounding whitespace ignored.
    pub fn parse(text: &str, id: &str) -> Result<Self, SecretError> {
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(text.trim(), &mut bytes).map_err(|_| SecretError::Format)?;
        if bytes.iter().all(|b| *b == bytes[0]) {
            return Err(SecretError::Placeholder);
        }
        Ok(Self {
            bytes,
            id: id.to_owned(),
        })
    }

    /// The secret's name (`scaleout.secret_id`).
    #[must_use]
    pub fn id(&self) -> &str {
        &self.id
    }

    /// A subkey of `N` bytes for one purpose.
    #[must_use]
    pub fn subkey<const N: usize>(&self, purpose: &'static str) -> [u8; N] {
        let mut out = [0u8; N];
        let prk = Salt::new(HKDF_SHA256, SALT).extract(&self.bytes);
        // `expand` and `fill` fail only for an output longer than 255 hash lengths.
        if let Ok(okm) = prk.expand(&[purpose.as_bytes()], Length(N)) {
            let _ = okm.fill(&mut out);
        }
        out
    }

    /// Keys shared by every instance holding this secret (HKDF subkeys, one per purpose):
    /// every instance computes the same cache keys and log fingerprints.
    #[must_use]
    pub fn hash_key(&self) -> HashKey {
        HashKey::from_subkeys(self.subkey("cache-keys"), self.subkey("log-fingerprints"))
    }

    /// The sealing key.
    #[must_use]
    pub fn sealer(&self) -> Sealer {
        let key: [u8; 32] = self.subkey("seal");
        // A 32-byte key is exactly what ChaCha20-Poly1305 takes; `new` cannot fail.
        let key = UnboundKey::new(&CHACHA20_POLY1305, &key)
            .map(LessSafeKey::new)
            .ok();
        Sealer { key }
    }

    /// The key that signs fleet members.
    #[must_use]
    pub fn members(&self) -> Members {
        let key: [u8; 32] = self.subkey("fleet member");
        Members {
            key: hmac::Key::new(hmac::HMAC_SHA256, &key),
        }
    }
}

impl FleetSecret {
    /// The key that signs relay config entries (`{dg}:relay-config`): a subkey of its own,
    /// so an entry never counts as a fleet member, nor a member as an entry.
    #[must_use]
    pub fn relay_config_members(&self) -> Members {
        let key: [u8; 32] = self.subkey("relay config entry");
        Members {
            key: hmac::Key::new(hmac::HMAC_SHA256, &key),
        }
    }
}

/// Signs and checks the fleet set's members: `instance.stamp_ms.mac`, the stamp a time on
/// Redis's clock, the MAC over both under the fleet secret.
pub struct Members {
    key: hmac::Key,
}

impl fmt::Debug for Members {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Members(<redacted>)")
    }
}

impl Members {
    /// This instance's member text at `stamp_ms`.
    #[must_use]
    pub fn sign(&self, instance: &str, stamp_ms: u64) -> String {
        let signed = format!("{instance}.{stamp_ms}");
        let tag = hmac::sign(&self.key, signed.as_bytes());
        let mac = tag.as_ref().get(..MEMBER_MAC_LEN).unwrap_or_default();
        format!("{signed}.{}", hex::encode(mac))
    }

    /// The instance and stamp of a member signed under this secret; `None` for anything
    /// else (compared in constant time).
    #[must_use]
    pub fn open<'a>(&self, member: &'a [u8]) -> Option<(&'a [u8], u64)> {
        let dot = member.iter().rposition(|b| *b == b'.')?;
        let (signed, mac) = (member.get(..dot)?, member.get(dot + 1..)?);
        let mut given = [0u8; MEMBER_MAC_LEN];
        hex::decode_to_slice(mac, &mut given).ok()?;
        let tag = hmac::sign(&self.key, signed);
        let expected = tag.as_ref().get(..MEMBER_MAC_LEN)?;
        if !bool::from(expected.ct_eq(&given)) {
            return None;
        }
        let dot = signed.iter().rposition(|b| *b == b'.')?;
        let stamp = std::str::from_utf8(signed.get(dot + 1..)?)
            .ok()?
            .parse()
            .ok()?;
        Some((signed.get(..dot)?, stamp))
    }
}

/// Seals and opens values stored in Redis.
pub struct Sealer {
    key: Option<LessSafeKey>,
}

impl fmt::Debug for Sealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Sealer(<redacted>)")
    }
}

impl Sealer {
    /// `version ‖ nonce ‖ ciphertext ‖ tag`, bound to `context` (the Redis key).
    #[must_use]
    pub fn seal(&self, context: &[u8], plain: &[u8]) -> Option<Vec<u8>> {
        let key = self.key.as_ref()?;
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).ok()?;
        let mut out = Vec::with_capacity(1 + NONCE_LEN + plain.len() + 16);
        out.push(SEAL_VERSION);
        out.extend_from_slice(&nonce);
        let mut body = plain.to_vec();
        key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(context),
            &mut body,
        )
        .ok()?;
        out.extend_from_slice(&body);
        Some(out)
    }

    /// The plain text, or `None` when the value was not sealed by this secret for `context`.
    #[must_use]
    pub fn open(&self, context: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
        let key = self.key.as_ref()?;
        let (&version, rest) = sealed.split_first()?;
        if version != SEAL_VERSION || rest.len() < NONCE_LEN {
            return None;
        }
        let (nonce, body) = rest.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut body = body.to_vec();
        let plain = key
            .open_in_place(nonce, Aad::from(context), &mut body)
            .ok()?;
        Some(plain.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

    #[test]
    fn sealed_values_open_only_under_their_key_and_context() {
        let secret = FleetSecret::parse(HEX, "1").unwrap();
        let sealer = secret.sealer();
        let sealed = sealer.seal(b"key-a", b"answer").unwrap();
        assert!(!sealed.windows(6).any(|w| w == b"answer"));
        assert_eq!(sealer.open(b"key-a", &sealed).unwrap(), b"answer");
        assert!(sealer.open(b"key-b", &sealed).is_none());
        let other = FleetSecret::parse(&HEX.replace("1f", "20"), "2").unwrap();
        assert!(other.sealer().open(b"key-a", &sealed).is_none());
    }

    #[test]
    fn subkeys_differ_by_purpose_and_secret() {
        let secret = FleetSecret::parse(HEX, "1").unwrap();
        let a: [u8; 16] = secret.subkey("keys");
        let b: [u8; 16] = secret.subkey("log");
        assert_ne!(a, b);
        assert_eq!(a, secret.subkey::<16>("keys"));
    }

    #[test]
    fn members_open_only_when_signed_by_the_secret() {
        let secret = FleetSecret::parse(HEX, "1").unwrap();
        let members = secret.members();
        let member = members.sign("00ff00ff00ff00ff", 1_700_000_000_123);
        assert_eq!(
            members.open(member.as_bytes()),
            Some((&b"00ff00ff00ff00ff"[..], 1_700_000_000_123))
        );
        let later = member.replace(".1700000000123.", ".1800000000123.");
        assert!(members.open(later.as_bytes()).is_none());
        assert!(members.open(b"00ff00ff00ff00ff").is_none());
        let other = FleetSecret::parse(&HEX.replace("1f", "20"), "2").unwrap();
        assert!(other.members().open(member.as_bytes()).is_none());
    }

    #[test]
    fn bad_secrets_are_refused() {
        assert!(FleetSecret::parse("abcd", "1").is_err());
        assert!(FleetSecret::parse(&"00".repeat(32), "1").is_err());
        assert!(FleetSecret::parse(&format!(" {HEX}\n"), "1").is_ok());
    }
}
