//! Alerting: [`rules`] decide when `exchange_api_down` and `exchange_api_slow` fire and resolve, and [`diagnosis`]
//! names the runbook scenario with its evidence; both are pure state machines that take `now`. Delivery
//! (Alertmanager, webhooks) and the durable outbox build on them.

pub mod diagnosis;
pub mod rules;
