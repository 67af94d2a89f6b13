//! The fake Kraken used by tests, demos and drills: an HTTP server on a real socket that answers Kraken's
//! public methods (SystemStatus, Time, Ticker, Depth) and the signed private Balance like api.kraken.com does,
//! including signature and nonce checks, the private call counter, the public per-IP limiter and the lockout,
//! and that can be switched at run time into one of [`Scenario`]'s failure modes (Cloudflare pages, Kraken
//! error strings, broken bodies, slowness, connection resets).
//!
//! It owns its own accept loop because a connection reset cannot be expressed as an HTTP answer.
//! [`Simulator::in_memory`] builds the same state and router without a socket, for tests on a paused clock that
//! drive [`Simulator::router`] in process (the Kraken client's in-memory transport); there a reset is a
//! response marked with [`ConnectionReset`], which that transport reports as a reset connection.
//! The control endpoint [`CONTROL_PATH`] (GET the state, PUT changes) is never slowed down nor faulted.
//! Beside Kraken's REST it serves a Statuspage ([`statuspage`]) and the WebSocket `status` channel at `/v2`
//! ([`websocket`]). It does not implement trading, other private methods, or TLS.

mod account;
mod answer;
#[cfg(any(test, feature = "test-util"))]
mod conformance;
mod market;
pub mod statuspage;
pub mod websocket;

#[cfg(any(test, feature = "test-util"))]
pub use self::conformance::{CONFORMANCE_ENDPOINTS, conformance};

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use axum::body::Bytes;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine as _;
use hyper_util::rt::{TokioIo, TokioTimer};
use subtle::ConstantTimeEq as _;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};
use tokio_util::task::TaskTracker;
use tower::ServiceExt as _;
use tracing::{debug, info, warn};

use self::account::{Account, TokenBucket};
use self::answer::Answer;
use crate::exchange::kraken::ConnectionReset;
use crate::secret::Secret;

/// The simulator's own control endpoint; Kraken has nothing under `/__exwatch`.
pub const CONTROL_PATH: &str = "/__exwatch/simulator";

/// What [`Simulator::base_url`] says for a simulator built with [`Simulator::in_memory`]: a reserved name
/// (RFC 2606) that never resolves, so a client pointed at it by mistake fails instead of reaching anything.
pub const IN_MEMORY_BASE_URL: &str = "http://simulator.invalid";

/// The API key the simulator accepts unless told otherwise.
pub const DEFAULT_API_KEY: &str = "exwatch-simulator-key";

/// Kraken's published test secret (kraken-api.md §4.2), so signatures can be checked against a known vector.
pub const DEFAULT_API_SECRET: &str =
    "kQH5HW/8p1uGOVjbgWA7FunAmGO8lsSUXNsu3eow76sz84Q18fWxnyRzBHCd3pd5nE9qa99HAZtuZuj6F1huXg==";

/// How long `slow` waits when no latency is configured: beyond the monitor's 5 s "slow" threshold.
const DEFAULT_SLOW_LATENCY: Duration = Duration::from_secs(6);

/// Where the `redirect_*` scenarios point unless told otherwise: a reserved name (RFC 2606) that never resolves.
pub const DEFAULT_REDIRECT_TO: &str = "http://redirected.invalid";

/// How long `silent` holds a request before resetting its connection: far beyond any client's timeout, and a
/// bound on what a client that never gives up can hold.
pub const SILENT_HOLD: Duration = Duration::from_secs(600);

/// Private request bodies are a nonce and little else; anything bigger is not a client we simulate.
const MAX_REQUEST_BODY_BYTES: usize = 64 * 1024;

/// Callers choose method names freely (`/0/public/<anything>`), so the per-method request counts are capped
/// and the excess is counted under one name rather than growing without bound.
const MAX_COUNTED_METHODS: usize = 256;
const OTHER_METHODS: &str = "(other)";

/// What Kraken does right now. Applies to Kraken paths only; the control endpoint always works. What each one
/// answers is [`Scenario::summary`], the text `exwatch simulate --help` lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scenario {
    Healthy,
    Maintenance,
    CancelOnly,
    RateLimited,
    TooManyRequests,
    Http429,
    InvalidKey,
    InvalidSignature,
    Lockout,
    Cloudflare520,
    Cloudflare502,
    Cloudflare504,
    Html200,
    EmptyBody,
    TruncatedJson,
    Unavailable,
    Busy,
    InternalError,
    Slow,
    /// In memory (no connection), the answer carries the [`ConnectionReset`] marker instead of a reset.
    Reset,
    Flaky,
    // Outbound faults (issue 11): a front end that redirects or refuses every path, a Kraken that no longer
    // knows the pair or the method, a server that never answers.
    Redirect301,
    Redirect302,
    Redirect303,
    /// A client that follows a 307 re-sends the signed body.
    Redirect307,
    Redirect308,
    NotFound,
    BadRequest,
    MethodNotAllowed,
    UnknownPair,
    UnknownMethod,
    /// After [`SILENT_HOLD`] the connection is reset, so a forgotten client cannot hold it forever.
    Silent,
    OversizedError,
    NulError,
}

impl Scenario {
    pub const ALL: [Scenario; 34] = [
        Scenario::Healthy,
        Scenario::Maintenance,
        Scenario::CancelOnly,
        Scenario::RateLimited,
        Scenario::TooManyRequests,
        Scenario::Http429,
        Scenario::InvalidKey,
        Scenario::InvalidSignature,
        Scenario::Lockout,
        Scenario::Cloudflare520,
        Scenario::Cloudflare502,
        Scenario::Cloudflare504,
        Scenario::Html200,
        Scenario::EmptyBody,
        Scenario::TruncatedJson,
        Scenario::Unavailable,
        Scenario::Busy,
        Scenario::InternalError,
        Scenario::Slow,
        Scenario::Reset,
        Scenario::Flaky,
        Scenario::Redirect301,
        Scenario::Redirect302,
        Scenario::Redirect303,
        Scenario::Redirect307,
        Scenario::Redirect308,
        Scenario::NotFound,
        Scenario::BadRequest,
        Scenario::MethodNotAllowed,
        Scenario::UnknownPair,
        Scenario::UnknownMethod,
        Scenario::Silent,
        Scenario::OversizedError,
        Scenario::NulError,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Scenario::Healthy => "healthy",
            Scenario::Maintenance => "maintenance",
            Scenario::CancelOnly => "cancel_only",
            Scenario::RateLimited => "rate_limited",
            Scenario::TooManyRequests => "too_many_requests",
            Scenario::Http429 => "http_429",
            Scenario::InvalidKey => "invalid_key",
            Scenario::InvalidSignature => "invalid_signature",
            Scenario::Lockout => "lockout",
            Scenario::Cloudflare520 => "cloudflare_520",
            Scenario::Cloudflare502 => "cloudflare_502",
            Scenario::Cloudflare504 => "cloudflare_504",
            Scenario::Html200 => "html_200",
            Scenario::EmptyBody => "empty_body",
            Scenario::TruncatedJson => "truncated_json",
            Scenario::Unavailable => "unavailable",
            Scenario::Busy => "busy",
            Scenario::InternalError => "internal_error",
            Scenario::Slow => "slow",
            Scenario::Reset => "reset",
            Scenario::Flaky => "flaky",
            Scenario::Redirect301 => "redirect_301",
            Scenario::Redirect302 => "redirect_302",
            Scenario::Redirect303 => "redirect_303",
            Scenario::Redirect307 => "redirect_307",
            Scenario::Redirect308 => "redirect_308",
            Scenario::NotFound => "not_found",
            Scenario::BadRequest => "bad_request",
            Scenario::MethodNotAllowed => "method_not_allowed",
            Scenario::UnknownPair => "unknown_pair",
            Scenario::UnknownMethod => "unknown_method",
            Scenario::Silent => "silent",
            Scenario::OversizedError => "oversized_error",
            Scenario::NulError => "nul_error",
        }
    }

    /// What the scenario answers, in one line (`exwatch simulate --help` lists these).
    pub fn summary(self) -> &'static str {
        match self {
            Scenario::Healthy => "everything answers normally",
            Scenario::Maintenance => "SystemStatus `maintenance`; every other call `EService:Unavailable`",
            Scenario::CancelOnly => "SystemStatus `cancel_only`; other calls answer normally",
            Scenario::RateLimited => "every call `EAPI:Rate limit exceeded`",
            Scenario::TooManyRequests => "every call `EGeneral:Too many requests` (HTTP 200)",
            Scenario::Http429 => "every call HTTP 429 with `EGeneral:Too many requests`",
            Scenario::InvalidKey => "private calls `EAPI:Invalid key`; public calls healthy",
            Scenario::InvalidSignature => "private calls `EAPI:Invalid signature`; public calls healthy",
            Scenario::Lockout => "private calls `EGeneral:Temporary lockout`; public calls healthy",
            Scenario::Cloudflare520 => "every call Cloudflare's 520 HTML page",
            Scenario::Cloudflare502 => "every call Cloudflare's 502 HTML page",
            Scenario::Cloudflare504 => "every call Cloudflare's 504 HTML page",
            Scenario::Html200 => "every call HTTP 200 with an HTML page",
            Scenario::EmptyBody => "every call HTTP 200 with an empty body",
            Scenario::TruncatedJson => "every call HTTP 200 with the first half of the healthy JSON",
            Scenario::Unavailable => "SystemStatus `online`; every other call `EService:Unavailable`",
            Scenario::Busy => "every call `EService:Busy`",
            Scenario::InternalError => "every call `EGeneral:Internal error:5`",
            Scenario::Slow => "healthy answers after --latency (6s when it is zero)",
            Scenario::Reset => "the TCP connection is reset without an answer",
            Scenario::Flaky => "each call fails with `EService:Unavailable` with probability --failure-rate",
            Scenario::Redirect301 => "every call HTTP 301 to the same path and query on --redirect-to",
            Scenario::Redirect302 => "as redirect_301, with 302",
            Scenario::Redirect303 => "as redirect_301, with 303",
            Scenario::Redirect307 => "as redirect_301, with 307",
            Scenario::Redirect308 => "as redirect_301, with 308",
            Scenario::NotFound => "every call HTTP 404 with the front end's HTML page (an endpoint removed)",
            Scenario::BadRequest => "every call HTTP 400 with the front end's HTML page",
            Scenario::MethodNotAllowed => "every call HTTP 405 `Not Allowed`, as Kraken answers a wrong verb",
            Scenario::UnknownPair => "Ticker and Depth `EQuery:Unknown asset pair` (a delisted pair); other calls work",
            Scenario::UnknownMethod => "every call `EGeneral:Unknown method` (an endpoint removed)",
            Scenario::Silent => "the request is read and never answered (reset after 10 minutes)",
            Scenario::OversizedError => "every call `EGeneral:Internal error:` padded to 900 kB",
            Scenario::NulError => "every call a Kraken error whose string holds a NUL character",
        }
    }

    /// The redirect status a `redirect_*` scenario answers with.
    pub fn redirect_status(self) -> Option<StatusCode> {
        Some(match self {
            Scenario::Redirect301 => StatusCode::MOVED_PERMANENTLY,
            Scenario::Redirect302 => StatusCode::FOUND,
            Scenario::Redirect303 => StatusCode::SEE_OTHER,
            Scenario::Redirect307 => StatusCode::TEMPORARY_REDIRECT,
            Scenario::Redirect308 => StatusCode::PERMANENT_REDIRECT,
            _ => return None,
        })
    }
}

