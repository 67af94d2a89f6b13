//! The README as a newcomer reads it: its five-minute drill (the shell block after `<!-- drill -->`) runs as
//! written and gets the page, the resolve and an incident report; `exwatch simulate --help` and the README give
//! what a drill needs (every scenario, how Balance is checked, the simulator's test credentials).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use exwatch::simulator::{self, Scenario};
use tokio::process::Command;

use crate::cli::exwatch;

const BINARY: &str = env!("CARGO_BIN_EXE_exwatch");
const REPOSITORY: &str = env!("CARGO_MANIFEST_DIR");

/// The line that marks the drill's block in README.md.
const DRILL_MARKER: &str = "<!-- drill -->";

/// The drill takes about 15 s; this bounds a drill that hangs, with room for a loaded machine.
const DRILL_LIMIT: Duration = Duration::from_secs(120);

fn readme() -> String {
    std::fs::read_to_string(Path::new(REPOSITORY).join("README.md")).expect("README.md is readable")
}

/// The body of the fenced ```sh block that starts on the line right after [`DRILL_MARKER`].
fn drill_block(readme: &str) -> Result<String, String> {
    let mut lines = readme.lines().skip_while(|line| line.trim() != DRILL_MARKER);
    if lines.next().is_none() {
        return Err(format!("README.md has no {DRILL_MARKER} line"));
    }
    match lines.next() {
        Some("```sh") => {}
        other => return Err(format!("the line after {DRILL_MARKER} must open a ```sh block, found {other:?}")),
    }
    let mut block = String::new();
    for line in lines {
        if line == "```" {
            return Ok(block);
        }
        block.push_str(line);
        block.push('\n');
    }
    Err(format!("the ```sh block after {DRILL_MARKER} is never closed"))
}

/// The one directory the drill made with `mktemp -d` under `scratch` (its TMPDIR), where its files are.
fn drill_directory(scratch: &Path) -> Option<PathBuf> {
    let mut directories = std::fs::read_dir(scratch)
        .ok()?
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| path.is_dir());
    let directory = directories.next()?;
    directories.next().is_none().then_some(directory)
}

/// Runs the README's drill literally with `bash -euo pipefail`, from the repository's root, with this build's
/// `exwatch` first on PATH and a fresh TMPDIR. The drill listens on fixed ports (9750, 9760, 9761), so it runs in
/// its own network namespace (only loopback, so parallel tests cannot collide and nothing reaches the network)
/// and its own PID namespace (whatever it leaves behind dies with it, even on a timeout).
#[tokio::test]
async fn the_readme_drill_runs_as_written_and_gets_the_page_the_resolve_and_the_report() {
    let drill = drill_block(&readme()).unwrap_or_else(|problem| panic!("{problem}"));
    let scratch = tempfile::tempdir().unwrap();
    let script = scratch.path().join("drill.sh");
    std::fs::write(&script, &drill).unwrap();
    let binary_directory = Path::new(BINARY).parent().expect("the binary is in a directory");
    let path = std::env::join_paths(
        std::iter::once(binary_directory.to_path_buf())
            .chain(std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())),
    )
    .unwrap();
    let temporary = scratch.path().join("tmp");
    std::fs::create_dir(&temporary).unwrap();

    let mut command = Command::new("unshare");
    command
        .args(["--net", "--pid", "--fork", "--kill-child", "--", "bash", "-c"])
        .arg(r#"ip link set lo up && exec bash -euo pipefail "$0""#)
        .arg(&script)
        .current_dir(REPOSITORY)
        .env_clear()
        .env("PATH", path)
        .env("TMPDIR", &temporary)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    if let Some(home) = std::env::var_os("HOME") {
        command.env("HOME", home);
    }
    let output = tokio::time::timeout(DRILL_LIMIT, command.output())
        .await
        .unwrap_or_else(|_| panic!("the drill did not finish within {DRILL_LIMIT:?}"))
        .expect("unshare runs");

    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let directory = drill_directory(&temporary);
    let read = |name: &str| {
        directory.as_ref().and_then(|directory| std::fs::read_to_string(directory.join(name)).ok()).unwrap_or_default()
    };
    let (receiver, daemon, simulator_log) = (read("receiver.log"), read("exwatch.log"), read("simulator.log"));
    let report = format!(
        "exit: {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}\nreceiver.log:\n{receiver}\nexwatch.log:\n{daemon}\n\
         simulator.log:\n{simulator_log}",
        output.status.code()
    );
    assert!(output.status.success(), "the drill failed\n{report}");

    // The page and the resolve reached the webhook receiver, in that order.
    let firing = receiver.find("PAGE pager: FIRING exchange_api_down exchange=kraken");
    let resolved = receiver.find("PAGE pager: RESOLVED exchange_api_down exchange=kraken");
    assert!(firing.is_some() && resolved > firing, "no page then resolve in receiver.log\n{report}");
    // `exwatch status` showed the page while it was out.
    assert!(stdout.contains("FIRING exchange_api_down (critical)"), "{report}");
    // The incident report is there and says something: its header, then the calls it counted.
    let header = stdout.lines().position(|line| line.starts_with("Incident ") && line.contains("exchange_api_down"));
    let header = header.unwrap_or_else(|| panic!("no incident report in the drill's output\n{report}"));
    let counted =
        stdout.lines().skip(header).any(|line| line.trim_start().starts_with("calls") && line.contains("failed"));
    assert!(counted, "the incident report counts no calls\n{report}");
    // The incident told as a story: the page fired, reached the pager, and resolved, after the report.
    let story = stdout.lines().skip(header + 1).skip_while(|line| !line.starts_with("Incident ")).collect::<Vec<_>>();
    let told = |text: &str| story.iter().any(|line| line.contains(text));
    for text in
        ["first failure of the streak", "exchange_api_down fired", "delivered to pager", "exchange_api_down resolved"]
    {
        assert!(told(text), "the timeline does not tell {text:?}\n{report}");
    }

    // The drill's trap stopped what it started, the daemon in order.
    assert!(daemon.contains("Shutdown complete"), "the daemon was not shut down in order\n{report}");
}

