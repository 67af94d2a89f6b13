//! The daemon end to end: polling the simulator, metrics, health and readiness.

use std::sync::Arc;
use std::time::Duration;

use exwatch::app::App;
use exwatch::simulator::Scenario;

use crate::helpers::{HangingExchange, config, eventually, metric, serve, spawn_app, start_simulator};

const WAIT: Duration = Duration::from_secs(15);

fn calls(metrics: &str, endpoint: &str, outcome: &str, class: &str) -> f64 {
    let labels = [("exchange", "kraken"), ("endpoint", endpoint), ("outcome", outcome), ("error_class", class)];
    metric(metrics, "exwatch_exchange_calls_total", &labels).unwrap_or(0.0)
}

#[tokio::test]
async fn metrics_show_successful_ticker_and_system_status_calls_after_one_interval() {
    let simulator = start_simulator().await;
    let app = spawn_app(config(&simulator.base_url(), "300ms", "250ms", true)).await;
    let metrics = eventually(WAIT, "successful Ticker, SystemStatus and Balance calls", || async {
        let metrics = app.metrics().await;
        let done = calls(&metrics, "Ticker", "success", "none") >= 1.0
            && calls(&metrics, "SystemStatus", "success", "none") >= 1.0
            && calls(&metrics, "Balance", "success", "none") >= 1.0;
        done.then_some(metrics)
    })
    .await;
    assert_eq!(metric(&metrics, "exwatch_exchange_up", &[("exchange", "kraken")]), Some(1.0));
    assert_eq!(metric(&metrics, "exwatch_exchange_system_status", &[("status", "online")]), Some(1.0));
    assert!(
        metric(&metrics, "exwatch_exchange_last_success_timestamp_seconds", &[("endpoint", "Ticker")]).unwrap() > 1.7e9
    );
    for bucket in ["3", "5"] {
        let labels = [("endpoint", "Ticker"), ("le", bucket)];
        assert!(
            metric(&metrics, "exwatch_exchange_call_duration_seconds_bucket", &labels).is_some(),
            "bucket {bucket}"
        );
    }
    assert_eq!(simulator.requests("Depth"), 0, "the poll loop does not fetch the order book");
}

#[tokio::test]
async fn switching_the_simulator_to_maintenance_shows_maintenance_failures_in_the_next_interval() {
    let simulator = start_simulator().await;
    let app = spawn_app(config(&simulator.base_url(), "300ms", "250ms", false)).await;
    eventually(WAIT, "a healthy poll", || async {
        (calls(&app.metrics().await, "Ticker", "success", "none") >= 1.0).then_some(())
    })
    .await;
    simulator.set_scenario(Scenario::Maintenance);
    let metrics = eventually(WAIT, "maintenance failures of Ticker and SystemStatus", || async {
        let metrics = app.metrics().await;
        let done = calls(&metrics, "Ticker", "failure", "maintenance") >= 1.0
            && calls(&metrics, "SystemStatus", "failure", "maintenance") >= 1.0;
        done.then_some(metrics)
    })
    .await;
    assert_eq!(metric(&metrics, "exwatch_exchange_system_status", &[("status", "maintenance")]), Some(1.0));
    assert_eq!(metric(&metrics, "exwatch_exchange_system_status", &[("status", "online")]), Some(0.0));
    assert_eq!(metric(&metrics, "exwatch_exchange_up", &[("exchange", "kraken")]), Some(0.0));
}

#[tokio::test]
async fn health_stays_ok_while_the_exchange_is_unreachable_and_the_breaker_open() {
    let simulator = start_simulator().await;
    let base_url = simulator.base_url();
    simulator.shutdown().await;
    let app = spawn_app(config(&base_url, "100ms", "90ms", false)).await;
    // Three network failures open the breaker; refused polls follow. By then the loop has run for more than the
    // three intervals liveness allows a stalled loop, so a 200 here means the outage did not count against it.
    eventually(WAIT, "three failures, an open breaker and refused polls", || async {
        let metrics = app.metrics().await;
        let done = calls(&metrics, "Ticker", "failure", "network") >= 3.0
            && metric(&metrics, "exwatch_circuit_breaker_state", &[("state", "open")]) == Some(1.0)
            && calls(&metrics, "Ticker", "not_permitted", "none") >= 3.0;
        done.then_some(())
    })
    .await;
    let (status, body) = app.get("/health").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"status\":\"ok\""), "{body}");
    assert_eq!(app.get("/ready").await.0, 200);
}

#[tokio::test]
async fn health_turns_503_when_the_poll_loop_is_stalled() {
    let config = config("http://127.0.0.1:9", "100ms", "90ms", false);
    let app = App::builder(config).exchanges(vec![Arc::new(HangingExchange("kraken"))]).build().await.unwrap();
    let app = serve(app);
    assert_eq!(app.get("/health").await.0, 200, "healthy before three intervals have passed");
    let body = eventually(WAIT, "/health to report the stall", || async {
        let (status, body) = app.get("/health").await;
        (status == 503).then_some(body)
    })
    .await;
    assert!(body.contains("poll loop for kraken has not ticked"), "{body}");
    // Readiness is about serving, not about the exchange: it stays up.
    assert_eq!(app.get("/ready").await.0, 200);
}

#[tokio::test]
async fn metrics_pass_promtool_check_metrics() {
    let simulator = start_simulator().await;
    simulator.set_scenario(Scenario::Maintenance);
    let app = spawn_app(config(&simulator.base_url(), "200ms", "150ms", true)).await;
    let metrics = eventually(WAIT, "failures and successes recorded", || async {
        let metrics = app.metrics().await;
        (calls(&metrics, "Ticker", "failure", "maintenance") >= 1.0).then_some(metrics)
    })
    .await;
    let mut promtool = tokio::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool is installed (Debian package `prometheus`; .ci/run installs it)");
    use tokio::io::AsyncWriteExt as _;
    let mut stdin = promtool.stdin.take().unwrap();
    stdin.write_all(metrics.as_bytes()).await.unwrap();
    drop(stdin);
    let output = promtool.wait_with_output().await.unwrap();
    assert!(
        output.status.success(),
        "promtool check metrics failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test]
async fn shutdown_finishes_within_the_grace_period() {
    let simulator = start_simulator().await;
    let app = spawn_app(config(&simulator.base_url(), "200ms", "150ms", false)).await;
    assert_eq!(app.get("/ready").await.0, 200);
    app.shutdown().await.expect("an orderly shutdown");
}
