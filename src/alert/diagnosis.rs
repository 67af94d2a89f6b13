//! Diagnosis: the runbook's four scenarios made automatic. It names the scenario on-call is in (A `maintenance`,
//! B `rate_limiting`, C `authentication`, D `network`, plus `exchange_errors`, `invalid_request`, `slow` and
//! `mixed`), says what exwatch already did about it, and writes the evidence (counts by class over the window, what
//! is failing now, the last exchange error strings and HTTP statuses, or for slowness where the time goes).
//!
//! The scenario follows what is failing now: the latest call of each endpoint within the window (and the exchange's
//! latest SystemStatus). The rest of the window is context for the evidence, and decides only when nothing is
//! failing now (during recovery). So an invalid key seconds after a maintenance episode is scenario C, not A.
//! Pure: it takes `now`, does no I/O. Bounded: at most [`MAX_OBSERVATIONS`] calls, each keeping at most
//! [`MAX_KEPT_ERRORS`] error strings of [`MAX_EVIDENCE_ERROR_BYTES`], and evidence of [`MAX_EVIDENCE_BYTES`].

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

use crate::exchange::{Endpoint, Error, ErrorClass, Profile, TradingStatus};
use crate::text;

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
    /// Our request is wrong: 404, 400, 405, `EGeneral:Unknown method`, `EQuery:Unknown asset pair`.
    InvalidRequest,
    /// Successful calls, but slow (`exchange_api_slow`).
    Slow,
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
            Scenario::InvalidRequest => "invalid_request",
            Scenario::Slow => "slow",
            Scenario::Mixed => "mixed",
        }
    }
}

impl fmt::Display for Scenario {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.as_str())
    }
}

/// The most calls the evidence keeps, whatever the window and the interval.
pub const MAX_OBSERVATIONS: usize = 4096;
/// The most exchange error strings kept per call.
pub const MAX_KEPT_ERRORS: usize = 2;
/// The most bytes kept of each exchange error string.
pub const MAX_EVIDENCE_ERROR_BYTES: usize = 256;
/// The most bytes of the evidence text (an annotation, and a field of `/api/v1/status`).
pub const MAX_EVIDENCE_BYTES: usize = 2048;

/// One call as diagnosis sees it.
#[derive(Debug, Clone)]
struct Observation {
    at: Instant,
    endpoint: Endpoint,
    latency: Duration,
    failure: Option<Failure>,
}

#[derive(Debug, Clone)]
struct Failure {
    class: ErrorClass,
    http_status: Option<u16>,
    /// The first [`MAX_KEPT_ERRORS`] exchange error strings, bounded.
    strings: Vec<String>,
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
    /// Counts by class over the window, what fails now, the last exchange error strings and HTTP statuses; for
    /// slowness, the latency of each endpoint. At most [`MAX_EVIDENCE_BYTES`].
    pub evidence: String,
}

/// The recent calls of one exchange.
#[derive(Debug, Clone)]
pub struct Evidence {
    window: Duration,
    /// The exchange's kind: its name for people and its status page, for the summaries.
    profile: &'static Profile,
    calls: VecDeque<Observation>,
    /// The last SystemStatus read within the window, and when: a status older than the window says nothing
    /// about now (while the breaker is open no SystemStatus is read at all).
    last_status: Option<(Instant, TradingStatus)>,
}

/// A share of the failures at or above which one cause is named.
const DOMINANT_SHARE: f64 = 0.5;

impl Evidence {
    pub fn new(window: Duration, profile: &'static Profile) -> Evidence {
        Evidence { window, profile, calls: VecDeque::new(), last_status: None }
    }

