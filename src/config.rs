//! Configuration: the only place that reads files or the environment for settings.
//!
//! Layers, each overriding the one before: built-in defaults < the TOML file (`--config`) < the environment
//! (`EXWATCH__SECTION__KEY`, and `EXWATCH__EXCHANGES__0__API_KEY` for the first `[[exchanges]]` entry). The `config`
//! crate parses the file and the environment; this module merges them and validates the result into typed values,
//! collecting every problem with the key that has it, so one run of `exwatch check-config` names them all.
//! Secrets may come from files (`api_key_file`, Kubernetes secrets) and are wrapped in [`Secret`].

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use serde_json::{Map, Value};

use crate::clock::human_duration;
use crate::exchange::{self, Credentials, ErrorClass, Kind};
use crate::secret::{Secret, redact_url};
use crate::telemetry::LogFormat;
use crate::{alert, breaker, limiter, poller, statuspage, store, telemetry, websocket};

/// Public calls in one poll: Ticker and SystemStatus.
const PUBLIC_CALLS_PER_POLL: f64 = 2.0;

/// The environment prefix: `EXWATCH__POLL__INTERVAL=45s` sets `poll.interval`.
pub const ENV_PREFIX: &str = "EXWATCH";

/// The validated configuration of the whole daemon.
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    pub server: Server,
    pub poll: poller::Config,
    pub exchanges: Vec<ExchangeView>,
    pub breaker: breaker::Config,
    /// `[rate_limit]` over the default kind's budget; each exchange's effective settings are in
    /// [`ExchangeView::rate_limit`].
    pub rate_limit: limiter::Config,
    pub alerts: alert::Config,
    pub database: store::Config,
    pub admin: Admin,
    pub status_sources: StatusSources,
    pub log: telemetry::Config,
    /// Environment variables that look like settings but are ignored (`EXWATCH_POLL__INTERVAL`, one underscore):
    /// `run` logs a warning for each at start, naming the variable, never its value.
    #[serde(skip)]
    pub ignored_variables: Vec<String>,
    /// Values still holding the secret template's placeholders, each naming its key and what stays off: `run`
    /// starts without them and reports each (log, `/api/v1/status`), `check-config` refuses them.
    #[serde(skip)]
    pub placeholders: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Server {
    pub listen: SocketAddr,
    /// This replica's name, written in the `instance` column of every call log (default: the host name, which is
    /// the pod's name in Kubernetes).
    pub instance: String,
    /// How long shutdown may take before exwatch exits anyway.
    #[serde(serialize_with = "human_duration")]
    pub shutdown_grace: Duration,
    /// Where people reach this daemon (a Service or ingress URL): pages link back here, and the default
    /// `alerts.runbook_url` is this URL's `/runbook`. Default: `http://` + `listen` (loopback for an unspecified
    /// address).
    pub external_url: String,
    /// The bounds on connections to `listen`: how many, how long for a request head, how long idle.
    #[serde(flatten)]
    pub connections: crate::http::serve::Config,
}

/// One exchange's settings as configured; [`ExchangeView::exchange`] is what the clients are built from.
#[derive(Debug, Clone, Serialize)]
pub struct ExchangeView {
    pub name: String,
    pub kind: Kind,
    /// Shown without credentials (user information, query values).
    pub base_url: String,
    pub pair: String,
    pub depth_count: u32,
    pub api_key: Option<Secret>,
    pub api_secret: Option<Secret>,
    /// This exchange's limiter settings: its kind's budget, `[rate_limit]`, then its own `rate_limit` table.
    pub rate_limit: limiter::Config,
    /// Its Statuspage (`statuspage_url`, `statuspage_page_id`, `statuspage_components`); unset = not watched.
    pub statuspage: Option<statuspage::Source>,
    /// Its WebSocket (`websocket_url`, ws:// or wss://); unset = not watched.
    #[serde(serialize_with = "shown_optional_url")]
    pub websocket_url: Option<url::Url>,
    /// Whether the exchange has a `rate_limit` table of its own (problems name that key).
    #[serde(skip)]
    pub own_rate_limit: bool,
    #[serde(skip)]
    pub exchange: exchange::Config,
}

fn shown_optional_url<S: serde::Serializer>(url: &Option<url::Url>, serializer: S) -> Result<S::Ok, S::Error> {
    match url {
        Some(url) => serializer.serialize_some(&redact_url(url)),
        None => serializer.serialize_none(),
    }
}

/// `[status_sources]`: the Statuspage's settings and the WebSocket's (`websocket_*`), in one section.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct StatusSources {
    #[serde(flatten)]
    pub statuspage: statuspage::Config,
    #[serde(flatten)]
    pub websocket: websocket::Config,
}

#[derive(Debug, Clone, Serialize)]
pub struct Admin {
    /// The bearer token of the admin API; unset disables the admin API.
    pub token: Option<Secret>,
}

/// Every problem found in the configuration, each naming its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub problems: Vec<String>,
}

impl fmt::Display for Error {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "invalid configuration ({} problem", self.problems.len())?;
        if self.problems.len() != 1 {
            formatter.write_str("s")?;
        }
        formatter.write_str("):")?;
        for problem in &self.problems {
            write!(formatter, "\n  - {problem}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {}

impl Config {
    /// Loads the file (if any) and the process environment, then validates.
    pub fn load(path: Option<&Path>) -> Result<Config, Error> {
        Config::load_from(path, None)
    }

    /// Like [`Config::load`], with the environment given as a map (tests never touch the process environment).
    pub fn load_from(path: Option<&Path>, environment: Option<HashMap<String, String>>) -> Result<Config, Error> {
        let mut problems = Vec::new();
        let file = match path {
            Some(path) => read_file_layer(path).unwrap_or_else(|problem| {
                problems.push(problem);
                Value::Object(Map::new())
            }),
            None => Value::Object(Map::new()),
        };
        let names: Vec<String> = match &environment {
            Some(map) => map.keys().cloned().collect(),
            None => std::env::vars_os().filter_map(|(name, _)| name.into_string().ok()).collect(),
        };
        let mut environment = read_environment_layer(environment).unwrap_or_else(|problem| {
            problems.push(problem);
            Value::Object(Map::new())
        });
        if !problems.is_empty() {
            return Err(Error { problems });
        }
        let gaps = take_index_gaps(&file, &mut environment, "");
        let mut merged = file;
        merge(&mut merged, environment);
        let result = Config::from_value(merged).map(|mut config| {
            config.ignored_variables = ignored_variables(&names);
            config
        });
        match result {
            Ok(config) if gaps.is_empty() => Ok(config),
            Ok(_) => Err(Error { problems: gaps }),
            Err(error) => Err(Error { problems: gaps.into_iter().chain(error.problems).collect() }),
        }
    }

    /// Parses a TOML document (no environment); for tests and examples.
    pub fn from_toml(text: &str) -> Result<Config, Error> {
        let value = parse_toml(text, "configuration").map_err(|problem| Error { problems: vec![problem] })?;
        Config::from_value(value)
    }

    /// Validates an already merged tree of settings.
    pub fn from_value(value: Value) -> Result<Config, Error> {
        let mut reader = Reader::default();
        let config = reader.config(value);
        if reader.problems.is_empty() { Ok(config) } else { Err(Error { problems: reader.problems }) }
    }

    /// Settings that are valid but leave part of exwatch off, which a newcomer would not notice: `run` logs each at
    /// WARN on start, `check-config` prints them to standard error.
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        if self.alerts.sinks.is_empty() {
            warnings.push(
                "no [[alerts.sinks]] configured: alerts are logged and shown by /api/v1/status and `exwatch status`, \
                 but sent nowhere"
                    .to_owned(),
            );
        }
        if self.admin.token.is_none() {
            warnings.push("admin.token is not set: the admin API (breaker and rate-limit controls) is off".to_owned());
        }
        for (index, view) in self.exchanges.iter().enumerate() {
            if view.exchange.credentials.is_none() {
                warnings.push(format!(
                    "exchanges[{index}] ({}) has no api_key/api_secret: the private Balance call is not checked, so \
                     authentication problems (Scenario C) go unseen",
                    view.name
                ));
            }
        }
        warnings
    }

    /// `check-config`'s stricter verdict: a value still holding the secret template's placeholder is an error.
    pub fn check_placeholders(&self) -> Result<(), Error> {
        if self.placeholders.is_empty() { Ok(()) } else { Err(Error { problems: self.placeholders.clone() }) }
    }

    /// The effective configuration as TOML, secrets redacted.
    pub fn to_redacted_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|error| format!("# cannot render configuration: {error}\n"))
    }

    /// Checks at start what validation of the text cannot: that `database.spool_dir` can be written. Without it an
    /// unwritable spool shows only during a database outage, when rows have nowhere else to go.
    pub fn check_writable_paths(&self) -> Result<(), Error> {
        let directory = &self.database.writer.spool_dir;
        writable_directory(directory).map_err(|reason| Error {
            problems: vec![format!("`database.spool_dir`: {} {reason}", directory.display())],
        })
    }

    /// The limiter settings of the exchange called `name`: its own, or `[rate_limit]` over Kraken's budget for
    /// an exchange not configured here (tests build daemons around fakes).
    pub fn rate_limit_for(&self, name: &str) -> &limiter::Config {
        self.exchanges.iter().find(|view| view.name == name).map_or(&self.rate_limit, |view| &view.rate_limit)
    }

    /// The poll schedule's settings for one exchange, from `[poll]`, `alerts.down`, its rate limit and `[breaker]`.
    pub fn schedule(&self, name: &str) -> poller::schedule::Config {
        poller::schedule::Config::new(&self.poll, &self.alerts.down, self.rate_limit_for(name), &self.breaker)
    }
}

impl Default for Config {
    /// The configuration with no file and no environment: one Kraken exchange, defaults everywhere.
    fn default() -> Config {
        Config::from_value(Value::Object(Map::new())).expect("the built-in defaults are valid")
    }
}

/// `http://` + the listen address, with loopback for an unspecified address (`0.0.0.0`, `::`).
fn default_external_url(listen: SocketAddr) -> String {
    let host = match listen.ip() {
        ip if ip.is_unspecified() && ip.is_ipv4() => "127.0.0.1".to_owned(),
        ip if ip.is_unspecified() => "[::1]".to_owned(),
        std::net::IpAddr::V4(ip) => ip.to_string(),
        std::net::IpAddr::V6(ip) => format!("[{ip}]"),
    };
    format!("http://{host}:{}", listen.port())
}

/// A value still holding a template's placeholder (`REPLACE_WITH_…`, `REPLACE_USER` in
/// deploy/kubernetes/secret.example.yaml).
fn is_placeholder(value: &str) -> bool {
    value.to_ascii_uppercase().contains("REPLACE_")
}

/// Where the placeholders come from, for every message about one.
const SECRET_TEMPLATE: &str = "deploy/kubernetes/secret.example.yaml";

/// The host name: `HOSTNAME` (set in every Kubernetes pod), else `/etc/hostname`, else `exwatch`.
fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|name| !name.trim().is_empty())
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "exwatch".to_owned())
}

fn read_file_layer(path: &Path) -> Result<Value, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|error| format!("cannot read configuration file {}: {error}", path.display()))?;
    parse_toml(&text, &format!("configuration file {}", path.display()))
}

/// Parses TOML settings. A syntax error names the line, the column and, when the line has one, the key, but never
/// the line's text: after `api_secret = "...` with its closing quote missing, the text is the secret.
fn parse_toml(text: &str, origin: &str) -> Result<Value, String> {
    if let Err(error) = text.parse::<toml::Table>() {
        return Err(toml_syntax_error(text, origin, &error));
    }
    config::Config::builder()
        .add_source(config::File::from_str(text, config::FileFormat::Toml))
        .build()
        .and_then(|built| built.try_deserialize::<Value>())
        // The `config` crate's own message may quote the document, so it is not passed on.
        .map_err(|_| format!("cannot parse {origin}"))
}

