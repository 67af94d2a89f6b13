//! The JSON the daemon answers and the CLI reads back: `/api/v1/status` and the admin API's request and answer
//! bodies. Each is one type in snake_case that the server serializes and the CLI deserializes, so renaming a field
//! renames it on both sides (and a field the server adds by hand fails the status round-trip test).
//!
//! What it owns: the wire types, the states an operator may force ([`FORCEABLE`]) with the messages that refuse
//! the others, and each type's construction from the breaker's, limiter's, schedule's and alerts' own views (most
//! destructured in full, so a new field there is a decision made here). What it does not do: routing,
//! authentication, reading the clock or rounding durations (`http`, `http::admin`), nor printing (`cli`).
//!
//! Input is lenient where the runbook is: a force request may say `forceState` (`circuitBreaker.forceState`).

use std::collections::BTreeSet;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

use crate::alert::ActiveAlert;
use crate::breaker;
use crate::failure::ErrorClass;
use crate::limiter;
use crate::poller::schedule;

/// The states an operator may force; plain OPEN is the breaker's own decision (use FORCED_OPEN).
pub const FORCEABLE: [breaker::State; 5] = [
    breaker::State::HalfOpen,
    breaker::State::ForcedOpen,
    breaker::State::Disabled,
    breaker::State::MetricsOnly,
    breaker::State::Closed,
];

// ---------------------------------------------------------------------------------------------------------------
// GET /api/v1/status
// ---------------------------------------------------------------------------------------------------------------

/// `GET /api/v1/status[?exchange=NAME]`: what on-call needs first, per exchange.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusResponse {
    pub exchanges: Vec<ExchangeStatus>,
    /// Settings that still hold the secret template's placeholders, each naming its key and what is off until it
    /// is replaced (the API key: no Balance check; the admin token: no admin API).
    pub placeholders: Vec<String>,
}

/// One exchange: up or down, SystemStatus, breaker, rate factor, poll schedule and the alerts firing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExchangeStatus {
    pub exchange: String,
    /// False while `exchange_api_down` fires.
    pub up: bool,
    /// The last SystemStatus read (`online`, `maintenance`, ...); null until one was read.
    pub system_status: Option<String>,
    pub breaker: BreakerSummary,
    pub rate_limit: RateLimitSummary,
    /// Null until the exchange's poll loop has run.
    pub schedule: Option<ScheduleStatus>,
    pub active_alerts: Vec<FiringAlert>,
    /// How people name the exchange (`Kraken`), for "Kraken says".
    pub display_name: String,
    /// What its Statuspage says; null when `statuspage_url` is not configured.
    pub statuspage: Option<crate::statuspage::View>,
}

/// `GET /api/v1/exchanges/{name}/exchange-status`: what the exchange itself says.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExchangeSays {
    pub exchange: String,
    /// How people name the exchange (`Kraken`).
    pub display_name: String,
    /// The last SystemStatus read; null until one was read.
    pub system_status: Option<SystemStatusSaid>,
    /// Its Statuspage; null when `statuspage_url` is not configured.
    pub statuspage: Option<crate::statuspage::View>,
    /// What its last SystemStatus announced (`emergency`, `upcoming_maintenance`) and when it was read; null until
    /// one was read.
    pub advisories: Option<crate::alert::Advisories>,
    /// Its WebSocket `status` channel; null when `websocket_url` is not configured.
    #[serde(default)]
    pub websocket: Option<crate::websocket::View>,
}

/// A trading status and where it was read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SystemStatusSaid {
    pub value: String,
    /// `rest` (SystemStatus polls).
    pub source: String,
}

/// The breaker as the status shows it; the admin API's [`BreakerStatus`] has the rest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BreakerSummary {
    #[serde(with = "state_name")]
    pub state: breaker::State,
    pub consecutive_failures: u32,
    /// Percent, or -1 while the window holds fewer than `minimum_calls`.
    pub failure_rate: f64,
    pub not_permitted_calls: u64,
}

impl From<&breaker::Snapshot> for BreakerSummary {
    fn from(snapshot: &breaker::Snapshot) -> BreakerSummary {
        BreakerSummary {
            state: snapshot.state,
            consecutive_failures: snapshot.consecutive_failures,
            failure_rate: snapshot.failure_rate,
            not_permitted_calls: snapshot.not_permitted_calls,
        }
    }
}

/// The limiter as the status shows it; the admin API's [`RateLimitStatus`] has the rest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RateLimitSummary {
    pub factor: f64,
    /// Why private calls are paused, while they are.
    pub private_pause_reason: Option<String>,
    /// Whole seconds left of the pause.
    pub private_paused_for_seconds: Option<u64>,
}

