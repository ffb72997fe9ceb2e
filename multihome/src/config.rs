//! The TOML config: parsed, defaulted and validated, with errors that say
//! where the problem is and what to change.
use std::{collections::HashSet, fmt::Write as _, net::Ipv4Addr, path::Path};

use anyhow::{Context as _, bail};
use multihome_common::{
    AFFINITY_ENTRIES, DEFAULT_MAX_FLOWS, ENDPOINT_ENTRIES, MAX_LAN_NETS, MAX_ROUTED_PREFIXES,
    MAX_UPLINKS,
};
use serde::Deserialize;

use crate::{
    health::HealthConfig,
    policy::{PolicyConfig, RuleConfig},
};

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// LAN-facing interfaces; new flows arriving here are balanced.
    pub lan: Vec<String>,
    /// Extra source prefixes allowed to be translated (besides the LAN
    /// interfaces' own subnets), e.g. networks routed behind the LAN.
    #[serde(default)]
    pub lan_prefixes: Vec<String>,
    /// The LAN's internal IPv6 prefixes (ULAs such as `fd00:1::/64`), up
    /// to `MAX_LAN6`, of one length: NPTv6 maps the `i`-th onto subnet
    /// `i` of each uplink's `prefix6`. Empty: the ULA prefix of each LAN
    /// interface (`lan6_learned`).
    #[serde(default)]
    pub lan_prefixes6: Vec<String>,
    /// Unsolicited IPv6 connections from outside that may reach the LAN
    /// (RFC 6092 simple security drops every other): `"fd00:1::10/128"`
    /// (those hosts, any port), `"tcp/22"` (that port on every host), or
    /// both, `"fd00:1::10 udp/51820"`.
    #[serde(default)]
    pub allow_inbound6: Vec<String>,
    #[serde(rename = "uplink", default)]
    pub uplinks: Vec<UplinkConfig>,
    #[serde(default)]
    pub nat: NatConfig,
    #[serde(default)]
    pub timeouts: Timeouts,
    #[serde(default)]
    pub routing: RoutingConfig,
    /// Policies that rules send flows to (see `policy`).
    #[serde(rename = "policy", default)]
    pub policies: Vec<PolicyConfig>,
    /// First match wins; unmatched flows use the `balanced` policy.
    #[serde(rename = "rule", default)]
    pub rules: Vec<RuleConfig>,
    /// Where the XDP fast path runs in front of TC.
    #[serde(default)]
    pub xdp: XdpMode,
    /// With `lan_prefixes6` empty: the ULA prefix of each LAN interface
    /// that has one, with the interface's place in `lan` (the subnet it
    /// maps onto), as the daemon found them (never the file's).
    #[serde(skip)]
    pub lan6_learned: Vec<(u64, Prefix6)>,
}

/// `xdp`: where packets of pinned flows take the XDP path.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum XdpMode {
    /// Only on interfaces whose driver runs XDP natively on raw frames
    /// (not veth, tun or generic XDP): where it pays.
    #[default]
    Auto,
    /// On every LAN and uplink interface with an Ethernet header, or the
    /// daemon fails.
    Native,
    /// Nowhere: every packet goes through TC.
    Off,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UplinkConfig {
    pub name: String,
    pub interface: String,
    /// Next hop; omitted on point-to-point links.
    pub gateway: Option<Ipv4Addr>,
    #[serde(default = "one")]
    pub weight: u32,
    /// SNAT address; learned from the interface when omitted.
    pub address: Option<Ipv4Addr>,
    /// Health probes; without them the uplink is up while its link is.
    pub health: Option<HealthConfig>,
    /// Source prefixes (a routed public subnet) that leave through this
    /// uplink untranslated; the egress guard drops every other foreign
    /// source.
    #[serde(default)]
    pub routed_prefixes: Vec<String>,
    /// TCP MSS clamping of SYN and SYN-ACK; unset: `auto` on uplinks
    /// without an Ethernet header (ppp, tun), `off` elsewhere.
    pub mss_clamp: Option<MssClamp>,
    /// IPv6 next hop; omitted on point-to-point links.
    pub gateway6: Option<std::net::Ipv6Addr>,
    /// The IPv6 prefix the ISP routes to the gateway; omitted, it is
    /// learned from the prefix delegated to the uplink (DHCPv6-PD), and
    /// until one is, the uplink takes no IPv6 flows.
    pub prefix6: Option<String>,
    /// The block the uplink's ISP delegates prefixes from: which learned
    /// delegation is this uplink's when several uplinks learn.
    pub pd_pool6: Option<String>,
    /// The subnet of a learned delegation that NPTv6 maps onto, sized as
    /// `lan_prefixes6`; unset: 0, the first.
    pub pd_subnet6: Option<u64>,
    /// How IPv6 leaves this uplink.
    #[serde(default)]
    pub mode6: Mode6,
    /// The ISP has `prefix6` on-link (it asks for each address by
    /// neighbour solicitation) rather than routed to the gateway: answer
    /// for the LAN hosts' mapped addresses (NDP proxy).
    #[serde(default)]
    pub ndp_proxy: bool,
    /// Its slot in the UPLINKS map, which flows, marks and tables are
    /// numbered by: its position in the file, unless maps adopted from an
    /// earlier run hold it elsewhere (by name; see [`Config::adopt_slots`]).
    #[serde(skip)]
    pub slot: u8,
    /// The prefix learned from a delegation while `prefix6` is omitted:
    /// the daemon's, never the file's.
    #[serde(skip)]
    pub learned6: Option<Learned6>,
}

/// A `prefix6` learned from a delegated prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Learned6 {
    /// What the DHCPv6-PD client installed (its unreachable route, or an
    /// address's prefix).
    pub delegated: Prefix6,
    /// The subnet of it that NPTv6 maps the LAN onto (`pd_subnet6`).
    pub npt: Prefix6,
}

/// `mode6`: how a LAN host's IPv6 leaves an uplink.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Mode6 {
    /// NPTv6 (RFC 6296): `lan_prefixes6` mapped onto `prefix6`.
    #[default]
    Npt,
    /// Address and port translation to the uplink's one address, as
    /// IPv4's SNAT: for an ISP that hands out a single /128.
    Nat66,
    /// No translation: only `routed_prefixes` sources leave.
    Off,
}

/// `mss_clamp`: `"auto"` (the uplink's MTU - 40), a number of bytes, or
/// `"off"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MssClamp {
    Auto,
    Off,
    Bytes(u16),
}

impl MssClamp {
    pub const MIN: u16 = 536;

    /// The clamp for a device with this MTU, in bytes; 0 for none.
    pub fn bytes(self, mtu: u32) -> u16 {
        match self {
            MssClamp::Auto => mtu.saturating_sub(40).min(u16::MAX as u32) as u16,
            MssClamp::Off => 0,
            MssClamp::Bytes(b) => b,
        }
    }
}

