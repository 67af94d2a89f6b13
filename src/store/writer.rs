//! The writer: takes the poll loop's rows without ever making it wait, and writes them to the database in batches,
//! in order, exactly once, across outages and restarts.
//!
//! [`Handle::push`] appends to an in-memory queue under a short lock and wakes the [`Writer`] task; it does no I/O
//! and never awaits. The writer batches by size (`batch_size`) and by time (`flush_interval`) into multi-row
//! inserts. While the database is unavailable it retries with exponential backoff and keeps accepting rows, and
//! moves them to the fsync'd [`Spool`] on disk one flush interval after they came, so a crash during an outage loses
//! at most that interval's rows; memory is also bounded by `memory_rows` and `memory_bytes` (past either, the oldest
//! rows move to the spool), so rows with huge error texts cannot grow it either. The order is an invariant: the batch being attempted is older than every spooled row, which are older
//! than every row in memory, so the writer always works spool first, then memory. Rows the database rejects go to
//! the dead-letter file. A row is dropped only when memory and the spool are both full (or the spool cannot be
//! written), and every drop is counted and logged.
//!
//! On shutdown the writer keeps writing for up to the grace period, then spools what is left for the next start.
//! The writer does not know SQL ([`Sink`] does) or where its settings come from (the caller converts them).

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::spool::{Quarantined, Spool, SpoolError};
use super::{CallRecord, Sink, WriteError};
use crate::telemetry;

/// The writer's settings: keys of the `[database]` section (`store::Config` holds them).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Config {
    /// The most rows in one insert; a full batch is written at once.
    pub batch_size: usize,
    /// How long a row may wait for its batch to fill.
    #[serde(serialize_with = "crate::clock::human_duration")]
    pub flush_interval: Duration,
    /// Rows kept in memory before the oldest move to the spool.
    pub memory_rows: usize,
    /// Bytes kept in memory (an estimate of the rows' size) before the oldest move to the spool: rows with long error
    /// texts reach this bound long before `memory_rows`.
    pub memory_bytes: u64,
    /// The spool's directory, created on first use.
    pub spool_dir: PathBuf,
    /// The spool's bound on disk; past it (and with memory full) new rows are dropped.
    pub spool_max_bytes: u64,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            batch_size: 500,
            flush_interval: Duration::from_secs(1),
            memory_rows: 10_000,
            memory_bytes: 8 * 1024 * 1024,
            spool_dir: PathBuf::from("exwatch-spool"),
            spool_max_bytes: 256 * 1024 * 1024,
        }
    }
}

/// The retry delay after the first failed write; it doubles up to [`BACKOFF_MAX`].
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Drops are logged at most this often, with the count since the last line, so an outage cannot flood the log.
const DROP_REPORT_INTERVAL: Duration = Duration::from_secs(1);
/// After the spool fails to write, spilling waits this long before trying again (each push past the bound would
/// otherwise retry and log).
const SPOOL_RETRY: Duration = Duration::from_secs(5);

/// Why rows were dropped: the `reason` label of `exwatch_store_dropped_rows_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// Memory was full and the spool was at its byte bound.
    BuffersFull,
    /// The spool could not be written and memory reached its hard limit (twice `memory_rows`).
    SpoolUnavailable,
    /// A spool line could not be read back (a torn last line after a crash, or corruption).
    UnreadableSpoolLine,
    /// Rows the database rejected could not be written to the dead-letter file either.
    DeadLetterFailed,
    /// A row pushed after the writer stopped.
    WriterStopped,
}

impl DropReason {
    const ALL: [DropReason; 5] = [
        DropReason::BuffersFull,
        DropReason::SpoolUnavailable,
        DropReason::UnreadableSpoolLine,
        DropReason::DeadLetterFailed,
        DropReason::WriterStopped,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::BuffersFull => "buffers_full",
            DropReason::SpoolUnavailable => "spool_unavailable",
            DropReason::UnreadableSpoolLine => "unreadable_spool_line",
            DropReason::DeadLetterFailed => "dead_letter_failed",
            DropReason::WriterStopped => "writer_stopped",
        }
    }
}

/// The `kind` label of write errors that come from the spool rather than the database.
const SPOOL_ERROR_KIND: &str = "spool";

/// The writer's metrics. Each method logs and counts one occurrence, so logs and metrics agree.
#[derive(Clone)]
pub struct Metrics {
    rows_written: IntCounter,
    batch_rows: Histogram,
    batch_duration: Histogram,
    buffered: IntGauge,
    buffered_bytes: IntGauge,
    spooled: IntGauge,
    dropped: IntCounterVec,
    rejected: IntCounter,
    quarantined: IntCounter,
    write_errors: IntCounterVec,
    database_up: IntGauge,
}

impl Metrics {
    pub fn new(registry: &Registry) -> Metrics {
        let rows_written = IntCounter::new("exwatch_store_rows_written_total", "Rows written to the database.")
            .expect("valid metric definition");
        let batch_rows = Histogram::with_opts(
            HistogramOpts::new("exwatch_store_batch_rows", "Rows per insert attempt.")
                .buckets(vec![1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0]),
        )
        .expect("valid metric definition");
        let batch_duration = Histogram::with_opts(
            HistogramOpts::new(
                "exwatch_store_batch_duration_seconds",
                "Latency of insert attempts, failed ones included.",
            )
            .buckets(vec![0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 30.0]),
        )
        .expect("valid metric definition");
        let buffered =
            IntGauge::new("exwatch_store_buffered_rows", "Rows waiting in memory, the batch in flight included.")
                .expect("valid metric definition");
        let buffered_bytes = IntGauge::new(
            "exwatch_store_buffered_bytes",
            "Estimated size of the rows waiting in memory, the batch in flight included.",
        )
        .expect("valid metric definition");
        let spooled = IntGauge::new("exwatch_store_spooled_rows", "Rows waiting in the on-disk spool.")
            .expect("valid metric definition");
        let dropped = IntCounterVec::new(
            Opts::new("exwatch_store_dropped_rows_total", "Rows lost before reaching the database, by reason."),
            &["reason"],
        )
        .expect("valid metric definition");
        let rejected = IntCounter::new(
            "exwatch_store_rejected_rows_total",
            "Rows the database refused, set aside in the spool's rejected.jsonl.",
        )
        .expect("valid metric definition");
        let quarantined = IntCounter::new(
            "exwatch_store_spool_quarantined_files_total",
            "Spool files moved aside into the spool's quarantine/ because they could not be read (wholly or in part).",
        )
        .expect("valid metric definition");
        let write_errors = IntCounterVec::new(
            Opts::new("exwatch_store_write_errors_total", "Failed insert attempts and spool writes, by kind."),
            &["kind"],
        )
        .expect("valid metric definition");
        let database_up = IntGauge::new(
            "exwatch_store_database_up",
            "1 when the last insert attempt reached the database (1 before the first attempt), else 0.",
        )
        .expect("valid metric definition");
        let metrics = Metrics {
            rows_written: telemetry::register(registry, rows_written),
            batch_rows: telemetry::register(registry, batch_rows),
            batch_duration: telemetry::register(registry, batch_duration),
            buffered: telemetry::register(registry, buffered),
            buffered_bytes: telemetry::register(registry, buffered_bytes),
            spooled: telemetry::register(registry, spooled),
            dropped: telemetry::register(registry, dropped),
            rejected: telemetry::register(registry, rejected),
            quarantined: telemetry::register(registry, quarantined),
            write_errors: telemetry::register(registry, write_errors),
            database_up: telemetry::register(registry, database_up),
        };
        // Every series exists at zero from the start, so rates and alerts are well defined.
        for reason in DropReason::ALL {
            metrics.dropped.with_label_values(&[reason.as_str()]);
        }
        for kind in [WriteError::Unavailable(String::new()).kind(), WriteError::Rejected(String::new()).kind()] {
            metrics.write_errors.with_label_values(&[kind]);
        }
        metrics.write_errors.with_label_values(&[SPOOL_ERROR_KIND]);
        metrics.database_up.set(1);
        metrics
    }

    fn batch_written(&self, rows: usize, duration: Duration, recovered: bool) {
        self.rows_written.inc_by(rows as u64);
        self.batch_rows.observe(rows as f64);
        self.batch_duration.observe(duration.as_secs_f64());
        self.database_up.set(1);
        if recovered {
            tracing::info!(rows, "Database writes recovered.");
        }
        tracing::debug!(rows, duration_ms = duration.as_millis() as u64, "Batch written.");
    }

