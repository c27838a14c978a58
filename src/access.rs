//! The access log: one line per request, queued straight to the [`LogSink`]
//! when the binary installed one (formatted by hand into a per-thread buffer: every value
//! is a static label, a number, a hex fingerprint or an address, so nothing needs
//! escaping), else through `tracing` like every other log line (tests, library users).
//! Either way it is on only when `diia_gateway::access` is enabled at `info` by the filter.

use std::cell::RefCell;
use std::net::IpAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::config::LogFormat;
use crate::keys::Fingerprint;
use crate::logsink::LogSink;

/// What the access log says about one request: labels, numbers and a keyed fingerprint.
pub struct AccessLine {
    /// The endpoint label, or `none`.
    pub endpoint: &'static str,
    /// The status sent.
    pub status: u16,
    /// The outcome label.
    pub outcome: &'static str,
    /// The `gatewayCode`, or `-`.
    pub code: &'static str,
    /// Time spent, in microseconds.
    pub micros: u64,
    /// The barcode's keyed fingerprint, if the request carried one.
    pub barcode: Option<Fingerprint>,
    /// The client address.
    pub peer: IpAddr,
}

/// The fast path: lines formatted here and queued to the log sink.
pub struct AccessLog {
    sink: LogSink,
    format: LogFormat,
}

thread_local! {
    static LINE: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(256));
    /// `YYYY-MM-DDTHH:MM:SS.` of the current second, rendered once per second.
    static SECOND: RefCell<(u64, Vec<u8>)> = const { RefCell::new((u64::MAX, Vec::new())) };
}

impl AccessLog {
    /// Access lines in `format` into `sink`.
    #[must_use]
    pub fn new(sink: LogSink, format: LogFormat) -> Self {
        Self { sink, format }
    }

    /// Formats and queues one line (never blocks; a full queue drops and counts it).
    pub fn write(&self, line: &AccessLine) {
        LINE.with_borrow_mut(|buffer| {
            buffer.clear();
            render(line, self.format, SystemTime::now(), buffer);
            self.sink.push(buffer);
        });
    }
}

/// One field's value, as the line shows it.
enum Field<'a> {
    /// A label, quoted in JSON.
    Label(&'a [u8]),
    /// A number, bare.
    Number(u64),
    /// An address, quoted in JSON.
    Address(IpAddr),
}

/// One line, byte by byte: every value is a static label, a number, hex or an address,
/// so nothing needs escaping (and no `fmt` machinery runs per request).
fn render(line: &AccessLine, format: LogFormat, now: SystemTime, out: &mut Vec<u8>) {
    let hex = line.barcode.map(|fingerprint| fingerprint.hex());
    let fields = [
        ("endpoint", Field::Label(line.endpoint.as_bytes())),
        ("status", Field::Number(u64::from(line.status))),
        ("outcome", Field::Label(line.outcome.as_bytes())),
        ("code", Field::Label(line.code.as_bytes())),
        ("micros", Field::Number(line.micros)),
        (
            "barcode",
            Field::Label(hex.as_ref().map_or(&b"-"[..], |hex| &hex[..])),
        ),
        ("peer", Field::Address(line.peer)),
    ];
    let json = matches!(format, LogFormat::Json);
    if json {
        out.extend_from_slice(b"{\"timestamp\":\"");
        timestamp(now, out);
        out.extend_from_slice(b"\",\"level\":\"INFO\",\"target\":\"diia_gateway::access\"");
    } else {
        timestamp(now, out);
        out.extend_from_slice(b"  INFO diia_gateway::access:");
    }
    let mut numbers = itoa::Buffer::new();
    for (name, value) in fields {
        let quoted = json && !matches!(value, Field::Number(_));
        out.extend_from_slice(if json { b",\"" } else { b" " });
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(if json { b"\":" } else { b"=" });
        if quoted {
            out.push(b'"');
        }
        match value {
            Field::Label(label) => out.extend_from_slice(label),
            Field::Number(number) => out.extend_from_slice(numbers.format(number).as_bytes()),
            Field::Address(peer) => address(peer, out),
        }
        if quoted {
            out.push(b'"');
        }
    }
    out.extend_from_slice(if json { b"}\n" } else { b"\n" });
}

/// RFC 3339 in UTC with microseconds, as `tracing`'s formatter writes it.
fn timestamp(now: SystemTime, out: &mut Vec<u8>) {
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    SECOND.with_borrow_mut(|(second, prefix)| {
        if *second != since.as_secs() {
            *second = since.as_secs();
            prefix.clear();
            let whole = humantime::format_rfc3339_seconds(now).to_string();
            prefix.extend_from_slice(whole.trim_end_matches('Z').as_bytes());
            prefix.push(b'.');
        }
        out.extend_from_slice(prefix);
    });
    let micros = since.subsec_micros();
    for place in [100_000, 10_000, 1_000, 100, 10, 1] {
        // Each digit is below 10: the cast cannot truncate.
        #[allow(clippy::cast_possible_truncation)]
        out.push(b'0' + (micros / place % 10) as u8);
    }
    out.push(b'Z');
}

/// An address as `Display` writes it; IPv4 (the common case) without `fmt`.
fn address(peer: IpAddr, out: &mut Vec<u8>) {
    match peer {
        IpAddr::V4(v4) => {
            let mut digits = itoa::Buffer::new();
            for (index, octet) in v4.octets().into_iter().enumerate() {
                if index > 0 {
                    out.push(b'.');
                }
                out.extend_from_slice(digits.format(octet).as_bytes());
            }
        }
        IpAddr::V6(v6) => {
            use std::io::Write;
            let _ = write!(out, "{v6}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(peer: &str) -> AccessLine {
        AccessLine {
            endpoint: "document_identification",
            status: 200,
            outcome: "hit",
            code: "-",
            micros: 1234,
            barcode: None,
            peer: peer.parse().expect("address"),
        }
    }

    #[test]
    fn json_lines_parse_and_carry_every_field() {
        let mut out = Vec::new();
        let now = UNIX_EPOCH + std::time::Duration::from_micros(1_764_248_485_000_042);
        render(&line("10.0.0.7"), LogFormat::Json, now, &mut out);
        assert_eq!(out.last(), Some(&b'\n'));
        let value: serde_json::Value = serde_json::from_slice(&out).expect("JSON");
        assert_eq!(value["timestamp"], "2025-11-27T13:01:25.000042Z");
        assert_eq!(value["status"], 200);
        assert_eq!(value["micros"], 1234);
        assert_eq!(value["barcode"], "-");
        assert_eq!(value["peer"], "10.0.0.7");
        assert_eq!(value["target"], "diia_gateway::access");
    }

    #[test]
    fn text_lines_match_display_for_both_address_families() {
        for peer in ["192.168.255.1", "::1", "2001:db8::7"] {
            let mut out = Vec::new();
            render(&line(peer), LogFormat::Text, SystemTime::now(), &mut out);
            let text = String::from_utf8(out).expect("utf-8");
            let expected = format!(" peer={}\n", peer.parse::<IpAddr>().expect("address"));
            assert!(text.ends_with(&expected), "{text}");
            assert!(text.contains("  INFO diia_gateway::access: endpoint=document_identification status=200 outcome=hit code=- micros=1234 barcode=- "));
        }
    }
}
