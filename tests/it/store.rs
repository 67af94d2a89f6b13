//! The store against both backends: every behaviour test runs once on Postgres and once on SQLite, from one body.
//!
//! Postgres: `DATABASE_URL` (scripts/test.sh exports it; `postgres://postgres@127.0.0.1:5432/postgres` when unset).
//! Each test creates its own database `exwatch_test_<uuid>` through that admin connection and drops it afterwards,
//! even when the test fails. An unreachable server fails the tests; they never skip. SQLite: a file in a temp dir.

use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use exwatch::secret::Secret;
use exwatch::store::alerts::{OutboxRow, Tally};
use exwatch::store::calls::run_retention;
use exwatch::store::database;
use exwatch::store::incidents::{Count, Latency};
use exwatch::store::{self, CallRecord, Database, Sink, WriteError, report};
use sqlx::{AssertSqlSafe, Connection, PgConnection, Row};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::helpers::eventually;

const LOCAL_POSTGRES: &str = "postgres://postgres@127.0.0.1:5432/postgres";

fn admin_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| LOCAL_POSTGRES.to_owned())
}

/// A migrated database of one backend that removes itself when dropped.
pub(crate) struct TestDatabase {
    database: Database,
    config: store::Config,
    _cleanup: Cleanup,
}

pub(crate) enum Cleanup {
    Postgres { admin_url: String, name: String },
    Sqlite(#[allow(dead_code)] tempfile::TempDir),
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Cleanup::Postgres { admin_url, name } = self {
            // Drop cannot await, and may run while a test panics: a thread with its own runtime does the DROP.
            let (admin_url, database_name) = (admin_url.clone(), name.clone());
            let dropped = std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                runtime.block_on(async {
                    let mut admin = PgConnection::connect(&admin_url).await?;
                    sqlx::query(AssertSqlSafe(format!("DROP DATABASE IF EXISTS \"{database_name}\" WITH (FORCE)")))
                        .execute(&mut admin)
                        .await?;
                    admin.close().await
                })
            })
            .join();
            if !matches!(dropped, Ok(Ok(()))) {
                eprintln!("could not drop test database {name}: {dropped:?}");
            }
        }
    }
}

impl TestDatabase {
    /// A fresh, empty Postgres database (not yet migrated) and the configuration pointing at it.
    pub(crate) async fn postgres_config() -> (store::Config, Cleanup) {
        let admin_url = admin_url();
        let mut admin = PgConnection::connect(&admin_url).await.unwrap_or_else(|error| {
            panic!("Postgres tests need a server at DATABASE_URL ({admin_url}); scripts/test.sh starts one: {error}")
        });
        let name = format!("exwatch_test_{}", Uuid::new_v4().simple());
        sqlx::query(AssertSqlSafe(format!("CREATE DATABASE \"{name}\""))).execute(&mut admin).await.unwrap();
        admin.close().await.unwrap();
        let mut url = url::Url::parse(&admin_url).unwrap();
        url.set_path(&name);
        let config = store::Config { url: Some(Secret::new(url.to_string())), ..store::Config::default() };
        (config, Cleanup::Postgres { admin_url, name })
    }

    async fn postgres() -> TestDatabase {
        let (config, cleanup) = TestDatabase::postgres_config().await;
        let database = Database::connect(&config).await.expect("connects to the test database and migrates");
        TestDatabase { database, config, _cleanup: cleanup }
    }

    async fn sqlite() -> TestDatabase {
        let directory = tempfile::tempdir().unwrap();
        let config =
            store::Config { sqlite_path: directory.path().join("data/exwatch.sqlite"), ..store::Config::default() };
        let database = Database::connect(&config).await.expect("creates the SQLite file and migrates");
        TestDatabase { database, config, _cleanup: Cleanup::Sqlite(directory) }
    }
}

/// Runs each named body against a fresh Postgres database and a fresh SQLite file.
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod postgres {
            $(
                #[tokio::test]
                async fn $name() {
                    let test = super::TestDatabase::postgres().await;
                    super::$name(&test).await;
                }
            )*
        }
        mod sqlite {
            $(
                #[tokio::test]
                async fn $name() {
                    let test = super::TestDatabase::sqlite().await;
                    super::$name(&test).await;
                }
            )*
        }
    };
}

