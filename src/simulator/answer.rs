//! The shapes of what the simulator sends back: Kraken's JSON envelope and error strings, and the non-Kraken
//! pages that sit in front of it (Cloudflare error pages, a 405, an HTML 200, an empty or truncated body).
//! It owns byte-level fidelity (statuses, headers, bodies); it does not decide which answer a request gets.

use axum::body::{Body, Bytes};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use rand::Rng as _;

pub(super) const INVALID_KEY: &str = "EAPI:Invalid key";
pub(super) const INVALID_SIGNATURE: &str = "EAPI:Invalid signature";
pub(super) const INVALID_NONCE: &str = "EAPI:Invalid nonce";
pub(super) const RATE_LIMIT_EXCEEDED: &str = "EAPI:Rate limit exceeded";
pub(super) const TOO_MANY_REQUESTS: &str = "EGeneral:Too many requests";
pub(super) const TEMPORARY_LOCKOUT: &str = "EGeneral:Temporary lockout";
pub(super) const UNKNOWN_METHOD: &str = "EGeneral:Unknown method";
pub(super) const INVALID_ARGUMENTS: &str = "EGeneral:Invalid arguments";
pub(super) const INTERNAL_ERROR: &str = "EGeneral:Internal error:5";
pub(super) const UNKNOWN_ASSET_PAIR: &str = "EQuery:Unknown asset pair";
pub(super) const UNAVAILABLE: &str = "EService:Unavailable";
pub(super) const BUSY: &str = "EService:Busy";
/// An internal error whose text holds a NUL, which Postgres `text` refuses.
pub(super) const NUL_ERROR: &str = "EGeneral:Internal error:\0nul";
/// The length of [`oversized_error`]: under the client's 1 MiB body limit, so the client must bound it itself.
pub(super) const OVERSIZED_ERROR_BYTES: usize = 900_000;

/// An internal error string of [`OVERSIZED_ERROR_BYTES`], made once.
pub(super) fn oversized_error() -> &'static str {
    static ERROR: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        let prefix = "EGeneral:Internal error:";
        format!("{prefix}{}", "x".repeat(OVERSIZED_ERROR_BYTES - prefix.len()))
    });
    &ERROR
}

/// The error-only envelope around [`oversized_error`], made once: serialising 900 kB per call would make the
/// simulator, not the client, the slow part.
pub(super) fn oversized_error_answer() -> Answer {
    static BODY: std::sync::LazyLock<String> =
        std::sync::LazyLock::new(|| serde_json::json!({ "error": [oversized_error()] }).to_string());
    Answer::new(StatusCode::OK, JSON, Bytes::from_static(BODY.as_bytes()))
}

const JSON: &str = "application/json; charset=utf-8";
const HTML: &str = "text/html; charset=UTF-8";

/// One answer before it becomes an HTTP response, so a fault (truncation) can still rewrite its bytes.
#[derive(Debug, Clone)]
pub(super) struct Answer {
    pub(super) status: StatusCode,
    pub(super) content_type: &'static str,
    pub(super) body: Bytes,
    /// Cloudflare pages carry `server: cloudflare` and a `cf-ray` id; Kraken's own answers carry neither.
    pub(super) cloudflare_ray: Option<String>,
    pub(super) allow: Option<&'static str>,
    /// Where a redirect points.
    pub(super) location: Option<String>,
}

