//! The simulator's market data: which pairs exist and under which canonical names, and the healthy bodies of
//! SystemStatus, Time, Ticker, Depth and Balance. Values are made up but shaped like Kraken's (decimal strings,
//! integer trade counts and timestamps) and prices jitter a little between calls. It knows nothing about
//! scenarios, limits or HTTP.

use chrono::{DateTime, Utc};
use rand::Rng as _;
use serde_json::{Value, json};

use super::answer::{INVALID_ARGUMENTS, UNKNOWN_ASSET_PAIR};

/// A tradeable pair as Kraken names it. Kraken keys answers by `name`, which is often not what was asked for
/// (`XBTUSD` is answered as `XXBTZUSD`) while AUD pairs keep the short name (`XBTAUD`).
#[derive(Debug)]
pub(super) struct Pair {
    pub(super) name: &'static str,
    aliases: &'static [&'static str],
    /// The price the jitter moves around, in the quote currency.
    reference_price: f64,
    tick_size: f64,
}

const PAIRS: [Pair; 8] = [
    Pair { name: "XBTAUD", aliases: &["XBT/AUD", "XXBTZAUD"], reference_price: 160_099.95, tick_size: 0.1 },
    Pair { name: "XXBTZUSD", aliases: &["XBTUSD", "XBT/USD"], reference_price: 105_944.25, tick_size: 0.1 },
    Pair { name: "XXBTZEUR", aliases: &["XBTEUR", "XBT/EUR"], reference_price: 91_230.05, tick_size: 0.1 },
    Pair { name: "XXBTZGBP", aliases: &["XBTGBP", "XBT/GBP"], reference_price: 79_850.05, tick_size: 0.1 },
    Pair { name: "XXBTZCAD", aliases: &["XBTCAD", "XBT/CAD"], reference_price: 146_300.05, tick_size: 0.1 },
    Pair { name: "XXBTZJPY", aliases: &["XBTJPY", "XBT/JPY"], reference_price: 16_250_000.5, tick_size: 1.0 },
    Pair { name: "XBTUSDT", aliases: &["XBT/USDT"], reference_price: 105_944.25, tick_size: 0.1 },
    Pair { name: "ETHAUD", aliases: &["ETH/AUD"], reference_price: 5_480.125, tick_size: 0.01 },
];

/// Resolves a requested pair, case-insensitively, by canonical name or alias.
pub(super) fn find_pair(requested: &str) -> Option<&'static Pair> {
    let requested = requested.trim().to_ascii_uppercase();
    PAIRS.iter().find(|pair| pair.name == requested || pair.aliases.contains(&requested.as_str()))
}

pub(super) fn system_status(status: &str, now: DateTime<Utc>) -> Value {
    json!({ "status": status, "timestamp": now.format("%Y-%m-%dT%H:%M:%SZ").to_string() })
}

/// `rfc1123` copies Kraken's quirks: a two-digit year and a space-padded day (`"Sun,  7 Jun 20 04:07:53 +0000"`).
pub(super) fn time(now: DateTime<Utc>) -> Value {
    json!({ "unixtime": now.timestamp(), "rfc1123": now.format("%a, %e %b %y %H:%M:%S +0000").to_string() })
}

/// `pair` is the raw query parameter: one pair or a comma-separated list, every one of which must be known.
pub(super) fn ticker(pair_parameter: Option<&str>) -> Result<Value, &'static str> {
    let requested = pair_parameter.filter(|text| !text.trim().is_empty()).ok_or(UNKNOWN_ASSET_PAIR)?;
    let mut result = serde_json::Map::new();
    for name in requested.split(',') {
        let pair = find_pair(name).ok_or(UNKNOWN_ASSET_PAIR)?;
        result.insert(pair.name.to_string(), ticker_entry(pair));
    }
    Ok(Value::Object(result))
}

/// Ratios of the XBTAUD fixture in kraken-api.md §2.3 to its mid price, so every pair looks like that fixture.
fn ticker_entry(pair: &Pair) -> Value {
    let mid = jittered_price(pair);
    let (ask, bid) = touch_prices(pair, mid);
    let price = |ratio: f64| format_price(mid * ratio);
    json!({
        "a": [format_price(ask), "1", "1.000"],
        "b": [format_price(bid), "1", "1.000"],
        "c": [price(0.999_72), "0.01000000"],
        "v": ["12.34567890", "45.67890123"],
        "p": [price(0.999_44), price(0.998_57)],
        "t": [812, 2931],
        "l": [price(0.992_50), price(0.987_51)],
        "h": [price(1.005_00), price(1.007_18)],
        "o": price(0.996_25),
    })
}

