//! Incidents as the daemon writes them, on both backends: the row, the report and the breaker agree on what
//! happened, and exchange error text the database would refuse (a NUL) never stops incidents or alert state from
//! being recorded. Real time at 200 ms polls against the simulator on 127.0.0.1 (no paused clock: a database).

use std::time::Duration;

use exwatch::config::Config;
use exwatch::simulator::Scenario;
use exwatch::store::{self, Database};

use crate::helpers::{FAST_RATE_LIMIT, eventually, spawn_app, start_simulator};
use crate::store::TestDatabase;

/// A daemon polling `base_url` every 200 ms with a breaker that waits one second in OPEN, writing to `database`
/// (a `[database]` section).
fn config(base_url: &str, database: &str) -> Config {
    Config::from_toml(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_grace = \"5s\"\ninstance = \"it-incidents\"\n\
         [poll]\ninterval = \"200ms\"\ntimeout = \"200ms\"\n{FAST_RATE_LIMIT}\
         [breaker]\nwait_duration_in_open = \"1s\"\n\
         [[exchanges]]\nname = \"kraken\"\nbase_url = \"{base_url}\"\npair = \"XBTAUD\"\n{database}"
    ))
    .expect("valid test configuration")
}

/// The `[database]` section for a fresh Postgres database, and what drops it afterwards.
async fn postgres() -> (String, store::Config, crate::store::Cleanup) {
    let (config, cleanup) = TestDatabase::postgres_config().await;
    let url = config.url.as_ref().unwrap().expose().to_owned();
    let spool = std::env::temp_dir().join(format!("exwatch-it-{}", uuid::Uuid::now_v7()));
    let section = format!("[database]\nurl = \"{url}\"\nspool_dir = \"{}\"\n", spool.display());
    (section, config, cleanup)
}

/// The `[database]` section for a fresh SQLite file.
fn sqlite() -> (String, store::Config, tempfile::TempDir) {
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("exwatch.sqlite");
    let section = format!(
        "[database]\nsqlite_path = \"{}\"\nspool_dir = \"{}\"\n",
        path.display(),
        directory.path().join("spool").display()
    );
    (section, store::Config { sqlite_path: path, ..store::Config::default() }, directory)
}