    /// A failed attempt. Only the first failure of an outage is a warning: the retries repeat every few seconds.
    fn batch_failed(&self, rows: usize, duration: Duration, error: &WriteError, first: bool, retry_in: Duration) {
        self.batch_rows.observe(rows as f64);
        self.batch_duration.observe(duration.as_secs_f64());
        self.write_errors.with_label_values(&[error.kind()]).inc();
        let retry_in_ms = retry_in.as_millis() as u64;
        match error {
            WriteError::Unavailable(_) => {
                self.database_up.set(0);
                if first {
                    tracing::warn!(%error, rows, retry_in_ms, "Database unavailable; rows are kept and retried.");
                } else {
                    tracing::debug!(%error, rows, retry_in_ms, "Database still unavailable.");
                }
            }
            // The database answered, so it is up; the rows are isolated and set aside by `rows_rejected`.
            WriteError::Rejected(_) => {
                self.database_up.set(1);
                tracing::debug!(%error, rows, "Batch rejected; isolating the rejected rows.");
            }
        }
    }

    /// Rows the database refused; `dead_lettered` says whether they reached `rejected.jsonl` (if not, the failure
    /// is also logged and counted as a spool error and a drop).
    fn rows_rejected(&self, rows: &[CallRecord], error: &str, dead_lettered: bool) {
        self.rejected.inc_by(rows.len() as u64);
        let ids: Vec<String> = rows.iter().map(|row| row.id.to_string()).collect();
        tracing::error!(error, rows = rows.len(), ids = ?ids, dead_lettered, "Database rejected rows.");
    }

    fn rows_dropped(&self, rows: u64, reason: DropReason) {
        self.dropped.with_label_values(&[reason.as_str()]).inc_by(rows);
        tracing::warn!(rows, reason = reason.as_str(), "Rows dropped before reaching the database.");
    }

    /// A spool file moved aside: logged once, at ERROR, and counted.
    fn file_quarantined(&self, file: &Quarantined) {
        self.quarantined.inc();
        file.log("call_log");
    }

    fn spool_failed(&self, error: &SpoolError) {
        self.write_errors.with_label_values(&[SPOOL_ERROR_KIND]).inc();
        tracing::error!(%error, "Spool write failed; rows stay in memory.");
    }

    fn spool_full(&self, error: &SpoolError) {
        tracing::warn!(%error, "Spool full; new rows are dropped while memory is full too.");
    }

    fn spool_found(&self, rows: usize, bytes: u64, dir: &std::path::Path) {
        tracing::info!(rows, bytes, dir = %dir.display(), "Rows spooled by an earlier run are written first.");
    }

    fn levels(&self, buffered: usize, buffered_bytes: u64, spooled: usize) {
        self.buffered.set(buffered as i64);
        self.buffered_bytes.set(i64::try_from(buffered_bytes).unwrap_or(i64::MAX));
        self.spooled.set(spooled as i64);
    }
}

/// The writer's state for `/health`'s informational body. A database outage never fails liveness.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Status {
    /// Whether the last insert attempt reached the database (true before the first attempt).
    pub database_up: bool,
    /// Rows in memory, the batch in flight included.
    pub buffered: usize,
    pub spooled: usize,
    /// The error of the last failed attempt, cleared by the next success.
    pub last_error: Option<String>,
    /// The kind and time of the last failed attempt, cleared with `last_error`: what the unauthenticated `/health`
    /// shows, since the error's text names hosts, databases and server messages.
    pub last_failure: Option<Failure>,
}

/// The kind ([`WriteError::kind`]) and wall-clock time of a failed write attempt.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Failure {
    pub kind: &'static str,
    pub at: chrono::DateTime<chrono::Utc>,
}

/// What a run did, for the shutdown log and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunSummary {
    pub written: u64,
    pub rejected: u64,
    /// Rows left in the spool for the next start.
    pub spooled_at_exit: usize,
    /// Rows dropped during the run, every reason included.
    pub dropped: u64,
}

/// The memory queue and the drops not yet reported.
#[derive(Debug, Default)]
struct Queue {
    rows: VecDeque<CallRecord>,
    /// The rows' estimated size ([`CallRecord::memory_bytes`]), bounded like their number.
    bytes: u64,
    /// When the oldest row in memory was pushed, at the latest: set when a push finds the queue empty, moved up
    /// when the writer takes rows off the front. While the database is away, memory is spooled one flush interval
    /// after this.
    oldest_at: Option<Instant>,
    /// Set when the writer has stopped: later pushes are dropped and counted instead of piling up unseen.
    closed: bool,
    unreported_drops: [u64; DropReason::ALL.len()],
    last_drop_report: Option<Instant>,
}

/// What the handles and the writer task share.
struct Shared {
    queue: Mutex<Queue>,
    wake: Notify,
    batch_size: usize,
    memory_rows: usize,
    /// Memory's hard limit when the spool cannot take rows: the writer normally keeps memory at `memory_rows` by
    /// spooling, and this bounds memory when the disk fails.
    hard_limit: usize,
    /// The same two bounds in bytes ([`CallRecord::memory_bytes`]), the batch in flight from memory included.
    memory_bytes: u64,
    hard_limit_bytes: u64,
    /// Set by the writer when the spool refused an append for lack of room, cleared when it frees space.
    spool_full: AtomicBool,
    /// Memory rows taken into the batch in flight, counted as buffered.
    in_flight_from_memory: AtomicUsize,
    in_flight_bytes: AtomicU64,
    spooled: AtomicUsize,
    database_up: AtomicBool,
    last_error: Mutex<Option<String>>,
    last_failure: Mutex<Option<Failure>>,
    dropped: AtomicU64,
    metrics: Metrics,
}

impl Queue {
    /// Takes up to `count` rows off the front. The rows left keep the older bound on when they were pushed.
    fn take_front(&mut self, count: usize) -> Vec<CallRecord> {
        let taken: Vec<CallRecord> = self.rows.drain(..count.min(self.rows.len())).collect();
        self.bytes = self.bytes.saturating_sub(taken.iter().map(CallRecord::memory_bytes).sum());
        if self.rows.is_empty() {
            self.bytes = 0;
            self.oldest_at = None;
        }
        taken
    }
}

impl Shared {
    fn queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn buffered(&self, memory_rows: usize) -> usize {
        memory_rows + self.in_flight_from_memory.load(Ordering::Relaxed)
    }

    fn buffered_bytes(&self, memory_bytes: u64) -> u64 {
        memory_bytes + self.in_flight_bytes.load(Ordering::Relaxed)
    }

    /// The batch in flight that came from memory (its rows still count as buffered), or none.
    fn set_in_flight(&self, rows: usize, bytes: u64) {
        self.in_flight_from_memory.store(rows, Ordering::Relaxed);
        self.in_flight_bytes.store(bytes, Ordering::Relaxed);
    }

    /// Records drops under the queue lock; they are logged and counted by `report_drops`.
    fn note_drop(queue: &mut Queue, reason: DropReason, rows: u64) {
        if let Some(index) = DropReason::ALL.iter().position(|known| *known == reason) {
            queue.unreported_drops[index] += rows;
        }
    }

    /// Logs and counts the drops noted since the last report, at most once per [`DROP_REPORT_INTERVAL`] unless
    /// `force`. The lock is released before logging.
    fn report_drops(&self, force: bool) {
        let now = Instant::now();
        let drops = {
            let mut queue = self.queue();
            let due = queue.last_drop_report.is_none_or(|last| now.duration_since(last) >= DROP_REPORT_INTERVAL);
            if !(force || due) || queue.unreported_drops.iter().all(|count| *count == 0) {
                return;
            }
            queue.last_drop_report = Some(now);
            std::mem::take(&mut queue.unreported_drops)
        };
        for (reason, rows) in DropReason::ALL.into_iter().zip(drops) {
            if rows > 0 {
                self.dropped.fetch_add(rows, Ordering::Relaxed);
                self.metrics.rows_dropped(rows, reason);
            }
        }
    }
}

/// The poll loop's side of the writer. Cheap to clone.
#[derive(Clone)]
pub struct Handle {
    shared: Arc<Shared>,
}

