//! The Kraken REST client: public GETs (SystemStatus, Time, Ticker, Depth) and the signed private Balance POST.
//! Kraken's wire types never leave this file: answers become [`crate::exchange`] types, failures one classified
//! [`crate::exchange::Error`].
//!
//! What it owns: building requests (URLs under a configurable base, signing, the per-key nonce), reading bodies
//! under a size limit within the configured timeout, and classifying every failure exactly once, transport
//! first and Kraken's `E...` strings second. What it deliberately does not do: retry, rate-limit, open breakers
//! or decide that a non-`online` SystemStatus is an outage. Those belong to the poller, the limiter and the
//! breaker, which see every call as one [`Outcome`].
//!
//! Requests travel over reqwest in production, or in memory through an axum `Router` ([`Client::in_memory`],
//! the `transport` module) so paused-clock tests can drive the real client against the simulator without a
//! socket. Everything but the transport (URLs, signing, nonces, the body limit, classification, parsing) is
//! the same code for both.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use base64::Engine as _;
use hmac::{Hmac, KeyInit, Mac};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use serde_json::Value;
use sha2::{Digest, Sha256, Sha512};
use tokio::time::Instant;
use url::Url;

use crate::exchange::{
    Advisory, AuthFailure, Balances, Config, Endpoint, Error, ErrorClass, Exchange, Level, OrderBook, Outcome, Profile,
    RateBudget, ServerTime, SystemStatus, Ticker, TradingStatus,
};
pub use crate::transport::ConnectionReset;
use crate::transport::{self, Answer, Request, Transport};

/// Kraken as a kind of exchange: its defaults, the syntax of its pairs and secrets, and its status page.
pub const PROFILE: Profile = Profile {
    id: "kraken",
    display_name: "Kraken",
    default_base_url: "https://api.kraken.com",
    default_pair: "XBTAUD",
    status_page: "https://status.kraken.com",
    statuspage_components: &["REST"],
    // About one public call per second per IP, and the Starter tier's private counter (15 calls, decaying by 0.33
    // per second).
    rate_budget: RateBudget { public_per_second: 1.0, public_burst: 3, private_per_second: 0.33, private_burst: 15 },
    check_pair,
    check_secret,
};

/// Kraken spells pairs as letters and digits (`XBTAUD`, `XXBTZUSD`), without a separator.
fn check_pair(pair: &str) -> Result<(), String> {
    if !pair.is_empty() && pair.chars().all(|character| character.is_ascii_alphanumeric()) {
        Ok(())
    } else {
        Err(format!("invalid pair {pair:?}; expected letters and digits such as XBTAUD"))
    }
}

/// Kraken's API secrets are base64, and signing needs them decoded.
fn check_secret(secret: &str) -> Result<(), String> {
    match base64::engine::general_purpose::STANDARD.decode(secret) {
        Ok(decoded) if !decoded.is_empty() => Ok(()),
        _ => Err("is not valid base64 (Kraken API secrets are base64)".to_owned()),
    }
}

/// How much of a non-JSON body (or an HTML title) an error message may quote.
const QUOTE_LIMIT_CHARS: usize = 100;

/// Signed as Kraken sees it. A path prefix on the base URL belongs to a proxy in front, which strips it, so it
/// is part of the URL but never of the signed path.
const BALANCE_PATH: &str = "/0/private/Balance";

const API_KEY: HeaderName = HeaderName::from_static("api-key");
const API_SIGN: HeaderName = HeaderName::from_static("api-sign");

/// Kraken's `API-Sign`: base64(HMAC-SHA512(base64-decoded secret, path || SHA-256(nonce || body))).
/// `secret` is the already decoded key. The nonce's decimal text must be the one inside `body`.
pub fn sign(path: &str, nonce: u64, body: &str, secret: &[u8]) -> String {
    let mut inner = Sha256::new();
    inner.update(nonce.to_string().as_bytes());
    inner.update(body.as_bytes());
    let mut mac = Hmac::<Sha512>::new_from_slice(secret).expect("HMAC accepts keys of any length");
    mac.update(path.as_bytes());
    mac.update(&inner.finalize());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// Why a [`Client`] could not be built. Messages never contain the key or the secret.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("api secret is not valid base64 or is empty")]
    InvalidApiSecret,
    #[error("api key cannot be sent as an http header value")]
    InvalidApiKey,
    #[error("base url must be http or https with a host, got scheme {scheme:?}")]
    UnsupportedBaseUrl { scheme: String },
    #[error("could not build the http client: {0}")]
    HttpClient(#[source] reqwest::Error),
}

/// A Kraken REST client for one configured exchange: one pair, one optional API key.
pub struct Client {
    name: String,
    pair: String,
    transport: Transport,
    timeout: Duration,
    urls: EndpointUrls,
    private_access: Option<PrivateAccess>,
}

/// Every URL is built once at construction, so a call never re-parses or re-joins anything.
struct EndpointUrls {
    system_status: Url,
    time: Url,
    ticker: Url,
    depth: Url,
    balance: Url,
}

/// What a private call needs. The key is a sensitive header value and the secret is kept decoded, so neither
/// is ever formatted as text again after construction.
struct PrivateAccess {
    api_key: HeaderValue,
    decoded_secret: Vec<u8>,
    key_state: Arc<KeyState>,
}

impl fmt::Debug for Client {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("Client")
            .field("name", &self.name)
            .field("pair", &self.pair)
            .field("timeout", &self.timeout)
            .field("transport", &self.transport.kind())
            .field("has_credentials", &self.private_access.is_some())
            .finish_non_exhaustive()
    }
}

impl Client {
    /// A client that talks to `config.base_url` over the network.
    pub fn new(config: &Config, timeout: Duration) -> Result<Client, BuildError> {
        Client::build(config, timeout, || Transport::http().map_err(BuildError::HttpClient))
    }

    /// A client whose requests never leave the process: each one is served by `router` (typically
    /// [`crate::simulator::Simulator::router`]) with the same method, path and query, headers and body as over
    /// the network. `config.base_url` must still be a valid http(s) URL; its host only fills the `host` header
    /// and its path prefix is sent as it is. `timeout` covers the router's answer and the whole body and is
    /// measured on tokio's clock, so on a paused clock a slower answer is a `timeout` at once. A response that
    /// carries the [`ConnectionReset`] extension is a `network` failure.
    #[cfg(any(test, feature = "test-util"))]
    pub fn in_memory(config: &Config, timeout: Duration, router: axum::Router) -> Result<Client, BuildError> {
        Client::build(config, timeout, || Ok(Transport::InMemory(router)))
    }

    /// Validates the configuration, then builds the transport, so both constructors refuse the same input.
    fn build(
        config: &Config,
        timeout: Duration,
        transport: impl FnOnce() -> Result<Transport, BuildError>,
    ) -> Result<Client, BuildError> {
        let base_url = &config.base_url;
        if !matches!(base_url.scheme(), "http" | "https") || base_url.host().is_none() {
            return Err(BuildError::UnsupportedBaseUrl { scheme: base_url.scheme().to_owned() });
        }
        let private_access = match &config.credentials {
            None => None,
            Some(credentials) => {
                let decoded_secret = base64::engine::general_purpose::STANDARD
                    .decode(credentials.api_secret.expose())
                    .ok()
                    .filter(|decoded| !decoded.is_empty())
                    .ok_or(BuildError::InvalidApiSecret)?;
                let mut api_key =
                    HeaderValue::from_str(credentials.api_key.expose()).map_err(|_| BuildError::InvalidApiKey)?;
                api_key.set_sensitive(true);
                let key_state = key_state_for(credentials.api_key.expose());
                Some(PrivateAccess { api_key, decoded_secret, key_state })
            }
        };
        let transport = transport()?;
        let mut ticker = endpoint_url(base_url, "/0/public/Ticker");
        ticker.query_pairs_mut().append_pair("pair", &config.pair);
        let mut depth = endpoint_url(base_url, "/0/public/Depth");
        depth.query_pairs_mut().append_pair("pair", &config.pair).append_pair("count", &config.depth_count.to_string());
        let urls = EndpointUrls {
            system_status: endpoint_url(base_url, "/0/public/SystemStatus"),
            time: endpoint_url(base_url, "/0/public/Time"),
            ticker,
            depth,
            balance: endpoint_url(base_url, BALANCE_PATH),
        };
        Ok(Client { name: config.name.clone(), pair: config.pair.clone(), transport, timeout, urls, private_access })
    }

    /// Sends one request, reads the answer, classifies it and parses its `result`. Every call ends here, so
    /// latency, logging and classification are the same for all of them.
    async fn call<T>(
        &self,
        endpoint: Endpoint,
        request: Request,
        parse: impl FnOnce(&Value) -> Result<T, Error>,
    ) -> Outcome<T> {
        let started = Instant::now();
        let answer = self.transport.send(request, self.timeout).await;
        let latency = started.elapsed();
        let (result, warnings) = match answer {
            Err(error) => (Err(error), Vec::new()),
            Ok(answer) => match classify_answer(&answer) {
                Err(error) => (Err(error), Vec::new()),
                Ok(envelope) => match parse(&envelope.result) {
                    Ok(value) => (Ok(value), envelope.warnings),
                    Err(error) => (Err(error.with_status(answer.status)), Vec::new()),
                },
            },
        };
        let class = result.as_ref().err().map_or("ok", |error| error.class.as_str());
        tracing::debug!(
            exchange = %self.name,
            endpoint = endpoint.as_str(),
            latency_ms = latency.as_millis() as u64,
            class,
            "Kraken call finished."
        );
        Outcome { endpoint, latency, result, warnings }
    }

    fn failure_without_sending<T>(endpoint: Endpoint, latency: Duration, error: Error) -> Outcome<T> {
        tracing::debug!(
            endpoint = endpoint.as_str(),
            latency_ms = latency.as_millis() as u64,
            class = error.class.as_str(),
            "Kraken call not sent."
        );
        Outcome { endpoint, latency, result: Err(error), warnings: Vec::new() }
    }
}

