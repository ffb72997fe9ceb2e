//! The eBPF datapath as the daemon sees it: the programs loaded, pinned
//! and attached (`loader`, and where XDP runs: `xdp`), typed access to the
//! pinned maps (`maps`, `mapwalk`), and the flows in them: their states
//! and scoped purges (`flows`), their expiry (`reaper`), the
//! challenge ACKs that end them on a dead uplink (`challenge`), and the
//! LAN hosts' next hops (`lanhops`).
pub mod challenge;
pub mod flows;
pub mod lanhops;
pub mod loader;
pub mod maps;
pub mod mapwalk;
pub mod reaper;
pub mod xdp;
