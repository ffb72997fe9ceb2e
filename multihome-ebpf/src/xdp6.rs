//! The XDP fast path for IPv6 under NPTv6: packets of pinned TCP and UDP
//! flows, both ways, mapped (RFC 6296, checksum-neutral: only the
//! address changes) and redirected through `XDP_DEVS` to a cached next
//! hop. What `mh_lan_in6` and `mh_wan_in6` would do to the same packet,
//! byte for byte; everything else passes to them unchanged
//! (DATAPATH.md, "The XDP path").
use aya_ebpf::programs::XdpContext;
use multihome_common::{
    FLOW_SEEN_REPLY, Flow6, Flow6Key, IPPROTO_TCP, IPPROTO_UDP, MODE6_NPT, UPLINK_L3, UPLINK_OUTAGE,
};

use crate::{
    conntrack,
    csum::fold,
    maps::{CONN6, LAN_HOPS6, NEXT_HOPS6, UPLINKS},
    nptv6::{self, Way},
    parse::{self, ETH_HLEN, ETH_P_IPV6_BE, TCP_FIN, TCP_RST, TCP_SYN, hi, ip6, write},
    stats,
    xdp::{self, Decline, FLOW_NOT_FAST, Fast},
};

/// Where the L4 header starts: right after the fixed header.
const L4_OFF: usize = ETH_HLEN + ip6::LEN;

/// What the fast path needs of an IPv6 packet.
struct Packet6 {
    proto: u8,
    saddr: [u8; 16],
    daddr: [u8; 16],
    sport_be: u16,
    dport_be: u16,
    /// The frame's length, Ethernet header included (TC counts `skb->len`).
    len: u32,
}

/// Whether the frame is IPv6 (the XDP path's IPv4 candidates are not).
#[inline(always)]
pub fn is_ipv6(ctx: &XdpContext) -> bool {
    parse::read::<u16>(ctx, 12).is_ok_and(|t| t == ETH_P_IPV6_BE)
}

/// The IPv6 TCP or UDP packet of a frame that the XDP path may take: to
/// a unicast MAC, no extension header (so no fragment, and every offset a
/// constant), no SYN, FIN or RST (as for IPv4), a hop limit to decrement,
/// and a full L4 checksum (see `xdp::partial_checksum`).
#[inline(always)]
fn candidate(ctx: &XdpContext) -> Result<Packet6, Decline> {
    const L3: usize = ETH_HLEN;
    let get = |off: usize| parse::read::<u16>(ctx, off).map_err(|_| Decline);
    let get_addr = |off: usize| parse::read::<[u8; 16]>(ctx, off).map_err(|_| Decline);
    // An I/G bit set: multicast or broadcast, which TC leaves alone.
    if hi(get(0)?) & 1 != 0 || hi(get(L3)?) >> 4 != 6 {
        return Err(Decline);
    }
    let payload_len = u16::from_be(get(L3 + 4)?);
    let next_hop = get(L3 + ip6::NEXT_HOP)?;
    let (proto, hop_limit) = (hi(next_hop), parse::lo(next_hop));
    let (min_len, tcp_flags) = match proto {
        IPPROTO_TCP => (20, parse::lo(get(L4_OFF + 12)?)),
        IPPROTO_UDP => (8, 0),
        _ => return Err(Decline),
    };
    if payload_len < min_len
        || ctx.data() + L4_OFF + usize::from(payload_len) > ctx.data_end()
        || tcp_flags & (TCP_SYN | TCP_FIN | TCP_RST) != 0
        || hop_limit <= 1
    {
        return Err(Decline);
    }
    let pkt = Packet6 {
        proto,
        saddr: get_addr(L3 + ip6::SADDR)?,
        daddr: get_addr(L3 + ip6::DADDR)?,
        sport_be: get(L4_OFF)?,
        dport_be: get(L4_OFF + 2)?,
        len: (L4_OFF + usize::from(payload_len)) as u32,
    };
    let csum_off = L4_OFF + if proto == IPPROTO_TCP { 16 } else { 6 };
    if get(csum_off)? == pseudo_header_sum(&pkt, payload_len) {
        return Err(Decline);
    }
    Ok(pkt)
}

/// The folded sum of the IPv6 pseudo-header (RFC 8200 §8.1): what a
/// `CHECKSUM_PARTIAL` packet's checksum field holds.
#[inline(always)]
fn pseudo_header_sum(pkt: &Packet6, l4_len: u16) -> u16 {
    let mut sum = u32::from(l4_len.to_be()) + u32::from(u16::from_ne_bytes([0, pkt.proto]));
    for a in [&pkt.saddr, &pkt.daddr] {
        for i in 0..8 {
            sum += u32::from(u16::from_ne_bytes([a[2 * i], a[2 * i + 1]]));
        }
    }
    fold(sum)
}

