//! The IPv6 half of the fallback routing: for each uplink `i` that
//! translates IPv6 (a `prefix6` under NPTv6), with the IPv4 tables' numbers
//! (see `routing`):
//!
//! | priority     | rule (IPv6)                              |
//! |--------------|------------------------------------------|
//! | `p + 1 + i`  | `from <prefix6> lookup T_i`              |
//! | `p + 20 + i` | `fwmark M_i/0xffffffff lookup T_i`       |
//! | `p + 40 + i` | `fwmark M_i/0xffffffff unreachable`      |
//! | `p + 19`     | `fwmark <mark_base / 0xfe> prohibit`     |
//!
//! and table `T_i` holds `default via <gateway6> dev I_i`: the configured
//! `gateway6`, else the router the uplink learned by router advertisement
//! (the kernel's `proto ra` default route in `main` on that device), or
//! `default dev I_i` on a point-to-point link. An Ethernet uplink with
//! neither gets no route until an RA comes. The mark rule carries what the datapath pinned
//! to the uplink (still with its internal source: the uplink's egress
//! program maps it); the `from` rule the gateway's own traffic from the
//! uplink's prefix; the `unreachable` rule answers the uplink's packets
//! while its table has no route (link down, no router yet) instead of
//! letting them fall through to `main`; the `prohibit` rule, present when a
//! rule or policy can refuse flows, answers their refusals. Everything carries [`PROTO_MULTIHOME`], as in IPv4,
//! and nothing else is touched.
use std::{fmt, net::Ipv6Addr};

use anyhow::Context as _;
use futures::TryStreamExt;
use log::{debug, info};
use rtnetlink::{
    Handle, IpVersion, RouteMessageBuilder,
    packet_route::{
        AddressFamily,
        route::{RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope},
        rule::{RuleAction, RuleAttribute, RuleMessage},
    },
};

use super::routing::{
    FWMARK_RULE_OFFSET, PROHIBIT_RULE_OFFSET, PROTO_MULTIHOME, dump_routes, errno, exact_mark,
    is_our_rule, route_table, tagged,
};
use crate::config::Prefix6;

/// One uplink's IPv6 routing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Uplink6Routes {
    pub table: u32,
    pub mark: u32,
    /// 0 while the interface is missing: no table route then.
    pub ifindex: u32,
    /// `gateway6`; None: the router the uplink learned by RA, or none on
    /// a point-to-point link (`l3`).
    pub gateway: Option<Ipv6Addr>,
    /// The device has no Ethernet header (ppp, tun): a device route.
    pub l3: bool,
    pub prefix: Prefix6,
    /// Its index among the configured uplinks (the rules' offset).
    pub index: u32,
}

/// A rule as we install it: priority, table and selector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Rule6 {
    From(u32, u32, Ipv6Addr, u8),
    FwMark(u32, u32, u32),
    /// Priority and mark.
    Prohibit(u32, u32),
    /// Priority and mark.
    Unreachable(u32, u32),
}

impl Rule6 {
    fn of(msg: &RuleMessage) -> Option<Rule6> {
        let h = &msg.header;
        let prohibit = h.action == RuleAction::Prohibit;
        let unreachable = h.action == RuleAction::Unreachable;
        if h.family != AddressFamily::Inet6
            || !(h.action == RuleAction::ToTable || prohibit || unreachable)
        {
            return None;
        }
        let (mut priority, mut table) = (0, u32::from(h.table));
        let (mut src, mut mark) = (None, None);
        for attr in &msg.attributes {
            match attr {
                RuleAttribute::Priority(p) => priority = *p,
                RuleAttribute::Table(t) => table = *t,
                RuleAttribute::Source(std::net::IpAddr::V6(a)) => src = Some(*a),
                RuleAttribute::FwMark(m) => mark = Some(*m),
                _ => {}
            }
        }
        match (src, mark) {
            (None, Some(m)) if prohibit => Some(Rule6::Prohibit(priority, m)),
            (None, Some(m)) if unreachable => Some(Rule6::Unreachable(priority, m)),
            (_, _) if prohibit || unreachable => None,
            (Some(a), None) => Some(Rule6::From(priority, table, a, h.src_len)),
            (None, Some(m)) => Some(Rule6::FwMark(priority, table, m)),
            _ => None,
        }
    }
}

