//! IPv6 through the uplinks: a LAN host's new connection is pinned to an
//! uplink in `CONN6` and handed to the kernel with that uplink's mark; the
//! uplink's egress program maps its source onto the uplink's prefix
//! (NPTv6, RFC 6296). Replies are mapped back on the uplink's ingress and
//! pass only for existing flows (RFC 6092 simple security). ICMPv6 errors
//! are mapped outer address and quoted address alike; both rewrites keep
//! every checksum, so none is touched.
use aya_ebpf::{
    bindings::BPF_NOEXIST, helpers::bpf_redirect, maps::lpm_trie::Key, programs::TcContext,
};
use multihome_common::{
    Allow6Key, BALANCE_CONNECTION, FLOW_SEEN_REPLY, Flow6, Flow6Key, IPPROTO_TCP, IPPROTO_UDP,
    LAST_RESORT_UNREACHABLE, MARK_PROHIBIT, MARK_TRANSLATED, MAX_UPLINKS, MODE6_NAT66,
    ON_DOWN_KEEP, ON_DOWN_PURGE_UDP, RULE_MAIN, RULE_UNREACHABLE, Reason, UPLINK_CONFIGURED,
    UPLINK_L3, UPLINK_LINK_DOWN, UPLINK_OUTAGE, UPLINK_USABLE, Uplink, Uplink6, flow_hash,
    select_slot, uplink6_slot,
};

use crate::{
    classify,
    conntrack::{self, now_ns},
    fwd, guard,
    maps::{ALLOW6, CONN6, NEXT_HOPS6, SCRATCH6, SELECT, UPLINKS},
    nat66,
    nptv6::{self, Way},
    outbound::{FLOW_CLOSED, ingress_ifindex, on_down, settings},
    parse::{
        self, ETH_HLEN, FRAG6_LATER, FRAG6_NONE, ICMPV6_ECHO_REPLY, ICMPV6_ECHO_REQUEST,
        IPPROTO_ICMPV6, L4, Packet6, TCP_ACK, TCP_SYN, hi, ip6, load, put,
    },
    quota, select, stats,
    verdict::{Outcome, Verdict},
};

/// Offset of a quoted packet in an ICMPv6 error (RFC 4443 §2.1).
const QUOTED: usize = 8;

/// `skb->pkt_type` of a frame addressed to this host.
const PACKET_HOST: u32 = 0;

/// `mh_lan_in` for IPv6: pins a LAN host's connection to an uplink and
/// hands it to the kernel with the uplink's mark. Packets from outside the
/// internal prefix, to it or to an uplink's prefix, and anything not
/// unicast to the internet pass untouched (the egress guard still sees
/// them).
#[inline(always)]
pub fn lan_ingress(ctx: &TcContext, l3: usize) -> Outcome {
    let pkt = parse::parse_ipv6(ctx, l3)?;
    // SAFETY: the context pointer is valid for the program's run.
    if unsafe { (*ctx.skb.skb).pkt_type } != PACKET_HOST || pkt.daddr[0] & 0xe0 != 0x20 {
        // Not 2000::/3: link-local, ULA, multicast (NDP, MLD) stay here.
        return Err(Reason::NotUnicast);
    }
    // Which internal prefix: its entry is the same `k` on every uplink.
    let Some((_, _, inner)) = nptv6::covering(&pkt.saddr, true) else {
        return Err(if guard::routed6(&pkt.saddr) != 0 {
            Reason::RoutedSource
        } else {
            Reason::SpoofedSource
        });
    };
    let k = u32::from(inner.k);
    if nptv6::covering(&pkt.daddr, false).is_some() {
        // To one of the uplinks' own prefixes: no hairpin for IPv6.
        return Err(Reason::NotForUplink);
    }
    if pkt.frag != FRAG6_NONE {
        return Err(Reason::Fragment6);
    }
    if pkt.l4_kind == L4::IcmpError {
        return mark(ctx, lan_error(ctx, &pkt)?);
    }
    let key = lan_key(&pkt);
    let (id, pinned_before) = match CONN6.get_ptr_mut(key) {
        Some(f) if keeps(&key, f, pkt.tcp_flags) => {
            // SAFETY: `f` points into the map's preallocated value; a race
            // with another CPU loses a stamp or a flag, never the flow.
            let f = unsafe { &mut *f };
            let flags = conntrack::tcp_flags_out(f.flags, pkt.tcp_flags);
            if flags != f.flags {
                f.flags = flags;
            }
            conntrack::stamp(&mut f.last_seen_ns);
            (f.uplink, true)
        }
        // An echo reply answers a request `allow_inbound6` let in; it
        // never opens a flow.
        _ if pkt.l4_kind == L4::EchoReply => return Err(Reason::UnsupportedProto),
        _ => (new_flow(ctx, &key, &pkt)?, false),
    };
    mark(ctx, id)?;
    // A flow's first packet takes the kernel's path, which resolves the
    // next hop for the ones after it.
    if !pinned_before {
        return Ok(Verdict::Pass);
    }
    let out = forward(ctx, l3, &pkt, uplink6_slot(u32::from(id), k), Way::Out);
    if let Ok(Verdict::Pass) = out {
        stats::slow_path(id);
    }
    out
}