on_both_backends!(
    migrations_apply_and_a_second_run_is_a_no_op,
    a_batch_with_a_repeated_id_is_written_once_even_when_replayed,
    the_runbook_query_returns_the_last_thirty_minutes_newest_first,
    recent_calls_filters_by_provider_window_and_failures,
    incidents_open_once_update_and_resolve,
    an_incident_report_summarises_the_calls_in_its_window,
    retention_deletes_only_rows_older_than_the_cutoff,
    the_retention_loop_deletes_old_rows_soon_after_start_and_stops_on_cancel,
    write_errors_say_whether_a_retry_can_help,
    text_with_nul_and_control_characters_is_stored_cleaned_everywhere,
    an_incident_and_its_report_count_the_same_calls_from_the_first_failure,
);

/// Microsecond precision: what both backends store.
fn now() -> DateTime<Utc> {
    let now = Utc::now();
    DateTime::from_timestamp_micros(now.timestamp_micros()).unwrap()
}

fn call(provider: &str, endpoint: &str, created_at: DateTime<Utc>) -> CallRecord {
    CallRecord {
        response_time: 87,
        http_status: Some(200),
        ..CallRecord::new(provider, "exwatch-0", endpoint, created_at)
    }
}

fn failure(endpoint: &str, created_at: DateTime<Utc>, class: &str, message: &str) -> CallRecord {
    CallRecord {
        success: false,
        response_time: 5012,
        error_message: Some(message.to_owned()),
        http_status: Some(503),
        error_class: Some(class.to_owned()),
        exchange_error: Some(message.to_owned()),
        ..call("kraken", endpoint, created_at)
    }
}

async fn count(database: &Database, sql: &'static str) -> i64 {
    match database {
        Database::Postgres(pool) => sqlx::query_scalar(sql).fetch_one(pool).await.unwrap(),
        Database::Sqlite(pool) => sqlx::query_scalar(sql).fetch_one(pool).await.unwrap(),
    }
}

async fn migrations_apply_and_a_second_run_is_a_no_op(test: &TestDatabase) {
    let database = &test.database;
    assert_eq!(count(database, "SELECT COUNT(*) FROM _sqlx_migrations").await, 4);
    database.migrate().await.expect("a second run applies nothing and succeeds");
    let again = Database::connect(&test.config).await.expect("connecting again migrates again, as a no-op");
    assert_eq!(count(database, "SELECT COUNT(*) FROM _sqlx_migrations").await, 4);
    assert_eq!(again.schema_version(), 4);
    assert_eq!(count(database, "SELECT COUNT(*) FROM api_call_logs").await, 0);
    assert_eq!(count(database, "SELECT COUNT(*) FROM incidents").await, 0);
    again.close().await;
}

async fn a_batch_with_a_repeated_id_is_written_once_even_when_replayed(test: &TestDatabase) {
    let database = &test.database;
    let start = now() - TimeDelta::minutes(10);
    // 6000 rows: more than one statement may bind on either backend (5957 on Postgres, 2978 on SQLite).
    let mut rows: Vec<CallRecord> =
        (0..6000).map(|index| call("kraken", "Ticker", start + TimeDelta::milliseconds(index))).collect();
    let repeated_early = rows[3].clone();
    let repeated_across_chunks = rows[10].clone();
    rows.push(repeated_early);
    rows.insert(5990, repeated_across_chunks);
    database.insert_batch(&rows).await.expect("the batch is written");
    assert_eq!(count(database, "SELECT COUNT(*) FROM api_call_logs").await, 6000);
    // A replay (the commit happened but its answer was lost) writes nothing new.
    database.insert_batch(&rows[..500]).await.expect("a replay succeeds");
    database.insert_batch(&[]).await.expect("an empty batch is a no-op");
    assert_eq!(count(database, "SELECT COUNT(*) FROM api_call_logs").await, 6000);
}

/// The runbook's investigation query, as written there (Postgres) and in SQLite's shape (`datetime`).
const RUNBOOK_POSTGRES: &str = "SELECT endpoint, success, response_time, error_message, created_at FROM api_call_logs
WHERE provider = 'kraken' AND created_at > NOW() - INTERVAL '30 minutes' ORDER BY created_at DESC LIMIT 50;";
const RUNBOOK_SQLITE: &str = "SELECT endpoint, success, response_time, error_message, created_at FROM api_call_logs
WHERE provider = 'kraken' AND created_at > datetime('now', '-30 minutes') ORDER BY created_at DESC LIMIT 50;";

pub(crate) type RunbookRow = (String, bool, i64, Option<String>, String);

