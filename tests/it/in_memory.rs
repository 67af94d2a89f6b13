//! The real Kraken client against the real simulator in memory (the in-memory transport), on a paused clock: no
//! socket is ever opened, so tokio's auto-advance only ever skips over the simulator's own sleeps and the client's
//! own timeout. Also the transport's own bounds (timeout, body limit, descriptors) seen through the client.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderMap, Method};
use axum::routing::{get, post};
use exwatch::exchange::kraken::{BuildError, Client, sign};
use exwatch::exchange::{Config, Credentials, ErrorClass, Exchange, Kind, TradingStatus};
use exwatch::secret::Secret;
use exwatch::simulator::{self, DEFAULT_API_SECRET, IN_MEMORY_BASE_URL, Scenario, Simulator};
use exwatch::transport::{BODY_LIMIT_BYTES, OUT_OF_DESCRIPTORS};
use hyper::body::Frame;
use tokio::sync::mpsc;
use tokio::time::Instant;
use url::Url;

/// The over-HTTP scenario table's client timeout (tests/it/scenarios.rs).
const TIMEOUT: Duration = Duration::from_millis(400);

const EMFILE_CHILD: &str = "EXWATCH_TEST_EMFILE_CHILD";

/// A real call whose socket cannot be opened for want of file descriptors. The limit is the process's, so the
/// body runs in a child process (this test binary again, with only this test) and the parent checks it passed.
#[tokio::test]
async fn a_call_that_cannot_open_a_socket_for_want_of_descriptors_is_exwatchs_own_fault_not_network() {
    const NAME: &str = "in_memory::\
                        a_call_that_cannot_open_a_socket_for_want_of_descriptors_is_exwatchs_own_fault_not_network";
    if std::env::var_os(EMFILE_CHILD).is_none() {
        let output = tokio::process::Command::new(std::env::current_exe().unwrap())
            .args([NAME, "--exact", "--nocapture", "--test-threads=1"])
            .env(EMFILE_CHILD, "1")
            .output()
            .await
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success() && stdout.contains("1 passed"),
            "{stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        return;
    }
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let _ = rustls::crypto::ring::default_provider().install_default();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let base_url = format!("http://{}", listener.local_addr().unwrap());
    let client = Client::new(&config(&base_url, None), Duration::from_secs(5)).unwrap();
    let maximum = getrlimit(Resource::Nofile).maximum;
    setrlimit(Resource::Nofile, Rlimit { current: Some(256), maximum }).unwrap();
    let mut held = Vec::new();
    while let Ok(file) = std::fs::File::open("/dev/null") {
        held.push(file);
        assert!(held.len() <= 256, "the lowered limit was not enforced");
    }
    let error = client.server_time().await.result.unwrap_err();
    drop(held);
    assert_eq!(error.class, ErrorClass::InvalidRequest, "{error}");
    assert_eq!(error.message, OUT_OF_DESCRIPTORS);
}

