//! Alert delivery on a paused clock: the daemon at its default 30 s interval against the in-memory simulator, its
//! Alertmanager and webhook sinks delivering to an in-memory receiver. Minutes of outage run in milliseconds.

use std::time::Duration;

use exwatch::alert::sink::signature;
use exwatch::secret::Secret;
use exwatch::simulator::Scenario;
use serde_json::Value;
use tokio::time::Instant;

use crate::helpers::Received;
use crate::paused::{PausedDaemon, at};

const HMAC_SECRET: &str = "webhook-hmac-secret";
const BEARER: &str = "webhook-bearer-token-123";

/// An Alertmanager sink re-sending every minute and a signed webhook sink with a bearer token and a header.
fn sinks() -> String {
    format!(
        "[[alerts.sinks]]\nkind = \"alertmanager\"\nname = \"am\"\nurls = [\"http://alertmanager.test:9093\"]\n\
         resend_interval = \"1m\"\n\
         [[alerts.sinks]]\nkind = \"webhook\"\nname = \"ops\"\nurl = \"http://hooks.test/hook\"\n\
         bearer_token = \"{BEARER}\"\nhmac_secret = \"{HMAC_SECRET}\"\nheaders = {{ \"X-Team\" = \"payments\" }}\n"
    )
}

fn webhook_only() -> &'static str {
    "[[alerts.sinks]]\nkind = \"webhook\"\nname = \"ops\"\nurl = \"http://hooks.test/hook\"\n"
}

/// Alertmanager posts: (alert, whether it is a lease renewal, i.e. `endsAt` well ahead, rather than a resolve).
fn alertmanager_posts(received: &[Received]) -> Vec<(Value, bool)> {
    let lease_floor = chrono::Utc::now() + chrono::Duration::seconds(60);
    received
        .iter()
        .filter(|received| received.path == "/api/v2/alerts")
        .map(|received| {
            let alert = received.body[0].clone();
            let ends_at: chrono::DateTime<chrono::Utc> = alert["endsAt"].as_str().unwrap().parse().unwrap();
            (alert, ends_at > lease_floor)
        })
        .collect()
}

#[tokio::test(start_paused = true)]
async fn a_two_minute_outage_gives_one_firing_and_one_resolved_notification_per_sink() {
    let start = Instant::now();
    let daemon = PausedDaemon::start_with("alerting-outage-key", &sinks()).await;
    daemon.simulator.set_scenario(Scenario::Maintenance);
    // Kraken is back just before the breaker's HALF_OPEN verification at 120 s; the poll at 150 s is the second
    // success with the breaker closed, and the alert resolves.
    at(start, Duration::from_secs(119)).await;
    daemon.simulator.set_scenario(Scenario::Healthy);
    at(start, Duration::from_secs(200)).await;
    let received = daemon.capture.received();

    assert_eq!(
        daemon.capture.webhooks("/hook"),
        [
            ("firing".to_owned(), "exchange_api_down".to_owned()),
            ("resolved".to_owned(), "exchange_api_down".to_owned())
        ]
    );
    let firing = received.iter().find(|received| received.path == "/hook").unwrap();
    let alert = &firing.body["alerts"][0];
    assert_eq!(
        alert["labels"],
        serde_json::json!({"alertname": "exchange_api_down", "severity": "critical", "exchange": "kraken", "service": "exwatch"})
    );
    assert_eq!(alert["annotations"]["scenario"], "maintenance");
    // The default runbook link: the runbook this daemon serves at its external URL.
    let runbook_url = alert["annotations"]["runbook_url"].as_str().unwrap();
    assert!(runbook_url.starts_with("http://127.0.0.1:") && runbook_url.ends_with("/runbook"), "{runbook_url}");
    assert!(alert["annotations"]["summary"].as_str().unwrap().contains("kraken"), "{alert}");
    let evidence = alert["annotations"]["evidence"].as_str().unwrap();
    assert!(evidence.contains("maintenance") && evidence.contains("failed"), "{evidence}");
    // Signed, authenticated and with the configured header.
    let headers = &firing.headers;
    assert_eq!(headers["authorization"], format!("Bearer {BEARER}").as_str());
    assert_eq!(headers["x-team"], "payments");
    assert_eq!(headers["x-exwatch-signature"], signature(&Secret::new(HMAC_SECRET), &firing.raw).as_str());

    // Alertmanager: the firing alert, its renewals with endsAt ahead, then one resolve, all one episode.
    let posts = alertmanager_posts(&received);
    let resolves = posts.iter().filter(|(_, leased)| !leased).count();
    assert_eq!(resolves, 1, "{posts:?}");
    assert!(!posts.last().unwrap().1, "the resolve comes last");
    assert!(posts.len() >= 2, "{posts:?}");
    assert!(
        posts.iter().all(|(post, _)| post["labels"] == alert["labels"] && post["startsAt"] == posts[0].0["startsAt"])
    );

    // Nothing more after the resolve: no renewal, no second page.
    at(start, Duration::from_secs(600)).await;
    assert_eq!(daemon.capture.received().len(), received.len());
    let ops = [("sink", "ops")];
    assert_eq!(daemon.value("exwatch_notifications_sent_total", &ops).await, 2.0);
    assert_eq!(daemon.value("exwatch_alert_outbox_depth", &ops).await, 0.0);
    assert_eq!(daemon.value("exwatch_notifications_failed_total", &ops).await, 0.0);
    daemon.stop().await;
}

