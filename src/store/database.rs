//! The SQL: connecting (Postgres when `database.url` is set, otherwise a SQLite file), the embedded migrations,
//! the batched insert behind [`Sink`], the runbook's query, incidents and their reports, and retention.
//!
//! Both backends have the same schema and the same behaviour; only the column types differ (SQLite keeps ids and
//! times as text, see `migrations/sqlite/0001_api_call_logs.sql`). This module does no buffering or retrying: the
//! [`writer`](super::writer) owns that, and uses [`WriteError`]'s two kinds to decide.
//!
//! Migrations run at connect. On Postgres, sqlx's migrator holds `pg_advisory_lock` (keyed on the database name)
//! from before it creates `_sqlx_migrations` until it has applied every pending migration (sqlx-core 0.9.0
//! `migrate/migrator.rs` `run_direct`, sqlx-postgres 0.9.0 `migrate.rs` `lock`), so two replicas starting together
//! apply each migration once. SQLite serialises writers itself.

use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, NaiveDateTime, TimeDelta, Utc};
use serde::Serialize;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions, PgRow, Postgres};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::{Connection as _, QueryBuilder, Row, Sqlite};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{CallRecord, Config, Sink, WriteError, text};
use crate::secret::Secret;

static POSTGRES_MIGRATIONS: Migrator = sqlx::migrate!("./migrations/postgres");
static SQLITE_MIGRATIONS: Migrator = sqlx::migrate!("./migrations/sqlite");

/// Small on purpose: one writer, a retention pass and a CLI query at most.
const MAX_CONNECTIONS: u32 = 4;
/// How long a caller waits for a connection; during an outage inserts fail after this, not after TCP's minutes.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a SQLite writer waits for another writer's lock before failing with `SQLITE_BUSY`.
const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Bind parameters per `api_call_logs` row.
const CALL_COLUMNS: usize = 11;
/// The most bind parameters one statement may carry: Postgres counts them in a u16, SQLite's default
/// `SQLITE_MAX_VARIABLE_NUMBER` is 32766.
const POSTGRES_MAX_BINDS: usize = 65_535;
const SQLITE_MAX_BINDS: usize = 32_766;

/// Rows deleted per statement by [`run_retention`]: small, so no statement holds locks for long.
pub const RETENTION_BATCH: u32 = 1000;
/// The first retention pass runs this long after start (or after one interval, if shorter).
const RETENTION_FIRST_RUN: Duration = Duration::from_secs(60);

const INSERT_CALLS: &str = "INSERT INTO api_call_logs \
    (id, provider, endpoint, success, response_time, error_message, created_at, http_status, error_class, \
    exchange_error, instance) ";

/// Why a database operation failed. Messages name the database by host, port and name (or file) only: the URL is
/// a [`Secret`] and its password never reaches a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// No connection could be opened.
    #[error("cannot connect to the database at {target}: {reason}")]
    Connect { target: String, reason: String },
    /// Connected, but the migrations did not apply.
    #[error("cannot migrate the database at {target}: {reason}")]
    Migrate { target: String, reason: String },
    /// A read-only command found no SQLite file where the configuration points: it never creates one.
    #[error("no SQLite database at {path}: `database.sqlite_path` names a file that does not exist")]
    Missing { path: String },
    /// A read-only command found a database older than this binary: it never migrates one.
    #[error(
        "the database at {target} is at schema version {found}, this exwatch reads version {needed}; run `exwatch migrate` first"
    )]
    Outdated { target: String, found: i64, needed: i64 },
    /// The database stopped answering (connection lost, pool timed out): retry later.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// The database answered with an error.
    #[error("database query failed: {0}")]
    Query(String),
}

/// A pool on one of the two backends. Cloning is cheap (the pools are shared).
#[derive(Clone)]
pub enum Database {
    Postgres(PgPool),
    Sqlite(SqlitePool),
}

impl fmt::Debug for Database {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the connect options: they hold the password.
        write!(formatter, "Database({})", self.target())
    }
}

/// One row of `incidents`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Incident {
    pub id: i64,
    pub provider: String,
    pub alertname: String,
    /// The runbook scenario diagnosed, kept current while the incident is open (`alert::diagnosis::Scenario`).
    pub scenario: String,
    pub started_at: DateTime<Utc>,
    /// `None` while the incident is open.
    pub resolved_at: Option<DateTime<Utc>>,
    pub first_error: Option<String>,
    pub last_error: Option<String>,
    pub failed_calls: i64,
    pub total_calls: i64,
}

/// What happened during an incident, computed from `api_call_logs` between its start (the first failure of the
/// streak that caused it) and its end (or now).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct IncidentReport {
    pub incident: Incident,
    /// `resolved_at`, or the time of the report for an open incident.
    pub window_end: DateTime<Utc>,
    /// Calls sent, and how many of them failed. Calls the breaker refused were never sent: they are counted in
    /// `not_sent_calls` only, as the incident row counts them.
    pub total_calls: u64,
    pub failed_calls: u64,
    pub not_sent_calls: u64,
    /// Failed calls per `error_class` (`unclassified` when none was recorded), most first.
    pub failures_by_class: Vec<Count>,
    /// Failed calls per endpoint, most first.
    pub failures_by_endpoint: Vec<Count>,
    /// Over every call sent in the window, failed or not; `None` when none was sent.
    pub response_time: Option<Latency>,
    pub first_error: Option<ErrorSample>,
    pub last_error: Option<ErrorSample>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Count {
    pub name: String,
    pub calls: u64,
}

/// Response-time percentiles in milliseconds (nearest rank).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Latency {
    pub p50: i64,
    pub p95: i64,
    pub max: i64,
}

/// One failed call, as the report shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ErrorSample {
    pub created_at: DateTime<Utc>,
    pub endpoint: String,
    pub error_class: Option<String>,
    pub error_message: Option<String>,
}

