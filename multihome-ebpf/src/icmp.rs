//! ICMP errors (destination unreachable, time exceeded, parameter problem)
//! about NATed flows. The embedded header is the flow's packet as the
//! other side saw it: its address, port and checksums are translated, and
//! the ICMP checksum absorbs the difference. An error never refreshes or
//! removes a flow.
use aya_ebpf::programs::TcContext;
use multihome_common::{IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, Reason};

use crate::{
    conntrack,
    csum::Delta,
    inbound,
    maps::UPLINKS,
    nat::{self, Side},
    parse::{
        ICMP_ECHO, ICMP_ECHO_REPLY, PSEUDO_CSUM_OFF, Packet, hi, ip, lo, other_has_pseudo_header,
        read, write,
    },
    verdict::{Outcome, Verdict},
};

/// The header embedded in an ICMP error.
struct Inner {
    l3: usize,
    l4: usize,
    proto: u8,
    saddr_be: u32,
    daddr_be: u32,
    sport_be: u16,
    dport_be: u16,
    /// An echo request or reply; the identifier is in both ports.
    echo: bool,
    /// Translated by address only; both ports are 0.
    portless: bool,
}

#[inline(always)]
fn parse_inner(ctx: &TcContext, pkt: &Packet) -> Result<Inner, Reason> {
    let l3 = pkt.l4 + 8;
    let vihl = hi(read::<u16>(ctx, l3)?);
    let ihl = ((vihl & 0x0f) as usize) * 4;
    if vihl >> 4 != 4 || ihl < ip::MIN_LEN {
        return Err(Reason::Malformed);
    }
    let proto = lo(read::<u16>(ctx, l3 + ip::TTL)?);
    let l4 = l3 + ihl;
    let (sport_be, dport_be, echo) = match proto {
        IPPROTO_TCP | IPPROTO_UDP => (read(ctx, l4)?, read(ctx, l4 + 2)?, false),
        IPPROTO_ICMP => {
            let kind = hi(read::<u16>(ctx, l4)?);
            if kind != ICMP_ECHO && kind != ICMP_ECHO_REPLY {
                return Err(Reason::IcmpNoMapping);
            }
            let id: u16 = read(ctx, l4 + 4)?;
            (id, id, true)
        }
        _ => (0, 0, false),
    };
    Ok(Inner {
        l3,
        l4,
        proto,
        saddr_be: read(ctx, l3 + ip::SADDR)?,
        daddr_be: read(ctx, l3 + ip::DADDR)?,
        sport_be,
        dport_be,
        echo,
        portless: !matches!(proto, IPPROTO_TCP | IPPROTO_UDP | IPPROTO_ICMP),
    })
}

/// Translates the embedded header's `side` to `addr_be`/`port_be`, and the
/// ICMP checksum with it. The outer header is the caller's.
#[inline(always)]
fn translate_inner(
    ctx: &TcContext,
    pkt: &Packet,
    inner: &Inner,
    side: Side,
    addr_be: u32,
    port_be: u16,
) -> Result<(), Reason> {
    let mut icmp = Delta::default();

    let old_addr: u32 = read(ctx, inner.l3 + side.addr_off())?;
    let old_ip_csum: u16 = read(ctx, inner.l3 + ip::CSUM)?;
    let new_ip_csum = Delta::default().u32(old_addr, addr_be).apply(old_ip_csum);
    write(ctx, inner.l3 + side.addr_off(), addr_be)?;
    write(ctx, inner.l3 + ip::CSUM, new_ip_csum)?;
    icmp = icmp.u32(old_addr, addr_be).u16(old_ip_csum, new_ip_csum);

    if inner.portless {
        if other_has_pseudo_header(inner.proto) {
            // A quoted DCCP or UDP-Lite checksum covers the addresses.
            let off = inner.l4 + PSEUDO_CSUM_OFF;
            if off + 2 <= pkt.l3 + pkt.tot_len as usize
                && let Ok(old) = read::<u16>(ctx, off)
            {
                let new = Delta::default().u32(old_addr, addr_be).apply(old);
                write(ctx, off, new)?;
                icmp = icmp.u16(old, new);
            }
        }
        let icmp_csum: u16 = read(ctx, pkt.l4 + 2)?;
        return write(ctx, pkt.l4 + 2, icmp.apply(icmp_csum));
    }

    let port_off = if inner.echo {
        inner.l4 + 4
    } else {
        inner.l4 + side.port_off()
    };
    let old_port: u16 = read(ctx, port_off)?;
    write(ctx, port_off, port_be)?;
    icmp = icmp.u16(old_port, port_be);

    // The embedded L4 checksum, where the error quotes enough of it.
    let (csum_off, pseudo, udp) = match inner.proto {
        IPPROTO_TCP => (inner.l4 + 16, true, false),
        IPPROTO_UDP => (inner.l4 + 6, true, true),
        _ => (inner.l4 + 2, false, false),
    };
    if csum_off + 2 <= pkt.l3 + pkt.tot_len as usize
        && let Ok(old) = read::<u16>(ctx, csum_off)
        && !(udp && old == 0)
    {
        let mut d = Delta::default().u16(old_port, port_be);
        if pseudo {
            d = d.u32(old_addr, addr_be);
        }
        let mut new = d.apply(old);
        if udp && new == 0 {
            new = 0xffff;
        }
        write(ctx, csum_off, new)?;
        icmp = icmp.u16(old, new);
    }

    let icmp_csum: u16 = read(ctx, pkt.l4 + 2)?;
    write(ctx, pkt.l4 + 2, icmp.apply(icmp_csum))
}

