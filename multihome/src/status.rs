//! The gateway's state as people see it: uplinks, counters, hosts and
//! reasons, read from the maps. `multihome status`, `top` and the
//! metrics render it.
use serde::Serialize;

use crate::{flows::be_addr, maps::Maps, uplinks::name_from_bytes};
use multihome_common::{
    MODE6_NAT66, NextHop, UPLINK_CANARY, UPLINK_CONFIGURED, UPLINK_DEGRADED, UPLINK_DRAINED,
    UPLINK_HELD_DOWN, UPLINK_L3, UPLINK_LINK_DOWN, UPLINK_PROBES_FAIL, UPLINK_TRAFFIC_DOWN,
    UPLINK_USABLE, Uplink,
};

#[derive(Debug, Serialize)]
pub struct UplinkStatus {
    pub name: String,
    pub interface: String,
    pub address: Option<String>,
    pub gateway: Option<String>,
    pub state: &'static str,
    /// Why it is not up.
    pub reason: Option<&'static str>,
    pub weight: u32,
    pub rtt_ms: Option<f64>,
    pub loss_pct: f64,
    pub flows: u64,
    pub new_flows: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub slow_path: u64,
    /// TCP flows opened by a LAN SYN (passive health).
    pub syns: u64,
    /// Of those, answered by a SYN-ACK.
    pub synacks: u64,
    /// Mean time from SYN to SYN-ACK since the counters started, ms.
    pub syn_rtt_ms: Option<f64>,
    /// SYNs LAN hosts sent again, unanswered.
    pub syn_retries: u64,
    /// TCP data segments LAN hosts sent again.
    pub retransmits: u64,
    /// The next hop its flows' packets are sent to without a route lookup:
    /// the gateway's MAC, or "point-to-point" on an L3 link; None while
    /// every packet takes the lookup (`NEXT_HOPS`).
    pub next_hop: Option<String>,
    /// Of `tx_packets` and `rx_packets`, those that took the XDP path.
    pub xdp_tx_packets: u64,
    pub xdp_rx_packets: u64,
    /// The IPv6 prefix NPTv6 maps the LAN's (first) internal prefix
    /// onto; None: no IPv6 flows.
    pub prefix6: Option<String>,
    /// Every prefix it maps an internal prefix onto, in the order of
    /// `Status::lan_prefixes6` (the first is `prefix6`).
    pub prefixes6: Vec<String>,
    /// The delegated prefix `prefix6` was learned from (DHCPv6-PD); None:
    /// configured.
    pub delegated6: Option<String>,
    /// IPv6 is translated by NAT66 onto `prefix6`, the uplink's one
    /// address, rather than by NPTv6.
    pub nat66: bool,
    /// IPv6 flows pinned to it (counted in `tx`/`rx` too).
    pub flows6: u64,
    /// As `next_hop`, for IPv6 (`NEXT_HOPS6`).
    pub next_hop6: Option<String>,
}

/// Which path an interface's packets take.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct InterfaceStatus {
    pub interface: String,
    /// "native" while the XDP program runs on it in driver mode, "off"
    /// while every packet goes through TC alone.
    pub xdp: &'static str,
    /// XDP may redirect packets out of it (`XDP_DEVS`); false on a
    /// device whose qdisc shapes, or without XDP.
    pub xdp_redirect: bool,
}

#[cfg(test)]
impl UplinkStatus {
    /// Uplink `name` (interface `wan<name>`, address 198.18.11.1) in
    /// `state`, every counter 0: for the renderers' tests.
    pub fn sample(name: &str, state: &'static str) -> Self {
        Self {
            name: name.into(),
            interface: format!("wan{name}"),
            address: Some("198.18.11.1".into()),
            gateway: None,
            state,
            reason: None,
            weight: 1,
            rtt_ms: None,
            loss_pct: 0.0,
            flows: 0,
            new_flows: 0,
            tx_packets: 0,
            tx_bytes: 0,
            rx_packets: 0,
            rx_bytes: 0,
            slow_path: 0,
            syns: 0,
            synacks: 0,
            syn_rtt_ms: None,
            syn_retries: 0,
            retransmits: 0,
            next_hop: None,
            xdp_tx_packets: 0,
            xdp_rx_packets: 0,
            prefix6: None,
            prefixes6: Vec::new(),
            delegated6: None,
            nat66: false,
            flows6: 0,
            next_hop6: None,
        }
    }
}

/// A LAN host's share of the connection map.
#[derive(Debug, Serialize)]
pub struct HostShare {
    pub address: String,
    pub flows: u64,
    /// New flows refused because it held `max_flows_per_host`.
    pub refused: u64,
}

/// How many hosts `status` lists.
const TOP_HOSTS: usize = 10;

#[derive(Debug, Serialize)]
pub struct Status {
    pub uplinks: Vec<UplinkStatus>,
    /// The LAN and uplink interfaces the datapath is attached to.
    pub interfaces: Vec<InterfaceStatus>,
    pub flows: u64,
    /// The LAN's internal IPv6 prefixes that NPTv6 maps, in order.
    pub lan_prefixes6: Vec<String>,
    /// IPv6 flows in their own map.
    pub flows6: u64,
    /// The hosts refused most (then those with most flows), at most ten.
    pub top_hosts: Vec<HostShare>,
    pub drops: std::collections::BTreeMap<&'static str, u64>,
}

