//! What an exchange says on its Atlassian Statuspage (status.kraken.com): the page's indicator, the components
//! exwatch cares about, and the unresolved incidents, fetched from `/api/v2/summary.json` every
//! `status_sources.statuspage_interval`, shown beside exwatch's own verdict (`GET
//! /api/v1/exchanges/{name}/exchange-status`) and as metrics. It never decides an outage: REST stays the authority.
//!
//! What it owns: [`parse`], a pure and lenient reading of a summary (unknown fields and enum values kept as text,
//! every text capped, every list bounded), the fetch loop ([`Watch::run`]: own timeout, the transport's 1 MiB cap, the
//! last good summary kept on any failure and marked stale after `stale_after`), and its metrics. Third-party text is
//! data: capped here, escaped wherever it is shown, never a metric label except the configured component names.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use chrono::{DateTime, Utc};
use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use url::Url;

use crate::failure::ErrorClass;
use crate::transport::{self, Request, Transport};
use crate::{clock, telemetry, text};

/// The longest name (a page's, a component's, an incident's) kept.
pub const MAX_NAME_BYTES: usize = 1024;
/// The longest incident update body kept.
pub const MAX_BODY_BYTES: usize = 4096;
/// The most components and incidents kept of one summary; a page with more is cut.
pub const MAX_ITEMS: usize = 100;

/// The page-wide indicators Statuspage documents, and `maintenance`, which Kraken's page shows in practice.
pub const INDICATORS: [&str; 5] = ["none", "minor", "major", "critical", "maintenance"];
/// The component statuses Statuspage documents.
pub const COMPONENT_STATUSES: [&str; 5] =
    ["operational", "degraded_performance", "partial_outage", "major_outage", "under_maintenance"];

/// `[status_sources]`: how often and how patiently the exchanges' own status sources are read.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Config {
    #[serde(serialize_with = "crate::clock::human_duration")]
    pub statuspage_interval: Duration,
    /// The limit for one fetch, from connect to the last byte.
    #[serde(serialize_with = "crate::clock::human_duration")]
    pub timeout: Duration,
    /// A summary older than this is shown as stale (kept, never dropped).
    #[serde(serialize_with = "crate::clock::human_duration")]
    pub stale_after: Duration,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            statuspage_interval: Duration::from_secs(60),
            timeout: Duration::from_secs(10),
            stale_after: Duration::from_secs(600),
        }
    }
}

/// One exchange's Statuspage, as configured.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Source {
    /// The page's base URL (`https://status.kraken.com`); `/api/v2/summary.json` is read below it.
    #[serde(serialize_with = "shown_url")]
    pub url: Url,
    /// When set, a summary of another page is refused (`wrong_page`): a moved or hijacked URL is not believed.
    pub page_id: Option<String>,
    /// The components (names or ids) that mean "our API"; they get metrics of their own.
    pub components: Vec<String>,
}

fn shown_url<S: serde::Serializer>(url: &Url, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&crate::secret::redact_url(url))
}

/// A summary as read: what the page says now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub page_id: String,
    /// `none`, `minor`, `major`, `critical`, `maintenance`, or whatever the page says.
    pub indicator: String,
    pub description: String,
    pub components: Vec<Component>,
    /// The unresolved incidents.
    pub incidents: Vec<Incident>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Component {
    pub id: String,
    pub name: String,
    pub status: String,
    pub updated_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Incident {
    pub id: String,
    pub name: String,
    pub status: String,
    pub impact: String,
    pub started_at: Option<DateTime<Utc>>,
    pub shortlink: Option<String>,
    pub last_update: Option<Update>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Update {
    pub status: String,
    pub body: String,
    pub display_at: Option<DateTime<Utc>>,
}

/// Why a fetch did not give a summary, as the `outcome` label counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Ok,
    HttpError,
    Timeout,
    BadResponse,
    WrongPage,
    TooLarge,
}

impl Outcome {
    pub const ALL: [Outcome; 6] = [
        Outcome::Ok,
        Outcome::HttpError,
        Outcome::Timeout,
        Outcome::BadResponse,
        Outcome::WrongPage,
        Outcome::TooLarge,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::HttpError => "http_error",
            Outcome::Timeout => "timeout",
            Outcome::BadResponse => "bad_response",
            Outcome::WrongPage => "wrong_page",
            Outcome::TooLarge => "too_large",
        }
    }
}

