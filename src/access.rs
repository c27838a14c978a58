//! The access log: one line per request, written straight into the batched [`LogSink`]
//! when the binary installed one (formatted by hand into a per-thread buffer: every value
//! is a static label, a number, a hex fingerprint or an address, so nothing needs
//! escaping), else through `tracing` like every other log line (tests, library users).
//! Either way it is on only when `diia_gateway::access` is enabled at `info` by the filter.

use std::cell::RefCell;
use std::fmt;
use std::io::Write;
use std::net::IpAddr;

use crate::config::LogFormat;
use crate::logsink::LogSink;

/// What the access log says about one request: labels, numbers and a keyed fingerprint.
pub struct AccessLine<'a> {
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
    /// The barcode's keyed fingerprint, or `-`.
    pub barcode: &'a dyn fmt::Display,
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
}

impl AccessLog {
    /// Access lines in `format` into `sink`.
    #[must_use]
    pub fn new(sink: LogSink, format: LogFormat) -> Self {
        Self { sink, format }
    }

    /// Formats and queues one line (never blocks; a full queue drops and counts it).
    pub fn write(&self, line: &AccessLine<'_>) {
        LINE.with_borrow_mut(|buffer| {
            buffer.clear();
            let now = humantime::format_rfc3339_micros(std::time::SystemTime::now());
            let written = match self.format {
                LogFormat::Json => writeln!(
                    buffer,
                    r#"{{"timestamp":"{now}","level":"INFO","target":"diia_gateway::access","endpoint":"{}","status":{},"outcome":"{}","code":"{}","micros":{},"barcode":"{}","peer":"{}"}}"#,
                    line.endpoint, line.status, line.outcome, line.code, line.micros, line.barcode, line.peer
                ),
                LogFormat::Text => writeln!(
                    buffer,
                    "{now}  INFO diia_gateway::access: endpoint={} status={} outcome={} code={} micros={} barcode={} peer={}",
                    line.endpoint, line.status, line.outcome, line.code, line.micros, line.barcode, line.peer
                ),
            };
            if written.is_ok() {
                self.sink.push(buffer);
            }
        });
    }
}
