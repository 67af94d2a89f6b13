//! The in-memory transport, for tests only (feature `test-util`): a request is one `oneshot` call on an axum
//! [`Router`] (the simulator's, or a fake receiver's), with no socket, so on a paused clock tokio's auto-advance
//! only ever skips over the server's own sleeps and the caller's timeout. The answer goes through the same head
//! checks and body limit as over the network.

use std::pin::Pin;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, HttpBody as _};
use axum::http::header::{CONTENT_LENGTH, HOST, USER_AGENT};
use axum::http::{self, HeaderValue};
use tower::ServiceExt as _;

use super::{
    Answer, BODY_LIMIT_BYTES, ConnectionReset, Request, USER_AGENT_TEXT, answer_head, append_chunk, body_too_large,
    timeout_error,
};
use crate::failure::{Error, ErrorClass};

/// Sends `request` to `router` and reads the whole answer, within one deadline over the router's answer and the
/// whole body, like reqwest's timeout. On a paused clock a slower answer is a timeout the moment nothing else is
/// left to run.
pub(super) async fn send(router: &Router, request: Request, timeout: Duration) -> Result<Answer, Error> {
    let request = self::request(request)?;
    tokio::time::timeout(timeout, call(router.clone(), request))
        .await
        .unwrap_or_else(|_elapsed| Err(timeout_error(timeout)))
}

/// The request a server would have read off the wire from reqwest: the same method, path and query, headers
/// (plus the user agent, host and content length that reqwest and hyper add) and body. The URL's host only
/// fills the `host` header; a path prefix on the base URL is sent as it is, because no proxy strips it.
fn request(request: Request) -> Result<http::Request<Body>, Error> {
    let Request { method, url, mut headers, body } = request;
    let could_not_build = || Error::new(ErrorClass::InvalidRequest, "the request could not be built");
    let path_and_query = match url.query() {
        Some(query) => format!("{}?{query}", url.path()),
        None => url.path().to_owned(),
    };
    let uri: http::Uri = path_and_query.parse().map_err(|_| could_not_build())?;
    headers.insert(USER_AGENT, HeaderValue::from_static(USER_AGENT_TEXT));
    if let Some(host) = url.host_str() {
        let authority = match url.port() {
            Some(port) => format!("{host}:{port}"),
            None => host.to_owned(),
        };
        headers.insert(HOST, HeaderValue::from_str(&authority).map_err(|_| could_not_build())?);
    }
    let body = match body {
        Some(body) => {
            headers.insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
            Body::from(body)
        }
        None => Body::empty(),
    };
    let mut request = http::Request::new(body);
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.headers_mut() = headers;
    Ok(request)
}

/// Calls the router and reads the body frame by frame under the limit. No timeout here: the caller wraps it.
async fn call(router: Router, request: http::Request<Body>) -> Result<Answer, Error> {
    let response = match router.oneshot(request).await {
        Ok(response) => response,
        Err(infallible) => match infallible {},
    };
    if response.extensions().get::<ConnectionReset>().is_some() {
        return Err(Error::new(ErrorClass::Network, "request failed: connection reset (in-memory)"));
    }
    let (parts, mut body) = response.into_parts();
    let mut answer = answer_head(parts.status, &parts.headers)?;
    // A router sets no content-length, but its body usually knows its size: fail before reading, as a
    // declared length does over the network.
    if body.size_hint().lower() > BODY_LIMIT_BYTES as u64 {
        return Err(body_too_large(answer.status));
    }
    while let Some(frame) = std::future::poll_fn(|context| Pin::new(&mut body).poll_frame(context)).await {
        let frame = frame.map_err(|_| {
            Error::new(ErrorClass::Network, "reading the body failed: in-memory body error").with_status(answer.status)
        })?;
        // Trailers carry nothing the client reads.
        if let Ok(chunk) = frame.into_data() {
            append_chunk(&mut answer, &chunk)?;
        }
    }
    Ok(answer)
}
