//! The rate limiter of one exchange: separate public and private budgets on `governor`, a run-time rate factor
//! (the runbook's `adjustApiCallFrequency('kraken', 0.5)`), automatic backoff when the exchange says we are too fast,
//! and a pause of private calls when repeating them would extend a lockout.
//!
//! The factor scales both budgets and the poll cadence (the poller polls every `interval / factor`). An operator's
//! factor is a ceiling: automatic backoff halves the current factor on a `rate_limited` answer (down to
//! `min_factor`) and, after `recovery_quiet` without one, doubles it back step by step up to the ceiling.
//! It owns its metrics and logs every change it makes; it knows nothing about the breaker.

use std::collections::VecDeque;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use governor::clock::Clock;
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use prometheus::{GaugeVec, IntCounterVec, Opts, Registry};
use serde::Serialize;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::exchange::{AuthFailure, Error, ErrorClass, Kind, RateBudget};
use crate::telemetry;
use crate::{clock, journal};

/// The limiter's settings, for one exchange. The call budgets start from the exchange kind's documented rates
/// ([`RateBudget`]); `[rate_limit]` and the exchange's own `rate_limit` table override them.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Config {
    pub public_per_second: f64,
    pub public_burst: u32,
    pub private_per_second: f64,
    pub private_burst: u32,
    /// The lowest factor automatic backoff goes to.
    pub min_factor: f64,
    /// How long without a `rate_limited` answer before the factor is raised one step.
    #[serde(serialize_with = "crate::clock::human_duration")]
    pub recovery_quiet: Duration,
    /// How long private calls pause after a lockout or repeated invalid-key answers.
    #[serde(serialize_with = "crate::clock::human_duration")]
    pub private_pause: Duration,
    /// Consecutive invalid-key answers that pause private calls.
    pub invalid_key_threshold: u32,
    /// During a pause for invalid keys, one Balance this often checks whether the key works again (a success ends
    /// the pause). Never during a lockout: Kraken restarts its lockout timer on every retry.
    #[serde(serialize_with = "crate::clock::human_duration")]
    pub private_recheck_interval: Duration,
}

impl Config {
    /// The settings for an exchange whose documented rates are `budget`, the rest at their defaults.
    pub fn with_budget(budget: &RateBudget) -> Config {
        Config {
            public_per_second: budget.public_per_second,
            public_burst: budget.public_burst,
            private_per_second: budget.private_per_second,
            private_burst: budget.private_burst,
            min_factor: 0.125,
            recovery_quiet: Duration::from_secs(300),
            private_pause: Duration::from_secs(900),
            invalid_key_threshold: 2,
            private_recheck_interval: Duration::from_secs(300),
        }
    }
}

impl Default for Config {
    /// The first exchange kind's budget (Kraken's).
    fn default() -> Config {
        Config::with_budget(&Kind::Kraken.profile().rate_budget)
    }
}

/// Which budget a call spends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Budget {
    Public,
    Private,
}

/// An operator's factor outside [`Config::min_factor`, 1]: below the floor a loop would poll so rarely that it is
/// effectively stopped.
#[derive(Debug, Clone, PartialEq)]
pub struct InvalidFactor {
    pub factor: f64,
    pub min_factor: f64,
}

impl std::fmt::Display for InvalidFactor {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let InvalidFactor { factor, min_factor } = self;
        if *factor > 0.0 && factor < min_factor {
            write!(formatter, "factor must be at least {min_factor} (rate_limit.min_factor), got {factor:?}")
        } else {
            write!(formatter, "factor must be greater than 0 and at most 1, got {factor}")
        }
    }
}

impl std::error::Error for InvalidFactor {}

/// A point-in-time view for the admin API and status.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Snapshot {
    pub factor: f64,
    /// The operator's factor; automatic backoff stays at or below it.
    pub ceiling: f64,
    pub public_per_second: f64,
    pub private_per_second: f64,
    pub public_burst: u32,
    pub private_burst: u32,
    /// `rate_limited` answers within the last `recovery_quiet`.
    pub recent_rate_limited: usize,
    #[serde(serialize_with = "crate::clock::optional_human_duration")]
    pub last_rate_limited_ago: Option<Duration>,
    /// Remaining time of a private-call pause, if one is in force.
    #[serde(serialize_with = "crate::clock::optional_human_duration")]
    pub private_paused_for: Option<Duration>,
    pub private_pause_reason: Option<String>,
}

