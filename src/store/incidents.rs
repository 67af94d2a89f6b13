//! `incidents`: one row per alert episode, opened when `exchange_api_down` fires, updated while it lasts, resolved
//! when it clears; and the post-incident report computed from the calls in its window. Every statement on this
//! table is here, once for both backends.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::CallRecord;
use super::alerts::Tally;
use super::database::{Database, Error, OptionalTime, Time, before, execute, fetch};
use super::text;

const OPEN_INCIDENT: &str = "INSERT INTO incidents (provider, alertname, scenario, started_at, first_error, last_error) \
    VALUES ($1, $2, $3, $4, $5, $5) ON CONFLICT (provider, alertname) WHERE resolved_at IS NULL DO NOTHING RETURNING id";
const OPEN_INCIDENT_ID: &str =
    "SELECT id FROM incidents WHERE provider = $1 AND alertname = $2 AND resolved_at IS NULL";
/// An update adding a tally to the incidents `$where` selects: its scenario now, its latest error (also the first
/// one if none was recorded) and its calls. `$1` to `$4` are the tally; the selection's values follow.
macro_rules! add_tally {
    ($where:literal) => {
        concat!(
            "UPDATE incidents SET scenario = $1, last_error = COALESCE($2, last_error), ",
            "first_error = COALESCE(first_error, $2), failed_calls = failed_calls + $3, ",
            "total_calls = total_calls + $4 WHERE ",
            $where
        )
    };
}
const UPDATE_INCIDENT: &str = add_tally!("id = $5");
const UPDATE_OPEN_INCIDENT: &str = add_tally!("provider = $5 AND alertname = $6 AND resolved_at IS NULL");
const RESOLVE_INCIDENT: &str = "UPDATE incidents SET resolved_at = $2 WHERE id = $1 AND resolved_at IS NULL";
const OPEN_INCIDENTS: &str = "SELECT * FROM incidents WHERE resolved_at IS NULL ORDER BY started_at DESC, id DESC";
const LIST_INCIDENTS: &str = "SELECT * FROM incidents WHERE started_at > $1 OR resolved_at IS NULL \
    OR resolved_at > $1 ORDER BY started_at DESC, id DESC";
const INCIDENT: &str = "SELECT * FROM incidents WHERE id = $1";

/// One row of `incidents`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct Incident {
    pub id: i64,
    pub provider: String,
    pub alertname: String,
    /// The runbook scenario diagnosed, kept current while the incident is open (`alert::diagnosis::Scenario`).
    pub scenario: String,
    #[sqlx(try_from = "Time")]
    pub started_at: DateTime<Utc>,
    /// `None` while the incident is open.
    #[sqlx(try_from = "OptionalTime")]
    pub resolved_at: Option<DateTime<Utc>>,
    pub first_error: Option<String>,
    pub last_error: Option<String>,
    pub failed_calls: i64,
    pub total_calls: i64,
}

/// What happened during an incident, computed from `api_call_logs` between its start (the first failure of the
/// streak that caused it) and its end (or now).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct IncidentReport {
    pub incident: Incident,
    /// `resolved_at`, or the time of the report for an open incident.
    pub window_end: DateTime<Utc>,
    /// Calls sent, and how many of them failed. Calls the breaker refused were never sent: they are counted in
    /// `not_sent_calls` only, as the incident row counts them.
    pub total_calls: u64,
    pub failed_calls: u64,
    pub not_sent_calls: u64,
    /// Failed calls per `error_class` (`unclassified` when none was recorded), most first.
    pub failures_by_class: Vec<Count>,
    /// Failed calls per endpoint, most first.
    pub failures_by_endpoint: Vec<Count>,
    /// Over every call sent in the window, failed or not; `None` when none was sent.
    pub response_time: Option<Latency>,
    pub first_error: Option<ErrorSample>,
    pub last_error: Option<ErrorSample>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Count {
    pub name: String,
    pub calls: u64,
}

