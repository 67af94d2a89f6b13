//! Text rendering of what the store returns, for `exwatch logs` and `exwatch incidents`: aligned tables that read
//! on a terminal and in a pasted incident channel. Pure functions of their input (and of `now` where a duration is
//! still running), so tests check the text without a terminal. JSON output is the types' `Serialize`, not here.

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::CallRecord;
use super::events::{MAX_TIMELINE_EVENTS, Timeline};
use super::incidents::{ErrorSample, Incident, IncidentReport};

/// The runbook query's rows as a table: created_at, endpoint, success, response time, error class, HTTP status and
/// error message (last, unpadded, since it is the long one).
pub fn render_calls(calls: &[CallRecord]) -> String {
    if calls.is_empty() {
        return "No calls found.\n".to_owned();
    }
    let rows = calls
        .iter()
        .map(|call| {
            vec![
                call_time(call.created_at),
                call.endpoint.clone(),
                call.success.to_string(),
                format!("{} ms", call.response_time),
                optional(call.error_class.as_deref()),
                call.http_status.map_or_else(|| "-".to_owned(), |status| status.to_string()),
                optional(call.error_message.as_deref()),
            ]
        })
        .collect();
    table(&["CREATED_AT", "ENDPOINT", "SUCCESS", "RESPONSE_TIME", "ERROR_CLASS", "HTTP_STATUS", "ERROR_MESSAGE"], rows)
}

/// Incidents as a table: id, provider, alert, scenario, start, end (or `open`) and duration (so far, if open).
pub fn render_incidents(incidents: &[Incident], now: DateTime<Utc>) -> String {
    if incidents.is_empty() {
        return "No incidents found.\n".to_owned();
    }
    let rows = incidents
        .iter()
        .map(|incident| {
            vec![
                incident.id.to_string(),
                incident.provider.clone(),
                incident.alertname.clone(),
                incident.scenario.clone(),
                incident_time(incident.started_at),
                incident.resolved_at.map_or_else(|| "open".to_owned(), incident_time),
                incident_duration(incident, now),
            ]
        })
        .collect();
    table(&["ID", "PROVIDER", "ALERTNAME", "SCENARIO", "STARTED", "ENDED", "DURATION"], rows)
}

/// One incident's report: the incident, call counts (sent, failed, not sent), latency of the calls sent, failures by
/// class and endpoint, first and last error.
pub fn render_incident_report(report: &IncidentReport) -> String {
    let incident = &report.incident;
    let mut text = format!(
        "Incident {}: {} {} (scenario {})\n",
        incident.id, incident.provider, incident.alertname, incident.scenario
    );
    let ended = match incident.resolved_at {
        Some(resolved_at) => incident_time(resolved_at),
        None => "open".to_owned(),
    };
    let summary = vec![
        vec!["started".to_owned(), incident_time(incident.started_at)],
        vec!["ended".to_owned(), ended],
        vec!["duration".to_owned(), incident_duration(incident, report.window_end)],
        vec!["calls".to_owned(), format!("{} total, {} failed", report.total_calls, report.failed_calls)],
        vec!["not sent".to_owned(), format!("{} (refused by the circuit breaker)", report.not_sent_calls)],
        vec![
            "response time".to_owned(),
            match report.response_time {
                Some(latency) => {
                    format!("p50 {} ms, p95 {} ms, max {} ms", latency.p50, latency.p95, latency.max)
                }
                None => "no calls in the window".to_owned(),
            },
        ],
        vec!["first error".to_owned(), error_sample(report.first_error.as_ref())],
        vec!["last error".to_owned(), error_sample(report.last_error.as_ref())],
    ];
    text.push_str(&indent(&table_without_header(summary)));
    for (title, counts) in [
        ("Failed calls by error class:", &report.failures_by_class),
        ("Failed calls by endpoint:", &report.failures_by_endpoint),
    ] {
        text.push_str(title);
        text.push('\n');
        if counts.is_empty() {
            text.push_str("  none\n");
        } else {
            let rows = counts.iter().map(|count| vec![count.name.clone(), count.calls.to_string()]).collect();
            text.push_str(&indent(&table_without_header(rows)));
        }
    }
    text
}

