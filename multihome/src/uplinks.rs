//! From config and interface state to what the datapath and the routing
//! tables need: uplink slots, LAN prefixes, routed prefixes.
use std::net::Ipv4Addr;

use multihome_common::{
    LanNet, MAX_LAN6, MAX_UPLINKS, MODE6_NAT66, MODE6_NPT, NextHop, RoutedUplinks, UPLINK_CANARY,
    UPLINK_CONFIGURED, UPLINK_DEGRADED, UPLINK_DRAIN_RESET, UPLINK_DRAINED, UPLINK_EVACUATE,
    UPLINK_EVACUATE_TCP, UPLINK_HELD_DOWN, UPLINK_L3, UPLINK_LINK_DOWN, UPLINK_OUTAGE,
    UPLINK_PROBES_FAIL, UPLINK_RESET_TCP, UPLINK_TRAFFIC_DOWN, UPLINK_USABLE, Uplink, Uplink6,
    npt_adjustment,
};

use crate::{
    config::{Config, Mode6, MssClamp, Prefix, Prefix6, UplinkConfig},
    health::passive,
    netinfo::Snapshot,
    routing::{RoutingPlan, SharedSource, UplinkRoutes},
    routing6::Uplink6Routes,
};

/// Why an uplink does or does not take new flows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UplinkState {
    Up,
    /// The interface is missing or has no carrier.
    LinkDown,
    NoAddress,
}

impl UplinkState {
    pub fn name(self) -> &'static str {
        match self {
            UplinkState::Up => "up",
            UplinkState::LinkDown => "down",
            UplinkState::NoAddress => "no-address",
        }
    }
}

/// One uplink as the daemon sees it now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observed {
    pub ifindex: u32,
    pub address: Option<Ipv4Addr>,
    pub mtu: u32,
    pub l3: bool,
    /// The device's MAC (Ethernet only).
    pub mac: Option<[u8; 6]>,
    pub state: UplinkState,
}

fn name_bytes(s: &str) -> [u8; 16] {
    let mut b = [0u8; 16];
    let n = s.len().min(15);
    b[..n].copy_from_slice(&s.as_bytes()[..n]);
    b
}

pub fn name_from_bytes(b: &[u8; 16]) -> String {
    let end = b.iter().position(|c| *c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// The uplink's SNAT address: the configured one, else the interface's
/// address in the gateway's subnet, else its primary address.
fn address_of(u: &UplinkConfig, snap: &Snapshot) -> Option<Ipv4Addr> {
    let iface = snap.get(&u.interface)?;
    if let Some(a) = u.address {
        return iface.addrs.iter().any(|(x, _)| *x == a).then_some(a);
    }
    if let Some(gw) = u.gateway {
        let gw = u32::from(gw);
        for (a, len) in &iface.addrs {
            let mask = Prefix {
                addr: *a,
                len: *len,
            }
            .mask();
            if u32::from(*a) & mask == gw & mask {
                return Some(*a);
            }
        }
    }
    iface.addrs.first().map(|(a, _)| *a)
}

pub fn observe(u: &UplinkConfig, snap: &Snapshot) -> Observed {
    let iface = snap.get(&u.interface);
    let address = address_of(u, snap);
    let state = match (iface, address) {
        (None, _) => UplinkState::LinkDown,
        (Some(i), _) if !i.up => UplinkState::LinkDown,
        (Some(_), None) => UplinkState::NoAddress,
        (Some(_), Some(_)) => UplinkState::Up,
    };
    Observed {
        ifindex: iface.map_or(0, |i| i.index),
        address,
        mtu: iface.map_or(0, |i| i.mtu),
        l3: iface.is_some_and(|i| i.l3),
        mac: iface.and_then(|i| i.mac),
        state,
    }
}

/// What `NEXT_HOPS` (or `NEXT_HOPS6`) holds for an uplink as observed
/// (`o`), with a `gateway` (`gateway`, or for IPv6 `gateway6` or its RA's
/// router) whose MAC is `gateway_mac` if the kernel knows it: what
/// `bpf_fib_lookup` in the uplink's table (`default via G dev I`, or
/// `default dev I` on an L3 link) would answer. Valid while the link is
/// up with an address and, on Ethernet, both MACs are known; an Ethernet
/// uplink without a gateway is never cached.
pub fn next_hop(gateway: bool, o: &Observed, gateway_mac: Option<[u8; 6]>) -> NextHop {
    let macs = match (o.l3, gateway_mac, o.mac, gateway) {
        (true, ..) => Some([0; 12]),
        (false, Some(dst), Some(src), true) => {
            let mut mac = [0; 12];
            mac[..6].copy_from_slice(&dst);
            mac[6..].copy_from_slice(&src);
            Some(mac)
        }
        _ => None,
    };
    match macs {
        Some(mac) if o.state == UplinkState::Up => NextHop {
            mac,
            ifindex: o.ifindex,
            mtu: o.mtu,
            valid: 1,
        },
        _ => NextHop::default(),
    }
}

/// The `skb->mark` of uplink `id` (its index in the config): by its slot.
/// `multihome uplink drain`: whether the operator took the uplink out of
/// use, and whether its flows go too.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Drain {
    #[default]
    No,
    /// No new flows; pinned ones stay.
    Keep,
    /// `--reset`: no new flows, and each pinned flow is reset (TCP) or
    /// moved at its next packet, as `on_down = "reset"` does.
    Reset,
}

/// Which of a down uplink's flows move on their next packet.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Evacuate {
    /// Not down, or not for long enough.
    #[default]
    None,
    /// Down long enough, with `on_down = "keep"`: only flows of policies
    /// with their own `on_down` act.
    Keep,
    NotTcp,
    All,
    /// Non-TCP flows move; answered TCP flows are reset.
    ResetTcp,
}

