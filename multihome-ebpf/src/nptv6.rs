//! NPTv6 (RFC 6296): the stateless, checksum-neutral prefix translation
//! of one address in a packet, and the uplink prefixes it maps between.
//! An uplink maps each internal prefix onto a prefix of its own, in an
//! entry per internal prefix (`uplink6_slot`); its first entry is found
//! without a search, so a LAN of one prefix pays for no other.
use aya_ebpf::{maps::lpm_trie::Key, programs::TcContext};
use multihome_common::{
    MAPPED6_INNER, MAPPED6_OUTER, MAX_UPLINKS, MODE6_NAT66, MODE6_NPT, Mapped6Key, Reason,
    UPLINK_CONFIGURED, Uplink, Uplink6, in_prefix6, npt_translate, uplink6_slot,
};

use crate::{
    maps::{MAPPED6, UPLINKS, UPLINKS6},
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

/// Uplink `id`'s first translation, NPTv6 or NAT66, if it carries IPv6.
#[inline(always)]
pub fn translation(id: u32) -> Option<&'static Uplink6> {
    UPLINKS6
        .get(id)
        .filter(|u6| (u6.mode == MODE6_NPT || u6.mode == MODE6_NAT66) && u6.prefix_len != 0)
}

/// No entry (past every slot of `UPLINKS6`).
const NONE: u32 = u32::MAX;

/// `MAPPED6`'s answer for `addr` on its side: an internal prefix's `k`,
/// or the slot of the entry with an uplink's prefix.
#[inline(always)]
fn mapped6(addr: &[u8; 16], inner: bool) -> Option<u32> {
    let key = Key::new(
        32 + 128,
        Mapped6Key {
            side_be: if inner { MAPPED6_INNER } else { MAPPED6_OUTER }.to_be(),
            addr: *addr,
        },
    );
    MAPPED6.get(&key).copied()
}

/// The slot of uplink `id`'s entry for `addr` whose `MAPPED6` answer is
/// `found`, if that entry is written and covers `addr` (the daemon may be
/// rewriting), else [`NONE`].
#[inline(always)]
fn checked(id: u32, addr: &[u8; 16], inner: bool, found: u32) -> u32 {
    let slot = match inner {
        true => uplink6_slot(id, found),
        false if found % MAX_UPLINKS == id => found,
        false => return NONE,
    };
    match UPLINKS6.get(slot) {
        Some(u6) if u6.prefix_len != 0 && u6.covers(addr, inner) => slot,
        _ => NONE,
    }
}

/// [`entry`] past the first: one lookup, whose answer the verifier
/// cannot tell apart (no search to unroll, one path after it).
#[inline(never)]
fn further(id: u32, addr: &[u8; 16], inner: bool) -> u32 {
    match mapped6(addr, inner) {
        Some(found) => checked(id, addr, inner, found),
        None => NONE,
    }
}

/// Uplink `id`'s translation (NPTv6 or NAT66) of the internal prefix
/// that covers `addr`, matched on the internal side (`inner`) or on the
/// uplink's. Its first entry is tried first; the others, only when it
/// has them, by `MAPPED6`.
#[inline(always)]
pub fn entry(id: u32, addr: &[u8; 16], inner: bool) -> Option<&'static Uplink6> {
    let first = translation(id)?;
    if first.covers(addr, inner) {
        return Some(first);
    }
    if first.lans <= 1 {
        return None;
    }
    UPLINKS6.get(further(id, addr, inner))
}

/// Uplink `id`'s NPTv6 translation of the internal prefix covering
/// `addr` (`way` Out) or of its prefix covering it (In).
#[inline(always)]
pub fn npt(id: u32, addr: &[u8; 16], way: Way) -> Option<&'static Uplink6> {
    entry(id, addr, way == Way::Out).filter(|u6| u6.mode == MODE6_NPT)
}

/// The NPTv6 entry at `slot` (of [`uplink6_slot`]), if it is written.
#[inline(always)]
pub fn npt_at(slot: u32) -> Option<&'static Uplink6> {
    UPLINKS6
        .get(slot)
        .filter(|u6| u6.mode == MODE6_NPT && u6.prefix_len != 0)
}

/// The uplink whose prefix (outer, or with `inner` the internal one)
/// covers `addr`, and that entry. The uplinks' first entries are tried,
/// on the uplink's side by the span of all its prefixes: an address none
/// of them covers (every packet to the internet) costs what it did before
/// several internal prefixes. Only a source past the first entries (a
/// host of another internal prefix, or a spoofed one) takes a lookup.
#[inline(always)]
pub fn covering(addr: &[u8; 16], inner: bool) -> Option<(u8, &'static Uplink, &'static Uplink6)> {
    for id in 0..MAX_UPLINKS {
        if let Some(first) = translation(id) {
            let (prefix, len) = match inner {
                true => (&first.inner, first.prefix_len),
                false => (&first.span, first.span_len),
            };
            if in_prefix6(addr, prefix, len)
                && let Some(u) = UPLINKS.get(id)
                && u.flags & UPLINK_CONFIGURED != 0
            {
                // One prefix spanned: the first entry's own.
                if inner || first.span_len == first.prefix_len {
                    return Some((id as u8, u, first));
                }
                return entry(id, addr, false).map(|u6| (id as u8, u, u6));
            }
        }
    }
    if !inner {
        return None;
    }
    let slot = inner_further(addr);
    let id = slot % MAX_UPLINKS;
    Some((id as u8, UPLINKS.get(id)?, UPLINKS6.get(slot)?))
}

/// [`covering`] of an internal address past the uplinks' first entries:
/// the slot of the first configured uplink's entry for it, or [`NONE`].
#[inline(never)]
fn inner_further(addr: &[u8; 16]) -> u32 {
    let Some(k) = mapped6(addr, true) else {
        return NONE;
    };
    for id in 0..MAX_UPLINKS {
        let slot = checked(id, addr, true, k);
        if slot != NONE
            && let Some(u) = UPLINKS.get(id)
            && u.flags & UPLINK_CONFIGURED != 0
        {
            return slot;
        }
    }
    NONE
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

/// Maps the address at `off` `way` by uplink `id`'s NPTv6 translation
/// if one of its prefixes on the side mapped from covers it; true when
/// it did. No checksum changes: the address's one's-complement sum is
/// kept.
#[inline(always)]
pub fn rewrite(ctx: &TcContext, off: usize, id: u8, way: Way) -> Result<bool, Reason> {
    let addr: [u8; 16] = load(ctx, off)?;
    let Some(u6) = npt(u32::from(id), &addr, way) else {
        return Ok(false);
    };
    store(ctx, off, &map(&addr, u6, way)?)?;
    Ok(true)
}
