//! The HTTP surface: `/health` (liveness), `/ready` (readiness), `/metrics` (Prometheus) and, when a token is
//! configured, the admin API under `/api/admin` ([`admin`]). The JSON the CLI reads back is typed in [`api`].
//!
//! [`router`] is pure: it builds an axum `Router` from [`State`] without binding anything, so tests drive it without
//! a socket; [`App`](crate::app::App) serves it. Liveness reports the daemon's own health only: an exchange or
//! database outage never fails it, because restarting the pod would only blind on-call during the outage.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use axum::Json;
use axum::extract::State as Extract;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus::Registry;
use serde_json::json;
use tokio::time::Instant;

use crate::poller::Control;
use crate::poller::Heartbeat;
use crate::secret::Secret;
use crate::statuspage;
use crate::store::connector::Connector;
use crate::store::writer;
use crate::telemetry;
use crate::websocket;

pub mod admin;
pub mod api;
pub mod serve;

/// What the handlers read. Cheap to clone.
#[derive(Clone)]
pub struct State {
    pub registry: Registry,
    pub heartbeat: Arc<Heartbeat>,
    pub readiness: Arc<Readiness>,
    /// Each exchange's breaker and limiter, by exchange name.
    pub controls: Arc<BTreeMap<String, Control>>,
    /// The admin API's bearer token; without one the admin API is not served.
    pub admin_token: Option<Secret>,
    /// The call-log writer, whose state `/health` shows as information (never as a failure).
    pub log: Option<writer::Handle>,
    /// Counts and logs the admin requests refused for want of a valid token.
    pub admin_refusals: admin::Refusals,
    /// Settings left off because they still hold the secret template's placeholders (`Config::placeholders`).
    pub placeholders: Arc<Vec<String>>,
    /// The configured database, which incident timelines are read from; `None` when the daemon keeps none.
    pub database: Option<Arc<Connector>>,
    /// Each exchange's Statuspage watch, for those with `statuspage_url`.
    pub statuspages: Arc<BTreeMap<String, Arc<statuspage::Watch>>>,
    /// Each exchange's WebSocket watch, for those with `websocket_url`.
    pub websockets: Arc<BTreeMap<String, Arc<websocket::Watch>>>,
}

/// The longest an incident timeline waits for the database: the request is bounded like every other.
const DATABASE_WAIT: Duration = Duration::from_secs(5);

/// Readiness: true from the moment the daemon serves until shutdown begins, or until a critical task fails.
#[derive(Debug, Default)]
pub struct Readiness {
    ready: AtomicBool,
    /// Why a critical task failed; once set, the daemon is never ready again.
    failure: std::sync::OnceLock<String>,
}

impl Readiness {
    pub fn set(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst) && self.failure.get().is_none()
    }

    /// A critical task failed: not ready from now on (the first reason is kept).
    pub fn fail(&self, reason: &str) {
        let _ = self.failure.set(reason.to_owned());
    }

    pub fn failure(&self) -> Option<&str> {
        self.failure.get().map(String::as_str)
    }
}

/// The least time between two log lines of one throttled kind; the lines held back are counted in the next.
pub const LOG_INTERVAL: Duration = Duration::from_secs(1);

/// Lets one log line through per [`LOG_INTERVAL`] for occurrences anyone outside can cause at will (refused admin
/// calls, connections over the cap), so they cannot flood the log; their metrics still count every one.
#[derive(Debug, Default)]
pub struct Throttle {
    state: Mutex<(Option<Instant>, u64)>,
}

impl Throttle {
    /// `Some(held back since the last line)` when a line may be logged at `now`; `None` (and counted) otherwise.
    pub fn admit(&self, now: Instant) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let (last, suppressed) = &mut *state;
        match last {
            Some(last) if now.saturating_duration_since(*last) < LOG_INTERVAL => {
                *suppressed += 1;
                None
            }
            _ => {
                *last = Some(now);
                Some(std::mem::take(suppressed))
            }
        }
    }
}

