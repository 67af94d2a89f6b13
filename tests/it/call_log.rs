//! The call log as on-call reads it: the daemon polls the simulator, healthy then in maintenance, logging to
//! Postgres or SQLite, and the runbook's query returns exactly those calls with their flags, latencies and messages.

use std::time::Duration;

use exwatch::simulator::Scenario;
use exwatch::store::{self, Database};

use crate::helpers::{config, eventually, metric, spawn_app, start_simulator};
use crate::store::{TestDatabase, runbook_query};

const WAIT: Duration = Duration::from_secs(30);

async fn polls_then_runbook_query(database: store::Config) {
    let simulator = start_simulator().await;
    let mut config = config(&simulator.base_url(), "200ms", "150ms", false);
    let spool = tempfile::tempdir().unwrap();
    config.database = database.clone();
    config.database.writer.flush_interval = Duration::from_millis(50);
    config.database.writer.spool_dir = spool.path().join("spool");
    let app = spawn_app(config).await;
    let calls = |metrics: &str, outcome: &str, class: &str| {
        let labels = [("endpoint", "Ticker"), ("outcome", outcome), ("error_class", class)];
        metric(metrics, "exwatch_exchange_calls_total", &labels).unwrap_or(0.0)
    };
    eventually(WAIT, "two healthy polls", || async {
        (calls(&app.metrics().await, "success", "none") >= 2.0).then_some(())
    })
    .await;
    simulator.set_scenario(Scenario::Maintenance);
    eventually(WAIT, "two polls in maintenance", || async {
        (calls(&app.metrics().await, "failure", "maintenance") >= 2.0).then_some(())
    })
    .await;
    app.shutdown().await.unwrap();

    let database = Database::connect(&database).await.unwrap();
    let rows = runbook_query(&database).await;
    let polls = simulator.requests("Ticker") + simulator.requests("SystemStatus");
    assert_eq!(rows.len() as u64, polls, "every call is a row: {rows:#?}");
    assert!(rows.windows(2).all(|pair| pair[0].4 >= pair[1].4), "newest first: {rows:#?}");
    // The newest rows are the maintenance ones: failed, with Kraken's error or the status as the message.
    let (endpoint, success, response_time, message, _) = rows.iter().find(|row| row.0 == "Ticker").unwrap();
    assert_eq!((endpoint.as_str(), *success), ("Ticker", false));
    assert!(*response_time >= 0 && *response_time < 150, "{response_time}");
    assert!(message.as_deref().unwrap().contains("EService:Unavailable"), "{message:?}");
    let status = rows.iter().find(|row| row.0 == "SystemStatus").unwrap();
    assert!(!status.1 && status.3.as_deref().unwrap().contains("system status maintenance"), "{status:?}");
    // The oldest are the healthy polls: successes without a message.
    let oldest = rows.last().unwrap();
    assert!(oldest.1 && oldest.3.is_none(), "{oldest:?}");
    let failures = database.recent_calls("kraken", Duration::from_secs(1800), 1000, true).await.unwrap();
    assert!(failures.iter().all(|row| row.error_class.as_deref() == Some("maintenance")), "{failures:#?}");
    assert!(failures.iter().any(|row| row.exchange_error.as_deref() == Some("EService:Unavailable")));
}

#[tokio::test]
async fn postgres_holds_every_polled_call_for_the_runbook_query() {
    let (database, _cleanup) = TestDatabase::postgres_config().await;
    polls_then_runbook_query(database).await;
}

#[tokio::test]
async fn sqlite_holds_every_polled_call_for_the_runbook_query() {
    let directory = tempfile::tempdir().unwrap();
    let database = store::Config { sqlite_path: directory.path().join("exwatch.sqlite"), ..store::Config::default() };
    polls_then_runbook_query(database).await;
}

/// Maintenance opens the breaker and fires exchange_api_down, which opens an incident; recovery resolves both.
async fn an_outage_is_an_incident_with_start_end_and_scenario(database: store::Config) {
    let simulator = start_simulator().await;
    let mut config = config(&simulator.base_url(), "200ms", "150ms", false);
    let spool = tempfile::tempdir().unwrap();
    config.database = database.clone();
    config.database.writer.spool_dir = spool.path().join("spool");
    config.breaker.wait_duration_in_open = Duration::from_secs(1);
    let app = spawn_app(config).await;
    let firing = |metrics: &str| metric(metrics, "exwatch_alerts_firing", &[("alertname", "exchange_api_down")]);
    simulator.set_scenario(Scenario::Maintenance);
    eventually(WAIT, "exchange_api_down firing", || async {
        (firing(&app.metrics().await) == Some(1.0)).then_some(())
    })
    .await;
    simulator.set_scenario(Scenario::Healthy);
    eventually(WAIT, "exchange_api_down resolved", || async {
        (firing(&app.metrics().await) == Some(0.0)).then_some(())
    })
    .await;
    let database = Database::connect(&database).await.unwrap();
    let incidents = eventually(WAIT, "the incident closed in the database", || async {
        let incidents = database.list_incidents(Duration::from_secs(3600)).await.unwrap();
        incidents
            .iter()
            .all(|incident| incident.resolved_at.is_some())
            .then_some(incidents)
            .filter(|list| !list.is_empty())
    })
    .await;
    app.shutdown().await.unwrap();
    assert_eq!(incidents.len(), 1, "{incidents:#?}");
    let incident = &incidents[0];
    assert_eq!((incident.provider.as_str(), incident.alertname.as_str()), ("kraken", "exchange_api_down"));
    assert_eq!(incident.scenario, "maintenance");
    assert!(incident.resolved_at.unwrap() > incident.started_at);
    assert!(incident.first_error.as_deref().unwrap_or_default().contains("maintenance"), "{incident:?}");
}

#[tokio::test]
async fn postgres_records_an_outage_as_an_incident() {
    let (database, _cleanup) = TestDatabase::postgres_config().await;
    an_outage_is_an_incident_with_start_end_and_scenario(database).await;
}

#[tokio::test]
async fn sqlite_records_an_outage_as_an_incident() {
    let directory = tempfile::tempdir().unwrap();
    let database = store::Config { sqlite_path: directory.path().join("exwatch.sqlite"), ..store::Config::default() };
    an_outage_is_an_incident_with_start_end_and_scenario(database).await;
}
