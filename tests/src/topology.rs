//! Ready-made topologies: client(s) - gw - two ISPs - internet host.
//!
//! ```text
//!  client(lan0) --- (lan0) gw (wanx) --- (cust) ispx (core) --- (ix) inet
//!                          gw (wany) --- (cust) ispy (core) --- (iy) inet
//! ```
//!
//! The gw gets addresses and connected routes only (no default route, no
//! NAT): installing routing is the daemon's job. Every namespace has
//! `rp_filter` off and IPv6 disabled (no stray RS/MLD traffic); `gw` and
//! the ISPs forward IPv4. Each ISP drops and counts forwarded packets from
//! its customer link whose source is not its customer's address.

use std::net::Ipv4Addr;

use crate::netns::NetNs;
use crate::tun::{TunRelay, create_tun};
use crate::veth::{addr, addr_peer, bridge, enslave, link_up, route, set_mtu, veth};

// Interface names (fixed; they live in per-test namespaces).
pub const IF_LAN: &str = "lan0";
pub const IF_LAN1: &str = "lan1";
pub const IF_WANX: &str = "wanx";
pub const IF_WANY: &str = "wany";
pub const IF_WAN0: &str = "wan0";
pub const IF_CUST: &str = "cust";
pub const IF_CORE: &str = "core";
pub const IF_INET_X: &str = "ix";
pub const IF_INET_Y: &str = "iy";
pub const IF_BRIDGE: &str = "br0";

// LAN side.
pub const LAN_NET: &str = "198.18.1.0/24";
pub const GW_LAN: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
pub const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 2);
pub const LAN1_NET: &str = "198.18.2.0/24";
pub const GW_LAN1: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 1);
pub const CLIENT2_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 2);

// Uplink X: gw wanx <-> ispx cust.
pub const UPLINK_X_NET: &str = "198.18.11.0/24";
pub const UPLINK_X_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 11, 1);
pub const UPLINK_X_GW: Ipv4Addr = Ipv4Addr::new(198, 18, 11, 254);
// Uplink Y: gw wany <-> ispy cust.
pub const UPLINK_Y_NET: &str = "198.18.22.0/24";
pub const UPLINK_Y_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 22, 1);
pub const UPLINK_Y_GW: Ipv4Addr = Ipv4Addr::new(198, 18, 22, 254);
pub const UPLINK_PREFIX_LEN: u8 = 24;

// Shared-NIC variant: gw wan0 carries both addresses on one segment.
pub const SHARED_NET: &str = "198.18.10.0/24";
pub const SHARED_X_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 10, 1);
pub const SHARED_Y_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 10, 2);
pub const SHARED_X_GW: Ipv4Addr = Ipv4Addr::new(198, 18, 10, 254);
pub const SHARED_Y_GW: Ipv4Addr = Ipv4Addr::new(198, 18, 10, 253);

// ISP cores and the internet host.
pub const ISPX_CORE: Ipv4Addr = Ipv4Addr::new(198, 19, 1, 1);
pub const INET_X: Ipv4Addr = Ipv4Addr::new(198, 19, 1, 10);
pub const ISPY_CORE: Ipv4Addr = Ipv4Addr::new(198, 19, 2, 1);
pub const INET_Y: Ipv4Addr = Ipv4Addr::new(198, 19, 2, 10);
pub const CORE_PREFIX_LEN: u8 = 24;
/// Service addresses on the internet host (`/32` on `lo`).
pub const INET_SERVICE: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);
pub const INET_SERVICE2: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 11);
/// Covers all "internet" addresses (cores and services).
pub const INET_NET: &str = "198.19.0.0/16";

// IPv6 (`Topology::add_ipv6`): the LAN's ULA, each uplink's link and the
// prefix its ISP routes to the gateway, the ISP cores and the internet.
pub const LAN6_NET: &str = "fd00:1::/64";
pub const GW_LAN6: &str = "fd00:1::1";
pub const CLIENT6_ADDR: &str = "fd00:1::2";
pub const UPLINK_X_ADDR6: &str = "2001:db8:11::1";
pub const UPLINK_X_GW6: &str = "2001:db8:11::fe";
/// Routed by ISP x to the gateway: what NPTv6 maps the LAN onto.
pub const UPLINK_X_PREFIX6: &str = "2001:db8:11:100::/64";
pub const UPLINK_Y_ADDR6: &str = "2001:db8:22::1";
pub const UPLINK_Y_GW6: &str = "2001:db8:22::fe";
pub const UPLINK_Y_PREFIX6: &str = "2001:db8:22:100::/64";
pub const INET_SERVICE6: &str = "2001:db8:ff::10";

