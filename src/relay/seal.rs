//! The relay's keyring: seals records at rest and keys the MACs that stand in for
//! requestIds, so nothing in the database names a request, a branch or a payload byte.
//!
//! The key file (`seal_key_file`) lists keys by id, newest first:
//!
//! ```text
//! # id = 64 hex digits (openssl rand -hex 32)
//! k2 = 5f1c…
//! k1 = 9a0e…
//! ```
//!
//! Records are sealed with the first key; any listed key opens. Rotation: put a new key
//! first, keep the old one until every record sealed under it has been delivered or purged
//! (`SqliteStore::count_by_key` says how many are left), then remove it. MACs are taken
//! under every listed key for lookups, so a duplicate or an erase finds a record whichever
//! key wrote it.
//!
//! A sealed value is `version ‖ key-id length ‖ key id ‖ nonce ‖ ciphertext ‖ tag`
//! (ChaCha20-Poly1305), with the record id, the acquirer and the field's name as associated
//! data: a value copied to another record, acquirer or column does not open.

use std::fmt;

use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::hkdf::{HKDF_SHA256, KeyType, Salt};
use ring::hmac;

use super::RecordId;

/// Domain of every derived key; a new layout of what is stored gets a new salt.
const SALT: &[u8] = b"diia-gateway callback relay v1";
/// The first byte of every sealed value.
const SEAL_VERSION: u8 = 1;
/// Longest key id accepted.
const MAX_ID_LEN: usize = 32;

/// Why a key file cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyFileError {
    /// No key listed.
    #[error("lists no key (lines `id = <64 hex digits>`, newest first)")]
    Empty,
    /// A line is not `id = hex`.
    #[error("line {0}: expected `id = <64 hex digits>`")]
    Line(usize),
    /// A key id is empty, too long or not `[A-Za-z0-9_.-]`.
    #[error("line {0}: a key id is 1 to 32 characters of A-Z a-z 0-9 _ . -")]
    Id(usize),
    /// Not 32 bytes of hex.
    #[error("line {0}: a key is 32 random bytes as 64 hex digits (openssl rand -hex 32)")]
    Key(usize),
    /// All bytes equal: a placeholder.
    #[error("line {0}: holds a placeholder (all bytes equal), not a random key")]
    Placeholder(usize),
    /// The same id twice.
    #[error("line {0}: key id listed twice")]
    Duplicate(usize),
}

struct Length(usize);

impl KeyType for Length {
    fn len(&self) -> usize {
        self.0
    }
}

/// One listed key and the subkeys derived from it.
struct Entry {
    id: String,
    seal: LessSafeKey,
    mac: hmac::Key,
}

/// The listed keys, the first one sealing.
pub struct Keyring {
    keys: Vec<Entry>,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ids: Vec<&str> = self.keys.iter().map(|k| k.id.as_str()).collect();
        write!(f, "Keyring(ids={ids:?}, <redacted>)")
    }
}

/// A keyed MAC (HMAC-SHA256) standing in for a requestId or a payload in the database.
pub type Mac = [u8; 32];

/// MACs of one value under every listed key, the sealing key's first, with the key's id.
pub type Macs = Vec<(String, Mac)>;

fn derive(secret: &[u8; 32], purpose: &str) -> [u8; 32] {
    let mut out = [0u8; 32];
    let prk = Salt::new(HKDF_SHA256, SALT).extract(secret);
    // `expand` and `fill` fail only for an output longer than 255 hash lengths.
    if let Ok(okm) = prk.expand(&[purpose.as_bytes()], Length(32)) {
        let _ = okm.fill(&mut out);
    }
    out
}

