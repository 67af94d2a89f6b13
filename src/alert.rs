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
use crate::exchange::{Endpoint, ErrorClass, Outcome, Profile, TradingStatus};
use crate::journal::{self, Event};
use crate::store::alerts::Op::{IncidentOpened, IncidentProgress};
use crate::store::alerts::{Op, Tally};
use crate::telemetry;

use self::diagnosis::{Actions, Diagnosis, Evidence};
use self::rules::{Change, DownRule, PollResult, SlowRule};

/// Where the daemon serves the operator runbook (`docs/runbook.md`, embedded): the default `runbook_url` is the
/// external URL with this path.
pub const RUNBOOK_PATH: &str = "/runbook";

/// The `[alerts]` section.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Config {
    pub down: rules::DownConfig,
    pub slow: rules::SlowConfig,
    /// How far back the diagnosis looks.
    #[serde(serialize_with = "crate::clock::human_duration")]
    pub evidence_window: Duration,
    /// The `runbook_url` annotation (default: `server.external_url` + `/runbook`, the embedded docs/runbook.md).
    pub runbook_url: String,
    /// `server.external_url`, which notifications link back to (`generatorURL`).
    #[serde(skip)]
    pub external_url: String,
    pub delivery: outbox::Config,
    pub sinks: Vec<sink::Config>,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            down: rules::DownConfig::default(),
            slow: rules::SlowConfig::default(),
            evidence_window: Duration::from_secs(300),
            runbook_url: format!("http://127.0.0.1:9750{}", RUNBOOK_PATH),
            external_url: "http://127.0.0.1:9750".to_owned(),
            delivery: outbox::Config::default(),
            sinks: Vec::new(),
        }
    }
}

crate::text::named_enum! {
    /// The alerts exwatch makes, each with its fixed severity.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
    pub enum AlertName {
        /// The exchange is failing (critical): the down rule's streak, or the breaker open.
        #[serde(rename = "exchange_api_down")]
        Down => "exchange_api_down",
        /// The exchange answers, slowly (warning).
        #[serde(rename = "exchange_api_slow")]
        Slow => "exchange_api_slow",
    }
}

impl AlertName {
    /// The `severity` label.
    pub fn severity(self) -> &'static str {
        match self {
            AlertName::Down => "critical",
            AlertName::Slow => "warning",
        }
    }
}

/// An alert that is firing now, as the status endpoint shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ActiveAlert {
    pub alertname: AlertName,
    pub severity: &'static str,
    pub since: DateTime<Utc>,
    pub reason: String,
    pub summary: String,
    pub description: String,
    pub scenario: String,
    pub evidence: String,
    pub runbook_url: String,
    /// The exchange acknowledges an unplanned incident (its SystemStatus `emergency[]` or an unresolved Statuspage
    /// incident): the page says so (`acknowledged_by_exchange="true"`) and the evidence quotes it.
    pub acknowledged_by_exchange: bool,
    /// The link back to this exwatch in notifications (`generatorURL`).
    #[serde(skip)]
    pub generator_url: String,
}

/// What the exchange's last SystemStatus announced, and when it was read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Advisories {
    pub emergency: Vec<crate::exchange::Advisory>,
    pub upcoming_maintenance: Vec<crate::exchange::Advisory>,
    pub read_at: DateTime<Utc>,
}

/// An unplanned incident the exchange acknowledges, from its SystemStatus or its Statuspage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acknowledgement {
    pub title: String,
    pub status: String,
    pub impact: String,
    pub link: Option<String>,
}

impl ActiveAlert {
    /// The alert as sinks see it: labels `alertname`, `severity`, `exchange`, `service`; the rest annotations.
    pub fn notification(&self, exchange: &str) -> notification::Alert {
        let labels = [
            ("alertname", self.alertname.as_str()),
            ("severity", self.severity),
            ("exchange", exchange),
            ("service", "exwatch"),
        ];
        let acknowledged = "true".to_owned();
        let annotations = [
            ("summary", &self.summary),
            ("description", &self.description),
            ("runbook_url", &self.runbook_url),
            ("scenario", &self.scenario),
            ("evidence", &self.evidence),
        ]
        .into_iter()
        .chain(self.acknowledged_by_exchange.then_some(("acknowledged_by_exchange", &acknowledged)));
        notification::Alert {
            labels: labels.into_iter().map(|(name, value)| (name.to_owned(), value.to_owned())).collect(),
            annotations: annotations.map(|(name, value)| (name.to_owned(), notification::annotation(value))).collect(),
            starts_at: self.since,
            ends_at: None,
            generator_url: self.generator_url.clone(),
        }
    }

