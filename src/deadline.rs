//! Deadlines that cannot overflow: `instant + duration` panics ("overflow when adding duration to instant") when the
//! sum leaves the clock's range, so every deadline built from a setting or a computed wait goes through [`after`].
//!
//! It owns nothing else: configuration bounds every duration key (`config::duration_limit`), and this is the second
//! line, for computed waits (backoff, a period stretched by the rate factor) and for callers that bypass `config`.

use std::time::Duration;

use tokio::time::Instant;

/// The furthest ahead a deadline goes: about 30 years, as tokio's own far future. Waiting that long is waiting
/// forever, and it stays far from the clock's limit, so a later `+ small` cannot overflow either.
pub const FAR_FUTURE: Duration = Duration::from_secs(86_400 * 365 * 30);

/// `now + wait`, capped at [`FAR_FUTURE`] ahead of `now`.
pub fn after(now: Instant, wait: Duration) -> Instant {
    now.checked_add(wait.min(FAR_FUTURE)).unwrap_or(now)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn deadlines_saturate_instead_of_overflowing() {
        let now = Instant::now();
        assert_eq!(after(now, Duration::from_secs(5)), now + Duration::from_secs(5));
        // humantime accepts durations up to u64::MAX seconds; `now + that` panics.
        let never = after(now, Duration::MAX);
        assert_eq!(never, now + FAR_FUTURE);
        assert!(after(never, Duration::MAX) > never, "a far deadline can still be moved further");
    }
}
