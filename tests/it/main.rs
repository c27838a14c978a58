//! Integration tests over real loopback sockets, one binary (one link on the 2-core CI).
//! Each module is one user-visible behaviour; `support` is the shared harness
//! (`tests/support`, the `diia-gateway-testkit` crate).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use diia_gateway_testkit as support;

mod behind_proxy;
mod cache;
mod cli;
mod coalescing;
mod drain;
mod hostile_clients;
mod http1;
mod limits;
mod managed;
mod metrics;
mod ops_prometheus;
mod overload;
mod passthrough;
mod properties;
mod relay_admin;
mod relay_attack;
mod relay_flow;
mod relay_ingress;
mod relay_sdk_receiver;
mod reload;
mod resilience;
mod sharing;
mod slow_clients;
mod tls;
mod tokens;
mod unverified;
mod upstream_misbehaviour;
mod validation;
