//! The XDP fast path: packets of pinned TCP and UDP flows, both ways,
//! translated and redirected through `XDP_DEVS` before the kernel builds
//! an skb. It only takes what changes no state but the stamp, the
//! counters and `snd_max`; everything else passes to the TC programs
//! unchanged (DATAPATH.md, "The XDP path").
use aya_ebpf::{
    bindings::{BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup as FibParams, xdp_action::XDP_PASS},
    helpers::bpf_fib_lookup,
    programs::XdpContext,
};
use core::mem::MaybeUninit;

use multihome_common::{
    FLOW_FIN_IN, FLOW_FIN_OUT, FLOW_HAIRPIN, FLOW_RST, FLOW_RST_IN, FLOW_SEEN_REPLY, FlowFwd,
    IPPROTO_TCP, IPPROTO_UDP, UPLINK_L3, UPLINK_OUTAGE,
};

use crate::{
    conntrack,
    csum::{Delta, fold},
    fwd,
    maps::{LAN_HOPS, NEXT_HOPS, UPLINKS, XDP_DEVS, XDP_STATS},
    nat::{self, Side},
    parse::{
        self, ETH_HLEN, ETH_P_IP_BE, L4, Packet, TCP_FIN, TCP_RST, TCP_SYN, hi, ip, lo, write,
    },
    stats, xdp6,
};

/// Not for the XDP path: pass the packet on to TC as it came.
pub struct Decline;

pub type Fast = Result<u32, Decline>;

/// "Don't fragment", as it sits in the flags/offset word.
const IP_DF_BE: u16 = 0x4000u16.to_be();

/// Flags of a flow that the XDP path leaves to TC: a hairpin (delivered
/// back to the LAN), closing or closed, or holding a remote's RST that a
/// later packet disarms.
pub const FLOW_NOT_FAST: u32 = FLOW_HAIRPIN | FLOW_RST | FLOW_RST_IN | FLOW_FIN_OUT | FLOW_FIN_IN;

#[inline(always)]
fn action(fast: Fast) -> u32 {
    fast.unwrap_or(XDP_PASS)
}

/// `mh_xdp_lan`: a frame from the LAN.
#[inline(always)]
pub fn lan_ingress(ctx: &XdpContext) -> u32 {
    action(if xdp6::is_ipv6(ctx) {
        xdp6::lan_fast(ctx)
    } else {
        lan_fast(ctx)
    })
}

/// `mh_xdp_wan`: a frame from an uplink.
#[inline(always)]
pub fn wan_ingress(ctx: &XdpContext) -> u32 {
    action(if xdp6::is_ipv6(ctx) {
        xdp6::wan_fast(ctx)
    } else {
        wan_fast(ctx)
    })
}

/// The IPv4 TCP or UDP packet of a frame that the XDP path may take: no
/// IP options (every offset a constant, which the verifier follows
/// through spills), not a fragment, no SYN, FIN or RST (MSS clamping,
/// flow state, the RST check), a TTL to decrement, and a full L4
/// checksum.
#[inline(always)]
fn candidate(ctx: &XdpContext) -> Result<Packet, Decline> {
    const L3: usize = ETH_HLEN;
    const L4_OFF: usize = L3 + ip::MIN_LEN;
    let get = |off: usize| parse::read::<u16>(ctx, off).map_err(|_| Decline);
    let get32 = |off: usize| parse::read::<u32>(ctx, off).map_err(|_| Decline);
    if get(12)? != ETH_P_IP_BE || hi(get(L3)?) != 0x45 {
        return Err(Decline);
    }
    let tot_len = u16::from_be(get(L3 + ip::TOT_LEN)?);
    let frag_be = get(L3 + ip::FRAG_OFF)?;
    let ttl_proto = get(L3 + ip::TTL)?;
    let (ttl, proto) = (hi(ttl_proto), lo(ttl_proto));
    let (l4_kind, min_len, tcp_flags) = match proto {
        IPPROTO_TCP => (L4::Tcp, 20, lo(get(L4_OFF + 12)?)),
        IPPROTO_UDP => (L4::Udp, 8, 0),
        _ => return Err(Decline),
    };
    if usize::from(tot_len) < ip::MIN_LEN + min_len
        || ctx.data() + L3 + usize::from(tot_len) > ctx.data_end()
        || frag_be & !IP_DF_BE != 0
        || tcp_flags & (TCP_SYN | TCP_FIN | TCP_RST) != 0
        || ttl <= 1
    {
        return Err(Decline);
    }
    let pkt = Packet {
        l3: L3,
        l4: L4_OFF,
        proto,
        l4_kind,
        tcp_flags,
        ttl,
        saddr_be: get32(L3 + ip::SADDR)?,
        daddr_be: get32(L3 + ip::DADDR)?,
        sport_be: get(L4_OFF)?,
        dport_be: get(L4_OFF + 2)?,
        tot_len,
        frag_be,
    };
    if partial_checksum(ctx, &pkt)? {
        return Err(Decline);
    }
    Ok(pkt)
}

