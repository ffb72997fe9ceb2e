//! The fallback routing of the LARTC "multihomed host" recipe, installed and
//! removed over rtnetlink (no `ip` commands) and tagged with
//! [`PROTO_MULTIHOME`] so that it can be found again, by this run, by the
//! next one, or by `multihome cleanup`.
//!
//! With `p` = `rule_priority` and, for uplink `i` (in plan order), table
//! `T_i`, mark `M_i`, local address `A_i`, gateway `G_i`, interface `I_i`
//! (IPv4 only):
//!
//! | priority                 | rule                                           |
//! |--------------------------|------------------------------------------------|
//! | `p`                      | `from all lookup main suppress_prefixlength 0` |
//! | `p + 1 + i`              | `from A_i lookup T_i` (only if `A_i` is known) |
//! | `p + 20 + i`             | `fwmark M_i/0xffffffff lookup T_i`             |
//! | `p + 40 + i`             | `fwmark M_i/0xffffffff unreachable`            |
//! | `p + 48 + i`             | `from A lookup S` (a shared address, below)    |
//!
//! - The first rule lets everything in main that is more specific than a
//!   default route (connected subnets, LAN routes) win before the uplink
//!   tables; the recipe without it sends replies to the LAN back out of an
//!   uplink.
//! - The `from` rules send the gateway's own traffic from an uplink's address
//!   out of that uplink. Uplinks that share one address (the seed's 4.2.5:
//!   two routers behind one NIC, the uplinks differ only by their gateway)
//!   get one `from` rule instead, after the mark rules so that each
//!   uplink's probes still leave by its own router, into table `S` =
//!   `table_base + 8 + s` (`s`: the group's lowest slot), which holds a
//!   multipath default over their routers.
//! - The `fwmark` rules send what the datapath hands to the kernel (the slow
//!   path, always with a LAN source) out of its flow's uplink. They have
//!   their own block of priorities ([`FWMARK_RULE_OFFSET`]) so that every
//!   rule has a priority of its own and the two blocks keep their places
//!   when addresses come and go.
//! - Table `T_i` holds `default via G_i dev I_i`, or `default dev I_i scope
//!   link` without a gateway (point-to-point links).
//! - Main holds `default metric 50` ([`MAIN_METRIC`]) over the usable
//!   uplinks: weighted multipath, or a plain route for a single one. Metric
//!   50 stays clear of the default routes distributions install (dhclient
//!   and ifupdown: 0, NetworkManager: 100 and up, systemd-networkd: 1024): a
//!   metric-0 default keeps precedence, the others yield to ours. It
//!   carries what nothing else steers, mostly the gateway's own traffic
//!   before it has picked a source address: LAN flows are pinned by the
//!   datapath, the slow path goes by mark.
//! - A table route that the kernel refuses because its link is down or its
//!   gateway is not reachable yet is left out (with a warning, once) and so
//!   is that uplink's share of main's default; its rules stay, and lookups
//!   in its empty table fall through to the next rules. The next `apply`
//!   after the link comes back puts it in.
//!
//! Routes carry protocol [`PROTO_MULTIHOME`], rules carry it as
//! `FRA_PROTOCOL`; nothing else is ever changed or removed.

use std::{
    collections::HashSet,
    fmt, fs,
    io::{self, ErrorKind},
    net::Ipv4Addr,
};

use anyhow::{Context, anyhow, bail};
use futures::TryStreamExt;
use log::{debug, info, warn};
use rtnetlink::{
    Handle, IpVersion, RuleAddRequest,
    packet_route::{
        AddressFamily,
        route::{
            RouteAddress, RouteAttribute, RouteMessage, RouteNextHop, RouteNextHopFlags,
            RouteProtocol, RouteScope, RouteType,
        },
        rule::{RuleAction, RuleAttribute, RuleFlags, RuleMessage},
    },
};

use multihome_common::MainRoute;

use super::mainroutes;
use crate::config::Prefix;

/// Marks everything we install: routes carry this protocol number, rules
/// carry it as `FRA_PROTOCOL`. 77 is not an `RTPROT_*` value of the kernel
/// nor an entry of iproute2's `rt_protos` (`ip` shows it as `proto 77`).
pub const PROTO_MULTIHOME: u8 = 77;

/// Metric of our default route in the main table (see the module docs).
pub const MAIN_METRIC: u32 = 50;

/// The `fwmark` rule of uplink `i` has priority `rule_priority +
/// FWMARK_RULE_OFFSET + i`; the `from` rules take the priorities before.
pub const FWMARK_RULE_OFFSET: u32 = 20;

/// The main table's own rule: ours must come before it.
pub const MAIN_RULE_PRIORITY: u32 = 32766;
const RT_TABLE_COMPAT: u8 = 252;
pub(crate) const RT_TABLE_DEFAULT: u32 = 253;
pub(crate) const RT_TABLE_MAIN: u32 = 254;
pub(crate) const RT_TABLE_LOCAL: u32 = 255;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UplinkRoutes {
    /// Per-uplink routing table id.
    pub table: u32,
    /// fwmark of this uplink's slow path packets.
    pub mark: u32,
    pub ifindex: u32,
    /// The uplink's local address; `None`: it has none right now (no `from`
    /// rule, the table route still goes in if the link is up).
    pub address: Option<Ipv4Addr>,
    /// Next hop; `None` on point-to-point links (a device route).
    pub gateway: Option<Ipv4Addr>,
    /// Multipath weight in main's default route; 0 = a backup, only used
    /// when no weighted uplink is usable.
    pub weight: u32,
    /// `false`: left out of main's default route.
    pub usable: bool,
    /// Source prefixes that leave through this uplink untranslated.
    pub routed: Vec<Prefix>,
}

/// Uplinks that share one local address: the gateway's own traffic from it
/// takes a multipath table over their routers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SharedSource {
    pub address: Ipv4Addr,
    pub table: u32,
    /// Indices into [`RoutingPlan::uplinks`], at least two.
    pub members: Vec<usize>,
}

/// Rules of shared addresses start at `rule_priority` + this.
pub const SHARED_RULE_OFFSET: u32 = 2 * FWMARK_RULE_OFFSET + 8;

#[derive(Clone, Debug)]
pub struct RoutingPlan {
    pub uplinks: Vec<UplinkRoutes>,
    pub shared: Vec<SharedSource>,
    /// Base priority of our rules (see the module docs).
    pub rule_priority: u32,
    /// The table our suppressing rule looks up and our default goes into
    /// (254).
    pub main_table: u32,
    /// The mark of new flows a policy refuses, when the config can refuse
    /// any: `fwmark M prohibit` at `p + 19` makes the kernel answer ICMP
    /// administratively prohibited.
    pub prohibit_mark: Option<u32>,
}

/// The priority of the `prohibit` rule, after the `from` rules' block.
pub const PROHIBIT_RULE_OFFSET: u32 = FWMARK_RULE_OFFSET - 1;

/// Keeps the kernel's rules and routes tagged [`PROTO_MULTIHOME`] in line
/// with a [`RoutingPlan`].
pub struct Routing {
    handle: Handle,
    /// Netlink writes that succeeded, for logs and tests.
    changes: u64,
    /// What the last `apply` warned about, so that a link that stays down
    /// is reported once and not on every refresh.
    warned: HashSet<String>,
}

impl Routing {
    pub fn new(handle: Handle) -> Self {
        Self {
            handle,
            changes: 0,
            warned: HashSet::new(),
        }
    }

    /// Netlink writes that succeeded so far: a change between two reads
    /// means the kernel's rules or routes changed.
    pub fn changes(&self) -> u64 {
        self.changes
    }

