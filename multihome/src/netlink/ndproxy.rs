//! The NDP proxy for uplinks whose ISP has `prefix6` on-link rather than
//! routed to the gateway (`ndp_proxy = true`): the ISP's router then asks
//! for each mapped address by neighbour solicitation, and the kernel
//! answers for the addresses it holds proxy entries of (`proxy_ndp = 1`,
//! `ip -6 neigh add proxy ADDR dev UPLINK`). The entries follow the LAN
//! hosts the gateway knows: its IPv6 neighbours on the LAN interfaces and
//! the hosts with IPv6 flows, each mapped onto the uplink's prefix.
//! Entries inside the uplink's prefix are multihome's: the others are
//! never touched.
use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv6Addr},
};

use anyhow::Context as _;
use futures::TryStreamExt as _;
use log::info;
use multihome_common::{Uplink6, npt_translate};
use rtnetlink::{
    Handle,
    packet_route::{
        AddressFamily,
        neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourState},
    },
};

/// One uplink that proxies: its device and translations (one per
/// internal prefix).
pub struct ProxyUplink {
    pub ifindex: u32,
    pub entries: Vec<Uplink6>,
}

/// The entry of `entries` whose internal prefix covers `host`.
fn entry_of<'a>(entries: &'a [Uplink6], host: &[u8; 16]) -> Option<&'a Uplink6> {
    entries.iter().find(|u6| u6.covers(host, true))
}

/// Whether `a` lies in one of `entries`' outer prefixes.
fn outer(entries: &[Uplink6], a: &Ipv6Addr) -> bool {
    entries.iter().any(|u6| u6.covers(&a.octets(), false))
}

/// The IPv6 addresses inside `entries`' internal prefixes among the
/// neighbours on `lan` devices (any state but failed).
pub async fn lan_hosts(
    handle: &Handle,
    lan: &[u32],
    entries: &[Uplink6],
) -> anyhow::Result<BTreeSet<[u8; 16]>> {
    let mut hosts = BTreeSet::new();
    let mut dump = handle
        .neighbours()
        .get()
        .set_address_family(AddressFamily::Inet6)
        .execute();
    while let Some(msg) = dump.try_next().await.context("listing IPv6 neighbours")? {
        if !lan.contains(&msg.header.ifindex) || msg.header.state == NeighbourState::Failed {
            continue;
        }
        for a in &msg.attributes {
            if let NeighbourAttribute::Destination(NeighbourAddress::Inet6(v)) = a
                && entry_of(entries, &v.octets()).is_some()
            {
                hosts.insert(v.octets());
            }
        }
    }
    Ok(hosts)
}

/// Makes each proxying uplink hold exactly the proxy entries of `hosts`
/// (internal addresses) mapped onto its prefix; removes multihome's
/// entries from devices that no longer proxy (`gone`).
pub async fn sync(
    handle: &Handle,
    uplinks: &[ProxyUplink],
    gone: &[(u32, Vec<Uplink6>)],
    hosts: &BTreeSet<[u8; 16]>,
) -> anyhow::Result<()> {
    let have = proxies(handle).await?;
    for u in uplinks {
        let want: BTreeSet<Ipv6Addr> = hosts
            .iter()
            .filter_map(|h| {
                let u6 = entry_of(&u.entries, h)?;
                npt_translate(h, &u6.outer, u6.prefix_len, u6.adjust)
            })
            .map(Ipv6Addr::from)
            .collect();
        for a in want.iter().filter(|a| !have.contains(&(u.ifindex, **a))) {
            handle
                .neighbours()
                .add(u.ifindex, IpAddr::V6(*a))
                .flags(NeighbourFlags::Proxy)
                .replace()
                .execute()
                .await
                .with_context(|| format!("adding the NDP proxy entry {a}"))?;
            info!("answering neighbour solicitations for {a} (NDP proxy)");
        }
        let stale = have
            .iter()
            .filter(|(i, a)| *i == u.ifindex && outer(&u.entries, a));
        for (i, a) in stale.filter(|(_, a)| !want.contains(a)) {
            del(handle, *i, *a).await?;
        }
    }
    for (ifindex, entries) in gone {
        for (i, a) in &have {
            if i == ifindex && outer(entries, a) {
                del(handle, *i, *a).await?;
            }
        }
    }
    Ok(())
}

/// Every IPv6 proxy entry: (device, address).
async fn proxies(handle: &Handle) -> anyhow::Result<BTreeSet<(u32, Ipv6Addr)>> {
    let mut found = BTreeSet::new();
    let mut dump = handle
        .neighbours()
        .get()
        .proxies()
        .set_address_family(AddressFamily::Inet6)
        .execute();
    while let Some(msg) = dump.try_next().await.context("listing NDP proxy entries")? {
        for a in &msg.attributes {
            if let NeighbourAttribute::Destination(NeighbourAddress::Inet6(v)) = a {
                found.insert((msg.header.ifindex, *v));
            }
        }
    }
    Ok(found)
}

async fn del(handle: &Handle, ifindex: u32, addr: Ipv6Addr) -> anyhow::Result<()> {
    let mut req = handle.neighbours().add(ifindex, IpAddr::V6(addr));
    req = req.flags(NeighbourFlags::Proxy);
    let msg = req.message_mut().clone();
    handle
        .neighbours()
        .del(msg)
        .execute()
        .await
        .with_context(|| format!("removing the NDP proxy entry {addr}"))?;
    info!("no longer answering for {addr} (NDP proxy)");
    Ok(())
}
