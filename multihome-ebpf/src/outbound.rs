//! LAN to uplink: pin new flows, SNAT, forward. The LAN ingress program
//! does the work; the uplink egress program finishes packets that the fast
//! path handed to the kernel.
use aya_ebpf::{maps::lpm_trie::Key, programs::TcContext};
use multihome_common::{
    CLASSIFY_BY_ROUTES, CLASSIFY_IN_MAIN, FLOW_FAILED_OVER, FLOW_FIN_IN, FLOW_FIN_OUT,
    FLOW_HAIRPIN, FLOW_RST, FLOW_RST_IN, FLOW_SEEN_REPLY, FlowFwd, FlowKey, IPPROTO_AH,
    IPPROTO_TCP, JUMP_LAN_IN6, JUMP_LAN_RESET, JUMP_WAN_OUT6, JUMP_WAN_OUT6_L3, MARK_PROHIBIT,
    MARK_TRANSLATED, MAX_LAN_NETS, MAX_UPLINKS, ON_DOWN_KEEP, ON_DOWN_PURGE, ON_DOWN_PURGE_UDP,
    ON_DOWN_RESET, ON_DOWN_UPLINK, ROUTE_ASK_FIB, ROUTE_CONNECTED, ROUTE_VIA, RT_TABLE_MAIN,
    RULE_MAIN, RULE_UNREACHABLE, Reason, RoutedKey, Settings, UPLINK_DRAIN_RESET, UPLINK_EVACUATE,
    UPLINK_EVACUATE_TCP, UPLINK_L3, UPLINK_OUTAGE, UPLINK_RESET_TCP, Uplink,
};

use crate::{
    affinity, classify,
    conntrack::{self, Tags},
    frag, fwd, guard, hairpin,
    maps::{CLASSIFY, JUMP, LAN_NETS, LOCAL_ADDRS, MAIN_ROUTES, SELECT, SETTINGS, UPLINKS},
    mss,
    nat::{self, Side},
    parse::{self, L4, Packet, TCP_ACK, TCP_SYN},
    quota, select, sockets, stats,
    verdict::{Outcome, Verdict},
};

#[inline(always)]
pub fn ingress_ifindex(ctx: &TcContext) -> u32 {
    // SAFETY: the context pointer is valid for the program's run.
    unsafe { (*ctx.skb.skb).ingress_ifindex }
}

#[inline(always)]
pub fn settings() -> Result<Settings, Reason> {
    SETTINGS.get(0).copied().ok_or(Reason::NoUplink)
}

/// `mh_lan_in`: a packet from the LAN.
#[inline(always)]
pub fn lan_ingress(ctx: &TcContext) -> Outcome {
    let l3 = match parse::l3_offset::<true>(ctx) {
        Err(Reason::NotIpv4) => return jump(ctx, JUMP_LAN_IN6),
        l3 => l3?,
    };
    let pkt = match parse::parse_ipv4(ctx, l3) {
        Err(Reason::Fragment) => return lan_fragment(ctx, l3),
        parsed => parsed?,
    };
    match pkt.l4_kind {
        L4::IcmpError => return crate::icmp::lan_error(ctx, &pkt),
        // Answers to pings from outside: the gateway forwards no inbound
        // connections.
        L4::EchoReply => return Err(Reason::UnsupportedProto),
        _ => {}
    }
    let key = conntrack::lan_key(&pkt);
    let pinned = match conntrack::lookup_fwd(&key) {
        Some(f) => match fate(ctx, &key, f, pkt.tcp_flags()) {
            Fate::Keep => Some(f),
            Fate::Remake => None,
            Fate::Reset => {
                // SAFETY: the map holds only programs of this object; on
                // failure control comes back here and the flow is made anew.
                unsafe { JUMP.tail_call(ctx, JUMP_LAN_RESET) };
                None
            }
        },
        None => None,
    };
    let flow = match pinned {
        Some(f) => {
            conntrack::touch_out(ctx, &key, f, &pkt);
            // SAFETY: a copy of the map value.
            unsafe { *f }
        }
        None => new_flow(ctx, &pkt, &key)?,
    };
    frag::note_first(ctx, &pkt, flow.nat_addr_be, flow.uplink);
    if flow.flags & FLOW_HAIRPIN != 0 {
        return hairpin::deliver(ctx, &pkt, flow.nat_addr_be, flow.nat_port_be);
    }
    let uplink = UPLINKS.get(flow.uplink as u32).ok_or(Reason::NoUplink)?;
    mss::clamp(ctx, &pkt, uplink.mss_clamp)?;
    to_uplink(ctx, &pkt, &flow, uplink)
}

