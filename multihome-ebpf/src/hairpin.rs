//! Hairpinning (RFC 4787 REQ-9, RFC 5382 REQ-8): a LAN host that sends to
//! another LAN host's public mapping reaches it, seen from its own public
//! mapping, and the replies come back the same way.
//!
//! `EIM` finds the LAN endpoint behind a public mapping (written at a TCP
//! or UDP flow's first reply). When A sends to X:pB, two flows are pinned at once:
//! A's (A -> X:pB, translated to X:pA') and B's return flow (B -> X:pA',
//! translated to B's mapping X:pB). A hairpin packet's SNAT turns it into
//! exactly the reply tuple of the other flow, so its reverse entry names
//! the LAN host to deliver it to. From inside, hairpinned traffic is
//! accepted from any LAN host (endpoint-independent filtering).
use aya_ebpf::{bindings::BPF_ANY, programs::TcContext};
use multihome_common::{
    EimKey, EimLan, FLOW_HAIRPIN, FlowFwd, FlowKey, IPPROTO_TCP, IPPROTO_UDP, Reason, Settings,
    Uplink,
};

use crate::{
    conntrack, inbound,
    maps::EIM,
    nat::{self, Side},
    parse::Packet,
    quota, stats,
    verdict::Outcome,
};

/// Hairpin flows: under no policy.
const HAIRPIN: conntrack::Tags = conntrack::Tags {
    flags: FLOW_HAIRPIN,
    policy: 0,
    snd_max: 0,
};

#[inline(always)]
fn eim_key(nat_addr_be: u32, nat_port_be: u16, proto: u8) -> EimKey {
    EimKey {
        nat_addr_be,
        nat_port_be,
        proto,
        _pad: 0,
    }
}

/// Records a TCP or UDP flow's public mapping, from its first reply
/// (remote -> mapping): only a mapping that has been answered, as one a
/// STUN server told its host, is worth hairpinning to, and so floods and
/// scans of new flows never pay for the record.
#[inline(always)]
pub fn note_mapping(reply: &Packet, lan_addr_be: u32, lan_port_be: u16) {
    if reply.proto != IPPROTO_TCP && reply.proto != IPPROTO_UDP {
        return;
    }
    let lan = EimLan {
        lan_addr_be,
        lan_port_be,
        _pad: 0,
    };
    let _ = EIM.insert(
        eim_key(reply.daddr_be, reply.dport_be, reply.proto),
        lan,
        BPF_ANY as u64,
    );
}

/// A new flow to uplink `id`'s own address: pins it and the return flow
/// when the destination port is a LAN host's public mapping; otherwise it
/// is for the gateway itself (`not_for_uplink`).
#[inline(always)]
pub fn create(
    ctx: &TcContext,
    key: &FlowKey,
    pkt: &Packet,
    id: u8,
    uplink: &Uplink,
    settings: &Settings,
) -> Result<FlowFwd, Reason> {
    let eim = eim_key(key.daddr_be, key.dport_be, key.proto);
    // SAFETY: a copy of the map value.
    let Some(b) = EIM.get_ptr(eim).map(|p| unsafe { *p }) else {
        return Err(Reason::NotForUplink);
    };
    let a = conntrack::create(ctx, key, pkt, (id, uplink), settings, HAIRPIN)?;
    let back = FlowKey {
        saddr_be: b.lan_addr_be,
        daddr_be: key.daddr_be,
        sport_be: b.lan_port_be,
        dport_be: a.nat_port_be,
        proto: key.proto,
        _pad0: 0,
        _pad1: 0,
    };
    // Already there: an earlier hairpin between the same two mappings.
    if conntrack::lookup_fwd(&back).is_none() {
        conntrack::create_exact(&back, pkt, id, key.daddr_be, key.dport_be, HAIRPIN)?;
        quota::count_new(back.saddr_be, &quota::Host::of(back.saddr_be));
    }
    Ok(a)
}

/// A packet of a hairpin flow: its SNAT makes it the reply tuple of the
/// other LAN host's flow, whose reverse entry gives the destination; then
/// it goes back out to the LAN. Never sent to an uplink.
#[inline(always)]
pub fn deliver(ctx: &TcContext, pkt: &Packet, nat_addr_be: u32, nat_port_be: u16) -> Outcome {
    // The packet's own tuple after its SNAT.
    let reply = FlowKey {
        saddr_be: nat_addr_be,
        sport_be: nat_port_be,
        ..conntrack::lan_key(pkt)
    };
    let rev = conntrack::lookup_rev(&reply).ok_or(Reason::NoMapping)?;
    // SAFETY: a copy of the map value.
    let rev = unsafe { *rev };
    nat::rewrite(ctx, pkt, Side::Src, nat_addr_be, nat_port_be, false)?;
    let hop = inbound::lan_hop::<true>(ctx, pkt, rev.lan_addr_be);
    nat::rewrite(
        ctx,
        pkt,
        Side::Dst,
        rev.lan_addr_be,
        rev.lan_port_be,
        hop.is_some(),
    )?;
    stats::count(Reason::Hairpinned);
    inbound::deliver::<true>(ctx, hop)
}
