//! The admin API, the runbook's manual controls over HTTP: read and force each exchange's circuit breaker, and read
//! and set its rate factor (`adjustApiCallFrequency('kraken', 0.5)`).
//!
//! It is only mounted when `admin.token` is configured; every route then requires `Authorization: Bearer <token>`,
//! compared in constant time. Every answer is JSON, errors included (`{"error": "..."}`): axum's plain-text
//! rejections never reach a client. Bodies and answers are the [`api`](super::api) types the CLI reads too, which
//! also say which states may be forced; the limiter owns which factors are valid. This module only translates HTTP
//! to the breaker's and limiter's calls, logs each change once and never logs a token, presented or configured.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Request, State as Extract};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use chrono::{DateTime, SecondsFormat, Utc};
use prometheus::{IntCounter, Registry};
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;
use tokio::time::Instant;

use super::{State, Throttle, api};
use crate::breaker;
use crate::limiter;
use crate::poller::Control;
use crate::secret::Secret;
use crate::telemetry;

/// The admin routes, each behind the bearer token. The caller mounts them only when a token is configured.
pub fn routes(state: State) -> axum::Router<State> {
    axum::Router::new()
        .route("/api/admin/circuit-breaker/{exchange}", get(breaker_status).post(force_breaker))
        .route("/api/admin/circuit-breaker/{exchange}/reset", post(reset_breaker))
        .route("/api/admin/rate-limit/{exchange}", get(rate_limit_status).put(set_rate_factor))
        .route("/api/admin/rate-limit/{exchange}/resume-private", post(resume_private))
        .route_layer(middleware::from_fn_with_state(state, require_token))
}

/// An admin API error: a status and a message, answered as `{"error": message}`.
#[derive(Debug)]
struct Error {
    status: StatusCode,
    message: String,
}

impl Error {
    fn new(status: StatusCode, message: impl Into<String>) -> Error {
        Error { status, message: message.into() }
    }

    fn unprocessable(message: impl Into<String>) -> Error {
        Error::new(StatusCode::UNPROCESSABLE_ENTITY, message)
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let body = Json(serde_json::json!({"error": self.message}));
        if self.status == StatusCode::UNAUTHORIZED {
            (self.status, [(header::WWW_AUTHENTICATE, "Bearer")], body).into_response()
        } else {
            (self.status, body).into_response()
        }
    }
}

/// Maps axum's JSON rejections to JSON errors: syntax, content type and unreadable bodies are the client's
/// malformed request (400); well-formed JSON of the wrong shape is unprocessable (422).
impl From<JsonRejection> for Error {
    fn from(rejection: JsonRejection) -> Error {
        match rejection {
            JsonRejection::JsonDataError(error) => Error::unprocessable(error.body_text()),
            JsonRejection::MissingJsonContentType(_) => {
                Error::new(StatusCode::BAD_REQUEST, "expected a JSON body with content-type application/json")
            }
            other => Error::new(StatusCode::BAD_REQUEST, other.body_text()),
        }
    }
}

/// A request body as its [`api`] type. The body is read as a JSON object first: serde alone would also read a
/// struct from an array. The type names the field in each of its own refusals.
fn request<T: DeserializeOwned>(body: Result<Json<Map<String, Value>>, JsonRejection>) -> Result<T, Error> {
    let Json(object) = body?;
    serde_json::from_value(Value::Object(object)).map_err(|error| Error::unprocessable(error.to_string()))
}

/// Refuses a call without the configured bearer token. The presented token is never logged.
async fn require_token(Extract(state): Extract<State>, request: Request, next: Next) -> Response {
    let Some(expected) = &state.admin_token else {
        // `router` does not mount the admin API without a token; this only guards a future caller that does.
        return Error::new(StatusCode::NOT_FOUND, "the admin API is not configured").into_response();
    };
    match authorize(request.headers(), expected) {
        Ok(()) => next.run(request).await,
        Err(reason) => {
            state.admin_refusals.refused(request.method(), request.uri().path(), reason, Instant::now());
            Error::new(StatusCode::UNAUTHORIZED, reason).into_response()
        }
    }
}