#[async_trait]
impl Exchange for Client {
    fn kind(&self) -> crate::exchange::Kind {
        crate::exchange::Kind::Kraken
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn pair(&self) -> &str {
        &self.pair
    }

    fn has_credentials(&self) -> bool {
        self.private_access.is_some()
    }

    async fn system_status(&self) -> Outcome<SystemStatus> {
        let request = Request::get(&self.urls.system_status);
        self.call(Endpoint::SystemStatus, request, parse_system_status).await
    }

    async fn server_time(&self) -> Outcome<ServerTime> {
        let request = Request::get(&self.urls.time);
        self.call(Endpoint::Time, request, parse_server_time).await
    }

    async fn ticker(&self) -> Outcome<Ticker> {
        let request = Request::get(&self.urls.ticker);
        self.call(Endpoint::Ticker, request, |result| parse_ticker(result, &self.pair)).await
    }

    async fn depth(&self) -> Outcome<OrderBook> {
        let request = Request::get(&self.urls.depth);
        self.call(Endpoint::Depth, request, |result| parse_order_book(result, &self.pair)).await
    }

    async fn balance(&self) -> Outcome<Balances> {
        let Some(access) = &self.private_access else {
            let error = Error::new(ErrorClass::InvalidRequest, "no api credentials configured for a private call");
            return Client::failure_without_sending(Endpoint::Balance, Duration::ZERO, error);
        };
        // Holding the key's lock from taking the nonce until the answer is read means nonces reach Kraken in
        // the order they were taken, whatever else in the process uses the same key. The wait is bounded by
        // the timeout so a stuck call cannot stall the next poll forever.
        let waiting_since = Instant::now();
        let Ok(_send_guard) = tokio::time::timeout(self.timeout, access.key_state.send_lock.lock()).await else {
            let error = Error::new(
                ErrorClass::Timeout,
                "another private call with the same api key did not finish within the timeout",
            );
            return Client::failure_without_sending(Endpoint::Balance, waiting_since.elapsed(), error);
        };
        let nonce = access.key_state.nonces.next();
        let body = format!("nonce={nonce}");
        let mut signature = HeaderValue::try_from(sign(BALANCE_PATH, nonce, &body, &access.decoded_secret))
            .expect("standard base64 is always a valid header value");
        signature.set_sensitive(true);
        let mut headers = HeaderMap::new();
        headers.insert(API_KEY, access.api_key.clone());
        headers.insert(API_SIGN, signature);
        let request = Request::post_form(&self.urls.balance, headers, body);
        self.call(Endpoint::Balance, request, parse_balances).await
    }
}

/// `base` joined with an API path. The base may carry a path prefix (a proxy) and may or may not end with `/`;
/// any query or fragment on it is dropped because Kraken's methods take their own.
fn endpoint_url(base: &Url, api_path: &str) -> Url {
    let mut url = base.clone();
    let prefix = base.path().trim_end_matches('/').to_owned();
    url.set_path(&format!("{prefix}{api_path}"));
    url.set_query(None);
    url.set_fragment(None);
    url
}

// ---------------------------------------------------------------------------------------------------------------
// Nonces: one strictly increasing source per API key, shared by every client in the process.
// ---------------------------------------------------------------------------------------------------------------

/// Yields `max(now in ms, last + 1)`: the clock when it moves forward, one more than the last nonce when the
/// clock stalls or steps back, so Kraken never sees a nonce that is not larger than the previous one.
struct NonceSource {
    last: AtomicU64,
}

impl NonceSource {
    fn new() -> NonceSource {
        NonceSource { last: AtomicU64::new(0) }
    }

    fn next(&self) -> u64 {
        let now_millis = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since_epoch| u64::try_from(since_epoch.as_millis()).unwrap_or(u64::MAX));
        self.next_at(now_millis)
    }

    fn next_at(&self, now_millis: u64) -> u64 {
        let mut last = self.last.load(Ordering::Acquire);
        loop {
            let candidate = now_millis.max(last.saturating_add(1));
            match self.last.compare_exchange_weak(last, candidate, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return candidate,
                Err(actual) => last = actual,
            }
        }
    }
}

/// Everything private calls of one API key share.
struct KeyState {
    nonces: NonceSource,
    send_lock: tokio::sync::Mutex<()>,
}

/// Keyed by the SHA-256 of the API key so the registry never holds the key itself.
static KEY_STATES: LazyLock<std::sync::Mutex<HashMap<[u8; 32], Arc<KeyState>>>> = LazyLock::new(Default::default);

fn key_state_for(api_key: &str) -> Arc<KeyState> {
    let mut fingerprint = [0u8; 32];
    fingerprint.copy_from_slice(&Sha256::digest(api_key.as_bytes()));
    // The map is only ever inserted into, so it is consistent even if a holder of the lock panicked.
    let mut states = KEY_STATES.lock().unwrap_or_else(PoisonError::into_inner);
    let state = states
        .entry(fingerprint)
        .or_insert_with(|| Arc::new(KeyState { nonces: NonceSource::new(), send_lock: tokio::sync::Mutex::new(()) }));
    Arc::clone(state)
}

// ---------------------------------------------------------------------------------------------------------------
// Classification: pure functions over what came back, so every rule is testable without a socket.
// ---------------------------------------------------------------------------------------------------------------

/// A Kraken envelope without `E...` errors: its `result` and any `W...` warnings.
#[derive(Debug)]
struct Envelope {
    result: Value,
    warnings: Vec<String>,
}

fn unexpected_shape(what: impl fmt::Display) -> Error {
    Error::new(ErrorClass::BadResponse, format!("unexpected shape: {what}"))
}

/// Classifies a complete answer: the HTTP status first, then the body's form, then Kraken's error strings.
/// On success it returns the `result` to parse and the warnings that came with it.
fn classify_answer(answer: &Answer) -> Result<Envelope, Error> {
    let status = answer.status;
    if !(200..300).contains(&status) {
        return Err(classify_http_failure(answer));
    }
    let failure = |message: String| Error::new(ErrorClass::BadResponse, message).with_status(status);
    if answer.body.iter().all(u8::is_ascii_whitespace) {
        return Err(failure("empty body".to_owned()));
    }
    let json: Value = match serde_json::from_slice(&answer.body) {
        Ok(json) => json,
        Err(_) if looks_like_html(answer) => {
            return Err(failure(with_quote("html instead of json", quote_of_text(&answer.body))));
        }
        Err(parse_error) => {
            // Quote only text that was never meant to be JSON; a truncated JSON document is described, not shown.
            let quote = if looks_like_json(&answer.body) { None } else { quote_of_text(&answer.body) };
            return Err(failure(with_quote(&format!("invalid json: {parse_error}"), quote)));
        }
    };
    let Some(error_strings) = envelope_errors(&json) else {
        return Err(failure("unexpected shape: no error array of strings".to_owned()));
    };
    if error_strings.iter().any(|text| is_error_string(text)) {
        return Err(classify_exchange_errors(error_strings).with_status(status));
    }
    match json.get("result") {
        None | Some(Value::Null) => Err(failure("missing result".to_owned())),
        Some(result) => Ok(Envelope { result: result.clone(), warnings: error_strings }),
    }
}

/// Classifies one complete answer and parses it as `endpoint`'s, as a call does once the transport has read it;
/// returns the warnings of a success. For the fuzz harness (`exwatch::fuzz`): Kraken's answers are outside input.
#[doc(hidden)]
pub fn parse_answer(
    endpoint: Endpoint,
    status: u16,
    content_type: Option<&str>,
    body: &[u8],
    pair: &str,
) -> Result<Vec<String>, Error> {
    let answer = Answer {
        status,
        content_type: content_type.map(str::to_owned),
        server: None,
        redirect_host: None,
        body: body.to_vec(),
    };
    let envelope = classify_answer(&answer)?;
    let result = &envelope.result;
    let parsed = match endpoint {
        Endpoint::SystemStatus => {
            parse_system_status(result).and_then(|status| status.as_failure().map_or(Ok(()), Err))
        }
        Endpoint::Time => parse_server_time(result).map(drop),
        Endpoint::Ticker => parse_ticker(result, pair).map(drop),
        Endpoint::Depth => parse_order_book(result, pair).map(drop),
        Endpoint::Balance => parse_balances(result).map(drop),
    };
    parsed.map_err(|error| error.with_status(status)).map(|()| envelope.warnings)
}

/// A non-2xx answer. The status decides the class; a Kraken envelope in the body only adds its strings.
/// A 3xx is never followed (a redirect would carry the key and signature elsewhere): it is a `bad_response`
/// that names where it pointed.
fn classify_http_failure(answer: &Answer) -> Error {
    let status = answer.status;
    if transport::is_redirect(status, answer.redirect_host.as_deref()) {
        let message = format!("http {status} {}", transport::redirect_description(answer.redirect_host.as_deref()));
        return Error::new(ErrorClass::BadResponse, message).with_status(status);
    }
    let class = match status {
        429 => ErrorClass::RateLimited,
        401 | 403 => ErrorClass::Auth,
        408 => ErrorClass::Timeout,
        500..=599 => ErrorClass::ServerError,
        400..=499 => ErrorClass::InvalidRequest,
        _ => ErrorClass::BadResponse,
    };
    let from_cloudflare =
        answer.server.as_deref().is_some_and(|server| server.to_ascii_lowercase().contains("cloudflare"))
            || contains_ignoring_case(&answer.body, b"cloudflare");
    let mut message = format!("http {status}");
    if from_cloudflare {
        message.push_str(" from cloudflare");
    }
    let exchange_errors = serde_json::from_slice::<Value>(&answer.body).ok().as_ref().and_then(envelope_errors);
    match exchange_errors {
        Some(errors) => {
            if !errors.is_empty() {
                message = format!("{message} with exchange errors {}", errors.join(", "));
            }
            Error::new(class, message).with_status(status).with_exchange_errors(errors)
        }
        None => Error::new(class, with_quote(&message, quote_of_text(&answer.body))).with_status(status),
    }
}

