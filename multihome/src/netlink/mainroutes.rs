//! The kernel's IPv4 `main` table as `MAIN_ROUTES` mirrors it, so that a
//! new flow's "is it for an uplink?" is one LPM lookup, not a
//! `bpf_fib_lookup` (#16). What the mirror cannot state exactly it marks
//! [`ROUTE_ASK_FIB`], and the datapath asks the kernel for that prefix.
use std::collections::BTreeMap;

use multihome_common::{
    MAX_MAIN_ROUTES, MainRoute, ROUTE_ASK_FIB, ROUTE_CONNECTED, ROUTE_REJECT, ROUTE_VIA,
};
use rtnetlink::packet_route::{
    AddressFamily,
    route::{
        RouteAddress, RouteAttribute, RouteFlags, RouteMessage, RouteNextHop, RouteNextHopFlags,
        RouteType,
    },
};

use super::routing::{RT_TABLE_MAIN, route_table};
use crate::config::Prefix;

/// `main`'s IPv4 routes (from a dump of every table) as `MAIN_ROUTES`
/// entries: one per prefix. `uplinks`: the uplinks' device indexes, which
/// decide whether the nexthops of a multipath route agree. Err (why) when
/// the table has more prefixes than the map holds: new flows then take
/// `bpf_fib_lookup`.
pub fn mirror(
    routes: &[RouteMessage],
    uplinks: &[u32],
) -> Result<Vec<(Prefix, MainRoute)>, String> {
    // Prefix -> its routes' entries (the kernel keeps several for one
    // prefix apart by TOS and metric).
    let mut by_prefix: BTreeMap<(u32, u8), Vec<MainRoute>> = BTreeMap::new();
    for r in routes {
        if r.header.address_family != AddressFamily::Inet || route_table(r) != RT_TABLE_MAIN {
            continue;
        }
        // Cached clones are not routes of the table.
        if r.header.flags.contains(RouteFlags::Cloned) {
            continue;
        }
        let len = r.header.destination_prefix_length;
        let dst = r
            .attributes
            .iter()
            .find_map(|a| match a {
                RouteAttribute::Destination(RouteAddress::Inet(d)) => Some(*d),
                _ => None,
            })
            .unwrap_or(std::net::Ipv4Addr::UNSPECIFIED);
        let prefix = Prefix { addr: dst, len };
        let entry = if r.header.tos != 0 {
            ask_fib()
        } else {
            classify(r, uplinks)
        };
        by_prefix
            .entry((u32::from(prefix.network()), len))
            .or_default()
            .push(entry);
    }
    if by_prefix.len() > MAX_MAIN_ROUTES as usize {
        return Err(format!(
            "main holds {} IPv4 prefixes, more than the {MAX_MAIN_ROUTES} mirrored",
            by_prefix.len()
        ));
    }
    Ok(by_prefix
        .into_iter()
        .map(|((net, len), entries)| {
            // Several routes for one prefix: which one the kernel takes
            // depends on their metrics and liveness; unless they agree,
            // the kernel decides.
            let first = entries[0];
            let entry = if entries.iter().all(|e| *e == first) {
                first
            } else {
                ask_fib()
            };
            (
                Prefix {
                    addr: net.into(),
                    len,
                },
                entry,
            )
        })
        .collect())
}

fn ask_fib() -> MainRoute {
    MainRoute {
        ifindex: 0,
        kind: ROUTE_ASK_FIB,
    }
}

