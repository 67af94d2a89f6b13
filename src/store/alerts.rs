//! The recorder of what alerting keeps in the database: the durable outbox (`alert_outbox`: notifications not yet
//! delivered), the alerts firing now (`alert_state`), and the `incidents` rows for the post-incident review
//! (`exchange_api_down` firing opens one, resolving closes it). Their statements are in
//! [`alert_state`](super::alert_state) and [`incidents`](super::incidents); this module decides when they run.
//!
//! The alert side hands [`Op`]s to [`Handle::send`], which never waits; one task ([`Recorder::run`]) writes them in
//! order. The queue is bounded in operations and bytes; what does not fit is dropped and counted. A write the
//! database refuses for good (a constraint, an encoding or a data error) is dropped, counted and logged once, never
//! retried, so it cannot hold up the writes behind it. While the database is away (no connection, a timeout, a
//! pool or server error), the operations move to their own spool (`spool_dir/alerts/`, the call-log spool's format
//! and fsync discipline) one flush interval after they were made, and are written from there, oldest first, when
//! it returns: at start-up before the previous run's alerts are restored ([`Recorder::replay`]), and by the task.
//! So a crash during a database outage neither re-pages a delivered alert nor forgets a resolve. Replays are
//! idempotent: outbox and state writes are keyed, an incident opens once per start time and a resolve closes only
//! incidents that started before it. Stored alerts are opaque JSON here: the alert module owns their shape.
//!
//! The spool's lines outlive a process: a field added to [`Op`], [`OutboxRow`] or [`Tally`] takes
//! `#[serde(default)]`, so the previous run's lines still read (a test removes every field a line did not always
//! have), and a line of another [`Spooled`] version is set aside, never misread.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use chrono::{DateTime, Utc};
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{Gauge, IntCounterVec, IntGauge, Opts, Registry};
use serde::{Deserialize, Deserializer, Serialize};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::journal::{Event, Journal};
use crate::store::connector::Connector;
use crate::store::database::{Database, Error};
use crate::store::spool::{Quarantined, Spool, SpoolError};
use crate::telemetry;

/// One undelivered notification for one sink target, as spooled and as `alert_outbox` stores it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, sqlx::FromRow)]
pub struct OutboxRow {
    pub id: String,
    pub target: String,
    pub kind: String,
    pub payload: String,
    pub created_at_ms: i64,
}

/// Calls counted towards an incident: in its opening, the whole failure streak so far; in a progress, one poll.
/// Calls the breaker refused were never sent and are never counted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tally {
    /// The latest error of these calls; `None` keeps the one recorded.
    #[serde(default)]
    pub last_error: Option<String>,
    /// Calls sent that failed.
    pub failed_calls: i64,
    /// Calls sent.
    pub total_calls: i64,
}

/// One write, in the order the alert side made them. Also the recorder spool's line format (inside [`Spooled`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// `at` is the first failure of the streak that caused the incident; `tally` counts the streak's calls (none
    /// in a line spooled by an older version).
    IncidentOpened {
        provider: String,
        alertname: String,
        scenario: String,
        at: DateTime<Utc>,
        #[serde(default)]
        first_error: Option<String>,
        #[serde(default)]
        tally: Tally,
    },
    /// More calls during the open incident of `provider` and `alertname` (one poll's), and its scenario now. Not
    /// idempotent: a crash between its write and its spool's commit counts that poll twice.
    IncidentProgress {
        provider: String,
        alertname: String,
        scenario: String,
        tally: Tally,
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
    /// One journal event (`exchange_events`); `id` makes a replay a no-op.
    Event {
        id: String,
        #[serde(flatten)]
        event: Event,
    },
}

impl Op {
    /// The operation's name, for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Op::IncidentOpened { .. } => "incident_opened",
            Op::IncidentProgress { .. } => "incident_progress",
            Op::IncidentResolved { .. } => "incident_resolved",
            Op::OutboxPut(_) => "outbox_put",
            Op::OutboxDone { .. } => "outbox_done",
            Op::StatePut { .. } => "state_put",
            Op::StateClear { .. } => "state_clear",
            Op::Event { .. } => "event",
        }
    }

    /// Its size in memory, estimated (the enum and its strings), for the queue's byte bound.
    fn bytes(&self) -> u64 {
        let strings: usize = match self {
            Op::IncidentOpened { provider, alertname, scenario, first_error, tally, .. } => {
                provider.len()
                    + alertname.len()
                    + scenario.len()
                    + first_error.as_ref().map_or(0, String::len)
                    + tally.last_error.as_ref().map_or(0, String::len)
            }
            Op::IncidentProgress { provider, alertname, scenario, tally } => {
                provider.len() + alertname.len() + scenario.len() + tally.last_error.as_ref().map_or(0, String::len)
            }
            Op::IncidentResolved { provider, alertname, .. } => provider.len() + alertname.len(),
            Op::OutboxPut(row) => row.id.len() + row.target.len() + row.kind.len() + row.payload.len(),
            Op::OutboxDone { id } => id.len(),
            Op::StatePut { exchange, alertname, payload } => exchange.len() + alertname.len() + payload.len(),
            Op::StateClear { exchange, alertname } => exchange.len() + alertname.len(),
            Op::Event { id, event } => id.len() + event.exchange.len() + event.detail.len(),
        };
        (std::mem::size_of::<Queued>() + strings) as u64
    }
}

