//! The connection map: forward and reverse entries kept as a pair, port
//! allocation, TCP state from SYN/FIN/RST, and the last-seen stamp.
use core::ffi::c_void;

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_get_prandom_u32, bpf_jiffies64, bpf_ktime_get_coarse_ns, bpf_loop},
    programs::TcContext,
};
use multihome_common::{
    ECHO_OUTSTANDING, FLOW_FIN_IN, FLOW_FIN_OUT, FLOW_HAIRPIN, FLOW_RST, FLOW_RST_IN,
    FLOW_SEEN_REPLY, FlowFwd, FlowKey, FlowRev, RULES_RESERVE, Reason, Settings, Uplink,
};

use crate::{
    affinity,
    maps::{CLOCK_TICK, CONN_FWD, CONN_REV},
    parse::{Frame, L4, Packet, TCP_FIN, TCP_RST, TCP_SYN, hi, read},
    sockets,
};

/// Random ports tried before giving up on a new flow.
const PORT_TRIES: u32 = 32;
/// The last-seen stamp is refreshed at most this often, to keep the cache
/// line quiet on busy flows.
const TOUCH_NS: u64 = 1_000_000_000;

const EEXIST: i32 = 17;

/// `multihome_common::CLOCK` now, ns. The coarse clock only moves at a
/// tick, so it is read once per jiffy and CPU (`bpf_ktime_get_coarse_ns`
/// is a helper call; `bpf_jiffies64` is inlined by the verifier to a load).
/// A packet between the jiffies update and the clock's
/// (`tick_do_update_jiffies64`) keeps the last tick's time for that jiffy:
/// at most two ticks behind, as against one. So one CPU's now may trail a
/// stamp another CPU just made: every elapsed time is a `saturating_sub`,
/// and a stamp ahead of now counts as just now.
#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: no preconditions.
    let jiffies = unsafe { bpf_jiffies64() };
    let Some(tick) = CLOCK_TICK.get_ptr_mut(0) else {
        // SAFETY: no preconditions.
        return unsafe { bpf_ktime_get_coarse_ns() };
    };
    // SAFETY: this CPU's slot; a program runs on one CPU to its end.
    let tick = unsafe { &mut *tick };
    if tick.jiffies != jiffies {
        // SAFETY: no preconditions.
        tick.ns = unsafe { bpf_ktime_get_coarse_ns() };
        tick.jiffies = jiffies;
    }
    tick.ns
}

/// The forward key of a LAN packet.
#[inline(always)]
pub fn lan_key(pkt: &Packet) -> FlowKey {
    FlowKey {
        saddr_be: pkt.saddr_be,
        daddr_be: pkt.daddr_be,
        sport_be: pkt.sport_be,
        dport_be: pkt.dport_be,
        proto: pkt.proto,
        _pad0: 0,
        _pad1: 0,
    }
}

/// The reverse key of a packet arriving on an uplink.
#[inline(always)]
pub fn wan_key(pkt: &Packet) -> FlowKey {
    lan_key(pkt)
}

#[inline(always)]
pub fn lookup_fwd(key: &FlowKey) -> Option<*mut FlowFwd> {
    CONN_FWD.get_ptr_mut(key)
}

#[inline(always)]
pub fn lookup_rev(key: &FlowKey) -> Option<*const FlowRev> {
    CONN_REV.get_ptr(key)
}

/// What a new flow records besides its mapping.
#[derive(Clone, Copy)]
pub struct Tags {
    /// `FLOW_*` flags besides the TCP state.
    pub flags: u32,
    /// The policy that placed it.
    pub policy: u8,
    /// Its first `snd_max`: an echo request's ([`echo_sent`]), else 0.
    pub snd_max: u32,
}

/// Whether a new flow's port search must skip ports that endpoint
/// records hold: while an endpoint policy exists.
#[inline(always)]
fn respect_reservations(settings: &Settings) -> bool {
    settings.rules & RULES_RESERVE != 0
}

