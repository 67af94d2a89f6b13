//! The daemon assembled: [`App::build`] creates the exchange clients, the breaker and limiter of each, the call-log
//! writer and its database connection, metrics and the listener (port 0 allowed); [`App::run`] runs the poll loops,
//! the writer, retention and the HTTP server until the root token is cancelled, then shuts down in order: readiness
//! goes 503, poll loops finish their current poll, the writer drains (what it cannot write in time goes to the
//! spool for the next start), HTTP stops last. A poll loop that dies unexpectedly cancels the root token, so the
//! process exits instead of running blind. The database being down never stops the daemon from starting.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::exchange::{self, Exchange};
use crate::http::{self, Readiness};
use crate::limiter::{self, Limiter};
use crate::poller::{self, Heartbeat, Poller};
use crate::store::{self, Sink, connector::Connector, writer};
use crate::telemetry;
use crate::{alert, breaker};

pub struct App {
    config: Config,
    listener: TcpListener,
    exchanges: Vec<Arc<dyn Exchange>>,
    state: http::State,
    metrics: poller::Metrics,
    writer: writer::Writer,
    log: writer::Handle,
    /// The configured database; `None` when a test supplied its own sink.
    connector: Option<Arc<Connector>>,
    incidents_receiver: Option<store::incidents::Receiver>,
}

