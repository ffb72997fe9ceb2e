//! Learning an uplink's `prefix6` from the prefix its ISP delegated
//! (DHCPv6-PD, RFC 8415 §6.3), through what the client installs:
//!
//! - dhcpcd adds an `unreachable` route for the whole delegated prefix
//!   (`unreachable 2001:db8:f0::/56 dev lo proto dhcp`), so that parts of
//!   it not given to an interface are not routed back to the ISP;
//! - other clients (odhcp6c, systemd-networkd) assign addresses from it
//!   to downstream interfaces: the address's prefix counts then.
//!
//! Neither says which uplink the prefix came from (dhcpcd's route is on
//! `lo`): a lone learning uplink takes any delegation, several tell theirs
//! apart by their ISPs' blocks (`pd_pool6`). The LAN is mapped onto one
//! subnet of the delegation, as long as `lan_prefixes6` (`pd_subnet6`).
use std::net::{IpAddr, Ipv6Addr};

use anyhow::Context as _;
use futures::TryStreamExt as _;
use rtnetlink::{
    Handle,
    packet_route::{
        AddressFamily,
        address::{AddressAttribute, AddressFlags},
        route::{RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteType},
    },
};

use crate::config::{Config, Learned6, MAX_NPT_PREFIX, Prefix6};

/// Where a delegation was seen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seen {
    /// A reject route (unreachable, blackhole, prohibit) a client
    /// installed for it.
    Route,
    /// An address from it on an interface that is not an uplink.
    Address,
}

/// A prefix the kernel shows as delegated to the gateway.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Delegation {
    pub prefix: Prefix6,
    pub seen: Seen,
}

/// Whether a prefix can be a delegated one: global unicast (2000::/3, so
/// no ULA, link-local or multicast) and /1 to /64.
fn delegable(p: &Prefix6) -> bool {
    (1..=MAX_NPT_PREFIX).contains(&p.len) && p.addr.segments()[0] & 0xe000 == 0x2000
}

/// The delegations among the routes and addresses of the kernel: reject
/// routes a DHCP client installed (`proto dhcp`; one added by hand is
/// `proto boot`), and prefixes of addresses with a lifetime (a lease's;
/// a configured one is permanent) on interfaces other than
/// `uplink_ifindexes` (an uplink's own addresses come from its ISP's
/// link, not from a delegation). An address inside a route's prefix is
/// the same delegation and is left out. Sorted, each once.
pub fn delegations(
    routes: &[RouteMessage],
    addresses: &[(u32, Prefix6, AddressFlags)],
    uplink_ifindexes: &[u32],
) -> Vec<Delegation> {
    let mut out: Vec<Delegation> = routes
        .iter()
        .filter(|m| {
            m.header.address_family == AddressFamily::Inet6
                && matches!(
                    m.header.kind,
                    RouteType::Unreachable | RouteType::BlackHole | RouteType::Prohibit
                )
                && m.header.protocol == RouteProtocol::Dhcp
        })
        .filter_map(|m| {
            let addr = m.attributes.iter().find_map(|a| match a {
                RouteAttribute::Destination(RouteAddress::Inet6(d)) => Some(*d),
                _ => None,
            })?;
            Some(Prefix6 {
                addr,
                len: m.header.destination_prefix_length,
            })
        })
        .filter(delegable)
        .map(|p| Delegation {
            prefix: network(p),
            seen: Seen::Route,
        })
        .collect();
    let from_routes: Vec<Prefix6> = out.iter().map(|d| d.prefix).collect();
    out.extend(
        addresses
            .iter()
            .filter(|(i, p, f)| {
                !uplink_ifindexes.contains(i)
                    && !f.intersects(
                        AddressFlags::Permanent
                            | AddressFlags::Deprecated
                            | AddressFlags::Dadfailed,
                    )
                    && delegable(p)
                    && !from_routes.iter().any(|r| r.covers(p))
            })
            .map(|(_, p, _)| Delegation {
                prefix: network(*p),
                seen: Seen::Address,
            }),
    );
    out.sort_by_key(|d| (u128::from(d.prefix.addr), d.prefix.len));
    out.dedup_by_key(|d| d.prefix);
    out
}

