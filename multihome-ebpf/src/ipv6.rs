//! IPv6 through the uplinks: a LAN host's new connection is pinned to an
//! uplink in `CONN6` and handed to the kernel with that uplink's mark; the
//! uplink's egress program maps its source onto the uplink's prefix
//! (NPTv6, RFC 6296). Replies are mapped back on the uplink's ingress and
//! pass only for existing flows (RFC 6092 simple security). ICMPv6 errors
//! are mapped outer address and quoted address alike; both rewrites keep
//! every checksum, so none is touched.
use aya_ebpf::{bindings::BPF_NOEXIST, programs::TcContext};
use multihome_common::{
    FLOW_SEEN_REPLY, Flow6, Flow6Key, FlowKey, IPPROTO_TCP, MAX_UPLINKS, ON_DOWN_KEEP,
    ON_DOWN_PURGE_UDP, Reason, UPLINK_CONFIGURED, UPLINK_LINK_DOWN, UPLINK_OUTAGE, UPLINK_USABLE,
    Uplink, Uplink6, flow_hash, select_slot,
};

use crate::{
    conntrack::{self, now_ns},
    guard,
    maps::{CONN6, SELECT, UPLINKS},
    nptv6::{self, Way},
    outbound::{FLOW_CLOSED, ingress_ifindex, on_down, settings},
    parse::{
        self, FRAG6_LATER, FRAG6_NONE, ICMPV6_ECHO_REPLY, ICMPV6_ECHO_REQUEST, IPPROTO_ICMPV6, L4,
        Packet6, TCP_ACK, TCP_SYN, hi, ip6, load, store,
    },
    select, stats,
    verdict::{Outcome, Verdict},
};

/// The stamp is refreshed at most this often (as for IPv4).
const TOUCH_NS: u64 = 1_000_000_000;

/// Offset of a quoted packet in an ICMPv6 error (RFC 4443 §2.1).
const QUOTED: usize = 8;

/// `skb->pkt_type` of a frame addressed to this host.
const PACKET_HOST: u32 = 0;

/// `mh_lan_in` for IPv6: pins a LAN host's connection to an uplink and
/// hands it to the kernel with the uplink's mark. Packets from outside the
/// internal prefix, to it or to an uplink's prefix, and anything not
/// unicast to the internet pass untouched (the egress guard still sees
/// them).
#[inline(always)]
pub fn lan_ingress(ctx: &TcContext, l3: usize) -> Outcome {
    let pkt = parse::parse_ipv6(ctx, l3)?;
    // SAFETY: the context pointer is valid for the program's run.
    if unsafe { (*ctx.skb.skb).pkt_type } != PACKET_HOST || pkt.daddr[0] & 0xe0 != 0x20 {
        // Not 2000::/3: link-local, ULA, multicast (NDP, MLD) stay here.
        return Err(Reason::NotUnicast);
    }
    if nptv6::covering(&pkt.saddr, true).is_none() {
        return Err(if guard::routed6(&pkt.saddr) != 0 {
            Reason::RoutedSource
        } else {
            Reason::SpoofedSource
        });
    }
    if nptv6::covering(&pkt.daddr, false).is_some() {
        // To one of the uplinks' own prefixes: no hairpin for IPv6.
        return Err(Reason::NotForUplink);
    }
    if pkt.frag != FRAG6_NONE {
        return Err(Reason::Fragment6);
    }
    if pkt.l4_kind == L4::IcmpError {
        let (key, _) = quoted_key(ctx, &pkt, Way::Out)?;
        return mark(ctx, pinned(&key).ok_or(Reason::IcmpNoMapping)?);
    }
    if pkt.l4_kind == L4::EchoReply {
        return Err(Reason::UnsupportedProto);
    }
    let key = Flow6Key {
        lan: pkt.saddr,
        remote: pkt.daddr,
        lan_port_be: pkt.sport_be,
        remote_port_be: pkt.dport_be,
        proto: pkt.proto,
        _pad0: 0,
        _pad1: 0,
    };
    let id = match CONN6.get_ptr_mut(key) {
        Some(f) if keeps(&key, f, pkt.tcp_flags) => {
            // SAFETY: `f` points into the map's preallocated value; a race
            // with another CPU loses a stamp or a flag, never the flow.
            let f = unsafe { &mut *f };
            let flags = conntrack::tcp_flags_out(f.flags, pkt.tcp_flags);
            if flags != f.flags {
                f.flags = flags;
            }
            let now = now_ns();
            if now.wrapping_sub(f.last_seen_ns) > TOUCH_NS {
                f.last_seen_ns = now;
            }
            f.uplink
        }
        _ => new_flow(&key, &pkt)?,
    };
    mark(ctx, id)
}