/// The version of [`Spooled`] lines this build writes and reads. A line of another version does not parse, so its
/// file is quarantined rather than misread.
const SPOOL_VERSION: u32 = 1;

/// One line of the recorder's spool: an operation and when it was made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Spooled {
    #[serde(deserialize_with = "known_version")]
    pub version: u32,
    /// Unix milliseconds, for the queue's oldest-age gauge.
    pub queued_at_ms: i64,
    pub op: Op,
}

fn known_version<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u32, D::Error> {
    let version = u32::deserialize(deserializer)?;
    if version == SPOOL_VERSION {
        Ok(version)
    } else {
        Err(serde::de::Error::custom(format!("recorder spool line version {version} is not {SPOOL_VERSION}")))
    }
}

/// The most operations, and bytes of them, waiting in memory; past either, new ones are dropped and counted.
/// While the database is away they move to the spool every flush interval, so this fills only when the spool is
/// full or failing too.
pub const MAX_QUEUED_OPS: usize = 10_000;
pub const MAX_QUEUED_BYTES: u64 = 16 * 1024 * 1024;
/// The recorder's spool, a directory inside the call-log spool's, gets this share of `database.spool_max_bytes`.
const SPOOL_SHARE: u64 = 8;
pub const SPOOL_DIR: &str = "alerts";

/// The first and the longest wait between two attempts while the database is away.
const MIN_RETRY: Duration = Duration::from_millis(200);
const MAX_RETRY: Duration = Duration::from_secs(30);
/// The longest one write may take (connecting included) before the database counts as away.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// After the spool fails to take operations, spooling waits this long before trying again.
const SPOOL_RETRY: Duration = Duration::from_secs(5);
/// Drops are logged at most this often, with the count since the last line.
const DROP_REPORT_INTERVAL: Duration = Duration::from_secs(1);

/// The recorder's settings, from the `[database]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// How long an operation may wait in memory while the database is away (`database.flush_interval`).
    pub flush_interval: Duration,
    pub spool_dir: PathBuf,
    pub spool_max_bytes: u64,
}

impl Config {
    pub fn from_database(database: &crate::store::Config) -> Config {
        Config {
            flush_interval: database.writer.flush_interval,
            spool_dir: database.writer.spool_dir.join(SPOOL_DIR),
            spool_max_bytes: database.writer.spool_max_bytes / SPOOL_SHARE,
        }
    }
}

/// Why an operation was not recorded: the `reason` label of `exwatch_alert_recorder_dropped_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// The database refused it for good.
    Rejected,
    /// The memory queue was at its bound (the spool full or failing too).
    QueueFull,
    /// Sent after the recorder stopped.
    Stopped,
    /// Left at shutdown and the spool could not take it.
    SpoolUnavailable,
    /// A spool line that could not be read back.
    UnreadableSpoolLine,
}

impl DropReason {
    const ALL: [DropReason; 5] = [
        DropReason::Rejected,
        DropReason::QueueFull,
        DropReason::Stopped,
        DropReason::SpoolUnavailable,
        DropReason::UnreadableSpoolLine,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Rejected => "rejected",
            DropReason::QueueFull => "queue_full",
            DropReason::Stopped => "stopped",
            DropReason::SpoolUnavailable => "spool_unavailable",
            DropReason::UnreadableSpoolLine => "unreadable_spool_line",
        }
    }
}

/// Whether retrying a failed write can never help: the database answered and refused the statement itself
/// (SQLSTATE classes 22 data, 23 constraint, 42 syntax or access, and every other answer `query_error` does not
/// call unavailable). Connection, pool, timeout and server-state errors are transient.
pub fn is_permanent(error: &Error) -> bool {
    matches!(error, Error::Query(_))
}

/// An operation waiting in memory.
#[derive(Debug)]
struct Queued {
    op: Op,
    bytes: u64,
    at: Instant,
    queued_at_ms: i64,
}

