//! `Secret`: a string that never shows itself. `Debug`, `Display` and `Serialize` print `[redacted]`, so an API
//! key, API secret, admin token or database password cannot leak through a log line, an error, the effective
//! configuration or a JSON answer. Code that needs the value calls [`Secret::expose`] at the point of use.
//! [`redact_url`] shows a URL with its credentials taken out: the user information and every query value.

use std::fmt;

#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub const REDACTED: &'static str = "[redacted]";

    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(Secret::REDACTED)
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(Secret::REDACTED)
    }
}

impl serde::Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(Secret::REDACTED)
    }
}

/// A URL for people to read, without what may be a credential: user information becomes `[redacted]@` and every
/// query value `[redacted]` (`https://[redacted]@host/path?token=[redacted]`). The fragment, never sent, is dropped.
pub fn redact_url(url: &url::Url) -> String {
    let mut shown = format!("{}://", url.scheme());
    if !url.username().is_empty() || url.password().is_some() {
        shown.push_str(Secret::REDACTED);
        shown.push('@');
    }
    if let Some(host) = url.host_str() {
        shown.push_str(host);
    }
    if let Some(port) = url.port() {
        shown.push_str(&format!(":{port}"));
    }
    shown.push_str(url.path());
    if let Some(query) = url.query() {
        let pairs: Vec<String> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((name, _)) => format!("{name}={}", Secret::REDACTED),
                None if pair.is_empty() => String::new(),
                None => Secret::REDACTED.to_owned(),
            })
            .collect();
        shown.push('?');
        shown.push_str(&pairs.join("&"));
    }
    shown
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_shown_without_user_information_or_query_values() {
        let redact = |text: &str| redact_url(&url::Url::parse(text).unwrap());
        assert_eq!(redact("https://api.kraken.com"), "https://api.kraken.com/");
        assert_eq!(
            redact("https://user:hunter2@proxy.example:8443/kraken/"),
            "https://[redacted]@proxy.example:8443/kraken/"
        );
        assert_eq!(redact("https://token@proxy.example/"), "https://[redacted]@proxy.example/");
        assert_eq!(
            redact("http://127.0.0.1:9750/x?api_key=hunter2&sig=abc&hunter3#frag"),
            "http://127.0.0.1:9750/x?api_key=[redacted]&sig=[redacted]&[redacted]"
        );
    }

    #[test]
    fn secret_never_prints_its_value() {
        let secret = Secret::new("hunter2");
        assert_eq!(format!("{secret:?} {secret}"), "[redacted] [redacted]");
        assert_eq!(serde_json::to_string(&secret).unwrap(), "\"[redacted]\"");
        assert_eq!(secret.expose(), "hunter2");
    }
}
