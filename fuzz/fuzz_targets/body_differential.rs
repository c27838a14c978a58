//! The gateway's body parser against `serde_json::Value` on the same bytes: when serde_json
//! rejects, so does the gateway; when both accept, every field the gateway reads has the
//! value serde_json decodes; a member name given twice is always rejected.
#![no_main]

use diia_gateway::request::JsonBody;
use libfuzzer_sys::fuzz_target;
use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};

/// Whether the bytes are one JSON object naming some member twice (names compared after
/// JSON decoding, by serde_json).
fn has_duplicate_names(data: &[u8]) -> bool {
    struct Names;
    impl<'de> Visitor<'de> for Names {
        type Value = bool;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("an object")
        }
        fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<bool, M::Error> {
            let mut seen = std::collections::HashSet::new();
            let mut duplicate = false;
            while let Some((name, _)) = map.next_entry::<String, IgnoredAny>()? {
                duplicate |= !seen.insert(name);
            }
            Ok(duplicate)
        }
    }
    let mut deserializer = serde_json::Deserializer::from_slice(data);
    deserializer.deserialize_map(Names).unwrap_or(false)
}

fuzz_target!(|data: &[u8]| {
    let reference = serde_json::from_slice::<serde_json::Value>(data);
    let ours = JsonBody::parse(data);
    match (&reference, &ours) {
        (Err(_), Ok(_)) => panic!("the gateway accepted what serde_json rejects"),
        (Ok(serde_json::Value::Object(_)), Err(_)) => {
            assert!(has_duplicate_names(data), "a valid object without duplicates was refused");
        }
        (Ok(serde_json::Value::Object(object)), Ok(body)) => {
            assert!(!has_duplicate_names(data), "duplicate names accepted");
            let fields = body.decoded_fields();
            assert_eq!(fields.len(), object.len());
            for (name, value) in fields {
                let expected = &object[&name];
                match value {
                    Ok(text) => assert_eq!(expected.as_str(), Some(text.as_str())),
                    Err(raw) => {
                        let parsed: serde_json::Value = serde_json::from_str(&raw).expect("raw");
                        assert_eq!(&parsed, expected);
                    }
                }
            }
        }
        (Ok(_), Ok(_)) => panic!("the gateway accepted a body that is not an object"),
        (Ok(_), Err(_)) | (Err(_), Err(_)) => {}
    }
});