impl From<&limiter::Snapshot> for RateLimitSummary {
    fn from(snapshot: &limiter::Snapshot) -> RateLimitSummary {
        RateLimitSummary {
            factor: snapshot.factor,
            private_pause_reason: snapshot.private_pause_reason.clone(),
            private_paused_for_seconds: snapshot.private_paused_for.map(|left| left.as_secs()),
        }
    }
}

/// The poll schedule as of its loop's last action.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScheduleStatus {
    pub mode: PollMode,
    /// Failed polls in the current streak.
    pub failed_polls: u32,
    pub next_action: NextAction,
    pub next_in_seconds: f64,
}

/// [`schedule::Mode`] on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PollMode {
    Normal,
    Confirming,
    Recovering,
}

/// [`schedule::Action`] on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NextAction {
    Poll,
    Check,
}

impl From<schedule::View> for ScheduleStatus {
    fn from(view: schedule::View) -> ScheduleStatus {
        let schedule::View { mode, failed_polls, next_action, next_in_seconds } = view;
        let mode = match mode {
            schedule::Mode::Normal => PollMode::Normal,
            schedule::Mode::Confirming => PollMode::Confirming,
            schedule::Mode::Recovering => PollMode::Recovering,
        };
        let next_action = match next_action {
            schedule::Action::Poll => NextAction::Poll,
            schedule::Action::Check => NextAction::Check,
        };
        ScheduleStatus { mode, failed_polls, next_action, next_in_seconds }
    }
}

/// An alert firing now, with the runbook scenario it was diagnosed as and the evidence.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FiringAlert {
    pub alertname: String,
    pub severity: String,
    pub since: DateTime<Utc>,
    pub reason: String,
    pub summary: String,
    pub description: String,
    pub scenario: String,
    pub evidence: String,
    pub runbook_url: String,
    /// The exchange acknowledges an unplanned incident (quoted in the evidence).
    pub acknowledged_by_exchange: bool,
}

impl From<&ActiveAlert> for FiringAlert {
    fn from(alert: &ActiveAlert) -> FiringAlert {
        // The link back is for notifications; the status is where it leads.
        let ActiveAlert {
            alertname,
            severity,
            since,
            reason,
            summary,
            description,
            scenario,
            evidence,
            runbook_url,
            acknowledged_by_exchange,
            generator_url: _,
        } = alert;
        FiringAlert {
            alertname: alertname.as_str().to_owned(),
            severity: (*severity).to_owned(),
            since: *since,
            reason: reason.clone(),
            summary: summary.clone(),
            description: description.clone(),
            scenario: scenario.clone(),
            evidence: evidence.clone(),
            runbook_url: runbook_url.clone(),
            acknowledged_by_exchange: *acknowledged_by_exchange,
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// /api/admin/circuit-breaker/{exchange}
// ---------------------------------------------------------------------------------------------------------------

/// The body of `POST /api/admin/circuit-breaker/{exchange}`: `{"state": "HALF_OPEN"}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForceRequest {
    /// One of [`FORCEABLE`].
    #[serde(alias = "forceState", serialize_with = "state_name::serialize", deserialize_with = "forceable_state")]
    pub state: breaker::State,
}

/// The breaker's status (Resilience4j's counters in snake_case): durations as people write them, rounded by the
/// server; times RFC 3339.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BreakerStatus {
    pub exchange: String,
    #[serde(with = "state_name")]
    pub state: breaker::State,
    /// When the breaker entered its state.
    pub since: String,
    /// How long it has been in it (`1m 5s`).
    pub in_state_for: String,
    /// Failed calls in a row, for the consecutive-failure trip.
    pub consecutive_failures: u32,
    /// Failures in the window (the runbook's `failureCount`).
    pub failure_count: u32,
    /// Calls in the window, and the slow ones among them.
    pub calls_in_window: u32,
    pub slow_calls_in_window: u32,
    /// Percent, or -1 while the window holds fewer than `minimum_calls`.
    pub failure_rate: f64,
    pub slow_call_rate: f64,
    pub last_failure_class: Option<ErrorClass>,
    /// When the last failure was recorded (the runbook's `lastFailureTime`).
    pub last_failure_time: Option<String>,
    pub last_failure_ago: Option<String>,
    pub not_permitted_calls: u64,
    /// While OPEN: how long until HALF_OPEN.
    pub half_open_in: Option<String>,
    pub config: BreakerSettings,
}

impl BreakerStatus {
    /// The status of `exchange`'s breaker from its snapshot, whose durations the caller has rounded for people,
    /// and the wall-clock times the caller derived from them.
    pub fn new(
        exchange: &str,
        snapshot: breaker::Snapshot,
        since: String,
        last_failure_time: Option<String>,
        config: &breaker::Config,
    ) -> BreakerStatus {
        let breaker::Snapshot {
            state,
            in_state_for,
            consecutive_failures,
            failure_count,
            calls_in_window,
            slow_calls_in_window,
            failure_rate,
            slow_call_rate,
            last_failure_class,
            last_failure_ago,
            not_permitted_calls,
            half_open_in,
        } = snapshot;
        BreakerStatus {
            exchange: exchange.to_owned(),
            state,
            since,
            in_state_for: human(in_state_for),
            consecutive_failures,
            failure_count,
            calls_in_window,
            slow_calls_in_window,
            failure_rate,
            slow_call_rate,
            last_failure_class,
            last_failure_time,
            last_failure_ago: last_failure_ago.map(human),
            not_permitted_calls,
            half_open_in: half_open_in.map(human),
            config: BreakerSettings::from(config),
        }
    }
}

/// The breaker's effective settings, under the keys of the `[breaker]` configuration section that set them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BreakerSettings {
    pub consecutive_failures: u32,
    pub failure_rate_threshold: f64,
    pub slow_call_rate_threshold: f64,
    pub slow_call_duration: String,
    #[serde(flatten)]
    pub window: WindowSettings,
    pub minimum_calls: u32,
    pub wait_duration_in_open: String,
    /// Present when the open wait backs off.
    #[serde(flatten)]
    pub open_backoff: Option<BackoffSettings>,
    pub permitted_calls_in_half_open: u32,
    pub max_wait_in_half_open: String,
    pub ignored_classes: BTreeSet<ErrorClass>,
}

