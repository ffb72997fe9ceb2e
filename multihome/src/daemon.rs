//! `multihome run`: one task owns the state, and reacts to a tick (link
//! and address changes, expiry), signals and reloads.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, bail};
use futures::StreamExt as _;
use log::{error, info, warn};
use multihome_common::{
    FLOW_FAILED_OVER, FlowFwd, FlowKey, LAYOUT_VERSION, MAX_LAN_NETS, SelectTable, Settings,
    UPLINK_CONFIGURED, Uplink6, rules_count, rules_word,
};
use rtnetlink::packet_route::{AddressFamily, address::AddressFlags};
use sd_notify::NotifyState;
use tokio::{
    signal::unix::{Signal, SignalKind, signal},
    sync::{mpsc, watch},
};

use crate::{
    challenge, choice,
    config::{self, Config},
    control, delegated, flows,
    health::{self, HealthReport, OnDown, OnUp, ProbeBinding, passive},
    lanhops,
    loader::{self, Datapath, Hook},
    maps::{self, Maps},
    mapwalk, ndproxy, netinfo,
    policy::{
        self, Policies, UplinkNow,
        compile::{self, Compiled},
        explain,
    },
    reaper::Reaper,
    routing::{self, Routing},
    routing6::Routing6,
    uplinks::{self, Observed, Probed, UplinkState},
    xdp,
};

type NetlinkEvent = (
    rtnetlink::packet_core::NetlinkMessage<rtnetlink::packet_route::RouteNetlinkMessage>,
    rtnetlink::sys::SocketAddr,
);

/// A full re-read of interface state even without events.
const TICK: Duration = Duration::from_secs(1);
/// The longest time between two `on_up = "return-idle"` passes.
const RETURN_EVERY: Duration = Duration::from_secs(5);

/// An uplink moving its idle failed-over flows back (`on_up =
/// "return-idle"`): whether a pass runs now, and whether none is left.
#[derive(Clone, Default)]
struct Returning {
    running: Arc<AtomicBool>,
    done: Arc<AtomicBool>,
    last: Option<tokio::time::Instant>,
}

/// An uplink on trial after live traffic took it down gets about
/// 1 / (1 + this) of new flows (with equal weights).
const CANARY_SHARE: u32 = 8;
/// How often passive health looks at the SYNs waiting for an answer.
const PASSIVE_TICK: Duration = Duration::from_millis(250);

pub struct RunOptions {
    pub config_path: PathBuf,
    pub pin_dir: PathBuf,
    /// Leave programs, maps and routes in place on exit, so that forwarding
    /// goes on and a later run adopts every flow.
    pub keep_on_exit: bool,
    pub metrics: Option<std::net::SocketAddr>,
}

struct Daemon {
    config: Config,
    opts: RunOptions,
    handle: rtnetlink::Handle,
    /// Link, address, neighbour and rule changes, as they happen.
    events: futures::channel::mpsc::UnboundedReceiver<NetlinkEvent>,
    /// A rule, link or address changed since `CLASSIFY` was last decided.
    classify_stale: bool,
    /// How new flows classify their route, as logged.
    classify_mode: String,
    /// What `CLASSIFY` and its maps were last written from.
    classified: Option<Result<routing::InMain, String>>,
    maps: Maps,
    routing: Routing,
    routing6: Routing6,
    /// The NDP proxy has entries on some uplink.
    ndp_proxied: bool,
    /// Per uplink: why the delegation it found cannot be used, as last
    /// logged.
    pd_problem: Vec<Option<String>>,
    /// Why learned LAN ULAs are not translated, as last logged: each is
    /// logged once, not at every look.
    lan6_problems: Vec<(log::Level, String)>,
    /// The LAN interfaces as the last refresh saw them.
    lan_ifaces: Vec<netinfo::Interface>,
    /// What `LAN_HOPS` and `LAN_HOPS6` hold.
    lan_hops: BTreeMap<std::net::IpAddr, multihome_common::NextHop>,
    observed: Vec<Observed>,
    attached: BTreeSet<(String, String)>,
    /// Per interface name: its index and where XDP goes, decided once
    /// per index.
    xdp: BTreeMap<String, (u32, xdp::Placement)>,
    /// The devices XDP may redirect to, and why each other is left out.
    xdp_redirect: BTreeMap<u32, Result<(), String>>,
    /// Expires idle flows on its own thread while the daemon serves.
    reaper: Option<Reaper>,
    /// Per uplink: the probes' verdict, and where they probe from.
    probed: Vec<Probed>,
    /// Passive health: what the LAN's own SYNs say of each uplink.
    passive: passive::Watch,
    /// Per uplink back from an outage under `on_up = "return-idle"`.
    returning: Vec<Option<Returning>>,
    probe_bindings: Vec<Option<watch::Sender<Option<ProbeBinding>>>>,
    /// Per uplink: its last address, kept while it has none.
    last_address: Vec<Option<std::net::Ipv4Addr>>,
    /// Per uplink: back from an outage, out of use until then.
    held_until: Vec<Option<tokio::time::Instant>>,
    /// Slots of adopted maps whose uplinks left the config: cleared and
    /// their flows purged once the new slots are published.
    gone_slots: Vec<u8>,
    reports: mpsc::Receiver<HealthReport>,
    /// Every uplink was unusable at the last refresh.
    all_down: bool,
    /// Per uplink: since when it is down (probes, carrier or interface;
    /// not drained), and whether `on_down` has acted on its flows.
    down: Vec<Down>,
    /// Per uplink: drained by `multihome uplink drain`.
    drained: Vec<uplinks::Drain>,
    commands: mpsc::Receiver<control::Command>,
    signals: Signals,
    datapath: Datapath,
    /// The config's policies and rules, resolved.
    policies: Policies,
    /// Each policy's choice table as last written to SELECT, by id.
    select: Vec<SelectTable>,
    /// The rule banks.
    rules: RuleBanks,
    /// [`Settings::flow_hash_seed`]: kept from adopted maps.
    flow_hash_seed: u32,
}

/// The two rule banks: the datapath reads the one `word` names
/// ([`Settings::rules`]); a change is written to the other, then `word`
/// switches.
#[derive(Default)]
struct RuleBanks {
    word: u32,
    /// What each bank holds, when known (written by this run).
    known: [Option<Compiled>; 2],
}

/// An uplink's outage as the daemon follows it.
#[derive(Clone, Copy, Debug, Default)]
struct Down {
    /// It is down.
    down: bool,
    /// Since when it is down while another uplink is usable: the time
    /// `confirm_ms` counts from (reset while no other uplink is usable).
    since: Option<tokio::time::Instant>,
    acted: bool,
}

/// SIGTERM, SIGINT and SIGHUP, caught from the start: one that arrives
/// while the daemon sets up waits for it, so nothing is left half-made.
struct Signals {
    term: Signal,
    int: Signal,
    hup: Signal,
}

impl Signals {
    fn catch() -> anyhow::Result<Self> {
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }
}

/// The control socket's file, removed however `run` ends.
struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

pub async fn run(opts: RunOptions) -> anyhow::Result<()> {
    let signals = Signals::catch().context("catching signals")?;
    let mut config = Config::load(&opts.config_path)?;
    let local_ports = config::check_port_ranges(config.nat.snat_ports)?;
    let (conn, handle, _) = rtnetlink::new_connection().context("opening rtnetlink")?;
    tokio::spawn(conn);
    let (watch, _, events) = rtnetlink::new_multicast_connection(&[
        rtnetlink::MulticastGroup::Link,
        rtnetlink::MulticastGroup::Ipv4Ifaddr,
        rtnetlink::MulticastGroup::Neigh,
        rtnetlink::MulticastGroup::Ipv4Rule,
        rtnetlink::MulticastGroup::Ipv4Route,
        rtnetlink::MulticastGroup::Ipv6Ifaddr,
        rtnetlink::MulticastGroup::Ipv6Route,
    ])
    .context("subscribing to link, address, neighbour, rule and IPv6 route events")?;
    tokio::spawn(watch);
    let snap = netinfo::snapshot(&handle).await?;
    check_interfaces(&config, &snap)?;
    // Prefix files and interfaces resolve before anything is installed.
    Policies::resolve(&config, &HashMap::new(), &snap)?;
    let (command_tx, commands) = mpsc::channel(8);
    let _socket = SocketFile(control::listen(&opts.pin_dir, command_tx)?);

    let (report_tx, reports) = mpsc::channel(64);
    let probe_bindings = config
        .uplinks
        .iter()
        .enumerate()
        .map(|(id, u)| {
            u.health
                .as_ref()
                .filter(|h| !h.targets.is_empty())
                .map(|h| {
                    let (tx, rx) = watch::channel(None);
                    health::spawn(id, h.clone(), rx, report_tx.clone());
                    tx
                })
        })
        .collect();
    drop(report_tx);
    let datapath = Datapath::load(&opts.pin_dir, &config.nat)?;
    let adopted = datapath.adopted;
    let opened = Maps::open(&opts.pin_dir).and_then(|maps| {
        let adoption = if adopted {
            adopt_uplinks(&mut config, &maps)?
        } else {
            (Vec::new(), vec![None; config.uplinks.len()])
        };
        // Policies keep their ids (flows record them) by name; fresh maps
        // name none.
        let select = maps.select_tables()?;
        let policies = Policies::resolve(&config, &policy::ids_of(&select), &snap)?;
        Ok((maps, adoption, policies, select))
    });
    let (maps, (gone_slots, last_address), policies, select) = match opened {
        Ok(o) => o,
        Err(e) => {
            if !adopted {
                // Nothing half-made for the next start to trip over.
                let _ = loader::remove_pins(&opts.pin_dir);
            }
            return Err(e);
        }
    };
    let same_layout = |s: &Settings| adopted && s.layout_version == LAYOUT_VERSION;
    let flow_hash_seed = match maps.settings() {
        Ok(s) if same_layout(&s) && s.flow_hash_seed != 0 => s.flow_hash_seed,
        _ => new_seed(),
    };
    // The adopted rules stay in force until this run's are switched in.
    let rules_word = match maps.settings() {
        Ok(s) if same_layout(&s) => s.rules,
        _ => 0,
    };
    let mut d = Daemon {
        routing: Routing::new(handle.clone()),
        routing6: Routing6::new(handle.clone()),
        ndp_proxied: false,
        pd_problem: vec![None; config.uplinks.len()],
        lan6_problems: Vec::new(),
        lan_ifaces: Vec::new(),
        lan_hops: BTreeMap::new(),
        handle,
        events,
        classify_stale: true,
        // Not decided yet: the first decision is logged.
        classify_mode: String::new(),
        classified: None,
        maps,
        observed: Vec::new(),
        attached: BTreeSet::new(),
        xdp: BTreeMap::new(),
        xdp_redirect: BTreeMap::new(),
        reaper: None,
        probed: vec![Probed::default(); config.uplinks.len()],
        passive: passive::Watch::new(config.uplinks.len()),
        returning: vec![None; config.uplinks.len()],
        probe_bindings,
        last_address,
        gone_slots,
        reports,
        all_down: false,
        down: vec![Down::default(); config.uplinks.len()],
        held_until: vec![None; config.uplinks.len()],
        drained: vec![uplinks::Drain::No; config.uplinks.len()],
        commands,
        signals,
        config,
        opts,
        datapath,
        policies,
        // What SELECT holds: adopted tables of policies that are gone
        // are cleared once the rules are in.
        select,
        rules: RuleBanks {
            word: rules_word,
            known: [None, None],
        },
        flow_hash_seed,
    };
    if adopted {
        info!(
            "adopted the datapath pinned in {}: live flows are kept",
            d.opts.pin_dir.display()
        );
    }
    d.start_and_serve(local_ports, snap, adopted).await
}