/// LAN to uplink: a pinned flow's packet, its source mapped onto the
/// uplink's prefix and sent to the uplink's cached IPv6 next hop, as
/// `ipv6::forward` does.
#[inline(always)]
pub fn lan_fast(ctx: &XdpContext) -> Fast {
    let pkt = candidate(ctx)?;
    // As `ipv6::lan_ingress` checks every packet: to 2000::/3 only.
    if pkt.daddr[0] & 0xe0 != 0x20 {
        return Err(Decline);
    }
    let key = Flow6Key::between(
        (pkt.saddr, pkt.sport_be),
        (pkt.daddr, pkt.dport_be),
        pkt.proto,
    );
    let f = CONN6.get_ptr_mut(key).ok_or(Decline)?;
    // SAFETY: a read of the map value.
    let (flags, id) = unsafe { ((*f).flags, (*f).uplink) };
    if flags & FLOW_NOT_FAST != 0 {
        return Err(Decline);
    }
    let uplink = UPLINKS.get(u32::from(id)).ok_or(Decline)?;
    // Flow fate (a down uplink) is decided in TC.
    if uplink.flags & (UPLINK_OUTAGE | UPLINK_L3) != 0 {
        return Err(Decline);
    }
    // From an internal prefix as it is now (one renumbered since the
    // flow was made is TC's: its packets are spoofed there).
    let u6 = nptv6::npt(u32::from(id), &pkt.saddr, Way::Out).ok_or(Decline)?;
    let hop = NEXT_HOPS6.get(u32::from(id)).ok_or(Decline)?;
    if hop.valid == 0 || hop.ifindex != uplink.ifindex || pkt.len - ETH_HLEN as u32 > hop.mtu {
        return Err(Decline);
    }
    let mapped = nptv6::map(&pkt.saddr, u6, Way::Out).map_err(|_| Decline)?;
    let mac = hop.mac;
    let redirect = xdp::aim(hop.ifindex)?;
    touch(f);
    forward(ctx, ETH_HLEN + ip6::SADDR, &mapped, &mac)?;
    stats::tx(id, pkt.len);
    xdp::count(id, |s| s.tx_packets += 1);
    Ok(redirect)
}

/// Uplink to LAN: an answered flow's reply, mapped back to the internal
/// prefix and sent to the LAN host's cached next hop (`LAN_HOPS6`), as
/// `ipv6::wan_ingress` does. Without a cached hop it takes TC.
#[inline(always)]
pub fn wan_fast(ctx: &XdpContext) -> Fast {
    let pkt = candidate(ctx)?;
    let (id, uplink, u6) = nptv6::covering(&pkt.daddr, false).ok_or(Decline)?;
    if u6.mode != MODE6_NPT || uplink.flags & UPLINK_OUTAGE != 0 {
        return Err(Decline);
    }
    let lan = nptv6::map(&pkt.daddr, u6, Way::In).map_err(|_| Decline)?;
    let key = Flow6Key::between((lan, pkt.dport_be), (pkt.saddr, pkt.sport_be), pkt.proto);
    let f = CONN6.get_ptr_mut(key).ok_or(Decline)?;
    // SAFETY: a read of the map value.
    let (flags, pinned) = unsafe { ((*f).flags, (*f).uplink) };
    // The first reply (and what `allow_inbound6` admits) is TC's.
    if pinned != id || flags & FLOW_NOT_FAST != 0 || flags & FLOW_SEEN_REPLY == 0 {
        return Err(Decline);
    }
    let h = LAN_HOPS6.get_ptr(lan).ok_or(Decline)?;
    // SAFETY: a read of the map value.
    let h = unsafe { &*h };
    if h.valid == 0 || pkt.len - ETH_HLEN as u32 > h.mtu {
        return Err(Decline);
    }
    let mac = h.mac;
    let redirect = xdp::aim(h.ifindex)?;
    touch(f);
    forward(ctx, ETH_HLEN + ip6::DADDR, &lan, &mac)?;
    stats::rx(id, pkt.len);
    xdp::count(id, |s| s.rx_packets += 1);
    Ok(redirect)
}

/// A packet of flow `f`: its stamp refreshed (the flags TC would set on
/// such a packet are set already on a flow the path takes).
#[inline(always)]
fn touch(f: *mut Flow6) {
    // SAFETY: `f` points into the map's preallocated value; a race with
    // another CPU loses a stamp, never the flow.
    conntrack::stamp(unsafe { &mut (*f).last_seen_ns });
}

/// Writes the mapped address at `addr_off`, decrements the hop limit
/// (IPv6 has no header checksum; NPTv6 keeps the L4 one) and sets the
/// Ethernet addresses.
#[inline(always)]
fn forward(
    ctx: &XdpContext,
    addr_off: usize,
    addr: &[u8; 16],
    mac: &[u8; 12],
) -> Result<(), Decline> {
    let at = ETH_HLEN + ip6::NEXT_HOP;
    let next_hop: u16 = parse::read(ctx, at).map_err(|_| Decline)?;
    let [next, hop_limit] = next_hop.to_ne_bytes();
    write(ctx, at, u16::from_ne_bytes([next, hop_limit - 1])).map_err(|_| Decline)?;
    write(ctx, addr_off, *addr).map_err(|_| Decline)?;
    write(ctx, 0, *mac).map_err(|_| Decline)
}
