//! `cargo xtask deb`: the Debian package (cargo-deb, from
//! `[package.metadata.deb]` in multihome's Cargo.toml), built from the
//! release binary and checked: the binary, `/etc/multihome.toml` as a
//! conffile, and the hardened `Type=notify` unit (not enabled on install:
//! the config must name the interfaces first).
use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, Result, bail, ensure};

use crate::{
    build::{self, Profile},
    setup, util,
};

/// Builds the package; returns its path.
pub fn run() -> Result<PathBuf> {
    setup::ensure()?;
    build::build(Profile::Release)?;
    let out_dir = util::workspace_root().join("target/debian");
    let mut cmd = util::cargo();
    cmd.args([
        "deb",
        "-p",
        "multihome",
        "--no-build",
        "--no-strip",
        "--output",
    ])
    .arg(&out_dir);
    println!("+ {}", util::display(&cmd));
    let printed =
        util::output_ok(&mut cmd).context("cargo deb failed (run it by hand to see why)")?;
    let deb = PathBuf::from(printed.lines().last().unwrap_or_default().trim());
    ensure!(
        deb.is_file(),
        "cargo deb printed no package path: {printed}"
    );
    check(&deb)?;
    println!("built and checked {}", deb.display());
    Ok(deb)
}

/// What the package must hold, as dpkg-deb reads it.
fn check(deb: &std::path::Path) -> Result<()> {
    let dpkg = |args: &[&str]| {
        util::output_ok(Command::new("dpkg-deb").args(args).arg(deb))
            .with_context(|| format!("dpkg-deb {args:?}"))
    };
    let files = dpkg(&["--contents"])?;
    for want in [
        "./usr/bin/multihome",
        "./etc/multihome.toml",
        "/systemd/system/multihome.service",
    ] {
        if !files.lines().any(|l| l.ends_with(want)) {
            bail!("{} lacks {want}:\n{files}", deb.display());
        }
    }
    let conffiles = util::output_ok(
        Command::new("dpkg-deb")
            .arg("--info")
            .arg(deb)
            .arg("conffiles"),
    )
    .unwrap_or_default();
    ensure!(
        conffiles.lines().any(|l| l.trim() == "/etc/multihome.toml"),
        "/etc/multihome.toml is not a conffile: {conffiles:?}"
    );
    let dir = tempdir()?;
    util::run(Command::new("dpkg-deb").arg("--extract").arg(deb).arg(&dir))?;
    // /usr/lib on current Debian, /lib before the merged /usr.
    let unit = ["usr/lib", "lib"]
        .iter()
        .find_map(|d| {
            std::fs::read_to_string(dir.join(d).join("systemd/system/multihome.service")).ok()
        })
        .context("reading the unit from the package")?;
    let _ = std::fs::remove_dir_all(&dir);
    for want in [
        "Type=notify",
        "ExecStart=/usr/bin/multihome run --config /etc/multihome.toml",
        "CapabilityBoundingSet=",
        "ProtectSystem=strict",
        "ReadWritePaths=/sys/fs/bpf /proc/sys/net",
    ] {
        ensure!(unit.contains(want), "the unit lacks {want}:\n{unit}");
    }
    Ok(())
}

fn tempdir() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("multihome-deb-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