/// Which topology was built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopologyKind {
    Standard,
    TwoClients,
    SharedNic,
    /// The seed's 4.2.5: one gw address, two routers on its segment.
    SharedAddress,
    TunUplink,
}

/// Which ISP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isp {
    X,
    Y,
}

/// One uplink as seen from the gw (what a daemon config needs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UplinkInfo {
    pub isp: Isp,
    /// gw interface.
    pub ifname: &'static str,
    /// gw address on it.
    pub addr: Ipv4Addr,
    pub prefix_len: u8,
    /// The ISP's router (next hop).
    pub gateway: Ipv4Addr,
    /// True for the TUN (no Ethernet header) uplink.
    pub l3_only: bool,
}

/// A built topology; dropping it removes everything (relay first).
#[derive(Debug)]
pub struct Topology {
    /// Relay joining the TUN uplink (only for [`Topology::tun_uplink`]).
    pub tun_relay: Option<TunRelay>,
    pub kind: TopologyKind,
    pub client: NetNs,
    /// Second LAN client (only for [`Topology::two_clients`]).
    pub client2: Option<NetNs>,
    pub gw: NetNs,
    pub ispx: NetNs,
    pub ispy: NetNs,
    pub inet: NetNs,
    /// Ethernet segment with bridge `br0` (only for [`Topology::shared_nic`]).
    pub seg: Option<NetNs>,
}

/// A namespace with the harness defaults (see module docs): `rp_filter`
/// off, IPv6 off, IPv4 forwarding as asked.
pub fn base_ns(prefix: &str, forwarding: bool) -> NetNs {
    let ns = NetNs::new(prefix);
    for key in [
        "net.ipv4.conf.all.rp_filter",
        "net.ipv4.conf.default.rp_filter",
    ] {
        ns.sysctl(key, "0");
    }
    if std::path::Path::new("/proc/sys/net/ipv6").exists() {
        for key in [
            "net.ipv6.conf.all.disable_ipv6",
            "net.ipv6.conf.default.disable_ipv6",
        ] {
            ns.sysctl(key, "1");
        }
    }
    ns.sysctl("net.ipv4.ip_forward", if forwarding { "1" } else { "0" });
    ns
}

/// Turns IPv6 on in `ns` and on its interfaces `ifs` (the test bed turns
/// it off), without duplicate address detection, and forwarding as asked.
pub fn enable_ipv6(ns: &NetNs, ifs: &[&str], forwarding: bool) {
    // No DAD everywhere first: turning IPv6 on for `all` turns it on for
    // every interface, and a link-local address still tentative then
    // leaves neighbour discovery unanswered for a second or more.
    let scopes = || ["all", "default"].into_iter().chain(ifs.iter().copied());
    for scope in scopes() {
        ns.sysctl(&format!("net.ipv6.conf.{scope}.accept_dad"), "0");
    }
    for scope in scopes() {
        ns.sysctl(&format!("net.ipv6.conf.{scope}.disable_ipv6"), "0");
    }
    ns.sysctl(
        "net.ipv6.conf.all.forwarding",
        if forwarding { "1" } else { "0" },
    );
}

/// `ip -6 ARGS` in `ns` (words split on whitespace); panics on failure.
pub fn ip6(ns: &NetNs, args: &str) {
    let mut cmd = vec!["ip", "-6"];
    cmd.extend(args.split_whitespace());
    ns.exec(&cmd);
}

fn cidr(a: Ipv4Addr, len: u8) -> String {
    format!("{a}/{len}")
}

/// `iptables -w -A FORWARD -i cust ! -s ALLOWED -j DROP`, and a rule in
/// `raw` PREROUTING that counts every packet arriving from the customer
/// with another source, forwarded or not: the capture that says whether
/// anything foreign left the gateway.
fn anti_spoof(isp: &NetNs, allowed: &str) {
    anti_spoof_from(isp, allowed, None);
}

