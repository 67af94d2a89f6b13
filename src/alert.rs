//! Alerting: [`rules`] decide when `exchange_api_down` and `exchange_api_slow` fire and resolve, and [`diagnosis`]
//! names the runbook scenario with its evidence; both are pure state machines that take `now`. The [`Engine`]
//! of each exchange feeds them every poll and turns their changes into [`notification::Alert`]s for the
//! [`outbox`], which delivers them to the [`sink`]s (Alertmanager, webhooks), durably.

pub mod diagnosis;
pub mod notification;
pub mod outbox;
pub mod rules;
pub mod sink;

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use prometheus::{IntGaugeVec, Opts, Registry};
use serde::Serialize;
use tokio::time::Instant;

use crate::breaker;
use crate::exchange::{ErrorClass, Outcome, TradingStatus};
use crate::telemetry;

use self::diagnosis::{Actions, Diagnosis, Evidence};
use self::rules::{Change, DownRule, PollResult, SlowRule};

/// The `[alerts]` section.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Config {
    pub down: rules::DownConfig,
    pub slow: rules::SlowConfig,
    /// How far back the diagnosis looks.
    #[serde(serialize_with = "crate::config::human_duration")]
    pub evidence_window: Duration,
    /// The `runbook_url` annotation (default: `server.external_url` + `/runbook`, the embedded docs/runbook.md).
    pub runbook_url: String,
    pub delivery: outbox::Config,
    pub sinks: Vec<sink::Config>,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            down: rules::DownConfig::default(),
            slow: rules::SlowConfig::default(),
            evidence_window: Duration::from_secs(300),
            runbook_url: format!("http://127.0.0.1:9750{}", crate::config::RUNBOOK_PATH),
            delivery: outbox::Config::default(),
            sinks: Vec::new(),
        }
    }
}

pub const DOWN: &str = "exchange_api_down";
pub const SLOW: &str = "exchange_api_slow";

/// An alert that is firing now, as the status endpoint shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ActiveAlert {
    pub alertname: &'static str,
    pub severity: &'static str,
    pub since: DateTime<Utc>,
    pub reason: String,
    pub summary: String,
    pub description: String,
    pub scenario: String,
    pub evidence: String,
    pub runbook_url: String,
}

impl ActiveAlert {
    /// The alert as sinks see it: labels `alertname`, `severity`, `exchange`, `service`; the rest annotations.
    pub fn notification(&self, exchange: &str) -> notification::Alert {
        let labels = [
            ("alertname", self.alertname),
            ("severity", self.severity),
            ("exchange", exchange),
            ("service", "exwatch"),
        ];
        let annotations = [
            ("summary", &self.summary),
            ("description", &self.description),
            ("runbook_url", &self.runbook_url),
            ("scenario", &self.scenario),
            ("evidence", &self.evidence),
        ];
        notification::Alert {
            labels: labels.into_iter().map(|(name, value)| (name.to_owned(), value.to_owned())).collect(),
            annotations: annotations.into_iter().map(|(name, value)| (name.to_owned(), value.clone())).collect(),
            starts_at: self.since,
            ends_at: None,
        }
    }

    /// A firing alert a previous run left in `alert_state`; `None` for an alert this version does not make.
    fn restored(alert: &notification::Alert) -> Option<ActiveAlert> {
        let (alertname, severity) = match alert.label("alertname") {
            DOWN => (DOWN, "critical"),
            SLOW => (SLOW, "warning"),
            _ => return None,
        };
        let annotation = |name: &str| alert.annotations.get(name).cloned().unwrap_or_default();
        Some(ActiveAlert {
            alertname,
            severity,
            since: alert.starts_at,
            reason: "firing before exwatch restarted".to_owned(),
            summary: annotation("summary"),
            description: annotation("description"),
            scenario: annotation("scenario"),
            evidence: annotation("evidence"),
            runbook_url: annotation("runbook_url"),
        })
    }
}

/// `exwatch_alerts_firing{alertname,exchange}`.
#[derive(Clone)]
pub struct Metrics {
    firing: IntGaugeVec,
}

impl Metrics {
    pub fn new(registry: &Registry) -> Metrics {
        let firing = IntGaugeVec::new(
            Opts::new("exwatch_alerts_firing", "1 while the alert fires for the exchange."),
            &["alertname", "exchange"],
        )
        .expect("valid metric definition");
        Metrics { firing: telemetry::register(registry, firing) }
    }
}

/// One exchange's alert state: the two rules, the evidence for the diagnosis, and the alerts firing now. It logs
/// each firing and resolution with the scenario and evidence and hands it to the outbox.
pub struct Engine {
    exchange: String,
    config: Config,
    down: DownRule,
    slow: SlowRule,
    evidence: Evidence,
    active: BTreeMap<&'static str, ActiveAlert>,
    metrics: Metrics,
    last_status: Option<TradingStatus>,
    /// Where firings, changes and resolutions go (sinks, `alert_state`, `incidents`); `None` in unit tests.
    outbox: Option<outbox::Outbox>,
}

impl Engine {
    pub fn new(exchange: &str, config: Config, metrics: Metrics, outbox: Option<outbox::Outbox>) -> Engine {
        for alertname in [DOWN, SLOW] {
            metrics.firing.with_label_values(&[alertname, exchange]).set(0);
        }
        Engine {
            exchange: exchange.to_owned(),
            down: DownRule::new(config.down.clone()),
            slow: SlowRule::new(config.slow.clone()),
            evidence: Evidence::new(config.evidence_window),
            config,
            active: BTreeMap::new(),
            metrics,
            last_status: None,
            outbox,
        }
    }

