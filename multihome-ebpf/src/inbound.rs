//! Uplink to LAN: reverse-translate replies and forward them to the LAN
//! host.
use aya_ebpf::programs::TcContext;
use multihome_common::{JUMP_WAN_IN6, JUMP_WAN_IN6_L3, Reason};

use crate::{
    conntrack, frag,
    fwd::{self, Hop},
    hairpin,
    maps::UPLINKS,
    mss,
    nat::{self, Side},
    parse::{self, L4, Packet, TCP_ACK, TCP_SYN},
    sockets, stats,
    verdict::{Outcome, Verdict},
};

/// `mh_wan_in`: a packet arriving on an uplink.
#[inline(always)]
pub fn wan_ingress<const L2: bool>(ctx: &TcContext) -> Outcome {
    let l3 = match parse::l3_offset::<L2>(ctx) {
        Err(Reason::NotIpv4) => {
            return crate::outbound::jump(ctx, if L2 { JUMP_WAN_IN6 } else { JUMP_WAN_IN6_L3 });
        }
        l3 => l3?,
    };
    let pkt = match parse::parse_ipv4(ctx, l3) {
        Err(Reason::Fragment) => return wan_fragment::<L2>(ctx, l3),
        parsed => parsed?,
    };
    if pkt.l4_kind == L4::IcmpError {
        return crate::icmp::wan_error::<L2>(ctx, &pkt);
    }
    if pkt.l4_kind == L4::EchoReply && sockets::echo_owned_by_host(pkt.saddr_be, pkt.dport_be) {
        let Some((lan_addr_be, lan_id_be, uplink)) = sockets::handed_back(ctx, &pkt) else {
            return Err(Reason::HostEcho);
        };
        stats::rx(uplink, pkt.tot_len as u32);
        return to_lan::<L2>(ctx, &pkt, lan_addr_be, lan_id_be);
    }
    let rev_key = conntrack::wan_key(&pkt);
    let rev = conntrack::lookup_rev(&rev_key).ok_or(Reason::NoMapping)?;
    // SAFETY: a copy of the map value.
    let rev = unsafe { *rev };
    let fwd_key = rev_key.forward(&rev);
    let Some(flow) = conntrack::lookup_fwd(&fwd_key) else {
        conntrack::drop_orphan(&rev_key);
        return Err(Reason::NoMapping);
    };
    // SAFETY: a read of the map value.
    if unsafe { (*flow).nat_addr_be != rev_key.daddr_be || (*flow).nat_port_be != rev_key.dport_be }
    {
        // Left behind by a flow since remade on another mapping.
        conntrack::drop_stale(&rev_key);
        return Err(Reason::StaleReverse);
    }
    if pkt.l4_kind == L4::EchoReply {
        // SAFETY: the map's value; see `conntrack::touch_out`.
        conntrack::echo_answered(ctx, unsafe { &mut *flow }, &pkt);
    }
    if let Some(waited_ns) = conntrack::touch_in(flow, &pkt) {
        hairpin::note_mapping(&pkt, rev.lan_addr_be, rev.lan_port_be);
        if pkt.tcp_flags() & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK {
            stats::synack(rev.uplink, pkt.saddr_be, waited_ns);
        }
    }
    frag::note_first(ctx, &pkt, rev.lan_addr_be, rev.uplink);
    if pkt.tcp_flags() & TCP_SYN != 0
        && let Some(uplink) = UPLINKS.get(rev.uplink as u32)
    {
        mss::clamp(ctx, &pkt, uplink.mss_clamp)?;
    }
    stats::rx(rev.uplink, pkt.tot_len as u32);
    to_lan::<L2>(ctx, &pkt, rev.lan_addr_be, rev.lan_port_be)
}

/// A later fragment from an uplink: to its LAN host when its datagram or
/// flow is known, else to the kernel (it may be the gateway's own).
#[inline(always)]
fn wan_fragment<const L2: bool>(ctx: &TcContext, l3: usize) -> Outcome {
    let pkt = parse::parse_fragment(ctx, l3)?;
    let (lan_addr_be, uplink) = frag::inbound(ctx, &pkt).ok_or(Reason::Fragment)?;
    let hop = lan_hop::<L2>(ctx, &pkt, lan_addr_be);
    nat::rewrite_l3(ctx, l3, Side::Dst, lan_addr_be, hop.is_some())?;
    stats::rx(uplink, pkt.tot_len as u32);
    stats::count(Reason::FragmentTranslated);
    deliver::<L2>(ctx, hop)
}

/// Rewrites the destination to the LAN host and forwards it there.
#[inline(always)]
fn to_lan<const L2: bool>(
    ctx: &TcContext,
    pkt: &Packet,
    lan_addr_be: u32,
    lan_port_be: u16,
) -> Outcome {
    let hop = lan_hop::<L2>(ctx, pkt, lan_addr_be);
    nat::rewrite(ctx, pkt, Side::Dst, lan_addr_be, lan_port_be, hop.is_some())?;
    deliver::<L2>(ctx, hop)
}

/// The next hop towards a LAN host, unless the kernel must handle the
/// packet (TTL about to expire, no route, too big, or a neighbour to
/// resolve for a packet from an L3 device): the daemon's copy of its
/// neighbour entry (`LAN_HOPS`) from an Ethernet uplink, else the lookup.
#[inline(always)]
pub fn lan_hop<const L2: bool>(ctx: &TcContext, pkt: &Packet, lan_addr_be: u32) -> Option<Hop> {
    if pkt.ttl <= 1 {
        return None;
    }
    if L2 && let Some(hop) = fwd::lan_cached(ctx, lan_addr_be, pkt.tot_len) {
        return Some(hop);
    }
    let hop = fwd::lookup(ctx, pkt, pkt.saddr_be, lan_addr_be, None, true).ok()?;
    (L2 || hop.resolved).then_some(hop)
}

/// Redirects a translated packet to `hop`, or hands it to the kernel.
#[inline(always)]
pub fn deliver<const L2: bool>(ctx: &TcContext, hop: Option<Hop>) -> Outcome {
    match hop {
        Some(hop) => fwd::redirect(ctx, &hop, L2, true),
        None => Ok(Verdict::Pass),
    }
}