/// Picks the class from the first `E...` string with a known meaning; an unknown `E...` string means the
/// exchange failed in a way we cannot name, which is a server error. All strings are kept as sent.
fn classify_exchange_errors(error_strings: Vec<String>) -> Error {
    let errors: Vec<&String> = error_strings.iter().filter(|text| is_error_string(text)).collect();
    let class = errors.iter().find_map(|text| exchange_error_class(text)).unwrap_or(ErrorClass::ServerError);
    let listed = errors.iter().map(|text| text.as_str()).collect::<Vec<_>>().join(", ");
    let mut error = Error::new(class, format!("exchange error {listed}"));
    if class == ErrorClass::Auth {
        error.auth = errors.iter().find_map(|text| auth_failure(text));
    }
    error.with_exchange_errors(error_strings)
}

/// Which credential check an `auth` error string reports, for the ones handled differently.
fn auth_failure(text: &str) -> Option<AuthFailure> {
    let lowercase = text.to_ascii_lowercase();
    [
        ("eapi:invalid key", AuthFailure::InvalidKey),
        ("eapi:invalid signature", AuthFailure::InvalidSignature),
        ("eapi:invalid nonce", AuthFailure::InvalidNonce),
        ("egeneral:permission denied", AuthFailure::PermissionDenied),
        ("egeneral:temporary lockout", AuthFailure::Lockout),
    ]
    .into_iter()
    .find(|(prefix, _)| lowercase.starts_with(prefix))
    .map(|(_, failure)| failure)
}

/// Prefixes in lowercase, more specific before more general (`EAuth:Rate limit exceeded` before `EAuth:`).
const EXCHANGE_ERROR_PREFIXES: &[(&str, ErrorClass)] = &[
    ("eservice:unavailable", ErrorClass::Maintenance),
    ("eservice:market in cancel_only mode", ErrorClass::Maintenance),
    ("eservice:market in post_only mode", ErrorClass::Maintenance),
    ("eapi:rate limit exceeded", ErrorClass::RateLimited),
    ("egeneral:too many requests", ErrorClass::RateLimited),
    ("eservice: throttled", ErrorClass::RateLimited),
    ("eservice:throttled", ErrorClass::RateLimited),
    ("eauth:rate limit exceeded", ErrorClass::RateLimited),
    ("eauth:too many requests", ErrorClass::RateLimited),
    ("eorder:rate limit exceeded", ErrorClass::RateLimited),
    ("eapi:invalid key", ErrorClass::Auth),
    ("eapi:invalid signature", ErrorClass::Auth),
    ("eapi:invalid nonce", ErrorClass::Auth),
    ("egeneral:permission denied", ErrorClass::Auth),
    ("egeneral:temporary lockout", ErrorClass::Auth),
    ("esession:invalid session", ErrorClass::Auth),
    ("eauth:", ErrorClass::Auth),
    ("eaccount:invalid permissions", ErrorClass::Auth),
    ("eservice:busy", ErrorClass::ServerError),
    ("egeneral:internal error", ErrorClass::ServerError),
    ("edatabase:internal error", ErrorClass::ServerError),
    ("eservice:deadline elapsed", ErrorClass::Timeout),
    ("egeneral:invalid arguments", ErrorClass::InvalidRequest),
    ("egeneral:unknown method", ErrorClass::InvalidRequest),
    ("equery:", ErrorClass::InvalidRequest),
    ("eapi:bad request", ErrorClass::InvalidRequest),
    ("eapi:feature disabled", ErrorClass::InvalidRequest),
    ("eorder:", ErrorClass::InvalidRequest),
    ("efunding:", ErrorClass::InvalidRequest),
    ("etrade:", ErrorClass::InvalidRequest),
];

/// The class of one Kraken error string, matched by prefix and ignoring case (Kraken's casing varies:
/// `Unknown method` and `Unknown Method` both occur). `None` for strings with no known meaning.
fn exchange_error_class(text: &str) -> Option<ErrorClass> {
    let lowercase = text.to_ascii_lowercase();
    EXCHANGE_ERROR_PREFIXES.iter().find(|(prefix, _)| lowercase.starts_with(prefix)).map(|(_, class)| *class)
}

/// Only `E`-severity strings are errors; `W`-severity strings are warnings that come with a result.
fn is_error_string(text: &str) -> bool {
    text.starts_with('E')
}

/// The `error` array of a Kraken envelope, when the JSON is an object with an array of strings there.
fn envelope_errors(json: &Value) -> Option<Vec<String>> {
    json.get("error")?.as_array()?.iter().map(|entry| entry.as_str().map(str::to_owned)).collect()
}

fn looks_like_html(answer: &Answer) -> bool {
    answer.content_type.as_deref().is_some_and(|content_type| content_type.to_ascii_lowercase().contains("html"))
        || answer.body.trim_ascii_start().first() == Some(&b'<')
}

fn looks_like_json(body: &[u8]) -> bool {
    matches!(body.trim_ascii_start().first(), Some(b'{' | b'['))
}

fn contains_ignoring_case(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|window| window.eq_ignore_ascii_case(needle))
}

fn with_quote(message: &str, quote: Option<String>) -> String {
    match quote {
        Some(quote) => format!("{message}: {quote:?}"),
        None => message.to_owned(),
    }
}

/// A short quote of a text body for on-call: an HTML page's `<title>` (Cloudflare puts the error there),
/// otherwise the start of the text, whitespace collapsed, at most [`QUOTE_LIMIT_CHARS`] characters.
fn quote_of_text(body: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(body);
    let lowercase = text.to_ascii_lowercase();
    let title = lowercase.find("<title>").and_then(|start| {
        let start = start + "<title>".len();
        lowercase[start..].find("</title>").map(|length| &text[start..start + length])
    });
    let quoted: String = title.unwrap_or(&text).split_whitespace().collect::<Vec<_>>().join(" ");
    let quoted: String = quoted.chars().take(QUOTE_LIMIT_CHARS).collect();
    (!quoted.is_empty()).then_some(quoted)
}

// ---------------------------------------------------------------------------------------------------------------
// Result parsing: Kraken's `result` shapes into domain types, validating what the monitor relies on.
// ---------------------------------------------------------------------------------------------------------------

fn parse_system_status(result: &Value) -> Result<SystemStatus, Error> {
    let status = result.get("status").and_then(Value::as_str).ok_or_else(|| unexpected_shape("no status string"))?;
    let timestamp =
        result.get("timestamp").and_then(Value::as_str).ok_or_else(|| unexpected_shape("no timestamp string"))?;
    Ok(SystemStatus {
        status: TradingStatus::parse(status),
        timestamp: timestamp.to_owned(),
        emergency: advisories(result, "emergency", "incident_status"),
        upcoming_maintenance: advisories(result, "upcoming_maintenance", "phase"),
    })
}

/// The most advisories kept of one list, and the longest text kept of each field.
const MAX_ADVISORIES: usize = 20;
const MAX_ADVISORY_TEXT: usize = 1024;

/// One of SystemStatus's additive arrays, read leniently: absent or not a list is empty, an entry without a title is
/// skipped, unknown fields are ignored, every text is bounded and printable.
fn advisories(result: &Value, key: &str, status_key: &str) -> Vec<Advisory> {
    let text = |entry: &Value, key: &str| {
        entry.get(key).and_then(Value::as_str).map(|value| crate::text::external(value, MAX_ADVISORY_TEXT))
    };
    let entries = result.get(key).and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
    entries
        .iter()
        .filter_map(|entry| {
            Some(Advisory {
                title: text(entry, "title")?,
                status: text(entry, status_key).unwrap_or_default(),
                impact: text(entry, "impact").unwrap_or_default(),
                source_url: text(entry, "source_url"),
            })
        })
        .take(MAX_ADVISORIES)
        .collect()
}

fn parse_server_time(result: &Value) -> Result<ServerTime, Error> {
    let unixtime =
        result.get("unixtime").and_then(Value::as_i64).ok_or_else(|| unexpected_shape("no unixtime integer"))?;
    Ok(ServerTime { unixtime })
}

/// The entry for the requested pair. Kraken answers under its canonical name (`XBTUSD` comes back as
/// `XXBTZUSD`, `XBTAUD` as `XBTAUD`), so a single entry is taken whatever its key.
fn pair_entry<'result>(result: &'result Value, requested_pair: &str) -> Result<(&'result str, &'result Value), Error> {
    let entries = result.as_object().ok_or_else(|| unexpected_shape("result is not an object"))?;
    let mut only_entry = entries.iter();
    match (only_entry.next(), only_entry.next()) {
        (Some((key, value)), None) => Ok((key.as_str(), value)),
        _ => entries.get_key_value(requested_pair).map(|(key, value)| (key.as_str(), value)).ok_or_else(|| {
            unexpected_shape(format!("{} pairs in result and none named {requested_pair}", entries.len()))
        }),
    }
}

fn parse_ticker(result: &Value, requested_pair: &str) -> Result<Ticker, Error> {
    let (pair_key, entry) = pair_entry(result, requested_pair)?;
    let first_price = |field: &str| {
        entry
            .get(field)
            .and_then(Value::as_array)
            .and_then(|values| values.first())
            .and_then(Value::as_str)
            .filter(|text| is_positive_decimal(text))
            .map(str::to_owned)
            .ok_or_else(|| unexpected_shape(format!("ticker field {field} has no positive decimal price")))
    };
    Ok(Ticker {
        pair_key: pair_key.to_owned(),
        ask: first_price("a")?,
        bid: first_price("b")?,
        last: first_price("c")?,
    })
}

fn parse_order_book(result: &Value, requested_pair: &str) -> Result<OrderBook, Error> {
    let (pair_key, entry) = pair_entry(result, requested_pair)?;
    let side = |field: &str| -> Result<Vec<Level>, Error> {
        let levels =
            entry.get(field).and_then(Value::as_array).ok_or_else(|| unexpected_shape(format!("no {field} array")))?;
        levels
            .iter()
            .map(|level| parse_level(level).ok_or_else(|| unexpected_shape(format!("invalid level in {field}"))))
            .collect()
    };
    Ok(OrderBook { pair_key: pair_key.to_owned(), asks: side("asks")?, bids: side("bids")? })
}

