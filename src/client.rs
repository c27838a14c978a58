//! Who the client is, for the access log and every per-client budget, and how many
//! connections one client holds.
//!
//! The client is the TCP peer, unless that peer is a trusted load balancer
//! (`server.trusted_proxies`); then it is the address the balancer vouches for:
//! - with `server.proxy_protocol`, the source address of the PROXY protocol header (v1 or
//!   v2, parsed by `ppp`) that must open every connection from it, read before TLS and
//!   within `header_read_timeout` ([`Clients::accept`]); a `LOCAL` command or an
//!   `UNKNOWN`/unspecified family (the balancer's own health checks) leaves the peer;
//! - otherwise, per request, the rightmost address of `server.forwarded_header`
//!   (`X-Forwarded-For` or RFC 7239 `Forwarded`, every line of it as one list) that is not
//!   itself a trusted proxy ([`Clients::client_of`], asked by the connection layer for each
//!   request, before the handler runs). An entry that is no address (`unknown`,
//!   an obfuscated name, garbage) ends the walk, as does the list's end: the client is
//!   then the last trusted hop reached (the peer when there is none).
//!
//! Invariant: **a client never chooses its own identity.** Only a trusted peer's word is
//! taken, and only the part of it that trusted hops wrote: entries are read from the
//! right and the first untrusted one is the client, so whatever a client wrote to the
//! left of it is never read. From any other peer the headers are not even looked at, and a
//! PROXY header is no HTTP request: the connection is answered 400 and closed, its
//! address never read.
//!
//! Connections are counted per client (`server.max_connections_per_client`), IPv6 clients
//! by `limits.ipv6_prefix` ([`aggregate`]). A trusted proxy without the PROXY protocol
//! carries many clients on its connections, which are therefore not capped per client.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use bytes::{Buf, BytesMut};
use http::header::{self, HeaderName};
use ipnet::IpNet;
use ppp::{HeaderResult, PartialResult};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::config::ForwardedHeader;
pub use crate::error::Refused;
use crate::head::{Field, X_FORWARDED_FOR};
use crate::metrics::Metrics;

/// The most bytes read while waiting for a PROXY header to complete (v1 is at most 107;
/// v2 is 16 plus addresses and a few TLVs).
const MAX_PROXY_HEADER: usize = 4096;

/// `ip` as the budgets count it: IPv4 (and IPv4-mapped IPv6) as is, IPv6 with only its
/// first `ipv6_prefix` bits (at most 128) kept.
#[must_use]
pub fn aggregate(ip: IpAddr, ipv6_prefix: u8) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => {
            let bits = u32::from(ipv6_prefix.min(128));
            let mask = u128::MAX.checked_shl(128 - bits).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask))
        }
    }
}

/// Who the clients are: trusted proxies, how they name clients, and the connections each
/// client holds. Shared by every accept loop of the branch listener.
pub struct Clients {
    trusted: Box<[IpNet]>,
    proxy_protocol: bool,
    header: Field,
    connections: Arc<Connections>,
    metrics: Arc<Metrics>,
}

/// A connection that may be served: its client, its place in the per-client count, and
/// the bytes read past the PROXY header.
#[derive(Debug)]
pub struct Accepted {
    /// The client (the peer, or the PROXY header's source).
    pub client: SocketAddr,
    /// Held for the connection's life (`None`: not capped, a trusted proxy's own).
    pub slot: Option<ConnectionSlot>,
    /// Bytes read after the PROXY header: the start of the TLS or HTTP stream.
    pub read: BytesMut,
}