/// Flags of a TCP flow that one end closed or reset.
pub const FLOW_CLOSED: u32 = FLOW_RST | FLOW_RST_IN | FLOW_FIN_OUT | FLOW_FIN_IN;

/// What becomes of a pinned flow at its next LAN packet.
enum Fate {
    Keep,
    /// Removed: the packet makes it anew.
    Remake,
    /// Removed: the packet is answered with an RST.
    Reset,
}

/// Whether a pinned flow still holds. One of a renumbered uplink (its NAT
/// address is no longer the uplink's) is removed here, so that its packet
/// makes it anew (the daemon's purge may come later); while the uplink has
/// no address at all (a ppp link redialling), its flows stay: the same
/// address may come back. Once its uplink has been down for long enough
/// (`UPLINK_OUTAGE`), the flow's `on_down` (its policy's, else its
/// uplink's) decides: the flow is removed, so its next packet moves it with
/// no table walk and no packet lost; or, for `reset`, an answered TCP
/// flow's packet is answered with an RST instead (unless it is GSO: then
/// it moves, and the remote resets it); or it is kept. A SYN (`tcp`: the
/// packet's TCP flags) on a closed TCP flow's tuple opens a new
/// connection: the old flow goes, and the new one is placed by the rules
/// and affinities as they are now (netfilter, too, makes a new conntrack
/// for a SYN in TIME_WAIT). Hairpin flows, made in pairs, just restart.
#[inline(always)]
fn fate(ctx: &TcContext, key: &FlowKey, f: *mut FlowFwd, tcp: u8) -> Fate {
    // SAFETY: a read of the map value.
    let (uplink, nat_addr_be, nat_port_be, flags, policy) = unsafe {
        (
            (*f).uplink,
            (*f).nat_addr_be,
            (*f).nat_port_be,
            (*f).flags,
            (*f).policy,
        )
    };
    if flags & FLOW_CLOSED != 0 && tcp & (TCP_SYN | TCP_ACK) == TCP_SYN && flags & FLOW_HAIRPIN == 0
    {
        conntrack::remove_pair(key, nat_addr_be, nat_port_be);
        return Fate::Remake;
    }
    let Some(u) = UPLINKS.get(uplink as u32) else {
        return Fate::Keep;
    };
    let (reason, fate) = if u.addr_be != 0 && u.addr_be != nat_addr_be {
        (Reason::StaleAddress, Fate::Remake)
    } else if u.flags & UPLINK_OUTAGE == 0 {
        return Fate::Keep;
    } else {
        let tcp = key.proto == IPPROTO_TCP;
        match on_down(u.flags, policy) {
            ON_DOWN_PURGE => (Reason::Evacuated, Fate::Remake),
            ON_DOWN_PURGE_UDP if !tcp => (Reason::Evacuated, Fate::Remake),
            ON_DOWN_RESET if !tcp => (Reason::Evacuated, Fate::Remake),
            ON_DOWN_RESET
                if flags & FLOW_SEEN_REPLY != 0
                    // SAFETY: the context pointer is valid for the program's run.
                    && unsafe { (*ctx.skb.skb).gso_size } == 0 =>
            {
                conntrack::remove_pair(key, nat_addr_be, nat_port_be);
                return Fate::Reset;
            }
            ON_DOWN_RESET => (Reason::Evacuated, Fate::Remake),
            _ => return Fate::Keep,
        }
    };
    conntrack::remove_pair(key, nat_addr_be, nat_port_be);
    stats::count(reason);
    fate
}

