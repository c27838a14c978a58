//! The relay's checked settings: what `[callback_relay]` becomes once its files are read
//! and its values checked. Ingress, routing and delivery read these; only
//! `settings` builds them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::{Fsync, Keyring, Retention};

/// Everything the relay needs, built once per config load.
pub struct RelaySettings {
    /// Its own listener (TLS through the same keys as the branch listener).
    pub listen: SocketAddr,
    /// TLS for the listener: `[server.tls]`'s certificate and key, without client
    /// certificates (Diia presents none); `None` when the branch listener is plain.
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    /// The ingress path is `{path_prefix}/{token}`.
    pub path_prefix: String,
    /// A callback body larger than this is refused with 413.
    pub max_body: usize,
    /// Callback bytes being read or sealed at once; beyond, 503 + `Retry-After`.
    pub max_in_flight_bytes: usize,
    /// Where the store keeps its database.
    pub data_dir: PathBuf,
    /// How commits reach the disk.
    pub fsync: Fsync,
    /// The most the database file may grow to (`None`: the disk is the limit).
    pub max_db_bytes: Option<u64>,
    /// Seal and MAC keys, newest first.
    pub keys: Arc<Keyring>,
    /// How long a recorded route waits for its callback.
    pub route_ttl: Duration,
    /// Pauses between delivery attempts; the last one repeats until `max_age`.
    pub retry_schedule: Vec<Duration>,
    /// A record still undelivered this long after it arrived is dead.
    pub max_age: Duration,
    /// One delivery attempt's deadline.
    pub delivery_timeout: Duration,
    /// Deliveries in flight per target.
    pub per_target_concurrency: usize,
    /// How long tombstones, dead and orphan records are kept.
    pub retention: Retention,
    /// The acquirers whose callbacks this relay accepts.
    pub acquirers: Vec<Arc<RelayAcquirer>>,
    /// Where packages are pushed.
    pub targets: Vec<Arc<Target>>,
}

impl RelaySettings {
    /// What routes mean, as canonical bytes: the ingress path prefix, each acquirer's name
    /// and default target (sorted by name: their order changes nothing), and the targets in
    /// order (the first that lists a branch wins) with the branches each serves (sorted).
    /// Instances of one fleet must agree on these (a route recorded on one is delivered by
    /// another); the fleet compares keyed fingerprints of them, never the values.
    /// Secrets (path tokens, seal keys, signing secrets) and per-instance values (listen
    /// address, data dir, URLs) are left out.
    #[must_use]
    pub fn routing_config(&self) -> Vec<u8> {
        fn put(out: &mut Vec<u8>, field: &str) {
            out.extend_from_slice(&(field.len() as u64).to_be_bytes());
            out.extend_from_slice(field.as_bytes());
        }
        let mut out = b"relay routing v1".to_vec();
        put(&mut out, &self.path_prefix);
        let mut acquirers: Vec<(&str, Option<&str>)> = self
            .acquirers
            .iter()
            .map(|a| (a.name.as_str(), a.default_target.as_deref()))
            .collect();
        acquirers.sort_unstable();
        out.extend_from_slice(&(acquirers.len() as u64).to_be_bytes());
        for (name, default_target) in acquirers {
            put(&mut out, name);
            match default_target {
                Some(target) => {
                    out.push(1);
                    put(&mut out, target);
                }
                None => out.push(0),
            }
        }
        out.extend_from_slice(&(self.targets.len() as u64).to_be_bytes());
        for target in &self.targets {
            put(&mut out, &target.name);
            match &target.branches {
                Branches::All => out.push(0),
                Branches::Listed(ids) => {
                    out.push(1);
                    let mut ids: Vec<&str> = ids.iter().map(String::as_str).collect();
                    ids.sort_unstable();
                    ids.dedup();
                    out.extend_from_slice(&(ids.len() as u64).to_be_bytes());
                    for id in ids {
                        put(&mut out, id);
                    }
                }
            }
        }
        out
    }
}

/// One acquirer's ingress: its secret path token and the certificate its packages are
/// encrypted to.
pub struct RelayAcquirer {
    /// The configured acquirer name (the store's clear `acquirer` column, log field).
    pub name: String,
    /// The 32-byte secret in the ingress URL; compared in constant time, never logged.
    pub path_token: [u8; 32],
    /// Who every CMS recipient must name: the certificate's issuer and serial.
    pub recipient: Recipient,
    /// The target for branches no target lists (by name), if any.
    pub default_target: Option<String>,
}

/// A CMS recipient identity (`IssuerAndSerialNumber`).
#[derive(Clone, PartialEq, Eq)]
pub struct Recipient {
    /// The issuer's `Name`, DER-encoded as in the certificate.
    pub issuer_der: Vec<u8>,
    /// The serial number's content octets, as in the certificate.
    pub serial: Vec<u8>,
}

/// A branch backend that receives pushed packages.
pub struct Target {
    /// The `[[callback_relay.target]]` name (routes and logs name targets by it).
    pub name: String,
    /// Where packages are POSTed.
    pub url: http::Uri,
    /// The Standard Webhooks secret (`whsec_…`, decoded).
    pub signing_secret: Vec<u8>,
    /// The branches it serves.
    pub branches: Branches,
}

/// Which branches a target serves.
pub enum Branches {
    /// `["*"]`.
    All,
    /// These branch ids.
    Listed(Vec<String>),
}

impl Branches {
    /// Whether `branch` is served.
    #[must_use]
    pub fn serves(&self, branch: &str) -> bool {
        match self {
            Self::All => true,
            Self::Listed(ids) => ids.iter().any(|id| id == branch),
        }
    }
}