/// Pins a new LAN flow to `uplink`: reserves a reverse entry on a free NAT
/// port (one no endpoint record holds, with [`respect_reservations`]),
/// then the forward entry, with its `tags`. Both are inserted with
/// `BPF_NOEXIST`, and the reverse one is rolled back if the forward one
/// fails.
#[inline(always)]
pub fn create(
    ctx: &TcContext,
    key: &FlowKey,
    pkt: &Packet,
    (uplink_id, uplink): (u8, &Uplink),
    settings: &Settings,
    tags: Tags,
) -> Result<FlowFwd, Reason> {
    let search = Search {
        nat_addr_be: uplink.addr_be,
        uplink: uplink_id,
        respect: respect_reservations(settings),
    };
    let nat_port_be = reserve_port(ctx, key, pkt, settings, search)?;
    pin_fwd(key, pkt, uplink_id, uplink.addr_be, nat_port_be, tags)
}

/// Where [`reserve_port`] looks, and for whom.
#[derive(Clone, Copy)]
struct Search {
    nat_addr_be: u32,
    uplink: u8,
    respect: bool,
}

/// [`create`] for a protocol translated by address only: the reverse key
/// (remote, uplink address, protocol) is the whole mapping, so the flow
/// fails with [`Reason::AddrTaken`] while another LAN host holds it.
#[inline(always)]
pub fn create_portless(
    key: &FlowKey,
    pkt: &Packet,
    uplink_id: u8,
    uplink: &Uplink,
    tags: Tags,
) -> Result<FlowFwd, Reason> {
    match create_exact(key, pkt, uplink_id, uplink.addr_be, 0, tags) {
        Err(Reason::PortExhausted) => Err(Reason::AddrTaken),
        created => created,
    }
}

#[inline(always)]
fn rev_entry(key: &FlowKey, uplink_id: u8) -> FlowRev {
    FlowRev {
        lan_addr_be: key.saddr_be,
        lan_port_be: key.sport_be,
        uplink: uplink_id,
        _pad: 0,
    }
}

/// Pins the flow `key` to exactly `nat_addr_be:nat_port_be` with `flags`
/// (a hairpin's return flow, which must keep its host's public mapping),
/// or fails when that reverse key is taken.
#[inline(always)]
pub fn create_exact(
    key: &FlowKey,
    pkt: &Packet,
    uplink_id: u8,
    nat_addr_be: u32,
    nat_port_be: u16,
    tags: Tags,
) -> Result<FlowFwd, Reason> {
    if !try_port(key, nat_addr_be, nat_port_be, &rev_entry(key, uplink_id))? {
        return Err(Reason::PortExhausted);
    }
    pin_fwd(key, pkt, uplink_id, nat_addr_be, nat_port_be, tags)
}

/// Inserts the forward entry, with `flags` besides its TCP state, once its
/// reverse one is reserved.
#[inline(always)]
fn pin_fwd(
    key: &FlowKey,
    pkt: &Packet,
    uplink_id: u8,
    nat_addr_be: u32,
    nat_port_be: u16,
    tags: Tags,
) -> Result<FlowFwd, Reason> {
    let now = now_ns();
    let fwd = FlowFwd {
        last_seen_ns: now,
        nat_addr_be,
        flags: tcp_flags_out(tags.flags, pkt.tcp_flags()),
        nat_port_be,
        uplink: uplink_id,
        policy: tags.policy,
        created_s: (now / 1_000_000_000) as u32,
        snd_max: tags.snd_max,
        _pad: 0,
    };
    match CONN_FWD.insert(key, fwd, BPF_NOEXIST as u64) {
        Ok(()) => Ok(fwd),
        Err(e) => {
            let _ = CONN_REV.remove(key.reply(nat_addr_be, nat_port_be));
            if e == -EEXIST {
                // Another CPU pinned the same flow first: use its entry.
                // SAFETY: the value is read once, by copy.
                return lookup_fwd(key)
                    .map(|p| unsafe { *p })
                    .ok_or(Reason::MapFull);
            }
            Err(Reason::MapFull)
        }
    }
}