/// `count` is the raw query parameter; Kraken allows 1 to 500 levels per side and defaults to 100.
pub(super) fn depth(
    pair_parameter: Option<&str>,
    count_parameter: Option<&str>,
    now: DateTime<Utc>,
) -> Result<Value, &'static str> {
    let requested = pair_parameter.filter(|text| !text.trim().is_empty()).ok_or(INVALID_ARGUMENTS)?;
    let pair = find_pair(requested).ok_or(UNKNOWN_ASSET_PAIR)?;
    let count = match count_parameter {
        None => 100,
        Some(text) => match text.trim().parse::<u32>() {
            Ok(count @ 1..=500) => count,
            _ => return Err(INVALID_ARGUMENTS),
        },
    };
    let (ask, bid) = touch_prices(pair, jittered_price(pair));
    let mut random = rand::rng();
    let mut level = |price: f64| {
        let volume: f64 = random.random_range(0.001..5.0);
        let age_seconds: i64 = random.random_range(0..30);
        json!([format_price(price), format!("{volume:.3}"), now.timestamp() - age_seconds])
    };
    let asks: Vec<Value> = (0..count).map(|index| level(ask + f64::from(index) * pair.tick_size)).collect();
    let bids: Vec<Value> = (0..count).map(|index| level(bid - f64::from(index) * pair.tick_size)).collect();
    let mut result = serde_json::Map::new();
    result.insert(pair.name.to_string(), json!({ "asks": asks, "bids": bids }));
    Ok(Value::Object(result))
}

/// Kraken's documented Balance example (kraken-api.md §2.6), verbatim so its key order is kept.
pub(super) const BALANCE_BODY: &str = r#"{"error":[],"result":{"ZUSD":"171288.6158","ZEUR":"504861.8946","XXBT":"1011.1908877900","XETH":"818.5500000000","USDT":"500000.00000000","DAI":"9999.9999999999","DOT":"2.5000000000","ETH2.S":"198.3970800000","ETH2":"2.5885574330","USD.M":"1213029.2780"}}"#;

/// Moves the reference price by up to ±0.05 % so successive answers differ like a live market.
fn jittered_price(pair: &Pair) -> f64 {
    pair.reference_price * (1.0 + rand::rng().random_range(-0.0005..0.0005))
}

/// The best ask and bid around `mid`, one tick apart on the tick grid, so the ask is always above the bid.
fn touch_prices(pair: &Pair, mid: f64) -> (f64, f64) {
    let ask = (mid / pair.tick_size).round() * pair.tick_size + pair.tick_size;
    (ask, ask - pair.tick_size)
}

fn format_price(price: f64) -> String {
    format!("{price:.5}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &Value) -> f64 {
        text.as_str().unwrap().parse().unwrap()
    }

    #[test]
    fn pairs_resolve_to_krakens_canonical_names() {
        for (requested, canonical) in [
            ("XBTAUD", "XBTAUD"),
            ("xbtaud", "XBTAUD"),
            ("XBTUSD", "XXBTZUSD"),
            ("XXBTZUSD", "XXBTZUSD"),
            ("XBTEUR", "XXBTZEUR"),
            ("XBTGBP", "XXBTZGBP"),
            ("XBTCAD", "XXBTZCAD"),
            ("XBTJPY", "XXBTZJPY"),
            ("XBTUSDT", "XBTUSDT"),
            ("ETHAUD", "ETHAUD"),
        ] {
            assert_eq!(find_pair(requested).map(|pair| pair.name), Some(canonical), "{requested}");
        }
        assert!(find_pair("DOGEXYZ").is_none());
    }

    #[test]
    fn ticker_answers_several_pairs_and_rejects_any_unknown_one() {
        let result = ticker(Some("XBTAUD,XBTUSD")).unwrap();
        assert!(result.get("XBTAUD").is_some() && result.get("XXBTZUSD").is_some());
        assert_eq!(ticker(Some("XBTAUD,NOPE")), Err(UNKNOWN_ASSET_PAIR));
        assert_eq!(ticker(None), Err(UNKNOWN_ASSET_PAIR));
    }

    #[test]
    fn ticker_prices_are_consistent() {
        for pair in &PAIRS {
            let entry = ticker_entry(pair);
            let (ask, bid) = (parse(&entry["a"][0]), parse(&entry["b"][0]));
            assert!(ask > bid, "{}: ask {ask} must exceed bid {bid}", pair.name);
            assert!(parse(&entry["l"][0]) < bid && parse(&entry["h"][0]) > ask, "{}", pair.name);
        }
    }

    #[test]
    fn time_space_pads_single_digit_days() {
        let now = DateTime::parse_from_rfc3339("2020-06-07T04:07:53Z").unwrap().with_timezone(&Utc);
        assert_eq!(time(now), json!({ "unixtime": 1591502873, "rfc1123": "Sun,  7 Jun 20 04:07:53 +0000" }));
    }

    #[test]
    fn depth_rejects_counts_outside_one_to_five_hundred() {
        let now = Utc::now();
        for count in ["0", "501", "-1", "ten", ""] {
            assert_eq!(depth(Some("XBTAUD"), Some(count), now), Err(INVALID_ARGUMENTS), "{count:?}");
        }
        let result = depth(Some("XBTAUD"), None, now).unwrap();
        assert_eq!(result["XBTAUD"]["asks"].as_array().unwrap().len(), 100);
        let result = depth(Some("XBTJPY"), Some("500"), now).unwrap();
        assert_eq!(result["XXBTZJPY"]["bids"].as_array().unwrap().len(), 500);
    }

    #[test]
    fn balance_body_is_a_valid_success_envelope() {
        let body: Value = serde_json::from_str(BALANCE_BODY).unwrap();
        assert_eq!(body["error"], json!([]));
        assert_eq!(body["result"]["XXBT"], "1011.1908877900");
    }
}
