//! The `exwatch` binary: parse the command line (a usage error is exit 2), install the TLS provider, run the command,
//! exit with its code (`cli::execute` maps results to 0, 1 and 2).

use std::process::ExitCode;

use clap::Parser as _;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = exwatch::cli::Cli::parse();
    // One rustls provider (ring) for every TLS client in the process; reqwest is built without one.
    if rustls::crypto::ring::default_provider().install_default().is_err() {
        eprintln!("exwatch: a TLS crypto provider was already installed");
        return ExitCode::FAILURE;
    }
    exwatch::cli::execute(cli).await
}
