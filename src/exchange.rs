//! The exchange abstraction: the `Exchange` trait, the domain types every exchange returns, and the one
//! error taxonomy ([`ErrorClass`], defined in [`crate::failure`] and re-exported) that the poller, breaker, logs,
//! alerts and metrics all share.
//!
//! Wire formats do not live here: each exchange's module (for now only [`kraken`]) turns its own responses
//! into these types and classifies its own failures. Nothing here does I/O.

pub mod kraken;

pub use crate::failure::{AuthFailure, Error, ErrorClass, MAX_ERROR_TEXT_BYTES, MAX_EXCHANGE_ERRORS};

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use serde::Serialize;

use crate::secret::Secret;

/// The settings of one monitored exchange, validated.
#[derive(Debug, Clone)]
pub struct Config {
    /// The name used in metric labels, logs and the admin API (`kraken`).
    pub name: String,
    pub kind: Kind,
    pub base_url: url::Url,
    /// The pair whose price is checked (`XBTAUD`), as the exchange spells it in a request.
    pub pair: String,
    /// How many order book levels per side the Depth check asks for.
    pub depth_count: u32,
    pub credentials: Option<Credentials>,
}

/// Which API an exchange speaks. Each kind brings its own [`Profile`]: adding one is a module beside `kraken`, a
/// variant here with its arm in [`Kind::profile`], and its constructor in `app::client`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Kraken,
}

impl Kind {
    pub const ALL: [Kind; 1] = [Kind::Kraken];

    /// The kind's defaults, the syntax of its settings and its name for people.
    pub fn profile(self) -> &'static Profile {
        match self {
            Kind::Kraken => &kraken::PROFILE,
        }
    }

    /// The kind as written in `kind = "kraken"`.
    pub fn parse(text: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|kind| kind.profile().id == text)
    }
}

/// What one kind of exchange brings to the daemon, so that configuration, the limiter, the alert texts and the
/// diagnosis need no knowledge of any particular exchange.
#[derive(Debug)]
pub struct Profile {
    /// As written in `kind = "…"`; also the default `name`.
    pub id: &'static str,
    /// How people call it, in alert descriptions and diagnoses (`Kraken`).
    pub display_name: &'static str,
    pub default_base_url: &'static str,
    /// The pair whose price is checked when none is configured, in the exchange's own spelling.
    pub default_pair: &'static str,
    /// Where the exchange announces incidents and maintenance; the diagnosis of maintenance points there.
    pub status_page: &'static str,
    /// The Statuspage components that mean "our API" when `statuspage_components` is not configured.
    pub statuspage_components: &'static [&'static str],
    /// The call rates the exchange documents; `[rate_limit]` and an exchange's own `rate_limit` override them.
    pub rate_budget: RateBudget,
    /// Checks a configured pair; the error says what is expected and may quote the pair.
    pub check_pair: fn(&str) -> Result<(), String>,
    /// Checks the shape of an API secret; the error never quotes the secret.
    pub check_secret: fn(&str) -> Result<(), String>,
}

/// An exchange's documented call rates, per second and as bursts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateBudget {
    pub public_per_second: f64,
    pub public_burst: u32,
    pub private_per_second: f64,
    pub private_burst: u32,
}

/// An API key and its secret, both redacted wherever they are printed.
#[derive(Debug, Clone)]
pub struct Credentials {
    pub api_key: Secret,
    pub api_secret: Secret,
}

/// The calls exwatch makes. Their names are Kraken's method names, which are also the `endpoint` column of
/// `api_call_logs` and the `endpoint` metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum Endpoint {
    SystemStatus,
    Time,
    Ticker,
    Depth,
    Balance,
}

impl Endpoint {
    pub const ALL: [Endpoint; 5] =
        [Endpoint::SystemStatus, Endpoint::Time, Endpoint::Ticker, Endpoint::Depth, Endpoint::Balance];

