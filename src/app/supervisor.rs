//! The daemon's tasks (poll loops, the call-log writer, retention, alert delivery, the alert recorder and the HTTP
//! server) under one supervisor: each is spawned into one `JoinSet`, tracked by one `TaskTracker`, in a stage with
//! its own stop token, and any task that panics, returns an error, or ends before its stage was asked to stop is a
//! failure of the daemon. A failure is logged once at ERROR, takes readiness with it (`/ready` answers 503 with the
//! reason) and cancels the root token, so the daemon shuts down in order and exits non-zero instead of running blind.
//!
//! Nothing is restarted: each of these tasks owns state that dies with it (the writer's buffer, the recorder's
//! queue, the delivery queues' cursor, the listener), so a restart could not resume cleanly; the orchestrator
//! restarts the process, which restores from the database and the spool. This module does not decide the shutdown
//! order or its time budget: the app stops the stages in turn, each by an instant carved from one deadline
//! ([`Supervisor::stop`]), and waits for every task to be gone by that deadline ([`Supervisor::finish`]).

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use tokio::task::{AbortHandle, Id, JoinError, JoinSet};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::http::Readiness;

/// A group of tasks stopped together by one token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stage(usize);

struct Running {
    name: String,
    stage: Stage,
    abort: AbortHandle,
}

/// Spawns, watches and stops the critical tasks.
pub struct Supervisor {
    /// The root token: a signal cancels it, and so does any critical task failing.
    cancel: CancellationToken,
    readiness: Arc<Readiness>,
    /// Judges each task as it ends (its result, its panic).
    tasks: JoinSet<anyhow::Result<()>>,
    /// Knows when every task is gone, the aborted ones included (an aborted task ends at its next await).
    tracker: TaskTracker,
    running: HashMap<Id, Running>,
    stops: Vec<CancellationToken>,
    /// The first failure; the daemon's exit reason.
    failure: Option<String>,
}

impl Supervisor {
    pub fn new(cancel: CancellationToken, readiness: Arc<Readiness>) -> Supervisor {
        Supervisor {
            cancel,
            readiness,
            tasks: JoinSet::new(),
            tracker: TaskTracker::new(),
            running: HashMap::new(),
            stops: Vec::new(),
            failure: None,
        }
    }

    /// A new stage whose tasks stop when `stop` is cancelled (the root token itself for the poll loops).
    pub fn stage(&mut self, stop: CancellationToken) -> Stage {
        self.stops.push(stop);
        Stage(self.stops.len() - 1)
    }

    /// The token `stage`'s tasks watch.
    pub fn stop_token(&self, stage: Stage) -> CancellationToken {
        self.stops[stage.0].clone()
    }

    /// Spawns a critical task of `stage`.
    pub fn spawn<F>(&mut self, stage: Stage, name: impl Into<String>, task: F)
    where
        F: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let abort = self.tasks.spawn(self.tracker.track_future(task));
        self.running.insert(abort.id(), Running { name: name.into(), stage, abort });
    }

    /// Waits until the root token is cancelled: by a signal, or by a critical task failing.
    pub async fn watch(&mut self) {
        loop {
            tokio::select! {
                biased;
                () = self.cancel.cancelled() => return,
                // With no task left this branch is disabled, and only the root token ends the wait.
                Some(joined) = self.tasks.join_next_with_id() => self.judge(joined),
            }
        }
    }

    /// Asks `stage` to stop and waits until `deadline` for its tasks (any other task ending meanwhile is judged
    /// too). Tasks still running then are aborted; returns false when that happened.
    pub async fn stop(&mut self, stage: Stage, deadline: Instant) -> bool {
        self.stops[stage.0].cancel();
        while self.running.values().any(|task| task.stage == stage) {
            match tokio::time::timeout_at(deadline, self.tasks.join_next_with_id()).await {
                Ok(Some(joined)) => self.judge(joined),
                Ok(None) => break,
                Err(_) => {
                    let late: Vec<Id> =
                        self.running.iter().filter(|(_, task)| task.stage == stage).map(|(id, _)| *id).collect();
                    for id in late {
                        if let Some(task) = self.running.remove(&id) {
                            tracing::warn!(task = task.name, "Task did not stop in time; aborting it.");
                            task.abort.abort();
                        }
                    }
                    return false;
                }
            }
        }
        true
    }

    /// Waits until `deadline` for every task ever spawned to be gone, the aborted ones included, so nothing of the
    /// daemon runs on once it returns. Call it after every stage was stopped; returns false when some were left.
    pub async fn finish(&mut self, deadline: Instant) -> bool {
        self.tracker.close();
        if tokio::time::timeout_at(deadline, self.tracker.wait()).await.is_ok() {
            return true;
        }
        tracing::warn!(tasks = self.tracker.len(), "Tasks still running at the shutdown deadline; exiting anyway.");
        false
    }

    /// The daemon's result: an error naming the first critical task that failed.
    pub fn result(&self) -> anyhow::Result<()> {
        match &self.failure {
            Some(reason) => Err(anyhow::anyhow!("{reason}")),
            None => Ok(()),
        }
    }

    /// Judges a task that ended: before its stop, with an error or a panic, it is a failure.
    fn judge(&mut self, joined: Result<(Id, anyhow::Result<()>), JoinError>) {
        let id = match &joined {
            Ok((id, _)) => *id,
            Err(error) => error.id(),
        };
        // Not ours to judge any more: aborted after its stage's time ran out.
        let Some(task) = self.running.remove(&id) else { return };
        let stopping = self.stops[task.stage.0].is_cancelled();
        let (what, detail) = match joined {
            Ok((_, Ok(()))) if stopping => return,
            Ok((_, Ok(()))) => ("stopped unexpectedly", None),
            Ok((_, Err(error))) => ("failed", Some(format!("{error:#}"))),
            Err(error) if error.is_panic() => ("panicked", Some(panic_message(error))),
            Err(_) => ("was cancelled", None),
        };
        // `/ready` is unauthenticated: it names the task and what happened, the log and the exit reason say more.
        let reason = format!("critical task {} {what}", task.name);
        tracing::error!(task = task.name, reason, detail, "Critical task failed; shutting down.");
        self.readiness.fail(&reason);
        if self.failure.is_none() {
            self.failure = Some(match detail {
                Some(detail) => format!("{reason}: {detail}"),
                None => reason,
            });
        }
        self.cancel.cancel();
    }
}

