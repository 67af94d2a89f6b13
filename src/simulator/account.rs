//! The simulator's bookkeeping for who may call what: the private API key's lockout, nonce and call counter,
//! and the per-IP token bucket for public calls. Pure state machines that take `now` as an argument and do no
//! I/O, so they are unit-tested with explicit instants. Deciding which Kraken error string to answer is here;
//! building the HTTP answer is not (see `answer`).

use std::time::Duration;

use tokio::time::Instant;

use super::answer::{INVALID_KEY, INVALID_NONCE, RATE_LIMIT_EXCEEDED, TEMPORARY_LOCKOUT};
use super::{PrivateCounter, PublicRateLimit};

/// What Kraken remembers about the one API key the simulator accepts, plus the run of invalid keys that leads
/// to a lockout. Kraken keys the lockout to the caller, not to the bad key, so a good key is locked out too.
#[derive(Debug)]
pub(super) struct Account {
    counter_limits: PrivateCounter,
    lockout_after: u32,
    lockout_duration: Duration,
    consecutive_invalid_keys: u32,
    locked_until: Option<Instant>,
    last_nonce: Option<u64>,
    counter: DecayingCounter,
}

impl Account {
    pub(super) fn new(counter_limits: PrivateCounter, lockout_after: u32, lockout_duration: Duration) -> Account {
        Account {
            counter_limits,
            lockout_after,
            lockout_duration,
            consecutive_invalid_keys: 0,
            locked_until: None,
            last_nonce: None,
            counter: DecayingCounter::default(),
        }
    }

    /// Applies the lockout and the invalid-key rule. During a lockout every call is refused, and a call with a
    /// bad key restarts the timer (Kraken: "each retry with the bad key restarts the timer"). Outside a lockout
    /// the `lockout_after`-th consecutive bad key still answers `EAPI:Invalid key` and starts the lockout, so
    /// the caller sees exactly `lockout_after` invalid-key answers first. `lockout_after == 0` disables lockouts.
    pub(super) fn check_key(&mut self, now: Instant, key_is_valid: bool) -> Result<(), &'static str> {
        if let Some(locked_until) = self.locked_until {
            if now < locked_until {
                if !key_is_valid {
                    self.locked_until = Some(instant_after(now, self.lockout_duration));
                }
                return Err(TEMPORARY_LOCKOUT);
            }
            self.locked_until = None;
        }
        if key_is_valid {
            self.consecutive_invalid_keys = 0;
            return Ok(());
        }
        self.consecutive_invalid_keys = self.consecutive_invalid_keys.saturating_add(1);
        if self.lockout_after > 0 && self.consecutive_invalid_keys >= self.lockout_after {
            self.locked_until = Some(instant_after(now, self.lockout_duration));
            self.consecutive_invalid_keys = 0;
        }
        Err(INVALID_KEY)
    }

    /// Nonces must strictly increase per key (no nonce window, Kraken's default).
    pub(super) fn accept_nonce(&mut self, nonce: u64) -> Result<(), &'static str> {
        if self.last_nonce.is_some_and(|last_nonce| nonce <= last_nonce) {
            return Err(INVALID_NONCE);
        }
        self.last_nonce = Some(nonce);
        Ok(())
    }

    /// Charges one call to the decaying counter; a call that would take it over the maximum is refused and
    /// not charged, as Kraken only counts calls it serves.
    pub(super) fn charge_call(&mut self, now: Instant) -> Result<(), &'static str> {
        let limits = self.counter_limits;
        if self.counter.try_add(now, 1.0, f64::from(limits.max), limits.decay_per_second) {
            Ok(())
        } else {
            Err(RATE_LIMIT_EXCEEDED)
        }
    }
}

/// Kraken's private call counter: +cost per call, minus `decay` per second, never below zero.
#[derive(Debug, Default)]
struct DecayingCounter {
    value: f64,
    updated: Option<Instant>,
}

impl DecayingCounter {
    fn try_add(&mut self, now: Instant, cost: f64, max: f64, decay_per_second: f64) -> bool {
        if let Some(updated) = self.updated {
            let elapsed_seconds = now.saturating_duration_since(updated).as_secs_f64();
            self.value = (self.value - decay_per_second * elapsed_seconds).max(0.0);
        }
        self.updated = Some(now);
        // The epsilon keeps "exactly at the maximum" allowed despite float rounding in the decay.
        if self.value + cost > max + 1e-9 {
            return false;
        }
        self.value += cost;
        true
    }
}

/// A token bucket for one client IP: starts full with `burst` tokens and refills continuously.
#[derive(Debug)]
pub(super) struct TokenBucket {
    tokens: f64,
    updated: Instant,
}

impl TokenBucket {
    pub(super) fn full(now: Instant, limit: PublicRateLimit) -> TokenBucket {
        TokenBucket { tokens: f64::from(limit.burst), updated: now }
    }

