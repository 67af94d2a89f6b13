//! The poll loop: one task per exchange that, every `poll.interval`, checks the price (Ticker) and the exchange's
//! own status (SystemStatus), and on its own cadence the private Balance call, then records every outcome.
//!
//! The loop owns scheduling and recording, not transport: timeouts and classification belong to the exchange's
//! client. Ticks that are missed (a slow call, a stalled runtime) are skipped, never bursted. A started poll always
//! finishes, even during shutdown, so a call and its record are never cut in half. Each tick stamps a heartbeat
//! that `/health` reads: the daemon is alive while every loop keeps ticking.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::config::Poll as Config;
use crate::exchange::{Endpoint, Exchange, Outcome, SystemStatus, TradingStatus};
use crate::telemetry;

/// The label value of `error_class` on successful calls.
const NO_ERROR: &str = "none";

/// When each exchange's loop last ticked, for the liveness probe.
#[derive(Debug)]
pub struct Heartbeat {
    interval: Duration,
    /// Per exchange: the instant of the last tick, or of the loop's creation before the first one.
    beats: Mutex<Vec<(String, Instant)>>,
}

/// A loop that has not ticked within its limit.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Stall {
    pub exchange: String,
    pub seconds_since_tick: f64,
    pub limit_seconds: f64,
}

impl Heartbeat {
    /// How many intervals a loop may miss before it counts as stalled.
    pub const MISSED_INTERVALS: u32 = 3;

    pub fn new(interval: Duration) -> Heartbeat {
        Heartbeat { interval, beats: Mutex::new(Vec::new()) }
    }

    fn register(&self, exchange: &str, now: Instant) {
        let mut beats = self.beats.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        beats.push((exchange.to_owned(), now));
    }

    fn beat(&self, exchange: &str, now: Instant) {
        let mut beats = self.beats.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(entry) = beats.iter_mut().find(|(name, _)| name == exchange) {
            entry.1 = now;
        }
    }

    /// The loops that have not ticked within `MISSED_INTERVALS` intervals of `now`.
    pub fn stalls(&self, now: Instant) -> Vec<Stall> {
        let limit = self.interval * Heartbeat::MISSED_INTERVALS;
        let beats = self.beats.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        beats
            .iter()
            .filter(|(_, last)| now.saturating_duration_since(*last) > limit)
            .map(|(exchange, last)| Stall {
                exchange: exchange.clone(),
                seconds_since_tick: now.saturating_duration_since(*last).as_secs_f64(),
                limit_seconds: limit.as_secs_f64(),
            })
            .collect()
    }

    /// Seconds since each loop's last tick, for `/health`'s body.
    pub fn ages(&self, now: Instant) -> Vec<(String, f64)> {
        let beats = self.beats.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        beats
            .iter()
            .map(|(exchange, last)| (exchange.clone(), now.saturating_duration_since(*last).as_secs_f64()))
            .collect()
    }
}

/// The poll loop's metrics. Each method logs and counts one occurrence, so logs and metrics agree.
#[derive(Clone)]
pub struct Metrics {
    calls: IntCounterVec,
    duration: HistogramVec,
    slow_calls: IntCounterVec,
    up: IntGaugeVec,
    last_success: prometheus::GaugeVec,
    system_status: IntGaugeVec,
    ticks: IntCounterVec,
    last_tick: prometheus::GaugeVec,
}

