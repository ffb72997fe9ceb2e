//! `cargo xtask demo` (and `run` without arguments): the seed's topology in
//! network namespaces (a LAN client, a gateway with two uplinks, two ISPs
//! that drop spoofed sources, a server behind both), the gateway running
//! in it, some traffic, and what to try next. Everything is removed on
//! exit.
use std::time::{Duration, Instant};

use anyhow::Result;
use testbed::{
    Gateway, IF_WANX, INET_SERVICE, Topology, UPLINK_X_ADDR, config_for, tcp_peer_server,
    udp_peer_server,
};

pub struct Options {
    /// Stop after this long instead of waiting for Ctrl-C.
    pub seconds: Option<u64>,
    /// Take uplink x's link down after this many seconds (and back up
    /// `OUTAGE` later), so that the demo shows a failover on its own.
    pub outage_after: Option<u64>,
    /// Fail unless the outage showed: `top` reported it, and new flows
    /// went to y only while it lasted (the test of the demo).
    pub check: bool,
}

/// How long the demo's own outage lasts.
const OUTAGE: Duration = Duration::from_secs(8);
/// How long the demo's traffic waits for an answer: short, so that a
/// flow caught on a dying uplink does not stall the rest.
const PATIENCE: Duration = Duration::from_millis(300);
/// `multihome top` clears the screen before each frame.
const CLEAR: &str = "\x1b[2J\x1b[H";