impl Keyring {
    /// Parses a key file's text (see the module doc).
    pub fn parse(text: &str) -> Result<Self, KeyFileError> {
        let mut keys: Vec<Entry> = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let n = n + 1;
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (id, hex_key) = line.split_once('=').ok_or(KeyFileError::Line(n))?;
            let (id, hex_key) = (id.trim(), hex_key.trim());
            let id_ok = !id.is_empty()
                && id.len() <= MAX_ID_LEN
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
            if !id_ok {
                return Err(KeyFileError::Id(n));
            }
            let mut secret = [0u8; 32];
            hex::decode_to_slice(hex_key, &mut secret).map_err(|_| KeyFileError::Key(n))?;
            if secret.iter().all(|b| *b == secret[0]) {
                return Err(KeyFileError::Placeholder(n));
            }
            if keys.iter().any(|k| k.id == id) {
                return Err(KeyFileError::Duplicate(n));
            }
            keys.push(Self::entry(id, &secret).ok_or(KeyFileError::Key(n))?);
        }
        if keys.is_empty() {
            return Err(KeyFileError::Empty);
        }
        Ok(Self { keys })
    }

    fn entry(id: &str, secret: &[u8; 32]) -> Option<Entry> {
        let seal = UnboundKey::new(&CHACHA20_POLY1305, &derive(secret, "seal")).ok()?;
        Some(Entry {
            id: id.to_owned(),
            seal: LessSafeKey::new(seal),
            mac: hmac::Key::new(hmac::HMAC_SHA256, &derive(secret, "mac")),
        })
    }

    /// The sealing key's id.
    #[must_use]
    pub fn current_id(&self) -> &str {
        self.keys.first().map_or("", |k| k.id.as_str())
    }

    /// MACs of `parts` (each length-prefixed, so `("ab","c")` and `("a","bc")` differ) under
    /// every listed key, the sealing key's first.
    #[must_use]
    pub fn macs(&self, purpose: &str, parts: &[&[u8]]) -> Macs {
        self.keys
            .iter()
            .map(|k| (k.id.clone(), mac_with(&k.mac, purpose, parts)))
            .collect()
    }

    /// The MAC of `parts` under the sealing key.
    #[must_use]
    pub fn mac(&self, purpose: &str, parts: &[&[u8]]) -> Mac {
        self.keys
            .first()
            .map_or([0u8; 32], |k| mac_with(&k.mac, purpose, parts))
    }

    /// The MAC of `parts` under the key named `id`, if listed.
    #[must_use]
    pub fn mac_under(&self, id: &str, purpose: &str, parts: &[&[u8]]) -> Option<Mac> {
        let key = self.keys.iter().find(|k| k.id == id)?;
        Some(mac_with(&key.mac, purpose, parts))
    }

    /// Seals `plain` under the first key, bound to the record, the acquirer and the field.
    #[must_use]
    pub fn seal(
        &self,
        record: RecordId,
        acquirer: &str,
        field: &str,
        plain: &[u8],
    ) -> Option<Vec<u8>> {
        let key = self.keys.first()?;
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).ok()?;
        let id = key.id.as_bytes();
        let mut out = Vec::with_capacity(2 + id.len() + NONCE_LEN + plain.len() + 16);
        out.push(SEAL_VERSION);
        out.push(u8::try_from(id.len()).ok()?);
        out.extend_from_slice(id);
        out.extend_from_slice(&nonce);
        let start = out.len();
        out.extend_from_slice(plain);
        let aad = aad(record, acquirer, field);
        let tag = key
            .seal
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&aad),
                out.get_mut(start..)?,
            )
            .ok()?;
        out.extend_from_slice(tag.as_ref());
        Some(out)
    }

    /// The plain text, or `None` when no listed key sealed it for this record, acquirer
    /// and field.
    #[must_use]
    pub fn open(
        &self,
        record: RecordId,
        acquirer: &str,
        field: &str,
        sealed: &[u8],
    ) -> Option<Vec<u8>> {
        let (&version, rest) = sealed.split_first()?;
        if version != SEAL_VERSION {
            return None;
        }
        let (&id_len, rest) = rest.split_first()?;
        let id_len = usize::from(id_len);
        let id = rest.get(..id_len)?;
        let nonce = rest.get(id_len..id_len + NONCE_LEN)?;
        let body = rest.get(id_len + NONCE_LEN..)?;
        let key = self.keys.iter().find(|k| k.id.as_bytes() == id)?;
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let aad = aad(record, acquirer, field);
        let mut body = body.to_vec();
        let plain_len = key
            .seal
            .open_in_place(nonce, Aad::from(&aad), &mut body)
            .ok()?
            .len();
        body.truncate(plain_len);
        Some(body)
    }

    /// The id of the key that sealed `sealed` (read from its header, not verified).
    #[must_use]
    pub fn sealed_by(sealed: &[u8]) -> Option<&str> {
        let len = usize::from(*sealed.get(1)?);
        std::str::from_utf8(sealed.get(2..2 + len)?).ok()
    }
}

