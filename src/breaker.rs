//! The circuit breaker: a pure state machine with Resilience4j's semantics. It takes `now` as an argument and does
//! no I/O, so every rule is testable on a paused clock or with plain instants, and it never fails.
//!
//! States: CLOSED (admits all, trips on consecutive failures, failure rate or slow-call rate), OPEN (admits nothing
//! until `wait_duration_in_open` has passed, then HALF_OPEN on a timer), HALF_OPEN (admits at most
//! `permitted_calls_in_half_open` trial calls; closes when they all succeed, reopens on a failure, and reopens after
//! `max_wait_in_half_open` even when a trial call never reports back), plus the operator's FORCED_OPEN (admits
//! nothing), DISABLED (admits all, never trips) and METRICS_ONLY (admits all, records, never trips).
//!
//! The machine itself ([`Breaker`]) does not log or count: every transition is returned as a [`Transition`] with its
//! reason. [`Shared`] is the edge around it: it reads the clock, logs and counts each transition, and is what the
//! poll loop and the admin API share.

use std::collections::{BTreeSet, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use prometheus::{GaugeVec, IntCounterVec, IntGaugeVec, Opts, Registry};
use serde::Serialize;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::exchange::ErrorClass;
use crate::telemetry;
use crate::{clock, journal};

/// The breaker's settings, validated by `config`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Config {
    /// Trips after this many failures in a row (the runbook's rule). 0 disables the rule.
    pub consecutive_failures: u32,
    /// Trips when the failure rate over the window reaches this percentage.
    pub failure_rate_threshold: f64,
    /// Trips when the share of slow calls over the window reaches this percentage.
    pub slow_call_rate_threshold: f64,
    /// A call slower than this is slow.
    #[serde(serialize_with = "crate::clock::human_duration")]
    pub slow_call_duration: Duration,
    #[serde(flatten)]
    pub window: Window,
    /// Rates are only judged once the window holds this many calls.
    pub minimum_calls: u32,
    #[serde(serialize_with = "crate::clock::human_duration")]
    pub wait_duration_in_open: Duration,
    /// Exponential backoff of the open wait across consecutive openings without a successful close.
    #[serde(flatten)]
    pub open_backoff: Option<Backoff>,
    pub permitted_calls_in_half_open: u32,
    #[serde(serialize_with = "crate::clock::human_duration")]
    pub max_wait_in_half_open: Duration,
    /// Classes that neither count as failures nor as successes (by default only our own `invalid_request`).
    pub ignored_classes: BTreeSet<ErrorClass>,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            consecutive_failures: 3,
            failure_rate_threshold: 50.0,
            slow_call_rate_threshold: 100.0,
            slow_call_duration: Duration::from_secs(5),
            window: Window::Time(Duration::from_secs(600)),
            minimum_calls: 5,
            wait_duration_in_open: Duration::from_secs(60),
            open_backoff: None,
            permitted_calls_in_half_open: 3,
            max_wait_in_half_open: Duration::from_secs(120),
            ignored_classes: BTreeSet::from([ErrorClass::InvalidRequest]),
        }
    }
}

/// The sliding window over which rates are computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    /// The last N calls.
    Count(u32),
    /// The calls of the last duration, in one-second buckets.
    Time(Duration),
}

/// Serialized as the configuration keys that set it (`window_type` and `window_calls` or `window_duration`), so
/// the effective configuration reads back.
impl Serialize for Window {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap as _;
        let mut map = serializer.serialize_map(Some(2))?;
        match self {
            Window::Count(calls) => {
                map.serialize_entry("window_type", "count")?;
                map.serialize_entry("window_calls", calls)?;
            }
            Window::Time(duration) => {
                map.serialize_entry("window_type", "time")?;
                map.serialize_entry("window_duration", &humantime::format_duration(*duration).to_string())?;
            }
        }
        map.end()
    }
}

/// Exponential backoff of the open wait: `wait * multiplier^(openings - 1)`, capped, with ± jitter.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Backoff {
    #[serde(rename = "backoff_multiplier")]
    pub multiplier: f64,
    #[serde(rename = "backoff_max_wait", serialize_with = "crate::clock::human_duration")]
    pub max_wait: Duration,
    /// A fraction (0.1 = ±10%) applied with the caller-supplied random value, which keeps replicas apart.
    #[serde(rename = "backoff_jitter")]
    pub jitter: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum State {
    Closed,
    Open,
    HalfOpen,
    ForcedOpen,
    Disabled,
    MetricsOnly,
}

impl State {
    pub const ALL: [State; 6] =
        [State::Closed, State::Open, State::HalfOpen, State::ForcedOpen, State::Disabled, State::MetricsOnly];

    /// The Resilience4j name, as the admin API speaks it.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Closed => "CLOSED",
            State::Open => "OPEN",
            State::HalfOpen => "HALF_OPEN",
            State::ForcedOpen => "FORCED_OPEN",
            State::Disabled => "DISABLED",
            State::MetricsOnly => "METRICS_ONLY",
        }
    }

    /// The lowercase name used in metric labels.
    pub fn label(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::Open => "open",
            State::HalfOpen => "half_open",
            State::ForcedOpen => "forced_open",
            State::Disabled => "disabled",
            State::MetricsOnly => "metrics_only",
        }
    }

    pub fn parse(text: &str) -> Option<State> {
        State::ALL.into_iter().find(|state| state.as_str() == text)
    }
}

impl fmt::Display for State {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.as_str())
    }
}

/// A change of state and why it happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub from: State,
    pub to: State,
    pub reason: String,
}

/// The right to make one call. It carries the state epoch it was issued in, so a late report from an earlier
/// state cannot decide the current one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use = "a permit must be reported with `record` (or dropped, which max_wait_in_half_open bounds)"]
pub struct Permit {
    epoch: u64,
}

