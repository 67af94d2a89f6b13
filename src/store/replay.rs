//! An operator's look at one spool file, and its replay: `exwatch spool inspect FILE` lists what a quarantined (or
//! any) spool file holds, line by line, and `exwatch spool replay FILE` writes it to the configured database.
//!
//! A file may hold call-log rows (the writer's spool), `rejected.jsonl` lines (a row and why it was refused) or the
//! alert recorder's operations; each line is read as whichever it is, and a line that is none of them is listed as
//! unreadable with its number. Replaying is idempotent (rows by id, operations by key), so a file replayed twice, or
//! one whose readable rows the writer already wrote, changes nothing the second time. This module never deletes or
//! moves the file: the operator does, once satisfied.

use std::path::Path;

use serde::Serialize;

use super::alerts::{self, Spooled};
use super::database::{Database, Error};
use super::spool::{self, Rejected, SpoolError};
use super::{CallRecord, Sink as _, WriteError};

/// Call-log rows per insert when replaying.
const REPLAY_BATCH: usize = 500;

/// One line of a spool file, as read.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Line {
    Call {
        record: CallRecord,
    },
    Rejected {
        error: String,
        record: CallRecord,
    },
    Alert {
        queued_at_ms: i64,
        op: alerts::Op,
    },
    /// Not a line any spool writes (corruption, or a later version's format).
    Unreadable,
}

/// A numbered line (1-based, as editors count).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Numbered {
    pub number: usize,
    #[serde(flatten)]
    pub line: Line,
}

/// Reads every line of the file at `path`.
pub fn inspect(path: &Path) -> Result<Vec<Numbered>, SpoolError> {
    let contents = spool::read_file(path)?;
    let lines = contents.split(|byte| *byte == b'\n').enumerate().filter(|(_, line)| !line.is_empty());
    Ok(lines.map(|(index, line)| Numbered { number: index + 1, line: parse(line) }).collect())
}

fn parse(line: &[u8]) -> Line {
    if let Ok(spooled) = serde_json::from_slice::<Spooled>(line) {
        return Line::Alert { queued_at_ms: spooled.queued_at_ms, op: spooled.op };
    }
    if let Ok(rejected) = serde_json::from_slice::<Rejected<CallRecord>>(line) {
        return Line::Rejected { error: rejected.error, record: rejected.record };
    }
    match serde_json::from_slice::<CallRecord>(line) {
        Ok(record) => Line::Call { record },
        Err(_) => Line::Unreadable,
    }
}

/// The listing for people: one line per spool line, then a summary.
pub fn render(lines: &[Numbered]) -> String {
    let mut text = String::new();
    for Numbered { number, line } in lines {
        let described = match line {
            Line::Call { record } => describe_call("call", record),
            Line::Rejected { error, record } => format!("{} (refused: {error})", describe_call("rejected", record)),
            Line::Alert { op, .. } => {
                format!("alert     {}  {}", op.kind(), serde_json::to_string(op).unwrap_or_default())
            }
            Line::Unreadable => "unreadable".to_owned(),
        };
        text.push_str(&format!("{number:>6}  {described}\n"));
    }
    let count = |wanted: fn(&Line) -> bool| lines.iter().filter(|numbered| wanted(&numbered.line)).count();
    text.push_str(&format!(
        "{} lines: {} call rows, {} rejected rows, {} alert writes, {} unreadable\n",
        lines.len(),
        count(|line| matches!(line, Line::Call { .. })),
        count(|line| matches!(line, Line::Rejected { .. })),
        count(|line| matches!(line, Line::Alert { .. })),
        count(|line| matches!(line, Line::Unreadable)),
    ));
    text
}

fn describe_call(kind: &str, record: &CallRecord) -> String {
    let outcome = if record.success { "success" } else { record.error_class.as_deref().unwrap_or("failure") };
    format!(
        "{kind:<9} {}  {} {} {outcome} {}ms  {}",
        record.created_at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        record.provider,
        record.endpoint,
        record.response_time,
        record.id
    )
}

