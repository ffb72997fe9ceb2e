//! Every map the programs use. Sizes here are defaults; the daemon sets the
//! connection maps' capacity at load time.
use aya_ebpf::{
    btf_maps::{Array, DevMapHash, HashMap, LpmTrie, LruHashMap, PerCpuArray, ProgramArray},
    macros::btf_map,
};
use multihome_common::{
    AFFINITY_ENTRIES, Affinity, AffinityKey, Allow6Key, DEFAULT_MAX_FLOWS, EIM_ENTRIES,
    ENDPOINT_ENTRIES, EchoKey, EimKey, EimLan, Endpoint, EndpointKey, FRAG_ENTRIES, Fill, Flow6,
    Flow6Key, FlowFwd, FlowKey, FlowRev, FragKey, FragXlat, HOST_ECHO_ENTRIES, HostFlows,
    JUMP_PROGS, LanNet, MAX_ALLOW6, MAX_FLOWS6, MAX_HOSTS, MAX_LAN_HOPS, MAX_LAN_NETS, MAX_LAN6,
    MAX_LOCAL_ADDRS, MAX_MAIN_ROUTES, MAX_POLICIES, MAX_ROUTED_PREFIXES, MAX_RULE_PREFIXES,
    MAX_RULES, MAX_UPLINKS, MAX_XDP_DEVS, MainRoute, Mapped6Key, Nat6Key, Nat6Lan, NextHop,
    PEER_SLOTS, PeerSlot, Reasons, Routed6Key, RoutedKey, RoutedUplinks, RuleAction, RuleAddrKey,
    RuleSet, SYN_WAIT_ENTRIES, SelectTable, Settings, SynWaitKey, Uplink, Uplink6, UplinkStats,
    XdpStats,
};

const FLOWS: usize = DEFAULT_MAX_FLOWS as usize;

/// LAN tuple -> uplink, NAT address and port, state.
#[btf_map]
pub static CONN_FWD: HashMap<FlowKey, FlowFwd, FLOWS> = HashMap::new();

/// Reply tuple (remote -> NAT address and port) -> LAN host and port.
#[btf_map]
pub static CONN_REV: HashMap<FlowKey, FlowRev, FLOWS> = HashMap::new();

#[btf_map]
pub static UPLINKS: Array<Uplink, { MAX_UPLINKS as usize }> = Array::new();

/// Uplink slot -> its next hop, so that a flow's packets skip
/// `bpf_fib_lookup`.
#[btf_map]
pub static NEXT_HOPS: Array<NextHop, { MAX_UPLINKS as usize }> = Array::new();

/// `CLASSIFY_IN_MAIN` or 0: how a new flow's route is classified.
#[btf_map]
pub static CLASSIFY: Array<u32, 1> = Array::new();

/// The kernel's `main` table: IPv4 prefix -> where it leads, for new
/// flows' classification (`CLASSIFY_BY_ROUTES`).
#[btf_map]
pub static MAIN_ROUTES: LpmTrie<RoutedKey, MainRoute, { MAX_MAIN_ROUTES as usize }> =
    LpmTrie::new();

/// The kernel's local and broadcast addresses -> their kind.
#[btf_map]
pub static LOCAL_ADDRS: HashMap<u32, u32, { MAX_LOCAL_ADDRS as usize }> = HashMap::new();

/// Per policy (0: `balanced`): its choice table and balance mode.
#[btf_map]
pub static SELECT: Array<SelectTable, { MAX_POLICIES as usize }> = Array::new();

/// (bank, source prefix) -> the rules whose `src` covers it.
#[btf_map]
pub static RULE_SRC: LpmTrie<RuleAddrKey, RuleSet, { MAX_RULE_PREFIXES as usize }> = LpmTrie::new();

/// (bank, destination prefix) -> the rules whose `dst` covers it.
#[btf_map]
pub static RULE_DST: LpmTrie<RuleAddrKey, RuleSet, { MAX_RULE_PREFIXES as usize }> = LpmTrie::new();

/// bank * 256 + IP protocol -> the rules matching it.
#[btf_map]
pub static RULE_PROTO: Array<RuleSet, 512> = Array::new();

/// bank * 65536 + TCP/UDP destination port (0 for other protocols) ->
/// the rules matching it.
#[btf_map]
pub static RULE_DPORT: Array<RuleSet, 131_072> = Array::new();

