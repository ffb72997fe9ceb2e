//! Uplink choice for a new flow: by its hash, weighted, consistent.
use multihome_common::{
    MAX_UPLINKS, Reason, UPLINK_CONFIGURED, UPLINK_LINK_DOWN, UPLINK_USABLE, Uplink, select_slot,
};

use crate::maps::{SELECT, UPLINKS};

#[inline(always)]
fn uplink(id: u32) -> Option<&'static Uplink> {
    UPLINKS.get(id)
}

/// May take new flows: healthy, with an address.
#[inline(always)]
pub fn usable(u: &Uplink) -> bool {
    u.flags & UPLINK_USABLE != 0 && u.addr_be != 0
}

/// Picks the uplink for a new flow whose [`flow_hash`] is `hash`, and
/// tells whether it failed over (`FLOW_FAILED_OVER`). A destination on
/// the link of one uplink (its connected subnet) goes out that uplink.
/// Otherwise the daemon's Maglev table decides, so the same 5-tuple gets
/// the same uplink while the set of usable uplinks is the same. With no
/// usable uplink, any uplink that has an address and its link up keeps
/// the LAN online.
///
/// [`flow_hash`]: multihome_common::flow_hash
#[inline(always)]
pub fn choose(
    onlink_ifindex: Option<u32>,
    hash: u32,
) -> Result<(u8, &'static Uplink, bool), Reason> {
    let slot = select_slot(hash);
    let table = SELECT.get(0);
    if let Some(ifindex) = onlink_ifindex {
        // Uplinks may share the device (routers on one segment): the
        // hash's choice if it is one of them.
        if let Some(t) = table
            && t.usable != 0
            && let Some(id) = t.now.get(slot)
            && let Some(u) = uplink(*id as u32)
            && u.ifindex == ifindex
            && usable(u)
        {
            return Ok((*id, u, false));
        }
        for id in 0..MAX_UPLINKS {
            if let Some(u) = uplink(id)
                && u.ifindex == ifindex
                && has_link(u)
            {
                return Ok((id as u8, u, false));
            }
        }
    }
    let preferred = match table {
        Some(t) if t.configured != 0 => t.preferred.get(slot).copied(),
        _ => None,
    };
    // Failed over: its preferred uplink exists and is not usable.
    let failed_over =
        |id: u8| preferred.is_some_and(|p| p != id && uplink(p as u32).is_none_or(|u| !usable(u)));
    if let Some(t) = table
        && t.usable != 0
        && let Some(id) = t.now.get(slot)
        && let Some(u) = uplink(*id as u32)
        && usable(u)
    {
        return Ok((*id, u, failed_over(*id)));
    }
    for id in 0..MAX_UPLINKS {
        if let Some(u) = uplink(id)
            && usable(u)
        {
            return Ok((id as u8, u, failed_over(id as u8)));
        }
    }
    for id in 0..MAX_UPLINKS {
        if let Some(u) = uplink(id)
            && has_link(u)
        {
            return Ok((id as u8, u, failed_over(id as u8)));
        }
    }
    Err(Reason::NoUplink)
}

/// Configured, with an address and its link up: packets sent there can
/// leave, whatever the probes say.
#[inline(always)]
fn has_link(u: &Uplink) -> bool {
    u.flags & (UPLINK_CONFIGURED | UPLINK_LINK_DOWN) == UPLINK_CONFIGURED && u.addr_be != 0
}

/// The configured uplink whose address is `addr_be`, if any.
#[inline(always)]
pub fn uplink_with_addr(addr_be: u32) -> Option<(u8, &'static Uplink)> {
    for id in 0..MAX_UPLINKS {
        if let Some(u) = uplink(id)
            && u.addr_be == addr_be
            && addr_be != 0
            && u.flags & UPLINK_CONFIGURED != 0
        {
            return Some((id as u8, u));
        }
    }
    None
}

/// The uplink whose `skb->mark` this is, if any.
#[inline(always)]
pub fn from_mark(mark: u32, mark_base: u32) -> Option<(u8, &'static Uplink)> {
    if mark & !0xff != mark_base {
        return None;
    }
    let id = (mark & 0xff).checked_sub(1)?;
    if id >= MAX_UPLINKS {
        return None;
    }
    uplink(id).map(|u| (id as u8, u))
}
