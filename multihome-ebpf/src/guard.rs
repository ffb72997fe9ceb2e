//! The egress guard (BCP 38, RFC 2827): a forwarded packet leaves an
//! uplink only with that uplink's address as its source, or with one of
//! its `routed_prefixes`. Everything the translation stages could not
//! handle ends here, so nothing they miss leaks with a LAN source.
use aya_ebpf::{maps::lpm_trie::Key, programs::TcContext};
use multihome_common::{MAX_UPLINKS, Reason, RoutedKey, RoutedUplinks, UPLINK_CONFIGURED};

use crate::{
    maps::{ROUTED, UPLINKS},
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

/// Whether a packet from `saddr_be` may leave device `ifindex`: the
/// address of an uplink on it (several uplinks may share one device,
/// seed 4.2.5), or a routed prefix of one of them.
#[inline(always)]
fn source_allowed(ifindex: u32, saddr_be: u32) -> bool {
    let mut here: RoutedUplinks = 0;
    for id in 0..MAX_UPLINKS {
        if let Some(u) = UPLINKS.get(id)
            && u.flags & UPLINK_CONFIGURED != 0
            && u.ifindex == ifindex
        {
            if u.addr_be == saddr_be && saddr_be != 0 {
                return true;
            }
            here |= 1 << id;
        }
    }
    here != 0 && routed_uplinks(saddr_be) & here != 0
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
