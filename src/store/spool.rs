//! The on-disk spool: rows the database could not take yet, kept in order across an outage and a restart.
//!
//! The spool is a directory of append-only JSON Lines files (`spool-000001.jsonl`, one row a line), oldest sequence
//! first. Rows are appended in batches with one fsync per batch and removed from the head only when the caller
//! commits them, that is after they are written; a file is deleted once every row in it is committed. A crash
//! between a write and its commit replays rows the database already has, which is harmless because writes are
//! idempotent. Rows the database rejected go to `rejected.jsonl` beside the spool files, never replayed. The row
//! type is the caller's: [`CallRecord`] for the call-log writer, the alert recorder's operations for its own spool.
//!
//! A file the spool cannot read (an I/O error, or not a regular file) is moved aside at once into `quarantine/`,
//! its name prefixed with the time, and the spool goes on with the next file. A file with lines that do not parse
//! (corruption; a torn last line after a crash is merely cut off) gives up its readable rows as usual and is then
//! moved aside instead of deleted, so the bad lines stay for an operator (`exwatch spool inspect|replay`). The
//! spool's byte bound covers its files, the quarantined ones and `rejected.jsonl` together.
//!
//! The spool is synchronous `std::fs` code and deliberately knows nothing about batching, time or the database: the
//! writer decides what goes in and when, and runs these calls on the blocking pool. It never drops a row by itself:
//! a full spool refuses an append, and lines that cannot be read and files moved aside are reported to the caller.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::CallRecord;

/// The name of the dead-letter file, in the spool directory.
pub const REJECTED_FILE: &str = "rejected.jsonl";
/// The directory, inside the spool directory, that unreadable and corrupt files are moved to.
pub const QUARANTINE_DIR: &str = "quarantine";

const FILE_PREFIX: &str = "spool-";
const FILE_SUFFIX: &str = ".jsonl";

/// The largest a spool file grows before appends start a new one. Smaller files free disk space sooner during a
/// long replay, since a file is deleted only once all its rows are written.
const MAX_FILE_BYTES: u64 = 8 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// The rows would take the spool past its byte bound; nothing was appended.
    #[error("the spool is full ({bytes} of {max_bytes} bytes used, {needed} more needed)")]
    Full { bytes: u64, max_bytes: u64, needed: u64 },
    #[error("spool i/o on {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("cannot serialise a row for the spool: {0}")]
    Serialise(#[from] serde_json::Error),
}

impl SpoolError {
    fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SpoolError + '_ {
        move |source| SpoolError::Io { path: path.to_owned(), source }
    }
}

/// A spool file moved aside, for the caller to log (once, at ERROR) and count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quarantined {
    /// Where the file was.
    pub from: PathBuf,
    /// Where it is now; `None` if it could not be moved (it is then left alone until the next start).
    pub to: Option<PathBuf>,
    /// Why: the read error, or how many lines did not parse.
    pub reason: String,
}

impl Quarantined {
    /// Logs the move once, at ERROR: rows may wait there for an operator. `spool` names which spool it was.
    pub fn log(&self, spool: &str) {
        let to = self.to.as_ref().map(|to| to.display().to_string());
        tracing::error!(
            spool,
            file = %self.from.display(),
            quarantined_as = to.as_deref().unwrap_or("(left in place)"),
            reason = self.reason,
            "Spool file unreadable; moved aside and skipped (see `exwatch spool inspect`)."
        );
    }
}

/// One spool file and what is left of it.
#[derive(Debug)]
struct Segment {
    path: PathBuf,
    /// Rows not yet committed (complete lines, less the unreadable ones once the file has been loaded).
    rows: usize,
    /// The file's size: its bytes count against the bound until the file is deleted.
    bytes: u64,
    /// Lines that did not parse when the file was read: the file is quarantined instead of deleted.
    corrupt_lines: u64,
}

/// The spool directory. See the module documentation for the format and the guarantees.
#[derive(Debug)]
pub struct Spool<T = CallRecord> {
    dir: PathBuf,
    max_bytes: u64,
    /// Oldest first.
    segments: VecDeque<Segment>,
    /// The uncommitted rows of the oldest segment, once it has been read.
    head: VecDeque<T>,
    head_loaded: bool,
    /// The newest segment, open for appends. A segment that has been read is closed for appends, so the rows in
    /// `head` are always the whole remainder of the oldest file.
    appender: Option<File>,
    next_sequence: u64,
    rows: usize,
    /// Bytes of the spool files.
    bytes: u64,
    /// Bytes of the quarantined files and the dead-letter file, which count against the bound too.
    set_aside_bytes: u64,
    /// Lines that could not be parsed (a torn last line after a crash, or a corrupt one) since the last `take`.
    unreadable_lines: u64,
    /// Files moved aside since the last `take`.
    quarantined: Vec<Quarantined>,
}