/// One incident as a story: a heading, then one line per event, oldest first, with the time since the start and the
/// replica that saw it when more than one did.
pub fn render_timeline(timeline: &Timeline) -> String {
    let incident = &timeline.incident;
    let mut text = format!(
        "Incident {}: {} {} (scenario {}), {}\n",
        incident.id,
        incident.provider,
        incident.alertname,
        incident.scenario,
        match incident.resolved_at {
            Some(resolved_at) => format!("resolved {}", incident_time(resolved_at)),
            None => "open".to_owned(),
        }
    );
    let instances: std::collections::BTreeSet<&str> =
        timeline.entries.iter().map(|entry| entry.instance.as_str()).filter(|name| !name.is_empty()).collect();
    let rows = timeline
        .entries
        .iter()
        .map(|entry| {
            let offset = (entry.at - incident.started_at).to_std().unwrap_or_default();
            let mut row = vec![
                call_time(entry.at),
                format!("+{}", humantime::format_duration(Duration::from_secs(offset.as_secs()))),
                entry.kind.clone(),
                optional(Some(&entry.detail)),
            ];
            if instances.len() > 1 {
                row.push(entry.instance.clone());
            }
            row
        })
        .collect();
    text.push_str(&indent(&table_without_header(rows)));
    if timeline.truncated {
        text.push_str(&format!("  … only the first {MAX_TIMELINE_EVENTS} events are shown\n"));
    }
    text
}

fn error_sample(sample: Option<&ErrorSample>) -> String {
    match sample {
        None => "none".to_owned(),
        Some(sample) => format!(
            "{} {} class={} {}",
            call_time(sample.created_at),
            sample.endpoint,
            optional(sample.error_class.as_deref()),
            optional(sample.error_message.as_deref())
        ),
    }
}

fn incident_duration(incident: &Incident, now: DateTime<Utc>) -> String {
    let end = incident.resolved_at.unwrap_or(now);
    let seconds = (end - incident.started_at).num_seconds().max(0) as u64;
    let duration = humantime::format_duration(Duration::from_secs(seconds)).to_string();
    if incident.resolved_at.is_some() { duration } else { format!("{duration} so far") }
}

fn call_time(time: DateTime<Utc>) -> String {
    time.format("%Y-%m-%d %H:%M:%S%.3fZ").to_string()
}

fn incident_time(time: DateTime<Utc>) -> String {
    time.format("%Y-%m-%d %H:%M:%SZ").to_string()
}

/// `-` for a missing value; line breaks flattened so one call stays on one line.
fn optional(value: Option<&str>) -> String {
    match value {
        None | Some("") => "-".to_owned(),
        Some(text) => text.replace(['\r', '\n'], " "),
    }
}

fn table(headers: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut all = vec![headers.iter().map(|header| (*header).to_owned()).collect()];
    all.extend(rows);
    table_without_header(all)
}

/// Left-aligned columns separated by two spaces; the last column is not padded.
fn table_without_header(rows: Vec<Vec<String>>) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|column| rows.iter().filter_map(|row| row.get(column)).map(|cell| cell.chars().count()).max().unwrap_or(0))
        .collect();
    let mut text = String::new();
    for row in rows {
        let mut line = String::new();
        for (column, cell) in row.iter().enumerate() {
            if column + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<width$}  ", width = widths[column]));
            }
        }
        text.push_str(line.trim_end());
        text.push('\n');
    }
    text
}

fn indent(text: &str) -> String {
    text.lines().map(|line| format!("  {line}\n")).collect()
}

#[cfg(test)]
mod tests {
    use chrono::TimeDelta;