/// The position and the parser's description of a TOML syntax error, without any of the document's text but the
/// key of the line it is on.
fn toml_syntax_error(text: &str, origin: &str, error: &toml::de::Error) -> String {
    let mut problem = format!("cannot parse {origin}");
    if let Some(span) = error.span() {
        let start = span.start.min(text.len());
        let before = text.get(..start).unwrap_or(text);
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |newline| newline + 1);
        let column = before[line_start..].chars().count() + 1;
        problem.push_str(&format!(" at line {line}, column {column}"));
        let line_text = text[line_start..].lines().next().unwrap_or_default();
        if let Some(key) = line_key(line_text) {
            problem.push_str(&format!(" (key `{key}`"));
            if let Some(header) = before[..line_start].lines().rev().find_map(table_header) {
                problem.push_str(&format!(" in {header}"));
            }
            problem.push(')');
        }
    }
    // The parser's descriptions are its grammar ("invalid basic string, expected `\"`"), never the input.
    let message: String = error.message().chars().take(200).collect();
    problem.push_str(&format!(": {message}"));
    problem
}

/// A table header line (`[poll]`, `[[exchanges]]`) with a plain name.
fn table_header(line: &str) -> Option<&str> {
    let header = line.trim();
    let name = header.trim_start_matches('[').trim_end_matches(']');
    let plain = header.starts_with('[')
        && header.ends_with(']')
        && !name.is_empty()
        && name.len() <= 100
        && name.chars().all(|character| character.is_ascii_alphanumeric() || "_-.".contains(character));
    plain.then_some(header)
}

/// The key a TOML line assigns (`api_secret` of `api_secret = "...`), when it is a plain (dotted) key.
fn line_key(line: &str) -> Option<&str> {
    let (key, _) = line.split_once('=')?;
    let key = key.trim();
    let plain = !key.is_empty()
        && key.len() <= 100
        && key.chars().all(|character| character.is_ascii_alphanumeric() || "_-.".contains(character));
    plain.then_some(key)
}

fn read_environment_layer(environment: Option<HashMap<String, String>>) -> Result<Value, String> {
    let source = config::Environment::with_prefix(ENV_PREFIX)
        .prefix_separator("__")
        .separator("__")
        .ignore_empty(true)
        .source(environment.map(|map| map.into_iter().collect()));
    let built = config::Config::builder()
        .add_source(source)
        .build()
        .map_err(|error| format!("cannot read {ENV_PREFIX}__* environment variables: {error}"))?;
    let value = built
        .try_deserialize::<Value>()
        .map_err(|error| format!("cannot read {ENV_PREFIX}__* environment variables: {error}"))?;
    Ok(value)
}

/// The top-level sections, to tell a mistyped setting (`EXWATCH_POLL__INTERVAL`) from an unrelated variable.
const SECTIONS: [&str; 9] =
    ["SERVER", "POLL", "EXCHANGES", "BREAKER", "RATE_LIMIT", "ALERTS", "DATABASE", "ADMIN", "LOG"];

/// The variables that name a section after a single underscore (`EXWATCH_POLL__INTERVAL`): the environment layer
/// ignores them, so the operator is told.
fn ignored_variables(names: &[String]) -> Vec<String> {
    let single = format!("{ENV_PREFIX}_");
    let double = format!("{ENV_PREFIX}__");
    let mut ignored: Vec<String> = names
        .iter()
        .filter(|name| !name.starts_with(&double))
        .filter(|name| {
            name.strip_prefix(&single).is_some_and(|rest| {
                SECTIONS.iter().any(|section| {
                    rest.strip_prefix(section).is_some_and(|after| after.is_empty() || after.starts_with('_'))
                })
            })
        })
        .cloned()
        .collect();
    ignored.sort();
    ignored
}

/// Finds and removes environment list entries whose index leaves a gap (`EXWATCH__EXCHANGES__5__API_KEY` when the
/// file lists no exchange): each is reported with its variable, instead of being renumbered or read as a key.
fn take_index_gaps(base: &Value, overlay: &mut Value, path: &str) -> Vec<String> {
    let Value::Object(entries) = overlay else {
        return Vec::new();
    };
    let mut problems = Vec::new();
    let is_list = !entries.is_empty() && entries.keys().all(|key| key.parse::<usize>().is_ok());
    if is_list {
        let length = match base {
            Value::Array(items) => items.len(),
            _ => 0,
        };
        let mut indices: Vec<usize> = entries.keys().filter_map(|key| key.parse().ok()).collect();
        indices.sort_unstable();
        let mut next = length;
        for index in indices {
            let key = index.to_string();
            if index < length || index == next {
                next = next.max(index + 1);
                if let Some(entry) = entries.get_mut(&key) {
                    let element = match base {
                        Value::Array(items) => items.get(index).unwrap_or(&Value::Null),
                        _ => &Value::Null,
                    };
                    problems.extend(take_index_gaps(element, entry, &format!("{path}__{key}")));
                }
                continue;
            }
            entries.remove(&key);
            let list = path.trim_start_matches("__").to_lowercase().replace("__", ".");
            problems.push(format!(
                "`{ENV_PREFIX}{}__{index}__…`: index {index} leaves a gap: `{list}` has {length} entries before the \
                 environment, so the next index is {next}",
                path.to_uppercase()
            ));
        }
    } else {
        for (key, value) in entries.iter_mut() {
            let element = base.get(key).unwrap_or(&Value::Null);
            problems.extend(take_index_gaps(element, value, &format!("{path}__{key}")));
        }
    }
    problems
}

/// Deep-merges `overlay` into `base`. An overlay table whose keys are all indices (`exchanges.0.api_key` from the
/// environment) patches the base array element by element, so the environment can complete an `[[exchanges]]` entry.
fn merge(base: &mut Value, overlay: Value) {
    match (base, overlay) {
        (Value::Object(base), Value::Object(overlay)) => {
            for (key, value) in overlay {
                match base.get_mut(&key) {
                    Some(existing) => merge(existing, value),
                    None => {
                        base.insert(key, value);
                    }
                }
            }
        }
        (Value::Array(base), Value::Object(overlay)) if overlay.keys().all(|key| key.parse::<usize>().is_ok()) => {
            for (key, value) in overlay {
                let index: usize = key.parse().unwrap_or(usize::MAX);
                if index < base.len() {
                    merge(&mut base[index], value);
                } else if index == base.len() {
                    base.push(value);
                } else {
                    // A gap (index 3 of a two-element list) is kept as a table so validation names it.
                    base.push(Value::Object(Map::from_iter([(key, value)])));
                }
            }
        }
        (base, overlay) => *base = overlay,
    }
}

/// Walks the merged tree, taking each known key and recording a problem for each bad or unknown one.
#[derive(Default)]
struct Reader {
    problems: Vec<String>,
    placeholders: Vec<String>,
}

/// One table being read, with the dotted path of its keys.
struct Table {
    path: String,
    entries: Map<String, Value>,
}

impl Table {
    fn key(&self, name: &str) -> String {
        if self.path.is_empty() { name.to_owned() } else { format!("{}.{name}", self.path) }
    }
}

impl Reader {
    /// Records a value still holding the secret template's placeholder: `run` starts with that part off and
    /// reports it, `check-config` refuses it. The value itself is never printed.
    fn placeholder(&mut self, key: &str, consequence: &str) {
        self.placeholders.push(format!("`{key}`: is still the placeholder of {SECRET_TEMPLATE}; {consequence}"));
    }

    /// Records a problem once: a section read for each exchange (`[rate_limit]`) reports its problems once.
    fn problem(&mut self, key: &str, message: impl fmt::Display) {
        let problem = format!("`{key}`: {message}");
        if !self.problems.contains(&problem) {
            self.problems.push(problem);
        }
    }

    /// Whether none of `keys` has a problem yet: a check across keys compares given values, never the default a
    /// bad value fell back to.
    fn valid(&self, keys: &[&str]) -> bool {
        !self.problems.iter().any(|problem| keys.iter().any(|key| problem.starts_with(&format!("`{key}`:"))))
    }

    fn table(&mut self, path: String, value: Option<Value>) -> Table {
        match value {
            None => Table { path, entries: Map::new() },
            Some(Value::Object(entries)) => Table { path, entries },
            Some(other) => {
                self.problem(&path, format!("expected a table, found {}", kind_of(&other)));
                Table { path, entries: Map::new() }
            }
        }
    }

    fn section(&mut self, root: &mut Table, name: &str) -> Table {
        let value = root.entries.remove(name);
        let path = root.key(name);
        self.table(path, value)
    }

    /// Records every key left in the table: anything not taken is unknown.
    fn finish(&mut self, table: Table) {
        for key in table.entries.keys() {
            let full = table.key(key);
            self.problem(&full, "unknown key");
        }
    }

    fn string(&mut self, table: &mut Table, name: &str) -> Option<String> {
        let key = table.key(name);
        match table.entries.remove(name)? {
            Value::String(text) => Some(text),
            Value::Number(number) => Some(number.to_string()),
            other => {
                self.problem(&key, format!("expected a string, found {}", kind_of(&other)));
                None
            }
        }
    }

    fn parsed<T>(&mut self, table: &mut Table, name: &str, default: T, parse: impl Fn(&str) -> Result<T, String>) -> T {
        let key = table.key(name);
        match self.string(table, name) {
            None => default,
            Some(text) => match parse(text.trim()) {
                Ok(value) => value,
                Err(message) => {
                    self.problem(&key, message);
                    default
                }
            },
        }
    }

    /// A duration above zero and at most the key's [`duration_limit`], so no deadline computed from it can
    /// overflow.
    fn duration(&mut self, table: &mut Table, name: &str, default: Duration) -> Duration {
        let limit = duration_limit(&table.key(name));
        self.parsed(table, name, default, |text| {
            let duration = humantime::parse_duration(text).map_err(|error| {
                format!("invalid duration {text:?} ({error}); use forms like \"250ms\", \"30s\", \"5m\"")
            })?;
            if duration.is_zero() {
                Err(format!("must be greater than zero (got {text:?})"))
            } else if duration > limit {
                Err(format!("{text:?} is above the maximum of {}", humantime::format_duration(limit)))
            } else {
                Ok(duration)
            }
        })
    }

    /// A value within `range` (inclusive), given as a number or, from the environment, as text.
    fn ranged<T>(
        &mut self,
        table: &mut Table,
        name: &str,
        default: T,
        range: (T, T),
        what: &str,
        from_number: impl Fn(&serde_json::Number) -> Option<T>,
    ) -> T
    where
        T: std::str::FromStr + PartialOrd + Copy + fmt::Display,
    {
        let key = table.key(name);
        let value = match table.entries.remove(name) {
            None => return default,
            Some(Value::Number(number)) => from_number(&number),
            Some(Value::String(text)) => text.trim().parse::<T>().ok(),
            Some(other) => {
                self.problem(&key, format!("expected {what}, found {}", kind_of(&other)));
                return default;
            }
        };
        match value {
            Some(value) if value >= range.0 && value <= range.1 => value,
            _ => {
                self.problem(&key, format!("expected {what} from {} to {}", range.0, range.1));
                default
            }
        }
    }

    /// A number within `range` (inclusive).
    fn number(&mut self, table: &mut Table, name: &str, default: f64, range: (f64, f64)) -> f64 {
        self.ranged(table, name, default, range, "a number", serde_json::Number::as_f64)
    }

    /// A whole number within `range` (inclusive).
    fn integer(&mut self, table: &mut Table, name: &str, default: u32, range: (u32, u32)) -> u32 {
        self.ranged(table, name, default, range, "a whole number", |number| {
            number.as_u64().and_then(|value| u32::try_from(value).ok())
        })
    }

    /// A list of strings; the environment gives it comma-separated.
    fn string_list(&mut self, table: &mut Table, name: &str) -> Option<Vec<String>> {
        let key = table.key(name);
        match table.entries.remove(name)? {
            Value::Array(items) => {
                let mut strings = Vec::new();
                for item in items {
                    match item {
                        Value::String(text) => strings.push(text),
                        other => self.problem(&key, format!("expected strings, found {}", kind_of(&other))),
                    }
                }
                Some(strings)
            }
            Value::String(text) => {
                Some(text.split(',').map(str::trim).filter(|item| !item.is_empty()).map(str::to_owned).collect())
            }
            other => {
                self.problem(&key, format!("expected a list of strings, found {}", kind_of(&other)));
                None
            }
        }
    }

