//! Every outbound client against servers that are not what they should be: an exchange, a webhook or an
//! "admin API" that redirects to a second host (which must never hear from exwatch), and CLI admin commands
//! against servers that are not exwatch or against nothing at all.

use std::net::SocketAddr;
use std::time::Duration;

use axum::http::{HeaderValue, StatusCode, header};
use exwatch::config::Config;
use exwatch::exchange::kraken::Client;
use exwatch::exchange::{ErrorClass, Exchange};
use exwatch::simulator::{Scenario, Simulator};
use tokio_util::sync::CancellationToken;

use crate::cli::exwatch;
use crate::helpers::{
    ADMIN_TOKEN, Capture, FAST_RATE_LIMIT, SIMULATOR_API_KEY, SIMULATOR_API_SECRET, eventually, install_tls_provider,
    metric, scratch_database, spawn_app, start_simulator,
};

const WAIT: Duration = Duration::from_secs(20);

const REDIRECTS: [(Scenario, u16); 5] = [
    (Scenario::Redirect301, 301),
    (Scenario::Redirect302, 302),
    (Scenario::Redirect303, 303),
    (Scenario::Redirect307, 307),
    (Scenario::Redirect308, 308),
];

/// A capturing second host, with a URL that carries userinfo and a query that must never be shown.
async fn second_host() -> (Capture, SocketAddr, CancellationToken) {
    let capture = Capture::default();
    let (address, stop) = capture.serve().await;
    (capture, address, stop)
}

fn second_host_url(address: SocketAddr) -> url::Url {
    url::Url::parse(&format!("http://thief:hunter2@{address}/stolen/?token=leaked")).unwrap()
}

/// Asserts the second host heard nothing: no request, so no API-Key, API-Sign, body, token or signature.
fn assert_nothing_reached(capture: &Capture, context: &str) {
    let received = capture.received();
    assert!(received.is_empty(), "{context}: the second host received {received:?}");
}

/// A simulator redirecting (with `scenario`) to the second host.
async fn redirecting_simulator(scenario: Scenario, second: SocketAddr) -> Simulator {
    let simulator = start_simulator().await;
    simulator.set_redirect_to(second_host_url(second));
    simulator.set_scenario(scenario);
    simulator
}

fn client_with_credentials(base_url: &str) -> Client {
    install_tls_provider();
    let config = Config::from_toml(&format!(
        "[[exchanges]]\nbase_url = \"{base_url}\"\npair = \"XBTAUD\"\napi_key = \"{SIMULATOR_API_KEY}\"\napi_secret = \"{SIMULATOR_API_SECRET}\"\n"
    ))
    .unwrap();
    Client::new(&config.exchanges[0].exchange, Duration::from_secs(2)).unwrap()
}

/// Runs an admin command with `--config` naming a file that holds the admin token.
async fn admin_cli(arguments: &[&str], token: Option<&str>) -> crate::cli::Output {
    let directory = tempfile::tempdir().unwrap();
    let config = token.map(|token| format!("[admin]\ntoken = \"{token}\"\n")).unwrap_or_default();
    std::fs::write(directory.path().join("exwatch.toml"), config).unwrap();
    let mut arguments = arguments.to_vec();
    arguments.extend(["--config", "exwatch.toml"]);
    exwatch(&arguments, directory.path()).await
}

/// A server that answers every request with `status` and a `Location` to `location`.
async fn redirector(status: u16, location: String) -> (SocketAddr, CancellationToken) {
    let router = axum::Router::new().fallback(move || {
        let location = location.clone();
        async move {
            let mut response = axum::response::Response::new(axum::body::Body::from("moved"));
            *response.status_mut() = StatusCode::from_u16(status).unwrap();
            response.headers_mut().insert(header::LOCATION, HeaderValue::from_str(&location).unwrap());
            response
        }
    });
    serve_router(router).await
}

async fn serve_router(router: axum::Router) -> (SocketAddr, CancellationToken) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let shutdown = stop.clone().cancelled_owned();
    tokio::spawn(async move { axum::serve(listener, router).with_graceful_shutdown(shutdown).await });
    (address, stop)
}

// ---------------------------------------------------------------------------------------------------------------
// The exchange client
// ---------------------------------------------------------------------------------------------------------------

