//! The daemon on a paused clock at its default 30 s interval, against the simulator in memory: the real client and
//! the real simulator joined by the in-memory transport, so no socket meets the paused clock. Minutes of outage
//! and recovery run in milliseconds, and every step is read from `/metrics` through the daemon's own router.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use exwatch::app::{App, Storage};
use exwatch::config::Config;
use exwatch::exchange::kraken::Client;
use exwatch::simulator::{self, Scenario, Simulator};
use exwatch::store::MemorySink;
use http_body_util::BodyExt as _;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;

use crate::helpers::{Capture, SIMULATOR_API_SECRET, metric};

/// A daemon with default settings polling an in-memory simulator; each test names its own API key because nonces
/// are shared per key within a process. Its alert sinks, if any, deliver to `capture` in memory.
pub(crate) struct PausedDaemon {
    pub(crate) simulator: Simulator,
    /// The call log, kept in memory.
    pub(crate) log: Arc<MemorySink>,
    pub(crate) capture: Capture,
    router: axum::Router,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl PausedDaemon {
    async fn start(api_key: &str) -> PausedDaemon {
        PausedDaemon::start_with(api_key, "").await
    }

    /// Starts with `extra` appended to the configuration (alert sinks, say).
    pub(crate) async fn start_with(api_key: &str, extra: &str) -> PausedDaemon {
        let (simulator, config, client) = in_memory_kraken(api_key, extra);
        assert_eq!(config.poll.interval, Duration::from_secs(30), "the default interval");
        let log = Arc::new(MemorySink::default());
        let app = App::builder(config)
            .exchanges(vec![Arc::new(client)])
            .storage(Storage::CallLogOnly(log.clone()))
            .build()
            .await
            .unwrap();
        let capture = Capture::default();
        app.outbox().deliver_in_memory(capture.router());
        let router = app.router();
        let cancel = CancellationToken::new();
        let task = tokio::spawn(app.run(cancel.clone()));
        PausedDaemon { simulator, log, capture, router, cancel, task }
    }

    /// `/metrics`, read through the router in memory.
    async fn metrics(&self) -> String {
        let request = axum::http::Request::get("/metrics").body(Body::empty()).unwrap();
        let response = self.router.clone().oneshot(request).await.unwrap();
        String::from_utf8(response.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
    }

    /// `/api/v1/status`'s entry for kraken.
    pub(crate) async fn status(&self) -> serde_json::Value {
        self.status_answer().await["exchanges"][0].clone()
    }

    /// `/api/v1/status`, the whole answer.
    pub(crate) async fn status_answer(&self) -> serde_json::Value {
        let request = axum::http::Request::get("/api/v1/status").body(Body::empty()).unwrap();
        let response = self.router.clone().oneshot(request).await.unwrap();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice(&body).unwrap()
    }

    pub(crate) async fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric(&self.metrics().await, name, labels).unwrap_or(0.0)
    }

    async fn breaker_state(&self) -> &'static str {
        let metrics = self.metrics().await;
        ["closed", "open", "half_open", "forced_open", "disabled", "metrics_only"]
            .into_iter()
            .find(|state| metric(&metrics, "exwatch_circuit_breaker_state", &[("state", state)]) == Some(1.0))
            .expect("one state is set")
    }

    async fn transitions(&self, from: &str, to: &str) -> f64 {
        self.value("exwatch_circuit_breaker_transitions_total", &[("from", from), ("to", to)]).await
    }

    pub(crate) async fn stop(self) {
        self.cancel.cancel();
        self.task.await.unwrap().unwrap();
    }
}

/// The in-memory simulator taking `api_key`, a configuration with default settings (and `extra`) watching it, and
/// the real client joined to it in memory.
pub(crate) fn in_memory_kraken(api_key: &str, extra: &str) -> (Simulator, Config, Client) {
    crate::helpers::install_tls_provider();
    let options = simulator::Options {
        api_key: exwatch::secret::Secret::new(api_key),
        public_rate_limit: None,
        ..simulator::Options::default()
    };
    let simulator = Simulator::in_memory(options).unwrap();
    let config = Config::from_toml(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[[exchanges]]\nname = \"kraken\"\napi_key = \"{api_key}\"\napi_secret = \"{SIMULATOR_API_SECRET}\"\n{extra}"
    ))
    .unwrap();
    let client = Client::in_memory(&config.exchanges[0].exchange, config.poll.timeout, simulator.router()).unwrap();
    (simulator, config, client)
}

/// Advances the paused clock to `at` after the daemon's start.
pub(crate) async fn at(start: tokio::time::Instant, at: Duration) {
    tokio::time::sleep_until(start + at).await;
}

/// The schedule held to the regular interval: no confirmation polls (`confirm_interval` = the interval) and no
/// recovery checks (hourly), so the breaker's own timer path is what this test shows, poll by poll.
pub(crate) const REGULAR_ONLY: &str = "[poll]\nconfirm_interval = \"30s\"\nrecovery_check_interval = \"1h\"\n";

