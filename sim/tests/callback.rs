//! The simulator plays Diia's part after a consent push: over real sockets, a fake partner
//! receives the multipart package, every part is a CMS `EnvelopedData` for the acquirer's
//! certificate (parsed with `cms`, decrypted with the certificate's key), the trace header is
//! there, a 503 is retried, `{"success":true}` ends it, a refusal sends nothing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aes::cipher::block_padding::Pkcs7;
use aes::cipher::{BlockDecryptMut, KeyIvInit};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use cms::cert::IssuerAndSerialNumber;
use cms::content_info::ContentInfo;
use cms::enveloped_data::{EnvelopedData, RecipientIdentifier, RecipientInfo};
use diia_sim::callback::Consent;
use diia_sim::{DEMO_ACQUIRER_TOKEN, DEMO_AUTH_TOKEN, SimConfig, SimHandle, Simulator};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rsa::pkcs8::DecodePrivateKey;
use rsa::{Pkcs1v15Encrypt, RsaPrivateKey};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OnceCell, mpsc};
use x509_cert::der::oid::db::rfc5911::ID_ENVELOPED_DATA;
use x509_cert::der::{Decode, DecodePem};

/// Every wait in these tests.
const BOUND: Duration = Duration::from_secs(30);

/// One request the fake partner received.
struct Received {
    headers: HeaderMap,
    body: Bytes,
}

/// A partner callback endpoint answering from a script (last answer repeats).
struct Partner {
    addr: SocketAddr,
    received: mpsc::UnboundedReceiver<Received>,
}

async fn partner(script: Vec<(u16, &'static str)>) -> Partner {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, received) = mpsc::unbounded_channel();
    let script = Arc::new(Mutex::new(script));
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let tx = tx.clone();
            let script = Arc::clone(&script);
            let service = service_fn(move |request: Request<Incoming>| {
                let tx = tx.clone();
                let script = Arc::clone(&script);
                async move {
                    let (parts, body) = request.into_parts();
                    let body = body.collect().await?.to_bytes();
                    let _ = tx.send(Received {
                        headers: parts.headers,
                        body,
                    });
                    let (status, text) = {
                        let mut script = script.lock().unwrap();
                        if script.len() > 1 {
                            script.remove(0)
                        } else {
                            script[0]
                        }
                    };
                    let mut response = Response::new(Full::new(Bytes::from(text)));
                    *response.status_mut() = StatusCode::from_u16(status).unwrap();
                    if status == 503 {
                        response
                            .headers_mut()
                            .insert("retry-after", http::HeaderValue::from_static("1"));
                    }
                    Ok::<_, hyper::Error>(response)
                }
            });
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Partner { addr, received }
}

/// One generated certificate + key for the whole test binary (RSA key generation is slow
/// in debug builds); each simulator loads it through `acquirer_cert_file`.
struct Acquirer {
    cert_file: std::path::PathBuf,
    cert_pem: String,
    key: RsaPrivateKey,
}

async fn acquirer() -> &'static Acquirer {
    static ACQUIRER: OnceCell<Acquirer> = OnceCell::const_new();
    ACQUIRER
        .get_or_init(|| async {
            let made = tokio::task::spawn_blocking(diia_sim::AcquirerCertificate::generate)
                .await
                .unwrap()
                .unwrap();
            let cert_file = std::env::temp_dir().join(format!(
                "diia-sim-acquirer-{}-{:x}.pem",
                std::process::id(),
                fastrand::u64(..)
            ));
            std::fs::write(&cert_file, made.pem()).unwrap();
            Acquirer {
                cert_file,
                cert_pem: made.pem().to_owned(),
                key: RsaPrivateKey::from_pkcs8_pem(made.private_key_pem().unwrap()).unwrap(),
            }
        })
        .await
}

async fn simulator(callback: Option<SocketAddr>, consent: Consent) -> SimHandle {
    let config = SimConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        callback_url: callback.map(|addr| format!("http://{addr}/diia/callback/t0k3n")),
        consent_delay: Duration::from_millis(100),
        consent,
        acquirer_cert_file: Some(acquirer().await.cert_file.clone()),
        ..SimConfig::default()
    };
    config.validate().unwrap();
    Simulator::start(config).await.unwrap()
}