impl Metrics {
    pub fn new(registry: &Registry) -> Metrics {
        let calls = IntCounterVec::new(
            Opts::new("exwatch_exchange_calls_total", "Exchange API calls by endpoint, outcome and error class."),
            &["exchange", "endpoint", "outcome", "error_class"],
        )
        .expect("valid metric definition");
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "exwatch_exchange_call_duration_seconds",
                "Latency of exchange API calls, failed ones included.",
            )
            .buckets(telemetry::LATENCY_BUCKETS.to_vec()),
            &["exchange", "endpoint"],
        )
        .expect("valid metric definition");
        let slow_calls = IntCounterVec::new(
            Opts::new("exwatch_exchange_slow_calls_total", "Exchange API calls slower than poll.slow_call_threshold."),
            &["exchange", "endpoint"],
        )
        .expect("valid metric definition");
        let up = IntGaugeVec::new(
            Opts::new(
                "exwatch_exchange_up",
                "1 when the last poll's price check and system status both succeeded, else 0.",
            ),
            &["exchange"],
        )
        .expect("valid metric definition");
        let last_success = prometheus::GaugeVec::new(
            Opts::new(
                "exwatch_exchange_last_success_timestamp_seconds",
                "Unix time of the last successful call per endpoint.",
            ),
            &["exchange", "endpoint"],
        )
        .expect("valid metric definition");
        let system_status = IntGaugeVec::new(
            Opts::new(
                "exwatch_exchange_system_status",
                "The exchange's last reported SystemStatus, one-hot by status.",
            ),
            &["exchange", "status"],
        )
        .expect("valid metric definition");
        let ticks =
            IntCounterVec::new(Opts::new("exwatch_poll_ticks_total", "Polls started per exchange."), &["exchange"])
                .expect("valid metric definition");
        let last_tick = prometheus::GaugeVec::new(
            Opts::new("exwatch_poll_last_tick_timestamp_seconds", "Unix time of the last poll per exchange."),
            &["exchange"],
        )
        .expect("valid metric definition");
        Metrics {
            calls: telemetry::register(registry, calls),
            duration: telemetry::register(registry, duration),
            slow_calls: telemetry::register(registry, slow_calls),
            up: telemetry::register(registry, up),
            last_success: telemetry::register(registry, last_success),
            system_status: telemetry::register(registry, system_status),
            ticks: telemetry::register(registry, ticks),
            last_tick: telemetry::register(registry, last_tick),
        }
    }

    /// Creates the series of an exchange at zero, so rates and absences are well defined before the first call.
    fn prepare(&self, exchange: &str, endpoints: &[Endpoint]) {
        for endpoint in endpoints {
            self.calls.with_label_values(&[exchange, endpoint.as_str(), "success", NO_ERROR]);
            self.duration.with_label_values(&[exchange, endpoint.as_str()]);
        }
        self.up.with_label_values(&[exchange]).set(0);
        self.ticks.with_label_values(&[exchange]);
        for status in TradingStatus::KNOWN {
            self.system_status.with_label_values(&[exchange, status]).set(0);
        }
    }

    fn tick(&self, exchange: &str) {
        self.ticks.with_label_values(&[exchange]).inc();
        self.last_tick.with_label_values(&[exchange]).set(unix_now());
    }

    /// Records one call: counters, latency, and a log line for failures and slow calls.
    pub fn call(&self, exchange: &str, outcome: &Outcome<()>, slow_call_threshold: Duration) {
        let endpoint = outcome.endpoint.as_str();
        let latency_ms = outcome.latency.as_millis() as u64;
        self.duration.with_label_values(&[exchange, endpoint]).observe(outcome.latency.as_secs_f64());
        match &outcome.result {
            Ok(()) => {
                self.calls.with_label_values(&[exchange, endpoint, "success", NO_ERROR]).inc();
                self.last_success.with_label_values(&[exchange, endpoint]).set(unix_now());
                if !outcome.warnings.is_empty() {
                    tracing::info!(exchange, endpoint, warnings = ?outcome.warnings, "Exchange answered with warnings.");
                }
                tracing::debug!(exchange, endpoint, latency_ms, "Exchange call succeeded.");
            }
            Err(error) => {
                self.calls.with_label_values(&[exchange, endpoint, "failure", error.class.as_str()]).inc();
                tracing::warn!(
                    exchange,
                    endpoint,
                    latency_ms,
                    error_class = error.class.as_str(),
                    http_status = error.http_status,
                    exchange_errors = ?error.exchange_errors,
                    error = %error.message,
                    "Exchange call failed."
                );
            }
        }
        if outcome.latency > slow_call_threshold {
            self.slow_calls.with_label_values(&[exchange, endpoint]).inc();
            tracing::warn!(
                exchange,
                endpoint,
                latency_ms,
                threshold_ms = slow_call_threshold.as_millis() as u64,
                "Slow API response."
            );
        }
    }

    fn system_status(&self, exchange: &str, status: &TradingStatus) {
        for known in TradingStatus::KNOWN {
            self.system_status.with_label_values(&[exchange, known]).set(i64::from(known == status.label()));
        }
    }

    fn up(&self, exchange: &str, up: bool) {
        self.up.with_label_values(&[exchange]).set(i64::from(up));
    }
}

fn unix_now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|since| since.as_secs_f64()).unwrap_or(0.0)
}