#[tokio::test(start_paused = true)]
async fn one_failed_poll_never_pages() {
    let start = Instant::now();
    let daemon = PausedDaemon::start_with("alerting-one-failure-key", &sinks()).await;
    daemon.simulator.set_scenario(Scenario::Maintenance);
    at(start, Duration::from_secs(1)).await;
    let failures = [("endpoint", "Ticker"), ("outcome", "failure")];
    assert_eq!(daemon.value("exwatch_exchange_calls_total", &failures).await, 1.0, "the first poll failed");
    daemon.simulator.set_scenario(Scenario::Healthy);
    at(start, Duration::from_secs(600)).await;
    assert!(daemon.capture.received().is_empty(), "{:?}", daemon.capture.received());
    assert_eq!(daemon.value("exwatch_alerts_firing", &[("alertname", "exchange_api_down")]).await, 0.0);
    daemon.stop().await;
}

#[tokio::test(start_paused = true)]
async fn slow_answers_for_six_minutes_fire_exchange_api_slow_not_down() {
    let start = Instant::now();
    let daemon = PausedDaemon::start_with("alerting-slow-key", webhook_only()).await;
    daemon.simulator.set_latency(Duration::from_millis(3500));
    at(start, Duration::from_secs(360)).await;
    assert_eq!(daemon.capture.webhooks("/hook"), [("firing".to_owned(), "exchange_api_slow".to_owned())]);
    let received = daemon.capture.received();
    let alert = &received[0].body["alerts"][0];
    assert_eq!(alert["labels"]["severity"], "warning");
    assert_eq!(alert["annotations"]["summary"], "Exchange API Response Time Warning");
    let description = alert["annotations"]["description"].as_str().unwrap();
    assert!(description.starts_with("Kraken API response time elevated: 35"), "{description}");
    assert!(description.ends_with("ms"), "{description}");

    // Fast again: the five-minute average falls below the hysteresis and it resolves.
    daemon.simulator.set_latency(Duration::ZERO);
    at(start, Duration::from_secs(360 + 600)).await;
    assert_eq!(
        daemon.capture.webhooks("/hook"),
        [
            ("firing".to_owned(), "exchange_api_slow".to_owned()),
            ("resolved".to_owned(), "exchange_api_slow".to_owned())
        ]
    );
    daemon.stop().await;
}

/// Runs `scenario` until exchange_api_down's firing notification arrives and returns its annotations.
async fn diagnosed(api_key: &str, scenario: Scenario) -> Value {
    let start = Instant::now();
    let daemon = PausedDaemon::start_with(api_key, webhook_only()).await;
    daemon.simulator.set_scenario(scenario);
    let mut waited = Duration::ZERO;
    let annotations = loop {
        let received = daemon.capture.received();
        if let Some(firing) = received.iter().find(|received| received.body["status"] == "firing") {
            break firing.body["alerts"][0]["annotations"].clone();
        }
        assert!(waited < Duration::from_secs(1200), "{scenario:?} never paged in 20 minutes");
        waited += Duration::from_secs(30);
        at(start, waited).await;
    };
    daemon.stop().await;
    annotations
}

