//! When the poll loop acts next, and what it does then: a pure state machine that takes `now` and the facts of the
//! moment (breaker state, whether `exchange_api_down` fires, the rate factor) and does no I/O.
//!
//! Three modes:
//! - `normal`: a full poll (Ticker and SystemStatus) on the regular grid, every `interval / factor`.
//! - `confirming`: a poll failed, the breaker is not open and the down alert does not fire. The loop polls again
//!   `confirm_interval` after each failed poll until the down rule's streak (`alerts.down.consecutive_failures`)
//!   is reached or a poll succeeds, so an outage pages seconds after the first failed poll instead of two intervals
//!   later, and a single blip is ruled out within seconds. A `rate_limited` answer never starts or continues a
//!   confirmation: the exchange asked us to slow down, so the next poll comes on the regular (stretched) grid.
//! - `recovering`: the breaker is OPEN (or HALF_OPEN) or the down alert fires. While the breaker refuses calls, a
//!   cheap public check (SystemStatus and Time, never a private call) runs every `recovery_check_interval`; its
//!   first success moves the breaker to HALF_OPEN and the recovery verification runs. While the alert still fires
//!   with the breaker closed, full polls run at that interval, so the `recovery_successes` polls that resolve it
//!   are seconds apart. A failed verification doubles the check interval (up to the breaker's open wait), so an
//!   exchange that answers the checks but fails the verification is not hammered.
//!
//! Every interval is stretched by the rate factor and is never shorter than the public budget allows for the calls
//! it makes (`rate_limit.public_per_second`), so no mode spends more than the budget. The regular grid keeps
//! running underneath (polls the breaker refuses are still recorded as `not_permitted`); a fast poll re-anchors it,
//! so the next regular poll is one period after the last poll. The schedule does not log, count or call anything:
//! the poll loop acts on [`Schedule::next`] and reports back, and logs each returned [`Change`].

use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

use crate::{alert, breaker, clock, limiter};

/// Public calls in a full poll (Ticker and SystemStatus).
pub const POLL_CALLS: f64 = 2.0;
/// Public calls in a recovery check (SystemStatus and Time).
pub const CHECK_CALLS: f64 = 2.0;
/// Public calls of the recovery verification a passing check leads to (Ticker and Depth; Balance is private).
pub const VERIFICATION_CALLS: f64 = 2.0;

/// The longest a failed verification may stretch the check interval, in doublings (2^6 = 64 times).
const MAX_DOUBLINGS: u32 = 6;

/// The schedule's settings, gathered from `[poll]`, `alerts.down`, `[rate_limit]` and `[breaker]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub interval: Duration,
    pub confirm_interval: Duration,
    pub recovery_check_interval: Duration,
    /// Failed polls the down rule needs (`alerts.down.consecutive_failures`): confirmation stops there.
    pub streak: u32,
    /// `rate_limit.public_per_second` at factor 1.
    pub public_per_second: f64,
    /// The breaker's open wait: failed verifications never stretch the check interval beyond it.
    pub longest_check_interval: Duration,
}

impl Config {
    pub fn new(
        poll: &super::Config,
        down: &alert::rules::DownConfig,
        rate_limit: &limiter::Config,
        breaker: &breaker::Config,
    ) -> Config {
        Config {
            interval: poll.interval,
            confirm_interval: poll.confirm_interval,
            recovery_check_interval: poll.recovery_check_interval,
            streak: down.consecutive_failures,
            public_per_second: rate_limit.public_per_second,
            longest_check_interval: breaker.wait_duration_in_open,
        }
    }
}

impl Default for Config {
    fn default() -> Config {
        Config::new(
            &super::Config::default(),
            &alert::rules::DownConfig::default(),
            &limiter::Config::default(),
            &breaker::Config::default(),
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    Normal,
    Confirming,
    Recovering,
}

impl Mode {
    pub const ALL: [Mode; 3] = [Mode::Normal, Mode::Confirming, Mode::Recovering];

    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Normal => "normal",
            Mode::Confirming => "confirming",
            Mode::Recovering => "recovering",
        }
    }
}