impl fmt::Display for Scenario {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.as_str())
    }
}

/// A scenario name that is not one of [`Scenario::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown scenario {name:?}, valid scenarios are: {valid}", valid = valid_scenario_names())]
pub struct UnknownScenario {
    pub name: String,
}

fn valid_scenario_names() -> String {
    Scenario::ALL.map(Scenario::as_str).join(", ")
}

impl FromStr for Scenario {
    type Err = UnknownScenario;

    fn from_str(name: &str) -> Result<Scenario, UnknownScenario> {
        Scenario::ALL
            .into_iter()
            .find(|scenario| scenario.as_str() == name)
            .ok_or_else(|| UnknownScenario { name: name.to_string() })
    }
}

/// Kraken's per-IP limit on public calls, as a token bucket.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PublicRateLimit {
    /// Calls allowed back to back from a fresh client.
    pub burst: u32,
    /// Calls regained per second, up to `burst`.
    pub refill_per_second: f64,
}

/// Kraken's per-key private call counter: each call adds 1, the counter decays continuously, and a call that
/// would take it over `max` is refused with `EAPI:Rate limit exceeded` (kraken-api.md §5.2).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PrivateCounter {
    pub max: u32,
    pub decay_per_second: f64,
}

impl PrivateCounter {
    pub const STARTER: PrivateCounter = PrivateCounter { max: 15, decay_per_second: 0.33 };
}

impl Default for PrivateCounter {
    fn default() -> PrivateCounter {
        PrivateCounter::STARTER
    }
}

#[derive(Debug, Clone)]
pub struct Options {
    /// Where to listen; port 0 picks a free port.
    pub listen: SocketAddr,
    pub scenario: Scenario,
    /// Added before every Kraken answer, in every scenario; `slow` uses it (6 s when zero).
    pub latency: Duration,
    /// For `flaky`: the probability, 0.0 to 1.0, that a call fails.
    pub failure_rate: f64,
    /// The only API key the simulator accepts.
    pub api_key: Secret,
    /// The base64 secret that goes with `api_key`.
    pub api_secret: Secret,
    /// Per-IP token bucket over public calls; `None` disables it.
    pub public_rate_limit: Option<PublicRateLimit>,
    pub private_counter: PrivateCounter,
    /// Consecutive invalid keys before `EGeneral:Temporary lockout`; 0 disables the lockout.
    pub lockout_after: u32,
    /// How long a lockout lasts; a retry with a bad key during a lockout restarts it.
    pub lockout_duration: Duration,
    /// Where the `redirect_*` scenarios send clients (the request's path and query are kept); `None` is
    /// [`DEFAULT_REDIRECT_TO`].
    pub redirect_to: Option<url::Url>,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0),
            scenario: Scenario::Healthy,
            latency: Duration::ZERO,
            failure_rate: 0.0,
            api_key: Secret::new(DEFAULT_API_KEY),
            api_secret: Secret::new(DEFAULT_API_SECRET),
            public_rate_limit: Some(PublicRateLimit { burst: 20, refill_per_second: 1.0 }),
            private_counter: PrivateCounter::STARTER,
            lockout_after: 5,
            lockout_duration: Duration::from_secs(15 * 60),
            redirect_to: None,
        }
    }
}

/// A running simulator. It stops when dropped or on [`Simulator::shutdown`].
#[derive(Debug)]
pub struct Simulator {
    local_addr: SocketAddr,
    shared: Arc<Shared>,
    stop_on_drop: DropGuard,
    /// `None` for a simulator built with [`Simulator::in_memory`]: nothing listens.
    server: Option<JoinHandle<()>>,
}

impl Simulator {
    /// Binds, spawns the server task and returns once the socket is listening.
    pub async fn start(options: Options) -> anyhow::Result<Simulator> {
        let shared = Arc::new(Shared::new(&options)?);
        let listener = TcpListener::bind(options.listen)
            .await
            .with_context(|| format!("binding the simulator to {}", options.listen))?;
        let local_addr = listener.local_addr().context("reading the simulator's listen address")?;
        let cancel = CancellationToken::new();
        let server = tokio::spawn(accept_connections(listener, router(shared.clone()), cancel.clone()));
        Ok(Simulator { local_addr, shared, stop_on_drop: cancel.drop_guard(), server: Some(server) })
    }

    /// The same simulator without a socket: nothing is bound or spawned, and requests reach it only through
    /// [`Simulator::router`]. For tests on a paused clock, where real I/O must never be pending. Latency,
    /// decays and lockouts run on tokio's clock, so `tokio::time::advance` drives them. [`Simulator::local_addr`]
    /// reports `options.listen` (never bound) and [`Simulator::base_url`] reports [`IN_MEMORY_BASE_URL`].
    #[cfg(any(test, feature = "test-util"))]
    pub fn in_memory(options: Options) -> anyhow::Result<Simulator> {
        let shared = Arc::new(Shared::new(&options)?);
        let cancel = CancellationToken::new();
        Ok(Simulator { local_addr: options.listen, shared, stop_on_drop: cancel.drop_guard(), server: None })
    }

    /// The Kraken and control router the TCP server serves, sharing this simulator's state: setters,
    /// [`Simulator::requests`], the counters and the control endpoint all see calls made through it. Driven in
    /// process, requests carry no peer address, so the public per-IP limiter counts them all as 127.0.0.1.
    pub fn router(&self) -> Router {
        router(self.shared.clone())
    }

    /// Where the server listens; for an in-memory simulator, the configured address, which nothing binds.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// `http://<local_addr>`, or [`IN_MEMORY_BASE_URL`] for an in-memory simulator.
    pub fn base_url(&self) -> String {
        match self.server {
            Some(_) => format!("http://{}", self.local_addr),
            None => IN_MEMORY_BASE_URL.to_owned(),
        }
    }

    pub fn scenario(&self) -> Scenario {
        self.shared.settings().scenario
    }

    pub fn set_scenario(&self, scenario: Scenario) {
        self.shared.update_settings(|settings| settings.scenario = scenario);
    }

    pub fn set_latency(&self, latency: Duration) {
        self.shared.update_settings(|settings| settings.latency = latency);
    }

    /// Clamped to 0.0..=1.0 (NaN counts as 0.0): a rate is a probability, and this setter cannot report errors.
    /// Where the `redirect_*` scenarios send clients from now on.
    pub fn set_redirect_to(&self, redirect_to: url::Url) {
        *lock(&self.shared.redirect_to) = Some(redirect_to);
    }

    pub fn set_failure_rate(&self, rate: f64) {
        let rate = if rate.is_nan() { 0.0 } else { rate.clamp(0.0, 1.0) };
        self.shared.update_settings(|settings| settings.failure_rate = rate);
    }

    /// How many requests reached `method` (e.g. "Ticker", "Balance"), whatever they were answered.
    pub fn requests(&self, method: &str) -> u64 {
        lock(&self.shared.request_counts).get(method).copied().unwrap_or(0)
    }

    /// Stops accepting, closes every connection and waits for the server task to finish. An in-memory
    /// simulator has nothing to stop; routers already handed out keep working.
    pub async fn shutdown(self) {
        let Simulator { stop_on_drop, server, .. } = self;
        stop_on_drop.disarm().cancel();
        let Some(server) = server else {
            return;
        };
        if let Err(error) = server.await {
            warn!(error = %error, "Simulator server task failed.");
        }
    }
}

/// Runs a simulator for `exwatch simulate` until `cancel` fires.
pub async fn serve(options: Options, cancel: CancellationToken) -> anyhow::Result<()> {
    let simulator = Simulator::start(options).await?;
    info!(
        address = %simulator.local_addr(),
        base_url = %simulator.base_url(),
        scenario = %simulator.scenario(),
        control = CONTROL_PATH,
        "Kraken simulator listening."
    );
    cancel.cancelled().await;
    simulator.shutdown().await;
    info!("Kraken simulator stopped.");
    Ok(())
}

/// Settings the control endpoint and the [`Simulator`] setters can change while running.
#[derive(Debug, Clone, Copy)]
struct LiveSettings {
    scenario: Scenario,
    latency: Duration,
    failure_rate: f64,
}

impl LiveSettings {
    fn delay(&self) -> Duration {
        match self.scenario {
            Scenario::Slow if self.latency.is_zero() => DEFAULT_SLOW_LATENCY,
            _ => self.latency,
        }
    }
}

/// State shared by every connection. Plain mutexes: each critical section is short and never awaits.
#[derive(Debug)]
struct Shared {
    api_key: String,
    api_secret: Vec<u8>,
    public_rate_limit: Option<PublicRateLimit>,
    settings: Mutex<LiveSettings>,
    request_counts: Mutex<BTreeMap<String, u64>>,
    account: Mutex<Account>,
    public_buckets: Mutex<HashMap<IpAddr, TokenBucket>>,
    redirect_to: Mutex<Option<url::Url>>,
    /// The venue's Statuspage (`/__statuspage/{venue}/api/v2/summary.json`).
    statuspage: statuspage::State,
    /// The venue's WebSocket (`/v2`), told of every scenario change.
    websocket: websocket::State,
}

