//! Any bytes into the gateway's own HTTP/1.1 head parser and into hyper's: when the loop
//! serves a request itself, hyper reads the same method, target and body framing; when it
//! answers 400 itself, hyper refuses too; otherwise it hands the bytes to hyper. The same
//! check runs on generated heads in `tests/h1_differential` (CI, without cargo-fuzz).
#![no_main]

#[path = "../../tests/h1_differential/reference.rs"]
mod reference;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a runtime");
    let seen = runtime.block_on(reference::hyper_reads(data));
    let recognised = diia_gateway::h1::recognise(data, 8192);
    if let Err(disagreement) = reference::agree(data, recognised, seen.as_ref()) {
        panic!("{disagreement}");
    }
});
