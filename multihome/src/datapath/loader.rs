//! Loads the embedded programs, pins their maps and tcx links under the
//! pin directory, and adopts what an earlier run pinned there.
use std::{
    collections::BTreeSet,
    fs,
    io::ErrorKind,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, Map, MapData, ProgramArray},
    programs::{
        LinkOrder, SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        tc::TcAttachOptions,
        xdp::XdpLink,
    },
};
use multihome_common::{
    ALL_MAPS, FlowFwd, FlowKey, JUMP_PROGS, LAYOUT_VERSION, MAP_AFFINITY, MAP_CONN_FWD,
    MAP_CONN_REV, MAP_ENDPOINT_PORTS, MAP_ENDPOINTS, MAP_HOST_ECHO, MAP_JUMP, MAP_PEERS,
    MAP_REASONS, MAP_SELECT, MAP_SETTINGS, MAP_SYN_WAIT, MAP_UPLINK_STATS, MAP_UPLINKS,
    MAP_UPLINKS6, PROG_LAN_IN, PROG_WAN_IN, PROG_WAN_IN_L3, PROG_WAN_OUT, PROG_WAN_OUT_L3,
    PROG_XDP_LAN, PROG_XDP_WAN,
};

use crate::config::NatConfig;

/// The programs, built by `build.rs`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/multihome"));
const STUB: &[u8] = b"MULTIHOME-EBPF-STUB";

pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/multihome";
const BPF_FS_MAGIC: i64 = 0xcafe4a11;

/// Where a program is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    LanIngress,
    WanIngress { l3: bool },
    WanEgress { l3: bool },
}

impl Hook {
    fn program(self) -> &'static str {
        match self {
            Hook::LanIngress => PROG_LAN_IN,
            Hook::WanIngress { l3: false } => PROG_WAN_IN,
            Hook::WanIngress { l3: true } => PROG_WAN_IN_L3,
            Hook::WanEgress { l3: false } => PROG_WAN_OUT,
            Hook::WanEgress { l3: true } => PROG_WAN_OUT_L3,
        }
    }

    fn attach_type(self) -> TcAttachType {
        match self {
            Hook::LanIngress | Hook::WanIngress { .. } => TcAttachType::Ingress,
            Hook::WanEgress { .. } => TcAttachType::Egress,
        }
    }

    fn direction(self) -> &'static str {
        match self.attach_type() {
            TcAttachType::Egress => "egress",
            _ => "ingress",
        }
    }
}

/// Where a link is pinned: `links/<ifname>@<direction>`. bpffs refuses
/// names with a dot, so VLAN names like `eth0.7` become `eth0:7`.
pub fn link_pin(pin_dir: &Path, ifname: &str, hook: Hook) -> PathBuf {
    pin_at(pin_dir, ifname, hook.direction())
}

/// Where an interface's XDP link is pinned: `links/<ifname>@xdp`.
pub fn xdp_link_pin(pin_dir: &Path, ifname: &str) -> PathBuf {
    pin_at(pin_dir, ifname, XDP_PIN)
}

/// The name suffix of XDP link pins.
const XDP_PIN: &str = "xdp";

fn pin_at(pin_dir: &Path, ifname: &str, suffix: &str) -> PathBuf {
    pin_dir
        .join("links")
        .join(format!("{}@{suffix}", ifname.replace('.', ":")))
}

