//! Telemetry plumbing: `tracing` initialisation (JSON for machines, pretty for a terminal) and the Prometheus
//! registry every module registers its own metrics in. It defines no metric of its own except `exwatch_build_info`
//! and, on Linux, the standard `process_*` metrics (memory, CPU, open file descriptors) every exporter has; each
//! module owns its metrics and records them together with its log lines.

use std::io::IsTerminal as _;

use prometheus::{Encoder as _, IntGaugeVec, Opts, Registry};
use tracing_subscriber::EnvFilter;

#[derive(Debug, Clone, serde::Serialize)]
/// The `[log]` settings.
pub struct Config {
    /// A `tracing` filter (`info`, `exwatch=debug,info`); `RUST_LOG` wins when set.
    pub level: String,
    pub format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// JSON when standard error is not a terminal, pretty otherwise.
    Auto,
    Json,
    Pretty,
}

impl Default for Config {
    fn default() -> Config {
        Config { level: "info".to_owned(), format: LogFormat::Auto }
    }
}

/// Starts logging to standard error. `RUST_LOG`, when set, wins over `log.level`.
pub fn init(log: &Config) -> anyhow::Result<()> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(directives) if !directives.trim().is_empty() => EnvFilter::builder().parse(directives)?,
        _ => EnvFilter::builder().parse(&log.level)?,
    };
    let json = match log.format {
        LogFormat::Json => true,
        LogFormat::Pretty => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let result =
        if json { builder.json().flatten_event(true).with_current_span(false).try_init() } else { builder.try_init() };
    result.map_err(|error| anyhow::anyhow!("cannot initialise logging: {error}"))
}

/// Creates the registry a daemon instance exposes on `/metrics`, with `exwatch_build_info` and the process metrics
/// in it.
pub fn registry() -> Registry {
    let registry = Registry::new();
    let build_info = IntGaugeVec::new(
        Opts::new("exwatch_build_info", "Build information of the running exwatch, constant 1."),
        &["version"],
    )
    .expect("valid metric definition");
    build_info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
    register(&registry, build_info);
    // Read from /proc at scrape time: process_resident_memory_bytes, process_cpu_seconds_total, process_open_fds,
    // process_max_fds, process_virtual_memory_bytes, process_start_time_seconds, process_threads.
    #[cfg(target_os = "linux")]
    registry
        .register(Box::new(prometheus::process_collector::ProcessCollector::for_self()))
        .expect("the process metrics are registered once per registry");
    registry
}

/// Registers a collector. Registration only fails on a programming error (a duplicate or inconsistent
/// definition), which every test run would catch, so it is an invariant rather than a runtime error.
pub fn register<C: prometheus::core::Collector + Clone + 'static>(registry: &Registry, collector: C) -> C {
    registry.register(Box::new(collector.clone())).expect("metric names are unique and consistent");
    collector
}

/// The registry in the Prometheus text exposition format.
pub fn encode(registry: &Registry) -> Result<String, prometheus::Error> {
    let mut buffer = Vec::new();
    prometheus::TextEncoder::new().encode(&registry.gather(), &mut buffer)?;
    String::from_utf8(buffer).map_err(|error| prometheus::Error::Msg(error.to_string()))
}

/// The value of the first sample of `name` whose labels include all of `labels`, read from the text exposition
/// (tests and benchmarks read `/metrics` with it).
#[cfg(any(test, feature = "test-util"))]
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let wanted: Vec<String> = labels.iter().map(|(key, value)| format!("{key}=\"{value}\"")).collect();
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter(|line| line.starts_with(&format!("{name}{{")) || line.starts_with(&format!("{name} ")))
        .find(|line| wanted.iter().all(|label| line.contains(label.as_str())))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
}

/// The latency buckets every exchange histogram uses. They include the runbook's thresholds: 3 s (slow alert)
/// and 5 s ("Slow API response" warning), so both are exact in PromQL.
pub const LATENCY_BUCKETS: &[f64] = &[0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 30.0];

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_os = "linux")]
    #[test]
    fn the_registry_exports_the_process_metrics() {
        let text = encode(&registry()).unwrap();
        for name in ["process_resident_memory_bytes", "process_cpu_seconds_total", "process_open_fds"] {
            let value = sample(&text, name, &[]).unwrap_or_else(|| panic!("no {name} in {text}"));
            assert!(value >= 0.0, "{name} {value}");
        }
        assert!(sample(&text, "process_resident_memory_bytes", &[]).unwrap() > 0.0);
    }
}
