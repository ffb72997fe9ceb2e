//! TCP MSS clamping (RFC 879, RFC 9293 §3.7.1) of SYN and SYN-ACK through
//! an uplink whose `mss_clamp` is set: the MSS option is lowered to the
//! clamp, so neither end sends segments a PMTU black hole beyond the uplink
//! would drop. Only SYNs pay for it.
use aya_ebpf::programs::TcContext;
use multihome_common::Reason;

use crate::{
    csum,
    parse::{Packet, TCP_SYN, hi, lo},
};

const TCPOPT_EOL: u8 = 0;
const TCPOPT_NOP: u8 = 1;
const TCPOPT_MSS: u8 = 2;
/// A TCP header holds at most 40 option bytes.
const MAX_OPTION_BYTES: usize = 40;

/// Lowers the MSS option of `pkt`, a TCP segment, to `clamp` bytes when it
/// is a SYN and `clamp` is set. The checksum follows.
#[inline(always)]
pub fn clamp(ctx: &TcContext, pkt: &Packet, clamp: u16) -> Result<(), Reason> {
    if clamp == 0 || pkt.tcp_flags() & TCP_SYN == 0 {
        return Ok(());
    }
    let (csum_off, _) = pkt.l4_csum();
    match clamp_options(ctx, pkt.l4, csum_off, clamp) {
        0 => Ok(()),
        _ => Err(Reason::RewriteFailed),
    }
}

/// The option walk, as a BPF-to-BPF call: its loop stays out of the
/// callers' register allocation. Options sit at offsets the verifier
/// cannot bound for direct packet access, so they are read and written
/// through the skb helpers. Returns 0, or -1 when a rewrite failed.
#[inline(never)]
fn clamp_options(ctx: &TcContext, l4: usize, csum_off: usize, clamp: u16) -> i32 {
    let Ok(word) = ctx.load::<u16>(l4 + 12) else {
        return 0;
    };
    let doff = (hi(word) >> 4) as usize * 4;
    let end = l4 + doff.min(20 + MAX_OPTION_BYTES);
    let mut off = l4 + 20;
    for _ in 0..MAX_OPTION_BYTES {
        if off + 2 > end {
            return 0;
        }
        let Ok(word) = ctx.load::<u16>(off) else {
            return 0;
        };
        let (kind, len) = (hi(word), lo(word) as usize);
        match kind {
            TCPOPT_EOL => return 0,
            TCPOPT_NOP => off += 1,
            TCPOPT_MSS => {
                if len != 4 || off + 4 > end {
                    return 0;
                }
                let Ok(old) = ctx.load::<u16>(off + 2) else {
                    return 0;
                };
                if u16::from_be(old) <= clamp {
                    return 0;
                }
                let new = clamp.to_be();
                if ctx.store(off + 2, &new, 0).is_err()
                    || csum::l4_field(ctx, csum_off, false, old, new).is_err()
                {
                    return -1;
                }
                return 0;
            }
            _ if len < 2 => return 0,
            _ => off += len,
        }
    }
    0
}