#[tokio::test(start_paused = true)]
async fn maintenance_opens_the_breaker_after_three_polls_and_recovery_closes_it() {
    let start = tokio::time::Instant::now();
    let daemon = PausedDaemon::start_with("paused-maintenance-key", REGULAR_ONLY).await;
    daemon.simulator.set_scenario(Scenario::Maintenance);

    // Polls at 0 and 30 s fail; the breaker is still closed.
    at(start, Duration::from_secs(31)).await;
    assert_eq!(daemon.breaker_state().await, "closed");
    let failures = [("endpoint", "Ticker"), ("outcome", "failure"), ("error_class", "maintenance")];
    assert_eq!(daemon.value("exwatch_exchange_calls_total", &failures).await, 2.0);

    // The third failed poll, at 60 s, opens it; the poll at 90 s is refused and nothing is sent.
    at(start, Duration::from_secs(91)).await;
    assert_eq!(daemon.breaker_state().await, "open");
    assert_eq!(daemon.transitions("closed", "open").await, 1.0);
    let refused = [("endpoint", "Ticker"), ("outcome", "not_permitted")];
    assert_eq!(daemon.value("exwatch_exchange_calls_total", &refused).await, 1.0);
    assert_eq!(daemon.simulator.requests("Ticker"), 3);
    // exchange_api_down fired with the breaker, diagnosed as the runbook's scenario A.
    let firing = [("alertname", "exchange_api_down")];
    assert_eq!(daemon.value("exwatch_alerts_firing", &firing).await, 1.0);
    let status = daemon.status().await;
    assert_eq!(status["up"], false, "{status}");
    assert_eq!(status["system_status"], "maintenance", "{status}");
    let alert = &status["active_alerts"][0];
    assert_eq!(
        (alert["alertname"].as_str(), alert["severity"].as_str()),
        (Some("exchange_api_down"), Some("critical"))
    );
    assert_eq!(alert["scenario"], "maintenance", "{alert}");
    assert!(alert["evidence"].as_str().unwrap().contains("EService:Unavailable"), "{alert}");
    assert!(alert["description"].as_str().unwrap().starts_with("Scenario A, maintenance"), "{alert}");

    // After the 60 s wait (at 120 s) the timer moves it to HALF_OPEN; the verification fails: OPEN again.
    at(start, Duration::from_secs(121)).await;
    assert_eq!(daemon.transitions("open", "half_open").await, 1.0);
    assert_eq!(daemon.transitions("half_open", "open").await, 1.0);
    assert_eq!(daemon.breaker_state().await, "open");
    assert_eq!(daemon.simulator.requests("Depth"), 0, "the verification stopped at the failed Ticker");

    // Kraken comes back; at the next HALF_OPEN (180 s) Ticker, Balance and Depth pass and the breaker closes.
    daemon.simulator.set_scenario(Scenario::Healthy);
    at(start, Duration::from_secs(181)).await;
    assert_eq!(daemon.transitions("half_open", "closed").await, 1.0);
    assert_eq!(daemon.breaker_state().await, "closed");
    assert_eq!(daemon.simulator.requests("Depth"), 1);
    let verified = [("endpoint", "Balance"), ("outcome", "success")];
    assert!(daemon.value("exwatch_exchange_calls_total", &verified).await >= 1.0);
    // The next regular poll, at 210 s, is sent again and succeeds; with the verification that is two successes
    // with the breaker closed, and exchange_api_down resolves.
    at(start, Duration::from_secs(211)).await;
    assert_eq!(daemon.value("exwatch_exchange_up", &[]).await, 1.0);
    assert_eq!(daemon.value("exwatch_alerts_firing", &firing).await, 0.0);
    assert_eq!(daemon.status().await["active_alerts"], serde_json::json!([]));
    // Every call, refused ones included, reached the call log within its flush interval.
    at(start, Duration::from_secs(213)).await;
    let rows = daemon.log.rows();
    let classes = |class: &str| rows.iter().filter(|row| row.error_class.as_deref() == Some(class)).count();
    // Ticker and SystemStatus refused at 90, 120 (the slot right after the failed verification) and 150 s, and
    // Balance at 90 s (a failed Balance is tried again at the next poll).
    assert_eq!(classes("not_permitted"), 7);
    assert!(classes("maintenance") >= 6, "{rows:?}");
    assert!(rows.iter().any(|row| row.endpoint == "Depth" && row.success));
    daemon.stop().await;
}

#[tokio::test(start_paused = true)]
async fn rate_limiting_lowers_the_factor_and_it_recovers_once_kraken_stops_refusing() {
    let start = tokio::time::Instant::now();
    let daemon = PausedDaemon::start("paused-rate-limit-key").await;
    daemon.simulator.set_scenario(Scenario::RateLimited);
    at(start, Duration::from_secs(1)).await;
    assert_eq!(daemon.value("exwatch_rate_limit_factor", &[]).await, 0.5);
    assert!(daemon.value("exwatch_rate_limited_answers_total", &[]).await >= 2.0);

    // At factor 0.5 polls come every 60 s: the next one is at 60 s, not 30 s.
    at(start, Duration::from_secs(59)).await;
    assert_eq!(daemon.simulator.requests("Ticker"), 1);
    at(start, Duration::from_secs(61)).await;
    assert_eq!(daemon.simulator.requests("Ticker"), 2);
    // SystemStatus waits 2 s for the halved public budget; once the poll is recorded the factor halves again.
    at(start, Duration::from_secs(63)).await;
    assert_eq!(daemon.value("exwatch_rate_limit_factor", &[]).await, 0.25);

    // Kraken stops refusing: after five quiet minutes the factor doubles, and again after five more.
    daemon.simulator.set_scenario(Scenario::Healthy);
    at(start, Duration::from_secs(61 + 300 + 120)).await;
    assert_eq!(daemon.value("exwatch_rate_limit_factor", &[]).await, 0.5);
    at(start, Duration::from_secs(61 + 600 + 240)).await;
    assert_eq!(daemon.value("exwatch_rate_limit_factor", &[]).await, 1.0);
    let recoveries = [("cause", "recovery")];
    assert_eq!(daemon.value("exwatch_rate_limit_factor_changes_total", &recoveries).await, 2.0);
    daemon.stop().await;
}