/// [`anti_spoof`] on a segment shared with other hosts: only frames from
/// the gateway's MAC `gw_mac` are counted (the other router's own IGMP and
/// ARP-driven traffic is no leak).
fn anti_spoof_from(isp: &NetNs, allowed: &str, gw_mac: Option<&str>) {
    isp.exec(&[
        "iptables", "-w", "-A", "FORWARD", "-i", IF_CUST, "!", "-s", allowed, "-j", "DROP",
    ]);
    let mut count = vec![
        "iptables",
        "-w",
        "-t",
        "raw",
        "-A",
        "PREROUTING",
        "-i",
        IF_CUST,
        "!",
        "-s",
        allowed,
    ];
    if let Some(mac) = gw_mac {
        count.extend(["-m", "mac", "--mac-source", mac]);
    }
    isp.exec(&count);
}

/// A bridged segment joining gw `wan0`, ispx `cust` and ispy `cust`.
fn segment(p: &Parts, tag: &str) -> NetNs {
    let seg = base_ns(tag, false);
    bridge(&seg, IF_BRIDGE);
    for (ns, ifname, port) in [
        (&p.gw, IF_WAN0, "pgw"),
        (&p.ispx, IF_CUST, "pispx"),
        (&p.ispy, IF_CUST, "pispy"),
    ] {
        veth(ns, ifname, &seg, port);
        enslave(&seg, port, IF_BRIDGE);
    }
    seg
}

/// Packets that reached `ns` on `cust` with a source other than its
/// customer's: the `raw` counting rule of [`anti_spoof`].
pub fn foreign_source_count(ns: &NetNs) -> u64 {
    raw_prerouting_count(ns, "iptables", |f| {
        f.contains(&IF_CUST) && f.iter().any(|w| w.starts_with('!'))
    })
}

/// Adds an ip6tables rule in `raw` PREROUTING of `ns` that counts what
/// arrives on `cust` from `prefix`; returns the count so far, read anew
/// at each call.
pub fn count_from6<'a>(ns: &'a NetNs, prefix: &str) -> impl Fn() -> u64 + 'a {
    ns.exec(&[
        "ip6tables",
        "-w",
        "-t",
        "raw",
        "-A",
        "PREROUTING",
        "-i",
        IF_CUST,
        "-s",
        prefix,
    ]);
    let prefix = prefix.to_owned();
    move || raw_prerouting_count(ns, "ip6tables", |f| f.contains(&prefix.as_str()))
}

/// Packets counted by the `raw` PREROUTING rules of `tool` (`iptables`
/// or `ip6tables`) in `ns` whose listed fields `matches` accepts.
pub fn raw_prerouting_count(ns: &NetNs, tool: &str, matches: impl Fn(&[&str]) -> bool) -> u64 {
    let text = ns.exec_stdout(&[
        tool,
        "-w",
        "-t",
        "raw",
        "-L",
        "PREROUTING",
        "-v",
        "-x",
        "-n",
    ]);
    text.lines()
        .filter_map(|l| {
            let f: Vec<_> = l.split_whitespace().collect();
            let pkts: u64 = f.first()?.parse().ok()?;
            matches(&f).then_some(pkts)
        })
        .sum()
}

/// Packet count of the anti-spoofing DROP rule(s) (on `cust`) in `ns`.
pub fn spoof_drop_count(ns: &NetNs) -> u64 {
    let text = ns.exec_stdout(&["iptables", "-w", "-L", "FORWARD", "-v", "-x", "-n"]);
    parse_drop_count(&text, IF_CUST)
}

fn parse_drop_count(text: &str, in_if: &str) -> u64 {
    text.lines()
        .filter_map(|l| {
            let f: Vec<_> = l.split_whitespace().collect();
            // pkts bytes target prot opt in out source destination
            let pkts: u64 = f.first()?.parse().ok()?;
            (f.get(2) == Some(&"DROP") && f.contains(&in_if)).then_some(pkts)
        })
        .sum()
}

/// The namespaces and links shared by all variants except the uplinks.
struct Parts {
    client: NetNs,
    gw: NetNs,
    ispx: NetNs,
    ispy: NetNs,
    inet: NetNs,
}

