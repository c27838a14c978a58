//! Property tests over hostile input, run with the normal suite: the barcode parser and
//! body parsing never panic, accept exactly what they should, and keys ignore field order.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use diia_gateway::barcode::Barcode;
use diia_gateway::keys::HashKey;
use diia_gateway::request::JsonBody;
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, .. ProptestConfig::default() })]

    #[test]
    fn barcode_parser_never_panics(input in any::<Vec<u8>>()) {
        let _ = Barcode::parse_bytes(&input);
    }

    #[test]
    fn every_issued_barcode_parses(base in 100_000_000_000u64..=999_999_999_999) {
        let barcode = Barcode::from_base(base).unwrap();
        prop_assert_eq!(Barcode::parse(&barcode.digits()), Ok(barcode));
    }

    #[test]
    fn any_single_digit_error_is_caught(base in 100_000_000_000u64..=999_999_999_999, position in 1usize..13, delta in 1u8..10) {
        // EAN-13 detects every single-digit substitution (position 0 stays non-zero here).
        let mut digits = Barcode::from_base(base).unwrap().digits().into_bytes();
        digits[position] = b'0' + (digits[position] - b'0' + delta) % 10;
        prop_assert!(Barcode::parse_bytes(&digits).is_err());
    }

    #[test]
    fn body_parser_never_panics(input in any::<Vec<u8>>()) {
        if let Ok(body) = JsonBody::parse(&input) {
            let _ = body.branch_id();
            let _ = body.barcode();
            let _ = body.request_id();
            let _ = body.sharing_subject();
        }
    }

    #[test]
    fn json_like_bodies_never_panic(
        fields in prop::collection::vec(("[a-zA-Z]{1,10}", prop_oneof![
            "\"[ -~]{0,20}\"".prop_map(|s| s),
            any::<i64>().prop_map(|n| n.to_string()),
            Just("null".to_owned()),
            Just("[1,{\"a\":2}]".to_owned()),
        ]), 0..12)
    ) {
        let text = format!("{{{}}}", fields.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect::<Vec<_>>().join(","));
        if let Ok(body) = JsonBody::parse(text.as_bytes()) {
            let _ = body.branch_id();
            let _ = body.barcode();
            let _ = body.sharing_subject();
        }
    }

    #[test]
    fn field_order_never_changes_the_key(
        mut fields in prop::collection::btree_map("[a-z]{1,8}", "[a-z0-9]{0,12}", 1..8),
        seed in any::<u64>()
    ) {
        let secrets = HashKey::fixed([1; 16]);
        let mut pairs: Vec<(String, String)> = std::mem::take(&mut fields).into_iter().collect();
        let render = |pairs: &[(String, String)]| {
            format!("{{{}}}", pairs.iter().map(|(k, v)| format!("\"{k}\":\"{v}\"")).collect::<Vec<_>>().join(","))
        };
        let key = |text: &str| {
            let mut builder = secrets.key("t");
            JsonBody::parse(text.as_bytes()).unwrap().key_into(&mut builder);
            builder.finish()
        };
        let sorted = key(&render(&pairs));
        let mut rng = seed;
        for i in (1..pairs.len()).rev() {
            rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            pairs.swap(i, (rng >> 33) as usize % (i + 1));
        }
        prop_assert_eq!(sorted, key(&render(&pairs)));
    }
}

