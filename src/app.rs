//! The daemon assembled: [`App::build`] creates the exchange clients, the breaker and limiter of each, the call-log
//! writer and its database connection, metrics and the listener (port 0 allowed); [`App::run`] runs the poll loops,
//! the writer, retention, delivery, the recorder and the HTTP server until the root token is cancelled, then shuts
//! down in order: readiness goes 503, poll loops finish their current poll, the writer drains (what it cannot write
//! in time goes to the spool for the next start) while delivery sends what it can, the recorder writes, HTTP stops
//! last. The whole shutdown is bounded by one deadline, `server.shutdown_grace` from its start, carved into one slot
//! per stage (`Budget`): a stage still running at the end of its slot is aborted, so the pod's grace period is
//! never overrun. Every task (HTTP too) is supervised ([`supervisor`]): one that dies fails readiness and cancels
//! the root token, so the process exits non-zero instead of running blind. The database being down never stops the
//! daemon from starting.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::exchange::{self, Exchange};
use crate::http::{self, Readiness};
use crate::journal;
use crate::limiter::{self, Limiter};
use crate::poller::{self, Heartbeat, Poller};
use crate::statuspage;
use crate::store::{self, Sink, connector::Connector, writer};
use crate::telemetry;
use crate::websocket;
use crate::{alert, breaker};

use self::supervisor::Supervisor;

mod supervisor;

pub struct App {
    config: Config,
    server: http::serve::Server,
    exchanges: Vec<Arc<dyn Exchange>>,
    state: http::State,
    metrics: poller::Metrics,
    writer: writer::Writer,
    log: writer::Handle,
    /// The configured database; `None` when a test supplied its own sink.
    connector: Option<Arc<Connector>>,
    outbox: alert::outbox::Outbox,
    /// Where the outbox's rows, the alert state and incident rows are written, with a database.
    recorder: Option<store::alerts::Recorder>,
    /// The recorder as the journal, with a database: what incident timelines are told from.
    journal: Option<journal::Shared>,
}

/// Where the daemon keeps its records.
pub enum Storage {
    /// The configured database (`[database]`): call logs, and alerting's records (incidents, alert state, the
    /// outbox's rows) through the recorder.
    Configured,
    /// Call logs go to this sink and alerting records nothing: no incidents, no alert state, no outbox rows, so a
    /// restart forgets what fired. For tests on a paused clock, where a database's I/O would let the clock jump.
    #[cfg(any(test, feature = "test-util"))]
    CallLogOnly(Arc<dyn Sink>),
}

/// How a daemon is assembled: from the configuration alone in production ([`App::build`]); tests may also give
/// the exchanges and, explicitly, a storage without the recorder.
pub struct Builder {
    config: Config,
    exchanges: Option<Vec<Arc<dyn Exchange>>>,
    storage: Storage,
}

impl Builder {
    /// Polls these exchanges instead of clients built from `[[exchanges]]` (fakes, in-memory clients).
    #[cfg(any(test, feature = "test-util"))]
    pub fn exchanges(mut self, exchanges: Vec<Arc<dyn Exchange>>) -> Builder {
        self.exchanges = Some(exchanges);
        self
    }

    /// Keeps the records as `storage` says instead of in the configured database.
    #[cfg(any(test, feature = "test-util"))]
    pub fn storage(mut self, storage: Storage) -> Builder {
        self.storage = storage;
        self
    }

    pub async fn build(self) -> anyhow::Result<App> {
        let Builder { config, exchanges, storage } = self;
        let exchanges = match exchanges {
            Some(exchanges) => exchanges,
            None => config
                .exchanges
                .iter()
                .map(|view| client(&view.exchange, &config))
                .collect::<anyhow::Result<Vec<_>>>()?,
        };
        let sink = match storage {
            Storage::Configured => None,
            #[cfg(any(test, feature = "test-util"))]
            Storage::CallLogOnly(sink) => Some(sink),
        };
        App::assemble(config, exchanges, sink).await
    }
}

impl App {
    /// Builds the daemon as configured: one client per configured exchange, records in the configured database.
    pub async fn build(config: Config) -> anyhow::Result<App> {
        App::builder(config).build().await
    }

