//! Health from live traffic: a dead upstream shows in the LAN's own TCP
//! before any probe notices it. The datapath records, per uplink, each
//! remote a LAN SYN went to until that remote answers with a SYN-ACK
//! (`SYN_WAIT`), and counts SYN-ACKs. An uplink through which SYNs to
//! several distinct remotes went unanswered for `syn_timeout_ms`, with not
//! one SYN-ACK since the oldest of them, is down by traffic. Distinct
//! remotes, not SYNs: one firewalled host or a P2P client retrying dead
//! peers must not take an uplink down, and a quiet uplink concludes
//! nothing. After `passive_hold_ms` it goes on trial (a canary): a small
//! share of new flows tries it, and either they are answered and it is
//! back, or it is down again.
//!
//! Established flows speak too: a LAN host that sends TCP data again
//! (a retransmission, seen against the flow's `snd_max`) leaves its remote
//! waiting in `SYN_WAIT` as well, and that wait ends with any reply the
//! uplink carries. Remotes of either kind count together, so an uplink
//! that only carries long-lived sessions (SSH, an upload) is found dead
//! without a new connection.
//!
//! An operator may also set thresholds on the SYN-ACK round-trip time and
//! on the share of SYNs answered: beyond them, over the last
//! [`WINDOW_NS`] and on enough samples, the uplink is degraded: it takes
//! no new flows while another is healthy, and keeps its pinned ones.
use std::collections::VecDeque;

use multihome_common::{SynWaitKey, WAIT_RETRANSMIT};

/// How far back SYNs count: older unanswered ones say nothing of now.
pub const WINDOW_NS: u64 = 10_000_000_000;
/// SYNs (or SYN-ACKs, for the round-trip time) a window needs before a
/// degraded threshold is judged.
pub const MIN_SAMPLES: u64 = 10;
/// Packets sent a window needs before the retransmitted share is judged.
pub const MIN_SENT: u64 = 100;

/// One uplink's counters, as `UPLINK_STATS` sums them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SynCounts {
    pub syns: u64,
    pub synacks: u64,
    pub rtt_ns: u64,
    /// Translated packets sent and received.
    pub tx_packets: u64,
    pub rx_packets: u64,
    /// LAN TCP data segments sent again.
    pub retransmits: u64,
}

/// The passive-health settings of one uplink (`[uplink.health]`, or the
/// defaults without it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PassiveConfig {
    pub enabled: bool,
    /// A SYN unanswered this long counts, ns.
    pub syn_timeout_ns: u64,
    /// Distinct remotes left unanswered before a verdict.
    pub min_destinations: usize,
    /// How long a traffic verdict keeps the uplink out before a trial, ns;
    /// also how long the trial lasts, and how long a degraded one stays so
    /// at least.
    pub hold_ns: u64,
    /// Degraded while the mean SYN to SYN-ACK time is above this, ns.
    pub degraded_rtt_ns: Option<u64>,
    /// Degraded while fewer SYNs than this percentage are answered.
    pub degraded_answered_pct: Option<u32>,
    /// Degraded while more than this percentage of the packets sent are
    /// TCP retransmissions.
    pub degraded_retransmit_pct: Option<u32>,
}

/// Where an uplink stands by its traffic.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Verdict {
    #[default]
    Healthy,
    /// Remotes left unanswered (SYNs, or data sent again) took it down at
    /// `since` (boot clock, ns).
    Down { since: u64, destinations: usize },
    /// On trial until `until`: a share of new flows tries it.
    Canary { until: u64 },
    /// Past a degraded threshold since `since`: no new flows while another
    /// uplink is healthy; pinned flows stay.
    Degraded { since: u64 },
}

/// A change for the daemon to publish and log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Change {
    /// The uplink, by its index in the config.
    pub uplink: usize,
    pub verdict: Verdict,
}

/// The passive watch over every uplink.
#[derive(Debug, Default)]
pub struct Watch {
    verdicts: Vec<Verdict>,
    /// Since when SYNs count: the last change of verdict (boot ns).
    counting_from: Vec<u64>,
    /// (time, counters so far per slot), oldest first, over the window.
    history: VecDeque<(u64, Vec<SynCounts>)>,
}

