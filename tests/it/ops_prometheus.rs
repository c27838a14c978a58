//! The operations kit against the real thing: `promtool` checks and unit-tests the shipped
//! rules; a real Prometheus on loopback scrapes a real gateway in front of the simulator,
//! sees the matching alerts fire when the simulator is broken and resolve when it heals,
//! and answers every PromQL query of the shipped Grafana dashboard with data.
//!
//! Needs Debian's `prometheus` package (`prometheus` and `promtool`); `.ci/run` installs
//! it. Missing binaries fail the test under `CI=true` and skip it (with a message) elsewhere.

use crate::support;

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;
use support::Harness;
use support::prometheus::{
    Prometheus, api, assert_data, dashboard_queries, is_relay, is_scaleout, repo, tool,
};

const RULES: &str = "deploy/prometheus/diia-gateway.rules.yml";
const RULE_TESTS: [&str; 2] = [
    "deploy/prometheus/diia-gateway.rules.test.yml",
    "deploy/prometheus/diia-gateway.rules.slow.test.yml",
];

#[test]
fn promtool_checks_and_unit_tests_the_rules() {
    let Some(promtool) = tool("promtool") else {
        return;
    };
    let check = Command::new(&promtool)
        .args(["check", "rules"])
        .arg(repo(RULES))
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
    let test = Command::new(&promtool)
        .args(["test", "rules"])
        .args(RULE_TESTS.map(repo))
        .output()
        .unwrap();
    let output =
        String::from_utf8_lossy(&test.stdout).into_owned() + &String::from_utf8_lossy(&test.stderr);
    assert!(test.status.success(), "{output}");
    assert!(output.contains("SUCCESS"), "{output}");
    // Every alert in the rules file has a unit test, a severity and a runbook section.
    let rules = std::fs::read_to_string(repo(RULES)).unwrap();
    let tests: String = RULE_TESTS
        .iter()
        .map(|path| std::fs::read_to_string(repo(path)).unwrap())
        .collect();
    let runbook = std::fs::read_to_string(repo("docs/runbook.md")).unwrap();
    let alerts: Vec<&str> = rules
        .lines()
        .filter_map(|line| line.trim().strip_prefix("- alert: "))
        .collect();
    assert!(alerts.len() >= 10, "{alerts:?}");
    for alert in alerts {
        assert!(
            tests.contains(&format!("alertname: {alert}")),
            "{alert} has no promtool test"
        );
        assert!(
            runbook.contains(&format!("### {alert}\n")),
            "{alert} has no runbook section"
        );
        assert!(
            rules.contains(&format!(
                "runbook_url: docs/runbook.md#{}",
                alert.to_lowercase()
            )),
            "{alert} has no runbook_url"
        );
    }
    assert_eq!(
        rules.matches("severity: ").count(),
        rules.matches("- alert: ").count()
    );
}