/// Finds a NAT port free for (uplink address, remote, remote port) and
/// reserves it with the reverse entry. The LAN port is kept when it is
/// free (DESIGN.md §3), as Linux NAT does, unless a socket of the gateway
/// owns it; an echo identifier only outside the gateway's ephemeral range.
#[inline(always)]
fn reserve_port(
    ctx: &TcContext,
    key: &FlowKey,
    pkt: &Packet,
    settings: &Settings,
    search: Search,
) -> Result<u16, Reason> {
    let nat_addr_be = search.nat_addr_be;
    let lan_port = u16::from_be(key.sport_be);
    let echo = !pkt.has_pseudo_header();
    let keep = lan_port != 0
        && if echo {
            (lan_port < settings.local_port_min || lan_port > settings.local_port_max)
                && !sockets::echo_owned_by_host(key.daddr_be, key.sport_be)
        } else {
            !sockets::owned_by_host(ctx, &key.reply(nat_addr_be, key.sport_be))
        };
    // The common case, inline: the LAN port kept, with no reservations to
    // respect (those are checked in the search's callback only, whose
    // frame the LAN program's stack can hold).
    if keep && !search.respect {
        let rev = rev_entry(key, search.uplink);
        match try_port(key, nat_addr_be, key.sport_be, &rev) {
            Ok(true) => return Ok(key.sport_be),
            Ok(false) => {}
            Err(r) => return Err(r),
        }
    }
    let min = settings.snat_port_min as u32;
    let span = (settings.snat_port_max as u32).saturating_sub(min) + 1;
    let mut search = PortSearch {
        key: *key,
        search,
        min: min as u16,
        span,
        // SAFETY: no preconditions.
        start: (unsafe { bpf_get_prandom_u32() } % span) as u16,
        keep_be: if keep && search.respect {
            key.sport_be
        } else {
            0
        },
        echo,
        port_be: 0,
        outcome: SEARCHING,
    };
    // bpf_loop: the verifier checks the try once, not once per try and
    // path into it, which keeps `mh_lan_in` far from its budget and its
    // stack small (the kept LAN port is the first try when reservations
    // count).
    // SAFETY: the callback's context is `search`, alive for the call.
    unsafe {
        bpf_loop(
            PORT_TRIES + 1,
            try_next_port as *mut c_void,
            &mut search as *mut PortSearch as *mut c_void,
            0,
        )
    };
    // The outcome is rebuilt from constants: the verifier keeps no bounds
    // on what the callback wrote.
    match search.outcome {
        FOUND => Ok(search.port_be),
        MAP_FULL => Err(Reason::MapFull),
        _ => Err(Reason::PortExhausted),
    }
}

const SEARCHING: u8 = 0;
const FOUND: u8 = 1;
const MAP_FULL: u8 = 2;

/// The state of [`reserve_port`]'s search.
struct PortSearch {
    key: FlowKey,
    search: Search,
    span: u32,
    min: u16,
    start: u16,
    /// The LAN port, tried first; 0: not kept, or tried already.
    keep_be: u16,
    echo: bool,
    port_be: u16,
    outcome: u8,
}

/// One try of [`reserve_port`], the kept LAN port first, then random
/// ones: 0 to go on, 1 to stop.
extern "C" fn try_next_port(i: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `bpf_loop` passes `reserve_port`'s `PortSearch`.
    let s = unsafe { &mut *(ctx as *mut PortSearch) };
    let port_be = if i == 0 {
        if s.keep_be == 0 {
            return 0;
        }
        s.keep_be
    } else {
        let Some(off) = u32::from(s.start)
            .wrapping_add(i as u32)
            .checked_rem(s.span)
        else {
            return 1;
        };
        ((u32::from(s.min) + off) as u16).to_be()
    };
    if s.echo && sockets::echo_owned_by_host(s.key.daddr_be, port_be) {
        return 0;
    }
    match try_mapping(&s.key, s.search, port_be) {
        Ok(false) => 0,
        Ok(true) => {
            s.port_be = port_be;
            s.outcome = FOUND;
            1
        }
        Err(_) => {
            s.outcome = MAP_FULL;
            1
        }
    }
}

/// [`try_port`] for a port the search found; one an endpoint record
/// holds is taken, unless it is the flow's own endpoint's.
#[inline(always)]
fn try_mapping(key: &FlowKey, s: Search, port_be: u16) -> Result<bool, Reason> {
    if s.respect
        && affinity::reserved_for_other(key, &affinity::mapping(s.nat_addr_be, port_be, key.proto))
    {
        return Ok(false);
    }
    try_port(key, s.nat_addr_be, port_be, &rev_entry(key, s.uplink))
}

/// Ok(true): reserved. Ok(false): taken.
#[inline(always)]
fn try_port(key: &FlowKey, nat_addr_be: u32, port_be: u16, rev: &FlowRev) -> Result<bool, Reason> {
    let rev_key = key.reply(nat_addr_be, port_be);
    match CONN_REV.insert(rev_key, rev, BPF_NOEXIST as u64) {
        Ok(()) => Ok(true),
        Err(e) if e == -EEXIST => Ok(false),
        Err(_) => Err(Reason::MapFull),
    }
}