/// The poll loop of one exchange.
pub struct Poller {
    exchange: Arc<dyn Exchange>,
    config: Config,
    metrics: Metrics,
    heartbeat: Arc<Heartbeat>,
    next_balance: Instant,
}

impl Poller {
    pub fn new(exchange: Arc<dyn Exchange>, config: Config, metrics: Metrics, heartbeat: Arc<Heartbeat>) -> Poller {
        let now = Instant::now();
        let mut endpoints = vec![Endpoint::Ticker, Endpoint::SystemStatus];
        if exchange.has_credentials() {
            endpoints.push(Endpoint::Balance);
        }
        metrics.prepare(exchange.name(), &endpoints);
        heartbeat.register(exchange.name(), now);
        Poller { exchange, config, metrics, heartbeat, next_balance: now }
    }

    /// Polls until `cancel` fires. The poll in progress when it fires is finished first.
    pub async fn run(mut self, cancel: CancellationToken) {
        let mut interval = tokio::time::interval(self.config.interval);
        interval.set_missed_tick_behavior(MissedTickBehavior::Skip);
        tracing::info!(
            exchange = self.exchange.name(),
            pair = self.exchange.pair(),
            interval = %humantime::format_duration(self.config.interval),
            private_calls = self.exchange.has_credentials(),
            "Poll loop started."
        );
        loop {
            tokio::select! {
                biased;
                () = cancel.cancelled() => break,
                _ = interval.tick() => self.poll_once().await,
            }
        }
        tracing::info!(exchange = self.exchange.name(), "Poll loop stopped.");
    }

    /// One poll: Ticker and SystemStatus together, and Balance when it is due. Every outcome is recorded.
    pub async fn poll_once(&mut self) {
        let name = self.exchange.name().to_owned();
        let started = Instant::now();
        self.heartbeat.beat(&name, started);
        self.metrics.tick(&name);

        let balance_due = self.exchange.has_credentials() && started >= self.next_balance;
        if balance_due {
            self.next_balance = started + self.config.balance_interval;
        }
        let exchange = &self.exchange;
        let balance = async { if balance_due { Some(exchange.balance().await) } else { None } };
        let (status, ticker, balance) = tokio::join!(exchange.system_status(), exchange.ticker(), balance);

        let status = status_as_call(&status);
        self.record(&name, &ticker.erase());
        self.record(&name, &status.0);
        if let Some(balance) = balance {
            self.record(&name, &balance.erase());
        }
        if let Some(trading_status) = &status.1 {
            self.metrics.system_status(&name, trading_status);
        }
        self.metrics.up(&name, ticker.result.is_ok() && status.0.result.is_ok());
    }

    fn record(&self, exchange: &str, outcome: &Outcome<()>) {
        self.metrics.call(exchange, outcome, self.config.slow_call_threshold);
    }
}

