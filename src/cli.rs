//! The command line: `run`, `check-config`, `simulate`, `probe`; the admin API's clients `breaker` and
//! `rate-limit`; and the store's `migrate`, `logs` and `incidents`. Each command loads what it needs and maps its
//! result to an exit code: 0 done; 1 a runtime failure (the daemon cannot be built, e.g. `server.listen` is in use,
//! or stops on a failure; a database, a daemon or a sink cannot be reached or refuses; a check fails); 2 the
//! arguments or the configuration are wrong. The work itself lives in the library modules.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

mod daemon;

use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::app::{self, App};
use crate::config::{self, Config};
use crate::secret::{Secret, redact_url};
use crate::simulator::{self, Scenario};
use crate::store::{Database, replay, report};
use crate::telemetry;
use crate::{alert, breaker};

use self::daemon::Field;

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
    /// What a running daemon sees now: each exchange up or down, and the alerts firing with scenario and evidence.
    Status(StatusArgs),
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
    /// The API key Balance calls must carry.
    #[arg(long)]
    pub api_key: Option<String>,
    /// The base64 API secret Balance signatures are verified with.
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
        Some(clap::builder::PossibleValue::new(self.as_str()))
    }
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
        Command::Run(args) => run(args).await,
        Command::CheckConfig(args) => check_config(args),
        Command::Simulate(args) => simulate(args).await,
        Command::Probe(args) => probe(args).await,
        Command::Status(args) => status(args).await,
        Command::Breaker(args) => breaker(args).await,
        Command::RateLimit(args) => rate_limit(args).await,
        Command::Migrate(args) => migrate(args).await,
        Command::Logs(args) => logs(args).await,
        Command::Incidents(IncidentsArgs { action: Some(IncidentsAction::Report(mut args)), config, .. }) => {
            // `exwatch incidents --config x report 1` works too.
            args.config.config = args.config.config.or(config.config);
            incident_report(args).await
        }
        Command::Incidents(args) => incidents(args).await,
        Command::Alerts(AlertsArgs { action: AlertsAction::Test(args) }) => alerts_test(args).await,
        Command::Spool(SpoolArgs { action: SpoolAction::Inspect(args) }) => spool_inspect(args),
        Command::Spool(SpoolArgs { action: SpoolAction::Replay(args) }) => spool_replay(args).await,
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

/// Runs the daemon until a signal (exit 0) or a failure (exit 1).
async fn run(args: ConfigArgs) -> anyhow::Result<ExitCode> {
    let config = load(&args)?;
    // RUST_LOG or `log.level` that does not parse is configuration.
    telemetry::init(&config.log).map_err(Usage)?;
    for warning in config.warnings() {
        tracing::warn!(warning = %warning, "Part of exwatch is off.");
    }
    for variable in &config.ignored_variables {
        tracing::warn!(
            variable,
            "Environment variable ignored: settings take two underscores after EXWATCH (EXWATCH__SECTION__KEY)."
        );
    }
    config.check_writable_paths()?;
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
    for warning in config.warnings() {
        eprintln!("exwatch: warning: {warning}");
    }
    for variable in &config.ignored_variables {
        eprintln!("exwatch: warning: {variable} is ignored: settings take two underscores after EXWATCH");
    }
    config.check_writable_paths()?;
    print!("{}", config.to_redacted_toml());
    Ok(ExitCode::SUCCESS)
}

