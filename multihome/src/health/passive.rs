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
use std::collections::VecDeque;

use multihome_common::SynWaitKey;

/// How far back SYNs count: older unanswered ones say nothing of now.
pub const WINDOW_NS: u64 = 10_000_000_000;

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
    /// also how long the trial lasts.
    pub hold_ns: u64,
}

/// Where an uplink stands by its traffic.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Verdict {
    #[default]
    Healthy,
    /// Unanswered SYNs took it down at `since` (boot clock, ns).
    Down { since: u64, destinations: usize },
    /// On trial until `until`: a share of new flows tries it.
    Canary { until: u64 },
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
    /// (time, SYN-ACKs so far per slot), oldest first, over the window.
    answered: VecDeque<(u64, Vec<u64>)>,
}

impl Watch {
    pub fn new(uplinks: usize) -> Self {
        Self {
            verdicts: vec![Verdict::Healthy; uplinks],
            counting_from: vec![0; uplinks],
            answered: VecDeque::new(),
        }
    }

    #[cfg(test)]
    pub fn verdict(&self, uplink: usize) -> Verdict {
        self.verdicts[uplink]
    }

    /// One look at the datapath at `now` (boot ns): `waiting` is
    /// `SYN_WAIT`, `synacks[slot]` the SYN-ACKs counted so far; uplink `i`
    /// of the config has slot `slots[i]` and settings `configs[i]`.
    /// Returns the changes of verdict, and the `waiting` keys too old to
    /// matter (to delete).
    pub fn tick(
        &mut self,
        now: u64,
        waiting: &[(SynWaitKey, u64)],
        synacks: &[u64],
        slots: &[u8],
        configs: &[PassiveConfig],
    ) -> (Vec<Change>, Vec<SynWaitKey>) {
        self.answered.push_back((now, synacks.to_vec()));
        let horizon = configs.iter().map(|c| c.syn_timeout_ns).max().unwrap_or(0) + WINDOW_NS;
        while self
            .answered
            .get(1)
            .is_some_and(|(t, _)| now.saturating_sub(*t) > horizon)
        {
            self.answered.pop_front();
        }
        let stale = waiting
            .iter()
            .filter(|(_, t)| now.saturating_sub(*t) > horizon)
            .map(|(k, _)| *k)
            .collect();
        let mut changes = Vec::new();
        for (id, (&slot, cfg)) in slots.iter().zip(configs).enumerate() {
            if !cfg.enabled {
                continue;
            }
            let from = self.counting_from[id];
            let late: Vec<u64> = waiting
                .iter()
                .filter(|(k, t)| {
                    k.uplink == slot
                        && *t >= from
                        && now.saturating_sub(*t) >= cfg.syn_timeout_ns
                        && now.saturating_sub(*t) <= cfg.syn_timeout_ns + WINDOW_NS
                })
                .map(|(_, t)| *t)
                .collect();
            let unanswered = late.len() >= cfg.min_destinations
                && late
                    .iter()
                    .min()
                    .is_some_and(|oldest| self.answered_since(*oldest, slot) == 0);
            let next = match self.verdicts[id] {
                Verdict::Healthy | Verdict::Canary { .. } if unanswered => Verdict::Down {
                    since: now,
                    destinations: late.len(),
                },
                Verdict::Down { since, .. } if now.saturating_sub(since) >= cfg.hold_ns => {
                    Verdict::Canary {
                        until: now + cfg.hold_ns,
                    }
                }
                Verdict::Canary { until } if now >= until => Verdict::Healthy,
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

    /// SYN-ACKs through `slot` since `t` (boot ns), at least: counted from
    /// the last look at or before `t`, else the oldest one kept.
    fn answered_since(&self, t: u64, slot: u8) -> u64 {
        let count = |(_, c): &(u64, Vec<u64>)| c.get(usize::from(slot)).copied().unwrap_or(0);
        let Some(latest) = self.answered.back() else {
            return 0;
        };
        let before = self
            .answered
            .iter()
            .rev()
            .find(|(at, _)| *at <= t)
            .or(self.answered.front())
            .map_or(0, count);
        count(latest).saturating_sub(before)
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
    };

    fn wait(dest: u32, slot: u8, t: u64) -> (SynWaitKey, u64) {
        (
            SynWaitKey {
                daddr_be: dest,
                uplink: slot,
                _pad0: 0,
                _pad1: 0,
            },
            t,
        )
    }

    #[test]
    fn unanswered_syns_to_several_remotes_take_an_uplink_down_then_it_goes_on_trial() {
        let mut w = Watch::new(2);
        let t0 = 100_000 * MS;
        let (slots, cfgs) = ([0, 1], [CFG, CFG]);
        // Answers on both before; then x (slot 0) stops answering.
        w.tick(t0, &[], &[5, 5], &slots, &cfgs);
        let waiting = [
            wait(1, 0, t0 + MS),
            wait(2, 0, t0 + 2 * MS),
            wait(3, 0, t0 + 3 * MS),
        ];
        let (c, _) = w.tick(t0 + 400 * MS, &waiting, &[5, 9], &slots, &cfgs);
        assert!(c.is_empty(), "not yet syn_timeout_ms");
        let (c, _) = w.tick(t0 + 600 * MS, &waiting, &[5, 12], &slots, &cfgs);
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
        let (c, _) = w.tick(later, &waiting, &[5, 20], &slots, &cfgs);
        assert_eq!(
            c[0].verdict,
            Verdict::Canary {
                until: later + CFG.hold_ns
            }
        );
        // Answered during the trial: healthy at its end.
        let (c, _) = w.tick(later + CFG.hold_ns, &waiting, &[8, 25], &slots, &cfgs);
        assert_eq!(c[0].verdict, Verdict::Healthy);
    }

    #[test]
    fn one_answer_since_the_oldest_unanswered_syn_or_too_few_remotes_conclude_nothing() {
        let t0 = 100_000 * MS;
        let (slots, cfgs) = ([0], [CFG]);
        // A firewalled remote or two, while others answer.
        let mut w = Watch::new(1);
        w.tick(t0, &[], &[5], &slots, &cfgs);
        let waiting = [
            wait(1, 0, t0 + MS),
            wait(2, 0, t0 + 2 * MS),
            wait(3, 0, t0 + 3 * MS),
        ];
        let (c, _) = w.tick(t0 + 600 * MS, &waiting, &[6], &slots, &cfgs);
        assert!(c.is_empty(), "an answer came after those SYNs went");
        // Two remotes only.
        let mut w = Watch::new(1);
        w.tick(t0, &[], &[5], &slots, &cfgs);
        let (c, _) = w.tick(t0 + 600 * MS, &waiting[..2], &[5], &slots, &cfgs);
        assert!(c.is_empty(), "too few remotes to say");
        // Disabled.
        let off = [PassiveConfig {
            enabled: false,
            ..CFG
        }];
        let mut w = Watch::new(1);
        let (c, _) = w.tick(t0 + 600 * MS, &waiting, &[5], &slots, &off);
        assert!(c.is_empty());
    }

    #[test]
    fn waiting_remotes_older_than_the_window_are_handed_back_to_delete() {
        let mut w = Watch::new(1);
        let t0 = 100_000 * MS;
        let old = wait(9, 0, t0);
        let (_, stale) = w.tick(t0 + WINDOW_NS + 600 * MS, &[old], &[0], &[0], &[CFG]);
        assert_eq!(stale, vec![old.0]);
    }
}
