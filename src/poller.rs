//! The poll loop: one task per exchange that, every `poll.interval`, checks the price (Ticker) and the exchange's
//! own status (SystemStatus), and on its own cadence the private Balance call, then records every outcome.
//!
//! The loop owns scheduling and recording, not transport: timeouts and classification belong to the exchange's
//! client. Ticks that are missed (a slow call, a stalled runtime) are skipped, never bursted. A started poll always
//! finishes, even during shutdown, so a call and its record are never cut in half. Each tick stamps a heartbeat
//! that `/health` reads: the daemon is alive while every loop keeps ticking.
//!
//! When it acts is [`schedule`]'s decision (a pure state machine): the regular interval while all is well,
//! confirmation polls seconds apart after a failed poll, and cheap recovery checks while the breaker is open or the
//! down alert fires. The loop carries the decisions out and reports each result back.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::exchange::{Advisory, Endpoint, Exchange, Outcome, SystemStatus, TradingStatus};
use crate::journal::{self, Event};
use crate::limiter::{Budget, Limiter};
use crate::statuspage;
use crate::store::{CallRecord, writer};
use crate::telemetry;
use crate::{alert, breaker, clock};

pub mod schedule;

use self::schedule::{Action, Mode, Schedule};

/// The label value of `error_class` on successful calls.
const NO_ERROR: &str = "none";

/// When each exchange's loop last ticked, for the liveness probe.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
/// The `[poll]` settings.
pub struct Config {
    /// Time between two polls of the public checks (Ticker and SystemStatus).
    #[serde(serialize_with = "crate::clock::human_duration")]
    pub interval: Duration,
    /// The limit for one call, from connect to the last byte of the answer.
    #[serde(serialize_with = "crate::clock::human_duration")]
    pub timeout: Duration,
    /// Time between two Balance calls, when credentials are set.
    #[serde(serialize_with = "crate::clock::human_duration")]
    pub balance_interval: Duration,
    /// A call slower than this logs the runbook's "Slow API response" warning.
    #[serde(serialize_with = "crate::clock::human_duration")]
    pub slow_call_threshold: Duration,
    /// After a failed poll, the time to the next one until the down rule's streak is reached or a poll succeeds.
    #[serde(serialize_with = "crate::clock::human_duration")]
    pub confirm_interval: Duration,
    /// While the breaker is open or `exchange_api_down` fires, the time between two recovery checks (or polls).
    #[serde(serialize_with = "crate::clock::human_duration")]
    pub recovery_check_interval: Duration,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            interval: Duration::from_secs(30),
            timeout: Duration::from_secs(10),
            balance_interval: Duration::from_secs(300),
            slow_call_threshold: Duration::from_secs(5),
            confirm_interval: Duration::from_secs(2),
            recovery_check_interval: Duration::from_secs(5),
        }
    }
}

/// One exchange's live controls, shared by its poller and the admin API: the breaker, the rate limiter and the
/// alert engine.
#[derive(Clone)]
pub struct Control {
    pub breaker: Arc<breaker::Shared>,
    pub limiter: Arc<Limiter>,
    pub alerts: Arc<std::sync::Mutex<alert::Engine>>,
    /// The exchange's Statuspage, when watched: its unresolved incidents are acknowledgements the page quotes.
    pub statuspage: Option<Arc<statuspage::Watch>>,
    /// Makes the loop poll now: the exchange's WebSocket says a status the last SystemStatus did not.
    pub wake: Arc<tokio::sync::Notify>,
}

#[derive(Debug, Default)]
pub struct Heartbeat {
    /// Per exchange: the instant of the last tick (of the loop's creation before the first one) and the period the
    /// loop currently polls at, which grows when the rate factor is lowered.
    beats: Mutex<Vec<Beat>>,
}

#[derive(Debug, Clone)]
struct Beat {
    exchange: String,
    last: Instant,
    period: Duration,
    /// The schedule's state after the loop's last action, for `/api/v1/status`.
    schedule: Option<Schedule>,
}

/// A loop that has not ticked within its limit.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Stall {
    pub exchange: String,
    pub seconds_since_tick: f64,
    pub limit_seconds: f64,
}

impl Heartbeat {
    /// How many periods a loop may miss before it counts as stalled.
    pub const MISSED_INTERVALS: u32 = 3;

