//! Processes for the fleet tests: Redis, gateway instances, and the EAN-13 barcodes the
//! simulator accepts (it runs with `auto_issue`).

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use diia_sim::{DEMO_ACQUIRER_TOKEN, DEMO_AUTH_TOKEN, SimConfig, SimHandle, Simulator};
use http::{Method, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use diia_gateway_testkit::{
    HttpClient, Reply, client, metric_value, port_outside_ephemeral_range, send,
};

/// Fleet tests one at a time: they measure rates and kill processes.
pub static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Whether `redis-server` can run here; fails under CI when it cannot.
pub fn redis_available() -> bool {
    let found = Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        assert!(
            std::env::var("CI").is_err(),
            "redis-server is not installed (CI=true: the fleet tests must run)"
        );
        eprintln!("redis-server not installed: fleet test skipped (install redis-server)");
    }
    found
}

/// A `redis-server` on a loopback port of its own (see [`port_outside_ephemeral_range`]),
/// without persistence unless asked.
pub struct Redis {
    pub port: u16,
    dir: tempfile::TempDir,
    extra: Vec<String>,
    child: Option<Child>,
}

impl Redis {
    /// Starts one and waits until it answers; on a port another process holds it draws
    /// another (ten tries).
    pub async fn start(extra: &[&str]) -> Self {
        let mut redis = Self::unstarted(port_outside_ephemeral_range(), extra);
        for _ in 0..10 {
            if redis.try_start().await {
                return redis;
            }
            redis.port = port_outside_ephemeral_range();
        }
        panic!("redis-server found no free port in ten draws");
    }

    /// [`Redis::start`] on a given port (one from [`port_outside_ephemeral_range`]).
    pub async fn start_on(port: u16, extra: &[&str]) -> Self {
        let mut redis = Self::unstarted(port, extra);
        redis.restart().await;
        redis
    }

    fn unstarted(port: u16, extra: &[&str]) -> Self {
        Self {
            port,
            dir: tempfile::tempdir().unwrap(),
            extra: extra.iter().map(|s| (*s).to_owned()).collect(),
            child: None,
        }
    }

