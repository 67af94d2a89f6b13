//! The command line: `run`, `check-config`, `simulate` and `probe`. Each command loads what it needs and maps its
//! result to an exit code; the work itself lives in the library modules.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::app::{self, App};
use crate::config::Config;
use crate::simulator::{self, Scenario};
use crate::telemetry;

#[derive(Debug, Parser)]
#[command(name = "exwatch", version, about = "Watches exchange APIs (Kraken first) and pages on-call when they fail")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: poll every exchange, serve /health, /ready and /metrics.
    Run(ConfigArgs),
    /// Validate the configuration and print the effective settings, secrets redacted.
    CheckConfig(ConfigArgs),
    /// Serve a fake Kraken (faults included) for tests, demos and drills.
    Simulate(SimulateArgs),
    /// Run the runbook's recovery verification once (Ticker, Balance, Depth); exit 0 only if all pass.
    Probe(ConfigArgs),
}

#[derive(Debug, Args)]
pub struct ConfigArgs {
    /// The TOML configuration file; without it, built-in defaults and EXWATCH__* variables apply.
    #[arg(long, short = 'c', env = "EXWATCH_CONFIG")]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct SimulateArgs {
    /// Address to listen on, e.g. 127.0.0.1:8080.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: std::net::SocketAddr,
    /// The fault to play; it can be changed while running through PUT /__exwatch/simulator.
    #[arg(long, default_value = "healthy")]
    pub scenario: Scenario,
    /// Delay added before every answer (the `slow` scenario uses 6s when this is zero).
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    pub latency: Duration,
    /// Probability that a call fails in the `flaky` scenario.
    #[arg(long, default_value_t = 0.5, value_parser = parse_rate)]
    pub failure_rate: f64,
    /// The API key Balance calls must carry.
    #[arg(long)]
    pub api_key: Option<String>,
    /// The base64 API secret Balance signatures are verified with.
    #[arg(long)]
    pub api_secret: Option<String>,
    /// Turn off the per-IP public rate limit (about 1 call/s with a burst, like Kraken's).
    #[arg(long)]
    pub no_public_rate_limit: bool,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|error| format!("invalid duration {text:?}: {error}"))
}

fn parse_rate(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(rate) if (0.0..=1.0).contains(&rate) => Ok(rate),
        _ => Err(format!("invalid rate {text:?}: expected a number from 0.0 to 1.0")),
    }
}

/// Runs the parsed command and returns the process exit code.
pub async fn execute(cli: Cli) -> ExitCode {
    let result = match cli.command {
        Command::Run(args) => run(args).await,
        Command::CheckConfig(args) => check_config(args),
        Command::Simulate(args) => simulate(args).await,
        Command::Probe(args) => probe(args).await,
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("exwatch: {error:#}");
            ExitCode::from(2)
        }
    }
}

fn load(args: &ConfigArgs) -> anyhow::Result<Config> {
    Ok(Config::load(args.config.as_deref())?)
}

async fn run(args: ConfigArgs) -> anyhow::Result<ExitCode> {
    let config = load(&args)?;
    telemetry::init(&config.log)?;
    let app = App::build(config).await?;
    let cancel = CancellationToken::new();
    tokio::spawn(cancel_on_signals(cancel.clone()));
    match app.run(cancel).await {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(error) => {
            tracing::error!(error = %format!("{error:#}"), "exwatch stopped on a failure.");
            Ok(ExitCode::FAILURE)
        }
    }
}

fn check_config(args: ConfigArgs) -> anyhow::Result<ExitCode> {
    let config = load(&args)?;
    print!("{}", config.to_redacted_toml());
    Ok(ExitCode::SUCCESS)
}

async fn simulate(args: SimulateArgs) -> anyhow::Result<ExitCode> {
    let mut options = simulator::Options {
        listen: args.listen,
        scenario: args.scenario,
        latency: args.latency,
        failure_rate: args.failure_rate,
        ..simulator::Options::default()
    };
    if let Some(api_key) = args.api_key {
        options.api_key = crate::secret::Secret::new(api_key);
    }
    if let Some(api_secret) = args.api_secret {
        options.api_secret = crate::secret::Secret::new(api_secret);
    }
    if args.no_public_rate_limit {
        options.public_rate_limit = None;
    }
    telemetry::init(&Config::default().log)?;
    let cancel = CancellationToken::new();
    tokio::spawn(cancel_on_signals(cancel.clone()));
    simulator::serve(options, cancel).await?;
    Ok(ExitCode::SUCCESS)
}

async fn probe(args: ConfigArgs) -> anyhow::Result<ExitCode> {
    let config = load(&args)?;
    let exchanges =
        config.exchanges.iter().map(|view| app::client(&view.exchange, &config)).collect::<anyhow::Result<Vec<_>>>()?;
    let mut stdout = std::io::stdout().lock();
    let passed = crate::probe::run(&exchanges, &mut stdout).await?;
    Ok(if passed { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// Cancels `cancel` on the first SIGTERM or SIGINT; a second signal exits at once.
async fn cancel_on_signals(cancel: CancellationToken) {
    if let Err(error) = wait_for_signal().await {
        tracing::error!(error = %error, "Cannot listen for signals; only a kill will stop exwatch.");
        return;
    }
    tracing::info!("Signal received; shutting down (a second signal exits at once).");
    cancel.cancel();
    if wait_for_signal().await.is_ok() {
        tracing::warn!("Second signal received; exiting now.");
        std::process::exit(130);
    }
}

async fn wait_for_signal() -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = terminate.recv() => {}
        _ = interrupt.recv() => {}
    }
    Ok(())
}
