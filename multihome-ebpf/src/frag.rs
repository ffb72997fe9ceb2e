//! Fragments (RFC 791): only a datagram's first fragment carries the L4
//! header, so the translation of the rest is recorded from it in `FRAGS`,
//! keyed by (source, destination, protocol, IP id) as the later fragments
//! show them. Protocols translated by address only need no record: their
//! flow key has no ports. Reply fragments that arrive before their first
//! (RFC 4787 REQ-14) are matched through `PEERS` when a single LAN host
//! has UDP flows between that remote and NAT address (recorded as flows
//! are made, so that a datagram's reply can be its first). `PEERS` is
//! direct-mapped: a new pair costs one slot read and write, and takes the
//! slot over from another pair, as an LRU map would evict one.
use aya_ebpf::programs::TcContext;
use multihome_common::{FlowKey, FragKey, FragXlat, IPPROTO_UDP, PeerSlot, peer_check, peer_slot};

use crate::{
    conntrack,
    maps::{FRAGS, PEERS},
    parse::{IP_MF_BE, Packet, ip, read},
};

#[inline(always)]
fn frag_of(k: &FragKey) -> Option<FragXlat> {
    // SAFETY: a copy of the map value.
    FRAGS.get_ptr(k).map(|p| unsafe { *p })
}

/// The LAN host `PEERS` holds for (remote, NAT address), 0 for several;
/// None when its slot holds another pair, or a torn one.
#[inline(always)]
fn peer_of(remote_be: u32, nat_addr_be: u32) -> Option<u32> {
    // SAFETY: a copy of the map value.
    let s = unsafe { *PEERS.get_ptr(peer_slot(remote_be, nat_addr_be))? };
    (s.remote_be == remote_be
        && s.nat_addr_be == nat_addr_be
        && s.check == peer_check(remote_be, nat_addr_be, s.lan_addr_be))
    .then_some(s.lan_addr_be)
}

/// Writes (remote, NAT address) -> `lan_addr_be` into its slot.
#[inline(always)]
fn set_peer(remote_be: u32, nat_addr_be: u32, lan_addr_be: u32) {
    if let Some(p) = PEERS.get_ptr_mut(peer_slot(remote_be, nat_addr_be)) {
        // SAFETY: the slot is the map's; a concurrent writer can only tear
        // it, which `check` then refuses.
        unsafe {
            *p = PeerSlot {
                remote_be,
                nat_addr_be,
                lan_addr_be,
                check: peer_check(remote_be, nat_addr_be, lan_addr_be),
            }
        };
    }
}

#[inline(always)]
fn key(ctx: &TcContext, pkt: &Packet) -> Option<FragKey> {
    Some(FragKey {
        saddr_be: pkt.saddr_be,
        daddr_be: pkt.daddr_be,
        id_be: read(ctx, pkt.l3 + ip::ID).ok()?,
        proto: pkt.proto,
        _pad: 0,
    })
}

/// `pkt`'s tuple with both ports 0: the key of an address-only flow.
#[inline(always)]
fn portless_key(pkt: &Packet) -> FlowKey {
    FlowKey {
        saddr_be: pkt.saddr_be,
        daddr_be: pkt.daddr_be,
        sport_be: 0,
        dport_be: 0,
        proto: pkt.proto,
        _pad0: 0,
        _pad1: 0,
    }
}

/// If `pkt` is the first of several fragments, records that the rest of
/// its datagram translates to `addr_be` on `uplink`. Costs other packets
/// one bit test.
#[inline(always)]
pub fn note_first(ctx: &TcContext, pkt: &Packet, addr_be: u32, uplink: u8) {
    if pkt.frag_be & IP_MF_BE == 0 {
        return;
    }
    if let Some(k) = key(ctx, pkt) {
        let x = FragXlat {
            addr_be,
            uplink,
            _pad0: 0,
            _pad1: 0,
        };
        let _ = FRAGS.insert(k, x, 0);
    }
}

/// The NAT address and uplink of a later fragment from the LAN.
#[inline(always)]
pub fn outbound(ctx: &TcContext, pkt: &Packet) -> Option<(u32, u8)> {
    if let Some(k) = key(ctx, pkt)
        && let Some(x) = frag_of(&k)
    {
        return Some((x.addr_be, x.uplink));
    }
    let f = conntrack::lookup_fwd(&portless_key(pkt))?;
    // SAFETY: a copy of the map value.
    let f = unsafe { *f };
    Some((f.nat_addr_be, f.uplink))
}

/// The LAN host and uplink of a later fragment from an uplink.
#[inline(always)]
pub fn inbound(ctx: &TcContext, pkt: &Packet) -> Option<(u32, u8)> {
    if let Some(k) = key(ctx, pkt)
        && let Some(x) = frag_of(&k)
    {
        return Some((x.addr_be, x.uplink));
    }
    if let Some(r) = conntrack::lookup_rev(&portless_key(pkt)) {
        // SAFETY: a copy of the map value.
        let r = unsafe { *r };
        return Some((r.lan_addr_be, r.uplink));
    }
    if pkt.proto != IPPROTO_UDP {
        return None;
    }
    let lan = peer_of(pkt.saddr_be, pkt.daddr_be)?;
    // The uplink only feeds the counters: the one whose address it is.
    let uplink = crate::select::uplink_with_addr(pkt.daddr_be).map_or(0, |(id, _)| id);
    (lan != 0).then_some((lan, uplink))
}

/// Notes a new UDP flow of `lan_addr_be` to `pkt`'s destination through
/// `nat_addr_be`; a second host makes the pair ambiguous (0). A repeat
/// costs one lookup and no write.
#[inline(always)]
pub fn note_peer(pkt: &Packet, nat_addr_be: u32, lan_addr_be: u32) {
    if pkt.proto != IPPROTO_UDP {
        return;
    }
    let v = match peer_of(pkt.daddr_be, nat_addr_be) {
        None => lan_addr_be,
        Some(v) if v == lan_addr_be || v == 0 => return,
        Some(_) => 0,
    };
    set_peer(pkt.daddr_be, nat_addr_be, v);
}

/// The gateway itself sends UDP from one of its addresses: early reply
/// fragments between that remote and address may be its own, so they are
/// no longer given to a LAN host.
#[inline(always)]
pub fn note_host(pkt: &Packet) {
    if pkt.proto != IPPROTO_UDP {
        return;
    }
    // The reply direction: remote -> the gateway's address.
    if let Some(v) = peer_of(pkt.daddr_be, pkt.saddr_be)
        && v != 0
    {
        set_peer(pkt.daddr_be, pkt.saddr_be, 0);
    }
}