impl Clients {
    /// The policy from checked settings.
    #[must_use]
    pub fn new(
        trusted: Vec<IpNet>,
        proxy_protocol: bool,
        header: ForwardedHeader,
        max_connections_per_client: usize,
        ipv6_prefix: u8,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            trusted: trusted.into_boxed_slice(),
            proxy_protocol,
            header: match header {
                ForwardedHeader::XForwardedFor => Field::XForwardedFor,
                ForwardedHeader::Forwarded => Field::Forwarded,
            },
            connections: Arc::new(Connections {
                max: max_connections_per_client.max(1),
                ipv6_prefix: AtomicU8::new(ipv6_prefix),
                open: Mutex::new(HashMap::new()),
            }),
            metrics,
        }
    }

    /// Counts a connection closed at accept (`diia_gateway_connections_refused_total`).
    pub fn refused(&self, refused: &Refused) {
        self.metrics.connection_refused(refused);
    }

    /// Whether `ip` is a trusted proxy.
    #[must_use]
    pub fn trusts(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.trusted.iter().any(|net| net.contains(&ip))
    }

    /// A reload's `limits.ipv6_prefix`, for connections counted from now on.
    pub fn set_ipv6_prefix(&self, prefix: u8) {
        self.connections
            .ipv6_prefix
            .store(prefix, Ordering::Relaxed);
    }

    /// Connection start: reads the PROXY header a trusted proxy must send (when
    /// `server.proxy_protocol` is on), then counts the connection against its client.
    /// The caller bounds the whole by `header_read_timeout`.
    pub async fn accept<S: AsyncRead + Unpin>(
        &self,
        io: &mut S,
        peer: SocketAddr,
    ) -> Result<Accepted, Refused> {
        let trusted = self.trusts(peer.ip());
        let (client, read) = if trusted && self.proxy_protocol {
            read_proxy_header(io, peer).await?
        } else {
            (peer, BytesMut::new())
        };
        // A trusted proxy's own connections carry many clients each: not capped.
        let slot = if trusted && !self.proxy_protocol {
            None
        } else {
            Some(
                Connections::admit(&self.connections, client.ip())
                    .ok_or(Refused::TooManyConnections)?,
            )
        };
        Ok(Accepted { client, slot, read })
    }

    /// Whether the requests of a connection from `peer` name their client in the
    /// forwarding header: `peer` is a trusted proxy and the PROXY protocol is off. For any
    /// other peer the headers are not even looked at.
    #[must_use]
    pub fn reads_forwarding(&self, peer: IpAddr) -> bool {
        !self.proxy_protocol && !self.trusted.is_empty() && self.trusts(peer)
    }

    /// Which header names the client (`server.forwarded_header`).
    #[must_use]
    pub fn forwarding_field(&self) -> Field {
        self.header
    }

    /// [`Clients::forwarding_field`] as a header name (for a `HeaderMap`).
    #[must_use]
    pub fn forwarding_header(&self) -> &'static HeaderName {
        match self.header {
            Field::Forwarded => &header::FORWARDED,
            _ => &X_FORWARDED_FOR,
        }
    }

    /// The client of one request from `peer`, a trusted proxy
    /// ([`Clients::reads_forwarding`]): the rightmost address in the forwarding header's
    /// lines (`last_first`: the last line first) that is not a trusted proxy. Reads the
    /// values in place; allocates nothing. An address taken from the header gets port 0
    /// (nothing reads it).
    #[must_use]
    pub fn client_of<'a>(
        &self,
        peer: SocketAddr,
        last_first: impl Iterator<Item = &'a [u8]>,
    ) -> SocketAddr {
        let client = self.rightmost_untrusted(peer.ip(), last_first);
        if client == peer.ip() {
            peer
        } else {
            SocketAddr::new(client, 0)
        }
    }

    /// Walks the forwarding list from its right end (`lines` last line first).
    fn rightmost_untrusted<'a>(
        &self,
        peer: IpAddr,
        lines: impl Iterator<Item = &'a [u8]>,
    ) -> IpAddr {
        let mut reached = peer;
        for line in lines {
            // Commas never occur inside an address or a `for=` value, so a plain split
            // is exact, and an unbalanced quote a client wrote cannot swallow entries a
            // proxy appended after it.
            for entry in line.rsplit(|&byte| byte == b',') {
                let entry = entry.trim_ascii();
                if entry.is_empty() {
                    continue;
                }
                let node = match self.header {
                    Field::Forwarded => forwarded_for(entry),
                    _ => Some(entry),
                };
                let Some(ip) = node.and_then(node_address) else {
                    return reached;
                };
                if !self.trusts(ip) {
                    return ip;
                }
                reached = ip;
            }
        }
        reached
    }
}

