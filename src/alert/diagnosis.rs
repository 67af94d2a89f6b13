//! Diagnosis: the runbook's four scenarios made automatic. From the calls of the last minutes and the exchange's
//! last SystemStatus it names the scenario on-call is in (A `maintenance`, B `rate_limiting`, C `authentication`,
//! D `network`, plus `exchange_errors` and `mixed`), says what exwatch already did about it, and writes the evidence
//! (counts by class, the last exchange error strings and HTTP statuses). Pure: it takes `now`, does no I/O.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

use crate::exchange::{Endpoint, Error, ErrorClass, TradingStatus};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Scenario {
    /// A: the exchange says it is in maintenance, or answers `EService:Unavailable`.
    Maintenance,
    /// B: 429s and rate-limit errors.
    RateLimiting,
    /// C: private calls refused on credentials while public calls work.
    Authentication,
    /// D: DNS, connection and timeout failures.
    Network,
    /// 5xx, Cloudflare pages, `EService:Busy`, answers that are not the API's.
    ExchangeErrors,
    /// No single cause dominates.
    Mixed,
}

impl Scenario {
    pub fn as_str(self) -> &'static str {
        match self {
            Scenario::Maintenance => "maintenance",
            Scenario::RateLimiting => "rate_limiting",
            Scenario::Authentication => "authentication",
            Scenario::Network => "network",
            Scenario::ExchangeErrors => "exchange_errors",
            Scenario::Mixed => "mixed",
        }
    }
}

impl fmt::Display for Scenario {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.as_str())
    }
}

/// One call as diagnosis sees it.
#[derive(Debug, Clone)]
struct Observation {
    at: Instant,
    endpoint: Endpoint,
    failure: Option<(ErrorClass, Option<u16>, Vec<String>)>,
}

/// What exwatch is doing about it, for the summary.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Actions {
    pub rate_factor: f64,
    /// Remaining pause of private calls, and why.
    pub private_paused: Option<(Duration, String)>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Diagnosis {
    pub scenario: Scenario,
    /// One sentence: what is happening and what exwatch did.
    pub summary: String,
    /// Counts by class over the window, the last exchange error strings and HTTP statuses.
    pub evidence: String,
}

/// The recent calls of one exchange.
#[derive(Debug, Clone)]
pub struct Evidence {
    window: Duration,
    calls: VecDeque<Observation>,
    /// The last SystemStatus read within the window, and when: a status older than the window says nothing
    /// about now (while the breaker is open no SystemStatus is read at all).
    last_status: Option<(Instant, TradingStatus)>,
}

/// A share of the failures at or above which one cause is named.
const DOMINANT_SHARE: f64 = 0.5;

impl Evidence {
    pub fn new(window: Duration) -> Evidence {
        Evidence { window, calls: VecDeque::new(), last_status: None }
    }

    pub fn record(&mut self, now: Instant, endpoint: Endpoint, result: &Result<(), Error>) {
        let failure =
            result.as_ref().err().map(|error| (error.class, error.http_status, error.exchange_errors.clone()));
        self.calls.push_back(Observation { at: now, endpoint, failure });
        self.evict(now);
    }

    pub fn record_status(&mut self, now: Instant, status: TradingStatus) {
        self.last_status = Some((now, status));
    }

    fn evict(&mut self, now: Instant) {
        while self.calls.front().is_some_and(|call| now.saturating_duration_since(call.at) >= self.window) {
            self.calls.pop_front();
        }
        if self.last_status.as_ref().is_some_and(|(at, _)| now.saturating_duration_since(*at) >= self.window) {
            self.last_status = None;
        }
    }

    fn status(&self) -> Option<&TradingStatus> {
        self.last_status.as_ref().map(|(_, status)| status)
    }

