//! `multihome status`: renders the [`Status`] model as a table or JSON.
use std::fmt::Write as _;

use crate::{
    maps::Maps,
    status::{self, Status},
};

pub fn run(pin: &super::PinDir, json: bool) -> anyhow::Result<()> {
    let maps = Maps::open(&pin.pin_dir)?;
    let st = status::collect(&maps)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&st)?);
    } else {
        print!("{}", table(&st));
    }
    Ok(())
}

/// The uplink table's columns: header, width, left-aligned.
const COLUMNS: [(&str, usize, bool); 15] = [
    ("UPLINK", 8, true),
    ("IFACE", 10, true),
    ("ADDRESS", 16, true),
    ("GATEWAY", 16, true),
    ("STATE", 10, true),
    ("WEIGHT", 6, false),
    ("FLOWS", 7, false),
    ("TX PKTS", 12, false),
    ("TX BYTES", 12, false),
    ("RX PKTS", 12, false),
    ("RX BYTES", 12, false),
    ("RTT MS", 8, false),
    ("LOSS %", 6, false),
    ("SYN MS", 7, false),
    ("RETX", 8, false),
];

/// One table row of `cells`, laid out by [`COLUMNS`].
fn row<S: AsRef<str>>(cells: &[S]) -> String {
    let mut line = String::new();
    for ((_, width, left), cell) in COLUMNS.iter().zip(cells) {
        let cell = cell.as_ref();
        let _ = if *left {
            write!(line, "{cell:<width$} ")
        } else {
            write!(line, "{cell:>width$} ")
        };
    }
    line.trim_end().to_string() + "\n"
}