/// Without an admin token the admin paths are not mounted at all, so they are 404 like any unknown path.
pub fn router(state: State) -> axum::Router {
    let mut router = axum::Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/", get(|| async { axum::response::Redirect::temporary("/api/v1/status") }))
        .route("/api/v1/status", get(status))
        .route("/api/v1/incidents/{id}", get(incident))
        .route("/api/v1/exchanges/{name}/exchange-status", get(exchange_status))
        .route(crate::alert::RUNBOOK_PATH, get(runbook));
    if state.admin_token.is_some() {
        router = router.merge(admin::routes(state.clone()));
    }
    router.with_state(state)
}

/// `GET /api/v1/incidents/{id}`: the incident told as a story (`store::events::Timeline`), read-only like the status.
/// 400 for an id that is not a number, 404 for no such incident, 503 when there is no database or it does not answer
/// within [`DATABASE_WAIT`] (the error names its class, never the URL).
async fn incident(Extract(state): Extract<State>, axum::extract::Path(id): axum::extract::Path<String>) -> Response {
    let error = |status: StatusCode, error: String| (status, Json(json!({ "error": error }))).into_response();
    let Ok(id) = id.parse::<i64>() else {
        return error(StatusCode::BAD_REQUEST, format!("invalid incident id {:?}", crate::text::bounded(&id, 32)));
    };
    let Some(connector) = &state.database else {
        return error(StatusCode::SERVICE_UNAVAILABLE, "this daemon keeps no database, so no incidents".to_owned());
    };
    let timeline = async { connector.database().await?.incident_timeline(id).await };
    match tokio::time::timeout(DATABASE_WAIT, timeline).await {
        Ok(Ok(Some(timeline))) => (StatusCode::OK, Json(timeline)).into_response(),
        Ok(Ok(None)) => error(StatusCode::NOT_FOUND, format!("no incident {id}")),
        Ok(Err(failure)) => {
            error(StatusCode::SERVICE_UNAVAILABLE, format!("database unavailable: {}", failure.class()))
        }
        Err(_) => error(StatusCode::SERVICE_UNAVAILABLE, "database did not answer in time".to_owned()),
    }
}

/// `GET /api/v1/exchanges/{name}/exchange-status`: what the exchange itself says, beside exwatch's verdict: the last
/// SystemStatus read over REST, its Statuspage and its WebSocket (each null when not configured). 404 naming the known exchanges.
async fn exchange_status(
    Extract(state): Extract<State>,
    axum::extract::Path(name): axum::extract::Path<String>,
) -> Response {
    let Some(control) = state.controls.get(&name) else {
        let known: Vec<&str> = state.controls.keys().map(String::as_str).collect();
        let error = format!("unknown exchange {:?}; known: {}", crate::text::bounded(&name, 64), known.join(", "));
        return (StatusCode::NOT_FOUND, Json(json!({ "error": error }))).into_response();
    };
    let (system_status, display_name, advisories) = {
        let alerts = control.alerts.lock().unwrap_or_else(PoisonError::into_inner);
        let status = alerts
            .last_status()
            .map(|status| api::SystemStatusSaid { value: status.as_text().to_owned(), source: "rest".to_owned() });
        (status, alerts.profile().display_name.to_owned(), alerts.advisories().cloned())
    };
    let statuspage = state.statuspages.get(&name).map(|watch| watch.view());
    let websocket = state.websockets.get(&name).map(|watch| watch.view());
    let says = api::ExchangeSays { exchange: name, display_name, system_status, statuspage, advisories, websocket };
    (StatusCode::OK, Json(says)).into_response()
}