impl Handle {
    /// Queues a row for writing. Never waits on the database or the disk: it appends to memory under a short lock
    /// and wakes the writer, which spools the overflow. The row is dropped (counted, logged at most once a second)
    /// only when memory is full and the spool is full or failing, or the writer has stopped.
    pub fn push(&self, record: CallRecord) {
        let shared = &self.shared;
        let bytes = record.memory_bytes();
        let mut queue = shared.queue();
        let length = queue.rows.len();
        let held = shared.buffered_bytes(queue.bytes) + bytes;
        let memory_full = length >= shared.memory_rows || held > shared.memory_bytes;
        let drop_reason = if queue.closed {
            Some(DropReason::WriterStopped)
        } else if memory_full && shared.spool_full.load(Ordering::Relaxed) {
            Some(DropReason::BuffersFull)
        } else if length >= shared.hard_limit || held > shared.hard_limit_bytes {
            Some(DropReason::SpoolUnavailable)
        } else {
            None
        };
        if let Some(reason) = drop_reason {
            Shared::note_drop(&mut queue, reason, 1);
            drop(queue);
            shared.report_drops(false);
            return;
        }
        queue.rows.push_back(record);
        queue.bytes += bytes;
        queue.oldest_at.get_or_insert_with(Instant::now);
        let length = length + 1;
        drop(queue);
        shared.metrics.buffered.set(shared.buffered(length) as i64);
        shared.metrics.buffered_bytes.set(i64::try_from(held).unwrap_or(i64::MAX));
        // Wake the writer for what it acts on (a first row starts the flush timer, a full batch is written, an
        // overflow is spooled), not for every row.
        if length == 1 || length >= shared.batch_size || memory_full {
            shared.wake.notify_one();
        }
    }

    pub fn status(&self) -> Status {
        let shared = &self.shared;
        let memory_rows = shared.queue().rows.len();
        Status {
            database_up: shared.database_up.load(Ordering::Relaxed),
            buffered: shared.buffered(memory_rows),
            spooled: shared.spooled.load(Ordering::Relaxed),
            last_error: shared.last_error.lock().unwrap_or_else(PoisonError::into_inner).clone(),
            last_failure: shared.last_failure.lock().unwrap_or_else(PoisonError::into_inner).clone(),
        }
    }
}

/// Where the batch being attempted came from, which decides what a success removes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// The spool's oldest rows: a success commits them there.
    Spool,
    /// Taken out of memory while the spool was empty.
    Memory,
}

/// The rows being attempted, oldest first. A rejected chunk is split in two until the rejected rows are isolated.
#[derive(Debug)]
struct Pending {
    chunks: VecDeque<Vec<CallRecord>>,
    source: Source,
}

impl Pending {
    fn rows(&self) -> usize {
        self.chunks.iter().map(Vec::len).sum()
    }

    fn bytes(&self) -> u64 {
        self.chunks.iter().flatten().map(CallRecord::memory_bytes).sum()
    }

    fn all_rows(&self) -> Vec<CallRecord> {
        self.chunks.iter().flatten().cloned().collect()
    }
}

/// How an attempt ended, for the main loop.
enum Attempt {
    /// Written or set aside: go on with the next rows.
    Done,
    /// The database is unavailable: wait before trying again.
    Retry,
    /// The grace period ran out with the attempt in flight.
    OutOfTime,
}

/// What the spool looked like after an operation, so the writer publishes it without taking the lock itself.
struct SpoolLevels {
    rows: usize,
    bytes: u64,
    unreadable_lines: u64,
    quarantined: Vec<Quarantined>,
}

/// The writer task. Create it with [`Writer::new`] and drive it with [`Writer::run`].
pub struct Writer {
    config: Config,
    sink: Arc<dyn Sink>,
    shared: Arc<Shared>,
    /// Used only from this task, but on the blocking pool, hence the lock.
    spool: Arc<Mutex<Spool>>,
    spool_bytes: u64,
    spool_retry_at: Option<Instant>,
    pending: Option<Pending>,
    /// When the insert in flight started.
    attempt_started: Option<Instant>,
    /// No attempt before this instant: the backoff after an unavailable database or an unreadable spool.
    retry_at: Option<Instant>,
    flush_deadline: Option<Instant>,
    drain_deadline: Option<Instant>,
    backoff: Duration,
    written: u64,
    rejected: u64,
}

