//! The two alert rules as pure state machines: they take `now` and the poll's facts, do no I/O, and return the
//! change (fire or resolve) for the caller to deliver.
//!
//! - `exchange_api_down` (critical) fires when the breaker is OPEN or after `consecutive_failures` failed polls in a
//!   row, and resolves after `recovery_successes` successful polls with the breaker CLOSED. An operator's FORCED_OPEN
//!   does not page by itself (the operator knows); it is only shown in the status.
//! - `exchange_api_slow` (warning) fires when the average response time of successful calls over `window` exceeds
//!   `threshold`, resolves below `threshold * resolve_ratio` (hysteresis), and neither fires nor stays firing while
//!   the exchange is down: a down exchange is already paging, and its slowness is not news.

use std::collections::VecDeque;
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

use crate::breaker;

/// `exchange_api_down`'s settings.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DownConfig {
    pub consecutive_failures: u32,
    pub recovery_successes: u32,
}

impl Default for DownConfig {
    fn default() -> DownConfig {
        DownConfig { consecutive_failures: 3, recovery_successes: 2 }
    }
}

/// `exchange_api_slow`'s settings.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SlowConfig {
    #[serde(serialize_with = "crate::clock::human_duration")]
    pub window: Duration,
    #[serde(serialize_with = "crate::clock::human_duration")]
    pub threshold: Duration,
    /// Resolves when the average falls below `threshold * resolve_ratio`.
    pub resolve_ratio: f64,
    /// Successful calls the window must hold before the average is judged.
    pub minimum_samples: u32,
}

impl Default for SlowConfig {
    fn default() -> SlowConfig {
        SlowConfig {
            window: Duration::from_secs(300),
            threshold: Duration::from_millis(3000),
            resolve_ratio: 0.8,
            minimum_samples: 3,
        }
    }
}

/// What a rule decided on an observation.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    Fire { reason: String },
    Resolve { reason: String },
}

/// What one poll (or verification step) told the rules.
#[derive(Debug, Clone, PartialEq)]
pub enum PollResult {
    /// Every call that counts succeeded; the latencies of the successful calls only (a failed call's latency is
    /// never a sample of `exchange_api_slow`).
    Succeeded { latencies: Vec<Duration> },
    /// The exchange failed a call, or the price check did not succeed at all (even as our own `invalid_request`:
    /// nothing was checked). The engine decides; see `alert::poll_result`.
    Failed,
    /// The breaker refused the poll: nothing was learned about the exchange.
    NotPermitted,
}

/// `exchange_api_down`.
#[derive(Debug, Clone)]
pub struct DownRule {
    config: DownConfig,
    firing_since: Option<Instant>,
    consecutive_failures: u32,
    consecutive_successes: u32,
}

impl DownRule {
    pub fn new(config: DownConfig) -> DownRule {
        DownRule { config, firing_since: None, consecutive_failures: 0, consecutive_successes: 0 }
    }

    /// Restores a firing alert after a restart, so it neither pages again nor forgets to resolve.
    pub fn restore_firing(&mut self, since: Instant) {
        self.firing_since = Some(since);
    }

    pub fn is_firing(&self) -> bool {
        self.firing_since.is_some()
    }

    pub fn firing_since(&self) -> Option<Instant> {
        self.firing_since
    }

    /// Feeds one poll's result with the breaker's state after it.
    pub fn observe(&mut self, now: Instant, result: &PollResult, breaker: breaker::State) -> Option<Change> {
        match result {
            PollResult::Failed => {
                self.consecutive_failures = self.consecutive_failures.saturating_add(1);
                self.consecutive_successes = 0;
            }
            PollResult::Succeeded { .. } => {
                self.consecutive_successes = self.consecutive_successes.saturating_add(1);
                self.consecutive_failures = 0;
            }
            PollResult::NotPermitted => {}
        }
        self.judge(now, breaker)
    }

