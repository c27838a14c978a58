//! Any bytes into the barcode parser: no panic, and whatever parses re-renders to itself.
#![no_main]

use diia_gateway::barcode::Barcode;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(barcode) = Barcode::parse_bytes(data) {
        assert_eq!(barcode.digits().as_bytes(), data);
    }
});
