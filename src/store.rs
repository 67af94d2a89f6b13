//! Storage: the only place with SQL. `api_call_logs` (every call, the runbook's columns and names), `incidents`
//! and the alert side's `alert_outbox` and `alert_state`, in Postgres when `database.url` is set and in an embedded
//! SQLite file otherwise, with the same behaviour.
//!
//! The poll loop never waits on the database: it hands each [`CallRecord`] to the [`writer`], which batches rows
//! into multi-row inserts, keeps them in memory during an outage and then in an on-disk [`spool`], and writes them
//! in order, exactly once (each row has a unique id; replays are idempotent). [`Database`] connects to either
//! backend; each table's statements live in one file ([`calls`], [`incidents`], [`alert_state`]), each written
//! once for both backends (see [`database`] for how).
//!
//! The queries are checked by running them, not by `sqlx::query!`: its compile-time check binds a query to one
//! database driver (the `DATABASE_URL` it was prepared against), and SQLite stores ids and times as text, so each
//! statement would need a second, per-backend text and its offline data again. Instead every statement runs on both
//! backends in the store's integration tests (`tests/it/store.rs`, one body per test for Postgres and SQLite).

use std::path::PathBuf;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::clock::human_duration;
use crate::exchange::{Endpoint, Outcome};
use crate::secret::Secret;

pub mod alert_state;
pub mod alerts;
pub mod calls;
pub mod connector;
pub mod database;
pub mod events;
pub mod incidents;
pub mod replay;
pub mod report;
pub mod spool;
pub mod writer;

pub use database::Database;
pub use incidents::{Incident, IncidentReport};

/// The `[database]` section: where rows go, how long they stay, and how the writer batches and spools them.
/// `config.rs` reads and validates it; [`Config::default`] is what an empty section gives.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Config {
    /// A `postgres://` or `postgresql://` URL; unset means the SQLite file at `sqlite_path`.
    pub url: Option<Secret>,
    /// The SQLite file used when `url` is unset, created if missing (relative to the working directory).
    pub sqlite_path: PathBuf,
    /// Rows in `api_call_logs` older than this are deleted.
    #[serde(serialize_with = "human_duration")]
    pub retention: Duration,
    /// Time between two retention passes (the first runs shortly after start).
    #[serde(serialize_with = "human_duration")]
    pub retention_interval: Duration,
    /// The writer's batching and spool limits, keys of the same `[database]` section.
    #[serde(flatten)]
    pub writer: writer::Config,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            url: None,
            sqlite_path: PathBuf::from("exwatch.sqlite"),
            retention: Duration::from_secs(30 * 24 * 3600),
            retention_interval: Duration::from_secs(3600),
            writer: writer::Config::default(),
        }
    }
}

/// One exchange call as logged: the runbook's columns (`provider`, `endpoint`, `success`, `response_time` in
/// milliseconds, `error_message`, `created_at`) plus the evidence on-call needs. One row of `api_call_logs`, read
/// back through `FromRow` by column name on both backends ([`calls`] lists the columns and binds them).
///
/// It is also the spool's line format, which outlives a process: unknown fields are ignored and every field but
/// those of the first format (`id`, `provider`, `endpoint`, `success`, `response_time`, `created_at`) defaults
/// when missing, so spool files written by an older or newer version still read. A new field takes
/// `#[serde(default)]` (a test in `spool` removes every other field in turn) and its default in [`CallRecord::new`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, sqlx::FromRow)]
pub struct CallRecord {
    /// Unique per call, time-ordered (UUIDv7); the key that makes replays idempotent.
    #[sqlx(try_from = "database::Id")]
    pub id: Uuid,
    /// The exchange's configured name (`kraken`).
    pub provider: String,
    /// Kraken's method name (`Ticker`, `SystemStatus`, `Balance`, `Depth`).
    pub endpoint: String,
    pub success: bool,
    /// Milliseconds from sending to the last byte (0 for calls the breaker refused); an `integer` column.
    #[sqlx(try_from = "i32")]
    pub response_time: i64,
    #[serde(default)]
    pub error_message: Option<String>,
    #[serde(default)]
    pub http_status: Option<i32>,
    /// The taxonomy's class, or `not_permitted` for a call the breaker refused.
    #[serde(default)]
    pub error_class: Option<String>,
    /// The exchange's own error strings, comma-separated, as sent.
    #[serde(default)]
    pub exchange_error: Option<String>,
    /// Which replica wrote the row (its host name).
    #[serde(default)]
    pub instance: String,
    #[sqlx(try_from = "database::Time")]
    pub created_at: DateTime<Utc>,
}

/// Why a batch was not written. The writer retries `Unavailable` (the row stays buffered or spooled) and sets
/// `Rejected` rows aside, since retrying them can never succeed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WriteError {
    /// The database cannot be reached or did not answer in time: retry later.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// The database refused these rows (a constraint or type error): retrying cannot help.
    #[error("database rejected the rows: {0}")]
    Rejected(String),
}

