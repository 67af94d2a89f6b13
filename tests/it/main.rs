//! Integration tests: the real daemon on port 0 against the project's simulator on port 0, and the binary's
//! commands. One test binary (STYLE.md); shared helpers live in `helpers`.

// Tests may unwrap: a panic with the failing value is the report.
#![allow(clippy::unwrap_used)]

mod admin;
mod alerting;
mod call_log;
mod cli;
mod config;
mod daemon;
mod delivery;
mod deploy;
mod detection;
mod drill;
mod durability;
mod helpers;
mod in_memory;
mod incidents;
mod kraken_says;
mod listener;
mod outage;
mod outbound;
mod paused;
mod prometheus;
mod proxy;
mod scenarios;
mod store;
mod supervision;
mod websocket;
