//! Host prerequisites, command running with timeouts, the daemon binary and
//! bpffs pin directories.

use std::ffi::OsString;
use std::io::Read;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock, mpsc};
use std::time::Duration;

/// Default bound for one helper command (`ip`, `iptables`, ...).
pub const CMD_TIMEOUT: Duration = Duration::from_secs(30);

/// Tools the harness shells out to, with the Debian package providing each.
const TOOLS: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("ethtool", "ethtool"),
    ("iptables", "iptables"),
    ("nsenter", "util-linux"),
];

const EXTRA_PATH: &[&str] = &["/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"];

/// `PATH` for child processes: the caller's plus the sbin directories, so
/// `ip`/`iptables` are found even when cargo runs with a user-ish `PATH`.
pub fn child_path() -> OsString {
    static P: OnceLock<OsString> = OnceLock::new();
    P.get_or_init(|| {
        let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).collect())
            .unwrap_or_default();
        for d in EXTRA_PATH {
            let d = PathBuf::from(d);
            if !dirs.contains(&d) {
                dirs.push(d);
            }
        }
        std::env::join_paths(dirs)
            .unwrap_or_else(|_| OsString::from("/usr/sbin:/usr/bin:/sbin:/bin"))
    })
    .clone()
}

/// Finds an executable in [`child_path`].
pub fn find_tool(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&child_path())
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Panics loudly unless the process runs as root and the needed tools exist.
///
/// Called by every builder; the integration tests never skip silently.
pub fn require_root() {
    static CHECK: OnceLock<Result<(), String>> = OnceLock::new();
    let res = CHECK.get_or_init(|| {
        let mut problems = Vec::new();
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        if euid != 0 {
            problems.push(format!(
                "these tests need root (CAP_NET_ADMIN, CAP_SYS_ADMIN) to create network \
                 namespaces, but euid is {euid}; run them as root, e.g. \
                 `sudo -E cargo test -p multihome-tests`"
            ));
        }
        let missing: Vec<_> = TOOLS
            .iter()
            .filter(|(t, _)| find_tool(t).is_none())
            .collect();
        if !missing.is_empty() {
            let names: Vec<_> = missing.iter().map(|(t, _)| format!("`{t}`")).collect();
            let pkgs: Vec<_> = missing.iter().map(|(_, p)| *p).collect();
            problems.push(format!(
                "missing tool(s) {}: install the Debian package(s) with \
                 `apt-get install {}` or run `cargo xtask setup`",
                names.join(", "),
                pkgs.join(" ")
            ));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("\n"))
        }
    });
    if let Err(msg) = res {
        panic!("multihome test bed cannot run:\n{msg}");
    }
}

/// Runs `cmd` (stdin null, stdout/stderr captured) and kills it after
/// `timeout`. A timed-out command returns its (signal) status with a note
/// appended to stderr; nothing here panics.
pub fn run_with_timeout(mut cmd: Command, timeout: Duration) -> Output {
    cmd.env("PATH", child_path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let desc = format!("{cmd:?}");
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => panic!("cannot start {desc}: {e}"),
    };
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut stdout = child.stdout.take();
        let mut stderr = child.stderr.take();
        let err_reader = std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(s) = stderr.as_mut() {
                let _ = s.read_to_end(&mut buf);
            }
            buf
        });
        let mut out = Vec::new();
        if let Some(s) = stdout.as_mut() {
            let _ = s.read_to_end(&mut out);
        }
        let err = err_reader.join().unwrap_or_default();
        let status = child.wait();
        let _ = tx.send(status.map(|status| Output {
            status,
            stdout: out,
            stderr: err,
        }));
    });
    let (res, timed_out) = match rx.recv_timeout(timeout) {
        Ok(r) => (r, false),
        Err(_) => {
            // SAFETY: kill(2) of the command's process group; the leader is
            // not reaped before the waiter's wait() returns, so the pgid
            // still names it.
            unsafe { libc::kill(-(pid as libc::pid_t), libc::SIGKILL) };
            // A descendant that left the group may still hold the pipes:
            // give up on the output rather than hang.
            let res = rx.recv_timeout(Duration::from_secs(5)).unwrap_or_else(|_| {
                Ok(Output {
                    status: ExitStatus::from_raw(libc::SIGKILL),
                    stdout: Vec::new(),
                    stderr: Vec::new(),
                })
            });
            (res, true)
        }
    };
    let mut out = match res {
        Ok(o) => o,
        Err(e) => panic!("waiting for {desc} failed: {e}"),
    };
    if timed_out {
        out.stderr
            .extend_from_slice(format!("\n[testbed: killed after {timeout:?}]\n").as_bytes());
    }
    out
}

/// Panics with the command's output unless it succeeded.
pub fn check_output(desc: &str, out: &Output) {
    if !out.status.success() {
        panic!(
            "command failed ({}): {desc}\n--- stdout ---\n{}--- stderr ---\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Runs a command in the current (root) namespace and panics if it fails.
pub(crate) fn run_checked(args: &[&str]) -> Output {
    let (prog, rest) = args.split_first().expect("empty command");
    let mut cmd = Command::new(prog);
    cmd.args(rest);
    let out = run_with_timeout(cmd, CMD_TIMEOUT);
    check_output(&args.join(" "), &out);
    out
}

/// The daemon binary: `$MULTIHOME_BIN`, else `<workspace>/target/release/multihome`.
pub fn multihome_bin() -> PathBuf {
    let path = match std::env::var_os("MULTIHOME_BIN") {
        Some(p) => PathBuf::from(p),
        None => workspace_root().join("target/release/multihome"),
    };
    if !is_executable(&path) {
        panic!(
            "multihome daemon binary not found at {}: build it with `cargo xtask build` \
             or set MULTIHOME_BIN",
            path.display()
        );
    }
    path
}

/// The workspace root (the directory above this crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests crate has a parent directory")
        .to_path_buf()
}

/// A unique directory under `/sys/fs/bpf`, removed recursively on drop.
#[derive(Debug)]
pub struct PinDir {
    path: PathBuf,
}

impl PinDir {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            eprintln!(
                "testbed: cannot remove pin dir {}: {e}",
                self.path.display()
            );
        }
    }
}

const BPFFS: &str = "/sys/fs/bpf";

fn bpffs_mounted() -> bool {
    std::fs::read_to_string("/proc/self/mounts").is_ok_and(|m| {
        m.lines().any(|l| {
            let f: Vec<_> = l.split_whitespace().collect();
            f.len() > 2 && f[1] == BPFFS && f[2] == "bpf"
        })
    })
}

/// Mounts bpffs at `/sys/fs/bpf` if nothing is mounted there yet.
pub fn ensure_bpffs() {
    static LOCK: Mutex<()> = Mutex::new(());
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    if !bpffs_mounted() {
        run_checked(&["mount", "-t", "bpf", "bpf", BPFFS]);
        assert!(
            bpffs_mounted(),
            "mounted bpffs at {BPFFS} but it does not show in /proc/self/mounts"
        );
    }
}

/// Creates `/sys/fs/bpf/mh-<tag>-<pid>-<n>` (mounting bpffs first if needed).
pub fn unique_pin_dir(tag: &str) -> PinDir {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    require_root();
    ensure_bpffs();
    let tag: String = tag
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let path = Path::new(BPFFS).join(format!("mh-{tag}-{}-{n}", std::process::id()));
    if path.exists() {
        let _ = std::fs::remove_dir_all(&path);
    }
    if let Err(e) = std::fs::create_dir(&path) {
        panic!("cannot create pin dir {}: {e}", path.display());
    }
    PinDir { path }
}
