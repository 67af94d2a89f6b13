//! The database as the writer's sink when it may not be there yet: exwatch starts, polls and logs while the
//! database is down (rows buffer and spool), connects and migrates at the first chance, and keeps the pool after.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;

use crate::store::{CallRecord, Config, Database, Sink, WriteError};

/// The longest one batch insert (or the connection for it) may take.
const INSERT_TIMEOUT: Duration = Duration::from_secs(10);

/// Connects (and migrates) on first use and after a failed attempt; shares the pool once connected.
pub struct Connector {
    config: Config,
    database: Mutex<Option<Database>>,
}

impl Connector {
    pub fn new(config: Config) -> Arc<Connector> {
        Arc::new(Connector { config, database: Mutex::new(None) })
    }

    /// The connected database, connecting and migrating now if needed.
    pub async fn database(&self) -> Result<Database, crate::store::database::Error> {
        let mut database = self.database.lock().await;
        if let Some(connected) = database.as_ref() {
            return Ok(connected.clone());
        }
        let connected = Database::connect(&self.config).await?;
        tracing::info!(database = connected.target(), "Connected to the database; migrations applied.");
        *database = Some(connected.clone());
        Ok(connected)
    }

    /// Whether a connection has been made (it may have failed since; the writer's status says).
    pub async fn is_connected(&self) -> bool {
        self.database.lock().await.is_some()
    }
}

#[async_trait::async_trait]
impl Sink for Connector {
    async fn insert_batch(&self, rows: &[CallRecord]) -> Result<(), WriteError> {
        let database = match tokio::time::timeout(INSERT_TIMEOUT, self.database()).await {
            Ok(Ok(database)) => database,
            Ok(Err(error)) => return Err(WriteError::Unavailable(error.to_string())),
            Err(_) => return Err(WriteError::Unavailable("no connection within the insert timeout".to_owned())),
        };
        // A hung connection (a network cut without a reset) must not hold the writer: it retries, and the rows
        // stay buffered or spooled meanwhile; ids make a retried insert idempotent.
        match tokio::time::timeout(INSERT_TIMEOUT, database.insert_batch(rows)).await {
            Ok(result) => result,
            Err(_) => Err(WriteError::Unavailable(format!(
                "insert did not finish within {}",
                humantime::format_duration(INSERT_TIMEOUT)
            ))),
        }
    }
}