/// The interfaces with links pinned under `pin_dir`: those with a TC
/// ingress program, and those with an XDP program ([`link_pin`] and
/// [`xdp_link_pin`] read back).
pub fn pinned_interfaces(pin_dir: &Path) -> (BTreeSet<String>, BTreeSet<String>) {
    let (mut tc, mut xdp) = (BTreeSet::new(), BTreeSet::new());
    for e in fs::read_dir(pin_dir.join("links"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let pin = e.file_name().to_string_lossy().into_owned();
        match pin.rsplit_once('@') {
            Some((n, "ingress")) => drop(tc.insert(n.replace(':', "."))),
            Some((n, XDP_PIN)) => drop(xdp.insert(n.replace(':', "."))),
            _ => {}
        }
    }
    (tc, xdp)
}

/// The loaded programs and their maps.
pub struct Datapath {
    pub ebpf: Ebpf,
    pub pin_dir: PathBuf,
    /// The maps were pinned by an earlier run and adopted, flows and all.
    pub adopted: bool,
}

/// Writes the embedded object, refusing the stub.
pub fn write_object(out: &Path) -> anyhow::Result<()> {
    check_not_stub()?;
    fs::write(out, OBJECT).with_context(|| format!("writing {}", out.display()))
}

fn check_not_stub() -> anyhow::Result<()> {
    if OBJECT.starts_with(STUB) {
        bail!(
            "this multihome binary was built without its eBPF programs (bpf-linker was \
             missing). Build it with `cargo xtask build`"
        );
    }
    Ok(())
}

/// Fails unless `dir` is on a bpffs, saying how to mount one.
pub fn check_bpffs(dir: &Path) -> anyhow::Result<()> {
    let probe = dir
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    let c = std::ffi::CString::new(probe.as_os_str().as_encoded_bytes())?;
    // SAFETY: statfs fills `st`, a plain C struct, from a NUL-terminated path.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("statfs {}", probe.display()));
    }
    if st.f_type as i64 != BPF_FS_MAGIC {
        bail!(
            "{} is not on a bpf filesystem, so maps and links cannot be pinned there. \
             Mount one with `mount -t bpf bpf /sys/fs/bpf` (or run `cargo xtask setup`), \
             or pass --pin-dir under a mounted bpffs",
            probe.display()
        );
    }
    Ok(())
}