    /// A firing alert a previous run left in `alert_state`; `None` for an alert this version does not make.
    fn restored(alert: &notification::Alert) -> Option<ActiveAlert> {
        let alertname = AlertName::parse(alert.label("alertname"))?;
        // Bounded as this version bounds them: the row may come from an older one.
        let annotation =
            |name: &str| alert.annotations.get(name).map(|value| notification::annotation(value)).unwrap_or_default();
        Some(ActiveAlert {
            alertname,
            severity: alertname.severity(),
            since: alert.starts_at,
            reason: "firing before exwatch restarted".to_owned(),
            summary: annotation("summary"),
            description: annotation("description"),
            scenario: annotation("scenario"),
            evidence: annotation("evidence"),
            runbook_url: annotation("runbook_url"),
            acknowledged_by_exchange: annotation("acknowledged_by_exchange") == "true",
            generator_url: alert.generator_url.clone(),
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

/// How far before a failed poll's observation its incident starts, beyond its slowest call: its rows were recorded in
/// between, so none is left out of the incident's window.
const POLL_MARGIN: std::time::Duration = std::time::Duration::from_secs(1);

/// The most bytes of an incident's first or last error.
const MAX_INCIDENT_ERROR_BYTES: usize = 1024;

/// The polls since the first failed one, while they keep failing or `exchange_api_down` fires: what the incident
/// counts, so its row and its report agree.
#[derive(Debug, Clone)]
struct Streak {
    /// Wall-clock time just before its first poll's calls (the slowest call's latency and a second before it was
    /// observed, never before the previous poll): after every call row of the poll before, before any of its own.
    since: DateTime<Utc>,
    first_error: Option<String>,
    /// The streak's calls so far.
    tally: Tally,
}

/// One exchange's alert state: the two rules, the evidence for the diagnosis, and the alerts firing now. It logs
/// each firing and resolution with the scenario and evidence and hands it to the outbox, with the incident's
/// opening and progress.
pub struct Engine {
    exchange: String,
    /// The exchange's kind: its name for people in descriptions and diagnoses.
    profile: &'static Profile,
    /// The unplanned incidents the exchange acknowledges now.
    acknowledgements: Vec<Acknowledgement>,
    /// What the last SystemStatus announced, for `/api/v1/exchanges/{name}/exchange-status`.
    advisories: Option<Advisories>,
    config: Config,
    down: DownRule,
    slow: SlowRule,
    evidence: Evidence,
    active: BTreeMap<AlertName, ActiveAlert>,
    metrics: Metrics,
    last_status: Option<TradingStatus>,
    /// Where firings, changes and resolutions go (sinks, `alert_state`, `incidents`); `None` in unit tests.
    outbox: Option<outbox::Outbox>,
    streak: Option<Streak>,
    /// The wall-clock time of the last observation: every call row of earlier polls is older.
    last_observed: DateTime<Utc>,
    /// The scenario last recorded on the open incident.
    incident_scenario: Option<String>,
}

impl Engine {
    pub fn new(
        exchange: &str,
        profile: &'static Profile,
        config: Config,
        metrics: Metrics,
        outbox: Option<outbox::Outbox>,
    ) -> Engine {
        for alertname in AlertName::ALL {
            metrics.firing.with_label_values(&[alertname.as_str(), exchange]).set(0);
        }
        Engine {
            exchange: exchange.to_owned(),
            profile,
            acknowledgements: Vec::new(),
            advisories: None,
            down: DownRule::new(config.down.clone()),
            slow: SlowRule::new(config.slow.clone()),
            evidence: Evidence::new(config.evidence_window, profile),
            config,
            active: BTreeMap::new(),
            metrics,
            last_status: None,
            outbox,
            streak: None,
            last_observed: Utc::now(),
            incident_scenario: None,
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
        if active.alertname == AlertName::Down {
            self.down.restore_firing(now);
            self.incident_scenario = Some(active.scenario.clone());
        } else {
            self.slow.restore_firing(now);
        }
        self.metrics.firing.with_label_values(&[active.alertname.as_str(), &self.exchange]).set(1);
        tracing::info!(alertname = active.alertname.as_str(), exchange = self.exchange, since = %active.since, "Alert restored as firing.");
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
            self.evidence.record(now, outcome.endpoint, outcome.latency, &outcome.result);
        }
        if let Some(status) = status {
            self.evidence.record_status(now, status.clone());
            self.last_status = Some(status.clone());
        }
        let result = poll_result(outcomes, refused, actions);
        let errors: Vec<String> = outcomes.iter().filter_map(Outcome::error).map(error_text).collect();
        let poll = Tally {
            last_error: errors.last().cloned(),
            failed_calls: errors.len() as i64,
            total_calls: outcomes.len() as i64,
        };
        if result == PollResult::Failed && self.streak.is_none() {
            // This poll's calls were recorded just before now, each having taken at most the slowest one's latency:
            // a second before that is still before any of its rows, and far closer to the first failure than the
            // previous poll (a whole interval earlier), which stays the bound no row of this poll precedes.
            let slowest = outcomes.iter().map(|outcome| outcome.latency).max().unwrap_or_default();
            let before_this_poll = chrono::Duration::from_std(slowest + POLL_MARGIN).unwrap_or(chrono::Duration::MAX);
            let since = Utc::now().checked_sub_signed(before_this_poll).unwrap_or(self.last_observed);
            self.streak =
                Some(Streak { since: since.max(self.last_observed), first_error: None, tally: Tally::default() });
        }
        if let Some(streak) = &mut self.streak {
            streak.first_error = streak.first_error.take().or_else(|| errors.first().cloned());
            streak.tally.last_error = poll.last_error.clone().or(streak.tally.last_error.take());
            streak.tally.failed_calls += poll.failed_calls;
            streak.tally.total_calls += poll.total_calls;
        }

        let was_down = self.down.is_firing();
        let down = self.down.observe(now, &result, breaker);
        let diagnosis =
            (was_down || down.is_some() || !self.active.is_empty()).then(|| self.evidence.diagnose(now, actions));
        if was_down && let Some(diagnosis) = &diagnosis {
            self.record_progress(poll, diagnosis.scenario.as_str());
        }
        self.apply(AlertName::Down, down, now, diagnosis.as_ref());
        if !self.down.is_firing() && matches!(result, PollResult::Succeeded { .. }) {
            self.streak = None;
        }
        let slow = self.slow.observe(now, &result, self.down.is_firing());
        self.apply(AlertName::Slow, slow, now, diagnosis.as_ref());
        // A changed scenario during an incident shows in the status (and on the next resend).
        if let Some(diagnosis) = &diagnosis
            && !self.active.is_empty()
        {
            let average = self.slow.average(now);
            let slow_diagnosis =
                self.active.contains_key(&AlertName::Slow).then(|| self.evidence.diagnose_slow(now, average));
            for (alertname, alert) in self.active.iter_mut() {
                if *alertname == AlertName::Down {
                    alert.scenario = diagnosis.scenario.as_str().to_owned();
                    alert.description = diagnosis.summary.clone();
                    (alert.evidence, alert.acknowledged_by_exchange) =
                        acknowledged(self.profile, &self.acknowledgements, &diagnosis.evidence);
                } else if let Some(slow) = &slow_diagnosis {
                    if let Some(average) = average {
                        alert.description = slow_description(self.profile, average);
                    }
                    alert.scenario = slow.scenario.as_str().to_owned();
                    alert.evidence = slow.evidence.clone();
                }
                if let Some(outbox) = &self.outbox {
                    outbox.update(alert.notification(&self.exchange));
                }
            }
        }
        self.last_observed = Utc::now();
    }

    /// What the exchange acknowledges now (unplanned incidents from its SystemStatus and Statuspage): the down
    /// alert quotes it from the next poll on.
    pub fn acknowledge(&mut self, acknowledgements: Vec<Acknowledgement>) {
        self.acknowledgements = acknowledgements;
    }

    /// Keeps what the last SystemStatus announced.
    pub fn heard_advisories(&mut self, advisories: Advisories) {
        self.advisories = Some(advisories);
    }

    /// What the last SystemStatus announced; `None` until one was read.
    pub fn advisories(&self) -> Option<&Advisories> {
        self.advisories.as_ref()
    }

    /// The exchange's kind: how it is named for people.
    pub fn profile(&self) -> &'static Profile {
        self.profile
    }

    /// The alerts firing now.
    pub fn active(&self) -> Vec<ActiveAlert> {
        self.active.values().cloned().collect()
    }

    pub fn last_status(&self) -> Option<&TradingStatus> {
        self.last_status.as_ref()
    }

    /// One poll's calls (and the scenario, when it changed) added to the open incident.
    fn record_progress(&mut self, poll: Tally, scenario: &str) {
        let scenario_changed = self.incident_scenario.as_deref() != Some(scenario);
        if poll.total_calls == 0 && !scenario_changed {
            return;
        }
        let previous = self.incident_scenario.replace(scenario.to_owned());
        if let Some(outbox) = &self.outbox {
            if scenario_changed && let Some(previous) = previous {
                let detail = format!("scenario {previous} -> {scenario}");
                outbox.record_event(Event::now(&self.exchange, journal::Kind::Scenario, detail));
            }
            outbox.incident_progress(IncidentProgress {
                provider: self.exchange.clone(),
                alertname: AlertName::Down.as_str().to_owned(),
                scenario: scenario.to_owned(),
                tally: poll,
            });
        }
    }

    fn apply(&mut self, alertname: AlertName, change: Option<Change>, now: Instant, diagnosis: Option<&Diagnosis>) {
        let Some(change) = change else { return };
        let exchange = self.exchange.clone();
        match change {
            Change::Fire { reason } => {
                let severity = alertname.severity();
                let (summary, description, diagnosis) = if alertname == AlertName::Down {
                    let diagnosis = match diagnosis {
                        Some(diagnosis) => diagnosis.clone(),
                        None => self.evidence.diagnose(now, &Actions::default()),
                    };
                    (format!("Exchange API down: {exchange}"), diagnosis.summary.clone(), diagnosis)
                } else {
                    let average = self.slow.average(now);
                    let diagnosis = self.evidence.diagnose_slow(now, average);
                    (
                        "Exchange API Response Time Warning".to_owned(),
                        slow_description(self.profile, average.unwrap_or_default()),
                        diagnosis,
                    )
                };
                tracing::warn!(
                    alertname = alertname.as_str(),
                    severity,
                    exchange,
                    reason,
                    scenario = diagnosis.scenario.as_str(),
                    evidence = diagnosis.evidence,
                    "Alert firing."
                );
                self.metrics.firing.with_label_values(&[alertname.as_str(), &exchange]).set(1);
                let mut active = ActiveAlert {
                    alertname,
                    severity,
                    since: Utc::now(),
                    reason,
                    summary,
                    description,
                    scenario: diagnosis.scenario.as_str().to_owned(),
                    evidence: diagnosis.evidence,
                    acknowledged_by_exchange: false,
                    runbook_url: self.config.runbook_url.clone(),
                    generator_url: notification::generator_url(&self.config.external_url, &exchange),
                };
                if alertname == AlertName::Down {
                    (active.evidence, active.acknowledged_by_exchange) =
                        acknowledged(self.profile, &self.acknowledgements, &active.evidence);
                }
                let incident = (alertname == AlertName::Down).then(|| self.opening(&active.scenario));
                if let Some(outbox) = &self.outbox {
                    let detail = format!("{alertname} fired ({}); scenario {}", active.reason, active.scenario);
                    outbox.record_event(Event::now(&exchange, journal::Kind::Alert, detail));
                    outbox.fire(active.notification(&exchange), incident);
                }
                self.active.insert(alertname, active);
            }
            Change::Resolve { reason } => {
                tracing::info!(alertname = alertname.as_str(), exchange, reason, "Alert resolved.");
                self.metrics.firing.with_label_values(&[alertname.as_str(), &exchange]).set(0);
                if alertname == AlertName::Down {
                    self.streak = None;
                    self.incident_scenario = None;
                }
                if let Some(outbox) = &self.outbox {
                    let detail = format!("{alertname} resolved ({reason})");
                    outbox.record_event(Event::now(&exchange, journal::Kind::Alert, detail));
                }
                if let (Some(active), Some(outbox)) = (self.active.remove(&alertname), &self.outbox) {
                    let mut alert = active.notification(&exchange);
                    alert.ends_at = Some(Utc::now());
                    outbox.resolve(alert);
                }
            }
        }
    }

    /// The incident `exchange_api_down` opens: from the first failure of the streak that caused it, with the
    /// streak's calls. Without a streak (the breaker opened on slow calls) it starts with this poll.
    fn opening(&mut self, scenario: &str) -> Op {
        let streak = self.streak.get_or_insert_with(|| Streak {
            since: self.last_observed,
            first_error: None,
            tally: Tally::default(),
        });
        self.incident_scenario = Some(scenario.to_owned());
        IncidentOpened {
            provider: self.exchange.clone(),
            alertname: AlertName::Down.as_str().to_owned(),
            scenario: scenario.to_owned(),
            at: streak.since,
            first_error: streak.first_error.clone(),
            tally: streak.tally.clone(),
        }
    }
}

/// The down alert's evidence with what the exchange acknowledges ("Kraken acknowledges: Elevated API error rates,
/// identified, critical, https://stspg.io/…"), and whether it acknowledges anything.
fn acknowledged(profile: &Profile, acknowledgements: &[Acknowledgement], evidence: &str) -> (String, bool) {
    if acknowledgements.is_empty() {
        return (evidence.to_owned(), false);
    }
    let said: Vec<String> = acknowledgements
        .iter()
        .map(|ack| {
            let mut parts = vec![ack.title.as_str(), ack.status.as_str(), ack.impact.as_str()];
            parts.extend(ack.link.as_deref());
            parts.retain(|part| !part.is_empty());
            parts.join(", ")
        })
        .collect();
    let text = format!("{evidence}; {} acknowledges: {}", profile.display_name, said.join("; "));
    (crate::text::bounded(&text, diagnosis::MAX_EVIDENCE_BYTES + 2048).into_owned(), true)
}

/// `exchange_api_slow`'s description: the exchange by its name for people, and the average latency.
fn slow_description(profile: &Profile, average: Duration) -> String {
    format!("{} API response time elevated: {}ms", profile.display_name, average.as_millis())
}

/// What one poll tells the rules. Our own errors (`invalid_request`) do not say the exchange is down, and the
/// breaker ignores them; but a price check that does not succeed, for whatever reason, is a failed poll: with an
/// endpoint removed or the pair delisted nothing is checked at all, and that must page. Only successful calls'
/// latencies count for `exchange_api_slow`.
fn poll_result(outcomes: &[Outcome<()>], refused: bool, actions: &Actions) -> PollResult {
    if refused {
        return PollResult::NotPermitted;
    }
    let price_check_failed =
        outcomes.iter().any(|outcome| outcome.endpoint == Endpoint::Ticker && outcome.result.is_err());
    let exchange_failed =
        outcomes.iter().filter_map(Outcome::error).any(|error| error.class != ErrorClass::InvalidRequest);
    // While private calls are paused (a lockout, or invalid keys) the exchange cannot be traded on, even with
    // public calls healthy: every poll counts as failed until they resume and succeed (scenario C).
    if price_check_failed || exchange_failed || actions.private_paused.is_some() {
        PollResult::Failed
    } else {
        let latencies =
            outcomes.iter().filter(|outcome| outcome.result.is_ok()).map(|outcome| outcome.latency).collect();
        PollResult::Succeeded { latencies }
    }
}

/// One failed call in words for the incident row: class, exchange error strings and message, bounded.
fn error_text(error: &crate::exchange::Error) -> String {
    let text = if error.exchange_errors.is_empty() {
        format!("{}: {}", error.class, error.message)
    } else {
        format!("{} {}: {}", error.class, error.exchange_errors.join(", "), error.message)
    };
    crate::text::bounded(&text, MAX_INCIDENT_ERROR_BYTES).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exchange::Error;

    const POLL: Duration = Duration::from_secs(30);

    fn outcome(endpoint: Endpoint, millis: u64, class: Option<ErrorClass>) -> Outcome<()> {
        let result = match class {
            Some(class) => Err(Error::new(class, "failed")),
            None => Ok(()),
        };
        Outcome { endpoint, latency: Duration::from_millis(millis), result, warnings: Vec::new() }
    }

    fn engine() -> Engine {
        Engine::new(
            "kraken",
            crate::exchange::Kind::Kraken.profile(),
            Config::default(),
            Metrics::new(&telemetry::registry()),
            None,
        )
    }

    fn poll(engine: &mut Engine, now: Instant, outcomes: &[Outcome<()>]) {
        let status = TradingStatus::Online;
        engine.observe(now, outcomes, Some(&status), false, breaker::State::Closed, &Actions::default());
    }

    #[test]
    fn a_price_check_refused_as_our_own_error_on_every_poll_pages() {
        let mut engine = engine();
        let start = Instant::now();
        // The Ticker fails slowly with invalid_request (the breaker ignores it); SystemStatus answers fast.
        let outcomes = [
            outcome(Endpoint::Ticker, 9000, Some(ErrorClass::InvalidRequest)),
            outcome(Endpoint::SystemStatus, 100, None),
        ];
        for index in 0..3 {
            poll(&mut engine, start + POLL * index, &outcomes);
        }
        let active = engine.active();
        assert_eq!(active.iter().map(|alert| alert.alertname).collect::<Vec<_>>(), [AlertName::Down]);
        assert_eq!(active[0].scenario, "invalid_request");
        assert_eq!(active[0].reason, "3 consecutive failed polls");
    }

    #[test]
    fn failed_calls_never_count_as_successful_latency() {
        let mut engine = engine();
        let start = Instant::now();
        // The price check works; another call fails slowly as our own error: the poll succeeds, but only the
        // successful call's latency is a sample for exchange_api_slow.
        let outcomes = [
            outcome(Endpoint::Ticker, 100, None),
            outcome(Endpoint::SystemStatus, 9000, Some(ErrorClass::InvalidRequest)),
        ];
        for index in 0..12 {
            poll(&mut engine, start + POLL * index, &outcomes);
        }
        assert_eq!(engine.slow.average(start + POLL * 11), Some(Duration::from_millis(100)));
        assert!(engine.active().is_empty(), "{:?}", engine.active());
    }

    #[test]
    fn an_incident_counts_its_streak_from_the_first_failed_poll_until_it_resolves() {
        let mut engine = engine();
        let start = Instant::now();
        let healthy = [outcome(Endpoint::Ticker, 100, None), outcome(Endpoint::SystemStatus, 100, None)];
        let failing = [
            outcome(Endpoint::Ticker, 100, Some(ErrorClass::Maintenance)),
            outcome(Endpoint::SystemStatus, 100, Some(ErrorClass::Maintenance)),
        ];
        poll(&mut engine, start, &healthy);
        let after_the_good_poll = Utc::now();
        for index in 1..=3 {
            poll(&mut engine, start + POLL * index, &failing);
        }
        assert_eq!(engine.active().len(), 1, "fired on the third failed poll");
        let streak = engine.streak.clone().expect("a streak while firing");
        assert!(streak.since <= after_the_good_poll, "the incident starts before its first failed poll's calls");
        assert_eq!((streak.tally.failed_calls, streak.tally.total_calls), (6, 6));
        assert_eq!(streak.first_error.as_deref(), Some("maintenance: failed"));
        // A refused poll sends nothing and counts nothing; recovery polls count until the alert resolves.
        engine.observe(start + POLL * 4, &[], None, true, breaker::State::Open, &Actions::default());
        poll(&mut engine, start + POLL * 5, &healthy);
        assert_eq!(engine.streak.as_ref().map(|streak| streak.tally.total_calls), Some(8));
        poll(&mut engine, start + POLL * 6, &healthy);
        assert!(engine.active().is_empty(), "resolved after two successful polls");
        assert!(engine.streak.is_none());
        // A failed poll followed by a good one is a streak that ends without an incident.
        poll(&mut engine, start + POLL * 7, &failing);
        poll(&mut engine, start + POLL * 8, &healthy);
        assert!(engine.streak.is_none());
    }

    #[test]
    fn alert_names_carry_their_label_and_severity() {
        for name in AlertName::ALL {
            assert_eq!(AlertName::parse(name.as_str()), Some(name));
            assert_eq!(serde_json::to_value(name).unwrap(), name.as_str());
        }
        assert_eq!((AlertName::Down.as_str(), AlertName::Down.severity()), ("exchange_api_down", "critical"));
        assert_eq!((AlertName::Slow.as_str(), AlertName::Slow.severity()), ("exchange_api_slow", "warning"));
        assert_eq!(AlertName::parse("exwatch_test"), None);
    }
}