/// The result of a call as the breaker sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    Success(Duration),
    Failure(ErrorClass, Duration),
}

/// A point-in-time view for the admin API, metrics and status.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Snapshot {
    pub state: State,
    /// How long the breaker has been in this state.
    #[serde(serialize_with = "crate::clock::human_duration")]
    pub in_state_for: Duration,
    pub consecutive_failures: u32,
    /// Failures in the window (Resilience4j's `failureCount`).
    pub failure_count: u32,
    pub calls_in_window: u32,
    pub slow_calls_in_window: u32,
    /// Percent, or -1 while the window holds fewer than `minimum_calls` (Resilience4j's convention).
    pub failure_rate: f64,
    pub slow_call_rate: f64,
    pub last_failure_class: Option<ErrorClass>,
    /// How long ago the last failure was recorded.
    #[serde(serialize_with = "crate::clock::optional_human_duration")]
    pub last_failure_ago: Option<Duration>,
    pub not_permitted_calls: u64,
    /// When OPEN: how long until HALF_OPEN.
    #[serde(serialize_with = "crate::clock::optional_human_duration")]
    pub half_open_in: Option<Duration>,
}

/// Counts of calls in the window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Totals {
    calls: u32,
    failures: u32,
    slow: u32,
}

/// The sliding window's storage: a ring of single calls, or a ring of one-second buckets.
#[derive(Debug, Clone)]
enum Ring {
    Count { size: usize, calls: VecDeque<(bool, bool)>, totals: Totals },
    Time { seconds: u64, buckets: VecDeque<(u64, Totals)>, totals: Totals },
}

impl Ring {
    fn new(window: Window) -> Ring {
        match window {
            Window::Count(size) => {
                Ring::Count { size: size.max(1) as usize, calls: VecDeque::new(), totals: Totals::default() }
            }
            Window::Time(duration) => {
                Ring::Time { seconds: duration.as_secs().max(1), buckets: VecDeque::new(), totals: Totals::default() }
            }
        }
    }

    fn record(&mut self, second: u64, failed: bool, slow: bool) {
        self.evict(second);
        match self {
            Ring::Count { size, calls, totals } => {
                if calls.len() == *size
                    && let Some((old_failed, old_slow)) = calls.pop_front()
                {
                    totals.calls -= 1;
                    totals.failures -= u32::from(old_failed);
                    totals.slow -= u32::from(old_slow);
                }
                calls.push_back((failed, slow));
                totals.calls += 1;
                totals.failures += u32::from(failed);
                totals.slow += u32::from(slow);
            }
            Ring::Time { buckets, totals, .. } => {
                match buckets.back_mut() {
                    Some((bucket_second, bucket)) if *bucket_second == second => {
                        bucket.calls += 1;
                        bucket.failures += u32::from(failed);
                        bucket.slow += u32::from(slow);
                    }
                    _ => buckets
                        .push_back((second, Totals { calls: 1, failures: u32::from(failed), slow: u32::from(slow) })),
                }
                totals.calls += 1;
                totals.failures += u32::from(failed);
                totals.slow += u32::from(slow);
            }
        }
    }

    /// Drops the buckets older than the window (time-based windows only).
    fn evict(&mut self, second: u64) {
        if let Ring::Time { seconds, buckets, totals } = self {
            while let Some((bucket_second, bucket)) = buckets.front() {
                if bucket_second + *seconds > second {
                    break;
                }
                totals.calls -= bucket.calls;
                totals.failures -= bucket.failures;
                totals.slow -= bucket.slow;
                buckets.pop_front();
            }
        }
    }

    fn totals(&mut self, second: u64) -> Totals {
        self.evict(second);
        match self {
            Ring::Count { totals, .. } | Ring::Time { totals, .. } => *totals,
        }
    }
}

/// The trial in HALF_OPEN: permits issued and reports received.
#[derive(Debug, Clone, Copy, Default)]
struct Trial {
    issued: u32,
    succeeded: u32,
    slow: u32,
}

/// The state machine of one exchange's breaker.
#[derive(Debug, Clone)]
pub struct Breaker {
    config: Config,
    state: State,
    since: Instant,
    /// Incremented on every transition; permits of an older epoch are not counted toward decisions.
    epoch: u64,
    /// The reference instant of the window's one-second buckets.
    origin: Instant,
    ring: Ring,
    consecutive_failures: u32,
    trial: Trial,
    open_until: Option<Instant>,
    /// Openings since the last close, for the backoff.
    openings: u32,
    last_failure: Option<(Instant, ErrorClass)>,
    not_permitted: u64,
}