    pub fn builder(config: Config) -> Builder {
        Builder { config, exchanges: None, storage: Storage::Configured }
    }

    /// `sink` is the call log of [`Storage::CallLogOnly`]; `None` is the configured database.
    async fn assemble(
        config: Config,
        exchanges: Vec<Arc<dyn Exchange>>,
        sink: Option<Arc<dyn Sink>>,
    ) -> anyhow::Result<App> {
        let listener = TcpListener::bind(config.server.listen)
            .await
            .with_context(|| format!("cannot listen on {} (server.listen)", config.server.listen))?;
        let registry = telemetry::registry();
        let server = http::serve::Server::new(listener, config.server.connections.clone(), &registry)?;
        let metrics = poller::Metrics::new(&registry);
        let breaker_metrics = breaker::Metrics::new(&registry);
        let limiter_metrics = limiter::Metrics::new(&registry);
        let alert_metrics = alert::Metrics::new(&registry);
        // The outbox's rows, alert state and incident rows need the configured database: `CallLogOnly` has none.
        let (recorder, mut recorder_receiver) = match sink {
            Some(_) => (None, None),
            None => {
                let (handle, receiver) =
                    store::alerts::channel(store::alerts::Config::from_database(&config.database), &registry)
                        .context("cannot open the alert recorder's spool (database.spool_dir)")?;
                (Some(handle), Some(receiver))
            }
        };
        let journal = recorder.clone().map(|handle| Arc::new(handle) as journal::Shared);
        let outbox =
            alert::outbox::Outbox::new(&config.alerts.sinks, config.alerts.delivery.clone(), &registry, recorder)?;
        let statuspage_metrics = statuspage::Metrics::new(&registry);
        let mut statuspages = BTreeMap::new();
        for view in &config.exchanges {
            if let Some(source) = &view.statuspage {
                let watch = statuspage::Watch::new(
                    &view.name,
                    source.clone(),
                    config.status_sources.statuspage.clone(),
                    statuspage_metrics.clone(),
                )
                .context("cannot build the Statuspage client")?;
                statuspages.insert(view.name.clone(), watch);
            }
        }
        let controls = exchanges
            .iter()
            .map(|exchange| {
                let name = exchange.name().to_owned();
                let control = poller::Control {
                    breaker: breaker::Shared::new(&name, config.breaker.clone(), breaker_metrics.clone()),
                    limiter: Limiter::new(&name, config.rate_limit_for(&name).clone(), limiter_metrics.clone()),
                    alerts: Arc::new(std::sync::Mutex::new(alert::Engine::new(
                        &name,
                        exchange.kind().profile(),
                        config.alerts.clone(),
                        alert_metrics.clone(),
                        Some(outbox.clone()),
                    ))),
                    statuspage: statuspages.get(&name).cloned(),
                    wake: Arc::default(),
                };
                if let Some(journal) = &journal {
                    control.breaker.set_journal(journal.clone());
                    control.limiter.set_journal(journal.clone());
                }
                (name, control)
            })
            .collect::<BTreeMap<_, _>>();
        let websocket_metrics = websocket::Metrics::new(&registry);
        let mut websockets = BTreeMap::new();
        for view in &config.exchanges {
            if let (Some(url), Some(control)) = (&view.websocket_url, controls.get(&view.name)) {
                let watch = websocket::Watch::new(
                    &view.name,
                    url.clone(),
                    config.status_sources.websocket.clone(),
                    websocket_metrics.clone(),
                    control.clone(),
                );
                websockets.insert(view.name.clone(), watch);
            }
        }
        let (sink, connector): (Arc<dyn Sink>, _) = match sink {
            Some(sink) => (sink, None),
            None => {
                let connector = Connector::new(config.database.clone());
                outbox.coordinate(connector.clone(), &config.server.instance);
                // Connecting here runs the migrations before the first poll; when the database is down the daemon
                // starts anyway, and the writer connects at its first chance while rows wait in memory and spool.
                match connector.database().await {
                    Ok(database) => {
                        // What the previous run spooled while the database was away goes in before it is read.
                        if let Some(recorder) = recorder_receiver.as_mut()
                            && let Err(error) = recorder.replay(&database, &config.server.instance).await
                        {
                            tracing::error!(
                                error = %error,
                                "Cannot record the previous run's spooled alert writes yet; restoring without them."
                            );
                        }
                        restore_alerts(&database, &config.server.instance, &outbox, &controls).await;
                    }
                    Err(error) => tracing::error!(
                        error = %error,
                        "Database unavailable at start; call logs are kept until it answers, and alerts firing \
                         before this start could not be restored (one may page again)."
                    ),
                }
                (connector.clone(), Some(connector))
            }
        };
        let (writer, log) = writer::Writer::new(config.database.writer.clone(), sink, writer::Metrics::new(&registry))
            .context("cannot open the call-log spool (database.spool_dir)")?;
        let state = http::State {
            admin_refusals: http::admin::Refusals::new(&registry),
            registry,
            heartbeat: Arc::new(Heartbeat::new()),
            readiness: Arc::new(Readiness::default()),
            controls: Arc::new(controls),
            admin_token: config.admin.token.clone(),
            log: Some(log.clone()),
            placeholders: Arc::new(config.placeholders.clone()),
            database: connector.clone(),
            statuspages: Arc::new(statuspages),
            websockets: Arc::new(websockets),
        };
        Ok(App {
            config,
            server,
            exchanges,
            state,
            metrics,
            writer,
            log,
            connector,
            outbox,
            recorder: recorder_receiver,
            journal,
        })
    }

