//! Policies: which traffic goes where, and how sticky it is. `[[rule]]`s
//! (first match wins) send a new flow to a `[[policy]]`, whose tiers of
//! uplinks and balance mode pick its uplink; a flow no rule matches uses
//! the built-in `balanced` policy (every uplink by weight). The rules are
//! compiled into per-field maps ([`compile`]) and matched by the datapath
//! for a flow's first packet only; `explain` answers from this model.
pub mod choice;
pub mod compile;
pub mod explain;

use std::{collections::HashMap, net::Ipv4Addr, path::Path};

use anyhow::{Context as _, bail};
use multihome_common::{
    BALANCE_CONNECTION, BALANCE_ENDPOINT, BALANCE_HASH, BALANCE_SITE, BALANCE_SOURCE, IPPROTO_ICMP,
    IPPROTO_TCP, IPPROTO_UDP, LAST_RESORT_ANY, LAST_RESORT_UNREACHABLE, MAX_POLICIES, MAX_RULES,
    ON_DOWN_KEEP, ON_DOWN_PURGE, ON_DOWN_PURGE_UDP, ON_DOWN_RESET, ON_DOWN_UPLINK, SelectTable,
};
use serde::Deserialize;

use crate::{
    config::{Config, Prefix},
    health::{OnDown, OnUp},
    netinfo::Snapshot,
};

/// The built-in policy of flows no rule matches: id 0.
pub const BALANCED: &str = "balanced";

/// A `[[policy]]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    pub name: String,
    /// Tiers of uplink names, each `"name"` or `"name:weight"`: tier 1
    /// while any member is usable, then tier 2, and so on.
    pub tiers: Vec<Vec<String>>,
    #[serde(default)]
    pub balance: Balance,
    /// `source` and `site`: how long an idle affinity lasts, in seconds.
    #[serde(default = "default_sticky_s")]
    pub sticky_s: u32,
    /// `site`: the prefix length that groups destinations into a site.
    #[serde(default = "default_site_prefix")]
    pub site_prefix: u8,
    /// With every tier down: any usable uplink, or refuse.
    #[serde(default)]
    pub last_resort: LastResort,
    /// What an outage of their uplink does to this policy's flows, as in
    /// `[uplink.health]`; unset: the uplink's own.
    pub on_down: Option<OnDown>,
    /// What the uplink's return does to this policy's failed-over flows;
    /// unset: the uplink's own.
    pub on_up: Option<OnUp>,
}

fn default_sticky_s() -> u32 {
    600
}

