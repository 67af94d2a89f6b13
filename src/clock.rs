//! Time helpers every layer uses, so none of them reaches up for one: deadlines that cannot overflow, sleeping until
//! an optional deadline, and durations serialized as people write them (`30s`, `5m`).
//!
//! `instant + duration` panics ("overflow when adding duration to instant") when the sum leaves the clock's range, so
//! every deadline built from a setting or a computed wait goes through [`after`]. Configuration bounds every duration
//! key (`config::duration_limit`); this is the second line, for computed waits (backoff, a period stretched by the
//! rate factor) and for callers that bypass `config`. A leaf: it imports nothing of exwatch.

use std::time::Duration;

use tokio::time::Instant;

/// The furthest ahead a deadline goes: about 30 years, as tokio's own far future. Waiting that long is waiting
/// forever, and it stays far from the clock's limit, so a later `+ small` cannot overflow either.
pub const FAR_FUTURE: Duration = Duration::from_secs(86_400 * 365 * 30);

/// `now + wait`, capped at [`FAR_FUTURE`] ahead of `now`.
pub fn after(now: Instant, wait: Duration) -> Instant {
    now.checked_add(wait.min(FAR_FUTURE)).unwrap_or(now)
}

/// Sleeps until `deadline`, or forever without one (a `select!` arm that is off until there is a deadline).
pub async fn sleep_until_some(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Serializes a duration as humantime text (`1m 30s`), for `serialize_with`: the effective configuration and the
/// admin API show durations as they are written in the TOML file.
pub fn human_duration<S: serde::Serializer>(duration: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&humantime::format_duration(*duration).to_string())
}

/// [`human_duration`] for an optional duration; `None` stays null.
pub fn optional_human_duration<S: serde::Serializer>(
    duration: &Option<Duration>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match duration {
        Some(duration) => human_duration(duration, serializer),
        None => serializer.serialize_none(),
    }
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