    pub fn record(&mut self, now: Instant, endpoint: Endpoint, latency: Duration, result: &Result<(), Error>) {
        let failure = result.as_ref().err().map(|error| Failure {
            class: error.class,
            http_status: error.http_status,
            strings: error
                .exchange_errors
                .iter()
                .take(MAX_KEPT_ERRORS)
                .map(|string| text::bounded(string, MAX_EVIDENCE_ERROR_BYTES).into_owned())
                .collect(),
        });
        self.calls.push_back(Observation { at: now, endpoint, latency, failure });
        if self.calls.len() > MAX_OBSERVATIONS {
            self.calls.pop_front();
        }
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

    /// The latest call of each endpoint within the window: what the exchange looks like now.
    fn latest(&self) -> Vec<&Observation> {
        let mut latest: BTreeMap<Endpoint, &Observation> = BTreeMap::new();
        for call in self.calls.iter().rev() {
            latest.entry(call.endpoint).or_insert(call);
        }
        latest.into_values().collect()
    }

    /// The scenario of `exchange_api_down`: from what fails now, or, when nothing does, from the whole window.
    pub fn diagnose(&mut self, now: Instant, actions: &Actions) -> Diagnosis {
        self.evict(now);
        let latest = self.latest();
        let failing_now = latest.iter().any(|call| call.failure.is_some());
        let basis: Vec<&Observation> =
            if failing_now || actions.private_paused.is_some() { latest.clone() } else { self.calls.iter().collect() };
        let scenario = self.scenario(&basis, actions);
        let by_class = self.by_class();
        let mut evidence = self.evidence(now, &by_class);
        let now_failing: Vec<String> = latest
            .iter()
            .filter_map(|call| call.failure.as_ref().map(|failure| format!("{} {}", call.endpoint, failure.class)))
            .collect();
        if !now_failing.is_empty() {
            evidence.push_str(&format!("; failing now: {}", now_failing.join(", ")));
        }
        Diagnosis {
            scenario,
            summary: self.summary(scenario, actions, &latest),
            evidence: text::bounded(&evidence, MAX_EVIDENCE_BYTES).into_owned(),
        }
    }

    /// The scenario of `exchange_api_slow`: slowness, whatever failed around it, with where the time goes.
    pub fn diagnose_slow(&mut self, now: Instant, average: Option<Duration>) -> Diagnosis {
        self.evict(now);
        // Per endpoint: (total latency, slowest, count) of its successful calls.
        let mut by_endpoint: BTreeMap<Endpoint, (Duration, Duration, u32)> = BTreeMap::new();
        for call in self.calls.iter().filter(|call| call.failure.is_none()) {
            let entry = by_endpoint.entry(call.endpoint).or_default();
            entry.0 += call.latency;
            entry.1 = entry.1.max(call.latency);
            entry.2 += 1;
        }
        let mut endpoints: Vec<(Endpoint, Duration, Duration, u32)> = by_endpoint
            .into_iter()
            .map(|(endpoint, (total, slowest, count))| (endpoint, total / count.max(1), slowest, count))
            .collect();
        endpoints.sort_by_key(|(_, average, _, _)| std::cmp::Reverse(*average));
        let exchange = self.profile.display_name;
        let summary = match (average, endpoints.first()) {
            (Some(average), Some((slowest, slowest_average, _, _))) => format!(
                "{exchange} answers slowly: successful calls take {} ms on average, {slowest} the slowest at {} ms.",
                average.as_millis(),
                slowest_average.as_millis()
            ),
            _ => format!("{exchange} answers slowly."),
        };
        let mut evidence = self.evidence(now, &self.by_class());
        if !endpoints.is_empty() {
            let latencies = endpoints
                .iter()
                .map(|(endpoint, average, slowest, count)| {
                    format!("{endpoint} avg {} ms, max {} ms ({count})", average.as_millis(), slowest.as_millis())
                })
                .collect::<Vec<_>>()
                .join("; ");
            evidence.push_str(&format!("; successful calls by endpoint: {latencies}"));
        }
        Diagnosis {
            scenario: Scenario::Slow,
            summary,
            evidence: text::bounded(&evidence, MAX_EVIDENCE_BYTES).into_owned(),
        }
    }

    fn by_class(&self) -> BTreeMap<ErrorClass, usize> {
        let mut by_class: BTreeMap<ErrorClass, usize> = BTreeMap::new();
        for failure in self.calls.iter().filter_map(|call| call.failure.as_ref()) {
            *by_class.entry(failure.class).or_default() += 1;
        }
        by_class
    }

    /// The runbook's order of causes over `calls` (what fails now, or the window).
    fn scenario(&self, calls: &[&Observation], actions: &Actions) -> Scenario {
        let failures: Vec<&Failure> = calls.iter().filter_map(|call| call.failure.as_ref()).collect();
        let total = failures.len().max(1) as f64;
        let share = |classes: &[ErrorClass]| {
            failures.iter().filter(|failure| classes.contains(&failure.class)).count() as f64 / total
        };
        let dominant = |classes: &[ErrorClass]| !failures.is_empty() && share(classes) >= DOMINANT_SHARE;
        let public_ok = calls.iter().any(|call| !call.endpoint.is_private() && call.failure.is_none());
        let public_failed = calls.iter().any(|call| !call.endpoint.is_private() && call.failure.is_some());
        let private_auth = actions.private_paused.is_some()
            || calls.iter().any(|call| {
                call.endpoint.is_private()
                    && call.failure.as_ref().is_some_and(|failure| failure.class == ErrorClass::Auth)
            });
        let status_down = self.status().is_some_and(|status| *status != TradingStatus::Online);

        if status_down || dominant(&[ErrorClass::Maintenance]) {
            Scenario::Maintenance
        } else if dominant(&[ErrorClass::RateLimited]) {
            Scenario::RateLimiting
        } else if private_auth && public_ok && !public_failed {
            Scenario::Authentication
        } else if dominant(&[ErrorClass::Network, ErrorClass::Timeout]) {
            Scenario::Network
        } else if dominant(&[ErrorClass::ServerError, ErrorClass::BadResponse]) {
            Scenario::ExchangeErrors
        } else if dominant(&[ErrorClass::InvalidRequest]) {
            Scenario::InvalidRequest
        } else {
            Scenario::Mixed
        }
    }

    fn summary(&self, scenario: Scenario, actions: &Actions, latest: &[&Observation]) -> String {
        let status = self.status().map(TradingStatus::as_text).unwrap_or("unknown");
        let Profile { display_name: exchange, status_page, .. } = self.profile;
        match scenario {
            Scenario::Maintenance => format!(
                "Scenario A, maintenance: {exchange}'s SystemStatus is {status}; calls say the service is unavailable. \
                 Check {status_page} for the window and tell customers purchases are delayed."
            ),
            Scenario::RateLimiting => format!(
                "Scenario B, rate limiting: {exchange} refuses our rate. exwatch lowered its call rate: factor now {}.",
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
            Scenario::Network => format!(
                "Scenario D, network: DNS, connection or timeout failures; {exchange} may be fine. Check \
                 connectivity from this cluster."
            ),
            Scenario::ExchangeErrors => {
                format!("{exchange} or its CDN is failing: 5xx, Cloudflare pages or non-API answers.")
            }
            Scenario::InvalidRequest => {
                let endpoints: Vec<String> = latest
                    .iter()
                    .filter(|call| {
                        call.failure.as_ref().is_some_and(|failure| failure.class == ErrorClass::InvalidRequest)
                    })
                    .map(|call| call.endpoint.to_string())
                    .collect();
                format!(
                    "Our request is wrong: endpoint removed, pair delisted or a proxy in the way ({} refused as an \
                     invalid request). Check the configured pair and base_url; {exchange} itself may be fine.",
                    if endpoints.is_empty() { "calls".to_owned() } else { endpoints.join(", ") }
                )
            }
            Scenario::Slow => format!("{exchange} answers slowly."),
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
            if let Some(failure) = &call.failure {
                if let Some(status) = failure.http_status {
                    *statuses.entry(status).or_default() += 1;
                }
                for string in &failure.strings {
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
    use crate::exchange::Kind;

    /// Evidence over five minutes of a Kraken exchange.
    fn evidence() -> Evidence {
        Evidence::new(Duration::from_secs(300), Kind::Kraken.profile())
    }

    fn failure(class: ErrorClass, strings: &[&str], status: Option<u16>) -> Result<(), Error> {
        let mut error =
            Error::new(class, "failed").with_exchange_errors(strings.iter().map(|text| text.to_string()).collect());
        error.http_status = status;
        Err(error)
    }

    const FAST: Duration = Duration::from_millis(100);

    fn actions() -> Actions {
        Actions { rate_factor: 1.0, private_paused: None }
    }

    #[test]
    fn maintenance_is_scenario_a() {
        let mut evidence = evidence();
        let now = Instant::now();
        evidence.record_status(now, TradingStatus::Maintenance);
        evidence.record(
            now,
            Endpoint::Ticker,
            FAST,
            &failure(ErrorClass::Maintenance, &["EService:Unavailable"], Some(200)),
        );
        let diagnosis = evidence.diagnose(now, &actions());
        assert_eq!(diagnosis.scenario, Scenario::Maintenance);
        assert!(diagnosis.evidence.contains("maintenance 1"), "{}", diagnosis.evidence);
        assert!(diagnosis.evidence.contains("EService:Unavailable (Ticker, 0s ago)"), "{}", diagnosis.evidence);
        assert!(diagnosis.evidence.contains("SystemStatus maintenance"), "{}", diagnosis.evidence);
    }

    #[test]
    fn rate_limiting_is_scenario_b_and_says_what_exwatch_did() {
        let mut evidence = evidence();
        let now = Instant::now();
        for _ in 0..3 {
            evidence.record(
                now,
                Endpoint::Ticker,
                FAST,
                &failure(ErrorClass::RateLimited, &["EAPI:Rate limit exceeded"], None),
            );
        }
        let diagnosis = evidence.diagnose(now, &Actions { rate_factor: 0.5, private_paused: None });
        assert_eq!(diagnosis.scenario, Scenario::RateLimiting);
        assert!(diagnosis.summary.contains("factor now 0.5"), "{}", diagnosis.summary);
    }

    #[test]
    fn private_auth_failures_with_healthy_public_calls_are_scenario_c() {
        let mut evidence = evidence();
        let now = Instant::now();
        evidence.record_status(now, TradingStatus::Online);
        evidence.record(now, Endpoint::Ticker, FAST, &Ok(()));
        evidence.record(now, Endpoint::SystemStatus, FAST, &Ok(()));
        evidence.record(now, Endpoint::Balance, FAST, &failure(ErrorClass::Auth, &["EAPI:Invalid key"], None));
        let paused = Some((Duration::from_secs(840), "2 consecutive invalid-key answers".to_owned()));
        let diagnosis = evidence.diagnose(now, &Actions { rate_factor: 1.0, private_paused: paused });
        assert_eq!(diagnosis.scenario, Scenario::Authentication);
        assert!(diagnosis.summary.contains("paused for 14m to avoid a lockout"), "{}", diagnosis.summary);
    }

    #[test]
    fn resets_and_timeouts_are_scenario_d() {
        let mut evidence = evidence();
        let now = Instant::now();
        evidence.record(now, Endpoint::Ticker, FAST, &failure(ErrorClass::Network, &[], None));
        evidence.record(now, Endpoint::SystemStatus, FAST, &failure(ErrorClass::Timeout, &[], None));
        assert_eq!(evidence.diagnose(now, &actions()).scenario, Scenario::Network);
    }

    #[test]
    fn cloudflare_pages_are_exchange_errors_and_old_calls_leave_the_window() {
        let mut evidence = evidence();
        let start = Instant::now();
        evidence.record(start, Endpoint::Ticker, FAST, &failure(ErrorClass::Network, &[], None));
        let later = start + Duration::from_secs(301);
        evidence.record(later, Endpoint::Ticker, FAST, &failure(ErrorClass::ServerError, &[], Some(520)));
        let diagnosis = evidence.diagnose(later, &actions());
        assert_eq!(diagnosis.scenario, Scenario::ExchangeErrors);
        assert!(diagnosis.evidence.contains("HTTP statuses: 520×1"), "{}", diagnosis.evidence);
        assert!(diagnosis.evidence.starts_with("last 5m: 1 calls, 1 failed"), "{}", diagnosis.evidence);
    }

    #[test]
    fn no_dominant_cause_is_mixed() {
        let mut evidence = evidence();
        let now = Instant::now();
        for class in [ErrorClass::Network, ErrorClass::ServerError, ErrorClass::RateLimited, ErrorClass::Auth] {
            evidence.record(now, Endpoint::Ticker, FAST, &failure(class, &[], None));
        }
        assert_eq!(evidence.diagnose(now, &actions()).scenario, Scenario::Mixed);
    }

    #[test]
    fn an_invalid_key_right_after_maintenance_is_scenario_c_not_a() {
        let mut evidence = evidence();
        let start = Instant::now();
        // Two minutes of maintenance: every call fails, most of the window is maintenance.
        for poll in 0..4 {
            let at = start + Duration::from_secs(30 * poll);
            evidence.record_status(at, TradingStatus::Maintenance);
            let unavailable = failure(ErrorClass::Maintenance, &["EService:Unavailable"], None);
            for endpoint in [Endpoint::Ticker, Endpoint::SystemStatus, Endpoint::Balance] {
                evidence.record(at, endpoint, FAST, &unavailable);
            }
        }
        // Then Kraken is back, but the key is refused.
        let now = start + Duration::from_secs(150);
        evidence.record_status(now, TradingStatus::Online);
        evidence.record(now, Endpoint::Ticker, FAST, &Ok(()));
        evidence.record(now, Endpoint::SystemStatus, FAST, &Ok(()));
        evidence.record(now, Endpoint::Balance, FAST, &failure(ErrorClass::Auth, &["EAPI:Invalid key"], None));
        let diagnosis = evidence.diagnose(now, &actions());
        assert_eq!(diagnosis.scenario, Scenario::Authentication, "{diagnosis:?}");
        // The window stays as context.
        assert!(diagnosis.evidence.contains("maintenance 12"), "{}", diagnosis.evidence);
        assert!(diagnosis.evidence.contains("failing now: Balance auth"), "{}", diagnosis.evidence);
    }

    #[test]
    fn the_scenario_follows_what_fails_now_and_the_window_when_nothing_does() {
        let mut evidence = evidence();
        let start = Instant::now();
        for poll in 0..6 {
            let at = start + Duration::from_secs(30 * poll);
            evidence.record(at, Endpoint::Ticker, FAST, &failure(ErrorClass::Network, &[], None));
        }
        let now = start + Duration::from_secs(180);
        evidence.record(now, Endpoint::Ticker, FAST, &failure(ErrorClass::ServerError, &["EService:Busy"], None));
        assert_eq!(evidence.diagnose(now, &actions()).scenario, Scenario::ExchangeErrors);
        // Recovering: nothing fails now, so the window's majority names what the incident was.
        let later = now + Duration::from_secs(30);
        evidence.record(later, Endpoint::Ticker, FAST, &Ok(()));
        assert_eq!(evidence.diagnose(later, &actions()).scenario, Scenario::Network);
    }

    #[test]
    fn invalid_requests_are_their_own_scenario() {
        let mut evidence = evidence();
        let now = Instant::now();
        evidence.record(now, Endpoint::SystemStatus, FAST, &Ok(()));
        let unknown_pair = failure(ErrorClass::InvalidRequest, &["EQuery:Unknown asset pair"], None);
        evidence.record(now, Endpoint::Ticker, FAST, &unknown_pair);
        let diagnosis = evidence.diagnose(now, &actions());
        assert_eq!(diagnosis.scenario, Scenario::InvalidRequest);
        assert_eq!(diagnosis.scenario.as_str(), "invalid_request");
        assert!(
            diagnosis.summary.starts_with("Our request is wrong: endpoint removed, pair delisted"),
            "{}",
            diagnosis.summary
        );
        assert!(diagnosis.summary.contains("(Ticker refused"), "{}", diagnosis.summary);
        assert!(diagnosis.evidence.contains("EQuery:Unknown asset pair (Ticker, 0s ago)"), "{}", diagnosis.evidence);
    }

    #[test]
    fn slowness_without_failures_is_slow_and_says_where_the_time_goes() {
        let mut evidence = evidence();
        let now = Instant::now();
        for _ in 0..3 {
            evidence.record(now, Endpoint::Ticker, Duration::from_millis(4200), &Ok(()));
            evidence.record(now, Endpoint::SystemStatus, Duration::from_millis(300), &Ok(()));
        }
        let diagnosis = evidence.diagnose_slow(now, Some(Duration::from_millis(2250)));
        assert_eq!(diagnosis.scenario, Scenario::Slow);
        assert!(
            diagnosis.summary.contains("2250 ms on average, Ticker the slowest at 4200 ms"),
            "{}",
            diagnosis.summary
        );
        assert!(
            diagnosis.evidence.ends_with(
                "successful calls by endpoint: Ticker avg 4200 ms, max 4200 ms (3); SystemStatus avg 300 ms, max 300 ms (3)"
            ),
            "{}",
            diagnosis.evidence
        );
        assert!(diagnosis.evidence.starts_with("last 5m: 6 calls, 0 failed"), "{}", diagnosis.evidence);
    }

    #[test]
    fn evidence_is_bounded_in_calls_and_bytes() {
        let mut evidence = evidence();
        let now = Instant::now();
        let huge = failure(
            ErrorClass::ServerError,
            &["E".repeat(900_000).as_str(), "F".repeat(900_000).as_str(), "G"],
            Some(500),
        );
        for _ in 0..(MAX_OBSERVATIONS + 10) {
            evidence.record(now, Endpoint::Ticker, FAST, &huge);
        }
        assert_eq!(evidence.calls.len(), MAX_OBSERVATIONS);
        assert!(evidence.calls.iter().all(|call| {
            let strings = &call.failure.as_ref().unwrap().strings;
            strings.len() == MAX_KEPT_ERRORS && strings.iter().all(|string| string.len() <= MAX_EVIDENCE_ERROR_BYTES)
        }));
        let diagnosis = evidence.diagnose(now, &actions());
        assert!(diagnosis.evidence.len() <= MAX_EVIDENCE_BYTES, "{}", diagnosis.evidence.len());
        assert!(diagnosis.evidence.contains("… [truncated, "), "{}", diagnosis.evidence);
    }

    #[test]
    fn summaries_name_the_exchange_and_its_status_page_from_its_kind() {
        static OTHER: Profile = Profile {
            id: "otherex",
            display_name: "OtherEx",
            default_base_url: "https://api.otherex.example",
            default_pair: "BTC-AUD",
            status_page: "https://status.otherex.example",
            statuspage_components: &[],
            rate_budget: crate::exchange::RateBudget {
                public_per_second: 1.0,
                public_burst: 1,
                private_per_second: 1.0,
                private_burst: 1,
            },
            check_pair: |_| Ok(()),
            check_secret: |_| Ok(()),
        };
        let mut evidence = Evidence::new(Duration::from_secs(300), &OTHER);
        let now = Instant::now();
        evidence.record_status(now, TradingStatus::Maintenance);
        evidence.record(now, Endpoint::Ticker, FAST, &failure(ErrorClass::Maintenance, &[], Some(503)));
        let summary = evidence.diagnose(now, &actions()).summary;
        assert!(summary.contains("OtherEx's SystemStatus is maintenance"), "{summary}");
        assert!(summary.contains("Check https://status.otherex.example"), "{summary}");
        evidence.record(now, Endpoint::Ticker, Duration::from_secs(6), &Ok(()));
        let slow = evidence.diagnose_slow(now, Some(Duration::from_secs(6))).summary;
        assert!(slow.starts_with("OtherEx answers slowly"), "{slow}");
        for text in [summary, slow] {
            assert!(!text.contains("Kraken") && !text.contains("kraken"), "{text}");
        }
    }
}
