//! `cargo xtask bench [--quick]`: multihome against plain routing, the
//! seed's iptables recipe and its nftables twin, side by side (issue #7).
//!
//! Every round builds one topology per mode, all up side by side, and runs
//! each measurement on every mode in turn, in an order that rotates from
//! round to round; the report gives the median of the rounds with the
//! spread.
pub mod measure;
pub mod modes;
pub mod report;
pub mod results;
pub mod topo;
pub mod traffic;

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use self::{
    measure::Ctx,
    results::{Mode, Results},
    topo::Net,
};
use crate::{build, setup, util};

pub struct Options {
    /// A short run, for development.
    pub quick: bool,
    /// Rounds instead of the default (6, or 2 with --quick).
    pub rounds: Option<usize>,
    /// Where the report goes (default: docs/, or target/bench/ with
    /// --quick).
    pub out: Option<PathBuf>,
    /// Only rewrite the report from the results file in `out`.
    pub render: bool,
}

/// How long each measurement runs.
struct Plan {
    rounds: usize,
    tcp_secs: u32,
    udp_warmup: Duration,
    udp_window: Duration,
    new_flow_secs: f64,
    wrk_secs: u32,
    rr_count: usize,
    scale_rounds: usize,
    scale_sizes: &'static [u64],
}

const FULL: Plan = Plan {
    rounds: 6,
    tcp_secs: 3,
    udp_warmup: Duration::from_millis(300),
    udp_window: Duration::from_secs(2),
    new_flow_secs: 0.5,
    wrk_secs: 3,
    rr_count: 20_000,
    scale_rounds: 3,
    scale_sizes: &[100_000, 1_000_000],
};

const QUICK: Plan = Plan {
    rounds: 2,
    tcp_secs: 1,
    udp_warmup: Duration::from_millis(200),
    udp_window: Duration::from_millis(700),
    new_flow_secs: 0.3,
    wrk_secs: 1,
    rr_count: 5_000,
    scale_rounds: 1,
    scale_sizes: &[100_000],
};

/// nf_conntrack's table limit, global to the kernel (DESIGN.md §11).
const CONNTRACK_MAX: u64 = 262_144;

pub fn run(opts: Options) -> Result<()> {
    let out = opts.out.clone().unwrap_or_else(|| {
        util::workspace_root().join(if opts.quick { "target/bench" } else { "docs" })
    });
    if opts.render {
        let json = out.join("benchmarks.json");
        let text = std::fs::read_to_string(&json)
            .with_context(|| format!("reading {} (run the bench first)", json.display()))?;
        let r: Results =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", json.display()))?;
        return write(&out, &r);
    }
    util::require_root("`cargo xtask bench`")?;
    setup::ensure()?;
    let bin = build::build(build::Profile::Release)?;
    // SAFETY: single-threaded at this point.
    unsafe { std::env::set_var("MULTIHOME_BIN", &bin) };
    let mut plan = if opts.quick { QUICK } else { FULL };
    if let Some(r) = opts.rounds {
        plan.rounds = r.max(1);
        plan.scale_rounds = plan.scale_rounds.min(plan.rounds);
    }
    let mut r = Results {
        meta: meta(&plan, opts.quick),
        ..Results::default()
    };
    keep_off_load_cpu();
    util::catch_stop_signals();
    let exe = std::env::current_exe().context("finding the xtask binary")?;
    let started = Instant::now();
    for round in 0..plan.rounds {
        interrupted()?;
        println!("round {}/{}", round + 1, plan.rounds);
        if let Err(e) = run_round(&plan, round, &exe, &mut r) {
            let msg = format!("round {}: {e:#}", round + 1);
            eprintln!("warning: {msg}");
            r.meta.notes.push(format!("Failed: {msg}"));
        }
    }
    for round in 0..plan.scale_rounds {
        for mode in rotated(round) {
            interrupted()?;
            println!(
                "scale round {}/{}: {}",
                round + 1,
                plan.scale_rounds,
                mode.name()
            );
            if let Err(e) = scale_cell(&plan, mode, &exe, &mut r) {
                let msg = format!("scale round {} {}: {e:#}", round + 1, mode.name());
                eprintln!("warning: {msg}");
                r.meta.notes.push(format!("Failed: {msg}"));
            }
        }
    }
    for round in 0..plan.scale_rounds {
        for mode in rotated(round) {
            interrupted()?;
            if let Err(e) = seed_cell(&plan, mode, &exe, &mut r) {
                let msg = format!("seed topology {} {}: {e:#}", round + 1, mode.name());
                eprintln!("warning: {msg}");
                r.meta.notes.push(format!("Failed: {msg}"));
            }
            if let Err(e) = ipv6_cell(&plan, mode, &exe, &mut r) {
                let msg = format!("IPv6 {} {}: {e:#}", round + 1, mode.name());
                eprintln!("warning: {msg}");
                r.meta.notes.push(format!("Failed: {msg}"));
            }
        }
    }
    r.meta.seconds = started.elapsed().as_secs_f64();
    write(&out, &r)?;
    let failed = r
        .meta
        .notes
        .iter()
        .filter(|n| n.starts_with("Failed"))
        .count();
    if failed > 0 {
        bail!(
            "{failed} measurements failed (listed in {}); the report has the rest",
            out.join("BENCHMARKS.md").display()
        );
    }
    Ok(())
}