/// Older layouts this binary adopts, each with the pinned maps whose shape
/// changed since: those are unpinned and made afresh (their counters
/// restart), while flows, uplinks and settings carry over. Maps that did
/// not exist then are simply created.
const MIGRATIONS: &[(u32, &[&str])] = &[
    // 3: REASONS gained counters, UPLINKS an MSS clamp and SETTINGS the
    // flow limits (the daemon rewrites both at start); ROUTED, FRAGS,
    // PEERS, HOST_ECHO, HOSTS, FILL and EIM are new (the reaper's first
    // pass counts HOSTS and FILL; EIM fills as flows are made, so older
    // flows cannot be hairpinned to).
    (
        2,
        &[
            MAP_REASONS,
            MAP_UPLINKS,
            MAP_SETTINGS,
            MAP_SELECT,
            MAP_UPLINK_STATS,
            MAP_HOST_ECHO,
            MAP_JUMP,
        ],
    ),
    // 4: SELECT became a hashed Maglev table, SETTINGS gained the hash
    // seed and REASONS counters (all rewritten at start); flows keep
    // their shape.
    (
        3,
        &[
            MAP_REASONS,
            MAP_SETTINGS,
            MAP_SELECT,
            MAP_UPLINK_STATS,
            MAP_PEERS,
            MAP_HOST_ECHO,
            MAP_JUMP,
        ],
    ),
    // 5: SELECT holds a table per policy, SETTINGS the rule bank, REASONS
    // the policy counters (all rewritten at start); the rule maps,
    // AFFINITY and ENDPOINTS are new; a flow records its policy where its padding was
    // (0: `balanced`).
    (
        4,
        &[
            MAP_REASONS,
            MAP_SETTINGS,
            MAP_SELECT,
            MAP_UPLINK_STATS,
            MAP_PEERS,
            MAP_HOST_ECHO,
            MAP_JUMP,
        ],
    ),
    // 6: UPLINK_STATS gained the passive-health counters (they restart
    // at 0); ENDPOINT_PORTS and SYN_WAIT are new.
    (
        5,
        &[
            MAP_UPLINK_STATS,
            MAP_PEERS,
            MAP_HOST_ECHO,
            MAP_REASONS,
            MAP_JUMP,
        ],
    ),
    // 7: UPLINK_STATS counts retransmissions; flows grew by `snd_max`:
    // their CONN_FWD is copied into one of today's size (`set_fwd_aside`),
    // as it is from every older layout; SYN_WAIT keys name their kind
    // where padding was (0: a SYN); PEERS became a direct-mapped array
    // (made afresh here and above: reply fragments that come before their
    // first are matched again for flows made from now on); NEXT_HOPS is
    // new.
    (
        6,
        &[
            MAP_UPLINK_STATS,
            MAP_PEERS,
            MAP_SYN_WAIT,
            MAP_HOST_ECHO,
            MAP_REASONS,
            MAP_JUMP,
        ],
    ),
    // 8: every stamp is on `CLOCK` (monotonic, coarse), no longer
    // `CLOCK_BOOTTIME`: SYN_WAIT and HOST_ECHO, short-lived caches, are
    // made afresh (here and above); the stamps of flows, affinities and
    // endpoints are moved back by the time spent suspended
    // (`Datapath::restamp`); XDP_DEVS and XDP_STATS are new.
    (7, &[MAP_SYN_WAIT, MAP_HOST_ECHO, MAP_REASONS, MAP_JUMP]),
    // 9: REASONS gained the IPv6 counters and JUMP the IPv6 programs'
    // slots (both made afresh, here and above); CONN6 and UPLINKS6 are
    // new.
    (8, &[MAP_REASONS, MAP_JUMP]),
    // 10: NAT66 (`mode6 = "nat66"`): NAT6 is new; an IPv6 flow keeps its
    // NAT66 port where CONN6's padding was (0 under NPTv6). HOSTS6, the
    // IPv6 hosts' quota, is new (the reaper's first pass counts it), and
    // so are LAN_HOPS and LAN_HOPS6 (the daemon fills them).
    (9, &[MAP_UPLINKS6]),
    // 11: MAIN_ROUTES, the mirror of `main`, is new; CLASSIFY's word
    // gained `CLASSIFY_BY_ROUTES`, which the daemon sets once it has
    // written the mirror (an adopted `CLASSIFY_IN_MAIN` alone still means
    // a lookup in main).
    (10, &[MAP_UPLINKS6]),
    // 12: UPLINKS6 holds an entry per (uplink, internal prefix), eight
    // times as many (made afresh, here and above: the daemon writes it
    // at start; until then, a moment, the adopted IPv6 flows' packets are
    // not translated, and the egress guard drops them); MAPPED6 is new.
    (11, &[MAP_UPLINKS6]),
];

/// The first layout whose stamps are on [`multihome_common::CLOCK`].
const CLOCK_SINCE: u32 = 8;

/// Puts the stamps of an older layout's maps on today's clock. The old
/// programs may stamp a flow on the old clock until they are replaced:
/// such a flow looks fresher than it is until its next packet, no worse.
/// A lead under a second (no suspend since boot) is left alone.
fn restamp(pin_dir: &Path) -> anyhow::Result<()> {
    let lead = crate::maps::boottime_lead_ns();
    if lead < 1_000_000_000 {
        return Ok(());
    }
    let n = crate::flows::restamp(&crate::maps::Maps::open(pin_dir)?, lead)
        .context("moving the adopted maps' stamps onto today's clock")?;
    log::info!(
        "{n} stamps moved {} s back: the machine was suspended since boot",
        lead / 1_000_000_000
    );
    Ok(())
}

/// Where a `CONN_FWD` of shorter entries waits while its flows are copied
/// into the new map (bpffs refuses dots in names).
const FWD_ASIDE: &str = "CONN_FWD_OLD";

/// The size of a flow entry in layouts 2 to 6; layout 7 appended
/// `snd_max` and padding.
const FWD_SIZE_V6: usize = 24;

