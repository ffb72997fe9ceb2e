//! Weighted uplink choice for a new flow.
use aya_ebpf::helpers::bpf_get_prandom_u32;
use multihome_common::{
    MAX_UPLINKS, Reason, SELECT_SLOTS, UPLINK_CONFIGURED, UPLINK_LINK_DOWN, UPLINK_USABLE, Uplink,
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

/// Picks the uplink for a new flow. A destination on the link of one
/// uplink (its connected subnet) goes out that uplink. Otherwise the
/// daemon's weighted table decides. With no usable uplink, any uplink that
/// has an address and its link up keeps the LAN online.
#[inline(always)]
pub fn choose(onlink_ifindex: Option<u32>) -> Result<(u8, &'static Uplink), Reason> {
    if let Some(ifindex) = onlink_ifindex {
        for id in 0..MAX_UPLINKS {
            if let Some(u) = uplink(id)
                && u.ifindex == ifindex
                && has_link(u)
            {
                return Ok((id as u8, u));
            }
        }
    }
    if let Some(table) = SELECT.get(0)
        && table.len != 0
    {
        // The daemon fills all slots or none, so a mask picks one.
        // SAFETY: no preconditions.
        let slot = unsafe { bpf_get_prandom_u32() } as usize & (SELECT_SLOTS - 1);
        if let Some(id) = table.slots.get(slot)
            && let Some(u) = uplink(*id as u32)
            && usable(u)
        {
            return Ok((*id, u));
        }
    }
    for id in 0..MAX_UPLINKS {
        if let Some(u) = uplink(id)
            && usable(u)
        {
            return Ok((id as u8, u));
        }
    }
    for id in 0..MAX_UPLINKS {
        if let Some(u) = uplink(id)
            && has_link(u)
        {
            return Ok((id as u8, u));
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