/// Ctrl-C: stop between steps; dropping the topologies removes them.
fn interrupted() -> Result<()> {
    if util::stopping() {
        bail!("interrupted: nothing written; the namespaces are removed");
    }
    Ok(())
}

/// The modes in round `round`'s order: rotated so that no mode always
/// runs first or after the same neighbour.
fn rotated(round: usize) -> Vec<Mode> {
    let mut m = Mode::ALL.to_vec();
    let n = m.len();
    m.rotate_left(round % n);
    m
}

/// Moves the bench (and so the daemon it starts) to CPU 1, leaving CPU 0
/// to the loads and the forwarding path.
fn keep_off_load_cpu() {
    // SAFETY: a zeroed cpu_set_t is empty; the calls only touch it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(1, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            eprintln!("warning: cannot move the bench to CPU 1; results will be noisier");
        }
    }
}

fn ctx<'a>(net: &'a Net, exe: &Path, running: &modes::Running) -> Result<Ctx<'a>> {
    let (gw_mac, client_mac) = net.lan_macs()?;
    Ok(Ctx {
        net,
        exe: exe.to_path_buf(),
        gw_mac,
        client_mac,
        daemon: running.gateway.as_ref().map(|g| g.pid()),
    })
}

/// One mode, up in its own topology for a round.
struct Live<'a> {
    mode: Mode,
    net: &'a Net,
    ctx: Ctx<'a>,
    running: modes::Running<'a>,
}

/// One measurement step, run on every mode in turn.
type Step = fn(&Plan, &Live, &mut Results) -> Result<String>;

