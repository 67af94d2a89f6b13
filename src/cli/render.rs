//! Text for people from a running daemon's answers: `exwatch status`, and the one-line breaker and rate-limit
//! statuses of `exwatch breaker` and `exwatch rate-limit`.
//!
//! What it owns: the wording, times read as on a wall clock to the second with how long ago, and saying in words
//! what the daemon does not know yet (never `null`). What it does not do: fetch anything (`cli::daemon`), or render
//! the store's logs and incidents (`store::report` does, as the store owns their rows).

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::http::api;

/// One paragraph per exchange: up or down, SystemStatus, breaker, rate factor, a private-call pause, then each alert
/// with its evidence. Times read as on a wall clock with how long ago ("since 07:12:03Z, 4m 10s").
pub(super) fn status(answer: &api::StatusResponse, now: DateTime<Utc>) -> String {
    let mut output = String::new();
    for placeholder in &answer.placeholders {
        output.push_str(&format!("NOT SET: {placeholder}\n"));
    }
    for exchange in &answer.exchanges {
        let up = if exchange.up { "UP" } else { "DOWN" };
        // The factor as JSON writes it (1.0, not 1), as this line always showed it.
        let factor = serde_json::Number::from_f64(exchange.rate_limit.factor)
            .map_or_else(|| "unknown".to_owned(), |factor| factor.to_string());
        output.push_str(&format!(
            "{}: {up}; SystemStatus {}; breaker {}; rate factor {factor}\n",
            exchange.exchange,
            exchange.system_status.as_deref().unwrap_or("unknown (not read yet)"),
            exchange.breaker.state,
        ));
        if let Some(reason) = &exchange.rate_limit.private_pause_reason {
            let remaining = exchange
                .rate_limit
                .private_paused_for_seconds
                .map(|seconds| format!(" for {} more", human_seconds(seconds)))
                .unwrap_or_default();
            output.push_str(&format!("  private calls PAUSED{remaining}: {reason}\n"));
        }
        if let Some(page) = &exchange.statuspage {
            output.push_str(&format!("  {} says: {}\n", exchange.display_name, statuspage(page, now)));
        }
        for alert in &exchange.active_alerts {
            output.push_str(&format!(
                "  FIRING {} ({}) since {}: scenario {}\n    {}\n    evidence: {}\n",
                alert.alertname,
                alert.severity,
                wall_clock_and_age(Some(alert.since), now),
                alert.scenario,
                alert.description,
                alert.evidence,
            ));
        }
    }
    output
}

/// `exwatch exchange-status`: the exchange's last SystemStatus and what its Statuspage says.
pub(super) fn exchange_says(said: &api::ExchangeSays, now: DateTime<Utc>) -> String {
    let status = said.system_status.as_ref().map_or_else(
        || "unknown (not read yet)".to_owned(),
        |status| format!("{} (from {})", status.value, status.source),
    );
    let page = said
        .statuspage
        .as_ref()
        .map_or_else(|| "not watched (no statuspage_url)".to_owned(), |page| statuspage(page, now));
    let mut text = format!("{}: SystemStatus {status}\n  {} says: {page}\n", said.exchange, said.display_name);
    if let Some(socket) = &said.websocket {
        let state = if socket.connected { "connected" } else { "NOT connected" };
        let system =
            socket.system.as_deref().map(|system| format!(", status channel says {system}")).unwrap_or_default();
        let heard = socket.last_message_at.map(|at| format!(", last message {}", wall_clock_and_age(Some(at), now)));
        text.push_str(&format!("  WebSocket: {state}{system}{}\n", heard.unwrap_or_default()));
    }
    text
}

/// What a Statuspage says, on one line: its description and indicator, components not operational, unresolved
/// incidents with their status, and how old the summary is when it is stale.
pub(super) fn statuspage(page: &crate::statuspage::View, now: DateTime<Utc>) -> String {
    let Some(summary) = &page.summary else {
        let why = page.last_error.as_deref().unwrap_or("no fetch yet");
        return format!("unknown (Statuspage not read: {why})");
    };
    let mut parts = vec![format!("{} ({})", summary.description, summary.indicator)];
    for component in summary.components.iter().filter(|component| component.status != "operational") {
        parts.push(format!("{} {}", component.name, component.status));
    }
    for incident in &summary.incidents {
        let link = incident.shortlink.as_deref().map(|link| format!(" {link}")).unwrap_or_default();
        parts.push(format!("incident \"{}\" {}, {}{link}", incident.name, incident.status, incident.impact));
    }
    if page.stale {
        parts.push(format!("STALE: read {}", wall_clock_and_age(page.fetched_at, now)));
    }
    parts.join("; ")
}

/// "07:12:03Z, 4m 10s" (the date too when it is not today).
fn wall_clock_and_age(time: Option<DateTime<Utc>>, now: DateTime<Utc>) -> String {
    let Some(time) = time else {
        return "an unknown time".to_owned();
    };
    // Whole seconds, so the age agrees with the clock shown.
    let time = chrono::SubsecRound::trunc_subsecs(time, 0);
    let clock = if time.date_naive() == now.date_naive() {
        time.format("%H:%M:%SZ").to_string()
    } else {
        time.format("%Y-%m-%d %H:%M:%SZ").to_string()
    };
    let age = (now - time).num_seconds().max(0);
    format!("{clock}, {}", human_seconds(age.unsigned_abs()))
}

/// Whole seconds as humantime prints them ("4m 10s").
fn human_seconds(seconds: u64) -> String {
    humantime::format_duration(Duration::from_secs(seconds)).to_string()
}

