//! How a request of an exchange client or an alert sink reaches a server and how its answer comes back: over the
//! network with the process's one reqwest client (what production uses), or in memory through an axum [`Router`]
//! (what paused-clock tests use against the simulator and fake receivers, with no socket at all, so tokio's
//! auto-advance can never fire a timeout while real I/O is pending).
//!
//! What it owns: sending one [`Request`], enforcing the timeout over the whole exchange (headers and every
//! chunk of the body), the body limit, and naming transport failures (no complete answer arrived). What it
//! deliberately does not do: look at the status or the body, or follow a redirect ([`client_builder`] builds
//! every HTTP client exwatch has, and none follows one). Both transports hand back the same [`Answer`],
//! which the client classifies and parses with the same functions whichever way it travelled.

#[cfg(any(test, feature = "test-util"))]
mod in_memory;

use std::time::Duration;

use axum::http::header::{CONTENT_LENGTH, CONTENT_TYPE, LOCATION, SERVER};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use url::Url;

use crate::failure::{Error, ErrorClass};

/// Connecting gets at most this long even when the overall timeout is longer, so a black-holed address is
/// reported while there is still time budget left to say so.
const CONNECT_TIMEOUT_CAP: Duration = Duration::from_secs(5);

const USER_AGENT_TEXT: &str = concat!("exwatch/", env!("CARGO_PKG_VERSION"));

/// Put into a response's extensions by an in-memory server (the simulator's `reset` scenario) to say that the
/// connection was reset before any answer. A router has no socket to reset, and an extension never crosses a
/// real connection, so the marker only ever means something to the in-memory transport, which reports a
/// `network` failure as if the TCP connection had been reset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionReset;

/// One request as the client means it, before either transport turns it into its own type.
#[derive(Debug)]
pub(crate) struct Request {
    method: Method,
    url: Url,
    headers: HeaderMap,
    body: Option<String>,
}

impl Request {
    pub(crate) fn get(url: &Url) -> Request {
        Request { method: Method::GET, url: url.clone(), headers: HeaderMap::new(), body: None }
    }

    /// A form POST; `headers` are added to the form content type.
    pub(crate) fn post_form(url: &Url, mut headers: HeaderMap, body: String) -> Request {
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/x-www-form-urlencoded"));
        Request { method: Method::POST, url: url.clone(), headers, body: Some(body) }
    }

    /// A JSON POST; `headers` are added to the JSON content type.
    pub(crate) fn post_json(url: &Url, mut headers: HeaderMap, body: String) -> Request {
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        Request { method: Method::POST, url: url.clone(), headers, body: Some(body) }
    }
}

/// The one way exwatch builds an HTTP client (exchanges, sinks and the CLI's daemon client): the whole-request
/// `timeout`, exwatch's user agent, and redirects never followed. A 3xx comes back as an answer to classify: a
/// followed redirect would carry `API-Key`, `API-Sign`, a signed body or a sink's headers to whatever host the
/// `Location` names, and would report that host's answer as the configured one's.
pub(crate) fn client_builder(timeout: Duration) -> reqwest::ClientBuilder {
    reqwest::Client::builder().timeout(timeout).user_agent(USER_AGENT_TEXT).redirect(reqwest::redirect::Policy::none())
}

/// The largest response body read. Kraken's answers for the calls exwatch makes are a few kilobytes; anything
/// near this size is not an answer we asked for, and reading it whole could exhaust memory.
pub const BODY_LIMIT_BYTES: usize = 1024 * 1024;

/// A complete HTTP answer, body included.
#[derive(Debug, Clone)]
pub(crate) struct Answer {
    pub(crate) status: u16,
    pub(crate) content_type: Option<String>,
    pub(crate) server: Option<String>,
    /// Where a `Location` header points, reduced to its host ([`location_host`]).
    pub(crate) redirect_host: Option<String>,
    pub(crate) body: Vec<u8>,
}

