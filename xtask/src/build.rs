//! `cargo xtask build`: builds the daemon with its eBPF programs embedded.
use std::path::PathBuf;

use anyhow::{Context as _, Result, bail};

use crate::{setup, util};

/// Which cargo profile to build multihome with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Profile {
    Release,
    Debug,
}

impl Profile {
    pub fn from_debug_flag(debug: bool) -> Self {
        if debug { Self::Debug } else { Self::Release }
    }

    fn dir(self) -> &'static str {
        match self {
            Self::Release => "release",
            Self::Debug => "debug",
        }
    }
}

/// Where `cargo build` puts the multihome binary for `profile`.
pub fn binary_path(profile: Profile) -> PathBuf {
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .map(|d| {
            if d.is_relative() {
                util::workspace_root().join(d)
            } else {
                d
            }
        })
        .unwrap_or_else(|| util::workspace_root().join("target"));
    target_dir.join(profile.dir()).join("multihome")
}

/// `cargo xtask build [--debug]`: setup if needed, then build.
pub fn run(profile: Profile) -> Result<()> {
    setup::ensure()?;
    let bin = build(profile)?;
    println!("[build] {}", bin.display());
    Ok(())
}

/// Builds multihome (its build.rs builds the eBPF crate with nightly and
/// bpf-linker through aya-build) and returns the binary's path. Assumes
/// setup has been done.
pub fn build(profile: Profile) -> Result<PathBuf> {
    // multihome's build.rs quietly embeds a stub object when it cannot find
    // bpf-linker; refuse to build such a binary here.
    if util::find_program("bpf-linker").is_none() {
        bail!(
            "bpf-linker is neither on PATH nor in {}; run `cargo xtask setup`",
            util::cargo_bin_dir().display()
        );
    }
    let mut cmd = util::cargo();
    cmd.arg("build");
    if profile == Profile::Release {
        cmd.arg("--release");
    }
    cmd.args(["-p", "multihome"]).env_remove("AYA_BUILD_SKIP");
    println!("+ {}", util::display(&cmd));
    util::run(&mut cmd).with_context(|| format!("building multihome ({})", profile.dir()))?;
    let bin = binary_path(profile);
    if !bin.is_file() {
        bail!("the build succeeded but {} does not exist", bin.display());
    }
    Ok(bin)
}
