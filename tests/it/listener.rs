//! Connections on `server.listen`: idle, half-sent and kept-alive connections are closed by their timeouts, the
//! connection cap makes room by closing the oldest idle connection, and a flood of idle connections against the
//! real binary neither grows its memory nor silences `/health` nor fails an exchange call.

use std::process::Stdio;
use std::time::Duration;

use exwatch::config::Config;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpStream;
use tokio::process::Command;
use tokio::time::Instant;

use crate::helpers::{FAST_RATE_LIMIT, eventually, metric, scratch_database, spawn_app, start_simulator};

const WAIT: Duration = Duration::from_secs(30);

/// A daemon configuration polling `base_url` every `interval` with `server` keys added to its `[server]` section.
fn config_text(base_url: &str, server: &str, interval: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_grace = \"5s\"\n{server}\n\
         [poll]\ninterval = \"{interval}\"\ntimeout = \"{interval}\"\n{FAST_RATE_LIMIT}\
         [[exchanges]]\nname = \"kraken\"\nbase_url = \"{base_url}\"\npair = \"XBTAUD\"\n\
         [log]\nformat = \"json\"\n{}",
        scratch_database()
    )
}

fn config(base_url: &str, server: &str) -> Config {
    Config::from_toml(&config_text(base_url, server, "100ms")).expect("valid test configuration")
}

/// Reads until the server closes the connection; `Err` if it is still open after `limit`.
async fn closed_within(stream: &mut TcpStream, limit: Duration) -> Result<Duration, String> {
    let started = Instant::now();
    let mut buffer = [0_u8; 4096];
    tokio::time::timeout(limit, async {
        loop {
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => return started.elapsed(),
                Ok(_) => {}
            }
        }
    })
    .await
    .map_err(|_| format!("still open after {limit:?}"))
}

#[tokio::test]
async fn idle_and_half_sent_header_connections_are_closed_after_the_header_read_timeout() {
    let simulator = start_simulator().await;
    let app = spawn_app(config(&simulator.base_url(), "header_read_timeout = \"500ms\"\nidle_timeout = \"1m\"")).await;

    let mut silent = TcpStream::connect(app.address).await.unwrap();
    let mut half_sent = TcpStream::connect(app.address).await.unwrap();
    half_sent.write_all(b"GET /health HTTP/1.1\r\nHost: exwatch\r\nX-Slow: ").await.unwrap();
    let started = Instant::now();

    for stream in [&mut silent, &mut half_sent] {
        closed_within(stream, Duration::from_secs(5)).await.unwrap();
        let elapsed = started.elapsed();
        assert!(elapsed >= Duration::from_millis(300), "closed too early, after {elapsed:?}");
    }
    let text = app.metrics().await;
    let timeouts = metric(&text, "exwatch_http_connection_timeouts_total", &[("timeout", "header_read")]);
    assert_eq!(timeouts, Some(2.0), "{text}");
}

#[tokio::test]
async fn kept_alive_connections_are_closed_after_the_idle_timeout() {
    let simulator = start_simulator().await;
    let app = spawn_app(config(&simulator.base_url(), "header_read_timeout = \"1m\"\nidle_timeout = \"500ms\"")).await;

    let mut stream = TcpStream::connect(app.address).await.unwrap();
    stream.write_all(b"GET /ready HTTP/1.1\r\nHost: exwatch\r\n\r\n").await.unwrap();
    let mut answer = vec![0_u8; 4096];
    let read = stream.read(&mut answer).await.unwrap();
    assert!(answer[..read].starts_with(b"HTTP/1.1 "), "{}", String::from_utf8_lossy(&answer[..read]));
    // Kept alive: no `connection: close` in the answer, so only the idle timeout ends it.
    assert!(!String::from_utf8_lossy(&answer[..read]).to_lowercase().contains("connection: close"));

    let elapsed = closed_within(&mut stream, Duration::from_secs(5)).await.unwrap();
    assert!(elapsed >= Duration::from_millis(300), "closed too early, after {elapsed:?}");
    let text = app.metrics().await;
    assert_eq!(metric(&text, "exwatch_http_connection_timeouts_total", &[("timeout", "idle")]), Some(1.0), "{text}");
}

/// GET on a connection of its own (a new client each time), so no pooled connection holds a place under the cap.
async fn fresh_get(url: String) -> Option<(u16, String)> {
    let response = reqwest::Client::new().get(url).send().await.ok()?;
    let status = response.status().as_u16();
    Some((status, response.text().await.ok()?))
}

