//! What alerting keeps in the database: the durable outbox (`alert_outbox`: notifications not yet delivered),
//! the alerts firing now (`alert_state`), and the `incidents` rows for the post-incident review
//! (`exchange_api_down` firing opens one, resolving closes it).
//!
//! The alert side hands [`Op`]s to [`Handle::send`], which never waits; one task ([`run`]) writes them in order,
//! retrying while the database is away, so an outage of the database during an exchange incident delays the
//! writes but does not reorder or lose them (within this process's life; delivery itself never waits for them).
//! Stored alerts are opaque JSON here: the alert module owns their shape.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::store::connector::Connector;
use crate::store::database::{Database, Error, query_error};

/// One undelivered notification for one sink target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxRow {
    pub id: String,
    pub target: String,
    pub kind: String,
    pub payload: String,
    pub created_at_ms: i64,
}

/// One write, in the order the alert side made them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    IncidentOpened {
        provider: String,
        alertname: String,
        scenario: String,
        at: DateTime<Utc>,
        first_error: Option<String>,
    },
    IncidentResolved {
        provider: String,
        alertname: String,
        at: DateTime<Utc>,
    },
    OutboxPut(OutboxRow),
    /// Delivered, rejected or expired: the row goes.
    OutboxDone {
        id: String,
    },
    StatePut {
        exchange: String,
        alertname: String,
        payload: String,
    },
    StateClear {
        exchange: String,
        alertname: String,
    },
}

/// Hands writes to the recorder. Cheap to clone; sending never waits.
#[derive(Debug, Clone)]
pub struct Handle {
    sender: mpsc::UnboundedSender<Op>,
}

impl Handle {
    pub fn send(&self, op: Op) {
        if self.sender.send(op).is_err() {
            tracing::warn!("Alert recorder stopped; an alert write was not recorded.");
        }
    }
}

/// The longest wait between two attempts while the database is away.
const MAX_RETRY: Duration = Duration::from_secs(30);

/// The writes' way from the alert side (the [`Handle`]) to the recorder task ([`run`]).
pub fn channel() -> (Handle, Receiver) {
    let (sender, receiver) = mpsc::unbounded_channel();
    (Handle { sender }, Receiver(receiver))
}

/// The recorder's end of [`channel`].
#[derive(Debug)]
pub struct Receiver(mpsc::UnboundedReceiver<Op>);

/// Records writes in order for `instance` until `cancel`, retrying while the database is away.
pub async fn run(connector: Arc<Connector>, instance: String, receiver: Receiver, cancel: CancellationToken) {
    let Receiver(mut receiver) = receiver;
    let mut pending: VecDeque<Op> = VecDeque::new();
    let mut retry = Duration::from_millis(200);
    loop {
        if pending.is_empty() {
            tokio::select! {
                biased;
                op = receiver.recv() => match op {
                    Some(op) => pending.push_back(op),
                    None => return,
                },
                () = cancel.cancelled() => return,
            }
        }
        while let Ok(op) = receiver.try_recv() {
            pending.push_back(op);
        }
        let Some(op) = pending.front().cloned() else { continue };
        match record(&connector, &instance, &op).await {
            Ok(()) => {
                pending.pop_front();
                retry = Duration::from_millis(200);
            }
            Err(error) => {
                tracing::warn!(error = %error, pending = pending.len(), "Cannot record alert state yet; retrying.");
                tokio::select! {
                    () = cancel.cancelled() => {
                        tracing::error!(pending = pending.len(), "Stopping with alert writes unrecorded.");
                        return;
                    }
                    () = tokio::time::sleep(retry) => {}
                }
                retry = (retry * 2).min(MAX_RETRY);
            }
        }
    }
}

async fn record(connector: &Connector, instance: &str, op: &Op) -> Result<(), Error> {
    let database = connector.database().await?;
    match op {
        Op::IncidentOpened { provider, alertname, scenario, at, first_error } => {
            let id = database.open_incident(provider, alertname, scenario, *at, first_error.as_deref()).await?;
            tracing::info!(incident = id, provider, alertname, scenario, "Incident opened.");
        }
        Op::IncidentResolved { provider, alertname, at } => {
            // The open row may predate this process (a restart mid-incident): find it by provider and alert.
            for incident in database.open_incidents().await? {
                if &incident.provider == provider && &incident.alertname == alertname {
                    database.resolve_incident(incident.id, *at).await?;
                    tracing::info!(incident = incident.id, provider, alertname, "Incident resolved.");
                }
            }
        }
        Op::OutboxPut(row) => database.outbox_put(instance, row).await?,
        Op::OutboxDone { id } => database.outbox_done(id).await?,
        Op::StatePut { exchange, alertname, payload } => {
            database.alert_state_put(instance, exchange, alertname, payload).await?;
        }
        Op::StateClear { exchange, alertname } => database.alert_state_clear(instance, exchange, alertname).await?,
    }
    Ok(())
}

