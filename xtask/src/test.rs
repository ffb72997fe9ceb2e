//! `cargo xtask test [FILTER] [--no-lint]`: everything CI checks, in order,
//! stopping at the first step that fails.
//!
//! setup (if needed) -> fmt -> clippy -> clippy (eBPF) -> release build ->
//! unit tests (multihome-common, multihome, xtask) -> integration tests ->
//! the same with XDP forced native -> bench smoke -> deb -> demo check.
use std::{
    io::{self, BufRead as _, BufReader, IsTerminal as _},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};

use crate::{
    build::{self, Profile},
    setup, util,
};

pub struct Options {
    /// A test name filter, passed to the integration tests only.
    pub filter: Option<String>,
    /// Skip `cargo fmt --check` and both clippy runs.
    pub no_lint: bool,
}

enum Action {
    /// `setup::ensure()`.
    Setup,
    /// The release build of multihome; the integration tests run it.
    Build,
    /// A cargo command, run as it is.
    Cargo(Command),
    /// A `cargo test` whose "test result:" lines are added up.
    CargoTest(Command),
}

struct Step {
    name: &'static str,
    action: Action,
}

#[derive(Default)]
struct Counts {
    passed: u64,
    failed: u64,
    ignored: u64,
    /// Whether any "test result:" line was seen.
    seen: bool,
}

enum Outcome {
    Ok(Duration),
    Failed(Duration),
    Skipped,
}

