//! One measurement each: run a load through a [`Net`] whose gateway is up
//! in some mode, and return the figure. Loads run on CPU 0 with the
//! whole forwarding path (DESIGN.md §11); the bench itself and the daemon
//! stay on CPU 1.
use std::{
    os::fd::{FromRawFd as _, OwnedFd},
    path::PathBuf,
    thread::sleep,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use testbed::{NetNs, Proc};

use super::topo::{CLIENT, CLIENT6, Net, SERVICE, SINK_BASE, SINK6_BASE};

/// The CPU every load and the forwarding path run on.
const LOAD_CPU: &str = "0";

/// What the loads need to know, fixed for a topology.
pub struct Ctx<'a> {
    pub net: &'a Net,
    /// This xtask binary, for the `bench-tool` subcommands.
    pub exe: PathBuf,
    pub gw_mac: String,
    pub client_mac: String,
    /// The multihome daemon, whose CPU time counts too.
    pub daemon: Option<u32>,
}

/// `cmd` run on the load CPU.
fn pinned<S: AsRef<str>>(cmd: &[S]) -> Vec<&str> {
    ["taskset", "-c", LOAD_CPU]
        .into_iter()
        .chain(cmd.iter().map(AsRef::as_ref))
        .collect()
}

fn spawn<S: AsRef<str>>(ns: &NetNs, cmd: &[S]) -> Proc {
    ns.spawn(&pinned(cmd))
}