/// Runs one statement on either backend: `sql` is written with SQLite's `?N` placeholders, which become
/// Postgres's `$N`; `bind` adds the same values to either query.
macro_rules! execute {
    ($database:expr, $sql:expr, |$query:ident| $bind:expr) => {
        match $database {
            Database::Postgres(pool) => {
                // Only the placeholders change in a constant statement: nothing from outside enters the SQL.
                let sql = sqlx::AssertSqlSafe($sql.replace('?', "$"));
                let $query = sqlx::query(sql);
                $bind.execute(pool).await.map_err(query_error)?.rows_affected()
            }
            Database::Sqlite(pool) => {
                let $query = sqlx::query($sql);
                $bind.execute(pool).await.map_err(query_error)?.rows_affected()
            }
        }
    };
}

/// Like [`execute!`], fetching every row as the tuple type `$row`.
macro_rules! fetch_all {
    ($database:expr, $row:ty, $sql:expr, |$query:ident| $bind:expr) => {
        match $database {
            Database::Postgres(pool) => {
                let sql = sqlx::AssertSqlSafe($sql.replace('?', "$"));
                let $query = sqlx::query_as::<_, $row>(sql);
                $bind.fetch_all(pool).await.map_err(query_error)?
            }
            Database::Sqlite(pool) => {
                let $query = sqlx::query_as::<_, $row>($sql);
                $bind.fetch_all(pool).await.map_err(query_error)?
            }
        }
    };
}

fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

impl Database {
    /// Adds an undelivered notification; adding the same id twice keeps one row.
    pub async fn outbox_put(&self, instance: &str, row: &OutboxRow) -> Result<(), Error> {
        execute!(
            self,
            "INSERT INTO alert_outbox (id, instance, target, kind, payload, created_at_ms) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT (id) DO NOTHING",
            |query| query
                .bind(&row.id)
                .bind(instance)
                .bind(&row.target)
                .bind(&row.kind)
                .bind(&row.payload)
                .bind(row.created_at_ms)
        );
        Ok(())
    }

    pub async fn outbox_done(&self, id: &str) -> Result<(), Error> {
        execute!(self, "DELETE FROM alert_outbox WHERE id = ?1", |query| query.bind(id));
        Ok(())
    }

    /// This replica's undelivered notifications, oldest first.
    pub async fn outbox(&self, instance: &str) -> Result<Vec<OutboxRow>, Error> {
        let rows = fetch_all!(
            self,
            (String, String, String, String, i64),
            "SELECT id, target, kind, payload, created_at_ms FROM alert_outbox WHERE instance = ?1 ORDER BY seq",
            |query| query.bind(instance)
        );
        Ok(rows
            .into_iter()
            .map(|(id, target, kind, payload, created_at_ms)| OutboxRow { id, target, kind, payload, created_at_ms })
            .collect())
    }

    pub async fn alert_state_put(
        &self,
        instance: &str,
        exchange: &str,
        alertname: &str,
        payload: &str,
    ) -> Result<(), Error> {
        execute!(
            self,
            "INSERT INTO alert_state (instance, exchange, alertname, payload, updated_at_ms) \
             VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (instance, exchange, alertname) \
             DO UPDATE SET payload = excluded.payload, updated_at_ms = excluded.updated_at_ms",
            |query| query.bind(instance).bind(exchange).bind(alertname).bind(payload).bind(now_ms())
        );
        Ok(())
    }

    pub async fn alert_state_clear(&self, instance: &str, exchange: &str, alertname: &str) -> Result<(), Error> {
        execute!(self, "DELETE FROM alert_state WHERE instance = ?1 AND exchange = ?2 AND alertname = ?3", |query| {
            query.bind(instance).bind(exchange).bind(alertname)
        });
        Ok(())
    }

    /// The alerts this replica had firing: `(exchange, alertname, payload)`.
    pub async fn alert_state(&self, instance: &str) -> Result<Vec<(String, String, String)>, Error> {
        Ok(fetch_all!(
            self,
            (String, String, String),
            "SELECT exchange, alertname, payload FROM alert_state WHERE instance = ?1 ORDER BY exchange, alertname",
            |query| query.bind(instance)
        ))
    }
}