/// `[price:str, volume:str, timestamp:int]`.
fn parse_level(level: &Value) -> Option<Level> {
    let fields = level.as_array()?;
    let price = fields.first()?.as_str().filter(|text| is_positive_decimal(text))?;
    let volume = fields.get(1)?.as_str().filter(|text| is_decimal(text))?;
    let timestamp = fields.get(2)?.as_i64()?;
    Some(Level { price: price.to_owned(), volume: volume.to_owned(), timestamp })
}

fn parse_balances(result: &Value) -> Result<Balances, Error> {
    let entries = result.as_object().ok_or_else(|| unexpected_shape("balance result is not an object"))?;
    let assets = entries
        .iter()
        .map(|(asset, amount)| match amount.as_str() {
            Some(amount) if is_decimal(amount) => Ok((asset.clone(), amount.to_owned())),
            _ => Err(unexpected_shape(format!("balance of {asset} is not a decimal string"))),
        })
        .collect::<Result<BTreeMap<_, _>, _>>()?;
    Ok(Balances { assets })
}

/// Plain decimal text as Kraken sends it (`-` allowed, no exponent, no `inf`/`nan`).
fn is_decimal(text: &str) -> bool {
    let digits = text.strip_prefix('-').unwrap_or(text);
    let mut parts = digits.splitn(2, '.');
    let whole = parts.next().unwrap_or_default();
    let fraction = parts.next().unwrap_or_default();
    !(whole.is_empty() && fraction.is_empty())
        && whole.bytes().all(|byte| byte.is_ascii_digit())
        && fraction.bytes().all(|byte| byte.is_ascii_digit())
}