/// A failed fetch: its outcome and what went wrong, in words (no URL).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub outcome: Outcome,
    pub message: String,
}

fn bad(message: impl Into<String>) -> Failure {
    Failure { outcome: Outcome::BadResponse, message: message.into() }
}

/// Reads a `/api/v2/summary.json` body. Lenient where Statuspage may grow (unknown fields ignored, unknown enum
/// values kept as text, a missing optional field is `None`), strict where the answer would mean nothing: not JSON,
/// no `page.id`, no `status.indicator`. `page_id`, when given, must match.
pub fn parse(body: &[u8], page_id: Option<&str>) -> Result<Summary, Failure> {
    let value: Value = serde_json::from_slice(body).map_err(|_| bad("not a JSON summary"))?;
    let page = value.get("page").and_then(|page| page.get("id")).and_then(Value::as_str);
    let page = page.ok_or_else(|| bad("summary without page.id"))?;
    if let Some(expected) = page_id
        && page != expected
    {
        return Err(Failure {
            outcome: Outcome::WrongPage,
            message: format!("summary of page {:?}, expected {expected:?}", text::bounded(page, 64)),
        });
    }
    let status = value.get("status").ok_or_else(|| bad("summary without status"))?;
    let indicator = string(status, "indicator").ok_or_else(|| bad("summary without status.indicator"))?;
    let list = |key: &str| value.get(key).and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
    Ok(Summary {
        page_id: name(page),
        indicator: name(&indicator),
        description: name(&string(status, "description").unwrap_or_default()),
        components: list("components").iter().take(MAX_ITEMS).map(component).collect(),
        incidents: list("incidents").iter().take(MAX_ITEMS).map(incident).collect(),
    })
}

fn string(value: &Value, key: &str) -> Option<String> {
    value.get(key).and_then(Value::as_str).map(str::to_owned)
}

fn name(value: &str) -> String {
    text::external(value, MAX_NAME_BYTES)
}

fn field(value: &Value, key: &str) -> String {
    name(&string(value, key).unwrap_or_default())
}

/// Statuspage writes offsets (`2026-12-02T10:44:20.441-06:00`); kept in UTC, `None` when absent or unreadable.
fn time(value: &Value, key: &str) -> Option<DateTime<Utc>> {
    let text = value.get(key)?.as_str()?;
    DateTime::parse_from_rfc3339(text).ok().map(|time| time.with_timezone(&Utc))
}

fn component(value: &Value) -> Component {
    Component {
        id: field(value, "id"),
        name: field(value, "name"),
        status: field(value, "status"),
        updated_at: time(value, "updated_at"),
    }
}

fn incident(value: &Value) -> Incident {
    // Statuspage lists updates newest first.
    let last_update = value.get("incident_updates").and_then(Value::as_array).and_then(|updates| updates.first());
    Incident {
        id: field(value, "id"),
        name: field(value, "name"),
        status: field(value, "status"),
        impact: field(value, "impact"),
        started_at: time(value, "started_at").or_else(|| time(value, "created_at")),
        shortlink: string(value, "shortlink").map(|link| name(&link)),
        last_update: last_update.map(|update| Update {
            status: field(update, "status"),
            body: text::external(&string(update, "body").unwrap_or_default(), MAX_BODY_BYTES),
            display_at: time(update, "display_at"),
        }),
    }
}

/// What `/api/v1/exchanges/{name}/exchange-status` shows of the page.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct View {
    /// The last good summary, however old; `None` until one was read.
    pub summary: Option<Summary>,
    /// When the last good summary was read.
    pub fetched_at: Option<DateTime<Utc>>,
    /// No good summary within `stale_after` (or none yet).
    pub stale: bool,
    /// The last fetch's outcome, and its error when it failed.
    pub last_outcome: Option<Outcome>,
    pub last_error: Option<String>,
}

#[derive(Debug, Default)]
struct State {
    summary: Option<Summary>,
    fetched_at: Option<DateTime<Utc>>,
    fetched: Option<Instant>,
    last_outcome: Option<Outcome>,
    last_error: Option<String>,
}

