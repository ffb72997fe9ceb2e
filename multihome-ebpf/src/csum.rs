//! Checksum arithmetic (RFC 1071, RFC 1624) on values as they sit in
//! memory: the one's complement sum does not care about byte order as long
//! as every operand is read the same way.
//!
//! The IPv4 header and headers embedded in ICMP errors are fixed up here by
//! hand; the outer TCP/UDP checksum goes through `bpf_l4_csum_replace`,
//! which also keeps `skb->csum` and CHECKSUM_PARTIAL packets right.
use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use multihome_common::Reason;

#[inline(always)]
pub fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// An accumulated change to a checksummed region.
#[derive(Clone, Copy, Default)]
pub struct Delta(u32);

impl Delta {
    #[inline(always)]
    pub fn u16(self, old: u16, new: u16) -> Self {
        Self(fold(self.0 + (!old) as u32 + new as u32) as u32)
    }

    #[inline(always)]
    pub fn u32(self, old: u32, new: u32) -> Self {
        self.u16(old as u16, new as u16)
            .u16((old >> 16) as u16, (new >> 16) as u16)
    }

    /// The checksum field after applying this change.
    #[inline(always)]
    pub fn apply(self, csum: u16) -> u16 {
        !fold((!csum) as u32 + self.0)
    }
}

/// `bpf_l4_csum_replace` for an address (pseudo-header) change.
#[inline(always)]
pub fn l4_addr(ctx: &TcContext, off: usize, udp: bool, old: u32, new: u32) -> Result<(), Reason> {
    let flags = BPF_F_PSEUDO_HDR as u64 | 4 | if udp { BPF_F_MARK_MANGLED_0 as u64 } else { 0 };
    ctx.l4_csum_replace(off, old as u64, new as u64, flags)
        .map_err(|_| Reason::RewriteFailed)
}

/// `bpf_l4_csum_replace` for a 16-bit field inside the L4 header.
#[inline(always)]
pub fn l4_field(ctx: &TcContext, off: usize, udp: bool, old: u16, new: u16) -> Result<(), Reason> {
    let flags = 2 | if udp { BPF_F_MARK_MANGLED_0 as u64 } else { 0 };
    ctx.l4_csum_replace(off, old as u64, new as u64, flags)
        .map_err(|_| Reason::RewriteFailed)
}
