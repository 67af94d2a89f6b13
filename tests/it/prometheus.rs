//! A real Prometheus (the Debian package's `/usr/bin/prometheus`) scrapes a running exwatch that polls the simulator,
//! with the backup rules of `deploy/prometheus/rules/exchange-alerts.yml`: the target is up, exwatch's series are
//! queryable, and the backup `exchange_api_down` goes pending, then firing, when the simulator switches to
//! maintenance. Everything listens on 127.0.0.1; Prometheus is killed when the test ends, pass or fail.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;

use crate::helpers::{config, eventually, spawn_app, start_simulator};

/// Prometheus applies new targets on a 5 s ticker, so the first scrape lands 5-7 s after start (real-clients.md).
const WAIT: Duration = Duration::from_secs(60);

/// The backup rules with every `for:` shortened, so the test sees pending and firing in seconds; the expressions,
/// names and labels are the deployed ones.
fn backup_rules_with_short_for() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus/rules/exchange-alerts.yml");
    let rules = std::fs::read_to_string(&path).expect("the backup rules exist");
    assert!(rules.contains("        for: 1m\n"), "exchange-alerts.yml changed its `for:`; update this test");
    rules.replace("        for: 1m\n", "        for: 3s\n")
}

/// A Prometheus process on a free loopback port, killed on drop.
struct Prometheus {
    url: String,
    log: PathBuf,
    _child: tokio::process::Child,
    _directory: tempfile::TempDir,
    http: reqwest::Client,
}