    /// The delivery side of alerting (tests route it to an in-memory receiver).
    pub fn outbox(&self) -> &alert::outbox::Outbox {
        &self.outbox
    }

    /// The HTTP surface this daemon serves, for in-memory requests (tests on a paused clock use it, never sockets).
    pub fn router(&self) -> axum::Router {
        http::router(self.state.clone())
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.server.local_addr().unwrap_or(self.config.server.listen)
    }

    /// Runs until `cancel` fires (a signal) or a task dies. Returns an error naming the task in the second case (the
    /// binary exits 1). Once `cancel` fires it returns within `server.shutdown_grace`.
    pub async fn run(self, cancel: CancellationToken) -> anyhow::Result<()> {
        let App { config, server, exchanges, state, metrics, writer, log, connector, outbox, recorder, journal } = self;
        let address = server.local_addr().context("listener has no local address")?;
        let budget = Budget::new(config.server.shutdown_grace);

        // Every task is critical: one that dies fails readiness and cancels `cancel` (supervisor.rs). The stages
        // stop in order: poll loops (on `cancel` itself), then the writer, retention and delivery, then the
        // recorder, then HTTP.
        let mut tasks = Supervisor::new(cancel.clone(), state.readiness.clone());
        let polling = tasks.stage(cancel.clone());
        let draining = tasks.stage(CancellationToken::new());
        let recording = tasks.stage(CancellationToken::new());
        let serving = tasks.stage(CancellationToken::new());

        // The writer outlives the poll loops: it stops only after they have, and drains within its slot.
        let writer_stop = tasks.stop_token(draining);
        tasks.spawn(draining, "call-log writer", async move {
            let summary = writer.run(writer_stop, budget.drain()).await;
            tracing::info!(
                written = summary.written,
                spooled_for_next_start = summary.spooled_at_exit,
                dropped = summary.dropped,
                "Call-log writer stopped."
            );
            Ok(())
        });
        if let Some(connector) = connector.clone() {
            let (database, stop) = (config.database.clone(), tasks.stop_token(draining));
            tasks.spawn(draining, "retention", async move {
                retention(connector, database, stop).await;
                Ok(())
            });
        }
        if let (Some(connector), Some(recorder)) = (connector, recorder) {
            let (stop, instance) = (tasks.stop_token(recording), config.server.instance.clone());
            tasks.spawn(recording, "alert recorder", async move {
                recorder.run(connector, instance, stop, budget.record()).await;
                Ok(())
            });
        }
        // Delivery outlives the poll loops too, so a resolve made by the last poll still goes out.
        if outbox.target_count() > 0 {
            let delivery = outbox.run(tasks.stop_token(draining), budget.drain());
            tasks.spawn(draining, "alert delivery", delivery);
        }

        let context = poller::Context {
            config: config.poll.clone(),
            metrics,
            heartbeat: state.heartbeat.clone(),
            log,
            instance: config.server.instance.clone(),
            schedule: poller::schedule::Config::default(),
            journal,
        };
        let exchange_count = exchanges.len();
        for exchange in exchanges {
            let Some(control) = state.controls.get(exchange.name()) else {
                anyhow::bail!("no controls for exchange {}", exchange.name());
            };
            let name = format!("poll loop {}", exchange.name());
            let context = poller::Context { schedule: config.schedule(exchange.name()), ..context.clone() };
            let poller = Poller::new(exchange, context, control.clone());
            let stop = cancel.clone();
            tasks.spawn(polling, name, async move {
                poller.run(stop).await;
                Ok(())
            });
        }
        // What each exchange's Statuspage says, beside the polls and stopped with them.
        for watch in state.statuspages.values().cloned() {
            let name = format!("statuspage {}", watch.exchange());
            let stop = cancel.clone();
            tasks.spawn(polling, name, async move {
                watch.run(stop).await;
                Ok(())
            });
        }

        // What each exchange's WebSocket says; a dead one is shown, never an outage, and never stops the daemon.
        for watch in state.websockets.values().cloned() {
            let name = format!("websocket {}", watch.exchange());
            let stop = cancel.clone();
            tasks.spawn(polling, name, async move {
                watch.run(stop).await;
                Ok(())
            });
        }

        // Without HTTP the probes and the scrape see nothing: a server that dies stops the daemon like any task.
        let (router, http_stop) = (http::router(state.clone()), tasks.stop_token(serving));
        tasks.spawn(serving, "HTTP server", async move {
            server.run(router, http_stop).await;
            Ok(())
        });
        state.readiness.set(true);
        tracing::info!(%address, exchanges = exchange_count, "exwatch is serving.");

        // Until a signal, or a critical task failing, cancels the root token.
        tasks.watch().await;

        let deadlines = budget.deadlines(Instant::now());
        tracing::info!(grace = %humantime::format_duration(budget.grace), "Shutting down.");
        state.readiness.set(false);
        if !tasks.stop(polling, deadlines.polls).await {
            // Their calls' rows so far are already with the writer.
            tracing::warn!("Poll loops did not finish within half the grace period; stopped them.");
        }
        // The writer and delivery bound their own drains within this slot; the slot's end is a backstop.
        tasks.stop(draining, deadlines.drains).await;
        // The recorder writes what delivery left (deliveries done, rows still owed) while the database answers.
        if !tasks.stop(recording, deadlines.recorder).await {
            tracing::warn!("Alert writes did not finish in time; undelivered notifications may be sent again.");
        }
        let served = tasks.stop(serving, deadlines.end).await;
        if tasks.finish(deadlines.end).await && served {
            tracing::info!("Shutdown complete.");
        } else if !served {
            tracing::warn!("HTTP server did not stop in time; exiting.");
        }
        tasks.result()
    }
}

