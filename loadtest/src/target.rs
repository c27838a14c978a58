//! What the load goes to: the gateway and simulator started here as child processes
//! (so the gateway's own CPU time can be read from `/proc`), or URLs given by the user.

use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::scenario::Scenario;

/// Where to send load, and how to observe it.
pub struct Target {
    /// Gateway base URL.
    pub gateway: String,
    /// Simulator base URL (for `/sim/stats`).
    pub sim: String,
    /// The gateway's admin base URL, when started here.
    pub admin: Option<String>,
    /// The gateway process, when started here.
    gateway_process: Option<Child>,
    sim_process: Option<Child>,
    _files: Vec<PathBuf>,
}

impl Drop for Target {
    fn drop(&mut self) {
        for child in [self.gateway_process.as_mut(), self.sim_process.as_mut()]
            .into_iter()
            .flatten()
        {
            let _ = child.kill();
            let _ = child.wait();
        }
        for file in &self._files {
            let _ = std::fs::remove_file(file);
        }
    }
}

fn free_port() -> Result<SocketAddr, String> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    listener.local_addr().map_err(|e| e.to_string())
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

fn wait_for_port(addr: SocketAddr) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(format!("{addr} did not start listening"))
}

impl Target {
    /// Uses running instances.
    pub fn external(gateway: String, sim: String) -> Self {
        Self {
            gateway,
            sim,
            admin: None,
            gateway_process: None,
            sim_process: None,
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
        let sim_addr = free_port()?;
        let gateway_addr = free_port()?;
        let admin_addr = free_port()?;
        let sim_config = format!(
            "listen = \"{sim_addr}\"\nauto_issue = true\n[faults]\nlatency = \"{}\"\nlatency_jitter = \"{}\"\nlatency_distribution = \"exponential\"\nerror_rate = {}\n",
            humantime::format_duration(scenario.diia.latency),
            humantime::format_duration(scenario.diia.latency_jitter),
            scenario.diia.error_rate,
        );
        let sim_file = write_temp("sim.toml", &sim_config)?;
        // Branch limits sized to the scenario (a branch never hits them in a normal run);
        // every branch comes from this one process, so the per-client limit and the Diia
        // share are lifted; the Diia budget is left wide so the report measures what Diia
        // would need.
        let gateway_config = format!(
            "[server]\nlisten = \"{gateway_addr}\"\nadmin_listen = \"{admin_addr}\"\n\
             [upstream]\nbase_url = \"http://{sim_addr}\"\n\
             [limits.branch]\nper_minute = 100000\nburst = 1000\n\
             [limits.client]\nper_minute = 100000000\nburst = 1000000\ndiia_share = 1.0\n\
             [limits.diia]\nper_second = 1000000\nburst = 100000\n\
             [log]\nfilter = \"warn\"\n{extra_config}"
        );
        let gateway_file = write_temp("gateway.toml", &gateway_config)?;
        let sim_process = Command::new(sibling_binary("diia-sim")?)
            .arg("--config")
            .arg(&sim_file)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("diia-sim: {e}"))?;
        let gateway_process = Command::new(sibling_binary("diia-gateway")?)
            .arg("--config")
            .arg(&gateway_file)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("diia-gateway: {e}"))?;
        let target = Self {
            gateway: format!("http://{gateway_addr}"),
            sim: format!("http://{sim_addr}"),
            admin: Some(format!("http://{admin_addr}")),
            gateway_process: Some(gateway_process),
            sim_process: Some(sim_process),
            _files: vec![sim_file, gateway_file],
        };
        wait_for_port(sim_addr)?;
        wait_for_port(gateway_addr)?;
        Ok(target)
    }

    /// Resident memory of the gateway process in bytes (`VmRSS`), when started here.
    pub fn gateway_rss_bytes(&self) -> Option<u64> {
        let pid = self.gateway_process.as_ref()?.id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    }

    /// CPU seconds (user + system) the gateway process has used, when started here.
    pub fn gateway_cpu_seconds(&self) -> Option<f64> {
        let pid = self.gateway_process.as_ref()?.id();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // Fields after the parenthesised command name; utime and stime are 14 and 15.
        let after = stat.rsplit_once(')')?.1;
        let fields: Vec<&str> = after.split_whitespace().collect();
        let utime: f64 = fields.get(11)?.parse().ok()?;
        let stime: f64 = fields.get(12)?.parse().ok()?;
        Some((utime + stime) / clock_ticks_per_second())
    }
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
