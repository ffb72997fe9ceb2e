//! Passive health on real traffic: the LAN's own TCP SYNs, left
//! unanswered by a dead upstream, take an uplink out before its probes
//! notice; unanswered SYNs to firewalled remotes do not; an uplink taken
//! out by traffic alone comes back through a trial.
use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    time::{Duration, Instant},
};

use testbed::*;

/// Four remotes on the internet host, all served by one listener on
/// `port`.
fn remotes(t: &Topology, port: u16) -> Vec<SocketAddrV4> {
    more_remotes(t, 12..14);
    [10, 11, 12, 13]
        .map(|last| SocketAddrV4::new(Ipv4Addr::new(198, 19, 0, last), port))
        .to_vec()
}

/// Gives the internet host the addresses 198.19.0.`lasts`.
fn more_remotes(t: &Topology, lasts: std::ops::Range<u8>) {
    for last in lasts {
        t.inet.exec(&[
            "ip",
            "addr",
            "add",
            &format!("198.19.0.{last}/32"),
            "dev",
            "lo",
        ]);
    }
}

/// A TCP connection from the client, given `limit` to be answered.
fn connects(t: &Topology, to: SocketAddrV4, limit: Duration) -> bool {
    t.client
        .run(|| TcpStream::connect_timeout(&to.into(), limit))
        .is_ok()
}

/// x and y, each with `health` (probes of the internet server or none),
/// then `extra`.
fn config(t: &Topology, health_x: &str, extra: &str) -> String {
    let mut config = String::new();
    for part in config_for(t, [1, 1], "").split_inclusive("\n\n") {
        config += part;
        if part.contains("name = \"x\"") {
            config += health_x;
        }
    }
    config + extra
}

/// Probes every 5 s, three rounds to fail: 15 s before they could tell.
const SLOW_PROBES: &str = "\n[uplink.health]\ntargets = [\"198.19.0.10\"]\ninterval_ms = 5000\n\
                           timeout_ms = 1000\ndown_after = 3\nsyn_timeout_ms = 500\n";

#[test]
fn new_tcp_connections_leave_an_uplink_whose_upstream_died_before_its_probes_notice() {
    let t = Topology::standard();
    let gw = Gateway::start(&t.gw, &config(&t, SLOW_PROBES, ""));
    let srv = tcp_echo_server(&t.inet, Ipv4Addr::UNSPECIFIED, 0);
    let to = remotes(&t, srv.addr().port());
    for r in &to {
        assert!(connects(&t, *r, Duration::from_secs(2)), "{r} before");
    }
    std::thread::sleep(Duration::from_millis(600));

    t.ispx.exec(&[
        "iptables", "-w", "-I", "FORWARD", "-i", IF_CORE, "-j", "DROP",
    ]);
    let died = Instant::now();
    // Steady new connections, to every remote in turn: those through x
    // go unanswered until live traffic takes it out.
    eventually(Duration::from_millis(1500), "x out by live traffic", || {
        for r in &to {
            let _ = connects(&t, *r, Duration::from_millis(25));
        }
        gw.log().contains("uplink x: DOWN by live traffic")
    });
    let after = died.elapsed();
    for r in to.iter().cycle().take(8) {
        assert!(
            connects(&t, *r, Duration::from_secs(1)),
            "{r}: a new connection after {after:?} still went to x"
        );
    }
    let st = gw.status();
    assert_eq!(st["uplinks"][0]["state"], "down", "{st}");
    assert_eq!(st["uplinks"][1]["state"], "up", "{st}");
    assert!(
        st["uplinks"][0]["syns"].as_u64() > st["uplinks"][0]["synacks"].as_u64(),
        "{st}"
    );
    assert!(st["uplinks"][1]["syn_rtt_ms"].as_f64().is_some(), "{st}");
    assert!(!gw.log().contains("probes fail"), "{}", gw.log());
}

/// Four long-lived TCP sessions to the four remotes, all through x (y
/// has weight 0 while they open), each checked by an echo.
fn sessions_through_x(t: &Topology, gw: &Gateway, port: u16) -> Vec<TcpStream> {
    let weight = |w: &str| {
        let out = gw.cli(&["uplink", "set-weight", "y", w]);
        assert!(out.status.success(), "{out:?}");
    };
    weight("0");
    let sessions = remotes(t, port)
        .iter()
        .map(|r| {
            let mut s = t
                .client
                .run(|| TcpStream::connect_timeout(&(*r).into(), Duration::from_secs(2)))
                .expect("connect");
            s.set_read_timeout(Some(Duration::from_secs(2)))
                .expect("timeout");
            s.write_all(b"hello").expect("write");
            let mut buf = [0u8; 5];
            s.read_exact(&mut buf).expect("echoed");
            s
        })
        .collect();
    assert!(gw.conns().iter().all(|c| c["uplink"] == "x"));
    weight("1");
    sessions
}