fn default_site_prefix() -> u8 {
    24
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Balance {
    /// A hash of the 5-tuple: per connection, weighted.
    #[default]
    Connection,
    /// One uplink per LAN host while it opens flows within `sticky_s`.
    Source,
    /// One uplink and NAT port per internal endpoint, for every remote.
    Endpoint,
    /// One uplink per (LAN host, destination site) within `sticky_s`.
    Site,
    /// A hash of (source, destination) addresses.
    Hash,
}

impl Balance {
    fn code(self) -> u8 {
        match self {
            Balance::Connection => BALANCE_CONNECTION,
            Balance::Endpoint => BALANCE_ENDPOINT,
            Balance::Source => BALANCE_SOURCE,
            Balance::Site => BALANCE_SITE,
            Balance::Hash => BALANCE_HASH,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Balance::Connection => "connection",
            Balance::Source => "source",
            Balance::Endpoint => "endpoint",
            Balance::Site => "site",
            Balance::Hash => "hash",
        }
    }

    pub fn sticky(self) -> bool {
        matches!(self, Balance::Source | Balance::Site)
    }
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LastResort {
    #[default]
    Any,
    Unreachable,
}

/// A `[[rule]]`: every field given must match; an omitted one matches
/// anything.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// Source prefixes, `"@IFACE"` for an interface's subnets, or
    /// `"@file:PATH"` for a file of prefixes.
    #[serde(default)]
    pub src: Vec<String>,
    /// Destination prefixes, as `src`.
    #[serde(default)]
    pub dst: Vec<String>,
    /// `"tcp"`, `"udp"`, `"icmp"` or a protocol number.
    pub proto: Option<ProtoSpec>,
    /// Destination ports or ranges (`"5060"`, `"10000-20000"`); without
    /// `proto` they mean TCP and UDP.
    #[serde(default)]
    pub dport: Vec<PortSpec>,
    /// DSCP, 0 to 63 (RFC 2474).
    pub dscp: Option<u8>,
    /// A policy's name, `"unreachable"` or `"main"`.
    pub policy: String,
    /// Its `[[rule]]` line in the file (1-based; 0 when unknown).
    #[serde(skip)]
    pub line: usize,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum ProtoSpec {
    Number(u8),
    Name(String),
}

impl ProtoSpec {
    pub fn number(&self) -> Result<u8, String> {
        match self {
            ProtoSpec::Number(n) => Ok(*n),
            ProtoSpec::Name(n) => match n.as_str() {
                "tcp" => Ok(IPPROTO_TCP),
                "udp" => Ok(IPPROTO_UDP),
                "icmp" => Ok(IPPROTO_ICMP),
                other => other.parse().map_err(|_| {
                    format!("`proto = {other:?}`: use tcp, udp, icmp or a protocol number")
                }),
            },
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum PortSpec {
    Number(u16),
    Text(String),
}

impl PortSpec {
    /// The inclusive range.
    pub fn range(&self) -> Result<(u16, u16), String> {
        let bad =
            |s: &str| format!("`dport` entry {s:?}: use a port or a range like \"10000-20000\"");
        match self {
            PortSpec::Number(n) => Ok((*n, *n)),
            PortSpec::Text(s) => {
                let (a, b) = s.split_once('-').unwrap_or((s, s));
                let a: u16 = a.trim().parse().map_err(|_| bad(s))?;
                let b: u16 = b.trim().parse().map_err(|_| bad(s))?;
                if a > b {
                    return Err(bad(s));
                }
                Ok((a, b))
            }
        }
    }
}

/// What a matching rule does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// To a policy, by id.
    Policy(u8),
    /// Refused: ICMP administratively prohibited.
    Unreachable,
    /// Not translated: the kernel routes it.
    Main,
}

/// A rule with its prefixes read: `None` matches anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Its `[[rule]]` line.
    pub line: usize,
    pub src: Option<Vec<Prefix>>,
    pub dst: Option<Vec<Prefix>>,
    pub protos: Option<Vec<u8>>,
    /// Inclusive ranges.
    pub ports: Option<Vec<(u16, u16)>>,
    pub dscp: Option<u8>,
    pub action: Action,
}

/// An uplink as policies see it now.
#[derive(Debug, Clone, Copy)]
pub struct UplinkNow<'a> {
    /// Its UPLINKS slot.
    pub slot: u8,
    pub name: &'a str,
    /// Its weight now (`multihome uplink set-weight` changes it).
    pub weight: u32,
    pub usable: bool,
}

/// A new flow as the rules see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub proto: u8,
    /// TCP and UDP only; 0 for other protocols.
    pub dport: u16,
    pub dscp: u8,
}

fn covers(set: &Option<Vec<Prefix>>, a: Ipv4Addr) -> bool {
    set.as_ref()
        .is_none_or(|ps| ps.iter().any(|p| p.contains(a)))
}

impl Rule {
    pub fn matches(&self, p: &Probe) -> bool {
        covers(&self.src, p.src)
            && covers(&self.dst, p.dst)
            && self.protos.as_ref().is_none_or(|ps| ps.contains(&p.proto))
            && self
                .ports
                .as_ref()
                .is_none_or(|rs| rs.iter().any(|(a, b)| (*a..=*b).contains(&p.dport)))
            && self.dscp.is_none_or(|d| d == p.dscp)
    }
}

/// A policy ready for the datapath: members by UPLINKS slot.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub id: u8,
    pub name: String,
    /// Per tier: (uplink index in the config, the weight this policy
    /// gives it; none: the uplink's own, as it is now).
    pub tiers: Vec<Vec<(usize, Option<u32>)>>,
    pub balance: Balance,
    pub sticky_s: u32,
    pub site_prefix: u8,
    pub last_resort: LastResort,
    pub on_down: Option<OnDown>,
    pub on_up: Option<OnUp>,
}

/// Every policy and rule of a config, resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct Policies {
    /// Indexed by id; 0 is `balanced`.
    pub policies: Vec<Option<Policy>>,
    pub rules: Vec<Rule>,
    /// The rules with `@IFACE` entries, by index: their prefixes follow
    /// the interfaces' addresses ([`Policies::follow_interfaces`]).
    pub following: Vec<(usize, Following)>,
}

/// A rule's `src` and `dst` as given, files read: what
/// [`Policies::follow_interfaces`] expands again when addresses change.
#[derive(Debug, Clone, PartialEq)]
pub struct Following {
    src: Option<Vec<Entry>>,
    dst: Option<Vec<Entry>>,
}

/// One `src`/`dst` entry: prefixes (given, or read from a file at start
/// and reload), or an interface whose subnets it stands for.
#[derive(Debug, Clone, PartialEq)]
enum Entry {
    Prefixes(Vec<Prefix>),
    Interface(String),
}

