//! Address and port rewrites with their checksum fix-ups.
use aya_ebpf::programs::TcContext;
use multihome_common::Reason;

use crate::{
    csum::{self, Delta},
    parse::{Frame, L4, Packet, ip, read, write},
};

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// SNAT: LAN to uplink.
    Src,
    /// Reverse: uplink to LAN.
    Dst,
}

impl Side {
    #[inline(always)]
    pub fn addr_off(self) -> usize {
        match self {
            Side::Src => ip::SADDR,
            Side::Dst => ip::DADDR,
        }
    }

    #[inline(always)]
    pub fn port_off(self) -> usize {
        match self {
            Side::Src => 0,
            Side::Dst => 2,
        }
    }
}

/// Rewrites one address of the IPv4 header at `l3`, and decrements the
/// TTL when `hop` is set (the packet bypasses the kernel's forwarding
/// code). The header checksum is fixed by hand. Returns the old address.
#[inline(always)]
pub fn rewrite_l3(
    ctx: &impl Frame,
    l3: usize,
    side: Side,
    addr_be: u32,
    hop: bool,
) -> Result<u32, Reason> {
    let addr_off = l3 + side.addr_off();
    let old_addr: u32 = read(ctx, addr_off)?;
    let mut delta = Delta::default().u32(old_addr, addr_be);
    if hop {
        let old: u16 = read(ctx, l3 + ip::TTL)?;
        let mut bytes = old.to_ne_bytes();
        bytes[0] = bytes[0].wrapping_sub(1);
        let new = u16::from_ne_bytes(bytes);
        write(ctx, l3 + ip::TTL, new)?;
        delta = delta.u16(old, new);
    }
    let ip_csum: u16 = read(ctx, l3 + ip::CSUM)?;
    write(ctx, addr_off, addr_be)?;
    write(ctx, l3 + ip::CSUM, delta.apply(ip_csum))?;
    Ok(old_addr)
}

/// Rewrites one side's address and port (the echo identifier for ICMP)
/// and fixes the IP and L4 checksums.
#[inline(always)]
pub fn rewrite(
    ctx: &TcContext,
    pkt: &Packet,
    side: Side,
    addr_be: u32,
    port_be: u16,
    hop: bool,
) -> Result<(), Reason> {
    let old_addr = rewrite_l3(ctx, pkt.l3, side, addr_be, hop)?;
    if pkt.portless() {
        if pkt.l4_kind == L4::OtherPseudo {
            let (csum_off, _) = pkt.l4_csum();
            csum::l4_addr(ctx, csum_off, false, old_addr, addr_be)?;
        }
        return Ok(());
    }
    let (port_off, old_port) = match (pkt.l4_kind, side) {
        (L4::EchoRequest | L4::EchoReply, Side::Src) => (pkt.l4 + 4, pkt.sport_be),
        (L4::EchoRequest | L4::EchoReply, Side::Dst) => (pkt.l4 + 4, pkt.dport_be),
        (_, Side::Src) => (pkt.l4, pkt.sport_be),
        (_, Side::Dst) => (pkt.l4 + 2, pkt.dport_be),
    };
    let (csum_off, udp) = pkt.l4_csum();
    if port_be != old_port {
        write(ctx, port_off, port_be)?;
    }
    // Helpers from here on: they may move the packet data.
    if pkt.has_pseudo_header() {
        csum::l4_addr(ctx, csum_off, udp, old_addr, addr_be)?;
    }
    if port_be != old_port {
        csum::l4_field(ctx, csum_off, udp, old_port, port_be)?;
    }
    Ok(())
}

/// Rewrites only the source address: later fragments carry no L4 header.
#[inline(always)]
pub fn rewrite_fragment_src(ctx: &TcContext, l3: usize, addr_be: u32) -> Result<(), Reason> {
    rewrite_l3(ctx, l3, Side::Src, addr_be, false).map(|_| ())
}