/// The flow of a packet from a LAN host, by its LAN-side tuple.
#[inline(always)]
pub fn lan_key(pkt: &Packet6) -> Flow6Key {
    Flow6Key::between(
        (pkt.saddr, pkt.sport_be),
        (pkt.daddr, pkt.dport_be),
        pkt.proto,
    )
}

/// The fast path of an IPv6 packet of a flow mapped by the entry at
/// `slot` (its uplink's, for the host's internal prefix), `way` out of
/// or into the LAN: when `bpf_fib_lookup` resolves the next hop (in the
/// uplink's table out, through the rules in), the address is mapped, the
/// hop limit decremented (IPv6 has no header checksum) and the packet
/// redirected. Otherwise it passes to the kernel as it is: with the
/// uplink's mark out (`mh_wan_out6` maps it), mapped in. A hop limit of 1,
/// an L3 uplink, an unresolved neighbour or an oversize packet all take
/// the kernel's path, which answers what needs answering.
#[inline(never)]
fn forward(ctx: &TcContext, l3: usize, pkt: &Packet6, slot: u32, way: Way) -> Outcome {
    let id = (slot % MAX_UPLINKS) as u8;
    let addr = match way {
        Way::Out => &pkt.saddr,
        Way::In => &pkt.daddr,
    };
    let (Some(uplink), Some(u6)) = (UPLINKS.get(id as u32), nptv6::npt_at(slot)) else {
        return Ok(Verdict::Pass);
    };
    // Only between Ethernet devices (an L3 uplink's frames have no header
    // to rewrite), which also makes every offset below a constant.
    if pkt.hop_limit <= 1 || uplink.flags & UPLINK_L3 != 0 || l3 != ETH_HLEN {
        return Ok(Verdict::Pass);
    }
    let len = pkt.payload_len.saturating_add(ip6::LEN as u16);
    let table = match way {
        Way::Out => uplink.table,
        Way::In => 0,
    };
    let Ok(mapped) = nptv6::map(addr, u6, way) else {
        return Ok(Verdict::Pass);
    };
    let ends = match way {
        Way::Out => (&mapped, &pkt.daddr),
        Way::In => (&pkt.saddr, &mapped),
    };
    // The cached next hop (the uplink's out, the LAN host's in), else the
    // lookup, in the uplink's table out, through the rules in.
    let mut mac = [0u8; 12];
    let cached_ifindex = match way {
        Way::Out => match cached(ctx, id, uplink, len) {
            Some((i, m)) => {
                mac = m;
                i
            }
            None => 0,
        },
        Way::In => fwd::lan_cached6(ctx, &mapped, len, &mut mac),
    };
    let ifindex = match cached_ifindex {
        0 => {
            let what = u64::from(table) << 32 | u64::from(pkt.proto) << 16 | u64::from(len);
            fwd::lookup6(ctx, ends.0, ends.1, what, &mut mac)
        }
        i => i,
    };
    if ifindex == 0 {
        return Ok(Verdict::Pass);
    }
    if way == Way::Out && ifindex != uplink.ifindex {
        return Ok(Verdict::Pass);
    }
    match way {
        Way::Out => put(ctx, ETH_HLEN + ip6::SADDR, mapped)?,
        Way::In => put(ctx, ETH_HLEN + ip6::DADDR, mapped)?,
    }
    put(ctx, ETH_HLEN + ip6::NEXT_HOP + 1, pkt.hop_limit - 1)?;
    put(ctx, 0, mac)?;
    if way == Way::Out {
        // Tells the uplink's egress programs that this one is done.
        ctx.set_mark(uplink.mark | MARK_TRANSLATED);
        stats::tx(id, ctx.len());
    } else {
        stats::rx(id, ctx.len());
    }
    // SAFETY: plain helper call.
    let ret = unsafe { bpf_redirect(ifindex, 0) };
    Ok(Verdict::Redirect(ret as i32))
}

