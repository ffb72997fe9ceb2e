//! The bench's namespaces and the four ways of running the gateway in them.
//!
//! ```text
//!  client (lan0) --- (lan0) gw (wanx) --- (ix) inet
//!                           gw (wany) --- (iy) inet
//! ```
//!
//! One hop fewer than the test bed's topology: the "internet" host is the
//! uplinks' next hop, so the gateway's cost is not diluted by ISP routers.
//! veth offloads stay as the kernel sets them (on) unless
//! [`Net::set_offloads`] turns them off. `inet` drops the bench's UDP
//! (to 198.19.0.0/16) at its interfaces' ingress hook, the cheapest place,
//! so that the far end adds little to the cost being measured; it serves
//! TCP on [`SERVICE`].
use std::net::Ipv4Addr;

use anyhow::{Context as _, Result};
use testbed::{NetNs, addr, base_ns, route, veth_with_offloads};

pub const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 2);
pub const GW_LAN: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
pub const X_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 11, 1);
pub const X_GW: Ipv4Addr = Ipv4Addr::new(198, 18, 11, 254);
pub const Y_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 22, 1);
pub const Y_GW: Ipv4Addr = Ipv4Addr::new(198, 18, 22, 254);
/// TCP services on the internet host (on `lo`).
pub const SERVICE: Ipv4Addr = Ipv4Addr::new(198, 18, 250, 10);
/// Where the UDP load goes: a /16 that `inet` drops.
pub const SINK_BASE: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 0);

// IPv6 ([`Net::build_ipv6`]): the LAN's ULA, each uplink's link and the
// prefix `inet` routes to the gateway over it.
pub const CLIENT6: &str = "fd00:1::2";
pub const LAN6: &str = "fd00:1::/64";
pub const X_GW6: &str = "2001:db8:11::fe";
pub const Y_GW6: &str = "2001:db8:22::fe";
pub const X_PREFIX6: &str = "2001:db8:11:100::/64";
pub const Y_PREFIX6: &str = "2001:db8:22:100::/64";
/// Where the IPv6 load goes: a /48 that `inet` drops.
pub const SINK6_BASE: &str = "2001:db8:ff::";

/// Interfaces whose offloads the offload-off runs change (namespace, name).
const LINKS: [(Side, &str); 6] = [
    (Side::Client, "lan0"),
    (Side::Gw, "lan0"),
    (Side::Gw, "wanx"),
    (Side::Gw, "wany"),
    (Side::Inet, "ix"),
    (Side::Inet, "iy"),
];

#[derive(Clone, Copy)]
enum Side {
    Client,
    Gw,
    Inet,
}

pub struct Net {
    /// IPv6 is set up too ([`Net::build_ipv6`]).
    pub ipv6: bool,
    pub client: NetNs,
    pub gw: NetNs,
    pub inet: NetNs,
    /// The seed's topology ([`Net::build_seed`]): an ISP router per
    /// uplink between the gateway and the internet host.
    pub isps: Option<[NetNs; 2]>,
}

/// Loads an nftables ruleset into `ns`.
pub fn nft(ns: &NetNs, ruleset: &str) {
    let path = std::env::temp_dir().join(format!("{}.nft", ns.name()));
    std::fs::write(&path, ruleset).expect("writing an nft ruleset to /tmp");
    ns.exec(&["nft", "-f", &path.display().to_string()]);
    let _ = std::fs::remove_file(path);
}

fn mac(ns: &NetNs, ifname: &str) -> Result<String> {
    let out = ns.exec_stdout(&["ip", "-j", "link", "show", ifname]);
    let v: serde_json::Value = serde_json::from_str(&out).context("parsing `ip -j link`")?;
    v[0]["address"]
        .as_str()
        .map(str::to_string)
        .with_context(|| format!("no MAC address for {ifname} in {}", ns.name()))
}

impl Net {
    pub fn build() -> Net {
        let n = Net {
            ipv6: false,
            client: base_ns("bc", false),
            gw: base_ns("bg", true),
            inet: base_ns("bi", false),
            isps: None,
        };
        veth_with_offloads(&n.gw, "wanx", &n.inet, "ix");
        veth_with_offloads(&n.gw, "wany", &n.inet, "iy");
        addr(&n.inet, "ix", &format!("{X_GW}/24"));
        addr(&n.inet, "iy", &format!("{Y_GW}/24"));
        // Only for plain routing, which does not translate the LAN.
        route(&n.inet, &format!("198.18.1.0/24 via {X_ADDR}"));
        n.finish()
    }

    /// [`Net::build`] with IPv6 on every link: the client on [`LAN6`]
    /// (default via the gateway), each uplink's link `2001:db8:11::/64` or
    /// `2001:db8:22::/64` with `inet` routing [`X_PREFIX6`] or
    /// [`Y_PREFIX6`] to the gateway, the LAN's ULA too for plain routing,
    /// and [`SINK6_BASE`]/48 dropped at `inet`'s ingress like the IPv4
    /// load.
    pub fn build_ipv6() -> Net {
        let n = Net::build();
        for (ns, ifs, fwd) in [
            (&n.client, &["lan0"][..], false),
            (&n.gw, &["lan0", "wanx", "wany"][..], true),
            (&n.inet, &["ix", "iy"][..], false),
        ] {
            testbed::enable_ipv6(ns, ifs, fwd);
        }
        let ip6 = testbed::ip6;
        ip6(&n.client, &format!("addr add {CLIENT6}/64 dev lan0 nodad"));
        ip6(&n.client, "route add default via fd00:1::1");
        ip6(&n.gw, "addr add fd00:1::1/64 dev lan0 nodad");
        for (wan, inet_if, link, prefix) in [
            ("wanx", "ix", "2001:db8:11::", X_PREFIX6),
            ("wany", "iy", "2001:db8:22::", Y_PREFIX6),
        ] {
            ip6(&n.gw, &format!("addr add {link}1/64 dev {wan} nodad"));
            ip6(
                &n.inet,
                &format!("addr add {link}fe/64 dev {inet_if} nodad"),
            );
            ip6(
                &n.inet,
                &format!("route add {prefix} via {link}1 dev {inet_if}"),
            );
        }
        // Only for plain routing, which does not translate the LAN.
        ip6(
            &n.inet,
            &format!("route add {LAN6} via 2001:db8:11::1 dev ix"),
        );
        for chain in ["ix", "iy"] {
            n.inet.exec(&[
                "nft",
                "add",
                "rule",
                "netdev",
                "sink",
                chain,
                "ip6",
                "daddr",
                &format!("{SINK6_BASE}/48"),
                "drop",
            ]);
        }
        Net { ipv6: true, ..n }
    }

