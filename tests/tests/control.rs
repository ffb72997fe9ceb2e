//! The control plane on real traffic: fallback tables for the gateway's
//! own traffic, shared-NIC routers, renumbering, links going down, and
//! restarts and reloads that lose no flow.
use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddrV4, TcpListener},
    time::{Duration, Instant},
};

use testbed::*;

fn flows_on(gw: &Gateway, uplink: &str) -> usize {
    gw.conns().iter().filter(|c| c["uplink"] == uplink).count()
}

#[test]
fn the_gateways_own_traffic_uses_each_uplinks_table_and_the_multipath_default() {
    let t = Topology::standard();
    let _gw = Gateway::start(&t.gw, &config_for(&t, [1, 1], ""));
    assert!(
        ping_from(&t.gw, UPLINK_X_ADDR, INET_SERVICE, 3),
        "ping -I X"
    );
    assert!(
        ping_from(&t.gw, UPLINK_Y_ADDR, INET_SERVICE, 3),
        "ping -I Y"
    );
    assert!(ping(&t.gw, INET_SERVICE, 3), "plain ping");

    // A server on the gateway answers through either uplink's address.
    let listener =
        t.gw.run(|| TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0)))
            .expect("listen");
    let port = listener.local_addr().expect("addr").port();
    let server = std::thread::spawn(move || {
        for _ in 0..2 {
            let (mut s, _) = listener.accept().expect("accept");
            s.write_all(b"gw\n").expect("write");
        }
    });
    for addr in [UPLINK_X_ADDR, UPLINK_Y_ADDR] {
        let mut s = tcp_connect(&t.inet, None, SocketAddrV4::new(addr, port))
            .unwrap_or_else(|e| panic!("connect to the gateway at {addr}: {e}"));
        let mut buf = String::new();
        s.read_to_string(&mut buf).expect("read");
        assert_eq!(buf, "gw\n");
    }
    server.join().expect("server");
    assert_eq!(t.spoofed_drops(), 0, "a reply left by the wrong uplink");
}

#[test]
fn shared_nic_routers_each_keep_their_own_flows() {
    let t = Topology::shared_nic();
    let _gw = Gateway::start(&t.gw, &config_for(&t, [1, 1], ""));
    let srv = udp_peer_server(&t.inet, INET_SERVICE, 0);
    let mut seen = std::collections::HashSet::new();
    for _ in 0..40 {
        let peer = udp_seen_as(&t.client, None, srv.addr()).expect("UDP over a shared NIC");
        seen.insert(*peer.ip());
    }
    assert_eq!(
        seen,
        [SHARED_X_ADDR, SHARED_Y_ADDR].into_iter().collect(),
        "both routers behind the one NIC carry flows"
    );
    let tcp = tcp_echo_server(&t.inet, INET_SERVICE, 0);
    let payload = vec![7u8; 256 << 10];
    for _ in 0..6 {
        assert_eq!(
            tcp_request(&t.client, tcp.addr(), &payload).expect("TCP"),
            payload
        );
    }
    assert_eq!(t.spoofed_drops(), 0, "a router got the other one's flow");
}

/// The byte at `i` of a test download.
fn pattern(i: usize) -> u8 {
    (i as u32).wrapping_mul(2_654_435_761).rotate_left(7) as u8
}

/// A TCP server in `ns` that tells each client the peer it sees (a line),
/// then sends it `len` bytes of [`pattern`] and closes.
fn download_server(ns: &NetNs, len: usize) -> SocketAddrV4 {
    let listener = ns
        .run(|| TcpListener::bind((INET_SERVICE, 0)))
        .expect("bind the download server");
    let addr = match listener.local_addr().expect("address") {
        std::net::SocketAddr::V4(a) => a,
        a => panic!("{a}"),
    };
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut c) = conn else { return };
            std::thread::spawn(move || {
                let peer = c.peer_addr().expect("peer");
                let _ = c.write_all(format!("{peer}\n").as_bytes());
                let body: Vec<u8> = (0..len).map(pattern).collect();
                let _ = c.write_all(&body);
            });
        }
    });
    addr
}

#[test]
fn the_seeds_one_address_shared_nic_spreads_over_both_routers_and_downloads_arrive_intact() {
    one_address_shared_nic(false);
}

#[test]
fn the_seeds_one_address_shared_nic_works_with_checksum_offloads_on() {
    one_address_shared_nic(true);
}

fn one_address_shared_nic(offloads: bool) {
    let t = Topology::shared_address();
    if offloads {
        t.enable_checksum_offloads();
    }
    // Exactly as the seed writes it: one NIC, one address, two gateways.
    let config = format!(
        "lan = [\"{IF_LAN}\"]\n\n[[uplink]]\nname = \"x\"\ninterface = \"{IF_WAN0}\"\n\
         gateway = \"{SHARED_X_GW}\"\n\n[[uplink]]\nname = \"y\"\ninterface = \"{IF_WAN0}\"\n\
         gateway = \"{SHARED_Y_GW}\"\n"
    );
    let gw = Gateway::start(&t.gw, &config);
    let s = gw.status();
    for u in s["uplinks"].as_array().expect("uplinks") {
        assert_eq!(u["state"], "up", "{s}");
        assert_eq!(u["address"], SHARED_X_ADDR.to_string(), "{s}");
    }
    // UDP: spread over both routers, each flow staying on its router.
    let udp = udp_peer_server(&t.inet, INET_SERVICE, 0);
    let mut routers = std::collections::HashSet::new();
    for _ in 0..12 {
        let sock = t
            .client
            .run(|| std::net::UdpSocket::bind((CLIENT_ADDR, 0)))
            .expect("bind");
        let first = udp_seen_from(&sock, udp.addr()).expect("UDP over a shared address");
        for _ in 0..3 {
            assert_eq!(udp_seen_from(&sock, udp.addr()).expect("again"), first);
        }
        routers.insert(*first.ip());
    }
    assert_eq!(
        routers,
        [ISPX_CORE, ISPY_CORE].into(),
        "both routers carry UDP"
    );
    // TCP: a 20 MB download through each router, byte for byte.
    const LEN: usize = 20 << 20;
    let server = download_server(&t.inet, LEN);
    let mut done = std::collections::HashSet::new();
    for _ in 0..24 {
        if done.len() == 2 {
            break;
        }
        let mut c = tcp_connect(&t.client, None, server).expect("connect");
        c.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        let mut all = Vec::with_capacity(LEN + 32);
        c.read_to_end(&mut all).expect("the download");
        let nl = all.iter().position(|b| *b == b'\n').expect("the peer line");
        let peer: SocketAddrV4 = std::str::from_utf8(&all[..nl])
            .expect("utf-8")
            .parse()
            .expect("a peer address");
        let body = &all[nl + 1..];
        assert_eq!(body.len(), LEN, "through {peer}");
        assert!(
            body.iter().enumerate().all(|(i, b)| *b == pattern(i)),
            "through {peer}: corrupted"
        );
        done.insert(*peer.ip());
    }
    assert_eq!(
        done,
        [ISPX_CORE, ISPY_CORE].into(),
        "a download through each router"
    );
    // The gateway's own traffic from the address: a multipath table over
    // both routers.
    let rules = t.gw.exec_stdout(&["ip", "rule"]);
    let table = rules
        .lines()
        .find(|l| l.contains(&format!("from {SHARED_X_ADDR} lookup")))
        .and_then(|l| l.split_whitespace().skip_while(|w| *w != "lookup").nth(1))
        .unwrap_or_else(|| panic!("no rule for the shared address:\n{rules}"))
        .to_owned();
    let routes = t.gw.exec_stdout(&["ip", "route", "show", "table", &table]);
    assert!(
        routes.contains(&format!("via {SHARED_X_GW}"))
            && routes.contains(&format!("via {SHARED_Y_GW}")),
        "table {table}:\n{routes}"
    );
    assert!(
        ping_from(&t.gw, SHARED_X_ADDR, INET_SERVICE, 2),
        "the gateway's own ping"
    );
    assert_eq!(t.foreign_sources(), 0);
}

