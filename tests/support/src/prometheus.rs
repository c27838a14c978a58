//! A real Prometheus on loopback for the operations-kit tests (the single-instance ops test
//! and the scale-out dashboard test): started on a port of the kernel's choosing, scraping
//! given targets every second, queried over HTTP, killed on drop.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use serde_json::Value;

use crate::{HttpClient, send};

/// The shipped Grafana dashboard.
pub const DASHBOARD: &str = "deploy/grafana/diia-gateway.json";

/// Metrics only a gateway with `[scaleout]` exports: the dashboard's scale-out panels are
/// checked by the fleet tests, every other panel by the single-instance ops test.
pub const SCALEOUT_METRICS: [&str; 5] = [
    "diia_gateway_redis_up",
    "diia_gateway_redis_op_seconds",
    "diia_gateway_shared_lookups_total",
    "diia_gateway_budget_fallback_admits_total",
    "diia_gateway_instances_live",
];

/// The prefix of the metric families only a gateway with `[callback_relay]` exports: the
/// dashboard's relay panels are checked by the relay's ops test, every other panel by the
/// single-instance one.
pub const RELAY_METRIC_PREFIX: &str = "diia_gateway_relay_";

/// A path in this repository (this crate lives in `tests/support`).
pub fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(path)
}

/// The binary on `PATH`, or `None` (after failing the test under `CI=true`).
pub fn tool(name: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|candidate| candidate.is_file())
    });
    if found.is_none() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{name} is required under CI=true (apt-get install prometheus)"
        );
        eprintln!("SKIPPED: {name} not installed (apt-get install prometheus)");
    }
    found
}

/// A Prometheus process on a loopback port it binds itself (`:0`), killed on drop.
pub struct Prometheus {
    child: Child,
    /// `http://127.0.0.1:port`.
    pub url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    /// Starts one scraping `targets` (job `diia-gateway`) every second, with `rules` (a
    /// rules file's text) when given, and waits until it is ready.
    pub async fn start(
        binary: &Path,
        targets: &[SocketAddr],
        rules: Option<&str>,
        client: &HttpClient,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let rule_files = match rules {
            Some(text) => {
                let path = dir.path().join("rules.yml");
                std::fs::write(&path, text).unwrap();
                format!("rule_files:\n  - {}\n", path.display())
            }
            None => String::new(),
        };
        let targets = targets
            .iter()
            .map(|target| format!("'{target}'"))
            .collect::<Vec<_>>()
            .join(", ");
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n{rule_files}\
                 scrape_configs:\n  - job_name: diia-gateway\n    static_configs:\n      - targets: [{targets}]\n"
            ),
        )
        .unwrap();
        // Port 0: Prometheus binds what the kernel gives and logs it ("Listening on").
        let log_path = dir.path().join("log");
        let log = std::fs::File::create(&log_path).unwrap();
        let mut child = Command::new(binary)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg("--web.listen-address=127.0.0.1:0")
            .arg("--log.level=info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let started = Instant::now();
        let addr = loop {
            let text = std::fs::read_to_string(&log_path).unwrap_or_default();
            if let Some(addr) = listening_address(&text) {
                break addr;
            }
            if let Some(status) = child.try_wait().unwrap() {
                panic!("prometheus exited ({status}): {text}");
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "prometheus never listened: {text}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let prometheus = Self {
            child,
            url: format!("http://{addr}"),
            _dir: dir,
        };
        let started = Instant::now();
        loop {
            let ready = tokio::time::timeout(
                Duration::from_secs(1),
                client.get(format!("{}/-/ready", prometheus.url).parse().unwrap()),
            )
            .await;
            if matches!(ready, Ok(Ok(response)) if response.status() == StatusCode::OK) {
                return prometheus;
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "prometheus did not start"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// An instant query's JSON answer.
    pub async fn query(&self, client: &HttpClient, promql: &str) -> Value {
        api(
            client,
            &format!("{}/api/v1/query?query={}", self.url, encode(promql)),
        )
        .await
    }

    /// Waits (bounded) until every scrape target is up.
    pub async fn wait_until_scraped(&self, client: &HttpClient, targets: usize) {
        let started = Instant::now();
        loop {
            let up = self.query(client, r#"sum(up{job="diia-gateway"})"#).await;
            let scraped = up["data"]["result"][0]["value"][1]
                .as_str()
                .and_then(|value| value.parse::<usize>().ok());
            if scraped == Some(targets) {
                return;
            }
            assert!(started.elapsed() < Duration::from_secs(15), "never scraped");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// The address in Prometheus's `msg="Listening on" address=127.0.0.1:PORT` log line.
fn listening_address(log: &str) -> Option<SocketAddr> {
    log.lines()
        .filter(|line| line.contains(r#"msg="Listening on""#))
        .find_map(|line| {
            line.split_once(" address=")?
                .1
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
}

/// A GET to Prometheus's API, asserted 200.
pub async fn api(client: &HttpClient, url: &str) -> Value {
    let reply = send(client, Method::GET, url, &[], String::new()).await;
    assert_eq!(reply.status, StatusCode::OK, "{url}: {:?}", reply.body);
    reply.json()
}

/// Form-encodes a query parameter.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The dashboard's queries with Grafana's variables filled in, each with its panel title.
pub fn dashboard_queries() -> Vec<(String, String)> {
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(repo(DASHBOARD)).unwrap()).unwrap();
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let promql = target["expr"]
                .as_str()
                .unwrap()
                .replace("$__rate_interval", "15s")
                .replace("$job", ".*");
            queries.push((panel["title"].as_str().unwrap_or("").to_owned(), promql));
        }
    }
    queries
}

/// Whether a query reads a metric only `[scaleout]` exports.
pub fn is_scaleout(promql: &str) -> bool {
    SCALEOUT_METRICS
        .iter()
        .any(|metric| promql.contains(metric))
}

/// Whether a query reads a metric only `[callback_relay]` exports.
pub fn is_relay(promql: &str) -> bool {
    promql.contains(RELAY_METRIC_PREFIX)
}

/// Asserts that each query parses and returns data.
pub async fn assert_data(
    prometheus: &Prometheus,
    client: &HttpClient,
    queries: &[(String, String)],
) {
    for (title, promql) in queries {
        let answer = prometheus.query(client, promql).await;
        assert_eq!(answer["status"], "success", "{promql}");
        assert!(
            !answer["data"]["result"].as_array().unwrap().is_empty(),
            "no data for panel '{title}': {promql}"
        );
    }
}