    fn breaker(&mut self, root: &mut Table) -> breaker::Config {
        let defaults = breaker::Config::default();
        let mut table = self.section(root, "breaker");
        let consecutive_failures =
            self.integer(&mut table, "consecutive_failures", defaults.consecutive_failures, (0, 1000));
        let failure_rate_threshold =
            self.number(&mut table, "failure_rate_threshold", defaults.failure_rate_threshold, (1.0, 100.0));
        let slow_call_rate_threshold =
            self.number(&mut table, "slow_call_rate_threshold", defaults.slow_call_rate_threshold, (1.0, 100.0));
        let slow_call_duration = self.duration(&mut table, "slow_call_duration", defaults.slow_call_duration);
        let window_type = self.string(&mut table, "window_type").unwrap_or_else(|| "time".to_owned());
        let window_duration = self.duration(&mut table, "window_duration", Duration::from_secs(600));
        let window_calls = self.integer(&mut table, "window_calls", 10, (1, 10_000));
        let window = match window_type.as_str() {
            "time" => breaker::Window::Time(window_duration),
            "count" => breaker::Window::Count(window_calls),
            other => {
                let key = table.key("window_type");
                self.problem(&key, format!("unknown window type {other:?}; expected time or count"));
                defaults.window
            }
        };
        let minimum_calls = self.integer(&mut table, "minimum_calls", defaults.minimum_calls, (1, 10_000));
        let wait_duration_in_open = self.duration(&mut table, "wait_duration_in_open", defaults.wait_duration_in_open);
        let multiplier = self.number(&mut table, "backoff_multiplier", 1.0, (1.0, 10.0));
        let max_wait = self.duration(&mut table, "backoff_max_wait", Duration::from_secs(600));
        let jitter = self.number(&mut table, "backoff_jitter", 0.1, (0.0, 1.0));
        let open_backoff = (multiplier > 1.0).then_some(breaker::Backoff { multiplier, max_wait, jitter });
        let permitted_calls_in_half_open =
            self.integer(&mut table, "permitted_calls_in_half_open", defaults.permitted_calls_in_half_open, (1, 100));
        let max_wait_in_half_open = self.duration(&mut table, "max_wait_in_half_open", defaults.max_wait_in_half_open);
        let ignored_key = table.key("ignored_classes");
        let ignored_classes = match self.string_list(&mut table, "ignored_classes") {
            None => defaults.ignored_classes,
            Some(names) => names
                .iter()
                .filter_map(|name| {
                    let class = ErrorClass::parse(name);
                    if class.is_none() {
                        let known: Vec<&str> = ErrorClass::ALL.iter().map(|class| class.as_str()).collect();
                        self.problem(
                            &ignored_key,
                            format!("unknown error class {name:?}; known: {}", known.join(", ")),
                        );
                    }
                    class
                })
                .collect(),
        };
        self.finish(table);
        breaker::Config {
            consecutive_failures,
            failure_rate_threshold,
            slow_call_rate_threshold,
            slow_call_duration,
            window,
            minimum_calls,
            wait_duration_in_open,
            open_backoff,
            permitted_calls_in_half_open,
            max_wait_in_half_open,
            ignored_classes,
        }
    }

    fn alerts(&mut self, root: &mut Table, external_url: &str) -> alert::Config {
        let defaults = alert::Config::default();
        let mut table = self.section(root, "alerts");
        let mut down_table = self.section(&mut table, "down");
        let down = alert::rules::DownConfig {
            consecutive_failures: self.integer(
                &mut down_table,
                "consecutive_failures",
                defaults.down.consecutive_failures,
                (1, 1000),
            ),
            recovery_successes: self.integer(
                &mut down_table,
                "recovery_successes",
                defaults.down.recovery_successes,
                (1, 1000),
            ),
        };
        self.finish(down_table);
        let mut slow_table = self.section(&mut table, "slow");
        let slow = alert::rules::SlowConfig {
            window: self.duration(&mut slow_table, "window", defaults.slow.window),
            threshold: self.duration(&mut slow_table, "threshold", defaults.slow.threshold),
            resolve_ratio: self.number(&mut slow_table, "resolve_ratio", defaults.slow.resolve_ratio, (0.1, 1.0)),
            minimum_samples: self.integer(
                &mut slow_table,
                "minimum_samples",
                defaults.slow.minimum_samples,
                (1, 10_000),
            ),
        };
        self.finish(slow_table);
        let evidence_window = self.duration(&mut table, "evidence_window", defaults.evidence_window);
        let runbook_url =
            self.string(&mut table, "runbook_url").unwrap_or_else(|| format!("{external_url}{}", alert::RUNBOOK_PATH));
        if let Err(error) = url::Url::parse(&runbook_url) {
            let key = table.key("runbook_url");
            self.problem(&key, format!("invalid URL ({error})"));
        }
        let mut delivery_table = self.section(&mut table, "delivery");
        let delivery = alert::outbox::Config {
            initial_backoff: self.duration(&mut delivery_table, "initial_backoff", defaults.delivery.initial_backoff),
            max_backoff: self.duration(&mut delivery_table, "max_backoff", defaults.delivery.max_backoff),
            expire_after: self.duration(&mut delivery_table, "expire_after", defaults.delivery.expire_after),
        };
        if delivery.max_backoff < delivery.initial_backoff
            && self.valid(&["alerts.delivery.max_backoff", "alerts.delivery.initial_backoff"])
        {
            let key = delivery_table.key("max_backoff");
            self.problem(&key, "is shorter than `alerts.delivery.initial_backoff`");
        }
        self.finish(delivery_table);
        let sinks_key = table.key("sinks");
        let mut sinks: Vec<alert::sink::Config> = Vec::new();
        for (index, entry) in self.table_list(&sinks_key, table.entries.remove("sinks")).into_iter().enumerate() {
            let mut sink_table = self.table(format!("{sinks_key}[{index}]"), Some(entry));
            if let Some(sink) = self.sink(&mut sink_table) {
                if sinks.iter().any(|other| other.name == sink.name) {
                    let key = sink_table.key("name");
                    self.problem(&key, format!("duplicate sink name {:?}; give each sink its own `name`", sink.name));
                }
                sinks.push(sink);
            }
            self.finish(sink_table);
        }
        self.finish(table);
        alert::Config {
            down,
            slow,
            evidence_window,
            runbook_url,
            external_url: external_url.to_owned(),
            delivery,
            sinks,
        }
    }

    /// One `[[alerts.sinks]]` entry.
    fn sink(&mut self, table: &mut Table) -> Option<alert::sink::Config> {
        use alert::sink::{Config as Sink, DEFAULT_SIGNATURE_HEADER, SinkKind};
        let kind_key = table.key("kind");
        let Some(kind) = self.string(table, "kind") else {
            self.problem(&kind_key, "missing; expected \"alertmanager\" or \"webhook\"");
            return None;
        };
        let name = self.string(table, "name").unwrap_or_else(|| kind.clone());
        let timeout = self.duration(table, "timeout", Duration::from_secs(10));
        let (kind, urls) = match kind.as_str() {
            "alertmanager" => {
                let resend_interval = self.duration(table, "resend_interval", Duration::from_secs(60));
                let urls_key = table.key("urls");
                let urls = self.string_list(table, "urls").unwrap_or_default();
                if urls.is_empty() {
                    self.problem(&urls_key, "list at least one Alertmanager URL");
                }
                (SinkKind::Alertmanager { resend_interval }, urls)
            }
            "webhook" => {
                let url_key = table.key("url");
                let url = self.string(table, "url");
                if url.is_none() {
                    self.problem(&url_key, "missing; the webhook's URL");
                }
                let bearer_token = self.secret_or_file(table, "bearer_token");
                let hmac_secret = self.secret_or_file(table, "hmac_secret");
                let signature_header =
                    self.string(table, "signature_header").unwrap_or_else(|| DEFAULT_SIGNATURE_HEADER.to_owned());
                let headers_key = table.key("headers");
                let mut headers = Vec::new();
                let headers_table = self.table(headers_key.clone(), table.entries.remove("headers"));
                for (header, value) in headers_table.entries {
                    let Value::String(value) = value else {
                        self.problem(&format!("{headers_key}.{header}"), "expected a string");
                        continue;
                    };
                    match alert::sink::check_header(&header, &value) {
                        Ok(()) => headers.push((header, Secret::new(value))),
                        Err(message) => self.problem(&format!("{headers_key}.{header}"), message),
                    }
                }
                if let Err(message) = alert::sink::check_header(&signature_header, "sha256=0") {
                    let key = table.key("signature_header");
                    self.problem(&key, message);
                }
                (SinkKind::Webhook { bearer_token, hmac_secret, signature_header, headers }, url.into_iter().collect())
            }
            other => {
                self.problem(&kind_key, format!("unknown sink kind {other:?}; expected alertmanager or webhook"));
                return None;
            }
        };
        let url_key = table.key(if matches!(kind, SinkKind::Alertmanager { .. }) { "urls" } else { "url" });
        for url in &urls {
            // The URL is never printed: a webhook URL is often itself a credential.
            if !url::Url::parse(url).is_ok_and(|parsed| matches!(parsed.scheme(), "http" | "https")) {
                self.problem(&url_key, "must be an http:// or https:// URL");
            }
        }
        Some(Sink { name, kind, urls: urls.into_iter().map(Secret::new).collect(), timeout })
    }

    /// A list of tables (`[[name]]`); the environment alone gives `name.0.*` as a table keyed by index.
    fn table_list(&mut self, key: &str, value: Option<Value>) -> Vec<Value> {
        match value {
            None => Vec::new(),
            Some(Value::Array(entries)) => entries,
            Some(Value::Object(table)) if table.keys().all(|key| key.parse::<usize>().is_ok()) => {
                let mut indexed: Vec<(usize, Value)> =
                    table.into_iter().map(|(key, value)| (key.parse().unwrap_or(usize::MAX), value)).collect();
                indexed.sort_by_key(|(index, _)| *index);
                indexed.into_iter().map(|(_, value)| value).collect()
            }
            Some(other) => {
                self.problem(key, format!("expected a list of [[{key}]] tables, found {}", kind_of(&other)));
                Vec::new()
            }
        }
    }

    /// An exchange's Statuspage: its URL (http or https with a host), the page id it must report, and the components
    /// that mean "our API" (the kind's default without the key).
    fn statuspage(&mut self, table: &mut Table, profile: &exchange::Profile) -> Option<statuspage::Source> {
        let url = self.parsed(table, "statuspage_url", None, |text| match url::Url::parse(text) {
            Ok(url) if matches!(url.scheme(), "http" | "https") && url.host().is_some() => Ok(Some(url)),
            _ => Err("invalid URL; expected http:// or https:// with a host".to_owned()),
        });
        let page_id = self.string(table, "statuspage_page_id");
        let components = self.string_list(table, "statuspage_components");
        let Some(url) = url else {
            if page_id.is_some() || components.is_some() {
                let key = table.key("statuspage_url");
                self.problem(&key, "is needed by statuspage_page_id and statuspage_components, which are set");
            }
            return None;
        };
        let components =
            components.unwrap_or_else(|| profile.statuspage_components.iter().map(|name| (*name).to_owned()).collect());
        Some(statuspage::Source { url, page_id, components })
    }

    /// An exchange's WebSocket: ws:// or wss:// with a host.
    fn websocket_url(&mut self, table: &mut Table) -> Option<url::Url> {
        self.parsed(table, "websocket_url", None, |text| match url::Url::parse(text) {
            Ok(url) if matches!(url.scheme(), "ws" | "wss") && url.host().is_some() => Ok(Some(url)),
            _ => Err("invalid URL; expected ws:// or wss:// with a host".to_owned()),
        })
    }

