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
use multihome_common::{FlowKey, IPPROTO_TCP, IPPROTO_UDP};

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