impl<T: Serialize + DeserializeOwned + Clone> Spool<T> {
    /// Opens the spool in `dir`, taking over the files a previous run left there. A missing directory is an empty
    /// spool; it is created on the first append. A torn last line (a crash in the middle of an append) is cut off
    /// the file and counted in [`Spool::take_unreadable_lines`], so it is reported once and never read again. A
    /// file that cannot be read is moved aside (see [`Spool::take_quarantined`]).
    pub fn open(dir: impl Into<PathBuf>, max_bytes: u64) -> Result<Spool<T>, SpoolError> {
        let dir = dir.into();
        let mut spool = Spool {
            dir,
            max_bytes,
            segments: VecDeque::new(),
            head: VecDeque::new(),
            head_loaded: false,
            appender: None,
            next_sequence: 1,
            rows: 0,
            bytes: 0,
            set_aside_bytes: 0,
            unreadable_lines: 0,
            quarantined: Vec::new(),
        };
        let entries = match std::fs::read_dir(&spool.dir) {
            Ok(entries) => entries,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(spool),
            Err(source) => return Err(SpoolError::Io { path: spool.dir.clone(), source }),
        };
        let mut found = Vec::new();
        for entry in entries {
            let entry = entry.map_err(SpoolError::io(&spool.dir))?;
            let name = entry.file_name();
            if let Some(sequence) = name.to_str().and_then(parse_sequence) {
                found.push((sequence, entry.path()));
            }
        }
        spool.set_aside_bytes = set_aside_bytes(&spool.dir);
        // Numeric order, so the sequence can outgrow its six digits without breaking the order.
        found.sort_unstable_by_key(|(sequence, _)| *sequence);
        for (sequence, path) in found {
            spool.next_sequence = sequence + 1;
            match scan(&path) {
                Ok((rows, bytes, torn)) => {
                    spool.unreadable_lines += u64::from(torn);
                    spool.rows += rows;
                    spool.bytes += bytes;
                    spool.segments.push_back(Segment { path, rows, bytes, corrupt_lines: 0 });
                }
                Err(error) => {
                    let bytes = std::fs::symlink_metadata(&path).map_or(0, |metadata| metadata.len());
                    spool.quarantine(&path, bytes, error.to_string());
                }
            }
        }
        Ok(spool)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Rows waiting to be written, the ones read but not committed included.
    pub fn len_rows(&self) -> usize {
        self.rows
    }

    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    /// Bytes on disk that count against the bound: the spool files (committed rows keep counting until their file
    /// is deleted), the quarantined files and the dead-letter file.
    pub fn bytes(&self) -> u64 {
        self.bytes + self.set_aside_bytes
    }

    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// Checks that `needed` more bytes fit under the bound.
    fn fits(&self, needed: u64) -> Result<(), SpoolError> {
        if self.bytes() + needed > self.max_bytes {
            return Err(SpoolError::Full { bytes: self.bytes(), max_bytes: self.max_bytes, needed });
        }
        Ok(())
    }

    /// Appends the rows after every row already spooled and fsyncs once. All or nothing: if the rows do not fit
    /// under the bound, nothing is written and the error is [`SpoolError::Full`]. A failed write is cut back off the
    /// file, so a later append never lands behind half a line.
    pub fn append(&mut self, rows: &[T]) -> Result<(), SpoolError> {
        if rows.is_empty() {
            return Ok(());
        }
        let buffer = lines(rows)?;
        let needed = buffer.len() as u64;
        self.fits(needed)?;
        let rotate = match (&self.appender, self.segments.back()) {
            (Some(_), Some(newest)) => newest.bytes >= MAX_FILE_BYTES,
            _ => true,
        };
        if rotate {
            self.start_segment()?;
        }
        let segment = self.segments.back_mut().expect("an open appender always has its segment");
        let file = self.appender.as_mut().expect("start_segment opened a file or one was open");
        let written = file.write_all(&buffer).and_then(|()| file.sync_data());
        if let Err(source) = written {
            // Cut the partial batch off; if even that fails, stop appending to this file altogether.
            if file.set_len(segment.bytes).is_err() {
                self.appender = None;
            }
            return Err(SpoolError::Io { path: segment.path.clone(), source });
        }
        segment.rows += rows.len();
        segment.bytes += needed;
        self.rows += rows.len();
        self.bytes += needed;
        Ok(())
    }

    fn start_segment(&mut self) -> Result<(), SpoolError> {
        std::fs::create_dir_all(&self.dir).map_err(SpoolError::io(&self.dir))?;
        let sequence = self.next_sequence;
        let path = self.dir.join(format!("{FILE_PREFIX}{sequence:06}{FILE_SUFFIX}"));
        let file = OpenOptions::new().append(true).create_new(true).open(&path).map_err(SpoolError::io(&path))?;
        sync_dir(&self.dir)?;
        self.next_sequence += 1;
        self.appender = Some(file);
        self.segments.push_back(Segment { path, rows: 0, bytes: 0, corrupt_lines: 0 });
        Ok(())
    }

    /// Up to `max` of the oldest rows, in order, without removing them. Reads at most one file: a batch never spans
    /// two files, which keeps the reading simple and costs at most one short batch per file.
    pub fn read_oldest(&mut self, max: usize) -> Result<Vec<T>, SpoolError> {
        self.load_head()?;
        Ok(self.head.iter().take(max).cloned().collect())
    }

    /// Removes the `count` oldest rows, once they are written (or set aside as rejected). Deletes each file whose
    /// rows are all committed.
    pub fn commit(&mut self, mut count: usize) -> Result<(), SpoolError> {
        while count > 0 {
            self.load_head()?;
            let Some(segment) = self.segments.front_mut() else {
                break;
            };
            let taken = count.min(self.head.len());
            self.head.drain(..taken);
            segment.rows -= taken;
            self.rows -= taken;
            count -= taken;
            if self.head.is_empty() {
                self.delete_oldest()?;
            }
        }
        Ok(())
    }

    /// Deletes the oldest file, all of whose rows are committed; one with corrupt lines is moved aside instead.
    fn delete_oldest(&mut self) -> Result<(), SpoolError> {
        if let Some(segment) = self.segments.pop_front() {
            self.head_loaded = false;
            if segment.corrupt_lines > 0 {
                self.bytes -= segment.bytes;
                let reason = format!("{} lines could not be read", segment.corrupt_lines);
                self.quarantine(&segment.path, segment.bytes, reason);
                return Ok(());
            }
            match std::fs::remove_file(&segment.path) {
                Ok(()) => {}
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    // Keep the accounting true: the file, now empty of uncommitted rows, is still on disk.
                    self.segments.push_front(segment);
                    return Err(SpoolError::Io { path: self.dir.clone(), source });
                }
            }
            self.bytes -= segment.bytes;
        }
        Ok(())
    }