async fn the_incident_row_and_its_report_agree(section: &str, store_config: &store::Config) {
    let simulator = start_simulator().await;
    let app = spawn_app(config(&simulator.base_url(), section)).await;
    let database = Database::connect(store_config).await.unwrap();
    simulator.set_scenario(Scenario::Maintenance);
    let id = eventually(Duration::from_secs(20), "an open incident", || async {
        database.open_incidents().await.unwrap().first().map(|incident| incident.id)
    })
    .await;
    // Let the breaker try and fail once, then let Kraken come back.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    simulator.set_scenario(Scenario::Healthy);
    eventually(Duration::from_secs(20), "the incident resolved", || async {
        database.incident(id).await.unwrap().filter(|incident| incident.resolved_at.is_some())
    })
    .await;
    // The call rows reach the database within a flush interval; then row and report agree exactly.
    let report = eventually(Duration::from_secs(20), "the report to agree with the incident row", || async {
        let report = database.incident_report(id).await.unwrap().unwrap();
        let incident = &report.incident;
        (report.total_calls > 0
            && (report.failed_calls, report.total_calls) == (incident.failed_calls as u64, incident.total_calls as u64))
            .then_some(report)
    })
    .await;
    let incident = &report.incident;
    // Three failed polls of two calls opened the breaker; the report starts at the first of them.
    assert!(report.failed_calls >= 6, "{report:?}");
    let first = report.first_error.as_ref().unwrap();
    assert!(first.created_at >= incident.started_at, "{report:?}");
    let opened_breaker = database.recent_calls("kraken", Duration::from_secs(600), 1000, true).await.unwrap();
    let earliest_failure = opened_breaker.iter().map(|call| call.created_at).min().unwrap();
    assert_eq!(first.created_at, earliest_failure, "no failure of the streak is left out");
    assert!(report.not_sent_calls > 0, "polls were refused while OPEN: {report:?}");
    assert!(incident.first_error.is_some(), "{incident:?}");
    assert!(incident.last_error.is_some(), "{incident:?}");
    // The calls the breaker refused, as exwatch_exchange_calls_total counts them, are the report's calls not sent.
    let metrics = app.metrics().await;
    let refused: f64 = ["Ticker", "SystemStatus", "Depth"]
        .iter()
        .filter_map(|endpoint| {
            let labels = [("endpoint", *endpoint), ("outcome", "not_permitted")];
            crate::helpers::metric(&metrics, "exwatch_exchange_calls_total", &labels)
        })
        .sum();
    assert_eq!(refused, report.not_sent_calls as f64, "{report:?}");
    app.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_incident_row_and_its_report_agree_on_sqlite() {
    let (section, store_config, _directory) = sqlite();
    the_incident_row_and_its_report_agree(&section, &store_config).await;
}

#[tokio::test]
async fn the_incident_row_and_its_report_agree_on_postgres() {
    let (section, store_config, _cleanup) = postgres().await;
    the_incident_row_and_its_report_agree(&section, &store_config).await;
}

#[tokio::test]
async fn a_nul_in_an_exchange_error_leaves_incidents_and_alert_state_recorded_on_postgres() {
    let (section, store_config, _cleanup) = postgres().await;
    let simulator = start_simulator().await;
    let app = spawn_app(config(&simulator.base_url(), &section)).await;
    let database = Database::connect(&store_config).await.unwrap();
    simulator.set_scenario(Scenario::NulError);
    // The incident records the error text with the NUL replaced (a call timed out under load is the only other
    // error it could show, so the text is looked for in its first or its latest error).
    let incident = eventually(Duration::from_secs(20), "an open incident with the error text", || async {
        database.open_incidents().await.unwrap().into_iter().next().filter(|incident| {
            [&incident.first_error, &incident.last_error].iter().any(|error| {
                error.as_deref().is_some_and(|error| error.contains("EGeneral:Internal error:\u{FFFD}nul"))
            })
        })
    })
    .await;
    assert_eq!(incident.alertname, "exchange_api_down");
    let state = eventually(Duration::from_secs(20), "the firing alert's state", || async {
        Some(database.alert_state("it-incidents").await.unwrap()).filter(|state| !state.is_empty())
    })
    .await;
    assert_eq!((state[0].0.as_str(), state[0].1.as_str()), ("kraken", "exchange_api_down"));
    // Later writes are not stuck behind it: the incident keeps counting, and its calls are logged.
    eventually(Duration::from_secs(20), "the incident's progress", || async {
        database.incident(incident.id).await.unwrap().filter(|incident| incident.total_calls > 6)
    })
    .await;
    let calls = database.recent_calls("kraken", Duration::from_secs(600), 10, true).await.unwrap();
    assert!(calls.iter().any(|call| call.exchange_error.as_deref() == Some("EGeneral:Internal error:\u{FFFD}nul")));
    app.shutdown().await.unwrap();
}

/// An incident told as a story, on `section`'s backend: the first failure, the breaker opening, the page fired and
/// delivered to the webhook, the recovery verification's steps, the breaker closing, the resolve and its delivery,
/// in order, from `GET /api/v1/incidents/{id}` and `exwatch incidents timeline ID`.
async fn the_timeline_tells_the_incident_in_order(section: &str, store_config: &store::Config) {
    let simulator = start_simulator().await;
    let capture = crate::helpers::Capture::default();
    let (receiver, _stop) = capture.serve().await;
    let sink = format!("[[alerts.sinks]]\nname = \"hook\"\nkind = \"webhook\"\nurl = \"http://{receiver}/hook\"\n");
    let app = spawn_app(config(&simulator.base_url(), &format!("{section}{sink}"))).await;
    let database = Database::connect(store_config).await.unwrap();
    simulator.set_scenario(Scenario::Maintenance);
    let id = eventually(Duration::from_secs(20), "an open incident", || async {
        database.open_incidents().await.unwrap().first().map(|incident| incident.id)
    })
    .await;
    simulator.set_scenario(Scenario::Healthy);
    eventually(Duration::from_secs(20), "the resolve delivered", || async {
        capture.webhooks("/hook").iter().any(|(status, _)| status == "resolved").then_some(())
    })
    .await;
    // The recorder writes the resolve's delivery shortly after it happens.
    let timeline = eventually(Duration::from_secs(20), "the resolve's delivery in the timeline", || async {
        let (code, body) = app.get(&format!("/api/v1/incidents/{id}")).await;
        assert_eq!(code, 200, "{body}");
        let timeline: serde_json::Value = serde_json::from_str(&body).unwrap();
        let delivered =
            |text: &str| {
                timeline["entries"].as_array().unwrap().iter().any(|entry| {
                    entry["kind"] == "delivery" && entry["detail"].as_str().unwrap_or_default().contains(text)
                })
            };
        delivered("resolved: delivered to hook").then_some(timeline)
    })
    .await;
    let entries = timeline["entries"].as_array().unwrap();
    let position = |kind: &str, text: &str| {
        entries
            .iter()
            .position(|entry| entry["kind"] == kind && entry["detail"].as_str().unwrap_or_default().contains(text))
            .unwrap_or_else(|| panic!("no {kind} event with {text:?} in {timeline:#}"))
    };
    let story = [
        position("failure", "first failure of the streak: maintenance"),
        position("breaker", "CLOSED -> OPEN"),
        position("alert", "exchange_api_down fired"),
        position("delivery", "exchange_api_down firing: delivered to hook"),
        position("verification", "recovery verification: Ticker passed"),
        position("breaker", "HALF_OPEN -> CLOSED"),
        position("alert", "exchange_api_down resolved"),
        position("delivery", "exchange_api_down resolved: delivered to hook"),
    ];
    assert!(story.is_sorted(), "out of order: {story:?} in {timeline:#}");
    let times: Vec<&str> = entries.iter().map(|entry| entry["at"].as_str().unwrap()).collect();
    assert!(times.is_sorted(), "{times:?}");
    assert_eq!(app.get("/api/v1/incidents/999999").await.0, 404);
    assert_eq!(app.get("/api/v1/incidents/one").await.0, 400);

    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("exwatch.toml");
    std::fs::write(&path, section).unwrap();
    let output = crate::cli::exwatch(
        &["incidents", "timeline", &id.to_string(), "--config", path.to_str().unwrap()],
        directory.path(),
    )
    .await;
    assert_eq!(output.code, Some(0), "{}", output.stderr);
    assert!(output.stdout.starts_with(&format!("Incident {id}: kraken exchange_api_down")), "{}", output.stdout);
    for text in ["first failure of the streak", "CLOSED -> OPEN", "exchange_api_down fired", "delivered to hook"] {
        assert!(output.stdout.contains(text), "{text:?} missing in:\n{}", output.stdout);
    }
    app.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_timeline_tells_the_incident_in_order_on_sqlite() {
    let (section, store_config, _directory) = sqlite();
    the_timeline_tells_the_incident_in_order(&section, &store_config).await;
}

#[tokio::test]
async fn the_timeline_tells_the_incident_in_order_on_postgres() {
    let (section, store_config, _cleanup) = postgres().await;
    the_timeline_tells_the_incident_in_order(&section, &store_config).await;
}