    pub fn new() -> Heartbeat {
        Heartbeat::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Beat>> {
        self.beats.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn register(&self, exchange: &str, now: Instant, period: Duration) {
        self.lock().push(Beat { exchange: exchange.to_owned(), last: now, period, schedule: None });
    }

    fn beat(&self, exchange: &str, now: Instant, period: Duration) {
        if let Some(beat) = self.lock().iter_mut().find(|beat| beat.exchange == exchange) {
            beat.last = now;
            beat.period = period;
        }
    }

    fn schedule(&self, exchange: &str, schedule: &Schedule) {
        if let Some(beat) = self.lock().iter_mut().find(|beat| beat.exchange == exchange) {
            beat.schedule = Some(schedule.clone());
        }
    }

    /// The poll schedule of `exchange` as of its loop's last action: mode, failed polls, what comes next and when.
    pub fn schedule_view(&self, exchange: &str, now: Instant) -> Option<schedule::View> {
        let beats = self.lock();
        Some(beats.iter().find(|beat| beat.exchange == exchange)?.schedule.as_ref()?.view(now))
    }

    /// The loops that have not ticked within `MISSED_INTERVALS` periods of `now`.
    pub fn stalls(&self, now: Instant) -> Vec<Stall> {
        self.lock()
            .iter()
            .filter(|beat| now.saturating_duration_since(beat.last) > beat.period * Heartbeat::MISSED_INTERVALS)
            .map(|beat| Stall {
                exchange: beat.exchange.clone(),
                seconds_since_tick: now.saturating_duration_since(beat.last).as_secs_f64(),
                limit_seconds: (beat.period * Heartbeat::MISSED_INTERVALS).as_secs_f64(),
            })
            .collect()
    }

    /// Seconds since each loop's last tick, for `/health`'s body.
    pub fn ages(&self, now: Instant) -> Vec<(String, f64)> {
        self.lock()
            .iter()
            .map(|beat| (beat.exchange.clone(), now.saturating_duration_since(beat.last).as_secs_f64()))
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
    advisories: IntGaugeVec,
    ticks: IntCounterVec,
    last_tick: prometheus::GaugeVec,
    mode: IntGaugeVec,
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
                "Latency of exchange API calls sent, by outcome (success or failure).",
            )
            .buckets(telemetry::LATENCY_BUCKETS.to_vec()),
            &["exchange", "endpoint", "outcome"],
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
        let advisories = IntGaugeVec::new(
            Opts::new(
                "exwatch_exchange_advisories",
                "What the exchange's last SystemStatus announced, by kind: emergency (unplanned incidents) and \
                 upcoming_maintenance.",
            ),
            &["exchange", "kind"],
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
        let mode = IntGaugeVec::new(
            Opts::new(
                "exwatch_poll_mode",
                "The poll schedule's mode per exchange, one-hot: normal, confirming, recovering.",
            ),
            &["exchange", "mode"],
        )
        .expect("valid metric definition");
        Metrics {
            mode: telemetry::register(registry, mode),
            calls: telemetry::register(registry, calls),
            duration: telemetry::register(registry, duration),
            slow_calls: telemetry::register(registry, slow_calls),
            up: telemetry::register(registry, up),
            last_success: telemetry::register(registry, last_success),
            system_status: telemetry::register(registry, system_status),
            advisories: telemetry::register(registry, advisories),
            ticks: telemetry::register(registry, ticks),
            last_tick: telemetry::register(registry, last_tick),
        }
    }

    /// Creates the series of an exchange at zero, so rates and absences are well defined before the first call.
    fn prepare(&self, exchange: &str, endpoints: &[Endpoint]) {
        for endpoint in endpoints {
            self.calls.with_label_values(&[exchange, endpoint.as_str(), "success", NO_ERROR]);
            for outcome in ["success", "failure"] {
                self.duration.with_label_values(&[exchange, endpoint.as_str(), outcome]);
            }
        }
        self.up.with_label_values(&[exchange]).set(0);
        self.ticks.with_label_values(&[exchange]);
        self.set_mode(exchange, Mode::Normal);
        for status in TradingStatus::KNOWN {
            self.system_status.with_label_values(&[exchange, status]).set(0);
        }
    }

    fn set_mode(&self, exchange: &str, current: Mode) {
        for mode in Mode::ALL {
            self.mode.with_label_values(&[exchange, mode.as_str()]).set(i64::from(mode == current));
        }
    }

    /// Records a change of the poll schedule's mode.
    fn mode_changed(&self, exchange: &str, change: &schedule::Change) {
        self.set_mode(exchange, change.to);
        tracing::info!(
            exchange,
            from = change.from.as_str(),
            to = change.to.as_str(),
            reason = change.reason,
            failed_polls = change.failed_polls,
            next = ?change.next,
            next_in_ms = change.next_in.as_millis() as u64,
            "Poll schedule changed."
        );
    }

    fn tick(&self, exchange: &str) {
        self.ticks.with_label_values(&[exchange]).inc();
        self.last_tick.with_label_values(&[exchange]).set(unix_now());
    }

    /// Records one call: counters, latency, and a log line for failures and slow calls.
    pub fn call(&self, exchange: &str, outcome: &Outcome<()>, slow_call_threshold: Duration) {
        let endpoint = outcome.endpoint.as_str();
        let latency_ms = outcome.latency.as_millis() as u64;
        let label = if outcome.result.is_ok() { "success" } else { "failure" };
        self.duration.with_label_values(&[exchange, endpoint, label]).observe(outcome.latency.as_secs_f64());
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

    /// Records a call the breaker refused: not sent, so neither a success nor an exchange failure.
    pub fn not_permitted(&self, exchange: &str, endpoint: Endpoint, state: breaker::State) {
        self.calls.with_label_values(&[exchange, endpoint.as_str(), "not_permitted", NO_ERROR]).inc();
        tracing::debug!(
            exchange,
            endpoint = endpoint.as_str(),
            breaker = state.as_str(),
            "Call not permitted by the breaker."
        );
    }

    fn system_status(&self, exchange: &str, status: &TradingStatus) {
        for known in TradingStatus::KNOWN {
            self.system_status.with_label_values(&[exchange, known]).set(i64::from(known == status.label()));
        }
    }

    fn advisories(&self, exchange: &str, status: &SystemStatus) {
        for (kind, list) in [("emergency", &status.emergency), ("upcoming_maintenance", &status.upcoming_maintenance)] {
            self.advisories.with_label_values(&[exchange, kind]).set(i64::try_from(list.len()).unwrap_or(i64::MAX));
        }
    }

    fn up(&self, exchange: &str, up: bool) {
        self.up.with_label_values(&[exchange]).set(i64::from(up));
    }
}

fn unix_now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|since| since.as_secs_f64()).unwrap_or(0.0)
}

/// What a poll loop works with, besides its exchange.
#[derive(Clone)]
pub struct Context {
    pub config: Config,
    pub metrics: Metrics,
    pub heartbeat: Arc<Heartbeat>,
    /// Where every call's row goes (`api_call_logs`); pushing never waits on the database.
    pub log: writer::Handle,
    /// This replica's name for the `instance` column.
    pub instance: String,
    /// When to poll, confirm and check (built from `[poll]`, `alerts.down`, `[rate_limit]` and `[breaker]`).
    pub schedule: schedule::Config,
    /// Where recovery verification steps are told for incident timelines; `None` without a database.
    pub journal: Option<journal::Shared>,
}

/// The poll loop of one exchange: limiter, then breaker, then the exchange, for every call.
pub struct Poller {
    exchange: Arc<dyn Exchange>,
    context: Context,
    breaker: Arc<breaker::Shared>,
    limiter: Arc<Limiter>,
    alerts: Arc<Mutex<alert::Engine>>,
    statuspage: Option<Arc<statuspage::Watch>>,
    wake: Arc<tokio::sync::Notify>,
    /// The unplanned incidents the last SystemStatus answer acknowledged (`emergency[]`).
    emergency: Vec<Advisory>,
    next_balance: Instant,
    schedule: Schedule,
}

impl Poller {
    pub fn new(exchange: Arc<dyn Exchange>, context: Context, control: Control) -> Poller {
        let Control { breaker, limiter, alerts, statuspage, wake } = control;
        let now = Instant::now();
        let mut endpoints = vec![Endpoint::Ticker, Endpoint::SystemStatus, Endpoint::Depth, Endpoint::Time];
        if exchange.has_credentials() {
            endpoints.push(Endpoint::Balance);
        }
        context.metrics.prepare(exchange.name(), &endpoints);
        context.heartbeat.register(exchange.name(), now, context.config.interval);
        let schedule = Schedule::new(context.schedule.clone(), now);
        context.heartbeat.schedule(exchange.name(), &schedule);
        Poller {
            exchange,
            context,
            breaker,
            limiter,
            alerts,
            statuspage,
            wake,
            emergency: Vec::new(),
            next_balance: now,
            schedule,
        }
    }

