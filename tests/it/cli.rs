//! The binary: config checking, and a full run on the embedded simulator.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use http::{Method, StatusCode};

const BIN: &str = env!("CARGO_BIN_EXE_diia-gateway");

fn write_config(text: &str) -> tempfile::NamedTempFile {
    let mut file = tempfile::Builder::new()
        .suffix(".toml")
        .tempfile()
        .expect("temp file");
    std::io::Write::write_all(&mut file, text.as_bytes()).expect("write config");
    file
}

#[test]
fn check_config_accepts_the_shipped_files() {
    for file in ["config/gateway.toml", "config/demo.toml"] {
        let out = Command::new(BIN)
            .args(["--config", file, "--check-config"])
            .output()
            .expect("run");
        assert!(
            out.status.success(),
            "{file}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn invalid_config_exits_non_zero_naming_the_key() {
    let bad = write_config("[cache]\nttl = \"10m\"\n");
    let out = Command::new(BIN)
        .arg("--config")
        .arg(bad.path())
        .arg("--check-config")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cache.ttl"), "{stderr}");
    let unknown = write_config("[server]\nlisten_typo = \"x\"\n");
    let out = Command::new(BIN)
        .arg("--config")
        .arg(unknown.path())
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("listen_typo"));
    let missing = Command::new(BIN)
        .args(["--config", "/nonexistent/x.toml"])
        .output()
        .expect("run");
    assert_eq!(missing.status.code(), Some(2));
}

/// Kills the gateway if the test fails before stopping it, so no process outlives the test.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Pulls `key=value` out of a text log line.
fn field(line: &str, key: &str) -> Option<String> {
    let start = line.find(&format!("{key}="))? + key.len() + 1;
    let rest = &line[start..];
    let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
    Some(rest[..end].trim_matches('"').to_owned())
}

#[tokio::test]
async fn runs_on_the_embedded_simulator_and_stops_on_sigterm() {
    let config = write_config(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
drain_delay = "200ms"
[log]
format = "text"
[simulator]
listen = "127.0.0.1:0"
"#,
    );
    let mut child = KillOnDrop(
        Command::new(BIN)
            .arg("--config")
            .arg(config.path())
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn"),
    );
    let stderr = child.0.stderr.take().expect("stderr");
    let (lines_tx, lines_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let (mut addr, mut sim) = (None, None);
    while (addr.is_none() || sim.is_none()) && Instant::now() < deadline {
        if let Ok(line) = lines_rx.recv_timeout(Duration::from_millis(200)) {
            if line.contains("diia-gateway listening") {
                addr = field(&line, "addr");
            }
            if line.contains("embedded Diia simulator") {
                sim = field(&line, "simulator");
            }
        }
    }
    let addr = addr.expect("gateway address logged");
    let sim = sim.expect("simulator address logged");

    let client = support::client();
    let token_path = format!(
        "http://{addr}/api/v1/auth/acquirer/{}",
        diia_sim::DEMO_ACQUIRER_TOKEN
    );
    let basic = format!("Basic {}", diia_sim::DEMO_AUTH_TOKEN);
    let token = support::send(
        &client,
        Method::GET,
        &token_path,
        &[("authorization", &basic)],
        String::new(),
    )
    .await;
    assert_eq!(token.status, StatusCode::OK);
    let token = token.json()["token"].as_str().expect("token").to_owned();
    let barcode = support::issue_barcode_at(&client, &sim).await;
    let url = format!("http://{addr}/api/v1/acquirers/document-identification");
    let bearer = format!("Bearer {token}");
    let body = format!(r#"{{"branchId":"b","barcode":"{barcode}"}}"#);
    for expected in ["diia-gateway; fwd=miss; stored", "diia-gateway; hit"] {
        let reply = support::send(
            &client,
            Method::POST,
            &url,
            &[
                ("authorization", &bearer),
                ("content-type", "application/json"),
            ],
            body.clone(),
        )
        .await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.header("cache-status"), Some(expected));
    }
    // The binary's access log (its own batched path): one line per request, the outcome
    // named, the barcode only as a fingerprint, no token.
    let mut access = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while access.len() < 2 && Instant::now() < deadline {
        if let Ok(line) = lines_rx.recv_timeout(Duration::from_millis(100))
            && line.contains("diia_gateway::access")
            && line.contains("endpoint=document_identification")
        {
            access.push(line);
        }
    }
    assert_eq!(access.len(), 2, "two access lines: {access:?}");
    assert!(access[0].contains("outcome=miss") && access[1].contains("outcome=hit"));
    for line in &access {
        assert!(!line.contains(&barcode) && !line.contains(&token), "{line}");
        assert!(
            line.contains("status=200") && line.contains("barcode="),
            "{line}"
        );
    }

    // SIGHUP re-reads the file: a bad file is refused (and logged), a good one applied.
    let original = std::fs::read_to_string(config.path()).expect("config");
    let hangup = |expected: &str| {
        let sent = Command::new("kill")
            .args(["-HUP", &child.0.id().to_string()])
            .status()
            .expect("kill");
        assert!(sent.success());
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(line) = lines_rx.recv_timeout(Duration::from_millis(100))
                && line.contains(expected)
            {
                return;
            }
        }
        panic!("no '{expected}' log line after SIGHUP");
    };
    std::fs::write(
        config.path(),
        original.replace("[log]", "[cache]\nttl = \"10m\"\n[log]"),
    )
    .expect("write");
    hangup("config reload refused");
    std::fs::write(
        config.path(),
        original.replace("[log]", "[cache]\nttl = \"30s\"\n[log]"),
    )
    .expect("write");
    hangup("config reloaded");

    // SIGTERM during load: requests in flight when the signal lands all succeed.
    let slow = support::send(
        &client,
        Method::PUT,
        &format!("http://{sim}/sim/faults"),
        &[],
        r#"{"latency":"600ms"}"#.to_owned(),
    )
    .await;
    assert_eq!(slow.status, StatusCode::OK);
    let mut in_flight = Vec::new();
    for _ in 0..10 {
        let fresh = support::issue_barcode_at(&client, &sim).await;
        let (client, url, bearer) = (client.clone(), url.clone(), bearer.clone());
        let body = format!(r#"{{"branchId":"b","barcode":"{fresh}"}}"#);
        in_flight.push(tokio::spawn(async move {
            support::send(
                &client,
                Method::POST,
                &url,
                &[
                    ("authorization", &bearer),
                    ("content-type", "application/json"),
                ],
                body,
            )
            .await
            .status
        }));
    }
    tokio::time::sleep(Duration::from_millis(150)).await;

    let killed = Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    for request in in_flight {
        assert_eq!(
            request.await.expect("task"),
            StatusCode::OK,
            "an in-flight request failed during the drain"
        );
    }
    let exit_deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.0.try_wait().expect("wait") {
            assert!(status.success(), "exit status {status}");
            break;
        }
        assert!(
            Instant::now() < exit_deadline,
            "gateway did not stop after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn check_config_checks_the_scaleout_section() {
    let dir = tempfile::tempdir().expect("dir");
    let secret = dir.path().join("fleet-secret");
    std::fs::write(&secret, format!("{}\n", "4e".repeat(16) + &"a1".repeat(16))).expect("write");
    for name in ["redis-password", "redis-ca.pem"] {
        std::fs::write(dir.path().join(name), "x\n").expect("write");
    }
    // The shipped example, with its /etc paths pointed at files that exist here.
    let example = std::fs::read_to_string("config/scaleout.toml")
        .expect("example")
        .replace("/etc/diia-gateway", &dir.path().display().to_string());
    let file = write_config(&example);
    let out = Command::new(BIN)
        .args(["--check-config", "--config"])
        .arg(file.path())
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (config, key) in [
        ("[scaleout]\nenabled = true\n", "scaleout.secret_file"),
        (
            "[scaleout]\nenabled = true\nsecret_file = \"/nonexistent/secret\"\n",
            "scaleout.secret_file",
        ),
        (
            "[scaleout]\nenabled = true\nredis_url = \"http://x\"\nsecret_file = \"S\"\n",
            "scaleout.redis_url",
        ),
    ] {
        let placeholder = dir.path().join("placeholder");
        std::fs::write(&placeholder, "00".repeat(32)).expect("write");
        let file = write_config(&config.replace('S', &secret.display().to_string()));
        let out = Command::new(BIN)
            .args(["--check-config", "--config"])
            .arg(file.path())
            .output()
            .expect("run");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(key),
            "{config}: {stderr}"
        );
        let file = write_config(&format!(
            "[scaleout]\nenabled = true\nsecret_file = \"{}\"\n",
            placeholder.display()
        ));
        let out = Command::new(BIN)
            .args(["--check-config", "--config"])
            .arg(file.path())
            .output()
            .expect("run");
        assert!(String::from_utf8_lossy(&out.stderr).contains("placeholder"));
    }
}