/// The ULA prefixes (fc00::/7, /1 to /64) of the addresses on the LAN
/// interfaces `lan_ifindexes`: the internal prefixes when
/// `lan_prefixes6` is not set. A global prefix on the LAN is routed
/// natively and is not one. Sorted, each once.
pub fn lan_ula(addresses: &[(u32, Prefix6, AddressFlags)], lan_ifindexes: &[u32]) -> Vec<Prefix6> {
    let mut out: Vec<Prefix6> = addresses
        .iter()
        .filter(|(i, p, f)| {
            lan_ifindexes.contains(i)
                && !f.intersects(AddressFlags::Deprecated | AddressFlags::Dadfailed)
                && (1..=MAX_NPT_PREFIX).contains(&p.len)
                && p.addr.segments()[0] & 0xfe00 == 0xfc00
        })
        .map(|(_, p, _)| network(*p))
        .collect();
    out.sort_by_key(|p| (u128::from(p.addr), p.len));
    out.dedup();
    out
}

/// The global unicast addresses (2000::/3) on the uplink interface
/// `ifindex`, as /128s: what NAT66 may translate onto. Deprecated,
/// tentative and failed ones are not. Sorted.
pub fn uplink_addresses(
    addresses: &[(u32, Prefix6, AddressFlags)],
    ifindex: Option<u32>,
) -> Vec<Prefix6> {
    let mut out: Vec<Prefix6> = addresses
        .iter()
        .filter(|(i, p, f)| {
            Some(*i) == ifindex
                && !f.intersects(
                    AddressFlags::Deprecated | AddressFlags::Tentative | AddressFlags::Dadfailed,
                )
                && p.addr.segments()[0] & 0xe000 == 0x2000
        })
        .map(|(_, p, _)| Prefix6 {
            addr: p.addr,
            len: 128,
        })
        .collect();
    out.sort_by_key(|p| u128::from(p.addr));
    out.dedup();
    out
}

fn network(p: Prefix6) -> Prefix6 {
    Prefix6 {
        addr: p.network(),
        len: p.len,
    }
}

/// Which delegation each uplink learns from (None for uplinks that do
/// not learn, or have none). A delegation that overlaps the LAN's
/// prefix, a configured `prefix6` or an IPv6 `routed_prefixes` entry is
/// nobody's. An uplink with `pd_pool6`
/// takes one inside it; the one learning uplink without takes one inside
/// no other learner's pool. An uplink keeps the delegation it has while
/// it lasts, else takes the lowest.
pub fn assign(config: &Config, found: &[Delegation]) -> Vec<Option<Prefix6>> {
    let n = config.uplinks.len();
    let learners: Vec<usize> = (0..n).filter(|id| config.learns_prefix6(*id)).collect();
    let taken: Vec<Prefix6> = (0..n)
        .filter(|id| !config.learns_prefix6(*id))
        .filter_map(|id| config.npt_prefix(id))
        .chain(config.internal6().into_iter().map(|(_, p)| p))
        .chain(config.routed_prefixes6().into_iter().map(|(_, p)| p))
        .collect();
    let pools: Vec<Prefix6> = learners
        .iter()
        .filter_map(|id| config.pd_pool6(*id))
        .collect();
    let mut out = vec![None; n];
    // Several without a pool cannot be told apart (`check` refuses a file
    // that says so; a learned internal prefix can make it so at run time).
    let unpooled = learners
        .iter()
        .filter(|id| config.pd_pool6(**id).is_none())
        .count();
    for id in learners {
        if unpooled > 1 && config.pd_pool6(id).is_none() {
            continue;
        }
        let mine = |p: &Prefix6| match config.pd_pool6(id) {
            Some(pool) => pool.covers(p),
            None => !pools.iter().any(|q| q.covers(p)),
        };
        let candidates: Vec<Prefix6> = found
            .iter()
            .map(|d| d.prefix)
            .filter(|p| !taken.iter().any(|t| t.overlaps(p)) && mine(p))
            .collect();
        let current = config.uplinks[id].learned6.map(|l| l.delegated);
        out[id] = current
            .filter(|c| candidates.contains(c))
            .or_else(|| candidates.first().copied());
    }
    out
}