impl Breaker {
    pub fn new(config: Config, now: Instant) -> Breaker {
        let ring = Ring::new(config.window);
        Breaker {
            config,
            state: State::Closed,
            since: now,
            epoch: 0,
            origin: now,
            ring,
            consecutive_failures: 0,
            trial: Trial::default(),
            open_until: None,
            openings: 0,
            last_failure: None,
            not_permitted: 0,
        }
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn state(&self) -> State {
        self.state
    }

    /// Asks to make a call. Timers are advanced first, so an OPEN breaker whose wait is over admits a trial call.
    /// A refusal is counted as not permitted.
    pub fn try_acquire(&mut self, now: Instant, random: f64) -> (Result<Permit, State>, Vec<Transition>) {
        let transitions = self.advance(now, random);
        let admitted = match self.state {
            State::Closed | State::Disabled | State::MetricsOnly => true,
            State::Open | State::ForcedOpen => false,
            State::HalfOpen => {
                if self.trial.issued < self.config.permitted_calls_in_half_open {
                    self.trial.issued += 1;
                    true
                } else {
                    false
                }
            }
        };
        if admitted {
            (Ok(Permit { epoch: self.epoch }), transitions)
        } else {
            self.not_permitted += 1;
            (Err(self.state), transitions)
        }
    }

    /// Reports the call a permit was used for. `random` in [0, 1) drives the backoff's jitter.
    pub fn record(&mut self, permit: Permit, call: Call, now: Instant, random: f64) -> Vec<Transition> {
        let mut transitions = self.advance(now, random);
        let (failed, latency) = match call {
            Call::Success(latency) => (false, latency),
            Call::Failure(class, _) if self.config.ignored_classes.contains(&class) => {
                // Our own bad request says nothing about the exchange: neither a failure nor a success.
                return transitions;
            }
            Call::Failure(class, latency) => {
                self.last_failure = Some((now, class));
                (true, latency)
            }
        };
        let slow = latency > self.config.slow_call_duration;
        let current = permit.epoch == self.epoch;
        match self.state {
            State::Disabled => {}
            State::Closed | State::MetricsOnly => {
                self.ring.record(self.second(now), failed, slow);
                self.consecutive_failures = if failed { self.consecutive_failures.saturating_add(1) } else { 0 };
                if self.state == State::Closed
                    && let Some(reason) = self.trip_reason(now)
                {
                    transitions.extend(self.open(now, random, reason));
                }
            }
            State::HalfOpen if current => {
                if failed {
                    let reason = "a trial call failed in HALF_OPEN".to_owned();
                    transitions.extend(self.open(now, random, reason));
                } else {
                    self.trial.succeeded += 1;
                    self.trial.slow += u32::from(slow);
                    if self.trial.succeeded >= self.config.permitted_calls_in_half_open {
                        transitions.extend(self.judge_trial(now, random));
                    }
                }
            }
            // A report from an earlier state (a call admitted before the breaker opened) or while forced open
            // only updates the counters shown to operators.
            State::HalfOpen | State::Open | State::ForcedOpen => {
                if failed {
                    self.consecutive_failures = self.consecutive_failures.saturating_add(1);
                }
            }
        }
        transitions
    }

    /// Closes a HALF_OPEN trial early: the caller's verification sequence passed with fewer calls than permitted
    /// (Balance is skipped without credentials, say).
    pub fn trial_passed(&mut self, now: Instant, random: f64) -> Vec<Transition> {
        if self.state == State::HalfOpen && self.trial.succeeded > 0 && self.trial.succeeded >= self.trial.issued {
            self.judge_trial(now, random)
        } else {
            Vec::new()
        }
    }

    /// Every trial call succeeded: close, unless too many of them were slow.
    fn judge_trial(&mut self, now: Instant, random: f64) -> Vec<Transition> {
        let slow_rate = f64::from(self.trial.slow) * 100.0 / f64::from(self.trial.succeeded.max(1));
        if slow_rate >= self.config.slow_call_rate_threshold {
            let reason = format!(
                "slow-call rate {slow_rate:.0}% >= {:.0}% over {} trial calls",
                self.config.slow_call_rate_threshold, self.trial.succeeded
            );
            self.open(now, random, reason)
        } else {
            let reason = format!("{} trial calls succeeded", self.trial.succeeded);
            vec![self.close(now, reason)]
        }
    }

    /// Runs the timers: OPEN to HALF_OPEN when the wait is over, HALF_OPEN to OPEN after `max_wait_in_half_open`.
    pub fn advance(&mut self, now: Instant, random: f64) -> Vec<Transition> {
        match self.state {
            State::Open if self.open_until.is_some_and(|until| now >= until) => {
                let reason = format!("open wait of {} elapsed", humantime::format_duration(now - self.since));
                vec![self.transition(State::HalfOpen, now, reason)]
            }
            State::HalfOpen if now.saturating_duration_since(self.since) >= self.config.max_wait_in_half_open => {
                let reason = format!(
                    "HALF_OPEN for {} without a verdict ({} of {} trial calls succeeded)",
                    humantime::format_duration(self.config.max_wait_in_half_open),
                    self.trial.succeeded,
                    self.config.permitted_calls_in_half_open
                );
                self.open(now, random, reason)
            }
            _ => Vec::new(),
        }
    }

    /// A recovery check made outside the breaker (a cheap public call while OPEN) succeeded: HALF_OPEN now, without
    /// waiting out the open wait, so the trial (the recovery verification) decides at once. Only from OPEN: an
    /// operator's FORCED_OPEN stays, and in any other state there is nothing to shorten.
    pub fn recovery_check_passed(&mut self, now: Instant) -> Vec<Transition> {
        if self.state != State::Open {
            return Vec::new();
        }
        let reason = format!(
            "a recovery check succeeded after {} in OPEN",
            humantime::format_duration(Duration::from_millis(
                now.saturating_duration_since(self.since).as_millis() as u64
            ))
        );
        vec![self.transition(State::HalfOpen, now, reason)]
    }

    /// When the next timer fires, if any: the caller sleeps until then so HALF_OPEN comes on time.
    pub fn next_deadline(&self) -> Option<Instant> {
        match self.state {
            State::Open => self.open_until,
            State::HalfOpen => Some(clock::after(self.since, self.config.max_wait_in_half_open)),
            _ => None,
        }
    }

    /// The operator's manual control. `Open` is not offered (use `ForcedOpen`); forcing HALF_OPEN starts a trial.
    pub fn force(&mut self, target: State, now: Instant) -> Vec<Transition> {
        if target == self.state {
            return Vec::new();
        }
        let reason = format!("forced to {target} by an operator");
        match target {
            State::Closed => vec![self.close(now, reason)],
            State::Open => {
                let transition = self.transition(State::Open, now, reason);
                self.open_until = Some(clock::after(now, self.config.wait_duration_in_open));
                vec![transition]
            }
            other => vec![self.transition(other, now, reason)],
        }
    }

    /// Back to CLOSED with every counter cleared (Resilience4j's `reset()`).
    pub fn reset(&mut self, now: Instant) -> Vec<Transition> {
        let from = self.state;
        self.ring = Ring::new(self.config.window);
        self.origin = now;
        self.consecutive_failures = 0;
        self.last_failure = None;
        self.not_permitted = 0;
        self.openings = 0;
        let transition = self.transition(State::Closed, now, "reset by an operator".to_owned());
        if from == State::Closed { Vec::new() } else { vec![transition] }
    }

    pub fn snapshot(&mut self, now: Instant) -> Snapshot {
        let totals = self.ring.totals(self.second(now));
        Snapshot {
            state: self.state,
            in_state_for: now.saturating_duration_since(self.since),
            consecutive_failures: self.consecutive_failures,
            failure_count: totals.failures,
            calls_in_window: totals.calls,
            slow_calls_in_window: totals.slow,
            failure_rate: self.rate(totals.failures, totals.calls),
            slow_call_rate: self.rate(totals.slow, totals.calls),
            last_failure_class: self.last_failure.map(|(_, class)| class),
            last_failure_ago: self.last_failure.map(|(at, _)| now.saturating_duration_since(at)),
            not_permitted_calls: self.not_permitted,
            half_open_in: match self.state {
                State::Open => self.open_until.map(|until| until.saturating_duration_since(now)),
                _ => None,
            },
        }
    }

    fn rate(&self, part: u32, calls: u32) -> f64 {
        if calls == 0 || calls < self.config.minimum_calls { -1.0 } else { f64::from(part) * 100.0 / f64::from(calls) }
    }

    fn second(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.origin).as_secs()
    }