/// `entries` as prefixes, interfaces taken from `snap`. An unknown
/// interface is an error when `strict`, else it stands for nothing (it
/// went away: the rule field matches none of its former subnets).
fn expand(entries: &[Entry], snap: Option<&Snapshot>, strict: bool) -> anyhow::Result<Vec<Prefix>> {
    let mut out = Vec::new();
    for e in entries {
        match e {
            Entry::Prefixes(p) => out.extend(p.iter().copied()),
            Entry::Interface(name) => match snap.and_then(|s| s.get(name)) {
                Some(i) => out.extend(i.addrs.iter().map(|(a, len)| Prefix {
                    addr: *a,
                    len: *len,
                })),
                None if strict => bail!("interface {name:?} is not known"),
                None => {}
            },
        }
    }
    Ok(out)
}

/// The `[[policy]]` and `[[rule]]` problems of a config, each naming its
/// place; `@` references are checked where they can be (files exist and
/// parse; interfaces are resolved when the daemon runs).
pub fn problems(config: &Config) -> Vec<String> {
    let mut out = Vec::new();
    let uplinks: Vec<&str> = config.uplinks.iter().map(|u| u.name.as_str()).collect();
    if config.policies.len() + 1 > MAX_POLICIES as usize {
        out.push(format!(
            "{} policies; at most {} fit besides `balanced`",
            config.policies.len(),
            MAX_POLICIES - 1
        ));
    }
    let mut names = vec![BALANCED, "unreachable", "main"];
    for (i, p) in config.policies.iter().enumerate() {
        let at = format!("`[[policy]]` #{} (name = {:?})", i + 1, p.name);
        if p.name.is_empty() || p.name.len() > 15 {
            out.push(format!("{at}: `name` must be 1 to 15 characters"));
        }
        if names.contains(&p.name.as_str()) {
            out.push(format!(
                "{at}: the name is taken (by another policy, or built in: balanced, unreachable, main)"
            ));
        }
        names.push(&p.name);
        if p.tiers.is_empty() || p.tiers.iter().any(|t| t.is_empty()) {
            out.push(format!(
                "{at}: `tiers` needs at least one non-empty tier, e.g. [[\"x\"], [\"y\"]]"
            ));
        }
        for m in p.tiers.iter().flatten() {
            match member(m) {
                Ok((name, _)) if !uplinks.contains(&name) => out.push(format!(
                    "{at}: tier member {m:?}: no uplink named {name:?} (there are: {})",
                    uplinks.join(", ")
                )),
                Ok(_) => {}
                Err(e) => out.push(format!("{at}: {e}")),
            }
        }
        if p.sticky_s == 0 {
            out.push(format!("{at}: `sticky_s` must be at least 1 second"));
        }
        if p.site_prefix > 32 {
            out.push(format!("{at}: `site_prefix` must be 0 to 32"));
        }
    }
    if config.rules.len() > MAX_RULES as usize {
        out.push(format!(
            "{} rules; at most {MAX_RULES} are supported",
            config.rules.len()
        ));
    }
    for (i, r) in config.rules.iter().enumerate() {
        let at = rule_at(i, r);
        if !names.contains(&r.policy.as_str()) {
            out.push(format!(
                "{at}: `policy = {:?}`: no such policy (there are: {})",
                r.policy,
                names.join(", ")
            ));
        }
        for (field, list) in [("src", &r.src), ("dst", &r.dst)] {
            for s in list {
                if let Err(e) = entry_problem(s) {
                    out.push(format!("{at}: `{field}` entry {s:?}: {e}"));
                }
            }
        }
        let proto = r.proto.as_ref().map(ProtoSpec::number);
        if let Some(Err(e)) = &proto {
            out.push(format!("{at}: {e}"));
        }
        for p in &r.dport {
            if let Err(e) = p.range() {
                out.push(format!("{at}: {e}"));
            }
        }
        if !r.dport.is_empty()
            && let Some(Ok(p)) = proto
            && p != IPPROTO_TCP
            && p != IPPROTO_UDP
        {
            out.push(format!(
                "{at}: `dport` needs proto tcp or udp (or no proto)"
            ));
        }
        if r.dscp.is_some_and(|d| d > 63) {
            out.push(format!("{at}: `dscp` must be 0 to 63"));
        }
    }
    if out.is_empty() {
        // Shadowing needs every rule resolved; @interface ones are left out.
        let rules: Vec<Option<Rule>> = config
            .rules
            .iter()
            .map(|r| {
                resolve_rule(r, &names_to_ids(config), None)
                    .ok()
                    .map(|(r, _)| r)
            })
            .collect();
        for (j, later) in rules.iter().enumerate() {
            let Some(later) = later else { continue };
            if let Some(i) = (0..j).find(|i| rules[*i].as_ref().is_some_and(|e| shadows(e, later)))
            {
                out.push(format!(
                    "{}: can never match: {} matches everything it does",
                    rule_at(j, &config.rules[j]),
                    rule_at(i, &config.rules[i])
                ));
            }
        }
    }
    out
}