#[derive(Debug, Default)]
struct Queue {
    ops: VecDeque<Queued>,
    bytes: u64,
    /// Set when the recorder has stopped: later operations are dropped and counted.
    closed: bool,
}

impl Queue {
    fn pop_front(&mut self) -> Option<Queued> {
        let queued = self.ops.pop_front()?;
        self.bytes = self.bytes.saturating_sub(queued.bytes);
        Some(queued)
    }
}

/// What the handles, the recorder task and the metrics share.
struct Shared {
    queue: Mutex<Queue>,
    wake: Notify,
    /// Operations in the spool.
    spooled: AtomicUsize,
    /// When the spool's oldest operation was made (Unix ms), or 0 when unknown or none.
    spool_oldest_ms: AtomicI64,
    metrics: Metrics,
}

impl Shared {
    fn queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Hands writes to the recorder. Cheap to clone; sending never waits.
#[derive(Clone)]
pub struct Handle {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Handle {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("Handle").field("queued", &self.shared.queue().ops.len()).finish()
    }
}

/// The daemon's journal: events are written in order with alerting's other records.
impl Journal for Handle {
    fn record(&self, event: Event) {
        self.send(Op::Event { id: uuid::Uuid::now_v7().to_string(), event });
    }
}

impl Handle {
    /// Queues a write. Dropped (counted, logged at most once a second) when the queue is at its bound or the
    /// recorder has stopped.
    pub fn send(&self, op: Op) {
        let bytes = op.bytes();
        let mut queue = self.shared.queue();
        let reason = if queue.closed {
            Some(DropReason::Stopped)
        } else if queue.ops.len() >= MAX_QUEUED_OPS || queue.bytes + bytes > MAX_QUEUED_BYTES {
            Some(DropReason::QueueFull)
        } else {
            None
        };
        if let Some(reason) = reason {
            drop(queue);
            self.shared.metrics.dropped(reason, 1, op.kind());
            return;
        }
        let was_empty = queue.ops.is_empty();
        queue.bytes += bytes;
        queue.ops.push_back(Queued { op, bytes, at: Instant::now(), queued_at_ms: Utc::now().timestamp_millis() });
        drop(queue);
        if was_empty {
            self.shared.wake.notify_one();
        }
    }
}

/// The recorder's metrics. Depth and the oldest operation's age are read at scrape; each other method logs and
/// counts one occurrence.
struct Metrics {
    dropped: IntCounterVec,
    last_drop_log: Mutex<Option<(Instant, u64)>>,
}

impl Metrics {
    fn new(registry: &Registry, shared: Weak<Shared>) -> Metrics {
        let dropped = IntCounterVec::new(
            Opts::new(
                "exwatch_alert_recorder_dropped_total",
                "Alert writes (incidents, alert state, outbox rows) never recorded, by reason.",
            ),
            &["reason"],
        )
        .expect("valid metric definition");
        let dropped = telemetry::register(registry, dropped);
        for reason in DropReason::ALL {
            dropped.with_label_values(&[reason.as_str()]);
        }
        let queue = QueueCollector {
            shared,
            depth: IntGauge::new(
                "exwatch_alert_recorder_queue_depth",
                "Alert writes waiting for the database, in memory and in the recorder's spool.",
            )
            .expect("valid metric definition"),
            oldest: Gauge::new(
                "exwatch_alert_recorder_oldest_age_seconds",
                "Age of the oldest alert write waiting for the database (0 when none).",
            )
            .expect("valid metric definition"),
        };
        if let Err(error) = registry.register(Box::new(queue)) {
            tracing::error!(error = %error, "Cannot register the alert recorder's queue metrics.");
        }
        Metrics { dropped, last_drop_log: Mutex::new(None) }
    }

    /// Counts drops; logs them at most once per [`DROP_REPORT_INTERVAL`] with the count since the last line.
    fn dropped(&self, reason: DropReason, count: u64, op: &str) {
        self.dropped.with_label_values(&[reason.as_str()]).inc_by(count);
        let now = Instant::now();
        let mut last = self.last_drop_log.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((at, suppressed)) = last.as_mut()
            && now.duration_since(*at) < DROP_REPORT_INTERVAL
        {
            *suppressed += count;
            return;
        }
        let suppressed_since_last = last.map_or(0, |(_, suppressed)| suppressed);
        *last = Some((now, 0));
        drop(last);
        tracing::error!(
            reason = reason.as_str(),
            op,
            count,
            suppressed_since_last,
            "Alert write dropped; it will not be recorded."
        );
    }