/// The uplink of the flow a LAN host's ICMPv6 error is about.
#[inline(never)]
fn lan_error(ctx: &TcContext, pkt: &Packet6) -> Result<u8, Reason> {
    let (key, _) = quoted_key(ctx, pkt.l4, Way::Out)?;
    pinned(key).ok_or(Reason::IcmpNoMapping)
}

/// The uplink flow `key` is pinned to.
#[inline(always)]
fn pinned(key: &Flow6Key) -> Option<u8> {
    // SAFETY: a read of the map value.
    CONN6.get_ptr(key).map(|f| unsafe { (*f).uplink })
}

/// Marks the packet for uplink `id`'s table; its egress program maps it.
#[inline(always)]
fn mark(ctx: &TcContext, id: u8) -> Outcome {
    let uplink = UPLINKS.get(id as u32).ok_or(Reason::NoUplink)?;
    ctx.set_mark(uplink.mark);
    Ok(Verdict::Pass)
}

/// Whether the pinned flow `f` holds for this LAN packet: it goes when a
/// SYN opens a new connection on a closed flow's tuple, or when its uplink
/// has been down long enough and its `on_down` moves it. IPv6 flows lose
/// no mapping by moving (NPTv6 keeps the host's address in its suffix),
/// so `reset` moves them too: the remote answers the new source with an
/// RST.
#[inline(always)]
fn keeps(key: &Flow6Key, f: *mut Flow6, tcp: u8) -> bool {
    // SAFETY: a read of the map value.
    let (flags, uplink, policy) = unsafe { ((*f).flags, (*f).uplink, (*f).policy) };
    let reopened = flags & FLOW_CLOSED != 0 && tcp & (TCP_SYN | TCP_ACK) == TCP_SYN;
    let moved = UPLINKS.get(uplink as u32).is_some_and(|u| {
        u.flags & UPLINK_OUTAGE != 0
            && match on_down(u.flags, policy) {
                ON_DOWN_KEEP => false,
                ON_DOWN_PURGE_UDP => key.proto != IPPROTO_TCP,
                _ => true,
            }
    });
    if reopened || moved {
        let _ = CONN6.remove(key);
        if moved {
            stats::count(Reason::Evacuated);
        }
        return false;
    }
    true
}

