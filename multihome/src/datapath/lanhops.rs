//! The LAN hosts' next hops (`LAN_HOPS`, `LAN_HOPS6`): the daemon's copy
//! of the kernel's neighbour entries on the LAN interfaces, so that
//! established packets to a LAN host skip `bpf_fib_lookup`. Only hosts on
//! a LAN interface's own subnet (IPv4) or in the internal prefix (IPv6)
//! are kept: a host behind a LAN router is not a neighbour and takes the
//! lookup.
use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
};

use multihome_common::NextHop;

use crate::{config::Config, maps::Maps, netinfo::Interface};

/// Where a neighbour is: (device, address).
pub type Neighbours = HashMap<(u32, IpAddr), [u8; 6]>;

/// Host `addr` at `mac` behind LAN interface `iface`, if it is one to
/// keep: an Ethernet device that is up, the address on its subnet.
pub fn hop(config: &Config, iface: &Interface, addr: IpAddr, mac: [u8; 6]) -> Option<NextHop> {
    let own = iface.mac.filter(|_| iface.up)?;
    let on_link = match addr {
        IpAddr::V4(a) => iface.addrs.iter().any(|(net, len)| {
            let mask = u32::MAX.checked_shl(32 - u32::from(*len)).unwrap_or(0);
            *len > 0 && u32::from(a) & mask == u32::from(*net) & mask
        }),
        IpAddr::V6(a) => config.is_internal6(&crate::config::Prefix6 { addr: a, len: 128 }),
    };
    if !on_link {
        return None;
    }
    let mut m = [0u8; 12];
    m[..6].copy_from_slice(&mac);
    m[6..].copy_from_slice(&own);
    Some(NextHop {
        mac: m,
        ifindex: iface.index,
        mtu: iface.mtu,
        valid: 1,
    })
}

/// Every LAN host to keep, from the neighbours on `lan` (its interfaces).
pub fn hops(
    config: &Config,
    lan: &[&Interface],
    neighbours: &Neighbours,
) -> BTreeMap<IpAddr, NextHop> {
    neighbours
        .iter()
        .filter_map(|((index, addr), mac)| {
            let iface = lan.iter().find(|i| i.index == *index)?;
            Some((*addr, hop(config, iface, *addr, *mac)?))
        })
        .collect()
}

/// Makes the maps hold `want`, given that they hold `have`: changed entries
/// first, then the gone ones. Returns what they hold after (an entry that
/// failed to be written is left out, to be tried again).
pub fn write(
    maps: &Maps,
    have: &BTreeMap<IpAddr, NextHop>,
    want: BTreeMap<IpAddr, NextHop>,
) -> anyhow::Result<BTreeMap<IpAddr, NextHop>> {
    let mut held = want.clone();
    let mut failed = None;
    for (addr, h) in &want {
        if have.get(addr) != Some(h)
            && let Err(e) = maps.set_lan_hop(*addr, h)
        {
            held.remove(addr);
            failed = Some(e);
        }
    }
    for addr in have.keys().filter(|a| !want.contains_key(a)) {
        if let Err(e) = maps.remove_lan_hop(*addr) {
            held.insert(*addr, have[addr]);
            failed = Some(e);
        }
    }
    match failed {
        Some(e) => Err(e.context("writing the LAN hosts' next hops")),
        None => Ok(held),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lan(addrs: &[(&str, u8)], up: bool) -> Interface {
        Interface {
            index: 3,
            name: "lan0".into(),
            up,
            mtu: 1500,
            l3: false,
            mac: Some([2, 0, 0, 0, 0, 1]),
            addrs: addrs
                .iter()
                .map(|(a, l)| (a.parse().expect("address"), *l))
                .collect(),
        }
    }

    #[test]
    fn only_hosts_on_the_lans_own_subnet_or_internal_prefix_are_kept() {
        let c = Config::parse(
            "lan = [\"lan0\"]\nlan_prefixes6 = [\"fd00:1::/64\"]\n\
             [[uplink]]\nname = \"x\"\ninterface = \"wanx\"\n",
        )
        .expect("valid");
        let iface = lan(&[("198.18.1.1", 24)], true);
        let mac = [2, 0, 0, 0, 0, 9];
        let ip = |s: &str| s.parse::<IpAddr>().expect("address");
        let h = hop(&c, &iface, ip("198.18.1.7"), mac).expect("on the subnet");
        assert_eq!(
            (h.mac, h.ifindex, h.mtu, h.valid),
            ([2, 0, 0, 0, 0, 9, 2, 0, 0, 0, 0, 1], 3, 1500, 1)
        );
        assert!(hop(&c, &iface, ip("fd00:1::7"), mac).is_some());
        for off_link in ["198.18.2.7", "fd00:2::7", "fe80::7"] {
            assert!(hop(&c, &iface, ip(off_link), mac).is_none(), "{off_link}");
        }
        let down = lan(&[("198.18.1.1", 24)], false);
        assert!(
            hop(&c, &down, ip("198.18.1.7"), mac).is_none(),
            "a down LAN"
        );
        let neighbours: Neighbours = [
            ((3, ip("198.18.1.7")), mac),
            ((3, ip("198.18.9.9")), mac),
            ((4, ip("198.18.1.8")), mac),
        ]
        .into_iter()
        .collect();
        let kept = hops(&c, &[&iface], &neighbours);
        assert_eq!(kept.keys().collect::<Vec<_>>(), vec![&ip("198.18.1.7")]);
    }
}
