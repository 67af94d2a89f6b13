//! `exwatch probe`: the runbook's recovery verification, run once. For each exchange: Ticker for the pair (the
//! runbook's `getCurrentPrice('AUD')`), Balance when credentials are set, then Depth for the pair, stopping at the
//! first failure ("Don't proceed if basic tests fail"). It prints one line per step and reports whether all passed.

use std::io::Write;
use std::sync::Arc;

use crate::exchange::{Endpoint, Exchange, Outcome};

/// The verdict of one step, as printed.
#[derive(Debug, Clone)]
pub struct Step {
    pub exchange: String,
    pub endpoint: Endpoint,
    pub outcome: Outcome<()>,
}

impl Step {
    fn line(&self) -> String {
        let latency = format!("{}ms", self.outcome.latency.as_millis());
        match &self.outcome.result {
            Ok(()) => format!("{:<12} {:<8} ok     {:>7}", self.exchange, self.endpoint.as_str(), latency),
            Err(error) => {
                let kraken =
                    if error.exchange_errors.is_empty() { "-".to_owned() } else { error.exchange_errors.join(", ") };
                let status = error.http_status.map(|status| format!(" http={status}")).unwrap_or_default();
                format!(
                    "{:<12} {:<8} failed {:>7}  class={}{} error={} ({})",
                    self.exchange,
                    self.endpoint.as_str(),
                    latency,
                    error.class,
                    status,
                    kraken,
                    error.message
                )
            }
        }
    }
}

/// The runbook's recovery verification sequence for an exchange: Ticker, Balance when credentials are set, Depth.
pub fn verification_steps(has_credentials: bool) -> Vec<Endpoint> {
    if has_credentials {
        vec![Endpoint::Ticker, Endpoint::Balance, Endpoint::Depth]
    } else {
        vec![Endpoint::Ticker, Endpoint::Depth]
    }
}

/// Runs the sequence against one exchange, stopping at the first failure.
pub async fn verify(exchange: &dyn Exchange) -> Vec<Step> {
    let mut steps = Vec::new();
    for endpoint in verification_steps(exchange.has_credentials()) {
        let outcome = crate::exchange::call(exchange, endpoint).await;
        let passed = outcome.result.is_ok();
        steps.push(Step { exchange: exchange.name().to_owned(), endpoint, outcome });
        if !passed {
            break;
        }
    }
    steps
}

/// Probes every exchange, printing as it goes. True only if every step of every exchange passed.
pub async fn run(exchanges: &[Arc<dyn Exchange>], output: &mut dyn Write) -> std::io::Result<bool> {
    let mut all_passed = true;
    for exchange in exchanges {
        let steps = verify(exchange.as_ref()).await;
        for step in &steps {
            writeln!(output, "{}", step.line())?;
        }
        match steps.iter().find(|step| step.outcome.result.is_err()) {
            Some(failed) => {
                all_passed = false;
                writeln!(output, "{}: FAILED at {}", exchange.name(), failed.endpoint)?;
            }
            None => writeln!(output, "{}: all {} steps passed", exchange.name(), steps.len())?,
        }
    }
    Ok(all_passed)
}
