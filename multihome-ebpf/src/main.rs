//! multihome's TC programs. Each entry point only runs its pipeline and
//! turns the outcome into a TC action:
//!
//! - `mh_lan_in` (LAN ingress): pin new flows to an uplink, SNAT, forward;
//! - `mh_lan_reset` (by tail call from `mh_lan_in`): answer a TCP segment
//!   of a flow whose uplink went down with an RST;
//! - `mh_wan_in` (uplink ingress): reverse-translate replies and ICMP errors;
//! - `mh_wan_out` (uplink egress): SNAT what the fast path left to the
//!   kernel; drop the gateway's own packets that clash with a NAT flow.
//!
//! The `_l3` variants serve uplinks without an Ethernet header (ppp, tun).
//! Every packet that is not IPv4 goes on by tail call to the program's
//! IPv6 half (`mh_lan_in6`, `mh_wan_in6`, `mh_wan_out6`, and their `_l3`
//! variants; `ipv6.rs`): pinned per connection, translated by NPTv6 on
//! the uplink's egress and ingress.
//!
//! And its XDP programs, which run first where the daemon attaches them:
//!
//! - `mh_xdp_lan` (LAN) and `mh_xdp_wan` (uplinks): packets of pinned TCP
//!   and UDP flows, translated and redirected; the rest passes to TC.
#![no_std]
#![no_main]
// The atomic add of quota.rs: BPF has no atomics in Rust's `core`.
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod affinity;
mod classify;
mod conntrack;
mod csum;
mod frag;
mod fwd;
mod guard;
mod hairpin;
mod icmp;
mod inbound;
mod ipv6;
mod maps;
mod mss;
mod nat;
mod nat66;
mod nptv6;
mod outbound;
mod parse;
mod quota;
mod reset;
mod select;
mod sockets;
mod stats;
mod verdict;
mod xdp;
mod xdp6;

use aya_ebpf::{
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};

use crate::verdict::{tc_action, tc_action6};

// Left to itself the compiler keeps this body out of line: a call and
// return per packet (test_run.rs keeps every entry's body its own).
#[classifier]
#[inline(always)]
pub fn mh_lan_in(ctx: TcContext) -> i32 {
    tc_action(outbound::lan_ingress(&ctx))
}

#[classifier]
pub fn mh_lan_reset(ctx: TcContext) -> i32 {
    tc_action(outbound::lan_reset(&ctx))
}

#[classifier]
pub fn mh_wan_in(ctx: TcContext) -> i32 {
    tc_action(inbound::wan_ingress::<true>(&ctx))
}

#[classifier]
pub fn mh_wan_in_l3(ctx: TcContext) -> i32 {
    tc_action(inbound::wan_ingress::<false>(&ctx))
}

#[classifier]
pub fn mh_wan_out(ctx: TcContext) -> i32 {
    tc_action(outbound::wan_egress::<true>(&ctx))
}

#[classifier]
pub fn mh_wan_out_l3(ctx: TcContext) -> i32 {
    tc_action(outbound::wan_egress::<false>(&ctx))
}

#[classifier]
pub fn mh_lan_in6(ctx: TcContext) -> i32 {
    tc_action6(outbound::ipv6::<true>(&ctx, ipv6::lan_ingress))
}

#[classifier]
pub fn mh_wan_in6(ctx: TcContext) -> i32 {
    tc_action6(outbound::ipv6::<true>(&ctx, ipv6::wan_ingress))
}

#[classifier]
pub fn mh_wan_in6_l3(ctx: TcContext) -> i32 {
    tc_action6(outbound::ipv6::<false>(&ctx, ipv6::wan_ingress))
}

#[classifier]
pub fn mh_wan_out6(ctx: TcContext) -> i32 {
    tc_action6(ipv6::uplink_egress::<true>(&ctx))
}

#[classifier]
pub fn mh_wan_out6_l3(ctx: TcContext) -> i32 {
    tc_action6(ipv6::uplink_egress::<false>(&ctx))
}

#[xdp]
pub fn mh_xdp_lan(ctx: XdpContext) -> u32 {
    xdp::lan_ingress(&ctx)
}

#[xdp]
pub fn mh_xdp_wan(ctx: XdpContext) -> u32 {
    xdp::wan_ingress(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
