//! `multihome conns`: the connection map, filtered.
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use clap::Args;
use multihome_common::SelectTable;
use serde::Serialize;

use super::PinDir;
use crate::{
    flows::{self, Conn},
    maps::{self, Maps},
    uplinks::name_from_bytes,
};

#[derive(Args, Debug)]
pub struct ConnsArgs {
    #[command(flatten)]
    pub pin: PinDir,
    /// Machine-readable output: a JSON array of flows.
    #[arg(long)]
    pub json: bool,
    /// Only flows pinned to this uplink.
    #[arg(long, value_name = "NAME")]
    pub uplink: Option<String>,
    /// Only this protocol: tcp, udp or icmp.
    #[arg(long)]
    pub proto: Option<String>,
    /// Only flows from this LAN host (IPv4 or IPv6).
    #[arg(long)]
    pub src: Option<IpAddr>,
    /// Only flows to this remote host (IPv4 or IPv6).
    #[arg(long)]
    pub dst: Option<IpAddr>,
    /// List the affinity records of the sticky policies (source, site)
    /// and the endpoint records (endpoint) instead of flows.
    #[arg(long)]
    pub affinity: bool,
}

/// An affinity record, for `conns --affinity`.
#[derive(Debug, Serialize)]
pub struct AffinityRow {
    pub policy: String,
    pub src: Ipv4Addr,
    /// `site` policies: the destination site (its network address).
    pub site: Option<Ipv4Addr>,
    /// `endpoint` policies: the endpoint's protocol and LAN port, and the
    /// public port every remote sees it from.
    pub proto: Option<&'static str>,
    pub lan_port: Option<u16>,
    pub nat_port: Option<u16>,
    pub uplink: String,
    pub idle_s: u64,
    pub age_s: u64,
}

pub fn affinities(maps: &Maps) -> anyhow::Result<Vec<AffinityRow>> {
    let uplinks = maps.uplinks()?;
    let tables = maps.select_tables()?;
    let now = maps::clock_ns();
    let uplink_name = |id: u8| {
        uplinks
            .get(id as usize)
            .map(|u| name_from_bytes(&u.name))
            .unwrap_or_default()
    };
    let mut out: Vec<AffinityRow> = maps
        .affinities()?
        .iter()
        .map(|(k, a)| AffinityRow {
            policy: policy_name(&tables, k.policy),
            src: flows::be_addr(k.saddr_be),
            site: (k.site_be != 0).then(|| flows::be_addr(k.site_be)),
            proto: None,
            lan_port: None,
            nat_port: None,
            uplink: uplink_name(a.uplink),
            idle_s: now.saturating_sub(a.last_ns) / 1_000_000_000,
            age_s: (now / 1_000_000_000).saturating_sub(u64::from(a.created_s)),
        })
        .collect();
    out.extend(maps.endpoints()?.iter().map(|(k, e)| AffinityRow {
        policy: policy_name(&tables, k.policy),
        src: flows::be_addr(k.lan_addr_be),
        site: None,
        proto: Some(flows::proto_name(k.proto)),
        lan_port: Some(u16::from_be(k.lan_port_be)),
        nat_port: Some(u16::from_be(e.nat_port_be)),
        uplink: uplink_name(e.uplink),
        idle_s: now.saturating_sub(e.last_ns) / 1_000_000_000,
        age_s: (now / 1_000_000_000).saturating_sub(u64::from(e.created_s)),
    }));
    out.sort_by(|a, b| (&a.policy, a.src, a.site).cmp(&(&b.policy, b.src, b.site)));
    Ok(out)
}

fn policy_name(tables: &[SelectTable], id: u8) -> String {
    match tables.get(id as usize) {
        Some(t) if t.name[0] != 0 => t.name().to_string(),
        _ => crate::policy::BALANCED.into(),
    }
}