    /// `[status_sources]`: how the exchanges' own status sources are read.
    fn status_sources(&mut self, root: &mut Table) -> StatusSources {
        let defaults = statuspage::Config::default();
        let mut table = self.section(root, "status_sources");
        let config = statuspage::Config {
            statuspage_interval: self.duration(&mut table, "statuspage_interval", defaults.statuspage_interval),
            timeout: self.duration(&mut table, "timeout", defaults.timeout),
            stale_after: self.duration(&mut table, "stale_after", defaults.stale_after),
        };
        let websocket_defaults = websocket::Config::default();
        let websocket = websocket::Config {
            ping_interval: self.duration(&mut table, "websocket_ping_interval", websocket_defaults.ping_interval),
            pong_timeout: self.duration(&mut table, "websocket_pong_timeout", websocket_defaults.pong_timeout),
            reconnect_max: self.duration(&mut table, "websocket_reconnect_max", websocket_defaults.reconnect_max),
        };
        for (key, value) in [
            ("statuspage_interval", config.statuspage_interval),
            ("timeout", config.timeout),
            ("websocket_ping_interval", websocket.ping_interval),
            ("websocket_pong_timeout", websocket.pong_timeout),
            ("websocket_reconnect_max", websocket.reconnect_max),
        ] {
            if value < Duration::from_secs(1) {
                let key = table.key(key);
                self.problem(&key, "must be at least 1s");
            }
        }
        self.finish(table);
        StatusSources { statuspage: config, websocket }
    }

    /// One exchange's limiter settings: its kind's budget, then `[rate_limit]` (`global`), then its own
    /// `rate_limit` table, each overriding the one before.
    fn exchange_rate_limit(&mut self, exchange: &mut Table, kind: Kind, global: &Option<Value>) -> limiter::Config {
        let kind_defaults = limiter::Config::with_budget(&kind.profile().rate_budget);
        let global = self.table("rate_limit".to_owned(), global.clone());
        let defaults = self.rate_limit(global, kind_defaults);
        match exchange.entries.remove("rate_limit") {
            None => defaults,
            Some(own) => {
                let own = self.table(exchange.key("rate_limit"), Some(own));
                self.rate_limit(own, defaults)
            }
        }
    }

    /// Reads a `rate_limit` table over `defaults`.
    fn rate_limit(&mut self, mut table: Table, defaults: limiter::Config) -> limiter::Config {
        let config = limiter::Config {
            public_per_second: self.number(
                &mut table,
                "public_per_second",
                defaults.public_per_second,
                (0.001, 1000.0),
            ),
            public_burst: self.integer(&mut table, "public_burst", defaults.public_burst, (1, 1000)),
            private_per_second: self.number(
                &mut table,
                "private_per_second",
                defaults.private_per_second,
                (0.001, 1000.0),
            ),
            private_burst: self.integer(&mut table, "private_burst", defaults.private_burst, (1, 1000)),
            min_factor: self.number(&mut table, "min_factor", defaults.min_factor, (0.001, 1.0)),
            recovery_quiet: self.duration(&mut table, "recovery_quiet", defaults.recovery_quiet),
            private_pause: self.duration(&mut table, "private_pause", defaults.private_pause),
            invalid_key_threshold: self.integer(
                &mut table,
                "invalid_key_threshold",
                defaults.invalid_key_threshold,
                (1, 100),
            ),
            private_recheck_interval: self.duration(
                &mut table,
                "private_recheck_interval",
                defaults.private_recheck_interval,
            ),
        };
        // Each re-check with a bad key is one more invalid-key answer toward a lockout: at most one a minute.
        if config.private_recheck_interval < Duration::from_secs(60) {
            let key = table.key("private_recheck_interval");
            self.problem(&key, "must be at least 1m: each re-check with a bad key counts toward a lockout");
        }
        self.finish(table);
        config
    }

    /// The `[database]` section: the store's location and retention, and the writer's batching and spool limits.
    fn database(&mut self, root: &mut Table) -> store::Config {
        let defaults = store::Config::default();
        let mut table = self.section(root, "database");
        let url = self.secret(&mut table, "url");
        if let Some(url) = &url
            && !(url.expose().starts_with("postgres://") || url.expose().starts_with("postgresql://"))
        {
            // The value is never printed: it may hold a password.
            let key = table.key("url");
            self.problem(&key, "must be a postgres:// or postgresql:// URL (leave it unset for SQLite)");
        } else if let Some(url) = &url
            && is_placeholder(url.expose())
        {
            let key = table.key("url");
            self.placeholder(&key, "call logs wait in memory and the spool until the database answers");
        } else if let Some(url) = &url
            && let Err(error) = url::Url::parse(url.expose())
        {
            // url's parse errors are fixed phrases ("invalid port number"), never the input.
            let key = table.key("url");
            self.problem(&key, format!("invalid URL ({error})"));
        }
        let sqlite_path = self.path(&mut table, "sqlite_path", defaults.sqlite_path);
        let retention = self.duration(&mut table, "retention", defaults.retention);
        let retention_interval = self.duration(&mut table, "retention_interval", defaults.retention_interval);
        let writer = defaults.writer;
        let batch_size = self.integer(&mut table, "batch_size", writer.batch_size as u32, (1, 10_000)) as usize;
        let flush_interval = self.duration(&mut table, "flush_interval", writer.flush_interval);
        let memory_rows = self.integer(&mut table, "memory_rows", writer.memory_rows as u32, (1, 10_000_000)) as usize;
        let memory_bytes = self.big_integer(&mut table, "memory_bytes", writer.memory_bytes, (64 << 10, 1 << 40));
        let spool_dir = self.path(&mut table, "spool_dir", writer.spool_dir);
        let spool_max_bytes =
            self.big_integer(&mut table, "spool_max_bytes", writer.spool_max_bytes, (1 << 20, 1 << 40));
        if memory_rows < batch_size && self.valid(&["database.memory_rows", "database.batch_size"]) {
            let key = table.key("memory_rows");
            self.problem(&key, format!("{memory_rows} is less than `database.batch_size` {batch_size}"));
        }
        self.finish(table);
        store::Config {
            url,
            sqlite_path,
            retention,
            retention_interval,
            writer: store::writer::Config {
                batch_size,
                flush_interval,
                memory_rows,
                memory_bytes,
                spool_dir,
                spool_max_bytes,
            },
        }
    }

    /// A non-empty file system path.
    fn path(&mut self, table: &mut Table, name: &str, default: PathBuf) -> PathBuf {
        self.parsed(table, name, default, |text| {
            if text.is_empty() { Err("must not be empty".to_owned()) } else { Ok(PathBuf::from(text)) }
        })
    }

    /// A whole number within `range` (inclusive) that may exceed `u32` (byte counts).
    fn big_integer(&mut self, table: &mut Table, name: &str, default: u64, range: (u64, u64)) -> u64 {
        self.ranged(table, name, default, range, "a whole number", serde_json::Number::as_u64)
    }

    fn secret(&mut self, table: &mut Table, name: &str) -> Option<Secret> {
        let value = self.string(table, name)?;
        let trimmed = value.trim();
        if trimmed.is_empty() {
            let key = table.key(name);
            self.problem(&key, "must not be empty");
            return None;
        }
        Some(Secret::new(trimmed))
    }

    /// A secret given inline (`name`) or as a path (`name_file`), never both.
    fn secret_or_file(&mut self, table: &mut Table, name: &str) -> Option<Secret> {
        let file_name = format!("{name}_file");
        let inline = self.secret(table, name);
        let file_key = table.key(&file_name);
        let path = self.string(table, &file_name).map(PathBuf::from);
        match (inline, path) {
            (Some(_), Some(_)) => {
                let key = table.key(name);
                self.problem(&key, format!("set either `{key}` or `{file_key}`, not both"));
                None
            }
            (Some(secret), None) => Some(secret),
            (None, Some(path)) => match read_secret_file(&path) {
                Ok(contents) if contents.trim().is_empty() => {
                    self.problem(&file_key, format!("file {} is empty", path.display()));
                    None
                }
                Ok(contents) => Some(Secret::new(contents.trim())),
                Err(problem) => {
                    self.problem(&file_key, problem);
                    None
                }
            },
            (None, None) => None,
        }
    }

    /// The `[server]` keys that bound connections to `listen`.
    fn connections(&mut self, table: &mut Table) -> crate::http::serve::Config {
        use crate::http::serve;
        let defaults = serve::Config::default();
        let mut timeout = |this: &mut Self, name: &str, default: Duration| {
            let value = this.duration(table, name, default);
            let (low, high) = serve::TIMEOUT_RANGE;
            if value < low || value > high {
                let key = table.key(name);
                this.problem(
                    &key,
                    format!(
                        "{} is out of range; expected {} to {}",
                        humantime::format_duration(value),
                        humantime::format_duration(low),
                        humantime::format_duration(high)
                    ),
                );
                return default;
            }
            value
        };
        let header_read_timeout = timeout(self, "header_read_timeout", defaults.header_read_timeout);
        let idle_timeout = timeout(self, "idle_timeout", defaults.idle_timeout);
        serve::Config {
            max_connections: self.integer(
                table,
                "max_connections",
                defaults.max_connections,
                serve::MAX_CONNECTIONS_RANGE,
            ),
            header_read_timeout,
            idle_timeout,
            fd_reserve: self.integer(table, "fd_reserve", defaults.fd_reserve, serve::FD_RESERVE_RANGE),
        }
    }

    fn config(&mut self, value: Value) -> Config {
        let mut root = self.table(String::new(), Some(value));

        let mut server = self.section(&mut root, "server");
        let listen = self.parsed(&mut server, "listen", SocketAddr::from(([0, 0, 0, 0], 9750)), |text| {
            text.parse::<SocketAddr>()
                .map_err(|error| format!("invalid socket address {text:?} ({error}); use host:port"))
        });
        let shutdown_grace = self.duration(&mut server, "shutdown_grace", Duration::from_secs(20));
        let instance = self.string(&mut server, "instance").unwrap_or_else(host_name);
        let external_url = match self.string(&mut server, "external_url") {
            Some(text) => match url::Url::parse(&text) {
                Ok(url) if matches!(url.scheme(), "http" | "https") => text.trim_end_matches('/').to_owned(),
                _ => {
                    let key = server.key("external_url");
                    self.problem(&key, format!("invalid URL {text:?}; expected http://host:port or https://host"));
                    String::new()
                }
            },
            None => default_external_url(listen),
        };
        let connections = self.connections(&mut server);
        self.finish(server);

        let mut poll_table = self.section(&mut root, "poll");
        let defaults = poller::Config::default();
        let poll = poller::Config {
            interval: self.duration(&mut poll_table, "interval", defaults.interval),
            timeout: self.duration(&mut poll_table, "timeout", defaults.timeout),
            balance_interval: self.duration(&mut poll_table, "balance_interval", defaults.balance_interval),
            slow_call_threshold: self.duration(&mut poll_table, "slow_call_threshold", defaults.slow_call_threshold),
            confirm_interval: self.duration(&mut poll_table, "confirm_interval", defaults.confirm_interval),
            recovery_check_interval: self.duration(
                &mut poll_table,
                "recovery_check_interval",
                defaults.recovery_check_interval,
            ),
        };
        self.finish(poll_table);
        if poll.timeout > poll.interval && self.valid(&["poll.timeout", "poll.interval"]) {
            self.problem(
                "poll.timeout",
                format!(
                    "{} exceeds poll.interval {}; a call must finish before the next poll is due",
                    humantime::format_duration(poll.timeout),
                    humantime::format_duration(poll.interval)
                ),
            );
        }

        let global_rate_limit = root.entries.remove("rate_limit");
        let rate_limit = {
            let table = self.table("rate_limit".to_owned(), global_rate_limit.clone());
            self.rate_limit(table, limiter::Config::default())
        };
        let exchanges = self.exchanges(root.entries.remove("exchanges"), &global_rate_limit);
        let breaker = self.breaker(&mut root);
        let alerts = self.alerts(&mut root, &external_url);
        // Each poll makes two public calls; a budget below that would throttle every poll and stall the loop.
        let needed = PUBLIC_CALLS_PER_POLL / poll.interval.as_secs_f64();
        for (index, view) in exchanges.iter().enumerate() {
            let own = format!("exchanges[{index}].rate_limit.public_per_second");
            let key = if view.own_rate_limit { own.as_str() } else { "rate_limit.public_per_second" };
            if needed > view.rate_limit.public_per_second && self.valid(&["poll.interval", key]) {
                self.problem(
                    key,
                    format!(
                        "{} is below the {needed:.2} public calls per second that poll.interval {} needs",
                        view.rate_limit.public_per_second,
                        humantime::format_duration(poll.interval)
                    ),
                );
            }
        }

        let database = self.database(&mut root);
        let status_sources = self.status_sources(&mut root);

        let mut admin = self.section(&mut root, "admin");
        let token = self.secret_or_file(&mut admin, "token");
        let token = token.filter(|token| {
            if is_placeholder(token.expose()) {
                self.placeholder("admin.token", "the admin API stays off; generate one with `openssl rand -hex 24`");
                false
            } else {
                true
            }
        });
        if token.as_ref().is_some_and(|token| token.expose().len() < 16) {
            self.problem("admin.token", "must be at least 16 characters");
        }
        self.finish(admin);

        let mut log = self.section(&mut root, "log");
        let level = self.string(&mut log, "level").unwrap_or_else(|| telemetry::Config::default().level);
        if let Err(error) = tracing_subscriber::EnvFilter::builder().parse(&level) {
            self.problem("log.level", format!("invalid filter {level:?} ({error})"));
        }
        let format = self.parsed(&mut log, "format", LogFormat::Auto, |text| match text {
            "auto" => Ok(LogFormat::Auto),
            "json" => Ok(LogFormat::Json),
            "pretty" => Ok(LogFormat::Pretty),
            other => Err(format!("unknown format {other:?}; expected auto, json or pretty")),
        });
        self.finish(log);

        self.finish(root);
        Config {
            server: Server { listen, instance, shutdown_grace, external_url, connections },
            poll,
            exchanges,
            breaker,
            rate_limit,
            alerts,
            database,
            admin: Admin { token },
            status_sources,
            log: telemetry::Config { level, format },
            ignored_variables: Vec::new(),
            placeholders: std::mem::take(&mut self.placeholders),
        }
    }

