//! The vocabulary shared by the kernel programs and the daemon: map names,
//! map keys and values, counters and reasons.
//!
//! Every type stored in a map is `#[repr(C)]`, has explicit padding and a
//! compile-time size assert. Fields in network byte order end in `_be`.
#![no_std]

use core::mem::size_of;

/// Bumped whenever a pinned map changes shape; a daemon refuses to adopt
/// maps pinned by another layout.
pub const LAYOUT_VERSION: u32 = 12;

/// The clock of every stamp in the maps: `CLOCK_MONOTONIC_COARSE`, which
/// the programs read with `bpf_ktime_get_coarse_ns` (a cached tick, no
/// clock-source read: about 20 ns less per packet than
/// `bpf_ktime_get_boot_ns`, measured) and the daemon with
/// `clock_gettime`. It stands still while the machine is suspended, and
/// moves in ticks (1 to 10 ms). Layouts up to 7 stamped with
/// `CLOCK_BOOTTIME`.
pub const CLOCK: &str = "CLOCK_MONOTONIC_COARSE";

/// Uplink slots in [`MAP_UPLINKS`]; an uplink's id is its slot.
pub const MAX_UPLINKS: u32 = 8;
/// Internal IPv6 prefixes (`lan_prefixes6`) an uplink maps, each in an
/// entry of its own in [`MAP_UPLINKS6`].
pub const MAX_LAN6: u32 = 8;
/// LAN prefixes in [`MAP_LAN_NETS`].
pub const MAX_LAN_NETS: u32 = 16;
/// Slots of the choice table: a flow hash picks one. Enough that any
/// weight ratio the config allows (1 to 255 over eight uplinks) gets
/// its share, each uplink to within one slot.
pub const SELECT_SLOTS: usize = 4096;
/// Default connection-map capacity (flows; each flow uses two entries):
/// the kernel's own `nf_conntrack_max` on this machine kind, about 48 MiB
/// at the measured 192 bytes per flow.
pub const DEFAULT_MAX_FLOWS: u32 = 262_144;
/// LAN hosts whose flows are counted in [`MAP_HOSTS`]; a host beyond
/// them is not held to its quota.
pub const MAX_HOSTS: u32 = 65_536;
/// Fragmented datagrams tracked at once in [`MAP_FRAGS`] (LRU).
pub const FRAG_ENTRIES: u32 = 8192;
/// Slots of the direct-mapped [`MAP_PEERS`] (a power of two; 1 MiB).
pub const PEER_SLOTS: u32 = 65_536;
/// The gateway's own ICMP echo (destination, id) pairs in
/// [`MAP_HOST_ECHO`] (LRU).
pub const HOST_ECHO_ENTRIES: u32 = 4096;
/// How long after its last request a (destination, id) pair stays the
/// gateway's, in nanoseconds.
pub const HOST_ECHO_NS: u64 = 60_000_000_000;
/// Mappings hairpinning can reach in [`MAP_EIM`] (LRU: the most recent).
pub const EIM_ENTRIES: u32 = 65_536;
/// Prefixes in [`MAP_ROUTED`], over all uplinks.
pub const MAX_ROUTED_PREFIXES: u32 = 256;
/// Policies, the built-in `balanced` (id 0) included: one [`SelectTable`]
/// each.
pub const MAX_POLICIES: u32 = 16;
/// Policy rules, as bits of a [`RuleSet`].
pub const MAX_RULES: u32 = 128;
/// Words of a [`RuleSet`].
pub const RULE_WORDS: usize = MAX_RULES as usize / 64;
/// Prefixes in each rule trie, both banks together.
pub const MAX_RULE_PREFIXES: u32 = 65_536;
/// Affinity records of the sticky balance modes (`source`, `site`).
pub const AFFINITY_ENTRIES: u32 = 65_536;
/// Endpoint records of `balance = "endpoint"` policies.
pub const ENDPOINT_ENTRIES: u32 = 65_536;
/// Destinations waiting for a SYN-ACK, over all uplinks ([`MAP_SYN_WAIT`]).
pub const SYN_WAIT_ENTRIES: u32 = 4096;
/// Rule banks: the daemon fills the one not in use, then switches.
pub const RULE_BANKS: u32 = 2;
/// The low byte of `skb->mark` (over the mark base) on packets the fast
/// path translated and redirected to an uplink: the uplink's egress
/// program passes them without parsing.
pub const MARK_TRANSLATED: u32 = 0xff;
/// Low byte of `skb->mark` for a new flow a policy refused: the daemon's
/// `prohibit` rule makes the kernel answer ICMP administratively
/// prohibited (code 13).
pub const MARK_PROHIBIT: u32 = 0xfe;

/// Map names: stable, at most 15 characters, also the pin file names.
pub const MAP_CONN_FWD: &str = "CONN_FWD";
pub const MAP_CONN_REV: &str = "CONN_REV";
pub const MAP_UPLINKS: &str = "UPLINKS";
pub const MAP_SELECT: &str = "SELECT";
pub const MAP_LAN_NETS: &str = "LAN_NETS";
pub const MAP_SETTINGS: &str = "SETTINGS";
pub const MAP_UPLINK_STATS: &str = "UPLINK_STATS";
pub const MAP_REASONS: &str = "REASONS";
pub const MAP_ROUTED: &str = "ROUTED";
pub const MAP_FRAGS: &str = "FRAGS";
pub const MAP_PEERS: &str = "PEERS";
pub const MAP_HOST_ECHO: &str = "HOST_ECHO";
pub const MAP_HOSTS: &str = "HOSTS";
pub const MAP_FILL: &str = "FILL";
pub const MAP_EIM: &str = "EIM";
pub const MAP_JUMP: &str = "JUMP";
pub const MAP_RULE_SRC: &str = "RULE_SRC";
pub const MAP_RULE_DST: &str = "RULE_DST";
pub const MAP_RULE_PROTO: &str = "RULE_PROTO";
pub const MAP_RULE_DPORT: &str = "RULE_DPORT";
pub const MAP_RULE_DSCP: &str = "RULE_DSCP";
pub const MAP_RULE_ACTION: &str = "RULE_ACTION";
pub const MAP_AFFINITY: &str = "AFFINITY";
pub const MAP_ENDPOINTS: &str = "ENDPOINTS";
/// A public mapping an endpoint record holds (uplink address, port,
/// protocol, as [`EimKey`]) -> that endpoint ([`EndpointKey`]): while the
/// record holds it, no other flow is given the port towards any remote.
pub const MAP_ENDPOINT_PORTS: &str = "ENDPOINT_PORTS";
pub const MAP_SYN_WAIT: &str = "SYN_WAIT";
/// Uplink slot -> its next hop ([`NextHop`]), kept by the daemon.
pub const MAP_NEXT_HOPS: &str = "NEXT_HOPS";
/// One word: 0, or [`CLASSIFY_IN_MAIN`] with or without
/// [`CLASSIFY_BY_ROUTES`].
pub const MAP_CLASSIFY: &str = "CLASSIFY";
/// The kernel's `main` table, mirrored by the daemon: IPv4 prefix
/// ([`RoutedKey`]) -> [`MainRoute`]; complete while [`CLASSIFY_BY_ROUTES`]
/// is set.
pub const MAP_MAIN_ROUTES: &str = "MAIN_ROUTES";
/// The gateway's own addresses and broadcast addresses, as the kernel's
/// `local` table lists them (network order) -> [`LOCAL_ADDR`] or
/// [`LOCAL_BROADCAST`]; kept by the daemon while [`CLASSIFY_IN_MAIN`].
pub const MAP_LOCAL_ADDRS: &str = "LOCAL_ADDRS";
/// Interface index -> the same index: the devices the XDP programs may
/// redirect to (a `BPF_MAP_TYPE_DEVMAP_HASH`). The daemon lists a LAN or
/// uplink device only while XDP runs on it and its root qdisc shapes
/// nothing (a redirect skips the qdisc and tcx egress).
pub const MAP_XDP_DEVS: &str = "XDP_DEVS";
/// Uplink slot -> [`XdpStats`], per CPU.
pub const MAP_XDP_STATS: &str = "XDP_STATS";
/// Routed IPv6 source prefix -> the uplinks (a bit each) that may carry
/// it ([`Routed6Key`] -> `RoutedUplinks`): the IPv6 egress guard's list,
/// folded like [`MAP_ROUTED`]'s.
pub const MAP_ROUTED6: &str = "ROUTED6";
/// IPv6 connection map: [`Flow6Key`] -> [`Flow6`].
pub const MAP_CONN6: &str = "CONN6";
/// [`uplink6_slot`] -> an uplink's IPv6 translation of one internal
/// prefix ([`Uplink6`]).
pub const MAP_UPLINKS6: &str = "UPLINKS6";
/// With several internal prefixes, the prefixes of the [`MAP_UPLINKS6`]
/// entries past each uplink's first ([`Mapped6Key`] -> index): an
/// internal prefix gives its `k` (the same for every uplink), an uplink's
/// prefix its entry's slot. A LAN of one prefix leaves it empty.
pub const MAP_MAPPED6: &str = "MAPPED6";
/// `allow_inbound6`: which unsolicited IPv6 connections from outside may
/// reach the LAN ([`Allow6Key`] -> 1).
pub const MAP_ALLOW6: &str = "ALLOW6";
/// Uplink slot -> its IPv6 next hop ([`NextHop`]), as [`MAP_NEXT_HOPS`]
/// for IPv4.
pub const MAP_NEXT_HOPS6: &str = "NEXT_HOPS6";
/// LAN host (IPv4 address, network order) -> its [`NextHop`] (its MAC and
/// the LAN device's), from the kernel's neighbour table: established
/// packets to it skip `bpf_fib_lookup`.
pub const MAP_LAN_HOPS: &str = "LAN_HOPS";
/// [`MAP_LAN_HOPS`] for IPv6 LAN hosts (address, 16 bytes).
pub const MAP_LAN_HOPS6: &str = "LAN_HOPS6";
/// Entries of [`MAP_LAN_HOPS`] and of [`MAP_LAN_HOPS6`].
pub const MAX_LAN_HOPS: u32 = 4096;
/// IPv6 LAN host (its address, 16 bytes) -> [`HostFlows`]: the per-host
/// flow quota of [`MAP_HOSTS`] for IPv6.
pub const MAP_HOSTS6: &str = "HOSTS6";
/// NAT66's reverse map: [`Nat6Key`] (remote end, NAT port, uplink) ->
/// [`Nat6Lan`] (the LAN endpoint).
pub const MAP_NAT6: &str = "NAT6";
/// Entries of [`MAP_ALLOW6`].
pub const MAX_ALLOW6: u32 = 256;
/// Entries of [`MAP_CONN6`].
pub const MAX_FLOWS6: u32 = 131_072;
/// Entries of [`MAP_XDP_DEVS`].
pub const MAX_XDP_DEVS: u32 = 64;
pub const ALL_MAPS: [&str; 42] = [
    MAP_CONN_FWD,
    MAP_CONN_REV,
    MAP_UPLINKS,
    MAP_SELECT,
    MAP_LAN_NETS,
    MAP_SETTINGS,
    MAP_UPLINK_STATS,
    MAP_REASONS,
    MAP_ROUTED,
    MAP_FRAGS,
    MAP_PEERS,
    MAP_HOST_ECHO,
    MAP_HOSTS,
    MAP_FILL,
    MAP_EIM,
    MAP_JUMP,
    MAP_RULE_SRC,
    MAP_RULE_DST,
    MAP_RULE_PROTO,
    MAP_RULE_DPORT,
    MAP_RULE_DSCP,
    MAP_RULE_ACTION,
    MAP_AFFINITY,
    MAP_ENDPOINTS,
    MAP_ENDPOINT_PORTS,
    MAP_SYN_WAIT,
    MAP_NEXT_HOPS,
    MAP_CLASSIFY,
    MAP_LOCAL_ADDRS,
    MAP_XDP_DEVS,
    MAP_XDP_STATS,
    MAP_ROUTED6,
    MAP_CONN6,
    MAP_UPLINKS6,
    MAP_ALLOW6,
    MAP_NEXT_HOPS6,
    MAP_NAT6,
    MAP_HOSTS6,
    MAP_LAN_HOPS,
    MAP_LAN_HOPS6,
    MAP_MAIN_ROUTES,
    MAP_MAPPED6,
];