    /// (Re)starts the server on the same port: the clients know it. A killed server's
    /// port is free at once (nothing else draws from outside the ephemeral range), so a
    /// failed bind is retried for a few seconds only.
    pub async fn restart(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.try_start().await {
            assert!(
                Instant::now() < deadline,
                "redis-server cannot bind port {}",
                self.port
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Spawns the server and waits until it answers as itself (`INFO`'s `process_id` is
    /// our child's: a server of someone else's on the port does not count); `false` when
    /// it exits first (the port is taken).
    async fn try_start(&mut self) -> bool {
        let mut child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(["--dir", &self.dir.path().display().to_string()])
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        let ours = format!("process_id:{}", child.id());
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let info = self.reply(&["INFO", "server"]).await.unwrap_or_default();
            if info.lines().any(|line| line.trim_end() == ours) {
                self.child = Some(child);
                return true;
            }
            if child.try_wait().unwrap().is_some() {
                return false;
            }
            assert!(Instant::now() < deadline, "redis-server did not answer");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILL: no goodbye to its clients.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// `redis://127.0.0.1:port`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Freezes the server (`SIGSTOP`): connections stay open, nothing is answered, as in a
    /// fork pause or a stalled host.
    pub fn stop(&self) {
        self.signal("-STOP");
    }

    /// Resumes a stopped server (`SIGCONT`).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("redis-server runs").id();
        let sent = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .expect("kill runs");
        assert!(sent.success(), "kill {signal} {pid}");
    }

    /// A binary-safe connection of the test's own (reading and rewriting sealed values).
    pub async fn connection(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }

    /// The data directory (for `SAVE`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// One command in RESP, as the default user; the first line of the reply.
    pub async fn command(&self, args: &[&str]) -> Option<String> {
        let text = self.reply(args).await?;
        Some(text.lines().next().unwrap_or_default().to_owned())
    }

    /// One command in RESP, as the default user; the whole reply as text.
    pub async fn reply(&self, args: &[&str]) -> Option<String> {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .ok()?;
        let mut request = format!("*{}\r\n", args.len());
        for arg in args {
            request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
        }
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut buffer = vec![0u8; 1 << 16];
        let n = tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buffer))
            .await
            .ok()?
            .ok()?;
        Some(String::from_utf8_lossy(&buffer[..n]).into_owned())
    }

    /// Every key (KEYS is fine on a test server).
    pub async fn keys(&self) -> Vec<String> {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .unwrap();
        stream
            .write_all(b"*2\r\n$4\r\nKEYS\r\n$1\r\n*\r\n")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut buffer = vec![0u8; 1 << 20];
        let n = stream.read(&mut buffer).await.unwrap();
        String::from_utf8_lossy(&buffer[..n])
            .lines()
            .filter(|line| line.starts_with("{dg}"))
            .map(str::to_owned)
            .collect()
    }
}

impl Redis {
    /// Every key once each leader has written back (leaders answer first, then store and
    /// release their lease).
    pub async fn settled(&self) -> Vec<String> {
        let started = Instant::now();
        loop {
            let keys = self.keys().await;
            if !keys.iter().any(|k| k.starts_with("{dg}:l:")) {
                return keys;
            }
            assert!(
                started.elapsed() < Duration::from_secs(3),
                "a lease never released: {keys:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A gateway process with its own config file and log.
pub struct Gateway {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

/// What differs between the fleet tests' gateway configs.
#[derive(Clone)]
pub struct FleetConfig {
    pub sim_url: String,
    pub redis_url: String,
    pub secret: String,
    /// Extra TOML appended under `[scaleout]`.
    pub scaleout_extra: String,
    /// `limits.diia`.
    pub diia: String,
    /// `limits.branch`.
    pub branch: String,
    /// Extra TOML under `[server]`.
    pub server_extra: String,
    /// The body of `[cache]`.
    pub cache: String,
    /// Extra top-level TOML sections.
    pub extra: String,
}

impl FleetConfig {
    /// Defaults: a large Diia budget, generous branch limits.
    pub fn new(sim_url: &str, redis_url: &str) -> Self {
        Self {
            sim_url: sim_url.to_owned(),
            redis_url: redis_url.to_owned(),
            secret: "9f".repeat(16) + &"3c".repeat(16),
            scaleout_extra: String::new(),
            diia: r#"{ per_second = 10000, burst = 10000, max_wait = "200ms" }"#.to_owned(),
            branch: "{ per_minute = 6000000, burst = 100000 }".to_owned(),
            server_extra: String::new(),
            cache: r#"negative_ttl = "30s""#.to_owned(),
            extra: String::new(),
        }
    }
}

impl Gateway {
    /// Starts the binary and waits for `/readyz`.
    pub async fn start(config: &FleetConfig) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let secret_file = dir.path().join("secret");
        std::fs::write(&secret_file, &config.secret).unwrap();
        let text = format!(
            r#"
[server]
# The kernel picks both ports; the process reports them in its ready file.
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
request_deadline = "3s"
drain_delay = "0s"
{server_extra}

[upstream]
base_url = "{sim}"
timeout = "3s"

[cache]
{cache}

[log]
format = "json"
filter = "info"

[limits]
branch = {branch}
client = {{ per_minute = 60000000, burst = 1000000 }}
diia = {diia}

[scaleout]
enabled = true
redis_url = "{redis}"
secret_file = "{secret}"
# Three debug-build gateways, a simulator and a load generator share two cores: a
# production-like 25 ms would flip Redis "down" on scheduling noise alone.
command_timeout = "250ms"
{scaleout_extra}
{extra}
"#,
            sim = config.sim_url,
            diia = config.diia,
            branch = config.branch,
            redis = config.redis_url,
            secret = secret_file.display(),
            scaleout_extra = config.scaleout_extra,
            server_extra = config.server_extra,
            cache = config.cache,
            extra = config.extra,
        );
        let config_file = dir.path().join("gateway.toml");
        std::fs::write(&config_file, text).unwrap();
        let log = std::fs::File::create(dir.path().join("log")).unwrap();
        let ready_file = dir.path().join("ready");
        let mut child = Command::new(env!("CARGO_BIN_EXE_diia-gateway"))
            .arg("--config")
            .arg(&config_file)
            .arg("--ready-file")
            .arg(&ready_file)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("gateway starts");
        let deadline = Instant::now() + Duration::from_secs(20);
        let (addr, admin) = loop {
            if let Ok(text) = std::fs::read_to_string(&ready_file) {
                break parse_ready_file(&text);
            }
            let log = || std::fs::read_to_string(dir.path().join("log")).unwrap_or_default();
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "gateway exited ({status}) before listening; log:\n{}",
                    log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "gateway never listened; log:\n{}",
                log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let gateway = Self {
            addr,
            admin,
            dir,
            child: Some(child),
        };
        let http = client();
        loop {
            let url = format!("http://{}/readyz", gateway.admin);
            let ready =
                tokio::time::timeout(Duration::from_secs(1), http.get(url.parse().unwrap()))
                    .await
                    .is_ok_and(|r| r.is_ok_and(|r| r.status() == StatusCode::OK));
            if ready {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "gateway not ready; log:\n{}",
                gateway.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        gateway
    }

    /// `http://addr/path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Everything the process logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
    }

    /// Waits (3 s at most) until the log holds `text`: lines are written in batches.
    pub async fn wait_for_log(&self, text: &str) {
        let started = Instant::now();
        while !self.log().contains(text) {
            assert!(started.elapsed() < Duration::from_secs(3), "{}", self.log());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The config directory.
    pub fn dir(&self) -> PathBuf {
        self.dir.path().to_owned()
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// `/metrics` text.
    pub async fn metrics(&self, http: &HttpClient) -> String {
        let url = format!("http://{}/metrics", self.admin);
        let reply = send(http, Method::GET, &url, &[], String::new()).await;
        String::from_utf8(reply.body.to_vec()).unwrap()
    }

    /// One metric value.
    pub async fn metric(&self, http: &HttpClient, name: &str) -> f64 {
        metric_value(&self.metrics(http).await, name)
    }

    /// A session token through this instance.
    pub async fn session_token(&self, http: &HttpClient) -> String {
        let url = self.url(&format!("/api/v1/auth/acquirer/{DEMO_ACQUIRER_TOKEN}"));
        let basic = format!("Basic {DEMO_AUTH_TOKEN}");
        let reply = send(
            http,
            Method::GET,
            &url,
            &[("authorization", basic.as_str())],
            String::new(),
        )
        .await;
        assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
        reply.json()["token"].as_str().unwrap().to_owned()
    }

    /// One identification.
    pub async fn identify(&self, http: &HttpClient, token: &str, barcode: &str) -> Reply {
        self.post(
            http,
            "/api/v1/acquirers/document-identification",
            token,
            &format!(r#"{{"branchId":"kyiv-001","barcode":"{barcode}"}}"#),
        )
        .await
    }

    /// One POST with a bearer token.
    pub async fn post(&self, http: &HttpClient, path: &str, token: &str, body: &str) -> Reply {
        let bearer = format!("Bearer {token}");
        send(
            http,
            Method::POST,
            &self.url(path),
            &[
                ("authorization", bearer.as_str()),
                ("content-type", "application/json"),
            ],
            body.to_owned(),
        )
        .await
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The branch and admin addresses from a `--ready-file` (`listen=ADDR`, `admin=ADDR`).
pub fn parse_ready_file(text: &str) -> (SocketAddr, SocketAddr) {
    let field = |key: &str| -> SocketAddr {
        text.lines()
            .find_map(|line| line.strip_prefix(key)?.strip_prefix('='))
            .unwrap_or_else(|| panic!("no {key}= in the ready file: {text:?}"))
            .parse()
            .unwrap()
    };
    (field("listen"), field("admin"))
}

/// The simulator, treating any well-formed barcode as freshly issued.
pub async fn simulator() -> SimHandle {
    let config = SimConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        auto_issue: true,
        ..diia_gateway_testkit::sim_config()
    };
    Simulator::start(config).await.unwrap()
}

static NEXT_BARCODE: AtomicU64 = AtomicU64::new(0);

/// A fresh valid EAN-13 barcode (unique within this test process).
pub fn fresh_barcode() -> String {
    let seed = u64::from(std::process::id()) % 1000;
    let base = 400_000_000_000 + seed * 100_000_000 + NEXT_BARCODE.fetch_add(1, Ordering::Relaxed);
    let digits: Vec<u32> = base
        .to_string()
        .chars()
        .map(|c| c.to_digit(10).unwrap())
        .collect();
    let sum: u32 = digits
        .iter()
        .enumerate()
        .map(|(i, d)| if i % 2 == 0 { *d } else { d * 3 })
        .sum();
    format!("{base}{}", (10 - sum % 10) % 10)
}

/// Three gateways on one Redis and one simulator.
pub async fn fleet(config: &FleetConfig) -> Vec<Gateway> {
    let mut gateways = Vec::new();
    for _ in 0..3 {
        gateways.push(Gateway::start(config).await);
    }
    gateways
}

/// Waits until every gateway counts `live` instances.
pub async fn wait_for_fleet(gateways: &[Gateway], http: &HttpClient, live: f64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    for gateway in gateways {
        while gateway.metric(http, "diia_gateway_instances_live").await != live {
            assert!(
                Instant::now() < deadline,
                "fleet did not see {live} instances; log:\n{}",
                gateway.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// One fleet test's world, started the same way by every test: the serial lock, a Redis, a
/// simulator and three gateways that see each other.
pub struct World {
    pub redis: Redis,
    pub sim: SimHandle,
    pub gateways: Vec<Gateway>,
    pub http: HttpClient,
    _serial: tokio::sync::MutexGuard<'static, ()>,
}

impl World {
    /// `None` (the test is skipped) when `redis-server` is missing outside CI.
    pub async fn start(tweak: impl FnOnce(&mut FleetConfig)) -> Option<Self> {
        let serial = SERIAL.lock().await;
        if !redis_available() {
            return None;
        }
        let redis = Redis::start(&[]).await;
        let sim = simulator().await;
        let mut config = FleetConfig::new(&sim.base_url(), &redis.url());
        tweak(&mut config);
        let gateways = fleet(&config).await;
        let http = client();
        wait_for_fleet(&gateways, &http, 3.0).await;
        Some(Self {
            redis,
            sim,
            gateways,
            http,
            _serial: serial,
        })
    }

    /// A session token through the first instance.
    pub async fn token(&self) -> String {
        self.gateways[0].session_token(&self.http).await
    }

    /// A session token through the first instance, already accepted by Diia on every
    /// instance (one identification through each): until then another instance sends its
    /// calls on the unverified budget, outside the Diia budget a test measures.
    pub async fn verified_token(&self) -> String {
        let token = self.token().await;
        for gateway in &self.gateways {
            let reply = gateway.identify(&self.http, &token, &fresh_barcode()).await;
            assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
        }
        token
    }
}
