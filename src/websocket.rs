//! What an exchange's WebSocket `status` channel says (Kraken's `wss://ws.kraken.com/v2`): a message on connect and
//! one per trading-engine change, so `maintenance` or `cancel_only` is seen in about a second instead of at the next
//! poll. A status that differs from the last REST SystemStatus wakes the exchange's poll loop at once
//! ([`crate::poller::Control::wake`]); the poll then reads it over REST.
//!
//! What it owns: [`parse`], a pure and lenient reading of one frame; [`backoff`]; the connection loop ([`Watch::run`]:
//! a status within [`STATUS_WAIT`] of connecting, a ping every `websocket_ping_interval` answered within
//! `websocket_pong_timeout`, a reconnect with backoff on a missed pong, a close, an error or a frame over
//! [`MAX_FRAME_BYTES`]); the view `GET /api/v1/exchanges/{name}/exchange-status` shows; and its metrics.
//! What it does not do: decide anything. REST stays the authority for the breaker and the alerts, and a dead
//! WebSocket is shown, never an outage.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::{SinkExt as _, StreamExt as _};
use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::{self, Message, protocol::WebSocketConfig};
use tokio_util::sync::CancellationToken;
use url::Url;

use crate::{clock, poller, telemetry, text};

/// The largest frame (and message) read; a larger one ends the connection (`oversized`).
pub const MAX_FRAME_BYTES: usize = 64 * 1024;
/// How long after connecting the first `status` message may take.
pub const STATUS_WAIT: Duration = Duration::from_secs(10);
/// The longest `system` or `version` text kept.
const MAX_TEXT_BYTES: usize = 64;
/// The first reconnect's delay, doubled for each failure after it up to `websocket_reconnect_max`.
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// Each delay is moved by up to this share either way, so many daemons do not reconnect in step.
const JITTER: f64 = 0.2;

/// The WebSocket settings of `[status_sources]`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Config {
    #[serde(rename = "websocket_ping_interval", serialize_with = "crate::clock::human_duration")]
    pub ping_interval: Duration,
    #[serde(rename = "websocket_pong_timeout", serialize_with = "crate::clock::human_duration")]
    pub pong_timeout: Duration,
    #[serde(rename = "websocket_reconnect_max", serialize_with = "crate::clock::human_duration")]
    pub reconnect_max: Duration,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            ping_interval: Duration::from_secs(30),
            pong_timeout: Duration::from_secs(10),
            reconnect_max: Duration::from_secs(300),
        }
    }
}

/// One frame as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Status(Status),
    Pong {
        req_id: Option<u64>,
    },
    Heartbeat,
    /// Valid JSON on another channel or method: counted, otherwise ignored.
    Other,
}

impl Frame {
    /// The `channel` label it is counted under.
    pub fn channel(&self) -> &'static str {
        match self {
            Frame::Status(_) => "status",
            Frame::Pong { .. } => "pong",
            Frame::Heartbeat => "heartbeat",
            Frame::Other => "other",
        }
    }
}

/// The `channel` label values: the frames [`parse`] reads, and `invalid` for the ones it refuses.
pub const CHANNELS: [&str; 5] = ["status", "pong", "heartbeat", "other", "invalid"];

/// What a `status` message says; `system` is kept as text, so an unknown value (`limit_only`) is shown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub system: String,
    pub version: Option<String>,
    /// Above 2^53 in practice: read as u64, never through a float.
    pub connection_id: Option<u64>,
}

/// Reads one text frame. `None` for what is not a JSON object, or a `status` message without `data[0].system`.
pub fn parse(frame: &str) -> Option<Frame> {
    let value: Value = serde_json::from_str(frame).ok()?;
    let object = value.as_object()?;
    if object.get("method").and_then(Value::as_str) == Some("pong") {
        return Some(Frame::Pong { req_id: object.get("req_id").and_then(Value::as_u64) });
    }
    match object.get("channel").and_then(Value::as_str) {
        Some("status") => {
            let data = object.get("data")?.as_array()?.first()?;
            let system = data.get("system")?.as_str()?;
            let version = data.get("version").and_then(Value::as_str);
            Some(Frame::Status(Status {
                system: text::external(system, MAX_TEXT_BYTES),
                version: version.map(|version| text::external(version, MAX_TEXT_BYTES)),
                connection_id: data.get("connection_id").and_then(Value::as_u64),
            }))
        }
        Some("heartbeat") => Some(Frame::Heartbeat),
        _ => Some(Frame::Other),
    }
}

