//! Serving the HTTP surface on `server.listen` with every connection bounded: how many may be open, how long one
//! may take to send its request head, and how long one may sit with no byte moving.
//!
//! What it owns: the accept loop, the cap on open connections (derived from the process's open-file limit so a
//! reserve of file descriptors always stays for exchange calls and the database), the header read timeout
//! (hyper's own timer), the inactivity timeout, and the metrics and log lines of all of them. When the cap is
//! reached, the oldest connection that has not sent a byte yet is closed to make room (as nginx reuses its idle
//! connections), so a probe of `/health` is served even while idle connections fill the cap; only when every
//! open connection is busy is the new one closed at once. It keeps accepting rather than pausing at the cap
//! (tokio's mini-redis waits for a permit before `accept`): a paused listener leaves a probe queued in the
//! kernel's backlog until it times out, while idle connections keep their places. What it deliberately does not
//! do: routing ([`super::router`]), TLS, HTTP/2.
//!
//! Exhausting its own resources is exwatch's own problem: it is counted here and logged at most once per
//! [`LOG_INTERVAL`](super::LOG_INTERVAL), and never reaches the exchange's error taxonomy.

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use anyhow::Context as _;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus::{IntCounterVec, IntGauge, Opts, Registry};
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt as _;

use super::Throttle;
use crate::resources::{open_file_limit, out_of_descriptors};
use crate::telemetry;

/// The `[server]` keys that bound connections.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Config {
    /// The most connections open at once; fewer when the open-file limit minus `fd_reserve` is lower.
    pub max_connections: u32,
    /// The time a connection has to send its first byte, and then its complete request head; the same time
    /// bounds a kept-alive connection waiting for its next request (hyper's header read timer).
    #[serde(serialize_with = "crate::clock::human_duration")]
    pub header_read_timeout: Duration,
    /// The longest a connection may go with no byte read or written (a stalled body, a client that stops reading
    /// its answer, a kept-alive connection left open).
    #[serde(serialize_with = "crate::clock::human_duration")]
    pub idle_timeout: Duration,
    /// File descriptors kept out of the connection cap for exchange calls, the database, the spool and sinks.
    pub fd_reserve: u32,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            max_connections: 1024,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            fd_reserve: 256,
        }
    }
}

/// The bounds `[server]` accepts, checked by `config`.
pub const MAX_CONNECTIONS_RANGE: (u32, u32) = (1, 1_000_000);
pub const FD_RESERVE_RANGE: (u32, u32) = (16, 1_000_000);
pub const TIMEOUT_RANGE: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(3600));

/// The open-file limit leaves too few descriptors for both the reserve and any connection.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "the open-file limit (RLIMIT_NOFILE) is {limit}, and server.fd_reserve keeps {reserve} of them for exchange \
     calls and the database, which leaves fewer than {MIN_CONNECTIONS} for HTTP connections; raise the limit \
     (ulimit -n, LimitNOFILE=) or lower server.fd_reserve"
)]
pub struct LimitError {
    limit: u64,
    reserve: u32,
}

/// Fewer connections than this cannot serve a probe and a scrape side by side.
const MIN_CONNECTIONS: u64 = 4;

/// The connection cap: the configured maximum, lowered so that `fd_reserve` descriptors stay free under the soft
/// open-file limit (`None`: unlimited).
pub fn connection_cap(config: &Config, open_file_limit: Option<u64>) -> Result<u32, LimitError> {
    let Some(limit) = open_file_limit else { return Ok(config.max_connections) };
    let available = limit.saturating_sub(u64::from(config.fd_reserve));
    if available < MIN_CONNECTIONS {
        return Err(LimitError { limit, reserve: config.fd_reserve });
    }
    Ok(u32::try_from(available).unwrap_or(u32::MAX).min(config.max_connections))
}

/// The connection metrics; one method per occurrence logs and counts.
#[derive(Clone)]
pub struct Metrics {
    open: IntGauge,
    limit: IntGauge,
    rejected: IntCounterVec,
    timed_out: IntCounterVec,
    /// One log line per interval for every kind of rejection together, with the count of those not logged.
    throttle: Arc<Throttle>,
}

