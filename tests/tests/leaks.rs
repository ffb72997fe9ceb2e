//! Nothing leaves an uplink with a source that is not that uplink's: odd
//! LAN traffic, crafted with scapy, goes through the gateway while both
//! ISPs count every packet that reaches them with a foreign source.
use std::{net::Ipv4Addr, time::Duration};

use testbed::*;

/// A host on the routed subnet behind the LAN.
const ROUTED_NET: &str = "198.18.3.0/24";
const ROUTED_HOST: Ipv4Addr = Ipv4Addr::new(198, 18, 3, 2);

/// From the client: fuzzed IPv4 of every protocol, truncated headers,
/// spoofed sources, multicast and broadcast. Prints how many were sent.
fn odd_traffic_script(fuzzed: usize) -> String {
    format!(
        r#"
gw = getmacbyip("{GW_LAN}")
me, dst = "{CLIENT_ADDR}", "{INET_SERVICE}"
def to_gw(p):
    return Ether(dst=gw) / p
pkts = []
for i in range({fuzzed}):
    l4 = [fuzz(TCP()), fuzz(UDP()), fuzz(ICMP()), Raw(bytes(RandString(40)))][i % 4]
    ip = fuzz(IP(src=me, dst=dst, ttl=64)) if i % 8 else IP(src=me, dst=dst)
    pkts.append(to_gw(ip / l4))
# A TCP header cut at 10 bytes, and at 19 bytes.
pkts.append(to_gw(IP(src=me, dst=dst, proto=6) / Raw(b"\x01" * 10)))
pkts.append(to_gw(IP(src=me, dst=dst, proto=6) / Raw(b"\x01" * 19)))
# Sources that are not the LAN's.
for src in ["198.18.99.5", "0.0.0.0", "{UPLINK_Y_ADDR}"]:
    pkts.append(to_gw(IP(src=src, dst=dst) / UDP(sport=4000, dport=53)))
# Protocols without ports.
for proto in [47, 50, 51, 41, 132, 253]:
    pkts.append(to_gw(IP(src=me, dst=dst, proto=proto) / Raw(b"\x00" * 24)))
# mDNS and broadcasts, as a LAN sends them.
pkts.append(Ether(dst="01:00:5e:00:00:fb") / IP(src=me, dst="224.0.0.251") / UDP(sport=5353, dport=5353) / Raw(b"q"))
pkts.append(Ether(dst="ff:ff:ff:ff:ff:ff") / IP(src=me, dst="255.255.255.255") / UDP(sport=68, dport=67) / Raw(b"d"))
pkts.append(Ether(dst="ff:ff:ff:ff:ff:ff") / IP(src=me, dst="198.18.1.255") / UDP(sport=137, dport=137) / Raw(b"n"))
# A unicast IP packet in a frame for another host's MAC.
pkts.append(Ether(dst="02:00:00:00:99:99") / IP(src=me, dst=dst) / UDP(sport=4001, dport=53))
sendp(pkts, iface="{IF_LAN}")
print(len(pkts))
"#
    )
}

fn odd_lan_traffic_never_leaves_with_a_foreign_source(offloads: bool) {
    let t = Topology::standard();
    if offloads {
        t.enable_checksum_offloads();
    }
    let gw = Gateway::start(&t.gw, &config_for(&t, [1, 1], ""));
    let srv = udp_echo_server(&t.inet, INET_SERVICE, 0);
    assert_eq!(
        udp_request(&t.client, srv.addr(), b"before").expect("UDP through the gateway"),
        b"before"
    );

    let sent: usize = scapy(
        &t.client,
        &odd_traffic_script(2000),
        Duration::from_secs(120),
    )
    .trim()
    .parse()
    .expect("scapy prints how many packets it sent");
    assert!(sent > 2000, "sent {sent}");
    std::thread::sleep(Duration::from_millis(500));

    assert_eq!(
        t.foreign_sources(),
        0,
        "packets with a foreign source reached an ISP (offloads {offloads})"
    );
    assert!(
        gw.reason("foreign_source") > 0,
        "the egress guard stopped nothing: the test sent no leak-prone traffic"
    );
    assert!(gw.reason("not_unicast") >= 4, "{}", gw.status()["drops"]);
    let conns = gw.conns();
    for c in &conns {
        let dst = c["dst"].as_str().expect("dst");
        assert!(
            !["224.0.0.251", "255.255.255.255", "198.18.1.255"].contains(&dst),
            "a flow for a multicast or broadcast: {c}"
        );
        assert_eq!(
            c["src"],
            CLIENT_ADDR.to_string(),
            "a flow for a foreign source: {c}"
        );
    }
    // The gateway still works.
    assert_eq!(
        udp_request(&t.client, srv.addr(), b"after").expect("UDP after the odd traffic"),
        b"after"
    );
}

#[test]
fn odd_lan_traffic_never_leaves_an_uplink_with_a_foreign_source_offloads_off() {
    odd_lan_traffic_never_leaves_with_a_foreign_source(false);
}

#[test]
fn odd_lan_traffic_never_leaves_an_uplink_with_a_foreign_source_offloads_on() {
    odd_lan_traffic_never_leaves_with_a_foreign_source(true);
}

