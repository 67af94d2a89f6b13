//! What Kraken itself says, beside exwatch's verdict: the daemon watching the simulator's Statuspage over HTTP, as
//! on-call reads it from `GET /api/v1/exchanges/{name}/exchange-status` and `/metrics`, and what it keeps when the
//! page fails in every way a page can.

use std::time::Duration;

use exwatch::config::Config;
use serde_json::Value;

use crate::helpers::{FAST_RATE_LIMIT, eventually, metric, scratch_database, spawn_app, start_simulator};

const WAIT: Duration = Duration::from_secs(15);

fn config(base_url: &str) -> Config {
    Config::from_toml(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_grace = \"5s\"\n\
         [poll]\ninterval = \"1s\"\ntimeout = \"1s\"\n{FAST_RATE_LIMIT}\
         [status_sources]\nstatuspage_interval = \"1s\"\ntimeout = \"1s\"\nstale_after = \"3s\"\n\
         [[exchanges]]\nname = \"kraken\"\nbase_url = \"{base_url}\"\n\
         statuspage_url = \"{base_url}/__statuspage/kraken\"\nstatuspage_page_id = \"lfz25gyhcpjf\"\n{}",
        scratch_database()
    ))
    .expect("valid test configuration")
}

async fn set_page(simulator: &exwatch::simulator::Simulator, body: &str) {
    crate::helpers::install_tls_provider();
    let answer = reqwest::Client::new()
        .put(format!("{}/__exwatch/simulator/statuspage", simulator.base_url()))
        .body(body.to_owned())
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200, "{}", answer.text().await.unwrap_or_default());
}

#[tokio::test]
async fn a_minor_indicator_and_a_degraded_rest_component_show_within_one_interval() {
    let simulator = start_simulator().await;
    set_page(
        &simulator,
        r#"{"indicator":"minor","description":"Minor Service Outage",
            "components":[{"name":"REST","status":"degraded_performance"},{"name":"WebSocket","status":"operational"}],
            "incidents":[{"name":"Elevated API error rates","body":"We are looking into it."}]}"#,
    )
    .await;
    let app = spawn_app(config(&simulator.base_url())).await;
    let said = eventually(WAIT, "the page's summary", || async {
        let (code, body) = app.get("/api/v1/exchanges/kraken/exchange-status").await;
        assert_eq!(code, 200, "{body}");
        let said: Value = serde_json::from_str(&body).unwrap();
        (said["statuspage"]["summary"]["indicator"] == "minor").then_some(said)
    })
    .await;
    let page = &said["statuspage"];
    assert_eq!(page["stale"], false, "{said:#}");
    assert_eq!(page["summary"]["components"][0]["status"], "degraded_performance", "{said:#}");
    assert_eq!(page["summary"]["incidents"][0]["last_update"]["body"], "We are looking into it.", "{said:#}");
    let metrics = app.metrics().await;
    let degraded = [("exchange", "kraken"), ("component", "REST"), ("status", "degraded_performance")];
    assert_eq!(metric(&metrics, "exwatch_statuspage_component_status", &degraded), Some(1.0));
    assert_eq!(metric(&metrics, "exwatch_statuspage_indicator", &[("indicator", "minor")]), Some(1.0));
    assert_eq!(metric(&metrics, "exwatch_statuspage_unresolved_incidents", &[]), Some(1.0));
    assert_eq!(app.get("/api/v1/exchanges/nope/exchange-status").await.0, 404);

    // On-call reads it without curl: `exwatch exchange-status`, and a line of `exwatch status`.
    let directory = tempfile::tempdir().unwrap();
    let url = app.url("");
    let said = "Kraken says: Minor Service Outage (minor); REST degraded_performance; incident \"Elevated API error \
                rates\" identified, major https://stspg.io/sim0";
    let output =
        crate::cli::exwatch(&["exchange-status", "--url", &url, "--exchange", "kraken"], directory.path()).await;
    assert_eq!(output.code, Some(0), "{}", output.stderr);
    assert!(output.stdout.starts_with("kraken: SystemStatus online (from rest)\n"), "{}", output.stdout);
    assert!(output.stdout.contains(said), "{}", output.stdout);
    let output = crate::cli::exwatch(&["status", "--url", &url], directory.path()).await;
    assert!(output.stdout.contains(&format!("  {said}\n")), "{}", output.stdout);
    app.shutdown().await.unwrap();
}