impl<'de> Deserialize<'de> for MssClamp {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Word(String),
            Bytes(i64),
        }
        match Raw::deserialize(d)? {
            Raw::Word(w) if w == "auto" => Ok(MssClamp::Auto),
            Raw::Word(w) if w == "off" => Ok(MssClamp::Off),
            Raw::Bytes(b) if (i64::from(MssClamp::MIN)..=65_495).contains(&b) => {
                Ok(MssClamp::Bytes(b as u16))
            }
            _ => Err(serde::de::Error::custom(format!(
                "`mss_clamp` must be \"auto\", \"off\" or {} to 65495 bytes",
                MssClamp::MIN
            ))),
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct NatConfig {
    /// Ports for SNAT when a LAN port cannot be kept: `[first, last]`.
    pub snat_ports: [u16; 2],
    /// Capacity of the connection map, in flows.
    pub max_flows: u32,
    /// Flows one LAN host may hold at once; default `max_flows / 8`.
    pub max_flows_per_host: Option<u32>,
    /// Affinity records of `source` and `site` policies (an LRU map).
    pub max_affinities: u32,
    /// Endpoint records of `endpoint` policies.
    pub max_endpoints: u32,
}

impl NatConfig {
    /// `max_flows_per_host`, defaulted.
    pub fn per_host(&self) -> u32 {
        self.max_flows_per_host.unwrap_or(self.max_flows / 8).max(1)
    }
}

impl Default for NatConfig {
    fn default() -> Self {
        Self {
            snat_ports: [61000, 65535],
            max_flows: DEFAULT_MAX_FLOWS,
            max_flows_per_host: None,
            max_affinities: AFFINITY_ENTRIES,
            max_endpoints: ENDPOINT_ENTRIES,
        }
    }
}

/// Idle timeouts in seconds (RFC 5382, 4787, 5508 minimums by default).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    pub tcp_established: u64,
    pub tcp_transitory: u64,
    pub tcp_closing: u64,
    pub udp: u64,
    pub icmp: u64,
    /// Protocols translated by address only (GRE, ESP, SCTP, ...).
    pub other: u64,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            tcp_established: 7440,
            tcp_transitory: 240,
            tcp_closing: 10,
            udp: 300,
            icmp: 60,
            // nf_conntrack_generic_timeout.
            other: 600,
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingConfig {
    /// Uplink i uses routing table `table_base + i`.
    pub table_base: u32,
    /// First priority of the policy rules multihome installs.
    pub rule_priority: u32,
    /// Uplink i's packets on the slow path carry `mark_base | (i + 1)`.
    pub mark_base: u32,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        Self {
            table_base: 100,
            rule_priority: 1000,
            mark_base: 0x4d48_0000,
        }
    }
}

fn one() -> u32 {
    1
}

/// An IPv4 prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prefix {
    pub addr: Ipv4Addr,
    pub len: u8,
}

impl Prefix {
    pub fn mask(self) -> u32 {
        if self.len == 0 {
            0
        } else {
            u32::MAX << (32 - self.len)
        }
    }

    pub fn network(self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) & self.mask())
    }

    pub fn contains(self, a: Ipv4Addr) -> bool {
        u32::from(a) & self.mask() == u32::from(self.network())
    }

    /// Whether every address of `q` is in this prefix.
    pub fn covers(self, q: &Prefix) -> bool {
        self.len <= q.len && self.contains(q.network())
    }
}

impl std::str::FromStr for Prefix {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, len) = s.split_once('/').unwrap_or((s, "32"));
        let addr: Ipv4Addr = addr
            .parse()
            .map_err(|_| format!("`{s}` is not an IPv4 prefix like 198.18.1.0/24"))?;
        let len: u8 = len
            .parse()
            .ok()
            .filter(|l| *l <= 32)
            .ok_or_else(|| format!("`{s}`: the prefix length must be 0 to 32"))?;
        Ok(Prefix { addr, len })
    }
}

impl std::fmt::Display for Prefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.network(), self.len)
    }
}

/// An IPv6 prefix: `2001:db8:50::/48`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prefix6 {
    pub addr: std::net::Ipv6Addr,
    pub len: u8,
}

impl Prefix6 {
    pub fn mask(self) -> u128 {
        if self.len == 0 {
            0
        } else {
            u128::MAX << (128 - self.len)
        }
    }

    pub fn network(self) -> std::net::Ipv6Addr {
        (u128::from(self.addr) & self.mask()).into()
    }

    /// Whether every address of `q` is in this prefix.
    pub fn covers(self, q: &Prefix6) -> bool {
        self.len <= q.len && u128::from(q.addr) & self.mask() == u128::from(self.network())
    }
}

impl std::fmt::Display for Prefix6 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.network(), self.len)
    }
}

impl Prefix6 {
    /// Subnet `id` of this prefix with `len` bits (RFC 3633's subnet ID),
    /// e.g. 2001:db8:f0::/56 with 64 and 1 gives 2001:db8:f0:1::/64.
    /// Errors: `len` shorter than this prefix, or `id` too large for the
    /// bits between.
    pub fn subnet(self, len: u8, id: u64) -> Result<Prefix6, String> {
        if len < self.len || len > 128 {
            return Err(format!("a /{len} does not fit in {self}"));
        }
        let bits = u32::from(len - self.len);
        if bits == 0 && id != 0 {
            return Err(format!("{self} is itself a /{len}; subnet {id} is past it"));
        }
        if bits < 64 && id >> bits != 0 {
            return Err(format!(
                "{self} holds {} subnets of /{len}; subnet {id} is past them",
                1u128 << bits
            ));
        }
        let shift = 128 - u32::from(len);
        let id = u128::from(id).checked_shl(shift).unwrap_or(0);
        Ok(Prefix6 {
            addr: (u128::from(self.network()) | id).into(),
            len,
        })
    }

    /// Whether the two prefixes share an address.
    pub fn overlaps(self, other: &Prefix6) -> bool {
        self.covers(other) || other.covers(&self)
    }
}

impl std::str::FromStr for Prefix6 {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, len) = s.split_once('/').unwrap_or((s, "128"));
        let addr: std::net::Ipv6Addr = addr
            .parse()
            .map_err(|_| format!("`{s}` is not an IPv6 prefix like 2001:db8:50::/48"))?;
        let len: u8 = len
            .parse()
            .ok()
            .filter(|l| *l <= 128)
            .ok_or_else(|| format!("`{s}`: the prefix length must be 0 to 128"))?;
        Ok(Prefix6 { addr, len })
    }
}

/// One `allow_inbound6` entry: an internal prefix, a `tcp/PORT` or
/// `udp/PORT`, or a prefix and a port, separated by a space.
fn parse_allow6(entry: &str) -> Result<(u32, Prefix6), String> {
    let mut sel = 0;
    let mut prefix = None;
    for word in entry.split_whitespace() {
        if let Some((proto, port)) = word.split_once('/').filter(|(p, _)| !p.contains(':')) {
            let proto = match proto {
                "tcp" => 6u32,
                "udp" => 17,
                _ => return Err(format!("`{word}`: ports are `tcp/N` or `udp/N`")),
            };
            let port: u16 = port
                .parse()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("`{word}`: the port must be 1 to 65535"))?;
            if sel != 0 {
                return Err("one port per entry".into());
            }
            sel = proto << 16 | u32::from(port);
        } else if prefix.is_none() {
            prefix = Some(word.parse::<Prefix6>()?);
        } else {
            return Err("one prefix per entry".into());
        }
    }
    if sel == 0 && prefix.is_none() {
        return Err("name an internal prefix, a port (`tcp/22`), or both".into());
    }
    let any = Prefix6 {
        addr: std::net::Ipv6Addr::UNSPECIFIED,
        len: 0,
    };
    Ok((sel, prefix.unwrap_or(any)))
}