/// The `ON_DOWN_*` of a flow of `policy` on a down uplink with `flags`;
/// `drain --reset` overrides every policy.
#[inline(always)]
pub fn on_down(flags: u16, policy: u8) -> u8 {
    if flags & UPLINK_DRAIN_RESET != 0 {
        return ON_DOWN_RESET;
    }
    if let Some(t) = SELECT.get(policy as u32)
        && t.on_down != ON_DOWN_UPLINK
    {
        return t.on_down;
    }
    if flags & UPLINK_EVACUATE == 0 {
        ON_DOWN_KEEP
    } else if flags & UPLINK_EVACUATE_TCP != 0 {
        ON_DOWN_PURGE
    } else if flags & UPLINK_RESET_TCP != 0 {
        ON_DOWN_RESET
    } else {
        ON_DOWN_PURGE_UDP
    }
}

/// `mh_lan_reset`: a LAN host's TCP segment whose flow `mh_lan_in` found
/// on a down uplink (and removed), answered with an RST.
#[inline(always)]
pub fn lan_reset(ctx: &TcContext) -> Outcome {
    let l3 = parse::l3_offset::<true>(ctx)?;
    let pkt = parse::parse_ipv4(ctx, l3)?;
    if pkt.l4_kind != L4::Tcp {
        return Err(Reason::Malformed);
    }
    crate::reset::reply(ctx, &pkt)
}

/// A later fragment from the LAN: to the kernel with its datagram's
/// uplink mark, so that `mh_wan_out` rewrites its source; dropped when its
/// first fragment was not seen.
#[inline(always)]
fn lan_fragment(ctx: &TcContext, l3: usize) -> Outcome {
    let pkt = parse::parse_fragment(ctx, l3)?;
    let (_, id) = frag::outbound(ctx, &pkt).ok_or(Reason::FragmentNoMapping)?;
    let uplink = UPLINKS.get(id as u32).ok_or(Reason::NoUplink)?;
    ctx.set_mark(uplink.mark);
    stats::slow_path(id);
    Ok(Verdict::Pass)
}

/// Forwards a pinned flow's packet out its uplink, to the cached next hop
/// or else the one `bpf_fib_lookup` finds in the uplink's table, or hands
/// it to the kernel untranslated with the uplink's mark when the fast
/// path cannot.
#[inline(always)]
pub fn to_uplink(ctx: &TcContext, pkt: &Packet, flow: &FlowFwd, uplink: &Uplink) -> Outcome {
    if pkt.ttl <= 1 {
        ctx.set_mark(uplink.mark);
        return Err(Reason::TtlExpired);
    }
    let looked_up = match fwd::cached(ctx, pkt, flow.uplink, uplink) {
        Some(hop) => Ok(hop),
        None => fwd::lookup(
            ctx,
            pkt,
            flow.nat_addr_be,
            pkt.daddr_be,
            Some(uplink.table),
            true,
        ),
    };
    let hop = match looked_up {
        Ok(hop) => hop,
        Err(_) => {
            ctx.set_mark(uplink.mark);
            stats::slow_path(flow.uplink);
            return Ok(Verdict::Pass);
        }
    };
    nat::rewrite(
        ctx,
        pkt,
        Side::Src,
        flow.nat_addr_be,
        flow.nat_port_be,
        true,
    )?;
    stats::tx(flow.uplink, pkt.tot_len as u32);
    // Tells the uplink's egress program that this one is done.
    ctx.set_mark(uplink.mark | MARK_TRANSLATED);
    fwd::redirect(ctx, &hop, true, uplink.flags & UPLINK_L3 == 0)
}