    pub fn as_str(self) -> &'static str {
        match self {
            Endpoint::SystemStatus => "SystemStatus",
            Endpoint::Time => "Time",
            Endpoint::Ticker => "Ticker",
            Endpoint::Depth => "Depth",
            Endpoint::Balance => "Balance",
        }
    }

    /// Private calls need credentials and count against the per-key call counter.
    pub fn is_private(self) -> bool {
        matches!(self, Endpoint::Balance)
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.as_str())
    }
}

/// The result of one call: what came back and how long it took, successful or not.
#[derive(Debug, Clone)]
pub struct Outcome<T> {
    pub endpoint: Endpoint,
    pub latency: Duration,
    pub result: Result<T, Error>,
    /// `W...` warnings that came with a successful result.
    pub warnings: Vec<String>,
}

impl<T> Outcome<T> {
    /// The same outcome without its data, for recording.
    pub fn erase(&self) -> Outcome<()> {
        Outcome {
            endpoint: self.endpoint,
            latency: self.latency,
            result: self.result.as_ref().map(|_| ()).map_err(Clone::clone),
            warnings: self.warnings.clone(),
        }
    }

    pub fn error(&self) -> Option<&Error> {
        self.result.as_ref().err()
    }
}

/// The exchange's own view of whether it trades.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TradingStatus {
    Online,
    Maintenance,
    CancelOnly,
    PostOnly,
    LimitOnly,
    /// A value this version does not know. Treated as not online.
    Unknown(String),
}

impl TradingStatus {
    /// The values that have their own series in the one-hot `exwatch_exchange_system_status` gauge.
    pub const KNOWN: [&'static str; 6] = ["online", "maintenance", "cancel_only", "post_only", "limit_only", "unknown"];

    pub fn parse(text: &str) -> TradingStatus {
        match text {
            "online" => TradingStatus::Online,
            "maintenance" => TradingStatus::Maintenance,
            "cancel_only" => TradingStatus::CancelOnly,
            "post_only" => TradingStatus::PostOnly,
            "limit_only" => TradingStatus::LimitOnly,
            other => TradingStatus::Unknown(other.to_owned()),
        }
    }

    /// The label value of the status gauge; unknown values share one series so labels stay bounded.
    pub fn label(&self) -> &'static str {
        match self {
            TradingStatus::Online => "online",
            TradingStatus::Maintenance => "maintenance",
            TradingStatus::CancelOnly => "cancel_only",
            TradingStatus::PostOnly => "post_only",
            TradingStatus::LimitOnly => "limit_only",
            TradingStatus::Unknown(_) => "unknown",
        }
    }

    pub fn as_text(&self) -> &str {
        match self {
            TradingStatus::Unknown(text) => text,
            known => known.label(),
        }
    }
}

/// SystemStatus: the exchange's trading status and its clock, and what it announces beside them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SystemStatus {
    pub status: TradingStatus,
    /// The exchange's current time as it sent it (RFC 3339).
    pub timestamp: String,
    /// Unplanned incidents the exchange acknowledges (Kraken's `emergency[]`); empty when it names none or the
    /// answer carries no such list.
    pub emergency: Vec<Advisory>,
    /// Scheduled maintenance it announces (Kraken's `upcoming_maintenance[]`).
    pub upcoming_maintenance: Vec<Advisory>,
}

/// One announcement in a SystemStatus answer: third-party text, bounded where it is read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Advisory {
    pub title: String,
    /// An incident's status (`identified`), or a maintenance's phase.
    pub status: String,
    pub impact: String,
    /// Where the exchange tells more (its status page).
    pub source_url: Option<String>,
}

impl SystemStatus {
    /// A status without announcements.
    pub fn plain(status: TradingStatus, timestamp: String) -> SystemStatus {
        SystemStatus { status, timestamp, emergency: Vec::new(), upcoming_maintenance: Vec::new() }
    }
}

impl SystemStatus {
    /// A status other than `online` means purchases cannot go through, whatever the HTTP layer says: it is a
    /// failure of class `maintenance` for the breaker, the logs and the alerts.
    pub fn as_failure(&self) -> Option<Error> {
        match self.status {
            TradingStatus::Online => None,
            ref other => {
                Some(Error::new(ErrorClass::Maintenance, format!("exchange reports system status {}", other.as_text())))
            }
        }
    }
}

