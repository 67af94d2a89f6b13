//! Delivery: every notification goes into one queue per sink target and is retried with exponential backoff until
//! delivered, expired, or rejected by the receiver (400, 422) three times a pause apart; each queue is in order,
//! so an alert's resolve never overtakes its firing (a new firing supersedes an undelivered resolve of the same
//! alert instead). Alertmanager targets also get the firing alerts re-sent every `resend_interval` with the
//! current annotations (a changed scenario shows there) and `endsAt` ahead.
//!
//! Durability: with a database, every firing and resolved notification is written to `alert_outbox` and deleted
//! once done, and the alerts firing now are kept in `alert_state` with the sink targets their firing was queued
//! for (through [`store::alerts`], in order, retried while the database is away). At start-up [`Outbox::restore`]
//! reloads both, so a restart neither pages again (the rules resume firing silently) nor forgets to resolve (the
//! pending rows are delivered), and a target added since (or whose URL changed) gets the firing it never had.
//! Delivery never waits for the database: a notification made while it is away is sent from memory all the same.
//!
//! Replicas: every replica sends the same alert (identical labels, so Alertmanager holds one alert), and the last
//! replica to stop firing ends it. With a database, a resolve waits while another replica's `alert_state` row says
//! that replica still fires the alert (a row is fresh while its replica renews it, every `resend_interval`);
//! without a look at the database taken after the resolve was queued it waits at most four such intervals.
//!
//! It does not decide when alerts fire (the rules do) nor what the payloads look like (`notification`, `sink`).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::Duration;

use chrono::Utc;
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::clock::sleep_until_some;
use crate::journal::{self, Event, Journal as _};
use crate::store::alerts::{self as stored, Op, OutboxRow};
use crate::store::connector::Connector;
use crate::telemetry;
use crate::transport::Transport;

use super::notification::{self, Alert, Kind};
use super::sink::{self, Target};

/// The `[alerts.delivery]` section.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Config {
    /// The wait after the first failed attempt; it doubles per failure up to `max_backoff`.
    #[serde(serialize_with = "crate::clock::human_duration")]
    pub initial_backoff: Duration,
    #[serde(serialize_with = "crate::clock::human_duration")]
    pub max_backoff: Duration,
    /// A notification not delivered this long after it was made is dropped (and counted).
    #[serde(serialize_with = "crate::clock::human_duration")]
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

/// How many times a firing or resolve the receiver rejects (400, 422) is tried again, `max_backoff` apart: a
/// receiver mid-deploy or a proxy in the way rejects for a while, and a dropped page is the worst outcome.
const REJECTED_RETRIES: u32 = 2;

/// How often the other replicas' alerts are read without an Alertmanager sink to take the interval from.
const DEFAULT_PEER_INTERVAL: Duration = Duration::from_secs(60);

/// A replica's `alert_state` rows count as firing while renewed within this many intervals (as Alertmanager's
/// lease: a replica restarting within it keeps its claim).
const STALE_INTERVALS: u32 = 4;

/// The longest one look at the other replicas' alerts may take.
const LOOK_TIMEOUT: Duration = Duration::from_secs(10);

/// An `alert_state` row's payload: the firing alert and the identities ([`Target::identity`]) of the targets its
/// firing was queued for. Rows written before exwatch recorded them have none and count as queued everywhere.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FiringState {
    #[serde(flatten)]
    pub alert: Alert,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub targets: Option<BTreeSet<String>>,
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
    /// Where the other replicas' alerts are read, with a database ([`Outbox::coordinate`]).
    peers: OnceLock<PeerSource>,
    /// Asks for a look at the other replicas' alerts now (a resolve was queued).
    peer_wake: Notify,
    /// How often this replica renews its `alert_state` rows and reads the others'.
    peer_interval: Duration,
    metrics: Metrics,
}

struct PeerSource {
    connector: Arc<Connector>,
    instance: String,
}

#[derive(Default)]
struct State {
    /// One queue per target, in the order of `targets`.
    queues: Vec<VecDeque<Entry>>,
    /// The alerts firing now, by key; the source of re-sends.
    active: BTreeMap<String, Alert>,
    peers: PeerView,
}