fn rule_at(i: usize, r: &RuleConfig) -> String {
    if r.line > 0 {
        format!("`[[rule]]` #{} (line {})", i + 1, r.line)
    } else {
        format!("`[[rule]]` #{}", i + 1)
    }
}

/// `"name"` or `"name:weight"`.
fn member(m: &str) -> Result<(&str, Option<u32>), String> {
    match m.split_once(':') {
        None => Ok((m, None)),
        Some((n, w)) => match w.parse::<u32>() {
            Ok(w) if w <= 255 => Ok((n, Some(w))),
            _ => Err(format!(
                "tier member {m:?}: the weight after `:` must be 0 to 255"
            )),
        },
    }
}

fn entry_problem(s: &str) -> Result<(), String> {
    if let Some(path) = s.strip_prefix("@file:") {
        read_prefix_file(Path::new(path)).map_err(|e| format!("{e:#}"))?;
    } else if let Some(iface) = s.strip_prefix('@') {
        if iface.is_empty() || iface.len() > 15 {
            return Err("`@` must be followed by an interface name or `file:PATH`".into());
        }
    } else {
        s.parse::<Prefix>()?;
    }
    Ok(())
}

/// A file of prefixes: one per line, `#` starts a comment.
pub fn read_prefix_file(path: &Path) -> anyhow::Result<Vec<Prefix>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading prefix file {}", path.display()))?;
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        match line.parse::<Prefix>() {
            Ok(p) => out.push(p),
            Err(e) => bail!("{}:{}: {e}", path.display(), n + 1),
        }
    }
    Ok(out)
}

fn names_to_ids(config: &Config) -> HashMap<String, u8> {
    config
        .policies
        .iter()
        .enumerate()
        .map(|(i, p)| (p.name.clone(), i as u8 + 1))
        .chain([(BALANCED.to_string(), 0)])
        .collect()
}

/// Resolves `r`: files are read, `@IFACE` entries take the interface's
/// subnets from `snap` (without one, they fail). Also returns the entries
/// when some are interfaces, to follow their addresses.
fn resolve_rule(
    r: &RuleConfig,
    ids: &HashMap<String, u8>,
    snap: Option<&Snapshot>,
) -> anyhow::Result<(Rule, Option<Following>)> {
    let entries = |list: &[String]| -> anyhow::Result<Option<Vec<Entry>>> {
        if list.is_empty() {
            return Ok(None);
        }
        let mut out = Vec::new();
        for s in list {
            out.push(if let Some(path) = s.strip_prefix("@file:") {
                Entry::Prefixes(read_prefix_file(Path::new(path))?)
            } else if let Some(iface) = s.strip_prefix('@') {
                Entry::Interface(iface.to_string())
            } else {
                Entry::Prefixes(vec![s.parse::<Prefix>().map_err(anyhow::Error::msg)?])
            });
        }
        Ok(Some(out))
    };
    let following = Following {
        src: entries(&r.src)?,
        dst: entries(&r.dst)?,
    };
    let prefixes = |e: &Option<Vec<Entry>>| -> anyhow::Result<Option<Vec<Prefix>>> {
        e.as_deref().map(|e| expand(e, snap, true)).transpose()
    };
    let (src, dst) = (prefixes(&following.src)?, prefixes(&following.dst)?);
    let proto = r
        .proto
        .as_ref()
        .map(ProtoSpec::number)
        .transpose()
        .map_err(anyhow::Error::msg)?;
    let ports = if r.dport.is_empty() {
        None
    } else {
        Some(
            r.dport
                .iter()
                .map(PortSpec::range)
                .collect::<Result<Vec<_>, _>>()
                .map_err(anyhow::Error::msg)?,
        )
    };
    let protos = match (proto, &ports) {
        (Some(p), _) => Some(vec![p]),
        (None, Some(_)) => Some(vec![IPPROTO_TCP, IPPROTO_UDP]),
        (None, None) => None,
    };
    let action = match r.policy.as_str() {
        "unreachable" => Action::Unreachable,
        "main" => Action::Main,
        name => Action::Policy(
            *ids.get(name)
                .with_context(|| format!("no policy named {name:?}"))?,
        ),
    };
    let rule = Rule {
        line: r.line,
        src,
        dst,
        protos,
        ports,
        dscp: r.dscp,
        action,
    };
    let interfaces = [&following.src, &following.dst]
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| matches!(e, Entry::Interface(_)));
    Ok((rule, interfaces.then_some(following)))
}