/// The `for=` value of one RFC 7239 `Forwarded` element (`for=…;proto=…;by=…`).
fn forwarded_for(element: &[u8]) -> Option<&[u8]> {
    element.split(|&byte| byte == b';').find_map(|pair| {
        let pair = pair.trim_ascii();
        let at = pair.iter().position(|&byte| byte == b'=')?;
        let (name, value) = (&pair[..at], &pair[at + 1..]);
        name.trim_ascii()
            .eq_ignore_ascii_case(b"for")
            .then(|| value.trim_ascii())
    })
}

/// The address in one node: `192.0.2.1`, `192.0.2.1:4711`, `2001:db8::1`,
/// `[2001:db8::1]`, `[2001:db8::1]:4711`, each optionally in double quotes. `unknown`,
/// obfuscated names (`_hidden`) and anything else: `None`.
fn node_address(node: &[u8]) -> Option<IpAddr> {
    let node = match node {
        [b'"', inner @ .., b'"'] => inner,
        _ => node,
    };
    let text = std::str::from_utf8(node).ok()?;
    let ip = if let Some(rest) = text.strip_prefix('[') {
        let (address, after) = rest.split_once(']')?;
        if !(after.is_empty() || port(after.strip_prefix(':')?)) {
            return None;
        }
        IpAddr::V6(address.parse().ok()?)
    } else if let Ok(ip) = text.parse::<IpAddr>() {
        ip
    } else {
        let (address, after) = text.split_once(':')?;
        if !port(after) {
            return None;
        }
        IpAddr::V4(address.parse().ok()?)
    };
    Some(ip.to_canonical())
}

/// A TCP port: 1 to 5 digits, at most 65535.
fn port(text: &str) -> bool {
    (1..=5).contains(&text.len())
        && text.bytes().all(|b| b.is_ascii_digit())
        && text.parse::<u16>().is_ok()
}

/// Reads one PROXY protocol header (v1 or v2) from the start of `io`: the client it
/// names (the peer for `LOCAL` and unknown families) and the bytes read past it.
async fn read_proxy_header<S: AsyncRead + Unpin>(
    io: &mut S,
    peer: SocketAddr,
) -> Result<(SocketAddr, BytesMut), Refused> {
    let mut read = BytesMut::with_capacity(536);
    loop {
        let parsed = HeaderResult::parse(&read);
        if parsed.is_incomplete() {
            if read.len() >= MAX_PROXY_HEADER {
                return Err(Refused::ProxyHeader("longer than 4096 bytes"));
            }
            read.reserve(536);
            match io.read_buf(&mut read).await {
                Ok(n) if n > 0 => continue,
                Ok(_) => return Err(Refused::ProxyHeader("closed before a whole header")),
                Err(_) => return Err(Refused::ProxyHeader("read failed")),
            }
        }
        let (length, source) = match parsed {
            HeaderResult::V1(Ok(header)) => (
                header.header.len(),
                match header.addresses {
                    ppp::v1::Addresses::Tcp4(a) => {
                        Some(SocketAddr::from((a.source_address, a.source_port)))
                    }
                    ppp::v1::Addresses::Tcp6(a) => {
                        Some(SocketAddr::from((a.source_address, a.source_port)))
                    }
                    ppp::v1::Addresses::Unknown => None,
                },
            ),
            HeaderResult::V2(Ok(header)) => (
                header.len(),
                match (header.command, header.addresses) {
                    (ppp::v2::Command::Proxy, ppp::v2::Addresses::IPv4(a)) => {
                        Some(SocketAddr::from((a.source_address, a.source_port)))
                    }
                    (ppp::v2::Command::Proxy, ppp::v2::Addresses::IPv6(a)) => {
                        Some(SocketAddr::from((a.source_address, a.source_port)))
                    }
                    (
                        ppp::v2::Command::Local,
                        ppp::v2::Addresses::IPv4(_)
                        | ppp::v2::Addresses::IPv6(_)
                        | ppp::v2::Addresses::Unix(_)
                        | ppp::v2::Addresses::Unspecified,
                    )
                    | (
                        ppp::v2::Command::Proxy,
                        ppp::v2::Addresses::Unix(_) | ppp::v2::Addresses::Unspecified,
                    ) => None,
                },
            ),
            HeaderResult::V1(Err(_)) | HeaderResult::V2(Err(_)) => {
                return Err(Refused::ProxyHeader("not a PROXY protocol header"));
            }
        };
        read.advance(length.min(read.len()));
        let client = source.map_or(peer, |source| {
            SocketAddr::new(source.ip().to_canonical(), source.port())
        });
        return Ok((client, read));
    }
}