    /// Moves a file (no longer a segment) into the quarantine directory under a name prefixed with the time, and
    /// notes it for the caller. Its bytes keep counting against the bound, as set aside. A file that cannot be
    /// moved is left where it is (and noted): the next start tries again.
    fn quarantine(&mut self, path: &Path, bytes: u64, reason: String) {
        let name = path.file_name().map(|name| name.to_string_lossy().into_owned()).unwrap_or_default();
        let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%S%.3fZ");
        let directory = self.dir.join(QUARANTINE_DIR);
        let target = directory.join(format!("{stamp}-{name}"));
        let moved = std::fs::create_dir_all(&directory)
            .and_then(|()| std::fs::rename(path, &target))
            .and_then(|()| sync_dir(&self.dir).and_then(|()| sync_dir(&directory)).map_err(std::io::Error::other));
        let to = match moved {
            Ok(()) => Some(target),
            Err(error) => {
                self.quarantined.push(Quarantined {
                    from: path.to_owned(),
                    to: None,
                    reason: format!("{reason}; cannot move it aside: {error}"),
                });
                self.set_aside_bytes += bytes;
                return;
            }
        };
        self.set_aside_bytes += bytes;
        self.quarantined.push(Quarantined { from: path.to_owned(), to, reason });
    }

    /// Reads the oldest file into `head` if it is not there yet, skipping empty files and counting lines that do
    /// not parse. A file that is still open for appends is closed first, so nothing is added behind the read. A
    /// file that cannot be read is moved aside and the next one read.
    fn load_head(&mut self) -> Result<(), SpoolError> {
        while !self.head_loaded {
            let Some(oldest) = self.segments.front() else {
                return Ok(());
            };
            if self.segments.len() == 1 {
                self.appender = None;
            }
            let contents = match read_file(&oldest.path) {
                Ok(contents) => contents,
                Err(error) => {
                    if let Some(segment) = self.segments.pop_front() {
                        self.rows -= segment.rows;
                        self.bytes -= segment.bytes;
                        self.quarantine(&segment.path, segment.bytes, error.to_string());
                    }
                    continue;
                }
            };
            let (rows, corrupt) = parse_lines::<T>(&contents);
            self.unreadable_lines += corrupt.len() as u64;
            if let Some(oldest) = self.segments.front_mut() {
                // The line count from `open` or `append` becomes the parsed count: unreadable lines are not rows.
                self.rows = self.rows - oldest.rows + rows.len();
                oldest.rows = rows.len();
                oldest.corrupt_lines = corrupt.len() as u64;
            }
            self.head = rows.into();
            self.head_loaded = true;
            if self.head.is_empty() {
                self.delete_oldest()?;
            }
        }
        Ok(())
    }

