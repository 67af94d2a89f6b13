//! Nothing lost while the database is away, even to a SIGKILL: call-log rows and alert writes reach the fsync'd
//! spool within one flush interval; a write Postgres refuses for good is dropped and counted, never retried
//! forever; quarantined spool files can be inspected and replayed by an operator.

use std::path::Path;
use std::time::Duration;

use chrono::{DateTime, Utc};
use exwatch::simulator::Scenario;
use exwatch::store::alerts::{self, Op};
use exwatch::store::connector::Connector;
use exwatch::store::{self, CallRecord, Database, spool::Spool};
use tokio_util::sync::CancellationToken;

use crate::delivery::{Daemon, count, daemon_toml, webhook_sink};
use crate::helpers::{Capture, eventually, metric, start_simulator};
use crate::outage::proxied_postgres;
use crate::store::TestDatabase;

const WAIT: Duration = Duration::from_secs(60);

fn postgres_pool(database: &Database) -> &sqlx::PgPool {
    match database {
        Database::Postgres(pool) => pool,
        Database::Sqlite(_) => panic!("a Postgres test database"),
    }
}

/// The text of every spool file in `dir`, oldest first.
fn spool_text(dir: &Path) -> String {
    let mut files: Vec<_> =
        std::fs::read_dir(dir).map(|entries| entries.flatten().map(|entry| entry.path()).collect()).unwrap_or_default();
    files.retain(|path| path.file_name().is_some_and(|name| name.to_string_lossy().starts_with("spool-")));
    files.sort();
    files.iter().map(|path| std::fs::read_to_string(path).unwrap_or_default()).collect()
}

/// A daemon configuration polling every second, its database through `url`, its spool in `directory`.
fn write_daemon_config(directory: &Path, base_url: &str, url: &url::Url, sinks: &str) -> std::path::PathBuf {
    let section = format!("[database]\nurl = \"{url}\"\nspool_dir = \"{}\"\n", directory.join("spool").display());
    let path = directory.join("exwatch.toml");
    std::fs::write(&path, daemon_toml(base_url, &section, sinks)).unwrap();
    path
}

#[tokio::test]
async fn sigkill_during_a_database_cut_loses_at_most_the_rows_of_one_flush_interval() {
    crate::helpers::install_tls_provider();
    let simulator = start_simulator().await;
    let (url, direct, proxy, _cleanup) = proxied_postgres().await;
    let directory = tempfile::tempdir().unwrap();
    let config = write_daemon_config(directory.path(), &simulator.base_url(), &url, "");
    let pool = postgres_pool(&direct);
    let rows_before = |time: DateTime<Utc>| {
        sqlx::query_scalar::<_, i64>("SELECT COUNT(DISTINCT id) FROM api_call_logs WHERE created_at <= $1")
            .bind(time)
            .fetch_one(pool)
    };

    let first = Daemon::start(&config).await;
    eventually(WAIT, "rows written before the cut", || async {
        (rows_before(Utc::now()).await.unwrap() >= 4).then_some(())
    })
    .await;
    proxy.cut();
    let polls_at_cut = simulator.requests("Ticker");
    eventually(WAIT, "ten polls during the cut, spooled", || async {
        let spooled = first.metric("exwatch_store_spooled_rows", &[]).await;
        (simulator.requests("Ticker") >= polls_at_cut + 10 && spooled > 0.0).then_some(())
    })
    .await;
    first.kill().await;
    let killed_at = Utc::now();
    // Every call the simulator answered (or was answering) was a row the daemon made.
    let made = (simulator.requests("Ticker") + simulator.requests("SystemStatus")) as i64;

    proxy.restore();
    let second = Daemon::start(&config).await;
    eventually(WAIT, "the first run's spool written by the second", || async {
        (second.metric("exwatch_store_spooled_rows", &[]).await == 0.0).then_some(())
    })
    .await;
    let kept = rows_before(killed_at).await.unwrap();
    let lost = made - kept;
    // One flush interval at 1 s polls holds one poll's two rows; the poll in flight at the kill is two more.
    assert!((0..=4).contains(&lost), "{lost} rows lost of {made} ({kept} kept)");
    second.kill().await;
}

