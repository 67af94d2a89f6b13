//! exwatch watches cryptocurrency exchange APIs (Kraken first) and pages on-call the moment they fail.
//!
//! Crate map (ARCHITECTURE.md has the invariants):
//! - [`cli`]: the subcommands; [`app`]: the daemon assembled, with its shutdown order.
//! - [`config`]: the only place that reads files or the environment for settings.
//! - [`exchange`]: the `Exchange` trait, domain types and the error taxonomy; [`exchange::kraken`] is the client.
//! - [`poller`]: the poll loop and its metrics; [`probe`]: the runbook's recovery verification, once.
//! - [`http`]: `/health`, `/ready`, `/metrics`, the admin API; [`telemetry`]: logging and the metric registry.
//! - [`statuspage`]: what an exchange's own Statuspage says (indicator, components, incidents), watched beside the
//!   polls; [`websocket`]: what its WebSocket `status` channel says, which wakes the poll loop on a change.
//! - [`simulator`]: a fake Kraken, faults included, for tests, demos and drills.
//! - [`breaker`], [`limiter`]: the circuit breaker and rate limiter every call passes through.
//! - [`store`]: the only place with SQL: `api_call_logs` and `incidents` in Postgres or SQLite, a buffered, spooling
//!   writer, retention, reports.
//! - [`alert`]: the alert rules and the diagnosis of the runbook's scenarios.
//! - [`secret`]: the redacting wrapper for credentials and tokens.
//! - [`resources`]: the process's open-file limit, and failures for want of file descriptors.
//! - [`text`]: outside text bounded in bytes and cleaned of control characters.
//! - [`journal`]: what happened to each exchange, as events an incident's timeline is told from.
//! - [`failure`]: the one failure taxonomy (`ErrorClass`, `Error`) every call outcome is classified into.
//! - [`transport`]: the HTTP transport exchange clients and alert sinks share: one request, bounded in time and size,
//!   never redirected, over reqwest or in memory.
//! - [`clock`]: time helpers: saturating deadlines, `sleep_until_some`, durations serialized as humans write them.
//! - [`fuzz`]: the fuzz harness's entry points, one per parser of outside input (feature `test-util`).

pub mod alert;
pub mod app;
pub mod breaker;
pub mod cli;
pub mod clock;
pub mod config;
pub mod exchange;
pub mod failure;
#[cfg(any(test, feature = "test-util"))]
pub mod fuzz;
pub mod http;
pub mod journal;
pub mod limiter;
pub mod poller;
pub mod probe;
pub mod resources;
pub mod secret;
pub mod simulator;
pub mod statuspage;
pub mod store;
pub mod telemetry;
pub mod text;
pub mod transport;
pub mod websocket;