    /// The time between polls now: the interval stretched by the rate factor.
    fn period(&self) -> Duration {
        self.context.config.interval.div_f64(self.limiter.factor().clamp(0.001, 1.0))
    }

    /// Polls until `cancel` fires, when and as the schedule says (a poll or a recovery check). The action in
    /// progress when it fires is finished first. Between actions it also wakes for the breaker's timer, so OPEN
    /// turns HALF_OPEN on time and the recovery verification runs at once, and for [`Control::wake`], which runs
    /// the next action now.
    pub async fn run(mut self, cancel: CancellationToken) {
        tracing::info!(
            exchange = self.exchange.name(),
            pair = self.exchange.pair(),
            interval = %humantime::format_duration(self.context.config.interval),
            private_calls = self.exchange.has_credentials(),
            "Poll loop started."
        );
        loop {
            let breaker_deadline = self.breaker.next_deadline();
            let (due, action) = self.schedule.next();
            tokio::select! {
                biased;
                () = cancel.cancelled() => break,
                () = clock::sleep_until_some(breaker_deadline) => {
                    if self.breaker.advance() == breaker::State::HalfOpen {
                        self.verify().await;
                    } else {
                        self.refresh_schedule();
                    }
                }
                () = self.breaker.changed() => {
                    if self.breaker.state() == breaker::State::HalfOpen {
                        self.verify().await;
                    } else {
                        self.refresh_schedule();
                    }
                }
                // Every change of the rate factor (an operator restoring 1) reschedules at once.
                () = self.limiter.changed() => self.refresh_schedule(),
                // The WebSocket heard a status REST has not said yet: read it now, not at the next interval.
                () = self.wake.notified() => match action {
                    Action::Poll => self.poll_once().await,
                    Action::Check => self.recovery_check().await,
                },
                () = tokio::time::sleep_until(due) => match action {
                    Action::Poll => self.poll_once().await,
                    Action::Check => self.recovery_check().await,
                },
            }
        }
        tracing::info!(exchange = self.exchange.name(), "Poll loop stopped.");
    }

