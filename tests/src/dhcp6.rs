//! Prefix delegation for real (RFC 8415): Debian's Kea DHCPv6 server as
//! the ISP and dhcpcd as the gateway's client, each in its namespace.
//! `cargo xtask setup` installs both (`kea-dhcp6-server`, `dhcpcd-base`).
//!
//! Neither touches the root namespace or its files beyond its own: Kea
//! keeps its leases in memory and its pid and lock files in a directory of
//! the test's; dhcpcd runs no hook script (`-c /bin/true`), and its lease
//! and pid files (named after the interface, under /var/lib/dhcpcd and
//! /run/dhcpcd) are removed before and after.
use std::{path::PathBuf, time::Duration};

use crate::netns::{NetNs, Proc};

const KEA: &str = "/usr/sbin/kea-dhcp6";
const DHCPCD: &str = "/usr/sbin/dhcpcd";

fn need(path: &str, package: &str) {
    assert!(
        std::path::Path::new(path).exists(),
        "{path} is missing: run `cargo xtask setup` (installs {package})"
    );
}

/// A Kea DHCPv6 server delegating prefixes from one pool on one
/// interface; stopped on drop.
pub struct Kea6 {
    proc: Option<Proc>,
    dir: PathBuf,
}

impl Kea6 {
    /// Serves `ifname` in `ns`: addresses of `subnet` (a /64, for the
    /// link), and a `delegated_len` prefix from `pool` to each client.
    pub fn start(ns: &NetNs, ifname: &str, subnet: &str, pool: &str, delegated_len: u8) -> Kea6 {
        need(KEA, "kea-dhcp6-server");
        let dir = std::env::temp_dir().join(format!("{}-kea", ns.name()));
        std::fs::create_dir_all(&dir).expect("kea's directory");
        let (pool_addr, pool_len) = pool.split_once('/').expect("pool as prefix/len");
        let config = serde_json::json!({ "Dhcp6": {
            "interfaces-config": { "interfaces": [ifname] },
            "lease-database": { "type": "memfile", "persist": false },
            "server-id": { "type": "EN", "enterprise-id": 2495, "identifier": "0102",
                           "persist": false },
            "preferred-lifetime": 3000, "valid-lifetime": 4000,
            "renew-timer": 1000, "rebind-timer": 2000,
            "subnet6": [{
                "subnet": subnet, "interface": ifname,
                "pd-pools": [{ "prefix": pool_addr,
                               "prefix-len": pool_len.parse::<u8>().expect("length"),
                               "delegated-len": delegated_len }],
            }],
            "loggers": [{ "name": "kea-dhcp6", "severity": "INFO",
                          "output_options": [{ "output": "stdout" }] }],
        }});
        let path = dir.join("kea-dhcp6.json");
        std::fs::write(&path, config.to_string()).expect("kea's config");
        let dir_s = dir.to_str().expect("utf-8").to_owned();
        let proc = ns.spawn_env(
            &[KEA, "-c", path.to_str().expect("utf-8")],
            &[("KEA_PIDFILE_DIR", &dir_s), ("KEA_LOCKFILE_DIR", &dir_s)],
        );
        let kea = Kea6 {
            proc: Some(proc),
            dir,
        };
        crate::eventually(Duration::from_secs(10), "kea-dhcp6 serving", || {
            kea.log().contains("DHCP6_CONFIG_COMPLETE")
        });
        kea
    }

    pub fn log(&self) -> String {
        self.proc.as_ref().map(Proc::log).unwrap_or_default()
    }
}

impl Drop for Kea6 {
    fn drop(&mut self) {
        if let Some(p) = self.proc.take() {
            p.kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// dhcpcd asking for a delegated prefix (and nothing else) on one
/// interface: it installs an `unreachable` route for what it gets.
pub struct Dhcpcd {
    proc: Option<Proc>,
    ifname: String,
    config: PathBuf,
}

impl Dhcpcd {
    pub fn start(ns: &NetNs, ifname: &str) -> Dhcpcd {
        need(DHCPCD, "dhcpcd-base");
        remove_state(ifname);
        let config = std::env::temp_dir().join(format!("{}-dhcpcd.conf", ns.name()));
        // No router solicitation: the kernel keeps handling RAs
        // (`accept_ra`), and no address, only the prefix (IA_PD).
        std::fs::write(
            &config,
            format!("ipv6only\nnoipv6rs\nduid\ninterface {ifname}\n  ia_pd 1\n"),
        )
        .expect("dhcpcd's config");
        let proc = ns.spawn(&[
            DHCPCD,
            "-f",
            config.to_str().expect("utf-8"),
            "-c",
            "/bin/true",
            "-B",
            "-6",
            ifname,
        ]);
        Dhcpcd {
            proc: Some(proc),
            ifname: ifname.to_owned(),
            config,
        }
    }

    /// Asks the server again at once (`dhcpcd -n`: a rebind), as when
    /// its lease runs out.
    pub fn rebind(&self, ns: &NetNs) {
        let out = ns.try_exec(&[DHCPCD, "-6", "-n", &self.ifname]);
        assert!(out.status.success(), "dhcpcd -n failed: {out:?}");
    }

    /// Stops it as a system would (SIGTERM): it removes what it
    /// installed, the delegated prefix's route among it.
    pub fn stop(&mut self) {
        if let Some(p) = self.proc.take() {
            p.signal(libc::SIGTERM);
            assert!(
                p.wait_timeout(Duration::from_secs(10)).is_some(),
                "dhcpcd did not stop: {}",
                p.log()
            );
        }
    }

    pub fn log(&self) -> String {
        self.proc.as_ref().map(Proc::log).unwrap_or_default()
    }
}

impl Drop for Dhcpcd {
    fn drop(&mut self) {
        if let Some(p) = self.proc.take() {
            p.kill();
        }
        remove_state(&self.ifname);
        let _ = std::fs::remove_file(&self.config);
    }
}

/// dhcpcd's files for `ifname`: its lease (which a next run would ask
/// for again) and its pid and control sockets.
fn remove_state(ifname: &str) {
    let _ = std::fs::remove_file(format!("/var/lib/dhcpcd/{ifname}.lease6"));
    for suffix in ["-6.pid", "-6.sock", "-6.unpriv.sock"] {
        let _ = std::fs::remove_file(format!("/run/dhcpcd/{ifname}{suffix}"));
    }
}
