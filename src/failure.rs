//! The one failure taxonomy: why a call failed ([`ErrorClass`]) and the bounded evidence kept with it ([`Error`]).
//!
//! Exchange clients classify their answers into it, [`crate::transport`] its transport failures, and the poller,
//! breaker, limiter, logs, alerts and metrics branch on it. A leaf beside `text`: it does no I/O and knows no exchange.

use serde::Serialize;

use crate::text;

text::named_enum! {
    /// Why a call failed. One taxonomy for the whole daemon: classification happens once, in the exchange's
    /// client, by transport outcome first and then by the exchange's error strings; everything downstream branches
    /// on this.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, serde::Deserialize)]
    #[serde(rename_all = "snake_case")]
    pub enum ErrorClass {
        /// The exchange says it is not trading normally: SystemStatus not `online`, `EService:Unavailable`,
        /// markets in cancel-only or post-only mode.
        Maintenance => "maintenance",
        /// The exchange refused the call for its rate: `EAPI:Rate limit exceeded`, `EGeneral:Too many requests`,
        /// `EService: Throttled`, HTTP 429.
        RateLimited => "rate_limited",
        /// The credentials were refused: invalid key, signature or nonce, permission denied, temporary lockout.
        Auth => "auth",
        /// The request never got an answer: DNS, connection refused or reset, TLS.
        Network => "network",
        /// No complete answer within `poll.timeout`, or the exchange's own deadline elapsed.
        Timeout => "timeout",
        /// The exchange (or the CDN in front of it) failed: 5xx, Cloudflare 52x pages, `EService:Busy`,
        /// `EGeneral:Internal error`.
        ServerError => "server_error",
        /// An answer that is not what the API promises: not JSON, HTML with 200, empty, truncated, wrong shape.
        BadResponse => "bad_response",
        /// Our own fault: unknown pair, invalid arguments, unknown method. Not evidence that the exchange is down.
        InvalidRequest => "invalid_request",
    }
}

/// The most bytes an error keeps of its message and of each exchange error string: longer text is cut on a
/// character boundary and marked `… [truncated, N bytes]`, so one oversized answer cannot fill every log line, row,
/// status page and notification that quotes it.
pub const MAX_ERROR_TEXT_BYTES: usize = 1024;
/// The most exchange error strings an error keeps (Kraken sends one or two); the rest are counted in a last entry.
pub const MAX_EXCHANGE_ERRORS: usize = 4;

/// A classified failure of one call. It keeps the evidence on-call needs: the HTTP status (when an answer
/// came) and the exchange's own error strings, as sent but bounded ([`MAX_ERROR_TEXT_BYTES`] each, at most
/// [`MAX_EXCHANGE_ERRORS`]) and without control characters. It never holds credentials or signed headers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{class}: {message}")]
pub struct Error {
    pub class: ErrorClass,
    pub http_status: Option<u16>,
    /// The exchange's error strings (`EService:Unavailable`), as sent, bounded (see [`Error::with_exchange_errors`]).
    pub exchange_errors: Vec<String>,
    /// A short, human-readable description, lowercase, without secrets, bounded (see [`Error::new`]).
    pub message: String,
    /// Which credential check failed, for `auth` failures the client could tell apart. The limiter pauses private
    /// calls on the ones that extend a lockout when repeated.
    pub auth: Option<AuthFailure>,
}

/// The kinds of `auth` failure that call for different handling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthFailure {
    /// `EAPI:Invalid key`: repeated, it leads to a temporary lockout.
    InvalidKey,
    InvalidSignature,
    InvalidNonce,
    PermissionDenied,
    /// `EGeneral:Temporary lockout`: every further call restarts the lockout's timer.
    Lockout,
}

impl Error {
    /// The message is made printable and bounded to [`MAX_ERROR_TEXT_BYTES`]: it often quotes the answer.
    pub fn new(class: ErrorClass, message: impl Into<String>) -> Error {
        let message = text::external(&message.into(), MAX_ERROR_TEXT_BYTES);
        Error { class, http_status: None, exchange_errors: Vec::new(), message, auth: None }
    }

    pub fn with_status(mut self, status: u16) -> Error {
        self.http_status = Some(status);
        self
    }

    /// Keeps the first [`MAX_EXCHANGE_ERRORS`] strings, each printable and bounded to [`MAX_ERROR_TEXT_BYTES`];
    /// when there were more, a last entry says how many were left out.
    pub fn with_exchange_errors(mut self, errors: Vec<String>) -> Error {
        let left_out = errors.len().saturating_sub(MAX_EXCHANGE_ERRORS);
        self.exchange_errors =
            errors.iter().take(MAX_EXCHANGE_ERRORS).map(|error| text::external(error, MAX_ERROR_TEXT_BYTES)).collect();
        if left_out > 0 {
            self.exchange_errors.push(format!("… [{left_out} more exchange errors not kept]"));
        }
        self
    }
}