impl Writer {
    /// Opens the spool (a previous run's rows are written before any new one) and creates the writer and its handle.
    /// Fails only if the spool directory exists but cannot be read. It reads the spool's files to count their lines,
    /// so call it at start-up, before the poll loops run.
    pub fn new(config: Config, sink: Arc<dyn Sink>, metrics: Metrics) -> Result<(Writer, Handle), SpoolError> {
        let mut spool: Spool = Spool::open(&config.spool_dir, config.spool_max_bytes)?;
        let unreadable = spool.take_unreadable_lines();
        for file in spool.take_quarantined() {
            metrics.file_quarantined(&file);
        }
        if !spool.is_empty() {
            metrics.spool_found(spool.len_rows(), spool.bytes(), spool.dir());
        }
        metrics.levels(0, 0, spool.len_rows());
        let batch_size = config.batch_size.max(1);
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            wake: Notify::new(),
            batch_size,
            memory_rows: config.memory_rows,
            hard_limit: config.memory_rows.saturating_mul(2).max(batch_size),
            memory_bytes: config.memory_bytes,
            hard_limit_bytes: config.memory_bytes.saturating_mul(2),
            spool_full: AtomicBool::new(false),
            in_flight_from_memory: AtomicUsize::new(0),
            in_flight_bytes: AtomicU64::new(0),
            spooled: AtomicUsize::new(spool.len_rows()),
            database_up: AtomicBool::new(true),
            last_error: Mutex::new(None),
            last_failure: Mutex::new(None),
            dropped: AtomicU64::new(0),
            metrics,
        });
        if unreadable > 0 {
            Shared::note_drop(&mut shared.queue(), DropReason::UnreadableSpoolLine, unreadable);
            shared.report_drops(true);
        }
        let writer = Writer {
            config: Config { batch_size, ..config },
            sink,
            shared: Arc::clone(&shared),
            spool_bytes: spool.bytes(),
            spool: Arc::new(Mutex::new(spool)),
            spool_retry_at: None,
            pending: None,
            attempt_started: None,
            retry_at: None,
            flush_deadline: None,
            drain_deadline: None,
            backoff: BACKOFF_MIN,
            written: 0,
            rejected: 0,
        };
        Ok((writer, Handle { shared }))
    }

    /// Writes until `cancel` fires, then for up to `grace` more while rows remain, then spools the rest for the next
    /// start. A batch in flight when the grace period ends is abandoned and spooled (it may have been written:
    /// inserts are idempotent).
    pub async fn run(mut self, cancel: CancellationToken, grace: Duration) -> RunSummary {
        loop {
            self.shared.report_drops(false);
            self.spill_overflow().await;
            self.spill_when_away().await;
            if self.drain_deadline.is_none() && cancel.is_cancelled() {
                self.start_draining(grace);
            }
            if let Some(deadline) = self.drain_deadline
                && (Instant::now() >= deadline || self.is_idle())
            {
                break;
            }
            // Pushes wake the loop during a backoff (to spool overflow), but never shorten it.
            if let Some(retry_at) = self.retry_at {
                if Instant::now() < retry_at {
                    self.wait(Some(retry_at), &cancel, grace).await;
                    continue;
                }
                self.retry_at = None;
            }
            if self.pending.is_none() && !self.take_batch(&cancel, grace).await {
                continue;
            }
            match self.attempt(&cancel, grace).await {
                Attempt::Done => self.backoff = BACKOFF_MIN,
                Attempt::Retry => {
                    self.retry_at = Some(Instant::now() + self.backoff);
                    self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
                }
                Attempt::OutOfTime => break,
            }
        }
        self.finish().await
    }

    fn start_draining(&mut self, grace: Duration) {
        let status = Handle { shared: Arc::clone(&self.shared) }.status();
        tracing::info!(
            grace_ms = grace.as_millis() as u64,
            buffered = status.buffered,
            spooled = status.spooled,
            "Writer draining before shutdown."
        );
        self.drain_deadline = Some(Instant::now() + grace);
    }

    fn is_idle(&self) -> bool {
        self.pending.is_none()
            && self.shared.spooled.load(Ordering::Relaxed) == 0
            && self.shared.queue().rows.is_empty()
    }

    /// Sleeps until `until` (or indefinitely), waking early for pushes (to spool an overflow or write a full batch),
    /// for cancellation and for the end of the grace period.
    async fn wait(&mut self, until: Option<Instant>, cancel: &CancellationToken, grace: Duration) {
        let draining = self.drain_deadline.is_some();
        let deadline = [until, self.drain_deadline, self.spill_due()].into_iter().flatten().min();
        tokio::select! {
            () = self.shared.wake.notified() => {}
            () = cancel.cancelled(), if !draining => self.start_draining(grace),
            () = sleep_until_or_forever(deadline) => {}
        }
    }

    /// Chooses the next batch: the spool's oldest rows if there are any, else memory's once a batch is full, the
    /// flush interval has passed or the writer is draining. Returns false when there is nothing to do yet (after
    /// waiting for something to change).
    async fn take_batch(&mut self, cancel: &CancellationToken, grace: Duration) -> bool {
        if self.shared.spooled.load(Ordering::Relaxed) > 0 {
            let batch_size = self.config.batch_size;
            match self.on_spool(move |spool| spool.read_oldest(batch_size)).await {
                Ok(rows) if rows.is_empty() => return false,
                Ok(rows) => {
                    self.pending = Some(Pending { chunks: VecDeque::from([rows]), source: Source::Spool });
                    return true;
                }
                Err(error) => {
                    // The spool's rows come first, so the writer cannot go on without them: retry after a pause.
                    self.shared.metrics.spool_failed(&error);
                    self.retry_at = Some(Instant::now() + SPOOL_RETRY);
                    return false;
                }
            }
        }
        let now = Instant::now();
        let rows = {
            let mut queue = self.shared.queue();
            let length = queue.rows.len();
            if length == 0 {
                self.flush_deadline = None;
                None
            } else {
                let deadline = *self.flush_deadline.get_or_insert(now + self.config.flush_interval);
                if length >= self.config.batch_size || now >= deadline || self.drain_deadline.is_some() {
                    let taken = queue.take_front(self.config.batch_size);
                    if queue.rows.is_empty() || now >= deadline {
                        self.flush_deadline = None;
                    }
                    Some(taken)
                } else {
                    None
                }
            }
        };
        match rows {
            Some(rows) => {
                let pending = Pending { chunks: VecDeque::from([rows]), source: Source::Memory };
                self.shared.set_in_flight(pending.rows(), pending.bytes());
                self.pending = Some(pending);
                true
            }
            None => {
                self.wait(self.flush_deadline, cancel, grace).await;
                false
            }
        }
    }

    /// Attempts the first chunk of the pending batch. While the insert is in flight the writer still spools
    /// overflow, so a hanging database cannot make memory grow past its bound.
    async fn attempt(&mut self, cancel: &CancellationToken, grace: Duration) -> Attempt {
        let Some(chunk) = self.pending.as_ref().and_then(|pending| pending.chunks.front()) else {
            return Attempt::Done;
        };
        let rows = chunk.clone();
        let count = rows.len();
        let sink = Arc::clone(&self.sink);
        let insert = async move {
            let started = Instant::now();
            let result = sink.insert_batch(&rows).await;
            (result, started.elapsed())
        };
        tokio::pin!(insert);
        self.attempt_started = Some(Instant::now());
        let (result, duration) = loop {
            let draining = self.drain_deadline.is_some();
            let spill_due = self.spill_due();
            tokio::select! {
                outcome = &mut insert => break outcome,
                () = self.shared.wake.notified() => self.spill_overflow().await,
                () = sleep_until_or_forever(spill_due) => self.spill_when_away().await,
                () = cancel.cancelled(), if !draining => self.start_draining(grace),
                () = sleep_until_or_forever(self.drain_deadline) => {
                    self.attempt_started = None;
                    return Attempt::OutOfTime;
                }
            }
        };
        self.attempt_started = None;
        match result {
            Ok(()) => {
                let recovered = !self.shared.database_up.swap(true, Ordering::Relaxed);
                *self.shared.last_error.lock().unwrap_or_else(PoisonError::into_inner) = None;
                *self.shared.last_failure.lock().unwrap_or_else(PoisonError::into_inner) = None;
                self.written += count as u64;
                self.shared.metrics.batch_written(count, duration, recovered);
                self.finish_chunk().await;
                Attempt::Done
            }
            Err(error) => {
                let first = match error {
                    WriteError::Unavailable(_) => self.shared.database_up.swap(false, Ordering::Relaxed),
                    // A rejection is an answer: the database is up.
                    WriteError::Rejected(_) => {
                        self.shared.database_up.store(true, Ordering::Relaxed);
                        false
                    }
                };
                *self.shared.last_error.lock().unwrap_or_else(PoisonError::into_inner) = Some(error.to_string());
                *self.shared.last_failure.lock().unwrap_or_else(PoisonError::into_inner) =
                    Some(Failure { kind: error.kind(), at: chrono::Utc::now() });
                self.shared.metrics.batch_failed(count, duration, &error, first, self.backoff);
                match error {
                    WriteError::Unavailable(_) => Attempt::Retry,
                    WriteError::Rejected(message) => {
                        self.isolate_rejected(message).await;
                        Attempt::Done
                    }
                }
            }
        }
    }

    /// Splits a rejected chunk in two so the next attempts find the bad rows, and sets a single rejected row aside
    /// in the dead-letter file. About `2 log2(batch)` attempts per bad row.
    async fn isolate_rejected(&mut self, message: String) {
        let Some(pending) = self.pending.as_mut() else {
            return;
        };
        let Some(chunk) = pending.chunks.front_mut() else {
            return;
        };
        if chunk.len() > 1 {
            let second_half = chunk.split_off(chunk.len() / 2);
            pending.chunks.insert(1, second_half);
            return;
        }
        let rows = chunk.clone();
        let count = rows.len() as u64;
        self.rejected += count;
        let (rows_for_spool, message_for_spool) = (rows.clone(), message.clone());
        let dead_lettered = self.on_spool(move |spool| spool.dead_letter(&rows_for_spool, &message_for_spool)).await;
        self.shared.metrics.rows_rejected(&rows, &message, dead_lettered.is_ok());
        if let Err(error) = dead_lettered {
            self.shared.metrics.spool_failed(&error);
            Shared::note_drop(&mut self.shared.queue(), DropReason::DeadLetterFailed, count);
            self.shared.report_drops(true);
        }
        self.finish_chunk().await;
    }

    /// Removes the first chunk once it is written or set aside, committing it in the spool if it came from there.
    async fn finish_chunk(&mut self) {
        let Some(pending) = self.pending.as_mut() else {
            return;
        };
        let Some(chunk) = pending.chunks.pop_front() else {
            return;
        };
        let source = pending.source;
        if pending.chunks.is_empty() {
            self.pending = None;
        }
        match source {
            Source::Memory => {
                let remaining = self.pending.as_ref().map_or((0, 0), |pending| (pending.rows(), pending.bytes()));
                self.shared.set_in_flight(remaining.0, remaining.1);
            }
            Source::Spool => {
                let count = chunk.len();
                if let Err(error) = self.on_spool(move |spool| spool.commit(count)).await {
                    // The rows are written; at worst they are written again, which inserts skip.
                    self.shared.metrics.spool_failed(&error);
                }
            }
        }
        self.publish_levels();
    }

    /// Moves the oldest memory rows to the spool when memory holds more than `memory_rows` or `memory_bytes`,
    /// down to `memory_rows` less one batch and half of `memory_bytes`, so each fsync carries a batch rather than a
    /// row.
    async fn spill_overflow(&mut self) {
        let over = {
            let queue = self.shared.queue();
            queue.rows.len() > self.config.memory_rows
                || self.shared.buffered_bytes(queue.bytes) > self.config.memory_bytes
        };
        if over {
            let low_water = self.config.memory_rows.saturating_sub(self.config.batch_size);
            self.spill(low_water, self.config.memory_bytes / 2).await;
        }
    }

    /// While the database is away, memory goes to the spool one flush interval after its oldest row was pushed,
    /// so a crash loses at most that interval's rows. The database counts as away once an insert has failed as
    /// unavailable, or an insert has been in flight for a whole flush interval (a hung connection).
    async fn spill_when_away(&mut self) {
        if self.spill_due().is_some_and(|due| Instant::now() >= due) {
            self.spill(0, 0).await;
        }
    }

    /// When memory is due to be spooled (see [`Writer::spill_when_away`]), or `None` while the database takes rows
    /// or the spool cannot take them.
    fn spill_due(&self) -> Option<Instant> {
        if self.shared.spool_full.load(Ordering::Relaxed) {
            return None;
        }
        let from_memory = self.pending.as_ref().is_some_and(|pending| pending.source == Source::Memory);
        let oldest = self.shared.queue().oldest_at;
        let due = if !self.shared.database_up.load(Ordering::Relaxed) {
            if from_memory {
                // The batch that failed was taken at its flush deadline: it is due now.
                Instant::now()
            } else {
                oldest? + self.config.flush_interval
            }
        } else {
            // While an insert is in flight, what memory holds waits for it one flush interval, no longer.
            let started = self.attempt_started?;
            let since = match oldest {
                Some(oldest) => started.max(oldest),
                None if from_memory => started,
                None => return None,
            };
            since + self.config.flush_interval
        };
        Some(match self.spool_retry_at {
            Some(retry_at) => due.max(retry_at),
            None => due,
        })
    }

    /// Moves memory's oldest rows to the spool until at most `keep_rows` and `keep_bytes` are left. A batch in
    /// flight from memory goes to the spool first (it is older than everything in memory), after which a success
    /// commits it there.
    async fn spill(&mut self, keep_rows: usize, keep_bytes: u64) {
        if self.shared.spool_full.load(Ordering::Relaxed)
            || self.spool_retry_at.is_some_and(|retry_at| Instant::now() < retry_at)
        {
            return;
        }
        if let Some(pending) = self.pending.as_ref().filter(|pending| pending.source == Source::Memory) {
            // The spool is empty while a batch from memory is pending, so these rows become its head.
            let rows = pending.all_rows();
            if !self.append_to_spool(rows).await {
                return;
            }
            if let Some(pending) = self.pending.as_mut() {
                pending.source = Source::Spool;
            }
            self.shared.set_in_flight(0, 0);
        }
        loop {
            let rows: Vec<CallRecord> = {
                let queue = self.shared.queue();
                // The oldest rows, one batch at most, until what is left is within both bounds.
                let (mut rows_left, mut bytes_left) = (queue.rows.len(), queue.bytes);
                let mut chunk = Vec::new();
                for row in &queue.rows {
                    if (rows_left <= keep_rows && bytes_left <= keep_bytes) || chunk.len() >= self.config.batch_size {
                        break;
                    }
                    rows_left -= 1;
                    bytes_left = bytes_left.saturating_sub(row.memory_bytes());
                    chunk.push(row.clone());
                }
                chunk
            };
            if rows.is_empty() {
                break;
            }
            let count = rows.len();
            if !self.append_to_spool(rows).await {
                break;
            }
            // Only this task removes rows from the front of the queue, so the front is still these rows.
            self.shared.queue().take_front(count);
        }
        self.publish_levels();
    }

    /// Appends rows to the spool. Returns false (the caller keeps the rows) when the spool is full or failing.
    async fn append_to_spool(&mut self, rows: Vec<CallRecord>) -> bool {
        match self.on_spool(move |spool| spool.append(&rows)).await {
            Ok(()) => true,
            Err(error @ SpoolError::Full { .. }) => {
                if !self.shared.spool_full.swap(true, Ordering::Relaxed) {
                    self.shared.metrics.spool_full(&error);
                }
                false
            }
            Err(error) => {
                self.shared.metrics.spool_failed(&error);
                self.spool_retry_at = Some(Instant::now() + SPOOL_RETRY);
                false
            }
        }
    }

    /// Runs a spool operation on the blocking pool (file I/O and fsync must not stall the runtime), then publishes
    /// the spool's levels and reports unreadable lines as drops.
    async fn on_spool<T, F>(&mut self, operation: F) -> Result<T, SpoolError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Spool) -> Result<T, SpoolError> + Send + 'static,
    {
        let spool = Arc::clone(&self.spool);
        let joined = tokio::task::spawn_blocking(move || {
            let mut spool = spool.lock().unwrap_or_else(PoisonError::into_inner);
            let result = operation(&mut spool);
            let levels = SpoolLevels {
                rows: spool.len_rows(),
                bytes: spool.bytes(),
                unreadable_lines: spool.take_unreadable_lines(),
                quarantined: spool.take_quarantined(),
            };
            (result, levels)
        })
        .await;
        let (result, levels) = match joined {
            Ok(done) => done,
            Err(error) => {
                let source = std::io::Error::other(format!("spool task failed: {error}"));
                return Err(SpoolError::Io { path: self.config.spool_dir.clone(), source });
            }
        };
        if levels.bytes < self.spool_bytes {
            self.shared.spool_full.store(false, Ordering::Relaxed);
        }
        self.spool_bytes = levels.bytes;
        self.shared.spooled.store(levels.rows, Ordering::Relaxed);
        for file in &levels.quarantined {
            self.shared.metrics.file_quarantined(file);
        }
        if levels.unreadable_lines > 0 {
            Shared::note_drop(&mut self.shared.queue(), DropReason::UnreadableSpoolLine, levels.unreadable_lines);
            self.shared.report_drops(true);
        }
        result
    }

    fn publish_levels(&self) {
        let (memory_rows, memory_bytes) = {
            let queue = self.shared.queue();
            (queue.rows.len(), queue.bytes)
        };
        let shared = &self.shared;
        shared.metrics.levels(
            shared.buffered(memory_rows),
            shared.buffered_bytes(memory_bytes),
            shared.spooled.load(Ordering::Relaxed),
        );
    }

    /// Spools what is left (the batch in flight from memory first, then memory, in order) and closes the queue, so
    /// later pushes are counted as dropped instead of waiting for a writer that is gone.
    async fn finish(mut self) -> RunSummary {
        let mut rows = match self.pending.take() {
            Some(pending) if pending.source == Source::Memory => pending.all_rows(),
            _ => Vec::new(),
        };
        self.shared.set_in_flight(0, 0);
        {
            let mut queue = self.shared.queue();
            queue.closed = true;
            let length = queue.rows.len();
            rows.extend(queue.take_front(length));
        }
        let mut remaining = VecDeque::from(rows);
        while !remaining.is_empty() {
            let chunk: Vec<CallRecord> = remaining.drain(..remaining.len().min(self.config.batch_size)).collect();
            let count = chunk.len();
            let appended = self.on_spool(move |spool| spool.append(&chunk)).await;
            if let Err(error) = appended {
                let reason = match error {
                    SpoolError::Full { .. } => {
                        self.shared.metrics.spool_full(&error);
                        DropReason::BuffersFull
                    }
                    _ => {
                        self.shared.metrics.spool_failed(&error);
                        DropReason::SpoolUnavailable
                    }
                };
                let lost = (count + remaining.len()) as u64;
                Shared::note_drop(&mut self.shared.queue(), reason, lost);
                break;
            }
        }
        self.shared.report_drops(true);
        self.publish_levels();
        let summary = RunSummary {
            written: self.written,
            rejected: self.rejected,
            spooled_at_exit: self.shared.spooled.load(Ordering::Relaxed),
            dropped: self.shared.dropped.load(Ordering::Relaxed),
        };
        tracing::info!(
            written = summary.written,
            rejected = summary.rejected,
            spooled_at_exit = summary.spooled_at_exit,
            dropped = summary.dropped,
            "Writer stopped."
        );
        summary
    }
}