/// One exchange's Statuspage being watched: the fetch loop and the view it keeps.
pub struct Watch {
    exchange: String,
    source: Source,
    config: Config,
    transport: Transport,
    summary_url: Url,
    state: Mutex<State>,
    metrics: Metrics,
}

impl Watch {
    pub fn new(exchange: &str, source: Source, config: Config, metrics: Metrics) -> Result<Arc<Watch>, reqwest::Error> {
        Ok(Watch::with_transport(exchange, source, config, metrics, Transport::http()?))
    }

    /// A watch whose fetches go to `router` (paused-clock tests).
    #[cfg(any(test, feature = "test-util"))]
    pub fn in_memory(
        exchange: &str,
        source: Source,
        config: Config,
        metrics: Metrics,
        router: axum::Router,
    ) -> Arc<Watch> {
        Watch::with_transport(exchange, source, config, metrics, Transport::InMemory(router))
    }

    fn with_transport(
        exchange: &str,
        source: Source,
        config: Config,
        metrics: Metrics,
        transport: Transport,
    ) -> Arc<Watch> {
        let mut summary_url = source.url.clone();
        summary_url.set_path(&format!("{}/api/v2/summary.json", source.url.path().trim_end_matches('/')));
        metrics.up.with_label_values(&[exchange]).set(0);
        for outcome in Outcome::ALL {
            metrics.fetches.with_label_values(&[exchange, outcome.as_str()]);
        }
        Arc::new(Watch {
            exchange: exchange.to_owned(),
            source,
            config,
            transport,
            summary_url,
            state: Mutex::new(State::default()),
            metrics,
        })
    }

    pub fn exchange(&self) -> &str {
        &self.exchange
    }

    /// Fetches now, then every `statuspage_interval`, until `stop`.
    pub async fn run(self: Arc<Watch>, stop: CancellationToken) {
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = self.fetch_once() => {}
            }
            let next = clock::after(Instant::now(), self.config.statuspage_interval);
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep_until(next) => {}
            }
        }
    }

    /// One fetch: the summary replaces the last good one, or the failure is counted and the last good one kept.
    pub async fn fetch_once(&self) {
        let result = self.fetch().await;
        let outcome = result.as_ref().map_or_else(|failure| failure.outcome, |_| Outcome::Ok);
        self.metrics.fetches.with_label_values(&[&self.exchange, outcome.as_str()]).inc();
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.last_outcome = Some(outcome);
        match result {
            Ok(summary) => {
                self.metrics.up.with_label_values(&[&self.exchange]).set(1);
                self.publish(&summary);
                state.summary = Some(summary);
                state.fetched_at = Some(Utc::now());
                state.fetched = Some(Instant::now());
                state.last_error = None;
            }
            Err(failure) => {
                self.metrics.up.with_label_values(&[&self.exchange]).set(0);
                tracing::warn!(
                    exchange = self.exchange,
                    outcome = outcome.as_str(),
                    error = failure.message,
                    "Statuspage fetch failed; keeping the last good summary."
                );
                state.last_error = Some(failure.message);
            }
        }
    }

    async fn fetch(&self) -> Result<Summary, Failure> {
        let answer =
            self.transport.send(Request::get(&self.summary_url), self.config.timeout).await.map_err(|error| {
                let outcome = match error.class {
                    ErrorClass::Timeout => Outcome::Timeout,
                    _ if transport::is_too_large(&error) => Outcome::TooLarge,
                    ErrorClass::BadResponse => Outcome::BadResponse,
                    _ => Outcome::HttpError,
                };
                Failure { outcome, message: error.to_string() }
            })?;
        if !(200..300).contains(&answer.status) {
            return Err(Failure { outcome: Outcome::HttpError, message: format!("HTTP {}", answer.status) });
        }
        parse(&answer.body, self.source.page_id.as_deref())
    }

    /// The indicator, the configured components and the unresolved incidents as metrics.
    fn publish(&self, summary: &Summary) {
        let exchange = self.exchange.as_str();
        let known = INDICATORS.contains(&summary.indicator.as_str());
        for indicator in INDICATORS.into_iter().chain(["unknown"]) {
            let current = if known { summary.indicator == indicator } else { indicator == "unknown" };
            self.metrics.indicator.with_label_values(&[exchange, indicator]).set(i64::from(current));
        }
        for wanted in &self.source.components {
            let found =
                summary.components.iter().find(|component| &component.name == wanted || &component.id == wanted);
            let status = found.map_or("unknown", |component| component.status.as_str());
            let status = if COMPONENT_STATUSES.contains(&status) { status } else { "unknown" };
            for candidate in COMPONENT_STATUSES.into_iter().chain(["unknown"]) {
                let value = i64::from(candidate == status);
                self.metrics.component_status.with_label_values(&[exchange, wanted, candidate]).set(value);
            }
        }
        let unresolved = i64::try_from(summary.incidents.len()).unwrap_or(i64::MAX);
        self.metrics.unresolved_incidents.with_label_values(&[exchange]).set(unresolved);
    }

    pub fn view(&self) -> View {
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let fresh = state.fetched.is_some_and(|fetched| fetched.elapsed() <= self.config.stale_after);
        View {
            summary: state.summary.clone(),
            fetched_at: state.fetched_at,
            stale: !fresh,
            last_outcome: state.last_outcome,
            last_error: state.last_error.clone(),
        }
    }
}