/// One route's entry. Attributes that change where or whether the kernel
/// forwards (encapsulation, nexthop objects, `via` another family, ...)
/// are not modelled.
fn classify(r: &RouteMessage, uplinks: &[u32]) -> MainRoute {
    match r.header.kind {
        RouteType::Unicast => {}
        RouteType::BlackHole | RouteType::Unreachable | RouteType::Prohibit => {
            return MainRoute {
                ifindex: 0,
                kind: ROUTE_REJECT,
            };
        }
        _ => return ask_fib(),
    }
    if r.header
        .flags
        .intersects(RouteFlags::Dead | RouteFlags::Linkdown)
    {
        return ask_fib();
    }
    let mut oif = None;
    let mut gateway = false;
    let mut multipath: Option<&[RouteNextHop]> = None;
    for a in &r.attributes {
        match a {
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::Gateway(_) => gateway = true,
            RouteAttribute::MultiPath(hops) => multipath = Some(hops),
            RouteAttribute::Destination(_)
            | RouteAttribute::Table(_)
            | RouteAttribute::Priority(_)
            | RouteAttribute::PrefSource(_)
            | RouteAttribute::Metrics(_)
            | RouteAttribute::CacheInfo(_)
            | RouteAttribute::Preference(_) => {}
            _ => return ask_fib(),
        }
    }
    if let Some(hops) = multipath {
        return classify_multipath(hops, uplinks);
    }
    match oif {
        Some(ifindex) if ifindex != 0 => MainRoute {
            ifindex,
            kind: if gateway { ROUTE_VIA } else { ROUTE_CONNECTED },
        },
        _ => ask_fib(),
    }
}