    /// A write the database refused for good: dropped, counted and logged once.
    fn rejected(&self, op: &Op, error: &Error) {
        self.dropped.with_label_values(&[DropReason::Rejected.as_str()]).inc();
        tracing::error!(
            op = op.kind(),
            error = %error,
            "The database refused an alert write for good; dropped, the writes behind it go on."
        );
    }

    fn unavailable(&self, error: &Error, depth: usize) {
        tracing::warn!(error = %error, depth, "Cannot record alert writes yet; they are kept and spooled.");
    }

    fn recovered(&self) {
        tracing::info!("Alert writes recovered.");
    }

    fn spool_failed(&self, error: &SpoolError) {
        tracing::error!(error = %error, "Alert recorder spool failed; writes stay in memory.");
    }

    fn quarantined(&self, file: &Quarantined) {
        file.log("alert_recorder");
    }
}
/// Reads the queue at scrape time, so the oldest operation's age is current without a timer.
struct QueueCollector {
    shared: Weak<Shared>,
    depth: IntGauge,
    oldest: Gauge,
}

impl Collector for QueueCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.depth.desc().into_iter().chain(self.oldest.desc()).collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        if let Some(shared) = self.shared.upgrade() {
            let (memory, memory_age) = {
                let queue = shared.queue();
                (queue.ops.len(), queue.ops.front().map(|queued| queued.at.elapsed()))
            };
            let spooled = shared.spooled.load(Ordering::Relaxed);
            let spool_oldest_ms = shared.spool_oldest_ms.load(Ordering::Relaxed);
            let spool_age = (spooled > 0 && spool_oldest_ms > 0).then(|| {
                let age_ms = Utc::now().timestamp_millis().saturating_sub(spool_oldest_ms).max(0);
                Duration::from_millis(age_ms.unsigned_abs())
            });
            self.depth.set(i64::try_from(memory + spooled).unwrap_or(i64::MAX));
            let oldest = spool_age.into_iter().chain(memory_age).max().unwrap_or_default();
            self.oldest.set(oldest.as_secs_f64());
        }
        self.depth.collect().into_iter().chain(self.oldest.collect()).collect()
    }
}

/// The writes' way from the alert side (the [`Handle`]) to the [`Recorder`]. Opens the recorder's spool, taking
/// over what a previous run left there (write it with [`Recorder::replay`] before restoring alerts); fails only
/// if the spool directory exists but cannot be read.
pub fn channel(config: Config, registry: &Registry) -> Result<(Handle, Recorder), SpoolError> {
    let mut spool: Spool<Spooled> = Spool::open(&config.spool_dir, config.spool_max_bytes)?;
    let shared = Arc::new_cyclic(|weak: &Weak<Shared>| Shared {
        queue: Mutex::new(Queue::default()),
        wake: Notify::new(),
        spooled: AtomicUsize::new(spool.len_rows()),
        spool_oldest_ms: AtomicI64::new(0),
        metrics: Metrics::new(registry, weak.clone()),
    });
    for file in spool.take_quarantined() {
        shared.metrics.quarantined(&file);
    }
    let unreadable = spool.take_unreadable_lines();
    if unreadable > 0 {
        shared.metrics.dropped(DropReason::UnreadableSpoolLine, unreadable, "spooled");
    }
    if !spool.is_empty() {
        tracing::info!(ops = spool.len_rows(), "Alert writes spooled by an earlier run are recorded first.");
    }
    let recorder = Recorder {
        config,
        shared: Arc::clone(&shared),
        spool: Arc::new(Mutex::new(spool)),
        away: false,
        retry_at: None,
        spool_retry_at: None,
        backoff: MIN_RETRY,
    };
    Ok((Handle { shared }, recorder))
}

/// Where the operation being written came from, which decides what a success removes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Spool,
    Memory,
}

/// The task that records the alert side's writes, in order. See the module documentation.
pub struct Recorder {
    config: Config,
    shared: Arc<Shared>,
    /// Used only from this task, but on the blocking pool, hence the lock.
    spool: Arc<Mutex<Spool<Spooled>>>,
    /// Set when a write failed as unavailable, cleared by the next success.
    away: bool,
    /// No attempt before this instant (the backoff while the database is away).
    retry_at: Option<Instant>,
    spool_retry_at: Option<Instant>,
    backoff: Duration,
}