impl Watch {
    pub fn new(uplinks: usize) -> Self {
        Self {
            verdicts: vec![Verdict::Healthy; uplinks],
            counting_from: vec![0; uplinks],
            history: VecDeque::new(),
        }
    }

    #[cfg(test)]
    pub fn verdict(&self, uplink: usize) -> Verdict {
        self.verdicts[uplink]
    }

    /// One look at the datapath at `now` (boot ns): `waiting` is
    /// `SYN_WAIT`, `counts[slot]` the counters so far; uplink `i` of
    /// the config has slot `slots[i]` and settings `configs[i]`. Returns
    /// the changes of verdict, and the `waiting` keys that no longer
    /// matter (to delete): too old, or retransmissions the uplink has
    /// carried a reply since.
    pub fn tick(
        &mut self,
        now: u64,
        waiting: &[(SynWaitKey, u64)],
        counts: &[SynCounts],
        slots: &[u8],
        configs: &[PassiveConfig],
    ) -> (Vec<Change>, Vec<SynWaitKey>) {
        self.history.push_back((now, counts.to_vec()));
        let horizon = configs.iter().map(|c| c.syn_timeout_ns).max().unwrap_or(0) + WINDOW_NS;
        while self
            .history
            .get(1)
            .is_some_and(|(t, _)| now.saturating_sub(*t) > horizon)
        {
            self.history.pop_front();
        }
        let stale = waiting
            .iter()
            .filter(|(k, t)| {
                now.saturating_sub(*t) > horizon
                    || (k.kind == WAIT_RETRANSMIT && self.received_since(*t, k.uplink) > 0)
            })
            .map(|(k, _)| *k)
            .collect();
        let mut changes = Vec::new();
        for (id, (&slot, cfg)) in slots.iter().zip(configs).enumerate() {
            if !cfg.enabled {
                continue;
            }
            let from = self.counting_from[id];
            let late: Vec<&(SynWaitKey, u64)> = waiting
                .iter()
                .filter(|(k, t)| {
                    k.uplink == slot
                        && *t >= from
                        && now.saturating_sub(*t) >= cfg.syn_timeout_ns
                        && now.saturating_sub(*t) <= cfg.syn_timeout_ns + WINDOW_NS
                })
                .collect();
            let oldest = |kind_is_retransmit: bool| {
                late.iter()
                    .filter(|(k, _)| (k.kind == WAIT_RETRANSMIT) == kind_is_retransmit)
                    .map(|(_, t)| *t)
                    .min()
            };
            let mut remotes: Vec<u32> = late.iter().map(|(k, _)| k.daddr_be).collect();
            remotes.sort_unstable();
            remotes.dedup();
            // A SYN is answered by a SYN-ACK, data sent again by any reply.
            let unanswered = remotes.len() >= cfg.min_destinations
                && oldest(false).is_none_or(|t| self.answered_since(t, slot) == 0)
                && oldest(true).is_none_or(|t| self.received_since(t, slot) == 0);
            let degraded = self.degraded(now, slot, cfg);
            let next = match self.verdicts[id] {
                Verdict::Down { since, .. } if now.saturating_sub(since) >= cfg.hold_ns => {
                    Verdict::Canary {
                        until: now + cfg.hold_ns,
                    }
                }
                Verdict::Down { .. } => self.verdicts[id],
                _ if unanswered => Verdict::Down {
                    since: now,
                    destinations: remotes.len(),
                },
                Verdict::Canary { until } if now >= until => Verdict::Healthy,
                Verdict::Healthy if degraded == Some(true) => Verdict::Degraded { since: now },
                // Out of new flows it may see too few SYNs to say: after
                // the hold it takes them again, and is judged anew.
                Verdict::Degraded { since }
                    if degraded == Some(false)
                        || (degraded.is_none() && now.saturating_sub(since) >= cfg.hold_ns) =>
                {
                    Verdict::Healthy
                }
                v => v,
            };
            if next != self.verdicts[id] {
                self.verdicts[id] = next;
                self.counting_from[id] = now;
                changes.push(Change {
                    uplink: id,
                    verdict: next,
                });
            }
        }
        (changes, stale)
    }

