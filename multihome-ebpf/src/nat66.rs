//! NAT66 (`mode6 = "nat66"`): for an uplink that has one address rather
//! than a routed prefix, a LAN host's IPv6 source address and port (or
//! echo identifier) are translated to that address and a port of its own,
//! as IPv4's SNAT does. The port is reserved in `NAT6`, which maps
//! replies back; `CONN6` keeps the flow, with its port. Unlike NPTv6 this
//! changes the L4 checksum (RFC 1624 updates; the address through the
//! pseudo-header).
//!
//! Only the kernel's path: the LAN program pins and marks, the uplink's
//! egress program reserves the flow's port at its first packet and
//! translates (an ICMPv6 error about the flow too, a LAN host's or the
//! gateway's own); replies
//! are translated on the uplink's ingress and routed by the kernel. A packet to the address that maps to
//! no flow is the gateway's own.
use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::bpf_get_prandom_u32,
    programs::TcContext,
};
use multihome_common::{
    FLOW_SEEN_REPLY, Flow6, Flow6Key, IPPROTO_TCP, IPPROTO_UDP, Nat6Key, Nat6Lan, Reason, Settings,
    Uplink6,
};

use crate::{
    conntrack,
    csum::{self, Delta},
    maps::{CONN6, NAT6, SCRATCH6},
    outbound::settings,
    parse::{self, FRAG6_LATER, IPPROTO_ICMPV6, L4, Packet6, ip6, load, store},
    stats,
    verdict::{Outcome, Verdict},
};

/// Random ports tried after the LAN's own.
const PORT_TRIES: u32 = 8;

/// Offset of a quoted packet in an ICMPv6 error (RFC 4443 §2.1).
const QUOTED: usize = 8;

/// Reserves the NAT port of new flow `key` on uplink `id`: the LAN port
/// when it is free and outside the gateway's own ephemeral range, else a
/// random one of `snat_ports`. A `NAT6` entry whose flow is gone is free.
/// Returns the port as on the wire, widened: a subprogram's `Result` of
/// a `u16` comes back in two registers, which BPF has not.
#[inline(never)]
fn reserve(key: &Flow6Key, id: u8, settings: &Settings) -> Result<u32, Reason> {
    let lan_port = u16::from_be(key.lan_port_be);
    let lan = Nat6Lan {
        lan: key.lan,
        lan_port_be: key.lan_port_be,
        _pad: 0,
    };
    if lan_port != 0
        && (lan_port < settings.local_port_min || lan_port > settings.local_port_max)
        && take(&key.nat6(id, key.lan_port_be), &lan)?
    {
        return Ok(u32::from(key.lan_port_be));
    }
    let min = u32::from(settings.snat_port_min);
    let span = u32::from(settings.snat_port_max).saturating_sub(min) + 1;
    // SAFETY: no preconditions.
    let start = unsafe { bpf_get_prandom_u32() };
    for i in 0..PORT_TRIES {
        let port_be = ((min + start.wrapping_add(i) % span) as u16).to_be();
        if take(&key.nat6(id, port_be), &lan)? {
            return Ok(u32::from(port_be));
        }
    }
    Err(Reason::PortExhausted)
}

/// Ok(true): `nat` is now `lan`'s.
#[inline(always)]
fn take(nat: &Nat6Key, lan: &Nat6Lan) -> Result<bool, Reason> {
    match NAT6.insert(nat, lan, BPF_NOEXIST as u64) {
        Ok(()) => return Ok(true),
        Err(_) if NAT6.get_ptr(nat).is_none() => return Err(Reason::MapFull),
        Err(_) => {}
    }
    // SAFETY: a copy of the map value.
    let Some(owner) = NAT6.get_ptr(nat).map(|p| unsafe { *p }) else {
        return Ok(false);
    };
    if flow(nat, &owner).is_some() {
        return Ok(false);
    }
    NAT6.insert(nat, lan, BPF_ANY as u64)
        .map(|()| true)
        .map_err(|_| Reason::MapFull)
}

/// The live flow behind `NAT6`'s `nat` -> `lan`: in `CONN6` on that
/// uplink with that port. (Its key is built in `SCRATCH6`, off the
/// stack.)
#[inline(always)]
fn flow(nat: &Nat6Key, lan: &Nat6Lan) -> Option<*mut Flow6> {
    let key = SCRATCH6.get_ptr_mut(0)?;
    // SAFETY: this CPU's slot, which only this run uses until it ends.
    let key = unsafe { &mut *key };
    key.lan = lan.lan;
    key.remote = nat.remote;
    key.lan_port_be = lan.lan_port_be;
    key.remote_port_be = nat.remote_port_be;
    key.proto = nat.proto;
    key._pad0 = 0;
    key._pad1 = 0;
    let f = CONN6.get_ptr_mut(*key)?;
    // SAFETY: a read of the map value.
    unsafe { (*f).uplink == nat.uplink && (*f).nat_port_be == nat.nat_port_be }.then_some(f)
}