/// `kraken: CLOSED -> FORCED_OPEN`, `kraken: already FORCED_OPEN` or `kraken: CLOSED (counters cleared)`, then the
/// breaker's status line.
pub(super) fn breaker_change(change: &api::BreakerChange, reset: bool) -> String {
    let exchange = &change.exchange;
    let first = match (change.changed, reset) {
        (true, _) => format!("{exchange}: {} -> {}", change.from, change.to),
        (false, true) => format!("{exchange}: {} (counters cleared)", change.to),
        (false, false) => format!("{exchange}: already {}", change.to),
    };
    format!("{first}\n{}", breaker_line(&change.status))
}

/// `kraken: OPEN since 2026-11-29T07:10:00Z (1m 5s); consecutive failures 3; failure rate 60.0% over 5 calls; …`
pub(super) fn breaker_line(status: &api::BreakerStatus) -> String {
    let mut line = format!(
        "{}: {} since {} ({})",
        status.exchange,
        status.state,
        whole_second_time(&status.since),
        status.in_state_for,
    );
    line.push_str(&format!("; consecutive failures {}", status.consecutive_failures));
    let calls = status.calls_in_window;
    if status.failure_rate >= 0.0 {
        line.push_str(&format!("; failure rate {:.1}% over {calls} calls", status.failure_rate));
    } else {
        let minimum = status.config.minimum_calls;
        line.push_str(&format!("; failure rate n/a ({calls} of {minimum} calls needed)"));
    }
    if let (Some(class), Some(time)) = (status.last_failure_class, &status.last_failure_time) {
        line.push_str(&format!(
            "; last failure {class} at {} ({} ago)",
            whole_second_time(time),
            status.last_failure_ago.as_deref().unwrap_or("?")
        ));
    }
    line.push_str(&format!("; not permitted {}", status.not_permitted_calls));
    if let Some(half_open_in) = &status.half_open_in {
        line.push_str(&format!("; half-open in {half_open_in}"));
    }
    line
}

/// `kraken: factor 0.5 (ceiling 0.5); public 0.50/s burst 1; private 0.17/s burst 7; rate limited 0 times recently`
pub(super) fn rate_limit_line(status: &api::RateLimitStatus) -> String {
    let mut line = format!(
        "{}: factor {} (ceiling {}); public {:.2}/s burst {}; private {:.2}/s burst {}; rate limited {} times recently",
        status.exchange,
        status.factor,
        status.ceiling,
        status.budgets.public_per_second,
        status.budgets.public_burst,
        status.budgets.private_per_second,
        status.budgets.private_burst,
        status.recent_rate_limited,
    );
    if let Some(ago) = &status.last_rate_limited_ago {
        line.push_str(&format!(", last {ago} ago"));
    }
    if let Some(paused_for) = &status.private_paused_for {
        let reason = status.private_pause_reason.as_deref().unwrap_or("unknown reason");
        line.push_str(&format!("; private calls paused for {paused_for} ({reason})"));
    }
    line
}

/// An RFC 3339 time to the second, for people to read.
fn whole_second_time(time: &str) -> String {
    DateTime::parse_from_rfc3339(time).map_or_else(
        |_| time.to_owned(),
        |time| time.with_timezone(&Utc).to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_reads_as_words_with_wall_clock_times_and_ages() {
        let now = DateTime::parse_from_rfc3339("2026-11-29T07:16:13Z").unwrap().with_timezone(&Utc);
        let since = DateTime::parse_from_rfc3339("2026-11-29T07:12:03.123456789Z").unwrap().with_timezone(&Utc);
        let answer = api::StatusResponse {
            exchanges: vec![api::ExchangeStatus {
                exchange: "kraken".to_owned(),
                up: false,
                system_status: None,
                breaker: api::BreakerSummary {
                    state: crate::breaker::State::Open,
                    consecutive_failures: 3,
                    failure_rate: -1.0,
                    not_permitted_calls: 0,
                },
                rate_limit: api::RateLimitSummary {
                    factor: 1.0,
                    private_pause_reason: Some("2 consecutive invalid-key answers".to_owned()),
                    private_paused_for_seconds: Some(890),
                },
                schedule: None,
                display_name: "Kraken".to_owned(),
                statuspage: None,
                active_alerts: vec![api::FiringAlert {
                    alertname: "exchange_api_down".to_owned(),
                    severity: "critical".to_owned(),
                    since,
                    reason: "3 consecutive failed polls".to_owned(),
                    summary: "Kraken API is down".to_owned(),
                    description: "Kraken rejects our key.".to_owned(),
                    scenario: "authentication".to_owned(),
                    evidence: "last 5m: 3 failed".to_owned(),
                    runbook_url: "http://127.0.0.1:9750/runbook".to_owned(),
                    acknowledged_by_exchange: false,
                }],
            }],
            placeholders: Vec::new(),
        };
        let text = status(&answer, now);
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
        let now = DateTime::parse_from_rfc3339("2026-11-30T00:00:10Z").unwrap().with_timezone(&Utc);
        let since = DateTime::parse_from_rfc3339("2026-11-29T23:59:00Z").unwrap().with_timezone(&Utc);
        assert_eq!(wall_clock_and_age(Some(since), now), "2026-11-29 23:59:00Z, 1m 10s");
        assert_eq!(wall_clock_and_age(None, now), "an unknown time");
    }

    #[test]
    fn status_starts_with_the_settings_left_off_for_placeholders() {
        let answer = api::StatusResponse {
            exchanges: Vec::new(),
            placeholders: vec![
                "`admin.token`: is still the placeholder of the template; the admin API stays off".to_owned(),
            ],
        };
        assert_eq!(
            status(&answer, Utc::now()),
            "NOT SET: `admin.token`: is still the placeholder of the template; the admin API stays off\n"
        );
    }
}