fn run(ns: &NetNs, cmd: &[&str], timeout: Duration) -> Result<String> {
    let cmd = pinned(cmd);
    let out = ns.try_exec_timeout(&cmd, timeout);
    ensure!(
        out.status.success(),
        "`{}` in {} failed: {}{}",
        cmd.join(" "),
        ns.name(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Clock ticks per second of /proc's CPU times.
fn hz() -> u64 {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).max(1) as u64
}

/// Busy time of the load CPU so far (`/proc/stat`).
fn load_cpu_busy_ns() -> Result<u64> {
    let text = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let prefix = format!("cpu{LOAD_CPU} ");
    let line = text
        .lines()
        .find(|l| l.starts_with(&prefix))
        .with_context(|| format!("no {prefix:?} line in /proc/stat"))?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    ensure!(f.len() >= 8, "unexpected /proc/stat line {line:?}");
    // user nice system idle iowait irq softirq steal
    let busy = f[0] + f[1] + f[2] + f[5] + f[6] + f[7];
    Ok(busy * 1_000_000_000 / hz())
}

/// CPU time a process has used so far (`/proc/PID/stat`), 0 if gone.
fn process_ns(pid: u32) -> u64 {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    // After the parenthesised command: state (field 3) ... utime (14), stime (15).
    let rest = text.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    (ticks(11) + ticks(12)) * 1_000_000_000 / hz()
}

/// Run time of multihome's programs (kernel-wide `mh_*` programs): all
/// of them, and the XDP ones (`mh_xdp_*`) alone, ns.
fn bpf_run_ns() -> Result<(u64, u64)> {
    let out = std::process::Command::new("bpftool")
        .args(["-j", "prog", "show"])
        .output()
        .context("running bpftool prog show")?;
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("parsing bpftool prog show")?;
    let mut sums = (0, 0);
    for p in v.as_array().into_iter().flatten() {
        let (Some(name), Some(ns)) = (p["name"].as_str(), p["run_time_ns"].as_u64()) else {
            continue;
        };
        if name.starts_with("mh_") {
            sums.0 += ns;
        }
        if name.starts_with("mh_xdp_") {
            sums.1 += ns;
        }
    }
    Ok(sums)
}

/// Turns on the kernel's BPF run-time statistics for as long as the
/// returned fd lives (`BPF_ENABLE_STATS`: no sysctl is changed).
pub fn enable_bpf_stats() -> Result<OwnedFd> {
    const BPF_ENABLE_STATS: libc::c_long = 32;
    let attr = [0u32; 4]; // type = BPF_STATS_RUN_TIME
    // SAFETY: attr is a valid, zero-padded bpf_attr prefix of the given size.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_ENABLE_STATS, attr.as_ptr(), 16usize) };
    if fd < 0 {
        bail!("BPF_ENABLE_STATS: {}", std::io::Error::last_os_error());
    }
    // SAFETY: a new fd owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

struct Snapshot {
    at: Instant,
    delivered: u64,
    busy_ns: u64,
    bpf_ns: u64,
    bpf_xdp_ns: u64,
}

impl Snapshot {
    fn take(net: &Net, daemon: Option<u32>) -> Result<Snapshot> {
        // Only multihome (the mode with a daemon) runs BPF programs.
        let (bpf_ns, bpf_xdp_ns) = if daemon.is_some() {
            bpf_run_ns()?
        } else {
            (0, 0)
        };
        Ok(Snapshot {
            at: Instant::now(),
            delivered: net.delivered(),
            busy_ns: load_cpu_busy_ns()? + daemon.map_or(0, process_ns),
            bpf_ns,
            bpf_xdp_ns,
        })
    }
}

/// What a UDP run delivered.
#[derive(Debug, Clone, Copy)]
pub struct UdpRate {
    pub pps: f64,
    pub cpu_ns_per_pkt: f64,
    pub bpf_ns_per_pkt: f64,
    /// Of `bpf_ns_per_pkt`, the XDP programs'.
    pub bpf_xdp_ns_per_pkt: f64,
}

fn rate(a: &Snapshot, b: &Snapshot) -> Result<UdpRate> {
    let pkts = b.delivered.saturating_sub(a.delivered);
    ensure!(pkts > 0, "no packet reached the internet host");
    let secs = (b.at - a.at).as_secs_f64();
    Ok(UdpRate {
        pps: pkts as f64 / secs,
        cpu_ns_per_pkt: b.busy_ns.saturating_sub(a.busy_ns) as f64 / pkts as f64,
        bpf_ns_per_pkt: b.bpf_ns.saturating_sub(a.bpf_ns) as f64 / pkts as f64,
        bpf_xdp_ns_per_pkt: b.bpf_xdp_ns.saturating_sub(a.bpf_xdp_ns) as f64 / pkts as f64,
    })
}

impl Ctx<'_> {
    /// Starts the raw sender in the client: `flows` flows to `dport`,
    /// for as long as `how` says (`--seconds=S` or `--once`).
    fn start_blast(&self, flows: u64, dport: u16, how: &str) -> Proc {
        let exe = self.exe.display().to_string();
        // The IPv6 topology carries IPv6 load.
        let (src, dst) = if self.net.ipv6 {
            (
                format!("--src={CLIENT6}"),
                format!("--dst-base={SINK6_BASE}"),
            )
        } else {
            (format!("--src={CLIENT}"), format!("--dst-base={SINK_BASE}"))
        };
        let cmd = [
            exe.as_str(),
            "bench-tool",
            "blast",
            "--ifname",
            "lan0",
            "--dst-mac",
            &self.gw_mac,
            "--src-mac",
            &self.client_mac,
            &src,
            &dst,
            &format!("--dport={dport}"),
            &format!("--flows={flows}"),
            how,
        ];
        spawn(&self.net.client, &cmd)
    }

    /// 64-byte UDP over `flows` flows: the rate delivered over `window`,
    /// after `warmup` (in which the flows are set up).
    pub fn udp(
        &self,
        flows: u64,
        dport: u16,
        warmup: Duration,
        window: Duration,
    ) -> Result<UdpRate> {
        let secs = (warmup + window).as_secs_f64() + 0.3;
        let sender = self.start_blast(flows, dport, &format!("--seconds={secs}"));
        sleep(warmup);
        let a = Snapshot::take(self.net, self.daemon)?;
        sleep(window);
        let b = Snapshot::take(self.net, self.daemon)?;
        finish(&sender, secs)?;
        rate(&a, &b)
    }

    /// Every packet a new flow, for `secs`: new flows per second
    /// delivered.
    pub fn new_flows(&self, secs: f64) -> Result<f64> {
        Ok(self.new_flows_measured(secs)?.pps)
    }

    /// [`Self::new_flows`], with the CPU and BPF time per packet as for
    /// UDP.
    pub fn new_flows_measured(&self, secs: f64) -> Result<UdpRate> {
        let a = Snapshot::take(self.net, self.daemon)?;
        let sender = self.start_blast(1 << 24, 9, &format!("--seconds={secs}"));
        finish(&sender, secs)?;
        sleep(Duration::from_millis(50));
        let b = Snapshot::take(self.net, self.daemon)?;
        // The rate over the sender's own time, not the snapshots'.
        let pkts = b.delivered.saturating_sub(a.delivered);
        Ok(UdpRate {
            pps: pkts as f64 / secs,
            ..rate(&a, &b)?
        })
    }

    /// Sends flows `0..n` once each (dport 9), leaving them live in the
    /// gateway's state table; returns how many reached the far end.
    pub fn populate(&self, n: u64) -> Result<u64> {
        let before = self.net.delivered();
        let sender = self.start_blast(n, 9, "--once");
        finish(&sender, 120.0)?;
        sleep(Duration::from_millis(100));
        Ok(self.net.delivered() - before)
    }

    /// iperf3 for `secs`: received Gbit/s.
    pub fn tcp(&self, streams: u32, secs: u32) -> Result<f64> {
        let server = spawn(
            &self.net.inet,
            &["iperf3", "-s", "-B", &SERVICE.to_string(), "-p", "5201"],
        );
        wait_port(&self.net.client, 5201)?;
        let out = run(
            &self.net.client,
            &[
                "iperf3",
                "-c",
                &SERVICE.to_string(),
                "-p",
                "5201",
                "-J",
                "-t",
                &secs.to_string(),
                "-P",
                &streams.to_string(),
            ],
            Duration::from_secs(u64::from(secs) + 20),
        );
        server.kill();
        let out = out?;
        let v: serde_json::Value = serde_json::from_str(&out).context("parsing iperf3 -J")?;
        v["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .map(|b| b / 1e9)
            .with_context(|| format!("no received rate in iperf3's report: {out}"))
    }

    /// wrk with `Connection: close` against nginx: connections per second,
    /// and the number of socket errors.
    pub fn conn_rate(&self, secs: u32) -> Result<(f64, u64)> {
        let dir = std::env::temp_dir().join(format!("{}-nginx", self.net.inet.name()));
        std::fs::create_dir_all(&dir)?;
        let d = dir.display();
        let conf = format!(
            "worker_processes 1; master_process off; daemon off;\n\
             pid {d}/nginx.pid; error_log {d}/error.log;\n\
             events {{ worker_connections 4096; }}\n\
             http {{ access_log off;\n\
               client_body_temp_path {d}/body; proxy_temp_path {d}/proxy;\n\
               fastcgi_temp_path {d}/fcgi; uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;\n\
               server {{ listen {SERVICE}:80 backlog=4096; location / {{ return 200 \"ok\\n\"; }} }}\n\
             }}\n"
        );
        std::fs::write(dir.join("nginx.conf"), conf)?;
        let conf_path = dir.join("nginx.conf").display().to_string();
        let server = spawn(
            &self.net.inet,
            &["nginx", "-c", &conf_path, "-p", &d.to_string()],
        );
        wait_port(&self.net.client, 80).with_context(|| format!("nginx: {}", server.log()))?;
        let out = run(
            &self.net.client,
            &[
                "wrk",
                "-t1",
                "-c32",
                &format!("-d{secs}s"),
                "--timeout",
                "2s",
                "-H",
                "Connection: close",
                &format!("http://{SERVICE}/"),
            ],
            Duration::from_secs(u64::from(secs) + 20),
        );
        server.kill();
        let _ = std::fs::remove_dir_all(&dir);
        parse_wrk(&out?)
    }

    /// Request/response round trips over one TCP connection: (p50, p99) µs.
    pub fn latency(&self, count: usize) -> Result<(f64, f64)> {
        let exe = self.exe.to_str().unwrap_or("xtask");
        let listen = format!("{SERVICE}:7000");
        let server = spawn(
            &self.net.inet,
            &[exe, "bench-tool", "rr-server", "--listen", &listen],
        );
        wait_port(&self.net.client, 7000)?;
        let out = run(
            &self.net.client,
            &[
                exe,
                "bench-tool",
                "rr-client",
                "--server",
                &listen,
                "--count",
                &count.to_string(),
            ],
            Duration::from_secs(60),
        );
        server.kill();
        let out = out?;
        let mut it = out.split_whitespace().map(str::parse::<f64>);
        match (it.next(), it.next()) {
            (Some(Ok(p50)), Some(Ok(p99))) => Ok((p50, p99)),
            _ => bail!("rr-client printed {out:?}"),
        }
    }
}

/// Waits for a sender started for about `secs` to end successfully.
fn finish(p: &Proc, secs: f64) -> Result<()> {
    let st = p
        .wait_timeout(Duration::from_secs_f64(secs + 10.0))
        .with_context(|| format!("the load generator hung: {}", p.log()))?;
    ensure!(st.success(), "the load generator failed: {}", p.log());
    Ok(())
}

/// Waits until something listens on `SERVICE:port`, probing from `ns`.
fn wait_port(ns: &NetNs, port: u16) -> Result<()> {
    let addr = std::net::SocketAddr::from((SERVICE, port));
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        let ok = ns.run(|| {
            std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
        });
        if ok {
            return Ok(());
        }
        sleep(Duration::from_millis(50));
    }
    bail!("nothing listens on {addr} after 5 s")
}

fn parse_wrk(out: &str) -> Result<(f64, u64)> {
    let rps = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .with_context(|| format!("no Requests/sec in wrk's output: {out}"))?;
    // "Socket errors: connect 0, read 0, write 0, timeout 0"
    let errors = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("Socket errors:"))
        .map(|rest| {
            rest.split(',')
                .filter_map(|p| p.split_whitespace().last()?.parse::<u64>().ok())
                .sum()
        })
        .unwrap_or(0);
    Ok((rps, errors))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_output_gives_rate_and_socket_errors() {
        let out = "Running 3s test @ http://198.18.250.10/\n  1 threads and 32 connections\n\
                   15001 requests in 3.00s, 1.2MB read\n  Socket errors: connect 2, read 3, write 0, timeout 1\n\
                   Requests/sec:   5000.33\nTransfer/sec:    400KB\n";
        assert_eq!(parse_wrk(out).expect("parsed"), (5000.33, 6));
        assert_eq!(parse_wrk("Requests/sec: 10\n").expect("parsed"), (10.0, 0));
        assert!(parse_wrk("nothing").is_err());
    }

    #[test]
    fn own_cpu_time_moves_forward_while_spinning() {
        let me = std::process::id();
        let a = process_ns(me);
        let t = Instant::now();
        while t.elapsed() < Duration::from_millis(200) {}
        assert!(
            process_ns(me) >= a + 10_000_000,
            "{a} -> {}",
            process_ns(me)
        );
        assert!(load_cpu_busy_ns().expect("cpu0 line") > 0);
        assert_eq!(process_ns(u32::MAX), 0, "a missing process counts 0");
    }
}