pub(crate) async fn runbook_query(database: &Database) -> Vec<RunbookRow> {
    match database {
        Database::Postgres(pool) => sqlx::query(RUNBOOK_POSTGRES)
            .fetch_all(pool)
            .await
            .unwrap()
            .iter()
            .map(|row| {
                let created_at: DateTime<Utc> = row.get("created_at");
                (
                    row.get("endpoint"),
                    row.get("success"),
                    i64::from(row.get::<i32, _>("response_time")),
                    row.get("error_message"),
                    database::sqlite_time(created_at),
                )
            })
            .collect(),
        Database::Sqlite(pool) => sqlx::query(RUNBOOK_SQLITE)
            .fetch_all(pool)
            .await
            .unwrap()
            .iter()
            .map(|row| {
                (
                    row.get("endpoint"),
                    row.get("success"),
                    row.get("response_time"),
                    row.get("error_message"),
                    row.get("created_at"),
                )
            })
            .collect(),
    }
}

/// Calls at 1, 5, 10 and 29 minutes ago for kraken, one at 45 minutes ago, and another provider's call.
fn runbook_rows(now: DateTime<Utc>) -> Vec<CallRecord> {
    let minutes = |count: i64| now - TimeDelta::minutes(count);
    vec![
        call("kraken", "SystemStatus", minutes(5)),
        failure("Ticker", minutes(1), "maintenance", "EService:Unavailable"),
        CallRecord { response_time: 120, ..call("kraken", "Ticker", minutes(10)) },
        failure("Balance", minutes(29), "auth", "EAPI:Invalid key"),
        call("kraken", "Ticker", minutes(45)),
        call("binance", "Ticker", minutes(2)),
    ]
}

async fn the_runbook_query_returns_the_last_thirty_minutes_newest_first(test: &TestDatabase) {
    let database = &test.database;
    let now = now();
    database.insert_batch(&runbook_rows(now)).await.unwrap();
    let minutes = |count: i64| database::sqlite_time(now - TimeDelta::minutes(count));
    let expected: Vec<RunbookRow> = vec![
        ("Ticker".into(), false, 5012, Some("EService:Unavailable".into()), minutes(1)),
        ("SystemStatus".into(), true, 87, None, minutes(5)),
        ("Ticker".into(), true, 120, None, minutes(10)),
        ("Balance".into(), false, 5012, Some("EAPI:Invalid key".into()), minutes(29)),
    ];
    assert_eq!(runbook_query(database).await, expected);

    // LIMIT 50 keeps the newest 50.
    let many: Vec<CallRecord> =
        (0..60).map(|index| call("kraken", "Time", now - TimeDelta::seconds(61 + index))).collect();
    database.insert_batch(&many).await.unwrap();
    let rows = runbook_query(database).await;
    assert_eq!(rows.len(), 50);
    assert_eq!(rows[0].0, "Ticker");
    assert!(rows[1..].iter().all(|row| row.0 == "Time"), "{rows:?}");
}

async fn recent_calls_filters_by_provider_window_and_failures(test: &TestDatabase) {
    let database = &test.database;
    let now = now();
    let rows = runbook_rows(now);
    database.insert_batch(&rows).await.unwrap();

    let recent = database.recent_calls("kraken", Duration::from_secs(1800), 50, false).await.unwrap();
    // Every column reads back as written.
    assert_eq!(recent, vec![rows[1].clone(), rows[0].clone(), rows[2].clone(), rows[3].clone()]);

    let failures = database.recent_calls("kraken", Duration::from_secs(1800), 50, true).await.unwrap();
    let endpoints: Vec<&str> = failures.iter().map(|call| call.endpoint.as_str()).collect();
    assert_eq!(endpoints, ["Ticker", "Balance"]);
    assert!(failures.iter().all(|call| !call.success));

    let newest_two = database.recent_calls("kraken", Duration::from_secs(1800), 2, false).await.unwrap();
    assert_eq!(newest_two, vec![rows[1].clone(), rows[0].clone()]);
    let hour = database.recent_calls("kraken", Duration::from_secs(3600), 50, false).await.unwrap();
    assert_eq!(hour.len(), 5);
    let other = database.recent_calls("binance", Duration::from_secs(1800), 50, false).await.unwrap();
    assert_eq!(other, vec![rows[5].clone()]);

    // The table `exwatch logs` prints from them.
    let text = report::render_calls(&recent);
    assert!(text.starts_with("CREATED_AT"), "{text}");
    assert!(text.contains("EService:Unavailable") && text.contains("5012 ms") && text.contains("maintenance"));
}