    /// Lines that could not be read since the last call: the rows they held are lost, and the caller reports them.
    pub fn take_unreadable_lines(&mut self) -> u64 {
        std::mem::take(&mut self.unreadable_lines)
    }

    /// Files moved aside since the last call, for the caller to log and count once each.
    pub fn take_quarantined(&mut self) -> Vec<Quarantined> {
        std::mem::take(&mut self.quarantined)
    }

    /// Appends rows the database refused to `rejected.jsonl`, one `{"error", "record"}` object a line, and fsyncs.
    /// The file is for people to read; the spool never replays it. It counts against the bound: a full spool
    /// refuses it with [`SpoolError::Full`].
    pub fn dead_letter(&mut self, rows: &[T], error: &str) -> Result<(), SpoolError> {
        let mut buffer = Vec::new();
        for record in rows {
            serde_json::to_writer(&mut buffer, &Rejected { error: error.to_owned(), record })?;
            buffer.push(b'\n');
        }
        self.fits(buffer.len() as u64)?;
        std::fs::create_dir_all(&self.dir).map_err(SpoolError::io(&self.dir))?;
        let path = self.dir.join(REJECTED_FILE);
        let mut file = OpenOptions::new().append(true).create(true).open(&path).map_err(SpoolError::io(&path))?;
        file.write_all(&buffer).and_then(|()| file.sync_data()).map_err(SpoolError::io(&path))?;
        self.set_aside_bytes += buffer.len() as u64;
        Ok(())
    }
}

/// One line of `rejected.jsonl`: the row and why the database refused it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Rejected<T> {
    pub error: String,
    pub record: T,
}

/// The rows as JSON lines.
fn lines<T: Serialize>(rows: &[T]) -> Result<Vec<u8>, SpoolError> {
    let mut buffer = Vec::with_capacity(rows.len() * 512);
    for row in rows {
        serde_json::to_writer(&mut buffer, row)?;
        buffer.push(b'\n');
    }
    Ok(buffer)
}

/// The rows of a spool file's contents, and the (1-based) numbers of the lines that did not parse. Empty lines
/// are skipped.
pub fn parse_lines<T: DeserializeOwned>(contents: &[u8]) -> (Vec<T>, Vec<usize>) {
    let mut rows = Vec::new();
    let mut corrupt = Vec::new();
    for (index, line) in contents.split(|byte| *byte == b'\n').enumerate().filter(|(_, line)| !line.is_empty()) {
        match serde_json::from_slice::<T>(line) {
            Ok(row) => rows.push(row),
            Err(_) => corrupt.push(index + 1),
        }
    }
    (rows, corrupt)
}

/// The sequence number in a spool file's name, or `None` for any other file.
fn parse_sequence(name: &str) -> Option<u64> {
    name.strip_prefix(FILE_PREFIX)?.strip_suffix(FILE_SUFFIX)?.parse().ok()
}