/// The uplink flow `key` is pinned to.
#[inline(always)]
fn pinned(key: &Flow6Key) -> Option<u8> {
    // SAFETY: a read of the map value.
    CONN6.get_ptr(key).map(|f| unsafe { (*f).uplink })
}

/// Marks the packet for uplink `id`'s table; its egress program maps it.
#[inline(always)]
fn mark(ctx: &TcContext, id: u8) -> Outcome {
    let uplink = UPLINKS.get(id as u32).ok_or(Reason::NoUplink)?;
    ctx.set_mark(uplink.mark);
    Ok(Verdict::Pass)
}

/// Whether the pinned flow `f` holds for this LAN packet: it goes when a
/// SYN opens a new connection on a closed flow's tuple, or when its uplink
/// has been down long enough and its `on_down` moves it. IPv6 flows lose
/// no mapping by moving (NPTv6 keeps the host's address in its suffix),
/// so `reset` moves them too: the remote answers the new source with an
/// RST.
#[inline(always)]
fn keeps(key: &Flow6Key, f: *mut Flow6, tcp: u8) -> bool {
    // SAFETY: a read of the map value.
    let (flags, uplink, policy) = unsafe { ((*f).flags, (*f).uplink, (*f).policy) };
    let reopened = flags & FLOW_CLOSED != 0 && tcp & (TCP_SYN | TCP_ACK) == TCP_SYN;
    let moved = UPLINKS.get(uplink as u32).is_some_and(|u| {
        u.flags & UPLINK_OUTAGE != 0
            && match on_down(u.flags, policy) {
                ON_DOWN_KEEP => false,
                ON_DOWN_PURGE_UDP => key.proto != IPPROTO_TCP,
                _ => true,
            }
    });
    if reopened || moved {
        let _ = CONN6.remove(key);
        if moved {
            stats::count(Reason::Evacuated);
        }
        return false;
    }
    true
}

/// Chooses an uplink for a new connection and pins it.
#[inline(always)]
fn new_flow(key: &Flow6Key, pkt: &Packet6) -> Result<u8, Reason> {
    let seed = settings()?.flow_hash_seed;
    let id = choose(key, seed)?;
    let now = now_ns();
    let flow = Flow6 {
        last_seen_ns: now,
        flags: conntrack::tcp_flags_out(0, pkt.tcp_flags),
        uplink: id,
        policy: 0,
        _pad0: 0,
        created_s: (now / 1_000_000_000) as u32,
        _pad1: 0,
    };
    CONN6
        .insert(key, flow, BPF_NOEXIST as u64)
        .map_err(|_| Reason::MapFull)?;
    stats::new_flow(id);
    Ok(id)
}

/// The uplink for a new IPv6 connection: the `balanced` policy's table
/// slot for the flow's hash if that uplink is usable and carries IPv6,
/// else the first such uplink, else the first with its link up.
#[inline(always)]
fn choose(key: &Flow6Key, seed: u32) -> Result<u8, Reason> {
    let slot = select_slot(flow_hash(&fold(key), seed));
    if let Some(t) = SELECT.get(0)
        && t.usable != 0
        && let Some(id) = t.now.get(slot)
        && let Some(u) = UPLINKS.get(*id as u32)
        && carries(*id as u32, u, UPLINK_USABLE)
    {
        return Ok(*id);
    }
    for id in 0..MAX_UPLINKS {
        if let Some(u) = UPLINKS.get(id)
            && carries(id, u, UPLINK_USABLE)
        {
            return Ok(id as u8);
        }
    }
    for id in 0..MAX_UPLINKS {
        if let Some(u) = UPLINKS.get(id)
            && u.flags & UPLINK_LINK_DOWN == 0
            && carries(id, u, UPLINK_CONFIGURED)
        {
            return Ok(id as u8);
        }
    }
    Err(Reason::NoUplink)
}