    fn exchanges(&mut self, value: Option<Value>, global_rate_limit: &Option<Value>) -> Vec<ExchangeView> {
        let entries = match value {
            None => vec![Value::Object(Map::new())],
            Some(Value::Array(entries)) if entries.is_empty() => {
                self.problem("exchanges", "must list at least one exchange (omit it for the default, Kraken)");
                Vec::new()
            }
            value => self.table_list("exchanges", value),
        };
        let mut names = BTreeSet::new();
        let mut views = Vec::new();
        for (index, entry) in entries.into_iter().enumerate() {
            let mut table = self.table(format!("exchanges[{index}]"), Some(entry));
            let view = self.exchange(&mut table, global_rate_limit);
            self.finish(table);
            if let Some(view) = view {
                if !names.insert(view.name.clone()) {
                    self.problem(
                        &format!("exchanges[{index}].name"),
                        format!("duplicate exchange name {:?}", view.name),
                    );
                }
                views.push(view);
            }
        }
        views
    }

    fn exchange(&mut self, table: &mut Table, global_rate_limit: &Option<Value>) -> Option<ExchangeView> {
        let kinds = || Kind::ALL.map(|kind| kind.profile().id).join(", ");
        let kind = self.parsed(table, "kind", Kind::Kraken, |text| {
            Kind::parse(text).ok_or_else(|| format!("unknown exchange kind {text:?}; supported: {}", kinds()))
        });
        let profile = kind.profile();
        let name_key = table.key("name");
        let name = self.string(table, "name").unwrap_or_else(|| profile.id.to_owned());
        if name.is_empty()
            || !name.chars().all(|character| {
                character.is_ascii_lowercase() || character.is_ascii_digit() || "-_".contains(character)
            })
        {
            self.problem(&name_key, format!("invalid name {name:?}; use lowercase letters, digits, '-' and '_'"));
        }
        let base_url = self.parsed(table, "base_url", None, |text| {
            // url's parse errors are fixed phrases, never the input; a URL is only shown without credentials.
            let url = url::Url::parse(text).map_err(|error| format!("invalid URL ({error})"))?;
            match url.scheme() {
                "http" | "https" if url.host().is_some() => Ok(Some(url)),
                _ => Err(format!("invalid URL {}; expected http:// or https:// with a host", redact_url(&url))),
            }
        });
        let base_url = base_url.unwrap_or_else(|| {
            url::Url::parse(profile.default_base_url).expect("every kind's default base URL is a valid URL")
        });
        let pair_key = table.key("pair");
        let pair = self.string(table, "pair").unwrap_or_else(|| profile.default_pair.to_owned());
        if let Err(problem) = (profile.check_pair)(&pair) {
            self.problem(&pair_key, problem);
        }
        let depth_count = self.parsed(table, "depth_count", 10, |text| match text.parse::<u32>() {
            Ok(count @ 1..=500) => Ok(count),
            _ => Err(format!("invalid depth count {text:?}; expected a whole number from 1 to 500")),
        });
        let mut api_key = self.secret_or_file(table, "api_key");
        let mut api_secret = self.secret_or_file(table, "api_secret");
        let secret_key = table.key("api_secret");
        // A pod started from the template runs and says so, rather than crash-looping: the key is left out.
        if [&api_key, &api_secret].into_iter().flatten().any(|secret| is_placeholder(secret.expose())) {
            let key = table.key("api_key");
            self.placeholder(&format!("{key}`/`{secret_key}"), "the private Balance call stays off until both are set");
            (api_key, api_secret) = (None, None);
        }
        // The value itself is never printed.
        if let Some(Err(problem)) = api_secret.as_ref().map(|secret| (profile.check_secret)(secret.expose())) {
            self.problem(&secret_key, problem);
        }
        let credentials = match (&api_key, &api_secret) {
            (Some(api_key), Some(api_secret)) => {
                Some(Credentials { api_key: api_key.clone(), api_secret: api_secret.clone() })
            }
            (None, None) => None,
            (Some(_), None) => {
                self.problem(&secret_key, format!("is required when `{}` is set", table.key("api_key")));
                None
            }
            (None, Some(_)) => {
                let key = table.key("api_key");
                self.problem(&key, format!("is required when `{secret_key}` is set"));
                None
            }
        };
        let statuspage = self.statuspage(table, profile);
        let websocket_url = self.websocket_url(table);
        let own_rate_limit = table.entries.contains_key("rate_limit");
        let rate_limit = self.exchange_rate_limit(table, kind, global_rate_limit);
        let exchange = exchange::Config {
            name: name.clone(),
            kind,
            base_url: base_url.clone(),
            pair: pair.clone(),
            depth_count,
            credentials,
        };
        Some(ExchangeView {
            name,
            kind,
            base_url: redact_url(&base_url),
            pair,
            depth_count,
            api_key,
            api_secret,
            rate_limit,
            statuspage,
            websocket_url,
            own_rate_limit,
            exchange,
        })
    }
}

const MINUTE: u64 = 60;
const HOUR: u64 = 60 * MINUTE;
const DAY: u64 = 24 * HOUR;

/// The largest value each duration key accepts (README's configuration table lists them). A timeout or a latency
/// threshold above 5 minutes, a cadence or a wait above a day, is a typo; the bounds also keep every deadline
/// computed from a setting far from `Instant`'s range. A key not listed here (a new one) gets a day.
pub fn duration_limit(key: &str) -> Duration {
    // Sinks are `alerts.sinks[2].timeout`; the index does not matter.
    let key = match key.split_once("].") {
        Some((list, rest)) if list.starts_with("alerts.sinks[") => format!("alerts.sinks.{rest}"),
        _ => key.to_owned(),
    };
    let seconds = match key.as_str() {
        "poll.timeout"
        | "poll.slow_call_threshold"
        | "breaker.slow_call_duration"
        | "alerts.slow.threshold"
        | "alerts.sinks.timeout" => 5 * MINUTE,
        "server.shutdown_grace" | "poll.interval" | "database.flush_interval" | "alerts.delivery.initial_backoff" => {
            HOUR
        }
        "alerts.delivery.expire_after" | "database.retention_interval" => 30 * DAY,
        "database.retention" => 3650 * DAY,
        _ => DAY,
    };
    Duration::from_secs(seconds)
}

/// Whether files can be created in `directory`, or, while it does not exist yet, in its nearest existing ancestor
/// (the spool creates the rest). Tested by creating and removing a file: modes, ACLs, read-only mounts and root all
/// answer that the same way.
fn writable_directory(directory: &Path) -> Result<(), String> {
    let mut existing = directory;
    loop {
        match std::fs::metadata(existing) {
            Ok(metadata) if metadata.is_dir() => break,
            Ok(_) => return Err(format!("cannot be used: {} is not a directory", existing.display())),
            // Under a regular file (`file/spool`) the answer is "not a directory": the file is then found as the parent.
            Err(error) if matches!(error.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory) => {
                match existing.parent() {
                    Some(parent) if !parent.as_os_str().is_empty() => existing = parent,
                    _ => {
                        existing = Path::new(".");
                        break;
                    }
                }
            }
            Err(error) => return Err(format!("cannot be used: {}: {error}", existing.display())),
        }
    }
    let probe = existing.join(format!(".exwatch-write-test-{}", uuid::Uuid::now_v7()));
    match std::fs::OpenOptions::new().write(true).create_new(true).open(&probe) {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
            Ok(())
        }
        Err(error) => Err(format!("cannot be written: {}: {error}", existing.display())),
    }
}

/// The most a secret file may hold: keys, secrets and tokens are far smaller.
pub const SECRET_FILE_MAX_BYTES: u64 = 64 * 1024;

/// Reads a secret file: a regular file of at most [`SECRET_FILE_MAX_BYTES`]. The type is checked before the file is
/// opened, so a FIFO never blocks the start and a device (`/dev/zero`) is never read; the size is checked while
/// reading, so a file that grows meanwhile is still cut off.
fn read_secret_file(path: &Path) -> Result<String, String> {
    use std::io::Read as _;
    use std::os::unix::fs::FileTypeExt as _;

    let shown = path.display();
    let metadata = std::fs::metadata(path).map_err(|error| format!("cannot read {shown}: {error}"))?;
    let file_type = metadata.file_type();
    let refused = if file_type.is_dir() {
        Some("a directory")
    } else if file_type.is_fifo() {
        Some("a FIFO")
    } else if file_type.is_char_device() || file_type.is_block_device() {
        Some("a device")
    } else if file_type.is_socket() {
        Some("a socket")
    } else if !file_type.is_file() {
        Some("a special file")
    } else {
        None
    };
    if let Some(what) = refused {
        return Err(format!("cannot read {shown}: it is {what}; expected a regular file"));
    }
    if metadata.len() > SECRET_FILE_MAX_BYTES {
        return Err(too_large(path));
    }
    let file = std::fs::File::open(path).map_err(|error| format!("cannot read {shown}: {error}"))?;
    let mut contents = Vec::new();
    file.take(SECRET_FILE_MAX_BYTES + 1)
        .read_to_end(&mut contents)
        .map_err(|error| format!("cannot read {shown}: {error}"))?;
    if contents.len() as u64 > SECRET_FILE_MAX_BYTES {
        return Err(too_large(path));
    }
    String::from_utf8(contents).map_err(|_| format!("cannot read {shown}: it is not UTF-8 text"))
}

fn too_large(path: &Path) -> String {
    format!("cannot read {}: larger than {} KiB", path.display(), SECRET_FILE_MAX_BYTES / 1024)
}

fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "nothing",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a table",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn environment(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(key, value)| (key.to_string(), value.to_string())).collect()
    }

    #[test]
    fn defaults_monitor_one_kraken_exchange() {
        let config = Config::default();
        assert_eq!(config.server.listen, "0.0.0.0:9750".parse().unwrap());
        assert_eq!(config.poll.interval, Duration::from_secs(30));
        assert_eq!(config.poll.timeout, Duration::from_secs(10));
        assert_eq!(config.exchanges.len(), 1);
        let kraken = &config.exchanges[0].exchange;
        assert_eq!((kraken.name.as_str(), kraken.pair.as_str()), ("kraken", "XBTAUD"));
        assert_eq!(kraken.base_url.as_str(), "https://api.kraken.com/");
        assert!(kraken.credentials.is_none());
        assert!(config.database.url.is_none() && config.admin.token.is_none());
    }

    #[test]
    fn pages_link_to_the_runbook_served_at_the_external_url() {
        let default = Config::default();
        assert_eq!(default.server.external_url, "http://127.0.0.1:9750");
        assert_eq!(default.alerts.runbook_url, "http://127.0.0.1:9750/runbook");

        let config =
            Config::from_toml("[server]\nlisten = \"0.0.0.0:9750\"\nexternal_url = \"https://exwatch.example.net/\"\n")
                .unwrap();
        assert_eq!(config.server.external_url, "https://exwatch.example.net");
        assert_eq!(config.alerts.runbook_url, "https://exwatch.example.net/runbook");

        let error = Config::from_toml("[server]\nexternal_url = \"exwatch:9750\"\n").unwrap_err().to_string();
        assert!(error.contains("server.external_url"), "{error}");
    }

    #[test]
    fn defaults_warn_that_alerts_go_nowhere_the_admin_api_is_off_and_balance_is_unchecked() {
        let warnings = Config::default().warnings();
        assert_eq!(warnings.len(), 3, "{warnings:#?}");
        assert!(warnings[0].contains("no [[alerts.sinks]]") && warnings[0].contains("sent nowhere"), "{warnings:#?}");
        assert!(warnings[1].contains("admin.token") && warnings[1].contains("off"), "{warnings:#?}");
        assert!(warnings[2].contains("exchanges[0] (kraken)") && warnings[2].contains("Balance"), "{warnings:#?}");

        let configured = Config::from_toml(
            "[admin]\ntoken = \"0123456789abcdef0123\"\n[[alerts.sinks]]\nkind = \"webhook\"\nname = \"ops\"\n\
             url = \"http://hooks.test/x\"\n[[exchanges]]\nname = \"kraken\"\napi_key = \"key\"\n\
             api_secret = \"kQH5HW/8p1uGOVjbgWA7FunAmGO8lsSUXNsu3eow76sz84Q18fWxnyRzBHCd3pd5nE9qa99HAZtuZuj6F1huXg==\"\n",
        )
        .unwrap();
        assert_eq!(configured.warnings(), Vec::<String>::new());
    }

    #[test]
    fn the_secret_templates_placeholder_admin_token_is_refused() {
        let config = Config::from_toml("[admin]\ntoken = \"REPLACE_WITH_AT_LEAST_16_RANDOM_CHARACTERS\"\n").unwrap();
        assert!(config.admin.token.is_none(), "the admin API stays off");
        let error = config.check_placeholders().unwrap_err().to_string();
        assert!(error.contains("admin.token") && error.contains("placeholder"), "{error}");
        assert!(!error.contains("REPLACE_WITH"), "the value is a secret and is never printed: {error}");
    }

    #[test]
    fn server_connection_bounds_have_defaults_and_reject_values_out_of_range() {
        let defaults = Config::default().server.connections;
        assert_eq!(defaults, crate::http::serve::Config::default());
        let config = Config::from_toml(
            "[server]\nmax_connections = 50\nheader_read_timeout = \"2s\"\nidle_timeout = \"5m\"\nfd_reserve = 64\n",
        )
        .unwrap();
        let connections = config.server.connections;
        assert_eq!(
            (connections.max_connections, connections.header_read_timeout, connections.idle_timeout),
            (50, Duration::from_secs(2), Duration::from_secs(300))
        );
        assert_eq!(connections.fd_reserve, 64);
        let error = Config::from_toml(
            "[server]\nmax_connections = 0\nheader_read_timeout = \"1ms\"\nidle_timeout = \"2h\"\nfd_reserve = 1\n",
        )
        .unwrap_err()
        .to_string();
        for key in ["server.max_connections", "server.header_read_timeout", "server.idle_timeout", "server.fd_reserve"]
        {
            assert!(error.contains(key), "{key} missing from: {error}");
        }
    }

    #[test]
    fn toml_values_are_read_with_human_durations() {
        let config = Config::from_toml(
            r#"
            [server]
            listen = "127.0.0.1:0"
            [poll]
            interval = "250ms"
            timeout = "200ms"
            [rate_limit]
            public_per_second = 8
            [[exchanges]]
            name = "kraken"
            kind = "kraken"
            base_url = "http://127.0.0.1:8080"
            pair = "XBTUSD"
            api_key = "key"
            api_secret = "c2VjcmV0"
            "#,
        )
        .unwrap();
        assert_eq!(config.poll.interval, Duration::from_millis(250));
        assert_eq!(config.exchanges[0].exchange.pair, "XBTUSD");
        assert!(config.exchanges[0].exchange.credentials.is_some());
    }

    #[test]
    fn config_errors_name_every_bad_key_at_once() {
        let error = Config::from_toml(
            r#"
            [server]
            listen = "nowhere"
            [poll]
            interval = "soon"
            timeout = "0s"
            intervall = "30s"
            [[exchanges]]
            name = "Kraken!"
            kind = "binance"
            base_url = "ftp://example"
            pair = "XBT/AUD"
            api_key = "key"
            [database]
            url = "mysql://x"
            [admin]
            token = "short"
            [log]
            format = "xml"
            "#,
        )
        .unwrap_err();
        let text = error.to_string();
        for key in [
            "`server.listen`",
            "`poll.interval`",
            "`poll.timeout`",
            "`poll.intervall`: unknown key",
            "`exchanges[0].name`",
            "`exchanges[0].kind`",
            "`exchanges[0].base_url`",
            "`exchanges[0].pair`",
            "`exchanges[0].api_secret`: is required",
            "`database.url`",
            "`admin.token`",
            "`log.format`",
        ] {
            assert!(text.contains(key), "missing {key} in:\n{text}");
        }
        assert_eq!(error.problems.len(), 12, "{text}");
    }

    #[test]
    fn environment_overrides_the_file_and_completes_exchanges() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("exwatch.toml");
        std::fs::write(&path, "[poll]\ninterval = \"30s\"\n[[exchanges]]\nname = \"kraken\"\npair = \"XBTUSD\"\n")
            .unwrap();
        let config = Config::load_from(
            Some(&path),
            Some(environment(&[
                ("EXWATCH__POLL__INTERVAL", "45s"),
                ("EXWATCH__SERVER__LISTEN", "127.0.0.1:9999"),
                ("EXWATCH__EXCHANGES__0__API_KEY", "env-key"),
                ("EXWATCH__EXCHANGES__0__API_SECRET", "c2VjcmV0"),
                ("EXWATCH__ADMIN__TOKEN", "0123456789abcdef0123"),
                ("UNRELATED", "ignored"),
            ])),
        )
        .unwrap();
        assert_eq!(config.poll.interval, Duration::from_secs(45));
        assert_eq!(config.server.listen.port(), 9999);
        let kraken = &config.exchanges[0].exchange;
        assert_eq!(kraken.pair, "XBTUSD");
        assert_eq!(kraken.credentials.as_ref().unwrap().api_key.expose(), "env-key");
        // A leading zero survives: the environment is not number-parsed.
        assert_eq!(config.admin.token.as_ref().unwrap().expose(), "0123456789abcdef0123");
    }

    #[test]
    fn environment_alone_can_configure_the_default_exchange() {
        let config =
            Config::load_from(None, Some(environment(&[("EXWATCH__EXCHANGES__0__BASE_URL", "http://127.0.0.1:1")])))
                .unwrap();
        assert_eq!(config.exchanges.len(), 1);
        assert_eq!(config.exchanges[0].name, "kraken");
        assert_eq!(config.exchanges[0].exchange.base_url.as_str(), "http://127.0.0.1:1/");
    }

    #[test]
    fn unknown_environment_keys_are_reported() {
        let error = Config::load_from(None, Some(environment(&[("EXWATCH__POLL__INTERVL", "5s")]))).unwrap_err();
        assert_eq!(error.problems, vec!["`poll.intervl`: unknown key".to_owned()]);
    }

    #[test]
    fn secrets_come_from_files_and_are_redacted_in_the_effective_config() {
        let directory = tempfile::tempdir().unwrap();
        let key_path = directory.path().join("key");
        let secret_path = directory.path().join("secret");
        std::fs::write(&key_path, "file-key\n").unwrap();
        std::fs::write(&secret_path, "c3VwZXJzZWNyZXQ=\n").unwrap();
        let config = Config::from_toml(&format!(
            "[[exchanges]]\napi_key_file = {:?}\napi_secret_file = {:?}\n[admin]\ntoken = \"averyveryverylongtoken\"\n",
            key_path, secret_path
        ))
        .unwrap();
        let credentials = config.exchanges[0].exchange.credentials.as_ref().unwrap();
        assert_eq!(credentials.api_key.expose(), "file-key");
        let rendered = config.to_redacted_toml();
        assert!(!rendered.contains("file-key") && !rendered.contains("c3VwZXJzZWNyZXQ"), "{rendered}");
        assert!(!rendered.contains("averyveryverylongtoken"), "{rendered}");
        assert!(rendered.contains("[redacted]"), "{rendered}");
        assert!(rendered.contains("interval = \"30s\""), "{rendered}");
    }

    #[test]
    fn a_bad_secret_is_named_but_never_printed() {
        let error = Config::from_toml("[[exchanges]]\napi_key = \"k\"\napi_secret = \"not base64 !!\"\n").unwrap_err();
        assert_eq!(error.problems.len(), 1);
        assert!(error.problems[0].starts_with("`exchanges[0].api_secret`"));
        assert!(!error.to_string().contains("not base64 !!"));
    }

    #[test]
    fn unreadable_secret_files_and_duplicates_are_reported() {
        let error =
            Config::from_toml("[[exchanges]]\napi_key_file = \"/nonexistent/key\"\n[[exchanges]]\nname = \"kraken\"\n")
                .unwrap_err();
        let text = error.to_string();
        assert!(text.contains("`exchanges[0].api_key_file`: cannot read /nonexistent/key"), "{text}");
        assert!(text.contains("`exchanges[1].name`: duplicate exchange name"), "{text}");
    }

    #[test]
    fn breaker_and_rate_limit_settings_are_read_and_checked() {
        let config = Config::from_toml(
            r#"
            [breaker]
            consecutive_failures = 5
            failure_rate_threshold = 60
            window_type = "count"
            window_calls = 20
            wait_duration_in_open = "2m"
            backoff_multiplier = 2.0
            backoff_max_wait = "30m"
            ignored_classes = ["invalid_request", "bad_response"]
            [rate_limit]
            public_per_second = 0.5
            private_pause = "30m"
            "#,
        )
        .unwrap();
        assert_eq!(config.breaker.consecutive_failures, 5);
        assert_eq!(config.breaker.failure_rate_threshold, 60.0);
        assert_eq!(config.breaker.window, breaker::Window::Count(20));
        assert_eq!(config.breaker.wait_duration_in_open, Duration::from_secs(120));
        let backoff = config.breaker.open_backoff.unwrap();
        assert_eq!((backoff.multiplier, backoff.max_wait), (2.0, Duration::from_secs(1800)));
        assert!(config.breaker.ignored_classes.contains(&ErrorClass::BadResponse));
        assert_eq!(config.rate_limit.public_per_second, 0.5);
        assert_eq!(config.rate_limit.private_pause, Duration::from_secs(1800));
        let rendered = config.to_redacted_toml();
        assert!(rendered.contains("[breaker]") && rendered.contains("[rate_limit]"), "{rendered}");
        let again = Config::from_toml(&rendered).expect("the effective configuration reads back");
        assert_eq!(again.breaker, config.breaker);
        assert_eq!(again.rate_limit, config.rate_limit);

        let error = Config::from_toml(
            "[breaker]\nfailure_rate_threshold = 150\nwindow_type = \"sliding\"\nignored_classes = [\"oops\"]\n\
             [rate_limit]\nmin_factor = 0\npublic_burst = \"many\"\n",
        )
        .unwrap_err();
        let text = error.to_string();
        for key in [
            "`breaker.failure_rate_threshold`",
            "`breaker.window_type`",
            "`breaker.ignored_classes`: unknown error class \"oops\"",
            "`rate_limit.min_factor`",
            "`rate_limit.public_burst`",
        ] {
            assert!(text.contains(key), "missing {key} in:\n{text}");
        }
    }

    #[test]
    fn database_defaults_match_what_the_writer_and_retention_expect() {
        let database = Config::default().database;
        assert_eq!(database, store::Config::default());
        assert!(database.url.is_none());
        assert_eq!(database.sqlite_path, PathBuf::from("exwatch.sqlite"));
        assert_eq!(database.retention, Duration::from_secs(30 * 86_400));
        assert_eq!(database.retention_interval, Duration::from_secs(3600));
        assert_eq!((database.writer.batch_size, database.writer.memory_rows), (500, 10_000));
        assert_eq!(database.writer.flush_interval, Duration::from_secs(1));
        assert_eq!(database.writer.spool_dir, PathBuf::from("exwatch-spool"));
        assert_eq!(database.writer.spool_max_bytes, 268_435_456);
    }

    #[test]
    fn database_settings_are_read_with_day_durations_and_the_url_stays_secret() {
        let config = Config::from_toml(
            r#"
            [database]
            url = "postgresql://exwatch:hunter2@db.internal:5433/exwatch"
            sqlite_path = "/var/lib/exwatch/exwatch.sqlite"
            retention = "30d"
            retention_interval = "2h"
            batch_size = 250
            flush_interval = "500ms"
            memory_rows = 5000
            spool_dir = "/var/lib/exwatch/spool"
            spool_max_bytes = 8589934592
            "#,
        )
        .unwrap();
        let database = &config.database;
        assert_eq!(database.url.as_ref().unwrap().expose(), "postgresql://exwatch:hunter2@db.internal:5433/exwatch");
        assert_eq!(database.retention, Duration::from_secs(30 * 86_400));
        assert_eq!(database.retention_interval, Duration::from_secs(7200));
        assert_eq!((database.writer.batch_size, database.writer.memory_rows), (250, 5000));
        assert_eq!(database.writer.flush_interval, Duration::from_millis(500));
        assert_eq!(database.writer.spool_dir, PathBuf::from("/var/lib/exwatch/spool"));
        assert_eq!(database.writer.spool_max_bytes, 8 << 30);
        let rendered = config.to_redacted_toml();
        assert!(!rendered.contains("hunter2") && rendered.contains("retention = \"30days\""), "{rendered}");

        let environment =
            environment(&[("EXWATCH__DATABASE__RETENTION", "7d"), ("EXWATCH__DATABASE__BATCH_SIZE", "100")]);
        let config = Config::load_from(None, Some(environment)).unwrap();
        assert_eq!(config.database.retention, Duration::from_secs(7 * 86_400));
        assert_eq!(config.database.writer.batch_size, 100);
    }

    #[test]
    fn database_errors_name_every_bad_key_and_never_print_the_url() {
        let error = Config::from_toml(
            r#"
            [database]
            url = "mysql://root:hunter2@db/exwatch"
            sqlite_path = ""
            retention = "forever"
            retention_interval = "0s"
            batch_size = 0
            flush_interval = "soon"
            memory_rows = "many"
            spool_dir = ""
            spool_max_bytes = 10
            retention_days = 30
            "#,
        )
        .unwrap_err();
        let text = error.to_string();
        // Each named key, and for some the start of what is wrong with it.
        let expected = "`database.url` | `database.sqlite_path`: must not be empty | `database.retention` | \
                        `database.retention_interval`: must be greater than zero | `database.batch_size` | \
                        `database.flush_interval` | `database.memory_rows` | `database.spool_dir`: must not be empty \
                        | `database.spool_max_bytes` | `database.retention_days`: unknown key";
        for key in expected.split(" | ") {
            assert!(text.contains(key), "missing {key} in:\n{text}");
        }
        assert_eq!(error.problems.len(), 10, "{text}");
        assert!(!text.contains("hunter2"), "{text}");

        let error = Config::from_toml("[database]\nbatch_size = 1000\nmemory_rows = 999\n").unwrap_err();
        assert_eq!(error.problems, ["`database.memory_rows`: 999 is less than `database.batch_size` 1000"]);
    }

    #[test]
    fn breaker_settings_come_from_the_environment_too() {
        let config = Config::load_from(
            None,
            Some(environment(&[
                ("EXWATCH__BREAKER__CONSECUTIVE_FAILURES", "4"),
                ("EXWATCH__BREAKER__IGNORED_CLASSES", "invalid_request,auth"),
                ("EXWATCH__RATE_LIMIT__MIN_FACTOR", "0.25"),
            ])),
        )
        .unwrap();
        assert_eq!(config.breaker.consecutive_failures, 4);
        assert!(config.breaker.ignored_classes.contains(&ErrorClass::Auth));
        assert_eq!(config.rate_limit.min_factor, 0.25);
    }

    #[test]
    fn a_poll_interval_faster_than_the_public_budget_is_refused() {
        let error = Config::from_toml("[poll]\ninterval = \"1s\"\ntimeout = \"1s\"\n").unwrap_err();
        assert_eq!(error.problems.len(), 1);
        assert!(error.problems[0].starts_with("`rate_limit.public_per_second`: 1 is below the 2.00"), "{error}");
        let config =
            Config::from_toml("[poll]\ninterval = \"1s\"\ntimeout = \"1s\"\n[rate_limit]\npublic_per_second = 2\n");
        assert!(config.is_ok());
    }

    #[test]
    fn alert_sinks_are_read_and_every_bad_one_is_named() {
        let config = Config::load_from(
            None,
            Some(environment(&[
                ("EXWATCH__ALERTS__SINKS__0__KIND", "webhook"),
                ("EXWATCH__ALERTS__SINKS__0__URL", "https://hooks.example.com/T0/secret-path"),
                ("EXWATCH__ALERTS__SINKS__1__KIND", "alertmanager"),
                ("EXWATCH__ALERTS__SINKS__1__URLS", "http://am-0:9093,http://am-1:9093"),
            ])),
        )
        .unwrap();
        let sinks = &config.alerts.sinks;
        assert_eq!(sinks.iter().map(|sink| sink.name.as_str()).collect::<Vec<_>>(), ["webhook", "alertmanager"]);
        assert_eq!(sinks[1].urls.len(), 2);
        assert_eq!(sinks[1].kind, alert::sink::SinkKind::Alertmanager { resend_interval: Duration::from_secs(60) });
        assert!(!config.to_redacted_toml().contains("secret-path"), "webhook URLs are secrets");

        let error = Config::from_toml(
            r#"
            [alerts.delivery]
            initial_backoff = "1m"
            max_backoff = "1s"
            [[alerts.sinks]]
            kind = "pagerduty"
            [[alerts.sinks]]
            kind = "webhook"
            url = "ftp://example.com/x-secret"
            headers = { "bad header" = "v", "X-Ok" = 3 }
            bearer_token = "t"
            bearer_token_file = "/nonexistent"
            [[alerts.sinks]]
            kind = "webhook"
            [[alerts.sinks]]
            kind = "alertmanager"
            urls = []
            resend = "1m"
            "#,
        )
        .unwrap_err();
        let text = error.to_string();
        for key in [
            "`alerts.delivery.max_backoff`",
            "`alerts.sinks[0].kind`: unknown sink kind \"pagerduty\"",
            "`alerts.sinks[1].url`: must be an http:// or https:// URL",
            "`alerts.sinks[1].headers.bad header`",
            "`alerts.sinks[1].headers.X-Ok`: expected a string",
            "`alerts.sinks[1].bearer_token`: set either",
            "`alerts.sinks[2].url`: missing",
            "`alerts.sinks[2].name`: duplicate sink name \"webhook\"",
            "`alerts.sinks[3].urls`: list at least one Alertmanager URL",
            "`alerts.sinks[3].resend`: unknown key",
        ] {
            assert!(text.contains(key), "missing {key} in:\n{text}");
        }
        assert!(!text.contains("x-secret"), "{text}");
    }

    #[test]
    fn a_toml_syntax_error_names_line_column_and_key_but_never_the_text() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("exwatch.toml");
        // The closing quote after the secret is missing.
        let text = "[poll]\ninterval = \"30s\"\n[[exchanges]]\napi_key = \"k\"\napi_secret = \"c3VwZXJzZWNyZXQ=\n";
        std::fs::write(&path, text).unwrap();
        let error = Config::load_from(Some(&path), Some(HashMap::new())).unwrap_err();
        let shown = error.to_string();
        assert!(!shown.contains("c3VwZXJzZWNyZXQ"), "{shown}");
        assert_eq!(error.problems.len(), 1, "{shown}");
        let problem = &error.problems[0];
        assert!(problem.starts_with(&format!("cannot parse configuration file {} at line 5, column", path.display())));
        assert!(problem.contains("(key `api_secret` in [[exchanges]])"), "{problem}");

        let error = Config::from_toml("[admin]\ntoken = 'averyveryverylongtoken\n").unwrap_err();
        assert!(!error.to_string().contains("averyvery"), "{error}");
        assert!(error.problems[0].contains("line 2, column") && error.problems[0].contains("key `token`"), "{error}");
    }

    #[test]
    fn secret_files_must_be_small_regular_files() {
        let directory = tempfile::tempdir().unwrap();
        let fifo = directory.path().join("fifo");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status().expect("mkfifo runs");
        assert!(made.success());
        let large = directory.path().join("large");
        std::fs::write(&large, vec![b'a'; 65 * 1024]).unwrap();
        let cases = [
            (PathBuf::from("/dev/zero"), "it is a device"),
            (fifo, "it is a FIFO"),
            (directory.path().to_path_buf(), "it is a directory"),
            (large, "larger than 64 KiB"),
        ];
        for (path, expected) in cases {
            let error = Config::from_toml(&format!("[admin]\ntoken_file = {:?}\n", path)).unwrap_err();
            assert_eq!(error.problems.len(), 1, "{error}");
            let wanted = format!("`admin.token_file`: cannot read {}: {expected}", path.display());
            assert!(error.problems[0].starts_with(&wanted), "{error}");
        }
        let fits = directory.path().join("fits");
        std::fs::write(&fits, vec![b'a'; 64 * 1024]).unwrap();
        let config = Config::from_toml(&format!("[admin]\ntoken_file = {:?}\n", fits)).unwrap();
        assert_eq!(config.admin.token.unwrap().expose().len(), 64 * 1024);
    }

    /// Every duration key, with the TOML that sets it to `value`.
    fn duration_settings(value: &str) -> Vec<(&'static str, String)> {
        let plain = [
            ("server", "shutdown_grace"),
            ("poll", "interval"),
            ("poll", "timeout"),
            ("poll", "balance_interval"),
            ("poll", "slow_call_threshold"),
            ("breaker", "slow_call_duration"),
            ("breaker", "window_duration"),
            ("breaker", "wait_duration_in_open"),
            ("breaker", "backoff_max_wait"),
            ("breaker", "max_wait_in_half_open"),
            ("rate_limit", "recovery_quiet"),
            ("rate_limit", "private_pause"),
            ("rate_limit", "private_recheck_interval"),
            ("alerts.slow", "window"),
            ("alerts.slow", "threshold"),
            ("alerts", "evidence_window"),
            ("alerts.delivery", "initial_backoff"),
            ("alerts.delivery", "max_backoff"),
            ("alerts.delivery", "expire_after"),
            ("database", "retention"),
            ("database", "retention_interval"),
            ("database", "flush_interval"),
        ];
        let mut settings: Vec<(&'static str, String)> = plain
            .iter()
            .map(|(section, name)| {
                let key: &'static str = Box::leak(format!("{section}.{name}").into_boxed_str());
                (key, format!("[{section}]\n{name} = \"{value}\"\n"))
            })
            .collect();
        let sink = "[[alerts.sinks]]\nkind = \"alertmanager\"\nurls = [\"http://127.0.0.1:9093\"]\n";
        settings.push(("alerts.sinks[0].timeout", format!("{sink}timeout = \"{value}\"\n")));
        settings.push(("alerts.sinks[0].resend_interval", format!("{sink}resend_interval = \"{value}\"\n")));
        settings
    }

    #[test]
    fn every_duration_key_refuses_humantimes_maximum_naming_the_key_and_its_bound() {
        let maximum = humantime::format_duration(Duration::MAX).to_string();
        assert_eq!(humantime::parse_duration(&maximum).unwrap(), Duration::MAX, "humantime reads it");
        for (key, toml) in duration_settings(&maximum) {
            let error = Config::from_toml(&toml).unwrap_err();
            let limit = humantime::format_duration(duration_limit(key)).to_string();
            let wanted = format!("`{key}`: {maximum:?} is above the maximum of {limit}");
            assert_eq!(error.problems, vec![wanted], "{key}");
        }
        // Each bound itself is accepted (poll.interval's needs a public budget to match).
        for (key, toml) in duration_settings("1s") {
            let at_limit = humantime::format_duration(duration_limit(key)).to_string();
            let toml = toml.replace("\"1s\"", &format!("{at_limit:?}"));
            let result = Config::from_toml(&toml);
            if let Err(error) = result {
                assert!(error.problems.iter().all(|problem| !problem.contains("is above the maximum")), "{error}");
            }
        }
    }

    #[test]
    fn a_database_url_with_a_bad_port_is_refused_naming_the_key() {
        for url in ["postgres://exwatch:hunter2@db:99999/exwatch", "postgresql://exwatch:hunter2@db:port/exwatch"] {
            let error = Config::from_toml(&format!("[database]\nurl = {url:?}\n")).unwrap_err();
            assert_eq!(error.problems, ["`database.url`: invalid URL (invalid port number)"], "{url}");
        }
        assert!(Config::from_toml("[database]\nurl = \"postgres://exwatch:hunter2@db:5432/exwatch\"\n").is_ok());
    }

    #[test]
    fn a_zero_duration_is_reported_with_the_value_given_not_the_default() {
        let error = Config::from_toml("[poll]\ninterval = \"5s\"\ntimeout = \"0ms\"\n").unwrap_err();
        // Not also "10s exceeds poll.interval 5s": 10 s is the default the bad value fell back to.
        assert_eq!(error.problems, ["`poll.timeout`: must be greater than zero (got \"0ms\")"]);
        let error = Config::from_toml("[database]\nbatch_size = \"many\"\nmemory_rows = 10\n").unwrap_err();
        assert_eq!(error.problems.len(), 1, "{error}");
    }

    #[test]
    fn an_environment_index_gap_is_reported_naming_the_variable() {
        let error = Config::load_from(None, Some(environment(&[("EXWATCH__EXCHANGES__5__API_KEY", "k")]))).unwrap_err();
        assert_eq!(
            error.problems,
            ["`EXWATCH__EXCHANGES__5__…`: index 5 leaves a gap: `exchanges` has 0 entries before the environment, \
              so the next index is 0"]
        );
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("exwatch.toml");
        std::fs::write(&path, "[[exchanges]]\nname = \"one\"\n[[exchanges]]\nname = \"two\"\n").unwrap();
        let variables = [
            ("EXWATCH__EXCHANGES__1__PAIR", "XBTUSD"),
            ("EXWATCH__EXCHANGES__2__NAME", "three"),
            ("EXWATCH__EXCHANGES__4__NAME", "five"),
            ("EXWATCH__ALERTS__SINKS__1__KIND", "webhook"),
        ];
        let error = Config::load_from(Some(&path), Some(environment(&variables))).unwrap_err();
        let mut problems = error.problems.clone();
        problems.sort();
        assert_eq!(problems.len(), 2, "{error}");
        assert!(problems[0].starts_with("`EXWATCH__ALERTS__SINKS__1__…`: index 1 leaves a gap"), "{error}");
        assert!(problems[1].starts_with("`EXWATCH__EXCHANGES__4__…`: index 4 leaves a gap"), "{error}");
        assert!(problems[1].ends_with("`exchanges` has 2 entries before the environment, so the next index is 3"));
    }

    #[test]
    fn single_underscore_variables_are_listed_for_a_warning_and_ignored() {
        let config = Config::load_from(
            None,
            Some(environment(&[
                ("EXWATCH_POLL__INTERVAL", "5s"),
                ("EXWATCH_DATABASE_URL", "postgres://x"),
                ("EXWATCH_CONFIG", "/etc/exwatch.toml"),
                ("EXWATCH_BIN", "target/dist/exwatch"),
                ("EXWATCH__POLL__TIMEOUT", "5s"),
            ])),
        )
        .unwrap();
        assert_eq!(config.ignored_variables, ["EXWATCH_DATABASE_URL", "EXWATCH_POLL__INTERVAL"]);
        assert_eq!(config.poll.interval, Duration::from_secs(30), "ignored, as the warning says");
        assert_eq!(config.poll.timeout, Duration::from_secs(5));
    }

    #[test]
    fn an_unusable_spool_dir_is_found_by_the_start_check() {
        let directory = tempfile::tempdir().unwrap();
        let file = directory.path().join("file");
        std::fs::write(&file, "").unwrap();
        let spool = file.join("spool");
        let config = Config::from_toml(&format!("[database]\nspool_dir = {spool:?}\n")).unwrap();
        let error = config.check_writable_paths().unwrap_err();
        assert_eq!(
            error.problems,
            [format!(
                "`database.spool_dir`: {} cannot be used: {} is not a directory",
                spool.display(),
                file.display()
            )]
        );
        let fresh = directory.path().join("not").join("yet");
        let config = Config::from_toml(&format!("[database]\nspool_dir = {fresh:?}\n")).unwrap();
        assert_eq!(config.check_writable_paths(), Ok(()));
        assert!(!fresh.exists(), "the check creates nothing");
        assert_eq!(std::fs::read_dir(directory.path()).unwrap().count(), 1, "and leaves nothing behind");
    }

    #[test]
    fn credentials_in_urls_are_redacted_in_the_effective_config_and_in_errors() {
        let config = Config::from_toml(
            "[[exchanges]]\nbase_url = \"https://user:hunter2@proxy.example:8443/kraken?token=hunter3\"\n",
        )
        .unwrap();
        let rendered = config.to_redacted_toml();
        assert!(
            rendered.contains("base_url = \"https://[redacted]@proxy.example:8443/kraken?token=[redacted]\""),
            "{rendered}"
        );
        assert!(!rendered.contains("hunter"), "{rendered}");
        let error = Config::from_toml(
            "[[exchanges]]\nbase_url = \"ftp://user:hunter2@example.com/?key=hunter3\"\n[alerts]\n\
             runbook_url = \"hunter4 not a url\"\n",
        )
        .unwrap_err();
        let shown = error.to_string();
        assert!(!shown.contains("hunter"), "{shown}");
        assert!(
            shown.contains("invalid URL ftp://[redacted]@example.com/?key=[redacted]; expected http://"),
            "{shown}"
        );
    }

    #[test]
    fn each_exchange_gets_its_kinds_budget_then_the_global_rate_limit_then_its_own() {
        let config = Config::from_toml(
            "[rate_limit]\nprivate_burst = 20\nmin_factor = 0.25\n\
             [[exchanges]]\nname = \"primary\"\n\
             [[exchanges]]\nname = \"backup\"\nrate_limit = { public_per_second = 0.5, private_burst = 5 }\n",
        )
        .unwrap();
        let kraken = limiter::Config::with_budget(&Kind::Kraken.profile().rate_budget);
        let primary = &config.exchanges[0].rate_limit;
        assert_eq!(
            (primary.public_per_second, primary.private_burst, primary.min_factor),
            (kraken.public_per_second, 20, 0.25)
        );
        let backup = &config.exchanges[1].rate_limit;
        assert_eq!((backup.public_per_second, backup.private_burst, backup.min_factor), (0.5, 5, 0.25));
        assert_eq!(config.rate_limit_for("backup"), backup);
        assert_eq!(config.schedule("backup").public_per_second, 0.5);
        assert_eq!(config.schedule("primary").public_per_second, kraken.public_per_second);
        // A daemon built around an exchange not configured here (a test fake) gets `[rate_limit]`.
        assert_eq!(config.rate_limit_for("fake"), &config.rate_limit);
    }

    #[test]
    fn rate_limit_problems_name_the_table_they_are_in_and_are_reported_once() {
        let error = Config::from_toml(
            "[rate_limit]\nmin_factor = 7.0\n[[exchanges]]\nname = \"a\"\n[[exchanges]]\nname = \"b\"\n\
             rate_limit = { private_burst = 0, burst = 3 }\n",
        )
        .unwrap_err();
        let problems = &error.problems;
        assert_eq!(problems.iter().filter(|problem| problem.starts_with("`rate_limit.min_factor`")).count(), 1);
        assert!(problems.iter().any(|problem| problem.starts_with("`exchanges[1].rate_limit.private_burst`")));
        assert!(problems.iter().any(|problem| problem.contains("exchanges[1].rate_limit.burst")), "{problems:#?}");
        // An exchange's own budget below what the poll interval needs names its own key.
        let error = Config::from_toml("[[exchanges]]\nrate_limit = { public_per_second = 0.01 }\n").unwrap_err();
        assert!(error.problems[0].starts_with("`exchanges[0].rate_limit.public_per_second`"), "{error}");
    }

    #[test]
    fn an_unknown_exchange_kind_lists_the_kinds_there_are() {
        let error = Config::from_toml("[[exchanges]]\nkind = \"bitstamp\"\n").unwrap_err();
        assert!(error.problems[0].contains("unknown exchange kind \"bitstamp\"; supported: kraken"), "{error}");
    }

    #[test]
    fn the_secret_templates_placeholders_start_with_that_part_off_and_fail_check_config() {
        let config = Config::from_toml(
            "[database]\nurl = \"postgres://REPLACE_USER:REPLACE_PASSWORD@REPLACE_HOST:5432/exwatch\"\n\
             [[exchanges]]\napi_key = \"REPLACE_WITH_KRAKEN_API_KEY\"\n\
             api_secret = \"REPLACE_WITH_KRAKEN_API_SECRET_BASE64\"\n",
        )
        .expect("placeholders do not stop the daemon from starting");
        assert!(config.exchanges[0].exchange.credentials.is_none(), "the private call stays off");
        assert_eq!(config.placeholders.len(), 2, "{:#?}", config.placeholders);
        assert!(config.placeholders[0].starts_with("`exchanges[0].api_key`/`exchanges[0].api_secret`: is still"));
        assert!(config.placeholders[1].starts_with("`database.url`: is still the placeholder"));
        let refused = config.check_placeholders().unwrap_err().to_string();
        assert!(refused.contains("2 problems") && !refused.contains("REPLACE_"), "{refused}");
        assert_eq!(Config::default().check_placeholders(), Ok(()));
    }

    #[test]
    fn the_websocket_is_off_unless_configured_and_its_settings_are_checked() {
        let config = Config::from_toml("[[exchanges]]\n").unwrap();
        assert_eq!(config.exchanges[0].websocket_url, None);
        assert_eq!(config.status_sources.websocket, websocket::Config::default());
        let config = Config::from_toml(
            "[status_sources]\nwebsocket_ping_interval = \"5s\"\nwebsocket_reconnect_max = \"1m\"\n\
             [[exchanges]]\nwebsocket_url = \"wss://ws.kraken.com/v2\"\n",
        )
        .unwrap();
        assert_eq!(config.exchanges[0].websocket_url.as_ref().map(url::Url::as_str), Some("wss://ws.kraken.com/v2"));
        assert_eq!(config.status_sources.websocket.ping_interval, Duration::from_secs(5));
        assert_eq!(config.status_sources.websocket.pong_timeout, Duration::from_secs(10));
        assert_eq!(config.status_sources.websocket.reconnect_max, Duration::from_secs(60));
        let again = Config::from_toml(&config.to_redacted_toml()).expect("the effective configuration reads back");
        assert_eq!(again.status_sources, config.status_sources);

        let error = Config::from_toml(
            "[status_sources]\nwebsocket_pong_timeout = \"500ms\"\n\
             [[exchanges]]\nwebsocket_url = \"https://ws.kraken.com/v2\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("status_sources.websocket_pong_timeout"), "{error}");
        assert!(error.contains("exchanges[0].websocket_url") && error.contains("ws:// or wss://"), "{error}");
    }
}
