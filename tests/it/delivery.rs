//! Delivery through real processes and sockets: `exwatch alerts test`, a real Alertmanager (Debian's
//! `prometheus-alertmanager`, cluster off, fast group timings) forwarding to the test's capture webhook, and the
//! daemon binary killed with SIGKILL mid-incident and started again on the same Postgres database.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use exwatch::alert::notification::Alert;
use exwatch::config::Config;
use exwatch::simulator::Scenario;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::{Child, Command};

use crate::helpers::{Capture, FAST_RATE_LIMIT, eventually, metric, scratch_database, spawn_app, start_simulator};
use crate::store::TestDatabase;

const WAIT: Duration = Duration::from_secs(60);

/// A daemon polling `base_url` every second, whose breaker waits 2 s in OPEN and whose deliveries retry fast.
pub(crate) fn daemon_toml(base_url: &str, database: &str, sinks: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\ninstance = \"delivery-test\"\nshutdown_grace = \"5s\"\n\
         [poll]\ninterval = \"1s\"\ntimeout = \"800ms\"\n{FAST_RATE_LIMIT}\
         [breaker]\nwait_duration_in_open = \"2s\"\n\
         [alerts.delivery]\ninitial_backoff = \"100ms\"\nmax_backoff = \"1s\"\n\
         [log]\nformat = \"json\"\n\
         [[exchanges]]\nname = \"kraken\"\nbase_url = \"{base_url}\"\n{database}{sinks}"
    )
}

pub(crate) fn webhook_sink(address: SocketAddr, path: &str) -> String {
    format!("[[alerts.sinks]]\nkind = \"webhook\"\nname = \"ops\"\nurl = \"http://{address}{path}\"\n")
}

#[tokio::test]
async fn alerts_test_sends_through_every_sink_and_reports_each() {
    let capture = Capture::default();
    let (address, _stop) = capture.serve().await;
    // A port nothing listens on: bound, then closed.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let directory = tempfile::tempdir().unwrap();
    let sinks = format!(
        "{}[[alerts.sinks]]\nkind = \"alertmanager\"\nname = \"am\"\nurls = [\"http://{closed}\"]\ntimeout = \"2s\"\n",
        webhook_sink(address, "/hook")
    );
    let config = daemon_toml("http://127.0.0.1:1", &scratch_database(), &sinks);
    std::fs::write(directory.path().join("exwatch.toml"), config).unwrap();
    let output = crate::cli::exwatch(&["alerts", "test", "--config", "exwatch.toml"], directory.path()).await;
    assert_eq!(output.code, Some(1), "one sink failed: {}{}", output.stdout, output.stderr);
    let lines: Vec<&str> = output.stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{}", output.stdout);
    assert!(lines[0].starts_with("ops: ok in "), "{}", output.stdout);
    assert!(lines[1].starts_with("am: FAILED in ") && lines[1].contains("connection refused"), "{}", output.stdout);
    let received = capture.received();
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].body["alerts"][0]["labels"]["alertname"], "exwatch_test");
    assert_eq!(received[0].body["version"], "4");
}

/// A process killed when dropped.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.start_kill();
    }
}

/// A free loopback port: bound, then released (Alertmanager takes no port 0).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A real Alertmanager on a free loopback port (cluster off, 1 s group timings) sending every group's
/// notifications, resolved ones included, to a capture webhook at `/am`; both stopped when dropped.
struct Alertmanager {
    _process: Process,
    _directory: tempfile::TempDir,
    _webhook: tokio_util::sync::DropGuard,
    url: String,
}