impl Shared {
    fn new(options: &Options) -> anyhow::Result<Shared> {
        let api_secret = base64::engine::general_purpose::STANDARD
            .decode(options.api_secret.expose().trim())
            .context("the simulator's api_secret is not valid base64")?;
        anyhow::ensure!(
            (0.0..=1.0).contains(&options.failure_rate),
            "the simulator's failure_rate must be between 0.0 and 1.0, got {}",
            options.failure_rate
        );
        if let Some(limit) = options.public_rate_limit {
            anyhow::ensure!(
                limit.refill_per_second.is_finite() && limit.refill_per_second >= 0.0,
                "the simulator's public refill_per_second must be a non-negative number"
            );
        }
        let counter = options.private_counter;
        anyhow::ensure!(
            counter.decay_per_second.is_finite() && counter.decay_per_second >= 0.0,
            "the simulator's private decay_per_second must be a non-negative number"
        );
        Ok(Shared {
            api_key: options.api_key.expose().to_owned(),
            api_secret,
            public_rate_limit: options.public_rate_limit,
            settings: Mutex::new(LiveSettings {
                scenario: options.scenario,
                latency: options.latency,
                failure_rate: options.failure_rate,
            }),
            request_counts: Mutex::new(BTreeMap::new()),
            account: Mutex::new(Account::new(counter, options.lockout_after, options.lockout_duration)),
            public_buckets: Mutex::new(HashMap::new()),
            redirect_to: Mutex::new(options.redirect_to.clone()),
            statuspage: statuspage::State::default(),
            websocket: websocket::State::new(options.scenario),
        })
    }

    fn settings(&self) -> LiveSettings {
        *lock(&self.settings)
    }

    fn update_settings(&self, change: impl FnOnce(&mut LiveSettings)) -> LiveSettings {
        let mut settings = lock(&self.settings);
        change(&mut settings);
        self.websocket.scenario_changed(settings.scenario);
        *settings
    }

    fn count_request(&self, method: &str) {
        let mut counts = lock(&self.request_counts);
        let name =
            if counts.contains_key(method) || counts.len() < MAX_COUNTED_METHODS { method } else { OTHER_METHODS };
        *counts.entry(name.to_string()).or_insert(0) += 1;
    }

    fn control_state(&self) -> ControlState {
        let settings = self.settings();
        ControlState {
            scenario: settings.scenario.as_str(),
            latency_ms: u64::try_from(settings.latency.as_millis()).unwrap_or(u64::MAX),
            failure_rate: settings.failure_rate,
            requests: lock(&self.request_counts).clone(),
            redirect_to: lock(&self.redirect_to).as_ref().map(url::Url::to_string),
        }
    }

    /// The same path and query on the redirect host (under its path prefix, if it has one).
    fn redirect_location(&self, uri: &axum::http::Uri) -> String {
        let configured = lock(&self.redirect_to).clone();
        let mut location = configured.unwrap_or_else(|| {
            url::Url::parse(DEFAULT_REDIRECT_TO).expect("the default redirect target is a valid URL")
        });
        let prefix = location.path().trim_end_matches('/').to_owned();
        location.set_path(&format!("{prefix}{}", uri.path()));
        location.set_query(uri.query());
        location.to_string()
    }

    fn public_call_allowed(&self, client: IpAddr, now: Instant) -> bool {
        let Some(limit) = self.public_rate_limit else {
            return true;
        };
        lock(&self.public_buckets).entry(client).or_insert_with(|| TokenBucket::full(now, limit)).try_take(now, limit)
    }

    /// What Kraken itself (behind Cloudflare) answers: verb check, limits, the scenario's Kraken-level errors,
    /// then the method. Transport-level faults are applied by the caller.
    fn kraken_answer(&self, call: &KrakenCall, request: &ReceivedRequest, settings: LiveSettings) -> Answer {
        let scenario = settings.scenario;
        match call.access {
            Access::Public if request.method != Method::GET => {
                return Answer::method_not_allowed("GET");
            }
            Access::Private if request.method != Method::POST => {
                return Answer::method_not_allowed("POST");
            }
            _ => {}
        }
        let now = Instant::now();
        if call.access == Access::Public && !self.public_call_allowed(request.client, now) {
            return Answer::kraken_error(answer::TOO_MANY_REQUESTS);
        }
        let is_public_system_status = call.access == Access::Public && call.method == "SystemStatus";
        let private = call.access == Access::Private;
        let scenario_error = match scenario {
            Scenario::RateLimited => Some(answer::RATE_LIMIT_EXCEEDED),
            Scenario::TooManyRequests => Some(answer::TOO_MANY_REQUESTS),
            Scenario::Busy => Some(answer::BUSY),
            Scenario::InternalError => Some(answer::INTERNAL_ERROR),
            Scenario::Maintenance | Scenario::Unavailable if !is_public_system_status => Some(answer::UNAVAILABLE),
            Scenario::Flaky if rand::random::<f64>() < settings.failure_rate => Some(answer::UNAVAILABLE),
            Scenario::InvalidKey if private => Some(answer::INVALID_KEY),
            Scenario::InvalidSignature if private => Some(answer::INVALID_SIGNATURE),
            Scenario::Lockout if private => Some(answer::TEMPORARY_LOCKOUT),
            Scenario::UnknownPair if matches!(call.method.as_str(), "Ticker" | "Depth") => {
                Some(answer::UNKNOWN_ASSET_PAIR)
            }
            Scenario::UnknownMethod => Some(answer::UNKNOWN_METHOD),
            Scenario::OversizedError => return answer::oversized_error_answer(),
            Scenario::NulError => Some(answer::NUL_ERROR),
            _ => None,
        };
        if let Some(error) = scenario_error {
            return Answer::kraken_error(error);
        }
        match call.access {
            Access::Public => {
                let advisories = self.statuspage.rest_advisories();
                public_answer(&call.method, request.query.as_deref(), scenario, advisories)
            }
            Access::Private => self.private_answer(call, request, now),
        }
    }

    /// Kraken's checks in the order a client meets them: key (and lockout), nonce present, signature, nonce
    /// fresh, call counter; only then is the method looked up.
    fn private_answer(&self, call: &KrakenCall, request: &ReceivedRequest, now: Instant) -> Answer {
        let presented_key = request.headers.get("API-Key").and_then(|value| value.to_str().ok());
        let key_is_valid = presented_key.is_some_and(|key| bool::from(key.as_bytes().ct_eq(self.api_key.as_bytes())));
        if let Err(error) = lock(&self.account).check_key(now, key_is_valid) {
            return Answer::kraken_error(error);
        }
        let Some(nonce) = find_nonce(&request.headers, &request.body) else {
            return Answer::kraken_error(answer::INVALID_NONCE);
        };
        if !self.signature_is_valid(&call.path, nonce, request) {
            return Answer::kraken_error(answer::INVALID_SIGNATURE);
        }
        let mut account = lock(&self.account);
        if let Err(error) = account.accept_nonce(nonce).and_then(|()| account.charge_call(now)) {
            return Answer::kraken_error(error);
        }
        drop(account);
        match call.method.as_str() {
            "Balance" => Answer::kraken_raw(market::BALANCE_BODY),
            _ => Answer::kraken_error(answer::UNKNOWN_METHOD),
        }
    }

    fn signature_is_valid(&self, path: &str, nonce: u64, request: &ReceivedRequest) -> bool {
        let Some(presented) = request.headers.get("API-Sign").map(|value| value.as_bytes()) else {
            return false;
        };
        // A body that is not UTF-8 cannot be the text the client signed.
        let Ok(body) = std::str::from_utf8(&request.body) else {
            return false;
        };
        let expected = crate::exchange::kraken::sign(path, nonce, body, &self.api_secret);
        bool::from(expected.as_bytes().ct_eq(presented))
    }
}

/// `advisories` are SystemStatus's `emergency` and `upcoming_maintenance` arrays, or `None` to leave them out.
fn public_answer(
    method: &str,
    query: Option<&str>,
    scenario: Scenario,
    advisories: Option<serde_json::Value>,
) -> Answer {
    let now = chrono::Utc::now();
    let result = match method {
        "SystemStatus" => {
            let status = match scenario {
                Scenario::Maintenance => "maintenance",
                Scenario::CancelOnly => "cancel_only",
                _ => "online",
            };
            let mut answer = market::system_status(status, now);
            if let (Some(answer), Some(serde_json::Value::Object(arrays))) = (answer.as_object_mut(), advisories) {
                answer.extend(arrays);
            }
            Ok(answer)
        }
        "Time" => Ok(market::time(now)),
        "Ticker" => market::ticker(query_parameter(query, "pair").as_deref()),
        "Depth" => {
            market::depth(query_parameter(query, "pair").as_deref(), query_parameter(query, "count").as_deref(), now)
        }
        _ => Err(answer::UNKNOWN_METHOD),
    };
    match result {
        Ok(result) => Answer::kraken_result(result),
        Err(error) => Answer::kraken_error(error),
    }
}

fn query_parameter(query: Option<&str>, name: &str) -> Option<String> {
    url::form_urlencoded::parse(query?.as_bytes()).find(|(key, _)| key == name).map(|(_, value)| value.into_owned())
}

/// The nonce from a form body (`nonce=...`) or, when the client says so, a JSON body (`{"nonce": ...}` as a
/// number or a string). Missing or non-numeric means Kraken answers `EAPI:Invalid nonce`.
fn find_nonce(headers: &HeaderMap, body: &[u8]) -> Option<u64> {
    let is_json = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|content_type| content_type.starts_with("application/json"));
    if is_json {
        let body: serde_json::Value = serde_json::from_slice(body).ok()?;
        return match body.get("nonce")? {
            serde_json::Value::Number(number) => number.as_u64(),
            serde_json::Value::String(text) => text.parse().ok(),
            _ => None,
        };
    }
    url::form_urlencoded::parse(body).find(|(key, _)| key == "nonce").and_then(|(_, value)| value.parse().ok())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    Public,
    Private,
}