/// Where the kernel would route a new flow's packet.
struct Route {
    /// The device it leaves by.
    ifindex: u32,
    /// The destination is on-link there (no gateway).
    onlink: bool,
}

/// Where the kernel would route a new flow's packet: through its policy
/// rules; or, when the daemon found that they come down to the `local`
/// table then `main` (`CLASSIFY_IN_MAIN`), by `LOCAL_ADDRS` and `main`,
/// itself read from the daemon's mirror (`CLASSIFY_BY_ROUTES`, an LPM
/// lookup) unless the mirror defers to a lookup there. None: not
/// forwarded (local, unreachable, ...).
#[inline(always)]
fn classify_route(ctx: &TcContext, pkt: &Packet) -> Option<Route> {
    let how = CLASSIFY.get(0).copied().unwrap_or(0);
    let in_main = how & CLASSIFY_IN_MAIN != 0;
    if in_main && LOCAL_ADDRS.get_ptr(pkt.daddr_be).is_some() {
        return None;
    }
    if in_main && how & CLASSIFY_BY_ROUTES != 0 {
        let key = Key {
            prefix_len: 32,
            data: RoutedKey {
                addr_be: pkt.daddr_be,
            },
        };
        // No route at all: the kernel would not forward it either.
        let r = MAIN_ROUTES.get(&key)?;
        match r.kind {
            ROUTE_VIA | ROUTE_CONNECTED => {
                return Some(Route {
                    ifindex: r.ifindex,
                    onlink: r.kind == ROUTE_CONNECTED,
                });
            }
            ROUTE_ASK_FIB => {}
            _ => return None,
        }
    }
    let table = in_main.then_some(RT_TABLE_MAIN);
    let hop = fwd::lookup(ctx, pkt, pkt.saddr_be, pkt.daddr_be, table, false).ok()?;
    Some(Route {
        ifindex: hop.ifindex,
        onlink: hop.nh_be == pkt.daddr_be,
    })
}

/// `skb->pkt_type` of a frame addressed to this host (`PACKET_HOST`).
const PACKET_HOST: u32 = 0;

/// Whether a new flow may be made for this packet: unicast to this host's
/// MAC, and a destination the internet can route (not multicast,
/// broadcast, 0/8, 127/8, 169.254/16 or 240/4; RFC 6890).
#[inline(always)]
fn unicast_to_internet(ctx: &TcContext, daddr_be: u32) -> bool {
    // SAFETY: the context pointer is valid for the program's run.
    if unsafe { (*ctx.skb.skb).pkt_type } != PACKET_HOST {
        return false;
    }
    let d = u32::from_be(daddr_be);
    let first = d >> 24;
    !(first == 0 || first == 127 || first >= 224 || d >> 16 == 0xa9fe)
}

