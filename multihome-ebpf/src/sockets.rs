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
use multihome_common::{EchoKey, FlowKey, HOST_ECHO_NS, IPPROTO_TCP, IPPROTO_UDP};

use crate::{conntrack::now_ns, maps::HOST_ECHO};

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

/// No helper finds ping or raw sockets, and Linux ping sockets may use any
/// identifier, so the gateway's own echo requests are recorded as they
/// leave: true while `(daddr_be, id_be)` is one of them.
#[inline(always)]
pub fn echo_owned_by_host(daddr_be: u32, id_be: u16) -> bool {
    let key = EchoKey {
        daddr_be,
        id_be,
        _pad: 0,
    };
    // SAFETY: a copy of the map value.
    match HOST_ECHO.get_ptr(key).map(|p| unsafe { *p }) {
        Some(at) => now_ns().saturating_sub(at) < HOST_ECHO_NS,
        None => false,
    }
}

/// Records an echo request the gateway sends to `daddr_be` with `id_be`.
#[inline(always)]
pub fn note_host_echo(daddr_be: u32, id_be: u16) {
    let key = EchoKey {
        daddr_be,
        id_be,
        _pad: 0,
    };
    let _ = HOST_ECHO.insert(key, now_ns(), 0);
}