/// Whether `a`, earlier, matches every flow that `b` matches.
fn shadows(a: &Rule, b: &Rule) -> bool {
    let prefixes = |a: &Option<Vec<Prefix>>, b: &Option<Vec<Prefix>>| match (a, b) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(a), Some(b)) => b.iter().all(|q| a.iter().any(|p| p.covers(q))),
    };
    let protos = match (&a.protos, &b.protos) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(a), Some(b)) => b.iter().all(|p| a.contains(p)),
    };
    let ports = match (&a.ports, &b.ports) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(a), Some(b)) => b
            .iter()
            .all(|(lo, hi)| a.iter().any(|(x, y)| x <= lo && hi <= y)),
    };
    prefixes(&a.src, &b.src)
        && prefixes(&a.dst, &b.dst)
        && protos
        && ports
        && (a.dscp.is_none() || a.dscp == b.dscp)
}

impl Policies {
    /// Whether policy `id` sticks a host's flows together (`source`,
    /// `site`).
    pub fn is_sticky(&self, id: usize) -> bool {
        self.policies
            .get(id)
            .and_then(Option::as_ref)
            .is_some_and(|p| matches!(p.balance, Balance::Source | Balance::Site))
    }

    /// Whether a policy maps endpoints, so that their ports are reserved
    /// (`RULES_RESERVE`).
    pub fn reserves_ports(&self) -> bool {
        self.policies
            .iter()
            .flatten()
            .any(|p| p.balance == Balance::Endpoint)
    }

    /// Resolves the config's policies and rules, keeping the ids in
    /// `ids` (policy name -> id, from the running datapath) and giving new
    /// names the lowest free id. Interfaces come from `snap`.
    pub fn resolve(
        config: &Config,
        ids: &HashMap<String, u8>,
        snap: &Snapshot,
    ) -> anyhow::Result<Self> {
        let mut assigned: HashMap<String, u8> = HashMap::new();
        assigned.insert(BALANCED.into(), 0);
        for p in &config.policies {
            if let Some(id) = ids.get(&p.name)
                && *id != 0
            {
                assigned.insert(p.name.clone(), *id);
            }
        }
        let mut policies: Vec<Option<Policy>> = vec![None; MAX_POLICIES as usize];
        let all: Vec<(usize, Option<u32>)> = (0..config.uplinks.len()).map(|i| (i, None)).collect();
        policies[0] = Some(Policy {
            id: 0,
            name: BALANCED.into(),
            tiers: vec![all],
            balance: Balance::Connection,
            sticky_s: default_sticky_s(),
            site_prefix: default_site_prefix(),
            last_resort: LastResort::Any,
            on_down: None,
            on_up: None,
        });
        for p in &config.policies {
            let id = match assigned.get(&p.name) {
                Some(id) => *id,
                None => {
                    // An id a removed policy held last: its flows may
                    // still record it, so it goes last.
                    let used: Vec<u8> = assigned.values().copied().collect();
                    let held: Vec<u8> = ids.values().copied().collect();
                    let id = (1..MAX_POLICIES as u8)
                        .filter(|i| !used.contains(i))
                        .min_by_key(|i| (held.contains(i), *i))
                        .context("too many policies")?;
                    assigned.insert(p.name.clone(), id);
                    id
                }
            };
            let mut tiers = Vec::new();
            for t in &p.tiers {
                let mut members = Vec::new();
                for m in t {
                    let (name, weight) = member(m).map_err(anyhow::Error::msg)?;
                    let i = config
                        .uplinks
                        .iter()
                        .position(|u| u.name == name)
                        .with_context(|| format!("no uplink named {name:?}"))?;
                    members.push((i, weight));
                }
                tiers.push(members);
            }
            policies[id as usize] = Some(Policy {
                id,
                name: p.name.clone(),
                tiers,
                balance: p.balance,
                sticky_s: p.sticky_s,
                site_prefix: p.site_prefix,
                last_resort: p.last_resort,
                on_down: p.on_down,
                on_up: p.on_up,
            });
        }
        let mut rules = Vec::new();
        let mut following = Vec::new();
        for (i, r) in config.rules.iter().enumerate() {
            let (rule, follow) =
                resolve_rule(r, &assigned, Some(snap)).with_context(|| rule_at(i, r))?;
            rules.push(rule);
            following.extend(follow.map(|f| (i, f)));
        }
        Ok(Self {
            policies,
            rules,
            following,
        })
    }

