//! `loadtest`: open-loop load against diia-gateway, and a capacity report.
//!
//! ```sh
//! cargo build --release --workspace
//! target/release/loadtest run --scenario loadtest/scenarios/peak.toml
//! target/release/loadtest capacity --scenario loadtest/scenarios/peak.toml
//! ```
//! By default it starts `diia-sim` and `diia-gateway` (found next to itself) on loopback;
//! `--gateway URL --sim URL` targets running instances instead (loopback only);
//! `--instances 3` starts three gateways in scale-out mode on one redis-server.
//! `loadtest relay --url URL` posts callbacks to a running callback relay (see
//! loadtest/relay-bench.sh).

mod compare;
mod drive;
mod memory;
mod relay;
mod report;
mod scenario;
mod target;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::report::Capacity;
use crate::scenario::Scenario;
use crate::target::Target;

/// Open-loop load generator and capacity report for diia-gateway.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct Common {
    /// Scenario file.
    #[arg(long, default_value = "loadtest/scenarios/peak.toml")]
    scenario: PathBuf,
    /// Gateway base URL(s) to target instead of starting one (loopback only); several,
    /// comma-separated, are load-balanced round-robin.
    #[arg(long, requires = "sim", value_delimiter = ',')]
    gateway: Option<Vec<String>>,
    /// Start this many gateway instances in scale-out mode on one redis-server started
    /// here (needs `redis-server`), load-balanced round-robin.
    #[arg(long, default_value_t = 1, conflicts_with = "gateway")]
    instances: usize,
    /// Simulator base URL (for its call counters) when targeting running instances.
    #[arg(long, requires = "gateway")]
    sim: Option<String>,
    /// Override the scenario's run duration (e.g. 10s).
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Output directory for JSON and SVG.
    #[arg(long, default_value = "target/loadtest")]
    out: PathBuf,
}

#[derive(Subcommand)]
enum Command {
    /// One run at the scenario's rate (or --rate).
    Run {
        #[command(flatten)]
        common: Common,
        /// Offered requests per second (default: the scenario's).
        #[arg(long)]
        rate: Option<f64>,
    },
    /// Sweep offered load and answer: Diia quota, gateway cores, where p99 leaves the target.
    Capacity {
        #[command(flatten)]
        common: Common,
        /// Offered load steps, as multiples of the scenario's rate.
        #[arg(long, value_delimiter = ',', default_value = "0.5,1,2,4,8,16,32,64")]
        steps: Vec<f64>,
    },
    /// Resident memory per cached answer: fills N distinct answers into a gateway started
    /// here and reads its RSS from /proc.
    Memory {
        /// Distinct answers to fill.
        #[arg(long, default_value_t = 200_000)]
        entries: u64,
        /// `cache.max_bytes` of the gateway under test.
        #[arg(long, default_value_t = 256 * 1024 * 1024)]
        max_bytes: u64,
        /// Requests in flight while filling.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        /// Output directory.
        #[arg(long, default_value = "target/loadtest")]
        out: PathBuf,
    },
    /// The callback relay, closed or open loop (`--rate`): posts callbacks (one real CMS package, a new
    /// requestId each) to a running relay and reports callbacks/s and ack latency;
    /// `--deliver` also routes them and measures delivery to a sink hosted here.
    Relay(RelayArgs),
    /// Redraws the SVG of a capacity report from its JSON.
    Plot {
        /// A `capacity-*.json` written by `capacity`.
        input: PathBuf,
    },
    /// The same load against the gateway and a peer proxy (see loadtest/compare-nginx.sh).
    Compare {
        /// Gateway base URL (loopback).
        #[arg(long)]
        gateway: String,
        /// Peer proxy base URL (loopback), in front of the same simulator.
        #[arg(long)]
        peer: String,
        /// Peer's name in the report.
        #[arg(long, default_value = "nginx")]
        peer_name: String,
        /// Simulator base URL, for its call counters.
        #[arg(long)]
        sim: String,
        /// Offered rates of the cache-hit sweep.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "2000,4000,8000,16000,24000,32000"
        )]
        rates: Vec<f64>,
        /// Length of each step.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
        duration: Duration,
        /// p99 target for "throughput at target".
        #[arg(long, value_parser = humantime::parse_duration, default_value = "10ms")]
        p99_target: Duration,
        /// Rate at which p99 is compared.
        #[arg(long, default_value_t = 2000.0)]
        fixed_rate: f64,
        /// Output directory.
        #[arg(long, default_value = "target/loadtest")]
        out: PathBuf,
    },
}