fn run_affinity(args: &ConnsArgs, maps: &Maps) -> anyhow::Result<()> {
    let rows: Vec<AffinityRow> = affinities(maps)?
        .into_iter()
        .filter(|r| args.uplink.as_ref().is_none_or(|u| &r.uplink == u))
        .filter(|r| args.src.is_none_or(|a| IpAddr::from(r.src) == a))
        .collect();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "{:<15} {:<26} {:<15} {:<8} {:>8} {:>7} {:>7}",
        "POLICY", "SOURCE", "SITE", "UPLINK", "NATPORT", "IDLE(s)", "AGE(s)"
    );
    for r in &rows {
        let src = match (r.proto, r.lan_port) {
            (Some(p), Some(port)) => format!("{p} {}:{port}", r.src),
            _ => r.src.to_string(),
        };
        println!(
            "{:<15} {:<26} {:<15} {:<8} {:>8} {:>7} {:>7}",
            r.policy,
            src,
            r.site.map_or("-".into(), |s| s.to_string()),
            r.uplink,
            r.nat_port.map_or("-".into(), |p| p.to_string()),
            r.idle_s,
            r.age_s
        );
    }
    println!("{} affinities", rows.len());
    Ok(())
}

pub fn list(maps: &Maps) -> anyhow::Result<Vec<Conn>> {
    let names: Vec<String> = maps
        .uplinks()?
        .iter()
        .map(|u| name_from_bytes(&u.name))
        .collect();
    let tables = maps.select_tables()?;
    let now = maps::clock_ns();
    let mut out: Vec<Conn> = maps
        .flows()?
        .iter()
        .map(|(k, f)| {
            let name = names.get(f.uplink as usize).cloned().unwrap_or_default();
            flows::describe(k, f, name, policy_name(&tables, f.policy), now)
        })
        .collect();
    let uplinks6 = maps.uplinks6()?;
    out.extend(maps.flows6()?.iter().map(|(k, f)| {
        let name = names.get(f.uplink as usize).cloned().unwrap_or_default();
        let entries = uplinks6
            .get(f.uplink as usize)
            .map_or(&[][..], |e| e.as_slice());
        flows::describe6(k, f, entries, name, policy_name(&tables, f.policy), now)
    }));
    out.sort_by_key(|c| (c.src, c.sport, c.dst, c.dport));
    Ok(out)
}

pub fn run(args: &ConnsArgs) -> anyhow::Result<()> {
    let maps = Maps::open(&args.pin.pin_dir)?;
    if args.affinity {
        return run_affinity(args, &maps);
    }
    let conns: Vec<Conn> = list(&maps)?
        .into_iter()
        .filter(|c| args.uplink.as_ref().is_none_or(|u| &c.uplink == u))
        .filter(|c| {
            args.proto
                .as_ref()
                .is_none_or(|p| c.proto.eq_ignore_ascii_case(p))
        })
        .filter(|c| args.src.is_none_or(|a| c.src == a))
        .filter(|c| args.dst.is_none_or(|a| c.dst == a))
        .collect();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&conns)?);
        return Ok(());
    }
    // IPv6 endpoints take wider columns.
    let w = if conns.iter().any(|c| c.src.is_ipv6()) {
        47
    } else {
        21
    };
    println!(
        "{:<6} {:<w$} {:<w$} {:<8} {:<w$} {:<11} {:>7} POLICY",
        "PROTO", "SOURCE", "DESTINATION", "UPLINK", "NAT", "STATE", "AGE(s)"
    );
    for c in &conns {
        println!(
            "{:<6} {:<w$} {:<w$} {:<8} {:<w$} {:<11} {:>7} {}",
            c.proto,
            SocketAddr::new(c.src, c.sport).to_string(),
            SocketAddr::new(c.dst, c.dport).to_string(),
            if c.failed_over {
                format!("{}*", c.uplink)
            } else {
                c.uplink.clone()
            },
            SocketAddr::new(c.nat_addr, c.nat_port).to_string(),
            c.state,
            c.age_s,
            c.policy
        );
    }
    let failed_over = conns.iter().filter(|c| c.failed_over).count();
    if failed_over > 0 {
        println!("{failed_over} failed over (*): made while their preferred uplink was not usable");
    }
    println!("{} flows", conns.len());
    Ok(())
}
