//! A push parsed by a receiver written as Diia's official Python SDK example writes it
//! (`tests/sdk/receiver.py`: Starlette's `request.form()`, `encodeData`, the document-type
//! file parts or `encryptedFile` + `encryptedFileName`, files read as text): the relay's
//! push is the request Diia would have sent, so the SDK's receiver needs no change.
//! Needs `python3` with `starlette`, `uvicorn` and `python-multipart` (`.ci/run` installs
//! them); without them the test prints a note and passes, except under `CI=true`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Stdio;
use std::time::Duration;

use diia_gateway::config::RelayTargetConfig;
use diia_gateway::relay::State;
use http::StatusCode;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::relay_flow::{push_consent, target_at, wait_for_state};
use crate::relay_ingress::{
    Acquirer, BOUNDARY, barcode_package, callback, enveloped_for, ingress_path, start_with,
};

/// The receiver's Python modules are importable.
fn python_ready() -> bool {
    std::process::Command::new("python3")
        .args(["-c", "import starlette, uvicorn, multipart"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// Starts the receiver; returns it and its port.
async fn start_receiver(log: &std::path::Path) -> (Child, u16) {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sdk/receiver.py");
    let mut child = Command::new("python3")
        .arg(script)
        .env("RECEIVER_LOG", log)
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python3 starts");
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
        .await
        .expect("the receiver reports its port in time")
        .unwrap()
        .expect("a port line");
    let port = line.strip_prefix("port=").unwrap().parse().unwrap();
    (child, port)
}

/// A deep-link package: two `internal-passport` files and `encodeData`.
fn deep_link_package(files: &[(&str, &str)], encode_data: &str) -> String {
    let mut body = String::new();
    for (name, text) in files {
        body.push_str(&format!(
            "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"internal-passport\"; filename=\"{name}\"\r\n\
             Content-Type: application/octet-stream\r\n\r\n{text}\r\n"
        ));
    }
    body.push_str(&format!(
        "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"encodeData\"\r\n\r\n{encode_data}\r\n--{BOUNDARY}--\r\n"
    ));
    body
}

#[tokio::test]
async fn the_official_sdk_receiver_parses_what_the_relay_pushes() {
    if !python_ready() {
        assert!(
            std::env::var("CI").is_err(),
            "python3 with starlette, uvicorn and python-multipart is required under CI"
        );
        eprintln!("note: python3 with starlette/uvicorn/python-multipart missing; skipped");
        return;
    }
    let acquirer = Acquirer::new();
    let log = acquirer.path("receiver.jsonl");
    let (_receiver, port) = start_receiver(&log).await;
    let target = RelayTargetConfig {
        url: format!("http://127.0.0.1:{port}/diia/documents-receiver"),
        ..target_at(&acquirer, ([127, 0, 0, 1], port).into())
    };
    let h = start_with(&acquirer, |relay| relay.target = vec![target]).await;
    let token = h.session_token().await;

    let file = enveloped_for(&acquirer.cert_der, &[1u8; 40 * 1024]);
    let meta = enveloped_for(&acquirer.cert_der, b"metadata");
    push_consent(&h, &token, "sdk-barcode-1").await;
    let reply = callback(
        &h,
        &ingress_path(),
        Some("sdk-barcode-1"),
        barcode_package(&file, &meta),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);

    let first = enveloped_for(&acquirer.cert_der, &[2u8; 20 * 1024]);
    let second = enveloped_for(&acquirer.cert_der, &[3u8; 20 * 1024]);
    let names = [
        "internal-passport-2858364170864-02.04.2021-09_48_26.pdf.p7s.p7e",
        "internal-passport-2858364170864-02.04.2021-09_48_27.pdf.p7s.p7e",
    ];
    push_consent(&h, &token, "sdk-deeplink-1").await;
    let body = deep_link_package(&[(names[0], &first), (names[1], &second)], &meta);
    let reply = callback(&h, &ingress_path(), Some("sdk-deeplink-1"), body).await;
    assert_eq!(reply.status, StatusCode::OK);

    wait_for_state(&h, State::Delivered, 2).await;
    let parsed: Vec<Value> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(parsed.len(), 2, "one POST each, both answered success");
    let by_id = |id: &str| {
        parsed
            .iter()
            .find(|p| p["request_id"] == id)
            .unwrap_or_else(|| panic!("{id} not received"))
    };
    let barcode = by_id("sdk-barcode-1");
    assert_eq!(barcode["encode_data"], meta.as_str());
    assert_eq!(barcode["files"][0]["name"], "doc.p7s.p7e");
    assert_eq!(barcode["files"][0]["text"], file.as_str());
    assert!(barcode["webhook_id"].as_str().unwrap().starts_with("msg_"));
    let deep = by_id("sdk-deeplink-1");
    assert_eq!(deep["encode_data"], meta.as_str());
    assert_eq!(deep["files"].as_array().unwrap().len(), 2);
    assert_eq!(deep["files"][0]["name"], names[0]);
    assert_eq!(deep["files"][0]["text"], first.as_str());
    assert_eq!(deep["files"][1]["text"], second.as_str());
}
