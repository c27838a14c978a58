//! What a record holds, in clear only in memory: the callback as Diia sent it
//! ([`Envelope`]) and where it goes ([`Route`]), and their byte framing before sealing.

use std::fmt;

use bytes::Bytes;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// A callback as Diia sent it: what delivery replays byte for byte.
#[derive(Clone, PartialEq, Eq)]
pub struct Envelope {
    /// `X-Document-Request-Trace-Id`: the partner's requestId.
    pub request_id: String,
    /// `X-Diia-Id-Action`, when Diia sent one.
    pub action: Option<String>,
    /// The original `Content-Type` (multipart boundary included).
    pub content_type: String,
    /// The body, byte for byte.
    pub body: Bytes,
}

impl fmt::Debug for Envelope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Envelope(<redacted>, {} bytes)", self.body.len())
    }
}

/// Where a routed record goes: who recorded the route, for which branch, to which target.
#[derive(Clone, PartialEq, Eq)]
pub struct Route {
    /// The caller that created the route (the pull side answers only to it).
    pub client: String,
    /// The branch id.
    pub branch: String,
    /// The delivery target's name (`[[callback_relay.target]]`); empty when no target
    /// serves the branch and it pulls its packages ([`Route::is_pull`]).
    pub target: String,
    /// A second owner: the login the caller's pass-through session token was issued for
    /// by this gateway's token exchange (`login:` and the SHA-256 of the acquirer token,
    /// never the token), so the same SDK still owns the route after it logs in again with
    /// a new session token. `None` for every other caller (and for routes recorded before
    /// this field existed).
    pub login: Option<String>,
}

/// Who asks for a route, or pulls its packages: the caller as [`Route::client`] names
/// it and, for a session token this gateway issued, the login it was issued for
/// ([`Route::login`]). It owns a route when either names the same as the route's.
#[derive(Clone, PartialEq, Eq)]
pub struct Owner {
    /// `session:`, `key:` or `cert:` and a digest ([`crate::caller::Caller::relay_client`]).
    pub client: String,
    /// `login:` and the digest of the acquirer token its session token was issued for.
    pub login: Option<String>,
}

impl fmt::Debug for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Owner(<redacted>, login={})", self.login.is_some())
    }
}

impl From<&str> for Owner {
    /// An owner known by its client alone.
    fn from(client: &str) -> Self {
        Self {
            client: client.to_owned(),
            login: None,
        }
    }
}

impl From<String> for Owner {
    /// An owner known by its client alone.
    fn from(client: String) -> Self {
        Self {
            client,
            login: None,
        }
    }
}

impl fmt::Debug for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Route(target={}, <redacted>)", self.target)
    }
}

/// A string field: `u32` length then bytes; `u32::MAX` for none.
fn put_field(out: &mut Vec<u8>, field: Option<&[u8]>) -> Option<()> {
    match field {
        Some(bytes) => {
            let len = u32::try_from(bytes.len()).ok().filter(|l| *l != u32::MAX)?;
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(bytes);
        }
        None => out.extend_from_slice(&u32::MAX.to_be_bytes()),
    }
    Some(())
}

fn take_field<'a>(input: &mut &'a [u8]) -> Option<Option<&'a [u8]>> {
    let (len, rest) = input.split_first_chunk::<4>()?;
    let len = u32::from_be_bytes(*len);
    if len == u32::MAX {
        *input = rest;
        return Some(None);
    }
    let len = usize::try_from(len).ok()?;
    let field = rest.get(..len)?;
    *input = rest.get(len..)?;
    Some(Some(field))
}

fn take_string(input: &mut &[u8]) -> Option<String> {
    let field = take_field(input)??;
    String::from_utf8(field.to_vec()).ok()
}

impl Envelope {
    /// The plain bytes sealed at rest.
    #[must_use]
    pub fn encode(&self) -> Option<Vec<u8>> {
        let mut out = Vec::with_capacity(
            16 + self.request_id.len()
                + self.action.as_ref().map_or(0, String::len)
                + self.content_type.len()
                + self.body.len(),
        );
        put_field(&mut out, Some(self.request_id.as_bytes()))?;
        put_field(&mut out, self.action.as_deref().map(str::as_bytes))?;
        put_field(&mut out, Some(self.content_type.as_bytes()))?;
        out.extend_from_slice(&self.body);
        Some(out)
    }

    /// Reads what [`Envelope::encode`] wrote.
    #[must_use]
    pub fn decode(plain: &[u8]) -> Option<Self> {
        let mut input = plain;
        let request_id = take_string(&mut input)?;
        let action = match take_field(&mut input)? {
            Some(bytes) => Some(String::from_utf8(bytes.to_vec()).ok()?),
            None => None,
        };
        let content_type = take_string(&mut input)?;
        Some(Self {
            request_id,
            action,
            content_type,
            body: Bytes::copy_from_slice(input),
        })
    }
}

impl Route {
    /// Whether the branch pulls its packages (no push target serves it).
    #[must_use]
    pub fn is_pull(&self) -> bool {
        self.target.is_empty()
    }

    /// Whether `client` is the caller that created the route, compared as SHA-256 digests in
    /// constant time (what the pull side authorises with, after [`crate::relay::CallbackStore::route`]).
    #[must_use]
    pub fn names_client(&self, client: &str) -> bool {
        let ours: [u8; 32] = Sha256::digest(self.client.as_bytes()).into();
        let theirs: [u8; 32] = Sha256::digest(client.as_bytes()).into();
        ours.ct_eq(&theirs).into()
    }