    /// Why CLOSED should open now, if it should.
    fn trip_reason(&mut self, now: Instant) -> Option<String> {
        if self.config.consecutive_failures > 0 && self.consecutive_failures >= self.config.consecutive_failures {
            return Some(format!("{} consecutive failures", self.consecutive_failures));
        }
        let totals = self.ring.totals(self.second(now));
        if totals.calls == 0 || totals.calls < self.config.minimum_calls {
            return None;
        }
        let failure_rate = self.rate(totals.failures, totals.calls);
        if failure_rate >= self.config.failure_rate_threshold {
            return Some(format!(
                "failure rate {failure_rate:.0}% >= {:.0}% over {} calls",
                self.config.failure_rate_threshold, totals.calls
            ));
        }
        let slow_rate = self.rate(totals.slow, totals.calls);
        if slow_rate >= self.config.slow_call_rate_threshold {
            return Some(format!(
                "slow-call rate {slow_rate:.0}% >= {:.0}% over {} calls",
                self.config.slow_call_rate_threshold, totals.calls
            ));
        }
        None
    }

    fn open(&mut self, now: Instant, random: f64, reason: String) -> Vec<Transition> {
        self.openings = self.openings.saturating_add(1);
        let wait = self.open_wait(random);
        let transition = self.transition(State::Open, now, reason);
        self.open_until = Some(clock::after(now, wait));
        vec![transition]
    }

    fn open_wait(&self, random: f64) -> Duration {
        let base = self.config.wait_duration_in_open;
        match self.config.open_backoff {
            None => base,
            Some(backoff) => {
                let exponent = i32::try_from(self.openings.saturating_sub(1)).unwrap_or(i32::MAX).min(64);
                let grown = base.as_secs_f64() * backoff.multiplier.max(1.0).powi(exponent);
                let capped = grown.min(backoff.max_wait.as_secs_f64());
                let jitter = 1.0 + backoff.jitter.clamp(0.0, 1.0) * (2.0 * random.clamp(0.0, 1.0) - 1.0);
                Duration::from_secs_f64((capped * jitter).max(0.001))
            }
        }
    }

    fn close(&mut self, now: Instant, reason: String) -> Transition {
        self.ring = Ring::new(self.config.window);
        self.origin = now;
        self.consecutive_failures = 0;
        self.openings = 0;
        self.transition(State::Closed, now, reason)
    }

    fn transition(&mut self, to: State, now: Instant, reason: String) -> Transition {
        let from = self.state;
        self.state = to;
        self.since = now;
        self.epoch += 1;
        self.trial = Trial::default();
        self.open_until = None;
        Transition { from, to, reason }
    }
}

/// The breaker's metrics, labelled by exchange.
#[derive(Clone)]
pub struct Metrics {
    state: IntGaugeVec,
    transitions: IntCounterVec,
    not_permitted: IntCounterVec,
    failure_ratio: GaugeVec,
    slow_call_ratio: GaugeVec,
    consecutive_failures: IntGaugeVec,
}

impl Metrics {
    pub fn new(registry: &Registry) -> Metrics {
        let state = IntGaugeVec::new(
            Opts::new("exwatch_circuit_breaker_state", "The circuit breaker's state, one-hot by state."),
            &["exchange", "state"],
        )
        .expect("valid metric definition");
        let transitions = IntCounterVec::new(
            Opts::new("exwatch_circuit_breaker_transitions_total", "Circuit breaker state transitions."),
            &["exchange", "from", "to"],
        )
        .expect("valid metric definition");
        let not_permitted = IntCounterVec::new(
            Opts::new(
                "exwatch_circuit_breaker_not_permitted_calls_total",
                "Calls the circuit breaker refused to send.",
            ),
            &["exchange"],
        )
        .expect("valid metric definition");
        let failure_ratio = GaugeVec::new(
            Opts::new(
                "exwatch_circuit_breaker_failure_ratio",
                "Failed share of the calls in the sliding window; -1 below the minimum number of calls.",
            ),
            &["exchange"],
        )
        .expect("valid metric definition");
        let slow_call_ratio = GaugeVec::new(
            Opts::new(
                "exwatch_circuit_breaker_slow_call_ratio",
                "Slow share of the calls in the sliding window; -1 below the minimum number of calls.",
            ),
            &["exchange"],
        )
        .expect("valid metric definition");
        let consecutive_failures = IntGaugeVec::new(
            Opts::new("exwatch_circuit_breaker_consecutive_failures", "Failures in a row recorded by the breaker."),
            &["exchange"],
        )
        .expect("valid metric definition");
        Metrics {
            state: telemetry::register(registry, state),
            transitions: telemetry::register(registry, transitions),
            not_permitted: telemetry::register(registry, not_permitted),
            failure_ratio: telemetry::register(registry, failure_ratio),
            slow_call_ratio: telemetry::register(registry, slow_call_ratio),
            consecutive_failures: telemetry::register(registry, consecutive_failures),
        }
    }
}