/// The LAN hosts with the most refusals, then flows: IPv4 and IPv6 alike.
fn top_hosts(maps: &Maps) -> anyhow::Result<Vec<HostShare>> {
    use std::net::{IpAddr, Ipv6Addr};
    let mut hosts: Vec<(IpAddr, multihome_common::HostFlows)> = maps
        .hosts()?
        .iter()
        .filter_map(Result::ok)
        .map(|(a, h)| (IpAddr::from(be_addr(a)), h))
        .collect();
    let v6 = maps.hosts6()?;
    hosts.extend(
        v6.iter()
            .filter_map(Result::ok)
            .map(|(a, h)| (IpAddr::from(Ipv6Addr::from(a)), h)),
    );
    hosts.sort_by_key(|(_, h)| std::cmp::Reverse((h.refused, h.flows)));
    Ok(hosts
        .into_iter()
        .take(TOP_HOSTS)
        .map(|(a, h)| HostShare {
            address: a.to_string(),
            flows: h.flows,
            refused: h.refused,
        })
        .collect())
}

/// The whole model: uplinks with their flows counted (a walk of the
/// connection map), hosts and reasons.
pub fn collect(maps: &Maps) -> anyhow::Result<Status> {
    let flows = maps.flows()?;
    let flows6 = maps.flows6()?;
    let mut per_uplink = [[0u64; 2]; multihome_common::MAX_UPLINKS as usize];
    let uplinks = flows.iter().map(|(_, f)| (f.uplink, 0));
    for (id, family) in uplinks.chain(flows6.iter().map(|(_, f)| (f.uplink, 1))) {
        if let Some(n) = per_uplink.get_mut(usize::from(id)) {
            n[family] += 1;
        }
    }
    Ok(Status {
        uplinks: uplinks_with(maps, &per_uplink)?,
        interfaces: interfaces(maps)?,
        flows: flows.len() as u64,
        lan_prefixes6: lan_prefixes6(maps)?,
        flows6: flows6.len() as u64,
        top_hosts: top_hosts(maps)?,
        drops: maps.reasons()?.into_iter().collect(),
    })
}

/// The model without a walk of the connection map: the per-uplink flow
/// counts of `last` (an earlier [`collect`]), the total from the
/// datapath's fill count. For views redrawn every second (`top`), which
/// must not walk a million flows per frame.
pub fn collect_quick(maps: &Maps, last: &Status) -> anyhow::Result<Status> {
    let mut per_uplink = [[0u64; 2]; multihome_common::MAX_UPLINKS as usize];
    let slots = maps.uplinks()?;
    for u in &last.uplinks {
        if let Some(i) = slots
            .iter()
            .position(|s| name_from_bytes(&s.name) == u.name)
        {
            per_uplink[i] = [u.flows, u.flows6];
        }
    }
    Ok(Status {
        uplinks: uplinks_with(maps, &per_uplink)?,
        interfaces: interfaces(maps)?,
        flows: maps.fill()?,
        lan_prefixes6: last.lan_prefixes6.clone(),
        flows6: last.flows6,
        top_hosts: top_hosts(maps)?,
        drops: maps.reasons()?.into_iter().collect(),
    })
}

/// The interfaces with a pinned TC link, and XDP's state on each: from
/// the link pins (`links/<if>@ingress`, `links/<if>@xdp`) and `XDP_DEVS`.
pub fn interfaces(maps: &Maps) -> anyhow::Result<Vec<InterfaceStatus>> {
    let (names, xdp) = crate::loader::pinned_interfaces(maps.pin_dir());
    let devs = maps.xdp_devs()?;
    Ok(names
        .into_iter()
        .map(|n| {
            let index = crate::netinfo::index_of(&n);
            InterfaceStatus {
                xdp: if xdp.contains(&n) { "native" } else { "off" },
                xdp_redirect: index.is_some_and(|i| devs.contains(&i)),
                interface: n,
            }
        })
        .collect())
}

