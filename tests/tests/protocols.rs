//! Every IP protocol crosses the NAT: GRE, ESP, SCTP, 6in4 and 253 (RFC
//! 3692), none of which this kernel has a driver for, are crafted with
//! scapy, answered by a raw-socket echo server, and must come back, with
//! nothing foreign reaching either ISP.
use std::{net::Ipv4Addr, time::Duration};

use testbed::*;

const PROTOS: [&str; 5] = ["47", "50", "132", "41", "253"];
fn proto_echo() -> String {
    script("proto_echo.py")
}

/// The raw echo server on the internet host, for `seconds`.
fn echo_server(t: &Topology, seconds: u32) -> Proc {
    let (path, secs, addr) = (proto_echo(), seconds.to_string(), INET_SERVICE.to_string());
    let mut cmd = vec![PYTHON, "-u", &path, "serve", &secs, &addr];
    cmd.extend(PROTOS);
    let p = t.inet.spawn(&cmd);
    std::thread::sleep(Duration::from_millis(500));
    p
}

/// The protocols whose echo came back to `src` in `ns`.
fn ask(ns: &NetNs, src: Ipv4Addr) -> Vec<String> {
    let src = src.to_string();
    let dst = INET_SERVICE.to_string();
    let path = proto_echo();
    let mut cmd = vec![PYTHON, &path, "ask", &src, &dst];
    cmd.extend(PROTOS);
    let out = ns.try_exec_timeout(&cmd, Duration::from_secs(60));
    assert!(
        out.status.success(),
        "proto_echo ask failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// "PROTO SOURCE" lines the server logged.
fn seen_by_server(server: &Proc) -> Vec<(String, Ipv4Addr)> {
    server
        .log()
        .lines()
        .filter_map(|l| {
            let (p, a) = l.split_once(' ')?;
            Some((p.to_owned(), a.trim().parse().ok()?))
        })
        .collect()
}

fn protocols_cross_the_nat_both_ways(offloads: bool) {
    let t = Topology::standard();
    if offloads {
        t.enable_checksum_offloads();
    }
    let gw = Gateway::start(&t.gw, &config_for(&t, [1, 1], ""));
    let server = echo_server(&t, 30);
    let back = ask(&t.client, CLIENT_ADDR);
    assert_eq!(back, PROTOS, "echoes that came back (offloads {offloads})");
    for (proto, src) in seen_by_server(&server) {
        assert!(
            [UPLINK_X_ADDR, UPLINK_Y_ADDR].contains(&src),
            "protocol {proto} reached the server from {src}"
        );
    }
    let conns = gw.conns();
    for name in ["gre", "esp", "sctp", "ipv6"] {
        let c = conns
            .iter()
            .find(|c| c["proto"] == name)
            .unwrap_or_else(|| panic!("no {name} flow in {conns:#?}"));
        assert_eq!(c["state"], "established", "{c}");
        assert_eq!(c["sport"], 0, "{c}");
    }
    assert_eq!(t.foreign_sources(), 0, "a LAN source reached an ISP");
}

#[test]
fn gre_esp_sctp_6in4_and_253_cross_the_nat_and_their_replies_come_back_offloads_off() {
    protocols_cross_the_nat_both_ways(false);
}

#[test]
fn gre_esp_sctp_6in4_and_253_cross_the_nat_and_their_replies_come_back_offloads_on() {
    protocols_cross_the_nat_both_ways(true);
}

#[test]
fn a_second_lan_host_talking_the_same_protocol_to_the_same_remote_takes_the_other_uplink() {
    let t = Topology::two_clients();
    let gw = Gateway::start(&t.gw, &config_for(&t, [1, 1], ""));
    let server = echo_server(&t, 40);
    assert_eq!(ask(&t.client, CLIENT_ADDR), PROTOS, "first host");
    assert_eq!(ask(t.client2(), CLIENT2_ADDR), PROTOS, "second host");
    // Each protocol reached the server once from each uplink address.
    let seen = seen_by_server(&server);
    for p in PROTOS {
        let mut from: Vec<Ipv4Addr> = seen
            .iter()
            .filter(|(q, _)| q == p)
            .map(|(_, a)| *a)
            .collect();
        from.sort();
        from.dedup();
        assert_eq!(
            from,
            [UPLINK_X_ADDR, UPLINK_Y_ADDR],
            "protocol {p}: one host per uplink address"
        );
    }
    // A third host finds both addresses taken: dropped and counted.
    let third = Ipv4Addr::new(198, 18, 2, 3);
    addr(t.client2(), IF_LAN, &format!("{third}/24"));
    assert!(ask(t.client2(), third).is_empty(), "no address was free");
    assert!(gw.reason("addr_taken") >= PROTOS.len() as u64);
    assert_eq!(t.foreign_sources(), 0, "a LAN source reached an ISP");
}
