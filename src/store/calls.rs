//! `api_call_logs`: the batched insert behind [`Sink`], the runbook's query, the calls of an incident's window, and
//! retention. Every statement on this table is here, once for both backends.
//!
//! The columns are listed once, in `call_columns!`: the insert binds them in that order and every query selects
//! them, decoded by [`CallRecord`]'s `FromRow`. A new column is a migration pair, a field of [`CallRecord`], and a
//! name in `call_columns!` with its bind in `Database::insert_calls`.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::QueryBuilder;
use tokio_util::sync::CancellationToken;

use super::database::{Database, Error, Id, Time, before, execute, fetch, is_unavailable, on_either};
use super::{CallRecord, Sink, WriteError, text};

/// The columns of `api_call_logs` exwatch writes and reads, in the order `Database::insert_calls` binds them.
macro_rules! call_columns {
    () => {
        "id, provider, endpoint, success, response_time, error_message, created_at, http_status, error_class, \
         exchange_error, instance"
    };
}

/// Bind parameters per row: the names in `call_columns!`.
const CALL_COLUMNS: usize = column_count(call_columns!());

const INSERT_CALLS: &str = concat!("INSERT INTO api_call_logs (", call_columns!(), ") ");
const RECENT_CALLS: &str = concat!(
    "SELECT ",
    call_columns!(),
    " FROM api_call_logs WHERE provider = $1 AND created_at > $2 ORDER BY created_at DESC LIMIT $3"
);
const RECENT_FAILURES: &str = concat!(
    "SELECT ",
    call_columns!(),
    " FROM api_call_logs WHERE provider = $1 AND created_at > $2 AND NOT success ORDER BY created_at DESC LIMIT $3"
);
const CALLS_BETWEEN: &str = concat!(
    "SELECT ",
    call_columns!(),
    " FROM api_call_logs WHERE provider = $1 AND created_at >= $2 AND created_at <= $3 ORDER BY created_at, id"
);
const DELETE_OLDER_THAN: &str =
    "DELETE FROM api_call_logs WHERE id IN (SELECT id FROM api_call_logs WHERE created_at < $1 LIMIT $2)";

/// Rows deleted per statement by [`run_retention`]: small, so no statement holds locks for long.
pub const RETENTION_BATCH: u32 = 1000;
/// The first retention pass runs this long after start (or after one interval, if shorter).
const RETENTION_FIRST_RUN: Duration = Duration::from_secs(60);

/// How many names a comma-separated column list holds.
const fn column_count(columns: &str) -> usize {
    let bytes = columns.as_bytes();
    let mut count = 1;
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b',' {
            count += 1;
        }
        index += 1;
    }
    count
}

impl Database {
    /// The runbook's investigation query: `provider`'s calls newer than `since` ago (by the database's clock),
    /// newest first, at most `limit`; only failures when `failures_only`.
    pub async fn recent_calls(
        &self,
        provider: &str,
        since: Duration,
        limit: u32,
        failures_only: bool,
    ) -> Result<Vec<CallRecord>, Error> {
        let cutoff = before(self.now().await?, since);
        let sql = if failures_only { RECENT_FAILURES } else { RECENT_CALLS };
        fetch!(self, fetch_all, CallRecord, sql, provider, Time(cutoff), i64::from(limit))
    }

    /// `provider`'s calls with `start <= created_at <= end`, oldest first.
    pub(crate) async fn calls_between(
        &self,
        provider: &str,
        start: DateTime<Utc>,
        end: DateTime<Utc>,
    ) -> Result<Vec<CallRecord>, Error> {
        fetch!(self, fetch_all, CallRecord, CALLS_BETWEEN, provider, Time(start), Time(end))
    }

    /// Deletes `api_call_logs` rows older than `cutoff`, `batch` rows per statement, until a statement deletes
    /// fewer than `batch`. Returns how many rows were deleted. Each statement commits on its own, so stopping
    /// between two (or during one) loses nothing but progress.
    pub async fn delete_older_than(&self, cutoff: DateTime<Utc>, batch: u32) -> Result<u64, Error> {
        let batch = batch.max(1);
        let mut total = 0;
        loop {
            let deleted = execute!(self, DELETE_OLDER_THAN, Time(cutoff), i64::from(batch))?;
            total += deleted;
            if deleted < u64::from(batch) {
                return Ok(total);
            }
        }
    }