/// Open connections per client. A plain mutex over a map: it is taken twice per
/// connection (accept and close), never across an `.await`, for a hash-map update; next
/// to the accept, PROXY read and TLS handshake around it that costs nothing measurable,
/// and no request ever touches it. Entries leave at zero, so the map holds at most one
/// entry per open connection.
#[derive(Debug)]
struct Connections {
    max: usize,
    ipv6_prefix: AtomicU8,
    open: Mutex<HashMap<IpAddr, usize>>,
}

impl Connections {
    fn admit(this: &Arc<Self>, client: IpAddr) -> Option<ConnectionSlot> {
        let key = aggregate(client, this.ipv6_prefix.load(Ordering::Relaxed));
        let mut open = this.open.lock().unwrap_or_else(PoisonError::into_inner);
        let count = open.entry(key).or_insert(0);
        if *count >= this.max {
            return None;
        }
        *count += 1;
        Some(ConnectionSlot {
            connections: Arc::clone(this),
            key,
        })
    }
}

/// One counted connection; dropping it (the connection ended) gives the place back.
#[derive(Debug)]
pub struct ConnectionSlot {
    connections: Arc<Connections>,
    key: IpAddr,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut open = self
            .connections
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = open.get_mut(&self.key) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                open.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn clients(trusted: &[&str], header: ForwardedHeader) -> Clients {
        let nets = trusted.iter().map(|net| net.parse().unwrap()).collect();
        Clients::new(nets, false, header, 3, 64, Arc::new(Metrics::new()))
    }

    /// The client of a request from `peer` with these header lines, as the connection
    /// layer asks: only a peer that [`Clients::reads_forwarding`], only the configured
    /// header, lines last first.
    fn resolve(clients: &Clients, peer: &str, field: Field, lines: &[&str]) -> String {
        let peer = SocketAddr::new(peer.parse().unwrap(), 4000);
        if !clients.reads_forwarding(peer.ip()) || field != clients.forwarding_field() {
            return peer.ip().to_string();
        }
        let last_first = lines.iter().rev().map(|line| line.as_bytes());
        clients.client_of(peer, last_first).ip().to_string()
    }

    #[test]
    fn the_rightmost_untrusted_x_forwarded_for_entry_is_the_client() {
        let c = clients(&["10.0.0.0/8"], ForwardedHeader::XForwardedFor);
        let xff = Field::XForwardedFor;
        // What the client wrote on the left is never read.
        assert_eq!(
            resolve(&c, "10.0.0.1", xff, &["6.6.6.6, 203.0.113.7"]),
            "203.0.113.7"
        );
        // Trusted hops on the right are skipped.
        assert_eq!(
            resolve(
                &c,
                "10.0.0.1",
                xff,
                &["6.6.6.6, 203.0.113.7, 10.1.1.1 ,10.2.2.2"]
            ),
            "203.0.113.7"
        );
        // Several lines are one list, in order.
        assert_eq!(
            resolve(&c, "10.0.0.1", xff, &["6.6.6.6", "203.0.113.7", "10.1.1.1"]),
            "203.0.113.7"
        );
        // Odd but valid: ports, brackets, quotes, empty elements, mapped IPv4.
        assert_eq!(
            resolve(&c, "10.0.0.1", xff, &["203.0.113.7:4711"]),
            "203.0.113.7"
        );
        assert_eq!(
            resolve(&c, "10.0.0.1", xff, &["[2001:db8::7]:80"]),
            "2001:db8::7"
        );
        assert_eq!(
            resolve(&c, "10.0.0.1", xff, &["2001:db8::7"]),
            "2001:db8::7"
        );
        assert_eq!(
            resolve(&c, "10.0.0.1", xff, &["\"203.0.113.7\""]),
            "203.0.113.7"
        );
        assert_eq!(
            resolve(&c, "10.0.0.1", xff, &["203.0.113.7,,  ,"]),
            "203.0.113.7"
        );
        assert_eq!(
            resolve(&c, "10.0.0.1", xff, &["::ffff:203.0.113.7"]),
            "203.0.113.7"
        );
        // A trusted peer seen as an IPv4-mapped IPv6 address (dual-stack listener).
        assert_eq!(
            resolve(&c, "::ffff:10.0.0.1", xff, &["203.0.113.7"]),
            "203.0.113.7"
        );
    }