/// One exchange's breaker shared by its poll loop and the admin API. It reads the clock and the random source at
/// the edge, feeds the pure [`Breaker`], and logs and counts every transition with its reason.
pub struct Shared {
    exchange: String,
    machine: Mutex<Breaker>,
    metrics: Metrics,
    /// Wakes the poll loop when an operator changes the state (a forced HALF_OPEN starts the trial at once).
    changed: Notify,
    /// Where transitions are told for incident timelines, once the daemon has a journal.
    journal: OnceLock<journal::Shared>,
}

impl Shared {
    pub fn new(exchange: &str, config: Config, metrics: Metrics) -> Arc<Shared> {
        let shared = Arc::new(Shared {
            exchange: exchange.to_owned(),
            machine: Mutex::new(Breaker::new(config, Instant::now())),
            metrics,
            changed: Notify::new(),
            journal: OnceLock::new(),
        });
        shared.metrics.not_permitted.with_label_values(&[exchange]);
        shared.publish(&mut shared.lock());
        shared
    }

    fn lock(&self) -> MutexGuard<'_, Breaker> {
        self.machine.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn exchange(&self) -> &str {
        &self.exchange
    }

    pub fn state(&self) -> State {
        self.lock().state()
    }

    pub fn config(&self) -> Config {
        self.lock().config().clone()
    }

    /// Whether a failure of this class is ignored (neither failure nor success).
    pub fn ignores(&self, class: ErrorClass) -> bool {
        self.lock().config().ignored_classes.contains(&class)
    }

    pub fn try_acquire(&self) -> Result<Permit, State> {
        let mut machine = self.lock();
        let (permit, transitions) = machine.try_acquire(Instant::now(), rand::random());
        self.apply(&mut machine, transitions);
        if permit.is_err() {
            self.metrics.not_permitted.with_label_values(&[&self.exchange]).inc();
        }
        permit
    }

    pub fn record(&self, permit: Permit, call: Call) {
        let mut machine = self.lock();
        let transitions = machine.record(permit, call, Instant::now(), rand::random());
        self.apply(&mut machine, transitions);
    }

    pub fn trial_passed(&self) {
        let mut machine = self.lock();
        let transitions = machine.trial_passed(Instant::now(), rand::random());
        self.apply(&mut machine, transitions);
    }

    /// Runs the timers; returns the state afterwards.
    pub fn advance(&self) -> State {
        let mut machine = self.lock();
        let transitions = machine.advance(Instant::now(), rand::random());
        self.apply(&mut machine, transitions);
        machine.state()
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        self.lock().next_deadline()
    }

    /// A recovery check succeeded: OPEN becomes HALF_OPEN at once. Returns the state afterwards.
    pub fn recovery_check_passed(&self) -> State {
        let mut machine = self.lock();
        let transitions = machine.recovery_check_passed(Instant::now());
        self.apply(&mut machine, transitions);
        machine.state()
    }

    /// An operator's change of state; returns the transition made, if any.
    pub fn force(&self, target: State) -> Option<Transition> {
        let mut machine = self.lock();
        let transitions = machine.force(target, Instant::now());
        let made = transitions.first().cloned();
        self.apply(&mut machine, transitions);
        drop(machine);
        self.changed.notify_one();
        made
    }

    /// An operator's reset: CLOSED with counters cleared.
    pub fn reset(&self) -> Option<Transition> {
        let mut machine = self.lock();
        let transitions = machine.reset(Instant::now());
        let made = transitions.first().cloned();
        self.apply(&mut machine, transitions);
        drop(machine);
        self.changed.notify_one();
        made
    }

    pub fn snapshot(&self) -> Snapshot {
        let mut machine = self.lock();
        let snapshot = machine.snapshot(Instant::now());
        self.publish_snapshot(&snapshot);
        snapshot
    }

    /// Tells every transition from now on to `journal` as well (set once; a second journal is ignored).
    pub fn set_journal(&self, journal: journal::Shared) {
        let _ = self.journal.set(journal);
    }

    /// Resolves when an operator changed the state.
    pub async fn changed(&self) {
        self.changed.notified().await;
    }

    fn apply(&self, machine: &mut Breaker, transitions: Vec<Transition>) {
        for transition in &transitions {
            self.metrics
                .transitions
                .with_label_values(&[&self.exchange, transition.from.label(), transition.to.label()])
                .inc();
            tracing::info!(
                exchange = self.exchange,
                from = transition.from.as_str(),
                to = transition.to.as_str(),
                reason = transition.reason,
                "Circuit breaker changed state."
            );
            let detail = format!("{} -> {}: {}", transition.from, transition.to, transition.reason);
            journal::record(self.journal.get(), journal::Event::now(&self.exchange, journal::Kind::Breaker, detail));
        }
        self.publish(machine);
    }

    fn publish(&self, machine: &mut Breaker) {
        let snapshot = machine.snapshot(Instant::now());
        self.publish_snapshot(&snapshot);
    }

