//! Peer comparison: the same load against diia-gateway and another caching proxy (NGINX)
//! in front of the same simulator, in one run, and the ratios.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use crate::drive::{self, Percentiles, Scan, Tally};

/// One proxy's numbers.
#[derive(Debug, Clone, Serialize)]
pub struct ProxyResult {
    /// Which proxy.
    pub name: String,
    /// Cache-hit sweep: (offered rate, p99 µs, errors) per step.
    pub hit_sweep: Vec<HitStep>,
    /// Highest offered rate whose p99 stayed under the target with no errors.
    pub hit_throughput_at_target: f64,
    /// p99 at the fixed comparison rate, µs.
    pub hit_p99_at_fixed_rate_us: u64,
    /// Branch requests sent in the upstream-calls workload.
    pub dedup_requests: u64,
    /// Calls that reached the simulator for them.
    pub dedup_upstream_calls: u64,
    /// Distinct keys in that workload (the least possible number of calls).
    pub dedup_distinct_keys: u64,
    /// Latency of the duplicate bursts (leader and waiters), µs: how fast waiters are woken.
    pub dedup_latency_us: Percentiles,
}

/// One step of the cache-hit sweep.
#[derive(Debug, Clone, Serialize)]
pub struct HitStep {
    /// Offered requests per second.
    pub offered_rate: f64,
    /// Achieved expected answers per second.
    pub throughput: f64,
    /// Latencies in µs.
    pub latency_us: Percentiles,
    /// Unexpected answers.
    pub errors: BTreeMap<String, u64>,
}

/// The comparison's settings.
pub struct Settings {
    /// Offered rates of the cache-hit sweep.
    pub rates: Vec<f64>,
    /// Length of each step.
    pub duration: Duration,
    /// Latency target for "throughput at target".
    pub p99_target: Duration,
    /// The rate at which p99 is compared.
    pub fixed_rate: f64,
    /// Distinct barcodes in the upstream-calls workload.
    pub distinct_keys: u64,
    /// Identical concurrent requests per barcode in that workload.
    pub duplicates: u64,
}

/// One proxy under test, primed with a cached answer.
struct Contender {
    name: String,
    url: String,
    client: drive::HttpClient,
    token: Arc<str>,
    hit: Scan,
    hit_sweep: Vec<HitStep>,
}

impl Contender {
    async fn prime(name: &str, url: &str, gateway: &str) -> Result<Self, String> {
        let client = drive::client();
        // The session token comes from the simulator via the gateway; both proxies forward it.
        let token: Arc<str> = drive::session_token(&client, gateway).await?.into();
        let barcode = drive::random_barcode().digits();
        let hit = Scan::identification("hit", &format!("cmp-{name}"), &barcode);
        let mut prime = || hit.clone();
        drive::offer(
            &client,
            url,
            &token,
            &mut prime,
            10.0,
            Duration::from_millis(300),
            None,
        )
        .await;
        Ok(Self {
            name: name.to_owned(),
            url: url.to_owned(),
            client,
            token,
            hit,
            hit_sweep: Vec::new(),
        })
    }

    /// Cache hits at one offered rate.
    async fn hit_step(&mut self, rate: f64, duration: Duration) -> Result<(), String> {
        let histogram = drive::histogram()?;
        let hit = self.hit.clone();
        let mut next = || hit.clone();
        let started = std::time::Instant::now();
        let (_, Tally { ok, errors }, _) = drive::offer(
            &self.client,
            &self.url,
            &self.token,
            &mut next,
            rate,
            duration,
            Some(Arc::clone(&histogram)),
        )
        .await;
        let elapsed = started.elapsed().as_secs_f64();
        let latency_us = Percentiles::of(&histogram)?;
        eprintln!(
            "  {}: {rate:.0}/s offered, p99 {:.2} ms, errors {}",
            self.name,
            latency_us.p99 as f64 / 1000.0,
            errors.values().sum::<u64>()
        );
        self.hit_sweep.push(HitStep {
            offered_rate: rate,
            throughput: ok as f64 / elapsed,
            latency_us,
            errors,
        });
        Ok(())
    }

    /// Each fresh barcode asked `duplicates` times at once, then re-scanned once.
    async fn finish(self, sim: &str, settings: &Settings) -> Result<ProxyResult, String> {
        let before = drive::diia_calls(&self.client, sim).await?;
        let dedup_histogram = drive::histogram()?;
        let mut requests = 0;
        for i in 0..settings.distinct_keys {
            let scan = Scan::identification(
                "dedup",
                &format!("cmp-{}-{i}", self.name),
                &drive::random_barcode().digits(),
            );
            let mut next = || scan.clone();
            // All duplicates due at the same instant (a very high rate for a handful).
            let burst = Duration::from_micros(settings.duplicates);
            let histogram = Some(Arc::clone(&dedup_histogram));
            drive::offer(
                &self.client,
                &self.url,
                &self.token,
                &mut next,
                1_000_000.0,
                burst,
                histogram,
            )
            .await;
            let once = Duration::from_micros(1);
            drive::offer(
                &self.client,
                &self.url,
                &self.token,
                &mut next,
                1_000_000.0,
                once,
                None,
            )
            .await;
            requests += settings.duplicates + 1;
        }
        let dedup_upstream_calls = drive::diia_calls(&self.client, sim)
            .await?
            .saturating_sub(before);
        let target_us = u64::try_from(settings.p99_target.as_micros()).unwrap_or(u64::MAX);
        let hit_throughput_at_target = self
            .hit_sweep
            .iter()
            .filter(|s| s.latency_us.p99 <= target_us && s.errors.is_empty())
            .map(|s| s.throughput)
            .fold(0.0, f64::max);
        let hit_p99_at_fixed_rate_us = self
            .hit_sweep
            .iter()
            .find(|s| (s.offered_rate - settings.fixed_rate).abs() < f64::EPSILON)
            .map_or(0, |s| s.latency_us.p99);
        Ok(ProxyResult {
            name: self.name,
            hit_sweep: self.hit_sweep,
            hit_throughput_at_target,
            hit_p99_at_fixed_rate_us,
            dedup_requests: requests,
            dedup_upstream_calls,
            dedup_distinct_keys: settings.distinct_keys,
            dedup_latency_us: Percentiles::of(&dedup_histogram)?,
        })
    }
}

