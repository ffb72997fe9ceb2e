//! What the daemon reads from and writes to the kernel over rtnetlink:
//! interfaces, addresses and neighbours (`netinfo`), and the fallback
//! routing tables and rules (`routing`, and `routing6` for IPv6), the
//! NDP proxy (`ndproxy`), and the prefixes delegated to the gateway
//! (`delegated`).
pub mod delegated;
pub mod mainroutes;
pub mod ndproxy;
pub mod netinfo;
pub mod routing;
pub mod routing6;
