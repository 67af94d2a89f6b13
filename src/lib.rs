//! exwatch watches cryptocurrency exchange APIs (Kraken first) and pages on-call the moment they fail.
//!
//! Crate map (see ARCHITECTURE.md for the invariants):
//! - [`config`]: the only place that reads files or the environment for settings.
//! - [`exchange`]: the `Exchange` trait, domain types and the error taxonomy; [`exchange::kraken`] is the client.
//! - [`simulator`]: a fake Kraken, faults included, for tests, demos and drills.
//! - [`secret`]: the redacting wrapper for credentials and tokens.

pub mod config;
pub mod exchange;
pub mod secret;
pub mod simulator;