fn common_parts() -> Parts {
    let p = Parts {
        client: base_ns("cl", false),
        gw: base_ns("gw", true),
        ispx: base_ns("ix", true),
        ispy: base_ns("iy", true),
        inet: base_ns("in", false),
    };
    // LAN.
    veth(&p.client, IF_LAN, &p.gw, IF_LAN);
    addr(&p.client, IF_LAN, &cidr(CLIENT_ADDR, 24));
    route(&p.client, &format!("default via {GW_LAN}"));
    addr(&p.gw, IF_LAN, &cidr(GW_LAN, 24));
    // ISP cores <-> internet host.
    veth(&p.ispx, IF_CORE, &p.inet, IF_INET_X);
    veth(&p.ispy, IF_CORE, &p.inet, IF_INET_Y);
    addr(&p.ispx, IF_CORE, &cidr(ISPX_CORE, CORE_PREFIX_LEN));
    addr(&p.ispy, IF_CORE, &cidr(ISPY_CORE, CORE_PREFIX_LEN));
    addr(&p.inet, IF_INET_X, &cidr(INET_X, CORE_PREFIX_LEN));
    addr(&p.inet, IF_INET_Y, &cidr(INET_Y, CORE_PREFIX_LEN));
    route(&p.ispx, &format!("default via {INET_X}"));
    route(&p.ispy, &format!("default via {INET_Y}"));
    addr(&p.inet, "lo", &cidr(INET_SERVICE, 32));
    addr(&p.inet, "lo", &cidr(INET_SERVICE2, 32));
    p
}

/// Standard per-ISP uplinks (veth, or TUN for X when `tun_x`).
fn separate_uplinks(p: &Parts, tun_x: bool) -> Option<TunRelay> {
    let relay = if tun_x {
        let gw_fd = create_tun(&p.gw, IF_WANX);
        let isp_fd = create_tun(&p.ispx, IF_CUST);
        link_up(&p.gw, IF_WANX);
        link_up(&p.ispx, IF_CUST);
        addr_peer(
            &p.gw,
            IF_WANX,
            &UPLINK_X_ADDR.to_string(),
            &UPLINK_X_GW.to_string(),
        );
        addr_peer(
            &p.ispx,
            IF_CUST,
            &UPLINK_X_GW.to_string(),
            &UPLINK_X_ADDR.to_string(),
        );
        set_mtu(&p.gw, IF_WANX, 1500);
        set_mtu(&p.ispx, IF_CUST, 1500);
        Some(TunRelay::start(gw_fd, isp_fd))
    } else {
        veth(&p.gw, IF_WANX, &p.ispx, IF_CUST);
        addr(&p.gw, IF_WANX, &cidr(UPLINK_X_ADDR, UPLINK_PREFIX_LEN));
        addr(&p.ispx, IF_CUST, &cidr(UPLINK_X_GW, UPLINK_PREFIX_LEN));
        None
    };
    veth(&p.gw, IF_WANY, &p.ispy, IF_CUST);
    addr(&p.gw, IF_WANY, &cidr(UPLINK_Y_ADDR, UPLINK_PREFIX_LEN));
    addr(&p.ispy, IF_CUST, &cidr(UPLINK_Y_GW, UPLINK_PREFIX_LEN));
    anti_spoof(&p.ispx, UPLINK_X_NET);
    anti_spoof(&p.ispy, UPLINK_Y_NET);
    route(&p.inet, &format!("{UPLINK_X_NET} via {ISPX_CORE}"));
    route(&p.inet, &format!("{UPLINK_Y_NET} via {ISPY_CORE}"));
    relay
}

impl Topology {
    fn assemble(kind: TopologyKind, p: Parts, relay: Option<TunRelay>) -> Topology {
        Topology {
            tun_relay: relay,
            kind,
            client: p.client,
            client2: None,
            gw: p.gw,
            ispx: p.ispx,
            ispy: p.ispy,
            inet: p.inet,
            seg: None,
        }
    }

    /// The seed recipe: one LAN, two ISPs on separate veth uplinks.
    pub fn standard() -> Topology {
        let p = common_parts();
        let relay = separate_uplinks(&p, false);
        Topology::assemble(TopologyKind::Standard, p, relay)
    }