/// Chooses an uplink for a new connection by the first rule that names
/// no address (rules' prefixes are IPv4) and its policy, and pins it. A
/// refusal goes to the kernel with the mark its `prohibit` rule answers.
/// A subprogram of its own, so that its frame is not added to the
/// parser's.
#[inline(never)]
fn new_flow(ctx: &TcContext, key: &Flow6Key, pkt: &Packet6) -> Result<u8, Reason> {
    let settings = settings()?;
    // Before any lookup, so that a flood of new flows costs little.
    quota::admit6(&key.lan, &settings)?;
    let refuse = || {
        ctx.set_mark(settings.mark_base | MARK_PROHIBIT);
        Reason::PolicyRefused
    };
    let action = classify::decide6(
        pkt.proto,
        u16::from_be(pkt.dport_be),
        pkt.dscp,
        settings.rules,
    );
    if action & RULE_UNREACHABLE != 0 {
        return Err(refuse());
    }
    if action & RULE_MAIN != 0 {
        return Err(Reason::PolicyMain);
    }
    let policy = action & 0xff;
    let id = match choose(key, settings.flow_hash_seed, policy) {
        Err(Reason::PolicyRefused) => return Err(refuse()),
        chosen => chosen?,
    };
    // Under NAT66 the port is reserved by the uplink's egress program,
    // whose stack has room for it.
    let flow = fresh(id, conntrack::tcp_flags_out(0, pkt.tcp_flags), policy as u8);
    CONN6
        .insert(key, flow, BPF_NOEXIST as u64)
        .map_err(|_| Reason::MapFull)?;
    quota::count_new6(&key.lan);
    stats::new_flow(id);
    Ok(id)
}

/// A new flow's entry, made now: on uplink `id` with `flags`, placed by
/// `policy`.
#[inline(always)]
fn fresh(id: u8, flags: u32, policy: u8) -> Flow6 {
    let now = now_ns();
    Flow6 {
        last_seen_ns: now,
        flags,
        uplink: id,
        policy,
        nat_port_be: 0,
        created_s: (now / 1_000_000_000) as u32,
        _pad1: 0,
    }
}

/// The uplink for a new IPv6 connection under `policy`: its table's
/// slot for the flow's hash if that uplink is usable and carries IPv6,
/// else the first such uplink, else the first with its link up (unless
/// the policy's `last_resort` refuses). The sticky balance modes hash
/// what they stick by (NPTv6 keeps no per-host state to stick with): the
/// source under `source`, source and the destination's /64 under `site`,
/// the internal endpoint under `endpoint`, both addresses under `hash`.
#[inline(always)]
fn choose(key: &Flow6Key, seed: u32, policy: u32) -> Result<u8, Reason> {
    let table = SELECT.get(policy).or_else(|| SELECT.get(0));
    let balance = table.map_or(BALANCE_CONNECTION, |t| t.balance);
    let slot = select_slot(flow_hash(&key.fold(balance), seed));
    if let Some(t) = table {
        if t.usable == 0 && t.last_resort == LAST_RESORT_UNREACHABLE {
            return Err(Reason::PolicyRefused);
        }
        if t.usable != 0
            && let Some(id) = t.now.get(slot)
            && let Some(u) = UPLINKS.get(*id as u32)
            && carries(*id as u32, u, UPLINK_USABLE)
        {
            return Ok(*id);
        }
    }
    for id in 0..MAX_UPLINKS {
        if let Some(u) = UPLINKS.get(id)
            && carries(id, u, UPLINK_USABLE)
        {
            return Ok(id as u8);
        }
    }
    for id in 0..MAX_UPLINKS {
        if let Some(u) = UPLINKS.get(id)
            && u.flags & UPLINK_LINK_DOWN == 0
            && carries(id, u, UPLINK_CONFIGURED)
        {
            return Ok(id as u8);
        }
    }
    Err(Reason::NoUplink)
}

/// Uplink `id` has all of `flags` and an IPv6 prefix.
#[inline(always)]
fn carries(id: u32, u: &Uplink, flags: u16) -> bool {
    u.flags & flags == flags && nptv6::translation(id).is_some()
}