impl Database {
    /// Opens the pool (Postgres when `config.url` is set, otherwise the SQLite file at `config.sqlite_path`,
    /// created if missing) and applies pending migrations.
    pub async fn connect(config: &Config) -> Result<Database, Error> {
        let database = match &config.url {
            Some(url) => Database::connect_postgres(url).await?,
            None => Database::connect_sqlite(&config.sqlite_path).await?,
        };
        database.migrate().await?;
        Ok(database)
    }

    /// Opens the configured database for reading only (`exwatch logs`, `incidents`): never creates the SQLite file
    /// and never migrates; a missing file or an older schema is an error that says what to do.
    pub async fn open_existing(config: &Config) -> Result<Database, Error> {
        let database = match &config.url {
            Some(url) => Database::connect_postgres(url).await?,
            None => {
                if !config.sqlite_path.is_file() {
                    return Err(Error::Missing { path: config.sqlite_path.display().to_string() });
                }
                Database::open_sqlite(&config.sqlite_path, false).await?
            }
        };
        let found = database.applied_version().await?;
        let needed = database.schema_version();
        if found < needed {
            let target = database.target();
            database.close().await;
            return Err(Error::Outdated { target, found, needed });
        }
        Ok(database)
    }

    /// The newest migration applied to this database (0 for a database exwatch never migrated).
    async fn applied_version(&self) -> Result<i64, Error> {
        const APPLIED: &str = "SELECT version FROM _sqlx_migrations WHERE success ORDER BY version DESC LIMIT 1";
        let version: Result<Option<i64>, sqlx::Error> = match self {
            Database::Postgres(pool) => sqlx::query_scalar(APPLIED).fetch_optional(pool).await,
            Database::Sqlite(pool) => sqlx::query_scalar(APPLIED).fetch_optional(pool).await,
        };
        match version {
            Ok(version) => Ok(version.unwrap_or(0)),
            // No migrations table at all: a database exwatch never touched.
            Err(sqlx::Error::Database(_)) => Ok(0),
            Err(error) => Err(Error::Query(error.to_string())),
        }
    }