/// The gateway's parser against `serde_json::Value` on the same bytes (the same check as
/// the `body_differential` fuzz target): rejected by serde_json → rejected here; accepted
/// by both → every field decodes to serde_json's value; a name given twice → rejected.
fn agrees_with_serde_json(data: &[u8]) -> Result<(), String> {
    let reference = serde_json::from_slice::<serde_json::Value>(data);
    match (reference, JsonBody::parse(data)) {
        (Err(_), Ok(_)) => Err("accepted what serde_json rejects".to_owned()),
        (Ok(serde_json::Value::Object(object)), Ok(body)) => {
            let fields = body.decoded_fields();
            if fields.len() != object.len() {
                return Err("a name given twice was accepted".to_owned());
            }
            for (name, value) in fields {
                let expected = &object[&name];
                let same = match &value {
                    Ok(text) => expected.as_str() == Some(text.as_str()),
                    Err(raw) => {
                        serde_json::from_str::<serde_json::Value>(raw).ok().as_ref()
                            == Some(expected)
                    }
                };
                if !same {
                    return Err(format!("{name}: {value:?} vs {expected}"));
                }
            }
            Ok(())
        }
        (Ok(serde_json::Value::Object(_)), Err(_)) => {
            // Only duplicates may be refused; serde_json keeps the last, so a shorter map
            // than the number of members shows them.
            let members = data.iter().filter(|b| **b == b':').count();
            if members == 0 {
                Err("refused a valid object".to_owned())
            } else {
                Ok(())
            }
        }
        (Ok(_), Ok(_)) => Err("accepted a non-object".to_owned()),
        (Ok(_) | Err(_), Err(_)) => Ok(()),
    }
}

#[test]
fn edge_cases_agree_with_serde_json() {
    for body in [
        &br#"{"a":1e400}"#[..],
        br#"{"a":"\ud800"}"#,
        br#"{"a":"\udc00\ud800"}"#,
        br#"{"\u0062ranchId":"x","barcode":"3389798072091"}"#,
        br#"{"a":"x\u0000y"}"#,
        br#"{"a":-0,"b":1.5e-10,"c":[1,{"d":null}],"e":true}"#,
        br#"{"a":"\"\\\/\b\f\n\r\t"}"#,
        b"{\"a\":\"\xff\"}",
        br#"{"a":1,}"#,
        br#"{"a":01}"#,
        b"\xef\xbb\xbf{}",
    ] {
        agrees_with_serde_json(body)
            .unwrap_or_else(|problem| panic!("{}: {problem}", String::from_utf8_lossy(body)));
    }
    // Duplicates: serde_json keeps the last one, the gateway refuses.
    assert!(JsonBody::parse(br#"{"a":1,"\u0061":2}"#).is_err());
}

fn json_string() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-zA-Z0-9 _/:.-]{0,12}".prop_map(|s| format!("\"{s}\"")),
        "[a-z]{0,4}".prop_map(|s| format!("\"\\u0041{s}\\/\\n\"")),
        Just("\"\\u041a\\u0438\\u0457\\u0432\"".to_owned()),
        Just("\"\\ud83d\\ude00\"".to_owned()),
        Just("\"\\ud800\"".to_owned()),
    ]
}

fn json_value() -> impl Strategy<Value = String> {
    prop_oneof![
        json_string(),
        any::<i64>().prop_map(|n| n.to_string()),
        Just("1e400".to_owned()),
        Just("null".to_owned()),
        Just("[1,\"a\",{}]".to_owned()),
        Just("{\"x\":[true]}".to_owned()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, .. ProptestConfig::default() })]

    #[test]
    fn body_parser_agrees_with_serde_json(
        members in proptest::collection::vec(
            (prop_oneof![json_string(), Just("\"branchId\"".to_owned()), Just("\"branch\\u0049d\"".to_owned())], json_value()),
            0..6,
        ),
        spaces in any::<bool>(),
    ) {
        let separator = if spaces { ", " } else { "," };
        let body = format!(
            "{{{}}}",
            members
                .iter()
                .map(|(name, value)| format!("{name}:{value}"))
                .collect::<Vec<_>>()
                .join(separator)
        );
        prop_assert!(agrees_with_serde_json(body.as_bytes()).is_ok(), "{}: {:?}", body, agrees_with_serde_json(body.as_bytes()));
    }

    #[test]
    fn random_bytes_agree_with_serde_json(input in any::<Vec<u8>>()) {
        prop_assert!(agrees_with_serde_json(&input).is_ok());
    }
}