#[tokio::test]
async fn sigkill_during_a_database_cut_mid_incident_neither_pages_again_nor_forgets_the_resolve() {
    crate::helpers::install_tls_provider();
    let capture = Capture::default();
    let (webhook, _stop) = capture.serve().await;
    let simulator = start_simulator().await;
    let (url, direct, proxy, _cleanup) = proxied_postgres().await;
    let directory = tempfile::tempdir().unwrap();
    let config = write_daemon_config(directory.path(), &simulator.base_url(), &url, &webhook_sink(webhook, "/hook"));
    let alerts_spool = directory.path().join("spool").join(alerts::SPOOL_DIR);
    let pool = postgres_pool(&direct);
    let open_incidents = "SELECT COUNT(*) FROM incidents WHERE resolved_at IS NULL";
    let resolved_incidents = "SELECT COUNT(*) FROM incidents WHERE resolved_at IS NOT NULL";
    let firing_state = "SELECT COUNT(*) FROM alert_state WHERE instance = 'delivery-test'";
    let outbox = "SELECT COUNT(*) FROM alert_outbox";

    // The database is cut, then the exchange fails: the page goes out from memory, and every alert write
    // (incident, state, outbox row and its delivery) reaches the recorder's spool; then SIGKILL.
    let first = Daemon::start(&config).await;
    proxy.cut();
    simulator.set_scenario(Scenario::Maintenance);
    eventually(WAIT, "the firing webhook", || async { (!capture.webhooks("/hook").is_empty()).then_some(()) }).await;
    eventually(WAIT, "the firing's writes and its delivery spooled", || async {
        let text = spool_text(&alerts_spool);
        let spooled = ["incident_opened", "state_put", "outbox_put", "outbox_done"]
            .iter()
            .all(|op| text.contains(&format!("\"op\":\"{op}\"")));
        spooled.then_some(())
    })
    .await;
    assert!(first.metric("exwatch_alert_recorder_queue_depth", &[]).await >= 4.0);
    first.kill().await;
    assert_eq!(count(pool, open_incidents).await, 0, "nothing reached the database during the cut");

    // The database is back: the restart writes the spool before restoring, so the alert resumes silently.
    proxy.restore();
    let second = Daemon::start(&config).await;
    assert_eq!(count(pool, open_incidents).await, 1, "the incident row");
    assert_eq!(count(pool, firing_state).await, 1, "the alert state");
    assert_eq!(count(pool, outbox).await, 0, "the firing was delivered");
    let down = [("alertname", "exchange_api_down")];
    assert_eq!(second.metric("exwatch_alerts_firing", &down).await, 1.0, "restored at start");
    eventually(WAIT, "the breaker open again after three failed polls", || async {
        (second.metric("exwatch_circuit_breaker_state", &[("state", "open")]).await == 1.0).then_some(())
    })
    .await;
    assert_eq!(second.metric("exwatch_notifications_sent_total", &[("sink", "ops")]).await, 0.0, "no second page");

    // Cut again; the exchange recovers while the receiver is down: the resolve is made, not delivered, and its
    // writes reach the spool; SIGKILL again.
    proxy.cut();
    capture.set_down(true);
    simulator.set_scenario(Scenario::Healthy);
    eventually(WAIT, "the resolve's writes spooled", || async {
        let text = spool_text(&alerts_spool);
        (text.contains("\"op\":\"incident_resolved\"") && text.contains("\"kind\":\"resolved\"")).then_some(())
    })
    .await;
    second.kill().await;

    // Both back: the stored resolve is delivered, and the story is complete.
    proxy.restore();
    capture.set_down(false);
    let third = Daemon::start(&config).await;
    eventually(WAIT, "the resolve delivered after the restart", || async {
        (capture.webhooks("/hook").len() >= 2).then_some(())
    })
    .await;
    assert_eq!(
        capture.webhooks("/hook"),
        [
            ("firing".to_owned(), "exchange_api_down".to_owned()),
            ("resolved".to_owned(), "exchange_api_down".to_owned())
        ]
    );
    assert_eq!((count(pool, open_incidents).await, count(pool, resolved_incidents).await), (0, 1));
    assert_eq!(count(pool, firing_state).await, 0);
    eventually(WAIT, "the delivered resolve's row deleted", || async {
        (count(pool, outbox).await == 0).then_some(())
    })
    .await;
    third.kill().await;
}

/// A recorder on `database` (a migrated test database), its spool in `spool_dir`.
fn start_recorder(
    database: &store::Config,
    spool_dir: &Path,
) -> (alerts::Handle, prometheus::Registry, CancellationToken, tokio::task::JoinHandle<()>) {
    let registry = prometheus::Registry::new();
    let config = alerts::Config {
        flush_interval: Duration::from_millis(200),
        spool_dir: spool_dir.to_owned(),
        spool_max_bytes: 1 << 20,
    };
    let (handle, recorder) = alerts::channel(config, &registry).unwrap();
    let cancel = CancellationToken::new();
    let task = tokio::spawn(recorder.run(
        Connector::new(database.clone()),
        "recorder-test".to_owned(),
        cancel.clone(),
        Duration::from_secs(1),
    ));
    (handle, registry, cancel, task)
}

