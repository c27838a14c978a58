//! `diia-sim`: the Diia simulator on its own, for demos and load tests.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use diia_sim::{SimConfig, Simulator};

/// A Diia acquirer-API simulator with fault knobs.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Simulator config (TOML, the keys of the gateway's `[simulator]` table).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Listen address (overrides the config).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Treat every well-formed unknown barcode as freshly issued (load tests).
    #[arg(long)]
    auto_issue: bool,
    /// POST document packages here after each consent push (overrides the config).
    #[arg(long)]
    callback_url: Option<String>,
}

fn load(cli: &Cli) -> Result<SimConfig, String> {
    let mut config = match &cli.config {
        Some(path) => {
            let text =
                std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
            toml::from_str::<SimConfig>(&text).map_err(|e| e.to_string())?
        }
        None => SimConfig::default(),
    };
    if let Some(listen) = cli.listen {
        config.listen = listen;
    }
    config.auto_issue |= cli.auto_issue;
    if let Some(url) = &cli.callback_url {
        config.callback_url = Some(url.clone());
    }
    config.validate()?;
    Ok(config)
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let config = match load(&cli) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("diia-sim: invalid config: {error}");
            return ExitCode::from(2);
        }
    };
    let handle = match Simulator::start(config).await {
        Ok(handle) => handle,
        Err(error) => {
            eprintln!("diia-sim: cannot start: {error}");
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(addr = %handle.addr(), "diia-sim listening");
    let _ = tokio::signal::ctrl_c().await;
    handle.stop().await;
    ExitCode::SUCCESS
}
