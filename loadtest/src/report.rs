//! Reports: a readable table, JSON, an SVG of latency against offered load, and the
//! capacity planner's answers.

use std::path::Path;

use plotters::prelude::*;
use serde::{Deserialize, Serialize};

use crate::drive::RunResult;
use crate::scenario::Scenario;

fn ms(micros: u64) -> f64 {
    micros as f64 / 1000.0
}

/// One line per run.
pub fn table(results: &[RunResult]) -> String {
    let mut out = String::from(
        "offered/s  achieved/s   p50 ms   p90 ms   p99 ms p99.9 ms   max ms  errors  diia/req  diia/s  saved  gw cores\n",
    );
    for r in results {
        let errors: u64 = r.errors.values().sum();
        out.push_str(&format!(
            "{:>9.1}  {:>10.1} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>7} {:>9.3} {:>7.1} {:>6} {:>9}\n",
            r.offered_rate,
            r.throughput,
            ms(r.latency_us.p50),
            ms(r.latency_us.p90),
            ms(r.latency_us.p99),
            ms(r.latency_us.p999),
            ms(r.latency_us.max),
            errors,
            r.diia_calls_per_request,
            r.diia_calls_per_second,
            r.calls_saved,
            r.gateway_cores.map_or_else(|| "-".to_owned(), |c| format!("{c:.3}")),
        ));
        if !r.errors.is_empty() {
            out.push_str(&format!("           errors by kind: {:?}\n", r.errors));
        }
        if let Some(redis) = &r.redis {
            out.push_str(&format!(
                "           {} instances on one Redis: {:.0} Redis ops/s, redis-server {:.3} cores\n",
                r.instances, redis.ops_per_second, redis.cores
            ));
        }
    }
    out
}

/// What a capacity planner asks, answered from a sweep.
#[derive(Debug, Serialize, Deserialize)]
pub struct Capacity {
    /// The scenario's name.
    pub scenario: String,
    /// Branches and scan rate modelled.
    pub branches: u32,
    /// Scans per branch per minute.
    pub scans_per_branch_per_minute: f64,
    /// The scenario's offered rate (requests per second).
    pub scenario_rate: f64,
    /// p99 target.
    pub p99_target_ms: f64,
    /// Diia calls per second measured at the scenario rate.
    pub diia_quota_needed_per_second: f64,
    /// The same with 50 % headroom for bursts, what to ask Diia for.
    pub diia_quota_to_request_per_second: f64,
    /// Gateway CPU cores used at the scenario rate.
    pub gateway_cores_at_scenario_rate: Option<f64>,
    /// Gateway cores per 1,000 requests per second (highest in-target step).
    pub gateway_cores_per_1000_rps: Option<f64>,
    /// Highest offered rate with p99 under target and no errors.
    pub max_rate_within_target: Option<f64>,
    /// Lowest offered rate where p99 left the target (or errors began).
    pub first_rate_over_target: Option<f64>,
    /// Every step.
    pub steps: Vec<RunResult>,
}

impl Capacity {
    /// Derives the answers from a sweep (steps sorted by offered rate).
    pub fn from_sweep(scenario: &Scenario, steps: Vec<RunResult>) -> Self {
        let target_us = scenario.p99_target.as_micros() as f64;
        let scenario_rate = scenario.offered_rate();
        let within = |r: &RunResult| {
            (r.latency_us.p99 as f64) <= target_us && r.errors.values().sum::<u64>() == 0
        };
        let at_scenario = steps.iter().min_by(|a, b| {
            (a.offered_rate - scenario_rate)
                .abs()
                .total_cmp(&(b.offered_rate - scenario_rate).abs())
        });
        let quota = at_scenario.map_or(0.0, |r| {
            r.diia_calls_per_second * scenario_rate / r.offered_rate
        });
        let best = steps
            .iter()
            .filter(|r| within(r))
            .max_by(|a, b| a.offered_rate.total_cmp(&b.offered_rate));
        Self {
            scenario: scenario.name.clone(),
            branches: scenario.branches,
            scans_per_branch_per_minute: scenario.scans_per_branch_per_minute,
            scenario_rate,
            p99_target_ms: target_us / 1000.0,
            diia_quota_needed_per_second: quota,
            diia_quota_to_request_per_second: (quota * 1.5).ceil(),
            gateway_cores_at_scenario_rate: at_scenario.and_then(|r| r.gateway_cores),
            gateway_cores_per_1000_rps: best.and_then(|r| {
                r.gateway_cores
                    .map(|cores| cores * 1000.0 / r.throughput.max(1.0))
            }),
            max_rate_within_target: best.map(|r| r.offered_rate),
            first_rate_over_target: steps.iter().find(|r| !within(r)).map(|r| r.offered_rate),
            steps,
        }
    }

