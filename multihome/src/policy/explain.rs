//! `multihome explain`: why a new flow would go where it goes, from the
//! same rules, tables and affinities the datapath uses.
use std::net::{IpAddr, Ipv6Addr};

use multihome_common::{
    Affinity, AffinityKey, BALANCE_CONNECTION, BALANCE_ENDPOINT, BALANCE_HASH, BALANCE_SITE,
    BALANCE_SOURCE, Endpoint, EndpointKey, Flow6Key, FlowKey, IPPROTO_ICMP, IPPROTO_TCP,
    IPPROTO_UDP, SelectTable, flow_hash, select_slot,
};

use crate::config::Prefix6;
use serde::{Deserialize, Serialize};

use super::{Action, Balance, LastResort, Policies, Probe, UplinkNow};

/// A flow to explain.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Query {
    /// The LAN host; IPv4 or IPv6, as `dst`.
    pub src: IpAddr,
    /// Without it, a per-connection choice cannot be named.
    pub sport: Option<u16>,
    pub dst: IpAddr,
    pub proto: u8,
    pub dport: u16,
    pub dscp: u8,
}

/// The answer, for text or JSON.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Explanation {
    /// The matching rule: its number (1-based) and line; none: `balanced`.
    pub rule: Option<RuleHit>,
    /// `policy`, `unreachable` or `main`.
    pub action: String,
    pub policy: Option<String>,
    pub balance: Option<String>,
    /// The tier (1-based) that takes new flows now; none when every tier
    /// is down (then `last_resort` decides).
    pub tier: Option<usize>,
    pub last_resort: Option<String>,
    /// The uplinks a new flow could take now, with their weights.
    pub candidates: Vec<Candidate>,
    /// The uplink a new flow takes now, when it can be named.
    pub uplink: Option<String>,
    /// Why `uplink` is what it is, or why it cannot be named.
    pub why: String,
    /// For `source` and `site`: the affinity record that decides.
    pub affinity: Option<AffinityView>,
    /// For `endpoint`: the endpoint's record, if it has one.
    pub endpoint: Option<EndpointView>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct EndpointView {
    pub uplink: String,
    /// The public port every remote sees the endpoint from.
    pub nat_port: u16,
    /// Whether it holds (its uplink in the tier in use).
    pub live: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RuleHit {
    pub number: usize,
    pub line: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Candidate {
    pub uplink: String,
    pub weight: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AffinityView {
    pub uplink: String,
    /// Seconds since it last placed a flow.
    pub idle_s: u64,
    /// Whether it still holds (fresh, its uplink in the tier in use).
    pub live: bool,
}

/// What the daemon knows that an explanation reads.
pub struct State<'a> {
    pub policies: &'a Policies,
    /// By policy id.
    pub tables: &'a [SelectTable],
    /// By config index.
    pub uplinks: &'a [UplinkNow<'a>],
    pub seed: u32,
    /// The record of an affinity key, read from `AFFINITY`.
    pub affinity: &'a dyn Fn(&AffinityKey) -> Option<Affinity>,
    /// The record of an endpoint, read from `ENDPOINTS`.
    pub endpoint: &'a dyn Fn(&EndpointKey) -> Option<Endpoint>,
    /// Boot-clock nanoseconds now.
    pub now_ns: u64,
    /// The LAN's internal IPv6 prefixes (`lan_prefixes6`).
    pub lan6: &'a [Prefix6],
    /// By config index: the uplink has an IPv6 prefix now.
    pub ipv6: &'a [bool],
}

impl Query {
    /// Errors: `src` and `dst` of different families.
    pub fn check(&self) -> Result<(), String> {
        if self.src.is_ipv4() != self.dst.is_ipv4() {
            return Err(format!(
                "--src {} and --dst {} are of different families",
                self.src, self.dst
            ));
        }
        Ok(())
    }
}

pub fn explain(q: &Query, s: &State) -> Explanation {
    let ports = q.proto == IPPROTO_TCP || q.proto == IPPROTO_UDP;
    let dport = if ports { q.dport } else { 0 };
    let mut e = Explanation {
        rule: None,
        action: "policy".into(),
        policy: None,
        balance: None,
        tier: None,
        last_resort: None,
        candidates: Vec::new(),
        uplink: None,
        why: String::new(),
        affinity: None,
        endpoint: None,
    };
    let (rule, action) = match (q.src, q.dst) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => s.policies.classify(&Probe {
            src,
            dst,
            proto: q.proto,
            dport,
            dscp: q.dscp,
        }),
        (IpAddr::V6(src), _) => {
            if !s.lan6.iter().any(|p| {
                p.covers(&Prefix6 {
                    addr: src,
                    len: 128,
                })
            }) {
                e.action = "main".into();
                e.why = "not from `lan_prefixes6`: not translated; the kernel routes it".into();
                return e;
            }
            s.policies.classify6(q.proto, dport, q.dscp)
        }
        (IpAddr::V4(_), IpAddr::V6(_)) => {
            e.why = "--src and --dst are of different families".into();
            return e;
        }
    };
    e.rule = rule.map(|i| RuleHit {
        number: i + 1,
        line: s.policies.rules[i].line,
    });
    let id = match action {
        Action::Unreachable => {
            e.action = "unreachable".into();
            e.why = "refused: ICMP administratively prohibited".into();
            return e;
        }
        Action::Main => {
            e.action = "main".into();
            e.why = "not translated: the kernel routes it".into();
            return e;
        }
        Action::Policy(id) => id,
    };
    let p = s.policies.get(id);
    e.policy = Some(p.name.clone());
    e.balance = Some(p.balance.name().into());
    let name_of = |slot: u8| {
        s.uplinks
            .iter()
            .find(|u| u.slot == slot)
            .map_or_else(|| format!("slot {slot}"), |u| u.name.to_string())
    };
    let usable: Vec<bool> = s.uplinks.iter().map(|u| u.usable).collect();
    e.tier = Policies::tier_in_use(p, &usable).map(|t| t + 1);
    let members: Vec<(usize, Option<u32>)> = match e.tier {
        Some(t) => p.tiers[t - 1].clone(),
        None if p.last_resort == LastResort::Any => s.policies.get(0).tiers[0].clone(),
        None => Vec::new(),
    };
    if e.tier.is_none() {
        e.last_resort = Some(
            match p.last_resort {
                LastResort::Any => "any",
                LastResort::Unreachable => "unreachable",
            }
            .into(),
        );
    }
    let v6 = match (q.src, q.dst) {
        (IpAddr::V6(src), IpAddr::V6(dst)) => Some((src, dst)),
        _ => None,
    };
    let live: Vec<(usize, u32)> = members
        .iter()
        .filter(|(i, _)| usable[*i] && (v6.is_none() || s.ipv6.get(*i) == Some(&true)))
        .map(|(i, w)| (*i, w.unwrap_or(s.uplinks[*i].weight)))
        .collect();
    let weighted = live.iter().any(|(_, w)| *w > 0);
    e.candidates = live
        .iter()
        .filter(|(_, w)| *w > 0 || !weighted)
        .map(|(i, w)| Candidate {
            uplink: s.uplinks[*i].name.to_string(),
            weight: *w,
        })
        .collect();
    let Some(t) = s.tables.get(id as usize).filter(|t| t.usable != 0) else {
        e.why = match p.last_resort {
            LastResort::Unreachable => "every tier is down: refused (last_resort)".into(),
            LastResort::Any => "no uplink is usable".into(),
        };
        return e;
    };
    if let Some((src, dst)) = v6 {
        explain6(&mut e, q, s, t, (src, dst, dport));
        return e;
    }
    let (IpAddr::V4(src), IpAddr::V4(dst)) = (q.src, q.dst) else {
        return e;
    };
    if p.balance.sticky() {
        let key = AffinityKey {
            saddr_be: u32::from(src).to_be(),
            site_be: if p.balance == Balance::Site {
                u32::from(dst).to_be() & t.site_mask_be
            } else {
                0
            },
            policy: id,
            _pad0: 0,
            _pad1: 0,
        };
        if let Some(a) = (s.affinity)(&key) {
            let idle_ns = s.now_ns.saturating_sub(a.last_ns);
            let holds = idle_ns <= u64::from(t.sticky_s) * 1_000_000_000
                && a.uplink < 32
                && t.now_members & (1 << a.uplink) != 0;
            e.affinity = Some(AffinityView {
                uplink: name_of(a.uplink),
                idle_s: idle_ns / 1_000_000_000,
                live: holds,
            });
            if holds {
                e.uplink = Some(name_of(a.uplink));
                e.why = format!(
                    "affinity: this {} sticks to it for {} s after its last new flow",
                    if p.balance == Balance::Site {
                        "host and site"
                    } else {
                        "host"
                    },
                    t.sticky_s
                );
                return e;
            }
        }
    }
    let endpoint_mapped = ports || q.proto == IPPROTO_ICMP;
    if p.balance == Balance::Endpoint
        && endpoint_mapped
        && let Some(sport) = q.sport
    {
        let key = EndpointKey {
            lan_addr_be: u32::from(src).to_be(),
            lan_port_be: sport.to_be(),
            proto: q.proto,
            policy: id,
        };
        if let Some(r) = (s.endpoint)(&key) {
            let holds = r.uplink < 32 && t.now_members & (1 << r.uplink) != 0;
            e.endpoint = Some(EndpointView {
                uplink: name_of(r.uplink),
                nat_port: u16::from_be(r.nat_port_be),
                live: holds,
            });
            if holds {
                e.uplink = Some(name_of(r.uplink));
                e.why = format!(
                    "endpoint record: every remote sees this endpoint from its port {}",
                    u16::from_be(r.nat_port_be)
                );
                return e;
            }
        }
    }
    let key = |sport: u16| FlowKey {
        saddr_be: u32::from(src).to_be(),
        daddr_be: u32::from(dst).to_be(),
        sport_be: sport.to_be(),
        dport_be: if ports { q.dport.to_be() } else { 0 },
        proto: q.proto,
        _pad0: 0,
        _pad1: 0,
    };
    let hashed = if t.balance == BALANCE_HASH {
        Some(key(0).addresses())
    } else {
        q.sport.map(key)
    };
    match hashed {
        Some(k) => {
            let slot = select_slot(flow_hash(&k, s.seed));
            e.uplink = Some(name_of(t.now[slot]));
            e.why = format!(
                "its hash ({}) picks it from the tier's weighted table{}",
                if t.balance == BALANCE_HASH {
                    "source and destination"
                } else {
                    "5-tuple"
                },
                if p.balance.sticky() {
                    "; that makes the affinity"
                } else if p.balance == Balance::Endpoint {
                    "; that makes the endpoint's record"
                } else {
                    ""
                }
            );
        }
        None => {
            e.why = "per connection: the uplink depends on the source port (give --sport)".into();
        }
    }
    e
}