/// governor's clock on top of `tokio::time`, so a paused test clock drives the budgets too.
#[derive(Debug, Clone)]
struct TokioClock {
    origin: Instant,
}

impl Clock for TokioClock {
    type Instant = Duration;

    fn now(&self) -> Duration {
        Instant::now().saturating_duration_since(self.origin)
    }
}

/// Rate-limited answers closer together than this halve the factor once.
const BACKOFF_SPACING: Duration = Duration::from_secs(5);

type Bucket = RateLimiter<NotKeyed, InMemoryState, TokioClock, NoOpMiddleware<Duration>>;

/// The limiter's metrics, labelled by exchange.
#[derive(Clone)]
pub struct Metrics {
    factor: GaugeVec,
    rate_limited: IntCounterVec,
    private_paused: GaugeVec,
    changes: IntCounterVec,
}

impl Metrics {
    pub fn new(registry: &Registry) -> Metrics {
        let factor = GaugeVec::new(
            Opts::new("exwatch_rate_limit_factor", "The run-time rate factor (1 = the configured rate)."),
            &["exchange"],
        )
        .expect("valid metric definition");
        let rate_limited = IntCounterVec::new(
            Opts::new("exwatch_rate_limited_answers_total", "Answers classified rate_limited, which trigger backoff."),
            &["exchange"],
        )
        .expect("valid metric definition");
        let private_paused = GaugeVec::new(
            Opts::new("exwatch_rate_limit_private_paused", "1 while private calls are paused to avoid a lockout."),
            &["exchange"],
        )
        .expect("valid metric definition");
        let changes = IntCounterVec::new(
            Opts::new("exwatch_rate_limit_factor_changes_total", "Changes of the rate factor by cause."),
            &["exchange", "cause"],
        )
        .expect("valid metric definition");
        Metrics {
            factor: telemetry::register(registry, factor),
            rate_limited: telemetry::register(registry, rate_limited),
            private_paused: telemetry::register(registry, private_paused),
            changes: telemetry::register(registry, changes),
        }
    }
}

#[derive(Debug)]
struct State {
    factor: f64,
    ceiling: f64,
    /// When the factor last changed or the last `rate_limited` answer came, whichever is later.
    quiet_since: Instant,
    recent_rate_limited: VecDeque<Instant>,
    consecutive_invalid_keys: u32,
    private_paused_until: Option<(Instant, String)>,
    /// During a pause for invalid keys, when the next re-check of the key is due; `None` during a lockout.
    private_recheck_at: Option<Instant>,
}

/// One exchange's limiter. Shared by the poller and the admin API.
pub struct Limiter {
    exchange: String,
    config: Config,
    clock: TokioClock,
    public: ArcSwap<Bucket>,
    private: ArcSwap<Bucket>,
    state: Mutex<State>,
    /// Woken on every factor change, so the poll loop and a waiting [`Limiter::acquire`] use the new rate at once.
    changed: Notify,
    metrics: Metrics,
    /// Where factor changes and private-call pauses are told for incident timelines, once there is a journal.
    journal: OnceLock<journal::Shared>,
}

