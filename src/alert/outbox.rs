//! Delivery: every notification goes into one queue per sink target and is retried with exponential backoff until
//! delivered, rejected by the receiver (400, 422) or expired; each queue is strictly in order, so an alert's
//! resolve never overtakes its firing. Alertmanager targets also get the firing alerts re-sent every
//! `resend_interval` with the current annotations (a changed scenario shows there) and `endsAt` ahead.
//!
//! Durability: with a database, every firing and resolved notification is written to `alert_outbox` and deleted
//! once done, and the alerts firing now are kept in `alert_state` (through [`store::alerts`], in order, retried
//! while the database is away). At start-up [`Outbox::restore`] reloads both, so a restart neither pages again
//! (the rules resume firing silently) nor forgets to resolve (the pending rows are delivered). Delivery never
//! waits for the database: a notification made while it is away is sent from memory all the same.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use axum::Router;
use chrono::Utc;
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry};
use serde::Serialize;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::exchange::kraken::transport::Transport;
use crate::poller::sleep_until_some;
use crate::store::alerts::{self as stored, Op, OutboxRow};
use crate::telemetry;

use super::notification::{Alert, Kind};
use super::sink::{self, Target};

/// The `[alerts.delivery]` section.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Config {
    /// The wait after the first failed attempt; it doubles per failure up to `max_backoff`.
    #[serde(serialize_with = "crate::config::human_duration")]
    pub initial_backoff: Duration,
    #[serde(serialize_with = "crate::config::human_duration")]
    pub max_backoff: Duration,
    /// A notification not delivered this long after it was made is dropped (and counted).
    #[serde(serialize_with = "crate::config::human_duration")]
    pub expire_after: Duration,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(30),
            expire_after: Duration::from_secs(24 * 3600),
        }
    }
}

/// The alert engines' way to the sinks. Cheap to clone.
#[derive(Clone)]
pub struct Outbox {
    shared: Arc<Shared>,
}

struct Shared {
    config: Config,
    targets: Vec<Arc<Target>>,
    /// One per target, in the order of `targets`; tests swap in an in-memory router before the loops start.
    transports: Mutex<Vec<Arc<Transport>>>,
    wakers: Vec<Notify>,
    state: Mutex<State>,
    recorder: Option<stored::Handle>,
    metrics: Metrics,
}

#[derive(Default)]
struct State {
    /// One queue per target, in the order of `targets`.
    queues: Vec<VecDeque<Entry>>,
    /// The alerts firing now, by key; the source of re-sends.
    active: BTreeMap<String, Alert>,
}

#[derive(Debug, Clone)]
struct Entry {
    id: String,
    kind: Kind,
    alert: Alert,
    /// When it was made (for its age, expiry and the delivery latency).
    made: Instant,
    attempts: u32,
    next_attempt: Instant,
    /// Whether a row in `alert_outbox` stands for it.
    durable: bool,
}

impl Entry {
    /// A notification made at `made`, due now.
    fn new(id: String, kind: Kind, alert: Alert, made: Instant, durable: bool) -> Entry {
        Entry { id, kind, alert, made, attempts: 0, next_attempt: Instant::now(), durable }
    }
}

/// The outcome of sending one notification to one target, for `exwatch alerts test`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    pub sink: String,
    pub ok: bool,
    pub detail: String,
    pub latency_ms: u128,
}