    #[test]
    fn a_walk_that_finds_no_untrusted_address_stops_at_the_last_trusted_hop() {
        let c = clients(&["10.0.0.0/8"], ForwardedHeader::XForwardedFor);
        let xff = Field::XForwardedFor;
        // No header: the proxy itself.
        assert_eq!(resolve(&c, "10.0.0.1", xff, &[]), "10.0.0.1");
        // All trusted: the leftmost (farthest) trusted hop.
        assert_eq!(
            resolve(&c, "10.0.0.1", xff, &["10.9.9.9, 10.1.1.1"]),
            "10.9.9.9"
        );
        // `unknown`, an obfuscated name or garbage end the walk: what lies left of it
        // may be anyone's.
        for stop in [
            "unknown",
            "_hidden",
            "not-an-address",
            "1.2.3.4:99999",
            "[::1",
        ] {
            let line = format!("6.6.6.6, {stop}, 10.1.1.1");
            assert_eq!(resolve(&c, "10.0.0.1", xff, &[&line]), "10.1.1.1", "{stop}");
        }
    }

    #[test]
    fn forwarded_for_values_are_read_as_rfc_7239_writes_them() {
        let c = clients(&["10.0.0.0/8", "::1/128"], ForwardedHeader::Forwarded);
        let fwd = Field::Forwarded;
        assert_eq!(
            resolve(
                &c,
                "10.0.0.1",
                fwd,
                &["for=6.6.6.6, for=203.0.113.7;proto=https"]
            ),
            "203.0.113.7"
        );
        assert_eq!(
            resolve(&c, "10.0.0.1", fwd, &["For=\"[2001:db8:cafe::17]:4711\""]),
            "2001:db8:cafe::17"
        );
        assert_eq!(
            resolve(
                &c,
                "10.0.0.1",
                fwd,
                &["proto=http;by=10.0.0.1; for = 192.0.2.43"]
            ),
            "192.0.2.43"
        );
        assert_eq!(
            resolve(&c, "10.0.0.1", fwd, &["for=203.0.113.7, for=\"[::1]:80\""]),
            "203.0.113.7"
        );
        // An unbalanced quote a client wrote cannot swallow what the proxy appended.
        assert_eq!(
            resolve(&c, "10.0.0.1", fwd, &["for=\"6.6.6.6, for=203.0.113.7"]),
            "203.0.113.7"
        );
        // An element without `for=` ends the walk.
        assert_eq!(
            resolve(&c, "10.0.0.1", fwd, &["for=6.6.6.6, proto=http"]),
            "10.0.0.1"
        );
        // Only the configured header is read: the other one is the client's to write.
        assert_eq!(
            resolve(&c, "10.0.0.1", Field::XForwardedFor, &["203.0.113.7"]),
            "10.0.0.1"
        );
    }

    #[test]
    fn an_untrusted_peer_cannot_name_a_client() {
        let c = clients(&["10.0.0.0/8"], ForwardedHeader::XForwardedFor);
        assert_eq!(
            resolve(&c, "203.0.113.9", Field::XForwardedFor, &["6.6.6.6"]),
            "203.0.113.9"
        );
        let none = clients(&[], ForwardedHeader::XForwardedFor);
        assert_eq!(
            resolve(&none, "10.0.0.1", Field::XForwardedFor, &["6.6.6.6"]),
            "10.0.0.1"
        );
    }

