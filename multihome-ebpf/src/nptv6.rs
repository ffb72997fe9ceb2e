//! NPTv6 (RFC 6296): the stateless, checksum-neutral prefix translation
//! of one address in a packet, and the uplink prefixes it maps between.
use aya_ebpf::programs::TcContext;
use multihome_common::{
    MAX_UPLINKS, MODE6_NAT66, MODE6_NPT, Reason, UPLINK_CONFIGURED, Uplink, Uplink6, in_prefix6,
    npt_translate,
};

use crate::{
    maps::{UPLINKS, UPLINKS6},
    parse::{load, store},
};

/// Which way an address is mapped.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Way {
    /// Internal prefix to the uplink's.
    Out,
    /// The uplink's prefix back to the internal one.
    In,
}

/// Uplink `id`'s translation, if it translates IPv6 by NPTv6.
#[inline(always)]
pub fn uplink6(id: u32) -> Option<&'static Uplink6> {
    UPLINKS6
        .get(id)
        .filter(|u6| u6.mode == MODE6_NPT && u6.prefix_len != 0)
}

/// Uplink `id`'s translation, NPTv6 or NAT66, if it carries IPv6.
#[inline(always)]
pub fn translation(id: u32) -> Option<&'static Uplink6> {
    UPLINKS6
        .get(id)
        .filter(|u6| (u6.mode == MODE6_NPT || u6.mode == MODE6_NAT66) && u6.prefix_len != 0)
}

/// The uplink whose prefix (outer, or with `inner` the internal one)
/// covers `addr`; under NAT66 the outer side is the uplink's one address.
#[inline(always)]
pub fn covering(addr: &[u8; 16], inner: bool) -> Option<(u8, &'static Uplink, &'static Uplink6)> {
    for id in 0..MAX_UPLINKS {
        if let Some(u6) = translation(id)
            && in_prefix6(
                addr,
                if inner { &u6.inner } else { &u6.outer },
                if inner || u6.mode == MODE6_NPT {
                    u6.prefix_len
                } else {
                    128
                },
            )
            && let Some(u) = UPLINKS.get(id)
            && u.flags & UPLINK_CONFIGURED != 0
        {
            return Some((id as u8, u, u6));
        }
    }
    None
}

/// `addr` mapped `way` by `u6`.
#[inline(always)]
pub fn map(addr: &[u8; 16], u6: &Uplink6, way: Way) -> Result<[u8; 16], Reason> {
    let (to, adjust) = match way {
        Way::Out => (&u6.outer, u6.adjust),
        Way::In => (&u6.inner, !u6.adjust),
    };
    npt_translate(addr, to, u6.prefix_len, adjust).ok_or(Reason::NptUntranslatable)
}

/// Maps the address at `off` `way` by `u6` if its prefix is the one
/// mapped from; true when it did. No checksum changes: the address's
/// one's-complement sum is kept.
#[inline(always)]
pub fn rewrite(ctx: &TcContext, off: usize, u6: &Uplink6, way: Way) -> Result<bool, Reason> {
    let addr: [u8; 16] = load(ctx, off)?;
    let from = match way {
        Way::Out => &u6.inner,
        Way::In => &u6.outer,
    };
    if !in_prefix6(&addr, from, u6.prefix_len) {
        return Ok(false);
    }
    store(ctx, off, &map(&addr, u6, way)?)?;
    Ok(true)
}