/// `loadtest relay`'s arguments.
#[derive(clap::Args, Debug)]
struct RelayArgs {
    /// The relay's ingress URL, `http://127.0.0.1:PORT{path_prefix}/{token}` (loopback).
    #[arg(long)]
    url: String,
    /// Certificate packages are addressed to (the acquirer's `recipient_cert_file`).
    #[arg(long, default_value = "sim/demo/acquirer-cert.pem")]
    cert: PathBuf,
    /// Callbacks to post.
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(1..))]
    callbacks: u64,
    /// Callbacks in flight (closed loop), or their cap with `--rate`.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u16).range(1..))]
    concurrency: u16,
    /// Open loop: callbacks per second offered on a fixed schedule, latency counted from
    /// when each was due (raise `--concurrency` so the cap does not bind).
    #[arg(long, value_parser = positive_rate)]
    rate: Option<f64>,
    /// Bytes of base64 in the file part plus `encodeData`.
    #[arg(long, default_value_t = 200 * 1024)]
    size: usize,
    /// Also measure delivery: route every requestId through the gateway first and host the
    /// push target (the gateway's `[[callback_relay.target]]` url) on `--sink`.
    #[arg(long, requires_all = ["gateway", "sim"])]
    deliver: bool,
    /// The push-target sink's listen address, with `--deliver`.
    #[arg(long, default_value = "127.0.0.1:18071")]
    sink: SocketAddr,
    /// The gateway's branch listener base URL, with `--deliver`.
    #[arg(long)]
    gateway: Option<String>,
    /// The simulator's base URL (`POST /sim/barcodes`), with `--deliver`.
    #[arg(long)]
    sim: Option<String>,
    /// The branch whose target is the sink, with `--deliver`.
    #[arg(long, default_value = "kyiv-001")]
    branch: String,
    /// How long to wait for deliveries once ingest is done.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "60s")]
    deliver_timeout: Duration,
    /// Name of the JSON report (`relay-{label}.json`).
    #[arg(long, default_value = "run")]
    label: String,
    /// Output directory.
    #[arg(long, default_value = "target/loadtest")]
    out: PathBuf,
}

impl RelayArgs {
    /// Checks the addresses (loopback only) and builds the run's settings.
    fn settings(&self) -> Result<relay::Settings, String> {
        let urls = [Some(&self.url), self.gateway.as_ref(), self.sim.as_ref()];
        if !urls.into_iter().flatten().all(|url| is_loopback(url)) {
            return Err("load is only ever sent to loopback addresses".to_owned());
        }
        let deliver = match (self.deliver, &self.gateway, &self.sim) {
            (false, _, _) => None,
            (true, Some(gateway), Some(sim)) => {
                if !self.sink.ip().is_loopback() {
                    return Err("--sink must be a loopback address".to_owned());
                }
                Some(relay::Deliver {
                    sink: self.sink,
                    gateway: gateway.trim_end_matches('/').to_owned(),
                    sim: sim.trim_end_matches('/').to_owned(),
                    branch: self.branch.clone(),
                    timeout: self.deliver_timeout,
                })
            }
            (true, _, _) => return Err("--deliver needs --gateway and --sim".to_owned()),
        };
        Ok(relay::Settings {
            url: self.url.clone(),
            cert: self.cert.clone(),
            callbacks: self.callbacks,
            concurrency: usize::from(self.concurrency),
            rate: self.rate,
            size: self.size,
            deliver,
        })
    }
}

/// A finite rate above zero, callbacks per second.
fn positive_rate(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(rate) if rate.is_finite() && rate > 0.0 => Ok(rate),
        _ => Err(format!("{text}: not a rate above zero")),
    }
}

