//! The command line: its clap types and [`execute`], which runs one command and maps its result to an exit code.
//!
//! The commands live by concern: [`run`] (the daemon, `check-config`, `simulate`, `probe`, `alerts test`, signals),
//! [`daemon`] (`status`, `breaker`, `rate-limit`: clients of a running daemon's HTTP API, worded by [`render`]) and
//! [`database`] (`migrate`, `logs`, `incidents`, `spool`). Exit codes: 0 done; 1 a runtime failure (the daemon
//! cannot be built, e.g. `server.listen` is in use, or stops on a failure; a database, a daemon or a sink cannot be
//! reached or refuses; a check fails); 2 the arguments or the configuration are wrong. The work itself lives in the
//! library modules.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

mod daemon;
mod database;
mod render;
mod run;

use clap::{Args, Parser, Subcommand};

use crate::config::{self, Config};
use crate::simulator::{self, Scenario};

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
    #[command(after_long_help = simulate_help())]
    Simulate(SimulateArgs),
    /// Run the runbook's recovery verification once (Ticker, Balance, Depth); exit 0 only if all pass.
    Probe(ConfigArgs),
    /// What a running daemon sees now: each exchange up or down, and the alerts firing with scenario and evidence.
    Status(StatusArgs),
    /// What each exchange itself says, from a running daemon: its last SystemStatus and its Statuspage (indicator,
    /// components, unresolved incidents, how fresh).
    ExchangeStatus(ExchangeStatusArgs),
    /// Read or force an exchange's circuit breaker through the running daemon's admin API.
    Breaker(BreakerArgs),
    /// Read or set an exchange's rate factor through the running daemon's admin API.
    RateLimit(RateLimitArgs),
    /// Apply the database migrations (the daemon also applies them at start).
    Migrate(ConfigArgs),
    /// The runbook's query: recent calls to one exchange, newest first.
    Logs(LogsArgs),
    /// Recent incidents, or one incident's report.
    Incidents(IncidentsArgs),
    /// Alert delivery: `alerts test` sends a test alert through every configured sink.
    Alerts(AlertsArgs),
    /// A spool file (a quarantined one, typically): `spool inspect FILE` lists it, `spool replay FILE` writes it.
    Spool(SpoolArgs),
}

#[derive(Debug, Args)]
pub struct SpoolArgs {
    #[command(subcommand)]
    pub action: SpoolAction,
}

#[derive(Debug, Subcommand)]
pub enum SpoolAction {
    /// List every line of a spool file (call rows, rejected rows, alert writes) and number the unreadable ones.
    Inspect(SpoolInspectArgs),
    /// Write a spool file's rows and alert writes to the configured database (idempotent); the file is left for
    /// you to delete. Exit 1 if the database refused any or cannot be reached.
    Replay(SpoolReplayArgs),
}

#[derive(Debug, Args)]
pub struct SpoolInspectArgs {
    pub file: PathBuf,
    /// One JSON array instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct SpoolReplayArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    pub file: PathBuf,
}

#[derive(Debug, Args)]
pub struct AlertsArgs {
    #[command(subcommand)]
    pub action: AlertsAction,
}

#[derive(Debug, Subcommand)]
pub enum AlertsAction {
    /// Send a test alert (alertname exwatch_test, severity info) to every sink now and report each result; exit
    /// 0 only if every sink took it.
    Test(AlertsTestArgs),
}

#[derive(Debug, Args)]
pub struct AlertsTestArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// One JSON array instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct LogsArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// The exchange's configured name.
    #[arg(long, default_value = "kraken")]
    pub provider: String,
    /// How far back to look, e.g. 30m, 2h, 1d.
    #[arg(long, default_value = "30m", value_parser = parse_duration)]
    pub since: Duration,
    /// The most rows to show.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub limit: u32,
    /// Only failed calls.
    #[arg(long)]
    pub failures: bool,
    /// One JSON array instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct IncidentsArgs {
    #[command(subcommand)]
    pub action: Option<IncidentsAction>,
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Incidents started, resolved or open within this window, e.g. 7d.
    #[arg(long, default_value = "7d", value_parser = parse_duration)]
    pub since: Duration,
    /// One JSON array instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum IncidentsAction {
    /// What happened during one incident: failures by class and endpoint, latency, first and last error.
    Report(ReportArgs),
    /// The incident as a story, in order: the first failure, breaker transitions, alerts fired and resolved with
    /// each sink's delivery, scenario changes, rate-limit changes and operator actions, recovery verification steps.
    Timeline(ReportArgs),
}