    fn judge(&mut self, now: Instant, breaker: breaker::State) -> Option<Change> {
        if self.firing_since.is_none() {
            let reason = if breaker == breaker::State::Open {
                Some("circuit breaker open".to_owned())
            } else if self.config.consecutive_failures > 0
                && self.consecutive_failures >= self.config.consecutive_failures
            {
                Some(format!("{} consecutive failed polls", self.consecutive_failures))
            } else {
                None
            };
            if let Some(reason) = reason {
                self.firing_since = Some(now);
                return Some(Change::Fire { reason });
            }
        } else if breaker == breaker::State::Closed && self.consecutive_successes >= self.config.recovery_successes {
            self.firing_since = None;
            return Some(Change::Resolve {
                reason: format!("{} successful polls with the circuit breaker closed", self.consecutive_successes),
            });
        }
        None
    }
}

/// `exchange_api_slow`.
#[derive(Debug, Clone)]
pub struct SlowRule {
    config: SlowConfig,
    samples: VecDeque<(Instant, Duration)>,
    total: Duration,
    firing_since: Option<Instant>,
}

impl SlowRule {
    pub fn new(config: SlowConfig) -> SlowRule {
        SlowRule { config, samples: VecDeque::new(), total: Duration::ZERO, firing_since: None }
    }

    pub fn restore_firing(&mut self, since: Instant) {
        self.firing_since = Some(since);
    }

    pub fn is_firing(&self) -> bool {
        self.firing_since.is_some()
    }

    /// The average latency of the successful calls in the window, if it holds enough of them.
    pub fn average(&mut self, now: Instant) -> Option<Duration> {
        self.evict(now);
        let count = u32::try_from(self.samples.len()).unwrap_or(u32::MAX);
        (count >= self.config.minimum_samples && count > 0).then(|| self.total / count)
    }

    /// Feeds one poll's result; `exchange_down` is whether `exchange_api_down` is firing.
    pub fn observe(&mut self, now: Instant, result: &PollResult, exchange_down: bool) -> Option<Change> {
        if let PollResult::Succeeded { latencies } = result {
            for latency in latencies {
                self.samples.push_back((now, *latency));
                self.total += *latency;
            }
        }
        let average = self.average(now);
        if exchange_down {
            // While down, the down alert speaks; a firing slow alert resolves rather than paging twice.
            if self.firing_since.take().is_some() {
                return Some(Change::Resolve { reason: "exchange_api_down is firing".to_owned() });
            }
            return None;
        }
        match (self.firing_since, average) {
            (None, Some(average)) if average > self.config.threshold => {
                self.firing_since = Some(now);
                Some(Change::Fire {
                    reason: format!(
                        "average response time {} ms over {} > {} ms",
                        average.as_millis(),
                        humantime::format_duration(self.config.window),
                        self.config.threshold.as_millis()
                    ),
                })
            }
            (Some(_), Some(average)) if average < self.config.threshold.mul_f64(self.config.resolve_ratio) => {
                self.firing_since = None;
                Some(Change::Resolve {
                    reason: format!("average response time {} ms, back under the threshold", average.as_millis()),
                })
            }
            _ => None,
        }
    }