/// Whether the L4 checksum field holds only the pseudo-header's sum, as
/// a `CHECKSUM_PARTIAL` packet from a veth peer with checksum offload
/// does (`tcp_v4_send_check`, `udp4_hwcsum`). XDP cannot see
/// `skb->ip_summed`, and a redirected frame becomes an skb with
/// `CHECKSUM_NONE`: such a packet must take TC, which keeps the offload.
/// A full checksum equal by chance (one in 65,536) takes TC too.
#[inline(always)]
fn partial_checksum(ctx: &XdpContext, pkt: &Packet) -> Result<bool, Decline> {
    let (off, _) = pkt.l4_csum();
    let field: u16 = parse::read(ctx, off).map_err(|_| Decline)?;
    let l4_len = pkt.tot_len.wrapping_sub((pkt.l4 - pkt.l3) as u16);
    let sum = (pkt.saddr_be >> 16)
        + (pkt.saddr_be & 0xffff)
        + (pkt.daddr_be >> 16)
        + (pkt.daddr_be & 0xffff)
        + u32::from(u16::from_ne_bytes([0, pkt.proto]))
        + u32::from(l4_len.to_be());
    Ok(field == fold(sum))
}

/// LAN to uplink: a pinned flow's packet, SNATed and sent to its uplink's
/// cached next hop, as `outbound::to_uplink` does.
#[inline(always)]
fn lan_fast(ctx: &XdpContext) -> Fast {
    let pkt = candidate(ctx)?;
    let key = conntrack::lan_key(&pkt);
    let f = conntrack::lookup_fwd(&key).ok_or(Decline)?;
    // SAFETY: a copy of the map value.
    let flow: FlowFwd = unsafe { *f };
    if flow.flags & FLOW_NOT_FAST != 0 {
        return Err(Decline);
    }
    let uplink = UPLINKS.get(u32::from(flow.uplink)).ok_or(Decline)?;
    // Flow fate (a down uplink, a changed address) is decided in TC.
    if uplink.flags & (UPLINK_OUTAGE | UPLINK_L3) != 0 || uplink.addr_be != flow.nat_addr_be {
        return Err(Decline);
    }
    let hop = NEXT_HOPS.get(u32::from(flow.uplink)).ok_or(Decline)?;
    if hop.valid == 0 || hop.ifindex != uplink.ifindex || u32::from(pkt.tot_len) > hop.mtu {
        return Err(Decline);
    }
    let mac = hop.mac;
    let redirect = aim(hop.ifindex)?;
    conntrack::touch_out(ctx, &key, f, &pkt);
    rewrite(ctx, &pkt, Side::Src, flow.nat_addr_be, flow.nat_port_be)?;
    write(ctx, 0, mac).map_err(|_| Decline)?;
    stats::tx(flow.uplink, u32::from(pkt.tot_len));
    count(flow.uplink, |s| s.tx_packets += 1);
    Ok(redirect)
}

/// Uplink to LAN: an answered flow's reply, translated back and sent to
/// the LAN host's cached next hop or the one `bpf_fib_lookup` resolves,
/// as `inbound::to_lan` does.
#[inline(always)]
fn wan_fast(ctx: &XdpContext) -> Fast {
    let pkt = candidate(ctx)?;
    let rev_key = conntrack::wan_key(&pkt);
    let rev = conntrack::lookup_rev(&rev_key).ok_or(Decline)?;
    // SAFETY: a copy of the map value.
    let rev = unsafe { *rev };
    let f = conntrack::lookup_fwd(&rev_key.forward(&rev)).ok_or(Decline)?;
    // SAFETY: a copy of the map value.
    let flow: FlowFwd = unsafe { *f };
    // The first reply (passive health, hairpin notes) and stale reverse
    // entries are TC's.
    if flow.flags & FLOW_NOT_FAST != 0
        || flow.flags & FLOW_SEEN_REPLY == 0
        || flow.nat_addr_be != rev_key.daddr_be
        || flow.nat_port_be != rev_key.dport_be
    {
        return Err(Decline);
    }
    let uplink = UPLINKS.get(u32::from(rev.uplink)).ok_or(Decline)?;
    if uplink.flags & UPLINK_OUTAGE != 0 {
        return Err(Decline);
    }
    let (redirect, mac) = lan_hop(ctx, &pkt, rev.lan_addr_be)?;
    conntrack::touch_in(f, &pkt);
    rewrite(ctx, &pkt, Side::Dst, rev.lan_addr_be, rev.lan_port_be)?;
    write(ctx, 0, mac).map_err(|_| Decline)?;
    stats::rx(rev.uplink, u32::from(pkt.tot_len));
    count(rev.uplink, |s| s.rx_packets += 1);
    Ok(redirect)
}

