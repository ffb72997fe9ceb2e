//! What the kernel says about interfaces: index, state, MTU, device kind
//! and IPv4 addresses, read over rtnetlink.
use std::{collections::HashMap, net::Ipv4Addr};

use anyhow::Context as _;
use futures::TryStreamExt as _;
use rtnetlink::packet_route::{
    address::{AddressAttribute, AddressHeaderFlags},
    link::{LinkAttribute, LinkFlags, LinkLayerType},
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
        for a in &msg.attributes {
            match a {
                LinkAttribute::IfName(n) => name = n.clone(),
                LinkAttribute::Mtu(m) => mtu = *m,
                _ => {}
            }
        }
        let f = msg.header.flags;
        by_index.insert(
            msg.header.index,
            Interface {
                index: msg.header.index,
                name,
                up: f.contains(LinkFlags::Up) && f.contains(LinkFlags::LowerUp),
                mtu,
                l3: msg.header.link_layer_type != LinkLayerType::Ether,
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
