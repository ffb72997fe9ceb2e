//! `cargo xtask setup`: installs what building and testing multihome needs.
//!
//! Idempotent: each step first checks and only installs what is missing.
//! The project assumes nothing that was installed by hand: a new machine
//! gets everything from here (except the nightly toolchain, which rustup
//! has to provide).
use std::{collections::BTreeMap, fs, path::Path, process::Command};

use anyhow::{Result, bail};

use crate::util;

/// Debian packages: LLVM 22 to build bpf-linker, and the tools the daemon,
/// the test bed and the benchmarks use.
pub const DEB_PACKAGES: &[&str] = &[
    // bpf-linker's build
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    // runtime, tests and benchmarks
    "bpftool",
    "iproute2",
    "iptables",
    "nftables",
    "ethtool",
    "iperf3",
    "tcpdump",
    "nginx-light",
    "wrk",
    "python3-scapy",
    "python3-prometheus-client",
    "wireguard-go",
    // IPv6 prefix delegation: the ISP's server and the gateway's client
    "kea-dhcp6-server",
    "dhcpcd-base",
    "wireguard-tools",
    "tmux",
    "util-linux",
    "kmod",
    "procps",
];

/// Components of the nightly toolchain: rust-src for `-Z build-std=core`
/// (the eBPF build), clippy for the eBPF lint.
pub const NIGHTLY_COMPONENTS: &[&str] = &["rust-src", "clippy"];

/// The bpf-linker release series we build with.
pub const BPF_LINKER_SERIES: &str = "0.13";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const BPFFS: &str = "/sys/fs/bpf";
const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

const STEPS: usize = 6;
/// cargo-deb, for `cargo xtask deb`.
const CARGO_DEB_SERIES: &str = "3";

/// Cheap checks only: whether [`run`] has anything to do.
pub fn setup_needed() -> bool {
    !missing_debs().is_empty()
        || !matches!(nightly_missing_components(), Ok(ref missing) if missing.is_empty())
        || !bpf_linker_ok()
        || !bpffs_mounted()
        || !cargo_deb_ok()
}

/// Runs [`run`] only if [`setup_needed`].
pub fn ensure() -> Result<()> {
    if setup_needed() {
        println!("[setup] something is missing; running `cargo xtask setup`");
        run()
    } else {
        Ok(())
    }
}

/// What could not be done, and how to do it by hand.
struct Failure {
    what: String,
    by_hand: String,
}

/// `cargo xtask setup`.
pub fn run() -> Result<()> {
    let mut failures = Vec::new();
    for (i, step) in [debs, nightly, bpf_linker, bpffs, kernel, cargo_deb]
        .into_iter()
        .enumerate()
    {
        if let Err(failure) = step(i + 1) {
            println!("[setup {}/{STEPS}] FAILED: {}", i + 1, failure.what);
            failures.push(failure);
        }
    }
    if failures.is_empty() {
        println!("[setup] done");
        return Ok(());
    }
    let mut msg = String::from("setup could not install everything:");
    for Failure { what, by_hand } in &failures {
        msg.push_str(&format!("\n  - {what}\n    by hand: {by_hand}"));
    }
    bail!(msg)
}

fn progress(step: usize, what: &str, state: &str) {
    println!("[setup {step}/{STEPS}] {what}: {state}");
}

// ---- a. Debian packages ----------------------------------------------------

/// The packages of [`DEB_PACKAGES`] that dpkg does not report as installed.
fn missing_debs() -> Vec<&'static str> {
    // One dpkg-query for all; it exits non-zero if some package is unknown,
    // but still prints the others.
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Package}\t${Status}\n"])
        .args(DEB_PACKAGES)
        .output();
    let installed: BTreeMap<String, bool> = match out {
        Ok(out) => String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_once('\t'))
            .map(|(pkg, status)| (pkg.to_owned(), status == "install ok installed"))
            .collect(),
        Err(_) => BTreeMap::new(),
    };
    DEB_PACKAGES
        .iter()
        .copied()
        .filter(|p| !installed.get(*p).copied().unwrap_or(false))
        .collect()
}

