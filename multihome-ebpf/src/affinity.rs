//! Sticky choices of the `source` and `site` balance modes: a LAN host
//! (or host and destination site) keeps the uplink its first flow took
//! while it opens new flows within the policy's `sticky_s`. Records live
//! in an LRU map: losing one costs stickiness, never a flow.
//!
//! Endpoint records (`balance = "endpoint"`) hold one uplink and public
//! port per internal endpoint; `ENDPOINT_PORTS` reserves that port, so
//! that no other flow takes it towards any remote.
use aya_ebpf::bindings::{BPF_ANY, BPF_NOEXIST};
use multihome_common::{
    Affinity, AffinityKey, BALANCE_SITE, EimKey, Endpoint, EndpointKey, FlowKey, SelectTable,
};

use crate::{
    conntrack::now_ns,
    maps::{AFFINITY, ENDPOINT_PORTS, ENDPOINTS, UPLINKS},
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
    let fresh = now.saturating_sub(a.last_ns) <= u64::from(t.sticky_s) * 1_000_000_000;
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

/// Records flow `key`'s mapping (`nat_addr_be:nat_port_be` on `uplink`)
/// as its endpoint's, for every remote, and reserves the port for it.
#[inline(always)]
pub fn pin_endpoint(
    key: &FlowKey,
    policy: u32,
    (uplink, nat_addr_be): (u8, u32),
    nat_port_be: u16,
) {
    let now = now_ns();
    let e = Endpoint {
        last_ns: now,
        created_s: (now / 1_000_000_000) as u32,
        nat_port_be,
        uplink,
        _pad: 0,
    };
    let _ = ENDPOINTS.insert(endpoint_key(key, policy), e, BPF_ANY as u64);
    let _ = mh_claim(
        nat_addr_be,
        u32::from(key.sport_be) << 16 | u32::from(nat_port_be),
        key.saddr_be,
        u32::from(key.proto) | policy << 8,
    );
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

/// The public mapping `nat_addr_be:port_be` of protocol `proto`.
#[inline(always)]
pub fn mapping(nat_addr_be: u32, port_be: u16, proto: u8) -> EimKey {
    EimKey {
        nat_addr_be,
        nat_port_be: port_be,
        proto,
        _pad: 0,
    }
}

/// Whether `owner`'s record still holds `m` (same port, on an uplink that
/// still has that address): a reservation is checked, never trusted, so
/// a stale one (record reaped, moved, renumbered) frees its port at once.
#[inline(always)]
fn holds(owner: &EndpointKey, m: &EimKey) -> bool {
    // SAFETY: read at once; a racing update only makes the answer stale.
    let Some(e) = (unsafe { ENDPOINTS.get(owner) }) else {
        return false;
    };
    e.nat_port_be == m.nat_port_be
        && UPLINKS
            .get(u32::from(e.uplink))
            .is_some_and(|u| u.addr_be == m.nat_addr_be)
}

/// Whether the public mapping `m` is reserved for an endpoint other than
/// flow `key`'s own (any policy: one socket is one endpoint).
#[inline(always)]
pub fn reserved_for_other(key: &FlowKey, m: &EimKey) -> bool {
    let Some(owner) = ENDPOINT_PORTS.get_ptr(m) else {
        return false;
    };
    // SAFETY: a preallocated map value, read in place (it is also the key
    // of the record lookup): a racing update only makes the answer stale.
    let owner = unsafe { &*owner };
    let own = owner.lan_addr_be == key.saddr_be
        && owner.lan_port_be == key.sport_be
        && owner.proto == key.proto;
    !own && holds(owner, m)
}

/// Reserves the public mapping of flow `key`'s new endpoint record under
/// `policy`, found free of other reservations a moment ago. Another
/// endpoint that claimed it since keeps it (this record's port is then
/// unreserved, as it is when the map is full: its flows still work, only
/// the guarantee for later remotes is lost). A stale reservation is taken
/// over. Returns 1 when the port is reserved for it. A BPF global
/// function (which must return a scalar): its map keys live in its own
/// frame, which `mh_lan_in`'s stack could not hold besides the port
/// search's.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn mh_claim(
    nat_addr_be: u32,
    ports: u32,
    lan_addr_be: u32,
    proto_policy: u32,
) -> u32 {
    let m = mapping(nat_addr_be, ports as u16, proto_policy as u8);
    let me = EndpointKey {
        lan_addr_be,
        lan_port_be: (ports >> 16) as u16,
        proto: proto_policy as u8,
        policy: (proto_policy >> 8) as u8,
    };
    if ENDPOINT_PORTS.insert(m, me, BPF_NOEXIST as u64).is_ok() {
        return 1;
    }
    let key = FlowKey {
        saddr_be: lan_addr_be,
        daddr_be: 0,
        sport_be: me.lan_port_be,
        dport_be: 0,
        proto: me.proto,
        _pad0: 0,
        _pad1: 0,
    };
    if reserved_for_other(&key, &m) {
        return 0;
    }
    u32::from(ENDPOINT_PORTS.insert(m, me, BPF_ANY as u64).is_ok())
}