    async fn connect_postgres(url: &Secret) -> Result<Database, Error> {
        // url's parse errors are fixed phrases ("invalid port number"), never the input.
        let parsed = url::Url::parse(url.expose()).map_err(|error| Error::Connect {
            target: "`database.url`".to_owned(),
            reason: format!("invalid URL ({error})"),
        })?;
        let redact = |text: String| redact_password(text, url, &parsed);
        let options = PgConnectOptions::from_str(url.expose()).map_err(|error| Error::Connect {
            target: "`database.url`".to_owned(),
            reason: redact(error.to_string()),
        })?;
        let target = postgres_target(&options);
        // One direct connection first: the pool would report only "pool timed out", hiding "connection refused"
        // or "password authentication failed", which is what on-call needs to read.
        let connection = tokio::time::timeout(ACQUIRE_TIMEOUT, PgConnection::connect_with(&options))
            .await
            .map_err(|_| Error::Connect {
                target: target.clone(),
                reason: format!("no answer within {}", humantime::format_duration(ACQUIRE_TIMEOUT)),
            })?
            .map_err(|error| Error::Connect { target: target.clone(), reason: redact(error.to_string()) })?;
        let _ = connection.close().await;
        let pool = PgPoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options)
            .await
            .map_err(|error| Error::Connect { target: target.clone(), reason: redact(error.to_string()) })?;
        Ok(Database::Postgres(pool))
    }

    async fn connect_sqlite(path: &Path) -> Result<Database, Error> {
        if let Some(parent) = path.parent().filter(|parent| !parent.as_os_str().is_empty()) {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(|error| Error::Connect { target: path.display().to_string(), reason: error.to_string() })?;
        }
        Database::open_sqlite(path, true).await
    }

    /// The SQLite pool; `create` makes the file when it is missing (the daemon), never for readers.
    async fn open_sqlite(path: &Path, create: bool) -> Result<Database, Error> {
        let target = path.display().to_string();
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(create)
            .journal_mode(SqliteJournalMode::Wal)
            // NORMAL is durable across application crashes in WAL mode; only a power loss can drop the last commits.
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(SQLITE_BUSY_TIMEOUT);
        let pool = SqlitePoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options)
            .await
            .map_err(|error| Error::Connect { target, reason: error.to_string() })?;
        Ok(Database::Sqlite(pool))
    }

    /// Applies the embedded migrations that have not run yet; a no-op when there are none.
    pub async fn migrate(&self) -> Result<(), Error> {
        let result = match self {
            Database::Postgres(pool) => POSTGRES_MIGRATIONS.run(pool).await,
            Database::Sqlite(pool) => SQLITE_MIGRATIONS.run(pool).await,
        };
        result.map_err(|error| Error::Migrate { target: self.target(), reason: error.to_string() })
    }

    /// The newest migration version embedded in this binary.
    pub fn schema_version(&self) -> i64 {
        let migrator = match self {
            Database::Postgres(_) => &POSTGRES_MIGRATIONS,
            Database::Sqlite(_) => &SQLITE_MIGRATIONS,
        };
        migrator.iter().map(|migration| migration.version).max().unwrap_or(0)
    }

    /// Where the data lives, for messages: `postgres host:port/name` or `sqlite path`. Never the password.
    pub fn target(&self) -> String {
        match self {
            Database::Postgres(pool) => format!("postgres {}", postgres_target(&pool.connect_options())),
            Database::Sqlite(pool) => format!("sqlite {}", pool.connect_options().get_filename().display()),
        }
    }

    /// Closes every connection; queries after this fail with [`Error::Unavailable`].
    pub async fn close(&self) {
        match self {
            Database::Postgres(pool) => pool.close().await,
            Database::Sqlite(pool) => pool.close().await,
        }
    }

    /// The runbook's investigation query: `provider`'s calls newer than `since` ago (by the database's clock),
    /// newest first, at most `limit`; only failures when `failures_only`.
    pub async fn recent_calls(
        &self,
        provider: &str,
        since: Duration,
        limit: u32,
        failures_only: bool,
    ) -> Result<Vec<CallRecord>, Error> {
        match self {
            Database::Postgres(pool) => {
                let sql = if failures_only {
                    "SELECT id, provider, endpoint, success, response_time, error_message, created_at, http_status, \
                     error_class, exchange_error, instance FROM api_call_logs \
                     WHERE provider = $1 AND created_at > NOW() - $2 AND NOT success \
                     ORDER BY created_at DESC LIMIT $3"
                } else {
                    "SELECT id, provider, endpoint, success, response_time, error_message, created_at, http_status, \
                     error_class, exchange_error, instance FROM api_call_logs \
                     WHERE provider = $1 AND created_at > NOW() - $2 \
                     ORDER BY created_at DESC LIMIT $3"
                };
                let rows = sqlx::query(sql)
                    .bind(provider)
                    .bind(since)
                    .bind(i64::from(limit))
                    .fetch_all(pool)
                    .await
                    .map_err(query_error)?;
                rows.iter().map(postgres_call).collect()
            }
            Database::Sqlite(pool) => {
                let sql = if failures_only {
                    "SELECT id, provider, endpoint, success, response_time, error_message, created_at, http_status, \
                     error_class, exchange_error, instance FROM api_call_logs \
                     WHERE provider = ?1 AND created_at > datetime('now', ?2) AND NOT success \
                     ORDER BY created_at DESC LIMIT ?3"
                } else {
                    "SELECT id, provider, endpoint, success, response_time, error_message, created_at, http_status, \
                     error_class, exchange_error, instance FROM api_call_logs \
                     WHERE provider = ?1 AND created_at > datetime('now', ?2) \
                     ORDER BY created_at DESC LIMIT ?3"
                };
                let rows = sqlx::query(sql)
                    .bind(provider)
                    .bind(format!("-{:.6} seconds", since.as_secs_f64()))
                    .bind(i64::from(limit))
                    .fetch_all(pool)
                    .await
                    .map_err(query_error)?;
                rows.iter().map(sqlite_call).collect()
            }
        }
    }

    /// Opens an incident for `provider` and `alertname`, or returns the one already open (a second replica or a
    /// repeated alert does not open another: a partial unique index allows one open incident per pair).
    pub async fn open_incident(
        &self,
        provider: &str,
        alertname: &str,
        scenario: &str,
        started_at: DateTime<Utc>,
        first_error: Option<&str>,
    ) -> Result<i64, Error> {
        // The open incident may be resolved between our conflicting insert and the select; then insert again.
        for _ in 0..3 {
            let id: Option<i64> = match self {
                Database::Postgres(pool) => {
                    let inserted = sqlx::query_scalar(
                        "INSERT INTO incidents (provider, alertname, scenario, started_at, first_error, last_error) \
                         VALUES ($1, $2, $3, $4, $5, $5) \
                         ON CONFLICT (provider, alertname) WHERE resolved_at IS NULL DO NOTHING RETURNING id",
                    )
                    .bind(text(provider))
                    .bind(text(alertname))
                    .bind(text(scenario))
                    .bind(started_at)
                    .bind(first_error.map(text))
                    .fetch_optional(pool)
                    .await
                    .map_err(query_error)?;
                    match inserted {
                        Some(id) => Some(id),
                        None => sqlx::query_scalar(
                            "SELECT id FROM incidents WHERE provider = $1 AND alertname = $2 AND resolved_at IS NULL",
                        )
                        .bind(text(provider))
                        .bind(text(alertname))
                        .fetch_optional(pool)
                        .await
                        .map_err(query_error)?,
                    }
                }
                Database::Sqlite(pool) => {
                    let inserted = sqlx::query_scalar(
                        "INSERT INTO incidents (provider, alertname, scenario, started_at, first_error, last_error) \
                         VALUES (?1, ?2, ?3, ?4, ?5, ?5) \
                         ON CONFLICT (provider, alertname) WHERE resolved_at IS NULL DO NOTHING RETURNING id",
                    )
                    .bind(text(provider))
                    .bind(text(alertname))
                    .bind(text(scenario))
                    .bind(sqlite_time(started_at))
                    .bind(first_error.map(text))
                    .fetch_optional(pool)
                    .await
                    .map_err(query_error)?;
                    match inserted {
                        Some(id) => Some(id),
                        None => sqlx::query_scalar(
                            "SELECT id FROM incidents WHERE provider = ?1 AND alertname = ?2 AND resolved_at IS NULL",
                        )
                        .bind(text(provider))
                        .bind(text(alertname))
                        .fetch_optional(pool)
                        .await
                        .map_err(query_error)?,
                    }
                }
            };
            if let Some(id) = id {
                return Ok(id);
            }
        }
        Err(Error::Query(format!("cannot open an incident for {provider}/{alertname}: it kept being resolved")))
    }

    /// Records progress on an incident: the current scenario, the latest error (also the first one if none was
    /// recorded yet) and more calls counted. Returns whether the incident exists.
    pub async fn update_incident(
        &self,
        id: i64,
        scenario: &str,
        last_error: Option<&str>,
        failed_calls_delta: i64,
        total_calls_delta: i64,
    ) -> Result<bool, Error> {
        let result = match self {
            Database::Postgres(pool) => sqlx::query(
                "UPDATE incidents SET scenario = $2, last_error = COALESCE($3, last_error), \
                 first_error = COALESCE(first_error, $3), \
                 failed_calls = failed_calls + $4, total_calls = total_calls + $5 WHERE id = $1",
            )
            .bind(id)
            .bind(text(scenario))
            .bind(last_error.map(text))
            .bind(failed_calls_delta)
            .bind(total_calls_delta)
            .execute(pool)
            .await
            .map(|done| done.rows_affected()),
            Database::Sqlite(pool) => sqlx::query(
                "UPDATE incidents SET scenario = ?2, last_error = COALESCE(?3, last_error), \
                 first_error = COALESCE(first_error, ?3), \
                 failed_calls = failed_calls + ?4, total_calls = total_calls + ?5 WHERE id = ?1",
            )
            .bind(id)
            .bind(text(scenario))
            .bind(last_error.map(text))
            .bind(failed_calls_delta)
            .bind(total_calls_delta)
            .execute(pool)
            .await
            .map(|done| done.rows_affected()),
        };
        Ok(result.map_err(query_error)? == 1)
    }

    /// Marks an open incident resolved. Returns `false` when there is no such open incident (already resolved).
    pub async fn resolve_incident(&self, id: i64, resolved_at: DateTime<Utc>) -> Result<bool, Error> {
        let result = match self {
            Database::Postgres(pool) => {
                sqlx::query("UPDATE incidents SET resolved_at = $2 WHERE id = $1 AND resolved_at IS NULL")
                    .bind(id)
                    .bind(resolved_at)
                    .execute(pool)
                    .await
            }
            .map(|done| done.rows_affected()),
            Database::Sqlite(pool) => {
                sqlx::query("UPDATE incidents SET resolved_at = ?2 WHERE id = ?1 AND resolved_at IS NULL")
                    .bind(id)
                    .bind(sqlite_time(resolved_at))
                    .execute(pool)
                    .await
            }
            .map(|done| done.rows_affected()),
        };
        Ok(result.map_err(query_error)? == 1)
    }

    /// Every incident still open, newest first.
    pub async fn open_incidents(&self) -> Result<Vec<Incident>, Error> {
        match self {
            Database::Postgres(pool) => {
                let rows =
                    sqlx::query("SELECT * FROM incidents WHERE resolved_at IS NULL ORDER BY started_at DESC, id DESC")
                        .fetch_all(pool)
                        .await
                        .map_err(query_error)?;
                rows.iter().map(postgres_incident).collect()
            }
            Database::Sqlite(pool) => {
                let rows =
                    sqlx::query("SELECT * FROM incidents WHERE resolved_at IS NULL ORDER BY started_at DESC, id DESC")
                        .fetch_all(pool)
                        .await
                        .map_err(query_error)?;
                rows.iter().map(sqlite_incident).collect()
            }
        }
    }

    /// Incidents that overlap the last `since`: started in it, resolved in it, or still open. Newest first.
    pub async fn list_incidents(&self, since: Duration) -> Result<Vec<Incident>, Error> {
        let cutoff = ago(since);
        match self {
            Database::Postgres(pool) => {
                let rows = sqlx::query(
                    "SELECT * FROM incidents WHERE started_at > $1 OR resolved_at IS NULL OR resolved_at > $1 \
                     ORDER BY started_at DESC, id DESC",
                )
                .bind(cutoff)
                .fetch_all(pool)
                .await
                .map_err(query_error)?;
                rows.iter().map(postgres_incident).collect()
            }
            Database::Sqlite(pool) => {
                let rows = sqlx::query(
                    "SELECT * FROM incidents WHERE started_at > ?1 OR resolved_at IS NULL OR resolved_at > ?1 \
                     ORDER BY started_at DESC, id DESC",
                )
                .bind(sqlite_time(cutoff))
                .fetch_all(pool)
                .await
                .map_err(query_error)?;
                rows.iter().map(sqlite_incident).collect()
            }
        }
    }

    pub async fn incident(&self, id: i64) -> Result<Option<Incident>, Error> {
        match self {
            Database::Postgres(pool) => {
                let row = sqlx::query("SELECT * FROM incidents WHERE id = $1")
                    .bind(id)
                    .fetch_optional(pool)
                    .await
                    .map_err(query_error)?;
                row.as_ref().map(postgres_incident).transpose()
            }
            Database::Sqlite(pool) => {
                let row = sqlx::query("SELECT * FROM incidents WHERE id = ?1")
                    .bind(id)
                    .fetch_optional(pool)
                    .await
                    .map_err(query_error)?;
                row.as_ref().map(sqlite_incident).transpose()
            }
        }
    }

    /// The report of incident `id` from the provider's calls between its start and its end (or now);
    /// `None` when there is no such incident.
    pub async fn incident_report(&self, id: i64) -> Result<Option<IncidentReport>, Error> {
        let Some(incident) = self.incident(id).await? else {
            return Ok(None);
        };
        let window_end = incident.resolved_at.unwrap_or_else(Utc::now);
        let calls = self.calls_between(&incident.provider, incident.started_at, window_end).await?;
        Ok(Some(IncidentReport::from_calls(incident, window_end, &calls)))
    }

    /// `provider`'s calls with `start <= created_at <= end`, oldest first.
    async fn calls_between(
        &self,
        provider: &str,
        start: DateTime<Utc>,
        end: DateTime<Utc>,
    ) -> Result<Vec<CallRecord>, Error> {
        match self {
            Database::Postgres(pool) => {
                let rows = sqlx::query(
                    "SELECT id, provider, endpoint, success, response_time, error_message, created_at, http_status, \
                     error_class, exchange_error, instance FROM api_call_logs \
                     WHERE provider = $1 AND created_at >= $2 AND created_at <= $3 ORDER BY created_at, id",
                )
                .bind(provider)
                .bind(start)
                .bind(end)
                .fetch_all(pool)
                .await
                .map_err(query_error)?;
                rows.iter().map(postgres_call).collect()
            }
            Database::Sqlite(pool) => {
                let rows = sqlx::query(
                    "SELECT id, provider, endpoint, success, response_time, error_message, created_at, http_status, \
                     error_class, exchange_error, instance FROM api_call_logs \
                     WHERE provider = ?1 AND created_at >= ?2 AND created_at <= ?3 ORDER BY created_at, id",
                )
                .bind(provider)
                .bind(sqlite_time(start))
                .bind(sqlite_time(end))
                .fetch_all(pool)
                .await
                .map_err(query_error)?;
                rows.iter().map(sqlite_call).collect()
            }
        }
    }

    /// Deletes `api_call_logs` rows older than `cutoff`, `batch` rows per statement, until a statement deletes
    /// fewer than `batch`. Returns how many rows were deleted. Each statement commits on its own, so stopping
    /// between two (or during one) loses nothing but progress.
    pub async fn delete_older_than(&self, cutoff: DateTime<Utc>, batch: u32) -> Result<u64, Error> {
        let batch = batch.max(1);
        let mut total = 0;
        loop {
            let deleted = match self {
                Database::Postgres(pool) => sqlx::query(
                    "DELETE FROM api_call_logs WHERE id IN \
                     (SELECT id FROM api_call_logs WHERE created_at < $1 LIMIT $2)",
                )
                .bind(cutoff)
                .bind(i64::from(batch))
                .execute(pool)
                .await
                .map(|done| done.rows_affected()),
                Database::Sqlite(pool) => sqlx::query(
                    "DELETE FROM api_call_logs WHERE id IN \
                     (SELECT id FROM api_call_logs WHERE created_at < ?1 LIMIT ?2)",
                )
                .bind(sqlite_time(cutoff))
                .bind(i64::from(batch))
                .execute(pool)
                .await
                .map(|done| done.rows_affected()),
            }
            .map_err(query_error)?;
            total += deleted;
            if deleted < u64::from(batch) {
                return Ok(total);
            }
        }
    }

    async fn insert_postgres(pool: &PgPool, rows: &[CallRecord]) -> Result<(), sqlx::Error> {
        let chunk_rows = POSTGRES_MAX_BINDS / CALL_COLUMNS;
        let statement = |chunk: &[CallRecord]| {
            let mut builder = QueryBuilder::<Postgres>::new(INSERT_CALLS);
            builder.push_values(chunk, |mut row, record| {
                row.push_bind(record.id)
                    .push_bind(text(&record.provider))
                    .push_bind(text(&record.endpoint))
                    .push_bind(record.success)
                    .push_bind(clamp_milliseconds(record.response_time))
                    .push_bind(record.error_message.as_deref().map(text))
                    .push_bind(record.created_at)
                    .push_bind(record.http_status)
                    .push_bind(record.error_class.as_deref().map(text))
                    .push_bind(record.exchange_error.as_deref().map(text))
                    .push_bind(text(&record.instance));
            });
            builder.push(" ON CONFLICT (id) DO NOTHING");
            builder
        };
        if rows.len() <= chunk_rows {
            statement(rows).build().execute(pool).await?;
            return Ok(());
        }
        // More rows than one statement may carry: several statements, one transaction, so the batch stays atomic.
        let mut transaction = pool.begin().await?;
        for chunk in rows.chunks(chunk_rows) {
            statement(chunk).build().execute(&mut *transaction).await?;
        }
        transaction.commit().await
    }

    async fn insert_sqlite(pool: &SqlitePool, rows: &[CallRecord]) -> Result<(), sqlx::Error> {
        let chunk_rows = SQLITE_MAX_BINDS / CALL_COLUMNS;
        let statement = |chunk: &[CallRecord]| {
            let mut builder = QueryBuilder::<Sqlite>::new(INSERT_CALLS);
            builder.push_values(chunk, |mut row, record| {
                row.push_bind(record.id.to_string())
                    .push_bind(text(&record.provider))
                    .push_bind(text(&record.endpoint))
                    .push_bind(record.success)
                    .push_bind(record.response_time)
                    .push_bind(record.error_message.as_deref().map(text))
                    .push_bind(sqlite_time(record.created_at))
                    .push_bind(record.http_status)
                    .push_bind(record.error_class.as_deref().map(text))
                    .push_bind(record.exchange_error.as_deref().map(text))
                    .push_bind(text(&record.instance));
            });
            builder.push(" ON CONFLICT (id) DO NOTHING");
            builder
        };
        if rows.len() <= chunk_rows {
            statement(rows).build().execute(pool).await?;
            return Ok(());
        }
        let mut transaction = pool.begin().await?;
        for chunk in rows.chunks(chunk_rows) {
            statement(chunk).build().execute(&mut *transaction).await?;
        }
        transaction.commit().await
    }
}