    fn publish_snapshot(&self, snapshot: &Snapshot) {
        for state in State::ALL {
            self.metrics
                .state
                .with_label_values(&[&self.exchange, state.label()])
                .set(i64::from(state == snapshot.state));
        }
        let ratio = |percent: f64| if percent < 0.0 { -1.0 } else { percent / 100.0 };
        self.metrics.failure_ratio.with_label_values(&[&self.exchange]).set(ratio(snapshot.failure_rate));
        self.metrics.slow_call_ratio.with_label_values(&[&self.exchange]).set(ratio(snapshot.slow_call_rate));
        self.metrics
            .consecutive_failures
            .with_label_values(&[&self.exchange])
            .set(i64::from(snapshot.consecutive_failures));
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const FAST: Duration = Duration::from_millis(200);

    fn breaker(config: Config) -> (Breaker, Instant) {
        let now = Instant::now();
        (Breaker::new(config, now), now)
    }

    /// Acquires and records one call; returns the transitions it caused.
    fn call(breaker: &mut Breaker, now: Instant, outcome: Call) -> Vec<Transition> {
        let (permit, mut transitions) = breaker.try_acquire(now, 0.5);
        let permit = permit.expect("the call is permitted");
        transitions.extend(breaker.record(permit, outcome, now, 0.5));
        transitions
    }

    fn failure() -> Call {
        Call::Failure(ErrorClass::Maintenance, FAST)
    }

    #[test]
    fn breaker_opens_after_three_consecutive_failures() {
        let (mut breaker, start) = breaker(Config::default());
        for poll in 0..2 {
            assert!(call(&mut breaker, start + Duration::from_secs(30 * poll), failure()).is_empty());
        }
        let transitions = call(&mut breaker, start + Duration::from_secs(60), failure());
        assert_eq!(transitions.len(), 1);
        assert_eq!((transitions[0].from, transitions[0].to), (State::Closed, State::Open));
        assert_eq!(transitions[0].reason, "3 consecutive failures");
        let (refused, _) = breaker.try_acquire(start + Duration::from_secs(61), 0.5);
        assert_eq!(refused, Err(State::Open));
        assert_eq!(breaker.snapshot(start + Duration::from_secs(61)).not_permitted_calls, 1);
    }

    #[test]
    fn a_passed_recovery_check_moves_open_to_half_open_before_the_wait_is_over() {
        let (mut breaker, start) = breaker(Config::default());
        for _ in 0..3 {
            call(&mut breaker, start, failure());
        }
        assert_eq!(breaker.state(), State::Open);
        let checked = start + Duration::from_secs(5);
        let transitions = breaker.recovery_check_passed(checked);
        assert_eq!((transitions[0].from, transitions[0].to), (State::Open, State::HalfOpen));
        assert_eq!(transitions[0].reason, "a recovery check succeeded after 5s in OPEN");
        // The trial is the breaker's own: permits as configured, and the trial closes it as always.
        for _ in 0..3 {
            call(&mut breaker, checked, Call::Success(FAST));
        }
        assert_eq!(breaker.state(), State::Closed);
    }

    #[test]
    fn a_recovery_check_changes_nothing_outside_open() {
        let (mut breaker, now) = breaker(Config::default());
        assert!(breaker.recovery_check_passed(now).is_empty());
        breaker.force(State::ForcedOpen, now);
        assert!(breaker.recovery_check_passed(now).is_empty(), "an operator's FORCED_OPEN stays");
        assert_eq!(breaker.state(), State::ForcedOpen);
    }

    #[test]
    fn waits_beyond_the_clocks_range_saturate_instead_of_panicking() {
        let config =
            Config { wait_duration_in_open: Duration::MAX, max_wait_in_half_open: Duration::MAX, ..Config::default() };
        let (mut breaker, start) = breaker(config);
        for poll in 0..3 {
            call(&mut breaker, start + Duration::from_secs(30 * poll), failure());
        }
        assert_eq!(breaker.state(), State::Open);
        assert_eq!(breaker.next_deadline(), Some(start + Duration::from_secs(60) + clock::FAR_FUTURE));
        breaker.force(State::HalfOpen, start);
        assert_eq!(breaker.next_deadline(), Some(start + clock::FAR_FUTURE));
    }

    #[test]
    fn a_success_resets_the_consecutive_count() {
        let (mut breaker, now) = breaker(Config { failure_rate_threshold: 101.0, ..Config::default() });
        for outcome in [failure(), failure(), Call::Success(FAST), failure(), failure()] {
            assert!(call(&mut breaker, now, outcome).is_empty());
        }
        assert_eq!(breaker.state(), State::Closed);
    }

    #[test]
    fn failure_rate_over_the_window_trips_with_its_reason() {
        let config =
            Config { consecutive_failures: 0, window: Window::Count(10), minimum_calls: 10, ..Config::default() };
        let (mut breaker, now) = breaker(config);
        let pattern = [true, false, true, false, true, false, true, false, false];
        for failed in pattern {
            let outcome = if failed { failure() } else { Call::Success(FAST) };
            assert!(call(&mut breaker, now, outcome).is_empty());
        }
        let transitions = call(&mut breaker, now, failure());
        assert_eq!(transitions[0].reason, "failure rate 50% >= 50% over 10 calls");
    }

    #[test]
    fn time_window_forgets_old_calls() {
        let config = Config {
            consecutive_failures: 0,
            window: Window::Time(Duration::from_secs(600)),
            minimum_calls: 5,
            ..Config::default()
        };
        let (mut breaker, start) = breaker(config);
        for poll in 0..4 {
            call(&mut breaker, start + Duration::from_secs(30 * poll), failure());
        }
        // Ten minutes after the last of them the four failures are out of the window: one more is 1 call, not 5.
        let later = start + Duration::from_secs(690);
        assert!(call(&mut breaker, later, failure()).is_empty());
        let snapshot = breaker.snapshot(later);
        assert_eq!((snapshot.calls_in_window, snapshot.failure_count), (1, 1));
        assert_eq!(snapshot.failure_rate, -1.0, "below the minimum number of calls");
    }

    #[test]
    fn slow_calls_trip_on_the_slow_call_rate() {
        let config = Config { slow_call_rate_threshold: 60.0, minimum_calls: 5, ..Config::default() };
        let (mut breaker, now) = breaker(config);
        let slow = Call::Success(Duration::from_secs(6));
        for outcome in [slow, slow, Call::Success(FAST), Call::Success(FAST)] {
            assert!(call(&mut breaker, now, outcome).is_empty());
        }
        let transitions = call(&mut breaker, now, slow);
        assert_eq!(transitions[0].reason, "slow-call rate 60% >= 60% over 5 calls");
    }

    #[test]
    fn invalid_requests_are_ignored_by_default() {
        let (mut breaker, now) = breaker(Config::default());
        for _ in 0..10 {
            call(&mut breaker, now, Call::Failure(ErrorClass::InvalidRequest, FAST));
        }
        assert_eq!(breaker.state(), State::Closed);
        assert_eq!(breaker.snapshot(now).calls_in_window, 0);
    }

    #[test]
    fn open_moves_to_half_open_on_the_timer_and_closes_after_the_trial() {
        let (mut breaker, start) = breaker(Config::default());
        for _ in 0..3 {
            call(&mut breaker, start, failure());
        }
        assert_eq!(breaker.next_deadline(), Some(start + Duration::from_secs(60)));
        assert!(breaker.advance(start + Duration::from_secs(59), 0.5).is_empty());
        let transitions = breaker.advance(start + Duration::from_secs(60), 0.5);
        assert_eq!((transitions[0].from, transitions[0].to), (State::Open, State::HalfOpen));
        let now = start + Duration::from_secs(61);
        for trial in 0..3 {
            let transitions = call(&mut breaker, now, Call::Success(FAST));
            assert_eq!(transitions.is_empty(), trial < 2, "trial {trial}");
        }
        assert_eq!(breaker.state(), State::Closed);
        assert_eq!(breaker.snapshot(now).consecutive_failures, 0);
    }

    #[test]
    fn half_open_admits_only_the_permitted_calls_and_reopens_on_failure() {
        let (mut breaker, now) = breaker(Config::default());
        breaker.force(State::HalfOpen, now);
        let permits: Vec<_> = (0..3).map(|_| breaker.try_acquire(now, 0.5).0.unwrap()).collect();
        assert_eq!(breaker.try_acquire(now, 0.5).0, Err(State::HalfOpen));
        breaker.record(permits[0], Call::Success(FAST), now, 0.5);
        let transitions = breaker.record(permits[1], failure(), now, 0.5);
        assert_eq!(transitions[0].to, State::Open);
        assert_eq!(transitions[0].reason, "a trial call failed in HALF_OPEN");
        // The third permit belonged to the finished trial: its late success decides nothing.
        assert!(breaker.record(permits[2], Call::Success(FAST), now, 0.5).is_empty());
        assert_eq!(breaker.state(), State::Open);
    }

    #[test]
    fn a_lost_trial_call_cannot_keep_half_open_forever() {
        let (mut breaker, start) = breaker(Config::default());
        breaker.force(State::HalfOpen, start);
        let _lost = breaker.try_acquire(start, 0.5).0.unwrap();
        let transitions = breaker.advance(start + Duration::from_secs(120), 0.5);
        assert_eq!((transitions[0].from, transitions[0].to), (State::HalfOpen, State::Open));
        assert!(transitions[0].reason.starts_with("HALF_OPEN for 2m without a verdict"), "{}", transitions[0].reason);
    }

    #[test]
    fn a_shorter_verification_sequence_can_close_the_trial() {
        let (mut breaker, now) = breaker(Config::default());
        breaker.force(State::HalfOpen, now);
        call(&mut breaker, now, Call::Success(FAST));
        call(&mut breaker, now, Call::Success(FAST));
        let transitions = breaker.trial_passed(now, 0.5);
        assert_eq!(transitions[0].to, State::Closed);
    }

    #[test]
    fn backoff_grows_the_open_wait_up_to_its_cap() {
        let config = Config {
            open_backoff: Some(Backoff { multiplier: 2.0, max_wait: Duration::from_secs(300), jitter: 0.0 }),
            ..Config::default()
        };
        let (mut breaker, mut now) = breaker(config);
        let mut waits = Vec::new();
        for _ in 0..5 {
            breaker.force(State::HalfOpen, now);
            call(&mut breaker, now, failure());
            let deadline = breaker.next_deadline().unwrap();
            waits.push((deadline - now).as_secs());
            now = deadline;
        }
        assert_eq!(waits, vec![60, 120, 240, 300, 300]);
    }

    #[test]
    fn forced_states_and_reset() {
        let (mut breaker, now) = breaker(Config::default());
        breaker.force(State::ForcedOpen, now);
        assert_eq!(breaker.try_acquire(now + Duration::from_secs(3600), 0.5).0, Err(State::ForcedOpen));
        assert_eq!(breaker.state(), State::ForcedOpen, "no timer leaves FORCED_OPEN");
        breaker.force(State::Disabled, now);
        for _ in 0..10 {
            call(&mut breaker, now, failure());
        }
        assert_eq!(breaker.state(), State::Disabled);
        let transitions = breaker.reset(now);
        assert_eq!((transitions[0].from, transitions[0].to), (State::Disabled, State::Closed));
        let snapshot = breaker.snapshot(now);
        assert_eq!((snapshot.not_permitted_calls, snapshot.consecutive_failures, snapshot.calls_in_window), (0, 0, 0));
        assert_eq!(State::parse("HALF_OPEN"), Some(State::HalfOpen));
        assert_eq!(State::parse("open"), None);
    }

    #[derive(Debug, Clone)]
    enum Event {
        Acquire,
        Succeed(u64),
        Fail(u64),
        Wait(u64),
        Force(State),
        Reset,
    }

    fn event() -> impl Strategy<Value = Event> {
        prop_oneof![
            4 => Just(Event::Acquire),
            3 => (0u64..8000).prop_map(Event::Succeed),
            3 => (0u64..8000).prop_map(Event::Fail),
            3 => (0u64..200).prop_map(Event::Wait),
            1 => prop::sample::select(State::ALL.to_vec()).prop_map(Event::Force),
            1 => Just(Event::Reset),
        ]
    }

    fn window() -> impl Strategy<Value = Window> {
        prop_oneof![
            (1u32..20).prop_map(Window::Count),
            (1u64..900).prop_map(|seconds| Window::Time(Duration::from_secs(seconds)))
        ]
    }

    /// Replays `events`, reporting permits in arrival order (some never: lost calls), and checks every invariant.
    fn check_invariants(config: Config, events: Vec<Event>) -> Result<(), TestCaseError> {
        let start = Instant::now();
        let mut now = start;
        let mut breaker = Breaker::new(config.clone(), now);
        let mut outstanding: VecDeque<Permit> = VecDeque::new();
        let mut admitted_in_trial = 0u32;
        let mut epoch_seen = breaker.epoch;
        let mut random = 0.37f64;
        for event in events {
            random = (random * 9.7 + 0.13).fract();
            let before = breaker.state();
            let transitions = match event {
                Event::Acquire => {
                    let (permit, transitions) = breaker.try_acquire(now, random);
                    if breaker.epoch != epoch_seen {
                        epoch_seen = breaker.epoch;
                        admitted_in_trial = 0;
                    }
                    match permit {
                        Ok(permit) => {
                            prop_assert!(!matches!(breaker.state(), State::Open | State::ForcedOpen));
                            if breaker.state() == State::HalfOpen {
                                admitted_in_trial += 1;
                            }
                            outstanding.push_back(permit);
                        }
                        Err(state) => prop_assert!(matches!(state, State::Open | State::ForcedOpen | State::HalfOpen)),
                    }
                    transitions
                }
                Event::Succeed(millis) | Event::Fail(millis) => match outstanding.pop_front() {
                    Some(permit) => {
                        let latency = Duration::from_millis(millis);
                        let call = if matches!(event, Event::Succeed(_)) {
                            Call::Success(latency)
                        } else {
                            Call::Failure(ErrorClass::ServerError, latency)
                        };
                        breaker.record(permit, call, now, random)
                    }
                    None => Vec::new(),
                },
                Event::Wait(seconds) => {
                    now += Duration::from_secs(seconds);
                    breaker.advance(now, random)
                }
                Event::Force(state) => breaker.force(state, now),
                Event::Reset => breaker.reset(now),
            };
            if breaker.epoch != epoch_seen {
                epoch_seen = breaker.epoch;
                admitted_in_trial = 0;
            }
            prop_assert!(admitted_in_trial <= config.permitted_calls_in_half_open, "too many trial calls admitted");
            if breaker.state() == State::HalfOpen {
                prop_assert!(now - breaker.since < config.max_wait_in_half_open, "HALF_OPEN outlived its maximum wait");
            }
            for transition in &transitions {
                prop_assert_ne!(transition.from, transition.to);
                if matches!(transition.from, State::Disabled | State::MetricsOnly | State::ForcedOpen) {
                    prop_assert!(
                        matches!(event, Event::Force(_) | Event::Reset),
                        "{:?} left without an operator",
                        transition
                    );
                }
            }
            let _ = before;
        }
        Ok(())
    }

    proptest! {
        #[test]
        fn breaker_invariants_hold_for_random_event_sequences(
            events in prop::collection::vec(event(), 1..300),
            window in window(),
            consecutive in 0u32..6,
            permitted in 1u32..5,
            minimum_calls in 1u32..10,
        ) {
            let config = Config {
                consecutive_failures: consecutive,
                window,
                minimum_calls,
                permitted_calls_in_half_open: permitted,
                open_backoff: Some(Backoff { multiplier: 1.5, max_wait: Duration::from_secs(600), jitter: 0.2 }),
                ..Config::default()
            };
            check_invariants(config, events)?;
        }

        #[test]
        fn forced_open_admits_nothing_and_disabled_or_metrics_only_never_trip(
            events in prop::collection::vec(prop_oneof![
                Just(Event::Acquire), (0u64..8000).prop_map(Event::Fail), (0u64..8000).prop_map(Event::Succeed),
                (0u64..600).prop_map(Event::Wait),
            ], 1..200),
            forced in prop::sample::select(vec![State::ForcedOpen, State::Disabled, State::MetricsOnly]),
        ) {
            let start = Instant::now();
            let mut now = start;
            let mut breaker = Breaker::new(Config::default(), now);
            breaker.force(forced, now);
            let mut outstanding = VecDeque::new();
            for event in events {
                match event {
                    Event::Acquire => {
                        let (permit, transitions) = breaker.try_acquire(now, 0.5);
                        prop_assert!(transitions.is_empty());
                        prop_assert_eq!(permit.is_ok(), forced != State::ForcedOpen);
                        if let Ok(permit) = permit { outstanding.push_back(permit); }
                    }
                    Event::Fail(millis) | Event::Succeed(millis) => {
                        if let Some(permit) = outstanding.pop_front() {
                            let call = if matches!(event, Event::Fail(_)) {
                                Call::Failure(ErrorClass::Network, Duration::from_millis(millis))
                            } else {
                                Call::Success(Duration::from_millis(millis))
                            };
                            prop_assert!(breaker.record(permit, call, now, 0.5).is_empty());
                        }
                    }
                    Event::Wait(seconds) => {
                        now += Duration::from_secs(seconds);
                        prop_assert!(breaker.advance(now, 0.5).is_empty());
                    }
                    _ => {}
                }
                prop_assert_eq!(breaker.state(), forced);
            }
        }
    }
}