impl fmt::Display for Rule6 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rule6::From(p, t, a, l) => write!(f, "{p}: from {a}/{l} lookup {t}"),
            Rule6::FwMark(p, t, m) => write!(f, "{p}: fwmark {m:#x} lookup {t}"),
            Rule6::Prohibit(p, m) => write!(f, "{p}: fwmark {m:#x} prohibit"),
            Rule6::Unreachable(p, m) => write!(f, "{p}: fwmark {m:#x} unreachable"),
        }
    }
}

/// A table's default route as we install it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Route6 {
    table: u32,
    ifindex: u32,
    gateway: Option<Ipv6Addr>,
}

impl Route6 {
    fn of(msg: &RouteMessage) -> Option<Route6> {
        let mut r = Route6 {
            table: u32::from(msg.header.table),
            ifindex: 0,
            gateway: None,
        };
        for attr in &msg.attributes {
            match attr {
                RouteAttribute::Table(t) => r.table = *t,
                RouteAttribute::Oif(i) => r.ifindex = *i,
                RouteAttribute::Gateway(RouteAddress::Inet6(g)) => r.gateway = Some(*g),
                _ => {}
            }
        }
        (msg.header.destination_prefix_length == 0).then_some(r)
    }

    fn message(&self) -> RouteMessage {
        let mut b = RouteMessageBuilder::<Ipv6Addr>::new()
            .table_id(self.table)
            .output_interface(self.ifindex)
            .protocol(RouteProtocol::Other(PROTO_MULTIHOME));
        match self.gateway {
            Some(g) => b = b.gateway(g),
            None => b = b.scope(RouteScope::Link),
        }
        b.build()
    }
}

impl fmt::Display for Route6 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "default")?;
        if let Some(g) = self.gateway {
            write!(f, " via {g}")?;
        }
        write!(f, " dev {} table {}", self.ifindex, self.table)
    }
}

/// The kernel's `main` table.
const RT_TABLE_MAIN: u32 = 254;

fn is_ours_rule(msg: &RuleMessage) -> bool {
    msg.header.family == AddressFamily::Inet6 && is_our_rule(msg)
}

fn is_ours_route(msg: &RouteMessage) -> bool {
    msg.header.address_family == AddressFamily::Inet6
        && u8::from(msg.header.protocol) == PROTO_MULTIHOME
}

/// Keeps the kernel's IPv6 rules and routes tagged [`PROTO_MULTIHOME`]
/// exactly as the plan says.
pub struct Routing6 {
    handle: Handle,
}

impl Routing6 {
    pub fn new(handle: Handle) -> Self {
        Self { handle }
    }

