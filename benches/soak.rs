//! The soak (issue 11, item 22): twelve hours of polling compressed. The whole daemon (poll loop, breaker,
//! limiter, alert engine and outbox, call-log writer, HTTP router) runs in this process on a paused tokio clock
//! against the in-memory simulator, polling every second, with the simulator's fault switched every 20 s and the
//! breaker, evidence and slow-alert windows at one minute, so every state is entered and left hundreds of times.
//! Every 1,000 polls it samples this process's resident memory (`/proc/self/statm`) and open file descriptors
//! (`/proc/self/fd`), then reports the slope after warm-up in kB per 1,000 polls: flat means under 1 kB.
//!
//! `cargo bench --bench soak` (release build; about a minute), or `-- --polls 4000` for a short run.
//! The call log goes to a sink that counts and discards (a database would be I/O on a paused clock), and
//! notifications to an in-memory receiver that answers 200.

#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use axum::body::Body;
use exwatch::app::{App, Storage};
use exwatch::config::Config;
use exwatch::exchange::kraken::Client;
use exwatch::simulator::{self, Scenario, Simulator};
use exwatch::store::{CallRecord, Sink, WriteError};
use http_body_util::BodyExt as _;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;

/// Kraken's published test secret, which the simulator accepts for its default key.
const API_SECRET: &str = "kQH5HW/8p1uGOVjbgWA7FunAmGO8lsSUXNsu3eow76sz84Q18fWxnyRzBHCd3pd5nE9qa99HAZtuZuj6F1huXg==";
const API_KEY: &str = "exwatch-soak-key";

/// The faults cycled through, 20 s each: outages of each class, rate limiting, slowness and health between them.
const FAULTS: [Scenario; 12] = [
    Scenario::Healthy,
    Scenario::Unavailable,
    Scenario::Healthy,
    Scenario::Maintenance,
    Scenario::Healthy,
    Scenario::RateLimited,
    Scenario::Reset,
    Scenario::Healthy,
    Scenario::Cloudflare502,
    Scenario::InvalidKey,
    Scenario::Flaky,
    Scenario::Http429,
];

/// Counts the rows handed to it and keeps none.
#[derive(Default)]
struct CountingSink {
    rows: AtomicU64,
}

#[async_trait]
impl Sink for CountingSink {
    async fn insert_batch(&self, rows: &[CallRecord]) -> Result<(), WriteError> {
        self.rows.fetch_add(rows.len() as u64, Ordering::Relaxed);
        Ok(())
    }
}

struct Sample {
    polls: f64,
    rss_kb: f64,
    /// The process's own memory (heap, stacks): what a leak grows. Total RSS also holds the binary's mapped pages,
    /// which the kernel may drop and map again when other processes need memory.
    anon_kb: f64,
    fds: usize,
}

/// Resident and anonymous-resident kB: `/proc/self/statm` (resident minus shared, in 4 kB pages).
fn rss_kb() -> (f64, f64) {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: Vec<f64> = statm.split_whitespace().filter_map(|field| field.parse().ok()).collect();
    let resident = pages.get(1).copied().unwrap_or(0.0);
    let shared = pages.get(2).copied().unwrap_or(0.0);
    (resident * 4.0, (resident - shared) * 4.0)
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map(|entries| entries.count()).unwrap_or(0)
}