/// Nonces and the send lock are per API key and process-wide. A paused-clock test that waited on a lock
/// held by another test's runtime would see its timeout fire at once, so every client gets its own key.
fn unique_api_key() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!("in-memory-transport-test-key-{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

fn config(base_url: &str, credentials: Option<Credentials>) -> Config {
    Config {
        name: "kraken".to_owned(),
        kind: Kind::Kraken,
        base_url: Url::parse(base_url).unwrap(),
        pair: "XBTAUD".to_owned(),
        depth_count: 10,
        credentials,
    }
}

/// An in-memory simulator in `scenario` (public limiter off, as in the over-HTTP tests) and a client of it
/// with a key of its own.
fn simulator_and_client(scenario: Scenario) -> (Simulator, Client) {
    let api_key = unique_api_key();
    let options = simulator::Options {
        scenario,
        api_key: Secret::new(&api_key),
        public_rate_limit: None,
        ..simulator::Options::default()
    };
    let simulator = Simulator::in_memory(options).unwrap();
    let credentials = Credentials { api_key: Secret::new(&api_key), api_secret: Secret::new(DEFAULT_API_SECRET) };
    let client =
        Client::in_memory(&config(&simulator.base_url(), Some(credentials)), TIMEOUT, simulator.router()).unwrap();
    (simulator, client)
}

/// The class of one call, with SystemStatus's non-online answer counted as the poller counts it.
#[tokio::test(start_paused = true)]
async fn the_real_client_gets_healthy_answers_from_the_simulator_in_memory() {
    let (simulator, client) = simulator_and_client(Scenario::Healthy);
    assert_eq!(simulator.base_url(), IN_MEMORY_BASE_URL);
    assert!(format!("{client:?}").contains("transport: \"in_memory\""), "{client:?}");

    let status = client.system_status().await;
    assert_eq!(status.result.unwrap().status, TradingStatus::Online);
    assert_eq!(status.latency, Duration::ZERO, "nothing takes time on a paused clock without latency");
    assert!(client.server_time().await.result.unwrap().unixtime > 0);
    let ticker = client.ticker().await.result.unwrap();
    assert_eq!(ticker.pair_key, "XBTAUD");
    let book = client.depth().await.result.unwrap();
    assert_eq!((book.asks.len(), book.bids.len()), (10, 10));
    // Signed for real: the simulator checks the key, the signature and that nonces strictly increase.
    for _ in 0..3 {
        let balances = client.balance().await.result.unwrap();
        assert!(balances.assets.contains_key("ZUSD"), "{balances:?}");
    }
    for (method, calls) in [("SystemStatus", 1), ("Time", 1), ("Ticker", 1), ("Depth", 1), ("Balance", 3)] {
        assert_eq!(simulator.requests(method), calls, "{method}");
    }
}

#[tokio::test(start_paused = true)]
async fn every_simulator_scenario_maps_to_its_class_in_memory() {
    let (simulator, client) = simulator_and_client(Scenario::Healthy);
    let mismatches = simulator::conformance(&simulator, &client, Duration::from_millis(1500)).await;
    assert!(mismatches.is_empty(), "scenario mismatches:\n{}", mismatches.join("\n"));
}

#[tokio::test(start_paused = true)]
async fn a_slow_simulator_times_out_at_exactly_the_client_timeout_on_a_paused_clock() {
    let (simulator, client) = simulator_and_client(Scenario::Slow);
    simulator.set_latency(Duration::from_millis(1500));
    let started = Instant::now();
    let outcome = client.server_time().await;
    let error = outcome.result.unwrap_err();
    assert_eq!(error.class, ErrorClass::Timeout, "{error}");
    assert_eq!(error.message, "no complete answer within 400ms");
    assert_eq!(outcome.latency, TIMEOUT);
    assert_eq!(started.elapsed(), TIMEOUT);
    // A latency within the timeout is an answer, and the latency is measured on the same clock.
    simulator.set_latency(Duration::from_millis(250));
    let outcome = client.server_time().await;
    assert!(outcome.result.is_ok());
    assert_eq!(outcome.latency, Duration::from_millis(250));
}

#[tokio::test(start_paused = true)]
async fn reset_in_memory_is_a_network_failure_and_the_simulator_recovers() {
    let (simulator, client) = simulator_and_client(Scenario::Reset);
    for error in [client.system_status().await.result.unwrap_err(), client.balance().await.result.unwrap_err()] {
        assert_eq!(error.class, ErrorClass::Network, "{error}");
        assert_eq!(error.message, "request failed: connection reset (in-memory)");
        assert_eq!(error.http_status, None);
    }
    assert_eq!(simulator.requests("SystemStatus"), 1);
    simulator.set_scenario(Scenario::Healthy);
    assert!(client.system_status().await.result.is_ok());
    // The reset call never reached the Kraken checks; the next nonce is simply a larger one.
    assert!(client.balance().await.result.is_ok());
}

#[tokio::test(start_paused = true)]
async fn private_calls_hit_the_rate_limit_and_recover_as_paused_time_lets_the_counter_decay() {
    // The starter tier: at most 15 on the counter, 0.33 decay per second.
    let (simulator, client) = simulator_and_client(Scenario::Healthy);
    let mut classes = Vec::new();
    for _ in 0..20 {
        classes.push(client.balance().await.error().map(|error| error.class));
    }
    assert_eq!(classes[..15], [None; 15]);
    assert_eq!(classes[15..], [Some(ErrorClass::RateLimited); 5]);
    let error = client.balance().await.result.unwrap_err();
    assert_eq!(error.exchange_errors, ["EAPI:Rate limit exceeded"]);

    // A 30 s poll interval regains about ten calls; a minute regains them all.
    tokio::time::advance(Duration::from_secs(30)).await;
    assert!(client.balance().await.result.is_ok());
    tokio::time::advance(Duration::from_secs(60)).await;
    for _ in 0..15 {
        assert!(client.balance().await.result.is_ok());
    }
    assert_eq!(simulator.requests("Balance"), 37);
}

// -----------------------------------------------------------------------------------------------------------
// The in-memory transport on its own, against small routers
// -----------------------------------------------------------------------------------------------------------

type Seen = (Method, String, HeaderMap, String);

#[tokio::test(start_paused = true)]
async fn in_memory_requests_carry_what_the_network_path_sends() {
    let (sender, mut receiver) = mpsc::unbounded_channel::<Seen>();
    let record = |body: &'static str| {
        move |State(sender): State<mpsc::UnboundedSender<Seen>>,
              method: Method,
              uri: axum::http::Uri,
              headers: HeaderMap,
              request_body: String| async move {
            sender.send((method, uri.to_string(), headers, request_body)).unwrap();
            ([(CONTENT_TYPE, "application/json")], body)
        }
    };
    let router = Router::new()
        .route("/kraken/0/public/Depth", get(record(r#"{"error":[],"result":{"XBTAUD":{"asks":[],"bids":[]}}}"#)))
        .route("/kraken/0/private/Balance", post(record(r#"{"error":[],"result":{"ZUSD":"1.0"}}"#)))
        .with_state(sender);
    let api_key = unique_api_key();
    let credentials = Credentials { api_key: Secret::new(&api_key), api_secret: Secret::new(DEFAULT_API_SECRET) };
    let client =
        Client::in_memory(&config("http://exchange.invalid:8443/kraken/", Some(credentials)), TIMEOUT, router).unwrap();

    assert!(client.depth().await.result.is_ok());
    let (method, uri, headers, body) = receiver.recv().await.unwrap();
    assert_eq!((method, uri.as_str(), body.as_str()), (Method::GET, "/kraken/0/public/Depth?pair=XBTAUD&count=10", ""));
    assert_eq!(headers["host"], "exchange.invalid:8443");
    assert!(headers["user-agent"].to_str().unwrap().starts_with("exwatch/"));
    assert!(!headers.contains_key("api-key"));

    assert!(client.balance().await.result.is_ok());
    let (method, uri, headers, body) = receiver.recv().await.unwrap();
    assert_eq!((method, uri.as_str()), (Method::POST, "/kraken/0/private/Balance"));
    assert_eq!(headers["api-key"], api_key.as_str());
    assert_eq!(headers["content-type"], "application/x-www-form-urlencoded");
    assert_eq!(headers["content-length"], body.len().to_string().as_str());
    let nonce: u64 = body.strip_prefix("nonce=").expect("a form body with the nonce").parse().unwrap();
    let secret = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, DEFAULT_API_SECRET).unwrap();
    // Signed over Kraken's path: the prefix belongs to the base URL, not to the signature.
    assert_eq!(headers["api-sign"], sign("/0/private/Balance", nonce, &body, &secret).as_str());
}

fn client_of(router: Router) -> Client {
    Client::in_memory(&config("http://exchange.invalid", None), TIMEOUT, router).unwrap()
}

#[tokio::test(start_paused = true)]
async fn an_in_memory_server_that_never_answers_is_a_timeout_at_the_configured_timeout() {
    let router = Router::new().route("/0/public/Time", get(std::future::pending::<String>));
    let outcome = client_of(router).server_time().await;
    assert_eq!(outcome.result.unwrap_err().class, ErrorClass::Timeout);
    assert_eq!(outcome.latency, TIMEOUT);
}

/// A body of endless 64 KiB chunks with no size hint, and a pause before each one.
struct EndlessBody {
    pause: Option<Pin<Box<tokio::time::Sleep>>>,
    pause_length: Duration,
}

impl axum::body::HttpBody for EndlessBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let pause_length = self.pause_length;
        let pause = self.pause.get_or_insert_with(|| Box::pin(tokio::time::sleep(pause_length)));
        if pause.as_mut().poll(context).is_pending() {
            return Poll::Pending;
        }
        self.pause = None;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(vec![b' '; 64 * 1024])))))
    }
}