pub fn mark(config: &Config, id: usize) -> u32 {
    config.routing.mark_base | (u32::from(config.uplinks[id].slot) + 1)
}

/// The routing table of uplink `id`: by its slot.
pub fn table(config: &Config, id: usize) -> u32 {
    config.routing.table_base + u32::from(config.uplinks[id].slot)
}

/// What the probes say about an uplink, and what its outage does.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Probed {
    pub failing: bool,
    /// Down long enough for `on_down` to act: flows of these protocols
    /// move on their next packet.
    pub evacuate: Evacuate,
    /// Back from an outage, but out of use for `hold_down_ms`.
    pub held: bool,
    /// What live traffic says (passive health).
    pub traffic: passive::Verdict,
    pub rtt_ms: Option<f64>,
    pub loss_pct: f64,
}

impl Probed {
    /// Neither probes nor live traffic nor a hold-down keep it out.
    pub fn in_service(&self) -> bool {
        !self.failing && !self.held && !matches!(self.traffic, passive::Verdict::Down { .. })
    }
}

/// The datapath's slot for uplink `id`.
pub fn slot(config: &Config, id: usize, o: &Observed, probed: &Probed, drain: Drain) -> Uplink {
    let u = &config.uplinks[id];
    let drained = drain != Drain::No;
    let mut flags = UPLINK_CONFIGURED;
    if o.state == UplinkState::Up && probed.in_service() && !drained {
        flags |= UPLINK_USABLE;
    }
    match probed.traffic {
        passive::Verdict::Healthy => {}
        passive::Verdict::Down { .. } => flags |= UPLINK_TRAFFIC_DOWN,
        passive::Verdict::Canary { .. } => flags |= UPLINK_CANARY,
        passive::Verdict::Degraded { .. } => flags |= UPLINK_DEGRADED,
    }
    if probed.held {
        flags |= UPLINK_HELD_DOWN;
    }
    if drained {
        flags |= UPLINK_DRAINED;
    }
    if probed.failing {
        flags |= UPLINK_PROBES_FAIL;
    }
    if o.state == UplinkState::LinkDown {
        flags |= UPLINK_LINK_DOWN;
    }
    if o.l3 {
        flags |= UPLINK_L3;
    }
    match probed.evacuate {
        Evacuate::None => {}
        Evacuate::Keep => flags |= UPLINK_OUTAGE,
        Evacuate::NotTcp => flags |= UPLINK_OUTAGE | UPLINK_EVACUATE,
        Evacuate::All => flags |= UPLINK_OUTAGE | UPLINK_EVACUATE | UPLINK_EVACUATE_TCP,
        Evacuate::ResetTcp => flags |= UPLINK_OUTAGE | UPLINK_EVACUATE | UPLINK_RESET_TCP,
    }
    if drain == Drain::Reset {
        flags |= UPLINK_OUTAGE | UPLINK_EVACUATE | UPLINK_RESET_TCP | UPLINK_DRAIN_RESET;
    }
    Uplink {
        addr_be: o.address.map_or(0, |a| u32::from(a).to_be()),
        gateway_be: u.gateway.map_or(0, |a| u32::from(a).to_be()),
        ifindex: o.ifindex,
        table: table(config, id),
        mark: mark(config, id),
        mtu: o.mtu.min(u16::MAX as u32) as u16,
        flags,
        weight: u.weight,
        rtt_us: probed.rtt_ms.map_or(0, |r| (r * 1000.0) as u32),
        loss_permille: (probed.loss_pct * 10.0) as u32,
        name: name_bytes(&u.name),
        ifname: name_bytes(&u.interface),
        mss_clamp: mss_clamp(u, o),
        _pad: 0,
    }
}

