//! A TCP segment of a flow whose uplink went down, answered with the RST
//! its remote would send (RFC 9293 §3.10.7.1, reset in reply to a
//! segment), straight back to the LAN host: the application learns at
//! once that its connection is gone instead of hanging.
//!
//! The segment is turned around in place: MACs, addresses and ports swap
//! (which leaves every checksum as it was), sequence, acknowledgment,
//! flags and window change through `bpf_l4_csum_replace` (right for every
//! `ip_summed`, CHECKSUM_PARTIAL included) and the TTL by hand. Its
//! payload and options stay: data in an RST is allowed and ignored, and
//! keeping the length spares recomputing a checksum over it.
use aya_ebpf::{helpers::bpf_redirect, programs::TcContext};
use multihome_common::Reason;

use crate::{
    csum::{self, Delta},
    parse::{self, Packet, TCP_FIN, TCP_RST, TCP_SYN, read, write},
    stats,
    verdict::{Outcome, Verdict},
};

const TCP_ACK: u8 = 0x10;
/// TTL of the RST, as the remote's stack would start it.
const TTL: u8 = 64;

/// Turns `pkt` (TCP, from the LAN, its flow already removed) into the RST
/// and sends it back out of the interface it came in on.
#[inline(always)]
pub fn reply(ctx: &TcContext, pkt: &Packet) -> Outcome {
    let l3 = pkt.l3;
    let l4 = pkt.l4;
    let seq_be: u32 = read(ctx, l4 + 4)?;
    let ack_be: u32 = read(ctx, l4 + 8)?;
    let off_flags: u16 = read(ctx, l4 + 12)?;
    let window: u16 = read(ctx, l4 + 14)?;
    let flags = pkt.tcp_flags;
    let doff = (parse::hi(off_flags) >> 4) as usize * 4;
    let payload = (pkt.tot_len as usize)
        .checked_sub((l4 - l3) + doff)
        .ok_or(Reason::Malformed)? as u32;
    // RFC 9293: with an ACK, <SEQ=SEG.ACK><CTL=RST>; without,
    // <SEQ=0><ACK=SEG.SEQ+SEG.LEN><CTL=RST,ACK>.
    let (new_seq_be, new_ack_be, new_flags) = if flags & TCP_ACK != 0 {
        (ack_be, 0, TCP_RST)
    } else {
        let len = payload + (flags & TCP_SYN != 0) as u32 + (flags & TCP_FIN != 0) as u32;
        (
            0,
            u32::from_be(seq_be).wrapping_add(len).to_be(),
            TCP_RST | TCP_ACK,
        )
    };
    let new_off_flags = u16::from_ne_bytes([parse::hi(off_flags), new_flags]);
    let sum = l4 + 16;
    l4_word(ctx, sum, seq_be, new_seq_be)?;
    l4_word(ctx, sum, ack_be, new_ack_be)?;
    csum::l4_field(ctx, sum, false, off_flags, new_off_flags)?;
    csum::l4_field(ctx, sum, false, window, 0)?;
    write(ctx, l4 + 4, new_seq_be)?;
    write(ctx, l4 + 8, new_ack_be)?;
    write(ctx, l4 + 12, new_off_flags)?;
    write(ctx, l4 + 14, 0u16)?;
    // Swapped pairs leave every one's complement sum as it was.
    write(ctx, l4, pkt.dport_be)?;
    write(ctx, l4 + 2, pkt.sport_be)?;
    write(ctx, l3 + 12, pkt.daddr_be)?;
    write(ctx, l3 + 16, pkt.saddr_be)?;
    let ttl_proto: u16 = read(ctx, l3 + 8)?;
    let new_ttl_proto = u16::from_ne_bytes([TTL, parse::lo(ttl_proto)]);
    let ip_sum: u16 = read(ctx, l3 + 10)?;
    write(ctx, l3 + 8, new_ttl_proto)?;
    write(
        ctx,
        l3 + 10,
        Delta::default().u16(ttl_proto, new_ttl_proto).apply(ip_sum),
    )?;
    let macs: [u8; 12] = read(ctx, 0)?;
    let mut swapped = [0u8; 12];
    swapped[..6].copy_from_slice(&macs[6..]);
    swapped[6..].copy_from_slice(&macs[..6]);
    write(ctx, 0, swapped)?;
    stats::count(Reason::TcpReset);
    // SAFETY: the context pointer is valid for the program's run.
    let ifindex = unsafe { (*ctx.skb.skb).ingress_ifindex };
    // SAFETY: plain helper call.
    let ret = unsafe { bpf_redirect(ifindex, 0) };
    Ok(Verdict::Redirect(ret as i32))
}

/// `bpf_l4_csum_replace` for a 32-bit field inside the TCP header.
#[inline(always)]
fn l4_word(ctx: &TcContext, off: usize, old: u32, new: u32) -> Result<(), Reason> {
    ctx.l4_csum_replace(off, old as u64, new as u64, 4)
        .map_err(|_| Reason::RewriteFailed)
}
