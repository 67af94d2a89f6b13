//! The fuzz harness's entry points: one function per parser of outside input, each taking raw bytes and panicking
//! only if the parser does. `fuzz/` drives them with cargo-fuzz (libFuzzer) for long runs; `tests/it/fuzz.rs` runs
//! each on generated and hand-picked inputs in the suite, so CI keeps a short run.
//!
//! It owns no parsing itself: each function shapes the bytes into what the real parser takes (an HTTP status and
//! a body, a TOML document or environment, a request body) and calls it. It is not part of the daemon.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};

use crate::config::Config;
use crate::exchange::{Endpoint, kraken};
use crate::{http, limiter, telemetry};

/// Statuses the Kraken harness picks from, so most inputs reach the body's classification.
const STATUSES: [u16; 8] = [200, 200, 200, 200, 302, 429, 502, 520];
/// Content types the Kraken harness picks from.
const CONTENT_TYPES: [Option<&str>; 4] =
    [Some("application/json; charset=utf-8"), Some("text/html"), Some("text/plain"), None];

/// A Kraken answer: the first byte picks the endpoint, the second the status and content type, the rest is the
/// body, classified and parsed as that endpoint's.
pub fn kraken_answer(data: &[u8]) {
    let (Some(&pick), Some(&shape)) = (data.first(), data.get(1)) else {
        return;
    };
    let endpoint = Endpoint::ALL[usize::from(pick) % Endpoint::ALL.len()];
    let status = STATUSES[usize::from(shape) % STATUSES.len()];
    let content_type = CONTENT_TYPES[usize::from(shape >> 3) % CONTENT_TYPES.len()];
    let pair = if shape & 0x80 == 0 { "XBTAUD" } else { "XXBTZUSD" };
    let body = &data[2..];
    match kraken::parse_answer(endpoint, status, content_type, body, pair) {
        Ok(warnings) => assert!(warnings.len() <= body.len(), "warnings come from the body"),
        Err(error) => {
            // Whatever the body, the classification is one of the taxonomy's classes and the message is bounded.
            assert!(!error.class.as_str().is_empty());
            assert!(error.message.len() <= body.len() + 1024, "message of {} bytes", error.message.len());
        }
    }
}

/// Configuration: the first byte picks TOML text (even) or `NAME=value` lines of environment (odd); the rest goes
/// through the full load and validation, and a valid result is rendered as the effective configuration.
pub fn config_text(data: &[u8]) {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest);
    let result = if pick & 1 == 0 {
        Config::from_toml(&text)
    } else {
        let environment: HashMap<String, String> = text
            .lines()
            .filter_map(|line| line.split_once('='))
            .map(|(name, value)| (format!("EXWATCH__{name}"), value.to_owned()))
            .collect();
        Config::load_from(None, Some(environment))
    };
    match result {
        Ok(config) => {
            let _ = config.to_redacted_toml();
        }
        Err(error) => assert!(!error.problems.is_empty(), "an error names at least one problem"),
    }
}

/// One limiter for every admin body: building a registry per input would dominate the run.
static LIMITER: LazyLock<Arc<limiter::Limiter>> = LazyLock::new(|| {
    let registry = telemetry::registry();
    limiter::Limiter::new("fuzz", limiter::Config::default(), limiter::Metrics::new(&registry))
});

/// An admin request body, read as each admin route reads it; every answer is a success or a client error.
pub fn admin_body(data: &[u8]) {
    for status in http::admin::answer_bodies(data, &LIMITER) {
        assert!(status.is_success() || status.is_client_error(), "answered {status}");
    }
}

/// A Statuspage summary: the first byte says whether a page id is expected; the rest is the body. Whatever it is,
/// the result is a summary whose texts are bounded, or a classified failure.
pub fn statuspage_summary(data: &[u8]) {
    let Some((&pick, body)) = data.split_first() else {
        return;
    };
    let page_id = (pick & 1 == 1).then_some("lfz25gyhcpjf");
    if let Ok(summary) = crate::statuspage::parse(body, page_id) {
        assert!(summary.components.len() <= crate::statuspage::MAX_ITEMS);
        assert!(summary.indicator.len() <= crate::statuspage::MAX_NAME_BYTES + 64);
    }
}

/// A WebSocket text frame: whatever it is, the result is a frame whose texts are bounded, or nothing.
pub fn websocket_frame(data: &[u8]) {
    let frame = String::from_utf8_lossy(data);
    if let Some(crate::websocket::Frame::Status(status)) = crate::websocket::parse(&frame) {
        assert!(status.system.len() <= 64 + 64);
    }
}

/// The short run of every target in the test suite: structured inputs that reach deep (Kraken envelopes, TOML
/// with known keys, admin bodies with the real fields), raw bytes, and the inputs that once mattered.
#[cfg(test)]
mod tests {
    use proptest::collection::{btree_map, vec};
    use proptest::prelude::*;
    use serde_json::Value;

    use super::*;

