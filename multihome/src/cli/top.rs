//! `multihome top`: a live view, redrawn every second, of the status
//! model: per-uplink state, rates (with a sparkline each in a terminal),
//! flows, the share of new flows each took against its weight, passive
//! health, the LAN hosts with most flows, and the changes seen since it
//! started.
use std::{
    collections::VecDeque,
    fmt::Write as _,
    io::IsTerminal as _,
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

/// The uplink table's headers.
const HEADERS: [&str; 13] = [
    "UPLINK", "IFACE", "ADDRESS", "STATE", "FLOWS", "OUT", "IN", "WEIGHT", "NEW/s", "SHARE",
    "SYN MS", "SYN OK", "RETX/s",
];

/// The uplink table's cells, a row per uplink: state, rates over the
/// frame of `secs`, and each uplink's share of new flows against its
/// share of the weights.
fn rows(now: &Status, before: &Status, secs: f64) -> Vec<[String; 13]> {
    let new: Vec<f64> = now
        .uplinks
        .iter()
        .zip(&before.uplinks)
        .map(|(n, b)| rate(n.new_flows, b.new_flows, secs))
        .collect();
    let total_new: f64 = new.iter().sum();
    let total_weight: u32 = now.uplinks.iter().map(|u| u.weight).sum();
    let share = |part: f64, all: f64| {
        if all > 0.0 {
            format!("{:.0}%", 100.0 * part / all)
        } else {
            "-".into()
        }
    };
    now.uplinks
        .iter()
        .zip(&before.uplinks)
        .zip(&new)
        .map(|((n, b), new)| {
            let (syn_ms, syn_ok) = syn_signals(n, b);
            [
                n.name.clone(),
                n.interface.clone(),
                n.address.clone().unwrap_or_else(|| "-".into()),
                n.state.to_string(),
                (n.flows + n.flows6).to_string(),
                human_bits(rate(n.tx_bytes, b.tx_bytes, secs)),
                human_bits(rate(n.rx_bytes, b.rx_bytes, secs)),
                format!(
                    "{} ({})",
                    n.weight,
                    share(n.weight.into(), total_weight.into())
                ),
                format!("{new:.1}"),
                share(*new, total_new),
                syn_ms,
                syn_ok,
                format!("{:.1}", rate(n.retransmits, b.retransmits, secs)),
            ]
        })
        .collect()
}

/// The live flows, both families, for the title.
fn live(st: &Status) -> String {
    match st.flows6 {
        0 => format!("{} live flows", st.flows),
        n => format!("{} live flows ({n} IPv6)", st.flows + n),
    }
}

/// One screen as text (a pipe, or `--iterations`).
fn render(now: &Status, before: &Status, secs: f64, events: &VecDeque<String>) -> String {
    let line = |cells: &[&str]| {
        let [a, b, c, d, e, f, g, h, i, j, k, l, m] = cells else {
            return String::new();
        };
        format!(
            "{a:<8} {b:<10} {c:<16} {d:<9} {e:>7} {f:>14} {g:>14} {h:>7} {i:>9} {j:>7} {k:>7} {l:>7} {m:>7}\n"
        )
    };
    let mut s = format!("multihome top: {} (Ctrl-C quits)\n\n", live(now));
    s += &line(&HEADERS);
    for r in rows(now, before, secs) {
        s += &line(&r.each_ref().map(String::as_str));
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

/// In a terminal, until `q` or Ctrl-C: a ratatui screen; to a pipe or
/// with `iterations`, text frames (the screen cleared before each).
pub fn run(pin: &super::PinDir, iterations: Option<u32>) -> anyhow::Result<()> {
    let maps = Maps::open(&pin.pin_dir)?;
    if iterations.is_none() && std::io::stdout().is_terminal() {
        let mut terminal = ratatui::init();
        let result = screen::run(&mut terminal, &maps);
        ratatui::restore();
        return result;
    }
    let mut before = status::collect(&maps)?;
    let mut at = Instant::now();
    let mut events = VecDeque::new();
    let mut drawn = 0;
    while iterations.is_none_or(|n| drawn < n) {
        std::thread::sleep(Duration::from_secs(1));
        let now = look(&maps, &before, drawn)?;
        let secs = at.elapsed().as_secs_f64();
        at = Instant::now();
        note_changes(&before, &now, &mut events);
        // Clear the screen and home the cursor, then draw.
        print!("\x1b[2J\x1b[H{}", render(&now, &before, secs, &events));
        before = now;
        drawn += 1;
    }
    Ok(())
}

/// Frames between two walks of the connection map (for the per-uplink
/// flow counts); the others read counters only.
const WALK_EVERY: u32 = 10;

/// The model for frame `frame`: whole every `WALK_EVERY` frames, else
/// without walking the flows.
fn look(maps: &Maps, before: &Status, frame: u32) -> anyhow::Result<Status> {
    if frame % WALK_EVERY == WALK_EVERY - 1 {
        status::collect(maps)
    } else {
        status::collect_quick(maps, before)
    }
}

/// Puts the changes from `before` to `now`, stamped, first in `events`.
fn note_changes(before: &Status, now: &Status, events: &mut VecDeque<String>) {
    for e in changes(before, now) {
        let stamp = jiff::Timestamp::now().strftime("%H:%M:%S");
        events.push_front(format!("{stamp} {e}"));
        events.truncate(EVENTS);
    }
}

/// The ratatui screen: the uplink table, a rate sparkline per uplink, the
/// LAN hosts with most flows, and the events.
mod screen {
    use std::{
        collections::VecDeque,
        time::{Duration, Instant},
    };

    use ratatui::{
        DefaultTerminal, Frame,
        crossterm::event::{self, Event, KeyCode, KeyModifiers},
        layout::{Constraint, Layout},
        style::Stylize as _,
        widgets::{Block, List, Paragraph, Row, Sparkline, Table},
    };

    use super::{HEADERS, look, note_changes, rows};
    use crate::{
        maps::Maps,
        status::{self, Status},
    };

    /// Rate samples kept per uplink: two minutes.
    const HISTORY: usize = 120;

    pub fn run(terminal: &mut DefaultTerminal, maps: &Maps) -> anyhow::Result<()> {
        let mut before = status::collect(maps)?;
        let mut at = Instant::now();
        let mut events = VecDeque::new();
        let mut history: Vec<VecDeque<u64>> = vec![VecDeque::new(); before.uplinks.len()];
        let mut frame = 0;
        loop {
            let next = at + Duration::from_secs(1);
            while let Some(left) = next.checked_duration_since(Instant::now()) {
                if !event::poll(left)? {
                    break;
                }
                if let Event::Key(k) = event::read()?
                    && (k.code == KeyCode::Char('q')
                        || (k.code == KeyCode::Char('c')
                            && k.modifiers.contains(KeyModifiers::CONTROL)))
                {
                    return Ok(());
                }
            }
            let now = look(maps, &before, frame)?;
            frame += 1;
            let secs = at.elapsed().as_secs_f64();
            at = Instant::now();
            note_changes(&before, &now, &mut events);
            history.resize(now.uplinks.len(), VecDeque::new());
            for ((h, n), b) in history.iter_mut().zip(&now.uplinks).zip(&before.uplinks) {
                let bytes = (n.tx_bytes + n.rx_bytes).saturating_sub(b.tx_bytes + b.rx_bytes);
                h.push_back((bytes as f64 * 8.0 / secs) as u64);
                if h.len() > HISTORY {
                    h.pop_front();
                }
            }
            let table = rows(&now, &before, secs);
            terminal.draw(|f| draw(f, &now, &table, &history, &events))?;
            before = now;
        }
    }

    fn draw(
        f: &mut Frame,
        now: &Status,
        table: &[[String; 13]],
        history: &[VecDeque<u64>],
        events: &VecDeque<String>,
    ) {
        let n = now.uplinks.len() as u16;
        let [title, uplinks, sparks, bottom] = Layout::vertical([
            Constraint::Length(1),
            Constraint::Length(n + 3),
            Constraint::Length(3 * n),
            Constraint::Min(4),
        ])
        .areas(f.area());
        f.render_widget(
            Paragraph::new(format!("multihome top: {} (q quits)", super::live(now))),
            title,
        );
        let widths = [8, 10, 16, 9, 7, 14, 14, 8, 9, 7, 7, 7, 7].map(Constraint::Length);
        f.render_widget(
            Table::new(table.iter().map(|r| Row::new(r.clone())), widths)
                .header(Row::new(HEADERS).bold())
                .block(Block::bordered().title("uplinks")),
            uplinks,
        );
        let areas = Layout::vertical(vec![Constraint::Length(3); history.len()]).split(sparks);
        for ((h, u), area) in history.iter().zip(&now.uplinks).zip(areas.iter()) {
            let data: Vec<u64> = h.iter().copied().collect();
            f.render_widget(
                Sparkline::default()
                    .block(Block::bordered().title(format!(
                        "{} out+in, bit/s, last {} s",
                        u.name,
                        data.len()
                    )))
                    .data(&data),
                *area,
            );
        }
        let [hosts, recent] =
            Layout::horizontal([Constraint::Percentage(40), Constraint::Percentage(60)])
                .areas(bottom);
        let talkers = now.top_hosts.iter().map(|h| {
            format!(
                "{:<16} {:>8} flows {:>8} refused",
                h.address, h.flows, h.refused
            )
        });
        f.render_widget(
            List::new(talkers).block(Block::bordered().title("LAN hosts with most flows")),
            hosts,
        );
        let lines: Vec<String> = if events.is_empty() {
            vec!["none since top started".into()]
        } else {
            events.iter().cloned().collect()
        };
        f.render_widget(
            List::new(lines).block(Block::bordered().title("Recent events")),
            recent,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::UplinkStatus;

    fn uplink(name: &str, state: &'static str, new_flows: u64, weight: u32) -> UplinkStatus {
        UplinkStatus {
            new_flows,
            weight,
            ..UplinkStatus::sample(name, state)
        }
    }

    fn status(uplinks: Vec<UplinkStatus>) -> Status {
        Status {
            uplinks,
            interfaces: Vec::new(),
            flows: 0,
            top_hosts: Vec::new(),
            lan_prefixes6: Vec::new(),
            flows6: 0,
            drops: Default::default(),
        }
    }

    #[test]
    fn shares_of_new_flows_are_shown_against_weights() {
        let before = status(vec![uplink("x", "up", 0, 1), uplink("y", "up", 0, 3)]);
        let mut x_now = uplink("x", "up", 25, 1);
        // 10 SYNs, 8 answered in 12 ms each on average.
        (x_now.syns, x_now.synacks, x_now.syn_rtt_ms) = (10, 8, Some(12.0));
        x_now.retransmits = 3;
        let now = status(vec![x_now, uplink("y", "up", 75, 3)]);
        let screen = render(&now, &before, 1.0, &VecDeque::new());
        let x = screen.lines().find(|l| l.starts_with("x ")).expect("x row");
        assert!(
            x.contains("1 (25%)") && x.trim_end().ends_with("25%    12.0     80%     3.0"),
            "{x}"
        );
        let y = screen.lines().find(|l| l.starts_with("y ")).expect("y row");
        assert!(y.trim_end().ends_with("-       -     0.0"), "no SYNs: {y}");
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