/// Response-time percentiles in milliseconds (nearest rank).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Latency {
    pub p50: i64,
    pub p95: i64,
    pub max: i64,
}

/// One failed call, as the report shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ErrorSample {
    pub created_at: DateTime<Utc>,
    pub endpoint: String,
    pub error_class: Option<String>,
    pub error_message: Option<String>,
}

impl Database {
    /// Opens an incident for `provider` and `alertname`, or returns the one already open (a second replica or a
    /// repeated alert does not open another: a partial unique index allows one open incident per pair).
    pub async fn open_incident(
        &self,
        provider: &str,
        alertname: &str,
        scenario: &str,
        started_at: DateTime<Utc>,
        first_error: Option<&str>,
    ) -> Result<i64, Error> {
        let (provider, alertname) = (text(provider), text(alertname));
        // The open incident may be resolved between our conflicting insert and the select; then insert again.
        for _ in 0..3 {
            let inserted = fetch!(
                self,
                fetch_optional,
                (i64,),
                OPEN_INCIDENT,
                &provider,
                &alertname,
                text(scenario),
                Time(started_at),
                first_error.map(text)
            )?;
            let id = match inserted {
                Some((id,)) => Some(id),
                None => fetch!(self, fetch_optional, (i64,), OPEN_INCIDENT_ID, &provider, &alertname)?.map(|(id,)| id),
            };
            if let Some(id) = id {
                return Ok(id);
            }
        }
        Err(Error::Query(format!("cannot open an incident for {provider}/{alertname}: it kept being resolved")))
    }

    /// Records progress on an incident: the current scenario, the latest error (also the first one if none was
    /// recorded yet) and more calls counted. Returns whether the incident exists.
    pub async fn update_incident(
        &self,
        id: i64,
        scenario: &str,
        last_error: Option<&str>,
        failed_calls_delta: i64,
        total_calls_delta: i64,
    ) -> Result<bool, Error> {
        let updated = execute!(
            self,
            UPDATE_INCIDENT,
            text(scenario),
            last_error.map(text),
            failed_calls_delta,
            total_calls_delta,
            id
        )?;
        Ok(updated == 1)
    }

    /// Adds a tally to the open incident of `provider` and `alertname`: its calls, its scenario now, its latest
    /// error (also the first one if none was recorded). Returns whether an open incident took it.
    pub async fn update_open_incident(
        &self,
        provider: &str,
        alertname: &str,
        scenario: &str,
        tally: &Tally,
    ) -> Result<bool, Error> {
        let updated = execute!(
            self,
            UPDATE_OPEN_INCIDENT,
            text(scenario),
            tally.last_error.as_deref().map(text),
            tally.failed_calls,
            tally.total_calls,
            text(provider),
            text(alertname)
        )?;
        Ok(updated == 1)
    }

    /// Marks an open incident resolved. Returns `false` when there is no such open incident (already resolved).
    pub async fn resolve_incident(&self, id: i64, resolved_at: DateTime<Utc>) -> Result<bool, Error> {
        Ok(execute!(self, RESOLVE_INCIDENT, id, Time(resolved_at))? == 1)
    }

    /// Every incident still open, newest first.
    pub async fn open_incidents(&self) -> Result<Vec<Incident>, Error> {
        fetch!(self, fetch_all, Incident, OPEN_INCIDENTS)
    }

    /// Incidents that overlap the last `since`: started in it, resolved in it, or still open. Newest first.
    pub async fn list_incidents(&self, since: Duration) -> Result<Vec<Incident>, Error> {
        fetch!(self, fetch_all, Incident, LIST_INCIDENTS, Time(before(Utc::now(), since)))
    }

    pub async fn incident(&self, id: i64) -> Result<Option<Incident>, Error> {
        fetch!(self, fetch_optional, Incident, INCIDENT, id)
    }

