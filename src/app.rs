//! The daemon assembled: [`App::build`] creates the exchange clients, the breaker and limiter of each, the call-log
//! writer and its database connection, metrics and the listener (port 0 allowed); [`App::run`] runs the poll loops,
//! the writer, retention and the HTTP server until the root token is cancelled, then shuts down in order: readiness
//! goes 503, poll loops finish their current poll, the writer drains (what it cannot write in time goes to the
//! spool for the next start), HTTP stops last. A critical task (a poll loop, the writer, retention, delivery, the
//! alert recorder) that dies fails readiness and cancels the root token ([`supervisor`]), so the process exits
//! non-zero instead of running blind. The database being down never stops the daemon from starting.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::exchange::{self, Exchange};
use crate::http::{self, Readiness};
use crate::limiter::{self, Limiter};
use crate::poller::{self, Heartbeat, Poller};
use crate::store::{self, Sink, connector::Connector, writer};
use crate::telemetry;
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
}

impl App {
    /// Builds the daemon with one client per configured exchange.
    pub async fn build(config: Config) -> anyhow::Result<App> {
        let exchanges =
            config.exchanges.iter().map(|view| client(&view.exchange, &config)).collect::<anyhow::Result<Vec<_>>>()?;
        App::build_with_exchanges(config, exchanges).await
    }

    /// Builds the daemon around the given exchanges (tests pass fakes here).
    pub async fn build_with_exchanges(config: Config, exchanges: Vec<Arc<dyn Exchange>>) -> anyhow::Result<App> {
        App::build_with_sink(config, exchanges, None).await
    }

    /// Builds the daemon with its call logs going to `sink` instead of the configured database (tests on a paused
    /// clock log to memory: a database's I/O would let the paused clock jump).
    pub async fn build_with_sink(
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
        // The outbox's rows, alert state and incident rows need the configured database; a test's sink has none.
        let (recorder, mut recorder_receiver) = match sink {
            Some(_) => (None, None),
            None => {
                let (handle, receiver) =
                    store::alerts::channel(store::alerts::Config::from_database(&config.database), &registry)
                        .context("cannot open the alert recorder's spool (database.spool_dir)")?;
                (Some(handle), Some(receiver))
            }
        };
        let outbox =
            alert::outbox::Outbox::new(&config.alerts.sinks, config.alerts.delivery.clone(), &registry, recorder)?;
        let controls = exchanges
            .iter()
            .map(|exchange| {
                let name = exchange.name().to_owned();
                let control = poller::Control {
                    breaker: breaker::Shared::new(&name, config.breaker.clone(), breaker_metrics.clone()),
                    limiter: Limiter::new(&name, config.rate_limit.clone(), limiter_metrics.clone()),
                    alerts: Arc::new(std::sync::Mutex::new(alert::Engine::new(
                        &name,
                        config.alerts.clone(),
                        alert_metrics.clone(),
                        Some(outbox.clone()),
                    ))),
                };
                (name, control)
            })
            .collect::<BTreeMap<_, _>>();
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

    /// Runs until `cancel` fires (a signal) or a critical task dies. Returns an error naming the task in the second
    /// case (the binary exits 1).
    pub async fn run(self, cancel: CancellationToken) -> anyhow::Result<()> {
        let App { config, server, exchanges, state, metrics, writer, log, connector, outbox, recorder } = self;
        let address = server.local_addr().context("listener has no local address")?;

        // Every task but HTTP is critical: one that dies fails readiness and cancels `cancel` (supervisor.rs).
        // The stages stop in order: poll loops (on `cancel` itself), then the writer, retention and delivery, then
        // the recorder.
        let mut tasks = Supervisor::new(cancel.clone(), state.readiness.clone());
        let polling = tasks.stage(cancel.clone());
        let draining = tasks.stage(CancellationToken::new());
        let recording = tasks.stage(CancellationToken::new());

        // The writer outlives the poll loops: it stops only after they have, and gets half the grace to drain.
        let writer_stop = tasks.stop_token(draining);
        tasks.spawn(draining, "call-log writer", async move {
            let summary = writer.run(writer_stop, config.server.shutdown_grace / 2).await;
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
            // It drains within an eighth of the grace, then spools the rest, inside the quarter it is given below.
            let drain = config.server.shutdown_grace / 8;
            tasks.spawn(recording, "alert recorder", async move {
                recorder.run(connector, instance, stop, drain).await;
                Ok(())
            });
        }
        // Delivery outlives the poll loops too, so a resolve made by the last poll still goes out.
        if outbox.target_count() > 0 {
            let delivery = outbox.run(tasks.stop_token(draining), config.server.shutdown_grace / 4);
            tasks.spawn(draining, "alert delivery", delivery);
        }

        let context = poller::Context {
            config: config.poll.clone(),
            metrics,
            heartbeat: state.heartbeat.clone(),
            log,
            instance: config.server.instance.clone(),
            schedule: config.schedule(),
        };
        let exchange_count = exchanges.len();
        for exchange in exchanges {
            let Some(control) = state.controls.get(exchange.name()) else {
                anyhow::bail!("no controls for exchange {}", exchange.name());
            };
            let name = format!("poll loop {}", exchange.name());
            let poller = Poller::new(exchange, context.clone(), control.clone());
            let stop = cancel.clone();
            tasks.spawn(polling, name, async move {
                poller.run(stop).await;
                Ok(())
            });
        }

        let http_stop = CancellationToken::new();
        let server = tokio::spawn({
            let router = http::router(state.clone());
            let http_stop = http_stop.clone();
            async move { server.run(router, http_stop).await }
        });
        state.readiness.set(true);
        tracing::info!(%address, exchanges = exchange_count, "exwatch is serving.");

        // Until a signal, or a critical task failing, cancels the root token.
        tasks.watch().await;

        tracing::info!(grace = %humantime::format_duration(config.server.shutdown_grace), "Shutting down.");
        state.readiness.set(false);
        if !tasks.stop(polling, config.server.shutdown_grace / 2).await {
            // Their calls' rows so far are already with the writer.
            tracing::warn!("Poll loops did not finish within half the grace period; stopped them.");
        }
        // The writer and delivery bound their own drains (half and a quarter of the grace); this is a backstop.
        tasks.stop(draining, config.server.shutdown_grace).await;
        // The recorder writes what delivery left (deliveries done, rows still owed) while the database answers.
        if !tasks.stop(recording, config.server.shutdown_grace / 4).await {
            tracing::warn!("Alert writes did not finish in time; undelivered notifications may be sent again.");
        }
        http_stop.cancel();
        match tokio::time::timeout(std::time::Duration::from_secs(5), server).await {
            Ok(Ok(())) => tracing::info!("Shutdown complete."),
            Ok(Err(error)) => tracing::error!(error = %error, "HTTP server task failed."),
            Err(_) => tracing::warn!("HTTP server did not stop in time; exiting."),
        }
        tasks.result()
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