impl Recorder {
    /// Writes what the spool holds (a previous run's writes made while the database was away), oldest first, to
    /// `database`: at start-up, before the previous run's alerts are read back. Stops at the first transient
    /// failure (the task goes on later) and returns the number written.
    pub async fn replay(&mut self, database: &Database, instance: &str) -> Result<usize, Error> {
        let mut written = 0;
        while self.shared.spooled.load(Ordering::Relaxed) > 0 {
            let Some(op) = self.spool_head().await else {
                break;
            };
            let result = match tokio::time::timeout(WRITE_TIMEOUT, apply(database, instance, &op)).await {
                Ok(result) => result,
                Err(_) => Err(write_timeout()),
            };
            match result {
                Ok(()) => written += 1,
                Err(error) if is_permanent(&error) => self.shared.metrics.rejected(&op, &error),
                Err(error) => return Err(error),
            }
            self.done(Source::Spool).await;
        }
        if written > 0 {
            tracing::info!(ops = written, "Alert writes of an earlier run recorded.");
        }
        Ok(written)
    }

    /// Records writes until `cancel`, then for at most `drain` while the database answers; what is left then goes
    /// to the spool for the next start.
    pub async fn run(
        mut self,
        connector: Arc<Connector>,
        instance: String,
        cancel: CancellationToken,
        drain: Duration,
    ) {
        let mut drain_deadline: Option<Instant> = None;
        loop {
            if drain_deadline.is_none() && cancel.is_cancelled() {
                drain_deadline = Some(Instant::now() + drain);
            }
            self.spill_when_due().await;
            if let Some(deadline) = drain_deadline
                && (self.away || Instant::now() >= deadline || self.is_idle())
            {
                break;
            }
            if let Some(retry_at) = self.retry_at {
                if Instant::now() < retry_at {
                    self.wait(Some(retry_at), drain_deadline, &cancel).await;
                    continue;
                }
                self.retry_at = None;
            }
            let (op, source) = if self.shared.spooled.load(Ordering::Relaxed) > 0 {
                match self.spool_head().await {
                    Some(op) => (op, Source::Spool),
                    None => continue,
                }
            } else {
                let front = self.shared.queue().ops.front().map(|queued| queued.op.clone());
                match front {
                    Some(op) => (op, Source::Memory),
                    None => {
                        self.wait(None, drain_deadline, &cancel).await;
                        continue;
                    }
                }
            };
            let write = async {
                let database = connector.database().await?;
                apply(&database, &instance, &op).await
            };
            let result = tokio::select! {
                result = tokio::time::timeout(WRITE_TIMEOUT, write) => result.unwrap_or_else(|_| Err(write_timeout())),
                // The write may still land: every operation is idempotent, so spooling it too is harmless.
                () = crate::clock::sleep_until_some(drain_deadline) => break,
            };
            match result {
                Ok(()) => {
                    if std::mem::take(&mut self.away) {
                        self.shared.metrics.recovered();
                    }
                    self.backoff = MIN_RETRY;
                    self.done(source).await;
                }
                Err(error) if is_permanent(&error) => {
                    self.shared.metrics.rejected(&op, &error);
                    self.done(source).await;
                }
                Err(error) => {
                    if !self.away {
                        self.shared.metrics.unavailable(&error, self.depth());
                    }
                    self.away = true;
                    self.retry_at = Some(Instant::now() + self.backoff);
                    self.backoff = (self.backoff * 2).min(MAX_RETRY);
                }
            }
        }
        self.finish().await;
    }

    fn depth(&self) -> usize {
        self.shared.queue().ops.len() + self.shared.spooled.load(Ordering::Relaxed)
    }

    fn is_idle(&self) -> bool {
        self.depth() == 0
    }

    /// Sleeps until `until`, the spill deadline or the end of the drain, waking early for a new operation or the
    /// cancellation.
    async fn wait(&self, until: Option<Instant>, drain_deadline: Option<Instant>, cancel: &CancellationToken) {
        let deadline = [until, drain_deadline, self.spill_due()].into_iter().flatten().min();
        tokio::select! {
            () = self.shared.wake.notified() => {}
            () = cancel.cancelled(), if drain_deadline.is_none() => {}
            () = crate::clock::sleep_until_some(deadline) => {}
        }
    }

    /// When memory is due to move to the spool: one flush interval after its oldest operation, while the database
    /// is away. `None` while it answers or memory is empty.
    fn spill_due(&self) -> Option<Instant> {
        if !self.away {
            return None;
        }
        let oldest = self.shared.queue().ops.front().map(|queued| queued.at)?;
        let due = oldest + self.config.flush_interval;
        Some(self.spool_retry_at.map_or(due, |retry_at| due.max(retry_at)))
    }

    async fn spill_when_due(&mut self) {
        if self.spill_due().is_some_and(|due| Instant::now() >= due) {
            self.spill().await;
        }
    }

