//! The gateway's own HTTP/1.1 head parser against hyper's on generated heads: same method,
//! target and body framing, or the loop hands the connection to hyper (the same check as
//! the fuzz target `fuzz/fuzz_targets/h1_differential.rs`, so CI runs it without
//! cargo-fuzz).

mod reference;

use proptest::prelude::*;

/// The bound the loop uses by default (`server.max_head_bytes`).
const MAX_HEAD_BYTES: usize = 8192;

fn check(bytes: &[u8]) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let seen = runtime.block_on(reference::hyper_reads(bytes));
    reference::agree(
        bytes,
        diia_gateway::h1::recognise(bytes, MAX_HEAD_BYTES),
        seen.as_ref(),
    )
}

/// Header lines that sit on the seam: framing, hop-by-hop and malformed ones.
fn header() -> impl Strategy<Value = String> {
    let names = prop_oneof![
        Just("Content-Length"),
        Just("content-length"),
        Just("CONTENT-LENGTH"),
        Just("Transfer-Encoding"),
        Just("transfer-encoding"),
        Just("Connection"),
        Just("Expect"),
        Just("Upgrade"),
        Just("Host"),
        Just("Authorization"),
        Just("Content-Type"),
        Just("X-Forwarded-For"),
        Just("Content-Length "),
        Just(" Content-Length"),
        Just("Content_Length"),
        Just("X-Any"),
    ];
    let values = prop_oneof![
        Just("0".to_owned()),
        Just("5".to_owned()),
        Just("05".to_owned()),
        Just("+5".to_owned()),
        Just("-1".to_owned()),
        Just("5, 5".to_owned()),
        Just("5,6".to_owned()),
        Just(" 5 ".to_owned()),
        Just("5\t".to_owned()),
        Just("".to_owned()),
        Just("18446744073709551615".to_owned()),
        Just("18446744073709551616".to_owned()),
        Just("99999999999999999999".to_owned()),
        Just("0x5".to_owned()),
        Just("chunked".to_owned()),
        Just("Chunked".to_owned()),
        Just("gzip, chunked".to_owned()),
        Just("chunked, gzip".to_owned()),
        Just("identity".to_owned()),
        Just("close".to_owned()),
        Just("keep-alive".to_owned()),
        Just("Keep-Alive, Upgrade".to_owned()),
        Just("100-continue".to_owned()),
        Just("h2c".to_owned()),
        Just("example.test".to_owned()),
        Just("a\u{7f}b".to_owned()),
        Just("caf\u{e9}".to_owned()),
        "[ -~]{0,12}",
    ];
    (names, values).prop_map(|(name, value)| format!("{name}:{value}"))
}

fn head() -> impl Strategy<Value = Vec<u8>> {
    let method = prop_oneof![
        Just("GET"),
        Just("POST"),
        Just("PUT"),
        Just("DELETE"),
        Just("PATCH"),
        Just("HEAD"),
        Just("OPTIONS"),
        Just("CONNECT"),
        Just("get"),
        Just("POST "),
        Just("PRI"),
    ];
    let target = prop_oneof![
        Just("/".to_owned()),
        Just("/api/v1/auth/token".to_owned()),
        Just("*".to_owned()),
        Just("http://example.test/x".to_owned()),
        Just("//x".to_owned()),
        Just("/a?b=c&d".to_owned()),
        Just("/%zz".to_owned()),
        "/[!-~]{0,16}",
    ];
    let version = prop_oneof![
        Just("HTTP/1.1"),
        Just("HTTP/1.0"),
        Just("HTTP/2.0"),
        Just("http/1.1"),
        Just("HTTP/1.1 "),
    ];
    let eol = prop_oneof![Just("\r\n"), Just("\n")];
    let fold = prop_oneof![4 => Just(""), 1 => Just("\r\n folded")];
    (
        method,
        target,
        version,
        eol,
        proptest::collection::vec((header(), fold), 0..5),
        proptest::collection::vec(any::<u8>(), 0..12),
    )
        .prop_map(|(method, target, version, eol, headers, body)| {
            let mut bytes = format!("{method} {target} {version}{eol}").into_bytes();
            for (line, fold) in headers {
                bytes.extend_from_slice(line.as_bytes());
                bytes.extend_from_slice(fold.as_bytes());
                bytes.extend_from_slice(eol.as_bytes());
            }
            bytes.extend_from_slice(eol.as_bytes());
            bytes.extend_from_slice(&body);
            bytes
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn the_loop_and_hyper_read_a_head_alike_or_the_loop_hands_over(bytes in head()) {
        check(&bytes).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn arbitrary_bytes_after_a_request_line_read_alike(tail in proptest::collection::vec(any::<u8>(), 0..64)) {
        let mut bytes = b"POST /api/v1/auth/token HTTP/1.1\r\n".to_vec();
        bytes.extend_from_slice(&tail);
        check(&bytes).map_err(TestCaseError::fail)?;
    }
}

/// Seams fixed by hand: each either agrees or is handed over.
#[test]
fn known_framing_edges_read_alike() {
    for raw in [
        &b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello"[..],
        b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
        b"POST / HTTP/1.1\r\nContent-Length: 5, 5\r\n\r\nhello",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\nhello",
        b"GET / HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\nHost: x\n\n",
        b"GET / HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n",
        b"GET /a%zz HTTP/1.1\r\n\r\n",
    ] {
        check(raw).unwrap_or_else(|disagreement| panic!("{disagreement}"));
    }
}