pub(crate) fn body_too_large(status: u16) -> Error {
    Error::new(ErrorClass::BadResponse, too_large_message()).with_status(status)
}

fn too_large_message() -> String {
    format!("body larger than {BODY_LIMIT_BYTES} bytes")
}

/// Whether `error` is the body limit's (a `bad_response` like any other to an exchange client; a Statuspage fetch
/// counts it apart).
pub(crate) fn is_too_large(error: &Error) -> bool {
    error.class == ErrorClass::BadResponse && error.message == too_large_message()
}

/// Where requests go. Chosen once, when the client is built.
pub(crate) enum Transport {
    Http(reqwest::Client),
    /// Each request is one `oneshot` call on a clone of the router (clones share the router's state). Tests only.
    #[cfg(any(test, feature = "test-util"))]
    InMemory(axum::Router),
}

impl Transport {
    /// The process's one reqwest client (one connection pool, one TLS configuration), shared by every exchange
    /// client and sink. Each request carries its own timeout; connecting never takes longer than
    /// [`CONNECT_TIMEOUT_CAP`].
    pub(crate) fn http() -> Result<Transport, reqwest::Error> {
        static SHARED: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
        if let Some(client) = SHARED.get() {
            return Ok(Transport::Http(client.clone()));
        }
        let client = reqwest::Client::builder()
            .user_agent(USER_AGENT_TEXT)
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(CONNECT_TIMEOUT_CAP)
            .build()?;
        Ok(Transport::Http(SHARED.get_or_init(|| client).clone()))
    }

    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Transport::Http(_) => "http",
            #[cfg(any(test, feature = "test-util"))]
            Transport::InMemory(_) => "in_memory",
        }
    }

    /// Sends and reads the whole body, never more than [`BODY_LIMIT_BYTES`], all within `timeout`.
    pub(crate) async fn send(&self, request: Request, timeout: Duration) -> Result<Answer, Error> {
        match self {
            Transport::Http(client) => send_over_http(client, request, timeout).await,
            #[cfg(any(test, feature = "test-util"))]
            Transport::InMemory(router) => in_memory::send(router, request, timeout).await,
        }
    }
}

fn timeout_error(timeout: Duration) -> Error {
    Error::new(ErrorClass::Timeout, format!("no complete answer within {}", humantime::format_duration(timeout)))
}

/// The status and the headers the client keeps, with an empty body. A declared length over the limit fails
/// before a single byte is read.
fn answer_head(status: StatusCode, headers: &HeaderMap) -> Result<Answer, Error> {
    let status = status.as_u16();
    let header_text = |name| headers.get(name).and_then(|value: &HeaderValue| value.to_str().ok());
    let declared_length = header_text(CONTENT_LENGTH).and_then(|text| text.parse::<u64>().ok());
    if declared_length.is_some_and(|length| length > BODY_LIMIT_BYTES as u64) {
        return Err(body_too_large(status));
    }
    Ok(Answer {
        status,
        content_type: header_text(CONTENT_TYPE).map(str::to_owned),
        server: header_text(SERVER).map(str::to_owned),
        redirect_host: header_text(LOCATION).map(location_host),
        body: Vec::new(),
    })
}

/// Where a `Location` points, for messages and logs: the host and port of an absolute URL, never its userinfo,
/// path or query (a webhook URL's path or a query can be a credential). A relative one stays on the same host.
pub(crate) fn location_host(location: &str) -> String {
    const HOST_LIMIT_CHARS: usize = 255;
    match Url::parse(location) {
        Ok(url) => match (url.host_str(), url.port()) {
            (Some(host), Some(port)) => format!("{host}:{port}").chars().take(HOST_LIMIT_CHARS).collect(),
            (Some(host), None) => host.chars().take(HOST_LIMIT_CHARS).collect(),
            (None, _) => format!("a {} url without a host", url.scheme().chars().take(16).collect::<String>()),
        },
        Err(url::ParseError::RelativeUrlWithoutBase) => "a path on the same host".to_owned(),
        Err(_) => "an invalid location".to_owned(),
    }
}