/// The steps of a round, in order. The offload-off rate comes before the
/// loads that leave thousands of flows behind (wrk, new flows), so that
/// every stateful mode starts it from a small table.
const STEPS: &[(&str, Step)] = &[
    ("TCP, 1 stream", |p, l, r| {
        let v = l.ctx.tcp(1, p.tcp_secs)?;
        r.add("tcp1", l.mode, v);
        Ok(format!("{v:.2} Gbit/s"))
    }),
    ("TCP, 8 streams", |p, l, r| {
        let v = l.ctx.tcp(8, p.tcp_secs)?;
        r.add("tcp8", l.mode, v);
        Ok(format!("{v:.2} Gbit/s"))
    }),
    ("UDP, 256 flows", |p, l, r| {
        let u = l.ctx.udp(256, 10, p.udp_warmup, p.udp_window)?;
        r.add("udp_pps", l.mode, u.pps / 1e3);
        r.add("cpu_ns_pkt", l.mode, u.cpu_ns_per_pkt);
        Ok(format!(
            "{:.0} kpps, {:.0} ns CPU/pkt",
            u.pps / 1e3,
            u.cpu_ns_per_pkt
        ))
    }),
    ("BPF run time", |p, l, r| {
        if !l.mode.is_multihome() {
            r.skip("bpf_ns_pkt", l.mode, "no BPF programs in this mode");
            r.skip("bpf_xdp_ns_pkt", l.mode, "no BPF programs in this mode");
            return Ok("-".into());
        }
        // A run of its own: the statistics cost two clock reads per run.
        let _stats = measure::enable_bpf_stats().context("enabling BPF run-time statistics")?;
        let u = l.ctx.udp(256, 10, p.udp_warmup, p.udp_window)?;
        r.add("bpf_ns_pkt", l.mode, u.bpf_ns_per_pkt);
        if l.mode == Mode::MultihomeXdp {
            r.add("bpf_xdp_ns_pkt", l.mode, u.bpf_xdp_ns_per_pkt);
        } else {
            r.skip("bpf_xdp_ns_pkt", l.mode, "no XDP program attached");
        }
        Ok(format!(
            "{:.0} ns/pkt ({:.0} in XDP)",
            u.bpf_ns_per_pkt, u.bpf_xdp_ns_per_pkt
        ))
    }),
    ("UDP, offloads off", |p, l, r| {
        l.net.set_offloads(false);
        let u = l.ctx.udp(256, 10, p.udp_warmup, p.udp_window);
        l.net.set_offloads(true);
        let u = u?;
        r.add("udp_pps_nooff", l.mode, u.pps / 1e3);
        Ok(format!("{:.0} kpps", u.pps / 1e3))
    }),
    ("request/response", |p, l, r| {
        let (p50, p99) = l.ctx.latency(p.rr_count)?;
        r.add("rr_p50", l.mode, p50);
        r.add("rr_p99", l.mode, p99);
        Ok(format!("p50 {p50:.1} µs, p99 {p99:.1} µs"))
    }),
    ("wrk", |p, l, r| {
        let (conns, errors) = l.ctx.conn_rate(p.wrk_secs)?;
        r.add("conn_rate", l.mode, conns);
        if errors > 0 {
            r.meta.notes.push(format!(
                "wrk saw {errors} socket errors in a {} run",
                l.mode.name()
            ));
        }
        Ok(format!("{conns:.0} conn/s"))
    }),
    ("new flows", |p, l, r| {
        let v = l.ctx.new_flows(p.new_flow_secs)?;
        r.add("newflow_pps", l.mode, v / 1e3);
        Ok(format!("{:.0} kpps", v / 1e3))
    }),
    ("BPF run time, new flows", |p, l, r| {
        if !l.mode.is_multihome() {
            r.skip("bpf_ns_newflow", l.mode, "no BPF programs in this mode");
            return Ok("-".into());
        }
        let _stats = measure::enable_bpf_stats().context("enabling BPF run-time statistics")?;
        let u = l.ctx.new_flows_measured(p.new_flow_secs)?;
        r.add("bpf_ns_newflow", l.mode, u.bpf_ns_per_pkt);
        Ok(format!("{:.0} ns/pkt", u.bpf_ns_per_pkt))
    }),
    ("new flows, 100 rules", |p, l, r| {
        let Some(gw) = l.running.gateway.as_ref() else {
            r.skip(
                "newflow_rules_ratio",
                l.mode,
                "no policy rules in this mode",
            );
            return Ok("-".into());
        };
        // Alternating, in one topology: none, 100, 100, none.
        let mut rates = [0.0; 2];
        for rules in [0, 100, 100, 0] {
            modes::reload(gw, l.mode, rules)?;
            rates[usize::from(rules > 0)] += l.ctx.new_flows(p.new_flow_secs)?;
        }
        modes::reload(gw, l.mode, 0)?;
        let ratio = rates[1] / rates[0];
        r.add("newflow_rules_ratio", l.mode, ratio);
        Ok(format!("{ratio:.2}×"))
    }),
];

/// A round: the four modes up side by side in topologies of their own,
/// and every step run on each mode in turn (in an order that rotates from
/// round to round), so that the modes of one metric are measured within
/// seconds of each other.
fn run_round(plan: &Plan, round: usize, exe: &Path, r: &mut Results) -> Result<()> {
    let order = rotated(round);
    let nets: Vec<Net> = order.iter().map(|_| Net::build()).collect();
    let mut live = Vec::new();
    for (&mode, net) in order.iter().zip(&nets) {
        let running = modes::start(mode, net);
        live.push(Live {
            mode,
            net,
            ctx: ctx(net, exe, &running)?,
            running,
        });
    }
    for (name, step) in STEPS {
        interrupted()?;
        let mut line = format!("  {name}:");
        for l in &live {
            match step(plan, l, r).with_context(|| format!("{name}, {}", l.mode.name())) {
                Ok(v) => line += &format!(" {} {v};", l.mode.name()),
                Err(e) => {
                    eprintln!("warning: round {}: {e:#}", round + 1);
                    r.meta
                        .notes
                        .push(format!("Failed: round {}: {e:#}", round + 1));
                }
            }
        }
        println!("{line}");
    }
    Ok(())
}