/// Uplink `id` has all of `flags` and an IPv6 prefix.
#[inline(always)]
fn carries(id: u32, u: &Uplink, flags: u16) -> bool {
    u.flags & flags == flags && nptv6::uplink6(id).is_some()
}

/// The tuple folded into an IPv4-sized key for [`flow_hash`].
#[inline(always)]
fn fold(key: &Flow6Key) -> FlowKey {
    let words = |a: &[u8; 16]| {
        let w = |i: usize| u32::from_ne_bytes([a[i], a[i + 1], a[i + 2], a[i + 3]]);
        w(0) ^ w(4) ^ w(8) ^ w(12)
    };
    FlowKey {
        saddr_be: words(&key.lan),
        daddr_be: words(&key.remote),
        sport_be: key.lan_port_be,
        dport_be: key.remote_port_be,
        proto: key.proto,
        _pad0: 0,
        _pad1: 0,
    }
}

/// The flow an ICMPv6 error's quoted packet belongs to, and the quoted
/// packet's offset. `Way::Out`: a LAN host's error about a packet from
/// the remote (quoted source: the remote); `Way::In`: a remote's error
/// about a LAN host's packet, whose quoted source is still on the
/// uplink's prefix and is mapped back here.
#[inline(always)]
fn quoted_key(ctx: &TcContext, pkt: &Packet6, way: Way) -> Result<(Flow6Key, usize), Reason> {
    let q = pkt.l4 + QUOTED;
    let proto = hi(load::<u16>(ctx, q + ip6::NEXT_HOP)?);
    let src: [u8; 16] = load(ctx, q + ip6::SADDR)?;
    let dst: [u8; 16] = load(ctx, q + ip6::DADDR)?;
    let l4 = q + ip6::LEN;
    let (a, b): (u16, u16) = if proto == IPPROTO_ICMPV6 {
        let kind = hi(load::<u16>(ctx, l4)?);
        let id: u16 = load(ctx, l4 + 4)?;
        match kind {
            ICMPV6_ECHO_REQUEST if way == Way::In => (id, 0),
            ICMPV6_ECHO_REPLY if way == Way::Out => (0, id),
            _ => return Err(Reason::IcmpNoMapping),
        }
    } else {
        (load(ctx, l4)?, load(ctx, l4 + 2)?)
    };
    let key = match way {
        Way::In => {
            let (_, _, u6) = nptv6::covering(&src, false).ok_or(Reason::IcmpNoMapping)?;
            Flow6Key {
                lan: nptv6::map(&src, u6, Way::In)?,
                remote: dst,
                lan_port_be: a,
                remote_port_be: b,
                proto,
                _pad0: 0,
                _pad1: 0,
            }
        }
        Way::Out => Flow6Key {
            lan: dst,
            remote: src,
            lan_port_be: b,
            remote_port_be: a,
            proto,
            _pad0: 0,
            _pad1: 0,
        },
    };
    Ok((key, q))
}