    /// Appends every operation in memory to the spool (one fsync), oldest first, then takes them off the queue.
    /// Returns false (they stay in memory) when the spool cannot take them.
    async fn spill(&mut self) -> bool {
        let lines: Vec<Spooled> = self
            .shared
            .queue()
            .ops
            .iter()
            .map(|queued| Spooled { version: SPOOL_VERSION, queued_at_ms: queued.queued_at_ms, op: queued.op.clone() })
            .collect();
        if lines.is_empty() {
            return true;
        }
        let count = lines.len();
        let first_ms = lines[0].queued_at_ms;
        let was_empty = self.shared.spooled.load(Ordering::Relaxed) == 0;
        match self.on_spool(move |spool| spool.append(&lines)).await {
            Ok(()) => {
                if was_empty {
                    self.shared.spool_oldest_ms.store(first_ms, Ordering::Relaxed);
                }
                let mut queue = self.shared.queue();
                for _ in 0..count {
                    queue.pop_front();
                }
                self.spool_retry_at = None;
                true
            }
            Err(error) => {
                self.shared.metrics.spool_failed(&error);
                self.spool_retry_at = Some(Instant::now() + SPOOL_RETRY);
                false
            }
        }
    }

    /// The spool's oldest operation, or `None` (the spool is empty after all, or failed: then retried later).
    async fn spool_head(&mut self) -> Option<Op> {
        match self.on_spool(|spool| spool.read_oldest(1)).await {
            Ok(lines) => {
                let line = lines.into_iter().next()?;
                self.shared.spool_oldest_ms.store(line.queued_at_ms, Ordering::Relaxed);
                Some(line.op)
            }
            Err(error) => {
                self.shared.metrics.spool_failed(&error);
                self.retry_at = Some(Instant::now() + SPOOL_RETRY);
                None
            }
        }
    }

    /// Removes the operation just written (or dropped) from where it came from.
    async fn done(&mut self, source: Source) {
        match source {
            Source::Memory => {
                self.shared.queue().pop_front();
            }
            Source::Spool => {
                if let Err(error) = self.on_spool(|spool| spool.commit(1)).await {
                    // Written; at worst written again, which every operation tolerates.
                    self.shared.metrics.spool_failed(&error);
                }
            }
        }
    }

    /// Runs a spool operation on the blocking pool, then publishes the spool's level and reports what it set aside.
    async fn on_spool<T, F>(&mut self, operation: F) -> Result<T, SpoolError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Spool<Spooled>) -> Result<T, SpoolError> + Send + 'static,
    {
        let spool = Arc::clone(&self.spool);
        let joined = tokio::task::spawn_blocking(move || {
            let mut spool = spool.lock().unwrap_or_else(PoisonError::into_inner);
            let result = operation(&mut spool);
            (result, spool.len_rows(), spool.take_unreadable_lines(), spool.take_quarantined())
        })
        .await;
        let (result, rows, unreadable, quarantined) = match joined {
            Ok(done) => done,
            Err(error) => {
                let source = std::io::Error::other(format!("spool task failed: {error}"));
                return Err(SpoolError::Io { path: self.config.spool_dir.clone(), source });
            }
        };
        self.shared.spooled.store(rows, Ordering::Relaxed);
        if rows == 0 {
            self.shared.spool_oldest_ms.store(0, Ordering::Relaxed);
        }
        if unreadable > 0 {
            self.shared.metrics.dropped(DropReason::UnreadableSpoolLine, unreadable, "spooled");
        }
        for file in &quarantined {
            self.shared.metrics.quarantined(file);
        }
        result
    }

    /// Closes the queue and spools what is left in memory for the next start.
    async fn finish(mut self) {
        self.shared.queue().closed = true;
        let left = self.shared.queue().ops.len();
        if left > 0 && !self.spill().await {
            self.shared.metrics.dropped(DropReason::SpoolUnavailable, left as u64, "left at shutdown");
        }
        let spooled = self.shared.spooled.load(Ordering::Relaxed);
        if spooled > 0 {
            tracing::warn!(spooled, "Alert recorder stopped with writes spooled for the next start.");
        }
    }
}

fn write_timeout() -> Error {
    Error::Unavailable(format!("no answer within {}", humantime::format_duration(WRITE_TIMEOUT)))
}