#[tokio::test]
async fn every_redirect_of_the_exchange_is_a_bad_response_naming_the_host_and_sends_nothing_there() {
    let (capture, second, _stop) = second_host().await;
    for (scenario, status) in REDIRECTS {
        let simulator = redirecting_simulator(scenario, second).await;
        let client = client_with_credentials(&simulator.base_url());
        let ticker = client.ticker().await.result.unwrap_err();
        // The signed POST: a client that followed a 307/308 would re-send API-Key, API-Sign and the body.
        let balance = client.balance().await.result.unwrap_err();
        for error in [ticker, balance] {
            assert_eq!(error.class, ErrorClass::BadResponse, "{scenario}: {error}");
            assert_eq!(error.http_status, Some(status), "{scenario}");
            assert_eq!(error.message, format!("http {status} redirect to {second} (not followed)"), "{scenario}");
            for hidden in ["thief", "hunter2", "token", "leaked", "stolen"] {
                assert!(!error.message.contains(hidden), "{scenario}: {}", error.message);
            }
        }
        assert_eq!(simulator.requests("Balance"), 1, "{scenario}: the balance call reached the simulator");
        assert_nothing_reached(&capture, scenario.as_str());
    }
}

#[tokio::test]
async fn probe_exits_1_naming_the_redirect_for_every_code_and_the_second_host_hears_nothing() {
    let (capture, second, _stop) = second_host().await;
    for (scenario, status) in REDIRECTS {
        let simulator = redirecting_simulator(scenario, second).await;
        let directory = tempfile::tempdir().unwrap();
        let config = format!(
            "[poll]\ntimeout = \"2s\"\n[[exchanges]]\nname = \"kraken\"\nbase_url = \"{}\"\n\
             api_key = \"{SIMULATOR_API_KEY}\"\napi_secret = \"{SIMULATOR_API_SECRET}\"\n",
            simulator.base_url()
        );
        std::fs::write(directory.path().join("exwatch.toml"), config).unwrap();
        let output = exwatch(&["probe", "--config", "exwatch.toml"], directory.path()).await;
        assert_eq!(output.code, Some(1), "{scenario}: {}{}", output.stdout, output.stderr);
        assert!(output.stdout.contains("class=bad_response"), "{scenario}: {}", output.stdout);
        assert!(output.stdout.contains(&format!("http={status}")), "{scenario}: {}", output.stdout);
        assert!(output.stdout.contains(&format!("redirect to {second} (not followed)")), "{}", output.stdout);
        assert!(output.stdout.contains("kraken: FAILED at Ticker"), "{scenario}: {}", output.stdout);
        assert!(!output.stdout.contains("passed"), "{scenario}: {}", output.stdout);
        assert_nothing_reached(&capture, scenario.as_str());
    }
}

/// A daemon polling every 200 ms with credentials (Balance is polled too), paging through a webhook.
fn paging_daemon(base_url: &str, webhook: &str) -> Config {
    Config::from_toml(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_grace = \"5s\"\n\
         [poll]\ninterval = \"200ms\"\ntimeout = \"150ms\"\n{FAST_RATE_LIMIT}\
         [alerts.delivery]\ninitial_backoff = \"100ms\"\nmax_backoff = \"200ms\"\n\
         [[exchanges]]\nname = \"kraken\"\nbase_url = \"{base_url}\"\npair = \"XBTAUD\"\n\
         api_key = \"{SIMULATOR_API_KEY}\"\napi_secret = \"{SIMULATOR_API_SECRET}\"\n\
         [[alerts.sinks]]\nkind = \"webhook\"\nname = \"ops\"\nurl = \"{webhook}\"\n{}",
        scratch_database()
    ))
    .expect("valid test configuration")
}

#[tokio::test]
async fn a_redirecting_exchange_is_recorded_as_failing_and_pages_while_the_second_host_hears_nothing() {
    let (capture, second, _stop) = second_host().await;
    let pager = Capture::default();
    let (pager_address, _pager_stop) = pager.serve().await;
    let simulator = redirecting_simulator(Scenario::Redirect307, second).await;
    let app = spawn_app(paging_daemon(&simulator.base_url(), &format!("http://{pager_address}/page"))).await;
    eventually(WAIT, "exchange_api_down paged", || async {
        let paged = pager.webhooks("/page").contains(&("firing".to_owned(), "exchange_api_down".to_owned()));
        paged.then_some(())
    })
    .await;
    let metrics = app.metrics().await;
    for endpoint in ["Ticker", "SystemStatus"] {
        let labels = [("endpoint", endpoint), ("outcome", "failure"), ("error_class", "bad_response")];
        let failures = metric(&metrics, "exwatch_exchange_calls_total", &labels).unwrap_or(0.0);
        assert!(failures >= 1.0, "{endpoint} failures recorded: {metrics}");
    }
    assert_eq!(metric(&metrics, "exwatch_exchange_up", &[("exchange", "kraken")]), Some(0.0));
    let (_, status) = app.get("/api/v1/status").await;
    assert!(!status.contains("hunter2") && !status.contains("leaked"), "{status}");
    assert_nothing_reached(&capture, "daemon");
    app.shutdown().await.unwrap();
    assert_nothing_reached(&capture, "daemon after shutdown");
}

