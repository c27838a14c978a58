//! Scale-out over real processes: one `redis-server`, three `diia-gateway` processes and
//! one simulator, all on loopback (and a Prometheus for the dashboard test). Tests run one
//! at a time (they measure rates and kill processes); each starts its own Redis and stops
//! everything it started. Gateways bind `:0` and report their addresses (`--ready-file`).
//! `processes` starts them; the harness shared with `tests/it` is `diia-gateway-testkit`.
//!
//! `redis-server` must be installed (`.ci/run` installs it); under `CI=true` a missing
//! binary fails the tests, elsewhere they are skipped with a note.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod budget;
mod coalescing;
mod hiccups;
mod local_limits;
mod nothing_in_clear_in_redis;
mod ops;
mod processes;
mod relay;
mod sharing;
mod writer;
