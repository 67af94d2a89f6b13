//! The admin API over real HTTP against the daemon and the simulator, and the `breaker` and `rate-limit` commands
//! of the binary against that daemon, as on-call would use them during the runbook.

use std::process::Stdio;
use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use tokio::process::Command;

use crate::helpers::{ADMIN_TOKEN, TestApp, admin_config, config, eventually, metric, spawn_app, start_simulator};

const BREAKER: &str = "/api/admin/circuit-breaker/kraken";
const RATE_LIMIT: &str = "/api/admin/rate-limit/kraken";

struct Answer {
    status: u16,
    www_authenticate: Option<String>,
    content_type: Option<String>,
    body: Value,
    text: String,
}

/// One call with the test token (`Some`), another `Authorization` value, or none.
async fn call(app: &TestApp, method: Method, path: &str, authorization: Option<&str>, body: Option<&str>) -> Answer {
    let mut request = app.http.request(method, app.url(path));
    if let Some(authorization) = authorization {
        request = request.header("authorization", authorization);
    }
    if let Some(body) = body {
        request = request.header("content-type", "application/json").body(body.to_owned());
    }
    let response = request.send().await.expect("daemon answers");
    let header = |name: &str| response.headers().get(name).map(|value| value.to_str().unwrap().to_owned());
    let www_authenticate = header("www-authenticate");
    let content_type = header("content-type");
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    Answer { status, www_authenticate, content_type, body: serde_json::from_str(&text).unwrap_or(Value::Null), text }
}

fn bearer() -> String {
    format!("Bearer {ADMIN_TOKEN}")
}

async fn get(app: &TestApp, path: &str) -> Answer {
    call(app, Method::GET, path, Some(&bearer()), None).await
}

async fn force(app: &TestApp, state: &str) -> Answer {
    call(app, Method::POST, BREAKER, Some(&bearer()), Some(&json!({"state": state}).to_string())).await
}

async fn put_factor(app: &TestApp, body: &str) -> Answer {
    call(app, Method::PUT, RATE_LIMIT, Some(&bearer()), Some(body)).await
}

async fn admin_app() -> (exwatch::simulator::Simulator, TestApp) {
    let simulator = start_simulator().await;
    let app = spawn_app(admin_config(&simulator.base_url(), "200ms", "150ms")).await;
    (simulator, app)
}

fn assert_json_error(answer: &Answer, status: u16, needle: &str) {
    assert_eq!(answer.status, status, "{}", answer.text);
    assert_eq!(answer.content_type.as_deref(), Some("application/json"), "{}", answer.text);
    let message = answer.body["error"].as_str().unwrap_or_else(|| panic!("no error message: {}", answer.text));
    assert!(message.contains(needle), "{needle:?} not in {message:?}");
}

fn breaker_state_metric(text: &str, state: &str) -> Option<f64> {
    metric(text, "exwatch_circuit_breaker_state", &[("exchange", "kraken"), ("state", state)])
}