fn debs(step: usize) -> Result<(), Failure> {
    const WHAT: &str = "Debian packages";
    let missing = missing_debs();
    if missing.is_empty() {
        progress(step, WHAT, "already present");
        return Ok(());
    }
    let list = missing.join(" ");
    let by_hand = format!(
        "apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends {list}"
    );
    if !util::is_root() {
        return Err(Failure {
            what: format!("Debian packages missing ({list}) and not running as root"),
            by_hand: format!("run `cargo xtask setup` as root, or as root: {by_hand}"),
        });
    }
    progress(step, WHAT, &format!("installing {list}"));
    let apt = |args: &[&str]| {
        let mut cmd = Command::new("apt-get");
        cmd.env("DEBIAN_FRONTEND", "noninteractive").args(args);
        util::run(&mut cmd)
    };
    let result = apt(&["update"]).and_then(|()| {
        let mut args = vec!["install", "-y", "--no-install-recommends"];
        args.extend(&missing);
        apt(&args)
    });
    let still_missing = missing_debs();
    if still_missing.is_empty() {
        progress(step, WHAT, "installed");
        return Ok(());
    }
    let cause = result
        .err()
        .map(|e| format!(" ({e:#})"))
        .unwrap_or_default();
    Err(Failure {
        what: format!(
            "could not install Debian packages {}{cause}",
            still_missing.join(" ")
        ),
        by_hand,
    })
}

// ---- b. nightly toolchain components --------------------------------------

/// The [`NIGHTLY_COMPONENTS`] that the nightly toolchain lacks; an error if
/// there is no nightly toolchain (or rustup) at all.
fn nightly_missing_components() -> Result<Vec<&'static str>, String> {
    let out = Command::new("rustup")
        .args(["component", "list", "--toolchain", "nightly", "--installed"])
        .env("RUSTUP_AUTO_INSTALL", "0")
        .output()
        .map_err(|e| format!("could not run rustup: {e}"))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let first = stderr.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
        return Err(format!("no nightly Rust toolchain ({})", first.trim()));
    }
    let installed = String::from_utf8_lossy(&out.stdout).into_owned();
    // Names are "rust-src" or "clippy-x86_64-unknown-linux-gnu".
    let has = |c: &str| {
        installed
            .lines()
            .map(str::trim)
            .any(|l| l == c || l.strip_prefix(c).is_some_and(|rest| rest.starts_with('-')))
    };
    Ok(NIGHTLY_COMPONENTS
        .iter()
        .copied()
        .filter(|c| !has(c))
        .collect())
}

fn nightly(step: usize) -> Result<(), Failure> {
    const WHAT: &str = "nightly toolchain components (rust-src, clippy)";
    let missing = match nightly_missing_components() {
        Ok(missing) => missing,
        Err(why) => {
            return Err(Failure {
                what: format!("{why}; the eBPF programs need nightly with rust-src"),
                by_hand:
                    "rustup toolchain install nightly --profile minimal --component rust-src,clippy"
                        .into(),
            });
        }
    };
    if missing.is_empty() {
        progress(step, WHAT, "already present");
        return Ok(());
    }
    let list = missing.join(" ");
    progress(step, WHAT, &format!("installing {list}"));
    let mut cmd = Command::new("rustup");
    cmd.args(["component", "add", "--toolchain", "nightly"])
        .args(&missing);
    let result = util::run(&mut cmd);
    match nightly_missing_components() {
        Ok(still) if still.is_empty() => {
            progress(step, WHAT, "installed");
            Ok(())
        }
        _ => Err(Failure {
            what: format!(
                "could not add nightly components {list}{}",
                result
                    .err()
                    .map(|e| format!(" ({e:#})"))
                    .unwrap_or_default()
            ),
            by_hand: format!("rustup component add --toolchain nightly {list}"),
        }),
    }
}

// ---- c. bpf-linker ---------------------------------------------------------

/// The version bpf-linker reports, if one is found on `PATH` or in the
/// cargo bin directory.
fn bpf_linker_version() -> Option<String> {
    let path = util::find_program("bpf-linker")?;
    // "bpf-linker 0.13.0"
    let out = util::output_ok(Command::new(path).arg("--version"))?;
    out.split_whitespace().nth(1).map(str::to_owned)
}

fn bpf_linker_ok() -> bool {
    bpf_linker_version().is_some_and(|v| v.starts_with(&format!("{BPF_LINKER_SERIES}.")))
}