/// The exchange's clock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServerTime {
    pub unixtime: i64,
}

/// The price check's answer. Prices stay decimal strings as the exchange sent them; they are validated as numbers.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Ticker {
    /// The key the exchange answered under (`XBTAUD`, `XXBTZUSD`), which need not be the pair requested.
    pub pair_key: String,
    pub ask: String,
    pub bid: String,
    pub last: String,
}

/// One order book level: price and volume as sent.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Level {
    pub price: String,
    pub volume: String,
    pub timestamp: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OrderBook {
    pub pair_key: String,
    pub asks: Vec<Level>,
    pub bids: Vec<Level>,
}

/// Cash balances by the exchange's asset code.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Balances {
    pub assets: std::collections::BTreeMap<String, String>,
}

/// What exwatch asks of an exchange. Every method returns an [`Outcome`]: data and latency, or one classified
/// [`Error`]. Implementations enforce the configured timeout themselves and never panic on bad input.
#[async_trait]
pub trait Exchange: Send + Sync + 'static {
    fn name(&self) -> &str;
    /// Which API it speaks: its [`Profile`] names it for people in alerts and diagnoses.
    fn kind(&self) -> Kind;
    fn pair(&self) -> &str;
    fn has_credentials(&self) -> bool;
    async fn system_status(&self) -> Outcome<SystemStatus>;
    /// The exchange's clock, which recovery checks call beside SystemStatus. By default it is read from a
    /// SystemStatus answer's timestamp, for exchanges without a time endpoint of their own.
    async fn server_time(&self) -> Outcome<ServerTime> {
        let outcome = self.system_status().await;
        let result = outcome.result.and_then(|status| {
            chrono::DateTime::parse_from_rfc3339(&status.timestamp)
                .ok()
                .map(|time| ServerTime { unixtime: time.timestamp() })
                .ok_or_else(|| Error::new(ErrorClass::BadResponse, "system status timestamp is not an RFC 3339 time"))
        });
        Outcome { endpoint: Endpoint::Time, latency: outcome.latency, result, warnings: outcome.warnings }
    }
    async fn ticker(&self) -> Outcome<Ticker>;
    async fn depth(&self) -> Outcome<OrderBook>;
    /// A private call. Without credentials it fails with `invalid_request` without sending anything.
    async fn balance(&self) -> Outcome<Balances>;
}