    /// The seed's topology: between each uplink and the internet host an
    /// ISP router that drops sources other than its customer's subnet
    /// (iptables, as the test bed's ISPs), so the internet host is two
    /// hops away. Plain routing's untranslated LAN sources die at the ISP.
    pub fn build_seed() -> Net {
        let isps = [base_ns("bx", true), base_ns("by", true)];
        let n = Net {
            ipv6: false,
            client: base_ns("bc", false),
            gw: base_ns("bg", true),
            inet: base_ns("bi", false),
            isps: None,
        };
        for (isp, (wan, (gw_addr, (net, (core, inet_if))))) in isps.iter().zip([
            ("wanx", (X_GW, ("198.18.11.0/24", ("198.18.101", "ix")))),
            ("wany", (Y_GW, ("198.18.22.0/24", ("198.18.102", "iy")))),
        ]) {
            veth_with_offloads(&n.gw, wan, isp, "cust");
            veth_with_offloads(isp, "core", &n.inet, inet_if);
            addr(isp, "cust", &format!("{gw_addr}/24"));
            addr(isp, "core", &format!("{core}.1/30"));
            addr(&n.inet, inet_if, &format!("{core}.2/30"));
            route(isp, &format!("default via {core}.2"));
            route(&n.inet, &format!("{net} via {core}.1"));
            let mut cmd = vec!["iptables", "-w", "-A", "FORWARD", "-i", "cust", "!", "-s"];
            cmd.extend([net, "-j", "DROP"]);
            isp.exec(&cmd);
        }
        Net {
            isps: Some(isps),
            ..n.finish()
        }
    }

    /// The LAN side, the addresses of the gateway and the internet
    /// host's sink and service.
    fn finish(self) -> Net {
        let n = self;
        veth_with_offloads(&n.client, "lan0", &n.gw, "lan0");
        addr(&n.client, "lan0", &format!("{CLIENT}/24"));
        route(&n.client, &format!("default via {GW_LAN}"));
        addr(&n.gw, "lan0", &format!("{GW_LAN}/24"));
        addr(&n.gw, "wanx", &format!("{X_ADDR}/24"));
        addr(&n.gw, "wany", &format!("{Y_ADDR}/24"));
        addr(&n.inet, "lo", &format!("{SERVICE}/32"));
        nft(
            &n.inet,
            &format!(
                "table netdev sink {{\n\
                 chain ix {{ type filter hook ingress device \"ix\" priority 0; ip daddr {SINK_BASE}/16 drop; }}\n\
                 chain iy {{ type filter hook ingress device \"iy\" priority 0; ip daddr {SINK_BASE}/16 drop; }}\n\
                 }}\n"
            ),
        );
        n
    }

    fn side(&self, s: Side) -> &NetNs {
        match s {
            Side::Client => &self.client,
            Side::Gw => &self.gw,
            Side::Inet => &self.inet,
        }
    }

    /// Turns checksum, segmentation and receive offloads on or off on
    /// every link of the path.
    pub fn set_offloads(&self, on: bool) {
        let v = if on { "on" } else { "off" };
        for (side, ifname) in LINKS {
            // GRO on veth needs NAPI; the kernel refuses nothing else here.
            self.side(side).exec(&[
                "ethtool", "-K", ifname, "tx", v, "rx", v, "tso", v, "gso", v,
            ]);
        }
    }

    /// Turns GRO on at both ends of every link: a frame XDP redirects
    /// into a veth is dropped unless the receiving peer runs NAPI, which
    /// GRO turns on (`veth_xdp_xmit`).
    pub fn enable_gro(&self) {
        for (side, ifname) in LINKS {
            self.side(side)
                .exec(&["ethtool", "-K", ifname, "gro", "on"]);
        }
        for isp in self.isps.iter().flatten() {
            isp.exec(&["ethtool", "-K", "cust", "gro", "on"]);
        }
    }

    /// The MAC addresses of the LAN link: (gateway, client).
    pub fn lan_macs(&self) -> Result<(String, String)> {
        Ok((mac(&self.gw, "lan0")?, mac(&self.client, "lan0")?))
    }

    /// Packets that reached the internet host on both uplinks; in the
    /// seed's topology, packets the gateway sent out of its uplinks (plain
    /// routing's die at the ISP).
    pub fn delivered(&self) -> u64 {
        if self.isps.is_some() {
            return ["wanx", "wany"]
                .iter()
                .map(|i| testbed::link_counters(&self.gw, i).tx_packets)
                .sum();
        }
        ["ix", "iy"]
            .iter()
            .map(|i| testbed::link_counters(&self.inet, i).rx_packets)
            .sum()
    }
}