#[test]
fn a_renumbered_uplink_purges_only_its_own_flows_and_new_flows_use_the_new_address() {
    let t = Topology::standard();
    let gw = Gateway::start(&t.gw, &config_for(&t, [1, 1], ""));
    let srv = udp_peer_server(&t.inet, INET_SERVICE, 0);
    for _ in 0..30 {
        udp_seen_as(&t.client, None, srv.addr()).expect("UDP");
    }
    let y_before = flows_on(&gw, "y");
    assert!(flows_on(&gw, "x") > 0 && y_before > 0);

    let new_x = Ipv4Addr::new(198, 18, 11, 7);
    // As a DHCP client renumbers: the old address goes, a new one comes.
    t.gw.exec(&["ip", "addr", "del", "198.18.11.1/24", "dev", IF_WANX]);
    t.gw.exec(&["ip", "addr", "add", "198.18.11.7/24", "dev", IF_WANX]);
    eventually(Duration::from_secs(5), "x's old flows purged", || {
        gw.conns()
            .iter()
            .all(|c| c["nat_addr"] != UPLINK_X_ADDR.to_string())
    });
    assert_eq!(flows_on(&gw, "y"), y_before, "y's flows were touched");
    eventually(Duration::from_secs(3), "x up with its new address", || {
        let x = &gw.status()["uplinks"][0];
        x["state"] == "up" && x["address"] == new_x.to_string()
    });
    let mut seen_new = false;
    for _ in 0..30 {
        let peer = udp_seen_as(&t.client, None, srv.addr()).expect("UDP after renumbering");
        assert_ne!(*peer.ip(), UPLINK_X_ADDR, "the old address is still in use");
        seen_new |= *peer.ip() == new_x;
    }
    assert!(seen_new, "no flow used x's new address");
    assert_eq!(t.spoofed_drops(), 0);
}

#[test]
fn a_downed_uplink_takes_no_new_flows_and_comes_back_when_up() {
    let t = Topology::standard();
    let gw = Gateway::start(&t.gw, &config_for(&t, [1, 1], ""));
    let srv = udp_peer_server(&t.inet, INET_SERVICE, 0);
    link_down(&t.gw, IF_WANX);
    eventually(Duration::from_secs(3), "x marked down", || {
        gw.status()["uplinks"][0]["state"] != "up"
    });
    for _ in 0..20 {
        let peer = udp_seen_as(&t.client, None, srv.addr()).expect("flows fail over to y");
        assert_eq!(*peer.ip(), UPLINK_Y_ADDR);
    }
    link_up(&t.gw, IF_WANX);
    eventually(Duration::from_secs(5), "x back up", || {
        gw.status()["uplinks"][0]["state"] == "up"
    });
    eventually(Duration::from_secs(10), "x takes new flows again", || {
        udp_seen_as(&t.client, None, srv.addr()).is_ok_and(|p| *p.ip() == UPLINK_X_ADDR)
    });
}

#[test]
fn with_every_uplink_unusable_new_flows_take_one_whose_link_is_up() {
    let t = Topology::standard();
    // y's probes ask a target that never answers: y is unusable but its
    // link and ISP work.
    let health = "[uplink.health]\ntargets = [\"198.19.0.99\"]\ninterval_ms = 200\n\
                  timeout_ms = 150\ndown_after = 2\nup_after = 2\n";
    let gw = Gateway::start(&t.gw, &config_for(&t, [1, 1], health));
    let srv = udp_peer_server(&t.inet, INET_SERVICE, 0);
    link_down(&t.gw, IF_WANX);
    eventually(Duration::from_secs(5), "both uplinks unusable", || {
        let s = gw.status();
        s["uplinks"][0]["state"] != "up" && s["uplinks"][1]["state"] != "up"
    });
    assert!(gw.log().contains("NO UPLINK IS USABLE"), "{}", gw.log());
    for _ in 0..10 {
        let peer = udp_seen_as(&t.client, None, srv.addr())
            .expect("the LAN stays online through the uplink whose link is up");
        assert_eq!(*peer.ip(), UPLINK_Y_ADDR);
    }
}

#[test]
fn too_many_lan_prefixes_at_runtime_do_not_keep_the_routing_from_following_the_uplinks() {
    let t = Topology::standard();
    let gw = Gateway::start(&t.gw, &config_for(&t, [1, 1], ""));
    // The LAN interface gains more subnets than LAN_NETS holds.
    for i in 0..16 {
        t.gw.exec(&[
            "ip",
            "addr",
            "add",
            &format!("198.18.{}.1/24", 100 + i),
            "dev",
            IF_LAN,
        ]);
    }
    eventually(Duration::from_secs(3), "the refusal is logged", || {
        gw.log().contains("17 LAN prefixes; at most 16 fit")
    });
    link_down(&t.gw, IF_WANX);
    eventually(
        Duration::from_secs(3),
        "main's default follows x going down",
        || {
            let main =
                t.gw.exec_stdout(&["ip", "route", "show", "table", "main", "proto", "77"]);
            !main.contains(IF_WANX) && main.contains(IF_WANY)
        },
    );
}

/// A UDP socket of the client whose flow is on the uplink with `addr`, and
/// the public address and port the server sees.
fn udp_on(t: &Topology, srv: SocketAddrV4, addr: Ipv4Addr) -> (std::net::UdpSocket, SocketAddrV4) {
    loop {
        let s = t
            .client
            .run(|| std::net::UdpSocket::bind((CLIENT_ADDR, 0)))
            .expect("bind");
        let seen = udp_seen_from(&s, srv).expect("UDP");
        if *seen.ip() == addr {
            return (s, seen);
        }
    }
}

#[test]
fn losing_carrier_moves_the_uplinks_udp_flows_once_confirmed_and_a_short_flap_moves_nothing() {
    let t = Topology::standard();
    // No [uplink.health]: carrier alone takes x down.
    let gw = Gateway::start(&t.gw, &config_for(&t, [1, 1], ""));
    let srv = udp_peer_server(&t.inet, INET_SERVICE, 0);
    let (sx, seen_x) = udp_on(&t, srv.addr(), UPLINK_X_ADDR);
    // A flap shorter than confirm_ms (1 s): the flow keeps its mapping.
    link_down(&t.gw, IF_WANX);
    eventually(Duration::from_secs(2), "x down", || {
        gw.status()["uplinks"][0]["state"] != "up"
    });
    link_up(&t.gw, IF_WANX);
    eventually(Duration::from_secs(3), "x up", || {
        gw.status()["uplinks"][0]["state"] == "up"
    });
    std::thread::sleep(Duration::from_millis(1200));
    assert!(
        gw.log().contains("back before its flows were moved"),
        "{}",
        gw.log()
    );
    assert_eq!(
        udp_seen_from(&sx, srv.addr()).expect("after the flap"),
        seen_x
    );
    // Carrier lost for good: after confirm_ms the UDP flow moves to y on
    // its next packet, which is not lost.
    link_down(&t.gw, IF_WANX);
    eventually(Duration::from_secs(4), "x's flows set to move", || {
        gw.log().contains("uplink x: down for")
    });
    let moved = udp_seen_from(&sx, srv.addr()).expect("the flow moved");
    assert_eq!(*moved.ip(), UPLINK_Y_ADDR);
    assert_eq!(gw.reason("evacuated"), 1);
    assert_eq!(t.spoofed_drops(), 0);
}

#[test]
fn an_uplink_back_from_a_flap_is_held_down_for_hold_down_ms() {
    let t = Topology::standard();
    let health = "[uplink.health]\ntargets = [\"198.19.0.10\"]\ninterval_ms = 200\n\
                  timeout_ms = 150\ndown_after = 2\nup_after = 1\nhold_down_ms = 2000\n";
    let gw = Gateway::start(&t.gw, &config_for(&t, [1, 1], health));
    let srv = udp_peer_server(&t.inet, INET_SERVICE, 0);
    link_down(&t.gw, IF_WANY);
    eventually(Duration::from_secs(2), "y down", || {
        gw.status()["uplinks"][1]["state"] != "up"
    });
    link_up(&t.gw, IF_WANY);
    let back = Instant::now();
    eventually(Duration::from_secs(2), "y held down", || {
        gw.status()["uplinks"][1]["reason"] == "held down after an outage (hold_down_ms)"
    });
    for _ in 0..10 {
        let peer = udp_seen_as(&t.client, None, srv.addr()).expect("UDP while y is held");
        assert_eq!(
            *peer.ip(),
            UPLINK_X_ADDR,
            "a held-down uplink takes no flows"
        );
    }
    eventually(Duration::from_secs(4), "y back in use", || {
        gw.status()["uplinks"][1]["state"] == "up"
    });
    let held = back.elapsed();
    assert!(
        held >= Duration::from_millis(1800),
        "held for only {held:?}"
    );
}

