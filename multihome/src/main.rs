//! multihome: daemon and CLI.
mod cli;
mod config;
mod control;
mod daemon;
mod datapath;
mod health;
mod metrics;
mod netlink;
mod policy;
mod status;
mod uplinks;

// The modules grouped by concern keep their short paths (`crate::maps`).
use datapath::{challenge, flows, lanhops, loader, maps, mapwalk, reaper, xdp};
use netlink::{delegated, ndproxy, netinfo, routing, routing6};
use policy::choice;

use clap::{CommandFactory as _, FromArgMatches as _};

use crate::cli::{Cli, Command};

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    // Every command's --help ends with the exit codes.
    let command = Cli::command().mut_subcommands(|c| c.after_help(cli::EXIT_CODES));
    let cli = Cli::from_arg_matches(&command.get_matches()).unwrap_or_else(|e| e.exit());
    if let Err(e) = dispatch(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn dispatch(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run {
            config,
            pin,
            keep_on_exit,
            metrics,
        } => runtime()?.block_on(daemon::run(daemon::RunOptions {
            config_path: config,
            pin_dir: pin.pin_dir,
            keep_on_exit,
            metrics,
        })),
        Command::Conns(args) => cli::conns::run(&args),
        Command::Status { pin, json } => cli::status::run(&pin, json),
        Command::Top { pin, iterations } => cli::top::run(&pin, iterations),
        Command::Reload { pin } => {
            println!(
                "{}",
                control::send(&pin.pin_dir, &control::Request::Reload)?
            );
            Ok(())
        }
        Command::Explain(args) => cli::explain::run(&args),
        Command::Uplink { action, pin } => {
            use cli::UplinkAction::*;
            let request = match action {
                SetWeight { name, weight } => control::Request::SetWeight {
                    uplink: name,
                    weight,
                },
                Drain { name, reset } => control::Request::Drain {
                    uplink: name,
                    reset,
                },
                Undrain { name } => control::Request::Undrain { uplink: name },
            };
            println!("{}", control::send(&pin.pin_dir, &request)?);
            Ok(())
        }
        Command::Check { config } => {
            let c = config::Config::load(&config)?;
            println!("{}: OK", config.display());
            // Where NPTv6 maps each internal prefix, as far as the file says.
            for (id, u) in c.uplinks.iter().enumerate() {
                for (inner, outer) in c.npt_pairs(id) {
                    println!("  {}: NPTv6 maps {inner} onto {outer}", u.name);
                }
            }
            Ok(())
        }
        Command::Cleanup {
            pin,
            unless_restarting,
        } => {
            if let Some(unit) = unless_restarting
                && let Some(why) = cli::systemd::keep_for(&unit)
            {
                println!("keeping the datapath and its flows: {why}");
                return Ok(());
            }
            runtime()?.block_on(daemon::cleanup(&pin.pin_dir))
        }
        Command::EbpfObject { out } => loader::write_object(&out),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}