/// bank * 64 + DSCP -> the rules matching it.
#[btf_map]
pub static RULE_DSCP: Array<RuleSet, 128> = Array::new();

/// bank * MAX_RULES + rule -> its policy or action.
#[btf_map]
pub static RULE_ACTION: Array<RuleAction, { 2 * MAX_RULES as usize }> = Array::new();

/// Internal endpoint -> its uplink and public port (`balance =
/// "endpoint"`). Not LRU: a record must not go while its flows live; the
/// reaper removes it after the last one.
#[btf_map]
pub static ENDPOINTS: HashMap<EndpointKey, Endpoint, { ENDPOINT_ENTRIES as usize }> =
    HashMap::new();

/// (remote, uplink) -> when a LAN SYN first went there unanswered (LRU):
/// the daemon's passive health counts the remotes left waiting.
#[btf_map]
pub static SYN_WAIT: LruHashMap<SynWaitKey, u64, { SYN_WAIT_ENTRIES as usize }> = LruHashMap::new();

/// Public mapping (uplink address, port, protocol) -> the endpoint whose
/// record holds it: other flows are not given that port. An entry whose
/// endpoint no longer holds it is stale and may be taken over.
#[btf_map]
pub static ENDPOINT_PORTS: HashMap<EimKey, EndpointKey, { ENDPOINT_ENTRIES as usize }> =
    HashMap::new();

/// (source, site, policy) -> the uplink its new flows stick to.
#[btf_map]
pub static AFFINITY: LruHashMap<AffinityKey, Affinity, { AFFINITY_ENTRIES as usize }> =
    LruHashMap::new();

#[btf_map]
pub static LAN_NETS: Array<LanNet, { MAX_LAN_NETS as usize }> = Array::new();

#[btf_map]
pub static SETTINGS: Array<Settings, 1> = Array::new();

#[btf_map]
pub static UPLINK_STATS: PerCpuArray<UplinkStats, { MAX_UPLINKS as usize }> = PerCpuArray::new();

#[btf_map]
pub static REASONS: PerCpuArray<Reasons, 1> = PerCpuArray::new();

/// Routed source prefix -> the uplinks that carry it untranslated.
#[btf_map]
pub static ROUTED: LpmTrie<RoutedKey, RoutedUplinks, { MAX_ROUTED_PREFIXES as usize }> =
    LpmTrie::new();

/// Routed IPv6 source prefix -> the uplinks that carry it.
#[btf_map]
pub static ROUTED6: LpmTrie<Routed6Key, RoutedUplinks, { MAX_ROUTED_PREFIXES as usize }> =
    LpmTrie::new();

/// A fragmented datagram -> how its later fragments are translated.
#[btf_map]
pub static FRAGS: LruHashMap<FragKey, FragXlat, { FRAG_ENTRIES as usize }> = LruHashMap::new();

/// (remote, NAT address) of UDP flows -> the one LAN host with such a
/// flow, or 0: direct-mapped by `peer_slot`, so that noting a new flow's
/// pair is one slot read and write, not an LRU insert.
#[btf_map]
pub static PEERS: Array<PeerSlot, { PEER_SLOTS as usize }> = Array::new();

/// The gateway's own echo (destination, id) -> time of its last request.
#[btf_map]
pub static HOST_ECHO: LruHashMap<EchoKey, u64, { HOST_ECHO_ENTRIES as usize }> = LruHashMap::new();

/// LAN host address -> its flows and refusals.
#[btf_map]
pub static HOSTS: HashMap<u32, HostFlows, { MAX_HOSTS as usize }> = HashMap::new();

/// Flows in the connection map.
#[btf_map]
pub static FILL: Array<Fill, 1> = Array::new();

/// Programs tail-called for rare paths and IPv6 (`JUMP_PROGS`).
#[btf_map]
pub static JUMP: ProgramArray<{ JUMP_PROGS.len() }> = ProgramArray::new();

/// Public mapping (uplink address, NAT port, protocol) -> its LAN endpoint,
/// for hairpinning.
#[btf_map]
pub static EIM: LruHashMap<EimKey, EimLan, { EIM_ENTRIES as usize }> = LruHashMap::new();

/// Devices the XDP programs may redirect to, by ifindex.
#[btf_map]
pub static XDP_DEVS: DevMapHash<{ MAX_XDP_DEVS as usize }> = DevMapHash::new();