async fn incidents_open_once_update_and_resolve(test: &TestDatabase) {
    let database = &test.database;
    let started = now() - TimeDelta::minutes(20);
    let id = database
        .open_incident("kraken", "ExchangeApiDown", "network", started, Some("connection refused"))
        .await
        .unwrap();
    let again = database.open_incident("kraken", "ExchangeApiDown", "maintenance", started, None).await.unwrap();
    assert_eq!(again, id, "an open incident is returned, not duplicated");
    let slow = database.open_incident("kraken", "ExchangeApiSlow", "unknown", started, None).await.unwrap();
    assert_ne!(slow, id);

    assert!(database.update_incident(id, "maintenance", Some("EService:Unavailable"), 3, 4).await.unwrap());
    assert!(database.update_incident(id, "maintenance", None, 2, 2).await.unwrap());
    // An incident opened without an error takes its first one from the first update.
    assert!(database.update_incident(slow, "unknown", Some("slow answer"), 0, 1).await.unwrap());
    assert!(!database.update_incident(9_999_999, "unknown", None, 1, 1).await.unwrap());

    let open = database.open_incidents().await.unwrap();
    assert_eq!(open.len(), 2);
    let down = open.iter().find(|incident| incident.id == id).unwrap();
    assert_eq!(down.scenario, "maintenance");
    assert_eq!(down.started_at, started);
    assert_eq!(down.first_error.as_deref(), Some("connection refused"));
    assert_eq!(down.last_error.as_deref(), Some("EService:Unavailable"));
    assert_eq!((down.failed_calls, down.total_calls), (5, 6));
    assert!(down.resolved_at.is_none());
    let slow_incident = open.iter().find(|incident| incident.id == slow).unwrap();
    assert_eq!(slow_incident.first_error.as_deref(), Some("slow answer"));

    let resolved_at = now();
    assert!(database.resolve_incident(id, resolved_at).await.unwrap());
    assert!(!database.resolve_incident(id, resolved_at).await.unwrap(), "resolving twice changes nothing");
    let reopened = database.open_incident("kraken", "ExchangeApiDown", "network", now(), None).await.unwrap();
    assert_ne!(reopened, id, "after resolution the next alert opens a new incident");

    let open_ids: Vec<i64> = database.open_incidents().await.unwrap().iter().map(|incident| incident.id).collect();
    assert_eq!(open_ids.len(), 2);
    assert!(open_ids.contains(&reopened) && open_ids.contains(&slow));

    // One from last month, long resolved, is outside a 7-day listing.
    let old_start = now() - TimeDelta::days(30);
    let old = database.open_incident("kraken", "OldAlert", "auth", old_start, None).await.unwrap();
    assert!(database.resolve_incident(old, old_start + TimeDelta::hours(1)).await.unwrap());
    let listed = database.list_incidents(Duration::from_secs(7 * 86_400)).await.unwrap();
    let listed_ids: Vec<i64> = listed.iter().map(|incident| incident.id).collect();
    assert_eq!(listed_ids.len(), 3, "{listed:?}");
    assert!(!listed_ids.contains(&old));
    assert_eq!(listed[0].id, reopened, "newest first");
    let resolved = listed.iter().find(|incident| incident.id == id).unwrap();
    assert_eq!(resolved.resolved_at, Some(resolved_at));
    assert_eq!(database.list_incidents(Duration::from_secs(60 * 86_400)).await.unwrap().len(), 4);

    let text = report::render_incidents(&listed, Utc::now());
    assert!(text.contains("ExchangeApiDown") && text.contains(" open ") && text.contains("maintenance"), "{text}");
}

