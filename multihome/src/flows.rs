//! Flow pairs as userspace sees them: state names, timeouts, expiry and
//! scoped purges. Removal always takes the forward entry first and the
//! reverse one only while it still points back at that flow.
use std::net::Ipv4Addr;

use aya::maps::{HashMap, MapData};
use multihome_common::{
    FLOW_FIN_IN, FLOW_FIN_OUT, FLOW_RST, FLOW_SEEN_REPLY, FlowFwd, FlowKey, FlowRev, IPPROTO_ICMP,
    IPPROTO_TCP, IPPROTO_UDP,
};
use serde::Serialize;

use crate::{config::Timeouts, maps::Maps};

pub fn proto_name(p: u8) -> &'static str {
    match p {
        IPPROTO_TCP => "tcp",
        IPPROTO_UDP => "udp",
        IPPROTO_ICMP => "icmp",
        _ => "other",
    }
}

pub fn state_name(key: &FlowKey, f: &FlowFwd) -> &'static str {
    let fin_both = FLOW_FIN_OUT | FLOW_FIN_IN;
    match () {
        _ if f.flags & FLOW_RST != 0 => "closed",
        _ if key.proto == IPPROTO_TCP && f.flags & fin_both == fin_both => "closing",
        _ if key.proto == IPPROTO_TCP && f.flags & fin_both != 0 => "fin-wait",
        _ if f.flags & FLOW_SEEN_REPLY != 0 => "established",
        _ => "new",
    }
}

/// Idle seconds after which the flow expires.
pub fn timeout_s(key: &FlowKey, f: &FlowFwd, t: &Timeouts) -> u64 {
    match (key.proto, state_name(key, f)) {
        (IPPROTO_TCP, "established") => t.tcp_established,
        (IPPROTO_TCP, "closed" | "closing") => t.tcp_closing,
        (IPPROTO_TCP, _) => t.tcp_transitory,
        (IPPROTO_UDP, _) => t.udp,
        _ => t.icmp,
    }
}

/// A flow for people and scripts (`multihome conns`).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Conn {
    pub proto: &'static str,
    pub src: Ipv4Addr,
    pub sport: u16,
    pub dst: Ipv4Addr,
    pub dport: u16,
    pub uplink: String,
    pub uplink_id: u8,
    pub nat_addr: Ipv4Addr,
    pub nat_port: u16,
    pub state: &'static str,
    pub age_s: u64,
    pub idle_s: u64,
}

pub fn be_addr(a: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from_be(a))
}

pub fn describe(key: &FlowKey, f: &FlowFwd, uplink: String, now_ns: u64) -> Conn {
    Conn {
        proto: proto_name(key.proto),
        src: be_addr(key.saddr_be),
        sport: u16::from_be(key.sport_be),
        dst: be_addr(key.daddr_be),
        dport: u16::from_be(key.dport_be),
        uplink,
        uplink_id: f.uplink,
        nat_addr: be_addr(f.nat_addr_be),
        nat_port: u16::from_be(f.nat_port_be),
        state: state_name(key, f),
        age_s: (now_ns / 1_000_000_000).saturating_sub(f.created_s as u64),
        idle_s: now_ns.saturating_sub(f.last_seen_ns) / 1_000_000_000,
    }
}

fn remove_pair(
    fwd: &mut HashMap<MapData, FlowKey, FlowFwd>,
    rev: &mut HashMap<MapData, FlowKey, FlowRev>,
    key: &FlowKey,
    f: &FlowFwd,
) {
    let _ = fwd.remove(key);
    let rkey = key.reply(f.nat_addr_be, f.nat_port_be);
    if let Ok(r) = rev.get(&rkey, 0)
        && r.lan_addr_be == key.saddr_be
        && r.lan_port_be == key.sport_be
    {
        let _ = rev.remove(&rkey);
    }
}

/// Removes the flows for which `doomed` holds; returns how many.
pub fn remove_where(
    maps: &Maps,
    mut doomed: impl FnMut(&FlowKey, &FlowFwd) -> bool,
) -> anyhow::Result<usize> {
    let mut fwd = maps.fwd()?;
    let mut rev = maps.rev()?;
    let victims: Vec<_> = fwd
        .iter()
        .filter_map(Result::ok)
        .filter(|(k, f)| doomed(k, f))
        .collect();
    for (k, f) in &victims {
        // Re-read: the flow may have been refreshed since the scan.
        if let Ok(now) = fwd.get(k, 0)
            && now.last_seen_ns == f.last_seen_ns
        {
            remove_pair(&mut fwd, &mut rev, k, f);
        }
    }
    Ok(victims.len())
}

/// Removes idle flows past their timeout. Never touches a live flow: the
/// entry is re-read just before removal.
pub fn reap(maps: &Maps, t: &Timeouts, now_ns: u64) -> anyhow::Result<usize> {
    remove_where(maps, |k, f| {
        now_ns.saturating_sub(f.last_seen_ns) > timeout_s(k, f, t) * 1_000_000_000
    })
}

/// Removes reverse entries whose forward half is gone. `suspects` carries
/// the orphans of the previous pass: only an entry orphaned twice in a row
/// is removed, so a pair being created is never mistaken for one.
pub fn reap_orphans(maps: &Maps, suspects: &mut Vec<FlowKey>) -> anyhow::Result<usize> {
    let fwd = maps.fwd()?;
    let mut rev = maps.rev()?;
    let mut orphans = Vec::new();
    for (rk, r) in rev.iter().filter_map(Result::ok) {
        let key = rk.forward(&r);
        if fwd.get(&key, 0).is_err() {
            orphans.push(rk);
        }
    }
    let mut removed = 0;
    for rk in &orphans {
        if suspects.contains(rk) && rev.remove(rk).is_ok() {
            removed += 1;
        }
    }
    *suspects = orphans;
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(proto: u8) -> FlowKey {
        FlowKey {
            saddr_be: u32::from(Ipv4Addr::new(198, 18, 1, 2)).to_be(),
            daddr_be: u32::from(Ipv4Addr::new(198, 19, 0, 10)).to_be(),
            sport_be: 40000u16.to_be(),
            dport_be: 80u16.to_be(),
            proto,
            _pad: [0; 3],
        }
    }

    #[test]
    fn tcp_state_follows_the_flags() {
        let k = key(IPPROTO_TCP);
        let mut f = FlowFwd::default();
        assert_eq!(state_name(&k, &f), "new");
        f.flags = FLOW_SEEN_REPLY;
        assert_eq!(state_name(&k, &f), "established");
        f.flags |= FLOW_FIN_OUT;
        assert_eq!(state_name(&k, &f), "fin-wait");
        f.flags |= FLOW_FIN_IN;
        assert_eq!(state_name(&k, &f), "closing");
        f.flags |= FLOW_RST;
        assert_eq!(state_name(&k, &f), "closed");
    }

    #[test]
    fn timeouts_follow_state_and_protocol() {
        let t = Timeouts::default();
        let mut f = FlowFwd {
            flags: FLOW_SEEN_REPLY,
            ..Default::default()
        };
        assert_eq!(timeout_s(&key(IPPROTO_TCP), &f, &t), 7440);
        assert_eq!(timeout_s(&key(IPPROTO_UDP), &f, &t), 300);
        assert_eq!(timeout_s(&key(IPPROTO_ICMP), &f, &t), 60);
        f.flags = 0;
        assert_eq!(timeout_s(&key(IPPROTO_TCP), &f, &t), 240);
        f.flags = FLOW_RST;
        assert_eq!(timeout_s(&key(IPPROTO_TCP), &f, &t), 10);
    }
}