    /// The counters of `slot` at the last look at or before `t`, else at
    /// the oldest kept.
    fn counts_at(&self, t: u64, slot: u8) -> SynCounts {
        self.history
            .iter()
            .rev()
            .find(|(at, _)| *at <= t)
            .or(self.history.front())
            .and_then(|(_, c)| c.get(usize::from(slot)).copied())
            .unwrap_or_default()
    }

    fn latest(&self, slot: u8) -> SynCounts {
        self.history
            .back()
            .and_then(|(_, c)| c.get(usize::from(slot)).copied())
            .unwrap_or_default()
    }

    /// SYN-ACKs through `slot` since `t` (boot ns), at least.
    fn answered_since(&self, t: u64, slot: u8) -> u64 {
        self.latest(slot)
            .synacks
            .saturating_sub(self.counts_at(t, slot).synacks)
    }

    /// Packets received through `slot` from the first look at or after `t`
    /// (boot ns) on: what arrived in the moments before it may have been
    /// on its way already.
    fn received_since(&self, t: u64, slot: u8) -> u64 {
        let then = self
            .history
            .iter()
            .find(|(at, _)| *at >= t)
            .and_then(|(_, c)| c.get(usize::from(slot)).copied())
            .unwrap_or_else(|| self.latest(slot));
        self.latest(slot).rx_packets.saturating_sub(then.rx_packets)
    }