/// The MSS clamp for an uplink as it is now: by default "auto" on links
/// without an Ethernet header (ppp, tun: PPPoE's 1492 and PMTU black holes
/// are common there), "off" elsewhere.
pub fn mss_clamp(u: &UplinkConfig, o: &Observed) -> u16 {
    let default = if o.l3 { MssClamp::Auto } else { MssClamp::Off };
    u.mss_clamp.unwrap_or(default).bytes(o.mtu)
}

/// Source prefixes whose flows may be translated.
pub fn lan_nets(config: &Config, snap: &Snapshot) -> Vec<LanNet> {
    let mut nets = Vec::new();
    for name in &config.lan {
        if let Some(i) = snap.get(name) {
            for (a, len) in &i.addrs {
                let net = Prefix {
                    addr: *a,
                    len: *len,
                };
                nets.push(LanNet {
                    addr_be: u32::from(net.network()).to_be(),
                    mask_be: net.mask().to_be(),
                    ifindex: i.index,
                    in_use: 1,
                });
            }
        }
    }
    for p in config.lan_prefixes() {
        nets.push(LanNet {
            addr_be: u32::from(p.network()).to_be(),
            mask_be: p.mask().to_be(),
            ifindex: 0,
            in_use: 1,
        });
    }
    nets
}

/// [`multihome_common::MAP_ROUTED`]'s entries: every routed prefix with
/// the uplinks (a bit each) whose prefixes contain it, so that the longest
/// match alone answers for every uplink.
pub fn routed_table(config: &Config) -> Vec<(Prefix, RoutedUplinks)> {
    fold_routed(config, &config.routed_prefixes(), |p| Prefix {
        addr: p.network(),
        len: p.len,
    })
}

/// Uplink `id`'s IPv6 translation, an entry per internal prefix (for
/// `uplink6_slot(id, 0..)`): NPTv6 of each onto its subnet of the
/// uplink's `prefix6`, or NAT66 onto its one address. Empty (no IPv6
/// flows) unless every internal prefix can be mapped.
pub fn uplink6(config: &Config, id: usize) -> Vec<Uplink6> {
    let inner = config.internal6();
    let lans = inner.len().min(MAX_LAN6 as usize) as u8;
    let entry = |inner: Prefix6, outer: [u8; 16], mode, adjust| Uplink6 {
        inner: inner.network().octets(),
        outer,
        prefix_len: inner.len,
        mode,
        adjust,
        lans,
        ..Default::default()
    };
    if config.uplinks[id].mode6 == Mode6::Nat66 {
        let Some(addr) = config.outer6(id) else {
            return Vec::new();
        };
        return inner
            .iter()
            .take(MAX_LAN6 as usize)
            .enumerate()
            .map(|(k, (_, p))| Uplink6 {
                k: k as u8,
                span: addr.addr.octets(),
                span_len: 128,
                ..entry(*p, addr.addr.octets(), MODE6_NAT66, 0)
            })
            .collect();
    }
    let delegated_len = config.uplinks[id]
        .learned6
        .filter(|_| config.learns_prefix6(id))
        .map_or(0, |l| l.delegated.len);
    let pairs: Vec<_> = config
        .npt_pairs(id)
        .into_iter()
        .take(MAX_LAN6 as usize)
        .collect();
    let span = span6(pairs.iter().map(|(_, o)| *o));
    pairs
        .into_iter()
        .enumerate()
        .map(|(k, (inner, outer))| {
            let (i, o) = (inner.network().octets(), outer.network().octets());
            Uplink6 {
                delegated_len,
                k: k as u8,
                span: span.network().octets(),
                span_len: span.len,
                ..entry(inner, o, MODE6_NPT, npt_adjustment(&i, &o, inner.len))
            }
        })
        .collect()
}

