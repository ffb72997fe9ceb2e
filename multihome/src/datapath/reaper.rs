//! The reaper: expires idle flows and removes orphaned reverse entries on
//! a thread of its own, so that a pass over a million flows (about two
//! seconds here) never holds up link events, probes or commands.
use std::{
    collections::HashSet,
    sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel},
    thread::JoinHandle,
    time::Duration,
};

use anyhow::Context as _;
use log::{debug, error, warn};
use multihome_common::FlowKey;

use crate::{
    config::Timeouts,
    flows,
    maps::{self, Maps},
};

/// Time between passes.
const EVERY: Duration = Duration::from_secs(5);
/// ... and while the map is crowded, so that room is made within a second.
const CROWDED_EVERY: Duration = Duration::from_secs(1);
/// Orphans only come from rare races: look for them every sixth pass.
const ORPHANS_EVERY: u32 = 6;

/// Running reaper; stops when dropped.
pub struct Reaper {
    /// Dropping it wakes the thread and ends it.
    timeouts: Option<Sender<Timeouts>>,
    thread: Option<JoinHandle<()>>,
}

impl Reaper {
    pub fn start(maps: Maps, timeouts: Timeouts) -> anyhow::Result<Reaper> {
        let (tx, rx) = channel();
        let thread = std::thread::Builder::new()
            .name("reaper".into())
            .spawn(move || run(&maps, timeouts, &rx))
            .context("starting the reaper thread")?;
        Ok(Reaper {
            timeouts: Some(tx),
            thread: Some(thread),
        })
    }

    /// New timeouts (a reload) for the next passes.
    pub fn set_timeouts(&self, t: Timeouts) {
        if let Some(tx) = &self.timeouts {
            let _ = tx.send(t);
        }
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        // Closing the channel wakes the thread; it exits between passes.
        self.timeouts = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(maps: &Maps, mut timeouts: Timeouts, rx: &Receiver<Timeouts>) {
    let mut suspects: Vec<FlowKey> = Vec::new();
    let mut reserved_suspects = HashSet::new();
    let mut pass = 0u32;
    let mut crowded = false;
    loop {
        match rx.recv_timeout(if crowded { CROWDED_EVERY } else { EVERY }) {
            Ok(t) => {
                timeouts = t;
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => return,
            Err(RecvTimeoutError::Timeout) => {}
        }
        pass += 1;
        let reaped = maps
            .flow_capacity()
            .and_then(|cap| flows::reap(maps, &timeouts, maps::clock_ns(), cap));
        match reaped {
            Ok(p) => {
                if p.expired > 0 {
                    debug!("expired {} idle flows", p.expired);
                }
                if p.evicted > 0 {
                    warn!(
                        "the connection map is crowded: evicted {} flows that never saw a reply",
                        p.evicted
                    );
                }
                crowded = p.crowded;
            }
            Err(e) => error!("expiring flows: {e:#}"),
        }
        match flows::reap6(maps, &timeouts, maps::clock_ns()) {
            Ok(0) => {}
            Ok(n) => debug!("expired {n} idle IPv6 flows"),
            Err(e) => error!("expiring IPv6 flows: {e:#}"),
        }
        if pass.is_multiple_of(ORPHANS_EVERY) {
            if let Err(e) = flows::reap_orphans(maps, &mut suspects) {
                error!("removing orphaned reverse entries: {e:#}");
            }
            match flows::reap_endpoints(maps, maps::clock_ns()) {
                Ok(0) => {}
                Ok(n) => debug!("removed {n} endpoint records without flows"),
                Err(e) => error!("removing endpoint records: {e:#}"),
            }
            match flows::sync_endpoint_ports(maps, &mut reserved_suspects) {
                Ok((0, 0)) => {}
                Ok((gone, back)) => {
                    debug!("endpoint ports: {gone} stale reservations removed, {back} restored")
                }
                Err(e) => error!("checking endpoint port reservations: {e:#}"),
            }
        }
    }
}
