//! What an operator sees: Prometheus metrics.
use std::{
    io::{Read as _, Write as _},
    time::Duration,
};

use testbed::*;

fn scrape(ns: &NetNs, port: u16) -> String {
    get(ns, port, "/metrics")
}

/// The whole HTTP/1.0 response to `GET path`.
fn get(ns: &NetNs, port: u16, path: &str) -> String {
    let mut s = ns
        .run(|| std::net::TcpStream::connect(("127.0.0.1", port)))
        .expect("connect to --metrics");
    s.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
        .expect("request");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("response");
    out
}

/// The status code of an HTTP response.
fn code(response: &str) -> u16 {
    response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {response}"))
}

fn value(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {series} in\n{metrics}"))
        .parse()
        .expect("a number")
}

#[test]
fn prometheus_metrics_show_uplinks_traffic_reasons_and_map_fill() {
    let t = Topology::standard();
    let config = config_for(&t, [1, 0], "");
    let _gw = Gateway::start_with_pin(
        &t.gw,
        &config,
        unique_pin_dir("pm"),
        &["--metrics", "127.0.0.1:9801"],
    );
    let srv = udp_echo_server(&t.inet, INET_SERVICE, 0);
    for _ in 0..5 {
        udp_request(&t.client, srv.addr(), b"m").expect("UDP");
    }
    let m = scrape(&t.gw, 9801);
    assert_eq!(code(&m), 200, "{m}");
    // OpenMetrics: a counter family is named without `_total`, its
    // samples with it, once.
    assert!(
        m.contains("# TYPE multihome_uplink_tx_packets counter"),
        "{m}"
    );
    assert!(!m.contains("_total_total"), "{m}");
    assert!(m.trim_end().ends_with("# EOF"), "{m}");
    let x = "{uplink=\"x\",interface=\"wanx\"}";
    assert_eq!(value(&m, &format!("multihome_uplink_up{x}")), 1.0);
    assert!(value(&m, &format!("multihome_uplink_tx_packets_total{x}")) >= 5.0);
    assert!(value(&m, &format!("multihome_uplink_flows{x}")) >= 1.0);
    assert_eq!(
        value(&m, "multihome_flow_capacity"),
        f64::from(multihome_common::DEFAULT_MAX_FLOWS)
    );
    assert!(value(&m, "multihome_flow_fill_ratio") > 0.0);
    assert_eq!(
        value(&m, "multihome_packets_total{reason=\"port_exhausted\"}"),
        0.0
    );

    // Every series the shipped Grafana dashboard plots exists.
    let dash = std::fs::read_to_string(workspace_root().join("docs/grafana/multihome.json"))
        .expect("docs/grafana/multihome.json");
    let mut used: Vec<&str> = dash
        .match_indices("multihome_")
        .map(|(i, _)| {
            let rest = &dash[i..];
            let end = rest
                .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
                .unwrap_or(rest.len());
            &rest[..end]
        })
        .collect();
    used.sort_unstable();
    used.dedup();
    assert!(used.len() >= 5, "{used:?}");
    for name in used {
        assert!(
            m.lines().any(|l| l
                .strip_prefix(name)
                .is_some_and(|r| r.starts_with(['{', ' ']))),
            "the dashboard plots unknown {name}"
        );
    }

    // Every family parses with an independent OpenMetrics parser.
    let body = m.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    let parse = "import sys\n\
                 from prometheus_client.openmetrics.parser import text_string_to_metric_families\n\
                 print(len(list(text_string_to_metric_families(sys.stdin.read()))))";
    let mut py = std::process::Command::new(PYTHON)
        .args(["-c", parse])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3 (python3-prometheus-client comes with `cargo xtask setup`)");
    py.stdin
        .take()
        .expect("stdin")
        .write_all(body.as_bytes())
        .expect("feed the parser");
    let out = py.wait_with_output().expect("the parser");
    assert!(
        out.status.success(),
        "the OpenMetrics parser refused the scrape: {}\n{body}",
        String::from_utf8_lossy(&out.stderr)
    );
    let families: usize = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("a count");
    assert!(families >= 19, "{families} families");

    // Only /metrics and /healthz are served.
    assert_eq!(code(&get(&t.gw, 9801, "/")), 404);
    assert_eq!(code(&get(&t.gw, 9801, "/metrics/x")), 404);
    let h = get(&t.gw, 9801, "/healthz");
    assert_eq!(code(&h), 200, "{h}");
    assert!(h.ends_with("ok: x up, y up\n"), "{h}");
    // Every uplink down: unhealthy, and says why.
    link_down(&t.gw, IF_WANX);
    link_down(&t.gw, IF_WANY);
    let mut h = String::new();
    eventually(Duration::from_secs(5), "healthz turns unhealthy", || {
        h = get(&t.gw, 9801, "/healthz");
        code(&h) == 503
    });
    assert!(
        h.contains("no usable uplink: x down (link down), y down (link down)"),
        "{h}"
    );
}

