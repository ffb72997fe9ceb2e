//! Forwarding: `bpf_fib_lookup` in the right table, then a redirect; or a
//! reason to hand the packet to the kernel.
use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
        BPF_FIB_LOOKUP_DIRECT, BPF_FIB_LOOKUP_SKIP_NEIGH, BPF_FIB_LOOKUP_TBID, TC_ACT_SHOT,
        bpf_fib_lookup as FibParams, bpf_redir_neigh,
    },
    helpers::{
        bpf_check_mtu, bpf_fib_lookup, bpf_redirect, bpf_redirect_neigh, bpf_skb_change_head,
    },
    programs::TcContext,
};
use core::mem::MaybeUninit;

use multihome_common::{NextHop, Reason, Uplink};

use crate::{
    maps::{LAN_HOPS, LAN_HOPS6, NEXT_HOPS},
    parse::{ETH_HLEN, ETH_P_IP_BE, Packet, write},
    verdict::{Outcome, Verdict},
};

pub const AF_INET: u8 = 2;
pub const AF_INET6: u8 = 10;
/// `BPF_MTU_CHK_SEGS` (uapi `bpf.h`): check a GSO packet's segments.
const MTU_CHK_SEGS: u64 = 1;

/// Zeroes `params`, a `bpf_fib_lookup` request on the stack.
#[inline(always)]
pub fn zeroed(params: &mut MaybeUninit<FibParams>) -> &mut FibParams {
    // SAFETY: the words cover the struct (its size is a multiple of 4, its
    // alignment 4); all-zero is a valid request skeleton.
    unsafe {
        let words = params.as_mut_ptr() as *mut u32;
        for i in 0..size_of::<FibParams>() / 4 {
            // Volatile: a plain zeroing becomes a call to a byte-loop memset.
            words.add(i).write_volatile(0);
        }
        params.assume_init_mut()
    }
}

/// A resolved next hop.
pub struct Hop {
    pub ifindex: u32,
    /// The next hop's address (the gateway, or the destination on-link).
    pub nh_be: u32,
    /// The neighbour is known and `mac` holds destination then source.
    pub resolved: bool,
    pub mac: [u8; 12],
}

/// The kernel would not forward it: no route, local, too big, ...
pub struct NoHop;

/// Where the kernel would forward this packet from `src_be` to `dst_be`:
/// in `table`, or through the policy rules with `None`. `forward`: the
/// hop is to forward with, so an oversized packet is a `FRAG_NEEDED` miss
/// and the neighbour is looked up; without it the route is only being
/// classified: no MTU check, and no neighbour (`BPF_FIB_LOOKUP_SKIP_NEIGH`,
/// so `resolved` is false).
#[inline(always)]
pub fn lookup(
    ctx: &TcContext,
    pkt: &Packet,
    src_be: u32,
    dst_be: u32,
    table: Option<u32>,
    forward: bool,
) -> Result<Hop, NoHop> {
    let mut params = MaybeUninit::<FibParams>::uninit();
    let p = zeroed(&mut params);
    p.family = AF_INET;
    p.l4_protocol = pkt.proto;
    // SAFETY: the context pointer is valid for the program's run.
    let gso = unsafe { (*ctx.skb.skb).gso_size } != 0;
    // A GSO packet's IP length is the whole super-packet: with tot_len 0
    // the lookup checks nothing, so its segments are checked below.
    p.__bindgen_anon_1.tot_len = if forward && !gso { pkt.tot_len } else { 0 };
    p.__bindgen_anon_3.ipv4_src = src_be;
    p.__bindgen_anon_4.ipv4_dst = dst_be;
    // SAFETY: the context pointer is valid for the program's run.
    p.ifindex = unsafe { (*ctx.skb.skb).ingress_ifindex };
    let mut flags = if forward {
        0
    } else {
        BPF_FIB_LOOKUP_SKIP_NEIGH
    };
    if let Some(t) = table {
        p.__bindgen_anon_5.tbid = t;
        flags |= BPF_FIB_LOOKUP_DIRECT | BPF_FIB_LOOKUP_TBID;
    }
    let ret = fib(ctx, p, flags);
    // Without tot_len, the kernel still checks the skb against the MTU
    // after a complete lookup; a route that is only being classified is
    // found all the same.
    let classified = !forward && ret == BPF_FIB_LKUP_RET_FRAG_NEEDED;
    if ret != BPF_FIB_LKUP_RET_SUCCESS && ret != BPF_FIB_LKUP_RET_NO_NEIGH && !classified {
        return Err(NoHop);
    }
    if forward && gso && !segments_fit(ctx, p.ifindex) {
        return Err(NoHop);
    }
    let mac = macs(p);
    Ok(Hop {
        ifindex: p.ifindex,
        // SAFETY: the union holds the IPv4 next hop after an IPv4 lookup.
        nh_be: unsafe { p.__bindgen_anon_4.ipv4_dst },
        resolved: forward && ret == BPF_FIB_LKUP_RET_SUCCESS,
        mac,
    })
}