    /// One poll: Ticker and SystemStatus together, and Balance when it is due, under one breaker permit. In
    /// HALF_OPEN the poll is the recovery verification instead. The schedule learns the poll's result.
    pub async fn poll_once(&mut self) {
        let started = Instant::now();
        let result = self.poll(started).await;
        let change = self.schedule.polled(started, Instant::now(), result, self.facts());
        self.settle(change);
    }

    async fn poll(&mut self, started: Instant) -> schedule::Poll {
        let name = self.exchange.name().to_owned();
        self.context.heartbeat.beat(&name, started, self.period());
        self.context.metrics.tick(&name);
        self.limiter.tick(started);

        let balance_due = self.exchange.has_credentials() && started >= self.next_balance;
        let private_paused = self.limiter.private_paused(started).is_some();
        // During a pause for invalid keys, one Balance now and then checks whether the key works again.
        let balance_now = if private_paused {
            self.exchange.has_credentials() && self.limiter.private_recheck_due(started)
        } else {
            balance_due
        };
        if balance_due {
            self.next_balance = clock::after(started, self.context.config.balance_interval);
        }

        if self.breaker.state() == breaker::State::HalfOpen {
            // The verification reports itself to the schedule; this slot only moves the grid on.
            self.verify().await;
            return schedule::Poll::NotPermitted;
        }
        let permit = match self.breaker.try_acquire() {
            Ok(permit) => permit,
            Err(state) => {
                for endpoint in [Endpoint::Ticker, Endpoint::SystemStatus] {
                    self.not_permitted(&name, endpoint, state);
                }
                if balance_now {
                    self.not_permitted(&name, Endpoint::Balance, state);
                }
                self.context.metrics.up(&name, false);
                self.alert(&[], None, true);
                return schedule::Poll::NotPermitted;
            }
        };

        let exchange = self.exchange.as_ref();
        let limiter = &self.limiter;
        let ticker = async {
            limiter.acquire(Budget::Public).await;
            exchange.ticker().await.erase()
        };
        let status = async {
            limiter.acquire(Budget::Public).await;
            exchange.system_status().await
        };
        let balance = async {
            if balance_now {
                limiter.acquire(Budget::Private).await;
                Some(exchange.balance().await.erase())
            } else {
                None
            }
        };
        let (ticker, status, balance) = tokio::join!(ticker, status, balance);

        // A failed Balance is tried again at the next poll, not a whole balance_interval later, so an
        // authentication failure is confirmed (and private calls paused) within polls, not minutes.
        if balance.as_ref().is_some_and(|outcome| outcome.result.is_err()) {
            self.next_balance = started;
        }
        self.heard(&status);
        let (status, trading_status) = status_as_call(&status);
        let mut outcomes = vec![ticker, status];
        outcomes.extend(balance);
        for outcome in &outcomes {
            self.record(&name, outcome);
        }
        if let Some(trading_status) = &trading_status {
            self.context.metrics.system_status(&name, trading_status);
        }
        self.context.metrics.up(&name, outcomes[0].result.is_ok() && outcomes[1].result.is_ok());
        self.breaker.record(permit, self.poll_verdict(&outcomes));
        self.alert(&outcomes, trading_status.as_ref(), false);
        schedule_result(&outcomes)
    }

    /// The cheap recovery check while the breaker refuses calls: SystemStatus (which must say online) and Time,
    /// public calls outside the breaker, recorded like any call. Both passing moves the breaker from OPEN to
    /// HALF_OPEN, and the recovery verification runs at once.
    async fn recovery_check(&mut self) {
        let name = self.exchange.name().to_owned();
        self.context.heartbeat.beat(&name, Instant::now(), self.period());
        let exchange = self.exchange.as_ref();
        let limiter = &self.limiter;
        let status = async {
            limiter.acquire(Budget::Public).await;
            exchange.system_status().await
        };
        let time = async {
            limiter.acquire(Budget::Public).await;
            exchange.server_time().await.erase()
        };
        let (status, time) = tokio::join!(status, time);
        self.heard(&status);
        let (status, trading_status) = status_as_call(&status);
        for outcome in [&status, &time] {
            self.record(&name, outcome);
        }
        if let Some(trading_status) = &trading_status {
            self.context.metrics.system_status(&name, trading_status);
        }
        let passed = status.result.is_ok() && time.result.is_ok();
        if passed {
            self.breaker.recovery_check_passed();
        }
        let change = self.schedule.checked(Instant::now(), passed, self.facts());
        self.settle(change);
        if self.breaker.state() == breaker::State::HalfOpen {
            self.verify().await;
        }
    }