/// Per uplink: packets that took the XDP path.
#[btf_map]
pub static XDP_STATS: PerCpuArray<XdpStats, { MAX_UPLINKS as usize }> = PerCpuArray::new();

/// IPv6 connections by their LAN-side tuple -> uplink and state.
#[btf_map]
pub static CONN6: HashMap<Flow6Key, Flow6, { MAX_FLOWS6 as usize }> = HashMap::new();

/// LAN host -> its next hop (the daemon's copy of the neighbour table),
/// which established packets to it take instead of `bpf_fib_lookup`.
#[btf_map]
pub static LAN_HOPS: HashMap<u32, NextHop, { MAX_LAN_HOPS as usize }> = HashMap::new();

/// `LAN_HOPS` for IPv6 LAN hosts.
#[btf_map]
pub static LAN_HOPS6: HashMap<[u8; 16], NextHop, { MAX_LAN_HOPS as usize }> = HashMap::new();

/// IPv6 LAN host -> its flows and refusals (`max_flows_per_host`), as
/// `HOSTS` for IPv4.
#[btf_map]
pub static HOSTS6: HashMap<[u8; 16], HostFlows, { MAX_HOSTS as usize }> = HashMap::new();

/// NAT66: (remote end, NAT port, protocol, uplink) -> the LAN endpoint,
/// for replies to the uplink's one address. An entry whose `CONN6` flow
/// is gone, or holds another port, is stale: the port is free again.
#[btf_map]
pub static NAT6: HashMap<Nat6Key, Nat6Lan, { MAX_FLOWS6 as usize }> = HashMap::new();

/// `uplink6_slot(uplink, k)` -> the uplink's mapping of the `k`-th
/// internal prefix: both prefixes and the NPTv6 adjustment.
#[btf_map]
pub static UPLINKS6: Array<Uplink6, { (MAX_UPLINKS * MAX_LAN6) as usize }> = Array::new();

/// With several internal prefixes: (side, prefix) of the `UPLINKS6`
/// entries past the first -> an internal prefix's `k`, or the slot of an
/// uplink prefix's entry.
#[btf_map]
pub static MAPPED6: LpmTrie<Mapped6Key, u32, { (MAX_UPLINKS * MAX_LAN6 * 2) as usize }> =
    LpmTrie::new();

/// `allow_inbound6`: (selector, LAN host) -> 1 for the unsolicited IPv6
/// connections that may come in.
#[btf_map]
pub static ALLOW6: LpmTrie<Allow6Key, u32, { MAX_ALLOW6 as usize }> = LpmTrie::new();

/// Per CPU: the flow key an ICMPv6 error's quoted packet names, built here
/// rather than on the stack, which the IPv6 programs have little of left.
/// Never pinned: it holds nothing between runs.
#[btf_map]
pub static SCRATCH6: PerCpuArray<Flow6Key, 1> = PerCpuArray::new();

/// [`CLOCK_TICK`]'s value.
#[repr(C)]
pub struct ClockTick {
    /// `jiffies_64` when `ns` was read.
    pub jiffies: u64,
    /// `CLOCK_MONOTONIC_COARSE` then, ns.
    pub ns: u64,
}

/// Per CPU: the jiffy and the coarse clock read at it (`conntrack::now_ns`).
/// Never pinned: a cache.
#[btf_map]
pub static CLOCK_TICK: PerCpuArray<ClockTick, 1> = PerCpuArray::new();

/// [`ECHO_HANDOVER`]'s value.
#[repr(C)]
pub struct EchoHandover {
    /// The LAN host and its identifier.
    pub lan_addr_be: u32,
    pub lan_id_be: u16,
    /// Its request in flight (as in the packet).
    pub seq_be: u16,
    /// When the gateway took the identifier (`conntrack::now_ns`).
    pub at_ns: u64,
    pub uplink: u32,
    pub _pad: u32,
}

/// (remote, identifier) the gateway took from a LAN echo flow whose
/// request was still unanswered -> that request, so that its reply still
/// reaches the LAN host. Never pinned: it matters for a round trip.
#[btf_map]
pub static ECHO_HANDOVER: LruHashMap<EchoKey, EchoHandover, 256> = LruHashMap::new();

/// Uplink slot -> its IPv6 next hop (`gateway6` or the router of its RA),
/// so that established IPv6 packets skip `bpf_fib_lookup`.
#[btf_map]
pub static NEXT_HOPS6: Array<NextHop, { MAX_UPLINKS as usize }> = Array::new();