/// An IPv6 address as the four words `bpf_fib_lookup` takes, in network
/// order.
#[inline(always)]
fn words(a: &[u8; 16]) -> [u32; 4] {
    let w = |i: usize| u32::from_ne_bytes([a[i], a[i + 1], a[i + 2], a[i + 3]]);
    [w(0), w(4), w(8), w(12)]
}

/// [`lookup`] for IPv6 when forwarding: the device of the next hop from
/// `src` to `dst` (0: the kernel must forward it: no route, local, too
/// big, a neighbour to resolve), its Ethernet addresses (destination then
/// source) written to `mac`. `what`: the table (bits 32-63; 0: through the
/// policy rules), the L4 protocol (bits 16-23) and the packet's length
/// (bits 0-15), packed so that this subprogram takes five arguments; its
/// lookup parameters stay out of its caller's frame.
#[inline(never)]
pub fn lookup6(
    ctx: &TcContext,
    src: &[u8; 16],
    dst: &[u8; 16],
    what: u64,
    mac: &mut [u8; 12],
) -> u32 {
    let (table, proto, len) = ((what >> 32) as u32, (what >> 16) as u8, what as u16);
    let mut params = MaybeUninit::<FibParams>::uninit();
    let p = zeroed(&mut params);
    p.family = AF_INET6;
    p.l4_protocol = proto;
    // SAFETY: the context pointer is valid for the program's run.
    let gso = unsafe { (*ctx.skb.skb).gso_size } != 0;
    p.__bindgen_anon_1.tot_len = if gso { 0 } else { len };
    p.__bindgen_anon_3.ipv6_src = words(src);
    p.__bindgen_anon_4.ipv6_dst = words(dst);
    // SAFETY: the context pointer is valid for the program's run.
    p.ifindex = unsafe { (*ctx.skb.skb).ingress_ifindex };
    let mut flags = 0;
    if table != 0 {
        p.__bindgen_anon_5.tbid = table;
        flags = BPF_FIB_LOOKUP_DIRECT | BPF_FIB_LOOKUP_TBID;
    }
    if fib(ctx, p, flags) != BPF_FIB_LKUP_RET_SUCCESS || gso && !segments_fit(ctx, p.ifindex) {
        return 0;
    }
    *mac = macs(p);
    p.ifindex
}

/// `bpf_fib_lookup` of `p` with `flags`: its `BPF_FIB_LKUP_RET_*`.
#[inline(always)]
fn fib(ctx: &TcContext, p: &mut FibParams, flags: u32) -> u32 {
    // SAFETY: `p` lives on the stack for the call and its size is passed.
    unsafe {
        bpf_fib_lookup(
            ctx.skb.skb as *mut _,
            p as *mut FibParams,
            size_of::<FibParams>() as i32,
            flags,
        ) as u32
    }
}

/// Whether a GSO packet's segments fit device `ifindex`'s MTU. The lookup
/// lets every GSO packet through (`is_skb_forwardable`), so a too-big one
/// would be dropped under a live connection; it goes to the kernel,
/// which segments it or answers "fragmentation needed".
#[inline(always)]
fn segments_fit(ctx: &TcContext, ifindex: u32) -> bool {
    let mut mtu = 0u32;
    // SAFETY: `mtu` lives on the stack for the call.
    unsafe { bpf_check_mtu(ctx.skb.skb as *mut _, ifindex, &mut mtu, 0, MTU_CHK_SEGS) == 0 }
}

/// The lookup's Ethernet addresses, destination then source.
#[inline(always)]
fn macs(p: &FibParams) -> [u8; 12] {
    let mut mac = [0u8; 12];
    mac[..6].copy_from_slice(&p.dmac);
    mac[6..].copy_from_slice(&p.smac);
    mac
}

