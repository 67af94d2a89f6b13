//! The store's commands: `migrate`, `logs`, `incidents [report ID]`, and `spool inspect|replay FILE`. Each opens the
//! configured database (read-only ones never create or migrate it), runs one store call and prints its rendering
//! or `--json`. A database that cannot be reached or refuses is exit 1 with its error, which names the database by
//! host, port and name only; the rendering itself is the store's (`store::report`, `store::replay`).

use std::process::ExitCode;

use super::{ConfigArgs, IncidentsArgs, LogsArgs, ReportArgs, SpoolInspectArgs, SpoolReplayArgs, load};
use crate::config::Config;
use crate::store::{Database, replay, report};

/// Connects to the configured database (applying migrations). `Err` is the exit code after the message is printed:
/// the error names the database by host, port and name only, never the URL's password.
async fn connect(config: &Config) -> Result<Database, ExitCode> {
    Database::connect(&config.database).await.map_err(|error| {
        eprintln!("exwatch: {error}");
        ExitCode::FAILURE
    })
}

/// Opens the configured database for a read-only command: nothing is created or migrated. A missing SQLite file
/// names the file and the configuration it came from, so `exwatch logs` in the wrong directory says so instead of
/// printing "No calls found." from a database it just made.
async fn open_for_reading(config: &Config, args: &ConfigArgs) -> Result<Database, ExitCode> {
    Database::open_existing(&config.database).await.map_err(|error| {
        match (&error, &args.config) {
            (crate::store::database::Error::Missing { .. }, Some(file)) => {
                eprintln!("exwatch: {error} (configuration {}); is this the daemon's configuration?", file.display())
            }
            (crate::store::database::Error::Missing { .. }, None) => eprintln!(
                "exwatch: {error} (no --config: the default, relative to {}); pass the daemon's configuration \
                 with --config, or run this where the daemon runs",
                std::env::current_dir()
                    .map_or_else(|_| "the working directory".to_owned(), |dir| dir.display().to_string())
            ),
            _ => eprintln!("exwatch: {error}"),
        }
        ExitCode::FAILURE
    })
}

fn database_failure(error: crate::store::database::Error) -> ExitCode {
    eprintln!("exwatch: {error}");
    ExitCode::FAILURE
}

fn to_json<T: serde::Serialize>(value: &T) -> anyhow::Result<String> {
    Ok(serde_json::to_string_pretty(value)? + "\n")
}

pub(super) async fn migrate(args: ConfigArgs) -> anyhow::Result<ExitCode> {
    let config = load(&args)?;
    let database = match connect(&config).await {
        Ok(database) => database,
        Err(code) => return Ok(code),
    };
    println!("{} is migrated to schema version {}.", database.target(), database.schema_version());
    database.close().await;
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn logs(args: LogsArgs) -> anyhow::Result<ExitCode> {
    let config = load(&args.config)?;
    let database = match open_for_reading(&config, &args.config).await {
        Ok(database) => database,
        Err(code) => return Ok(code),
    };
    let calls = match database.recent_calls(&args.provider, args.since, args.limit, args.failures).await {
        Ok(calls) => calls,
        Err(error) => return Ok(database_failure(error)),
    };
    database.close().await;
    print!("{}", if args.json { to_json(&calls)? } else { report::render_calls(&calls) });
    Ok(ExitCode::SUCCESS)
}

pub(super) fn spool_inspect(args: SpoolInspectArgs) -> anyhow::Result<ExitCode> {
    let lines = match replay::inspect(&args.file) {
        Ok(lines) => lines,
        Err(error) => {
            eprintln!("exwatch: {error}");
            return Ok(ExitCode::FAILURE);
        }
    };
    print!("{}", if args.json { to_json(&lines)? } else { replay::render(&lines) });
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn spool_replay(args: SpoolReplayArgs) -> anyhow::Result<ExitCode> {
    let config = load(&args.config)?;
    let lines = match replay::inspect(&args.file) {
        Ok(lines) => lines,
        Err(error) => {
            eprintln!("exwatch: {error}");
            return Ok(ExitCode::FAILURE);
        }
    };
    let database = match connect(&config).await {
        Ok(database) => database,
        Err(code) => return Ok(code),
    };
    let replayed = replay::replay(&database, &config.server.instance, lines).await;
    database.close().await;
    let replayed = match replayed {
        Ok(replayed) => replayed,
        Err(error) => return Ok(database_failure(error)),
    };
    println!(
        "Replayed {}: {} call rows, {} alert writes; {} refused{}; {} unreadable lines skipped.",
        args.file.display(),
        replayed.calls,
        replayed.alert_writes,
        replayed.refused,
        replayed.first_refusal.as_deref().map(|reason| format!(" (first: {reason})")).unwrap_or_default(),
        replayed.unreadable
    );
    Ok(if replayed.refused == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

pub(super) async fn incidents(args: IncidentsArgs) -> anyhow::Result<ExitCode> {
    let config = load(&args.config)?;
    let database = match open_for_reading(&config, &args.config).await {
        Ok(database) => database,
        Err(code) => return Ok(code),
    };
    let incidents = match database.list_incidents(args.since).await {
        Ok(incidents) => incidents,
        Err(error) => return Ok(database_failure(error)),
    };
    database.close().await;
    let text = if args.json { to_json(&incidents)? } else { report::render_incidents(&incidents, chrono::Utc::now()) };
    print!("{text}");
    Ok(ExitCode::SUCCESS)
}

/// What `exwatch incidents report|timeline ID` shows of one incident.
pub(super) enum View {
    Report,
    Timeline,
}

pub(super) async fn incident(view: View, args: ReportArgs) -> anyhow::Result<ExitCode> {
    let config = load(&args.config)?;
    let database = match open_for_reading(&config, &args.config).await {
        Ok(database) => database,
        Err(code) => return Ok(code),
    };
    let shown = match view {
        View::Report => database.incident_report(args.id).await.map(|report| {
            report.map(|report| if args.json { to_json(&report) } else { Ok(report::render_incident_report(&report)) })
        }),
        View::Timeline => database.incident_timeline(args.id).await.map(|timeline| {
            timeline.map(|timeline| if args.json { to_json(&timeline) } else { Ok(report::render_timeline(&timeline)) })
        }),
    };
    let shown = match shown {
        Ok(shown) => shown,
        Err(error) => return Ok(database_failure(error)),
    };
    database.close().await;
    match shown {
        Some(text) => {
            print!("{}", text?);
            Ok(ExitCode::SUCCESS)
        }
        None => {
            eprintln!("exwatch: no incident with id {} in {}", args.id, database.target());
            Ok(ExitCode::FAILURE)
        }
    }
}
