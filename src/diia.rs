//! Facts about Diia that the gateway plans around (a leaf module: it imports nothing of ours).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Deserialize;

/// A barcode lives 3 minutes at Diia; nothing about it may be remembered longer.
pub const BARCODE_LIFETIME: Duration = Duration::from_secs(180);

/// Diia session tokens live 2 hours.
pub const SESSION_TOKEN_LIFETIME: Duration = Duration::from_secs(2 * 60 * 60);

/// What a session token's JWT `exp` says about its life (read, never trusted for anything
/// else: Diia checks the signature, we only plan refreshes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenLife {
    /// Not a JWT, or no `exp`: assume Diia's 2 hours.
    Unknown,
    /// Time left, at most Diia's 2 hours.
    Left(Duration),
    /// `exp` is already past (or our clock is ahead).
    Expired,
}

/// Reads the `exp` claim of a session token.
#[must_use]
pub fn token_life(token: &str) -> TokenLife {
    #[derive(Deserialize)]
    struct Claims {
        exp: Option<u64>,
    }
    let exp = token
        .split('.')
        .nth(1)
        .and_then(|payload| URL_SAFE_NO_PAD.decode(payload).ok())
        .and_then(|json| serde_json::from_slice::<Claims>(&json).ok())
        .and_then(|claims| claims.exp);
    let (Some(exp), Ok(now)) = (exp, SystemTime::now().duration_since(UNIX_EPOCH)) else {
        return TokenLife::Unknown;
    };
    match Duration::from_secs(exp).checked_sub(now) {
        Some(left) if !left.is_zero() => TokenLife::Left(left.min(SESSION_TOKEN_LIFETIME)),
        _ => TokenLife::Expired,
    }
}