impl Daemon {
    async fn start_and_serve(
        &mut self,
        local_ports: (u16, u16),
        snap: netinfo::Snapshot,
        adopted: bool,
    ) -> anyhow::Result<()> {
        if let Err(e) = self.start(local_ports, snap).await {
            if !adopted {
                self.teardown().await;
            }
            return Err(e);
        }
        info!(
            "ready: {} uplinks, LAN {:?}, pin dir {}",
            self.config.uplinks.len(),
            self.config.lan,
            self.opts.pin_dir.display()
        );
        self.reaper = Some(Reaper::start(
            self.maps.clone(),
            self.config.timeouts.clone(),
        )?);
        notify(&[NotifyState::Ready]);
        let result = self.serve().await;
        notify(&[NotifyState::Stopping]);
        self.reaper = None;
        if self.opts.keep_on_exit {
            // Nobody follows the LAN's neighbours now: their packets take
            // the lookup until the next run fills the cache again.
            if let Err(e) = lanhops::write(&self.maps, &self.lan_hops, Default::default()) {
                warn!("{e:#}");
            }
            info!(
                "--keep-on-exit: leaving the datapath pinned in {} and forwarding",
                self.opts.pin_dir.display()
            );
        } else {
            self.teardown().await;
        }
        result
    }
}

/// Tells systemd (`Type=notify`, through `$NOTIFY_SOCKET`) how the daemon
/// stands; outside systemd it does nothing.
fn notify(state: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(false, state) {
        warn!("telling systemd: {e}");
    }
}

/// Places the config's uplinks in the slots the adopted maps hold them in,
/// by name. Returns the slots of uplinks that left, and each uplink's
/// address as the maps knew it (so that a renumbering while the daemon
/// was stopped purges like any other).
fn adopt_uplinks(
    config: &mut Config,
    maps: &Maps,
) -> anyhow::Result<(Vec<u8>, Vec<Option<std::net::Ipv4Addr>>)> {
    let pinned = maps.uplinks()?;
    let names: Vec<Option<String>> = pinned
        .iter()
        .map(|u| (u.flags & UPLINK_CONFIGURED != 0).then(|| uplinks::name_from_bytes(&u.name)))
        .collect();
    let gone = config.adopt_slots(&names);
    let mut last = Vec::new();
    for u in &config.uplinks {
        let at = usize::from(u.slot);
        let same = names[at].as_deref() == Some(u.name.as_str());
        last.push((same && pinned[at].addr_be != 0).then(|| flows::be_addr(pinned[at].addr_be)));
    }
    for (i, u) in config.uplinks.iter().enumerate() {
        if usize::from(u.slot) != i {
            info!(
                "uplink {}: keeps slot {} of the adopted maps",
                u.name, u.slot
            );
        }
    }
    for s in &gone {
        info!(
            "uplink {} left the config: its slot {s} is cleared and its flows purged",
            names[usize::from(*s)].as_deref().unwrap_or("?")
        );
    }
    Ok((gone, last))
}

/// A random, non-zero seed for the flow hash.
/// [`Daemon::write_classify`]'s decision, as the log says it.
fn classify_mode(in_main: &Result<routing::InMain, String>) -> String {
    match in_main {
        Err(why) => format!("through the policy rules: {why}"),
        Ok(routing::InMain {
            main: Ok(routes), ..
        }) => {
            format!("by the mirror of main ({} prefixes)", routes.len())
        }
        Ok(routing::InMain { main: Err(why), .. }) => format!("by a lookup in main: {why}"),
    }
}

fn new_seed() -> u32 {
    use std::hash::{BuildHasher as _, RandomState};
    (RandomState::new().hash_one(maps::clock_ns()) as u32).max(1)
}

fn check_interfaces(config: &Config, snap: &netinfo::Snapshot) -> anyhow::Result<()> {
    let mut missing = Vec::new();
    for l in &config.lan {
        if !snap.contains_key(l) {
            missing.push(format!("LAN interface {l:?} (`lan`)"));
        }
    }
    for u in &config.uplinks {
        if !snap.contains_key(&u.interface) {
            missing.push(format!(
                "interface {:?} of uplink {:?} (`interface`)",
                u.interface, u.name
            ));
        }
    }
    if !missing.is_empty() {
        bail!(
            "no such interface: {}. Check the names with `ip link`",
            missing.join(", ")
        );
    }
    for l in &config.lan {
        if snap[l].l3 {
            bail!(
                "LAN interface {l:?} has no Ethernet header (tun, wg, ppp): multihome \
                 translates LAN traffic only on Ethernet-like interfaces (Ethernet, veth, \
                 bridge, VLAN). Route such a network to a LAN bridge and list its prefix in \
                 `lan_prefixes` instead"
            );
        }
    }
    let nets = uplinks::lan_nets(config, snap).len();
    if nets > MAX_LAN_NETS as usize {
        bail!(
            "the LAN interfaces' addresses and `lan_prefixes` make {nets} LAN prefixes; at most \
             {MAX_LAN_NETS} fit. Remove addresses from the LAN interfaces or list fewer \
             `lan_prefixes`"
        );
    }
    for u in &config.uplinks {
        let have: Vec<String> = snap[&u.interface]
            .addrs
            .iter()
            .map(|(a, _)| a.to_string())
            .collect();
        match u.address {
            Some(a) if !have.contains(&a.to_string()) => bail!(
                "uplink {:?}: `address` {a} is not on {} (it has: {}). Fix `address`, or \
                 omit it to use the interface's own",
                u.name,
                u.interface,
                if have.is_empty() {
                    "none".into()
                } else {
                    have.join(", ")
                }
            ),
            None if have.is_empty() => warn!(
                "uplink {:?}: {} has no IPv4 address yet; it takes no flows until it gets one",
                u.name, u.interface
            ),
            _ => {}
        }
    }
    Ok(())
}

impl Daemon {
    async fn start(
        &mut self,
        local_ports: (u16, u16),
        snap: netinfo::Snapshot,
    ) -> anyhow::Result<()> {
        self.maps.set_settings(&Settings {
            layout_version: LAYOUT_VERSION,
            mark_base: self.config.routing.mark_base,
            snat_port_min: self.config.nat.snat_ports[0],
            snat_port_max: self.config.nat.snat_ports[1],
            local_port_min: local_ports.0,
            local_port_max: local_ports.1,
            // An adopted map keeps the capacity it was made with.
            max_flows: self.maps.flow_capacity()?,
            max_flows_per_host: self.config.nat.per_host(),
            flow_hash_seed: self.flow_hash_seed,
            rules: self.rules.word,
        })?;
        routing::enable_forwarding()?;
        // An earlier run's copy of the LAN's neighbours may be stale.
        self.maps.clear_lan_hops()?;
        self.purge_gone_slots()?;
        self.refresh(&snap).await?;
        // Every program of this run is attached now.
        if let Err(e) = self.datapath.finish_migration() {
            warn!("upgrade: {e:#} (flows made during the start are made again)");
        }
        self.apply_rules()?;
        if let Some(addr) = self.opts.metrics {
            crate::metrics::spawn(addr, self.opts.pin_dir.clone()).await?;
        }
        Ok(())
    }