/// Runs every workload against both proxies. Each cache-hit step runs on the gateway and
/// then on the peer before the next step, so noise on a shared machine hits both alike.
pub async fn run(
    gateway: &str,
    peer: &str,
    peer_name: &str,
    sim: &str,
    settings: &Settings,
) -> Result<Comparison, String> {
    let mut ours = Contender::prime("diia-gateway", gateway, gateway).await?;
    let mut theirs = Contender::prime(peer_name, peer, gateway).await?;
    let mut rates = settings.rates.clone();
    if !rates
        .iter()
        .any(|r| (*r - settings.fixed_rate).abs() < f64::EPSILON)
    {
        rates.push(settings.fixed_rate);
    }
    rates.sort_by(f64::total_cmp);
    // Warm both up (connection pools, caches, CPU frequency) at the first rate, unmeasured.
    let warmup = rates.first().copied().unwrap_or(1000.0);
    for contender in [&mut ours, &mut theirs] {
        let hit = contender.hit.clone();
        let mut next = || hit.clone();
        let warm = Duration::from_secs(1);
        drive::offer(
            &contender.client,
            &contender.url,
            &contender.token,
            &mut next,
            warmup,
            warm,
            None,
        )
        .await;
    }
    for rate in rates {
        ours.hit_step(rate, settings.duration).await?;
        theirs.hit_step(rate, settings.duration).await?;
    }
    let ours = ours.finish(sim, settings).await?;
    let theirs = theirs.finish(sim, settings).await?;
    Ok(Comparison::new(ours, theirs))
}

/// The ratios, gateway over peer.
#[derive(Debug, Serialize)]
pub struct Comparison {
    /// The gateway.
    pub gateway: ProxyResult,
    /// The peer.
    pub peer: ProxyResult,
    /// Cache-hit throughput at the p99 target, gateway / peer (higher is better).
    pub throughput_ratio: f64,
    /// p99 at the fixed rate, gateway / peer (lower is better).
    pub p99_ratio: f64,
    /// Upstream calls, gateway / peer (lower is better).
    pub upstream_calls_ratio: f64,
}

impl Comparison {
    /// Derives the ratios.
    pub fn new(gateway: ProxyResult, peer: ProxyResult) -> Self {
        let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::INFINITY };
        Self {
            throughput_ratio: ratio(
                gateway.hit_throughput_at_target,
                peer.hit_throughput_at_target,
            ),
            p99_ratio: ratio(
                gateway.hit_p99_at_fixed_rate_us as f64,
                peer.hit_p99_at_fixed_rate_us as f64,
            ),
            upstream_calls_ratio: ratio(
                gateway.dedup_upstream_calls as f64,
                peer.dedup_upstream_calls as f64,
            ),
            gateway,
            peer,
        }
    }

    /// A readable summary.
    pub fn summary(&self, settings: &Settings) -> String {
        let (g, p) = (&self.gateway, &self.peer);
        format!(
            "                              {:>14} {:>14}   ratio (gateway/peer)\n\
             cache-hit req/s at p99<{:>4}ms {:>14.0} {:>14.0}   {:.2}x\n\
             cache-hit p99 at {:>6.0}/s ms {:>14.3} {:>14.3}   {:.2}x\n\
             upstream calls ({} keys, {} req) {:>9} {:>14}   {:.2}x\n\
             duplicate-burst p50 / p99 ms  {:>6.2} / {:<6.2} {:>6.2} / {:<6.2}\n",
            g.name,
            p.name,
            settings.p99_target.as_millis(),
            g.hit_throughput_at_target,
            p.hit_throughput_at_target,
            self.throughput_ratio,
            settings.fixed_rate,
            g.hit_p99_at_fixed_rate_us as f64 / 1000.0,
            p.hit_p99_at_fixed_rate_us as f64 / 1000.0,
            self.p99_ratio,
            g.dedup_distinct_keys,
            g.dedup_requests,
            g.dedup_upstream_calls,
            p.dedup_upstream_calls,
            self.upstream_calls_ratio,
            g.dedup_latency_us.p50 as f64 / 1000.0,
            g.dedup_latency_us.p99 as f64 / 1000.0,
            p.dedup_latency_us.p50 as f64 / 1000.0,
            p.dedup_latency_us.p99 as f64 / 1000.0,
        )
    }
}
