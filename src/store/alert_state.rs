//! What the alert side keeps so that a restart neither pages again nor forgets to resolve: `alert_outbox`
//! (notifications not yet delivered, per replica, in order) and `alert_state` (the alerts each replica fires now).
//! Every statement on these two tables is here, once for both backends; the [`alerts`](super::alerts) recorder
//! decides when they run. Times are Unix milliseconds, the same integer on both backends.

use std::time::Duration;

use chrono::Utc;

use super::alerts::OutboxRow;
use super::database::{Database, Error, execute, fetch};
use super::text;

const OUTBOX_PUT: &str = "INSERT INTO alert_outbox (id, instance, target, kind, payload, created_at_ms) \
    VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (id) DO NOTHING";
const OUTBOX_DONE: &str = "DELETE FROM alert_outbox WHERE id = $1";
const OUTBOX: &str =
    "SELECT id, target, kind, payload, created_at_ms FROM alert_outbox WHERE instance = $1 ORDER BY seq";
const STATE_PUT: &str = "INSERT INTO alert_state (instance, exchange, alertname, payload, updated_at_ms) \
    VALUES ($1, $2, $3, $4, $5) ON CONFLICT (instance, exchange, alertname) \
    DO UPDATE SET payload = excluded.payload, updated_at_ms = excluded.updated_at_ms";
const STATE_CLEAR: &str = "DELETE FROM alert_state WHERE instance = $1 AND exchange = $2 AND alertname = $3";
const STATE_RENEW: &str = "UPDATE alert_state SET updated_at_ms = $2 WHERE instance = $1";
const STATE_ELSEWHERE: &str =
    "SELECT DISTINCT exchange, alertname FROM alert_state WHERE instance <> $1 AND updated_at_ms >= $2";
const STATE: &str =
    "SELECT exchange, alertname, payload FROM alert_state WHERE instance = $1 ORDER BY exchange, alertname";

fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

impl Database {
    /// Adds an undelivered notification; adding the same id twice keeps one row.
    pub async fn outbox_put(&self, instance: &str, row: &OutboxRow) -> Result<(), Error> {
        execute!(
            self,
            OUTBOX_PUT,
            text(&row.id),
            text(instance),
            text(&row.target),
            text(&row.kind),
            text(&row.payload),
            row.created_at_ms
        )?;
        Ok(())
    }

    pub async fn outbox_done(&self, id: &str) -> Result<(), Error> {
        execute!(self, OUTBOX_DONE, text(id))?;
        Ok(())
    }

    /// This replica's undelivered notifications, oldest first.
    pub async fn outbox(&self, instance: &str) -> Result<Vec<OutboxRow>, Error> {
        fetch!(self, fetch_all, OutboxRow, OUTBOX, text(instance))
    }

    pub async fn alert_state_put(
        &self,
        instance: &str,
        exchange: &str,
        alertname: &str,
        payload: &str,
    ) -> Result<(), Error> {
        execute!(self, STATE_PUT, text(instance), text(exchange), text(alertname), text(payload), now_ms())?;
        Ok(())
    }

    pub async fn alert_state_clear(&self, instance: &str, exchange: &str, alertname: &str) -> Result<(), Error> {
        execute!(self, STATE_CLEAR, text(instance), text(exchange), text(alertname))?;
        Ok(())
    }

    /// Marks every alert this replica fires as still firing: the other replicas wait for fresh rows only.
    pub async fn alert_state_renew(&self, instance: &str) -> Result<(), Error> {
        execute!(self, STATE_RENEW, instance, now_ms())?;
        Ok(())
    }

    /// The alerts other replicas fire, renewed within `fresh_within`: `(exchange, alertname)`.
    pub async fn alert_state_elsewhere(
        &self,
        instance: &str,
        fresh_within: Duration,
    ) -> Result<Vec<(String, String)>, Error> {
        let since = now_ms().saturating_sub(i64::try_from(fresh_within.as_millis()).unwrap_or(i64::MAX));
        fetch!(self, fetch_all, (String, String), STATE_ELSEWHERE, instance, since)
    }

    /// The alerts this replica had firing: `(exchange, alertname, payload)`.
    pub async fn alert_state(&self, instance: &str) -> Result<Vec<(String, String, String)>, Error> {
        fetch!(self, fetch_all, (String, String, String), STATE, text(instance))
    }
}