    /// [`standard`](Self::standard) plus gw `lan1` 198.18.2.1/24 and `client2`.
    pub fn two_clients() -> Topology {
        let mut t = Topology::standard();
        t.kind = TopologyKind::TwoClients;
        let c2 = base_ns("cm", false);
        veth(&c2, IF_LAN, &t.gw, IF_LAN1);
        addr(&c2, IF_LAN, &cidr(CLIENT2_ADDR, 24));
        route(&c2, &format!("default via {GW_LAN1}"));
        addr(&t.gw, IF_LAN1, &cidr(GW_LAN1, 24));
        t.client2 = Some(c2);
        t
    }

    /// One gw NIC `wan0` with 198.18.10.1/24 and 198.18.10.2/24 on a bridged
    /// segment (namespace `seg`) shared with ispx (.254) and ispy (.253).
    /// ispx forwards only from .1, ispy only from .2.
    pub fn shared_nic() -> Topology {
        let p = common_parts();
        let seg = segment(&p, "sg");
        addr(&p.gw, IF_WAN0, &cidr(SHARED_X_ADDR, 24));
        addr(&p.gw, IF_WAN0, &cidr(SHARED_Y_ADDR, 24));
        addr(&p.ispx, IF_CUST, &cidr(SHARED_X_GW, 24));
        addr(&p.ispy, IF_CUST, &cidr(SHARED_Y_GW, 24));
        anti_spoof(&p.ispx, &cidr(SHARED_X_ADDR, 32));
        anti_spoof(&p.ispy, &cidr(SHARED_Y_ADDR, 32));
        route(&p.inet, &format!("{SHARED_X_ADDR}/32 via {ISPX_CORE}"));
        route(&p.inet, &format!("{SHARED_Y_ADDR}/32 via {ISPY_CORE}"));
        let mut t = Topology::assemble(TopologyKind::SharedNic, p, None);
        t.seg = Some(seg);
        t
    }

    /// The seed's 4.2.5 exactly: gw `wan0` has **one** address,
    /// 198.18.10.1/24, on a bridged segment (namespace `seg`) with two
    /// routers, ispx (.254) and ispy (.253). Each router NATs the segment to
    /// its own core address on to the internet, as a DSL router in the LAN
    /// does, so `inet` sees [`ISPX_CORE`] or [`ISPY_CORE`] as the peer.
    pub fn shared_address() -> Topology {
        let p = common_parts();
        let seg = segment(&p, "sa");
        addr(&p.gw, IF_WAN0, &cidr(SHARED_X_ADDR, 24));
        addr(&p.ispx, IF_CUST, &cidr(SHARED_X_GW, 24));
        addr(&p.ispy, IF_CUST, &cidr(SHARED_Y_GW, 24));
        let link =
            p.gw.exec_stdout(&["ip", "-br", "link", "show", "dev", IF_WAN0]);
        let mac = link
            .split_whitespace()
            .nth(2)
            .unwrap_or_else(|| panic!("no MAC in {link:?}"))
            .to_owned();
        for isp in [&p.ispx, &p.ispy] {
            anti_spoof_from(isp, &cidr(SHARED_X_ADDR, 32), Some(&mac));
            isp.exec(&[
                "iptables",
                "-w",
                "-t",
                "nat",
                "-A",
                "POSTROUTING",
                "-o",
                IF_CORE,
                "-j",
                "MASQUERADE",
            ]);
        }
        let mut t = Topology::assemble(TopologyKind::SharedAddress, p, None);
        t.seg = Some(seg);
        t
    }

    /// [`standard`](Self::standard) but uplink X is a TUN pair (no Ethernet
    /// header): gw `wanx` 198.18.11.1 peer 198.18.11.254, ispx `cust` the
    /// reverse, joined by [`TunRelay`] (a = gw, b = ispx). MTU 1500.
    pub fn tun_uplink() -> Topology {
        let p = common_parts();
        let relay = separate_uplinks(&p, true);
        Topology::assemble(TopologyKind::TunUplink, p, relay)
    }

    /// The second client; panics unless built with [`two_clients`](Self::two_clients).
    pub fn client2(&self) -> &NetNs {
        self.client2
            .as_ref()
            .expect("client2 exists only in Topology::two_clients()")
    }

    /// The segment namespace; panics unless built with [`shared_nic`](Self::shared_nic).
    pub fn seg(&self) -> &NetNs {
        self.seg
            .as_ref()
            .expect("seg exists only in Topology::shared_nic()")
    }