    /// The report of incident `id` from the provider's calls between its start and its end (or now);
    /// `None` when there is no such incident.
    pub async fn incident_report(&self, id: i64) -> Result<Option<IncidentReport>, Error> {
        let Some(incident) = self.incident(id).await? else {
            return Ok(None);
        };
        let window_end = incident.resolved_at.unwrap_or_else(Utc::now);
        let calls = self.calls_between(&incident.provider, incident.started_at, window_end).await?;
        Ok(Some(IncidentReport::from_calls(incident, window_end, &calls)))
    }
}

impl IncidentReport {
    /// Computes the report from the calls in the incident's window (in any order).
    pub fn from_calls(incident: Incident, window_end: DateTime<Utc>, calls: &[CallRecord]) -> IncidentReport {
        let is_sent = |call: &&CallRecord| call.error_class.as_deref() != Some(super::NOT_PERMITTED);
        let not_sent_calls = calls.iter().filter(|call| !is_sent(call)).count() as u64;
        let calls: Vec<&CallRecord> = calls.iter().filter(is_sent).collect();
        let mut by_class: std::collections::BTreeMap<String, u64> = Default::default();
        let mut by_endpoint: std::collections::BTreeMap<String, u64> = Default::default();
        let mut first_error: Option<&CallRecord> = None;
        let mut last_error: Option<&CallRecord> = None;
        for call in calls.iter().copied().filter(|call| !call.success) {
            let class = call.error_class.clone().unwrap_or_else(|| "unclassified".to_owned());
            *by_class.entry(class).or_default() += 1;
            *by_endpoint.entry(call.endpoint.clone()).or_default() += 1;
            if first_error.is_none_or(|first| call.created_at < first.created_at) {
                first_error = Some(call);
            }
            if last_error.is_none_or(|last| call.created_at >= last.created_at) {
                last_error = Some(call);
            }
        }
        let mut times: Vec<i64> = calls.iter().map(|call| call.response_time).collect();
        times.sort_unstable();
        let response_time =
            times.last().map(|&max| Latency { p50: nearest_rank(&times, 0.50), p95: nearest_rank(&times, 0.95), max });
        let failed_calls = by_class.values().sum();
        IncidentReport {
            incident,
            window_end,
            total_calls: calls.len() as u64,
            failed_calls,
            not_sent_calls,
            failures_by_class: most_first(by_class),
            failures_by_endpoint: most_first(by_endpoint),
            response_time,
            first_error: first_error.map(ErrorSample::of),
            last_error: last_error.map(ErrorSample::of),
        }
    }
}

impl ErrorSample {
    fn of(call: &CallRecord) -> ErrorSample {
        ErrorSample {
            created_at: call.created_at,
            endpoint: call.endpoint.clone(),
            error_class: call.error_class.clone(),
            error_message: call.error_message.clone(),
        }
    }
}

/// The nearest-rank percentile of sorted, non-empty `values`.
fn nearest_rank(values: &[i64], fraction: f64) -> i64 {
    let rank = (fraction * values.len() as f64).ceil() as usize;
    values[rank.clamp(1, values.len()) - 1]
}

fn most_first(counts: std::collections::BTreeMap<String, u64>) -> Vec<Count> {
    let mut counts: Vec<Count> = counts.into_iter().map(|(name, calls)| Count { name, calls }).collect();
    // Stable: equal counts stay in name order.
    counts.sort_by_key(|count| std::cmp::Reverse(count.calls));
    counts
}

#[cfg(test)]
mod tests {
    use chrono::TimeDelta;

    use super::*;

    fn call(endpoint: &str, success: bool, response_time: i64, class: Option<&str>, seconds: i64) -> CallRecord {
        CallRecord {
            success,
            response_time,
            error_message: (!success).then(|| format!("{endpoint} failed at {seconds}")),
            error_class: class.map(str::to_owned),
            ..CallRecord::new("kraken", "test", endpoint, DateTime::UNIX_EPOCH + TimeDelta::seconds(seconds))
        }
    }