#[derive(Debug, Args)]
pub struct ReportArgs {
    /// The incident's id, as `exwatch incidents` lists it.
    pub id: i64,
    #[command(flatten)]
    pub config: ConfigArgs,
    /// JSON instead of text.
    #[arg(long)]
    pub json: bool,
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
    /// The API key Balance calls must carry (default: the test key `--help` shows).
    #[arg(long)]
    pub api_key: Option<String>,
    /// The base64 API secret Balance signatures are verified with (default: the test secret `--help` shows).
    #[arg(long)]
    pub api_secret: Option<String>,
    /// Turn off the per-IP public rate limit (about 1 call/s with a burst, like Kraken's).
    #[arg(long)]
    pub no_public_rate_limit: bool,
    /// Where the `redirect_*` scenarios point (path and query kept); default http://redirected.invalid.
    #[arg(long, value_parser = simulator::parse_redirect_to)]
    pub redirect_to: Option<url::Url>,
}

/// `--scenario` lists every scenario in `--help` and in its error.
impl clap::ValueEnum for Scenario {
    fn value_variants<'a>() -> &'a [Self] {
        &Scenario::ALL
    }

    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        Some(clap::builder::PossibleValue::new(self.as_str()).help(self.summary()))
    }
}

/// The end of `simulate --help`: how Balance calls are checked, with the test credentials, and how to switch
/// the scenario of a running simulator. Numbers come from the simulator's defaults, so the text stays true.
fn simulate_help() -> String {
    let defaults = simulator::Options::default();
    let (key, secret, control) = (simulator::DEFAULT_API_KEY, simulator::DEFAULT_API_SECRET, simulator::CONTROL_PATH);
    let lockout = humantime::format_duration(defaults.lockout_duration);
    let counter = defaults.private_counter;
    format!(
        "Credentials: Balance, the one private call, is checked as Kraken checks it:
  - the API-Key header must be the key (else EAPI:Invalid key; {after} in a row lock it out for {lockout}:
    EGeneral:Temporary lockout, and each bad key during the lockout restarts it);
  - API-Sign must be Kraken's signature, HMAC-SHA512 keyed with the base64-decoded secret over the path and
    the SHA-256 of nonce + body (else EAPI:Invalid signature);
  - the nonce must be above the last one accepted (else EAPI:Invalid nonce);
  - the private call counter (at most {max}, -{decay}/s) must have room (else EAPI:Rate limit exceeded).
Unless --api-key and --api-secret say otherwise, the key and secret are these test values (the secret is
Kraken's published test secret); in an exwatch configuration's [[exchanges]] entry:

  api_key = \"{key}\"
  api_secret = \"{secret}\"

The scenarios invalid_key, invalid_signature and lockout refuse every private call, whatever it carries.

Switching a running simulator (its control endpoint is never slowed down nor faulted):

  curl -s http://127.0.0.1:8080{control}
  curl -s -X PUT http://127.0.0.1:8080{control} -H 'content-type: application/json' \\
       -d '{{\"scenario\":\"maintenance\"}}'

GET answers the state and the request count per method. PUT changes any of scenario, latency (\"2s\"),
failure_rate (0.3) and redirect_to (a URL); absent fields stay as they are. The exchange's Statuspage is served
at /__statuspage/kraken/api/v2/summary.json and changed the same way at {statuspage}.",
        statuspage = simulator::statuspage::STATUSPAGE_CONTROL,
        after = defaults.lockout_after,
        max = counter.max,
        decay = counter.decay_per_second,
    )
}

/// Where the admin API is and which exchange to act on; usable after the subcommand (`breaker status --url …`).
#[derive(Debug, Args)]
pub struct AdminArgs {
    /// The exchange, as named in the daemon's configuration.
    #[arg(long, global = true, default_value = "kraken")]
    pub exchange: String,
    /// The daemon's base URL; defaults to the configuration's `server.listen` (loopback when it listens on all).
    #[arg(long, global = true)]
    pub url: Option<url::Url>,
    /// The TOML configuration file the token (and default URL) come from; EXWATCH__ADMIN__TOKEN also works.
    #[arg(long, short = 'c', global = true, env = "EXWATCH_CONFIG")]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The daemon's base URL; defaults to the configuration's `server.listen` (loopback when it listens on all).
    #[arg(long)]
    pub url: Option<url::Url>,
    #[command(flatten)]
    pub config: ConfigArgs,
    /// The daemon's JSON answer instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ExchangeStatusArgs {
    #[command(flatten)]
    pub status: StatusArgs,
    /// One exchange (its `name`); all configured ones without it.
    #[arg(long)]
    pub exchange: Option<String>,
}

#[derive(Debug, Args)]
pub struct BreakerArgs {
    #[command(subcommand)]
    pub action: BreakerAction,
    #[command(flatten)]
    pub admin: AdminArgs,
}

#[derive(Debug, Clone, Copy, Subcommand)]
pub enum BreakerAction {
    /// Print the breaker's state, counters and timers.
    Status,
    /// Force HALF_OPEN: the daemon runs the recovery verification as the trial at once.
    HalfOpen,
    /// Force FORCED_OPEN: no calls until an operator changes it.
    ForceOpen,
    /// Force DISABLED: every call admitted, never trips, nothing recorded.
    Disable,
    /// Force METRICS_ONLY: every call admitted and recorded, never trips.
    MetricsOnly,
    /// Force CLOSED.
    Close,
    /// Back to CLOSED with every counter cleared.
    Reset,
}

#[derive(Debug, Args)]
pub struct RateLimitArgs {
    #[command(subcommand)]
    pub action: RateLimitAction,
    #[command(flatten)]
    pub admin: AdminArgs,
}

#[derive(Debug, Clone, Copy, Subcommand)]
pub enum RateLimitAction {
    /// Print the rate factor, the effective budgets and recent rate limiting.
    Status,
    /// Set the operator's factor, greater than 0 and at most 1 (0.5 = half the configured rate).
    Set {
        #[arg(allow_negative_numbers = true)]
        factor: f64,
    },
    /// End a pause of private calls now (after fixing the key), without waiting for the next re-check.
    ResumePrivate,
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

/// A mistake in the arguments or the configuration: exit 2. A [`config::Error`] is one too; every other error of
/// a command is a runtime failure, exit 1.
#[derive(Debug, thiserror::Error)]
#[error("{0:#}")]
struct Usage(anyhow::Error);

/// Runs the parsed command and returns the process exit code.
pub async fn execute(cli: Cli) -> ExitCode {
    let result = match cli.command {
        Command::Run(args) => run::run(args).await,
        Command::CheckConfig(args) => run::check_config(args),
        Command::Simulate(args) => run::simulate(args).await,
        Command::Probe(args) => run::probe(args).await,
        Command::Status(args) => daemon::status(args).await,
        Command::ExchangeStatus(args) => daemon::exchange_status(args).await,
        Command::Breaker(args) => daemon::breaker(args).await,
        Command::RateLimit(args) => daemon::rate_limit(args).await,
        Command::Migrate(args) => database::migrate(args).await,
        Command::Logs(args) => database::logs(args).await,
        Command::Incidents(IncidentsArgs { action: Some(action), config, .. }) => {
            let (view, mut args) = match action {
                IncidentsAction::Report(args) => (database::View::Report, args),
                IncidentsAction::Timeline(args) => (database::View::Timeline, args),
            };
            // `exwatch incidents --config x report 1` works too.
            args.config.config = args.config.config.or(config.config);
            database::incident(view, args).await
        }
        Command::Incidents(args) => database::incidents(args).await,
        Command::Alerts(AlertsArgs { action: AlertsAction::Test(args) }) => run::alerts_test(args).await,
        Command::Spool(SpoolArgs { action: SpoolAction::Inspect(args) }) => database::spool_inspect(args),
        Command::Spool(SpoolArgs { action: SpoolAction::Replay(args) }) => database::spool_replay(args).await,
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("exwatch: {error:#}");
            exit_code(&error)
        }
    }
}

fn exit_code(error: &anyhow::Error) -> ExitCode {
    if error.is::<config::Error>() || error.is::<Usage>() { ExitCode::from(2) } else { ExitCode::FAILURE }
}

fn load(args: &ConfigArgs) -> anyhow::Result<Config> {
    Ok(Config::load(args.config.as_deref())?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configuration_and_argument_mistakes_exit_2_and_everything_else_1() {
        let missing = std::path::Path::new("/nonexistent/exwatch.toml");
        let configuration = Config::load_from(Some(missing), Some(std::collections::HashMap::new()));
        let configuration = anyhow::Error::from(configuration.unwrap_err()).context("loading");
        assert_eq!(exit_code(&configuration), ExitCode::from(2));
        let usage = anyhow::Error::from(Usage(anyhow::anyhow!("no admin token configured")));
        assert_eq!(exit_code(&usage), ExitCode::from(2));
        assert_eq!(format!("{usage:#}"), "no admin token configured");
        let runtime = anyhow::anyhow!("Address already in use").context("cannot listen on 127.0.0.1:9750");
        assert_eq!(exit_code(&runtime), ExitCode::FAILURE);
    }
}