/// [`MAP_CLASSIFY`]: the kernel's policy rules route an unmarked packet
/// from the LAN through the `local` table, then `main`, and no further
/// (the daemon checked them: only the kernel's three default rules and
/// multihome's own, and an empty `default` table). A new flow's route is
/// then classified by [`MAP_LOCAL_ADDRS`] and a direct lookup in `main`,
/// which costs far less than the walk of the rules.
pub const CLASSIFY_IN_MAIN: u32 = 1;
/// [`MAP_CLASSIFY`], with [`CLASSIFY_IN_MAIN`]: [`MAP_MAIN_ROUTES`] holds
/// the whole `main` table, and a new flow's route is one LPM lookup there
/// instead of `bpf_fib_lookup` (which still answers for a prefix marked
/// [`ROUTE_ASK_FIB`]).
pub const CLASSIFY_BY_ROUTES: u32 = 2;
/// Entries of [`MAP_MAIN_ROUTES`]: a larger `main` takes `bpf_fib_lookup`.
pub const MAX_MAIN_ROUTES: u32 = 4096;
/// [`MainRoute::kind`]: forwarded through a gateway on `ifindex`.
pub const ROUTE_VIA: u32 = 1;
/// [`MainRoute::kind`]: on-link on `ifindex` (the next hop is the
/// destination itself).
pub const ROUTE_CONNECTED: u32 = 2;
/// [`MainRoute::kind`]: not forwarded (`blackhole`, `unreachable`,
/// `prohibit`).
pub const ROUTE_REJECT: u32 = 3;
/// [`MainRoute::kind`]: a route the mirror does not model (several routes
/// or nexthops that differ, a dead nexthop, encapsulation, a nexthop
/// object, ...): `bpf_fib_lookup` in `main` decides.
pub const ROUTE_ASK_FIB: u32 = 4;
/// [`MAP_LOCAL_ADDRS`]: a local address (`RTN_LOCAL`).
pub const LOCAL_ADDR: u32 = 1;
/// [`MAP_LOCAL_ADDRS`]: a broadcast address (`RTN_BROADCAST`).
pub const LOCAL_BROADCAST: u32 = 2;
/// Entries of [`MAP_LOCAL_ADDRS`].
pub const MAX_LOCAL_ADDRS: u32 = 1024;
/// The kernel's `main` routing table (`RT_TABLE_MAIN`).
pub const RT_TABLE_MAIN: u32 = 254;

/// Program names (the `#[classifier]` functions).
pub const PROG_LAN_IN: &str = "mh_lan_in";
/// Answers a LAN host's TCP segment of a flow whose uplink went down with
/// an RST; tail-called by `mh_lan_in` through [`MAP_JUMP`] slot
/// [`JUMP_LAN_RESET`], so that the rare path costs the common one nothing.
pub const PROG_LAN_RESET: &str = "mh_lan_reset";
/// [`MAP_JUMP`]'s slot of [`PROG_LAN_RESET`].
pub const JUMP_LAN_RESET: u32 = 0;
/// The IPv6 halves of the LAN ingress and uplink programs, tail-called by
/// them through [`MAP_JUMP`] for every packet that is not IPv4: each has
/// the verifier's whole budget, and IPv4 pays nothing for them.
pub const PROG_LAN_IN6: &str = "mh_lan_in6";
pub const PROG_WAN_IN6: &str = "mh_wan_in6";
pub const PROG_WAN_IN6_L3: &str = "mh_wan_in6_l3";
pub const PROG_WAN_OUT6: &str = "mh_wan_out6";
pub const PROG_WAN_OUT6_L3: &str = "mh_wan_out6_l3";
pub const JUMP_LAN_IN6: u32 = 1;
pub const JUMP_WAN_IN6: u32 = 2;
pub const JUMP_WAN_IN6_L3: u32 = 3;
pub const JUMP_WAN_OUT6: u32 = 4;
pub const JUMP_WAN_OUT6_L3: u32 = 5;
/// Every tail-called program and its [`MAP_JUMP`] slot.
pub const JUMP_PROGS: [(&str, u32); 6] = [
    (PROG_LAN_RESET, JUMP_LAN_RESET),
    (PROG_LAN_IN6, JUMP_LAN_IN6),
    (PROG_WAN_IN6, JUMP_WAN_IN6),
    (PROG_WAN_IN6_L3, JUMP_WAN_IN6_L3),
    (PROG_WAN_OUT6, JUMP_WAN_OUT6),
    (PROG_WAN_OUT6_L3, JUMP_WAN_OUT6_L3),
];
pub const PROG_WAN_IN: &str = "mh_wan_in";
pub const PROG_WAN_IN_L3: &str = "mh_wan_in_l3";
pub const PROG_WAN_OUT: &str = "mh_wan_out";
pub const PROG_WAN_OUT_L3: &str = "mh_wan_out_l3";
/// XDP on LAN devices: packets of pinned flows, translated and redirected
/// before an skb exists; the rest passes to [`PROG_LAN_IN`] unchanged.
pub const PROG_XDP_LAN: &str = "mh_xdp_lan";
/// XDP on uplinks: replies of pinned flows, as [`PROG_XDP_LAN`]; the rest
/// passes to [`PROG_WAN_IN`] unchanged.
pub const PROG_XDP_WAN: &str = "mh_xdp_wan";

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_DCCP: u8 = 33;
pub const IPPROTO_AH: u8 = 51;
pub const IPPROTO_UDPLITE: u8 = 136;

/// A connection as one direction of it appears on the wire.
///
/// In [`MAP_CONN_FWD`] it is the LAN side: LAN host to remote. In
/// [`MAP_CONN_REV`] it is a reply as it arrives on the uplink: remote to
/// the NAT address and port. For ICMP echo the identifier stands in for the
/// LAN-side port (`sport_be` forward, `dport_be` reverse) and the other
/// port is 0. Every other protocol (GRE, ESP, SCTP, ...) is translated by
/// address only: both ports are 0, so one LAN host at a time holds an
/// (uplink address, remote, protocol).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(test, derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct FlowKey {
    pub saddr_be: u32,
    pub daddr_be: u32,
    pub sport_be: u16,
    pub dport_be: u16,
    pub proto: u8,
    // Two fields, not [u8; 3]: LLVM zeroes a 3-byte array with a call to a
    // byte-loop memset in BPF code.
    pub _pad0: u8,
    pub _pad1: u16,
}