/// 200 while every poll loop ticked within three intervals; 503 with the stalled loops otherwise.
async fn health(Extract(state): Extract<State>) -> Response {
    let now = Instant::now();
    let stalls = state.heartbeat.stalls(now);
    let loops: Vec<_> = state
        .heartbeat
        .ages(now)
        .into_iter()
        .map(|(exchange, age)| json!({"exchange": exchange, "seconds_since_tick": age}))
        .collect();
    // The database's state is information for on-call, never a reason to fail liveness. Its error is shown as a
    // class and a time only: the text names hosts, databases and server messages, and `/health` is unauthenticated
    // (the text is in the writer's log lines).
    let database = state.log.as_ref().map(|log| {
        let status = log.status();
        let last_error = status.last_failure.map(|failure| json!({"class": failure.kind, "at": failure.at}));
        json!({
            "up": status.database_up,
            "buffered_rows": status.buffered,
            "spooled_rows": status.spooled,
            "last_error": last_error,
        })
    });
    if stalls.is_empty() {
        (StatusCode::OK, Json(json!({"status": "ok", "poll_loops": loops, "database": database}))).into_response()
    } else {
        let reason = stalls
            .iter()
            .map(|stall| {
                format!(
                    "poll loop for {} has not ticked for {:.0}s (limit {:.0}s)",
                    stall.exchange, stall.seconds_since_tick, stall.limit_seconds
                )
            })
            .collect::<Vec<_>>()
            .join("; ");
        let body = json!({"status": "stalled", "reason": reason, "poll_loops": loops, "database": database});
        (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
    }
}

/// Which exchange `/api/v1/status?exchange=NAME` shows (every one without it): a page's `generatorURL` names its
/// exchange this way.
#[derive(Debug, serde::Deserialize)]
struct StatusQuery {
    exchange: Option<String>,
}

/// The exchanges' state for on-call, read-only and without a token: up or down, breaker, rate factor, SystemStatus,
/// and the alerts firing with their scenario and evidence.
async fn status(
    Extract(state): Extract<State>,
    axum::extract::Query(query): axum::extract::Query<StatusQuery>,
) -> Response {
    let now = Instant::now();
    let only = query.exchange;
    if let Some(name) = &only
        && !state.controls.contains_key(name)
    {
        let known: Vec<&str> = state.controls.keys().map(String::as_str).collect();
        let error = format!("unknown exchange {:?}; known: {}", crate::text::bounded(name, 64), known.join(", "));
        return (StatusCode::NOT_FOUND, Json(json!({ "error": error }))).into_response();
    }
    let exchanges = state
        .controls
        .iter()
        .filter(|(name, _)| only.as_ref().is_none_or(|only| only == *name))
        .map(|(name, control)| {
            let alerts = control.alerts.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            let active = alerts.active();
            api::ExchangeStatus {
                exchange: name.clone(),
                up: !active.iter().any(|alert| alert.alertname == crate::alert::AlertName::Down),
                system_status: alerts.last_status().map(|status| status.as_text().to_owned()),
                breaker: api::BreakerSummary::from(&control.breaker.snapshot()),
                rate_limit: api::RateLimitSummary::from(&control.limiter.snapshot(now)),
                schedule: state.heartbeat.schedule_view(name, now).map(api::ScheduleStatus::from),
                active_alerts: active.iter().map(api::FiringAlert::from).collect(),
                display_name: alerts.profile().display_name.to_owned(),
                statuspage: state.statuspages.get(name).map(|watch| watch.view()),
            }
        })
        .collect();
    (StatusCode::OK, Json(api::StatusResponse { exchanges, placeholders: state.placeholders.to_vec() })).into_response()
}

/// 200 while serving, 503 once shutdown has begun so the load balancer stops sending traffic first, and 503 with
/// the reason once a critical task has failed.
async fn ready(Extract(state): Extract<State>) -> Response {
    if let Some(reason) = state.readiness.failure() {
        (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"status": "failed", "reason": reason}))).into_response()
    } else if state.readiness.is_ready() {
        (StatusCode::OK, Json(json!({"status": "ready"}))).into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"status": "shutting_down"}))).into_response()
    }
}

async fn metrics(Extract(state): Extract<State>) -> Response {
    match telemetry::encode(&state.registry) {
        Ok(text) => ([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], text).into_response(),
        Err(error) => {
            tracing::error!(error = %error, "Cannot encode metrics.");
            (StatusCode::INTERNAL_SERVER_ERROR, format!("cannot encode metrics: {error}")).into_response()
        }
    }
}

/// The operator runbook (docs/runbook.md, embedded at build time), which every page's `runbook_url` points at by
/// default, so the link in a page always leads to the runbook of the exwatch that sent it.
async fn runbook() -> Response {
    ([(header::CONTENT_TYPE, "text/markdown; charset=utf-8")], RUNBOOK).into_response()
}