/// A multipath route: the kernel picks a nexthop by the flow's hash. The
/// datapath needs only whether it leads to an uplink, so nexthops that
/// all do (or all do not), each through a gateway and alive, are one
/// entry on the first's device.
fn classify_multipath(hops: &[RouteNextHop], uplinks: &[u32]) -> MainRoute {
    // Alive, and through a gateway (and nothing else).
    let usable = |h: &RouteNextHop| {
        h.interface_index != 0
            && !h
                .flags
                .intersects(RouteNextHopFlags::Dead | RouteNextHopFlags::Linkdown)
            && !h.attributes.is_empty()
            && h.attributes
                .iter()
                .all(|a| matches!(a, RouteAttribute::Gateway(_)))
    };
    let Some(first) = hops.first() else {
        return ask_fib();
    };
    let to_uplink = |h: &RouteNextHop| uplinks.contains(&h.interface_index);
    if !hops.iter().all(usable) || hops.iter().any(|h| to_uplink(h) != to_uplink(first)) {
        return ask_fib();
    }
    MainRoute {
        ifindex: first.interface_index,
        kind: ROUTE_VIA,
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use rtnetlink::packet_route::route::{RouteHeader, RouteProtocol, RouteScope};

    use super::*;

    fn route(dst: &str, len: u8, attrs: Vec<RouteAttribute>) -> RouteMessage {
        let mut m = RouteMessage::default();
        m.header = RouteHeader {
            address_family: AddressFamily::Inet,
            destination_prefix_length: len,
            table: RouteHeader::RT_TABLE_MAIN,
            protocol: RouteProtocol::Static,
            scope: RouteScope::Universe,
            kind: RouteType::Unicast,
            ..Default::default()
        };
        if len > 0 {
            let d: Ipv4Addr = dst.parse().expect("an IPv4 address");
            m.attributes
                .push(RouteAttribute::Destination(RouteAddress::Inet(d)));
        }
        m.attributes.extend(attrs);
        m
    }

    fn gw(a: &str) -> RouteAttribute {
        RouteAttribute::Gateway(RouteAddress::Inet(a.parse().expect("an IPv4 address")))
    }

    fn hop(ifindex: u32, via: &str) -> RouteNextHop {
        let mut h = RouteNextHop::default();
        h.interface_index = ifindex;
        h.attributes = vec![gw(via)];
        h
    }

    fn entry(m: &[(Prefix, MainRoute)], net: &str, len: u8) -> MainRoute {
        let addr: Ipv4Addr = net.parse().expect("an IPv4 address");
        m.iter()
            .find(|(p, _)| p.addr == addr && p.len == len)
            .map(|(_, e)| *e)
            .unwrap_or_else(|| panic!("no entry for {net}/{len} in {m:?}"))
    }

    const VIA: fn(u32) -> MainRoute = |ifindex| MainRoute {
        ifindex,
        kind: ROUTE_VIA,
    };

    #[test]
    fn connected_gatewayed_and_reject_routes_are_mirrored_as_such() {
        let mut reject = route("198.18.99.0", 24, vec![]);
        reject.header.kind = RouteType::Unreachable;
        let m = mirror(
            &[
                route("198.18.1.0", 24, vec![RouteAttribute::Oif(3)]),
                route(
                    "198.18.50.0",
                    24,
                    vec![RouteAttribute::Oif(4), gw("198.18.11.254")],
                ),
                reject,
            ],
            &[4, 5],
        )
        .expect("mirrored");
        assert_eq!(
            entry(&m, "198.18.1.0", 24),
            MainRoute {
                ifindex: 3,
                kind: ROUTE_CONNECTED
            }
        );
        assert_eq!(entry(&m, "198.18.50.0", 24), VIA(4));
        assert_eq!(entry(&m, "198.18.99.0", 24).kind, ROUTE_REJECT);
    }

    #[test]
    fn a_multipath_default_over_uplinks_is_one_entry_and_a_mixed_one_asks_the_kernel() {
        let over = |hops| route("0.0.0.0", 0, vec![RouteAttribute::MultiPath(hops)]);
        let uplinks = [4, 5];
        let both = mirror(
            &[over(vec![hop(4, "198.18.11.254"), hop(5, "198.18.22.254")])],
            &uplinks,
        )
        .expect("mirrored");
        assert_eq!(entry(&both, "0.0.0.0", 0), VIA(4));
        let mixed = mirror(
            &[over(vec![hop(4, "198.18.11.254"), hop(9, "198.18.9.1")])],
            &uplinks,
        )
        .expect("mirrored");
        assert_eq!(entry(&mixed, "0.0.0.0", 0).kind, ROUTE_ASK_FIB);
        let mut dead = hop(5, "198.18.22.254");
        dead.flags = RouteNextHopFlags::Dead;
        let with_dead =
            mirror(&[over(vec![hop(4, "198.18.11.254"), dead])], &uplinks).expect("mirrored");
        assert_eq!(entry(&with_dead, "0.0.0.0", 0).kind, ROUTE_ASK_FIB);
    }

    #[test]
    fn what_the_mirror_cannot_state_exactly_asks_the_kernel() {
        let mut tos = route(
            "198.18.60.0",
            24,
            vec![RouteAttribute::Oif(4), gw("198.18.11.254")],
        );
        tos.header.tos = 0x10;
        let nh_object = route("198.18.61.0", 24, vec![RouteAttribute::NhId(7)]);
        let mut linkdown = route("198.18.62.0", 24, vec![RouteAttribute::Oif(4)]);
        linkdown.header.flags = RouteFlags::Linkdown;
        let mut local = route("198.18.63.0", 24, vec![RouteAttribute::Oif(1)]);
        local.header.kind = RouteType::Local;
        // Two routes for one prefix (metrics 10 and 20) that differ.
        let a = route(
            "198.18.64.0",
            24,
            vec![
                RouteAttribute::Oif(4),
                gw("198.18.11.254"),
                RouteAttribute::Priority(10),
            ],
        );
        let b = route(
            "198.18.64.0",
            24,
            vec![
                RouteAttribute::Oif(9),
                gw("198.18.9.1"),
                RouteAttribute::Priority(20),
            ],
        );
        let m = mirror(&[tos, nh_object, linkdown, local, a, b], &[4]).expect("mirrored");
        for net in [
            "198.18.60.0",
            "198.18.61.0",
            "198.18.62.0",
            "198.18.63.0",
            "198.18.64.0",
        ] {
            assert_eq!(entry(&m, net, 24).kind, ROUTE_ASK_FIB, "{net}");
        }
    }

    #[test]
    fn other_tables_and_families_are_left_out_and_a_table_too_large_is_refused() {
        let mut other = route("198.18.70.0", 24, vec![RouteAttribute::Oif(4)]);
        other.header.table = 100;
        assert!(mirror(&[other], &[4]).expect("mirrored").is_empty());
        let many: Vec<_> = (0..=MAX_MAIN_ROUTES)
            .map(|i| {
                let a = Ipv4Addr::from(0xc612_0000 + (i << 8));
                route(&a.to_string(), 24, vec![RouteAttribute::Oif(4)])
            })
            .collect();
        assert!(
            mirror(&many, &[4])
                .expect_err("too many")
                .contains("more than")
        );
    }
}