/// The longest NPTv6 prefix: the adjustment needs a word of the
/// interface identifier (RFC 6296 §3.2).
pub const MAX_NPT_PREFIX: u8 = 64;

impl Config {
    /// The internal IPv6 prefixes NPTv6 maps from, each with the subnet
    /// of an uplink's prefix it maps onto: the configured ones that are
    /// valid (subnet: the place in `lan_prefixes6`), else the LAN
    /// interfaces' (subnet: the interface's place in `lan`).
    pub fn internal6(&self) -> Vec<(u64, Prefix6)> {
        if self.lan_prefixes6.is_empty() {
            return self.lan6_learned.clone();
        }
        self.lan_prefixes6
            .iter()
            .enumerate()
            .filter_map(|(i, p)| Some((i as u64, p.parse().ok()?)))
            .collect()
    }

    /// Whether `addr` is inside one of the internal prefixes.
    pub fn is_internal6(&self, addr: &Prefix6) -> bool {
        self.internal6().iter().any(|(_, p)| p.covers(addr))
    }

    /// Where uplink `id` maps internal subnet `subnet` (a prefix `len`
    /// bits long) by NPTv6: subnet `subnet` of its configured `prefix6`,
    /// or subnet `pd_subnet6 + subnet` of its delegation. Errors say why
    /// the uplink's prefix cannot hold it.
    pub fn npt_subnet(&self, id: usize, len: u8, subnet: u64) -> Result<Prefix6, String> {
        let u = &self.uplinks[id];
        if u.mode6 != Mode6::Npt {
            return Err("it does not translate by NPTv6".into());
        }
        let (block, base) = match (&u.prefix6, u.learned6) {
            (Some(text), _) => (text.parse::<Prefix6>()?, 0),
            (None, Some(l)) => (l.delegated, u.pd_subnet6.unwrap_or(0)),
            (None, None) => return Err("it has no `prefix6` yet".into()),
        };
        block.subnet(len, base + subnet)
    }

    /// Uplink `id`'s NPTv6 mappings, (internal prefix, its prefix) for
    /// each internal prefix in order: empty unless it can map them all.
    pub fn npt_pairs(&self, id: usize) -> Vec<(Prefix6, Prefix6)> {
        self.internal6()
            .into_iter()
            .map(|(s, p)| Some((p, self.npt_subnet(id, p.len, s).ok()?)))
            .collect::<Option<Vec<_>>>()
            .unwrap_or_default()
    }

    /// Uplink `id`'s `prefix6`, configured or learned, if it translates
    /// IPv6 by NPTv6: the prefix it maps the LAN into (learned: its
    /// `pd_subnet6`).
    pub fn npt_prefix(&self, id: usize) -> Option<Prefix6> {
        let u = &self.uplinks[id];
        if u.mode6 != Mode6::Npt {
            return None;
        }
        match &u.prefix6 {
            Some(text) => text.parse().ok(),
            None => u.learned6.map(|l| l.npt),
        }
    }

    /// Uplink `id`'s outside IPv6 end: its NPTv6 prefix, or under NAT66 its
    /// one address (as a /128), configured or learned.
    pub fn outer6(&self, id: usize) -> Option<Prefix6> {
        let u = &self.uplinks[id];
        match u.mode6 {
            Mode6::Npt => self.npt_prefix(id),
            Mode6::Nat66 => match &u.prefix6 {
                Some(text) => text.parse().ok().filter(|p: &Prefix6| p.len == 128),
                None => u.learned6.map(|l| l.npt),
            },
            Mode6::Off => None,
        }
    }

    /// Whether uplink `id` translates by NAT66 onto the address its
    /// interface has (no `prefix6`), with an internal prefix to map from.
    pub fn learns_address6(&self, id: usize) -> bool {
        let u = &self.uplinks[id];
        u.mode6 == Mode6::Nat66 && u.prefix6.is_none() && !self.internal6().is_empty()
    }

    /// Whether uplink `id` learns its `prefix6` from a delegation: it
    /// translates by NPTv6 with no `prefix6` configured, and the LAN has
    /// an internal prefix to map.
    pub fn learns_prefix6(&self, id: usize) -> bool {
        let u = &self.uplinks[id];
        u.mode6 == Mode6::Npt && u.prefix6.is_none() && !self.internal6().is_empty()
    }

    /// Uplink `id`'s `pd_pool6`, if valid.
    pub fn pd_pool6(&self, id: usize) -> Option<Prefix6> {
        self.uplinks[id].pd_pool6.as_deref()?.parse().ok()
    }

    /// `allow_inbound6` as (selector, internal prefix) pairs: the selector
    /// is 0 for any port, `proto << 16 | port` for one TCP or UDP port
    /// (see `multihome_common::Allow6Key`). Entries with a problem are
    /// left out ([`Config::problems`] names them).
    pub fn allow_inbound6(&self) -> Vec<(u32, Prefix6)> {
        self.allow_inbound6
            .iter()
            .filter_map(|e| parse_allow6(e).ok())
            .collect()
    }

    fn problems6(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (i, e) in self.allow_inbound6.iter().enumerate() {
            match parse_allow6(e) {
                Err(why) => out.push(format!("`allow_inbound6[{i}]` {e:?}: {why}")),
                // Without `lan_prefixes6` they are checked as learned.
                Ok((_, p))
                    if p.len > 0 && !self.lan_prefixes6.is_empty() && !self.is_internal6(&p) =>
                {
                    out.push(format!(
                        "`allow_inbound6[{i}]` {e:?}: {p:?} is not inside `lan_prefixes6`; name LAN \
                         hosts by their internal addresses"
                    ))
                }
                Ok(_) => {}
            }
        }
        if self.allow_inbound6.len() > multihome_common::MAX_ALLOW6 as usize {
            out.push(format!(
                "{} `allow_inbound6` entries; at most {} fit",
                self.allow_inbound6.len(),
                multihome_common::MAX_ALLOW6
            ));
        }
        for (i, p) in self.lan_prefixes6.iter().enumerate() {
            if let Err(e) = p.parse::<Prefix6>() {
                out.push(format!("`lan_prefixes6[{i}]`: {e}"));
            }
        }
        out.extend(internal6_problems(
            &self.internal6(),
            self.lan_prefixes6.len(),
        ));
        // Without `lan_prefixes6` the internal prefixes are the LAN
        // interfaces' (checked when they are found).
        let inner = (!self.lan_prefixes6.is_empty())
            .then(|| self.internal6())
            .filter(|i| !i.is_empty());
        let mut outers: Vec<(String, Prefix6)> = Vec::new();
        for (i, u) in self.uplinks.iter().enumerate() {
            let at = format!("`[[uplink]]` #{} (name = {:?})", i + 1, u.name);
            if u.mode6 == Mode6::Nat66 && u.ndp_proxy {
                out.push(format!(
                    "{at}: `ndp_proxy` is for NPTv6; under NAT66 the address is the \
                     interface's own"
                ));
            }
            if let Some(pool) = &u.pd_pool6
                && let Err(e) = pool.parse::<Prefix6>()
            {
                out.push(format!("{at}: `pd_pool6`: {e}"));
            }
            if u.prefix6.is_some() && (u.pd_pool6.is_some() || u.pd_subnet6.is_some()) {
                out.push(format!(
                    "{at}: `pd_pool6` and `pd_subnet6` are for a learned `prefix6`; this \
                     uplink's is configured"
                ));
            }
            let Some(text) = &u.prefix6 else {
                continue;
            };
            let outer = match text.parse::<Prefix6>() {
                Ok(p) => p,
                Err(e) => {
                    out.push(format!("{at}: `prefix6`: {e}"));
                    continue;
                }
            };
            if u.mode6 == Mode6::Nat66 && outer.len != 128 {
                out.push(format!(
                    "{at}: `prefix6` {text}: under NAT66 it is the uplink's one address \
                     (a /128), or omitted to take the interface's"
                ));
            }
            if u.mode6 != Mode6::Npt {
                continue;
            }
            if outer.len == 0 || outer.len > MAX_NPT_PREFIX {
                out.push(format!(
                    "{at}: `prefix6` {text}: NPTv6 maps prefixes of 1 to {MAX_NPT_PREFIX} bits"
                ));
            }
            if let Some(inner) = &inner {
                out.extend(fit_problems(&at, text, outer, inner));
            }
            if let Some((other, _)) = outers
                .iter()
                .find(|(_, p)| p.covers(&outer) || outer.covers(p))
            {
                out.push(format!(
                    "{at}: `prefix6` {text} overlaps uplink {other:?}'s"
                ));
            }
            outers.push((u.name.clone(), outer));
        }
        out.extend(self.learner_problems());
        out
    }