/// Checks, chooses an uplink for, and pins a flow seen for the first
/// time.
#[inline(always)]
fn new_flow(ctx: &TcContext, pkt: &Packet, key: &FlowKey) -> Result<FlowFwd, Reason> {
    if !unicast_to_internet(ctx, pkt.daddr_be) {
        return Err(Reason::NotUnicast);
    }
    if guard::routed_uplinks(pkt.saddr_be) != 0 {
        return Err(Reason::RoutedSource);
    }
    if !is_lan_source(pkt.saddr_be, ingress_ifindex(ctx)) {
        return Err(Reason::SpoofedSource);
    }
    let settings = settings()?;
    let host = quota::admit(pkt.saddr_be, &settings)?;
    if let Some((id, uplink)) = select::uplink_with_addr(pkt.daddr_be) {
        // To the gateway's public address: another LAN host's mapping, or
        // the gateway's own service.
        let flow = hairpin::create(ctx, key, pkt, id, uplink, &settings)?;
        quota::count_new(pkt.saddr_be, &host);
        stats::new_flow(flow.uplink);
        return Ok(flow);
    }
    if !matches!(
        pkt.l4_kind,
        L4::Tcp | L4::Udp | L4::EchoRequest | L4::Other | L4::OtherPseudo
    ) {
        return Err(Reason::UnsupportedProto);
    }
    if pkt.proto == IPPROTO_AH {
        return Err(Reason::AhNotNatable);
    }
    // Route it as the kernel would: local and LAN-to-LAN traffic is not ours.
    let route = classify_route(ctx, pkt).ok_or(Reason::NotForUplink)?;
    if !is_uplink_device(route.ifindex) {
        return Err(Reason::NotForUplink);
    }
    let decision = classify::decide(ctx, pkt, key, settings.rules);
    let action = decision.action;
    if action & RULE_UNREACHABLE != 0 {
        return Err(refuse(ctx, &settings));
    }
    if action & RULE_MAIN != 0 {
        return Err(Reason::PolicyMain);
    }
    let policy = action & 0xff;
    let onlink = route.onlink.then_some(route.ifindex);
    let (id, uplink, failed_over) =
        match select::choose(onlink, key, settings.flow_hash_seed, policy, decision.stuck) {
            Err(Reason::PolicyRefused) => return Err(refuse(ctx, &settings)),
            chosen => chosen?,
        };
    let echo = pkt.l4_kind == L4::EchoRequest;
    let tags = Tags {
        flags: if failed_over { FLOW_FAILED_OVER } else { 0 },
        policy: policy as u8,
        snd_max: if echo {
            conntrack::echo_waiting(ctx, pkt).unwrap_or(0)
        } else {
            0
        },
    };
    let flow = if pkt.portless() {
        portless_flow(key, pkt, id, uplink, tags)?
    } else if decision.endpoint {
        endpoint_flow(ctx, key, pkt, (id, uplink), &settings, tags, &decision)?
    } else {
        conntrack::create(ctx, key, pkt, (id, uplink), &settings, tags)?
    };
    if pkt.l4_kind == L4::Tcp {
        let tcp = pkt.tcp_flags();
        if tcp & TCP_SYN == 0 {
            stats::count(Reason::MidStream);
        } else if tcp & TCP_ACK == 0 {
            stats::syn_sent(flow.uplink, pkt.daddr_be);
        }
    }
    quota::count_new(pkt.saddr_be, &host);
    frag::note_peer(pkt, flow.nat_addr_be, pkt.saddr_be);
    stats::new_flow(flow.uplink);
    Ok(flow)
}

/// A new flow of a `balance = "endpoint"` policy: on its endpoint's public
/// port when the endpoint has one on this uplink (another port, counted,
/// when a flow that held that port before the record was made holds it
/// towards this remote); otherwise a new mapping, which becomes the
/// endpoint's and is reserved for it.
#[inline(always)]
fn endpoint_flow(
    ctx: &TcContext,
    key: &FlowKey,
    pkt: &Packet,
    (id, uplink): (u8, &Uplink),
    settings: &Settings,
    tags: Tags,
    decision: &classify::Decision,
) -> Result<FlowFwd, Reason> {
    let Some(port_be) = decision.endpoint_port_be else {
        let flow = conntrack::create(ctx, key, pkt, (id, uplink), settings, tags)?;
        let at = (id, flow.nat_addr_be);
        affinity::pin_endpoint(key, tags.policy as u32, at, flow.nat_port_be);
        return Ok(flow);
    };
    if decision.stuck == Some(id) {
        match conntrack::create_exact(key, pkt, id, uplink.addr_be, port_be, tags) {
            Err(Reason::PortExhausted) => stats::count(Reason::EndpointRemapped),
            made => return made,
        }
    }
    conntrack::create(ctx, key, pkt, (id, uplink), settings, tags)
}

/// A new flow a policy refuses: to the kernel with the mark its
/// `prohibit` rule answers with ICMP administratively prohibited.
#[inline(always)]
fn refuse(ctx: &TcContext, settings: &Settings) -> Reason {
    ctx.set_mark(settings.mark_base | MARK_PROHIBIT);
    Reason::PolicyRefused
}

