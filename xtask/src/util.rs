//! Helpers shared by the commands: where things are, how child processes
//! are started, and a few small checks.
use std::{
    env,
    ffi::OsString,
    fs,
    path::{Path, PathBuf},
    process::{Command, ExitStatus},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

/// The workspace root (the parent of `xtask/`).
pub fn workspace_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir.parent().unwrap_or(manifest_dir).to_path_buf()
}

/// `$CARGO_HOME/bin`, or `~/.cargo/bin`: where `cargo install` puts
/// bpf-linker.
pub fn cargo_bin_dir() -> PathBuf {
    let cargo_home = env::var_os("CARGO_HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| home_dir().join(".cargo"));
    cargo_home.join("bin")
}

fn home_dir() -> PathBuf {
    env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"))
}

/// `PATH` with the cargo bin directory in front unless it is already on it.
/// Every child gets the same value, so build scripts that watch `PATH`
/// (multihome's does) are not rerun needlessly.
pub fn search_path() -> OsString {
    let bin = cargo_bin_dir();
    let current = env::var_os("PATH").unwrap_or_default();
    if env::split_paths(&current).any(|p| p == bin) {
        return current;
    }
    let dirs = std::iter::once(bin).chain(env::split_paths(&current));
    env::join_paths(dirs).unwrap_or(current)
}

/// Finds `program` on [`search_path`].
pub fn find_program(program: &str) -> Option<PathBuf> {
    which::which_in(program, Some(search_path()), workspace_root()).ok()
}

/// A command run from the workspace root with [`search_path`] as `PATH`.
pub fn cmd(program: &str) -> Command {
    let mut cmd = Command::new(program);
    cmd.current_dir(workspace_root()).env("PATH", search_path());
    cmd
}

/// A `cargo` command for the stable (default) toolchain.
pub fn cargo() -> Command {
    cmd("cargo")
}

/// A `cargo` command for the nightly toolchain, through rustup so that it
/// works whatever toolchain started us.
pub fn cargo_nightly() -> Command {
    let mut cmd = cmd("rustup");
    cmd.args(["run", "nightly", "cargo"]);
    // Variables that cargo/rustup set for us would pin the stable toolchain.
    for var in ["RUSTC", "RUSTDOC", "RUSTUP_TOOLCHAIN", "CARGO"] {
        cmd.env_remove(var);
    }
    cmd
}

/// A shell-like rendering of a command, for progress messages.
pub fn display(cmd: &Command) -> String {
    let mut s = String::new();
    for (key, value) in cmd.get_envs() {
        if key == "PATH" {
            continue;
        }
        if let Some(value) = value {
            s.push_str(&format!(
                "{}={} ",
                key.to_string_lossy(),
                value.to_string_lossy()
            ));
        }
    }
    s.push_str(&cmd.get_program().to_string_lossy());
    for arg in cmd.get_args() {
        let arg = arg.to_string_lossy();
        if arg.is_empty() || arg.contains(|c: char| c.is_whitespace() || c == '\'') {
            s.push_str(&format!(" '{}'", arg.replace('\'', r"'\''")));
        } else {
            s.push(' ');
            s.push_str(&arg);
        }
    }
    s
}

/// Runs `cmd` with inherited stdio and fails unless it exits 0.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = status(cmd)?;
    if !status.success() {
        bail!("`{}` failed ({})", display(cmd), describe(status));
    }
    Ok(())
}

/// Runs `cmd` with inherited stdio and returns its exit status.
pub fn status(cmd: &mut Command) -> Result<ExitStatus> {
    cmd.status()
        .with_context(|| format!("could not start `{}`", display(cmd)))
}

/// Runs `cmd` quietly and returns its stdout if it exits 0.
pub fn output_ok(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// "exit status 3" or "killed by signal 9".
pub fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt as _;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        (None, None) => status.to_string(),
    }
}

/// Whether this process runs with effective uid 0.
pub fn is_root() -> bool {
    // /proc/self/status has "Uid:\treal\teffective\tsaved\tfs".
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().nth(1).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

/// Fails with a clear message unless we are root.
pub fn require_root(what: &str) -> Result<()> {
    if !is_root() {
        bail!(
            "{what} needs root: run it as root (e.g. `sudo -E env PATH=\"$PATH\" cargo xtask ...`)"
        );
    }
    Ok(())
}

/// "1.2s" / "3m04s".
pub fn fmt_duration(d: Duration) -> String {
    let secs = d.as_secs_f64();
    if secs < 60.0 {
        format!("{secs:.1}s")
    } else {
        let whole = d.as_secs();
        format!("{}m{:02}s", whole / 60, whole % 60)
    }
}

static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_stop_signal(_: libc::c_int) {
    STOP.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// From now on SIGINT and SIGTERM only set a flag ([`stopping`]), so that
/// a long task can stop between steps and drop its namespaces.
pub fn catch_stop_signals() {
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(
            libc::SIGINT,
            on_stop_signal as *const () as libc::sighandler_t,
        );
        libc::signal(
            libc::SIGTERM,
            on_stop_signal as *const () as libc::sighandler_t,
        );
    }
}

/// True once SIGINT or SIGTERM arrived after [`catch_stop_signals`].
pub fn stopping() -> bool {
    STOP.load(std::sync::atomic::Ordering::Relaxed)
}