/// The text a panic carried, when it is text.
fn panic_message(error: JoinError) -> String {
    let payload = error.into_panic();
    if let Some(text) = payload.downcast_ref::<&str>() {
        (*text).to_owned()
    } else if let Some(text) = payload.downcast_ref::<String>() {
        text.clone()
    } else {
        "(no message)".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn in_secs(seconds: u64) -> Instant {
        Instant::now() + Duration::from_secs(seconds)
    }

    fn supervisor() -> (Supervisor, CancellationToken, Arc<Readiness>) {
        let cancel = CancellationToken::new();
        let readiness = Arc::new(Readiness::default());
        readiness.set(true);
        (Supervisor::new(cancel.clone(), readiness.clone()), cancel, readiness)
    }

    #[tokio::test]
    async fn a_task_that_panics_cancels_the_daemon_fails_readiness_and_names_itself() {
        let (mut supervisor, cancel, readiness) = supervisor();
        let stage = supervisor.stage(CancellationToken::new());
        let stop = supervisor.stop_token(stage);
        supervisor.spawn(stage, "waits", async move {
            stop.cancelled().await;
            Ok(())
        });
        supervisor.spawn(stage, "writer", async { panic!("disk on fire") });
        supervisor.watch().await;
        assert!(cancel.is_cancelled());
        assert!(!readiness.is_ready());
        let error = supervisor.result().unwrap_err().to_string();
        assert_eq!(error, "critical task writer panicked: disk on fire");
        assert_eq!(readiness.failure(), Some("critical task writer panicked"));
        // The other task still stops in order.
        assert!(supervisor.stop(stage, in_secs(5)).await);
        assert!(supervisor.running.is_empty());
    }

    #[tokio::test]
    async fn a_task_that_returns_early_or_with_an_error_is_a_failure() {
        for (task, expected) in [
            (Ok(()), "critical task outbox stopped unexpectedly"),
            (Err(anyhow::anyhow!("delivery loop died")), "critical task outbox failed: delivery loop died"),
        ] {
            let (mut supervisor, cancel, _readiness) = supervisor();
            let stage = supervisor.stage(CancellationToken::new());
            supervisor.spawn(stage, "outbox", async move { task });
            supervisor.watch().await;
            assert!(cancel.is_cancelled());
            assert_eq!(supervisor.result().unwrap_err().to_string(), expected);
        }
    }

    #[tokio::test]
    async fn tasks_that_end_after_their_stop_are_not_failures() {
        let (mut supervisor, cancel, readiness) = supervisor();
        let polls = supervisor.stage(cancel.clone());
        let drain = supervisor.stage(CancellationToken::new());
        for stage in [polls, drain] {
            let stop = supervisor.stop_token(stage);
            supervisor.spawn(stage, "loop", async move {
                stop.cancelled().await;
                Ok(())
            });
        }
        cancel.cancel();
        supervisor.watch().await;
        assert!(supervisor.stop(polls, in_secs(5)).await);
        assert_eq!(supervisor.running.len(), 1);
        assert!(supervisor.stop(drain, in_secs(5)).await);
        supervisor.result().unwrap();
        assert_eq!(readiness.failure(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stage_that_does_not_stop_in_time_is_aborted() {
        let (mut supervisor, cancel, _readiness) = supervisor();
        let stage = supervisor.stage(CancellationToken::new());
        supervisor.spawn(stage, "stuck", std::future::pending());
        cancel.cancel();
        assert!(!supervisor.stop(stage, in_secs(1)).await);
        assert!(supervisor.running.is_empty());
        supervisor.result().unwrap();
        // Aborted, it is gone at its next await, long before the deadline.
        let finishing = Instant::now();
        assert!(supervisor.finish(in_secs(1)).await);
        assert_eq!(finishing.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn finishing_waits_for_every_task_to_end() {
        let (mut supervisor, _cancel, _readiness) = supervisor();
        let stage = supervisor.stage(CancellationToken::new());
        let stop = supervisor.stop_token(stage);
        supervisor.spawn(stage, "slow to stop", async move {
            stop.cancelled().await;
            tokio::time::sleep(Duration::from_secs(2)).await;
            Ok(())
        });
        supervisor.stop_token(stage).cancel();
        let started = Instant::now();
        assert!(supervisor.finish(in_secs(5)).await, "ends within the deadline");
        assert_eq!(started.elapsed(), Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn finishing_never_waits_past_the_deadline() {
        let (mut supervisor, _cancel, _readiness) = supervisor();
        let stage = supervisor.stage(CancellationToken::new());
        supervisor.spawn(stage, "stuck", std::future::pending());
        let started = Instant::now();
        assert!(!supervisor.finish(in_secs(3)).await);
        assert_eq!(started.elapsed(), Duration::from_secs(3));
    }
}
