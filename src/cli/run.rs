//! The daemon and the one-shot checks: `run`, `check-config`, `simulate`, `probe` and `alerts test`, and the signal
//! handling of the long-running ones (the first SIGTERM or SIGINT cancels, a second exits at once).
//!
//! `run` exits 0 after a clean shutdown and 1 when the daemon cannot be built (`server.listen` in use, a database
//! or spool it cannot open) or stops on a failure; a bad configuration is exit 2 before anything starts.

use std::process::ExitCode;

use tokio_util::sync::CancellationToken;

use super::{AlertsTestArgs, ConfigArgs, SimulateArgs, Usage, load};
use crate::alert;
use crate::app::{self, App};
use crate::config::Config;
use crate::simulator;
use crate::telemetry;

/// Runs the daemon until a signal (exit 0) or a failure (exit 1).
pub(super) async fn run(args: ConfigArgs) -> anyhow::Result<ExitCode> {
    let config = load(&args)?;
    // RUST_LOG or `log.level` that does not parse is configuration.
    telemetry::init(&config.log).map_err(Usage)?;
    for warning in config.warnings() {
        tracing::warn!(warning = %warning, "Part of exwatch is off.");
    }
    for placeholder in &config.placeholders {
        tracing::error!(problem = %placeholder, "Secret not set: exwatch runs with this part off until it is.");
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

pub(super) fn check_config(args: ConfigArgs) -> anyhow::Result<ExitCode> {
    let config = load(&args)?;
    for warning in config.warnings() {
        eprintln!("exwatch: warning: {warning}");
    }
    for variable in &config.ignored_variables {
        eprintln!("exwatch: warning: {variable} is ignored: settings take two underscores after EXWATCH");
    }
    config.check_writable_paths()?;
    config.check_placeholders()?;
    print!("{}", config.to_redacted_toml());
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn simulate(args: SimulateArgs) -> anyhow::Result<ExitCode> {
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

pub(super) async fn probe(args: ConfigArgs) -> anyhow::Result<ExitCode> {
    let config = load(&args)?;
    let exchanges =
        config.exchanges.iter().map(|view| app::client(&view.exchange, &config)).collect::<anyhow::Result<Vec<_>>>()?;
    let mut stdout = std::io::stdout().lock();
    let passed = crate::probe::run(&exchanges, &mut stdout).await?;
    Ok(if passed { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// Sends a test alert to every configured sink now, outside the queues, and reports each result.
pub(super) async fn alerts_test(args: AlertsTestArgs) -> anyhow::Result<ExitCode> {
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