pub fn run(opts: Options) -> Result<()> {
    let Options { filter, no_lint } = opts;
    let steps = plan(filter.as_deref(), no_lint);
    let total = steps.len();
    let started = Instant::now();
    let mut counts = Counts::default();
    let mut outcomes: Vec<(&'static str, Outcome)> = Vec::new();
    let mut failure = None;

    for (i, Step { name, action }) in steps.into_iter().enumerate() {
        if failure.is_some() {
            outcomes.push((name, Outcome::Skipped));
            continue;
        }
        let shown = match &action {
            Action::Setup => "cargo xtask setup (only what is missing)".to_owned(),
            Action::Build => "cargo build --release -p multihome".to_owned(),
            Action::Cargo(cmd) | Action::CargoTest(cmd) => util::display(cmd),
        };
        println!("\n==> [test {}/{total}] {name}: {shown}", i + 1);
        let t = Instant::now();
        let result = match action {
            Action::Setup => setup::ensure(),
            Action::Build => build::build(Profile::Release).map(|_| ()),
            Action::Cargo(mut cmd) => util::run(&mut cmd),
            Action::CargoTest(mut cmd) => run_counted(&mut cmd, &mut counts, &mut io::stdout()),
        };
        let elapsed = t.elapsed();
        match result {
            Ok(()) => {
                println!(
                    "==> [test {}/{total}] {name}: ok ({})",
                    i + 1,
                    util::fmt_duration(elapsed)
                );
                outcomes.push((name, Outcome::Ok(elapsed)));
            }
            Err(e) => {
                println!(
                    "==> [test {}/{total}] {name}: FAILED ({})",
                    i + 1,
                    util::fmt_duration(elapsed)
                );
                outcomes.push((name, Outcome::Failed(elapsed)));
                failure = Some((name, e));
            }
        }
    }

    print_summary(&outcomes, started.elapsed());
    if let Some((name, e)) = failure {
        if counts.seen {
            print_counts(&counts);
        }
        return Err(e.context(format!("`cargo xtask test` failed at step `{name}`")));
    }
    if counts.seen {
        // Last, alone on its line: "tests: N passed, N failed, N skipped".
        print_counts(&counts);
    }
    Ok(())
}

/// The steps, in order.
fn plan(filter: Option<&str>, no_lint: bool) -> Vec<Step> {
    // Colours survive our reading of the test harness's stdout only if we
    // ask for them.
    let color: &[&str] = if io::stdout().is_terminal() {
        &["--color", "always"]
    } else {
        &[]
    };
    let mut steps = vec![Step {
        name: "setup",
        action: Action::Setup,
    }];
    if !no_lint {
        let mut fmt = util::cargo();
        fmt.args(["fmt", "--all", "--", "--check"]);
        let mut clippy = util::cargo();
        clippy.args([
            "clippy",
            "-p",
            "multihome",
            "-p",
            "multihome-common",
            "-p",
            "xtask",
            "-p",
            "multihome-tests",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]);
        clippy.env_remove("AYA_BUILD_SKIP");
        let mut clippy_ebpf = util::cargo_nightly();
        clippy_ebpf.args([
            "clippy",
            "-p",
            "multihome-ebpf",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--",
            "-D",
            "warnings",
        ]);
        steps.extend([
            Step {
                name: "fmt",
                action: Action::Cargo(fmt),
            },
            Step {
                name: "clippy",
                action: Action::Cargo(clippy),
            },
            Step {
                name: "clippy-ebpf",
                action: Action::Cargo(clippy_ebpf),
            },
        ]);
    }

    let mut unit_common = util::cargo();
    unit_common.args(["test", "-p", "multihome-common", "--features", "user"]);
    if !color.is_empty() {
        unit_common.arg("--").args(color);
    }
    let mut unit_daemon = util::cargo();
    unit_daemon
        .args(["test", "-p", "multihome"])
        .env_remove("AYA_BUILD_SKIP");
    if !color.is_empty() {
        unit_daemon.arg("--").args(color);
    }
    let mut unit_xtask = util::cargo();
    unit_xtask.args(["test", "-p", "xtask"]);
    if !color.is_empty() {
        unit_xtask.arg("--").args(color);
    }
    let mut integration = util::cargo();
    integration
        .args(["test", "-p", "multihome-tests", "--", "--test-threads=2"])
        .args(color)
        .args(filter)
        .env("MULTIHOME_BIN", build::binary_path(Profile::Release));
    // The same suite with XDP forced native on every interface (and GRO
    // on every veth, which XDP redirects need): it must pass both ways.
    let mut integration_xdp = util::cargo();
    integration_xdp
        .args(["test", "-p", "multihome-tests", "--", "--test-threads=2"])
        .args(color)
        .args(filter)
        .env("MULTIHOME_BIN", build::binary_path(Profile::Release))
        .env("MULTIHOME_TEST_XDP", "native");

    steps.extend([
        Step {
            name: "build",
            action: Action::Build,
        },
        Step {
            name: "unit-common",
            action: Action::CargoTest(unit_common),
        },
        Step {
            name: "unit-multihome",
            action: Action::CargoTest(unit_daemon),
        },
        Step {
            name: "unit-xtask",
            action: Action::CargoTest(unit_xtask),
        },
        Step {
            name: "integration",
            action: Action::CargoTest(integration),
        },
        Step {
            name: "integration-xdp",
            action: Action::CargoTest(integration_xdp),
        },
    ]);
    if filter.is_none() {
        // One short round of every benchmark, so that the bench keeps
        // working; its figures are not checked.
        let mut bench = util::cargo();
        bench.args([
            "run",
            "--quiet",
            "-p",
            "xtask",
            "--",
            "bench",
            "--quick",
            "--rounds",
            "1",
            "--out",
            "target/bench-smoke",
        ]);
        steps.push(Step {
            name: "bench-smoke",
            action: Action::Cargo(bench),
        });
        // The Debian package builds and holds what it must.
        let mut deb = util::cargo();
        deb.args(["run", "--quiet", "-p", "xtask", "--", "deb"]);
        steps.push(Step {
            name: "deb",
            action: Action::Cargo(deb),
        });
        // The demo shows a failover as a newcomer would watch it: its own
        // outage of x appears in top's events and moves the new flows.
        let mut demo = util::cargo();
        demo.args([
            "run",
            "--quiet",
            "-p",
            "xtask",
            "--",
            "demo",
            "--seconds",
            "16",
            "--outage-after",
            "4",
            "--check",
        ]);
        steps.push(Step {
            name: "demo-outage",
            action: Action::Cargo(demo),
        });
    }
    steps
}

/// Runs a `cargo test`, echoing its stdout line by line to `out` and adding
/// up the harness's "test result:" lines into `counts`.
fn run_counted(cmd: &mut Command, counts: &mut Counts, out: &mut impl io::Write) -> Result<()> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("could not start `{}`", util::display(cmd)))?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow!("no stdout pipe"))?;
    let mut reader = BufReader::new(stdout);
    let mut line = Vec::new();
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line)? == 0 {
            break;
        }
        // Echoing may fail if our stdout went away; keep reading anyway so
        // the child doesn't block.
        let _ = out.write_all(&line).and_then(|()| out.flush());
        if let Some((passed, failed, ignored)) = parse_result(&String::from_utf8_lossy(&line)) {
            counts.passed += passed;
            counts.failed += failed;
            counts.ignored += ignored;
            counts.seen = true;
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!(
            "`{}` failed ({})",
            util::display(cmd),
            util::describe(status)
        );
    }
    Ok(())
}

