//! A load scenario, read from a TOML file in `loadtest/scenarios/`: who scans what, how often.

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The traffic of a branch network, and the Diia it meets.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// A name for reports.
    pub name: String,
    /// Branches scanning at once.
    pub branches: u32,
    /// Scans per branch per minute at the modelled moment (peak hour for capacity).
    pub scans_per_branch_per_minute: f64,
    /// Chance that a scan is a re-scan of the branch's previous barcode (operator repeats,
    /// another internal system checking the same customer).
    pub rescan_probability: f64,
    /// Share of scans that are sharing (`document-request`) rather than identification.
    pub sharing_share: f64,
    /// Share of scans with a mistyped barcode (refused by the gateway).
    pub invalid_share: f64,
    /// How long each measured run lasts.
    #[serde(with = "humantime_serde")]
    pub duration: Duration,
    /// Warm-up before measuring (connections, caches).
    #[serde(with = "humantime_serde", default = "default_warmup")]
    pub warmup: Duration,
    /// p99 latency target for the capacity report.
    #[serde(with = "humantime_serde")]
    pub p99_target: Duration,
    /// Diia as the simulator plays it.
    pub diia: DiiaModel,
}

fn default_warmup() -> Duration {
    Duration::from_secs(2)
}

/// Diia latency and error rate.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DiiaModel {
    /// Fixed latency.
    #[serde(with = "humantime_serde")]
    pub latency: Duration,
    /// Exponential jitter mean on top.
    #[serde(with = "humantime_serde")]
    pub latency_jitter: Duration,
    /// Share of 500 answers.
    pub error_rate: f64,
}

impl Scenario {
    /// Reads a scenario file.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let scenario: Self =
            toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        for (key, value) in [
            ("rescan_probability", scenario.rescan_probability),
            ("sharing_share", scenario.sharing_share),
            ("invalid_share", scenario.invalid_share),
            ("diia.error_rate", scenario.diia.error_rate),
        ] {
            if !(0.0..=1.0).contains(&value) {
                return Err(format!("{key} must be within [0, 1]"));
            }
        }
        if scenario.branches == 0 || scenario.scans_per_branch_per_minute <= 0.0 {
            return Err("branches and scans_per_branch_per_minute must be above 0".to_owned());
        }
        Ok(scenario)
    }

    /// Requests per second the whole network sends at this scenario's scan rate.
    pub fn offered_rate(&self) -> f64 {
        f64::from(self.branches) * self.scans_per_branch_per_minute / 60.0
    }
}
