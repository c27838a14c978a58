//! TLS in and out: termination on the branch listener, mTLS, and Diia's certificate
//! verified against the configured CA. Certificates are made at run time with rcgen.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::support;

use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use diia_gateway::RunningGateway;
use diia_gateway::config::{FileConfig, ServerTlsConfig};
use diia_sim::{DEMO_ACQUIRER_TOKEN, DEMO_AUTH_TOKEN, Simulator};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, RevocationReason,
    RevokedCertParams, SerialNumber,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// A throw-away PKI: a CA, a server certificate for `localhost`, a client certificate.
struct Pki {
    _dir: tempfile::TempDir,
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
}

fn pki() -> Pki {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: String| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, &ca_key);

    let server_key = KeyPair::generate().unwrap();
    let server = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    let server_cert = server.signed_by(&server_key, &issuer).unwrap();

    let client_key = KeyPair::generate().unwrap();
    let mut client = CertificateParams::new(vec!["branch-backend".to_owned()]).unwrap();
    client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let client_cert = client.signed_by(&client_key, &issuer).unwrap();

    Pki {
        ca: write("ca.pem", ca_cert.pem()),
        server_cert: write("server.pem", server_cert.pem()),
        server_key: write("server-key.pem", server_key.serialize_pem()),
        client_cert: write("client.pem", client_cert.pem()),
        client_key: write("client-key.pem", client_key.serialize_pem()),
        _dir: dir,
    }
}

fn https_client(
    pki: &Pki,
    with_client_cert: bool,
) -> Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Full<Bytes>,
> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(&pki.ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let config = if with_client_cert {
        let chain: Vec<_> = CertificateDer::pem_file_iter(&pki.client_cert)
            .unwrap()
            .map(Result::unwrap)
            .collect();
        builder
            .with_client_auth_cert(
                chain,
                PrivateKeyDer::from_pem_file(&pki.client_key).unwrap(),
            )
            .unwrap()
    } else {
        builder.with_no_client_auth()
    };
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(config)
        .https_only()
        .enable_http1()
        .build();
    Client::builder(TokioExecutor::new()).build(connector)
}

async fn token_exchange<C>(
    client: &Client<C, Full<Bytes>>,
    base: &str,
) -> Result<StatusCode, String>
where
    C: hyper_util::client::legacy::connect::Connect + Clone + Send + Sync + 'static,
{
    let request = Request::get(format!("{base}/api/v1/auth/acquirer/{DEMO_ACQUIRER_TOKEN}"))
        .header("authorization", format!("Basic {DEMO_AUTH_TOKEN}"))
        .body(Full::default())
        .unwrap();
    let response = tokio::time::timeout(support::REQUEST_BOUND, client.request(request))
        .await
        .map_err(|_| "timeout".to_owned())?
        .map_err(|e| format!("{e:?}"))?;
    let status = response.status();
    let _ = response.into_body().collect().await;
    Ok(status)
}

async fn tls_gateway(pki: &Pki, upstream: &str, client_ca: bool) -> RunningGateway {
    let mut config: FileConfig = support::gateway_config(upstream);
    config.server.tls = Some(ServerTlsConfig {
        cert: pki.server_cert.clone(),
        key: pki.server_key.clone(),
        client_ca: client_ca.then(|| pki.ca.clone()),
        client_crl: Vec::new(),
    });
    support::start_gateway(config).await
}

#[tokio::test]
async fn branch_listener_speaks_tls() {
    let pki = pki();
    let sim = Simulator::start(support::sim_config()).await.unwrap();
    let gateway = tls_gateway(&pki, &sim.base_url(), false).await;
    let base = format!("https://localhost:{}", gateway.addr().port());
    assert_eq!(
        token_exchange(&https_client(&pki, false), &base).await,
        Ok(StatusCode::OK)
    );
    // Plain HTTP to the TLS port gets no answer.
    let plain = support::client();
    let url = format!("http://127.0.0.1:{}/healthz", gateway.addr().port());
    let request = Request::get(url).body(Full::default()).unwrap();
    let answered = tokio::time::timeout(support::REQUEST_BOUND, plain.request(request))
        .await
        .unwrap();
    assert!(
        answered.is_err(),
        "plain HTTP is refused on the TLS listener"
    );
}

