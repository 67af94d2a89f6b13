//! One alert as the outside world sees it: its labels (its identity), annotations, start and end, and the two
//! wire formats sinks speak: Alertmanager's `POST /api/v2/alerts` body and Alertmanager's webhook payload
//! (version "4"), so any receiver of Alertmanager webhooks accepts exwatch's directly.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// What a notification says about its alert.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// The alert started firing.
    Firing,
    /// Still firing: Alertmanager's lease renewed, with the current annotations. Never sent to webhooks.
    Resend,
    Resolved,
    /// `exwatch alerts test`.
    Test,
    /// Still firing, and its scenario changed mid-incident (maintenance turned into a network fault): webhooks get
    /// the firing again with the new annotations, flagged `"update": true`, once per change. Alertmanager sees the
    /// change in its next re-send instead.
    Update,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Firing => "firing",
            Kind::Resend => "resend",
            Kind::Resolved => "resolved",
            Kind::Test => "test",
            Kind::Update => "update",
        }
    }

    pub fn parse(text: &str) -> Option<Kind> {
        [Kind::Firing, Kind::Resend, Kind::Resolved, Kind::Test, Kind::Update]
            .into_iter()
            .find(|kind| kind.as_str() == text)
    }
}

/// One alert: labels `alertname`, `severity`, `exchange`, `service`; annotations `summary`, `description`,
/// `runbook_url`, `scenario`, `evidence`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alert {
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub starts_at: DateTime<Utc>,
    /// Set once the alert resolved.
    pub ends_at: Option<DateTime<Utc>>,
    /// Where the alert links back to: the exchange's status on exwatch (`server.external_url`). Alertmanager's
    /// `generatorURL`; empty for alerts stored by versions before it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub generator_url: String,
}

impl Alert {
    pub fn label(&self, name: &str) -> &str {
        self.labels.get(name).map_or("", String::as_str)
    }

    /// The alert's identity within one exwatch: `exchange/alertname`.
    pub fn key(&self) -> String {
        key(self.label("exchange"), self.label("alertname"))
    }

    /// Alertmanager's fingerprint of the label set (FNV-1a 64 over the sorted names and values, each followed by
    /// the byte 0xff), so the webhook payload carries the same `fingerprint` Alertmanager would.
    pub fn fingerprint(&self) -> String {
        const OFFSET: u64 = 14_695_981_039_346_656_037;
        const PRIME: u64 = 1_099_511_628_211;
        let mut hash = OFFSET;
        let mut add = |bytes: &[u8]| {
            for byte in bytes {
                hash ^= u64::from(*byte);
                hash = hash.wrapping_mul(PRIME);
            }
        };
        // BTreeMap iterates in name order, as Alertmanager sorts.
        for (name, value) in &self.labels {
            add(name.as_bytes());
            add(&[0xff]);
            add(value.as_bytes());
            add(&[0xff]);
        }
        format!("{hash:016x}")
    }
}

/// The identity of the alert `alertname` of `exchange` (as [`Alert::key`]), also for rows read back from the store.
pub fn key(exchange: &str, alertname: &str) -> String {
    format!("{exchange}/{alertname}")
}

/// The most bytes of one annotation: notifications stay small whatever the evidence quotes.
pub const MAX_ANNOTATION_BYTES: usize = 4096;

/// An annotation's value, bounded to [`MAX_ANNOTATION_BYTES`] (cut on a character boundary and marked).
pub fn annotation(value: &str) -> String {
    crate::text::bounded(value, MAX_ANNOTATION_BYTES).into_owned()
}

/// The path of an exchange's status on exwatch, under `server.external_url`.
pub const STATUS_PATH: &str = "/api/v1/status";

/// The link back to exwatch for `exchange`'s alerts: its status at the daemon's external URL.
pub fn generator_url(external_url: &str, exchange: &str) -> String {
    let exchange: String = url::form_urlencoded::byte_serialize(exchange.as_bytes()).collect();
    format!("{external_url}{STATUS_PATH}?exchange={exchange}")
}

/// The webhook payload's `externalURL`: exwatch's own address, the generator URL without its status path.
fn external_url(generator_url: &str) -> &str {
    generator_url.split_once(STATUS_PATH).map_or(generator_url, |(base, _)| base)
}