    /// Uplinks that learn `prefix6` must be told apart: by `pd_pool6`,
    /// which may not overlap, unless one alone has none.
    fn learner_problems(&self) -> Vec<String> {
        let learners: Vec<usize> = (0..self.uplinks.len())
            .filter(|id| self.learns_prefix6(*id))
            .collect();
        let mut out = Vec::new();
        let unpooled: Vec<&str> = learners
            .iter()
            .filter(|id| self.uplinks[**id].pd_pool6.is_none())
            .map(|id| self.uplinks[*id].name.as_str())
            .collect();
        if unpooled.len() > 1 {
            out.push(format!(
                "uplinks {unpooled:?} learn `prefix6` from a delegated prefix, and nothing tells \
                 whose a delegation is: give each the block its ISP delegates from \
                 (`pd_pool6`), a `prefix6`, or `mode6 = \"off\"` to one without IPv6"
            ));
        }
        for (n, a) in learners.iter().enumerate() {
            for b in &learners[n + 1..] {
                if let (Some(p), Some(q)) = (self.pd_pool6(*a), self.pd_pool6(*b))
                    && p.overlaps(&q)
                {
                    out.push(format!(
                        "uplinks {:?} and {:?}: `pd_pool6` {p} and {q} overlap",
                        self.uplinks[*a].name, self.uplinks[*b].name
                    ));
                }
            }
        }
        out
    }
}

/// What is wrong with the configured internal prefixes (`count` of
/// them, `inner` the valid ones): more than the datapath holds, lengths
/// that differ (each maps onto a subnet of one length), or overlaps.
fn internal6_problems(inner: &[(u64, Prefix6)], count: usize) -> Vec<String> {
    let mut out = Vec::new();
    let max = multihome_common::MAX_LAN6 as usize;
    if count > max {
        out.push(format!("`lan_prefixes6`: {count} prefixes; at most {max}"));
    }
    for (n, (_, a)) in inner.iter().enumerate() {
        for (_, b) in &inner[n + 1..] {
            if a.len != b.len {
                out.push(format!(
                    "`lan_prefixes6`: {a} and {b} differ in length; NPTv6 maps each onto a \
                     subnet of one length of each uplink's `prefix6`"
                ));
            } else if a.overlaps(b) {
                out.push(format!("`lan_prefixes6`: {a} and {b} overlap"));
            }
        }
    }
    out
}

/// What keeps the uplink `at`'s configured NPTv6 `prefix6` (`text`,
/// `outer`) from holding each internal prefix on a subnet of its own, as
/// long as it: a longer `prefix6` (RFC 6296 §3.7 would translate only
/// part of the LAN), too few subnets, or an overlap.
fn fit_problems(at: &str, text: &str, outer: Prefix6, inner: &[(u64, Prefix6)]) -> Vec<String> {
    let mut out = Vec::new();
    let Some(len) = inner.first().map(|(_, p)| p.len) else {
        return out;
    };
    if outer.len > len {
        // RFC 6296 §3.7 would zero-extend the internal prefix: only its
        // first subnet as long as `prefix6` would be translated. Asking
        // for that means naming that subnet.
        let first = inner.first().map_or(outer, |(_, p)| Prefix6 {
            addr: p.network(),
            len: outer.len,
        });
        out.push(format!(
            "{at}: `prefix6` {text} is /{}, the internal prefixes /{len}: NPTv6 maps each onto a \
             prefix as long as itself (RFC 6296 §3.7 would translate only part of the LAN); to \
             translate only that part, list it in `lan_prefixes6` ({first}, say)",
            outer.len
        ));
    } else if let Some(last) = inner.iter().map(|(s, _)| *s).max()
        && let Err(e) = outer.subnet(len, last)
    {
        out.push(format!(
            "{at}: `prefix6` {text} cannot hold the internal prefix {} on subnet {last}: {e}",
            inner
                .iter()
                .find(|(s, _)| *s == last)
                .map_or(outer, |(_, p)| *p)
        ));
    }
    if let Some((_, p)) = inner.iter().find(|(_, p)| p.overlaps(&outer)) {
        out.push(format!(
            "{at}: `prefix6` {text} overlaps the internal prefix {p}"
        ));
    }
    out
}

/// The longest idle timeout, in seconds: its nanoseconds fit in a `u64`.
pub const MAX_TIMEOUT_S: u64 = u64::MAX / 1_000_000_000;

