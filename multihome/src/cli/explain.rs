//! `multihome explain`: asks the daemon, which holds the policy model,
//! and renders its answer.
use std::net::IpAddr;

use clap::Args;

use super::PinDir;
use crate::{
    control,
    policy::{
        ProtoSpec,
        explain::{Explanation, Query},
    },
};

#[derive(Args, Debug)]
pub struct ExplainArgs {
    /// The LAN host: IPv4, or IPv6 (its internal address).
    #[arg(long)]
    pub src: IpAddr,
    /// Its source port (or echo id); needed to name a per-connection choice.
    #[arg(long)]
    pub sport: Option<u16>,
    /// The remote host, of the same family as --src.
    #[arg(long)]
    pub dst: IpAddr,
    /// tcp, udp, icmp or a protocol number.
    #[arg(long, default_value = "tcp")]
    pub proto: String,
    /// Destination port (TCP and UDP).
    #[arg(long, default_value_t = 0)]
    pub dport: u16,
    /// DSCP, 0 to 63.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..64))]
    pub dscp: u8,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub pin: PinDir,
}

pub fn run(args: &ExplainArgs) -> anyhow::Result<()> {
    let proto = ProtoSpec::Name(args.proto.clone())
        .number()
        .map_err(anyhow::Error::msg)?;
    let q = Query {
        src: args.src,
        sport: args.sport,
        dst: args.dst,
        proto,
        dport: args.dport,
        dscp: args.dscp,
    };
    q.check().map_err(anyhow::Error::msg)?;
    let answer = control::send(&args.pin.pin_dir, &control::Request::Explain(q))?;
    if args.json {
        println!("{answer}");
        return Ok(());
    }
    let e: Explanation = serde_json::from_str(&answer)?;
    print!("{}", render(&e));
    Ok(())
}

fn render(e: &Explanation) -> String {
    let mut out = String::new();
    let rule = match &e.rule {
        Some(r) => format!("rule #{} (line {})", r.number, r.line),
        None => "no rule matches".into(),
    };
    match &e.policy {
        Some(p) => out.push_str(&format!(
            "{rule} -> policy {p} (balance {})\n",
            e.balance.as_deref().unwrap_or("?")
        )),
        None => out.push_str(&format!("{rule} -> {}\n", e.action)),
    }
    if let Some(t) = e.tier {
        out.push_str(&format!("tier in use: {t}\n"));
    } else if let Some(l) = &e.last_resort {
        out.push_str(&format!("every tier is down: last_resort = {l}\n"));
    }
    if !e.candidates.is_empty() {
        let c: Vec<String> = e
            .candidates
            .iter()
            .map(|c| format!("{} (weight {})", c.uplink, c.weight))
            .collect();
        out.push_str(&format!("could take: {}\n", c.join(", ")));
    }
    if let Some(a) = &e.affinity {
        out.push_str(&format!(
            "affinity: {} (idle {} s, {})\n",
            a.uplink,
            a.idle_s,
            if a.live {
                "holds"
            } else {
                "expired or off-tier"
            }
        ));
    }
    if let Some(r) = &e.endpoint {
        out.push_str(&format!(
            "endpoint: {} port {} ({})\n",
            r.uplink,
            r.nat_port,
            if r.live { "holds" } else { "off-tier" }
        ));
    }
    match &e.uplink {
        Some(u) => out.push_str(&format!("a new flow takes: {u}: {}\n", e.why)),
        None => out.push_str(&format!("{}\n", e.why)),
    }
    out
}