/// A request to a Kraken path: `/0/public/<method>` or `/0/private/<method>`.
#[derive(Debug)]
struct KrakenCall {
    access: Access,
    method: String,
    path: String,
}

impl KrakenCall {
    fn parse(path: &str) -> Option<KrakenCall> {
        let (access, method) = if let Some(method) = path.strip_prefix("/0/public/") {
            (Access::Public, method)
        } else if let Some(method) = path.strip_prefix("/0/private/") {
            (Access::Private, method)
        } else {
            return None;
        };
        Some(KrakenCall { access, method: method.to_string(), path: path.to_string() })
    }
}

/// The parts of a request the Kraken logic needs, with the body already read.
#[derive(Debug)]
struct ReceivedRequest {
    method: Method,
    query: Option<String>,
    headers: HeaderMap,
    body: Bytes,
    client: IpAddr,
}

/// Per-connection facts that the accept loop puts into each request's extensions.
#[derive(Debug, Clone)]
struct ConnectionContext {
    peer: SocketAddr,
    /// Cancelled by a handler in `reset` mode: the connection task then resets the TCP connection.
    reset: CancellationToken,
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route(CONTROL_PATH, get(get_control).put(put_control))
        .route(statuspage::STATUSPAGE_CONTROL, get(get_statuspage).put(put_statuspage))
        .route("/__statuspage/{venue}/api/v2/summary.json", get(statuspage_summary))
        .route(websocket::WEBSOCKET_CONTROL, get(get_websocket).put(put_websocket))
        .route(websocket::WEBSOCKET_PATH, get(websocket_connect))
        .fallback(kraken)
        .with_state(shared)
}

async fn get_statuspage(State(shared): State<Arc<Shared>>) -> Response {
    axum::Json(shared.statuspage.page()).into_response()
}

async fn put_statuspage(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    match serde_json::from_slice::<statuspage::Update>(&body) {
        Ok(update) => axum::Json(shared.statuspage.update(update)).into_response(),
        Err(error) => control_error(StatusCode::UNPROCESSABLE_ENTITY, format!("invalid statuspage request: {error}")),
    }
}

async fn get_websocket(State(shared): State<Arc<Shared>>) -> Response {
    axum::Json(shared.websocket.live()).into_response()
}

async fn put_websocket(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    match serde_json::from_slice::<websocket::Update>(&body) {
        Ok(update) => axum::Json(shared.websocket.update(update)).into_response(),
        Err(error) => control_error(StatusCode::UNPROCESSABLE_ENTITY, format!("invalid websocket request: {error}")),
    }
}

async fn websocket_connect(State(shared): State<Arc<Shared>>, upgrade: WebSocketUpgrade) -> Response {
    upgrade.on_upgrade(move |socket| async move { shared.websocket.serve(socket).await })
}

async fn statuspage_summary(
    State(shared): State<Arc<Shared>>,
    axum::extract::Path(venue): axum::extract::Path<String>,
) -> Response {
    shared.statuspage.summary(&venue).await
}

async fn kraken(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let context = request.extensions().get::<ConnectionContext>().cloned();
    let (parts, body) = request.into_parts();
    let Some(call) = KrakenCall::parse(parts.uri.path()) else {
        return Answer::not_found().into_response();
    };
    shared.count_request(&call.method);
    let Ok(body) = axum::body::to_bytes(body, MAX_REQUEST_BODY_BYTES).await else {
        return (StatusCode::PAYLOAD_TOO_LARGE, "413 Request Entity Too Large\n").into_response();
    };
    // Settings are read once, on arrival, so a scenario switch mid-delay does not mix two behaviours.
    let settings = shared.settings();
    let delay = settings.delay();
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    if let Some(status) = settings.scenario.redirect_status() {
        return Answer::redirect(status, shared.redirect_location(&parts.uri)).into_response();
    }
    let answer = match settings.scenario {
        Scenario::Reset => return reset(context).await,
        Scenario::Silent => {
            tokio::time::sleep(SILENT_HOLD).await;
            return reset(context).await;
        }
        Scenario::NotFound => Answer::front_end_error(StatusCode::NOT_FOUND),
        Scenario::BadRequest => Answer::front_end_error(StatusCode::BAD_REQUEST),
        Scenario::MethodNotAllowed => Answer::front_end_error(StatusCode::METHOD_NOT_ALLOWED),
        Scenario::Cloudflare520 => {
            Answer::cloudflare_error(StatusCode::from_u16(520).unwrap_or(StatusCode::BAD_GATEWAY))
        }
        Scenario::Cloudflare502 => Answer::cloudflare_error(StatusCode::BAD_GATEWAY),
        Scenario::Cloudflare504 => Answer::cloudflare_error(StatusCode::GATEWAY_TIMEOUT),
        Scenario::Http429 => Answer::kraken_error_with_status(StatusCode::TOO_MANY_REQUESTS, answer::TOO_MANY_REQUESTS),
        Scenario::Html200 => Answer::html_page(),
        Scenario::EmptyBody => Answer::empty(),
        _ => {
            let received = ReceivedRequest {
                method: parts.method,
                query: parts.uri.query().map(str::to_string),
                headers: parts.headers,
                body,
                // In process there is no peer; the caller is this very host.
                client: context.map_or(IpAddr::V4(Ipv4Addr::LOCALHOST), |context| context.peer.ip()),
            };
            let answer = shared.kraken_answer(&call, &received, settings);
            if settings.scenario == Scenario::TruncatedJson { answer.truncated() } else { answer }
        }
    };
    answer.into_response()
}

/// Resets the connection without an answer. Without our accept loop (a router driven in process) there is no
/// socket to reset: the marker asks the client's in-memory transport to report a reset. Anything else sees an
/// empty 200.
async fn reset(context: Option<ConnectionContext>) -> Response {
    match context {
        Some(context) => {
            context.reset.cancel();
            // The connection task drops this future together with the connection; nothing is ever sent.
            std::future::pending().await
        }
        None => {
            let mut response = Answer::empty().into_response();
            response.extensions_mut().insert(ConnectionReset);
            response
        }
    }
}

/// The control endpoint's view of the simulator.
#[derive(Debug, serde::Serialize)]
struct ControlState {
    scenario: &'static str,
    latency_ms: u64,
    failure_rate: f64,
    requests: BTreeMap<String, u64>,
    /// Only once set (in the options or through the control endpoint); otherwise [`DEFAULT_REDIRECT_TO`].
    #[serde(skip_serializing_if = "Option::is_none")]
    redirect_to: Option<String>,
}

/// A change requested through `PUT /__exwatch/simulator`; absent fields stay as they are.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ControlUpdate {
    scenario: Option<String>,
    /// Human-readable, e.g. "250ms" or "2s".
    latency: Option<String>,
    failure_rate: Option<f64>,
    /// Where the `redirect_*` scenarios point: an http(s) URL with a host.
    redirect_to: Option<String>,
}

async fn get_control(State(shared): State<Arc<Shared>>) -> Response {
    axum::Json(shared.control_state()).into_response()
}

/// Validates the whole change before applying any of it, and names every problem at once.
async fn put_control(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let update: ControlUpdate = match serde_json::from_slice(&body) {
        Ok(update) => update,
        Err(error) => {
            // Unparseable text is a bad request; well-formed JSON with wrong fields or types is unprocessable.
            let status = if error.is_data() { StatusCode::UNPROCESSABLE_ENTITY } else { StatusCode::BAD_REQUEST };
            return control_error(status, format!("invalid control request: {error}"));
        }
    };
    let mut problems = Vec::new();
    let scenario = match update.scenario.as_deref().map(Scenario::from_str).transpose() {
        Ok(scenario) => scenario,
        Err(error) => {
            problems.push(error.to_string());
            None
        }
    };
    let latency = match update.latency.as_deref().map(humantime::parse_duration).transpose() {
        Ok(latency) => latency,
        Err(error) => {
            problems.push(format!("invalid latency {:?}: {error}", update.latency.unwrap_or_default()));
            None
        }
    };
    if let Some(rate) = update.failure_rate
        && !(0.0..=1.0).contains(&rate)
    {
        problems.push(format!("failure_rate must be between 0.0 and 1.0, got {rate}"));
    }
    let redirect_to = match update.redirect_to.as_deref().map(parse_redirect_to).transpose() {
        Ok(redirect_to) => redirect_to,
        Err(problem) => {
            problems.push(problem);
            None
        }
    };
    if !problems.is_empty() {
        return control_error(StatusCode::UNPROCESSABLE_ENTITY, problems.join("; "));
    }
    if let Some(redirect_to) = redirect_to {
        *lock(&shared.redirect_to) = Some(redirect_to);
    }
    let settings = shared.update_settings(|settings| {
        if let Some(scenario) = scenario {
            settings.scenario = scenario;
        }
        if let Some(latency) = latency {
            settings.latency = latency;
        }
        if let Some(rate) = update.failure_rate {
            settings.failure_rate = rate;
        }
    });
    info!(
        scenario = %settings.scenario,
        latency = ?settings.latency,
        failure_rate = settings.failure_rate,
        "Simulator settings changed."
    );
    axum::Json(shared.control_state()).into_response()
}

/// A redirect target: an absolute http(s) URL with a host.
pub fn parse_redirect_to(text: &str) -> Result<url::Url, String> {
    match url::Url::parse(text) {
        Ok(url) if matches!(url.scheme(), "http" | "https") && url.host().is_some() => Ok(url),
        _ => Err(format!("invalid redirect_to {text:?}: expected an http or https URL with a host")),
    }
}

fn control_error(status: StatusCode, message: String) -> Response {
    (status, axum::Json(serde_json::json!({ "error": message }))).into_response()
}

/// Accepts connections until `cancel` fires, then waits for every connection task, which stop promptly
/// because they watch the same token.
async fn accept_connections(listener: TcpListener, router: Router, cancel: CancellationToken) {
    let connections = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            () = cancel.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                connections.spawn(serve_connection(stream, peer, router.clone(), cancel.clone()));
            }
            Err(error) => {
                // Usually out of file descriptors: pause rather than spin on the same error.
                warn!(error = %error, "Simulator failed to accept a connection.");
                tokio::select! {
                    () = cancel.cancelled() => break,
                    () = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
            }
        }
    }
    drop(listener);
    connections.close();
    connections.wait().await;
}

