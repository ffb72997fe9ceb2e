//! `testbed`: RAII network-namespace topologies for multihome's integration
//! tests.
//!
//! Everything needs root; builders call [`require_root`] and panic with what
//! is missing rather than skipping. Names are unique per process and test
//! (`mh<tag><pid>x<n>`), so tests can run in parallel. Dropping a guard
//! (also while unwinding from a panic) kills its processes and deletes its
//! namespaces. Only 198.18.0.0/15 addresses are used, all inside the
//! namespaces this crate creates; the root namespace is never touched.
//!
//! ```no_run
//! use testbed::*;
//! let t = Topology::standard();
//! let srv = tcp_peer_server(&t.inet, INET_SERVICE, 0);
//! route(&t.gw, &format!("{INET_NET} via {UPLINK_X_GW}"));
//! let seen = tcp_seen_as(&t.gw, Some(UPLINK_X_ADDR), srv.addr()).unwrap();
//! assert_eq!(*seen.ip(), UPLINK_X_ADDR);
//! ```

pub mod dhcp6;
pub mod gateway;
pub mod host;
pub mod layouts;
pub mod netns;
pub mod packets;
pub mod scapy;
pub mod services;
pub mod topology;
pub mod tun;
pub mod veth;

pub use dhcp6::{Dhcpcd, Kea6};
pub use gateway::{Gateway, config_for};
pub use host::{PinDir, ensure_bpffs, multihome_bin, require_root, unique_pin_dir, workspace_root};
pub use layouts::{pin_old_keyed_map, pin_old_map, pin_old_settings};
pub use netns::{NetNs, NsEnterGuard, Proc};
pub use scapy::{PYTHON, scapy, script};
pub use services::{
    IO_TIMEOUT, Mode, PingStats, Server, ping, ping_from, ping_stats, tcp_connect,
    tcp_connect_from, tcp_echo_server, tcp_peer_server, tcp_request, tcp_request_from, tcp_seen_as,
    tcp_server, udp_echo_server, udp_exchange, udp_peer_server, udp_request, udp_request_from,
    udp_seen_as, udp_seen_from, udp_server,
};
pub use topology::*;

/// Polls `f` every 50 ms until it holds; panics naming `what` once
/// `limit` has passed.
pub fn eventually(limit: std::time::Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + limit;
    while !f() {
        assert!(
            std::time::Instant::now() < deadline,
            "not within {limit:?}: {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
pub use tun::{TunRelay, create_tun};
pub use veth::{
    LinkCounters, addr, addr_peer, bridge, disable_offloads, dummy, enable_offloads, enslave,
    link_counters, link_down, link_up, route, route_del, route_replace, set_mtu, veth,
    veth_with_offloads,
};

/// The environment variable that runs the suite with XDP forced:
/// `MULTIHOME_TEST_XDP=native` puts `xdp = "native"` in every config the
/// testbed starts a daemon with (unless it names `xdp` itself) and turns
/// GRO on at both ends of every veth, as native XDP on veth needs.
pub const TEST_XDP_VAR: &str = "MULTIHOME_TEST_XDP";

/// The `xdp` mode the suite runs with, if forced; an unknown value fails
/// loudly rather than testing the default.
pub fn test_xdp() -> Option<&'static str> {
    match std::env::var(TEST_XDP_VAR).ok().as_deref() {
        None | Some("") => None,
        Some("native") => Some("native"),
        Some("off") => Some("off"),
        Some(other) => panic!("{TEST_XDP_VAR}={other}: expected native or off"),
    }
}

/// Whether the suite runs with XDP forced on every interface.
pub fn xdp_forced() -> bool {
    test_xdp() == Some("native")
}

/// `config` with the forced `xdp` mode, when there is one.
pub fn with_test_xdp(config: &str) -> String {
    match test_xdp() {
        Some(mode) if !config.lines().any(|l| l.trim_start().starts_with("xdp")) => {
            format!("xdp = {mode:?}\n{config}")
        }
        _ => config.to_owned(),
    }
}

/// Writes a daemon config to `path` as [`Gateway`] does: with the forced
/// `xdp` mode, so that a reload or restart does not change it.
pub fn write_config(path: &std::path::Path, config: impl AsRef<str>) -> std::io::Result<()> {
    std::fs::write(path, with_test_xdp(config.as_ref()))
}