impl Answer {
    fn new(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Answer {
        Answer { status, content_type, body: body.into(), cloudflare_ray: None, allow: None, location: None }
    }

    /// A success: `{"error":[],"result":...}`, HTTP 200.
    pub(super) fn kraken_result(result: serde_json::Value) -> Answer {
        let body = serde_json::json!({ "error": [], "result": result });
        Answer::new(StatusCode::OK, JSON, body.to_string())
    }

    /// A success whose body is given verbatim, to keep a documented example's key order.
    pub(super) fn kraken_raw(body: &'static str) -> Answer {
        Answer::new(StatusCode::OK, JSON, body)
    }

    /// A Kraken error: HTTP 200 with an error-only envelope, the shape real captures show.
    pub(super) fn kraken_error(error: &str) -> Answer {
        Answer::kraken_error_with_status(StatusCode::OK, error)
    }

    pub(super) fn kraken_error_with_status(status: StatusCode, error: &str) -> Answer {
        let body = serde_json::json!({ "error": [error] });
        Answer::new(status, JSON, body.to_string())
    }

    /// Kraken's front end refuses the wrong verb (a POST to a public method since 2024-01-31) with a short
    /// page that is not the JSON envelope.
    pub(super) fn method_not_allowed(allow: &'static str) -> Answer {
        let mut answer = Answer::new(StatusCode::METHOD_NOT_ALLOWED, "text/plain; charset=utf-8", "405 Not Allowed\n");
        answer.allow = Some(allow);
        answer
    }

    pub(super) fn not_found() -> Answer {
        Answer::new(StatusCode::NOT_FOUND, "text/plain; charset=utf-8", "404 Not Found\n")
    }

    /// The HTML error page Cloudflare serves when it cannot get a good answer from Kraken's origin.
    pub(super) fn cloudflare_error(status: StatusCode) -> Answer {
        let reason = match status.as_u16() {
            502 => "Bad gateway",
            504 => "Gateway time-out",
            _ => "Web server is returning an unknown error",
        };
        let code = status.as_u16();
        let ray = ray_id();
        let body = format!(
            "<!DOCTYPE html>\n<html lang=\"en-US\">\n<head>\n<title>api.kraken.com | {code}: {reason}</title>\n\
             <meta charset=\"UTF-8\" />\n</head>\n<body>\n<div id=\"cf-wrapper\">\n<div id=\"cf-error-details\">\n\
             <h1><span>{reason}</span> <span>Error code {code}</span></h1>\n\
             <p>Visit <a href=\"https://www.cloudflare.com/5xx-error-landing\">cloudflare.com</a> for more \
             information.</p>\n<p>Cloudflare Ray ID: <strong>{ray}</strong></p>\n</div>\n</div>\n</body>\n</html>\n"
        );
        let mut answer = Answer::new(status, HTML, body);
        answer.cloudflare_ray = Some(ray);
        answer
    }

    /// The short nginx page Kraken's front end (Cloudflare in front of nginx) serves for a status it produces
    /// itself: a redirect, a 404, a 400 or a 405. Not the JSON envelope.
    pub(super) fn front_end_error(status: StatusCode) -> Answer {
        let line = format!("{} {}", status.as_u16(), front_end_reason(status));
        let body = format!(
            "<html>\r\n<head><title>{line}</title></head>\r\n<body>\r\n<center><h1>{line}</h1></center>\r\n\
             <hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
        );
        let mut answer = Answer::new(status, "text/html", body);
        answer.cloudflare_ray = Some(ray_id());
        answer
    }

    /// A redirect to `location`, as the front end sends it.
    pub(super) fn redirect(status: StatusCode, location: String) -> Answer {
        let mut answer = Answer::front_end_error(status);
        answer.location = Some(location);
        answer
    }

    /// An HTML page served with 200: what a client sees when a proxy or a captive portal answers instead of Kraken.
    pub(super) fn html_page() -> Answer {
        let body = "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"UTF-8\" />\n<title>Kraken</title>\n\
                    </head>\n<body>\n<h1>Please wait</h1>\n<p>We are checking your browser before you reach \
                    api.kraken.com.</p>\n</body>\n</html>\n";
        Answer::new(StatusCode::OK, HTML, body)
    }

    pub(super) fn empty() -> Answer {
        Answer::new(StatusCode::OK, JSON, Bytes::new())
    }

    /// Keeps the first half of the body. Any strict prefix of a JSON object is syntactically broken, and the
    /// response declares the shortened length, so the client reads a complete HTTP message with bad JSON.
    pub(super) fn truncated(mut self) -> Answer {
        let keep = (self.body.len() / 2).max(1).min(self.body.len().saturating_sub(1));
        self.body = self.body.slice(..keep);
        self
    }
}

impl IntoResponse for Answer {
    fn into_response(self) -> Response {
        let mut response = Response::new(Body::from(self.body));
        *response.status_mut() = self.status;
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(self.content_type));
        if let Some(location) = self.location.and_then(|location| HeaderValue::from_str(&location).ok()) {
            headers.insert(header::LOCATION, location);
        }
        if let Some(allow) = self.allow {
            headers.insert(header::ALLOW, HeaderValue::from_static(allow));
        }
        if let Some(ray) = self.cloudflare_ray {
            headers.insert(header::SERVER, HeaderValue::from_static("cloudflare"));
            if let Ok(ray) = HeaderValue::from_str(&ray) {
                headers.insert("cf-ray", ray);
            }
        }
        response
    }
}

/// A Cloudflare ray id, as the Sydney edge writes it.
fn ray_id() -> String {
    format!("{:016x}-SYD", rand::rng().random::<u64>())
}

/// nginx's reason phrases, which differ from the standard ones for 405 ("Not Allowed").
fn front_end_reason(status: StatusCode) -> &'static str {
    match status {
        StatusCode::METHOD_NOT_ALLOWED => "Not Allowed",
        StatusCode::FOUND => "Found",
        status => status.canonical_reason().unwrap_or("Error"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncation_always_breaks_the_json() {
        for body in [
            "{\"error\":[]}".to_string(),
            Answer::kraken_error(UNAVAILABLE).body.iter().map(|&byte| char::from(byte)).collect(),
        ] {
            let answer = Answer::new(StatusCode::OK, JSON, body.clone()).truncated();
            assert!(answer.body.len() < body.len());
            assert!(!answer.body.is_empty());
            assert!(serde_json::from_slice::<serde_json::Value>(&answer.body).is_err());
        }
    }

    #[test]
    fn kraken_errors_are_error_only_envelopes() {
        let answer = Answer::kraken_error(BUSY);
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(&answer.body[..], br#"{"error":["EService:Busy"]}"#);
    }
}