    /// Resumes an alert that was firing before a restart, without notifying: the rule fires on silently and
    /// resolves (and notifies) as usual.
    pub fn restore(&mut self, alert: &notification::Alert) {
        let Some(active) = ActiveAlert::restored(alert) else {
            tracing::warn!(alertname = alert.label("alertname"), "Ignoring a restored alert of an unknown name.");
            return;
        };
        let now = Instant::now();
        if active.alertname == DOWN {
            self.down.restore_firing(now);
        } else {
            self.slow.restore_firing(now);
        }
        self.metrics.firing.with_label_values(&[active.alertname, &self.exchange]).set(1);
        tracing::info!(alertname = active.alertname, exchange = self.exchange, since = %active.since, "Alert restored as firing.");
        self.active.insert(active.alertname, active);
    }

    /// Feeds one poll (or verification step): its calls, the SystemStatus it read, and the breaker afterwards.
    /// `refused` is a poll the breaker did not permit.
    pub fn observe(
        &mut self,
        now: Instant,
        outcomes: &[Outcome<()>],
        status: Option<&TradingStatus>,
        refused: bool,
        breaker: breaker::State,
        actions: &Actions,
    ) {
        for outcome in outcomes {
            self.evidence.record(now, outcome.endpoint, &outcome.result);
        }
        if let Some(status) = status {
            self.evidence.record_status(now, status.clone());
            self.last_status = Some(status.clone());
        }
        // While private calls are paused (a lockout, or invalid keys) the exchange cannot be traded on, even
        // with public calls healthy: every poll counts as failed until they resume and succeed (scenario C).
        let result = if refused {
            PollResult::NotPermitted
        } else if outcomes.iter().filter_map(Outcome::error).any(|error| error.class != ErrorClass::InvalidRequest)
            || actions.private_paused.is_some()
        {
            PollResult::Failed
        } else {
            PollResult::Succeeded { latencies: outcomes.iter().map(|outcome| outcome.latency).collect() }
        };
        let first_error =
            outcomes.iter().filter_map(Outcome::error).next().map(|error| match error.exchange_errors.is_empty() {
                true => format!("{}: {}", error.class, error.message),
                false => format!("{} {}: {}", error.class, error.exchange_errors.join(", "), error.message),
            });
        let down = self.down.observe(now, &result, breaker);
        self.apply(DOWN, down, now, actions, first_error.clone());
        let slow = self.slow.observe(now, &result, self.down.is_firing());
        self.apply(SLOW, slow, now, actions, first_error);
        // A changed scenario during an incident shows in the status (and on the next resend).
        if !self.active.is_empty() {
            let diagnosis = self.evidence.diagnose(now, actions);
            let average = self.slow.average(now);
            for (alertname, alert) in self.active.iter_mut() {
                if *alertname == DOWN {
                    alert.scenario = diagnosis.scenario.as_str().to_owned();
                    alert.description = diagnosis.summary.clone();
                } else if let Some(average) = average {
                    alert.description = format!("Kraken API response time elevated: {}ms", average.as_millis());
                }
                alert.evidence = diagnosis.evidence.clone();
                if let Some(outbox) = &self.outbox {
                    outbox.update(alert.notification(&self.exchange));
                }
            }
        }
    }

    /// The alerts firing now.
    pub fn active(&self) -> Vec<ActiveAlert> {
        self.active.values().cloned().collect()
    }

    pub fn last_status(&self) -> Option<&TradingStatus> {
        self.last_status.as_ref()
    }

    fn apply(
        &mut self,
        alertname: &'static str,
        change: Option<Change>,
        now: Instant,
        actions: &Actions,
        first_error: Option<String>,
    ) {
        let Some(change) = change else { return };
        let exchange = self.exchange.clone();
        match change {
            Change::Fire { reason } => {
                let diagnosis: Diagnosis = self.evidence.diagnose(now, actions);
                let (severity, summary, description) = if alertname == DOWN {
                    ("critical", format!("Exchange API down: {exchange}"), diagnosis.summary.clone())
                } else {
                    let average = self.slow.average(now).unwrap_or_default();
                    (
                        "warning",
                        "Exchange API Response Time Warning".to_owned(),
                        format!("Kraken API response time elevated: {}ms", average.as_millis()),
                    )
                };
                tracing::warn!(
                    alertname,
                    severity,
                    exchange,
                    reason,
                    scenario = diagnosis.scenario.as_str(),
                    evidence = diagnosis.evidence,
                    "Alert firing."
                );
                self.metrics.firing.with_label_values(&[alertname, &exchange]).set(1);
                let active = ActiveAlert {
                    alertname,
                    severity,
                    since: Utc::now(),
                    reason,
                    summary,
                    description,
                    scenario: diagnosis.scenario.as_str().to_owned(),
                    evidence: diagnosis.evidence,
                    runbook_url: self.config.runbook_url.clone(),
                };
                if let Some(outbox) = &self.outbox {
                    outbox.fire(active.notification(&exchange), &active.scenario, first_error);
                }
                self.active.insert(alertname, active);
            }
            Change::Resolve { reason } => {
                tracing::info!(alertname, exchange, reason, "Alert resolved.");
                self.metrics.firing.with_label_values(&[alertname, &exchange]).set(0);
                if let (Some(active), Some(outbox)) = (self.active.remove(alertname), &self.outbox) {
                    let mut alert = active.notification(&exchange);
                    alert.ends_at = Some(Utc::now());
                    outbox.resolve(alert);
                }
            }
        }
    }
}