    pub fn isp(&self, isp: Isp) -> &NetNs {
        match isp {
            Isp::X => &self.ispx,
            Isp::Y => &self.ispy,
        }
    }

    /// The gw's uplinks for this topology.
    pub fn uplinks(&self) -> [UplinkInfo; 2] {
        match self.kind {
            TopologyKind::SharedAddress => [Isp::X, Isp::Y].map(|isp| UplinkInfo {
                isp,
                ifname: IF_WAN0,
                addr: SHARED_X_ADDR,
                prefix_len: 24,
                gateway: if isp == Isp::X {
                    SHARED_X_GW
                } else {
                    SHARED_Y_GW
                },
                l3_only: false,
            }),
            TopologyKind::SharedNic => [
                UplinkInfo {
                    isp: Isp::X,
                    ifname: IF_WAN0,
                    addr: SHARED_X_ADDR,
                    prefix_len: 24,
                    gateway: SHARED_X_GW,
                    l3_only: false,
                },
                UplinkInfo {
                    isp: Isp::Y,
                    ifname: IF_WAN0,
                    addr: SHARED_Y_ADDR,
                    prefix_len: 24,
                    gateway: SHARED_Y_GW,
                    l3_only: false,
                },
            ],
            kind => [
                UplinkInfo {
                    isp: Isp::X,
                    ifname: IF_WANX,
                    addr: UPLINK_X_ADDR,
                    prefix_len: if kind == TopologyKind::TunUplink {
                        32
                    } else {
                        UPLINK_PREFIX_LEN
                    },
                    gateway: UPLINK_X_GW,
                    l3_only: kind == TopologyKind::TunUplink,
                },
                UplinkInfo {
                    isp: Isp::Y,
                    ifname: IF_WANY,
                    addr: UPLINK_Y_ADDR,
                    prefix_len: UPLINK_PREFIX_LEN,
                    gateway: UPLINK_Y_GW,
                    l3_only: false,
                },
            ],
        }
    }

    pub fn uplink(&self, isp: Isp) -> UplinkInfo {
        let [x, y] = self.uplinks();
        if isp == Isp::X { x } else { y }
    }

    /// Sum of both ISPs' anti-spoofing DROP counters.
    pub fn spoofed_drops(&self) -> u64 {
        self.spoofed_drops_at(Isp::X) + self.spoofed_drops_at(Isp::Y)
    }

    /// Packets with a foreign source that reached either ISP from the
    /// gateway, counted before any routing or filtering there.
    pub fn foreign_sources(&self) -> u64 {
        foreign_source_count(&self.ispx) + foreign_source_count(&self.ispy)
    }

    /// One ISP's anti-spoofing DROP counter.
    pub fn spoofed_drops_at(&self, isp: Isp) -> u64 {
        spoof_drop_count(self.isp(isp))
    }

    /// Turns checksum offload back on (the topology turns it off to catch
    /// checksum bugs) at both ends of the LAN links and the veth uplinks:
    /// the real case, for tests that run both ways.
    pub fn enable_checksum_offloads(&self) {
        for (ns, ifname) in self.gateway_link_ends() {
            crate::veth::enable_offloads(ns, ifname);
        }
    }

    /// Turns GRO on at both ends of the LAN links and the veth uplinks:
    /// a frame XDP redirects into a veth is dropped unless the receiving
    /// peer runs NAPI, which GRO turns on (`veth_xdp_xmit`).
    pub fn enable_gro(&self) {
        for (ns, ifname) in self.gateway_link_ends() {
            ns.exec(&["ethtool", "-K", ifname, "gro", "on"]);
        }
    }

    /// Both ends of every Ethernet link of the gateway.
    fn gateway_link_ends(&self) -> Vec<(&NetNs, &'static str)> {
        let mut ends = vec![(&self.client, IF_LAN), (&self.gw, IF_LAN)];
        if let Some(c2) = &self.client2 {
            ends.extend([(c2, IF_LAN), (&self.gw, IF_LAN1)]);
        }
        for u in self.uplinks() {
            if !u.l3_only {
                ends.extend([(&self.gw, u.ifname), (self.isp(u.isp), IF_CUST)]);
            }
        }
        ends
    }