/// A redirect: one of the five redirect statuses, or any 3xx that names a `Location`.
pub(crate) fn is_redirect(status: u16, redirect_host: Option<&str>) -> bool {
    matches!(status, 301 | 302 | 303 | 307 | 308) || ((300..400).contains(&status) && redirect_host.is_some())
}

/// `redirect to <host> (not followed)`, or `redirect without a location`: how a 3xx is described everywhere.
pub(crate) fn redirect_description(redirect_host: Option<&str>) -> String {
    match redirect_host {
        Some(host) => format!("redirect to {host} (not followed)"),
        None => "redirect without a location (not followed)".to_owned(),
    }
}

fn append_chunk(answer: &mut Answer, chunk: &[u8]) -> Result<(), Error> {
    if answer.body.len() + chunk.len() > BODY_LIMIT_BYTES {
        return Err(body_too_large(answer.status));
    }
    answer.body.extend_from_slice(chunk);
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------------
// Over the network
// ---------------------------------------------------------------------------------------------------------------

/// The client's timeout (set at build time) covers connecting, the headers and every chunk of the body.
async fn send_over_http(client: &reqwest::Client, request: Request, timeout: Duration) -> Result<Answer, Error> {
    let Request { method, url, headers, body } = request;
    let mut builder = client.request(method, url).timeout(timeout).headers(headers);
    if let Some(body) = body {
        builder = builder.body(body);
    }
    let mut response = builder.send().await.map_err(|error| classify_transport_error(&error, timeout))?;
    let mut answer = answer_head(response.status(), response.headers())?;
    while let Some(chunk) =
        response.chunk().await.map_err(|error| classify_transport_error(&error, timeout).with_status(answer.status))?
    {
        append_chunk(&mut answer, &chunk)?;
    }
    Ok(answer)
}

/// Classifies a `reqwest` failure. Timeouts first (reqwest reports a timeout inside a connect or body error
/// too), then an answer that is not HTTP at all (`bad_response`), then everything else that kept a complete
/// answer from arriving is `network`. The message names the cause and the stage, never the URL or a header;
/// a DNS failure names the host it could not resolve.
pub(crate) fn classify_transport_error(error: &reqwest::Error, timeout: Duration) -> Error {
    if error.is_timeout() {
        return timeout_error(timeout);
    }
    if error.is_builder() {
        return Error::new(ErrorClass::InvalidRequest, "the request could not be built");
    }
    if error.is_redirect() {
        return Error::new(ErrorClass::BadResponse, "redirect loop or too many redirects");
    }
    if out_of_descriptors(error) {
        return Error::new(ErrorClass::InvalidRequest, OUT_OF_DESCRIPTORS);
    }
    let stage = if error.is_connect() {
        "connect failed"
    } else if error.is_body() || error.is_decode() {
        "reading the body failed"
    } else {
        "request failed"
    };
    let cause = transport_cause(error);
    let class = if matches!(cause, Cause::InvalidHttp(_)) { ErrorClass::BadResponse } else { ErrorClass::Network };
    Error::new(class, format!("{stage}: {cause}"))
}

/// The root cause of a transport failure, found by walking the source chain.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Cause {
    Dns {
        host: Option<String>,
    },
    Tls(String),
    /// Something answered, but not in HTTP (a garbage status line, a non-HTTP service on the port).
    InvalidHttp(String),
    ClosedEarly,
    Io(&'static str),
    Unknown,
}

impl std::fmt::Display for Cause {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Cause::Dns { host: Some(host) } => write!(formatter, "dns lookup failed for {host}"),
            Cause::Dns { host: None } => formatter.write_str("dns lookup failed"),
            Cause::Tls(detail) => write!(formatter, "tls handshake failed: {detail}"),
            Cause::InvalidHttp(detail) => write!(formatter, "invalid http response: {detail}"),
            Cause::ClosedEarly => formatter.write_str("connection closed before the answer was complete"),
            Cause::Io(name) => formatter.write_str(name),
            Cause::Unknown => formatter.write_str("unknown transport error"),
        }
    }
}