async fn an_incident_report_summarises_the_calls_in_its_window(test: &TestDatabase) {
    let database = &test.database;
    let now = now();
    let minutes = |count: i64| now - TimeDelta::minutes(count);
    let started = minutes(20);
    let resolved = minutes(5);
    let mut rows = vec![
        // Outside the window, or another provider's: not counted.
        failure("Ticker", minutes(25), "network", "before the incident"),
        failure("Ticker", minutes(2), "network", "after the incident"),
        CallRecord { success: false, error_class: Some("timeout".into()), ..call("binance", "Ticker", minutes(10)) },
        // Inside: 10 successes of 10..100 ms and 4 failures.
        failure("Ticker", minutes(19), "maintenance", "EService:Unavailable"),
        failure("SystemStatus", minutes(15), "maintenance", "EService:Unavailable"),
        CallRecord { response_time: 10_000, ..failure("Ticker", minutes(12), "timeout", "timed out after 10s") },
        CallRecord { response_time: 0, ..failure("Balance", minutes(6), "auth", "EAPI:Invalid key") },
    ];
    rows.extend((1..=10).map(|index| CallRecord {
        response_time: index * 10,
        ..call("kraken", "Time", started + TimeDelta::seconds(30 * index))
    }));
    database.insert_batch(&rows).await.unwrap();
    let id = database.open_incident("kraken", "ExchangeApiDown", "maintenance", started, None).await.unwrap();
    assert!(database.resolve_incident(id, resolved).await.unwrap());

    let report = database.incident_report(id).await.unwrap().expect("the incident exists");
    assert_eq!(report.incident.id, id);
    assert_eq!(report.window_end, resolved);
    assert_eq!((report.total_calls, report.failed_calls), (14, 4));
    let count = |name: &str, calls: u64| Count { name: name.to_owned(), calls };
    assert_eq!(report.failures_by_class, [count("maintenance", 2), count("auth", 1), count("timeout", 1)]);
    assert_eq!(report.failures_by_endpoint, [count("Ticker", 2), count("Balance", 1), count("SystemStatus", 1)]);
    // 14 times: 0, 10..100, 5012, 5012, 10000. Nearest rank: p50 is the 7th (60), p95 the 14th (10000).
    assert_eq!(report.response_time, Some(Latency { p50: 60, p95: 10_000, max: 10_000 }));
    let first = report.first_error.as_ref().unwrap();
    assert_eq!((first.created_at, first.endpoint.as_str()), (minutes(19), "Ticker"));
    assert_eq!(first.error_class.as_deref(), Some("maintenance"));
    let last = report.last_error.as_ref().unwrap();
    assert_eq!((last.created_at, last.error_message.as_deref()), (minutes(6), Some("EAPI:Invalid key")));

    let text = report::render_incident_report(&report);
    assert!(text.contains("14 total, 4 failed") && text.contains("p95 10000 ms"), "{text}");

    // An open incident's window runs until now.
    let open = database.open_incident("kraken", "ExchangeApiSlow", "unknown", minutes(3), None).await.unwrap();
    let report = database.incident_report(open).await.unwrap().unwrap();
    assert_eq!((report.total_calls, report.failed_calls), (1, 1));
    assert!(report.window_end >= now);
    assert!(database.incident_report(9_999_999).await.unwrap().is_none());
}

async fn text_with_nul_and_control_characters_is_stored_cleaned_everywhere(test: &TestDatabase) {
    let database = &test.database;
    let dirty = "EGeneral:Internal error:\0nul\u{1b}[2J";
    let clean = "EGeneral:Internal error:\u{FFFD}nul\u{FFFD}[2J";
    // Postgres refuses NUL in text: before, each of these writes failed, and the recorder retried it forever.
    let id =
        database.open_incident("kraken", "exchange_api_down", "exchange_errors", now(), Some(dirty)).await.unwrap();
    let tally = Tally { last_error: Some(format!("last {dirty}")), failed_calls: 2, total_calls: 2 };
    assert!(database.update_open_incident("kraken", "exchange_api_down", "exchange_errors", &tally).await.unwrap());
    database
        .alert_state_put("pod-a", "kraken", "exchange_api_down", &format!("{{\"evidence\":\"{dirty}\"}}"))
        .await
        .unwrap();
    let row = OutboxRow {
        id: "n-1".to_owned(),
        target: "ops".to_owned(),
        kind: "firing".to_owned(),
        payload: format!("{{\"evidence\":\"{dirty}\"}}"),
        created_at_ms: 1,
    };
    database.outbox_put("pod-a", &row).await.unwrap();
    let call = CallRecord { exchange_error: Some(dirty.to_owned()), ..failure("Ticker", now(), "server_error", dirty) };
    database.insert_batch(std::slice::from_ref(&call)).await.unwrap();

    let incident = database.incident(id).await.unwrap().unwrap();
    assert_eq!(incident.first_error.as_deref(), Some(clean));
    assert_eq!(incident.last_error, Some(format!("last {clean}")));
    let state = database.alert_state("pod-a").await.unwrap();
    assert_eq!(state, [("kraken".to_owned(), "exchange_api_down".to_owned(), format!("{{\"evidence\":\"{clean}\"}}"))]);
    let outbox = database.outbox("pod-a").await.unwrap();
    assert_eq!(outbox[0].payload, format!("{{\"evidence\":\"{clean}\"}}"));
    let stored = database.recent_calls("kraken", Duration::from_secs(60), 1, true).await.unwrap();
    assert_eq!(stored[0].exchange_error.as_deref(), Some(clean));
    assert_eq!(stored[0].error_message.as_deref(), Some(clean));
}