/// Fills `key` with the flow an ICMPv6 error's quoted packet belongs to
/// and returns the quoted packet's offset. `Way::Out`: a LAN host's error
/// about a packet from the remote (quoted source: the remote); `Way::In`:
/// a remote's error about a LAN host's packet, whose quoted source is
/// still on the uplink's prefix and is mapped back here. The key lives
/// in `SCRATCH6`, this CPU's slot, for the rest of this run.
#[inline(always)]
fn quoted_key(ctx: &TcContext, l4: usize, way: Way) -> Result<(&'static Flow6Key, usize), Reason> {
    let key = SCRATCH6.get_ptr_mut(0).ok_or(Reason::NoMapping)?;
    // SAFETY: this CPU's slot, which only this run uses until it ends.
    let key = unsafe { &mut *key };
    key._pad0 = 0;
    key._pad1 = 0;
    let q = l4 + QUOTED;
    key.proto = hi(load::<u16>(ctx, q + ip6::NEXT_HOP)?);
    let (lan, remote) = match way {
        Way::In => (ip6::SADDR, ip6::DADDR),
        Way::Out => (ip6::DADDR, ip6::SADDR),
    };
    key.lan = load(ctx, q + lan)?;
    key.remote = load(ctx, q + remote)?;
    let l4 = q + ip6::LEN;
    let (a, b): (u16, u16) = if key.proto == IPPROTO_ICMPV6 {
        let kind = hi(load::<u16>(ctx, l4)?);
        let id: u16 = load(ctx, l4 + 4)?;
        match kind {
            ICMPV6_ECHO_REQUEST if way == Way::In => (id, 0),
            ICMPV6_ECHO_REPLY if way == Way::Out => (0, id),
            _ => return Err(Reason::IcmpNoMapping),
        }
    } else {
        (load(ctx, l4)?, load(ctx, l4 + 2)?)
    };
    // Source port first in the quoted packet.
    (key.lan_port_be, key.remote_port_be) = match way {
        Way::In => (a, b),
        Way::Out => (b, a),
    };
    if way == Way::In {
        let (_, _, u6) = nptv6::covering(&key.lan, false).ok_or(Reason::IcmpNoMapping)?;
        key.lan = nptv6::map(&key.lan, u6, Way::In)?;
    }
    Ok((key, q))
}

/// `mh_wan_in` for IPv6: a packet to one of the uplinks' prefixes is
/// mapped back to the internal prefix if it belongs to a flow pinned to
/// that uplink, and dropped otherwise. Everything else (the gateway's own
/// traffic, NDP, RAs, DHCPv6) passes untouched.
#[inline(always)]
pub fn wan_ingress(ctx: &TcContext, l3: usize) -> Outcome {
    let pkt = parse::parse_ipv6(ctx, l3)?;
    let (id, _, u6) = nptv6::covering(&pkt.daddr, false).ok_or(Reason::NoMapping)?;
    if u6.mode == MODE6_NAT66 {
        // Each from here: their frames are never added up.
        return match pkt.l4_kind {
            L4::IcmpError => nat66::error(ctx, l3, &pkt, id),
            _ => nat66::ingress(ctx, l3, &pkt, id),
        };
    }
    if pkt.frag == FRAG6_LATER {
        // Its first fragment carried the ports and was checked.
        nptv6::rewrite(ctx, l3 + ip6::DADDR, id, Way::In)?;
        stats::count(Reason::FragmentTranslated);
        return Ok(Verdict::Pass);
    }
    if pkt.l4_kind == L4::IcmpError {
        return wan_error(ctx, l3, &pkt, id);
    }
    wan_reply(&pkt, id, u6)?;
    // From an Ethernet uplink (`l3` past the header), the fast path.
    if l3 != 0
        && let Ok(Verdict::Redirect(r)) = forward(
            ctx,
            l3,
            &pkt,
            uplink6_slot(u32::from(id), u32::from(u6.k)),
            Way::In,
        )
    {
        return Ok(Verdict::Redirect(r));
    }
    nptv6::rewrite(ctx, l3 + ip6::DADDR, id, Way::In)?;
    stats::rx(id, ctx.len());
    stats::slow_path(id);
    Ok(Verdict::Pass)
}