/// The sliding window the breaker judges rates over: `window_type` and its size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "window_type", rename_all = "snake_case")]
pub enum WindowSettings {
    Count { window_calls: u32 },
    Time { window_duration: String },
}

/// The backoff of the open wait across consecutive openings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackoffSettings {
    pub backoff_multiplier: f64,
    pub backoff_max_wait: String,
    pub backoff_jitter: f64,
}

impl From<&breaker::Config> for BreakerSettings {
    fn from(config: &breaker::Config) -> BreakerSettings {
        let window = match config.window {
            breaker::Window::Count(calls) => WindowSettings::Count { window_calls: calls },
            breaker::Window::Time(duration) => WindowSettings::Time { window_duration: human(duration) },
        };
        let open_backoff = config.open_backoff.map(|backoff| BackoffSettings {
            backoff_multiplier: backoff.multiplier,
            backoff_max_wait: human(backoff.max_wait),
            backoff_jitter: backoff.jitter,
        });
        // A field added to the breaker's settings shows in `breaker::Config`'s own serialization, which a test
        // holds equal to this one.
        BreakerSettings {
            consecutive_failures: config.consecutive_failures,
            failure_rate_threshold: config.failure_rate_threshold,
            slow_call_rate_threshold: config.slow_call_rate_threshold,
            slow_call_duration: human(config.slow_call_duration),
            window,
            minimum_calls: config.minimum_calls,
            wait_duration_in_open: human(config.wait_duration_in_open),
            open_backoff,
            permitted_calls_in_half_open: config.permitted_calls_in_half_open,
            max_wait_in_half_open: human(config.max_wait_in_half_open),
            ignored_classes: config.ignored_classes.clone(),
        }
    }
}

/// The answer to a forced state or a reset: what it was, what it is, and the status afterwards.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BreakerChange {
    pub exchange: String,
    #[serde(with = "state_name")]
    pub from: breaker::State,
    #[serde(with = "state_name")]
    pub to: breaker::State,
    /// False when the breaker already was in `to` (a reset still clears its counters).
    pub changed: bool,
    pub status: BreakerStatus,
}

// ---------------------------------------------------------------------------------------------------------------
// /api/admin/rate-limit/{exchange}
// ---------------------------------------------------------------------------------------------------------------

/// The body of `PUT /api/admin/rate-limit/{exchange}`: `{"factor": 0.5}`; the limiter checks the range.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateFactorRequest {
    #[serde(deserialize_with = "factor_number")]
    pub factor: f64,
}

/// The limiter's status: factor and ceiling, the effective budgets, recent rate limiting and a private-call pause.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RateLimitStatus {
    pub exchange: String,
    pub factor: f64,
    /// The operator's factor; automatic backoff stays at or below it.
    pub ceiling: f64,
    /// The budgets in force, written beside the other fields.
    #[serde(flatten)]
    pub budgets: Budgets,
    /// Rate-limited answers within the limiter's quiet period.
    pub recent_rate_limited: u64,
    pub last_rate_limited_ago: Option<String>,
    /// What is left of a private-call pause.
    pub private_paused_for: Option<String>,
    pub private_pause_reason: Option<String>,
}