#[async_trait::async_trait]
impl Sink for Database {
    async fn insert_batch(&self, rows: &[CallRecord]) -> Result<(), WriteError> {
        if rows.is_empty() {
            return Ok(());
        }
        let result = match self {
            Database::Postgres(pool) => Database::insert_postgres(pool, rows).await,
            Database::Sqlite(pool) => Database::insert_sqlite(pool, rows).await,
        };
        result.map_err(|error| {
            if is_unavailable(&error) {
                WriteError::Unavailable(error.to_string())
            } else {
                WriteError::Rejected(error.to_string())
            }
        })
    }
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
        let cutoff = ago(retention);
        // Cancelling mid-pass is safe: every batch is its own committed statement.
        tokio::select! {
            _ = cancel.cancelled() => return,
            result = database.delete_older_than(cutoff, RETENTION_BATCH) => match result {
                Ok(deleted) => tracing::info!(deleted, cutoff = %cutoff, "Retention pass deleted old call logs."),
                Err(error) => tracing::warn!(error = %error, "Retention pass failed; retrying at the next interval."),
            },
        }
        next = crate::clock::after(tokio::time::Instant::now(), interval);
    }
}

impl IncidentReport {
    /// Computes the report from the calls in the incident's window (in any order).
    pub fn from_calls(incident: Incident, window_end: DateTime<Utc>, calls: &[CallRecord]) -> IncidentReport {
        let is_sent = |call: &&CallRecord| call.error_class.as_deref() != Some(super::NOT_PERMITTED);
        let not_sent_calls = calls.iter().filter(|call| !is_sent(call)).count() as u64;
        let calls: Vec<&CallRecord> = calls.iter().filter(is_sent).collect();
        let mut by_class: std::collections::BTreeMap<String, u64> = Default::default();
        let mut by_endpoint: std::collections::BTreeMap<String, u64> = Default::default();
        let mut first_error: Option<&CallRecord> = None;
        let mut last_error: Option<&CallRecord> = None;
        for call in calls.iter().copied().filter(|call| !call.success) {
            let class = call.error_class.clone().unwrap_or_else(|| "unclassified".to_owned());
            *by_class.entry(class).or_default() += 1;
            *by_endpoint.entry(call.endpoint.clone()).or_default() += 1;
            if first_error.is_none_or(|first| call.created_at < first.created_at) {
                first_error = Some(call);
            }
            if last_error.is_none_or(|last| call.created_at >= last.created_at) {
                last_error = Some(call);
            }
        }
        let mut times: Vec<i64> = calls.iter().map(|call| call.response_time).collect();
        times.sort_unstable();
        let response_time =
            times.last().map(|&max| Latency { p50: nearest_rank(&times, 0.50), p95: nearest_rank(&times, 0.95), max });
        let failed_calls = by_class.values().sum();
        IncidentReport {
            incident,
            window_end,
            total_calls: calls.len() as u64,
            failed_calls,
            not_sent_calls,
            failures_by_class: most_first(by_class),
            failures_by_endpoint: most_first(by_endpoint),
            response_time,
            first_error: first_error.map(ErrorSample::of),
            last_error: last_error.map(ErrorSample::of),
        }
    }
}