    fn json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            "[A-Za-z0-9:. -]{0,12}".prop_map(Value::String),
            prop_oneof![Just("EGeneral:Invalid arguments"), Just("EAPI:Rate limit exceeded"), Just("WGeneral:x")]
                .prop_map(Value::from),
            prop_oneof![Just("1.5"), Just("-0"), Just("1e99"), Just("online"), Just("")].prop_map(Value::from),
        ];
        leaf.prop_recursive(4, 64, 6, |inner| {
            prop_oneof![
                vec(inner.clone(), 0..6).prop_map(Value::Array),
                btree_map("error|result|status|timestamp|unixtime|XBTAUD|XXBTZUSD|a|b|c|asks|bids|ZUSD", inner, 0..6)
                    .prop_map(|map| Value::Object(map.into_iter().collect())),
            ]
        })
    }

    fn envelope() -> impl Strategy<Value = Vec<u8>> {
        (vec(json(), 0..3), json()).prop_map(|(errors, result)| {
            serde_json::to_vec(&serde_json::json!({ "error": errors, "result": result })).unwrap_or_default()
        })
    }

    fn toml_document() -> impl Strategy<Value = String> {
        let section = prop_oneof![
            Just("server"),
            Just("poll"),
            Just("[exchanges]"),
            Just("breaker"),
            Just("rate_limit"),
            Just("alerts.slow"),
            Just("alerts.delivery"),
            Just("[alerts.sinks]"),
            Just("database"),
            Just("admin"),
        ];
        let key = prop_oneof![
            Just("interval"),
            Just("timeout"),
            Just("listen"),
            Just("base_url"),
            Just("pair"),
            Just("kind"),
            Just("urls"),
            Just("url"),
            Just("token_file"),
            Just("window_type"),
            Just("min_factor"),
            Just("retention"),
            Just("spool_dir"),
            Just("ignored_classes"),
        ];
        let value = prop_oneof![
            "\"[0-9]{1,25}(ns|ms|s|m|h|d|y|years)\"",
            "\"(http|https|ftp|postgres)://[a-z:@0-9]{0,12}/?[a-z=&?]{0,8}\"",
            "-?[0-9]{1,20}(\\.[0-9]{1,5})?",
            Just("[\"webhook\", 3]".to_owned()),
            Just("\"/dev/null\"".to_owned()),
            Just("{ a = 1 }".to_owned()),
            "\"[ -~]{0,10}",
        ];
        vec((section, vec((key, value), 0..4)), 0..5).prop_map(|tables| {
            let mut text = String::new();
            for (section, entries) in tables {
                text.push_str(&format!("[{section}]\n"));
                for (key, value) in entries {
                    text.push_str(&format!("{key} = {value}\n"));
                }
            }
            text
        })
    }

    fn admin_json() -> impl Strategy<Value = Vec<u8>> {
        let value = prop_oneof![
            any::<f64>().prop_map(Value::from),
            Just(Value::from(1e-300)),
            Just(Value::from(0.125)),
            "[A-Z_]{0,12}".prop_map(Value::String),
            json(),
        ];
        btree_map(prop_oneof![Just("factor".to_owned()), Just("state".to_owned()), "[a-z]{1,4}"], value, 0..3)
            .prop_map(|map| serde_json::to_vec(&map).unwrap_or_default())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn kraken_answers_never_panic(head in vec(any::<u8>(), 2), body in envelope(), raw in vec(any::<u8>(), 0..256)) {
            kraken_answer(&[head.clone(), body].concat());
            kraken_answer(&[head, raw].concat());
        }

        #[test]
        fn configuration_never_panics(pick in any::<u8>(), document in toml_document(), raw in vec(any::<u8>(), 0..256)) {
            config_text(&[&[pick & !1][..], document.as_bytes()].concat());
            config_text(&[&[pick][..], &raw[..]].concat());
        }

        #[test]
        fn statuspage_summaries_never_panic(pick in any::<u8>(), body in json(), raw in vec(any::<u8>(), 0..256)) {
            let page = serde_json::json!({"page": {"id": "lfz25gyhcpjf"}, "status": {"indicator": body.clone()},
                                          "components": [body.clone()], "incidents": [body]});
            statuspage_summary(&[&[pick][..], page.to_string().as_bytes()].concat());
            statuspage_summary(&[&[pick][..], &raw[..]].concat());
        }

        #[test]
        fn websocket_frames_never_panic(body in json(), raw in vec(any::<u8>(), 0..256)) {
            let status = serde_json::json!({"channel": "status", "data": [{"system": body.clone(), "connection_id": body.clone()}]});
            websocket_frame(status.to_string().as_bytes());
            websocket_frame(body.to_string().as_bytes());
            websocket_frame(&raw);
        }

        #[test]
        fn admin_bodies_never_panic(body in admin_json(), raw in vec(any::<u8>(), 0..128)) {
            admin_body(&body);
            admin_body(&raw);
        }
    }

    #[test]
    fn inputs_that_once_mattered_are_handled() {
        // A secret after an unclosed quote, a secret file that is a device, the largest duration, an env index gap.
        config_text(b"\0[[exchanges]]\napi_secret = \"c2VjcmV0\n");
        config_text(b"\0[admin]\ntoken_file = \"/dev/zero\"\n");
        config_text(b"\0[breaker]\nwait_duration_in_open = \"18446744073709551615s\"\n");
        config_text(b"\x01EXCHANGES__5__API_KEY=k\nPOLL__INTERVAL=5s\n");
        kraken_answer(b"\x02\x00{\"error\":[],\"result\":{\"XXBTZUSD\":{\"a\":[\"1e999\"],\"b\":[],\"c\":[]}}}");
        kraken_answer(b"\x00\x08<html>not json</html>");
        admin_body(br#"{"factor":1e-300}"#);
        admin_body(br#"{"state":"OPEN"}"#);
        admin_body(br#"[1,2"#);
    }
}
