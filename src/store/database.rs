//! The two backends: connecting (Postgres when `database.url` is set, otherwise a SQLite file), the embedded
//! migrations, and how one statement runs on either. The statements themselves live with their tables:
//! [`calls`](super::calls), [`incidents`](super::incidents), [`alert_state`](super::alert_state).
//!
//! One text per statement: `on_either!` (and `execute!`, `fetch!` on top of it) compiles a statement's code once
//! per backend, placeholders are `$N` (Postgres's own; sqlx's SQLite driver binds `$N` by its number too,
//! sqlx-sqlite 0.9.0 `arguments.rs`), and the values whose stored form differs encode themselves per backend:
//! [`Id`] (`uuid` / text) and [`Time`] (`timestamptz` / text, see `migrations/sqlite/0001_api_call_logs.sql`).
//! Rows decode through `sqlx::FromRow`, one derive for both backends. The pools stay typed rather than sqlx's
//! `AnyPool`: its driver encodes neither `Uuid` nor `chrono` times, and the schemas differ in those very types.
//! This module does no buffering or retrying: the [`writer`](super::writer) owns that, and uses
//! [`WriteError`](super::WriteError)'s two kinds (`is_unavailable` decides which) to decide.
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
use sqlx::decode::Decode;
use sqlx::encode::{Encode, IsNull};
use sqlx::error::BoxDynError;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgArgumentBuffer, PgConnectOptions, PgConnection, PgPool, PgPoolOptions, PgTypeInfo, PgValueRef};
use sqlx::sqlite::{
    SqliteArgumentsBuffer, SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
    SqliteTypeInfo, SqliteValueRef,
};
use sqlx::types::Type;
use sqlx::{Connection as _, Postgres, Sqlite};
use uuid::Uuid;

use super::Config;
use crate::secret::Secret;

static POSTGRES_MIGRATIONS: Migrator = sqlx::migrate!("./migrations/postgres");
static SQLITE_MIGRATIONS: Migrator = sqlx::migrate!("./migrations/sqlite");

/// Small on purpose: one writer, a retention pass and a CLI query at most.
const MAX_CONNECTIONS: u32 = 4;
/// How long a caller waits for a connection; during an outage inserts fail after this, not after TCP's minutes.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a SQLite writer waits for another writer's lock before failing with `SQLITE_BUSY`.
const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The most bind parameters one statement may carry: Postgres counts them in a u16, SQLite's default
/// `SQLITE_MAX_VARIABLE_NUMBER` is 32766.
const POSTGRES_MAX_BINDS: usize = 65_535;
const SQLITE_MAX_BINDS: usize = 32_766;

/// The database's own clock, on either backend (SQLite's has whole seconds, as its `datetime('now')`).
const DATABASE_NOW: &str = "SELECT CURRENT_TIMESTAMP";
const APPLIED_VERSION: &str = "SELECT version FROM _sqlx_migrations WHERE success ORDER BY version DESC LIMIT 1";

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

impl Error {
    /// The kind of failure, without the text (which may name hosts, databases and the server's words): what an
    /// unauthenticated endpoint may show.
    pub fn class(&self) -> &'static str {
        match self {
            Error::Connect { .. } => "connect",
            Error::Migrate { .. } => "migrate",
            Error::Missing { .. } => "missing",
            Error::Outdated { .. } => "outdated",
            Error::Unavailable(_) => "unavailable",
            Error::Query(_) => "query",
        }
    }
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

/// Runs `$body` with `$pool` bound to the pool `$database` holds. The body is written once and compiled once per
/// backend, so a statement in it has one text for both.
macro_rules! on_either {
    ($database:expr, |$pool:ident| $body:expr) => {
        match $database {
            $crate::store::database::Database::Postgres($pool) => $body,
            $crate::store::database::Database::Sqlite($pool) => $body,
        }
    };
}
pub(crate) use on_either;

