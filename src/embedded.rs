//! The Diia simulator inside the gateway process (`[simulator]`, feature `embedded-sim`):
//! the demo and quick tries, never production (settings refuse it off loopback).

use diia_sim::{SimConfig, SimHandle, Simulator};

/// Starts the simulator and says loudly that it, not Diia, is the upstream.
pub async fn start(config: SimConfig) -> std::io::Result<SimHandle> {
    let simulator = Simulator::start(config).await?;
    tracing::warn!(
        simulator = %simulator.addr(),
        "the upstream is the embedded Diia SIMULATOR, not Diia: for demos and tests only"
    );
    Ok(simulator)
}