/// Uplink `id`'s next hop from `NEXT_HOPS`, when the daemon has it and
/// it serves this packet: the entry is valid and on the uplink's device,
/// and the packet is not GSO (its segments are checked in the lookup) and
/// fits the device's MTU (else the lookup answers "fragmentation
/// needed"). None: take [`lookup`].
#[inline(always)]
pub fn cached(ctx: &TcContext, pkt: &Packet, id: u8, uplink: &Uplink) -> Option<Hop> {
    let h = NEXT_HOPS.get(u32::from(id))?;
    // SAFETY: the context pointer is valid for the program's run.
    let gso = unsafe { (*ctx.skb.skb).gso_size } != 0;
    if h.valid == 0 || h.ifindex != uplink.ifindex || gso || u32::from(pkt.tot_len) > h.mtu {
        return None;
    }
    Some(Hop {
        ifindex: h.ifindex,
        nh_be: uplink.gateway_be,
        resolved: true,
        mac: h.mac,
    })
}

/// LAN host `addr_be`'s next hop from `LAN_HOPS`, when the daemon has it
/// and it serves a packet of `tot_len` bytes (as [`cached`]). None: take
/// [`lookup`].
#[inline(always)]
pub fn lan_cached(ctx: &TcContext, addr_be: u32, tot_len: u16) -> Option<Hop> {
    // SAFETY: a copy of the map value.
    let h = LAN_HOPS.get_ptr(addr_be).map(|h| unsafe { *h })?;
    let (ifindex, mac) = serves(ctx, &h, tot_len)?;
    Some(Hop {
        ifindex,
        nh_be: addr_be,
        resolved: true,
        mac,
    })
}

/// [`lan_cached`] for IPv6 LAN host `addr`: its device (0: none that
/// serves), its MACs written to `mac`. A subprogram with an out-parameter,
/// so that the IPv6 fast path's frame stays small.
#[inline(never)]
pub fn lan_cached6(ctx: &TcContext, addr: &[u8; 16], len: u16, mac: &mut [u8; 12]) -> u32 {
    let Some(h) = LAN_HOPS6.get_ptr(addr) else {
        return 0;
    };
    // SAFETY: a copy of the map value.
    match serves(ctx, unsafe { &*h }, len) {
        Some((ifindex, m)) => {
            *mac = m;
            ifindex
        }
        None => 0,
    }
}

/// `h`'s device and MACs if it serves a packet of `len` bytes: valid, not
/// GSO (whose segments the lookup checks), within the device's MTU.
#[inline(always)]
fn serves(ctx: &TcContext, h: &NextHop, len: u16) -> Option<(u32, [u8; 12])> {
    // SAFETY: the context pointer is valid for the program's run.
    let gso = unsafe { (*ctx.skb.skb).gso_size } != 0;
    (h.valid != 0 && !gso && u32::from(len) <= h.mtu).then_some((h.ifindex, h.mac))
}

/// Sends the packet to `hop`. `l2_in`: the packet starts with an Ethernet
/// header; `l2_out`: the egress device wants one. A packet from an L3
/// device to an unresolved neighbour goes to the kernel, which resolves it.
#[inline(always)]
pub fn redirect(ctx: &TcContext, hop: &Hop, l2_in: bool, l2_out: bool) -> Outcome {
    let ret = if !l2_out {
        // The kernel strips our Ethernet header for an L3 device.
        // SAFETY: plain helper call.
        unsafe { bpf_redirect(hop.ifindex, 0) }
    } else if !l2_in {
        // From ppp/tun: redirect_neigh needs an Ethernet header to replace,
        // so build one from the neighbour (`lan_hop` made sure it is known).
        // SAFETY: plain helper call; packet pointers are re-derived below.
        if unsafe { bpf_skb_change_head(ctx.skb.skb, ETH_HLEN as u32, 0) } != 0 {
            return Err(Reason::RewriteFailed);
        }
        write(ctx, 0, hop.mac)?;
        write(ctx, 12, ETH_P_IP_BE)?;
        // SAFETY: plain helper call.
        unsafe { bpf_redirect(hop.ifindex, 0) }
    } else if hop.resolved {
        write(ctx, 0, hop.mac)?;
        // SAFETY: plain helper call.
        unsafe { bpf_redirect(hop.ifindex, 0) }
    } else {
        let mut nh = bpf_redir_neigh {
            nh_family: AF_INET as u32,
            __bindgen_anon_1: aya_ebpf::bindings::bpf_redir_neigh__bindgen_ty_1 {
                ipv4_nh: hop.nh_be,
            },
        };
        // SAFETY: `nh` lives on the stack for the call and its size is passed.
        unsafe { bpf_redirect_neigh(hop.ifindex, &mut nh, size_of::<bpf_redir_neigh>() as i32, 0) }
    };
    if ret == TC_ACT_SHOT as i64 {
        return Err(Reason::RewriteFailed);
    }
    Ok(Verdict::Redirect(ret as i32))
}