async fn an_incident_and_its_report_count_the_same_calls_from_the_first_failure(test: &TestDatabase) {
    let database = &test.database;
    let first_failure = now() - TimeDelta::minutes(10);
    let at = |seconds: i64| first_failure + TimeDelta::seconds(seconds);
    let refused = || CallRecord {
        response_time: 0,
        error_message: Some("not sent: circuit breaker open".to_owned()),
        http_status: None,
        error_class: Some(store::NOT_PERMITTED.to_owned()),
        ..failure("Ticker", at(60), "not_permitted", "")
    };
    let rows = vec![
        // The last good poll, just before the streak: not the incident's.
        CallRecord { response_time: 9_000, ..call("kraken", "Ticker", at(-1)) },
        // The three failed polls that opened the breaker, then two refused calls, then recovery.
        failure("Ticker", at(0), "maintenance", "EService:Unavailable"),
        failure("Ticker", at(30), "maintenance", "EService:Unavailable"),
        failure("Ticker", at(45), "maintenance", "EService:Unavailable"),
        refused(),
        refused(),
        CallRecord { response_time: 100, ..call("kraken", "Ticker", at(120)) },
    ];
    database.insert_batch(&rows).await.unwrap();
    // As the alert side records it: the opening counts the streak so far, each later poll adds its calls.
    let opening =
        Tally { last_error: Some("maintenance EService:Unavailable".to_owned()), failed_calls: 3, total_calls: 3 };
    let id = database.open_incident("kraken", "exchange_api_down", "maintenance", at(0), Some("first")).await.unwrap();
    let Tally { last_error, failed_calls, total_calls } = &opening;
    assert!(
        database.update_incident(id, "maintenance", last_error.as_deref(), *failed_calls, *total_calls).await.unwrap()
    );
    let recovery = Tally { last_error: None, failed_calls: 0, total_calls: 1 };
    assert!(database.update_open_incident("kraken", "exchange_api_down", "maintenance", &recovery).await.unwrap());
    assert!(database.resolve_incident(id, at(121)).await.unwrap());
    let after = database.update_open_incident("kraken", "exchange_api_down", "maintenance", &recovery).await.unwrap();
    assert!(!after, "resolved");

    let report = database.incident_report(id).await.unwrap().unwrap();
    let incident = &report.incident;
    assert_eq!((incident.failed_calls, incident.total_calls), (3, 4));
    assert_eq!((report.failed_calls, report.total_calls, report.not_sent_calls), (3, 4, 2));
    assert_eq!(incident.last_error.as_deref(), Some("maintenance EService:Unavailable"));
    assert_eq!(report.first_error.as_ref().unwrap().created_at, at(0), "the report starts at the first failure");
    // Refused calls (0 ms) and the call before the streak (9 s) are not in the percentiles.
    assert_eq!(report.response_time, Some(Latency { p50: 5012, p95: 5012, max: 5012 }));
    let text = report::render_incident_report(&report);
    assert!(text.contains("4 total, 3 failed") && text.contains("not sent       2"), "{text}");
}

async fn retention_deletes_only_rows_older_than_the_cutoff(test: &TestDatabase) {
    let database = &test.database;
    let now = now();
    let days = |count: i64| now - TimeDelta::days(count);
    let rows: Vec<CallRecord> =
        [40, 35, 31, 31, 29, 1, 0].iter().map(|&age| call("kraken", "Ticker", days(age))).collect();
    database.insert_batch(&rows).await.unwrap();
    let id = database.open_incident("kraken", "ExchangeApiDown", "network", days(40), None).await.unwrap();

    // A batch of 1 loops until nothing is left, one row per statement.
    assert_eq!(database.delete_older_than(days(30), 1).await.unwrap(), 4);
    assert_eq!(database.delete_older_than(days(30), 1000).await.unwrap(), 0);
    let left = database.recent_calls("kraken", Duration::from_secs(60 * 86_400), 50, false).await.unwrap();
    assert_eq!(left, vec![rows[6].clone(), rows[5].clone(), rows[4].clone()]);
    assert!(database.incident(id).await.unwrap().is_some(), "retention leaves incidents alone");
}

async fn the_retention_loop_deletes_old_rows_soon_after_start_and_stops_on_cancel(test: &TestDatabase) {
    let database = &test.database;
    let now = now();
    let rows = [call("kraken", "Ticker", now - TimeDelta::days(31)), call("kraken", "Ticker", now)];
    database.insert_batch(&rows).await.unwrap();
    let cancel = CancellationToken::new();
    let task = tokio::spawn(run_retention(
        database.clone(),
        Duration::from_secs(30 * 86_400),
        Duration::from_millis(50),
        cancel.clone(),
    ));
    eventually(Duration::from_secs(10), "the first retention pass", || async {
        (count(database, "SELECT COUNT(*) FROM api_call_logs").await == 1).then_some(())
    })
    .await;
    cancel.cancel();
    tokio::time::timeout(Duration::from_secs(5), task).await.expect("stops on cancel").unwrap();
}

