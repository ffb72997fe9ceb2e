//! Fragments (RFC 791): only a datagram's first fragment carries the L4
//! header, so the translation of the rest is recorded from it in `FRAGS`,
//! keyed by (source, destination, protocol, IP id) as the later fragments
//! show them. Protocols translated by address only need no record: their
//! flow key has no ports. Reply fragments that arrive before their first
//! (RFC 4787 REQ-14) are matched through `PEERS` when a single LAN host
//! has UDP flows between that remote and NAT address (recorded as flows
//! are made, so that a datagram's reply can be its first).
use aya_ebpf::programs::TcContext;
use multihome_common::{FlowKey, FragKey, FragXlat, IPPROTO_UDP, PeerLan};

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

#[inline(always)]
fn peer_of(k: &FlowKey) -> Option<PeerLan> {
    // SAFETY: a copy of the map value.
    PEERS.get_ptr(k).map(|p| unsafe { *p })
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
    let peer = portless_key(pkt);
    if let Some(r) = conntrack::lookup_rev(&peer) {
        // SAFETY: a copy of the map value.
        let r = unsafe { *r };
        return Some((r.lan_addr_be, r.uplink));
    }
    if pkt.proto != IPPROTO_UDP {
        return None;
    }
    let lan = peer_of(&peer)?;
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
    let k = FlowKey {
        saddr_be: pkt.daddr_be,
        daddr_be: nat_addr_be,
        ..portless_key(pkt)
    };
    let v = match peer_of(&k) {
        None => lan_addr_be,
        Some(v) if v == lan_addr_be || v == 0 => return,
        Some(_) => 0,
    };
    let _ = PEERS.insert(k, v, 0);
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
    let k = FlowKey {
        saddr_be: pkt.daddr_be,
        daddr_be: pkt.saddr_be,
        ..portless_key(pkt)
    };
    if let Some(v) = peer_of(&k)
        && v != 0
    {
        let _ = PEERS.insert(k, 0, 0);
    }
}