    /// Adds what `plan` has and the kernel lacks, then removes what the
    /// kernel has and `plan` does not. A table route whose link is down
    /// fails here and is tried again at the next refresh.
    pub async fn apply(
        &self,
        plan: &[Uplink6Routes],
        rule_priority: u32,
        prohibit_mark: Option<u32>,
    ) -> anyhow::Result<()> {
        let mut errors = Vec::new();
        let routers = if plan.iter().any(|u| u.gateway.is_none() && !u.l3) {
            self.ra_routers().await?
        } else {
            Vec::new()
        };
        let mut rules = Vec::new();
        if let Some(m) = prohibit_mark.filter(|_| !plan.is_empty()) {
            rules.push(Rule6::Prohibit(rule_priority + PROHIBIT_RULE_OFFSET, m));
        }
        let mut routes = Vec::new();
        for u in plan {
            let p = u.prefix;
            rules.push(Rule6::From(
                rule_priority + 1 + u.index,
                u.table,
                p.network(),
                p.len,
            ));
            rules.push(Rule6::FwMark(
                rule_priority + FWMARK_RULE_OFFSET + u.index,
                u.table,
                u.mark,
            ));
            rules.push(Rule6::Unreachable(
                rule_priority + 2 * FWMARK_RULE_OFFSET + u.index,
                u.mark,
            ));
            let learned = || {
                routers
                    .iter()
                    .find(|(i, _)| *i == u.ifindex)
                    .map(|(_, g)| *g)
            };
            let gateway = u.gateway.or_else(learned);
            if u.ifindex != 0 && (gateway.is_some() || u.l3) {
                routes.push(Route6 {
                    table: u.table,
                    ifindex: u.ifindex,
                    gateway,
                });
            }
        }
        let have_rules = self.rules().await?;
        for want in &rules {
            if have_rules.iter().any(|(_, r)| r.as_ref() == Some(want)) {
                continue;
            }
            match self.add_rule(want).await {
                Ok(()) => info!("added IPv6 rule {want}"),
                Err(e) => errors.push(e),
            }
        }
        for (msg, r) in have_rules {
            if r.is_none_or(|r| !rules.contains(&r)) {
                let _ = self.handle.rule().del(msg).execute().await;
            }
        }
        let have_routes = self.routes().await?;
        for want in &routes {
            if have_routes.iter().any(|(_, r)| r.as_ref() == Some(want)) {
                continue;
            }
            let res = self
                .handle
                .route()
                .add(want.message())
                .replace()
                .execute()
                .await;
            match res {
                Ok(()) => info!("added IPv6 route {want}"),
                // Link down or gone, or the router not on a link yet (the
                // kernel flushes IPv6 addresses on link down): the next
                // refresh after it is back adds it; meanwhile the
                // unreachable rule answers.
                Err(e)
                    if matches!(
                        errno(&e),
                        Some(
                            libc::ENETDOWN | libc::ENETUNREACH | libc::EHOSTUNREACH | libc::ENODEV
                        )
                    ) =>
                {
                    debug!("IPv6 route `{want}` left out for now: {e}")
                }
                Err(e) => errors.push(anyhow::anyhow!("adding IPv6 route `{want}`: {e}")),
            }
        }
        for (msg, r) in have_routes {
            if r.is_none_or(|r| !routes.iter().any(|w| w.table == r.table)) {
                let _ = self.handle.route().del(msg).execute().await;
            }
        }
        match errors
            .into_iter()
            .reduce(|a, b| a.context(format!("{b:#}")))
        {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Removes every IPv6 rule and route tagged [`PROTO_MULTIHOME`].
    pub async fn remove_all(&self) -> anyhow::Result<()> {
        self.apply(&[], 0, None).await
    }

    async fn add_rule(&self, rule: &Rule6) -> anyhow::Result<()> {
        let (priority, table) = match *rule {
            Rule6::From(p, t, ..) | Rule6::FwMark(p, t, _) => (p, t),
            Rule6::Prohibit(p, _) | Rule6::Unreachable(p, _) => (p, 0),
        };
        let mut req = self
            .handle
            .rule()
            .add()
            .v6()
            .table_id(table)
            .priority(priority)
            .action(RuleAction::ToTable);
        match *rule {
            Rule6::From(_, _, a, l) => req = req.source_prefix(a, l),
            Rule6::Prohibit(_, m) | Rule6::Unreachable(_, m) => {
                let action = match *rule {
                    Rule6::Prohibit(..) => RuleAction::Prohibit,
                    _ => RuleAction::Unreachable,
                };
                req = exact_mark(req.action(action), m);
            }
            Rule6::FwMark(_, _, m) => req = exact_mark(req, m),
        }
        tagged(req)
            .execute()
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))
            .with_context(|| format!("adding IPv6 rule `{rule}`"))
    }

    /// The routers the kernel learned by router advertisement: (device,
    /// router) of each `proto ra` default route in `main`.
    pub async fn ra_routers(&self) -> anyhow::Result<Vec<(u32, Ipv6Addr)>> {
        Ok(self
            .all_routes()
            .await?
            .iter()
            .filter(|m| {
                m.header.destination_prefix_length == 0
                    && m.header.protocol == RouteProtocol::Ra
                    && route_table(m) == RT_TABLE_MAIN
            })
            .filter_map(|m| {
                let r = Route6::of(m)?;
                Some((r.ifindex, r.gateway?))
            })
            .collect())
    }

    async fn rules(&self) -> anyhow::Result<Vec<(RuleMessage, Option<Rule6>)>> {
        let all: Vec<RuleMessage> = self
            .handle
            .rule()
            .get(IpVersion::V6)
            .execute()
            .try_collect()
            .await
            .context("listing the IPv6 policy rules")?;
        Ok(all
            .into_iter()
            .filter(is_ours_rule)
            .map(|m| {
                let r = Rule6::of(&m);
                (m, r)
            })
            .collect())
    }

    async fn all_routes(&self) -> anyhow::Result<Vec<RouteMessage>> {
        dump_routes(&self.handle, AddressFamily::Inet6).await
    }

    async fn routes(&self) -> anyhow::Result<Vec<(RouteMessage, Option<Route6>)>> {
        Ok(self
            .all_routes()
            .await?
            .into_iter()
            .filter(is_ours_route)
            .map(|m| {
                let r = Route6::of(&m);
                (m, r)
            })
            .collect())
    }
}