/// Runs one statement with the values bound as `$1`, `$2`, ... and returns how many rows it affected.
macro_rules! execute {
    ($database:expr, $sql:expr $(, $value:expr)* $(,)?) => {
        $crate::store::database::on_either!($database, |pool| {
            sqlx::query($sql)$(.bind($value))*.execute(pool).await.map(|done| done.rows_affected())
        })
        .map_err($crate::store::database::query_error)
    };
}
pub(crate) use execute;

/// Runs one query with the values bound as `$1`, `$2`, ... and decodes its rows as `$row` (a `FromRow` type or a
/// tuple) with `$fetch` (`fetch_all`, `fetch_optional`, `fetch_one`).
macro_rules! fetch {
    ($database:expr, $fetch:ident, $row:ty, $sql:expr $(, $value:expr)* $(,)?) => {
        $crate::store::database::on_either!($database, |pool| {
            sqlx::query_as::<_, $row>($sql)$(.bind($value))*.$fetch(pool).await
        })
        .map_err($crate::store::database::query_error)
    };
}
pub(crate) use fetch;

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
        let version: Result<Option<i64>, sqlx::Error> =
            on_either!(self, |pool| sqlx::query_scalar(APPLIED_VERSION).fetch_optional(pool).await);
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
        on_either!(self, |pool| pool.close().await)
    }

    /// How many rows of `columns` values one statement may insert on this backend.
    pub(crate) fn rows_per_statement(&self, columns: usize) -> usize {
        let binds = match self {
            Database::Postgres(_) => POSTGRES_MAX_BINDS,
            Database::Sqlite(_) => SQLITE_MAX_BINDS,
        };
        binds / columns.max(1)
    }

    /// The time now by the database's clock.
    pub(crate) async fn now(&self) -> Result<DateTime<Utc>, Error> {
        let (Time(now),) = fetch!(self, fetch_one, (Time,), DATABASE_NOW)?;
        Ok(now)
    }
}

/// A row id as each backend stores it: `uuid` in Postgres, the hyphenated lowercase text in SQLite.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Id(pub Uuid);

/// A point in time as each backend stores it: `timestamptz` in Postgres, [`sqlite_time`]'s text in SQLite.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Time(pub DateTime<Utc>);

/// A nullable [`Time`], for `#[sqlx(try_from)]` on an `Option<DateTime<Utc>>` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionalTime(pub Option<DateTime<Utc>>);

/// Implements sqlx's `Type`, `Encode` and `Decode` for a wrapper whose value Postgres stores as `$inner` and SQLite
/// as the text `$to_text` writes and `$from_text` reads back.
macro_rules! stored_as_text_in_sqlite {
    ($wrapper:ident($inner:ty), $to_text:expr, $from_text:expr) => {
        impl Type<Postgres> for $wrapper {
            fn type_info() -> PgTypeInfo {
                <$inner as Type<Postgres>>::type_info()
            }
            fn compatible(ty: &PgTypeInfo) -> bool {
                <$inner as Type<Postgres>>::compatible(ty)
            }
        }
        impl Encode<'_, Postgres> for $wrapper {
            fn encode_by_ref(&self, buffer: &mut PgArgumentBuffer) -> Result<IsNull, BoxDynError> {
                <$inner as Encode<'_, Postgres>>::encode_by_ref(&self.0, buffer)
            }
        }
        impl<'r> Decode<'r, Postgres> for $wrapper {
            fn decode(value: PgValueRef<'r>) -> Result<Self, BoxDynError> {
                <$inner as Decode<'r, Postgres>>::decode(value).map($wrapper)
            }
        }
        impl Type<Sqlite> for $wrapper {
            fn type_info() -> SqliteTypeInfo {
                <String as Type<Sqlite>>::type_info()
            }
        }
        impl Encode<'_, Sqlite> for $wrapper {
            fn encode_by_ref(&self, buffer: &mut SqliteArgumentsBuffer) -> Result<IsNull, BoxDynError> {
                <String as Encode<'_, Sqlite>>::encode($to_text(self.0), buffer)
            }
        }
        impl<'r> Decode<'r, Sqlite> for $wrapper {
            fn decode(value: SqliteValueRef<'r>) -> Result<Self, BoxDynError> {
                let text = <&str as Decode<'r, Sqlite>>::decode(value)?;
                Ok($wrapper($from_text(text)?))
            }
        }
        impl From<$wrapper> for $inner {
            fn from(wrapper: $wrapper) -> $inner {
                wrapper.0
            }
        }
    };
}