async fn write_errors_say_whether_a_retry_can_help(test: &TestDatabase) {
    let rows = [call("kraken", "Ticker", now())];
    // A row that cannot be stored as it is (a NUL byte, which Postgres text refuses) is still written.
    let with_nul = CallRecord { error_message: Some("bad\0byte".to_owned()), ..call("kraken", "Ticker", now()) };
    test.database.insert_batch(&[with_nul]).await.expect("NUL bytes are replaced, not rejected");

    // A schema the rows cannot go into: the database rejects them, and retrying cannot help.
    let broken = Database::connect(&test.config).await.unwrap();
    match &broken {
        Database::Postgres(pool) => {
            sqlx::query("ALTER TABLE api_call_logs RENAME TO gone").execute(pool).await.unwrap();
        }
        Database::Sqlite(pool) => {
            sqlx::query("ALTER TABLE api_call_logs RENAME TO gone").execute(pool).await.unwrap();
        }
    }
    let error = broken.insert_batch(&rows).await.unwrap_err();
    assert!(matches!(error, WriteError::Rejected(_)), "{error:?}");

    // A closed pool (as during an outage): unavailable, retry later.
    broken.close().await;
    let error = broken.insert_batch(&rows).await.unwrap_err();
    assert!(matches!(error, WriteError::Unavailable(_)), "{error:?}");
    let error = broken.recent_calls("kraken", Duration::from_secs(60), 1, false).await.unwrap_err();
    assert!(matches!(error, database::Error::Unavailable(_)), "{error:?}");
}

#[tokio::test]
async fn two_replicas_migrating_a_new_postgres_database_at_once_both_succeed() {
    let (config, _cleanup) = TestDatabase::postgres_config().await;
    let (first, second) = tokio::join!(Database::connect(&config), Database::connect(&config));
    let (first, second) = (first.expect("first replica"), second.expect("second replica"));
    assert_eq!(count(&first, "SELECT COUNT(*) FROM _sqlx_migrations").await, 4);
    first.close().await;
    second.close().await;
}

#[tokio::test]
async fn an_unreachable_postgres_fails_fast_and_the_error_never_shows_the_password() {
    let config = store::Config {
        url: Some(Secret::new("postgres://exwatch:hunter2@127.0.0.1:1/exwatch")),
        ..store::Config::default()
    };
    let started = tokio::time::Instant::now();
    let error = Database::connect(&config).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
    let text = error.to_string();
    assert!(matches!(error, database::Error::Connect { .. }), "{error:?}");
    assert!(text.contains("127.0.0.1:1/exwatch"), "{text}");
    assert!(!text.contains("hunter2") && !format!("{error:?}").contains("hunter2"), "{text}");
}

#[tokio::test]
async fn a_wrong_postgres_password_is_reported_without_the_password() {
    // The admin URL with a user that does not exist and a password: the server refuses it.
    let mut url = url::Url::parse(&admin_url()).unwrap();
    url.set_username("exwatch_nobody").unwrap();
    url.set_password(Some("hunter2")).unwrap();
    let config = store::Config { url: Some(Secret::new(url.to_string())), ..store::Config::default() };
    let error = Database::connect(&config).await.unwrap_err();
    let text = error.to_string();
    assert!(text.starts_with("cannot connect to the database at"), "{text}");
    assert!(!text.contains("hunter2"), "{text}");
}

// The binary's store commands against a SQLite file, as on-call would type them.

async fn exwatch(arguments: &[&str], directory: &std::path::Path) -> (Option<i32>, String, String) {
    let output = crate::cli::exwatch(arguments, directory).await;
    (output.code, output.stdout, output.stderr)
}