/// How one shutdown deadline, `server.shutdown_grace` after shutdown begins, is shared out between the stages in
/// the order they stop: poll loops until half the grace, the writer's and delivery's drains until three quarters,
/// the recorder until nineteen twentieths, HTTP (and every task's end) until the deadline itself. A stage that ends
/// early leaves its time to the stages after it; one that overruns its slot is aborted at the slot's end, so the
/// stages together never take longer than the grace (the pod's `terminationGracePeriodSeconds` stays above it).
#[derive(Debug, Clone, Copy)]
struct Budget {
    grace: Duration,
}

/// When each stage must be done, from one deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Deadlines {
    polls: Instant,
    drains: Instant,
    recorder: Instant,
    /// Shutdown began plus the grace: HTTP's and every task's end.
    end: Instant,
}

impl Budget {
    fn new(grace: Duration) -> Budget {
        Budget { grace }
    }

    /// How long the writer and delivery drain once told to stop. They take it when they start, not when told to
    /// stop, so it is sized for the latest their slot can begin (after the whole poll slot) and leaves a twentieth of
    /// the grace to spool what could not be written.
    fn drain(self) -> Duration {
        self.grace / 5
    }

    /// How long the recorder writes once told to stop, sized like [`Budget::drain`] for its slot.
    fn record(self) -> Duration {
        self.grace / 8
    }

