//! Key material: keyed hashes (cache keys that bind every entry to its acquirer, log
//! fingerprints) and [`Secret`], the redacting wrapper for credentials.
//!
//! One per-process secret key (from the OS RNG) keys SipHash-2-4 with 128-bit output, a
//! PRF: without the key, neither a cache key nor a log fingerprint can be reversed or
//! precomputed (a barcode has ~10^12 values, few enough to brute-force an unkeyed hash),
//! and finding two requests that share a key takes ~2^64 tries. SipHash replaced keyed
//! BLAKE3 here because keys are short: ~130 ns against ~270 ns for a 220-byte key
//! (see the `cache_key` bench group, which keeps both).

use std::fmt;
use std::hash::{Hash, Hasher};

use siphasher::sip128::{Hasher128, SipHasher24};
use subtle::ConstantTimeEq;

/// A 128-bit keyed digest used as a cache key. Equality is constant-time, so comparing
/// keys that embed credentials leaks nothing through timing.
#[derive(Clone, Copy)]
pub struct CacheKey([u8; 16]);

impl PartialEq for CacheKey {
    fn eq(&self, other: &Self) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl Eq for CacheKey {}

impl Hash for CacheKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // The digest is uniformly random; 8 of its bytes are a perfect hash already.
        let mut head = [0u8; 8];
        head.copy_from_slice(&self.0[..8]);
        state.write_u64(u64::from_le_bytes(head));
    }
}

impl fmt::Debug for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "CacheKey({:02x}{:02x}{:02x}{:02x}…)",
            self.0[0], self.0[1], self.0[2], self.0[3]
        )
    }
}

impl CacheKey {
    /// The digest bytes.
    #[must_use]
    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

/// Builds a [`CacheKey`] from length-prefixed parts, so `("ab","c")` and `("a","bc")` differ.
pub struct KeyBuilder(SipHasher24);

impl KeyBuilder {
    /// Adds one part.
    pub fn part(&mut self, bytes: &[u8]) -> &mut Self {
        self.0.write(&(bytes.len() as u64).to_le_bytes());
        self.0.write(bytes);
        self
    }

    /// The finished key.
    #[must_use]
    pub fn finish(&self) -> CacheKey {
        CacheKey(self.0.finish128().as_bytes())
    }
}

/// The keys for keyed hashing: random per process, or (scale-out) derived from the fleet
/// secret so that every instance computes the same cache keys and log fingerprints.
#[derive(Clone)]
pub struct HashKey {
    key: [u8; 16],
    log: [u8; 16],
}

impl fmt::Debug for HashKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("HashKey(<redacted>)")
    }
}

impl HashKey {
    /// A fresh random key from the OS.
    pub fn random() -> std::io::Result<Self> {
        let mut key = [0u8; 16];
        getrandom::fill(&mut key).map_err(std::io::Error::other)?;
        Ok(Self { key, log: key })
    }

    /// A fixed key, for benchmarks and tests that need reproducible keys.
    #[must_use]
    pub fn fixed(key: [u8; 16]) -> Self {
        Self { key, log: key }
    }

    /// Keys derived elsewhere: one for cache keys, one for log fingerprints (scale-out:
    /// the fleet secret's subkeys, see `FleetSecret::hash_key`).
    #[must_use]
    pub fn from_subkeys(key: [u8; 16], log: [u8; 16]) -> Self {
        Self { key, log }
    }

    /// Starts a cache key in a domain (`domain` separates caches that share the key space).
    #[must_use]
    pub fn key(&self, domain: &'static str) -> KeyBuilder {
        let mut builder = KeyBuilder(SipHasher24::new_with_key(&self.key));
        builder.part(domain.as_bytes());
        builder
    }

    /// A short keyed fingerprint that can stand in for a secret value in logs.
    #[must_use]
    pub fn fingerprint(&self, value: &[u8]) -> Fingerprint {
        let mut builder = KeyBuilder(SipHasher24::new_with_key(&self.log));
        let digest = builder.part(b"log").part(value).finish();
        let mut head = [0u8; 6];
        head.copy_from_slice(&digest.as_bytes()[..6]);
        Fingerprint(head)
    }
}

/// A credential (acquirer token, auth token) whose `Debug` never shows it; equality is
/// constant-time.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    #[must_use]
    pub fn new(value: String) -> Self {
        Self(value)
    }

    /// The secret itself; for building requests only.
    #[must_use]
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl PartialEq for Secret {
    fn eq(&self, other: &Self) -> bool {
        self.0.as_bytes().ct_eq(other.0.as_bytes()).into()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// A 48-bit keyed fingerprint; displays as 12 hex digits.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Fingerprint([u8; 6]);

impl Fingerprint {
    /// The 12 hex digits, without `fmt` (the access log writes one per request).
    #[must_use]
    pub fn hex(&self) -> [u8; 12] {
        let mut out = [0u8; 12];
        // 6 bytes always fit 12 hex digits.
        let _ = hex::encode_to_slice(self.0, &mut out);
        out
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in self.0 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_do_not_debug_print() {
        let secret = Secret::new("acquirer_test_token".to_owned());
        assert!(!format!("{secret:?}").contains("acquirer"));
        assert_eq!(secret, Secret::new("acquirer_test_token".to_owned()));
        assert_ne!(secret, Secret::new("acquirer_test_token2".to_owned()));
    }

    #[test]
    fn parts_are_length_prefixed() {
        let secrets = HashKey::fixed([7; 16]);
        let a = secrets.key("d").part(b"ab").part(b"c").finish();
        let b = secrets.key("d").part(b"a").part(b"bc").finish();
        assert_ne!(a, b);
        assert_eq!(a, secrets.key("d").part(b"ab").part(b"c").finish());
    }

    #[test]
    fn domains_and_secrets_separate_keys() {
        let one = HashKey::fixed([1; 16]);
        let two = HashKey::fixed([2; 16]);
        assert_ne!(
            one.key("a").part(b"x").finish(),
            one.key("b").part(b"x").finish()
        );
        assert_ne!(
            one.key("a").part(b"x").finish(),
            two.key("a").part(b"x").finish()
        );
        assert_ne!(one.fingerprint(b"x"), two.fingerprint(b"x"));
    }
}