    /// Inserts `rows` in one multi-row statement, or in several within one transaction when they need more bind
    /// parameters than one statement may carry, so the batch stays atomic. Rows whose id exists are skipped.
    async fn insert_calls(&self, rows: &[CallRecord]) -> Result<(), sqlx::Error> {
        let chunk_rows = self.rows_per_statement(CALL_COLUMNS);
        on_either!(self, |pool| {
            let statement = |chunk: &[CallRecord]| {
                let mut builder = QueryBuilder::new(INSERT_CALLS);
                // In the order of `call_columns!`; every text through `store::text`.
                builder.push_values(chunk, |mut row, record| {
                    row.push_bind(Id(record.id))
                        .push_bind(text(&record.provider))
                        .push_bind(text(&record.endpoint))
                        .push_bind(record.success)
                        .push_bind(clamp_milliseconds(record.response_time))
                        .push_bind(record.error_message.as_deref().map(text))
                        .push_bind(Time(record.created_at))
                        .push_bind(record.http_status)
                        .push_bind(record.error_class.as_deref().map(text))
                        .push_bind(record.exchange_error.as_deref().map(text))
                        .push_bind(text(&record.instance));
                });
                builder.push(" ON CONFLICT (id) DO NOTHING");
                builder
            };
            // Not kept prepared (`persistent(false)`): the text differs with the number of rows, so each batch size
            // would stay in sqlx's per-connection statement cache with its parameter types, growing memory for nothing.
            if rows.len() <= chunk_rows {
                statement(rows).build().persistent(false).execute(pool).await.map(drop)
            } else {
                let mut transaction = pool.begin().await?;
                for chunk in rows.chunks(chunk_rows) {
                    statement(chunk).build().persistent(false).execute(&mut *transaction).await?;
                }
                transaction.commit().await
            }
        })
    }
}

#[async_trait::async_trait]
impl Sink for Database {
    async fn insert_batch(&self, rows: &[CallRecord]) -> Result<(), WriteError> {
        if rows.is_empty() {
            return Ok(());
        }
        self.insert_calls(rows).await.map_err(|error| {
            if is_unavailable(&error) {
                WriteError::Unavailable(error.to_string())
            } else {
                WriteError::Rejected(error.to_string())
            }
        })
    }
}

/// `response_time` is an `integer` column on both backends; 2^31 ms is 24 days, far beyond any timeout.
fn clamp_milliseconds(milliseconds: i64) -> i32 {
    i32::try_from(milliseconds.max(0)).unwrap_or(i32::MAX)
}

/// Deletes rows older than `retention` every `interval` (the first pass shortly after start) until `cancel`,
/// logging how many rows each pass deleted. A failed pass is logged and retried at the next interval.
pub async fn run_retention(database: Database, retention: Duration, interval: Duration, cancel: CancellationToken) {
    let mut next = tokio::time::Instant::now() + interval.min(RETENTION_FIRST_RUN);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep_until(next) => {}
        }
        let cutoff = before(Utc::now(), retention);
        // Cancelling mid-pass is safe: every batch is its own committed statement.
        tokio::select! {
            _ = cancel.cancelled() => return,
            result = database.delete_older_than(cutoff, RETENTION_BATCH) => match result {
                Ok(deleted) => tracing::info!(deleted, cutoff = %cutoff, "Retention pass deleted old call logs."),
                Err(error) => tracing::warn!(error = %error, "Retention pass failed; retrying at the next interval."),
            },
        }
        // The journal's events age with the calls they explain.
        tokio::select! {
            _ = cancel.cancelled() => return,
            result = database.events_prune(cutoff) => if let Err(error) = result {
                tracing::warn!(error = %error, "Retention of journal events failed; retrying at the next interval.");
            },
        }
        next = crate::clock::after(tokio::time::Instant::now(), interval);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_column_list_counts_its_names() {
        assert_eq!(column_count("id"), 1);
        assert_eq!(column_count("id, provider,\n created_at"), 3);
    }

    #[test]
    fn response_times_beyond_an_integer_are_clamped() {
        assert_eq!(clamp_milliseconds(1234), 1234);
        assert_eq!(clamp_milliseconds(-5), 0);
        assert_eq!(clamp_milliseconds(i64::MAX), i32::MAX);
    }
}