/// A pinned `CONN_FWD` of layout 6 or older is moved aside, so that the
/// load makes one of today's entry size, and its flows are copied over
/// ([`Datapath::finish_migration`]). Returns the size to make the new map
/// with: the old one's, as `CONN_REV` keeps its own.
fn set_fwd_aside(pin_dir: &Path) -> anyhow::Result<Option<u32>> {
    let aside = pin_dir.join(FWD_ASIDE);
    if let Ok(data) = MapData::from_pin(&aside) {
        // A start that stopped halfway: the new map exists, copy again.
        return Ok(Some(data.info()?.max_entries()));
    }
    let path = pin_dir.join(MAP_CONN_FWD);
    let Ok(data) = MapData::from_pin(&path) else {
        return Ok(None);
    };
    let info = data.info()?;
    let size = info.value_size() as usize;
    if size == size_of::<FlowFwd>() {
        return Ok(None);
    }
    if size != FWD_SIZE_V6 {
        bail!(
            "{} holds entries of {size} bytes, which no layout this multihome knows had",
            path.display()
        );
    }
    fs::rename(&path, &aside)
        .with_context(|| format!("moving {} aside to copy its flows", path.display()))?;
    log::info!("{MAP_CONN_FWD}: its flows are copied into entries of today's size");
    Ok(Some(info.max_entries()))
}

/// Copies every flow of a layout-6 `CONN_FWD` into `to`, the new fields
/// zeroed (no data seen yet), leaving flows `to` already holds as they
/// are. Returns how many were copied.
pub fn copy_old_flows(
    from: &HashMap<MapData, FlowKey, [u8; FWD_SIZE_V6]>,
    to: &mut HashMap<&mut MapData, FlowKey, FlowFwd>,
) -> anyhow::Result<usize> {
    let mut copied = 0;
    let mut failed = None;
    crate::mapwalk::for_each(from, |key, old| {
        match to.insert(key, flow_of_v6(&old), crate::flows::NOEXIST) {
            Ok(()) => copied += 1,
            Err(aya::maps::MapError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => failed = Some(e),
        }
    })?;
    match failed {
        Some(e) => Err(e).context("copying flows into the new CONN_FWD"),
        None => Ok(copied),
    }
}

/// A layout-6 flow entry (the fields of today's up to `created_s`, in
/// host order) as today's, with no data seen yet.
fn flow_of_v6(old: &[u8; FWD_SIZE_V6]) -> FlowFwd {
    let u16_at = |i: usize| u16::from_ne_bytes([old[i], old[i + 1]]);
    let u32_at = |i: usize| u32::from_ne_bytes([old[i], old[i + 1], old[i + 2], old[i + 3]]);
    FlowFwd {
        last_seen_ns: u64::from_ne_bytes([
            old[0], old[1], old[2], old[3], old[4], old[5], old[6], old[7],
        ]),
        nat_addr_be: u32_at(8),
        flags: u32_at(12),
        nat_port_be: u16_at(16),
        uplink: old[18],
        policy: old[19],
        created_s: u32_at(20),
        snd_max: 0,
        _pad: 0,
    }
}

/// Unpins map `name` when it holds other than `want` entries, so that it
/// is made afresh at that size.
fn unpin_if_resized(pin_dir: &Path, name: &str, want: u32) -> anyhow::Result<()> {
    let path = pin_dir.join(name);
    let Ok(data) = MapData::from_pin(&path) else {
        return Ok(());
    };
    let have = data.info()?.max_entries();
    if have != want {
        fs::remove_file(&path).with_context(|| format!("unpinning {}", path.display()))?;
        log::info!("{name}: made afresh for {want} entries (it had {have})");
    }
    Ok(())
}

/// Adopts pinned maps of this layout or of one in [`MIGRATIONS`] (after
/// unpinning what changed); refuses any other. Returns the adopted
/// layout's version, None when nothing is pinned.
fn check_layout(pin_dir: &Path) -> anyhow::Result<Option<u32>> {
    let path = pin_dir.join(MAP_SETTINGS);
    let data = match MapData::from_pin(&path) {
        Ok(d) => d,
        Err(aya::maps::MapError::SyscallError(e)) if e.io_error.kind() == ErrorKind::NotFound => {
            return Ok(None);
        }
        Err(e) => return Err(e).with_context(|| format!("opening pinned map {}", path.display())),
    };
    // The version leads SETTINGS in every layout, whatever its size.
    let version = crate::mapwalk::first_word(&data).ok();
    if let Some((from, changed)) = MIGRATIONS.iter().find(|(v, _)| Some(*v) == version) {
        for name in *changed {
            let path = pin_dir.join(name);
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("unpinning {}", path.display())),
            }
        }
        log::info!(
            "adopting maps of layout version {from}: {} made afresh",
            changed.join(", ")
        );
        return Ok(Some(*from));
    }
    if version != Some(LAYOUT_VERSION) {
        bail!(
            "the maps pinned in {} have layout version {}, this multihome uses {LAYOUT_VERSION}. \
             Stop the old daemon and remove them (`multihome cleanup --pin-dir {}`); \
             live flows are lost",
            pin_dir.display(),
            version.map_or("unknown".into(), |v| v.to_string()),
            pin_dir.display()
        );
    }
    Ok(version)
}