/// `test result: ok. 5 passed; 0 failed; 1 ignored; 0 measured; ...` ->
/// (5, 0, 1).
fn parse_result(line: &str) -> Option<(u64, u64, u64)> {
    let line = strip_ansi(line);
    let rest = line.trim().strip_prefix("test result:")?;
    let (_, rest) = rest.split_once(". ")?;
    let (mut passed, mut failed, mut ignored) = (None, None, None);
    for part in rest.split(';') {
        let mut words = part.split_whitespace();
        let (Some(n), Some(what)) = (words.next(), words.next()) else {
            continue;
        };
        let Ok(n) = n.parse::<u64>() else { continue };
        match what {
            "passed" => passed = Some(n),
            "failed" => failed = Some(n),
            "ignored" => ignored = Some(n),
            _ => {}
        }
    }
    Some((passed?, failed?, ignored.unwrap_or(0)))
}

/// Removes ANSI CSI sequences (`ESC [ ... letter`).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            if chars.next() == Some('[') {
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn print_summary(outcomes: &[(&str, Outcome)], total: Duration) {
    println!("\n==> cargo xtask test summary");
    for (name, outcome) in outcomes {
        let (state, time) = match outcome {
            Outcome::Ok(d) => ("ok", util::fmt_duration(*d)),
            Outcome::Failed(d) => ("FAILED", util::fmt_duration(*d)),
            Outcome::Skipped => ("skipped", String::new()),
        };
        println!("    {state:<8} {name:<16} {time:>8}");
    }
    println!(
        "    {:<8} {:<16} {:>8}",
        "",
        "total",
        util::fmt_duration(total)
    );
}

fn print_counts(counts: &Counts) {
    println!(
        "tests: {} passed, {} failed, {} skipped",
        counts.passed, counts.failed, counts.ignored
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_result_lines() {
        assert_eq!(
            parse_result(
                "test result: ok. 5 passed; 0 failed; 1 ignored; 0 measured; 3 filtered out; finished in 0.01s\n"
            ),
            Some((5, 0, 1))
        );
        assert_eq!(
            parse_result(
                "test result: \x1b[31mFAILED\x1b[0m. 2 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1.20s"
            ),
            Some((2, 1, 0))
        );
        assert_eq!(parse_result("test foo ... ok"), None);
        assert_eq!(parse_result("running 3 tests"), None);
    }

    #[test]
    fn counts_results_of_a_command() -> Result<()> {
        let mut counts = Counts::default();
        let mut cmd = Command::new("sh");
        cmd.args([
            "-c",
            "echo 'test a ... ok'; \
             echo 'test result: ok. 3 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out'; \
             echo 'test result: ok. 2 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out'",
        ]);
        run_counted(&mut cmd, &mut counts, &mut io::sink())?;
        assert!(counts.seen);
        assert_eq!((counts.passed, counts.failed, counts.ignored), (5, 0, 1));

        let mut failing = Command::new("sh");
        failing.args(["-c", "exit 3"]);
        let err = run_counted(&mut failing, &mut counts, &mut io::sink())
            .err()
            .map(|e| e.to_string());
        assert!(err.is_some_and(|e| e.contains("exit status 3")));
        Ok(())
    }

    #[test]
    fn strips_ansi() {
        assert_eq!(strip_ansi("a\x1b[1;32mok\x1b[0m b"), "aok b");
    }
}
