//! The [`NetNs`] guard: a named network namespace removed on drop.

use std::fs::File;
use std::marker::PhantomData;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Once, Weak};
use std::time::{Duration, Instant};

use crate::host::{
    CMD_TIMEOUT, check_output, child_path, require_root, run_checked, run_with_timeout,
};

static COUNTER: AtomicU32 = AtomicU32::new(0);
/// Serialises `ip netns add/del` within this process (iproute2 sets up the
/// shared `/run/netns` mount lazily and concurrent first uses can race).
static NETNS_LOCK: Mutex<()> = Mutex::new(());

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

type SharedChild = Arc<Mutex<Option<Child>>>;
type WeakChild = Weak<Mutex<Option<Child>>>;

/// A network namespace `mh<tag><pid>x<n>` with `lo` up. On drop it kills the
/// processes spawned with [`NetNs::spawn`] and runs `ip netns del`.
#[derive(Debug)]
pub struct NetNs {
    name: String,
    /// Spawned processes (weakly held) and their log files.
    procs: Mutex<Vec<(WeakChild, PathBuf)>>,
    spawned: AtomicU32,
}

impl NetNs {
    /// Creates a namespace; `prefix` contributes up to 3 ASCII letters to the
    /// name (e.g. "gw" -> `mhgw1234x0`).
    pub fn new(prefix: &str) -> NetNs {
        require_root();
        remove_stale_namespaces();
        let tag: String = prefix
            .chars()
            .filter(char::is_ascii_alphabetic)
            .take(3)
            .collect::<String>()
            .to_ascii_lowercase();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("mh{tag}{}x{n}", std::process::id());
        {
            let _g = lock(&NETNS_LOCK);
            if Path::new("/run/netns").join(&name).exists() {
                // Left over by a dead process that had our pid.
                let _ = run_with_timeout(ip_cmd(&["netns", "del", &name]), CMD_TIMEOUT);
            }
            run_checked(&["ip", "netns", "add", &name]);
        }
        let ns = NetNs {
            name,
            procs: Mutex::new(Vec::new()),
            spawned: AtomicU32::new(0),
        };
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/<name>`.
    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    fn command(&self, cmd: &[&str]) -> Command {
        assert!(!cmd.is_empty(), "empty command for netns {}", self.name);
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.path().display()))
            .arg("--")
            .args(cmd)
            .env("PATH", child_path());
        c
    }

    /// Runs `cmd` inside the namespace (via `nsenter --net=`) and panics with
    /// its output if it fails or runs longer than 30 s.
    pub fn exec(&self, cmd: &[&str]) -> Output {
        let out = self.try_exec(cmd);
        check_output(&format!("[netns {}] {}", self.name, cmd.join(" ")), &out);
        out
    }

    /// Like [`exec`](Self::exec) but returns the stdout as a `String`.
    pub fn exec_stdout(&self, cmd: &[&str]) -> String {
        String::from_utf8_lossy(&self.exec(cmd).stdout).into_owned()
    }

    /// Runs `cmd` inside the namespace and returns its output, whatever the
    /// exit status (killed after 30 s).
    pub fn try_exec(&self, cmd: &[&str]) -> Output {
        self.try_exec_timeout(cmd, CMD_TIMEOUT)
    }

    /// [`try_exec`](Self::try_exec) with an explicit time bound.
    pub fn try_exec_timeout(&self, cmd: &[&str], timeout: Duration) -> Output {
        run_with_timeout(self.command(cmd), timeout)
    }

    /// Starts `cmd` in the background inside the namespace, stdout and stderr
    /// going to a log file. Killed (with its process group) when the [`Proc`]
    /// or this namespace is dropped.
    pub fn spawn(&self, cmd: &[&str]) -> Proc {
        self.spawn_env(cmd, &[])
    }

    /// [`spawn`](Self::spawn) with extra environment variables.
    pub fn spawn_env(&self, cmd: &[&str], env: &[(&str, &str)]) -> Proc {
        let n = self.spawned.fetch_add(1, Ordering::Relaxed);
        let log = std::env::temp_dir().join(format!("{}-p{n}.log", self.name));
        let file = File::create(&log)
            .unwrap_or_else(|e| panic!("cannot create log file {}: {e}", log.display()));
        let file2 = file.try_clone().expect("dup log file");
        let mut c = self.command(cmd);
        c.envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(file2)
            .process_group(0);
        let desc = format!("[netns {}] {}", self.name, cmd.join(" "));
        let child = c
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {desc}: {e}"));
        let pid = child.id();
        let shared: SharedChild = Arc::new(Mutex::new(Some(child)));
        lock(&self.procs).push((Arc::downgrade(&shared), log.clone()));
        Proc {
            child: shared,
            pid,
            desc,
            log,
        }
    }

    /// Moves the current thread into this namespace until the guard drops.
    ///
    /// Sockets created meanwhile stay in this namespace for their lifetime.
    pub fn enter(&self) -> NsEnterGuard {
        let orig: OwnedFd = File::open("/proc/thread-self/ns/net")
            .unwrap_or_else(|e| panic!("cannot open /proc/thread-self/ns/net: {e}"))
            .into();
        let target = File::open(self.path())
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", self.path().display()));
        // SAFETY: valid fd of a netns file; setns only affects this thread.
        let rc = unsafe { libc::setns(target.as_raw_fd(), libc::CLONE_NEWNET) };
        if rc != 0 {
            panic!(
                "setns into {} failed: {}",
                self.name,
                std::io::Error::last_os_error()
            );
        }
        NsEnterGuard {
            orig,
            _not_send: PhantomData,
        }
    }

    /// Runs `f` on the current thread while it is inside this namespace.
    pub fn run<R>(&self, f: impl FnOnce() -> R) -> R {
        let _g = self.enter();
        f()
    }

    /// Sets a sysctl of this namespace, e.g. `sysctl("net.ipv4.ip_forward", "1")`.
    ///
    /// Written under `/proc/sys` from a thread that is inside the namespace
    /// (`/proc/sys/net` follows the writer's netns), then read back.
    pub fn sysctl(&self, key: &str, value: &str) {
        let path = sysctl_path(key);
        self.run(|| {
            std::fs::write(&path, value)
                .unwrap_or_else(|e| panic!("[netns {}] cannot set {key}={value}: {e}", self.name));
        });
        let got = self.sysctl_get(key);
        assert_eq!(
            got,
            value.trim(),
            "[netns {}] sysctl {key} did not stick",
            self.name
        );
    }

    /// Reads a sysctl of this namespace (trimmed).
    pub fn sysctl_get(&self, key: &str) -> String {
        let path = sysctl_path(key);
        self.run(|| std::fs::read_to_string(&path))
            .unwrap_or_else(|e| panic!("[netns {}] cannot read {key}: {e}", self.name))
            .trim()
            .to_string()
    }
}

fn sysctl_path(key: &str) -> PathBuf {
    Path::new("/proc/sys").join(key.replace('.', "/"))
}

fn ip_cmd(args: &[&str]) -> Command {
    let mut c = Command::new("ip");
    c.args(args);
    c
}

impl Drop for NetNs {
    fn drop(&mut self) {
        for (weak, log) in lock(&self.procs).drain(..) {
            if let Some(child) = weak.upgrade() {
                kill_shared(&child);
            }
            let _ = std::fs::remove_file(log);
        }
        let _g = lock(&NETNS_LOCK);
        let out = run_with_timeout(ip_cmd(&["netns", "del", &self.name]), CMD_TIMEOUT);
        if !out.status.success() {
            eprintln!(
                "testbed: `ip netns del {}` failed: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

/// Deletes `mh*<pid>x<n>` namespaces whose creating process is gone (left by
/// a test run that was killed). Runs once per process.
fn remove_stale_namespaces() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let Ok(entries) = std::fs::read_dir("/run/netns") else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(pid) = stale_pid(&name) else {
                continue;
            };
            if pid != std::process::id() && !Path::new("/proc").join(pid.to_string()).exists() {
                let _g = lock(&NETNS_LOCK);
                let _ = run_with_timeout(ip_cmd(&["netns", "del", &name]), CMD_TIMEOUT);
            }
        }
    });
}

/// Parses the pid out of `mh<letters><pid>x<digits>`.
fn stale_pid(name: &str) -> Option<u32> {
    let rest = name
        .strip_prefix("mh")?
        .trim_start_matches(|c: char| c.is_ascii_alphabetic());
    let (pid, n) = rest.split_once('x')?;
    if pid.is_empty() || n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    pid.parse().ok()
}

/// Restores the thread's original network namespace on drop. Not `Send`:
/// it must be dropped on the thread that entered.
#[derive(Debug)]
pub struct NsEnterGuard {
    orig: OwnedFd,
    _not_send: PhantomData<*const ()>,
}

impl Drop for NsEnterGuard {
    fn drop(&mut self) {
        // SAFETY: `orig` is an open netns fd; setns only affects this thread.
        let rc = unsafe { libc::setns(self.orig.as_raw_fd(), libc::CLONE_NEWNET) };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            if std::thread::panicking() {
                eprintln!("testbed: cannot restore the original netns: {err}");
            } else {
                panic!("testbed: cannot restore the original netns: {err}");
            }
        }
    }
}

/// A background process started by [`NetNs::spawn`]; killed on drop.
#[derive(Debug)]
pub struct Proc {
    child: SharedChild,
    pid: u32,
    desc: String,
    log: PathBuf,
}

fn kill_shared(child: &SharedChild) {
    if let Some(mut c) = lock(child).take()
        && matches!(c.try_wait(), Ok(None))
    {
        // SAFETY: the leader is not reaped yet, so its pid (= pgid) is ours.
        unsafe { libc::kill(-(c.id() as libc::pid_t), libc::SIGKILL) };
        let _ = c.wait();
    }
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// True while the process has not exited.
    pub fn is_running(&self) -> bool {
        match lock(&self.child).as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Sends `sig` (e.g. `libc::SIGTERM`) to the process if it still runs.
    pub fn signal(&self, sig: i32) {
        if let Some(c) = lock(&self.child).as_mut()
            && matches!(c.try_wait(), Ok(None))
        {
            // SAFETY: unreaped child, pid still valid.
            unsafe { libc::kill(c.id() as libc::pid_t, sig) };
        }
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(c) = lock(&self.child).as_mut()
                && let Ok(Some(st)) = c.try_wait()
            {
                return Some(st);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the process group and reaps the process.
    pub fn kill(&self) {
        kill_shared(&self.child);
    }

    /// Everything written to stdout and stderr so far.
    pub fn log(&self) -> String {
        std::fs::read(&self.log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        kill_shared(&self.child);
        if std::thread::panicking() {
            let log = self.log();
            let tail: String = {
                let lines: Vec<_> = log.lines().collect();
                lines[lines.len().saturating_sub(60)..].join("\n")
            };
            eprintln!(
                "--- output of {} (last 60 lines) ---\n{tail}\n---",
                self.desc
            );
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

#[cfg(test)]
mod tests {
    use super::stale_pid;

    #[test]
    fn parses_names() {
        assert_eq!(stale_pid("mhgw1234x5"), Some(1234));
        assert_eq!(stale_pid("mh1234x0"), Some(1234));
        assert_eq!(stale_pid("mhgw1234"), None);
        assert_eq!(stale_pid("other"), None);
        assert_eq!(stale_pid("mhgwx1"), None);
    }
}
