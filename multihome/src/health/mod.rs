//! Per-uplink health probes with hysteresis, in the spirit of mwan3 and
//! dpinger: every interval one round probes all targets in parallel
//! through the uplink only (device, source address and mark), and a run of
//! bad or good rounds flips the uplink down or up.
//!
//! An uplink starts healthy, so a fresh daemon forwards at once; it goes
//! down after `down_after` bad rounds in a row and up again after
//! `up_after` good ones. At most one round is in flight: when a round
//! outlasts the interval, the next one starts as soon as it ends.
pub mod passive;

use std::{
    collections::VecDeque,
    fmt::Write as _,
    io,
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    sync::atomic::{AtomicU16, Ordering},
    time::Duration,
};

use anyhow::Context as _;
use libc::c_int;
use serde::Deserialize;
use tokio::{
    io::{Interest, unix::AsyncFd},
    net::TcpSocket,
    sync::{mpsc, watch},
    task::JoinHandle,
    time::Instant,
};

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    /// Addresses to probe; a round asks each of them once. Empty: no
    /// probes (live traffic and the link alone tell).
    #[serde(default)]
    pub targets: Vec<Ipv4Addr>,
    /// Time between round starts.
    #[serde(default = "ms_1000")]
    pub interval_ms: u64,
    /// How long a probe waits for its answer.
    #[serde(default = "ms_1000")]
    pub timeout_ms: u64,
    /// Bad rounds in a row that take a healthy uplink down.
    #[serde(default = "three")]
    pub down_after: u32,
    /// Good rounds in a row that bring an unhealthy uplink back.
    #[serde(default = "three")]
    pub up_after: u32,
    /// A round is good when at least this many targets answered.
    #[serde(default = "one")]
    pub min_success: u32,
    /// A round whose median RTT is above this is bad.
    #[serde(default)]
    pub max_rtt_ms: Option<u32>,
    /// A round is bad when the loss over the last `window` rounds is above
    /// this percentage.
    #[serde(default)]
    pub max_loss_pct: Option<u32>,
    /// Rounds over which loss and the reported RTT are computed.
    #[serde(default = "ten")]
    pub window: u32,
    #[serde(default)]
    pub method: ProbeMethod,
    /// Port for `method = "tcp"` (required there, refused otherwise).
    #[serde(default)]
    pub tcp_port: Option<u16>,
    #[serde(default)]
    pub on_down: OnDown,
    #[serde(default)]
    pub on_up: OnUp,
    /// `on_up = "return-idle"`: how long a failed-over flow must be idle
    /// before it moves back.
    #[serde(default = "s_30")]
    pub return_idle_s: u64,
    /// How long an uplink must stay down (probes, carrier or interface)
    /// before `on_down` acts on its flows; a shorter flap moves nothing.
    #[serde(default = "ms_1000")]
    pub confirm_ms: u64,
    /// How long an uplink stays out of use after it comes back from an
    /// outage, so that a flapping one does not keep taking flows.
    #[serde(default)]
    pub hold_down_ms: u64,
    /// Watch live TCP: SYNs or data sent again to several remotes, left
    /// unanswered, take the uplink down before a probe notices.
    #[serde(default = "yes")]
    pub passive: bool,
    /// How long a SYN waits for its SYN-ACK before it counts as
    /// unanswered.
    #[serde(default = "ms_1000")]
    pub syn_timeout_ms: u64,
    /// Distinct remotes whose SYNs went unanswered (with no SYN-ACK at all
    /// since) before live traffic takes the uplink down.
    #[serde(default = "three")]
    pub passive_min_destinations: u32,
    /// How long live traffic keeps the uplink down before a share of new
    /// flows tries it again (and how long that trial lasts).
    #[serde(default = "ms_10000")]
    pub passive_hold_ms: u64,
    /// Degraded (no new flows while another uplink is healthy) while the
    /// mean SYN to SYN-ACK time over the last 10 s is above this.
    #[serde(default)]
    pub degraded_syn_rtt_ms: Option<u32>,
    /// Degraded while fewer than this percentage of SYNs over the last
    /// 10 s are answered.
    #[serde(default)]
    pub degraded_answered_pct: Option<u32>,
    /// Degraded while more than this percentage of the packets sent over
    /// the last 10 s are TCP retransmissions.
    #[serde(default)]
    pub degraded_retransmit_pct: Option<u32>,
}

impl passive::PassiveConfig {
    /// From the uplink's `[uplink.health]`, or the defaults without one.
    pub fn of(health: Option<&HealthConfig>) -> Self {
        let ms = |v: u64| v * 1_000_000;
        Self {
            enabled: health.is_none_or(|h| h.passive),
            syn_timeout_ns: ms(health.map_or_else(ms_1000, |h| h.syn_timeout_ms)),
            min_destinations: health.map_or_else(three, |h| h.passive_min_destinations) as usize,
            hold_ns: ms(health.map_or_else(ms_10000, |h| h.passive_hold_ms)),
            degraded_rtt_ns: health
                .and_then(|h| h.degraded_syn_rtt_ms)
                .map(|v| ms(v.into())),
            degraded_answered_pct: health.and_then(|h| h.degraded_answered_pct),
            degraded_retransmit_pct: health.and_then(|h| h.degraded_retransmit_pct),
        }
    }
}

/// What happens to an uplink's flows when it goes down, for an uplink with
/// or without probes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DownPolicy {
    pub on_down: OnDown,
    pub on_up: OnUp,
    pub confirm: std::time::Duration,
    pub hold_down: std::time::Duration,
    /// `on_up = "return-idle"`: how long a flow must be idle to move back.
    pub return_idle: std::time::Duration,
}

