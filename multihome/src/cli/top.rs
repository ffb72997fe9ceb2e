//! `multihome top`: a live view, redrawn every second, from the pinned
//! maps: per-uplink state, rates, flows, the share of new flows each took
//! against its weight, and the changes seen since it started.
use std::{
    collections::VecDeque,
    fmt::Write as _,
    time::{Duration, Instant},
};

use crate::maps::Maps;
use crate::status::{self, Status, UplinkStatus};

const EVENTS: usize = 8;

fn rate(now: u64, before: u64, secs: f64) -> f64 {
    now.saturating_sub(before) as f64 / secs
}

fn human_bits(bytes_per_s: f64) -> String {
    let bits = bytes_per_s * 8.0;
    match bits {
        b if b >= 1e9 => format!("{:.2} Gbit/s", b / 1e9),
        b if b >= 1e6 => format!("{:.2} Mbit/s", b / 1e6),
        b if b >= 1e3 => format!("{:.1} kbit/s", b / 1e3),
        b => format!("{b:.0} bit/s"),
    }
}

/// What changed between two looks, as lines for the event list.
fn changes(before: &Status, now: &Status) -> Vec<String> {
    let mut out = Vec::new();
    for (b, n) in before.uplinks.iter().zip(&now.uplinks) {
        if b.state != n.state {
            let why = n.reason.map(|r| format!(" ({r})")).unwrap_or_default();
            out.push(format!("uplink {} {} -> {}{why}", n.name, b.state, n.state));
        }
        if b.address != n.address {
            out.push(format!(
                "uplink {} address {} -> {}",
                n.name,
                b.address.as_deref().unwrap_or("none"),
                n.address.as_deref().unwrap_or("none")
            ));
        }
    }
    out
}

/// Passive health over the frame: the mean SYN to SYN-ACK time and the
/// share of SYNs answered, or "-" without SYNs.
fn syn_signals(now: &UplinkStatus, before: &UplinkStatus) -> (String, String) {
    let sum = |u: &UplinkStatus| u.syn_rtt_ms.unwrap_or(0.0) * u.synacks as f64;
    let answered = now.synacks.saturating_sub(before.synacks);
    let sent = now.syns.saturating_sub(before.syns);
    let ms = if answered > 0 {
        format!("{:.1}", (sum(now) - sum(before)) / answered as f64)
    } else {
        "-".into()
    };
    let ok = if sent > 0 {
        format!("{:.0}%", 100.0 * (answered.min(sent)) as f64 / sent as f64)
    } else {
        "-".into()
    };
    (ms, ok)
}

/// One screen.
fn render(now: &Status, before: &Status, secs: f64, events: &VecDeque<String>) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "multihome top: {} live flows (Ctrl-C quits)\n",
        now.flows
    );
    let _ = writeln!(
        s,
        "{:<8} {:<10} {:<16} {:<9} {:>7} {:>14} {:>14} {:>7} {:>9} {:>7} {:>7} {:>7}",
        "UPLINK",
        "IFACE",
        "ADDRESS",
        "STATE",
        "FLOWS",
        "OUT",
        "IN",
        "WEIGHT",
        "NEW/s",
        "SHARE",
        "SYN MS",
        "SYN OK"
    );
    let new: Vec<f64> = now
        .uplinks
        .iter()
        .zip(&before.uplinks)
        .map(|(n, b)| rate(n.new_flows, b.new_flows, secs))
        .collect();
    let total_new: f64 = new.iter().sum();
    let total_weight: u32 = now.uplinks.iter().map(|u| u.weight).sum();
    for ((n, b), new) in now.uplinks.iter().zip(&before.uplinks).zip(&new) {
        let share = |part: f64, all: f64| {
            if all > 0.0 {
                format!("{:.0}%", 100.0 * part / all)
            } else {
                "-".into()
            }
        };
        let (syn_ms, syn_ok) = syn_signals(n, b);
        let _ = writeln!(
            s,
            "{:<8} {:<10} {:<16} {:<9} {:>7} {:>14} {:>14} {:>7} {:>9.1} {:>7} {:>7} {:>7}",
            n.name,
            n.interface,
            n.address.as_deref().unwrap_or("-"),
            n.state,
            n.flows,
            human_bits(rate(n.tx_bytes, b.tx_bytes, secs)),
            human_bits(rate(n.rx_bytes, b.rx_bytes, secs)),
            format!(
                "{} ({})",
                n.weight,
                share(n.weight.into(), total_weight.into())
            ),
            new,
            share(*new, total_new),
            syn_ms,
            syn_ok,
        );
    }
    let _ = writeln!(s, "\nRecent events:");
    if events.is_empty() {
        let _ = writeln!(s, "  none since top started");
    }
    for e in events {
        let _ = writeln!(s, "  {e}");
    }
    s
}