    /// Whether `ours` (a route about to be recorded) has the same owner as this one: the
    /// same branch, and the same client or the same login (both compared as SHA-256
    /// digests in constant time). A retried push after the caller logged in again is the
    /// same owner; any other caller is not.
    #[must_use]
    pub fn same_owner(&self, ours: &Route) -> bool {
        let owner = Owner {
            client: ours.client.clone(),
            login: ours.login.clone(),
        };
        self.owned_by(&owner) && self.branch == ours.branch
    }

    /// Whether `owner` owns this route: its client is the route's, or both carry a login
    /// and it is the route's (SHA-256 digests compared in constant time, both compared
    /// whatever the first gives).
    #[must_use]
    pub fn owned_by(&self, owner: &Owner) -> bool {
        let digest = |text: &str| -> [u8; 32] { Sha256::digest(text.as_bytes()).into() };
        let client = digest(&self.client).ct_eq(&digest(&owner.client));
        let both = subtle::Choice::from(u8::from(self.login.is_some() && owner.login.is_some()));
        let login = digest(self.login.as_deref().unwrap_or_default())
            .ct_eq(&digest(owner.login.as_deref().unwrap_or_default()));
        (client | (both & login)).into()
    }

    /// The plain bytes sealed at rest: client, branch, target, then the login only when
    /// there is one (so a route without one encodes as before it existed).
    #[must_use]
    pub fn encode(&self) -> Option<Vec<u8>> {
        let login = self.login.as_ref().map_or(0, |login| 4 + login.len());
        let mut out = Vec::with_capacity(
            12 + self.client.len() + self.branch.len() + self.target.len() + login,
        );
        put_field(&mut out, Some(self.client.as_bytes()))?;
        put_field(&mut out, Some(self.branch.as_bytes()))?;
        put_field(&mut out, Some(self.target.as_bytes()))?;
        if let Some(login) = &self.login {
            put_field(&mut out, Some(login.as_bytes()))?;
        }
        Some(out)
    }

    /// Reads what [`Route::encode`] wrote, and routes written before the login existed
    /// (three fields).
    #[must_use]
    pub fn decode(plain: &[u8]) -> Option<Self> {
        let mut input = plain;
        let mut route = Self {
            client: take_string(&mut input)?,
            branch: take_string(&mut input)?,
            target: take_string(&mut input)?,
            login: None,
        };
        if !input.is_empty() {
            route.login = Some(take_string(&mut input)?);
        }
        input.is_empty().then_some(route)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn envelope_and_route_round_trip() {
        for action in [
            None,
            Some(String::new()),
            Some("hashedFilesSigning".to_owned()),
        ] {
            let e = Envelope {
                request_id: "req-1".into(),
                action,
                content_type: "multipart/form-data; boundary=x".into(),
                body: Bytes::from_static(b"\xff\x00body"),
            };
            assert_eq!(Envelope::decode(&e.encode().unwrap()).unwrap(), e);
        }
        let r = Route {
            client: "key:abc".into(),
            branch: "b-7".into(),
            target: "t".into(),
            login: None,
        };
        assert_eq!(Route::decode(&r.encode().unwrap()).unwrap(), r);
        assert!(r.names_client("key:abc"));
        assert!(!r.names_client("key:ab") && !r.names_client("key:abd"));
        assert!(Route::decode(b"\0\0\0\x09short").is_none());
        let with_login = Route {
            login: Some("login:00ff".into()),
            ..r
        };
        let encoded = with_login.encode().unwrap();
        assert_eq!(Route::decode(&encoded).unwrap(), with_login);
        // Trailing bytes that are not a whole field are refused.
        assert!(Route::decode(&[&encoded[..], b"x"].concat()).is_none());
    }

    /// A route sealed before the login field existed (three fields, as written then)
    /// still opens, with no login.
    #[test]
    fn an_old_route_encoding_still_decodes() {
        let old = b"\0\0\0\x0bsession:abc\0\0\0\x03b-1\0\0\0\x01t";
        let route = Route::decode(old).unwrap();
        assert_eq!(
            (
                route.client.as_str(),
                route.branch.as_str(),
                route.target.as_str()
            ),
            ("session:abc", "b-1", "t")
        );
        assert!(route.login.is_none());
        assert_eq!(
            route.encode().unwrap(),
            old.to_vec(),
            "re-encoded as before"
        );
    }

    #[test]
    fn a_route_is_owned_by_its_client_or_by_its_login() {
        let route = Route {
            client: "session:t1".into(),
            branch: "b-1".into(),
            target: String::new(),
            login: Some("login:a".into()),
        };
        let owner = |client: &str, login: Option<&str>| Owner {
            client: client.into(),
            login: login.map(str::to_owned),
        };
        assert!(route.owned_by(&owner("session:t1", None)));
        assert!(route.owned_by(&owner("session:t2", Some("login:a"))));
        assert!(!route.owned_by(&owner("session:t2", Some("login:b"))));
        assert!(!route.owned_by(&owner("session:t2", None)));
        // No login on the route: the client alone decides, as before.
        let plain = Route {
            login: None,
            ..route.clone()
        };
        assert!(!plain.owned_by(&owner("session:t2", Some("login:a"))));
        assert!(plain.owned_by(&owner("session:t1", Some("login:z"))));
        // A retried push after a new login is the same owner; another branch is not.
        let retried = Route {
            client: "session:t2".into(),
            ..route.clone()
        };
        assert!(route.same_owner(&retried));
        let elsewhere = Route {
            branch: "b-2".into(),
            ..retried
        };
        assert!(!route.same_owner(&elsewhere));
    }
}