#[tokio::test]
async fn mtls_refuses_clients_without_a_certificate() {
    let pki = pki();
    let sim = Simulator::start(support::sim_config()).await.unwrap();
    let gateway = tls_gateway(&pki, &sim.base_url(), true).await;
    let base = format!("https://localhost:{}", gateway.addr().port());
    assert!(
        token_exchange(&https_client(&pki, false), &base)
            .await
            .is_err(),
        "no client certificate, no entry"
    );
    assert_eq!(
        token_exchange(&https_client(&pki, true), &base).await,
        Ok(StatusCode::OK)
    );
    assert_eq!(
        sim.state()
            .requests(diia_sim::route::Endpoint::TokenExchange),
        1
    );
}

#[tokio::test]
async fn upstream_certificate_is_verified() {
    let pki = pki();
    let sim = Simulator::start(support::sim_config()).await.unwrap();
    // A TLS "Diia": a gateway terminating TLS with the test CA's certificate.
    let tls_diia = tls_gateway(&pki, &sim.base_url(), false).await;
    let diia_url = format!("https://localhost:{}", tls_diia.addr().port());

    let mut trusting = support::gateway_config(&diia_url);
    trusting.upstream.ca_file = Some(pki.ca.clone());
    let trusting = support::start_gateway(trusting).await;
    let plain = support::client();
    assert_eq!(
        token_exchange(&plain, &format!("http://{}", trusting.addr())).await,
        Ok(StatusCode::OK),
        "trusted CA: the call goes through"
    );

    // The same upstream, verified against the system roots only: refused.
    let default_roots = support::start_gateway(support::gateway_config(&diia_url)).await;
    let url = format!(
        "http://{}/api/v1/auth/acquirer/{DEMO_ACQUIRER_TOKEN}",
        default_roots.addr()
    );
    let reply = support::send(&plain, http::Method::GET, &url, &[], String::new()).await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
    assert_eq!(reply.gateway_code(), "upstream_unreachable");
    assert_eq!(
        sim.state()
            .requests(diia_sim::route::Endpoint::TokenExchange),
        1
    );
}

#[tokio::test]
async fn certificates_reload_for_new_connections_while_open_ones_keep_going() {
    let (old, new) = (pki(), pki());
    let sim = Simulator::start(support::sim_config()).await.unwrap();
    let file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    let write = |pki: &Pki| {
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
             [server.tls]\ncert = {:?}\nkey = {:?}\n[upstream]\nbase_url = \"{}\"\n",
            pki.server_cert.display().to_string(),
            pki.server_key.display().to_string(),
            sim.base_url()
        );
        std::fs::write(file.path(), text).unwrap();
    };
    write(&old);
    let gateway = diia_gateway::start_from_file(
        diia_gateway::Settings::load(file.path()).unwrap(),
        Some(file.path().to_owned()),
    )
    .await
    .unwrap();
    let base = format!("https://localhost:{}", gateway.addr().port());
    let old_client = https_client(&old, false);
    assert_eq!(token_exchange(&old_client, &base).await, Ok(StatusCode::OK));
    assert!(
        token_exchange(&https_client(&new, false), &base)
            .await
            .is_err(),
        "new CA not served yet"
    );

    write(&new);
    gateway.reload().unwrap();
    assert_eq!(
        token_exchange(&https_client(&new, false), &base).await,
        Ok(StatusCode::OK),
        "new connections get the new certificate"
    );
    // The old client's pooled connection was not dropped: a new handshake would now fail.
    assert_eq!(token_exchange(&old_client, &base).await, Ok(StatusCode::OK));
    assert!(
        token_exchange(&https_client(&old, false), &base)
            .await
            .is_err(),
        "a fresh old-CA client is refused"
    );
}