/// An error arriving on an uplink about a flow we sent out: back to the
/// LAN host.
#[inline(always)]
pub fn wan_error<const L2: bool>(ctx: &TcContext, pkt: &Packet) -> Outcome {
    let inner = parse_inner(ctx, pkt)?;
    if inner.saddr_be != pkt.daddr_be {
        return Err(Reason::IcmpNoMapping);
    }
    // The reply tuple of the quoted packet.
    let rev_key = multihome_common::FlowKey {
        saddr_be: inner.daddr_be,
        daddr_be: inner.saddr_be,
        sport_be: if inner.echo { 0 } else { inner.dport_be },
        dport_be: inner.sport_be,
        proto: inner.proto,
        _pad0: 0,
        _pad1: 0,
    };
    let rev = conntrack::lookup_rev(&rev_key).ok_or(Reason::IcmpNoMapping)?;
    // SAFETY: a copy of the map value.
    let rev = unsafe { *rev };
    let hop = inbound::lan_hop::<L2>(ctx, pkt, rev.lan_addr_be);
    translate_inner(
        ctx,
        pkt,
        &inner,
        Side::Src,
        rev.lan_addr_be,
        rev.lan_port_be,
    )?;
    nat::rewrite_l3(ctx, pkt.l3, Side::Dst, rev.lan_addr_be, hop.is_some())?;
    inbound::deliver::<L2>(ctx, hop)
}

/// The forward key of the flow an error from a LAN host is about.
#[inline(always)]
fn lan_flow_key(inner: &Inner) -> Option<multihome_common::FlowKey> {
    if inner.echo {
        return None;
    }
    Some(multihome_common::FlowKey {
        saddr_be: inner.daddr_be,
        daddr_be: inner.saddr_be,
        sport_be: inner.dport_be,
        dport_be: inner.sport_be,
        proto: inner.proto,
        _pad0: 0,
        _pad1: 0,
    })
}

/// An error from a LAN host about a reply it got: errors are rare, so it
/// takes the slow path with its flow's uplink mark, and [`translate_out`]
/// rewrites it on the uplink.
#[inline(always)]
pub fn lan_error(ctx: &TcContext, pkt: &Packet) -> Outcome {
    let inner = parse_inner(ctx, pkt)?;
    let key = lan_flow_key(&inner).ok_or(Reason::IcmpNoMapping)?;
    let flow = conntrack::lookup_fwd(&key).ok_or(Reason::IcmpNoMapping)?;
    // SAFETY: a copy of the map value.
    let uplink = unsafe { (*flow).uplink };
    let up = UPLINKS.get(uplink as u32).ok_or(Reason::NoUplink)?;
    ctx.set_mark(up.mark);
    crate::stats::slow_path(uplink);
    Ok(Verdict::Pass)
}

/// On the uplink: SNAT an error from a LAN host.
#[inline(always)]
pub fn translate_out(ctx: &TcContext, pkt: &Packet) -> Outcome {
    let inner = parse_inner(ctx, pkt)?;
    let key = lan_flow_key(&inner).ok_or(Reason::IcmpNoMapping)?;
    let flow = conntrack::lookup_fwd(&key).ok_or(Reason::IcmpNoMapping)?;
    // SAFETY: a copy of the map value.
    let flow = unsafe { *flow };
    translate_inner(
        ctx,
        pkt,
        &inner,
        Side::Dst,
        flow.nat_addr_be,
        flow.nat_port_be,
    )?;
    nat::rewrite_l3(ctx, pkt.l3, Side::Src, flow.nat_addr_be, false)?;
    crate::stats::tx(flow.uplink, pkt.tot_len as u32);
    Ok(Verdict::Pass)
}
