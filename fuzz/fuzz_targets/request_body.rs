//! Any bytes as a request body: parsing and every field accessor never panic, and the
//! cache key is a pure function of the body.
#![no_main]

use diia_gateway::keys::HashKey;
use diia_gateway::request::{JsonBody, status_query};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(body) = JsonBody::parse(data) {
        let _ = body.branch_id();
        let _ = body.barcode();
        let _ = body.request_id();
        let _ = body.offer_id();
        let _ = body.sharing_subject();
        let keys = HashKey::fixed([0; 16]);
        let (mut a, mut b) = (keys.key("fuzz"), keys.key("fuzz"));
        body.key_into(&mut a);
        body.key_into(&mut b);
        assert!(a.finish() == b.finish());
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = status_query(Some(text));
    }
});