/// The IPv6 half of [`explain`] once the policy's table `t` is known: as
/// the datapath's `choose` (multihome-ebpf `ipv6.rs`), the hash of what
/// the balance mode sticks by ([`Flow6Key::fold`]) picks a slot; if that
/// uplink cannot take IPv6 now, the first one (by slot) that can does.
fn explain6(
    e: &mut Explanation,
    q: &Query,
    s: &State,
    t: &SelectTable,
    (src, dst, dport): (Ipv6Addr, Ipv6Addr, u16),
) {
    let per_port = matches!(t.balance, BALANCE_CONNECTION | BALANCE_ENDPOINT);
    let Some(sport) = q.sport.or((!per_port).then_some(0)) else {
        e.why = "per connection: the uplink depends on the source port (give --sport)".into();
        return;
    };
    let key = Flow6Key {
        lan: src.octets(),
        remote: dst.octets(),
        lan_port_be: sport.to_be(),
        remote_port_be: dport.to_be(),
        proto: q.proto,
        ..Default::default()
    };
    let what = match t.balance {
        BALANCE_HASH => "source and destination",
        BALANCE_SOURCE => "source",
        BALANCE_SITE => "source and the destination's /64",
        BALANCE_ENDPOINT => "internal endpoint",
        _ => "5-tuple",
    };
    let takes = |slot: u8| {
        s.uplinks
            .iter()
            .zip(s.ipv6)
            .find(|(u, _)| u.slot == slot)
            .filter(|(u, v6)| u.usable && **v6)
            .map(|(u, _)| u.name.to_string())
    };
    let picked = t.now[select_slot(flow_hash(&key.fold(t.balance), s.seed))];
    let sticky = if t.balance == BALANCE_CONNECTION {
        ""
    } else {
        " (NPTv6 keeps no per-host record: the hash is the stickiness)"
    };
    if let Some(name) = takes(picked) {
        e.uplink = Some(name);
        e.why = format!("its hash ({what}) picks it from the tier's weighted table{sticky}");
        return;
    }
    let mut by_slot: Vec<u8> = s.uplinks.iter().map(|u| u.slot).collect();
    by_slot.sort_unstable();
    e.uplink = by_slot.into_iter().find_map(takes);
    e.why = match &e.uplink {
        Some(_) => format!(
            "its hash ({what}) picks slot {picked}, which cannot take IPv6 now: the first uplink \
             that can takes it"
        ),
        None => "no usable uplink has an IPv6 prefix".into(),
    };
}
