//! A stand-in branch backend inside the simulator, so the demo can show the relay's push
//! without another program: `POST /sim/branch-inbox` takes a pushed document package as
//! a branch backend would (answers `{"success":true}`), `GET /sim/branch-inbox` lists what
//! arrived (headers of interest, size, a digest of the body; never the body itself).

use std::collections::VecDeque;
use std::sync::Mutex;

use http::HeaderMap;
use serde::Serialize;

/// Packages kept for listing; older ones are dropped first.
const KEPT: usize = 1000;
/// Largest package taken (Diia's are ~200 KB to ~1 MB).
pub const MAX_PACKAGE: usize = 16 * 1024 * 1024;

/// One package as the inbox saw it.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Arrived {
    /// `X-Document-Request-Trace-Id`: the partner's requestId.
    pub request_id: Option<String>,
    /// `webhook-id` (the same on every attempt of one package).
    pub webhook_id: Option<String>,
    /// Whether `webhook-signature` was present (the demo does not verify it).
    pub signed: bool,
    /// The `Content-Type`, boundary included.
    pub content_type: Option<String>,
    /// Body bytes.
    pub size: usize,
    /// A 64-bit FNV-1a digest of the body, hex: enough to compare with what was sent.
    pub digest: String,
}

/// The packages pushed to the simulator's branch inbox.
#[derive(Default)]
pub struct BranchInbox {
    arrived: Mutex<VecDeque<Arrived>>,
}

impl BranchInbox {
    /// Records one pushed package.
    pub fn take(&self, headers: &HeaderMap, body: &[u8]) {
        let text = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let arrived = Arrived {
            request_id: text("x-document-request-trace-id"),
            webhook_id: text("webhook-id"),
            signed: headers.contains_key("webhook-signature"),
            content_type: text("content-type"),
            size: body.len(),
            digest: format!("{:016x}", fnv1a(body)),
        };
        let mut kept = self
            .arrived
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if kept.len() == KEPT {
            kept.pop_front();
        }
        kept.push_back(arrived);
    }

    /// What arrived, oldest first, as JSON: `{"packages":[…]}`.
    #[must_use]
    pub fn json(&self) -> String {
        #[derive(Serialize)]
        struct Listing<'a> {
            packages: &'a VecDeque<Arrived>,
        }
        let kept = self
            .arrived
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        serde_json::to_string(&Listing { packages: &kept }).unwrap_or_default()
    }
}

/// FNV-1a, 64-bit.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn records_headers_size_and_digest_but_not_the_body() {
        let inbox = BranchInbox::default();
        let mut headers = HeaderMap::new();
        headers.insert("x-document-request-trace-id", "req-1".parse().unwrap());
        headers.insert("webhook-id", "msg_1".parse().unwrap());
        inbox.take(&headers, b"secret body");
        let json: serde_json::Value = serde_json::from_str(&inbox.json()).unwrap();
        let first = &json["packages"][0];
        assert_eq!(first["requestId"], "req-1");
        assert_eq!(first["webhookId"], "msg_1");
        assert_eq!(first["signed"], false);
        assert_eq!(first["size"], 11);
        assert_ne!(first["digest"], format!("{:016x}", fnv1a(b"other body")));
        assert!(!inbox.json().contains("secret"));
    }
}