#[tokio::test]
async fn admin_calls_without_the_bearer_token_are_refused_with_401() {
    let (_simulator, app) = admin_app().await;
    let wrong = format!("Bearer {ADMIN_TOKEN}x");
    let cases = [
        (None, "missing"),
        (Some(wrong.as_str()), "invalid bearer token"),
        (Some("Bearer wrong"), "invalid bearer token"),
        (Some(ADMIN_TOKEN), "malformed"),
        (Some("Basic dXNlcjpwYXNz"), "malformed"),
        (Some("Bearer "), "malformed"),
    ];
    for (authorization, needle) in cases {
        for (method, path) in [(Method::GET, BREAKER), (Method::POST, BREAKER), (Method::PUT, RATE_LIMIT)] {
            let body = (method != Method::GET).then_some(r#"{"state":"FORCED_OPEN","factor":0.5}"#);
            let answer = call(&app, method.clone(), path, authorization, body).await;
            assert_json_error(&answer, 401, needle);
            assert_eq!(answer.www_authenticate.as_deref(), Some("Bearer"), "{method} {path} {authorization:?}");
            assert!(!answer.text.contains(ADMIN_TOKEN), "{}", answer.text);
        }
    }
    // Nothing was changed by the refused calls.
    assert_eq!(get(&app, BREAKER).await.body["state"], "CLOSED");
    assert_eq!(get(&app, RATE_LIMIT).await.body["factor"], 1.0);
}

#[tokio::test]
async fn breaker_status_has_the_runbook_fields() {
    let (_simulator, app) = admin_app().await;
    let before = chrono::Utc::now();
    let answer = get(&app, BREAKER).await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    let status = answer.body;
    assert_eq!(status["exchange"], "kraken");
    assert_eq!(status["state"], "CLOSED");
    let since = chrono::DateTime::parse_from_rfc3339(status["since"].as_str().unwrap()).unwrap();
    assert!(since <= before + chrono::Duration::seconds(1), "{since} is in the future");
    assert!(since >= before - chrono::Duration::seconds(60), "{since} is too old");
    for key in
        ["failure_count", "consecutive_failures", "not_permitted_calls", "calls_in_window", "slow_calls_in_window"]
    {
        assert!(status[key].is_u64(), "{key}: {status}");
    }
    for key in ["failure_rate", "slow_call_rate"] {
        assert!(status[key].is_f64(), "{key}: {status}");
    }
    assert!(status["in_state_for"].is_string(), "{status}");
    assert!(status["last_failure_time"].is_null() && status["last_failure_class"].is_null(), "{status}");
    assert!(status["half_open_in"].is_null(), "{status}");
    assert_eq!(status["config"]["consecutive_failures"], 3, "{status}");
    assert_eq!(status["config"]["minimum_calls"], 5, "{status}");
}

#[tokio::test]
async fn a_failing_exchange_shows_in_the_status_with_wall_clock_times() {
    let simulator = start_simulator().await;
    simulator.set_scenario(exwatch::simulator::Scenario::Unavailable);
    let app = spawn_app(admin_config(&simulator.base_url(), "100ms", "90ms")).await;
    let status = eventually(Duration::from_secs(10), "the breaker to open", || async {
        let status = get(&app, BREAKER).await.body;
        (status["state"] == "OPEN").then_some(status)
    })
    .await;
    assert!(status["consecutive_failures"].as_u64().unwrap() >= 3, "{status}");
    assert!(status["failure_count"].as_u64().unwrap() >= 3, "{status}");
    assert_eq!(status["last_failure_class"], "maintenance", "{status}");
    let last_failure = chrono::DateTime::parse_from_rfc3339(status["last_failure_time"].as_str().unwrap()).unwrap();
    assert!(last_failure <= chrono::Utc::now(), "{status}");
    assert!(status["half_open_in"].is_string(), "{status}");
}

#[tokio::test]
async fn each_forced_state_is_reflected_in_the_status_and_the_metrics() {
    let (_simulator, app) = admin_app().await;
    let mut previous = "CLOSED";
    for target in ["FORCED_OPEN", "DISABLED", "METRICS_ONLY", "CLOSED"] {
        let answer = force(&app, target).await;
        assert_eq!(answer.status, 200, "{}", answer.text);
        assert_eq!(answer.body["exchange"], "kraken");
        assert_eq!(answer.body["from"], previous, "{}", answer.text);
        assert_eq!(answer.body["to"], target, "{}", answer.text);
        assert_eq!(answer.body["changed"], true, "{}", answer.text);
        assert_eq!(answer.body["status"]["state"], target, "{}", answer.text);
        assert_eq!(get(&app, BREAKER).await.body["state"], target);

        let metrics = app.metrics().await;
        let label = target.to_lowercase();
        assert_eq!(breaker_state_metric(&metrics, &label), Some(1.0), "{target}");
        for other in ["closed", "open", "half_open", "forced_open", "disabled", "metrics_only"] {
            if other != label {
                assert_eq!(breaker_state_metric(&metrics, other), Some(0.0), "{other} while {target}");
            }
        }
        let transitions = metric(
            &metrics,
            "exwatch_circuit_breaker_transitions_total",
            &[("exchange", "kraken"), ("from", &previous.to_lowercase()), ("to", &label)],
        );
        assert_eq!(transitions, Some(1.0), "{previous} -> {target}");
        previous = target;
    }

    // Forcing the state it is already in changes nothing.
    let answer = force(&app, "CLOSED").await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    assert_eq!(
        (&answer.body["from"], &answer.body["to"], &answer.body["changed"]),
        (&json!("CLOSED"), &json!("CLOSED"), &json!(false))
    );
}

#[tokio::test]
async fn reset_closes_the_breaker_and_clears_its_counters() {
    let (_simulator, app) = admin_app().await;
    assert_eq!(force(&app, "FORCED_OPEN").await.status, 200);
    // The poll loop is refused while FORCED_OPEN, which the status counts.
    eventually(Duration::from_secs(10), "refused calls while forced open", || async {
        (get(&app, BREAKER).await.body["not_permitted_calls"].as_u64() > Some(0)).then_some(())
    })
    .await;

    let answer = call(&app, Method::POST, &format!("{BREAKER}/reset"), Some(&bearer()), None).await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    assert_eq!(answer.body["from"], "FORCED_OPEN");
    assert_eq!(answer.body["to"], "CLOSED");
    assert_eq!(answer.body["changed"], true);
    assert_eq!(answer.body["status"]["state"], "CLOSED");
    assert_eq!(answer.body["status"]["not_permitted_calls"], 0, "{}", answer.text);
    assert_eq!(get(&app, BREAKER).await.body["state"], "CLOSED");
    let metrics = app.metrics().await;
    assert_eq!(breaker_state_metric(&metrics, "closed"), Some(1.0));
    assert_eq!(breaker_state_metric(&metrics, "forced_open"), Some(0.0));
    let transitions = metric(
        &metrics,
        "exwatch_circuit_breaker_transitions_total",
        &[("exchange", "kraken"), ("from", "forced_open"), ("to", "closed")],
    );
    assert_eq!(transitions, Some(1.0));
}

#[tokio::test]
async fn forcing_half_open_starts_the_recovery_trial_at_once() {
    let (_simulator, app) = admin_app().await;
    assert_eq!(force(&app, "FORCED_OPEN").await.status, 200);
    let answer = force(&app, "HALF_OPEN").await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    assert_eq!(answer.body["from"], "FORCED_OPEN");
    assert_eq!(answer.body["to"], "HALF_OPEN");
    assert_eq!(answer.body["changed"], true);
    let metrics = app.metrics().await;
    let transitions = metric(
        &metrics,
        "exwatch_circuit_breaker_transitions_total",
        &[("exchange", "kraken"), ("from", "forced_open"), ("to", "half_open")],
    );
    assert_eq!(transitions, Some(1.0));
    // The trial runs against the healthy simulator and closes the breaker.
    eventually(Duration::from_secs(10), "the trial to close the breaker", || async {
        let metrics = app.metrics().await;
        let closed = metric(
            &metrics,
            "exwatch_circuit_breaker_transitions_total",
            &[("exchange", "kraken"), ("from", "half_open"), ("to", "closed")],
        );
        (closed == Some(1.0)).then_some(())
    })
    .await;
}

#[tokio::test]
async fn bad_requests_are_answered_with_json_errors() {
    let (_simulator, app) = admin_app().await;
    let token = bearer();
    let token = Some(token.as_str());

    for (method, path) in [
        (Method::GET, "/api/admin/circuit-breaker/binance"),
        (Method::POST, "/api/admin/circuit-breaker/binance/reset"),
        (Method::GET, "/api/admin/rate-limit/binance"),
    ] {
        let answer = call(&app, method, path, token, None).await;
        assert_json_error(&answer, 404, "\"binance\"");
        assert_json_error(&answer, 404, "known exchanges: kraken");
    }
    let answer =
        call(&app, Method::POST, "/api/admin/circuit-breaker/binance", token, Some(r#"{"state":"CLOSED"}"#)).await;
    assert_json_error(&answer, 404, "\"binance\"");
    let answer = call(&app, Method::PUT, "/api/admin/rate-limit/binance", token, Some(r#"{"factor":0.5}"#)).await;
    assert_json_error(&answer, 404, "\"binance\"");

    // Not JSON, or not declared as JSON: 400.
    for (path, method) in [(BREAKER, Method::POST), (RATE_LIMIT, Method::PUT)] {
        let answer = call(&app, method.clone(), path, token, Some("{not json")).await;
        assert_json_error(&answer, 400, "");
        let answer = call(&app, method.clone(), path, token, None).await;
        assert_json_error(&answer, 400, "content-type application/json");
        let response = app
            .http
            .request(method, app.url(path))
            .header("authorization", bearer())
            .header("content-type", "text/plain")
            .body(r#"{"state":"CLOSED","factor":0.5}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 400);
        let body: Value = serde_json::from_str(&response.text().await.unwrap()).unwrap();
        assert!(body["error"].as_str().unwrap().contains("content-type"), "{body}");
    }

    // JSON of the wrong shape or value: 422, naming the problem.
    for (body, needle) in [
        (r#"{"state":"SIDEWAYS"}"#, "unknown state \"SIDEWAYS\""),
        (r#"{"state":"OPEN"}"#, "use FORCED_OPEN"),
        (r#"{"state":"half_open"}"#, "allowed: HALF_OPEN, FORCED_OPEN, DISABLED, METRICS_ONLY, CLOSED"),
        (r#"{"state":3}"#, "state"),
        (r#"{}"#, "missing field `state`"),
        (r#"{"state":"CLOSED","extra":1}"#, "unknown field `extra`"),
        (r#"["CLOSED"]"#, "invalid type"),
    ] {
        assert_json_error(&call(&app, Method::POST, BREAKER, token, Some(body)).await, 422, needle);
    }
    for (body, needle) in [
        (r#"{"factor":0}"#, "factor must be greater than 0 and at most 1, got 0"),
        (r#"{"factor":1.5}"#, "factor must be greater than 0 and at most 1, got 1.5"),
        (r#"{"factor":-1}"#, "factor must be greater than 0 and at most 1, got -1"),
        (r#"{"factor":1e-300}"#, "factor must be at least 0.125 (rate_limit.min_factor), got 1e-300"),
        (r#"{"factor":"x"}"#, "factor"),
        (r#"{"factor":null}"#, "factor"),
        (r#"{}"#, "missing field `factor`"),
    ] {
        assert_json_error(&put_factor(&app, body).await, 422, needle);
    }

    // None of it changed anything.
    assert_eq!(get(&app, BREAKER).await.body["state"], "CLOSED");
    assert_eq!(get(&app, RATE_LIMIT).await.body["factor"], 1.0);
}

#[tokio::test]
async fn the_rate_factor_is_read_and_set_through_the_admin_api() {
    let (_simulator, app) = admin_app().await;
    let answer = get(&app, RATE_LIMIT).await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    assert_eq!(answer.body["exchange"], "kraken");
    assert_eq!(answer.body["factor"], 1.0);
    assert_eq!(answer.body["ceiling"], 1.0);
    assert_eq!(answer.body["public_per_second"], 50.0, "the test configuration's budget");
    assert_eq!(answer.body["recent_rate_limited"], 0);
    assert!(answer.body["private_paused_for"].is_null(), "{}", answer.text);

    let answer = put_factor(&app, r#"{"factor":0.5}"#).await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    assert_eq!(answer.body["exchange"], "kraken");
    assert_eq!(answer.body["factor"], 0.5);
    assert_eq!(answer.body["ceiling"], 0.5);
    assert_eq!(answer.body["public_per_second"], 25.0);
    assert_eq!(get(&app, RATE_LIMIT).await.body["factor"], 0.5);
    let metrics = app.metrics().await;
    assert_eq!(metric(&metrics, "exwatch_rate_limit_factor", &[("exchange", "kraken")]), Some(0.5));

    assert_eq!(put_factor(&app, r#"{"factor":1}"#).await.status, 200);
    let metrics = app.metrics().await;
    assert_eq!(metric(&metrics, "exwatch_rate_limit_factor", &[("exchange", "kraken")]), Some(1.0));
}

#[tokio::test]
async fn admin_paths_are_not_found_without_a_configured_token() {
    let simulator = start_simulator().await;
    let app = spawn_app(config(&simulator.base_url(), "200ms", "150ms", false)).await;
    let token = bearer();
    for (method, path) in [
        (Method::GET, BREAKER),
        (Method::POST, BREAKER),
        (Method::POST, "/api/admin/circuit-breaker/kraken/reset"),
        (Method::GET, RATE_LIMIT),
        (Method::PUT, RATE_LIMIT),
    ] {
        for authorization in [None, Some(token.as_str())] {
            let body = (method != Method::GET).then_some(r#"{"state":"FORCED_OPEN","factor":0.5}"#);
            let answer = call(&app, method.clone(), path, authorization, body).await;
            assert_eq!(answer.status, 404, "{method} {path}: {}", answer.text);
        }
    }
    let metrics = app.metrics().await;
    assert_eq!(breaker_state_metric(&metrics, "closed"), Some(1.0));
}

#[tokio::test]
async fn health_stays_ok_while_the_breaker_is_forced_open() {
    let (_simulator, app) = admin_app().await;
    assert_eq!(force(&app, "FORCED_OPEN").await.status, 200);
    let ticks = |metrics: &str| metric(metrics, "exwatch_poll_ticks_total", &[("exchange", "kraken")]).unwrap_or(0.0);
    let start = ticks(&app.metrics().await);
    // More than the three intervals after which a loop that stopped ticking would fail liveness.
    eventually(Duration::from_secs(10), "five poll ticks while forced open", || async {
        (ticks(&app.metrics().await) >= start + 5.0).then_some(())
    })
    .await;
    let (status, body) = app.get("/health").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(get(&app, BREAKER).await.body["state"], "FORCED_OPEN");
    let status = get(&app, BREAKER).await.body;
    assert!(status["not_permitted_calls"].as_u64().unwrap() >= 5, "{status}");
}

struct Output {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs the binary with a clean environment; `token` goes to the child only, through EXWATCH__ADMIN__TOKEN.
async fn exwatch(arguments: &[&str], token: Option<&str>) -> Output {
    let directory = tempfile::tempdir().unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_exwatch"));
    command
        .args(arguments)
        .current_dir(directory.path())
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .stdin(Stdio::null());
    if let Some(token) = token {
        command.env("EXWATCH__ADMIN__TOKEN", token);
    }
    let output = tokio::time::timeout(Duration::from_secs(60), command.output()).await.expect("finishes").unwrap();
    Output {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

#[tokio::test]
async fn the_cli_reads_and_forces_the_breaker_and_sets_the_rate_factor() {
    let (_simulator, app) = admin_app().await;
    let url = format!("http://{}", app.address);

    let output = exwatch(&["breaker", "status", "--url", &url], Some(ADMIN_TOKEN)).await;
    assert_eq!(output.code, Some(0), "{}{}", output.stdout, output.stderr);
    assert!(output.stdout.starts_with("kraken: CLOSED since "), "{}", output.stdout);
    assert!(output.stdout.contains("; consecutive failures "), "{}", output.stdout);
    assert!(output.stdout.contains("; not permitted 0"), "{}", output.stdout);

    let output = exwatch(&["breaker", "force-open", "--url", &url, "--exchange", "kraken"], Some(ADMIN_TOKEN)).await;
    assert_eq!(output.code, Some(0), "{}{}", output.stdout, output.stderr);
    assert!(
        output.stdout.starts_with("kraken: CLOSED -> FORCED_OPEN\nkraken: FORCED_OPEN since "),
        "{}",
        output.stdout
    );
    assert_eq!(get(&app, BREAKER).await.body["state"], "FORCED_OPEN");

    let output = exwatch(&["breaker", "force-open", "--url", &url], Some(ADMIN_TOKEN)).await;
    assert_eq!(output.code, Some(0), "{}{}", output.stdout, output.stderr);
    assert!(output.stdout.starts_with("kraken: already FORCED_OPEN\n"), "{}", output.stdout);

    let output = exwatch(&["breaker", "reset", "--url", &url], Some(ADMIN_TOKEN)).await;
    assert_eq!(output.code, Some(0), "{}{}", output.stdout, output.stderr);
    assert!(output.stdout.starts_with("kraken: FORCED_OPEN -> CLOSED\n"), "{}", output.stdout);

    let output = exwatch(&["rate-limit", "set", "0.5", "--url", &url], Some(ADMIN_TOKEN)).await;
    assert_eq!(output.code, Some(0), "{}{}", output.stdout, output.stderr);
    assert!(output.stdout.starts_with("kraken: factor 0.5 (ceiling 0.5); public 25.00/s"), "{}", output.stdout);
    let metrics = app.metrics().await;
    assert_eq!(metric(&metrics, "exwatch_rate_limit_factor", &[("exchange", "kraken")]), Some(0.5));

    let output = exwatch(&["rate-limit", "status", "--url", &url], Some(ADMIN_TOKEN)).await;
    assert_eq!(output.code, Some(0), "{}{}", output.stdout, output.stderr);
    assert!(output.stdout.starts_with("kraken: factor 0.5 "), "{}", output.stdout);
    assert!(!output.stdout.contains(ADMIN_TOKEN) && !output.stderr.contains(ADMIN_TOKEN));

    // Ending a private-call pause that is not in force is harmless and answers the status.
    let output = exwatch(&["rate-limit", "resume-private", "--url", &url], Some(ADMIN_TOKEN)).await;
    assert_eq!(output.code, Some(0), "{}{}", output.stdout, output.stderr);
    assert!(output.stdout.starts_with("kraken: factor 0.5 ") && !output.stdout.contains("paused"), "{}", output.stdout);
}

#[tokio::test]
async fn the_cli_exits_non_zero_with_the_servers_error() {
    let (_simulator, app) = admin_app().await;
    let url = format!("http://{}", app.address);
    let wrong = "the-wrong-admin-token";

    let output = exwatch(&["breaker", "force-open", "--url", &url], Some(wrong)).await;
    assert_eq!(output.code, Some(1), "{}{}", output.stdout, output.stderr);
    assert!(output.stderr.contains("401") && output.stderr.contains("invalid bearer token"), "{}", output.stderr);
    assert!(!output.stderr.contains(wrong) && !output.stdout.contains(wrong), "{}", output.stderr);
    assert_eq!(get(&app, BREAKER).await.body["state"], "CLOSED");

    let output = exwatch(&["rate-limit", "set", "1.5", "--url", &url], Some(ADMIN_TOKEN)).await;
    assert_eq!(output.code, Some(1), "{}{}", output.stdout, output.stderr);
    assert!(output.stderr.contains("factor must be greater than 0 and at most 1, got 1.5"), "{}", output.stderr);

    let output = exwatch(&["breaker", "status", "--url", &url, "--exchange", "binance"], Some(ADMIN_TOKEN)).await;
    assert_eq!(output.code, Some(1), "{}{}", output.stdout, output.stderr);
    assert!(output.stderr.contains("unknown exchange \"binance\""), "{}", output.stderr);

    // No token anywhere: a usage problem, exit 2, nothing sent.
    let output = exwatch(&["breaker", "status", "--url", &url], None).await;
    assert_eq!(output.code, Some(2), "{}{}", output.stdout, output.stderr);
    assert!(output.stderr.contains("no admin token configured"), "{}", output.stderr);
}
