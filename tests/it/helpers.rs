//! Shared test helpers: starting the simulator and the daemon on port 0, waiting with a deadline, reading metrics.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Once;
use std::time::Duration;

use exwatch::app::App;
use exwatch::config::Config;
use exwatch::exchange::{Balances, Exchange, OrderBook, Outcome, ServerTime, SystemStatus, Ticker};
use exwatch::simulator::{self, Simulator};
use tokio_util::sync::CancellationToken;

/// The simulator's default credentials (Kraken's published test secret).
pub const SIMULATOR_API_KEY: &str = "exwatch-simulator-key";
pub const SIMULATOR_API_SECRET: &str =
    "kQH5HW/8p1uGOVjbgWA7FunAmGO8lsSUXNsu3eow76sz84Q18fWxnyRzBHCd3pd5nE9qa99HAZtuZuj6F1huXg==";

pub fn install_tls_provider() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// A simulator on 127.0.0.1:0 without the public rate limit (tests poll faster than Kraken allows).
pub async fn start_simulator() -> Simulator {
    let options = simulator::Options { public_rate_limit: None, ..simulator::Options::default() };
    Simulator::start(options).await.expect("simulator starts")
}

/// A configuration polling `base_url` every `interval`, listening on port 0.
pub fn config(base_url: &str, interval: &str, timeout: &str, credentials: bool) -> Config {
    let credentials = if credentials {
        format!("api_key = \"{SIMULATOR_API_KEY}\"\napi_secret = \"{SIMULATOR_API_SECRET}\"\n")
    } else {
        String::new()
    };
    let database = scratch_database();
    Config::from_toml(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_grace = \"5s\"\n\
         [poll]\ninterval = \"{interval}\"\ntimeout = \"{timeout}\"\n{FAST_RATE_LIMIT}\
         [[exchanges]]\nname = \"kraken\"\nbase_url = \"{base_url}\"\npair = \"XBTAUD\"\n{credentials}{database}"
    ))
    .expect("valid test configuration")
}

/// A `[database]` section with the SQLite file and the spool in a directory of their own, so tests running in
/// parallel never share a call log or replay each other's spool. The directory is left in the system's temp
/// directory (one small file per test).
pub fn scratch_database() -> String {
    let directory = std::env::temp_dir().join(format!("exwatch-it-{}", uuid::Uuid::now_v7()));
    format!(
        "[database]\nsqlite_path = \"{}\"\nspool_dir = \"{}\"\n",
        directory.join("exwatch.sqlite").display(),
        directory.join("spool").display()
    )
}

/// Budgets for polling every 100 ms (the defaults allow Kraken's one public call per second).
pub const FAST_RATE_LIMIT: &str = "[rate_limit]\npublic_per_second = 50\npublic_burst = 10\n";

/// The admin token of [`admin_config`].
pub const ADMIN_TOKEN: &str = "exwatch-test-admin-token";

/// Like [`config`] without credentials, with the admin API on behind [`ADMIN_TOKEN`].
pub fn admin_config(base_url: &str, interval: &str, timeout: &str) -> Config {
    Config::from_toml(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_grace = \"5s\"\n\
         [poll]\ninterval = \"{interval}\"\ntimeout = \"{timeout}\"\n{FAST_RATE_LIMIT}\
         [[exchanges]]\nname = \"kraken\"\nbase_url = \"{base_url}\"\npair = \"XBTAUD\"\n\
         [admin]\ntoken = \"{ADMIN_TOKEN}\"\n{}",
        scratch_database()
    ))
    .expect("valid test configuration")
}

/// A running daemon. Dropping it cancels it.
pub struct TestApp {
    pub address: SocketAddr,
    pub cancel: CancellationToken,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    pub http: reqwest::Client,
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.address)
    }

    pub async fn get(&self, path: &str) -> (u16, String) {
        let response = self.http.get(self.url(path)).send().await.expect("daemon answers");
        let status = response.status().as_u16();
        (status, response.text().await.expect("body"))
    }

    pub async fn metrics(&self) -> String {
        self.get("/metrics").await.1
    }

    /// Cancels the daemon as a signal would and waits for its orderly exit.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        self.cancel.cancel();
        let task = self.task.take().expect("the task is only taken here");
        tokio::time::timeout(Duration::from_secs(15), task).await.expect("shutdown within the grace period")?
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