    /// Brings the datapath, the attachments and the routing tables in line
    /// with the config and the interfaces as they are now.
    async fn refresh(&mut self, snap: &netinfo::Snapshot) -> anyhow::Result<()> {
        // Learned before anything is written from the prefixes.
        self.learn_prefixes6(snap).await;
        let observed: Vec<Observed> = self
            .config
            .uplinks
            .iter()
            .map(|u| uplinks::observe(u, snap))
            .collect();
        // An uplink that lost its address keeps its flows: the same
        // address may come back (a ppp redial). A new address purges them,
        // once the datapath knows it.
        let mut renumbered = Vec::new();
        for (id, o) in observed.iter().enumerate() {
            let name = &self.config.uplinks[id].name;
            let old = self.observed.get(id);
            if old.map(|p| p.state) != Some(o.state) {
                info!(
                    "uplink {name}: {} (address {})",
                    o.state.name(),
                    o.address.map_or("none".into(), |a| a.to_string())
                );
            }
            if let Some(new) = o.address {
                if let Some(last) = self.last_address[id]
                    && last != new
                {
                    renumbered.push((id, last));
                }
                self.last_address[id] = Some(new);
            }
        }
        self.attach_all(snap, &observed)?;

        self.hold_down(&observed);
        let usable: Vec<bool> = observed
            .iter()
            .zip(&self.probed)
            .zip(&self.drained)
            .map(|((o, p), drain)| {
                o.state == UplinkState::Up && p.in_service() && *drain == uplinks::Drain::No
            })
            .collect();
        for (id, o) in observed.iter().enumerate() {
            self.maps.set_uplink(
                self.config.uplinks[id].slot.into(),
                &uplinks::slot(&self.config, id, o, &self.probed[id], self.drained[id]),
            )?;
            self.bind_probes(id, o);
        }
        self.write_next_hops(snap, &observed).await;
        self.write_xdp_devs().await;
        // Every policy's table before any rule can send flows to it.
        let tables = self.policies.tables(&self.uplinks_now(&usable));
        // A policy's table is only written here; one no policy holds any
        // more is cleared once the rules no longer name it.
        self.select.resize(tables.len(), SelectTable::default());
        for (id, t) in tables.into_iter().enumerate() {
            if self.policies.policies[id].is_some() && self.select[id] != t {
                self.maps.set_select(id as u32, &t)?;
                self.select[id] = t;
            }
        }
        // A failure here must not keep the routing tables from following.
        let mut failed = Vec::new();
        // `@IFACE` rule entries follow the interfaces' addresses, before
        // a new subnet's hosts are translated (LAN_NETS, below).
        if self.policies.follow_interfaces(snap) {
            info!("an interface named by a rule changed its addresses: rules rewritten");
            if let Err(e) = self.apply_rules() {
                failed.push(e);
            }
        }
        if let Err(e) = self
            .maps
            .set_lan_nets(&uplinks::lan_nets(&self.config, snap))
        {
            failed.push(e);
        }
        if let Err(e) = self.maps.set_routed(&uplinks::routed_table(&self.config)) {
            failed.push(e);
        }
        if let Err(e) = self.maps.set_routed6(&uplinks::routed_table6(&self.config)) {
            failed.push(e);
        }
        if let Err(e) = self.maps.set_allow6(&self.config.allow_inbound6()) {
            failed.push(e);
        }
        let renumbered6 = match self.write_uplinks6() {
            Ok(r) => r,
            Err(e) => {
                failed.push(e);
                Vec::new()
            }
        };
        if let Err(e) = self.sync_ndp_proxy(snap, &observed, false).await {
            failed.push(e);
        }
        let all_down = !usable.iter().any(|u| *u);
        if all_down && !self.all_down {
            error!(
                "NO UPLINK IS USABLE: new flows go out any uplink that still has an address and a link, \
                 and the LAN may be offline until one comes back"
            );
        }
        self.all_down = all_down;
        let plan = uplinks::routing_plan(&self.config, &observed, &usable);
        let changes = self.routing.changes();
        if let Err(e) = self.routing.apply(&plan).await {
            failed.push(e);
        }
        let plan6 = uplinks::routing_plan6(&self.config, &observed);
        if let Err(e) = self
            .routing6
            .apply(
                &plan6,
                self.config.routing.rule_priority,
                plan.prohibit_mark,
            )
            .await
        {
            failed.push(e);
        }
        self.observed = observed;
        // How new flows classify their route reads main, where the plan
        // keeps the multipath default, and the uplinks' devices as just
        // observed: it follows now, not at the route event, which comes
        // after `ready` (until then new flows would find no route and
        // leave untranslated, to be dropped).
        if self.classify_stale || self.routing.changes() != changes {
            self.write_classify().await;
        }
        self.follow_outages(&usable);
        // Published: now the old address's flows can go.
        for (id, old) in renumbered {
            let (old_be, slot) = (u32::from(old).to_be(), self.config.uplinks[id].slot);
            self.purge(
                format!(
                    "uplink {}: address {old} gone; purged its",
                    self.config.uplinks[id].name
                ),
                move |_, f| f.uplink == slot && f.nat_addr_be == old_be,
            );
        }
        // Published: flows pinned to a changed IPv6 prefix go, so that
        // their next packet is pinned anew.
        for (slot, old) in renumbered6 {
            match self
                .maps
                .remove_flows6(|k, f| f.uplink == slot && old.covers(&k.lan, true))
            {
                Ok(n) => info!(
                    "uplink slot {slot}: the IPv6 mapping of {} changed; purged its {n} IPv6 \
                     flows from there",
                    crate::status::prefix_text(old.inner, old.prefix_len)
                ),
                Err(e) => failed.push(e),
            }
        }
        match failed
            .into_iter()
            .reduce(|a, b| a.context(format!("{b:#}")))
        {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Keeps the NDP proxy entries of the uplinks with `ndp_proxy` in line
    /// with the LAN hosts; with `stop`, removes them all.
    async fn sync_ndp_proxy(
        &mut self,
        snap: &netinfo::Snapshot,
        observed: &[Observed],
        stop: bool,
    ) -> anyhow::Result<()> {
        let mut proxying = Vec::new();
        let mut others = Vec::new();
        for (id, u) in self.config.uplinks.iter().enumerate() {
            let entries = uplinks::uplink6(&self.config, id);
            let ifindex = observed.get(id).map_or(0, |o| o.ifindex);
            // NAT66's address is the interface's own: nothing to proxy.
            let npt = entries
                .first()
                .is_some_and(|u6| u6.mode == multihome_common::MODE6_NPT);
            if !npt || ifindex == 0 {
                continue;
            }
            if u.ndp_proxy && !stop {
                routing::enable_proxy_ndp(&u.interface)?;
                proxying.push(ndproxy::ProxyUplink { ifindex, entries });
            } else {
                others.push((ifindex, entries));
            }
        }
        // Nothing proxies now or did: no dumps.
        if proxying.is_empty() && !self.ndp_proxied {
            return Ok(());
        }
        let lan = self.lan_ifindexes(snap);
        let hosts = match proxying.first() {
            Some(p) => ndproxy::lan_hosts(&self.handle, &lan, &p.entries).await?,
            None => Default::default(),
        };
        ndproxy::sync(&self.handle, &proxying, &others, &hosts).await?;
        self.ndp_proxied = !proxying.is_empty();
        Ok(())
    }

    /// Learns what the config leaves to the kernel: the LAN's internal
    /// IPv6 prefix (its interfaces' ULA) while `lan_prefixes6` is not set,
    /// then the `prefix6` of the uplinks that learn it from the delegations
    /// the kernel shows now. A failed read keeps what was learned.
    async fn learn_prefixes6(&mut self, snap: &netinfo::Snapshot) {
        let n = self.config.uplinks.len();
        let lan_default = self.config.lan_prefixes6.is_empty();
        let learners = |c: &Config| (0..n).any(|id| c.learns_prefix6(id));
        let nat66 = |c: &Config| (0..n).any(|id| c.learns_address6(id));
        if !lan_default && !learners(&self.config) && !nat66(&self.config) {
            return;
        }
        let addresses = match delegated::addresses(&self.handle).await {
            Ok(a) => a,
            Err(e) => {
                warn!("reading the IPv6 addresses: {e:#}");
                return;
            }
        };
        if lan_default {
            self.learn_lan6(snap, &addresses);
        }
        if nat66(&self.config) {
            self.learn_nat66_addresses(snap, &addresses);
        }
        if !learners(&self.config) {
            return;
        }
        let routes = match routing::dump_routes(&self.handle, AddressFamily::Inet6).await {
            Ok(r) => r,
            Err(e) => {
                warn!("reading the delegated prefixes: {e:#}");
                return;
            }
        };
        let uplink_ifs: Vec<u32> = self
            .config
            .uplinks
            .iter()
            .filter_map(|u| snap.get(&u.interface).map(|i| i.index))
            .collect();
        let found = delegated::delegations(&routes, &addresses, &uplink_ifs);
        let chosen = delegated::assign(&self.config, &found);
        for (id, delegation) in chosen.into_iter().enumerate() {
            if !self.config.learns_prefix6(id) {
                continue;
            }
            let (learned, problem) =
                match delegation.map(|d| delegated::learned(&self.config, id, d)) {
                    Some(Ok(l)) => (Some(l), None),
                    Some(Err(why)) => (None, Some(why)),
                    None => (None, None),
                };
            let u = &mut self.config.uplinks[id];
            if problem != self.pd_problem[id] {
                if let (Some(why), Some(d)) = (&problem, delegation) {
                    error!("uplink {}: delegated prefix {d} not used: {why}", u.name);
                }
                self.pd_problem[id] = problem;
            }
            if learned != u.learned6 {
                match &learned {
                    Some(l) => info!(
                        "uplink {}: learned prefix6 {} from the delegated {}",
                        u.name, l.npt, l.delegated
                    ),
                    None => info!(
                        "uplink {}: no delegated prefix; it takes no IPv6 flows",
                        u.name
                    ),
                }
                u.learned6 = learned;
            }
        }
    }

    /// The address of each NAT66 uplink without `prefix6`: a global one
    /// on its interface (the one it has while it lasts, else the lowest).
    fn learn_nat66_addresses(
        &mut self,
        snap: &netinfo::Snapshot,
        addresses: &[(u32, config::Prefix6, AddressFlags)],
    ) {
        for id in 0..self.config.uplinks.len() {
            if !self.config.learns_address6(id) {
                continue;
            }
            let u = &mut self.config.uplinks[id];
            let index = snap.get(&u.interface).map(|i| i.index);
            let found = delegated::uplink_addresses(addresses, index);
            let current = u.learned6.map(|l| l.npt);
            let pick = current
                .filter(|a| found.contains(a))
                .or(found.first().copied());
            if pick != current {
                match pick {
                    Some(a) => info!("uplink {}: NAT66 onto its address {}", u.name, a.addr),
                    None => info!(
                        "uplink {}: no global IPv6 address; it takes no IPv6 flows",
                        u.name
                    ),
                }
                u.learned6 = pick.map(|a| config::Learned6 {
                    delegated: a,
                    npt: a,
                });
            }
        }
    }

    /// The LAN's internal IPv6 prefixes from its interfaces' ULA
    /// addresses: for each interface, the one it has while it lasts, else
    /// its lowest, mapped onto the subnet of the interface's place in
    /// `lan`. One of another length than the first's, one an earlier
    /// interface has, or one a configured `prefix6` has no subnet for, is
    /// left out and logged: the others keep their mappings.
    fn learn_lan6(
        &mut self,
        snap: &netinfo::Snapshot,
        addresses: &[(u32, config::Prefix6, AddressFlags)],
    ) {
        let old = self.config.lan6_learned.clone();
        let mut picked: Vec<(u64, config::Prefix6)> = Vec::new();
        let mut problems = Vec::new();
        for (place, name) in self.config.lan.iter().enumerate() {
            let Some(index) = snap.get(name).map(|i| i.index) else {
                continue;
            };
            let found = delegated::lan_ula(addresses, &[index]);
            let current = old
                .iter()
                .find(|(s, _)| *s == place as u64)
                .map(|(_, p)| *p);
            let Some(p) = current
                .filter(|p| found.contains(p))
                .or(found.first().copied())
            else {
                continue;
            };
            if found.len() > 1 {
                problems.push((
                    log::Level::Warn,
                    format!(
                        "LAN interface {name} has {} ULA prefixes; only {p} is translated (set \
                         `lan_prefixes6` to choose)",
                        found.len()
                    ),
                ));
            }
            let clash = picked
                .iter()
                .find(|(_, q)| q.len != p.len || q.overlaps(&p));
            let why = match clash {
                Some((_, q)) if q.len != p.len => {
                    Some(format!("it is not as long as {q}, another interface's"))
                }
                Some((_, q)) => Some(format!("it overlaps {q}, another interface's")),
                None if picked.len() >= multihome_common::MAX_LAN6 as usize => Some(format!(
                    "at most {} internal prefixes are mapped",
                    multihome_common::MAX_LAN6
                )),
                None => self.unfit6(p, place as u64),
            };
            match why {
                Some(why) => problems.push((
                    log::Level::Error,
                    format!("LAN interface {name}'s ULA {p} is not translated: {why}"),
                )),
                None => picked.push((place as u64, p)),
            }
        }
        for (level, p) in problems.iter().filter(|p| !self.lan6_problems.contains(p)) {
            log::log!(*level, "{p}");
        }
        self.lan6_problems = problems;
        if picked == old {
            return;
        }
        if picked.is_empty() {
            info!("the LAN interfaces have no ULA prefix: no IPv6 is translated");
        } else {
            let list: Vec<String> = picked.iter().map(|(_, p)| p.to_string()).collect();
            info!(
                "the LAN's internal IPv6 prefixes: {}, its interfaces' ULA",
                list.join(", ")
            );
        }
        self.config.lan6_learned = picked;
    }

    /// Why a configured NPTv6 `prefix6` cannot hold internal prefix `p`
    /// on subnet `subnet`, if one cannot.
    fn unfit6(&self, p: config::Prefix6, subnet: u64) -> Option<String> {
        self.config
            .uplinks
            .iter()
            .enumerate()
            .filter(|(_, u)| u.mode6 == config::Mode6::Npt && u.prefix6.is_some())
            .find_map(|(id, u)| {
                let e = self.config.npt_subnet(id, p.len, subnet).err()?;
                Some(format!("uplink {}'s `prefix6`: {e}", u.name))
            })
    }

    /// The LAN interfaces' indexes, of those that exist now.
    fn lan_ifindexes(&self, snap: &netinfo::Snapshot) -> Vec<u32> {
        self.config
            .lan
            .iter()
            .filter_map(|l| snap.get(l).map(|i| i.index))
            .collect()
    }

    /// Writes each uplink's IPv6 translations (and turns on IPv6
    /// forwarding when one has any); returns the mappings that changed or
    /// went, (slot, old entry), whose flows must go once this is
    /// published. A mapping that stays keeps its flows, whatever else
    /// changed (another internal prefix added, say).
    fn write_uplinks6(&self) -> anyhow::Result<Vec<(u8, Uplink6)>> {
        let have = self.maps.uplinks6()?;
        let mut changed = Vec::new();
        let mut any = false;
        // Learned or configured, in whatever place and span, the same
        // mapping keeps its flows.
        let mapping = |u: &Uplink6| (u.inner, u.outer, u.prefix_len, u.mode, u.adjust);
        let wanted: Vec<(u32, Vec<Uplink6>)> = (0..self.config.uplinks.len())
            .map(|id| {
                let slot = self.config.uplinks[id].slot;
                (slot.into(), uplinks::uplink6(&self.config, id))
            })
            .collect();
        // Where the entries past the first are, before they are in use.
        self.maps.set_mapped6(&wanted)?;
        for (slot, want) in wanted {
            let slot = slot as u8;
            any |= !want.is_empty();
            let old = have.get(usize::from(slot)).cloned().unwrap_or_default();
            if old != want {
                self.maps.set_uplink6(slot.into(), &want)?;
                changed.extend(
                    old.iter()
                        .filter(|o| !want.iter().any(|w| mapping(w) == mapping(o)))
                        .map(|o| (slot, *o)),
                );
            }
        }
        if any {
            routing::enable_forwarding6(
                self.config
                    .uplinks
                    .iter()
                    .enumerate()
                    .filter(|(id, _)| self.config.outer6(*id).is_some())
                    .map(|(_, u)| u.interface.as_str()),
            )?;
        }
        Ok(changed)
    }

    /// Clears the adopted slots of uplinks that left the config, then
    /// purges their flows, before the first refresh writes the slots anew
    /// (a new uplink may take one).
    fn purge_gone_slots(&mut self) -> anyhow::Result<()> {
        let gone = std::mem::take(&mut self.gone_slots);
        for s in &gone {
            self.maps.set_uplink((*s).into(), &Default::default())?;
            self.maps.set_uplink6((*s).into(), &[])?;
            // A new uplink that takes the slot starts its counters at 0.
            self.maps.clear_uplink_stats((*s).into())?;
        }
        if !gone.is_empty() {
            let n = flows::remove_where(&self.maps, |_, f| gone.contains(&f.uplink))?
                + self.maps.remove_flows6(|_, f| gone.contains(&f.uplink))?;
            info!("purged {n} flows of uplinks that left the config");
        }
        Ok(())
    }

    /// Points uplink `id`'s probes at its current address and device, or
    /// pauses them while it has none.
    fn bind_probes(&self, id: usize, o: &Observed) {
        let Some(tx) = &self.probe_bindings[id] else {
            return;
        };
        let binding = match (o.state, o.address) {
            (UplinkState::Up, Some(source)) => Some(ProbeBinding {
                ifname: self.config.uplinks[id].interface.clone(),
                source,
                mark: uplinks::mark(&self.config, id),
            }),
            _ => None,
        };
        tx.send_if_modified(|b| {
            let changed = *b != binding;
            *b = binding;
            changed
        });
    }

    /// Passive health: one look at the remotes LAN SYNs wait on and at the
    /// SYN-ACKs counted. A change of verdict is published like a probe's:
    /// new flows move at once, pinned ones follow `on_down` / `on_up`.
    async fn watch_traffic(&mut self) {
        let now = maps::clock_ns();
        let read = self.maps.syn_wait().and_then(|m| {
            let waiting = mapwalk::collect(&m)?;
            Ok((m, waiting, self.maps.uplink_stats()?))
        });
        let (mut map, waiting, stats) = match read {
            Ok(r) => r,
            Err(e) => {
                error!("passive health: reading SYN_WAIT: {e:#}");
                return;
            }
        };
        let counts: Vec<passive::SynCounts> = stats
            .iter()
            .map(|s| passive::SynCounts {
                syns: s.syns,
                synacks: s.synacks,
                rtt_ns: s.synack_rtt_ns,
                tx_packets: s.tx_packets,
                rx_packets: s.rx_packets,
                retransmits: s.retransmits,
            })
            .collect();
        let slots: Vec<u8> = self.config.uplinks.iter().map(|u| u.slot).collect();
        let configs: Vec<passive::PassiveConfig> = self
            .config
            .uplinks
            .iter()
            .map(|u| passive::PassiveConfig::of(u.health.as_ref()))
            .collect();
        let (changes, stale) = self.passive.tick(now, &waiting, &counts, &slots, &configs);
        for k in stale {
            let _ = map.remove(&k);
        }
        if changes.is_empty() {
            return;
        }
        for c in changes {
            let name = &self.config.uplinks[c.uplink].name;
            match c.verdict {
                passive::Verdict::Down { destinations, .. } => warn!(
                    "uplink {name}: DOWN by live traffic: SYNs or data sent again to \
                     {destinations} remotes went unanswered, and nothing was answered since"
                ),
                passive::Verdict::Canary { .. } => {
                    info!("uplink {name}: on trial: a share of new flows tries it (passive health)")
                }
                passive::Verdict::Healthy => {
                    info!("uplink {name}: live traffic is answered again, back in full service")
                }
                passive::Verdict::Degraded { .. } => warn!(
                    "uplink {name}: degraded: its SYNs are answered slowly or seldom \
                     or its data is sent again too often (degraded_syn_rtt_ms / \
                     degraded_answered_pct / degraded_retransmit_pct); no new flows while \
                     another uplink is healthy"
                ),
            }
            self.probed[c.uplink].traffic = c.verdict;
        }
        if !self.resync().await {
            for id in 0..self.config.uplinks.len() {
                self.publish_slot(id);
            }
        }
    }

    /// A probe round's outcome: on a change of state, new flows move at
    /// once, and pinned flows follow `on_down` / `on_up` as for any outage.
    async fn on_report(&mut self, r: HealthReport) {
        let id = r.uplink;
        let name = self.config.uplinks[id].name.clone();
        if self.config.uplinks[id].health.is_none() {
            return;
        }
        self.probed[id].rtt_ms = r.rtt_ms;
        self.probed[id].loss_pct = r.loss_pct;
        if !r.changed {
            self.publish_slot(id);
            return;
        }
        self.probed[id].failing = !r.healthy;
        if r.healthy {
            info!(
                "uplink {name}: probes answer again, back in service: {}",
                r.reason
            );
        } else {
            warn!("uplink {name}: DOWN, probes fail: {}", r.reason);
        }
        // Publish first; the outage is then followed like any other.
        if !self.resync().await {
            self.publish_slot(id);
        }
    }

    /// Follows each uplink's outages, whatever took it down (probes,
    /// carrier, a vanished interface; not a drain): `on_down` acts on its
    /// flows once it has stayed down for `confirm_ms` and another uplink
    /// is usable, so a short flap or an outage of every uplink moves
    /// nothing. `on_up` acts on recovery, if `on_down` had.
    fn follow_outages(&mut self, usable: &[bool]) {
        let now = tokio::time::Instant::now();
        for id in 0..self.down.len() {
            let failed = !usable[id] && self.drained[id] == uplinks::Drain::No;
            let target = usable.iter().enumerate().any(|(o, u)| o != id && *u);
            let name = &self.config.uplinks[id].name;
            let d = &mut self.down[id];
            match (failed, d.down) {
                (true, false) => {
                    d.down = true;
                    info!("uplink {name}: down; its flows wait to see if it stays down");
                }
                (false, true) => {
                    let acted = d.acted;
                    *d = Down::default();
                    if acted {
                        self.probed[id].evacuate = uplinks::Evacuate::None;
                        self.publish_slot(id);
                        self.on_recovery(id);
                    } else {
                        info!("uplink {name}: back before its flows were moved");
                    }
                    continue;
                }
                _ => {}
            }
            if d.down && !d.acted {
                // The confirmation counts while the flows have somewhere
                // to go.
                d.since = match (target, d.since) {
                    (true, None) => Some(now),
                    (true, since) => since,
                    (false, _) => None,
                };
            }
        }
        self.act_on_outages();
    }

    /// Keeps an uplink that just came back from an outage out of use for
    /// its `hold_down_ms`.
    fn hold_down(&mut self, observed: &[Observed]) {
        let now = tokio::time::Instant::now();
        for (id, o) in observed.iter().enumerate() {
            let ok = o.state == UplinkState::Up && !self.probed[id].failing;
            let hold = self.down_policy(id).hold_down;
            if ok
                && self.down[id].down
                && self.drained[id] == uplinks::Drain::No
                && self.held_until[id].is_none()
            {
                if !hold.is_zero() {
                    info!(
                        "uplink {}: back, held down for {hold:?}",
                        self.config.uplinks[id].name
                    );
                    self.held_until[id] = Some(now + hold);
                }
            } else if !ok {
                self.held_until[id] = None;
            }
            self.probed[id].held = self.held_until[id].is_some_and(|t| now < t);
            if !self.probed[id].held {
                self.held_until[id] = None;
            }
        }
    }

    /// When the next confirmed outage or hold-down is due.
    fn next_outage_check(&self) -> Option<tokio::time::Instant> {
        let outages = self
            .down
            .iter()
            .enumerate()
            .filter(|(_, d)| !d.acted)
            .filter_map(|(id, d)| Some(d.since? + self.down_policy(id).confirm));
        outages
            .chain(self.held_until.iter().flatten().copied())
            .min()
    }

    fn down_policy(&self, id: usize) -> health::DownPolicy {
        health::DownPolicy::of(self.config.uplinks[id].health.as_ref())
    }

    /// Runs `on_down` for outages that lasted `confirm_ms` while another
    /// uplink was usable.
    fn act_on_outages(&mut self) {
        let now = tokio::time::Instant::now();
        for id in 0..self.down.len() {
            let policy = self.down_policy(id);
            let d = self.down[id];
            if d.acted || d.since.is_none_or(|t| now < t + policy.confirm) {
                continue;
            }
            self.down[id].acted = true;
            self.probed[id].evacuate = match policy.on_down {
                OnDown::Reset => uplinks::Evacuate::ResetTcp,
                OnDown::Purge => uplinks::Evacuate::All,
                OnDown::PurgeUdp => uplinks::Evacuate::NotTcp,
                OnDown::Keep => uplinks::Evacuate::Keep,
            };
            // The datapath moves each flow on its next packet.
            self.publish_slot(id);
            let name = &self.config.uplinks[id].name;
            info!(
                "uplink {name}: down for {:?}; its flows move on their next packet ({:?})",
                policy.confirm, policy.on_down
            );
            // Sessions that only receive send no next packet: provoke one.
            let fates = self.policies.outage_fates((policy.on_down, policy.on_up));
            let slot = self.config.uplinks[id].slot;
            self.challenge(format!("uplink {name}"), move |_, f| {
                let (on_down, _) = fates.get(f.policy as usize).copied().unwrap_or(fates[0]);
                f.uplink == slot && on_down == OnDown::Reset
            });
        }
    }

    /// Sends challenge SYNs ([`challenge::provoke`]) to the LAN hosts of
    /// the TCP flows `doomed` picks, on a thread of its own, once their
    /// uplink is published as down.
    fn challenge(
        &self,
        what: String,
        doomed: impl FnMut(&FlowKey, &FlowFwd) -> bool + Send + 'static,
    ) {
        let maps = self.maps.clone();
        tokio::task::spawn_blocking(move || match challenge::provoke(&maps, doomed) {
            Ok(0) => {}
            Ok(n) => {
                info!("{what}: sent {n} challenge SYNs, so that idle TCP sessions learn at once")
            }
            Err(e) => error!("{what}: challenge SYNs: {e:#}"),
        });
    }

    /// `on_up = "return"`: the flows that failed over from this uplink, as
    /// `on_down` would have moved them, pick again.
    fn on_recovery(&mut self, id: usize) {
        let policy = self.down_policy(id);
        let name = &self.config.uplinks[id].name;
        info!("uplink {name}: back in service");
        // Each flow by its policy's `on_up` and `on_down`, else the uplink's.
        let fates = self.policies.outage_fates((policy.on_down, policy.on_up));
        if fates.iter().any(|(_, up)| *up == OnUp::ReturnIdle) {
            // Moved back as they fall idle, by `return_idle_pass`.
            self.returning[id] = Some(Returning::default());
        }
        if fates.iter().all(|(_, up)| *up != OnUp::Return) {
            return;
        }
        let slot = self.config.uplinks[id].slot;
        let (select, seed) = (self.select.clone(), self.flow_hash_seed);
        self.purge(
            format!("uplink {name}: moved back failed-over"),
            move |k, f| {
                // A policy a reload removed: its flows fall under `balanced`.
                let table = select
                    .get(f.policy as usize)
                    .filter(|t| t.configured != 0)
                    .unwrap_or(&select[0]);
                let (on_down, on_up) = fates.get(f.policy as usize).copied().unwrap_or(fates[0]);
                f.flags & FLOW_FAILED_OVER != 0
                    && on_up == OnUp::Return
                    && on_down.purges(k.proto)
                    && choice::preferred(table, k, seed) == Some(slot)
            },
        );
    }

    /// `on_up = "return-idle"`: every `RETURN_EVERY`, for each uplink back
    /// from an outage, moves back the flows that failed over from it and
    /// have been idle for its `return_idle_s`, on a thread of its own,
    /// until none is left (or it goes down again).
    fn return_idle_pass(&mut self) {
        for id in 0..self.returning.len() {
            let Some(r) = &self.returning[id] else {
                continue;
            };
            if r.done.load(Ordering::Relaxed) || self.down[id].down {
                self.returning[id] = None;
                continue;
            }
            let policy = self.down_policy(id);
            // A walk of the flow table at most every few seconds, and a few
            // times per `return_idle_s`.
            let every = (policy.return_idle / 2).clamp(Duration::from_secs(1), RETURN_EVERY);
            let now = tokio::time::Instant::now();
            if r.last.is_some_and(|t| now < t + every) || r.running.swap(true, Ordering::Relaxed) {
                continue;
            }
            let (done, running) = (r.done.clone(), r.running.clone());
            if let Some(r) = &mut self.returning[id] {
                r.last = Some(now);
            }
            let fates = self.policies.outage_fates((policy.on_down, policy.on_up));
            let sticky: Vec<bool> = (0..fates.len())
                .map(|p| self.policies.is_sticky(p))
                .collect();
            let (select, seed) = (self.select.clone(), self.flow_hash_seed);
            let (slot, name) = (
                self.config.uplinks[id].slot,
                self.config.uplinks[id].name.clone(),
            );
            let idle_ns = policy.return_idle.as_nanos() as u64;
            let maps = self.maps.clone();
            tokio::task::spawn_blocking(move || {
                let candidate = |k: &FlowKey, f: &FlowFwd| {
                    let p = f.policy as usize;
                    let table = select
                        .get(p)
                        .filter(|t| t.configured != 0)
                        .unwrap_or(&select[0]);
                    let (on_down, on_up) = fates.get(p).copied().unwrap_or(fates[0]);
                    (f.flags & FLOW_FAILED_OVER != 0
                        && on_up == OnUp::ReturnIdle
                        && on_down.purges(k.proto)
                        && choice::preferred(table, k, seed) == Some(slot))
                    .then(|| sticky.get(p).copied().unwrap_or(false))
                };
                match flows::return_idle(&maps, maps::clock_ns(), idle_ns, candidate) {
                    Ok((moved, left)) => {
                        if moved > 0 {
                            info!("uplink {name}: moved back {moved} idle failed-over flows");
                        }
                        if left == 0 {
                            done.store(true, Ordering::Relaxed);
                        }
                    }
                    Err(e) => error!("uplink {name}: moving back idle flows: {e:#}"),
                }
                running.store(false, Ordering::Relaxed);
            });
        }
    }

    /// Removes the flows `doomed` picks on a thread of its own: a walk of
    /// the flow table must not hold up the event loop. Logs `what` and the
    /// count.
    fn purge(&self, what: String, doomed: impl FnMut(&FlowKey, &FlowFwd) -> bool + Send + 'static) {
        let maps = self.maps.clone();
        tokio::task::spawn_blocking(move || match flows::remove_where(&maps, doomed) {
            Ok(n) => info!("{what} {n} flows"),
            Err(e) => error!("{what} flows: {e:#}"),
        });
    }

    /// Attaches to interfaces that exist and are not attached yet (they may
    /// appear later, e.g. ppp0 after a reconnect).
    fn attach_all(
        &mut self,
        snap: &netinfo::Snapshot,
        observed: &[Observed],
    ) -> anyhow::Result<()> {
        let mut wanted: Vec<(String, Hook)> = Vec::new();
        for l in &self.config.lan {
            wanted.push((l.clone(), Hook::LanIngress));
        }
        for (u, o) in self.config.uplinks.iter().zip(observed) {
            wanted.push((u.interface.clone(), Hook::WanIngress { l3: o.l3 }));
            wanted.push((u.interface.clone(), Hook::WanEgress { l3: o.l3 }));
        }
        for (ifname, hook) in wanted {
            let Some(iface) = snap.get(&ifname) else {
                continue;
            };
            let tag = (format!("{ifname}#{}", iface.index), format!("{hook:?}"));
            if self.attached.contains(&tag) {
                continue;
            }
            self.datapath.attach(&ifname, hook)?;
            info!("attached {hook:?} to {ifname}");
            if matches!(hook, Hook::WanIngress { .. }) {
                // A new interface (ppp0 after a redial) starts with the
                // distribution's default, often strict: replies that come
                // in on the uplink the kernel would not route to fail it.
                if let Err(e) = routing::set_rp_filter(&ifname, 2) {
                    warn!("loose rp_filter on {ifname}: {e:#}");
                }
            }
            self.attached.insert(tag);
        }
        self.place_xdp(snap, observed)
    }

    /// Attaches the XDP programs where `xdp` puts them, and detaches what
    /// an earlier run left where it no longer does. Decided once per
    /// interface, and again if it comes back with a new index; one that is
    /// gone is forgotten, so that no redirect is let to its old index.
    fn place_xdp(&mut self, snap: &netinfo::Snapshot, observed: &[Observed]) -> anyhow::Result<()> {
        xdp::forget_gone(&mut self.xdp, snap);
        let lan = self.config.lan.iter().map(|l| (l, false, false));
        let wan =
            (self.config.uplinks.iter().zip(observed)).map(|(u, o)| (&u.interface, true, o.l3));
        let wanted: Vec<(String, bool, bool)> = lan
            .chain(wan)
            .map(|(n, w, l3)| (n.clone(), w, l3))
            .collect();
        for (ifname, wan, l3) in wanted {
            let Some(iface) = snap.get(&ifname) else {
                continue;
            };
            if self.xdp.contains_key(&ifname) {
                continue;
            }
            let placement = xdp::place(self.config.xdp, l3, xdp::driver(&ifname).as_deref());
            match &placement {
                xdp::Placement::Attach => {
                    self.datapath.attach_xdp(&ifname, wan)?;
                    info!("XDP native on {ifname}");
                }
                xdp::Placement::Skip(why) => {
                    if self.datapath.detach_xdp(&ifname) {
                        info!("XDP detached from {ifname}: {why}");
                    } else {
                        info!("no XDP on {ifname}: {why}");
                    }
                }
            }
            self.xdp.insert(ifname, (iface.index, placement));
        }
        Ok(())
    }

    /// Lets XDP redirect to each device it runs on whose qdiscs shape
    /// nothing (`XDP_DEVS`), and to no other.
    async fn write_xdp_devs(&mut self) {
        let running: BTreeSet<u32> = self
            .xdp
            .values()
            .filter(|(_, p)| *p == xdp::Placement::Attach)
            .map(|(i, _)| *i)
            .collect();
        let qdiscs = if running.is_empty() {
            Default::default()
        } else {
            match xdp::qdiscs(&self.handle).await {
                Ok(q) => q,
                Err(e) => {
                    warn!("{e:#}: XDP redirects stay as they were");
                    return;
                }
            }
        };
        let mut now = BTreeMap::new();
        for i in &running {
            let verdict = xdp::redirect_allowed(qdiscs.get(i).map_or(&[][..], |k| k));
            if self.xdp_redirect.get(i) != Some(&verdict) {
                match &verdict {
                    Ok(()) => info!("XDP redirects to ifindex {i}"),
                    Err(why) => info!("no XDP redirect to ifindex {i}: {why}"),
                }
            }
            now.insert(*i, verdict);
        }
        let listed = self.maps.xdp_devs().unwrap_or_default();
        for i in listed
            .iter()
            .filter(|i| !matches!(now.get(i), Some(Ok(()))))
        {
            if let Err(e) = self.maps.set_xdp_dev(*i, false) {
                error!("stopping XDP redirects to ifindex {i}: {e:#}");
            }
        }
        for (i, v) in &now {
            if v.is_ok()
                && !listed.contains(i)
                && let Err(e) = self.maps.set_xdp_dev(*i, true)
            {
                error!("letting XDP redirect to ifindex {i}: {e:#}");
            }
        }
        self.xdp_redirect = now;
    }

    async fn serve(&mut self) -> anyhow::Result<()> {
        let mut tick = tokio::time::interval(TICK);
        let mut traffic = tokio::time::interval(PASSIVE_TICK);
        loop {
            let outage_check = self.next_outage_check();
            tokio::select! {
                _ = tokio::time::sleep_until(outage_check.unwrap_or_else(|| {
                    tokio::time::Instant::now() + Duration::from_secs(3600)
                })), if outage_check.is_some() => {
                    self.resync().await;
                }
                _ = self.signals.term.recv() => { info!("SIGTERM: stopping"); return Ok(()); }
                _ = self.signals.int.recv() => { info!("SIGINT: stopping"); return Ok(()); }
                _ = self.signals.hup.recv() => {
                    if let Err(e) = self.reload().await {
                        error!("reload failed, keeping the running config: {e:#}");
                    }
                }
                Some(report) = self.reports.recv() => self.on_report(report).await,
                Some(cmd) = self.commands.recv() => {
                    let answer = self.on_command(cmd.request).await;
                    let _ = cmd.reply.send(answer);
                }
                Some(event) = self.events.next() => {
                    // Coalesce a burst of events into one refresh.
                    let mut concerns = self.concerns_uplinks(&event);
                    while let Ok(event) = self.events.try_recv() {
                        concerns |= self.concerns_uplinks(&event);
                    }
                    if concerns {
                        self.resync().await;
                    }
                }
                _ = tick.tick() => {
                    self.resync().await;
                    self.return_idle_pass();
                }
                _ = traffic.tick() => self.watch_traffic().await,
            }
        }
    }

    /// A live command from `multihome uplink ...`.
    async fn on_command(&mut self, request: control::Request) -> Result<String, String> {
        use control::Request::*;
        let name = match &request {
            SetWeight { uplink, .. } | Drain { uplink, .. } | Undrain { uplink } => uplink.clone(),
            Reload => {
                return match self.reload().await {
                    Ok(()) => Ok(format!(
                        "config reloaded: {} policies, {} rules",
                        self.config.policies.len(),
                        self.policies.rules.len()
                    )),
                    Err(e) => {
                        error!("reload failed, keeping the running config: {e:#}");
                        Err(format!("reload refused, the running config stays: {e:#}"))
                    }
                };
            }
            Explain(q) => {
                return self
                    .explain(q)
                    .and_then(|e| Ok(serde_json::to_string(&e)?))
                    .map_err(|e| format!("{e:#}"));
            }
        };
        let Some(id) = self.config.uplinks.iter().position(|u| u.name == name) else {
            let names: Vec<_> = self
                .config
                .uplinks
                .iter()
                .map(|u| u.name.as_str())
                .collect();
            return Err(format!(
                "no uplink named {name:?} (there are: {})",
                names.join(", ")
            ));
        };
        let answer = match request {
            Reload | Explain(_) => unreachable!("answered above"),
            SetWeight { weight, .. } if weight > 255 => {
                return Err(format!("weight {weight}: must be 0 to 255"));
            }
            SetWeight { weight, .. } => {
                self.config.uplinks[id].weight = weight;
                format!("uplink {name}: weight {weight} until the next reload or restart")
            }
            Drain { reset: false, .. } => {
                self.drained[id] = uplinks::Drain::Keep;
                format!("uplink {name}: drained: no new flows, its pinned flows stay")
            }
            Drain { reset: true, .. } => {
                self.drained[id] = uplinks::Drain::Reset;
                format!(
                    "uplink {name}: drained with --reset: no new flows; its TCP sessions are \
                     reset and its other flows move at their next packet"
                )
            }
            Undrain { .. } => {
                self.drained[id] = uplinks::Drain::No;
                format!("uplink {name}: takes new flows again")
            }
        };
        info!("{answer}");
        self.resync().await;
        if self.drained[id] == uplinks::Drain::Reset {
            // Published by the resync: now the idle sessions can learn.
            let slot = self.config.uplinks[id].slot;
            self.challenge(format!("uplink {name}"), move |_, f| f.uplink == slot);
        }
        Ok(answer)
    }

    /// Refreshes from the interfaces as they are now; false if that
    /// failed (it says why in the log).
    async fn resync(&mut self) -> bool {
        let result = match netinfo::snapshot(&self.handle).await {
            Ok(snap) => self.refresh(&snap).await,
            Err(e) => Err(e),
        };
        result.inspect_err(|e| error!("{e:#}")).is_ok()
    }

    /// Writes each uplink's cached next hop from the kernel's neighbour
    /// table. Without it (a failed read), none is cached: every packet
    /// takes the lookup, as before the cache.
    async fn write_next_hops(&mut self, snap: &netinfo::Snapshot, observed: &[Observed]) {
        self.lan_ifaces = self
            .config
            .lan
            .iter()
            .filter_map(|l| snap.get(l).cloned())
            .collect();
        let devices: Vec<u32> = observed
            .iter()
            .map(|o| o.ifindex)
            .chain(self.lan_ifaces.iter().map(|i| i.index))
            .collect();
        let neighbours = match netinfo::neighbours(&self.handle, &devices).await {
            Ok(n) => {
                let lan: Vec<&netinfo::Interface> = self.lan_ifaces.iter().collect();
                let want = lanhops::hops(&self.config, &lan, &n);
                match lanhops::write(&self.maps, &self.lan_hops, want) {
                    Ok(held) => self.lan_hops = held,
                    Err(e) => error!("{e:#}"),
                }
                n
            }
            Err(e) => {
                warn!("reading the neighbour table: {e:#}");
                Default::default()
            }
        };
        let routers = self.routing6.ra_routers().await.unwrap_or_default();
        for (id, (u, o)) in self.config.uplinks.iter().zip(observed).enumerate() {
            let mac_of = |g: std::net::IpAddr| neighbours.get(&(o.ifindex, g)).copied();
            let mac = u.gateway.and_then(|g| mac_of(g.into()));
            if let Err(e) = self.maps.set_next_hop(
                u.slot.into(),
                &uplinks::next_hop(u.gateway.is_some(), o, mac),
            ) {
                error!("writing uplink {}'s next hop: {e:#}", u.name);
            }
            // IPv6: `gateway6`, or the router its RA announced.
            let gw6 = u.gateway6.or_else(|| {
                routers
                    .iter()
                    .find(|(i, _)| *i == o.ifindex)
                    .map(|(_, g)| *g)
            });
            let hop6 = if uplinks::uplink6(&self.config, id).is_empty() {
                Default::default()
            } else {
                uplinks::next_hop(gw6.is_some(), o, gw6.and_then(|g| mac_of(g.into())))
            };
            if let Err(e) = self.maps.set_next_hop6(u.slot.into(), &hop6) {
                error!("writing uplink {}'s IPv6 next hop: {e:#}", u.name);
            }
        }
    }

    /// Decides how new flows classify their route (`CLASSIFY`): by the
    /// kernel's `local` addresses and `main` when its policy rules come
    /// down to those, `main` itself mirrored in `MAIN_ROUTES` when it
    /// fits; else by the full lookup. Each map is written before the
    /// switch that reads it is turned on.
    async fn write_classify(&mut self) {
        let uplinks: Vec<u32> = self
            .observed
            .iter()
            .map(|o| o.ifindex)
            .filter(|i| *i != 0)
            .collect();
        let in_main = match self.routing.classify_in_main(&uplinks).await {
            Ok(in_main) => in_main,
            Err(e) => {
                error!("deciding how new flows classify their route: {e:#}");
                return;
            }
        };
        // Unchanged (most link and address events): the maps stay, and
        // so does the switch.
        if self.classified.as_ref() == Some(&in_main) {
            self.classify_stale = false;
            return;
        }
        if let Err(e) = self.maps.set_classify(in_main.as_ref().ok()) {
            error!("writing how new flows classify their route: {e:#}");
            self.classified = None;
            return;
        }
        let mode = classify_mode(&in_main);
        if mode != self.classify_mode {
            info!("new flows classify their route {mode}");
        }
        self.classify_mode = mode;
        self.classified = Some(in_main);
        self.classify_stale = false;
    }

    /// Whether a netlink event may change what the datapath holds: any
    /// link, address or rule event, neighbour events on an uplink's
    /// device (the LAN's own come and go all the time), IPv4 routes of the
    /// tables that `CLASSIFY` reads (local, main and default), and IPv6
    /// routes that may be a delegation (a reject route) or an RA's router.
    /// All but the neighbour and IPv6 events also make `CLASSIFY` stale.
    fn concerns_uplinks(&mut self, (msg, _): &NetlinkEvent) -> bool {
        use rtnetlink::{
            packet_core::NetlinkPayload,
            packet_route::{
                AddressFamily, RouteNetlinkMessage as M,
                route::{RouteProtocol, RouteType},
            },
        };
        match &msg.payload {
            NetlinkPayload::InnerMessage(M::NewNeighbour(n)) => {
                self.follow_lan_neighbour(n, false);
                self.observed.iter().any(|o| o.ifindex == n.header.ifindex)
            }
            NetlinkPayload::InnerMessage(M::DelNeighbour(n)) => {
                self.follow_lan_neighbour(n, true);
                self.observed.iter().any(|o| o.ifindex == n.header.ifindex)
            }
            NetlinkPayload::InnerMessage(M::NewRoute(r) | M::DelRoute(r)) => {
                if r.header.address_family == AddressFamily::Inet {
                    // `CLASSIFY` reads these tables (`MAIN_ROUTES` mirrors
                    // main, `LOCAL_ADDRS` local); our uplinks' own
                    // tables change only with what the daemon sees.
                    let classified = [
                        routing::RT_TABLE_LOCAL,
                        routing::RT_TABLE_MAIN,
                        routing::RT_TABLE_DEFAULT,
                    ]
                    .contains(&routing::route_table(r));
                    self.classify_stale |= classified;
                    classified
                } else {
                    r.header.kind != RouteType::Unicast || r.header.protocol == RouteProtocol::Ra
                }
            }
            NetlinkPayload::InnerMessage(M::NewAddress(a) | M::DelAddress(a))
                if a.header.family == AddressFamily::Inet6 =>
            {
                true
            }
            _ => {
                self.classify_stale = true;
                true
            }
        }
    }

    /// A neighbour of a LAN interface came, changed or went: its entry in
    /// `LAN_HOPS` follows at once (the refresh rewrites them all each
    /// second besides).
    fn follow_lan_neighbour(
        &mut self,
        n: &rtnetlink::packet_route::neighbour::NeighbourMessage,
        deleted: bool,
    ) {
        let Some(iface) = self.lan_ifaces.iter().find(|i| i.index == n.header.ifindex) else {
            return;
        };
        let Some((addr, mac)) = netinfo::neighbour_of(n) else {
            return;
        };
        let want = mac
            .filter(|_| !deleted)
            .and_then(|mac| lanhops::hop(&self.config, iface, addr, mac));
        let result = match want {
            Some(h) if self.lan_hops.get(&addr) != Some(&h) => {
                self.maps.set_lan_hop(addr, &h).map(|()| {
                    self.lan_hops.insert(addr, h);
                })
            }
            None if self.lan_hops.contains_key(&addr) => self.maps.remove_lan_hop(addr).map(|()| {
                self.lan_hops.remove(&addr);
            }),
            _ => Ok(()),
        };
        if let Err(e) = result {
            warn!("following LAN neighbour {addr}: {e:#}");
        }
    }

    /// Writes uplink `id`'s slot from what is known of it.
    fn publish_slot(&self, id: usize) {
        if let Some(o) = self.observed.get(id) {
            let slot = uplinks::slot(&self.config, id, o, &self.probed[id], self.drained[id]);
            let at = self.config.uplinks[id].slot;
            if let Err(e) = self.maps.set_uplink(at.into(), &slot) {
                error!("writing uplink slot {at}: {e:#}");
            }
        }
    }

    /// Compiles the rules and, if they changed, writes them to the idle
    /// bank and switches the datapath to it: new flows see the old rules
    /// or the new ones, never a mix. Pinned flows keep their uplink.
    fn apply_rules(&mut self) -> anyhow::Result<()> {
        let compiled = compile::compile(&self.policies.rules);
        let reserve = self.policies.reserves_ports();
        let active = self.rules.word & 1;
        // A bank of no rules is never read: nothing to write.
        let unchanged = rules_count(self.rules.word) == compiled.rules
            && (compiled.rules == 0
                || self.rules.known[active as usize].as_ref() == Some(&compiled));
        if unchanged {
            if rules_word(active, compiled.rules, reserve) != self.rules.word {
                self.maps.switch_rules(active, compiled.rules, reserve)?;
                self.rules.word = rules_word(active, compiled.rules, reserve);
            }
            return self.clear_unused_tables();
        }
        let idle = 1 - active;
        // Unknown until written whole: a write that fails half way must
        // not be taken for the old content next time.
        let old = self.rules.known[idle as usize].take();
        self.maps
            .write_rule_bank(idle, &compiled, old.as_ref())
            .context("writing the rule maps")?;
        self.maps.switch_rules(idle, compiled.rules, reserve)?;
        self.rules.word = rules_word(idle, compiled.rules, reserve);
        self.rules.known[idle as usize] = Some(compiled);
        self.clear_unused_tables()
    }

    /// Empties the tables of policy ids no policy holds (a reload removed
    /// it): after the switch, so no new flow is placed by a half-gone
    /// policy. Its flows fall under `balanced` for `on_up`.
    fn clear_unused_tables(&mut self) -> anyhow::Result<()> {
        for id in 0..self.select.len() {
            if self.policies.policies[id].is_none() && self.select[id] != SelectTable::default() {
                self.maps.set_select(id as u32, &SelectTable::default())?;
                self.select[id] = SelectTable::default();
            }
        }
        Ok(())
    }

    /// SIGHUP or `multihome reload`: re-read the config. Weights, uplink
    /// details, policies and rules change in place; live flows stay where
    /// they are pinned. A config with a problem is refused whole.
    async fn reload(&mut self) -> anyhow::Result<()> {
        let new = Config::load(&self.opts.config_path)?;
        if new.lan != self.config.lan
            || new.nat != self.config.nat
            || new.routing != self.config.routing
            || new.xdp != self.config.xdp
            || new.uplinks.len() != self.config.uplinks.len()
            || new.uplinks.iter().zip(&self.config.uplinks).any(|(a, b)| {
                a.name != b.name || a.interface != b.interface || a.health != b.health
            })
        {
            bail!(
                "only weights, gateways, addresses, LAN and IPv6 prefixes, timeouts, policies and rules \
                 change on reload; restart for the rest, health probes included (with \
                 --keep-on-exit no flow is lost)"
            );
        }
        let mut new = new;
        for (n, o) in new.uplinks.iter_mut().zip(&self.config.uplinks) {
            n.slot = o.slot;
            // Learned anew by the refresh; kept should reading fail.
            n.learned6 = o.learned6;
        }
        new.lan6_learned = self.config.lan6_learned.clone();
        let snap = netinfo::snapshot(&self.handle).await?;
        let policies = Policies::resolve(&new, &policy::ids_of(&self.select), &snap)?;
        if let Some(r) = &self.reaper {
            r.set_timeouts(new.timeouts.clone());
        }
        self.config = new;
        self.policies = policies;
        self.refresh(&snap).await?;
        self.apply_rules()?;
        info!(
            "config reloaded: {} policies, {} rules",
            self.config.policies.len(),
            self.policies.rules.len()
        );
        Ok(())
    }

    /// `multihome explain`.
    fn explain(&self, q: &explain::Query) -> anyhow::Result<explain::Explanation> {
        let usable = self.select_usable();
        let uplinks = self.uplinks_now(&usable);
        let affinities = self.maps.affinities_map()?;
        let endpoints = self.maps.endpoints_map()?;
        q.check().map_err(anyhow::Error::msg)?;
        let ipv6: Vec<bool> = (0..self.config.uplinks.len())
            .map(|id| self.config.outer6(id).is_some())
            .collect();
        let lan6: Vec<_> = self
            .config
            .internal6()
            .into_iter()
            .map(|(_, p)| p)
            .collect();
        Ok(explain::explain(
            q,
            &explain::State {
                policies: &self.policies,
                tables: &self.select,
                uplinks: &uplinks,
                seed: self.flow_hash_seed,
                affinity: &|k| affinities.get(k, 0).ok(),
                endpoint: &|k| endpoints.get(k, 0).ok(),
                now_ns: crate::maps::clock_ns(),
                lan6: &lan6,
                ipv6: &ipv6,
            },
        ))
    }

    /// The config's uplinks as policies see them, with `usable` (by
    /// config index).
    fn uplinks_now<'a>(&'a self, usable: &[bool]) -> Vec<UplinkNow<'a>> {
        let canaries = self
            .probed
            .iter()
            .any(|p| matches!(p.traffic, passive::Verdict::Canary { .. }));
        let degraded = |p: &Probed| matches!(p.traffic, passive::Verdict::Degraded { .. });
        // A degraded uplink takes new flows only when no healthy one can.
        let healthy = usable
            .iter()
            .zip(&self.probed)
            .any(|(u, p)| *u && !degraded(p));
        self.config
            .uplinks
            .iter()
            .zip(usable)
            .zip(&self.probed)
            .map(|((u, usable), p)| UplinkNow {
                slot: u.slot,
                name: &u.name,
                // An uplink on trial takes a small share: the others count
                // CANARY_SHARE times their weight.
                weight: match (canaries, p.traffic) {
                    (false, _) | (true, passive::Verdict::Canary { .. }) => u.weight,
                    (true, _) => u.weight.saturating_mul(CANARY_SHARE),
                },
                usable: *usable && !(healthy && degraded(p)),
            })
            .collect()
    }