/// The delay before reconnect number `attempt` (0 first): 1 s doubling up to `max`, moved by `jitter` (-1.0..=1.0)
/// times 20 %.
pub fn backoff(attempt: u32, max: Duration, jitter: f64) -> Duration {
    let base = FIRST_BACKOFF.saturating_mul(2u32.saturating_pow(attempt.min(31))).min(max);
    base.mul_f64(1.0 + JITTER * jitter.clamp(-1.0, 1.0))
}

/// Why a connection ended, as the `reason` label counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    PongTimeout,
    Closed,
    Error,
    Oversized,
}

impl Reason {
    pub const ALL: [Reason; 4] = [Reason::PongTimeout, Reason::Closed, Reason::Error, Reason::Oversized];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::PongTimeout => "pong_timeout",
            Reason::Closed => "closed",
            Reason::Error => "error",
            Reason::Oversized => "oversized",
        }
    }
}

/// What `/api/v1/exchanges/{name}/exchange-status` shows of the WebSocket.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct View {
    /// Open, and its status message received.
    pub connected: bool,
    pub connection_id: Option<u64>,
    pub version: Option<String>,
    /// The last `system` it said, however old.
    pub system: Option<String>,
    pub last_message_at: Option<DateTime<Utc>>,
}

/// One exchange's WebSocket being watched: the connection loop and the view it keeps.
pub struct Watch {
    exchange: String,
    url: Url,
    config: Config,
    control: poller::Control,
    state: Mutex<View>,
    metrics: Metrics,
}

impl Watch {
    /// `control` is the exchange's: its alert engine holds the last REST SystemStatus, its `wake` the poll loop's.
    pub fn new(exchange: &str, url: Url, config: Config, metrics: Metrics, control: poller::Control) -> Arc<Watch> {
        metrics.connected.with_label_values(&[exchange]).set(0);
        for reason in Reason::ALL {
            metrics.reconnects.with_label_values(&[exchange, reason.as_str()]);
        }
        for channel in CHANNELS {
            metrics.messages.with_label_values(&[exchange, channel]);
        }
        Arc::new(Watch { exchange: exchange.to_owned(), url, config, control, state: Mutex::default(), metrics })
    }

    pub fn exchange(&self) -> &str {
        &self.exchange
    }

