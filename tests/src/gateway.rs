//! A running `multihome run` in a topology's gateway namespace, stopped
//! (SIGTERM) on drop, with helpers to ask it questions through its CLI.
use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::Output,
    time::{Duration, Instant},
};

use crate::{
    host::{PinDir, multihome_bin, unique_pin_dir},
    netns::{NetNs, Proc},
    topology::{IF_LAN, IF_LAN1, Topology, TopologyKind},
};

/// How long the daemon may take to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

pub struct Gateway<'a> {
    ns: &'a NetNs,
    proc: Option<Proc>,
    pin: Option<PinDir>,
    config: PathBuf,
}

/// A config for `topo` with the given uplink weights (x, y). Extra TOML is
/// appended as is (e.g. a `[nat]` table).
pub fn config_for(topo: &Topology, weights: [u32; 2], extra: &str) -> String {
    let mut lan = vec![format!("{IF_LAN:?}")];
    if topo.kind == TopologyKind::TwoClients {
        lan.push(format!("{IF_LAN1:?}"));
    }
    let mut text = format!("lan = [{}]\n", lan.join(", "));
    for (u, (name, w)) in topo
        .uplinks()
        .iter()
        .zip([("x", weights[0]), ("y", weights[1])])
    {
        text += &format!(
            "\n[[uplink]]\nname = {name:?}\ninterface = {:?}\nweight = {w}\n",
            u.ifname
        );
        if !u.l3_only {
            text += &format!("gateway = \"{}\"\n", u.gateway);
        }
        if topo.kind == TopologyKind::SharedNic {
            text += &format!("address = \"{}\"\n", u.addr);
        }
    }
    text + "\n" + extra
}

impl<'a> Gateway<'a> {
    /// Starts the daemon in `ns` with `config` and waits until it is ready.
    pub fn start(ns: &'a NetNs, config: &str) -> Self {
        let pin = unique_pin_dir("gw");
        Self::start_with_pin(ns, config, pin, &[])
    }

    /// Like [`Gateway::start`], reusing a pin directory (restart tests)
    /// and passing extra `run` flags.
    pub fn start_with_pin(ns: &'a NetNs, config: &str, pin: PinDir, flags: &[&str]) -> Self {
        Self::start_with_env(ns, config, pin, flags, &[])
    }

    /// [`Gateway::start_with_pin`] with extra environment variables.
    pub fn start_with_env(
        ns: &'a NetNs,
        config: &str,
        pin: PinDir,
        flags: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        let path = std::env::temp_dir().join(format!(
            "{}-multihome.toml",
            pin.path()
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("gw")
        ));
        let config = crate::with_test_xdp(config);
        let mut f = std::fs::File::create(&path).expect("write config");
        f.write_all(config.as_bytes()).expect("write config");
        let bin = multihome_bin();
        let mut cmd = vec![
            bin.to_str().expect("utf-8 path"),
            "run",
            "--config",
            path.to_str().expect("utf-8 path"),
            "--pin-dir",
            pin.path().to_str().expect("utf-8 path"),
        ];
        cmd.extend_from_slice(flags);
        let mut vars = vec![("RUST_LOG", "info")];
        vars.extend_from_slice(env);
        let proc = ns.spawn_env(&cmd, &vars);
        let gw = Gateway {
            ns,
            proc: Some(proc),
            pin: Some(pin),
            config: path,
        };
        gw.wait_ready();
        gw
    }

    fn proc(&self) -> &Proc {
        self.proc.as_ref().expect("daemon running")
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if self.proc().log().contains("ready:") {
                return;
            }
            if !self.proc().is_running() {
                panic!(
                    "multihome exited before it was ready:\n{}",
                    self.proc().log()
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "multihome not ready after {READY_TIMEOUT:?}:\n{}",
                    self.proc().log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.proc().pid()
    }

    pub fn pin_dir(&self) -> &Path {
        self.pin.as_ref().expect("pin dir").path()
    }

    pub fn config_path(&self) -> &Path {
        &self.config
    }

    pub fn log(&self) -> String {
        self.proc().log()
    }

    /// Runs `multihome ARGS --pin-dir DIR` in the gateway namespace.
    pub fn cli(&self, args: &[&str]) -> Output {
        let bin = multihome_bin();
        let mut cmd = vec![bin.to_str().expect("utf-8 path")];
        cmd.extend_from_slice(args);
        cmd.extend_from_slice(&["--pin-dir", self.pin_dir().to_str().expect("utf-8")]);
        self.ns.try_exec(&cmd)
    }

    /// `multihome conns --json`, parsed.
    pub fn conns(&self) -> Vec<serde_json::Value> {
        let out = self.cli(&["conns", "--json"]);
        assert!(out.status.success(), "conns failed: {out:?}");
        serde_json::from_slice(&out.stdout).expect("conns --json is JSON")
    }

    /// `multihome status --json`, parsed.
    pub fn status(&self) -> serde_json::Value {
        let out = self.cli(&["status", "--json"]);
        assert!(out.status.success(), "status failed: {out:?}");
        serde_json::from_slice(&out.stdout).expect("status --json is JSON")
    }

    /// A drop/pass reason counter from `status`.
    pub fn reason(&self, name: &str) -> u64 {
        self.status()["drops"][name]
            .as_u64()
            .unwrap_or_else(|| panic!("no reason counter {name}"))
    }

    /// Sends a signal to the daemon.
    pub fn signal(&self, sig: i32) {
        self.proc().signal(sig);
    }

    /// Stops the daemon with SIGTERM, asserts a clean exit, and hands back
    /// the pin directory (for restart tests).
    pub fn stop(mut self) -> PinDir {
        self.terminate();
        self.proc = None;
        self.pin.take().expect("pin dir")
    }

    fn terminate(&mut self) {
        let Some(proc) = self.proc.as_ref() else {
            return;
        };
        proc.signal(libc::SIGTERM);
        match proc.wait_timeout(Duration::from_secs(10)) {
            Some(st) if st.success() => {}
            Some(st) if std::thread::panicking() => eprintln!("multihome exited with {st}"),
            Some(st) => panic!("multihome exited with {st}:\n{}", proc.log()),
            None => {
                proc.kill();
                if !std::thread::panicking() {
                    panic!("multihome ignored SIGTERM:\n{}", proc.log());
                }
            }
        }
    }
}

impl Drop for Gateway<'_> {
    fn drop(&mut self) {
        self.terminate();
        let _ = std::fs::remove_file(&self.config);
    }
}