    fn evict(&mut self, now: Instant) {
        while let Some((at, latency)) = self.samples.front() {
            if now.saturating_duration_since(*at) < self.config.window {
                break;
            }
            self.total = self.total.saturating_sub(*latency);
            self.samples.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLL: Duration = Duration::from_secs(30);

    fn ok(millis: u64) -> PollResult {
        PollResult::Succeeded { latencies: vec![Duration::from_millis(millis), Duration::from_millis(millis)] }
    }

    #[test]
    fn one_failed_poll_never_pages() {
        let mut rule = DownRule::new(DownConfig::default());
        let mut now = Instant::now();
        for result in [ok(100), PollResult::Failed, ok(100), PollResult::Failed, PollResult::Failed, ok(100)] {
            assert_eq!(rule.observe(now, &result, breaker::State::Closed), None);
            now += POLL;
        }
    }

    #[test]
    fn three_failed_polls_fire_and_two_successes_with_the_breaker_closed_resolve() {
        let mut rule = DownRule::new(DownConfig::default());
        let start = Instant::now();
        assert_eq!(rule.observe(start, &PollResult::Failed, breaker::State::Closed), None);
        assert_eq!(rule.observe(start + POLL, &PollResult::Failed, breaker::State::Closed), None);
        let fired = rule.observe(start + POLL * 2, &PollResult::Failed, breaker::State::Open);
        assert!(matches!(fired, Some(Change::Fire { .. })), "{fired:?}");
        assert_eq!(rule.observe(start + POLL * 3, &PollResult::NotPermitted, breaker::State::Open), None);
        // The verification closes the breaker; the alert waits for two successful polls.
        assert_eq!(rule.observe(start + POLL * 4, &ok(100), breaker::State::Closed), None);
        let resolved = rule.observe(start + POLL * 5, &ok(100), breaker::State::Closed);
        assert_eq!(
            resolved,
            Some(Change::Resolve { reason: "2 successful polls with the circuit breaker closed".to_owned() })
        );
        assert!(!rule.is_firing());
    }

    #[test]
    fn an_open_breaker_fires_at_once_but_forced_open_does_not() {
        let mut rule = DownRule::new(DownConfig::default());
        let now = Instant::now();
        assert_eq!(rule.observe(now, &PollResult::NotPermitted, breaker::State::ForcedOpen), None);
        assert_eq!(rule.observe(now, &PollResult::NotPermitted, breaker::State::ForcedOpen), None);
        let fired = rule.observe(now, &PollResult::NotPermitted, breaker::State::Open);
        assert_eq!(fired, Some(Change::Fire { reason: "circuit breaker open".to_owned() }));
    }

    #[test]
    fn successes_do_not_resolve_while_the_breaker_is_not_closed() {
        let mut rule = DownRule::new(DownConfig::default());
        let now = Instant::now();
        rule.restore_firing(now);
        assert_eq!(rule.observe(now, &ok(100), breaker::State::HalfOpen), None);
        assert_eq!(rule.observe(now, &ok(100), breaker::State::HalfOpen), None);
        assert!(matches!(rule.observe(now, &ok(100), breaker::State::Closed), Some(Change::Resolve { .. })));
    }

    #[test]
    fn slow_fires_on_a_high_average_and_resolves_with_hysteresis() {
        let mut rule = SlowRule::new(SlowConfig::default());
        let start = Instant::now();
        let mut now = start;
        let mut changes = Vec::new();
        // Six minutes at 3.5 s.
        for _ in 0..12 {
            changes.extend(rule.observe(now, &ok(3500), false));
            now += POLL;
        }
        assert_eq!(changes.len(), 1, "{changes:?}");
        assert!(matches!(&changes[0], Change::Fire { reason } if reason.starts_with("average response time 3500 ms")));
        // 2.8 s is under 3 s but above the 2.4 s resolve level: still firing.
        for _ in 0..12 {
            assert_eq!(rule.observe(now, &ok(2800), false), None);
            now += POLL;
        }
        assert!(rule.is_firing());
        let mut resolved = None;
        for _ in 0..12 {
            resolved = resolved.or(rule.observe(now, &ok(500), false));
            now += POLL;
        }
        assert!(matches!(resolved, Some(Change::Resolve { .. })), "{resolved:?}");
    }

    #[test]
    fn slow_does_not_fire_while_the_exchange_is_down_and_needs_enough_samples() {
        let mut rule = SlowRule::new(SlowConfig::default());
        let now = Instant::now();
        assert_eq!(rule.observe(now, &PollResult::Succeeded { latencies: vec![Duration::from_secs(9)] }, false), None);
        assert_eq!(rule.observe(now, &ok(9000), true), None, "down: slow stays quiet");
        rule.restore_firing(now);
        assert!(matches!(rule.observe(now, &ok(9000), true), Some(Change::Resolve { .. })));
    }
}
