//! Thin wrappers over `ip`/`ethtool` for links, addresses and routes.

use crate::netns::NetNs;

/// Creates a veth pair `a_if` (in `a`) <-> `b_if` (in `b`), brings both ends
/// up and turns TX/RX checksum offload off on both (so checksum bugs show).
///
/// The pair is created from inside `a`, so the root namespace is never touched.
pub fn veth(a: &NetNs, a_if: &str, b: &NetNs, b_if: &str) {
    veth_with_offloads(a, a_if, b, b_if);
    disable_offloads(a, a_if);
    disable_offloads(b, b_if);
}

/// Like [`veth`], but keeps the kernel's default offloads (checksum, TSO,
/// GSO on), as a real gateway has them: for measurements.
pub fn veth_with_offloads(a: &NetNs, a_if: &str, b: &NetNs, b_if: &str) {
    veth_pair(a, a_if, b, b_if);
    if crate::xdp_forced() {
        // A frame XDP redirects into a veth is dropped unless the peer
        // runs NAPI, which GRO turns on (veth_xdp_xmit).
        for (ns, ifname) in [(a, a_if), (b, b_if)] {
            ns.exec(&["ethtool", "-K", ifname, "gro", "on"]);
        }
    }
}

fn veth_pair(a: &NetNs, a_if: &str, b: &NetNs, b_if: &str) {
    a.exec(&[
        "ip",
        "link",
        "add",
        a_if,
        "type",
        "veth",
        "peer",
        "name",
        b_if,
        "netns",
        b.name(),
    ]);
    link_up(a, a_if);
    link_up(b, b_if);
}

/// `ethtool -K IF tx off rx off`.
pub fn disable_offloads(ns: &NetNs, ifname: &str) {
    ns.exec(&["ethtool", "-K", ifname, "tx", "off", "rx", "off"]);
}

/// `ethtool -K IF tx on rx on`: checksum offload as a real NIC has it.
pub fn enable_offloads(ns: &NetNs, ifname: &str) {
    ns.exec(&["ethtool", "-K", ifname, "tx", "on", "rx", "on"]);
}

/// `ip link set IF up`.
pub fn link_up(ns: &NetNs, ifname: &str) {
    ns.exec(&["ip", "link", "set", ifname, "up"]);
}

/// `ip link set IF down`.
pub fn link_down(ns: &NetNs, ifname: &str) {
    ns.exec(&["ip", "link", "set", ifname, "down"]);
}

/// `ip addr add CIDR dev IF`, e.g. `addr(&gw, "lan0", "198.18.1.1/24")`.
pub fn addr(ns: &NetNs, ifname: &str, cidr: &str) {
    ns.exec(&["ip", "addr", "add", cidr, "dev", ifname]);
}

/// `ip addr add LOCAL peer PEER dev IF` (point-to-point address).
pub fn addr_peer(ns: &NetNs, ifname: &str, local: &str, peer: &str) {
    ns.exec(&["ip", "addr", "add", local, "peer", peer, "dev", ifname]);
}

/// `ip route add SPEC`, e.g. `route(&client, "default via 198.18.1.1")`.
pub fn route(ns: &NetNs, spec: &str) {
    ip_route(ns, "add", spec);
}

/// `ip route replace SPEC`.
pub fn route_replace(ns: &NetNs, spec: &str) {
    ip_route(ns, "replace", spec);
}

/// `ip route del SPEC`.
pub fn route_del(ns: &NetNs, spec: &str) {
    ip_route(ns, "del", spec);
}

fn ip_route(ns: &NetNs, verb: &str, spec: &str) {
    let mut args = vec!["ip", "route", verb];
    args.extend(spec.split_whitespace());
    ns.exec(&args);
}

/// `ip link set IF mtu MTU`.
pub fn set_mtu(ns: &NetNs, ifname: &str, mtu: u32) {
    ns.exec(&["ip", "link", "set", ifname, "mtu", &mtu.to_string()]);
}

/// Creates a dummy interface and brings it up.
pub fn dummy(ns: &NetNs, ifname: &str) {
    ns.exec(&["ip", "link", "add", ifname, "type", "dummy"]);
    link_up(ns, ifname);
}

/// Creates a bridge (STP off, so ports forward at once) and brings it up.
pub fn bridge(ns: &NetNs, ifname: &str) {
    ns.exec(&[
        "ip",
        "link",
        "add",
        ifname,
        "type",
        "bridge",
        "stp_state",
        "0",
    ]);
    link_up(ns, ifname);
}

/// `ip link set PORT master BRIDGE`.
pub fn enslave(ns: &NetNs, port: &str, bridge: &str) {
    ns.exec(&["ip", "link", "set", port, "master", bridge]);
}

/// Interface counters as in `/proc/net/dev`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkCounters {
    pub rx_bytes: u64,
    pub rx_packets: u64,
    pub rx_dropped: u64,
    pub tx_bytes: u64,
    pub tx_packets: u64,
    pub tx_dropped: u64,
}

/// Reads `ifname`'s counters from the namespace's `/proc/net/dev`.
pub fn link_counters(ns: &NetNs, ifname: &str) -> LinkCounters {
    let text = ns
        .run(|| std::fs::read_to_string("/proc/thread-self/net/dev"))
        .unwrap_or_else(|e| panic!("[netns {}] cannot read /proc/net/dev: {e}", ns.name()));
    parse_net_dev(&text, ifname).unwrap_or_else(|| {
        panic!(
            "[netns {}] no interface {ifname} in /proc/net/dev",
            ns.name()
        )
    })
}

fn parse_net_dev(text: &str, ifname: &str) -> Option<LinkCounters> {
    text.lines().skip(2).find_map(|line| {
        let (name, rest) = line.split_once(':')?;
        if name.trim() != ifname {
            return None;
        }
        let v: Vec<u64> = rest
            .split_whitespace()
            .filter_map(|f| f.parse().ok())
            .collect();
        (v.len() >= 16).then(|| LinkCounters {
            rx_bytes: v[0],
            rx_packets: v[1],
            rx_dropped: v[3],
            tx_bytes: v[8],
            tx_packets: v[9],
            tx_dropped: v[11],
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_net_dev() {
        let text = "Inter-|   Receive                                                |  Transmit\n \
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n    \
 lo:     100       2    0    0    0     0          0         0      100       2    0    0    0     0       0          0\n  \
 lan0:    5000      40    0    1    0     0          0         0     7000      50    0    3    0     0       0          0\n";
        let c = parse_net_dev(text, "lan0").expect("lan0");
        assert_eq!(
            c,
            LinkCounters {
                rx_bytes: 5000,
                rx_packets: 40,
                rx_dropped: 1,
                tx_bytes: 7000,
                tx_packets: 50,
                tx_dropped: 3
            }
        );
        assert!(parse_net_dev(text, "wanx").is_none());
    }
}