impl Config {
    /// Whether a rule or a policy can refuse new flows (`unreachable`).
    pub fn may_refuse(&self) -> bool {
        self.rules.iter().any(|r| r.policy == "unreachable")
            || self
                .policies
                .iter()
                .any(|p| p.last_resort == crate::policy::LastResort::Unreachable)
    }

    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config file {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("config file {}", path.display()))
    }

    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let mut config: Config = toml::from_str(text).map_err(|e| anyhow::anyhow!("{e}"))?;
        for (i, u) in config.uplinks.iter_mut().enumerate() {
            u.slot = i.min(u8::MAX as usize) as u8;
        }
        // Each `[[rule]]` header's line, for messages and `explain`.
        let headers = text
            .lines()
            .enumerate()
            .filter(|(_, l)| l.trim_start().starts_with("[[rule]]"))
            .map(|(n, _)| n + 1);
        for (r, line) in config.rules.iter_mut().zip(headers) {
            r.line = line;
        }
        let problems = config.problems();
        if !problems.is_empty() {
            let mut msg = String::new();
            for p in &problems {
                let _ = writeln!(msg, "  - {p}");
            }
            bail!("{} problem(s):\n{msg}", problems.len());
        }
        Ok(config)
    }

    /// Every problem, each naming its place in the file.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.lan.is_empty() {
            out.push("`lan`: name at least one LAN interface, e.g. lan = [\"eth1\"]".into());
        }
        for (i, p) in self.lan_prefixes.iter().enumerate() {
            if let Err(e) = p.parse::<Prefix>() {
                out.push(format!("`lan_prefixes[{i}]`: {e}"));
            }
        }
        if self.lan_prefixes.len() > MAX_LAN_NETS as usize {
            out.push(format!(
                "{} `lan_prefixes`; at most {MAX_LAN_NETS} LAN prefixes fit, the LAN interfaces' own subnets included",
                self.lan_prefixes.len()
            ));
        }
        if self.uplinks.is_empty() {
            out.push("no `[[uplink]]`: configure at least one uplink".into());
        }
        if self.uplinks.len() > MAX_UPLINKS as usize {
            out.push(format!(
                "{} uplinks configured; at most {MAX_UPLINKS} are supported",
                self.uplinks.len()
            ));
        }
        let mut names = HashSet::new();
        for (i, u) in self.uplinks.iter().enumerate() {
            let at = format!("`[[uplink]]` #{} (name = {:?})", i + 1, u.name);
            if u.name.is_empty() || u.name.len() > 15 {
                out.push(format!("{at}: `name` must be 1 to 15 characters"));
            }
            if !u
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                out.push(format!(
                    "{at}: `name` may hold letters, digits, `-`, `_`, `.`"
                ));
            }
            if !names.insert(u.name.as_str()) {
                out.push(format!("{at}: another uplink already has this name"));
            }
            if u.interface.is_empty() || u.interface.len() > 15 {
                out.push(format!("{at}: `interface` must be an interface name"));
            }
            if self.lan.contains(&u.interface) {
                out.push(format!(
                    "{at}: interface {:?} is also listed in `lan`; a device is a LAN interface \
                     or an uplink, not both (one NIC for both: a VLAN device for each)",
                    u.interface
                ));
            }
            if let Some(h) = &u.health {
                out.extend(h.problems(&format!("{at} health")));
            }
            if u.weight > 255 {
                out.push(format!("{at}: `weight` must be 0 to 255 (0 = backup only)"));
            }
            for (j, p) in u.routed_prefixes.iter().enumerate() {
                let parsed = if p.contains(':') {
                    p.parse::<Prefix6>().map(drop)
                } else {
                    p.parse::<Prefix>().map(drop)
                };
                if let Err(e) = parsed {
                    out.push(format!("{at}: `routed_prefixes[{j}]`: {e}"));
                }
            }
        }
        out.extend(self.problems6());
        let routed: usize = self.uplinks.iter().map(|u| u.routed_prefixes.len()).sum();
        if routed > MAX_ROUTED_PREFIXES as usize {
            out.push(format!(
                "{routed} `routed_prefixes` over all uplinks; at most {MAX_ROUTED_PREFIXES} are supported"
            ));
        }
        let same_nic: Vec<_> = self
            .uplinks
            .iter()
            .filter(|u| u.gateway.is_none())
            .filter(|u| {
                self.uplinks
                    .iter()
                    .filter(|o| o.interface == u.interface)
                    .count()
                    > 1
            })
            .collect();
        for u in same_nic {
            out.push(format!(
                "uplink {:?}: shares interface {:?} with another uplink, so it needs a `gateway`",
                u.name, u.interface
            ));
        }
        // Uplinks sharing an interface may share its one address (their
        // gateways tell them apart), but not a gateway.
        for (i, u) in self.uplinks.iter().enumerate() {
            if let Some(o) = self.uplinks[..i].iter().find(|o| {
                o.interface == u.interface && o.gateway.is_some() && o.gateway == u.gateway
            }) {
                out.push(format!(
                    "uplink {:?}: same interface and `gateway` as uplink {:?}: one of them is redundant",
                    u.name, o.name
                ));
            }
        }
        if !self.uplinks.is_empty() && self.uplinks.iter().all(|u| u.weight == 0) {
            out.push("every uplink has `weight = 0`: give at least one a weight".into());
        }
        let [lo, hi] = self.nat.snat_ports;
        if lo == 0 || lo > hi {
            out.push(format!(
                "`nat.snat_ports` = [{lo}, {hi}]: need 1 <= first <= last"
            ));
        }
        let t = &self.timeouts;
        for (key, v) in [
            ("tcp_established", t.tcp_established),
            ("tcp_transitory", t.tcp_transitory),
            ("tcp_closing", t.tcp_closing),
            ("udp", t.udp),
            ("icmp", t.icmp),
            ("other", t.other),
        ] {
            if v < 2 {
                out.push(format!(
                    "`timeouts.{key}` = {v}: at least 2 seconds (flows note activity once a second)"
                ));
            }
            if v > MAX_TIMEOUT_S {
                out.push(format!(
                    "`timeouts.{key}` = {v}: at most {MAX_TIMEOUT_S} seconds (its nanoseconds must fit in 64 bits)"
                ));
            }
        }
        if self.nat.max_flows < 16 {
            out.push("`nat.max_flows` must be at least 16".into());
        }
        for (key, n) in [
            ("max_affinities", self.nat.max_affinities),
            ("max_endpoints", self.nat.max_endpoints),
        ] {
            if !(16..=1 << 24).contains(&n) {
                out.push(format!("`nat.{key}` = {n}: must be 16 to 16777216"));
            }
        }
        if let Some(n) = self.nat.max_flows_per_host
            && (n == 0 || n > self.nat.max_flows)
        {
            out.push(format!(
                "`nat.max_flows_per_host` = {n}: must be 1 to `nat.max_flows` ({})",
                self.nat.max_flows
            ));
        }
        if self.routing.mark_base & 0xff != 0 || self.routing.mark_base == 0 {
            out.push(format!(
                "`routing.mark_base` = {:#x}: must be non-zero with a zero low byte (marks are base | (uplink index + 1))",
                self.routing.mark_base
            ));
        }
        if self
            .routing
            .table_base
            .checked_add(2 * MAX_UPLINKS)
            .is_none_or(|last| self.routing.table_base == 0 || last >= 253)
        {
            out.push(format!(
                "`routing.table_base` = {}: pick 1..{} so that the uplinks' tables and those of shared \
                 addresses stay clear of 253-255 (default, main, local)",
                self.routing.table_base,
                253 - 2 * MAX_UPLINKS
            ));
        }
        // Each uplink has a source rule and two mark rules, and a shared
        // address one more: all must come before the main table's rule.
        let last_priority =
            crate::routing::MAIN_RULE_PRIORITY - crate::routing::SHARED_RULE_OFFSET - MAX_UPLINKS;
        if !(1..=last_priority).contains(&self.routing.rule_priority) {
            out.push(format!(
                "`routing.rule_priority` = {}: pick 1..{last_priority}, so that every rule comes \
                 after the local table's and before the main table's ({})",
                self.routing.rule_priority,
                crate::routing::MAIN_RULE_PRIORITY
            ));
        }
        out.extend(crate::policy::problems(self));
        out
    }

    /// Places each uplink in the slot that `pinned` (the names in an adopted
    /// UPLINKS map, by slot; None for an empty slot) gives its name, so
    /// that its flows stay its own however the file was reordered. A new
    /// uplink takes the lowest empty slot, else the slot of an uplink that
    /// left. Returns the slots whose uplink left the config: their flows
    /// belong to no one.
    pub fn adopt_slots(&mut self, pinned: &[Option<String>]) -> Vec<u8> {
        let slot_of = |name: &str| pinned.iter().position(|p| p.as_deref() == Some(name));
        let kept: Vec<Option<usize>> = self.uplinks.iter().map(|u| slot_of(&u.name)).collect();
        let gone: Vec<u8> = (0..pinned.len())
            .filter(|s| pinned[*s].is_some() && !kept.contains(&Some(*s)))
            .map(|s| s as u8)
            .collect();
        let mut free: Vec<usize> = (0..MAX_UPLINKS as usize)
            .filter(|s| pinned.get(*s).is_none_or(|p| p.is_none()))
            .chain(gone.iter().map(|s| *s as usize))
            .collect();
        free.reverse();
        for (u, k) in self.uplinks.iter_mut().zip(kept) {
            u.slot = match k {
                Some(s) => s,
                None => free.pop().expect("at most MAX_UPLINKS uplinks"),
            } as u8;
        }
        gone
    }

    /// Every routed prefix, with the index of the uplink that carries it.
    pub fn routed_prefixes(&self) -> Vec<(usize, Prefix)> {
        self.uplinks
            .iter()
            .enumerate()
            .flat_map(|(id, u)| {
                u.routed_prefixes
                    .iter()
                    .filter_map(move |p| p.parse().ok().map(|p| (id, p)))
            })
            .collect()
    }

    /// Every routed IPv6 prefix, with the index of the uplink that
    /// carries it.
    pub fn routed_prefixes6(&self) -> Vec<(usize, Prefix6)> {
        self.uplinks
            .iter()
            .enumerate()
            .flat_map(|(id, u)| {
                u.routed_prefixes
                    .iter()
                    .filter(|p| p.contains(':'))
                    .filter_map(move |p| p.parse().ok().map(|p| (id, p)))
            })
            .collect()
    }

    pub fn lan_prefixes(&self) -> Vec<Prefix> {
        self.lan_prefixes
            .iter()
            .filter_map(|p| p.parse().ok())
            .collect()
    }
}

