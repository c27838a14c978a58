//! `diia-gateway`: CLI → Settings → tracing → serve; nothing else.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// mimalloc instead of glibc malloc: a cached answer costs ~650 bytes of RSS with it
/// against ~1,050 with glibc's per-thread arenas (`loadtest memory`, docs/security.md "Memory model").
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use diia_gateway::Settings;
use diia_gateway::access::AccessLog;
use diia_gateway::config::LogFormat;
use diia_gateway::logsink::{LogSink, QUEUED_LINES};
use tracing_subscriber::EnvFilter;

/// A verification gateway in front of Diia's acquirer API.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Config file (TOML); every key is optional, see config/gateway.toml.
    #[arg(long, short, default_value = "config/gateway.toml")]
    config: PathBuf,
    /// Validate the config, print the result and exit (0 valid, 2 invalid).
    #[arg(long)]
    check_config: bool,
    /// Once listening, write the bound addresses to this file (`listen=ADDR` and
    /// `admin=ADDR` lines, and `relay=ADDR` when `[callback_relay]` is on; written whole,
    /// then renamed into place), so a supervisor or a test can configure `:0` ports and
    /// learn which ones the kernel gave.
    #[arg(long)]
    ready_file: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let settings = match Settings::load(&cli.config) {
        Ok(settings) => settings,
        Err(error) => {
            eprintln!(
                "diia-gateway: invalid config {}: {error}",
                cli.config.display()
            );
            return ExitCode::from(2);
        }
    };
    if cli.check_config {
        println!("{}: ok", cli.config.display());
        return ExitCode::SUCCESS;
    }
    let (log_sink, _flush_on_exit) = match LogSink::spawn(std::io::stderr(), QUEUED_LINES) {
        Ok(pair) => pair,
        Err(error) => {
            eprintln!("diia-gateway: cannot start the log writer: {error}");
            return ExitCode::FAILURE;
        }
    };
    init_tracing(&settings, log_sink.clone());
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("diia-gateway: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let log_format = settings.cold.log_format;
    let ready_file = cli.ready_file;
    runtime.block_on(run(settings, cli.config, ready_file, log_sink, log_format))
}

async fn run(
    settings: Settings,
    path: PathBuf,
    ready_file: Option<PathBuf>,
    log_sink: LogSink,
    log_format: LogFormat,
) -> ExitCode {
    let gateway = match diia_gateway::start_from_file(settings, Some(path)).await {
        Ok(gateway) => gateway,
        Err(error) => {
            tracing::error!(%error, "cannot start");
            return ExitCode::FAILURE;
        }
    };
    gateway
        .gateway()
        .log_access_to(AccessLog::new(log_sink.clone(), log_format));
    gateway
        .gateway()
        .metrics()
        .count_dropped_log_lines(move || log_sink.dropped());
    #[cfg(feature = "embedded-sim")]
    if let Some(simulator) = gateway.simulator() {
        tracing::info!(
            simulator = %simulator.addr(),
            "embedded Diia simulator is the upstream; issue a barcode with POST /sim/barcodes on it"
        );
    }
    #[cfg(unix)]
    if let Some(reloader) = gateway.reload_handle() {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut hangups) = signal(SignalKind::hangup()) {
            tokio::spawn(async move {
                while hangups.recv().await.is_some() {
                    // The reloader logs the outcome; a refused file leaves the old config serving.
                    let _ = reloader.reload();
                }
            });
        }
    }
    if let Some(ready_file) = ready_file
        && let Err(error) = write_ready_file(
            &ready_file,
            gateway.addr(),
            gateway.admin_addr(),
            gateway.relay_addr(),
        )
    {
        tracing::error!(%error, path = %ready_file.display(), "cannot write the ready file");
        gateway.shutdown_handle().trigger();
        gateway.wait().await;
        return ExitCode::FAILURE;
    }
    let shutdown = gateway.shutdown_handle();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown signal received; draining");
        shutdown.trigger();
    });
    gateway.wait().await;
    tracing::info!("stopped");
    ExitCode::SUCCESS
}

/// `--ready-file`: the bound addresses, written whole and renamed into place, so a reader
/// never sees half a file. The relay's line is there only when the relay listens.
fn write_ready_file(
    path: &std::path::Path,
    listen: std::net::SocketAddr,
    admin: std::net::SocketAddr,
    relay: Option<std::net::SocketAddr>,
) -> std::io::Result<()> {
    let partial = path.with_extension("partial");
    let mut text = format!("listen={listen}\nadmin={admin}\n");
    if let Some(relay) = relay {
        text.push_str(&format!("relay={relay}\n"));
    }
    std::fs::write(&partial, text)?;
    std::fs::rename(&partial, path)
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut terminate) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = terminate.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

fn init_tracing(settings: &Settings, writer: LogSink) {
    let filter =
        EnvFilter::try_new(&settings.cold.log_filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(writer);
    match settings.cold.log_format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}