fn wire_time(time: DateTime<Utc>) -> String {
    time.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// The body of `POST /api/v2/alerts`. A firing alert carries `endsAt = now + lease`, so Alertmanager keeps it
/// active exactly while exwatch keeps re-sending; a resolved one carries its end.
pub fn alertmanager_body(alert: &Alert, now: DateTime<Utc>, lease: Duration) -> String {
    let ends_at = alert.ends_at.unwrap_or_else(|| now + chrono::Duration::from_std(lease).unwrap_or_default());
    json!([{
        "labels": alert.labels,
        "annotations": alert.annotations,
        "startsAt": wire_time(alert.starts_at),
        "endsAt": wire_time(ends_at),
        "generatorURL": alert.generator_url,
    }])
    .to_string()
}

/// Alertmanager's webhook payload, version "4", for one alert sent to `receiver`. As from Alertmanager, a
/// firing alert's `endsAt` is the zero time. An [`Kind::Update`] carries `"update": true` besides.
pub fn webhook_body(receiver: &str, alert: &Alert, kind: Kind) -> String {
    let status = if alert.ends_at.is_some() { "resolved" } else { "firing" };
    let ends_at = alert.ends_at.map_or_else(|| "0001-01-01T00:00:00Z".to_owned(), wire_time);
    let group_labels: BTreeMap<&str, &str> =
        ["alertname", "exchange"].into_iter().map(|name| (name, alert.label(name))).collect();
    let group_key = format!(
        "{{}}:{{alertname=\"{}\", exchange=\"{}\"}}",
        alert.label("alertname").escape_default(),
        alert.label("exchange").escape_default()
    );
    let mut body: Value = json!({
        "receiver": receiver,
        "status": status,
        "alerts": [{
            "status": status,
            "labels": alert.labels,
            "annotations": alert.annotations,
            "startsAt": wire_time(alert.starts_at),
            "endsAt": ends_at,
            "generatorURL": alert.generator_url,
            "fingerprint": alert.fingerprint(),
        }],
        "groupLabels": group_labels,
        "commonLabels": alert.labels,
        "commonAnnotations": alert.annotations,
        "externalURL": external_url(&alert.generator_url),
        "version": "4",
        "groupKey": group_key,
        "truncatedAlerts": 0,
    });
    if kind == Kind::Update {
        body["update"] = Value::Bool(true);
    }
    body.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alert() -> Alert {
        let labels = [("alertname", "exchange_api_down"), ("severity", "critical"), ("exchange", "kraken")];
        Alert {
            labels: labels.into_iter().map(|(name, value)| (name.to_owned(), value.to_owned())).collect(),
            annotations: BTreeMap::from([("summary".to_owned(), "kraken API is down".to_owned())]),
            starts_at: "2026-11-29T04:28:27Z".parse().unwrap(),
            ends_at: None,
            generator_url: generator_url("http://exwatch.test:9750", "kraken"),
        }
    }

    #[test]
    fn annotations_are_bounded() {
        assert_eq!(annotation("short"), "short");
        let long = annotation(&"x".repeat(100_000));
        assert!(long.len() <= MAX_ANNOTATION_BYTES && long.ends_with("… [truncated, 100000 bytes]"), "{long}");
    }

    #[test]
    fn fingerprint_matches_alertmanager() {
        // Alertmanager 0.25 reported this fingerprint for this label set (shared/reference/real-clients.md §2b).
        assert_eq!(alert().fingerprint(), "3b4c1332617b3ebc");
    }

    #[test]
    fn alertmanager_body_leases_a_firing_alert_and_ends_a_resolved_one() {
        let now: DateTime<Utc> = "2026-11-29T04:30:00Z".parse().unwrap();
        let firing: Value = serde_json::from_str(&alertmanager_body(&alert(), now, Duration::from_secs(240))).unwrap();
        assert_eq!(firing[0]["startsAt"], "2026-11-29T04:28:27.000Z");
        assert_eq!(firing[0]["endsAt"], "2026-11-29T04:34:00.000Z");
        assert_eq!(firing[0]["labels"]["alertname"], "exchange_api_down");
        let mut resolved = alert();
        resolved.ends_at = Some("2026-11-29T04:31:00Z".parse().unwrap());
        let body: Value = serde_json::from_str(&alertmanager_body(&resolved, now, Duration::from_secs(240))).unwrap();
        assert_eq!(body[0]["endsAt"], "2026-11-29T04:31:00.000Z");
    }

    #[test]
    fn webhook_body_is_alertmanagers_version_4() {
        let body: Value = serde_json::from_str(&webhook_body("ops", &alert(), Kind::Firing)).unwrap();
        assert_eq!(body["version"], "4");
        assert_eq!(body["status"], "firing");
        assert_eq!(body["receiver"], "ops");
        assert_eq!(body["alerts"][0]["endsAt"], "0001-01-01T00:00:00Z");
        assert_eq!(body["alerts"][0]["fingerprint"], "3b4c1332617b3ebc");
        assert_eq!(body["groupKey"], "{}:{alertname=\"exchange_api_down\", exchange=\"kraken\"}");
        assert_eq!(body["groupLabels"], json!({"alertname": "exchange_api_down", "exchange": "kraken"}));
        let mut resolved = alert();
        resolved.ends_at = Some("2026-11-29T04:31:00Z".parse().unwrap());
        let body: Value = serde_json::from_str(&webhook_body("ops", &resolved, Kind::Resolved)).unwrap();
        assert_eq!(
            (body["status"].as_str(), body["alerts"][0]["status"].as_str()),
            (Some("resolved"), Some("resolved"))
        );
        assert_eq!(body["alerts"][0]["endsAt"], "2026-11-29T04:31:00.000Z");
    }
}