/// Runs one operation. Each but an incident's progress is idempotent, so a replay after a crash (written, not yet
/// committed in the spool) changes nothing: outbox and state rows are keyed, an incident opens (and counts its
/// streak) once per start time (and once while open) and a resolve closes only incidents that started before it. A
/// replayed progress counts one poll's calls twice, at worst.
pub async fn apply(database: &Database, instance: &str, op: &Op) -> Result<(), Error> {
    match op {
        Op::IncidentOpened { provider, alertname, scenario, at, first_error, tally } => {
            let since = (Utc::now() - *at).to_std().unwrap_or_default() + Duration::from_secs(1);
            let recorded = database.list_incidents(since).await?.into_iter().any(|incident| {
                &incident.provider == provider
                    && &incident.alertname == alertname
                    && incident.started_at.timestamp_micros() == at.timestamp_micros()
            });
            // A replayed opening neither opens nor counts again.
            if !recorded {
                let id = database.open_incident(provider, alertname, scenario, *at, first_error.as_deref()).await?;
                // Another replica may have opened it first: its calls and ours add up, as in the report.
                let Tally { last_error, failed_calls, total_calls } = tally;
                database.update_incident(id, scenario, last_error.as_deref(), *failed_calls, *total_calls).await?;
                tracing::info!(incident = id, provider, alertname, scenario, "Incident opened.");
            }
        }
        Op::IncidentProgress { provider, alertname, scenario, tally } => {
            database.update_open_incident(provider, alertname, scenario, tally).await?;
        }
        Op::IncidentResolved { provider, alertname, at } => {
            // The open row may predate this process (a restart mid-incident): find it by provider and alert.
            for incident in database.open_incidents().await? {
                if &incident.provider == provider && &incident.alertname == alertname && incident.started_at <= *at {
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
        Op::Event { id, event } => database.event_put(id, instance, event).await?,
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::spool::tests::{assert_later_fields_default, write_spool_files};

    fn recorder_config(dir: &std::path::Path) -> Config {
        Config { flush_interval: Duration::from_secs(1), spool_dir: dir.join("alerts"), spool_max_bytes: 1 << 20 }
    }

    fn sample(registry: &Registry, name: &str, labels: &[(&str, &str)]) -> f64 {
        telemetry::sample(&telemetry::encode(registry).unwrap(), name, labels).unwrap_or(f64::NAN)
    }

    #[tokio::test]
    async fn the_queue_is_bounded_in_writes_and_counts_what_it_drops() {
        let temp = tempfile::tempdir().unwrap();
        let registry = Registry::new();
        let (handle, _recorder) = channel(recorder_config(temp.path()), &registry).unwrap();
        for number in 0..MAX_QUEUED_OPS + 5 {
            handle.send(Op::OutboxDone { id: number.to_string() });
        }
        assert_eq!(sample(&registry, "exwatch_alert_recorder_queue_depth", &[]), MAX_QUEUED_OPS as f64);
        assert_eq!(sample(&registry, "exwatch_alert_recorder_dropped_total", &[("reason", "queue_full")]), 5.0);
    }

    #[tokio::test]
    async fn the_queue_is_bounded_in_bytes_and_counts_what_it_drops() {
        let temp = tempfile::tempdir().unwrap();
        let registry = Registry::new();
        let (handle, _recorder) = channel(recorder_config(temp.path()), &registry).unwrap();
        let payload = "x".repeat(1 << 20);
        for _ in 0..20 {
            handle.send(Op::StatePut { exchange: "kraken".into(), alertname: "down".into(), payload: payload.clone() });
        }
        let depth = sample(&registry, "exwatch_alert_recorder_queue_depth", &[]);
        assert_eq!(depth, 15.0, "16 MiB hold fifteen writes of a little over 1 MiB");
        assert_eq!(sample(&registry, "exwatch_alert_recorder_dropped_total", &[("reason", "queue_full")]), 5.0);
    }

    #[test]
    fn only_answers_the_database_refused_are_permanent() {
        assert!(is_permanent(&Error::Query("violates check constraint".into())));
        assert!(!is_permanent(&Error::Unavailable("connection reset".into())));
        assert!(!is_permanent(&Error::Connect { target: "db".into(), reason: "refused".into() }));
        assert!(!is_permanent(&Error::Migrate { target: "db".into(), reason: "locked".into() }));
    }

    #[test]
    fn spool_lines_round_trip_and_tolerate_missing_optional_fields() {
        let op = Op::IncidentOpened {
            provider: "kraken".into(),
            alertname: "exchange_api_down".into(),
            scenario: "network".into(),
            at: Utc::now(),
            first_error: None,
            tally: Tally::default(),
        };
        let line = Spooled { version: SPOOL_VERSION, queued_at_ms: 1, op };
        let text = serde_json::to_string(&line).unwrap();
        assert_eq!(serde_json::from_str::<Spooled>(&text).unwrap(), line);
        let without = text.replace(",\"first_error\":null", "");
        assert_ne!(without, text);
        assert_eq!(serde_json::from_str::<Spooled>(&without).unwrap(), line);
    }

    /// The fields each operation's line has carried since its variant was first spooled. A new variant must be
    /// named here (the match is exhaustive); a new field of an existing one must default.
    fn first_format(op: &Op) -> &'static [&'static str] {
        match op {
            Op::IncidentOpened { .. } => &["op", "provider", "alertname", "scenario", "at"],
            Op::IncidentProgress { .. } => &["op", "provider", "alertname", "scenario", "tally"],
            Op::IncidentResolved { .. } => &["op", "provider", "alertname", "at"],
            Op::OutboxPut(_) => &["op", "id", "target", "kind", "payload", "created_at_ms"],
            Op::OutboxDone { .. } => &["op", "id"],
            Op::StatePut { .. } => &["op", "exchange", "alertname", "payload"],
            Op::StateClear { .. } => &["op", "exchange", "alertname"],
            Op::Event { .. } => &["op", "id", "exchange", "at", "kind", "detail"],
        }
    }

    #[test]
    fn every_spooled_field_added_after_the_first_format_defaults_when_missing() {
        let (provider, alertname, scenario) =
            ("kraken".to_owned(), "exchange_api_down".to_owned(), "network".to_owned());
        let tally = Tally { last_error: Some("timed out".into()), failed_calls: 3, total_calls: 4 };
        let ops = [
            Op::IncidentOpened {
                provider: provider.clone(),
                alertname: alertname.clone(),
                scenario: scenario.clone(),
                at: Utc::now(),
                first_error: Some("refused".into()),
                tally: tally.clone(),
            },
            Op::IncidentProgress {
                provider: provider.clone(),
                alertname: alertname.clone(),
                scenario,
                tally: tally.clone(),
            },
            Op::IncidentResolved { provider, alertname: alertname.clone(), at: Utc::now() },
            Op::OutboxPut(OutboxRow {
                id: "x".into(),
                target: "webhook".into(),
                kind: "firing".into(),
                payload: "{}".into(),
                created_at_ms: 1,
            }),
            Op::OutboxDone { id: "x".into() },
            Op::StatePut { exchange: "kraken".into(), alertname: alertname.clone(), payload: "{}".into() },
            Op::StateClear { exchange: "kraken".into(), alertname },
            Op::Event { id: "e".into(), event: Event::now("kraken", crate::journal::Kind::Breaker, "CLOSED -> OPEN") },
        ];
        for op in ops {
            assert_later_fields_default(&op, first_format(&op));
            let line = Spooled { version: SPOOL_VERSION, queued_at_ms: 1, op };
            assert_later_fields_default(&line, &["version", "queued_at_ms", "op"]);
        }
        assert_later_fields_default(&tally, &["failed_calls", "total_calls"]);
    }

    #[tokio::test]
    async fn a_previous_runs_spooled_write_in_an_older_format_is_replayed_not_dropped() {
        let temp = tempfile::tempdir().unwrap();
        let config = recorder_config(temp.path());
        // An incident opening as spooled before openings carried their streak's tally.
        let older = r#"{"version":1,"queued_at_ms":5,"op":{"op":"incident_opened","provider":"kraken","alertname":"exchange_api_down","scenario":"network","at":"2025-01-15T10:30:00Z"}}"#;
        write_spool_files(&config.spool_dir, &[("spool-000001.jsonl", Some(vec![older.to_owned()]))]);
        let registry = Registry::new();
        let (_handle, mut recorder) = channel(config, &registry).unwrap();
        let unreadable = [("reason", "unreadable_spool_line")];
        assert_eq!(sample(&registry, "exwatch_alert_recorder_dropped_total", &unreadable), 0.0);
        assert_eq!(sample(&registry, "exwatch_alert_recorder_queue_depth", &[]), 1.0);

        let database_config =
            crate::store::Config { sqlite_path: temp.path().join("exwatch.sqlite"), ..crate::store::Config::default() };
        let database = Database::connect(&database_config).await.unwrap();
        assert_eq!(recorder.replay(&database, "pod-a").await.unwrap(), 1);
        let open = database.open_incidents().await.unwrap();
        assert_eq!(open.len(), 1);
        assert_eq!((open[0].alertname.as_str(), open[0].first_error.as_ref()), ("exchange_api_down", None));
        assert_eq!((open[0].failed_calls, open[0].total_calls), (0, 0));
        assert_eq!(sample(&registry, "exwatch_alert_recorder_queue_depth", &[]), 0.0);
        database.close().await;
    }
}
