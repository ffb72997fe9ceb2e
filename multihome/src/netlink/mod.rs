//! What the daemon reads from and writes to the kernel over rtnetlink:
//! interfaces, addresses and neighbours (`netinfo`), and the fallback
//! routing tables and rules (`routing`).
pub mod netinfo;
pub mod routing;
