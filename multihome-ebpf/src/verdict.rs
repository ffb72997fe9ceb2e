//! The one place where a stage's outcome becomes a TC action.
use aya_ebpf::bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC};
use multihome_common::Reason;

use crate::stats;

pub enum Verdict {
    /// Let the kernel (or the next tcx program) have it.
    Pass,
    /// The return code of a successful redirect helper.
    Redirect(i32),
}

pub type Outcome = Result<Verdict, Reason>;

/// Drops count and drop; every other reason counts and passes, untouched.
#[inline(always)]
pub fn tc_action(outcome: Outcome) -> i32 {
    action(outcome, stats::count)
}

/// [`tc_action`] for the IPv6 programs, whose outcomes may come back from
/// subprograms (see [`stats::count_returned`]).
#[inline(always)]
pub fn tc_action6(outcome: Outcome) -> i32 {
    action(outcome, stats::count_returned)
}

#[inline(always)]
fn action(outcome: Outcome, count: fn(Reason)) -> i32 {
    match outcome {
        Ok(Verdict::Pass) => TC_ACT_UNSPEC,
        Ok(Verdict::Redirect(action)) => action,
        Err(reason) => {
            count(reason);
            if reason.drops() {
                TC_ACT_SHOT
            } else {
                TC_ACT_UNSPEC
            }
        }
    }
}