/// Where the port (or echo identifier) a rewrite changes sits, and the
/// L4 checksum's offset: (port, checksum, UDP).
#[inline(always)]
fn l4_fields(pkt: &Packet6, outbound: bool) -> Option<(usize, usize, bool)> {
    match (pkt.l4_kind, outbound) {
        (L4::Tcp, true) => Some((pkt.l4, pkt.l4 + 16, false)),
        (L4::Tcp, false) => Some((pkt.l4 + 2, pkt.l4 + 16, false)),
        (L4::Udp, true) => Some((pkt.l4, pkt.l4 + 6, true)),
        (L4::Udp, false) => Some((pkt.l4 + 2, pkt.l4 + 6, true)),
        (L4::EchoRequest, true) | (L4::EchoReply, false) => Some((pkt.l4 + 4, pkt.l4 + 2, false)),
        _ => None,
    }
}

/// Rewrites the address at `addr_off` and the port at `port_off` to `to`
/// and `port_be`, and the L4 checksum at `csum_off` with them (the address
/// through the pseudo-header). A subprogram: its buffers stay out of its
/// callers' frames.
#[inline(never)]
fn rewrite(
    ctx: &TcContext,
    (addr_off, port_off, csum_off, udp): (usize, usize, usize, bool),
    to: &[u8; 16],
    port_be: u16,
) -> Result<(), Reason> {
    for i in 0..4 {
        let old: u32 = load(ctx, addr_off + 4 * i)?;
        let new = u32::from_ne_bytes([to[4 * i], to[4 * i + 1], to[4 * i + 2], to[4 * i + 3]]);
        csum::l4_addr(ctx, csum_off, udp, old, new)?;
    }
    store(ctx, addr_off, to)?;
    let old_port: u16 = load(ctx, port_off)?;
    csum::l4_field(ctx, csum_off, udp, old_port, port_be)?;
    store(ctx, port_off, &port_be)
}

/// A forwarded packet of a flow pinned to NAT66 uplink `id`, leaving it:
/// its source becomes the uplink's address and the flow's port. Err: not
/// one to translate (the egress guard decides).
#[inline(never)]
pub fn egress(ctx: &TcContext, l3: usize, id: u8, u6: &Uplink6) -> Outcome {
    let pkt = parse::parse_ipv6(ctx, l3)?;
    let (port_off, csum_off, udp) = l4_fields(&pkt, true).ok_or(Reason::NoMapping)?;
    let key = crate::ipv6::lan_key(&pkt);
    let port_be = port_of(&key, id)? as u16;
    rewrite(
        ctx,
        (l3 + ip6::SADDR, port_off, csum_off, udp),
        &u6.outer,
        port_be,
    )?;
    stats::tx(id, ctx.len());
    Ok(Verdict::Pass)
}

/// Flow `key`'s port on NAT66 uplink `id`, reserved at its first packet
/// (widened, as [`reserve`]'s).
#[inline(never)]
fn port_of(key: &Flow6Key, id: u8) -> Result<u32, Reason> {
    let f = CONN6.get_ptr_mut(key).ok_or(Reason::NoMapping)?;
    // SAFETY: reads and a write of the map value; the flow's first
    // packet, which reserves, runs on one CPU before its next.
    let (uplink, port_be) = unsafe { ((*f).uplink, (*f).nat_port_be) };
    if uplink != id {
        return Err(Reason::NoMapping);
    }
    if port_be != 0 {
        return Ok(u32::from(port_be));
    }
    let p = reserve(key, id, &settings()?)?;
    // SAFETY: as above.
    unsafe { (*f).nat_port_be = p as u16 };
    Ok(p)
}

