//! The simulator's contract with the failure taxonomy, for tests only (feature `test-util`): the class a correct
//! client reports for each scenario, and a check that drives a client through all of them.

use std::time::Duration;

use super::{Scenario, Simulator};
use crate::exchange::{Endpoint, ErrorClass, Exchange};

/// The endpoints [`conformance()`] checks, in the order of [`Scenario::expected_classes`].
pub const CONFORMANCE_ENDPOINTS: [Endpoint; 4] =
    [Endpoint::SystemStatus, Endpoint::Ticker, Endpoint::Depth, Endpoint::Balance];

impl Scenario {
    /// The class a correct client reports for SystemStatus, Ticker, Depth and Balance in this scenario (`None`:
    /// success), with a non-online SystemStatus counted as `maintenance`, a client timeout below the latency of
    /// `slow`, and a failure rate of 1 for `flaky`. This is the simulator's contract with the taxonomy.
    pub fn expected_classes(self) -> [Option<ErrorClass>; 4] {
        use ErrorClass::*;
        let all = |class| [Some(class); 4];
        match self {
            Scenario::Healthy => [None; 4],
            Scenario::Maintenance | Scenario::Flaky => all(Maintenance),
            Scenario::CancelOnly => [Some(Maintenance), None, None, None],
            Scenario::Unavailable => [None, Some(Maintenance), Some(Maintenance), Some(Maintenance)],
            Scenario::RateLimited | Scenario::TooManyRequests | Scenario::Http429 => all(RateLimited),
            Scenario::InvalidKey | Scenario::InvalidSignature | Scenario::Lockout => [None, None, None, Some(Auth)],
            Scenario::Cloudflare520 | Scenario::Cloudflare502 | Scenario::Cloudflare504 => all(ServerError),
            Scenario::Busy | Scenario::InternalError => all(ServerError),
            Scenario::Html200 | Scenario::EmptyBody | Scenario::TruncatedJson => all(BadResponse),
            Scenario::Slow => all(Timeout),
            Scenario::Reset => all(Network),
            Scenario::Redirect301
            | Scenario::Redirect302
            | Scenario::Redirect303
            | Scenario::Redirect307
            | Scenario::Redirect308 => all(BadResponse),
            Scenario::NotFound | Scenario::BadRequest | Scenario::MethodNotAllowed => all(InvalidRequest),
            Scenario::UnknownPair => [None, Some(InvalidRequest), Some(InvalidRequest), None],
            Scenario::UnknownMethod => all(InvalidRequest),
            Scenario::Silent => all(Timeout),
            Scenario::OversizedError | Scenario::NulError => all(ServerError),
        }
    }
}

/// Drives `exchange` (whose timeout must be below `slow_latency`) through every scenario of `simulator` and returns
/// each place where its classification differs from [`Scenario::expected_classes`]; empty means conformant.
pub async fn conformance(simulator: &Simulator, exchange: &dyn Exchange, slow_latency: Duration) -> Vec<String> {
    let mut mismatches = Vec::new();
    for scenario in Scenario::ALL {
        simulator.set_scenario(scenario);
        simulator.set_latency(if scenario == Scenario::Slow { slow_latency } else { Duration::ZERO });
        simulator.set_failure_rate(1.0);
        for (endpoint, expected) in CONFORMANCE_ENDPOINTS.into_iter().zip(scenario.expected_classes()) {
            let outcome = crate::exchange::call(exchange, endpoint).await;
            let actual = outcome.error().map(|error| error.class);
            if actual != expected {
                mismatches.push(format!("{}/{endpoint}: expected {expected:?}, got {actual:?}", scenario.as_str()));
            }
        }
    }
    simulator.set_scenario(Scenario::Healthy);
    simulator.set_latency(Duration::ZERO);
    mismatches
}