    /// Makes the kernel match `plan` exactly for everything tagged
    /// [`PROTO_MULTIHOME`]: adds what is missing, replaces what differs,
    /// deletes tagged rules and routes that are not in the plan, and never
    /// touches anything else. A second call with the same plan sends
    /// nothing to the kernel.
    ///
    /// A table route (and its share of main's default) whose link is down
    /// or whose gateway is not reachable yet is left out with a warning.
    /// Other failures do not stop the rest of the plan; they are all
    /// returned at the end.
    pub async fn apply(&mut self, plan: &RoutingPlan) -> anyhow::Result<()> {
        validate(plan)?;
        let before = self.changes;
        let mut errors = Vec::new();
        let mut warnings = Vec::new();

        let all_routes = self.dump_routes().await?;
        let mut ours: Vec<OurRoute> = Vec::new();
        let mut foreign: Vec<RouteKey> = Vec::new();
        for msg in all_routes {
            if is_our_route(&msg) {
                ours.push(OurRoute::new(msg));
            } else if let Some(key) = RouteKey::of(&msg) {
                foreign.push(key);
            }
        }

        // The uplinks' tables.
        let mut installed = vec![false; plan.uplinks.len()];
        for (i, u) in plan.uplinks.iter().enumerate() {
            if u.ifindex == 0 {
                warnings.push(format!(
                    "table {}: no default route: the uplink's interface does not exist",
                    u.table
                ));
                continue;
            }
            let route = Route {
                table: u.table,
                metric: 0,
                hops: vec![NextHop {
                    gateway: u.gateway,
                    ifindex: u.ifindex,
                    weight: 1,
                }],
            };
            match self.ensure_route(&route, plan, &mut ours, &foreign).await {
                Ok(Ensured::Present) => installed[i] = true,
                Ok(Ensured::Skipped(why)) => warnings.push(format!(
                    "table {}: no default route for now ({route}): {why}",
                    u.table
                )),
                Err(e) => errors.push(e),
            }
        }

        // Shared addresses' tables.
        for sh in &plan.shared {
            let hops = multipath_hops(plan, &installed, |i| sh.members.contains(&i));
            if hops.is_empty() {
                warnings.push(format!(
                    "table {}: no default route: no router of {} can carry it",
                    sh.table, sh.address
                ));
                continue;
            }
            let route = Route {
                table: sh.table,
                metric: 0,
                hops,
            };
            match self.ensure_route(&route, plan, &mut ours, &foreign).await {
                Ok(Ensured::Present) => {}
                Ok(Ensured::Skipped(why)) => warnings.push(format!(
                    "table {}: no default route for now ({route}): {why}",
                    sh.table
                )),
                Err(e) => errors.push(e),
            }
        }

        // Main's default route.
        let hops = multipath_hops(plan, &installed, |_| true);
        if hops.is_empty() {
            if !plan.uplinks.is_empty() {
                warnings.push(format!(
                    "table {}: no default route: no uplink can carry it",
                    TableName(plan.main_table)
                ));
            }
        } else {
            let route = Route {
                table: plan.main_table,
                metric: MAIN_METRIC,
                hops,
            };
            match self.ensure_route(&route, plan, &mut ours, &foreign).await {
                Ok(Ensured::Present) => {}
                Ok(Ensured::Skipped(why)) => warnings.push(format!(
                    "table {}: no default route for now ({route}): {why}",
                    TableName(plan.main_table)
                )),
                Err(e) => errors.push(e),
            }
        }

        // Rules: add the missing ones first, then drop the stale ones, so
        // that a rule that changes is never absent.
        match self.dump_rules().await {
            Err(e) => errors.push(e),
            Ok(rules) => {
                let mut existing: Vec<(RuleMessage, Option<Rule>, bool)> = rules
                    .into_iter()
                    .filter(is_our_rule)
                    .map(|m| {
                        let r = Rule::of(&m);
                        (m, r, false)
                    })
                    .collect();
                for want in desired_rules(plan) {
                    if let Some(e) = existing
                        .iter_mut()
                        .find(|(_, r, keep)| !*keep && *r == Some(want))
                    {
                        e.2 = true;
                        continue;
                    }
                    match self.add_rule(&want).await {
                        Ok(()) => info!("added rule {}: {want}", want.priority),
                        Err(e) => errors.push(e),
                    }
                }
                for (msg, _, _) in existing.into_iter().filter(|e| !e.2) {
                    let what = describe_rule(&msg);
                    match self.delete_rule(msg).await {
                        Ok(()) => info!("removed rule {what}"),
                        Err(e) => errors.push(e.context(format!("removing rule `{what}`"))),
                    }
                }
            }
        }

        // Tagged routes the plan does not have.
        for r in ours.into_iter().filter(|r| !r.keep) {
            let what = r.to_string();
            match self.delete_route(r.msg).await {
                Ok(()) => info!("removed route {what}"),
                Err(e) => errors.push(e.context(format!("removing route `{what}`"))),
            }
        }

        let warned: HashSet<String> = warnings.into_iter().collect();
        for w in &warned {
            if self.warned.contains(w) {
                debug!("{w}");
            } else {
                warn!("{w}");
            }
        }
        self.warned = warned;
        debug!(
            "routing plan applied with {} change(s)",
            self.changes - before
        );
        combine(errors)
    }

    /// Removes every IPv4 rule and route tagged [`PROTO_MULTIHOME`], in any
    /// table.
    pub async fn remove_all(&mut self) -> anyhow::Result<()> {
        let mut errors = Vec::new();
        let mut removed = 0usize;
        match self.dump_rules().await {
            Err(e) => errors.push(e),
            Ok(rules) => {
                for msg in rules.into_iter().filter(is_our_rule) {
                    let what = describe_rule(&msg);
                    match self.delete_rule(msg).await {
                        Ok(()) => removed += 1,
                        Err(e) => errors.push(e.context(format!("removing rule `{what}`"))),
                    }
                }
            }
        }
        match self.dump_routes().await {
            Err(e) => errors.push(e),
            Ok(routes) => {
                for msg in routes.into_iter().filter(is_our_route) {
                    let what = OurRoute::new(msg.clone()).to_string();
                    match self.delete_route(msg).await {
                        Ok(()) => removed += 1,
                        Err(e) => errors.push(e.context(format!("removing route `{what}`"))),
                    }
                }
            }
        }
        self.warned.clear();
        if removed > 0 {
            info!("removed {removed} rule(s) and route(s) tagged proto {PROTO_MULTIHOME}");
        }
        combine(errors)
    }

    /// Brings `route`'s slot (table, default, metric) to exactly `route`:
    /// keeps an identical tagged route, replaces a different one in place,
    /// adds it if there is none.
    async fn ensure_route(
        &mut self,
        route: &Route,
        plan: &RoutingPlan,
        ours: &mut [OurRoute],
        foreign: &[RouteKey],
    ) -> anyhow::Result<Ensured> {
        let key = route.key();
        let adding = || format!("adding route `{route}`");
        if foreign.contains(&key) {
            return Err(anyhow!("{}", conflict_hint(route, plan))).context(adding());
        }
        let mut same_slot = ours
            .iter_mut()
            .filter(|r| !r.keep && r.key == Some(key))
            .collect::<Vec<_>>();
        if let Some(r) = same_slot
            .iter_mut()
            .find(|r| r.route.as_ref() == Some(route))
        {
            r.keep = true;
            return Ok(Ensured::Present);
        }
        let replace = !same_slot.is_empty();
        let mut req = self.handle.route().add(route.message());
        if replace {
            req = req.replace();
        }
        match req.execute().await {
            Ok(()) => {
                self.changes += 1;
                if let Some(old) = same_slot.first_mut() {
                    // The kernel replaced the first route in the slot, and
                    // with no foreign route there, that is one of ours.
                    info!("replaced route {old} with {route}");
                    old.keep = true;
                } else {
                    info!("added route {route}");
                }
                Ok(Ensured::Present)
            }
            Err(e) => match errno(&e) {
                Some(code @ (libc::ENETDOWN | libc::ENETUNREACH | libc::ENODEV)) => {
                    Ok(Ensured::Skipped(skip_reason(code, route)))
                }
                Some(libc::EEXIST) => Err(anyhow!(
                    "{}: {}",
                    os_error(libc::EEXIST),
                    conflict_hint(route, plan)
                ))
                .context(adding()),
                _ => Err(nl_error(e)).context(if replace {
                    format!(
                        "replacing our route in table {} with `{route}`",
                        route.table
                    )
                } else {
                    adding()
                }),
            },
        }
    }

    async fn add_rule(&mut self, rule: &Rule) -> anyhow::Result<()> {
        let mut req = self
            .handle
            .rule()
            .add()
            .v4()
            .table_id(rule.table)
            .priority(rule.priority)
            .action(RuleAction::ToTable);
        match rule.selector {
            Selector::FwMarkUnreachable(_) => req = req.action(RuleAction::Unreachable),
            Selector::FwMarkProhibit(_) => req = req.action(RuleAction::Prohibit),
            _ => {}
        }
        match rule.selector {
            Selector::SuppressDefault => req
                .message_mut()
                .attributes
                .push(RuleAttribute::SuppressPrefixLen(0)),
            Selector::From(addr, len) => req = req.source_prefix(addr, len),
            Selector::FwMark(mark)
            | Selector::FwMarkUnreachable(mark)
            | Selector::FwMarkProhibit(mark) => req = exact_mark(req, mark),
        }
        let req = tagged(req);
        let context = || format!("adding rule `{rule}` (priority {})", rule.priority);
        match req.execute().await {
            Ok(()) => {
                self.changes += 1;
                Ok(())
            }
            Err(e) if errno(&e) == Some(libc::EEXIST) => Err(anyhow!(
                "{}: another rule, not installed by multihome, has this priority and selector; \
                 delete it (`ip rule del priority {}`) or change `routing.rule_priority` in the config",
                os_error(libc::EEXIST),
                rule.priority
            ))
            .with_context(context),
            Err(e) => Err(nl_error(e)).with_context(context),
        }
    }

    async fn delete_rule(&mut self, msg: RuleMessage) -> anyhow::Result<()> {
        match self.handle.rule().del(msg).execute().await {
            Ok(()) => {
                self.changes += 1;
                Ok(())
            }
            // Gone already.
            Err(e) if errno(&e) == Some(libc::ENOENT) => Ok(()),
            Err(e) => Err(nl_error(e)),
        }
    }