impl DownPolicy {
    /// From the uplink's `[uplink.health]`, or the defaults without one.
    pub fn of(health: Option<&HealthConfig>) -> Self {
        Self {
            on_down: health.map(|h| h.on_down).unwrap_or_default(),
            on_up: health.map(|h| h.on_up).unwrap_or_default(),
            // Without [uplink.health], the same defaults as serde fills in.
            confirm: std::time::Duration::from_millis(
                health.map_or_else(ms_1000, |h| h.confirm_ms),
            ),
            hold_down: std::time::Duration::from_millis(health.map_or(0, |h| h.hold_down_ms)),
            return_idle: std::time::Duration::from_secs(
                health.map_or_else(s_30, |h| h.return_idle_s),
            ),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ProbeMethod {
    /// ICMP echo.
    #[default]
    Icmp,
    /// A TCP connect; an accept or a reset both mean the path works.
    Tcp,
}

/// What happens to an uplink's flows when it goes down.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum OnDown {
    /// Reset TCP flows (the LAN host's next segment is answered with an
    /// RST, so the application learns at once) and move the rest.
    #[default]
    Reset,
    /// Purge every flow, so all of them move to other uplinks.
    Purge,
    /// Keep every flow; only new flows avoid the uplink.
    Keep,
    /// Purge all but TCP flows: TCP would break anyway when it moves, and
    /// may survive a short outage.
    PurgeUdp,
}

impl OnDown {
    /// Whether a flow of IP protocol `proto` is purged when its uplink
    /// goes down.
    pub fn purges(self, proto: u8) -> bool {
        match self {
            OnDown::Reset | OnDown::Purge => true,
            OnDown::Keep => false,
            OnDown::PurgeUdp => c_int::from(proto) != libc::IPPROTO_TCP,
        }
    }
}

/// What happens to flows that failed over when an uplink comes back.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum OnUp {
    /// Move nothing; only new flows use the uplink again.
    #[default]
    Stay,
    /// Purge the flows that failed over, so they come back.
    Return,
    /// Move the flows that failed over back once each has been idle for
    /// `return_idle_s` (under a `source` or `site` policy: once all of its
    /// host's have), so that a busy flow is never cut.
    ReturnIdle,
}

fn ms_1000() -> u64 {
    1000
}

fn s_30() -> u64 {
    30
}

fn ms_10000() -> u64 {
    10_000
}

fn yes() -> bool {
    true
}

fn one() -> u32 {
    1
}

fn three() -> u32 {
    3
}

fn ten() -> u32 {
    10
}

impl HealthConfig {
    /// Every problem, each prefixed with `at` (where the table is), naming
    /// the field and the fix.
    pub fn problems(&self, at: &str) -> Vec<String> {
        let mut out = Vec::new();
        let mut bad = |msg: String| out.push(format!("{at}: {msg}"));
        for (i, t) in self.targets.iter().enumerate() {
            if t.is_unspecified() || t.is_broadcast() || t.is_multicast() || t.is_loopback() {
                bad(format!(
                    "`targets[{i}]` = {t} is not a unicast address beyond this host"
                ));
            } else if self.targets[..i].contains(t) {
                bad(format!("`targets[{i}]` = {t} is listed twice"));
            }
        }
        if self.interval_ms < 100 {
            bad(format!(
                "`interval_ms` = {}: probe at most every 100 ms",
                self.interval_ms
            ));
        }
        if self.timeout_ms < 10 {
            bad(format!(
                "`timeout_ms` = {}: give probes at least 10 ms",
                self.timeout_ms
            ));
        }
        if self.down_after == 0 {
            bad("`down_after` must be at least 1 round".into());
        }
        for (key, v) in [
            ("confirm_ms", self.confirm_ms),
            ("hold_down_ms", self.hold_down_ms),
            ("passive_hold_ms", self.passive_hold_ms),
        ] {
            if v > 600_000 {
                bad(format!("`{key}` = {v}: at most 600000 (ten minutes)"));
            }
        }
        if !(1..=86_400).contains(&self.return_idle_s) {
            bad(format!(
                "`return_idle_s` = {}: pick 1 to 86400",
                self.return_idle_s
            ));
        }
        if !(100..=60_000).contains(&self.syn_timeout_ms) {
            bad(format!(
                "`syn_timeout_ms` = {}: pick 100 to 60000",
                self.syn_timeout_ms
            ));
        }
        if self.degraded_syn_rtt_ms == Some(0) {
            bad("`degraded_syn_rtt_ms` must be at least 1, or omitted".into());
        }
        if self
            .degraded_answered_pct
            .is_some_and(|p| p == 0 || p > 100)
        {
            bad("`degraded_answered_pct` must be 1 to 100, or omitted".into());
        }
        if self
            .degraded_retransmit_pct
            .is_some_and(|p| p == 0 || p > 100)
        {
            bad("`degraded_retransmit_pct` must be 1 to 100, or omitted".into());
        }
        if self.passive_min_destinations == 0 {
            bad("`passive_min_destinations` must be at least 1".into());
        }
        if self.up_after == 0 {
            bad("`up_after` must be at least 1 round".into());
        }
        let n = self.targets.len();
        if self.min_success == 0 || self.min_success as usize > n.max(1) {
            bad(format!(
                "`min_success` = {} with {n} target(s): pick 1 to {}",
                self.min_success,
                n.max(1)
            ));
        }
        if self.max_rtt_ms == Some(0) {
            bad("`max_rtt_ms` must be at least 1, or omitted".into());
        }
        if let Some(p) = self.max_loss_pct
            && p >= 100
        {
            bad(format!(
                "`max_loss_pct` = {p} never triggers: use 0 to 99, or omit it"
            ));
        }
        if self.window == 0 || self.window > 1000 {
            bad(format!("`window` = {}: pick 1 to 1000 rounds", self.window));
        }
        match (self.method, self.tcp_port) {
            (ProbeMethod::Tcp, None) => {
                bad("`method = \"tcp\"` needs `tcp_port`, e.g. tcp_port = 443".into());
            }
            (ProbeMethod::Tcp, Some(0)) => bad("`tcp_port` must be 1 to 65535".into()),
            (ProbeMethod::Icmp, Some(_)) => {
                bad(
                    "`tcp_port` is only used with `method = \"tcp\"`: remove it or set the method"
                        .into(),
                );
            }
            _ => {}
        }
        out
    }
}

/// Where and how to probe one uplink right now; None while the uplink has
/// no address / link down.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeBinding {
    pub ifname: String,
    pub source: Ipv4Addr,
    /// Must select the uplink's routing table (its policy rule).
    pub mark: u32,
}