impl Metrics {
    pub fn new(registry: &Registry) -> Metrics {
        let open = IntGauge::new("exwatch_http_connections_open", "HTTP connections open on server.listen.")
            .expect("valid metric definition");
        let limit = IntGauge::new(
            "exwatch_http_connections_limit",
            "The cap on open HTTP connections: server.max_connections, lowered to keep server.fd_reserve free.",
        )
        .expect("valid metric definition");
        let rejected = IntCounterVec::new(
            Opts::new(
                "exwatch_http_connections_rejected_total",
                "HTTP connections closed by exwatch to stay within its limits, by reason (max_connections: \
                 closed at accept; idle_evicted: an idle one closed to make room; fd_limit: accept failed for \
                 want of file descriptors).",
            ),
            &["reason"],
        )
        .expect("valid metric definition");
        let timed_out = IntCounterVec::new(
            Opts::new(
                "exwatch_http_connection_timeouts_total",
                "HTTP connections closed by a timeout (header_read, idle).",
            ),
            &["timeout"],
        )
        .expect("valid metric definition");
        for reason in ["max_connections", "idle_evicted", "fd_limit"] {
            rejected.with_label_values(&[reason]);
        }
        for timeout in ["header_read", "idle"] {
            timed_out.with_label_values(&[timeout]);
        }
        Metrics {
            open: telemetry::register(registry, open),
            limit: telemetry::register(registry, limit),
            rejected: telemetry::register(registry, rejected),
            timed_out: telemetry::register(registry, timed_out),
            throttle: Arc::new(Throttle::default()),
        }
    }

    fn rejected(&self, reason: &'static str, error: Option<&io::Error>) {
        self.rejected.with_label_values(&[reason]).inc();
        if let Some(suppressed) = self.throttle.admit(Instant::now()) {
            tracing::warn!(
                reason,
                error = error.map(tracing::field::display),
                open = self.open.get(),
                limit = self.limit.get(),
                suppressed,
                "HTTP connection refused: exwatch is at its own connection or file limit (not an exchange fault)."
            );
        }
    }

    fn timed_out(&self, timeout: &'static str, peer: SocketAddr) {
        self.timed_out.with_label_values(&[timeout]).inc();
        tracing::debug!(timeout, %peer, "HTTP connection closed by a timeout.");
    }
}

/// The listener with its bounds, built before serving so a bad limit fails the start.
pub struct Server {
    listener: TcpListener,
    config: Config,
    cap: u32,
    metrics: Metrics,
}

impl Server {
    pub fn new(listener: TcpListener, config: Config, registry: &Registry) -> anyhow::Result<Server> {
        let cap = connection_cap(&config, open_file_limit()).context("cannot bound HTTP connections")?;
        let metrics = Metrics::new(registry);
        metrics.limit.set(i64::from(cap));
        Ok(Server { listener, config, cap, metrics })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves `router` until `stop` fires, then lets each open connection finish its request and waits for them.
    pub async fn run(self, router: axum::Router, stop: CancellationToken) {
        let Server { listener, config, cap, metrics } = self;
        tracing::info!(
            max_connections = cap,
            header_read_timeout = %humantime::format_duration(config.header_read_timeout),
            idle_timeout = %humantime::format_duration(config.idle_timeout),
            "HTTP connections bounded."
        );
        let permits = Arc::new(Semaphore::new(cap as usize));
        let waiting = Arc::new(Waiting::default());
        let tracker = TaskTracker::new();
        let mut next_id = 0_u64;
        loop {
            let accepted = tokio::select! {
                () = stop.cancelled() => break,
                accepted = listener.accept() => accepted,
            };
            let (stream, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    if out_of_descriptors(&error) {
                        metrics.rejected("fd_limit", Some(&error));
                        // The pending connection stays queued; give the descriptors a moment to come back.
                        tokio::select! {
                            () = stop.cancelled() => break,
                            () = tokio::time::sleep(Duration::from_millis(100)) => {}
                        }
                    } else {
                        tracing::debug!(error = %error, "HTTP accept failed.");
                    }
                    continue;
                }
            };
            let permit = match Arc::clone(&permits).try_acquire_owned() {
                Ok(permit) => permit,
                Err(_) => match make_room(&permits, &waiting, &metrics).await {
                    Some(permit) => permit,
                    None => {
                        metrics.rejected("max_connections", None);
                        drop(stream);
                        continue;
                    }
                },
            };
            next_id += 1;
            // Registered before the task runs, so the next accept can already evict it.
            let evict = waiting.enter(next_id);
            let connection = Connection {
                id: next_id,
                evict,
                peer,
                config: config.clone(),
                metrics: metrics.clone(),
                waiting: Arc::clone(&waiting),
                stop: stop.clone(),
                _permit: permit,
            };
            metrics.open.inc();
            tracker.spawn(connection.serve(stream, router.clone()));
        }
        drop(listener);
        tracker.close();
        tracker.wait().await;
    }
}