impl ErrorSample {
    fn of(call: &CallRecord) -> ErrorSample {
        ErrorSample {
            created_at: call.created_at,
            endpoint: call.endpoint.clone(),
            error_class: call.error_class.clone(),
            error_message: call.error_message.clone(),
        }
    }
}

/// The nearest-rank percentile of sorted, non-empty `values`.
fn nearest_rank(values: &[i64], fraction: f64) -> i64 {
    let rank = (fraction * values.len() as f64).ceil() as usize;
    values[rank.clamp(1, values.len()) - 1]
}

fn most_first(counts: std::collections::BTreeMap<String, u64>) -> Vec<Count> {
    let mut counts: Vec<Count> = counts.into_iter().map(|(name, calls)| Count { name, calls }).collect();
    // Stable: equal counts stay in name order.
    counts.sort_by_key(|count| std::cmp::Reverse(count.calls));
    counts
}

/// `now - duration`, floored at the Unix epoch (a retention of a thousand years is "keep everything").
fn ago(duration: Duration) -> DateTime<Utc> {
    TimeDelta::from_std(duration)
        .ok()
        .and_then(|delta| Utc::now().checked_sub_signed(delta))
        .map_or(DateTime::UNIX_EPOCH, |time| time.max(DateTime::UNIX_EPOCH))
}