    async fn delete_route(&mut self, msg: RouteMessage) -> anyhow::Result<()> {
        match self.handle.route().del(msg).execute().await {
            Ok(()) => {
                self.changes += 1;
                Ok(())
            }
            // Gone already (e.g. with its link).
            Err(e) if matches!(errno(&e), Some(libc::ESRCH | libc::ENOENT)) => Ok(()),
            Err(e) => Err(nl_error(e)),
        }
    }

    /// How new flows may classify their route. `Err(why)` when the
    /// kernel's policy rules do more than route an unmarked packet from
    /// the LAN through the `local` table, then `main`: more than the
    /// kernel's three default rules and ours (whose selectors never match
    /// such a packet: `from` an uplink address or a routed prefix,
    /// `fwmark`, and `main` without its default routes), or a route in
    /// the `default` table. New flows then take the full lookup.
    /// `uplinks`: the uplinks' device indexes, for [`mainroutes::mirror`].
    pub async fn classify_in_main(
        &self,
        uplinks: &[u32],
    ) -> anyhow::Result<Result<InMain, String>> {
        let rules = self.dump_rules().await?;
        if let Some(r) = rules
            .iter()
            .find(|r| !is_our_rule(r) && !is_default_rule(r))
        {
            let priority = r.attributes.iter().find_map(|a| match a {
                RuleAttribute::Priority(p) => Some(*p),
                _ => None,
            });
            return Ok(Err(format!(
                "rule {} is neither the kernel's own nor multihome's",
                priority.unwrap_or(0)
            )));
        }
        let routes = self.dump_routes().await?;
        Ok(local_addresses(&routes).map(|locals| InMain {
            locals,
            main: mainroutes::mirror(&routes, uplinks),
        }))
    }

    async fn dump_rules(&self) -> anyhow::Result<Vec<RuleMessage>> {
        self.handle
            .rule()
            .get(IpVersion::V4)
            .execute()
            .try_collect()
            .await
            .map_err(nl_error)
            .context("listing the IPv4 policy rules")
    }

    async fn dump_routes(&self) -> anyhow::Result<Vec<RouteMessage>> {
        dump_routes(&self.handle, AddressFamily::Inet).await
    }
}

/// Every route of `family` in every table.
pub(crate) async fn dump_routes(
    handle: &Handle,
    family: AddressFamily,
) -> anyhow::Result<Vec<RouteMessage>> {
    // All zero but the family: every table, with or without
    // NETLINK_GET_STRICT_CHK on the socket.
    let mut query = RouteMessage::default();
    query.header.address_family = family;
    handle
        .route()
        .get(query)
        .execute()
        .try_collect()
        .await
        .map_err(nl_error)
        .with_context(|| format!("listing the {family:?} routes of all tables"))
}

/// What new flows classify their route by when the policy rules come
/// down to `local` then `main` ([`Routing::classify_in_main`]).
#[derive(Debug, PartialEq)]
pub struct InMain {
    /// The `local` table's addresses and their kind (`LOCAL_ADDR`,
    /// `LOCAL_BROADCAST`).
    pub locals: Vec<(Ipv4Addr, u32)>,
    /// `main` as `MAIN_ROUTES` entries, or why it is not mirrored (then
    /// `bpf_fib_lookup` in `main`).
    pub main: Result<Vec<(Prefix, MainRoute)>, String>,
}

enum Ensured {
    Present,
    Skipped(String),
}

fn validate(plan: &RoutingPlan) -> anyhow::Result<()> {
    let n = plan.uplinks.len() as u32;
    if plan.main_table == 0 {
        bail!("routing plan: main table 0 is not a table");
    }
    if n >= FWMARK_RULE_OFFSET {
        bail!(
            "routing plan: {n} uplinks, at most {} fit",
            FWMARK_RULE_OFFSET - 1
        );
    }
    if plan.rule_priority == 0 {
        bail!(
            "`routing.rule_priority` 0 would put our rules before the local table's; pick 1..{}",
            MAIN_RULE_PRIORITY - 2 * FWMARK_RULE_OFFSET - n
        );
    }
    let last = plan.rule_priority.checked_add(SHARED_RULE_OFFSET + n);
    if last.is_none_or(|l| l > MAIN_RULE_PRIORITY) {
        bail!(
            "`routing.rule_priority` {} puts our rules at or after the main table's rule ({MAIN_RULE_PRIORITY}), \
             where they would never match; pick 1..{}",
            plan.rule_priority,
            MAIN_RULE_PRIORITY - SHARED_RULE_OFFSET - n
        );
    }
    let mut tables = HashSet::new();
    let mut marks = HashSet::new();
    for u in &plan.uplinks {
        if [0, RT_TABLE_DEFAULT, RT_TABLE_LOCAL, plan.main_table].contains(&u.table) {
            bail!(
                "routing table {} is reserved (0, default, main, local); change `routing.table_base` in the config",
                u.table
            );
        }
        if !tables.insert(u.table) {
            bail!("routing plan: table {} is used by two uplinks", u.table);
        }
        if u.mark == 0 {
            bail!(
                "routing plan: fwmark 0 would send every unmarked packet to table {}",
                u.table
            );
        }
        if !marks.insert(u.mark) {
            bail!("routing plan: fwmark {:#x} is used by two uplinks", u.mark);
        }
    }
    for sh in &plan.shared {
        if [0, RT_TABLE_DEFAULT, RT_TABLE_LOCAL, plan.main_table].contains(&sh.table)
            || !tables.insert(sh.table)
        {
            bail!(
                "routing table {} of shared address {} is reserved or taken; change `routing.table_base`",
                sh.table,
                sh.address
            );
        }
    }
    Ok(())
}

fn desired_rules(plan: &RoutingPlan) -> Vec<Rule> {
    let p = plan.rule_priority;
    let mut rules = vec![Rule {
        priority: p,
        table: plan.main_table,
        selector: Selector::SuppressDefault,
    }];
    let shared = |i: usize| plan.shared.iter().any(|s| s.members.contains(&i));
    for (i, u) in plan.uplinks.iter().enumerate() {
        if let Some(addr) = u.address.filter(|_| !shared(i)) {
            rules.push(Rule {
                priority: p + 1 + i as u32,
                table: u.table,
                selector: Selector::From(addr, 32),
            });
        }
        for r in &u.routed {
            rules.push(Rule {
                priority: p + 1 + i as u32,
                table: u.table,
                selector: Selector::From(r.network(), r.len),
            });
        }
    }
    for (i, u) in plan.uplinks.iter().enumerate() {
        rules.push(Rule {
            priority: p + FWMARK_RULE_OFFSET + i as u32,
            table: u.table,
            selector: Selector::FwMark(u.mark),
        });
        rules.push(Rule {
            priority: p + 2 * FWMARK_RULE_OFFSET + i as u32,
            table: 0,
            selector: Selector::FwMarkUnreachable(u.mark),
        });
    }
    if let Some(mark) = plan.prohibit_mark {
        rules.push(Rule {
            priority: p + PROHIBIT_RULE_OFFSET,
            table: 0,
            selector: Selector::FwMarkProhibit(mark),
        });
    }
    for sh in &plan.shared {
        let first = sh.members.iter().min().copied().unwrap_or(0);
        rules.push(Rule {
            priority: p + SHARED_RULE_OFFSET + first as u32,
            table: sh.table,
            selector: Selector::From(sh.address, 32),
        });
    }
    rules
}

/// Next hops of a multipath default over the uplinks `member` admits
/// (main's: all of them): the usable uplinks with a weight; if there are
/// none, the usable backups (weight 0, counted as 1); if none is usable,
/// every uplink with an address, to keep forwarding on what there is. Only
/// uplinks whose own table route is in place (`installed`): the kernel
/// refuses a multipath route with a next hop it cannot use.
fn multipath_hops(
    plan: &RoutingPlan,
    installed: &[bool],
    member: impl Fn(usize) -> bool,
) -> Vec<NextHop> {
    let up = &plan.uplinks;
    let pick = |f: &dyn Fn(&UplinkRoutes) -> bool| -> Vec<usize> {
        (0..up.len()).filter(|&i| member(i) && f(&up[i])).collect()
    };
    let mut chosen = pick(&|u| u.usable && u.weight > 0);
    if chosen.is_empty() {
        chosen = pick(&|u| u.usable);
    }
    if chosen.is_empty() {
        chosen = pick(&|u| u.address.is_some());
    }
    chosen.retain(|&i| installed.get(i).copied().unwrap_or(false));
    let weights = scale_weights(
        &chosen
            .iter()
            .map(|&i| up[i].weight.max(1))
            .collect::<Vec<_>>(),
    );
    chosen
        .iter()
        .zip(weights)
        .map(|(&i, weight)| NextHop {
            gateway: up[i].gateway,
            ifindex: up[i].ifindex,
            weight: if chosen.len() == 1 { 1 } else { weight },
        })
        .collect()
}

