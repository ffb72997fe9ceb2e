//! Every map the programs use. Sizes here are defaults; the daemon sets the
//! connection maps' capacity at load time.
use aya_ebpf::{
    btf_maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, ProgramArray},
    macros::btf_map,
};
use multihome_common::{
    DEFAULT_MAX_FLOWS, EIM_ENTRIES, EchoKey, EimKey, EimLan, FRAG_ENTRIES, Fill, FlowFwd, FlowKey,
    FlowRev, FragKey, FragXlat, HOST_ECHO_ENTRIES, HostFlows, LanNet, MAX_HOSTS, MAX_LAN_NETS,
    MAX_ROUTED_PREFIXES, MAX_UPLINKS, PEER_ENTRIES, PeerLan, Reasons, RoutedKey, RoutedUplinks,
    SelectTable, Settings, Uplink, UplinkStats,
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

#[btf_map]
pub static SELECT: Array<SelectTable, 1> = Array::new();

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

/// A fragmented datagram -> how its later fragments are translated.
#[btf_map]
pub static FRAGS: LruHashMap<FragKey, FragXlat, { FRAG_ENTRIES as usize }> = LruHashMap::new();

/// (remote, NAT address, UDP) -> the one LAN host with such a flow, or 0.
#[btf_map]
pub static PEERS: LruHashMap<FlowKey, PeerLan, { PEER_ENTRIES as usize }> = LruHashMap::new();

/// The gateway's own echo (destination, id) -> time of its last request.
#[btf_map]
pub static HOST_ECHO: LruHashMap<EchoKey, u64, { HOST_ECHO_ENTRIES as usize }> = LruHashMap::new();

/// LAN host address -> its flows and refusals.
#[btf_map]
pub static HOSTS: HashMap<u32, HostFlows, { MAX_HOSTS as usize }> = HashMap::new();

/// Flows in the connection map.
#[btf_map]
pub static FILL: Array<Fill, 1> = Array::new();

/// Programs tail-called for rare paths: `mh_lan_reset`.
#[btf_map]
pub static JUMP: ProgramArray<1> = ProgramArray::new();

/// Public mapping (uplink address, NAT port, protocol) -> its LAN endpoint,
/// for hairpinning.
#[btf_map]
pub static EIM: LruHashMap<EimKey, EimLan, { EIM_ENTRIES as usize }> = LruHashMap::new();