/// The run-time controls of one exchange, shared by its poll loop and the admin API.
#[derive(Clone)]
pub struct Control {
    pub breaker: Arc<breaker::Shared>,
    pub limiter: Arc<Limiter>,
    pub alerts: Arc<std::sync::Mutex<alert::Engine>>,
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
        let metrics = poller::Metrics::new(&registry);
        let breaker_metrics = breaker::Metrics::new(&registry);
        let limiter_metrics = limiter::Metrics::new(&registry);
        let alert_metrics = alert::Metrics::new(&registry);
        // Incident rows need the configured database; a test's own sink has none.
        let (incidents, incidents_receiver) = match sink {
            Some(_) => (None, None),
            None => {
                let (handle, receiver) = store::incidents::channel();
                (Some(handle), Some(receiver))
            }
        };
        let controls = exchanges
            .iter()
            .map(|exchange| {
                let name = exchange.name().to_owned();
                let control = Control {
                    breaker: breaker::Shared::new(&name, config.breaker.clone(), breaker_metrics.clone()),
                    limiter: Limiter::new(&name, config.rate_limit.clone(), limiter_metrics.clone()),
                    alerts: Arc::new(std::sync::Mutex::new(alert::Engine::new(
                        &name,
                        config.alerts.clone(),
                        alert_metrics.clone(),
                        incidents.clone(),
                    ))),
                };
                (name, control)
            })
            .collect::<BTreeMap<_, _>>();
        let (sink, connector): (Arc<dyn Sink>, _) = match sink {
            Some(sink) => (sink, None),
            None => {
                let connector = Connector::new(config.database.clone());
                // Connecting here runs the migrations before the first poll; when the database is down the daemon
                // starts anyway, and the writer connects at its first chance while rows wait in memory and spool.
                if let Err(error) = connector.database().await {
                    tracing::error!(error = %error, "Database unavailable at start; call logs are kept until it answers.");
                }
                (connector.clone(), Some(connector))
            }
        };
        let (writer, log) = writer::Writer::new(config.database.writer.clone(), sink, writer::Metrics::new(&registry))
            .context("cannot open the call-log spool (database.spool_dir)")?;
        let state = http::State {
            registry,
            heartbeat: Arc::new(Heartbeat::new()),
            readiness: Arc::new(Readiness::default()),
            controls: Arc::new(controls),
            admin_token: config.admin.token.clone(),
            log: Some(log.clone()),
        };
        Ok(App { config, listener, exchanges, state, metrics, writer, log, connector, incidents_receiver })
    }

    /// The HTTP surface this daemon serves, for in-memory requests (tests on a paused clock use it, never sockets).
    pub fn router(&self) -> axum::Router {
        http::router(self.state.clone())
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().unwrap_or(self.config.server.listen)
    }

    /// Runs until `cancel` fires (a signal) or a poll loop dies. Returns an error in the second case.
    pub async fn run(self, cancel: CancellationToken) -> anyhow::Result<()> {
        let App { config, listener, exchanges, state, metrics, writer, log, connector, incidents_receiver } = self;
        let address = listener.local_addr().context("listener has no local address")?;

        // The writer outlives the poll loops: it stops only after they have, and gets half the grace to drain.
        let writer_stop = CancellationToken::new();
        let writer_task = tokio::spawn(writer.run(writer_stop.clone(), config.server.shutdown_grace / 2));
        let retention_stop = CancellationToken::new();
        let retention_task = tokio::spawn({
            let (database, stop, connector) = (config.database.clone(), retention_stop.clone(), connector.clone());
            async move {
                if let Some(connector) = connector {
                    retention(connector, database, stop).await;
                }
            }
        });
        let incidents_task = tokio::spawn({
            let stop = retention_stop.clone();
            async move {
                if let (Some(connector), Some(receiver)) = (connector, incidents_receiver) {
                    store::incidents::run(connector, receiver, stop).await;
                }
            }
        });

        let mut pollers = JoinSet::new();
        let context = poller::Context {
            config: config.poll.clone(),
            metrics,
            heartbeat: state.heartbeat.clone(),
            log,
            instance: config.server.instance.clone(),
        };
        for exchange in exchanges {
            let Some(control) = state.controls.get(exchange.name()) else {
                anyhow::bail!("no controls for exchange {}", exchange.name());
            };
            let poller = Poller::new(exchange, context.clone(), control.clone());
            pollers.spawn(poller.run(cancel.clone()));
        }

        let http_stop = CancellationToken::new();
        let server = tokio::spawn({
            let router = http::router(state.clone());
            let http_stop = http_stop.clone();
            async move { axum::serve(listener, router).with_graceful_shutdown(http_stop.cancelled_owned()).await }
        });
        state.readiness.set(true);
        tracing::info!(%address, exchanges = pollers.len(), "exwatch is serving.");

        // Wait for a signal, or for a poll loop to end on its own, which only a panic makes happen.
        let mut failure = None;
        tokio::select! {
            biased;
            () = cancel.cancelled() => {}
            Some(joined) = pollers.join_next(), if !cancel.is_cancelled() => {
                // A loop also ends when the token is cancelled between the two branches being polled.
                let reason = match joined {
                    Err(error) if error.is_panic() => Some("a poll loop panicked".to_owned()),
                    Err(error) => Some(format!("a poll loop was aborted: {error}")),
                    Ok(()) if cancel.is_cancelled() => None,
                    Ok(()) => Some("a poll loop stopped unexpectedly".to_owned()),
                };
                if let Some(reason) = reason {
                    tracing::error!(reason, "Critical task failed; shutting down.");
                    failure = Some(reason);
                }
                cancel.cancel();
            }
        }

        tracing::info!(grace = %humantime::format_duration(config.server.shutdown_grace), "Shutting down.");
        state.readiness.set(false);
        let pollers_done = async { while pollers.join_next().await.is_some() {} };
        if tokio::time::timeout(config.server.shutdown_grace / 2, pollers_done).await.is_err() {
            // Dropping the set aborts the loops; their calls' rows so far are already with the writer.
            tracing::warn!("Poll loops did not finish within half the grace period; stopping them.");
        }
        drop(pollers);
        retention_stop.cancel();
        writer_stop.cancel();
        match writer_task.await {
            Ok(summary) => tracing::info!(
                written = summary.written,
                spooled_for_next_start = summary.spooled_at_exit,
                dropped = summary.dropped,
                "Call-log writer stopped."
            ),
            Err(error) => tracing::error!(error = %error, "Call-log writer task failed."),
        }
        let _ = retention_task.await;
        let _ = incidents_task.await;
        http_stop.cancel();
        match tokio::time::timeout(std::time::Duration::from_secs(5), server).await {
            Ok(Ok(Ok(()))) => tracing::info!("Shutdown complete."),
            Ok(Ok(Err(error))) => tracing::error!(error = %error, "HTTP server failed."),
            Ok(Err(error)) => tracing::error!(error = %error, "HTTP server task failed."),
            Err(_) => tracing::warn!("HTTP server did not stop in time; exiting."),
        }
        match failure {
            Some(reason) => Err(anyhow::anyhow!(reason)),
            None => Ok(()),
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
    store::database::run_retention(database, config.retention, config.retention_interval, cancel).await;
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
