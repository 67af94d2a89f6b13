//! The files under `deploy/` (dashboard, Prometheus rules and their tests, the PrometheusRule) name only metrics
//! that exwatch exports. The list of exported names comes from a running daemon's `/metrics`, so it cannot drift
//! from the code; the daemon is driven through a maintenance outage first, so series that appear only on an event
//! (breaker transitions) exist too.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use exwatch::simulator::Scenario;

use crate::helpers::{config, eventually, metric, spawn_app, start_simulator};

/// Every metric name `/metrics` declares, with the `_bucket`, `_sum` and `_count` series of histograms.
fn exported_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if let (Some("#"), Some("TYPE"), Some(name), Some(kind)) =
            (words.next(), words.next(), words.next(), words.next())
        {
            names.insert(name.to_owned());
            if kind == "histogram" || kind == "summary" {
                for suffix in ["_bucket", "_sum", "_count"] {
                    names.insert(format!("{name}{suffix}"));
                }
            }
        }
    }
    names
}

/// The metric names in `text` that exwatch exports: its own `exwatch_…` and the standard `process_…` ones. A name is
/// a lowercase word starting with one of the prefixes, not part of a longer name or of a recording rule's
/// `level:metric:operation`.
fn used_names(text: &str) -> BTreeSet<String> {
    let bytes = text.as_bytes();
    let mut names = BTreeSet::new();
    for prefix in ["exwatch_", "process_"] {
        let mut from = 0;
        while let Some(offset) = text[from..].find(prefix) {
            let start = from + offset;
            let joined = start > 0 && (bytes[start - 1].is_ascii_alphanumeric() || b"_:".contains(&bytes[start - 1]));
            let end = text[start..]
                .find(|character: char| {
                    !(character.is_ascii_lowercase() || character.is_ascii_digit() || character == '_')
                })
                .map_or(text.len(), |length| start + length);
            if !joined {
                names.insert(text[start..end].to_owned());
            }
            from = end.max(start + 1);
        }
    }
    names
}

fn files_under(directory: &Path, files: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(directory).expect("deploy/ is readable") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() { files_under(&path, files) } else { files.push(path) }
    }
}

#[test]
fn used_names_finds_metric_names_and_skips_longer_words() {
    let text = r#"rate(exwatch_exchange_calls_total{x="1"}[5m]) exwatch_up> EXWATCH__DB my_exwatch_x job:exwatch_y:sum
           process_open_fds{job="exwatch"} exwatch_process_x"#;
    assert_eq!(
        used_names(text),
        BTreeSet::from(
            ["exwatch_exchange_calls_total", "exwatch_process_x", "exwatch_up", "process_open_fds"].map(str::to_owned)
        )
    );
}

#[tokio::test]
async fn deploy_files_name_only_metrics_exwatch_exports() {
    let simulator = start_simulator().await;
    // A sink, so the delivery metrics (labelled by sink) have series; nothing listens on port 1.
    let mut config = config(&simulator.base_url(), "100ms", "90ms", true);
    let sink = "[[alerts.sinks]]\nkind = \"webhook\"\nurl = \"http://127.0.0.1:1/hook\"\n";
    config.alerts.sinks = exwatch::config::Config::from_toml(sink).unwrap().alerts.sinks;
    let app = spawn_app(config).await;
    let wait = Duration::from_secs(15);
    eventually(wait, "a successful poll", || async {
        let metrics = app.metrics().await;
        (metric(&metrics, "exwatch_exchange_up", &[("exchange", "kraken")]) == Some(1.0)).then_some(())
    })
    .await;
    simulator.set_scenario(Scenario::Maintenance);
    let metrics = eventually(wait, "the breaker to open (transitions are exported from then on)", || async {
        let metrics = app.metrics().await;
        metric(&metrics, "exwatch_circuit_breaker_transitions_total", &[("to", "open")]).is_some().then_some(metrics)
    })
    .await;
    let exported = exported_names(&metrics);

    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
    let mut files = Vec::new();
    files_under(&deploy, &mut files);
    let mut unknown: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut checked = BTreeSet::new();
    for file in &files {
        let text = std::fs::read_to_string(file).expect("deploy files are text");
        for name in used_names(&text) {
            if !exported.contains(&name) {
                let relative = file.strip_prefix(&deploy).unwrap_or(file).display().to_string();
                unknown.entry(name.clone()).or_default().insert(relative);
            }
            checked.insert(name);
        }
    }
    assert!(
        checked.len() >= 20 && checked.contains("exwatch_exchange_call_duration_seconds_bucket"),
        "the scan found too few names to be looking at the dashboard and rules: {checked:?}"
    );
    // The process metrics every exporter has are exported, and the dashboard shows them.
    for name in ["process_resident_memory_bytes", "process_cpu_seconds_total", "process_open_fds"] {
        assert!(exported.contains(name), "/metrics has no {name}");
        assert!(checked.contains(name), "deploy/ does not show {name}");
    }
    assert!(unknown.is_empty(), "deploy/ names metrics exwatch does not export: {unknown:#?}\nexported: {exported:#?}");
    app.shutdown().await.expect("an orderly shutdown");
}

