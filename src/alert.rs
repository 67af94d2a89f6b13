//! Alerting: the rules that decide when `exchange_api_down` and `exchange_api_slow` fire and resolve ([`rules`],
//! pure state machines that take `now`). Diagnosis, delivery (Alertmanager, webhooks) and the durable outbox build on
//! them.

pub mod rules;