#[derive(Clone, Debug, PartialEq)]
pub struct HealthReport {
    pub uplink: usize,
    pub healthy: bool,
    /// The state flipped with this round.
    pub changed: bool,
    /// Mean RTT over the window; None when nothing answered in it.
    pub rtt_ms: Option<f64>,
    /// Loss over the window.
    pub loss_pct: f64,
    pub reason: String,
}

/// Spawns the prober task for uplink `uplink`. It probes every interval
/// while the binding is Some, sends a report to `tx` after every round
/// (changed=true on a state transition), and stops when `binding` is
/// closed (sender dropped) or `tx`'s receiver is gone.
///
/// While the binding is None it reports nothing and resets its counters
/// and window, but keeps the state: an uplink that was down must earn its
/// way back with `up_after` good rounds. A new binding discards the round
/// in flight.
pub fn spawn(
    uplink: usize,
    cfg: HealthConfig,
    binding: watch::Receiver<Option<ProbeBinding>>,
    tx: mpsc::Sender<HealthReport>,
) -> JoinHandle<()> {
    tokio::spawn(run(uplink, cfg, binding, tx))
}

async fn run(
    uplink: usize,
    cfg: HealthConfig,
    mut binding: watch::Receiver<Option<ProbeBinding>>,
    tx: mpsc::Sender<HealthReport>,
) {
    let mut monitor = Monitor::new(&cfg);
    let interval = Duration::from_millis(cfg.interval_ms);
    let mut seq = 0u16;
    loop {
        let current = binding.borrow_and_update().clone();
        let Some(b) = &current else {
            monitor.reset();
            if !changed_from(&mut binding, &current).await {
                return;
            }
            continue;
        };
        let started = Instant::now();
        let round = tokio::select! {
            r = probe_round(&cfg, b, seq) => r,
            alive = changed_from(&mut binding, &current) => {
                if !alive {
                    return;
                }
                continue;
            }
        };
        seq = seq.wrapping_add(cfg.targets.len() as u16);
        if tx.send(monitor.record(uplink, &round)).await.is_err() {
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep_until(started + interval) => {}
            alive = changed_from(&mut binding, &current) => if !alive {
                return;
            },
        }
    }
}

/// Waits until the binding differs from `current` (a resend of the same
/// value does not count); false once the sender is gone.
async fn changed_from(
    rx: &mut watch::Receiver<Option<ProbeBinding>>,
    current: &Option<ProbeBinding>,
) -> bool {
    loop {
        if rx.changed().await.is_err() {
            return false;
        }
        if *rx.borrow_and_update() != *current {
            return true;
        }
    }
}

// ---- Pure logic: rounds, hysteresis, window, verdicts ----

/// What one round saw.
#[derive(Clone, Debug, Default, PartialEq)]
struct Round {
    /// Per target, in `targets` order: the RTT in ms if it answered in time.
    rtts: Vec<Option<f64>>,
    /// The first error met (socket setup, send), for the report.
    error: Option<String>,
}

impl Round {
    fn answered(&self) -> usize {
        self.rtts.iter().flatten().count()
    }

    fn median_rtt(&self) -> Option<f64> {
        median(self.rtts.iter().flatten().copied().collect())
    }
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(v[n / 2]),
        _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

/// Consecutive-round hysteresis; starts healthy.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Hysteresis {
    healthy: bool,
    /// Rounds in a row that disagree with `healthy`.
    streak: u32,
    down_after: u32,
    up_after: u32,
}

impl Hysteresis {
    fn new(down_after: u32, up_after: u32) -> Self {
        Self {
            healthy: true,
            streak: 0,
            down_after: down_after.max(1),
            up_after: up_after.max(1),
        }
    }

    /// Rounds in a row it takes to leave the current state.
    fn needed(&self) -> u32 {
        if self.healthy {
            self.down_after
        } else {
            self.up_after
        }
    }