impl FlowKey {
    /// The key with only its two addresses: what `balance = "hash"`
    /// hashes.
    #[inline(always)]
    pub const fn addresses(&self) -> FlowKey {
        FlowKey {
            saddr_be: self.saddr_be,
            daddr_be: self.daddr_be,
            sport_be: 0,
            dport_be: 0,
            proto: 0,
            _pad0: 0,
            _pad1: 0,
        }
    }

    /// The reverse key that replies to this LAN flow carry once it is
    /// translated to `nat_addr_be:nat_port_be`.
    #[inline(always)]
    pub const fn reply(&self, nat_addr_be: u32, nat_port_be: u16) -> FlowKey {
        FlowKey {
            saddr_be: self.daddr_be,
            daddr_be: nat_addr_be,
            sport_be: if self.proto == IPPROTO_ICMP {
                0
            } else {
                self.dport_be
            },
            dport_be: nat_port_be,
            proto: self.proto,
            _pad0: 0,
            _pad1: 0,
        }
    }

    /// The forward key of the flow that this reverse key and entry belong to.
    #[inline(always)]
    pub const fn forward(&self, rev: &FlowRev) -> FlowKey {
        FlowKey {
            saddr_be: rev.lan_addr_be,
            daddr_be: self.saddr_be,
            sport_be: rev.lan_port_be,
            dport_be: if self.proto == IPPROTO_ICMP {
                0
            } else {
                self.sport_be
            },
            proto: self.proto,
            _pad0: 0,
            _pad1: 0,
        }
    }
}

/// Forward entry: what a LAN flow was pinned to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(test, derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct FlowFwd {
    /// [`CLOCK`] time of the last packet, ns, refreshed at most once a
    /// second.
    pub last_seen_ns: u64,
    pub nat_addr_be: u32,
    /// `FLOW_*` bits.
    pub flags: u32,
    pub nat_port_be: u16,
    pub uplink: u8,
    /// The policy that placed it ([`SelectTable`] index; 0: `balanced`).
    pub policy: u8,
    /// Creation time, seconds of [`CLOCK`].
    pub created_s: u32,
    /// TCP: the sequence number just past the highest data byte the LAN
    /// host sent on this flow (RFC 9293 SND.MAX as the gateway sees it); 0
    /// before any data. A data segment that ends at or before it is a
    /// retransmission. ICMP echo: the sequence number of the LAN host's
    /// last request (as in the packet), with [`ECHO_OUTSTANDING`] set
    /// until its reply passed.
    pub snd_max: u32,
    pub _pad: u32,
}

/// Reverse entry: where a reply goes back to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(test, derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct FlowRev {
    pub lan_addr_be: u32,
    pub lan_port_be: u16,
    pub uplink: u8,
    pub _pad: u8,
}

/// A packet from the remote side was seen.
pub const FLOW_SEEN_REPLY: u32 = 1 << 0;
/// TCP FIN from the LAN side.
pub const FLOW_FIN_OUT: u32 = 1 << 1;
/// TCP FIN from the remote side.
pub const FLOW_FIN_IN: u32 = 1 << 2;
/// TCP RST from the LAN side: the flow is closed.
pub const FLOW_RST: u32 = 1 << 3;
/// Pinned while its preferred uplink (the one its hash picks with every
/// uplink usable) was not usable: `on_up = "return"` moves it back.
pub const FLOW_FAILED_OVER: u32 = 1 << 4;
/// A LAN-to-LAN flow through another LAN host's public mapping
/// (hairpinning): translated, then delivered back to the LAN.
pub const FLOW_HAIRPIN: u32 = 1 << 5;
/// TCP RST from the remote side: the flow is closed unless a later
/// packet, either way, shows the RST closed nothing (a middlebox cannot
/// check the window as the endpoint does; RFC 5961 §3).
pub const FLOW_RST_IN: u32 = 1 << 6;

/// One uplink, written by the daemon.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(test, derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct Uplink {
    /// Source address for SNAT; 0 while the uplink has none.
    pub addr_be: u32,
    /// Next hop; 0 on point-to-point links.
    pub gateway_be: u32,
    pub ifindex: u32,
    /// Routing table for `bpf_fib_lookup`.
    pub table: u32,
    /// `skb->mark` for packets handed to the stack.
    pub mark: u32,
    pub mtu: u16,
    /// `UPLINK_*` bits.
    pub flags: u16,
    pub weight: u32,
    /// Probe round-trip time, microseconds (0: not probed); for people.
    pub rtt_us: u32,
    /// Probe loss over the probe window, per mille; for people.
    pub loss_permille: u32,
    /// The uplink's name from the config, NUL-padded (for people and
    /// `bpftool`; the programs never read it).
    pub name: [u8; 16],
    /// The interface's name, NUL-padded.
    pub ifname: [u8; 16],
    /// TCP MSS that SYN and SYN-ACK through this uplink are clamped to
    /// (bytes); 0: no clamping.
    pub mss_clamp: u16,
    pub _pad: u16,
}

/// The slot holds a configured uplink.
pub const UPLINK_CONFIGURED: u16 = 1 << 0;
/// Healthy, has an address, link up: may take new flows.
pub const UPLINK_USABLE: u16 = 1 << 1;
/// The device has no Ethernet header (ppp, tun).
pub const UPLINK_L3: u16 = 1 << 2;
/// Not usable because its health probes fail (for people).
pub const UPLINK_PROBES_FAIL: u16 = 1 << 3;
/// Not usable because its link is down or missing (for people).
pub const UPLINK_LINK_DOWN: u16 = 1 << 4;
/// Drained by the operator: takes no new flows, keeps its flows.
pub const UPLINK_DRAINED: u16 = 1 << 5;
/// Down long enough for `on_down` to act: the next LAN packet of a
/// non-TCP flow pinned here removes it and makes it anew elsewhere.
pub const UPLINK_EVACUATE: u16 = 1 << 6;
/// With [`UPLINK_EVACUATE`]: TCP flows too (`on_down = "purge"`).
pub const UPLINK_EVACUATE_TCP: u16 = 1 << 7;
/// Not usable yet: back from an outage less than `hold_down_ms` ago (for
/// people).
pub const UPLINK_HELD_DOWN: u16 = 1 << 8;
/// With [`UPLINK_EVACUATE`] (`on_down = "reset"`): the next LAN segment of
/// an answered TCP flow pinned here is answered with an RST; an
/// unanswered one (a SYN being retried) moves instead.
pub const UPLINK_RESET_TCP: u16 = 1 << 9;
/// Down long enough for `on_down` to act, whatever the uplink's own
/// `on_down` is: a flow whose policy has its own `on_down`
/// ([`SelectTable::on_down`]) follows that one.
pub const UPLINK_OUTAGE: u16 = 1 << 10;
/// Drained with `--reset` (with [`UPLINK_OUTAGE`]): each flow's next LAN
/// packet resets it (TCP) or moves it, whatever its policy's `on_down`.
pub const UPLINK_DRAIN_RESET: u16 = 1 << 11;
/// Live traffic took it down: SYNs or data sent again to several
/// remotes went unanswered.
pub const UPLINK_TRAFFIC_DOWN: u16 = 1 << 12;
/// Back on trial after [`UPLINK_TRAFFIC_DOWN`]: a share of new flows tries it.
pub const UPLINK_CANARY: u16 = 1 << 13;
/// Past a degraded threshold of live traffic: no new flows while another
/// uplink is healthy; pinned flows stay.
pub const UPLINK_DEGRADED: u16 = 1 << 14;

/// An uplink's next hop as the daemon last saw it in the kernel's
/// neighbour and link tables (rtnetlink `RTM_NEWNEIGH`, `RTM_NEWLINK`):
/// what `bpf_fib_lookup` would answer for the uplink's table, cached so
/// that a flow's packets need no lookup. [`MAP_NEXT_HOPS`]'s value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(test, derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct NextHop {
    /// The gateway's MAC then the device's, as an Ethernet header starts;
    /// zero on L3 devices, which take none.
    pub mac: [u8; 12],
    /// The device; a packet takes the lookup unless it is the uplink's.
    pub ifindex: u32,
    /// The device's MTU, bytes: a larger packet takes the lookup.
    pub mtu: u32,
    /// 1 while the entry may be used: link up, and the gateway's MAC known
    /// (on an Ethernet device). 0: every packet takes the lookup.
    pub valid: u32,
}

/// The choice table, Maglev-style: a new flow takes the uplink in slot
/// `flow_hash(key, seed) % SELECT_SLOTS`, so the same 5-tuple gets the
/// same uplink while the uplink set stays the same, and a change of the
/// set moves few flows. Each uplink holds slots in proportion to its
/// weight.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(test, derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct SelectTable {
    /// 1 when `now` is filled, 0 when no uplink is usable.
    pub usable: u32,
    /// 1 when `preferred` is filled.
    pub configured: u32,
    /// Bit `i` set when uplink `i` holds slots in `now`: an affinity to
    /// an uplink outside it no longer holds.
    pub now_members: u32,
    /// How long an idle affinity lasts, in seconds (`source`, `site`).
    pub sticky_s: u32,
    /// `site`: the destination bits that make a site (a /24: 0xffffff00),
    /// in network order.
    pub site_mask_be: u32,
    /// `BALANCE_*`.
    pub balance: u8,
    /// `LAST_RESORT_*`: what a new flow gets when `usable` is 0.
    pub last_resort: u8,
    /// `ON_DOWN_*`: what an outage of its flow's uplink does to the
    /// policy's flows; `ON_DOWN_UPLINK` leaves it to the uplink.
    pub on_down: u8,
    pub _pad: u8,
    /// The policy's name, NUL-padded: flows record the index, the CLI
    /// shows the name, and a restart keeps each name's index.
    pub name: [u8; 16],
    /// Uplink ids over the usable uplinks.
    pub now: [u8; SELECT_SLOTS],
    /// Uplink ids as if every configured uplink were usable: a flow whose
    /// slot differs here, on an uplink not usable, failed over.
    pub preferred: [u8; SELECT_SLOTS],
}