/// Closes the oldest connection that has not sent a byte yet and takes its place; `None` when every open
/// connection is in use.
async fn make_room(permits: &Arc<Semaphore>, waiting: &Waiting, metrics: &Metrics) -> Option<OwnedSemaphorePermit> {
    let oldest = waiting.take_oldest()?;
    oldest.cancel();
    metrics.rejected("idle_evicted", None);
    // The evicted task releases its permit as soon as it runs; the bound is a safety net, never a wait.
    tokio::time::timeout(Duration::from_secs(1), Arc::clone(permits).acquire_owned()).await.ok()?.ok()
}

/// The connections waiting for their first byte, oldest first: the ones closed to make room at the cap.
#[derive(Debug, Default)]
struct Waiting {
    connections: Mutex<BTreeMap<u64, CancellationToken>>,
}

impl Waiting {
    fn enter(&self, id: u64) -> CancellationToken {
        let evict = CancellationToken::new();
        self.lock().insert(id, evict.clone());
        evict
    }

    fn leave(&self, id: u64) {
        self.lock().remove(&id);
    }

    fn take_oldest(&self) -> Option<CancellationToken> {
        self.lock().pop_first().map(|(_, evict)| evict)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, CancellationToken>> {
        self.connections.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One accepted connection and what it holds until it closes.
struct Connection {
    id: u64,
    /// Cancelled to close this connection while it waits for its first byte, to make room at the cap.
    evict: CancellationToken,
    peer: SocketAddr,
    config: Config,
    metrics: Metrics,
    waiting: Arc<Waiting>,
    stop: CancellationToken,
    _permit: OwnedSemaphorePermit,
}

impl Connection {
    /// Waits for the first byte without handing the socket to hyper, so an idle connection costs a socket and a
    /// small task, not hyper's buffers; then serves HTTP/1.1 until the client, a timeout or shutdown ends it.
    async fn serve(self, stream: TcpStream, router: axum::Router) {
        // `peek`, not `readable`: readiness may be reported before any byte has arrived.
        let mut first = [0_u8; 1];
        let first_byte = tokio::select! {
            peeked = tokio::time::timeout(self.config.header_read_timeout, stream.peek(&mut first)) => Some(peeked),
            () = self.evict.cancelled() => None,
            () = self.stop.cancelled() => None,
        };
        self.waiting.leave(self.id);
        match first_byte {
            Some(Ok(Ok(0) | Err(_))) => {} // Closed by the client, or failed, before a byte arrived.
            Some(Ok(Ok(_))) => Box::pin(self.serve_http(stream, router)).await,
            Some(Err(_elapsed)) => self.metrics.timed_out("header_read", self.peer),
            None => {}
        }
    }

    async fn serve_http(&self, stream: TcpStream, router: axum::Router) {
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(error = %error, "Cannot set TCP_NODELAY on an HTTP connection.");
        }
        let service = hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
            router.clone().oneshot(request.map(axum::body::Body::new))
        });
        let inactive = Arc::new(AtomicBool::new(false));
        let io = TokioIo::new(Inactivity::new(stream, self.config.idle_timeout, Arc::clone(&inactive)));
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder.timer(TokioTimer::new()).header_read_timeout(self.config.header_read_timeout);
        let connection = builder.serve_connection(io, service);
        tokio::pin!(connection);
        let result = tokio::select! {
            result = connection.as_mut() => result,
            () = self.stop.cancelled() => {
                connection.as_mut().graceful_shutdown();
                connection.await
            }
        };
        // Hyper ends a connection that fails while idle as if the client had closed it, so the inactivity
        // timeout is known by its flag, not by the result.
        match result {
            Err(error) if error.is_timeout() => self.metrics.timed_out("header_read", self.peer),
            _ if inactive.load(Ordering::Relaxed) => self.metrics.timed_out("idle", self.peer),
            Err(error) => tracing::debug!(error = %error, peer = %self.peer, "HTTP connection ended with an error."),
            Ok(()) => {}
        }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.metrics.open.dec();
    }
}