fn state_put(exchange: &str) -> Op {
    Op::StatePut { exchange: exchange.to_owned(), alertname: "exchange_api_down".to_owned(), payload: "{}".to_owned() }
}

async fn exchanges_in_state(pool: &sqlx::PgPool) -> Vec<String> {
    sqlx::query_scalar("SELECT exchange FROM alert_state ORDER BY exchange").fetch_all(pool).await.unwrap()
}

#[tokio::test]
async fn a_write_postgres_refuses_for_good_is_dropped_and_counted_and_the_writes_behind_it_go_on() {
    let (config, _cleanup) = TestDatabase::postgres_config().await;
    let database = Database::connect(&config).await.unwrap();
    let pool = postgres_pool(&database);
    // A statement Postgres refuses whatever the text: a check constraint (SQLSTATE 23514).
    sqlx::query("ALTER TABLE alert_state ADD CONSTRAINT no_poison CHECK (exchange <> 'poison')")
        .execute(pool)
        .await
        .unwrap();
    let spool = tempfile::tempdir().unwrap();
    let (handle, registry, cancel, task) = start_recorder(&config, spool.path());
    handle.send(state_put("poison"));
    handle.send(state_put("kraken"));
    handle.send(state_put("binance"));
    eventually(WAIT, "the writes behind the refused one", || async {
        (exchanges_in_state(pool).await == ["binance", "kraken"]).then_some(())
    })
    .await;
    let text = exwatch::telemetry::encode(&registry).unwrap();
    assert_eq!(metric(&text, "exwatch_alert_recorder_dropped_total", &[("reason", "rejected")]), Some(1.0), "{text}");
    assert_eq!(metric(&text, "exwatch_alert_recorder_queue_depth", &[]), Some(0.0));
    assert_eq!(metric(&text, "exwatch_alert_recorder_oldest_age_seconds", &[]), Some(0.0));
    cancel.cancel();
    task.await.unwrap();
}

#[tokio::test]
async fn alert_writes_reach_the_spool_while_the_database_is_away_and_are_recorded_in_order_when_it_returns() {
    let (url, direct, proxy, _cleanup) = proxied_postgres().await;
    let pool = postgres_pool(&direct);
    let config = store::Config { url: Some(exwatch::secret::Secret::new(url.to_string())), ..store::Config::default() };
    let spool = tempfile::tempdir().unwrap();
    let (handle, registry, cancel, task) = start_recorder(&config, spool.path());
    handle.send(state_put("before"));
    eventually(WAIT, "the first write", || async { (exchanges_in_state(pool).await == ["before"]).then_some(()) })
        .await;

    proxy.cut();
    handle.send(state_put("during"));
    handle.send(Op::StateClear { exchange: "before".to_owned(), alertname: "exchange_api_down".to_owned() });
    eventually(WAIT, "both writes on disk", || async {
        let text = spool_text(spool.path());
        (text.contains("\"exchange\":\"during\"") && text.contains("\"op\":\"state_clear\"")).then_some(())
    })
    .await;
    let text = exwatch::telemetry::encode(&registry).unwrap();
    assert_eq!(metric(&text, "exwatch_alert_recorder_queue_depth", &[]), Some(2.0), "{text}");
    assert!(metric(&text, "exwatch_alert_recorder_oldest_age_seconds", &[]).unwrap() > 0.0);

    proxy.restore();
    eventually(WAIT, "the spooled writes recorded in order", || async {
        (exchanges_in_state(pool).await == ["during"]).then_some(())
    })
    .await;
    eventually(WAIT, "the spool emptied", || async { spool_text(spool.path()).is_empty().then_some(()) }).await;
    cancel.cancel();
    task.await.unwrap();
}

fn call(number: i64) -> CallRecord {
    CallRecord {
        response_time: number,
        http_status: Some(200),
        ..CallRecord::new("kraken", "quarantine-test", "Ticker", Utc::now())
    }
}