/// What a replay did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Replayed {
    /// Call-log rows written (or already there).
    pub calls: usize,
    pub alert_writes: usize,
    /// Rows or operations the database refused, with the first reason.
    pub refused: usize,
    pub first_refusal: Option<String>,
    pub unreadable: usize,
}

/// Writes the file's rows and operations to `database`, in file order, for `instance` (the alert side's rows are
/// per replica). A transient failure stops the replay with an error (run it again later); refusals are counted.
pub async fn replay(database: &Database, instance: &str, lines: Vec<Numbered>) -> Result<Replayed, Error> {
    let mut replayed = Replayed::default();
    let mut calls: Vec<CallRecord> = Vec::new();
    for Numbered { line, .. } in lines {
        match line {
            Line::Call { record } | Line::Rejected { record, .. } => {
                calls.push(record);
                if calls.len() >= REPLAY_BATCH {
                    insert(database, &mut calls, &mut replayed).await?;
                }
            }
            Line::Alert { op, .. } => {
                // Calls and operations never share a file, but keep the file's order all the same.
                insert(database, &mut calls, &mut replayed).await?;
                match alerts::apply(database, instance, &op).await {
                    Ok(()) => replayed.alert_writes += 1,
                    Err(error) if alerts::is_permanent(&error) => refused(&mut replayed, error.to_string(), 1),
                    Err(error) => return Err(error),
                }
            }
            Line::Unreadable => replayed.unreadable += 1,
        }
    }
    insert(database, &mut calls, &mut replayed).await?;
    Ok(replayed)
}

/// Inserts the batch; a refused batch is retried row by row, so only the refused rows are counted as such.
async fn insert(database: &Database, calls: &mut Vec<CallRecord>, replayed: &mut Replayed) -> Result<(), Error> {
    if calls.is_empty() {
        return Ok(());
    }
    let batch = std::mem::take(calls);
    match database.insert_batch(&batch).await {
        Ok(()) => replayed.calls += batch.len(),
        Err(WriteError::Unavailable(reason)) => return Err(Error::Unavailable(reason)),
        Err(WriteError::Rejected(_)) => {
            for row in batch {
                match database.insert_batch(std::slice::from_ref(&row)).await {
                    Ok(()) => replayed.calls += 1,
                    Err(WriteError::Unavailable(reason)) => return Err(Error::Unavailable(reason)),
                    Err(WriteError::Rejected(reason)) => refused(replayed, reason, 1),
                }
            }
        }
    }
    Ok(())
}

fn refused(replayed: &mut Replayed, reason: String, count: usize) {
    replayed.refused += count;
    replayed.first_refusal.get_or_insert(reason);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::spool::tests::{json_lines, records};

    #[test]
    fn every_kind_of_line_is_recognised_and_corrupt_ones_are_numbered() {
        let temp = tempfile::tempdir().unwrap();
        let rows = records(0..2);
        let mut lines = json_lines(&rows);
        lines.insert(1, "{\"id\": 3".to_owned());
        lines.push(serde_json::to_string(&Rejected { error: "too long".to_owned(), record: &rows[0] }).unwrap());
        let op = alerts::Op::OutboxDone { id: "x".to_owned() };
        lines.push(serde_json::to_string(&Spooled { version: 1, queued_at_ms: 5, op: op.clone() }).unwrap());
        let path = temp.path().join("file.jsonl");
        std::fs::write(&path, lines.join("\n") + "\n").unwrap();
        let read = inspect(&path).unwrap();
        let kinds: Vec<(usize, Line)> = read.into_iter().map(|numbered| (numbered.number, numbered.line)).collect();
        assert_eq!(
            kinds,
            [
                (1, Line::Call { record: rows[0].clone() }),
                (2, Line::Unreadable),
                (3, Line::Call { record: rows[1].clone() }),
                (4, Line::Rejected { error: "too long".to_owned(), record: rows[0].clone() }),
                (5, Line::Alert { queued_at_ms: 5, op }),
            ]
        );
    }

    #[test]
    fn an_alert_line_of_an_unknown_version_is_unreadable_not_misread() {
        let line = br#"{"version":2,"queued_at_ms":5,"op":{"op":"outbox_done","id":"x"}}"#;
        assert_eq!(parse(line), Line::Unreadable);
    }
}