/// A remote's RST that a later packet of its flow, either way, shows
/// closed nothing is disarmed and counted.
#[inline(always)]
fn disarm_rst(flags: u32, tcp: u8) -> u32 {
    if flags & FLOW_RST_IN != 0 && tcp & TCP_RST == 0 {
        crate::stats::count(Reason::RstIgnored);
        return flags & !FLOW_RST_IN;
    }
    flags
}

#[inline(always)]
pub fn tcp_flags_out(flags: u32, tcp: u8) -> u32 {
    let mut f = disarm_rst(flags, tcp);
    if tcp & TCP_SYN != 0 && f & (FLOW_RST | FLOW_RST_IN | FLOW_FIN_OUT | FLOW_FIN_IN) != 0 {
        // A new connection reusing a closed hairpin flow's tuple starts
        // over and stays a hairpin (other closed flows are made anew:
        // `outbound::fate`).
        f &= FLOW_HAIRPIN;
    }
    if tcp & TCP_FIN != 0 {
        f |= FLOW_FIN_OUT;
    }
    if tcp & TCP_RST != 0 {
        f |= FLOW_RST;
    }
    f
}

#[inline(always)]
pub fn tcp_flags_in(flags: u32, tcp: u8) -> u32 {
    let mut f = disarm_rst(flags, tcp) | FLOW_SEEN_REPLY;
    if tcp & TCP_FIN != 0 {
        f |= FLOW_FIN_IN;
    }
    if tcp & TCP_RST != 0 {
        // Only armed: the endpoint, which knows the window, decides.
        f |= FLOW_RST_IN;
    }
    f
}

/// Records a LAN packet of an existing flow. Once a second it also checks
/// that the reverse half still exists and puts it back if not.
#[inline(always)]
pub fn touch_out(ctx: &impl Frame, key: &FlowKey, fwd: *mut FlowFwd, pkt: &Packet) {
    // SAFETY: `fwd` points into the map's preallocated value; races with
    // other CPUs only lose a stamp or a flag bit, never a flow.
    let f = unsafe { &mut *fwd };
    let tcp = pkt.tcp_flags();
    let flags = tcp_flags_out(f.flags, tcp);
    if flags != f.flags {
        f.flags = flags;
    }
    if tcp & TCP_SYN != 0 && flags & FLOW_SEEN_REPLY == 0 {
        crate::stats::syn_retry(f.uplink);
    }
    // A hairpin flow never leaves by its uplink: it says nothing of it.
    if pkt.l4_kind == L4::Tcp && flags & FLOW_HAIRPIN == 0 {
        track_data(ctx, f, pkt);
    }
    if pkt.l4_kind == L4::EchoRequest {
        echo_sent(ctx, f, pkt);
    }
    let now = now_ns();
    if now.saturating_sub(f.last_seen_ns) > TOUCH_NS {
        f.last_seen_ns = now;
        let rev_key = key.reply(f.nat_addr_be, f.nat_port_be);
        if lookup_rev(&rev_key).is_none() {
            crate::stats::count(Reason::HalfPair);
            let rev = FlowRev {
                lan_addr_be: key.saddr_be,
                lan_port_be: key.sport_be,
                uplink: f.uplink,
                _pad: 0,
            };
            let _ = CONN_REV.insert(rev_key, rev, BPF_NOEXIST as u64);
        }
    }
}

/// Passive health: follows the highest data byte a LAN host sent on a TCP
/// flow ([`FlowFwd::snd_max`]), and counts a data segment that carries
/// nothing beyond it as a retransmission. Segments of under two bytes
/// (pure ACKs, keepalives, window probes) are left out.
#[inline(always)]
fn track_data(ctx: &impl Frame, f: &mut FlowFwd, pkt: &Packet) {
    let (Ok(seq_be), Ok(off)) = (read::<u32>(ctx, pkt.l4 + 4), read::<u16>(ctx, pkt.l4 + 12))
    else {
        return;
    };
    let headers = pkt.l4 - pkt.l3 + usize::from(hi(off) >> 4) * 4;
    let len = (pkt.tot_len as usize).saturating_sub(headers) as u32;
    if len < 2 {
        return;
    }
    let end = u32::from_be(seq_be).wrapping_add(len);
    if f.snd_max != 0 && end.wrapping_sub(f.snd_max) as i32 <= 0 {
        crate::stats::retransmit(f.uplink, pkt.daddr_be);
    } else {
        f.snd_max = end;
    }
}

