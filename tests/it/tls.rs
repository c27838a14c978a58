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
use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair};
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
    let gateway = diia_gateway::start_with(
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
