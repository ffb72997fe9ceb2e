//! Per-CPU counters: reasons and per-uplink traffic, and the SYNs that
//! passive health watches.
use aya_ebpf::bindings::BPF_NOEXIST;
use multihome_common::{REASON_COUNT, Reason, SynWaitKey, UplinkStats, WAIT_RETRANSMIT, WAIT_SYN};

use crate::maps::{REASONS, SYN_WAIT, UPLINK_STATS};

#[inline(always)]
pub fn count(reason: Reason) {
    if let Some(r) = REASONS.get_ptr_mut(0) {
        // SAFETY: `Reasons` is a run of u64 counters indexed by `Reason`, and
        // the slot belongs to this CPU.
        unsafe { *(r as *mut u64).add(reason as usize) += 1 };
    }
}

/// [`count`] for a reason that came back from a BPF subprogram through
/// memory, which the verifier sees as any number: bounded first, in a
/// way LLVM cannot drop for knowing the enum's range.
#[inline(always)]
pub fn count_returned(reason: Reason) {
    let code = reason as u32;
    // SAFETY: a read of a local.
    let i = unsafe { core::ptr::read_volatile(&code) } as usize;
    if i >= REASON_COUNT {
        return;
    }
    if let Some(r) = REASONS.get_ptr_mut(0) {
        // SAFETY: as in `count`, with `i` checked.
        unsafe { *(r as *mut u64).add(i) += 1 };
    }
}

#[inline(always)]
fn with_uplink(uplink: u8, f: impl FnOnce(&mut UplinkStats)) {
    if let Some(s) = UPLINK_STATS.get_ptr_mut(uplink as u32) {
        // SAFETY: per-CPU slot, no other writer.
        f(unsafe { &mut *s });
    }
}

#[inline(always)]
pub fn tx(uplink: u8, bytes: u32) {
    with_uplink(uplink, |s| {
        s.tx_packets += 1;
        s.tx_bytes += bytes as u64;
    });
}

#[inline(always)]
pub fn rx(uplink: u8, bytes: u32) {
    with_uplink(uplink, |s| {
        s.rx_packets += 1;
        s.rx_bytes += bytes as u64;
    });
}

#[inline(always)]
pub fn new_flow(uplink: u8) {
    with_uplink(uplink, |s| s.new_flows += 1);
}

#[inline(always)]
pub fn slow_path(uplink: u8) {
    with_uplink(uplink, |s| s.slow_path += 1);
    count(Reason::SlowPath);
}

/// Passive health: a LAN SYN opened a TCP flow to `daddr_be` through
/// `uplink`. The remote waits in `SYN_WAIT` until it answers.
#[inline(always)]
pub fn syn_sent(uplink: u8, daddr_be: u32) {
    with_uplink(uplink, |s| s.syns += 1);
    wait_on(uplink, daddr_be, WAIT_SYN);
}

/// Puts `daddr_be` in `SYN_WAIT` as waited on through `uplink` for
/// `kind`, unless it already waits (the first time stays).
#[inline(always)]
fn wait_on(uplink: u8, daddr_be: u32, kind: u8) {
    let key = SynWaitKey {
        daddr_be,
        uplink,
        kind,
        _pad1: 0,
    };
    let _ = SYN_WAIT.insert(key, crate::conntrack::now_ns(), BPF_NOEXIST as u64);
}

/// Passive health: a LAN host sent its SYN again on a flow through
/// `uplink` that saw no reply yet.
#[inline(always)]
pub fn syn_retry(uplink: u8) {
    with_uplink(uplink, |s| s.syn_retries += 1);
}

/// Passive health: a LAN host sent TCP data to `daddr_be` through `uplink`
/// again. The remote waits in `SYN_WAIT` until the daemon sees the uplink
/// carry a reply.
#[inline(always)]
pub fn retransmit(uplink: u8, daddr_be: u32) {
    with_uplink(uplink, |s| s.retransmits += 1);
    wait_on(uplink, daddr_be, WAIT_RETRANSMIT);
}

/// Passive health: the first reply of a TCP flow through `uplink` was a
/// SYN-ACK from `saddr_be`, `rtt_ns` after the flow's SYN.
#[inline(always)]
pub fn synack(uplink: u8, saddr_be: u32, rtt_ns: u64) {
    with_uplink(uplink, |s| {
        s.synacks += 1;
        s.synack_rtt_ns += rtt_ns;
    });
    let key = SynWaitKey {
        daddr_be: saddr_be,
        uplink,
        kind: WAIT_SYN,
        _pad1: 0,
    };
    let _ = SYN_WAIT.remove(key);
}