/// Records a reply of an existing flow. For its first reply, returns the
/// time since the flow was made (or since its last LAN packet, when that
/// came more than a second later: a retried SYN), in ns.
#[inline(always)]
pub fn touch_in(fwd: *mut FlowFwd, pkt: &Packet) -> Option<u64> {
    // SAFETY: as in `touch_out`.
    let f = unsafe { &mut *fwd };
    let flags = tcp_flags_in(f.flags, pkt.tcp_flags());
    let first = f.flags & FLOW_SEEN_REPLY == 0;
    if flags != f.flags {
        f.flags = flags;
    }
    let since = stamp(&mut f.last_seen_ns);
    first.then_some(since)
}

/// Refreshes a flow's last-seen stamp `at` to now when it is older than
/// [`TOUCH_NS`]; returns the time since it, in ns.
#[inline(always)]
pub fn stamp(at: &mut u64) -> u64 {
    let now = now_ns();
    let since = now.saturating_sub(*at);
    if since > TOUCH_NS {
        *at = now;
    }
    since
}

/// Removes the flow `key`, pinned to `nat_addr_be:nat_port_be`, both
/// halves.
#[inline(always)]
pub fn remove_pair(key: &FlowKey, nat_addr_be: u32, nat_port_be: u16) {
    let _ = CONN_FWD.remove(key);
    let _ = CONN_REV.remove(key.reply(nat_addr_be, nat_port_be));
}

/// Removes the flow whose reverse key is `rev_key`, both halves; returns
/// its reverse entry and, if it was there, its forward one.
#[inline(always)]
pub fn remove_by_reply(rev_key: &FlowKey) -> Option<(FlowRev, Option<FlowFwd>)> {
    // SAFETY: a copy of the map value.
    let rev = unsafe { *lookup_rev(rev_key)? };
    let fwd_key = rev_key.forward(&rev);
    // SAFETY: a copy of the map value.
    let fwd = lookup_fwd(&fwd_key).map(|f| unsafe { *f });
    let _ = CONN_FWD.remove(fwd_key);
    let _ = CONN_REV.remove(rev_key);
    Some((rev, fwd))
}

/// Offset of an ICMP echo's sequence number in its header (RFC 792).
const ECHO_SEQ: usize = 6;

/// An echo message's sequence number, as in the packet.
#[inline(always)]
pub fn echo_seq(ctx: &impl Frame, pkt: &Packet) -> Option<u16> {
    read::<u16>(ctx, pkt.l4 + ECHO_SEQ).ok()
}

/// A LAN host's echo request on flow `f`: it waits for its reply.
#[inline(always)]
pub fn echo_sent(ctx: &impl Frame, f: &mut FlowFwd, pkt: &Packet) {
    if let Some(waiting) = echo_waiting(ctx, pkt) {
        f.snd_max = waiting;
    }
}

/// The `snd_max` of an echo request's flow: its number, waiting for the
/// reply ([`ECHO_OUTSTANDING`]).
#[inline(always)]
pub fn echo_waiting(ctx: &impl Frame, pkt: &Packet) -> Option<u32> {
    echo_seq(ctx, pkt).map(|seq| u32::from(seq) | ECHO_OUTSTANDING)
}

/// An echo reply on flow `f` on its way to the LAN host: the request it
/// answers no longer waits.
#[inline(always)]
pub fn echo_answered(ctx: &impl Frame, f: &mut FlowFwd, pkt: &Packet) {
    if let Some(seq) = echo_seq(ctx, pkt)
        && f.snd_max == u32::from(seq) | ECHO_OUTSTANDING
    {
        f.snd_max = u32::from(seq);
    }
}

/// Removes a reverse entry whose forward half is gone.
#[inline(always)]
pub fn drop_orphan(rev_key: &FlowKey) {
    let _ = CONN_REV.remove(rev_key);
    crate::stats::count(Reason::HalfPair);
}

/// Removes a reverse entry whose forward half has another mapping.
#[inline(always)]
pub fn drop_stale(rev_key: &FlowKey) {
    let _ = CONN_REV.remove(rev_key);
}