    #[test]
    fn ipv6_clients_are_counted_by_prefix() {
        let ip = |text: &str| text.parse::<IpAddr>().unwrap();
        assert_eq!(
            aggregate(ip("2001:db8:1:2:3:4:5:6"), 64),
            ip("2001:db8:1:2::")
        );
        assert_eq!(
            aggregate(ip("2001:db8:1:2:3:4:5:6"), 48),
            ip("2001:db8:1::")
        );
        assert_eq!(
            aggregate(ip("2001:db8:1:2:3:4:5:6"), 128),
            ip("2001:db8:1:2:3:4:5:6")
        );
        assert_eq!(aggregate(ip("2001:db8:1:2:3:4:5:6"), 0), ip("::"));
        assert_eq!(aggregate(ip("2001:db8::1"), 200), ip("2001:db8::1"));
        assert_eq!(aggregate(ip("192.0.2.7"), 0), ip("192.0.2.7"));
        assert_eq!(aggregate(ip("::ffff:192.0.2.7"), 64), ip("192.0.2.7"));
    }

    #[test]
    fn connections_are_counted_per_client_and_given_back() {
        let c = clients(&[], ForwardedHeader::XForwardedFor);
        let a: IpAddr = "2001:db8::1".parse().unwrap();
        let same_64: IpAddr = "2001:db8::ffff".parse().unwrap();
        let other: IpAddr = "2001:db8:0:1::1".parse().unwrap();
        let held: Vec<_> = (0..3)
            .map(|_| Connections::admit(&c.connections, a).unwrap())
            .collect();
        assert!(Connections::admit(&c.connections, same_64).is_none());
        assert!(Connections::admit(&c.connections, other).is_some());
        drop(held);
        assert!(Connections::admit(&c.connections, same_64).is_some());
        assert!(c.connections.open.lock().unwrap().is_empty());
    }

    async fn proxy_header(bytes: &[u8]) -> Result<(SocketAddr, BytesMut), Refused> {
        let peer = SocketAddr::from(([10, 0, 0, 1], 1234));
        read_proxy_header(&mut &bytes[..], peer).await
    }

    #[tokio::test]
    async fn proxy_headers_name_the_client_and_leave_the_rest_unread() {
        let (client, rest) = proxy_header(b"PROXY TCP4 203.0.113.7 10.0.0.2 5555 443\r\nGET /")
            .await
            .unwrap();
        assert_eq!(client, SocketAddr::from(([203, 0, 113, 7], 5555)));
        assert_eq!(&rest[..], b"GET /");
        let (client, rest) = proxy_header(b"PROXY UNKNOWN\r\nGET /").await.unwrap();
        assert_eq!(client, SocketAddr::from(([10, 0, 0, 1], 1234)));
        assert_eq!(&rest[..], b"GET /");

        let v2 = ppp::v2::Builder::with_addresses(
            ppp::v2::Version::Two | ppp::v2::Command::Proxy,
            ppp::v2::Protocol::Stream,
            (
                SocketAddr::from(([203, 0, 113, 8], 6666)),
                SocketAddr::from(([10, 0, 0, 2], 443)),
            ),
        )
        .build()
        .unwrap();
        let mut bytes = v2.clone();
        bytes.extend_from_slice(b"\x16\x03\x01");
        let (client, rest) = proxy_header(&bytes).await.unwrap();
        assert_eq!(client, SocketAddr::from(([203, 0, 113, 8], 6666)));
        assert_eq!(&rest[..], b"\x16\x03\x01");

        for bad in [
            &b"GET / HTTP/1.1\r\nhost: x\r\n\r\n"[..],
            b"PROXY TCP4 nonsense\r\n",
            b"PROXY TCP4 203.0.113.7",
            b"",
        ] {
            assert!(proxy_header(bad).await.is_err(), "{bad:?}");
        }
    }
}