impl Outbox {
    /// The outbox for `sinks`; `recorder` makes it durable.
    pub fn new(
        sinks: &[sink::Config],
        config: Config,
        registry: &Registry,
        recorder: Option<stored::Handle>,
    ) -> anyhow::Result<Outbox> {
        let targets: Vec<Arc<Target>> = Target::all(sinks).into_iter().map(Arc::new).collect();
        let transports = targets
            .iter()
            .map(|target| {
                Transport::http(target.sink.timeout)
                    .map(Arc::new)
                    .map_err(|error| anyhow::anyhow!("cannot build the HTTP client of sink {}: {error}", target.label))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let labels: Vec<String> = targets.iter().map(|target| target.label.clone()).collect();
        let shared = Arc::new_cyclic(|weak: &Weak<Shared>| Shared {
            metrics: Metrics::new(registry, &labels, weak.clone()),
            wakers: targets.iter().map(|_| Notify::new()).collect(),
            state: Mutex::new(State { queues: targets.iter().map(|_| VecDeque::new()).collect(), ..State::default() }),
            transports: Mutex::new(transports),
            targets,
            config,
            recorder,
        });
        Ok(Outbox { shared })
    }

    /// Sends every target's requests to `router` instead of the network (paused-clock tests).
    pub fn deliver_in_memory(&self, router: Router) {
        let transport = Arc::new(Transport::InMemory(router));
        let mut transports = self.shared.transports.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        transports.iter_mut().for_each(|slot| *slot = transport.clone());
    }

    pub fn target_count(&self) -> usize {
        self.shared.targets.len()
    }

    /// A new alert fired: remembered as active and queued for every target. `incident` (`exchange_api_down`'s
    /// [`Op::IncidentOpened`]) opens the incident row first.
    pub fn fire(&self, alert: Alert, incident: Option<Op>) {
        let shared = &self.shared;
        if let Some(incident) = incident {
            shared.record(incident);
        }
        shared.save_state(&alert);
        let mut state = shared.lock();
        state.active.insert(alert.key(), alert.clone());
        shared.enqueue(&mut state, Kind::Firing, &alert);
    }

    /// Progress on an open incident ([`Op::IncidentProgress`]: its calls, scenario and latest error), recorded in
    /// order with the rest.
    pub fn incident_progress(&self, progress: Op) {
        self.shared.record(progress);
    }

    /// A firing alert's annotations changed (scenario, evidence): kept for the next re-send and for a restart.
    pub fn update(&self, alert: Alert) {
        let shared = &self.shared;
        let mut state = shared.lock();
        if state.active.get(&alert.key()) == Some(&alert) {
            return;
        }
        state.active.insert(alert.key(), alert.clone());
        drop(state);
        shared.save_state(&alert);
    }

    /// The alert resolved (`ends_at` set): forgotten as active and its resolve queued for every target.
    pub fn resolve(&self, alert: Alert) {
        let shared = &self.shared;
        let (exchange, alertname) = (alert.label("exchange").to_owned(), alert.label("alertname").to_owned());
        if alertname == super::DOWN {
            shared.record(Op::IncidentResolved {
                provider: exchange.clone(),
                alertname: alertname.clone(),
                at: alert.ends_at.unwrap_or_else(Utc::now),
            });
        }
        shared.record(Op::StateClear { exchange, alertname });
        let mut state = shared.lock();
        state.active.remove(&alert.key());
        shared.enqueue(&mut state, Kind::Resolved, &alert);
    }

    /// Reloads what a previous run left: the alerts that were firing (returned, for the rules to resume them
    /// without paging) and the undelivered notifications, queued ahead of anything new. Rows for a target that
    /// no longer exists are dropped with an error.
    pub fn restore(&self, firing: Vec<Alert>, rows: Vec<OutboxRow>) -> Vec<Alert> {
        let shared = &self.shared;
        let now = Instant::now();
        let mut state = shared.lock();
        for alert in &firing {
            state.active.insert(alert.key(), alert.clone());
        }
        let mut restored = vec![0_usize; shared.targets.len()];
        for row in rows {
            let parsed = Kind::parse(&row.kind).zip(serde_json::from_str::<Alert>(&row.payload).ok());
            let index = shared.targets.iter().position(|target| target.label == row.target);
            let (Some((kind, alert)), Some(index)) = (parsed, index) else {
                tracing::error!(target = row.target, kind = row.kind, "Dropping a stored notification no sink takes.");
                shared.record(Op::OutboxDone { id: row.id });
                continue;
            };
            let age_ms = u64::try_from(Utc::now().timestamp_millis() - row.created_at_ms).unwrap_or(0);
            let made = now.checked_sub(Duration::from_millis(age_ms)).unwrap_or(now);
            state.queues[index].push_back(Entry::new(row.id, kind, alert, made, true));
            restored[index] += 1;
        }
        for (index, count) in restored.into_iter().enumerate().filter(|(_, count)| *count > 0) {
            tracing::info!(sink = shared.targets[index].label, count, "Restored undelivered notifications.");
            shared.wakers[index].notify_one();
        }
        firing
    }

    /// Sends a test alert to every target now, outside the queues, and reports each result.
    pub async fn test(&self, alert: &Alert) -> Vec<Report> {
        let transports = self.shared.transports();
        let mut reports = Vec::new();
        for (target, transport) in self.shared.targets.iter().zip(transports) {
            let started = Instant::now();
            let result = target.send(&transport, alert, Utc::now()).await;
            let latency_ms = started.elapsed().as_millis();
            let (ok, detail) = match result {
                Ok(()) => (true, "delivered".to_owned()),
                Err(failure) => (false, failure.message),
            };
            reports.push(Report { sink: target.label.clone(), ok, detail, latency_ms });
        }
        reports
    }

    /// Delivers until `stop`; then keeps delivering what is queued for at most `drain` (what is left stays in
    /// `alert_outbox` for the next start). A sink's loop that dies is an error (the others are stopped with it):
    /// the daemon must not go on with one sink silently undelivered.
    pub async fn run(self, stop: CancellationToken, drain: Duration) -> anyhow::Result<()> {
        let transports = self.shared.transports();
        let mut loops = tokio::task::JoinSet::new();
        let mut sinks = BTreeMap::new();
        for (index, transport) in transports.into_iter().enumerate() {
            let started = loops.spawn(deliver(self.shared.clone(), index, transport, stop.clone(), drain));
            sinks.insert(started.id(), self.shared.targets[index].label.clone());
        }
        while let Some(joined) = loops.join_next().await {
            if let Err(error) = joined {
                // Returning drops `loops`, which stops the other sinks' loops.
                let sink = sinks.get(&error.id()).map_or("?", String::as_str);
                anyhow::bail!("the delivery loop of sink {sink} died: {error}");
            }
        }
        let left: usize = self.shared.lock().queues.iter().map(VecDeque::len).sum();
        if left > 0 {
            let durable = self.shared.recorder.is_some();
            tracing::warn!(left, durable, "Stopping with notifications undelivered.");
        }
        Ok(())
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn transports(&self) -> Vec<Arc<Transport>> {
        self.transports.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }

    fn record(&self, op: Op) {
        if let Some(recorder) = &self.recorder {
            recorder.send(op);
        }
    }

    fn save_state(&self, alert: &Alert) {
        if self.recorder.is_some()
            && let Ok(payload) = serde_json::to_string(alert)
        {
            self.record(Op::StatePut {
                exchange: alert.label("exchange").to_owned(),
                alertname: alert.label("alertname").to_owned(),
                payload,
            });
        }
    }

    /// Queues `alert` for every target that takes `kind`. Firing and resolved notifications are written to the
    /// outbox table; re-sends are not (a restart makes new ones from the restored state).
    fn enqueue(&self, state: &mut State, kind: Kind, alert: &Alert) {
        let now = Instant::now();
        for (index, target) in self.targets.iter().enumerate() {
            if !target.wants(kind) {
                continue;
            }
            let id = Uuid::now_v7().to_string();
            let durable = self.recorder.is_some() && kind != Kind::Resend;
            if durable && let Ok(payload) = serde_json::to_string(alert) {
                self.record(Op::OutboxPut(OutboxRow {
                    id: id.clone(),
                    target: target.label.clone(),
                    kind: kind.as_str().to_owned(),
                    payload,
                    created_at_ms: Utc::now().timestamp_millis(),
                }));
            }
            state.queues[index].push_back(Entry::new(id, kind, alert.clone(), now, durable));
            self.wakers[index].notify_one();
        }
    }

    /// Queues a re-send of every active alert that has nothing waiting for this target yet.
    fn queue_resends(&self, index: usize) {
        let mut state = self.lock();
        let waiting: Vec<String> = state.queues[index].iter().map(|entry| entry.alert.key()).collect();
        let due: Vec<Alert> = state.active.values().filter(|alert| !waiting.contains(&alert.key())).cloned().collect();
        let now = Instant::now();
        for alert in due {
            state.queues[index].push_back(Entry::new(Uuid::now_v7().to_string(), Kind::Resend, alert, now, false));
        }
    }

    /// Takes the entry that was at the front when the attempt started off the queue, and forgets its row.
    fn finish(&self, index: usize, id: &str) {
        let mut state = self.lock();
        if let Some(position) = state.queues[index].iter().position(|entry| entry.id == id)
            && let Some(entry) = state.queues[index].remove(position)
            && entry.durable
        {
            self.record(Op::OutboxDone { id: entry.id });
        }
    }
}

/// One target's loop: the front entry when it is due, re-sends on their interval.
async fn deliver(
    shared: Arc<Shared>,
    index: usize,
    transport: Arc<Transport>,
    stop: CancellationToken,
    drain: Duration,
) {
    let target = shared.targets[index].clone();
    let label = target.label.as_str();
    let resend_interval = target.resend_interval();
    let mut next_resend = resend_interval.map(|interval| Instant::now() + interval);
    let mut drain_deadline: Option<Instant> = None;
    loop {
        let front = shared.lock().queues[index].front().cloned();
        if drain_deadline.is_none() && stop.is_cancelled() {
            drain_deadline = Some(Instant::now() + drain);
        }
        if let Some(deadline) = drain_deadline
            && (front.is_none() || Instant::now() >= deadline)
        {
            return;
        }
        let now = Instant::now();
        if let Some(resend) = next_resend
            && now >= resend
            && drain_deadline.is_none()
        {
            shared.queue_resends(index);
            next_resend = resend_interval.map(|interval| now + interval);
            continue;
        }
        let Some(entry) = front.clone().filter(|entry| entry.next_attempt <= now) else {
            // Nothing due: wait for a new entry, the front's next attempt, a re-send, or the stop.
            let wake = front.map(|entry| entry.next_attempt).into_iter().chain(next_resend).min();
            let wake = match drain_deadline {
                Some(deadline) => Some(wake.map_or(deadline, |wake| wake.min(deadline))),
                None => wake,
            };
            tokio::select! {
                () = shared.wakers[index].notified() => {}
                () = sleep_until_some(wake) => {}
                () = stop.cancelled(), if drain_deadline.is_none() => {}
            }
            continue;
        };
        if entry.made + shared.config.expire_after <= now {
            tracing::error!(
                sink = label,
                kind = entry.kind.as_str(),
                alert = entry.alert.key(),
                "Notification expired undelivered."
            );
            shared.metrics.expired.with_label_values(&[label]).inc();
            shared.finish(index, &entry.id);
            continue;
        }
        if entry.attempts > 0 {
            shared.metrics.retried.with_label_values(&[label]).inc();
        }
        match target.send(&transport, &entry.alert, Utc::now()).await {
            Ok(()) => {
                let latency = entry.made.elapsed();
                shared.metrics.sent.with_label_values(&[label]).inc();
                shared.metrics.latency.with_label_values(&[label]).observe(latency.as_secs_f64());
                tracing::info!(
                    sink = label,
                    kind = entry.kind.as_str(),
                    alert = entry.alert.key(),
                    attempts = entry.attempts + 1,
                    latency_ms = latency.as_millis() as u64,
                    "Notification delivered."
                );
                shared.finish(index, &entry.id);
            }
            Err(failure) if !failure.retry => {
                shared.metrics.failed.with_label_values(&[label]).inc();
                shared.metrics.rejected.with_label_values(&[label]).inc();
                tracing::error!(
                    sink = label,
                    kind = entry.kind.as_str(),
                    alert = entry.alert.key(),
                    error = failure.message,
                    "Receiver rejected the notification; dropping it."
                );
                shared.finish(index, &entry.id);
            }
            Err(failure) => {
                shared.metrics.failed.with_label_values(&[label]).inc();
                let attempts = entry.attempts + 1;
                let backoff = backoff(&shared.config, attempts);
                tracing::warn!(
                    sink = label,
                    kind = entry.kind.as_str(),
                    alert = entry.alert.key(),
                    attempts,
                    retry_in = %humantime::format_duration(backoff),
                    error = failure.message,
                    "Notification not delivered; will retry."
                );
                let mut state = shared.lock();
                if let Some(front) = state.queues[index].front_mut().filter(|front| front.id == entry.id) {
                    front.attempts = attempts;
                    front.next_attempt = Instant::now() + backoff;
                }
            }
        }
    }
}

/// `initial_backoff * 2^(attempts-1)`, at most `max_backoff`.
fn backoff(config: &Config, attempts: u32) -> Duration {
    let doublings = attempts.saturating_sub(1).min(20);
    config.initial_backoff.saturating_mul(1 << doublings).min(config.max_backoff)
}

/// Delivery metrics by sink target. Queue depth and the oldest entry's age are read from the queues at scrape.
struct Metrics {
    sent: IntCounterVec,
    failed: IntCounterVec,
    retried: IntCounterVec,
    expired: IntCounterVec,
    rejected: IntCounterVec,
    latency: HistogramVec,
}

impl Metrics {
    fn new(registry: &Registry, labels: &[String], shared: Weak<Shared>) -> Metrics {
        let counter = |name: &str, help: &str| {
            let counter = IntCounterVec::new(Opts::new(name, help), &["sink"]).expect("valid metric definition");
            let counter = telemetry::register(registry, counter);
            for label in labels {
                counter.with_label_values(&[label.as_str()]).reset();
            }
            counter
        };
        let metrics = Metrics {
            sent: counter("exwatch_notifications_sent_total", "Notifications delivered, by sink."),
            failed: counter("exwatch_notifications_failed_total", "Delivery attempts that failed, by sink."),
            retried: counter("exwatch_notifications_retried_total", "Delivery attempts that were retries, by sink."),
            expired: counter(
                "exwatch_notifications_expired_total",
                "Notifications dropped undelivered after alerts.delivery.expire_after, by sink.",
            ),
            rejected: counter(
                "exwatch_notifications_rejected_total",
                "Notifications the receiver refused as invalid (400, 422) and that were dropped, by sink.",
            ),
            latency: telemetry::register(
                registry,
                HistogramVec::new(
                    HistogramOpts::new(
                        "exwatch_notification_delivery_seconds",
                        "From a notification being made to its delivery, by sink.",
                    )
                    .buckets(vec![0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0]),
                    &["sink"],
                )
                .expect("valid metric definition"),
            ),
        };
        for label in labels {
            metrics.latency.with_label_values(&[label.as_str()]);
        }
        let queues = QueueCollector {
            shared,
            depth: IntGaugeVec::new(
                Opts::new("exwatch_alert_outbox_depth", "Notifications waiting for delivery, by sink."),
                &["sink"],
            )
            .expect("valid metric definition"),
            oldest: GaugeVec::new(
                Opts::new(
                    "exwatch_alert_outbox_oldest_seconds",
                    "Age of the oldest notification waiting for delivery (0 when none), by sink.",
                ),
                &["sink"],
            )
            .expect("valid metric definition"),
        };
        if let Err(error) = registry.register(Box::new(queues)) {
            tracing::error!(error = %error, "Cannot register the outbox queue metrics.");
        }
        metrics
    }
}

/// Reads the queues at scrape time, so the oldest entry's age is current without a timer.
struct QueueCollector {
    shared: Weak<Shared>,
    depth: IntGaugeVec,
    oldest: GaugeVec,
}

impl Collector for QueueCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.depth.desc().into_iter().chain(self.oldest.desc()).collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        if let Some(shared) = self.shared.upgrade() {
            let now = Instant::now();
            let state = shared.lock();
            for (target, queue) in shared.targets.iter().zip(&state.queues) {
                let label = [target.label.as_str()];
                self.depth.with_label_values(&label).set(queue.len() as i64);
                let age = queue.iter().map(|entry| now.saturating_duration_since(entry.made)).max().unwrap_or_default();
                self.oldest.with_label_values(&label).set(age.as_secs_f64());
            }
        }
        self.depth.collect().into_iter().chain(self.oldest.collect()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let config = Config::default();
        let waits: Vec<u64> = (1..=7).map(|attempts| backoff(&config, attempts).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 30, 30]);
        assert_eq!(backoff(&config, u32::MAX), config.max_backoff);
    }
}
