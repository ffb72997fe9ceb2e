//! Loads the embedded programs, pins their maps and tcx links under the
//! pin directory, and adopts what an earlier run pinned there.
use std::{
    fs,
    io::ErrorKind,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{MapData, ProgramArray},
    programs::{
        LinkOrder, SchedClassifier, TcAttachType,
        links::{FdLink, PinnedLink},
        tc::TcAttachOptions,
    },
};
use multihome_common::{
    ALL_MAPS, JUMP_LAN_RESET, LAYOUT_VERSION, MAP_AFFINITY, MAP_CONN_FWD, MAP_CONN_REV,
    MAP_ENDPOINT_PORTS, MAP_ENDPOINTS, MAP_JUMP, MAP_REASONS, MAP_SELECT, MAP_SETTINGS,
    MAP_UPLINK_STATS, MAP_UPLINKS, PROG_LAN_IN, PROG_LAN_RESET, PROG_WAN_IN, PROG_WAN_IN_L3,
    PROG_WAN_OUT, PROG_WAN_OUT_L3,
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
    pin_dir
        .join("links")
        .join(format!("{}@{}", ifname.replace('.', ":"), hook.direction()))
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
        ],
    ),
    // 4: SELECT became a hashed Maglev table, SETTINGS gained the hash
    // seed and REASONS counters (all rewritten at start); flows keep
    // their shape.
    (
        3,
        &[MAP_REASONS, MAP_SETTINGS, MAP_SELECT, MAP_UPLINK_STATS],
    ),
    // 5: SELECT holds a table per policy, SETTINGS the rule bank, REASONS
    // the policy counters (all rewritten at start); the rule maps,
    // AFFINITY and ENDPOINTS are new; a flow records its policy where its padding was
    // (0: `balanced`).
    (
        4,
        &[MAP_REASONS, MAP_SETTINGS, MAP_SELECT, MAP_UPLINK_STATS],
    ),
    // 6: UPLINK_STATS gained the passive-health counters (they restart
    // at 0); ENDPOINT_PORTS and SYN_WAIT are new.
    (5, &[MAP_UPLINK_STATS]),
];

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
/// unpinning what changed); refuses any other.
fn check_layout(pin_dir: &Path) -> anyhow::Result<bool> {
    let path = pin_dir.join(MAP_SETTINGS);
    let data = match MapData::from_pin(&path) {
        Ok(d) => d,
        Err(aya::maps::MapError::SyscallError(e)) if e.io_error.kind() == ErrorKind::NotFound => {
            return Ok(false);
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
        return Ok(true);
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
    Ok(true)
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
        let adopted = check_layout(pin_dir)?;
        if adopted {
            unpin_if_resized(pin_dir, MAP_AFFINITY, nat.max_affinities)?;
            unpin_if_resized(pin_dir, MAP_ENDPOINTS, nat.max_endpoints)?;
            unpin_if_resized(pin_dir, MAP_ENDPOINT_PORTS, nat.max_endpoints)?;
        }
        Self::load_inner(pin_dir, nat, adopted).inspect_err(|_| {
            if !adopted {
                // Nothing half-installed: drop the maps this attempt pinned.
                let _ = remove_pins(pin_dir);
            }
        })
    }

    fn load_inner(pin_dir: &Path, nat: &NatConfig, adopted: bool) -> anyhow::Result<Self> {
        let paths: Vec<(&str, PathBuf)> = ALL_MAPS.iter().map(|m| (*m, pin_dir.join(m))).collect();
        let mut loader = EbpfLoader::new();
        loader
            .map_max_entries(MAP_CONN_FWD, nat.max_flows)
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
        for name in [
            PROG_LAN_IN,
            PROG_LAN_RESET,
            PROG_WAN_IN,
            PROG_WAN_IN_L3,
            PROG_WAN_OUT,
            PROG_WAN_OUT_L3,
        ] {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(name)
                .with_context(|| format!("program {name} missing from the object"))?
                .try_into()?;
            prog.load()
                .with_context(|| format!("verifying program {name}"))?;
        }
        // The LAN program tail-calls the reset one; an adopted JUMP
        // switches to this run's program here.
        let fd = {
            let prog: &SchedClassifier = ebpf
                .program(PROG_LAN_RESET)
                .context("program missing")?
                .try_into()?;
            prog.fd()?.try_clone()?
        };
        let mut jump = ProgramArray::try_from(ebpf.map_mut(MAP_JUMP).context("map JUMP missing")?)?;
        jump.set(JUMP_LAN_RESET, &fd, 0)
            .context("pointing JUMP at the reset program")?;
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
        let adopted = PinnedLink::from_pin(&pin).ok().and_then(|old| {
            let link = FdLink::from(old).try_into().ok()?;
            match prog.attach_to_link(link) {
                Ok(id) => Some(id),
                Err(e) => {
                    // The interface went away and came back: that link is
                    // dead, attach afresh.
                    log::info!("{} is stale ({e}); attaching anew", pin.display());
                    let _ = fs::remove_file(&pin);
                    None
                }
            }
        });
        let id = match adopted {
            Some(id) => id,
            None => {
                let _ = fs::remove_file(&pin);
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
                })?
            }
        };
        let link: FdLink = prog.take_link(id)?.try_into()?;
        if !pin.exists() {
            link.pin(&pin)
                .with_context(|| format!("pinning link {}", pin.display()))?;
        }
        Ok(())
    }
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
    for m in ALL_MAPS {
        let _ = fs::remove_file(pin_dir.join(m));
    }
    match fs::remove_dir(pin_dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing pin directory {}", pin_dir.display())),
    }
}