/// A flow translated by address only: on the chosen uplink, else on the
/// first other usable uplink whose address is free towards the remote.
#[inline(always)]
fn portless_flow(
    key: &FlowKey,
    pkt: &Packet,
    id: u8,
    uplink: &Uplink,
    tags: Tags,
) -> Result<FlowFwd, Reason> {
    match conntrack::create_portless(key, pkt, id, uplink, tags) {
        Err(Reason::AddrTaken) => {}
        other => return other,
    }
    for other in 0..MAX_UPLINKS {
        if other == id as u32 {
            continue;
        }
        if let Some(u) = UPLINKS.get(other)
            && select::usable(u)
        {
            match conntrack::create_portless(key, pkt, other as u8, u, tags) {
                Err(Reason::AddrTaken) => {}
                created => return created,
            }
        }
    }
    Err(Reason::AddrTaken)
}

#[inline(always)]
fn is_lan_source(saddr_be: u32, ifindex: u32) -> bool {
    for i in 0..MAX_LAN_NETS {
        if let Some(net) = LAN_NETS.get(i)
            && net.in_use != 0
            && saddr_be & net.mask_be == net.addr_be
            && (net.ifindex == 0 || net.ifindex == ifindex)
        {
            return true;
        }
    }
    false
}

#[inline(always)]
fn is_uplink_device(ifindex: u32) -> bool {
    for id in 0..MAX_UPLINKS {
        if let Some(u) = UPLINKS.get(id)
            && u.ifindex == ifindex
            && u.ifindex != 0
        {
            return true;
        }
    }
    false
}

/// `mh_wan_out`: a packet leaving an uplink. Packets the fast path
/// translated carry [`MARK_TRANSLATED`] and pass at the cost of a mark
/// test. Packets that the LAN program handed to the kernel carry their
/// uplink's mark and get their SNAT here. Every other forwarded packet,
/// and any the SNAT failed on, must pass the egress guard. The gateway's
/// own packets are checked for a port clash.
#[inline(always)]
pub fn wan_egress<const L2: bool>(ctx: &TcContext) -> Outcome {
    if ingress_ifindex(ctx) == 0 {
        return host_egress::<L2>(ctx);
    }
    // SAFETY: the context pointer is valid for the program's run.
    let mark = unsafe { (*ctx.skb.skb).mark };
    let mark_base = settings()?.mark_base;
    if mark == mark_base | MARK_TRANSLATED {
        return Ok(Verdict::Pass);
    }
    let l3 = match parse::l3_offset::<L2>(ctx) {
        Err(Reason::NotIpv4) => return egress6::<L2>(ctx),
        l3 => l3?,
    };
    if let Some((id, uplink)) = select::from_mark(mark, mark_base) {
        // SAFETY: the context pointer is valid for the program's run.
        let ifindex = unsafe { (*ctx.skb.skb).ifindex };
        match slow_path_snat(ctx, l3, id, uplink.addr_be) {
            Ok(v) if uplink.ifindex == ifindex => return Ok(v),
            // Translated, but routed out another device: the guard decides.
            Ok(_) => {}
            Err(reason) => stats::count(reason),
        }
    }
    guard::egress(ctx, l3)
}

/// SNAT for a packet of uplink `id` that the kernel forwarded.
#[inline(always)]
fn slow_path_snat(ctx: &TcContext, l3: usize, id: u8, uplink_addr_be: u32) -> Outcome {
    if parse::is_later_fragment(ctx, l3)? {
        // The L4 header, and its checksum, went out in the first fragment.
        nat::rewrite_fragment_src(ctx, l3, uplink_addr_be)?;
        stats::tx(id, ctx.len());
        return Ok(Verdict::Pass);
    }
    let pkt = parse::parse_ipv4(ctx, l3)?;
    if pkt.l4_kind == L4::IcmpError {
        return crate::icmp::translate_out(ctx, &pkt);
    }
    let key = conntrack::lan_key(&pkt);
    let flow = conntrack::lookup_fwd(&key).ok_or(Reason::NoMapping)?;
    // SAFETY: a copy of the map value.
    let flow = unsafe { *flow };
    if flow.nat_addr_be != uplink_addr_be {
        // Renumbered since the LAN program looked: the guard drops it.
        return Err(Reason::StaleAddress);
    }
    nat::rewrite(
        ctx,
        &pkt,
        Side::Src,
        flow.nat_addr_be,
        flow.nat_port_be,
        false,
    )?;
    stats::tx(id, pkt.tot_len as u32);
    Ok(Verdict::Pass)
}