const RUNBOOK: &str = include_str!("../docs/runbook.md");

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::Request;
    use http_body_util::BodyExt as _;
    use tower::ServiceExt as _;

    use super::*;

    async fn get_path(router: axum::Router, path: &str) -> (StatusCode, String) {
        let response = router.oneshot(Request::get(path).body(Body::empty()).unwrap()).await.unwrap();
        let status = response.status();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    fn state() -> State {
        State {
            registry: telemetry::registry(),
            heartbeat: Arc::new(Heartbeat::new()),
            readiness: Arc::new(Readiness::default()),
            controls: Arc::new(BTreeMap::new()),
            admin_token: None,
            log: None,
            admin_refusals: admin::Refusals::new(&telemetry::registry()),
            placeholders: Arc::default(),
            database: None,
            statuspages: Arc::default(),
            websockets: Arc::default(),
        }
    }

    #[test]
    fn a_throttle_admits_one_line_per_interval_and_reports_the_ones_held_back() {
        let throttle = Throttle::default();
        let start = Instant::now();
        assert_eq!(throttle.admit(start), Some(0));
        assert_eq!(throttle.admit(start + Duration::from_millis(10)), None);
        assert_eq!(throttle.admit(start + Duration::from_millis(999)), None);
        assert_eq!(throttle.admit(start + LOG_INTERVAL), Some(2));
        assert_eq!(throttle.admit(start + LOG_INTERVAL * 3), Some(0));
    }

    #[tokio::test]
    async fn ready_follows_the_readiness_flag() {
        let state = state();
        assert_eq!(get_path(router(state.clone()), "/ready").await.0, StatusCode::SERVICE_UNAVAILABLE);
        state.readiness.set(true);
        assert_eq!(get_path(router(state.clone()), "/ready").await.0, StatusCode::OK);
    }

    #[tokio::test]
    async fn ready_fails_with_the_reason_once_a_critical_task_failed() {
        let state = state();
        state.readiness.set(true);
        state.readiness.fail("critical task writer panicked: boom");
        let (status, body) = get_path(router(state.clone()), "/ready").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("\"status\":\"failed\"") && body.contains("writer panicked: boom"), "{body}");
        // Readiness cannot be set back: the daemon is on its way out.
        state.readiness.set(true);
        assert_eq!(get_path(router(state), "/ready").await.0, StatusCode::SERVICE_UNAVAILABLE);
    }

    #[tokio::test]
    async fn metrics_are_served_in_the_text_format() {
        let (status, body) = get_path(router(state()), "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        assert!(body.contains("exwatch_build_info{version=\""), "{body}");
    }

    #[tokio::test]
    async fn the_runbook_pages_link_to_is_served() {
        let (status, body) = get_path(router(state()), crate::alert::RUNBOOK_PATH).await;
        assert_eq!(status, StatusCode::OK);
        assert!(body.starts_with("# Runbook: Exchange API Failures"), "{body}");
        assert!(body.contains("### Scenario C: authentication"), "{body}");
    }

    #[tokio::test]
    async fn the_status_of_an_unknown_exchange_is_not_found_and_names_the_known_ones() {
        let (status, body) = get_path(router(state()), "/api/v1/status?exchange=nope").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert!(body.contains("unknown exchange \\\"nope\\\""), "{body}");
        let (status, body) = get_path(router(state()), "/api/v1/status").await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, r#"{"exchanges":[],"placeholders":[]}"#));
    }

    #[tokio::test]
    async fn the_root_leads_to_the_status_and_incidents_need_a_database() {
        let response = router(state())
            .oneshot(axum::http::Request::get("/").body(axum::body::Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::TEMPORARY_REDIRECT);
        assert_eq!(response.headers()[header::LOCATION], "/api/v1/status");
        let (status, body) = get_path(router(state()), "/api/v1/incidents/1").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert!(body.contains("no database"), "{body}");
        assert_eq!(get_path(router(state()), "/api/v1/incidents/x").await.0, StatusCode::BAD_REQUEST);
    }

    #[tokio::test]
    async fn unknown_paths_are_not_found() {
        assert_eq!(get_path(router(state()), "/nope").await.0, StatusCode::NOT_FOUND);
    }
}