async fn simulate(args: SimulateArgs) -> anyhow::Result<ExitCode> {
    let mut options = simulator::Options {
        listen: args.listen,
        scenario: args.scenario,
        latency: args.latency,
        failure_rate: args.failure_rate,
        redirect_to: args.redirect_to,
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
    telemetry::init(&Config::default().log).map_err(Usage)?;
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

/// A client of the admin API: the base URL, the token and the exchange acted on.
struct AdminClient {
    http: daemon::Client,
    base: url::Url,
    token: Secret,
    exchange: String,
}

/// What a breaker status answer must carry for `breaker_line`.
const BREAKER_STATUS: daemon::Shape = &[("exchange", Field::Text), ("state", Field::Text)];
/// What a breaker change answer must carry.
const BREAKER_CHANGE: daemon::Shape =
    &[("exchange", Field::Text), ("from", Field::Text), ("to", Field::Text), ("changed", Field::Flag)];
/// What a rate-limit answer must carry for `rate_limit_line`.
const RATE_LIMIT_STATUS: daemon::Shape = &[("exchange", Field::Text), ("factor", Field::Number)];
/// What `/api/v1/status` must carry for `render_status`.
const DAEMON_STATUS: daemon::Shape = &[("exchanges", Field::List)];

impl AdminClient {
    fn new(args: AdminArgs) -> anyhow::Result<AdminClient> {
        let config = Config::load(args.config.as_deref())?;
        let Some(token) = config.admin.token.clone() else {
            return Err(Usage(anyhow::anyhow!(
                "no admin token configured: set admin.token or admin.token_file in the configuration file, \
                 or EXWATCH__ADMIN__TOKEN"
            ))
            .into());
        };
        let base = daemon_url(args.url, &config)?;
        Ok(AdminClient { http: daemon::Client::new()?, base, token, exchange: args.exchange })
    }

    /// Calls `method /api/admin/{resource}/{exchange}[/{action}]` with an optional JSON body; returns the JSON
    /// answer of a 2xx that has `shape`, or a [`daemon::Failure`] naming what answered instead.
    async fn call(
        &self,
        method: reqwest::Method,
        resource: &str,
        action: Option<&str>,
        body: Option<serde_json::Value>,
        shape: daemon::Shape,
    ) -> anyhow::Result<serde_json::Value> {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .map_err(|()| Usage(anyhow::anyhow!("--url {} cannot be a base URL", redact_url(&self.base))))?
            .pop_if_empty()
            .extend(["api", "admin", resource, &self.exchange])
            .extend(action);
        Ok(self.http.call(method, &url, Some(self.token.expose()), body, shape).await?)
    }

    async fn force(&self, target: breaker::State) -> anyhow::Result<serde_json::Value> {
        let body = serde_json::json!({"state": target.as_str()});
        self.call(reqwest::Method::POST, "circuit-breaker", None, Some(body), BREAKER_CHANGE).await
    }
}

/// The daemon's base URL: `--url`, else `server.listen` (on loopback when it listens on every address).
fn daemon_url(url: Option<url::Url>, config: &Config) -> anyhow::Result<url::Url> {
    if let Some(url) = url {
        return Ok(url);
    }
    let mut listen = config.server.listen;
    if listen.ip().is_unspecified() {
        listen.set_ip(match listen {
            std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    Ok(url::Url::parse(&format!("http://{listen}"))?)
}

/// `exwatch status`: `/api/v1/status` for people. Exit 0 when the daemon answered, 1 when it could not be reached.
async fn status(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let config = load(&args.config)?;
    let url = daemon_url(args.url, &config)?.join("api/v1/status").map_err(|error| Usage(error.into()))?;
    let answer = match daemon::Client::new()?.call(reqwest::Method::GET, &url, None, None, DAEMON_STATUS).await {
        Ok(answer) => answer,
        Err(error) => {
            eprintln!("exwatch: cannot read the status: {error}");
            return Ok(ExitCode::FAILURE);
        }
    };
    if args.json {
        println!("{answer:#}");
    } else {
        print!("{}", render_status(&answer));
    }
    Ok(ExitCode::SUCCESS)
}

/// One paragraph per exchange: up or down, SystemStatus, breaker, rate factor, a private-call pause, then each alert
/// with its evidence. Times read as on a wall clock with how long ago ("since 07:12:03Z, 4m 10s"); what the daemon
/// does not know yet is said in words, never `null`.
fn render_status(answer: &serde_json::Value) -> String {
    render_status_at(answer, chrono::Utc::now())
}

fn render_status_at(answer: &serde_json::Value, now: chrono::DateTime<chrono::Utc>) -> String {
    let text = |value: &serde_json::Value, unknown: &str| match value {
        serde_json::Value::Null => unknown.to_owned(),
        serde_json::Value::String(text) => text.clone(),
        other => other.to_string(),
    };
    let mut output = String::new();
    for exchange in answer["exchanges"].as_array().into_iter().flatten() {
        let up = if exchange["up"].as_bool() == Some(true) { "UP" } else { "DOWN" };
        output.push_str(&format!(
            "{}: {up}; SystemStatus {}; breaker {}; rate factor {}\n",
            text(&exchange["exchange"], "?"),
            text(&exchange["system_status"], "unknown (not read yet)"),
            text(&exchange["breaker"]["state"], "unknown"),
            text(&exchange["rate_limit"]["factor"], "unknown"),
        ));
        if let Some(reason) = exchange["rate_limit"]["privatePauseReason"].as_str() {
            let remaining = exchange["rate_limit"]["privatePausedForSeconds"]
                .as_f64()
                .map(|seconds| format!(" for {} more", human_seconds(seconds)))
                .unwrap_or_default();
            output.push_str(&format!("  private calls PAUSED{remaining}: {reason}\n"));
        }
        for alert in exchange["active_alerts"].as_array().into_iter().flatten() {
            output.push_str(&format!(
                "  FIRING {} ({}) since {}: scenario {}\n    {}\n    evidence: {}\n",
                text(&alert["alertname"], "?"),
                text(&alert["severity"], "?"),
                wall_clock_and_age(&alert["since"], now),
                text(&alert["scenario"], "not diagnosed"),
                text(&alert["description"], ""),
                text(&alert["evidence"], "none"),
            ));
        }
    }
    output
}

/// "07:12:03Z, 4m 10s" (the date too when it is not today), from an RFC 3339 time.
fn wall_clock_and_age(value: &serde_json::Value, now: chrono::DateTime<chrono::Utc>) -> String {
    let Some(time) = value.as_str().and_then(|text| chrono::DateTime::parse_from_rfc3339(text).ok()) else {
        return "an unknown time".to_owned();
    };
    // Whole seconds, so the age agrees with the clock shown.
    let time = chrono::SubsecRound::trunc_subsecs(time.with_timezone(&chrono::Utc), 0);
    let clock = if time.date_naive() == now.date_naive() {
        time.format("%H:%M:%SZ").to_string()
    } else {
        time.format("%Y-%m-%d %H:%M:%SZ").to_string()
    };
    let age = (now - time).num_seconds().max(0);
    format!("{clock}, {}", human_seconds(age as f64))
}

/// Whole seconds as humantime prints them ("4m 10s").
fn human_seconds(seconds: f64) -> String {
    humantime::format_duration(Duration::from_secs(seconds.max(0.0).round() as u64)).to_string()
}

async fn breaker(args: BreakerArgs) -> anyhow::Result<ExitCode> {
    let client = AdminClient::new(args.admin)?;
    let answer = match args.action {
        BreakerAction::Status => {
            let status = client.call(reqwest::Method::GET, "circuit-breaker", None, None, BREAKER_STATUS).await;
            return admin_output(status.map(|status| breaker_line(&status)));
        }
        BreakerAction::Reset => {
            client.call(reqwest::Method::POST, "circuit-breaker", Some("reset"), None, BREAKER_CHANGE).await
        }
        BreakerAction::HalfOpen => client.force(breaker::State::HalfOpen).await,
        BreakerAction::ForceOpen => client.force(breaker::State::ForcedOpen).await,
        BreakerAction::Disable => client.force(breaker::State::Disabled).await,
        BreakerAction::MetricsOnly => client.force(breaker::State::MetricsOnly).await,
        BreakerAction::Close => client.force(breaker::State::Closed).await,
    };
    admin_output(answer.map(|change| {
        let text = |key: &str| change.get(key).and_then(serde_json::Value::as_str).unwrap_or("?").to_owned();
        let exchange = text("exchange");
        let changed = change.get("changed").and_then(serde_json::Value::as_bool).unwrap_or(false);
        let first = match (changed, args.action) {
            (true, _) => format!("{exchange}: {} -> {}", text("from"), text("to")),
            (false, BreakerAction::Reset) => format!("{exchange}: {} (counters cleared)", text("to")),
            (false, _) => format!("{exchange}: already {}", text("to")),
        };
        match change.get("status") {
            Some(status) => format!("{first}\n{}", breaker_line(status)),
            None => first,
        }
    }))
}

async fn rate_limit(args: RateLimitArgs) -> anyhow::Result<ExitCode> {
    let client = AdminClient::new(args.admin)?;
    let answer = match args.action {
        RateLimitAction::Status => client.call(reqwest::Method::GET, "rate-limit", None, None, RATE_LIMIT_STATUS).await,
        RateLimitAction::Set { factor } => {
            let body = serde_json::json!({"factor": factor});
            client.call(reqwest::Method::PUT, "rate-limit", None, Some(body), RATE_LIMIT_STATUS).await
        }
        RateLimitAction::ResumePrivate => {
            client.call(reqwest::Method::POST, "rate-limit", Some("resume-private"), None, RATE_LIMIT_STATUS).await
        }
    };
    admin_output(answer.map(|status| rate_limit_line(&status)))
}

/// Prints an admin command's output: exit 0, or the daemon's error on standard error with exit 1. The CLI's own
/// problems (bad URL, no token) go on to `execute`, which exits 2 for them.
fn admin_output(result: anyhow::Result<String>) -> anyhow::Result<ExitCode> {
    match result {
        Ok(text) => {
            println!("{text}");
            Ok(ExitCode::SUCCESS)
        }
        Err(error) if error.is::<daemon::Failure>() => {
            eprintln!("exwatch: {error}");
            Ok(ExitCode::FAILURE)
        }
        Err(error) => Err(error),
    }
}

/// `kraken: OPEN since 2026-11-29T07:10:00Z (1m 5s); consecutive failures 3; failure rate 60.0% over 5 calls; …`
fn breaker_line(status: &serde_json::Value) -> String {
    let text = |key: &str| status.get(key).and_then(serde_json::Value::as_str);
    let number = |key: &str| status.get(key).and_then(serde_json::Value::as_f64);
    let mut line = format!(
        "{}: {} since {} ({})",
        text("exchange").unwrap_or("?"),
        text("state").unwrap_or("?"),
        text("since").map_or_else(|| "?".to_owned(), whole_second_time),
        text("inStateFor").unwrap_or("?"),
    );
    line.push_str(&format!("; consecutive failures {}", number("consecutiveFailures").unwrap_or(0.0)));
    let calls = number("callsInWindow").unwrap_or(0.0);
    match number("failureRate") {
        Some(rate) if rate >= 0.0 => line.push_str(&format!("; failure rate {rate:.1}% over {calls} calls")),
        _ => {
            let minimum = status.pointer("/config/minimum_calls").and_then(serde_json::Value::as_f64).unwrap_or(0.0);
            line.push_str(&format!("; failure rate n/a ({calls} of {minimum} calls needed)"));
        }
    }
    if let (Some(class), Some(time)) = (text("lastFailureClass"), text("lastFailureTime")) {
        line.push_str(&format!(
            "; last failure {class} at {} ({} ago)",
            whole_second_time(time),
            text("lastFailureAgo").unwrap_or("?")
        ));
    }
    line.push_str(&format!("; not permitted {}", number("notPermittedCalls").unwrap_or(0.0)));
    if let Some(half_open_in) = text("halfOpenIn") {
        line.push_str(&format!("; half-open in {half_open_in}"));
    }
    line
}

/// `kraken: factor 0.5 (ceiling 0.5); public 0.50/s burst 1; private 0.17/s burst 7; rate limited 0 times recently`
fn rate_limit_line(status: &serde_json::Value) -> String {
    let text = |key: &str| status.get(key).and_then(serde_json::Value::as_str);
    let number = |key: &str| status.get(key).and_then(serde_json::Value::as_f64).unwrap_or(f64::NAN);
    let mut line = format!(
        "{}: factor {} (ceiling {}); public {:.2}/s burst {}; private {:.2}/s burst {}; rate limited {} times recently",
        text("exchange").unwrap_or("?"),
        number("factor"),
        number("ceiling"),
        number("publicPerSecond"),
        number("publicBurst"),
        number("privatePerSecond"),
        number("privateBurst"),
        number("recentRateLimited"),
    );
    if let Some(ago) = text("lastRateLimitedAgo") {
        line.push_str(&format!(", last {ago} ago"));
    }
    if let Some(paused_for) = text("privatePausedFor") {
        let reason = text("privatePauseReason").unwrap_or("unknown reason");
        line.push_str(&format!("; private calls paused for {paused_for} ({reason})"));
    }
    line
}

/// An RFC 3339 time to the second, for people to read.
fn whole_second_time(time: &str) -> String {
    chrono::DateTime::parse_from_rfc3339(time).map_or_else(
        |_| time.to_owned(),
        |time| time.with_timezone(&chrono::Utc).to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
    )
}

/// Connects to the configured database (applying migrations). `Err` is the exit code after the message is printed:
/// the error names the database by host, port and name only, never the URL's password.
async fn connect(config: &Config) -> Result<Database, ExitCode> {
    Database::connect(&config.database).await.map_err(|error| {
        eprintln!("exwatch: {error}");
        ExitCode::FAILURE
    })
}

/// Opens the configured database for a read-only command: nothing is created or migrated. A missing SQLite file
/// names the file and the configuration it came from, so `exwatch logs` in the wrong directory says so instead of
/// printing "No calls found." from a database it just made.
async fn open_for_reading(config: &Config, args: &ConfigArgs) -> Result<Database, ExitCode> {
    Database::open_existing(&config.database).await.map_err(|error| {
        match (&error, &args.config) {
            (crate::store::database::Error::Missing { .. }, Some(file)) => {
                eprintln!("exwatch: {error} (configuration {}); is this the daemon's configuration?", file.display())
            }
            (crate::store::database::Error::Missing { .. }, None) => eprintln!(
                "exwatch: {error} (no --config: the default, relative to {}); pass the daemon's configuration \
                 with --config, or run this where the daemon runs",
                std::env::current_dir()
                    .map_or_else(|_| "the working directory".to_owned(), |dir| dir.display().to_string())
            ),
            _ => eprintln!("exwatch: {error}"),
        }
        ExitCode::FAILURE
    })
}

fn database_failure(error: crate::store::database::Error) -> ExitCode {
    eprintln!("exwatch: {error}");
    ExitCode::FAILURE
}

fn to_json<T: serde::Serialize>(value: &T) -> anyhow::Result<String> {
    Ok(serde_json::to_string_pretty(value)? + "\n")
}

async fn migrate(args: ConfigArgs) -> anyhow::Result<ExitCode> {
    let config = load(&args)?;
    let database = match connect(&config).await {
        Ok(database) => database,
        Err(code) => return Ok(code),
    };
    println!("{} is migrated to schema version {}.", database.target(), database.schema_version());
    database.close().await;
    Ok(ExitCode::SUCCESS)
}

async fn logs(args: LogsArgs) -> anyhow::Result<ExitCode> {
    let config = load(&args.config)?;
    let database = match open_for_reading(&config, &args.config).await {
        Ok(database) => database,
        Err(code) => return Ok(code),
    };
    let calls = match database.recent_calls(&args.provider, args.since, args.limit, args.failures).await {
        Ok(calls) => calls,
        Err(error) => return Ok(database_failure(error)),
    };
    database.close().await;
    print!("{}", if args.json { to_json(&calls)? } else { report::render_calls(&calls) });
    Ok(ExitCode::SUCCESS)
}

fn spool_inspect(args: SpoolInspectArgs) -> anyhow::Result<ExitCode> {
    let lines = match replay::inspect(&args.file) {
        Ok(lines) => lines,
        Err(error) => {
            eprintln!("exwatch: {error}");
            return Ok(ExitCode::FAILURE);
        }
    };
    print!("{}", if args.json { to_json(&lines)? } else { replay::render(&lines) });
    Ok(ExitCode::SUCCESS)
}

async fn spool_replay(args: SpoolReplayArgs) -> anyhow::Result<ExitCode> {
    let config = load(&args.config)?;
    let lines = match replay::inspect(&args.file) {
        Ok(lines) => lines,
        Err(error) => {
            eprintln!("exwatch: {error}");
            return Ok(ExitCode::FAILURE);
        }
    };
    let database = match connect(&config).await {
        Ok(database) => database,
        Err(code) => return Ok(code),
    };
    let replayed = replay::replay(&database, &config.server.instance, lines).await;
    database.close().await;
    let replayed = match replayed {
        Ok(replayed) => replayed,
        Err(error) => return Ok(database_failure(error)),
    };
    println!(
        "Replayed {}: {} call rows, {} alert writes; {} refused{}; {} unreadable lines skipped.",
        args.file.display(),
        replayed.calls,
        replayed.alert_writes,
        replayed.refused,
        replayed.first_refusal.as_deref().map(|reason| format!(" (first: {reason})")).unwrap_or_default(),
        replayed.unreadable
    );
    Ok(if replayed.refused == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

async fn alerts_test(args: AlertsTestArgs) -> anyhow::Result<ExitCode> {
    let config = load(&args.config)?;
    if config.alerts.sinks.is_empty() {
        eprintln!("exwatch: no sinks are configured ([[alerts.sinks]]); nothing to test.");
        return Ok(ExitCode::FAILURE);
    }
    let registry = prometheus::Registry::new();
    let outbox = alert::outbox::Outbox::new(&config.alerts.sinks, config.alerts.delivery.clone(), &registry, None)?;
    let instance = &config.server.instance;
    let labels = [("alertname", "exwatch_test"), ("severity", "info"), ("exchange", "none"), ("service", "exwatch")];
    let annotations = [
        ("summary", "exwatch test notification".to_owned()),
        ("description", format!("Sent by `exwatch alerts test` on {instance}; no action is needed.")),
        ("runbook_url", config.alerts.runbook_url.clone()),
    ];
    let test = alert::notification::Alert {
        labels: labels.into_iter().map(|(name, value)| (name.to_owned(), value.to_owned())).collect(),
        annotations: annotations.into_iter().map(|(name, value)| (name.to_owned(), value)).collect(),
        starts_at: chrono::Utc::now(),
        ends_at: None,
        generator_url: alert::notification::generator_url(&config.server.external_url, "none"),
    };
    let reports = outbox.test(&test).await;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
    } else {
        for report in &reports {
            let verdict = if report.ok { "ok" } else { "FAILED" };
            println!("{}: {verdict} in {} ms: {}", report.sink, report.latency_ms, report.detail);
        }
    }
    Ok(if reports.iter().all(|report| report.ok) { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

async fn incidents(args: IncidentsArgs) -> anyhow::Result<ExitCode> {
    let config = load(&args.config)?;
    let database = match open_for_reading(&config, &args.config).await {
        Ok(database) => database,
        Err(code) => return Ok(code),
    };
    let incidents = match database.list_incidents(args.since).await {
        Ok(incidents) => incidents,
        Err(error) => return Ok(database_failure(error)),
    };
    database.close().await;
    let text = if args.json { to_json(&incidents)? } else { report::render_incidents(&incidents, chrono::Utc::now()) };
    print!("{text}");
    Ok(ExitCode::SUCCESS)
}

async fn incident_report(args: ReportArgs) -> anyhow::Result<ExitCode> {
    let config = load(&args.config)?;
    let database = match open_for_reading(&config, &args.config).await {
        Ok(database) => database,
        Err(code) => return Ok(code),
    };
    let report = match database.incident_report(args.id).await {
        Ok(report) => report,
        Err(error) => return Ok(database_failure(error)),
    };
    database.close().await;
    match report {
        Some(report) => {
            print!("{}", if args.json { to_json(&report)? } else { report::render_incident_report(&report) });
            Ok(ExitCode::SUCCESS)
        }
        None => {
            eprintln!("exwatch: no incident with id {} in {}", args.id, database.target());
            Ok(ExitCode::FAILURE)
        }
    }
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

    #[test]
    fn status_reads_as_words_with_wall_clock_times_and_ages() {
        let now = chrono::DateTime::parse_from_rfc3339("2026-11-29T07:16:13Z").unwrap().with_timezone(&chrono::Utc);
        let answer = serde_json::json!({"exchanges": [{
            "exchange": "kraken", "up": false, "system_status": null,
            "breaker": {"state": "OPEN"},
            "rate_limit": {"factor": 1.0, "privatePauseReason": "2 consecutive invalid-key answers",
                           "privatePausedForSeconds": 890},
            "active_alerts": [{"alertname": "exchange_api_down", "severity": "critical",
                               "since": "2026-11-29T07:12:03.123456789Z", "scenario": "authentication",
                               "description": "Kraken rejects our key.", "evidence": "last 5m: 3 failed"}]
        }]});
        let text = render_status_at(&answer, now);
        assert_eq!(
            text,
            "kraken: DOWN; SystemStatus unknown (not read yet); breaker OPEN; rate factor 1.0\n\
             \x20 private calls PAUSED for 14m 50s more: 2 consecutive invalid-key answers\n\
             \x20 FIRING exchange_api_down (critical) since 07:12:03Z, 4m 10s: scenario authentication\n\
             \x20   Kraken rejects our key.\n\
             \x20   evidence: last 5m: 3 failed\n"
        );
        assert!(!text.contains("null"), "{text}");
    }

    #[test]
    fn status_names_the_day_of_an_alert_that_started_before_today() {
        let now = chrono::DateTime::parse_from_rfc3339("2026-11-30T00:00:10Z").unwrap().with_timezone(&chrono::Utc);
        let since = serde_json::json!("2026-11-29T23:59:00Z");
        assert_eq!(wall_clock_and_age(&since, now), "2026-11-29 23:59:00Z, 1m 10s");
        assert_eq!(wall_clock_and_age(&serde_json::Value::Null, now), "an unknown time");
    }
}
