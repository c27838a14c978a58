//! TLS with rustls (ring provider, TLS 1.2 and 1.3 only): termination on the branch
//! listener, optionally requiring client certificates (mTLS) checked against CRLs, what a
//! verified client certificate says about its holder, and the trust store used to verify
//! Diia.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use x509_parser::extensions::GeneralName;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

const VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{}: no PEM certificate in the file",
            path.display()
        ));
    }
    Ok(certs)
}

fn roots(path: &Path) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for cert in certificates(path)? {
        roots
            .add(cert)
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(roots)
}

/// The CRLs in PEM files (`X509 CRL` blocks; each file must hold at least one).
pub fn crls(paths: &[PathBuf]) -> Result<Vec<CertificateRevocationListDer<'static>>, String> {
    let mut all = Vec::new();
    for path in paths {
        let before = all.len();
        for crl in CertificateRevocationListDer::pem_file_iter(path)
            .map_err(|e| format!("{}: {e}", path.display()))?
        {
            all.push(crl.map_err(|e| format!("{}: {e}", path.display()))?);
        }
        if all.len() == before {
            return Err(format!("{}: no PEM CRL in the file", path.display()));
        }
    }
    Ok(all)
}

/// The branch listener's TLS config; with `client_ca`, clients must present a certificate
/// signed by it and not revoked by `crls` (rustls checks every certificate of the chain,
/// and refuses one whose issuer has no CRL among them: give one CRL per issuing CA). ALPN
/// offers HTTP/2 and HTTP/1.1.
pub fn server_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
    crls: &[CertificateRevocationListDer<'static>],
) -> Result<Arc<rustls::ServerConfig>, String> {
    let chain = certificates(cert)?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{}: {e}", key.display()))?;
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .map_err(|e| e.to_string())?;
    let builder = match client_ca {
        Some(ca) => {
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca)?), provider())
                    .with_crls(crls.iter().cloned())
                    .build()
                    .map_err(|e| format!("{}: {e}", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|e| e.to_string())?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The roots Diia's certificate is verified against: the configured bundle only, or the
/// system's plus Mozilla's bundled ones.
pub fn upstream_roots(ca_file: Option<&Path>) -> Result<RootCertStore, String> {
    if let Some(path) = ca_file {
        return roots(path);
    }
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    Ok(roots)
}

/// The client TLS config toward Diia.
pub fn client_config(roots: RootCertStore) -> Result<rustls::ClientConfig, String> {
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// What the gateway knows about a connection's verified client certificate, read once at
/// the handshake: its names (to find its `auth.client_certs` entry and key its budgets)
/// and its issuer and serial (to check CRLs loaded after the handshake).
#[derive(Debug)]
pub struct ClientCert {
    /// The DNS subject alternative names, or, only when there is none, the subject's
    /// common names; ASCII-lowercased. Empty when the certificate cannot be read.
    names: Box<[Arc<str>]>,
    /// The issuer's distinguished name as encoded (DER).
    issuer: Box<[u8]>,
    /// The serial number as encoded.
    serial: Box<[u8]>,
}

impl ClientCert {
    /// Reads an end-entity certificate (one rustls already verified). A certificate
    /// x509-parser cannot read gives no names: it matches no `auth.client_certs` entry.
    #[must_use]
    pub fn from_der(der: &[u8]) -> Self {
        let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
            tracing::debug!("client certificate unreadable by x509-parser; no names");
            return Self {
                names: Box::default(),
                issuer: Box::default(),
                serial: Box::default(),
            };
        };
        let lower = |name: &str| Arc::<str>::from(name.to_ascii_lowercase());
        let mut names: Vec<Arc<str>> = match cert.subject_alternative_name() {
            Ok(Some(san)) => san
                .value
                .general_names
                .iter()
                .filter_map(|name| match name {
                    GeneralName::DNSName(dns) => Some(lower(dns)),
                    _ => None,
                })
                .collect(),
            // No SAN extension, or a malformed one (no DNS name is trusted from it).
            Ok(None) | Err(_) => Vec::new(),
        };
        if names.is_empty() {
            names = cert
                .subject()
                .iter_common_name()
                .filter_map(|cn| cn.as_str().ok())
                .map(lower)
                .collect();
        }
        Self {
            names: names.into(),
            issuer: cert.issuer().as_raw().into(),
            serial: cert.raw_serial().into(),
        }
    }

    /// The names it is matched by, in certificate order.
    #[must_use]
    pub fn names(&self) -> &[Arc<str>] {
        &self.names
    }

    /// This exact certificate (SHA-256 over its issuer and serial, length-framed): what the
    /// callback relay's routes name, so a package is pulled only with the certificate
    /// that asked for it.
    #[must_use]
    pub fn identity(&self) -> [u8; 32] {
        use sha2::Digest;
        let mut digest = sha2::Sha256::new();
        digest.update((self.issuer.len() as u64).to_be_bytes());
        digest.update(&self.issuer);
        digest.update(&self.serial);
        digest.finalize().into()
    }

    /// The name its budgets are keyed on when no `auth.client_certs` entry names it: the
    /// first one.
    #[must_use]
    pub fn name(&self) -> Option<&Arc<str>> {
        self.names.first()
    }
}

/// The serials the configured CRLs revoke, by issuer: checked on every request that
/// comes with a client certificate, so a reload that adds a CRL entry also refuses the
/// revoked certificate's connections that were already open.
#[derive(Debug, Default)]
pub struct Revoked {
    by_issuer: HashMap<Box<[u8]>, HashSet<Box<[u8]>>>,
}

impl Revoked {
    /// From the CRLs rustls checks handshakes against. Each CA certificate in `client_ca`
    /// must have a CRL among them that it signed (checked here): rustls refuses every
    /// certificate whose issuer has no CRL, and this per-request check trusts the CRLs'
    /// contents. (CRLs of intermediate CAs outside `client_ca` are checked by rustls at
    /// the handshake.)
    pub fn new(
        crls: &[CertificateRevocationListDer<'static>],
        client_ca: &Path,
    ) -> Result<Self, String> {
        let cas = certificates(client_ca)?;
        let cas = cas
            .iter()
            .map(|der| {
                x509_parser::parse_x509_certificate(der)
                    .map(|(_, cert)| cert)
                    .map_err(|e| format!("{}: {e}", client_ca.display()))
            })
            .collect::<Result<Vec<_>, String>>()?;
        let mut covered = vec![false; cas.len()];
        let mut by_issuer: HashMap<Box<[u8]>, HashSet<Box<[u8]>>> = HashMap::new();
        for der in crls {
            let (_, crl) = x509_parser::parse_x509_crl(der.as_ref())
                .map_err(|e| format!("unreadable CRL: {e}"))?;
            let issuer = crl.issuer().as_raw();
            for (ca, covered) in cas.iter().zip(covered.iter_mut()) {
                if ca.subject().as_raw() != issuer {
                    continue;
                }
                crl.verify_signature(ca.public_key()).map_err(|_| {
                    format!(
                        "the CRL of '{}' is not signed by that CA in {}",
                        crl.issuer(),
                        client_ca.display()
                    )
                })?;
                *covered = true;
            }
            by_issuer.entry(issuer.into()).or_default().extend(
                crl.iter_revoked_certificates()
                    .map(|revoked| Box::<[u8]>::from(revoked.raw_serial())),
            );
        }
        if let Some((ca, _)) = cas.iter().zip(&covered).find(|(_, covered)| !**covered) {
            return Err(format!(
                "no CRL for '{}' of {}: every certificate it signed would be refused \
                 (give one CRL per CA)",
                ca.subject(),
                client_ca.display()
            ));
        }
        Ok(Self { by_issuer })
    }

    /// Whether `cert` is revoked.
    #[must_use]
    pub fn contains(&self, cert: &ClientCert) -> bool {
        self.by_issuer
            .get(&cert.issuer)
            .is_some_and(|serials| serials.contains(&cert.serial))
    }

    /// Whether no CRL revokes anything.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.by_issuer.values().all(HashSet::is_empty)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, CertificateRevocationListParams, DnType, IsCa, Issuer,
        KeyIdMethod, KeyPair, RevokedCertParams, SerialNumber,
    };

    /// A CA: its issuer and its certificate (PEM).
    fn ca(name: &str) -> (Issuer<'static, KeyPair>, String) {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().expect("key");
        let pem = params.self_signed(&key).expect("self-signed").pem();
        (Issuer::new(params, key), pem)
    }

    fn leaf(issuer: &Issuer<'_, KeyPair>, sans: &[&str], cn: &str, serial: u64) -> Vec<u8> {
        let key = KeyPair::generate().expect("key");
        let mut params =
            CertificateParams::new(sans.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())
                .expect("params");
        params.distinguished_name.push(DnType::CommonName, cn);
        params.serial_number = Some(SerialNumber::from(serial));
        params
            .signed_by(&key, issuer)
            .expect("signed")
            .der()
            .to_vec()
    }

    #[test]
    fn dns_names_win_over_the_common_name() {
        let (issuer, _) = ca("test ca");
        let with_san = ClientCert::from_der(&leaf(&issuer, &["Kyiv-001.Example"], "cn-name", 1));
        assert_eq!(with_san.names(), [Arc::from("kyiv-001.example")]);
        let cn_only = ClientCert::from_der(&leaf(&issuer, &[], "Lviv-002", 2));
        assert_eq!(cn_only.names(), [Arc::from("lviv-002")]);
        assert!(
            ClientCert::from_der(b"not a certificate")
                .names()
                .is_empty()
        );
    }

    #[test]
    fn revoked_serials_are_found_by_issuer() {
        let (issuer, issuer_pem) = ca("test ca");
        // CRLs name their CA by its distinguished name (as rustls matches them).
        let (other_issuer, other_pem) = ca("other ca");
        let crl = CertificateRevocationListParams {
            this_update: rcgen::date_time_ymd(2024, 1, 1),
            next_update: rcgen::date_time_ymd(2099, 1, 1),
            crl_number: SerialNumber::from(1u64),
            issuing_distribution_point: None,
            revoked_certs: vec![RevokedCertParams {
                serial_number: SerialNumber::from(7u64),
                revocation_time: rcgen::date_time_ymd(2024, 1, 1),
                reason_code: None,
                invalidity_date: None,
            }],
            key_identifier_method: KeyIdMethod::Sha256,
        }
        .signed_by(&issuer)
        .expect("crl");
        let dir = tempfile::tempdir().expect("dir");
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, &issuer_pem).expect("write");
        let crl = CertificateRevocationListDer::from(crl.der().to_vec());
        let revoked = Revoked::new(std::slice::from_ref(&crl), &ca_file).expect("crl");
        assert!(!revoked.is_empty());
        assert!(revoked.contains(&ClientCert::from_der(&leaf(&issuer, &["a"], "a", 7))));
        assert!(!revoked.contains(&ClientCert::from_der(&leaf(&issuer, &["a"], "a", 8))));
        // The same serial from another CA is not revoked.
        assert!(!revoked.contains(&ClientCert::from_der(&leaf(&other_issuer, &["a"], "a", 7))));

        // A CA of client_ca without a CRL, or a CRL another key signed, is refused.
        let other_file = dir.path().join("other.pem");
        std::fs::write(&other_file, &other_pem).expect("write");
        let both = dir.path().join("both.pem");
        std::fs::write(&both, issuer_pem + &other_pem).expect("write");
        let problem = Revoked::new(std::slice::from_ref(&crl), &both).expect_err("uncovered");
        assert!(problem.contains("no CRL for 'CN=other ca'"), "{problem}");
        let (_, impostor_pem) = ca("test ca");
        let forged = dir.path().join("forged.pem");
        std::fs::write(&forged, impostor_pem).expect("write");
        let problem = Revoked::new(std::slice::from_ref(&crl), &forged).expect_err("forged");
        assert!(problem.contains("not signed by that CA"), "{problem}");
        assert!(Revoked::new(std::slice::from_ref(&crl), &other_file).is_err());
    }
}
