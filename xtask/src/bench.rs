//! `cargo xtask bench [--quick]`: the benchmarks (issue #7).
use anyhow::Result;

pub struct Options {
    /// A short run, for CI and smoke checks.
    pub quick: bool,
}

pub fn run(opts: Options) -> Result<()> {
    let Options { quick } = opts;
    let mode = if quick { " --quick" } else { "" };
    println!("cargo xtask bench{mode}: not implemented yet (issue #7)");
    Ok(())
}