/// What uplink `id` maps onto from `delegated`: each internal prefix
/// onto a subnet as long as itself, from its `pd_subnet6` on (the first
/// is `npt`). Errors say why the delegation cannot hold them all.
pub fn learned(config: &Config, id: usize, delegated: Prefix6) -> Result<Learned6, String> {
    let inner = config.internal6();
    let (_, lan) = inner.first().ok_or("no `lan_prefixes6` to map from")?;
    let base = config.uplinks[id].pd_subnet6.unwrap_or(0);
    let last = inner.iter().map(|(s, _)| *s).max().unwrap_or(0);
    let subnet = |s: u64| {
        delegated.subnet(lan.len, base + s).map_err(|e| {
            format!("the LAN's prefixes are each mapped onto a subnet as long as {lan}, and {e}")
        })
    };
    subnet(last)?;
    Ok(Learned6 {
        delegated,
        npt: subnet(inner[0].0)?,
    })
}

/// Every IPv6 address with its device and flags.
pub async fn addresses(handle: &Handle) -> anyhow::Result<Vec<(u32, Prefix6, AddressFlags)>> {
    let mut addresses = Vec::new();
    let mut get = handle.address().get();
    get.message_mut().header.family = AddressFamily::Inet6;
    let mut dump = get.execute();
    while let Some(msg) = dump.try_next().await.context("listing IPv6 addresses")? {
        let mut addr: Option<Ipv6Addr> = None;
        let mut flags = AddressFlags::empty();
        for a in msg.attributes {
            match a {
                AddressAttribute::Address(IpAddr::V6(v)) => addr = Some(v),
                AddressAttribute::Flags(f) => flags = f,
                _ => {}
            }
        }
        if let Some(addr) = addr {
            let len = msg.header.prefix_len;
            addresses.push((msg.header.index, Prefix6 { addr, len }, flags));
        }
    }
    Ok(addresses)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netlink::routing::PROTO_MULTIHOME;
    use rtnetlink::RouteMessageBuilder;

    fn p(s: &str) -> Prefix6 {
        s.parse().expect("prefix")
    }

    fn reject(prefix: &str, kind: RouteType, proto: RouteProtocol) -> RouteMessage {
        let q = p(prefix);
        let mut m = RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(q.addr, q.len)
            .protocol(proto)
            .build();
        m.header.kind = kind;
        m
    }

    fn config(extra: &str, x: &str, y: &str) -> Config {
        Config::parse(&format!(
            "lan = [\"lan0\"]\nlan_prefixes6 = [\"fd00:1::/64\"]\n{extra}\
             [[uplink]]\nname = \"x\"\ninterface = \"wanx\"\n{x}\n\
             [[uplink]]\nname = \"y\"\ninterface = \"wany\"\n{y}\n"
        ))
        .expect("valid config")
    }

    fn found(prefixes: &[&str]) -> Vec<Delegation> {
        prefixes
            .iter()
            .map(|s| Delegation {
                prefix: p(s),
                seen: Seen::Route,
            })
            .collect()
    }

    #[test]
    fn dhcpcds_unreachable_route_and_a_downstream_address_are_delegations() {
        let routes = [
            reject(
                "2001:db8:f0::/56",
                RouteType::Unreachable,
                RouteProtocol::Dhcp,
            ),
            // A ULA's reject route (OpenWrt installs one), a unicast
            // route, one added by hand and our own are not.
            reject("fd00:1::/48", RouteType::Unreachable, RouteProtocol::Dhcp),
            reject("2001:db8:a::/48", RouteType::Unicast, RouteProtocol::Dhcp),
            reject(
                "2001:db8:b::/48",
                RouteType::Unreachable,
                RouteProtocol::Boot,
            ),
            reject(
                "2001:db8:c::/48",
                RouteType::Prohibit,
                RouteProtocol::Other(PROTO_MULTIHOME),
            ),
        ];
        let none = AddressFlags::empty();
        let addresses = [
            // Inside the route: the same delegation.
            (3, p("2001:db8:f0:1::1/64"), none),
            // Another client's, on a LAN interface.
            (3, p("2001:db8:e0:5::1/64"), none),
            // An uplink's own, a configured (permanent) one, a /128, a
            // deprecated one and a ULA: not.
            (2, p("2001:db8:d0::1/64"), none),
            (3, p("2001:db8:d3::1/64"), AddressFlags::Permanent),
            (3, p("2001:db8:d1::1/128"), none),
            (3, p("2001:db8:d2::1/64"), AddressFlags::Deprecated),
            (3, p("fd00:1::1/64"), none),
        ];
        assert_eq!(
            delegations(&routes, &addresses, &[2]),
            vec![
                Delegation {
                    prefix: p("2001:db8:e0:5::/64"),
                    seen: Seen::Address
                },
                Delegation {
                    prefix: p("2001:db8:f0::/56"),
                    seen: Seen::Route
                },
            ]
        );
    }

    #[test]
    fn a_lone_learner_takes_a_delegation_that_no_configured_prefix_overlaps() {
        let c = config(
            "",
            "",
            "prefix6 = \"2001:db8:22:100::/64\"\nrouted_prefixes = [\"2001:db8:33::/48\"]",
        );
        let got = assign(
            &c,
            &found(&["2001:db8:22::/48", "2001:db8:33::/56", "2001:db8:f0::/56"]),
        );
        assert_eq!(got, vec![Some(p("2001:db8:f0::/56")), None]);
    }

    #[test]
    fn the_lans_ula_is_the_internal_prefix_and_a_global_one_is_not() {
        let none = AddressFlags::empty();
        let addresses = [
            (3, p("fd00:1::1/64"), none),
            (3, p("2001:db8:e0:5::1/64"), none),
            (3, p("fe80::1/64"), AddressFlags::Permanent),
            (4, p("fd00:2::1/64"), none),
            (3, p("fd00:3::1/128"), none),
            (2, p("fd00:9::1/64"), none),
        ];
        assert_eq!(
            lan_ula(&addresses, &[3, 4]),
            vec![p("fd00:1::/64"), p("fd00:2::/64")]
        );
    }

    #[test]
    fn nat66_takes_the_uplinks_global_addresses_not_its_link_local_or_deprecated_ones() {
        let none = AddressFlags::empty();
        let addresses = [
            (2, p("2001:db8:22::1/64"), none),
            (2, p("2001:db8:22::100/128"), none),
            (2, p("fe80::1/64"), AddressFlags::Permanent),
            (2, p("2001:db8:22::7/64"), AddressFlags::Deprecated),
            (2, p("2001:db8:22::8/64"), AddressFlags::Tentative),
            (3, p("2001:db8:33::1/64"), none),
        ];
        assert_eq!(
            uplink_addresses(&addresses, Some(2)),
            vec![p("2001:db8:22::1/128"), p("2001:db8:22::100/128")]
        );
        assert_eq!(uplink_addresses(&addresses, None), vec![]);
    }

    #[test]
    fn learners_tell_their_delegations_apart_by_pd_pool6() {
        let c = config(
            "",
            "pd_pool6 = \"2001:db8:1000::/36\"",
            "pd_pool6 = \"2001:db8:2000::/36\"",
        );
        let got = assign(&c, &found(&["2001:db8:2f00::/56", "2001:db8:1f00::/56"]));
        assert_eq!(
            got,
            vec![Some(p("2001:db8:1f00::/56")), Some(p("2001:db8:2f00::/56"))]
        );
        // Outside both pools: nobody's.
        assert_eq!(
            assign(&c, &found(&["2001:db8:3f00::/56"])),
            vec![None, None]
        );
        // One pooled, one not: the other takes what is outside the pool.
        let c = config("", "pd_pool6 = \"2001:db8:1000::/36\"", "");
        let got = assign(&c, &found(&["2001:db8:1f00::/56", "2001:db8:3f00::/56"]));
        assert_eq!(
            got,
            vec![Some(p("2001:db8:1f00::/56")), Some(p("2001:db8:3f00::/56"))]
        );
    }

    #[test]
    fn an_uplink_keeps_its_delegation_while_it_lasts_then_takes_the_lowest() {
        let mut c = config("", "", "mode6 = \"off\"");
        c.uplinks[0].learned6 = Some(learned(&c, 0, p("2001:db8:f1::/56")).expect("fits"));
        let both = found(&["2001:db8:f0::/56", "2001:db8:f1::/56"]);
        assert_eq!(assign(&c, &both)[0], Some(p("2001:db8:f1::/56")));
        let gone = found(&["2001:db8:f0::/56", "2001:db8:f2::/56"]);
        assert_eq!(assign(&c, &gone)[0], Some(p("2001:db8:f0::/56")));
        assert_eq!(assign(&c, &[])[0], None);
    }

    #[test]
    fn the_lan_maps_onto_pd_subnet6_of_the_delegation_if_it_fits() {
        let c = config("", "pd_subnet6 = 3", "mode6 = \"off\"");
        let got = learned(&c, 0, p("2001:db8:f0::/56")).expect("fits");
        assert_eq!(got.npt, p("2001:db8:f0:3::/64"));
        assert_eq!(got.delegated, p("2001:db8:f0::/56"));
        let c = config("", "pd_subnet6 = 256", "mode6 = \"off\"");
        let err = learned(&c, 0, p("2001:db8:f0::/56")).expect_err("past the /56");
        assert!(err.contains("256 subnets"), "{err}");
        // A delegation longer than the LAN's prefix cannot hold it.
        let c = config("", "", "mode6 = \"off\"");
        let err = learned(&c, 0, p("2001:db8:f0::/80")).expect_err("too long");
        assert!(err.contains("does not fit"), "{err}");
    }

    #[test]
    fn several_internal_prefixes_map_onto_consecutive_subnets_from_pd_subnet6() {
        let two = |x: &str| {
            let text = format!(
                "lan = [\"lan0\", \"lan1\"]\nlan_prefixes6 = [\"fd00:1::/64\", \"fd00:9::/64\"]\n\
                 [[uplink]]\nname = \"x\"\ninterface = \"wanx\"\n{x}\n"
            );
            Config::parse(&text).expect("valid config")
        };
        let mut c = two("pd_subnet6 = 3");
        let got = learned(&c, 0, p("2001:db8:f0::/56")).expect("fits");
        assert_eq!(got.npt, p("2001:db8:f0:3::/64"));
        c.uplinks[0].learned6 = Some(got);
        assert_eq!(
            c.npt_pairs_text(0),
            [
                "fd00:1::/64 2001:db8:f0:3::/64",
                "fd00:9::/64 2001:db8:f0:4::/64"
            ]
        );
        // A /63 holds subnets 0 and 1: from 1 on, the second is past it.
        let err = learned(&two("pd_subnet6 = 1"), 0, p("2001:db8:f0::/63")).expect_err("past");
        assert!(err.contains("subnet 2 is past them"), "{err}");
        assert!(learned(&two(""), 0, p("2001:db8:f0::/63")).is_ok());
    }
}
