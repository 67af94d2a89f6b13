//! The configuration as the binary reads it: syntax errors, secret files, URLs with credentials, duration bounds,
//! the spool directory and the environment, through `check-config`, `run` and the CLI's HTTP clients.

use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

use crate::cli::Output;

const BINARY: &str = env!("CARGO_BIN_EXE_exwatch");

/// Runs the binary in `directory` with PATH and `variables` only.
async fn exwatch_with(arguments: &[&str], directory: &std::path::Path, variables: &[(&str, &str)]) -> Output {
    let mut command = Command::new(BINARY);
    command
        .args(arguments)
        .current_dir(directory)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(variables.iter().copied())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let output = tokio::time::timeout(Duration::from_secs(60), command.output()).await.expect("it finishes").unwrap();
    Output {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

fn write(directory: &std::path::Path, text: &str) -> String {
    let path = directory.join("exwatch.toml");
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

#[tokio::test]
async fn check_config_names_the_line_of_a_syntax_error_but_never_prints_the_secret_on_it() {
    let directory = tempfile::tempdir().unwrap();
    let config = write(directory.path(), "[[exchanges]]\napi_key = \"key\"\napi_secret = \"c3VwZXJzZWNyZXQ=\n");
    let output = exwatch_with(&["check-config", "--config", &config], directory.path(), &[]).await;
    assert_eq!(output.code, Some(2), "{}", output.stderr);
    assert!(!output.stderr.contains("c3VwZXJzZWNyZXQ") && !output.stdout.contains("c3VwZXJzZWNyZXQ"));
    assert!(output.stderr.contains("at line 3, column"), "{}", output.stderr);
    assert!(output.stderr.contains("(key `api_secret` in [[exchanges]])"), "{}", output.stderr);
}

#[tokio::test]
async fn check_config_shows_urls_without_their_credentials() {
    let directory = tempfile::tempdir().unwrap();
    let config = write(
        directory.path(),
        "[[exchanges]]\nbase_url = \"https://proxy-user:hunter2@proxy.example/kraken?token=hunter3\"\n\
         [database]\nurl = \"postgres://exwatch:hunter4@db:5432/exwatch\"\n",
    );
    let output = exwatch_with(&["check-config", "--config", &config], directory.path(), &[]).await;
    assert_eq!(output.code, Some(0), "{}", output.stderr);
    assert!(output.stdout.contains("https://[redacted]@proxy.example/kraken?token=[redacted]"), "{}", output.stdout);
    assert!(!output.stdout.contains("hunter") && !output.stderr.contains("hunter"), "{}", output.stdout);
}

#[tokio::test]
async fn the_clis_error_for_an_unreachable_daemon_never_shows_the_urls_credentials() {
    let directory = tempfile::tempdir().unwrap();
    let config = write(directory.path(), "[admin]\ntoken = \"0123456789abcdef0123\"\n");
    // Port 1 on loopback refuses the connection.
    let url = "http://operator:hunter2@127.0.0.1:1/?token=hunter3";
    for arguments in [
        vec!["status", "--config", &config, "--url", url],
        vec!["breaker", "status", "--config", &config, "--url", url],
    ] {
        let output = exwatch_with(&arguments, directory.path(), &[]).await;
        assert_ne!(output.code, Some(0), "{arguments:?}: {}", output.stderr);
        assert!(!output.stderr.contains("hunter"), "{arguments:?}: {}", output.stderr);
        assert!(output.stderr.contains("http://127.0.0.1:1/"), "{arguments:?}: {}", output.stderr);
    }
}

#[tokio::test]
async fn check_config_refuses_humantimes_largest_duration_naming_the_key_and_the_bound() {
    let directory = tempfile::tempdir().unwrap();
    let maximum = humantime::format_duration(Duration::MAX).to_string();
    let config = write(directory.path(), &format!("[breaker]\nwait_duration_in_open = \"{maximum}\"\n"));
    let output = exwatch_with(&["check-config", "--config", &config], directory.path(), &[]).await;
    assert_eq!(output.code, Some(2), "{}", output.stderr);
    assert!(output.stderr.contains("`breaker.wait_duration_in_open`:"), "{}", output.stderr);
    assert!(output.stderr.contains("is above the maximum of 1day"), "{}", output.stderr);
}

#[tokio::test]
async fn check_config_and_run_refuse_a_spool_dir_that_cannot_be_written() {
    let directory = tempfile::tempdir().unwrap();
    std::fs::write(directory.path().join("occupied"), "").unwrap();
    let spool = directory.path().join("occupied").join("spool");
    let config = write(
        directory.path(),
        &format!("[server]\nlisten = \"127.0.0.1:0\"\n[database]\nspool_dir = {:?}\n", spool.display().to_string()),
    );
    // A single-underscore variable is warned about by `run` before the check stops it, by name and not value.
    let variables = [("EXWATCH_POLL__INTERVAL", "7s"), ("EXWATCH__LOG__FORMAT", "json")];
    for command in ["check-config", "run"] {
        let output = exwatch_with(&[command, "--config", &config], directory.path(), &variables).await;
        assert_eq!(output.code, Some(2), "{command}: {}", output.stderr);
        let wanted = format!("`database.spool_dir`: {} cannot be used", spool.display());
        assert!(output.stderr.contains(&wanted), "{command}: {}", output.stderr);
        assert!(output.stderr.contains("EXWATCH_POLL__INTERVAL"), "{command}: {}", output.stderr);
        assert!(!output.stderr.contains("7s"), "{command}: {}", output.stderr);
    }
}