impl WriteError {
    /// The `kind` label of the write-error metric.
    pub fn kind(&self) -> &'static str {
        match self {
            WriteError::Unavailable(_) => "unavailable",
            WriteError::Rejected(_) => "rejected",
        }
    }
}

/// Where the writer puts batches: the database in production, a fake in tests.
#[async_trait::async_trait]
pub trait Sink: Send + Sync + 'static {
    /// Inserts the rows in one statement (or transaction). Rows whose id already exists are skipped, so a batch
    /// written twice (a timeout after a commit) is still written once.
    async fn insert_batch(&self, rows: &[CallRecord]) -> Result<(), WriteError>;
}

impl CallRecord {
    /// A call of `endpoint` finished at `at` that succeeded at once, with a fresh id and every optional column
    /// empty: the base the other constructors (and tests) fill in, so a new column has its default here only.
    pub fn new(provider: &str, instance: &str, endpoint: &str, at: DateTime<Utc>) -> CallRecord {
        CallRecord {
            id: Uuid::now_v7(),
            provider: provider.to_owned(),
            endpoint: endpoint.to_owned(),
            success: true,
            response_time: 0,
            error_message: None,
            http_status: None,
            error_class: None,
            exchange_error: None,
            instance: instance.to_owned(),
            created_at: at,
        }
    }

    /// The row of one call that was sent. `finished_at` is the wall-clock time the answer (or failure) came.
    pub fn from_outcome(
        provider: &str,
        instance: &str,
        outcome: &Outcome<()>,
        finished_at: DateTime<Utc>,
    ) -> CallRecord {
        let (success, error_message, http_status, error_class, exchange_error) = match &outcome.result {
            Ok(()) => (true, None, None, None, None),
            Err(error) => (
                false,
                Some(error.message.clone()),
                error.http_status.map(i32::from),
                Some(error.class.as_str().to_owned()),
                (!error.exchange_errors.is_empty()).then(|| error.exchange_errors.join(", ")),
            ),
        };
        CallRecord {
            success,
            response_time: i64::try_from(outcome.latency.as_millis()).unwrap_or(i64::MAX),
            error_message,
            http_status,
            error_class,
            exchange_error,
            ..CallRecord::new(provider, instance, outcome.endpoint.as_str(), finished_at)
        }
    }

    /// The row of a call the breaker refused: never sent, so not an exchange failure, but on record.
    pub fn not_permitted(
        provider: &str,
        instance: &str,
        endpoint: Endpoint,
        state: &str,
        at: DateTime<Utc>,
    ) -> CallRecord {
        CallRecord {
            success: false,
            error_message: Some(format!("not sent: circuit breaker {state}")),
            error_class: Some(NOT_PERMITTED.to_owned()),
            ..CallRecord::new(provider, instance, endpoint.as_str(), at)
        }
    }

    /// Its size in memory, estimated: the struct and its strings. Exact enough to bound the writer's memory,
    /// cheap enough for every push. Every field is named, so a new one cannot be left out by mistake.
    pub fn memory_bytes(&self) -> u64 {
        let CallRecord {
            id: _,
            provider,
            endpoint,
            success: _,
            response_time: _,
            error_message,
            http_status: _,
            error_class,
            exchange_error,
            instance,
            created_at: _,
        } = self;
        let optional = |text: &Option<String>| text.as_ref().map_or(0, String::len);
        (std::mem::size_of::<CallRecord>()
            + provider.len()
            + endpoint.len()
            + instance.len()
            + optional(error_message)
            + optional(error_class)
            + optional(exchange_error)) as u64
    }
}

/// Text as every statement binds it, on either backend: NUL and the other control characters replaced (Postgres
/// `text` cannot hold NUL, and a row refused for it would be refused on every retry), so both backends keep the
/// same value. Every text column goes through here.
pub(crate) fn text(value: &str) -> String {
    crate::text::printable(value).into_owned()
}

/// The `error_class` of a call the breaker refused.
pub const NOT_PERMITTED: &str = "not_permitted";

/// A sink that keeps rows in memory: for tests on a paused clock, where a database's I/O would let time jump.
#[cfg(any(test, feature = "test-util"))]
#[derive(Debug, Default)]
pub struct MemorySink {
    rows: std::sync::Mutex<Vec<CallRecord>>,
}

#[cfg(any(test, feature = "test-util"))]
impl MemorySink {
    pub fn rows(&self) -> Vec<CallRecord> {
        self.rows.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }
}

#[cfg(any(test, feature = "test-util"))]
#[async_trait::async_trait]
impl Sink for MemorySink {
    async fn insert_batch(&self, rows: &[CallRecord]) -> Result<(), WriteError> {
        let mut stored = self.rows.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        for row in rows {
            if !stored.iter().any(|existing| existing.id == row.id) {
                stored.push(row.clone());
            }
        }
        Ok(())
    }
}
