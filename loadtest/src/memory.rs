//! `loadtest memory`: what one cached answer costs in resident memory. Fills the gateway
//! (started here, in front of `diia-sim`) with N distinct identification answers and reads
//! the gateway's RSS from `/proc` before and after.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use serde::Serialize;

use crate::drive::{self, HttpClient};
use crate::target::Target;

/// The measurement.
#[derive(Debug, Serialize)]
pub struct MemoryReport {
    /// Distinct answers sent to fill the cache.
    pub requests: u64,
    /// Answers the gateway says it holds (`diia_gateway_cache_entries{cache="answers"}`).
    pub cached: u64,
    /// `cache.max_bytes` of the run.
    pub max_bytes: u64,
    /// RSS after warm-up, bytes.
    pub rss_before: u64,
    /// RSS after the fill, bytes.
    pub rss_after: u64,
    /// (after − before) / cached.
    pub bytes_per_entry: f64,
    /// RSS growth as a share of `max_bytes` (only meaningful when the cache is full).
    pub growth_over_max_bytes: f64,
}

impl MemoryReport {
    /// A few lines for the terminal.
    pub fn summary(&self) -> String {
        format!(
            "memory: {} requests, {} answers cached (cache.max_bytes = {} MiB)\n\
             RSS {:.1} MiB -> {:.1} MiB: {:.0} bytes per cached answer; growth = {:.1} % of max_bytes\n",
            self.requests,
            self.cached,
            self.max_bytes / (1024 * 1024),
            mib(self.rss_before),
            mib(self.rss_after),
            self.bytes_per_entry,
            self.growth_over_max_bytes * 100.0,
        )
    }
}

#[allow(clippy::cast_precision_loss)]
fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Fills `entries` distinct answers with `concurrency` requests in flight.
pub async fn measure(
    target: &Target,
    admin: &str,
    entries: u64,
    max_bytes: u64,
    concurrency: usize,
) -> Result<MemoryReport, String> {
    let client = drive::client();
    let token = drive::session_token(&client, &target.gateway).await?;
    fill(&client, &target.gateway, &token, 2_000, concurrency).await?;
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let rss_before = target.gateway_rss_bytes().ok_or("no RSS for the gateway")?;
    let before = cached_answers(&client, admin).await?;
    fill(&client, &target.gateway, &token, entries, concurrency).await?;
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let after = cached_answers(&client, admin).await?;
    let rss_after = target.gateway_rss_bytes().ok_or("no RSS for the gateway")?;
    let cached = after.saturating_sub(before).max(1);
    #[allow(clippy::cast_precision_loss)]
    let growth = rss_after.saturating_sub(rss_before) as f64;
    #[allow(clippy::cast_precision_loss)]
    Ok(MemoryReport {
        requests: entries,
        cached: after,
        max_bytes,
        rss_before,
        rss_after,
        bytes_per_entry: growth / cached as f64,
        growth_over_max_bytes: growth / max_bytes as f64,
    })
}

async fn fill(
    client: &HttpClient,
    gateway: &str,
    token: &str,
    count: u64,
    concurrency: usize,
) -> Result<(), String> {
    let next = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (client, next, failures) =
                (client.clone(), Arc::clone(&next), Arc::clone(&failures));
            let url = format!("{gateway}/api/v1/acquirers/document-identification");
            let token = token.to_owned();
            tokio::spawn(async move {
                while next.fetch_add(1, Ordering::Relaxed) < count {
                    let body = format!(
                        r#"{{"branchId":"branch-{:05}","barcode":"{}"}}"#,
                        fastrand::u32(..7800),
                        drive::random_barcode().digits()
                    );
                    let Ok(request) = Request::post(url.as_str())
                        .header("authorization", token.as_str())
                        .header("content-type", "application/json")
                        .body(Full::new(Bytes::from(body)))
                    else {
                        failures.fetch_add(1, Ordering::Relaxed);
                        continue;
                    };
                    match client.request(request).await {
                        Ok(response) if response.status() == StatusCode::OK => {
                            let _ = http_body_util::BodyExt::collect(response.into_body()).await;
                        }
                        _ => {
                            failures.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await.map_err(|e| e.to_string())?;
    }
    let failed = failures.load(Ordering::Relaxed);
    if failed > count / 100 {
        return Err(format!("{failed} of {count} fill requests failed"));
    }
    Ok(())
}

async fn cached_answers(client: &HttpClient, admin: &str) -> Result<u64, String> {
    let request = Request::get(format!("{admin}/metrics"))
        .body(Full::default())
        .map_err(|e| e.to_string())?;
    let response = client.request(request).await.map_err(|e| e.to_string())?;
    let body = http_body_util::BodyExt::collect(response.into_body())
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    let text = String::from_utf8_lossy(&body);
    text.lines()
        .find_map(|line| {
            line.strip_prefix(r#"diia_gateway_cache_entries{cache="answers"} "#)
                .and_then(|v| v.trim().parse::<f64>().ok())
        })
        .map(|v| {
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            let n = v as u64;
            n
        })
        .ok_or_else(|| "no cache_entries in /metrics".to_owned())
}
