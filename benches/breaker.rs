//! One allow + record cycle of exwatch's circuit breaker, side by side with the `failsafe` crate's breaker in the
//! same criterion group, so the numbers share a machine, a build and a run. Results and their reading live in
//! `bench/breaker.md`.
//!
//! It measures the state machines only: no clock reads on exwatch's side (the caller passes `now`, as the poller
//! does), no I/O, one thread. It does not measure contention: failsafe's breaker is `Sync` behind a mutex, while
//! exwatch's is a plain `&mut` value owned by one poller task.
//!
//! Cases, each for exwatch with a count window (`Window::Count(10)`) and with the default time window (600 s), and
//! for failsafe with consecutive failures alone and with its default shape (success rate over a time window or
//! consecutive failures):
//! - `closed_success`: a closed breaker, every call succeeds (the steady state);
//! - `closed_alternating`: a closed breaker, success and failure alternate and never trip it;
//! - `open_refused`: an open breaker refusing the call (allow only: there is nothing to record).

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use exwatch::breaker::{Breaker, Call, Config, State, Window};
use exwatch::exchange::ErrorClass;
use failsafe::backoff::{self, Constant};
use failsafe::failure_policy::{self, ConsecutiveFailures, OrElse, SuccessRateOverTimeWindow};
use failsafe::{FailurePolicy, StateMachine};
use tokio::time::Instant;

/// The poller's default interval: one call per 30 s puts every call of the time window in a bucket of its own,
/// so each record pushes a bucket and, once the window is full, evicts one (the window's steady-state work).
const POLL_STEP: Duration = Duration::from_secs(30);
/// A latency well under `slow_call_duration`, so no call is slow.
const FAST: Duration = Duration::from_millis(120);
/// The jitter input; no case opens the breaker during measurement, so its value does not matter.
const RANDOM: f64 = 0.5;
/// Long enough that an open breaker stays open for the whole measurement, whatever the iteration count.
const LONG_OPEN: Duration = Duration::from_secs(3600 * 24 * 365 * 10);

/// A counter-derived clock: `base + step * n` for the n-th call, so no iteration reads the system clock.
struct Ticks {
    base: Instant,
    step: Duration,
    count: u32,
}

impl Ticks {
    fn new(step: Duration) -> Ticks {
        // Outside a runtime (even with tokio's test-util feature) this falls back to the system clock; it is read
        // once, before measuring.
        Ticks { base: Instant::now(), step, count: 0 }
    }

    fn next(&mut self) -> Instant {
        self.count = self.count.wrapping_add(1);
        self.base + self.step * self.count
    }
}

