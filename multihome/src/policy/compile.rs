//! Rules into the datapath's per-field maps: for each field, the set of
//! rules ([`RuleSet`]) that each value matches. Prefix fields become LPM
//! entries whose sets fold in every shorter prefix's rules, so the
//! longest match alone decides; a /0 entry holds the rules that match any
//! address.
use std::collections::{BTreeMap, HashMap};

use multihome_common::{MAX_RULES, RULE_MAIN, RULE_UNREACHABLE, RULE_WORDS, RuleAction, RuleSet};

use super::{Action, Rule};
use crate::config::Prefix;

/// One bank's content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compiled {
    pub rules: u32,
    /// (network, length) -> rules.
    pub src: BTreeMap<(u32, u8), RuleSet>,
    pub dst: BTreeMap<(u32, u8), RuleSet>,
    /// By protocol number.
    pub proto: Vec<RuleSet>,
    /// By destination port (0 for protocols without ports).
    pub dport: Vec<RuleSet>,
    /// By DSCP.
    pub dscp: Vec<RuleSet>,
    /// By rule index.
    pub action: Vec<RuleAction>,
}

fn set(rs: &mut RuleSet, rule: usize) {
    rs[rule / 64] |= 1 << (rule % 64);
}

/// Compiles `rules` (at most [`MAX_RULES`]).
pub fn compile(rules: &[Rule]) -> Compiled {
    assert!(rules.len() <= MAX_RULES as usize);
    let empty: RuleSet = [0; RULE_WORDS];
    let mut c = Compiled {
        rules: rules.len() as u32,
        src: prefix_field(rules, |r| &r.src),
        dst: prefix_field(rules, |r| &r.dst),
        proto: vec![empty; 256],
        dport: vec![empty; 65536],
        dscp: vec![empty; 64],
        action: vec![0; MAX_RULES as usize],
    };
    for (i, r) in rules.iter().enumerate() {
        for p in 0..256 {
            if r.protos.as_ref().is_none_or(|ps| ps.contains(&(p as u8))) {
                set(&mut c.proto[p], i);
            }
        }
        match &r.ports {
            None => c.dport.iter_mut().for_each(|s| set(s, i)),
            Some(ranges) => {
                for (a, b) in ranges {
                    for port in *a..=*b {
                        set(&mut c.dport[port as usize], i);
                    }
                }
            }
        }
        for d in 0..64 {
            if r.dscp.is_none_or(|x| x as usize == d) {
                set(&mut c.dscp[d], i);
            }
        }
        c.action[i] = match r.action {
            Action::Policy(id) => id as RuleAction,
            Action::Unreachable => RULE_UNREACHABLE,
            Action::Main => RULE_MAIN,
        };
    }
    c
}

/// The LPM entries of one prefix field.
fn prefix_field(
    rules: &[Rule],
    field: impl Fn(&Rule) -> &Option<Vec<Prefix>>,
) -> BTreeMap<(u32, u8), RuleSet> {
    // Rules listing each prefix exactly; "any" is 0/0.
    let mut direct: HashMap<(u32, u8), RuleSet> = HashMap::new();
    direct.insert((0, 0), [0; RULE_WORDS]);
    for (i, r) in rules.iter().enumerate() {
        match field(r) {
            None => set(direct.get_mut(&(0, 0)).expect("0/0"), i),
            Some(ps) => {
                for p in ps {
                    let k = (u32::from(p.network()), p.len);
                    set(direct.entry(k).or_insert([0; RULE_WORDS]), i);
                }
            }
        }
    }
    // Each entry also holds the rules of every prefix that covers it.
    direct
        .keys()
        .map(|&(net, len)| {
            let mut rs = [0; RULE_WORDS];
            for l in 0..=len {
                let mask = if l == 0 { 0 } else { u32::MAX << (32 - l) };
                if let Some(d) = direct.get(&(net & mask, l)) {
                    for w in 0..RULE_WORDS {
                        rs[w] |= d[w];
                    }
                }
            }
            ((net, len), rs)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::policy::Probe;

    fn rule(src: Option<&[&str]>, ports: Option<(u16, u16)>, policy: u8) -> Rule {
        Rule {
            line: 0,
            src: src.map(|s| s.iter().map(|p| p.parse().expect("prefix")).collect()),
            dst: None,
            protos: ports.map(|_| vec![6, 17]),
            ports: ports.map(|p| vec![p]),
            dscp: None,
            action: Action::Policy(policy),
        }
    }

    /// What the datapath computes: longest-prefix lookups and the lowest
    /// bit of the intersection.
    fn lookup(c: &Compiled, p: &Probe) -> Option<RuleAction> {
        let lpm = |m: &BTreeMap<(u32, u8), RuleSet>, a: Ipv4Addr| {
            m.iter()
                .filter(|((net, len), _)| {
                    Prefix {
                        addr: Ipv4Addr::from(*net),
                        len: *len,
                    }
                    .contains(a)
                })
                .max_by_key(|((_, len), _)| *len)
                .map(|(_, rs)| *rs)
        };
        let (s, d) = (lpm(&c.src, p.src)?, lpm(&c.dst, p.dst)?);
        for w in 0..RULE_WORDS {
            let hits = s[w]
                & d[w]
                & c.proto[p.proto as usize][w]
                & c.dport[p.dport as usize][w]
                & c.dscp[p.dscp as usize][w];
            if hits != 0 {
                return Some(c.action[w * 64 + hits.trailing_zeros() as usize]);
            }
        }
        None
    }

    #[test]
    fn compiled_maps_pick_the_first_matching_rule_as_a_walk_of_the_rules_would() {
        let mut rules = vec![
            rule(Some(&["198.18.1.0/28"]), Some((5060, 5061)), 1),
            rule(Some(&["198.18.0.0/16"]), None, 2),
            rule(None, Some((443, 443)), 3),
        ];
        // Rules past the first word of the set.
        for i in 0..70 {
            rules.push(rule(
                Some(&["198.19.0.0/16"]),
                Some((1000 + i, 1000 + i)),
                4,
            ));
        }
        let c = compile(&rules);
        let policies = crate::policy::Policies {
            policies: vec![],
            rules: rules.clone(),
            following: vec![],
        };
        for src in [
            "198.18.1.3",
            "198.18.1.20",
            "198.18.9.9",
            "198.19.5.5",
            "10.0.0.1",
        ] {
            for dport in [0, 443, 5060, 5062, 1000, 1069, 1070] {
                for proto in [6, 17, 1] {
                    let p = Probe {
                        src: src.parse().expect("address"),
                        dst: "198.19.200.1".parse().expect("address"),
                        proto,
                        dport: if proto == 1 { 0 } else { dport },
                        dscp: 0,
                    };
                    let want = match policies.classify(&p) {
                        (Some(_), Action::Policy(id)) => Some(id as RuleAction),
                        _ => None,
                    };
                    assert_eq!(lookup(&c, &p), want, "{p:?}");
                }
            }
        }
    }
}
