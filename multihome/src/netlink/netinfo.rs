//! What the kernel says about interfaces: index, state, MTU, device kind,
//! MAC and IPv4 addresses, and the neighbours behind them, read over
//! rtnetlink.
use std::{collections::HashMap, net::Ipv4Addr};

use anyhow::Context as _;
use futures::TryStreamExt as _;
use rtnetlink::packet_route::{
    address::{AddressAttribute, AddressHeaderFlags},
    link::{LinkAttribute, LinkFlags, LinkLayerType},
    neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourState},
};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interface {
    pub index: u32,
    pub name: String,
    /// Administratively up with carrier.
    pub up: bool,
    pub mtu: u32,
    /// No Ethernet header (ppp, tun).
    pub l3: bool,
    /// The device's own MAC; None on L3 devices.
    pub mac: Option<[u8; 6]>,
    /// Local IPv4 addresses with prefix length, primary first. On
    /// point-to-point links this is the local end, never the peer.
    pub addrs: Vec<(Ipv4Addr, u8)>,
}

pub type Snapshot = HashMap<String, Interface>;

/// Every interface of this network namespace.
pub async fn snapshot(handle: &rtnetlink::Handle) -> anyhow::Result<Snapshot> {
    let mut by_index = HashMap::new();
    let mut links = handle.link().get().execute();
    while let Some(msg) = links.try_next().await.context("listing interfaces")? {
        let mut name = String::new();
        let mut mtu = 0;
        let mut mac = None;
        for a in &msg.attributes {
            match a {
                LinkAttribute::IfName(n) => name = n.clone(),
                LinkAttribute::Mtu(m) => mtu = *m,
                LinkAttribute::Address(a) => mac = <[u8; 6]>::try_from(a.as_slice()).ok(),
                _ => {}
            }
        }
        let l3 = msg.header.link_layer_type != LinkLayerType::Ether;
        let f = msg.header.flags;
        by_index.insert(
            msg.header.index,
            Interface {
                index: msg.header.index,
                name,
                up: f.contains(LinkFlags::Up) && f.contains(LinkFlags::LowerUp),
                mtu,
                l3,
                mac: mac.filter(|_| !l3),
                addrs: Vec::new(),
            },
        );
    }
    let mut addrs = handle.address().get().execute();
    let mut secondary = Vec::new();
    while let Some(msg) = addrs.try_next().await.context("listing addresses")? {
        let mut local = None;
        let mut address = None;
        for a in &msg.attributes {
            match a {
                AddressAttribute::Local(std::net::IpAddr::V4(v)) => local = Some(*v),
                AddressAttribute::Address(std::net::IpAddr::V4(v)) => address = Some(*v),
                _ => {}
            }
        }
        let Some(addr) = local.or(address) else {
            continue;
        };
        let entry = (msg.header.index, addr, msg.header.prefix_len);
        if msg.header.flags.contains(AddressHeaderFlags::Secondary) {
            secondary.push(entry);
        } else if let Some(i) = by_index.get_mut(&msg.header.index) {
            i.addrs.push((addr, msg.header.prefix_len));
        }
    }
    for (index, addr, len) in secondary {
        if let Some(i) = by_index.get_mut(&index) {
            i.addrs.push((addr, len));
        }
    }
    Ok(by_index
        .into_values()
        .map(|i| (i.name.clone(), i))
        .collect())
}

/// Neighbours (IPv4 and IPv6) on the devices `ifindexes` whose link-layer address the
/// kernel would use to forward (`NUD_VALID`: reachable, stale, delay,
/// probe, permanent, noarp): (device, address) -> MAC.
pub async fn neighbours(
    handle: &rtnetlink::Handle,
    ifindexes: &[u32],
) -> anyhow::Result<HashMap<(u32, std::net::IpAddr), [u8; 6]>> {
    let mut found = HashMap::new();
    // Both families in one dump.
    let mut dump = handle.neighbours().get().execute();
    while let Some(msg) = dump.try_next().await.context("listing neighbours")? {
        if !ifindexes.contains(&msg.header.ifindex) {
            continue;
        }
        if let Some((addr, Some(mac))) = neighbour_of(&msg) {
            found.insert((msg.header.ifindex, addr), mac);
        }
    }
    Ok(found)
}

/// A neighbour message's address, and its MAC while the kernel would
/// forward to it (`NUD_VALID`; None otherwise).
pub fn neighbour_of(
    msg: &rtnetlink::packet_route::neighbour::NeighbourMessage,
) -> Option<(std::net::IpAddr, Option<[u8; 6]>)> {
    let mut addr = None;
    let mut mac = None;
    for a in &msg.attributes {
        match a {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(v)) => {
                addr = Some(std::net::IpAddr::V4(*v))
            }
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(v)) => {
                addr = Some(std::net::IpAddr::V6(*v))
            }
            NeighbourAttribute::LinkLayerAddress(l) => mac = <[u8; 6]>::try_from(l.as_slice()).ok(),
            _ => {}
        }
    }
    Some((addr?, mac.filter(|_| usable(msg.header.state))))
}

/// Whether `bpf_fib_lookup` forwards to a neighbour in this state
/// (`NUD_VALID`, include/net/neighbour.h).
fn usable(state: NeighbourState) -> bool {
    matches!(
        state,
        NeighbourState::Reachable
            | NeighbourState::Stale
            | NeighbourState::Delay
            | NeighbourState::Probe
            | NeighbourState::Permanent
            | NeighbourState::Noarp
    )
}

/// `ifname`'s index in this network namespace (`if_nametoindex`).
pub fn index_of(ifname: &str) -> Option<u32> {
    let c = std::ffi::CString::new(ifname).ok()?;
    // SAFETY: a NUL-terminated name.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (i != 0).then_some(i)
}