/// `response_time` is an `integer` column; 2^31 ms is 24 days, far beyond any timeout.
fn clamp_milliseconds(milliseconds: i64) -> i32 {
    i32::try_from(milliseconds.max(0)).unwrap_or(i32::MAX)
}

/// SQLite's text form of a time: UTC, space-separated, microseconds, `Z`. Fixed width, so text order is time order,
/// and comparable with SQLite's `datetime('now', ...)` ('YYYY-MM-DD HH:MM:SS').
pub fn sqlite_time(time: DateTime<Utc>) -> String {
    time.format("%Y-%m-%d %H:%M:%S%.6fZ").to_string()
}

fn parse_sqlite_time(text: &str) -> Result<DateTime<Utc>, Error> {
    NaiveDateTime::parse_from_str(text.trim_end_matches('Z'), "%Y-%m-%d %H:%M:%S%.f")
        .map(|naive| naive.and_utc())
        .or_else(|_| DateTime::parse_from_rfc3339(text).map(|time| time.with_timezone(&Utc)))
        .map_err(|error| Error::Query(format!("invalid time {text:?} in SQLite ({error})")))
}

fn postgres_target(options: &PgConnectOptions) -> String {
    format!(
        "{}:{}/{}",
        options.get_host(),
        options.get_port(),
        options.get_database().unwrap_or(options.get_username())
    )
}

/// Removes the URL and its password (raw and percent-decoded) from `text`, in case a driver ever echoes them.
fn redact_password(text: String, url: &Secret, parsed: &url::Url) -> String {
    let mut text = text.replace(url.expose(), Secret::REDACTED);
    if let Some(password) = parsed.password().filter(|password| !password.is_empty()) {
        text = text.replace(password, Secret::REDACTED);
        if let Ok(decoded) = percent_decode(password)
            && !decoded.is_empty()
        {
            text = text.replace(&decoded, Secret::REDACTED);
        }
    }
    text
}

fn percent_decode(text: &str) -> Result<String, std::string::FromUtf8Error> {
    let bytes = text.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        let hex = bytes.get(index + 1..index + 3).and_then(|pair| std::str::from_utf8(pair).ok());
        match (bytes[index], hex.and_then(|hex| u8::from_str_radix(hex, 16).ok())) {
            (b'%', Some(byte)) => {
                decoded.push(byte);
                index += 3;
            }
            (byte, _) => {
                decoded.push(byte);
                index += 1;
            }
        }
    }
    String::from_utf8(decoded)
}

