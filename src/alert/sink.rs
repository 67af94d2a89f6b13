//! Where notifications go: the `[[alerts.sinks]]` list. An Alertmanager sink posts to `/api/v2/alerts` of each of
//! its URLs (every member of a cluster gets every alert, as Prometheus does it) and re-sends firing alerts with
//! `endsAt` ahead; a webhook sink posts Alertmanager's webhook payload, optionally with a bearer token, an
//! HMAC-SHA256 signature of the body and custom headers. Each URL is one [`Target`] with its own queue.
//!
//! Sink URLs, tokens, HMAC secrets and header values are [`Secret`]s: a webhook URL often is a credential. Logs,
//! metrics and errors name a target by its sink's name only.

use std::time::Duration;

use axum::http::{HeaderMap, HeaderName, HeaderValue, header::AUTHORIZATION};
use chrono::{DateTime, Utc};
use hmac::{Hmac, KeyInit, Mac};
use serde::Serialize;
use sha2::{Digest as _, Sha256};
use url::Url;

use crate::secret::Secret;
use crate::transport::{self, Request, Transport};

use super::notification::{self, Alert, Kind};

/// One `[[alerts.sinks]]` entry. It prints (in `exwatch check-config`) in the shape it is written, secrets redacted.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Names the sink in metrics and logs; unique.
    pub name: String,
    pub kind: SinkKind,
    /// One URL for a webhook; one per cluster member for Alertmanager.
    pub urls: Vec<Secret>,
    /// How long one delivery attempt may take.
    pub timeout: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub enum SinkKind {
    Alertmanager {
        /// How often a firing alert is re-sent; `endsAt` is four of these ahead.
        resend_interval: Duration,
    },
    Webhook {
        bearer_token: Option<Secret>,
        hmac_secret: Option<Secret>,
        /// Carries `sha256=<hex HMAC of the body>` when `hmac_secret` is set.
        signature_header: String,
        /// Added to every request; values are secrets (they often carry API keys).
        headers: Vec<(String, Secret)>,
    },
}

impl Serialize for Config {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap as _;
        let human = |duration: Duration| humantime::format_duration(duration).to_string();
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("name", &self.name)?;
        map.serialize_entry("timeout", &human(self.timeout))?;
        match &self.kind {
            SinkKind::Alertmanager { resend_interval } => {
                map.serialize_entry("kind", "alertmanager")?;
                map.serialize_entry("resend_interval", &human(*resend_interval))?;
                map.serialize_entry("urls", &self.urls)?;
            }
            SinkKind::Webhook { bearer_token, hmac_secret, signature_header, headers } => {
                map.serialize_entry("kind", "webhook")?;
                map.serialize_entry("url", &self.urls.first())?;
                map.serialize_entry("bearer_token", bearer_token)?;
                map.serialize_entry("hmac_secret", hmac_secret)?;
                map.serialize_entry("signature_header", signature_header)?;
                let headers: std::collections::BTreeMap<&str, &Secret> =
                    headers.iter().map(|(name, value)| (name.as_str(), value)).collect();
                map.serialize_entry("headers", &headers)?;
            }
        }
        map.end()
    }
}

pub const DEFAULT_SIGNATURE_HEADER: &str = "X-Exwatch-Signature";

/// How far ahead of a re-send a firing alert's `endsAt` is, in re-send intervals (Prometheus uses four too).
const LEASE_INTERVALS: u32 = 4;

/// One URL of a sink: what a queue delivers to.
#[derive(Debug)]
pub struct Target {
    /// The sink's name, with the URL's position when an Alertmanager sink has several (`am#1`).
    pub label: String,
    pub sink: Config,
    url: Url,
}

/// Why an attempt failed. `retry` is false when the receiver rejected the notification itself (400, 422):
/// sending the same bytes again succeeds only once the receiver changed (the outbox tries after a pause).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub retry: bool,
    pub message: String,
}

impl Target {
    /// The targets of every sink. A URL that does not parse was refused by the configuration already; it is
    /// skipped here with an error rather than failing a running daemon.
    pub fn all(sinks: &[Config]) -> Vec<Target> {
        let mut targets = Vec::new();
        for sink in sinks {
            for (index, url) in sink.urls.iter().enumerate() {
                let label = if sink.urls.len() > 1 { format!("{}#{index}", sink.name) } else { sink.name.clone() };
                match Url::parse(url.expose()) {
                    Ok(url) => targets.push(Target { label, sink: sink.clone(), url }),
                    Err(_) => tracing::error!(sink = label, "Sink URL does not parse; skipping it."),
                }
            }
        }
        targets
    }

    /// What `alert_state` records a firing as queued for: the label and a short hash of the URL, so a sink whose
    /// URL changed counts as new. The URL itself (often a credential) is never stored.
    pub fn identity(&self) -> String {
        let digest = Sha256::digest(self.url.as_str().as_bytes());
        let hash: String = digest.iter().take(8).map(|byte| format!("{byte:02x}")).collect();
        format!("{} {hash}", self.label)
    }

    /// Whether this target renews firing alerts, and how often.
    pub fn resend_interval(&self) -> Option<Duration> {
        match self.sink.kind {
            SinkKind::Alertmanager { resend_interval } => Some(resend_interval),
            SinkKind::Webhook { .. } => None,
        }
    }