/// One HTTP/1.1 request over a fresh connection.
async fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    authorization: Option<String>,
    body: &str,
) -> (StatusCode, HeaderMap, String) {
    let exchange = async {
        let stream = TcpStream::connect(addr).await.unwrap();
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(connection);
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header("host", addr.to_string())
            .header("content-type", "application/json");
        if let Some(authorization) = authorization {
            request = request.header("authorization", authorization);
        }
        let response = sender
            .send_request(
                request
                    .body(Full::new(Bytes::from(body.to_owned())))
                    .unwrap(),
            )
            .await
            .unwrap();
        let (parts, body) = response.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        (
            parts.status,
            parts.headers,
            String::from_utf8(body.to_vec()).unwrap(),
        )
    };
    tokio::time::timeout(BOUND, exchange).await.unwrap()
}

async fn session(sim: &SimHandle) -> String {
    let (status, _, body) = call(
        sim.addr(),
        "GET",
        &format!("/api/v1/auth/acquirer/{DEMO_ACQUIRER_TOKEN}"),
        Some(format!("Basic {DEMO_AUTH_TOKEN}")),
        "",
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    format!("Bearer {}", json["token"].as_str().unwrap())
}

/// A scan and a `document-request` by barcode; returns the barcode.
async fn share_by_barcode(sim: &SimHandle, request_id: &str) -> String {
    let bearer = session(sim).await;
    let (status, _, body) = call(sim.addr(), "POST", "/sim/barcodes", None, "{}").await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let issued: serde_json::Value = serde_json::from_str(&body).unwrap();
    let barcode = issued["barcode"].as_str().unwrap().to_owned();
    let request =
        format!(r#"{{"branchId":"b1","barcode":"{barcode}","requestId":"{request_id}"}}"#);
    let (status, _, body) = call(
        sim.addr(),
        "POST",
        "/api/v1/acquirers/document-request",
        Some(bearer),
        &request,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    barcode
}

async fn stats(sim: &SimHandle) -> serde_json::Value {
    let (_, _, body) = call(sim.addr(), "GET", "/sim/stats", None, "").await;
    serde_json::from_str(&body).unwrap()
}

async fn next(partner: &mut Partner) -> Received {
    tokio::time::timeout(BOUND, partner.received.recv())
        .await
        .expect("a callback within the bound")
        .expect("partner running")
}

/// The multipart parts, parsed with `multer`: name → (filename, content type, text).
async fn parts(received: &Received) -> HashMap<String, (Option<String>, Option<String>, String)> {
    let content_type = received.headers["content-type"].to_str().unwrap();
    assert!(
        content_type.starts_with("multipart/form-data"),
        "{content_type}"
    );
    let boundary = multer::parse_boundary(content_type).unwrap();
    let body = received.body.clone();
    let stream = futures_util::stream::once(async move { Ok::<_, std::io::Error>(body) });
    let mut multipart = multer::Multipart::new(stream, boundary);
    let mut parts = HashMap::new();
    while let Some(field) = multipart.next_field().await.unwrap() {
        let name = field.name().unwrap().to_owned();
        let file_name = field.file_name().map(str::to_owned);
        let content_type = field.content_type().map(ToString::to_string);
        let text = field.text().await.unwrap();
        assert!(
            parts
                .insert(name, (file_name, content_type, text))
                .is_none()
        );
    }
    parts
}

/// base64 → DER `ContentInfo(EnvelopedData)` → its single KeyTrans recipient must be the
/// acquirer's certificate; decrypted with the certificate's key.
fn open(base64_text: &str, acquirer: &Acquirer) -> Vec<u8> {
    let der = STANDARD.decode(base64_text.trim()).unwrap();
    let info = ContentInfo::from_der(&der).unwrap();
    assert_eq!(info.content_type, ID_ENVELOPED_DATA);
    let enveloped: EnvelopedData = info.content.decode_as().unwrap();
    let certificate = x509_cert::Certificate::from_pem(acquirer.cert_pem.as_bytes()).unwrap();
    let expected = IssuerAndSerialNumber {
        issuer: certificate.tbs_certificate.issuer.clone(),
        serial_number: certificate.tbs_certificate.serial_number.clone(),
    };
    let recipients: Vec<&RecipientInfo> = enveloped.recip_infos.0.iter().collect();
    assert_eq!(recipients.len(), 1);
    let RecipientInfo::Ktri(ktri) = recipients[0] else {
        panic!("not key transport: {:?}", recipients[0]);
    };
    assert_eq!(
        ktri.rid,
        RecipientIdentifier::IssuerAndSerialNumber(expected)
    );
    let key = acquirer
        .key
        .decrypt(Pkcs1v15Encrypt, ktri.enc_key.as_bytes())
        .unwrap();
    let content = &enveloped.encrypted_content;
    let iv: x509_cert::der::asn1::OctetString = content
        .content_enc_alg
        .parameters
        .as_ref()
        .unwrap()
        .decode_as()
        .unwrap();
    cbc::Decryptor::<aes::Aes256>::new_from_slices(&key, iv.as_bytes())
        .unwrap()
        .decrypt_padded_vec_mut::<Pkcs7>(content.encrypted_content.as_ref().unwrap().as_bytes())
        .unwrap()
}

#[tokio::test]
async fn consent_sends_an_enveloped_package_retried_until_success() {
    let acquirer = acquirer().await;
    let mut partner = partner(vec![(503, "busy"), (200, r#"{"success":true}"#)]).await;
    let sim = simulator(Some(partner.addr), Consent::Accept).await;

    let (status, headers, pem) =
        call(sim.addr(), "GET", "/sim/acquirer-certificate", None, "").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["content-type"], "application/x-pem-file");
    assert_eq!(pem, acquirer.cert_pem);

    let barcode = share_by_barcode(&sim, "req-0001").await;
    let first = next(&mut partner).await;
    let second = next(&mut partner).await;
    assert_eq!(first.body, second.body, "a retry resends the same package");
    for received in [&first, &second] {
        assert_eq!(received.headers["x-document-request-trace-id"], "req-0001");
    }
    assert!(
        (150_000..400_000).contains(&second.body.len()),
        "a ~200 KB package: {}",
        second.body.len()
    );

    let parts = parts(&second).await;
    let mut names: Vec<&str> = parts.keys().map(String::as_str).collect();
    names.sort_unstable();
    assert_eq!(names, ["encodeData", "encryptedFile", "encryptedFileName"]);
    let (file_name, content_type, file) = &parts["encryptedFile"];
    assert_eq!(content_type.as_deref(), Some("application/octet-stream"));
    let name = &parts["encryptedFileName"].2;
    assert_eq!(file_name.as_deref(), Some(name.as_str()));
    assert!(
        name.starts_with(&format!("internal-passport-{barcode}-")),
        "{name}"
    );
    assert!(name.ends_with(".pdf.p7s.p7e"), "{name}");

    let document = open(file, acquirer);
    assert!(document.starts_with(b"%PDF-"), "the document is a PDF");
    let metadata: serde_json::Value =
        serde_json::from_slice(&open(&parts["encodeData"].2, acquirer)).unwrap();
    assert_eq!(metadata["requestId"], "req-0001");
    assert_eq!(metadata["barcode"], barcode.as_str());
    assert!(metadata["data"]["internal-passport"].is_object());

    // Acknowledged: nothing more arrives.
    let more = tokio::time::timeout(Duration::from_millis(1500), partner.received.recv()).await;
    assert!(more.is_err(), "no callback after {{\"success\":true}}");
    let stats = stats(&sim).await;
    assert_eq!(stats["callbacks_sent"], 1, "{stats}");
    assert_eq!(stats["callbacks_acknowledged"], 1, "{stats}");
    assert_eq!(stats["callbacks_failed_attempts"], 1, "{stats}");
}

#[tokio::test]
async fn success_false_and_errors_are_retried_then_given_up() {
    let mut partner = partner(vec![(200, r#"{"success":false}"#), (500, "{}")]).await;
    let config = SimConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        callback_url: Some(format!("http://{}/cb", partner.addr)),
        consent_delay: Duration::from_millis(10),
        callback_retry_for: Duration::from_secs(2),
        acquirer_cert_file: Some(acquirer().await.cert_file.clone()),
        ..SimConfig::default()
    };
    let sim = Simulator::start(config).await.unwrap();
    share_by_barcode(&sim, "req-0002").await;
    next(&mut partner).await;
    next(&mut partner).await;
    let deadline = tokio::time::Instant::now() + BOUND;
    let stats = loop {
        let stats = stats(&sim).await;
        if stats["callbacks_given_up"] == 1 || tokio::time::Instant::now() > deadline {
            break stats;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(stats["callbacks_given_up"], 1, "{stats}");
    assert_eq!(stats["callbacks_acknowledged"], 0, "{stats}");
    assert!(
        stats["callbacks_failed_attempts"].as_u64().unwrap() >= 2,
        "{stats}"
    );
}

#[tokio::test]
async fn a_refused_consent_sends_nothing() {
    let mut partner = partner(vec![(200, r#"{"success":true}"#)]).await;
    let sim = simulator(Some(partner.addr), Consent::Refuse).await;
    share_by_barcode(&sim, "req-0003").await;
    let deadline = tokio::time::Instant::now() + BOUND;
    while stats(&sim).await["callbacks_refused"] != 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "refusal not counted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stats = stats(&sim).await;
    assert_eq!(stats["callbacks_sent"], 0, "{stats}");
    assert!(
        partner.received.try_recv().is_err(),
        "no package after a refusal"
    );

    // The knob flips at run time: accepted from now on.
    let (status, _, body) = call(
        sim.addr(),
        "PUT",
        "/sim/consent",
        None,
        r#"{"consent":"accept"}"#,
    )
    .await;
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::OK, r#"{"consent":"accept"}"#)
    );
    share_by_barcode(&sim, "req-0004").await;
    let received = next(&mut partner).await;
    assert_eq!(received.headers["x-document-request-trace-id"], "req-0004");
}

#[tokio::test]
async fn a_deep_link_consent_sends_one_part_per_document_type() {
    let acquirer = acquirer().await;
    let mut partner = partner(vec![(200, r#"{"success":true}"#)]).await;
    let sim = simulator(Some(partner.addr), Consent::Accept).await;
    let bearer = session(&sim).await;
    let (status, _, body) = call(
        sim.addr(),
        "POST",
        "/api/v2/acquirers/branch/b1/offer-request/dynamic",
        Some(bearer),
        r#"{"offerId":"o1","requestId":"req-0005"}"#,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let received = next(&mut partner).await;
    assert_eq!(received.headers["x-document-request-trace-id"], "req-0005");
    let parts = parts(&received).await;
    let mut names: Vec<&str> = parts.keys().map(String::as_str).collect();
    names.sort_unstable();
    assert_eq!(names, ["encodeData", "internal-passport"]);
    assert!(open(&parts["internal-passport"].2, acquirer).starts_with(b"%PDF-"));
    let metadata: serde_json::Value =
        serde_json::from_slice(&open(&parts["encodeData"].2, acquirer)).unwrap();
    assert!(metadata["data"]["internal-passport"].is_array());
}

#[tokio::test]
async fn without_a_callback_url_nothing_is_sent_and_the_certificate_is_generated() {
    let sim = Simulator::start(SimConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        consent_delay: Duration::from_millis(10),
        ..SimConfig::default()
    })
    .await
    .unwrap();
    share_by_barcode(&sim, "req-0006").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stats = stats(&sim).await;
    assert_eq!(stats["callbacks_sent"], 0, "{stats}");
    assert_eq!(stats["callbacks_refused"], 0, "{stats}");
    let (status, _, pem) = call(sim.addr(), "GET", "/sim/acquirer-certificate", None, "").await;
    assert_eq!(status, StatusCode::OK);
    let made = diia_sim::AcquirerCertificate::from_pem(&pem).unwrap();
    assert_ne!(
        made.pem(),
        acquirer().await.cert_pem,
        "a fresh certificate per simulator"
    );
}

#[tokio::test]
async fn bad_callback_settings_are_refused() {
    for url in ["https://127.0.0.1:1/cb", "127.0.0.1:1/cb", "http:///cb"] {
        let config = SimConfig {
            callback_url: Some(url.to_owned()),
            ..SimConfig::default()
        };
        assert!(config.validate().is_err(), "{url}");
    }
    let started = Simulator::start(SimConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        callback_url: Some("https://127.0.0.1:1/cb".to_owned()),
        ..SimConfig::default()
    })
    .await;
    assert!(started.is_err(), "an https callback_url fails the start");
    let not_a_certificate =
        std::env::temp_dir().join(format!("diia-sim-bad-{}.pem", std::process::id()));
    std::fs::write(&not_a_certificate, "not a certificate").unwrap();
    let started = Simulator::start(SimConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        acquirer_cert_file: Some(not_a_certificate.clone()),
        ..SimConfig::default()
    })
    .await;
    let _ = std::fs::remove_file(&not_a_certificate);
    assert!(
        started.is_err(),
        "an unreadable acquirer_cert_file fails the start"
    );
}

#[test]
fn the_demo_certificate_loads() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/demo/acquirer-cert.pem");
    let pem = std::fs::read_to_string(path).unwrap();
    let loaded = diia_sim::AcquirerCertificate::from_pem(&pem).unwrap();
    assert!(loaded.private_key_pem().is_none());
    assert!(!loaded.envelope(b"x").unwrap().is_empty());
}

#[tokio::test]
async fn a_stopped_simulator_sends_no_more_retries() {
    let mut partner = partner(vec![(503, "busy")]).await;
    let sim = simulator(Some(partner.addr), Consent::Accept).await;
    share_by_barcode(&sim, "req-0007").await;
    next(&mut partner).await;
    sim.stop().await;
    while partner.received.try_recv().is_ok() {}
    let more = tokio::time::timeout(Duration::from_millis(2500), partner.received.recv()).await;
    assert!(more.is_err(), "a retry after the simulator stopped");
}