/// A new flow's uplink by the hash of its 5-tuple.
pub const BALANCE_CONNECTION: u8 = 0;
/// By the hash of (source, destination) addresses only, like MikroTik
/// PCC's `both-addresses`: no state beyond the pinned flow.
pub const BALANCE_HASH: u8 = 1;
/// One uplink per LAN host while it keeps opening flows within
/// `sticky_s` (an [`Affinity`] keyed by source).
pub const BALANCE_SOURCE: u8 = 2;
/// One uplink per (LAN host, destination site) within `sticky_s`.
pub const BALANCE_SITE: u8 = 3;
/// One uplink and one NAT port per internal endpoint (LAN address, port,
/// protocol) for every remote (RFC 4787 REQ-1): an [`Endpoint`] record
/// lives while any of its flows does.
pub const BALANCE_ENDPOINT: u8 = 4;

/// With every tier down, any usable uplink (as `balanced` would).
pub const LAST_RESORT_ANY: u8 = 0;

/// A policy without its own `on_down`: its flows follow their uplink's.
pub const ON_DOWN_UPLINK: u8 = 0;
pub const ON_DOWN_KEEP: u8 = 1;
pub const ON_DOWN_PURGE: u8 = 2;
pub const ON_DOWN_PURGE_UDP: u8 = 3;
pub const ON_DOWN_RESET: u8 = 4;
/// With every tier down, refuse: ICMP administratively prohibited.
pub const LAST_RESORT_UNREACHABLE: u8 = 1;

impl SelectTable {
    /// The policy's name as text.
    pub fn name(&self) -> &str {
        let end = self.name.iter().position(|b| *b == 0).unwrap_or(16);
        core::str::from_utf8(&self.name[..end]).unwrap_or("?")
    }
}

impl Default for SelectTable {
    fn default() -> Self {
        Self {
            usable: 0,
            configured: 0,
            now_members: 0,
            sticky_s: 0,
            site_mask_be: 0,
            balance: BALANCE_CONNECTION,
            last_resort: LAST_RESORT_ANY,
            on_down: ON_DOWN_UPLINK,
            _pad: 0,
            name: [0; 16],
            now: [0; SELECT_SLOTS],
            preferred: [0; SELECT_SLOTS],
        }
    }
}

/// A set of policy rules, bit `i` for rule `i`: what one field of a new
/// flow's packet matches. The rules a packet matches are the
/// intersection over its fields; the lowest bit wins (first match).
pub type RuleSet = [u64; RULE_WORDS];

/// [`MAP_RULE_SRC`] and [`MAP_RULE_DST`]'s key: the bank, then the
/// address, so that the prefix length is 32 + the prefix's. The daemon
/// folds every shorter prefix's rules into a longer one, so the longest
/// match alone decides.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(test, derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct RuleAddrKey {
    pub bank_be: u32,
    pub addr_be: u32,
}

/// [`MAP_RULE_ACTION`]'s value: the low byte is the policy, unless one of
/// these bits says otherwise.
pub type RuleAction = u32;
/// Refused with ICMP administratively prohibited (RFC 1812 §5.2.7.1).
pub const RULE_UNREACHABLE: RuleAction = 1 << 8;
/// Not translated: the kernel routes it (the egress guard still applies).
pub const RULE_MAIN: RuleAction = 1 << 9;

/// [`Settings::rules`]: the bank in use (bit 0), how many rules it holds
/// (bits 1-15) and [`RULES_RESERVE`], in one word so that one store
/// switches them all.
pub const fn rules_word(bank: u32, count: u32, reserve: bool) -> u32 {
    (count & 0x7fff) << 1 | bank & 1 | if reserve { RULES_RESERVE } else { 0 }
}

/// The rule count of a [`Settings::rules`] word.
pub const fn rules_count(word: u32) -> u32 {
    word >> 1 & 0x7fff
}

/// [`Settings::rules`]: an endpoint policy exists, so a new flow's public
/// port must not be one an endpoint record holds ([`MAP_ENDPOINT_PORTS`]).
/// Without it, port allocation skips that lookup.
pub const RULES_RESERVE: u32 = 1 << 16;

/// [`MAP_AFFINITY`]'s key.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(test, derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct AffinityKey {
    pub saddr_be: u32,
    /// `site`: the destination's site (`daddr & site_mask`); 0 for
    /// `source`.
    pub site_be: u32,
    pub policy: u8,
    pub _pad0: u8,
    pub _pad1: u16,
}

/// [`MAP_SYN_WAIT`]'s key: a remote that a LAN host is waiting on through
/// an uplink, for a SYN-ACK ([`WAIT_SYN`]) or after sending data again
/// ([`WAIT_RETRANSMIT`]). The value is when the first such segment went
/// (boot clock, ns). The first SYN-ACK from that remote on that uplink
/// removes its `WAIT_SYN` entry; the daemon removes a `WAIT_RETRANSMIT`
/// one once the uplink has carried a reply since. The daemon counts the
/// remotes left waiting: passive health.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(test, derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct SynWaitKey {
    pub daddr_be: u32,
    pub uplink: u8,
    /// [`WAIT_SYN`] or [`WAIT_RETRANSMIT`].
    pub kind: u8,
    pub _pad1: u16,
}

/// [`SynWaitKey::kind`]: a SYN waits for its SYN-ACK.
pub const WAIT_SYN: u8 = 0;
/// [`SynWaitKey::kind`]: a data segment went out again.
pub const WAIT_RETRANSMIT: u8 = 1;

/// [`MAP_ENDPOINTS`]'s key: an internal endpoint under a policy.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(test, derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct EndpointKey {
    pub lan_addr_be: u32,
    /// The LAN port (TCP, UDP) or echo identifier.
    pub lan_port_be: u16,
    pub proto: u8,
    pub policy: u8,
}

/// An endpoint's public mapping: its flows to every remote leave by
/// `uplink` from `nat_port_be`. The reaper removes it once no flow of the
/// endpoint is left.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(test, derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct Endpoint {
    /// [`CLOCK`] time of the last flow it placed, ns.
    pub last_ns: u64,
    /// [`CLOCK`] seconds when it was made.
    pub created_s: u32,
    pub nat_port_be: u16,
    pub uplink: u8,
    pub _pad: u8,
}

/// A sticky choice: where the key's new flows go while it is used.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(test, derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct Affinity {
    /// [`CLOCK`] time of the last flow it placed, ns.
    pub last_ns: u64,
    /// [`CLOCK`] seconds when it was made.
    pub created_s: u32,
    pub uplink: u8,
    pub _pad0: u8,
    pub _pad1: u16,
}

/// One round of MurmurHash3 (x86, 32-bit): mixes the word `w` into `h`.
#[inline(always)]
pub const fn murmur3_round(h: u32, w: u32) -> u32 {
    let k = w
        .wrapping_mul(0xcc9e_2d51)
        .rotate_left(15)
        .wrapping_mul(0x1b87_3593);
    (h ^ k)
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

/// MurmurHash3's finalizer, after `len` bytes were mixed in.
#[inline(always)]
pub const fn murmur3_finish(h: u32, len: u32) -> u32 {
    let mut h = h ^ len;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// The hash that places a new flow in [`SelectTable`]: MurmurHash3 of
/// its key's 16 bytes as the CPU holds them, under `seed`
/// ([`Settings::flow_hash_seed`]). The datapath and the daemon
/// (`multihome explain`, `on_up`) compute the same value.
#[inline(always)]
pub const fn flow_hash(key: &FlowKey, seed: u32) -> u32 {
    let mut h = murmur3_round(seed, key.saddr_be);
    h = murmur3_round(h, key.daddr_be);
    h = murmur3_round(h, key.sport_be as u32 | (key.dport_be as u32) << 16);
    h = murmur3_round(h, key.proto as u32);
    murmur3_finish(h, 16)
}

/// The [`SelectTable`] slot of a flow hash.
#[inline(always)]
pub const fn select_slot(hash: u32) -> usize {
    hash as usize & (SELECT_SLOTS - 1)
}

/// A prefix whose hosts may be translated.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(test, derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct LanNet {
    pub addr_be: u32,
    pub mask_be: u32,
    /// Only packets arriving on this interface; 0 for any LAN interface.
    pub ifindex: u32,
    /// 0 for an empty slot.
    pub in_use: u32,
}

/// Datapath settings, one entry, written by the daemon.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(test, derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct Settings {
    pub layout_version: u32,
    /// Marks are `mark_base | (uplink id + 1)`; the low byte of the base is 0.
    pub mark_base: u32,
    pub snat_port_min: u16,
    pub snat_port_max: u16,
    /// The gateway's own `ip_local_port_range`: LAN ports inside it are
    /// never kept, so NAT entries cannot shadow the gateway's sockets.
    pub local_port_min: u16,
    pub local_port_max: u16,
    /// The connection map's capacity, in flows: new flows are refused
    /// before any lookup once [`MAP_FILL`] reaches it.
    pub max_flows: u32,
    /// Flows one LAN host may hold at once.
    pub max_flows_per_host: u32,
    /// Seed of [`flow_hash`]: random when the maps are made, kept across
    /// restarts so that a flow whose state was lost hashes the same.
    pub flow_hash_seed: u32,
    /// [`rules_word`]: the rule bank in use, its rule count and
    /// [`RULES_RESERVE`]; 0 rules
    /// skip the rule lookups.
    pub rules: u32,
}