/// The two exwatch windows under test, with their names in the report.
fn exwatch_windows() -> [(&'static str, Window); 2] {
    [("exwatch_count10", Window::Count(10)), ("exwatch_time600s", Config::default().window)]
}

type Consecutive = StateMachine<ConsecutiveFailures<Constant>, ()>;
type RateOrConsecutive = StateMachine<OrElse<SuccessRateOverTimeWindow<Constant>, ConsecutiveFailures<Constant>>, ()>;

/// failsafe with only the runbook's rule: open after 3 consecutive failures.
fn failsafe_consecutive() -> Consecutive {
    failsafe::Config::new()
        .failure_policy(failure_policy::consecutive_failures(3, backoff::constant(LONG_OPEN)))
        .build()
}

/// failsafe's default shape (success rate over a 30 s window, min 5 requests, or consecutive failures), with the
/// required success rate given and the consecutive rule at 3 like exwatch's default.
fn failsafe_rate_or_consecutive(required_success_rate: f64) -> RateOrConsecutive {
    let rate = failure_policy::success_rate_over_time_window(
        required_success_rate,
        5,
        Duration::from_secs(30),
        backoff::constant(LONG_OPEN),
    );
    let policy = rate.or_else(failure_policy::consecutive_failures(3, backoff::constant(LONG_OPEN)));
    failsafe::Config::new().failure_policy(policy).build()
}

/// One exwatch cycle: ask for a permit, then report the call's outcome at the same instant.
fn exwatch_cycle(breaker: &mut Breaker, now: Instant, call: Call) {
    let (permit, acquired) = breaker.try_acquire(black_box(now), RANDOM);
    let permit = permit.expect("a closed breaker admits every call");
    let recorded = breaker.record(permit, black_box(call), now, RANDOM);
    black_box((acquired, recorded));
}

/// One failsafe cycle with its lower-level API (`call()` only wraps these three methods).
fn failsafe_cycle<P: FailurePolicy>(breaker: &StateMachine<P, ()>, failed: bool) {
    assert!(black_box(breaker.is_call_permitted()), "a closed breaker admits every call");
    if black_box(failed) {
        breaker.on_error();
    } else {
        breaker.on_success();
    }
}

fn closed_success(criterion: &mut Criterion) {
    let mut group = criterion.benchmark_group("closed_success");
    for (name, window) in exwatch_windows() {
        group.bench_function(name, |bencher| {
            let mut ticks = Ticks::new(POLL_STEP);
            let mut breaker = Breaker::new(Config { window, ..Config::default() }, ticks.base);
            bencher.iter(|| exwatch_cycle(&mut breaker, ticks.next(), Call::Success(FAST)));
            assert_eq!(breaker.state(), State::Closed);
        });
    }
    group.bench_function("failsafe_consecutive3", |bencher| {
        let breaker = failsafe_consecutive();
        bencher.iter(|| failsafe_cycle(&breaker, false));
    });
    group.bench_function("failsafe_rate_or_consecutive3", |bencher| {
        let breaker = failsafe_rate_or_consecutive(0.8);
        bencher.iter(|| failsafe_cycle(&breaker, false));
    });
    group.finish();
}

fn closed_alternating(criterion: &mut Criterion) {
    let mut group = criterion.benchmark_group("closed_alternating");
    for (name, window) in exwatch_windows() {
        group.bench_function(name, |bencher| {
            // A 50% failure rate would trip the default 50% threshold: above 100% the rate rule is still evaluated
            // on every record but can never trip, and alternation keeps consecutive failures at 1 (< 3).
            let config = Config { window, failure_rate_threshold: 101.0, ..Config::default() };
            let mut ticks = Ticks::new(POLL_STEP);
            let mut breaker = Breaker::new(config, ticks.base);
            let mut failed = false;
            bencher.iter(|| {
                failed = !failed;
                let call = if failed { Call::Failure(ErrorClass::ServerError, FAST) } else { Call::Success(FAST) };
                exwatch_cycle(&mut breaker, ticks.next(), call);
            });
            assert_eq!(breaker.state(), State::Closed);
        });
    }
    group.bench_function("failsafe_consecutive3", |bencher| {
        let breaker = failsafe_consecutive();
        let mut failed = false;
        bencher.iter(|| {
            failed = !failed;
            failsafe_cycle(&breaker, failed);
        });
    });
    group.bench_function("failsafe_rate_or_consecutive3", |bencher| {
        // The same trick as exwatch's 101%: a required success rate of 0 is still computed but can never trip.
        let breaker = failsafe_rate_or_consecutive(0.0);
        let mut failed = false;
        bencher.iter(|| {
            failed = !failed;
            failsafe_cycle(&breaker, failed);
        });
    });
    group.finish();
}

fn open_refused(criterion: &mut Criterion) {
    let mut group = criterion.benchmark_group("open_refused");
    for (name, window) in exwatch_windows() {
        group.bench_function(name, |bencher| {
            let config = Config { window, wait_duration_in_open: LONG_OPEN, ..Config::default() };
            // A millisecond per call: the open path ignores the window, and the wait must outlast the run.
            let mut ticks = Ticks::new(Duration::from_millis(1));
            let mut breaker = Breaker::new(config, ticks.base);
            for _ in 0..3 {
                let (permit, _) = breaker.try_acquire(ticks.base, RANDOM);
                let permit = permit.expect("a closed breaker admits every call");
                let _ = breaker.record(permit, Call::Failure(ErrorClass::ServerError, FAST), ticks.base, RANDOM);
            }
            assert_eq!(breaker.state(), State::Open);
            bencher.iter(|| {
                let (refused, transitions) = breaker.try_acquire(black_box(ticks.next()), RANDOM);
                black_box((refused.is_err(), transitions));
            });
            assert_eq!(breaker.state(), State::Open);
        });
    }
    group.bench_function("failsafe_consecutive3", |bencher| {
        let breaker = failsafe_consecutive();
        open_failsafe(&breaker);
        bencher.iter(|| black_box(breaker.is_call_permitted()));
        assert!(!breaker.is_call_permitted(), "still open");
    });
    group.bench_function("failsafe_rate_or_consecutive3", |bencher| {
        let breaker = failsafe_rate_or_consecutive(0.8);
        open_failsafe(&breaker);
        bencher.iter(|| black_box(breaker.is_call_permitted()));
        assert!(!breaker.is_call_permitted(), "still open");
    });
    group.finish();
}

/// Three consecutive failures open a failsafe breaker built above, for `LONG_OPEN`.
fn open_failsafe<P: FailurePolicy>(breaker: &StateMachine<P, ()>) {
    for _ in 0..3 {
        assert!(breaker.is_call_permitted(), "closed before the third failure");
        breaker.on_error();
    }
    assert!(!breaker.is_call_permitted(), "open after three consecutive failures");
}

criterion_group!(benches, closed_success, closed_alternating, open_refused);
criterion_main!(benches);