/// Checks that the SNAT range and the gateway's own ephemeral ports do
/// not overlap; returns the ephemeral range.
pub fn check_port_ranges(snat: [u16; 2]) -> anyhow::Result<(u16, u16)> {
    let path = "/proc/sys/net/ipv4/ip_local_port_range";
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    let mut it = text.split_whitespace().map(str::parse::<u16>);
    let (Some(Ok(lo)), Some(Ok(hi))) = (it.next(), it.next()) else {
        bail!("{path} holds {text:?}, not two port numbers");
    };
    if snat[0] <= hi && lo <= snat[1] {
        bail!(
            "`nat.snat_ports` [{}, {}] overlaps the gateway's own ephemeral ports {lo}-{hi} ({path}); \
             replies to the gateway's sockets would collide with NAT flows. Move `snat_ports` \
             (default [61000, 65535]) or shrink ip_local_port_range",
            snat[0],
            snat[1]
        );
    }
    Ok((lo, hi))
}

#[cfg(test)]
impl Config {
    /// Uplink `id`'s NPTv6 mappings as `"inner outer"` lines, for tests.
    pub fn npt_pairs_text(&self, id: usize) -> Vec<String> {
        self.npt_pairs(id)
            .iter()
            .map(|(i, o)| format!("{i} {o}"))
            .collect()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Two uplinks, x and y (weight 2), on lan0.
    pub(crate) const GOOD: &str = r#"
lan = ["lan0"]

[[uplink]]
name = "x"
interface = "wanx"
gateway = "198.18.11.254"

[[uplink]]
name = "y"
interface = "wany"
gateway = "198.18.22.254"
weight = 2
"#;

    #[test]
    fn the_documented_example_parses_with_defaults() {
        let c = Config::parse(GOOD).expect("valid");
        assert_eq!(c.uplinks.len(), 2);
        assert_eq!(c.uplinks[0].weight, 1);
        assert_eq!(c.uplinks[1].weight, 2);
        assert_eq!(c.nat.snat_ports, [61000, 65535]);
        assert_eq!(c.timeouts.tcp_established, 7440);
    }

    #[test]
    fn the_shipped_example_config_is_valid() {
        let c = Config::parse(include_str!("../../docs/multihome.example.toml"))
            .expect("docs/multihome.example.toml must stay valid");
        assert_eq!(
            c,
            {
                let mut d = c.clone();
                d.nat = NatConfig::default();
                d.timeouts = Timeouts::default();
                d.routing = RoutingConfig::default();
                d
            },
            "the example must show the defaults"
        );
    }

    #[test]
    fn syntax_errors_name_the_line() {
        let err = Config::parse("lan = [\"lan0\"\n[[uplink]]\n").expect_err("must be rejected");
        assert!(format!("{err:#}").contains("line"), "{err:#}");
    }

    #[test]
    fn unknown_keys_are_rejected_by_name() {
        let err =
            Config::parse(&GOOD.replace("weight = 2", "wieght = 2")).expect_err("must be rejected");
        assert!(format!("{err:#}").contains("wieght"), "{err:#}");
    }

    #[test]
    fn every_semantic_problem_is_reported_with_its_uplink() {
        let text = GOOD
            .replace("name = \"y\"", "name = \"x\"")
            .replace("weight = 2", "weight = 300")
            + "[nat]\nsnat_ports = [70, 60]\n";
        let err = format!("{:#}", Config::parse(&text).expect_err("must be rejected"));
        assert!(err.contains("already has this name"), "{err}");
        assert!(err.contains("`weight` must be 0 to 255"), "{err}");
        assert!(err.contains("snat_ports"), "{err}");
        assert!(err.contains("#2"), "{err}");
    }

    #[test]
    fn an_uplink_on_a_lan_interface_is_refused_by_name() {
        let text = GOOD.replace("interface = \"wany\"", "interface = \"lan0\"");
        let err = format!("{:#}", Config::parse(&text).expect_err("must be rejected"));
        assert!(
            err.contains("#2") && err.contains("\"lan0\" is also listed in `lan`"),
            "{err}"
        );
    }

    #[test]
    fn adopted_uplinks_keep_their_slots_by_name_and_new_ones_take_free_slots() {
        let mut c = Config::parse(GOOD).expect("valid");
        assert_eq!((c.uplinks[0].slot, c.uplinks[1].slot), (0, 1));
        let pinned = |names: &[Option<&str>]| -> Vec<Option<String>> {
            names.iter().map(|n| n.map(str::to_owned)).collect()
        };
        // Reordered: each keeps its slot.
        let gone = c.adopt_slots(&pinned(&[Some("y"), Some("x")]));
        assert_eq!((c.uplinks[0].slot, c.uplinks[1].slot, gone), (1, 0, vec![]));
        // y is new, z left: y takes an empty slot before z's.
        let gone = c.adopt_slots(&pinned(&[Some("z"), Some("x"), None]));
        assert_eq!((c.uplinks[0].slot, c.uplinks[1].slot), (1, 2));
        assert_eq!(gone, vec![0]);
        // Every other slot taken: y takes the slot z left.
        let mut full: Vec<Option<&str>> = vec![Some("z"), Some("x")];
        let others = ["a", "b", "c", "d", "e", "f"];
        full.extend(others.iter().map(|n| Some(*n)));
        let gone = c.adopt_slots(&pinned(&full));
        assert_eq!((c.uplinks[0].slot, c.uplinks[1].slot), (1, 0));
        assert_eq!(gone.len(), 7);
    }

    #[test]
    fn numbers_that_would_overflow_are_refused_with_their_key() {
        for (extra, key) in [
            ("[routing]\ntable_base = 4294967295\n", "routing.table_base"),
            (
                "[routing]\nrule_priority = 4294967290\n",
                "routing.rule_priority",
            ),
            (
                "[routing]\nrule_priority = 32760\n",
                "routing.rule_priority",
            ),
            ("[timeouts]\nudp = 9223372036854775807\n", "timeouts.udp"),
            ("[timeouts]\nother = 18446744074\n", "timeouts.other"),
        ] {
            let err = format!(
                "{:#}",
                Config::parse(&format!("{GOOD}{extra}")).expect_err(extra)
            );
            assert!(err.contains(key), "{extra}: {err}");
        }
        let ok = format!("{GOOD}[timeouts]\nother = {MAX_TIMEOUT_S}\n");
        Config::parse(&ok).expect("the longest timeout is valid");
    }

    #[test]
    fn uplinks_sharing_a_nic_need_gateways() {
        let text = GOOD
            .replace("wany", "wanx")
            .replace("gateway = \"198.18.22.254\"", "");
        let err = format!("{:#}", Config::parse(&text).expect_err("must be rejected"));
        assert!(err.contains("needs a `gateway`"), "{err}");
    }

    #[test]
    fn routed_prefixes_are_checked_and_listed_by_uplink() {
        let text = GOOD.replace(
            "weight = 2",
            "weight = 2\nrouted_prefixes = [\"198.18.50.0/24\", \"198.18.51.0/33\"]",
        );
        let err = format!("{:#}", Config::parse(&text).expect_err("must be rejected"));
        assert!(err.contains("`routed_prefixes[1]`"), "{err}");
        assert!(err.contains("#2"), "{err}");
        let c = Config::parse(&text.replace(", \"198.18.51.0/33\"", "")).expect("valid");
        assert_eq!(
            c.routed_prefixes(),
            vec![(1, "198.18.50.0/24".parse().expect("prefix"))]
        );
    }

    /// GOOD with IPv6: `inner` as `lan_prefixes6` (unless empty), and
    /// `x6`, `y6` as the uplinks' `prefix6` (unless empty).
    fn with6(inner: &str, x6: &str, y6: &str) -> String {
        let mut text = GOOD.to_string();
        if !inner.is_empty() {
            text = text.replace("lan = [", &format!("lan_prefixes6 = [{inner:?}]\nlan = ["));
        }
        for (name, p) in [("x", x6), ("y", y6)] {
            if !p.is_empty() {
                text = text.replace(
                    &format!("name = \"{name}\"\n"),
                    &format!("name = \"{name}\"\nprefix6 = {p:?}\n"),
                );
            }
        }
        text
    }

    fn problems6(text: &str) -> String {
        format!("{:#}", Config::parse(text).expect_err("must be rejected"))
    }

    #[test]
    fn npt_prefixes_map_one_length_without_overlaps_and_need_the_internal_prefix() {
        let c = Config::parse(&with6("fd00:1::/64", "2001:db8:11:100::/64", "")).expect("valid");
        assert_eq!(
            c.internal6(),
            vec![(0, "fd00:1::/64".parse().expect("prefix"))]
        );
        assert!(c.npt_prefix(0).is_some() && c.npt_prefix(1).is_none());
        // Without `lan_prefixes6` the LAN interfaces' ULA is learned.
        let c = Config::parse(&with6("", "2001:db8:11:100::/64", "")).expect("learned inside");
        assert_eq!(c.internal6(), vec![]);
        // RFC 6296 §3.7: a /48 inside onto a /64 outside maps one subnet.
        let err = problems6(&with6("fd00:1::/48", "2001:db8:11:100::/64", ""));
        assert!(err.contains("as long as itself"), "{err}");
        assert!(
            err.contains("list it in `lan_prefixes6` (fd00:1::/64, say)"),
            "{err}"
        );
        let err = problems6(&with6("fd00:1::/80", "2001:db8:11:100::/80", ""));
        assert!(err.contains("1 to 64 bits"), "{err}");
        let err = problems6(&with6(
            "fd00:1::/64",
            "2001:db8:11:100::/64",
            "2001:db8:11:100::/64",
        ));
        assert!(err.contains("overlaps uplink \"x\""), "{err}");
        let err = problems6(&with6("fd00:1::/64", "fd00:1::/64", ""));
        assert!(err.contains("overlaps the internal prefix"), "{err}");
        let err = problems6(&with6("fd00:1::/64", "2001:db8::/129", ""));
        assert!(err.contains("`prefix6`"), "{err}");
    }

    #[test]
    fn several_internal_prefixes_of_one_length_map_onto_subnets_in_order() {
        let text = |inner: &str, x6: &str| {
            with6("", x6, "").replace("lan = [", &format!("lan_prefixes6 = {inner}\nlan = ["))
        };
        let c = Config::parse(&text(
            r#"["fd00:1::/64", "fd00:aa::/64", "fd12:3456::/64"]"#,
            "2001:db8:11:100::/62",
        ))
        .expect("three /64s in a /62");
        assert_eq!(
            c.npt_pairs_text(0),
            [
                "fd00:1::/64 2001:db8:11:100::/64",
                "fd00:aa::/64 2001:db8:11:101::/64",
                "fd12:3456::/64 2001:db8:11:102::/64",
            ]
        );
        // One /64 onto a /56: its subnet 0.
        let c = Config::parse(&with6("fd00:1::/64", "2001:db8:11:100::/56", "")).expect("/56");
        assert_eq!(c.npt_pairs(0)[0].1.to_string(), "2001:db8:11:100::/64");
        for (inner, x6, why) in [
            (
                r#"["fd00:1::/64", "fd00:2::/64", "fd00:3::/64"]"#,
                "2001:db8:11:100::/63",
                "cannot hold the internal prefix fd00:3::/64 on subnet 2",
            ),
            (
                r#"["fd00:1::/64", "fd00:2::/64"]"#,
                "2001:db8:11:100::/64",
                "cannot hold",
            ),
            (
                r#"["fd00:1::/64", "fd00:2::/56"]"#,
                "2001:db8:11:100::/56",
                "differ in length",
            ),
            (
                r#"["fd00:1::/64", "fd00:1::/64"]"#,
                "2001:db8:11:100::/56",
                "overlap",
            ),
            (
                r#"["fd00:1::/64", "fd00:2::/64", "fd00:3::/64", "fd00:4::/64", "fd00:5::/64",
                    "fd00:6::/64", "fd00:7::/64", "fd00:8::/64", "fd00:9::/64"]"#,
                "2001:db8:11:100::/56",
                "at most 8",
            ),
        ] {
            let err = problems6(&text(inner, x6));
            assert!(err.contains(why), "{inner} onto {x6}: {err}");
        }
        // `allow_inbound6` may name a host of any of them.
        let c = Config::parse(
            &text(r#"["fd00:1::/64", "fd00:2::/64"]"#, "2001:db8:11:100::/63")
                .replace("lan = [", "allow_inbound6 = [\"fd00:2::10/128\"]\nlan = ["),
        )
        .expect("a host of the second");
        assert_eq!(c.allow_inbound6().len(), 1);
    }

    #[test]
    fn allow_inbound6_takes_internal_prefixes_ports_or_both() {
        let base = with6("fd00:1::/64", "2001:db8:11:100::/64", "");
        let with =
            |list: &str| base.replace("lan = [", &format!("allow_inbound6 = {list}\nlan = ["));
        let c = Config::parse(&with(
            r#"["fd00:1::10/128", "tcp/22", "fd00:1::20 udp/51820"]"#,
        ))
        .expect("valid");
        let got = c.allow_inbound6();
        assert_eq!(got.len(), 3);
        assert_eq!((got[0].0, got[0].1.len), (0, 128));
        assert_eq!((got[1].0, got[1].1.len), (6 << 16 | 22, 0));
        assert_eq!((got[2].0, got[2].1.len), (17 << 16 | 51820, 128));
        for (bad, why) in [
            (r#"["2001:db8::/64"]"#, "not inside `lan_prefixes6`"),
            (r#"["sctp/9"]"#, "`tcp/N` or `udp/N`"),
            (r#"["tcp/0"]"#, "1 to 65535"),
            (r#"["tcp/1 udp/2"]"#, "one port per entry"),
            (r#"[""]"#, "name an internal prefix"),
        ] {
            let err = problems6(&with(bad));
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn uplinks_that_learn_prefix6_must_be_told_apart_by_pd_pool6() {
        let both = with6("fd00:1::/64", "", "");
        let c = Config::parse(&with6("fd00:1::/64", "", "2001:db8:22:100::/64")).expect("one");
        assert!(c.learns_prefix6(0) && !c.learns_prefix6(1));
        let err = problems6(&both);
        assert!(err.contains("nothing tells whose a delegation is"), "{err}");
        let pool = |x: &str, y: &str| {
            both.replacen(
                "name = \"x\"\n",
                &format!("name = \"x\"\npd_pool6 = {x:?}\n"),
                1,
            )
            .replacen(
                "name = \"y\"\n",
                &format!("name = \"y\"\npd_pool6 = {y:?}\n"),
                1,
            )
        };
        let c = Config::parse(&pool("2001:db8:1000::/36", "2001:db8:2000::/36")).expect("pools");
        assert_eq!(
            c.pd_pool6(1).map(|p| p.to_string()).as_deref(),
            Some("2001:db8:2000::/36")
        );
        let err = problems6(&pool("2001:db8::/32", "2001:db8:2000::/36"));
        assert!(err.contains("overlap"), "{err}");
        let err = problems6(&pool("2001:db8::/32", "nope"));
        assert!(err.contains("`pd_pool6`"), "{err}");
        // Without lan_prefixes6 nothing learns: no problem.
        assert!(Config::parse(&with6("", "", "")).is_ok());
        // A configured prefix6 takes no pool.
        let err = problems6(&with6("fd00:1::/64", "2001:db8:11:100::/64", "").replacen(
            "prefix6 = ",
            "pd_subnet6 = 1\nprefix6 = ",
            1,
        ));
        assert!(err.contains("are for a learned"), "{err}");
    }

    #[test]
    fn mode6_takes_npt_nat66_onto_one_address_or_off() {
        let text = with6("fd00:1::/64", "2001:db8:11:100::/64", "");
        let off = text.replace("prefix6 = ", "mode6 = \"off\"\nprefix6 = ");
        let c = Config::parse(&off).expect("off");
        assert_eq!(c.uplinks[0].mode6, Mode6::Off);
        assert!(c.npt_prefix(0).is_none(), "mode6 = off maps nothing");
        // NAT66 onto one address: a /128, or the interface's.
        let err = problems6(&text.replace("prefix6 = ", "mode6 = \"nat66\"\nprefix6 = "));
        assert!(err.contains("one address (a /128)"), "{err}");
        let nat66 = text.replace(
            "prefix6 = \"2001:db8:11:100::/64\"",
            "mode6 = \"nat66\"\nprefix6 = \"2001:db8:11::1\"",
        );
        let c = Config::parse(&nat66).expect("nat66");
        assert_eq!(
            c.outer6(0).map(|p| p.to_string()).as_deref(),
            Some("2001:db8:11::1/128")
        );
        assert!(c.npt_prefix(0).is_none() && !c.learns_address6(0));
        let learn = text.replace("prefix6 = \"2001:db8:11:100::/64\"", "mode6 = \"nat66\"");
        let c = Config::parse(&learn).expect("nat66 onto the interface's address");
        assert!(c.learns_address6(0) && c.outer6(0).is_none());
        let err = problems6(&learn.replace("mode6 = ", "ndp_proxy = true\nmode6 = "));
        assert!(err.contains("`ndp_proxy` is for NPTv6"), "{err}");
        let err = format!(
            "{:#}",
            Config::parse(&text.replace("prefix6 = ", "mode6 = \"nptv6\"\nprefix6 = "))
                .expect_err("unknown mode")
        );
        assert!(err.contains("mode6"), "{err}");
    }

    #[test]
    fn mss_clamp_takes_auto_off_or_bytes_and_refuses_the_rest() {
        let with =
            |v: &str| Config::parse(&GOOD.replace("weight = 2", &format!("mss_clamp = {v}")));
        assert_eq!(
            with("\"auto\"").expect("auto").uplinks[1].mss_clamp,
            Some(MssClamp::Auto)
        );
        assert_eq!(
            with("\"off\"").expect("off").uplinks[1].mss_clamp,
            Some(MssClamp::Off)
        );
        assert_eq!(
            with("1360").expect("bytes").uplinks[1].mss_clamp,
            Some(MssClamp::Bytes(1360))
        );
        for bad in ["\"on\"", "100", "70000", "-1"] {
            let err = format!("{:#}", with(bad).expect_err(bad));
            assert!(err.contains("mss_clamp"), "{bad}: {err}");
        }
        assert_eq!(MssClamp::Auto.bytes(1492), 1452);
        assert_eq!(MssClamp::Off.bytes(1492), 0);
    }

    #[test]
    fn prefixes_parse_and_mask() {
        let p: Prefix = "198.18.1.7/24".parse().expect("prefix");
        assert_eq!(p.network(), Ipv4Addr::new(198, 18, 1, 0));
        assert_eq!(p.to_string(), "198.18.1.0/24");
        assert!("198.18.1.0/33".parse::<Prefix>().is_err());
    }
}
