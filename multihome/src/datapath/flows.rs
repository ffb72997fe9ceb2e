//! Flow pairs as userspace sees them: state names, timeouts, expiry and
//! scoped purges. Removal always takes the forward entry first and the
//! reverse one only while it still points back at that flow.
use std::{
    collections::HashSet,
    hash::{BuildHasher, Hasher, RandomState},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use anyhow::Context as _;
use aya::maps::{HashMap, MapData};
use multihome_common::{
    EimKey, Endpoint, EndpointKey, FLOW_FAILED_OVER, FLOW_FIN_IN, FLOW_FIN_OUT, FLOW_RST,
    FLOW_RST_IN, FLOW_SEEN_REPLY, Flow6, Flow6Key, FlowFwd, FlowKey, FlowRev, HostFlows,
    IPPROTO_DCCP, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, IPPROTO_UDPLITE, MODE6_NAT66, MODE6_NPT,
    Uplink, Uplink6, npt_translate,
};
use serde::Serialize;

use crate::{config::Timeouts, maps::Maps, mapwalk};

pub fn proto_name(p: u8) -> &'static str {
    match p {
        IPPROTO_TCP => "tcp",
        IPPROTO_UDP => "udp",
        IPPROTO_ICMP => "icmp",
        IPPROTO_ICMPV6 => "icmpv6",
        IPPROTO_DCCP => "dccp",
        IPPROTO_UDPLITE => "udplite",
        41 => "ipv6",
        47 => "gre",
        50 => "esp",
        132 => "sctp",
        _ => "other",
    }
}

pub fn state_name(key: &FlowKey, f: &FlowFwd) -> &'static str {
    state_of(key.proto, f.flags)
}

/// The state of a flow of `proto` with `FLOW_*` bits `flags`.
pub fn state_of(proto: u8, flags: u32) -> &'static str {
    let fin_both = FLOW_FIN_OUT | FLOW_FIN_IN;
    match () {
        _ if flags & (FLOW_RST | FLOW_RST_IN) != 0 => "closed",
        _ if proto == IPPROTO_TCP && flags & fin_both == fin_both => "closing",
        _ if proto == IPPROTO_TCP && flags & fin_both != 0 => "fin-wait",
        _ if flags & FLOW_SEEN_REPLY != 0 => "established",
        _ => "new",
    }
}

/// Idle seconds after which the flow expires.
pub fn timeout_s(key: &FlowKey, f: &FlowFwd, t: &Timeouts) -> u64 {
    timeout_of(key.proto, f.flags, t)
}

/// [`timeout_s`] of a flow of `proto` with `flags` (ICMPv6 as ICMP).
pub fn timeout_of(proto: u8, flags: u32, t: &Timeouts) -> u64 {
    match (proto, state_of(proto, flags)) {
        (IPPROTO_TCP, "established") => t.tcp_established,
        (IPPROTO_TCP, "closed" | "closing") => t.tcp_closing,
        (IPPROTO_TCP, _) => t.tcp_transitory,
        (IPPROTO_UDP, _) => t.udp,
        (IPPROTO_ICMP | IPPROTO_ICMPV6, _) => t.icmp,
        _ => t.other,
    }
}

/// ICMPv6's protocol number (RFC 4443).
pub const IPPROTO_ICMPV6: u8 = 58;

/// Removes the IPv6 flows idle past their timeout; returns how many.
pub fn reap6(maps: &Maps, t: &Timeouts, now_ns: u64) -> anyhow::Result<usize> {
    let n = maps.remove_flows6(|k, f| {
        now_ns.saturating_sub(f.last_seen_ns) > timeout_of(k.proto, f.flags, t) * 1_000_000_000
    })?;
    // Ports of flows the datapath moved or a purge missed.
    maps.sweep_nat6()?;
    let mut per_host: std::collections::HashMap<[u8; 16], u64> = Default::default();
    for (k, _) in maps.flows6()? {
        *per_host.entry(k.lan).or_default() += 1;
    }
    write_hosts(&mut maps.hosts6()?, per_host)?;
    Ok(n)
}

/// A flow for people and scripts (`multihome conns`).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Conn {
    pub proto: &'static str,
    pub src: IpAddr,
    pub sport: u16,
    pub dst: IpAddr,
    pub dport: u16,
    pub uplink: String,
    pub uplink_id: u8,
    /// The source the remote sees: the uplink's address (IPv4 SNAT) or
    /// the LAN host's address mapped onto the uplink's prefix (NPTv6).
    pub nat_addr: IpAddr,
    pub nat_port: u16,
    pub state: &'static str,
    /// Made on another uplink while its preferred one was not usable.
    pub failed_over: bool,
    /// The policy that placed it (`balanced` when no rule matched, or when
    /// a reload removed its policy).
    pub policy: String,
    pub age_s: u64,
    pub idle_s: u64,
}

