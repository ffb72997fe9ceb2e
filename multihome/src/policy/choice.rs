//! The table that places new flows on uplinks: Maglev-style consistent
//! hashing (Eisenbud et al., "Maglev", NSDI 2016) with each uplink's share
//! set by its weight. The datapath takes slot `flow_hash % SELECT_SLOTS`,
//! so a flow's uplink is a function of its 5-tuple and the uplink set: a
//! flow whose state was lost maps back to where it was, and a change of
//! the set moves few flows besides those of the uplink that left.
use multihome_common::{BALANCE_HASH, FlowKey, SELECT_SLOTS, SelectTable, flow_hash, select_slot};

/// An uplink as the table sees it.
#[derive(Clone, Copy, Debug)]
pub struct Member<'a> {
    /// Its slot in the UPLINKS map.
    pub id: u8,
    /// Its name: where it sits in the table depends on nothing else, so
    /// a reordered config or another uplink's change leaves it in place.
    pub name: &'a str,
    pub weight: u32,
    pub usable: bool,
}

/// Both columns of the table: `now` over the usable uplinks (weighted
/// ones, else usable backups equally), `preferred` over every configured
/// weighted uplink (else every one equally).
pub fn table(members: &[Member]) -> SelectTable {
    let mut t = SelectTable::default();
    let pick = |f: &dyn Fn(&Member) -> bool| -> Vec<(u8, &str, u32)> {
        let weighted: Vec<_> = members
            .iter()
            .filter(|m| f(m) && m.weight > 0)
            .map(|m| (m.id, m.name, m.weight))
            .collect();
        if !weighted.is_empty() {
            return weighted;
        }
        members
            .iter()
            .filter(|m| f(m))
            .map(|m| (m.id, m.name, 1))
            .collect()
    };
    if let Some(now) = maglev(&pick(&|m| m.usable)) {
        t.now = now;
        t.usable = 1;
    }
    if let Some(preferred) = maglev(&pick(&|_| true)) {
        t.preferred = preferred;
        t.configured = 1;
    }
    t
}

/// The uplink a flow's hash prefers (the datapath's `preferred` column):
/// of its 5-tuple, or of its two addresses under `balance = "hash"`.
pub fn preferred(t: &SelectTable, key: &FlowKey, seed: u32) -> Option<u8> {
    let key = if t.balance == BALANCE_HASH {
        key.addresses()
    } else {
        *key
    };
    (t.configured != 0).then(|| t.preferred[select_slot(flow_hash(&key, seed))])
}

/// Slots per member, in proportion to the weights (largest remainder), so
/// that every ratio the config allows is met to within one slot.
fn quotas(weights: &[u32]) -> Vec<usize> {
    let n = SELECT_SLOTS as u64;
    let total: u64 = weights.iter().map(|w| u64::from(*w)).sum();
    let mut q: Vec<(usize, u64)> = weights
        .iter()
        .map(|w| {
            let exact = u64::from(*w) * n;
            ((exact / total) as usize, exact % total)
        })
        .collect();
    let mut left = SELECT_SLOTS - q.iter().map(|(s, _)| s).sum::<usize>();
    let mut order: Vec<usize> = (0..q.len()).collect();
    order.sort_by_key(|i| std::cmp::Reverse(q[*i].1));
    for i in order {
        if left == 0 {
            break;
        }
        q[i].0 += 1;
        left -= 1;
    }
    q.into_iter().map(|(s, _)| s).collect()
}

/// MurmurHash3 of a name, salted.
fn name_hash(name: &str, salt: u32) -> u32 {
    use multihome_common::{murmur3_finish, murmur3_round};
    let h = name.as_bytes().chunks(4).fold(salt, |h, c| {
        let mut w = [0u8; 4];
        w[..c.len()].copy_from_slice(c);
        murmur3_round(h, u32::from_le_bytes(w))
    });
    murmur3_finish(h, name.len() as u32)
}