    /// Whether a notification of this kind goes to this target at all: re-sends to Alertmanager only, scenario
    /// updates to webhooks only (Alertmanager gets the new annotations with its next re-send).
    pub fn wants(&self, kind: Kind) -> bool {
        match kind {
            Kind::Resend => self.resend_interval().is_some(),
            Kind::Update => self.resend_interval().is_none(),
            Kind::Firing | Kind::Resolved | Kind::Test => true,
        }
    }

    /// Sends one notification and judges the answer: any 2xx is delivered.
    pub(crate) async fn send(
        &self,
        transport: &Transport,
        kind: Kind,
        alert: &Alert,
        now: DateTime<Utc>,
    ) -> Result<(), Failure> {
        let (url, headers, body) = match &self.sink.kind {
            SinkKind::Alertmanager { resend_interval } => {
                let mut url = self.url.clone();
                url.set_path(&format!("{}/api/v2/alerts", self.url.path().trim_end_matches('/')));
                let lease = *resend_interval * LEASE_INTERVALS;
                (url, HeaderMap::new(), notification::alertmanager_body(alert, now, lease))
            }
            SinkKind::Webhook { bearer_token, hmac_secret, signature_header, headers: extra } => {
                let body = notification::webhook_body(&self.sink.name, alert, kind);
                let mut headers = HeaderMap::new();
                for (name, value) in extra {
                    headers.insert(header_name(name)?, header_value(value.expose())?);
                }
                if let Some(token) = bearer_token {
                    headers.insert(AUTHORIZATION, header_value(&format!("Bearer {}", token.expose()))?);
                }
                if let Some(secret) = hmac_secret {
                    headers.insert(header_name(signature_header)?, header_value(&signature(secret, &body))?);
                }
                (self.url.clone(), headers, body)
            }
        };
        let answer = transport
            .send(Request::post_json(&url, headers, body), self.sink.timeout)
            .await
            .map_err(|error| Failure { retry: true, message: format!("{}: {}", error.class, error.message) })?;
        if (200..300).contains(&answer.status) {
            return Ok(());
        }
        // Never followed: the next hop would get the body, the token and the signature. Retried like a 5xx.
        if transport::is_redirect(answer.status, answer.redirect_host.as_deref()) {
            let redirect = transport::redirect_description(answer.redirect_host.as_deref());
            return Err(Failure { retry: true, message: format!("HTTP {}: {redirect}", answer.status) });
        }
        // The receiver's own words help (Alertmanager explains a 400); a short printable prefix only.
        let said: String = String::from_utf8_lossy(&answer.body)
            .chars()
            .filter(|character| !character.is_control())
            .take(200)
            .collect();
        let message = format!("HTTP {}: {}", answer.status, said.trim());
        Err(Failure { retry: !matches!(answer.status, 400 | 422), message })
    }
}

/// `sha256=<hex>` of the HMAC-SHA256 of `body` under `secret`, as GitHub-style webhook receivers check it.
pub fn signature(secret: &Secret, body: &str) -> String {
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.expose().as_bytes()) else {
        unreachable!("HMAC takes a key of any length")
    };
    mac.update(body.as_bytes());
    let digest = mac.finalize().into_bytes();
    let hex: String = digest.iter().map(|byte| format!("{byte:02x}")).collect();
    format!("sha256={hex}")
}

fn header_name(name: &str) -> Result<HeaderName, Failure> {
    HeaderName::try_from(name).map_err(|_| Failure { retry: false, message: format!("invalid header name {name:?}") })
}

/// A header value marked sensitive, so no HTTP library prints it.
fn header_value(value: &str) -> Result<HeaderValue, Failure> {
    let mut value = HeaderValue::try_from(value)
        .map_err(|_| Failure { retry: false, message: "a header value is not valid in HTTP".to_owned() })?;
    value.set_sensitive(true);
    Ok(value)
}

/// Checks a header for the configuration: a valid name and a valid value.
pub fn check_header(name: &str, value: &str) -> Result<(), String> {
    header_name(name).map_err(|failure| failure.message)?;
    header_value(value).map(|_| ()).map_err(|_| format!("the value of header {name:?} is not valid in HTTP"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_hmac_sha256_of_the_body() {
        // RFC 4231 test case 2.
        let secret = Secret::new("Jefe");
        assert_eq!(
            signature(&secret, "what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn only_alertmanager_targets_take_resends() {
        let webhook = Config {
            name: "ops".to_owned(),
            kind: SinkKind::Webhook {
                bearer_token: None,
                hmac_secret: None,
                signature_header: DEFAULT_SIGNATURE_HEADER.to_owned(),
                headers: Vec::new(),
            },
            urls: vec![Secret::new("http://127.0.0.1:1/hook")],
            timeout: Duration::from_secs(1),
        };
        let manager = Config {
            name: "am".to_owned(),
            kind: SinkKind::Alertmanager { resend_interval: Duration::from_secs(60) },
            urls: vec![Secret::new("http://127.0.0.1:1"), Secret::new("http://127.0.0.1:2")],
            timeout: Duration::from_secs(1),
        };
        let targets = Target::all(&[webhook, manager]);
        let labels: Vec<&str> = targets.iter().map(|target| target.label.as_str()).collect();
        assert_eq!(labels, ["ops", "am#0", "am#1"]);
        assert!(!targets[0].wants(Kind::Resend) && targets[0].wants(Kind::Resolved));
        assert!(targets[1].wants(Kind::Resend));
    }
}