/// SystemStatus as a recorded call: a non-online status is a `maintenance` failure even though the HTTP call
/// worked. The trading status itself is returned alongside for the status gauge.
fn status_as_call(outcome: &Outcome<SystemStatus>) -> (Outcome<()>, Option<TradingStatus>) {
    let mut call = outcome.erase();
    let trading_status = match &outcome.result {
        Ok(status) => {
            if let Some(failure) = status.as_failure() {
                call.result = Err(failure);
            }
            Some(status.status.clone())
        }
        Err(_) => None,
    };
    (call, trading_status)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use async_trait::async_trait;

    use super::*;
    use crate::exchange::{Balances, Error, ErrorClass, OrderBook, ServerTime, Ticker};

    /// An in-memory exchange whose answers the test sets; calls take `latency` of (paused) time.
    struct FakeExchange {
        status: Mutex<&'static str>,
        ticker_error: Mutex<Option<ErrorClass>>,
        latency: Mutex<Duration>,
        credentials: bool,
        balance_calls: AtomicU32,
        ticker_calls: AtomicU32,
        ticker_started: Mutex<Vec<Instant>>,
        /// Overrides `latency` for the first call only.
        first_latency: Mutex<Option<Duration>>,
    }

    impl FakeExchange {
        fn new(credentials: bool) -> Arc<FakeExchange> {
            Arc::new(FakeExchange {
                status: Mutex::new("online"),
                ticker_error: Mutex::new(None),
                latency: Mutex::new(Duration::from_millis(100)),
                credentials,
                balance_calls: AtomicU32::new(0),
                ticker_calls: AtomicU32::new(0),
                ticker_started: Mutex::new(Vec::new()),
                first_latency: Mutex::new(None),
            })
        }

        async fn outcome<T>(&self, endpoint: Endpoint, result: Result<T, Error>) -> Outcome<T> {
            let first = self.first_latency.lock().unwrap().take();
            let latency = first.unwrap_or(*self.latency.lock().unwrap());
            tokio::time::sleep(latency).await;
            Outcome { endpoint, latency, result, warnings: Vec::new() }
        }
    }

    #[async_trait]
    impl Exchange for FakeExchange {
        fn name(&self) -> &str {
            "fake"
        }
        fn pair(&self) -> &str {
            "XBTAUD"
        }
        fn has_credentials(&self) -> bool {
            self.credentials
        }
        async fn system_status(&self) -> Outcome<SystemStatus> {
            let status = TradingStatus::parse(&self.status.lock().unwrap());
            self.outcome(Endpoint::SystemStatus, Ok(SystemStatus { status, timestamp: String::new() })).await
        }
        async fn server_time(&self) -> Outcome<ServerTime> {
            self.outcome(Endpoint::Time, Ok(ServerTime { unixtime: 0 })).await
        }
        async fn ticker(&self) -> Outcome<Ticker> {
            self.ticker_calls.fetch_add(1, Ordering::SeqCst);
            self.ticker_started.lock().unwrap().push(Instant::now());
            let error = *self.ticker_error.lock().unwrap();
            let result = match error {
                Some(class) => Err(Error::new(class, "injected")),
                None => Ok(Ticker { pair_key: "XBTAUD".into(), ask: "1".into(), bid: "1".into(), last: "1".into() }),
            };
            self.outcome(Endpoint::Ticker, result).await
        }
        async fn depth(&self) -> Outcome<OrderBook> {
            self.outcome(Endpoint::Depth, Ok(OrderBook { pair_key: "XBTAUD".into(), asks: vec![], bids: vec![] })).await
        }
        async fn balance(&self) -> Outcome<Balances> {
            self.balance_calls.fetch_add(1, Ordering::SeqCst);
            self.outcome(Endpoint::Balance, Ok(Balances { assets: Default::default() })).await
        }
    }

    fn config() -> Config {
        crate::config::Config::default().poll
    }

    fn sample(registry: &Registry, name: &str, labels: &[(&str, &str)]) -> f64 {
        let text = telemetry::encode(registry).unwrap();
        let wanted: Vec<String> = labels.iter().map(|(key, value)| format!("{key}=\"{value}\"")).collect();
        text.lines()
            .filter(|line| line.starts_with(&format!("{name}{{")) || line.starts_with(&format!("{name} ")))
            .find(|line| wanted.iter().all(|label| line.contains(label.as_str())))
            .and_then(|line| line.rsplit(' ').next())
            .map(|value| value.parse().unwrap())
            .unwrap_or(f64::NAN)
    }

    fn poller(exchange: Arc<FakeExchange>) -> (Poller, Registry, Arc<Heartbeat>) {
        let registry = telemetry::registry();
        let heartbeat = Arc::new(Heartbeat::new(config().interval));
        let poller = Poller::new(exchange, config(), Metrics::new(&registry), heartbeat.clone());
        (poller, registry, heartbeat)
    }

    #[tokio::test(start_paused = true)]
    async fn a_poll_records_ticker_and_system_status_as_successes() {
        let exchange = FakeExchange::new(false);
        let (mut poller, registry, _) = poller(exchange);
        poller.poll_once().await;
        for endpoint in ["Ticker", "SystemStatus"] {
            let labels = [("endpoint", endpoint), ("outcome", "success"), ("error_class", "none")];
            assert_eq!(sample(&registry, "exwatch_exchange_calls_total", &labels), 1.0, "{endpoint}");
        }
        assert_eq!(sample(&registry, "exwatch_exchange_up", &[("exchange", "fake")]), 1.0);
        assert_eq!(sample(&registry, "exwatch_exchange_system_status", &[("status", "online")]), 1.0);
        assert_eq!(sample(&registry, "exwatch_exchange_system_status", &[("status", "maintenance")]), 0.0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_status_other_than_online_is_recorded_as_a_maintenance_failure() {
        let exchange = FakeExchange::new(false);
        *exchange.status.lock().unwrap() = "maintenance";
        let (mut poller, registry, _) = poller(exchange);
        poller.poll_once().await;
        let labels = [("endpoint", "SystemStatus"), ("outcome", "failure"), ("error_class", "maintenance")];
        assert_eq!(sample(&registry, "exwatch_exchange_calls_total", &labels), 1.0);
        assert_eq!(sample(&registry, "exwatch_exchange_up", &[("exchange", "fake")]), 0.0);
        assert_eq!(sample(&registry, "exwatch_exchange_system_status", &[("status", "maintenance")]), 1.0);
        assert_eq!(sample(&registry, "exwatch_exchange_system_status", &[("status", "online")]), 0.0);
    }

    #[tokio::test(start_paused = true)]
    async fn failures_are_counted_by_class_and_slow_calls_are_counted() {
        let exchange = FakeExchange::new(false);
        *exchange.ticker_error.lock().unwrap() = Some(ErrorClass::RateLimited);
        *exchange.latency.lock().unwrap() = Duration::from_secs(6);
        let (mut poller, registry, _) = poller(exchange);
        poller.poll_once().await;
        let labels = [("endpoint", "Ticker"), ("outcome", "failure"), ("error_class", "rate_limited")];
        assert_eq!(sample(&registry, "exwatch_exchange_calls_total", &labels), 1.0);
        assert_eq!(sample(&registry, "exwatch_exchange_slow_calls_total", &[("endpoint", "Ticker")]), 1.0);
        assert_eq!(sample(&registry, "exwatch_exchange_up", &[("exchange", "fake")]), 0.0);
    }

    #[tokio::test(start_paused = true)]
    async fn balance_runs_on_its_own_cadence_only_with_credentials() {
        let with_credentials = FakeExchange::new(true);
        let without = FakeExchange::new(false);
        let cancel = CancellationToken::new();
        let (first, _, _) = poller(with_credentials.clone());
        let (second, _, _) = poller(without.clone());
        let tasks = [tokio::spawn(first.run(cancel.clone())), tokio::spawn(second.run(cancel.clone()))];
        // Ten minutes of 30 s polls: 21 ticks (one at start), and Balance at 0, 5 and 10 minutes.
        tokio::time::sleep(Duration::from_secs(600) + Duration::from_millis(500)).await;
        cancel.cancel();
        for task in tasks {
            task.await.unwrap();
        }
        assert_eq!(with_credentials.ticker_calls.load(Ordering::SeqCst), 21);
        assert_eq!(with_credentials.balance_calls.load(Ordering::SeqCst), 3);
        assert_eq!(without.balance_calls.load(Ordering::SeqCst), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn missed_ticks_are_skipped_not_bursted() {
        let exchange = FakeExchange::new(false);
        // The first poll hangs for 100 s, so the ticks due at 30, 60 and 90 s are missed. Bursting would fire them
        // back to back at 100 s; skipping polls once, late, then returns to the 30 s grid.
        *exchange.first_latency.lock().unwrap() = Some(Duration::from_secs(100));
        let cancel = CancellationToken::new();
        let (poller, _, _) = poller(exchange.clone());
        let start = Instant::now();
        let task = tokio::spawn(poller.run(cancel.clone()));
        tokio::time::sleep(Duration::from_secs(200)).await;
        cancel.cancel();
        task.await.unwrap();
        let offsets: Vec<u64> =
            exchange.ticker_started.lock().unwrap().iter().map(|started| (*started - start).as_secs()).collect();
        assert_eq!(offsets, vec![0, 100, 120, 150, 180]);
    }

    #[tokio::test(start_paused = true)]
    async fn the_heartbeat_reports_a_loop_that_stops_ticking() {
        let exchange = FakeExchange::new(false);
        let (mut poller, _, heartbeat) = poller(exchange);
        poller.poll_once().await;
        assert!(heartbeat.stalls(Instant::now()).is_empty());
        tokio::time::advance(Duration::from_secs(89)).await;
        assert!(heartbeat.stalls(Instant::now()).is_empty());
        tokio::time::advance(Duration::from_secs(2)).await;
        let stalls = heartbeat.stalls(Instant::now());
        assert_eq!(stalls.len(), 1);
        assert_eq!(stalls[0].exchange, "fake");
        assert_eq!(stalls[0].limit_seconds, 90.0);
    }
}