#[tokio::test]
async fn at_the_cap_the_oldest_idle_connection_makes_room_and_busy_ones_are_never_evicted() {
    let simulator = start_simulator().await;
    let app = spawn_app(config(&simulator.base_url(), "max_connections = 4\nheader_read_timeout = \"30s\"")).await;
    let metrics = || fresh_get(app.url("/metrics"));
    let (_, text) = metrics().await.unwrap();
    assert_eq!(metric(&text, "exwatch_http_connections_limit", &[]), Some(4.0));

    // Four connections that never send a byte fill the cap; /health is still answered, each time on a fifth.
    let mut idle = Vec::new();
    for _ in 0..4 {
        idle.push(TcpStream::connect(app.address).await.unwrap());
    }
    for _ in 0..3 {
        assert_eq!(fresh_get(app.url("/health")).await.expect("/health answers at the cap").0, 200);
    }
    let (_, text) = metrics().await.unwrap();
    assert!(metric(&text, "exwatch_http_connections_rejected_total", &[("reason", "idle_evicted")]) >= Some(1.0));
    assert!(metric(&text, "exwatch_http_connections_open", &[]) <= Some(4.0), "{text}");
    // The oldest idle connection was the one closed.
    closed_within(&mut idle[0], Duration::from_secs(5)).await.unwrap();
    drop(idle);
    eventually(WAIT, "every connection closed", || async {
        let (_, text) = metrics().await?;
        // The scrape's own connection is the one open.
        (metric(&text, "exwatch_http_connections_open", &[])? <= 1.0).then_some(())
    })
    .await;

    // Four connections in the middle of their request head are busy: a new connection is closed at once.
    let mut busy = Vec::new();
    for _ in 0..4 {
        let mut stream = TcpStream::connect(app.address).await.unwrap();
        stream.write_all(b"GET /health HTTP/1.1\r\n").await.unwrap();
        busy.push(stream);
    }
    let mut refused = TcpStream::connect(app.address).await.unwrap();
    closed_within(&mut refused, Duration::from_secs(5)).await.unwrap();
    // A busy connection finishes its request.
    busy[0].write_all(b"Host: exwatch\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    busy[0].read_to_end(&mut answer).await.unwrap();
    assert!(answer.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&answer));
    let (_, text) = metrics().await.expect("room again once a busy connection closed");
    let rejected = metric(&text, "exwatch_http_connections_rejected_total", &[("reason", "max_connections")]);
    assert!(rejected >= Some(1.0), "{text}");
}

/// The resident memory of process `pid` in MiB, from /proc.
fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|line| line.starts_with("VmRSS:")).unwrap();
    let kib: f64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib / 1024.0
}