    /// What the schedule decides on: the breaker, the down alert and the rate factor now.
    fn facts(&self) -> schedule::Facts {
        let down_firing = self
            .alerts
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .active()
            .iter()
            .any(|alert| alert.alertname == alert::AlertName::Down);
        schedule::Facts { breaker: self.breaker.state(), down_firing, factor: self.limiter.factor() }
    }

    /// The breaker changed without a poll (its timer, an operator): the schedule follows.
    fn refresh_schedule(&mut self) {
        let change = self.schedule.refresh(Instant::now(), self.facts());
        self.settle(change);
    }

    /// Logs and counts a change of mode, and publishes the schedule for the status endpoint.
    fn settle(&self, change: Option<schedule::Change>) {
        if let Some(change) = change {
            self.context.metrics.mode_changed(self.exchange.name(), &change);
        }
        self.context.heartbeat.schedule(self.exchange.name(), &self.schedule);
    }

    /// Keeps what a SystemStatus answer acknowledges; an answer that did not come changes nothing.
    fn heard(&mut self, status: &Outcome<SystemStatus>) {
        if let Ok(status) = &status.result {
            self.emergency = status.emergency.clone();
            self.context.metrics.advisories(self.exchange.name(), status);
            let mut engine = self.alerts.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            engine.heard_advisories(alert::Advisories {
                emergency: status.emergency.clone(),
                upcoming_maintenance: status.upcoming_maintenance.clone(),
                read_at: chrono::Utc::now(),
            });
        }
    }

    /// What the exchange acknowledges now: its SystemStatus's `emergency[]` and its Statuspage's unresolved
    /// incidents (from the last good summary, however old).
    fn acknowledgements(&self) -> Vec<alert::Acknowledgement> {
        let rest = self.emergency.iter().map(|advisory| alert::Acknowledgement {
            title: advisory.title.clone(),
            status: advisory.status.clone(),
            impact: advisory.impact.clone(),
            link: advisory.source_url.clone(),
        });
        let page = self.statuspage.as_ref().and_then(|watch| watch.view().summary).map(|summary| summary.incidents);
        let page = page.unwrap_or_default().into_iter().map(|incident| alert::Acknowledgement {
            title: incident.name,
            status: incident.status,
            impact: incident.impact,
            link: incident.shortlink,
        });
        // One incident seen by both sources is one acknowledgement.
        let mut seen = std::collections::BTreeSet::new();
        rest.chain(page).filter(|ack| seen.insert(ack.title.to_lowercase())).collect()
    }

    /// Feeds the alert rules with a poll's calls and the breaker's state after it.
    fn alert(&self, outcomes: &[Outcome<()>], status: Option<&TradingStatus>, refused: bool) {
        let now = Instant::now();
        let actions = alert::diagnosis::Actions {
            rate_factor: self.limiter.factor(),
            private_paused: self.limiter.private_paused(now),
        };
        let acknowledgements = self.acknowledgements();
        let mut engine = self.alerts.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        engine.acknowledge(acknowledgements);
        engine.observe(now, outcomes, status, refused, self.breaker.state(), &actions);
    }

    /// The recovery verification, and the schedule told how it went.
    async fn verify(&mut self) {
        let passed = self.verification().await;
        let change = self.schedule.verified(Instant::now(), passed, self.facts());
        self.settle(change);
    }

    /// The runbook's recovery verification as the HALF_OPEN trial: Ticker, Balance (with credentials, unless
    /// private calls are paused), Depth, each under its own trial permit, stopping at the first failure. The breaker
    /// closes when every step passed and opens again on a failure. Returns whether it passed.
    async fn verification(&mut self) -> bool {
        let name = self.exchange.name().to_owned();
        let private_paused = self.limiter.private_paused(Instant::now()).is_some();
        let steps = crate::probe::verification_steps(self.exchange.has_credentials() && !private_paused);
        tracing::info!(exchange = name, steps = ?steps, "Running the recovery verification.");
        let mut outcomes = Vec::new();
        for endpoint in steps {
            let permit = match self.breaker.try_acquire() {
                Ok(permit) => permit,
                Err(state) => {
                    self.not_permitted(&name, endpoint, state);
                    self.alert(&outcomes, None, outcomes.is_empty());
                    return false;
                }
            };
            let budget = if endpoint.is_private() { Budget::Private } else { Budget::Public };
            self.limiter.acquire(budget).await;
            let outcome = crate::exchange::call(self.exchange.as_ref(), endpoint).await;
            self.record(&name, &outcome);
            let verdict = self.poll_verdict(std::slice::from_ref(&outcome));
            let passed = matches!(verdict, breaker::Call::Success(_));
            let result = match outcome.error() {
                None => "passed".to_owned(),
                Some(error) => format!("failed: {error}"),
            };
            let detail = format!("recovery verification: {endpoint} {result} ({} ms)", outcome.latency.as_millis());
            journal::record(self.context.journal.as_ref(), Event::now(&name, journal::Kind::Verification, detail));
            self.breaker.record(permit, verdict);
            outcomes.push(outcome);
            if !passed {
                tracing::warn!(exchange = name, endpoint = endpoint.as_str(), "Recovery verification failed.");
                self.alert(&outcomes, None, false);
                return false;
            }
        }
        self.breaker.trial_passed();
        self.alert(&outcomes, None, false);
        tracing::info!(exchange = name, state = self.breaker.state().as_str(), "Recovery verification passed.");
        true
    }

