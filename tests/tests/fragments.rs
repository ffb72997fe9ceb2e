//! Datagrams larger than the MTU cross the NAT both ways as fragments, in
//! order and, for replies, last fragment first (RFC 4787 REQ-14).
use std::{net::Ipv4Addr, time::Duration};

use testbed::*;

const PORT: u16 = 5300;
const SIZE: &str = "3000";

fn frag_server(ns: &NetNs, reverse: bool) -> Proc {
    let (path, addr, port) = (
        script("frag_echo.py"),
        INET_SERVICE.to_string(),
        PORT.to_string(),
    );
    let mut cmd = vec![PYTHON, "-u", &path, "serve", &addr, &port, "40"];
    if reverse {
        cmd.push("reverse");
    }
    let p = ns.spawn(&cmd);
    std::thread::sleep(Duration::from_millis(700));
    p
}

/// Whether `SIZE` bytes from `src` came back whole.
fn echoed(ns: &NetNs, src: Ipv4Addr) -> String {
    let (path, src, dst, port) = (
        script("frag_echo.py"),
        src.to_string(),
        INET_SERVICE.to_string(),
        PORT.to_string(),
    );
    let out = ns.try_exec_timeout(
        &[PYTHON, &path, "ask", &src, &dst, &port, SIZE],
        Duration::from_secs(20),
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn large_datagrams_cross_both_ways(offloads: bool, reverse: bool) {
    let t = Topology::standard();
    if offloads {
        t.enable_checksum_offloads();
    }
    let gw = Gateway::start(&t.gw, &config_for(&t, [1, 1], ""));
    let server = frag_server(&t.inet, reverse);
    for i in 0..6 {
        assert_eq!(
            echoed(&t.client, CLIENT_ADDR),
            "ok",
            "datagram {i} (offloads {offloads}, reverse {reverse}); server saw:\n{}\nreasons: {}",
            server.log(),
            gw.status()["drops"]
        );
    }
    for line in server.log().lines() {
        let (from, len) = line.split_once(' ').expect("SOURCE LENGTH");
        assert!(
            [UPLINK_X_ADDR.to_string(), UPLINK_Y_ADDR.to_string()].contains(&from.to_owned()),
            "the server saw {from}"
        );
        assert_eq!(len, SIZE, "the server got a cut datagram");
    }
    assert!(
        gw.reason("fragment_translated") > 0,
        "{}",
        gw.status()["drops"]
    );
    assert_eq!(t.foreign_sources(), 0, "a LAN source reached an ISP");
}

#[test]
fn a_3000_byte_udp_datagram_and_its_reply_cross_the_nat_fragmented_offloads_off() {
    large_datagrams_cross_both_ways(false, false);
}

#[test]
fn a_3000_byte_udp_datagram_and_its_reply_cross_the_nat_fragmented_offloads_on() {
    large_datagrams_cross_both_ways(true, false);
}

#[test]
fn a_reply_whose_fragments_arrive_last_first_reaches_the_lan_host_whole() {
    large_datagrams_cross_both_ways(false, true);
}