async fn sleep_until_or_forever(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::path::Path;

    use uuid::Uuid;

    use super::*;
    use crate::store::spool::tests::{json_lines, record, records, spool_files, write_spool_files};
    use crate::store::spool::{QUARANTINE_DIR, REJECTED_FILE};

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Mode {
        Up,
        Unavailable,
        Hang,
    }

    /// A database that records the batches it accepts, can be down or hang, and rejects the rows it is told to.
    struct FakeSink {
        mode: Mutex<Mode>,
        batches: Mutex<Vec<Vec<CallRecord>>>,
        attempts: AtomicUsize,
        rejected_ids: Mutex<HashSet<Uuid>>,
    }

    impl FakeSink {
        fn new(mode: Mode) -> Arc<FakeSink> {
            Arc::new(FakeSink {
                mode: Mutex::new(mode),
                batches: Mutex::new(Vec::new()),
                attempts: AtomicUsize::new(0),
                rejected_ids: Mutex::new(HashSet::new()),
            })
        }

        fn set(&self, mode: Mode) {
            *self.mode.lock().unwrap() = mode;
        }

        fn batch_sizes(&self) -> Vec<usize> {
            self.batches.lock().unwrap().iter().map(Vec::len).collect()
        }

        fn written(&self) -> Vec<CallRecord> {
            self.batches.lock().unwrap().iter().flatten().cloned().collect()
        }
    }

    #[async_trait::async_trait]
    impl Sink for FakeSink {
        async fn insert_batch(&self, rows: &[CallRecord]) -> Result<(), WriteError> {
            self.attempts.fetch_add(1, Ordering::SeqCst);
            let mode = *self.mode.lock().unwrap();
            match mode {
                Mode::Hang => std::future::pending().await,
                Mode::Unavailable => Err(WriteError::Unavailable("connection refused".into())),
                Mode::Up => {
                    let rejected = self.rejected_ids.lock().unwrap();
                    if rows.iter().any(|row| rejected.contains(&row.id)) {
                        return Err(WriteError::Rejected("value too long for type".into()));
                    }
                    self.batches.lock().unwrap().push(rows.to_vec());
                    Ok(())
                }
            }
        }
    }

    fn config(dir: &Path) -> Config {
        Config { spool_dir: dir.join("spool"), batch_size: 500, ..Config::default() }
    }

    struct Running {
        handle: Handle,
        registry: Registry,
        cancel: CancellationToken,
        task: tokio::task::JoinHandle<RunSummary>,
    }

    impl Running {
        async fn stop(self) -> RunSummary {
            self.cancel.cancel();
            self.task.await.unwrap()
        }
    }

    fn start(config: Config, sink: Arc<FakeSink>, grace: Duration) -> Running {
        let registry = Registry::new();
        let (writer, handle) = Writer::new(config, sink, Metrics::new(&registry)).unwrap();
        let cancel = CancellationToken::new();
        let task = tokio::spawn(writer.run(cancel.clone(), grace));
        Running { handle, registry, cancel, task }
    }

    fn sample(registry: &Registry, name: &str, labels: &[(&str, &str)]) -> f64 {
        telemetry::sample(&telemetry::encode(registry).unwrap(), name, labels).unwrap_or(f64::NAN)
    }

    /// Waits (on the paused clock) until `check` holds, failing after a minute of simulated time.
    async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !check() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn ids(rows: &[CallRecord]) -> Vec<Uuid> {
        rows.iter().map(|row| row.id).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn a_partial_batch_waits_for_the_flush_interval_and_full_batches_go_at_once() {
        let temp = tempfile::tempdir().unwrap();
        let sink = FakeSink::new(Mode::Up);
        let running = start(config(temp.path()), sink.clone(), Duration::from_secs(5));
        for row in records(0..3) {
            running.handle.push(row);
        }
        tokio::time::sleep(Duration::from_millis(990)).await;
        assert!(sink.batch_sizes().is_empty(), "three rows wait for the flush interval");
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(sink.batch_sizes(), vec![3]);

        for row in records(0..1000) {
            running.handle.push(row);
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(sink.batch_sizes(), vec![3, 500, 500], "full batches do not wait");
        assert_eq!(sample(&running.registry, "exwatch_store_rows_written_total", &[]), 1003.0);
        assert_eq!(sample(&running.registry, "exwatch_store_batch_rows_count", &[]), 3.0);
        let summary = running.stop().await;
        assert_eq!(summary, RunSummary { written: 1003, rejected: 0, spooled_at_exit: 0, dropped: 0 });
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_writes_a_partial_batch_without_waiting_for_the_interval() {
        let temp = tempfile::tempdir().unwrap();
        let sink = FakeSink::new(Mode::Up);
        let running = start(config(temp.path()), sink.clone(), Duration::from_secs(5));
        let rows = records(0..7);
        for row in rows.clone() {
            running.handle.push(row);
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
        let started = Instant::now();
        let summary = running.stop().await;
        assert!(started.elapsed() < Duration::from_millis(100));
        assert_eq!(summary.written, 7);
        assert_eq!(ids(&sink.written()), ids(&rows));
    }

    #[tokio::test(start_paused = true)]
    async fn push_never_waits_on_a_hanging_database_and_memory_stays_bounded() {
        let temp = tempfile::tempdir().unwrap();
        let sink = FakeSink::new(Mode::Hang);
        let config = Config { memory_rows: 1000, ..config(temp.path()) };
        let running = start(config, sink.clone(), Duration::from_secs(1));
        // `push` is not async: 100k calls in a row cannot wait on anything. The writer cannot run during the loop
        // (one thread), so past twice `memory_rows` the rows are dropped, counted, not piled up.
        for row in records(0..100_000) {
            running.handle.push(row);
        }
        let status = running.handle.status();
        assert_eq!(status.buffered, 2000);
        assert!(status.database_up, "no attempt has failed yet");
        running.handle.shared.report_drops(true);
        let dropped_label = [("reason", "spool_unavailable")];
        assert_eq!(sample(&running.registry, "exwatch_store_dropped_rows_total", &dropped_label), 98_000.0);

        // Given the chance, the writer spools the overflow even though its insert never returns.
        eventually("overflow spooled", || running.handle.status().buffered <= 1000).await;
        for round in 0..10 {
            for row in records(round * 1000..(round + 1) * 1000) {
                running.handle.push(row);
            }
            eventually("overflow spooled", || running.handle.status().buffered <= 1000).await;
        }
        let status = running.handle.status();
        assert_eq!(status.buffered + status.spooled, 12_000, "nothing lost once the writer could run");
        assert_eq!(sink.attempts.load(Ordering::SeqCst), 1, "one insert, still hanging");

        // Shutdown abandons the hanging insert after the grace period and spools everything.
        let started = Instant::now();
        let summary = running.stop().await;
        assert!(started.elapsed() <= Duration::from_millis(1100));
        assert_eq!(summary, RunSummary { written: 0, rejected: 0, spooled_at_exit: 12_000, dropped: 98_000 });
    }

    #[tokio::test(start_paused = true)]
    async fn an_outage_spools_the_overflow_and_recovery_writes_every_row_once_in_order() {
        let temp = tempfile::tempdir().unwrap();
        let sink = FakeSink::new(Mode::Unavailable);
        let config = Config { memory_rows: 100, batch_size: 50, ..config(temp.path()) };
        let spool_dir = config.spool_dir.clone();
        let running = start(config, sink.clone(), Duration::from_secs(5));
        let rows = records(0..1000);
        for chunk in rows.chunks(10) {
            for row in chunk {
                running.handle.push(row.clone());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let status = running.handle.status();
        assert!(!status.database_up);
        assert_eq!(status.last_error.as_deref(), Some("database unavailable: connection refused"));
        assert!(status.buffered <= 100, "memory stays bounded: {status:?}");
        assert_eq!(status.buffered + status.spooled, 1000);
        assert!(!spool_files(&spool_dir).is_empty(), "the overflow is on disk");
        assert_eq!(sample(&running.registry, "exwatch_store_database_up", &[]), 0.0);
        assert!(sample(&running.registry, "exwatch_store_write_errors_total", &[("kind", "unavailable")]) > 1.0);

        sink.set(Mode::Up);
        eventually("all rows written", || sink.written().len() >= 1000).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(ids(&sink.written()), ids(&rows), "every row once, in push order");
        assert!(spool_files(&spool_dir).is_empty(), "spool files are deleted once written");
        let status = running.handle.status();
        assert_eq!((status.database_up, status.buffered, status.spooled, status.last_error), (true, 0, 0, None));
        let summary = running.stop().await;
        assert_eq!(summary, RunSummary { written: 1000, rejected: 0, spooled_at_exit: 0, dropped: 0 });
    }

    #[tokio::test(start_paused = true)]
    async fn rows_are_dropped_and_counted_only_when_memory_and_spool_are_both_full() {
        let temp = tempfile::tempdir().unwrap();
        let sink = FakeSink::new(Mode::Unavailable);
        let row_bytes = serde_json::to_vec(&record(0)).unwrap().len() as u64 + 1;
        let config = Config { memory_rows: 10, batch_size: 5, spool_max_bytes: row_bytes * 22, ..config(temp.path()) };
        let running = start(config, sink.clone(), Duration::from_secs(5));
        for row in records(0..100) {
            running.handle.push(row);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let status = running.handle.status();
        // Memory holds `memory_rows`, plus the one row whose push made the writer find the spool full.
        assert!(status.buffered <= 11, "{status:?}");
        assert!(status.spooled >= 15, "the spool is used up to its bound: {status:?}");
        let spool_bytes: u64 = std::fs::read_dir(temp.path().join("spool"))
            .unwrap()
            .map(|entry| entry.unwrap().metadata().unwrap().len())
            .sum();
        assert!(spool_bytes <= row_bytes * 22);
        sink.set(Mode::Up);
        eventually("the kept rows written", || {
            let status = running.handle.status();
            status.buffered == 0 && status.spooled == 0
        })
        .await;
        let registry = running.registry.clone();
        let summary = running.stop().await;
        assert!(summary.dropped > 0);
        assert_eq!(summary.written + summary.dropped, 100, "every row is either written or counted as dropped");
        let full = [("reason", "buffers_full")];
        assert_eq!(sample(&registry, "exwatch_store_dropped_rows_total", &full), summary.dropped as f64);
        let written = sink.written();
        assert!(written.windows(2).all(|pair| pair[0].response_time < pair[1].response_time), "still in order");
    }

    #[tokio::test(start_paused = true)]
    async fn rejected_rows_go_to_the_dead_letter_file_and_the_others_are_written() {
        let temp = tempfile::tempdir().unwrap();
        let sink = FakeSink::new(Mode::Up);
        let config = Config { batch_size: 10, ..config(temp.path()) };
        let spool_dir = config.spool_dir.clone();
        let rows = records(0..10);
        sink.rejected_ids.lock().unwrap().extend([rows[3].id, rows[7].id]);
        let running = start(config, sink.clone(), Duration::from_secs(5));
        for row in rows.clone() {
            running.handle.push(row);
        }
        eventually("the good rows written", || sink.written().len() == 8).await;
        let expected: Vec<Uuid> =
            rows.iter().enumerate().filter(|(index, _)| *index != 3 && *index != 7).map(|(_, row)| row.id).collect();
        assert_eq!(ids(&sink.written()), expected);
        let dead_letters = std::fs::read_to_string(spool_dir.join(REJECTED_FILE)).unwrap();
        let rejected: Vec<Uuid> = dead_letters
            .lines()
            .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap())
            .map(|line| serde_json::from_value::<CallRecord>(line["record"].clone()).unwrap().id)
            .collect();
        assert_eq!(rejected, vec![rows[3].id, rows[7].id]);
        assert_eq!(sample(&running.registry, "exwatch_store_rejected_rows_total", &[]), 2.0);
        assert_eq!(sample(&running.registry, "exwatch_store_database_up", &[]), 1.0);
        let summary = running.stop().await;
        assert_eq!(summary, RunSummary { written: 8, rejected: 2, spooled_at_exit: 0, dropped: 0 });
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_with_the_database_down_spools_the_rest_and_the_next_start_writes_it_first() {
        let temp = tempfile::tempdir().unwrap();
        let config = config(temp.path());
        let old_rows = records(0..30);
        let down = FakeSink::new(Mode::Unavailable);
        let running = start(config.clone(), down.clone(), Duration::from_secs(2));
        for row in old_rows.clone() {
            running.handle.push(row);
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
        let started = Instant::now();
        let summary = running.stop().await;
        assert!(started.elapsed() <= Duration::from_secs(2));
        assert_eq!(summary, RunSummary { written: 0, rejected: 0, spooled_at_exit: 30, dropped: 0 });
        assert_eq!(spool_files(&config.spool_dir).len(), 1);

        let up = FakeSink::new(Mode::Up);
        let running = start(config.clone(), up.clone(), Duration::from_secs(2));
        assert_eq!(running.handle.status().spooled, 30);
        let new_rows = records(30..35);
        for row in new_rows.clone() {
            running.handle.push(row);
        }
        eventually("old and new rows written", || up.written().len() == 35).await;
        let expected: Vec<Uuid> = old_rows.iter().chain(&new_rows).map(|row| row.id).collect();
        assert_eq!(ids(&up.written()), expected, "the previous run's rows first");
        let summary = running.stop().await;
        assert_eq!(summary, RunSummary { written: 35, rejected: 0, spooled_at_exit: 0, dropped: 0 });
        assert!(spool_files(&config.spool_dir).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_previous_runs_spool_lines_in_older_and_newer_formats_are_written_not_dropped() {
        let temp = tempfile::tempdir().unwrap();
        let config = config(temp.path());
        // As the first version wrote a line (every field, nulls included), one with only the fields every version
        // wrote (a field added since is missing), and one from a later version (a field this one does not know).
        let lines = [
            r#"{"id":"01943b8c-9a6e-7c1f-8e2a-3f5d6b7c8d90","provider":"kraken","endpoint":"Ticker","success":false,"response_time":5012,"error_message":"timed out","http_status":null,"error_class":"timeout","exchange_error":null,"instance":"pod-a","created_at":"2025-01-15T10:30:00.250Z"}"#,
            r#"{"id":"01943b8c-9a6e-7c1f-8e2a-3f5d6b7c8d91","provider":"kraken","endpoint":"Depth","success":true,"response_time":87,"created_at":"2025-01-15T10:30:01Z"}"#,
            r#"{"id":"01943b8c-9a6e-7c1f-8e2a-3f5d6b7c8d92","provider":"kraken","endpoint":"Balance","success":true,"response_time":90,"instance":"pod-b","created_at":"2025-01-15T10:30:02Z","added_later":{"any":1}}"#,
        ];
        write_spool_files(&config.spool_dir, &[("spool-000001.jsonl", Some(lines.map(str::to_owned).to_vec()))]);

        let sink = FakeSink::new(Mode::Up);
        let running = start(config.clone(), sink.clone(), Duration::from_secs(2));
        eventually("the previous run's rows written", || sink.written().len() == 3).await;
        let written = sink.written();
        let endpoints: Vec<&str> = written.iter().map(|row| row.endpoint.as_str()).collect();
        assert_eq!(endpoints, ["Ticker", "Depth", "Balance"]);
        assert_eq!(written[0].error_class.as_deref(), Some("timeout"));
        assert_eq!((written[1].instance.as_str(), written[1].error_message.as_ref()), ("", None));
        assert_eq!(written[2].instance, "pod-b");
        let unreadable = [("reason", "unreadable_spool_line")];
        assert_eq!(sample(&running.registry, "exwatch_store_dropped_rows_total", &unreadable), 0.0);
        let summary = running.stop().await;
        assert_eq!(summary, RunSummary { written: 3, rejected: 0, spooled_at_exit: 0, dropped: 0 });
        assert!(spool_files(&config.spool_dir).is_empty());
        assert!(!config.spool_dir.join(QUARANTINE_DIR).exists(), "nothing set aside");
    }

    #[tokio::test(start_paused = true)]
    async fn a_torn_last_spool_line_is_skipped_and_counted_as_dropped() {
        let temp = tempfile::tempdir().unwrap();
        let config = config(temp.path());
        let rows = records(0..3);
        std::fs::create_dir_all(&config.spool_dir).unwrap();
        let mut contents = Vec::new();
        for row in &rows {
            serde_json::to_writer(&mut contents, row).unwrap();
            contents.push(b'\n');
        }
        contents.extend_from_slice(br#"{"id":"01903a"#);
        std::fs::write(config.spool_dir.join("spool-000001.jsonl"), contents).unwrap();

        let sink = FakeSink::new(Mode::Up);
        let running = start(config, sink.clone(), Duration::from_secs(2));
        let torn = [("reason", "unreadable_spool_line")];
        assert_eq!(sample(&running.registry, "exwatch_store_dropped_rows_total", &torn), 1.0);
        eventually("the complete lines written", || sink.written().len() == 3).await;
        assert_eq!(ids(&sink.written()), ids(&rows));
        let summary = running.stop().await;
        assert_eq!(summary, RunSummary { written: 3, rejected: 0, spooled_at_exit: 0, dropped: 1 });
    }

    #[tokio::test(start_paused = true)]
    async fn a_corrupt_line_and_an_unreadable_file_are_quarantined_and_the_rest_is_written() {
        let temp = tempfile::tempdir().unwrap();
        let config = config(temp.path());
        let rows = records(0..6);
        let mut corrupt = json_lines(&rows[..3]);
        corrupt.insert(1, r#"{"id": "this is not a row"}"#.to_owned());
        write_spool_files(
            &config.spool_dir,
            &[
                ("spool-000001.jsonl", Some(corrupt)),
                ("spool-000002.jsonl", None),
                ("spool-000003.jsonl", Some(json_lines(&rows[3..]))),
            ],
        );
        let sink = FakeSink::new(Mode::Up);
        let running = start(config.clone(), sink.clone(), Duration::from_secs(2));
        let newer = records(6..8);
        for row in newer.clone() {
            running.handle.push(row);
        }
        eventually("every readable row written", || sink.written().len() == 8).await;
        let expected: Vec<Uuid> = rows.iter().chain(&newer).map(|row| row.id).collect();
        assert_eq!(ids(&sink.written()), expected, "in order, the writer never stopped");
        let quarantined = std::fs::read_dir(config.spool_dir.join(QUARANTINE_DIR)).unwrap().count();
        assert_eq!(quarantined, 2, "both files moved aside");
        assert!(spool_files(&config.spool_dir).is_empty());
        assert_eq!(sample(&running.registry, "exwatch_store_spool_quarantined_files_total", &[]), 2.0);
        let unreadable = [("reason", "unreadable_spool_line")];
        assert_eq!(sample(&running.registry, "exwatch_store_dropped_rows_total", &unreadable), 1.0);
        running.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn retries_back_off_exponentially_and_pushes_do_not_shorten_the_backoff() {
        let temp = tempfile::tempdir().unwrap();
        let sink = FakeSink::new(Mode::Unavailable);
        let config = Config { batch_size: 1, ..config(temp.path()) };
        let running = start(config, sink.clone(), Duration::from_secs(1));
        running.handle.push(record(0));
        // Attempts at 0, 0.1, 0.3, 0.7, 1.5, 3.1, 6.3, 11.3 s (the delay doubles from 100 ms up to 5 s).
        for _ in 0..120 {
            running.handle.push(record(1));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(sink.attempts.load(Ordering::SeqCst), 8);
        running.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn memory_stays_within_its_byte_bound_when_rows_carry_huge_error_texts() {
        let temp = tempfile::tempdir().unwrap();
        let sink = FakeSink::new(Mode::Hang);
        let memory_bytes = 1 << 20;
        let config = Config { memory_bytes, ..config(temp.path()) };
        let running = start(config, sink.clone(), Duration::from_secs(1));
        let huge = |number: i64| CallRecord { error_message: Some("E".repeat(100_000)), ..record(number) };
        // The writer cannot run during the loop: past twice the byte bound, rows are dropped and counted.
        for number in 0..100 {
            running.handle.push(huge(number));
        }
        let buffered_bytes = || sample(&running.registry, "exwatch_store_buffered_bytes", &[]);
        assert!(buffered_bytes() <= 2.0 * memory_bytes as f64, "{} bytes buffered", buffered_bytes());
        let kept = running.handle.status().buffered;
        assert!((15..=21).contains(&kept), "{kept} rows of 100 kB kept under a 2 MiB hard limit");
        running.handle.shared.report_drops(true);
        let unavailable = [("reason", "spool_unavailable")];
        assert_eq!(sample(&running.registry, "exwatch_store_dropped_rows_total", &unavailable), (100 - kept) as f64);

        // Given the chance, the writer spools down to the bound; later rows go the same way and none is dropped.
        eventually("memory back within its byte bound", || buffered_bytes() <= memory_bytes as f64).await;
        for round in 0..5 {
            for number in 0..10 {
                running.handle.push(huge(100 + round * 10 + number));
            }
            eventually("memory back within its byte bound", || buffered_bytes() <= memory_bytes as f64).await;
        }
        let status = running.handle.status();
        assert_eq!(status.buffered + status.spooled, kept + 50, "nothing lost once the writer could run");
        let summary = running.stop().await;
        assert_eq!(summary.dropped, (100 - kept) as u64);
        assert_eq!(summary.spooled_at_exit, kept + 50);
    }

    /// Pushes a row every 100 ms for `seconds` and checks after each push that memory holds only the rows of
    /// the last `intervals` flush intervals (the rest is on disk, where a SIGKILL cannot take it).
    async fn push_and_check_memory(running: &Running, seconds: i64, intervals: usize) -> Vec<CallRecord> {
        let mut pushed = Vec::new();
        for number in 0..seconds * 10 {
            let row = record(number);
            running.handle.push(row.clone());
            pushed.push(row);
            tokio::time::sleep(Duration::from_millis(100)).await;
            let status = running.handle.status();
            assert!(status.buffered <= 10 * intervals + 1, "row {number}: {status:?}");
            assert_eq!(status.buffered + status.spooled, pushed.len(), "row {number}: {status:?}");
        }
        pushed
    }

    #[tokio::test(start_paused = true)]
    async fn while_the_database_is_away_rows_reach_the_spool_within_one_flush_interval() {
        let temp = tempfile::tempdir().unwrap();
        let sink = FakeSink::new(Mode::Unavailable);
        // Memory could hold every row of the test: only the outage rule moves them to disk.
        let config = Config { memory_rows: 10_000, flush_interval: Duration::from_secs(1), ..config(temp.path()) };
        let running = start(config, sink.clone(), Duration::from_secs(2));
        let pushed = push_and_check_memory(&running, 10, 1).await;
        assert!(running.handle.status().spooled >= 85, "{:?}", running.handle.status());

        sink.set(Mode::Up);
        eventually("every row written", || sink.written().len() == pushed.len()).await;
        assert_eq!(ids(&sink.written()), ids(&pushed), "once each, in order");
        let summary = running.stop().await;
        assert_eq!(summary, RunSummary { written: 100, rejected: 0, spooled_at_exit: 0, dropped: 0 });
    }

    #[tokio::test(start_paused = true)]
    async fn a_hung_insert_counts_as_an_outage_after_one_flush_interval() {
        let temp = tempfile::tempdir().unwrap();
        let sink = FakeSink::new(Mode::Hang);
        let config = Config { memory_rows: 10_000, flush_interval: Duration::from_secs(1), ..config(temp.path()) };
        let running = start(config, sink.clone(), Duration::from_secs(1));
        // The batch in flight waited one interval for its flush and one for the hung insert.
        push_and_check_memory(&running, 10, 2).await;
        assert!(running.handle.status().spooled >= 75, "{:?}", running.handle.status());
        assert_eq!(sink.attempts.load(Ordering::SeqCst), 1, "one insert, still hanging");
        let summary = running.stop().await;
        assert_eq!(summary.spooled_at_exit, 100);
    }

    #[tokio::test]
    async fn metrics_are_exposed_from_the_start() {
        let registry = Registry::new();
        let _metrics = Metrics::new(&registry);
        let text = telemetry::encode(&registry).unwrap();
        for name in [
            "exwatch_store_rows_written_total",
            "exwatch_store_batch_rows_bucket",
            "exwatch_store_batch_duration_seconds_bucket",
            "exwatch_store_buffered_rows",
            "exwatch_store_buffered_bytes",
            "exwatch_store_spooled_rows",
            "exwatch_store_dropped_rows_total{reason=\"buffers_full\"}",
            "exwatch_store_rejected_rows_total",
            "exwatch_store_spool_quarantined_files_total",
            "exwatch_store_write_errors_total{kind=\"unavailable\"}",
            "exwatch_store_write_errors_total{kind=\"rejected\"}",
            "exwatch_store_write_errors_total{kind=\"spool\"}",
            "exwatch_store_database_up 1",
        ] {
            assert!(text.contains(name), "{name} missing from\n{text}");
        }
    }
}