fn is_loopback(url: &str) -> bool {
    let host = url
        .trim_start_matches("http://")
        .split(['/', ':'])
        .next()
        .unwrap_or_default();
    host == "localhost" || host.starts_with("127.") || host == "[" || url.contains("[::1]")
}

fn prepare(common: &Common) -> Result<(Scenario, Target), String> {
    let mut scenario = Scenario::load(&common.scenario)?;
    if let Some(duration) = common.duration {
        scenario.duration = duration;
    }
    std::fs::create_dir_all(&common.out).map_err(|e| format!("{}: {e}", common.out.display()))?;
    let target = match (&common.gateway, &common.sim) {
        (Some(gateways), Some(sim)) => {
            if !gateways.iter().all(|g| is_loopback(g)) || !is_loopback(sim) {
                return Err("load is only ever sent to loopback addresses".to_owned());
            }
            Target::external(gateways.clone(), sim.clone())
        }
        _ if common.instances > 1 => Target::spawn_fleet(&scenario, common.instances)?,
        _ => Target::spawn(&scenario)?,
    };
    Ok((scenario, target))
}

async fn execute(command: Command) -> Result<(), String> {
    match command {
        Command::Run { common, rate } => {
            let (scenario, target) = prepare(&common)?;
            let rate = rate.unwrap_or_else(|| scenario.offered_rate());
            eprintln!(
                "running '{}' at {rate:.1} req/s for {:?}",
                scenario.name, scenario.duration
            );
            let result = drive::run(&target, &scenario, rate, scenario.duration).await?;
            print!("{}", report::table(std::slice::from_ref(&result)));
            let path = common.out.join(format!("run-{}.json", scenario.name));
            report::write_json(&path, &result)?;
            eprintln!("wrote {}", path.display());
        }
        Command::Capacity { common, steps } => {
            let (scenario, target) = prepare(&common)?;
            let base = scenario.offered_rate();
            let mut results = Vec::new();
            for multiple in steps {
                let rate = base * multiple;
                eprintln!(
                    "step {multiple}x: {rate:.1} req/s for {:?}",
                    scenario.duration
                );
                results.push(drive::run(&target, &scenario, rate, scenario.duration).await?);
            }
            results.sort_by(|a, b| a.offered_rate.total_cmp(&b.offered_rate));
            print!("{}", report::table(&results));
            let capacity = Capacity::from_sweep(&scenario, results);
            print!("{}", capacity.summary());
            let json = common.out.join(format!("capacity-{}.json", scenario.name));
            let svg = common.out.join(format!("capacity-{}.svg", scenario.name));
            report::write_json(&json, &capacity)?;
            report::plot(
                &svg,
                &format!("diia-gateway: latency vs offered load ({})", scenario.name),
                &capacity.steps,
                capacity.p99_target_ms,
            )?;
            eprintln!("wrote {} and {}", json.display(), svg.display());
        }
        Command::Memory {
            entries,
            max_bytes,
            concurrency,
            out,
        } => {
            std::fs::create_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
            let mut scenario =
                Scenario::load(std::path::Path::new("loadtest/scenarios/smoke.toml"))?;
            scenario.diia.latency = Duration::ZERO;
            scenario.diia.latency_jitter = Duration::ZERO;
            scenario.diia.error_rate = 0.0;
            let extra = format!("[cache]\nttl = \"180s\"\nmax_bytes = {max_bytes}\n");
            let target = Target::spawn_with(&scenario, &extra)?;
            let admin = target.admin.clone().ok_or("no admin address")?;
            eprintln!("filling {entries} distinct answers ({concurrency} in flight)");
            let report = memory::measure(&target, &admin, entries, max_bytes, concurrency).await?;
            print!("{}", report.summary());
            let path = out.join("memory.json");
            report::write_json(&path, &report)?;
            eprintln!("wrote {}", path.display());
        }
        Command::Relay(args) => {
            let settings = args.settings()?;
            std::fs::create_dir_all(&args.out)
                .map_err(|e| format!("{}: {e}", args.out.display()))?;
            let result = relay::run(&settings).await?;
            print!("{}", relay::summary(&result));
            let path = args.out.join(format!("relay-{}.json", args.label));
            report::write_json(&path, &result)?;
            eprintln!("wrote {}", path.display());
        }
        Command::Plot { input } => {
            let text =
                std::fs::read_to_string(&input).map_err(|e| format!("{}: {e}", input.display()))?;
            let capacity: Capacity =
                serde_json::from_str(&text).map_err(|e| format!("{}: {e}", input.display()))?;
            let svg = input.with_extension("svg");
            report::plot(
                &svg,
                &format!(
                    "diia-gateway: latency vs offered load ({})",
                    capacity.scenario
                ),
                &capacity.steps,
                capacity.p99_target_ms,
            )?;
            print!("{}", capacity.summary());
            eprintln!("wrote {}", svg.display());
        }
        Command::Compare {
            gateway,
            peer,
            peer_name,
            sim,
            rates,
            duration,
            p99_target,
            fixed_rate,
            out,
        } => {
            if ![&gateway, &peer, &sim].iter().all(|url| is_loopback(url)) {
                return Err("load is only ever sent to loopback addresses".to_owned());
            }
            std::fs::create_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
            let settings = compare::Settings {
                rates,
                duration,
                p99_target,
                fixed_rate,
                distinct_keys: 200,
                duplicates: 5,
            };
            eprintln!("diia-gateway at {gateway}, {peer_name} at {peer}, steps interleaved");
            let comparison = compare::run(&gateway, &peer, &peer_name, &sim, &settings).await?;
            print!("{}", comparison.summary(&settings));
            let path = out.join(format!("compare-{peer_name}.json"));
            report::write_json(&path, &comparison)?;
            eprintln!("wrote {}", path.display());
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("loadtest: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(execute(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("loadtest: {error}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn relay(args: &[&str]) -> Result<RelayArgs, clap::Error> {
        let mut argv = vec!["loadtest", "relay"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv).map(|cli| match cli.command {
            Command::Relay(args) => args,
            _ => unreachable!("not the relay subcommand"),
        })
    }

    const URL: &str = "http://127.0.0.1:8070/diia/callback/token";

    #[test]
    fn relay_defaults_are_the_issue_s_workload() {
        let settings = relay(&["--url", URL]).unwrap().settings().unwrap();
        assert_eq!(settings.concurrency, 32);
        assert_eq!(settings.size, 200 * 1024);
        assert_eq!(settings.callbacks, 2000);
        assert!(settings.deliver.is_none());
        assert!(settings.rate.is_none(), "closed loop by default");
    }

    #[test]
    fn relay_rate_is_an_open_loop_above_zero() {
        let settings = relay(&["--url", URL, "--rate", "400"])
            .unwrap()
            .settings()
            .unwrap();
        assert_eq!(settings.rate, Some(400.0));
        for bad in ["0", "-5", "NaN", "inf", "fast"] {
            assert!(
                relay(&["--url", URL, "--rate", bad]).is_err(),
                "--rate {bad}"
            );
        }
    }

    #[test]
    fn relay_deliver_needs_the_gateway_and_the_simulator() {
        assert!(relay(&["--url", URL, "--deliver"]).is_err());
        let args = relay(&[
            "--url",
            URL,
            "--deliver",
            "--gateway",
            "http://127.0.0.1:8080/",
            "--sim",
            "http://127.0.0.1:8090",
        ])
        .unwrap();
        let deliver = args.settings().unwrap().deliver.unwrap();
        assert_eq!(deliver.gateway, "http://127.0.0.1:8080");
        assert_eq!(deliver.sink, "127.0.0.1:18071".parse().unwrap());
    }

    #[test]
    fn relay_load_goes_to_loopback_only() {
        let args = relay(&["--url", "http://10.0.0.1:8070/diia/callback/token"]).unwrap();
        assert!(args.settings().is_err());
        let args = relay(&["--url", URL, "--sink", "0.0.0.0:9000", "--deliver"]);
        assert!(args.is_err(), "--deliver without --gateway parses");
        assert!(relay(&["--url", URL, "--concurrency", "0"]).is_err());
    }
}