    pub fn diagnose(&mut self, now: Instant, actions: &Actions) -> Diagnosis {
        self.evict(now);
        let failures: Vec<&Observation> = self.calls.iter().filter(|call| call.failure.is_some()).collect();
        let mut by_class: BTreeMap<ErrorClass, usize> = BTreeMap::new();
        for call in &failures {
            if let Some((class, _, _)) = &call.failure {
                *by_class.entry(*class).or_default() += 1;
            }
        }
        let total = failures.len().max(1) as f64;
        let share = |classes: &[ErrorClass]| {
            classes.iter().map(|class| by_class.get(class).copied().unwrap_or(0)).sum::<usize>() as f64 / total
        };
        let public_ok = self.calls.iter().any(|call| !call.endpoint.is_private() && call.failure.is_none());
        let public_failed = failures.iter().any(|call| !call.endpoint.is_private());
        let private_auth = failures
            .iter()
            .any(|call| call.endpoint.is_private() && matches!(call.failure, Some((ErrorClass::Auth, _, _))));
        let status_down = self.status().is_some_and(|status| *status != TradingStatus::Online);

        let scenario = if status_down || (!failures.is_empty() && share(&[ErrorClass::Maintenance]) >= DOMINANT_SHARE) {
            Scenario::Maintenance
        } else if !failures.is_empty() && share(&[ErrorClass::RateLimited]) >= DOMINANT_SHARE {
            Scenario::RateLimiting
        } else if private_auth && public_ok && !public_failed {
            Scenario::Authentication
        } else if !failures.is_empty() && share(&[ErrorClass::Network, ErrorClass::Timeout]) >= DOMINANT_SHARE {
            Scenario::Network
        } else if !failures.is_empty() && share(&[ErrorClass::ServerError, ErrorClass::BadResponse]) >= DOMINANT_SHARE {
            Scenario::ExchangeErrors
        } else {
            Scenario::Mixed
        };
        Diagnosis { scenario, summary: self.summary(scenario, actions), evidence: self.evidence(now, &by_class) }
    }

    fn summary(&self, scenario: Scenario, actions: &Actions) -> String {
        let status = self.status().map(TradingStatus::as_text).unwrap_or("unknown");
        match scenario {
            Scenario::Maintenance => format!(
                "Scenario A, maintenance: Kraken's SystemStatus is {status}; calls answer EService:Unavailable. \
                 Check status.kraken.com for the window and tell customers purchases are delayed."
            ),
            Scenario::RateLimiting => format!(
                "Scenario B, rate limiting: Kraken refuses our rate. exwatch lowered its call rate: factor now {}.",
                actions.rate_factor
            ),
            Scenario::Authentication => match &actions.private_paused {
                Some((remaining, reason)) => format!(
                    "Scenario C, authentication: private calls are refused while public calls work. Private calls are \
                     paused for {} to avoid a lockout ({reason}). Verify or rotate the API key.",
                    humantime::format_duration(Duration::from_secs(remaining.as_secs()))
                ),
                None => "Scenario C, authentication: private calls are refused while public calls work. Verify or \
                         rotate the API key; repeated invalid keys will pause private calls."
                    .to_owned(),
            },
            Scenario::Network => "Scenario D, network: DNS, connection or timeout failures; Kraken may be fine. \
                                  Check connectivity from this cluster."
                .to_owned(),
            Scenario::ExchangeErrors => {
                "Kraken or its CDN is failing: 5xx, Cloudflare pages or non-API answers.".to_owned()
            }
            Scenario::Mixed => "Failures of several kinds; see the evidence.".to_owned(),
        }
    }

