//! Batched inserts into `api_call_logs` through `Sink::insert_batch`, the writer's only path to the database: one
//! multi-row `INSERT ... ON CONFLICT (id) DO NOTHING` per batch. Results and their reading live in `bench/inserts.md`.
//!
//! Postgres is `DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`); the bench creates its own
//! database `exwatch_bench_<uuid>`, migrates it and drops it at the end. SQLite is a file in a temp dir.
//!
//! Three measurements:
//! - a fixed run first, the goal's shape: 50 batches of 500 rows (25,000 rows) into the freshly migrated database,
//!   one after another as the writer sends them, timed as a whole and printed as rows per second (and the same with
//!   5,000-row batches, the writer's default `batch_size`);
//! - the same 50 x 5,000 rows through exwatch's writer (`writer::Handle::push` for each row, then the writer drains
//!   them in its own batches), timed from the first push to the last row written, so the two sit side by side;
//! - then criterion, `insert_batch/{postgres,sqlite}/500` with a throughput of 500 elements, so it reports rows per
//!   second with confidence intervals. Rows are built outside the timed part (`iter_batched`), each with a fresh
//!   UUIDv7, so every row is really inserted (no conflicts); the table grows during the run, as in production.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use exwatch::secret::Secret;
use exwatch::store::{self, CallRecord, Database, Sink, writer};
use sqlx::{AssertSqlSafe, Connection, PgConnection};
use uuid::Uuid;

const BATCH: usize = 500;
const LARGE_BATCH: usize = 5000;
const FIXED_BATCHES: usize = 50;

/// A realistic mix: mostly successes, one failure in ten with its error columns filled.
fn rows(count: usize) -> Vec<CallRecord> {
    let now = Utc::now();
    (0..count)
        .map(|index| {
            let failed = index % 10 == 0;
            let endpoint = ["Ticker", "SystemStatus", "Depth", "Balance"][index % 4];
            CallRecord {
                success: !failed,
                response_time: 80 + (index % 200) as i64,
                error_message: failed.then(|| "EService:Unavailable".to_owned()),
                http_status: Some(if failed { 503 } else { 200 }),
                error_class: failed.then(|| "maintenance".to_owned()),
                exchange_error: failed.then(|| "EService:Unavailable".to_owned()),
                ..CallRecord::new("kraken", "exwatch-bench", endpoint, now)
            }
        })
        .collect()
}

struct PostgresDatabase {
    admin_url: String,
    name: String,
    database: Database,
}