// ---------------------------------------------------------------------------------------------------------------
// Sinks
// ---------------------------------------------------------------------------------------------------------------

#[tokio::test]
async fn alerts_test_reports_a_webhook_answering_302_as_failed_and_the_second_host_hears_nothing() {
    let (capture, second, _stop) = second_host().await;
    let (hook, _hook_stop) = redirector(302, second_host_url(second).to_string()).await;
    let directory = tempfile::tempdir().unwrap();
    let config = format!(
        "[[exchanges]]\nname = \"kraken\"\nbase_url = \"http://127.0.0.1:1\"\n{}\
         [[alerts.sinks]]\nkind = \"webhook\"\nname = \"ops\"\nurl = \"http://{hook}/hook\"\n\
         bearer_token = \"sink-bearer-token\"\nhmac_secret = \"sink-hmac-secret\"\n",
        scratch_database()
    );
    std::fs::write(directory.path().join("exwatch.toml"), config).unwrap();
    let output = exwatch(&["alerts", "test", "--config", "exwatch.toml"], directory.path()).await;
    assert_eq!(output.code, Some(1), "{}{}", output.stdout, output.stderr);
    assert!(output.stdout.starts_with("ops: FAILED in "), "{}", output.stdout);
    assert!(output.stdout.contains(&format!("HTTP 302: redirect to {second} (not followed)")), "{}", output.stdout);
    assert!(!output.stdout.contains("delivered") && !output.stdout.contains("hunter2"), "{}", output.stdout);
    assert_nothing_reached(&capture, "alerts test");
}

#[tokio::test]
async fn the_outbox_counts_a_redirecting_webhook_as_failed_and_retries_it() {
    let (capture, second, _stop) = second_host().await;
    let (hook, _hook_stop) = redirector(302, second_host_url(second).to_string()).await;
    let simulator = start_simulator().await;
    simulator.set_scenario(Scenario::Maintenance);
    let app = spawn_app(paging_daemon(&simulator.base_url(), &format!("http://{hook}/hook"))).await;
    eventually(WAIT, "failed and retried deliveries", || async {
        let metrics = app.metrics().await;
        let failed = metric(&metrics, "exwatch_notifications_failed_total", &[("sink", "ops")]).unwrap_or(0.0);
        let retried = metric(&metrics, "exwatch_notifications_retried_total", &[("sink", "ops")]).unwrap_or(0.0);
        let sent = metric(&metrics, "exwatch_notifications_sent_total", &[("sink", "ops")]).unwrap_or(0.0);
        assert_eq!(sent, 0.0, "a redirect is never a delivery");
        (failed >= 2.0 && retried >= 1.0).then_some(())
    })
    .await;
    assert_nothing_reached(&capture, "outbox");
    app.shutdown().await.unwrap();
}

// ---------------------------------------------------------------------------------------------------------------
// The CLI's client of the daemon
// ---------------------------------------------------------------------------------------------------------------

#[tokio::test]
async fn admin_commands_never_follow_a_redirect_and_exit_1_naming_it() {
    let (capture, second, _stop) = second_host().await;
    for status in [301, 302, 307, 308] {
        let (admin, _admin_stop) = redirector(status, second_host_url(second).to_string()).await;
        let url = format!("http://{admin}");
        for arguments in [
            vec!["breaker", "status", "--url", &url],
            vec!["breaker", "force-open", "--url", &url],
            vec!["rate-limit", "set", "0.5", "--url", &url],
            vec!["status", "--url", &url],
        ] {
            let output = admin_cli(&arguments, Some(ADMIN_TOKEN)).await;
            assert_eq!(output.code, Some(1), "{arguments:?}: {}{}", output.stdout, output.stderr);
            assert!(output.stderr.contains(&format!("redirect to {second} (not followed)")), "{}", output.stderr);
            assert!(output.stdout.is_empty(), "{arguments:?}: {}", output.stdout);
            assert!(!output.stderr.contains(ADMIN_TOKEN) && !output.stderr.contains("hunter2"));
        }
    }
    assert_nothing_reached(&capture, "admin CLI");
}

