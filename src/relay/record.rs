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

    /// The plain bytes sealed at rest.
    #[must_use]
    pub fn encode(&self) -> Option<Vec<u8>> {
        let mut out =
            Vec::with_capacity(12 + self.client.len() + self.branch.len() + self.target.len());
        put_field(&mut out, Some(self.client.as_bytes()))?;
        put_field(&mut out, Some(self.branch.as_bytes()))?;
        put_field(&mut out, Some(self.target.as_bytes()))?;
        Some(out)
    }

    /// Reads what [`Route::encode`] wrote.
    #[must_use]
    pub fn decode(plain: &[u8]) -> Option<Self> {
        let mut input = plain;
        let route = Self {
            client: take_string(&mut input)?,
            branch: take_string(&mut input)?,
            target: take_string(&mut input)?,
        };
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
        };
        assert_eq!(Route::decode(&r.encode().unwrap()).unwrap(), r);
        assert!(r.names_client("key:abc"));
        assert!(!r.names_client("key:ab") && !r.names_client("key:abd"));
        assert!(Route::decode(b"\0\0\0\x09short").is_none());
    }
}