/// The sum of every sample of `name` whose labels include `label`.
fn total(text: &str, name: &str, label: &str) -> f64 {
    text.lines()
        .filter(|line| line.starts_with(&format!("{name}{{")) && line.contains(label))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Raises this test process's soft open-file limit to `wanted` (within the hard limit): it holds the 3,000
/// client ends itself. The daemon gets its own limit from the shell that starts it.
fn raise_own_open_file_limit(wanted: u64) {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let current = limit.current.unwrap_or(u64::MAX);
    if current < wanted {
        let raised = limit.maximum.map_or(wanted, |maximum| maximum.min(wanted));
        setrlimit(Resource::Nofile, rustix::process::Rlimit { current: Some(raised), maximum: limit.maximum })
            .expect("raise the soft open-file limit");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_thousand_idle_connections_keep_memory_bounded_health_answering_and_every_exchange_call_succeeding() {
    const CONNECTIONS: usize = 3_000;
    crate::helpers::install_tls_provider();
    raise_own_open_file_limit(8_192);
    let simulator = start_simulator().await;
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("exwatch.toml");
    // Polls with a one-second timeout: this test's own process, which also runs the simulator, is busy opening
    // connections, and a shorter timeout would measure that rather than exwatch.
    std::fs::write(&path, config_text(&simulator.base_url(), "", "1s")).unwrap();

    // The daemon runs under the common default soft limit of 1,024 open files, whatever this machine's is.
    let mut child = Command::new("sh")
        .arg("-c")
        .arg("ulimit -n 1024 && exec \"$0\" run --config \"$1\"")
        .arg(env!("CARGO_BIN_EXE_exwatch"))
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pid = child.id().unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let address = tokio::time::timeout(WAIT, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            let Ok(entry) = serde_json::from_str::<Value>(&line) else { continue };
            if entry["message"] == "exwatch is serving." {
                return entry["address"].as_str().unwrap().parse::<std::net::SocketAddr>().unwrap();
            }
        }
        panic!("exwatch exited before serving");
    })
    .await
    .expect("exwatch serves");
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let http = reqwest::Client::builder().timeout(Duration::from_secs(2)).build().unwrap();
    let get = |path: &'static str| {
        let http = http.clone();
        async move {
            let response = http.get(format!("http://{address}{path}")).send().await.ok()?;
            let status = response.status().as_u16();
            Some((status, response.text().await.ok()?))
        }
    };

    // Idle: polling succeeds and memory has settled.
    let calls = "exwatch_exchange_calls_total";
    eventually(WAIT, "six successful calls", || async {
        let (_, text) = get("/metrics").await?;
        (total(&text, calls, "outcome=\"success\"") >= 6.0).then_some(())
    })
    .await;
    let idle_rss = rss_mib(pid);
    let (_, before) = get("/metrics").await.unwrap();
    let limit = metric(&before, "exwatch_http_connections_limit", &[]).unwrap();
    assert_eq!(limit, 768.0, "1,024 open files less the default reserve of 256");
    let failures_before = total(&before, calls, "outcome=\"failure\"");
    let successes_before = total(&before, calls, "outcome=\"success\"");

    // 3,000 idle connections, opened 250 at a time, with /health asked after each batch.
    let mut held = Vec::with_capacity(CONNECTIONS);
    let mut peak_rss = idle_rss;
    while held.len() < CONNECTIONS {
        let mut batch = tokio::task::JoinSet::new();
        for _ in 0..250 {
            batch.spawn(TcpStream::connect(address));
        }
        while let Some(connected) = batch.join_next().await {
            held.push(connected.unwrap().expect("connect"));
        }
        let (status, _) = get("/health").await.expect("/health answers during the flood");
        assert_eq!(status, 200);
        peak_rss = peak_rss.max(rss_mib(pid));
    }
    let (status, during) = get("/metrics").await.expect("/metrics answers with 3,000 connections");
    assert_eq!(status, 200);
    peak_rss = peak_rss.max(rss_mib(pid));
    let open = metric(&during, "exwatch_http_connections_open", &[]).unwrap();
    assert!(open <= limit, "{open} open over the cap {limit}");
    assert!(metric(&during, "exwatch_http_connections_rejected_total", &[("reason", "idle_evicted")]) > Some(0.0));

    // Polling goes on while they are held, without a single failure.
    eventually(WAIT, "six more successful calls while the connections are held", || async {
        let (_, text) = get("/metrics").await?;
        (total(&text, calls, "outcome=\"success\"") >= successes_before + 6.0).then_some(())
    })
    .await;
    peak_rss = peak_rss.max(rss_mib(pid));

    drop(held);
    eventually(WAIT, "the connections to close", || async {
        let (_, text) = get("/metrics").await?;
        (metric(&text, "exwatch_http_connections_open", &[])? <= 2.0).then_some(())
    })
    .await;
    let after_rss = rss_mib(pid);
    let (_, after) = get("/metrics").await.unwrap();
    let failures_after = total(&after, calls, "outcome=\"failure\"");
    println!(
        "RSS: idle {idle_rss:.1} MiB, peak {peak_rss:.1} MiB with {CONNECTIONS} connections, after {after_rss:.1} MiB"
    );
    let failed: Vec<_> = after.lines().filter(|line| line.starts_with(calls) && line.contains("failure")).collect();
    assert_eq!(failures_after, failures_before, "exchange calls failed during the flood: {failed:?}");
    assert!(peak_rss < 40.0, "RSS reached {peak_rss:.1} MiB (idle {idle_rss:.1} MiB)");
    assert!(after_rss < idle_rss + 4.0, "RSS stayed at {after_rss:.1} MiB after the close (idle {idle_rss:.1} MiB)");
}

#[tokio::test]
async fn health_shows_the_database_error_as_a_class_and_a_time_never_its_text() {
    let simulator = start_simulator().await;
    let text = config_text(&simulator.base_url(), "", "100ms")
        .replace("[database]\n", "[database]\nurl = \"postgres://watcher:hunter2@127.0.0.1:1/ledger_prod\"\n");
    let app = spawn_app(Config::from_toml(&text).expect("valid test configuration")).await;

    let database = eventually(WAIT, "a failed write shown on /health", || async {
        let (_, body) = app.get("/health").await;
        let health: Value = serde_json::from_str(&body).ok()?;
        let database = health["database"].clone();
        database["last_error"].is_object().then_some((database, body))
    })
    .await;
    let (database, body) = database;
    assert_eq!(database["up"], false, "{body}");
    assert_eq!(database["last_error"]["class"], "unavailable", "{body}");
    let at = database["last_error"]["at"].as_str().expect("a time");
    assert!(chrono::DateTime::parse_from_rfc3339(at).is_ok(), "{at}");
    for leak in ["127.0.0.1:1", "ledger_prod", "watcher", "hunter2", "refused", "connect"] {
        assert!(!body.contains(leak), "/health shows {leak:?}: {body}");
    }
}