/// Makes one call by its endpoint, keeping only the outcome. A SystemStatus other than `online` is a
/// `maintenance` failure here, as everywhere outcomes are recorded.
pub async fn call(exchange: &dyn Exchange, endpoint: Endpoint) -> Outcome<()> {
    match endpoint {
        Endpoint::SystemStatus => {
            let outcome = exchange.system_status().await;
            let mut call = outcome.erase();
            if let Ok(status) = &outcome.result
                && let Some(failure) = status.as_failure()
            {
                call.result = Err(failure);
            }
            call
        }
        Endpoint::Time => exchange.server_time().await.erase(),
        Endpoint::Ticker => exchange.ticker().await.erase(),
        Endpoint::Depth => exchange.depth().await.erase(),
        Endpoint::Balance => exchange.balance().await.erase(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_class_names_round_trip() {
        for class in ErrorClass::ALL {
            assert_eq!(ErrorClass::parse(class.as_str()), Some(class));
            assert_eq!(serde_json::to_value(class).unwrap(), serde_json::json!(class.as_str()));
        }
        assert_eq!(ErrorClass::parse("not_permitted"), None);
    }

    #[test]
    fn error_text_is_bounded_and_printable_where_the_error_is_made() {
        let huge = format!("EGeneral:Internal error:{}", "x".repeat(900_000));
        let error = Error::new(ErrorClass::ServerError, format!("exchange error {huge}"))
            .with_exchange_errors(vec![huge.clone(), "EService:Busy\0now".to_owned()]);
        assert!(error.message.len() <= MAX_ERROR_TEXT_BYTES, "{}", error.message.len());
        assert!(error.message.starts_with("exchange error EGeneral:Internal error:xxx"), "{}", &error.message[..60]);
        assert!(error.message.ends_with("… [truncated, 900039 bytes]"), "{}", error.message);
        assert!(error.exchange_errors[0].len() <= MAX_ERROR_TEXT_BYTES);
        assert!(error.exchange_errors[0].ends_with("… [truncated, 900024 bytes]"), "{}", error.exchange_errors[0]);
        assert_eq!(error.exchange_errors[1], "EService:Busy\u{FFFD}now");

        let many = (0..10).map(|index| format!("EGeneral:Error {index}")).collect();
        let error = Error::new(ErrorClass::ServerError, "many").with_exchange_errors(many);
        assert_eq!(error.exchange_errors.len(), MAX_EXCHANGE_ERRORS + 1);
        assert_eq!(error.exchange_errors[MAX_EXCHANGE_ERRORS], "… [6 more exchange errors not kept]");
    }

    #[test]
    fn any_status_other_than_online_is_a_maintenance_failure() {
        let online = SystemStatus::plain(TradingStatus::parse("online"), String::new());
        assert_eq!(online.as_failure(), None);
        for text in ["maintenance", "cancel_only", "post_only", "limit_only", "reduce_only"] {
            let status = SystemStatus::plain(TradingStatus::parse(text), String::new());
            let failure = status.as_failure().expect("not online");
            assert_eq!(failure.class, ErrorClass::Maintenance);
            assert!(failure.message.contains(text), "{}", failure.message);
        }
        assert_eq!(TradingStatus::parse("reduce_only").label(), "unknown");
    }

    /// An exchange with a SystemStatus and no time endpoint of its own.
    struct StatusOnly(&'static str);

    #[async_trait]
    impl Exchange for StatusOnly {
        fn name(&self) -> &str {
            "status-only"
        }
        fn kind(&self) -> Kind {
            Kind::Kraken
        }
        fn pair(&self) -> &str {
            "XBTAUD"
        }
        fn has_credentials(&self) -> bool {
            false
        }
        async fn system_status(&self) -> Outcome<SystemStatus> {
            let status = SystemStatus::plain(TradingStatus::Online, self.0.to_owned());
            Outcome {
                endpoint: Endpoint::SystemStatus,
                latency: Duration::from_millis(7),
                result: Ok(status),
                warnings: Vec::new(),
            }
        }
        async fn ticker(&self) -> Outcome<Ticker> {
            unreachable!("not called")
        }
        async fn depth(&self) -> Outcome<OrderBook> {
            unreachable!("not called")
        }
        async fn balance(&self) -> Outcome<Balances> {
            unreachable!("not called")
        }
    }

    #[tokio::test]
    async fn server_time_defaults_to_the_clock_in_a_system_status_answer() {
        let outcome = StatusOnly("2026-12-02T10:44:20Z").server_time().await;
        assert_eq!(outcome.endpoint, Endpoint::Time);
        assert_eq!(outcome.latency, Duration::from_millis(7));
        assert_eq!(outcome.result.unwrap().unixtime, 1_796_208_260);
        let error = StatusOnly("not a time").server_time().await.result.unwrap_err();
        assert_eq!(error.class, ErrorClass::BadResponse);
    }

    #[test]
    fn every_kind_is_parsed_by_its_id_and_brings_valid_defaults() {
        for kind in Kind::ALL {
            let profile = kind.profile();
            assert_eq!(Kind::parse(profile.id), Some(kind));
            assert!(url::Url::parse(profile.default_base_url).is_ok(), "{}", profile.id);
            assert_eq!((profile.check_pair)(profile.default_pair), Ok(()), "{}", profile.id);
            assert!(profile.status_page.starts_with("https://"), "{}", profile.id);
        }
        assert_eq!(Kind::parse("bitstamp"), None);
        let kraken = Kind::Kraken.profile();
        assert!((kraken.check_pair)("BTC-AUD").unwrap_err().contains("letters and digits"));
        let refused = (kraken.check_secret)("hunter2 !!").unwrap_err();
        assert!(!refused.contains("hunter2"), "{refused}");
    }
}