#[tokio::test]
async fn logs_and_incidents_commands_print_tables_and_json_from_sqlite() {
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path();
    let (code, stdout, stderr) = exwatch(&["migrate"], path).await;
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("sqlite exwatch.sqlite is migrated to schema version 4"), "{stdout}");
    let (code, stdout, _) = exwatch(&["logs"], path).await;
    assert_eq!((code, stdout.as_str()), (Some(0), "No calls found.\n"));

    let database =
        Database::connect(&store::Config { sqlite_path: path.join("exwatch.sqlite"), ..store::Config::default() })
            .await
            .unwrap();
    let now = now();
    database.insert_batch(&runbook_rows(now)).await.unwrap();
    let id = database.open_incident("kraken", "ExchangeApiDown", "maintenance", now - TimeDelta::minutes(3), None);
    let id = id.await.unwrap();
    database.close().await;

    let (code, stdout, stderr) = exwatch(&["logs", "--failures"], path).await;
    assert_eq!(code, Some(0), "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{stdout}");
    assert!(lines[0].starts_with("CREATED_AT") && lines[1].contains("EService:Unavailable"), "{stdout}");
    assert!(lines[2].contains("Balance") && lines[2].contains("auth") && lines[2].contains("503"), "{stdout}");

    let (code, stdout, _) = exwatch(&["logs", "--since", "1h", "--limit", "2", "--json"], path).await;
    assert_eq!(code, Some(0));
    let calls: Vec<CallRecord> = serde_json::from_str(&stdout).expect("one JSON array of calls");
    let endpoints: Vec<&str> = calls.iter().map(|call| call.endpoint.as_str()).collect();
    assert_eq!(endpoints, ["Ticker", "SystemStatus"]);

    let (code, stdout, _) = exwatch(&["incidents"], path).await;
    assert_eq!(code, Some(0));
    assert!(stdout.starts_with("ID") && stdout.contains("ExchangeApiDown") && stdout.contains(" open "), "{stdout}");
    let (code, stdout, _) = exwatch(&["incidents", "--json", "--since", "1h"], path).await;
    assert_eq!(code, Some(0));
    let incidents: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(incidents[0]["id"], id);
    assert_eq!(incidents[0]["resolved_at"], serde_json::Value::Null);

    let id_text = id.to_string();
    let (code, stdout, stderr) = exwatch(&["incidents", "report", &id_text], path).await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("1 total, 1 failed") && stdout.contains("maintenance  1"), "{stdout}");
    let (code, stdout, _) = exwatch(&["incidents", "report", &id_text, "--json"], path).await;
    assert_eq!(code, Some(0));
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["failed_calls"], 1);
    let (code, _, stderr) = exwatch(&["incidents", "report", "424242"], path).await;
    assert_eq!(code, Some(1));
    assert!(stderr.contains("no incident with id 424242"), "{stderr}");
}

#[tokio::test]
async fn read_only_commands_never_create_a_database_and_name_the_missing_file() {
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path();
    let config = path.join("x.toml");
    std::fs::write(&config, "[database]\nsqlite_path = \"state/exwatch.sqlite\"\n").unwrap();
    let config = config.to_str().unwrap();
    for arguments in [
        vec!["logs", "--config", config],
        vec!["incidents", "--config", config],
        vec!["incidents", "report", "1", "--config", config],
        vec!["logs"],
    ] {
        let (code, stdout, stderr) = exwatch(&arguments, path).await;
        assert_eq!(code, Some(1), "{arguments:?}: {stdout}{stderr}");
        let file = if arguments.len() > 1 { "state/exwatch.sqlite" } else { "exwatch.sqlite" };
        assert!(stderr.contains(&format!("no SQLite database at {file}")), "{arguments:?}: {stderr}");
        if arguments.len() > 1 {
            assert!(stderr.contains("x.toml"), "the configuration it came from: {stderr}");
        }
        assert!(stdout.is_empty(), "{stdout}");
    }
    let created: Vec<_> = std::fs::read_dir(path).unwrap().map(|entry| entry.unwrap().file_name()).collect();
    assert_eq!(created, ["x.toml"], "nothing but the configuration: no database file, no directory");

    // A file exwatch never migrated is not migrated by a reader either: it says what to run.
    std::fs::write(path.join("exwatch.sqlite"), b"").unwrap();
    let (code, _, stderr) = exwatch(&["logs"], path).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("schema version 0") && stderr.contains("exwatch migrate"), "{stderr}");
}

#[tokio::test]
async fn store_commands_exit_one_without_the_password_when_postgres_is_down_and_two_on_bad_arguments() {
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path();
    let config = path.join("exwatch.toml");
    std::fs::write(&config, "[database]\nurl = \"postgres://exwatch:hunter2@127.0.0.1:1/exwatch\"\n").unwrap();
    let config = config.to_str().unwrap();
    for arguments in [
        vec!["logs", "--config", config],
        vec!["migrate", "--config", config],
        vec!["incidents", "--config", config],
        vec!["incidents", "report", "1", "--config", config],
    ] {
        let (code, stdout, stderr) = exwatch(&arguments, path).await;
        assert_eq!(code, Some(1), "{arguments:?}: {stdout}{stderr}");
        assert!(stderr.contains("cannot connect to the database at 127.0.0.1:1/exwatch"), "{stderr}");
        assert!(!stderr.contains("hunter2") && !stdout.contains("hunter2"), "{stderr}");
    }
    for arguments in [&["logs", "--since", "soon"][..], &["logs", "--limit", "0"], &["incidents", "report", "x"]] {
        let (code, _, stderr) = exwatch(arguments, path).await;
        assert_eq!(code, Some(2), "{arguments:?}: {stderr}");
    }
}
