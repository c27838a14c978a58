//! The admin listener: `/metrics` (Prometheus text), `/healthz` (process alive),
//! `/readyz` (accepting traffic; turns 503 as soon as a drain starts), `POST /reload`
//! (re-read the config file), and with `[callback_relay]` on the relay's record endpoints
//! under `/relay/` ([`crate::relay::admin`]; `404 relay_off` while the relay is off).
//! Kept on its own port so branch traffic can never reach it.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use http::{HeaderValue, Method, Response, StatusCode, header};
use http_body_util::Full;

use crate::gateway::Gateway;
use crate::head::RequestHead;
use crate::relay::CallbackStore;
use crate::relay::admin::{self as relay_admin, AdminError};
use crate::relay::fleet_pulls::FleetPulls;
use crate::reload::Reloader;
use crate::service::{Handler, HttpResponse, Reply, RequestBody, Shutdown};

/// What the relay's admin endpoints work on: its store and, in a fleet, the pull-only
/// copies in Redis (purge and erase reach them too).
pub struct RelayAdmin {
    /// The relay's store.
    pub store: Arc<dyn CallbackStore>,
    /// The fleet's pull copies (`[scaleout]` on).
    pub pulls: Option<Arc<FleetPulls>>,
}

/// Admin endpoints over the gateway's state.
pub struct Admin {
    gateway: Arc<Gateway>,
    shutdown: Shutdown,
    reloader: Option<Arc<Reloader>>,
    /// The relay's parts, attached once the relay has started (it starts after the admin
    /// handler is built); unset, `/relay/` answers `404 relay_off`.
    relay: OnceLock<RelayAdmin>,
}

impl Admin {
    /// Admin view of a gateway; `/readyz` follows `shutdown`.
    #[must_use]
    pub fn new(gateway: Arc<Gateway>, shutdown: Shutdown, reloader: Option<Arc<Reloader>>) -> Self {
        Self {
            gateway,
            shutdown,
            reloader,
            relay: OnceLock::new(),
        }
    }

    /// Serves the relay's record endpoints from now on (once; later calls change
    /// nothing). Without it they answer `404 relay_off`.
    pub fn attach_relay(&self, relay: RelayAdmin) {
        let _ = self.relay.set(relay);
    }

    /// A request under `/relay/`: the relay's admin module answers, or `relay_off`.
    async fn relay(&self, head: &RequestHead, body: RequestBody) -> HttpResponse {
        let (status, body) = match self.relay.get() {
            Some(relay) => {
                let metrics = &self.gateway.metrics().relay;
                relay_admin::answer(
                    relay.store.as_ref(),
                    relay.pulls.as_deref(),
                    metrics,
                    &head.method,
                    head.uri.path(),
                    head.uri.query(),
                    body,
                )
                .await
            }
            None => (AdminError::RelayOff.status(), AdminError::RelayOff.body()),
        };
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        response
    }

    async fn answer(&self, method: &Method, path: &str) -> HttpResponse {
        let (status, content_type, body) = match (method, path) {
            (&Method::GET, "/metrics") => (
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                Bytes::from(self.gateway.render_metrics(!self.shutdown.is_triggered())),
            ),
            (&Method::GET, "/healthz") => {
                (StatusCode::OK, "text/plain", Bytes::from_static(b"ok\n"))
            }
            (&Method::GET, "/readyz") if self.shutdown.is_triggered() => (
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                Bytes::from_static(b"draining\n"),
            ),
            (&Method::GET, "/readyz") => {
                (StatusCode::OK, "text/plain", Bytes::from_static(b"ready\n"))
            }
            (&Method::POST, "/reload") => match self.reloader.as_ref().map(|r| r.reload()) {
                Some(Ok(())) => (
                    StatusCode::OK,
                    "text/plain",
                    Bytes::from_static(b"reloaded\n"),
                ),
                Some(Err(problem)) => (
                    StatusCode::BAD_REQUEST,
                    "text/plain",
                    Bytes::from(format!("{problem}\n")),
                ),
                None => (
                    StatusCode::NOT_FOUND,
                    "text/plain",
                    Bytes::from_static(b"no config file to reload\n"),
                ),
            },
            _ => (
                StatusCode::NOT_FOUND,
                "text/plain",
                Bytes::from_static(b"not found\n"),
            ),
        };
        let mut response = Response::new(Full::new(body));
        *response.status_mut() = status;
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
        response
    }
}

impl Handler for Admin {
    async fn handle(&self, head: RequestHead, body: RequestBody, _peer: SocketAddr) -> Reply {
        if relay_admin::is_relay_path(head.uri.path()) {
            return Reply::Response(self.relay(&head, body).await);
        }
        Reply::Response(self.answer(&head.method, head.uri.path()).await)
    }
}