async fn metric(router: &axum::Router, name: &str) -> f64 {
    let request = axum::http::Request::get("/metrics").body(Body::empty()).unwrap();
    let response = router.clone().oneshot(request).await.unwrap();
    let text = String::from_utf8(response.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
    text.lines()
        .filter(|line| line.starts_with(name) && !line.starts_with('#'))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Least-squares slope of `y` over `x`.
fn slope(points: &[(f64, f64)]) -> f64 {
    let count = points.len() as f64;
    let mean_x = points.iter().map(|(x, _)| x).sum::<f64>() / count;
    let mean_y = points.iter().map(|(_, y)| y).sum::<f64>() / count;
    let covariance: f64 = points.iter().map(|(x, y)| (x - mean_x) * (y - mean_y)).sum();
    let variance: f64 = points.iter().map(|(x, _)| (x - mean_x).powi(2)).sum();
    if variance == 0.0 { 0.0 } else { covariance / variance }
}

fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let arguments: Vec<String> = std::env::args().collect();
    // Test runners list a bench's tests first (nextest: `--list --format terse`): the soak is not a test, so it
    // lists none; run by `cargo test` (no `--bench`), it is a short smoke run rather than the 40,000 polls.
    if arguments.iter().any(|argument| argument == "--list") {
        return;
    }
    let default_polls = if arguments.iter().any(|argument| argument == "--bench") { 40_000 } else { 500 };
    let polls: u64 = arguments
        .iter()
        .position(|argument| argument == "--polls")
        .and_then(|index| arguments.get(index + 1)?.parse().ok())
        .unwrap_or(default_polls);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().unwrap();
    // Wall time, for the report only: the run itself is on the paused clock.
    let wall = std::time::SystemTime::now();
    let samples = runtime.block_on(soak(polls));
    report(polls, &samples, wall.elapsed().unwrap_or_default());
}

async fn soak(polls: u64) -> Vec<Sample> {
    let options = simulator::Options {
        api_key: exwatch::secret::Secret::new(API_KEY),
        public_rate_limit: None,
        failure_rate: 0.5,
        ..simulator::Options::default()
    };
    let simulator = Simulator::in_memory(options).unwrap();
    let config = Config::from_toml(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n\
         [poll]\ninterval = \"1s\"\ntimeout = \"1s\"\nconfirm_interval = \"1s\"\nrecovery_check_interval = \"1s\"\n\
         [rate_limit]\npublic_per_second = 20\npublic_burst = 10\nrecovery_quiet = \"1m\"\nprivate_pause = \"1m\"\n\
         [breaker]\nwindow_duration = \"1m\"\nwait_duration_in_open = \"10s\"\nmax_wait_in_half_open = \"20s\"\n\
         [alerts]\nevidence_window = \"1m\"\n[alerts.slow]\nwindow = \"1m\"\n\
         [[alerts.sinks]]\nkind = \"webhook\"\nname = \"soak\"\nurl = \"http://hooks.test/hook\"\n\
         [[exchanges]]\nname = \"kraken\"\napi_key = \"{API_KEY}\"\napi_secret = \"{API_SECRET}\"\n\
         [database]\nspool_dir = \"{}\"\n",
        std::env::temp_dir().join(format!("exwatch-soak-{}", std::process::id())).display()
    ))
    .unwrap();
    let client = Client::in_memory(&config.exchanges[0].exchange, config.poll.timeout, simulator.router()).unwrap();
    let sink = Arc::new(CountingSink::default());
    let app = App::builder(config)
        .exchanges(vec![Arc::new(client)])
        .storage(Storage::CallLogOnly(sink.clone()))
        .build()
        .await
        .unwrap();
    let receiver = axum::Router::new().fallback(|| async { "ok" });
    app.outbox().deliver_in_memory(receiver);
    let router = app.router();
    let cancel = CancellationToken::new();
    let task = tokio::spawn(app.run(cancel.clone()));

    let mut samples = Vec::new();
    let mut fault = 0usize;
    let mut next_sample = 0.0;
    loop {
        tokio::time::sleep(Duration::from_secs(20)).await;
        fault = (fault + 1) % FAULTS.len();
        simulator.set_scenario(FAULTS[fault]);
        // Every fifth Healthy period is slow, for the slow alert.
        simulator.set_latency(if fault == 4 { Duration::from_millis(800) } else { Duration::ZERO });
        let done = metric(&router, "exwatch_poll_ticks_total").await;
        if done >= next_sample {
            let (rss_kb, anon_kb) = rss_kb();
            samples.push(Sample { polls: done, rss_kb, anon_kb, fds: open_fds() });
            next_sample += 1000.0;
        }
        if done >= polls as f64 {
            break;
        }
    }
    cancel.cancel();
    task.await.unwrap().unwrap();
    eprintln!(
        "soak: {} rows logged, {} notifications sent",
        sink.rows.load(Ordering::Relaxed),
        metric(&router, "exwatch_notifications_sent_total").await
    );
    samples
}

fn report(polls: u64, samples: &[Sample], wall: Duration) {
    // Warm-up: the first eighth of the run (5,000 polls of 40,000), where buffers, maps and the allocator settle.
    let warm_up = polls as f64 / 8.0;
    let after: Vec<&Sample> = samples.iter().filter(|sample| sample.polls >= warm_up).collect();
    let rss_slope = slope(&after.iter().map(|sample| (sample.polls / 1000.0, sample.rss_kb)).collect::<Vec<_>>());
    let anon_slope = slope(&after.iter().map(|sample| (sample.polls / 1000.0, sample.anon_kb)).collect::<Vec<_>>());
    let fd_slope = slope(&after.iter().map(|sample| (sample.polls / 1000.0, sample.fds as f64)).collect::<Vec<_>>());
    println!(
        "## Soak: {polls} polls at 1 s, faults switched every 20 s (paused clock, {:.0} s of wall time)",
        wall.as_secs_f64()
    );
    println!();
    println!("| polls | RSS (kB) | anonymous RSS (kB) | open fds |");
    println!("| --- | --- | --- | --- |");
    for sample in samples {
        println!("| {:.0} | {:.0} | {:.0} | {} |", sample.polls, sample.rss_kb, sample.anon_kb, sample.fds);
    }
    println!();
    // Growth is what a leak shows; a fall (pages returned or reclaimed) is not one.
    let verdict = |slope: f64| if slope < 1.0 { "flat" } else { "GROWING" };
    println!(
        "Slope after {warm_up:.0} polls of warm-up, per 1,000 polls: anonymous RSS {anon_slope:+.2} kB ({}), RSS \
         {rss_slope:+.2} kB ({}), open fds {fd_slope:+.3}.",
        verdict(anon_slope),
        verdict(rss_slope)
    );
}