/// Kernel weights are 1..=256: larger ones are scaled down in proportion.
fn scale_weights(weights: &[u32]) -> Vec<u32> {
    let max = weights.iter().copied().max().unwrap_or(1).max(1);
    weights
        .iter()
        .map(|&w| {
            let w = w.max(1);
            if max <= 256 {
                w
            } else {
                ((u64::from(w) * 256 + u64::from(max) / 2) / u64::from(max)).clamp(1, 256) as u32
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Rules

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Selector {
    /// `from all ... suppress_prefixlength 0`
    SuppressDefault,
    /// `from ADDR/LEN`: an uplink's address (/32) or a routed prefix.
    From(Ipv4Addr, u8),
    /// `fwmark MARK/0xffffffff`
    FwMark(u32),
    /// `fwmark MARK/0xffffffff unreachable`: after the uplink's table, so
    /// that its slow-path packets never fall through to another uplink
    /// while its table has no route (the kernel answers unreachable).
    FwMarkUnreachable(u32),
    /// `fwmark MARK/0xffffffff prohibit`: new flows a policy refuses.
    FwMarkProhibit(u32),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Rule {
    priority: u32,
    table: u32,
    selector: Selector,
}

impl Rule {
    /// The rule `msg` is, if it has one of the shapes we install.
    fn of(msg: &RuleMessage) -> Option<Rule> {
        let h = &msg.header;
        let unreachable = h.action == RuleAction::Unreachable;
        let prohibit = h.action == RuleAction::Prohibit;
        if h.family != AddressFamily::Inet
            || !(h.action == RuleAction::ToTable || unreachable || prohibit)
            || h.dst_len != 0
            || h.tos != 0
            || h.flags.contains(RuleFlags::Invert)
        {
            return None;
        }
        let mut priority = 0;
        let mut table = u32::from(h.table);
        let mut src = None;
        let mut mark = None;
        let mut mask = None;
        let mut suppress = None;
        for attr in &msg.attributes {
            match attr {
                RuleAttribute::Priority(p) => priority = *p,
                RuleAttribute::Table(t) => table = *t,
                RuleAttribute::Protocol(_) => {}
                RuleAttribute::Source(std::net::IpAddr::V4(a)) => src = Some(*a),
                RuleAttribute::FwMark(m) => mark = Some(*m),
                RuleAttribute::FwMask(m) => mask = Some(*m),
                // The kernel reports "unset" as u32::MAX.
                RuleAttribute::SuppressPrefixLen(n) => {
                    suppress = Some(*n).filter(|n| *n != u32::MAX)
                }
                _ => return None,
            }
        }
        let selector = match (src, mark, suppress) {
            (None, None, Some(0)) if h.src_len == 0 && mask.unwrap_or(0) == 0 => {
                Selector::SuppressDefault
            }
            (Some(a), None, None) if h.src_len > 0 && mask.unwrap_or(0) == 0 => {
                Selector::From(a, h.src_len)
            }
            (None, Some(m), None) if h.src_len == 0 && mask.unwrap_or(u32::MAX) == u32::MAX => {
                if unreachable {
                    Selector::FwMarkUnreachable(m)
                } else if prohibit {
                    Selector::FwMarkProhibit(m)
                } else {
                    Selector::FwMark(m)
                }
            }
            _ => return None,
        };
        if unreachable != matches!(selector, Selector::FwMarkUnreachable(_))
            || prohibit != matches!(selector, Selector::FwMarkProhibit(_))
        {
            return None;
        }
        Some(Rule {
            priority,
            table: if unreachable || prohibit { 0 } else { table },
            selector,
        })
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let table = TableName(self.table);
        match self.selector {
            Selector::SuppressDefault => {
                write!(f, "from all lookup {table} suppress_prefixlength 0")
            }
            Selector::From(a, 32) => write!(f, "from {a} lookup {table}"),
            Selector::From(a, len) => write!(f, "from {a}/{len} lookup {table}"),
            Selector::FwMark(m) => write!(f, "fwmark {m:#x} lookup {table}"),
            Selector::FwMarkUnreachable(m) => write!(f, "fwmark {m:#x} unreachable"),
            Selector::FwMarkProhibit(m) => write!(f, "fwmark {m:#x} prohibit"),
        }
    }
}

/// A rule tagged [`PROTO_MULTIHOME`], of either family.
pub(crate) fn is_our_rule(msg: &RuleMessage) -> bool {
    msg.attributes
        .iter()
        .any(|a| matches!(a, RuleAttribute::Protocol(p) if u8::from(*p) == PROTO_MULTIHOME))
}

/// One of the kernel's own rules, as it makes them in a new namespace:
/// `0: from all lookup local`, `32766: from all lookup main`, `32767: from
/// all lookup default`, with no selector.
fn is_default_rule(msg: &RuleMessage) -> bool {
    let h = &msg.header;
    let mut priority = 0;
    let mut table = u32::from(h.table);
    for a in &msg.attributes {
        match a {
            RuleAttribute::Priority(p) => priority = *p,
            RuleAttribute::Table(t) => table = *t,
            RuleAttribute::Protocol(_) => {}
            // -1: not set.
            RuleAttribute::SuppressPrefixLen(u32::MAX)
            | RuleAttribute::SuppressIfGroup(u32::MAX) => {}
            _ => return false,
        }
    }
    h.action == RuleAction::ToTable
        && (h.src_len, h.dst_len, h.tos) == (0, 0, 0)
        && h.flags.is_empty()
        && matches!(
            (priority, table),
            (0, RT_TABLE_LOCAL) | (32766, RT_TABLE_MAIN) | (32767, RT_TABLE_DEFAULT)
        )
}

/// The local and broadcast addresses of the `local` table, with
/// `LOCAL_ADDR` or `LOCAL_BROADCAST`, leaving out 127/8 (the datapath
/// never makes a flow there); None when the `default` table holds a route
/// or `local` holds anything else (a prefix of local addresses, say):
/// then only the full lookup routes as the kernel does.
fn local_addresses(routes: &[RouteMessage]) -> Result<Vec<(Ipv4Addr, u32)>, String> {
    let mut found = Vec::new();
    for r in routes {
        if r.header.address_family != AddressFamily::Inet {
            continue;
        }
        match route_table(r) {
            RT_TABLE_DEFAULT => return Err("a route in table default".into()),
            RT_TABLE_LOCAL => {}
            _ => continue,
        }
        let dst = r.attributes.iter().find_map(|a| match a {
            RouteAttribute::Destination(RouteAddress::Inet(d)) => Some(*d),
            _ => None,
        });
        let Some(dst) = dst.filter(|d| d.octets()[0] != 127) else {
            continue;
        };
        let kind = match r.header.kind {
            RouteType::Local => multihome_common::LOCAL_ADDR,
            RouteType::Broadcast => multihome_common::LOCAL_BROADCAST,
            other => return Err(format!("a route of type {other:?} in table local")),
        };
        if r.header.destination_prefix_length != 32 {
            return Err(format!(
                "{dst}/{} in table local",
                r.header.destination_prefix_length
            ));
        }
        found.push((dst, kind));
    }
    Ok(found)
}

/// A tagged rule for messages, in whatever shape it is.
fn describe_rule(msg: &RuleMessage) -> String {
    if let Some(r) = Rule::of(msg) {
        return format!("{}: {r}", r.priority);
    }
    let priority = msg.attributes.iter().find_map(|a| match a {
        RuleAttribute::Priority(p) => Some(*p),
        _ => None,
    });
    format!("priority {} proto {PROTO_MULTIHOME}", priority.unwrap_or(0))
}

// ---------------------------------------------------------------------------
// Routes

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct NextHop {
    gateway: Option<Ipv4Addr>,
    ifindex: u32,
    /// 1..=256; 1 for a route with a single next hop.
    weight: u32,
}

/// A unicast IPv4 default route with tos 0, the only kind we install.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Route {
    table: u32,
    metric: u32,
    hops: Vec<NextHop>,
}

/// What the kernel tells IPv4 routes apart by: routes with the same key
/// replace each other, or collide (`EEXIST`) on a plain add.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct RouteKey {
    table: u32,
    metric: u32,
}

impl RouteKey {
    /// The key of a default route with tos 0; `None` for anything else.
    fn of(msg: &RouteMessage) -> Option<RouteKey> {
        let h = &msg.header;
        if h.address_family != AddressFamily::Inet || h.destination_prefix_length != 0 || h.tos != 0
        {
            return None;
        }
        Some(RouteKey {
            table: route_table(msg),
            metric: msg
                .attributes
                .iter()
                .find_map(|a| match a {
                    RouteAttribute::Priority(p) => Some(*p),
                    _ => None,
                })
                .unwrap_or(0),
        })
    }
}

impl Route {
    fn key(&self) -> RouteKey {
        RouteKey {
            table: self.table,
            metric: self.metric,
        }
    }

    /// `ip route` picks scope link for a device route with a single next hop
    /// and universe otherwise; so do we.
    fn scope(&self) -> RouteScope {
        match self.hops.as_slice() {
            [hop] if hop.gateway.is_none() => RouteScope::Link,
            _ => RouteScope::Universe,
        }
    }

    fn message(&self) -> RouteMessage {
        let mut msg = RouteMessage::default();
        let h = &mut msg.header;
        h.address_family = AddressFamily::Inet;
        h.protocol = RouteProtocol::Other(PROTO_MULTIHOME);
        h.scope = self.scope();
        h.kind = RouteType::Unicast;
        if self.table > 255 {
            h.table = RT_TABLE_COMPAT;
        } else {
            h.table = self.table as u8;
        }
        let attrs = &mut msg.attributes;
        attrs.push(RouteAttribute::Table(self.table));
        if self.metric != 0 {
            attrs.push(RouteAttribute::Priority(self.metric));
        }
        match self.hops.as_slice() {
            [hop] => {
                if let Some(gw) = hop.gateway {
                    attrs.push(RouteAttribute::Gateway(RouteAddress::Inet(gw)));
                }
                attrs.push(RouteAttribute::Oif(hop.ifindex));
            }
            hops => attrs.push(RouteAttribute::MultiPath(
                hops.iter()
                    .map(|hop| {
                        let mut nh = RouteNextHop::default();
                        nh.interface_index = hop.ifindex;
                        nh.hops = (hop.weight.clamp(1, 256) - 1) as u8;
                        if let Some(gw) = hop.gateway {
                            nh.attributes
                                .push(RouteAttribute::Gateway(RouteAddress::Inet(gw)));
                        }
                        nh
                    })
                    .collect(),
            )),
        }
        msg
    }

    /// The route `msg` is, if it has the shape we install.
    fn of(msg: &RouteMessage) -> Option<Route> {
        let key = RouteKey::of(msg)?;
        let h = &msg.header;
        if h.kind != RouteType::Unicast || h.source_prefix_length != 0 {
            return None;
        }
        let mut gateway = None;
        let mut oif = None;
        let mut multipath = None;
        for attr in &msg.attributes {
            match attr {
                RouteAttribute::Table(_)
                | RouteAttribute::Priority(_)
                | RouteAttribute::CacheInfo(_) => {}
                RouteAttribute::Destination(RouteAddress::Inet(a)) if a.is_unspecified() => {}
                RouteAttribute::Gateway(RouteAddress::Inet(a)) => gateway = Some(*a),
                RouteAttribute::Oif(i) => oif = Some(*i),
                RouteAttribute::MultiPath(hops) => multipath = Some(hops),
                _ => return None,
            }
        }
        let hops = match (multipath, oif) {
            (None, Some(ifindex)) => vec![NextHop {
                gateway,
                ifindex,
                weight: 1,
            }],
            (Some(hops), None) if gateway.is_none() && hops.len() > 1 => {
                hops.iter().map(next_hop_of).collect::<Option<Vec<_>>>()?
            }
            _ => return None,
        };
        let route = Route {
            table: key.table,
            metric: key.metric,
            hops,
        };
        (route.scope() == h.scope).then_some(route)
    }
}

fn next_hop_of(nh: &RouteNextHop) -> Option<NextHop> {
    if nh
        .flags
        .intersects(RouteNextHopFlags::Onlink | RouteNextHopFlags::Pervasive)
    {
        return None;
    }
    let mut gateway = None;
    for attr in &nh.attributes {
        match attr {
            RouteAttribute::Gateway(RouteAddress::Inet(a)) => gateway = Some(*a),
            _ => return None,
        }
    }
    Some(NextHop {
        gateway,
        ifindex: nh.interface_index,
        weight: u32::from(nh.hops) + 1,
    })
}

/// The table a route is in (`RTA_TABLE`, else the header's byte).
pub(crate) fn route_table(msg: &RouteMessage) -> u32 {
    msg.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(msg.header.table))
}

fn is_our_route(msg: &RouteMessage) -> bool {
    msg.header.address_family == AddressFamily::Inet
        && u8::from(msg.header.protocol) == PROTO_MULTIHOME
}

/// A tagged route found in the kernel.
struct OurRoute {
    msg: RouteMessage,
    key: Option<RouteKey>,
    /// `None`: not a shape we install, so never the one we want.
    route: Option<Route>,
    /// The plan has it (or it has been replaced by what the plan has).
    keep: bool,
}

impl OurRoute {
    fn new(msg: RouteMessage) -> Self {
        Self {
            key: RouteKey::of(&msg),
            route: Route::of(&msg),
            msg,
            keep: false,
        }
    }
}

impl fmt::Display for OurRoute {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(r) = &self.route {
            return r.fmt(f);
        }
        let h = &self.msg.header;
        let dst = self.msg.attributes.iter().find_map(|a| match a {
            RouteAttribute::Destination(RouteAddress::Inet(a)) => Some(*a),
            _ => None,
        });
        write!(
            f,
            "{}/{} table {} proto {PROTO_MULTIHOME}",
            dst.unwrap_or(Ipv4Addr::UNSPECIFIED),
            h.destination_prefix_length,
            TableName(route_table(&self.msg))
        )
    }
}

impl fmt::Display for NextHop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(gw) = self.gateway {
            write!(f, "via {gw} ")?;
        }
        write!(f, "dev {}", ifname(self.ifindex))
    }
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "default")?;
        match self.hops.as_slice() {
            [hop] => write!(f, " {hop}")?,
            hops => {
                for hop in hops {
                    write!(f, " nexthop {hop} weight {}", hop.weight)?;
                }
            }
        }
        if self.scope() == RouteScope::Link {
            write!(f, " scope link")?;
        }
        write!(
            f,
            " table {} proto {PROTO_MULTIHOME}",
            TableName(self.table)
        )?;
        if self.metric != 0 {
            write!(f, " metric {}", self.metric)?;
        }
        Ok(())
    }
}