    /// Expands the `@IFACE` entries again from `snap`, as the interfaces'
    /// addresses are now (an interface gone stands for nothing). Returns
    /// whether a rule changed; the caller then writes the rules.
    pub fn follow_interfaces(&mut self, snap: &Snapshot) -> bool {
        let mut changed = false;
        for (i, f) in &self.following {
            let expand = |e: &Option<Vec<Entry>>| {
                e.as_deref()
                    .map(|e| expand(e, Some(snap), false).unwrap_or_default())
            };
            let (src, dst) = (expand(&f.src), expand(&f.dst));
            let rule = &mut self.rules[*i];
            if rule.src != src || rule.dst != dst {
                rule.src = src;
                rule.dst = dst;
                changed = true;
            }
        }
        changed
    }

    /// The first rule `p` matches, by index, and its action.
    pub fn classify(&self, p: &Probe) -> (Option<usize>, Action) {
        match self.rules.iter().position(|r| r.matches(p)) {
            Some(i) => (Some(i), self.rules[i].action.clone()),
            None => (None, Action::Policy(0)),
        }
    }

    /// [`Policies::classify`] for an IPv6 flow: rules that name addresses
    /// (IPv4 prefixes) never match it, as in the datapath's `decide6`.
    pub fn classify6(&self, proto: u8, dport: u16, dscp: u8) -> (Option<usize>, Action) {
        let probe = Probe {
            src: Ipv4Addr::UNSPECIFIED,
            dst: Ipv4Addr::UNSPECIFIED,
            proto,
            dport,
            dscp,
        };
        let hit = self
            .rules
            .iter()
            .position(|r| r.src.is_none() && r.dst.is_none() && r.matches(&probe));
        match hit {
            Some(i) => (Some(i), self.rules[i].action.clone()),
            None => (None, Action::Policy(0)),
        }
    }

    /// The policy with `id`, or `balanced` when none has it (a flow whose
    /// policy a reload removed).
    pub fn get(&self, id: u8) -> &Policy {
        self.policies
            .get(id as usize)
            .and_then(Option::as_ref)
            .or(self.policies[0].as_ref())
            .expect("balanced is always there")
    }

    /// Every policy's choice table, by id, for `uplinks` (by config
    /// index) as they are now: the first tier with a usable member takes
    /// new flows; `preferred` is tier 1 as if all were usable. Unused ids
    /// get an empty table.
    pub fn tables(&self, uplinks: &[UplinkNow]) -> Vec<SelectTable> {
        let member = |(i, w): &(usize, Option<u32>)| choice::Member {
            id: uplinks[*i].slot,
            name: uplinks[*i].name,
            weight: w.unwrap_or(uplinks[*i].weight),
            usable: uplinks[*i].usable,
        };
        let balanced: Vec<choice::Member> = self.get(0).tiers[0].iter().map(member).collect();
        let any = choice::table(&balanced);
        self.policies
            .iter()
            .map(|p| {
                let Some(p) = p else {
                    return SelectTable::default();
                };
                let tiers: Vec<Vec<choice::Member>> = p
                    .tiers
                    .iter()
                    .map(|t| t.iter().map(member).collect())
                    .collect();
                let first = choice::table(&tiers[0]);
                let mut t = match tiers.iter().find(|t| t.iter().any(|m| m.usable)) {
                    Some(tier) => choice::table(tier),
                    None if p.last_resort == LastResort::Any => any,
                    None => SelectTable::default(),
                };
                t.preferred = first.preferred;
                t.configured = first.configured;
                t.now_members = if t.usable != 0 {
                    t.now.iter().fold(0, |m, id| m | 1 << *id)
                } else {
                    0
                };
                t.balance = p.balance.code();
                t.sticky_s = p.sticky_s;
                t.site_mask_be = Prefix {
                    addr: Ipv4Addr::UNSPECIFIED,
                    len: p.site_prefix,
                }
                .mask()
                .to_be();
                t.on_down = match p.on_down {
                    None => ON_DOWN_UPLINK,
                    Some(OnDown::Keep) => ON_DOWN_KEEP,
                    Some(OnDown::Purge) => ON_DOWN_PURGE,
                    Some(OnDown::PurgeUdp) => ON_DOWN_PURGE_UDP,
                    Some(OnDown::Reset) => ON_DOWN_RESET,
                };
                t.last_resort = match p.last_resort {
                    LastResort::Any => LAST_RESORT_ANY,
                    LastResort::Unreachable => LAST_RESORT_UNREACHABLE,
                };
                let n = p.name.len().min(15);
                t.name[..n].copy_from_slice(&p.name.as_bytes()[..n]);
                t
            })
            .collect()
    }