/// Admin calls refused for want of a valid token: every one counted, at most one log line per
/// [`LOG_INTERVAL`](super::LOG_INTERVAL), so a client retrying a bad token in a loop cannot flood the log.
#[derive(Clone)]
pub struct Refusals {
    counter: IntCounter,
    throttle: Arc<Throttle>,
}

impl Refusals {
    pub fn new(registry: &Registry) -> Refusals {
        let counter = IntCounter::new(
            "exwatch_admin_requests_refused_total",
            "Admin API requests refused with 401 (missing, malformed or invalid bearer token).",
        )
        .expect("valid metric definition");
        Refusals { counter: telemetry::register(registry, counter), throttle: Arc::new(Throttle::default()) }
    }

    fn refused(&self, method: &Method, path: &str, reason: &str, now: Instant) {
        self.counter.inc();
        if let Some(suppressed) = self.throttle.admit(now) {
            tracing::warn!(%method, path, reason, suppressed, "Admin API call refused.");
        }
    }
}

/// Checks `Authorization: Bearer <token>`. Both tokens are hashed first, so the comparison takes the same time
/// whatever the presented token's length or content.
fn authorize(headers: &HeaderMap, expected: &Secret) -> Result<(), &'static str> {
    let value = headers.get(header::AUTHORIZATION).ok_or("missing bearer token in the Authorization header")?;
    let malformed = "malformed Authorization header: expected `Bearer <token>`";
    let value = value.to_str().map_err(|_| malformed)?;
    let (scheme, token) = value.split_once(' ').ok_or(malformed)?;
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
        return Err(malformed);
    }
    let presented = Sha256::digest(token.as_bytes());
    let configured = Sha256::digest(expected.expose().as_bytes());
    if bool::from(presented.as_slice().ct_eq(configured.as_slice())) { Ok(()) } else { Err("invalid bearer token") }
}

/// The controls of `exchange`, or a 404 naming the known exchanges.
fn control<'state>(state: &'state State, exchange: &str) -> Result<&'state Control, Error> {
    state.controls.get(exchange).ok_or_else(|| {
        let known = state.controls.keys().map(String::as_str).collect::<Vec<_>>().join(", ");
        Error::new(StatusCode::NOT_FOUND, format!("unknown exchange {exchange:?}; known exchanges: {known}"))
    })
}

/// The breaker's status: its snapshot with wall-clock times added and durations rounded to seconds.
fn breaker_status_now(exchange: &str, breaker: &breaker::Shared) -> api::BreakerStatus {
    let mut snapshot = breaker.snapshot();
    let now = Utc::now();
    let since = rfc3339(now, snapshot.in_state_for);
    let last_failure_time = snapshot.last_failure_ago.map(|ago| rfc3339(now, ago));
    snapshot.in_state_for = whole_seconds(snapshot.in_state_for);
    snapshot.last_failure_ago = snapshot.last_failure_ago.map(whole_seconds);
    snapshot.half_open_in = snapshot.half_open_in.map(seconds_left);
    api::BreakerStatus::new(exchange, snapshot, since, last_failure_time, &breaker.config())
}

/// The limiter's status with durations rounded to seconds.
fn rate_limit_status_now(exchange: &str, limiter: &limiter::Limiter) -> api::RateLimitStatus {
    let mut snapshot = limiter.snapshot(Instant::now());
    snapshot.last_rate_limited_ago = snapshot.last_rate_limited_ago.map(whole_seconds);
    snapshot.private_paused_for = snapshot.private_paused_for.map(seconds_left);
    api::RateLimitStatus::new(exchange, snapshot)
}

async fn breaker_status(Extract(state): Extract<State>, Path(exchange): Path<String>) -> Result<Response, Error> {
    let control = control(&state, &exchange)?;
    Ok(Json(breaker_status_now(&exchange, &control.breaker)).into_response())
}

