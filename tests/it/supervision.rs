//! Critical tasks under supervision: a call-log writer or an alert delivery loop that panics takes readiness with
//! it, is logged at ERROR, and stops the daemon with an error (the binary's exit 1), instead of leaving it "healthy"
//! while it writes or delivers nothing. And shutdown is bounded: with every stage stuck, the daemon still stops
//! within `server.shutdown_grace`, each stage having had its turn. The faults come from test seams only (call-log
//! sinks and receivers that panic or hang, an exchange that never answers), on a paused clock against the
//! in-memory simulator.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use exwatch::app::{App, Storage};
use exwatch::config::Config;
use exwatch::exchange::Exchange;
use exwatch::simulator::{Scenario, Simulator};
use exwatch::store::{CallRecord, Sink, WriteError};
use http_body_util::BodyExt as _;
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;

use crate::helpers::{HangingExchange, scratch_database};
use crate::paused::in_memory_kraken;

/// A call-log sink whose first write panics: a bug in the writer's path, as far as the daemon can tell.
struct PanickingSink;

#[async_trait::async_trait]
impl Sink for PanickingSink {
    async fn insert_batch(&self, _rows: &[CallRecord]) -> Result<(), WriteError> {
        panic!("test sink: the call-log write panicked");
    }
}

/// A call-log sink whose writes never answer: a database that hangs.
struct HangingSink;

#[async_trait::async_trait]
impl Sink for HangingSink {
    async fn insert_batch(&self, _rows: &[CallRecord]) -> Result<(), WriteError> {
        std::future::pending().await
    }
}

/// A receiver whose handling of a notification panics (the outbox sends to it in memory, in its own task).
async fn panicking_receiver() -> axum::http::StatusCode {
    panic!("test receiver: delivery panicked");
}

/// Log lines (JSON) written while the guard of [`Logs::capture`] lives, on this thread: the tests run on a
/// current-thread runtime, so every task of the daemon logs here.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    fn capture(&self) -> tracing::subscriber::DefaultGuard {
        let logs = self.clone();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_max_level(tracing::Level::INFO)
            .with_writer(move || logs.clone())
            .finish();
        tracing::subscriber::set_default(subscriber)
    }

    fn lines(&self) -> Vec<Value> {
        let text = String::from_utf8(self.0.lock().unwrap().clone()).unwrap();
        text.lines().filter_map(|line| serde_json::from_str(line).ok()).collect()
    }
}

/// The daemon at default settings against the in-memory simulator (and the exchanges `also`), its call log going
/// to `sink` and its alert sinks (`extra`) to `receiver`.
async fn start(
    api_key: &str,
    extra: &str,
    also: Vec<Arc<dyn Exchange>>,
    sink: Arc<dyn Sink>,
    receiver: Option<axum::Router>,
) -> (Simulator, axum::Router, CancellationToken, tokio::task::JoinHandle<anyhow::Result<()>>) {
    let (simulator, config, client) = in_memory_kraken(api_key, extra);
    let exchanges = std::iter::once(Arc::new(client) as Arc<dyn Exchange>).chain(also).collect();
    let app = App::builder(config).exchanges(exchanges).storage(Storage::CallLogOnly(sink)).build().await.unwrap();
    if let Some(receiver) = receiver {
        app.outbox().deliver_in_memory(receiver);
    }
    let router = app.router();
    let cancel = CancellationToken::new();
    let task = tokio::spawn(app.run(cancel.clone()));
    (simulator, router, cancel, task)
}

async fn ready(router: &axum::Router) -> (u16, Value) {
    let request = axum::http::Request::get("/ready").body(Body::empty()).unwrap();
    let response = router.clone().oneshot(request).await.unwrap();
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&body).unwrap())
}

/// The ERROR lines naming a failed critical task.
fn task_failures(logs: &Logs) -> Vec<Value> {
    logs.lines()
        .into_iter()
        .filter(|line| line["level"] == "ERROR" && line["message"] == "Critical task failed; shutting down.")
        .collect()
}

#[tokio::test(start_paused = true)]
async fn a_call_log_writer_that_panics_fails_readiness_and_stops_the_daemon_with_an_error() {
    let logs = Logs::default();
    let _capture = logs.capture();
    let (_simulator, router, cancel, task) =
        start("supervision-writer-key", "", vec![], Arc::new(PanickingSink), None).await;

    // The first poll's rows reach the writer within its flush interval (1 s); its write panics.
    let result = tokio::time::timeout(Duration::from_secs(60), task)
        .await
        .expect("the daemon stops by itself when its writer dies")
        .unwrap();
    assert!(cancel.is_cancelled(), "the root token is cancelled, so every loop stops in order");
    let error = format!("{:#}", result.expect_err("a dead writer is an error: the binary exits 1"));
    assert!(error.contains("critical task call-log writer panicked"), "{error}");
    assert!(error.contains("the call-log write panicked"), "the panic's message is in the exit reason: {error}");

    let (status, body) = ready(&router).await;
    assert_eq!(status, 503);
    assert_eq!(body, serde_json::json!({"status": "failed", "reason": "critical task call-log writer panicked"}));
    let failures = task_failures(&logs);
    assert_eq!(failures.len(), 1, "logged once: {failures:?}");
    assert_eq!(failures[0]["task"], "call-log writer");
}

