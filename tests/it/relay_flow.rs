//! The relay's whole flow through the branch listener: a consent push records its route
//! before it leaves, Diia's callback for it is delivered to that caller only (pulled with
//! the same session token, or pushed to the branch's target with Standard Webhooks
//! headers), byte for byte; a requestId routed for one caller cannot be taken by another.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use diia_gateway::config::RelayTargetConfig;
use diia_gateway::relay::{CallbackStore, State};
use http::{HeaderMap, Method, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;

use crate::relay_ingress::{
    Acquirer, BOUNDARY, callback, ingress_path, package_of, records, relay_on, start, start_with,
};
use crate::support::{Harness, OTHER_ACQUIRER_TOKEN, OTHER_AUTH_TOKEN, Reply};

pub(crate) const BRANCH: &str = "kyiv-001";
const SECRET: &[u8] = b"branch-backoffice-signing-secret";

fn pull_path(request_id: &str) -> String {
    format!("/relay/v1/callbacks/{request_id}")
}

async fn pull(h: &Harness, token: &str, request_id: &str, query: &str) -> Reply {
    let bearer = format!("Bearer {token}");
    h.send(
        Method::GET,
        &format!("{}{query}", pull_path(request_id)),
        &[("authorization", &bearer)],
        "",
    )
    .await
}

async fn acknowledge(h: &Harness, token: &str, request_id: &str, query: &str) -> Reply {
    let bearer = format!("Bearer {token}");
    h.send(
        Method::DELETE,
        &format!("{}{query}", pull_path(request_id)),
        &[("authorization", &bearer)],
        "",
    )
    .await
}

/// A consent push through the gateway for a fresh barcode; asserts Diia accepted it.
pub(crate) async fn push_consent(h: &Harness, token: &str, request_id: &str) -> String {
    let barcode = h.issue_barcode().await;
    let reply = h.share(token, BRANCH, &barcode, request_id).await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    barcode
}

pub(crate) async fn wait_for_state(h: &Harness, state: State, count: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while records(h).await[state.code() as usize] != count {
        assert!(
            Instant::now() < deadline,
            "no {count} {state:?} records in time"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn the_caller_that_pushed_pulls_its_package_byte_for_byte_and_nobody_else_does() {
    let acquirer = Acquirer::new();
    let h = start(&acquirer, 0).await;
    let token = h.session_token().await;
    let other = h
        .session_token_for(OTHER_ACQUIRER_TOKEN, OTHER_AUTH_TOKEN)
        .await;
    let request_id = "flow-pull-1";
    push_consent(&h, &token, request_id).await;

    let body = package_of(&acquirer, 3, 150 * 1024);
    let stored = callback(&h, &ingress_path(), Some(request_id), body.clone()).await;
    assert_eq!(stored.status, StatusCode::OK);
    assert_eq!(records(&h).await[State::Pending.code() as usize], 1);

    // Another caller (another session token) gets the same 404 as for "nothing yet".
    let refused = pull(&h, &other, request_id, "").await;
    assert_eq!(refused.status, StatusCode::NOT_FOUND);
    assert_eq!(refused.gateway_code(), "callback_not_found");
    let refused = acknowledge(&h, &other, request_id, "").await;
    assert_eq!(refused.status, StatusCode::NOT_FOUND);

    let pulled = pull(&h, &token, request_id, "").await;
    assert_eq!(pulled.status, StatusCode::OK);
    assert_eq!(
        Sha256::digest(&pulled.body),
        Sha256::digest(body.as_bytes()),
        "body changed on the way"
    );
    assert_eq!(
        pulled.header("content-type").unwrap(),
        format!("multipart/form-data; boundary={BOUNDARY}")
    );
    assert_eq!(
        pulled.header("x-document-request-trace-id"),
        Some(request_id)
    );
    let id = pulled.header("x-relay-record-id").unwrap().to_owned();

    // Acknowledged: the payload is gone, a tombstone is left, and a second pull is a 404.
    let acked = acknowledge(&h, &token, request_id, &format!("?id={id}")).await;
    assert_eq!(acked.status, StatusCode::NO_CONTENT);
    assert_eq!(records(&h).await[State::Delivered.code() as usize], 1);
    let again = pull(&h, &token, request_id, "").await;
    assert_eq!(again.status, StatusCode::NOT_FOUND);
    let store = h.gateway.relay_store().unwrap();
    let id = diia_gateway::relay::RecordId::parse(&id).unwrap();
    let opened = store.fetch(id).await.unwrap().unwrap();
    assert!(opened.envelope.is_none() && opened.route.is_none());
}

#[tokio::test]
async fn a_long_poll_answers_as_soon_as_the_callback_arrives() {
    let acquirer = Acquirer::new();
    let h = Arc::new(start(&acquirer, 0).await);
    let token = h.session_token().await;
    let request_id = "flow-wait-1";
    push_consent(&h, &token, request_id).await;
    let waiting = {
        let (h, token) = (Arc::clone(&h), token.clone());
        tokio::spawn(async move {
            let started = Instant::now();
            let reply = pull(&h, &token, request_id, "?wait=20s").await;
            (reply, started.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let body = package_of(&acquirer, 4, 4096);
    assert_eq!(
        callback(&h, &ingress_path(), Some(request_id), body.clone())
            .await
            .status,
        StatusCode::OK
    );
    let (reply, waited) = waiting.await.unwrap();
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.body.as_ref(), body.as_bytes());
    assert!(waited < Duration::from_secs(10), "waited {waited:?}");
}

#[tokio::test]
async fn a_callback_that_arrives_before_its_route_is_delivered_once_routed() {
    let acquirer = Acquirer::new();
    let h = start(&acquirer, 0).await;
    let token = h.session_token().await;
    let request_id = "flow-orphan-1";
    let body = package_of(&acquirer, 5, 4096);
    callback(&h, &ingress_path(), Some(request_id), body.clone()).await;
    assert_eq!(records(&h).await[State::Orphan.code() as usize], 1);
    // An orphan is nobody's: no caller can pull it.
    assert_eq!(
        pull(&h, &token, request_id, "").await.status,
        StatusCode::NOT_FOUND
    );
    push_consent(&h, &token, request_id).await;
    let pulled = pull(&h, &token, request_id, "").await;
    assert_eq!(pulled.status, StatusCode::OK);
    assert_eq!(pulled.body.as_ref(), body.as_bytes());
}

#[tokio::test]
async fn a_request_id_routed_for_one_caller_is_409_for_another_and_never_pushed() {
    let acquirer = Acquirer::new();
    let h = start(&acquirer, 0).await;
    let token = h.session_token().await;
    let other = h
        .session_token_for(OTHER_ACQUIRER_TOKEN, OTHER_AUTH_TOKEN)
        .await;
    let request_id = "flow-taken-1";
    let first = push_consent(&h, &token, request_id).await;
    let pushes = h.sim_calls("document_request").await;

    let barcode = h.issue_barcode().await;
    let taken = h.share(&other, BRANCH, &barcode, request_id).await;
    assert_eq!(taken.status, StatusCode::CONFLICT, "{:?}", taken.body);
    assert_eq!(taken.gateway_code(), "request_id_routed");
    // The same caller for another branch is refused too.
    let taken = h.share(&token, "lviv-002", &barcode, request_id).await;
    assert_eq!(taken.gateway_code(), "request_id_routed");
    assert_eq!(h.sim_calls("document_request").await, pushes, "a push left");

    // The owner's retry of its own push is accepted (replayed, not pushed twice).
    let retry = h.share(&token, BRANCH, &first, request_id).await;
    assert_eq!(retry.status, StatusCode::OK, "{:?}", retry.body);
    assert_eq!(h.sim_calls("document_request").await, pushes);
}

/// Pass-through: the branch's SDK routes a push with session token T1, then logs in again
/// before it pulls and gets T2 for the same acquirer token (the gateway drops a token
/// from its cache before Diia's expiry). The route also names the login T1 was issued for,
/// so T2 pulls and acknowledges the package, byte for byte (before, the route named T1's
/// digest alone and T2 got 404). A token for another acquirer token, and a token Diia
/// issued without this gateway's exchange (its login unknown here), still get 404.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_login_for_the_same_acquirer_token_pulls_the_package_routed_before_it() {
    let acquirer = Acquirer::new();
    // Simulated tokens live 4 s; with a 2.5 s margin the gateway hands out a new one
    // within 1.5 s.
    let h = Harness::with(
        |sim| sim.session_ttl = Duration::from_secs(4),
        |config| {
            relay_on(config, &acquirer);
            config.tokens.refresh_margin = Duration::from_millis(2500);
        },
    )
    .await;
    let first = h.session_token().await;
    let request_id = "flow-relogin-1";
    push_consent(&h, &first, request_id).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let second = loop {
        let token = h.session_token().await;
        if token != first {
            break token;
        }
        assert!(Instant::now() < deadline, "no new session token in time");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    let body = package_of(&acquirer, 6, 64 * 1024);
    let stored = callback(&h, &ingress_path(), Some(request_id), body.clone()).await;
    assert_eq!(stored.status, StatusCode::OK);
    assert_eq!(records(&h).await[State::Pending.code() as usize], 1);

    let other = h
        .session_token_for(OTHER_ACQUIRER_TOKEN, OTHER_AUTH_TOKEN)
        .await;
    let refused = pull(&h, &other, request_id, "").await;
    assert_eq!(refused.status, StatusCode::NOT_FOUND);
    assert_eq!(refused.gateway_code(), "callback_not_found");
    let unknown = crate::relay_attack::token_from_diia(&h).await;
    assert_eq!(
        pull(&h, &unknown, request_id, "").await.status,
        StatusCode::NOT_FOUND,
        "a token this gateway did not issue has no login here"
    );

    let pulled = pull(&h, &second, request_id, "").await;
    assert_eq!(pulled.status, StatusCode::OK, "{:?}", pulled.body);
    assert!(
        pulled.body.as_ref() == body.as_bytes(),
        "body changed on the way"
    );
    assert_eq!(
        pulled.header("content-type").unwrap(),
        format!("multipart/form-data; boundary={BOUNDARY}")
    );
    let id = pulled.header("x-relay-record-id").unwrap().to_owned();
    let acked = acknowledge(&h, &second, request_id, &format!("?id={id}")).await;
    assert_eq!(acked.status, StatusCode::NO_CONTENT);
    assert_eq!(records(&h).await[State::Delivered.code() as usize], 1);
}

#[tokio::test]
async fn the_pull_path_is_404_while_the_relay_is_off_and_its_query_is_checked() {
    let off = Harness::start().await;
    let token = off.session_token().await;
    let reply = pull(&off, &token, "any", "").await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    assert_eq!(reply.gateway_code(), "unknown_route");

    let acquirer = Acquirer::new();
    let h = start(&acquirer, 0).await;
    let token = h.session_token().await;
    for query in ["?wait=soon", "?id=nothex", "?other=1"] {
        let reply = pull(&h, &token, "r", query).await;
        assert_eq!(reply.status, StatusCode::UNPROCESSABLE_ENTITY, "{query}");
        assert_eq!(reply.gateway_code(), "invalid_relay_query");
    }
    let reply = h.send(Method::GET, &pull_path("r"), &[], "").await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "no credentials");
    let reply = h
        .send(
            Method::POST,
            &pull_path("r"),
            &[("authorization", &format!("Bearer {token}"))],
            "",
        )
        .await;
    assert_eq!(reply.status, StatusCode::METHOD_NOT_ALLOWED);
}

/// What a branch backend received: headers and body.
pub(crate) type Received = Arc<Mutex<Vec<(HeaderMap, Bytes)>>>;

/// A branch backend on loopback that records every POST and answers `{"success":true}`.
async fn branch_backend() -> (SocketAddr, Received) {
    scripted_backend(Arc::new(AtomicU16::new(200))).await
}

/// A branch backend that records every POST and answers with the status `status` holds
/// at the time (`{"success":true}` as the body).
pub(crate) async fn scripted_backend(status: Arc<AtomicU16>) -> (SocketAddr, Received) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let received: Received = Arc::default();
    let sink = Arc::clone(&received);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let (sink, status) = (Arc::clone(&sink), Arc::clone(&status));
            tokio::spawn(async move {
                let service = service_fn(move |request: http::Request<hyper::body::Incoming>| {
                    let (sink, status) = (Arc::clone(&sink), status.load(Ordering::SeqCst));
                    async move {
                        let (parts, body) = request.into_parts();
                        let body = body.collect().await?.to_bytes();
                        sink.lock().unwrap().push((parts.headers, body));
                        let mut response = http::Response::new(Full::new(Bytes::from_static(
                            br#"{"success":true}"#,
                        )));
                        *response.status_mut() = StatusCode::from_u16(status).unwrap();
                        Ok::<_, hyper::Error>(response)
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, received)
}

/// A `[[callback_relay.target]]` at `addr` serving [`BRANCH`], signing with [`SECRET`].
pub(crate) fn target_at(acquirer: &Acquirer, addr: SocketAddr) -> RelayTargetConfig {
    let secret_file = acquirer.path("whsec");
    std::fs::write(
        &secret_file,
        format!(
            "whsec_{}\n",
            base64::Engine::encode(&base64::engine::general_purpose::STANDARD, SECRET)
        ),
    )
    .unwrap();
    RelayTargetConfig {
        name: "backoffice".into(),
        url: format!("http://{addr}/diia/documents"),
        signing_secret_file: secret_file,
        branch_ids: vec![BRANCH.into()],
    }
}

#[tokio::test]
async fn a_package_is_pushed_to_its_branch_target_signed_byte_for_byte_and_once() {
    let acquirer = Acquirer::new();
    let (addr, received) = branch_backend().await;
    let target = target_at(&acquirer, addr);
    let h = start_with(&acquirer, |relay| relay.target = vec![target]).await;
    let token = h.session_token().await;
    let request_id = "flow-push-1";
    push_consent(&h, &token, request_id).await;
    let body = package_of(&acquirer, 6, 150 * 1024);
    assert_eq!(
        callback(&h, &ingress_path(), Some(request_id), body.clone())
            .await
            .status,
        StatusCode::OK
    );
    wait_for_state(&h, State::Delivered, 1).await;
    // Diia sends it again (same bytes), and once with other bytes: acknowledged, counted,
    // never delivered a second time.
    for again in [body.clone(), package_of(&acquirer, 9, 1024)] {
        let reply = callback(&h, &ingress_path(), Some(request_id), again).await;
        assert_eq!(reply.status, StatusCode::OK);
    }
    let ingested = |result: &'static str| {
        let h = &h;
        async move {
            h.metric(&format!(
                "diia_gateway_relay_ingest_total{{result=\"{result}\"}}"
            ))
            .await
        }
    };
    assert_eq!(ingested("duplicate").await, 1.0);
    assert_eq!(ingested("conflict").await, 1.0);
    tokio::time::sleep(Duration::from_millis(600)).await;
    let received = received.lock().unwrap().clone();
    assert_eq!(received.len(), 1, "delivered once");
    let (headers, delivered) = &received[0];
    assert_eq!(Sha256::digest(delivered), Sha256::digest(body.as_bytes()));
    assert_eq!(
        headers["content-type"],
        format!("multipart/form-data; boundary={BOUNDARY}")
    );
    assert_eq!(headers["x-document-request-trace-id"], request_id);
    standardwebhooks::Webhook::from_bytes(SECRET.to_vec())
        .unwrap()
        .verify(delivered, headers)
        .expect("signature verifies");
    // Delivered by push: nothing is left to pull.
    assert_eq!(
        pull(&h, &token, request_id, "").await.status,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn a_token_diia_refuses_records_no_route_and_cannot_squat_a_request_id() {
    let acquirer = Acquirer::new();
    let h = start(&acquirer, 0).await;
    let request_id = "flow-squat-1";
    // Junk session tokens (well-formed, never accepted by Diia) push with a requestId.
    for n in 0..5 {
        let barcode = h.issue_barcode().await;
        let junk = format!("junk-session-token-{n:04}");
        let refused = h.share(&junk, BRANCH, &barcode, request_id).await;
        assert!(
            refused.status.is_client_error() || refused.status.is_server_error(),
            "{:?}",
            refused.status
        );
    }
    let store = h.gateway.relay_store().unwrap();
    let route = store
        .route(
            "acquirer-1".into(),
            request_id.into(),
            diia_gateway::relay::now_ms(),
        )
        .await
        .unwrap();
    assert!(route.is_none(), "a refused push left a route");
    // The real caller's push with that requestId goes through, and its package is its own.
    let token = h.session_token().await;
    push_consent(&h, &token, request_id).await;
    let body = package_of(&acquirer, 7, 4096);
    callback(&h, &ingress_path(), Some(request_id), body.clone()).await;
    let pulled = pull(&h, &token, request_id, "").await;
    assert_eq!(pulled.status, StatusCode::OK);
    assert_eq!(pulled.body.as_ref(), body.as_bytes());
}