    fn deadlines(self, started: Instant) -> Deadlines {
        let twentieth = self.grace / 20;
        let end = started + self.grace;
        Deadlines { polls: end - twentieth * 10, drains: end - twentieth * 5, recorder: end - twentieth, end }
    }
}

/// Resumes the alerts this replica had firing before it restarted, and queues what it had not delivered. An
/// alert of an exchange no longer configured can never resolve by itself, so it is resolved now.
async fn restore_alerts(
    database: &store::database::Database,
    instance: &str,
    outbox: &alert::outbox::Outbox,
    controls: &BTreeMap<String, poller::Control>,
) {
    let stored = async {
        Ok::<_, store::database::Error>((database.alert_state(instance).await?, database.outbox(instance).await?))
    };
    let (states, rows) = match stored.await {
        Ok(stored) => stored,
        Err(error) => {
            tracing::error!(error = %error, "Cannot read the alert state of the previous run; one may page again.");
            return;
        }
    };
    let firing = states
        .into_iter()
        .filter_map(|(exchange, alertname, payload)| {
            match serde_json::from_str::<alert::outbox::FiringState>(&payload) {
                Ok(alert) => Some(alert),
                Err(error) => {
                    tracing::error!(exchange, alertname, error = %error, "Unreadable stored alert state; ignoring it.");
                    None
                }
            }
        })
        .collect();
    for alert in outbox.restore(firing, rows) {
        match controls.get(alert.label("exchange")) {
            Some(control) => control.alerts.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).restore(&alert),
            None => {
                tracing::warn!(
                    exchange = alert.label("exchange"),
                    "Resolving an alert of an exchange no longer watched."
                );
                let mut resolved: alert::notification::Alert = alert;
                resolved.ends_at = Some(chrono::Utc::now());
                outbox.resolve(resolved);
            }
        }
    }
}

/// Deletes old call logs hourly once the database answers (it may not at start).
async fn retention(connector: Arc<Connector>, config: store::Config, cancel: CancellationToken) {
    let database = loop {
        match connector.database().await {
            Ok(database) => break database,
            Err(_) => {
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(config.retention_interval.min(std::time::Duration::from_secs(60))) => {}
                }
            }
        }
    };
    store::calls::run_retention(database, config.retention, config.retention_interval, cancel).await;
}

/// Builds the client of one configured exchange.
pub fn client(exchange: &exchange::Config, config: &Config) -> anyhow::Result<Arc<dyn Exchange>> {
    match exchange.kind {
        exchange::Kind::Kraken => {
            let client = exchange::kraken::Client::new(exchange, config.poll.timeout)
                .with_context(|| format!("cannot build the client for exchange {}", exchange.name))?;
            Ok(Arc::new(client))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shutdown_stages_share_one_deadline_and_each_drain_fits_its_slot_however_late_it_begins() {
        for grace in [Duration::from_secs(20), Duration::from_secs(5), Duration::from_millis(7), Duration::ZERO] {
            let budget = Budget::new(grace);
            let started = Instant::now();
            let deadlines = budget.deadlines(started);
            assert_eq!(deadlines.end, started + grace, "the one deadline is the grace from the start");
            assert!(started <= deadlines.polls, "{grace:?}");
            assert!(deadlines.polls <= deadlines.drains && deadlines.drains <= deadlines.recorder, "{grace:?}");
            assert!(deadlines.recorder <= deadlines.end, "{grace:?}");
            // The drains begin at the latest when the previous slot ends, and must end before their own slot does.
            assert!(deadlines.polls + budget.drain() <= deadlines.drains, "{grace:?}");
            assert!(deadlines.drains + budget.record() <= deadlines.recorder, "{grace:?}");
        }
        let deadlines = Budget::new(Duration::from_secs(20)).deadlines(Instant::now());
        let (start, second) = (deadlines.end - Duration::from_secs(20), Duration::from_secs(1));
        assert_eq!(
            [deadlines.polls - start, deadlines.drains - start, deadlines.recorder - start],
            [second * 10, second * 15, second * 19],
            "at the ConfigMap's 20 s: polls by 10 s, drains by 15 s, the recorder by 19 s, HTTP by 20 s"
        );
    }
}
