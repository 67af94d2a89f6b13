//! `exchange_events`: the journal's events (see [`crate::journal`]) and the timeline of an incident read from them.
//! Every statement on the table is here, once for both backends; the [`alerts`](super::alerts) recorder writes the
//! events in order with alerting's other records. Times are Unix milliseconds, the same integer on both backends.

use std::time::Duration;

use chrono::{DateTime, TimeZone as _, Utc};
use serde::Serialize;

use super::database::{Database, Error, execute, fetch};
use super::incidents::Incident;
use super::text;
use crate::journal::{Event, Kind};

const EVENT_PUT: &str = "INSERT INTO exchange_events (id, instance, exchange, at_ms, kind, detail) \
    VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (id) DO NOTHING";
const EVENTS_BETWEEN: &str = "SELECT instance, at_ms, kind, detail FROM exchange_events \
    WHERE exchange = $1 AND at_ms >= $2 AND at_ms <= $3 ORDER BY at_ms, id LIMIT $4";
const EVENTS_PRUNE: &str = "DELETE FROM exchange_events WHERE at_ms < $1";

/// How long after its resolve an incident's timeline still reads events: the resolve's deliveries, held while
/// another replica still fires (up to four re-send intervals), come after it.
pub const AFTER_RESOLVE: Duration = Duration::from_secs(300);
/// The most events one timeline shows; a longer story is cut, and says so.
pub const MAX_TIMELINE_EVENTS: u32 = 1000;

/// One line of an incident's story.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Entry {
    pub at: DateTime<Utc>,
    pub kind: String,
    pub detail: String,
    /// The replica that saw it.
    pub instance: String,
}

/// An incident told as a story, in order: the first failure of the streak, then everything the journal recorded
/// for its exchange until a little after it resolved (or now).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Timeline {
    pub incident: Incident,
    pub entries: Vec<Entry>,
    /// More events than [`MAX_TIMELINE_EVENTS`] fell in the window; the rest are not shown.
    pub truncated: bool,
}

fn millis(at: DateTime<Utc>) -> i64 {
    at.timestamp_millis()
}

fn at_millis(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms).single().unwrap_or_default()
}

impl Database {
    /// Records one event; writing the same id twice keeps one row.
    pub async fn event_put(&self, id: &str, instance: &str, event: &Event) -> Result<(), Error> {
        execute!(
            self,
            EVENT_PUT,
            text(id),
            text(instance),
            text(&event.exchange),
            millis(event.at),
            event.kind.as_str(),
            text(&event.detail)
        )?;
        Ok(())
    }

    /// Deletes the events older than `cutoff` (retention, with the call logs).
    pub async fn events_prune(&self, cutoff: DateTime<Utc>) -> Result<u64, Error> {
        execute!(self, EVENTS_PRUNE, millis(cutoff))
    }

    /// Incident `id` as a story; `None` when there is no such incident.
    pub async fn incident_timeline(&self, id: i64) -> Result<Option<Timeline>, Error> {
        let Some(incident) = self.incident(id).await? else { return Ok(None) };
        let end = incident
            .resolved_at
            .map_or_else(Utc::now, |resolved| resolved + chrono::Duration::from_std(AFTER_RESOLVE).unwrap_or_default());
        let rows: Vec<(String, i64, String, String)> = fetch!(
            self,
            fetch_all,
            (String, i64, String, String),
            EVENTS_BETWEEN,
            text(&incident.provider),
            millis(incident.started_at),
            millis(end),
            i64::from(MAX_TIMELINE_EVENTS) + 1
        )?;
        let truncated = rows.len() > MAX_TIMELINE_EVENTS as usize;
        let mut entries = vec![Entry {
            at: incident.started_at,
            kind: "failure".to_owned(),
            detail: format!(
                "first failure of the streak: {}",
                incident.first_error.as_deref().unwrap_or("not recorded")
            ),
            instance: String::new(),
        }];
        entries.extend(rows.into_iter().take(MAX_TIMELINE_EVENTS as usize).map(|(instance, at_ms, kind, detail)| {
            Entry {
                at: at_millis(at_ms),
                kind: Kind::parse(&kind).map_or(kind, |kind| kind.as_str().to_owned()),
                detail,
                instance,
            }
        }));
        Ok(Some(Timeline { incident, entries, truncated }))
    }
}