    /// Feeds one round; true when the state flips.
    fn step(&mut self, good: bool) -> bool {
        if good == self.healthy {
            self.streak = 0;
            return false;
        }
        self.streak += 1;
        if self.streak < self.needed() {
            return false;
        }
        self.healthy = good;
        self.streak = 0;
        true
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
struct Tally {
    sent: u32,
    answered: u32,
    rtt_sum: f64,
}

/// Loss and mean RTT over the last `cap` rounds.
#[derive(Clone, Debug, PartialEq)]
struct Window {
    cap: usize,
    rounds: VecDeque<Tally>,
}

impl Window {
    fn new(cap: u32) -> Self {
        Self {
            cap: (cap as usize).max(1),
            rounds: VecDeque::new(),
        }
    }

    fn push(&mut self, round: &Round) {
        if self.rounds.len() == self.cap {
            self.rounds.pop_front();
        }
        self.rounds.push_back(Tally {
            sent: round.rtts.len() as u32,
            answered: round.answered() as u32,
            rtt_sum: round.rtts.iter().flatten().sum(),
        });
    }

    fn loss_pct(&self) -> f64 {
        let sent: u32 = self.rounds.iter().map(|t| t.sent).sum();
        let answered: u32 = self.rounds.iter().map(|t| t.answered).sum();
        if sent == 0 {
            return 0.0;
        }
        f64::from(sent - answered) * 100.0 / f64::from(sent)
    }

    fn mean_rtt(&self) -> Option<f64> {
        let answered: u32 = self.rounds.iter().map(|t| t.answered).sum();
        let sum: f64 = self.rounds.iter().map(|t| t.rtt_sum).sum();
        (answered > 0).then(|| sum / f64::from(answered))
    }
}

/// Whether a round is good (Ok) or bad (Err); the text says why either way.
/// `window` already holds the round.
fn judge(cfg: &HealthConfig, round: &Round, window: &Window) -> Result<String, String> {
    let answered = round.answered();
    let median = round.median_rtt();
    let mut summary = format!("{answered}/{} targets answered", round.rtts.len());
    if let Some(m) = median {
        let _ = write!(summary, ", median rtt {m:.1} ms");
    }
    if let Some(e) = &round.error {
        let _ = write!(summary, " ({e})");
    }
    let mut bad = Vec::new();
    if answered < cfg.min_success as usize {
        bad.push(format!("fewer than min_success = {}", cfg.min_success));
    }
    if let (Some(max), Some(m)) = (cfg.max_rtt_ms, median)
        && m > f64::from(max)
    {
        bad.push(format!("median rtt above max_rtt_ms = {max}"));
    }
    let loss = window.loss_pct();
    if let Some(max) = cfg.max_loss_pct
        && loss > f64::from(max)
    {
        bad.push(format!(
            "loss {loss:.0}% over the last {} rounds above max_loss_pct = {max}",
            window.rounds.len()
        ));
    }
    if bad.is_empty() {
        Ok(summary)
    } else {
        Err(format!("{summary}: {}", bad.join("; ")))
    }
}

/// One uplink's verdicts: window, hysteresis and reports.
#[derive(Clone, Debug)]
struct Monitor {
    cfg: HealthConfig,
    hyst: Hysteresis,
    window: Window,
}

impl Monitor {
    fn new(cfg: &HealthConfig) -> Self {
        Self {
            cfg: cfg.clone(),
            hyst: Hysteresis::new(cfg.down_after, cfg.up_after),
            window: Window::new(cfg.window),
        }
    }

    /// Forgets counters and window, keeps the state.
    fn reset(&mut self) {
        self.hyst.streak = 0;
        self.window.rounds.clear();
    }

    fn record(&mut self, uplink: usize, round: &Round) -> HealthReport {
        self.window.push(round);
        let verdict = judge(&self.cfg, round, &self.window);
        let good = verdict.is_ok();
        let needed = self.hyst.needed();
        let changed = self.hyst.step(good);
        let detail = verdict.unwrap_or_else(|e| e);
        let kind = if good { "good" } else { "bad" };
        let reason = if changed {
            let state = if good { "up" } else { "down" };
            format!("{state} after {needed} {kind} round(s) in a row; last: {detail}")
        } else if self.hyst.streak > 0 {
            format!("{kind} round {} of {needed}: {detail}", self.hyst.streak)
        } else {
            detail
        };
        HealthReport {
            uplink,
            healthy: self.hyst.healthy,
            changed,
            rtt_ms: self.window.mean_rtt(),
            loss_pct: self.window.loss_pct(),
            reason,
        }
    }
}

// ---- Probing ----

async fn probe_round(cfg: &HealthConfig, b: &ProbeBinding, seq: u16) -> Round {
    let timeout = Duration::from_millis(cfg.timeout_ms);
    match (cfg.method, cfg.tcp_port) {
        (ProbeMethod::Icmp, _) => icmp_round(&cfg.targets, b, seq, timeout).await,
        (ProbeMethod::Tcp, Some(port)) => tcp_round(&cfg.targets, port, b, timeout).await,
        (ProbeMethod::Tcp, None) => Round {
            rtts: vec![None; cfg.targets.len()],
            error: Some("`method = \"tcp\"` without `tcp_port`".into()),
        },
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// A nonblocking socket that can only leave by uplink `b`: bound to its
/// device and carrying its mark (the source is bound by `bind_source`).
fn open_socket(b: &ProbeBinding, ty: c_int, proto: c_int) -> anyhow::Result<OwnedFd> {
    let flags = ty | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;
    // SAFETY: plain socket(2); the fd is owned right below.
    let raw = unsafe { libc::socket(libc::AF_INET, flags, proto) };
    if raw < 0 {
        return Err(io::Error::last_os_error())
            .context("opening a probe socket (raw ICMP needs root or CAP_NET_RAW)");
    }
    // SAFETY: `raw` is a fresh fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    set_opt(
        &fd,
        libc::SOL_SOCKET,
        libc::SO_BINDTODEVICE,
        b.ifname.as_bytes(),
    )
    .with_context(|| format!("binding the probe socket to interface {:?}", b.ifname))?;
    if b.mark != 0 {
        set_opt(&fd, libc::SOL_SOCKET, libc::SO_MARK, &b.mark.to_ne_bytes())
            .context("setting SO_MARK on the probe socket (needs CAP_NET_ADMIN)")?;
    }
    Ok(fd)
}

fn bind_source(fd: &OwnedFd, b: &ProbeBinding) -> anyhow::Result<()> {
    let sa = sockaddr(b.source, 0);
    // SAFETY: `sa` is a valid sockaddr_in of the given size.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&raw const sa).cast(),
            size_of_val(&sa) as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error()).with_context(|| {
            format!(
                "binding the probe socket to {} (is it still an address of {}?)",
                b.source, b.ifname
            )
        });
    }
    Ok(())
}

fn set_opt(fd: &OwnedFd, level: c_int, name: c_int, value: &[u8]) -> io::Result<()> {
    // SAFETY: `value` is a valid buffer of the given length.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            value.as_ptr().cast(),
            value.len() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn sockaddr(ip: Ipv4Addr, port: u16) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    }
}