/// The redirect to the LAN host's device ([`aim`]) and its Ethernet
/// header, from its cached next hop (`LAN_HOPS`) when that serves, else
/// when the kernel knows the route and the neighbour; the packet fits,
/// and the device is in `XDP_DEVS`.
#[inline(always)]
fn lan_hop(ctx: &XdpContext, pkt: &Packet, lan_addr_be: u32) -> Result<(u32, [u8; 12]), Decline> {
    if let Some(h) = LAN_HOPS.get_ptr(lan_addr_be) {
        // SAFETY: a read of the map value.
        let h = unsafe { &*h };
        if h.valid != 0
            && u32::from(pkt.tot_len) <= h.mtu
            && let Ok(redirect) = aim(h.ifindex)
        {
            return Ok((redirect, h.mac));
        }
    }
    let mut params = MaybeUninit::<FibParams>::uninit();
    let p = fwd::zeroed(&mut params);
    p.family = fwd::AF_INET;
    p.l4_protocol = pkt.proto;
    p.__bindgen_anon_1.tot_len = pkt.tot_len;
    p.__bindgen_anon_3.ipv4_src = pkt.saddr_be;
    p.__bindgen_anon_4.ipv4_dst = lan_addr_be;
    p.ifindex = ctx.ingress_ifindex() as u32;
    // SAFETY: `p` lives on the stack for the call and its size is passed.
    let ret = unsafe {
        bpf_fib_lookup(
            ctx.ctx as *mut _,
            p as *mut FibParams,
            size_of::<FibParams>() as i32,
            0,
        )
    };
    if ret != i64::from(BPF_FIB_LKUP_RET_SUCCESS) {
        return Err(Decline);
    }
    let redirect = aim(p.ifindex)?;
    let mut mac = [0u8; 12];
    mac[..6].copy_from_slice(&p.dmac);
    mac[6..].copy_from_slice(&p.smac);
    Ok((redirect, mac))
}

/// Rewrites one side's address and port, decrements the TTL, and fixes
/// both checksums incrementally (RFC 1624); a zero UDP checksum stays
/// zero, and one that computes to zero is sent as 0xffff (RFC 768), as
/// `bpf_l4_csum_replace` does with `BPF_F_MARK_MANGLED_0`.
#[inline(always)]
fn rewrite(
    ctx: &XdpContext,
    pkt: &Packet,
    side: Side,
    addr_be: u32,
    port_be: u16,
) -> Result<(), Decline> {
    let (port_off, old_port) = match side {
        Side::Src => (pkt.l4, pkt.sport_be),
        Side::Dst => (pkt.l4 + 2, pkt.dport_be),
    };
    let (csum_off, udp) = pkt.l4_csum();
    let old_csum: u16 = parse::read(ctx, csum_off).map_err(|_| Decline)?;
    let old_addr = nat::rewrite_l3(ctx, pkt.l3, side, addr_be, true).map_err(|_| Decline)?;
    if !(udp && old_csum == 0) {
        let delta = Delta::default()
            .u32(old_addr, addr_be)
            .u16(old_port, port_be);
        let mut csum = delta.apply(old_csum);
        if udp && csum == 0 {
            csum = 0xffff;
        }
        write(ctx, csum_off, csum).map_err(|_| Decline)?;
    }
    write(ctx, port_off, port_be).map_err(|_| Decline)
}

#[inline(always)]
pub fn count(uplink: u8, f: impl FnOnce(&mut multihome_common::XdpStats)) {
    if let Some(s) = XDP_STATS.get_ptr_mut(u32::from(uplink)) {
        // SAFETY: per-CPU slot, no other writer.
        f(unsafe { &mut *s });
    }
}

/// Sets the frame's redirect to device `ifindex` before anything is
/// written: `XDP_REDIRECT`, or a decline, the frame untouched, when the
/// device is not in `XDP_DEVS`. One devmap lookup serves as the check
/// and the target (`bpf_redirect_map`); the target holds only if the
/// program returns `XDP_REDIRECT`, and a later decline returns
/// `XDP_PASS`.
#[inline(always)]
pub fn aim(ifindex: u32) -> Fast {
    XDP_DEVS
        .redirect(ifindex, u64::from(XDP_PASS))
        .map_err(|_| Decline)
}
