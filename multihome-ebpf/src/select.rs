//! Uplink choice for a new flow: by its policy's table and balance mode,
//! weighted, consistent.
use multihome_common::{
    BALANCE_CONNECTION, BALANCE_HASH, BALANCE_SITE, BALANCE_SOURCE, FlowKey,
    LAST_RESORT_UNREACHABLE, MAX_UPLINKS, Reason, UPLINK_CONFIGURED, UPLINK_LINK_DOWN,
    UPLINK_USABLE, Uplink, flow_hash, select_slot,
};

use crate::{
    affinity,
    maps::{SELECT, UPLINKS},
};

#[inline(always)]
fn uplink(id: u32) -> Option<&'static Uplink> {
    UPLINKS.get(id)
}

/// May take new flows: healthy, with an address.
#[inline(always)]
pub fn usable(u: &Uplink) -> bool {
    u.flags & UPLINK_USABLE != 0 && u.addr_be != 0
}

/// Picks the uplink for a new flow `key` under `policy` (its
/// [`SelectTable`]), and tells whether it failed over
/// (`FLOW_FAILED_OVER`). A destination on the link of one uplink (its
/// connected subnet) goes out that uplink. Otherwise the policy's Maglev
/// table decides by the flow's hash ([`flow_hash`] of the 5-tuple, or of
/// the two addresses under `hash`), so the same flow gets the same uplink
/// while the set of usable uplinks is the same; under `source` and `site`
/// `stuck`, the uplink of a live affinity, decides first. With no usable
/// uplink, any uplink that has an address and its link up keeps the LAN
/// online, unless the policy's `last_resort` refuses.
///
/// [`flow_hash`]: multihome_common::flow_hash
#[inline(always)]
pub fn choose(
    onlink_ifindex: Option<u32>,
    key: &FlowKey,
    seed: u32,
    policy: u32,
    stuck: Option<u8>,
) -> Result<(u8, &'static Uplink, bool), Reason> {
    let table = SELECT.get(policy).or_else(|| SELECT.get(0));
    let balance = table.map_or(BALANCE_CONNECTION, |t| t.balance);
    let hash = if balance == BALANCE_HASH {
        flow_hash(&key.addresses(), seed)
    } else {
        flow_hash(key, seed)
    };
    let slot = select_slot(hash);
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
    if let Some(t) = table {
        if t.usable == 0 && t.last_resort == LAST_RESORT_UNREACHABLE {
            return Err(Reason::PolicyRefused);
        }
        if let Some(id) = stuck
            && let Some(u) = uplink(id as u32)
            && usable(u)
        {
            return Ok((id, u, failed_over(id)));
        }
        if t.usable != 0
            && let Some(id) = t.now.get(slot)
            && let Some(u) = uplink(*id as u32)
            && usable(u)
        {
            if balance == BALANCE_SOURCE || balance == BALANCE_SITE {
                affinity::stick(&affinity::key(key, t, policy), *id);
            }
            return Ok((*id, u, failed_over(*id)));
        }
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