/// 64-byte UDP through the seed's topology, where ISP routers drop
/// sources other than their customer's: plain routing's packets, left
/// untranslated, die one hop after the gateway, so its rate is counted
/// where every mode's is, leaving the gateway.
fn seed_cell(plan: &Plan, mode: Mode, exe: &Path, r: &mut Results) -> Result<()> {
    let net = Net::build_seed();
    let running = modes::start(mode, &net);
    let c = ctx(&net, exe, &running)?;
    let u = c.udp(256, 10, plan.udp_warmup, plan.udp_window)?;
    r.add("udp_pps_seed", mode, u.pps / 1e3);
    println!("seed topology: {} {:.0} kpps", mode.name(), u.pps / 1e3);
    Ok(())
}

/// 64-byte IPv6 UDP over 256 flows: plain routing, multihome's NPTv6, and
/// nftables' `snat prefix`, each in a topology of its own.
fn ipv6_cell(plan: &Plan, mode: Mode, exe: &Path, r: &mut Results) -> Result<()> {
    if mode == Mode::Seed {
        r.skip("udp6_pps", mode, "the seed's iptables recipe is IPv4 only");
        return Ok(());
    }
    let net = Net::build_ipv6();
    let running = modes::start(mode, &net);
    let c = ctx(&net, exe, &running)?;
    let u = c.udp(256, 10, plan.udp_warmup, plan.udp_window)?;
    r.add("udp6_pps", mode, u.pps / 1e3);
    println!("IPv6: {} {:.0} kpps", mode.name(), u.pps / 1e3);
    Ok(())
}

/// Forwarding rate and memory with many live flows, on a fresh topology.
fn scale_cell(plan: &Plan, mode: Mode, exe: &Path, r: &mut Results) -> Result<()> {
    let ids = [
        ("scale_100k_ratio", "mem_100k"),
        ("scale_1m_ratio", "mem_1m"),
    ];
    if mode == Mode::Plain {
        for (ratio, mem) in ids {
            r.skip(ratio, mode, "plain routing keeps no per-flow state");
            r.skip(mem, mode, "plain routing keeps no per-flow state");
        }
        return Ok(());
    }
    let net = Net::build();
    let running = modes::start(mode, &net);
    let c = ctx(&net, exe, &running)?;
    let empty = c.udp(256, 10, plan.udp_warmup, plan.udp_window)?.pps;
    for (&n, (ratio_id, mem_id)) in plan.scale_sizes.iter().zip(ids) {
        if !mode.is_multihome() && n > CONNTRACK_MAX {
            let why =
                "over nf_conntrack_max (262144, global to the kernel; the bench leaves it alone)";
            r.skip(ratio_id, mode, why);
            r.skip(mem_id, mode, why);
            continue;
        }
        let slab_before = slab_bytes()?;
        let sent = c.populate(n)?;
        let live = live_flows(&net, &running)?;
        let per_flow = match &running.gateway {
            Some(g) => map_bytes(g.pin_dir())? as f64 / modes::MAX_FLOWS as f64,
            None => slab_bytes()?.saturating_sub(slab_before) as f64 / live.max(1) as f64,
        };
        let rate = c.udp(256, 10, plan.udp_warmup, plan.udp_window)?.pps;
        println!(
            "  {n} flows sent, {sent} delivered, {live} live: {:.0} kpps ({:.2}× empty), {per_flow:.0} B/flow",
            rate / 1e3,
            rate / empty
        );
        anyhow::ensure!(
            live + 1000 >= n,
            "only {live} of {n} flows are live in the {} state table",
            mode.name()
        );
        r.add(ratio_id, mode, rate / empty);
        r.add(mem_id, mode, per_flow);
    }
    Ok(())
}

/// Flows in the gateway's state table: multihome's map, or nf_conntrack.
fn live_flows(net: &Net, running: &modes::Running) -> Result<u64> {
    match &running.gateway {
        Some(g) => {
            let out = g.cli(&["status", "--json"]);
            anyhow::ensure!(out.status.success(), "multihome status failed: {out:?}");
            let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
            v["flows"].as_u64().context("no flows in status --json")
        }
        None => net
            .gw
            .sysctl_get("net.netfilter.nf_conntrack_count")
            .parse()
            .context("reading nf_conntrack_count"),
    }
}