/// A packet from outside to NAT66 uplink `id`'s address: a reply of a
/// flow gets the LAN endpoint back, updates the flow and takes the
/// kernel's path; anything else is the gateway's own (`NoMapping`,
/// passed untouched). A later fragment carries no port to map by and is
/// dropped.
#[inline(never)]
pub fn ingress(ctx: &TcContext, l3: usize, pkt: &Packet6, id: u8) -> Outcome {
    if pkt.frag == FRAG6_LATER {
        return Err(Reason::FragmentNoMapping);
    }
    let (port_off, csum_off, udp) = l4_fields(pkt, false).ok_or(Reason::NoMapping)?;
    let nat = Nat6Key {
        remote: pkt.saddr,
        remote_port_be: pkt.sport_be,
        nat_port_be: pkt.dport_be,
        proto: pkt.proto,
        uplink: id,
        _pad: 0,
    };
    // SAFETY: a copy of the map value.
    let lan = NAT6
        .get_ptr(nat)
        .map(|p| unsafe { *p })
        .ok_or(Reason::NoMapping)?;
    let f = flow(&nat, &lan).ok_or(Reason::NoMapping)?;
    rewrite(
        ctx,
        (l3 + ip6::DADDR, port_off, csum_off, udp),
        &lan.lan,
        lan.lan_port_be,
    )?;
    // SAFETY: a race with another CPU loses a stamp or a flag.
    let f = unsafe { &mut *f };
    f.flags = conntrack::tcp_flags_in(f.flags, pkt.tcp_flags) | FLOW_SEEN_REPLY;
    conntrack::stamp(&mut f.last_seen_ns);
    stats::rx(id, ctx.len());
    stats::slow_path(id);
    Ok(Verdict::Pass)
}

/// An ICMPv6 error from outside about a LAN host's packet on NAT66 uplink
/// `id`: the quoted packet's source (address and port, with its own
/// checksum) and the outer destination get the LAN endpoint back, and the
/// ICMPv6 checksum follows both. Without extension headers in the quote.
#[inline(never)]
pub fn error(ctx: &TcContext, l3: usize, pkt: &Packet6, id: u8) -> Outcome {
    let q = pkt.l4 + QUOTED;
    let proto = parse::hi(load::<u16>(ctx, q + ip6::NEXT_HOP)?);
    let ql4 = q + ip6::LEN;
    // Quoted: (port, its checksum, the remote's port).
    let (port_off, qcsum_off, remote_port_be) = match proto {
        IPPROTO_TCP => (ql4, ql4 + 16, load::<u16>(ctx, ql4 + 2)?),
        IPPROTO_UDP => (ql4, ql4 + 6, load::<u16>(ctx, ql4 + 2)?),
        IPPROTO_ICMPV6 if parse::hi(load::<u16>(ctx, ql4)?) == parse::ICMPV6_ECHO_REQUEST => {
            (ql4 + 4, ql4 + 2, 0)
        }
        _ => return Err(Reason::IcmpNoMapping),
    };
    let nat = Nat6Key {
        remote: load(ctx, q + ip6::DADDR)?,
        remote_port_be,
        nat_port_be: load(ctx, port_off)?,
        proto,
        uplink: id,
        _pad: 0,
    };
    // SAFETY: a copy of the map value.
    let lan = NAT6
        .get_ptr(nat)
        .map(|p| unsafe { *p })
        .ok_or(Reason::IcmpNoMapping)?;
    if flow(&nat, &lan).is_none() {
        return Err(Reason::Unsolicited);
    }
    let ql = (pkt.l4 + 2, q + ip6::SADDR, port_off, qcsum_off);
    map_quoted(ctx, ql, &lan.lan, lan.lan_port_be)?;
    // The outer destination, through the pseudo-header.
    rewrite_addr(ctx, l3 + ip6::DADDR, pkt.l4 + 2, &lan.lan)?;
    stats::rx(id, ctx.len());
    Ok(Verdict::Pass)
}