#[test]
fn tcp_sessions_on_a_dead_uplink_are_reset_at_their_next_segment() {
    sessions_on_a_dead_uplink_are_reset(false);
}

#[test]
fn tcp_sessions_on_a_dead_uplink_are_reset_with_checksum_offloads_on() {
    sessions_on_a_dead_uplink_are_reset(true);
}

/// A TCP session of the client with the echo server `srv` on x, and one
/// on y, each having exchanged a first segment.
fn sessions_on_each(t: &Topology, gw: &Gateway, srv: SocketAddrV4) -> [std::net::TcpStream; 2] {
    let mut on = std::collections::HashMap::new();
    for _ in 0..40 {
        if on.len() == 2 {
            break;
        }
        let mut c = tcp_connect(&t.client, None, srv).expect("connect");
        c.write_all(b"hi").expect("write");
        c.read_exact(&mut [0u8; 2]).expect("echo");
        let port = c.local_addr().expect("port").port();
        let uplink = gw
            .conns()
            .iter()
            .find(|f| f["sport"] == port)
            .map(|f| f["uplink"].as_str().expect("name").to_owned())
            .expect("its flow");
        on.entry(uplink).or_insert(c);
    }
    [on.remove("x").expect("on x"), on.remove("y").expect("on y")]
}

/// Waits for an idle session's read to fail with a reset, within `limit`.
fn reset_within(c: &mut std::net::TcpStream, limit: Duration, what: &str) {
    let start = Instant::now();
    c.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let err = c
        .read(&mut [0u8; 16])
        .expect_err("the session is ended, not left hanging");
    assert_eq!(
        err.kind(),
        std::io::ErrorKind::ConnectionReset,
        "{what}: {err}"
    );
    assert!(
        start.elapsed() < limit,
        "{what}: after {:?}",
        start.elapsed()
    );
}

/// A session that only receives sends nothing the datapath could answer:
/// the gateway's challenge SYN makes the host send one (RFC 5961), which
/// is answered with the RST.
#[test]
fn an_idle_receive_only_tcp_session_on_a_dead_uplink_is_reset_within_a_second() {
    let t = Topology::standard();
    let gw = Gateway::start(&t.gw, &with_health(&t, &["x"], "2", "reset"));
    let srv = tcp_echo_server(&t.inet, INET_SERVICE, 0);
    let [mut cx, mut cy] = sessions_on_each(&t, &gw, srv.addr());
    t.ispx.exec(&[
        "iptables", "-w", "-I", "FORWARD", "-i", IF_CORE, "-j", "DROP",
    ]);
    eventually(Duration::from_secs(4), "x's outage acted on", || {
        gw.log().contains("uplink x: down for")
    });
    // The client sends nothing: it only waits for data.
    reset_within(
        &mut cx,
        Duration::from_millis(1500),
        "the idle session on x",
    );
    // Logged after the SYNs went, on the daemon's thread: the reset they
    // provoked may come first.
    eventually(Duration::from_secs(2), "the challenge SYNs logged", || {
        gw.log().contains("challenge SYNs")
    });
    assert!(gw.reason("tcp_reset") >= 1);
    // The SYNs, sent from the remotes' addresses, went to the LAN only.
    assert_eq!(t.foreign_sources(), 0);
    let mut buf = [0u8; 6];
    cy.write_all(b"and y?").expect("write");
    cy.read_exact(&mut buf).expect("the session on y goes on");
    assert_eq!(&buf, b"and y?");
}