/// Whether a packet from outside belongs to a flow of uplink `id` (or
/// one `allow_inbound6` admits), whose state it updates; `u6` maps its
/// destination. A subprogram of its own, as the error path is, so that
/// their frames are never added up.
#[inline(never)]
fn wan_reply(pkt: &Packet6, id: u8, u6: &Uplink6) -> Outcome {
    let key = Flow6Key::between(
        (nptv6::map(&pkt.daddr, u6, Way::In)?, pkt.dport_be),
        (pkt.saddr, pkt.sport_be),
        pkt.proto,
    );
    let f = match CONN6.get_ptr_mut(key) {
        Some(f) => f,
        None => admit(&key, id)?,
    };
    // SAFETY: as in `lan_ingress`.
    let f = unsafe { &mut *f };
    if f.uplink != id {
        return Err(Reason::Unsolicited);
    }
    let flags = conntrack::tcp_flags_in(f.flags, pkt.tcp_flags) | FLOW_SEEN_REPLY;
    if flags != f.flags {
        f.flags = flags;
    }
    conntrack::stamp(&mut f.last_seen_ns);
    Ok(Verdict::Pass)
}

/// Uplink `id`'s IPv6 next hop from `NEXT_HOPS6`, when it serves a packet
/// of `len` bytes: valid, on the uplink's device, within its MTU, not GSO
/// (whose segments the lookup checks).
#[inline(always)]
fn cached(ctx: &TcContext, id: u8, uplink: &Uplink, len: u16) -> Option<(u32, [u8; 12])> {
    let h = NEXT_HOPS6.get(u32::from(id))?;
    // SAFETY: the context pointer is valid for the program's run.
    let gso = unsafe { (*ctx.skb.skb).gso_size } != 0;
    (h.valid != 0 && h.ifindex == uplink.ifindex && !gso && u32::from(len) <= h.mtu)
        .then_some((h.ifindex, h.mac))
}

/// An ICMPv6 error from outside about a flow of uplink `id`: its outer
/// destination and quoted source mapped back.
#[inline(never)]
fn wan_error(ctx: &TcContext, l3: usize, pkt: &Packet6, id: u8) -> Outcome {
    let (key, q) = quoted_key(ctx, pkt.l4, Way::In)?;
    if pinned(key) != Some(id) {
        return Err(Reason::Unsolicited);
    }
    nptv6::rewrite(ctx, q + ip6::SADDR, id, Way::In)?;
    nptv6::rewrite(ctx, l3 + ip6::DADDR, id, Way::In)?;
    stats::rx(id, ctx.len());
    Ok(Verdict::Pass)
}

/// An unsolicited connection from outside to LAN host `key.lan`: pinned
/// to uplink `id`, which it came in by, if `allow_inbound6` admits it
/// (its address and any port, or its TCP/UDP port), dropped otherwise
/// (RFC 6092 simple security).
#[inline(never)]
fn admit(key: &Flow6Key, id: u8) -> Result<*mut Flow6, Reason> {
    let allowed = |sel: u32| {
        let k = Key {
            prefix_len: 32 + 128,
            data: Allow6Key {
                sel_be: sel.to_be(),
                addr: key.lan,
            },
        };
        ALLOW6.get(&k).is_some()
    };
    let port = key.proto == IPPROTO_TCP || key.proto == IPPROTO_UDP;
    let sel = u32::from(key.proto) << 16 | u32::from(u16::from_be(key.lan_port_be));
    if !allowed(0) && !(port && allowed(sel)) {
        return Err(Reason::Unsolicited);
    }
    CONN6
        .insert(key, fresh(id, FLOW_SEEN_REPLY, 0), BPF_NOEXIST as u64)
        .map_err(|_| Reason::MapFull)?;
    stats::count(Reason::InboundAllowed);
    stats::new_flow(id);
    CONN6.get_ptr_mut(key).ok_or(Reason::MapFull)
}