/// What the loop does when [`Schedule::next`] is due.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// A full poll (through the breaker, as always).
    Poll,
    /// The cheap public recovery check, outside the breaker (which is refusing calls).
    Check,
}

/// A poll as the schedule sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Poll {
    Succeeded,
    /// A call failed, none of them `rate_limited`.
    Failed,
    /// A call was `rate_limited`: a failure, and a request to slow down.
    RateLimited,
    /// The breaker refused the poll: nothing was sent, nothing learned.
    NotPermitted,
}

/// The facts of the moment the schedule decides on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Facts {
    pub breaker: breaker::State,
    pub down_firing: bool,
    /// The limiter's rate factor, in (0, 1].
    pub factor: f64,
}

impl Default for Facts {
    fn default() -> Facts {
        Facts { breaker: breaker::State::Closed, down_firing: false, factor: 1.0 }
    }
}

/// A change of mode, with why and when the loop acts next.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub from: Mode,
    pub to: Mode,
    pub reason: &'static str,
    /// Failed polls in the current streak.
    pub failed_polls: u32,
    pub next: Action,
    pub next_in: Duration,
}

/// The schedule's state for `/api/v1/status`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct View {
    pub mode: Mode,
    pub failed_polls: u32,
    pub next_action: Action,
    pub next_in_seconds: f64,
}

/// One exchange's poll schedule.
#[derive(Debug, Clone)]
pub struct Schedule {
    config: Config,
    mode: Mode,
    /// The regular grid's next slot, and the poll it counts from.
    slot: Instant,
    anchor: Instant,
    /// The next confirmation poll or recovery action, outside `normal`.
    soon: Option<Instant>,
    /// Failed polls (rate-limited ones included) since the last success.
    failures: u32,
    /// Whether the last poll that reached the exchange failed for a reason worth confirming.
    suspect: bool,
    /// Failed recovery verifications that a passed check led to, since the breaker last closed.
    failed_verifications: u32,
    /// Whether the last recovery check passed (so the verification that follows was the check's doing).
    check_passed: bool,
    facts: Facts,
}