/// One LAN host's share of the connection map, in [`MAP_HOSTS`]: counted
/// up by the datapath as it makes flows, recounted by the reaper.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(test, derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct HostFlows {
    /// Flows the host holds.
    pub flows: u64,
    /// New flows refused because it held its quota (never reset).
    pub refused: u64,
}

/// [`MAP_FILL`]'s value: flows in the connection map, counted up by the
/// datapath, recounted by the reaper (64 bits: BPF has no narrower
/// atomics in Rust's `core`).
pub type Fill = u64;

/// A fragmented datagram as its fragments show it (RFC 791: source,
/// destination, protocol and identification), in [`MAP_FRAGS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(test, derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct FragKey {
    pub saddr_be: u32,
    pub daddr_be: u32,
    pub id_be: u16,
    pub proto: u8,
    pub _pad: u8,
}

/// How the rest of a datagram is translated, recorded from its first
/// fragment: the new source (LAN to uplink) or destination (uplink to LAN).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(test, derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct FragXlat {
    pub addr_be: u32,
    pub uplink: u8,
    pub _pad0: u8,
    pub _pad1: u16,
}

/// An ICMP echo request the gateway itself sent: its destination and
/// identifier, in [`MAP_HOST_ECHO`]; the value is the
/// [`CLOCK`] time of the last one, ns.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(test, derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct EchoKey {
    pub daddr_be: u32,
    pub id_be: u16,
    pub _pad: u16,
}

/// In an echo flow's [`FlowFwd::snd_max`]: its last request is not
/// answered yet.
pub const ECHO_OUTSTANDING: u32 = 1 << 16;
/// How long after the gateway took an identifier from a LAN echo flow
/// that flow's unanswered request may still get its reply, ns.
pub const ECHO_HANDOVER_NS: u64 = 2_000_000_000;

/// A public mapping, as [`MAP_EIM`] keys it: uplink address, NAT port,
/// protocol (RFC 4787's endpoint-independent mapping).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(test, derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct EimKey {
    pub nat_addr_be: u32,
    pub nat_port_be: u16,
    pub proto: u8,
    pub _pad: u8,
}

/// The LAN endpoint behind a public mapping, in [`MAP_EIM`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(test, derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct EimLan {
    pub lan_addr_be: u32,
    pub lan_port_be: u16,
    pub _pad: u16,
}

/// A slot of [`MAP_PEERS`], a direct-mapped table indexed by
/// [`peer_slot`]: the one LAN host with a UDP flow between this remote
/// and NAT address, for reply fragments that arrive before their first
/// fragment (RFC 4787 REQ-14). A pair that lands on a taken slot takes it
/// over, as an LRU map would evict; a slot whose `check` does not match
/// its fields (two CPUs wrote it at once) counts as empty.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(test, derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct PeerSlot {
    pub remote_be: u32,
    pub nat_addr_be: u32,
    /// The LAN host; 0 when there are several (or the gateway itself
    /// talks to the remote from that address).
    pub lan_addr_be: u32,
    /// [`peer_check`] of the three fields above.
    pub check: u32,
}

/// The [`MAP_PEERS`] slot of (remote, NAT address): a multiplicative hash
/// of both (network order, as in the packet), `PEER_SLOTS` apart.
#[inline(always)]
pub const fn peer_slot(remote_be: u32, nat_addr_be: u32) -> u32 {
    let h = (remote_be ^ nat_addr_be.rotate_left(16)).wrapping_mul(0x9e37_79b1);
    (h ^ (h >> 16)) & (PEER_SLOTS - 1)
}

/// [`PeerSlot::check`] for its fields: never 0, so a zeroed slot is
/// empty.
#[inline(always)]
pub const fn peer_check(remote_be: u32, nat_addr_be: u32, lan_addr_be: u32) -> u32 {
    let h = (remote_be ^ nat_addr_be.rotate_left(11) ^ lan_addr_be.rotate_left(22))
        .wrapping_mul(0x85eb_ca6b);
    (h ^ (h >> 13)) | 1
}

/// [`MAP_ROUTED`]'s and [`MAP_MAIN_ROUTES`]'s key data: an IPv4 prefix
/// (the LPM trie's `prefix_len` counts its bits).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(test, derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct RoutedKey {
    pub addr_be: u32,
}

/// [`MAP_MAIN_ROUTES`]'s value: what the kernel's `main` table does with
/// a destination under the prefix.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(test, derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct MainRoute {
    /// The device the route leaves by (the first nexthop's when several
    /// all lead to uplinks, or all elsewhere); 0 unless forwarded.
    pub ifindex: u32,
    /// [`ROUTE_VIA`], [`ROUTE_CONNECTED`], [`ROUTE_REJECT`] or
    /// [`ROUTE_ASK_FIB`].
    pub kind: u32,
}

/// [`MAP_ROUTED6`]'s key data: an IPv6 address as on the wire.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(test, derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct Routed6Key {
    pub addr: [u8; 16],
}

/// An IPv6 connection as its LAN side sees it, in [`MAP_CONN6`]: the LAN
/// host's internal address and port, the remote's. Replies are looked up
/// by the same key once NPTv6 has mapped their destination back. For ICMPv6
/// echo the identifier is `lan_port_be` and `remote_port_be` is 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(test, derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct Flow6Key {
    pub lan: [u8; 16],
    pub remote: [u8; 16],
    pub lan_port_be: u16,
    pub remote_port_be: u16,
    pub proto: u8,
    pub _pad0: u8,
    pub _pad1: u16,
}

impl Flow6Key {
    /// What `balance` (`BALANCE_*`) hashes of the tuple, folded into an
    /// IPv4-sized key for [`flow_hash`]: the sticky modes hash what they
    /// stick by, since NPTv6 keeps no per-host record to stick with (the
    /// source under `source`, with the remote's /64 under `site`, the
    /// internal endpoint under `endpoint`, both addresses under `hash`,
    /// the whole tuple under `connection`). The datapath and `explain`
    /// both pick an IPv6 flow's uplink from it.
    #[inline(always)]
    pub fn fold(&self, balance: u8) -> FlowKey {
        let words = |a: &[u8; 16], n: usize| {
            let w = |i: usize| u32::from_ne_bytes([a[i], a[i + 1], a[i + 2], a[i + 3]]);
            if n == 2 {
                w(0) ^ w(4)
            } else {
                w(0) ^ w(4) ^ w(8) ^ w(12)
            }
        };
        let (remote, ports, proto) = match balance {
            BALANCE_HASH => (words(&self.remote, 4), (0, 0), 0),
            BALANCE_SOURCE => (0, (0, 0), 0),
            BALANCE_SITE => (words(&self.remote, 2), (0, 0), 0),
            BALANCE_ENDPOINT => (0, (self.lan_port_be, 0), self.proto),
            _ => (
                words(&self.remote, 4),
                (self.lan_port_be, self.remote_port_be),
                self.proto,
            ),
        };
        FlowKey {
            saddr_be: words(&self.lan, 4),
            daddr_be: remote,
            sport_be: ports.0,
            dport_be: ports.1,
            proto,
            _pad0: 0,
            _pad1: 0,
        }
    }
}

/// [`MAP_CONN6`]'s value: the uplink an IPv6 connection is pinned to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(test, derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct Flow6 {
    /// [`CLOCK`] time of the last packet, ns, refreshed at most once a
    /// second.
    pub last_seen_ns: u64,
    /// `FLOW_*` bits.
    pub flags: u32,
    pub uplink: u8,
    pub policy: u8,
    /// Under NAT66 ([`MODE6_NAT66`]): the port (or echo identifier) the
    /// flow has on the uplink's address, reserved in [`MAP_NAT6`]; 0
    /// under NPTv6.
    pub nat_port_be: u16,
    /// Creation time, seconds of [`CLOCK`].
    pub created_s: u32,
    pub _pad1: u32,
}

/// [`MAP_NAT6`]'s key: a NAT66 flow as its replies name it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(test, derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct Nat6Key {
    pub remote: [u8; 16],
    pub remote_port_be: u16,
    pub nat_port_be: u16,
    pub proto: u8,
    /// The uplink slot, whose address the NAT port is on.
    pub uplink: u8,
    pub _pad: u16,
}

/// [`MAP_NAT6`]'s value: the LAN endpoint behind a NAT66 port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(test, derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct Nat6Lan {
    pub lan: [u8; 16],
    pub lan_port_be: u16,
    pub _pad: u16,
}