    use super::*;
    use crate::store::incidents::{Count, Latency};

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text).unwrap().with_timezone(&Utc)
    }

    fn incident(resolved_at: Option<DateTime<Utc>>) -> Incident {
        Incident {
            id: 7,
            provider: "kraken".to_owned(),
            alertname: "ExchangeApiDown".to_owned(),
            scenario: "maintenance".to_owned(),
            started_at: at("2025-01-15T10:30:00Z"),
            resolved_at,
            first_error: Some("EService:Unavailable".to_owned()),
            last_error: Some("EService:Unavailable".to_owned()),
            failed_calls: 40,
            total_calls: 41,
        }
    }

    #[test]
    fn calls_render_as_a_table_with_the_runbook_columns() {
        let calls = vec![
            CallRecord {
                success: false,
                response_time: 5012,
                error_message: Some("EService:Unavailable\nretry later".to_owned()),
                http_status: Some(503),
                error_class: Some("maintenance".to_owned()),
                exchange_error: Some("EService:Unavailable".to_owned()),
                ..CallRecord::new("kraken", "pod-a", "Ticker", at("2025-01-15T10:31:00.250Z"))
            },
            CallRecord {
                response_time: 87,
                http_status: Some(200),
                ..CallRecord::new("kraken", "pod-a", "SystemStatus", at("2025-01-15T10:30:30Z"))
            },
        ];
        let text = render_calls(&calls);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[0].starts_with("CREATED_AT") && lines[0].ends_with("ERROR_MESSAGE"), "{text}");
        for expected in ["2025-01-15 10:31:00.250Z", "Ticker", "false", "5012 ms", "maintenance", "503"] {
            assert!(lines[1].contains(expected), "{expected} missing from {text}");
        }
        assert!(lines[1].ends_with("EService:Unavailable retry later"), "{text}");
        assert!(lines[2].contains("SystemStatus") && lines[2].contains("true") && lines[2].contains("87 ms"));
        // Columns line up: every row has ENDPOINT at the same offset.
        let offset = lines[0].find("ENDPOINT").unwrap();
        assert_eq!(lines[2].find("SystemStatus"), Some(offset), "{text}");
        assert_eq!(render_calls(&[]), "No calls found.\n");
    }

    #[test]
    fn incidents_render_open_ones_as_open_with_the_duration_so_far() {
        let resolved = incident(Some(at("2025-01-15T10:45:30Z")));
        let mut open = incident(None);
        open.id = 8;
        let text = render_incidents(&[open, resolved], at("2025-01-15T11:00:00Z"));
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("ID") && lines[0].contains("SCENARIO") && lines[0].ends_with("DURATION"));
        assert!(
            lines[1].starts_with("8 ") && lines[1].contains(" open ") && lines[1].ends_with("30m so far"),
            "{text}"
        );
        assert!(lines[2].contains("2025-01-15 10:45:30Z") && lines[2].ends_with("15m 30s"), "{text}");
        assert_eq!(render_incidents(&[], Utc::now()), "No incidents found.\n");
    }

    #[test]
    fn an_incident_report_shows_counts_latency_and_errors() {
        let started = at("2025-01-15T10:30:00Z");
        let report = IncidentReport {
            incident: incident(Some(started + TimeDelta::minutes(15))),
            window_end: started + TimeDelta::minutes(15),
            total_calls: 41,
            failed_calls: 40,
            not_sent_calls: 6,
            failures_by_class: vec![Count { name: "maintenance".to_owned(), calls: 40 }],
            failures_by_endpoint: vec![
                Count { name: "Ticker".to_owned(), calls: 30 },
                Count { name: "SystemStatus".to_owned(), calls: 10 },
            ],
            response_time: Some(Latency { p50: 120, p95: 4800, max: 10_000 }),
            first_error: Some(ErrorSample {
                created_at: started,
                endpoint: "Ticker".to_owned(),
                error_class: Some("maintenance".to_owned()),
                error_message: Some("EService:Unavailable".to_owned()),
            }),
            last_error: None,
        };
        let text = render_incident_report(&report);
        for expected in [
            "Incident 7: kraken ExchangeApiDown (scenario maintenance)",
            "duration       15m",
            "41 total, 40 failed",
            "not sent       6 (refused by the circuit breaker)",
            "p50 120 ms, p95 4800 ms, max 10000 ms",
            "first error    2025-01-15 10:30:00.000Z Ticker class=maintenance EService:Unavailable",
            "last error     none",
            "Failed calls by error class:\n  maintenance  40\n",
            "Failed calls by endpoint:\n  Ticker        30\n  SystemStatus  10\n",
        ] {
            assert!(text.contains(expected), "{expected:?} missing from:\n{text}");
        }
    }

    #[test]
    fn a_timeline_reads_as_one_line_per_event_with_its_offset_and_the_replica_when_several() {
        use crate::store::events::Entry;
        let entry = |at_text: &str, kind: &str, detail: &str, instance: &str| Entry {
            at: at(at_text),
            kind: kind.to_owned(),
            detail: detail.to_owned(),
            instance: instance.to_owned(),
        };
        let mut timeline = Timeline {
            incident: incident(Some(at("2025-01-15T10:34:00Z"))),
            entries: vec![
                entry("2025-01-15T10:30:00Z", "failure", "first failure of the streak: EService:Unavailable", ""),
                entry("2025-01-15T10:30:04Z", "breaker", "CLOSED -> OPEN: 3 consecutive failures", "pod-a"),
            ],
            truncated: false,
        };
        let text = render_timeline(&timeline);
        assert!(text.starts_with("Incident 7: kraken ExchangeApiDown (scenario maintenance), resolved 2025-01-15"));
        assert!(text.contains("+4s") && text.contains("breaker") && text.contains("CLOSED -> OPEN"), "{text}");
        assert!(!text.contains("pod-a"), "one replica is not named: {text}");
        timeline.entries.push(entry(
            "2025-01-15T10:30:05Z",
            "breaker",
            "CLOSED -> OPEN: 3 consecutive failures",
            "pod-b",
        ));
        timeline.truncated = true;
        let text = render_timeline(&timeline);
        assert!(text.contains("pod-a") && text.contains("pod-b"), "{text}");
        assert!(text.contains("only the first 1000 events are shown"), "{text}");
    }
}