fn is_positive_decimal(text: &str) -> bool {
    is_decimal(text) && text.parse::<f64>().is_ok_and(|number| number.is_finite() && number > 0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_errors_say_which_check_failed() {
        let cases = [
            ("EAPI:Invalid key", Some(AuthFailure::InvalidKey)),
            ("EAPI:Invalid signature", Some(AuthFailure::InvalidSignature)),
            ("EAPI:Invalid nonce", Some(AuthFailure::InvalidNonce)),
            ("EGeneral:Permission denied", Some(AuthFailure::PermissionDenied)),
            ("EGeneral:Temporary lockout", Some(AuthFailure::Lockout)),
            ("EAuth:Account temporary disabled", None),
        ];
        for (text, expected) in cases {
            let error = classify_exchange_errors(vec![text.to_owned()]);
            assert_eq!(error.class, ErrorClass::Auth, "{text}");
            assert_eq!(error.auth, expected, "{text}");
        }
        assert_eq!(classify_exchange_errors(vec!["EService:Busy".to_owned()]).auth, None);
    }

    const TEST_SECRET: &str =
        "kQH5HW/8p1uGOVjbgWA7FunAmGO8lsSUXNsu3eow76sz84Q18fWxnyRzBHCd3pd5nE9qa99HAZtuZuj6F1huXg==";

    fn decoded_secret() -> Vec<u8> {
        base64::engine::general_purpose::STANDARD.decode(TEST_SECRET).unwrap()
    }

    #[test]
    fn signing_reproduces_krakens_published_test_vector() {
        let signature = sign(
            "/0/private/AddOrder",
            1616492376594,
            "nonce=1616492376594&ordertype=limit&pair=XBTUSD&price=37500&type=buy&volume=1.25",
            &decoded_secret(),
        );
        assert_eq!(
            signature,
            "4/dpxb3iT4tp/ZCVEwSnEsLxx0bqyhLpdfOpc6fn7OR8+UClSV5n9E6aSS8MPtnRfp32bAb0nmbRn6H8ndwLUQ=="
        );
    }

    #[test]
    fn signing_a_balance_call_matches_the_computed_vector() {
        let signature = sign("/0/private/Balance", 1616492376594, "nonce=1616492376594", &decoded_secret());
        assert_eq!(
            signature,
            "1nH4vwR+8FHiYh1QT649xXkGd3JR3x0DWkgv3u9Ed/Qqv6KPtgQpEU4m+Emb/VgpEji3j1XNwI+HCbfXxmrTOg=="
        );
    }

    // -----------------------------------------------------------------------------------------------------------
    // Helpers
    // -----------------------------------------------------------------------------------------------------------

    use std::sync::atomic::AtomicUsize;

    use axum::Router;
    use axum::extract::State;
    use axum::http::{HeaderMap, Uri};
    use axum::routing::{get, post};
    use reqwest::header::{CONTENT_TYPE, SERVER};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::sync::mpsc;

    use crate::exchange::{Credentials, Kind};
    use crate::secret::Secret;
    use crate::transport::BODY_LIMIT_BYTES;

    const TICKER_XBTAUD_BODY: &str = r#"{"error":[],"result":{"XBTAUD":{"a":["160100.00000","1","1.000"],"b":["160099.90000","1","1.000"],
 "c":["160055.99000","0.01000000"],"v":["12.34567890","45.67890123"],"p":["160010.12345","159870.54321"],
 "t":[812,2931],"l":["158900.00000","158100.00000"],"h":["160900.00000","161250.00000"],"o":"159500.00000"}}}"#;

    const TICKER_XBTUSD_BODY: &str = r#"{"error":[],"result":{"XXBTZUSD":{
  "a":["52609.60000","1","1.000"],"b":["52609.50000","1","1.000"],
  "c":["52641.10000","0.00080000"],"v":["1920.83610601","7954.00219674"],
  "p":["52389.94668","54022.90683"],"t":[23329,80463],
  "l":["51513.90000","51513.90000"],"h":["53219.90000","57200.00000"],"o":"52280.40000"}}}"#;

    const DEPTH_BODY: &str = r#"{"error":[],"result":{"XXBTZUSD":{
  "asks":[["52523.00000","1.199",1616663113],["52536.00000","0.300",1616663112]],
  "bids":[["52522.90000","0.753",1616663112],["52522.80000","0.006",1616663109]]}}}"#;

    const BALANCE_BODY: &str = r#"{"error":[],"result":{"ZUSD":"171288.6158","ZEUR":"504861.8946","XXBT":"1011.1908877900","XETH":"818.5500000000",
 "USDT":"500000.00000000","DAI":"9999.9999999999","DOT":"2.5000000000","ETH2.S":"198.3970800000",
 "ETH2":"2.5885574330","USD.M":"1213029.2780"}}"#;

    const CLOUDFLARE_520_PAGE: &str = "<!DOCTYPE html>\n<html><head>\n<title>api.kraken.com | 520: Web server is returning an unknown error</title>\n</head><body>lots of cloudflare markup ... cf-ray 8a1b2c3d4e5f</body></html>";

    const TEST_TIMEOUT: Duration = Duration::from_millis(300);

    /// The process installs the provider at start-up; tests share one process, so the first one wins.
    fn install_crypto_provider() {
        let _ = rustls::crypto::ring::default_provider().install_default();
    }

    fn credentials(api_key: &str) -> Credentials {
        Credentials { api_key: Secret::new(api_key), api_secret: Secret::new(TEST_SECRET) }
    }

    fn test_config(base_url: &str, pair: &str, credentials: Option<Credentials>) -> Config {
        Config {
            name: "kraken".to_owned(),
            kind: Kind::Kraken,
            base_url: Url::parse(base_url).unwrap(),
            pair: pair.to_owned(),
            depth_count: 7,
            credentials,
        }
    }

    fn test_client(base_url: &str, credentials: Option<Credentials>) -> Client {
        install_crypto_provider();
        Client::new(&test_config(base_url, "XBTAUD", credentials), TEST_TIMEOUT).unwrap()
    }

    fn answer(status: u16, content_type: Option<&str>, body: &str) -> Answer {
        let content_type = content_type.map(str::to_owned);
        Answer { status, content_type, server: None, redirect_host: None, body: body.as_bytes().to_vec() }
    }

    fn json_answer(body: &str) -> Answer {
        answer(200, Some("application/json"), body)
    }

    fn classify_failure(answer: &Answer) -> Error {
        classify_answer(answer).expect_err("the answer should be classified as a failure")
    }

    /// Classifies a 200 JSON body and parses its result, as a call does.
    fn classify_and_parse<T>(body: &str, parse: impl FnOnce(&Value) -> Result<T, Error>) -> Result<T, Error> {
        classify_answer(&json_answer(body)).and_then(|envelope| parse(&envelope.result))
    }

    async fn spawn_router(router: Router) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
        format!("http://{address}")
    }

    /// A raw TCP server that reads each request head and then runs `reply` on the socket, for answers axum
    /// will not produce (bodies without a length, connections cut mid-body).
    async fn spawn_raw_server<Reply, ReplyFuture>(reply: Reply) -> String
    where
        Reply: Fn(tokio::net::TcpStream) -> ReplyFuture + Send + 'static,
        ReplyFuture: std::future::Future<Output = ()> + Send + 'static,
    {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                let mut head = Vec::new();
                let mut buffer = [0u8; 1024];
                while !head.windows(4).any(|window| window == b"\r\n\r\n") {
                    let read = stream.read(&mut buffer).await.unwrap();
                    if read == 0 {
                        break;
                    }
                    head.extend_from_slice(&buffer[..read]);
                }
                tokio::spawn(reply(stream));
            }
        });
        format!("http://{address}")
    }

    /// A router that counts every request it gets and answers each with a Balance body.
    fn counting_router() -> (Router, Arc<AtomicUsize>) {
        let requests = Arc::new(AtomicUsize::new(0));
        let router = Router::new()
            .fallback(|State(requests): State<Arc<AtomicUsize>>| async move {
                requests.fetch_add(1, Ordering::SeqCst);
                ([(CONTENT_TYPE, "application/json")], BALANCE_BODY)
            })
            .with_state(Arc::clone(&requests));
        (router, requests)
    }

    /// A server that accepts connections and never says a word.
    async fn spawn_silent_server() -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let mut held_connections = Vec::new();
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                held_connections.push(stream);
            }
        });
        format!("http://{address}")
    }

    async fn unused_local_address() -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        drop(listener);
        format!("http://{address}")
    }

    // -----------------------------------------------------------------------------------------------------------
    // Classification of Kraken's error strings
    // -----------------------------------------------------------------------------------------------------------

    #[test]
    fn kraken_error_strings_map_to_their_class_by_prefix_ignoring_case() {
        let cases = [
            ("EService:Unavailable", ErrorClass::Maintenance),
            ("EService:Market in cancel_only mode", ErrorClass::Maintenance),
            ("EService:Market in post_only mode", ErrorClass::Maintenance),
            ("EAPI:Rate limit exceeded", ErrorClass::RateLimited),
            ("EGeneral:Too many requests", ErrorClass::RateLimited),
            ("EService: Throttled: 1700000000", ErrorClass::RateLimited),
            ("EService:Throttled", ErrorClass::RateLimited),
            ("EAuth:Rate limit exceeded", ErrorClass::RateLimited),
            ("EAuth:Too many requests", ErrorClass::RateLimited),
            ("EOrder:Rate limit exceeded", ErrorClass::RateLimited),
            ("EAPI:Invalid key", ErrorClass::Auth),
            ("EAPI:Invalid signature", ErrorClass::Auth),
            ("EAPI:Invalid nonce", ErrorClass::Auth),
            ("EGeneral:Permission denied", ErrorClass::Auth),
            ("EGeneral:Temporary lockout", ErrorClass::Auth),
            ("ESession:Invalid session", ErrorClass::Auth),
            ("EAuth:Account temporary disabled", ErrorClass::Auth),
            ("EAccount:Invalid permissions", ErrorClass::Auth),
            ("EService:Busy", ErrorClass::ServerError),
            ("EGeneral:Internal error", ErrorClass::ServerError),
            ("EGeneral:Internal error:5", ErrorClass::ServerError),
            ("EDatabase:Internal error", ErrorClass::ServerError),
            ("EService:Deadline elapsed", ErrorClass::Timeout),
            ("EGeneral:Invalid arguments", ErrorClass::InvalidRequest),
            ("EGeneral:Invalid arguments:ordertype", ErrorClass::InvalidRequest),
            ("EGeneral:Unknown method", ErrorClass::InvalidRequest),
            ("EGeneral:Unknown Method", ErrorClass::InvalidRequest),
            ("EQuery:Unknown asset pair", ErrorClass::InvalidRequest),
            ("EAPI:Bad request", ErrorClass::InvalidRequest),
            ("EAPI:Feature disabled:viqc", ErrorClass::InvalidRequest),
            ("EOrder:Insufficient funds", ErrorClass::InvalidRequest),
            ("EFunding:Unknown asset", ErrorClass::InvalidRequest),
            ("ETrade:Locked", ErrorClass::InvalidRequest),
            ("ESERVICE:unavailable", ErrorClass::Maintenance),
            ("EBM:limit exceeded:CAL", ErrorClass::ServerError),
            ("ESomethingNew:Never seen", ErrorClass::ServerError),
        ];
        for (error_string, expected_class) in cases {
            let body = format!(r#"{{"error":["{error_string}"]}}"#);
            let error = classify_failure(&json_answer(&body));
            assert_eq!(error.class, expected_class, "{error_string}");
            assert_eq!(error.http_status, Some(200), "{error_string}");
            assert_eq!(error.exchange_errors, vec![error_string.to_owned()]);
            assert!(error.message.contains(error_string), "{}", error.message);
        }
    }

    #[test]
    fn the_first_error_string_with_a_known_meaning_decides_and_all_strings_are_kept() {
        let body = r#"{"error":["EUnheardOf:Thing","WDatabase:No change","EService:Unavailable","EService:Busy"]}"#;
        let error = classify_failure(&json_answer(body));
        assert_eq!(error.class, ErrorClass::Maintenance);
        assert_eq!(
            error.exchange_errors,
            ["EUnheardOf:Thing", "WDatabase:No change", "EService:Unavailable", "EService:Busy"]
        );
    }

    #[test]
    fn warnings_with_a_result_are_a_success_that_reports_the_warnings() {
        let envelope = classify_answer(&json_answer(r#"{"error":["WDatabase:No change"],"result":{"delete":true}}"#))
            .expect("warnings are not failures");
        assert_eq!(envelope.warnings, ["WDatabase:No change"]);
        assert_eq!(envelope.result, serde_json::json!({"delete": true}));
    }

    #[test]
    fn an_error_with_an_empty_result_object_is_a_failure_like_an_error_only_body() {
        for body in [r#"{"error":["EAPI:Invalid key"],"result":{}}"#, r#"{"error":["EAPI:Invalid key"]}"#] {
            let error = classify_failure(&json_answer(body));
            assert_eq!(error.class, ErrorClass::Auth, "{body}");
            assert_eq!(error.exchange_errors, ["EAPI:Invalid key"]);
        }
    }

    // -----------------------------------------------------------------------------------------------------------
    // Classification of HTTP statuses and malformed bodies
    // -----------------------------------------------------------------------------------------------------------

    #[test]
    fn cloudflare_error_pages_are_server_errors_that_name_cloudflare() {
        for status in [520, 522, 502, 504] {
            let page = CLOUDFLARE_520_PAGE.replace("520", &status.to_string());
            let mut cloudflare_answer = answer(status, Some("text/html; charset=UTF-8"), &page);
            cloudflare_answer.server = Some("cloudflare".to_owned());
            let error = classify_failure(&cloudflare_answer);
            assert_eq!(error.class, ErrorClass::ServerError, "{status}");
            assert_eq!(error.http_status, Some(status));
            assert!(error.message.contains("cloudflare"), "{}", error.message);
            assert!(error.message.contains(&format!("{status}: Web server")), "the title is quoted: {}", error.message);
            assert!(!error.message.contains("<html>"), "{}", error.message);
        }
        // Without a `server` header the page itself still gives Cloudflare away.
        let error = classify_failure(&answer(502, Some("text/html"), "<html><body>cloudflare-nginx</body></html>"));
        assert!(error.message.contains("cloudflare"), "{}", error.message);
        let error = classify_failure(&answer(503, Some("text/html"), "<html><title>Unavailable</title></html>"));
        assert_eq!(error.class, ErrorClass::ServerError);
        assert!(!error.message.contains("cloudflare"), "{}", error.message);
    }

    #[test]
    fn http_statuses_decide_the_class_before_the_body() {
        let cases = [
            (429, ErrorClass::RateLimited),
            (401, ErrorClass::Auth),
            (403, ErrorClass::Auth),
            (408, ErrorClass::Timeout),
            (405, ErrorClass::InvalidRequest),
            (404, ErrorClass::InvalidRequest),
            (414, ErrorClass::InvalidRequest),
            (500, ErrorClass::ServerError),
            (503, ErrorClass::ServerError),
            (304, ErrorClass::BadResponse),
        ];
        for (status, expected_class) in cases {
            let error = classify_failure(&answer(status, Some("text/plain"), "Not Allowed"));
            assert_eq!(error.class, expected_class, "{status}");
            assert_eq!(error.http_status, Some(status));
            assert!(error.message.starts_with(&format!("http {status}")), "{}", error.message);
        }
        let error = classify_failure(&answer(405, Some("text/html"), "<html><title>405 Not Allowed</title></html>"));
        assert!(error.message.contains("405 Not Allowed"), "{}", error.message);
    }

    #[test]
    fn a_kraken_envelope_on_a_non_2xx_answer_keeps_its_error_strings_but_not_its_class() {
        let error =
            classify_failure(&answer(429, Some("application/json"), r#"{"error":["EGeneral:Too many requests"]}"#));
        assert_eq!(error.class, ErrorClass::RateLimited);
        assert_eq!(error.exchange_errors, ["EGeneral:Too many requests"]);
        let error =
            classify_failure(&answer(502, Some("application/json"), r#"{"error":["EQuery:Unknown asset pair"]}"#));
        assert_eq!(error.class, ErrorClass::ServerError);
        assert_eq!(error.exchange_errors, ["EQuery:Unknown asset pair"]);
    }

    #[test]
    fn malformed_answers_with_status_200_are_bad_responses_that_say_why() {
        let long_html = format!("<html><head></head><body>{}</body></html>", "maintenance ".repeat(100));
        let long_text = "x".repeat(500);
        let cases = [
            (Some("application/json"), "", "empty body"),
            (Some("application/json"), "  \n", "empty body"),
            (Some("text/html"), CLOUDFLARE_520_PAGE, "html instead of json"),
            (None, long_html.as_str(), "html instead of json"),
            (Some("application/json"), r#"{"error":[],"result":{"XBTAUD":{"a":["1601"#, "invalid json: "),
            (Some("text/plain"), long_text.as_str(), "invalid json: "),
            (Some("application/json"), r#"{"result":{"unixtime":1}}"#, "unexpected shape: no error array"),
            (Some("application/json"), r#"{"error":"EService:Busy"}"#, "unexpected shape: no error array"),
            (Some("application/json"), r#"[1,2,3]"#, "unexpected shape: no error array"),
            (Some("application/json"), r#"{"error":[]}"#, "missing result"),
            (Some("application/json"), r#"{"error":[],"result":null}"#, "missing result"),
            (Some("application/json"), r#"{"error":["WOnly:A warning"]}"#, "missing result"),
        ];
        for (content_type, body, expected_message) in cases {
            let error = classify_failure(&answer(200, content_type, body));
            assert_eq!(error.class, ErrorClass::BadResponse, "{body}");
            assert_eq!(error.http_status, Some(200));
            assert!(error.message.starts_with(expected_message), "{expected_message:?} in {:?}", error.message);
            assert!(error.message.len() < 200, "the body is quoted at most briefly: {}", error.message);
        }
        let truncated = classify_failure(&json_answer(r#"{"error":[],"result":{"XBTAUD":{"a":["1601"#));
        assert!(!truncated.message.contains("XBTAUD"), "truncated json is not quoted: {}", truncated.message);
    }

    #[test]
    fn results_of_the_wrong_shape_are_bad_responses() {
        let ticker_cases = [
            r#"{"error":[],"result":[]}"#,
            r#"{"error":[],"result":{}}"#,
            r#"{"error":[],"result":{"XBTAUD":{"a":["abc"],"b":["1.0"],"c":["1.0"]}}}"#,
            r#"{"error":[],"result":{"XBTAUD":{"a":["-1.0"],"b":["1.0"],"c":["1.0"]}}}"#,
            r#"{"error":[],"result":{"XBTAUD":{"a":["0.0"],"b":["1.0"],"c":["1.0"]}}}"#,
            r#"{"error":[],"result":{"XBTAUD":{"a":["inf"],"b":["1.0"],"c":["1.0"]}}}"#,
            r#"{"error":[],"result":{"XBTAUD":{"a":[1.5],"b":["1.0"],"c":["1.0"]}}}"#,
            r#"{"error":[],"result":{"XBTAUD":{"a":["1.0"],"b":["1.0"]}}}"#,
            r#"{"error":[],"result":{"XBTAUD":{"a":[],"b":["1.0"],"c":["1.0"]}}}"#,
            r#"{"error":[],"result":{"XETHZUSD":{"a":["1.0"],"b":["1.0"],"c":["1.0"]},"XXBTZUSD":{"a":["1.0"],"b":["1.0"],"c":["1.0"]}}}"#,
        ];
        for body in ticker_cases {
            let error = classify_and_parse(body, |result| parse_ticker(result, "XBTAUD")).expect_err(body);
            assert_eq!(error.class, ErrorClass::BadResponse, "{body}");
            assert!(error.message.starts_with("unexpected shape: "), "{}", error.message);
        }
        let depth_cases = [
            r#"{"error":[],"result":{"XBTAUD":{"asks":[["1.0","1.0"]],"bids":[]}}}"#,
            r#"{"error":[],"result":{"XBTAUD":{"asks":[["1.0","1.0","1616663113"]],"bids":[]}}}"#,
            r#"{"error":[],"result":{"XBTAUD":{"asks":[["x","1.0",1616663113]],"bids":[]}}}"#,
            r#"{"error":[],"result":{"XBTAUD":{"asks":[]}}}"#,
        ];
        for body in depth_cases {
            let error = classify_and_parse(body, |result| parse_order_book(result, "XBTAUD")).expect_err(body);
            assert_eq!(error.class, ErrorClass::BadResponse, "{body}");
        }
        type ParseCheck = fn(&Value) -> Result<(), Error>;
        let other_cases: [(&str, ParseCheck); 5] = [
            (r#"{"error":[],"result":{"unixtime":"1616336594"}}"#, |result| parse_server_time(result).map(drop)),
            (r#"{"error":[],"result":{"timestamp":"2023-07-06T18:52:00Z"}}"#, |result| {
                parse_system_status(result).map(drop)
            }),
            (r#"{"error":[],"result":{"status":"online"}}"#, |result| parse_system_status(result).map(drop)),
            (r#"{"error":[],"result":{"ZUSD":171288.6158}}"#, |result| parse_balances(result).map(drop)),
            (r#"{"error":[],"result":["ZUSD"]}"#, |result| parse_balances(result).map(drop)),
        ];
        for (body, parse) in other_cases {
            let error = classify_and_parse(body, parse).expect_err(body);
            assert_eq!(error.class, ErrorClass::BadResponse, "{body}");
        }
    }

    // -----------------------------------------------------------------------------------------------------------
    // Result parsing
    // -----------------------------------------------------------------------------------------------------------

    #[test]
    fn ticker_for_xbtaud_is_read_under_the_key_xbtaud() {
        let ticker = classify_and_parse(TICKER_XBTAUD_BODY, |result| parse_ticker(result, "XBTAUD")).unwrap();
        assert_eq!(
            ticker,
            Ticker {
                pair_key: "XBTAUD".to_owned(),
                ask: "160100.00000".to_owned(),
                bid: "160099.90000".to_owned(),
                last: "160055.99000".to_owned(),
            }
        );
    }

    #[test]
    fn ticker_for_xbtusd_is_read_under_the_canonical_key_xxbtzusd() {
        let ticker = classify_and_parse(TICKER_XBTUSD_BODY, |result| parse_ticker(result, "XBTUSD")).unwrap();
        assert_eq!(ticker.pair_key, "XXBTZUSD");
        assert_eq!(
            (ticker.ask.as_str(), ticker.bid.as_str(), ticker.last.as_str()),
            ("52609.60000", "52609.50000", "52641.10000")
        );
    }

    #[test]
    fn ticker_with_several_pairs_takes_the_requested_one() {
        let body = r#"{"error":[],"result":{"XETHZUSD":{"a":["2.0"],"b":["2.0"],"c":["2.0"]},"XBTAUD":{"a":["1.5"],"b":["1.4"],"c":["1.45"]}}}"#;
        let ticker = classify_and_parse(body, |result| parse_ticker(result, "XBTAUD")).unwrap();
        assert_eq!((ticker.pair_key.as_str(), ticker.ask.as_str()), ("XBTAUD", "1.5"));
    }

    #[test]
    fn depth_is_parsed_into_levels_under_the_answered_key() {
        let book = classify_and_parse(DEPTH_BODY, |result| parse_order_book(result, "XBTUSD")).unwrap();
        assert_eq!(book.pair_key, "XXBTZUSD");
        assert_eq!(book.asks.len(), 2);
        assert_eq!(book.bids.len(), 2);
        assert_eq!(
            book.asks[0],
            Level { price: "52523.00000".to_owned(), volume: "1.199".to_owned(), timestamp: 1616663113 }
        );
        assert_eq!(book.bids[1].price, "52522.80000");
    }

    #[test]
    fn balance_is_parsed_into_assets_by_kraken_code() {
        let balances = classify_and_parse(BALANCE_BODY, parse_balances).unwrap();
        assert_eq!(balances.assets.len(), 10);
        assert_eq!(balances.assets["XXBT"], "1011.1908877900");
        assert_eq!(balances.assets["ETH2.S"], "198.3970800000");
    }

    #[test]
    fn system_status_accepts_every_known_and_unknown_status_and_ignores_additive_fields() {
        let body = r#"{"error":[],"result":{"status":"online","timestamp":"2023-07-06T18:52:00Z","upcoming_maintenance":[],"emergency":[]}}"#;
        let status = classify_and_parse(body, parse_system_status).unwrap();
        assert_eq!(status, SystemStatus::plain(TradingStatus::Online, "2023-07-06T18:52:00Z".to_owned()));
        for (text, expected) in [
            ("maintenance", TradingStatus::Maintenance),
            ("cancel_only", TradingStatus::CancelOnly),
            ("post_only", TradingStatus::PostOnly),
            ("limit_only", TradingStatus::LimitOnly),
            ("reduce_only", TradingStatus::Unknown("reduce_only".to_owned())),
        ] {
            let body = format!(r#"{{"error":[],"result":{{"status":"{text}","timestamp":"2025-11-11T00:17:10Z"}}}}"#);
            let status =
                classify_and_parse(&body, parse_system_status).expect("a non-online status is still an answer");
            assert_eq!(status.status, expected);
        }
    }

    #[test]
    fn system_status_advisories_are_read_leniently_and_bounded() {
        let body = format!(
            r#"{{"error":[],"result":{{"status":"online","timestamp":"2026-12-02T10:00:00Z",
                "emergency":[{{"event_id":4821,"title":"Elevated API error rates","incident_status":"identified",
                               "impact":"critical","source_url":"https://stspg.io/x","next_steps":[]}},
                             {{"event_id":1}}, 7, {{"title":"{}"}}],
                "upcoming_maintenance":[{{"title":"Scheduled Maintenance - Website","phase":"approaching_30m"}}]}}}}"#,
            "t".repeat(5000)
        );
        let status = classify_and_parse(&body, parse_system_status).unwrap();
        assert_eq!(status.emergency.len(), 2, "entries without a title are skipped: {status:?}");
        assert_eq!(status.emergency[0].title, "Elevated API error rates");
        assert_eq!(status.emergency[0].status, "identified");
        assert_eq!(status.emergency[0].source_url.as_deref(), Some("https://stspg.io/x"));
        assert!(status.emergency[1].title.len() <= MAX_ADVISORY_TEXT + 64);
        assert_eq!(status.upcoming_maintenance[0].status, "approaching_30m");
        let absent = r#"{"error":[],"result":{"status":"online","timestamp":"2026-12-02T10:00:00Z","emergency":"x"}}"#;
        let status = classify_and_parse(absent, parse_system_status).unwrap();
        assert!(status.emergency.is_empty() && status.upcoming_maintenance.is_empty());
    }

    #[test]
    fn server_time_is_read_from_unixtime() {
        let body = r#"{"error":[],"result":{"unixtime":1762820224,"rfc1123":"Tue, 11 Nov 25 00:17:04 +0000"}}"#;
        assert_eq!(classify_and_parse(body, parse_server_time).unwrap(), ServerTime { unixtime: 1762820224 });
    }

    #[test]
    fn decimals_are_plain_digits_with_at_most_one_point() {
        for valid in ["1", "1.0", "0.5", ".5", "5.", "-2.5", "160100.00000"] {
            assert!(is_decimal(valid), "{valid}");
        }
        for invalid in ["", ".", "-", "1e5", "inf", "NaN", "1.2.3", "+1", " 1", "1,5"] {
            assert!(!is_decimal(invalid), "{invalid}");
        }
        assert!(!is_positive_decimal("0.000"));
        assert!(!is_positive_decimal("-1"));
    }

    // -----------------------------------------------------------------------------------------------------------
    // Construction, URLs and nonces
    // -----------------------------------------------------------------------------------------------------------

    #[test]
    fn urls_join_the_base_with_or_without_a_trailing_slash_and_a_path_prefix() {
        let cases = [
            ("https://api.kraken.com", "https://api.kraken.com/0/public/Time"),
            ("https://api.kraken.com/", "https://api.kraken.com/0/public/Time"),
            ("http://127.0.0.1:8080/kraken", "http://127.0.0.1:8080/kraken/0/public/Time"),
            ("http://127.0.0.1:8080/kraken/", "http://127.0.0.1:8080/kraken/0/public/Time"),
            ("http://127.0.0.1:8080/kraken/?x=1#top", "http://127.0.0.1:8080/kraken/0/public/Time"),
        ];
        for (base, expected) in cases {
            assert_eq!(endpoint_url(&Url::parse(base).unwrap(), "/0/public/Time").as_str(), expected, "{base}");
        }
        let client = test_client("http://127.0.0.1:8080/kraken/", None);
        assert_eq!(client.urls.ticker.as_str(), "http://127.0.0.1:8080/kraken/0/public/Ticker?pair=XBTAUD");
        assert_eq!(client.urls.depth.as_str(), "http://127.0.0.1:8080/kraken/0/public/Depth?pair=XBTAUD&count=7");
        assert_eq!(client.urls.balance.as_str(), "http://127.0.0.1:8080/kraken/0/private/Balance");
    }

    #[test]
    fn nonces_strictly_increase_even_when_the_clock_stalls_or_steps_back() {
        let source = NonceSource::new();
        assert_eq!(source.next_at(1_000), 1_000);
        assert_eq!(source.next_at(1_000), 1_001);
        assert_eq!(source.next_at(900), 1_002);
        assert_eq!(source.next_at(5_000), 5_000);
        assert!(source.next() > 5_000);
    }

    #[test]
    fn nonces_taken_from_many_threads_are_all_distinct() {
        let source = Arc::new(NonceSource::new());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let source = Arc::clone(&source);
                std::thread::spawn(move || (0..1_000).map(|_| source.next()).collect::<Vec<_>>())
            })
            .collect();
        let mut nonces: Vec<u64> = threads.into_iter().flat_map(|thread| thread.join().unwrap()).collect();
        let taken = nonces.len();
        nonces.sort_unstable();
        nonces.dedup();
        assert_eq!(nonces.len(), taken);
    }

    #[test]
    fn clients_with_the_same_api_key_share_one_nonce_source_and_lock() {
        let first = test_client("http://127.0.0.1:1", Some(credentials("shared-key-for-registry-test")));
        let second = test_client("http://127.0.0.1:2", Some(credentials("shared-key-for-registry-test")));
        let other = test_client("http://127.0.0.1:1", Some(credentials("another-key-for-registry-test")));
        let key_state = |client: &Client| Arc::clone(&client.private_access.as_ref().unwrap().key_state);
        assert!(Arc::ptr_eq(&key_state(&first), &key_state(&second)));
        assert!(!Arc::ptr_eq(&key_state(&first), &key_state(&other)));
    }

    #[test]
    fn building_fails_on_a_bad_secret_or_key_without_echoing_either() {
        install_crypto_provider();
        let bad_secret = Credentials { api_key: Secret::new("key"), api_secret: Secret::new("not base64!!") };
        let error = Client::new(&test_config("https://api.kraken.com", "XBTAUD", Some(bad_secret)), TEST_TIMEOUT)
            .expect_err("an invalid secret is refused");
        assert!(matches!(error, BuildError::InvalidApiSecret));
        assert!(!error.to_string().contains("not base64!!"));
        let bad_key = Credentials { api_key: Secret::new("key\nwith newline"), api_secret: Secret::new(TEST_SECRET) };
        let error = Client::new(&test_config("https://api.kraken.com", "XBTAUD", Some(bad_key)), TEST_TIMEOUT)
            .expect_err("a key that is no header value is refused");
        assert!(matches!(error, BuildError::InvalidApiKey));
        assert!(!error.to_string().contains("newline"));
    }

    #[test]
    fn a_client_prints_without_its_credentials() {
        let client = test_client("https://api.kraken.com", Some(credentials("printed-key-must-not-show")));
        let printed = format!("{client:?}");
        assert!(!printed.contains("printed-key-must-not-show"), "{printed}");
        assert!(!printed.contains(TEST_SECRET), "{printed}");
        assert!(printed.contains("has_credentials: true"), "{printed}");
    }

    // -----------------------------------------------------------------------------------------------------------
    // Over real loopback HTTP (real time: sockets and a paused clock do not mix)
    // -----------------------------------------------------------------------------------------------------------

    #[tokio::test]
    async fn public_calls_are_gets_with_the_pair_and_count_in_the_query() {
        let (sender, mut receiver) = mpsc::unbounded_channel::<(String, String)>();
        let answer_with = |body: &'static str| {
            move |State(sender): State<mpsc::UnboundedSender<(String, String)>>,
                  method: axum::http::Method,
                  uri: Uri| async move {
                sender.send((method.to_string(), uri.to_string())).unwrap();
                ([(CONTENT_TYPE, "application/json")], body)
            }
        };
        let router = Router::new()
            .route(
                "/0/public/SystemStatus",
                get(answer_with(r#"{"error":[],"result":{"status":"online","timestamp":"2025-11-11T00:17:10Z"}}"#)),
            )
            .route(
                "/0/public/Time",
                get(answer_with(
                    r#"{"error":[],"result":{"unixtime":1762820224,"rfc1123":"Tue, 11 Nov 25 00:17:04 +0000"}}"#,
                )),
            )
            .route("/0/public/Ticker", get(answer_with(TICKER_XBTAUD_BODY)))
            .route("/0/public/Depth", get(answer_with(DEPTH_BODY)))
            .with_state(sender);
        let client = test_client(&spawn_router(router).await, None);

        let status = client.system_status().await;
        assert_eq!(status.result.unwrap().status, TradingStatus::Online);
        assert_eq!(status.endpoint, Endpoint::SystemStatus);
        assert!(status.latency > Duration::ZERO);
        assert_eq!(client.server_time().await.result.unwrap().unixtime, 1762820224);
        assert_eq!(client.ticker().await.result.unwrap().pair_key, "XBTAUD");
        assert_eq!(client.depth().await.result.unwrap().asks.len(), 2);

        let mut requests = Vec::new();
        while let Ok(request) = receiver.try_recv() {
            requests.push(request);
        }
        let expected = [
            ("GET", "/0/public/SystemStatus"),
            ("GET", "/0/public/Time"),
            ("GET", "/0/public/Ticker?pair=XBTAUD"),
            ("GET", "/0/public/Depth?pair=XBTAUD&count=7"),
        ];
        let requests: Vec<(&str, &str)> =
            requests.iter().map(|(method, uri)| (method.as_str(), uri.as_str())).collect();
        assert_eq!(requests, expected);
    }

    #[tokio::test]
    async fn balance_requests_are_signed_form_posts_with_strictly_increasing_nonces() {
        let (sender, mut receiver) = mpsc::unbounded_channel::<(HeaderMap, String)>();
        let router = Router::new()
            .route(
                "/prefix/0/private/Balance",
                post(
                    |State(sender): State<mpsc::UnboundedSender<(HeaderMap, String)>>,
                     headers: HeaderMap,
                     body: String| async move {
                        sender.send((headers, body)).unwrap();
                        ([(CONTENT_TYPE, "application/json")], BALANCE_BODY)
                    },
                ),
            )
            .with_state(sender);
        let base_url = format!("{}/prefix/", spawn_router(router).await);
        let api_key = "balance-signing-test-key";
        let client = test_client(&base_url, Some(credentials(api_key)));

        let mut nonces = Vec::new();
        for _ in 0..2 {
            let outcome = client.balance().await;
            assert_eq!(outcome.result.unwrap().assets["ZUSD"], "171288.6158");
            let (headers, body) = receiver.recv().await.unwrap();
            assert_eq!(headers["api-key"], api_key);
            assert_eq!(headers["content-type"], "application/x-www-form-urlencoded");
            assert!(headers["user-agent"].to_str().unwrap().starts_with("exwatch/"));
            let nonce: u64 = body.strip_prefix("nonce=").expect("a form body with the nonce").parse().unwrap();
            let expected_signature = sign("/0/private/Balance", nonce, &body, &decoded_secret());
            assert_eq!(headers["api-sign"], expected_signature.as_str());
            nonces.push(nonce);
        }
        assert!(nonces[1] > nonces[0], "{nonces:?}");
    }

    #[tokio::test]
    async fn concurrent_balance_calls_of_one_key_reach_the_server_in_nonce_order() {
        let (sender, mut receiver) = mpsc::unbounded_channel::<u64>();
        let router = Router::new()
            .route(
                "/0/private/Balance",
                post(|State(sender): State<mpsc::UnboundedSender<u64>>, body: String| async move {
                    let nonce = body.trim_start_matches("nonce=").parse().unwrap();
                    sender.send(nonce).unwrap();
                    ([(CONTENT_TYPE, "application/json")], BALANCE_BODY)
                }),
            )
            .with_state(sender);
        let base_url = spawn_router(router).await;
        let clients: Vec<Arc<Client>> =
            (0..2).map(|_| Arc::new(test_client(&base_url, Some(credentials("concurrent-nonce-test-key"))))).collect();
        let calls: Vec<_> = (0..8)
            .map(|index| {
                let client = Arc::clone(&clients[index % 2]);
                tokio::spawn(async move { client.balance().await.result.is_ok() })
            })
            .collect();
        for call in calls {
            assert!(call.await.unwrap());
        }
        let mut arrived = Vec::new();
        while let Ok(nonce) = receiver.try_recv() {
            arrived.push(nonce);
        }
        assert_eq!(arrived.len(), 8);
        assert!(arrived.windows(2).all(|pair| pair[0] < pair[1]), "{arrived:?}");
    }

    #[tokio::test]
    async fn a_server_that_never_answers_is_a_timeout_within_the_configured_timeout() {
        let client = test_client(&spawn_silent_server().await, None);
        let started = Instant::now();
        let outcome = client.server_time().await;
        let waited = started.elapsed();
        let error = outcome.result.unwrap_err();
        assert_eq!(error.class, ErrorClass::Timeout, "{error}");
        assert_eq!(error.http_status, None);
        assert!(outcome.latency >= Duration::from_millis(250), "{:?}", outcome.latency);
        // Generous slack: the build machine is shared, but a missing timeout would wait forever.
        assert!(waited < TEST_TIMEOUT + Duration::from_secs(2), "{waited:?}");
    }

    #[tokio::test]
    async fn a_body_that_stalls_is_a_timeout_within_the_configured_timeout() {
        let base_url = spawn_raw_server(|mut stream| async move {
            let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{\"error\":[]";
            stream.write_all(head.as_bytes()).await.unwrap();
            std::future::pending::<()>().await;
        })
        .await;
        let client = test_client(&base_url, None);
        let started = Instant::now();
        let error = client.server_time().await.result.unwrap_err();
        assert_eq!(error.class, ErrorClass::Timeout, "{error}");
        assert!(started.elapsed() < TEST_TIMEOUT + Duration::from_secs(2));
    }

    #[tokio::test]
    async fn a_port_with_nothing_listening_is_a_network_failure() {
        let client = test_client(&unused_local_address().await, None);
        let error = client.system_status().await.result.unwrap_err();
        assert_eq!(error.class, ErrorClass::Network, "{error}");
        assert!(error.message.contains("connection refused"), "{}", error.message);
        assert!(!error.message.contains("127.0.0.1"), "no url in the message: {}", error.message);
    }

    #[tokio::test]
    async fn a_connection_closed_mid_body_is_a_network_failure() {
        let base_url = spawn_raw_server(|mut stream| async move {
            let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{\"error\":[]";
            stream.write_all(head.as_bytes()).await.unwrap();
            stream.shutdown().await.unwrap();
        })
        .await;
        let client = test_client(&base_url, None);
        let error = client.server_time().await.result.unwrap_err();
        assert_eq!(error.class, ErrorClass::Network, "{error}");
        assert_eq!(error.http_status, Some(200));
        assert!(error.message.starts_with("reading the body failed"), "{}", error.message);
    }

    #[tokio::test]
    async fn a_body_larger_than_the_limit_is_a_bad_response() {
        // Declared up front with content-length.
        let router = Router::new().route("/0/public/Time", get(|| async { vec![b' '; BODY_LIMIT_BYTES + 1] }));
        let client = test_client(&spawn_router(router).await, None);
        let error = client.server_time().await.result.unwrap_err();
        assert_eq!(error.class, ErrorClass::BadResponse, "{error}");
        assert!(error.message.contains("body larger than"), "{}", error.message);

        // Streamed without a length until the connection closes.
        let base_url = spawn_raw_server(|mut stream| async move {
            let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n\r\n";
            stream.write_all(head.as_bytes()).await.unwrap();
            let chunk = vec![b' '; 64 * 1024];
            // The client hangs up once it has seen enough, which ends the writes with an error.
            for _ in 0..(2 * BODY_LIMIT_BYTES / chunk.len()) {
                if stream.write_all(&chunk).await.is_err() {
                    return;
                }
            }
        })
        .await;
        let client = test_client(&base_url, None);
        let error = client.server_time().await.result.unwrap_err();
        assert_eq!(error.class, ErrorClass::BadResponse, "{error}");
        assert!(error.message.contains("body larger than"), "{}", error.message);
    }

    #[tokio::test]
    async fn every_redirect_is_a_bad_response_naming_only_the_location_host_and_is_never_followed() {
        let (second_host, second_host_requests) = counting_router();
        let second_host = spawn_router(second_host).await;
        let second_authority = second_host.trim_start_matches("http://").to_owned();
        let location = format!("http://user:password@{second_authority}/0/private/Balance?otp=123456");
        for status in [301, 302, 303, 307, 308] {
            let location = location.clone();
            let router = Router::new().fallback(move || async move {
                let status = axum::http::StatusCode::from_u16(status).unwrap();
                (status, [(axum::http::header::LOCATION, location)], "moved")
            });
            let client = test_client(&spawn_router(router).await, Some(credentials("redirect-test-key")));
            for error in [client.ticker().await.result.unwrap_err(), client.balance().await.result.unwrap_err()] {
                assert_eq!(error.class, ErrorClass::BadResponse, "{status}: {error}");
                assert_eq!(error.http_status, Some(status));
                assert_eq!(error.message, format!("http {status} redirect to {second_authority} (not followed)"));
            }
        }
        assert_eq!(second_host_requests.load(Ordering::SeqCst), 0, "no request reached the redirect's host");
    }

    #[test]
    fn a_location_is_reduced_to_its_host_and_port() {
        let cases = [
            ("https://user:secret@api.example.com:8443/path?token=1#x", "api.example.com:8443"),
            ("https://api.example.com/0/public/Time", "api.example.com"),
            ("http://[::1]:9/x", "[::1]:9"),
            ("/0/public/Time?token=1", "a path on the same host"),
            ("http://", "an invalid location"),
        ];
        for (location, expected) in cases {
            assert_eq!(transport::location_host(location), expected, "{location}");
        }
        let error = classify_failure(&answer(302, None, ""));
        assert_eq!(error.message, "http 302 redirect without a location (not followed)");
    }

    #[tokio::test]
    async fn tls_to_a_plain_http_port_is_named_a_tls_handshake_failure() {
        let router = Router::new().route("/0/public/Time", get(|| async { "plain http" }));
        let plain = spawn_router(router).await;
        let client = test_client(&plain.replace("http://", "https://"), None);
        let error = client.server_time().await.result.unwrap_err();
        assert_eq!(error.class, ErrorClass::Network, "{error}");
        assert!(error.message.starts_with("connect failed: tls handshake failed: "), "{}", error.message);
    }

    #[tokio::test]
    async fn a_garbage_status_line_is_an_invalid_http_response() {
        for garbage in ["SSH-2.0-OpenSSH_9.6\r\n\r\n", "HTTP/1.1 abc Whatever\r\n\r\n", "\u{0}\u{1}\u{2}\r\n\r\n"] {
            let base_url = spawn_raw_server(move |mut stream| async move {
                let _ = stream.write_all(garbage.as_bytes()).await;
                let _ = stream.shutdown().await;
            })
            .await;
            let error = test_client(&base_url, None).server_time().await.result.unwrap_err();
            assert_eq!(error.class, ErrorClass::BadResponse, "{garbage:?}: {error}");
            assert!(error.message.starts_with("request failed: invalid http response: "), "{}", error.message);
            assert!(!error.message.contains("OpenSSH"), "the bytes are described, not quoted: {}", error.message);
        }
    }

    /// A resolver that knows no name, so the test never asks a real DNS server.
    struct NoNames;

    impl reqwest::dns::Resolve for NoNames {
        fn resolve(&self, _name: reqwest::dns::Name) -> reqwest::dns::Resolving {
            Box::pin(async { Err("no such host".into()) })
        }
    }

    #[tokio::test]
    async fn a_dns_failure_names_the_host() {
        install_crypto_provider();
        let http = transport::client_builder(TEST_TIMEOUT).dns_resolver(Arc::new(NoNames)).build().unwrap();
        let config = test_config("https://user:secret@exchange.invalid/prefix?x=1", "XBTAUD", None);
        let client = Client::build(&config, TEST_TIMEOUT, || Ok(Transport::Http(http))).unwrap();
        let error = client.system_status().await.result.unwrap_err();
        assert_eq!(error.class, ErrorClass::Network, "{error}");
        assert_eq!(error.message, "connect failed: dns lookup failed for exchange.invalid");
    }

    #[tokio::test]
    async fn balance_without_credentials_is_an_invalid_request_that_sends_nothing() {
        let (router, requests_seen) = counting_router();
        let client = test_client(&spawn_router(router).await, None);
        assert!(!client.has_credentials());
        let outcome = client.balance().await;
        let error = outcome.result.unwrap_err();
        assert_eq!(error.class, ErrorClass::InvalidRequest);
        assert_eq!(outcome.latency, Duration::ZERO);
        // A sent request would have been answered before `balance` returned.
        assert_eq!(requests_seen.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn error_messages_never_contain_the_api_key_or_secret() {
        let api_key = "secret-leak-test-key-4f9a";
        let invalid_key_router = Router::new().route(
            "/0/private/Balance",
            post(|| async { ([(CONTENT_TYPE, "application/json")], r#"{"error":["EAPI:Invalid key"],"result":{}}"#) }),
        );
        let cloudflare_router = Router::new().route(
            "/0/private/Balance",
            post(|| async {
                (
                    axum::http::StatusCode::from_u16(520).unwrap(),
                    [(CONTENT_TYPE, "text/html"), (SERVER, "cloudflare")],
                    CLOUDFLARE_520_PAGE,
                )
            }),
        );
        let base_urls = [
            spawn_router(invalid_key_router).await,
            spawn_router(cloudflare_router).await,
            spawn_silent_server().await,
            unused_local_address().await,
        ];
        let mut classes = Vec::new();
        for base_url in base_urls {
            let client = test_client(&base_url, Some(credentials(api_key)));
            let error = client.balance().await.result.unwrap_err();
            for printed in [error.to_string(), format!("{error:?}")] {
                assert!(!printed.contains(api_key), "{printed}");
                assert!(!printed.contains(TEST_SECRET), "{printed}");
                assert!(!printed.contains("nonce="), "{printed}");
            }
            classes.push(error.class);
        }
        assert_eq!(classes, [ErrorClass::Auth, ErrorClass::ServerError, ErrorClass::Timeout, ErrorClass::Network]);
    }
}