/// The two paths of `exchange_api_slow`, exwatch's own rule and the backup rule in
/// `deploy/prometheus/rules/exchange-alerts.yml`, fed one mixed series each: polls every 30 s, one in two
/// succeeding and the other failing (the breaker stays closed). exwatch's rule gives the verdict; `promtool test
/// rules` must find the backup rule giving the same one. Slow failures (timeouts) must not page; slow successes
/// among fast failures must.
#[tokio::test]
async fn the_backup_slow_rule_agrees_with_exwatchs_own_on_mixed_series() {
    use exwatch::alert::rules::{Change, PollResult, SlowConfig, SlowRule};

    const POLLS: u32 = 20;
    // (exchange, latency of the successful calls, latency of the failed ones), in seconds.
    let cases = [("kraken", 1.0, 10.0), ("binance", 4.0, 0.1), ("bitstamp", 2.0, 2.0)];
    let start = tokio::time::Instant::now();
    let mut series = String::new();
    let mut expected = String::new();
    for (exchange, success, failure) in cases {
        let mut rule = SlowRule::new(SlowConfig::default());
        let mut fired = false;
        let (mut successes, mut failures) = (vec![0_u32], vec![0_u32]);
        for poll in 1..=POLLS {
            let now = start + Duration::from_secs(30) * poll;
            let result = if poll % 2 == 1 {
                PollResult::Succeeded { latencies: vec![Duration::from_secs_f64(success)] }
            } else {
                PollResult::Failed
            };
            fired |= matches!(rule.observe(now, &result, false), Some(Change::Fire { .. }));
            let (last_success, last_failure) = (*successes.last().unwrap(), *failures.last().unwrap());
            successes.push(last_success + u32::from(poll % 2 == 1));
            failures.push(last_failure + u32::from(poll % 2 == 0));
        }
        let values = |counts: &[u32], scale: f64| {
            counts.iter().map(|count| format!("{}", f64::from(*count) * scale)).collect::<Vec<_>>().join(" ")
        };
        let labels = format!(r#"job="exwatch", instance="a:9750", exchange="{exchange}", endpoint="Ticker""#);
        for (outcome, counts, latency) in [("success", &successes, success), ("failure", &failures, failure)] {
            series += &format!(
                "      - series: 'exwatch_exchange_call_duration_seconds_count{{{labels}, outcome=\"{outcome}\"}}'\n        values: '{}'\n\
                 \x20     - series: 'exwatch_exchange_call_duration_seconds_sum{{{labels}, outcome=\"{outcome}\"}}'\n        values: '{}'\n",
                values(counts, 1.0),
                values(counts, latency)
            );
        }
        let consecutive: Vec<&str> =
            (0..=POLLS).map(|poll| if poll > 0 && poll % 2 == 0 { "1" } else { "0" }).collect();
        series += &format!(
            "      - series: 'exwatch_circuit_breaker_consecutive_failures{{job=\"exwatch\", instance=\"a:9750\", exchange=\"{exchange}\"}}'\n        values: '{}'\n\
             \x20     - series: 'exwatch_circuit_breaker_state{{job=\"exwatch\", instance=\"a:9750\", exchange=\"{exchange}\", state=\"open\"}}'\n        values: '0x{POLLS}'\n",
            consecutive.join(" ")
        );
        if fired {
            expected += &format!(
                "          - exp_labels: {{severity: warning, exchange: {exchange}, service: exwatch}}\n            exp_annotations:\n\
                 \x20             summary: \"Exchange API Response Time Warning\"\n\
                 \x20             description: \"{exchange} API response time elevated: {success}s on average over 5 minutes (Prometheus backup rule).\"\n\
                 \x20             runbook_url: \"http://exwatch.exwatch.svc:9750/runbook\"\n"
            );
        }
    }
    assert!(expected.contains("binance") && !expected.contains("kraken"), "exwatch's own verdicts: {expected}");

    let rules = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus/rules/exchange-alerts.yml");
    let exp_alerts = if expected.is_empty() { " []\n".to_owned() } else { format!("\n{expected}") };
    let test = format!(
        "rule_files: ['{}']\nevaluation_interval: 30s\ntests:\n  - interval: 30s\n    input_series:\n{series}\
         \x20   alert_rule_test:\n      - eval_time: 10m\n        alertname: exchange_api_slow\n        exp_alerts:{exp_alerts}",
        rules.display()
    );
    let directory = tempfile::tempdir().unwrap();
    let file = directory.path().join("mixed.test.yml");
    std::fs::write(&file, &test).unwrap();
    let output = tokio::process::Command::new("promtool")
        .arg("test")
        .arg("rules")
        .arg(&file)
        .output()
        .await
        .expect("promtool is installed (Debian package `prometheus`; .ci/run installs it)");
    assert!(
        output.status.success(),
        "the backup rule disagrees with exwatch's own:\n{}{}\n{test}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