    /// The breaker's view of a poll: the first failure that counts, else a success; latency is the slowest call's.
    fn poll_verdict(&self, outcomes: &[Outcome<()>]) -> breaker::Call {
        let latency = outcomes.iter().map(|outcome| outcome.latency).max().unwrap_or_default();
        match outcomes.iter().filter_map(Outcome::error).find(|error| !self.breaker.ignores(error.class)) {
            Some(error) => breaker::Call::Failure(error.class, latency),
            None => breaker::Call::Success(latency),
        }
    }

    fn not_permitted(&self, exchange: &str, endpoint: Endpoint, state: breaker::State) {
        self.context.metrics.not_permitted(exchange, endpoint, state);
        let row = CallRecord::not_permitted(exchange, &self.context.instance, endpoint, state.as_str(), Utc::now());
        self.context.log.push(row);
    }

    fn record(&self, exchange: &str, outcome: &Outcome<()>) {
        self.context.metrics.call(exchange, outcome, self.context.config.slow_call_threshold);
        self.context.log.push(CallRecord::from_outcome(exchange, &self.context.instance, outcome, Utc::now()));
        let budget = if outcome.endpoint.is_private() { Budget::Private } else { Budget::Public };
        self.limiter.observe(budget, &outcome.result, Instant::now());
    }
}

/// A poll as the schedule sees it: a `rate_limited` answer asks for less, any other failure for confirmation.
fn schedule_result(outcomes: &[Outcome<()>]) -> schedule::Poll {
    let mut errors = outcomes.iter().filter_map(Outcome::error).peekable();
    if errors.peek().is_none() {
        schedule::Poll::Succeeded
    } else if errors.any(|error| error.class == crate::exchange::ErrorClass::RateLimited) {
        schedule::Poll::RateLimited
    } else {
        schedule::Poll::Failed
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
        depth_calls: AtomicU32,
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
                depth_calls: AtomicU32::new(0),
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
        fn kind(&self) -> crate::exchange::Kind {
            crate::exchange::Kind::Kraken
        }

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
            self.outcome(Endpoint::SystemStatus, Ok(SystemStatus::plain(status, String::new()))).await
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
            self.depth_calls.fetch_add(1, Ordering::SeqCst);
            self.outcome(Endpoint::Depth, Ok(OrderBook { pair_key: "XBTAUD".into(), asks: vec![], bids: vec![] })).await
        }
        async fn balance(&self) -> Outcome<Balances> {
            self.balance_calls.fetch_add(1, Ordering::SeqCst);
            self.outcome(Endpoint::Balance, Ok(Balances { assets: Default::default() })).await
        }
    }

    fn config() -> Config {
        Config::default()
    }

    fn sample(registry: &Registry, name: &str, labels: &[(&str, &str)]) -> f64 {
        telemetry::sample(&telemetry::encode(registry).unwrap(), name, labels).unwrap_or(f64::NAN)
    }

    fn poller(exchange: Arc<FakeExchange>) -> (Poller, Registry, Arc<Heartbeat>) {
        poller_with(exchange, breaker::Config::default())
    }

    /// The metrics after one poll of `exchange`.
    async fn one_poll(exchange: Arc<FakeExchange>) -> Registry {
        let (mut poller, registry, _) = poller(exchange);
        poller.poll_once().await;
        registry
    }

    /// A sink that is never reached: the writer is not run, so rows stay in its buffer, where tests count them.
    struct UnusedSink;

    #[async_trait]
    impl crate::store::Sink for UnusedSink {
        async fn insert_batch(&self, _rows: &[CallRecord]) -> Result<(), crate::store::WriteError> {
            Ok(())
        }
    }

    fn poller_with(exchange: Arc<FakeExchange>, breaker_config: breaker::Config) -> (Poller, Registry, Arc<Heartbeat>) {
        let (poller, registry, heartbeat, _) = poller_with_log(exchange, breaker_config);
        (poller, registry, heartbeat)
    }

    fn poller_with_log(
        exchange: Arc<FakeExchange>,
        breaker_config: breaker::Config,
    ) -> (Poller, Registry, Arc<Heartbeat>, writer::Handle) {
        poller_with_schedule(exchange, breaker_config, schedule::Config::default())
    }

