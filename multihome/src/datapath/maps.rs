//! Typed access to the pinned maps, shared by the daemon and the CLI.
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use aya::maps::{
    Array, DevMapHash, HashMap, Map, MapData, PerCpuArray,
    lpm_trie::{Key, LpmTrie},
};
use multihome_common::{
    Affinity, AffinityKey, Allow6Key, CLASSIFY_BY_ROUTES, CLASSIFY_IN_MAIN, EimKey, Endpoint,
    EndpointKey, Flow6, Flow6Key, FlowFwd, FlowKey, FlowRev, HostFlows, LanNet, MAP_AFFINITY,
    MAP_ALLOW6, MAP_CLASSIFY, MAP_CONN_FWD, MAP_CONN_REV, MAP_CONN6, MAP_ENDPOINT_PORTS,
    MAP_ENDPOINTS, MAP_FILL, MAP_HOSTS, MAP_HOSTS6, MAP_LAN_HOPS, MAP_LAN_HOPS6, MAP_LAN_NETS,
    MAP_LOCAL_ADDRS, MAP_MAIN_ROUTES, MAP_MAPPED6, MAP_NAT6, MAP_NEXT_HOPS, MAP_NEXT_HOPS6,
    MAP_REASONS, MAP_ROUTED, MAP_ROUTED6, MAP_RULE_ACTION, MAP_RULE_DPORT, MAP_RULE_DSCP,
    MAP_RULE_DST, MAP_RULE_PROTO, MAP_RULE_SRC, MAP_SELECT, MAP_SETTINGS, MAP_SYN_WAIT,
    MAP_UPLINK_STATS, MAP_UPLINKS, MAP_UPLINKS6, MAP_XDP_DEVS, MAP_XDP_STATS, MAPPED6_INNER,
    MAPPED6_OUTER, MAX_LAN_NETS, MAX_LAN6, MAX_LOCAL_ADDRS, MAX_POLICIES, MAX_RULES, MAX_UPLINKS,
    MODE6_NPT, Mapped6Key, Nat6Key, Nat6Lan, NextHop, Reasons, Routed6Key, RoutedKey,
    RoutedUplinks, RuleAction, RuleAddrKey, RuleSet, SelectTable, Settings, SynWaitKey, Uplink,
    Uplink6, UplinkStats, XdpStats, rules_word, uplink6_slot,
};

use crate::{
    config::{Prefix, Prefix6},
    mapwalk,
    netlink::routing::InMain,
    policy::compile::Compiled,
};

#[derive(Clone)]
pub struct Maps {
    dir: PathBuf,
}

fn open(dir: &Path, name: &str) -> anyhow::Result<MapData> {
    let path = dir.join(name);
    MapData::from_pin(&path).with_context(|| {
        format!(
            "opening pinned map {}: is `multihome run` running with --pin-dir {}?",
            path.display(),
            dir.display()
        )
    })
}

impl Maps {
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        if !dir.join(MAP_SETTINGS).exists() {
            bail!(
                "no multihome datapath is pinned in {}: start `multihome run`, or pass the \
                 --pin-dir it uses",
                dir.display()
            );
        }
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    /// Where the maps and links are pinned.
    pub fn pin_dir(&self) -> &Path {
        &self.dir
    }

    fn array<V: aya::Pod>(&self, name: &str) -> anyhow::Result<Array<MapData, V>> {
        Ok(Array::try_from(Map::Array(open(&self.dir, name)?))?)
    }

    fn per_cpu<V: aya::Pod>(&self, name: &str) -> anyhow::Result<PerCpuArray<MapData, V>> {
        Ok(PerCpuArray::try_from(Map::PerCpuArray(open(
            &self.dir, name,
        )?))?)
    }

    pub fn fwd(&self) -> anyhow::Result<HashMap<MapData, FlowKey, FlowFwd>> {
        Ok(HashMap::try_from(Map::HashMap(open(
            &self.dir,
            MAP_CONN_FWD,
        )?))?)
    }