async fn postgres() -> PostgresDatabase {
    let admin_url =
        std::env::var("DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
    let mut admin = PgConnection::connect(&admin_url).await.expect("Postgres at DATABASE_URL");
    let name = format!("exwatch_bench_{}", Uuid::new_v4().simple());
    sqlx::query(AssertSqlSafe(format!("CREATE DATABASE \"{name}\""))).execute(&mut admin).await.expect("create");
    admin.close().await.expect("close");
    let mut url = url::Url::parse(&admin_url).expect("a URL");
    url.set_path(&name);
    let config = store::Config { url: Some(Secret::new(url.to_string())), ..store::Config::default() };
    let database = Database::connect(&config).await.expect("connect and migrate");
    PostgresDatabase { admin_url, name, database }
}

async fn drop_postgres(postgres: PostgresDatabase) {
    postgres.database.close().await;
    let mut admin = PgConnection::connect(&postgres.admin_url).await.expect("Postgres at DATABASE_URL");
    sqlx::query(AssertSqlSafe(format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", postgres.name)))
        .execute(&mut admin)
        .await
        .expect("drop");
}

/// 50 batches of `batch` rows, back to back, into `database`; prints and returns rows per second.
async fn fixed_run(label: &str, database: &Database, batch: usize) -> f64 {
    let batches: Vec<Vec<CallRecord>> = (0..FIXED_BATCHES).map(|_| rows(batch)).collect();
    let started = tokio::time::Instant::now();
    for batch in &batches {
        database.insert_batch(batch).await.expect("insert");
    }
    let elapsed = started.elapsed();
    let total = FIXED_BATCHES * batch;
    let per_second = total as f64 / elapsed.as_secs_f64();
    println!(
        "fixed run {label}: {FIXED_BATCHES} batches x {batch} rows = {total} rows in {:.3} s = {per_second:.0} rows/s",
        elapsed.as_secs_f64()
    );
    per_second
}

/// 50 batches of `batch` rows pushed one row at a time into exwatch's writer (default settings, memory large enough
/// that nothing spools), which writes them to `database` in its own batches; prints and returns rows per second
/// from the first push to the last row written.
async fn writer_run(label: &str, database: &Database, batch: usize) -> f64 {
    let total = FIXED_BATCHES * batch;
    let records: Vec<CallRecord> = (0..FIXED_BATCHES).flat_map(|_| rows(batch)).collect();
    let spool = tempfile::tempdir().expect("temp dir");
    let config = writer::Config {
        memory_rows: total,
        memory_bytes: u64::MAX,
        spool_dir: spool.path().join("spool"),
        ..writer::Config::default()
    };
    let sink: Arc<dyn Sink> = Arc::new(database.clone());
    let registry = prometheus::Registry::new();
    let (writer, handle) = writer::Writer::new(config, sink, writer::Metrics::new(&registry)).expect("writer");
    let stop = tokio_util::sync::CancellationToken::new();
    let started = tokio::time::Instant::now();
    let task = tokio::spawn(writer.run(stop.clone(), Duration::from_secs(600)));
    for record in records {
        handle.push(record);
    }
    let pushed = started.elapsed();
    // Cancelling starts the drain: the writer goes on until memory is empty, then returns.
    stop.cancel();
    let summary = task.await.expect("writer task");
    let elapsed = started.elapsed();
    assert_eq!(summary.written, total as u64, "every row written");
    let per_second = total as f64 / elapsed.as_secs_f64();
    println!(
        "writer run {label}: {total} rows pushed in {:.3} s ({:.0} ns/push), written in {:.3} s = {per_second:.0} rows/s",
        pushed.as_secs_f64(),
        pushed.as_nanos() as f64 / total as f64,
        elapsed.as_secs_f64()
    );
    per_second
}

const BACKENDS: [&str; 2] = ["postgres", "sqlite"];

fn inserts(criterion: &mut Criterion) {
    // `--list` (cargo nextest lists every target) must print names only: no databases, no fixed run.
    if std::env::args().any(|argument| argument == "--list") {
        let mut group = criterion.benchmark_group("insert_batch");
        for name in BACKENDS {
            group.bench_function(format!("{name}/{BATCH}"), |bencher| bencher.iter(|| ()));
        }
        group.finish();
        return;
    }
    // The fixed run only under `cargo bench`; as a test (one iteration each) the bench just checks it works.
    let benchmarking = std::env::args().any(|argument| argument == "--bench");
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let postgres = runtime.block_on(postgres());
    let directory = tempfile::tempdir().expect("temp dir");
    let sqlite = runtime
        .block_on(Database::connect(&store::Config {
            sqlite_path: directory.path().join("bench.sqlite"),
            ..store::Config::default()
        }))
        .expect("SQLite");

    if benchmarking {
        // The writer's default batch, and the largest one statement takes (a backlog drains in such batches).
        for batch in [BATCH, LARGE_BATCH] {
            runtime.block_on(fixed_run("postgres", &postgres.database, batch));
            runtime.block_on(fixed_run("sqlite", &sqlite, batch));
        }
        // The same rows through the writer, right after the direct inserts they are compared with.
        runtime.block_on(writer_run("postgres", &postgres.database, LARGE_BATCH));
        runtime.block_on(writer_run("sqlite", &sqlite, LARGE_BATCH));
    }

    let mut group = criterion.benchmark_group("insert_batch");
    group.throughput(Throughput::Elements(BATCH as u64));
    group.sample_size(30);
    group.measurement_time(Duration::from_secs(10));
    for (name, database) in BACKENDS.into_iter().zip([&postgres.database, &sqlite]) {
        group.bench_function(format!("{name}/{BATCH}"), |bencher| {
            bencher.iter_batched(
                || rows(BATCH),
                |batch| runtime.block_on(database.insert_batch(black_box(&batch))).expect("insert"),
                BatchSize::LargeInput,
            )
        });
    }
    group.finish();

    runtime.block_on(sqlite.close());
    runtime.block_on(drop_postgres(postgres));
}

criterion_group!(benches, inserts);
criterion_main!(benches);