#[test]
fn set_weight_and_drain_act_live_and_keep_pinned_flows() {
    let t = Topology::standard();
    let gw = Gateway::start(&t.gw, &config_for(&t, [1, 1], ""));
    let srv = udp_peer_server(&t.inet, INET_SERVICE, 0);
    let uplink = |args: &[&str]| {
        let out = gw.cli(&[&["uplink"][..], args].concat());
        assert!(out.status.success(), "uplink {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // A flow pinned to y, kept through everything below.
    let pinned = loop {
        let s = t
            .client
            .run(|| std::net::UdpSocket::bind((CLIENT_ADDR, 0)))
            .expect("bind");
        s.connect(srv.addr()).expect("connect");
        s.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
        s.send(b"?").expect("send");
        let mut buf = [0u8; 64];
        let n = s.recv(&mut buf).expect("reply");
        if buf[..n].starts_with(b"198.18.22.1:") {
            break s;
        }
    };

    assert!(uplink(&["set-weight", "y", "0"]).contains("weight 0"));
    for _ in 0..10 {
        let peer = udp_seen_as(&t.client, None, srv.addr()).expect("UDP");
        assert_eq!(*peer.ip(), UPLINK_X_ADDR, "y has weight 0");
    }
    assert_eq!(gw.status()["uplinks"][1]["weight"], 0);

    uplink(&["set-weight", "y", "1"]);
    assert!(uplink(&["drain", "x"]).contains("drained"));
    assert_eq!(gw.status()["uplinks"][0]["state"], "drained");
    for _ in 0..10 {
        let peer = udp_seen_as(&t.client, None, srv.addr()).expect("UDP");
        assert_eq!(*peer.ip(), UPLINK_Y_ADDR, "x is drained");
    }
    let x_flows = gw.conns().iter().filter(|c| c["uplink"] == "x").count();
    assert!(x_flows >= 10, "draining removed x's flows ({x_flows} left)");
    let mut buf = [0u8; 64];
    pinned.send(b"?").expect("send");
    let n = pinned.recv(&mut buf).expect("the pinned flow still works");
    assert!(
        buf[..n].starts_with(b"198.18.22.1:"),
        "the pinned flow moved"
    );

    uplink(&["undrain", "x"]);
    assert_eq!(gw.status()["uplinks"][0]["state"], "up");
    let out = gw.cli(&["uplink", "drain", "nosuch"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no uplink named \"nosuch\""));
}

/// A tmux server of its own, killed on drop.
struct Tmux(String);

impl Tmux {
    fn run(&self, args: &[&str]) -> std::process::Output {
        std::process::Command::new("tmux")
            .args(["-L", &self.0])
            .args(args)
            .output()
            .expect("tmux (install it with `cargo xtask setup`)")
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.run(&["kill-server"]);
    }
}

#[test]
fn top_shows_uplinks_shares_and_events_live_in_a_terminal() {
    let t = Topology::standard();
    let gw = Gateway::start(&t.gw, &config_for(&t, [1, 3], ""));
    let srv = udp_echo_server(&t.inet, INET_SERVICE, 0);
    let tmux = Tmux(format!("mhtop{}", std::process::id()));
    let cmd = format!(
        "nsenter --net={} {} top --pin-dir {}",
        t.gw.path().display(),
        multihome_bin().display(),
        gw.pin_dir().display()
    );
    let out = tmux.run(&[
        "new-session",
        "-d",
        "-s",
        "top",
        "-x",
        "150",
        "-y",
        "30",
        &cmd,
    ]);
    assert!(out.status.success(), "tmux: {out:?}");
    std::thread::sleep(Duration::from_millis(1200));
    for _ in 0..40 {
        udp_request(&t.client, srv.addr(), b"t").expect("UDP");
    }
    link_down(&t.gw, IF_WANX);
    // Traffic goes on, on y.
    let start = std::time::Instant::now();
    while start.elapsed() < Duration::from_millis(2500) {
        udp_request(&t.client, srv.addr(), b"t").expect("UDP");
        std::thread::sleep(Duration::from_millis(20));
    }
    let screen = String::from_utf8_lossy(&tmux.run(&["capture-pane", "-p", "-t", "top"]).stdout)
        .into_owned();
    for needle in [
        "multihome top",
        "UPLINK",
        "wanx",
        "wany",
        "SHARE",
        "3 (75%)",
        "Recent events",
        // The terminal screen: a rate sparkline per uplink, the top hosts.
        "x out+in, bit/s",
        "y out+in, bit/s",
        "LAN hosts with most flows",
        "198.18.1.2",
    ] {
        assert!(
            screen.contains(needle),
            "no {needle:?} on the screen:\n{screen}"
        );
    }
    assert!(
        screen.contains("uplink x up -> down (link down)"),
        "no event:\n{screen}"
    );
    // The rates moved to the surviving uplink.
    let row = |name: &str| {
        screen
            .lines()
            .find(|l| l.trim_start_matches('│').starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no row for {name}:\n{screen}"))
    };
    assert!(row("x").contains(" 0 bit/s"), "x still carries:\n{screen}");
    assert!(
        row("y").contains("kbit/s") && row("y").contains("100%"),
        "y carries nothing:\n{screen}"
    );
}

#[test]
fn only_the_daemons_user_may_use_the_control_socket_and_the_pin_dir() {
    use std::os::unix::{fs::PermissionsExt as _, process::CommandExt as _};
    let t = Topology::standard();
    let gw = Gateway::start(&t.gw, &config_for(&t, [1, 1], ""));
    let mode = |p: &std::path::Path| {
        std::fs::metadata(p)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
            .permissions()
            .mode()
            & 0o777
    };
    let pin = gw.pin_dir().to_str().expect("utf-8").to_owned();
    let socket = std::path::Path::new("/run/multihome")
        .join(format!("{}.sock", pin.trim_matches('/').replace('/', "_")));
    assert_eq!(
        mode(&socket),
        0o600,
        "the socket's mode, whatever the umask"
    );
    assert_eq!(mode(gw.pin_dir()), 0o700, "the pin directory's mode");
    let drain_as_nobody = || {
        std::process::Command::new(multihome_bin())
            .args(["uplink", "drain", "x", "--pin-dir", &pin])
            .uid(65534)
            .gid(65534)
            .output()
            .expect("run the CLI as nobody")
    };
    assert!(
        !drain_as_nobody().status.success(),
        "mode 0600 let nobody in"
    );
    // Past the file mode, the daemon checks the peer's uid itself.
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).expect("chmod");
    let out = drain_as_nobody();
    assert!(!out.status.success(), "SO_PEERCRED let nobody in: {out:?}");
    assert!(
        gw.log().contains("refused a client of uid 65534"),
        "{}",
        gw.log()
    );
    assert_eq!(
        gw.status()["uplinks"][0]["state"],
        "up",
        "x was not drained"
    );
}

/// Echo requests the gateway's probes sent to `target`, as `ns` counted
/// them in its INPUT chain.
fn probes_seen(ns: &NetNs, target: &str) -> u64 {
    let out = ns.exec_stdout(&["iptables", "-w", "-L", "INPUT", "-v", "-x", "-n"]);
    out.lines()
        .find(|l| l.contains("icmptype 8") && l.contains(target))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no probe counter in\n{out}"))
}

#[test]
fn probe_rounds_keep_their_interval_while_metrics_walk_a_million_flows() {
    use aya::maps::{HashMap, MapData};
    use multihome_common::{FLOW_SEEN_REPLY, FlowFwd, FlowKey};
    const FLOWS: u32 = 1_000_000;
    let t = Topology::standard();
    // Probes on y (the last uplink's table takes `extra`).
    let extra = "[uplink.health]\ntargets = [\"198.19.0.10\"]\ninterval_ms = 100\n\
                 timeout_ms = 90\ndown_after = 5\nup_after = 1\n\n[nat]\nmax_flows = 1048576\n";
    let config = config_for(&t, [1, 1], extra);
    let gw = Gateway::start_with_pin(
        &t.gw,
        &config,
        unique_pin_dir("mf"),
        &["--metrics", "127.0.0.1:9802"],
    );
    // A million established flows of one LAN host.
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime fills the timespec.
    assert_eq!(
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) },
        0
    );
    let now_ns = ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64;
    let data = MapData::from_pin(gw.pin_dir().join("CONN_FWD")).expect("pinned CONN_FWD");
    let mut fwd: HashMap<_, FlowKey, FlowFwd> =
        HashMap::try_from(aya::maps::Map::HashMap(data)).expect("CONN_FWD types");
    for i in 0..FLOWS {
        let key = FlowKey {
            saddr_be: u32::from(CLIENT_ADDR).to_be(),
            daddr_be: (0xc613_0000 | (i >> 16)).to_be(),
            sport_be: (i as u16).to_be(),
            dport_be: 443u16.to_be(),
            proto: 6,
            ..Default::default()
        };
        let value = FlowFwd {
            last_seen_ns: now_ns,
            nat_addr_be: u32::from(UPLINK_X_ADDR).to_be(),
            flags: FLOW_SEEN_REPLY,
            nat_port_be: (i as u16).to_be(),
            uplink: 0,
            ..Default::default()
        };
        fwd.insert(key, value, 0).expect("insert a flow");
    }
    t.inet.exec(&[
        "iptables",
        "-w",
        "-I",
        "INPUT",
        "-p",
        "icmp",
        "--icmp-type",
        "echo-request",
        "-s",
        "198.18.22.1",
    ]);
    let scraping = std::sync::atomic::AtomicBool::new(true);
    let (probes, scrapes) = std::thread::scope(|s| {
        let scraper = s.spawn(|| {
            let mut n = 0;
            while scraping.load(std::sync::atomic::Ordering::Relaxed) {
                let m = scrape(&t.gw, 9802);
                assert!(m.starts_with("HTTP/1.0 200 OK"), "{m}");
                n += 1;
            }
            n
        });
        std::thread::sleep(Duration::from_millis(500));
        let before = probes_seen(&t.inet, "198.18.22.1");
        std::thread::sleep(Duration::from_secs(4));
        let probes = probes_seen(&t.inet, "198.18.22.1") - before;
        scraping.store(false, std::sync::atomic::Ordering::Relaxed);
        (probes, scraper.join().expect("scraper"))
    });
    assert!(
        scrapes >= 2,
        "only {scrapes} scrapes: the walk did not happen"
    );
    // One probe per 100 ms round: 40 in 4 s; a stalled loop sends a few.
    assert!(
        probes >= 28,
        "{probes} probes in 4 s while scraping ({scrapes} scrapes)"
    );
    assert_eq!(gw.status()["uplinks"][1]["state"], "up", "y stayed up");
}

/// Under systemd (`Type=notify`) the daemon says READY=1 once it forwards,
/// and STOPPING=1 when it stops.
#[test]
fn the_daemon_tells_systemd_when_it_is_ready_and_when_it_stops() {
    let t = Topology::standard();
    let path = std::env::temp_dir().join(format!("mh-notify-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let sock = std::os::unix::net::UnixDatagram::bind(&path).expect("bind NOTIFY_SOCKET");
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let gw = Gateway::start_with_env(
        &t.gw,
        &config_for(&t, [1, 1], ""),
        unique_pin_dir("sd"),
        &[],
        &[("NOTIFY_SOCKET", path.to_str().expect("utf-8"))],
    );
    let mut buf = [0u8; 256];
    let n = sock.recv(&mut buf).expect("a notification");
    assert_eq!(String::from_utf8_lossy(&buf[..n]).trim(), "READY=1");
    assert!(
        gw.log().contains("ready:"),
        "READY=1 came before the daemon was ready"
    );
    drop(gw.stop());
    let n = sock.recv(&mut buf).expect("a notification");
    assert_eq!(String::from_utf8_lossy(&buf[..n]).trim(), "STOPPING=1");
    let _ = std::fs::remove_file(&path);
}