struct TableName(u32);

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            RT_TABLE_MAIN => write!(f, "main"),
            RT_TABLE_DEFAULT => write!(f, "default"),
            RT_TABLE_LOCAL => write!(f, "local"),
            t => write!(f, "{t}"),
        }
    }
}

/// The interface's name for messages, or `#INDEX`.
fn ifname(ifindex: u32) -> String {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: `buf` has the IF_NAMESIZE bytes if_indextoname writes at most.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if p.is_null() {
        return format!("#{ifindex}");
    }
    // SAFETY: on success `buf` holds a NUL-terminated name.
    unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

// ---------------------------------------------------------------------------
// Errors

/// `req` matching exactly `fwmark MARK/0xffffffff`.
pub(crate) fn exact_mark<T>(req: RuleAddRequest<T>, mark: u32) -> RuleAddRequest<T> {
    let mut req = req.fw_mark(mark);
    req.message_mut()
        .attributes
        .push(RuleAttribute::FwMask(u32::MAX));
    req
}

/// `req` tagged [`PROTO_MULTIHOME`] (`FRA_PROTOCOL`), so that it is found
/// again.
pub(crate) fn tagged<T>(mut req: RuleAddRequest<T>) -> RuleAddRequest<T> {
    req.message_mut()
        .attributes
        .push(RuleAttribute::Protocol(RouteProtocol::Other(
            PROTO_MULTIHOME,
        )));
    req
}

/// The errno of a netlink error, if it carries one.
pub(crate) fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => Some(m.raw_code().abs()).filter(|c| *c != 0),
        _ => None,
    }
}

fn os_error(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}

/// A netlink failure as an error that reads like the errno it is.
fn nl_error(e: rtnetlink::Error) -> anyhow::Error {
    match errno(&e) {
        Some(code @ (libc::EPERM | libc::EACCES)) => anyhow!(
            "{}: changing routes and rules needs CAP_NET_ADMIN; run multihome as root",
            os_error(code)
        ),
        Some(code) => anyhow!(os_error(code)),
        None => anyhow!(e),
    }
}

fn conflict_hint(route: &Route, plan: &RoutingPlan) -> String {
    if route.table == plan.main_table {
        format!(
            "table {} already has a default route with metric {} that multihome did not install; \
             give that route another metric",
            TableName(route.table),
            route.metric
        )
    } else {
        format!(
            "table {} already has a default route that multihome did not install; \
             delete it (`ip route flush table {}`) or change `routing.table_base` in the config \
             so that multihome gets tables of its own",
            route.table, route.table
        )
    }
}

fn skip_reason(code: i32, route: &Route) -> String {
    match code {
        libc::ENETDOWN => "a link is down".into(),
        libc::ENODEV => "an interface is gone".into(),
        _ => {
            let gateways: Vec<String> = route
                .hops
                .iter()
                .filter_map(|h| h.gateway.map(|g| g.to_string()))
                .collect();
            if gateways.is_empty() {
                "the link is not usable".into()
            } else {
                format!(
                    "gateway {} not reachable (yet): no connected route to it",
                    gateways.join(", ")
                )
            }
        }
    }
}