/// `mh_wan_in` for IPv6: a packet to one of the uplinks' prefixes is
/// mapped back to the internal prefix if it belongs to a flow pinned to
/// that uplink, and dropped otherwise. Everything else (the gateway's own
/// traffic, NDP, RAs, DHCPv6) passes untouched.
#[inline(always)]
pub fn wan_ingress(ctx: &TcContext, l3: usize) -> Outcome {
    let pkt = parse::parse_ipv6(ctx, l3)?;
    let (id, _, u6) = nptv6::covering(&pkt.daddr, false).ok_or(Reason::NoMapping)?;
    let lan = nptv6::map(&pkt.daddr, u6, Way::In)?;
    if pkt.frag == FRAG6_LATER {
        // Its first fragment carried the ports and was checked.
        store(ctx, l3 + ip6::DADDR, &lan)?;
        stats::count(Reason::FragmentTranslated);
        return Ok(Verdict::Pass);
    }
    if pkt.l4_kind == L4::IcmpError {
        let (key, q) = quoted_key(ctx, &pkt, Way::In)?;
        if pinned(&key) != Some(id) {
            return Err(Reason::Unsolicited);
        }
        nptv6::rewrite(ctx, q + ip6::SADDR, u6, Way::In)?;
        store(ctx, l3 + ip6::DADDR, &lan)?;
        stats::rx(id, ctx.len());
        return Ok(Verdict::Pass);
    }
    let key = Flow6Key {
        lan,
        remote: pkt.saddr,
        lan_port_be: pkt.dport_be,
        remote_port_be: pkt.sport_be,
        proto: pkt.proto,
        _pad0: 0,
        _pad1: 0,
    };
    let f = CONN6.get_ptr_mut(key).ok_or(Reason::Unsolicited)?;
    // SAFETY: as in `lan_ingress`.
    let f = unsafe { &mut *f };
    if f.uplink != id {
        return Err(Reason::Unsolicited);
    }
    let flags = conntrack::tcp_flags_in(f.flags, pkt.tcp_flags) | FLOW_SEEN_REPLY;
    if flags != f.flags {
        f.flags = flags;
    }
    let now = now_ns();
    if now.wrapping_sub(f.last_seen_ns) > TOUCH_NS {
        f.last_seen_ns = now;
    }
    store(ctx, l3 + ip6::DADDR, &lan)?;
    stats::rx(id, ctx.len());
    Ok(Verdict::Pass)
}

/// `mh_wan_out6`: an IPv6 packet leaving an uplink, forwarded or the
/// gateway's own.
#[inline(always)]
pub fn uplink_egress<const L2: bool>(ctx: &TcContext) -> Outcome {
    let l3 = parse::ipv6_offset::<L2>(ctx).ok_or(Reason::NotIpv4)?;
    if ingress_ifindex(ctx) == 0 {
        return host_egress(ctx, l3);
    }
    // SAFETY: the context pointer is valid for the program's run.
    let mark = unsafe { (*ctx.skb.skb).mark };
    wan_egress(ctx, l3, mark, settings()?.mark_base)
}

/// A forwarded IPv6 packet leaving an uplink: one that the LAN program
/// marked for this uplink gets its source (and, in an ICMPv6 error, the
/// quoted destination) mapped onto the uplink's prefix. Everything else
/// meets the egress guard.
#[inline(always)]
fn wan_egress(ctx: &TcContext, l3: usize, mark: u32, mark_base: u32) -> Outcome {
    // SAFETY: the context pointer is valid for the program's run.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    if let Some((id, uplink)) = select::from_mark(mark, mark_base)
        && uplink.ifindex == ifindex
        && let Some(u6) = nptv6::uplink6(id as u32)
        && nptv6::rewrite(ctx, l3 + ip6::SADDR, u6, Way::Out)?
    {
        map_quoted(ctx, l3, u6)?;
        stats::tx(id, ctx.len());
        return Ok(Verdict::Pass);
    }
    guard::egress6(ctx, l3)
}

/// The gateway's own IPv6 packet: an ICMPv6 error it sends about a
/// translated packet quotes the LAN host's internal address, which is
/// mapped onto this uplink's prefix.
#[inline(always)]
fn host_egress(ctx: &TcContext, l3: usize) -> Outcome {
    // SAFETY: the context pointer is valid for the program's run.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    for id in 0..MAX_UPLINKS {
        if let Some(u) = UPLINKS.get(id)
            && u.ifindex == ifindex
            && let Some(u6) = nptv6::uplink6(id)
        {
            map_quoted(ctx, l3, u6)?;
            break;
        }
    }
    Ok(Verdict::Pass)
}

/// In an ICMPv6 error at `l3` without extension headers, maps the quoted
/// destination onto `u6`'s prefix if it is internal.
#[inline(always)]
fn map_quoted(ctx: &TcContext, l3: usize, u6: &Uplink6) -> Result<(), Reason> {
    if hi(load::<u16>(ctx, l3 + ip6::NEXT_HOP)?) != IPPROTO_ICMPV6 {
        return Ok(());
    }
    let kind = hi(load::<u16>(ctx, l3 + ip6::LEN)?);
    if (parse::ICMPV6_DEST_UNREACH..=parse::ICMPV6_PARAM_PROB).contains(&kind) {
        nptv6::rewrite(ctx, l3 + ip6::LEN + QUOTED + ip6::DADDR, u6, Way::Out)?;
    }
    Ok(())
}