/// `mh_wan_out6`: an IPv6 packet leaving an uplink, forwarded or the
/// gateway's own.
#[inline(always)]
pub fn uplink_egress<const L2: bool>(ctx: &TcContext) -> Outcome {
    let l3 = parse::ipv6_offset::<L2>(ctx).ok_or(Reason::NotIpv4)?;
    if ingress_ifindex(ctx) == 0 {
        return host_egress(ctx, l3);
    }
    // SAFETY: the context pointer is valid for the program's run.
    let mark = unsafe { (*ctx.skb.skb).mark };
    wan_egress(ctx, l3, mark, settings()?.mark_base)
}

/// A forwarded IPv6 packet leaving an uplink: one that the LAN program
/// marked for this uplink gets its source (and, in an ICMPv6 error, the
/// quoted destination) mapped onto the uplink's prefix. Everything else
/// meets the egress guard.
#[inline(always)]
fn wan_egress(ctx: &TcContext, l3: usize, mark: u32, mark_base: u32) -> Outcome {
    // SAFETY: the context pointer is valid for the program's run.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    if let Some((id, uplink)) = select::from_mark(mark, mark_base)
        && uplink.ifindex == ifindex
        && let Some(u6) = nptv6::translation(id as u32)
    {
        if u6.mode == MODE6_NAT66 {
            let mapped = if nat66::is_error(ctx, l3) {
                nat66::error_out(ctx, l3, id, u6, false)
            } else {
                nat66::egress(ctx, l3, id, u6)
            };
            if let Ok(v) = mapped {
                return Ok(v);
            }
        } else if nptv6::rewrite(ctx, l3 + ip6::SADDR, id, Way::Out)? {
            map_quoted(ctx, l3, id)?;
            stats::tx(id, ctx.len());
            return Ok(Verdict::Pass);
        }
    }
    guard::egress6(ctx, l3)
}

/// The gateway's own IPv6 packet: an ICMPv6 error it sends about a
/// translated packet quotes the LAN host's internal address, which is
/// mapped onto this uplink's prefix (under NAT66: its address, and the
/// port the flow holds).
#[inline(always)]
fn host_egress(ctx: &TcContext, l3: usize) -> Outcome {
    // SAFETY: the context pointer is valid for the program's run.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    for id in 0..MAX_UPLINKS {
        if let Some(u) = UPLINKS.get(id)
            && u.ifindex == ifindex
            && let Some(u6) = nptv6::translation(id)
        {
            if u6.mode != MODE6_NAT66 {
                map_quoted(ctx, l3, id as u8)?;
            } else if nat66::is_error(ctx, l3) {
                // One about no NAT66 flow passes as it is.
                let _ = nat66::error_out(ctx, l3, id as u8, u6, true);
            }
            break;
        }
    }
    Ok(Verdict::Pass)
}

/// In an ICMPv6 error at `l3` without extension headers, maps the quoted
/// destination onto uplink `id`'s prefix if it is internal.
#[inline(always)]
fn map_quoted(ctx: &TcContext, l3: usize, id: u8) -> Result<(), Reason> {
    if hi(load::<u16>(ctx, l3 + ip6::NEXT_HOP)?) != IPPROTO_ICMPV6 {
        return Ok(());
    }
    let kind = hi(load::<u16>(ctx, l3 + ip6::LEN)?);
    if (parse::ICMPV6_DEST_UNREACH..=parse::ICMPV6_PARAM_PROB).contains(&kind) {
        nptv6::rewrite(ctx, l3 + ip6::LEN + QUOTED + ip6::DADDR, id, Way::Out)?;
    }
    Ok(())
}
