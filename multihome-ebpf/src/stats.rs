//! Per-CPU counters: reasons and per-uplink traffic.
use multihome_common::{Reason, UplinkStats};

use crate::maps::{REASONS, UPLINK_STATS};

#[inline(always)]
pub fn count(reason: Reason) {
    if let Some(r) = REASONS.get_ptr_mut(0) {
        // SAFETY: `Reasons` is a run of u64 counters indexed by `Reason`, and
        // the slot belongs to this CPU.
        unsafe { *(r as *mut u64).add(reason as usize) += 1 };
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