/// The Statuspage metrics, shared by every exchange's watch.
#[derive(Clone)]
pub struct Metrics {
    up: IntGaugeVec,
    fetches: IntCounterVec,
    indicator: IntGaugeVec,
    component_status: IntGaugeVec,
    unresolved_incidents: IntGaugeVec,
}

impl Metrics {
    pub fn new(registry: &Registry) -> Metrics {
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            telemetry::register(registry, IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric"))
        };
        Metrics {
            up: gauge("exwatch_statuspage_up", "1 when the last Statuspage fetch gave a summary.", &["exchange"]),
            fetches: telemetry::register(
                registry,
                IntCounterVec::new(
                    Opts::new("exwatch_statuspage_fetches_total", "Statuspage fetches, by outcome."),
                    &["exchange", "outcome"],
                )
                .expect("valid metric"),
            ),
            indicator: gauge(
                "exwatch_statuspage_indicator",
                "The page's status indicator (one-hot; unknown for a value Statuspage does not document).",
                &["exchange", "indicator"],
            ),
            component_status: gauge(
                "exwatch_statuspage_component_status",
                "The status of each configured component (one-hot; unknown when absent or undocumented).",
                &["exchange", "component", "status"],
            ),
            unresolved_incidents: gauge(
                "exwatch_statuspage_unresolved_incidents",
                "Unresolved incidents on the exchange's Statuspage.",
                &["exchange"],
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A summary as status.kraken.com serves it, trimmed, with a field and an enum value Statuspage may add.
    const SUMMARY: &str = r#"{
      "page": {"id": "lfz25gyhcpjf", "name": "Kraken", "url": "https://status.kraken.com", "time_zone": "Etc/UTC",
               "updated_at": "2026-12-02T10:44:20.441-06:00"},
      "status": {"indicator": "minor", "description": "Minor Service Outage"},
      "components": [
        {"id": "k1", "name": "REST", "status": "degraded_performance", "updated_at": "2026-12-02T16:40:00Z",
         "reminder_intervals": [1, 2]},
        {"id": "k2", "name": "WebSocket", "status": "throttled"}
      ],
      "incidents": [
        {"id": "i1", "name": "Elevated API error rates", "status": "identified", "impact": "major",
         "started_at": "2026-12-02T16:30:00.000Z", "shortlink": "https://stspg.io/abc",
         "incident_updates": [{"status": "identified", "body": "We found it.", "display_at": "2026-12-02T16:35:00Z"},
                              {"status": "investigating", "body": "Looking.", "display_at": "2026-12-02T16:31:00Z"}]}
      ],
      "scheduled_maintenances": []
    }"#;

    fn source(components: &[&str]) -> Source {
        Source {
            url: Url::parse("https://status.example").unwrap(),
            page_id: Some("lfz25gyhcpjf".to_owned()),
            components: components.iter().map(|name| (*name).to_owned()).collect(),
        }
    }

    #[test]
    fn a_summary_is_read_leniently_with_offsets_in_utc_and_the_newest_update() {
        let summary = parse(SUMMARY.as_bytes(), Some("lfz25gyhcpjf")).unwrap();
        assert_eq!((summary.indicator.as_str(), summary.description.as_str()), ("minor", "Minor Service Outage"));
        assert_eq!(summary.components[0].status, "degraded_performance");
        assert_eq!(summary.components[1].status, "throttled", "unknown enum values are kept as text");
        let incident = &summary.incidents[0];
        assert_eq!(incident.started_at.unwrap().to_rfc3339(), "2026-12-02T16:30:00+00:00");
        assert_eq!(incident.last_update.as_ref().unwrap().body, "We found it.");
        assert_eq!(incident.shortlink.as_deref(), Some("https://stspg.io/abc"));
    }

    #[test]
    fn another_page_garbage_and_missing_fields_are_classified_failures() {
        assert_eq!(parse(SUMMARY.as_bytes(), Some("other")).unwrap_err().outcome, Outcome::WrongPage);
        for body in ["<html>down</html>", "", "{\"page\":{}}", "{\"page\":{\"id\":\"x\"}}", "[1,2]", "\u{0}"] {
            assert_eq!(parse(body.as_bytes(), None).unwrap_err().outcome, Outcome::BadResponse, "{body:?}");
        }
    }

    #[test]
    fn third_party_text_is_capped_and_printable_and_lists_are_bounded() {
        let long = "x".repeat(10_000);
        let components: Vec<Value> = (0..500)
            .map(|index| serde_json::json!({"id": index.to_string(), "name": long, "status": "\u{7}"}))
            .collect();
        let body = serde_json::json!({
            "page": {"id": "p"}, "status": {"indicator": long, "description": "a\u{0}b"}, "components": components,
            "incidents": [{"name": long, "incident_updates": [{"body": "y".repeat(50_000)}]}]
        });
        let summary = parse(body.to_string().as_bytes(), None).unwrap();
        assert!(summary.indicator.len() <= MAX_NAME_BYTES + 64);
        assert!(!summary.description.contains('\u{0}'));
        assert_eq!(summary.components.len(), MAX_ITEMS);
        assert!(!summary.components[0].status.contains('\u{7}'));
        assert!(summary.incidents[0].last_update.as_ref().unwrap().body.len() <= MAX_BODY_BYTES + 64);
    }

    #[tokio::test(start_paused = true)]
    async fn failures_keep_the_last_good_summary_which_goes_stale() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let failing = Arc::new(AtomicBool::new(false));
        let switch = failing.clone();
        let router = axum::Router::new().route(
            "/api/v2/summary.json",
            axum::routing::get(move || {
                let failing = switch.load(Ordering::SeqCst);
                async move {
                    let status = if failing { 500 } else { 200 };
                    (axum::http::StatusCode::from_u16(status).unwrap(), SUMMARY)
                }
            }),
        );
        let registry = telemetry::registry();
        let config = Config { stale_after: Duration::from_secs(5), ..Config::default() };
        let watch = Watch::in_memory("kraken", source(&["REST"]), config, Metrics::new(&registry), router);
        watch.fetch_once().await;
        let view = watch.view();
        assert!(!view.stale && view.summary.is_some(), "{view:?}");
        let text = telemetry::encode(&registry).unwrap();
        let sample = |name: &str, labels: &[(&str, &str)]| telemetry::sample(&text, name, labels);
        let degraded = [("component", "REST"), ("status", "degraded_performance")];
        assert_eq!(sample("exwatch_statuspage_component_status", &degraded), Some(1.0));
        assert_eq!(sample("exwatch_statuspage_indicator", &[("indicator", "minor")]), Some(1.0));
        assert_eq!(sample("exwatch_statuspage_unresolved_incidents", &[]), Some(1.0));

        // The page now fails: the summary stays, the failure is counted, and time makes it stale.
        failing.store(true, Ordering::SeqCst);
        watch.fetch_once().await;
        let view = watch.view();
        assert_eq!(view.last_outcome, Some(Outcome::HttpError));
        assert!(view.summary.is_some() && !view.stale, "{view:?}");
        tokio::time::advance(Duration::from_secs(6)).await;
        assert!(watch.view().stale);
        let text = telemetry::encode(&registry).unwrap();
        let failures = [("exchange", "kraken"), ("outcome", "http_error")];
        assert_eq!(telemetry::sample(&text, "exwatch_statuspage_fetches_total", &failures), Some(1.0));
        assert_eq!(telemetry::sample(&text, "exwatch_statuspage_up", &[]), Some(0.0));
    }
}