/// `status` as text: the uplink table, refused hosts, reasons.
fn table(st: &Status) -> String {
    let mut out = row(&COLUMNS.map(|(h, _, _)| h));
    for u in &st.uplinks {
        out += &row(&[
            u.name.clone(),
            u.interface.clone(),
            u.address.clone().unwrap_or_else(|| "-".into()),
            u.gateway.clone().unwrap_or_else(|| "-".into()),
            u.state.to_string(),
            u.weight.to_string(),
            u.flows.to_string(),
            u.tx_packets.to_string(),
            u.tx_bytes.to_string(),
            u.rx_packets.to_string(),
            u.rx_bytes.to_string(),
            u.rtt_ms.map_or("-".into(), |r| format!("{r:.1}")),
            format!("{:.0}", u.loss_pct),
            u.syn_rtt_ms.map_or("-".into(), |r| format!("{r:.1}")),
            u.retransmits.to_string(),
        ]);
        if let Some(why) = u.reason {
            let _ = writeln!(out, "         ^ {}: {why}", u.name);
        }
    }
    if !st.interfaces.is_empty() {
        out += "\nInterfaces (every packet meets TC unless XDP takes it first):\n";
        for i in &st.interfaces {
            let xdp = match (i.xdp, i.xdp_redirect) {
                ("off", _) => "XDP off".to_string(),
                (mode, true) => format!("XDP {mode}, redirect target"),
                (mode, false) => format!("XDP {mode}, not a redirect target"),
            };
            let _ = writeln!(out, "  {:<12} {xdp}", i.interface);
        }
        let (tx, rx) = st.uplinks.iter().fold((0, 0), |(t, r), u| {
            (t + u.xdp_tx_packets, r + u.xdp_rx_packets)
        });
        if tx + rx > 0 {
            let _ = writeln!(out, "  XDP path: {tx} packets out, {rx} in");
        }
    }
    if !st.lan_prefixes6.is_empty() {
        let _ = match st.lan_prefixes6.as_slice() {
            [inner] => writeln!(out, "\nIPv6: NPTv6 maps {inner} onto each uplink's prefix:"),
            many => writeln!(
                out,
                "\nIPv6: NPTv6 maps {}, in order, onto each uplink's prefixes:",
                many.join(", ")
            ),
        };
        for u in &st.uplinks {
            let mapped = u.prefixes6.join(", ");
            let prefix = match (&u.prefix6, &u.delegated6) {
                (Some(p), _) if u.nat66 => format!("{p} (NAT66: its one address)"),
                (Some(_), Some(d)) => format!("{mapped} (of the delegated {d})"),
                (Some(_), None) => mapped,
                (None, _) => "- (takes no IPv6 flows)".into(),
            };
            let _ = writeln!(out, "  {:<8} {prefix:<44} {:>7} flows", u.name, u.flows6);
        }
    }
    if st.top_hosts.iter().any(|h| h.refused > 0) {
        out += "\nLAN hosts refused new flows (nat.max_flows_per_host):\n";
        let _ = writeln!(out, "  {:<24} {:>8} {:>10}", "HOST", "FLOWS", "REFUSED");
        for h in st.top_hosts.iter().filter(|h| h.refused > 0) {
            let _ = writeln!(out, "  {:<24} {:>8} {:>10}", h.address, h.flows, h.refused);
        }
    }
    let _ = writeln!(
        out,
        "\n{} live flows ({} IPv6). Packets left to the kernel or dropped, by reason:",
        st.flows + st.flows6,
        st.flows6
    );
    for (name, n) in st.drops.iter().filter(|(_, n)| **n > 0) {
        let _ = writeln!(out, "  {name:<20} {n}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::UplinkStatus;

    #[test]
    fn every_uplink_column_has_a_header() {
        let st = Status {
            uplinks: vec![UplinkStatus {
                interface: "wan0".into(),
                rtt_ms: Some(1.5),
                flows: 3,
                new_flows: 4,
                tx_packets: 5,
                tx_bytes: 6,
                rx_packets: 7,
                rx_bytes: 8,
                syns: 9,
                synacks: 9,
                syn_rtt_ms: Some(2.0),
                ..UplinkStatus::sample("x", "up")
            }],
            interfaces: vec![],
            flows: 3,
            top_hosts: vec![],
            lan_prefixes6: Vec::new(),
            flows6: 0,
            drops: Default::default(),
        };
        let text = table(&st);
        let mut lines = text.lines();
        let header = lines.next().expect("header");
        let row = lines.next().expect("row");
        assert_eq!(row.split_whitespace().count(), COLUMNS.len(), "{text}");
        assert!(
            header.contains("RTT MS") && header.contains("LOSS %"),
            "{header}"
        );
        // Each header sits over its column, and each column has a cell.
        let mut at = 0;
        for (h, width, left) in COLUMNS {
            let head = &header[at..at + width];
            let cell = &row[at..(at + width).min(row.len())];
            assert_eq!(head.trim(), h, "{text}");
            assert!(!cell.trim().is_empty(), "column {h} is empty: {text}");
            if left {
                assert!(!cell.starts_with(' '), "{h}: {text}");
            }
            at += width + 1;
        }
    }

    #[test]
    fn the_ipv6_section_lists_each_uplinks_prefixes_in_the_lans_order() {
        let mapped = |p: &[&str]| UplinkStatus {
            prefix6: p.first().map(|s| s.to_string()),
            prefixes6: p.iter().map(|s| s.to_string()).collect(),
            flows6: 2,
            ..UplinkStatus::sample("x", "up")
        };
        let st = Status {
            uplinks: vec![
                mapped(&["2001:db8:11:100::/64", "2001:db8:11:101::/64"]),
                UplinkStatus {
                    delegated6: Some("2001:db8:f0::/56".into()),
                    ..mapped(&["2001:db8:f0:3::/64", "2001:db8:f0:4::/64"])
                },
                UplinkStatus::sample("z", "up"),
            ],
            interfaces: vec![],
            flows: 0,
            top_hosts: vec![],
            lan_prefixes6: vec!["fd00:1::/64".into(), "fd00:9::/64".into()],
            flows6: 4,
            drops: Default::default(),
        };
        let text = table(&st);
        assert!(
            text.contains(
                "NPTv6 maps fd00:1::/64, fd00:9::/64, in order, onto each uplink's prefixes"
            ),
            "{text}"
        );
        assert!(
            text.contains("2001:db8:11:100::/64, 2001:db8:11:101::/64"),
            "{text}"
        );
        assert!(
            text.contains(
                "2001:db8:f0:3::/64, 2001:db8:f0:4::/64 (of the delegated 2001:db8:f0::/56)"
            ),
            "{text}"
        );
        assert!(text.contains("- (takes no IPv6 flows)"), "{text}");
    }
}
