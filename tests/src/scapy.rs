//! Crafted packets through scapy (Debian's `python3-scapy`, which
//! `cargo xtask setup` installs): for protocols this kernel has no driver
//! for, fragments in any order, and malformed or fuzzed traffic.
use std::time::Duration;

use crate::{host::check_output, netns::NetNs};

/// The interpreter that has Debian's scapy (not a pyenv one on `PATH`).
pub const PYTHON: &str = "/usr/bin/python3";

/// The path of `tests/scripts/NAME`.
pub fn script(name: &str) -> String {
    crate::host::workspace_root()
        .join("tests/scripts")
        .join(name)
        .to_str()
        .expect("utf-8 path")
        .to_owned()
}

const PRELUDE: &str = "import sys\nfrom scapy.all import *\nconf.verb = 0\n";

/// Runs `script` (after `from scapy.all import *`) in `ns` and returns its
/// stdout; panics, with its stderr, if it fails or runs past `timeout`.
pub fn scapy(ns: &NetNs, script: &str, timeout: Duration) -> String {
    if !std::path::Path::new(PYTHON).exists() {
        panic!("{PYTHON} is missing: run `cargo xtask setup` (installs python3-scapy)");
    }
    let program = format!("{PRELUDE}{script}");
    let out = ns.try_exec_timeout(&[PYTHON, "-c", &program], timeout);
    check_output(&format!("[netns {}] scapy script", ns.name()), &out);
    String::from_utf8_lossy(&out.stdout).into_owned()
}
