//! The command line: clap types here, a module per command.
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::loader::DEFAULT_PIN_DIR;

pub mod conns;
pub mod explain;
pub mod status;
pub mod systemd;
pub mod top;

/// A gateway for a LAN with several uplinks: each new connection is pinned
/// to one uplink by weight and SNATed to its address, in TC eBPF.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None, after_help = EXIT_CODES)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

pub const EXIT_CODES: &str =
    "Exit codes: 0 success; 1 error (the message says what to change); 2 usage error.";

#[derive(Args, Debug, Clone)]
pub struct PinDir {
    /// bpffs directory holding the pinned maps and links.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_PIN_DIR, global = true)]
    pub pin_dir: PathBuf,
}

#[derive(Subcommand, Debug)]
pub enum UplinkAction {
    /// Set an uplink's share of new flows (0 to 255; 0 = backup only) until
    /// the next reload or restart. Pinned flows stay where they are.
    SetWeight { name: String, weight: u32 },
    /// Take no new flows on this uplink; its pinned flows stay, unless
    /// --reset.
    Drain {
        name: String,
        /// Also end its flows now, as `on_down = "reset"` would, whatever
        /// their policy says: each TCP session is reset (idle ones within
        /// a second), every other flow moves to another uplink at its next
        /// packet.
        #[arg(long)]
        reset: bool,
    },
    /// Let a drained uplink take new flows again.
    Undrain { name: String },
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the gateway in the foreground.
    ///
    /// Loads and attaches the programs, pins maps and links under --pin-dir,
    /// installs the fallback rule tables, follows links, addresses and
    /// delegated IPv6 prefixes (an uplink without `prefix6`). On
    /// SIGINT/SIGTERM it detaches and removes all it installed, unless
    /// --keep-on-exit. SIGHUP (or `multihome reload`) reloads weights,
    /// gateways, addresses, LAN and IPv6 prefixes, timeouts, policies and
    /// rules.
    ///
    /// Example: multihome run --config /etc/multihome.toml --metrics 127.0.0.1:9801
    Run {
        /// TOML config file (see docs/CONFIG.md).
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        #[command(flatten)]
        pin: PinDir,
        /// Keep forwarding after exit: leave programs, maps, links and routes
        /// in place; the next run adopts them with every flow.
        #[arg(long)]
        keep_on_exit: bool,
        /// Serve Prometheus metrics at http://ADDR:PORT/metrics (off by default).
        #[arg(long, value_name = "ADDR:PORT")]
        metrics: Option<std::net::SocketAddr>,
    },
    /// List live flows.
    ///
    /// Example: multihome conns --uplink x --proto tcp --json
    Conns(conns::ConnsArgs),
    /// Show uplinks, counters and drop reasons.
    ///
    /// Example: multihome status --json
    Status {
        #[command(flatten)]
        pin: PinDir,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// A live view, redrawn every second: uplink state, rates, flows, the
    /// share of new flows each uplink took against its weight, and recent
    /// changes. Ctrl-C quits.
    ///
    /// Example: multihome top
    Top {
        #[command(flatten)]
        pin: PinDir,
        /// Stop after this many screens.
        #[arg(long, value_name = "N")]
        iterations: Option<u32>,
    },
    /// Re-read the running daemon's config (as SIGHUP does): weights,
    /// gateways, addresses, LAN and IPv6 prefixes, timeouts, policies and
    /// rules change, pinned flows stay (but the IPv6 flows of an uplink
    /// whose `prefix6` changed). A config with a problem is refused and
    /// the running one stays; the answer says why.
    ///
    /// Example: multihome reload
    Reload {
        #[command(flatten)]
        pin: PinDir,
    },
    /// Why a new flow would go where it goes: the matching rule and its
    /// line, the policy and tier in use, the uplinks it could take now
    /// with their weights, and for sticky modes the affinity that decides.
    /// IPv6 too: --src is then the LAN host's internal address.
    ///
    /// Example: multihome explain --src 198.18.1.2 --dst 198.19.0.9 --proto tcp --dport 443
    Explain(explain::ExplainArgs),
    /// Change an uplink live, through the running daemon.
    ///
    /// Examples: multihome uplink set-weight y 3; multihome uplink drain x
    Uplink {
        #[command(subcommand)]
        action: UplinkAction,
        #[command(flatten)]
        pin: PinDir,
    },
    /// Validate a config file and explain every problem; print where
    /// NPTv6 maps each internal IPv6 prefix (of those the file names).
    ///
    /// Example: multihome check --config /etc/multihome.toml
    Check {
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
    },
    /// Remove pins, links and routing left behind by a run with --keep-on-exit.
    ///
    /// Example: multihome cleanup --pin-dir /sys/fs/bpf/multihome
    Cleanup {
        #[command(flatten)]
        pin: PinDir,
        /// As the unit's ExecStopPost: do nothing while systemd restarts
        /// UNIT (a restart job, as `systemctl restart` and package
        /// upgrades make) or after it failed (Restart= brings it back,
        /// and the new run adopts the flows); clean up after a stop.
        #[arg(long, value_name = "UNIT")]
        unless_restarting: Option<String>,
    },
    /// Write the embedded eBPF object to FILE (for tests and bpftool).
    #[command(hide = true)]
    EbpfObject {
        #[arg(value_name = "FILE")]
        out: PathBuf,
    },
}