    pub fn view(&self) -> View {
        self.state.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Connects, and reconnects with [`backoff`] whenever the connection ends, until `stop`.
    pub async fn run(self: Arc<Watch>, stop: CancellationToken) {
        let mut attempt = 0;
        loop {
            let reason = tokio::select! {
                () = stop.cancelled() => return,
                reason = self.session(&mut attempt) => reason,
            };
            self.state.lock().unwrap_or_else(PoisonError::into_inner).connected = false;
            self.metrics.connected.with_label_values(&[&self.exchange]).set(0);
            self.metrics.reconnects.with_label_values(&[&self.exchange, reason.as_str()]).inc();
            let delay = backoff(attempt, self.config.reconnect_max, rand::random_range(-1.0..=1.0));
            attempt = attempt.saturating_add(1);
            tracing::warn!(
                exchange = self.exchange,
                reason = reason.as_str(),
                retry_in = %humantime::format_duration(Duration::from_millis(
                    u64::try_from(delay.as_millis()).unwrap_or(u64::MAX)
                )),
                "WebSocket connection ended; reconnecting (REST polls are unaffected)."
            );
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// One connection, from connecting to the reason it ended. A status message resets `attempt`.
    async fn session(&self, attempt: &mut u32) -> Reason {
        let limits =
            WebSocketConfig::default().max_frame_size(Some(MAX_FRAME_BYTES)).max_message_size(Some(MAX_FRAME_BYTES));
        let connector = (self.url.scheme() == "wss").then(|| tokio_tungstenite::Connector::Rustls(tls()));
        let connect =
            tokio_tungstenite::connect_async_tls_with_config(self.url.as_str(), Some(limits), true, connector);
        let socket = match tokio::time::timeout(STATUS_WAIT, connect).await {
            Ok(Ok((socket, _))) => socket,
            Ok(Err(error)) => return self.failed(&error),
            Err(_) => {
                tracing::debug!(exchange = self.exchange, "WebSocket connect timed out.");
                return Reason::Error;
            }
        };
        let (mut sink, mut stream) = socket.split();
        let now = Instant::now();
        let mut status_deadline = Some(clock::after(now, STATUS_WAIT));
        let mut next_ping = clock::after(now, self.config.ping_interval);
        let mut pending: Option<(u64, Instant)> = None;
        let mut req_id: u64 = 0;
        loop {
            tokio::select! {
                () = clock::sleep_until_some(status_deadline) => {
                    tracing::debug!(exchange = self.exchange, "No WebSocket status message after connecting.");
                    return Reason::Error;
                }
                () = clock::sleep_until_some(pending.map(|(_, deadline)| deadline)) => return Reason::PongTimeout,
                () = tokio::time::sleep_until(next_ping) => {
                    req_id = req_id.wrapping_add(1);
                    let ping = serde_json::json!({ "method": "ping", "req_id": req_id }).to_string();
                    if let Err(error) = sink.send(Message::text(ping)).await {
                        return self.failed(&error);
                    }
                    let now = Instant::now();
                    if pending.is_none() {
                        pending = Some((req_id, clock::after(now, self.config.pong_timeout)));
                    }
                    next_ping = clock::after(now, self.config.ping_interval);
                }
                message = stream.next() => match message {
                    None | Some(Ok(Message::Close(_))) => return Reason::Closed,
                    Some(Err(error)) => return self.failed(&error),
                    Some(Ok(Message::Text(frame))) => match self.receive(frame.as_str()) {
                        Some(Frame::Status(_)) => {
                            status_deadline = None;
                            *attempt = 0;
                        }
                        // Any answer to a ping sent since the oldest unanswered one shows the link is alive.
                        Some(Frame::Pong { req_id: Some(answered) })
                            if pending.is_some_and(|(oldest, _)| answered >= oldest) =>
                        {
                            pending = None;
                        }
                        _ => {}
                    },
                    Some(Ok(Message::Binary(_))) => self.invalid(),
                    Some(Ok(_)) => {}
                },
            }
        }
    }

    fn failed(&self, error: &tungstenite::Error) -> Reason {
        match error {
            tungstenite::Error::Capacity(_) => Reason::Oversized,
            tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed => Reason::Closed,
            error => {
                tracing::debug!(exchange = self.exchange, error = %error, "WebSocket error.");
                Reason::Error
            }
        }
    }

    fn invalid(&self) {
        self.metrics.messages.with_label_values(&[&self.exchange, "invalid"]).inc();
    }

    /// Counts a frame, keeps what a status message says, and wakes the poll loop when it differs from REST.
    fn receive(&self, frame: &str) -> Option<Frame> {
        let Some(parsed) = parse(frame) else {
            self.invalid();
            return None;
        };
        self.metrics.messages.with_label_values(&[&self.exchange, parsed.channel()]).inc();
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.last_message_at = Some(Utc::now());
        if let Frame::Status(status) = &parsed {
            state.connected = true;
            state.connection_id = status.connection_id;
            state.version.clone_from(&status.version);
            state.system = Some(status.system.clone());
            drop(state);
            self.metrics.connected.with_label_values(&[&self.exchange]).set(1);
            let rest = self.control.alerts.lock().unwrap_or_else(PoisonError::into_inner);
            let agrees = rest.last_status().is_some_and(|said| said.as_text() == status.system);
            drop(rest);
            if !agrees {
                tracing::info!(
                    exchange = self.exchange,
                    system = status.system,
                    "The WebSocket status differs from the last SystemStatus; polling now."
                );
                self.control.wake.notify_one();
            }
        }
        Some(parsed)
    }
}

/// A rustls client configuration on the ring provider with the webpki roots, so no second TLS provider is built.
fn tls() -> Arc<rustls::ClientConfig> {
    let roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("the ring provider supports the default protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    Arc::new(config)
}

/// The WebSocket metrics, shared by every exchange's watch.
#[derive(Clone)]
pub struct Metrics {
    connected: IntGaugeVec,
    reconnects: IntCounterVec,
    messages: IntCounterVec,
}

impl Metrics {
    pub fn new(registry: &Registry) -> Metrics {
        let counter = |name: &str, help: &str, labels: &[&str]| {
            telemetry::register(registry, IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"))
        };
        Metrics {
            connected: telemetry::register(
                registry,
                IntGaugeVec::new(
                    Opts::new(
                        "exwatch_websocket_connected",
                        "1 while the WebSocket is open and its status message was received.",
                    ),
                    &["exchange"],
                )
                .expect("valid metric"),
            ),
            reconnects: counter(
                "exwatch_websocket_reconnects_total",
                "WebSocket connections ended and retried, by reason.",
                &["exchange", "reason"],
            ),
            messages: counter(
                "exwatch_websocket_messages_total",
                "WebSocket frames received, by channel (invalid for frames that are not understood).",
                &["exchange", "channel"],
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_message_keeps_a_connection_id_above_two_to_the_fifty_third() {
        let frame = r#"{"channel":"status","type":"update","data":[{"system":"online","api_version":"v2",
            "connection_id":8628615390848610001,"version":"2.0.x","future_field":[1]}]}"#;
        let expected = Status {
            system: "online".to_owned(),
            version: Some("2.0.x".to_owned()),
            connection_id: Some(8_628_615_390_848_610_001),
        };
        assert_eq!(parse(frame), Some(Frame::Status(expected)));
    }

    #[test]
    fn an_unknown_system_value_is_kept_as_text() {
        let frame = r#"{"channel":"status","data":[{"system":"limit_only"}]}"#;
        let Some(Frame::Status(status)) = parse(frame) else { panic!("not a status") };
        assert_eq!(status.system, "limit_only");
        assert_eq!(status.connection_id, None);
    }

    #[test]
    fn pongs_heartbeats_and_other_channels_are_told_apart() {
        let pong = r#"{"method":"pong","req_id":101,"success":true,"time_in":"x","time_out":"y"}"#;
        assert_eq!(parse(pong), Some(Frame::Pong { req_id: Some(101) }));
        assert_eq!(parse(r#"{"channel":"heartbeat"}"#), Some(Frame::Heartbeat));
        assert_eq!(parse(r#"{"channel":"ticker","data":[]}"#), Some(Frame::Other));
    }

    #[test]
    fn frames_that_mean_nothing_are_invalid() {
        for frame in ["", "not json {", "[1,2]", "42", r#"{"channel":"status"}"#, r#"{"channel":"status","data":[]}"#] {
            assert_eq!(parse(frame), None, "{frame:?}");
        }
    }

    #[test]
    fn backoff_doubles_from_one_second_to_the_maximum_within_twenty_percent() {
        let max = Duration::from_secs(300);
        assert_eq!(backoff(0, max, 0.0), Duration::from_secs(1));
        assert_eq!(backoff(3, max, 0.0), Duration::from_secs(8));
        assert_eq!(backoff(9, max, 0.0), max);
        assert_eq!(backoff(u32::MAX, max, 0.0), max);
        assert_eq!(backoff(0, max, 1.0), Duration::from_millis(1200));
        assert_eq!(backoff(0, max, -1.0), Duration::from_millis(800));
        assert_eq!(backoff(9, max, 5.0), Duration::from_secs(360));
    }
}