    pub fn rev(&self) -> anyhow::Result<HashMap<MapData, FlowKey, FlowRev>> {
        Ok(HashMap::try_from(Map::HashMap(open(
            &self.dir,
            MAP_CONN_REV,
        )?))?)
    }

    /// LAN host address (network order) -> its flows and refusals.
    pub fn hosts(&self) -> anyhow::Result<HashMap<MapData, u32, HostFlows>> {
        Ok(HashMap::try_from(Map::HashMap(open(
            &self.dir, MAP_HOSTS,
        )?))?)
    }

    /// The IPv6 hosts' flows and refusals, by address.
    pub fn hosts6(&self) -> anyhow::Result<HashMap<MapData, [u8; 16], HostFlows>> {
        Ok(HashMap::try_from(Map::HashMap(open(
            &self.dir, MAP_HOSTS6,
        )?))?)
    }

    /// Flows in the connection map as the datapath counts them.
    pub fn fill(&self) -> anyhow::Result<u64> {
        Ok(self.array::<u64>(MAP_FILL)?.get(&0, 0)?)
    }

    pub fn set_fill(&self, flows: u64) -> anyhow::Result<()> {
        Ok(self.array::<u64>(MAP_FILL)?.set(0, flows, 0)?)
    }

    pub fn settings(&self) -> anyhow::Result<Settings> {
        Ok(self.array::<Settings>(MAP_SETTINGS)?.get(&0, 0)?)
    }

    pub fn set_settings(&self, s: &Settings) -> anyhow::Result<()> {
        Ok(self.array::<Settings>(MAP_SETTINGS)?.set(0, s, 0)?)
    }

    pub fn uplinks(&self) -> anyhow::Result<Vec<Uplink>> {
        let a = self.array::<Uplink>(MAP_UPLINKS)?;
        (0..MAX_UPLINKS)
            .map(|i| Ok(a.get(&i, 0)?))
            .collect::<anyhow::Result<_>>()
    }

    pub fn set_uplink(&self, id: u32, u: &Uplink) -> anyhow::Result<()> {
        Ok(self.array::<Uplink>(MAP_UPLINKS)?.set(id, u, 0)?)
    }

