//! Incident rows for the post-incident review: `exchange_api_down` firing opens a row in `incidents` (start,
//! scenario, first error) and resolving closes it (end). The alert engine hands events to [`Handle::send`], which
//! never waits; a task writes them in order, retrying while the database is away, so an outage of the database
//! during an exchange incident delays the row but does not lose it (within this process's life).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::store::connector::Connector;

/// What the alert engine reports about one alert.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Opened { provider: String, alertname: String, scenario: String, at: DateTime<Utc>, first_error: Option<String> },
    Resolved { provider: String, alertname: String, at: DateTime<Utc> },
}

/// Hands events to the recorder. Cheap to clone; sending never waits.
#[derive(Debug, Clone)]
pub struct Handle {
    sender: mpsc::UnboundedSender<Event>,
}

impl Handle {
    pub fn send(&self, event: Event) {
        if self.sender.send(event).is_err() {
            tracing::warn!("Incident recorder stopped; an incident event was not recorded.");
        }
    }
}

/// The longest wait between two attempts while the database is away.
const MAX_RETRY: Duration = Duration::from_secs(30);

/// The events' way from the alert engines (the [`Handle`]) to the recorder task ([`run`]).
pub fn channel() -> (Handle, Receiver) {
    let (sender, receiver) = mpsc::unbounded_channel();
    (Handle { sender }, Receiver(receiver))
}

/// The recorder's end of [`channel`].
#[derive(Debug)]
pub struct Receiver(mpsc::UnboundedReceiver<Event>);

/// Records events in order until `cancel`, retrying while the database is away.
pub async fn run(connector: Arc<Connector>, receiver: Receiver, cancel: CancellationToken) {
    let Receiver(mut receiver) = receiver;
    let mut pending: VecDeque<Event> = VecDeque::new();
    let mut retry = Duration::from_millis(200);
    loop {
        if pending.is_empty() {
            tokio::select! {
                () = cancel.cancelled() => return,
                event = receiver.recv() => match event {
                    Some(event) => pending.push_back(event),
                    None => return,
                },
            }
        }
        while let Ok(event) = receiver.try_recv() {
            pending.push_back(event);
        }
        let Some(event) = pending.front().cloned() else { continue };
        match record(&connector, &event).await {
            Ok(()) => {
                pending.pop_front();
                retry = Duration::from_millis(200);
            }
            Err(error) => {
                tracing::warn!(error = %error, pending = pending.len(), "Cannot record an incident yet; retrying.");
                tokio::select! {
                    () = cancel.cancelled() => {
                        tracing::error!(pending = pending.len(), "Stopping with incident events unrecorded.");
                        return;
                    }
                    () = tokio::time::sleep(retry) => {}
                }
                retry = (retry * 2).min(MAX_RETRY);
            }
        }
    }
}

async fn record(connector: &Connector, event: &Event) -> Result<(), crate::store::database::Error> {
    let database = connector.database().await?;
    match event {
        Event::Opened { provider, alertname, scenario, at, first_error } => {
            let id = database.open_incident(provider, alertname, scenario, *at, first_error.as_deref()).await?;
            tracing::info!(incident = id, provider, alertname, scenario, "Incident opened.");
        }
        Event::Resolved { provider, alertname, at } => {
            // The open row may predate this process (a restart mid-incident): find it by provider and alert.
            for incident in database.open_incidents().await? {
                if &incident.provider == provider && &incident.alertname == alertname {
                    database.resolve_incident(incident.id, *at).await?;
                    tracing::info!(incident = incident.id, provider, alertname, "Incident resolved.");
                }
            }
        }
    }
    Ok(())
}
