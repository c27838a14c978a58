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
