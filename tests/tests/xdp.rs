//! The XDP fast path on veth in native mode: what it carries, what it
//! leaves to TC, where it may not redirect, and how it is attached and
//! detached. Each test forces `xdp` itself, whatever the suite runs with.
use std::{net::UdpSocket, time::Duration};

use testbed::*;

/// `t`'s config with weights `w` and `xdp = mode` (a top-level key: it
/// must come before the uplink tables).
fn config_with_xdp(t: &Topology, w: [u32; 2], mode: &str) -> String {
    format!("xdp = {mode:?}\n{}", config_for(t, w, ""))
}

/// The sum over uplinks of a status counter.
fn uplink_sum(status: &serde_json::Value, field: &str) -> u64 {
    status["uplinks"]
        .as_array()
        .expect("uplinks")
        .iter()
        .map(|u| u[field].as_u64().expect(field))
        .sum()
}

/// `ifname`'s entry in status's interfaces.
fn interface(status: &serde_json::Value, ifname: &str) -> serde_json::Value {
    status["interfaces"]
        .as_array()
        .expect("interfaces")
        .iter()
        .find(|i| i["interface"] == ifname)
        .unwrap_or_else(|| panic!("{ifname} not in status: {status:#}"))
        .clone()
}

/// Exchanges `n` datagrams with the UDP echo server over one socket (one
/// flow), each checked.
fn udp_exchanges(t: &Topology, n: usize) {
    let srv = udp_echo_server(&t.inet, INET_SERVICE, 0);
    let sock = t
        .client
        .run(|| UdpSocket::bind((CLIENT_ADDR, 0)))
        .expect("bind");
    for i in 0..n {
        let payload = format!("datagram {i} through the fast path");
        let got = udp_exchange(&sock, srv.addr(), payload.as_bytes()).expect("udp echo");
        assert_eq!(got, payload.as_bytes(), "datagram {i}");
    }
}

/// Whether `ifname` in `ns` runs an XDP program in driver mode.
fn has_native_xdp(ns: &NetNs, ifname: &str) -> bool {
    ns.exec_stdout(&["ip", "-d", "link", "show", ifname])
        .contains("xdp ")
}

#[test]
fn native_xdp_carries_established_udp_and_tcp_both_ways_and_status_counts_it() {
    let t = Topology::standard();
    t.enable_gro();
    let gw = Gateway::start(&t.gw, &config_with_xdp(&t, [1, 1], "native"));
    for ifname in [IF_LAN, IF_WANX, IF_WANY] {
        assert!(has_native_xdp(&t.gw, ifname), "no XDP on {ifname}");
    }
    udp_exchanges(&t, 50);
    let tcp = tcp_echo_server(&t.inet, INET_SERVICE, 0);
    let payload: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let echoed = tcp_request(&t.client, tcp.addr(), &payload).expect("tcp echo");
    assert!(echoed == payload, "TCP data through XDP arrived altered");

    let st = gw.status();
    // The first datagram and reply make the flow and take TC; the rest
    // take XDP. TCP's data segments add to both.
    let (tx, rx) = (
        uplink_sum(&st, "xdp_tx_packets"),
        uplink_sum(&st, "xdp_rx_packets"),
    );
    assert!(tx >= 49 && rx >= 49, "XDP out {tx}, in {rx}: {st:#}");
    assert!(
        uplink_sum(&st, "tx_packets") >= tx,
        "XDP packets are counted as TC counts them too"
    );
    for ifname in [IF_LAN, IF_WANX, IF_WANY] {
        let i = interface(&st, ifname);
        assert_eq!(i["xdp"], "native", "{i}");
        assert_eq!(i["xdp_redirect"], true, "{i}");
    }
    let text = String::from_utf8_lossy(&gw.cli(&["status"]).stdout).into_owned();
    assert!(text.contains("XDP native, redirect target"), "{text}");
    assert_eq!(t.foreign_sources(), 0, "a foreign source left an uplink");
}

#[test]
fn partial_checksums_from_offloading_peers_take_tc_under_native_xdp_and_arrive_intact() {
    let t = Topology::standard();
    t.enable_gro();
    t.enable_checksum_offloads();
    let gw = Gateway::start(&t.gw, &config_with_xdp(&t, [1, 1], "native"));
    // The server's link verifies checksums (offload off there).
    udp_exchanges(&t, 30);
    let st = gw.status();
    assert_eq!(
        uplink_sum(&st, "xdp_tx_packets"),
        0,
        "the LAN host's CHECKSUM_PARTIAL datagrams must take TC: {st:#}"
    );
    assert!(
        uplink_sum(&st, "xdp_rx_packets") >= 29,
        "the server's fully checksummed replies take XDP: {st:#}"
    );
}

