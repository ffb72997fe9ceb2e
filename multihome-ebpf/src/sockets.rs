//! The gateway's own sockets, which share the uplink addresses and port
//! space with the NAT.
use aya_ebpf::{
    bindings::{
        BPF_F_CURRENT_NETNS, bpf_sock_tuple, bpf_sock_tuple__bindgen_ty_1,
        bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1 as Ipv4Tuple,
    },
    helpers::{bpf_sk_lookup_udp, bpf_sk_release, bpf_skc_lookup_tcp},
    programs::TcContext,
};
use multihome_common::{
    ECHO_HANDOVER_NS, ECHO_OUTSTANDING, EchoKey, FlowFwd, FlowKey, FlowRev, HOST_ECHO_NS,
    IPPROTO_TCP, IPPROTO_UDP,
};

use crate::{
    conntrack::{echo_seq, now_ns},
    maps::{ECHO_HANDOVER, EchoHandover, HOST_ECHO},
    parse::Packet,
};

/// True when a socket of the gateway (listening, connected or in
/// TIME_WAIT) would receive packets of `reply`, a flow's reverse key:
/// that address and port are taken by the host, not free for the NAT.
#[inline(always)]
pub fn owned_by_host(ctx: &TcContext, reply: &FlowKey) -> bool {
    let mut tuple = bpf_sock_tuple {
        __bindgen_anon_1: bpf_sock_tuple__bindgen_ty_1 {
            ipv4: Ipv4Tuple {
                saddr: reply.saddr_be,
                daddr: reply.daddr_be,
                sport: reply.sport_be,
                dport: reply.dport_be,
            },
        },
    };
    let size = size_of::<Ipv4Tuple>() as u32;
    let netns = BPF_F_CURRENT_NETNS as i64 as u64;
    let skb = ctx.skb.skb as *mut _;
    // SAFETY: `tuple` lives on the stack for the call and its size is passed;
    // a socket found is released before returning.
    unsafe {
        let sk = match reply.proto {
            IPPROTO_TCP => bpf_skc_lookup_tcp(skb, &mut tuple, size, netns, 0),
            IPPROTO_UDP => bpf_sk_lookup_udp(skb, &mut tuple, size, netns, 0),
            _ => return false,
        };
        if sk.is_null() {
            return false;
        }
        bpf_sk_release(sk as *mut _);
    }
    true
}

/// The `HOST_ECHO` and `ECHO_HANDOVER` key of echo messages between the
/// gateway and `daddr_be` with identifier `id_be`.
#[inline(always)]
fn echo_key(daddr_be: u32, id_be: u16) -> EchoKey {
    EchoKey {
        daddr_be,
        id_be,
        _pad: 0,
    }
}

/// No helper finds ping or raw sockets, and Linux ping sockets may use any
/// identifier, so the gateway's own echo requests are recorded as they
/// leave: true while `(daddr_be, id_be)` is one of them.
#[inline(always)]
pub fn echo_owned_by_host(daddr_be: u32, id_be: u16) -> bool {
    let key = echo_key(daddr_be, id_be);
    // SAFETY: a copy of the map value.
    match HOST_ECHO.get_ptr(key).map(|p| unsafe { *p }) {
        Some(at) => now_ns().saturating_sub(at) < HOST_ECHO_NS,
        None => false,
    }
}

/// Records an echo request the gateway sends to `daddr_be` with `id_be`.
#[inline(always)]
pub fn note_host_echo(daddr_be: u32, id_be: u16) {
    let key = echo_key(daddr_be, id_be);
    let _ = HOST_ECHO.insert(key, now_ns(), 0);
}

/// The gateway took identifier `id_be` towards `daddr_be` from a LAN echo
/// flow (`rev`, `fwd`): if that flow's last request is still unanswered,
/// its reply is kept for the LAN host ([`handed_back`]).
#[inline(always)]
pub fn hand_over(daddr_be: u32, id_be: u16, rev: &FlowRev, fwd: Option<FlowFwd>) {
    let Some(f) = fwd else {
        return;
    };
    if f.snd_max & ECHO_OUTSTANDING == 0 {
        return;
    }
    let key = echo_key(daddr_be, id_be);
    let h = EchoHandover {
        lan_addr_be: rev.lan_addr_be,
        lan_id_be: rev.lan_port_be,
        seq_be: f.snd_max as u16,
        at_ns: now_ns(),
        uplink: u32::from(rev.uplink),
        _pad: 0,
    };
    let _ = ECHO_HANDOVER.insert(key, h, 0);
}

/// For an echo reply to an identifier the gateway took: the LAN host, its
/// identifier and uplink, when the reply answers the request that host
/// still waited for when the gateway took it over (within
/// [`ECHO_HANDOVER_NS`]); once. The rest is the gateway's.
#[inline(always)]
pub fn handed_back(ctx: &TcContext, pkt: &Packet) -> Option<(u32, u16, u8)> {
    let key = echo_key(pkt.saddr_be, pkt.dport_be);
    // SAFETY: a read of the map value.
    let h = unsafe { &*ECHO_HANDOVER.get_ptr(key)? };
    let (lan, seq_be, at) = (
        (h.lan_addr_be, h.lan_id_be, h.uplink as u8),
        h.seq_be,
        h.at_ns,
    );
    if echo_seq(ctx, pkt)? != seq_be || now_ns().saturating_sub(at) > ECHO_HANDOVER_NS {
        return None;
    }
    let _ = ECHO_HANDOVER.remove(key);
    Some(lan)
}