impl Flow6Key {
    /// The flow between LAN end `lan` (address, port) and remote end
    /// `remote` for IP protocol `proto`; ports as on the wire (echo
    /// identifier as the LAN port, 0 as the remote's, for ICMPv6).
    #[inline(always)]
    pub const fn between(lan: ([u8; 16], u16), remote: ([u8; 16], u16), proto: u8) -> Self {
        Flow6Key {
            lan: lan.0,
            remote: remote.0,
            lan_port_be: lan.1,
            remote_port_be: remote.1,
            proto,
            _pad0: 0,
            _pad1: 0,
        }
    }

    /// The reverse key of this flow under NAT66 on `uplink` with
    /// `nat_port_be`.
    #[inline(always)]
    pub fn nat6(&self, uplink: u8, nat_port_be: u16) -> Nat6Key {
        Nat6Key {
            remote: self.remote,
            remote_port_be: self.remote_port_be,
            nat_port_be,
            proto: self.proto,
            uplink,
            _pad: 0,
        }
    }
}

/// The slot in [`MAP_UPLINKS6`] of uplink `id`'s translation of its
/// `k`-th internal prefix (`k < MAX_LAN6`): uplink slot `id` for the
/// first, so that an uplink's first entry is found without a search.
pub const fn uplink6_slot(id: u32, k: u32) -> u32 {
    k * MAX_UPLINKS + id
}

/// An uplink's IPv6 translation of one internal prefix, written by the
/// daemon ([`MAP_UPLINKS6`]). NPTv6 (RFC 6296) maps `inner` onto `outer`,
/// both `prefix_len` bits long, and adds `adjust` to one 16-bit word of
/// the address outside the prefix (word 3 for prefixes of 48 bits or
/// less, else the first of words 4 to 7 that is not 0xffff) so that the
/// address's one's-complement sum, and with it every L4 checksum, is
/// unchanged; inbound adds `!adjust`. An uplink has `lans` entries, at
/// [`uplink6_slot`]`(id, 0..lans)`, one per internal prefix; under
/// NAT66 they share `outer`, the uplink's one address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(test, derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct Uplink6 {
    /// The LAN's internal prefix, as on the wire; zero bits past the length.
    pub inner: [u8; 16],
    /// The uplink's prefix, as on the wire; zero bits past the length.
    pub outer: [u8; 16],
    /// The shortest prefix that holds the `outer` of every entry of the
    /// uplink (of one entry: `outer` itself; under NAT66 the one address),
    /// `span_len` bits long: an address outside it is none of the
    /// uplink's, whatever the entry, with one comparison.
    pub span: [u8; 16],
    /// 1..=64 while the uplink carries IPv6; 0: it takes no IPv6 flows.
    pub prefix_len: u8,
    /// `MODE6_*`.
    pub mode: u8,
    /// [`npt_adjustment`] from `inner` to `outer`.
    pub adjust: u16,
    /// The length of the delegated prefix `outer` was learned from (a
    /// subnet of it); 0: `prefix6` is configured. For people only.
    pub delegated_len: u8,
    /// How many internal prefixes the uplink maps (its entries), 1 to
    /// [`MAX_LAN6`], the same in each.
    pub lans: u8,
    /// This entry's place among them: the `k` of [`uplink6_slot`], the
    /// same for one internal prefix on every uplink.
    pub k: u8,
    /// The length of `span`.
    pub span_len: u8,
}

impl Uplink6 {
    /// Whether `addr` is on this entry's internal prefix (`inner`) or on
    /// the uplink's side: its prefix, under NAT66 its one address.
    pub const fn covers(&self, addr: &[u8; 16], inner: bool) -> bool {
        in_prefix6(
            addr,
            if inner { &self.inner } else { &self.outer },
            if inner || self.mode != MODE6_NAT66 {
                self.prefix_len
            } else {
                128
            },
        )
    }
}

/// [`MAP_MAPPED6`]'s key data: the side ([`MAPPED6_INNER`] or
/// [`MAPPED6_OUTER`], in network order), then the prefix. The LPM trie's
/// `prefix_len` counts the 32 side bits plus the prefix's.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(test, derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct Mapped6Key {
    pub side_be: u32,
    pub addr: [u8; 16],
}

/// [`Mapped6Key::side_be`] of an internal prefix.
pub const MAPPED6_INNER: u32 = 1;
/// [`Mapped6Key::side_be`] of an uplink's prefix (NPTv6's; NAT66's one
/// address is the same in each of its entries, so its first is found).
pub const MAPPED6_OUTER: u32 = 2;

/// [`MAP_ALLOW6`]'s key data: a selector, then a LAN host's internal
/// address. The LPM trie's `prefix_len` counts 32 selector bits plus the
/// address prefix's. The selector is 0 for "any protocol and port", or
/// `proto << 16 | port` (in network order) for one TCP or UDP port; the
/// datapath looks up both.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(test, derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct Allow6Key {
    pub sel_be: u32,
    pub addr: [u8; 16],
}

/// `mode6 = "off"`: no IPv6 translation; routed prefixes only.
pub const MODE6_OFF: u8 = 0;
/// `mode6 = "npt"`: NPTv6 (RFC 6296).
pub const MODE6_NPT: u8 = 1;
/// `mode6 = "nat66"`: the LAN's addresses and ports translated to the
/// uplink's one address (`Uplink6::outer`, all 128 bits), as IPv4's SNAT.
pub const MODE6_NAT66: u8 = 2;

/// One's-complement sum of the first `len` bits of `addr`, as 16-bit words
/// (bits past `len` count as zero).
pub const fn prefix_sum(addr: &[u8; 16], len: u8) -> u16 {
    let mut sum: u32 = 0;
    let mut i = 0;
    while i < 8 {
        let bits = len as i32 - 16 * i as i32;
        let mask: u16 = if bits >= 16 {
            0xffff
        } else if bits <= 0 {
            0
        } else {
            !(0xffffu16 >> bits)
        };
        let word = u16::from_be_bytes([addr[2 * i], addr[2 * i + 1]]) & mask;
        sum += word as u32;
        sum = (sum & 0xffff) + (sum >> 16);
        i += 1;
    }
    sum as u16
}

/// The NPTv6 adjustment from `inner` to `outer` (RFC 6296 §3.2): the
/// one's-complement difference of their `len`-bit prefixes' sums, which
/// the translation adds to one word so that the address's sum is kept.
pub const fn npt_adjustment(inner: &[u8; 16], outer: &[u8; 16], len: u8) -> u16 {
    let s = prefix_sum(inner, len) as u32 + !prefix_sum(outer, len) as u32;
    ((s & 0xffff) + (s >> 16)) as u16
}

/// The word index that takes the NPTv6 adjustment in `addr` (after the
/// prefix is replaced), or None when every candidate word is 0xffff (RFC
/// 6296 §3.5: such an address is not translated).
pub const fn npt_word(addr: &[u8; 16], len: u8) -> Option<usize> {
    if len <= 48 {
        return Some(3);
    }
    let mut i = 4;
    while i < 8 {
        if addr[2 * i] != 0xff || addr[2 * i + 1] != 0xff {
            return Some(i);
        }
        i += 1;
    }
    None
}

/// `word + adjust` in one's complement, 0xffff written as 0 (RFC 6296
/// §3.5).
pub const fn npt_add(word: u16, adjust: u16) -> u16 {
    let s = word as u32 + adjust as u32;
    let s = ((s & 0xffff) + (s >> 16)) as u16;
    if s == 0xffff { 0 } else { s }
}

/// `addr` with its first `len` bits replaced by `to`'s and the adjustment
/// applied (RFC 6296 §3): checksum-neutral. None when the address cannot
/// be translated (see [`npt_word`]).
pub const fn npt_translate(
    addr: &[u8; 16],
    to: &[u8; 16],
    len: u8,
    adjust: u16,
) -> Option<[u8; 16]> {
    let mut out = *addr;
    let mut i = 0;
    while i < 16 {
        let bits = len as i32 - 8 * i as i32;
        let mask: u8 = if bits >= 8 {
            0xff
        } else if bits <= 0 {
            0
        } else {
            !(0xffu8 >> bits)
        };
        out[i] = (to[i] & mask) | (addr[i] & !mask);
        i += 1;
    }
    let Some(w) = npt_word(&out, len) else {
        return None;
    };
    let v = npt_add(u16::from_be_bytes([out[2 * w], out[2 * w + 1]]), adjust);
    let b = v.to_be_bytes();
    out[2 * w] = b[0];
    out[2 * w + 1] = b[1];
    Some(out)
}

/// Whether the first `len` bits of `addr` are `prefix`'s.
pub const fn in_prefix6(addr: &[u8; 16], prefix: &[u8; 16], len: u8) -> bool {
    let mut i = 0;
    while i < 16 {
        let bits = len as i32 - 8 * i as i32;
        if bits <= 0 {
            return true;
        }
        let mask: u8 = if bits >= 8 { 0xff } else { !(0xffu8 >> bits) };
        if addr[i] & mask != prefix[i] & mask {
            return false;
        }
        i += 1;
    }
    true
}

/// [`MAP_ROUTED`]'s value: bit `i` set when uplink `i` may carry sources
/// of the prefix untranslated. The daemon folds every shorter prefix's
/// bits into a longer one, so the longest match alone decides.
pub type RoutedUplinks = u32;

