//! Database outages end to end: the daemon polls the simulator and logs to a real Postgres through a TCP proxy
//! that the test cuts and restores. Nothing is lost, nothing is written twice, and polling never waits.

use std::net::SocketAddr;
use std::time::Duration;

use exwatch::secret::Secret;
use exwatch::store::{self, Database, writer};
use sqlx::Row;

use crate::helpers::{TestApp, config, eventually, metric, spawn_app, start_simulator};
use crate::proxy::Proxy;
use crate::store::TestDatabase;

const WAIT: Duration = Duration::from_secs(30);

/// A migrated Postgres database of its own, the proxy in front of it, and the URL that goes through the proxy.
pub(crate) async fn proxied_postgres() -> (url::Url, Database, Proxy, crate::store::Cleanup) {
    let (direct_config, cleanup) = TestDatabase::postgres_config().await;
    let direct = Database::connect(&direct_config).await.expect("the test database migrates");
    let mut url = url::Url::parse(direct_config.url.as_ref().unwrap().expose()).unwrap();
    let upstream: SocketAddr = format!("{}:{}", url.host_str().unwrap(), url.port().unwrap_or(5432)).parse().unwrap();
    let proxy = Proxy::start(upstream).await;
    url.set_port(Some(proxy.address.port())).unwrap();
    (url, direct, proxy, cleanup)
}

/// [`proxied_postgres`] with a `[database]` section through the proxy with small bounds, so an outage of a second
/// or two fills memory and spools.
async fn proxied_database(spool_dir: &std::path::Path) -> (store::Config, Database, Proxy, crate::store::Cleanup) {
    let (url, direct, proxy, cleanup) = proxied_postgres().await;
    let writer = writer::Config {
        batch_size: 5,
        flush_interval: Duration::from_millis(50),
        memory_rows: 5,
        spool_dir: spool_dir.to_owned(),
        ..writer::Config::default()
    };
    let proxied = store::Config { url: Some(Secret::new(url.to_string())), writer, ..store::Config::default() };
    (proxied, direct, proxy, cleanup)
}

async fn rows(database: &Database, endpoint: &str) -> Vec<(uuid::Uuid, chrono::DateTime<chrono::Utc>)> {
    let Database::Postgres(pool) = database else { panic!("a Postgres test database") };
    sqlx::query("SELECT id, created_at FROM api_call_logs WHERE endpoint = $1 ORDER BY id")
        .bind(endpoint)
        .fetch_all(pool)
        .await
        .unwrap()
        .into_iter()
        .map(|row| (row.get("id"), row.get("created_at")))
        .collect()
}

async fn store_gauge(app: &TestApp, name: &str) -> f64 {
    metric(&app.metrics().await, name, &[]).unwrap_or(f64::NAN)
}

#[tokio::test]
async fn a_database_outage_loses_nothing_writes_nothing_twice_and_never_slows_polling() {
    let simulator = start_simulator().await;
    let spool = tempfile::tempdir().unwrap();
    let (database, direct, proxy, _cleanup) = proxied_database(spool.path()).await;
    let mut config = config(&simulator.base_url(), "200ms", "150ms", false);
    config.database = database;
    let app = spawn_app(config).await;

    eventually(WAIT, "rows written before the outage", || async {
        (rows(&direct, "Ticker").await.len() >= 3).then_some(())
    })
    .await;
    proxy.cut();
    let polls_at_cut = simulator.requests("Ticker");
    eventually(WAIT, "rows spooled to disk during the outage", || async {
        let spooled = store_gauge(&app, "exwatch_store_spooled_rows").await;
        (spooled > 0.0 && simulator.requests("Ticker") >= polls_at_cut + 10).then_some(())
    })
    .await;
    assert_eq!(store_gauge(&app, "exwatch_store_database_up").await, 0.0);
    let (status, health) = app.get("/health").await;
    assert_eq!(status, 200, "a database outage never fails liveness: {health}");
    assert!(health.contains("\"up\":false"), "{health}");
    proxy.restore();
    eventually(WAIT, "the backlog written after recovery", || async {
        let drained = store_gauge(&app, "exwatch_store_spooled_rows").await == 0.0
            && store_gauge(&app, "exwatch_store_buffered_rows").await == 0.0;
        drained.then_some(())
    })
    .await;
    let metrics = app.metrics().await;
    let dropped: f64 = metrics
        .lines()
        .filter(|line| line.starts_with("exwatch_store_dropped_rows_total{"))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(dropped, 0.0, "nothing dropped: {metrics}");
    app.shutdown().await.unwrap();

    // Every call reached both the simulator and the log, once: the polls made are the rows written.
    let tickers = rows(&direct, "Ticker").await;
    assert_eq!(tickers.len() as u64, simulator.requests("Ticker"));
    assert_eq!(rows(&direct, "SystemStatus").await.len() as u64, simulator.requests("SystemStatus"));
    // In order: ids are time-ordered, and created_at never goes back along them.
    assert!(tickers.windows(2).all(|pair| pair[0].1 <= pair[1].1));
    // The poll interval never slipped while the database was away: no gap between polls near a second.
    let largest_gap = tickers.windows(2).map(|pair| pair[1].1 - pair[0].1).max().unwrap();
    assert!(largest_gap < chrono::TimeDelta::milliseconds(1000), "a poll waited: gap {largest_gap}");
}

#[tokio::test]
async fn rows_spooled_before_a_shutdown_are_written_after_the_next_start() {
    let simulator = start_simulator().await;
    let spool = tempfile::tempdir().unwrap();
    let (database, direct, proxy, _cleanup) = proxied_database(spool.path()).await;
    proxy.cut();

    let mut first = config(&simulator.base_url(), "200ms", "150ms", false);
    first.database = database.clone();
    let app = spawn_app(first).await;
    eventually(WAIT, "polls logged to the spool while the database is away", || async {
        let spooled = store_gauge(&app, "exwatch_store_spooled_rows").await;
        (spooled >= 5.0).then_some(())
    })
    .await;
    app.shutdown().await.unwrap();
    let polls_before_restart = simulator.requests("Ticker");
    assert!(rows(&direct, "Ticker").await.is_empty(), "nothing reached the database during the outage");
    let spooled_files = std::fs::read_dir(spool.path()).unwrap().count();
    assert!(spooled_files > 0, "the remainder waits in the spool");

    proxy.restore();
    let mut second = config(&simulator.base_url(), "200ms", "150ms", false);
    second.database = database;
    let app = spawn_app(second).await;
    eventually(WAIT, "the first run's rows written by the second", || async {
        (rows(&direct, "Ticker").await.len() as u64 >= polls_before_restart).then_some(())
    })
    .await;
    app.shutdown().await.unwrap();
    assert_eq!(rows(&direct, "Ticker").await.len() as u64, simulator.requests("Ticker"), "each call exactly once");
}