/// Memory of multihome's two connection maps, as the kernel accounts it.
fn map_bytes(pin: &Path) -> Result<u64> {
    ["CONN_FWD", "CONN_REV"]
        .iter()
        .map(|m| {
            let path = pin.join(m);
            let out = std::process::Command::new("bpftool")
                .args(["-j", "map", "show", "pinned"])
                .arg(&path)
                .output()
                .context("running bpftool map show")?;
            let v: serde_json::Value = serde_json::from_slice(&out.stdout)
                .with_context(|| format!("bpftool map show {}", path.display()))?;
            v["bytes_memlock"]
                .as_u64()
                .with_context(|| format!("no bytes_memlock for {}", path.display()))
        })
        .sum()
}

/// The kernel's slab memory (`Slab:` in /proc/meminfo), in bytes.
fn slab_bytes() -> Result<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").context("reading /proc/meminfo")?;
    text.lines()
        .find_map(|l| l.strip_prefix("Slab:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .context("no Slab: line in /proc/meminfo")
}

fn meta(plan: &Plan, quick: bool) -> results::Meta {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let date = util::cmd("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    results::Meta {
        date,
        cpu,
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        kernel,
        rounds: plan.rounds,
        quick,
        seconds: 0.0,
        notes: vec![
            "Topology: client — gateway — internet host, one veth pair per link, two uplinks. \
             Each round builds one such topology per mode, all five up at once, and runs \
             every measurement on each mode in turn (A B C D E, order rotating by round); \
             the scale rounds build fresh ones. The seed's-topology row puts an ISP router \
             per uplink (iptables dropping sources other than its customer's) between the \
             gateway and the internet host, in fresh topologies, and counts packets leaving \
             the gateway: plain routing's, untranslated, die at the ISP."
                .into(),
            "multihome-xdp: `xdp = \"native\"` (the XDP programs on every interface) and GRO \
             on at both ends of every link, which XDP redirects into veth need; `multihome` \
             runs the default, `xdp = \"auto\"`, which attaches no XDP on veth."
                .into(),
            "Loads and the whole forwarding path run on CPU 0 (`taskset -c 0`, no RPS); \
             the bench and the multihome daemon on CPU 1."
                .into(),
            "veth offloads as the kernel sets them (TX checksum, TSO, GSO on) except in the \
             offload-off row, where `ethtool -K tx off rx off tso off gso off` is applied to \
             every link."
                .into(),
            "UDP: 64-byte payloads from a raw AF_PACKET sender (PACKET_QDISC_BYPASS, sendmmsg \
             in batches of 64); rates are packets delivered to the far end, counted on its \
             interfaces. CPU per packet: busy time of CPU 0 (/proc/stat), plus the \
             multihome daemon's own CPU time, ÷ packets delivered."
                .into(),
            "seed: the recipe's rules with `iptables` (Debian's nf_tables backend), plus \
             `lookup main suppress_prefixlength 0` first; its `fwmark 1 lookup 2` typo is kept."
                .into(),
            format!(
                "multihome: weights 1:1, max_flows = {} and max_flows_per_host the same (the one \
                 client stands for a whole LAN; preallocated; memory per flow is the \
                 maps' memory ÷ max_flows). nf_conntrack: growth of the kernel's slab memory ÷ \
                 live entries.",
                modes::MAX_FLOWS
            ),
            format!(
                "Timing per round: TCP {} s per run, UDP {:.1} s window, new flows {:.1} s, \
                 wrk {} s, {} request/response round trips.",
                plan.tcp_secs,
                plan.udp_window.as_secs_f64(),
                plan.new_flow_secs,
                plan.wrk_secs,
                plan.rr_count
            ),
        ],
    }
}

/// Writes results.json, BENCHMARKS.md (keeping its hand-written analysis)
/// and the plot into `out`.
fn write(out: &Path, r: &Results) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let json = out.join("benchmarks.json");
    std::fs::write(&json, serde_json::to_string_pretty(r)?)
        .with_context(|| format!("writing {}", json.display()))?;
    let md = out.join("BENCHMARKS.md");
    let existing = std::fs::read_to_string(&md).unwrap_or_default();
    let plot = "benchmarks.svg";
    std::fs::write(out.join(plot), report::svg(r))?;
    std::fs::write(
        &md,
        report::markdown(r, plot, report::kept_analysis(&existing)),
    )
    .with_context(|| format!("writing {}", md.display()))?;
    println!(
        "wrote {}, {} and {} ({:.0} s)",
        md.display(),
        out.join(plot).display(),
        json.display(),
        r.meta.seconds
    );
    Ok(())
}