/// Every fault is counted by its outcome, the daemon keeps serving the last good summary, and that summary turns
/// stale after `stale_after` without a good fetch.
#[tokio::test]
async fn a_failing_page_is_counted_and_its_last_good_summary_kept_then_marked_stale() {
    let simulator = start_simulator().await;
    set_page(&simulator, r#"{"indicator":"major"}"#).await;
    let app = spawn_app(config(&simulator.base_url())).await;
    eventually(WAIT, "a first good summary", || async {
        let metrics = app.metrics().await;
        (metric(&metrics, "exwatch_statuspage_up", &[("exchange", "kraken")]) == Some(1.0)).then_some(())
    })
    .await;
    for (fault, outcome) in [
        ("500", "http_error"),
        ("html", "bad_response"),
        ("truncated", "bad_response"),
        ("wrong_page_id", "wrong_page"),
        ("oversized", "too_large"),
        ("slow", "timeout"),
    ] {
        set_page(&simulator, &format!(r#"{{"fault":"{fault}"}}"#)).await;
        let labels = [("exchange", "kraken"), ("outcome", outcome)];
        let before = metric(&app.metrics().await, "exwatch_statuspage_fetches_total", &labels).unwrap_or(0.0);
        eventually(WAIT, &format!("a {fault} fetch counted as {outcome}"), || async {
            let counted = metric(&app.metrics().await, "exwatch_statuspage_fetches_total", &labels).unwrap_or(0.0);
            (counted > before).then_some(())
        })
        .await;
        let (code, body) = app.get("/api/v1/exchanges/kraken/exchange-status").await;
        assert_eq!(code, 200, "{body}");
        let said: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(said["statuspage"]["summary"]["indicator"], "major", "{fault}: the last good summary is kept");
        assert_eq!(said["statuspage"]["last_outcome"], outcome, "{fault}");
    }
    eventually(WAIT, "the kept summary marked stale", || async {
        let said: Value = serde_json::from_str(&app.get("/api/v1/exchanges/kraken/exchange-status").await.1).unwrap();
        (said["statuspage"]["stale"] == true).then_some(())
    })
    .await;
    assert_eq!(app.get("/health").await.0, 200, "a failing page is never the daemon's failure");
    app.shutdown().await.unwrap();
}

/// Kraken unavailable while it acknowledges an unplanned incident (SystemStatus `emergency[]`): the page says so
/// (`acknowledged_by_exchange="true"`) and quotes the incident with its link in the evidence. Without the
/// incident, the annotation is absent.
#[tokio::test]
async fn an_incident_kraken_acknowledges_is_quoted_in_the_page_and_flagged() {
    for acknowledged in [true, false] {
        let simulator = start_simulator().await;
        let incidents = if acknowledged {
            r#"[{"name":"Elevated API error rates","status":"identified","impact":"critical"}]"#
        } else {
            "[]"
        };
        set_page(&simulator, &format!(r#"{{"incidents":{incidents}}}"#)).await;
        simulator.set_scenario(exwatch::simulator::Scenario::Unavailable);
        let capture = crate::helpers::Capture::default();
        let (receiver, _stop) = capture.serve().await;
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_grace = \"5s\"\n[poll]\ninterval = \"200ms\"\n\
             timeout = \"200ms\"\n{FAST_RATE_LIMIT}[[exchanges]]\nname = \"kraken\"\nbase_url = \"{}\"\n\
             [[alerts.sinks]]\nname = \"hook\"\nkind = \"webhook\"\nurl = \"http://{receiver}/hook\"\n{}",
            simulator.base_url(),
            scratch_database()
        );
        let app = spawn_app(Config::from_toml(&text).unwrap()).await;
        let page = eventually(WAIT, "exchange_api_down sent", || async {
            let received = capture.received();
            received.into_iter().find(|received| received.body["status"] == "firing").map(|received| received.body)
        })
        .await;
        let annotations = &page["alerts"][0]["annotations"];
        let evidence = annotations["evidence"].as_str().unwrap();
        if acknowledged {
            assert_eq!(annotations["acknowledged_by_exchange"], "true", "{page:#}");
            assert!(
                evidence.contains(
                    "Kraken acknowledges: Elevated API error rates, identified, critical, https://stspg.io/sim0"
                ),
                "{evidence}"
            );
        } else {
            assert!(annotations.get("acknowledged_by_exchange").is_none(), "{page:#}");
            assert!(!evidence.contains("acknowledges"), "{evidence}");
        }
        // The announcement itself, as the exchange-status endpoint and the metrics show it.
        let said: Value = serde_json::from_str(&app.get("/api/v1/exchanges/kraken/exchange-status").await.1).unwrap();
        let emergency = said["advisories"]["emergency"].as_array().unwrap();
        assert_eq!(emergency.len(), usize::from(acknowledged), "{said:#}");
        let metrics = app.metrics().await;
        let labels = [("exchange", "kraken"), ("kind", "emergency")];
        assert_eq!(metric(&metrics, "exwatch_exchange_advisories", &labels), Some(f64::from(u8::from(acknowledged))));
        app.shutdown().await.unwrap();
    }
}