/// An ICMPv6 error about a packet that came in for a flow on NAT66
/// uplink `id`, leaving it: a LAN host's (a Port Unreachable for a
/// datagram, say), or with `own` the gateway's (it could not forward the
/// packet on to the LAN). The quoted packet's destination (address and
/// port, with its own checksum) becomes the uplink's address and the
/// flow's port, and so does a LAN host's outer source; the ICMPv6
/// checksum follows. An error without extension headers (see
/// [`is_error`]), quoting TCP or UDP without them; anything else is not
/// mapped (a LAN host's then meets the egress guard). Called apart from
/// [`egress`], so that their frames never add up.
#[inline(never)]
pub fn error_out(ctx: &TcContext, l3: usize, id: u8, u6: &Uplink6, own: bool) -> Outcome {
    let l4 = l3 + ip6::LEN;
    let q = l4 + QUOTED;
    let proto = parse::hi(load::<u16>(ctx, q + ip6::NEXT_HOP)?);
    let ql4 = q + ip6::LEN;
    let qcsum_off = match proto {
        IPPROTO_TCP => ql4 + 16,
        IPPROTO_UDP => ql4 + 6,
        _ => return Err(Reason::IcmpNoMapping),
    };
    // The flow's LAN end is the quoted destination (its key in SCRATCH6,
    // off the stack).
    let key = SCRATCH6.get_ptr_mut(0).ok_or(Reason::IcmpNoMapping)?;
    // SAFETY: this CPU's slot, which only this run uses until it ends.
    let key = unsafe { &mut *key };
    key.lan = load(ctx, q + ip6::DADDR)?;
    key.remote = load(ctx, q + ip6::SADDR)?;
    key.lan_port_be = load(ctx, ql4 + 2)?;
    key.remote_port_be = load(ctx, ql4)?;
    key.proto = proto;
    key._pad0 = 0;
    key._pad1 = 0;
    let f = CONN6.get_ptr(*key).ok_or(Reason::IcmpNoMapping)?;
    // SAFETY: a read of the map value.
    let (uplink, port_be) = unsafe { ((*f).uplink, (*f).nat_port_be) };
    if uplink != id || port_be == 0 {
        return Err(Reason::IcmpNoMapping);
    }
    let ql = (l4 + 2, q + ip6::DADDR, ql4 + 2, qcsum_off);
    map_quoted(ctx, ql, &u6.outer, port_be)?;
    if !own {
        rewrite_addr(ctx, l3 + ip6::SADDR, l4 + 2, &u6.outer)?;
        stats::tx(id, ctx.len());
    }
    Ok(Verdict::Pass)
}

/// Whether the packet at `l3` is an ICMPv6 error with no extension
/// header before it (RFC 4443 §2.1: types 1 to 4).
#[inline(always)]
pub fn is_error(ctx: &TcContext, l3: usize) -> bool {
    let next = load::<u16>(ctx, l3 + ip6::NEXT_HOP).map(parse::hi);
    let kind = load::<u16>(ctx, l3 + ip6::LEN).map(parse::hi);
    matches!((next, kind), (Ok(IPPROTO_ICMPV6), Ok(k)) if (parse::ICMPV6_DEST_UNREACH..=parse::ICMPV6_PARAM_PROB).contains(&k))
}

/// In an ICMPv6 error whose checksum is at `csum_off`, sets the quoted
/// address at `addr_off` and port at `port_off` to `to` and `port_be`,
/// with the quoted checksum at `qcsum_off`. The quoted packet is ICMPv6
/// payload: its changes are plain data to the outer checksum, the quoted
/// checksum's own change included.
#[inline(always)]
fn map_quoted(
    ctx: &TcContext,
    (csum_off, addr_off, port_off, qcsum_off): (usize, usize, usize, usize),
    to: &[u8; 16],
    port_be: u16,
) -> Result<(), Reason> {
    let old: [u16; 8] = load(ctx, addr_off)?;
    let new: [u16; 8] = u16s(to);
    let mut inner = Delta::default();
    for i in 0..8 {
        inner = inner.u16(old[i], new[i]);
    }
    let old_port: u16 = load(ctx, port_off)?;
    let inner = inner.u16(old_port, port_be);
    let old_qcsum: u16 = load(ctx, qcsum_off)?;
    let new_qcsum = inner.apply(old_qcsum);
    let outer = inner.u16(old_qcsum, new_qcsum);
    let old_csum: u16 = load(ctx, csum_off)?;
    store(ctx, csum_off, &outer.apply(old_csum))?;
    store(ctx, addr_off, to)?;
    store(ctx, port_off, &port_be)?;
    store(ctx, qcsum_off, &new_qcsum)
}

/// The address at `addr_off` set to `to`, the L4 checksum at `csum_off`
/// following it through the pseudo-header.
#[inline(always)]
fn rewrite_addr(
    ctx: &TcContext,
    addr_off: usize,
    csum_off: usize,
    to: &[u8; 16],
) -> Result<(), Reason> {
    let old: [u16; 8] = load(ctx, addr_off)?;
    let new = u16s(to);
    let mut d = Delta::default();
    for i in 0..8 {
        d = d.u16(old[i], new[i]);
    }
    let c: u16 = load(ctx, csum_off)?;
    store(ctx, csum_off, &d.apply(c))?;
    store(ctx, addr_off, to)
}

/// An address as eight 16-bit words, in memory order.
#[inline(always)]
fn u16s(a: &[u8; 16]) -> [u16; 8] {
    let w = |i: usize| u16::from_ne_bytes([a[2 * i], a[2 * i + 1]]);
    [w(0), w(1), w(2), w(3), w(4), w(5), w(6), w(7)]
}