    /// Whether `slot` is past a degraded threshold over the last window;
    /// None without a threshold or with too few samples to say.
    fn degraded(&self, now: u64, slot: u8, cfg: &PassiveConfig) -> Option<bool> {
        let (now_c, then) = (
            self.latest(slot),
            self.counts_at(now.saturating_sub(WINDOW_NS), slot),
        );
        let syns = now_c.syns.saturating_sub(then.syns);
        let synacks = now_c.synacks.saturating_sub(then.synacks);
        let slow = cfg
            .degraded_rtt_ns
            .filter(|_| synacks >= MIN_SAMPLES)
            .map(|max| now_c.rtt_ns.saturating_sub(then.rtt_ns) / synacks > max);
        let unanswered = cfg
            .degraded_answered_pct
            .filter(|_| syns >= MIN_SAMPLES)
            .map(|pct| synacks.min(syns) * 100 < u64::from(pct) * syns);
        let sent = now_c.tx_packets.saturating_sub(then.tx_packets);
        let resent = now_c.retransmits.saturating_sub(then.retransmits);
        let lossy = cfg
            .degraded_retransmit_pct
            .filter(|_| sent >= MIN_SENT)
            .map(|pct| resent * 100 > u64::from(pct) * sent);
        match [slow, unanswered, lossy] {
            [None, None, None] => None,
            v => Some(v.contains(&Some(true))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;
    const CFG: PassiveConfig = PassiveConfig {
        enabled: true,
        syn_timeout_ns: 500 * MS,
        min_destinations: 3,
        hold_ns: 5_000 * MS,
        degraded_rtt_ns: None,
        degraded_answered_pct: None,
        degraded_retransmit_pct: None,
    };

    /// Counters with `synacks` SYN-ACKs (as many SYNs), 10 ms each.
    fn acks(synacks: u64) -> SynCounts {
        SynCounts {
            syns: synacks,
            synacks,
            rtt_ns: synacks * 10 * MS,
            ..SynCounts::default()
        }
    }

    /// Counters with `rx` packets received and no SYN.
    fn received(rx_packets: u64) -> SynCounts {
        SynCounts {
            rx_packets,
            ..SynCounts::default()
        }
    }

    fn wait(dest: u32, slot: u8, t: u64) -> (SynWaitKey, u64) {
        (
            SynWaitKey {
                daddr_be: dest,
                uplink: slot,
                kind: multihome_common::WAIT_SYN,
                _pad1: 0,
            },
            t,
        )
    }

    fn resent(dest: u32, slot: u8, t: u64) -> (SynWaitKey, u64) {
        let (mut k, t) = wait(dest, slot, t);
        k.kind = WAIT_RETRANSMIT;
        (k, t)
    }

    #[test]
    fn data_sent_again_to_several_remotes_with_nothing_received_takes_an_uplink_down() {
        let t0 = 100_000 * MS;
        let (slots, cfgs) = ([0], [CFG]);
        let waiting = [
            resent(1, 0, t0 + MS),
            resent(2, 0, t0 + 2 * MS),
            resent(3, 0, t0 + 3 * MS),
        ];
        // Replies keep arriving: the retransmissions were ordinary loss,
        // and their entries are handed back to delete.
        let mut w = Watch::new(1);
        w.tick(t0, &[], &[received(100)], &slots, &cfgs);
        w.tick(t0 + 250 * MS, &waiting, &[received(150)], &slots, &cfgs);
        let (c, stale) = w.tick(t0 + 600 * MS, &waiting, &[received(200)], &slots, &cfgs);
        assert!(c.is_empty(), "replies came after the data went again");
        assert_eq!(stale.len(), 3, "answered retransmissions are forgotten");
        // Nothing received since: down, with no SYN involved.
        let mut w = Watch::new(1);
        w.tick(t0, &[], &[received(100)], &slots, &cfgs);
        w.tick(t0 + 250 * MS, &waiting, &[received(100)], &slots, &cfgs);
        let (c, stale) = w.tick(t0 + 600 * MS, &waiting, &[received(100)], &slots, &cfgs);
        assert!(stale.is_empty());
        assert_eq!(
            c.first().map(|c| c.verdict),
            Some(Verdict::Down {
                since: t0 + 600 * MS,
                destinations: 3
            })
        );
        // A SYN and data to the same remote count once.
        let mut w = Watch::new(1);
        w.tick(t0, &[], &[received(100)], &slots, &cfgs);
        let mixed = [waiting[0], waiting[1], wait(2, 0, t0 + 4 * MS)];
        let (c, _) = w.tick(t0 + 600 * MS, &mixed, &[received(100)], &slots, &cfgs);
        assert!(c.is_empty(), "two remotes only");
    }

    #[test]
    fn a_share_of_data_sent_again_past_the_threshold_degrades_an_uplink() {
        let t0 = 100_000 * MS;
        let cfg = PassiveConfig {
            degraded_retransmit_pct: Some(5),
            ..CFG
        };
        let sent = |tx_packets, retransmits| SynCounts {
            tx_packets,
            retransmits,
            ..SynCounts::default()
        };
        let mut w = Watch::new(1);
        w.tick(t0, &[], &[sent(0, 0)], &[0], &[cfg]);
        let (c, _) = w.tick(t0 + MS, &[], &[sent(50, 10)], &[0], &[cfg]);
        assert!(c.is_empty(), "too few packets to say");
        let (c, _) = w.tick(t0 + 2 * MS, &[], &[sent(1000, 40)], &[0], &[cfg]);
        assert!(c.is_empty(), "4 % is under 5 %");
        let (c, _) = w.tick(t0 + 3 * MS, &[], &[sent(1000, 60)], &[0], &[cfg]);
        assert_eq!(c[0].verdict, Verdict::Degraded { since: t0 + 3 * MS });
    }

    #[test]
    fn unanswered_syns_to_several_remotes_take_an_uplink_down_then_it_goes_on_trial() {
        let mut w = Watch::new(2);
        let t0 = 100_000 * MS;
        let (slots, cfgs) = ([0, 1], [CFG, CFG]);
        // Answers on both before; then x (slot 0) stops answering.
        w.tick(t0, &[], &[acks(5), acks(5)], &slots, &cfgs);
        let waiting = [
            wait(1, 0, t0 + MS),
            wait(2, 0, t0 + 2 * MS),
            wait(3, 0, t0 + 3 * MS),
        ];
        let (c, _) = w.tick(t0 + 400 * MS, &waiting, &[acks(5), acks(9)], &slots, &cfgs);
        assert!(c.is_empty(), "not yet syn_timeout_ms");
        let (c, _) = w.tick(t0 + 600 * MS, &waiting, &[acks(5), acks(12)], &slots, &cfgs);
        assert_eq!(
            c,
            vec![Change {
                uplink: 0,
                verdict: Verdict::Down {
                    since: t0 + 600 * MS,
                    destinations: 3
                }
            }]
        );
        assert_eq!(w.verdict(1), Verdict::Healthy, "y answered");
        // After the hold, a trial; SYNs from before it do not count.
        let later = t0 + 5_700 * MS;
        let (c, _) = w.tick(later, &waiting, &[acks(5), acks(20)], &slots, &cfgs);
        assert_eq!(
            c[0].verdict,
            Verdict::Canary {
                until: later + CFG.hold_ns
            }
        );
        // Answered during the trial: healthy at its end.
        let (c, _) = w.tick(
            later + CFG.hold_ns,
            &waiting,
            &[acks(8), acks(25)],
            &slots,
            &cfgs,
        );
        assert_eq!(c[0].verdict, Verdict::Healthy);
    }

    #[test]
    fn one_answer_since_the_oldest_unanswered_syn_or_too_few_remotes_conclude_nothing() {
        let t0 = 100_000 * MS;
        let (slots, cfgs) = ([0], [CFG]);
        // A firewalled remote or two, while others answer.
        let mut w = Watch::new(1);
        w.tick(t0, &[], &[acks(5)], &slots, &cfgs);
        let waiting = [
            wait(1, 0, t0 + MS),
            wait(2, 0, t0 + 2 * MS),
            wait(3, 0, t0 + 3 * MS),
        ];
        let (c, _) = w.tick(t0 + 600 * MS, &waiting, &[acks(6)], &slots, &cfgs);
        assert!(c.is_empty(), "an answer came after those SYNs went");
        // Two remotes only.
        let mut w = Watch::new(1);
        w.tick(t0, &[], &[acks(5)], &slots, &cfgs);
        let (c, _) = w.tick(t0 + 600 * MS, &waiting[..2], &[acks(5)], &slots, &cfgs);
        assert!(c.is_empty(), "too few remotes to say");
        // Disabled.
        let off = [PassiveConfig {
            enabled: false,
            ..CFG
        }];
        let mut w = Watch::new(1);
        let (c, _) = w.tick(t0 + 600 * MS, &waiting, &[acks(5)], &slots, &off);
        assert!(c.is_empty());
    }

    #[test]
    fn past_a_threshold_on_enough_samples_an_uplink_is_degraded_until_it_is_not() {
        let t0 = 100_000 * MS;
        let cfg = PassiveConfig {
            degraded_rtt_ns: Some(50 * MS),
            degraded_answered_pct: Some(80),
            ..CFG
        };
        let at = |syns, synacks, rtt_ms| SynCounts {
            syns,
            synacks,
            rtt_ns: rtt_ms * MS,
            ..SynCounts::default()
        };
        let mut w = Watch::new(1);
        w.tick(t0, &[], &[at(0, 0, 0)], &[0], &[cfg]);
        // Slow, but on too few samples.
        let (c, _) = w.tick(t0 + MS, &[], &[at(5, 5, 500)], &[0], &[cfg]);
        assert!(c.is_empty());
        // Twenty SYN-ACKs at 100 ms each.
        let (c, _) = w.tick(t0 + 2 * MS, &[], &[at(20, 20, 2000)], &[0], &[cfg]);
        assert_eq!(c[0].verdict, Verdict::Degraded { since: t0 + 2 * MS });
        // A window later: 30 SYNs, all answered in 10 ms.
        let t1 = t0 + WINDOW_NS + 10 * MS;
        let (c, _) = w.tick(t1, &[], &[at(50, 50, 2300)], &[0], &[cfg]);
        assert_eq!(c[0].verdict, Verdict::Healthy);
        // Fast, but only half the SYNs answered.
        let t2 = t1 + WINDOW_NS + 10 * MS;
        let (c, _) = w.tick(t2, &[], &[at(90, 70, 2500)], &[0], &[cfg]);
        assert_eq!(c[0].verdict, Verdict::Degraded { since: t2 });
        // Without thresholds, never.
        let mut w = Watch::new(1);
        w.tick(t0, &[], &[at(0, 0, 0)], &[0], &[CFG]);
        let (c, _) = w.tick(t0 + MS, &[], &[at(90, 10, 9000)], &[0], &[CFG]);
        assert!(c.is_empty());
    }

    #[test]
    fn waiting_remotes_older_than_the_window_are_handed_back_to_delete() {
        let mut w = Watch::new(1);
        let t0 = 100_000 * MS;
        let old = wait(9, 0, t0);
        let (_, stale) = w.tick(t0 + WINDOW_NS + 600 * MS, &[old], &[acks(0)], &[0], &[CFG]);
        assert_eq!(stale, vec![old.0]);
    }
}