impl Prometheus {
    async fn start(exwatch: &str) -> Prometheus {
        let directory = tempfile::tempdir().expect("a temporary directory");
        std::fs::write(directory.path().join("exchange-alerts.yml"), backup_rules_with_short_for()).unwrap();
        let configuration = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\n  evaluation_interval: 1s\n\
             rule_files: [exchange-alerts.yml]\n\
             scrape_configs:\n  - job_name: exwatch\n    static_configs:\n      - targets: ['{exwatch}']\n"
        );
        std::fs::write(directory.path().join("prometheus.yml"), configuration).unwrap();
        // A free port: bound, read and released; Prometheus binds it a moment later.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let log = directory.path().join("prometheus.log");
        let log_file = std::fs::File::create(&log).unwrap();
        let child = tokio::process::Command::new("prometheus")
            .arg(format!("--config.file={}", directory.path().join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", directory.path().join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file)
            .kill_on_drop(true)
            .spawn()
            .expect("prometheus is installed (Debian package `prometheus`; scripts/test.sh installs it)");
        let prometheus = Prometheus {
            url: format!("http://127.0.0.1:{port}"),
            log,
            _child: child,
            _directory: directory,
            http: reqwest::Client::new(),
        };
        eventually(WAIT, "Prometheus to be ready", || async {
            let answer = prometheus.http.get(format!("{}/-/ready", prometheus.url)).send().await.ok()?;
            answer.status().is_success().then_some(())
        })
        .await;
        prometheus
    }

    /// `data` of a successful API answer, or `None` (not answering yet, or an error).
    async fn api(&self, path: &str, query: &[(&str, &str)]) -> Option<Value> {
        // reqwest is built without its `query` feature: the url crate encodes the parameters.
        let url = url::Url::parse_with_params(&format!("{}{path}", self.url), query).expect("a valid URL");
        let answer = self.http.get(url).send().await.ok()?;
        let body: Value = serde_json::from_str(&answer.text().await.ok()?).ok()?;
        (body["status"] == "success").then(|| body["data"].clone())
    }

    async fn query(&self, expression: &str) -> Vec<Value> {
        self.api("/api/v1/query", &[("query", expression)])
            .await
            .and_then(|data| data["result"].as_array().cloned())
            .unwrap_or_default()
    }

    /// The backup `exchange_api_down` alert in `state`, if Prometheus shows it.
    async fn down_alert(&self, state: &str) -> Option<Value> {
        let data = self.api("/api/v1/alerts", &[]).await?;
        data["alerts"]
            .as_array()?
            .iter()
            .find(|alert| alert["labels"]["alertname"] == "exchange_api_down" && alert["state"] == state)
            .cloned()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

#[tokio::test]
async fn prometheus_scrapes_exwatch_and_the_backup_down_rule_fires_when_kraken_goes_into_maintenance() {
    let simulator = start_simulator().await;
    let app = spawn_app(config(&simulator.base_url(), "1s", "900ms", false)).await;
    let prometheus = Prometheus::start(&app.address.to_string()).await;

    let target = eventually(WAIT, "the exwatch target to be up", || async {
        let data = prometheus.api("/api/v1/targets", &[("state", "active")]).await?;
        let target = data["activeTargets"].as_array()?.first()?.clone();
        (target["health"] == "up").then_some(target)
    })
    .await;
    assert_eq!(target["labels"]["job"], "exwatch", "{target}");
    assert_eq!(target["scrapeUrl"], format!("http://{}/metrics", app.address), "{target}");

    let up = eventually(WAIT, "exwatch_exchange_up{exchange=\"kraken\"} == 1 in Prometheus", || async {
        let result = prometheus.query(r#"exwatch_exchange_up{job="exwatch",exchange="kraken"} == 1"#).await;
        (!result.is_empty()).then_some(result)
    })
    .await;
    assert_eq!(up[0]["metric"]["instance"], app.address.to_string());
    for series in [
        "exwatch_build_info",
        r#"exwatch_exchange_calls_total{endpoint="Ticker",outcome="success"}"#,
        r#"exwatch_exchange_call_duration_seconds_bucket{le="3"}"#,
        r#"exwatch_circuit_breaker_state{state="closed"} == 1"#,
        "exwatch_store_database_up",
        r#"exwatch_alerts_firing{alertname="exchange_api_down"} == 0"#,
    ] {
        assert!(!prometheus.query(series).await.is_empty(), "no {series} in Prometheus");
    }
    let rules = prometheus.api("/api/v1/rules", &[]).await.expect("the rules API answers");
    let names: Vec<&str> =
        rules["groups"][0]["rules"].as_array().unwrap().iter().filter_map(|rule| rule["name"].as_str()).collect();
    assert_eq!(names, ["exchange_api_down", "exchange_api_slow"], "{rules}");
    assert!(prometheus.down_alert("pending").await.is_none() && prometheus.down_alert("firing").await.is_none());

    // The drill an operator would run: switch the simulator through its control endpoint.
    let answer = reqwest::Client::new()
        .put(format!("{}/__exwatch/simulator", simulator.base_url()))
        .header("content-type", "application/json")
        .body(r#"{"scenario":"maintenance"}"#)
        .send()
        .await
        .unwrap();
    assert!(answer.status().is_success(), "{}", answer.status());

    // Pending first (the condition holds, `for:` not yet elapsed), then firing; either may be missed between two
    // looks, so pending is accepted as seen when firing arrives with an activeAt before its firing.
    let pending_or_firing = eventually(WAIT, "the backup exchange_api_down to go pending or firing", || async {
        match prometheus.down_alert("pending").await {
            Some(alert) => Some(alert),
            None => prometheus.down_alert("firing").await,
        }
    })
    .await;
    let firing =
        eventually(WAIT, "the backup exchange_api_down to fire", || async { prometheus.down_alert("firing").await })
            .await;
    // exwatch's own alerts carry exactly these labels; equal label sets are what lets Alertmanager merge both paths.
    let labels = firing["labels"].as_object().unwrap();
    let mut keys: Vec<&str> = labels.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["alertname", "exchange", "service", "severity"], "{firing}");
    assert_eq!(firing["labels"]["exchange"], "kraken");
    assert_eq!(firing["labels"]["severity"], "critical");
    assert_eq!(firing["labels"]["service"], "exwatch");
    assert_eq!(pending_or_firing["activeAt"], firing["activeAt"], "one alert went pending, then fired");
    assert!(
        !prometheus.query(r#"exwatch_exchange_calls_total{error_class="maintenance"} > 0"#).await.is_empty(),
        "maintenance failures are visible in Prometheus too; log:\n{}",
        prometheus.log()
    );

    drop(prometheus);
    app.shutdown().await.expect("an orderly shutdown");
}
