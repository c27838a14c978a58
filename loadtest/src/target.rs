//! What the load goes to: the gateway and simulator started here as child processes
//! (so the gateway's own CPU time can be read from `/proc`), or URLs given by the user.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::scenario::Scenario;

/// Where to send load, and how to observe it.
pub struct Target {
    /// Gateway base URL (the first instance).
    pub gateway: String,
    /// Every instance's base URL; load is spread over them round-robin.
    pub gateways: Vec<String>,
    /// Simulator base URL (for `/sim/stats`).
    pub sim: String,
    /// The gateway's admin base URL, when started here.
    pub admin: Option<String>,
    /// The gateway processes, when started here.
    gateway_processes: Vec<Child>,
    sim_process: Option<Child>,
    /// The shared Redis of a scale-out run started here: process and port.
    redis: Option<(Child, u16)>,
    _files: Vec<PathBuf>,
}

/// Counters read off redis-server.
pub struct RedisCounters {
    /// `total_commands_processed`.
    pub commands: u64,
    /// CPU seconds (user + system) of the process.
    pub cpu_seconds: f64,
}

impl Drop for Target {
    fn drop(&mut self) {
        for child in self
            .gateway_processes
            .iter_mut()
            .chain(self.sim_process.as_mut())
            .chain(self.redis.as_mut().map(|(child, _)| child))
        {
            let _ = child.kill();
            let _ = child.wait();
        }
        for file in &self._files {
            let _ = std::fs::remove_file(file);
        }
    }
}

/// A `redis-server` on a loopback port drawn from below the kernel's ephemeral range
/// (which `:0` binds and outgoing connections use), drawing again when it exits on a
/// taken port: redis-server can neither take a bound socket nor report a `:0` port.
fn start_redis() -> Result<(Child, u16), String> {
    let (low, high) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| {
            let mut bounds = text.split_whitespace().map(|n| n.parse::<u16>().ok());
            Some((bounds.next()??, bounds.next()??))
        })
        .unwrap_or((32768, 60999));
    for _ in 0..10 {
        let port = if low >= 11_024 {
            fastrand::u16(low - 10_000..low)
        } else {
            fastrand::u16(high.saturating_add(1).max(1024)..=65_535)
        };
        let mut child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .map_err(|e| format!("redis-server (install it for --instances): {e}"))?;
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            if redis_is(port, child.id()) {
                return Ok((child, port));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    Err("redis-server found no free port in ten draws".to_owned())
}

/// Waits for the simulator's "diia-sim listening addr=…" line in its log.
fn wait_for_sim(log: &std::path::Path) -> Result<SocketAddr, String> {
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let addr = text
            .lines()
            .filter(|line| line.contains("diia-sim listening"))
            .find_map(|line| {
                let (_, rest) = line.split_once("addr=")?;
                rest.split_whitespace().next()?.parse().ok()
            });
        if let Some(addr) = addr {
            return Ok(addr);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(format!("diia-sim never listened ({})", log.display()))
}

fn sibling_binary(name: &str) -> Result<PathBuf, String> {
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    let path = me.with_file_name(name);
    if path.exists() {
        Ok(path)
    } else {
        Err(format!(
            "{} not found next to the load tool; build everything first: cargo build --release --workspace",
            path.display()
        ))
    }
}

fn write_temp(name: &str, text: &str) -> Result<PathBuf, String> {
    let path = std::env::temp_dir().join(format!("diia-loadtest-{}-{name}", std::process::id()));
    let mut file = std::fs::File::create(&path).map_err(|e| e.to_string())?;
    file.write_all(text.as_bytes()).map_err(|e| e.to_string())?;
    Ok(path)
}

/// Whether the redis-server on `port` is the process `pid` (`INFO server`'s `process_id`):
/// a server of someone else's on a drawn port does not count.
fn redis_is(port: u16, pid: u32) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(mut stream) = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200))
    else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    if stream
        .write_all(b"*2\r\n$4\r\nINFO\r\n$6\r\nserver\r\n")
        .is_err()
    {
        return false;
    }
    let mut buffer = vec![0u8; 16 * 1024];
    let n = std::io::Read::read(&mut stream, &mut buffer).unwrap_or(0);
    let ours = format!("process_id:{pid}");
    String::from_utf8_lossy(&buffer[..n])
        .lines()
        .any(|line| line.trim_end() == ours)
}

