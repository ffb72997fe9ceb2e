//! The egress guard (BCP 38, RFC 2827): a forwarded packet leaves an
//! uplink only with that uplink's address as its source, or with one of
//! its `routed_prefixes`. Everything the translation stages could not
//! handle ends here, so nothing they miss leaks with a LAN source.
use aya_ebpf::{maps::lpm_trie::Key, programs::TcContext};
use multihome_common::{
    MAX_UPLINKS, Reason, Routed6Key, RoutedKey, RoutedUplinks, UPLINK_CONFIGURED,
};

use crate::{
    maps::{ROUTED, ROUTED6, UPLINKS},
    parse::{ip, read},
    verdict::{Outcome, Verdict},
};

/// The uplinks (a bit each) that may carry `saddr_be` untranslated.
#[inline(always)]
pub fn routed_uplinks(saddr_be: u32) -> RoutedUplinks {
    let key = Key {
        prefix_len: 32,
        data: RoutedKey { addr_be: saddr_be },
    };
    ROUTED.get(&key).copied().unwrap_or(0)
}

/// The uplinks (a bit each) on device `ifindex` (several may share one,
/// seed 4.2.5), and whether one of them has the address `saddr_be`.
#[inline(always)]
fn uplinks_on(ifindex: u32, saddr_be: u32) -> (RoutedUplinks, bool) {
    let mut here: RoutedUplinks = 0;
    for id in 0..MAX_UPLINKS {
        if let Some(u) = UPLINKS.get(id)
            && u.flags & UPLINK_CONFIGURED != 0
            && u.ifindex == ifindex
        {
            if u.addr_be == saddr_be && saddr_be != 0 {
                return (here, true);
            }
            here |= 1 << id;
        }
    }
    (here, false)
}

/// Whether a packet from `saddr_be` may leave device `ifindex`: the
/// address of an uplink on it, or a routed prefix of one of them.
#[inline(always)]
fn source_allowed(ifindex: u32, saddr_be: u32) -> bool {
    let (here, own) = uplinks_on(ifindex, saddr_be);
    own || here != 0 && routed_uplinks(saddr_be) & here != 0
}

/// Offset of the source address in the IPv6 header (RFC 8200 §3).
const IPV6_SADDR: usize = 8;

/// Passes the forwarded IPv6 packet at `l3` if one of this device's
/// uplinks routes its source (`ROUTED6`), drops it otherwise: what NPTv6
/// translated passed before the guard, so no other source is an uplink's.
#[inline(always)]
pub fn egress6(ctx: &TcContext, l3: usize) -> Outcome {
    // SAFETY: the context pointer is valid for the program's run.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let (here, _) = uplinks_on(ifindex, 0);
    match read::<[u8; 16]>(ctx, l3 + IPV6_SADDR) {
        Ok(addr) if here & routed6(&addr) != 0 => Ok(Verdict::Pass),
        _ => Err(Reason::ForeignSource),
    }
}

/// The uplinks (a bit each) that may carry IPv6 source `addr`
/// untranslated.
#[inline(always)]
pub fn routed6(addr: &[u8; 16]) -> RoutedUplinks {
    let key = Key {
        prefix_len: 128,
        data: Routed6Key { addr: *addr },
    };
    ROUTED6.get(&key).copied().unwrap_or(0)
}

/// Passes the IPv4 packet at `l3` if its source may leave this device,
/// drops it otherwise.
#[inline(always)]
pub fn egress(ctx: &TcContext, l3: usize) -> Outcome {
    // SAFETY: the context pointer is valid for the program's run.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    match read::<u32>(ctx, l3 + ip::SADDR) {
        Ok(saddr_be) if source_allowed(ifindex, saddr_be) => Ok(Verdict::Pass),
        _ => Err(Reason::ForeignSource),
    }
}