/// Maglev's population: members take turns, each claiming the next free
/// slot of its own permutation of the table until it holds its quota.
/// Members are taken in name order, so config order does not matter.
/// None when there are no members.
fn maglev(members: &[(u8, &str, u32)]) -> Option<[u8; SELECT_SLOTS]> {
    if members.is_empty() {
        return None;
    }
    let mut members = members.to_vec();
    members.sort_by_key(|m| m.1);
    let quota = quotas(&members.iter().map(|m| m.2).collect::<Vec<_>>());
    // The table size is a power of two: any odd skip visits every slot.
    let perm: Vec<(usize, usize)> = members
        .iter()
        .map(|m| {
            let offset = name_hash(m.1, 1) as usize % SELECT_SLOTS;
            let skip = (name_hash(m.1, 2) as usize % (SELECT_SLOTS / 2)) * 2 + 1;
            (offset, skip)
        })
        .collect();
    let mut owner: Vec<Option<u8>> = vec![None; SELECT_SLOTS];
    let mut next = vec![0usize; members.len()];
    let mut held = vec![0usize; members.len()];
    let mut filled = 0;
    while filled < SELECT_SLOTS {
        for (i, m) in members.iter().enumerate() {
            if held[i] == quota[i] {
                continue;
            }
            let (offset, skip) = perm[i];
            loop {
                let slot = (offset + next[i] * skip) % SELECT_SLOTS;
                next[i] += 1;
                if owner[slot].is_none() {
                    owner[slot] = Some(m.0);
                    held[i] += 1;
                    filled += 1;
                    break;
                }
            }
        }
    }
    let mut out = [0u8; SELECT_SLOTS];
    for (o, s) in out.iter_mut().zip(owner) {
        *o = s.expect("every slot is filled");
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(id: u8, name: &str, weight: u32, usable: bool) -> Member<'_> {
        Member {
            id,
            name,
            weight,
            usable,
        }
    }

    fn count(slots: &[u8], id: u8) -> usize {
        slots.iter().filter(|s| **s == id).count()
    }

    #[test]
    fn any_weight_ratio_gets_its_share_to_within_one_slot() {
        for (a, b) in [(1, 2), (1, 200), (1, 255), (255, 254), (3, 7)] {
            let t = table(&[m(0, "x", a, true), m(1, "y", b, true)]);
            let want = SELECT_SLOTS as f64 * f64::from(a) / f64::from(a + b);
            let got = count(&t.now, 0) as f64;
            assert!(
                (got - want).abs() <= 1.0,
                "{a}:{b}: {got} slots, want {want}"
            );
            assert_eq!(count(&t.now, 0) + count(&t.now, 1), SELECT_SLOTS);
        }
        // The smallest share the config allows: 1 against 7 × 255.
        let names = ["a", "b", "c", "d", "e", "f", "g", "h"];
        let members: Vec<_> = names
            .iter()
            .enumerate()
            .map(|(i, n)| m(i as u8, n, if i == 0 { 1 } else { 255 }, true))
            .collect();
        let t = table(&members);
        assert!(count(&t.now, 0) >= 2, "{}", count(&t.now, 0));
    }

    #[test]
    fn unusable_uplinks_get_no_slots_backups_step_in_and_preferred_ignores_health() {
        let t = table(&[m(0, "x", 1, false), m(1, "y", 2, true)]);
        assert_eq!(count(&t.now, 1), SELECT_SLOTS);
        assert_eq!(count(&t.preferred, 0), SELECT_SLOTS / 3);
        let t = table(&[m(0, "x", 1, false), m(1, "y", 0, true)]);
        assert_eq!(count(&t.now, 1), SELECT_SLOTS);
        assert_eq!(
            count(&t.preferred, 0),
            SELECT_SLOTS,
            "a backup is not preferred"
        );
        let t = table(&[m(0, "x", 1, false)]);
        assert_eq!((t.usable, t.configured), (0, 1));
    }

    #[test]
    fn losing_an_uplink_moves_few_flows_besides_its_own() {
        let all = [m(0, "x", 1, true), m(1, "y", 1, true), m(2, "z", 1, true)];
        let before = table(&all);
        let mut less = all;
        less[2].usable = false;
        let after = table(&less);
        let moved = before
            .now
            .iter()
            .zip(&after.now)
            .filter(|(b, a)| **b != 2 && a != b)
            .count();
        // Maglev moves a few percent more than the minimum (none).
        assert!(moved < SELECT_SLOTS / 20, "{moved} slots of x and y moved");
        // And it comes back where it was.
        assert_eq!(table(&all).now, before.now);
    }

    #[test]
    fn the_table_depends_on_names_not_on_config_order() {
        let a = table(&[m(0, "x", 1, true), m(1, "y", 3, true)]);
        let b = table(&[m(1, "y", 3, true), m(0, "x", 1, true)]);
        assert_eq!(a.now, b.now);
    }

    #[test]
    fn the_same_tuple_prefers_the_same_uplink_under_the_same_seed() {
        let t = table(&[m(0, "x", 1, true), m(1, "y", 1, true)]);
        let key = FlowKey {
            saddr_be: 0x0201_12c6,
            daddr_be: 0x0a00_13c6,
            sport_be: 0x409c,
            dport_be: 0xbb01,
            proto: 6,
            ..Default::default()
        };
        let p = preferred(&t, &key, 42).expect("configured");
        assert_eq!(preferred(&t, &key, 42), Some(p));
        let spread: std::collections::HashSet<_> = (0..64u16)
            .map(|port| {
                preferred(
                    &t,
                    &FlowKey {
                        sport_be: port,
                        ..key
                    },
                    42,
                )
            })
            .collect();
        assert_eq!(spread.len(), 2, "ports spread over both uplinks");
    }
}