/// Waits for a gateway's `--ready-file` and reads its branch and admin addresses.
fn wait_for_ready_file(path: &std::path::Path) -> Result<(SocketAddr, SocketAddr), String> {
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if let Ok(text) = std::fs::read_to_string(path) {
            let field = |key: &str| {
                text.lines()
                    .find_map(|line| line.strip_prefix(key)?.strip_prefix('='))
                    .and_then(|addr| addr.parse::<SocketAddr>().ok())
                    .ok_or_else(|| format!("{}: no {key}= address", path.display()))
            };
            return Ok((field("listen")?, field("admin")?));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(format!(
        "the gateway never listened ({} not written)",
        path.display()
    ))
}

impl Target {
    /// Uses running instances.
    pub fn external(gateways: Vec<String>, sim: String) -> Self {
        Self {
            gateway: gateways.first().cloned().unwrap_or_default(),
            gateways,
            sim,
            admin: None,
            gateway_processes: Vec::new(),
            sim_process: None,
            redis: None,
            _files: Vec::new(),
        }
    }

    /// Starts `diia-sim` (auto-issuing barcodes, the scenario's latency and errors) and
    /// `diia-gateway` in front of it, both on free loopback ports.
    pub fn spawn(scenario: &Scenario) -> Result<Self, String> {
        Self::spawn_with(scenario, "")
    }

    /// [`Target::spawn`] with extra TOML tables for the gateway (e.g. `[cache]`).
    pub fn spawn_with(scenario: &Scenario, extra_config: &str) -> Result<Self, String> {
        Self::spawn_instances(scenario, extra_config, 1)
    }

    /// `instances` gateways in scale-out mode on one `redis-server` started here (free
    /// loopback port, no persistence) and one simulator: the fleet behind a load balancer.
    pub fn spawn_fleet(scenario: &Scenario, instances: usize) -> Result<Self, String> {
        Self::spawn_instances(scenario, "", instances)
    }

    fn spawn_instances(
        scenario: &Scenario,
        extra_config: &str,
        instances: usize,
    ) -> Result<Self, String> {
        let mut files = Vec::new();
        let mut redis = None;
        let mut fleet_config = String::new();
        if instances > 1 {
            let (child, port) = start_redis()?;
            redis = Some((child, port));
            let mut secret = [0u8; 32];
            std::fs::File::open("/dev/urandom")
                .and_then(|mut random| std::io::Read::read_exact(&mut random, &mut secret))
                .map_err(|e| format!("/dev/urandom: {e}"))?;
            let hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
            let secret_file = write_temp("fleet-secret", &hex)?;
            fleet_config = format!(
                "[scaleout]\nenabled = true\nredis_url = \"redis://127.0.0.1:{port}\"\nsecret_file = \"{}\"\n",
                secret_file.display()
            );
            files.push(secret_file);
        }
        let sim_config = format!(
            "listen = \"127.0.0.1:0\"\nauto_issue = true\n[faults]\nlatency = \"{}\"\nlatency_jitter = \"{}\"\nlatency_distribution = \"exponential\"\nerror_rate = {}\n",
            humantime::format_duration(scenario.diia.latency),
            humantime::format_duration(scenario.diia.latency_jitter),
            scenario.diia.error_rate,
        );
        let sim_file = write_temp("sim.toml", &sim_config)?;
        files.push(sim_file.clone());
        // The simulator binds :0 and logs the port it got ("diia-sim listening addr=…").
        let sim_log = write_temp("sim.log", "")?;
        files.push(sim_log.clone());
        let mut sim_process = Command::new(sibling_binary("diia-sim")?)
            .arg("--config")
            .arg(&sim_file)
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&sim_log).map_err(|e| e.to_string())?)
            .spawn()
            .map_err(|e| format!("diia-sim: {e}"))?;
        let sim_addr = match wait_for_sim(&sim_log) {
            Ok(addr) => addr,
            Err(error) => {
                let _ = sim_process.kill();
                let _ = sim_process.wait();
                return Err(error);
            }
        };
        let mut gateway_processes = Vec::new();
        let mut ready_files = Vec::new();
        for index in 0..instances.max(1) {
            // Branch limits sized to the scenario (a branch never hits them in a normal
            // run); every branch comes from this one process, so the per-client limit and
            // the Diia share are lifted; the Diia budget is left wide so the report
            // measures what Diia would need. The kernel picks both ports; the gateway
            // reports them in its ready file.
            let gateway_config = format!(
                "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
                 [upstream]\nbase_url = \"http://{sim_addr}\"\n\
                 [limits.branch]\nper_minute = 100000\nburst = 1000\n\
                 [limits.client]\nper_minute = 100000000\nburst = 1000000\ndiia_share = 1.0\n\
                 [limits.diia]\nper_second = 1000000\nburst = 100000\n\
                 [log]\nfilter = \"warn\"\n{extra_config}{fleet_config}"
            );
            let gateway_file = write_temp(&format!("gateway-{index}.toml"), &gateway_config)?;
            files.push(gateway_file.clone());
            let ready_file = std::env::temp_dir().join(format!(
                "diia-loadtest-{}-gateway-{index}.ready",
                std::process::id()
            ));
            let _ = std::fs::remove_file(&ready_file);
            files.push(ready_file.clone());
            gateway_processes.push(
                Command::new(sibling_binary("diia-gateway")?)
                    .arg("--config")
                    .arg(&gateway_file)
                    .arg("--ready-file")
                    .arg(&ready_file)
                    .stdout(Stdio::null())
                    .stderr(Stdio::inherit())
                    .spawn()
                    .map_err(|e| format!("diia-gateway: {e}"))?,
            );
            ready_files.push(ready_file);
        }
        let mut target = Self {
            gateway: String::new(),
            gateways: Vec::new(),
            sim: format!("http://{sim_addr}"),
            admin: None,
            gateway_processes,
            sim_process: Some(sim_process),
            redis,
            _files: files,
        };
        for ready_file in &ready_files {
            let (listen, admin) = wait_for_ready_file(ready_file)?;
            target.gateways.push(format!("http://{listen}"));
            if target.admin.is_none() {
                target.admin = Some(format!("http://{admin}"));
            }
        }
        target.gateway = target.gateways.first().cloned().unwrap_or_default();
        Ok(target)
    }

    /// Redis's command count and CPU time, when this tool started it.
    pub async fn redis_usage(&self) -> Option<RedisCounters> {
        let (child, port) = self.redis.as_ref()?;
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", *port))
            .await
            .ok()?;
        tokio::io::AsyncWriteExt::write_all(&mut stream, b"*2\r\n$4\r\nINFO\r\n$5\r\nstats\r\n")
            .await
            .ok()?;
        let mut buffer = vec![0u8; 16 * 1024];
        let n = tokio::time::timeout(
            Duration::from_secs(2),
            tokio::io::AsyncReadExt::read(&mut stream, &mut buffer),
        )
        .await
        .ok()?
        .ok()?;
        let text = String::from_utf8_lossy(&buffer[..n]);
        let commands = text
            .lines()
            .find_map(|line| line.strip_prefix("total_commands_processed:"))?
            .trim()
            .parse()
            .ok()?;
        Some(RedisCounters {
            commands,
            cpu_seconds: process_cpu_seconds(child.id())?,
        })
    }

    /// Resident memory of the gateway process in bytes (`VmRSS`), when started here.
    pub fn gateway_rss_bytes(&self) -> Option<u64> {
        let pid = self.gateway_processes.first()?.id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    }

    /// CPU seconds (user + system) the gateway processes have used, when started here.
    pub fn gateway_cpu_seconds(&self) -> Option<f64> {
        if self.gateway_processes.is_empty() {
            return None;
        }
        self.gateway_processes
            .iter()
            .map(|child| process_cpu_seconds(child.id()))
            .sum()
    }
}

/// CPU seconds (user + system) a process has used, from `/proc/<pid>/stat`.
fn process_cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are 14 and 15.
    let after = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / clock_ticks_per_second())
}

/// `sysconf(_SC_CLK_TCK)`, read through `getconf` (100 on every Linux we run on).
fn clock_ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(100.0)
}