pub fn be_addr(a: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from_be(a))
}

pub fn describe(key: &FlowKey, f: &FlowFwd, uplink: String, policy: String, now_ns: u64) -> Conn {
    Conn {
        proto: proto_name(key.proto),
        src: be_addr(key.saddr_be).into(),
        sport: u16::from_be(key.sport_be),
        dst: be_addr(key.daddr_be).into(),
        dport: u16::from_be(key.dport_be),
        uplink,
        uplink_id: f.uplink,
        nat_addr: be_addr(f.nat_addr_be).into(),
        nat_port: u16::from_be(f.nat_port_be),
        state: state_name(key, f),
        failed_over: f.flags & FLOW_FAILED_OVER != 0,
        policy,
        age_s: (now_ns / 1_000_000_000).saturating_sub(f.created_s as u64),
        idle_s: now_ns.saturating_sub(f.last_seen_ns) / 1_000_000_000,
    }
}

/// An IPv6 flow for people and scripts; `entries`: its uplink's
/// translations, whose one for the host's internal prefix gives the
/// address the remote sees (ports are kept under NPTv6).
pub fn describe6(
    key: &Flow6Key,
    f: &Flow6,
    entries: &[Uplink6],
    uplink: String,
    policy: String,
    now_ns: u64,
) -> Conn {
    let u6 = entries
        .iter()
        .find(|u6| u6.covers(&key.lan, true))
        .copied()
        .unwrap_or_default();
    let (mapped, port_be) = if u6.mode == MODE6_NAT66 && f.nat_port_be != 0 {
        (u6.outer, f.nat_port_be)
    } else {
        let mapped = npt_translate(&key.lan, &u6.outer, u6.prefix_len, u6.adjust)
            .filter(|_| u6.prefix_len != 0 && u6.mode == MODE6_NPT)
            .unwrap_or(key.lan);
        (mapped, key.lan_port_be)
    };
    Conn {
        proto: proto_name(key.proto),
        src: Ipv6Addr::from(key.lan).into(),
        sport: u16::from_be(key.lan_port_be),
        dst: Ipv6Addr::from(key.remote).into(),
        dport: u16::from_be(key.remote_port_be),
        uplink,
        uplink_id: f.uplink,
        nat_addr: Ipv6Addr::from(mapped).into(),
        nat_port: u16::from_be(port_be),
        state: state_of(key.proto, f.flags),
        failed_over: f.flags & FLOW_FAILED_OVER != 0,
        policy,
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

/// One walk of CONN_FWD: removes the flows `doomed` picks and shows every
/// flow that stays to `kept`. Each victim is read again just before its
/// removal and `doomed` asked again, so a flow that the datapath refreshed
/// out of expiry, or made anew since the walk, stays, while a busy flow
/// that a purge picks by uplink or address still goes. Returns the
/// removed flows.
fn sweep(
    maps: &Maps,
    mut doomed: impl FnMut(&FlowKey, &FlowFwd) -> bool,
    mut kept: impl FnMut(&FlowKey),
) -> anyhow::Result<Vec<(FlowKey, FlowFwd)>> {
    let mut fwd = maps.fwd()?;
    let mut rev = maps.rev()?;
    let mut victims = Vec::new();
    mapwalk::for_each(&fwd, |k, f| {
        if doomed(&k, &f) {
            victims.push((k, f));
        } else {
            kept(&k);
        }
    })
    .context("reading CONN_FWD")?;
    victims.retain_mut(|(k, f)| match fwd.get(k, 0) {
        Ok(now) if doomed(k, &now) => {
            remove_pair(&mut fwd, &mut rev, k, &now);
            *f = now;
            true
        }
        Ok(_) => {
            kept(k);
            false
        }
        Err(_) => false,
    });
    Ok(victims)
}

/// Removes the flows for which `doomed` holds, however busy (a purge);
/// returns how many it removed.
pub fn remove_where(
    maps: &Maps,
    doomed: impl FnMut(&FlowKey, &FlowFwd) -> bool,
) -> anyhow::Result<usize> {
    Ok(sweep(maps, doomed, |_| {})?.len())
}

/// From this fill (flows per flow of capacity, in tenths) on, the reaper
/// evicts flows that never saw a reply.
pub const EVICT_AT_TENTHS: u64 = 9;
/// A flow without a reply is evicted only after this much idle time, so a
/// SYN still waiting for its SYN-ACK is spared.
const EVICT_IDLE_NS: u64 = 1_000_000_000;

/// What one reaper pass did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Pass {
    pub expired: usize,
    pub evicted: usize,
    /// Flows left in the map.
    pub flows: u64,
    /// The map was crowded: flows without a reply were evicted.
    pub crowded: bool,
}

/// One reaper pass over the connection map: removes idle flows past their
/// timeout and, while the map is at least nine tenths full, flows that
/// never saw a reply (idle for a second) — conntrack's early drop, done
/// here since the datapath cannot scan. An established flow is never
/// evicted, and every victim is re-read before removal, so a flow
/// refreshed meanwhile stays. Then the flows per LAN host and in all are
/// recounted into HOSTS and FILL, correcting whatever the datapath's
/// counting missed. `capacity`: the map's size, in flows.
pub fn reap(maps: &Maps, t: &Timeouts, now_ns: u64, capacity: u32) -> anyhow::Result<Pass> {
    let crowded = maps.fill()? * 10 >= u64::from(capacity) * EVICT_AT_TENTHS;
    let idle = |f: &FlowFwd| now_ns.saturating_sub(f.last_seen_ns);
    let expired = |k: &FlowKey, f: &FlowFwd| idle(f) > timeout_s(k, f, t) * 1_000_000_000;
    let unanswered = |f: &FlowFwd| f.flags & FLOW_SEEN_REPLY == 0 && idle(f) >= EVICT_IDLE_NS;
    let mut per_host: std::collections::HashMap<u32, u64> = Default::default();
    let removed = sweep(
        maps,
        |k, f| expired(k, f) || (crowded && unanswered(f)),
        |k| *per_host.entry(k.saddr_be).or_default() += 1,
    )?;
    let expired = removed.iter().filter(|(k, f)| expired(k, f)).count();
    let pass = Pass {
        expired,
        evicted: removed.len() - expired,
        flows: per_host.values().sum(),
        crowded,
    };
    write_census(maps, per_host, pass.flows)?;
    Ok(pass)
}

/// Writes the recount: every host's flows (keeping its refusals; a host
/// with neither is dropped) and the total.
fn write_census(
    maps: &Maps,
    per_host: std::collections::HashMap<u32, u64>,
    total: u64,
) -> anyhow::Result<()> {
    write_hosts(&mut maps.hosts()?, per_host)?;
    maps.set_fill(total)
}

/// Writes every host's flows into `hosts` (HOSTS or HOSTS6), keeping its
/// refusals; a host with neither is dropped.
fn write_hosts<K: aya::Pod + Eq + std::hash::Hash>(
    hosts: &mut HashMap<MapData, K, HostFlows>,
    mut per_host: std::collections::HashMap<K, u64>,
) -> anyhow::Result<()> {
    let known: Vec<(K, HostFlows)> = hosts.iter().filter_map(Result::ok).collect();
    for (addr, h) in known {
        let flows = per_host.remove(&addr).unwrap_or(0);
        if flows == 0 && h.refused == 0 {
            let _ = hosts.remove(&addr);
        } else if flows != h.flows {
            hosts.insert(addr, HostFlows { flows, ..h }, 0)?;
        }
    }
    for (addr, flows) in per_host {
        // A host the map has no room for is not held to its quota.
        let _ = hosts.insert(addr, HostFlows { flows, refused: 0 }, 0);
    }
    Ok(())
}

/// Removes reverse entries whose forward half is gone. `suspects` carries
/// the orphans of the previous pass: only an entry orphaned twice in a row
/// is removed, so a pair being created is never mistaken for one.
pub fn reap_orphans(maps: &Maps, suspects: &mut Vec<FlowKey>) -> anyhow::Result<usize> {
    let fwd = maps.fwd()?;
    let mut rev = maps.rev()?;
    let mut live = KeySet::default();
    mapwalk::for_each(&fwd, |k, _| live.insert(&k)).context("reading CONN_FWD")?;
    let mut orphans = Vec::new();
    mapwalk::for_each(&rev, |rk, r| {
        if !live.contains(&rk.forward(&r)) {
            orphans.push(rk);
        }
    })
    .context("reading CONN_REV")?;
    drop(live);
    let mut before = KeySet::default();
    suspects.iter().for_each(|k| before.insert(k));
    let mut removed = 0;
    for rk in &orphans {
        if before.contains(rk) && rev.remove(rk).is_ok() {
            removed += 1;
        }
    }
    *suspects = orphans;
    Ok(removed)
}

/// `on_up = "return-idle"`: removes the flows `candidate` picks (it says
/// whether the flow's policy is sticky: `source` or `site`) once idle for
/// `idle_ns`, so that their next packet places them anew. A sticky flow
/// goes only when every sticky candidate of its host and policy is idle
/// (a call's signalling and media stay together), and then that host's
/// affinity records of the policy go too, so its next flows choose
/// afresh. Returns (removed, candidates left).
pub fn return_idle(
    maps: &Maps,
    now_ns: u64,
    idle_ns: u64,
    candidate: impl Fn(&FlowKey, &FlowFwd) -> Option<bool>,
) -> anyhow::Result<(usize, usize)> {
    let idle = |f: &FlowFwd| now_ns.saturating_sub(f.last_seen_ns) >= idle_ns;
    let (mut candidates, mut busy) = (0usize, HashSet::new());
    mapwalk::for_each(&maps.fwd()?, |k, f| {
        if let Some(sticky) = candidate(&k, &f) {
            candidates += 1;
            if sticky && !idle(&f) {
                busy.insert((k.saddr_be, f.policy));
            }
        }
    })
    .context("reading CONN_FWD")?;
    let mut returned = HashSet::new();
    let removed = remove_where(maps, |k, f| {
        let go = candidate(k, f)
            .is_some_and(|sticky| idle(f) && !(sticky && busy.contains(&(k.saddr_be, f.policy))));
        if go && candidate(k, f) == Some(true) {
            returned.insert((k.saddr_be, f.policy));
        }
        go
    })?;
    if !returned.is_empty() {
        let mut affinities = maps.affinities_map()?;
        for (k, _) in mapwalk::collect(&affinities).context("reading AFFINITY")? {
            if returned.contains(&(k.saddr_be, k.policy)) {
                let _ = affinities.remove(&k);
            }
        }
    }
    Ok((removed, candidates.saturating_sub(removed)))
}

/// How long an endpoint record outlives its last flow: a flow being made
/// for it may not be in the connection map yet.
const ENDPOINT_GRACE_NS: u64 = 10_000_000_000;

/// Removes the endpoint records (`balance = "endpoint"`) that no flow
/// uses any more and that placed no flow for [`ENDPOINT_GRACE_NS`].
/// Returns how many went.
pub fn reap_endpoints(maps: &Maps, now_ns: u64) -> anyhow::Result<usize> {
    let mut eps = maps.endpoints_map()?;
    let records = mapwalk::collect(&eps).context("reading ENDPOINTS")?;
    if records.is_empty() {
        return Ok(0);
    }
    let mut live = HashSet::new();
    mapwalk::for_each(&maps.fwd()?, |k, f| {
        live.insert((k.saddr_be, k.sport_be, k.proto, f.policy));
    })
    .context("reading CONN_FWD")?;
    let mut removed = 0;
    for (k, e) in records {
        let used = live.contains(&(k.lan_addr_be, k.lan_port_be, k.proto, k.policy));
        if !used && now_ns.saturating_sub(e.last_ns) > ENDPOINT_GRACE_NS && eps.remove(&k).is_ok() {
            removed += 1;
        }
    }
    Ok(removed)
}

/// `BPF_NOEXIST`: insert only where no entry is.
pub const NOEXIST: u64 = 1;
/// `BPF_EXIST`: update an entry only if it exists.
const EXIST: u64 = 2;

/// A stamp of an older layout (`CLOCK_BOOTTIME`, ns) on today's clock:
/// `lead_ns` (the time spent suspended) earlier.
fn restamped(ns: u64, s: u32, lead_ns: u64) -> (u64, u32) {
    (
        ns.saturating_sub(lead_ns),
        s.saturating_sub((lead_ns / 1_000_000_000) as u32),
    )
}

/// Moves every stamp of flows, affinities and endpoints back by `lead_ns`:
/// they were made on `CLOCK_BOOTTIME` by an older layout, and today's
/// clock stood still while the machine was suspended. Returns how many
/// entries changed.
pub fn restamp(maps: &Maps, lead_ns: u64) -> anyhow::Result<usize> {
    let mut n = 0;
    let mut fwd = maps.fwd()?;
    for (k, mut f) in mapwalk::collect(&fwd)? {
        (f.last_seen_ns, f.created_s) = restamped(f.last_seen_ns, f.created_s, lead_ns);
        // A flow gone meanwhile stays gone.
        if fwd.insert(k, f, EXIST).is_ok() {
            n += 1;
        }
    }
    let mut aff = maps.affinities_map()?;
    for (k, mut a) in mapwalk::collect(&aff)? {
        (a.last_ns, a.created_s) = restamped(a.last_ns, a.created_s, lead_ns);
        if aff.insert(k, a, EXIST).is_ok() {
            n += 1;
        }
    }
    let mut eps = maps.endpoints_map()?;
    for (k, mut e) in mapwalk::collect(&eps)? {
        (e.last_ns, e.created_s) = restamped(e.last_ns, e.created_s, lead_ns);
        if eps.insert(k, e, EXIST).is_ok() {
            n += 1;
        }
    }
    Ok(n)
}

/// The public mapping an endpoint record holds, if its uplink has an
/// address (`uplinks`: the UPLINKS slots).
fn held_mapping(k: &EndpointKey, e: &Endpoint, uplinks: &[Uplink]) -> Option<EimKey> {
    let addr = uplinks.get(usize::from(e.uplink))?.addr_be;
    (addr != 0).then_some(EimKey {
        nat_addr_be: addr,
        nat_port_be: e.nat_port_be,
        proto: k.proto,
        _pad: 0,
    })
}

/// Keeps `ENDPOINT_PORTS` in step with the endpoint records: a
/// reservation no record holds any more goes once it was seen so on the
/// previous pass too (`suspects`; the datapath claims a port just before
/// it writes the record), and a record without its reservation (made
/// before the map existed, or when it was full) gets it back. Returns
/// (removed, restored).
pub fn sync_endpoint_ports(
    maps: &Maps,
    suspects: &mut HashSet<EimKey>,
) -> anyhow::Result<(usize, usize)> {
    let records = maps.endpoints()?;
    let mut ports = maps.endpoint_ports()?;
    let reserved = mapwalk::collect(&ports).context("reading ENDPOINT_PORTS")?;
    if records.is_empty() && reserved.is_empty() {
        suspects.clear();
        return Ok((0, 0));
    }
    let uplinks = maps.uplinks()?;
    let held: std::collections::HashMap<EimKey, EndpointKey> = records
        .iter()
        .filter_map(|(k, e)| Some((held_mapping(k, e, &uplinks)?, *k)))
        .collect();
    let mut stale = HashSet::new();
    let mut removed = 0;
    for (m, owner) in &reserved {
        if held.get(m) == Some(owner) {
            continue;
        }
        if suspects.contains(m) && ports.remove(m).is_ok() {
            removed += 1;
        } else {
            stale.insert(*m);
        }
    }
    *suspects = stale;
    let have: HashSet<EimKey> = reserved.iter().map(|(m, _)| *m).collect();
    let mut restored = 0;
    for (m, owner) in held {
        if !have.contains(&m) && ports.insert(m, owner, NOEXIST).is_ok() {
            restored += 1;
        }
    }
    Ok((removed, restored))
}

/// A set of flow keys with a one-multiply hash: SipHash would cost more than
/// reading the maps at a million flows. The seed is random, against chosen
/// collisions.
struct KeySet(HashSet<u128, Fold>);

impl Default for KeySet {
    fn default() -> Self {
        Self(HashSet::with_hasher(Fold(RandomState::new().hash_one(0u8))))
    }
}

impl KeySet {
    fn bits(k: &FlowKey) -> u128 {
        let [a, b] = k._pad1.to_ne_bytes();
        u128::from(k.saddr_be)
            | u128::from(k.daddr_be) << 32
            | u128::from(k.sport_be) << 64
            | u128::from(k.dport_be) << 80
            | u128::from(u32::from_ne_bytes([k.proto, k._pad0, a, b])) << 96
    }

    fn insert(&mut self, k: &FlowKey) {
        self.0.insert(Self::bits(k));
    }

    fn contains(&self, k: &FlowKey) -> bool {
        self.0.contains(&Self::bits(k))
    }
}

#[derive(Clone, Copy)]
struct Fold(u64);

impl BuildHasher for Fold {
    type Hasher = Fold;

    fn build_hasher(&self) -> Fold {
        *self
    }
}

impl Fold {
    fn mix(&mut self, w: u64) {
        let m = u128::from(self.0 ^ w) * 0x9e37_79b9_7f4a_7c15;
        self.0 = m as u64 ^ (m >> 64) as u64;
    }
}

impl Hasher for Fold {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut w = [0; 8];
            w[..chunk.len()].copy_from_slice(chunk);
            self.mix(u64::from_ne_bytes(w));
        }
    }

    fn write_u128(&mut self, v: u128) {
        self.mix(v as u64);
        self.mix((v >> 64) as u64);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restamped_stamps_move_back_by_the_lead_and_never_below_zero() {
        let lead = 3_600_000_000_000; // an hour suspended
        assert_eq!(
            restamped(10_000_000_000_000, 10_000, lead),
            (6_400_000_000_000, 6_400)
        );
        assert_eq!(restamped(5, 2, lead), (0, 0));
    }

    fn key(proto: u8) -> FlowKey {
        FlowKey {
            saddr_be: u32::from(Ipv4Addr::new(198, 18, 1, 2)).to_be(),
            daddr_be: u32::from(Ipv4Addr::new(198, 19, 0, 10)).to_be(),
            sport_be: 40000u16.to_be(),
            dport_be: 80u16.to_be(),
            proto,
            _pad0: 0,
            _pad1: 0,
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
        for gre_esp_sctp in [47, 50, 132] {
            assert_eq!(timeout_s(&key(gre_esp_sctp), &f, &t), 600);
        }
        f.flags = 0;
        assert_eq!(timeout_s(&key(IPPROTO_TCP), &f, &t), 240);
        f.flags = FLOW_RST;
        assert_eq!(timeout_s(&key(IPPROTO_TCP), &f, &t), 10);
    }

    #[test]
    fn key_bits_tell_every_field_apart() {
        let k = key(IPPROTO_TCP);
        let mut variants = vec![k];
        variants.push(FlowKey { saddr_be: 1, ..k });
        variants.push(FlowKey { daddr_be: 1, ..k });
        variants.push(FlowKey { sport_be: 1, ..k });
        variants.push(FlowKey { dport_be: 1, ..k });
        variants.push(FlowKey {
            proto: IPPROTO_UDP,
            ..k
        });
        variants.push(FlowKey { _pad1: 1, ..k });
        let mut set = KeySet::default();
        for (i, v) in variants.iter().enumerate() {
            assert!(!set.contains(v), "variant {i}");
            set.insert(v);
            assert!(set.contains(v), "variant {i}");
        }
    }

    /// Kernel maps pinned in a scratch directory, as the daemon sees them.
    struct Pinned(std::path::PathBuf);

    impl Pinned {
        fn new(name: &str) -> Self {
            use multihome_common::{
                MAP_CONN_FWD, MAP_CONN_REV, MAP_ENDPOINT_PORTS, MAP_ENDPOINTS, MAP_FILL, MAP_HOSTS,
                MAP_SETTINGS, MAP_UPLINKS, MAX_UPLINKS,
            };
            let dir = std::path::Path::new("/sys/fs/bpf")
                .join(format!("multihome-test-{}-{name}", std::process::id()));
            let uplink = size_of::<Uplink>() as u32;
            let maps = [
                (
                    MAP_CONN_FWD,
                    crate::mapwalk::test_map(16, size_of::<FlowFwd>() as u32, 64),
                ),
                (MAP_CONN_REV, crate::mapwalk::test_map(16, 8, 64)),
                (MAP_SETTINGS, crate::mapwalk::test_map(4, 4, 1)),
                (MAP_HOSTS, crate::mapwalk::test_map(4, 16, 64)),
                (MAP_FILL, crate::mapwalk::test_map_of(2, 4, 8, 1)),
                (MAP_ENDPOINTS, crate::mapwalk::test_map(8, 16, 64)),
                (MAP_ENDPOINT_PORTS, crate::mapwalk::test_map(8, 8, 64)),
                (
                    MAP_UPLINKS,
                    crate::mapwalk::test_map_of(2, 4, uplink, MAX_UPLINKS),
                ),
            ];
            std::fs::create_dir_all(&dir).expect(
                "a scratch directory on bpffs (/sys/fs/bpf, mounted by `cargo xtask setup`)",
            );
            let pinned = Self(dir);
            for (name, m) in maps {
                m.pin(pinned.0.join(name)).expect("pin");
            }
            pinned
        }
    }

    impl Drop for Pinned {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn pair(sport: u16, last_seen_ns: u64) -> (FlowKey, FlowFwd, FlowKey, FlowRev) {
        let k = FlowKey {
            sport_be: sport.to_be(),
            ..key(IPPROTO_UDP)
        };
        let f = FlowFwd {
            last_seen_ns,
            nat_addr_be: u32::from(Ipv4Addr::new(198, 18, 11, 1)).to_be(),
            nat_port_be: (sport + 1000).to_be(),
            ..Default::default()
        };
        let r = FlowRev {
            lan_addr_be: k.saddr_be,
            lan_port_be: k.sport_be,
            ..Default::default()
        };
        (k, f, k.reply(f.nat_addr_be, f.nat_port_be), r)
    }

    #[test]
    fn a_crowded_map_loses_its_unanswered_idle_flows_first_and_never_an_established_one() {
        let dir = Pinned::new("evict");
        let maps = Maps::open(&dir.0).expect("open");
        let (mut fwd, mut rev) = (maps.fwd().expect("fwd"), maps.rev().expect("rev"));
        let now = 1_000_000_000_000;
        let unanswered = pair(1, now - 2_000_000_000);
        let young = pair(2, now - 100_000_000);
        let mut established = pair(3, now - 2_000_000_000);
        established.1.flags = FLOW_SEEN_REPLY;
        for (k, f, rk, r) in [unanswered, young, established] {
            fwd.insert(k, f, 0).expect("insert");
            rev.insert(rk, r, 0).expect("insert");
        }
        // Not crowded: nothing but expiry.
        maps.set_fill(3).expect("fill");
        let pass = reap(&maps, &Timeouts::default(), now, 64).expect("reap");
        assert_eq!((pass.evicted, pass.flows, pass.crowded), (0, 3, false));
        // Nine tenths full, as the datapath counts it.
        maps.set_fill(58).expect("fill");
        let pass = reap(&maps, &Timeouts::default(), now, 64).expect("reap");
        assert_eq!((pass.evicted, pass.flows, pass.crowded), (1, 2, true));
        assert!(
            fwd.get(&unanswered.0, 0).is_err(),
            "the unanswered flow goes"
        );
        assert!(fwd.get(&young.0, 0).is_ok(), "a SYN still waiting stays");
        assert!(
            fwd.get(&established.0, 0).is_ok(),
            "an established flow stays"
        );
        assert_eq!(maps.fill().expect("fill"), 2);
    }

    #[test]
    fn a_purge_removes_a_flow_refreshed_during_its_walk_and_counts_only_removals() {
        let dir = Pinned::new("purge");
        let maps = Maps::open(&dir.0).expect("open");
        let (mut fwd, mut rev) = (maps.fwd().expect("fwd"), maps.rev().expect("rev"));
        let busy = pair(1, 1_000);
        let other = pair(2, 1_000);
        for (k, f, rk, r) in [busy, other] {
            fwd.insert(k, f, 0).expect("insert");
            rev.insert(rk, r, 0).expect("insert");
        }
        // `doomed` as the walk asks it, while the datapath touches `key`.
        let touching = |key: FlowKey, doomed: fn(&FlowKey, &FlowFwd) -> bool| {
            let mut touch = maps.fwd().expect("fwd");
            move |k: &FlowKey, f: &FlowFwd| {
                if *k == key && f.last_seen_ns == 1_000 {
                    let fresh = FlowFwd {
                        last_seen_ns: 2_000,
                        ..*f
                    };
                    touch.insert(k, fresh, 0).expect("touch");
                }
                doomed(k, f)
            }
        };
        // A purge by key takes the busy flow all the same.
        let n = remove_where(&maps, touching(busy.0, |k, _| k.sport_be == 1u16.to_be()))
            .expect("purge");
        assert_eq!(n, 1);
        assert!(fwd.get(&busy.0, 0).is_err() && rev.get(&busy.2, 0).is_err());
        assert!(fwd.get(&other.0, 0).is_ok());
        // Expiry spares it: a flow refreshed during the walk is not idle.
        let n =
            remove_where(&maps, touching(other.0, |_, f| f.last_seen_ns < 2_000)).expect("expire");
        assert_eq!(n, 0, "a flow kept is not counted");
        assert!(fwd.get(&other.0, 0).is_ok());
    }

    #[test]
    fn reaper_on_kernel_maps() {
        let dir = Pinned::new("reaper");
        let maps = Maps::open(&dir.0).expect("open");
        let (mut fwd, mut rev) = (maps.fwd().expect("fwd"), maps.rev().expect("rev"));
        let now = 1_000_000_000_000;
        let live = pair(1, now - 10_000_000_000);
        let idle = pair(2, now - 400_000_000_000);
        let orphan = pair(3, now);
        let newborn = pair(4, now);
        for (k, f, rk, r) in [live, idle] {
            fwd.insert(k, f, 0).expect("insert");
            rev.insert(rk, r, 0).expect("insert");
        }
        rev.insert(orphan.2, orphan.3, 0).expect("insert");
        // The datapath adds the reverse half first.
        rev.insert(newborn.2, newborn.3, 0).expect("insert");

        let pass = reap(&maps, &Timeouts::default(), now, 64).expect("reap");
        assert_eq!(
            pass,
            Pass {
                expired: 1,
                evicted: 0,
                flows: 1,
                crowded: false
            }
        );
        assert!(fwd.get(&idle.0, 0).is_err() && rev.get(&idle.2, 0).is_err());
        assert!(fwd.get(&live.0, 0).is_ok() && rev.get(&live.2, 0).is_ok());
        assert_eq!(maps.fill().expect("fill"), 1, "the recount of FILL");
        let hosts = maps.hosts().expect("hosts");
        assert_eq!(hosts.get(&live.0.saddr_be, 0).expect("host").flows, 1);

        let mut suspects = Vec::new();
        assert_eq!(reap_orphans(&maps, &mut suspects).expect("orphans"), 0);
        suspects.sort_by_key(|k| k.dport_be);
        assert_eq!(suspects, [orphan.2, newborn.2]);
        fwd.insert(newborn.0, newborn.1, 0).expect("insert");
        assert_eq!(reap_orphans(&maps, &mut suspects).expect("orphans"), 1);
        assert_eq!(suspects, [orphan.2], "still the orphan of this pass");
        assert!(rev.get(&orphan.2, 0).is_err());
        let mut left: Vec<_> = maps
            .flows()
            .expect("flows")
            .into_iter()
            .map(|e| e.0)
            .collect();
        left.sort_by_key(|k| k.sport_be);
        assert_eq!(left, [live.0, newborn.0]);
        assert_eq!(
            crate::mapwalk::collect(&rev).expect("rev").len(),
            2,
            "live and newborn reverse halves"
        );
    }

    #[test]
    fn endpoint_port_reservations_follow_their_records_over_two_passes() {
        let dir = Pinned::new("endpoint-ports");
        let maps = Maps::open(&dir.0).expect("open");
        let addr = u32::from(Ipv4Addr::new(198, 18, 11, 1)).to_be();
        maps.set_uplink(
            0,
            &Uplink {
                addr_be: addr,
                ..Default::default()
            },
        )
        .expect("uplink");
        let owner = |port: u16| EndpointKey {
            lan_addr_be: u32::from(Ipv4Addr::new(198, 18, 1, 2)).to_be(),
            lan_port_be: port.to_be(),
            proto: IPPROTO_UDP,
            policy: 1,
        };
        let mapping = |port: u16| EimKey {
            nat_addr_be: addr,
            nat_port_be: port.to_be(),
            proto: IPPROTO_UDP,
            _pad: 0,
        };
        let record = |port: u16| Endpoint {
            nat_port_be: port.to_be(),
            ..Default::default()
        };
        let mut records = maps.endpoints_map().expect("ENDPOINTS");
        let mut ports = maps.endpoint_ports().expect("ENDPOINT_PORTS");
        // Held: a record and its reservation. Unreserved: a record made
        // before the map existed. Stale: a reservation whose record went.
        records.insert(owner(1), record(1), 0).expect("insert");
        ports.insert(mapping(1), owner(1), 0).expect("insert");
        records.insert(owner(2), record(2), 0).expect("insert");
        ports.insert(mapping(3), owner(3), 0).expect("insert");

        let mut suspects = HashSet::new();
        assert_eq!(
            sync_endpoint_ports(&maps, &mut suspects).expect("sync"),
            (0, 1)
        );
        assert_eq!(ports.get(&mapping(2), 0).expect("restored"), owner(2));
        assert!(
            ports.get(&mapping(3), 0).is_ok(),
            "a reservation without its record may be a claim whose record is being written"
        );
        assert_eq!(
            sync_endpoint_ports(&maps, &mut suspects).expect("sync"),
            (1, 0)
        );
        assert!(
            ports.get(&mapping(3), 0).is_err(),
            "stale on two passes: gone"
        );
        assert_eq!(ports.get(&mapping(1), 0).expect("kept"), owner(1));

        // A record that moved to another port frees its old reservation.
        records.insert(owner(1), record(4), 0).expect("insert");
        sync_endpoint_ports(&maps, &mut suspects).expect("sync");
        assert_eq!(
            sync_endpoint_ports(&maps, &mut suspects).expect("sync"),
            (1, 0)
        );
        assert!(ports.get(&mapping(1), 0).is_err());
        assert_eq!(ports.get(&mapping(4), 0).expect("moved"), owner(1));
    }
}