impl Datapath {
    /// Loads the programs; maps already pinned in `pin_dir` are reused, the
    /// others are created and pinned.
    /// `nat` sizes the maps it is made with: the connection maps keep the
    /// size they were made with when adopted; the affinity and endpoint
    /// maps are made afresh at a new size (that costs stickiness, no flow).
    pub fn load(pin_dir: &Path, nat: &NatConfig) -> anyhow::Result<Self> {
        check_not_stub()?;
        check_bpffs(pin_dir)?;
        fs::create_dir_all(pin_dir.join("links"))
            .with_context(|| format!("creating pin directory {}", pin_dir.display()))?;
        // The maps steer every flow: only their owner may open them.
        fs::set_permissions(pin_dir, fs::Permissions::from_mode(0o700))
            .with_context(|| format!("restricting pin directory {}", pin_dir.display()))?;
        let adopted_from = check_layout(pin_dir)?;
        let adopted = adopted_from.is_some();
        let mut fwd_aside = None;
        if adopted {
            unpin_if_resized(pin_dir, MAP_AFFINITY, nat.max_affinities)?;
            unpin_if_resized(pin_dir, MAP_ENDPOINTS, nat.max_endpoints)?;
            unpin_if_resized(pin_dir, MAP_ENDPOINT_PORTS, nat.max_endpoints)?;
            fwd_aside = set_fwd_aside(pin_dir)?;
        }
        let mut datapath =
            Self::load_inner(pin_dir, nat, adopted, fwd_aside).inspect_err(|_| {
                if !adopted {
                    // Nothing half-installed: drop the maps this attempt pinned.
                    let _ = remove_pins(pin_dir);
                }
            })?;
        if fwd_aside.is_some() {
            // The old programs still run on the old map until `attach`
            // replaces them: copy now so that they find their flows, and
            // again once they are replaced.
            datapath.copy_aside()?;
        }
        if adopted_from.is_some_and(|v| v < CLOCK_SINCE) {
            restamp(pin_dir)?;
        }
        Ok(datapath)
    }

    /// Copies the flows of a `CONN_FWD` set aside by an upgrade into the
    /// new one; returns how many were new.
    fn copy_aside(&mut self) -> anyhow::Result<usize> {
        let from = HashMap::try_from(Map::HashMap(MapData::from_pin(
            self.pin_dir.join(FWD_ASIDE),
        )?))?;
        let mut to = HashMap::try_from(
            self.ebpf
                .map_mut(MAP_CONN_FWD)
                .context("map CONN_FWD missing")?,
        )?;
        copy_old_flows(&from, &mut to)
    }

