//! Builds the eBPF programs with aya-build and embeds them. Without
//! bpf-linker (or with AYA_BUILD_SKIP=1) it writes a stub object instead,
//! so that `cargo check` and `cargo clippy` work anywhere; the daemon
//! refuses to load the stub and says how to build the real thing.
use std::{env, fs, path::PathBuf};

use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

/// The first bytes of the stub; `loader.rs` looks for them.
const STUB: &[u8] = b"MULTIHOME-EBPF-STUB";

fn main() -> anyhow::Result<()> {
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    let object = out_dir.join("multihome");
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    println!("cargo:rerun-if-env-changed=PATH");
    let skip = env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v == "true");
    if skip || which_bpf_linker().is_none() {
        println!(
            "cargo:warning=bpf-linker not found or AYA_BUILD_SKIP set: embedding a stub eBPF object; run `cargo xtask build` for a working binary"
        );
        fs::write(&object, STUB).context("writing the stub eBPF object")?;
        return Ok(());
    }
    let ebpf = Package {
        name: "multihome-ebpf",
        root_dir: "../multihome-ebpf",
        no_default_features: false,
        features: &[],
    };
    aya_build::build_ebpf([ebpf], Toolchain::Custom("nightly"))
        .map_err(|e| anyhow!("building the eBPF programs: {e:#}"))
}

fn which_bpf_linker() -> Option<PathBuf> {
    let path = env::var_os("PATH")?;
    env::split_paths(&path)
        .map(|d| d.join("bpf-linker"))
        .find(|p| p.is_file())
}