/// Per-uplink counters, per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(test, derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct UplinkStats {
    pub new_flows: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub rx_bytes: u64,
    /// Packets of this uplink that the fast path handed to the stack.
    pub slow_path: u64,
    /// New TCP flows opened by a LAN SYN (passive health).
    pub syns: u64,
    /// TCP flows whose first reply was a SYN-ACK.
    pub synacks: u64,
    /// Sum over those of the time from the flow's SYN to its SYN-ACK, ns.
    pub synack_rtt_ns: u64,
    /// LAN SYNs sent again on a flow that saw no reply yet: a host retrying
    /// a connection the uplink does not carry.
    pub syn_retries: u64,
    /// LAN TCP data segments that carried no byte beyond what their flow
    /// had already sent: retransmissions (or reordering on the LAN).
    pub retransmits: u64,
}

/// Packets of an uplink's flows that took the XDP path, per CPU (they are
/// also counted in [`UplinkStats`] as the TC path counts them).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(test, derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct XdpStats {
    /// LAN to uplink.
    pub tx_packets: u64,
    /// Uplink to LAN.
    pub rx_packets: u64,
}

macro_rules! reasons {
    ($( $(#[$doc:meta])* $variant:ident = $field:ident ),+ $(,)?) => {
        /// Why a packet left the fast path: passed to the stack untouched, or
        /// dropped. Counted per CPU in [`MAP_REASONS`].
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum Reason {
            $( $(#[$doc])* $variant, )+
        }

        /// [`MAP_REASONS`]'s value: one counter per [`Reason`], named so that
        /// `bpftool map dump` prints the reason.
        #[repr(C)]
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
        #[cfg_attr(test, derive(bytemuck::Pod, bytemuck::Zeroable))]
        pub struct Reasons {
            $( pub $field: u64, )+
        }

        impl Reason {
            pub const ALL: &[Reason] = &[$(Reason::$variant),+];

            pub const fn name(self) -> &'static str {
                match self { $(Reason::$variant => stringify!($field),)+ }
            }
        }

        impl Reason {
            /// Whether the packet is dropped; otherwise it goes to the stack.
            pub const fn drops(self) -> bool {
                matches!(
                    self,
                    Reason::NoUplink
                        | Reason::MapFull
                        | Reason::PortExhausted
                        | Reason::RewriteFailed
                        | Reason::HostPortClash
                        | Reason::ForeignSource
                        | Reason::AhNotNatable
                        | Reason::AddrTaken
                        | Reason::FragmentNoMapping
                        | Reason::HostQuota
                        | Reason::Unsolicited
                        | Reason::Fragment6
                        | Reason::NptUntranslatable
                )
            }
        }

        impl Reasons {
            pub const fn get(&self, reason: Reason) -> u64 {
                match reason { $(Reason::$variant => self.$field,)+ }
            }
        }
    };
}

reasons! {
    /// Pass: neither IPv4 nor IPv6 (ARP, ...), or IPv6 that multihome
    /// does not translate.
    NotIpv4 = not_ipv4,
    /// Pass: a header is shorter than it claims, or the packet is cut short.
    Malformed = malformed,
    /// Pass: a non-first fragment from an uplink that matches no NAT
    /// flow: the gateway's own, or one whose first fragment never came.
    Fragment = fragment,
    /// Pass: a protocol the NAT does not translate.
    UnsupportedProto = unsupported_proto,
    /// Pass: the source is not a LAN prefix of the interface (anti-spoofing).
    SpoofedSource = spoofed_source,
    /// Pass: addressed to the gateway or routed to a non-uplink interface.
    NotForUplink = not_for_uplink,
    /// Pass: TTL would expire; the kernel answers with time exceeded.
    TtlExpired = ttl_expired,
    /// Pass with the uplink's mark: the fast path could not forward.
    SlowPath = slow_path,
    /// Pass: a packet from the uplink that belongs to no NAT flow.
    NoMapping = no_mapping,
    /// Pass: an ICMP error from the uplink whose embedded packet matches no flow.
    IcmpNoMapping = icmp_no_mapping,
    /// Drop: no uplink has an address.
    NoUplink = no_uplink,
    /// Drop: the connection map is full.
    MapFull = map_full,
    /// Drop: no free SNAT port within the search bound.
    PortExhausted = port_exhausted,
    /// Drop: a packet rewrite helper failed.
    RewriteFailed = rewrite_failed,
    /// Repaired: one half of a flow pair was missing.
    HalfPair = half_pair,
    /// Drop: the gateway's own packet uses an address and port that a NAT
    /// flow holds towards the same remote.
    HostPortClash = host_port_clash,
    /// Drop (BCP 38): a forwarded packet about to leave an uplink with a
    /// source that is neither that uplink's address nor in its
    /// `routed_prefixes`.
    ForeignSource = foreign_source,
    /// Pass: multicast, broadcast or a reserved destination, or a frame not
    /// addressed to the gateway; never a flow.
    NotUnicast = not_unicast,
    /// Pass: a source in an uplink's `routed_prefixes`, forwarded by the
    /// kernel without NAT.
    RoutedSource = routed_source,
    /// Drop: IPsec AH from the LAN; it authenticates the addresses, so no
    /// NAT can carry it (RFC 3715 §2.1).
    AhNotNatable = ah_not_natable,
    /// Drop: a protocol translated by address only, and on every usable
    /// uplink another LAN host already talks it with that remote.
    AddrTaken = addr_taken,
    /// Drop: a non-first fragment from the LAN whose first fragment was
    /// not seen (or was forgotten).
    FragmentNoMapping = fragment_no_mapping,
    /// Translated: a non-first fragment, by the record of its first
    /// fragment or its protocol's address-only flow.
    FragmentTranslated = fragment_translated,
    /// Pass: an echo reply to one of the gateway's own pings (or probes).
    HostEcho = host_echo,
    /// Removed: a LAN echo flow held the identifier the gateway now pings
    /// that remote with; its next request gets another one.
    EchoRekeyed = echo_rekeyed,
    /// Drop: the LAN host already holds `nat.max_flows_per_host` flows.
    HostQuota = host_quota,
    /// Translated: a LAN host's packet to another LAN host's public
    /// mapping, delivered back to the LAN (hairpinning).
    Hairpinned = hairpinned,
    /// Counted: a flow made from a TCP packet that is not a SYN (its state
    /// expired or was lost, or it is older than the daemon); its hash
    /// gives it the uplink it had while the uplink set is the same.
    MidStream = mid_stream,
    /// Counted: an RST from an uplink that a later packet of its flow
    /// showed closed nothing (out of the window, or forged).
    RstIgnored = rst_ignored,
    /// Removed: a flow whose NAT address is no longer its uplink's (the
    /// uplink was renumbered); its packet makes it anew.
    StaleAddress = stale_address,
    /// Removed: a flow pinned to an uplink that went down, by its next
    /// packet (`on_down`), which makes it anew on a usable uplink.
    Evacuated = evacuated,
    /// Answered: a LAN host's TCP segment of a flow whose uplink went down
    /// (`on_down = "reset"`), turned into the remote's RST and sent back.
    TcpReset = tcp_reset,
    /// Pass: a reply whose reverse entry points at a flow with another
    /// NAT address or port; the stale entry is removed.
    StaleReverse = stale_reverse,
    /// Pass: refused by a rule (`policy = "unreachable"`) or by a policy
    /// with every tier down (`last_resort = "unreachable"`); the kernel
    /// answers ICMP administratively prohibited.
    PolicyRefused = policy_refused,
    /// Pass: a rule (`policy = "main"`) left it untranslated to the
    /// kernel's routes; the egress guard still applies.
    PolicyMain = policy_main,
    /// Counted: a flow of a `balance = "endpoint"` policy that could not
    /// keep its endpoint's public port towards this remote (another LAN
    /// host's flow holds it there) and took another port.
    EndpointRemapped = endpoint_remapped,
    /// Drop (RFC 6092 simple security): an IPv6 packet to a translated
    /// LAN address that belongs to no flow of that uplink.
    Unsolicited = unsolicited,
    /// Translated: an IPv6 connection from outside that `allow_inbound6`
    /// admits, pinned to the uplink it came in by.
    InboundAllowed = inbound_allowed,
    /// Drop: an IPv6 fragment from the LAN (not translated yet; hosts fall
    /// back to smaller datagrams).
    Fragment6 = fragment6,
    /// Drop: an IPv6 address that NPTv6 cannot map (every word that could
    /// take the adjustment is 0xffff; RFC 6296 §3.5).
    NptUntranslatable = npt_untranslatable,
}

pub const REASON_COUNT: usize = Reason::ALL.len();

const _: () = {
    assert!(size_of::<FlowKey>() == 16);
    assert!(size_of::<FlowFwd>() == 32);
    assert!(size_of::<FlowRev>() == 8);
    assert!(size_of::<Uplink>() == 72);
    assert!(size_of::<SelectTable>() == 40 + 2 * SELECT_SLOTS);
    assert!(size_of::<RuleAddrKey>() == 8);
    assert!(size_of::<AffinityKey>() == 12);
    assert!(size_of::<Affinity>() == 16);
    assert!(size_of::<EndpointKey>() == 8);
    assert!(size_of::<Endpoint>() == 16);
    assert!(MAX_POLICIES <= 256 && MAX_RULES.is_multiple_of(64));
    assert!(size_of::<LanNet>() == 16);
    assert!(size_of::<Settings>() == 32);
    assert!(size_of::<HostFlows>() == 16);
    assert!(size_of::<RoutedKey>() == 4);
    assert!(size_of::<Flow6Key>() == 40);
    assert!(size_of::<Flow6>() == 24);
    assert!(size_of::<Uplink6>() == 56);
    assert!(size_of::<Nat6Key>() == 24);
    assert!(size_of::<Nat6Lan>() == 20);
    assert!(size_of::<Allow6Key>() == 20);
    assert!(size_of::<Mapped6Key>() == 20);
    assert!(size_of::<FragKey>() == 12);
    assert!(size_of::<FragXlat>() == 8);
    assert!(size_of::<EchoKey>() == 8);
    assert!(size_of::<EimKey>() == 8);
    assert!(size_of::<EimLan>() == 8);
    assert!(size_of::<UplinkStats>() == 88);
    assert!(size_of::<SynWaitKey>() == 8);
    assert!(size_of::<NextHop>() == 24);
    assert!(size_of::<PeerSlot>() == 16);
    assert!(PEER_SLOTS.is_power_of_two());
    assert!(size_of::<Reasons>() == REASON_COUNT * 8);
    assert!(MAX_UPLINKS <= 255);
    // One bit per uplink in RoutedUplinks; marks 1..=MAX_UPLINKS stay
    // clear of MARK_TRANSLATED.
    assert!(MAX_UPLINKS <= RoutedUplinks::BITS);
    assert!(MAX_UPLINKS < MARK_PROHIBIT && MARK_PROHIBIT < MARK_TRANSLATED);
    assert!(SELECT_SLOTS.is_power_of_two() && SELECT_SLOTS <= 1 << 16);
};

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all are `#[repr(C)]`, padding-free (checked by the bytemuck
    // derives in tests) and valid for any bit pattern.
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for FlowFwd {}
    unsafe impl aya::Pod for FlowRev {}
    unsafe impl aya::Pod for Uplink {}
    unsafe impl aya::Pod for MainRoute {}
    unsafe impl aya::Pod for SelectTable {}
    unsafe impl aya::Pod for LanNet {}
    unsafe impl aya::Pod for Settings {}
    unsafe impl aya::Pod for HostFlows {}
    unsafe impl aya::Pod for UplinkStats {}
    unsafe impl aya::Pod for XdpStats {}
    unsafe impl aya::Pod for Routed6Key {}
    unsafe impl aya::Pod for Flow6Key {}
    unsafe impl aya::Pod for Flow6 {}
    unsafe impl aya::Pod for Uplink6 {}
    unsafe impl aya::Pod for Nat6Key {}
    unsafe impl aya::Pod for Nat6Lan {}
    unsafe impl aya::Pod for Allow6Key {}
    unsafe impl aya::Pod for Mapped6Key {}
    unsafe impl aya::Pod for Reasons {}
    unsafe impl aya::Pod for RoutedKey {}
    unsafe impl aya::Pod for RuleAddrKey {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for Affinity {}
    unsafe impl aya::Pod for EndpointKey {}
    unsafe impl aya::Pod for Endpoint {}
    unsafe impl aya::Pod for FragKey {}
    unsafe impl aya::Pod for FragXlat {}
    unsafe impl aya::Pod for EchoKey {}
    unsafe impl aya::Pod for EimKey {}
    unsafe impl aya::Pod for EimLan {}
    unsafe impl aya::Pod for SynWaitKey {}
    unsafe impl aya::Pod for NextHop {}
    unsafe impl aya::Pod for PeerSlot {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reason_names_are_unique_and_ordered_like_the_counters() {
        for (i, r) in Reason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
            assert!(Reason::ALL[..i].iter().all(|o| o.name() != r.name()));
        }
        let counters = Reasons {
            map_full: 7,
            ..Default::default()
        };
        assert_eq!(counters.get(Reason::MapFull), 7);
        // The kernel indexes the struct as an array of u64.
        let words: [u64; REASON_COUNT] = bytemuck::cast(counters);
        assert_eq!(words[Reason::MapFull as usize], 7);
    }

    #[test]
    fn reply_and_forward_keys_are_inverse_through_the_nat() {
        for proto in [IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMP] {
            let fwd = FlowKey {
                saddr_be: 0xc612_0102u32.to_be(),
                daddr_be: 0xc613_000au32.to_be(),
                sport_be: 40000u16.to_be(),
                dport_be: if proto == IPPROTO_ICMP {
                    0
                } else {
                    443u16.to_be()
                },
                proto,
                _pad0: 0,
                _pad1: 0,
            };
            let rev = fwd.reply(0xc612_0b01u32.to_be(), 61000u16.to_be());
            assert_eq!(rev.saddr_be, fwd.daddr_be);
            assert_eq!(rev.dport_be, 61000u16.to_be());
            let entry = FlowRev {
                lan_addr_be: fwd.saddr_be,
                lan_port_be: fwd.sport_be,
                uplink: 0,
                _pad: 0,
            };
            assert_eq!(rev.forward(&entry), fwd, "proto {proto}");
        }
    }

    #[test]
    fn flow_hash_is_murmur3_of_the_key_bytes() {
        // MurmurHash3_x86_32 of the key's bytes, as 4 little-endian words.
        fn murmur3(bytes: &[u8; 16], seed: u32) -> u32 {
            let mut h = seed;
            for c in bytes.chunks(4) {
                h = murmur3_round(h, u32::from_le_bytes([c[0], c[1], c[2], c[3]]));
            }
            murmur3_finish(h, 16)
        }
        let key = FlowKey {
            saddr_be: 0xc612_0102u32.to_be(),
            daddr_be: 0xc613_000au32.to_be(),
            sport_be: 40000u16.to_be(),
            dport_be: 443u16.to_be(),
            proto: IPPROTO_TCP,
            _pad0: 0,
            _pad1: 0,
        };
        let bytes: [u8; 16] = bytemuck::cast(key);
        assert_eq!(flow_hash(&key, 7), murmur3(&bytes, 7));
        assert_ne!(flow_hash(&key, 7), flow_hash(&key, 8), "the seed matters");
        // Published test vectors of MurmurHash3_x86_32 for 4-byte inputs.
        assert_eq!(murmur3_finish(murmur3_round(0, 0), 4), 0x2362_f9de);
        let aaaa = u32::from_le_bytes(*b"aaaa");
        assert_eq!(
            murmur3_finish(murmur3_round(0x9747_b28c, aaaa), 4),
            0x5a97_808a
        );
    }

    #[test]
    fn map_names_fit_the_kernel_limit() {
        for name in ALL_MAPS {
            assert!(name.len() <= 15, "{name} is longer than 15 bytes");
        }
    }
}

#[cfg(test)]
mod nptv6 {
    use super::*;

    fn addr(s: &str) -> [u8; 16] {
        s.parse::<core::net::Ipv6Addr>()
            .expect("an IPv6 address")
            .octets()
    }

    fn sum(a: &[u8; 16]) -> u16 {
        prefix_sum(a, 128)
    }

    #[test]
    fn the_rfc_6296_example_translates_as_published() {
        // RFC 6296 §3.4's worked example: fd01:203:405::/48 onto
        // 2001:db8:1::/48.
        let inner = addr("fd01:203:405::");
        let outer = addr("2001:db8:1::");
        let adj = npt_adjustment(&inner, &outer, 48);
        assert_eq!(adj, 0xd54f);
        let host = addr("fd01:203:405:1::1234");
        let out = npt_translate(&host, &outer, 48, adj).expect("translatable");
        assert_eq!(out, addr("2001:db8:1:d550::1234"));
        let back = npt_translate(&out, &inner, 48, !adj).expect("translatable");
        assert_eq!(back, host);
    }

    #[test]
    fn translation_keeps_the_address_sum_and_comes_back_for_64_bit_prefixes() {
        let inner = addr("fd00:1:2:3::");
        let outer = addr("2001:db8:11:1::");
        let adj = npt_adjustment(&inner, &outer, 64);
        for host in [
            "fd00:1:2:3::2",
            "fd00:1:2:3:ffff::1",
            "fd00:1:2:3:ffff:ffff:ffff:0",
            "fd00:1:2:3:0:0:0:0",
            "fd00:1:2:3:1234:5678:9abc:def0",
        ] {
            let h = addr(host);
            let out = npt_translate(&h, &outer, 64, adj).expect("translatable");
            assert!(in_prefix6(&out, &outer, 64), "{host}");
            // Zero has two forms in one's complement.
            assert_eq!(sum(&out) % 0xffff, sum(&h) % 0xffff, "{host}");
            assert_eq!(
                npt_translate(&out, &inner, 64, !adj).expect("translatable"),
                h,
                "{host}"
            );
        }
        let all_ones = addr("fd00:1:2:3:ffff:ffff:ffff:ffff");
        assert_eq!(npt_translate(&all_ones, &outer, 64, adj), None);
    }

    #[test]
    fn prefixes_match_on_their_bits_only() {
        let p = addr("2001:db8:11:100::");
        assert!(in_prefix6(&addr("2001:db8:11:1ff::9"), &p, 56));
        assert!(!in_prefix6(&addr("2001:db8:11:200::9"), &p, 56));
        assert!(in_prefix6(&addr("fd00::1"), &p, 0));
    }
}