async fn force_breaker(
    Extract(state): Extract<State>,
    Path(exchange): Path<String>,
    body: Result<Json<Map<String, Value>>, JsonRejection>,
) -> Result<Response, Error> {
    let control = control(&state, &exchange)?;
    let api::ForceRequest { state: target } = request(body)?;
    let transition = control.breaker.force(target);
    let change = change(&exchange, &control.breaker, transition, target);
    tracing::info!(
        action = "force",
        exchange,
        from = change.from.as_str(),
        to = change.to.as_str(),
        changed = change.changed,
        "Admin API forced the circuit breaker."
    );
    Ok(Json(change).into_response())
}

async fn reset_breaker(Extract(state): Extract<State>, Path(exchange): Path<String>) -> Result<Response, Error> {
    let control = control(&state, &exchange)?;
    let transition = control.breaker.reset();
    let change = change(&exchange, &control.breaker, transition, breaker::State::Closed);
    tracing::info!(
        action = "reset",
        exchange,
        from = change.from.as_str(),
        to = change.to.as_str(),
        changed = change.changed,
        "Admin API reset the circuit breaker."
    );
    Ok(Json(change).into_response())
}

/// Reads `bytes` as the body of each admin request that has one, as the handlers do (JSON, the one field, its
/// value, the limiter's range), and returns the status each would answer. For the fuzz harness (`exwatch::fuzz`).
#[doc(hidden)]
pub fn answer_bodies(bytes: &[u8], limiter: &limiter::Limiter) -> [StatusCode; 2] {
    let body = || Json::<Map<String, Value>>::from_bytes(bytes);
    let breaker = match request::<api::ForceRequest>(body()) {
        Ok(_) => StatusCode::OK,
        Err(error) => error.status,
    };
    let factor = match request::<api::RateFactorRequest>(body())
        .and_then(|request| limiter.set_factor(request.factor).map_err(|error| Error::unprocessable(error.to_string())))
    {
        Ok(()) => StatusCode::OK,
        Err(error) => error.status,
    };
    [breaker, factor]
}

/// Describes an operator's change; without a transition the breaker already was in `target`.
fn change(
    exchange: &str,
    breaker: &breaker::Shared,
    transition: Option<breaker::Transition>,
    target: breaker::State,
) -> api::BreakerChange {
    let (from, to) = transition.as_ref().map_or((target, target), |transition| (transition.from, transition.to));
    api::BreakerChange {
        exchange: exchange.to_owned(),
        from,
        to,
        changed: transition.is_some(),
        status: breaker_status_now(exchange, breaker),
    }
}

async fn rate_limit_status(Extract(state): Extract<State>, Path(exchange): Path<String>) -> Result<Response, Error> {
    let control = control(&state, &exchange)?;
    Ok(Json(rate_limit_status_now(&exchange, &control.limiter)).into_response())
}

async fn set_rate_factor(
    Extract(state): Extract<State>,
    Path(exchange): Path<String>,
    body: Result<Json<Map<String, Value>>, JsonRejection>,
) -> Result<Response, Error> {
    let control = control(&state, &exchange)?;
    let api::RateFactorRequest { factor } = request(body)?;
    control.limiter.set_factor(factor).map_err(|error| Error::unprocessable(error.to_string()))?;
    tracing::info!(action = "set_rate_factor", exchange, factor, "Admin API set the rate factor.");
    Ok(Json(rate_limit_status_now(&exchange, &control.limiter)).into_response())
}

/// Ends a private-call pause now (the key was fixed), without waiting for the next re-check or a restart.
async fn resume_private(Extract(state): Extract<State>, Path(exchange): Path<String>) -> Result<Response, Error> {
    let control = control(&state, &exchange)?;
    let resumed = control.limiter.resume_private(tokio::time::Instant::now());
    tracing::info!(action = "resume_private", exchange, resumed, "Admin API resumed private calls.");
    Ok(Json(rate_limit_status_now(&exchange, &control.limiter)).into_response())
}

