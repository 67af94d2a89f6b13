//! The journal: what happened to each exchange, as events on-call reads back as an incident's story
//! (`exwatch incidents timeline ID`, `GET /api/v1/incidents/{id}`): breaker transitions, alerts fired, re-diagnosed
//! and resolved, deliveries per sink, operator actions, rate-limit changes and recovery verification steps.
//!
//! Components record through [`Journal`] and never wait: the daemon's journal is the alert recorder
//! (`store::alerts`), which writes events in order with the rest of alerting's records, spooling them while the
//! database is away. Without a database nothing is kept. A leaf above `text`: it knows no component.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::text;

/// The longest detail an event keeps; details quote reasons and exchange errors, already bounded where made.
pub const MAX_DETAIL_BYTES: usize = 1024;

text::named_enum! {
    /// What kind of thing happened.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(rename_all = "snake_case")]
    pub enum Kind {
        /// A circuit breaker transition, with its reason (an operator's, a timer's, the calls').
        Breaker => "breaker",
        /// An alert fired or resolved.
        Alert => "alert",
        /// The diagnosis of a firing `exchange_api_down` changed scenario.
        Scenario => "scenario",
        /// A notification reached a sink, or was given up on.
        Delivery => "delivery",
        /// The rate limiter changed: a factor set by an operator or by backoff, a private-call pause.
        RateLimit => "rate_limit",
        /// A step of the runbook's recovery verification, passed or failed.
        Verification => "verification",
    }
}

/// One thing that happened to `exchange`, at `at` (wall clock).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub exchange: String,
    pub at: DateTime<Utc>,
    pub kind: Kind,
    pub detail: String,
}

impl Event {
    /// An event now; the detail is bounded and made printable.
    pub fn now(exchange: &str, kind: Kind, detail: impl AsRef<str>) -> Event {
        Event {
            exchange: exchange.to_owned(),
            at: Utc::now(),
            kind,
            detail: text::external(detail.as_ref(), MAX_DETAIL_BYTES),
        }
    }
}

/// Where events go. Recording never blocks and never fails the caller.
pub trait Journal: Send + Sync {
    fn record(&self, event: Event);
}

/// A journal shared by the components that record into it.
pub type Shared = Arc<dyn Journal>;

/// Records into `journal` when there is one.
pub fn record(journal: Option<&Shared>, event: Event) {
    if let Some(journal) = journal {
        journal.record(event);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn details_are_bounded_and_printable() {
        let event = Event::now("kraken", Kind::Breaker, format!("CLOSED -> OPEN\u{0}{}", "x".repeat(5000)));
        assert!(event.detail.len() <= MAX_DETAIL_BYTES + 64, "{}", event.detail.len());
        assert!(!event.detail.contains('\u{0}'));
        assert_eq!(Kind::parse("verification"), Some(Kind::Verification));
    }
}