    fn poller_with_schedule(
        exchange: Arc<FakeExchange>,
        breaker_config: breaker::Config,
        schedule_config: schedule::Config,
    ) -> (Poller, Registry, Arc<Heartbeat>, writer::Handle) {
        let registry = telemetry::registry();
        let heartbeat = Arc::new(Heartbeat::new());
        let spool_dir = std::env::temp_dir().join(format!("exwatch-poller-test-{}", uuid::Uuid::now_v7()));
        let writer_config = writer::Config { spool_dir, ..writer::Config::default() };
        let (_writer, log) =
            writer::Writer::new(writer_config, Arc::new(UnusedSink), writer::Metrics::new(&registry)).unwrap();
        let context = Context {
            config: config(),
            metrics: Metrics::new(&registry),
            heartbeat: heartbeat.clone(),
            log: log.clone(),
            instance: "test".to_owned(),
            schedule: schedule_config,
            journal: None,
        };
        let breaker = breaker::Shared::new("fake", breaker_config, breaker::Metrics::new(&registry));
        let limiter = Limiter::new("fake", crate::limiter::Config::default(), crate::limiter::Metrics::new(&registry));
        let alerts = alert::Engine::new(
            "fake",
            crate::exchange::Kind::Kraken.profile(),
            alert::Config::default(),
            alert::Metrics::new(&registry),
            None,
        );
        let control =
            Control { breaker, limiter, alerts: Arc::new(Mutex::new(alerts)), statuspage: None, wake: Arc::default() };
        let poller = Poller::new(exchange, context, control);
        (poller, registry, heartbeat, log)
    }

    #[tokio::test(start_paused = true)]
    async fn every_call_and_every_refused_call_is_handed_to_the_log() {
        let exchange = FakeExchange::new(false);
        *exchange.status.lock().unwrap() = "maintenance";
        let (mut poller, _, _, log) = poller_with_log(exchange, breaker::Config::default());
        for _ in 0..4 {
            poller.poll_once().await;
        }
        // Three polls of two calls, then one refused poll of two calls: eight rows.
        assert_eq!(log.status().buffered, 8);
    }

    #[tokio::test(start_paused = true)]
    async fn a_poll_records_ticker_and_system_status_as_successes() {
        let exchange = FakeExchange::new(false);
        let registry = one_poll(exchange).await;
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
        let registry = one_poll(exchange).await;
        let labels = [("endpoint", "SystemStatus"), ("outcome", "failure"), ("error_class", "maintenance")];
        assert_eq!(sample(&registry, "exwatch_exchange_calls_total", &labels), 1.0);
        // The answer arrived, so the status it names is still recorded, and the exchange counts as down.
        assert_eq!(sample(&registry, "exwatch_exchange_up", &[("exchange", "fake")]), 0.0);
        assert_eq!(sample(&registry, "exwatch_exchange_system_status", &[("status", "maintenance")]), 1.0);
        assert_eq!(sample(&registry, "exwatch_exchange_system_status", &[("status", "online")]), 0.0);
    }