#[tokio::test(start_paused = true)]
async fn in_memory_bodies_larger_than_the_limit_are_bad_responses() {
    let known_size = Router::new().route("/0/public/Time", get(|| async { vec![b' '; BODY_LIMIT_BYTES + 1] }));
    let endless = Router::new().route(
        "/0/public/Time",
        get(|| async { Body::new(EndlessBody { pause: None, pause_length: Duration::ZERO }) }),
    );
    for router in [known_size, endless] {
        let error = client_of(router).server_time().await.result.unwrap_err();
        assert_eq!(error.class, ErrorClass::BadResponse, "{error}");
        assert_eq!(error.http_status, Some(200));
        assert!(error.message.contains("body larger than"), "{}", error.message);
    }
}

#[tokio::test(start_paused = true)]
async fn an_in_memory_body_that_trickles_past_the_timeout_is_a_timeout() {
    let router = Router::new().route(
        "/0/public/Time",
        get(|| async { Body::new(EndlessBody { pause: None, pause_length: Duration::from_millis(150) }) }),
    );
    let outcome = client_of(router).server_time().await;
    assert_eq!(outcome.result.unwrap_err().class, ErrorClass::Timeout);
    assert_eq!(outcome.latency, TIMEOUT);
}

#[test]
fn an_in_memory_client_refuses_the_same_configuration_as_a_network_client() {
    let router = Router::new();
    let error = Client::in_memory(&config("ftp://exchange.invalid", None), TIMEOUT, router).unwrap_err();
    assert!(matches!(error, BuildError::UnsupportedBaseUrl { .. }), "{error}");
}