/// The bytes of the quarantined files and the dead-letter file in `dir` (0 for what is missing).
fn set_aside_bytes(dir: &Path) -> u64 {
    let size = |path: &Path| std::fs::symlink_metadata(path).map_or(0, |metadata| metadata.len());
    let quarantined: u64 = std::fs::read_dir(dir.join(QUARANTINE_DIR))
        .map(|entries| entries.flatten().map(|entry| size(&entry.path())).sum())
        .unwrap_or(0);
    quarantined + size(&dir.join(REJECTED_FILE))
}

/// Counts the complete lines of a file left by an earlier run and cuts off a torn last line (no final newline),
/// so it is counted once here and never read. Returns the rows, the bytes kept and whether a line was torn.
fn scan(path: &Path) -> Result<(usize, u64, bool), SpoolError> {
    let contents = read_file(path)?;
    let rows = contents.iter().filter(|byte| **byte == b'\n').count();
    let kept = contents.iter().rposition(|byte| *byte == b'\n').map_or(0, |position| position + 1);
    let torn = kept < contents.len();
    if torn {
        let file = OpenOptions::new().write(true).open(path).map_err(SpoolError::io(path))?;
        file.set_len(kept as u64).and_then(|()| file.sync_data()).map_err(SpoolError::io(path))?;
    }
    Ok((rows, kept as u64, torn))
}

/// Reads a whole regular file. Anything else (a directory, a FIFO, a device) is refused before it is opened: a
/// FIFO would block the reader for good.
pub fn read_file(path: &Path) -> Result<Vec<u8>, SpoolError> {
    let metadata = std::fs::symlink_metadata(path).map_err(SpoolError::io(path))?;
    if !metadata.is_file() {
        let source = std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a regular file");
        return Err(SpoolError::Io { path: path.to_owned(), source });
    }
    let mut contents = Vec::new();
    File::open(path).and_then(|mut file| file.read_to_end(&mut contents)).map_err(SpoolError::io(path))?;
    Ok(contents)
}