#[tokio::test(start_paused = true)]
async fn an_alert_delivery_loop_that_panics_fails_readiness_and_stops_the_daemon_with_an_error() {
    let logs = Logs::default();
    let _capture = logs.capture();
    let receiver = axum::Router::new().fallback(panicking_receiver);
    let webhook = "[[alerts.sinks]]\nkind = \"webhook\"\nname = \"ops\"\nurl = \"http://hooks.test/hook\"\n";
    let memory = Arc::new(exwatch::store::MemorySink::default());
    let (simulator, router, _cancel, task) =
        start("supervision-outbox-key", webhook, vec![], memory, Some(receiver)).await;
    simulator.set_scenario(Scenario::Maintenance);

    // Three failed polls (0, 30 and 60 s) fire exchange_api_down; its delivery panics.
    let result = tokio::time::timeout(Duration::from_secs(300), task)
        .await
        .expect("the daemon stops by itself when a delivery loop dies")
        .unwrap();
    let error = format!("{:#}", result.expect_err("a dead delivery loop is an error: the binary exits 1"));
    assert!(error.contains("critical task alert delivery failed: the delivery loop of sink ops died"), "{error}");

    let (status, body) = ready(&router).await;
    assert_eq!(status, 503);
    assert_eq!(body["reason"], "critical task alert delivery failed", "{body}");
    let failures = task_failures(&logs);
    assert_eq!(failures.len(), 1, "logged once: {failures:?}");
    assert_eq!(failures[0]["task"], "alert delivery");
}

#[tokio::test(start_paused = true)]
async fn shutdown_with_every_stage_stuck_ends_within_the_grace_and_the_writer_still_spools_its_rows() {
    let logs = Logs::default();
    let _capture = logs.capture();
    let grace = Config::default().server.shutdown_grace;
    // A webhook whose receiver never answers, given longer than the whole grace to do so.
    let reached = Arc::new(tokio::sync::Notify::new());
    let receiver = axum::Router::new().fallback({
        let reached = reached.clone();
        move || async move {
            reached.notify_one();
            std::future::pending::<axum::http::StatusCode>().await
        }
    });
    let extra = format!(
        "[[alerts.sinks]]\nkind = \"webhook\"\nname = \"ops\"\nurl = \"http://hooks.test/hook\"\ntimeout = \"5m\"\n{}",
        scratch_database()
    );
    // Every stage stuck: a poll that never returns, a database that never answers, a delivery in flight.
    let stuck = Arc::new(HangingExchange("stuck"));
    let (simulator, _router, cancel, task) =
        start("supervision-shutdown-key", &extra, vec![stuck], Arc::new(HangingSink), Some(receiver)).await;
    simulator.set_scenario(Scenario::Maintenance);
    // Three failed polls (0, 30 and 60 s) fire exchange_api_down; its delivery never ends.
    tokio::time::timeout(Duration::from_secs(300), reached.notified()).await.expect("the alert goes out");

    let started = tokio::time::Instant::now();
    cancel.cancel();
    let result = tokio::time::timeout(grace * 3, task).await.expect("shutdown returns, stuck stages and all").unwrap();
    let took = started.elapsed();
    assert!(took <= grace, "shutdown took {took:?}, more than the grace of {grace:?}");
    result.expect("stages cut short at the end of their time are no failure of the daemon");

    let lines = logs.lines();
    let aborted: Vec<&str> = lines
        .iter()
        .filter(|line| line["message"] == "Task did not stop in time; aborting it.")
        .filter_map(|line| line["task"].as_str())
        .collect();
    assert_eq!(aborted, ["poll loop stuck", "alert delivery"], "each stuck stage is cut at the end of its slot");
    // The writer's turn came after the poll loops' whole slot, and it still spooled what it could not write.
    let writer = lines.iter().find(|line| line["message"] == "Call-log writer stopped.").expect("the writer stopped");
    assert_eq!(writer["written"], 0, "{writer}");
    assert!(writer["spooled_for_next_start"].as_u64().unwrap() > 0, "{writer}");
    // HTTP stopped last, within what was left.
    assert!(lines.iter().any(|line| line["message"] == "Shutdown complete."));
}