/// `ICMP_FILTER` of raw ICMP sockets (linux/icmp.h); not in libc.
const ICMP_FILTER: c_int = 1;
const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_ECHO_REQUEST: u8 = 8;

/// An identifier no other live probe socket of this process uses.
fn next_icmp_id() -> u16 {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    (std::process::id() as u16) ^ NEXT.fetch_add(1, Ordering::Relaxed)
}

fn icmp_socket(b: &ProbeBinding) -> anyhow::Result<AsyncFd<OwnedFd>> {
    let fd = open_socket(b, libc::SOCK_RAW, libc::IPPROTO_ICMP)?;
    // Only echo replies wake us (a set bit filters that type out).
    let filter = !(1u32 << ICMP_ECHO_REPLY);
    set_opt(&fd, libc::SOL_RAW, ICMP_FILTER, &filter.to_ne_bytes())
        .context("setting ICMP_FILTER on the probe socket")?;
    bind_source(&fd, b)?;
    // SAFETY: the AsyncFd owns `fd`, which stays open and the same until
    // the AsyncFd drops.
    unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }
        .map_err(io::Error::from)
        .context("registering the probe socket with tokio")
}

/// Pings every target at once; targets[i] gets sequence `seq0 + i`.
async fn icmp_round(targets: &[Ipv4Addr], b: &ProbeBinding, seq0: u16, timeout: Duration) -> Round {
    let mut round = Round {
        rtts: vec![None; targets.len()],
        error: None,
    };
    let deadline = Instant::now() + timeout;
    let sock = match icmp_socket(b) {
        Ok(s) => s,
        Err(e) => {
            round.error = Some(format!("{e:#}"));
            return round;
        }
    };
    let id = next_icmp_id();
    let mut sent = vec![None; targets.len()];
    for (i, t) in targets.iter().enumerate() {
        let packet = echo_request(id, seq0.wrapping_add(i as u16));
        match send_to(sock.get_ref(), &packet, *t) {
            Ok(()) => sent[i] = Some(Instant::now()),
            Err(e) => {
                log::debug!("health probe of {t} via {}: {e}", b.ifname);
                round.error.get_or_insert(format!("sending to {t}: {e}"));
            }
        }
    }
    let mut buf = [0u8; 1500];
    let waiting = |r: &Round, sent: &[Option<Instant>]| {
        r.rtts
            .iter()
            .zip(sent)
            .any(|(r, s)| r.is_none() && s.is_some())
    };
    while waiting(&round, &sent) {
        let read = sock.async_io(Interest::READABLE, |fd| recv(fd, &mut buf));
        let len = match tokio::time::timeout_at(deadline, read).await {
            Err(_) => break,
            Ok(Ok(len)) => len,
            Ok(Err(e)) => {
                round.error.get_or_insert(format!("receiving: {e}"));
                break;
            }
        };
        let Some((src, rid, rseq)) = parse_echo_reply(&buf[..len]) else {
            continue;
        };
        let i = usize::from(rseq.wrapping_sub(seq0));
        if rid != id || targets.get(i) != Some(&src) || round.rtts[i].is_some() {
            continue;
        }
        round.rtts[i] = sent[i].map(|t0| ms(t0.elapsed()));
    }
    round
}

/// Sends `packet` on raw or datagram socket `fd` to `to`.
pub(crate) fn send_to(fd: &OwnedFd, packet: &[u8], to: Ipv4Addr) -> io::Result<()> {
    let sa = sockaddr(to, 0);
    // SAFETY: valid buffer and sockaddr_in with their sizes.
    let rc = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            packet.as_ptr().cast(),
            packet.len(),
            0,
            (&raw const sa).cast(),
            size_of_val(&sa) as libc::socklen_t,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn recv(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: valid writable buffer of the given length.
    let rc = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc as usize)
    }
}

/// The Internet checksum (RFC 1071) of `data`.
pub(crate) fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An ICMP echo request (no IP header; the kernel adds it).
fn echo_request(id: u16, seq: u16) -> Vec<u8> {
    let mut p = vec![ICMP_ECHO_REQUEST, 0, 0, 0];
    p.extend_from_slice(&id.to_be_bytes());
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(b"multihome health");
    let sum = checksum(&p);
    p[2..4].copy_from_slice(&sum.to_be_bytes());
    p
}

/// (source, identifier, sequence) of an ICMP echo reply in an IPv4 packet
/// as a raw socket reads it.
fn parse_echo_reply(packet: &[u8]) -> Option<(Ipv4Addr, u16, u16)> {
    let ihl = usize::from(packet.first()? & 0x0f) * 4;
    if packet[0] >> 4 != 4 || ihl < 20 || packet.len() < ihl + 8 || packet[9] != 1 {
        return None;
    }
    let src = Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]);
    let icmp = &packet[ihl..];
    (icmp[0] == ICMP_ECHO_REPLY && icmp[1] == 0).then(|| {
        let id = u16::from_be_bytes([icmp[4], icmp[5]]);
        (src, id, u16::from_be_bytes([icmp[6], icmp[7]]))
    })
}

/// Connects to every target at once.
async fn tcp_round(targets: &[Ipv4Addr], port: u16, b: &ProbeBinding, timeout: Duration) -> Round {
    let probes = targets.iter().map(|t| tcp_probe(*t, port, b, timeout));
    let mut round = Round::default();
    for result in futures::future::join_all(probes).await {
        match result {
            Ok(rtt) => round.rtts.push(rtt),
            Err(e) => {
                log::debug!("health probe via {}: {e:#}", b.ifname);
                round.rtts.push(None);
                round.error.get_or_insert(format!("{e:#}"));
            }
        }
    }
    round
}