#[test]
fn a_shaping_qdisc_keeps_xdp_redirects_off_its_uplink_until_it_goes() {
    let t = Topology::standard();
    t.enable_gro();
    t.gw.exec(&[
        "tc", "qdisc", "add", "dev", IF_WANX, "root", "tbf", "rate", "200mbit", "burst", "64k",
        "latency", "50ms",
    ]);
    let gw = Gateway::start(&t.gw, &config_with_xdp(&t, [1, 0], "native"));
    assert_eq!(interface(&gw.status(), IF_WANX)["xdp_redirect"], false);
    assert_eq!(interface(&gw.status(), IF_LAN)["xdp_redirect"], true);
    udp_exchanges(&t, 20);
    let st = gw.status();
    assert_eq!(
        uplink_sum(&st, "xdp_tx_packets"),
        0,
        "XDP bypassed tbf: {st:#}"
    );
    let shaped =
        t.gw.exec_stdout(&["tc", "-s", "qdisc", "show", "dev", IF_WANX]);
    assert!(shaped.contains("tbf"), "{shaped}");
    assert!(
        !shaped.contains("Sent 0 bytes 0 pkt"),
        "nothing went through tbf: {shaped}"
    );
    assert!(uplink_sum(&st, "xdp_rx_packets") >= 19, "{st:#}");

    t.gw.exec(&["tc", "qdisc", "del", "dev", IF_WANX, "root"]);
    eventually(
        Duration::from_secs(5),
        "redirects to wanx once tbf is gone",
        || interface(&gw.status(), IF_WANX)["xdp_redirect"] == true,
    );
    udp_exchanges(&t, 20);
    assert!(uplink_sum(&gw.status(), "xdp_tx_packets") >= 19);
}

#[test]
fn a_restart_adopts_native_xdp_and_one_with_xdp_off_detaches_it() {
    let t = Topology::standard();
    t.enable_gro();
    let srv = udp_echo_server(&t.inet, INET_SERVICE, 0);
    let sock = t
        .client
        .run(|| UdpSocket::bind((CLIENT_ADDR, 0)))
        .expect("bind");
    // One flow across every restart: it never stops working.
    let echo = |when: &str| {
        for i in 0..5 {
            let msg = format!("{when} {i}");
            let got = udp_exchange(&sock, srv.addr(), msg.as_bytes())
                .unwrap_or_else(|e| panic!("{when}: {e}"));
            assert_eq!(got, msg.as_bytes(), "{when}");
        }
    };
    let keep = ["--keep-on-exit"];
    let config = config_with_xdp(&t, [1, 1], "native");
    let gw = Gateway::start_with_pin(&t.gw, &config, unique_pin_dir("xdp"), &keep);
    assert!(has_native_xdp(&t.gw, IF_LAN));
    echo("before");
    // The flow's uplink's next hop is cached once the daemon has seen its
    // neighbour resolved; until then (and after a stop that came first)
    // its packets take TC.
    eventually(Duration::from_secs(3), "the flow's next hop cached", || {
        let st = gw.status();
        gw.conns().iter().all(|c| {
            st["uplinks"]
                .as_array()
                .expect("uplinks")
                .iter()
                .any(|u| u["name"] == c["uplink"] && u["next_hop"].is_string())
        })
    });
    let pin = gw.stop();
    assert!(has_native_xdp(&t.gw, IF_LAN), "XDP gone with the daemon");
    echo("with the daemon stopped");
    let gw = Gateway::start_with_pin(&t.gw, &config, pin, &keep);
    assert!(gw.log().contains("XDP native on lan0"), "{}", gw.log());
    echo("after a restart");
    assert!(uplink_sum(&gw.status(), "xdp_tx_packets") >= 10);
    let pin = gw.stop();
    let off = config_with_xdp(&t, [1, 1], "off");
    let gw = Gateway::start_with_pin(&t.gw, &off, pin, &[]);
    for ifname in [IF_LAN, IF_WANX, IF_WANY] {
        assert!(!has_native_xdp(&t.gw, ifname), "XDP left on {ifname}");
        assert_eq!(interface(&gw.status(), ifname)["xdp"], "off");
    }
    assert!(gw.log().contains("XDP detached from lan0"), "{}", gw.log());
    echo("after a restart with xdp off");
}

#[test]
fn native_xdp_on_a_driver_without_it_fails_with_a_clear_error() {
    let t = Topology::standard();
    // A bridge has no native XDP.
    bridge(&t.gw, "mhbr0");
    let mut config = config_with_xdp(&t, [1, 1], "native");
    config = config.replacen(&format!("lan = [\"{IF_LAN}\"]"), "lan = [\"mhbr0\"]", 1);
    let path = std::env::temp_dir().join(format!("mh-xdp-bridge-{}.toml", std::process::id()));
    std::fs::write(&path, &config).expect("write config");
    let pin = unique_pin_dir("xbr");
    let bin = multihome_bin();
    let out = t.gw.try_exec_timeout(
        &[
            bin.to_str().expect("utf-8"),
            "run",
            "--config",
            path.to_str().expect("utf-8"),
            "--pin-dir",
            pin.path().to_str().expect("utf-8"),
        ],
        Duration::from_secs(20),
    );
    let _ = std::fs::remove_file(&path);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the daemon ran: {stderr}");
    assert!(
        stderr.contains("native XDP mode") && stderr.contains("mhbr0"),
        "{stderr}"
    );
}