/// What the other replicas have firing, as the last look at the shared database showed it.
#[derive(Debug, Default)]
struct PeerView {
    /// Whether there are replicas to wait for at all (there may be with a database).
    enabled: bool,
    /// Keys ([`Alert::key`]) of the alerts another replica fires, renewed within the staleness bound.
    firing: BTreeSet<String>,
    /// When the last successful look started.
    taken: Option<Instant>,
    /// When the last finished look, successful or not, started.
    attempted: Option<Instant>,
}

impl PeerView {
    /// Until when `entry` waits, if it does: only a resolve waits, until a look started after it was queued
    /// shows no other replica firing its alert. Without a successful look for `stale_after` it goes (the
    /// database is away: a resolve is late at most that long, and may then end an alert another replica fires).
    fn hold(&self, entry: &Entry, now: Instant, stale_after: Duration) -> Option<Instant> {
        if !self.enabled || entry.kind != Kind::Resolved {
            return None;
        }
        if self.attempted.is_none_or(|attempted| attempted < entry.queued) {
            let release = entry.queued.checked_add(stale_after)?;
            return (now < release).then_some(release);
        }
        let release = self.taken?.checked_add(stale_after)?;
        (now < release && self.firing.contains(&entry.alert.key())).then_some(release)
    }
}

#[derive(Debug, Clone)]
struct Entry {
    id: String,
    kind: Kind,
    alert: Alert,
    /// When it was made (for its age, expiry and the delivery latency).
    made: Instant,
    /// When this process queued it (a restored entry was made before).
    queued: Instant,
    attempts: u32,
    /// How many attempts the receiver rejected as invalid.
    rejections: u32,
    next_attempt: Instant,
    /// Whether a row in `alert_outbox` stands for it.
    durable: bool,
}

impl Entry {
    /// A notification made at `made`, due now.
    fn new(id: String, kind: Kind, alert: Alert, made: Instant, durable: bool) -> Entry {
        let now = Instant::now();
        Entry { id, kind, alert, made, queued: now, attempts: 0, rejections: 0, next_attempt: now, durable }
    }
}