/// The connect time if the target accepted or refused (either way the
/// path works); None on timeout.
async fn tcp_probe(
    target: Ipv4Addr,
    port: u16,
    b: &ProbeBinding,
    timeout: Duration,
) -> anyhow::Result<Option<f64>> {
    let fd = open_socket(b, libc::SOCK_STREAM, 0)?;
    // Pick the port at connect time, and close with a reset: no TIME_WAIT
    // pile-up here or on the target.
    set_opt(
        &fd,
        libc::IPPROTO_IP,
        libc::IP_BIND_ADDRESS_NO_PORT,
        &1i32.to_ne_bytes(),
    )
    .context("setting IP_BIND_ADDRESS_NO_PORT")?;
    let linger = [1i32.to_ne_bytes(), 0i32.to_ne_bytes()].concat();
    set_opt(&fd, libc::SOL_SOCKET, libc::SO_LINGER, &linger).context("setting SO_LINGER")?;
    bind_source(&fd, b)?;
    let sock = TcpSocket::from_std_stream(fd.into());
    let started = Instant::now();
    let connect = sock.connect(SocketAddrV4::new(target, port).into());
    match tokio::time::timeout(timeout, connect).await {
        Err(_) => Ok(None),
        Ok(Ok(_)) => Ok(Some(ms(started.elapsed()))),
        Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => {
            Ok(Some(ms(started.elapsed())))
        }
        Ok(Err(e)) => Err(e).with_context(|| format!("connecting to {target}:{port}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(extra: &str) -> HealthConfig {
        toml::from_str(&format!(
            "targets = [\"198.18.0.1\", \"198.18.0.2\"]\n{extra}"
        ))
        .expect("valid health config")
    }

    fn round(rtts: &[Option<f64>]) -> Round {
        Round {
            rtts: rtts.to_vec(),
            error: None,
        }
    }

    #[test]
    fn defaults_are_filled_in_and_valid() {
        let c = cfg("");
        assert_eq!(c.interval_ms, 1000);
        assert_eq!(c.timeout_ms, 1000);
        assert_eq!((c.down_after, c.up_after, c.min_success), (3, 3, 1));
        assert_eq!((c.max_rtt_ms, c.max_loss_pct, c.window), (None, None, 10));
        assert_eq!(c.method, ProbeMethod::Icmp);
        assert_eq!(c.on_down, OnDown::Reset);
        assert_eq!(c.on_up, OnUp::Stay);
        let (with, without) = (DownPolicy::of(Some(&c)), DownPolicy::of(None));
        assert_eq!(with, without, "no [uplink.health] means its defaults");
        assert!(c.problems("h").is_empty(), "{:?}", c.problems("h"));
    }

    #[test]
    fn enums_parse_and_unknown_keys_are_refused() {
        let c = cfg("method = \"tcp\"\ntcp_port = 443\non_down = \"purge\"\non_up = \"return\"");
        assert_eq!((c.method, c.tcp_port), (ProbeMethod::Tcp, Some(443)));
        assert_eq!((c.on_down, c.on_up), (OnDown::Purge, OnUp::Return));
        assert_eq!(cfg("on_down = \"purge-udp\"").on_down, OnDown::PurgeUdp);
        assert_eq!(cfg("on_down = \"reset\"").on_down, OnDown::Reset);
        let err = toml::from_str::<HealthConfig>("targets = []\nintervall_ms = 5")
            .expect_err("unknown key");
        assert!(err.to_string().contains("intervall_ms"), "{err}");
        // No targets: no probes, live traffic and the link alone.
        let c = toml::from_str::<HealthConfig>("on_down = \"purge\"").expect("no targets");
        assert!(c.targets.is_empty() && c.passive);
        assert_eq!((c.syn_timeout_ms, c.passive_min_destinations), (1000, 3));
    }

    #[test]
    fn problems_name_the_place_the_field_and_the_fix() {
        let mut c = cfg(
            "interval_ms = 50\ndown_after = 0\nmin_success = 5\nmax_loss_pct = 100\nwindow = 0\nmethod = \"tcp\"",
        );
        c.targets.push(Ipv4Addr::new(198, 18, 0, 1));
        c.targets.push(Ipv4Addr::BROADCAST);
        let p = c.problems("`[[uplink]]` #1 (name = \"x\") health");
        let all = p.join("\n");
        assert!(p.iter().all(|m| m.starts_with("`[[uplink]]` #1")), "{all}");
        for want in [
            "`interval_ms` = 50",
            "`down_after`",
            "`min_success` = 5",
            "`max_loss_pct` = 100",
            "`window` = 0",
            "needs `tcp_port`",
            "`targets[2]` = 198.18.0.1 is listed twice",
            "`targets[3]` = 255.255.255.255",
        ] {
            assert!(all.contains(want), "missing {want:?} in\n{all}");
        }
        assert!(cfg("tcp_port = 80").problems("h")[0].contains("only used with"));
        let mut empty = cfg("");
        empty.targets.clear();
        assert!(empty.problems("h").is_empty(), "no probes is fine");
        let p = cfg("syn_timeout_ms = 50\npassive_min_destinations = 0").problems("h");
        assert!(
            p.iter().any(|m| m.contains("`syn_timeout_ms` = 50")),
            "{p:?}"
        );
        assert!(
            p.iter().any(|m| m.contains("`passive_min_destinations`")),
            "{p:?}"
        );
    }

    #[test]
    fn on_down_picks_protocols() {
        let (tcp, udp, icmp) = (6, 17, 1);
        assert!(OnDown::PurgeUdp.purges(udp) && OnDown::PurgeUdp.purges(icmp));
        assert!(!OnDown::PurgeUdp.purges(tcp));
        assert!(OnDown::Purge.purges(tcp) && !OnDown::Keep.purges(udp));
    }

    #[test]
    fn median_of_odd_even_and_none() {
        assert_eq!(median(vec![]), None);
        assert_eq!(median(vec![5.0, 1.0, 3.0]), Some(3.0));
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(round(&[None, Some(2.0), Some(4.0)]).median_rtt(), Some(3.0));
    }

    #[test]
    fn hysteresis_needs_consecutive_rounds_both_ways() {
        let mut h = Hysteresis::new(3, 2);
        assert!(h.healthy, "starts healthy");
        assert!(!h.step(false) && !h.step(false));
        assert!(!h.step(true), "a good round breaks the bad streak");
        assert!(!h.step(false) && !h.step(false));
        assert!(h.step(false) && !h.healthy, "down after 3 in a row");
        assert!(!h.step(true));
        assert!(!h.step(false), "a bad round breaks the good streak");
        assert!(!h.step(true));
        assert!(h.step(true) && h.healthy, "up after 2 in a row");
        let mut once = Hysteresis::new(1, 1);
        assert!(once.step(false) && once.step(true));
    }

    #[test]
    fn k_of_n_decides_a_round() {
        let c = cfg("min_success = 2");
        let mut w = Window::new(10);
        let one_of_two = round(&[Some(1.0), None]);
        w.push(&one_of_two);
        let err = judge(&c, &one_of_two, &w).expect_err("1 of 2 < 2");
        assert!(err.contains("1/2 targets answered") && err.contains("min_success = 2"));
        assert!(judge(&cfg(""), &one_of_two, &w).is_ok(), "1 of 2 >= 1");
    }

    #[test]
    fn slow_median_fails_a_round() {
        let c = cfg("max_rtt_ms = 100");
        let w = Window::new(10);
        let err = judge(&c, &round(&[Some(150.0), Some(120.0)]), &w).expect_err("slow");
        assert!(err.contains("max_rtt_ms = 100"), "{err}");
        assert!(judge(&c, &round(&[Some(150.0), Some(20.0), Some(30.0)]), &w).is_ok());
    }

    #[test]
    fn window_loss_and_rtt_slide() {
        let mut w = Window::new(2);
        w.push(&round(&[None, None]));
        assert_eq!((w.loss_pct(), w.mean_rtt()), (100.0, None));
        w.push(&round(&[Some(10.0), Some(20.0)]));
        assert_eq!((w.loss_pct(), w.mean_rtt()), (50.0, Some(15.0)));
        w.push(&round(&[Some(30.0), None]));
        assert_eq!((w.loss_pct(), w.mean_rtt()), (25.0, Some(20.0)));
        assert_eq!(Window::new(3).loss_pct(), 0.0);
    }

    #[test]
    fn loss_over_the_window_fails_rounds_that_answered() {
        let mut m = Monitor::new(&cfg("max_loss_pct = 20\ndown_after = 1\nwindow = 4"));
        let good = round(&[Some(1.0), Some(1.0)]);
        let half = round(&[Some(1.0), None]);
        for _ in 0..3 {
            assert!(m.record(0, &good).healthy);
        }
        let r = m.record(0, &half);
        assert!(r.healthy, "loss 1/8 = 12.5%: {}", r.reason);
        let r = m.record(0, &half);
        assert!(!r.healthy && r.changed, "loss 2/8 = 25%: {}", r.reason);
        assert!(r.reason.contains("max_loss_pct = 20"), "{}", r.reason);
    }

    #[test]
    fn monitor_reports_transitions_once_and_reset_keeps_state() {
        let mut m = Monitor::new(&cfg("down_after = 2\nup_after = 2"));
        let dead = Round {
            rtts: vec![None, None],
            error: Some("sending to 198.18.0.1: Network is unreachable".into()),
        };
        let alive = round(&[Some(2.0), Some(4.0)]);
        let r = m.record(3, &alive);
        assert!(r.healthy && !r.changed && r.uplink == 3);
        assert_eq!((r.rtt_ms, r.loss_pct), (Some(3.0), 0.0));
        let r = m.record(3, &dead);
        assert!(r.healthy && !r.changed && r.reason.starts_with("bad round 1 of 2"));
        assert!(r.reason.contains("Network is unreachable"), "{}", r.reason);
        let r = m.record(3, &dead);
        assert!(!r.healthy && r.changed, "{}", r.reason);
        assert!(
            r.reason.starts_with("down after 2 bad round(s)"),
            "{}",
            r.reason
        );
        assert!(!m.record(3, &dead).changed);
        m.record(3, &alive);
        m.reset();
        let r = m.record(3, &alive);
        assert!(
            !r.healthy && !r.changed,
            "reset clears the streak, not the state"
        );
        assert_eq!(r.loss_pct, 0.0, "reset clears the window");
        let r = m.record(3, &alive);
        assert!(r.healthy && r.changed, "{}", r.reason);
    }

    #[test]
    fn echo_packets_round_trip() {
        let req = echo_request(0x1234, 0xfffe);
        assert_eq!(checksum(&req), 0, "a correct checksum sums to zero");
        let mut reply = vec![
            0x45, 0, 0, 0, 0, 0, 0, 0, 64, 1, 0, 0, 198, 18, 31, 2, 198, 18, 31, 1,
        ];
        reply.extend_from_slice(&req);
        reply[20] = ICMP_ECHO_REPLY;
        let want = Some((Ipv4Addr::new(198, 18, 31, 2), 0x1234, 0xfffe));
        assert_eq!(parse_echo_reply(&reply), want);
        reply[20] = 3;
        assert_eq!(parse_echo_reply(&reply), None, "not an echo reply");
        assert_eq!(parse_echo_reply(&reply[..25]), None, "truncated");
        assert_eq!(parse_echo_reply(&[]), None);
    }

    #[tokio::test]
    async fn prober_waits_without_binding_and_stops_when_it_closes() {
        let (btx, brx) = watch::channel(None);
        let (tx, mut rx) = mpsc::channel(4);
        let task = spawn(0, cfg(""), brx, tx);
        btx.send_replace(None);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(rx.try_recv().is_err(), "no reports without a binding");
        drop(btx);
        tokio::time::timeout(Duration::from_secs(2), task)
            .await
            .expect("the prober stops once the binding sender is gone")
            .expect("the prober does not panic");
    }

    /// Needs root: two namespaces joined by two veth pairs, probed for real.
    #[test]
    fn probes_are_bound_to_the_uplink_and_follow_its_link() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            panic!(
                "health::tests::probes_are_bound_to_the_uplink_and_follow_its_link needs root \
                 (network namespaces, raw sockets): run the tests with sudo"
            );
        }
        let pid = std::process::id();
        let a = Ns::new(format!("mhhc{pid}"));
        let b = Ns::new(format!("mhhc{pid}b"));
        for (x, y, n) in [("a0", "b0", 31), ("a1", "b1", 32)] {
            ip(&[
                "-n", &a.0, "link", "add", x, "type", "veth", "peer", "name", y, "netns", &b.0,
            ]);
            for (ns, dev, host) in [(&a, x, 1), (&b, y, 2)] {
                let addr = format!("198.18.{n}.{host}/24");
                ip(&["-n", &ns.0, "addr", "add", &addr, "dev", dev]);
                ip(&["-n", &ns.0, "link", "set", dev, "up"]);
            }
        }
        // B must not answer ARP for 198.18.31.2 on b1: only a0 reaches it.
        ip(&[
            "netns",
            "exec",
            &b.0,
            "sysctl",
            "-qw",
            "net.ipv4.conf.all.arp_ignore=1",
        ]);
        let ns_path = format!("/run/netns/{}", a.0);
        let b_name = b.0.clone();
        let thread = std::thread::spawn(move || {
            let ns = std::fs::File::open(&ns_path).expect("open netns A");
            // SAFETY: a valid netns fd; setns moves only this thread.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", io::Error::last_os_error());
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime")
                .block_on(scenario(&b_name));
        });
        if let Err(panic) = thread.join() {
            std::panic::resume_unwind(panic);
        }
    }

    /// Runs inside namespace A.
    async fn scenario(b_ns: &str) {
        let target = Ipv4Addr::new(198, 18, 31, 2);
        let via_a0 = ProbeBinding {
            ifname: "a0".into(),
            source: Ipv4Addr::new(198, 18, 31, 1),
            mark: 0x4d48_0001,
        };
        let via_a1 = ProbeBinding {
            ifname: "a1".into(),
            source: Ipv4Addr::new(198, 18, 32, 1),
            mark: 0x4d48_0002,
        };
        let t = Duration::from_millis(300);
        let r = icmp_round(&[target], &via_a0, 1, t).await;
        assert!(r.rtts[0].is_some(), "ping via a0 must answer: {r:?}");
        let r = icmp_round(&[target], &via_a1, 2, t).await;
        assert!(
            r.rtts[0].is_none(),
            "ping bound to a1 must not reach it: {r:?}"
        );
        let r = tcp_round(&[target], 9, &via_a0, t).await;
        assert!(
            r.rtts[0].is_some(),
            "a reset via a0 counts as an answer: {r:?}"
        );
        let r = tcp_round(&[target], 9, &via_a1, t).await;
        assert!(
            r.rtts[0].is_none(),
            "connect bound to a1 must not reach it: {r:?}"
        );

        let c = cfg("interval_ms = 200\ntimeout_ms = 150\ndown_after = 3\nup_after = 2");
        let c = HealthConfig {
            targets: vec![target],
            ..c
        };
        let (btx, brx) = watch::channel(Some(via_a0));
        let (tx, mut rx) = mpsc::channel(16);
        let task = spawn(7, c, brx, tx);
        let r = next(&mut rx).await;
        assert!(r.healthy && !r.changed && r.rtt_ms.is_some(), "{r:?}");

        ip(&["-n", b_ns, "link", "set", "b0", "down"]);
        let (r, took) = until_changed(&mut rx).await;
        assert!(!r.healthy && r.uplink == 7, "{r:?}");
        assert!(
            took < Duration::from_millis(200 * 3 + 600),
            "down took {took:?}"
        );

        ip(&["-n", b_ns, "link", "set", "b0", "up"]);
        let (r, took) = until_changed(&mut rx).await;
        assert!(r.healthy, "{r:?}");
        assert!(took < Duration::from_secs(4), "up took {took:?}");

        drop(btx);
        tokio::time::timeout(Duration::from_secs(2), task)
            .await
            .expect("the prober stops with its binding")
            .expect("no panic");
    }

    async fn next(rx: &mut mpsc::Receiver<HealthReport>) -> HealthReport {
        tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("a report in time")
            .expect("the prober is alive")
    }

    /// The next report with a state change, and how long it took.
    async fn until_changed(rx: &mut mpsc::Receiver<HealthReport>) -> (HealthReport, Duration) {
        let started = Instant::now();
        loop {
            let r = next(rx).await;
            if r.changed {
                return (r, started.elapsed());
            }
        }
    }

    /// A named network namespace, deleted on drop.
    struct Ns(String);

    impl Ns {
        fn new(name: String) -> Ns {
            // Left over by a dead process with our pid.
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", &name])
                .stderr(std::process::Stdio::null())
                .status();
            ip(&["netns", "add", &name]);
            Ns(name)
        }
    }

    impl Drop for Ns {
        fn drop(&mut self) {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", &self.0])
                .status();
        }
    }

    fn ip(args: &[&str]) {
        let out = std::process::Command::new("ip")
            .args(args)
            .output()
            .expect("run ip");
        assert!(
            out.status.success(),
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
