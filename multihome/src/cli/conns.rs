//! `multihome conns`: the connection map, filtered.
use std::net::Ipv4Addr;

use clap::Args;

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
    /// Only flows from this LAN host.
    #[arg(long)]
    pub src: Option<Ipv4Addr>,
    /// Only flows to this remote host.
    #[arg(long)]
    pub dst: Option<Ipv4Addr>,
}

pub fn list(maps: &Maps) -> anyhow::Result<Vec<Conn>> {
    let names: Vec<String> = maps
        .uplinks()?
        .iter()
        .map(|u| name_from_bytes(&u.name))
        .collect();
    let now = maps::boot_ns();
    let mut out: Vec<Conn> = maps
        .flows()?
        .iter()
        .map(|(k, f)| {
            let name = names.get(f.uplink as usize).cloned().unwrap_or_default();
            flows::describe(k, f, name, now)
        })
        .collect();
    out.sort_by_key(|c| (c.src, c.sport, c.dst, c.dport));
    Ok(out)
}

pub fn run(args: &ConnsArgs) -> anyhow::Result<()> {
    let maps = Maps::open(&args.pin.pin_dir)?;
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
    println!(
        "{:<5} {:<21} {:<21} {:<8} {:<21} {:<11} {:>7}",
        "PROTO", "SOURCE", "DESTINATION", "UPLINK", "NAT", "STATE", "AGE(s)"
    );
    for c in &conns {
        println!(
            "{:<5} {:<21} {:<21} {:<8} {:<21} {:<11} {:>7}",
            c.proto,
            format!("{}:{}", c.src, c.sport),
            format!("{}:{}", c.dst, c.dport),
            if c.failed_over {
                format!("{}*", c.uplink)
            } else {
                c.uplink.clone()
            },
            format!("{}:{}", c.nat_addr, c.nat_port),
            c.state,
            c.age_s
        );
    }
    let failed_over = conns.iter().filter(|c| c.failed_over).count();
    if failed_over > 0 {
        println!("{failed_over} failed over (*): made while their preferred uplink was not usable");
    }
    println!("{} flows", conns.len());
    Ok(())
}
