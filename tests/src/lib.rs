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

pub mod gateway;
pub mod host;
pub mod netns;
pub mod packets;
pub mod scapy;
pub mod services;
pub mod topology;
pub mod tun;
pub mod veth;

pub use gateway::{Gateway, config_for};
pub use host::{PinDir, ensure_bpffs, multihome_bin, require_root, unique_pin_dir, workspace_root};
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
