//! Fairness when the connection map fills: one LAN host holds at most
//! `max_flows_per_host` flows, and a full map refuses new flows before any
//! lookup. Both are checked before the route lookup, so a flood of new
//! flows costs little; the reaper recounts both exactly on every pass and
//! evicts flows that never saw a reply first.
use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{bindings::BPF_NOEXIST, btf_maps::HashMap};
use multihome_common::{HostFlows, MAX_HOSTS, Reason, Settings};

use crate::maps::{FILL, HOSTS, HOSTS6};

/// A LAN host's entry in `HOSTS`, if it has one yet.
pub struct Host(Option<*mut HostFlows>);

impl Host {
    /// The entry of `saddr_be`, for a flow made without [`admit`] (a
    /// hairpin's return flow).
    #[inline(always)]
    pub fn of(saddr_be: u32) -> Host {
        Host(HOSTS.get_ptr_mut(saddr_be))
    }
}

/// Refuses a new flow from `saddr_be` when the map or the host's quota is
/// full, counting the host's refusal; otherwise returns the host's entry
/// for [`count_new`].
#[inline(always)]
pub fn admit(saddr_be: u32, s: &Settings) -> Result<Host, Reason> {
    if let Some(fill) = FILL.get(0)
        && *fill >= u64::from(s.max_flows)
    {
        return Err(Reason::MapFull);
    }
    let host = HOSTS.get_ptr_mut(saddr_be);
    within_quota(host, s)?;
    Ok(Host(host))
}

/// Counts a flow just made for `saddr_be`, whose entry `admit` found.
#[inline(always)]
pub fn count_new(saddr_be: u32, host: &Host) {
    if let Some(fill) = FILL.get_ptr_mut(0) {
        add_one(fill);
    }
    count_host(&HOSTS, &saddr_be, host.0);
}

/// [`admit`]'s quota for an IPv6 LAN host `lan` (the connection map's
/// fill is `CONN6`'s own: a full map refuses the insert).
#[inline(always)]
pub fn admit6(lan: &[u8; 16], s: &Settings) -> Result<(), Reason> {
    within_quota(HOSTS6.get_ptr_mut(lan), s)
}

/// Counts a flow just made for IPv6 LAN host `lan`.
#[inline(always)]
pub fn count_new6(lan: &[u8; 16]) {
    count_host(&HOSTS6, lan, HOSTS6.get_ptr_mut(lan));
}

/// Err (the host's refusal counted) when `host`'s entry holds its quota.
#[inline(always)]
fn within_quota(host: Option<*mut HostFlows>, s: &Settings) -> Result<(), Reason> {
    if let Some(h) = host {
        // SAFETY: a preallocated map value.
        let h = unsafe { &mut *h };
        if h.flows >= u64::from(s.max_flows_per_host) {
            add_one(&mut h.refused);
            return Err(Reason::HostQuota);
        }
    }
    Ok(())
}

/// One more flow for host `key` in `hosts` (`HOSTS` or `HOSTS6`): on its
/// entry `found`, or on a new one.
#[inline(always)]
fn count_host<K>(
    hosts: &HashMap<K, HostFlows, { MAX_HOSTS as usize }>,
    key: &K,
    found: Option<*mut HostFlows>,
) {
    match found {
        // SAFETY: a preallocated map value, which outlives the program run.
        Some(h) => add_one(unsafe { &mut (*h).flows }),
        None => {
            let first = HostFlows {
                flows: 1,
                refused: 0,
            };
            if hosts.insert(key, first, BPF_NOEXIST as u64).is_err()
                && let Some(h) = hosts.get_ptr_mut(key)
            {
                // Another CPU made the entry first.
                // SAFETY: as above.
                add_one(unsafe { &mut (*h).flows });
            }
        }
    }
}

/// An atomic add of one (BPF_ATOMIC | BPF_ADD): Rust's `core` offers no
/// atomic read-modify-write on BPF, so the intrinsic it lowers to is used.
#[inline(always)]
fn add_one(counter: *mut u64) {
    // SAFETY: `counter` points to an aligned u64 in a map value, which
    // lives as long as the map.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(counter, 1) };
}