#[tokio::test]
async fn managed_mode_with_mtls_branches_need_only_their_certificate() {
    let pki = pki();
    let sim = Simulator::start(support::sim_config()).await.unwrap();
    let barcode = sim.state().issue_barcode(true).digits();
    let mut config: FileConfig = support::gateway_config(&sim.base_url());
    config.server.tls = Some(ServerTlsConfig {
        cert: pki.server_cert.clone(),
        key: pki.server_key.clone(),
        client_ca: Some(pki.ca.clone()),
        client_crl: Vec::new(),
    });
    config.auth.mode = diia_gateway::config::AuthMode::Managed;
    config.auth.branch_auth = diia_gateway::config::BranchAuth::Mtls;
    config.auth.acquirer_token = Some(DEMO_ACQUIRER_TOKEN.to_owned());
    config.auth.auth_token = Some(DEMO_AUTH_TOKEN.to_owned());
    let gateway = support::start_gateway(config).await;
    let url = format!(
        "https://localhost:{}/api/v1/acquirers/document-identification",
        gateway.addr().port()
    );
    let body = format!(r#"{{"branchId":"kyiv-001","barcode":"{barcode}"}}"#);
    let request = || {
        Request::post(url.as_str())
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.clone())))
            .unwrap()
    };
    let with_cert = https_client(&pki, true);
    let response = tokio::time::timeout(support::REQUEST_BOUND, with_cert.request(request()))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        response.status(),
        StatusCode::OK,
        "no Authorization needed: the gateway injects its token"
    );
    let without = https_client(&pki, false);
    assert!(
        tokio::time::timeout(support::REQUEST_BOUND, without.request(request()))
            .await
            .unwrap()
            .is_err()
    );
    assert_eq!(
        sim.state()
            .requests(diia_sim::route::Endpoint::TokenExchange),
        1
    );
}

/// A CA that issues client certificates by name and serial, and signs CRLs: the
/// per-branch certificate tests' PKI.
struct BranchPki {
    dir: tempfile::TempDir,
    issuer: Issuer<'static, KeyPair>,
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
}

/// One client certificate and its key, on disk.
struct ClientId {
    cert: PathBuf,
    key: PathBuf,
}

impl BranchPki {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "branches test CA");
        let ca_key = KeyPair::generate().unwrap();
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let server_key = KeyPair::generate().unwrap();
        let server_cert = CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .signed_by(&server_key, &issuer)
            .unwrap();
        let write = |name: &str, text: String| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        let ca = write("ca.pem", ca_cert.pem());
        let server_cert = write("server.pem", server_cert.pem());
        let server_key = write("server-key.pem", server_key.serialize_pem());
        Self {
            dir,
            issuer,
            ca,
            server_cert,
            server_key,
        }
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    /// A client certificate named `name` by a DNS SAN (or, `san = false`, by its subject
    /// CN only), with this serial.
    fn client(&self, name: &str, san: bool, serial: u64) -> ClientId {
        let key = KeyPair::generate().unwrap();
        let sans = if san { vec![name.to_owned()] } else { vec![] };
        let mut params = CertificateParams::new(sans).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.serial_number = Some(SerialNumber::from(serial));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        ClientId {
            cert: self.write(&format!("{name}-{serial}.pem"), &cert.pem()),
            key: self.write(&format!("{name}-{serial}-key.pem"), &key.serialize_pem()),
        }
    }

    /// A CRL signed by the CA revoking these serials.
    fn crl(&self, file: &str, revoked: &[u64]) -> PathBuf {
        let now = rcgen::date_time_ymd(2024, 1, 1);
        let crl = CertificateRevocationListParams {
            this_update: now,
            next_update: rcgen::date_time_ymd(2099, 1, 1),
            crl_number: SerialNumber::from(1u64),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|serial| RevokedCertParams {
                    serial_number: SerialNumber::from(*serial),
                    revocation_time: now,
                    reason_code: Some(RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        }
        .signed_by(&self.issuer)
        .unwrap();
        self.write(file, &crl.pem().unwrap())
    }

    /// An HTTP/1.1 client over TLS (connections pooled) presenting `id`.
    fn https(&self, id: &ClientId) -> HttpsClient {
        self.https_with(id, false)
    }

    /// The same over HTTP/2 (ALPN `h2`: the gateway hands the connection to hyper).
    fn https_with(&self, id: &ClientId, h2: bool) -> HttpsClient {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(&self.ca).unwrap() {
            roots.add(cert.unwrap()).unwrap();
        }
        let chain: Vec<_> = CertificateDer::pem_file_iter(&id.cert)
            .unwrap()
            .map(Result::unwrap)
            .collect();
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, PrivateKeyDer::from_pem_file(&id.key).unwrap())
        .unwrap();
        let builder = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(config)
            .https_only();
        let connector = if h2 {
            builder.enable_http2().build()
        } else {
            builder.enable_http1().build()
        };
        Client::builder(TokioExecutor::new()).build(connector)
    }

    /// A managed-mode mTLS config: `bindings` is the `client_certs` TOML array (empty:
    /// the key is left out), `extra_tls` lines go under `[server.tls]`, the client budget
    /// is `burst`.
    fn config(&self, upstream: &str, bindings: &str, extra_tls: &str, burst: u32) -> String {
        let client_certs = if bindings.is_empty() {
            String::new()
        } else {
            format!("client_certs = [{bindings}]\n")
        };
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
             [server.tls]\ncert = {:?}\nkey = {:?}\nclient_ca = {:?}\n{extra_tls}\n\
             [upstream]\nbase_url = \"{upstream}\"\n\
             [auth]\nmode = \"managed\"\nbranch_auth = \"mtls\"\n\
             acquirer_token = \"{DEMO_ACQUIRER_TOKEN}\"\nauth_token = \"{DEMO_AUTH_TOKEN}\"\n\
             {client_certs}\
             [limits.branch]\nper_minute = 100000\nburst = 10000\n\
             [limits.client]\nper_minute = 1\nburst = {burst}\n",
            self.server_cert.display().to_string(),
            self.server_key.display().to_string(),
            self.ca.display().to_string(),
        )
    }
}

