//! What the daemon reads from and writes to the kernel over rtnetlink:
//! interfaces, addresses and neighbours (`netinfo`), and the fallback
//! routing tables and rules (`routing`, and `routing6` for IPv6), and the
//! NDP proxy (`ndproxy`).
pub mod ndproxy;
pub mod netinfo;
pub mod routing;
pub mod routing6;