fn mac_with(key: &hmac::Key, purpose: &str, parts: &[&[u8]]) -> Mac {
    let mut ctx = hmac::Context::with_key(key);
    ctx.update(purpose.as_bytes());
    for part in parts {
        ctx.update(&(part.len() as u64).to_be_bytes());
        ctx.update(part);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.sign().as_ref());
    out
}

fn aad(record: RecordId, acquirer: &str, field: &str) -> Vec<u8> {
    let mut aad = Vec::with_capacity(16 + 2 + acquirer.len() + field.len());
    aad.extend_from_slice(&record.0);
    aad.extend_from_slice(&(acquirer.len() as u64).to_be_bytes());
    aad.extend_from_slice(acquirer.as_bytes());
    aad.extend_from_slice(field.as_bytes());
    aad
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const K1: &str = "0101010101010101010101010101010101010101010101010101010101010102";
    const K2: &str = "a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90";

    #[test]
    fn key_file_errors_name_the_line() {
        assert_eq!(
            Keyring::parse("# nothing\n").unwrap_err(),
            KeyFileError::Empty
        );
        assert_eq!(Keyring::parse("k1 ").unwrap_err(), KeyFileError::Line(1));
        assert_eq!(
            Keyring::parse("\nk 1 = 00").unwrap_err(),
            KeyFileError::Id(2)
        );
        assert_eq!(Keyring::parse("k1 = 00").unwrap_err(), KeyFileError::Key(1));
        let zeros = "0".repeat(64);
        assert_eq!(
            Keyring::parse(&format!("k1 = {zeros}")).unwrap_err(),
            KeyFileError::Placeholder(1)
        );
        assert_eq!(
            Keyring::parse(&format!("k1 = {K1}\nk1 = {K2}")).unwrap_err(),
            KeyFileError::Duplicate(2)
        );
    }

    #[test]
    fn seals_with_the_first_key_and_opens_with_any_listed_one() {
        let id = RecordId([7; 16]);
        let old = Keyring::parse(&format!("k1 = {K1}")).unwrap();
        let sealed_old = old.seal(id, "acq", "envelope", b"hello").unwrap();
        let rotated = Keyring::parse(&format!("k2 = {K2}\nk1 = {K1}")).unwrap();
        assert_eq!(rotated.current_id(), "k2");
        assert_eq!(
            rotated.open(id, "acq", "envelope", &sealed_old).unwrap(),
            b"hello"
        );
        let sealed_new = rotated.seal(id, "acq", "envelope", b"hello").unwrap();
        assert_eq!(Keyring::sealed_by(&sealed_new), Some("k2"));
        assert!(old.open(id, "acq", "envelope", &sealed_new).is_none());
        // Bound to record, acquirer and field.
        assert!(
            rotated
                .open(RecordId([8; 16]), "acq", "envelope", &sealed_new)
                .is_none()
        );
        assert!(rotated.open(id, "other", "envelope", &sealed_new).is_none());
        assert!(rotated.open(id, "acq", "route", &sealed_new).is_none());
        // MACs: the first is the sealing key's, the old key's follows.
        let macs = rotated.macs("request", &[b"r1"]);
        assert_eq!(macs.len(), 2);
        assert_eq!(macs[1].1, old.mac("request", &[b"r1"]));
        assert_ne!(
            rotated.mac("request", &[b"ab", b"c"]),
            rotated.mac("request", &[b"a", b"bc"])
        );
    }
}