type HttpsClient = Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Full<Bytes>,
>;

/// Starts a gateway from config text kept in a file (so it can be reloaded).
async fn start_from(text: &str) -> (RunningGateway, tempfile::NamedTempFile) {
    let file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    std::fs::write(file.path(), text).unwrap();
    let settings = diia_gateway::Settings::load(file.path()).unwrap();
    let gateway = diia_gateway::start_from_file(settings, Some(file.path().to_owned()))
        .await
        .unwrap();
    (gateway, file)
}

/// Sends a request; the status and `gatewayCode` (empty for Diia's answers), or why no
/// answer came (a refused handshake).
async fn call(
    client: &HttpsClient,
    gateway: &RunningGateway,
    method: http::Method,
    path: &str,
    body: String,
) -> Result<(StatusCode, String), String> {
    let url = format!("https://localhost:{}{path}", gateway.addr().port());
    let request = Request::builder()
        .method(method)
        .uri(url)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let response = tokio::time::timeout(support::REQUEST_BOUND, client.request(request))
        .await
        .map_err(|_| "timeout".to_owned())?
        .map_err(|e| format!("{e:?}"))?;
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let code = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|json| json["gatewayCode"].as_str().map(str::to_owned))
        .unwrap_or_default();
    Ok((status, code))
}