    fn incident() -> Incident {
        Incident {
            id: 1,
            provider: "kraken".to_owned(),
            alertname: "ExchangeApiDown".to_owned(),
            scenario: "maintenance".to_owned(),
            started_at: DateTime::UNIX_EPOCH,
            resolved_at: None,
            first_error: None,
            last_error: None,
            failed_calls: 0,
            total_calls: 0,
        }
    }

    #[test]
    fn report_counts_failures_by_class_and_endpoint_with_nearest_rank_percentiles() {
        let calls: Vec<CallRecord> = (1..=20)
            .map(|second| call("Ticker", true, second * 10, None, second))
            .chain([
                call("Ticker", false, 5000, Some("timeout"), 30),
                call("Balance", false, 0, Some("auth"), 25),
                call("Ticker", false, 1000, Some("timeout"), 40),
                call("Depth", false, 7, None, 35),
            ])
            .collect();
        let report = IncidentReport::from_calls(incident(), DateTime::UNIX_EPOCH + TimeDelta::seconds(60), &calls);
        assert_eq!((report.total_calls, report.failed_calls), (24, 4));
        let classes: Vec<(&str, u64)> =
            report.failures_by_class.iter().map(|count| (count.name.as_str(), count.calls)).collect();
        assert_eq!(classes, [("timeout", 2), ("auth", 1), ("unclassified", 1)]);
        let endpoints: Vec<(&str, u64)> =
            report.failures_by_endpoint.iter().map(|count| (count.name.as_str(), count.calls)).collect();
        assert_eq!(endpoints, [("Ticker", 2), ("Balance", 1), ("Depth", 1)]);
        // 24 values: 0, 7, 10..200, 1000, 5000; p50 is the 12th (100), p95 the 23rd (1000).
        assert_eq!(report.response_time, Some(Latency { p50: 100, p95: 1000, max: 5000 }));
        let first = report.first_error.unwrap();
        assert_eq!((first.endpoint.as_str(), first.error_class.as_deref()), ("Balance", Some("auth")));
        let last = report.last_error.unwrap();
        assert_eq!(last.error_message.as_deref(), Some("Ticker failed at 40"));
    }

    #[test]
    fn calls_never_sent_are_counted_apart_and_never_enter_the_percentiles() {
        let mut refused = call("Ticker", false, 0, Some(crate::store::NOT_PERMITTED), 20);
        refused.error_message = Some("not sent: circuit breaker open".to_owned());
        let calls = vec![
            call("Ticker", false, 900, Some("timeout"), 10),
            refused.clone(),
            refused,
            call("Ticker", true, 1000, None, 30),
        ];
        let report = IncidentReport::from_calls(incident(), DateTime::UNIX_EPOCH + TimeDelta::seconds(60), &calls);
        assert_eq!((report.total_calls, report.failed_calls, report.not_sent_calls), (2, 1, 2));
        assert_eq!(report.response_time, Some(Latency { p50: 900, p95: 1000, max: 1000 }));
        let classes: Vec<&str> = report.failures_by_class.iter().map(|count| count.name.as_str()).collect();
        assert_eq!(classes, ["timeout"]);
        assert_eq!(report.last_error.unwrap().error_class.as_deref(), Some("timeout"));
    }

    #[test]
    fn a_report_without_calls_has_no_percentiles_or_errors() {
        let report = IncidentReport::from_calls(incident(), DateTime::UNIX_EPOCH, &[]);
        assert_eq!((report.total_calls, report.failed_calls), (0, 0));
        assert!(report.response_time.is_none() && report.first_error.is_none() && report.last_error.is_none());
    }

    #[test]
    fn nearest_rank_handles_one_value_and_exact_ranks() {
        assert_eq!(nearest_rank(&[42], 0.5), 42);
        assert_eq!(nearest_rank(&[42], 0.95), 42);
        let hundred: Vec<i64> = (1..=100).collect();
        assert_eq!((nearest_rank(&hundred, 0.5), nearest_rank(&hundred, 0.95)), (50, 95));
    }
}
