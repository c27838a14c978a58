//! Shared bench setup: a gateway driven in-process (no client socket) in front of an
//! in-process simulator over loopback.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::Arc;

use bytes::Bytes;
use diia_gateway::Settings;
use diia_gateway::barcode::Barcode;
use diia_gateway::config::FileConfig;
use diia_gateway::gateway::Gateway;
use diia_gateway::keys::HashKey;
use diia_gateway::metrics::Metrics;
use diia_gateway::route::Endpoint;
use diia_gateway::service::{HttpResponse, Reply};
use diia_gateway::upstream::{Upstream, UpstreamRequest};
use diia_sim::{DEMO_ACQUIRER_TOKEN, DEMO_AUTH_TOKEN, SimConfig, SimHandle, Simulator};
use http::{HeaderValue, Method, Request};
use http_body_util::{BodyExt, Full};

/// The client address the gateway sees.
pub const PEER: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 40000);

/// A gateway plus the simulator behind it.
pub struct InProcess {
    pub gateway: Gateway,
    pub sim: SimHandle,
    pub bearer: HeaderValue,
    /// A second client to the same simulator, for the "no gateway" baseline.
    pub direct: Upstream,
    /// The settings both run on.
    pub settings: Settings,
}

/// The simulator on a free loopback port, issuing barcodes as they are first seen.
pub async fn auto_issuing_simulator() -> SimHandle {
    Simulator::start(SimConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        auto_issue: true,
        ..SimConfig::default()
    })
    .await
    .unwrap()
}

impl InProcess {
    /// Starts the simulator (auto-issuing barcodes) and builds a gateway in front of it.
    pub async fn start() -> Self {
        let sim = auto_issuing_simulator().await;
        let mut config = FileConfig::default();
        config.upstream.base_url = sim.base_url();
        config.limits.branch.per_minute = NonZeroU32::new(u32::MAX).unwrap();
        config.limits.branch.burst = NonZeroU32::new(u32::MAX).unwrap();
        config.limits.client.per_minute = NonZeroU32::new(u32::MAX).unwrap();
        config.limits.client.burst = NonZeroU32::new(u32::MAX).unwrap();
        config.limits.diia.per_second = NonZeroU32::new(u32::MAX).unwrap();
        config.limits.diia.burst = NonZeroU32::new(u32::MAX).unwrap();
        let mut settings = Settings::build(&config).unwrap();
        settings.keys = HashKey::fixed([5; 16]);
        let gateway = Gateway::build(&settings).unwrap();
        let direct = Upstream::new(
            &settings.cold,
            &sim.base_url(),
            Arc::new(Metrics::new()),
            None,
        )
        .unwrap();
        let exchange = Request::get(format!("/api/v1/auth/acquirer/{DEMO_ACQUIRER_TOKEN}"))
            .header("authorization", format!("Basic {DEMO_AUTH_TOKEN}"))
            .body(Full::<Bytes>::default())
            .unwrap();
        let answer = gateway
            .serve(exchange, PEER)
            .await
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes();
        let json: serde_json::Value = serde_json::from_slice(&answer).unwrap();
        let bearer =
            HeaderValue::try_from(format!("Bearer {}", json["token"].as_str().unwrap())).unwrap();
        Self {
            gateway,
            sim,
            bearer,
            direct,
            settings,
        }
    }

    /// The same identification sent straight to the simulator, without the gateway.
    pub async fn direct(&self, barcode: Barcode) -> u16 {
        let body = format!(
            r#"{{"branchId":"bench-branch","barcode":"{}"}}"#,
            barcode.digits()
        );
        let request = UpstreamRequest {
            endpoint: Endpoint::DocumentIdentification,
            method: Method::POST,
            path_and_query: "/api/v1/acquirers/document-identification".to_owned(),
            authorization: Some(self.bearer.clone()),
            trace_id: None,
            content_type: None,
            body: Bytes::from(body),
            share: None,
            prepaid: None,
            unverified: false,
        };
        self.direct
            .call(&self.settings.hot, request)
            .await
            .map_or(0, |answer| answer.status.as_u16())
    }

    /// An identification request for a barcode, as a branch backend sends it.
    pub fn identification(&self, barcode: Barcode) -> Request<Full<Bytes>> {
        let body = format!(
            r#"{{"branchId":"bench-branch","barcode":"{}"}}"#,
            barcode.digits()
        );
        self.identification_body(Bytes::from(body))
    }

    /// The same with a prepared body (no formatting inside a measured loop).
    pub fn identification_body(&self, body: Bytes) -> Request<Full<Bytes>> {
        let mut request = Request::post("/api/v1/acquirers/document-identification")
            .header("content-type", "application/json")
            .body(Full::new(body))
            .unwrap();
        request
            .headers_mut()
            .insert("authorization", self.bearer.clone());
        request
    }

    /// Serves one request in-process.
    pub async fn serve(&self, request: Request<Full<Bytes>>) -> HttpResponse {
        self.gateway.serve(request, PEER).await
    }

    /// Serves one request in-process as the HTTP/1.1 loop does: the reply, not a response.
    pub async fn reply(&self, request: Request<Full<Bytes>>) -> Reply {
        self.gateway.reply(request, PEER).await
    }
}

/// Distinct valid barcodes, one per call.
pub struct Barcodes(u64);

impl Barcodes {
    pub fn new(start: u64) -> Self {
        Self(start)
    }

    pub fn next(&mut self) -> Barcode {
        self.0 += 1;
        Barcode::from_base(self.0).unwrap()
    }
}