/// Serves one connection with hyper. A second handle on the same socket is kept because hyper owns the
/// stream: to reset, SO_LINGER 0 is set through that handle, then both are dropped, and closing a socket
/// with a zero linger makes the kernel send RST instead of FIN.
async fn serve_connection(stream: TcpStream, peer: SocketAddr, router: Router, cancel: CancellationToken) {
    if let Err(error) = stream.set_nodelay(true) {
        debug!(error = %error, "Simulator could not set TCP_NODELAY.");
    }
    let duplicate = match socket2::SockRef::from(&stream).try_clone() {
        Ok(duplicate) => duplicate,
        Err(error) => {
            warn!(error = %error, "Simulator could not duplicate a connection's socket; dropping it.");
            return;
        }
    };
    let reset = CancellationToken::new();
    let context = ConnectionContext { peer, reset: reset.clone() };
    let service = hyper::service::service_fn(move |mut request: hyper::Request<hyper::body::Incoming>| {
        request.extensions_mut().insert(context.clone());
        router.clone().oneshot(request)
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .serve_connection(TokioIo::new(stream), service)
        // The WebSocket at `/v2` is an HTTP upgrade.
        .with_upgrades();
    tokio::select! {
        result = connection => {
            if let Err(error) = result {
                debug!(error = %error, %peer, "Simulator connection ended with an error.");
            }
        }
        () = reset.cancelled() => {
            if let Err(error) = duplicate.set_linger(Some(Duration::ZERO)) {
                warn!(error = %error, "Simulator could not set SO_LINGER for a reset.");
            }
        }
        () = cancel.cancelled() => {}
    }
    // The connection (and its stream) were dropped when the select finished; this closes the last handle.
    drop(duplicate);
}

/// A poisoned lock only means another request panicked mid-update; the simulator's state stays usable.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use serde_json::{Value, json};

    use super::*;

    /// Options for tests: the public limiter is off unless a test is about it, so call counts never trip it.
    fn test_options(scenario: Scenario) -> Options {
        Options { scenario, public_rate_limit: None, ..Options::default() }
    }

    async fn start(options: Options) -> Simulator {
        Simulator::start(options).await.expect("the simulator starts on a free loopback port")
    }

    fn client() -> reqwest::Client {
        // reqwest is built without a default TLS provider; installing one is harmless and makes the builder
        // happy whichever way it checks. The error only says one was already installed.
        let _ = rustls::crypto::ring::default_provider().install_default();
        client_builder().build().expect("a plain HTTP client builds")
    }

    /// Never follows a redirect: the tests look at the redirect itself.
    fn client_builder() -> reqwest::ClientBuilder {
        reqwest::Client::builder().no_proxy().redirect(reqwest::redirect::Policy::none())
    }

    /// A status, headers and body as the client saw them.
    #[derive(Debug)]
    struct Seen {
        status: u16,
        headers: reqwest::header::HeaderMap,
        body: String,
    }

    impl Seen {
        fn json(&self) -> Value {
            serde_json::from_str(&self.body).unwrap_or_else(|error| panic!("{error}: {:?}", self.body))
        }

        fn kraken_error(&self) -> Option<String> {
            let body = self.json();
            let error = body["error"].as_array()?.first()?.as_str()?.to_string();
            assert!(body.get("result").is_none(), "errors are error-only: {body}");
            Some(error)
        }

        fn header(&self, name: &str) -> &str {
            self.headers.get(name).and_then(|value| value.to_str().ok()).unwrap_or("")
        }
    }

    async fn seen(response: Result<reqwest::Response, reqwest::Error>) -> Result<Seen, reqwest::Error> {
        let response = response?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response.text().await?;
        Ok(Seen { status, headers, body })
    }

    async fn get(client: &reqwest::Client, simulator: &Simulator, path_and_query: &str) -> Seen {
        try_get(client, simulator, path_and_query).await.expect("the simulator answers")
    }

    async fn try_get(
        client: &reqwest::Client,
        simulator: &Simulator,
        path_and_query: &str,
    ) -> Result<Seen, reqwest::Error> {
        seen(client.get(format!("{}{path_and_query}", simulator.base_url())).send().await).await
    }

    /// Signs private calls like a real client: one strictly increasing nonce source per key.
    struct Signer {
        key: String,
        secret: Vec<u8>,
        next_nonce: AtomicU64,
    }

    impl Signer {
        fn new(key: &str) -> Signer {
            let secret = base64::engine::general_purpose::STANDARD.decode(DEFAULT_API_SECRET).unwrap();
            Signer { key: key.to_string(), secret, next_nonce: AtomicU64::new(1_616_492_376_594) }
        }

        fn nonce(&self) -> u64 {
            self.next_nonce.fetch_add(1, Ordering::SeqCst)
        }

        async fn call(
            &self,
            client: &reqwest::Client,
            simulator: &Simulator,
            method: &str,
            nonce: u64,
        ) -> Result<Seen, reqwest::Error> {
            let path = format!("/0/private/{method}");
            let body = format!("nonce={nonce}");
            let signature = crate::exchange::kraken::sign(&path, nonce, &body, &self.secret);
            self.send(client, simulator, &path, body, Some(signature)).await
        }

        async fn send(
            &self,
            client: &reqwest::Client,
            simulator: &Simulator,
            path: &str,
            body: String,
            signature: Option<String>,
        ) -> Result<Seen, reqwest::Error> {
            let mut request = client
                .post(format!("{}{path}", simulator.base_url()))
                .header("API-Key", &self.key)
                .header("Content-Type", "application/x-www-form-urlencoded")
                .body(body);
            if let Some(signature) = signature {
                request = request.header("API-Sign", signature);
            }
            seen(request.send().await).await
        }

        async fn balance(&self, client: &reqwest::Client, simulator: &Simulator) -> Seen {
            self.call(client, simulator, "Balance", self.nonce()).await.expect("the simulator answers")
        }
    }

    fn good_signer() -> Signer {
        Signer::new(DEFAULT_API_KEY)
    }

    #[test]
    fn scenario_names_round_trip_and_unknown_names_list_the_valid_ones() {
        for scenario in Scenario::ALL {
            assert_eq!(scenario.as_str().parse::<Scenario>(), Ok(scenario));
            assert_eq!(scenario.to_string(), scenario.as_str());
        }
        let error = "meltdown".parse::<Scenario>().unwrap_err().to_string();
        assert!(error.contains("\"meltdown\""), "{error}");
        for scenario in Scenario::ALL {
            assert!(error.contains(scenario.as_str()), "{error} lacks {scenario}");
        }
    }

    #[tokio::test]
    async fn start_rejects_a_secret_that_is_not_base64() {
        let options = Options { api_secret: Secret::new("not base64!"), ..Options::default() };
        let error = Simulator::start(options).await.unwrap_err();
        assert!(error.to_string().contains("api_secret"), "{error}");
    }

    #[tokio::test]
    async fn system_status_reports_online_with_the_current_time() {
        let simulator = start(test_options(Scenario::Healthy)).await;
        let answer = get(&client(), &simulator, "/0/public/SystemStatus").await;
        assert_eq!(answer.status, 200);
        assert!(answer.header("content-type").starts_with("application/json"));
        let body = answer.json();
        assert_eq!(body["error"], json!([]));
        assert_eq!(body["result"]["status"], "online");
        let timestamp = body["result"]["timestamp"].as_str().unwrap();
        assert!(timestamp.ends_with('Z') && timestamp.len() == 20, "{timestamp}");
        let timestamp = chrono::DateTime::parse_from_rfc3339(timestamp).unwrap();
        assert!((chrono::Utc::now().timestamp() - timestamp.timestamp()).abs() <= 5);
    }

    #[tokio::test]
    async fn time_returns_unixtime_and_a_matching_two_digit_year_rfc1123() {
        let simulator = start(test_options(Scenario::Healthy)).await;
        let body = get(&client(), &simulator, "/0/public/Time").await.json();
        let unixtime = body["result"]["unixtime"].as_i64().expect("unixtime is an integer");
        assert!((chrono::Utc::now().timestamp() - unixtime).abs() <= 5);
        let rfc1123 = body["result"]["rfc1123"].as_str().unwrap();
        let expected = chrono::DateTime::from_timestamp(unixtime, 0).unwrap().format("%a, %e %b %y %H:%M:%S +0000");
        assert_eq!(rfc1123, expected.to_string());
    }

    #[tokio::test]
    async fn ticker_keys_xbtaud_as_xbtaud_and_xbtusd_as_xxbtzusd() {
        let simulator = start(test_options(Scenario::Healthy)).await;
        let client = client();
        for (requested, key) in [("XBTAUD", "XBTAUD"), ("XBTUSD", "XXBTZUSD"), ("XXBTZUSD", "XXBTZUSD")] {
            let answer = get(&client, &simulator, &format!("/0/public/Ticker?pair={requested}")).await;
            assert_eq!(answer.status, 200);
            let body = answer.json();
            let result = body["result"].as_object().unwrap();
            assert_eq!(result.keys().collect::<Vec<_>>(), vec![key], "{requested}");
            let ticker = &result[key];
            for (field, length) in [("a", 3), ("b", 3), ("c", 2), ("v", 2), ("p", 2), ("l", 2), ("h", 2)] {
                let values = ticker[field].as_array().unwrap();
                assert_eq!(values.len(), length, "{field}");
                for value in values {
                    value.as_str().unwrap().parse::<f64>().unwrap();
                }
            }
            assert!(ticker["t"].as_array().unwrap().iter().all(Value::is_u64));
            ticker["o"].as_str().unwrap().parse::<f64>().unwrap();
        }
        let body = get(&client, &simulator, "/0/public/Ticker?pair=XBTAUD").await.json();
        let ask: f64 = body["result"]["XBTAUD"]["a"][0].as_str().unwrap().parse().unwrap();
        assert!((150_000.0..170_000.0).contains(&ask), "XBTAUD looks like the fixture: {ask}");
    }

    #[tokio::test]
    async fn ticker_rejects_unknown_and_missing_pairs() {
        let simulator = start(test_options(Scenario::Healthy)).await;
        let client = client();
        for path in ["/0/public/Ticker?pair=NOPENOPE", "/0/public/Ticker"] {
            let answer = get(&client, &simulator, path).await;
            assert_eq!(answer.status, 200);
            assert_eq!(answer.kraken_error().as_deref(), Some("EQuery:Unknown asset pair"), "{path}");
        }
    }

    #[tokio::test]
    async fn depth_returns_the_requested_levels_sorted_on_each_side() {
        let simulator = start(test_options(Scenario::Healthy)).await;
        let client = client();
        let body = get(&client, &simulator, "/0/public/Depth?pair=XBTAUD&count=7").await.json();
        let book = &body["result"]["XBTAUD"];
        let prices = |side: &str| -> Vec<f64> {
            book[side]
                .as_array()
                .unwrap()
                .iter()
                .map(|level| {
                    assert!(level[1].is_string() && level[2].is_i64(), "{level}");
                    level[0].as_str().unwrap().parse().unwrap()
                })
                .collect()
        };
        let (asks, bids) = (prices("asks"), prices("bids"));
        assert_eq!((asks.len(), bids.len()), (7, 7));
        assert!(asks.windows(2).all(|pair| pair[0] < pair[1]), "asks ascend: {asks:?}");
        assert!(bids.windows(2).all(|pair| pair[0] > pair[1]), "bids descend: {bids:?}");
        assert!(bids[0] < asks[0]);
        let body = get(&client, &simulator, "/0/public/Depth?pair=XBTUSD").await.json();
        assert_eq!(body["result"]["XXBTZUSD"]["asks"].as_array().unwrap().len(), 100);
        let answer = get(&client, &simulator, "/0/public/Depth?pair=XBTAUD&count=501").await;
        assert_eq!(answer.kraken_error().as_deref(), Some("EGeneral:Invalid arguments"));
        let answer = get(&client, &simulator, "/0/public/Depth?pair=NOPE").await;
        assert_eq!(answer.kraken_error().as_deref(), Some("EQuery:Unknown asset pair"));
    }

    #[tokio::test]
    async fn unknown_public_method_is_reported_as_unknown() {
        let simulator = start(test_options(Scenario::Healthy)).await;
        let answer = get(&client(), &simulator, "/0/public/Frobnicate").await;
        assert_eq!(answer.status, 200);
        assert_eq!(answer.kraken_error().as_deref(), Some("EGeneral:Unknown method"));
    }

    #[tokio::test]
    async fn wrong_verbs_get_a_405_that_is_not_json() {
        let simulator = start(test_options(Scenario::Healthy)).await;
        let client = client();
        let answer = seen(client.post(format!("{}/0/public/Ticker?pair=XBTAUD", simulator.base_url())).send().await)
            .await
            .unwrap();
        assert_eq!(answer.status, 405);
        assert!(serde_json::from_str::<Value>(&answer.body).is_err(), "{:?}", answer.body);
        assert!(!answer.body.is_empty() && answer.body.len() < 100);
        let answer = get(&client, &simulator, "/0/private/Balance").await;
        assert_eq!(answer.status, 405);
        assert!(serde_json::from_str::<Value>(&answer.body).is_err());
    }

    #[tokio::test]
    async fn a_correctly_signed_balance_succeeds_with_krakens_example_body() {
        let simulator = start(test_options(Scenario::Healthy)).await;
        let answer = good_signer().balance(&client(), &simulator).await;
        assert_eq!(answer.status, 200);
        let body = answer.json();
        assert_eq!(body["error"], json!([]));
        assert_eq!(body["result"]["ZUSD"], "171288.6158");
        assert_eq!(body["result"]["XXBT"], "1011.1908877900");
        assert_eq!(simulator.requests("Balance"), 1);
    }

    #[tokio::test]
    async fn balance_rejects_a_wrong_signature_a_reused_nonce_a_missing_nonce_and_a_wrong_key() {
        let simulator = start(test_options(Scenario::Healthy)).await;
        let client = client();
        let signer = good_signer();
        let error = |seen: Result<Seen, reqwest::Error>| seen.unwrap().kraken_error();

        let nonce = signer.nonce();
        let body = format!("nonce={nonce}");
        let wrong_signature = crate::exchange::kraken::sign("/0/private/Balance", nonce, "nonce=1", &signer.secret);
        let sent = signer.send(&client, &simulator, "/0/private/Balance", body.clone(), Some(wrong_signature)).await;
        assert_eq!(error(sent).as_deref(), Some("EAPI:Invalid signature"));
        let sent = signer.send(&client, &simulator, "/0/private/Balance", body, None).await;
        assert_eq!(error(sent).as_deref(), Some("EAPI:Invalid signature"));

        // A rejected signature does not consume the nonce, so the same nonce now succeeds once.
        assert_eq!(error(signer.call(&client, &simulator, "Balance", nonce).await), None);
        assert_eq!(
            error(signer.call(&client, &simulator, "Balance", nonce).await).as_deref(),
            Some("EAPI:Invalid nonce")
        );
        assert_eq!(
            error(signer.call(&client, &simulator, "Balance", nonce - 1).await).as_deref(),
            Some("EAPI:Invalid nonce")
        );

        let sent =
            signer.send(&client, &simulator, "/0/private/Balance", "otp=123".to_string(), Some("x".into())).await;
        assert_eq!(error(sent).as_deref(), Some("EAPI:Invalid nonce"));

        let stranger = Signer::new("somebody-elses-key");
        assert_eq!(
            error(stranger.call(&client, &simulator, "Balance", stranger.nonce()).await).as_deref(),
            Some("EAPI:Invalid key")
        );
        let sent =
            seen(client.post(format!("{}/0/private/Balance", simulator.base_url())).body("nonce=5").send().await).await;
        assert_eq!(error(sent).as_deref(), Some("EAPI:Invalid key"));
    }

    #[tokio::test]
    async fn balance_accepts_a_signed_json_body() {
        let simulator = start(test_options(Scenario::Healthy)).await;
        let signer = good_signer();
        let nonce = signer.nonce();
        let body = format!("{{\"nonce\":\"{nonce}\"}}");
        let signature = crate::exchange::kraken::sign("/0/private/Balance", nonce, &body, &signer.secret);
        let answer = seen(
            client()
                .post(format!("{}/0/private/Balance", simulator.base_url()))
                .header("API-Key", DEFAULT_API_KEY)
                .header("API-Sign", signature)
                .header("Content-Type", "application/json")
                .body(body)
                .send()
                .await,
        )
        .await
        .unwrap();
        assert_eq!(answer.json()["error"], json!([]));
    }

    #[tokio::test]
    async fn unknown_private_method_is_reported_after_authentication() {
        let simulator = start(test_options(Scenario::Healthy)).await;
        let signer = good_signer();
        let answer = signer.call(&client(), &simulator, "Frobnicate", signer.nonce()).await.unwrap();
        assert_eq!(answer.kraken_error().as_deref(), Some("EGeneral:Unknown method"));
    }

    #[tokio::test]
    async fn consecutive_invalid_keys_lead_to_a_lockout_that_also_refuses_the_good_key() {
        let options = Options { lockout_after: 3, ..test_options(Scenario::Healthy) };
        let simulator = start(options).await;
        let client = client();
        let stranger = Signer::new("wrong-key");
        for _ in 0..3 {
            assert_eq!(stranger.balance(&client, &simulator).await.kraken_error().as_deref(), Some("EAPI:Invalid key"));
        }
        assert_eq!(
            stranger.balance(&client, &simulator).await.kraken_error().as_deref(),
            Some("EGeneral:Temporary lockout")
        );
        assert_eq!(
            good_signer().balance(&client, &simulator).await.kraken_error().as_deref(),
            Some("EGeneral:Temporary lockout")
        );
        // Public calls are not affected by a private lockout.
        assert_eq!(get(&client, &simulator, "/0/public/Time").await.json()["error"], json!([]));
    }

    #[tokio::test]
    async fn lockout_ends_after_its_duration() {
        let options = Options {
            lockout_after: 1,
            lockout_duration: Duration::from_millis(300),
            ..test_options(Scenario::Healthy)
        };
        let simulator = start(options).await;
        let client = client();
        let signer = good_signer();
        assert_eq!(
            Signer::new("wrong").balance(&client, &simulator).await.kraken_error().as_deref(),
            Some("EAPI:Invalid key")
        );
        let started = Instant::now();
        assert_eq!(
            signer.balance(&client, &simulator).await.kraken_error().as_deref(),
            Some("EGeneral:Temporary lockout")
        );
        // Poll with the good key, which does not restart the timer, until the lockout lapses.
        let deadline = started + Duration::from_secs(5);
        loop {
            if signer.balance(&client, &simulator).await.kraken_error().is_none() {
                break;
            }
            assert!(Instant::now() < deadline, "the lockout never ended");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(started.elapsed() >= Duration::from_millis(250));
    }

    #[tokio::test]
    async fn private_counter_refuses_calls_faster_than_its_decay() {
        let options = Options {
            private_counter: PrivateCounter { max: 3, decay_per_second: 0.01 },
            ..test_options(Scenario::Healthy)
        };
        let simulator = start(options).await;
        let client = client();
        let signer = good_signer();
        for _ in 0..3 {
            assert_eq!(signer.balance(&client, &simulator).await.kraken_error(), None);
        }
        let answer = signer.balance(&client, &simulator).await;
        assert_eq!(answer.status, 200);
        assert_eq!(answer.kraken_error().as_deref(), Some("EAPI:Rate limit exceeded"));
        assert_eq!(simulator.requests("Balance"), 4);
    }

    #[tokio::test]
    async fn public_limiter_answers_too_many_requests_once_the_burst_is_spent() {
        let options = Options {
            public_rate_limit: Some(PublicRateLimit { burst: 3, refill_per_second: 0.01 }),
            ..Options::default()
        };
        let simulator = start(options).await;
        let client = client();
        for _ in 0..3 {
            assert_eq!(get(&client, &simulator, "/0/public/Time").await.kraken_error(), None);
        }
        let answer = get(&client, &simulator, "/0/public/Ticker?pair=XBTAUD").await;
        assert_eq!(answer.status, 200);
        assert_eq!(answer.kraken_error().as_deref(), Some("EGeneral:Too many requests"));
        // Private calls have their own counter and are not charged to the public bucket.
        assert_eq!(good_signer().balance(&client, &simulator).await.kraken_error(), None);
    }

    /// What one call is expected to show the client in a scenario.
    #[derive(Debug)]
    enum Expected {
        Success,
        SystemStatus(&'static str),
        KrakenError(u16, &'static str),
        Cloudflare(u16, &'static str),
        Html,
        Empty,
        BrokenJson,
        Reset,
        Redirect(u16),
        FrontEnd(u16, &'static str),
        Silent,
    }

    #[derive(Debug, Clone, Copy)]
    enum Call {
        SystemStatus,
        Ticker,
        Balance,
    }

    fn expected(scenario: Scenario, call: Call) -> Expected {
        use Expected::*;
        let healthy = match call {
            Call::SystemStatus => SystemStatus("online"),
            Call::Ticker | Call::Balance => Success,
        };
        let private = matches!(call, Call::Balance);
        match scenario {
            Scenario::Healthy | Scenario::Slow => healthy,
            Scenario::Maintenance => match call {
                Call::SystemStatus => SystemStatus("maintenance"),
                _ => KrakenError(200, "EService:Unavailable"),
            },
            Scenario::CancelOnly => match call {
                Call::SystemStatus => SystemStatus("cancel_only"),
                _ => Success,
            },
            Scenario::Unavailable => match call {
                Call::SystemStatus => SystemStatus("online"),
                _ => KrakenError(200, "EService:Unavailable"),
            },
            Scenario::RateLimited => KrakenError(200, "EAPI:Rate limit exceeded"),
            Scenario::TooManyRequests => KrakenError(200, "EGeneral:Too many requests"),
            Scenario::Http429 => KrakenError(429, "EGeneral:Too many requests"),
            Scenario::InvalidKey if private => KrakenError(200, "EAPI:Invalid key"),
            Scenario::InvalidSignature if private => KrakenError(200, "EAPI:Invalid signature"),
            Scenario::Lockout if private => KrakenError(200, "EGeneral:Temporary lockout"),
            Scenario::InvalidKey | Scenario::InvalidSignature | Scenario::Lockout => healthy,
            Scenario::Cloudflare520 => Cloudflare(520, "520: Web server is returning an unknown error"),
            Scenario::Cloudflare502 => Cloudflare(502, "502: Bad gateway"),
            Scenario::Cloudflare504 => Cloudflare(504, "504: Gateway time-out"),
            Scenario::Html200 => Html,
            Scenario::EmptyBody => Empty,
            Scenario::TruncatedJson => BrokenJson,
            Scenario::Busy => KrakenError(200, "EService:Busy"),
            Scenario::InternalError => KrakenError(200, "EGeneral:Internal error:5"),
            Scenario::Reset => Reset,
            // The table runs `flaky` with failure_rate 1.0, so every call fails.
            Scenario::Flaky => KrakenError(200, "EService:Unavailable"),
            Scenario::Redirect301 => Redirect(301),
            Scenario::Redirect302 => Redirect(302),
            Scenario::Redirect303 => Redirect(303),
            Scenario::Redirect307 => Redirect(307),
            Scenario::Redirect308 => Redirect(308),
            Scenario::NotFound => FrontEnd(404, "404 Not Found"),
            Scenario::BadRequest => FrontEnd(400, "400 Bad Request"),
            Scenario::MethodNotAllowed => FrontEnd(405, "405 Not Allowed"),
            Scenario::UnknownPair => match call {
                Call::Ticker => KrakenError(200, "EQuery:Unknown asset pair"),
                _ => healthy,
            },
            Scenario::UnknownMethod => KrakenError(200, "EGeneral:Unknown method"),
            Scenario::Silent => Silent,
            Scenario::OversizedError => KrakenError(200, answer::oversized_error()),
            Scenario::NulError => KrakenError(200, "EGeneral:Internal error:\0nul"),
        }
    }

    fn check(scenario: Scenario, call: Call, outcome: Result<Seen, reqwest::Error>) {
        let context = format!("{scenario} {call:?}");
        let seen = match (expected(scenario, call), outcome) {
            (Expected::Reset, Err(error)) => {
                let chain = error_chain(&error);
                assert!(chain.contains("reset") || chain.contains("closed"), "{context}: {chain}");
                return;
            }
            (Expected::Silent, Err(error)) => {
                assert!(error.is_timeout(), "{context}: {}", error_chain(&error));
                return;
            }
            (expected, Err(error)) => panic!("{context}: expected {expected:?}, got {}", error_chain(&error)),
            (_, Ok(seen)) => seen,
        };
        match expected(scenario, call) {
            Expected::Success => {
                assert_eq!(seen.status, 200, "{context}");
                let body = seen.json();
                assert_eq!(body["error"], json!([]), "{context}");
                assert!(body["result"].is_object(), "{context}");
            }
            Expected::SystemStatus(status) => {
                assert_eq!(seen.status, 200, "{context}");
                assert_eq!(seen.json()["result"]["status"], status, "{context}");
            }
            Expected::KrakenError(status, error) => {
                assert_eq!(seen.status, status, "{context}");
                assert_eq!(seen.kraken_error().as_deref(), Some(error), "{context}");
            }
            Expected::Cloudflare(status, title) => {
                assert_eq!(seen.status, status, "{context}");
                assert_eq!(seen.header("content-type"), "text/html; charset=UTF-8", "{context}");
                assert_eq!(seen.header("server"), "cloudflare", "{context}");
                assert!(seen.header("cf-ray").ends_with("-SYD"), "{context}");
                assert!(seen.body.contains(&format!("<title>api.kraken.com | {title}</title>")), "{context}");
            }
            Expected::Html => {
                assert_eq!(seen.status, 200, "{context}");
                assert!(seen.header("content-type").starts_with("text/html"), "{context}");
                assert!(seen.body.trim_start().starts_with("<!DOCTYPE html>"), "{context}");
            }
            Expected::Empty => {
                assert_eq!(seen.status, 200, "{context}");
                assert!(seen.body.is_empty(), "{context}");
            }
            Expected::BrokenJson => {
                assert_eq!(seen.status, 200, "{context}");
                assert!(seen.body.starts_with("{\""), "{context}: {:?}", seen.body);
                assert!(serde_json::from_str::<Value>(&seen.body).is_err(), "{context}: {:?}", seen.body);
            }
            Expected::Redirect(status) => {
                assert_eq!(seen.status, status, "{context}");
                let location = seen.header("location");
                assert!(location.starts_with(&format!("{DEFAULT_REDIRECT_TO}/0/")), "{context}: {location}");
                assert!(seen.body.contains(&format!("<title>{status} ")), "{context}: {}", seen.body);
            }
            Expected::FrontEnd(status, title) => {
                assert_eq!(seen.status, status, "{context}");
                assert!(seen.header("content-type").starts_with("text/html"), "{context}");
                assert_eq!(seen.header("server"), "cloudflare", "{context}");
                assert!(seen.body.contains(&format!("<title>{title}</title>")), "{context}: {}", seen.body);
                assert!(serde_json::from_str::<Value>(&seen.body).is_err(), "{context}");
            }
            Expected::Reset => panic!("{context}: expected a reset, got HTTP {}", seen.status),
            Expected::Silent => panic!("{context}: expected no answer, got HTTP {}", seen.status),
        }
    }

    fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
        let mut chain = error.to_string();
        let mut source = error.source();
        while let Some(cause) = source {
            chain.push_str(": ");
            chain.push_str(&cause.to_string());
            source = cause.source();
        }
        chain.to_lowercase()
    }

    #[tokio::test]
    async fn every_scenario_answers_as_specified() {
        for scenario in Scenario::ALL {
            let options = Options {
                failure_rate: 1.0,
                latency: if scenario == Scenario::Slow { Duration::from_millis(200) } else { Duration::ZERO },
                ..test_options(scenario)
            };
            let simulator = start(options).await;
            // `silent` never answers: only a client timeout ends its calls.
            let client = match scenario {
                Scenario::Silent => client_builder().timeout(Duration::from_millis(300)).build().unwrap(),
                _ => client(),
            };
            let started = Instant::now();
            check(scenario, Call::SystemStatus, try_get(&client, &simulator, "/0/public/SystemStatus").await);
            if scenario == Scenario::Slow {
                assert!(started.elapsed() >= Duration::from_millis(200), "slow took {:?}", started.elapsed());
            }
            check(scenario, Call::Ticker, try_get(&client, &simulator, "/0/public/Ticker?pair=XBTAUD").await);
            let signer = good_signer();
            check(scenario, Call::Balance, signer.call(&client, &simulator, "Balance", signer.nonce()).await);
            assert_eq!(simulator.requests("SystemStatus"), 1, "{scenario}");
            assert_eq!(simulator.requests("Ticker"), 1, "{scenario}");
            assert_eq!(simulator.requests("Balance"), 1, "{scenario}");
            // The control endpoint is never faulted.
            let control = get(&client, &simulator, CONTROL_PATH).await;
            assert_eq!(control.status, 200, "{scenario}");
            assert_eq!(control.json()["scenario"], scenario.as_str());
            simulator.shutdown().await;
        }
    }

    #[tokio::test]
    async fn reset_kills_the_connection_and_the_control_endpoint_keeps_answering() {
        let simulator = start(test_options(Scenario::Reset)).await;
        let client = client();
        let error = try_get(&client, &simulator, "/0/public/Time").await.unwrap_err();
        let chain = error_chain(&error);
        assert!(chain.contains("connection reset"), "{chain}");
        assert_eq!(simulator.requests("Time"), 1);
        // Switch back through the control endpoint on the same port, and Kraken answers again.
        let answer = seen(
            client
                .put(format!("{}{CONTROL_PATH}", simulator.base_url()))
                .body(r#"{"scenario":"healthy"}"#)
                .send()
                .await,
        )
        .await
        .unwrap();
        assert_eq!(answer.status, 200);
        assert_eq!(get(&client, &simulator, "/0/public/Time").await.json()["error"], json!([]));
    }

    #[tokio::test]
    async fn flaky_with_a_zero_failure_rate_is_healthy() {
        let simulator = start(Options { failure_rate: 0.0, ..test_options(Scenario::Flaky) }).await;
        let client = client();
        for _ in 0..10 {
            assert_eq!(get(&client, &simulator, "/0/public/Time").await.kraken_error(), None);
        }
    }

    #[tokio::test]
    async fn setters_switch_behaviour_at_run_time() {
        let simulator = start(test_options(Scenario::Healthy)).await;
        let client = client();
        simulator.set_scenario(Scenario::Busy);
        assert_eq!(get(&client, &simulator, "/0/public/Time").await.kraken_error().as_deref(), Some("EService:Busy"));
        simulator.set_scenario(Scenario::Flaky);
        simulator.set_failure_rate(7.0);
        assert_eq!(
            get(&client, &simulator, "/0/public/Time").await.kraken_error().as_deref(),
            Some("EService:Unavailable"),
            "a rate above 1.0 is clamped to always failing"
        );
        simulator.set_scenario(Scenario::Healthy);
        simulator.set_latency(Duration::from_millis(150));
        let started = Instant::now();
        assert_eq!(get(&client, &simulator, "/0/public/Time").await.kraken_error(), None);
        assert!(started.elapsed() >= Duration::from_millis(150));
        assert_eq!(simulator.requests("Time"), 3);
        assert_eq!(simulator.requests("Ticker"), 0);
    }

    async fn put_control(client: &reqwest::Client, simulator: &Simulator, body: &str) -> Seen {
        seen(
            client
                .put(format!("{}{CONTROL_PATH}", simulator.base_url()))
                .header("Content-Type", "application/json")
                .body(body.to_string())
                .send()
                .await,
        )
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn control_endpoint_reports_and_changes_the_state() {
        let simulator = start(test_options(Scenario::Healthy)).await;
        let client = client();
        get(&client, &simulator, "/0/public/Ticker?pair=XBTAUD").await;
        get(&client, &simulator, "/0/public/Ticker?pair=XBTAUD").await;
        let state = get(&client, &simulator, CONTROL_PATH).await.json();
        assert_eq!(
            state,
            json!({"scenario": "healthy", "latency_ms": 0, "failure_rate": 0.0, "requests": {"Ticker": 2}})
        );
        let answer =
            put_control(&client, &simulator, r#"{"scenario":"maintenance","latency":"250ms","failure_rate":0.5}"#)
                .await;
        assert_eq!(answer.status, 200);
        assert_eq!(
            answer.json(),
            json!({"scenario": "maintenance", "latency_ms": 250, "failure_rate": 0.5, "requests": {"Ticker": 2}})
        );
        assert_eq!(simulator.scenario(), Scenario::Maintenance);
        // The control endpoint itself is never slowed down by the latency it sets.
        let answer = put_control(&client, &simulator, r#"{"latency":"0s"}"#).await;
        assert_eq!(answer.json()["latency_ms"], 0);
        assert_eq!(answer.json()["scenario"], "maintenance");
        let body = get(&client, &simulator, "/0/public/SystemStatus").await.json();
        assert_eq!(body["result"]["status"], "maintenance");
    }

    #[tokio::test]
    async fn control_endpoint_rejects_bad_input_and_names_the_problem() {
        let simulator = start(test_options(Scenario::Healthy)).await;
        let client = client();
        for (body, status, mentions) in [
            (r#"{"scenario":"meltdown"}"#, 422, "meltdown"),
            (r#"{"latency":"soon"}"#, 422, "latency"),
            (r#"{"failure_rate":1.5}"#, 422, "failure_rate"),
            (r#"{"failure_rate":"half"}"#, 422, "invalid type"),
            (r#"{"scenarios":"busy"}"#, 422, "scenarios"),
            (r#"{"scenario":"#, 400, "invalid control request"),
            ("not json", 400, "invalid control request"),
        ] {
            let answer = put_control(&client, &simulator, body).await;
            assert_eq!(answer.status, status, "{body}");
            let error = answer.json()["error"].as_str().unwrap().to_string();
            assert!(error.contains(mentions), "{body}: {error}");
        }
        // A request with one bad field changes nothing, not even its valid fields.
        let answer = put_control(&client, &simulator, r#"{"scenario":"busy","failure_rate":2}"#).await;
        assert_eq!(answer.status, 422);
        assert_eq!(simulator.scenario(), Scenario::Healthy);
        let error = put_control(&client, &simulator, r#"{"scenario":"meltdown"}"#).await.json()["error"].to_string();
        assert!(error.contains("cancel_only") && error.contains("flaky"), "lists valid names: {error}");
    }

    #[tokio::test]
    async fn shutdown_stops_listening() {
        let simulator = start(test_options(Scenario::Healthy)).await;
        let address = simulator.local_addr();
        let client = client();
        get(&client, &simulator, "/0/public/Time").await;
        simulator.shutdown().await;
        assert!(TcpStream::connect(address).await.is_err(), "nothing listens after shutdown");
    }

    #[tokio::test]
    async fn shutdown_is_prompt_even_with_a_request_in_flight() {
        let simulator = start(test_options(Scenario::Slow)).await;
        simulator.set_latency(Duration::from_secs(60));
        let url = format!("{}/0/public/Time", simulator.base_url());
        let in_flight = tokio::spawn(async move { client().get(url).send().await });
        // Wait until the request has reached the simulator, then stop it.
        let deadline = Instant::now() + Duration::from_secs(5);
        while simulator.requests("Time") == 0 {
            assert!(Instant::now() < deadline, "the request never arrived");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::timeout(Duration::from_secs(5), simulator.shutdown()).await.expect("shutdown is prompt");
        let outcome = tokio::time::timeout(Duration::from_secs(5), in_flight).await.unwrap().unwrap();
        assert!(outcome.is_err(), "the in-flight request is cut off, not answered");
    }

    // -----------------------------------------------------------------------------------------------------------
    // In memory: the same router without a socket, on a paused clock
    // -----------------------------------------------------------------------------------------------------------

    /// One request through the router, as the client's in-memory transport sends it.
    async fn in_memory_call(simulator: &Simulator, method: Method, path_and_query: &str, body: &str) -> Response {
        let request = axum::http::Request::builder()
            .method(method)
            .uri(path_and_query)
            .header("Content-Type", "application/json")
            .body(axum::body::Body::from(body.to_string()))
            .unwrap();
        simulator.router().oneshot(request).await.unwrap()
    }

    async fn json_of(response: Response) -> Value {
        let body = axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap();
        serde_json::from_slice(&body).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn an_in_memory_simulator_binds_nothing_and_its_router_shares_the_state() {
        let listen: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let simulator = Simulator::in_memory(Options { listen, ..test_options(Scenario::Healthy) }).unwrap();
        assert_eq!(simulator.local_addr(), listen);
        assert_eq!(simulator.base_url(), IN_MEMORY_BASE_URL);

        let answer = in_memory_call(&simulator, Method::GET, "/0/public/Time", "").await;
        assert_eq!(answer.status(), StatusCode::OK);
        assert_eq!(json_of(answer).await["error"], json!([]));
        assert_eq!(simulator.requests("Time"), 1);

        // A setter on the handle reaches the router, and the control endpoint on the router reaches the handle.
        simulator.set_scenario(Scenario::Busy);
        let answer = in_memory_call(&simulator, Method::GET, "/0/public/Time", "").await;
        assert_eq!(json_of(answer).await["error"], json!(["EService:Busy"]));
        let answer = in_memory_call(&simulator, Method::PUT, CONTROL_PATH, r#"{"scenario":"maintenance"}"#).await;
        assert_eq!(answer.status(), StatusCode::OK);
        assert_eq!(simulator.scenario(), Scenario::Maintenance);
        let state = json_of(in_memory_call(&simulator, Method::GET, CONTROL_PATH, "").await).await;
        assert_eq!(state["requests"], json!({"Time": 2}));
        simulator.shutdown().await;
    }

    #[tokio::test(start_paused = true)]
    async fn reset_in_memory_marks_the_answer_after_the_configured_latency() {
        let simulator =
            Simulator::in_memory(Options { latency: Duration::from_secs(2), ..test_options(Scenario::Reset) }).unwrap();
        let started = Instant::now();
        let answer = in_memory_call(&simulator, Method::GET, "/0/public/Time", "").await;
        assert_eq!(started.elapsed(), Duration::from_secs(2));
        assert_eq!(answer.extensions().get::<ConnectionReset>(), Some(&ConnectionReset));
        // The control endpoint is never faulted, so it carries no marker.
        let control = in_memory_call(&simulator, Method::GET, CONTROL_PATH, "").await;
        assert_eq!(control.extensions().get::<ConnectionReset>(), None);
        // Other scenarios never carry the marker.
        simulator.set_scenario(Scenario::EmptyBody);
        let answer = in_memory_call(&simulator, Method::GET, "/0/public/Time", "").await;
        assert_eq!(answer.extensions().get::<ConnectionReset>(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn in_memory_public_calls_share_one_per_ip_bucket_that_refills_with_paused_time() {
        let limit = PublicRateLimit { burst: 2, refill_per_second: 1.0 };
        let options = Options { public_rate_limit: Some(limit), ..test_options(Scenario::Healthy) };
        let simulator = Simulator::in_memory(options).unwrap();
        let mut errors = Vec::new();
        for _ in 0..3 {
            let body = json_of(in_memory_call(&simulator, Method::GET, "/0/public/Time", "").await).await;
            errors.push(body["error"].clone());
        }
        assert_eq!(errors, [json!([]), json!([]), json!(["EGeneral:Too many requests"])]);
        tokio::time::advance(Duration::from_secs(1)).await;
        let body = json_of(in_memory_call(&simulator, Method::GET, "/0/public/Time", "").await).await;
        assert_eq!(body["error"], json!([]));
    }

    #[tokio::test]
    async fn serve_runs_until_cancelled() {
        let cancel = CancellationToken::new();
        let server = tokio::spawn(serve(test_options(Scenario::Healthy), cancel.clone()));
        cancel.cancel();
        tokio::time::timeout(Duration::from_secs(5), server).await.unwrap().unwrap().unwrap();
    }
}