/// Whether retrying later can help: the connection, the pool or the server's state, not the rows themselves.
fn is_unavailable(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Configuration(_) => true,
        sqlx::Error::Database(database) => {
            let code = database.code().unwrap_or_default();
            if database.try_downcast_ref::<sqlx::postgres::PgDatabaseError>().is_some() {
                // SQLSTATE classes: 08 connection, 53 resources (disk full, too many connections), 57 operator
                // intervention (shutdown), 58 system error, 40 transaction rollback (deadlock, serialization),
                // 25006 read-only transaction (a failover in progress).
                ["08", "53", "57", "58", "40"].iter().any(|class| code.starts_with(class)) || code == "25006"
            } else {
                // SQLite primary result codes: BUSY 5, LOCKED 6, IOERR 10, FULL 13, CANTOPEN 14.
                let primary = code.parse::<i64>().map(|code| code & 0xff).unwrap_or(0);
                matches!(primary, 5 | 6 | 10 | 13 | 14)
            }
        }
        // Encoding, decoding and argument errors are about the rows: retrying cannot help.
        _ => false,
    }
}

pub(crate) fn query_error(error: sqlx::Error) -> Error {
    if is_unavailable(&error) { Error::Unavailable(error.to_string()) } else { Error::Query(error.to_string()) }
}

fn decode_error(error: sqlx::Error) -> Error {
    Error::Query(error.to_string())
}

fn postgres_call(row: &PgRow) -> Result<CallRecord, Error> {
    Ok(CallRecord {
        id: row.try_get("id").map_err(decode_error)?,
        provider: row.try_get("provider").map_err(decode_error)?,
        endpoint: row.try_get("endpoint").map_err(decode_error)?,
        success: row.try_get("success").map_err(decode_error)?,
        response_time: i64::from(row.try_get::<i32, _>("response_time").map_err(decode_error)?),
        error_message: row.try_get("error_message").map_err(decode_error)?,
        http_status: row.try_get("http_status").map_err(decode_error)?,
        error_class: row.try_get("error_class").map_err(decode_error)?,
        exchange_error: row.try_get("exchange_error").map_err(decode_error)?,
        instance: row.try_get("instance").map_err(decode_error)?,
        created_at: row.try_get("created_at").map_err(decode_error)?,
    })
}

fn sqlite_call(row: &SqliteRow) -> Result<CallRecord, Error> {
    let id: String = row.try_get("id").map_err(decode_error)?;
    let created_at: String = row.try_get("created_at").map_err(decode_error)?;
    Ok(CallRecord {
        id: Uuid::parse_str(&id).map_err(|error| Error::Query(format!("invalid id {id:?} in SQLite ({error})")))?,
        provider: row.try_get("provider").map_err(decode_error)?,
        endpoint: row.try_get("endpoint").map_err(decode_error)?,
        success: row.try_get("success").map_err(decode_error)?,
        response_time: row.try_get("response_time").map_err(decode_error)?,
        error_message: row.try_get("error_message").map_err(decode_error)?,
        http_status: row.try_get("http_status").map_err(decode_error)?,
        error_class: row.try_get("error_class").map_err(decode_error)?,
        exchange_error: row.try_get("exchange_error").map_err(decode_error)?,
        instance: row.try_get("instance").map_err(decode_error)?,
        created_at: parse_sqlite_time(&created_at)?,
    })
}

fn postgres_incident(row: &PgRow) -> Result<Incident, Error> {
    Ok(Incident {
        id: row.try_get("id").map_err(decode_error)?,
        provider: row.try_get("provider").map_err(decode_error)?,
        alertname: row.try_get("alertname").map_err(decode_error)?,
        scenario: row.try_get("scenario").map_err(decode_error)?,
        started_at: row.try_get("started_at").map_err(decode_error)?,
        resolved_at: row.try_get("resolved_at").map_err(decode_error)?,
        first_error: row.try_get("first_error").map_err(decode_error)?,
        last_error: row.try_get("last_error").map_err(decode_error)?,
        failed_calls: row.try_get("failed_calls").map_err(decode_error)?,
        total_calls: row.try_get("total_calls").map_err(decode_error)?,
    })
}