#[test]
fn the_drill_block_is_found_after_its_marker_and_a_missing_or_open_block_is_named() {
    let readme = "text\n<!-- drill -->\n```sh\necho one\necho two\n```\nmore\n```sh\nnot this\n```\n";
    assert_eq!(drill_block(readme).unwrap(), "echo one\necho two\n");
    assert!(drill_block("```sh\necho\n```\n").unwrap_err().contains("no <!-- drill --> line"));
    assert!(drill_block("<!-- drill -->\n\n```sh\n```\n").unwrap_err().contains("must open a ```sh block"));
    assert!(drill_block("<!-- drill -->\n```sh\necho\n").unwrap_err().contains("never closed"));
}

#[tokio::test]
async fn simulate_help_lists_every_scenario_and_how_balance_is_checked_with_the_test_credentials() {
    let directory = tempfile::tempdir().unwrap();
    let output = exwatch(&["simulate", "--help"], directory.path()).await;
    assert_eq!(output.code, Some(0), "{}", output.stderr);
    for scenario in Scenario::ALL {
        let line = format!("- {}:", scenario.as_str());
        let listed = output.stdout.lines().any(|text| text.trim_start().starts_with(&line));
        assert!(listed && output.stdout.contains(scenario.summary()), "{scenario} missing from\n{}", output.stdout);
    }
    for needed in [
        simulator::DEFAULT_API_KEY,
        simulator::DEFAULT_API_SECRET,
        simulator::CONTROL_PATH,
        "API-Key",
        "API-Sign",
        "EAPI:Invalid key",
        "EAPI:Invalid signature",
        "EAPI:Invalid nonce",
        "EGeneral:Temporary lockout",
    ] {
        assert!(output.stdout.contains(needed), "{needed} missing from\n{}", output.stdout);
    }
}

#[test]
fn the_readme_gives_the_simulators_test_credentials_and_names_every_scenario() {
    let readme = readme();
    assert!(readme.contains(&format!("api_key = \"{}\"", simulator::DEFAULT_API_KEY)));
    assert!(readme.contains(&format!("api_secret = \"{}\"", simulator::DEFAULT_API_SECRET)));
    for scenario in Scenario::ALL {
        assert!(readme.contains(&format!("`{scenario}`")), "README.md does not name the scenario {scenario}");
    }
}