    /// Per uplink, whether the datapath sees it usable now.
    fn select_usable(&self) -> Vec<bool> {
        let slots = self.maps.uplinks().unwrap_or_default();
        self.config
            .uplinks
            .iter()
            .map(|u| {
                slots.get(u.slot as usize).is_some_and(|s| {
                    s.flags & multihome_common::UPLINK_USABLE != 0 && s.addr_be != 0
                })
            })
            .collect()
    }

    async fn teardown(&mut self) {
        if let Err(e) = self.routing.remove_all().await {
            error!("removing routes and rules: {e:#}");
        }
        if let Err(e) = self.routing6.remove_all().await {
            error!("removing IPv6 routes and rules: {e:#}");
        }
        // Forced: entries an earlier run left are removed too.
        self.ndp_proxied = true;
        let observed = self.observed.clone();
        match netinfo::snapshot(&self.handle).await {
            Ok(snap) => {
                if let Err(e) = self.sync_ndp_proxy(&snap, &observed, true).await {
                    error!("removing NDP proxy entries: {e:#}");
                }
            }
            Err(e) => error!("removing NDP proxy entries: {e:#}"),
        }
        if let Err(e) = loader::remove_pins(&self.opts.pin_dir) {
            error!("{e:#}");
        }
        info!("detached and removed everything installed");
    }
}

/// `multihome cleanup`: remove what a run left behind.
pub async fn cleanup(pin_dir: &Path) -> anyhow::Result<()> {
    let (conn, handle, _) = rtnetlink::new_connection().context("opening rtnetlink")?;
    tokio::spawn(conn);
    Routing::new(handle.clone()).remove_all().await?;
    Routing6::new(handle.clone()).remove_all().await?;
    // The NDP proxy's entries lie in the uplinks' prefixes, which only
    // the pinned maps still know.
    if let Ok(maps) = Maps::open(pin_dir) {
        let uplinks = maps.uplinks()?;
        let gone: Vec<_> = maps
            .uplinks6()?
            .into_iter()
            .zip(uplinks)
            .filter(|(u6, u)| !u6.is_empty() && u.ifindex != 0)
            .map(|(u6, u)| (u.ifindex, u6))
            .collect();
        ndproxy::sync(&handle, &[], &gone, &Default::default()).await?;
    }
    loader::remove_pins(pin_dir)
}
