//! The binary's commands: probe, check-config and run, as on-call would type them.

use std::process::Stdio;
use std::time::Duration;

use exwatch::http::api::StatusResponse;
use exwatch::simulator::Scenario;
use tokio::process::Command;

use crate::helpers::{SIMULATOR_API_KEY, SIMULATOR_API_SECRET, start_simulator};
use crate::paused::{PausedDaemon, at};

const BINARY: &str = env!("CARGO_BIN_EXE_exwatch");

pub(crate) struct Output {
    pub(crate) code: Option<i32>,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
}

/// Runs the binary in `directory` with an empty environment (PATH only), as a fresh shell would.
pub(crate) async fn exwatch(arguments: &[&str], directory: &std::path::Path) -> Output {
    let output = Command::new(BINARY)
        .args(arguments)
        .current_dir(directory)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .stdin(Stdio::null())
        .output();
    let output = tokio::time::timeout(Duration::from_secs(60), output).await.expect("the command finishes").unwrap();
    Output {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

fn write_config(directory: &std::path::Path, base_url: &str, credentials: bool) -> String {
    let mut text = format!("[poll]\ntimeout = \"2s\"\n[[exchanges]]\nname = \"kraken\"\nbase_url = \"{base_url}\"\n");
    if credentials {
        text.push_str(&format!("api_key = \"{SIMULATOR_API_KEY}\"\napi_secret = \"{SIMULATOR_API_SECRET}\"\n"));
    }
    let path = directory.join("exwatch.toml");
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

#[tokio::test]
async fn probe_passes_against_a_healthy_exchange() {
    let simulator = start_simulator().await;
    let directory = tempfile::tempdir().unwrap();
    let config = write_config(directory.path(), &simulator.base_url(), true);
    let output = exwatch(&["probe", "--config", &config], directory.path()).await;
    assert_eq!(output.code, Some(0), "{}{}", output.stdout, output.stderr);
    let lines: Vec<&str> = output.stdout.lines().collect();
    assert!(lines[0].contains("Ticker") && lines[0].contains(" ok "), "{}", output.stdout);
    assert!(lines[1].contains("Balance") && lines[1].contains(" ok "), "{}", output.stdout);
    assert!(lines[2].contains("Depth") && lines[2].contains(" ok "), "{}", output.stdout);
    assert!(output.stdout.contains("kraken: all 3 steps passed"), "{}", output.stdout);
}

#[tokio::test]
async fn probe_fails_at_the_ticker_during_maintenance_and_stops_there() {
    let simulator = start_simulator().await;
    simulator.set_scenario(Scenario::Maintenance);
    let directory = tempfile::tempdir().unwrap();
    let config = write_config(directory.path(), &simulator.base_url(), true);
    let output = exwatch(&["probe", "--config", &config], directory.path()).await;
    assert_eq!(output.code, Some(1), "{}{}", output.stdout, output.stderr);
    assert!(output.stdout.contains("class=maintenance"), "{}", output.stdout);
    assert!(output.stdout.contains("EService:Unavailable"), "{}", output.stdout);
    assert!(output.stdout.contains("kraken: FAILED at Ticker"), "{}", output.stdout);
    assert!(!output.stdout.contains("Balance") && !output.stdout.contains("Depth"), "{}", output.stdout);
    assert_eq!(simulator.requests("Balance"), 0);
}

#[tokio::test]
async fn probe_fails_at_balance_with_an_invalid_key() {
    let simulator = start_simulator().await;
    simulator.set_scenario(Scenario::InvalidKey);
    let directory = tempfile::tempdir().unwrap();
    let config = write_config(directory.path(), &simulator.base_url(), true);
    let output = exwatch(&["probe", "--config", &config], directory.path()).await;
    assert_eq!(output.code, Some(1), "{}{}", output.stdout, output.stderr);
    assert!(output.stdout.contains("class=auth") && output.stdout.contains("EAPI:Invalid key"), "{}", output.stdout);
    assert!(output.stdout.contains("kraken: FAILED at Balance"), "{}", output.stdout);
    assert!(!output.stdout.contains(SIMULATOR_API_SECRET) && !output.stdout.contains(SIMULATOR_API_KEY));
}

#[tokio::test]
async fn check_config_prints_the_effective_configuration_with_secrets_redacted() {
    let directory = tempfile::tempdir().unwrap();
    let config = write_config(directory.path(), "http://127.0.0.1:1", true);
    let output = exwatch(&["check-config", "--config", &config], directory.path()).await;
    assert_eq!(output.code, Some(0), "{}", output.stderr);
    assert!(output.stdout.contains("listen = \"0.0.0.0:9750\""), "{}", output.stdout);
    assert!(output.stdout.contains("interval = \"30s\""), "{}", output.stdout);
    assert!(output.stdout.contains("[redacted]"), "{}", output.stdout);
    assert!(!output.stdout.contains(SIMULATOR_API_SECRET) && !output.stdout.contains(SIMULATOR_API_KEY));
}

#[tokio::test]
async fn check_config_names_every_bad_key_and_exits_non_zero() {
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("bad.toml");
    std::fs::write(&path, "[poll]\ninterval = \"often\"\n[server]\nlisten = \"here\"\nport = 1\n").unwrap();
    let output = exwatch(&["check-config", "--config", path.to_str().unwrap()], directory.path()).await;
    assert_eq!(output.code, Some(2));
    for key in ["`poll.interval`", "`server.listen`", "`server.port`: unknown key"] {
        assert!(output.stderr.contains(key), "{key} missing from {}", output.stderr);
    }
}

/// `exwatch run` with no file and no environment, inside a fresh network namespace that has only loopback: it must
/// start on its defaults (0.0.0.0:9750, SQLite later), serve `/health`, and stop cleanly on SIGTERM. The namespace
/// guarantees the default Kraken URL cannot be reached from a test.
#[tokio::test]
async fn run_with_no_configuration_serves_health_and_stops_on_sigterm() {
    let directory = tempfile::tempdir().unwrap();
    let script = format!(
        r#"set -u
ip link set lo up
"{BINARY}" run 2>daemon.log &
daemon=$!
healthy=no
for attempt in $(seq 1 200); do
  if curl -sf http://127.0.0.1:9750/health >health.json; then healthy=yes; break; fi
  sleep 0.05
done
kill -TERM "$daemon"
wait "$daemon"
echo "healthy=$healthy exit=$?"
"#
    );
    let output = Command::new("unshare")
        .args(["--net", "--", "bash", "-c", &script])
        .current_dir(directory.path())
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .output();
    let output = tokio::time::timeout(Duration::from_secs(60), output).await.expect("finishes").expect("unshare runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let log = std::fs::read_to_string(directory.path().join("daemon.log")).unwrap_or_default();
    assert!(
        stdout.contains("healthy=yes exit=0"),
        "stdout: {stdout}\nstderr: {}\nlog: {log}",
        String::from_utf8_lossy(&output.stderr)
    );
    let health = std::fs::read_to_string(directory.path().join("health.json")).unwrap();
    assert!(health.contains("\"status\":\"ok\""), "{health}");
    assert!(log.contains("Shutdown complete"), "{log}");
}

#[tokio::test]
async fn status_names_the_scenario_of_a_firing_alert_and_fails_when_the_daemon_is_unreachable() {
    let simulator = start_simulator().await;
    let app = crate::helpers::spawn_app(crate::helpers::config(&simulator.base_url(), "200ms", "150ms", false)).await;
    let directory = tempfile::tempdir().unwrap();
    let url = app.url("");
    let output = exwatch(&["status", "--url", &url], directory.path()).await;
    assert_eq!(output.code, Some(0), "{}", output.stderr);
    assert!(output.stdout.starts_with("kraken: UP; SystemStatus"), "{}", output.stdout);

    simulator.set_scenario(Scenario::Maintenance);
    crate::helpers::eventually(Duration::from_secs(15), "exchange_api_down firing", || async {
        let metrics = app.metrics().await;
        let firing = crate::helpers::metric(&metrics, "exwatch_alerts_firing", &[("alertname", "exchange_api_down")]);
        (firing == Some(1.0)).then_some(())
    })
    .await;
    let output = exwatch(&["status", "--url", &url], directory.path()).await;
    assert_eq!(output.code, Some(0), "{}", output.stderr);
    assert!(output.stdout.starts_with("kraken: DOWN; SystemStatus maintenance"), "{}", output.stdout);
    assert!(output.stdout.contains("FIRING exchange_api_down (critical)"), "{}", output.stdout);
    assert!(output.stdout.contains("scenario maintenance"), "{}", output.stdout);
    assert!(output.stdout.contains("evidence: last 5m:"), "{}", output.stdout);

    let json = exwatch(&["status", "--url", &url, "--json"], directory.path()).await;
    let answer: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    assert_eq!(answer["exchanges"][0]["active_alerts"][0]["scenario"], "maintenance");

    app.shutdown().await.unwrap();
    let output = exwatch(&["status", "--url", &url], directory.path()).await;
    assert_eq!(output.code, Some(1), "{}", output.stdout);
    assert!(output.stderr.contains("cannot read the status"), "{}", output.stderr);
}

#[tokio::test]
async fn run_exits_1_naming_the_address_when_server_listen_is_already_bound() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = taken.local_addr().unwrap();
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("exwatch.toml");
    std::fs::write(&path, format!("[server]\nlisten = \"{address}\"\n")).unwrap();
    let output = exwatch(&["run", "--config", path.to_str().unwrap()], directory.path()).await;
    assert_eq!(output.code, Some(1), "{}{}", output.stdout, output.stderr);
    assert!(output.stderr.contains(&format!("cannot listen on {address} (server.listen)")), "{}", output.stderr);
    drop(taken);
}

/// The status answer `exwatch status` reads is the daemon's, field for field: read as the CLI's type and written
/// back, it is the JSON the daemon served, so no field is served that the type does not carry.
#[tokio::test(start_paused = true)]
async fn the_daemons_status_reads_as_the_clis_type_with_every_field() {
    let start = tokio::time::Instant::now();
    let daemon = PausedDaemon::start_with("cli-status-round-trip-key", "").await;
    // Invalid-key answers pause private calls and fire exchange_api_down: every optional field has a value.
    daemon.simulator.set_scenario(Scenario::InvalidKey);
    at(start, Duration::from_secs(30)).await;
    let served = daemon.status_answer().await;
    let status: StatusResponse = serde_json::from_value(served.clone()).unwrap();
    assert_eq!(serde_json::to_value(&status).unwrap(), served);
    let kraken = &status.exchanges[0];
    assert_eq!(kraken.exchange, "kraken");
    assert!(!kraken.up, "{served}");
    assert_eq!(kraken.system_status.as_deref(), Some("online"), "{served}");
    assert!(kraken.schedule.is_some(), "{served}");
    assert!(kraken.rate_limit.private_pause_reason.is_some(), "{served}");
    assert!(kraken.rate_limit.private_paused_for_seconds.is_some(), "{served}");
    assert_eq!(kraken.active_alerts[0].alertname, "exchange_api_down", "{served}");
    daemon.stop().await;
}

/// A pod started from `deploy/kubernetes/secret.example.yaml` unchanged: the API key, its secret and the admin
/// token still hold the template's placeholders. The daemon starts, polls the public checks, never sends a Balance
/// call nor serves the admin API, and says what is not set in `/api/v1/status` and `exwatch status`;
/// `check-config` refuses the same settings, naming each key.
#[tokio::test]
async fn the_secret_templates_placeholders_start_a_daemon_that_reports_them_and_fail_check_config() {
    let simulator = start_simulator().await;
    let secrets = "api_key = \"REPLACE_WITH_KRAKEN_API_KEY\"\napi_secret = \"REPLACE_WITH_KRAKEN_API_SECRET_BASE64\"\n";
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_grace = \"5s\"\n[admin]\ntoken = \
         \"REPLACE_WITH_AT_LEAST_16_RANDOM_CHARACTERS\"\n[poll]\ninterval = \"200ms\"\ntimeout = \"150ms\"\n\
         balance_interval = \"200ms\"\n{}[[exchanges]]\nbase_url = \"{}\"\n{secrets}{}",
        crate::helpers::FAST_RATE_LIMIT,
        simulator.base_url(),
        crate::helpers::scratch_database()
    );
    let app = crate::helpers::spawn_app(exwatch::config::Config::from_toml(&text).unwrap()).await;
    crate::helpers::eventually(Duration::from_secs(15), "three polls", || async {
        (simulator.requests("Ticker") >= 3).then_some(())
    })
    .await;
    assert_eq!(simulator.requests("Balance"), 0, "no private call with a placeholder key");
    assert_eq!(app.get("/health").await.0, 200);
    assert_eq!(app.get("/api/admin/circuit-breaker/kraken").await.0, 404, "no admin API with a placeholder token");
    let (code, body) = app.get("/api/v1/status").await;
    assert_eq!(code, 200);
    let status: StatusResponse = serde_json::from_str(&body).unwrap();
    assert_eq!(status.placeholders.len(), 2, "{body}");
    assert!(status.placeholders[0].starts_with("`exchanges[0].api_key`/`exchanges[0].api_secret`"), "{body}");
    assert!(status.placeholders[1].starts_with("`admin.token`"), "{body}");
    assert!(!body.contains("REPLACE_WITH"), "placeholder values are never shown: {body}");
    let directory = tempfile::tempdir().unwrap();
    let output = exwatch(&["status", "--url", &app.url("")], directory.path()).await;
    assert!(output.stdout.starts_with("NOT SET: `exchanges[0].api_key`"), "{}", output.stdout);
    app.shutdown().await.unwrap();

    let path = directory.path().join("exwatch.toml");
    std::fs::write(&path, &text).unwrap();
    let output = exwatch(&["check-config", "--config", path.to_str().unwrap()], directory.path()).await;
    assert_eq!(output.code, Some(2), "{}", output.stdout);
    assert!(output.stderr.contains("`admin.token`: is still the placeholder"), "{}", output.stderr);
    assert!(output.stderr.contains("`exchanges[0].api_key`/`exchanges[0].api_secret`"), "{}", output.stderr);
}