/// `document-identification` for `branch` with a fresh valid barcode.
async fn identify_as(
    client: &HttpsClient,
    gateway: &RunningGateway,
    sim: &diia_sim::SimHandle,
    branch: &str,
) -> Result<(StatusCode, String), String> {
    let barcode = sim.state().issue_barcode(true).digits();
    let body = format!(r#"{{"branchId":"{branch}","barcode":"{barcode}"}}"#);
    call(
        client,
        gateway,
        http::Method::POST,
        "/api/v1/acquirers/document-identification",
        body,
    )
    .await
}

const BINDINGS: &str = r#"
    { branch = "kyiv-001", name = "kyiv-001.branches.example" },
    { branch = "lviv-002", name = "LVIV-002.branches.example" },
    { branch = "back-office", name = "backoffice.example", acquirer_wide = true },
"#;

/// A branch certificate acts only as its branch, exactly as a per-branch API key: another
/// branch's id is 403 `branch_mismatch`, an acquirer-wide call 403
/// `acquirer_key_required`; an acquirer-wide certificate may do both; a certificate the CA
/// signed but nobody listed is 403 `client_certificate_not_listed`. Names come from a DNS
/// SAN, else the CN (the Lviv certificate has none). Nothing refused reaches Diia.
#[tokio::test]
async fn a_branch_certificate_acts_only_as_its_own_branch() {
    let pki = BranchPki::new();
    let sim = Simulator::start(support::sim_config()).await.unwrap();
    let (gateway, _file) = start_from(&pki.config(&sim.base_url(), BINDINGS, "", 10_000)).await;
    let kyiv_id = pki.client("kyiv-001.branches.example", true, 1);
    let kyiv = pki.https(&kyiv_id);
    let lviv = pki.https(&pki.client("lviv-002.branches.example", false, 2));
    let back_office = pki.https(&pki.client("backoffice.example", true, 3));
    let stray = pki.https(&pki.client("stray.branches.example", true, 4));
    let ok = Ok((StatusCode::OK, String::new()));
    let refused = |code: &str| Ok((StatusCode::FORBIDDEN, code.to_owned()));

    assert_eq!(identify_as(&kyiv, &gateway, &sim, "kyiv-001").await, ok);
    assert_eq!(identify_as(&lviv, &gateway, &sim, "lviv-002").await, ok);
    // Over HTTP/2 too (hyper's path, not the HTTP/1.1 loop).
    let kyiv_h2 = pki.https_with(&kyiv_id, true);
    assert_eq!(identify_as(&kyiv_h2, &gateway, &sim, "kyiv-001").await, ok);
    assert_eq!(
        identify_as(&kyiv_h2, &gateway, &sim, "lviv-002").await,
        refused("branch_mismatch")
    );
    let identified = 3;
    assert_eq!(
        identify_as(&kyiv, &gateway, &sim, "lviv-002").await,
        refused("branch_mismatch")
    );
    assert_eq!(
        identify_as(&lviv, &gateway, &sim, "kyiv-001").await,
        refused("branch_mismatch")
    );
    let list = "/api/v2/acquirers/branches";
    assert_eq!(
        call(&kyiv, &gateway, http::Method::GET, list, String::new()).await,
        refused("acquirer_key_required")
    );
    let other = "/api/v2/acquirers/branch/lviv-002";
    assert_eq!(
        call(&kyiv, &gateway, http::Method::GET, other, String::new()).await,
        refused("branch_mismatch")
    );
    assert_eq!(
        identify_as(&stray, &gateway, &sim, "kyiv-001").await,
        refused("client_certificate_not_listed")
    );
    let state = sim.state();
    assert_eq!(state.requests(diia_sim::route::Endpoint::Branches), 0);
    assert_eq!(
        state.requests(diia_sim::route::Endpoint::DocumentIdentification),
        identified
    );

    assert_eq!(
        identify_as(&back_office, &gateway, &sim, "lviv-002").await,
        ok
    );
    assert_eq!(
        call(
            &back_office,
            &gateway,
            http::Method::GET,
            list,
            String::new()
        )
        .await
        .map(|(status, _)| status),
        Ok(StatusCode::OK)
    );
}

/// A leaked certificate is revoked by a CRL and a reload, without replacing the CA: new
/// handshakes with it fail, a connection it opened before the reload gets 401
/// `client_certificate_revoked` on its next request, and other certificates keep
/// working. A CRL file that does not parse is refused naming the key.
#[tokio::test]
async fn a_revoked_certificate_is_refused_after_a_reload() {
    let pki = BranchPki::new();
    let sim = Simulator::start(support::sim_config()).await.unwrap();
    let kyiv_id = pki.client("kyiv-001.branches.example", true, 41);
    let lviv_id = pki.client("lviv-002.branches.example", true, 42);
    let (gateway, file) = start_from(&pki.config(&sim.base_url(), BINDINGS, "", 10_000)).await;
    let ok = Ok((StatusCode::OK, String::new()));
    let leaked = pki.https(&kyiv_id);
    assert_eq!(identify_as(&leaked, &gateway, &sim, "kyiv-001").await, ok);

    let crl = pki.crl("branches.crl.pem", &[41]);
    let with_crl = format!("client_crl = [{:?}]", crl.display().to_string());
    std::fs::write(
        file.path(),
        pki.config(&sim.base_url(), BINDINGS, &with_crl, 10_000),
    )
    .unwrap();
    gateway.reload().unwrap();

    assert_eq!(
        identify_as(&leaked, &gateway, &sim, "kyiv-001").await,
        Ok((
            StatusCode::UNAUTHORIZED,
            "client_certificate_revoked".to_owned()
        )),
        "the connection opened before the reload"
    );
    let fresh = identify_as(&pki.https(&kyiv_id), &gateway, &sim, "kyiv-001").await;
    assert!(fresh.is_err(), "a new handshake is refused: {fresh:?}");
    assert_eq!(
        identify_as(&pki.https(&lviv_id), &gateway, &sim, "lviv-002").await,
        ok,
        "another certificate of the same CA still works"
    );

    let garbage = pki.write(
        "garbage.crl.pem",
        "-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n",
    );
    let bad = format!("client_crl = [{:?}]", garbage.display().to_string());
    let problem =
        diia_gateway::Settings::from_toml(&pki.config(&sim.base_url(), BINDINGS, &bad, 1))
            .err()
            .expect("an unreadable CRL is refused")
            .to_string();
    assert!(problem.starts_with("server.tls.client_crl"), "{problem}");
}

/// Budgets follow the certificate, not the address: two certificates from one address
/// each get the whole client budget, with `auth.client_certs` (keyed on the branch) and
/// without it (every certificate acquirer-wide, keyed on its name).
#[tokio::test]
async fn two_certificates_behind_one_address_have_their_own_budgets() {
    let pki = BranchPki::new();
    let sim = Simulator::start(support::sim_config()).await.unwrap();
    let kyiv_id = pki.client("kyiv-001.branches.example", true, 51);
    let lviv_id = pki.client("lviv-002.branches.example", true, 52);
    for bindings in ["", BINDINGS] {
        let burst = 3;
        let (gateway, _file) = start_from(&pki.config(&sim.base_url(), bindings, "", burst)).await;
        let (kyiv, lviv) = (pki.https(&kyiv_id), pki.https(&lviv_id));
        for _ in 0..burst {
            assert_eq!(
                identify_as(&kyiv, &gateway, &sim, "kyiv-001")
                    .await
                    .map(|(status, _)| status),
                Ok(StatusCode::OK)
            );
        }
        assert_eq!(
            identify_as(&kyiv, &gateway, &sim, "kyiv-001").await,
            Ok((
                StatusCode::TOO_MANY_REQUESTS,
                "client_rate_limited".to_owned()
            )),
            "kyiv spent its budget (bindings: {bindings:?})"
        );
        assert_eq!(
            identify_as(&lviv, &gateway, &sim, "lviv-002")
                .await
                .map(|(status, _)| status),
            Ok(StatusCode::OK),
            "lviv, from the same address, has its own (bindings: {bindings:?})"
        );
    }
}

/// Behind a PROXY-protocol balancer the header comes before the TLS handshake: it names
/// the client, then TLS runs on the bytes after it; without it a trusted peer gets no
/// handshake.
#[tokio::test]
async fn a_proxy_header_comes_before_tls() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let pki = pki();
    let sim = Simulator::start(support::sim_config()).await.unwrap();
    let mut config: FileConfig = support::gateway_config(&sim.base_url());
    config.server.tls = Some(ServerTlsConfig {
        cert: pki.server_cert.clone(),
        key: pki.server_key.clone(),
        client_ca: None,
        client_crl: Vec::new(),
    });
    config.server.trusted_proxies = vec!["127.0.0.1/32".to_owned()];
    config.server.proxy_protocol = true;
    let gateway = support::start_gateway(config).await;

    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(&pki.ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let client_config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config));
    let mut stream = tokio::net::TcpStream::connect(gateway.addr())
        .await
        .unwrap();
    stream
        .write_all(b"PROXY TCP4 203.0.113.9 127.0.0.1 40000 443\r\n")
        .await
        .unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = tokio::time::timeout(support::REQUEST_BOUND, connector.connect(name, stream))
        .await
        .unwrap()
        .expect("TLS after the PROXY header");
    let request = format!(
        "GET /api/v1/auth/acquirer/{DEMO_ACQUIRER_TOKEN} HTTP/1.1\r\nhost: localhost\r\n\
         authorization: Basic {DEMO_AUTH_TOKEN}\r\nconnection: close\r\n\r\n"
    );
    tls.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(support::REQUEST_BOUND, tls.read_to_end(&mut answer))
        .await
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    // The trusted peer's TLS without the header: no handshake.
    let base = format!("https://localhost:{}", gateway.addr().port());
    assert!(
        token_exchange(&https_client(&pki, false), &base)
            .await
            .is_err()
    );
}
