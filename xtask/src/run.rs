//! `cargo xtask run [-- ARGS]` and `cargo xtask demo`: build, then replace
//! this process with the daemon so that its exit code and signals pass
//! straight through.
use std::{ffi::OsString, os::unix::process::CommandExt as _, process::Command};

use anyhow::{Result, anyhow};

use crate::{
    build::{self, Profile},
    setup, util,
};

pub fn run(profile: Profile, args: Vec<OsString>) -> Result<()> {
    util::require_root("`cargo xtask run`")?;
    setup::ensure()?;
    let bin = build::build(profile)?;
    if args.is_empty() {
        return crate::demo::run(
            &bin,
            crate::demo::Options {
                seconds: None,
                outage_after: None,
                check: false,
            },
        );
    }
    let mut cmd = Command::new(&bin);
    cmd.args(&args).env("PATH", util::search_path());
    println!("+ {}", util::display(&cmd));
    // Only returns on failure.
    let err = cmd.exec();
    Err(anyhow!(err).context(format!("could not execute {}", bin.display())))
}