/// A server answering every request with `status`, `content_type` and `body`.
async fn foreign_server(status: u16, content_type: &'static str, body: &'static str) -> String {
    let router = axum::Router::new().fallback(move || async move {
        (StatusCode::from_u16(status).unwrap(), [(header::CONTENT_TYPE, content_type)], body)
    });
    // Dropping the token does not cancel it: the server lives as long as the test's runtime.
    let (address, _) = serve_router(router).await;
    format!("http://{address}")
}

#[tokio::test]
async fn admin_commands_against_a_server_that_is_not_exwatch_exit_1_and_say_so() {
    let wrong_json = foreign_server(200, "application/json", r#"{"ok":true,"service":"something else"}"#).await;
    let not_found = foreign_server(
        404,
        "text/html",
        "<html><head><title>404 Not Found</title></head><body><h1>Not Found</h1></body></html>",
    )
    .await;
    let html = foreign_server(200, "text/html", "<!DOCTYPE html><html><body>Welcome to nginx!</body></html>").await;
    let commands: [&[&str]; 5] = [
        &["breaker", "status"],
        &["breaker", "force-open"],
        &["breaker", "reset"],
        &["rate-limit", "status"],
        &["rate-limit", "set", "0.5"],
    ];
    for (url, expected) in [
        (&wrong_json, "with JSON that is not exwatch's answer (missing field `exchange`)"),
        (&not_found, "answered 404 Not Found with an HTML page: that is not exwatch's API"),
        (&html, "answered 200 OK with an HTML page: that is not exwatch's API"),
    ] {
        for command in commands {
            let mut arguments = command.to_vec();
            arguments.extend(["--url", url.as_str()]);
            let output = admin_cli(&arguments, Some(ADMIN_TOKEN)).await;
            assert_eq!(output.code, Some(1), "{arguments:?}: {}{}", output.stdout, output.stderr);
            assert!(output.stderr.contains(expected), "{arguments:?}: {}", output.stderr);
            assert!(output.stderr.contains(url.as_str()), "names the URL: {}", output.stderr);
            assert!(output.stdout.is_empty() && !output.stderr.contains("already"), "{arguments:?}: {}", output.stdout);
        }
    }
    let output = admin_cli(&["status", "--url", &wrong_json], None).await;
    assert_eq!(output.code, Some(1), "{}{}", output.stdout, output.stderr);
    assert!(output.stderr.contains("(missing field `exchanges`)"), "{}", output.stderr);
}

#[tokio::test]
async fn admin_commands_against_nothing_name_the_url_and_say_nothing_answers() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let url = format!("http://{closed}/");
    for arguments in [
        vec!["breaker", "status", "--url", &url],
        vec!["rate-limit", "set", "0.5", "--url", &url],
        vec!["status", "--url", &url],
    ] {
        let output = admin_cli(&arguments, Some(ADMIN_TOKEN)).await;
        assert_eq!(output.code, Some(1), "{arguments:?}: {}{}", output.stdout, output.stderr);
        assert!(output.stderr.contains(&format!("nothing answers at {url}")), "{}", output.stderr);
        assert!(output.stderr.contains("connection refused"), "{}", output.stderr);
    }
}

// ---------------------------------------------------------------------------------------------------------------
// The simulator's new faults, through the real client
// ---------------------------------------------------------------------------------------------------------------

#[tokio::test]
async fn silent_accepts_and_never_answers_so_calls_time_out() {
    let simulator = start_simulator().await;
    simulator.set_scenario(Scenario::Silent);
    let client = client_with_credentials(&simulator.base_url());
    let started = tokio::time::Instant::now();
    let error = client.server_time().await.result.unwrap_err();
    assert_eq!(error.class, ErrorClass::Timeout, "{error}");
    assert!(started.elapsed() >= Duration::from_secs(2), "waited the whole timeout: {:?}", started.elapsed());
    assert_eq!(simulator.requests("Time"), 1, "the request was read");
}

#[tokio::test]
async fn simulate_help_lists_every_scenario() {
    let directory = tempfile::tempdir().unwrap();
    let output = exwatch(&["simulate", "--help"], directory.path()).await;
    assert_eq!(output.code, Some(0), "{}", output.stderr);
    for scenario in Scenario::ALL {
        assert!(output.stdout.contains(scenario.as_str()), "{scenario} missing from {}", output.stdout);
    }
    assert!(output.stdout.contains("--redirect-to"), "{}", output.stdout);
}