fn bpf_linker(step: usize) -> Result<(), Failure> {
    let what = format!("bpf-linker {BPF_LINKER_SERIES}.x");
    let found = bpf_linker_version();
    if bpf_linker_ok() {
        let v = found.unwrap_or_default();
        progress(step, &what, &format!("already present ({v})"));
        return Ok(());
    }
    let state = match &found {
        Some(v) => format!("found {v}, installing {BPF_LINKER_SERIES}.x (this takes a while)"),
        None => "installing (this takes a while)".into(),
    };
    progress(step, &what, &state);
    let install = |locked: bool| {
        let mut cmd = util::cargo();
        cmd.args(["install", "bpf-linker", "--version"])
            .arg(format!("^{BPF_LINKER_SERIES}"));
        if locked {
            cmd.arg("--locked");
        }
        cmd.args(["--no-default-features", "--features", "llvm-22"])
            .env("LLVM_PREFIX", LLVM_PREFIX);
        // Found anyway on a reinstall of another version.
        if found.is_some() {
            cmd.arg("--force");
        }
        println!("+ {}", util::display(&cmd));
        util::run(&mut cmd)
    };
    let result = install(true).or_else(|e| {
        println!(
            "[setup {step}/{STEPS}] {what}: `--locked` install failed ({e:#}); retrying without it"
        );
        install(false)
    });
    if bpf_linker_ok() {
        let v = bpf_linker_version().unwrap_or_default();
        progress(step, &what, &format!("installed ({v})"));
        return Ok(());
    }
    Err(Failure {
        what: format!(
            "could not install {what}{}",
            result
                .err()
                .map(|e| format!(" ({e:#})"))
                .unwrap_or_default()
        ),
        by_hand: format!(
            "install llvm-22-dev libpolly-22-dev libzstd-dev zlib1g-dev, then \
             LLVM_PREFIX={LLVM_PREFIX} cargo install bpf-linker --version ^{BPF_LINKER_SERIES} \
             --locked --no-default-features --features llvm-22 (and make sure {} is on PATH)",
            util::cargo_bin_dir().display()
        ),
    })
}

// ---- d. bpffs --------------------------------------------------------------

fn bpffs_mounted() -> bool {
    fs::read_to_string("/proc/mounts").is_ok_and(|mounts| {
        mounts.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 2 && f[1] == BPFFS && f[2] == "bpf"
        })
    })
}

fn bpffs(step: usize) -> Result<(), Failure> {
    let what = format!("bpffs at {BPFFS}");
    if bpffs_mounted() {
        progress(step, &what, "already present");
        return Ok(());
    }
    let by_hand = format!("mount -t bpf bpf {BPFFS}");
    if !util::is_root() {
        return Err(Failure {
            what: format!("{BPFFS} is not a bpf mount and not running as root"),
            by_hand: format!("as root: {by_hand}"),
        });
    }
    progress(step, &what, "mounting");
    let _ = fs::create_dir_all(BPFFS);
    let result = util::run(Command::new("mount").args(["-t", "bpf", "bpf", BPFFS]));
    if bpffs_mounted() {
        progress(step, &what, "mounted");
        return Ok(());
    }
    Err(Failure {
        what: format!(
            "could not mount bpffs at {BPFFS}{}",
            result
                .err()
                .map(|e| format!(" ({e:#})"))
                .unwrap_or_default()
        ),
        by_hand,
    })
}

// ---- e. kernel -------------------------------------------------------------

fn kernel(step: usize) -> Result<(), Failure> {
    let release = util::output_ok(Command::new("uname").arg("-r"))
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|| "unknown".into());
    let what = format!("kernel {release}");
    if Path::new(VMLINUX_BTF).exists() {
        progress(step, &what, &format!("BTF present ({VMLINUX_BTF})"));
    } else {
        progress(step, &what, &format!("BTF MISSING ({VMLINUX_BTF})"));
        eprintln!(
            "\n!!! WARNING: {VMLINUX_BTF} does not exist: this kernel was built without \
             CONFIG_DEBUG_INFO_BTF.\n!!! Loading multihome's eBPF programs may fail \
             (no CO-RE relocations); use a kernel with BTF.\n"
        );
    }
    Ok(())
}

// ---- f. cargo-deb ------------------------------------------------------------

fn cargo_deb_ok() -> bool {
    let mut cmd = util::cargo();
    cmd.args(["deb", "--version"]);
    // "cargo-deb 3.8.0"
    util::output_ok(&mut cmd)
        .and_then(|out| out.split_whitespace().nth(1).map(str::to_owned))
        .is_some_and(|v| v.starts_with(&format!("{CARGO_DEB_SERIES}.")))
}

fn cargo_deb(step: usize) -> Result<(), Failure> {
    let what = format!("cargo-deb {CARGO_DEB_SERIES}.x (for `cargo xtask deb`)");
    if cargo_deb_ok() {
        progress(step, &what, "already present");
        return Ok(());
    }
    progress(step, &what, "installing");
    let mut cmd = util::cargo();
    cmd.args(["install", "cargo-deb", "--locked", "--version"])
        .arg(format!("^{CARGO_DEB_SERIES}"));
    println!("+ {}", util::display(&cmd));
    match util::run(&mut cmd) {
        Ok(()) if cargo_deb_ok() => {
            progress(step, &what, "installed");
            Ok(())
        }
        result => Err(Failure {
            what: format!(
                "{what}: {}",
                result
                    .err()
                    .map_or("not found after install".into(), |e| format!("{e:#}"))
            ),
            by_hand: format!("cargo install cargo-deb --locked --version ^{CARGO_DEB_SERIES}"),
        }),
    }
}