/// A cached next hop for people: the gateway's MAC, or "point-to-point".
fn describe_hop(hop: &NextHop, u: &Uplink) -> String {
    if u.flags & UPLINK_L3 != 0 {
        return "point-to-point".into();
    }
    hop.mac[..6]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The uplinks alone, without walking the connection map (their `flows`
/// are 0): for `/healthz`.
pub fn uplinks(maps: &Maps) -> anyhow::Result<Vec<UplinkStatus>> {
    uplinks_with(maps, &[[0; 2]; multihome_common::MAX_UPLINKS as usize])
}

/// A prefix as `addr/len`, from its bytes on the wire.
pub fn prefix_text(addr: [u8; 16], len: u8) -> String {
    format!("{}/{len}", std::net::Ipv6Addr::from(addr))
}

/// The internal prefixes NPTv6 maps from (the same in every uplink's
/// entries).
fn lan_prefixes6(maps: &Maps) -> anyhow::Result<Vec<String>> {
    Ok(maps
        .uplinks6()?
        .iter()
        .find(|e| !e.is_empty())
        .map(|e| {
            e.iter()
                .map(|u6| prefix_text(u6.inner, u6.prefix_len))
                .collect()
        })
        .unwrap_or_default())
}

/// Where `u6` maps its internal prefix: NPTv6's prefix, NAT66's one
/// address.
fn outer_text(u6: &multihome_common::Uplink6) -> String {
    let len = if u6.mode == MODE6_NAT66 {
        128
    } else {
        u6.prefix_len
    };
    prefix_text(u6.outer, len)
}

/// The configured uplinks, `flows[slot]` flows each (IPv4, IPv6).
fn uplinks_with(maps: &Maps, flows: &[[u64; 2]]) -> anyhow::Result<Vec<UplinkStatus>> {
    let stats = maps.uplink_stats()?;
    let uplinks6 = maps.uplinks6()?;
    let xdp = maps.xdp_stats()?;
    let hops = maps.next_hops()?;
    let hops6 = maps.next_hops6()?;
    let mut uplinks = Vec::new();
    for (id, u) in maps.uplinks()?.iter().enumerate() {
        if u.flags & UPLINK_CONFIGURED == 0 {
            continue;
        }
        let s = &stats[id];
        let hop = &hops[id];
        let entries6 = uplinks6.get(id).map_or(&[][..], |e| e.as_slice());
        let first6 = entries6.first();
        let addr = (u.addr_be != 0).then(|| be_addr(u.addr_be).to_string());
        uplinks.push(UplinkStatus {
            name: name_from_bytes(&u.name),
            interface: name_from_bytes(&u.ifname),
            state: match (u.flags & UPLINK_USABLE != 0, addr.is_some()) {
                (true, _) if u.flags & UPLINK_CANARY != 0 => "trial",
                (true, _) if u.flags & UPLINK_DEGRADED != 0 => "degraded",
                (true, _) => "up",
                _ if u.flags & UPLINK_DRAINED != 0 => "drained",
                (false, false) => "no-address",
                (false, true) => "down",
            },
            reason: match () {
                _ if u.flags & UPLINK_LINK_DOWN != 0 => Some("link down"),
                _ if u.addr_be == 0 => Some("no IPv4 address on the interface"),
                _ if u.flags & UPLINK_PROBES_FAIL != 0 => Some("health probes fail"),
                _ if u.flags & UPLINK_TRAFFIC_DOWN != 0 => {
                    Some("live traffic: several remotes went unanswered")
                }
                _ if u.flags & UPLINK_DRAINED != 0 => Some("drained by the operator"),
                _ if u.flags & UPLINK_HELD_DOWN != 0 => {
                    Some("held down after an outage (hold_down_ms)")
                }
                _ if u.flags & UPLINK_DEGRADED != 0 => Some(
                    "live traffic past a degraded threshold: no new flows while another uplink is healthy",
                ),
                _ if u.flags & UPLINK_CANARY != 0 => {
                    Some("on trial after live traffic took it down: a share of new flows tries it")
                }
                _ => None,
            },
            rtt_ms: (u.rtt_us != 0).then(|| u.rtt_us as f64 / 1000.0),
            loss_pct: u.loss_permille as f64 / 10.0,
            address: addr,
            gateway: (u.gateway_be != 0).then(|| be_addr(u.gateway_be).to_string()),
            weight: u.weight,
            flows: flows.get(id).map_or(0, |f| f[0]),
            flows6: flows.get(id).map_or(0, |f| f[1]),
            prefix6: first6.map(outer_text),
            prefixes6: entries6.iter().map(outer_text).collect(),
            nat66: first6.is_some_and(|u6| u6.mode == MODE6_NAT66),
            delegated6: first6
                .filter(|u6| u6.delegated_len != 0)
                .map(|u6| {
                    let outer = u128::from_be_bytes(u6.outer);
                    let mask = u128::MAX.checked_shl(128 - u32::from(u6.delegated_len));
                    prefix_text((outer & mask.unwrap_or(0)).to_be_bytes(), u6.delegated_len)
                }),
            new_flows: s.new_flows,
            tx_packets: s.tx_packets,
            tx_bytes: s.tx_bytes,
            rx_packets: s.rx_packets,
            rx_bytes: s.rx_bytes,
            slow_path: s.slow_path,
            syns: s.syns,
            synacks: s.synacks,
            syn_retries: s.syn_retries,
            retransmits: s.retransmits,
            next_hop: (hop.valid != 0).then(|| describe_hop(hop, u)),
            next_hop6: (hops6[id].valid != 0).then(|| describe_hop(&hops6[id], u)),
            xdp_tx_packets: xdp[id].tx_packets,
            xdp_rx_packets: xdp[id].rx_packets,
            syn_rtt_ms: (s.synacks != 0)
                .then(|| s.synack_rtt_ns as f64 / s.synacks as f64 / 1_000_000.0),
        });
    }
    Ok(uplinks)
}