/// `drain --reset`: every flow of the drained uplink is reset (TCP, idle
/// ones included, whatever their policy's `on_down`) or moved (UDP), and
/// no flow of the other uplink is touched.
#[test]
fn drain_reset_ends_every_flow_of_the_uplink_and_touches_no_other() {
    let t = Topology::standard();
    // `keep` everywhere: only --reset can end these flows.
    let gw = Gateway::start(&t.gw, &with_health(&t, &["x", "y"], "2", "keep"));
    let echo = tcp_echo_server(&t.inet, INET_SERVICE, 0);
    let peer = udp_peer_server(&t.inet, INET_SERVICE2, 0);
    let [mut cx, mut cy] = sessions_on_each(&t, &gw, echo.addr());
    let (ux, _) = udp_on(&t, peer.addr(), UPLINK_X_ADDR);
    let (uy, seen_y) = udp_on(&t, peer.addr(), UPLINK_Y_ADDR);

    let out = gw.cli(&["uplink", "drain", "x", "--reset"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    reset_within(
        &mut cx,
        Duration::from_millis(1500),
        "the idle session on x",
    );
    assert_eq!(
        *udp_seen_from(&ux, peer.addr()).expect("UDP on x").ip(),
        UPLINK_Y_ADDR,
        "x's UDP flow moved at its next packet"
    );
    assert_eq!(udp_seen_from(&uy, peer.addr()).expect("UDP on y"), seen_y);
    let mut buf = [0u8; 6];
    cy.write_all(b"and y?").expect("write");
    cy.read_exact(&mut buf).expect("the session on y goes on");
    assert_eq!(&buf, b"and y?");
    assert_eq!(t.foreign_sources(), 0);

    // Undrained, x takes new flows again.
    let out = gw.cli(&["uplink", "undrain", "x"]);
    assert!(out.status.success());
    eventually(Duration::from_secs(5), "a new flow on x", || {
        udp_seen_as(&t.client, None, peer.addr()).is_ok_and(|s| *s.ip() == UPLINK_X_ADDR)
    });
}

/// x's upstream dies while its modem still answers; the default `on_down`
/// ("reset") answers the next segment of each TCP session on x with an
/// RST, and sessions on y see no gap.
fn sessions_on_a_dead_uplink_are_reset(offloads: bool) {
    let t = Topology::standard();
    if offloads {
        t.enable_checksum_offloads();
    }
    let health = "[uplink.health]\ntargets = [\"198.19.0.10\"]\ninterval_ms = 200\n\
                  timeout_ms = 150\ndown_after = 2\nup_after = 2\n";
    let config = config_for(&t, [1, 1], "").replacen(
        "\n\n[[uplink]]\nname = \"y\"",
        &format!("\n{health}\n[[uplink]]\nname = \"y\""),
        1,
    );
    let gw = Gateway::start(&t.gw, &config);
    let srv = tcp_echo_server(&t.inet, INET_SERVICE, 0);
    let [mut cx, mut cy] = sessions_on_each(&t, &gw, srv.addr());
    let upstream = ["FORWARD", "-i", IF_CORE, "-j", "DROP"];
    t.ispx
        .exec(&[&["iptables", "-w", "-I"][..], &upstream].concat());
    eventually(Duration::from_secs(4), "x's outage confirmed", || {
        gw.log().contains("uplink x: down for")
    });
    // The session learns at its next segment, or sooner from the
    // gateway's challenge SYN (see the receive-only test).
    let sent = Instant::now();
    let mut buf = [0u8; 16];
    let err = match cx.write_all(b"still there?") {
        Err(e) => e,
        Ok(()) => cx.read(&mut buf).expect_err("the session on x is reset"),
    };
    assert!(
        matches!(
            err.kind(),
            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
        ),
        "{err}"
    );
    assert!(
        sent.elapsed() < Duration::from_secs(1),
        "{:?}",
        sent.elapsed()
    );
    assert!(gw.reason("tcp_reset") >= 1);
    cy.write_all(b"and y?").expect("write");
    cy.read_exact(&mut buf[..6])
        .expect("the session on y goes on");
    assert_eq!(&buf[..6], b"and y?");
    assert_eq!(t.spoofed_drops(), 0);
}

#[test]
fn with_every_uplink_down_for_a_while_nothing_is_moved() {
    let t = Topology::standard();
    let gw = Gateway::start(&t.gw, &config_for(&t, [1, 1], ""));
    let srv = udp_peer_server(&t.inet, INET_SERVICE, 0);
    let (sx, seen_x) = udp_on(&t, srv.addr(), UPLINK_X_ADDR);
    let (sy, seen_y) = udp_on(&t, srv.addr(), UPLINK_Y_ADDR);
    link_down(&t.gw, IF_WANX);
    link_down(&t.gw, IF_WANY);
    eventually(Duration::from_secs(2), "both down", || {
        let s = gw.status();
        s["uplinks"][0]["state"] != "up" && s["uplinks"][1]["state"] != "up"
    });
    // Well past confirm_ms, with no other uplink to move to.
    std::thread::sleep(Duration::from_secs(3));
    link_up(&t.gw, IF_WANX);
    link_up(&t.gw, IF_WANY);
    eventually(Duration::from_secs(5), "both up", || {
        let s = gw.status();
        s["uplinks"][0]["state"] == "up" && s["uplinks"][1]["state"] == "up"
    });
    assert!(!gw.log().contains("down for"), "{}", gw.log());
    assert_eq!(udp_seen_from(&sx, srv.addr()).expect("x's flow"), seen_x);
    assert_eq!(udp_seen_from(&sy, srv.addr()).expect("y's flow"), seen_y);
}

#[test]
fn a_tcp_connection_survives_a_daemon_restart_and_a_weight_reload() {
    let t = Topology::standard();
    let config = config_for(&t, [1, 1], "");
    let gw = Gateway::start_with_pin(&t.gw, &config, unique_pin_dir("rs"), &["--keep-on-exit"]);
    let srv = tcp_echo_server(&t.inet, INET_SERVICE, 0);
    let mut conn = tcp_connect(&t.client, None, srv.addr()).expect("connect");
    let mut echo = |round: &str| {
        let msg = format!("round {round}\n");
        conn.write_all(msg.as_bytes()).expect("write");
        let mut buf = vec![0u8; msg.len()];
        conn.read_exact(&mut buf)
            .unwrap_or_else(|e| panic!("{round}: the connection broke: {e}"));
        assert_eq!(buf, msg.as_bytes());
    };
    echo("before");
    // SETTINGS, flow hash seed included, as bytes.
    let settings = |gw: &Gateway| {
        let path = gw.pin_dir().join("SETTINGS");
        t.gw.exec_stdout(&[
            "bpftool",
            "map",
            "dump",
            "pinned",
            path.to_str().expect("utf-8"),
        ])
    };
    let settings_before = settings(&gw);
    let pin = gw.stop();
    echo("with the daemon stopped (--keep-on-exit)");
    let gw = Gateway::start_with_pin(&t.gw, &config, pin, &[]);
    assert!(
        gw.log().contains("adopted"),
        "the new run did not adopt the maps"
    );
    echo("after the restart");
    assert_eq!(gw.conns().len(), 1, "the flow was not kept");
    assert_eq!(
        settings(&gw),
        settings_before,
        "the flow hash seed survives a restart, so lost flows map back alike"
    );

    write_config(gw.config_path(), config_for(&t, [0, 3], "")).expect("new weights");
    gw.signal(libc::SIGHUP);
    eventually(Duration::from_secs(5), "weights reloaded", || {
        gw.status()["uplinks"][1]["weight"] == 3
    });
    echo("after the reload");
    let udp = udp_peer_server(&t.inet, INET_SERVICE, 0);
    for _ in 0..10 {
        let peer = udp_seen_as(&t.client, None, udp.addr()).expect("UDP");
        assert_eq!(*peer.ip(), UPLINK_Y_ADDR, "x has weight 0 now");
    }
    assert_eq!(t.spoofed_drops(), 0);
}

/// The uplink sections of `config`, in the order of `names` (others left
/// out).
fn with_uplinks(config: &str, names: &[&str]) -> String {
    let mut parts = config.split("\n[[uplink]]\n");
    let mut out = parts.next().expect("the head").to_owned();
    let sections: Vec<&str> = parts.collect();
    for n in names {
        let s = sections
            .iter()
            .find(|s| s.starts_with(&format!("name = {n:?}\n")))
            .expect("a section of that name");
        out += "\n[[uplink]]\n";
        out += s;
        if !s.ends_with('\n') {
            out += "\n";
        }
    }
    out
}

#[test]
fn a_restart_under_a_changed_config_keeps_each_uplinks_flows_its_own() {
    let t = Topology::standard();
    let config = config_for(&t, [1, 1], "");
    let srv = udp_peer_server(&t.inet, INET_SERVICE, 0);
    let gw = Gateway::start_with_pin(&t.gw, &config, unique_pin_dir("ad"), &["--keep-on-exit"]);
    // A socket whose flow is on x and one on y.
    let (sx, seen_x) = udp_on(&t, srv.addr(), UPLINK_X_ADDR);
    let (sy, seen_y) = udp_on(&t, srv.addr(), UPLINK_Y_ADDR);
    let cfg_path = gw.config_path().to_owned();
    let restart = |gw: Gateway, config: &str, what: &str| {
        let pin = gw.stop();
        write_config(&cfg_path, config).expect("write the config");
        let gw = Gateway::start_with_pin(&t.gw, config, pin, &["--keep-on-exit"]);
        assert!(gw.log().contains("adopted"), "{what}: {}", gw.log());
        gw
    };

    // Reordered: each uplink keeps its slot, its flows their mapping.
    let gw = restart(gw, &with_uplinks(&config, &["y", "x"]), "reorder");
    assert_eq!(udp_seen_from(&sx, srv.addr()).expect("x's flow"), seen_x);
    assert_eq!(udp_seen_from(&sy, srv.addr()).expect("y's flow"), seen_y);
    assert!(gw.log().contains("keeps slot"), "{}", gw.log());

    // y removed: its slot is cleared, its flows purged, x's untouched.
    let gw = restart(gw, &with_uplinks(&config, &["x"]), "removal");
    let names: Vec<_> = gw.status()["uplinks"]
        .as_array()
        .expect("uplinks")
        .iter()
        .map(|u| u["name"].clone())
        .collect();
    assert_eq!(names, ["x"], "the removed uplink's slot was cleared");
    let stats = gw.pin_dir().join("UPLINK_STATS");
    let y_stats = t.gw.exec_stdout(&[
        "bpftool",
        "-j",
        "map",
        "lookup",
        "pinned",
        stats.to_str().expect("utf-8"),
        "key",
        "1",
        "0",
        "0",
        "0",
    ]);
    let y_stats: serde_json::Value = serde_json::from_str(&y_stats).expect("bpftool JSON");
    // Every counter of slot 1 on every CPU: all bytes zero.
    let all_zero = y_stats["values"]
        .as_array()
        .expect("per-CPU values")
        .iter()
        .flat_map(|v| v["value"].as_array().expect("bytes").clone())
        .all(|b| b == "0x00");
    assert!(
        all_zero,
        "the removed uplink's counters were cleared: {y_stats}"
    );
    assert!(
        gw.conns().iter().all(|c| c["uplink"] == "x"),
        "{:?}",
        gw.conns()
    );
    assert_eq!(udp_seen_from(&sx, srv.addr()).expect("x's flow"), seen_x);
    assert_eq!(
        *udp_seen_from(&sy, srv.addr()).expect("y's flow moves").ip(),
        UPLINK_X_ADDR
    );

    // Renumbered while stopped: x's old flows are purged at start.
    let pin = gw.stop();
    t.gw.exec(&["ip", "addr", "del", "198.18.11.1/24", "dev", IF_WANX]);
    t.gw.exec(&["ip", "addr", "add", "198.18.11.7/24", "dev", IF_WANX]);
    let gw = Gateway::start_with_pin(
        &t.gw,
        &with_uplinks(&config, &["x"]),
        pin,
        &["--keep-on-exit"],
    );
    eventually(
        Duration::from_secs(3),
        "x's old flows purged at start",
        || gw.log().contains("address 198.18.11.1 gone; purged its"),
    );
    assert!(
        gw.conns().iter().all(|c| c["nat_addr"] != "198.18.11.1"),
        "{:?}",
        gw.conns()
    );
    assert_eq!(
        *udp_seen_from(&sx, srv.addr())
            .expect("x's flow on the new address")
            .ip(),
        Ipv4Addr::new(198, 18, 11, 7)
    );

    // y added back: a new uplink in a free slot, taking new flows.
    let gw = restart(gw, &config, "addition");
    eventually(Duration::from_secs(5), "y takes new flows", || {
        udp_seen_as(&t.client, None, srv.addr()).is_ok_and(|p| *p.ip() == UPLINK_Y_ADDR)
    });
    drop(gw);
    assert_eq!(t.spoofed_drops(), 0);
    assert_eq!(t.foreign_sources(), 0);
}

/// A config (weights 1, 1) whose uplinks `probed` have health probes of
/// the internet server every 200 ms, `down_after` rounds to fail, with
/// `on_down` and `on_up = "return"`.
fn with_health(t: &Topology, probed: &[&str], down_after: &str, on_down: &str) -> String {
    let health = format!(
        "\n[uplink.health]\ntargets = [\"198.19.0.10\"]\ninterval_ms = 200\ntimeout_ms = 150\n\
         down_after = {down_after}\nup_after = 2\non_down = \"{on_down}\"\non_up = \"return\"\n"
    );
    let mut config = String::new();
    for part in config_for(t, [1, 1], "").split_inclusive("\n\n") {
        config += part;
        if probed
            .iter()
            .any(|n| part.contains(&format!("name = {n:?}")))
        {
            config += &health;
        }
    }
    config
}

#[test]
fn failing_probes_take_an_uplink_out_within_the_stated_time_and_it_returns() {
    let t = Topology::standard();
    let config = with_health(&t, &["x", "y"], "3", "purge");
    let gw = Gateway::start(&t.gw, &config);
    let srv = udp_peer_server(&t.inet, INET_SERVICE, 0);
    // One socket pinned to x, kept across the failure.
    let sock = loop {
        let s = t
            .client
            .run(|| std::net::UdpSocket::bind((CLIENT_ADDR, 0)))
            .expect("bind");
        s.connect(srv.addr()).expect("connect");
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .expect("timeout");
        s.send(b"?").expect("send");
        let mut buf = [0u8; 64];
        let n = s.recv(&mut buf).expect("reply");
        if std::str::from_utf8(&buf[..n])
            .expect("utf-8")
            .starts_with("198.18.11.1:")
        {
            break s;
        }
    };

    for _ in 0..10 {
        udp_seen_as(&t.client, None, srv.addr()).expect("UDP");
    }
    let y_flows = gw.conns().iter().filter(|c| c["uplink"] == "y").count();
    assert!(y_flows > 0);

    // ISP X loses its upstream; the link to the gateway stays up, as a
    // modem's would.
    let upstream = ["FORWARD", "-i", IF_CORE, "-j", "DROP"];
    let failed_at = Instant::now();
    t.ispx
        .exec(&[&["iptables", "-w", "-I"][..], &upstream].concat());
    eventually(Duration::from_secs(3), "x down by its probes", || {
        gw.status()["uplinks"][0]["state"] == "down"
    });
    // 3 rounds of 200 ms (replies wait 150 ms), plus the refresh.
    assert!(
        failed_at.elapsed() < Duration::from_millis(2500),
        "{:?}",
        failed_at.elapsed()
    );
    assert_eq!(gw.status()["uplinks"][0]["reason"], "health probes fail");
    // on_down acts once x has stayed down for confirm_ms (1 s): x's flows
    // move on their next packet.
    eventually(Duration::from_secs(3), "x's flows set to move", || {
        gw.log().contains("uplink x: down for")
    });
    assert_eq!(
        gw.conns().iter().filter(|c| c["uplink"] == "y").count(),
        y_flows,
        "the outage touched y's flows"
    );
    // `on_down = "purge"`: the pinned UDP flow reselects and keeps working.
    let mut buf = [0u8; 64];
    sock.send(b"?").expect("send");
    let n = sock.recv(&mut buf).expect("the failed-over flow answers");
    assert!(
        std::str::from_utf8(&buf[..n])
            .expect("utf-8")
            .starts_with("198.18.22.1:")
    );
    for _ in 0..10 {
        let peer = udp_seen_as(&t.client, None, srv.addr()).expect("new flows use y");
        assert_eq!(*peer.ip(), UPLINK_Y_ADDR);
    }

    t.ispx
        .exec(&[&["iptables", "-w", "-D"][..], &upstream].concat());
    eventually(Duration::from_secs(5), "x back by its probes", || {
        gw.status()["uplinks"][0]["state"] == "up"
    });
    eventually(
        Duration::from_secs(2),
        "failed-over flows moved back",
        || gw.log().contains("moved back failed-over"),
    );
    eventually(Duration::from_secs(10), "x takes new flows again", || {
        udp_seen_as(&t.client, None, srv.addr()).is_ok_and(|p| *p.ip() == UPLINK_X_ADDR)
    });
    assert_eq!(t.spoofed_drops(), 0);
}

/// 24 new UDP sockets of the client, each with a flow to `srv` made while
/// x is out: all on y.
fn udp_flows_during_outage(t: &Topology, srv: SocketAddrV4) -> Vec<std::net::UdpSocket> {
    (0..24)
        .map(|_| {
            let s = t
                .client
                .run(|| std::net::UdpSocket::bind((CLIENT_ADDR, 0)))
                .expect("bind");
            let seen = udp_seen_from(&s, srv).expect("UDP during the outage");
            assert_eq!(*seen.ip(), UPLINK_Y_ADDR);
            s
        })
        .collect()
}

#[test]
fn on_up_return_moves_back_only_flows_that_failed_over_and_no_tcp() {
    let t = Topology::standard();
    let config = with_health(&t, &["x"], "2", "purge-udp");
    let gw = Gateway::start(&t.gw, &config);
    let udp = udp_peer_server(&t.inet, INET_SERVICE, 0);
    let tcp = tcp_echo_server(&t.inet, INET_SERVICE, 0);
    let upstream = ["FORWARD", "-i", IF_CORE, "-j", "DROP"];
    t.ispx
        .exec(&[&["iptables", "-w", "-I"][..], &upstream].concat());
    eventually(Duration::from_secs(3), "x down by its probes", || {
        gw.status()["uplinks"][0]["state"] == "down"
    });
    // Made during the outage, all on y: UDP sockets and TCP connections.
    let socks = udp_flows_during_outage(&t, udp.addr());
    let mut conns: Vec<std::net::TcpStream> = (0..12)
        .map(|_| tcp_connect(&t.client, None, tcp.addr()).expect("TCP during the outage"))
        .collect();
    let listed = gw.conns();
    let failed_over = |proto: &str| {
        listed
            .iter()
            .filter(|c| c["proto"] == proto && c["failed_over"] == true)
            .count()
    };
    let (udp_fo, tcp_fo) = (failed_over("udp"), failed_over("tcp"));
    // About half prefer x; none of 24 or all of 24 is a broken hash.
    assert!(
        (3..=21).contains(&udp_fo),
        "{udp_fo} of 24 UDP flows failed over"
    );
    assert!(tcp_fo > 0, "some TCP flows prefer x");
    assert!(
        listed
            .iter()
            .all(|c| c["uplink"] == "y" || c["proto"] == "icmp"),
        "{listed:?}"
    );
    // Down for longer than confirm_ms: on_down acts, so on_up will.
    eventually(Duration::from_secs(3), "x's outage confirmed", || {
        gw.log().contains("uplink x: down for")
    });

    t.ispx
        .exec(&[&["iptables", "-w", "-D"][..], &upstream].concat());
    eventually(
        Duration::from_secs(5),
        "failed-over flows moved back",
        || gw.log().contains(&format!("failed-over {udp_fo} flows")),
    );
    // The failed-over UDP flows now go out x, the others kept their
    // mapping on y; every TCP connection lives on, where it was.
    let back = socks
        .iter()
        .map(|s| udp_seen_from(s, udp.addr()).expect("UDP after the return"))
        .filter(|p| *p.ip() == UPLINK_X_ADDR)
        .count();
    assert_eq!(back, udp_fo, "exactly the failed-over UDP flows returned");
    for c in &mut conns {
        c.write_all(b"still here").expect("write");
        let mut buf = [0u8; 10];
        c.read_exact(&mut buf)
            .expect("a TCP connection survived the return");
        assert_eq!(&buf, b"still here");
    }
    assert_eq!(t.spoofed_drops(), 0);
}

#[test]
fn on_up_return_idle_moves_back_failed_over_flows_only_once_idle() {
    let t = Topology::standard();
    let config = with_health(&t, &["x"], "2", "purge-udp").replace(
        "on_up = \"return\"",
        "on_up = \"return-idle\"\nreturn_idle_s = 2",
    );
    let gw = Gateway::start(&t.gw, &config);
    let udp = udp_peer_server(&t.inet, INET_SERVICE, 0);
    let upstream = ["FORWARD", "-i", IF_CORE, "-j", "DROP"];
    t.ispx
        .exec(&[&["iptables", "-w", "-I"][..], &upstream].concat());
    eventually(Duration::from_secs(3), "x's outage confirmed", || {
        gw.log().contains("uplink x: down for")
    });
    let socks = udp_flows_during_outage(&t, udp.addr());
    let listed = gw.conns();
    let failed_over = |s: &std::net::UdpSocket| {
        let port = s.local_addr().expect("port").port();
        listed
            .iter()
            .any(|c| c["sport"] == port && c["failed_over"] == true)
    };
    let (moving, staying): (Vec<_>, Vec<_>) = socks.iter().partition(|s| failed_over(s));
    assert!(moving.len() >= 2, "{} of 24 failed over", moving.len());
    let (busy, idle) = moving.split_at(1);

    t.ispx
        .exec(&[&["iptables", "-w", "-D"][..], &upstream].concat());
    eventually(Duration::from_secs(5), "x back", || {
        gw.log().contains("uplink x: back in service")
    });
    // The busy flow sends every 300 ms and stays where it is; the others
    // wait for return_idle_s.
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(4) {
        let seen = udp_seen_from(busy[0], udp.addr()).expect("busy");
        assert_eq!(*seen.ip(), UPLINK_Y_ADDR, "a busy flow was moved");
        std::thread::sleep(Duration::from_millis(300));
    }
    eventually(Duration::from_secs(5), "idle flows moved back", || {
        gw.log().contains("idle failed-over flows")
    });
    for s in idle {
        assert_eq!(
            *udp_seen_from(s, udp.addr()).expect("idle").ip(),
            UPLINK_X_ADDR
        );
    }
    for s in staying {
        assert_eq!(
            *udp_seen_from(s, udp.addr()).expect("stays").ip(),
            UPLINK_Y_ADDR
        );
    }
}

#[test]
fn a_forged_rst_from_outside_closes_nothing_while_the_connection_goes_on() {
    let t = Topology::standard();
    let gw = Gateway::start(
        &t.gw,
        &config_for(&t, [1, 1], "[timeouts]\ntcp_closing = 2\n"),
    );
    let srv = tcp_echo_server(&t.inet, INET_SERVICE, 0);
    let mut c = tcp_connect(&t.client, None, srv.addr()).expect("connect");
    let mut echo = |what: &str| {
        c.write_all(b"ping").expect("write");
        let mut buf = [0u8; 4];
        c.read_exact(&mut buf)
            .unwrap_or_else(|e| panic!("{what}: {e}"));
    };
    echo("before");
    let flow = gw
        .conns()
        .into_iter()
        .find(|c| c["proto"] == "tcp")
        .expect("the TCP flow");
    // An RST with the flow's tuple and a sequence number far outside the
    // window, as an off-path attacker would send it.
    let forge = format!(
        "send(IP(src='{INET_SERVICE}', dst='{}')/TCP(sport={}, dport={}, flags='R', seq=12345))",
        flow["nat_addr"].as_str().expect("nat_addr"),
        srv.port(),
        flow["nat_port"]
    );
    scapy(&t.inet, &forge, Duration::from_secs(20));
    eventually(
        Duration::from_secs(2),
        "the RST reached the gateway",
        || gw.conns().iter().any(|c| c["state"] == "closed"),
    );
    echo("right after the RST");
    assert_eq!(gw.reason("rst_ignored"), 1, "the next packet disarmed it");
    // Past tcp_closing: the flow was never closed, so never reaped.
    std::thread::sleep(Duration::from_secs(3));
    echo("after tcp_closing");
    let now = gw.conns();
    let same = now.iter().find(|c| c["proto"] == "tcp").expect("the flow");
    assert_eq!(same["state"], "established");
    assert_eq!(same["nat_port"], flow["nat_port"]);
    assert_eq!(gw.reason("mid_stream"), 0, "the flow was never remade");
}

/// Every flow's (LAN port, uplink, NAT port), by LAN port.
fn placements(gw: &Gateway) -> Vec<(u64, String, u64)> {
    let mut out: Vec<_> = gw
        .conns()
        .iter()
        .map(|c| {
            let n = |k: &str| c[k].as_u64().expect("a number");
            (n("sport"), c["uplink"].to_string(), n("nat_port"))
        })
        .collect();
    out.sort();
    out
}

#[test]
fn a_tcp_connection_whose_flow_expired_mid_stream_comes_back_on_its_uplink_and_port() {
    let t = Topology::standard();
    let gw = Gateway::start(
        &t.gw,
        &config_for(&t, [1, 1], "[timeouts]\ntcp_established = 2\n"),
    );
    let tcp = tcp_echo_server(&t.inet, INET_SERVICE, 0);
    let mut conns: Vec<std::net::TcpStream> = (0..16)
        .map(|_| tcp_connect(&t.client, None, tcp.addr()).expect("connect"))
        .collect();
    for c in &mut conns {
        c.write_all(b"a").expect("write");
        c.read_exact(&mut [0u8; 1]).expect("echo");
    }
    let before = placements(&gw);
    let uplinks: std::collections::HashSet<_> = before.iter().map(|b| b.1.clone()).collect();
    assert_eq!(uplinks.len(), 2, "spread over both uplinks: {before:?}");
    eventually(Duration::from_secs(10), "every flow expired", || {
        gw.conns().is_empty()
    });
    // Each connection's next segment makes its flow anew from mid-stream.
    for c in &mut conns {
        c.write_all(b"b").expect("write");
        let mut buf = [0u8; 1];
        c.read_exact(&mut buf)
            .expect("the rebuilt flow took the same uplink and port");
        assert_eq!(&buf, b"b");
    }
    let after = placements(&gw);
    assert_eq!(after, before);
    assert!(gw.reason("mid_stream") >= 16, "{}", gw.reason("mid_stream"));
}

#[test]
fn an_extreme_weight_ratio_still_gives_the_small_uplink_its_share() {
    let t = Topology::standard();
    let _gw = Gateway::start(&t.gw, &config_for(&t, [1, 200], ""));
    let srv = udp_peer_server(&t.inet, INET_SERVICE, 0);
    let on_x = (0..2000)
        .filter(|_| *udp_seen_as(&t.client, None, srv.addr()).expect("UDP").ip() == UPLINK_X_ADDR)
        .count();
    // 2000 / 201 ≈ 10 expected; 0 is what 64 slots gave.
    assert!((1..=30).contains(&on_x), "{on_x} of 2000 flows on x");
}

#[test]
fn pinned_maps_of_another_layout_are_refused_and_cleanup_removes_everything() {
    let t = Topology::standard();
    let config = config_for(&t, [1, 1], "");
    let gw = Gateway::start_with_pin(&t.gw, &config, unique_pin_dir("lv"), &["--keep-on-exit"]);
    let cfg_path = gw.config_path().to_owned();
    let pin = gw.stop();
    write_config(&cfg_path, &config).expect("write the config again");
    let dir = pin.path().to_str().expect("utf-8").to_owned();
    assert!(
        t.gw.exec_stdout(&["ip", "rule"]).contains("proto 77"),
        "--keep-on-exit kept the rules"
    );

    // Pretend an older multihome pinned these maps.
    let settings = format!("{dir}/SETTINGS");
    let mut update = vec![
        "bpftool", "map", "update", "pinned", &settings, "key", "0", "0", "0", "0",
    ];
    update.push("value");
    update.extend(["99", "0", "0", "0"]);
    update.extend(["0"; 28]);
    t.gw.exec(&update);

    let bin = multihome_bin();
    let bin = bin.to_str().expect("utf-8");
    let cfg = cfg_path.to_str().expect("utf-8");
    let out =
        t.gw.try_exec(&[bin, "run", "--config", cfg, "--pin-dir", &dir]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a foreign layout was adopted");
    assert!(err.contains("layout version 99"), "{err}");
    assert!(
        err.contains("multihome cleanup"),
        "the message must say what to do: {err}"
    );
    assert!(
        pin.path().join("CONN_FWD").exists(),
        "the refused run removed the old maps"
    );

    let out = t.gw.try_exec(&[bin, "cleanup", "--pin-dir", &dir]);
    assert!(out.status.success(), "cleanup failed: {out:?}");
    assert!(
        !pin.path().join("CONN_FWD").exists(),
        "cleanup left the maps"
    );
    assert!(
        !t.gw.exec_stdout(&["ip", "rule"]).contains("proto 77"),
        "cleanup left rules"
    );
    assert!(
        !t.gw
            .exec_stdout(&["ip", "route", "show", "table", "all"])
            .contains("proto 77"),
        "cleanup left routes"
    );
    let _ = std::fs::remove_file(&cfg_path);
}

/// Turns the pinned CONN_FWD into one of layouts 2 to 6, whose entries
/// lacked today's last 8 bytes, holding the same flows.
fn pin_old_conn_fwd(ns: &NetNs, dir: &str) {
    let path = format!("{dir}/CONN_FWD");
    let show: serde_json::Value =
        serde_json::from_str(&ns.exec_stdout(&["bpftool", "-j", "map", "show", "pinned", &path]))
            .expect("bpftool map show");
    let dump: serde_json::Value =
        serde_json::from_str(&ns.exec_stdout(&["bpftool", "-j", "map", "dump", "pinned", &path]))
            .expect("bpftool map dump");
    let entries = show["max_entries"].to_string();
    std::fs::remove_file(&path).expect("unpin CONN_FWD");
    ns.exec(&[
        "bpftool", "map", "create", &path, "type", "hash", "key", "16", "value", "24", "entries",
        &entries, "name", "CONN_FWD",
    ]);
    let bytes = |v: &serde_json::Value| -> Vec<String> {
        v.as_array()
            .expect("bytes")
            .iter()
            .map(|b| b.as_str().expect("hex byte").to_owned())
            .collect()
    };
    let flows = dump.as_array().expect("entries");
    assert!(!flows.is_empty(), "no flow to carry over");
    for e in flows {
        let mut cmd = vec!["bpftool", "map", "update", "pinned", &path, "key"];
        let (key, value) = (bytes(&e["key"]), bytes(&e["value"]));
        cmd.extend(key.iter().map(String::as_str));
        cmd.push("value");
        cmd.extend(value[..24].iter().map(String::as_str));
        ns.exec(&cmd);
    }
}

/// Runs a UDP flow through a daemon, stops it with `--keep-on-exit`, lets
/// `downgrade` turn the pinned maps into an older layout's, starts this
/// daemon on them and checks that the flow kept its mapping.
fn upgrade_keeps_the_flow(version: u8, downgrade: impl FnOnce(&Topology, &str)) {
    let t = Topology::standard();
    let config = config_for(&t, [1, 1], "");
    let gw = Gateway::start_with_pin(&t.gw, &config, unique_pin_dir("up"), &["--keep-on-exit"]);
    let srv = udp_peer_server(&t.inet, INET_SERVICE, 0);
    let sock = t
        .client
        .run(|| std::net::UdpSocket::bind((CLIENT_ADDR, 0)).expect("bind the client socket"));
    let before = udp_seen_from(&sock, srv.addr()).expect("UDP before the upgrade");
    let cfg_path = gw.config_path().to_owned();
    let pin = gw.stop();
    write_config(&cfg_path, &config).expect("write the config again");
    let dir = pin.path().to_str().expect("utf-8").to_owned();
    // Layouts up to 6 had shorter flow entries.
    let shorter_flows = version <= 6;
    if shorter_flows {
        pin_old_conn_fwd(&t.gw, &dir);
    }
    downgrade(&t, &dir);

    let gw = Gateway::start_with_pin(&t.gw, &config, pin, &[]);
    assert!(
        gw.log()
            .contains(&format!("adopting maps of layout version {version}")),
        "{}",
        gw.log()
    );
    assert_eq!(
        gw.log().contains("CONN_FWD: upgrade done"),
        shorter_flows,
        "{}",
        gw.log()
    );
    assert!(
        !std::path::Path::new(&format!("{dir}/CONN_FWD_OLD")).exists(),
        "the old map is unpinned"
    );
    let after = udp_seen_from(&sock, srv.addr()).expect("UDP after the upgrade");
    assert_eq!(after, before, "the flow kept its uplink, address and port");
    assert_eq!(
        gw.reason("stale_reverse"),
        0,
        "REASONS has the new counters"
    );
    // New flows are placed by the new table.
    for _ in 0..4 {
        udp_seen_as(&t.client, None, srv.addr()).expect("a new flow after the upgrade");
    }
    let _ = std::fs::remove_file(&cfg_path);
}

#[test]
fn an_upgrade_from_layout_7_the_previous_release_keeps_live_flows_stamped_on_the_old_clock() {
    upgrade_keeps_the_flow(7, |t, dir| {
        // Layout 7: stamps on CLOCK_BOOTTIME, no XDP maps.
        for name in ["XDP_DEVS", "XDP_STATS"] {
            std::fs::remove_file(format!("{dir}/{name}")).expect("unpin a new map");
        }
        pin_old_settings(&t.gw, dir, 7, 32);
    });
}

#[test]
fn an_upgrade_from_layout_6_keeps_live_flows_in_a_map_of_longer_entries() {
    upgrade_keeps_the_flow(6, |t, dir| {
        // Layout 6: ten counters per uplink, 24-byte flows, PEERS an LRU
        // hash map, no NEXT_HOPS.
        for name in [
            "NEXT_HOPS",
            "CLASSIFY",
            "LOCAL_ADDRS",
            "XDP_DEVS",
            "XDP_STATS",
        ] {
            std::fs::remove_file(format!("{dir}/{name}")).expect("unpin a new map");
        }
        pin_old_map(&t.gw, dir, "UPLINK_STATS", "percpu_array", 10 * 8);
        pin_old_keyed_map(&t.gw, dir, "PEERS", "lru_hash", 16, 4);
        pin_old_settings(&t.gw, dir, 6, 32);
    });
}

#[test]
fn an_upgrade_from_layout_5_keeps_live_flows() {
    upgrade_keeps_the_flow(5, |t, dir| {
        // Layout 5: six counters per uplink, no endpoint reservations, no
        // SYN_WAIT, PEERS an LRU hash map.
        pin_old_keyed_map(&t.gw, dir, "PEERS", "lru_hash", 16, 4);
        for name in [
            "ENDPOINT_PORTS",
            "SYN_WAIT",
            "NEXT_HOPS",
            "CLASSIFY",
            "LOCAL_ADDRS",
        ] {
            std::fs::remove_file(format!("{dir}/{name}")).expect("unpin a map layout 5 lacks");
        }
        pin_old_map(&t.gw, dir, "UPLINK_STATS", "percpu_array", 6 * 8);
        pin_old_settings(&t.gw, dir, 5, 32);
    });
}

#[test]
fn an_upgrade_from_layout_4_keeps_live_flows() {
    upgrade_keeps_the_flow(4, |t, dir| {
        // Layout 4: no policy counters, one choice table of 8 + 2 * 4096
        // bytes, SETTINGS of 32 bytes, no rule, affinity or endpoint maps.
        for name in [
            "RULE_SRC",
            "RULE_DST",
            "RULE_PROTO",
            "RULE_DPORT",
            "RULE_DSCP",
            "RULE_ACTION",
            "AFFINITY",
            "ENDPOINTS",
            "ENDPOINT_PORTS",
            "SYN_WAIT",
            "NEXT_HOPS",
            "CLASSIFY",
            "LOCAL_ADDRS",
        ] {
            std::fs::remove_file(format!("{dir}/{name}")).expect("unpin a map layout 4 lacks");
        }
        pin_old_keyed_map(&t.gw, dir, "PEERS", "lru_hash", 16, 4);
        let reasons = multihome_common::REASON_COUNT - 3;
        pin_old_map(&t.gw, dir, "REASONS", "percpu_array", reasons * 8);
        pin_old_map(&t.gw, dir, "SELECT", "array", 8 + 2 * 4096);
        pin_old_settings(&t.gw, dir, 4, 32);
    });
}

#[test]
fn an_upgrade_from_layout_3_keeps_live_flows() {
    upgrade_keeps_the_flow(3, |t, dir| {
        // Layout 3: 27 reason counters, a 64-slot SELECT, 24-byte SETTINGS,
        // PEERS an LRU hash map, no NEXT_HOPS.
        for name in ["NEXT_HOPS", "CLASSIFY", "LOCAL_ADDRS"] {
            std::fs::remove_file(format!("{dir}/{name}")).expect("unpin a new map");
        }
        pin_old_keyed_map(&t.gw, dir, "PEERS", "lru_hash", 16, 4);
        pin_old_map(&t.gw, dir, "REASONS", "percpu_array", 27 * 8);
        pin_old_map(&t.gw, dir, "SELECT", "array", 4 + 64);
        pin_old_settings(&t.gw, dir, 3, 24);
    });
}

#[test]
fn an_upgrade_from_layout_2_keeps_live_flows_and_makes_the_changed_maps_afresh() {
    upgrade_keeps_the_flow(2, |t, dir| {
        // Layout 2: 16 reason counters, none of layout 3's new maps,
        // 16-byte SETTINGS.
        for name in [
            "ROUTED",
            "FRAGS",
            "PEERS",
            "NEXT_HOPS",
            "CLASSIFY",
            "LOCAL_ADDRS",
            "HOST_ECHO",
            "HOSTS",
            "FILL",
            "EIM",
        ] {
            std::fs::remove_file(format!("{dir}/{name}")).expect("unpin a map layout 2 lacks");
        }
        pin_old_map(&t.gw, dir, "REASONS", "percpu_array", 16 * 8);
        pin_old_map(&t.gw, dir, "SELECT", "array", 4 + 64);
        pin_old_settings(&t.gw, dir, 2, 16);
    });
}

#[test]
fn an_uplink_interface_that_disappears_and_reappears_is_picked_up_again() {
    let t = Topology::standard();
    let gw = Gateway::start(&t.gw, &config_for(&t, [0, 1], ""));
    let srv = udp_peer_server(&t.inet, INET_SERVICE, 0);
    assert_eq!(
        *udp_seen_as(&t.client, None, srv.addr()).expect("UDP").ip(),
        UPLINK_Y_ADDR
    );

    t.gw.exec(&["ip", "link", "del", IF_WANY]);
    eventually(
        Duration::from_secs(3),
        "y down without its interface",
        || gw.status()["uplinks"][1]["state"] != "up",
    );
    assert_eq!(
        *udp_seen_as(&t.client, None, srv.addr())
            .expect("x steps in")
            .ip(),
        UPLINK_X_ADDR
    );

    // The interface comes back (a new ifindex), as ppp0 does after a redial,
    // with a strict rp_filter from the distribution's default.
    t.gw.sysctl("net.ipv4.conf.default.rp_filter", "1");
    veth(&t.gw, IF_WANY, &t.ispy, IF_CUST);
    addr(&t.gw, IF_WANY, "198.18.22.1/24");
    addr(&t.ispy, IF_CUST, "198.18.22.254/24");
    eventually(Duration::from_secs(5), "y back up", || {
        gw.status()["uplinks"][1]["state"] == "up"
    });
    eventually(Duration::from_secs(5), "flows use y again", || {
        udp_seen_as(&t.client, None, srv.addr()).is_ok_and(|p| *p.ip() == UPLINK_Y_ADDR)
    });
    let rp =
        t.gw.sysctl_get(&format!("net.ipv4.conf.{IF_WANY}.rp_filter"));
    assert_eq!(rp.trim(), "2", "loose rp_filter again on the new interface");
    assert_eq!(t.spoofed_drops(), 0);
}

#[test]
fn a_sigterm_during_start_up_stops_the_daemon_cleanly_and_leaves_nothing() {
    let t = Topology::standard();
    let bin = multihome_bin();
    let pin = unique_pin_dir("sig");
    let cfg = std::env::temp_dir().join(format!("mh-sig-{}.toml", std::process::id()));
    std::fs::write(&cfg, config_for(&t, [1, 1], "")).expect("write");
    let proc = t.gw.spawn_env(
        &[
            bin.to_str().expect("utf-8"),
            "run",
            "--config",
            cfg.to_str().expect("utf-8"),
            "--pin-dir",
            pin.path().to_str().expect("utf-8"),
        ],
        &[("RUST_LOG", "info")],
    );
    // Once the programs are pinned and attached, before it is ready.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !proc.log().contains("attached LanIngress") {
        assert!(Instant::now() < deadline, "no attach: {}", proc.log());
        std::thread::sleep(Duration::from_micros(200));
    }
    proc.signal(libc::SIGTERM);
    let status = proc
        .wait_timeout(Duration::from_secs(10))
        .expect("the daemon stops");
    assert!(status.success(), "{status:?}: {}", proc.log());
    assert!(proc.log().contains("SIGTERM: stopping"), "{}", proc.log());
    assert!(
        !pin.path().join("CONN_FWD").exists(),
        "maps were left pinned"
    );
    assert!(
        !t.gw.exec_stdout(&["ip", "rule"]).contains("proto 77"),
        "rules were left"
    );
    let _ = std::fs::remove_file(&cfg);
}

/// `lan_prefixes = [...]` with `n` distinct /24s.
fn lan_prefixes(n: u8) -> String {
    let list: Vec<String> = (0..n)
        .map(|i| format!("\"198.18.{}.0/24\"", 100 + i))
        .collect();
    format!("lan_prefixes = [{}]", list.join(", "))
}

#[test]
fn bad_configs_and_unknown_interfaces_are_refused_and_nothing_is_installed() {
    let t = Topology::standard();
    let bin = multihome_bin();
    let bin = bin.to_str().expect("utf-8");
    let pin = unique_pin_dir("bad");
    let dir = pin.path().to_str().expect("utf-8");
    let cases = [
        (
            config_for(&t, [1, 1], "").replace("wany", "nosuch0"),
            "nosuch0",
        ),
        (
            config_for(&t, [1, 1], "")
                .replace("name = \"y\"", "name = \"y\"\naddress = \"198.18.99.9\""),
            "198.18.99.9",
        ),
        (
            config_for(&t, [1, 1], "").replace("weight = 1", "weight = -1"),
            "weight",
        ),
        ("lan = []\n".to_owned(), "`lan`"),
        // With lan0's own subnet, one prefix too many.
        (
            config_for(&t, [1, 1], "").replacen("\n", &format!("\n{}\n", lan_prefixes(16)), 1),
            "17 LAN prefixes; at most 16 fit",
        ),
        (
            config_for(&t, [1, 1], "").replacen("\n", &format!("\n{}\n", lan_prefixes(17)), 1),
            "17 `lan_prefixes`",
        ),
        (
            config_for(&t, [1, 1], "").replacen(IF_LAN, "lantun0", 1),
            "no Ethernet header",
        ),
    ];
    let _tun = create_tun(&t.gw, "lantun0");
    for (i, (config, needle)) in cases.iter().enumerate() {
        let path = std::env::temp_dir().join(format!("mh-bad-{}-{i}.toml", std::process::id()));
        std::fs::write(&path, config).expect("write");
        let p = path.to_str().expect("utf-8");
        let out =
            t.gw.try_exec(&[bin, "run", "--config", p, "--pin-dir", dir]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "case {i} was accepted: {err}");
        assert!(
            err.contains(needle),
            "case {i}: {err} does not name {needle}"
        );
        let _ = std::fs::remove_file(&path);
    }
    assert!(
        !pin.path().join("CONN_FWD").exists(),
        "maps were left pinned"
    );
    assert!(
        !t.gw.exec_stdout(&["ip", "rule"]).contains("proto 77"),
        "rules were left"
    );
}