/// The wall-clock time `ago` before `now`, in RFC 3339 with milliseconds.
fn rfc3339(now: DateTime<Utc>, ago: Duration) -> String {
    let ago = chrono::Duration::from_std(ago).unwrap_or(chrono::Duration::zero());
    (now - ago).to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// An elapsed time as whole seconds, for people to read.
fn whole_seconds(duration: Duration) -> Duration {
    Duration::from_secs(duration.as_secs())
}

/// A remaining time rounded up, so it never reads `0s` while it still runs.
fn seconds_left(duration: Duration) -> Duration {
    Duration::from_secs(duration.as_secs() + u64::from(duration.subsec_nanos() > 0))
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    fn headers(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, HeaderValue::from_str(value).unwrap());
        headers
    }

    #[test]
    fn only_the_exact_bearer_token_is_authorized() {
        let expected = Secret::new("0123456789abcdef");
        assert_eq!(authorize(&headers("Bearer 0123456789abcdef"), &expected), Ok(()));
        assert_eq!(authorize(&headers("bearer 0123456789abcdef"), &expected), Ok(()));
        assert_eq!(authorize(&headers("Bearer 0123456789abcdeX"), &expected), Err("invalid bearer token"));
        assert_eq!(authorize(&headers("Bearer 0123456789abcdef0"), &expected), Err("invalid bearer token"));
        assert!(authorize(&headers("Basic 0123456789abcdef"), &expected).unwrap_err().starts_with("malformed"));
        assert!(authorize(&headers("Bearer"), &expected).unwrap_err().starts_with("malformed"));
        assert!(authorize(&headers("Bearer "), &expected).unwrap_err().starts_with("malformed"));
        assert!(authorize(&HeaderMap::new(), &expected).unwrap_err().starts_with("missing"));
    }

    /// Collects what the log would print, for assertions on how often a line appears.
    #[derive(Clone, Default)]
    struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Captured {
        fn lines(&self, containing: &str) -> Vec<String> {
            let text = String::from_utf8(self.0.lock().unwrap().clone()).unwrap();
            text.lines().filter(|line| line.contains(containing)).map(str::to_owned).collect()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn refused_admin_calls_are_all_counted_but_logged_at_most_once_per_second_with_the_rest_counted() {
        use axum::body::Body;
        use tower::ServiceExt as _;

        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt().with_writer(move || writer.clone()).with_ansi(false).finish();
        let _guard = tracing::subscriber::set_default(subscriber);
        let registry = crate::telemetry::registry();
        let state = State {
            registry: registry.clone(),
            heartbeat: Arc::new(crate::poller::Heartbeat::new()),
            readiness: Arc::new(super::super::Readiness::default()),
            controls: Arc::new(std::collections::BTreeMap::new()),
            admin_token: Some(Secret::new("0123456789abcdef")),
            log: None,
            admin_refusals: Refusals::new(&registry),
            placeholders: Arc::default(),
            database: None,
            statuspages: Arc::default(),
            websockets: Arc::default(),
        };
        let refuse = |token: &'static str| {
            let router = super::super::router(state.clone());
            async move {
                let request = axum::http::Request::get("/api/admin/rate-limit/kraken")
                    .header(header::AUTHORIZATION, format!("Bearer {token}"))
                    .body(Body::empty())
                    .unwrap();
                router.oneshot(request).await.unwrap().status()
            }
        };
        for _ in 0..20 {
            assert_eq!(refuse("wrong-token").await, StatusCode::UNAUTHORIZED);
        }
        assert_eq!(captured.lines("Admin API call refused.").len(), 1);
        tokio::time::advance(crate::http::LOG_INTERVAL).await;
        assert_eq!(refuse("still-wrong").await, StatusCode::UNAUTHORIZED);
        let lines = captured.lines("Admin API call refused.");
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(lines[1].contains("suppressed=19"), "{}", lines[1]);
        assert!(lines.iter().all(|line| !line.contains("wrong-token") && !line.contains("0123456789abcdef")));
        let text = crate::telemetry::encode(&registry).unwrap();
        assert_eq!(crate::telemetry::sample(&text, "exwatch_admin_requests_refused_total", &[]), Some(21.0));
    }

    #[test]
    fn remaining_times_round_up_and_elapsed_times_down() {
        assert_eq!(seconds_left(Duration::from_millis(54_100)), Duration::from_secs(55));
        assert_eq!(seconds_left(Duration::from_secs(55)), Duration::from_secs(55));
        assert_eq!(whole_seconds(Duration::from_millis(65_900)), Duration::from_secs(65));
    }
}