#[test]
fn established_sessions_sending_data_again_take_an_uplink_whose_upstream_died_down_with_no_new_connection()
 {
    let t = Topology::standard();
    let gw = Gateway::start(&t.gw, &config(&t, SLOW_PROBES, ""));
    let srv = tcp_echo_server(&t.inet, Ipv4Addr::UNSPECIFIED, 0);
    let mut sessions = sessions_through_x(&t, &gw, srv.port());
    let syns = gw.status()["uplinks"][0]["syns"].clone();
    std::thread::sleep(Duration::from_millis(600));

    t.ispx.exec(&[
        "iptables", "-w", "-I", "FORWARD", "-i", IF_CORE, "-j", "DROP",
    ]);
    let died = Instant::now();
    // Each session sends once; its host sends the data again and again.
    for s in &mut sessions {
        s.write_all(&[1u8; 200]).expect("write");
    }
    eventually(Duration::from_secs(2), "x out by live traffic", || {
        gw.log().contains("uplink x: DOWN by live traffic")
    });
    let after = died.elapsed();
    let st = gw.status();
    assert_eq!(st["uplinks"][0]["syns"], syns, "no new connection: {st}");
    assert!(st["uplinks"][0]["retransmits"].as_u64() >= Some(3), "{st}");
    assert_eq!(st["uplinks"][0]["state"], "down", "after {after:?}: {st}");
    assert!(!gw.log().contains("probes fail"), "{}", gw.log());
}

#[test]
fn uploads_that_lose_a_tenth_of_their_segments_do_not_take_a_working_uplink_down() {
    let t = Topology::standard();
    let gw = Gateway::start(&t.gw, &config(&t, SLOW_PROBES, ""));
    let srv = tcp_echo_server(&t.inet, Ipv4Addr::UNSPECIFIED, 0);
    let mut sessions = sessions_through_x(&t, &gw, srv.port());
    // x's ISP drops one segment from the gateway in ten.
    t.ispx.exec(&[
        "iptables",
        "-w",
        "-I",
        "FORWARD",
        "-i",
        IF_CUST,
        "-m",
        "statistic",
        "--mode",
        "random",
        "--probability",
        "0.1",
        "-j",
        "DROP",
    ]);
    let start = Instant::now();
    let mut buf = [0u8; 1000];
    while start.elapsed() < Duration::from_secs(4) {
        for s in &mut sessions {
            s.write_all(&[2u8; 1000]).expect("write");
            s.read_exact(&mut buf).expect("echoed through the loss");
        }
    }
    let st = gw.status();
    assert!(st["uplinks"][0]["retransmits"].as_u64() >= Some(3), "{st}");
    assert_eq!(st["uplinks"][0]["state"], "up", "{st}");
    assert!(!gw.log().contains("DOWN by live traffic"), "{}", gw.log());
}

#[test]
fn syns_to_firewalled_hosts_do_not_take_a_working_uplink_down() {
    let t = Topology::standard();
    let gw = Gateway::start(&t.gw, &config(&t, SLOW_PROBES, ""));
    let srv = tcp_echo_server(&t.inet, Ipv4Addr::UNSPECIFIED, 0);
    let open = remotes(&t, srv.addr().port());
    // Four more remotes drop every SYN, as firewalled hosts do.
    more_remotes(&t, 20..24);
    t.inet.exec(&[
        "iptables",
        "-w",
        "-I",
        "INPUT",
        "-p",
        "tcp",
        "-d",
        "198.19.0.20/30",
        "-j",
        "DROP",
    ]);
    let closed: Vec<SocketAddrV4> = (20..24)
        .map(|last| SocketAddrV4::new(Ipv4Addr::new(198, 19, 0, last), srv.addr().port()))
        .collect();
    let start = Instant::now();
    let mut i = 0;
    while start.elapsed() < Duration::from_secs(3) {
        i += 1;
        let _ = connects(&t, closed[i % closed.len()], Duration::from_millis(50));
        assert!(connects(&t, open[i % open.len()], Duration::from_secs(1)));
    }
    assert!(!gw.log().contains("DOWN by live traffic"), "{}", gw.log());
    let st = gw.status();
    assert_eq!(st["uplinks"][0]["state"], "up", "{st}");
    assert_eq!(st["uplinks"][1]["state"], "up", "{st}");
}