    /// The answers in sentences.
    pub fn summary(&self) -> String {
        let mut out = format!(
            "Scenario '{}': {} branches x {} scans/min = {:.1} requests/s\n",
            self.scenario, self.branches, self.scans_per_branch_per_minute, self.scenario_rate
        );
        out.push_str(&format!(
            "- Diia quota: {:.1} calls/s measured at that rate; ask for {:.0} calls/s (50% headroom)\n",
            self.diia_quota_needed_per_second, self.diia_quota_to_request_per_second
        ));
        match (self.gateway_cores_at_scenario_rate, self.gateway_cores_per_1000_rps) {
            (Some(cores), Some(per_k)) => out.push_str(&format!(
                "- Gateway CPU: {cores:.3} cores at that rate; {per_k:.3} cores per 1,000 req/s at the highest in-target load\n"
            )),
            _ => out.push_str("- Gateway CPU: not measured (gateway not started by this tool)\n"),
        }
        match (self.max_rate_within_target, self.first_rate_over_target) {
            (Some(ok), Some(over)) => out.push_str(&format!(
                "- p99 stays under {:.0} ms up to {ok:.0} req/s offered ({:.1}x the scenario); it leaves the target at {over:.0} req/s\n",
                self.p99_target_ms,
                ok / self.scenario_rate
            )),
            (Some(ok), None) => out.push_str(&format!(
                "- p99 stays under {:.0} ms at every step, up to {ok:.0} req/s ({:.1}x the scenario); sweep higher to find the knee\n",
                self.p99_target_ms,
                ok / self.scenario_rate
            )),
            (None, _) => out.push_str(&format!("- p99 is over {:.0} ms at every step\n", self.p99_target_ms)),
        }
        out
    }
}

/// Writes `value` as pretty JSON.
pub fn write_json(path: &Path, value: &impl Serialize) -> Result<(), String> {
    let text = serde_json::to_string_pretty(value).map_err(|e| e.to_string())?;
    std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))
}

/// Latency (p50, p99, p99.9) against offered load, with the p99 target.
pub fn plot(
    path: &Path,
    title: &str,
    steps: &[RunResult],
    p99_target_ms: f64,
) -> Result<(), String> {
    let max_rate = steps.iter().map(|r| r.offered_rate).fold(1.0, f64::max) * 1.05;
    let max_ms = steps
        .iter()
        .map(|r| ms(r.latency_us.p999))
        .fold(p99_target_ms, f64::max)
        * 1.1;
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..max_rate, (1.0..max_ms.max(2.0)).log_scale())
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc("offered load (requests/s)")
        .y_desc("latency (ms, log scale)")
        .draw()
        .map_err(|e| e.to_string())?;
    type Pick = fn(&RunResult) -> u64;
    let series: [(&str, RGBColor, Pick); 3] = [
        ("p50", BLUE, |r| r.latency_us.p50),
        ("p99", RED, |r| r.latency_us.p99),
        ("p99.9", MAGENTA, |r| r.latency_us.p999),
    ];
    for (label, color, pick) in series {
        let points: Vec<(f64, f64)> = steps
            .iter()
            .map(|r| (r.offered_rate, ms(pick(r))))
            .collect();
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
            .map_err(|e| e.to_string())?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        chart
            .draw_series(
                points
                    .into_iter()
                    .map(|p| Circle::new(p, 3, color.filled())),
            )
            .map_err(|e| e.to_string())?;
    }
    chart
        .draw_series(LineSeries::new(
            vec![(0.0, p99_target_ms), (max_rate, p99_target_ms)],
            BLACK.stroke_width(1),
        ))
        .map_err(|e| e.to_string())?
        .label("p99 target")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK));
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| e.to_string())?;
    root.present().map_err(|e| e.to_string())
}
