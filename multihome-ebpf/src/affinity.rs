//! Sticky choices of the `source` and `site` balance modes: a LAN host
//! (or host and destination site) keeps the uplink its first flow took
//! while it opens new flows within the policy's `sticky_s`. Records live
//! in an LRU map: losing one costs stickiness, never a flow.
use aya_ebpf::bindings::BPF_ANY;
use multihome_common::{
    Affinity, AffinityKey, BALANCE_SITE, Endpoint, EndpointKey, FlowKey, SelectTable,
};

use crate::{
    conntrack::now_ns,
    maps::{AFFINITY, ENDPOINTS},
};

/// The affinity key of flow `key` under `policy`, whose table is `t`.
#[inline(always)]
pub fn key(key: &FlowKey, t: &SelectTable, policy: u32) -> AffinityKey {
    AffinityKey {
        saddr_be: key.saddr_be,
        site_be: if t.balance == BALANCE_SITE {
            key.daddr_be & t.site_mask_be
        } else {
            0
        },
        policy: policy as u8,
        _pad0: 0,
        _pad1: 0,
    }
}

/// The uplink `key` sticks to, if its record is fresh and the uplink is
/// in the policy's current choice; the record is refreshed.
#[inline(always)]
pub fn stuck(key: &AffinityKey, t: &SelectTable) -> Option<u8> {
    let a = AFFINITY.get_ptr_mut(key)?;
    // SAFETY: a preallocated LRU value; a racing CPU only loses a stamp.
    let a = unsafe { &mut *a };
    let now = now_ns();
    let fresh = now.wrapping_sub(a.last_ns) <= u64::from(t.sticky_s) * 1_000_000_000;
    let member = a.uplink < 32 && t.now_members & (1 << a.uplink) != 0;
    if !fresh || !member {
        return None;
    }
    a.last_ns = now;
    Some(a.uplink)
}

/// The endpoint key of flow `key` under `policy`.
#[inline(always)]
pub fn endpoint_key(key: &FlowKey, policy: u32) -> EndpointKey {
    EndpointKey {
        lan_addr_be: key.saddr_be,
        lan_port_be: key.sport_be,
        proto: key.proto,
        policy: policy as u8,
    }
}

/// The uplink and public port of flow `key`'s endpoint, if it has a
/// record whose uplink is in the policy's current choice.
#[inline(always)]
pub fn endpoint(key: &FlowKey, t: &SelectTable, policy: u32) -> Option<(u8, u16)> {
    let e = ENDPOINTS.get_ptr_mut(endpoint_key(key, policy))?;
    // SAFETY: a preallocated map value; a racing CPU only loses a stamp.
    let e = unsafe { &mut *e };
    if e.uplink >= 32 || t.now_members & (1 << e.uplink) == 0 {
        return None;
    }
    e.last_ns = now_ns();
    Some((e.uplink, e.nat_port_be))
}

/// Records flow `key`'s mapping as its endpoint's, for every remote.
#[inline(always)]
pub fn pin_endpoint(key: &FlowKey, policy: u32, uplink: u8, nat_port_be: u16) {
    let now = now_ns();
    let e = Endpoint {
        last_ns: now,
        created_s: (now / 1_000_000_000) as u32,
        nat_port_be,
        uplink,
        _pad: 0,
    };
    let _ = ENDPOINTS.insert(endpoint_key(key, policy), e, BPF_ANY as u64);
}

/// Records that `key`'s new flows go to `uplink` from now on.
#[inline(always)]
pub fn stick(key: &AffinityKey, uplink: u8) {
    let now = now_ns();
    let a = Affinity {
        last_ns: now,
        created_s: (now / 1_000_000_000) as u32,
        uplink,
        _pad0: 0,
        _pad1: 0,
    };
    let _ = AFFINITY.insert(key, a, BPF_ANY as u64);
}