pub fn run(bin: &std::path::Path, opts: Options) -> Result<()> {
    crate::util::catch_stop_signals();
    // SAFETY: single-threaded at this point.
    unsafe { std::env::set_var("MULTIHOME_BIN", bin) };
    println!("building the demo topology in network namespaces...");
    let t = Topology::standard();
    let tcp = tcp_peer_server(&t.inet, INET_SERVICE, 8000);
    let udp = udp_peer_server(&t.inet, INET_SERVICE, 8001);
    let config = config_for(&t, [1, 2], "");
    let gw = Gateway::start(&t.gw, &config);
    let pin = gw.pin_dir().display().to_string();
    let b = bin.display();
    let intro = format!(
        "=== multihome demo ===\n\
         client {client} (198.18.1.2) -> gateway {gwns} -> ISP X {ispx} / ISP Y {ispy} -> server {inet} ({INET_SERVICE})\n\
         uplink x has weight 1, uplink y weight 2; the client keeps opening new flows.\n\
         Try, in another terminal:\n\
         \x20 ip -n {gwns} link set {IF_WANX} down        # kill uplink x: new flows go to y\n\
         \x20 ip -n {gwns} link set {IF_WANX} up\n\
         \x20 ip -n {gwns} addr replace 198.18.11.2/24 dev {IF_WANX}   # renumber uplink x\n\
         \x20 {b} uplink set-weight --pin-dir {pin} y 5\n\
         \x20 {b} conns --pin-dir {pin}\n\
         \x20 bpftool map dump pinned {pin}/CONN_FWD\n\
         Ctrl-C stops the demo and removes everything.\n",
        client = t.client.name(),
        gwns = t.gw.name(),
        ispx = t.ispx.name(),
        ispy = t.ispy.name(),
        inet = t.inet.name(),
    );
    println!("{intro}\nconfig:\n{config}");
    let started = Instant::now();
    let running = || {
        !crate::util::stopping()
            && opts
                .seconds
                .is_none_or(|s| started.elapsed() < Duration::from_secs(s))
    };
    // One `multihome top` for the whole demo, so that its events add up;
    // each frame is shown with the way to play with it.
    let mut top = std::process::Command::new(bin)
        .args(["top", "--pin-dir", &pin])
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let frames = top.stdout.take().expect("piped");
    let mut seen = Seen::default();
    // With --check, also a `top` in a terminal (tmux), as a newcomer
    // would watch it.
    let tmux = opts
        .check
        .then(|| Tmux::start(&format!("mhdemo{}", std::process::id()), bin, &pin))
        .transpose()?;
    std::thread::scope(|scope| {
        // The client opens new flows all along, so that top has rates to
        // show; several workers, with short timeouts, so that one flow
        // caught on a dying uplink stalls none of the others.
        for _ in 0..3 {
            scope.spawn(|| {
                while running() {
                    let _ = udp_exchange(&t, udp.addr());
                    let _ = tcp_exchange(&t, tcp.addr());
                    std::thread::sleep(Duration::from_millis(50));
                }
            });
        }
        let outage = scope.spawn(|| outage(&t, &gw, opts.outage_after, tmux.as_ref(), &running));
        let shown = scope.spawn(|| show_frames(frames, &intro, opts.outage_after.is_some()));
        while running() {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = top.kill();
        let _ = top.wait();
        (seen.flows, seen.screen) = outage.join().unwrap_or_default();
        seen.events = shown.join().unwrap_or_default();
    });
    println!("\nstopping: removing the gateway, namespaces and pins...");
    let spoofed = t.spoofed_drops();
    drop(gw);
    drop(t);
    println!("done (the ISPs dropped {spoofed} spoofed packets; {UPLINK_X_ADDR} is uplink x).");
    if opts.check {
        seen.check()?;
        println!("check: the outage showed in top, and new flows left x while it lasted");
    }
    Ok(())
}

/// What the demo saw of its own outage, for `--check`.
#[derive(Default)]
struct Seen {
    /// New flows on (x, y) while x was down; None without an outage.
    flows: Option<(u64, u64)>,
    /// `top`'s event lines.
    events: Vec<String>,
    /// The terminal `top`'s screen while x was down.
    screen: String,
}

impl Seen {
    fn check(&self) -> Result<()> {
        let Some((x, y)) = self.flows else {
            anyhow::bail!("--check needs --outage-after, and a demo long enough for the outage");
        };
        anyhow::ensure!(
            self.events.iter().any(|e| e.contains("uplink x up -> ")),
            "top showed no event for uplink x going down: {:?}",
            self.events
        );
        anyhow::ensure!(
            x == 0 && y > 0,
            "new flows while x was down: {x} on x, {y} on y"
        );
        let row = |name: &str| {
            self.screen
                .lines()
                .find(|l| l.trim_start_matches('│').starts_with(&format!("{name} ")))
                .unwrap_or_default()
        };
        anyhow::ensure!(
            self.screen.contains("uplink x up -> down")
                && row("x").contains(" 0 bit/s")
                && (row("y").contains("kbit/s") || row("y").contains("Mbit/s")),
            "the terminal top did not show x's outage and y's rates:\n{}",
            self.screen
        );
        Ok(())
    }
}

/// Takes x's link down `after` seconds in, and up `OUTAGE` later; returns
/// the new flows each uplink took while it was down (after a second for
/// the datapath to learn it).
fn outage(
    t: &Topology,
    gw: &Gateway,
    after: Option<u64>,
    tmux: Option<&Tmux>,
    running: &(dyn Fn() -> bool + Sync),
) -> (Option<(u64, u64)>, String) {
    let Some(after) = after.map(Duration::from_secs) else {
        return (None, String::new());
    };
    let start = Instant::now();
    while start.elapsed() < after {
        if !running() {
            return (None, String::new());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    t.gw.exec(&["ip", "link", "set", IF_WANX, "down"]);
    std::thread::sleep(Duration::from_secs(1));
    let before = new_flows(gw);
    std::thread::sleep(OUTAGE - Duration::from_secs(2));
    let during = new_flows(gw);
    let screen = tmux.map(Tmux::capture).unwrap_or_default();
    t.gw.exec(&["ip", "link", "set", IF_WANX, "up"]);
    (Some((during.0 - before.0, during.1 - before.1)), screen)
}

/// A `multihome top` in a tmux server of its own, killed on drop.
struct Tmux(String);

impl Tmux {
    fn start(name: &str, bin: &std::path::Path, pin: &str) -> Result<Self> {
        let tmux = Self(name.to_string());
        let top = format!("{} top --pin-dir {pin}", bin.display());
        let out = tmux.run(&[
            "new-session",
            "-d",
            "-s",
            "top",
            "-x",
            "150",
            "-y",
            "40",
            &top,
        ])?;
        anyhow::ensure!(out.status.success(), "tmux: {out:?}");
        Ok(tmux)
    }

    fn run(&self, args: &[&str]) -> Result<std::process::Output> {
        Ok(std::process::Command::new("tmux")
            .args(["-L", &self.0])
            .args(args)
            .output()?)
    }

    fn capture(&self) -> String {
        self.run(&["capture-pane", "-p", "-t", "top"])
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.run(&["kill-server"]);
    }
}

/// New flows so far on x and y, from `multihome status`.
fn new_flows(gw: &Gateway) -> (u64, u64) {
    let out = gw.cli(&["status", "--json"]);
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let of = |i: usize| st["uplinks"][i]["new_flows"].as_u64().unwrap_or(0);
    (of(0), of(1))
}

/// Prints each frame of `top` with the intro below it (the outage note
/// when the demo makes one); returns the events the frames listed.
fn show_frames(frames: std::process::ChildStdout, intro: &str, outage: bool) -> Vec<String> {
    use std::io::Read as _;
    let mut events = Vec::new();
    let mut text = String::new();
    let mut buf = [0u8; 4096];
    let mut frames = frames;
    let note = if outage {
        "(this demo takes uplink x down by itself for a few seconds: watch the events and the rates)\n"
    } else {
        ""
    };
    while let Ok(n) = frames.read(&mut buf) {
        if n == 0 {
            break;
        }
        text.push_str(&String::from_utf8_lossy(&buf[..n]));
        while let Some(end) = text[CLEAR.len().min(text.len())..].find(CLEAR) {
            let frame: String = text.drain(..CLEAR.len() + end).collect();
            for e in frame.lines().filter(|l| l.contains(" -> ")) {
                if !events.iter().any(|k| k == e) {
                    events.push(e.to_string());
                }
            }
            print!("{frame}\n{note}{intro}");
        }
    }
    events
}

/// One UDP exchange with the server from a new socket of the client.
fn udp_exchange(t: &Topology, server: std::net::SocketAddrV4) -> std::io::Result<()> {
    let s = t
        .client
        .run(|| std::net::UdpSocket::bind(("198.18.1.2", 0)))?;
    s.set_read_timeout(Some(PATIENCE))?;
    s.send_to(b"?", server)?;
    s.recv(&mut [0u8; 64]).map(|_| ())
}

/// One TCP connection to the server from the client, read to its end.
fn tcp_exchange(t: &Topology, server: std::net::SocketAddrV4) -> std::io::Result<()> {
    use std::io::Read as _;
    let mut c = t
        .client
        .run(|| std::net::TcpStream::connect_timeout(&server.into(), PATIENCE))?;
    c.set_read_timeout(Some(PATIENCE))?;
    c.read_to_end(&mut Vec::new()).map(|_| ())
}
