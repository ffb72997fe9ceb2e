//! `cargo xtask`: multihome's developer tasks.
//!
//! `cargo xtask setup` installs what the build and the tests need;
//! `build`, `run`, `test` and `demo` run it themselves when something is
//! missing. Everything here expects to run as root, as the daemon and the
//! test bed do.
mod bench;
mod build;
mod deb;
mod demo;
mod run;
mod setup;
mod test;
mod util;

use std::{ffi::OsString, process::ExitCode};

use clap::{Parser, Subcommand};

use crate::build::Profile;

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "multihome's developer tasks",
    disable_version_flag = true
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what building and testing need: Debian packages, nightly
    /// rust-src, bpf-linker, the bpffs mount (idempotent; root to install)
    Setup,
    /// Build target/release/multihome with its eBPF programs embedded
    Build {
        /// Build target/debug/multihome instead
        #[arg(long)]
        debug: bool,
    },
    /// Build, then run the daemon as root: `cargo xtask run -- ARGS`
    /// (without ARGS: the demo); its exit code is passed through
    Run {
        /// Use the debug build
        #[arg(long)]
        debug: bool,
        /// Arguments for multihome
        #[arg(last = true, value_name = "ARGS")]
        args: Vec<OsString>,
    },
    /// Lint, build, run the unit and integration tests (the latter also
    /// with XDP forced native), then one short round of the benchmarks
    /// (what CI runs); stops at the first failing step
    Test {
        /// Only run the integration tests whose name contains FILTER
        filter: Option<String>,
        /// Skip `cargo fmt --check` and the clippy runs
        #[arg(long)]
        no_lint: bool,
    },
    /// Benchmark multihome (as configured by default, and with XDP forced)
    /// against plain routing, the seed's iptables recipe and nftables, side
    /// by side (about 13 minutes after the build; writes
    /// docs/BENCHMARKS.md and its plot)
    Bench {
        /// A short run (under 3 minutes) that writes to target/bench/
        #[arg(long)]
        quick: bool,
        /// Rounds of every mode (default 6, or 2 with --quick)
        #[arg(long)]
        rounds: Option<usize>,
        /// Directory for BENCHMARKS.md, benchmarks.svg and benchmarks.json
        #[arg(long, value_name = "DIR")]
        out: Option<std::path::PathBuf>,
        /// Measure nothing: rewrite BENCHMARKS.md and the plot from the
        /// benchmarks.json already in the output directory
        #[arg(long)]
        render: bool,
    },
    /// Load generators the bench runs inside its namespaces
    #[command(hide = true)]
    BenchTool {
        #[command(subcommand)]
        tool: bench::traffic::Tool,
    },
    /// Build the Debian package (cargo-deb) into target/debian and check
    /// what it holds
    Deb,
    /// Build, then run the gateway in a demo topology of network
    /// namespaces, with traffic (same as `cargo xtask run`)
    Demo {
        /// Stop after this many seconds instead of waiting for Ctrl-C
        #[arg(long)]
        seconds: Option<u64>,
        /// Take uplink x down by itself after this many seconds, for a few
        /// seconds, to show a failover without a second terminal
        #[arg(long)]
        outage_after: Option<u64>,
        /// Fail unless that outage showed in `top` and moved new flows
        /// (what `cargo xtask test` runs)
        #[arg(long, requires = "outage_after")]
        check: bool,
    },
}

fn demo(opts: demo::Options) -> anyhow::Result<()> {
    util::require_root("`cargo xtask demo`")?;
    setup::ensure()?;
    let bin = build::build(Profile::Release)?;
    demo::run(&bin, opts)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Setup => setup::run(),
        Cmd::Build { debug } => build::run(Profile::from_debug_flag(debug)),
        Cmd::Run { debug, args } => run::run(Profile::from_debug_flag(debug), args),
        Cmd::Test { filter, no_lint } => {
            if !util::is_root() {
                eprintln!("warning: not running as root: the integration tests need root");
            }
            test::run(test::Options { filter, no_lint })
        }
        Cmd::Bench {
            quick,
            rounds,
            out,
            render,
        } => bench::run(bench::Options {
            quick,
            rounds,
            out,
            render,
        }),
        Cmd::BenchTool { tool } => bench::traffic::run(tool),
        Cmd::Deb => deb::run().map(|_| ()),
        Cmd::Demo {
            seconds,
            outage_after,
            check,
        } => demo(demo::Options {
            seconds,
            outage_after,
            check,
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