#[tokio::test]
async fn spool_inspect_lists_a_quarantined_file_and_replay_writes_its_rows() {
    let directory = tempfile::tempdir().unwrap();
    let spool_dir = directory.path().join("spool");
    std::fs::create_dir_all(&spool_dir).unwrap();
    let rows = [call(1), call(2)];
    let lines: Vec<String> = rows.iter().map(|row| serde_json::to_string(row).unwrap()).collect();
    std::fs::write(spool_dir.join("spool-000001.jsonl"), format!("{}\nnot a row\n{}\n", lines[0], lines[1])).unwrap();
    // The writer's spool reads the file, gives up its readable rows, and moves it aside.
    let mut spool: Spool = Spool::open(&spool_dir, 1 << 20).unwrap();
    assert_eq!(spool.read_oldest(10).unwrap().len(), 2);
    spool.commit(2).unwrap();
    let quarantined = spool.take_quarantined();
    let file = quarantined[0].to.clone().expect("moved aside");
    let file = file.to_str().unwrap();

    let output = crate::cli::exwatch(&["spool", "inspect", file], directory.path()).await;
    assert_eq!(output.code, Some(0), "{}{}", output.stdout, output.stderr);
    let listed: Vec<&str> = output.stdout.lines().collect();
    assert!(listed[0].contains("call") && listed[0].contains(&rows[0].id.to_string()), "{}", output.stdout);
    assert!(listed[1].trim_start().starts_with("2  unreadable"), "{}", output.stdout);
    assert!(listed[2].contains(&rows[1].id.to_string()), "{}", output.stdout);
    assert!(
        listed[3].contains("3 lines: 2 call rows, 0 rejected rows, 0 alert writes, 1 unreadable"),
        "{}",
        output.stdout
    );

    let config = directory.path().join("exwatch.toml");
    let sqlite = directory.path().join("exwatch.sqlite");
    std::fs::write(&config, format!("[database]\nsqlite_path = \"{}\"\n", sqlite.display())).unwrap();
    let replay = ["spool", "replay", "--config", config.to_str().unwrap(), file];
    let output = crate::cli::exwatch(&replay, directory.path()).await;
    assert_eq!(output.code, Some(0), "{}{}", output.stdout, output.stderr);
    assert!(
        output.stdout.contains("2 call rows, 0 alert writes; 0 refused; 1 unreadable lines skipped"),
        "{}",
        output.stdout
    );
    let database = Database::connect(&store::Config { sqlite_path: sqlite, ..store::Config::default() }).await.unwrap();
    let Database::Sqlite(pool) = &database else { panic!("SQLite") };
    let written: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM api_call_logs").fetch_one(pool).await.unwrap();
    assert_eq!(written, 2);
}

/// Issue 11 item 8: a 900 kB Kraken error on every call, with the database cut for 60 s, used to grow RSS linearly
/// (251 MB in 70 s): every row carried the whole string and memory was bounded in rows only. Now the string is cut
/// to 1 KiB where the error is made and memory is bounded in bytes too.
#[tokio::test]
async fn an_oversized_error_keeps_memory_bounded_through_a_sixty_second_database_cut() {
    crate::helpers::install_tls_provider();
    let simulator = start_simulator().await;
    simulator.set_scenario(Scenario::OversizedError);
    let (url, direct, proxy, _cleanup) = proxied_postgres().await;
    let directory = tempfile::tempdir().unwrap();
    let config = write_daemon_config(directory.path(), &simulator.base_url(), &url, "");
    let daemon = Daemon::start(&config).await;
    eventually(WAIT, "a failed call logged before the cut", || async {
        (count(postgres_pool(&direct), "SELECT COUNT(*) FROM api_call_logs").await >= 2).then_some(())
    })
    .await;

    proxy.cut();
    let calls = || simulator.requests("SystemStatus") + simulator.requests("Ticker");
    let calls_at_cut = calls();
    let mut peak = 0.0_f64;
    let mut samples = tokio::time::interval(Duration::from_secs(2));
    let cut_for = tokio::time::Instant::now() + Duration::from_secs(60);
    while tokio::time::Instant::now() < cut_for {
        samples.tick().await;
        peak = peak.max(daemon.metric("process_resident_memory_bytes", &[]).await);
    }
    // While the breaker is open its 2 s timer brings a HALF_OPEN trial (a Ticker) every few seconds.
    let calls_in_cut = calls() - calls_at_cut;
    assert!(calls_in_cut >= 10, "the daemon kept calling through the cut: {calls_in_cut} calls");
    assert!(peak > 0.0 && peak < 40.0 * 1024.0 * 1024.0, "peak RSS {:.1} MB during the cut", peak / 1048576.0);

    proxy.restore();
    eventually(WAIT, "what the cut held back written", || async {
        (daemon.metric("exwatch_store_buffered_rows", &[]).await == 0.0
            && daemon.metric("exwatch_store_spooled_rows", &[]).await == 0.0)
            .then_some(())
    })
    .await;
    let longest: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(LENGTH(error_message)), 0)::bigint FROM api_call_logs")
        .fetch_one(postgres_pool(&direct))
        .await
        .unwrap();
    assert!((1..=1100).contains(&longest), "error messages are kept to about 1 KiB, longest {longest}");
    daemon.kill().await;
}
