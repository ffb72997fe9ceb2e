//! `cargo xtask deb`: the Debian package (cargo-deb, from
//! `[package.metadata.deb]` in multihome's Cargo.toml), built from the
//! release binary and checked: the binary, `/etc/multihome.toml` as a
//! conffile, and the hardened `Type=notify` unit (not enabled on install:
//! the config must name the interfaces first); then installed with
//! `dpkg -i` into a scratch root, where `multihome check` must pass on
//! the shipped config and `systemd-analyze verify` on the unit.
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
    install_check(&deb)?;
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
        "ExecStopPost=/usr/bin/multihome cleanup --unless-restarting %n",
    ] {
        ensure!(unit.contains(want), "the unit lacks {want}:\n{unit}");
    }
    Ok(())
}

/// Installs the package with `dpkg -i` into a scratch root (nothing
/// outside it changes), then checks the shipped config with the shipped
/// binary, and the unit with `systemd-analyze verify` (which must have
/// nothing to say).
fn install_check(deb: &std::path::Path) -> Result<()> {
    let root = tempdir()?;
    let result = (|| {
        util::run(
            Command::new("dpkg")
                .arg(format!("--root={}", root.display()))
                .args([
                    "--force-script-chrootless",
                    "--force-not-root",
                    // The scratch root has no libc6 package to depend on.
                    "--force-depends",
                    "-i",
                ])
                .arg(deb),
        )?;
        let config = root.join("etc/multihome.toml");
        ensure!(config.is_file(), "dpkg -i left no {}", config.display());
        util::run(
            Command::new(root.join("usr/bin/multihome"))
                .args(["check", "--config"])
                .arg(&config),
        )?;
        // The targets and slices the unit's default dependencies name.
        let units = root.join("usr/lib/systemd/system");
        for entry in std::fs::read_dir("/usr/lib/systemd/system")? {
            let path = entry?.path();
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            if name.ends_with(".target") || name.ends_with(".slice") {
                let _ = std::fs::copy(&path, units.join(name));
            }
        }
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(format!("--root={}", root.display()))
            .arg("/usr/lib/systemd/system/multihome.service")
            .output()?;
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        ensure!(
            out.status.success() && said.trim().is_empty(),
            "systemd-analyze verify rejects the unit:\n{said}"
        );
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&root);
    result
}

fn tempdir() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("multihome-deb-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