/// The shipped rules with their time constants scaled down (windows 5m → 6s … 3d → 45s,
/// every `for:` → 2s), so a fault fires and resolves within seconds. The expressions, metric
/// names and labels are the shipped ones.
fn time_scaled_rules() -> String {
    let mut text = std::fs::read_to_string(repo(RULES)).unwrap();
    for (from, to) in [
        ("[5m]", "[6s]"),
        ("[30m]", "[10s]"),
        ("[1h]", "[15s]"),
        ("[2h]", "[20s]"),
        ("[6h]", "[25s]"),
        ("[1d]", "[30s]"),
        ("[3d]", "[45s]"),
        ("offset 1d", "offset 30s"),
    ] {
        text = text.replace(from, to);
    }
    text.lines()
        .map(|line| match line.split_once("for: ") {
            Some((indent, _)) if indent.trim().is_empty() => format!("{indent}for: 2s"),
            _ => line.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

async fn firing(client: &support::HttpClient, prometheus: &str) -> Vec<String> {
    let alerts = api(client, &format!("{prometheus}/api/v1/alerts")).await;
    alerts["data"]["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|alert| alert["state"] == "firing")
        .map(|alert| alert["labels"]["alertname"].as_str().unwrap().to_owned())
        .collect()
}

/// Waits (bounded) until `done` holds for the firing alerts; returns the time it took.
async fn wait_for(
    client: &support::HttpClient,
    prometheus: &str,
    what: &str,
    done: impl Fn(&[String]) -> bool,
) -> Duration {
    let started = Instant::now();
    loop {
        let now = firing(client, prometheus).await;
        if done(&now) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(40),
            "{what}: still {now:?} after 40 s"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Identifications at ~25/s (half of them re-scans), a malformed one now and then, until
/// `stop`.
fn drive_traffic(h: &Arc<Harness>, token: String, stop: Arc<AtomicBool>) {
    let h = Arc::clone(h);
    tokio::spawn(async move {
        let mut n = 0u64;
        let mut last = String::new();
        while !stop.load(Ordering::Relaxed) {
            n += 1;
            let barcode = if n.is_multiple_of(2) && !last.is_empty() {
                last.clone()
            } else {
                let fresh = diia_sim::Code::issue(338_979_000_000 + n).unwrap().digits();
                last.clone_from(&fresh);
                fresh
            };
            let barcode = if n.is_multiple_of(10) {
                "3389798072090".to_owned()
            } else {
                barcode
            };
            let _ = h
                .identify(&token, &format!("branch-{}", n % 7), &barcode)
                .await;
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_fire_on_a_real_prometheus_and_every_dashboard_query_returns_data() {
    let Some(binary) = tool("prometheus") else {
        return;
    };
    let h = Arc::new(
        Harness::with(
            |s| s.auto_issue = true,
            |c| {
                c.upstream.breaker_failures = 3;
                c.upstream.breaker_cooldown = Duration::from_millis(800);
                c.cache.negative_ttl = Duration::from_secs(1);
            },
        )
        .await,
    );
    let client = support::client();
    let rules = time_scaled_rules();
    let prometheus =
        Prometheus::start(&binary, &[h.gateway.admin_addr()], Some(&rules), &client).await;
    let token = h.session_token().await;
    let stop = Arc::new(AtomicBool::new(false));
    drive_traffic(&h, token, Arc::clone(&stop));
    // Baseline: scraped, healthy.
    prometheus.wait_until_scraped(&client, 1).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(firing(&client, &prometheus.url).await.is_empty());

    // Fault 1: Diia answers 500 to everything.
    h.set_faults(json!({"error_rate": 1.0})).await;
    let mut report = Vec::new();
    let expected = [
        "DiiaGatewayDiiaFailing",
        "DiiaGatewayCircuitOpen",
        "DiiaGatewayVerificationBudgetBurnFast",
    ];
    let fault = Instant::now();
    let mut first_seen: Vec<Option<Duration>> = vec![None; expected.len()];
    while first_seen.iter().any(Option::is_none) {
        let now = firing(&client, &prometheus.url).await;
        for (alert, seen) in expected.iter().zip(first_seen.iter_mut()) {
            if seen.is_none() && now.iter().any(|a| a == alert) {
                *seen = Some(fault.elapsed());
            }
        }
        assert!(
            fault.elapsed() < Duration::from_secs(40),
            "fault 1: {now:?} firing after 40 s"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    for (alert, seen) in expected.iter().zip(&first_seen) {
        let took = seen.unwrap_or_default().as_secs_f64();
        report.push(format!("{alert}: firing {took:.1} s after the fault"));
    }
    let fault_started = Instant::now();
    h.set_faults(json!({})).await;
    wait_for(&client, &prometheus.url, "resolve after fault 1", |now| {
        !now.iter().any(|a| {
            a == "DiiaGatewayDiiaFailing"
                || a == "DiiaGatewayCircuitOpen"
                || a == "DiiaGatewayVerificationBudgetBurnFast"
        })
    })
    .await;
    report.push(format!(
        "fault 1 resolved {:.1} s after healing",
        fault_started.elapsed().as_secs_f64()
    ));

    // Fault 2: Diia's own quota (429 + Retry-After).
    let fault = Instant::now();
    h.set_faults(json!({"quota_per_second": 1, "quota_retry_after": "2s"}))
        .await;
    wait_for(&client, &prometheus.url, "DiiaGatewayDiiaBackoff", |now| {
        now.iter().any(|a| a == "DiiaGatewayDiiaBackoff")
    })
    .await;
    report.push(format!(
        "DiiaGatewayDiiaBackoff: firing {:.1} s after the fault",
        fault.elapsed().as_secs_f64()
    ));

    // Every dashboard query parses and returns data (Grafana's variables filled in); the
    // scale-out panels read metrics only `[scaleout]` exports: the fleet tests check those.
    // The relay panels read metrics only `[callback_relay]` exports: the relay test below
    // checks those.
    let (scaleout, single): (Vec<_>, Vec<_>) = dashboard_queries()
        .into_iter()
        .filter(|(_, promql)| !is_relay(promql))
        .partition(|(_, promql)| is_scaleout(promql));
    assert_data(&prometheus, &client, &single).await;
    assert!(single.len() >= 15, "{} dashboard queries", single.len());
    assert!(scaleout.len() >= 5, "{} scale-out queries", scaleout.len());

    let healed = Instant::now();
    h.set_faults(json!({})).await;
    wait_for(&client, &prometheus.url, "resolve after fault 2", |now| {
        !now.iter().any(|a| a == "DiiaGatewayDiiaBackoff")
    })
    .await;
    report.push(format!(
        "fault 2 resolved {:.1} s after healing",
        healed.elapsed().as_secs_f64()
    ));
    stop.store(true, Ordering::Relaxed);
    println!("prometheus end to end: {}", report.join("; "));
}

/// The relay's half of the kit on a real Prometheus: a relay-enabled gateway, a dead
/// letter made in its store, DiiaGatewayRelayDeadLetters fires (time-scaled rules), and
/// every relay panel of the dashboard returns data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_alerts_fire_and_every_relay_dashboard_query_returns_data() {
    use crate::relay_ingress::{
        Acquirer, REQUEST_ID, callback, ingress_path, start, valid_package,
    };
    use diia_gateway::relay::{CallbackStore, Route};

    let Some(binary) = tool("prometheus") else {
        return;
    };
    let acquirer = Acquirer::new();
    let h = start(&acquirer, 0).await;
    let client = support::client();
    let rules = time_scaled_rules();
    let prometheus =
        Prometheus::start(&binary, &[h.gateway.admin_addr()], Some(&rules), &client).await;
    prometheus.wait_until_scraped(&client, 1).await;
    // A callback routed to a target the settings do not have: the delivery worker makes
    // it a dead letter (it is never sent anywhere else).
    let store = h.gateway.relay_store().unwrap().clone();
    let now = diia_gateway::relay::now_ms();
    let route = Route {
        client: "client-1".into(),
        branch: "branch-1".into(),
        target: "target-1".into(),
        login: None,
    };
    store
        .record_route(
            "acquirer-1".into(),
            REQUEST_ID.into(),
            route,
            Duration::from_secs(600),
            now,
        )
        .await
        .unwrap();
    let reply = callback(
        &h,
        &ingress_path(),
        Some(REQUEST_ID),
        valid_package(&acquirer, 1),
    )
    .await;
    assert_eq!(reply.status, http::StatusCode::OK);
    let took = wait_for(
        &client,
        &prometheus.url,
        "DiiaGatewayRelayDeadLetters",
        |now| now.iter().any(|a| a == "DiiaGatewayRelayDeadLetters"),
    )
    .await;
    let relay: Vec<_> = dashboard_queries()
        .into_iter()
        .filter(|(_, promql)| is_relay(promql))
        .collect();
    assert!(relay.len() >= 7, "{} relay queries", relay.len());
    assert_data(&prometheus, &client, &relay).await;
    println!(
        "relay: DiiaGatewayRelayDeadLetters firing {:.1} s after the record died",
        took.as_secs_f64()
    );
}

/// The shipped systemd unit: verified by `systemd-analyze verify` where it exists (skipped
/// with a message where not), and its stop timeout and file limit fit the defaults.
#[test]
fn the_systemd_unit_verifies_and_fits_the_defaults() {
    let unit = std::fs::read_to_string(repo("deploy/systemd/diia-gateway.service")).unwrap();
    let value = |key: &str| {
        unit.lines()
            .find_map(|line| line.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("{key} missing"))
            .to_owned()
    };
    let defaults = diia_gateway::config::FileConfig::default();
    let stop = humantime::parse_duration(&value("TimeoutStopSec")).unwrap();
    assert!(stop > defaults.server.drain_delay + defaults.server.drain_timeout);
    let files: usize = value("LimitNOFILE").parse().unwrap();
    assert!(files > defaults.server.max_connections);
    assert!(value("ExecReload").contains("-HUP"));
    assert!(matches!(value("Type").as_str(), "exec" | "notify"));
    for hardening in [
        "DynamicUser=yes",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "CapabilityBoundingSet=\n",
        "PrivateTmp=yes",
        "RestrictAddressFamilies=",
    ] {
        assert!(unit.contains(hardening), "{hardening}");
    }
    let Some(analyze) = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("systemd-analyze"))
            .find(|candidate| candidate.is_file())
    }) else {
        eprintln!("SKIPPED: systemd-analyze not available; unit checked by content only");
        return;
    };
    // Point the unit at the binary this build made, so verify can check the commands.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("diia-gateway.service");
    std::fs::write(
        &path,
        unit.replace(
            "/usr/local/bin/diia-gateway",
            env!("CARGO_BIN_EXE_diia-gateway"),
        ),
    )
    .unwrap();
    let verify = Command::new(analyze)
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    let output = String::from_utf8_lossy(&verify.stdout).into_owned()
        + &String::from_utf8_lossy(&verify.stderr);
    assert!(verify.status.success(), "{output}");
    assert!(
        !output.contains("diia-gateway.service:"),
        "systemd-analyze complained: {output}"
    );
}