/// The shortest prefix that holds each of `prefixes` (none: `::/0`).
fn span6(prefixes: impl Iterator<Item = Prefix6>) -> Prefix6 {
    prefixes
        .reduce(|a, b| {
            let differ = u128::from(a.network()) ^ u128::from(b.network());
            let len = a.len.min(b.len).min(differ.leading_zeros() as u8);
            Prefix6 { addr: a.addr, len }
        })
        .map_or(
            Prefix6 {
                addr: std::net::Ipv6Addr::UNSPECIFIED,
                len: 0,
            },
            |p| Prefix6 {
                addr: p.network(),
                len: p.len,
            },
        )
}

/// [`multihome_common::MAP_ROUTED6`]'s entries, folded as
/// [`routed_table`]'s.
pub fn routed_table6(config: &Config) -> Vec<(Prefix6, RoutedUplinks)> {
    fold_routed(config, &config.routed_prefixes6(), |p| Prefix6 {
        addr: p.network(),
        len: p.len,
    })
}

/// Each prefix of `all` (uplink index, prefix) once, as `network` puts
/// it, with the bits of every uplink whose prefixes cover it.
fn fold_routed<P: Copy + PartialEq + Covers>(
    config: &Config,
    all: &[(usize, P)],
    network: impl Fn(&P) -> P,
) -> Vec<(P, RoutedUplinks)> {
    let mut out: Vec<(P, RoutedUplinks)> = Vec::new();
    for (_, p) in all {
        let p = network(p);
        if out.iter().any(|(q, _)| *q == p) {
            continue;
        }
        let bits = all
            .iter()
            .filter(|(_, outer)| outer.covers(&p))
            .fold(0, |b, (id, _)| b | 1 << config.uplinks[*id].slot);
        out.push((p, bits));
    }
    out
}

/// A prefix that may hold another.
trait Covers {
    fn covers(&self, inner: &Self) -> bool;
}

impl Covers for Prefix {
    fn covers(&self, inner: &Self) -> bool {
        Prefix::covers(*self, inner)
    }
}

impl Covers for Prefix6 {
    fn covers(&self, inner: &Self) -> bool {
        Prefix6::covers(*self, inner)
    }
}

pub fn routing_plan(config: &Config, observed: &[Observed], usable: &[bool]) -> RoutingPlan {
    RoutingPlan {
        uplinks: config
            .uplinks
            .iter()
            .enumerate()
            .map(|(id, u)| UplinkRoutes {
                table: table(config, id),
                mark: mark(config, id),
                ifindex: observed[id].ifindex,
                address: observed[id].address,
                gateway: u.gateway,
                weight: u.weight,
                usable: usable[id],
                routed: config
                    .routed_prefixes()
                    .into_iter()
                    .filter(|(u, _)| *u == id)
                    .map(|(_, p)| p)
                    .collect(),
            })
            .collect(),
        shared: shared_sources(config, observed),
        rule_priority: config.routing.rule_priority,
        main_table: 254,
        prohibit_mark: config
            .may_refuse()
            .then_some(config.routing.mark_base | multihome_common::MARK_PROHIBIT),
    }
}

