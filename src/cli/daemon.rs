//! The commands that talk to a running daemon (`status`, `breaker`, `rate-limit`) and their HTTP client: one
//! request, one bounded JSON answer read as its [`api`] type before anything is printed.
//!
//! What it owns: finding the daemon (`--url`, else `server.listen`) and the admin token, reaching it (never
//! following a redirect, like every exwatch client), telling "nothing answers there" from "something answers that
//! is not exwatch", reading at most [`ANSWER_LIMIT_BYTES`], and refusing an answer that does not read as the
//! command's type, naming the field. What it does not do: word the answer (`cli::render`). Every [`Failure`] of
//! the daemon is exit 1; a missing token or an unusable `--url` is the CLI's own problem, exit 2.

use std::process::ExitCode;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use url::Url;

use super::{
    AdminArgs, BreakerAction, BreakerArgs, ExchangeStatusArgs, RateLimitAction, RateLimitArgs, StatusArgs, Usage, load,
    render,
};
use crate::breaker;
use crate::config::Config;
use crate::exchange::ErrorClass;
use crate::http::api;
use crate::secret::{Secret, redact_url};
use crate::transport;

/// How long one request to the daemon may take.
const TIMEOUT: Duration = Duration::from_secs(10);

/// The daemon's answers are a few kilobytes; something bigger is not the daemon.
const ANSWER_LIMIT_BYTES: usize = 1024 * 1024;

/// How much of a foreign answer a message quotes.
const QUOTE_LIMIT_CHARS: usize = 200;

/// Why a request to the daemon gave nothing to print. The message names the URL tried (without userinfo).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Failure(String);

/// An answer read as its type, with the JSON it was read from (`status --json` prints that).
struct Answer<T> {
    value: T,
    json: Value,
}

/// The HTTP client of a running daemon: no redirects, [`TIMEOUT`] per request.
struct Client {
    http: reqwest::Client,
}

impl Client {
    fn new() -> anyhow::Result<Client> {
        let http = transport::client_builder(TIMEOUT)
            .build()
            .map_err(|error| anyhow::anyhow!("cannot build the HTTP client: {error}"))?;
        Ok(Client { http })
    }

    /// Sends `method url` with an optional bearer token and JSON body. `Ok` only for a 2xx JSON answer that reads
    /// as `T`; the daemon's own error (`{"error": "..."}` with a non-2xx status) is quoted.
    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        url: &Url,
        token: Option<&str>,
        body: Option<String>,
    ) -> Result<Answer<T>, Failure> {
        let shown = shown(url);
        let mut request = self.http.request(method, url.clone());
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.header(reqwest::header::CONTENT_TYPE, "application/json").body(body);
        }
        let mut response = request.send().await.map_err(|error| unreachable_failure(&shown, &error))?;
        let status = response.status();
        if status.is_redirection() {
            let location = response
                .headers()
                .get(reqwest::header::LOCATION)
                .and_then(|value| value.to_str().ok())
                .map(transport::location_host);
            return Err(Failure(format!(
                "{shown} answered {status}, a {}: that is not exwatch's API (check --url or server.listen)",
                transport::redirect_description(location.as_deref())
            )));
        }
        let is_html = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .is_some_and(|content_type| content_type.to_ascii_lowercase().contains("html"));
        let mut bytes = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|error| unreachable_failure(&shown, &error))? {
            if bytes.len() + chunk.len() > ANSWER_LIMIT_BYTES {
                return Err(Failure(format!(
                    "{shown} answered {status} with more than {ANSWER_LIMIT_BYTES} bytes: that is not exwatch's API"
                )));
            }
            bytes.extend_from_slice(&chunk);
        }
        let json: Option<Value> = serde_json::from_slice(&bytes).ok();
        if !status.is_success() {
            return Err(Failure(refusal(&shown, status, json.as_ref(), is_html, &bytes)));
        }
        let Some(json) = json else {
            let what = if is_html { "an HTML page" } else { "a body that is not JSON" };
            return Err(Failure(format!("{shown} answered {status} with {what}: that is not exwatch's API")));
        };
        match read_answer(&json) {
            Ok(value) => Ok(Answer { value, json }),
            Err(problem) => Err(Failure(format!(
                "{shown} answered {status} with JSON that is not exwatch's answer ({problem}): is it exwatch, \
                 and the same version as this command?"
            ))),
        }
    }
}

/// `exwatch status`: `/api/v1/status` for people. Exit 0 when the daemon answered, 1 when it could not be reached.
pub(super) async fn status(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let config = load(&args.config)?;
    let url = daemon_url(args.url, &config)?.join("api/v1/status").map_err(|error| Usage(error.into()))?;
    let answer: Answer<api::StatusResponse> = match Client::new()?.call(Method::GET, &url, None, None).await {
        Ok(answer) => answer,
        Err(error) => {
            eprintln!("exwatch: cannot read the status: {error}");
            return Ok(ExitCode::FAILURE);
        }
    };
    if args.json {
        println!("{:#}", answer.json);
    } else {
        print!("{}", render::status(&answer.value, chrono::Utc::now()));
    }
    Ok(ExitCode::SUCCESS)
}