#[tokio::test(start_paused = true)]
async fn each_runbook_scenario_is_diagnosed() {
    let maintenance = diagnosed("alerting-scenario-a-key", Scenario::Maintenance).await;
    assert_eq!(maintenance["scenario"], "maintenance", "{maintenance}");

    let rate_limited = diagnosed("alerting-scenario-b-key", Scenario::RateLimited).await;
    assert_eq!(rate_limited["scenario"], "rate_limiting", "{rate_limited}");
    assert!(rate_limited["description"].as_str().unwrap().contains("factor now"), "{rate_limited}");

    // Public calls stay healthy; only Balance is refused. Private calls are paused, and that pages.
    let authentication = diagnosed("alerting-scenario-c-key", Scenario::InvalidKey).await;
    assert_eq!(authentication["scenario"], "authentication", "{authentication}");
    assert!(authentication["description"].as_str().unwrap().contains("to avoid a lockout"), "{authentication}");
    assert!(authentication["evidence"].as_str().unwrap().contains("EAPI:Invalid key"), "{authentication}");

    let network = diagnosed("alerting-scenario-d-key", Scenario::Reset).await;
    assert_eq!(network["scenario"], "network", "{network}");
}

#[tokio::test(start_paused = true)]
async fn a_receiver_down_for_minutes_gets_the_notification_once_it_is_back() {
    let start = Instant::now();
    let daemon = PausedDaemon::start_with("alerting-receiver-down-key", webhook_only()).await;
    daemon.capture.set_down(true);
    daemon.simulator.set_scenario(Scenario::Maintenance);
    // Fires at 60 s; the receiver answers 503 for five minutes.
    at(start, Duration::from_secs(360)).await;
    assert!(daemon.capture.received().is_empty());
    let ops = [("sink", "ops")];
    assert!(daemon.value("exwatch_notifications_failed_total", &ops).await >= 5.0);
    assert_eq!(daemon.value("exwatch_alert_outbox_depth", &ops).await, 1.0);
    assert!(daemon.value("exwatch_alert_outbox_oldest_seconds", &ops).await >= 290.0);

    // Back: within the longest backoff (30 s) the firing arrives, exactly once.
    daemon.capture.set_down(false);
    at(start, Duration::from_secs(360 + 31)).await;
    assert_eq!(daemon.capture.webhooks("/hook"), [("firing".to_owned(), "exchange_api_down".to_owned())]);
    assert_eq!(daemon.value("exwatch_alert_outbox_depth", &ops).await, 0.0);
    assert!(daemon.value("exwatch_notifications_retried_total", &ops).await >= 5.0);
    assert_eq!(daemon.value("exwatch_notifications_sent_total", &ops).await, 1.0);
    daemon.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_scenario_change_during_an_incident_shows_on_the_next_resend() {
    let start = Instant::now();
    let daemon = PausedDaemon::start_with("alerting-scenario-change-key", &sinks()).await;
    daemon.simulator.set_scenario(Scenario::Maintenance);
    at(start, Duration::from_secs(90)).await;
    let first = alertmanager_posts(&daemon.capture.received());
    assert_eq!(first[0].0["annotations"]["scenario"], "maintenance");

    // Connections now reset: the breaker's verifications fail on the network, and once the maintenance answers
    // have left the five-minute evidence window the diagnosis is network; the next re-send says so.
    daemon.simulator.set_scenario(Scenario::Reset);
    at(start, Duration::from_secs(90 + 420)).await;
    assert_eq!(daemon.status().await["active_alerts"][0]["scenario"], "network");
    let posts = alertmanager_posts(&daemon.capture.received());
    let (last, leased) = posts.last().unwrap();
    assert!(leased, "still firing");
    assert_eq!(last["annotations"]["scenario"], "network", "{last}");
    assert_eq!(last["startsAt"], first[0].0["startsAt"], "the same alert");
    // Webhooks get no re-sends, but the scenario change once: the same alert firing again, flagged as an update,
    // every notification linking back to the exchange's status on exwatch.
    let received = daemon.capture.received();
    let hooks: Vec<&Value> =
        received.iter().filter(|received| received.path == "/hook").map(|hook| &hook.body).collect();
    assert_eq!(hooks.len(), 2, "one firing and one update: {hooks:#?}");
    assert_eq!(hooks[0].get("update"), None, "{}", hooks[0]);
    assert_eq!(hooks[1]["update"], true, "{}", hooks[1]);
    assert_eq!(hooks[1]["status"], "firing");
    let (firing, update) = (&hooks[0]["alerts"][0], &hooks[1]["alerts"][0]);
    assert_eq!(
        (&firing["annotations"]["scenario"], &update["annotations"]["scenario"]),
        (&"maintenance".into(), &"network".into())
    );
    assert_eq!(update["fingerprint"], firing["fingerprint"]);
    assert_eq!(update["startsAt"], firing["startsAt"]);
    for hook in &hooks {
        let generator = hook["alerts"][0]["generatorURL"].as_str().unwrap();
        assert!(
            generator.starts_with("http://127.0.0.1:") && generator.ends_with("/api/v1/status?exchange=kraken"),
            "{generator}"
        );
        assert_eq!(hook["externalURL"].as_str(), generator.strip_suffix("/api/v1/status?exchange=kraken"));
    }
    assert_eq!(first[0].0["generatorURL"], hooks[0]["alerts"][0]["generatorURL"], "Alertmanager gets the same link");
    daemon.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_price_check_refused_as_our_own_bad_request_on_every_poll_pages_within_three_polls() {
    let start = Instant::now();
    // A pair Kraken does not list: every Ticker answers `EQuery:Unknown asset pair` (invalid_request), which the
    // breaker ignores as our own error. SystemStatus stays healthy.
    let extra = format!("pair = \"NOSUCHPAIR\"\n{}", webhook_only());
    let daemon = PausedDaemon::start_with("alerting-invalid-request-key", &extra).await;
    // A failed poll is confirmed `poll.confirm_interval` (2 s) later: polls at 0, 2 and 4 s.
    at(start, Duration::from_secs(3)).await;
    assert!(daemon.capture.received().is_empty(), "two polls do not page");
    // The third poll, at 4 s, pages.
    at(start, Duration::from_secs(5)).await;
    assert_eq!(daemon.capture.webhooks("/hook"), [("firing".to_owned(), "exchange_api_down".to_owned())]);
    let received = daemon.capture.received();
    let annotations = &received[0].body["alerts"][0]["annotations"];
    assert_eq!(annotations["scenario"], "invalid_request", "{annotations}");
    let description = annotations["description"].as_str().unwrap();
    assert!(
        description.starts_with("Our request is wrong: endpoint removed, pair delisted or a proxy in the way"),
        "{description}"
    );
    assert!(annotations["evidence"].as_str().unwrap().contains("EQuery:Unknown asset pair"), "{annotations}");
    let status = daemon.status().await;
    assert_eq!(status["up"], false, "{status}");
    // The breaker still ignores our own errors: it is the down rule that pages.
    assert_eq!(status["breaker"]["state"], "CLOSED", "{status}");
    daemon.stop().await;
}

#[tokio::test(start_paused = true)]
async fn an_oversized_exchange_error_is_capped_in_the_call_log_the_status_and_the_notification() {
    let start = Instant::now();
    let daemon = PausedDaemon::start_with("alerting-oversized-error-key", webhook_only()).await;
    daemon.simulator.set_scenario(Scenario::OversizedError);
    at(start, Duration::from_secs(90)).await;

    let failed: Vec<_> =
        daemon.log.rows().into_iter().filter(|row| row.error_class.as_deref() == Some("server_error")).collect();
    assert!(failed.len() >= 6, "{}", failed.len());
    for row in &failed {
        for text in [row.error_message.as_deref().unwrap(), row.exchange_error.as_deref().unwrap()] {
            assert!(text.len() <= exwatch::exchange::MAX_ERROR_TEXT_BYTES, "{}", text.len());
            assert!(text.ends_with(" bytes]") && text.contains("… [truncated, 9000"), "{}", &text[text.len() - 40..]);
        }
    }

    let status = daemon.status().await;
    let status_bytes = status.to_string().len();
    assert!(status_bytes < 8 * 1024, "/api/v1/status is {status_bytes} bytes");
    let evidence = status["active_alerts"][0]["evidence"].as_str().unwrap();
    assert!(evidence.contains("EGeneral:Internal error:xxx") && evidence.contains("[truncated, "), "{evidence}");

    let received = daemon.capture.received();
    assert_eq!(daemon.capture.webhooks("/hook"), [("firing".to_owned(), "exchange_api_down".to_owned())]);
    assert!(received[0].raw.len() < 16 * 1024, "the notification is {} bytes", received[0].raw.len());
    for (name, value) in received[0].body["alerts"][0]["annotations"].as_object().unwrap() {
        let length = value.as_str().unwrap().len();
        assert!(length <= exwatch::alert::notification::MAX_ANNOTATION_BYTES, "{name}: {length}");
    }
    daemon.stop().await;
}

#[tokio::test(start_paused = true)]
async fn an_invalid_key_right_after_maintenance_is_diagnosed_as_authentication_at_once() {
    let start = Instant::now();
    let daemon = PausedDaemon::start_with("alerting-maintenance-then-key", webhook_only()).await;
    daemon.simulator.set_scenario(Scenario::Maintenance);
    at(start, Duration::from_secs(61)).await;
    assert_eq!(daemon.status().await["active_alerts"][0]["scenario"], "maintenance");

    // Kraken is back, but our key is refused: the same incident goes on, for another reason. The maintenance
    // failures are still most of the five-minute window; what fails now is the key.
    daemon.simulator.set_scenario(Scenario::InvalidKey);
    at(start, Duration::from_secs(280)).await;
    let status = daemon.status().await;
    let alert = &status["active_alerts"][0];
    assert_eq!(alert["alertname"], "exchange_api_down", "{status}");
    assert_eq!(alert["scenario"], "authentication", "{status}");
    let evidence = alert["evidence"].as_str().unwrap();
    assert!(evidence.contains("maintenance") && evidence.contains("failing now: Balance auth"), "{evidence}");
    daemon.stop().await;
}

#[tokio::test(start_paused = true)]
async fn exchange_api_slow_is_diagnosed_as_slowness_with_where_the_time_goes() {
    let start = Instant::now();
    let daemon = PausedDaemon::start_with("alerting-slow-scenario-key", webhook_only()).await;
    daemon.simulator.set_latency(Duration::from_millis(3500));
    at(start, Duration::from_secs(360)).await;
    let received = daemon.capture.received();
    assert_eq!(daemon.capture.webhooks("/hook"), [("firing".to_owned(), "exchange_api_slow".to_owned())]);
    let annotations = &received[0].body["alerts"][0]["annotations"];
    assert_eq!(annotations["scenario"], "slow", "{annotations}");
    let evidence = annotations["evidence"].as_str().unwrap();
    assert!(evidence.contains(", 0 failed"), "{evidence}");
    assert!(
        evidence.contains("successful calls by endpoint: ") && evidence.contains("Ticker avg 3500 ms"),
        "{evidence}"
    );
    assert_eq!(daemon.status().await["active_alerts"][0]["scenario"], "slow");
    daemon.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_fixed_key_ends_the_private_pause_at_the_next_recheck_and_the_page_resolves_without_a_restart() {
    let start = Instant::now();
    let extra = format!("[rate_limit]\nprivate_recheck_interval = \"1m\"\n{}", webhook_only());
    let daemon = PausedDaemon::start_with("alerting-recheck-key", &extra).await;
    daemon.simulator.set_scenario(Scenario::InvalidKey);
    // Two invalid-key answers seconds apart pause private calls, and the pause pages.
    at(start, Duration::from_secs(30)).await;
    assert_eq!(daemon.capture.webhooks("/hook"), [("firing".to_owned(), "exchange_api_down".to_owned())]);
    let status = daemon.status().await;
    assert_eq!(status["rate_limit"]["private_pause_reason"], "2 consecutive invalid-key answers", "{status}");
    assert!(status["rate_limit"]["private_paused_for_seconds"].as_u64().unwrap() > 800, "{status}");

    // The key is fixed. Until the re-check is due no private call is made.
    daemon.simulator.set_scenario(Scenario::Healthy);
    let balances = daemon.simulator.requests("Balance");
    at(start, Duration::from_secs(55)).await;
    assert_eq!(daemon.simulator.requests("Balance"), balances, "no private call before the re-check");
    assert!(daemon.status().await["rate_limit"]["private_pause_reason"].is_string(), "still paused");

    // One minute after the pause began, one Balance finds the key working: the pause ends and the page resolves.
    at(start, Duration::from_secs(100)).await;
    let status = daemon.status().await;
    assert_eq!(status["rate_limit"]["private_pause_reason"], serde_json::Value::Null, "{status}");
    assert_eq!(
        daemon.capture.webhooks("/hook"),
        [
            ("firing".to_owned(), "exchange_api_down".to_owned()),
            ("resolved".to_owned(), "exchange_api_down".to_owned())
        ]
    );
    assert_eq!(daemon.value("exwatch_rate_limit_private_paused", &[("exchange", "kraken")]).await, 0.0);
    daemon.stop().await;
}