    /// Per policy id, the `on_down` and `on_up` its flows follow on an
    /// uplink whose own are `uplink`; an id no policy holds (a reload
    /// removed it) follows the uplink's, as `balanced` does.
    pub fn outage_fates(&self, uplink: (OnDown, OnUp)) -> Vec<(OnDown, OnUp)> {
        self.policies
            .iter()
            .map(|p| match p {
                Some(p) => (p.on_down.unwrap_or(uplink.0), p.on_up.unwrap_or(uplink.1)),
                None => uplink,
            })
            .collect()
    }

    /// The tier (0-based) that takes new flows of `p` now, if any.
    pub fn tier_in_use(p: &Policy, usable: &[bool]) -> Option<usize> {
        p.tiers
            .iter()
            .position(|t| t.iter().any(|(i, _)| usable[*i]))
    }
}

/// Policy name -> id, as the tables in SELECT name them.
pub fn ids_of(tables: &[SelectTable]) -> HashMap<String, u8> {
    tables
        .iter()
        .enumerate()
        .filter(|(_, t)| t.name[0] != 0)
        .map(|(i, t)| (t.name().to_string(), i as u8))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::config::tests::GOOD as UPLINKS;

    fn problems_of(extra: &str) -> String {
        match Config::parse(&format!("{UPLINKS}\n{extra}")) {
            Ok(_) => String::new(),
            Err(e) => format!("{e:#}"),
        }
    }

    #[test]
    fn check_names_unknown_uplinks_bad_prefixes_and_unknown_policies_with_the_line() {
        let p = problems_of(
            "[[policy]]\nname = \"voip\"\ntiers = [[\"x\"], [\"z:3\"]]\n\n\
             [[rule]]\nsrc = [\"198.18.1.0/33\"]\npolicy = \"voip\"\n\n\
             [[rule]]\ndport = [\"20-10\"]\npolicy = \"nope\"\n",
        );
        assert!(p.contains("no uplink named \"z\""), "{p}");
        assert!(
            p.contains("`[[rule]]` #1 (line 19): `src` entry \"198.18.1.0/33\""),
            "{p}"
        );
        assert!(p.contains("`[[rule]]` #2 (line 23)"), "{p}");
        assert!(p.contains("no such policy"), "{p}");
        assert!(p.contains("\"20-10\""), "{p}");
    }

    #[test]
    fn check_reports_a_rule_that_an_earlier_one_always_wins_over() {
        let p = problems_of(
            "[[policy]]\nname = \"p\"\ntiers = [[\"x\"]]\n\n\
             [[rule]]\ndst = [\"198.19.0.0/16\"]\nproto = \"udp\"\npolicy = \"p\"\n\n\
             [[rule]]\ndst = [\"198.19.5.0/24\"]\nproto = \"udp\"\ndport = [\"53\"]\npolicy = \"main\"\n\n\
             [[rule]]\ndst = [\"198.19.5.0/24\"]\ndport = [\"53\"]\npolicy = \"main\"\n",
        );
        assert!(
            p.contains("`[[rule]]` #2 (line 24): can never match: `[[rule]]` #1 (line 19)"),
            "{p}"
        );
        // Rule 3 also matches TCP, which rule 1 does not.
        assert!(!p.contains("#3"), "{p}");
    }

    #[test]
    fn tiers_fall_through_to_the_next_and_weights_can_be_overridden_per_member() {
        let c = Config::parse(&format!(
            "{UPLINKS}\n[[policy]]\nname = \"v\"\ntiers = [[\"x:3\"], [\"y\"]]\nlast_resort = \"unreachable\"\n"
        ))
        .expect("valid");
        let snap = Snapshot::new();
        let p = Policies::resolve(&c, &HashMap::new(), &snap).expect("resolves");
        let v = p.get(1);
        assert_eq!(v.tiers, vec![vec![(0, Some(3))], vec![(1, None)]]);
        let up = |x, y| {
            [
                UplinkNow {
                    slot: 0,
                    name: "x",
                    weight: 1,
                    usable: x,
                },
                UplinkNow {
                    slot: 1,
                    name: "y",
                    weight: 1,
                    usable: y,
                },
            ]
        };
        let t = p.tables(&up(true, true));
        assert_eq!(t[1].now_members, 0b01, "tier 1 while x is usable");
        assert_eq!(t[1].name(), "v");
        let t = p.tables(&up(false, true));
        assert_eq!(t[1].now_members, 0b10, "tier 2 once x is not");
        assert_eq!(t[1].preferred[0], 0, "preferred stays tier 1");
        let t = p.tables(&up(false, false));
        assert_eq!(t[1].usable, 0);
        assert_eq!(t[1].last_resort, LAST_RESORT_UNREACHABLE);
        // `balanced` spreads over both by their weights as they are now.
        let t = p.tables(&up(true, true));
        assert_eq!(t[0].now_members, 0b11);
        let mut now = up(true, true);
        now[1].weight = 0;
        assert_eq!(p.tables(&now)[0].now_members, 0b01, "y set to weight 0");
    }

    #[test]
    fn interface_entries_follow_the_interfaces_addresses_and_fixed_ones_stay() {
        let c = Config::parse(&format!(
            "{UPLINKS}\n[[policy]]\nname = \"v\"\ntiers = [[\"x\"]]\n\n\
             [[rule]]\nsrc = [\"@lan1\", \"198.18.9.0/24\"]\npolicy = \"v\"\n\n\
             [[rule]]\ndst = [\"198.19.0.0/16\"]\npolicy = \"v\"\n"
        ))
        .expect("valid");
        let lan1 = |addrs: &[(Ipv4Addr, u8)]| {
            let mut snap = Snapshot::new();
            snap.insert(
                "lan1".into(),
                crate::netinfo::Interface {
                    index: 7,
                    name: "lan1".into(),
                    up: true,
                    mtu: 1500,
                    l3: false,
                    mac: None,
                    addrs: addrs.to_vec(),
                },
            );
            snap
        };
        let a = (Ipv4Addr::new(198, 18, 2, 1), 24);
        let b = (Ipv4Addr::new(198, 18, 3, 1), 24);
        let mut p = Policies::resolve(&c, &HashMap::new(), &lan1(&[a])).expect("resolves");
        let src = |p: &Policies| p.rules[0].src.clone().expect("src");
        let fixed: Prefix = "198.18.9.0/24".parse().expect("prefix");
        let of = |(addr, len): (Ipv4Addr, u8)| Prefix { addr, len };
        assert_eq!(src(&p), vec![of(a), fixed]);
        assert_eq!(p.following.len(), 1, "only the rule naming an interface");

        assert!(!p.follow_interfaces(&lan1(&[a])), "nothing changed");
        assert!(p.follow_interfaces(&lan1(&[a, b])), "a subnet added");
        assert_eq!(src(&p), vec![of(a), of(b), fixed]);
        assert!(p.follow_interfaces(&Snapshot::new()), "the interface went");
        assert_eq!(
            src(&p),
            vec![fixed],
            "it stands for nothing; the rest stays"
        );
        assert_eq!(
            p.rules[1].dst,
            Some(vec!["198.19.0.0/16".parse().expect("prefix")])
        );
    }

    #[test]
    fn a_policys_own_on_down_and_on_up_override_the_uplinks_and_the_rest_follow_the_uplink() {
        let c = Config::parse(&format!(
            "{UPLINKS}\n[[policy]]\nname = \"v\"\ntiers = [[\"x\"]]\non_down = \"purge\"\n"
        ))
        .expect("valid");
        let p = Policies::resolve(&c, &HashMap::new(), &Snapshot::new()).expect("resolves");
        let fates = p.outage_fates((OnDown::Keep, OnUp::Return));
        assert_eq!(fates[0], (OnDown::Keep, OnUp::Return), "balanced");
        assert_eq!(fates[1], (OnDown::Purge, OnUp::Return), "v's on_down");
        assert_eq!(fates[2], (OnDown::Keep, OnUp::Return), "an unused id");
        let up = [UplinkNow {
            slot: 0,
            name: "x",
            weight: 1,
            usable: true,
        }];
        let mut two = up.to_vec();
        two.push(UplinkNow {
            slot: 1,
            name: "y",
            weight: 1,
            usable: true,
        });
        let t = p.tables(&two);
        assert_eq!(
            (t[0].on_down, t[1].on_down),
            (ON_DOWN_UPLINK, ON_DOWN_PURGE)
        );
    }

    #[test]
    fn a_prefix_file_takes_comments_and_names_the_bad_line() {
        let dir = std::env::temp_dir().join(format!("mh-prefixes-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let f = dir.join("p.txt");
        std::fs::write(&f, "# banks\n198.19.0.0/16 # one\n\n198.20.0.0/99\n").expect("write");
        let e = format!("{:#}", read_prefix_file(&f).expect_err("bad line"));
        assert!(e.contains("p.txt:4"), "{e}");
        std::fs::write(&f, "# banks\n198.19.0.0/16 # one\n\n198.20.0.0/15\n").expect("write");
        assert_eq!(read_prefix_file(&f).expect("good").len(), 2);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