    /// How new flows classify their route: with `Some`, by the local
    /// addresses and `main` (`CLASSIFY_IN_MAIN`), itself read from
    /// `MAIN_ROUTES` when `main` is mirrored (`CLASSIFY_BY_ROUTES`); with
    /// None, through the policy rules. Each map is complete before the
    /// switch that reads it goes on, and the mirror's switch is off while
    /// it is rewritten.
    pub fn set_classify(&self, in_main: Option<&InMain>) -> anyhow::Result<()> {
        let mut switch = self.array::<u32>(MAP_CLASSIFY)?;
        let Some(in_main) = in_main else {
            return Ok(switch.set(0, 0, 0)?);
        };
        let mut map: HashMap<MapData, u32, u32> =
            HashMap::try_from(Map::HashMap(open(&self.dir, MAP_LOCAL_ADDRS)?))?;
        let want: std::collections::HashMap<u32, u32> = in_main
            .locals
            .iter()
            .map(|(a, kind)| (u32::from(*a).to_be(), *kind))
            .collect();
        if want.len() > MAX_LOCAL_ADDRS as usize {
            // More than the map holds: the full lookup, always right.
            return Ok(switch.set(0, 0, 0)?);
        }
        // Off while either map changes under it.
        switch.set(0, 0, 0)?;
        for (k, v) in &want {
            map.insert(k, v, 0)?;
        }
        let gone: Vec<u32> = map
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !want.contains_key(k))
            .collect();
        for k in gone {
            let _ = map.remove(&k);
        }
        let Ok(routes) = &in_main.main else {
            return Ok(switch.set(0, CLASSIFY_IN_MAIN, 0)?);
        };
        let wanted: Vec<_> = routes
            .iter()
            .map(|(p, r)| {
                let addr_be = u32::from(p.network()).to_be();
                (Key::new(u32::from(p.len), RoutedKey { addr_be }), *r)
            })
            .collect();
        write_exactly(
            &mut LpmTrie::try_from(Map::LpmTrie(open(&self.dir, MAP_MAIN_ROUTES)?))?,
            &wanted,
        )?;
        Ok(switch.set(0, CLASSIFY_IN_MAIN | CLASSIFY_BY_ROUTES, 0)?)
    }

    /// Every uplink slot's cached next hop.
    pub fn next_hops(&self) -> anyhow::Result<Vec<NextHop>> {
        let a = self.array::<NextHop>(MAP_NEXT_HOPS)?;
        (0..MAX_UPLINKS)
            .map(|i| Ok(a.get(&i, 0)?))
            .collect::<anyhow::Result<_>>()
    }

    /// Sets LAN host `addr`'s next hop (`LAN_HOPS` or `LAN_HOPS6`).
    pub fn set_lan_hop(&self, addr: std::net::IpAddr, h: &NextHop) -> anyhow::Result<()> {
        match addr {
            std::net::IpAddr::V4(a) => {
                let mut m: HashMap<MapData, u32, NextHop> =
                    HashMap::try_from(Map::HashMap(open(&self.dir, MAP_LAN_HOPS)?))?;
                m.insert(u32::from(a).to_be(), h, 0)?;
            }
            std::net::IpAddr::V6(a) => {
                let mut m: HashMap<MapData, [u8; 16], NextHop> =
                    HashMap::try_from(Map::HashMap(open(&self.dir, MAP_LAN_HOPS6)?))?;
                m.insert(a.octets(), h, 0)?;
            }
        }
        Ok(())
    }

    /// Empties `LAN_HOPS` and `LAN_HOPS6` (what an earlier run left).
    pub fn clear_lan_hops(&self) -> anyhow::Result<()> {
        let mut v4: HashMap<MapData, u32, NextHop> =
            HashMap::try_from(Map::HashMap(open(&self.dir, MAP_LAN_HOPS)?))?;
        for k in v4.keys().filter_map(Result::ok).collect::<Vec<_>>() {
            let _ = v4.remove(&k);
        }
        let mut v6: HashMap<MapData, [u8; 16], NextHop> =
            HashMap::try_from(Map::HashMap(open(&self.dir, MAP_LAN_HOPS6)?))?;
        for k in v6.keys().filter_map(Result::ok).collect::<Vec<_>>() {
            let _ = v6.remove(&k);
        }
        Ok(())
    }

    /// Removes LAN host `addr`'s next hop; one not there is no error.
    pub fn remove_lan_hop(&self, addr: std::net::IpAddr) -> anyhow::Result<()> {
        let gone = match addr {
            std::net::IpAddr::V4(a) => {
                let mut m: HashMap<MapData, u32, NextHop> =
                    HashMap::try_from(Map::HashMap(open(&self.dir, MAP_LAN_HOPS)?))?;
                m.remove(&u32::from(a).to_be())
            }
            std::net::IpAddr::V6(a) => {
                let mut m: HashMap<MapData, [u8; 16], NextHop> =
                    HashMap::try_from(Map::HashMap(open(&self.dir, MAP_LAN_HOPS6)?))?;
                m.remove(&a.octets())
            }
        };
        match gone {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    pub fn set_next_hop(&self, id: u32, h: &NextHop) -> anyhow::Result<()> {
        Ok(self.array::<NextHop>(MAP_NEXT_HOPS)?.set(id, h, 0)?)
    }

    /// Policy `id`'s choice table (0: `balanced`).
    pub fn set_select(&self, id: u32, t: &SelectTable) -> anyhow::Result<()> {
        Ok(self.array::<SelectTable>(MAP_SELECT)?.set(id, t, 0)?)
    }

    /// Every policy's choice table, by id.
    pub fn select_tables(&self) -> anyhow::Result<Vec<SelectTable>> {
        let a = self.array::<SelectTable>(MAP_SELECT)?;
        (0..MAX_POLICIES)
            .map(|i| Ok(a.get(&i, 0)?))
            .collect::<anyhow::Result<_>>()
    }

    /// Writes rule bank `bank` (0 or 1) to hold `new`, touching only what
    /// differs from `old`, the bank's known content (`None`: unknown).
    /// The bank must not be the one in use.
    pub fn write_rule_bank(
        &self,
        bank: u32,
        new: &Compiled,
        old: Option<&Compiled>,
    ) -> anyhow::Result<()> {
        for (name, new, old) in [
            (MAP_RULE_SRC, &new.src, old.map(|o| &o.src)),
            (MAP_RULE_DST, &new.dst, old.map(|o| &o.dst)),
        ] {
            let mut trie: LpmTrie<MapData, RuleAddrKey, RuleSet> =
                LpmTrie::try_from(Map::LpmTrie(open(&self.dir, name)?))?;
            let key = |(net, len): (u32, u8)| {
                Key::new(
                    32 + u32::from(len),
                    RuleAddrKey {
                        bank_be: bank.to_be(),
                        addr_be: net.to_be(),
                    },
                )
            };
            for (k, rs) in new {
                if old.and_then(|o| o.get(k)) != Some(rs) {
                    trie.insert(&key(*k), rs, 0)?;
                }
            }
            // Stale entries of this bank: the known ones, or all not wanted.
            let stale: Vec<_> = trie
                .keys()
                .filter_map(Result::ok)
                .filter(|k| {
                    let d = k.data();
                    d.bank_be == bank.to_be()
                        && !new.contains_key(&(
                            u32::from_be(d.addr_be),
                            k.prefix_len().saturating_sub(32) as u8,
                        ))
                })
                .collect();
            for k in stale {
                trie.remove(&k)?;
            }
        }
        for (name, base, new, old) in [
            (MAP_RULE_PROTO, 256, &new.proto, old.map(|o| &o.proto)),
            (MAP_RULE_DPORT, 65536, &new.dport, old.map(|o| &o.dport)),
            (MAP_RULE_DSCP, 64, &new.dscp, old.map(|o| &o.dscp)),
        ] {
            let mut a = self.array::<RuleSet>(name)?;
            for (i, rs) in new.iter().enumerate() {
                if old.map(|o| &o[i]) != Some(rs) {
                    a.set(bank * base + i as u32, rs, 0)?;
                }
            }
        }
        let mut a = self.array::<RuleAction>(MAP_RULE_ACTION)?;
        for (i, act) in new.action.iter().enumerate() {
            if old.map(|o| o.action[i]) != Some(*act) {
                a.set(bank * MAX_RULES + i as u32, act, 0)?;
            }
        }
        Ok(())
    }

    /// Switches the datapath to rule bank `bank`, holding `count` rules,
    /// with endpoint reservations on or off: one store of
    /// [`Settings::rules`].
    pub fn switch_rules(&self, bank: u32, count: u32, reserve: bool) -> anyhow::Result<()> {
        let mut s = self.settings()?;
        s.rules = rules_word(bank, count, reserve);
        self.set_settings(&s)
    }

    /// (remote, uplink) -> when a LAN SYN first went there unanswered.
    pub fn syn_wait(&self) -> anyhow::Result<HashMap<MapData, SynWaitKey, u64>> {
        Ok(HashMap::try_from(Map::LruHashMap(open(
            &self.dir,
            MAP_SYN_WAIT,
        )?))?)
    }

    /// Public mapping -> the endpoint whose record holds it.
    pub fn endpoint_ports(&self) -> anyhow::Result<HashMap<MapData, EimKey, EndpointKey>> {
        Ok(HashMap::try_from(Map::HashMap(open(
            &self.dir,
            MAP_ENDPOINT_PORTS,
        )?))?)
    }

    /// Every endpoint record.
    pub fn endpoints(&self) -> anyhow::Result<Vec<(EndpointKey, Endpoint)>> {
        mapwalk::collect(&self.endpoints_map()?).context("reading ENDPOINTS")
    }

    pub fn endpoints_map(&self) -> anyhow::Result<HashMap<MapData, EndpointKey, Endpoint>> {
        Ok(HashMap::try_from(Map::HashMap(open(
            &self.dir,
            MAP_ENDPOINTS,
        )?))?)
    }

    pub fn affinities_map(&self) -> anyhow::Result<HashMap<MapData, AffinityKey, Affinity>> {
        Ok(HashMap::try_from(Map::LruHashMap(open(
            &self.dir,
            MAP_AFFINITY,
        )?))?)
    }

    /// Every affinity record.
    pub fn affinities(&self) -> anyhow::Result<Vec<(AffinityKey, Affinity)>> {
        mapwalk::collect(&self.affinities_map()?).context("reading AFFINITY")
    }

    pub fn set_lan_nets(&self, nets: &[LanNet]) -> anyhow::Result<()> {
        if nets.len() > MAX_LAN_NETS as usize {
            bail!(
                "{} LAN prefixes; at most {MAX_LAN_NETS} fit: list fewer `lan_prefixes`",
                nets.len()
            );
        }
        let mut a = self.array::<LanNet>(MAP_LAN_NETS)?;
        for i in 0..MAX_LAN_NETS {
            let net = nets.get(i as usize).copied().unwrap_or_default();
            a.set(i, net, 0)?;
        }
        Ok(())
    }

    /// Makes [`MAP_ROUTED`] hold exactly `table`.
    pub fn set_routed(&self, table: &[(Prefix, RoutedUplinks)]) -> anyhow::Result<()> {
        let wanted: Vec<_> = table
            .iter()
            .map(|(p, bits)| {
                let addr_be = u32::from(p.network()).to_be();
                (Key::new(u32::from(p.len), RoutedKey { addr_be }), *bits)
            })
            .collect();
        write_exactly(
            &mut LpmTrie::try_from(Map::LpmTrie(open(&self.dir, MAP_ROUTED)?))?,
            &wanted,
        )
    }

    /// Makes [`MAP_ROUTED6`] hold exactly `table`.
    pub fn set_routed6(&self, table: &[(Prefix6, RoutedUplinks)]) -> anyhow::Result<()> {
        let wanted: Vec<_> = table
            .iter()
            .map(|(p, bits)| {
                let addr = p.network().octets();
                (Key::new(u32::from(p.len), Routed6Key { addr }), *bits)
            })
            .collect();
        write_exactly(
            &mut LpmTrie::try_from(Map::LpmTrie(open(&self.dir, MAP_ROUTED6)?))?,
            &wanted,
        )
    }

    /// Writes `MAPPED6` for `uplinks6` (each slot's entries, as
    /// [`Maps::set_uplink6`] takes them): the prefixes of every entry
    /// past an uplink's first, exactly.
    pub fn set_mapped6(&self, uplinks6: &[(u32, Vec<Uplink6>)]) -> anyhow::Result<()> {
        let key = |side: u32, addr: [u8; 16], len: u8| {
            let data = Mapped6Key {
                side_be: side.to_be(),
                addr,
            };
            Key::new(32 + u32::from(len), data)
        };
        let mut wanted = Vec::new();
        for (id, entries) in uplinks6 {
            for (k, u6) in entries.iter().enumerate().skip(1) {
                let k = k as u32;
                wanted.push((key(MAPPED6_INNER, u6.inner, u6.prefix_len), k));
                if u6.mode == MODE6_NPT {
                    let slot = uplink6_slot(*id, k);
                    wanted.push((key(MAPPED6_OUTER, u6.outer, u6.prefix_len), slot));
                }
            }
        }
        // Every uplink maps the internal prefixes in one order.
        wanted.sort_by_key(|(k, _)| (k.prefix_len(), k.data().side_be, k.data().addr));
        wanted.dedup_by_key(|(k, _)| (k.prefix_len(), k.data().side_be, k.data().addr));
        write_exactly(
            &mut LpmTrie::try_from(Map::LpmTrie(open(&self.dir, MAP_MAPPED6)?))?,
            &wanted,
        )
    }

    /// Makes [`MAP_ALLOW6`] hold exactly `allowed` (selector, internal
    /// prefix).
    pub fn set_allow6(&self, allowed: &[(u32, Prefix6)]) -> anyhow::Result<()> {
        let wanted: Vec<_> = allowed
            .iter()
            .map(|(sel, p)| {
                let data = Allow6Key {
                    sel_be: sel.to_be(),
                    addr: p.network().octets(),
                };
                (Key::new(32 + u32::from(p.len), data), 1)
            })
            .collect();
        write_exactly(
            &mut LpmTrie::try_from(Map::LpmTrie(open(&self.dir, MAP_ALLOW6)?))?,
            &wanted,
        )
    }

    /// Zeroes slot `id`'s counters on every CPU (its uplink left).
    pub fn clear_uplink_stats(&self, id: u32) -> anyhow::Result<()> {
        let mut a = self.per_cpu::<UplinkStats>(MAP_UPLINK_STATS)?;
        let cpus = aya::util::nr_cpus().map_err(|(what, e)| anyhow::anyhow!("{what}: {e}"))?;
        let zero = aya::maps::PerCpuValues::try_from(vec![UplinkStats::default(); cpus])?;
        a.set(id, zero, 0)?;
        let mut x = self.per_cpu::<XdpStats>(MAP_XDP_STATS)?;
        let zero = aya::maps::PerCpuValues::try_from(vec![XdpStats::default(); cpus])?;
        Ok(x.set(id, zero, 0)?)
    }

    /// Per-uplink packets that took the XDP path, summed over CPUs.
    pub fn xdp_stats(&self) -> anyhow::Result<Vec<XdpStats>> {
        let a = self.per_cpu::<XdpStats>(MAP_XDP_STATS)?;
        (0..MAX_UPLINKS)
            .map(|i| {
                Ok(a.get(&i, 0)?.iter().fold(XdpStats::default(), |mut t, s| {
                    t.tx_packets += s.tx_packets;
                    t.rx_packets += s.rx_packets;
                    t
                }))
            })
            .collect()
    }

    fn xdp_devs_map(&self) -> anyhow::Result<DevMapHash<MapData>> {
        Ok(DevMapHash::try_from(Map::DevMapHash(open(
            &self.dir,
            MAP_XDP_DEVS,
        )?))?)
    }

    /// The devices the XDP programs may redirect to, by ifindex.
    pub fn xdp_devs(&self) -> anyhow::Result<Vec<u32>> {
        Ok(self.xdp_devs_map()?.keys().collect::<Result<Vec<_>, _>>()?)
    }

    /// Lets the XDP programs redirect to `ifindex`, or stops them.
    pub fn set_xdp_dev(&self, ifindex: u32, allowed: bool) -> anyhow::Result<()> {
        let mut m = self.xdp_devs_map()?;
        if allowed {
            m.insert(ifindex, ifindex, None, 0)?;
        } else {
            match m.remove(ifindex) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Per-uplink counters, summed over CPUs.
    pub fn uplink_stats(&self) -> anyhow::Result<Vec<UplinkStats>> {
        let a = self.per_cpu::<UplinkStats>(MAP_UPLINK_STATS)?;
        (0..MAX_UPLINKS)
            .map(|i| {
                let per_cpu = a.get(&i, 0)?;
                Ok(per_cpu.iter().fold(UplinkStats::default(), |mut t, s| {
                    t.new_flows += s.new_flows;
                    t.tx_packets += s.tx_packets;
                    t.tx_bytes += s.tx_bytes;
                    t.rx_packets += s.rx_packets;
                    t.rx_bytes += s.rx_bytes;
                    t.slow_path += s.slow_path;
                    t.syns += s.syns;
                    t.synacks += s.synacks;
                    t.synack_rtt_ns += s.synack_rtt_ns;
                    t.syn_retries += s.syn_retries;
                    t.retransmits += s.retransmits;
                    t
                }))
            })
            .collect()
    }

    /// Reason counters, summed over CPUs.
    pub fn reasons(&self) -> anyhow::Result<Vec<(&'static str, u64)>> {
        let a = self.per_cpu::<Reasons>(MAP_REASONS)?;
        let per_cpu = a.get(&0, 0)?;
        Ok(multihome_common::Reason::ALL
            .iter()
            .map(|r| (r.name(), per_cpu.iter().map(|c| c.get(*r)).sum()))
            .collect())
    }

    /// How many flows the connection map can hold.
    pub fn flow_capacity(&self) -> anyhow::Result<u32> {
        Ok(open(&self.dir, MAP_CONN_FWD)?.info()?.max_entries())
    }

    /// The IPv6 connection map.
    pub fn conn6(&self) -> anyhow::Result<HashMap<MapData, Flow6Key, Flow6>> {
        Ok(HashMap::try_from(Map::HashMap(open(
            &self.dir, MAP_CONN6,
        )?))?)
    }

    /// NAT66's reverse map.
    pub fn nat6(&self) -> anyhow::Result<HashMap<MapData, Nat6Key, Nat6Lan>> {
        Ok(HashMap::try_from(Map::HashMap(open(&self.dir, MAP_NAT6)?))?)
    }

    /// Removes the `NAT6` entries whose flow is gone from `CONN6` or holds
    /// another port (the datapath takes those over too, but they fill the
    /// map); returns how many went.
    pub fn sweep_nat6(&self) -> anyhow::Result<usize> {
        let conn6 = self.conn6()?;
        let mut nat6 = self.nat6()?;
        let stale: Vec<Nat6Key> = mapwalk::collect(&nat6)?
            .into_iter()
            .filter(|(n, l)| {
                let key = Flow6Key {
                    lan: l.lan,
                    remote: n.remote,
                    lan_port_be: l.lan_port_be,
                    remote_port_be: n.remote_port_be,
                    proto: n.proto,
                    ..Default::default()
                };
                !conn6
                    .get(&key, 0)
                    .is_ok_and(|f| f.uplink == n.uplink && f.nat_port_be == n.nat_port_be)
            })
            .map(|(n, _)| n)
            .collect();
        Ok(stale.iter().filter(|n| nat6.remove(n).is_ok()).count())
    }

    /// Every IPv6 flow.
    pub fn flows6(&self) -> anyhow::Result<Vec<(Flow6Key, Flow6)>> {
        mapwalk::collect(&self.conn6()?).context("reading CONN6")
    }

    /// Each uplink slot's IPv6 translations, one per internal prefix in
    /// order (empty: the uplink carries no IPv6).
    pub fn uplinks6(&self) -> anyhow::Result<Vec<Vec<Uplink6>>> {
        let a = self.array::<Uplink6>(MAP_UPLINKS6)?;
        (0..MAX_UPLINKS)
            .map(|id| {
                let first = a.get(&uplink6_slot(id, 0), 0)?;
                if first.prefix_len == 0 {
                    return Ok(Vec::new());
                }
                let lans = u32::from(first.lans).clamp(1, MAX_LAN6);
                (0..lans)
                    .map(|k| Ok(a.get(&uplink6_slot(id, k), 0)?))
                    .collect()
            })
            .collect()
    }

    pub fn next_hops6(&self) -> anyhow::Result<Vec<NextHop>> {
        let a = self.array::<NextHop>(MAP_NEXT_HOPS6)?;
        (0..MAX_UPLINKS).map(|i| Ok(a.get(&i, 0)?)).collect()
    }

    pub fn set_next_hop6(&self, id: u32, h: &NextHop) -> anyhow::Result<()> {
        Ok(self.array::<NextHop>(MAP_NEXT_HOPS6)?.set(id, h, 0)?)
    }

    /// Writes uplink slot `id`'s IPv6 translations (none: it carries no
    /// IPv6). Those past the first go first and the first, which says
    /// how many there are, after them, so that the programs never read
    /// an entry not yet written; stale ones past the end go last.
    pub fn set_uplink6(&self, id: u32, entries: &[Uplink6]) -> anyhow::Result<()> {
        let mut a = self.array::<Uplink6>(MAP_UPLINKS6)?;
        let at = |k: usize| uplink6_slot(id, k as u32);
        for (k, u) in entries.iter().enumerate().skip(1) {
            a.set(at(k), u, 0)?;
        }
        a.set(at(0), entries.first().copied().unwrap_or_default(), 0)?;
        for k in entries.len().max(1)..MAX_LAN6 as usize {
            a.set(at(k), Uplink6::default(), 0)?;
        }
        Ok(())
    }

    /// Removes the IPv6 flows `doomed` picks, each read again just before
    /// (a flow refreshed during the walk stays); returns how many went.
    pub fn remove_flows6(
        &self,
        doomed: impl Fn(&Flow6Key, &Flow6) -> bool,
    ) -> anyhow::Result<usize> {
        let mut map = self.conn6()?;
        let victims: Vec<Flow6Key> = mapwalk::collect(&map)?
            .into_iter()
            .filter(|(k, f)| doomed(k, f))
            .map(|(k, _)| k)
            .collect();
        let mut nat6 = self.nat6().ok();
        Ok(victims
            .iter()
            .filter(|k| match map.get(k, 0) {
                Ok(f) if doomed(k, &f) && map.remove(k).is_ok() => {
                    // Its NAT66 port, if it has one, is free again.
                    if let Some(n) = nat6.as_mut().filter(|_| f.nat_port_be != 0) {
                        let _ = n.remove(&k.nat6(f.uplink, f.nat_port_be));
                    }
                    true
                }
                _ => false,
            })
            .count())
    }

    /// Every forward entry.
    pub fn flows(&self) -> anyhow::Result<Vec<(FlowKey, FlowFwd)>> {
        mapwalk::collect(&self.fwd()?).context("reading CONN_FWD")
    }
}

/// Makes `trie` hold exactly `wanted`: new and changed entries first, then
/// the stale ones go, so a prefix that stays never misses.
fn write_exactly<K: aya::Pod + PartialEq, V: aya::Pod>(
    trie: &mut LpmTrie<MapData, K, V>,
    wanted: &[(Key<K>, V)],
) -> anyhow::Result<()> {
    for (k, v) in wanted {
        trie.insert(k, v, 0)?;
    }
    // Keys compared as (length, bytes): `main` may hold thousands.
    let bytes = |k: &Key<K>| {
        let data = k.data();
        // SAFETY: `K: Pod` is plain old data: every byte is initialised.
        let raw =
            unsafe { std::slice::from_raw_parts((&raw const data).cast::<u8>(), size_of::<K>()) };
        (k.prefix_len(), raw.to_vec())
    };
    let keep: std::collections::HashSet<_> = wanted.iter().map(|(k, _)| bytes(k)).collect();
    let stale: Vec<_> = trie
        .keys()
        .filter_map(Result::ok)
        .filter(|k| !keep.contains(&bytes(k)))
        .collect();
    for k in stale {
        trie.remove(&k)?;
    }
    Ok(())
}

/// Now on the clock of the maps' stamps ([`multihome_common::CLOCK`],
/// which `bpf_ktime_get_coarse_ns` reads), ns.
pub fn clock_ns() -> u64 {
    read_clock(libc::CLOCK_MONOTONIC_COARSE)
}

/// How far `CLOCK_BOOTTIME` (the stamps of layouts up to 7) is ahead of
/// the monotonic clocks: the time spent suspended since boot, ns.
pub fn boottime_lead_ns() -> u64 {
    read_clock(libc::CLOCK_BOOTTIME).saturating_sub(read_clock(libc::CLOCK_MONOTONIC))
}

fn read_clock(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime fills `ts`.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