    /// Adds IPv6 to the standard topology: the client and gw `lan0` on
    /// [`LAN6_NET`] (client default via the gw), each uplink's link
    /// (`2001:db8:11::/64`, `2001:db8:22::/64`) with the ISP routing
    /// [`UPLINK_X_PREFIX6`] or [`UPLINK_Y_PREFIX6`] to the gw, and the
    /// internet host's [`INET_SERVICE6`] behind both ISPs. The gw gets
    /// addresses only. Each ISP counts, in `raw` PREROUTING, what arrives
    /// from its customer with a ULA source ([`Topology::ula_sources`]).
    pub fn add_ipv6(&self) {
        for (ns, ifs, fwd) in [
            (&self.client, &[IF_LAN][..], false),
            (&self.gw, &[IF_LAN, IF_WANX, IF_WANY][..], true),
            (&self.ispx, &[IF_CUST, IF_CORE][..], true),
            (&self.ispy, &[IF_CUST, IF_CORE][..], true),
            (&self.inet, &[IF_INET_X, IF_INET_Y, "lo"][..], false),
        ] {
            enable_ipv6(ns, ifs, fwd);
        }
        ip6(
            &self.client,
            &format!("addr add {CLIENT6_ADDR}/64 dev {IF_LAN} nodad"),
        );
        ip6(&self.client, &format!("route add default via {GW_LAN6}"));
        ip6(
            &self.gw,
            &format!("addr add {GW_LAN6}/64 dev {IF_LAN} nodad"),
        );
        ip6(
            &self.gw,
            &format!("addr add {UPLINK_X_ADDR6}/64 dev {IF_WANX} nodad"),
        );
        ip6(
            &self.gw,
            &format!("addr add {UPLINK_Y_ADDR6}/64 dev {IF_WANY} nodad"),
        );
        for (isp, gw6, gw_addr6, prefix, core, inet_if) in [
            (
                &self.ispx,
                UPLINK_X_GW6,
                UPLINK_X_ADDR6,
                UPLINK_X_PREFIX6,
                "2001:db8:1::",
                IF_INET_X,
            ),
            (
                &self.ispy,
                UPLINK_Y_GW6,
                UPLINK_Y_ADDR6,
                UPLINK_Y_PREFIX6,
                "2001:db8:2::",
                IF_INET_Y,
            ),
        ] {
            ip6(isp, &format!("addr add {gw6}/64 dev {IF_CUST} nodad"));
            ip6(isp, &format!("addr add {core}1/64 dev {IF_CORE} nodad"));
            ip6(isp, &format!("route add {prefix} via {gw_addr6}"));
            ip6(isp, &format!("route add default via {core}10"));
            ip6(
                &self.inet,
                &format!("addr add {core}10/64 dev {inet_if} nodad"),
            );
            let link = gw6.trim_end_matches("fe");
            ip6(&self.inet, &format!("route add {link}/48 via {core}1"));
            let _ = count_from6(isp, "fd00::/8");
        }
        ip6(&self.inet, &format!("addr add {INET_SERVICE6}/128 dev lo"));
    }

    /// IPv6 packets with a ULA source that reached either ISP from the
    /// gateway (see [`Topology::add_ipv6`]).
    pub fn ula_sources(&self) -> u64 {
        [&self.ispx, &self.ispy]
            .into_iter()
            .map(|ns| raw_prerouting_count(ns, "ip6tables", |f| f.contains(&"fd00::/8")))
            .sum()
    }

    /// Sets the MTU on both ends of an uplink (gw side and ISP `cust`).
    /// For a bottleneck further away use [`set_mtu`] on e.g. `ispx`/`core`.
    pub fn set_uplink_mtu(&self, isp: Isp, mtu: u32) {
        let up = self.uplink(isp);
        set_mtu(&self.gw, up.ifname, mtu);
        set_mtu(self.isp(isp), IF_CUST, mtu);
    }
}

#[cfg(test)]
mod tests {
    use super::parse_drop_count;

    #[test]
    fn parses_iptables_counters() {
        let text = "Chain FORWARD (policy ACCEPT 3 packets, 252 bytes)\n    \
            pkts      bytes target     prot opt in     out     source               destination\n       \
               7      588 DROP       0    --  cust   *      !198.18.11.0/24       0.0.0.0/0\n";
        assert_eq!(parse_drop_count(text, "cust"), 7);
        assert_eq!(parse_drop_count(text, "lan0"), 0);
    }
}