fn combine(mut errors: Vec<anyhow::Error>) -> anyhow::Result<()> {
    match errors.len() {
        0 => Ok(()),
        1 => Err(errors.remove(0)),
        n => Err(anyhow!(
            "{n} routing changes failed: {}",
            errors
                .iter()
                .map(|e| format!("{e:#}"))
                .collect::<Vec<_>>()
                .join("; ")
        )),
    }
}

// ---------------------------------------------------------------------------
// sysctls

/// Turns on IPv4 forwarding (`net.ipv4.ip_forward = 1`).
pub fn enable_forwarding() -> anyhow::Result<()> {
    write_sysctl("/proc/sys/net/ipv4/ip_forward", 1, "IPv4 forwarding").context(
        "a gateway must forward: run multihome as root with /proc/sys writable \
         (in a container: --sysctl net.ipv4.ip_forward=1, or a privileged one)",
    )
}

/// Turns on IPv6 forwarding (`net.ipv6.conf.all.forwarding = 1`), and on
/// each of `uplinks` keeps router advertisements accepted (`accept_ra = 2`:
/// with forwarding on, 1 ignores them, and with them the ISP's router).
pub fn enable_forwarding6<'a>(uplinks: impl Iterator<Item = &'a str>) -> anyhow::Result<()> {
    write_sysctl(
        "/proc/sys/net/ipv6/conf/all/forwarding",
        1,
        "IPv6 forwarding",
    )
    .context("IPv6 through the uplinks needs IPv6 forwarding")?;
    for ifname in uplinks {
        if ifname.is_empty() || ifname.contains('/') || ifname.starts_with('.') {
            continue;
        }
        let path = format!("/proc/sys/net/ipv6/conf/{ifname}/accept_ra");
        // A missing interface gets it when it appears (the next refresh).
        if fs::metadata(&path).is_ok() {
            write_sysctl(&path, 2, "router advertisements with forwarding on")?;
        }
    }
    Ok(())
}

/// Turns on the NDP proxy of uplink `ifname` (`proxy_ndp = 1`): the
/// kernel answers neighbour solicitations for its proxy entries.
pub fn enable_proxy_ndp(ifname: &str) -> anyhow::Result<()> {
    if ifname.is_empty() || ifname.contains('/') || ifname.starts_with('.') {
        bail!("proxy_ndp for `{ifname}`: not an interface name");
    }
    write_sysctl(
        &format!("/proc/sys/net/ipv6/conf/{ifname}/proxy_ndp"),
        1,
        "the NDP proxy",
    )
}

/// Sets `net.ipv4.conf.IFNAME.rp_filter` (0 off, 1 strict, 2 loose). The
/// kernel uses the larger of this and `conf.all.rp_filter`.
pub fn set_rp_filter(ifname: &str, value: u8) -> anyhow::Result<()> {
    if value > 2 {
        bail!("rp_filter {value} for {ifname}: the values are 0 (off), 1 (strict) and 2 (loose)");
    }
    if ifname.is_empty() || ifname.contains('/') || ifname == "." || ifname == ".." {
        bail!("rp_filter for `{ifname}`: not an interface name");
    }
    let path = format!("/proc/sys/net/ipv4/conf/{ifname}/rp_filter");
    match write_sysctl(&path, value, "reverse path filtering") {
        Err(e)
            if e.downcast_ref::<io::Error>()
                .is_some_and(|e| e.kind() == ErrorKind::NotFound) =>
        {
            Err(e.context(format!(
                "interface {ifname} does not exist (yet); rp_filter is set again when it appears"
            )))
        }
        r => r.context("run multihome as root with /proc/sys writable"),
    }
}