    pub(super) fn try_take(&mut self, now: Instant, limit: PublicRateLimit) -> bool {
        let elapsed_seconds = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + limit.refill_per_second * elapsed_seconds).min(f64::from(limit.burst));
        self.updated = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// `now + duration` that cannot panic on absurd durations: it saturates at roughly thirty years from now.
fn instant_after(now: Instant, duration: Duration) -> Instant {
    const THIRTY_YEARS: Duration = Duration::from_secs(30 * 365 * 24 * 3600);
    now.checked_add(duration.min(THIRTY_YEARS)).unwrap_or(now)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINUTE: Duration = Duration::from_secs(60);

    fn account() -> Account {
        Account::new(PrivateCounter { max: 3, decay_per_second: 1.0 }, 3, MINUTE)
    }

    #[test]
    fn lockout_starts_after_the_configured_run_of_invalid_keys() {
        let mut account = account();
        let now = Instant::now();
        for _ in 0..3 {
            assert_eq!(account.check_key(now, false), Err(INVALID_KEY));
        }
        assert_eq!(account.check_key(now, true), Err(TEMPORARY_LOCKOUT));
        assert_eq!(account.check_key(now + MINUTE, true), Ok(()));
    }

    #[test]
    fn a_valid_key_breaks_the_run_of_invalid_keys() {
        let mut account = account();
        let now = Instant::now();
        assert_eq!(account.check_key(now, false), Err(INVALID_KEY));
        assert_eq!(account.check_key(now, false), Err(INVALID_KEY));
        assert_eq!(account.check_key(now, true), Ok(()));
        assert_eq!(account.check_key(now, false), Err(INVALID_KEY));
        assert_eq!(account.check_key(now, true), Ok(()));
    }

    #[test]
    fn a_bad_key_during_lockout_restarts_the_timer_but_a_good_key_does_not() {
        let mut account = account();
        let start = Instant::now();
        for _ in 0..3 {
            let _ = account.check_key(start, false);
        }
        let half_way = start + MINUTE / 2;
        assert_eq!(account.check_key(half_way, true), Err(TEMPORARY_LOCKOUT));
        assert_eq!(account.check_key(half_way, false), Err(TEMPORARY_LOCKOUT));
        // The original lockout would have ended here; the retry with a bad key pushed it to half_way + 1 min.
        assert_eq!(account.check_key(start + MINUTE, true), Err(TEMPORARY_LOCKOUT));
        assert_eq!(account.check_key(half_way + MINUTE, true), Ok(()));
    }

    #[test]
    fn lockout_after_zero_never_locks_out() {
        let mut account = Account::new(PrivateCounter::STARTER, 0, MINUTE);
        let now = Instant::now();
        for _ in 0..50 {
            assert_eq!(account.check_key(now, false), Err(INVALID_KEY));
        }
        assert_eq!(account.check_key(now, true), Ok(()));
    }

    #[test]
    fn nonces_must_strictly_increase() {
        let mut account = account();
        assert_eq!(account.accept_nonce(10), Ok(()));
        assert_eq!(account.accept_nonce(10), Err(INVALID_NONCE));
        assert_eq!(account.accept_nonce(9), Err(INVALID_NONCE));
        assert_eq!(account.accept_nonce(11), Ok(()));
    }

    #[test]
    fn private_counter_allows_max_calls_then_decays() {
        let mut account = account();
        let now = Instant::now();
        for _ in 0..3 {
            assert_eq!(account.charge_call(now), Ok(()));
        }
        assert_eq!(account.charge_call(now), Err(RATE_LIMIT_EXCEEDED));
        // A refused call is not charged: one second of decay frees exactly one call.
        assert_eq!(account.charge_call(now + Duration::from_secs(1)), Ok(()));
        assert_eq!(account.charge_call(now + Duration::from_secs(1)), Err(RATE_LIMIT_EXCEEDED));
        assert_eq!(account.charge_call(now + Duration::from_secs(10)), Ok(()));
    }

    #[test]
    fn token_bucket_spends_its_burst_then_refills_over_time() {
        let limit = PublicRateLimit { burst: 2, refill_per_second: 0.5 };
        let now = Instant::now();
        let mut bucket = TokenBucket::full(now, limit);
        assert!(bucket.try_take(now, limit));
        assert!(bucket.try_take(now, limit));
        assert!(!bucket.try_take(now, limit));
        assert!(!bucket.try_take(now + Duration::from_secs(1), limit));
        assert!(bucket.try_take(now + Duration::from_secs(2), limit));
        // Refill never exceeds the burst.
        let later = now + Duration::from_secs(3600);
        assert!(bucket.try_take(later, limit));
        assert!(bucket.try_take(later, limit));
        assert!(!bucket.try_take(later, limit));
    }
}