    /// Once every program of this run is attached: copies the flows the
    /// old programs made meanwhile into the new `CONN_FWD` and unpins the
    /// old one. Nothing to do unless an upgrade set one aside.
    pub fn finish_migration(&mut self) -> anyhow::Result<()> {
        let aside = self.pin_dir.join(FWD_ASIDE);
        if !aside.exists() {
            return Ok(());
        }
        let late = self.copy_aside()?;
        fs::remove_file(&aside).with_context(|| format!("unpinning {}", aside.display()))?;
        log::info!("{MAP_CONN_FWD}: upgrade done ({late} flows made during it copied)");
        Ok(())
    }

    fn load_inner(
        pin_dir: &Path,
        nat: &NatConfig,
        adopted: bool,
        fwd_aside: Option<u32>,
    ) -> anyhow::Result<Self> {
        let paths: Vec<(&str, PathBuf)> = ALL_MAPS.iter().map(|m| (*m, pin_dir.join(m))).collect();
        let mut loader = EbpfLoader::new();
        loader
            .map_max_entries(MAP_CONN_FWD, fwd_aside.unwrap_or(nat.max_flows))
            .map_max_entries(MAP_CONN_REV, nat.max_flows)
            .map_max_entries(MAP_AFFINITY, nat.max_affinities)
            .map_max_entries(MAP_ENDPOINTS, nat.max_endpoints)
            .map_max_entries(MAP_ENDPOINT_PORTS, nat.max_endpoints);
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader
            .load(OBJECT)
            .context("loading the eBPF programs (is this kernel 6.6 or newer, with BTF?)")?;
        let tail_called = JUMP_PROGS.iter().map(|(name, _)| *name);
        for name in [
            PROG_LAN_IN,
            PROG_WAN_IN,
            PROG_WAN_IN_L3,
            PROG_WAN_OUT,
            PROG_WAN_OUT_L3,
        ]
        .into_iter()
        .chain(tail_called)
        {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(name)
                .with_context(|| format!("program {name} missing from the object"))?
                .try_into()?;
            prog.load()
                .with_context(|| format!("verifying program {name}"))?;
        }
        for name in [PROG_XDP_LAN, PROG_XDP_WAN] {
            let prog: &mut Xdp = ebpf
                .program_mut(name)
                .with_context(|| format!("program {name} missing from the object"))?
                .try_into()?;
            prog.load()
                .with_context(|| format!("verifying program {name}"))?;
        }
        // The programs tail-call these; an adopted JUMP switches to this
        // run's programs here.
        let fds = JUMP_PROGS
            .iter()
            .map(|(name, slot)| {
                let prog: &SchedClassifier = ebpf
                    .program(name)
                    .with_context(|| format!("program {name} missing"))?
                    .try_into()?;
                Ok((*name, *slot, prog.fd()?.try_clone()?))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let mut jump = ProgramArray::try_from(ebpf.map_mut(MAP_JUMP).context("map JUMP missing")?)?;
        for (name, slot, fd) in fds {
            jump.set(slot, &fd, 0)
                .with_context(|| format!("pointing JUMP slot {slot} at {name}"))?;
        }
        Ok(Self {
            ebpf,
            pin_dir: pin_dir.to_owned(),
            adopted,
        })
    }

    /// Attaches `hook`'s program to `ifname` with tcx and pins the link;
    /// a link pinned by an earlier run is taken over in place, so traffic
    /// never sees the interface without a program.
    pub fn attach(&mut self, ifname: &str, hook: Hook) -> anyhow::Result<()> {
        let pin = link_pin(&self.pin_dir, ifname, hook);
        let prog: &mut SchedClassifier = self
            .ebpf
            .program_mut(hook.program())
            .context("program missing")?
            .try_into()?;
        let id = adopt_or_attach(
            prog,
            &pin,
            |prog, old| Ok(prog.attach_to_link(old.try_into()?)?),
            |prog| {
                prog.attach_with_options(
                    ifname,
                    hook.attach_type(),
                    TcAttachOptions::TcxOrder(LinkOrder::default()),
                )
                .with_context(|| {
                    format!(
                        "attaching {} to {ifname} {} (does the interface exist?)",
                        hook.program(),
                        hook.direction()
                    )
                })
            },
        )?;
        pin_link(prog.take_link(id)?.try_into()?, &pin)
    }
}

impl Datapath {
    /// Attaches the XDP program of a LAN device (`wan` false) or an uplink
    /// to `ifname` in native (driver) mode and pins the link; a link
    /// pinned by an earlier run is taken over in place. Fails when the
    /// driver has no native XDP.
    pub fn attach_xdp(&mut self, ifname: &str, wan: bool) -> anyhow::Result<()> {
        let pin = xdp_link_pin(&self.pin_dir, ifname);
        let name = if wan { PROG_XDP_WAN } else { PROG_XDP_LAN };
        let prog: &mut Xdp = self
            .ebpf
            .program_mut(name)
            .context("program missing")?
            .try_into()?;
        let id = adopt_or_attach(
            prog,
            &pin,
            |prog, old| Ok(prog.attach_to_link(XdpLink::try_from(old)?)?),
            |prog| {
                prog.attach(ifname, XdpMode::Driver).with_context(|| {
                    format!(
                        "attaching {name} to {ifname} in native XDP mode (does its driver \
                         support native XDP? set xdp = \"auto\" or \"off\" otherwise)"
                    )
                })
            },
        )?;
        let link: FdLink = prog.take_link(id)?.try_into().with_context(|| {
            format!("the XDP link on {ifname} is not a bpf_link (kernel older than 5.9?)")
        })?;
        pin_link(link, &pin)
    }

    /// Detaches the XDP program an earlier run left on `ifname`, if any;
    /// returns whether there was one.
    pub fn detach_xdp(&self, ifname: &str) -> bool {
        let pin = xdp_link_pin(&self.pin_dir, ifname);
        match PinnedLink::from_pin(&pin) {
            Ok(l) => {
                drop(l.unpin());
                true
            }
            Err(_) => fs::remove_file(&pin).is_ok(),
        }
    }
}

/// Takes over the link an earlier run pinned at `pin` with `adopt` (the
/// new program replaces the old one in place, so traffic never sees the
/// interface without one), or, when there is none or it is dead (its
/// interface went away and came back), attaches afresh with `attach`.
fn adopt_or_attach<P, Id>(
    prog: &mut P,
    pin: &Path,
    adopt: impl FnOnce(&mut P, FdLink) -> anyhow::Result<Id>,
    attach: impl FnOnce(&mut P) -> anyhow::Result<Id>,
) -> anyhow::Result<Id> {
    if let Ok(old) = PinnedLink::from_pin(pin) {
        match adopt(prog, FdLink::from(old)) {
            Ok(id) => return Ok(id),
            Err(e) => log::info!("{} is stale ({e:#}); attaching anew", pin.display()),
        }
    }
    let _ = fs::remove_file(pin);
    attach(prog)
}

/// Pins `link` at `pin`, unless it was adopted from there.
fn pin_link(link: FdLink, pin: &Path) -> anyhow::Result<()> {
    if !pin.exists() {
        link.pin(pin)
            .with_context(|| format!("pinning link {}", pin.display()))?;
    }
    Ok(())
}

/// Detaches every pinned link and removes every pin under `pin_dir`.
pub fn remove_pins(pin_dir: &Path) -> anyhow::Result<()> {
    let links = pin_dir.join("links");
    if let Ok(entries) = fs::read_dir(&links) {
        for e in entries.flatten() {
            // Unpinning drops the last reference, which detaches the program.
            match PinnedLink::from_pin(e.path()) {
                Ok(l) => drop(l.unpin()),
                Err(_) => drop(fs::remove_file(e.path())),
            }
        }
    }
    let _ = fs::remove_dir(&links);
    for m in ALL_MAPS.iter().chain(&[FWD_ASIDE]) {
        let _ = fs::remove_file(pin_dir.join(m));
    }
    match fs::remove_dir(pin_dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing pin directory {}", pin_dir.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mapwalk::test_map;

    #[test]
    fn pinned_interfaces_reads_back_the_pin_names_dots_included() {
        let dir = std::env::temp_dir().join(format!("mh-pins-{}", std::process::id()));
        fs::create_dir_all(dir.join("links")).expect("links dir");
        for pin in [
            link_pin(&dir, "lan0", Hook::LanIngress),
            link_pin(&dir, "eth0.7", Hook::WanIngress { l3: false }),
            link_pin(&dir, "eth0.7", Hook::WanEgress { l3: false }),
            xdp_link_pin(&dir, "eth0.7"),
        ] {
            fs::write(pin, b"").expect("pin file");
        }
        let (tc, xdp) = pinned_interfaces(&dir);
        let _ = fs::remove_dir_all(&dir);
        assert_eq!(tc, ["eth0.7".to_string(), "lan0".to_string()].into());
        assert_eq!(xdp, ["eth0.7".to_string()].into());
    }

    #[test]
    fn flows_of_a_layout_6_map_are_copied_whole_with_the_new_fields_zeroed() {
        let mut old: HashMap<MapData, FlowKey, [u8; FWD_SIZE_V6]> =
            HashMap::try_from(Map::HashMap(test_map(16, FWD_SIZE_V6 as u32, 8))).expect("old map");
        let mut new_map = Map::HashMap(test_map(16, size_of::<FlowFwd>() as u32, 8));
        let mut new: HashMap<&mut MapData, FlowKey, FlowFwd> =
            HashMap::try_from(&mut new_map).expect("new map");
        let key = |n: u32| FlowKey {
            saddr_be: n,
            proto: 6,
            ..FlowKey::default()
        };
        let flow = FlowFwd {
            last_seen_ns: 0x0102_0304_0506_0708,
            nat_addr_be: 0xc612_0b01,
            flags: 0b101,
            nat_port_be: 4242,
            uplink: 3,
            policy: 2,
            created_s: 77,
            ..FlowFwd::default()
        };
        // Layout 6's entry: the same fields, up to `created_s`.
        let mut bytes = Vec::new();
        bytes.extend(flow.last_seen_ns.to_ne_bytes());
        bytes.extend(flow.nat_addr_be.to_ne_bytes());
        bytes.extend(flow.flags.to_ne_bytes());
        bytes.extend(flow.nat_port_be.to_ne_bytes());
        bytes.extend([flow.uplink, flow.policy]);
        bytes.extend(flow.created_s.to_ne_bytes());
        let bytes: [u8; FWD_SIZE_V6] = bytes.try_into().expect("24 bytes");
        old.insert(key(1), bytes, 0).expect("old flow 1");
        old.insert(key(2), bytes, 0).expect("old flow 2");
        // A flow the new programs already hold is left as it is.
        let newer = FlowFwd { snd_max: 9, ..flow };
        new.insert(key(2), newer, 0).expect("new flow 2");

        assert_eq!(copy_old_flows(&old, &mut new).expect("copy"), 1);
        assert_eq!(new.get(&key(1), 0).expect("flow 1"), flow);
        assert_eq!(new.get(&key(2), 0).expect("flow 2"), newer);
        assert_eq!(
            copy_old_flows(&old, &mut new).expect("copy again"),
            0,
            "twice is harmless"
        );
    }
}
