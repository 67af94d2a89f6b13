//! The fake Kraken used by tests, demos and drills.
