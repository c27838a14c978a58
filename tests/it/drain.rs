//! Graceful drain: readiness fails first, in-flight requests finish, then the listener is gone.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::support;

use std::sync::Arc;
use std::time::Duration;

use http::{Method, StatusCode};
use serde_json::json;
use support::Harness;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_finishes_in_flight_requests_and_fails_readiness_first() {
    let h = Harness::with(
        |_| {},
        |c| {
            c.server.drain_delay = Duration::from_millis(300);
            c.server.drain_timeout = Duration::from_secs(5);
        },
    )
    .await;
    let token = h.session_token().await;
    let mut barcodes = Vec::new();
    for _ in 0..20 {
        barcodes.push(h.issue_barcode().await);
    }
    h.set_faults(json!({"latency": "700ms"})).await;
    let addr = h.gateway.addr();
    let admin = h.gateway.admin_addr();
    let h = Arc::new(h);
    let in_flight: Vec<_> = barcodes
        .into_iter()
        .enumerate()
        .map(|(i, barcode)| {
            let (h, token) = (Arc::clone(&h), token.clone());
            tokio::spawn(async move { h.identify(&token, &format!("b{i}"), &barcode).await.status })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(150)).await;
    h.gateway.shutdown_handle().trigger(); // what SIGTERM does

    let client = support::client();
    let ready = support::send(
        &client,
        Method::GET,
        &format!("http://{admin}/readyz"),
        &[],
        String::new(),
    )
    .await;
    assert_eq!(
        ready.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "readiness fails first"
    );

    for task in in_flight {
        assert_eq!(
            task.await.unwrap(),
            StatusCode::OK,
            "no in-flight request fails"
        );
    }
    // After the delay and the drain the listener is closed: new connections are refused.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "listener closed after the drain"
    );
}

/// `server.workers`: several single-threaded runtimes on `SO_REUSEPORT` sockets serve one
/// gateway (one cache: a re-scan is a hit on whichever worker it lands), and drain too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_core_workers_share_one_gateway_and_drain() {
    let h = Harness::with(
        |_| {},
        |c| {
            c.server.workers = 3;
            c.server.drain_delay = Duration::from_millis(100);
        },
    )
    .await;
    let token = h.session_token().await;
    let barcode = h.issue_barcode().await;
    // New connections each time: the kernel spreads them over the workers.
    for scan in 0..12 {
        let reply = identify_on_a_new_connection(&h, &token, &barcode).await;
        assert_eq!(reply.status, StatusCode::OK, "scan {scan}");
    }
    assert_eq!(h.sim_calls("document_identification").await, 1);
    let Harness { gateway, .. } = h;
    let addr = gateway.addr();
    tokio::time::timeout(Duration::from_secs(10), gateway.stop())
        .await
        .expect("every worker drained");
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

/// Each `server.workers` thread calls Diia on connections of its own (a connection's task
/// runs on the runtime that opened it; a shared pool would hand every call's I/O to another
/// thread and back). One request at a time over new client connections, spread by the
/// kernel over both workers: a shared pool reuses one keep-alive connection for all of
/// them, per-thread pools open exactly one each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_worker_thread_calls_diia_on_its_own_connection() {
    let h = Harness::with(|_| {}, |c| c.server.workers = 2).await;
    let mut barcodes = Vec::new();
    for _ in 0..16 {
        barcodes.push(h.issue_barcode().await);
    }
    // The test's own connection to the simulator is counted by now.
    let before = h.sim_stats().await["connections"].as_u64().unwrap();
    let token = h.session_token().await;
    for (scan, barcode) in barcodes.iter().enumerate() {
        let reply = identify_on_a_new_connection(&h, &token, barcode).await;
        assert_eq!(reply.status, StatusCode::OK, "scan {scan}");
    }
    // The token exchange went through one of the two pools as well.
    let stats = h.sim_stats().await;
    let opened = stats["connections"].as_u64().unwrap() - before;
    assert_eq!(opened, 2, "one connection per worker thread: {stats}");
}

/// One identification on a connection of its own: the kernel spreads new connections over
/// the `server.workers` sockets.
async fn identify_on_a_new_connection(h: &Harness, token: &str, barcode: &str) -> support::Reply {
    let client = support::client();
    let url = h.url("/api/v1/acquirers/document-identification");
    support::send(
        &client,
        Method::POST,
        &url,
        &[
            ("authorization", &format!("Bearer {token}")),
            ("content-type", "application/json"),
        ],
        format!(r#"{{"branchId":"b","barcode":"{barcode}"}}"#),
    )
    .await
}
