//! The WebSocket `status` channel: the daemon connected to the simulator's `/v2`, a status change that wakes the
//! 30 s poll at once, and the faults a WebSocket has (silent, garbage), seen through `/metrics` and
//! `GET /api/v1/exchanges/{name}/exchange-status`.

use std::time::Duration;

use exwatch::config::Config;
use exwatch::simulator::{Scenario, Simulator};
use serde_json::Value;

use crate::helpers::{FAST_RATE_LIMIT, TestApp, eventually, metric, scratch_database, spawn_app, start_simulator};

const WAIT: Duration = Duration::from_secs(15);

fn config(simulator: &Simulator, ping: &str, pong: &str) -> Config {
    let base_url = simulator.base_url();
    let websocket_url = format!("ws://{}/v2", simulator.local_addr());
    Config::from_toml(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_grace = \"5s\"\n\
         [poll]\ninterval = \"30s\"\ntimeout = \"1s\"\n{FAST_RATE_LIMIT}\
         [status_sources]\nwebsocket_ping_interval = \"{ping}\"\nwebsocket_pong_timeout = \"{pong}\"\n\
         websocket_reconnect_max = \"2s\"\n\
         [[exchanges]]\nname = \"kraken\"\nbase_url = \"{base_url}\"\nwebsocket_url = \"{websocket_url}\"\n{}",
        scratch_database()
    ))
    .expect("valid test configuration")
}

async fn set_fault(simulator: &Simulator, fault: &str) {
    crate::helpers::install_tls_provider();
    let answer = reqwest::Client::new()
        .put(format!("{}/__exwatch/simulator/websocket", simulator.base_url()))
        .body(format!(r#"{{"fault":{fault}}}"#))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200, "{}", answer.text().await.unwrap_or_default());
}

async fn sample(app: &TestApp, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric(&app.metrics().await, name, labels).unwrap_or(0.0)
}

/// Waits until the WebSocket is connected and the first REST poll has read `online`.
async fn connected(app: &TestApp) -> Value {
    eventually(WAIT, "a connected WebSocket and a first poll", || async {
        let (code, body) = app.get("/api/v1/exchanges/kraken/exchange-status").await;
        assert_eq!(code, 200, "{body}");
        let said: Value = serde_json::from_str(&body).unwrap();
        (said["websocket"]["connected"] == true && said["system_status"]["value"] == "online").then_some(said)
    })
    .await
}

#[tokio::test]
async fn a_websocket_status_change_wakes_a_thirty_second_poll_within_three_seconds() {
    let simulator = start_simulator().await;
    let app = spawn_app(config(&simulator, "30s", "10s")).await;
    let said = connected(&app).await;
    let websocket = &said["websocket"];
    assert_eq!(websocket["system"], "online", "{said:#}");
    assert_eq!(websocket["version"], "2.0.10", "{said:#}");
    assert!(websocket["connection_id"].as_u64().unwrap() > 1 << 53, "{said:#}");
    assert!(websocket["last_message_at"].is_string(), "{said:#}");
    let maintenance = [("exchange", "kraken"), ("status", "maintenance")];
    assert_eq!(sample(&app, "exwatch_exchange_system_status", &maintenance).await, 0.0);

    simulator.set_scenario(Scenario::Maintenance);
    eventually(Duration::from_secs(3), "maintenance read within 3 s of the WebSocket's word", || async {
        (sample(&app, "exwatch_exchange_system_status", &maintenance).await == 1.0).then_some(())
    })
    .await;
    let metrics = app.metrics().await;
    let status_messages = [("exchange", "kraken"), ("channel", "status")];
    assert!(metric(&metrics, "exwatch_websocket_messages_total", &status_messages).unwrap() >= 2.0, "{metrics}");
    app.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_silent_websocket_is_shown_disconnected_within_ping_and_pong_timeout_and_reconnected() {
    let simulator = start_simulator().await;
    let app = spawn_app(config(&simulator, "1s", "1s")).await;
    connected(&app).await;
    let pong_timeouts = [("exchange", "kraken"), ("reason", "pong_timeout")];
    let before = sample(&app, "exwatch_websocket_reconnects_total", &pong_timeouts).await;

    set_fault(&simulator, r#""ws_silent""#).await;
    // Ping interval plus pong timeout (2 s), and a second for scheduling on a shared machine.
    eventually(Duration::from_secs(3), "the silent WebSocket shown disconnected", || async {
        (sample(&app, "exwatch_websocket_connected", &[("exchange", "kraken")]).await == 0.0).then_some(())
    })
    .await;
    let after = sample(&app, "exwatch_websocket_reconnects_total", &pong_timeouts).await;
    assert!(after > before, "no pong timeout counted ({before} -> {after})");
    // A dead WebSocket is never an outage: REST still says online and nothing is down.
    let (code, body) = app.get("/api/v1/exchanges/kraken/exchange-status").await;
    assert_eq!(code, 200, "{body}");
    let said: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(said["websocket"]["connected"], false, "{said:#}");
    assert_eq!(said["system_status"]["value"], "online", "{said:#}");
    let directory = tempfile::tempdir().unwrap();
    let arguments = ["exchange-status", "--url", &app.url(""), "--exchange", "kraken"];
    let output = crate::cli::exwatch(&arguments, directory.path()).await;
    assert!(output.stdout.contains("  WebSocket: NOT connected"), "{}", output.stdout);

    set_fault(&simulator, "null").await;
    connected(&app).await;
    app.shutdown().await.unwrap();
}

#[tokio::test]
async fn garbage_frames_are_counted_as_invalid_and_the_daemon_carries_on() {
    let simulator = start_simulator().await;
    let app = spawn_app(config(&simulator, "1s", "1s")).await;
    connected(&app).await;

    set_fault(&simulator, r#""ws_garbage""#).await;
    let invalid = [("exchange", "kraken"), ("channel", "invalid")];
    eventually(WAIT, "garbage frames counted as invalid", || async {
        (sample(&app, "exwatch_websocket_messages_total", &invalid).await >= 2.0).then_some(())
    })
    .await;
    assert_eq!(app.get("/health").await.0, 200);

    set_fault(&simulator, "null").await;
    connected(&app).await;
    app.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_dropped_websocket_is_counted_as_closed_and_never_an_outage() {
    let simulator = start_simulator().await;
    let app = spawn_app(config(&simulator, "1s", "1s")).await;
    connected(&app).await;

    set_fault(&simulator, r#""ws_drop""#).await;
    let closed = [("exchange", "kraken"), ("reason", "closed")];
    eventually(WAIT, "dropped connections counted as closed", || async {
        let connected = sample(&app, "exwatch_websocket_connected", &[("exchange", "kraken")]).await;
        (connected == 0.0 && sample(&app, "exwatch_websocket_reconnects_total", &closed).await >= 1.0).then_some(())
    })
    .await;
    assert_eq!(sample(&app, "exwatch_exchange_up", &[("exchange", "kraken")]).await, 1.0);

    set_fault(&simulator, "null").await;
    connected(&app).await;
    app.shutdown().await.unwrap();
}