/// The call budgets in force: the configured ones times the factor, the bursts (calls that may go at once after a
/// quiet spell) scaled too.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Budgets {
    pub public_per_second: f64,
    pub private_per_second: f64,
    pub public_burst: u32,
    pub private_burst: u32,
}

impl RateLimitStatus {
    /// The status of `exchange`'s limiter from its snapshot, whose durations the caller has rounded for people.
    pub fn new(exchange: &str, snapshot: limiter::Snapshot) -> RateLimitStatus {
        let limiter::Snapshot {
            factor,
            ceiling,
            public_per_second,
            private_per_second,
            public_burst,
            private_burst,
            recent_rate_limited,
            last_rate_limited_ago,
            private_paused_for,
            private_pause_reason,
        } = snapshot;
        RateLimitStatus {
            exchange: exchange.to_owned(),
            factor,
            ceiling,
            budgets: Budgets { public_per_second, private_per_second, public_burst, private_burst },
            recent_rate_limited: u64::try_from(recent_rate_limited).unwrap_or(u64::MAX),
            last_rate_limited_ago: last_rate_limited_ago.map(human),
            private_paused_for: private_paused_for.map(human),
            private_pause_reason,
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Field formats
// ---------------------------------------------------------------------------------------------------------------

/// A duration as people and the configuration file write it (`1m 5s`).
fn human(duration: Duration) -> String {
    humantime::format_duration(duration).to_string()
}

/// A breaker state by its Resilience4j name (`HALF_OPEN`).
mod state_name {
    use super::*;

    pub(super) fn serialize<S: serde::Serializer>(state: &breaker::State, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(state.as_str())
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<breaker::State, D::Error> {
        let name = String::deserialize(deserializer)?;
        breaker::State::parse(&name).ok_or_else(|| D::Error::custom(format!("unknown breaker state {name:?}")))
    }
}

/// A state an operator may force, refused with the list of those allowed.
fn forceable_state<'de, D: Deserializer<'de>>(deserializer: D) -> Result<breaker::State, D::Error> {
    let allowed = FORCEABLE.map(breaker::State::as_str).join(", ");
    let value = Value::deserialize(deserializer)?;
    let Some(name) = value.as_str() else {
        return Err(D::Error::custom(format!("state must be a string, got {value}; allowed: {allowed}")));
    };
    match breaker::State::parse(name) {
        Some(state) if FORCEABLE.contains(&state) => Ok(state),
        Some(_) => Err(D::Error::custom(format!(
            "state {name} cannot be forced (the breaker opens on its own); use FORCED_OPEN; allowed: {allowed}"
        ))),
        None => Err(D::Error::custom(format!("unknown state {name:?}; allowed: {allowed}"))),
    }
}

/// A factor must at least be a number; its range is the limiter's rule.
fn factor_number<'de, D: Deserializer<'de>>(deserializer: D) -> Result<f64, D::Error> {
    let value = Value::deserialize(deserializer)?;
    value
        .as_f64()
        .ok_or_else(|| D::Error::custom(format!("factor must be a number greater than 0 and at most 1, got {value}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_read_the_runbooks_spelling_and_refuse_what_cannot_be_forced() {
        let request: ForceRequest = serde_json::from_str(r#"{"forceState":"HALF_OPEN"}"#).unwrap();
        assert_eq!(request.state, breaker::State::HalfOpen);
        let body = serde_json::to_string(&ForceRequest { state: breaker::State::ForcedOpen }).unwrap();
        assert_eq!(body, r#"{"state":"FORCED_OPEN"}"#);
        let refused = serde_json::from_str::<ForceRequest>(r#"{"state":"OPEN"}"#).unwrap_err().to_string();
        assert!(refused.starts_with("state OPEN cannot be forced"), "{refused}");
        assert_eq!(serde_json::to_string(&RateFactorRequest { factor: 0.5 }).unwrap(), r#"{"factor":0.5}"#);
    }

    #[test]
    fn the_breaker_settings_read_as_the_configuration_writes_them() {
        let backoff = breaker::Backoff { multiplier: 2.0, max_wait: Duration::from_secs(600), jitter: 0.1 };
        let timed = breaker::Config {
            window: breaker::Window::Time(Duration::from_secs(60)),
            open_backoff: Some(backoff),
            ..breaker::Config::default()
        };
        for config in [breaker::Config::default(), timed] {
            let settings = serde_json::to_value(BreakerSettings::from(&config)).unwrap();
            assert_eq!(settings, serde_json::to_value(&config).unwrap());
            let read: BreakerSettings = serde_json::from_value(settings).unwrap();
            assert_eq!(read, BreakerSettings::from(&config));
        }
    }
}
