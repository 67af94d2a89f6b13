//! Every simulator scenario through the real Kraken client over HTTP, mapped to the class the taxonomy promises.

use std::time::Duration;

use exwatch::config::Config;
use exwatch::exchange::kraken::Client;
use exwatch::exchange::{Endpoint, ErrorClass, Exchange, Outcome};
use exwatch::simulator::{self, Scenario};

use crate::helpers::{SIMULATOR_API_KEY, SIMULATOR_API_SECRET, install_tls_provider, start_simulator};

fn client(base_url: &str, api_secret: &str) -> Client {
    install_tls_provider();
    let config = Config::from_toml(&format!(
        "[[exchanges]]\nbase_url = \"{base_url}\"\npair = \"XBTAUD\"\napi_key = \"{SIMULATOR_API_KEY}\"\napi_secret = \"{api_secret}\"\n"
    ))
    .unwrap();
    Client::new(&config.exchanges[0].exchange, Duration::from_millis(400)).unwrap()
}

/// The class of one call, with SystemStatus's non-online answer counted as the poller counts it.
async fn class_of(client: &Client, endpoint: Endpoint) -> Option<ErrorClass> {
    fn class<T>(outcome: Outcome<T>) -> Option<ErrorClass> {
        outcome.error().map(|error| error.class)
    }
    match endpoint {
        Endpoint::SystemStatus => {
            let outcome = client.system_status().await;
            match &outcome.result {
                Ok(status) => status.as_failure().map(|failure| failure.class),
                Err(error) => Some(error.class),
            }
        }
        Endpoint::Time => class(client.server_time().await),
        Endpoint::Ticker => class(client.ticker().await),
        Endpoint::Depth => class(client.depth().await),
        Endpoint::Balance => class(client.balance().await),
    }
}

#[tokio::test]
async fn every_simulator_scenario_maps_to_its_error_class_through_the_real_client() {
    let simulator = start_simulator().await;
    // The client's timeout is 400 ms; `slow` answers after 1.5 s.
    let client = client(&simulator.base_url(), SIMULATOR_API_SECRET);
    let mismatches = simulator::conformance(&simulator, &client, Duration::from_millis(1500)).await;
    assert!(mismatches.is_empty(), "scenario mismatches:\n{}", mismatches.join("\n"));
}

#[tokio::test]
async fn flaky_at_rate_zero_never_fails() {
    let simulator = start_simulator().await;
    simulator.set_scenario(Scenario::Flaky);
    simulator.set_failure_rate(0.0);
    let client = client(&simulator.base_url(), SIMULATOR_API_SECRET);
    for _ in 0..5 {
        assert_eq!(class_of(&client, Endpoint::Ticker).await, None);
    }
}

#[tokio::test]
async fn a_wrong_secret_is_refused_as_an_invalid_signature() {
    let simulator = start_simulator().await;
    let client = client(&simulator.base_url(), "d3Jvbmcgc2VjcmV0");
    let outcome = client.balance().await;
    let error = outcome.error().expect("the simulator refuses the signature");
    assert_eq!(error.class, ErrorClass::Auth);
    assert_eq!(error.exchange_errors, vec!["EAPI:Invalid signature".to_owned()]);
}

#[tokio::test]
async fn ticker_answers_under_the_canonical_key_for_usd_pairs() {
    let simulator = start_simulator().await;
    install_tls_provider();
    let config =
        Config::from_toml(&format!("[[exchanges]]\nbase_url = \"{}\"\npair = \"XBTUSD\"\n", simulator.base_url()))
            .unwrap();
    let client = Client::new(&config.exchanges[0].exchange, Duration::from_secs(2)).unwrap();
    let ticker = client.ticker().await.result.expect("a ticker");
    assert_eq!(ticker.pair_key, "XXBTZUSD");
}