fn sqlite_incident(row: &SqliteRow) -> Result<Incident, Error> {
    let started_at: String = row.try_get("started_at").map_err(decode_error)?;
    let resolved_at: Option<String> = row.try_get("resolved_at").map_err(decode_error)?;
    Ok(Incident {
        id: row.try_get("id").map_err(decode_error)?,
        provider: row.try_get("provider").map_err(decode_error)?,
        alertname: row.try_get("alertname").map_err(decode_error)?,
        scenario: row.try_get("scenario").map_err(decode_error)?,
        started_at: parse_sqlite_time(&started_at)?,
        resolved_at: resolved_at.as_deref().map(parse_sqlite_time).transpose()?,
        first_error: row.try_get("first_error").map_err(decode_error)?,
        last_error: row.try_get("last_error").map_err(decode_error)?,
        failed_calls: row.try_get("failed_calls").map_err(decode_error)?,
        total_calls: row.try_get("total_calls").map_err(decode_error)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(endpoint: &str, success: bool, response_time: i64, class: Option<&str>, seconds: i64) -> CallRecord {
        CallRecord {
            id: Uuid::now_v7(),
            provider: "kraken".to_owned(),
            endpoint: endpoint.to_owned(),
            success,
            response_time,
            error_message: (!success).then(|| format!("{endpoint} failed at {seconds}")),
            http_status: None,
            error_class: class.map(str::to_owned),
            exchange_error: None,
            instance: "test".to_owned(),
            created_at: DateTime::UNIX_EPOCH + TimeDelta::seconds(seconds),
        }
    }

    fn incident() -> Incident {
        Incident {
            id: 1,
            provider: "kraken".to_owned(),
            alertname: "ExchangeApiDown".to_owned(),
            scenario: "maintenance".to_owned(),
            started_at: DateTime::UNIX_EPOCH,
            resolved_at: None,
            first_error: None,
            last_error: None,
            failed_calls: 0,
            total_calls: 0,
        }
    }

    #[test]
    fn sqlite_times_sort_as_text_and_read_back() {
        let early = DateTime::parse_from_rfc3339("2025-01-15T10:30:00.000001Z").unwrap().with_timezone(&Utc);
        let late = DateTime::parse_from_rfc3339("2025-01-15T10:30:00.1Z").unwrap().with_timezone(&Utc);
        assert_eq!(sqlite_time(early), "2025-01-15 10:30:00.000001Z");
        assert_eq!(sqlite_time(late), "2025-01-15 10:30:00.100000Z");
        assert!(sqlite_time(early) < sqlite_time(late));
        // SQLite's datetime() writes whole seconds without a zone; a row in that second sorts after it.
        assert!(
            sqlite_time(early).as_str() > "2025-01-15 10:30:00" && sqlite_time(early).as_str() < "2025-01-15 10:30:01"
        );
        assert_eq!(parse_sqlite_time(&sqlite_time(early)).unwrap(), early);
        assert_eq!(parse_sqlite_time("2025-01-15T10:30:00.1Z").unwrap(), late);
    }

    #[test]
    fn report_counts_failures_by_class_and_endpoint_with_nearest_rank_percentiles() {
        let calls: Vec<CallRecord> = (1..=20)
            .map(|second| call("Ticker", true, second * 10, None, second))
            .chain([
                call("Ticker", false, 5000, Some("timeout"), 30),
                call("Balance", false, 0, Some("auth"), 25),
                call("Ticker", false, 1000, Some("timeout"), 40),
                call("Depth", false, 7, None, 35),
            ])
            .collect();
        let report = IncidentReport::from_calls(incident(), DateTime::UNIX_EPOCH + TimeDelta::seconds(60), &calls);
        assert_eq!((report.total_calls, report.failed_calls), (24, 4));
        let classes: Vec<(&str, u64)> =
            report.failures_by_class.iter().map(|count| (count.name.as_str(), count.calls)).collect();
        assert_eq!(classes, [("timeout", 2), ("auth", 1), ("unclassified", 1)]);
        let endpoints: Vec<(&str, u64)> =
            report.failures_by_endpoint.iter().map(|count| (count.name.as_str(), count.calls)).collect();
        assert_eq!(endpoints, [("Ticker", 2), ("Balance", 1), ("Depth", 1)]);
        // 24 values: 0, 7, 10..200, 1000, 5000; p50 is the 12th (100), p95 the 23rd (1000).
        assert_eq!(report.response_time, Some(Latency { p50: 100, p95: 1000, max: 5000 }));
        let first = report.first_error.unwrap();
        assert_eq!((first.endpoint.as_str(), first.error_class.as_deref()), ("Balance", Some("auth")));
        let last = report.last_error.unwrap();
        assert_eq!(last.error_message.as_deref(), Some("Ticker failed at 40"));
    }

    #[test]
    fn calls_never_sent_are_counted_apart_and_never_enter_the_percentiles() {
        let mut refused = call("Ticker", false, 0, Some(crate::store::NOT_PERMITTED), 20);
        refused.error_message = Some("not sent: circuit breaker open".to_owned());
        let calls = vec![
            call("Ticker", false, 900, Some("timeout"), 10),
            refused.clone(),
            refused,
            call("Ticker", true, 1000, None, 30),
        ];
        let report = IncidentReport::from_calls(incident(), DateTime::UNIX_EPOCH + TimeDelta::seconds(60), &calls);
        assert_eq!((report.total_calls, report.failed_calls, report.not_sent_calls), (2, 1, 2));
        assert_eq!(report.response_time, Some(Latency { p50: 900, p95: 1000, max: 1000 }));
        let classes: Vec<&str> = report.failures_by_class.iter().map(|count| count.name.as_str()).collect();
        assert_eq!(classes, ["timeout"]);
        assert_eq!(report.last_error.unwrap().error_class.as_deref(), Some("timeout"));
    }

    #[test]
    fn a_report_without_calls_has_no_percentiles_or_errors() {
        let report = IncidentReport::from_calls(incident(), DateTime::UNIX_EPOCH, &[]);
        assert_eq!((report.total_calls, report.failed_calls), (0, 0));
        assert!(report.response_time.is_none() && report.first_error.is_none() && report.last_error.is_none());
    }

    #[test]
    fn nearest_rank_handles_one_value_and_exact_ranks() {
        assert_eq!(nearest_rank(&[42], 0.5), 42);
        assert_eq!(nearest_rank(&[42], 0.95), 42);
        let hundred: Vec<i64> = (1..=100).collect();
        assert_eq!((nearest_rank(&hundred, 0.5), nearest_rank(&hundred, 0.95)), (50, 95));
    }

    #[test]
    fn passwords_are_removed_raw_and_percent_decoded() {
        let url = Secret::new("postgres://exwatch:p%40ss@db:5432/exwatch");
        let parsed = url::Url::parse(url.expose()).unwrap();
        let text = redact_password(
            "failed for postgres://exwatch:p%40ss@db:5432/exwatch with p%40ss and p@ss".to_owned(),
            &url,
            &parsed,
        );
        assert!(!text.contains("p%40ss") && !text.contains("p@ss"), "{text}");
    }

    #[test]
    fn response_times_beyond_an_integer_are_clamped() {
        assert_eq!(clamp_milliseconds(1234), 1234);
        assert_eq!(clamp_milliseconds(-5), 0);
        assert_eq!(clamp_milliseconds(i64::MAX), i32::MAX);
    }

    #[test]
    fn ago_is_floored_at_the_epoch() {
        assert_eq!(ago(Duration::from_secs(u64::MAX)), DateTime::UNIX_EPOCH);
        let hour_ago = ago(Duration::from_secs(3600));
        assert!((Utc::now() - hour_ago - TimeDelta::hours(1)).num_seconds().abs() < 5);
    }
}