impl Alertmanager {
    async fn start() -> (Alertmanager, Capture) {
        crate::helpers::install_tls_provider();
        let capture = Capture::default();
        let (webhook, stop) = capture.serve().await;
        let binary = "prometheus-alertmanager";
        let directory = tempfile::tempdir().unwrap();
        let config = format!(
            "route:\n  receiver: capture\n  group_by: ['alertname', 'exchange']\n  group_wait: 1s\n  group_interval: 1s\n  \
         repeat_interval: 1h\nreceivers:\n  - name: capture\n    webhook_configs:\n      - url: 'http://{webhook}/am'\n        \
         send_resolved: true\n"
        );
        std::fs::write(directory.path().join("alertmanager.yml"), config).unwrap();
        let port = free_port();
        let child = Command::new(binary)
            .arg(format!("--config.file={}", directory.path().join("alertmanager.yml").display()))
            .arg(format!("--storage.path={}", directory.path().join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--cluster.listen-address=")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|error| panic!("{binary} must be installed (scripts/test.sh installs it): {error}"));
        let process = Process(child);
        let http = reqwest::Client::new();
        let url = format!("http://127.0.0.1:{port}");
        eventually(WAIT, "Alertmanager ready", || async {
            let ready = http.get(format!("{url}/-/ready")).send().await.ok()?;
            ready.status().is_success().then_some(())
        })
        .await;
        (Alertmanager { _process: process, _directory: directory, _webhook: stop.drop_guard(), url }, capture)
    }

    /// The `[[alerts.sinks]]` entry of an exwatch re-sending to it every second.
    fn sink(&self) -> String {
        format!(
            "[[alerts.sinks]]\nkind = \"alertmanager\"\nname = \"am\"\nurls = [\"{}\"]\nresend_interval = \"1s\"\n",
            self.url
        )
    }
}

#[tokio::test]
async fn a_real_alertmanager_forwards_the_alert_and_later_its_resolve() {
    let (alertmanager, capture) = Alertmanager::start().await;

    let simulator = start_simulator().await;
    let sinks = alertmanager.sink();
    let config = Config::from_toml(&daemon_toml(&simulator.base_url(), &scratch_database(), &sinks)).unwrap();
    let app = spawn_app(config).await;
    simulator.set_scenario(Scenario::Maintenance);

    let firing = eventually(WAIT, "the firing notification from Alertmanager", || async {
        capture.received().into_iter().find(|received| received.path == "/am" && received.body["status"] == "firing")
    })
    .await;
    let alert = &firing.body["alerts"][0];
    assert_eq!(
        alert["labels"],
        serde_json::json!({"alertname": "exchange_api_down", "severity": "critical", "exchange": "kraken", "service": "exwatch"})
    );
    assert_eq!(alert["annotations"]["scenario"], "maintenance");
    for annotation in ["summary", "description", "runbook_url", "evidence"] {
        assert!(
            alert["annotations"][annotation].as_str().is_some_and(|text| !text.is_empty()),
            "{annotation}: {alert}"
        );
    }
    // exwatch's own webhook payloads carry the fingerprint Alertmanager computes.
    let labels = serde_json::from_value(alert["labels"].clone()).unwrap();
    let ours = Alert {
        labels,
        annotations: Default::default(),
        starts_at: chrono::Utc::now(),
        ends_at: None,
        generator_url: String::new(),
    };
    assert_eq!(alert["fingerprint"].as_str(), Some(ours.fingerprint().as_str()));

    simulator.set_scenario(Scenario::Healthy);
    let resolved = eventually(WAIT, "the resolved notification from Alertmanager", || async {
        capture.received().into_iter().find(|received| received.path == "/am" && received.body["status"] == "resolved")
    })
    .await;
    assert_eq!(resolved.body["alerts"][0]["labels"], alert["labels"]);
    assert_eq!(resolved.body["alerts"][0]["startsAt"], alert["startsAt"]);
    // One episode: one firing and one resolved notification, re-sends deduplicated by Alertmanager.
    let statuses: Vec<Value> = capture.received().iter().map(|received| received.body["status"].clone()).collect();
    assert_eq!(statuses, ["firing", "resolved"]);
    app.shutdown().await.unwrap();
}

/// The daemon binary running one configuration file; its address read from its first log lines.
pub(crate) struct Daemon {
    _process: Process,
    address: SocketAddr,
}

impl Daemon {
    pub(crate) async fn start(config: &std::path::Path) -> Daemon {
        let mut child = Command::new(env!("CARGO_BIN_EXE_exwatch"))
            .arg("run")
            .arg("--config")
            .arg(config)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let address = tokio::time::timeout(WAIT, async {
            while let Some(line) = lines.next_line().await.unwrap() {
                let Ok(entry) = serde_json::from_str::<Value>(&line) else { continue };
                if entry["message"] == "exwatch is serving." {
                    return entry["address"].as_str().unwrap().parse::<SocketAddr>().unwrap();
                }
            }
            panic!("exwatch exited before serving");
        })
        .await
        .expect("exwatch serves within a minute");
        // Keep reading so the pipe never fills.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Daemon { _process: Process(child), address }
    }

    pub(crate) async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let url = format!("http://{}/metrics", self.address);
        let text = reqwest::get(url).await.unwrap().text().await.unwrap();
        metric(&text, name, labels).unwrap_or(0.0)
    }

    /// SIGKILL: no shutdown, nothing flushed.
    pub(crate) async fn kill(mut self) {
        self._process.0.start_kill().unwrap();
        self._process.0.wait().await.unwrap();
    }
}

#[tokio::test]
async fn killed_mid_incident_it_neither_pages_again_nor_forgets_to_resolve() {
    crate::helpers::install_tls_provider();
    let capture = Capture::default();
    let (webhook, _stop) = capture.serve().await;
    let simulator = start_simulator().await;
    let (database, _cleanup) = TestDatabase::postgres_config().await;
    let database_url = database.url.unwrap().expose().to_owned();
    let directory = tempfile::tempdir().unwrap();
    let spool = directory.path().join("spool");
    let section = format!("[database]\nurl = \"{database_url}\"\nspool_dir = \"{}\"\n", spool.display());
    let config = directory.path().join("exwatch.toml");
    std::fs::write(&config, daemon_toml(&simulator.base_url(), &section, &webhook_sink(webhook, "/hook"))).unwrap();
    let rows = sqlx::PgPool::connect(&database_url).await.unwrap();
    let firing_state = "SELECT COUNT(*) FROM alert_state WHERE instance = 'delivery-test'";
    let pending_resolves = "SELECT COUNT(*) FROM alert_outbox WHERE kind = 'resolved'";

    // The outage pages once.
    let first = Daemon::start(&config).await;
    record_outbox_deletions(&rows).await;
    simulator.set_scenario(Scenario::Maintenance);
    eventually(WAIT, "the firing webhook", || async { (!capture.webhooks("/hook").is_empty()).then_some(()) }).await;
    // Mid-incident: the firing is delivered and its delivery recorded (a crash between a delivery and its record
    // is the one window in which a notification is sent twice: delivery is at least once). Delivery does not wait
    // for the recorder, so the firing can reach the receiver before its `alert_outbox` row is even written: an
    // empty table does not tell "delivery recorded" from "not written yet" (killed then, the row is written just
    // before the kill and sent again after the restart). The row's deletion, committed, is the record.
    eventually(WAIT, "the firing alert stored and its delivery recorded", || async {
        let delivered = count(&rows, "SELECT COUNT(*) FROM test_outbox_deleted WHERE kind = 'firing'").await == 1;
        let pending = count(&rows, "SELECT COUNT(*) FROM alert_outbox").await;
        (delivered && pending == 0 && count(&rows, firing_state).await == 1).then_some(())
    })
    .await;
    first.kill().await;

    // Restarted mid-incident: the alert is restored as firing, the breaker opens again, and nothing is sent.
    let second = Daemon::start(&config).await;
    let down = [("alertname", "exchange_api_down")];
    assert_eq!(second.metric("exwatch_alerts_firing", &down).await, 1.0, "restored at start");
    eventually(WAIT, "the breaker open again after three failed polls", || async {
        (second.metric("exwatch_circuit_breaker_state", &[("state", "open")]).await == 1.0).then_some(())
    })
    .await;
    let ops = [("sink", "ops")];
    assert_eq!(second.metric("exwatch_alert_outbox_depth", &ops).await, 0.0, "nothing queued");
    assert_eq!(second.metric("exwatch_notifications_sent_total", &ops).await, 0.0, "nothing sent");

    // Kraken recovers while the receiver is down: the resolve is made and stored, but not delivered; then the
    // daemon is killed again.
    capture.set_down(true);
    simulator.set_scenario(Scenario::Healthy);
    eventually(WAIT, "the resolve stored undelivered", || async {
        (count(&rows, pending_resolves).await == 1 && count(&rows, firing_state).await == 0).then_some(())
    })
    .await;
    second.kill().await;

    // The receiver is back and the daemon restarts: the stored resolve arrives, and the story is complete.
    capture.set_down(false);
    let third = Daemon::start(&config).await;
    eventually(WAIT, "the resolve delivered after the restart", || async {
        (capture.webhooks("/hook").len() == 2).then_some(())
    })
    .await;
    assert_eq!(
        capture.webhooks("/hook"),
        [
            ("firing".to_owned(), "exchange_api_down".to_owned()),
            ("resolved".to_owned(), "exchange_api_down".to_owned())
        ]
    );
    assert_eq!(third.metric("exwatch_alerts_firing", &down).await, 0.0);
    eventually(WAIT, "the delivered row deleted", || async {
        (count(&rows, "SELECT COUNT(*) FROM alert_outbox").await == 0).then_some(())
    })
    .await;
    third.kill().await;
}

/// Test instrumentation of the daemon's database (migrated by the first start): every `alert_outbox` row deleted,
/// i.e. delivered, rejected or expired, is also written to `test_outbox_deleted` in the same transaction.
async fn record_outbox_deletions(pool: &sqlx::PgPool) {
    for statement in [
        "CREATE TABLE test_outbox_deleted (id text NOT NULL, kind text NOT NULL)",
        "CREATE FUNCTION test_outbox_deleted() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN INSERT INTO test_outbox_deleted VALUES (OLD.id, OLD.kind); RETURN OLD; END $$",
        "CREATE TRIGGER test_outbox_deleted AFTER DELETE ON alert_outbox \
         FOR EACH ROW EXECUTE FUNCTION test_outbox_deleted()",
    ] {
        sqlx::query(statement).execute(pool).await.unwrap();
    }
}

pub(crate) async fn count(pool: &sqlx::PgPool, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

/// Two replicas, each polling its own simulator, share a Postgres database and one real Alertmanager. The
/// exchange fails for both; replica 1 sees it recover first while replica 2 still sees it fail. Alertmanager must
/// not take replica 1's recovery as the end of the alert (and then page again on replica 2's next re-send): the
/// receiver gets exactly one firing and one resolved notification for the incident.
#[tokio::test]
async fn two_replicas_in_a_partial_failure_page_once_and_resolve_once_through_a_real_alertmanager() {
    let (alertmanager, capture) = Alertmanager::start().await;
    let (database, _cleanup) = TestDatabase::postgres_config().await;
    let database_url = database.url.unwrap().expose().to_owned();
    let directory = tempfile::tempdir().unwrap();
    let simulators = [start_simulator().await, start_simulator().await];
    let mut replicas = Vec::new();
    for (number, simulator) in simulators.iter().enumerate() {
        let spool = directory.path().join(format!("spool-{number}"));
        let section = format!("[database]\nurl = \"{database_url}\"\nspool_dir = \"{}\"\n", spool.display());
        let toml = daemon_toml(&simulator.base_url(), &section, &alertmanager.sink())
            .replace("instance = \"delivery-test\"", &format!("instance = \"replica-{number}\""));
        let config = directory.path().join(format!("replica-{number}.toml"));
        std::fs::write(&config, toml).unwrap();
        replicas.push(Daemon::start(&config).await);
    }
    let rows = sqlx::PgPool::connect(&database_url).await.unwrap();
    let statuses = || capture.received().iter().map(|received| received.body["status"].clone()).collect::<Vec<_>>();

    // Both replicas see the exchange fail: one alert (identical labels), one page.
    simulators.iter().for_each(|simulator| simulator.set_scenario(Scenario::Maintenance));
    eventually(WAIT, "the page from Alertmanager", || async { (statuses() == ["firing"]).then_some(()) }).await;
    eventually(WAIT, "both replicas' firing alert stored", || async {
        (count(&rows, "SELECT COUNT(*) FROM alert_state").await == 2).then_some(())
    })
    .await;

    // Replica 1 sees the recovery and resolves; replica 2 still fails and keeps re-sending.
    simulators[0].set_scenario(Scenario::Healthy);
    let (am, down) = ([("sink", "am")], [("alertname", "exchange_api_down")]);
    eventually(WAIT, "the alert resolved on replica 1", || async {
        (replicas[0].metric("exwatch_alerts_firing", &down).await == 0.0).then_some(())
    })
    .await;
    // A resolve that had gone out would have given a resolved notification and, on replica 2's next re-send, a
    // second page by the time replica 2 has re-sent three more times (Alertmanager groups every second).
    let sent = replicas[1].metric("exwatch_notifications_sent_total", &am).await;
    eventually(WAIT, "three more re-sends from replica 2", || async {
        (replicas[1].metric("exwatch_notifications_sent_total", &am).await >= sent + 3.0).then_some(())
    })
    .await;
    assert_eq!(statuses(), ["firing"], "no resolve and no second page while replica 2 still fails");
    assert_eq!(replicas[0].metric("exwatch_alert_outbox_held", &am).await, 1.0, "replica 1's resolve waits");
    assert_eq!(replicas[0].metric("exwatch_alert_outbox_depth", &am).await, 0.0, "and is no delivery backlog");

    // Replica 2 sees the recovery too: the last replica out ends the alert, and replica 1's resolve goes after.
    simulators[1].set_scenario(Scenario::Healthy);
    eventually(WAIT, "the resolved notification", || async { (statuses().len() == 2).then_some(()) }).await;
    eventually(WAIT, "replica 1's held resolve delivered", || async {
        let held = replicas[0].metric("exwatch_alert_outbox_held", &am).await;
        let depth = replicas[0].metric("exwatch_alert_outbox_depth", &am).await;
        (held == 0.0 && depth == 0.0).then_some(())
    })
    .await;
    assert_eq!(statuses(), ["firing", "resolved"]);
    assert_eq!(count(&rows, "SELECT COUNT(*) FROM alert_state").await, 0);
}

/// A sink added while an alert fires (and one whose URL changed) gets that firing after a restart; a sink that
/// already had it gets nothing new.
#[tokio::test]
async fn a_sink_added_while_firing_gets_the_firing_after_a_restart_and_the_old_sink_nothing_new() {
    let capture = Capture::default();
    let (webhook, _stop) = capture.serve().await;
    let simulator = start_simulator().await;
    let database = scratch_database();
    let sink =
        |name: &str, path: &str| webhook_sink(webhook, path).replace("name = \"ops\"", &format!("name = \"{name}\""));
    let before = format!("{}{}", sink("ops", "/ops"), sink("pager", "/pager"));
    let config = Config::from_toml(&daemon_toml(&simulator.base_url(), &database, &before)).unwrap();
    let app = spawn_app(config).await;
    simulator.set_scenario(Scenario::Maintenance);
    eventually(WAIT, "the firing at both sinks", || async {
        (capture.webhooks("/ops").len() == 1 && capture.webhooks("/pager").len() == 1).then_some(())
    })
    .await;
    app.shutdown().await.unwrap();

    // Restarted mid-incident with `pager` moved to another URL and a new sink `chat`.
    let after = format!("{}{}{}", sink("ops", "/ops"), sink("pager", "/pager-moved"), sink("chat", "/chat"));
    let config = Config::from_toml(&daemon_toml(&simulator.base_url(), &database, &after)).unwrap();
    let app = spawn_app(config).await;
    let firing = vec![("firing".to_owned(), "exchange_api_down".to_owned())];
    eventually(WAIT, "the firing at the moved and the new sink", || async {
        (capture.webhooks("/chat") == firing && capture.webhooks("/pager-moved") == firing).then_some(())
    })
    .await;
    assert_eq!(capture.webhooks("/ops"), firing, "the sink that had the firing gets nothing new");
    assert_eq!(capture.webhooks("/pager"), firing, "nothing goes to the old URL");
    let metrics = app.metrics().await;
    assert_eq!(metric(&metrics, "exwatch_notifications_sent_total", &[("sink", "ops")]), Some(0.0));
    assert_eq!(metric(&metrics, "exwatch_alert_outbox_depth", &[("sink", "ops")]), Some(0.0));
    assert_eq!(metric(&metrics, "exwatch_alerts_firing", &[("alertname", "exchange_api_down")]), Some(1.0));
    app.shutdown().await.unwrap();
}