/// Redraws every `interval` until interrupted, or `iterations` times.
pub fn run(pin: &super::PinDir, iterations: Option<u32>) -> anyhow::Result<()> {
    let maps = Maps::open(&pin.pin_dir)?;
    let mut before = status::collect(&maps)?;
    let mut at = Instant::now();
    let mut events = VecDeque::new();
    let mut drawn = 0;
    while iterations.is_none_or(|n| drawn < n) {
        std::thread::sleep(Duration::from_secs(1));
        let now = status::collect(&maps)?;
        let secs = at.elapsed().as_secs_f64();
        at = Instant::now();
        for e in changes(&before, &now) {
            let stamp = chrono_less_time();
            events.push_front(format!("{stamp} {e}"));
            events.truncate(EVENTS);
        }
        // Clear the screen and home the cursor, then draw.
        print!("\x1b[2J\x1b[H{}", render(&now, &before, secs, &events));
        before = now;
        drawn += 1;
    }
    Ok(())
}

/// Wall-clock HH:MM:SS (UTC), without a date crate.
fn chrono_less_time() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format!(
        "{:02}:{:02}:{:02}",
        secs / 3600 % 24,
        secs / 60 % 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::UplinkStatus;

    fn uplink(name: &str, state: &'static str, new_flows: u64, weight: u32) -> UplinkStatus {
        UplinkStatus {
            name: name.into(),
            interface: format!("wan{name}"),
            address: Some("198.18.11.1".into()),
            gateway: None,
            state,
            reason: None,
            weight,
            rtt_ms: None,
            loss_pct: 0.0,
            flows: 0,
            new_flows,
            tx_packets: 0,
            tx_bytes: 0,
            rx_packets: 0,
            rx_bytes: 0,
            slow_path: 0,
            syns: 0,
            synacks: 0,
            syn_rtt_ms: None,
            syn_retries: 0,
        }
    }

    fn status(uplinks: Vec<UplinkStatus>) -> Status {
        Status {
            uplinks,
            flows: 0,
            top_hosts: Vec::new(),
            drops: Default::default(),
        }
    }

    #[test]
    fn shares_of_new_flows_are_shown_against_weights() {
        let before = status(vec![uplink("x", "up", 0, 1), uplink("y", "up", 0, 3)]);
        let mut x_now = uplink("x", "up", 25, 1);
        // 10 SYNs, 8 answered in 12 ms each on average.
        (x_now.syns, x_now.synacks, x_now.syn_rtt_ms) = (10, 8, Some(12.0));
        let now = status(vec![x_now, uplink("y", "up", 75, 3)]);
        let screen = render(&now, &before, 1.0, &VecDeque::new());
        let x = screen.lines().find(|l| l.starts_with("x ")).expect("x row");
        assert!(
            x.contains("1 (25%)") && x.trim_end().ends_with("25%    12.0     80%"),
            "{x}"
        );
        let y = screen.lines().find(|l| l.starts_with("y ")).expect("y row");
        assert!(y.trim_end().ends_with("-       -"), "no SYNs: {y}");
    }

    #[test]
    fn state_and_address_changes_become_events() {
        let before = status(vec![uplink("x", "up", 0, 1)]);
        let mut down = uplink("x", "down", 0, 1);
        down.address = Some("198.18.11.7".into());
        let ev = changes(&before, &status(vec![down]));
        assert_eq!(ev.len(), 2, "{ev:?}");
        assert!(ev[0].contains("up -> down"));
        assert!(ev[1].contains("198.18.11.1 -> 198.18.11.7"));
    }
}
