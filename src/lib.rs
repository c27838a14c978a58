//! diia-gateway: a verification gateway in front of Diia's acquirer API.
//!
//! Branch backends point their Diia base URL at the gateway and change nothing else.
//! The gateway refuses malformed requests before they leave the box, answers repeated
//! verifications from a short-lived cache (so a re-scan of a single-use barcode still
//! works), makes one Diia call for any number of identical concurrent requests, never
//! pushes a second consent request for the same barcode, shares session tokens between
//! branches, and rate-limits per branch and toward Diia.
//!
//! # Layout
//! - [`config`]: the file as written (serde structs only)
//! - [`settings`]: file → checked [`settings::Settings`]: a [`settings::Hot`] half a reload
//!   swaps and a [`settings::Cold`] half only a restart changes
//! - [`reload`]: config hot reload (SIGHUP, `POST /reload`), refusing cold changes by name
//! - [`diia`]: facts about Diia (barcode and session-token lives), a leaf
//! - [`error`]: [`GatewayError`], the only place statuses, codes and fault are chosen
//! - [`answer`]: Diia's answer and its one classification ([`answer::AnswerClass`])
//! - [`barcode`]: the EAN-13 [`barcode::Barcode`] newtype, redacting
//! - [`head`]: the request head the stages read (method, URI, five headers), parsed at the edge
//! - [`route`]: `(method, path)` → [`route::Endpoint`]; the managed-mode route refusal
//! - [`client`]: who the client is behind a trusted load balancer (PROXY protocol,
//!   `X-Forwarded-For`/`Forwarded`), and its connection count
//! - [`caller`]: who is calling (bearer, API key, mTLS), the one place callers are authenticated
//! - [`request`]: what each endpoint needs, checked into a [`request::Checked`]
//! - [`cache_policy`]: cache keys per endpoint and how long each answer lives
//! - [`keys`]: keyed hashes for cache keys and log fingerprints, redacting secrets
//! - [`cache`]: moka caches with coalescing and replay
//! - [`detach`]: a leader's call runs in its request's task, finishing detached if dropped
//! - [`limit`]: governor limits per branch and toward Diia, and Diia's brake
//! - [`upstream`]: hyper + rustls client toward Diia
//! - [`breaker`]: circuit breaker and retry budget toward Diia
//! - [`trust`]: pass-through session tokens Diia accepted or refused (keyed digests)
//! - [`managed`]: managed token mode (the session token held by the gateway)
//! - [`scaleout`]: several instances as one toward Diia through Redis (shared budget, cache,
//!   leases, logins; degraded to local state when Redis is down)
//! - [`gateway`]: [`gateway::Gateway`], the shared state: built once from settings, its hot
//!   half swapped by a reload or a fleet change, rendered for `/metrics`
//! - [`proxy`]: the request lifecycle (stages over one context) over all of the above
//! - [`body`]: request bodies read whole within a bound, or thrown away (lingering close)
//! - [`access`]: the access log line, formatted by hand on the fast path
//! - [`metrics`], [`admin`]: what SREs see; [`logsink`]: log lines queued to a writer thread, never waited for
//! - [`service`]: the contract between the connection loops and the gateway
//!   ([`service::Handler`], [`service::Reply`], [`service::RequestBody`], [`service::Shutdown`]),
//!   a leaf both sides import
//! - [`server`]: accept loop and graceful shutdown; hands connections hyper must serve to hyper
//!   (its socket with a send deadline and the HTTP/2 stream watchdog in private modules)
//! - [`h1`]: the HTTP/1.1 loop for plain requests; cached answers from pre-rendered bytes
//! - [`tls`]: rustls configs, in (termination, mTLS) and out (trust toward Diia)
//! - [`runtime`]: [`start`] binds the listeners, starts the worker threads and the drain's
//!   two phases, and returns a [`RunningGateway`]
//!
//! The Diia simulator is its own crate (`diia-sim`), embedded only with the default
//! `embedded-sim` feature.

// No function over 80 lines (threshold in .clippy.toml); `.ci/test` runs clippy with -D warnings.
#![warn(clippy::too_many_lines)]

pub mod access;
pub mod admin;
pub mod answer;
pub mod barcode;
pub mod body;
pub mod breaker;
pub mod cache;
pub mod cache_policy;
pub mod caller;
pub mod client;
pub mod config;
pub mod detach;
pub mod diia;
#[cfg(feature = "embedded-sim")]
mod embedded;
pub mod error;
pub mod gateway;
pub mod h1;
pub mod head;
pub mod keys;
pub mod limit;
pub mod logsink;
pub mod managed;
pub mod metrics;
pub mod per_thread;
pub mod proxy;
pub mod relay;
pub mod reload;
pub mod request;
pub mod route;
pub mod runtime;
pub mod scaleout;
pub mod server;
pub mod service;
pub mod settings;
mod socket;
pub mod tls;
pub mod trust;
pub mod upstream;
mod watchdog;
pub mod worker;

pub use crate::error::GatewayError;
pub use crate::runtime::{RunningGateway, SimHandle, start, start_from_file};
pub use crate::settings::Settings;