pub async fn spawn_app(config: Config) -> TestApp {
    install_tls_provider();
    serve(App::build(config).await.expect("app builds"))
}

pub fn serve(app: App) -> TestApp {
    install_tls_provider();
    let address = app.local_addr();
    let cancel = CancellationToken::new();
    let task = tokio::spawn(app.run(cancel.clone()));
    TestApp { address, cancel, task: Some(task), http: reqwest::Client::new() }
}

/// Polls `check` until it returns `Some`, or panics after `deadline` with `what`.
pub async fn eventually<T, F, Fut>(deadline: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let give_up = tokio::time::Instant::now() + deadline;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(tokio::time::Instant::now() < give_up, "timed out after {deadline:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// The value of the first sample of `name` whose labels include all of `labels`.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    exwatch::telemetry::sample(text, name, labels)
}

/// One request a [`Capture`] received.
#[derive(Debug, Clone)]
pub struct Received {
    pub path: String,
    pub headers: axum::http::HeaderMap,
    pub body: serde_json::Value,
    pub raw: String,
}

/// A notification receiver that keeps every POST; while `down` it answers 503 and keeps nothing. Served in
/// memory (paused-clock tests) or on 127.0.0.1:0.
#[derive(Clone, Default)]
pub struct Capture {
    received: std::sync::Arc<std::sync::Mutex<Vec<Received>>>,
    down: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Capture {
    pub fn router(&self) -> axum::Router {
        let capture = self.clone();
        axum::Router::new().fallback(move |request: axum::extract::Request| {
            let capture = capture.clone();
            async move {
                use axum::http::StatusCode;
                if capture.down.load(std::sync::atomic::Ordering::SeqCst) {
                    return StatusCode::SERVICE_UNAVAILABLE;
                }
                let (parts, body) = request.into_parts();
                let bytes = axum::body::to_bytes(body, 1 << 20).await.unwrap_or_default();
                let raw = String::from_utf8_lossy(&bytes).into_owned();
                let body = serde_json::from_str(&raw).unwrap_or(serde_json::Value::Null);
                let path = parts.uri.path().to_owned();
                capture.received.lock().unwrap().push(Received { path, headers: parts.headers, body, raw });
                StatusCode::OK
            }
        })
    }

    /// Serves on 127.0.0.1:0 until the returned token is cancelled or dropped with the test's runtime.
    pub async fn serve(&self) -> (SocketAddr, CancellationToken) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let router = self.router();
        let shutdown = stop.clone().cancelled_owned();
        tokio::spawn(async move { axum::serve(listener, router).with_graceful_shutdown(shutdown).await });
        (address, stop)
    }

    pub fn set_down(&self, down: bool) {
        self.down.store(down, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    /// Webhook payloads received on `path`, as (status, alertname) pairs.
    pub fn webhooks(&self, path: &str) -> Vec<(String, String)> {
        self.received()
            .iter()
            .filter(|received| received.path == path)
            .map(|received| {
                let status = received.body["status"].as_str().unwrap_or_default().to_owned();
                let alertname = received.body["alerts"][0]["labels"]["alertname"].as_str().unwrap_or_default();
                (status, alertname.to_owned())
            })
            .collect()
    }
}

/// An exchange, named by its field, whose calls never return: its poll loop is stuck in its first poll.
pub struct HangingExchange(pub &'static str);

#[async_trait::async_trait]
impl Exchange for HangingExchange {
    fn kind(&self) -> exwatch::exchange::Kind {
        exwatch::exchange::Kind::Kraken
    }

    fn name(&self) -> &str {
        self.0
    }
    fn pair(&self) -> &str {
        "XBTAUD"
    }
    fn has_credentials(&self) -> bool {
        false
    }
    async fn system_status(&self) -> Outcome<SystemStatus> {
        std::future::pending().await
    }
    async fn server_time(&self) -> Outcome<ServerTime> {
        std::future::pending().await
    }
    async fn ticker(&self) -> Outcome<Ticker> {
        std::future::pending().await
    }
    async fn depth(&self) -> Outcome<OrderBook> {
        std::future::pending().await
    }
    async fn balance(&self) -> Outcome<Balances> {
        std::future::pending().await
    }
}