/// The call could not open a socket because exwatch ran out of file descriptors: exwatch's own fault
/// (`invalid_request`, which the breaker ignores), never the exchange's `network` failure.
pub const OUT_OF_DESCRIPTORS: &str = "exwatch ran out of file descriptors (its own limit, not the exchange's fault)";

/// Whether an I/O error somewhere in the failure's source chain is EMFILE or ENFILE.
fn out_of_descriptors(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(error);
    while let Some(cause) = source {
        if cause.downcast_ref::<std::io::Error>().is_some_and(crate::resources::out_of_descriptors) {
            return true;
        }
        source = cause.source();
    }
    false
}

/// Error texts from libraries are short, but a message is bounded whatever a dependency does.
const CAUSE_LIMIT_CHARS: usize = 200;

fn bounded_text(error: &dyn std::error::Error) -> String {
    error.to_string().chars().take(CAUSE_LIMIT_CHARS).collect()
}

fn transport_cause(error: &reqwest::Error) -> Cause {
    if error.is_dns() {
        let host = error.url().and_then(Url::host_str).map(|host| host.chars().take(CAUSE_LIMIT_CHARS).collect());
        return Cause::Dns { host };
    }
    let mut io_kind = None;
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(error);
    while let Some(cause) = source {
        if let Some(tls_error) = cause.downcast_ref::<rustls::Error>() {
            return Cause::Tls(bounded_text(tls_error));
        }
        if let Some(hyper_error) = cause.downcast_ref::<hyper::Error>() {
            if hyper_error.is_parse() {
                return Cause::InvalidHttp(bounded_text(hyper_error));
            }
            if hyper_error.is_incomplete_message() || hyper_error.is_closed() || hyper_error.is_canceled() {
                return Cause::ClosedEarly;
            }
        }
        if let Some(io_error) = cause.downcast_ref::<std::io::Error>() {
            io_kind = io_kind.or_else(|| io_error_cause(io_error.kind()));
            // An io::Error hides its custom payload from `source()` (it returns the payload's source), and that
            // payload is where rustls puts its errors: walk on from the payload itself.
            if let Some(payload) = io_error.get_ref() {
                source = Some(payload as &(dyn std::error::Error + 'static));
                continue;
            }
            if let Some(name) = io_kind {
                return Cause::Io(name);
            }
        }
        source = cause.source();
    }
    io_kind.map_or(Cause::Unknown, Cause::Io)
}

fn io_error_cause(kind: std::io::ErrorKind) -> Option<&'static str> {
    use std::io::ErrorKind;
    Some(match kind {
        ErrorKind::ConnectionRefused => "connection refused",
        ErrorKind::ConnectionReset => "connection reset",
        ErrorKind::ConnectionAborted => "connection aborted",
        ErrorKind::BrokenPipe | ErrorKind::UnexpectedEof | ErrorKind::NotConnected => "connection closed",
        ErrorKind::NetworkUnreachable => "network unreachable",
        ErrorKind::HostUnreachable => "host unreachable",
        ErrorKind::AddrNotAvailable => "address not available",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn running_out_of_file_descriptors_anywhere_in_the_chain_is_exwatchs_own_fault() {
        #[derive(Debug, thiserror::Error)]
        #[error("client error (Connect)")]
        struct Connect(#[source] std::io::Error);
        let emfile = std::io::Error::from_raw_os_error(rustix::io::Errno::MFILE.raw_os_error());
        assert!(out_of_descriptors(&Connect(emfile)));
        assert!(!out_of_descriptors(&Connect(std::io::Error::from(std::io::ErrorKind::ConnectionRefused))));
    }
}