stored_as_text_in_sqlite!(Id(Uuid), |id: Uuid| id.hyphenated().to_string(), |text: &str| {
    Uuid::parse_str(text).map_err(|error| format!("invalid id {text:?} in SQLite ({error})"))
});
stored_as_text_in_sqlite!(Time(DateTime<Utc>), sqlite_time, parse_sqlite_time);

impl<DB: sqlx::Database> Type<DB> for OptionalTime
where
    Time: Type<DB>,
{
    fn type_info() -> DB::TypeInfo {
        <Time as Type<DB>>::type_info()
    }
    fn compatible(ty: &DB::TypeInfo) -> bool {
        <Time as Type<DB>>::compatible(ty)
    }
}

impl<'r, DB: sqlx::Database> Decode<'r, DB> for OptionalTime
where
    Time: Decode<'r, DB>,
{
    fn decode(value: DB::ValueRef<'r>) -> Result<Self, BoxDynError> {
        Ok(OptionalTime(<Option<Time> as Decode<'r, DB>>::decode(value)?.map(DateTime::from)))
    }
}

impl From<OptionalTime> for Option<DateTime<Utc>> {
    fn from(wrapper: OptionalTime) -> Option<DateTime<Utc>> {
        wrapper.0
    }
}

/// SQLite's text form of a time: UTC, space-separated, microseconds, `Z`. Fixed width, so text order is time order,
/// and comparable with SQLite's `datetime('now', ...)` ('YYYY-MM-DD HH:MM:SS').
pub fn sqlite_time(time: DateTime<Utc>) -> String {
    time.format("%Y-%m-%d %H:%M:%S%.6fZ").to_string()
}

/// Reads [`sqlite_time`]'s text, SQLite's own `CURRENT_TIMESTAMP` ('YYYY-MM-DD HH:MM:SS') and RFC 3339.
fn parse_sqlite_time(text: &str) -> Result<DateTime<Utc>, String> {
    NaiveDateTime::parse_from_str(text.trim_end_matches('Z'), "%Y-%m-%d %H:%M:%S%.f")
        .map(|naive| naive.and_utc())
        .or_else(|_| DateTime::parse_from_rfc3339(text).map(|time| time.with_timezone(&Utc)))
        .map_err(|error| format!("invalid time {text:?} in SQLite ({error})"))
}

/// `time - duration`, floored at the Unix epoch (a retention of a thousand years is "keep everything").
pub(crate) fn before(time: DateTime<Utc>, duration: Duration) -> DateTime<Utc> {
    TimeDelta::from_std(duration)
        .ok()
        .and_then(|delta| time.checked_sub_signed(delta))
        .map_or(DateTime::UNIX_EPOCH, |time| time.max(DateTime::UNIX_EPOCH))
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
pub(crate) fn is_unavailable(error: &sqlx::Error) -> bool {
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

#[cfg(test)]
mod tests {
    use super::*;

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
        // SQLite's CURRENT_TIMESTAMP, the database's clock.
        let second = DateTime::parse_from_rfc3339("2025-01-15T10:30:00Z").unwrap().with_timezone(&Utc);
        assert_eq!(parse_sqlite_time("2025-01-15 10:30:00").unwrap(), second);
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
    fn before_is_floored_at_the_epoch() {
        let now = Utc::now();
        assert_eq!(before(now, Duration::from_secs(u64::MAX)), DateTime::UNIX_EPOCH);
        assert_eq!(before(now, Duration::from_secs(3600)), now - TimeDelta::hours(1));
    }
}