#[test]
fn an_uplink_out_by_traffic_alone_goes_on_trial_with_a_share_of_new_flows_and_comes_back() {
    let t = Topology::standard();
    // No probes at all on x: only its traffic tells.
    let health = "\n[uplink.health]\nsyn_timeout_ms = 500\npassive_hold_ms = 3000\n";
    let gw = Gateway::start(&t.gw, &config(&t, health, ""));
    let srv = tcp_echo_server(&t.inet, Ipv4Addr::UNSPECIFIED, 0);
    let peer = udp_peer_server(&t.inet, INET_SERVICE2, 0);
    let to = remotes(&t, srv.addr().port());
    let upstream = ["FORWARD", "-i", IF_CORE, "-j", "DROP"];
    t.ispx
        .exec(&[&["iptables", "-w", "-I"][..], &upstream].concat());
    eventually(Duration::from_secs(3), "x out by live traffic", || {
        for r in &to {
            let _ = connects(&t, *r, Duration::from_millis(25));
        }
        gw.log().contains("uplink x: DOWN by live traffic")
    });
    // The upstream comes back while x is out; after the hold, a trial.
    t.ispx
        .exec(&[&["iptables", "-w", "-D"][..], &upstream].concat());
    eventually(Duration::from_secs(5), "x on trial", || {
        gw.status()["uplinks"][0]["state"] == "trial"
    });
    let mut on_x = 0;
    for _ in 0..80 {
        let seen = udp_seen_as(&t.client, None, peer.addr()).expect("UDP");
        on_x += usize::from(*seen.ip() == UPLINK_X_ADDR);
    }
    assert!((1..40).contains(&on_x), "{on_x} of 80 new flows on x");
    // Answered during the trial: back in full service at its end.
    for r in to.iter().cycle().take(8) {
        assert!(connects(&t, *r, Duration::from_secs(1)), "{r}");
    }
    eventually(Duration::from_secs(5), "x back in full service", || {
        gw.status()["uplinks"][0]["state"] == "up"
    });
    assert!(
        gw.log()
            .contains("uplink x: live traffic is answered again"),
        "{}",
        gw.log()
    );
}

#[test]
fn an_uplink_whose_syns_are_seldom_answered_is_degraded_and_keeps_its_pinned_flows() {
    let t = Topology::standard();
    let health = "\n[uplink.health]\nsyn_timeout_ms = 500\ndegraded_answered_pct = 80\n";
    let gw = Gateway::start(&t.gw, &config(&t, health, ""));
    let srv = tcp_echo_server(&t.inet, Ipv4Addr::UNSPECIFIED, 0);
    let peer = udp_peer_server(&t.inet, INET_SERVICE2, 0);
    let open = remotes(&t, srv.addr().port());
    // A session pinned to x before anything goes wrong.
    let mut pinned = None;
    for r in open.iter().cycle().take(40) {
        let c = t
            .client
            .run(|| TcpStream::connect_timeout(&(*r).into(), Duration::from_secs(1)))
            .expect("connect");
        let port = c.local_addr().expect("port").port();
        if gw
            .conns()
            .iter()
            .any(|f| f["sport"] == port && f["uplink"] == "x")
        {
            pinned = Some(c);
            break;
        }
    }
    let mut pinned = pinned.expect("a session on x");
    // x's ISP drops SYNs to four hosts that y reaches: half of x's SYNs
    // go unanswered, while it still answers the rest.
    more_remotes(&t, 20..24);
    t.ispx.exec(&[
        "iptables",
        "-w",
        "-I",
        "FORWARD",
        "-p",
        "tcp",
        "-d",
        "198.19.0.20/30",
        "-j",
        "DROP",
    ]);
    let mut i = 0;
    eventually(Duration::from_secs(10), "x degraded", || {
        i += 1;
        let closed = SocketAddrV4::new(
            Ipv4Addr::new(198, 19, 0, 20 + (i % 4) as u8),
            srv.addr().port(),
        );
        let _ = connects(&t, closed, Duration::from_millis(50));
        let _ = connects(&t, open[i % open.len()], Duration::from_secs(1));
        gw.status()["uplinks"][0]["state"] == "degraded"
    });
    assert!(!gw.log().contains("DOWN by live traffic"), "{}", gw.log());
    for _ in 0..20 {
        let seen = udp_seen_as(&t.client, None, peer.addr()).expect("UDP");
        assert_eq!(*seen.ip(), UPLINK_Y_ADDR, "a new flow on degraded x");
    }
    use std::io::{Read as _, Write as _};
    pinned.write_all(b"still?").expect("write");
    let mut buf = [0u8; 6];
    pinned
        .read_exact(&mut buf)
        .expect("the pinned session goes on");
    assert_eq!(&buf, b"still?");
}
