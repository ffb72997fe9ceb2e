//! The unit's `ExecStopPost=multihome cleanup --unless-restarting %n`:
//! systemd does not tell a stopping service whether it will start again,
//! so the daemon always keeps its pins on SIGTERM (`--keep-on-exit`), and
//! this decides afterwards. A restart job (`systemctl restart`, a package
//! upgrade's `deb-systemd-invoke restart`) or a failure (`Restart=` brings
//! the daemon back, and it adopts the flows) keeps the datapath; a plain
//! `systemctl stop` removes it, so that nothing forwards without a reaper
//! and probes.
use std::process::Command;

/// Why the datapath stays for `unit`, or None to clean it up. Reads
/// `$SERVICE_RESULT` (set by systemd for `ExecStopPost=`) and the unit's
/// queued jobs.
pub fn keep_for(unit: &str) -> Option<String> {
    let result = std::env::var("SERVICE_RESULT").ok();
    let jobs = Command::new("systemctl")
        .args(["list-jobs", "--no-legend", "--plain", unit])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    decide(result.as_deref(), &jobs)
}

/// [`keep_for`] on what it read: `result` is `$SERVICE_RESULT`, `jobs`
/// `systemctl list-jobs --no-legend --plain UNIT` ("ID UNIT TYPE STATE"
/// per line).
fn decide(result: Option<&str>, jobs: &str) -> Option<String> {
    if let Some(r) = result.filter(|r| *r != "success") {
        return Some(format!(
            "the daemon ended with {r}; Restart= brings it back"
        ));
    }
    jobs.lines()
        .filter_map(|l| l.split_whitespace().nth(2))
        .find(|t| t.contains("restart"))
        .map(|t| format!("a {t} job is under way"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restart_or_a_failure_keeps_the_datapath_and_a_stop_removes_it() {
        assert_eq!(decide(Some("success"), ""), None, "systemctl stop");
        assert_eq!(
            decide(Some("success"), "123 multihome.service stop running\n"),
            None
        );
        assert!(
            decide(Some("success"), "124 multihome.service restart running\n")
                .is_some_and(|w| w.contains("restart job"))
        );
        assert!(
            decide(
                Some("success"),
                "125 multihome.service try-restart waiting\n"
            )
            .is_some()
        );
        assert!(decide(Some("exit-code"), "").is_some_and(|w| w.contains("exit-code")));
        assert_eq!(decide(None, ""), None, "by hand, outside systemd");
    }
}