/// A packet the gateway itself sends. A socket that took an address and
/// port a NAT flow already holds towards the same remote would have its
/// replies translated to the LAN host: its packets are dropped instead,
/// and the flow keeps working.
#[inline(always)]
fn host_egress<const L2: bool>(ctx: &TcContext) -> Outcome {
    let l3 = match parse::l3_offset::<L2>(ctx) {
        Err(Reason::NotIpv4) => return egress6::<L2>(ctx),
        l3 => l3?,
    };
    if parse::is_later_fragment(ctx, l3)? {
        return Ok(Verdict::Pass);
    }
    let pkt = parse::parse_ipv4(ctx, l3)?;
    if pkt.l4_kind == L4::EchoRequest {
        // The gateway's ping (or probe) wins: a LAN flow on that
        // identifier is re-keyed by its next request.
        sockets::note_host_echo(pkt.daddr_be, pkt.sport_be);
        let key = conntrack::lan_key(&pkt);
        if let Some((rev, fwd)) = conntrack::remove_by_reply(&key.reply(pkt.saddr_be, pkt.sport_be))
        {
            // Its request in flight keeps its reply.
            sockets::hand_over(pkt.daddr_be, pkt.sport_be, &rev, fwd);
            stats::count(Reason::EchoRekeyed);
        }
        return Ok(Verdict::Pass);
    }
    if !pkt.has_pseudo_header() && !pkt.portless() {
        return Ok(Verdict::Pass);
    }
    let key = conntrack::lan_key(&pkt);
    if conntrack::lookup_rev(&key.reply(pkt.saddr_be, pkt.sport_be)).is_some() {
        return Err(Reason::HostPortClash);
    }
    frag::note_host(&pkt);
    Ok(Verdict::Pass)
}

/// Runs the IPv6 stage `stage` on an IPv6 packet; anything else passes
/// as neither IPv4 nor IPv6.
#[inline(always)]
pub fn ipv6<const L2: bool>(ctx: &TcContext, stage: fn(&TcContext, usize) -> Outcome) -> Outcome {
    match parse::ipv6_offset::<L2>(ctx) {
        Some(l3) => stage(ctx, l3),
        None => Err(Reason::NotIpv4),
    }
}

/// Tail-calls `JUMP` slot `slot`; when that fails, the packet passes as
/// neither IPv4 nor (translated) IPv6.
#[inline(always)]
pub fn jump(ctx: &TcContext, slot: u32) -> Outcome {
    // SAFETY: the map holds only programs of this object.
    unsafe { JUMP.tail_call(ctx, slot) };
    Err(Reason::NotIpv4)
}

/// A packet that is not IPv4 leaving an uplink: to `mh_wan_out6`; should
/// the tail call fail, an IPv6 packet still meets the egress guard.
#[inline(always)]
fn egress6<const L2: bool>(ctx: &TcContext) -> Outcome {
    // SAFETY: the map holds only programs of this object.
    unsafe { JUMP.tail_call(ctx, if L2 { JUMP_WAN_OUT6 } else { JUMP_WAN_OUT6_L3 }) };
    match parse::ipv6_offset::<L2>(ctx) {
        Some(l3) if ingress_ifindex(ctx) != 0 => guard::egress6(ctx, l3),
        _ => Err(Reason::NotIpv4),
    }
}