/// The IPv6 routing of the uplinks that translate IPv6.
pub fn routing_plan6(config: &Config, observed: &[Observed]) -> Vec<Uplink6Routes> {
    if config.internal6().is_empty() {
        return Vec::new();
    }
    (0..config.uplinks.len())
        .filter_map(|id| {
            Some(Uplink6Routes {
                table: table(config, id),
                mark: mark(config, id),
                ifindex: observed[id].ifindex,
                gateway: config.uplinks[id].gateway6,
                l3: observed[id].l3,
                prefix: config.outer6(id)?,
                index: id as u32,
            })
        })
        .collect()
}

/// Addresses that two or more uplinks have now (seed 4.2.5: routers on one
/// segment behind one NIC with one address), each with its table: table
/// base + [`MAX_UPLINKS`] + the group's lowest slot.
fn shared_sources(config: &Config, observed: &[Observed]) -> Vec<SharedSource> {
    let mut out: Vec<SharedSource> = Vec::new();
    for (i, o) in observed.iter().enumerate() {
        let Some(address) = o.address else { continue };
        if out.iter().any(|s| s.address == address) {
            continue;
        }
        let members: Vec<usize> = (i..observed.len())
            .filter(|j| observed[*j].address == Some(address))
            .collect();
        if members.len() > 1 {
            let slot = members
                .iter()
                .map(|j| config.uplinks[*j].slot)
                .min()
                .unwrap_or(0);
            out.push(SharedSource {
                address,
                table: config.routing.table_base + MAX_UPLINKS + u32::from(slot),
                members,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_routed_prefix_inside_another_uplinks_carries_both_uplinks() {
        let mut c = Config::parse(
            "lan = [\"lan0\"]\n[[uplink]]\nname = \"x\"\ninterface = \"wanx\"\n\
             routed_prefixes = [\"198.18.48.0/20\"]\n\
             [[uplink]]\nname = \"y\"\ninterface = \"wany\"\n\
             routed_prefixes = [\"198.18.50.7/24\", \"198.18.64.0/24\"]\n",
        )
        .expect("valid");
        let p = |s: &str| s.parse::<Prefix>().expect("prefix");
        assert_eq!(
            routed_table(&c),
            vec![
                (p("198.18.48.0/20"), 0b01),
                (p("198.18.50.0/24"), 0b11),
                (p("198.18.64.0/24"), 0b10),
            ]
        );
        c.uplinks[1].routed_prefixes.clear();
        assert_eq!(routed_table(&c), vec![(p("198.18.48.0/20"), 0b01)]);
    }

    #[test]
    fn ipv6_routed_prefixes_fold_apart_from_ipv4_ones() {
        let c = Config::parse(
            "lan = [\"lan0\"]\n[[uplink]]\nname = \"x\"\ninterface = \"wanx\"\n\
             routed_prefixes = [\"2001:db8:50::/48\", \"198.18.48.0/20\"]\n\
             [[uplink]]\nname = \"y\"\ninterface = \"wany\"\n\
             routed_prefixes = [\"2001:db8:50:7::1/64\"]\n",
        )
        .expect("valid");
        let p = |s: &str| s.parse::<Prefix6>().expect("prefix");
        assert_eq!(
            routed_table6(&c),
            vec![
                (p("2001:db8:50::/48"), 0b01),
                (p("2001:db8:50:7::/64"), 0b11),
            ]
        );
        assert_eq!(routed_table(&c).len(), 1, "IPv4 apart");
        assert!(
            Config::parse(
                "lan = [\"lan0\"]\n[[uplink]]\nname = \"x\"\ninterface = \"wanx\"\n\
                 routed_prefixes = [\"2001:db8::/129\"]\n"
            )
            .is_err()
        );
    }

    #[test]
    fn a_next_hop_is_cached_only_while_the_link_is_up_and_both_macs_are_known() {
        let c = Config::parse(
            "lan = [\"lan0\"]\n[[uplink]]\nname = \"x\"\ninterface = \"wanx\"\n\
             gateway = \"198.18.11.254\"\n[[uplink]]\nname = \"p\"\ninterface = \"ppp0\"\n",
        )
        .expect("valid");
        let (gw, dev) = ([2, 0, 0, 0, 0x11, 0xfe], [2, 0, 0, 0, 0x11, 1]);
        let up = Observed {
            ifindex: 4,
            address: Some(Ipv4Addr::new(198, 18, 11, 1)),
            mtu: 1492,
            l3: false,
            mac: Some(dev),
            state: UplinkState::Up,
        };
        let hop = next_hop(c.uplinks[0].gateway.is_some(), &up, Some(gw));
        assert_eq!(hop.valid, 1);
        assert_eq!((hop.ifindex, hop.mtu), (4, 1492));
        assert_eq!(hop.mac[..6], gw);
        assert_eq!(hop.mac[6..], dev);
        // The gateway's MAC unknown, the link down, or no address.
        assert_eq!(
            next_hop(c.uplinks[0].gateway.is_some(), &up, None),
            NextHop::default()
        );
        for state in [UplinkState::LinkDown, UplinkState::NoAddress] {
            let o = Observed { state, ..up };
            assert_eq!(
                next_hop(c.uplinks[0].gateway.is_some(), &o, Some(gw)),
                NextHop::default()
            );
        }
        // An L3 link needs no MAC; an Ethernet uplink without a configured
        // gateway is never cached.
        let ppp = Observed {
            l3: true,
            mac: None,
            ..up
        };
        assert_eq!(
            next_hop(c.uplinks[1].gateway.is_some(), &ppp, None).valid,
            1
        );
        assert_eq!(
            next_hop(c.uplinks[1].gateway.is_some(), &up, Some(gw)).valid,
            0
        );
    }

    #[test]
    fn each_internal_prefix_gets_an_entry_with_its_place_and_the_uplinks_span() {
        let c = Config::parse(
            "lan = [\"lan0\", \"lan1\"]\nlan_prefixes6 = [\"fd00:1::/64\", \"fd00:9::/64\"]\n\
             [[uplink]]\nname = \"x\"\ninterface = \"wanx\"\nprefix6 = \"2001:db8:11:100::/56\"\n\
             [[uplink]]\nname = \"y\"\ninterface = \"wany\"\nprefix6 = \"2001:db8:22::1/128\"\n\
             mode6 = \"nat66\"\n",
        )
        .expect("valid");
        let text = |a: [u8; 16], len: u8| format!("{}/{len}", std::net::Ipv6Addr::from(a));
        let x = uplink6(&c, 0);
        let got: Vec<_> = x
            .iter()
            .map(|u| (text(u.outer, u.prefix_len), u.k, u.lans))
            .collect();
        assert_eq!(
            got,
            [
                ("2001:db8:11:100::/64".to_owned(), 0, 2),
                ("2001:db8:11:101::/64".to_owned(), 1, 2),
            ]
        );
        // Subnets 0 and 1 of the /56: spanned by their /63.
        for u in &x {
            assert_eq!(text(u.span, u.span_len), "2001:db8:11:100::/63");
            assert_eq!(u.mode, MODE6_NPT);
        }
        // NAT66: both internal prefixes onto the one address.
        let y = uplink6(&c, 1);
        assert_eq!(y.len(), 2);
        for u in &y {
            assert_eq!(text(u.span, u.span_len), "2001:db8:22::1/128");
            assert_eq!(text(u.outer, 128), "2001:db8:22::1/128");
        }
        // One prefix: its span is its own.
        let p = |s: &str| s.parse::<Prefix6>().expect("prefix");
        let one = span6([p("2001:db8:11:103::/64")].into_iter());
        assert_eq!(one.to_string(), "2001:db8:11:103::/64");
        let far = span6([p("2001:db8:11:100::/64"), p("2001:db8:12::/64")].into_iter());
        assert_eq!(far.to_string(), "2001:db8:10::/46");
    }

    #[test]
    fn names_round_trip_through_the_fixed_buffer() {
        assert_eq!(name_from_bytes(&name_bytes("wanx")), "wanx");
        assert_eq!(name_from_bytes(&name_bytes("abcdefghijklmnopq")).len(), 15);
    }
}