/// Makes a new file's directory entry durable, so a crash cannot lose a file whose rows were fsynced.
fn sync_dir(dir: &Path) -> Result<(), SpoolError> {
    if cfg!(unix) {
        File::open(dir).and_then(|handle| handle.sync_all()).map_err(SpoolError::io(dir))?;
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A distinct, recognisable row: `number` goes into the endpoint name and the response time.
    pub(crate) fn record(number: i64) -> CallRecord {
        CallRecord {
            response_time: number,
            http_status: Some(200),
            ..CallRecord::new("kraken", "test", &format!("Ticker{number}"), chrono::Utc::now())
        }
    }

    pub(crate) fn records(range: std::ops::Range<i64>) -> Vec<CallRecord> {
        range.map(record).collect()
    }

    pub(crate) fn spool_files(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .map(|entries| entries.map(|entry| entry.unwrap().file_name().into_string().unwrap()).collect())
            .unwrap_or_default();
        names.retain(|name| parse_sequence(name).is_some());
        names.sort();
        names
    }

    #[test]
    fn a_missing_directory_is_an_empty_spool_created_on_the_first_append() {
        let temp = tempfile::tempdir().unwrap();
        let dir = temp.path().join("spool");
        let mut spool: Spool = Spool::open(&dir, 1 << 20).unwrap();
        assert!(spool.is_empty());
        assert!(!dir.exists());
        spool.append(&records(0..3)).unwrap();
        assert_eq!(spool_files(&dir), vec!["spool-000001.jsonl"]);
        assert_eq!(spool.len_rows(), 3);
        assert_eq!(spool.bytes(), std::fs::metadata(dir.join("spool-000001.jsonl")).unwrap().len());
    }

    #[test]
    fn rows_come_back_in_order_and_a_file_is_deleted_only_when_all_its_rows_are_committed() {
        let temp = tempfile::tempdir().unwrap();
        let mut spool: Spool = Spool::open(temp.path(), 1 << 20).unwrap();
        let rows = records(0..10);
        spool.append(&rows[..4]).unwrap();
        spool.append(&rows[4..6]).unwrap();
        assert_eq!(spool.read_oldest(5).unwrap(), rows[..5]);
        // Reading closes the file for appends: what comes next goes to a new file.
        spool.append(&rows[6..]).unwrap();
        assert_eq!(spool_files(temp.path()), vec!["spool-000001.jsonl", "spool-000002.jsonl"]);
        spool.commit(5).unwrap();
        assert_eq!(spool_files(temp.path()).len(), 2, "one row of the first file is not committed yet");
        assert_eq!(spool.read_oldest(5).unwrap(), rows[5..6], "a batch does not span two files");
        spool.commit(1).unwrap();
        assert_eq!(spool_files(temp.path()), vec!["spool-000002.jsonl"]);
        assert_eq!(spool.read_oldest(100).unwrap(), rows[6..]);
        spool.commit(4).unwrap();
        assert!(spool.is_empty());
        assert_eq!(spool.bytes(), 0);
        assert!(spool_files(temp.path()).is_empty());
    }

    #[test]
    fn an_append_that_does_not_fit_writes_nothing() {
        let temp = tempfile::tempdir().unwrap();
        let mut spool: Spool = Spool::open(temp.path(), 1000).unwrap();
        spool.append(&records(0..2)).unwrap();
        let before = spool.bytes();
        let error = spool.append(&records(2..10)).unwrap_err();
        assert!(matches!(error, SpoolError::Full { .. }), "{error}");
        assert_eq!(spool.bytes(), before);
        assert_eq!(spool.len_rows(), 2);
    }

    #[test]
    fn a_reopened_spool_continues_where_the_previous_run_stopped() {
        let temp = tempfile::tempdir().unwrap();
        let rows = records(0..6);
        {
            let mut spool: Spool = Spool::open(temp.path(), 1 << 20).unwrap();
            spool.append(&rows[..3]).unwrap();
            spool.read_oldest(1).unwrap();
            spool.append(&rows[3..]).unwrap();
            spool.commit(1).unwrap();
        }
        let mut spool: Spool = Spool::open(temp.path(), 1 << 20).unwrap();
        // The committed row is replayed (its file still held uncommitted rows): inserts are idempotent.
        assert_eq!(spool.len_rows(), 6);
        assert_eq!(spool.read_oldest(10).unwrap(), rows[..3]);
        spool.commit(3).unwrap();
        assert_eq!(spool.read_oldest(10).unwrap(), rows[3..]);
        spool.append(&records(6..7)).unwrap();
        assert_eq!(spool_files(temp.path()), vec!["spool-000002.jsonl", "spool-000003.jsonl"]);
    }

    #[test]
    fn a_torn_last_line_is_cut_off_and_counted_once() {
        let temp = tempfile::tempdir().unwrap();
        let rows = records(0..3);
        {
            let mut spool: Spool = Spool::open(temp.path(), 1 << 20).unwrap();
            spool.append(&rows).unwrap();
        }
        let path = temp.path().join("spool-000001.jsonl");
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(br#"{"id":"0190"#).unwrap();
        drop(file);
        let mut spool: Spool = Spool::open(temp.path(), 1 << 20).unwrap();
        assert_eq!(spool.take_unreadable_lines(), 1);
        assert_eq!(spool.len_rows(), 3);
        assert_eq!(spool.read_oldest(10).unwrap(), rows);
        assert_eq!(spool.take_unreadable_lines(), 0);
        drop(spool);
        let mut reopened: Spool = Spool::open(temp.path(), 1 << 20).unwrap();
        assert_eq!(reopened.take_unreadable_lines(), 0, "the torn line was cut off the file");
    }

    #[test]
    fn a_corrupt_line_is_skipped_and_counted_when_its_file_is_read() {
        let temp = tempfile::tempdir().unwrap();
        let rows = records(0..2);
        let mut contents = Vec::new();
        serde_json::to_writer(&mut contents, &rows[0]).unwrap();
        contents.extend_from_slice(b"\nnot json\n");
        serde_json::to_writer(&mut contents, &rows[1]).unwrap();
        contents.push(b'\n');
        std::fs::write(temp.path().join("spool-000007.jsonl"), contents).unwrap();
        let mut spool: Spool = Spool::open(temp.path(), 1 << 20).unwrap();
        assert_eq!(spool.len_rows(), 3, "lines are counted, not parsed, on open");
        assert_eq!(spool.read_oldest(10).unwrap(), rows);
        assert_eq!(spool.len_rows(), 2);
        assert_eq!(spool.take_unreadable_lines(), 1);
        spool.append(&records(2..3)).unwrap();
        assert!(temp.path().join("spool-000008.jsonl").exists(), "sequences continue after the highest");
    }

    /// Writes spool files into `dir`: each is a list of lines, or `None` for a directory in the file's place
    /// (a file no read can succeed on, whoever runs the test).
    pub(crate) fn write_spool_files(dir: &Path, files: &[(&str, Option<Vec<String>>)]) {
        std::fs::create_dir_all(dir).unwrap();
        for (name, lines) in files {
            match lines {
                Some(lines) => {
                    std::fs::write(dir.join(name), lines.iter().map(|line| format!("{line}\n")).collect::<String>())
                        .unwrap()
                }
                None => std::fs::create_dir(dir.join(name)).unwrap(),
            }
        }
    }

    pub(crate) fn json_lines(rows: &[CallRecord]) -> Vec<String> {
        rows.iter().map(|row| serde_json::to_string(row).unwrap()).collect()
    }

    /// Asserts that `value`'s line still reads with any one of its fields left out, except the `first_format`
    /// fields that every line has carried since the format's first version: a field added later must default
    /// (`#[serde(default)]`), or a previous run's spool would turn into unreadable lines.
    pub(crate) fn assert_later_fields_default<T: Serialize + DeserializeOwned>(value: &T, first_format: &[&str]) {
        let line = serde_json::to_value(value).unwrap();
        let object = line.as_object().expect("a line is a JSON object");
        for field in object.keys().filter(|field| !first_format.contains(&field.as_str())) {
            let mut without = object.clone();
            without.remove(field);
            if let Err(error) = serde_json::from_value::<T>(serde_json::Value::Object(without)) {
                panic!("a line without `{field}` does not read ({error}): give the field #[serde(default)]");
            }
        }
    }

    /// The fields of [`CallRecord`] every spool line has had, from the first version on.
    pub(crate) const CALL_FIRST_FORMAT: [&str; 6] =
        ["id", "provider", "endpoint", "success", "response_time", "created_at"];

    fn quarantined_files(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir.join(QUARANTINE_DIR))
            .map(|entries| entries.map(|entry| entry.unwrap().file_name().into_string().unwrap()).collect())
            .unwrap_or_default();
        names.sort();
        names
    }

    #[test]
    fn an_unreadable_file_is_moved_aside_at_open_and_the_next_file_is_read() {
        let temp = tempfile::tempdir().unwrap();
        let rows = records(0..4);
        write_spool_files(
            temp.path(),
            &[
                ("spool-000001.jsonl", Some(json_lines(&rows[..2]))),
                ("spool-000002.jsonl", None),
                ("spool-000003.jsonl", Some(json_lines(&rows[2..]))),
            ],
        );
        let mut spool: Spool = Spool::open(temp.path(), 1 << 20).unwrap();
        let quarantined = spool.take_quarantined();
        assert_eq!(quarantined.len(), 1, "{quarantined:?}");
        assert_eq!(quarantined[0].from, temp.path().join("spool-000002.jsonl"));
        assert!(quarantined[0].reason.contains("not a regular file"), "{quarantined:?}");
        let names = quarantined_files(temp.path());
        assert_eq!(names.len(), 1);
        assert!(names[0].ends_with("Z-spool-000002.jsonl") && names[0].starts_with("20"), "{names:?}");
        assert_eq!(spool.len_rows(), 4);
        assert_eq!(spool.read_oldest(10).unwrap(), rows[..2]);
        spool.commit(2).unwrap();
        assert_eq!(spool.read_oldest(10).unwrap(), rows[2..]);
        spool.commit(2).unwrap();
        assert!(spool.is_empty());
        assert!(spool_files(temp.path()).is_empty());
    }

    #[test]
    fn a_file_that_becomes_unreadable_is_moved_aside_when_read() {
        let temp = tempfile::tempdir().unwrap();
        let rows = records(0..4);
        let mut spool: Spool = Spool::open(temp.path(), 1 << 20).unwrap();
        spool.append(&rows[..2]).unwrap();
        spool.read_oldest(1).unwrap();
        spool.append(&rows[2..]).unwrap();
        spool.commit(2).unwrap();
        // The second file is replaced by something no read succeeds on, between the append and the read.
        std::fs::remove_file(temp.path().join("spool-000002.jsonl")).unwrap();
        std::fs::create_dir(temp.path().join("spool-000002.jsonl")).unwrap();
        assert_eq!(spool.read_oldest(10).unwrap(), Vec::<CallRecord>::new());
        assert_eq!(spool.take_quarantined().len(), 1);
        assert!(spool.is_empty());
        spool.append(&records(4..5)).unwrap();
        assert_eq!(spool.read_oldest(10).unwrap().len(), 1, "appends go on");
    }

    #[test]
    fn a_file_with_a_corrupt_line_gives_up_its_readable_rows_and_is_then_moved_aside() {
        let temp = tempfile::tempdir().unwrap();
        let rows = records(0..3);
        let mut lines = json_lines(&rows);
        lines.insert(1, "not json".to_owned());
        write_spool_files(temp.path(), &[("spool-000001.jsonl", Some(lines.clone()))]);
        let mut spool: Spool = Spool::open(temp.path(), 1 << 20).unwrap();
        assert_eq!(spool.read_oldest(10).unwrap(), rows);
        assert_eq!(spool.take_unreadable_lines(), 1);
        assert!(spool.take_quarantined().is_empty(), "not before its rows are committed");
        spool.commit(3).unwrap();
        let quarantined = spool.take_quarantined();
        assert_eq!(quarantined.len(), 1);
        assert_eq!(quarantined[0].reason, "1 lines could not be read");
        let kept = std::fs::read_to_string(quarantined[0].to.as_ref().unwrap()).unwrap();
        assert_eq!(kept.lines().collect::<Vec<_>>(), lines, "the file is kept as it was, for an operator");
        assert!(spool_files(temp.path()).is_empty());
    }

    #[test]
    fn quarantined_files_and_dead_letters_count_against_the_bound() {
        let temp = tempfile::tempdir().unwrap();
        let rows = records(0..10);
        let row_bytes = json_lines(&rows[..1])[0].len() as u64 + 1;
        let mut lines = json_lines(&rows[..4]);
        lines.push("not json".to_owned());
        write_spool_files(temp.path(), &[("spool-000001.jsonl", Some(lines))]);
        let max_bytes = row_bytes * 8;
        let mut spool: Spool = Spool::open(temp.path(), max_bytes).unwrap();
        spool.read_oldest(10).unwrap();
        spool.commit(4).unwrap();
        assert_eq!(spool.take_quarantined().len(), 1);
        assert!(spool.bytes() > row_bytes * 4, "the quarantined file still counts: {}", spool.bytes());
        spool.dead_letter(&rows[4..6], "bad").unwrap();
        let error = spool.append(&rows[6..8]).unwrap_err();
        assert!(matches!(error, SpoolError::Full { .. }), "{error}");
        let error = spool.dead_letter(&rows[6..8], "bad").unwrap_err();
        assert!(matches!(error, SpoolError::Full { .. }), "{error}");
        drop(spool);
        let reopened: Spool = Spool::open(temp.path(), max_bytes).unwrap();
        assert!(reopened.bytes() > row_bytes * 6, "counted again after a restart: {}", reopened.bytes());
    }

    #[test]
    fn a_spool_line_reads_without_its_optional_fields_and_with_fields_it_does_not_know() {
        let row = record(1);
        let mut value = serde_json::to_value(&row).unwrap();
        let object = value.as_object_mut().unwrap();
        for optional in ["error_message", "http_status", "error_class", "exchange_error", "instance"] {
            object.remove(optional);
        }
        object.insert("added_by_a_later_version".to_owned(), serde_json::json!({"any": 1}));
        let read: CallRecord = serde_json::from_value(value).unwrap();
        assert_eq!(read, CallRecord { http_status: None, instance: String::new(), ..row });
    }

    #[test]
    fn every_call_record_field_added_after_the_first_format_defaults_when_missing() {
        let row = CallRecord {
            success: false,
            error_message: Some("timed out".into()),
            error_class: Some("timeout".into()),
            exchange_error: Some("EService:Busy".into()),
            ..record(1)
        };
        assert_later_fields_default(&row, &CALL_FIRST_FORMAT);
    }

    #[test]
    fn rejected_rows_go_to_the_dead_letter_file_with_the_reason() {
        let temp = tempfile::tempdir().unwrap();
        let mut spool: Spool = Spool::open(temp.path(), 1 << 20).unwrap();
        let rows = records(0..2);
        spool.dead_letter(&rows, "value too long").unwrap();
        let contents = std::fs::read_to_string(temp.path().join(REJECTED_FILE)).unwrap();
        let lines: Vec<serde_json::Value> = contents.lines().map(|line| serde_json::from_str(line).unwrap()).collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[1]["error"], "value too long");
        assert_eq!(serde_json::from_value::<CallRecord>(lines[1]["record"].clone()).unwrap(), rows[1]);
        assert!(spool.is_empty(), "dead letters are not replayed");
    }
}