/// `exwatch exchange-status`: what each exchange (or the one named) says, as the daemon last read it.
pub(super) async fn exchange_status(args: ExchangeStatusArgs) -> anyhow::Result<ExitCode> {
    let ExchangeStatusArgs { status: args, exchange } = args;
    let config = load(&args.config)?;
    let base = daemon_url(args.url, &config)?;
    let names = match exchange {
        Some(name) => vec![name],
        None => config.exchanges.iter().map(|view| view.name.clone()).collect(),
    };
    let client = Client::new()?;
    let now = chrono::Utc::now();
    for name in names {
        let path = format!("api/v1/exchanges/{}/exchange-status", url_segment(&name));
        let url = base.join(&path).map_err(|error| Usage(error.into()))?;
        let answer: Answer<api::ExchangeSays> = match client.call(Method::GET, &url, None, None).await {
            Ok(answer) => answer,
            Err(error) => {
                eprintln!("exwatch: cannot read what {name} says: {error}");
                return Ok(ExitCode::FAILURE);
            }
        };
        if args.json {
            println!("{:#}", answer.json);
        } else {
            print!("{}", render::exchange_says(&answer.value, now));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A name as one URL path segment: exchange names are `[a-z0-9_-]` (configuration checks), anything else is
/// percent-encoded so it cannot change the path.
fn url_segment(name: &str) -> String {
    url::form_urlencoded::byte_serialize(name.as_bytes()).collect()
}

/// `exwatch breaker`: read, force or reset the breaker, then print its status.
pub(super) async fn breaker(args: BreakerArgs) -> anyhow::Result<ExitCode> {
    let admin = Admin::new(args.admin)?;
    let forced = match args.action {
        BreakerAction::Status => {
            let status: api::BreakerStatus = admin.call(Method::GET, "circuit-breaker", None, None).await?;
            println!("{}", render::breaker_line(&status));
            return Ok(ExitCode::SUCCESS);
        }
        BreakerAction::Reset => None,
        BreakerAction::HalfOpen => Some(breaker::State::HalfOpen),
        BreakerAction::ForceOpen => Some(breaker::State::ForcedOpen),
        BreakerAction::Disable => Some(breaker::State::Disabled),
        BreakerAction::MetricsOnly => Some(breaker::State::MetricsOnly),
        BreakerAction::Close => Some(breaker::State::Closed),
    };
    let change: api::BreakerChange = match forced {
        Some(state) => {
            let body = json_body(&api::ForceRequest { state })?;
            admin.call(Method::POST, "circuit-breaker", None, Some(body)).await?
        }
        None => admin.call(Method::POST, "circuit-breaker", Some("reset"), None).await?,
    };
    println!("{}", render::breaker_change(&change, forced.is_none()));
    Ok(ExitCode::SUCCESS)
}

/// `exwatch rate-limit`: read or set the rate factor, or end a private-call pause, then print the limiter's status.
pub(super) async fn rate_limit(args: RateLimitArgs) -> anyhow::Result<ExitCode> {
    let admin = Admin::new(args.admin)?;
    let status: api::RateLimitStatus = match args.action {
        RateLimitAction::Status => admin.call(Method::GET, "rate-limit", None, None).await?,
        RateLimitAction::Set { factor } => {
            let body = json_body(&api::RateFactorRequest { factor })?;
            admin.call(Method::PUT, "rate-limit", None, Some(body)).await?
        }
        RateLimitAction::ResumePrivate => admin.call(Method::POST, "rate-limit", Some("resume-private"), None).await?,
    };
    println!("{}", render::rate_limit_line(&status));
    Ok(ExitCode::SUCCESS)
}

/// A request body as the admin API reads it.
fn json_body(body: &impl Serialize) -> anyhow::Result<String> {
    Ok(serde_json::to_string(body)?)
}

/// A client of the admin API: the base URL, the token and the exchange acted on.
struct Admin {
    http: Client,
    base: Url,
    token: Secret,
    exchange: String,
}

impl Admin {
    fn new(args: AdminArgs) -> anyhow::Result<Admin> {
        let config = Config::load(args.config.as_deref())?;
        let Some(token) = config.admin.token.clone() else {
            return Err(Usage(anyhow::anyhow!(
                "no admin token configured: set admin.token or admin.token_file in the configuration file, \
                 or EXWATCH__ADMIN__TOKEN"
            ))
            .into());
        };
        let base = daemon_url(args.url, &config)?;
        Ok(Admin { http: Client::new()?, base, token, exchange: args.exchange })
    }

    /// Calls `method /api/admin/{resource}/{exchange}[/{action}]` with an optional JSON body; returns the answer
    /// of a 2xx that reads as `T`, or a [`Failure`] naming what answered instead.
    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        resource: &str,
        action: Option<&str>,
        body: Option<String>,
    ) -> anyhow::Result<T> {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .map_err(|()| Usage(anyhow::anyhow!("--url {} cannot be a base URL", redact_url(&self.base))))?
            .pop_if_empty()
            .extend(["api", "admin", resource, &self.exchange])
            .extend(action);
        Ok(self.http.call(method, &url, Some(self.token.expose()), body).await?.value)
    }
}

/// The daemon's base URL: `--url`, else `server.listen` (on loopback when it listens on every address).
fn daemon_url(url: Option<Url>, config: &Config) -> anyhow::Result<Url> {
    if let Some(url) = url {
        return Ok(url);
    }
    let mut listen = config.server.listen;
    if listen.ip().is_unspecified() {
        listen.set_ip(match listen {
            std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    Ok(Url::parse(&format!("http://{listen}"))?)
}

/// The URL as printed: without userinfo or query values, which can be credentials.
fn shown(url: &Url) -> String {
    let mut url = url.clone();
    // Only fails for URLs that cannot have userinfo (no host), which then have none to remove.
    let _ = url.set_username("");
    let _ = url.set_password(None);
    crate::secret::redact_url(&url)
}

/// No answer at all: nothing listening, no route, a timeout, TLS, or a reply that is not HTTP.
fn unreachable_failure(shown: &str, error: &reqwest::Error) -> Failure {
    let classified = transport::classify_transport_error(error, TIMEOUT);
    let message = match classified.class {
        ErrorClass::Timeout => format!("no answer from {shown} within {}", humantime::format_duration(TIMEOUT)),
        ErrorClass::BadResponse => format!("{shown} does not speak HTTP as exwatch does ({})", classified.message),
        _ if error.is_connect() => {
            format!("nothing answers at {shown} ({}): is the daemon running there?", classified.message)
        }
        _ => format!("cannot talk to {shown} ({})", classified.message),
    };
    Failure(message)
}

/// A non-2xx answer: the daemon's JSON error when there is one, otherwise what kind of server answered.
fn refusal(shown: &str, status: StatusCode, json: Option<&Value>, is_html: bool, bytes: &[u8]) -> String {
    if let Some(message) = json.and_then(|json| json.get("error")).and_then(Value::as_str) {
        let message: String = message.chars().take(QUOTE_LIMIT_CHARS).collect();
        return format!("the daemon at {shown} answered {status}: {message}");
    }
    if status == StatusCode::NOT_FOUND && bytes.iter().all(u8::is_ascii_whitespace) {
        return format!(
            "{shown} answered {status}: no admin API there (is admin.token configured on the daemon, and is it exwatch?)"
        );
    }
    if is_html {
        return format!("{shown} answered {status} with an HTML page: that is not exwatch's API");
    }
    let quote: String = String::from_utf8_lossy(bytes)
        .chars()
        .filter(|character| !character.is_control())
        .take(QUOTE_LIMIT_CHARS)
        .collect();
    format!("{shown} answered {status} without exwatch's JSON error: {:?}", quote.trim())
}

/// `json` as `T`, or the first problem, naming the field (`missing field `exchange``, `changed: invalid type`).
fn read_answer<T: DeserializeOwned>(json: &Value) -> Result<T, String> {
    // A struct also reads from an array; exwatch only ever answers objects.
    if !json.is_object() {
        return Err("not an object".to_owned());
    }
    serde_path_to_error::deserialize(json).map_err(|error| error.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shown_urls_never_carry_userinfo() {
        let url = Url::parse("http://operator:hunter2@127.0.0.1:9750/").unwrap();
        assert_eq!(shown(&url), "http://127.0.0.1:9750/");
    }

    #[test]
    fn an_answer_must_have_every_field_of_its_type() {
        #[derive(Debug, serde::Deserialize)]
        struct Change {
            #[expect(dead_code, reason = "only whether it reads matters")]
            exchange: String,
            #[expect(dead_code, reason = "only whether it reads matters")]
            changed: bool,
        }
        let read = |json: Value| read_answer::<Change>(&json).map(|_| ());
        assert_eq!(read(serde_json::json!({"exchange": "kraken", "changed": true})), Ok(()));
        assert_eq!(read(serde_json::json!({"ok": true})).unwrap_err(), "missing field `exchange`");
        let problem = read(serde_json::json!({"exchange": "kraken", "changed": "yes"})).unwrap_err();
        assert_eq!(problem, "changed: invalid type: string \"yes\", expected a boolean");
        assert_eq!(read(serde_json::json!([1])).unwrap_err(), "not an object");
    }
}
