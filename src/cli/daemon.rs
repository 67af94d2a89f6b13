//! The CLI's HTTP client of a running daemon (`status`, `breaker`, `rate-limit`): one request, one bounded JSON
//! answer whose shape is checked before anything is printed.
//!
//! What it owns: reaching the daemon (never following a redirect, like every exwatch client), telling "nothing
//! answers there" from "something answers that is not exwatch", reading at most [`ANSWER_LIMIT_BYTES`], and
//! refusing an answer that lacks the fields the command prints. What it does not do: format the answer (the
//! commands in `cli` do) or decide exit codes (every [`Failure`] is exit 1).

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::Value;
use url::Url;

use crate::exchange::ErrorClass;
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
pub(super) struct Failure(pub(super) String);

/// What a field of an expected answer must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Field {
    Text,
    Number,
    Flag,
    List,
}

impl Field {
    fn matches(self, value: &Value) -> bool {
        match self {
            Field::Text => value.is_string(),
            Field::Number => value.is_number(),
            Field::Flag => value.is_boolean(),
            Field::List => value.is_array(),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Field::Text => "string",
            Field::Number => "number",
            Field::Flag => "boolean",
            Field::List => "array",
        }
    }
}

/// The fields (and their kinds) an answer must have for a command to print it.
pub(super) type Shape = &'static [(&'static str, Field)];

pub(super) struct Client {
    http: reqwest::Client,
}

impl Client {
    pub(super) fn new() -> anyhow::Result<Client> {
        let http = transport::client_builder(TIMEOUT)
            .build()
            .map_err(|error| anyhow::anyhow!("cannot build the HTTP client: {error}"))?;
        Ok(Client { http })
    }

    /// Sends `method url` with an optional bearer token and JSON body. `Ok` only for a 2xx JSON answer with
    /// every field of `shape`; the daemon's own error (`{"error": "..."}` with a non-2xx status) is quoted.
    pub(super) async fn call(
        &self,
        method: Method,
        url: &Url,
        token: Option<&str>,
        body: Option<Value>,
        shape: Shape,
    ) -> Result<Value, Failure> {
        let shown = shown(url);
        let mut request = self.http.request(method, url.clone());
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.header(reqwest::header::CONTENT_TYPE, "application/json").body(body.to_string());
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
        if let Some(problem) = shape_problem(&json, shape) {
            return Err(Failure(format!(
                "{shown} answered {status} with JSON that is not exwatch's answer ({problem}): is it exwatch, \
                 and the same version as this command?"
            )));
        }
        Ok(json)
    }
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

/// The first field of `shape` that `json` lacks or has with the wrong kind.
fn shape_problem(json: &Value, shape: Shape) -> Option<String> {
    if !json.is_object() {
        return Some("not an object".to_owned());
    }
    shape.iter().find_map(|(name, field)| match json.get(name) {
        None => Some(format!("no field {name:?}")),
        Some(value) if !field.matches(value) => Some(format!("field {name:?} is not a {}", field.name())),
        Some(_) => None,
    })
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
    fn an_answer_must_have_every_field_of_its_shape() {
        const SHAPE: Shape = &[("exchange", Field::Text), ("changed", Field::Flag)];
        assert_eq!(shape_problem(&serde_json::json!({"exchange": "kraken", "changed": true}), SHAPE), None);
        assert_eq!(shape_problem(&serde_json::json!({"ok": true}), SHAPE).unwrap(), "no field \"exchange\"");
        let problem = shape_problem(&serde_json::json!({"exchange": "kraken", "changed": "yes"}), SHAPE).unwrap();
        assert_eq!(problem, "field \"changed\" is not a boolean");
        assert_eq!(shape_problem(&serde_json::json!([1]), SHAPE).unwrap(), "not an object");
    }
}