    fn evidence(&self, now: Instant, by_class: &BTreeMap<ErrorClass, usize>) -> String {
        let failed: usize = by_class.values().sum();
        let classes = by_class.iter().map(|(class, count)| format!("{class} {count}")).collect::<Vec<_>>().join(", ");
        let mut text =
            format!("last {}: {} calls, {failed} failed", humantime::format_duration(self.window), self.calls.len());
        if !classes.is_empty() {
            text.push_str(&format!(" ({classes})"));
        }
        let mut errors: Vec<String> = Vec::new();
        let mut statuses: BTreeMap<u16, usize> = BTreeMap::new();
        for call in self.calls.iter().rev() {
            if let Some((_, status, strings)) = &call.failure {
                if let Some(status) = status {
                    *statuses.entry(*status).or_default() += 1;
                }
                for string in strings {
                    let entry = format!(
                        "{string} ({}, {}s ago)",
                        call.endpoint,
                        now.saturating_duration_since(call.at).as_secs()
                    );
                    if errors.len() < 3 && !errors.iter().any(|seen| seen.starts_with(string.as_str())) {
                        errors.push(entry);
                    }
                }
            }
        }
        if !errors.is_empty() {
            text.push_str(&format!("; last errors: {}", errors.join(", ")));
        }
        if !statuses.is_empty() {
            let statuses =
                statuses.iter().map(|(status, count)| format!("{status}×{count}")).collect::<Vec<_>>().join(", ");
            text.push_str(&format!("; HTTP statuses: {statuses}"));
        }
        if let Some(status) = self.status() {
            text.push_str(&format!("; SystemStatus {}", status.as_text()));
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure(class: ErrorClass, strings: &[&str], status: Option<u16>) -> Result<(), Error> {
        let mut error =
            Error::new(class, "failed").with_exchange_errors(strings.iter().map(|text| text.to_string()).collect());
        error.http_status = status;
        Err(error)
    }

    fn actions() -> Actions {
        Actions { rate_factor: 1.0, private_paused: None }
    }

    #[test]
    fn maintenance_is_scenario_a() {
        let mut evidence = Evidence::new(Duration::from_secs(300));
        let now = Instant::now();
        evidence.record_status(now, TradingStatus::Maintenance);
        evidence.record(now, Endpoint::Ticker, &failure(ErrorClass::Maintenance, &["EService:Unavailable"], Some(200)));
        let diagnosis = evidence.diagnose(now, &actions());
        assert_eq!(diagnosis.scenario, Scenario::Maintenance);
        assert!(diagnosis.evidence.contains("maintenance 1"), "{}", diagnosis.evidence);
        assert!(diagnosis.evidence.contains("EService:Unavailable (Ticker, 0s ago)"), "{}", diagnosis.evidence);
        assert!(diagnosis.evidence.contains("SystemStatus maintenance"), "{}", diagnosis.evidence);
    }

    #[test]
    fn rate_limiting_is_scenario_b_and_says_what_exwatch_did() {
        let mut evidence = Evidence::new(Duration::from_secs(300));
        let now = Instant::now();
        for _ in 0..3 {
            evidence.record(
                now,
                Endpoint::Ticker,
                &failure(ErrorClass::RateLimited, &["EAPI:Rate limit exceeded"], None),
            );
        }
        let diagnosis = evidence.diagnose(now, &Actions { rate_factor: 0.5, private_paused: None });
        assert_eq!(diagnosis.scenario, Scenario::RateLimiting);
        assert!(diagnosis.summary.contains("factor now 0.5"), "{}", diagnosis.summary);
    }

    #[test]
    fn private_auth_failures_with_healthy_public_calls_are_scenario_c() {
        let mut evidence = Evidence::new(Duration::from_secs(300));
        let now = Instant::now();
        evidence.record_status(now, TradingStatus::Online);
        evidence.record(now, Endpoint::Ticker, &Ok(()));
        evidence.record(now, Endpoint::SystemStatus, &Ok(()));
        evidence.record(now, Endpoint::Balance, &failure(ErrorClass::Auth, &["EAPI:Invalid key"], None));
        let paused = Some((Duration::from_secs(840), "2 consecutive invalid-key answers".to_owned()));
        let diagnosis = evidence.diagnose(now, &Actions { rate_factor: 1.0, private_paused: paused });
        assert_eq!(diagnosis.scenario, Scenario::Authentication);
        assert!(diagnosis.summary.contains("paused for 14m to avoid a lockout"), "{}", diagnosis.summary);
    }

    #[test]
    fn resets_and_timeouts_are_scenario_d() {
        let mut evidence = Evidence::new(Duration::from_secs(300));
        let now = Instant::now();
        evidence.record(now, Endpoint::Ticker, &failure(ErrorClass::Network, &[], None));
        evidence.record(now, Endpoint::SystemStatus, &failure(ErrorClass::Timeout, &[], None));
        assert_eq!(evidence.diagnose(now, &actions()).scenario, Scenario::Network);
    }

    #[test]
    fn cloudflare_pages_are_exchange_errors_and_old_calls_leave_the_window() {
        let mut evidence = Evidence::new(Duration::from_secs(300));
        let start = Instant::now();
        evidence.record(start, Endpoint::Ticker, &failure(ErrorClass::Network, &[], None));
        let later = start + Duration::from_secs(301);
        evidence.record(later, Endpoint::Ticker, &failure(ErrorClass::ServerError, &[], Some(520)));
        let diagnosis = evidence.diagnose(later, &actions());
        assert_eq!(diagnosis.scenario, Scenario::ExchangeErrors);
        assert!(diagnosis.evidence.contains("HTTP statuses: 520×1"), "{}", diagnosis.evidence);
        assert!(diagnosis.evidence.starts_with("last 5m: 1 calls, 1 failed"), "{}", diagnosis.evidence);
    }

    #[test]
    fn no_dominant_cause_is_mixed() {
        let mut evidence = Evidence::new(Duration::from_secs(300));
        let now = Instant::now();
        for class in [ErrorClass::Network, ErrorClass::ServerError, ErrorClass::RateLimited, ErrorClass::Auth] {
            evidence.record(now, Endpoint::Ticker, &failure(class, &[], None));
        }
        assert_eq!(evidence.diagnose(now, &actions()).scenario, Scenario::Mixed);
    }
}