/// What a target's loop does next.
struct Next {
    /// The entry to attempt (or to drop as expired) now.
    due: Option<Entry>,
    /// When something may become due.
    wake: Option<Instant>,
    /// Whether any entry is waiting for its attempt rather than for the other replicas.
    sendable: bool,
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
                Transport::http()
                    .map(Arc::new)
                    .map_err(|error| anyhow::anyhow!("cannot build the HTTP client of sink {}: {error}", target.label))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let labels: Vec<String> = targets.iter().map(|target| target.label.clone()).collect();
        let peer_interval =
            targets.iter().filter_map(|target| target.resend_interval()).min().unwrap_or(DEFAULT_PEER_INTERVAL);
        let shared = Arc::new_cyclic(|weak: &Weak<Shared>| Shared {
            metrics: Metrics::new(registry, &labels, weak.clone()),
            wakers: targets.iter().map(|_| Notify::new()).collect(),
            state: Mutex::new(State { queues: targets.iter().map(|_| VecDeque::new()).collect(), ..State::default() }),
            transports: Mutex::new(transports),
            targets,
            config,
            recorder,
            peers: OnceLock::new(),
            peer_wake: Notify::new(),
            peer_interval: peer_interval.min(DEFAULT_PEER_INTERVAL),
        });
        Ok(Outbox { shared })
    }

    /// Coordinates with the other replicas through the shared database: this replica's `alert_state` rows are
    /// renewed every interval, and a resolve waits while another replica's rows say it fires the alert.
    pub fn coordinate(&self, connector: Arc<Connector>, instance: &str) {
        if self.shared.peers.set(PeerSource { connector, instance: instance.to_owned() }).is_ok() {
            self.shared.lock().peers.enabled = true;
        }
    }

    /// Sends every target's requests to `router` instead of the network (paused-clock tests).
    #[cfg(any(test, feature = "test-util"))]
    pub fn deliver_in_memory(&self, router: axum::Router) {
        let transport = Arc::new(Transport::InMemory(router));
        let mut transports = self.shared.transports.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        transports.iter_mut().for_each(|slot| *slot = transport.clone());
    }

    pub fn target_count(&self) -> usize {
        self.shared.targets.len()
    }

    /// A new alert fired: remembered as active and queued for every target. `incident` (`exchange_api_down`'s
    /// [`Op::IncidentOpened`]) opens the incident row first.
    /// Writes a journal event in order with the outbox's own records (nothing without a database).
    pub fn record_event(&self, event: Event) {
        if let Some(recorder) = &self.shared.recorder {
            recorder.record(event);
        }
    }

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

    /// A firing alert's annotations changed (scenario, evidence): kept for the next re-send and for a restart. A
    /// changed scenario also goes to webhooks once, as an update ([`Kind::Update`]); evidence alone does not.
    pub fn update(&self, alert: Alert) {
        let shared = &self.shared;
        let mut state = shared.lock();
        let previous = state.active.insert(alert.key(), alert.clone());
        if previous.as_ref() == Some(&alert) {
            return;
        }
        let scenario = |alert: &Alert| alert.annotations.get("scenario").cloned();
        if previous.is_some_and(|previous| scenario(&previous) != scenario(&alert)) {
            shared.enqueue(&mut state, Kind::Update, &alert);
        }
        drop(state);
        shared.save_state(&alert);
    }

    /// The alert resolved (`ends_at` set): forgotten as active and its resolve queued for every target.
    pub fn resolve(&self, alert: Alert) {
        let shared = &self.shared;
        let (exchange, alertname) = (alert.label("exchange").to_owned(), alert.label("alertname").to_owned());
        if alertname == super::AlertName::Down.as_str() {
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
    /// no longer exists are dropped with an error. A target with no record of a firing alert (added since, or
    /// its URL changed) gets the firing now.
    pub fn restore(&self, firing: Vec<FiringState>, rows: Vec<OutboxRow>) -> Vec<Alert> {
        let shared = &self.shared;
        let now = Instant::now();
        let mut state = shared.lock();
        for stored in &firing {
            state.active.insert(stored.alert.key(), stored.alert.clone());
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
        let mut alerts = Vec::new();
        for FiringState { alert, targets } in firing {
            let key = alert.key();
            let had = |index: usize, target: &Target| {
                !target.wants(Kind::Firing)
                    || targets.as_ref().is_none_or(|targets| targets.contains(&target.identity()))
                    || state.queues[index].iter().any(|entry| entry.kind == Kind::Firing && entry.alert.key() == key)
            };
            let missing: Vec<usize> = shared
                .targets
                .iter()
                .enumerate()
                .filter(|(index, target)| !had(*index, target))
                .map(|(index, _)| index)
                .collect();
            for &index in &missing {
                tracing::info!(
                    sink = shared.targets[index].label,
                    alert = key,
                    "Sending a firing alert to a sink that never had it."
                );
                shared.enqueue_one(&mut state, index, Kind::Firing, &alert);
            }
            if !missing.is_empty() {
                shared.save_state(&alert);
            }
            alerts.push(alert);
        }
        alerts
    }

    /// Sends a test alert to every target now, outside the queues, and reports each result.
    pub async fn test(&self, alert: &Alert) -> Vec<Report> {
        let transports = self.shared.transports();
        let mut reports = Vec::new();
        for (target, transport) in self.shared.targets.iter().zip(transports) {
            let started = Instant::now();
            let result = target.send(&transport, Kind::Test, alert, Utc::now()).await;
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
        let peers = tokio::spawn(watch_peers(self.shared.clone(), stop.clone()));
        let died = loop {
            match loops.join_next().await {
                None => break None,
                Some(Err(error)) => break Some(error),
                Some(Ok(())) => {}
            }
        };
        peers.abort();
        if let Some(error) = died {
            // Returning drops `loops`, which stops the other sinks' loops.
            let sink = sinks.get(&error.id()).map_or("?", String::as_str);
            anyhow::bail!("the delivery loop of sink {sink} died: {error}");
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

    /// Writes a journal event about `alert`'s delivery, for its incident's timeline (not for re-sends).
    fn journal(&self, alert: &Alert, kind: Kind, detail: String) {
        if kind == Kind::Resend {
            return;
        }
        if let Some(recorder) = &self.recorder {
            let detail = format!("{} {}: {detail}", alert.label("alertname"), kind.as_str());
            recorder.record(Event::now(alert.label("exchange"), journal::Kind::Delivery, detail));
        }
    }

    /// How long a replica's renewal (or this replica's last look) counts.
    fn stale_after(&self) -> Duration {
        self.peer_interval.saturating_mul(STALE_INTERVALS)
    }

    /// Records `alert` as firing here, queued for every current target (each gets its firing when it fires, and
    /// [`Outbox::restore`] queues it for a target added since).
    fn save_state(&self, alert: &Alert) {
        let targets = self.targets.iter().filter(|target| target.wants(Kind::Firing)).map(|target| target.identity());
        let state = FiringState { alert: alert.clone(), targets: Some(targets.collect()) };
        if self.recorder.is_some()
            && let Ok(payload) = serde_json::to_string(&state)
        {
            self.record(Op::StatePut {
                exchange: alert.label("exchange").to_owned(),
                alertname: alert.label("alertname").to_owned(),
                payload,
            });
        }
    }

    /// Queues `alert` for every target that takes `kind`.
    fn enqueue(&self, state: &mut State, kind: Kind, alert: &Alert) {
        for index in 0..self.targets.len() {
            if self.targets[index].wants(kind) {
                self.enqueue_one(state, index, kind, alert);
            }
        }
        if kind == Kind::Resolved {
            self.peer_wake.notify_one();
        }
    }

    /// Queues `alert` for the target `index`. Firing and resolved notifications are written to the outbox table;
    /// re-sends are not (a restart makes new ones from the restored state). A firing supersedes a resolve of the
    /// same alert still queued: the receiver never learned that the alert ended, and it fires again.
    fn enqueue_one(&self, state: &mut State, index: usize, kind: Kind, alert: &Alert) {
        if kind == Kind::Firing {
            let key = alert.key();
            let mut superseded = Vec::new();
            state.queues[index].retain(|entry| {
                let keep = entry.kind != Kind::Resolved || entry.alert.key() != key;
                if !keep && entry.durable {
                    superseded.push(entry.id.clone());
                }
                keep
            });
            for id in superseded {
                self.record(Op::OutboxDone { id });
            }
        }
        let id = Uuid::now_v7().to_string();
        let durable = self.recorder.is_some() && kind != Kind::Resend;
        if durable && let Ok(payload) = serde_json::to_string(alert) {
            self.record(Op::OutboxPut(OutboxRow {
                id: id.clone(),
                target: self.targets[index].label.clone(),
                kind: kind.as_str().to_owned(),
                payload,
                created_at_ms: Utc::now().timestamp_millis(),
            }));
        }
        state.queues[index].push_back(Entry::new(id, kind, alert.clone(), Instant::now(), durable));
        self.wakers[index].notify_one();
    }

    /// The target `index`'s next step: the first entry not waiting for the other replicas, when it is due; an
    /// expired entry anywhere, to be dropped.
    fn next(&self, index: usize, now: Instant) -> Next {
        let stale_after = self.stale_after();
        let state = self.lock();
        let mut wake: Option<Instant> = None;
        for entry in &state.queues[index] {
            let expires = entry.made.checked_add(self.config.expire_after);
            if expires.is_some_and(|expires| expires <= now) {
                return Next { due: Some(entry.clone()), wake: None, sendable: true };
            }
            if let Some(release) = state.peers.hold(entry, now, stale_after) {
                wake = [wake, Some(release), expires].into_iter().flatten().min();
                continue;
            }
            if entry.next_attempt <= now {
                return Next { due: Some(entry.clone()), wake: None, sendable: true };
            }
            let wake = [wake, Some(entry.next_attempt)].into_iter().flatten().min();
            return Next { due: None, wake, sendable: true };
        }
        Next { due: None, wake, sendable: false }
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

    /// Changes the queued entry `id` after a failed attempt (it may have been superseded meanwhile).
    fn reschedule(&self, index: usize, id: &str, change: impl FnOnce(&mut Entry)) {
        if let Some(entry) = self.lock().queues[index].iter_mut().find(|entry| entry.id == id) {
            change(entry);
        }
    }

    /// Takes the entry that was attempted off the queue, and forgets its row.
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
        if drain_deadline.is_none() && stop.is_cancelled() {
            drain_deadline = Some(Instant::now() + drain);
        }
        let now = Instant::now();
        let next = shared.next(index, now);
        if let Some(deadline) = drain_deadline
            && (!next.sendable || now >= deadline)
        {
            return;
        }
        if let Some(resend) = next_resend
            && now >= resend
            && drain_deadline.is_none()
        {
            shared.queue_resends(index);
            next_resend = resend_interval.map(|interval| now + interval);
            continue;
        }
        let Some(entry) = next.due else {
            // Nothing due: wait for a new entry, the next attempt, a re-send, a look at the other replicas (it
            // wakes every loop), or the stop.
            let wake = next.wake.into_iter().chain(next_resend).chain(drain_deadline).min();
            tokio::select! {
                () = shared.wakers[index].notified() => {}
                () = sleep_until_some(wake) => {}
                () = stop.cancelled(), if drain_deadline.is_none() => {}
            }
            continue;
        };
        if entry.made.checked_add(shared.config.expire_after).is_some_and(|expires| expires <= now) {
            tracing::error!(
                sink = label,
                kind = entry.kind.as_str(),
                alert = entry.alert.key(),
                "Notification expired undelivered."
            );
            shared.metrics.expired.with_label_values(&[label]).inc();
            shared.journal(&entry.alert, entry.kind, format!("expired undelivered to {label}"));
            shared.finish(index, &entry.id);
            continue;
        }
        if entry.attempts > 0 {
            shared.metrics.retried.with_label_values(&[label]).inc();
        }
        match target.send(&transport, entry.kind, &entry.alert, Utc::now()).await {
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
                let attempts = entry.attempts + 1;
                shared.journal(&entry.alert, entry.kind, format!("delivered to {label} (attempt {attempts})"));
                shared.finish(index, &entry.id);
            }
            Err(failure) if !failure.retry => {
                shared.metrics.failed.with_label_values(&[label]).inc();
                shared.metrics.rejected.with_label_values(&[label]).inc();
                let rejections = entry.rejections + 1;
                // A re-send is renewed on the next interval anyway; a firing or resolve is tried again.
                if entry.kind == Kind::Resend || rejections > REJECTED_RETRIES {
                    tracing::error!(
                        sink = label,
                        kind = entry.kind.as_str(),
                        alert = entry.alert.key(),
                        rejections,
                        error = failure.message,
                        "Receiver rejected the notification; dropping it."
                    );
                    shared.journal(&entry.alert, entry.kind, format!("rejected by {label}: {}", failure.message));
                    shared.finish(index, &entry.id);
                    continue;
                }
                let pause = shared.config.max_backoff;
                tracing::error!(
                    sink = label,
                    kind = entry.kind.as_str(),
                    alert = entry.alert.key(),
                    rejections,
                    retry_in = %humantime::format_duration(pause),
                    error = failure.message,
                    "Receiver rejected the notification; trying again after a pause."
                );
                shared.reschedule(index, &entry.id, |queued| {
                    queued.attempts += 1;
                    queued.rejections = rejections;
                    queued.next_attempt = Instant::now() + pause;
                });
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
                shared.reschedule(index, &entry.id, |queued| {
                    queued.attempts = attempts;
                    queued.next_attempt = Instant::now() + backoff;
                });
            }
        }
    }
}

/// Every `peer_interval` (and when a resolve is queued): renews this replica's `alert_state` rows and reads which
/// alerts the other replicas fire, then wakes every target's loop. Nothing to do without a database.
async fn watch_peers(shared: Arc<Shared>, stop: CancellationToken) {
    let Some(source) = shared.peers.get() else { return };
    let stale_after = shared.stale_after();
    let mut failing = false;
    loop {
        let started = Instant::now();
        let look = async {
            let database = source.connector.database().await.map_err(|error| error.to_string())?;
            database.alert_state_renew(&source.instance).await.map_err(|error| error.to_string())?;
            database.alert_state_elsewhere(&source.instance, stale_after).await.map_err(|error| error.to_string())
        };
        let result = tokio::time::timeout(LOOK_TIMEOUT, look)
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {}", humantime::format_duration(LOOK_TIMEOUT))));
        let firing = {
            let mut state = shared.lock();
            state.peers.attempted = Some(started);
            if let Ok(elsewhere) = &result {
                state.peers.firing =
                    elsewhere.iter().map(|(exchange, alertname)| notification::key(exchange, alertname)).collect();
                state.peers.taken = Some(started);
            }
            state.peers.firing.len()
        };
        match result {
            Ok(_) if failing => {
                failing = false;
                tracing::info!(firing, "The other replicas' alerts are readable again.");
            }
            Err(error) if !failing => {
                failing = true;
                tracing::warn!(
                    error,
                    wait_at_most = %humantime::format_duration(stale_after),
                    "Cannot read the other replicas' alerts; a resolve waits for them at most this long."
                );
            }
            _ => {}
        }
        shared.wakers.iter().for_each(Notify::notify_one);
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(shared.peer_interval) => {}
            () = shared.peer_wake.notified() => {}
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
                "Delivery attempts the receiver refused as invalid (400, 422), by sink; a firing or resolve is \
                 tried twice more, a pause apart, then dropped.",
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
            held: IntGaugeVec::new(
                Opts::new(
                    "exwatch_alert_outbox_held",
                    "Resolves waiting while another replica still fires their alert (not in the depth), by sink.",
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

/// Reads the queues at scrape time, so the oldest entry's age is current without a timer. A resolve held for
/// the other replicas is counted apart: it is not a delivery problem.
struct QueueCollector {
    shared: Weak<Shared>,
    depth: IntGaugeVec,
    oldest: GaugeVec,
    held: IntGaugeVec,
}

impl Collector for QueueCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.depth.desc().into_iter().chain(self.oldest.desc()).chain(self.held.desc()).collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        if let Some(shared) = self.shared.upgrade() {
            let now = Instant::now();
            let stale_after = shared.stale_after();
            let state = shared.lock();
            for (target, queue) in shared.targets.iter().zip(&state.queues) {
                let label = [target.label.as_str()];
                let (held, waiting): (Vec<&Entry>, Vec<&Entry>) =
                    queue.iter().partition(|entry| state.peers.hold(entry, now, stale_after).is_some());
                self.depth.with_label_values(&label).set(waiting.len() as i64);
                self.held.with_label_values(&label).set(held.len() as i64);
                let age =
                    waiting.iter().map(|entry| now.saturating_duration_since(entry.made)).max().unwrap_or_default();
                self.oldest.with_label_values(&label).set(age.as_secs_f64());
            }
        }
        [&self.depth, &self.held].into_iter().flat_map(Collector::collect).chain(self.oldest.collect()).collect()
    }
}

#[cfg(test)]
mod tests {
    use axum::Router;

    use super::*;
    use crate::secret::Secret;
    use axum::http::StatusCode;

    fn webhook(name: &str) -> sink::Config {
        // Each target builds its (unused) HTTP client, which needs the process's TLS provider.
        let _ = rustls::crypto::ring::default_provider().install_default();
        sink::Config {
            name: name.to_owned(),
            kind: sink::SinkKind::Webhook {
                bearer_token: None,
                hmac_secret: None,
                signature_header: sink::DEFAULT_SIGNATURE_HEADER.to_owned(),
                headers: Vec::new(),
            },
            urls: vec![Secret::new(format!("http://receiver.test/{name}"))],
            timeout: Duration::from_secs(1),
        }
    }

    fn alert() -> Alert {
        let labels = [("alertname", "exchange_api_down"), ("severity", "critical"), ("exchange", "kraken")];
        Alert {
            labels: labels.into_iter().map(|(name, value)| (name.to_owned(), value.to_owned())).collect(),
            annotations: BTreeMap::new(),
            starts_at: Utc::now(),
            ends_at: None,
            generator_url: String::new(),
        }
    }

    fn resolved() -> Alert {
        Alert { ends_at: Some(Utc::now()), ..alert() }
    }

    /// A receiver answering each POST with the next of `answers` (200 once they run out), keeping each
    /// request's path and status.
    #[derive(Clone, Default)]
    struct Receiver {
        answers: Arc<Mutex<VecDeque<u16>>>,
        seen: Arc<Mutex<Vec<(String, String)>>>,
    }

    impl Receiver {
        fn answering(answers: &[u16]) -> Receiver {
            let receiver = Receiver::default();
            receiver.answers.lock().unwrap().extend(answers);
            receiver
        }

        fn router(&self) -> Router {
            let receiver = self.clone();
            Router::new().fallback(move |request: axum::extract::Request| {
                let receiver = receiver.clone();
                async move {
                    let path = request.uri().path().to_owned();
                    let body = axum::body::to_bytes(request.into_body(), 1 << 20).await.unwrap();
                    let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
                    receiver.seen.lock().unwrap().push((path, body["status"].as_str().unwrap().to_owned()));
                    let status = receiver.answers.lock().unwrap().pop_front().unwrap_or(200);
                    StatusCode::from_u16(status).unwrap()
                }
            })
        }

        fn seen(&self) -> Vec<(String, String)> {
            self.seen.lock().unwrap().clone()
        }
    }

    fn counter(registry: &Registry, name: &str, sink: &str) -> f64 {
        registry
            .gather()
            .iter()
            .filter(|family| family.name() == name)
            .flat_map(|family| family.get_metric())
            .filter(|metric| metric.get_label().iter().any(|label| label.value() == sink))
            .map(|metric| metric.get_counter().get_value())
            .sum()
    }

    /// An outbox for `sinks` delivering to `receiver`, not yet running.
    fn outbox(sinks: &[sink::Config], receiver: &Receiver) -> (Outbox, Registry) {
        let registry = Registry::new();
        let outbox = Outbox::new(sinks, Config::default(), &registry, None).unwrap();
        outbox.deliver_in_memory(receiver.router());
        (outbox, registry)
    }

    /// Runs `outbox` until the returned token is cancelled.
    fn start(outbox: &Outbox) -> CancellationToken {
        let stop = CancellationToken::new();
        tokio::spawn(outbox.clone().run(stop.clone(), Duration::ZERO));
        stop
    }

    fn started(sinks: &[sink::Config], receiver: &Receiver) -> (Outbox, Registry, CancellationToken) {
        let (outbox, registry) = outbox(sinks, receiver);
        let stop = start(&outbox);
        (outbox, registry, stop)
    }

    /// Lets the delivery loops run for `duration` of paused time.
    async fn run_for(duration: Duration) {
        tokio::time::sleep(duration).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_page_the_receiver_rejects_is_sent_again_after_a_pause_and_counted() {
        let receiver = Receiver::answering(&[422]);
        let (outbox, registry, _stop) = started(&[webhook("ops")], &receiver);
        outbox.fire(alert(), None);
        run_for(Duration::from_secs(1)).await;
        assert_eq!(receiver.seen().len(), 1, "first attempt rejected");
        assert_eq!(counter(&registry, "exwatch_notifications_rejected_total", "ops"), 1.0);
        // The pause is max_backoff (30 s by default).
        run_for(Duration::from_secs(25)).await;
        assert_eq!(receiver.seen().len(), 1, "not before the pause");
        run_for(Duration::from_secs(10)).await;
        let firing = ("/ops".to_owned(), "firing".to_owned());
        assert_eq!(receiver.seen(), [firing.clone(), firing]);
        assert_eq!(counter(&registry, "exwatch_notifications_sent_total", "ops"), 1.0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_resolve_the_receiver_keeps_rejecting_is_tried_three_times_then_dropped() {
        let receiver = Receiver::answering(&[400, 400, 400, 400]);
        let (outbox, registry, _stop) = started(&[webhook("ops")], &receiver);
        outbox.resolve(resolved());
        run_for(Duration::from_secs(600)).await;
        assert_eq!(receiver.seen().len(), 3, "{:?}", receiver.seen());
        assert_eq!(counter(&registry, "exwatch_notifications_rejected_total", "ops"), 3.0);
        assert_eq!(counter(&registry, "exwatch_notifications_sent_total", "ops"), 0.0);
        assert!(outbox.shared.lock().queues[0].is_empty(), "dropped after the third rejection");
    }

    #[tokio::test(start_paused = true)]
    async fn a_restored_firing_goes_to_a_sink_added_since_and_to_none_that_had_it() {
        let receiver = Receiver::default();
        let (outbox, _registry) = outbox(&[webhook("ops"), webhook("chat")], &receiver);
        // The previous run had `ops` only, and `chat` at another URL under the same name would be new too.
        let ops = Target::all(&[webhook("ops")]).remove(0).identity();
        let stored = FiringState { alert: alert(), targets: Some(BTreeSet::from([ops])) };
        let legacy = FiringState { alert: Alert { labels: BTreeMap::new(), ..alert() }, targets: None };
        let restored = outbox.restore(vec![stored, legacy], Vec::new());
        assert_eq!(restored.len(), 2);
        let _stop = start(&outbox);
        run_for(Duration::from_secs(5)).await;
        assert_eq!(receiver.seen(), [("/chat".to_owned(), "firing".to_owned())]);
    }

    #[test]
    fn a_sink_whose_url_changed_is_a_new_target() {
        let before = Target::all(&[webhook("ops")]).remove(0);
        let mut moved = webhook("ops");
        moved.urls = vec![Secret::new("http://elsewhere.test/ops")];
        let after = Target::all(&[moved]).remove(0);
        assert_ne!(before.identity(), after.identity());
        assert!(before.identity().starts_with("ops ") && !before.identity().contains("receiver.test"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_firing_supersedes_a_resolve_of_the_same_alert_still_queued() {
        let receiver = Receiver::default();
        let (outbox, _registry) = outbox(&[webhook("ops")], &receiver);
        outbox.fire(alert(), None);
        outbox.resolve(resolved());
        outbox.fire(alert(), None);
        let _stop = start(&outbox);
        run_for(Duration::from_secs(5)).await;
        let firing = ("/ops".to_owned(), "firing".to_owned());
        assert_eq!(receiver.seen(), [firing.clone(), firing]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_held_resolve_lets_other_alerts_go_ahead_and_goes_once_no_replica_fires_it() {
        let receiver = Receiver::default();
        let (outbox, registry) = outbox(&[webhook("ops")], &receiver);
        outbox.resolve(resolved());
        // A look after the resolve was queued: another replica still fires the alert.
        let now = Instant::now();
        let firing = BTreeSet::from([resolved().key()]);
        outbox.shared.lock().peers = PeerView { enabled: true, firing, taken: Some(now), attempted: Some(now) };
        let slow =
            Alert { labels: BTreeMap::from([("alertname".to_owned(), "exchange_api_slow".to_owned())]), ..alert() };
        outbox.fire(slow, None);
        let _stop = start(&outbox);
        run_for(Duration::from_secs(5)).await;
        assert_eq!(receiver.seen(), [("/ops".to_owned(), "firing".to_owned())], "the resolve waits, the firing not");
        let gauge = |name: &str| {
            let families = registry.gather();
            let family = families.iter().find(|family| family.name() == name).unwrap();
            family.get_metric()[0].get_gauge().get_value()
        };
        assert_eq!((gauge("exwatch_alert_outbox_held"), gauge("exwatch_alert_outbox_depth")), (1.0, 0.0));
        // The other replica resolved too: the next look lets it go.
        outbox.shared.lock().peers.firing.clear();
        outbox.shared.wakers.iter().for_each(Notify::notify_one);
        run_for(Duration::from_secs(1)).await;
        assert_eq!(receiver.seen().len(), 2);
        assert_eq!(receiver.seen()[1].1, "resolved");
    }

    fn queued(kind: Kind, at: Instant) -> Entry {
        let alert = if kind == Kind::Resolved { resolved() } else { alert() };
        Entry { queued: at, ..Entry::new("id".to_owned(), kind, alert, at, true) }
    }

    #[tokio::test(start_paused = true)]
    async fn a_resolve_waits_while_a_fresh_look_shows_another_replica_firing_its_alert() {
        let stale_after = Duration::from_secs(240);
        let start = Instant::now();
        let resolve = queued(Kind::Resolved, start);
        let key = resolve.alert.key();
        // Without a database there is nobody to wait for.
        assert_eq!(PeerView::default().hold(&resolve, start, stale_after), None);
        // No look since it was queued: it waits for one, at most `stale_after`.
        let mut view =
            PeerView { enabled: true, attempted: Some(start - Duration::from_secs(1)), ..PeerView::default() };
        assert_eq!(view.hold(&resolve, start, stale_after), Some(start + stale_after));
        assert_eq!(view.hold(&resolve, start + stale_after, stale_after), None);
        // A look after it was queued: another replica fires the alert, so it waits while that look is fresh.
        let looked = start + Duration::from_secs(2);
        view.attempted = Some(looked);
        view.taken = Some(looked);
        view.firing.insert(key.clone());
        assert_eq!(view.hold(&resolve, looked, stale_after), Some(looked + stale_after));
        assert_eq!(view.hold(&queued(Kind::Firing, start), looked, stale_after), None, "only resolves wait");
        // The database went away after that look: the claim lapses.
        assert_eq!(view.hold(&resolve, looked + stale_after, stale_after), None);
        // A look showing no replica firing it lets it go.
        view.firing.clear();
        assert_eq!(view.hold(&resolve, looked, stale_after), None);
        // A failed look after it was queued: the last good look decides (none firing it here).
        view.attempted = Some(looked + Duration::from_secs(60));
        assert_eq!(view.hold(&resolve, looked + Duration::from_secs(61), stale_after), None);
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let config = Config::default();
        let waits: Vec<u64> = (1..=7).map(|attempts| backoff(&config, attempts).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 30, 30]);
        assert_eq!(backoff(&config, u32::MAX), config.max_backoff);
    }
}