impl Schedule {
    /// A schedule whose first poll is due at `now`.
    pub fn new(config: Config, now: Instant) -> Schedule {
        Schedule {
            config,
            mode: Mode::Normal,
            slot: now,
            anchor: now,
            soon: None,
            failures: 0,
            suspect: false,
            failed_verifications: 0,
            check_passed: false,
            facts: Facts::default(),
        }
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// When the loop acts next, and how: the earlier of the regular slot and the mode's own action.
    pub fn next(&self) -> (Instant, Action) {
        let fast = match (self.mode, self.soon) {
            (Mode::Normal, _) | (_, None) => None,
            (Mode::Confirming, Some(at)) => Some((at, Action::Poll)),
            (Mode::Recovering, Some(at)) => match self.facts.breaker {
                breaker::State::Open | breaker::State::HalfOpen => Some((at, Action::Check)),
                // The operator said no calls: only the regular (refused) polls.
                breaker::State::ForcedOpen => None,
                _ => Some((at, Action::Poll)),
            },
        };
        match fast {
            Some(fast) if fast.0 < self.slot => fast,
            _ => (self.slot, Action::Poll),
        }
    }

    pub fn view(&self, now: Instant) -> View {
        let (at, action) = self.next();
        View {
            mode: self.mode,
            failed_polls: self.failures,
            next_action: action,
            next_in_seconds: at.saturating_duration_since(now).as_secs_f64(),
        }
    }

    /// The regular period: the interval stretched by the rate factor.
    pub fn period(&self) -> Duration {
        stretch(self.config.interval, self.facts.factor)
    }

    /// The time between two confirmation polls.
    pub fn confirm_interval(&self) -> Duration {
        self.budgeted(self.config.confirm_interval, POLL_CALLS)
    }

    /// The time between two recovery actions: checks while the breaker refuses calls (stretched by failed
    /// verifications), full polls otherwise.
    pub fn recovery_interval(&self) -> Duration {
        match self.facts.breaker {
            breaker::State::Open | breaker::State::HalfOpen => {
                let base = self.budgeted(self.config.recovery_check_interval, CHECK_CALLS + VERIFICATION_CALLS);
                let stretched = base.saturating_mul(1 << self.failed_verifications.min(MAX_DOUBLINGS));
                stretched.min(self.config.longest_check_interval.max(base))
            }
            _ => self.budgeted(self.config.recovery_check_interval, POLL_CALLS),
        }
    }

    /// `wanted`, but never shorter than the public budget allows for `calls`, stretched by the rate factor.
    fn budgeted(&self, wanted: Duration, calls: f64) -> Duration {
        let floor =
            Duration::from_secs_f64(calls / self.config.public_per_second.max(1e-6)).min(Duration::from_secs(3600));
        stretch(wanted.max(floor), self.facts.factor)
    }

    /// A poll that started at `started` finished at `now` with `poll`; `facts` are those after it.
    pub fn polled(&mut self, started: Instant, now: Instant, poll: Poll, facts: Facts) -> Option<Change> {
        // A regular poll moves the grid on; a fast poll re-anchors it, so the next regular poll is a period later.
        self.anchor = if started >= self.slot { self.slot } else { started };
        self.facts = facts;
        self.slot = next_slot(self.anchor, self.period(), now);
        match poll {
            Poll::Succeeded => {
                self.failures = 0;
                self.suspect = false;
            }
            Poll::Failed => {
                self.failures = self.failures.saturating_add(1);
                self.suspect = true;
            }
            Poll::RateLimited => {
                self.failures = self.failures.saturating_add(1);
                self.suspect = false;
            }
            Poll::NotPermitted => {}
        }
        let acted = poll != Poll::NotPermitted;
        self.decide(now, acted)
    }

    /// A recovery check finished at `now`; `facts` are those after it (the breaker HALF_OPEN if it passed).
    pub fn checked(&mut self, now: Instant, passed: bool, facts: Facts) -> Option<Change> {
        self.facts = facts;
        self.check_passed = passed;
        self.decide(now, true)
    }

    /// The recovery verification finished at `now`. Only a failed verification that a passed check led to
    /// stretches the check interval: one the breaker's own timer started says nothing about the checks.
    pub fn verified(&mut self, now: Instant, passed: bool, facts: Facts) -> Option<Change> {
        self.facts = facts;
        if passed {
            self.failures = 0;
            self.suspect = false;
        } else if self.check_passed {
            self.failed_verifications = self.failed_verifications.saturating_add(1);
        }
        self.check_passed = false;
        self.decide(now, true)
    }

    /// The facts changed without a poll (the breaker's timer, an operator, the rate factor). A new rate factor
    /// moves the next regular poll to one new period after the last poll (at once, if that is past), so raising
    /// the factor again resumes polling without waiting out the slow period.
    pub fn refresh(&mut self, now: Instant, facts: Facts) -> Option<Change> {
        let factor_changed = facts.factor != self.facts.factor;
        self.facts = facts;
        if factor_changed && self.slot > now {
            self.slot = clock::after(self.anchor, self.period()).max(now);
        }
        self.decide(now, false)
    }

    /// Settles the mode after an event at `now`; `acted` says the event was a call to the exchange, which restarts
    /// the wait for the mode's next action.
    fn decide(&mut self, now: Instant, acted: bool) -> Option<Change> {
        if matches!(self.facts.breaker, breaker::State::Closed | breaker::State::Disabled | breaker::State::MetricsOnly)
        {
            self.failed_verifications = 0;
        }
        let breaker_refusing = matches!(self.facts.breaker, breaker::State::Open | breaker::State::HalfOpen);
        let (mode, reason) = if breaker_refusing {
            (Mode::Recovering, "the circuit breaker is open")
        } else if self.facts.down_firing {
            (Mode::Recovering, "exchange_api_down is firing")
        } else if self.suspect && self.failures > 0 && self.failures < self.config.streak {
            (Mode::Confirming, "a poll failed")
        } else if self.failures >= self.config.streak.max(1) && self.mode == Mode::Confirming {
            (Mode::Normal, "the failure streak is complete without an alert")
        } else if self.failures > 0 {
            (Mode::Normal, "the exchange rate-limited us; back to the regular period")
        } else if self.mode == Mode::Recovering {
            (Mode::Normal, "recovered")
        } else {
            (Mode::Normal, "a poll succeeded")
        };
        let from = self.mode;
        self.soon = match mode {
            Mode::Normal => None,
            Mode::Confirming if acted || from != Mode::Confirming => Some(clock::after(now, self.confirm_interval())),
            Mode::Recovering if acted || from != Mode::Recovering => Some(clock::after(now, self.recovery_interval())),
            Mode::Confirming | Mode::Recovering => self.soon,
        };
        self.mode = mode;
        (from != mode).then(|| {
            let (at, next) = self.next();
            Change {
                from,
                to: mode,
                reason,
                failed_polls: self.failures,
                next,
                next_in: at.saturating_duration_since(now),
            }
        })
    }
}

/// `duration / factor`, with the factor kept within (0.001, 1].
fn stretch(duration: Duration, factor: f64) -> Duration {
    duration.div_f64(factor.clamp(0.001, 1.0))
}

/// The next poll's slot: one period after the last, or, when polls overran, the first slot of that grid still
/// ahead. Missed slots are skipped, never caught up in a burst.
pub(crate) fn next_slot(previous: Instant, period: Duration, now: Instant) -> Instant {
    let next = clock::after(previous, period);
    if next > now {
        return next;
    }
    let behind = now.saturating_duration_since(next).as_nanos();
    let period_nanos = period.as_nanos().max(1);
    let skipped = behind / period_nanos + 1;
    let ahead = u64::try_from(skipped.saturating_mul(period_nanos)).map_or(clock::FAR_FUTURE, Duration::from_nanos);
    clock::after(next, ahead)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    fn facts(breaker: breaker::State, down_firing: bool) -> Facts {
        Facts { breaker, down_firing, factor: 1.0 }
    }

    fn closed() -> Facts {
        Facts::default()
    }

    fn open_and_firing() -> Facts {
        facts(breaker::State::Open, true)
    }

    /// A schedule at default settings and its start.
    fn schedule() -> (Schedule, Instant) {
        let start = Instant::now();
        (Schedule::new(Config::default(), start), start)
    }

    /// Runs the poll that is due now and reports `poll` (it takes no time).
    fn poll_at(schedule: &mut Schedule, now: Instant, poll: Poll, after: Facts) -> Option<Change> {
        schedule.polled(now, now, poll, after)
    }

    #[test]
    fn the_next_slot_saturates_instead_of_overflowing() {
        let now = Instant::now();
        assert!(next_slot(now, Duration::MAX, now) > now);
        let behind = now + Duration::from_secs(100);
        assert!(next_slot(now, Duration::from_nanos(1), behind) > behind);
    }

    #[test]
    fn the_defaults_are_two_and_five_seconds_within_kraken_s_public_budget() {
        let config = Config::default();
        assert_eq!((config.confirm_interval, config.recovery_check_interval), (2 * SECOND, 5 * SECOND));
        assert_eq!((config.interval, config.streak, config.public_per_second), (30 * SECOND, 3, 1.0));
    }

    #[test]
    fn a_failed_poll_is_confirmed_seconds_later_until_the_down_rule_s_streak_is_reached() {
        let (mut schedule, start) = schedule();
        assert_eq!(schedule.next(), (start, Action::Poll));
        let change = poll_at(&mut schedule, start, Poll::Failed, closed()).expect("a change");
        assert_eq!((change.from, change.to, change.reason), (Mode::Normal, Mode::Confirming, "a poll failed"));
        assert_eq!((change.next, change.next_in), (Action::Poll, 2 * SECOND));
        assert_eq!(schedule.next(), (start + 2 * SECOND, Action::Poll));
        assert_eq!(poll_at(&mut schedule, start + 2 * SECOND, Poll::Failed, closed()), None);
        assert_eq!(schedule.next(), (start + 4 * SECOND, Action::Poll));
        // The third failed poll opens the breaker and fires the alert: recovery checks from now on.
        let change = poll_at(&mut schedule, start + 4 * SECOND, Poll::Failed, open_and_firing()).expect("a change");
        assert_eq!((change.to, change.failed_polls, change.next), (Mode::Recovering, 3, Action::Check));
        assert_eq!(schedule.next(), (start + 9 * SECOND, Action::Check));
    }

    #[test]
    fn a_single_blip_is_ruled_out_and_the_next_poll_is_a_period_after_the_confirmation() {
        let (mut schedule, start) = schedule();
        poll_at(&mut schedule, start, Poll::Succeeded, closed());
        let blip = start + 30 * SECOND;
        assert_eq!(schedule.next(), (blip, Action::Poll));
        poll_at(&mut schedule, blip, Poll::Failed, closed());
        let change = poll_at(&mut schedule, blip + 2 * SECOND, Poll::Succeeded, closed()).expect("a change");
        assert_eq!((change.from, change.to, change.reason), (Mode::Confirming, Mode::Normal, "a poll succeeded"));
        assert_eq!(schedule.next(), (blip + 32 * SECOND, Action::Poll));
        assert_eq!(schedule.view(blip + 2 * SECOND).failed_polls, 0);
    }

    #[test]
    fn a_streak_without_an_alert_goes_back_to_the_regular_period() {
        // invalid_request, say, which the breaker ignores: the down rule decides, and confirmation stops.
        let (mut schedule, start) = schedule();
        for second in [0, 2] {
            poll_at(&mut schedule, start + second * SECOND, Poll::Failed, closed());
        }
        let change = poll_at(&mut schedule, start + 4 * SECOND, Poll::Failed, closed()).expect("a change");
        assert_eq!((change.to, change.reason), (Mode::Normal, "the failure streak is complete without an alert"));
        assert_eq!(schedule.next(), (start + 34 * SECOND, Action::Poll));
    }

    #[test]
    fn a_rate_limited_answer_never_starts_a_confirmation() {
        let (mut schedule, start) = schedule();
        let halved = Facts { factor: 0.5, ..closed() };
        assert_eq!(poll_at(&mut schedule, start, Poll::RateLimited, halved), None);
        assert_eq!(schedule.mode(), Mode::Normal);
        assert_eq!(schedule.next(), (start + 60 * SECOND, Action::Poll), "the period stretched by the factor");
    }

    #[test]
    fn a_rate_limited_answer_during_confirmation_slows_the_schedule_down() {
        let (mut schedule, start) = schedule();
        poll_at(&mut schedule, start, Poll::Failed, closed());
        let confirming_at = start + 2 * SECOND;
        let halved = Facts { factor: 0.5, ..closed() };
        let change = poll_at(&mut schedule, confirming_at, Poll::RateLimited, halved).expect("a change");
        assert_eq!((change.from, change.to), (Mode::Confirming, Mode::Normal));
        let (next, action) = schedule.next();
        assert_eq!(action, Action::Poll);
        assert!(next >= confirming_at + 60 * SECOND, "{:?}", next - confirming_at);
    }

    #[test]
    fn a_raised_factor_brings_the_next_regular_poll_back_at_once() {
        let (mut schedule, start) = schedule();
        poll_at(&mut schedule, start, Poll::Succeeded, Facts { factor: 0.001, ..closed() });
        assert_eq!(schedule.next().0, start + 30_000 * SECOND);
        let restored = start + 40 * SECOND;
        schedule.refresh(restored, closed());
        assert_eq!(schedule.next(), (restored, Action::Poll), "30 s after the last poll is past: poll now");
        // Lowered: the next poll moves out to the new period after the last one.
        poll_at(&mut schedule, restored, Poll::Succeeded, closed());
        schedule.refresh(restored + SECOND, Facts { factor: 0.5, ..closed() });
        assert_eq!(schedule.next().0, restored + 60 * SECOND);
    }

    #[test]
    fn every_interval_is_stretched_by_the_budget_and_the_factor() {
        let start = Instant::now();
        let tight = Config { public_per_second: 0.5, confirm_interval: SECOND, ..Config::default() };
        let mut schedule = Schedule::new(tight, start);
        poll_at(&mut schedule, start, Poll::Failed, closed());
        assert_eq!(schedule.confirm_interval(), 4 * SECOND, "two calls at half a call per second");
        schedule.refresh(start, Facts { factor: 0.25, ..closed() });
        assert_eq!(schedule.confirm_interval(), 16 * SECOND);
        assert_eq!(schedule.period(), 120 * SECOND);
        schedule.refresh(start, Facts { factor: 0.25, ..open_and_firing() });
        // A check may lead to a verification: four public calls at half a call per second, then the factor.
        assert_eq!(schedule.recovery_interval(), 32 * SECOND);
    }

    #[test]
    fn while_the_breaker_is_open_checks_run_between_the_refused_regular_polls() {
        let (mut schedule, start) = schedule();
        for second in [0, 2] {
            poll_at(&mut schedule, start + second * SECOND, Poll::Failed, closed());
        }
        poll_at(&mut schedule, start + 4 * SECOND, Poll::Failed, open_and_firing());
        let mut actions = Vec::new();
        for _ in 0..9 {
            let (at, action) = schedule.next();
            actions.push(((at - start).as_secs(), action));
            match action {
                Action::Check => assert_eq!(schedule.checked(at, false, open_and_firing()), None),
                Action::Poll => assert_eq!(poll_at(&mut schedule, at, Poll::NotPermitted, open_and_firing()), None),
            }
        }
        let checks: Vec<u64> =
            actions.iter().filter(|(_, action)| *action == Action::Check).map(|(second, _)| *second).collect();
        assert_eq!(checks, [9, 14, 19, 24, 29, 34, 39, 44]);
        assert!(actions.contains(&(34, Action::Poll)), "the regular grid goes on: {actions:?}");
    }

    #[test]
    fn a_passed_check_and_verification_leave_full_polls_seconds_apart_until_the_alert_resolves() {
        let (mut schedule, start) = schedule();
        poll_at(&mut schedule, start, Poll::Failed, open_and_firing());
        let check = start + 5 * SECOND;
        assert_eq!(schedule.next(), (check, Action::Check));
        schedule.checked(check, true, facts(breaker::State::HalfOpen, true));
        let firing_closed = facts(breaker::State::Closed, true);
        assert_eq!(schedule.verified(check, true, firing_closed), None);
        assert_eq!(schedule.mode(), Mode::Recovering);
        assert_eq!(schedule.next(), (check + 5 * SECOND, Action::Poll), "a full poll, not a check");
        let change = poll_at(&mut schedule, check + 5 * SECOND, Poll::Succeeded, closed()).expect("a change");
        assert_eq!((change.from, change.to, change.reason), (Mode::Recovering, Mode::Normal, "recovered"));
        assert_eq!(schedule.next(), (check + 35 * SECOND, Action::Poll));
    }

    #[test]
    fn each_failed_verification_doubles_the_check_interval_up_to_the_open_wait() {
        let (mut schedule, start) = schedule();
        poll_at(&mut schedule, start, Poll::Failed, open_and_firing());
        let mut now = start;
        let mut waits = Vec::new();
        while waits.len() < 6 {
            let (at, action) = schedule.next();
            if action == Action::Poll {
                // A regular poll, refused by the open breaker.
                poll_at(&mut schedule, at, Poll::NotPermitted, open_and_firing());
                continue;
            }
            waits.push((at - now).as_secs());
            now = at;
            schedule.checked(now, true, facts(breaker::State::HalfOpen, true));
            schedule.verified(now, false, open_and_firing());
        }
        assert_eq!(waits, [5, 10, 20, 40, 60, 60]);
        // A verification the breaker's timer started, after failed checks, stretches nothing.
        schedule.verified(now, true, facts(breaker::State::Closed, true));
        schedule.refresh(now, open_and_firing());
        schedule.checked(now, false, open_and_firing());
        schedule.verified(now, false, open_and_firing());
        assert_eq!(schedule.recovery_interval(), 5 * SECOND);
    }

    #[test]
    fn an_operator_s_forced_open_gets_no_recovery_checks() {
        let (mut schedule, start) = schedule();
        poll_at(&mut schedule, start, Poll::Failed, open_and_firing());
        schedule.refresh(start, facts(breaker::State::ForcedOpen, true));
        assert_eq!(schedule.next(), (start + 30 * SECOND, Action::Poll));
    }

    /// Drives `schedule` for ten minutes with the given answers and returns the most public calls in any minute.
    fn busiest_minute(
        mut schedule: Schedule,
        start: Instant,
        drive: impl Fn(&mut Schedule, Instant, Action) -> f64,
    ) -> f64 {
        let mut calls: Vec<(Instant, f64)> = Vec::new();
        loop {
            let (at, action) = schedule.next();
            if at >= start + 600 * SECOND {
                break;
            }
            calls.push((at, drive(&mut schedule, at, action)));
        }
        calls
            .iter()
            .map(|(from, _)| {
                calls.iter().filter(|(at, _)| *at >= *from && *at < *from + 60 * SECOND).map(|(_, n)| n).sum()
            })
            .fold(0.0, f64::max)
    }

    #[test]
    fn calls_per_minute_stay_within_the_public_budget_in_every_mode() {
        for public_per_second in [1.0, 0.5, 0.1] {
            let config = Config { public_per_second, streak: 1000, ..Config::default() };
            let budget = public_per_second * 60.0;
            let start = Instant::now();

            // Confirming for ten minutes: every poll fails and the streak is never reached.
            let confirming = busiest_minute(Schedule::new(config.clone(), start), start, |schedule, at, _| {
                poll_at(schedule, at, Poll::Failed, closed());
                assert_eq!(schedule.mode(), Mode::Confirming);
                POLL_CALLS
            });
            // Recovering with the breaker open: every check passes and every verification (Ticker, Depth) fails,
            // the most a recovery can cost; the regular polls are refused and cost nothing.
            let open =
                busiest_minute(Schedule::new(config.clone(), start), start, |schedule, at, action| match action {
                    Action::Poll => {
                        poll_at(schedule, at, Poll::NotPermitted, open_and_firing());
                        0.0
                    }
                    Action::Check => {
                        schedule.checked(at, true, facts(breaker::State::HalfOpen, true));
                        schedule.verified(at, false, open_and_firing());
                        CHECK_CALLS + VERIFICATION_CALLS
                    }
                });
            // Recovering with the breaker closed and the alert firing: full polls that keep failing.
            let firing = busiest_minute(Schedule::new(config.clone(), start), start, |schedule, at, _| {
                poll_at(schedule, at, Poll::Failed, facts(breaker::State::Closed, true));
                assert_eq!(schedule.mode(), Mode::Recovering);
                POLL_CALLS
            });
            let normal = busiest_minute(Schedule::new(config.clone(), start), start, |schedule, at, _| {
                poll_at(schedule, at, Poll::Succeeded, closed());
                POLL_CALLS
            });
            for (mode, calls) in [("normal", normal), ("confirming", confirming), ("open", open), ("firing", firing)] {
                assert!(calls <= budget, "{mode} at {public_per_second}/s: {calls} calls in a minute > {budget}");
            }
            assert!(confirming > normal, "confirmation is faster than the regular period");
        }
    }
}