/// A stream that fails with `TimedOut` once no byte has moved in either direction for `limit`. The deadline is
/// only looked at while hyper waits on the stream, which is whenever the connection is open.
struct Inactivity<S> {
    inner: S,
    limit: Duration,
    deadline: Pin<Box<Sleep>>,
    /// Set when the deadline passed.
    fired: Arc<AtomicBool>,
}

impl<S> Inactivity<S> {
    fn new(inner: S, limit: Duration, fired: Arc<AtomicBool>) -> Inactivity<S> {
        Inactivity { inner, limit, deadline: Box::pin(tokio::time::sleep(limit)), fired }
    }

    fn moved(&mut self) {
        self.deadline.as_mut().reset(Instant::now() + self.limit);
    }

    /// On `Pending` from the stream: an error once the deadline has passed, `Pending` (with a wake-up) before.
    fn check<T>(&mut self, context: &mut Context<'_>) -> Poll<io::Result<T>> {
        ready!(self.deadline.as_mut().poll(context));
        self.fired.store(true, Ordering::Relaxed);
        Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "connection inactive for server.idle_timeout")))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Inactivity<S> {
    fn poll_read(mut self: Pin<&mut Self>, context: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(context, buf) {
            Poll::Ready(result) => {
                if buf.filled().len() > before {
                    self.moved();
                }
                Poll::Ready(result)
            }
            Poll::Pending => self.check(context),
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Inactivity<S> {
    fn poll_write(mut self: Pin<&mut Self>, context: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.inner).poll_write(context, data) {
            Poll::Ready(result) => {
                if matches!(result, Ok(written) if written > 0) {
                    self.moved();
                }
                Poll::Ready(result)
            }
            Poll::Pending => self.check(context),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<io::Result<()>> {
        match Pin::new(&mut self.inner).poll_flush(context) {
            Poll::Ready(result) => Poll::Ready(result),
            Poll::Pending => self.check(context),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<io::Result<()>> {
        match Pin::new(&mut self.inner).poll_shutdown(context) {
            Poll::Ready(result) => Poll::Ready(result),
            Poll::Pending => self.check(context),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffers: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.inner).poll_write_vectored(context, buffers) {
            Poll::Ready(result) => {
                if matches!(result, Ok(written) if written > 0) {
                    self.moved();
                }
                Poll::Ready(result)
            }
            Poll::Pending => self.check(context),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(max_connections: u32, fd_reserve: u32) -> Config {
        Config { max_connections, fd_reserve, ..Config::default() }
    }

    #[test]
    fn the_cap_keeps_the_fd_reserve_free_under_the_open_file_limit() {
        assert_eq!(connection_cap(&config(1024, 256), Some(1024)), Ok(768));
        assert_eq!(connection_cap(&config(1024, 256), Some(65_536)), Ok(1024));
        assert_eq!(connection_cap(&config(1024, 256), None), Ok(1024));
        assert_eq!(connection_cap(&config(1024, 256), Some(260)), Ok(4));
    }

    #[test]
    fn a_limit_leaving_no_room_for_connections_is_an_error_naming_both_numbers() {
        let error = connection_cap(&config(1024, 256), Some(256)).unwrap_err();
        let message = error.to_string();
        assert!(message.contains("is 256") && message.contains("server.fd_reserve keeps 256"), "{message}");
    }

    #[test]
    fn waiting_connections_are_evicted_oldest_first_and_leave_when_served() {
        let waiting = Waiting::default();
        let first = waiting.enter(1);
        let second = waiting.enter(2);
        let third = waiting.enter(3);
        waiting.leave(1);
        waiting.take_oldest().expect("two are waiting").cancel();
        assert!(!first.is_cancelled() && second.is_cancelled() && !third.is_cancelled());
    }
}