    #[tokio::test(start_paused = true)]
    async fn failures_are_counted_by_class_and_slow_calls_are_counted() {
        let exchange = FakeExchange::new(false);
        *exchange.ticker_error.lock().unwrap() = Some(ErrorClass::RateLimited);
        *exchange.latency.lock().unwrap() = Duration::from_secs(6);
        let registry = one_poll(exchange).await;
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
        // The first poll hangs for 100 s, so the slots at 30, 60 and 90 s are missed. Bursting would fire them back
        // to back at 100 s; skipping waits for the next slot of the 30 s grid.
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
        assert_eq!(offsets, vec![0, 120, 150, 180]);
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

    #[tokio::test(start_paused = true)]
    async fn the_breaker_opens_after_three_failed_polls_seconds_apart_and_then_refuses_to_send() {
        let exchange = FakeExchange::new(false);
        *exchange.status.lock().unwrap() = "maintenance";
        let cancel = CancellationToken::new();
        let (poller, registry, _) = poller(exchange.clone());
        let task = tokio::spawn(poller.run(cancel.clone()));
        // Polls at 0, 2 and 4 s fail (each takes 100 ms); the third opens the breaker; the regular poll 30 s after
        // the last one is refused, and the recovery checks in between (SystemStatus still says maintenance) fail.
        tokio::time::sleep(Duration::from_millis(4500)).await;
        assert_eq!(sample(&registry, "exwatch_circuit_breaker_state", &[("state", "open")]), 1.0);
        assert_eq!(sample(&registry, "exwatch_poll_mode", &[("mode", "recovering")]), 1.0);
        tokio::time::sleep(Duration::from_millis(58_000)).await;
        cancel.cancel();
        task.await.unwrap();
        assert_eq!(exchange.ticker_calls.load(Ordering::SeqCst), 3, "no call is sent while OPEN");
        let refused = [("endpoint", "Ticker"), ("outcome", "not_permitted")];
        assert_eq!(sample(&registry, "exwatch_exchange_calls_total", &refused), 1.0);
        assert_eq!(sample(&registry, "exwatch_circuit_breaker_not_permitted_calls_total", &[]), 1.0);
        let opened = [("from", "closed"), ("to", "open")];
        assert_eq!(sample(&registry, "exwatch_circuit_breaker_transitions_total", &opened), 1.0);
    }

    #[tokio::test(start_paused = true)]
    async fn half_open_comes_on_the_timer_and_the_verification_closes_the_breaker() {
        let exchange = FakeExchange::new(false);
        *exchange.status.lock().unwrap() = "maintenance";
        let breaker_config =
            breaker::Config { wait_duration_in_open: Duration::from_secs(45), ..breaker::Config::default() };
        let cancel = CancellationToken::new();
        let hourly_checks =
            schedule::Config { recovery_check_interval: Duration::from_secs(3600), ..schedule::Config::default() };
        let (poller, registry, _, _) = poller_with_schedule(exchange.clone(), breaker_config, hourly_checks);
        let task = tokio::spawn(poller.run(cancel.clone()));
        tokio::time::sleep(Duration::from_secs(5)).await;
        *exchange.status.lock().unwrap() = "online";
        // OPEN at about 4 s; HALF_OPEN at about 49 s, between two polls, and the verification (Ticker, Depth) runs
        // then. (Recovery checks are hourly here, so only the timer can move the breaker.)
        tokio::time::sleep(Duration::from_secs(43)).await;
        assert_eq!(exchange.depth_calls.load(Ordering::SeqCst), 0);
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(exchange.depth_calls.load(Ordering::SeqCst), 1, "the verification ran on the timer");
        assert_eq!(sample(&registry, "exwatch_circuit_breaker_state", &[("state", "closed")]), 1.0);
        cancel.cancel();
        task.await.unwrap();
        for (from, to) in [("closed", "open"), ("open", "half_open"), ("half_open", "closed")] {
            let labels = [("from", from), ("to", to)];
            assert_eq!(sample(&registry, "exwatch_circuit_breaker_transitions_total", &labels), 1.0, "{from}->{to}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_verification_opens_the_breaker_again() {
        let exchange = FakeExchange::new(false);
        *exchange.ticker_error.lock().unwrap() = Some(ErrorClass::ServerError);
        let cancel = CancellationToken::new();
        let (poller, registry, _) = poller(exchange.clone());
        let task = tokio::spawn(poller.run(cancel.clone()));
        // OPEN after the polls at 0, 2 and 4 s; the recovery check 5 s later passes (SystemStatus and Time answer),
        // so HALF_OPEN; the trial's Ticker fails: OPEN again, and Depth is never called.
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(
            sample(&registry, "exwatch_exchange_calls_total", &[("endpoint", "Time"), ("outcome", "success")]),
            1.0
        );
        cancel.cancel();
        task.await.unwrap();
        assert_eq!(exchange.depth_calls.load(Ordering::SeqCst), 0);
        let reopened = [("from", "half_open"), ("to", "open")];
        assert_eq!(sample(&registry, "exwatch_circuit_breaker_transitions_total", &reopened), 1.0);
        assert_eq!(sample(&registry, "exwatch_circuit_breaker_state", &[("state", "open")]), 1.0);
    }

    #[tokio::test(start_paused = true)]
    async fn restoring_the_rate_factor_resumes_polling_at_once() {
        let exchange = FakeExchange::new(false);
        let cancel = CancellationToken::new();
        let (poller, _, _) = poller(exchange.clone());
        let limiter = poller.limiter.clone();
        let task = tokio::spawn(poller.run(cancel.clone()));
        // A poll at 0 s; at factor 0.125 (set at 5 s) the next comes 240 s after it, so none at 30 s.
        tokio::time::sleep(Duration::from_secs(5)).await;
        limiter.set_factor(0.125).unwrap();
        tokio::time::sleep(Duration::from_secs(55)).await;
        assert_eq!(exchange.ticker_calls.load(Ordering::SeqCst), 1);
        // Restoring 1 at 60 s: a 30 s period since the last poll has passed, so the loop polls now.
        limiter.set_factor(1.0).unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(exchange.ticker_calls.load(Ordering::SeqCst), 2, "polling resumed without a restart");
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert_eq!(exchange.ticker_calls.load(Ordering::SeqCst), 3, "and goes on at the restored interval");
        cancel.cancel();
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_rate_limited_answer_stretches_the_poll_period() {
        let exchange = FakeExchange::new(false);
        *exchange.ticker_error.lock().unwrap() = Some(ErrorClass::RateLimited);
        let breaker_config =
            breaker::Config { consecutive_failures: 0, failure_rate_threshold: 100.0, ..Default::default() };
        let cancel = CancellationToken::new();
        let (poller, registry, _) = poller_with(exchange.clone(), breaker_config);
        let task = tokio::spawn(poller.run(cancel.clone()));
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(sample(&registry, "exwatch_rate_limit_factor", &[]), 0.5);
        *exchange.ticker_error.lock().unwrap() = None;
        // At factor 0.5 the next poll comes 60 s later, not 30 s.
        tokio::time::sleep(Duration::from_secs(58)).await;
        assert_eq!(exchange.ticker_calls.load(Ordering::SeqCst), 1);
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(exchange.ticker_calls.load(Ordering::SeqCst), 2);
        cancel.cancel();
        task.await.unwrap();
    }
}