/// Writes `value` to `path` unless it holds it already.
fn write_sysctl(path: &str, value: u8, what: &str) -> anyhow::Result<()> {
    let current = fs::read_to_string(path).with_context(|| format!("reading {path} ({what})"))?;
    if current.trim() == value.to_string() {
        return Ok(());
    }
    fs::write(path, format!("{value}\n"))
        .with_context(|| format!("writing {value} to {path} ({what})"))?;
    info!("{path}: {} -> {value}", current.trim());
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::{
        fs::File,
        io::Read,
        os::fd::AsRawFd,
        process::{Command, Stdio},
        thread,
        time::Duration,
    };

    use super::*;

    /// A rule as the kernel dumps it: `priority`, `table`, `extra`.
    fn rule(priority: u32, table: u32, extra: Vec<RuleAttribute>) -> RuleMessage {
        let mut m = RuleMessage::default();
        m.header.family = AddressFamily::Inet;
        m.header.action = RuleAction::ToTable;
        m.header.table = table.min(255) as u8;
        m.attributes = vec![
            RuleAttribute::Table(table),
            RuleAttribute::SuppressPrefixLen(u32::MAX),
            RuleAttribute::Protocol(RouteProtocol::Kernel),
        ];
        if priority != 0 {
            m.attributes.push(RuleAttribute::Priority(priority));
        }
        m.attributes.extend(extra);
        m
    }

    #[test]
    fn only_the_kernels_three_rules_unchanged_count_as_its_own() {
        for (p, t) in [(0, 255), (32766, 254), (32767, 253)] {
            assert!(is_default_rule(&rule(p, t, vec![])), "{p}: lookup {t}");
        }
        // Another table or place, a selector, another action.
        assert!(!is_default_rule(&rule(0, 254, vec![])));
        assert!(!is_default_rule(&rule(500, 200, vec![])));
        let from = RuleAttribute::Source(Ipv4Addr::new(198, 18, 1, 0).into());
        let mut m = rule(32766, 254, vec![from]);
        m.header.src_len = 24;
        assert!(!is_default_rule(&m));
        assert!(!is_default_rule(&rule(
            32766,
            254,
            vec![RuleAttribute::FwMark(1)]
        )));
        assert!(!is_default_rule(&rule(
            32766,
            254,
            vec![RuleAttribute::Iifname("lan0".into())]
        )));
        let mut m = rule(32766, 254, vec![]);
        m.header.action = RuleAction::Blackhole;
        assert!(!is_default_rule(&m));
    }

    /// A route in `table` of `kind` to `dst/len`.
    fn route(table: u32, kind: RouteType, dst: [u8; 4], len: u8) -> RouteMessage {
        let mut m = RouteMessage::default();
        m.header.address_family = AddressFamily::Inet;
        m.header.kind = kind;
        m.header.destination_prefix_length = len;
        m.attributes = vec![
            RouteAttribute::Table(table),
            RouteAttribute::Destination(RouteAddress::Inet(dst.into())),
        ];
        m
    }

    #[test]
    fn the_local_tables_addresses_are_listed_and_anything_unusual_there_refuses() {
        let mut routes = vec![
            route(255, RouteType::Local, [127, 0, 0, 0], 8),
            route(255, RouteType::Local, [198, 18, 1, 1], 32),
            route(255, RouteType::Broadcast, [198, 18, 1, 255], 32),
            route(254, RouteType::Unicast, [198, 18, 1, 0], 24),
        ];
        assert_eq!(
            local_addresses(&routes),
            Ok(vec![
                (Ipv4Addr::new(198, 18, 1, 1), multihome_common::LOCAL_ADDR),
                (
                    Ipv4Addr::new(198, 18, 1, 255),
                    multihome_common::LOCAL_BROADCAST
                ),
            ])
        );
        // AnyIP: a prefix of local addresses.
        routes.push(route(255, RouteType::Local, [198, 18, 96, 0], 24));
        assert!(local_addresses(&routes).is_err());
        routes.pop();
        // A route in table default.
        routes.push(route(253, RouteType::Unicast, [0, 0, 0, 0], 0));
        assert!(local_addresses(&routes).is_err());
    }

    fn hop(gateway: Option<[u8; 4]>, ifindex: u32, weight: u32) -> NextHop {
        NextHop {
            gateway: gateway.map(Ipv4Addr::from),
            ifindex,
            weight,
        }
    }

    fn uplink(i: u32, gateway: Option<[u8; 4]>, weight: u32, usable: bool) -> UplinkRoutes {
        UplinkRoutes {
            table: 101 + i,
            mark: 0x4d48_0001 + i,
            ifindex: 10 + i,
            address: Some(Ipv4Addr::new(198, 18, 11 * (i as u8 + 1), 1)),
            gateway: gateway.map(Ipv4Addr::from),
            weight,
            usable,
            routed: Vec::new(),
        }
    }

    fn plan(uplinks: Vec<UplinkRoutes>) -> RoutingPlan {
        RoutingPlan {
            uplinks,
            shared: Vec::new(),
            rule_priority: 1000,
            main_table: 254,
            prohibit_mark: None,
        }
    }

    #[test]
    fn a_shared_address_gets_one_rule_after_the_mark_rules_into_a_multipath_table() {
        let a = Ipv4Addr::new(198, 18, 10, 1);
        let mut p = plan(vec![
            uplink(0, Some([198, 18, 10, 254]), 1, true),
            uplink(1, Some([198, 18, 10, 253]), 1, true),
            uplink(2, Some([198, 18, 33, 254]), 1, true),
        ]);
        p.uplinks[0].address = Some(a);
        p.uplinks[1].address = Some(a);
        p.uplinks[1].ifindex = 10;
        p.shared = vec![SharedSource {
            address: a,
            table: 108,
            members: vec![0, 1],
        }];
        validate(&p).expect("valid");
        let from_a: Vec<Rule> = desired_rules(&p)
            .into_iter()
            .filter(|r| r.selector == Selector::From(a, 32))
            .collect();
        assert_eq!(
            from_a,
            [Rule {
                priority: 1000 + SHARED_RULE_OFFSET,
                table: 108,
                selector: Selector::From(a, 32),
            }]
        );
        let last_mark_rule = desired_rules(&p)
            .iter()
            .filter(|r| matches!(r.selector, Selector::FwMarkUnreachable(_)))
            .map(|r| r.priority)
            .max();
        assert!(
            last_mark_rule < Some(1000 + SHARED_RULE_OFFSET),
            "probes go by mark first"
        );
        let gw = |o: u8| Some([198, 18, 10, o]);
        assert_eq!(
            multipath_hops(&p, &[true; 3], |i| p.shared[0].members.contains(&i)),
            vec![hop(gw(254), 10, 1), hop(gw(253), 10, 1)]
        );
        p.shared[0].table = 101;
        assert!(validate(&p).is_err(), "a table used twice");
    }

    #[test]
    fn weights_are_scaled_into_the_kernel_range() {
        assert_eq!(scale_weights(&[1, 2, 256]), vec![1, 2, 256]);
        assert_eq!(scale_weights(&[1000, 2000]), vec![128, 256]);
        assert_eq!(scale_weights(&[1, 100_000]), vec![1, 256]);
        assert_eq!(scale_weights(&[0, 3]), vec![1, 3]);
    }

    #[test]
    fn main_route_takes_usable_then_backups_then_addressed_uplinks() {
        let gw = Some([198, 18, 11, 254]);
        let all = [true; 3];
        let p = plan(vec![
            uplink(0, gw, 1, true),
            uplink(1, None, 3, true),
            uplink(2, gw, 0, true),
        ]);
        assert_eq!(
            multipath_hops(&p, &all, |_| true),
            vec![hop(gw, 10, 1), hop(None, 11, 3)]
        );
        // The only weighted one is down: backups step in.
        let p = plan(vec![uplink(0, gw, 1, false), uplink(1, gw, 0, true)]);
        assert_eq!(multipath_hops(&p, &all, |_| true), vec![hop(gw, 11, 1)]);
        // Nothing usable: whatever has an address, if its table route is in.
        let mut p = plan(vec![uplink(0, gw, 2, false), uplink(1, gw, 5, false)]);
        assert_eq!(
            multipath_hops(&p, &all, |_| true),
            vec![hop(gw, 10, 2), hop(gw, 11, 5)]
        );
        assert_eq!(
            multipath_hops(&p, &[false, true], |_| true),
            vec![hop(gw, 11, 1)]
        );
        p.uplinks[0].address = None;
        p.uplinks[1].address = None;
        assert_eq!(multipath_hops(&p, &all, |_| true), vec![]);
    }

    #[test]
    fn route_messages_read_back_as_the_same_route() {
        for route in [
            Route {
                table: 101,
                metric: 0,
                hops: vec![hop(Some([198, 18, 11, 254]), 3, 1)],
            },
            Route {
                table: 1000,
                metric: 0,
                hops: vec![hop(None, 3, 1)],
            },
            Route {
                table: 254,
                metric: MAIN_METRIC,
                hops: vec![hop(Some([198, 18, 11, 254]), 3, 1), hop(None, 4, 256)],
            },
        ] {
            let msg = route.message();
            assert!(is_our_route(&msg));
            assert_eq!(Route::of(&msg), Some(route));
        }
    }

    #[test]
    fn plans_that_cannot_work_are_refused() {
        let gw = Some([198, 18, 11, 254]);
        let mut p = plan(vec![uplink(0, gw, 1, true), uplink(1, gw, 1, true)]);
        assert!(validate(&p).is_ok());
        p.uplinks[1].table = 101;
        assert!(validate(&p).is_err());
        p.uplinks[1].table = 254;
        assert!(validate(&p).is_err());
        p.uplinks[1].table = 102;
        p.uplinks[1].mark = 0;
        assert!(validate(&p).is_err());
        p.uplinks[1].mark = 2;
        p.rule_priority = 32760;
        assert!(validate(&p).is_err());
        p.rule_priority = 0;
        assert!(validate(&p).is_err());
    }

    // -----------------------------------------------------------------------
    // For real, in a network namespace of our own.

    /// A network namespace that is deleted when dropped, also on failure.
    struct Netns(String);

    impl Netns {
        fn new() -> Self {
            let name = format!("mhrt{}", std::process::id());
            let _ = Command::new("ip").args(["netns", "del", &name]).output();
            let out = Command::new("ip")
                .args(["netns", "add", &name])
                .output()
                .expect("running `ip` (iproute2)");
            assert!(
                out.status.success(),
                "ip netns add {name}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            Self(name)
        }
    }

    impl Drop for Netns {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
        }
    }

    fn ip(ns: &str, args: &str) -> String {
        let out = Command::new("ip")
            .args(["-n", ns])
            .args(args.split_whitespace())
            .output()
            .expect("running `ip` (iproute2)");
        assert!(
            out.status.success(),
            "ip -n {ns} {args}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Every IPv4 rule and route, one normalized line each, sorted.
    fn everything(ns: &str) -> Vec<String> {
        let rules = ip(ns, "-4 rule show");
        let routes = ip(ns, "-o -4 route show table all");
        let mut lines: Vec<String> = rules
            .lines()
            .chain(routes.lines())
            .map(|l| {
                l.replace('\\', " ")
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .filter(|l| !l.is_empty())
            .collect();
        lines.sort();
        lines
    }

    fn ours(ns: &str) -> Vec<String> {
        everything(ns)
            .into_iter()
            .filter(|l| l.contains(" proto 77"))
            .collect()
    }

    fn theirs(ns: &str) -> Vec<String> {
        everything(ns)
            .into_iter()
            .filter(|l| !l.contains(" proto 77"))
            .collect()
    }

    /// Runs `f` and returns what `ip monitor` saw of rules and routes
    /// meanwhile.
    async fn monitored<F: Future<Output = ()>>(ns: &str, f: F) -> String {
        let mut mon = Command::new("ip")
            .args(["-n", ns, "monitor", "rule", "route"])
            .stdout(Stdio::piped())
            .spawn()
            .expect("running `ip monitor`");
        tokio::time::sleep(Duration::from_millis(300)).await;
        f.await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let _ = mon.kill();
        let _ = mon.wait();
        let mut seen = String::new();
        if let Some(mut out) = mon.stdout.take() {
            let _ = out.read_to_string(&mut seen);
        }
        seen
    }

    fn ifindex(name: &str) -> u32 {
        let c = std::ffi::CString::new(name).expect("interface name");
        // SAFETY: a NUL-terminated string.
        let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
        assert_ne!(i, 0, "no interface {name} in the test namespace");
        i
    }

    #[test]
    fn applies_and_removes_in_a_network_namespace() {
        // SAFETY: no preconditions.
        let euid = unsafe { libc::geteuid() };
        assert_eq!(
            euid, 0,
            "this test creates a network namespace (`ip netns add`) and needs root \
             (CAP_SYS_ADMIN, CAP_NET_ADMIN): run it as root, e.g. with sudo"
        );
        let ns = Netns::new();
        let n = ns.0.as_str();
        // up0, up1: uplinks with a gateway; up2: point-to-point style, no
        // address, device route; up3: down.
        for i in 0..4 {
            ip(n, &format!("link add up{i} type veth peer name gw{i}"));
            ip(n, &format!("link set gw{i} up"));
            if i != 3 {
                ip(n, &format!("link set up{i} up"));
            }
        }
        ip(n, "link set lo up");
        ip(n, "addr add 198.18.11.1/24 dev up0");
        ip(n, "addr add 198.18.22.1/24 dev up1");
        ip(n, "addr add 198.18.44.1/24 dev up3");
        // What others installed, some of it in our tables and priorities.
        ip(n, "rule add priority 1005 from 10.9.9.9 lookup 200");
        ip(n, "rule add priority 1020 from 10.9.9.8 lookup 101");
        ip(n, "route add 10.0.0.0/8 via 198.18.11.254 table 200");
        ip(n, "route add default via 198.18.11.254");
        ip(n, "route add default via 198.18.11.254 table 101 metric 7");
        ip(n, "route add default via 198.18.11.254 table 105");
        let before = everything(n);

        let name = ns.0.clone();
        let outcome = thread::spawn(move || {
            let f = File::open(format!("/run/netns/{name}")).expect("opening the namespace");
            // SAFETY: a valid namespace fd; only this thread moves.
            let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", io::Error::last_os_error());
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("tokio runtime")
                .block_on(scenario(&name, before));
        })
        .join();
        if let Err(panic) = outcome {
            std::panic::resume_unwind(panic);
        }
        drop(ns);
    }

    async fn scenario(n: &str, before: Vec<String>) {
        let (conn, handle, _) = rtnetlink::new_connection().expect("rtnetlink socket");
        tokio::spawn(conn);
        let mut routing = Routing::new(handle);
        let gw = |o: u8| Some(Ipv4Addr::new(198, 18, o, 254));
        let addr = |o: u8| Some(Ipv4Addr::new(198, 18, o, 1));
        let up = |i: u32, address, gateway, weight, usable| UplinkRoutes {
            table: 101 + i,
            mark: 0x4d48_0001 + i,
            ifindex: ifindex(&format!("up{i}")),
            address,
            gateway,
            weight,
            usable,
            routed: Vec::new(),
        };
        let mut plan = RoutingPlan {
            uplinks: vec![
                up(0, addr(11), gw(11), 1, true),
                up(1, addr(22), gw(22), 2, true),
                up(2, None, None, 1, true),
                up(3, addr(44), gw(44), 1, false),
            ],
            shared: Vec::new(),
            rule_priority: 1000,
            main_table: 254,
            prohibit_mark: None,
        };
        let fwmark_rules = |p: u32| {
            (0..4)
                .flat_map(|i| {
                    [
                        format!(
                            "{}: from all fwmark {:#x} lookup {} proto 77",
                            p + 20 + i,
                            0x4d48_0001 + i,
                            101 + i
                        ),
                        format!(
                            "{}: from all fwmark {:#x} unreachable proto 77",
                            p + 40 + i,
                            0x4d48_0001 + i
                        ),
                    ]
                })
                .collect::<Vec<_>>()
        };
        let expect = |rules: &[&str], routes: &[&str], p: u32| {
            let mut want: Vec<String> = rules.iter().chain(routes).map(|s| s.to_string()).collect();
            want.extend(fwmark_rules(p));
            want.sort();
            want
        };

        // 1. From nothing. up3 is down: no table route, not in main.
        routing.apply(&plan).await.expect("first apply");
        assert_eq!(
            ours(n),
            expect(
                &[
                    "1000: from all lookup main suppress_prefixlength 0 proto 77",
                    "1001: from 198.18.11.1 lookup 101 proto 77",
                    "1002: from 198.18.22.1 lookup 102 proto 77",
                    "1004: from 198.18.44.1 lookup 104 proto 77",
                ],
                &[
                    "default via 198.18.11.254 dev up0 table 101 proto 77",
                    "default via 198.18.22.254 dev up1 table 102 proto 77",
                    "default dev up2 table 103 proto 77 scope link",
                    "default proto 77 metric 50 nexthop via 198.18.11.254 dev up0 weight 1 \
                     nexthop via 198.18.22.254 dev up1 weight 2 nexthop dev up2 weight 1",
                ],
                1000
            ),
            "after the first apply"
        );
        assert_eq!(
            theirs(n),
            before,
            "others' rules and routes after the first apply"
        );

        // 2. Again: the kernel hears nothing.
        let changes = routing.changes;
        let seen = monitored(n, async {
            routing.apply(&plan).await.expect("second apply");
        })
        .await;
        assert_eq!(seen, "", "the second apply changed something");
        assert_eq!(routing.changes, changes);

        // 3. New weights, up1 loses its address, up2 is not usable: one rule
        //    goes, main's route is replaced in place, nothing else moves.
        plan.uplinks[0].weight = 3;
        plan.uplinks[1].address = None;
        plan.uplinks[1].weight = 1;
        plan.uplinks[2].usable = false;
        let changes = routing.changes;
        routing.apply(&plan).await.expect("apply with new weights");
        let after_3 = expect(
            &[
                "1000: from all lookup main suppress_prefixlength 0 proto 77",
                "1001: from 198.18.11.1 lookup 101 proto 77",
                "1004: from 198.18.44.1 lookup 104 proto 77",
            ],
            &[
                "default via 198.18.11.254 dev up0 table 101 proto 77",
                "default via 198.18.22.254 dev up1 table 102 proto 77",
                "default dev up2 table 103 proto 77 scope link",
                "default proto 77 metric 50 nexthop via 198.18.11.254 dev up0 weight 3 \
                 nexthop via 198.18.22.254 dev up1 weight 1",
            ],
            1000,
        );
        assert_eq!(ours(n), after_3, "after new weights");
        assert_eq!(
            routing.changes - changes,
            2,
            "a rule removed, a route replaced"
        );

        // 4. Other priorities, a new gateway for up1, only up0 usable: a
        //    plain default in main.
        plan.rule_priority = 2000;
        plan.uplinks[1].gateway = Some(Ipv4Addr::new(198, 18, 22, 253));
        plan.uplinks[1].usable = false;
        routing
            .apply(&plan)
            .await
            .expect("apply with other priorities");
        let after_4 = expect(
            &[
                "2000: from all lookup main suppress_prefixlength 0 proto 77",
                "2001: from 198.18.11.1 lookup 101 proto 77",
                "2004: from 198.18.44.1 lookup 104 proto 77",
            ],
            &[
                "default via 198.18.11.254 dev up0 table 101 proto 77",
                "default via 198.18.22.253 dev up1 table 102 proto 77",
                "default dev up2 table 103 proto 77 scope link",
                "default via 198.18.11.254 dev up0 proto 77 metric 50",
            ],
            2000,
        );
        assert_eq!(ours(n), after_4, "after moving the rules");

        // 5. Nothing usable: main uses what has an address (up0, up1; up3
        //    is down).
        plan.uplinks[0].usable = false;
        plan.uplinks[1].address = addr(22);
        routing
            .apply(&plan)
            .await
            .expect("apply with nothing usable");
        let after_5 = expect(
            &[
                "2000: from all lookup main suppress_prefixlength 0 proto 77",
                "2001: from 198.18.11.1 lookup 101 proto 77",
                "2002: from 198.18.22.1 lookup 102 proto 77",
                "2004: from 198.18.44.1 lookup 104 proto 77",
            ],
            &[
                "default via 198.18.11.254 dev up0 table 101 proto 77",
                "default via 198.18.22.253 dev up1 table 102 proto 77",
                "default dev up2 table 103 proto 77 scope link",
                "default proto 77 metric 50 nexthop via 198.18.11.254 dev up0 weight 3 \
                 nexthop via 198.18.22.253 dev up1 weight 1",
            ],
            2000,
        );
        assert_eq!(ours(n), after_5, "with nothing usable");

        // 6. up1 goes down (the kernel drops its routes): skipped, not an
        //    error; back up, back in.
        ip(n, "link set up1 down");
        routing.apply(&plan).await.expect("apply with up1 down");
        let after_6 = expect(
            &[
                "2000: from all lookup main suppress_prefixlength 0 proto 77",
                "2001: from 198.18.11.1 lookup 101 proto 77",
                "2002: from 198.18.22.1 lookup 102 proto 77",
                "2004: from 198.18.44.1 lookup 104 proto 77",
            ],
            &[
                "default via 198.18.11.254 dev up0 table 101 proto 77",
                "default dev up2 table 103 proto 77 scope link",
                "default via 198.18.11.254 dev up0 proto 77 metric 50",
            ],
            2000,
        );
        assert_eq!(ours(n), after_6, "with up1 down");
        ip(n, "link set up1 up");
        routing.apply(&plan).await.expect("apply with up1 back");
        assert_eq!(ours(n), after_5, "with up1 back up");

        // 7. A table that has someone else's default route: a clear error,
        //    and the rest of the plan still goes in.
        plan.uplinks[0].table = 105;
        let err = routing
            .apply(&plan)
            .await
            .expect_err("a foreign default route in table 105");
        let msg = format!("{err:#}");
        assert!(
            msg.contains("table 105 already has a default route") && msg.contains("table_base"),
            "unclear error: {msg}"
        );
        let now = ours(n);
        assert!(
            now.iter()
                .any(|l| l == "2020: from all fwmark 0x4d480001 lookup 105 proto 77"),
            "the rest of the plan: {now:#?}"
        );
        assert!(
            !now.iter().any(|l| l.contains("table 101")),
            "table 101 left behind: {now:#?}"
        );
        assert_eq!(
            theirs(n),
            before,
            "others' rules and routes after the conflict"
        );

        // 8. All gone, and only ours.
        routing.remove_all().await.expect("remove_all");
        assert_eq!(ours(n), Vec::<String>::new(), "ours after remove_all");
        assert_eq!(
            theirs(n),
            before,
            "others' rules and routes after remove_all"
        );
        let changes = routing.changes;
        routing.remove_all().await.expect("second remove_all");
        assert_eq!(
            routing.changes, changes,
            "the second remove_all changed something"
        );
    }
}