impl Limiter {
    pub fn new(exchange: &str, config: Config, metrics: Metrics) -> Arc<Limiter> {
        let now = Instant::now();
        let clock = TokioClock { origin: now };
        let public = ArcSwap::from_pointee(bucket(config.public_per_second, config.public_burst, 1.0, &clock));
        let private = ArcSwap::from_pointee(bucket(config.private_per_second, config.private_burst, 1.0, &clock));
        metrics.factor.with_label_values(&[exchange]).set(1.0);
        metrics.private_paused.with_label_values(&[exchange]).set(0.0);
        metrics.rate_limited.with_label_values(&[exchange]);
        Arc::new(Limiter {
            exchange: exchange.to_owned(),
            config,
            clock,
            public,
            private,
            state: Mutex::new(State {
                factor: 1.0,
                ceiling: 1.0,
                quiet_since: now,
                recent_rate_limited: VecDeque::new(),
                consecutive_invalid_keys: 0,
                private_paused_until: None,
                private_recheck_at: None,
            }),
            changed: Notify::new(),
            metrics,
            journal: OnceLock::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn factor(&self) -> f64 {
        self.lock().factor
    }

    /// Completes at the next change of the factor.
    pub async fn changed(&self) {
        self.changed.notified().await;
    }

    /// Waits until the budget admits one call. A change of the factor ends the wait early, so a raised factor
    /// applies to a call already waiting.
    pub async fn acquire(&self, budget: Budget) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let bucket = match budget {
                Budget::Public => self.public.load_full(),
                Budget::Private => self.private.load_full(),
            };
            match bucket.check() {
                Ok(()) => return,
                Err(not_until) => {
                    tokio::select! {
                        () = tokio::time::sleep(not_until.wait_time_from(self.clock.now())) => {}
                        () = &mut changed => {}
                    }
                }
            }
        }
    }

    /// The operator's factor: sets both the ceiling and the current factor. Refused below `min_factor`.
    pub fn set_factor(&self, factor: f64) -> Result<(), InvalidFactor> {
        if !(factor >= self.config.min_factor && factor <= 1.0) {
            return Err(InvalidFactor { factor, min_factor: self.config.min_factor });
        }
        let mut state = self.lock();
        state.ceiling = factor;
        self.change(&mut state, factor, Instant::now(), "operator");
        Ok(())
    }

    /// Learns from one call's result: backoff on `rate_limited`, private pause on lockout or repeated invalid keys.
    pub fn observe(&self, budget: Budget, result: &Result<(), Error>, now: Instant) {
        let mut state = self.lock();
        match result {
            Err(error) if error.class == ErrorClass::RateLimited => {
                self.metrics.rate_limited.with_label_values(&[&self.exchange]).inc();
                let previous = state.recent_rate_limited.back().copied();
                state.recent_rate_limited.push_back(now);
                state.quiet_since = now;
                // The calls of one poll answer together: their refusals are one signal, so halve once for them.
                if previous.is_some_and(|previous| now.saturating_duration_since(previous) < BACKOFF_SPACING) {
                    return;
                }
                let halved = (state.factor / 2.0).max(self.config.min_factor);
                tracing::warn!(
                    exchange = self.exchange,
                    exchange_errors = ?error.exchange_errors,
                    http_status = error.http_status,
                    factor = halved,
                    "Exchange rate-limited us; halving the call rate."
                );
                self.change(&mut state, halved, now, "backoff");
            }
            Err(error) if budget == Budget::Private && error.class == ErrorClass::Auth => match error.auth {
                Some(AuthFailure::Lockout) => {
                    let reason = "the exchange answered EGeneral:Temporary lockout".to_owned();
                    self.pause_private(&mut state, now, reason, false);
                }
                Some(AuthFailure::InvalidKey) => {
                    state.consecutive_invalid_keys += 1;
                    let paused = state.private_paused_until.as_ref().is_some_and(|(until, _)| now < *until);
                    // A re-check that still fails leaves the pause (and its end) as it is.
                    if !paused && state.consecutive_invalid_keys >= self.config.invalid_key_threshold {
                        let reason = format!("{} consecutive invalid-key answers", state.consecutive_invalid_keys);
                        self.pause_private(&mut state, now, reason, true);
                    }
                }
                _ => {}
            },
            Ok(()) if budget == Budget::Private => {
                state.consecutive_invalid_keys = 0;
                if state.private_paused_until.is_some() {
                    self.end_private_pause(&mut state, "the key works again (a private call succeeded)");
                }
            }
            _ => {}
        }
        self.trim(&mut state, now);
    }

    /// Raises the factor one step toward the ceiling after a quiet period, and ends a private pause that ran out.
    pub fn tick(&self, now: Instant) {
        let mut state = self.lock();
        if state.factor < state.ceiling
            && now.saturating_duration_since(state.quiet_since) >= self.config.recovery_quiet
        {
            let raised = (state.factor * 2.0).min(state.ceiling);
            tracing::info!(
                exchange = self.exchange,
                factor = raised,
                "No rate limiting for a while; raising the call rate."
            );
            self.change(&mut state, raised, now, "recovery");
        }
        if let Some((until, _)) = &state.private_paused_until
            && now >= *until
        {
            self.end_private_pause(&mut state, "the pause ran out");
        }
        self.trim(&mut state, now);
    }

    /// During a pause for invalid keys, whether one private call may check the key now; answering yes books the
    /// check, so the next one is a whole `private_recheck_interval` later. Never during a lockout.
    pub fn private_recheck_due(&self, now: Instant) -> bool {
        let mut state = self.lock();
        match state.private_recheck_at {
            Some(at) if now >= at && state.private_paused_until.as_ref().is_some_and(|(until, _)| now < *until) => {
                state.private_recheck_at = Some(clock::after(now, self.config.private_recheck_interval));
                tracing::info!(exchange = self.exchange, "Checking whether the key works again (one private call).");
                true
            }
            _ => false,
        }
    }

    /// The operator ends a private-call pause (the key was fixed); returns whether one was in force.
    pub fn resume_private(&self, now: Instant) -> bool {
        let mut state = self.lock();
        let paused = state.private_paused_until.as_ref().is_some_and(|(until, _)| now < *until);
        if paused {
            self.end_private_pause(&mut state, "an operator resumed private calls");
        }
        paused
    }

    fn end_private_pause(&self, state: &mut State, why: &str) {
        state.private_paused_until = None;
        state.private_recheck_at = None;
        state.consecutive_invalid_keys = 0;
        self.metrics.private_paused.with_label_values(&[&self.exchange]).set(0.0);
        tracing::info!(exchange = self.exchange, why, "Private-call pause over; private calls resume.");
        self.journal(format!("private calls resume: {why}"));
    }

    /// Whether private calls are paused now, and why.
    pub fn private_paused(&self, now: Instant) -> Option<(Duration, String)> {
        let state = self.lock();
        state
            .private_paused_until
            .as_ref()
            .filter(|(until, _)| now < *until)
            .map(|(until, reason)| (until.saturating_duration_since(now), reason.clone()))
    }

    pub fn snapshot(&self, now: Instant) -> Snapshot {
        let mut state = self.lock();
        self.trim(&mut state, now);
        let paused = state.private_paused_until.as_ref().filter(|(until, _)| now < *until);
        Snapshot {
            factor: state.factor,
            ceiling: state.ceiling,
            public_per_second: self.config.public_per_second * state.factor,
            private_per_second: self.config.private_per_second * state.factor,
            public_burst: scaled_burst(self.config.public_burst, state.factor).get(),
            private_burst: scaled_burst(self.config.private_burst, state.factor).get(),
            recent_rate_limited: state.recent_rate_limited.len(),
            last_rate_limited_ago: state.recent_rate_limited.back().map(|at| now.saturating_duration_since(*at)),
            private_paused_for: paused.map(|(until, _)| until.saturating_duration_since(now)),
            private_pause_reason: paused.map(|(_, reason)| reason.clone()),
        }
    }

    /// Pauses private calls for `private_pause`; `recheck` (invalid keys, not a lockout) lets one call check the key
    /// every `private_recheck_interval`.
    fn pause_private(&self, state: &mut State, now: Instant, reason: String, recheck: bool) {
        let already = state.private_paused_until.as_ref().is_some_and(|(until, _)| now < *until);
        state.private_paused_until = Some((clock::after(now, self.config.private_pause), reason.clone()));
        state.private_recheck_at = recheck.then(|| clock::after(now, self.config.private_recheck_interval));
        self.metrics.private_paused.with_label_values(&[&self.exchange]).set(1.0);
        if !already {
            tracing::warn!(
                exchange = self.exchange,
                reason,
                pause = %humantime::format_duration(self.config.private_pause),
                "Pausing private calls to avoid extending a lockout."
            );
            let pause = humantime::format_duration(self.config.private_pause);
            self.journal(format!("private calls paused for {pause}: {reason}"));
        }
    }

    fn change(&self, state: &mut State, factor: f64, now: Instant, cause: &str) {
        if (factor - state.factor).abs() < f64::EPSILON && cause != "operator" {
            return;
        }
        state.factor = factor;
        state.quiet_since = now;
        self.public.store(Arc::new(bucket(
            self.config.public_per_second,
            self.config.public_burst,
            factor,
            &self.clock,
        )));
        self.private.store(Arc::new(bucket(
            self.config.private_per_second,
            self.config.private_burst,
            factor,
            &self.clock,
        )));
        self.metrics.factor.with_label_values(&[&self.exchange]).set(factor);
        self.metrics.changes.with_label_values(&[&self.exchange, cause]).inc();
        self.changed.notify_waiters();
        tracing::info!(exchange = self.exchange, factor, cause, "Rate factor changed.");
        self.journal(format!("rate factor {factor} ({cause})"));
    }

    /// Tells factor changes and private-call pauses from now on to `journal` as well (set once).
    pub fn set_journal(&self, journal: journal::Shared) {
        let _ = self.journal.set(journal);
    }

    fn journal(&self, detail: String) {
        journal::record(self.journal.get(), journal::Event::now(&self.exchange, journal::Kind::RateLimit, detail));
    }

    /// Forgets `rate_limited` answers older than the quiet period.
    fn trim(&self, state: &mut State, now: Instant) {
        while let Some(at) = state.recent_rate_limited.front() {
            if now.saturating_duration_since(*at) < self.config.recovery_quiet {
                break;
            }
            state.recent_rate_limited.pop_front();
        }
    }
}

fn scaled_burst(burst: u32, factor: f64) -> NonZeroU32 {
    NonZeroU32::new(((f64::from(burst) * factor).floor() as u32).max(1)).unwrap_or(NonZeroU32::MIN)
}

/// A fresh bucket at `per_second * factor` with a burst scaled the same way (at least one call).
fn bucket(per_second: f64, burst: u32, factor: f64, clock: &TokioClock) -> Bucket {
    let rate = (per_second * factor).max(1e-6);
    let period = Duration::from_secs_f64(1.0 / rate);
    let quota = Quota::with_period(period)
        .unwrap_or_else(|| Quota::per_hour(NonZeroU32::MIN))
        .allow_burst(scaled_burst(burst, factor));
    RateLimiter::direct_with_clock(quota, clock.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(config: Config) -> (Arc<Limiter>, Registry) {
        let registry = telemetry::registry();
        (Limiter::new("kraken", config, Metrics::new(&registry)), registry)
    }

    fn rate_limited() -> Result<(), Error> {
        Err(Error::new(ErrorClass::RateLimited, "rate limit")
            .with_exchange_errors(vec!["EAPI:Rate limit exceeded".into()]))
    }

    fn auth(failure: AuthFailure) -> Result<(), Error> {
        let mut error = Error::new(ErrorClass::Auth, "refused");
        error.auth = Some(failure);
        Err(error)
    }

    #[tokio::test(start_paused = true)]
    async fn the_public_budget_paces_calls_at_the_configured_rate() {
        let (limiter, _) = limiter(Config { public_per_second: 2.0, public_burst: 1, ..Config::default() });
        let start = Instant::now();
        for _ in 0..5 {
            limiter.acquire(Budget::Public).await;
        }
        // The first is immediate, the next four are 0.5 s apart.
        assert_eq!(Instant::now() - start, Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn a_lower_factor_slows_the_budget() {
        let (limiter, _) = limiter(Config { public_per_second: 2.0, public_burst: 1, ..Config::default() });
        limiter.set_factor(0.5).unwrap();
        let start = Instant::now();
        for _ in 0..3 {
            limiter.acquire(Budget::Public).await;
        }
        assert_eq!(Instant::now() - start, Duration::from_secs(2));
        assert_eq!(limiter.set_factor(0.0), Err(InvalidFactor { factor: 0.0, min_factor: 0.125 }));
        assert_eq!(limiter.set_factor(1.5), Err(InvalidFactor { factor: 1.5, min_factor: 0.125 }));
        assert!(limiter.set_factor(f64::NAN).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn an_operator_factor_below_min_factor_is_refused() {
        let (limiter, _) = limiter(Config::default());
        let error = limiter.set_factor(1e-300).unwrap_err();
        assert_eq!(error.to_string(), "factor must be at least 0.125 (rate_limit.min_factor), got 1e-300");
        assert_eq!(limiter.factor(), 1.0, "nothing changed");
        limiter.set_factor(0.125).unwrap();
        assert_eq!(limiter.factor(), 0.125, "the floor itself is allowed");
    }

    #[tokio::test(start_paused = true)]
    async fn raising_the_factor_ends_a_wait_already_in_progress() {
        let (limiter, _) = limiter(Config { public_per_second: 1.0, public_burst: 1, ..Config::default() });
        limiter.set_factor(0.125).unwrap();
        limiter.acquire(Budget::Public).await;
        let start = Instant::now();
        let waiting = tokio::spawn({
            let limiter = limiter.clone();
            async move { limiter.acquire(Budget::Public).await }
        });
        // At 0.125 the next call is 8 s away; restoring 1 after 1 s lets it through at once.
        tokio::time::sleep(Duration::from_secs(1)).await;
        limiter.set_factor(1.0).unwrap();
        waiting.await.unwrap();
        assert_eq!(Instant::now() - start, Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn rate_limited_answers_halve_the_factor_which_recovers_step_by_step() {
        let (limiter, registry) = limiter(Config::default());
        let mut now = Instant::now();
        limiter.observe(Budget::Public, &rate_limited(), now);
        limiter.observe(Budget::Public, &rate_limited(), now);
        assert_eq!(limiter.factor(), 0.5, "answers of one poll halve once");
        for _ in 0..5 {
            now += Duration::from_secs(30);
            limiter.observe(Budget::Public, &rate_limited(), now);
        }
        assert_eq!(limiter.factor(), 0.125, "never below min_factor");
        let start = now;
        limiter.tick(start + Duration::from_secs(299));
        assert_eq!(limiter.factor(), 0.125, "not before the quiet period");
        limiter.tick(start + Duration::from_secs(300));
        assert_eq!(limiter.factor(), 0.25);
        limiter.tick(start + Duration::from_secs(400));
        assert_eq!(limiter.factor(), 0.25, "each step waits a quiet period of its own");
        limiter.tick(start + Duration::from_secs(600));
        limiter.tick(start + Duration::from_secs(900));
        assert_eq!(limiter.factor(), 1.0);
        limiter.tick(start + Duration::from_secs(1200));
        assert_eq!(limiter.factor(), 1.0, "never above the ceiling");
        let text = telemetry::encode(&registry).unwrap();
        assert!(text.contains("exwatch_rate_limited_answers_total{exchange=\"kraken\"} 7"), "{text}");
    }

    #[tokio::test(start_paused = true)]
    async fn recovery_stops_at_the_operators_ceiling() {
        let (limiter, _) = limiter(Config::default());
        limiter.set_factor(0.5).unwrap();
        let start = Instant::now();
        limiter.observe(Budget::Public, &rate_limited(), start);
        assert_eq!(limiter.factor(), 0.25);
        limiter.tick(start + Duration::from_secs(300));
        limiter.tick(start + Duration::from_secs(600));
        assert_eq!(limiter.factor(), 0.5);
        assert_eq!(limiter.snapshot(start + Duration::from_secs(600)).ceiling, 0.5);
    }

    #[tokio::test(start_paused = true)]
    async fn a_lockout_pauses_private_calls_for_the_configured_period() {
        let (limiter, _) = limiter(Config::default());
        let start = Instant::now();
        limiter.observe(Budget::Private, &auth(AuthFailure::Lockout), start);
        let (remaining, reason) = limiter.private_paused(start).expect("paused");
        assert_eq!(remaining, Duration::from_secs(900));
        assert!(reason.contains("Temporary lockout"), "{reason}");
        limiter.tick(start + Duration::from_secs(900));
        assert_eq!(limiter.private_paused(start + Duration::from_secs(900)), None);
    }

    #[tokio::test(start_paused = true)]
    async fn repeated_invalid_keys_pause_private_calls_but_one_does_not() {
        let (limiter, _) = limiter(Config::default());
        let now = Instant::now();
        limiter.observe(Budget::Private, &auth(AuthFailure::InvalidKey), now);
        assert_eq!(limiter.private_paused(now), None);
        limiter.observe(Budget::Private, &Ok(()), now);
        limiter.observe(Budget::Private, &auth(AuthFailure::InvalidKey), now);
        assert_eq!(limiter.private_paused(now), None, "a success in between resets the count");
        limiter.observe(Budget::Private, &auth(AuthFailure::InvalidKey), now);
        let snapshot = limiter.snapshot(now);
        assert_eq!(snapshot.private_paused_for, Some(Duration::from_secs(900)));
        assert_eq!(snapshot.private_pause_reason.as_deref(), Some("2 consecutive invalid-key answers"));
    }

    #[tokio::test(start_paused = true)]
    async fn an_invalid_key_pause_lets_one_call_recheck_the_key_per_interval_and_a_success_ends_it() {
        let (limiter, _) = limiter(Config::default());
        let start = Instant::now();
        limiter.observe(Budget::Private, &auth(AuthFailure::InvalidKey), start);
        limiter.observe(Budget::Private, &auth(AuthFailure::InvalidKey), start);
        assert!(limiter.private_paused(start).is_some());
        assert!(!limiter.private_recheck_due(start + Duration::from_secs(299)), "not before the interval");
        let first = start + Duration::from_secs(300);
        assert!(limiter.private_recheck_due(first), "one re-check at the interval");
        assert!(!limiter.private_recheck_due(first), "and only one");
        // The key is still bad: the pause goes on, ending when it would have, and the next check is an interval on.
        limiter.observe(Budget::Private, &auth(AuthFailure::InvalidKey), first);
        assert_eq!(limiter.private_paused(first).map(|(left, _)| left), Some(Duration::from_secs(600)));
        assert!(!limiter.private_recheck_due(first + Duration::from_secs(299)));
        let second = first + Duration::from_secs(300);
        assert!(limiter.private_recheck_due(second));
        // The key works again: the pause is over at once.
        limiter.observe(Budget::Private, &Ok(()), second);
        assert_eq!(limiter.private_paused(second), None);
        assert!(!limiter.private_recheck_due(second + Duration::from_secs(300)), "nothing to re-check");
    }

    #[tokio::test(start_paused = true)]
    async fn a_lockout_is_never_rechecked_because_a_retry_restarts_krakens_timer() {
        let (limiter, _) = limiter(Config::default());
        let start = Instant::now();
        limiter.observe(Budget::Private, &auth(AuthFailure::Lockout), start);
        for minute in 1..15 {
            assert!(!limiter.private_recheck_due(start + Duration::from_secs(60 * minute)), "minute {minute}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_operator_ends_a_pause_at_once() {
        let (limiter, _) = limiter(Config::default());
        let start = Instant::now();
        assert!(!limiter.resume_private(start), "nothing to resume");
        limiter.observe(Budget::Private, &auth(AuthFailure::Lockout), start);
        assert!(limiter.resume_private(start + Duration::from_secs(1)));
        assert_eq!(limiter.private_paused(start + Duration::from_secs(1)), None);
    }

    #[tokio::test(start_paused = true)]
    async fn public_auth_failures_and_other_classes_change_nothing() {
        let (limiter, _) = limiter(Config::default());
        let now = Instant::now();
        limiter.observe(Budget::Public, &auth(AuthFailure::Lockout), now);
        limiter.observe(Budget::Public, &Err(Error::new(ErrorClass::Maintenance, "down")), now);
        assert_eq!(limiter.factor(), 1.0);
        assert_eq!(limiter.private_paused(now), None);
    }
}