#[test]
fn a_routed_prefix_leaves_its_own_uplink_untranslated_and_no_other() {
    let t = Topology::standard();
    // The routed subnet sits behind the LAN; ISP y routes it to us.
    addr(&t.client, IF_LAN, &format!("{ROUTED_HOST}/32"));
    route(&t.gw, &format!("{ROUTED_NET} dev {IF_LAN}"));
    route(&t.ispy, &format!("{ROUTED_NET} via {UPLINK_Y_ADDR}"));
    route(&t.inet, &format!("{ROUTED_NET} via {ISPY_CORE}"));
    t.ispy.exec(&[
        "iptables", "-w", "-I", "FORWARD", "-i", IF_CUST, "-s", ROUTED_NET, "-j", "ACCEPT",
    ]);
    t.ispy.exec(&[
        "iptables",
        "-w",
        "-t",
        "raw",
        "-I",
        "PREROUTING",
        "-i",
        IF_CUST,
        "-s",
        ROUTED_NET,
        "-j",
        "ACCEPT",
    ]);
    // `config_for` ends with uplink y's table: the key lands there.
    let gw = Gateway::start(
        &t.gw,
        &config_for(&t, [1, 1], &format!("routed_prefixes = [{ROUTED_NET:?}]\n")),
    );
    let srv = udp_peer_server(&t.inet, INET_SERVICE, 0);
    for i in 0..20 {
        let seen = udp_seen_as(&t.client, Some(ROUTED_HOST), srv.addr())
            .unwrap_or_else(|e| panic!("request {i} from the routed subnet: {e}"));
        assert_eq!(*seen.ip(), ROUTED_HOST, "translated, or it left by x");
    }
    // The LAN's own hosts are still translated, over both uplinks.
    let seen = udp_seen_as(&t.client, Some(CLIENT_ADDR), srv.addr()).expect("LAN host");
    assert!([UPLINK_X_ADDR, UPLINK_Y_ADDR].contains(seen.ip()), "{seen}");
    assert!(gw.reason("routed_source") >= 20, "{}", gw.status()["drops"]);
    assert!(
        gw.conns()
            .iter()
            .all(|c| c["src"] != ROUTED_HOST.to_string()),
        "a routed source got a NAT flow"
    );
    assert_eq!(t.foreign_sources(), 0, "the routed prefix reached ISP x");
}

/// Without `prefix6` an uplink translates no IPv6, so the only IPv6
/// sources that may leave it forwarded are the prefixes it routes: a ULA
/// source the kernel forwards is dropped at the uplink's egress and
/// counted.
#[test]
fn forwarded_ipv6_leaves_an_uplink_only_from_a_prefix_it_routes() {
    let t = Topology::standard();
    for (ns, fwd, ifname) in [
        (&t.client, false, IF_LAN),
        (&t.gw, true, IF_LAN),
        (&t.gw, true, IF_WANX),
        (&t.ispx, true, IF_CUST),
    ] {
        enable_ipv6(ns, &[ifname], fwd);
    }
    ip6(&t.client, "addr add fd00:1::2/64 dev lan0 nodad");
    ip6(&t.client, "addr add 2001:db8:50::2/64 dev lan0 nodad");
    ip6(&t.client, "route add default via fd00:1::1");
    ip6(&t.gw, "addr add fd00:1::1/64 dev lan0 nodad");
    ip6(&t.gw, "addr add 2001:db8:50::1/64 dev lan0 nodad");
    ip6(&t.gw, "addr add 2001:db8:11::1/64 dev wanx nodad");
    ip6(&t.gw, "route add default via 2001:db8:11::fe dev wanx");
    ip6(&t.ispx, "addr add 2001:db8:11::fe/64 dev cust nodad");
    ip6(&t.ispx, "route add 2001:db8:50::/64 via 2001:db8:11::1");
    let ula = count_from6(&t.ispx, "fd00::/8");
    let routed = count_from6(&t.ispx, "2001:db8:50::/64");
    let gw = Gateway::start(
        &t.gw,
        &config_for(&t, [1, 1], "").replacen(
            "name = \"x\"\n",
            "name = \"x\"\nrouted_prefixes = [\"2001:db8:50::/64\"]\n",
            1,
        ),
    );
    // Three datagrams from `src` to the ISP router, through uplink x.
    let send = |src: &str| {
        let to: std::net::SocketAddr = "[2001:db8:11::fe]:9".parse().expect("address");
        t.client.run(|| {
            let sock =
                std::net::UdpSocket::bind((src.parse::<std::net::Ipv6Addr>().expect("v6"), 0))
                    .expect("bind");
            for _ in 0..3 {
                sock.send_to(b"leak?", to).expect("send");
            }
        });
    };
    let before = gw.reason("foreign_source");
    send("fd00:1::2");
    eventually(
        Duration::from_secs(3),
        "the guard counts the ULA datagrams",
        || gw.reason("foreign_source") >= before + 3,
    );
    assert_eq!(ula(), 0, "a ULA source left uplink x");
    send("2001:db8:50::2");
    eventually(
        Duration::from_secs(3),
        "the routed prefix reaches the ISP",
        || routed() >= 3,
    );
    assert_eq!(ula(), 0, "a ULA source left uplink x");
}
