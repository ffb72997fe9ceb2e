//! Byte-exact `BPF_PROG_TEST_RUN` tests of the TC programs: each packet is
//! built from scratch with [`testbed::packets`] (every checksum a full
//! RFC 1071 recomputation), run through one program of a freshly loaded
//! object, and the output compared byte for byte with the translation
//! built the same independent way.
//!
//! Every test loads its own copy of the object (fresh maps) and runs inside
//! its own new network namespace, where no route exists: the programs' FIB
//! lookups fail, so they hand packets to the stack (`TC_ACT_UNSPEC`) instead
//! of redirecting, and the reverse path does not decrement the TTL.
//!
//! Needs root; without it every test panics through `require_root`.
use std::{collections::HashSet, net::Ipv4Addr, process::Command, sync::OnceLock};

use aya::{
    Ebpf, EbpfLoader,
    maps::xdp::DevMapHash,
    maps::{
        Array, HashMap, PerCpuArray, ProgramArray,
        lpm_trie::{Key, LpmTrie},
    },
    programs::{ProgramError, SchedClassifier, TestRun, TestRunOptions, Xdp},
};
use multihome_common::{
    EchoKey, EimKey, EimLan, FLOW_FIN_IN, FLOW_FIN_OUT, FLOW_HAIRPIN, FLOW_RST, FLOW_RST_IN,
    FLOW_SEEN_REPLY, FlowFwd, FlowKey, FlowRev, HostFlows, JUMP_LAN_RESET, LAYOUT_VERSION, LanNet,
    MAP_CONN_FWD, MAP_CONN_REV, MAP_EIM, MAP_FILL, MAP_HOST_ECHO, MAP_HOSTS, MAP_JUMP,
    MAP_LAN_NETS, MAP_NEXT_HOPS, MAP_PEERS, MAP_REASONS, MAP_ROUTED, MAP_ROUTED6, MAP_SETTINGS,
    MAP_SYN_WAIT, MAP_UPLINK_STATS, MAP_UPLINKS, MAP_XDP_DEVS, MAP_XDP_STATS, MARK_TRANSLATED,
    NextHop, PROG_LAN_IN, PROG_LAN_RESET, PROG_WAN_IN, PROG_WAN_OUT, PROG_XDP_LAN, PROG_XDP_WAN,
    PeerSlot, REASON_COUNT, Reason, Reasons, Routed6Key, RoutedKey, Settings, SynWaitKey,
    UPLINK_CONFIGURED, UPLINK_EVACUATE, UPLINK_EVACUATE_TCP, UPLINK_OUTAGE, UPLINK_RESET_TCP,
    UPLINK_USABLE, Uplink, UplinkStats, WAIT_RETRANSMIT, WAIT_SYN, XdpStats, peer_check, peer_slot,
};
use multihome_common::{
    Flow6, Flow6Key, MAP_CONN6, MAP_HOSTS6, MAP_LAN_HOPS, MAP_LAN_HOPS6, MAP_NAT6, MAP_NEXT_HOPS6,
    MAP_UPLINKS6, MODE6_NAT66, MODE6_NPT, Nat6Key, Nat6Lan, PROG_LAN_IN6, PROG_WAN_IN6,
    PROG_WAN_OUT6, Uplink6, npt_adjustment,
};
use multihome_common::{MAP_MAPPED6, MAPPED6_INNER, MAPPED6_OUTER, Mapped6Key, uplink6_slot};
use testbed::packets::*;

const IPPROTO_DCCP: u8 = 33;
use testbed::{
    CLIENT_ADDR, INET_SERVICE, ISPX_CORE, NetNs, UPLINK_X_ADDR, UPLINK_X_GW, multihome_bin,
    require_root,
};

/// `TC_ACT_UNSPEC` (-1) as the kernel reports the return value.
const TC_ACT_UNSPEC: u32 = u32::MAX;
const TC_ACT_SHOT: u32 = 2;

const MARK_BASE: u32 = 0x4d48_0000;
/// `skb->mark` of packets the LAN program hands to the stack for uplink 0.
const UPLINK_MARK: u32 = MARK_BASE | 1;

const LAN_HOST: Ipv4Addr = CLIENT_ADDR;
const LAN_NET: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 0);
const LAN_MASK: Ipv4Addr = Ipv4Addr::new(255, 255, 255, 0);
/// A source outside every LAN prefix.
const OUTSIDER: Ipv4Addr = Ipv4Addr::new(198, 18, 99, 5);
const REMOTE: Ipv4Addr = INET_SERVICE;
const NAT_ADDR: Ipv4Addr = UPLINK_X_ADDR;
/// A router on the path that reports errors.
const ROUTER: Ipv4Addr = ISPX_CORE;

/// Size of the kernel's `struct __sk_buff` (uapi), the test-run context.
const SKB_CTX_LEN: usize = 192;
/// Offset of `mark` in `struct __sk_buff` (after `len` and `pkt_type`).
const SKB_MARK: usize = 8;
/// Offset of `ingress_ifindex` in `struct __sk_buff`.
const SKB_INGRESS_IFINDEX: usize = 36;
/// `ingress_ifindex` of packets the gateway forwards (from a LAN device);
/// the gateway's own packets have 0.
const FORWARDED_IIF: u32 = 7;

/// `max_flows_per_host` of the test datapath.
const PER_HOST: u32 = 100;
/// The flow hash seed of every run.
const SEED: u32 = 0x5eed_0001;

/// Uplink 0's device: loopback, the device `BPF_PROG_TEST_RUN` gives
/// every skb, so packets in the tests leave by uplink 0's device.
const UPLINK_IFINDEX: u32 = 1;

fn be(a: Ipv4Addr) -> u32 {
    u32::from(a).to_be()
}

/// The eBPF object the daemon embeds, written out once per test process.
/// `p` as a frame, with TCP flags `flags`.
fn with_tcp_flags(mut p: Ipv4, flags: u8) -> Vec<u8> {
    if let Payload::Tcp(t) = &mut p.payload {
        t.flags = flags;
    }
    p.frame()
}

fn object() -> &'static [u8] {
    static OBJECT: OnceLock<Vec<u8>> = OnceLock::new();
    OBJECT.get_or_init(|| {
        let bin = multihome_bin();
        let path = std::env::temp_dir().join(format!("mh-test-run-{}.o", std::process::id()));
        let out = Command::new(&bin)
            .arg("ebpf-object")
            .arg(&path)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()));
        assert!(
            out.status.success(),
            "`{} ebpf-object` failed ({}): {}",
            bin.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let bytes =
            std::fs::read(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        let _ = std::fs::remove_file(&path);
        bytes
    })
}

/// A NAT flow as the tests pin it: the LAN tuple, the remote, the NAT port
/// (echo identifier for ICMP), on uplink 0 with address [`NAT_ADDR`].
#[derive(Clone, Copy, Debug)]
struct Flow {
    proto: u8,
    lan_port: u16,
    remote_port: u16,
    nat_port: u16,
    /// UDP only: whether the endpoints use checksums.
    udp_checksum: bool,
}

const TCP_FLOW: Flow = Flow {
    proto: IPPROTO_TCP,
    lan_port: 40000,
    remote_port: 443,
    nat_port: 61001,
    udp_checksum: true,
};
const UDP_FLOW: Flow = Flow {
    proto: IPPROTO_UDP,
    lan_port: 40001,
    remote_port: 53,
    nat_port: 61002,
    udp_checksum: true,
};
/// UDP without checksums (checksum field 0 both ways).
const UDP0_FLOW: Flow = Flow {
    proto: IPPROTO_UDP,
    lan_port: 40002,
    remote_port: 4789,
    nat_port: 61003,
    udp_checksum: false,
};
const ECHO_FLOW: Flow = Flow {
    proto: IPPROTO_ICMP,
    lan_port: 0x1234,
    remote_port: 0,
    nat_port: 61004,
    udp_checksum: true,
};
/// A flow that kept its LAN port: only the address changes.
const KEPT_PORT_FLOW: Flow = Flow {
    proto: IPPROTO_TCP,
    lan_port: 5000,
    remote_port: 8443,
    nat_port: 5000,
    udp_checksum: true,
};
const ALL_FLOWS: [Flow; 5] = [TCP_FLOW, UDP_FLOW, UDP0_FLOW, ECHO_FLOW, KEPT_PORT_FLOW];

impl Flow {
    fn echo(&self) -> bool {
        self.proto == IPPROTO_ICMP
    }

    fn name(&self) -> String {
        match (self.proto, self.udp_checksum) {
            (IPPROTO_TCP, _) => format!("TCP {}->{}", self.lan_port, self.nat_port),
            (IPPROTO_UDP, true) => format!("UDP {}->{}", self.lan_port, self.nat_port),
            (IPPROTO_UDP, false) => {
                format!("UDP (no checksum) {}->{}", self.lan_port, self.nat_port)
            }
            _ => format!("ICMP echo id {:#x}->{:#x}", self.lan_port, self.nat_port),
        }
    }

    fn fwd_key(&self) -> FlowKey {
        FlowKey {
            saddr_be: be(LAN_HOST),
            daddr_be: be(REMOTE),
            sport_be: self.lan_port.to_be(),
            dport_be: if self.echo() {
                0
            } else {
                self.remote_port.to_be()
            },
            proto: self.proto,
            _pad0: 0,
            _pad1: 0,
        }
    }

    fn rev_key(&self) -> FlowKey {
        FlowKey {
            saddr_be: be(REMOTE),
            daddr_be: be(NAT_ADDR),
            sport_be: if self.echo() {
                0
            } else {
                self.remote_port.to_be()
            },
            dport_be: self.nat_port.to_be(),
            proto: self.proto,
            _pad0: 0,
            _pad1: 0,
        }
    }

    fn fwd(&self) -> FlowFwd {
        FlowFwd {
            last_seen_ns: 0,
            nat_addr_be: be(NAT_ADDR),
            flags: 0,
            nat_port_be: self.nat_port.to_be(),
            uplink: 0,
            policy: 0,
            created_s: 0,
            ..FlowFwd::default()
        }
    }

    fn rev(&self) -> FlowRev {
        FlowRev {
            lan_addr_be: be(LAN_HOST),
            lan_port_be: self.lan_port.to_be(),
            uplink: 0,
            _pad: 0,
        }
    }

    /// A packet of this flow as the LAN host sends it (odd payload lengths,
    /// so the checksums cover a padded last byte).
    fn outbound(&self) -> Ipv4 {
        match self.proto {
            IPPROTO_TCP => Ipv4::tcp(
                LAN_HOST,
                REMOTE,
                Tcp::new(
                    self.lan_port,
                    self.remote_port,
                    TCP_ACK | TCP_PSH,
                    b"GET / HTTP/1.1\r\n\r",
                ),
            ),
            IPPROTO_UDP => Ipv4::udp(
                LAN_HOST,
                REMOTE,
                Udp {
                    checksum: self.udp_checksum,
                    ..Udp::new(self.lan_port, self.remote_port, b"\x5a\x17\x01\x00query")
                },
            ),
            _ => Ipv4::icmp(
                LAN_HOST,
                REMOTE,
                Icmp::echo_request(self.lan_port, 7, b"abcdefghijklmnopqrstuvwabcdefg"),
            ),
        }
    }

    /// The outbound packet after SNAT, as the gateway sends it.
    fn outbound_translated(&self) -> Ipv4 {
        self.outbound().with_source(NAT_ADDR, self.nat_port)
    }

    /// A reply as it arrives on the uplink.
    fn reply(&self) -> Ipv4 {
        let mut p = match self.proto {
            IPPROTO_TCP => Ipv4::tcp(
                REMOTE,
                NAT_ADDR,
                Tcp::new(
                    self.remote_port,
                    self.nat_port,
                    TCP_ACK | TCP_PSH,
                    b"HTTP/1.1 200 OK\r\n\r\nhello",
                ),
            ),
            IPPROTO_UDP => Ipv4::udp(
                REMOTE,
                NAT_ADDR,
                Udp {
                    checksum: self.udp_checksum,
                    ..Udp::new(self.remote_port, self.nat_port, b"\x5a\x17\x81\x80answer!")
                },
            ),
            _ => Ipv4::icmp(
                REMOTE,
                NAT_ADDR,
                Icmp::echo_reply(self.nat_port, 7, b"abcdefghijklmnopqrstuvwabcdefg"),
            ),
        };
        p.ttl = 57;
        p.id = 0x9e01;
        p
    }

    /// The reply after reverse translation, as the LAN host must get it.
    fn reply_translated(&self) -> Ipv4 {
        self.reply().with_destination(LAN_HOST, self.lan_port)
    }
}

/// One test run's result.
#[derive(Debug)]
struct Run {
    ret: u32,
    out: Vec<u8>,
    /// `skb->mark` after the run.
    mark: u32,
}

/// Both connection maps, sorted, for before/after comparisons.
#[derive(Debug, PartialEq, Eq)]
struct Flows {
    fwd: Vec<(FlowKey, FlowFwd)>,
    rev: Vec<(FlowKey, FlowRev)>,
}

fn key_order(k: &FlowKey) -> (u32, u32, u16, u16, u8) {
    (k.saddr_be, k.daddr_be, k.sport_be, k.dport_be, k.proto)
}

/// A freshly loaded object with uplink 0, the LAN prefix and the settings
/// configured, and no flows.
struct Datapath {
    ebpf: Ebpf,
    loaded: HashSet<&'static str>,
    /// `mh_wan_out` runs see the gateway's own packets (ingress_ifindex 0)
    /// instead of forwarded ones.
    host_origin: bool,
}

impl Datapath {
    fn new() -> Self {
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(MAP_CONN_FWD, 1024)
            .map_max_entries(MAP_CONN_REV, 1024)
            .load(object())
            .unwrap_or_else(|e| panic!("loading the eBPF object: {e:?}"));
        {
            let mut settings: Array<_, Settings> =
                Array::try_from(ebpf.map_mut(MAP_SETTINGS).expect("SETTINGS map"))
                    .expect("SETTINGS is an array of Settings");
            settings
                .set(
                    0,
                    Settings {
                        layout_version: LAYOUT_VERSION,
                        mark_base: MARK_BASE,
                        snat_port_min: 61000,
                        snat_port_max: 65535,
                        local_port_min: 32768,
                        local_port_max: 60999,
                        max_flows: 1024,
                        max_flows_per_host: PER_HOST,
                        flow_hash_seed: SEED,
                        rules: 0,
                    },
                    0,
                )
                .expect("write SETTINGS");
        }
        {
            let mut uplinks: Array<_, Uplink> =
                Array::try_from(ebpf.map_mut(MAP_UPLINKS).expect("UPLINKS map"))
                    .expect("UPLINKS is an array of Uplink");
            let mut name = [0u8; 16];
            name[..1].copy_from_slice(b"x");
            let mut ifname = [0u8; 16];
            ifname[..4].copy_from_slice(b"wanx");
            uplinks
                .set(
                    0,
                    Uplink {
                        addr_be: be(NAT_ADDR),
                        gateway_be: be(UPLINK_X_GW),
                        ifindex: UPLINK_IFINDEX,
                        table: 100,
                        mark: UPLINK_MARK,
                        mtu: 1500,
                        flags: UPLINK_CONFIGURED | UPLINK_USABLE,
                        weight: 1,
                        name,
                        ifname,
                        ..Default::default()
                    },
                    0,
                )
                .expect("write UPLINKS");
        }
        {
            let mut lan: Array<_, LanNet> =
                Array::try_from(ebpf.map_mut(MAP_LAN_NETS).expect("LAN_NETS map"))
                    .expect("LAN_NETS is an array of LanNet");
            lan.set(
                0,
                LanNet {
                    addr_be: be(LAN_NET),
                    mask_be: be(LAN_MASK),
                    ifindex: 0,
                    in_use: 1,
                },
                0,
            )
            .expect("write LAN_NETS");
        }
        Datapath {
            ebpf,
            loaded: HashSet::new(),
            host_origin: false,
        }
    }

    /// The program, loaded (verified) on first use; `mh_lan_in` with the
    /// reset program it tail-calls.
    fn program(&mut self, name: &'static str) -> &SchedClassifier {
        if name == PROG_LAN_IN && !self.loaded.contains(PROG_LAN_RESET) {
            let fd = self
                .program(PROG_LAN_RESET)
                .fd()
                .expect("fd")
                .try_clone()
                .expect("dup");
            let mut jump = ProgramArray::try_from(self.ebpf.map_mut(MAP_JUMP).expect("JUMP map"))
                .expect("JUMP is a program array");
            jump.set(JUMP_LAN_RESET, &fd, 0)
                .expect("point JUMP at mh_lan_reset");
        }
        let prog: &mut SchedClassifier = self
            .ebpf
            .program_mut(name)
            .unwrap_or_else(|| panic!("program {name} missing from the object"))
            .try_into()
            .unwrap_or_else(|e| panic!("{name} is not a classifier: {e}"));
        if self.loaded.insert(name) {
            prog.load()
                .unwrap_or_else(|e| panic!("the kernel rejected {name}: {e:?}"));
        }
        prog
    }

    fn try_run(
        &mut self,
        prog: &'static str,
        frame: &[u8],
        mark: u32,
    ) -> Result<Run, ProgramError> {
        let iif = if (prog == PROG_WAN_OUT || prog == PROG_WAN_OUT6) && !self.host_origin {
            FORWARDED_IIF
        } else {
            0
        };
        self.try_run_iif(prog, frame, mark, iif)
    }

    /// [`Self::try_run`] with `ingress_ifindex` = `iif`.
    fn try_run_iif(
        &mut self,
        prog: &'static str,
        frame: &[u8],
        mark: u32,
        iif: u32,
    ) -> Result<Run, ProgramError> {
        let p = self.program(prog);
        let mut ctx_in = [0u8; SKB_CTX_LEN];
        ctx_in[SKB_MARK..SKB_MARK + 4].copy_from_slice(&mark.to_ne_bytes());
        ctx_in[SKB_INGRESS_IFINDEX..SKB_INGRESS_IFINDEX + 4].copy_from_slice(&iif.to_ne_bytes());
        let mut ctx_out = [0u8; SKB_CTX_LEN];
        let mut out = vec![0u8; frame.len() + 256];
        let r = p.test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx_in),
            ctx_out: Some(&mut ctx_out),
            ..TestRunOptions::new()
        })?;
        out.truncate(r.data_size_out as usize);
        let mark = u32::from_ne_bytes(ctx_out[SKB_MARK..SKB_MARK + 4].try_into().expect("4 bytes"));
        Ok(Run {
            ret: r.return_value,
            out,
            mark,
        })
    }

    /// Runs `prog` on `frame` with `skb->mark` = `mark`.
    fn run(&mut self, prog: &'static str, frame: &[u8], mark: u32) -> Run {
        self.try_run(prog, frame, mark)
            .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN of {prog} failed: {e:?}"))
    }

    /// Runs `prog` and returns the reasons it counted.
    fn run_counted(
        &mut self,
        prog: &'static str,
        frame: &[u8],
        mark: u32,
    ) -> (Run, Vec<(Reason, u64)>) {
        self.try_run_counted(prog, frame, mark)
            .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN of {prog} failed: {e:?}"))
    }

    fn try_run_counted(
        &mut self,
        prog: &'static str,
        frame: &[u8],
        mark: u32,
    ) -> Result<(Run, Vec<(Reason, u64)>), ProgramError> {
        let before = self.reasons();
        let run = self.try_run(prog, frame, mark)?;
        let after = self.reasons();
        let counted = Reason::ALL
            .iter()
            .map(|r| (*r, after[*r as usize] - before[*r as usize]))
            .filter(|(_, n)| *n != 0)
            .collect();
        Ok((run, counted))
    }

    fn insert_flow(&mut self, f: &Flow) {
        self.insert_fwd(f);
        self.insert_rev(f);
    }

    fn insert_fwd(&mut self, f: &Flow) {
        self.set_fwd(f.fwd_key(), f.fwd());
    }

    fn set_fwd(&mut self, key: FlowKey, value: FlowFwd) {
        let mut fwd: HashMap<_, FlowKey, FlowFwd> =
            HashMap::try_from(self.ebpf.map_mut(MAP_CONN_FWD).expect("CONN_FWD map"))
                .expect("CONN_FWD types");
        fwd.insert(key, value, 0).expect("insert CONN_FWD");
    }

    fn insert_rev(&mut self, f: &Flow) {
        let mut rev: HashMap<_, FlowKey, FlowRev> =
            HashMap::try_from(self.ebpf.map_mut(MAP_CONN_REV).expect("CONN_REV map"))
                .expect("CONN_REV types");
        rev.insert(f.rev_key(), f.rev(), 0)
            .expect("insert CONN_REV");
    }

    fn fwd_entry(&self, f: &Flow) -> Option<FlowFwd> {
        let fwd: HashMap<_, FlowKey, FlowFwd> =
            HashMap::try_from(self.ebpf.map(MAP_CONN_FWD).expect("CONN_FWD map"))
                .expect("CONN_FWD types");
        fwd.get(&f.fwd_key(), 0).ok()
    }

    fn flows(&self) -> Flows {
        let fwd: HashMap<_, FlowKey, FlowFwd> =
            HashMap::try_from(self.ebpf.map(MAP_CONN_FWD).expect("CONN_FWD map"))
                .expect("CONN_FWD types");
        let rev: HashMap<_, FlowKey, FlowRev> =
            HashMap::try_from(self.ebpf.map(MAP_CONN_REV).expect("CONN_REV map"))
                .expect("CONN_REV types");
        let mut f: Vec<_> = fwd.iter().map(|e| e.expect("read CONN_FWD")).collect();
        let mut r: Vec<_> = rev.iter().map(|e| e.expect("read CONN_REV")).collect();
        f.sort_by_key(|(k, _)| key_order(k));
        r.sort_by_key(|(k, _)| key_order(k));
        Flows { fwd: f, rev: r }
    }

    /// The REASONS counters summed over all CPUs, indexed by `Reason`.
    fn reasons(&self) -> [u64; REASON_COUNT] {
        let map: PerCpuArray<_, Reasons> =
            PerCpuArray::try_from(self.ebpf.map(MAP_REASONS).expect("REASONS map"))
                .expect("REASONS types");
        let per_cpu = map.get(&0, 0).expect("read REASONS");
        let mut sum = [0u64; REASON_COUNT];
        for cpu in per_cpu.iter() {
            for r in Reason::ALL {
                sum[*r as usize] += cpu.get(*r);
            }
        }
        sum
    }

    /// Uplink 0 maps [`INNER6`]/64 onto [`OUTER6`]/64 (NPTv6).
    fn set_uplink6_0(&mut self) {
        let mut a: Array<_, Uplink6> =
            Array::try_from(self.ebpf.map_mut(MAP_UPLINKS6).expect("UPLINKS6 map"))
                .expect("UPLINKS6 types");
        let (inner, outer) = (v6(INNER6).octets(), v6(OUTER6).octets());
        let u6 = Uplink6 {
            inner,
            outer,
            span: outer,
            prefix_len: 64,
            span_len: 64,
            mode: MODE6_NPT,
            adjust: npt_adjustment(&inner, &outer, 64),
            ..Default::default()
        };
        a.set(0, u6, 0).expect("write UPLINKS6");
    }

    /// Uplink 0 maps each of `pairs` (internal /64, its /64) by NPTv6,
    /// in that order, the entries past the first found by `MAPPED6`, as
    /// the daemon writes them.
    fn set_uplink6_0_lans(&mut self, pairs: &[(&str, &str)]) {
        let lans = pairs.len() as u8;
        // The span of the uplink's prefixes: their common leading bits.
        let first = u128::from(v6(pairs[0].1));
        let span_len = pairs
            .iter()
            .map(|(_, o)| (u128::from(v6(o)) ^ first).leading_zeros().min(64) as u8)
            .min()
            .expect("a pair");
        let span = (first & !(u128::MAX >> span_len)).to_be_bytes();
        let entries: Vec<Uplink6> = pairs
            .iter()
            .enumerate()
            .map(|(k, (inner, outer))| {
                let (inner, outer) = (v6(inner).octets(), v6(outer).octets());
                Uplink6 {
                    inner,
                    outer,
                    prefix_len: 64,
                    mode: MODE6_NPT,
                    adjust: npt_adjustment(&inner, &outer, 64),
                    lans,
                    k: k as u8,
                    span,
                    span_len,
                    ..Default::default()
                }
            })
            .collect();
        let mut a: Array<_, Uplink6> =
            Array::try_from(self.ebpf.map_mut(MAP_UPLINKS6).expect("UPLINKS6 map"))
                .expect("UPLINKS6 types");
        for (k, u6) in entries.iter().enumerate() {
            a.set(uplink6_slot(0, k as u32), u6, 0)
                .expect("write UPLINKS6");
        }
        let mut trie: LpmTrie<_, Mapped6Key, u32> =
            LpmTrie::try_from(self.ebpf.map_mut(MAP_MAPPED6).expect("MAPPED6 map"))
                .expect("MAPPED6 types");
        for (k, u6) in entries.iter().enumerate().skip(1) {
            for (side, addr, value) in [
                (MAPPED6_INNER, u6.inner, k as u32),
                (MAPPED6_OUTER, u6.outer, uplink6_slot(0, k as u32)),
            ] {
                let key = Mapped6Key {
                    side_be: side.to_be(),
                    addr,
                };
                trie.insert(&Key::new(32 + 64, key), value, 0)
                    .expect("insert MAPPED6");
            }
        }
    }

    /// Uplink 0 translates [`INNER6`]/64 onto [`NAT6_ADDR`] (NAT66).
    fn set_uplink6_0_nat66(&mut self) {
        let mut a: Array<_, Uplink6> =
            Array::try_from(self.ebpf.map_mut(MAP_UPLINKS6).expect("UPLINKS6 map"))
                .expect("UPLINKS6 types");
        let u6 = Uplink6 {
            inner: v6(INNER6).octets(),
            outer: v6(NAT6_ADDR).octets(),
            span: v6(NAT6_ADDR).octets(),
            prefix_len: 64,
            span_len: 128,
            mode: MODE6_NAT66,
            ..Default::default()
        };
        a.set(0, u6, 0).expect("write UPLINKS6");
    }

    fn nat6(&mut self) -> HashMap<&mut aya::maps::MapData, Nat6Key, Nat6Lan> {
        HashMap::try_from(self.ebpf.map_mut(MAP_NAT6).expect("NAT6 map")).expect("NAT6 types")
    }

    fn conn6(&mut self) -> HashMap<&mut aya::maps::MapData, Flow6Key, Flow6> {
        HashMap::try_from(self.ebpf.map_mut(MAP_CONN6).expect("CONN6 map")).expect("CONN6 types")
    }

    /// Lets `bits` (a bit per uplink) carry sources in `net/len` untranslated.
    fn set_routed(&mut self, net: Ipv4Addr, len: u32, bits: u32) {
        let mut trie: LpmTrie<_, RoutedKey, u32> =
            LpmTrie::try_from(self.ebpf.map_mut(MAP_ROUTED).expect("ROUTED map"))
                .expect("ROUTED types");
        trie.insert(&Key::new(len, RoutedKey { addr_be: be(net) }), bits, 0)
            .expect("insert ROUTED");
    }

    /// PEERS for (REMOTE, NAT_ADDR, UDP), as the LAN program leaves it
    /// after making flows there (0: more than one LAN host).
    fn set_peer(&mut self, lan: Ipv4Addr) {
        let mut peers: Array<_, PeerSlot> =
            Array::try_from(self.ebpf.map_mut(MAP_PEERS).expect("PEERS map")).expect("PEERS types");
        let (remote, nat, lan) = (be(REMOTE), be(NAT_ADDR), be(lan));
        let slot = PeerSlot {
            remote_be: remote,
            nat_addr_be: nat,
            lan_addr_be: lan,
            check: peer_check(remote, nat, lan),
        };
        peers
            .set(peer_slot(remote, nat), slot, 0)
            .expect("write PEERS");
    }

    /// PEERS's slot for (REMOTE, NAT_ADDR) as it is.
    fn peer_slot0(&self) -> PeerSlot {
        let peers: Array<_, PeerSlot> =
            Array::try_from(self.ebpf.map(MAP_PEERS).expect("PEERS map")).expect("PEERS types");
        peers
            .get(&peer_slot(be(REMOTE), be(NAT_ADDR)), 0)
            .expect("read PEERS")
    }

    /// Changes uplink 0's slot with `edit`.
    fn edit_uplink0(&mut self, edit: impl FnOnce(&mut Uplink)) {
        let mut uplinks: Array<_, Uplink> =
            Array::try_from(self.ebpf.map_mut(MAP_UPLINKS).expect("UPLINKS map"))
                .expect("UPLINKS types");
        let mut u = uplinks.get(&0, 0).expect("uplink 0");
        edit(&mut u);
        uplinks.set(0, u, 0).expect("write UPLINKS");
    }

    /// Moves uplink 0 to device `ifindex`.
    fn set_uplink0_ifindex(&mut self, ifindex: u32) {
        self.edit_uplink0(|u| u.ifindex = ifindex);
    }

    /// Uplink 0's traffic counters summed over all CPUs.
    fn uplink0_stats(&self) -> UplinkStats {
        let map: PerCpuArray<_, UplinkStats> =
            PerCpuArray::try_from(self.ebpf.map(MAP_UPLINK_STATS).expect("UPLINK_STATS map"))
                .expect("UPLINK_STATS types");
        let per_cpu = map.get(&0, 0).expect("read UPLINK_STATS");
        per_cpu
            .iter()
            .fold(UplinkStats::default(), |a, s| UplinkStats {
                new_flows: a.new_flows + s.new_flows,
                tx_packets: a.tx_packets + s.tx_packets,
                tx_bytes: a.tx_bytes + s.tx_bytes,
                rx_packets: a.rx_packets + s.rx_packets,
                rx_bytes: a.rx_bytes + s.rx_bytes,
                slow_path: a.slow_path + s.slow_path,
                syns: a.syns + s.syns,
                synacks: a.synacks + s.synacks,
                synack_rtt_ns: a.synack_rtt_ns + s.synack_rtt_ns,
                syn_retries: a.syn_retries + s.syn_retries,
                retransmits: a.retransmits + s.retransmits,
            })
    }
}

/// Runs `f` on a fresh datapath inside a new, empty network namespace.
fn with_datapath<R>(f: impl FnOnce(&mut Datapath) -> R) -> R {
    require_root();
    let ns = NetNs::new("trn");
    ns.run(|| {
        let mut dp = Datapath::new();
        f(&mut dp)
    })
}

#[track_caller]
fn assert_passed_as(run: &Run, expected: &[u8], what: &str) {
    assert_eq!(
        run.ret, TC_ACT_UNSPEC,
        "{what}: expected TC_ACT_UNSPEC (pass), got {:#x}",
        run.ret
    );
    assert!(
        run.out == expected,
        "{what}: output differs from the independently built packet\n{}",
        describe_difference(expected, &run.out)
    );
}

#[track_caller]
fn assert_untouched(run: &Run, input: &[u8], what: &str) {
    assert_eq!(
        run.ret, TC_ACT_UNSPEC,
        "{what}: expected TC_ACT_UNSPEC (pass), got {:#x}",
        run.ret
    );
    assert!(
        run.out == input,
        "{what}: the packet must pass byte-identical\n{}",
        describe_difference(input, &run.out)
    );
}

/// Passed byte-identical, or dropped: never rewritten.
fn untouched_or_dropped(run: &Run, input: &[u8], what: &str) -> Result<(), String> {
    match run.ret {
        TC_ACT_SHOT => Ok(()),
        TC_ACT_UNSPEC if run.out == input => Ok(()),
        TC_ACT_UNSPEC => Err(format!(
            "{what}: passed, but not byte-identical\n{}",
            describe_difference(input, &run.out)
        )),
        other => Err(format!(
            "{what}: expected pass or drop, got TC action {other:#x}"
        )),
    }
}

#[track_caller]
fn assert_untouched_or_dropped(run: &Run, input: &[u8], what: &str) {
    if let Err(e) = untouched_or_dropped(run, input, what) {
        panic!("{e}");
    }
}

/// Whether the kernel refuses to test-run `frame`: it rejects frames
/// shorter than an Ethernet header, and IPv4 (IPv6) frames too short for
/// an IPv4 (IPv6) header, with EINVAL before any program runs. Such frames
/// can reach a real TC hook, but not a test run.
fn kernel_may_refuse(frame: &[u8]) -> bool {
    if frame.len() < ETH_HLEN {
        return true;
    }
    match u16_at(frame, 12) {
        ETH_P_IP => frame.len() < ETH_HLEN + 20,
        ETH_P_IPV6 => frame.len() < ETH_HLEN + 40,
        _ => false,
    }
}

/// No reason counted.
const NOTHING: [(Reason, u64); 0] = [];

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([b[off], b[off + 1]])
}

// ---------------------------------------------------------------------------
// mh_wan_out: SNAT of packets the LAN program handed to the stack.

/// SNATs `f`'s outbound packet on `mh_wan_out` and checks the exact bytes,
/// no reason counted and the maps unchanged.
fn check_wan_out_snat(dp: &mut Datapath, f: &Flow, input: &Ipv4, expected: &Ipv4) {
    let what = format!("{} SNAT on {PROG_WAN_OUT}", f.name());
    let (input, expected) = (input.frame(), expected.frame());
    assert_ne!(input, expected, "{what}: test packets must differ");
    let before = dp.flows();
    let (run, counted) = dp.run_counted(PROG_WAN_OUT, &input, UPLINK_MARK);
    assert_passed_as(&run, &expected, &what);
    assert_eq!(counted, NOTHING, "{what}: counted reasons");
    assert_eq!(run.mark, UPLINK_MARK, "{what}: the mark is left alone");
    assert_eq!(
        dp.flows(),
        before,
        "{what}: the egress program keeps the maps"
    );
}

/// The verifier's budget is 1M instructions per program. The LAN program
/// carries every new-flow feature; a change that eats the room left must
/// show here, long before the kernel refuses to load it.
#[test]
fn every_program_verifies_with_at_least_a_third_of_the_budget_left() {
    with_datapath(|dp| {
        for name in [
            PROG_LAN_IN,
            PROG_LAN_RESET,
            PROG_WAN_IN,
            PROG_WAN_OUT,
            PROG_LAN_IN6,
            PROG_WAN_IN6,
            PROG_WAN_OUT6,
        ] {
            let used = dp
                .program(name)
                .info()
                .expect("program info")
                .verified_instruction_count()
                .expect("kernel reports verified instructions");
            eprintln!("{name}: {used} instructions verified");
            assert!(
                used < 660_000,
                "{name}: the verifier walked {used} instructions of its 1M budget"
            );
        }
    });
}

#[test]
fn wan_out_snat_rewrites_tcp_source_and_checksums_byte_exact() {
    with_datapath(|dp| {
        dp.insert_flow(&TCP_FLOW);
        check_wan_out_snat(
            dp,
            &TCP_FLOW,
            &TCP_FLOW.outbound(),
            &TCP_FLOW.outbound_translated(),
        );
        let s = dp.uplink0_stats();
        assert_eq!(s.tx_packets, 1, "tx counted: {s:?}");
        assert_eq!(s.tx_bytes, TCP_FLOW.outbound().bytes().len() as u64);
    });
}

#[test]
fn wan_out_snat_rewrites_tcp_source_when_the_lan_port_was_kept() {
    with_datapath(|dp| {
        dp.insert_flow(&KEPT_PORT_FLOW);
        let f = KEPT_PORT_FLOW;
        check_wan_out_snat(dp, &f, &f.outbound(), &f.outbound_translated());
    });
}

#[test]
fn wan_out_snat_rewrites_udp_source_and_checksum_byte_exact() {
    with_datapath(|dp| {
        dp.insert_flow(&UDP_FLOW);
        let f = UDP_FLOW;
        check_wan_out_snat(dp, &f, &f.outbound(), &f.outbound_translated());
    });
}

#[test]
fn wan_out_snat_keeps_a_zero_udp_checksum_zero() {
    with_datapath(|dp| {
        dp.insert_flow(&UDP0_FLOW);
        let f = UDP0_FLOW;
        let expected = f.outbound_translated();
        assert_eq!(u16_at(&expected.bytes(), 20 + 6), 0, "expectation");
        check_wan_out_snat(dp, &f, &f.outbound(), &expected);
    });
}

/// A UDP payload (whose first two bytes are free) that makes `p`'s
/// computed UDP checksum 0, so that it must be sent as ffff.
fn payload_making_udp_checksum_zero(p: &Ipv4) -> Vec<u8> {
    let Payload::Udp(u) = &p.payload else {
        panic!("not UDP")
    };
    let mut probe = p.clone();
    if let Payload::Udp(pu) = &mut probe.payload {
        pu.payload[0] = 0;
        pu.payload[1] = 0;
    }
    let mut seg = probe.l4_bytes();
    seg[6] = 0;
    seg[7] = 0;
    let mut buf = pseudo_header(p.src, p.dst, IPPROTO_UDP, seg.len()).to_vec();
    buf.extend_from_slice(&seg);
    let w = 0xffff - ones_complement_sum(&buf);
    let mut payload = u.payload.clone();
    payload[..2].copy_from_slice(&w.to_be_bytes());
    payload
}

fn set_udp_payload(p: &mut Ipv4, payload: Vec<u8>) {
    if let Payload::Udp(u) = &mut p.payload {
        u.payload = payload;
    }
}

#[test]
fn wan_out_snat_sends_a_udp_checksum_that_computes_to_zero_as_ffff() {
    with_datapath(|dp| {
        dp.insert_flow(&UDP_FLOW);
        let f = UDP_FLOW;
        let mut input = f.outbound();
        let mut expected = f.outbound_translated();
        let payload = payload_making_udp_checksum_zero(&expected);
        set_udp_payload(&mut input, payload.clone());
        set_udp_payload(&mut expected, payload);
        assert_eq!(u16_at(&expected.bytes(), 26), 0xffff, "expectation");
        assert_ne!(u16_at(&input.bytes(), 26), 0xffff, "input");
        check_wan_out_snat(dp, &f, &input, &expected);
    });
}

#[test]
fn wan_out_snat_rewrites_icmp_echo_identifier_and_checksum_byte_exact() {
    with_datapath(|dp| {
        dp.insert_flow(&ECHO_FLOW);
        let f = ECHO_FLOW;
        check_wan_out_snat(dp, &f, &f.outbound(), &f.outbound_translated());
    });
}

#[test]
fn wan_out_snat_finds_the_l4_header_after_ip_options_of_every_length() {
    with_datapath(|dp| {
        for f in &ALL_FLOWS {
            dp.insert_flow(f);
        }
        for f in &ALL_FLOWS {
            for len in (4..=40).step_by(4) {
                let options = router_alert_and_nops(len);
                let mut input = f.outbound();
                input.options = options.clone();
                let mut expected = f.outbound_translated();
                expected.options = options;
                check_wan_out_snat(dp, f, &input, &expected);
            }
        }
    });
}

#[test]
fn wan_out_snat_leaves_ethernet_padding_after_the_total_length_alone() {
    with_datapath(|dp| {
        for f in &ALL_FLOWS {
            dp.insert_flow(f);
        }
        for f in &ALL_FLOWS {
            let mut input = f.outbound().frame();
            let mut expected = f.outbound_translated().frame();
            for pad in [0x00, 0xa5, 0xff, 0x5a, 0x01, 0x80] {
                input.push(pad);
                expected.push(pad);
            }
            let what = format!("{} SNAT of a padded frame", f.name());
            let (run, counted) = dp.run_counted(PROG_WAN_OUT, &input, UPLINK_MARK);
            assert_passed_as(&run, &expected, &what);
            assert_eq!(counted, NOTHING, "{what}");
        }
    });
}

#[test]
fn wan_out_snat_translates_tcp_with_odd_flag_combinations_whole() {
    with_datapath(|dp| {
        dp.insert_flow(&TCP_FLOW);
        for flags in [TCP_SYN | TCP_FIN | TCP_RST, 0x00, 0xff, TCP_SYN | TCP_FIN] {
            let mut input = TCP_FLOW.outbound();
            if let Payload::Tcp(t) = &mut input.payload {
                t.flags = flags;
            }
            let expected = input.with_source(NAT_ADDR, TCP_FLOW.nat_port);
            check_wan_out_snat(dp, &TCP_FLOW, &input, &expected);
        }
    });
}

/// Marks that name no uplink of this datapath.
const FOREIGN_MARKS: [u32; 5] = [
    0,
    0x1234_0001,
    MARK_BASE,         // id -1
    MARK_BASE | 9,     // id 8: past the last uplink slot
    MARK_BASE | 0x101, // not the base
];

#[test]
fn wan_out_drops_forwarded_lan_sources_without_an_uplink_mark_as_foreign_source() {
    with_datapath(|dp| {
        for f in &ALL_FLOWS {
            dp.insert_flow(f);
        }
        let before = dp.flows();
        for mark in FOREIGN_MARKS {
            for f in &ALL_FLOWS {
                let input = f.outbound().frame();
                let what = format!("{} with mark {mark:#x}", f.name());
                let (run, counted) = dp.run_counted(PROG_WAN_OUT, &input, mark);
                assert_eq!(run.ret, TC_ACT_SHOT, "{what}: must not leave untranslated");
                assert_eq!(counted, [(Reason::ForeignSource, 1)], "{what}");
            }
        }
        assert_eq!(dp.flows(), before);
        assert_eq!(dp.uplink0_stats(), UplinkStats::default());
    });
}

#[test]
fn wan_out_passes_forwarded_packets_from_the_uplinks_own_address_without_a_mark() {
    with_datapath(|dp| {
        for mark in FOREIGN_MARKS {
            for f in &ALL_FLOWS {
                let input = f.outbound_translated().frame();
                let what = format!("{} from {NAT_ADDR}, mark {mark:#x}", f.name());
                let (run, counted) = dp.run_counted(PROG_WAN_OUT, &input, mark);
                assert_untouched(&run, &input, &what);
                assert_eq!(counted, NOTHING, "{what}");
            }
        }
        // The same packets leaving a device that is no uplink's.
        dp.set_uplink0_ifindex(4242);
        let input = TCP_FLOW.outbound_translated().frame();
        let (run, counted) = dp.run_counted(PROG_WAN_OUT, &input, 0);
        assert_eq!(run.ret, TC_ACT_SHOT, "uplink 0's address on another device");
        assert_eq!(counted, [(Reason::ForeignSource, 1)]);
    });
}

#[test]
fn wan_out_passes_what_the_fast_path_marked_translated_without_looking_at_it() {
    with_datapath(|dp| {
        let mark = MARK_BASE | MARK_TRANSLATED;
        for f in &ALL_FLOWS {
            // Even a LAN source: the mark says the LAN program did the work,
            // and the egress program must not pay to check it again.
            let input = f.outbound().frame();
            let what = format!("{} marked translated", f.name());
            let (run, counted) = dp.run_counted(PROG_WAN_OUT, &input, mark);
            assert_untouched(&run, &input, &what);
            assert_eq!(counted, NOTHING, "{what}");
        }
    });
}

#[test]
fn wan_out_passes_routed_prefix_sources_only_on_the_uplinks_that_route_them() {
    with_datapath(|dp| {
        let routed = Ipv4Addr::new(198, 18, 50, 9);
        let input = TCP_FLOW.outbound().with_source(routed, 40000).frame();
        // Routed by uplink 1 only: not on uplink 0's device.
        dp.set_routed(Ipv4Addr::new(198, 18, 50, 0), 24, 0b10);
        let (run, counted) = dp.run_counted(PROG_WAN_OUT, &input, 0);
        assert_eq!(run.ret, TC_ACT_SHOT, "routed by another uplink");
        assert_eq!(counted, [(Reason::ForeignSource, 1)]);
        // A longer prefix that uplink 0 routes too.
        dp.set_routed(Ipv4Addr::new(198, 18, 50, 8), 29, 0b11);
        let (run, counted) = dp.run_counted(PROG_WAN_OUT, &input, 0);
        assert_untouched(&run, &input, "routed by uplink 0");
        assert_eq!(counted, NOTHING);
        // Just outside it.
        let outside = TCP_FLOW
            .outbound()
            .with_source(Ipv4Addr::new(198, 18, 50, 16), 40000)
            .frame();
        let (run, counted) = dp.run_counted(PROG_WAN_OUT, &outside, 0);
        assert_eq!(run.ret, TC_ACT_SHOT, "outside the /29");
        assert_eq!(counted, [(Reason::ForeignSource, 1)]);
    });
}

#[test]
fn wan_out_drops_a_slow_path_packet_translated_for_an_uplink_on_another_device() {
    with_datapath(|dp| {
        dp.insert_flow(&TCP_FLOW);
        dp.set_uplink0_ifindex(4242);
        let input = TCP_FLOW.outbound().frame();
        let (run, counted) = dp.run_counted(PROG_WAN_OUT, &input, UPLINK_MARK);
        assert_eq!(
            run.ret, TC_ACT_SHOT,
            "uplink 0's flow leaving another device"
        );
        assert_eq!(counted, [(Reason::ForeignSource, 1)]);
    });
}

#[test]
fn wan_out_drops_the_gateways_own_packets_that_clash_with_a_nat_flow_and_passes_the_rest() {
    with_datapath(|dp| {
        dp.host_origin = true;
        // Echo has its own rule: the gateway's ping re-keys the LAN flow.
        let ported: Vec<&Flow> = ALL_FLOWS.iter().filter(|f| !f.echo()).collect();
        for f in &ported {
            dp.insert_flow(f);
        }
        let before = dp.flows();
        for f in &ported {
            // The gateway's own socket on the flow's NAT address and port.
            let input = f.outbound_translated().frame();
            let what = format!("host packet like {}", f.name());
            for mark in [0, UPLINK_MARK] {
                let (run, counted) = dp.run_counted(PROG_WAN_OUT, &input, mark);
                assert_eq!(run.ret, TC_ACT_SHOT, "{what} with mark {mark:#x}");
                assert_eq!(counted, [(Reason::HostPortClash, 1)], "{what}");
            }
            // Another port: no clash, untouched, even with an uplink mark.
            let other = f.outbound().with_source(NAT_ADDR, 20000).frame();
            let (run, counted) = dp.run_counted(PROG_WAN_OUT, &other, UPLINK_MARK);
            assert_untouched(&run, &other, &format!("{what} on another port"));
            assert_eq!(counted, NOTHING, "{what} on another port");
        }
        assert_eq!(dp.flows(), before, "the flows are left alone");
    });
}

#[test]
fn wan_out_drops_a_slow_path_packet_whose_flow_is_gone_and_counts_both_reasons() {
    with_datapath(|dp| {
        for f in &ALL_FLOWS {
            let input = f.outbound().frame();
            let what = format!("{} without a flow", f.name());
            let (run, counted) = dp.run_counted(PROG_WAN_OUT, &input, UPLINK_MARK);
            assert_eq!(run.ret, TC_ACT_SHOT, "{what}: must not leave untranslated");
            assert_eq!(
                counted,
                [(Reason::NoMapping, 1), (Reason::ForeignSource, 1)],
                "{what}"
            );
        }
        let flows = dp.flows();
        assert!(
            flows.fwd.is_empty() && flows.rev.is_empty(),
            "no flow created: {flows:?}"
        );
    });
}

#[test]
fn wan_out_rewrites_only_the_ip_source_of_a_non_first_fragment() {
    with_datapath(|dp| {
        for (frag, options) in [
            (185, 0),
            (IP_MF | 185, 0),
            (IP_MF | 1, 0),
            (0x1000, 0),
            (185, 12),
            (IP_MF | 370, 40),
        ] {
            // The second part of a UDP datagram: no L4 header, and bytes
            // that would look like the flow's ports if parsed as one.
            let mut data = Vec::new();
            data.extend_from_slice(&UDP_FLOW.lan_port.to_be_bytes());
            data.extend_from_slice(&UDP_FLOW.remote_port.to_be_bytes());
            data.extend((0..93u8).map(|i| i.wrapping_mul(37)));
            let mut input = Ipv4::new(
                LAN_HOST,
                REMOTE,
                Payload::Raw {
                    proto: IPPROTO_UDP,
                    bytes: data,
                },
            );
            input.frag = frag;
            input.ttl = 63;
            input.options = if options == 0 {
                Vec::new()
            } else {
                router_alert_and_nops(options)
            };
            let mut expected = input.clone();
            expected.src = NAT_ADDR;
            let what = format!("fragment {frag:#06x} with {options} option bytes");
            let (run, counted) = dp.run_counted(PROG_WAN_OUT, &input.frame(), UPLINK_MARK);
            assert_passed_as(&run, &expected.frame(), &what);
            assert_eq!(counted, NOTHING, "{what}");
        }
        assert!(dp.flows().fwd.is_empty(), "no flow created");
    });
}

// ---------------------------------------------------------------------------
// mh_wan_in: reverse translation of replies.

fn check_wan_in_reverse(dp: &mut Datapath, f: &Flow, input: &Ipv4, expected: &Ipv4) {
    let what = format!("{} reply on {PROG_WAN_IN}", f.name());
    let (input, expected) = (input.frame(), expected.frame());
    assert_ne!(input, expected, "{what}: test packets must differ");
    let (run, counted) = dp.run_counted(PROG_WAN_IN, &input, 0);
    assert_passed_as(&run, &expected, &what);
    assert_eq!(counted, NOTHING, "{what}: counted reasons");
    let fwd = dp
        .fwd_entry(f)
        .unwrap_or_else(|| panic!("{what}: the forward entry is gone"));
    assert_ne!(fwd.flags & FLOW_SEEN_REPLY, 0, "{what}: reply recorded");
    assert_ne!(fwd.last_seen_ns, 0, "{what}: last-seen refreshed");
}

#[test]
fn wan_in_reverse_translates_tcp_reply_byte_exact_without_ttl_change() {
    with_datapath(|dp| {
        dp.insert_flow(&TCP_FLOW);
        let f = TCP_FLOW;
        let expected = f.reply_translated();
        assert_eq!(expected.ttl, f.reply().ttl, "no hop: TTL as received");
        check_wan_in_reverse(dp, &f, &f.reply(), &expected);
        let s = dp.uplink0_stats();
        assert_eq!(s.rx_packets, 1, "rx counted: {s:?}");
        assert_eq!(dp.flows().rev.len(), 1, "the reverse entry stays");
    });
}

#[test]
fn wan_in_reverse_translates_tcp_reply_when_the_lan_port_was_kept() {
    with_datapath(|dp| {
        dp.insert_flow(&KEPT_PORT_FLOW);
        let f = KEPT_PORT_FLOW;
        check_wan_in_reverse(dp, &f, &f.reply(), &f.reply_translated());
    });
}

#[test]
fn wan_in_reverse_translates_udp_reply_and_checksum_byte_exact() {
    with_datapath(|dp| {
        dp.insert_flow(&UDP_FLOW);
        let f = UDP_FLOW;
        check_wan_in_reverse(dp, &f, &f.reply(), &f.reply_translated());
    });
}

#[test]
fn wan_in_reverse_translation_keeps_a_zero_udp_checksum_zero() {
    with_datapath(|dp| {
        dp.insert_flow(&UDP0_FLOW);
        let f = UDP0_FLOW;
        let expected = f.reply_translated();
        assert_eq!(u16_at(&expected.bytes(), 26), 0, "expectation");
        check_wan_in_reverse(dp, &f, &f.reply(), &expected);
    });
}

#[test]
fn wan_in_reverse_translation_sends_a_udp_checksum_that_computes_to_zero_as_ffff() {
    with_datapath(|dp| {
        dp.insert_flow(&UDP_FLOW);
        let f = UDP_FLOW;
        let mut input = f.reply();
        let mut expected = f.reply_translated();
        let payload = payload_making_udp_checksum_zero(&expected);
        set_udp_payload(&mut input, payload.clone());
        set_udp_payload(&mut expected, payload);
        assert_eq!(u16_at(&expected.bytes(), 26), 0xffff, "expectation");
        check_wan_in_reverse(dp, &f, &input, &expected);
    });
}

#[test]
fn wan_in_reverse_translates_icmp_echo_reply_identifier_and_checksum_byte_exact() {
    with_datapath(|dp| {
        dp.insert_flow(&ECHO_FLOW);
        let f = ECHO_FLOW;
        check_wan_in_reverse(dp, &f, &f.reply(), &f.reply_translated());
    });
}

#[test]
fn wan_in_reverse_translation_finds_the_l4_header_after_ip_options_of_every_length() {
    with_datapath(|dp| {
        for f in &ALL_FLOWS {
            dp.insert_flow(f);
        }
        for f in &ALL_FLOWS {
            for len in (4..=40).step_by(4) {
                let options = router_alert_and_nops(len);
                let mut input = f.reply();
                input.options = options.clone();
                let mut expected = f.reply_translated();
                expected.options = options;
                check_wan_in_reverse(dp, f, &input, &expected);
            }
        }
    });
}

#[test]
fn wan_in_reverse_translates_syn_fin_rst_reply_whole_and_records_its_flags() {
    with_datapath(|dp| {
        dp.insert_flow(&TCP_FLOW);
        let mut input = TCP_FLOW.reply();
        if let Payload::Tcp(t) = &mut input.payload {
            t.flags = TCP_SYN | TCP_FIN | TCP_RST;
        }
        let expected = input.with_destination(LAN_HOST, TCP_FLOW.lan_port);
        check_wan_in_reverse(dp, &TCP_FLOW, &input, &expected);
        let fwd = dp.fwd_entry(&TCP_FLOW).expect("flow");
        assert_eq!(fwd.flags, FLOW_SEEN_REPLY | FLOW_FIN_IN | FLOW_RST_IN);
    });
}

#[test]
fn an_rst_from_outside_only_arms_the_close_and_a_later_packet_either_way_disarms_it() {
    with_datapath(|dp| {
        dp.insert_flow(&TCP_FLOW);
        let rst = with_tcp_flags(TCP_FLOW.reply(), TCP_RST);
        let ack_in = with_tcp_flags(TCP_FLOW.reply(), TCP_ACK);
        let ack_out = with_tcp_flags(TCP_FLOW.outbound(), TCP_ACK);
        let flags = |dp: &Datapath| dp.fwd_entry(&TCP_FLOW).expect("flow").flags;
        for (later, prog, what) in [
            (&ack_in, PROG_WAN_IN, "a reply"),
            (&ack_out, PROG_LAN_IN, "a LAN packet"),
        ] {
            let (run, _) = dp.run_counted(PROG_WAN_IN, &rst, 0);
            assert_ne!(
                run.ret, TC_ACT_SHOT,
                "the RST is forwarded: the endpoint decides"
            );
            assert_ne!(flags(dp) & FLOW_RST_IN, 0, "armed by the RST");
            let (_, counted) = dp.run_counted(prog, later, 0);
            assert!(
                counted.contains(&(Reason::RstIgnored, 1)),
                "{what}: {counted:?}"
            );
            assert_eq!(flags(dp) & (FLOW_RST_IN | FLOW_RST), 0, "{what} disarms it");
        }
        // A second RST does not disarm the first.
        dp.run_counted(PROG_WAN_IN, &rst, 0);
        let (_, counted) = dp.run_counted(PROG_WAN_IN, &rst, 0);
        assert!(!counted.iter().any(|(r, _)| *r == Reason::RstIgnored));
        assert_ne!(flags(dp) & FLOW_RST_IN, 0);
    });
}

#[test]
fn a_lan_syn_on_a_closed_tcp_flows_tuple_makes_the_flow_anew_and_other_segments_keep_it() {
    with_datapath(|dp| {
        let with_flags = |flags: u8| with_tcp_flags(TCP_FLOW.outbound(), flags);
        for closed in [
            FLOW_FIN_OUT | FLOW_FIN_IN,
            FLOW_RST,
            FLOW_RST_IN,
            FLOW_FIN_OUT,
        ] {
            for (flags, remade) in [
                (TCP_ACK, false),
                (TCP_SYN | TCP_ACK, false),
                (TCP_SYN, true),
            ] {
                dp.insert_flow(&TCP_FLOW);
                let fwd = FlowFwd {
                    flags: FLOW_SEEN_REPLY | closed,
                    ..TCP_FLOW.fwd()
                };
                dp.set_fwd(TCP_FLOW.fwd_key(), fwd);
                let (_, counted) = dp.run_counted(PROG_LAN_IN, &with_flags(flags), 0);
                let what = format!("TCP flags {flags:#x} on a flow with {closed:#x}");
                // Made anew, it would need a route, which this namespace lacks.
                assert_eq!(
                    counted.contains(&(Reason::NotForUplink, 1)),
                    remade,
                    "{what}: {counted:?}"
                );
                assert_eq!(dp.fwd_entry(&TCP_FLOW).is_none(), remade, "{what}");
                assert_eq!(dp.flows().rev.is_empty(), remade, "{what}: both halves");
            }
        }
        // A live flow keeps its mapping whatever the LAN host sends.
        dp.insert_flow(&TCP_FLOW);
        let (_, counted) = dp.run_counted(PROG_LAN_IN, &with_flags(TCP_SYN), 0);
        assert!(dp.fwd_entry(&TCP_FLOW).is_some(), "{counted:?}");
    });
}

#[test]
fn a_syn_sent_again_on_an_unanswered_flow_counts_as_a_retry_and_never_once_answered() {
    with_datapath(|dp| {
        let syn = with_tcp_flags(TCP_FLOW.outbound(), TCP_SYN);
        // Not answered yet: its flags are 0.
        dp.insert_flow(&TCP_FLOW);
        dp.run(PROG_LAN_IN, &syn, 0);
        dp.run(PROG_LAN_IN, &syn, 0);
        assert_eq!(dp.uplink0_stats().syn_retries, 2);
        // Answered: a SYN now is no retry (nor, on an open flow, a new
        // connection).
        dp.set_fwd(
            TCP_FLOW.fwd_key(),
            FlowFwd {
                flags: FLOW_SEEN_REPLY,
                ..TCP_FLOW.fwd()
            },
        );
        dp.run(PROG_LAN_IN, &syn, 0);
        dp.run(PROG_LAN_IN, &TCP_FLOW.outbound().frame(), 0);
        assert_eq!(dp.uplink0_stats().syn_retries, 2);
    });
}

#[test]
fn a_lan_data_segment_with_no_new_byte_counts_as_a_retransmission_and_leaves_its_remote_waiting() {
    with_datapath(|dp| {
        let seg = |seq: u32, payload: &[u8]| {
            let mut p = TCP_FLOW.outbound();
            if let Payload::Tcp(t) = &mut p.payload {
                (t.seq, t.payload) = (seq, payload.to_vec());
            }
            p.frame()
        };
        let data = [7u8; 100];
        let snd_max = |dp: &Datapath| dp.fwd_entry(&TCP_FLOW).expect("flow").snd_max;
        let resent = |dp: &Datapath| dp.uplink0_stats().retransmits;
        dp.insert_flow(&TCP_FLOW);
        dp.run(PROG_LAN_IN, &seg(1000, &data), 0);
        assert_eq!((snd_max(dp), resent(dp)), (1100, 0), "new data");
        dp.run(PROG_LAN_IN, &seg(1100, &data), 0);
        assert_eq!((snd_max(dp), resent(dp)), (1200, 0), "the next segment");
        // Partly new data is not a retransmission.
        dp.run(PROG_LAN_IN, &seg(1150, &data), 0);
        assert_eq!((snd_max(dp), resent(dp)), (1250, 0));
        // Pure ACKs, keepalives and window probes carry under two bytes.
        dp.run(PROG_LAN_IN, &seg(1000, b""), 0);
        dp.run(PROG_LAN_IN, &seg(1249, b"k"), 0);
        assert_eq!(resent(dp), 0);
        // The first segment, sent again.
        dp.run(PROG_LAN_IN, &seg(1000, &data), 0);
        dp.run(PROG_LAN_IN, &seg(1150, &data), 0);
        assert_eq!((snd_max(dp), resent(dp)), (1250, 2));
        let wait = SynWaitKey {
            daddr_be: TCP_FLOW.fwd_key().daddr_be,
            uplink: 0,
            kind: WAIT_RETRANSMIT,
            _pad1: 0,
        };
        let waiting: HashMap<_, SynWaitKey, u64> =
            HashMap::try_from(dp.ebpf.map(MAP_SYN_WAIT).expect("SYN_WAIT")).expect("types");
        assert!(waiting.get(&wait, 0).is_ok(), "the remote waits");
        // Sequence numbers wrap.
        dp.set_fwd(
            TCP_FLOW.fwd_key(),
            FlowFwd {
                snd_max: u32::MAX - 10,
                ..TCP_FLOW.fwd()
            },
        );
        dp.run(PROG_LAN_IN, &seg(u32::MAX - 10, &data), 0);
        assert_eq!((snd_max(dp), resent(dp)), (89, 2), "new past the wrap");
        dp.run(PROG_LAN_IN, &seg(u32::MAX - 50, &data), 0);
        assert_eq!((snd_max(dp), resent(dp)), (89, 3), "old across the wrap");
        // UDP has no sequence.
        dp.insert_flow(&UDP_FLOW);
        dp.run(PROG_LAN_IN, &UDP_FLOW.outbound().frame(), 0);
        dp.run(PROG_LAN_IN, &UDP_FLOW.outbound().frame(), 0);
        assert_eq!(resent(dp), 3);
        // A hairpin flow never leaves by its uplink.
        dp.set_fwd(
            TCP_FLOW.fwd_key(),
            FlowFwd {
                flags: FLOW_HAIRPIN,
                snd_max: 1100,
                ..TCP_FLOW.fwd()
            },
        );
        dp.run(PROG_LAN_IN, &seg(1000, &data), 0);
        assert_eq!(resent(dp), 3, "a hairpin flow's data sent again");
    });
}

#[test]
fn a_flows_first_reply_that_is_a_syn_ack_is_counted_once_and_its_remote_stops_waiting() {
    with_datapath(|dp| {
        let reply = |flags: u8| with_tcp_flags(TCP_FLOW.reply(), flags);
        let wait = SynWaitKey {
            daddr_be: TCP_FLOW.fwd_key().daddr_be,
            uplink: 0,
            kind: WAIT_SYN,
            _pad1: 0,
        };
        let mut waiting: HashMap<_, SynWaitKey, u64> =
            HashMap::try_from(dp.ebpf.map_mut(MAP_SYN_WAIT).expect("SYN_WAIT")).expect("types");
        waiting.insert(wait, 1, 0).expect("a remote waited on");
        // Not answered yet: its flags are 0.
        dp.insert_flow(&TCP_FLOW);
        dp.run(PROG_WAN_IN, &reply(TCP_SYN | TCP_ACK), 0);
        dp.run(PROG_WAN_IN, &reply(TCP_ACK), 0);
        let s = dp.uplink0_stats();
        assert_eq!(s.synacks, 1, "{s:?}");
        let waiting: HashMap<_, SynWaitKey, u64> =
            HashMap::try_from(dp.ebpf.map(MAP_SYN_WAIT).expect("SYN_WAIT")).expect("types");
        assert!(waiting.get(&wait, 0).is_err(), "the remote answered");

        // A first reply that is not a SYN-ACK (UDP, or TCP picked up mid
        // stream) says nothing of SYNs.
        dp.insert_flow(&UDP_FLOW);
        dp.run(PROG_WAN_IN, &UDP_FLOW.reply().frame(), 0);
        assert_eq!(dp.uplink0_stats().synacks, 1);
    });
}

#[test]
fn a_reply_whose_reverse_entry_points_at_a_flow_with_another_mapping_passes_and_removes_it() {
    with_datapath(|dp| {
        for f in &[TCP_FLOW, UDP_FLOW, ECHO_FLOW] {
            dp.insert_rev(f);
            // The forward half now holds another NAT port.
            let moved = Flow {
                nat_port: f.nat_port + 100,
                ..*f
            };
            dp.insert_fwd(&moved);
            let input = f.reply().frame();
            let what = format!("{} reply to a stale reverse entry", f.name());
            let (run, counted) = dp.run_counted(PROG_WAN_IN, &input, 0);
            assert_untouched(&run, &input, &what);
            assert_eq!(counted, [(Reason::StaleReverse, 1)], "{what}");
            let flows = dp.flows();
            assert!(flows.rev.is_empty(), "{what}: stale entry removed");
            assert_eq!(flows.fwd.len(), 1, "{what}: the flow itself stays");
            let mut fwd: HashMap<_, FlowKey, FlowFwd> =
                HashMap::try_from(dp.ebpf.map_mut(MAP_CONN_FWD).expect("CONN_FWD")).expect("types");
            fwd.remove(&f.fwd_key()).expect("remove");
        }
    });
}

#[test]
fn a_flow_whose_nat_address_is_no_longer_its_uplinks_is_removed_by_its_next_packet() {
    with_datapath(|dp| {
        for f in &ALL_FLOWS {
            dp.insert_flow(f);
            let old = FlowFwd {
                nat_addr_be: be(Ipv4Addr::new(198, 18, 11, 99)),
                ..f.fwd()
            };
            dp.set_fwd(f.fwd_key(), old);
            let input = f.outbound().frame();
            let what = format!("{} on a renumbered uplink", f.name());
            // The slow path never sends the old address.
            let (run, counted) = dp.run_counted(PROG_WAN_OUT, &input, UPLINK_MARK);
            assert_eq!(run.ret, TC_ACT_SHOT, "{what}");
            assert_eq!(
                counted,
                [(Reason::ForeignSource, 1), (Reason::StaleAddress, 1)],
                "{what}"
            );
            // The LAN program removes it; its remake needs a route, which
            // this namespace lacks.
            let (run, counted) = dp.run_counted(PROG_LAN_IN, &input, 0);
            assert_untouched(&run, &input, &what);
            assert_eq!(
                counted,
                [(Reason::NotForUplink, 1), (Reason::StaleAddress, 1)],
                "{what}"
            );
            let flows = dp.flows();
            assert!(flows.fwd.is_empty(), "{what}: {flows:?}");
        }
    });
}

#[test]
fn a_flow_of_an_uplink_that_went_down_moves_on_its_next_packet_by_protocol() {
    with_datapath(|dp| {
        let set_flags = |dp: &mut Datapath, flags: u16| {
            let mut uplinks: Array<_, Uplink> =
                Array::try_from(dp.ebpf.map_mut(MAP_UPLINKS).expect("UPLINKS")).expect("types");
            let mut u = uplinks.get(&0, 0).expect("slot 0");
            u.flags = UPLINK_CONFIGURED | flags;
            uplinks.set(0, u, 0).expect("write");
        };
        // purge-udp: UDP moves, TCP stays.
        set_flags(dp, UPLINK_OUTAGE | UPLINK_EVACUATE);
        for (f, moves) in [(&UDP_FLOW, true), (&ECHO_FLOW, true), (&TCP_FLOW, false)] {
            dp.insert_flow(f);
            let (_, counted) = dp.run_counted(PROG_LAN_IN, &f.outbound().frame(), 0);
            assert_eq!(
                counted.contains(&(Reason::Evacuated, 1)),
                moves,
                "{}: {counted:?}",
                f.name()
            );
            assert_eq!(dp.fwd_entry(f).is_none(), moves, "{}", f.name());
        }
        // purge: TCP too.
        set_flags(dp, UPLINK_OUTAGE | UPLINK_EVACUATE | UPLINK_EVACUATE_TCP);
        let (_, counted) = dp.run_counted(PROG_LAN_IN, &TCP_FLOW.outbound().frame(), 0);
        assert!(counted.contains(&(Reason::Evacuated, 1)), "{counted:?}");
        assert!(dp.fwd_entry(&TCP_FLOW).is_none());
    });
}

/// `bpf_redirect`'s verdict.
const TC_ACT_REDIRECT: u32 = 7;

/// The RST the remote would answer `input` (a segment of `f`) with, as
/// RFC 9293 §3.10.7.1 builds it, built independently: back to the LAN host
/// from the remote, payload and all.
fn rst_for(f: &Flow, input: &Ipv4) -> Vec<u8> {
    let Payload::Tcp(t) = &input.payload else {
        panic!("not TCP")
    };
    let (seq, ack, flags) = if t.flags & TCP_ACK != 0 {
        (t.ack, 0, TCP_RST)
    } else {
        let len = t.payload.len() as u32 + u32::from(t.flags & TCP_SYN != 0);
        (0, t.seq.wrapping_add(len), TCP_RST | TCP_ACK)
    };
    let mut out = Ipv4::tcp(
        REMOTE,
        LAN_HOST,
        Tcp {
            seq,
            ack,
            flags,
            window: 0,
            ..Tcp::new(f.remote_port, f.lan_port, flags, &t.payload)
        },
    );
    out.id = input.id;
    out.ttl = 64;
    if let Payload::Tcp(o) = &mut out.payload {
        o.options = t.options.clone();
    }
    ethernet(MAC_A, MAC_GW, ETH_P_IP, &out.bytes())
}

#[test]
fn a_tcp_segment_of_an_answered_flow_on_a_down_uplink_is_answered_with_the_remotes_rst() {
    with_datapath(|dp| {
        let mut uplinks: Array<_, Uplink> =
            Array::try_from(dp.ebpf.map_mut(MAP_UPLINKS).expect("UPLINKS")).expect("types");
        let mut u = uplinks.get(&0, 0).expect("slot 0");
        u.flags = UPLINK_CONFIGURED | UPLINK_OUTAGE | UPLINK_EVACUATE | UPLINK_RESET_TCP;
        uplinks.set(0, u, 0).expect("write");
        let answered = FlowFwd {
            flags: FLOW_SEEN_REPLY,
            ..TCP_FLOW.fwd()
        };
        // With and without ACK, with options, TTL as the host sent it.
        let mut plain = TCP_FLOW.outbound();
        plain.ttl = 63;
        let mut no_ack = plain.clone();
        let mut with_options = plain.clone();
        if let Payload::Tcp(t) = &mut no_ack.payload {
            t.flags = TCP_PSH;
            t.ack = 0;
        }
        if let Payload::Tcp(t) = &mut with_options.payload {
            t.options = vec![1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2];
        }
        for (input, what) in [
            (&plain, "ACK|PSH"),
            (&no_ack, "PSH without ACK"),
            (&with_options, "with timestamps"),
        ] {
            dp.insert_rev(&TCP_FLOW);
            dp.set_fwd(TCP_FLOW.fwd_key(), answered);
            let (run, counted) = dp.run_counted(PROG_LAN_IN, &input.frame(), 0);
            assert_eq!(run.ret, TC_ACT_REDIRECT, "{what}: sent back");
            let expected = rst_for(&TCP_FLOW, input);
            assert!(
                run.out == expected,
                "{what}: not the remote's RST\n{}",
                describe_difference(&expected, &run.out)
            );
            assert_eq!(counted, [(Reason::TcpReset, 1)], "{what}");
            let flows = dp.flows();
            assert!(
                flows.fwd.is_empty() && flows.rev.is_empty(),
                "{what}: removed"
            );
        }
        // A flow that never saw a reply (a SYN being retried) moves instead.
        dp.insert_flow(&TCP_FLOW);
        let (_, counted) = dp.run_counted(PROG_LAN_IN, &plain.frame(), 0);
        assert!(counted.contains(&(Reason::Evacuated, 1)), "{counted:?}");
    });
}

#[test]
fn a_flow_of_an_uplink_without_an_address_is_kept() {
    with_datapath(|dp| {
        dp.insert_flow(&UDP_FLOW);
        let mut uplinks: Array<_, Uplink> =
            Array::try_from(dp.ebpf.map_mut(MAP_UPLINKS).expect("UPLINKS")).expect("types");
        let mut u = uplinks.get(&0, 0).expect("slot 0");
        u.addr_be = 0;
        uplinks.set(0, u, 0).expect("write");
        let input = UDP_FLOW.outbound().frame();
        let (_, counted) = dp.run_counted(PROG_LAN_IN, &input, 0);
        assert!(!counted.iter().any(|(r, _)| *r == Reason::StaleAddress));
        assert!(
            dp.fwd_entry(&UDP_FLOW).is_some(),
            "a redialling uplink keeps its flows"
        );
    });
}

#[test]
fn wan_in_reply_without_mapping_passes_byte_identical_and_counts_no_mapping() {
    with_datapath(|dp| {
        // Another flow exists, so the maps are not empty.
        dp.insert_flow(&KEPT_PORT_FLOW);
        let before = dp.flows();
        for f in &[TCP_FLOW, UDP_FLOW, UDP0_FLOW, ECHO_FLOW] {
            let input = f.reply().frame();
            let what = format!("{} reply without a flow", f.name());
            let (run, counted) = dp.run_counted(PROG_WAN_IN, &input, 0);
            assert_untouched(&run, &input, &what);
            assert_eq!(counted, [(Reason::NoMapping, 1)], "{what}");
        }
        assert_eq!(dp.flows(), before);
    });
}

#[test]
fn wan_in_reply_whose_forward_half_is_missing_passes_untouched_and_removes_the_reverse_entry() {
    with_datapath(|dp| {
        for f in &[TCP_FLOW, UDP_FLOW, ECHO_FLOW] {
            dp.insert_rev(f);
            let input = f.reply().frame();
            let what = format!("{} reply of a half flow", f.name());
            let (run, counted) = dp.run_counted(PROG_WAN_IN, &input, 0);
            assert_untouched(&run, &input, &what);
            assert_eq!(
                counted,
                [(Reason::NoMapping, 1), (Reason::HalfPair, 1)],
                "{what}"
            );
            let flows = dp.flows();
            assert!(flows.rev.is_empty(), "{what}: orphan reverse entry removed");
            assert!(flows.fwd.is_empty(), "{what}: nothing created");
        }
    });
}

// ---------------------------------------------------------------------------
// ICMP errors.

/// Every error the uplink may bring: (type, code, second header word, name).
const ICMP_ERRORS: [(u8, u8, [u8; 4], &str); 6] = [
    (ICMP_DEST_UNREACH, 0, [0; 4], "net unreachable"),
    (ICMP_DEST_UNREACH, 1, [0; 4], "host unreachable"),
    (ICMP_DEST_UNREACH, 3, [0; 4], "port unreachable"),
    (
        ICMP_DEST_UNREACH,
        4,
        [0, 0, 0x05, 0x78],
        "fragmentation needed, next-hop MTU 1400",
    ),
    (ICMP_TIME_EXCEEDED, 0, [0; 4], "TTL exceeded in transit"),
    (
        ICMP_PARAMETER_PROB,
        0,
        [20, 0, 0, 0],
        "parameter problem, pointer 20",
    ),
];

/// The packet as the gateway sent it out the uplink (after SNAT, one hop
/// fewer).
fn as_sent_by_gateway(f: &Flow) -> Ipv4 {
    let mut p = f.outbound_translated();
    p.ttl = 63;
    p
}

/// Sends every ICMP error type about `sent` (quoting `quote` bytes of it,
/// all if `None`) to `mh_wan_in` and checks the exact translation: outer
/// destination, quoted source address and port, quoted IP and transport
/// checksums, ICMP checksum and outer IP checksum, all as if built from
/// scratch; no reason counted; the maps untouched.
fn check_wan_in_errors(
    dp: &mut Datapath,
    f: &Flow,
    sent: &Ipv4,
    quote: Option<usize>,
    outer_options: usize,
) {
    let as_lan_sent = sent.with_source(LAN_HOST, f.lan_port);
    let (nat_bytes, lan_bytes) = (sent.bytes(), as_lan_sent.bytes());
    let n = quote.unwrap_or(nat_bytes.len()).min(nat_bytes.len());
    let mut want = lan_bytes[..n].to_vec();
    // A transport checksum the quote cuts in half cannot be adjusted and
    // stays as quoted (so does Linux's NAT, which needs the whole header).
    let csum = sent.header_len()
        + match sent.proto() {
            IPPROTO_TCP => 16,
            IPPROTO_UDP => 6,
            _ => 2,
        };
    if n == csum + 1 {
        want[csum] = nat_bytes[csum];
    }
    for (kind, code, rest, name) in ICMP_ERRORS {
        let what = format!(
            "{name} about {} quoting {n} of {} bytes",
            f.name(),
            nat_bytes.len()
        );
        let mut input = Ipv4::icmp(
            ROUTER,
            NAT_ADDR,
            Icmp::error(kind, code, rest, &nat_bytes[..n]),
        );
        input.ttl = 60;
        input.frag = 0;
        if outer_options != 0 {
            input.options = router_alert_and_nops(outer_options);
        }
        let mut expected = input.clone();
        expected.dst = LAN_HOST;
        expected.payload = Payload::Icmp(Icmp::error(kind, code, rest, &want));
        let before = dp.flows();
        let (run, counted) = dp.run_counted(PROG_WAN_IN, &input.frame(), 0);
        assert_passed_as(&run, &expected.frame(), &what);
        assert_eq!(counted, NOTHING, "{what}: counted reasons");
        assert_eq!(dp.flows(), before, "{what}: errors never touch flows");
    }
}

#[test]
fn wan_in_icmp_errors_about_a_tcp_flow_translate_the_whole_quoted_segment_for_every_type() {
    with_datapath(|dp| {
        dp.insert_flow(&TCP_FLOW);
        dp.insert_flow(&KEPT_PORT_FLOW);
        for f in [TCP_FLOW, KEPT_PORT_FLOW] {
            check_wan_in_errors(dp, &f, &as_sent_by_gateway(&f), None, 0);
            // Header and checksum quoted, payload cut.
            check_wan_in_errors(dp, &f, &as_sent_by_gateway(&f), Some(20 + 20), 0);
            check_wan_in_errors(dp, &f, &as_sent_by_gateway(&f), Some(20 + 18), 0);
        }
    });
}

#[test]
fn wan_in_icmp_errors_quoting_8_tcp_bytes_translate_the_ports_without_a_checksum() {
    with_datapath(|dp| {
        dp.insert_flow(&TCP_FLOW);
        // RFC 792's minimum quote: the checksum (at offset 16) is not there;
        // also 17 bytes: half of it.
        check_wan_in_errors(dp, &TCP_FLOW, &as_sent_by_gateway(&TCP_FLOW), Some(28), 0);
        check_wan_in_errors(dp, &TCP_FLOW, &as_sent_by_gateway(&TCP_FLOW), Some(37), 0);
    });
}

#[test]
fn wan_in_icmp_errors_about_a_udp_flow_fix_the_quoted_udp_checksum_for_every_type() {
    with_datapath(|dp| {
        dp.insert_flow(&UDP_FLOW);
        let sent = as_sent_by_gateway(&UDP_FLOW);
        check_wan_in_errors(dp, &UDP_FLOW, &sent, Some(28), 0);
        check_wan_in_errors(dp, &UDP_FLOW, &sent, None, 0);
    });
}

#[test]
fn wan_in_icmp_errors_about_a_udp_flow_keep_a_quoted_zero_udp_checksum_for_every_type() {
    with_datapath(|dp| {
        dp.insert_flow(&UDP0_FLOW);
        let sent = as_sent_by_gateway(&UDP0_FLOW);
        assert_eq!(u16_at(&sent.bytes(), 26), 0, "expectation");
        check_wan_in_errors(dp, &UDP0_FLOW, &sent, Some(28), 0);
        check_wan_in_errors(dp, &UDP0_FLOW, &sent, None, 0);
    });
}

#[test]
fn wan_in_icmp_errors_about_an_echo_request_translate_the_identifier_for_every_type() {
    with_datapath(|dp| {
        dp.insert_flow(&ECHO_FLOW);
        let sent = as_sent_by_gateway(&ECHO_FLOW);
        check_wan_in_errors(dp, &ECHO_FLOW, &sent, Some(28), 0);
        check_wan_in_errors(dp, &ECHO_FLOW, &sent, None, 0);
    });
}

#[test]
fn wan_in_icmp_errors_with_ip_options_outside_and_inside_are_translated_byte_exact() {
    with_datapath(|dp| {
        for f in &ALL_FLOWS {
            dp.insert_flow(f);
        }
        for f in &ALL_FLOWS {
            let mut sent = as_sent_by_gateway(f);
            sent.options = router_alert_and_nops(12);
            check_wan_in_errors(dp, f, &sent, None, 8);
            check_wan_in_errors(dp, f, &sent, Some(32 + 8), 40);
        }
    });
}

#[test]
fn wan_in_icmp_error_matching_no_flow_passes_byte_identical_and_counts_icmp_no_mapping() {
    with_datapath(|dp| {
        dp.insert_flow(&TCP_FLOW);
        let before = dp.flows();
        let mut cases: Vec<(String, Ipv4)> = Vec::new();
        for f in [UDP_FLOW, ECHO_FLOW, KEPT_PORT_FLOW] {
            cases.push((
                format!("about {} (no such flow)", f.name()),
                as_sent_by_gateway(&f),
            ));
        }
        let mut other_port = as_sent_by_gateway(&TCP_FLOW);
        other_port.set_sport(TCP_FLOW.nat_port + 1);
        cases.push(("about another NAT port".into(), other_port));
        let mut other_remote = as_sent_by_gateway(&TCP_FLOW);
        other_remote.dst = Ipv4Addr::new(198, 19, 0, 99);
        cases.push(("about another remote".into(), other_remote));
        // The quoted source is not the address the error was sent to.
        let mut not_ours = as_sent_by_gateway(&TCP_FLOW);
        not_ours.src = Ipv4Addr::new(198, 18, 11, 2);
        cases.push(("quoting another source".into(), not_ours));
        cases.push((
            "quoting GRE".into(),
            Ipv4::new(
                NAT_ADDR,
                REMOTE,
                Payload::Raw {
                    proto: IPPROTO_GRE,
                    bytes: vec![0; 8],
                },
            ),
        ));
        let mut ts = Ipv4::icmp(
            NAT_ADDR,
            REMOTE,
            Icmp::echo_request(TCP_FLOW.nat_port, 1, b""),
        );
        if let Payload::Icmp(i) = &mut ts.payload {
            i.kind = ICMP_TIMESTAMP;
        }
        cases.push(("quoting an ICMP timestamp".into(), ts));
        for (name, quoted) in cases {
            for (kind, code, rest, error) in ICMP_ERRORS {
                let what = format!("{error} {name}");
                let input = Ipv4::icmp(
                    ROUTER,
                    NAT_ADDR,
                    Icmp::error(kind, code, rest, &quoted.bytes()[..28]),
                )
                .frame();
                let (run, counted) = dp.run_counted(PROG_WAN_IN, &input, 0);
                assert_untouched(&run, &input, &what);
                assert_eq!(counted, [(Reason::IcmpNoMapping, 1)], "{what}");
            }
        }
        assert_eq!(dp.flows(), before, "errors never touch flows");
    });
}

#[test]
fn lan_host_icmp_error_about_a_reply_takes_the_slow_path_and_wan_out_translates_it_byte_exact() {
    with_datapath(|dp| {
        for f in &ALL_FLOWS {
            dp.insert_flow(f);
        }
        let before = dp.flows();
        // Echo flows are not translated this way (no LAN-side key).
        for f in [TCP_FLOW, UDP_FLOW, UDP0_FLOW, KEPT_PORT_FLOW] {
            // The reply as the remote sent it, and as the LAN host got it.
            let mut remote_sent = f.reply();
            remote_sent.ttl = 56;
            let lan_got = remote_sent.with_destination(LAN_HOST, f.lan_port);
            for quote in [28, lan_got.bytes().len()] {
                let what = format!("port unreachable from the LAN about a {} reply", f.name());
                let input = Ipv4::icmp(
                    LAN_HOST,
                    REMOTE,
                    Icmp::error(ICMP_DEST_UNREACH, 3, [0; 4], &lan_got.bytes()[..quote]),
                );
                let mut expected = input.clone();
                expected.src = NAT_ADDR;
                expected.payload = Payload::Icmp(Icmp::error(
                    ICMP_DEST_UNREACH,
                    3,
                    [0; 4],
                    &remote_sent.bytes()[..quote],
                ));
                let input = input.frame();
                let (run, counted) = dp.run_counted(PROG_LAN_IN, &input, 0);
                assert_untouched(&run, &input, &format!("{what} on {PROG_LAN_IN}"));
                assert_eq!(run.mark, UPLINK_MARK, "{what}: the flow's uplink mark");
                assert_eq!(counted, [(Reason::SlowPath, 1)], "{what}");
                let (run, counted) = dp.run_counted(PROG_WAN_OUT, &run.out, run.mark);
                assert_passed_as(
                    &run,
                    &expected.frame(),
                    &format!("{what} on {PROG_WAN_OUT}"),
                );
                assert_eq!(counted, NOTHING, "{what}");
            }
        }
        assert_eq!(dp.flows(), before, "errors never touch flows");
    });
}

// ---------------------------------------------------------------------------
// mh_lan_in.

#[test]
fn lan_in_spoofed_source_passes_untouched_counts_spoofed_source_and_creates_no_flow() {
    with_datapath(|dp| {
        for f in &ALL_FLOWS {
            let mut p = f.outbound();
            p.src = OUTSIDER;
            let input = p.frame();
            let what = format!("{} from {OUTSIDER}", f.name());
            let (run, counted) = dp.run_counted(PROG_LAN_IN, &input, 0);
            assert_untouched(&run, &input, &what);
            assert_eq!(counted, [(Reason::SpoofedSource, 1)], "{what}");
            assert_eq!(run.mark, 0, "{what}: no mark");
        }
        let flows = dp.flows();
        assert_eq!(
            (flows.fwd.len(), flows.rev.len()),
            (0, 0),
            "no flow created"
        );
        assert_eq!(dp.uplink0_stats(), UplinkStats::default());
    });
}

#[test]
fn lan_in_never_makes_a_flow_for_multicast_broadcast_reserved_or_other_host_traffic() {
    with_datapath(|dp| {
        let for_gw = |dst: Ipv4Addr| TCP_FLOW.outbound().with_destination(dst, 443).frame();
        let mut frames: Vec<(String, Vec<u8>)> = [
            Ipv4Addr::new(224, 0, 0, 251),
            Ipv4Addr::new(239, 255, 255, 250),
            Ipv4Addr::BROADCAST,
            Ipv4Addr::new(240, 0, 0, 1),
            Ipv4Addr::new(0, 1, 2, 3),
            Ipv4Addr::new(127, 0, 0, 1),
            Ipv4Addr::new(169, 254, 1, 1),
        ]
        .into_iter()
        .map(|d| (format!("to {d}"), for_gw(d)))
        .collect();
        // A unicast destination, but a frame for another host's MAC, or
        // for the broadcast MAC.
        for (mac, name) in [(MAC_B, "another host's MAC"), ([0xff; 6], "broadcast MAC")] {
            let mut f = TCP_FLOW.outbound().frame();
            f[..6].copy_from_slice(&mac);
            frames.push((format!("to {name}"), f));
        }
        for (what, input) in &frames {
            let (run, counted) = dp.run_counted(PROG_LAN_IN, input, 0);
            assert_untouched(&run, input, what);
            assert_eq!(counted, [(Reason::NotUnicast, 1)], "{what}");
        }
        let flows = dp.flows();
        assert!(flows.fwd.is_empty() && flows.rev.is_empty(), "{flows:?}");
    });
}

#[test]
fn lan_in_leaves_routed_prefix_sources_to_the_kernel_untranslated() {
    with_datapath(|dp| {
        // Inside a LAN prefix too: the routed prefix wins.
        dp.set_routed(Ipv4Addr::new(198, 18, 1, 0), 25, 0b01);
        for f in &ALL_FLOWS {
            let input = f.outbound().frame();
            let what = format!("new {} from a routed prefix", f.name());
            let (run, counted) = dp.run_counted(PROG_LAN_IN, &input, 0);
            assert_untouched(&run, &input, &what);
            assert_eq!(counted, [(Reason::RoutedSource, 1)], "{what}");
            assert_eq!(run.mark, 0, "{what}: no mark");
        }
        assert!(dp.flows().fwd.is_empty());
    });
}

#[test]
fn lan_in_new_flow_without_a_route_passes_untouched_and_creates_no_flow() {
    with_datapath(|dp| {
        for f in &ALL_FLOWS {
            let input = f.outbound().frame();
            let what = format!("new {} in an empty namespace", f.name());
            let (run, counted) = dp.run_counted(PROG_LAN_IN, &input, 0);
            assert_untouched(&run, &input, &what);
            assert_eq!(counted, [(Reason::NotForUplink, 1)], "{what}");
            assert_eq!(run.mark, 0, "{what}: no mark");
        }
        let flows = dp.flows();
        assert_eq!(
            (flows.fwd.len(), flows.rev.len()),
            (0, 0),
            "no flow created"
        );
    });
}

#[test]
fn lan_in_pinned_flow_without_a_route_takes_the_slow_path_and_wan_out_snats_it_byte_exact() {
    with_datapath(|dp| {
        for f in &ALL_FLOWS {
            dp.insert_flow(f);
        }
        for f in &ALL_FLOWS {
            for options in [0, 4, 40] {
                let mut p = f.outbound();
                let mut expected = f.outbound_translated();
                if options != 0 {
                    p.options = router_alert_and_nops(options);
                    expected.options = p.options.clone();
                }
                let input = p.frame();
                let what = format!("{} with {options} option bytes", f.name());
                let (run, counted) = dp.run_counted(PROG_LAN_IN, &input, 0);
                assert_untouched(&run, &input, &format!("{what} on {PROG_LAN_IN}"));
                assert_eq!(run.mark, UPLINK_MARK, "{what}: the uplink's mark");
                assert_eq!(counted, [(Reason::SlowPath, 1)], "{what}");
                let (run, counted) = dp.run_counted(PROG_WAN_OUT, &run.out, run.mark);
                assert_passed_as(
                    &run,
                    &expected.frame(),
                    &format!("{what} on {PROG_WAN_OUT}"),
                );
                assert_eq!(counted, NOTHING, "{what}");
            }
        }
        assert_eq!(dp.uplink0_stats().slow_path, 3 * ALL_FLOWS.len() as u64);
    });
}

/// The ISP router's MAC and the uplink device's, as `NEXT_HOPS` caches
/// them.
const MAC_ISP: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x11, 0xfe];
const MAC_WANX: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x11, 0x01];

impl Datapath {
    /// Caches `hop` as uplink 0's next hop.
    fn set_next_hop0(&mut self, hop: NextHop) {
        let mut hops: Array<_, NextHop> =
            Array::try_from(self.ebpf.map_mut(MAP_NEXT_HOPS).expect("NEXT_HOPS")).expect("types");
        hops.set(0, hop, 0).expect("write NEXT_HOPS");
    }
}

#[test]
fn lan_in_pinned_flow_with_a_cached_next_hop_is_translated_and_redirected_byte_exact_without_a_route()
 {
    with_datapath(|dp| {
        let mut mac = [0u8; 12];
        mac[..6].copy_from_slice(&MAC_ISP);
        mac[6..].copy_from_slice(&MAC_WANX);
        let cached = NextHop {
            mac,
            ifindex: UPLINK_IFINDEX,
            mtu: 1500,
            valid: 1,
        };
        dp.set_next_hop0(cached);
        for f in &ALL_FLOWS {
            dp.insert_flow(f);
            let input = f.outbound();
            let mut expected = f.outbound_translated();
            expected.ttl = input.ttl - 1;
            let (run, counted) = dp.run_counted(PROG_LAN_IN, &input.frame(), 0);
            let what = f.name();
            assert_eq!(run.ret, TC_ACT_REDIRECT, "{what}: no route, yet forwarded");
            let expected = ethernet(MAC_ISP, MAC_WANX, ETH_P_IP, &expected.bytes());
            assert!(
                run.out == expected,
                "{what}\n{}",
                describe_difference(&expected, &run.out)
            );
            assert_eq!(run.mark, UPLINK_MARK | MARK_TRANSLATED, "{what}");
            assert_eq!(counted, NOTHING, "{what}");
        }
        // Not valid, on another device, or too big for its MTU: the
        // lookup, which finds no route here, so the slow path.
        let input = TCP_FLOW.outbound().frame();
        for (hop, what) in [
            (NextHop { valid: 0, ..cached }, "not valid"),
            (
                NextHop {
                    ifindex: UPLINK_IFINDEX + 1,
                    ..cached
                },
                "another device",
            ),
            (
                NextHop {
                    mtu: TCP_FLOW.outbound().bytes().len() as u32 - 1,
                    ..cached
                },
                "over the MTU",
            ),
        ] {
            dp.set_next_hop0(hop);
            let (run, counted) = dp.run_counted(PROG_LAN_IN, &input, 0);
            assert_untouched(&run, &input, what);
            assert_eq!(counted, [(Reason::SlowPath, 1)], "{what}");
        }
    });
}

#[test]
fn lan_in_pinned_flow_with_ttl_1_passes_untouched_with_the_uplink_mark() {
    with_datapath(|dp| {
        dp.insert_flow(&TCP_FLOW);
        let mut p = TCP_FLOW.outbound();
        p.ttl = 1;
        let input = p.frame();
        let (run, counted) = dp.run_counted(PROG_LAN_IN, &input, 0);
        assert_untouched(&run, &input, "TTL 1");
        assert_eq!(run.mark, UPLINK_MARK);
        assert_eq!(counted, [(Reason::TtlExpired, 1)]);
    });
}

#[test]
fn lan_in_records_syn_fin_rst_of_a_pinned_flow_and_leaves_the_packet_alone() {
    with_datapath(|dp| {
        dp.insert_flow(&TCP_FLOW);
        let mut p = TCP_FLOW.outbound();
        if let Payload::Tcp(t) = &mut p.payload {
            t.flags = TCP_SYN | TCP_FIN | TCP_RST;
        }
        let input = p.frame();
        let (run, counted) = dp.run_counted(PROG_LAN_IN, &input, 0);
        assert_untouched(&run, &input, "SYN+FIN+RST");
        assert_eq!(counted, [(Reason::SlowPath, 1)]);
        let fwd = dp.fwd_entry(&TCP_FLOW).expect("flow");
        assert_eq!(fwd.flags, FLOW_FIN_OUT | FLOW_RST);
        // Unpinned: a new flow that cannot be routed, nothing created.
        let mut q = p.clone();
        q.set_sport(40999);
        let input = q.frame();
        let (run, counted) = dp.run_counted(PROG_LAN_IN, &input, 0);
        assert_untouched(&run, &input, "unpinned SYN+FIN+RST");
        assert_eq!(counted, [(Reason::NotForUplink, 1)]);
        assert_eq!(dp.flows().fwd.len(), 1);
    });
}

// ---------------------------------------------------------------------------
// Malformed and foreign packets.

/// `frame` with the IPv4 header at 14 edited by `edit` and its checksum
/// recomputed.
fn edit_ip(frame: &[u8], edit: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut f = frame.to_vec();
    edit(&mut f);
    if f.len() >= ETH_HLEN + 12 {
        refresh_ip_checksum(&mut f, ETH_HLEN);
    }
    f
}

fn set_u16(f: &mut [u8], off: usize, v: u16) {
    f[off..off + 2].copy_from_slice(&v.to_be_bytes());
}

/// An ICMP error (outer header valid) quoting `quoted` as is.
fn error_quoting(src: Ipv4Addr, dst: Ipv4Addr, quoted: &[u8]) -> Vec<u8> {
    Ipv4::icmp(src, dst, Icmp::error(ICMP_DEST_UNREACH, 1, [0; 4], quoted)).frame()
}

/// Broken or foreign variants of `tcp`, `udp` and `echo` (packets that
/// match a flow and would be translated), each with the reason every
/// program must count for it.
fn corpus(name: &str, tcp: &Ipv4, udp: &Ipv4, echo: &Ipv4) -> Vec<(String, Vec<u8>, Reason)> {
    const IP: usize = ETH_HLEN;
    // A bare segment: total length 40, so header-length edits leave less
    // than a TCP header.
    let mut tcp = tcp.clone();
    if let Payload::Tcp(t) = &mut tcp.payload {
        t.payload.clear();
    }
    let tcp = &tcp;
    let t = tcp.frame();
    let u = udp.frame();
    let e = echo.frame();
    let c: Vec<(&str, Vec<u8>, Reason)> = vec![
        ("Ethernet header only", t[..14].to_vec(), Reason::Malformed),
        ("1 byte of IPv4 header", t[..15].to_vec(), Reason::Malformed),
        (
            "IPv4 header cut at 8 bytes",
            t[..22].to_vec(),
            Reason::Malformed,
        ),
        (
            "IPv4 header cut at 19 bytes",
            t[..33].to_vec(),
            Reason::Malformed,
        ),
        ("IHL 0", edit_ip(&t, |f| f[IP] = 0x40), Reason::Malformed),
        ("IHL 4", edit_ip(&t, |f| f[IP] = 0x44), Reason::Malformed),
        (
            "version 6 in an IPv4 frame",
            edit_ip(&t, |f| f[IP] = 0x65),
            Reason::Malformed,
        ),
        (
            "version 0",
            edit_ip(&t, |f| f[IP] = 0x05),
            Reason::Malformed,
        ),
        (
            "IHL 15 beyond the total length of 40",
            edit_ip(&t, |f| f[IP] = 0x4f),
            Reason::Malformed,
        ),
        (
            "IHL 7 leaving 12 bytes of TCP header",
            edit_ip(&t, |f| f[IP] = 0x47),
            Reason::Malformed,
        ),
        (
            "IHL 15 and a total length beyond the frame",
            edit_ip(&t, |f| {
                f[IP] = 0x4f;
                set_u16(f, IP + 2, 80);
            }),
            Reason::Malformed,
        ),
        (
            "total length one byte beyond the frame",
            edit_ip(&t, |f| {
                let n = (f.len() - IP + 1) as u16;
                set_u16(f, IP + 2, n);
            }),
            Reason::Malformed,
        ),
        (
            "total length 65535",
            edit_ip(&t, |f| set_u16(f, IP + 2, 0xffff)),
            Reason::Malformed,
        ),
        (
            "total length 19, below the header",
            edit_ip(&t, |f| set_u16(f, IP + 2, 19)),
            Reason::Malformed,
        ),
        (
            "total length 0",
            edit_ip(&t, |f| set_u16(f, IP + 2, 0)),
            Reason::Malformed,
        ),
        (
            "TCP header cut at 19 bytes",
            edit_ip(&t[..IP + 20 + 19], |f| set_u16(f, IP + 2, 39)),
            Reason::Malformed,
        ),
        (
            "TCP header cut at 19 bytes by the total length only",
            edit_ip(&t, |f| set_u16(f, IP + 2, 39)),
            Reason::Malformed,
        ),
        (
            "TCP header cut at 10 bytes in the frame only",
            t[..IP + 20 + 10].to_vec(),
            Reason::Malformed,
        ),
        (
            "UDP header cut at 7 bytes",
            edit_ip(&u[..IP + 20 + 7], |f| set_u16(f, IP + 2, 27)),
            Reason::Malformed,
        ),
        (
            "UDP header cut at 4 bytes in the frame only",
            u[..IP + 20 + 4].to_vec(),
            Reason::Malformed,
        ),
        (
            "ICMP header cut at 7 bytes",
            edit_ip(&e[..IP + 20 + 7], |f| set_u16(f, IP + 2, 27)),
            Reason::Malformed,
        ),
        (
            "ICMP error quoting only an IP header",
            error_quoting(ROUTER, NAT_ADDR, &tcp.bytes()[..20]),
            Reason::Malformed,
        ),
        (
            "ICMP error quoting 4 bytes",
            error_quoting(ROUTER, NAT_ADDR, &tcp.bytes()[..4]),
            Reason::Malformed,
        ),
        (
            "ICMP error quoting an IP header with IHL 4",
            error_quoting(ROUTER, NAT_ADDR, &{
                let mut q = udp.bytes()[..28].to_vec();
                q[0] = 0x44;
                q
            }),
            Reason::Malformed,
        ),
        (
            "ICMP error whose quoted IHL runs past the quote",
            error_quoting(ROUTER, NAT_ADDR, &{
                let mut q = udp.bytes()[..28].to_vec();
                q[0] = 0x4f;
                q
            }),
            Reason::Malformed,
        ),
        (
            "ICMP error quoting a version 6 header",
            error_quoting(ROUTER, NAT_ADDR, &{
                let mut q = udp.bytes()[..28].to_vec();
                q[0] = 0x65;
                q
            }),
            Reason::Malformed,
        ),
        (
            "ARP",
            ethernet(MAC_B, MAC_A, ETH_P_ARP, &{
                let mut a = vec![0, 1, 8, 0, 6, 4, 0, 1];
                a.extend_from_slice(&MAC_A);
                a.extend_from_slice(&tcp.src.octets());
                a.extend_from_slice(&[0; 6]);
                a.extend_from_slice(&tcp.dst.octets());
                a
            }),
            Reason::NotIpv4,
        ),
        (
            "IPv6 carrying the IPv4 packet's bytes",
            ethernet(MAC_B, MAC_A, ETH_P_IPV6, &t[IP..]),
            Reason::NotIpv4,
        ),
        (
            "IPv6 (UDP)",
            ethernet(MAC_B, MAC_A, ETH_P_IPV6, &{
                let mut v = vec![0x60, 0, 0, 0, 0, 8, 17, 64];
                v.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8]);
                v.extend_from_slice(&[0; 11]);
                v.push(1);
                v.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8]);
                v.extend_from_slice(&[0; 11]);
                v.push(2);
                v.extend_from_slice(&[0x9c, 0x41, 0, 53, 0, 8, 0, 0]);
                v
            }),
            Reason::NotIpv4,
        ),
        (
            "802.1Q-tagged IPv4",
            ethernet(MAC_B, MAC_A, ETH_P_8021Q, &{
                let mut v = vec![0x00, 0x07, 0x08, 0x00];
                v.extend_from_slice(&t[IP..]);
                v
            }),
            Reason::NotIpv4,
        ),
        (
            "DCCP header cut before its checksum",
            Ipv4::new(
                tcp.src,
                tcp.dst,
                Payload::Raw {
                    proto: IPPROTO_DCCP,
                    bytes: t[IP + 20..IP + 27].to_vec(),
                },
            )
            .frame(),
            Reason::Malformed,
        ),
        (
            "ICMP timestamp",
            {
                let mut p = echo.clone();
                if let Payload::Icmp(i) = &mut p.payload {
                    i.kind = ICMP_TIMESTAMP;
                }
                p.frame()
            },
            Reason::UnsupportedProto,
        ),
    ];
    c.into_iter()
        .map(|(n, f, r)| (format!("{name}: {n}"), f, r))
        .collect()
}

#[test]
fn malformed_and_foreign_packets_are_left_untouched_or_dropped_and_never_leave_an_uplink() {
    with_datapath(|dp| {
        for f in &ALL_FLOWS {
            dp.insert_flow(f);
        }
        let before = dp.flows();
        let mut all = corpus(
            "outbound",
            &TCP_FLOW.outbound(),
            &UDP_FLOW.outbound(),
            &ECHO_FLOW.outbound(),
        );
        all.extend(corpus(
            "reply",
            &TCP_FLOW.reply(),
            &UDP_FLOW.reply(),
            &ECHO_FLOW.reply(),
        ));
        let mut failures = Vec::new();
        let mut refused = Vec::new();
        for (name, frame, reason) in &all {
            for (prog, mark) in [
                (PROG_LAN_IN, 0),
                (PROG_WAN_IN, 0),
                (PROG_WAN_OUT, UPLINK_MARK),
            ] {
                let what = format!("{name} on {prog}");
                let (run, counted) = match dp.try_run_counted(prog, frame, mark) {
                    Ok(r) => r,
                    Err(_) if kernel_may_refuse(frame) => {
                        refused.push(what);
                        continue;
                    }
                    Err(e) => {
                        failures.push(format!("{what}: test run failed: {e:?}"));
                        continue;
                    }
                };
                if let Err(e) = untouched_or_dropped(&run, frame, &what) {
                    failures.push(e);
                }
                // On the way out of an uplink, whatever IPv4 the SNAT could
                // not translate meets the egress guard, and so does every
                // forwarded IPv6 packet (no routed IPv6 prefix here).
                let ipv6 = frame.len() >= ETH_HLEN && u16_at(frame, 12) == ETH_P_IPV6;
                let guarded = prog == PROG_WAN_OUT && (*reason != Reason::NotIpv4 || ipv6);
                let expected: &[(Reason, u64)] = if prog == PROG_WAN_OUT && ipv6 {
                    &[(Reason::ForeignSource, 1)]
                } else if guarded {
                    &[(*reason, 1), (Reason::ForeignSource, 1)]
                } else {
                    &[(*reason, 1)]
                };
                if counted != expected {
                    failures.push(format!(
                        "{what}: counted {counted:?}, expected {expected:?}"
                    ));
                }
                if guarded && run.ret != TC_ACT_SHOT {
                    failures.push(format!("{what}: left the uplink ({})", run.ret));
                }
            }
        }
        if !refused.is_empty() {
            eprintln!(
                "the kernel refused {} test runs of frames too short for an IP header:\n  {}",
                refused.len(),
                refused.join("\n  ")
            );
        }
        assert!(
            failures.is_empty(),
            "{} of {} runs failed:\n{}",
            failures.len(),
            all.len() * 3,
            failures.join("\n\n")
        );
        assert!(
            refused.len() * 2 < all.len() * 3,
            "most of the corpus must actually run"
        );
        assert_eq!(dp.flows(), before, "no flow created or removed");
    });
}

#[test]
fn valid_versions_of_the_corpus_packets_are_translated() {
    // The corpus above is only meaningful if its unbroken packets would be
    // rewritten: check that they are.
    with_datapath(|dp| {
        for f in &ALL_FLOWS {
            dp.insert_flow(f);
        }
        for f in [TCP_FLOW, UDP_FLOW, ECHO_FLOW] {
            let run = dp.run(PROG_WAN_OUT, &f.outbound().frame(), UPLINK_MARK);
            assert_passed_as(&run, &f.outbound_translated().frame(), &f.name());
            let run = dp.run(PROG_WAN_IN, &f.reply().frame(), 0);
            assert_passed_as(&run, &f.reply_translated().frame(), &f.name());
            let run = dp.run(PROG_LAN_IN, &f.outbound().frame(), 0);
            assert_eq!(run.mark, UPLINK_MARK, "{}: pinned flow found", f.name());
        }
    });
}

#[test]
fn frames_shorter_than_an_ethernet_header_are_refused_or_pass_untouched() {
    with_datapath(|dp| {
        let full = TCP_FLOW.outbound().frame();
        for prog in [PROG_LAN_IN, PROG_WAN_IN, PROG_WAN_OUT] {
            for len in [1, 6, 12, 13] {
                let input = &full[..len];
                let what = format!("{len}-byte frame on {prog}");
                let before = dp.reasons();
                match dp.try_run(prog, input, UPLINK_MARK) {
                    // The kernel refuses test runs shorter than ETH_HLEN
                    // (EINVAL): the program never sees them.
                    Err(_) => assert_eq!(dp.reasons(), before, "{what}"),
                    Ok(run) => assert_untouched_or_dropped(&run, input, &what),
                }
            }
        }
    });
}

#[test]
fn non_ipv4_frames_count_not_ipv4_on_every_program_and_forwarded_ipv6_meets_the_guard() {
    with_datapath(|dp| {
        dp.insert_flow(&TCP_FLOW);
        for (ethertype, name) in [
            (ETH_P_ARP, "ARP"),
            (ETH_P_IPV6, "IPv6"),
            (ETH_P_8021Q, "802.1Q"),
            (0x88cc, "LLDP"),
            (0x0060, "802.3 length field"),
        ] {
            let input = ethernet(MAC_B, MAC_A, ethertype, &TCP_FLOW.outbound().bytes());
            for (prog, mark) in [
                (PROG_LAN_IN, 0),
                (PROG_WAN_IN, 0),
                (PROG_WAN_OUT, UPLINK_MARK),
            ] {
                let what = format!("{name} on {prog}");
                let (run, counted) = dp.run_counted(prog, &input, mark);
                if ethertype == ETH_P_IPV6 && prog == PROG_WAN_OUT {
                    // Forwarded IPv6 meets the egress guard.
                    assert_eq!(run.ret, TC_ACT_SHOT, "{what}");
                    assert_eq!(counted, [(Reason::ForeignSource, 1)], "{what}");
                    continue;
                }
                assert_untouched(&run, &input, &what);
                assert_eq!(counted, [(Reason::NotIpv4, 1)], "{what}");
            }
        }
    });
}

#[test]
fn wan_out_malformed_non_first_fragments_pass_byte_identical() {
    // A later fragment carries no L4 header, so the egress program rewrites
    // its source before parsing the rest of the IPv4 header; a broken
    // header must still not be rewritten.
    with_datapath(|dp| {
        let mut p = Ipv4::new(
            LAN_HOST,
            REMOTE,
            Payload::Raw {
                proto: IPPROTO_UDP,
                bytes: (0..64u8).collect(),
            },
        );
        p.frag = 185;
        let good = p.frame();
        let cases = [
            ("IHL 4", edit_ip(&good, |f| f[ETH_HLEN] = 0x44)),
            ("IHL 0", edit_ip(&good, |f| f[ETH_HLEN] = 0x40)),
            ("version 6", edit_ip(&good, |f| f[ETH_HLEN] = 0x65)),
            (
                "total length beyond the frame",
                edit_ip(&good, |f| set_u16(f, ETH_HLEN + 2, 200)),
            ),
            (
                "total length 16, below the header",
                edit_ip(&good, |f| set_u16(f, ETH_HLEN + 2, 16)),
            ),
            (
                "header cut after the source address",
                good[..ETH_HLEN + 16].to_vec(),
            ),
        ];
        let mut failures = Vec::new();
        for (name, input) in &cases {
            let run = match dp.try_run(PROG_WAN_OUT, input, UPLINK_MARK) {
                Ok(run) => run,
                Err(_) if kernel_may_refuse(input) => continue,
                Err(e) => panic!("later fragment, {name}: test run failed: {e:?}"),
            };
            if let Err(e) = untouched_or_dropped(&run, input, &format!("later fragment, {name}")) {
                failures.push(e);
            }
        }
        assert!(
            failures.is_empty(),
            "{} of {} malformed later fragments were rewritten:\n{}",
            failures.len(),
            cases.len(),
            failures.join("\n\n")
        );
    });
}

/// The object's disassembly with relocations (`llvm-objdump -d -r`).
fn disassembly() -> String {
    let objdump = "/usr/lib/llvm-22/bin/llvm-objdump";
    assert!(
        std::path::Path::new(objdump).exists(),
        "{objdump} is missing: run `cargo xtask setup` (package llvm-22)"
    );
    let path = std::env::temp_dir().join(format!("mh-disasm-{}.o", std::process::id()));
    std::fs::write(&path, object()).expect("write the object");
    let out = Command::new(objdump)
        .args(["-d", "-r"])
        .arg(&path)
        .output()
        .expect("run llvm-objdump");
    let _ = std::fs::remove_file(&path);
    assert!(out.status.success(), "llvm-objdump failed: {out:?}");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        text.contains("<mh_lan_in>:"),
        "no mh_lan_in in:\n{text:.500}"
    );
    text
}

/// Each function of the disassembly (its symbol) with its lines.
fn functions(text: &str) -> Vec<(&str, Vec<&str>)> {
    let mut out: Vec<(&str, Vec<&str>)> = Vec::new();
    for line in text.lines() {
        if let Some(name) = line
            .split_once(" <")
            .and_then(|(_, r)| r.strip_suffix(">:"))
        {
            out.push((name, Vec::new()));
        } else if let Some((_, lines)) = out.last_mut() {
            lines.push(line);
        }
    }
    out
}

/// The compiler's `memset`/`memcpy` for BPF are byte-at-a-time loops: a
/// 64-byte zeroing cost more than a map lookup. No program may call them.
#[test]
fn no_program_calls_the_byte_loop_memory_builtins() {
    let text = disassembly();
    let mut calls = Vec::new();
    for (program, lines) in functions(&text) {
        if !program.starts_with("mh_") {
            continue;
        }
        for line in lines.iter().filter(|l| l.contains("R_BPF_64_32")) {
            let target = line.split_whitespace().last().unwrap_or("");
            if ["memset", "memcpy", "memmove", "memcmp", "bcmp"].contains(&target) {
                calls.push(format!("{program} calls {target}"));
            }
        }
    }
    assert!(calls.is_empty(), "{calls:#?}");
}

/// A program whose body the compiler left out of line (the entry the
/// `#[classifier]` macro wraps around it) pays a BPF-to-BPF call and
/// return on every packet, 7 ns here (`BENCHMARKS.md`). Every entry
/// point starts with its own code.
#[test]
fn every_program_runs_its_pipeline_in_its_own_body_not_through_a_call() {
    let text = disassembly();
    let outlined: Vec<&str> = functions(&text)
        .into_iter()
        .filter(|(name, lines)| {
            name.starts_with("mh_")
                && lines
                    .iter()
                    .find(|l| !l.trim().is_empty())
                    .is_some_and(|first| first.contains("call"))
        })
        .map(|(name, _)| name)
        .collect();
    assert!(
        outlined.is_empty(),
        "entries that only call their body: {outlined:?}"
    );
}

// ---------------------------------------------------------------------------
// Protocols translated by address only.

const IPPROTO_UDPLITE: u8 = 136;

/// A packet of protocol `proto` from `src` to `dst`, with a valid header
/// for the protocols whose checksum covers the pseudo-header (DCCP,
/// UDP-Lite: checksum at offset 6, computed here from scratch).
fn portless(proto: u8, src: Ipv4Addr, dst: Ipv4Addr) -> Ipv4 {
    let mut bytes: Vec<u8> = match proto {
        // DCCP-Request: ports, data offset 5 words, CsCov 0, type 0 with X,
        // a 48-bit sequence number and a service code.
        IPPROTO_DCCP => vec![
            0x9c, 0x41, 0x13, 0x89, 5, 0, 0, 0, 0x01, 0, 0, 0, 0x12, 0x34, 0x56, 0x78, 0, 0, 0, 42,
        ],
        // UDP-Lite: ports, checksum coverage 0 (all), checksum, payload.
        IPPROTO_UDPLITE => b"\x9c\x42\x13\x8a\x00\x00\x00\x00lite payload!".to_vec(),
        // GRE carrying IPv4, ESP, SCTP, 6in4, 253: opaque to the NAT.
        _ => (0..37u8).map(|i| i.wrapping_mul(29) ^ proto).collect(),
    };
    if proto == IPPROTO_DCCP || proto == IPPROTO_UDPLITE {
        let c = l4_checksum(src, dst, proto, &bytes);
        bytes[6..8].copy_from_slice(&c.to_be_bytes());
    }
    let mut p = Ipv4::new(src, dst, Payload::Raw { proto, bytes });
    p.id = 0x5151;
    p
}

const PORTLESS: [u8; 7] = [IPPROTO_GRE, 50, 132, 41, 253, IPPROTO_DCCP, IPPROTO_UDPLITE];

/// Pins the address-only flow LAN_HOST -> REMOTE of `proto` on uplink 0:
/// a flow whose ports are all 0.
fn insert_portless(dp: &mut Datapath, proto: u8) {
    dp.insert_flow(&Flow {
        proto,
        lan_port: 0,
        remote_port: 0,
        nat_port: 0,
        udp_checksum: true,
    });
}

#[test]
fn wan_out_snat_translates_portless_protocols_by_address_and_fixes_dccp_and_udplite_checksums() {
    with_datapath(|dp| {
        for proto in PORTLESS {
            insert_portless(dp, proto);
            let input = portless(proto, LAN_HOST, REMOTE).frame();
            let expected = portless(proto, NAT_ADDR, REMOTE).frame();
            let what = format!("protocol {proto} on {PROG_WAN_OUT}");
            let (run, counted) = dp.run_counted(PROG_WAN_OUT, &input, UPLINK_MARK);
            assert_passed_as(&run, &expected, &what);
            assert_eq!(counted, NOTHING, "{what}");
        }
        // Without its flow: dropped, not sent with the LAN source.
        let input = portless(47, CLIENT_ADDR, ROUTER).frame();
        let (run, counted) = dp.run_counted(PROG_WAN_OUT, &input, UPLINK_MARK);
        assert_eq!(run.ret, TC_ACT_SHOT);
        assert_eq!(
            counted,
            [(Reason::NoMapping, 1), (Reason::ForeignSource, 1)]
        );
    });
}

#[test]
fn wan_in_reverse_translates_portless_protocols_by_address_byte_exact() {
    with_datapath(|dp| {
        for proto in PORTLESS {
            insert_portless(dp, proto);
            let input = portless(proto, REMOTE, NAT_ADDR).frame();
            let expected = portless(proto, REMOTE, LAN_HOST).frame();
            let what = format!("protocol {proto} on {PROG_WAN_IN}");
            let (run, counted) = dp.run_counted(PROG_WAN_IN, &input, 0);
            assert_passed_as(&run, &expected, &what);
            assert_eq!(counted, NOTHING, "{what}");
        }
    });
}

#[test]
fn wan_in_icmp_errors_about_portless_flows_translate_the_quoted_address_and_checksum() {
    with_datapath(|dp| {
        for proto in PORTLESS {
            insert_portless(dp, proto);
            let sent = portless(proto, NAT_ADDR, REMOTE).bytes();
            let as_sent = portless(proto, LAN_HOST, REMOTE).bytes();
            for quoted in [28, sent.len()] {
                let input = error_quoting(ROUTER, NAT_ADDR, &sent[..quoted]);
                let expected = error_quoting(ROUTER, LAN_HOST, &as_sent[..quoted]);
                let what = format!("error quoting {quoted} bytes of protocol {proto}");
                let (run, counted) = dp.run_counted(PROG_WAN_IN, &input, 0);
                assert_passed_as(&run, &expected, &what);
                assert_eq!(counted, NOTHING, "{what}");
            }
        }
    });
}

#[test]
fn lan_in_drops_ipsec_ah_which_no_nat_can_carry() {
    with_datapath(|dp| {
        let input = portless(51, LAN_HOST, REMOTE).frame();
        let (run, counted) = dp.run_counted(PROG_LAN_IN, &input, 0);
        assert_eq!(run.ret, TC_ACT_SHOT);
        assert_eq!(counted, [(Reason::AhNotNatable, 1)]);
        assert!(dp.flows().fwd.is_empty());
    });
}

// ---------------------------------------------------------------------------
// Fragments.

/// A non-first fragment from `src` to `dst`: offset 1480 bytes, IP id
/// `id`, bytes that would look like ports if parsed as an L4 header.
fn later_fragment(proto: u8, src: Ipv4Addr, dst: Ipv4Addr, id: u16) -> Ipv4 {
    let mut p = Ipv4::new(
        src,
        dst,
        Payload::Raw {
            proto,
            bytes: (0..77u8).map(|i| i.wrapping_mul(13)).collect(),
        },
    );
    p.frag = 185;
    p.id = id;
    p
}

#[test]
fn lan_in_sends_the_rest_of_a_datagram_after_its_first_fragment_and_drops_strays() {
    with_datapath(|dp| {
        dp.insert_flow(&UDP_FLOW);
        let mut first = UDP_FLOW.outbound();
        first.frag = IP_MF;
        first.id = 0x4242;
        let input = first.frame();
        let (run, counted) = dp.run_counted(PROG_LAN_IN, &input, 0);
        assert_untouched(&run, &input, "first fragment (no route: slow path)");
        assert_eq!(counted, [(Reason::SlowPath, 1)]);

        let rest = later_fragment(IPPROTO_UDP, LAN_HOST, REMOTE, 0x4242);
        let input = rest.frame();
        let (run, counted) = dp.run_counted(PROG_LAN_IN, &input, 0);
        assert_untouched(&run, &input, "later fragment");
        assert_eq!(run.mark, UPLINK_MARK, "its datagram's uplink");
        assert_eq!(counted, [(Reason::SlowPath, 1)]);
        // ... which the egress SNAT then translates.
        let mut expected = rest.clone();
        expected.src = NAT_ADDR;
        let (run, counted) = dp.run_counted(PROG_WAN_OUT, &run.out, run.mark);
        assert_passed_as(&run, &expected.frame(), "later fragment on the uplink");
        assert_eq!(counted, NOTHING);

        for (what, stray) in [
            (
                "another datagram",
                later_fragment(IPPROTO_UDP, LAN_HOST, REMOTE, 0x4243),
            ),
            (
                "another host",
                later_fragment(IPPROTO_UDP, OUTSIDER, REMOTE, 0x4242),
            ),
        ] {
            let (run, counted) = dp.run_counted(PROG_LAN_IN, &stray.frame(), 0);
            assert_eq!(run.ret, TC_ACT_SHOT, "{what}");
            assert_eq!(counted, [(Reason::FragmentNoMapping, 1)], "{what}");
        }
    });
}

#[test]
fn wan_in_translates_the_rest_of_a_reply_after_its_first_fragment_byte_exact() {
    with_datapath(|dp| {
        dp.insert_flow(&UDP_FLOW);
        let mut first = UDP_FLOW.reply();
        first.frag = IP_MF;
        first.id = 0x7777;
        let mut expected = UDP_FLOW.reply_translated();
        expected.frag = IP_MF;
        expected.id = 0x7777;
        let (run, counted) = dp.run_counted(PROG_WAN_IN, &first.frame(), 0);
        assert_passed_as(&run, &expected.frame(), "first fragment of the reply");
        assert_eq!(counted, NOTHING);

        let rest = later_fragment(IPPROTO_UDP, REMOTE, NAT_ADDR, 0x7777);
        let mut expected = rest.clone();
        expected.dst = LAN_HOST;
        let (run, counted) = dp.run_counted(PROG_WAN_IN, &rest.frame(), 0);
        assert_passed_as(&run, &expected.frame(), "later fragment of the reply");
        assert_eq!(counted, [(Reason::FragmentTranslated, 1)]);
    });
}

#[test]
fn wan_in_delivers_early_reply_fragments_only_while_one_lan_host_talks_to_that_remote() {
    with_datapath(|dp| {
        dp.insert_flow(&UDP_FLOW);
        dp.set_peer(LAN_HOST);
        let early = later_fragment(IPPROTO_UDP, REMOTE, NAT_ADDR, 0x1111);
        let mut expected = early.clone();
        expected.dst = LAN_HOST;
        let (run, counted) = dp.run_counted(PROG_WAN_IN, &early.frame(), 0);
        assert_passed_as(&run, &expected.frame(), "early fragment, one host");
        assert_eq!(counted, [(Reason::FragmentTranslated, 1)]);

        // The gateway itself sends UDP to that remote from that address.
        dp.host_origin = true;
        let own = UDP_FLOW.outbound().with_source(NAT_ADDR, 20000).frame();
        let (run, _) = dp.run_counted(PROG_WAN_OUT, &own, 0);
        assert_eq!(run.ret, TC_ACT_UNSPEC, "the gateway's own packet passes");
        let input = early.frame();
        let (run, counted) = dp.run_counted(PROG_WAN_IN, &input, 0);
        assert_untouched(&run, &input, "early fragment, maybe the gateway's");
        assert_eq!(counted, [(Reason::Fragment, 1)]);
    });
}

#[test]
fn wan_in_leaves_early_fragments_to_the_kernel_while_several_lan_hosts_share_the_pair() {
    with_datapath(|dp| {
        dp.insert_flow(&UDP_FLOW);
        // What the LAN program leaves after a second host's flow there.
        dp.set_peer(Ipv4Addr::UNSPECIFIED);
        let input = later_fragment(IPPROTO_UDP, REMOTE, NAT_ADDR, 0x2222).frame();
        let (run, counted) = dp.run_counted(PROG_WAN_IN, &input, 0);
        assert_untouched(&run, &input, "early fragment, two hosts");
        assert_eq!(counted, [(Reason::Fragment, 1)]);
    });
}

#[test]
fn wan_in_never_trusts_a_peers_slot_torn_by_two_writers() {
    with_datapath(|dp| {
        dp.insert_flow(&UDP_FLOW);
        dp.set_peer(LAN_HOST);
        // The fields of one writer, the check of another.
        let torn = PeerSlot {
            check: peer_check(be(REMOTE), be(NAT_ADDR), 0x0a00_0009),
            ..dp.peer_slot0()
        };
        let mut peers: Array<_, PeerSlot> =
            Array::try_from(dp.ebpf.map_mut(MAP_PEERS).expect("PEERS")).expect("types");
        peers
            .set(peer_slot(be(REMOTE), be(NAT_ADDR)), torn, 0)
            .expect("write PEERS");
        let input = later_fragment(IPPROTO_UDP, REMOTE, NAT_ADDR, 0x4444).frame();
        let (run, counted) = dp.run_counted(PROG_WAN_IN, &input, 0);
        assert_untouched(&run, &input, "early fragment, torn slot");
        assert_eq!(counted, [(Reason::Fragment, 1)]);
    });
}

#[test]
fn fragments_of_portless_protocols_follow_their_flow_in_any_order() {
    with_datapath(|dp| {
        insert_portless(dp, IPPROTO_GRE);
        let out = later_fragment(IPPROTO_GRE, LAN_HOST, REMOTE, 0x3333).frame();
        let (run, counted) = dp.run_counted(PROG_LAN_IN, &out, 0);
        assert_untouched(&run, &out, "GRE later fragment out");
        assert_eq!(run.mark, UPLINK_MARK);
        assert_eq!(counted, [(Reason::SlowPath, 1)]);
        let back = later_fragment(IPPROTO_GRE, REMOTE, NAT_ADDR, 0x3334);
        let mut expected = back.clone();
        expected.dst = LAN_HOST;
        let (run, counted) = dp.run_counted(PROG_WAN_IN, &back.frame(), 0);
        assert_passed_as(&run, &expected.frame(), "GRE later fragment in");
        assert_eq!(counted, [(Reason::FragmentTranslated, 1)]);
    });
}

// ---------------------------------------------------------------------------
// The gateway's own pings.

#[test]
fn the_gateways_ping_re_keys_a_lan_echo_flow_on_its_identifier_and_gets_its_replies() {
    with_datapath(|dp| {
        dp.insert_flow(&ECHO_FLOW);
        dp.insert_flow(&UDP_FLOW);
        // The gateway pings REMOTE from NAT_ADDR with the LAN flow's NAT id.
        dp.host_origin = true;
        let ping = ECHO_FLOW.outbound_translated().frame();
        let (run, counted) = dp.run_counted(PROG_WAN_OUT, &ping, 0);
        assert_untouched(&run, &ping, "the gateway's echo request");
        assert_eq!(counted, [(Reason::EchoRekeyed, 1)]);
        let flows = dp.flows();
        assert_eq!(flows.fwd.len(), 1, "only the UDP flow is left: {flows:?}");
        assert_eq!(flows.rev.len(), 1, "{flows:?}");
        // Its reply goes to the gateway, not to the LAN host.
        let reply = ECHO_FLOW.reply().frame();
        let (run, counted) = dp.run_counted(PROG_WAN_IN, &reply, 0);
        assert_untouched(&run, &reply, "the reply to the gateway's ping");
        assert_eq!(counted, [(Reason::HostEcho, 1)]);
        // Another identifier is still the NAT's business.
        let mut other = ECHO_FLOW.reply();
        other.set_dport(ECHO_FLOW.nat_port + 1);
        let (_, counted) = dp.run_counted(PROG_WAN_IN, &other.frame(), 0);
        assert_eq!(counted, [(Reason::NoMapping, 1)]);
    });
}

// ---------------------------------------------------------------------------
// MSS clamping.

/// Linux's SYN options: MSS, SACK permitted, timestamps, NOP, window scale.
fn syn_options(mss: u16) -> Vec<u8> {
    let mut o = vec![2, 4];
    o.extend_from_slice(&mss.to_be_bytes());
    o.extend_from_slice(&[4, 2, 8, 10, 0, 1, 2, 3, 0, 0, 0, 0, 1, 3, 3, 7]);
    o
}

/// `p` (TCP) turned into a SYN (or SYN-ACK with `ack`) with `options`.
fn as_syn(mut p: Ipv4, ack: bool, options: Vec<u8>) -> Ipv4 {
    if let Payload::Tcp(t) = &mut p.payload {
        t.flags = TCP_SYN | if ack { TCP_ACK } else { 0 };
        t.options = options;
        t.payload.clear();
    }
    p
}

#[test]
fn syn_and_syn_ack_through_an_uplink_with_mss_clamp_get_the_clamped_mss_byte_exact() {
    with_datapath(|dp| {
        dp.insert_flow(&TCP_FLOW);
        dp.edit_uplink0(|u| u.mss_clamp = 1360);
        // Outbound SYN: clamped in mh_lan_in (slow path here: no route),
        // then translated by mh_wan_out.
        let nops_first = {
            let mut o = vec![1, 1];
            o.extend_from_slice(&syn_options(1460)[..18]);
            o
        };
        for options in [syn_options(1460), nops_first] {
            let syn = as_syn(TCP_FLOW.outbound(), false, options.clone());
            let clamped_options: Vec<u8> = {
                let mut o = options.clone();
                let at = o.iter().position(|b| *b == 2).expect("MSS option");
                o[at + 2..at + 4].copy_from_slice(&1360u16.to_be_bytes());
                o
            };
            let clamped = as_syn(TCP_FLOW.outbound(), false, clamped_options.clone());
            let (run, counted) = dp.run_counted(PROG_LAN_IN, &syn.frame(), 0);
            assert_passed_as(&run, &clamped.frame(), "SYN on mh_lan_in");
            assert_eq!(counted, [(Reason::SlowPath, 1)]);
            let translated = as_syn(
                TCP_FLOW.outbound_translated(),
                false,
                clamped_options.clone(),
            );
            let (run, _) = dp.run_counted(PROG_WAN_OUT, &run.out, run.mark);
            assert_passed_as(&run, &translated.frame(), "SYN on mh_wan_out");

            // The SYN-ACK back.
            let syn_ack = as_syn(TCP_FLOW.reply(), true, options);
            let expected = as_syn(TCP_FLOW.reply_translated(), true, clamped_options);
            let (run, counted) = dp.run_counted(PROG_WAN_IN, &syn_ack.frame(), 0);
            assert_passed_as(&run, &expected.frame(), "SYN-ACK on mh_wan_in");
            assert_eq!(counted, NOTHING);
        }
    });
}

#[test]
fn mss_clamping_leaves_small_mss_non_syn_segments_and_unclamped_uplinks_alone() {
    with_datapath(|dp| {
        dp.insert_flow(&TCP_FLOW);
        dp.edit_uplink0(|u| u.mss_clamp = 1360);
        for (what, p) in [
            (
                "an MSS below the clamp",
                as_syn(TCP_FLOW.reply(), true, syn_options(1200)),
            ),
            ("an ACK carrying an MSS option", {
                let mut p = as_syn(TCP_FLOW.reply(), true, syn_options(1460));
                if let Payload::Tcp(t) = &mut p.payload {
                    t.flags = TCP_ACK;
                }
                p
            }),
        ] {
            let mut expected = p.clone();
            expected.dst = LAN_HOST;
            expected.set_dport(TCP_FLOW.lan_port);
            let (run, _) = dp.run_counted(PROG_WAN_IN, &p.frame(), 0);
            assert_passed_as(&run, &expected.frame(), what);
        }
        dp.edit_uplink0(|u| u.mss_clamp = 0);
        let p = as_syn(TCP_FLOW.reply(), true, syn_options(1460));
        let expected = as_syn(TCP_FLOW.reply_translated(), true, syn_options(1460));
        let (run, _) = dp.run_counted(PROG_WAN_IN, &p.frame(), 0);
        assert_passed_as(&run, &expected.frame(), "no clamp set");
    });
}

// ---------------------------------------------------------------------------
// Fairness when the map fills.

#[test]
fn a_host_at_its_quota_or_a_full_map_is_refused_before_any_route_lookup() {
    with_datapath(|dp| {
        let input = UDP_FLOW.outbound().frame();
        // Below the quota: on to the route lookup, which fails here.
        let (_, counted) = dp.run_counted(PROG_LAN_IN, &input, 0);
        assert_eq!(counted, [(Reason::NotForUplink, 1)]);
        {
            let mut hosts: HashMap<_, u32, HostFlows> =
                HashMap::try_from(dp.ebpf.map_mut(MAP_HOSTS).expect("HOSTS")).expect("types");
            let at_quota = HostFlows {
                flows: u64::from(PER_HOST),
                refused: 0,
            };
            hosts.insert(be(LAN_HOST), at_quota, 0).expect("insert");
        }
        for _ in 0..3 {
            let (run, counted) = dp.run_counted(PROG_LAN_IN, &input, 0);
            assert_eq!(run.ret, TC_ACT_SHOT);
            assert_eq!(counted, [(Reason::HostQuota, 1)]);
        }
        let hosts: HashMap<_, u32, HostFlows> =
            HashMap::try_from(dp.ebpf.map(MAP_HOSTS).expect("HOSTS")).expect("types");
        assert_eq!(hosts.get(&be(LAN_HOST), 0).expect("host").refused, 3);
        // Another host is not held to this one's quota, but to the map.
        let other = TCP_FLOW
            .outbound()
            .with_source(Ipv4Addr::new(198, 18, 1, 9), 40000)
            .frame();
        let (_, counted) = dp.run_counted(PROG_LAN_IN, &other, 0);
        assert_eq!(counted, [(Reason::NotForUplink, 1)]);
        {
            let mut fill: Array<_, u64> =
                Array::try_from(dp.ebpf.map_mut(MAP_FILL).expect("FILL")).expect("types");
            fill.set(0, 1024, 0).expect("fill");
        }
        let (run, counted) = dp.run_counted(PROG_LAN_IN, &other, 0);
        assert_eq!(run.ret, TC_ACT_SHOT);
        assert_eq!(counted, [(Reason::MapFull, 1)]);
        // Established flows do not care.
        dp.insert_flow(&TCP_FLOW);
        let (_, counted) = dp.run_counted(PROG_LAN_IN, &TCP_FLOW.outbound().frame(), 0);
        assert_eq!(counted, [(Reason::SlowPath, 1)]);
    });
}

// ---------------------------------------------------------------------------
// Hairpinning.

#[test]
fn a_lan_host_reaches_another_through_its_public_mapping_both_ways_byte_exact() {
    with_datapath(|dp| {
        // B (198.18.1.3:5000) holds the public mapping NAT_ADDR:61002.
        let b = Ipv4Addr::new(198, 18, 1, 3);
        {
            let mut eim: HashMap<_, EimKey, EimLan> =
                HashMap::try_from(dp.ebpf.map_mut(MAP_EIM).expect("EIM")).expect("types");
            let key = EimKey {
                nat_addr_be: be(NAT_ADDR),
                nat_port_be: 61002u16.to_be(),
                proto: IPPROTO_UDP,
                _pad: 0,
            };
            let lan = EimLan {
                lan_addr_be: be(b),
                lan_port_be: 5000u16.to_be(),
                _pad: 0,
            };
            eim.insert(key, lan, 0).expect("insert EIM");
        }
        // A (LAN_HOST:40001) sends to that mapping; its free port is kept.
        let a_to_b = Ipv4::udp(LAN_HOST, NAT_ADDR, Udp::new(40001, 61002, b"hello B"));
        let expected = Ipv4::udp(NAT_ADDR, b, Udp::new(40001, 5000, b"hello B"));
        let (run, counted) = dp.run_counted(PROG_LAN_IN, &a_to_b.frame(), 0);
        // No route in the test namespace: handed to the kernel, translated.
        assert_passed_as(&run, &expected.frame(), "A to B's mapping");
        assert_eq!(counted, [(Reason::Hairpinned, 1)]);
        // B answers A's public mapping.
        let b_to_a = Ipv4::udp(b, NAT_ADDR, Udp::new(5000, 40001, b"hello A"));
        let expected = Ipv4::udp(NAT_ADDR, LAN_HOST, Udp::new(61002, 40001, b"hello A"));
        let (run, counted) = dp.run_counted(PROG_LAN_IN, &b_to_a.frame(), 0);
        assert_passed_as(&run, &expected.frame(), "B's answer");
        assert_eq!(counted, [(Reason::Hairpinned, 1)]);
        assert_eq!(dp.flows().fwd.len(), 2, "A's flow and B's return flow");
        // A port of the gateway's address that is nobody's mapping: the
        // gateway's own service, left to the kernel.
        let to_gw = Ipv4::udp(LAN_HOST, NAT_ADDR, Udp::new(40002, 53, b"q")).frame();
        let (run, counted) = dp.run_counted(PROG_LAN_IN, &to_gw, 0);
        assert_untouched(&run, &to_gw, "to the gateway itself");
        assert_eq!(counted, [(Reason::NotForUplink, 1)]);
    });
}

// ---------------------------------------------------------------------------
// The XDP programs: what they take is rewritten exactly as TC rewrites it;
// what they decline passes to TC as it came.

/// `XDP_PASS` and `XDP_REDIRECT` (uapi `xdp_action`).
const XDP_PASS: u32 = 2;
const XDP_REDIRECT: u32 = 4;
/// Size of `struct xdp_md`, the XDP test-run context.
const XDP_MD_LEN: usize = 24;

impl Datapath {
    /// The XDP program `name`, loaded on first use.
    fn xdp_program(&mut self, name: &'static str) -> &Xdp {
        let prog: &mut Xdp = self
            .ebpf
            .program_mut(name)
            .unwrap_or_else(|| panic!("program {name} missing from the object"))
            .try_into()
            .unwrap_or_else(|e| panic!("{name} is not an XDP program: {e}"));
        if self.loaded.insert(name) {
            prog.load()
                .unwrap_or_else(|e| panic!("the kernel rejected {name}: {e:?}"));
        }
        prog
    }

    /// Runs XDP program `name` on `frame` as received on `ifindex` (0:
    /// none given).
    fn run_xdp(&mut self, name: &'static str, frame: &[u8], ifindex: u32) -> Run {
        let p = self.xdp_program(name);
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex, ...
        let mut ctx_in = [0u8; XDP_MD_LEN];
        ctx_in[4..8].copy_from_slice(&(frame.len() as u32).to_ne_bytes());
        ctx_in[12..16].copy_from_slice(&ifindex.to_ne_bytes());
        let mut out = vec![0u8; frame.len() + 256];
        let r = p
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ctx_in: Some(&ctx_in),
                ..TestRunOptions::new()
            })
            .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN of {name} failed: {e:?}"));
        out.truncate(r.data_size_out as usize);
        Run {
            ret: r.return_value,
            out,
            mark: 0,
        }
    }

    /// Lets the XDP programs redirect to `ifindex`.
    fn allow_xdp_redirect(&mut self, ifindex: u32) {
        let mut devs = DevMapHash::try_from(self.ebpf.map_mut(MAP_XDP_DEVS).expect("XDP_DEVS"))
            .expect("XDP_DEVS types");
        devs.insert(ifindex, ifindex, None, 0)
            .expect("insert XDP_DEVS");
    }

    /// Uplink 0's XDP counters summed over all CPUs.
    fn uplink0_xdp(&self) -> XdpStats {
        let map: PerCpuArray<_, XdpStats> =
            PerCpuArray::try_from(self.ebpf.map(MAP_XDP_STATS).expect("XDP_STATS"))
                .expect("XDP_STATS types");
        let per_cpu = map.get(&0, 0).expect("read XDP_STATS");
        per_cpu.iter().fold(XdpStats::default(), |a, s| XdpStats {
            tx_packets: a.tx_packets + s.tx_packets,
            rx_packets: a.rx_packets + s.rx_packets,
        })
    }

    /// Uplink 0's next hop cached on [`UPLINK_IFINDEX`], which XDP may
    /// redirect to.
    fn cache_hop_for_xdp(&mut self) -> NextHop {
        let mut mac = [0u8; 12];
        mac[..6].copy_from_slice(&MAC_ISP);
        mac[6..].copy_from_slice(&MAC_WANX);
        let hop = NextHop {
            mac,
            ifindex: UPLINK_IFINDEX,
            mtu: 1500,
            valid: 1,
        };
        self.set_next_hop0(hop);
        self.allow_xdp_redirect(UPLINK_IFINDEX);
        hop
    }
}

/// The L4 checksum field of the IPv4 `frame` set as a veth peer with
/// checksum offload leaves it (`CHECKSUM_PARTIAL`): the folded sum of the
/// pseudo-header alone (RFC 793 §3.1, RFC 768), not complemented.
fn with_partial_checksum(frame: &[u8]) -> Vec<u8> {
    let mut f = frame.to_vec();
    let ip = ETH_HLEN;
    let ihl = usize::from(f[ip] & 0x0f) * 4;
    let proto = f[ip + 9];
    let l4_len = (u16_at(&f, ip + 2) as usize - ihl) as u32;
    let mut sum: u32 = 0;
    for off in [12, 14, 16, 18] {
        sum += u32::from(u16_at(&f, ip + off));
    }
    sum += u32::from(proto) + l4_len;
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let at = ip + ihl + if proto == IPPROTO_TCP { 16 } else { 6 };
    f[at..at + 2].copy_from_slice(&(sum as u16).to_be_bytes());
    f
}

#[test]
fn xdp_programs_verify_with_at_least_a_third_of_the_budget_left() {
    with_datapath(|dp| {
        for name in [PROG_XDP_LAN, PROG_XDP_WAN] {
            let used = dp
                .xdp_program(name)
                .info()
                .expect("program info")
                .verified_instruction_count()
                .expect("kernel reports verified instructions");
            eprintln!("{name}: {used} instructions verified");
            assert!(used < 660_000, "{name}: {used} instructions verified");
        }
    });
}

#[test]
fn xdp_lan_redirects_pinned_tcp_and_udp_byte_exact_as_mh_lan_in_rewrites_them() {
    with_datapath(|dp| {
        dp.cache_hop_for_xdp();
        let mut taken = 0;
        for f in &ALL_FLOWS {
            dp.insert_flow(f);
            let input = f.outbound().frame();
            let what = f.name();
            let xdp = dp.run_xdp(PROG_XDP_LAN, &input, 0);
            if f.echo() {
                // ICMP is TC's: passed as it came.
                assert_eq!(xdp.ret, XDP_PASS, "{what}");
                assert!(xdp.out == input, "{what}: passed altered");
                continue;
            }
            taken += 1;
            assert_eq!(xdp.ret, XDP_REDIRECT, "{what}: not taken");
            let mut expected = f.outbound_translated();
            expected.ttl -= 1;
            let expected = ethernet(MAC_ISP, MAC_WANX, ETH_P_IP, &expected.bytes());
            assert!(
                xdp.out == expected,
                "{what}: XDP against the independent translation\n{}",
                describe_difference(&expected, &xdp.out)
            );
            let tc = dp.run(PROG_LAN_IN, &input, 0);
            assert_eq!(tc.ret, TC_ACT_REDIRECT, "{what}: TC");
            assert!(
                xdp.out == tc.out,
                "{what}: XDP against {PROG_LAN_IN}\n{}",
                describe_difference(&tc.out, &xdp.out)
            );
        }
        // Each counted once by each path, as TC counts them.
        assert_eq!(dp.uplink0_stats().tx_packets, 2 * taken);
        assert_eq!(dp.uplink0_xdp().tx_packets, taken);
    });
}

#[test]
fn xdp_lan_keeps_zero_and_ffff_udp_checksums_as_mh_lan_in_does() {
    with_datapath(|dp| {
        dp.cache_hop_for_xdp();
        dp.insert_flow(&UDP_FLOW);
        let mut p = UDP_FLOW.outbound();
        // A payload whose translated checksum computes to zero.
        set_udp_payload(
            &mut p,
            payload_making_udp_checksum_zero(&UDP_FLOW.outbound_translated()),
        );
        let input = p.frame();
        let xdp = dp.run_xdp(PROG_XDP_LAN, &input, 0);
        let tc = dp.run(PROG_LAN_IN, &input, 0);
        assert_eq!((xdp.ret, tc.ret), (XDP_REDIRECT, TC_ACT_REDIRECT));
        let udp_csum = ETH_HLEN + 20 + 6;
        assert_eq!(u16_at(&xdp.out, udp_csum), 0xffff, "sent as 0xffff");
        assert!(
            xdp.out == tc.out,
            "{}",
            describe_difference(&tc.out, &xdp.out)
        );
    });
}

#[test]
fn xdp_lan_passes_every_packet_it_does_not_take_byte_identical_with_the_flow_untouched() {
    with_datapath(|dp| {
        let hop = dp.cache_hop_for_xdp();
        dp.insert_flow(&TCP_FLOW);
        let base = TCP_FLOW.outbound();
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("SYN", with_tcp_flags(base.clone(), TCP_SYN)),
            ("FIN", with_tcp_flags(base.clone(), TCP_FIN | TCP_ACK)),
            ("RST", with_tcp_flags(base.clone(), TCP_RST)),
            ("TTL 1", {
                let mut p = base.clone();
                p.ttl = 1;
                p.frame()
            }),
            ("first fragment", {
                let mut p = base.clone();
                p.frag = IP_MF;
                p.frame()
            }),
            ("unpinned", base.with_source(LAN_HOST, 40999).frame()),
            (
                "partial checksum (offload)",
                with_partial_checksum(&base.frame()),
            ),
        ];
        let before = dp.flows();
        for (what, input) in &cases {
            let run = dp.run_xdp(PROG_XDP_LAN, input, 0);
            assert_eq!(run.ret, XDP_PASS, "{what}");
            assert!(run.out == *input, "{what}: passed altered");
        }
        // The flow and uplink states that TC decides on.
        let input = base.frame();
        let declined = |dp: &mut Datapath, what: &str| {
            let run = dp.run_xdp(PROG_XDP_LAN, &input, 0);
            assert_eq!(run.ret, XDP_PASS, "{what}");
            assert!(run.out == input, "{what}: passed altered");
        };
        for (flags, what) in [
            (FLOW_HAIRPIN, "hairpin"),
            (FLOW_RST_IN, "remote RST armed"),
            (FLOW_FIN_OUT, "closing"),
        ] {
            dp.set_fwd(
                TCP_FLOW.fwd_key(),
                FlowFwd {
                    flags,
                    ..TCP_FLOW.fwd()
                },
            );
            declined(dp, what);
        }
        dp.insert_fwd(&TCP_FLOW);
        dp.edit_uplink0(|u| u.flags |= UPLINK_OUTAGE);
        declined(dp, "uplink in an outage");
        dp.edit_uplink0(|u| {
            u.flags &= !UPLINK_OUTAGE;
            u.addr_be = be(Ipv4Addr::new(198, 18, 11, 9));
        });
        declined(dp, "uplink renumbered");
        dp.edit_uplink0(|u| u.addr_be = be(NAT_ADDR));
        dp.set_next_hop0(NextHop { valid: 0, ..hop });
        declined(dp, "no cached next hop");
        dp.set_next_hop0(NextHop {
            mtu: base.bytes().len() as u32 - 1,
            ..hop
        });
        declined(dp, "over the MTU");
        dp.set_next_hop0(NextHop {
            ifindex: UPLINK_IFINDEX + 1,
            ..hop
        });
        declined(dp, "next hop on another device");
        dp.set_uplink0_ifindex(UPLINK_IFINDEX + 1);
        declined(dp, "device not an XDP redirect target");
        assert_eq!(dp.flows(), before, "declining changes no flow");
        assert_eq!(dp.uplink0_xdp(), XdpStats::default());
    });
}

/// A fresh datapath in a namespace where LAN_HOST is routed: device
/// `mhlan` (198.18.1.254/24) with LAN_HOST's MAC as a permanent
/// neighbour, forwarding on; `f` gets the datapath, the LAN device's
/// index and MAC, and the uplink-side device's index.
fn with_routed_datapath<R>(f: impl FnOnce(&mut Datapath, u32, [u8; 6], u32) -> R) -> R {
    require_root();
    let ns = NetNs::new("trx");
    for cmd in [
        "ip link add mhlan type veth peer name mhwan",
        "ip link set mhlan address 02:00:00:00:01:fe",
        "ip link set mhlan up",
        "ip link set mhwan up",
        "ip addr add 198.18.1.254/24 dev mhlan",
        "ip neigh replace 198.18.1.2 lladdr 02:00:00:00:01:0a dev mhlan nud permanent",
        "sysctl -qw net.ipv4.conf.all.forwarding=1",
    ] {
        ns.exec(&cmd.split(' ').collect::<Vec<_>>());
    }
    assert_eq!(
        LAN_HOST,
        Ipv4Addr::new(198, 18, 1, 2),
        "the neighbour above"
    );
    let index = |name: &str| -> u32 {
        // `ip -o link`: "<index>: <name>@<peer>: ..."
        let out = ns.exec_stdout(&["ip", "-o", "link", "show", name]);
        let index = out.split(':').next().expect("ip -o link output");
        index.trim().parse().expect("ifindex")
    };
    let (lan, wan) = (index("mhlan"), index("mhwan"));
    ns.run(|| {
        let mut dp = Datapath::new();
        f(&mut dp, lan, [0x02, 0, 0, 0, 0x01, 0xfe], wan)
    })
}

const MAC_LAN_HOST: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x0a];

#[test]
fn xdp_wan_redirects_answered_replies_byte_exact_to_the_lan_host_it_resolves() {
    with_routed_datapath(|dp, lan, lan_mac, wan| {
        dp.allow_xdp_redirect(lan);
        let mut taken = 0;
        for f in &ALL_FLOWS {
            dp.set_fwd(
                f.fwd_key(),
                FlowFwd {
                    flags: FLOW_SEEN_REPLY,
                    ..f.fwd()
                },
            );
            dp.insert_rev(f);
            let input = f.reply().frame();
            let what = f.name();
            let run = dp.run_xdp(PROG_XDP_WAN, &input, wan);
            if f.echo() {
                assert_eq!(run.ret, XDP_PASS, "{what}");
                assert!(run.out == input, "{what}: passed altered");
                continue;
            }
            taken += 1;
            assert_eq!(run.ret, XDP_REDIRECT, "{what}: not taken");
            let mut expected = f.reply_translated();
            expected.ttl -= 1;
            let expected = ethernet(MAC_LAN_HOST, lan_mac, ETH_P_IP, &expected.bytes());
            assert!(
                run.out == expected,
                "{what}\n{}",
                describe_difference(&expected, &run.out)
            );
            let tc = dp
                .try_run_iif(PROG_WAN_IN, &input, 0, wan)
                .expect("test run of mh_wan_in");
            assert_eq!(tc.ret, TC_ACT_REDIRECT, "{what}: TC");
            assert!(
                run.out == tc.out,
                "{what}: XDP against {PROG_WAN_IN}\n{}",
                describe_difference(&tc.out, &run.out)
            );
        }
        assert_eq!(dp.uplink0_stats().rx_packets, 2 * taken);
        assert_eq!(dp.uplink0_xdp().rx_packets, taken);
    });
}

#[test]
fn xdp_wan_passes_first_replies_stale_mappings_and_unresolved_hosts_to_tc_unchanged() {
    with_routed_datapath(|dp, lan, _, wan| {
        dp.insert_flow(&UDP_FLOW);
        let input = UDP_FLOW.reply().frame();
        let declined = |dp: &mut Datapath, what: &str| {
            let run = dp.run_xdp(PROG_XDP_WAN, &input, wan);
            assert_eq!(run.ret, XDP_PASS, "{what}");
            assert!(run.out == input, "{what}: passed altered");
        };
        dp.allow_xdp_redirect(lan);
        declined(dp, "first reply (passive health is TC's)");
        let answered = FlowFwd {
            flags: FLOW_SEEN_REPLY,
            ..UDP_FLOW.fwd()
        };
        dp.set_fwd(
            UDP_FLOW.fwd_key(),
            FlowFwd {
                nat_port_be: 61999u16.to_be(),
                ..answered
            },
        );
        declined(dp, "reverse entry of an older mapping");
        dp.set_fwd(UDP_FLOW.fwd_key(), answered);
        declined_without_neighbour(dp, &input, wan);
        dp.edit_uplink0(|u| u.flags |= UPLINK_OUTAGE);
        declined(dp, "uplink in an outage");
        dp.edit_uplink0(|u| u.flags &= !UPLINK_OUTAGE);
        let run = dp.run_xdp(PROG_XDP_WAN, &input, wan);
        assert_eq!(
            run.ret, XDP_REDIRECT,
            "the same reply once nothing stands in the way"
        );
    });
}

/// A reply to a LAN host whose neighbour the kernel does not know (the
/// lookup answers `NO_NEIGH`) passes unchanged: the stack resolves it.
fn declined_without_neighbour(dp: &mut Datapath, input: &[u8], wan: u32) {
    let unknown = Ipv4Addr::new(198, 18, 1, 3);
    let mut rev: HashMap<_, FlowKey, FlowRev> =
        HashMap::try_from(dp.ebpf.map_mut(MAP_CONN_REV).expect("CONN_REV map"))
            .expect("CONN_REV types");
    let moved = FlowRev {
        lan_addr_be: be(unknown),
        ..UDP_FLOW.rev()
    };
    rev.insert(UDP_FLOW.rev_key(), moved, 0)
        .expect("insert CONN_REV");
    let key = FlowKey {
        saddr_be: be(unknown),
        ..UDP_FLOW.fwd_key()
    };
    dp.set_fwd(
        key,
        FlowFwd {
            flags: FLOW_SEEN_REPLY,
            ..UDP_FLOW.fwd()
        },
    );
    let run = dp.run_xdp(PROG_XDP_WAN, input, wan);
    assert_eq!(run.ret, XDP_PASS, "no neighbour");
    assert!(run.out == input, "no neighbour: passed altered");
    dp.insert_rev(&UDP_FLOW);
}

/// An IPv6 frame from `src` (a UDP datagram to 2001:db8:11::fe).
fn ipv6_frame(src: [u8; 16]) -> Vec<u8> {
    let mut ip = vec![0x60, 0, 0, 0, 0, 8, IPPROTO_UDP, 64];
    ip.extend(src);
    ip.extend([
        0x20, 0x01, 0x0d, 0xb8, 0, 0x11, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xfe,
    ]);
    ip.extend([0x30, 0x39, 0, 9, 0, 8, 0, 0]);
    ethernet(MAC_B, MAC_A, ETH_P_IPV6, &ip)
}

#[test]
fn wan_out_passes_forwarded_ipv6_from_a_routed_prefix_and_the_gateways_own() {
    with_datapath(|dp| {
        let routed: [u8; 16] = [
            0x20, 0x01, 0x0d, 0xb8, 0, 0x50, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2,
        ];
        let ula: [u8; 16] = [0xfd, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
        {
            let mut trie: LpmTrie<_, Routed6Key, u32> =
                LpmTrie::try_from(dp.ebpf.map_mut(MAP_ROUTED6).expect("ROUTED6"))
                    .expect("ROUTED6 types");
            let mut prefix = [0u8; 16];
            prefix[..6].copy_from_slice(&routed[..6]);
            trie.insert(&Key::new(48, Routed6Key { addr: prefix }), 1, 0)
                .expect("insert ROUTED6");
        }
        let input = ipv6_frame(routed);
        let (run, counted) = dp.run_counted(PROG_WAN_OUT, &input, 0);
        assert_untouched(&run, &input, "routed IPv6 prefix");
        assert_eq!(counted, NOTHING);
        let input = ipv6_frame(ula);
        let (run, counted) = dp.run_counted(PROG_WAN_OUT, &input, 0);
        assert_eq!(run.ret, TC_ACT_SHOT, "a ULA source leaves");
        assert_eq!(counted, [(Reason::ForeignSource, 1)]);
        // Another uplink's routed prefix does not open this one.
        dp.set_uplink0_ifindex(UPLINK_IFINDEX + 1);
        let input = ipv6_frame(routed);
        let (run, _) = dp.run_counted(PROG_WAN_OUT, &input, 0);
        assert_eq!(
            run.ret, TC_ACT_SHOT,
            "routed by an uplink on another device"
        );
        // The gateway's own IPv6 (ND, RA, its sockets) is not guarded.
        dp.host_origin = true;
        let input = ipv6_frame(ula);
        let (run, _) = dp.run_counted(PROG_WAN_OUT, &input, 0);
        assert_untouched(&run, &input, "the gateway's own IPv6");
    });
}

// IPv6: NPTv6 of uplink 0 from INNER6/64 onto OUTER6/64.

const INNER6: &str = "fd00:1::";
const OUTER6: &str = "2001:db8:11:100::";
const LAN_HOST6: &str = "fd00:1::2";
const REMOTE6: &str = "2001:db8:ff::10";
const ROUTER6: &str = "2001:db8:1::1";

fn v6(s: &str) -> std::net::Ipv6Addr {
    s.parse().expect("IPv6 address")
}

/// `a` with its /64 `from` replaced by `to`, worked out by hand from RFC
/// 6296 §3.2 (not with the datapath's code): the prefixes' word sums'
/// difference, mod 0xffff, added to the first identifier word that is not
/// 0xffff, a result of 0xffff written as 0.
fn npt_by_hand(a: &str, from: &str, to: &str) -> String {
    let sum = |p: &str| -> u32 { v6(p).segments()[..4].iter().map(|w| u32::from(*w)).sum() };
    let adj = (sum(from) % 0xffff + 0xffff - sum(to) % 0xffff) % 0xffff;
    let mut w = v6(a).segments();
    w[..4].copy_from_slice(&v6(to).segments()[..4]);
    let i = (4..8).find(|i| w[*i] != 0xffff).expect("a word to adjust");
    let v = (u32::from(w[i]) + adj) % 0xffff;
    w[i] = if v == 0xffff { 0 } else { v as u16 };
    std::net::Ipv6Addr::from(w).to_string()
}

/// `p` with `edit` applied and its checksum left as it was, after
/// checking that a full recomputation gives that same checksum: the
/// rewrite is checksum-neutral, as RFC 6296 promises.
#[track_caller]
fn neutral(p: &Ipv6, edit: impl FnOnce(&mut Ipv6)) -> Vec<u8> {
    let mut q = p.clone();
    edit(&mut q);
    let mut recomputed = q.clone();
    recomputed.refresh_checksum();
    assert_eq!(
        recomputed.checksum(),
        p.checksum(),
        "the mapping changed the checksum sum"
    );
    q.frame()
}

/// `mh_wan_out6` sends `p` with uplink 0's mark as `expected`, counting
/// it on the uplink and no reason.
#[track_caller]
fn assert_wan_out6_sends(dp: &mut Datapath, p: &Ipv6, expected: &[u8]) {
    let (run, counted) = dp.run_counted(PROG_WAN_OUT6, &p.frame(), UPLINK_MARK);
    assert_passed_as(&run, expected, &format!("next header {}", p.next));
    assert_eq!(counted, vec![], "next header {}", p.next);
    assert_eq!(dp.uplink0_stats().tx_packets, 1);
}

/// [`ROUTER6`]'s Packet Too Big (MTU 1280) to `to`, quoting `sent`.
fn packet_too_big(to: &str, sent: &Ipv6) -> Ipv6 {
    let mtu = 1280u32.to_be_bytes();
    Ipv6::icmp(ROUTER6, to, ICMPV6_PACKET_TOO_BIG, 0, mtu, &sent.bytes())
}

/// An error about the LAN host's 64-byte datagram from port 40001 to
/// [`REMOTE6`]:53, as the host must get it: to its address, quoting what
/// it sent.
fn back_to_the_lan_host(q: &mut Ipv6) {
    let inner = Ipv6::udp(LAN_HOST6, REMOTE6, 40001, 53, &[7u8; 64]);
    q.dst = v6(LAN_HOST6);
    q.l4[8..].copy_from_slice(&inner.bytes());
}

fn flow6(lan_port: u16, remote_port: u16, proto: u8) -> Flow6Key {
    Flow6Key {
        lan: v6(LAN_HOST6).octets(),
        remote: v6(REMOTE6).octets(),
        lan_port_be: lan_port.to_be(),
        remote_port_be: remote_port.to_be(),
        proto,
        _pad0: 0,
        _pad1: 0,
    }
}

#[test]
fn wan_out6_maps_a_marked_lan_source_onto_the_uplink_prefix_keeping_every_checksum() {
    for p in [
        Ipv6::udp(LAN_HOST6, REMOTE6, 40001, 53, b"query"),
        Ipv6::tcp(LAN_HOST6, REMOTE6, 40000, 443, TCP_SYN),
        Ipv6::icmp(
            LAN_HOST6,
            REMOTE6,
            ICMPV6_ECHO_REQUEST,
            0,
            [0, 7, 0, 1],
            b"ping",
        ),
        Ipv6::udp("fd00:1::ffff:ffff:ffff:1", REMOTE6, 40001, 53, b"q"),
    ] {
        with_datapath(|dp| {
            dp.set_uplink6_0();
            let expected = neutral(&p, |q| {
                q.src = v6(&npt_by_hand(&q.src.to_string(), INNER6, OUTER6));
            });
            assert_wan_out6_sends(dp, &p, &expected);
        });
    }
}

#[test]
fn wan_out6_drops_an_unmarked_lan_source_and_an_unmappable_address() {
    with_datapath(|dp| {
        dp.set_uplink6_0();
        let p = Ipv6::udp(LAN_HOST6, REMOTE6, 40001, 53, b"query");
        let (run, counted) = dp.run_counted(PROG_WAN_OUT6, &p.frame(), 0);
        assert_eq!(run.ret, TC_ACT_SHOT);
        assert_eq!(counted, vec![(Reason::ForeignSource, 1)]);
        // RFC 6296 §3.5: every identifier word 0xffff cannot be mapped.
        let p = Ipv6::udp("fd00:1::ffff:ffff:ffff:ffff", REMOTE6, 1, 53, b"q");
        let (run, counted) = dp.run_counted(PROG_WAN_OUT6, &p.frame(), UPLINK_MARK);
        assert_eq!(run.ret, TC_ACT_SHOT);
        assert_eq!(counted, vec![(Reason::NptUntranslatable, 1)]);
    });
}

#[test]
fn wan_in6_maps_a_reply_back_for_its_flow_and_drops_the_unsolicited() {
    with_datapath(|dp| {
        dp.set_uplink6_0();
        let mapped = npt_by_hand(LAN_HOST6, INNER6, OUTER6);
        let reply = Ipv6::udp(REMOTE6, &mapped, 53, 40001, b"answer");
        let (run, counted) = dp.run_counted(PROG_WAN_IN6, &reply.frame(), 0);
        assert_eq!(run.ret, TC_ACT_SHOT, "no flow yet");
        assert_eq!(counted, vec![(Reason::Unsolicited, 1)]);
        dp.conn6()
            .insert(flow6(40001, 53, IPPROTO_UDP), Flow6::default(), 0)
            .expect("pin the flow");
        let expected = neutral(&reply, |q| q.dst = v6(LAN_HOST6));
        let (run, counted) = dp.run_counted(PROG_WAN_IN6, &reply.frame(), 0);
        assert_passed_as(&run, &expected, "reply");
        // No route in the test's namespace: the kernel's path, mapped.
        assert_eq!(counted, vec![(Reason::SlowPath, 1)]);
        let f = dp
            .conn6()
            .get(&flow6(40001, 53, IPPROTO_UDP), 0)
            .expect("flow");
        assert_ne!(f.flags & FLOW_SEEN_REPLY, 0, "the reply is recorded");
        let other_port = Ipv6::udp(REMOTE6, &mapped, 53, 40002, b"knock");
        let (run, counted) = dp.run_counted(PROG_WAN_IN6, &other_port.frame(), 0);
        assert_eq!(run.ret, TC_ACT_SHOT);
        assert_eq!(counted, vec![(Reason::Unsolicited, 1)]);
        // Not to the uplink's prefix (the gateway's own, NDP): untouched.
        let own = Ipv6::udp(REMOTE6, "2001:db8:11::1", 53, 40001, b"mine");
        let run = dp.run(PROG_WAN_IN6, &own.frame(), 0);
        assert_untouched(&run, &own.frame(), "the gateway's own");
    });
}

#[test]
fn wan_in6_maps_an_icmpv6_error_outer_and_quoted_address_alike() {
    with_datapath(|dp| {
        dp.set_uplink6_0();
        dp.conn6()
            .insert(flow6(40001, 53, IPPROTO_UDP), Flow6::default(), 0)
            .expect("pin the flow");
        let mapped = npt_by_hand(LAN_HOST6, INNER6, OUTER6);
        let sent = Ipv6::udp(&mapped, REMOTE6, 40001, 53, &[7u8; 64]);
        let ptb = packet_too_big(&mapped, &sent);
        let expected = neutral(&ptb, back_to_the_lan_host);
        let (run, counted) = dp.run_counted(PROG_WAN_IN6, &ptb.frame(), 0);
        assert_passed_as(&run, &expected, "packet too big");
        assert_eq!(counted, vec![]);
        // Quoting a flow that does not exist: dropped.
        let stray = Ipv6::udp(&mapped, REMOTE6, 40009, 53, b"?");
        let err = Ipv6::icmp(
            ROUTER6,
            &mapped,
            ICMPV6_DEST_UNREACH,
            4,
            [0; 4],
            &stray.bytes(),
        );
        let (run, counted) = dp.run_counted(PROG_WAN_IN6, &err.frame(), 0);
        assert_eq!(run.ret, TC_ACT_SHOT);
        assert_eq!(counted, vec![(Reason::Unsolicited, 1)]);
    });
}

#[test]
fn the_gateways_own_icmpv6_error_quotes_the_mapped_address() {
    with_datapath(|dp| {
        dp.set_uplink6_0();
        dp.host_origin = true;
        // The gateway could not forward a reply to the LAN host (already
        // mapped back) and answers the remote from its own address.
        let reply = Ipv6::udp(REMOTE6, LAN_HOST6, 53, 40001, b"answer");
        let err = Ipv6::icmp(
            "2001:db8:11::1",
            REMOTE6,
            ICMPV6_DEST_UNREACH,
            3,
            [0; 4],
            &reply.bytes(),
        );
        let mapped = npt_by_hand(LAN_HOST6, INNER6, OUTER6);
        let quoted = Ipv6::udp(REMOTE6, &mapped, 53, 40001, b"answer");
        let expected = neutral(&err, |q| q.l4[8..].copy_from_slice(&quoted.bytes()));
        let run = dp.run(PROG_WAN_OUT6, &err.frame(), 0);
        assert_passed_as(&run, &expected, "the gateway's error");
    });
}

/// Under NAT66 the gateway's own error about a reply it could not pass on
/// quotes the reply as the remote sent it: to the uplink's address and
/// the flow's port, its checksum recomputed, and the ICMPv6 checksum
/// with it; the outer source is the gateway's already.
#[test]
fn the_gateways_own_icmpv6_error_quotes_the_nat66_address_and_port() {
    with_datapath(|dp| {
        dp.set_uplink6_0_nat66();
        pin_nat66(dp, flow6(40001, 53, IPPROTO_UDP), NAT6_PORT);
        dp.host_origin = true;
        let reply = Ipv6::udp(REMOTE6, LAN_HOST6, 53, 40001, b"answer");
        let err = Ipv6::icmp(
            NAT6_ADDR,
            REMOTE6,
            ICMPV6_DEST_UNREACH,
            3,
            [0; 4],
            &reply.bytes(),
        );
        let expected = recomputed(&err, |q| {
            let as_sent = Ipv6::udp(REMOTE6, NAT6_ADDR, 53, NAT6_PORT, b"answer");
            q.l4[8..].copy_from_slice(&as_sent.bytes());
        });
        let run = dp.run(PROG_WAN_OUT6, &err.frame(), 0);
        assert_passed_as(&run, &expected, "the gateway's error");
    });
}

#[test]
fn lan_in6_pins_a_new_connection_marks_it_and_leaves_other_sources_alone() {
    with_datapath(|dp| {
        dp.set_uplink6_0();
        let p = Ipv6::udp(LAN_HOST6, REMOTE6, 40001, 53, b"query");
        let (run, counted) = dp.run_counted(PROG_LAN_IN6, &p.frame(), 0);
        assert_untouched(&run, &p.frame(), "the LAN program leaves it to egress");
        assert_eq!(run.mark, UPLINK_MARK);
        assert_eq!(counted, vec![]);
        let f = dp
            .conn6()
            .get(&flow6(40001, 53, IPPROTO_UDP), 0)
            .expect("the flow is pinned");
        assert_eq!(f.uplink, 0);
        assert_eq!(dp.uplink0_stats().new_flows, 1);
        for (src, dst, reason) in [
            ("fd00:2::5", REMOTE6, Reason::SpoofedSource),
            (LAN_HOST6, "fd00:1::9", Reason::NotUnicast),
            (LAN_HOST6, "2001:db8:11:100::9", Reason::NotForUplink),
        ] {
            let q = Ipv6::udp(src, dst, 40001, 53, b"query");
            let (run, counted) = dp.run_counted(PROG_LAN_IN6, &q.frame(), 0);
            assert_untouched(&run, &q.frame(), src);
            assert_eq!(run.mark, 0, "{src} -> {dst}");
            assert_eq!(counted, vec![(reason, 1)], "{src} -> {dst}");
        }
    });
}

/// Three internal prefixes of one LAN, as `lan_prefixes6` lists them,
/// and the /64s of uplink 0 they map onto.
const LANS6: [(&str, &str); 3] = [
    (INNER6, OUTER6),
    ("fd00:aa::", "2001:db8:11:101::"),
    ("fd12:3456::", "2001:db8:11:102::"),
];

#[test]
fn several_internal_prefixes_each_map_onto_their_own_prefix_both_ways_byte_exact() {
    with_datapath(|dp| {
        dp.set_uplink6_0_lans(&LANS6);
        for (inner, outer) in LANS6 {
            let host = format!("{inner}2");
            let mapped = npt_by_hand(&host, inner, outer);
            // Out: pinned by the LAN program, mapped on egress.
            let p = Ipv6::udp(&host, REMOTE6, 40001, 53, b"query");
            let (run, counted) = dp.run_counted(PROG_LAN_IN6, &p.frame(), 0);
            assert_eq!((run.mark, counted), (UPLINK_MARK, vec![]), "{host}: pinned");
            let expected = neutral(&p, |q| q.src = v6(&mapped));
            let run = dp.run(PROG_WAN_OUT6, &p.frame(), UPLINK_MARK);
            assert_passed_as(&run, &expected, &host);
            // In: the reply and an error quoting the host's packet.
            let reply = Ipv6::udp(REMOTE6, &mapped, 53, 40001, b"answer");
            let expected = neutral(&reply, |q| q.dst = v6(&host));
            let run = dp.run(PROG_WAN_IN6, &reply.frame(), 0);
            assert_passed_as(&run, &expected, &format!("reply to {host}"));
            let sent = Ipv6::udp(&mapped, REMOTE6, 40001, 53, b"query");
            let ptb = packet_too_big(&mapped, &sent);
            let expected = neutral(&ptb, |q| {
                q.dst = v6(&host);
                let quoted = Ipv6::udp(&host, REMOTE6, 40001, 53, b"query");
                q.l4[8..].copy_from_slice(&quoted.bytes());
            });
            let (run, counted) = dp.run_counted(PROG_WAN_IN6, &ptb.frame(), 0);
            assert_passed_as(&run, &expected, &format!("error to {host}"));
            assert_eq!(counted, vec![], "error to {host}");
        }
        // Neither a fourth internal prefix nor a fourth subnet of the
        // uplink's is anyone's.
        let q = Ipv6::udp("fd00:bb::2", REMOTE6, 40001, 53, b"query");
        let (run, counted) = dp.run_counted(PROG_LAN_IN6, &q.frame(), 0);
        assert_eq!((run.mark, counted), (0, vec![(Reason::SpoofedSource, 1)]));
        let (run, counted) = dp.run_counted(PROG_WAN_OUT6, &q.frame(), UPLINK_MARK);
        assert_eq!(run.ret, TC_ACT_SHOT);
        assert_eq!(counted, vec![(Reason::ForeignSource, 1)]);
        let stray = Ipv6::udp(REMOTE6, "2001:db8:11:103::2", 53, 40001, b"?");
        let run = dp.run(PROG_WAN_IN6, &stray.frame(), 0);
        assert_untouched(&run, &stray.frame(), "not one of the uplink's prefixes");
    });
}

#[test]
fn ipv6_programs_walk_an_extension_header_to_the_ports_both_ways() {
    with_datapath(|dp| {
        dp.set_uplink6_0();
        let mut out = Ipv6::udp(LAN_HOST6, REMOTE6, 40001, 53, b"query");
        out.hop_by_hop = true;
        let expected = neutral(&out, |q| {
            q.src = v6(&npt_by_hand(LAN_HOST6, INNER6, OUTER6))
        });
        let run = dp.run(PROG_WAN_OUT6, &out.frame(), UPLINK_MARK);
        assert_passed_as(&run, &expected, "out, with hop-by-hop options");
        dp.conn6()
            .insert(flow6(40001, 53, IPPROTO_UDP), Flow6::default(), 0)
            .expect("pin the flow");
        let mapped = npt_by_hand(LAN_HOST6, INNER6, OUTER6);
        let mut reply = Ipv6::udp(REMOTE6, &mapped, 53, 40001, b"answer");
        reply.hop_by_hop = true;
        let expected = neutral(&reply, |q| q.dst = v6(LAN_HOST6));
        let run = dp.run(PROG_WAN_IN6, &reply.frame(), 0);
        assert_passed_as(&run, &expected, "in, with hop-by-hop options");
        // Another port behind the same header: no flow, dropped.
        let mut knock = Ipv6::udp(REMOTE6, &mapped, 53, 40002, b"knock");
        knock.hop_by_hop = true;
        let (run, counted) = dp.run_counted(PROG_WAN_IN6, &knock.frame(), 0);
        assert_eq!(run.ret, TC_ACT_SHOT);
        assert_eq!(counted, vec![(Reason::Unsolicited, 1)]);
    });
}

/// NAT66's address in these tests (uplink 0's one address).
const NAT6_ADDR: &str = "2001:db8:11::1";
/// The port a NAT66 flow holds in these tests.
const NAT6_PORT: u16 = 61000;

/// `p` with `edit` applied and its L4 checksum computed from scratch: what
/// NAT66's incremental updates must come to.
fn recomputed(p: &Ipv6, edit: impl FnOnce(&mut Ipv6)) -> Vec<u8> {
    let mut q = p.clone();
    edit(&mut q);
    q.refresh_checksum();
    q.frame()
}

/// Pins `key`'s flow to uplink 0 under NAT66 with [`NAT6_PORT`] (0: none
/// reserved yet) and, with a port, its `NAT6` entry.
fn pin_nat66(dp: &mut Datapath, key: Flow6Key, port: u16) {
    let f = Flow6 {
        nat_port_be: port.to_be(),
        ..Default::default()
    };
    dp.conn6().insert(key, f, 0).expect("pin the flow");
    if port != 0 {
        let lan = Nat6Lan {
            lan: key.lan,
            lan_port_be: key.lan_port_be,
            _pad: 0,
        };
        dp.nat6()
            .insert(key.nat6(0, port.to_be()), lan, 0)
            .expect("reserve the port");
    }
}

#[test]
fn wan_out6_nat66_rewrites_source_and_port_with_checksums_as_recomputed_byte_exact() {
    let echo = Ipv6::icmp(
        LAN_HOST6,
        REMOTE6,
        ICMPV6_ECHO_REQUEST,
        0,
        [0x9c, 0x41, 0, 1],
        b"ping",
    );
    for (p, key) in [
        (
            Ipv6::udp(LAN_HOST6, REMOTE6, 40001, 53, b"query"),
            flow6(40001, 53, IPPROTO_UDP),
        ),
        (
            Ipv6::tcp(LAN_HOST6, REMOTE6, 40000, 443, TCP_SYN),
            flow6(40000, 443, IPPROTO_TCP),
        ),
        (echo.clone(), flow6(40001, 0, IPPROTO_ICMPV6)),
    ] {
        with_datapath(|dp| {
            dp.set_uplink6_0_nat66();
            pin_nat66(dp, key, NAT6_PORT);
            let expected = recomputed(&p, |q| {
                q.src = v6(NAT6_ADDR);
                let at = if q.next == IPPROTO_ICMPV6 { 4 } else { 0 };
                q.l4[at..at + 2].copy_from_slice(&NAT6_PORT.to_be_bytes());
            });
            assert_wan_out6_sends(dp, &p, &expected);
        });
    }
}

#[test]
fn wan_out6_nat66_reserves_a_port_at_the_first_packet_and_keeps_it() {
    with_datapath(|dp| {
        dp.set_uplink6_0_nat66();
        let key = flow6(40001, 53, IPPROTO_UDP);
        pin_nat66(dp, key, 0);
        let p = Ipv6::udp(LAN_HOST6, REMOTE6, 40001, 53, b"query");
        let first = dp.run(PROG_WAN_OUT6, &p.frame(), UPLINK_MARK);
        let port = dp.conn6().get(&key, 0).expect("the flow").nat_port_be;
        assert_ne!(port, 0, "no port reserved");
        let lan = dp
            .nat6()
            .get(&key.nat6(0, port), 0)
            .expect("its NAT6 entry");
        assert_eq!((lan.lan, lan.lan_port_be), (key.lan, key.lan_port_be));
        let expected = recomputed(&p, |q| {
            q.src = v6(NAT6_ADDR);
            q.l4[0..2].copy_from_slice(&u16::from_be(port).to_be_bytes());
        });
        assert_passed_as(&first, &expected, "first packet");
        let second = dp.run(PROG_WAN_OUT6, &p.frame(), UPLINK_MARK);
        assert_passed_as(&second, &expected, "second packet");
    });
}

#[test]
fn wan_in6_nat66_maps_a_reply_to_its_lan_endpoint_and_leaves_the_rest_to_the_gateway() {
    with_datapath(|dp| {
        dp.set_uplink6_0_nat66();
        pin_nat66(dp, flow6(40001, 53, IPPROTO_UDP), NAT6_PORT);
        let reply = Ipv6::udp(REMOTE6, NAT6_ADDR, 53, NAT6_PORT, b"answer");
        let expected = recomputed(&reply, |q| {
            q.dst = v6(LAN_HOST6);
            q.l4[2..4].copy_from_slice(&40001u16.to_be_bytes());
        });
        let (run, counted) = dp.run_counted(PROG_WAN_IN6, &reply.frame(), 0);
        assert_passed_as(&run, &expected, "reply");
        assert_eq!(counted, vec![(Reason::SlowPath, 1)]);
        let f = dp
            .conn6()
            .get(&flow6(40001, 53, IPPROTO_UDP), 0)
            .expect("flow");
        assert_ne!(f.flags & FLOW_SEEN_REPLY, 0, "the reply is not recorded");
        // Another port on the address is the gateway's own: untouched.
        let own = Ipv6::tcp(REMOTE6, NAT6_ADDR, 40000, 22, TCP_SYN);
        let (run, counted) = dp.run_counted(PROG_WAN_IN6, &own.frame(), 0);
        assert_untouched(&run, &own.frame(), "to the gateway");
        assert_eq!(counted, vec![(Reason::NoMapping, 1)]);
    });
}

#[test]
fn wan_in6_nat66_maps_a_packet_too_big_outer_and_quoted_with_every_checksum() {
    with_datapath(|dp| {
        dp.set_uplink6_0_nat66();
        pin_nat66(dp, flow6(40001, 53, IPPROTO_UDP), NAT6_PORT);
        let sent = Ipv6::udp(NAT6_ADDR, REMOTE6, NAT6_PORT, 53, &[7u8; 64]);
        let ptb = packet_too_big(NAT6_ADDR, &sent);
        // The quoted packet as the LAN host sent it, its checksum computed
        // anew; then the ICMPv6 checksum over it.
        let expected = recomputed(&ptb, back_to_the_lan_host);
        let (run, counted) = dp.run_counted(PROG_WAN_IN6, &ptb.frame(), 0);
        assert_passed_as(&run, &expected, "packet too big");
        assert_eq!(counted, vec![]);
        // Quoting a port no flow holds: the gateway's own, untouched.
        let stray = Ipv6::udp(NAT6_ADDR, REMOTE6, 61001, 53, b"?");
        let err = Ipv6::icmp(
            ROUTER6,
            NAT6_ADDR,
            ICMPV6_DEST_UNREACH,
            4,
            [0; 4],
            &stray.bytes(),
        );
        let (run, counted) = dp.run_counted(PROG_WAN_IN6, &err.frame(), 0);
        assert_untouched(&run, &err.frame(), "unknown quoted port");
        assert_eq!(counted, vec![(Reason::IcmpNoMapping, 1)]);
    });
}

/// A LAN host's Port Unreachable about a datagram of a NAT66 flow that
/// came in: it leaves from the uplink's address, quoting the datagram as
/// the remote sent it (to the NAT address and port, its checksum
/// recomputed), with every checksum as computed anew. One about a port no
/// flow holds, or a flow of another mode, meets the egress guard.
#[test]
fn wan_out6_nat66_maps_a_lan_hosts_error_outer_and_quoted_with_every_checksum() {
    with_datapath(|dp| {
        dp.set_uplink6_0_nat66();
        pin_nat66(dp, flow6(40001, 53, IPPROTO_UDP), NAT6_PORT);
        let delivered = Ipv6::udp(REMOTE6, LAN_HOST6, 53, 40001, &[7u8; 64]);
        let err = Ipv6::icmp(
            LAN_HOST6,
            REMOTE6,
            ICMPV6_DEST_UNREACH,
            4,
            [0; 4],
            &delivered.bytes(),
        );
        let expected = recomputed(&err, |q| {
            let as_sent = Ipv6::udp(REMOTE6, NAT6_ADDR, 53, NAT6_PORT, &[7u8; 64]);
            q.src = v6(NAT6_ADDR);
            q.l4[8..].copy_from_slice(&as_sent.bytes());
        });
        assert_wan_out6_sends(dp, &err, &expected);

        let stray = Ipv6::udp(REMOTE6, LAN_HOST6, 53, 40002, b"?");
        let err = Ipv6::icmp(
            LAN_HOST6,
            REMOTE6,
            ICMPV6_DEST_UNREACH,
            4,
            [0; 4],
            &stray.bytes(),
        );
        let (run, counted) = dp.run_counted(PROG_WAN_OUT6, &err.frame(), UPLINK_MARK);
        assert_eq!(run.ret, TC_ACT_SHOT, "unknown quoted port");
        assert_eq!(counted, vec![(Reason::ForeignSource, 1)]);
    });
}

#[test]
fn an_ipv6_host_at_its_quota_is_refused_and_counted_and_its_flows_are_counted() {
    with_datapath(|dp| {
        dp.set_uplink6_0();
        let p = Ipv6::udp(LAN_HOST6, REMOTE6, 40001, 53, b"query");
        let (_, counted) = dp.run_counted(PROG_LAN_IN6, &p.frame(), 0);
        assert_eq!(counted, vec![], "below the quota");
        let host = v6(LAN_HOST6).octets();
        let hosts6 = |dp: &mut Datapath| -> HostFlows {
            let m: HashMap<_, [u8; 16], HostFlows> =
                HashMap::try_from(dp.ebpf.map(MAP_HOSTS6).expect("HOSTS6")).expect("types");
            m.get(&host, 0).expect("the host's entry")
        };
        assert_eq!(hosts6(dp).flows, 1, "the new flow is not counted");
        {
            let mut m: HashMap<_, [u8; 16], HostFlows> =
                HashMap::try_from(dp.ebpf.map_mut(MAP_HOSTS6).expect("HOSTS6")).expect("types");
            let at_quota = HostFlows {
                flows: u64::from(PER_HOST),
                refused: 0,
            };
            m.insert(host, at_quota, 0).expect("insert");
        }
        for port in [40002, 40003] {
            let q = Ipv6::udp(LAN_HOST6, REMOTE6, port, 53, b"query");
            let (run, counted) = dp.run_counted(PROG_LAN_IN6, &q.frame(), 0);
            assert_eq!(run.ret, TC_ACT_SHOT);
            assert_eq!(counted, vec![(Reason::HostQuota, 1)]);
        }
        assert_eq!(hosts6(dp).refused, 2);
        // Its pinned flow goes on; another host is not held to its quota.
        // (No route in the test's namespace: the kernel's path.)
        let (run, counted) = dp.run_counted(PROG_LAN_IN6, &p.frame(), 0);
        assert_eq!(
            (run.ret, counted),
            (TC_ACT_UNSPEC, vec![(Reason::SlowPath, 1)]),
            "a pinned flow"
        );
        let other = Ipv6::udp("fd00:1::9", REMOTE6, 40002, 53, b"query");
        let (_, counted) = dp.run_counted(PROG_LAN_IN6, &other.frame(), 0);
        assert_eq!(counted, vec![], "another host");
    });
}

/// A LAN host's MAC in these tests, and the LAN device's.
const MAC_HOST: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x01, 0x02];
const MAC_LAN: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x01, 0x01];

/// A `LAN_HOPS` entry: [`MAC_HOST`] behind [`MAC_LAN`] on device 1.
fn lan_hop(mtu: u32) -> NextHop {
    let mut mac = [0u8; 12];
    mac[..6].copy_from_slice(&MAC_HOST);
    mac[6..].copy_from_slice(&MAC_LAN);
    NextHop {
        mac,
        ifindex: 1,
        mtu,
        valid: 1,
    }
}

#[test]
fn wan_in_reply_to_a_cached_lan_host_is_translated_and_redirected_without_a_route() {
    with_datapath(|dp| {
        dp.insert_flow(&UDP_FLOW);
        let input = UDP_FLOW.reply().frame();
        // No route to the LAN in the test's namespace: the kernel's path.
        let (run, _) = dp.run_counted(PROG_WAN_IN, &input, 0);
        assert_eq!(run.ret, TC_ACT_UNSPEC, "no route, no cache");
        {
            let mut hops: HashMap<_, u32, NextHop> =
                HashMap::try_from(dp.ebpf.map_mut(MAP_LAN_HOPS).expect("LAN_HOPS")).expect("types");
            hops.insert(be(LAN_HOST), lan_hop(1500), 0).expect("insert");
        }
        let mut expected = UDP_FLOW.reply_translated();
        expected.ttl -= 1;
        let (run, counted) = dp.run_counted(PROG_WAN_IN, &input, 0);
        assert_eq!(run.ret, TC_ACT_REDIRECT, "cached, so forwarded");
        let expected = ethernet(MAC_HOST, MAC_LAN, ETH_P_IP, &expected.bytes());
        assert!(
            run.out == expected,
            "{}",
            describe_difference(&expected, &run.out)
        );
        assert_eq!(counted, NOTHING);
        // Too big for the entry's MTU: the lookup (the kernel's path here).
        {
            let mut hops: HashMap<_, u32, NextHop> =
                HashMap::try_from(dp.ebpf.map_mut(MAP_LAN_HOPS).expect("LAN_HOPS")).expect("types");
            let mtu = UDP_FLOW.reply().bytes().len() as u32 - 1;
            hops.insert(be(LAN_HOST), lan_hop(mtu), 0).expect("insert");
        }
        let (run, _) = dp.run_counted(PROG_WAN_IN, &input, 0);
        assert_eq!(run.ret, TC_ACT_UNSPEC, "over the cached MTU");
    });
}

/// `mh_xdp_wan` sends a reply to the LAN host's cached next hop, as
/// `mh_wan_in` does, with no route to look up; without an entry, over its
/// MTU, or to a device it may not redirect to, the reply takes TC.
#[test]
fn xdp_wan_redirects_a_reply_to_a_cached_lan_host_without_a_route() {
    with_datapath(|dp| {
        dp.set_fwd(
            UDP_FLOW.fwd_key(),
            FlowFwd {
                flags: FLOW_SEEN_REPLY,
                ..UDP_FLOW.fwd()
            },
        );
        dp.insert_rev(&UDP_FLOW);
        let input = UDP_FLOW.reply().frame();
        let set_hop = |dp: &mut Datapath, hop: NextHop| {
            let mut hops: HashMap<_, u32, NextHop> =
                HashMap::try_from(dp.ebpf.map_mut(MAP_LAN_HOPS).expect("LAN_HOPS")).expect("types");
            hops.insert(be(LAN_HOST), hop, 0).expect("insert");
        };
        let declined = |dp: &mut Datapath, what: &str| {
            let run = dp.run_xdp(PROG_XDP_WAN, &input, 0);
            assert_eq!(run.ret, XDP_PASS, "{what}");
            assert!(run.out == input, "{what}: passed altered");
        };
        dp.allow_xdp_redirect(1);
        declined(dp, "no route, no cache");
        set_hop(dp, lan_hop(1500));
        let run = dp.run_xdp(PROG_XDP_WAN, &input, 0);
        assert_eq!(run.ret, XDP_REDIRECT, "cached, so taken");
        let mut expected = UDP_FLOW.reply_translated();
        expected.ttl -= 1;
        let expected = ethernet(MAC_HOST, MAC_LAN, ETH_P_IP, &expected.bytes());
        assert!(
            run.out == expected,
            "{}",
            describe_difference(&expected, &run.out)
        );
        assert_eq!(dp.uplink0_xdp().rx_packets, 1);
        set_hop(dp, lan_hop(UDP_FLOW.reply().bytes().len() as u32 - 1));
        declined(dp, "over the cached MTU");
        set_hop(
            dp,
            NextHop {
                ifindex: 7,
                ..lan_hop(1500)
            },
        );
        declined(dp, "a device XDP may not redirect to");
    });
}

impl Datapath {
    /// Uplink 0's IPv6 next hop: [`MAC_ISP`] behind [`MAC_WANX`] on
    /// [`UPLINK_IFINDEX`], which XDP may redirect to.
    fn cache_hop6_for_xdp(&mut self) {
        let mut mac = [0u8; 12];
        mac[..6].copy_from_slice(&MAC_ISP);
        mac[6..].copy_from_slice(&MAC_WANX);
        let hop = NextHop {
            mac,
            ifindex: UPLINK_IFINDEX,
            mtu: 1500,
            valid: 1,
        };
        let mut hops: Array<_, NextHop> =
            Array::try_from(self.ebpf.map_mut(MAP_NEXT_HOPS6).expect("NEXT_HOPS6")).expect("types");
        hops.set(0, hop, 0).expect("write NEXT_HOPS6");
        self.allow_xdp_redirect(UPLINK_IFINDEX);
    }

    /// [`LAN_HOST6`]'s cached next hop ([`lan_hop`]), which XDP may
    /// redirect to.
    fn cache_lan_hop6_for_xdp(&mut self) {
        self.cache_lan_hop6_of(LAN_HOST6);
    }

    /// [`cache_lan_hop6_for_xdp`](Self::cache_lan_hop6_for_xdp) for LAN
    /// host `host`.
    fn cache_lan_hop6_of(&mut self, host: &str) {
        let mut hops: HashMap<_, [u8; 16], NextHop> =
            HashMap::try_from(self.ebpf.map_mut(MAP_LAN_HOPS6).expect("LAN_HOPS6")).expect("types");
        hops.insert(v6(host).octets(), lan_hop(1500), 0)
            .expect("insert");
        self.allow_xdp_redirect(1);
    }
}

/// Runs `frame` through XDP program `progs.0` and TC program `progs.1`:
/// both must redirect it as `expected`.
fn both_redirect(
    dp: &mut Datapath,
    progs: (&'static str, &'static str),
    frame: &[u8],
    expected: &[u8],
    what: &str,
) {
    let xdp = dp.run_xdp(progs.0, frame, 0);
    assert_eq!(xdp.ret, XDP_REDIRECT, "{what}: not taken");
    let tc = dp.run(progs.1, frame, 0);
    assert_eq!(tc.ret, TC_ACT_REDIRECT, "{what}: TC");
    for (run, by) in [(&xdp, "XDP"), (&tc, "TC")] {
        assert!(
            run.out == expected,
            "{what} by {by}\n{}",
            describe_difference(expected, &run.out)
        );
    }
}

/// `mh_xdp_lan` maps a pinned IPv6 flow's UDP and TCP packets onto the
/// uplink's prefix and redirects them to its cached next hop, byte for
/// byte as `mh_lan_in6` does, counting the same; `mh_xdp_wan` maps an
/// answered reply back to the cached LAN host, as `mh_wan_in6` does.
#[test]
fn xdp_redirects_pinned_ipv6_flows_both_ways_byte_exact_as_the_tc_programs_do() {
    // A host of the one internal prefix, and one of the third of three,
    // whose entry `MAPPED6` finds.
    let third = format!("{}2", LANS6[2].0);
    for (host, lans) in [(LAN_HOST6, &LANS6[..1]), (third.as_str(), &LANS6[..])] {
        xdp_and_tc_redirect_ipv6_alike(host, lans);
    }
}

/// [`xdp_redirects_pinned_ipv6_flows_both_ways_byte_exact_as_the_tc_programs_do`]
/// for LAN host `host`, its prefix among `lans` of uplink 0.
fn xdp_and_tc_redirect_ipv6_alike(host: &str, lans: &[(&str, &str)]) {
    let (inner, outer) = *lans
        .iter()
        .find(|(i, _)| v6(host).segments()[..4] == v6(i).segments()[..4])
        .expect("the host's prefix");
    let mapped = npt_by_hand(host, inner, outer);
    let key = |lan_port: u16, remote_port: u16, proto: u8| Flow6Key {
        lan: v6(host).octets(),
        ..flow6(lan_port, remote_port, proto)
    };
    for (out, key) in [
        (
            Ipv6::udp(host, REMOTE6, 40001, 53, b"query"),
            key(40001, 53, IPPROTO_UDP),
        ),
        (
            Ipv6::tcp(host, REMOTE6, 40000, 443, TCP_ACK),
            key(40000, 443, IPPROTO_TCP),
        ),
    ] {
        with_datapath(|dp| {
            dp.set_uplink6_0_lans(lans);
            dp.conn6()
                .insert(key, Flow6::default(), 0)
                .expect("pin the flow");
            dp.cache_hop6_for_xdp();
            let what = format!("{host} out, next header {}", out.next);
            let mut q = out.clone();
            q.src = v6(&mapped);
            q.hop_limit -= 1;
            let expected = ethernet(MAC_ISP, MAC_WANX, ETH_P_IPV6, &q.bytes());
            both_redirect(
                dp,
                (PROG_XDP_LAN, PROG_LAN_IN6),
                &out.frame(),
                &expected,
                &what,
            );
            assert_eq!(dp.uplink0_stats().tx_packets, 2, "{what}");
            assert_eq!(dp.uplink0_xdp().tx_packets, 1, "{what}");

            let mut answered = dp.conn6().get(&key, 0).expect("the flow");
            answered.flags |= FLOW_SEEN_REPLY;
            dp.conn6().insert(key, answered, 0).expect("answered");
            dp.cache_lan_hop6_of(host);
            let mut reply = out.clone();
            (reply.src, reply.dst) = (v6(REMOTE6), v6(&mapped));
            reply.l4.swap(0, 2);
            reply.l4.swap(1, 3);
            let what = format!("{host} in, next header {}", out.next);
            let mut q = reply.clone();
            q.dst = v6(host);
            q.hop_limit -= 1;
            let expected = ethernet(MAC_HOST, MAC_LAN, ETH_P_IPV6, &q.bytes());
            both_redirect(
                dp,
                (PROG_XDP_WAN, PROG_WAN_IN6),
                &reply.frame(),
                &expected,
                &what,
            );
            assert_eq!(dp.uplink0_xdp().rx_packets, 1, "{what}");
        });
    }
}

/// What the IPv6 XDP path does not take passes to TC byte-identical: a
/// flow's first reply, SYN, FIN and RST, a hop limit of 1, an extension
/// header, a partial checksum, a multicast frame, a packet of no flow or
/// from outside the internal prefix, a NAT66 uplink's flow, a reply to a
/// LAN host with no cached hop.
#[test]
fn xdp_passes_every_ipv6_packet_it_does_not_take_byte_identical() {
    with_datapath(|dp| {
        dp.set_uplink6_0();
        let key = flow6(40001, 53, IPPROTO_UDP);
        dp.conn6()
            .insert(key, Flow6::default(), 0)
            .expect("pin the flow");
        dp.cache_hop6_for_xdp();
        let mapped = npt_by_hand(LAN_HOST6, INNER6, OUTER6);
        let out = Ipv6::udp(LAN_HOST6, REMOTE6, 40001, 53, b"query");
        let reply = Ipv6::udp(REMOTE6, &mapped, 53, 40001, b"answer");
        let declined = |dp: &mut Datapath, prog: &'static str, frame: &[u8], what: &str| {
            let run = dp.run_xdp(prog, frame, 0);
            assert_eq!(run.ret, XDP_PASS, "{what}");
            assert!(run.out == frame, "{what}: passed altered");
        };
        dp.cache_lan_hop6_for_xdp();
        declined(dp, PROG_XDP_WAN, &reply.frame(), "first reply");
        for flags in [TCP_SYN, TCP_FIN | TCP_ACK, TCP_RST] {
            dp.conn6()
                .insert(flow6(40000, 443, IPPROTO_TCP), Flow6::default(), 0)
                .expect("pin");
            let seg = Ipv6::tcp(LAN_HOST6, REMOTE6, 40000, 443, flags);
            declined(
                dp,
                PROG_XDP_LAN,
                &seg.frame(),
                &format!("TCP flags {flags:#x}"),
            );
        }
        let mut last_hop = out.clone();
        last_hop.hop_limit = 1;
        declined(dp, PROG_XDP_LAN, &last_hop.frame(), "hop limit 1");
        let mut options = out.clone();
        options.hop_by_hop = true;
        declined(dp, PROG_XDP_LAN, &options.frame(), "hop-by-hop options");
        // The checksum field as a sender with offload leaves it: the
        // folded pseudo-header sum, not complemented.
        let mut partial = out.clone();
        let mut sum: u32 = partial.l4.len() as u32 + u32::from(partial.next);
        for a in [partial.src.octets(), partial.dst.octets()] {
            for w in a.chunks(2) {
                sum += u32::from(u16::from_be_bytes([w[0], w[1]]));
            }
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        let at = partial.checksum_at();
        partial.l4[at..at + 2].copy_from_slice(&(sum as u16).to_be_bytes());
        declined(dp, PROG_XDP_LAN, &partial.frame(), "partial checksum");
        let mut multicast = out.frame();
        multicast[..6].copy_from_slice(&[0x33, 0x33, 0, 0, 0, 1]);
        declined(dp, PROG_XDP_LAN, &multicast, "multicast frame");
        let stray = Ipv6::udp(LAN_HOST6, REMOTE6, 40009, 53, b"?");
        declined(dp, PROG_XDP_LAN, &stray.frame(), "no flow");
        // A flow from outside today's internal prefix (renumbered since).
        let old_lan = "fd00:9::2";
        dp.conn6()
            .insert(
                Flow6Key {
                    lan: v6(old_lan).octets(),
                    ..key
                },
                Flow6::default(),
                0,
            )
            .expect("pin");
        let renumbered = Ipv6::udp(old_lan, REMOTE6, 40001, 53, b"query");
        declined(
            dp,
            PROG_XDP_LAN,
            &renumbered.frame(),
            "outside the internal prefix",
        );
        let mut answered = dp.conn6().get(&key, 0).expect("the flow");
        answered.flags |= FLOW_SEEN_REPLY;
        dp.conn6().insert(key, answered, 0).expect("answered");
        {
            let mut hops: HashMap<_, [u8; 16], NextHop> =
                HashMap::try_from(dp.ebpf.map_mut(MAP_LAN_HOPS6).expect("LAN_HOPS6"))
                    .expect("types");
            hops.remove(&v6(LAN_HOST6).octets()).expect("remove");
        }
        declined(dp, PROG_XDP_WAN, &reply.frame(), "no cached LAN hop");
        dp.set_uplink6_0_nat66();
        declined(dp, PROG_XDP_LAN, &out.frame(), "a NAT66 uplink's flow");
        // The same packet is taken once nothing stands in the way.
        dp.set_uplink6_0();
        let run = dp.run_xdp(PROG_XDP_LAN, &out.frame(), 0);
        assert_eq!(run.ret, XDP_REDIRECT, "taken");
    });
}

#[test]
fn wan_in6_reply_to_a_cached_lan_host_is_mapped_and_redirected_without_a_lookup() {
    with_datapath(|dp| {
        dp.set_uplink6_0();
        dp.conn6()
            .insert(flow6(40001, 53, IPPROTO_UDP), Flow6::default(), 0)
            .expect("pin the flow");
        {
            let mut hops: HashMap<_, [u8; 16], NextHop> =
                HashMap::try_from(dp.ebpf.map_mut(MAP_LAN_HOPS6).expect("LAN_HOPS6"))
                    .expect("types");
            hops.insert(v6(LAN_HOST6).octets(), lan_hop(1500), 0)
                .expect("insert");
        }
        let mapped = npt_by_hand(LAN_HOST6, INNER6, OUTER6);
        let reply = Ipv6::udp(REMOTE6, &mapped, 53, 40001, b"answer");
        let mut q = reply.clone();
        q.dst = v6(LAN_HOST6);
        q.hop_limit -= 1;
        let expected = ethernet(MAC_HOST, MAC_LAN, ETH_P_IPV6, &q.bytes());
        let (run, counted) = dp.run_counted(PROG_WAN_IN6, &reply.frame(), 0);
        assert_eq!(run.ret, TC_ACT_REDIRECT, "cached, so forwarded");
        assert!(
            run.out == expected,
            "{}",
            describe_difference(&expected, &run.out)
        );
        assert_eq!(counted, vec![]);
    });
}

/// `CLOCK_MONOTONIC_COARSE` now, ns: the clock of every stamp.
fn coarse_now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime fills the timespec.
    assert_eq!(
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) },
        0
    );
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The programs read the coarse clock once per jiffy and CPU; a stamp may
/// trail it by two ticks, 20 ms at HZ = 100.
const STAMP_LAG_NS: u64 = 20_000_000;

/// A flow's stamp comes from the per-tick clock cache (`now_ns`): on
/// the coarse clock within two ticks, and moving on with it, so a cache
/// that kept an old time would fail the second look.
#[test]
fn lan_in_stamps_last_seen_on_the_coarse_clock_and_a_second_later_anew() {
    with_datapath(|dp| {
        let f = UDP_FLOW;
        let mut stamps = Vec::new();
        for _ in 0..2 {
            dp.insert_flow(&f);
            let before = coarse_now_ns();
            let run = dp.run(PROG_LAN_IN, &f.outbound().frame(), 0);
            let after = coarse_now_ns();
            assert_eq!(
                run.ret, TC_ACT_UNSPEC,
                "passed to the kernel: no route here"
            );
            let stamp = dp.fwd_entry(&f).expect("the flow").last_seen_ns;
            assert!(
                before.saturating_sub(STAMP_LAG_NS) <= stamp && stamp <= after,
                "stamp {stamp} outside [{before} - 20 ms, {after}]"
            );
            stamps.push(stamp);
            std::thread::sleep(std::time::Duration::from_millis(1100));
        }
        assert!(
            stamps[1] >= stamps[0] + 1_100_000_000 - STAMP_LAG_NS,
            "the second stamp ({}) did not move on 1.1 s from the first ({})",
            stamps[1],
            stamps[0]
        );
    });
}

/// Another CPU's stamp may be a tick ahead of this CPU's clock (see
/// [`STAMP_LAG_NS`]): such a stamp is "just now", never an age that wraps
/// round to centuries. A reply to the gateway's ping noted "later" is
/// still the gateway's, a SYN-ACK times a round trip near 0, and a flow
/// stamped "later" keeps its stamp.
#[test]
fn a_stamp_ahead_of_the_clock_counts_as_just_now_everywhere_an_age_is_taken() {
    with_datapath(|dp| {
        // Verified first (a second or more): each stamp below is 50 ms
        // ahead of the clock when its packet runs.
        dp.program(PROG_WAN_IN);
        dp.program(PROG_LAN_IN);
        let ahead = || coarse_now_ns() + 50_000_000;
        // The gateway's ping, as if noted on a CPU ahead of this one.
        {
            let mut echo: HashMap<_, EchoKey, u64> =
                HashMap::try_from(dp.ebpf.map_mut(MAP_HOST_ECHO).expect("HOST_ECHO"))
                    .expect("types");
            let key = EchoKey {
                daddr_be: be(REMOTE),
                id_be: ECHO_FLOW.nat_port.to_be(),
                _pad: 0,
            };
            echo.insert(key, ahead(), 0).expect("note the ping");
        }
        let (_, counted) = dp.run_counted(PROG_WAN_IN, &ECHO_FLOW.reply().frame(), 0);
        assert_eq!(counted, [(Reason::HostEcho, 1)], "the gateway's reply");
        // A SYN made "later" than its SYN-ACK arrives.
        dp.set_fwd(
            TCP_FLOW.fwd_key(),
            FlowFwd {
                last_seen_ns: ahead(),
                ..TCP_FLOW.fwd()
            },
        );
        dp.insert_rev(&TCP_FLOW);
        dp.run(
            PROG_WAN_IN,
            &with_tcp_flags(TCP_FLOW.reply(), TCP_SYN | TCP_ACK),
            0,
        );
        let s = dp.uplink0_stats();
        assert_eq!(s.synacks, 1, "{s:?}");
        assert!(
            s.synack_rtt_ns < 1_000_000_000,
            "round trip {} ns",
            s.synack_rtt_ns
        );
        // A packet of a flow stamped "later" leaves the stamp alone.
        let later = ahead();
        dp.set_fwd(
            UDP_FLOW.fwd_key(),
            FlowFwd {
                last_seen_ns: later,
                ..UDP_FLOW.fwd()
            },
        );
        dp.run(PROG_LAN_IN, &UDP_FLOW.outbound().frame(), 0);
        let stamp = dp.fwd_entry(&UDP_FLOW).expect("the flow").last_seen_ns;
        assert_eq!(stamp, later, "restamped backwards");
    });
}

/// A ping of the gateway's own, from `NAT_ADDR` to `REMOTE` with the echo
/// flow's NAT identifier and sequence number `seq`.
fn gateway_ping(seq: u16) -> Vec<u8> {
    Ipv4::icmp(
        NAT_ADDR,
        REMOTE,
        Icmp::echo_request(ECHO_FLOW.nat_port, seq, b"abcdefghijklmnopqrstuvwabcdefg"),
    )
    .frame()
}

/// The gateway takes an identifier a LAN echo flow holds (its ping wins,
/// the flow is re-keyed) while the LAN host's last request is in flight:
/// that request's reply (its sequence number) still reaches the LAN host,
/// once; every other reply on the identifier is the gateway's.
#[test]
fn a_lan_ping_in_flight_when_the_gateway_takes_its_identifier_still_gets_its_reply() {
    with_datapath(|dp| {
        dp.insert_flow(&ECHO_FLOW);
        // The LAN host's request, sequence 7, on its way out.
        let (_, counted) = dp.run_counted(PROG_LAN_IN, &ECHO_FLOW.outbound().frame(), 0);
        assert_eq!(
            counted,
            [(Reason::SlowPath, 1)],
            "no route here: the kernel's path"
        );
        dp.host_origin = true;
        let (_, counted) = dp.run_counted(PROG_WAN_OUT, &gateway_ping(1), 0);
        assert_eq!(counted, [(Reason::EchoRekeyed, 1)]);
        // The reply to the LAN's request: to the LAN host, translated.
        let reply = ECHO_FLOW.reply().frame();
        let (run, counted) = dp.run_counted(PROG_WAN_IN, &reply, 0);
        assert_passed_as(
            &run,
            &ECHO_FLOW.reply_translated().frame(),
            "the LAN's reply",
        );
        assert_eq!(counted, NOTHING);
        // Once: the same again, and the gateway's own, are the gateway's.
        let (run, counted) = dp.run_counted(PROG_WAN_IN, &reply, 0);
        assert_untouched(&run, &reply, "a second reply with the LAN's number");
        assert_eq!(counted, [(Reason::HostEcho, 1)]);
        let own = Ipv4::icmp(
            REMOTE,
            NAT_ADDR,
            Icmp::echo_reply(ECHO_FLOW.nat_port, 1, b"abcdefghijklmnopqrstuvwabcdefg"),
        );
        let (_, counted) = dp.run_counted(PROG_WAN_IN, &own.frame(), 0);
        assert_eq!(counted, [(Reason::HostEcho, 1)], "the gateway's reply");
    });
}

/// When the LAN host's last request was answered before the gateway took
/// its identifier, nothing is in flight: every later reply on it is the
/// gateway's, one with the LAN's old number too.
#[test]
fn after_a_lan_ping_was_answered_every_reply_on_a_taken_identifier_is_the_gateways() {
    with_datapath(|dp| {
        dp.insert_flow(&ECHO_FLOW);
        dp.run(PROG_LAN_IN, &ECHO_FLOW.outbound().frame(), 0);
        let reply = ECHO_FLOW.reply().frame();
        let (run, _) = dp.run_counted(PROG_WAN_IN, &reply, 0);
        assert_passed_as(&run, &ECHO_FLOW.reply_translated().frame(), "answered");
        dp.host_origin = true;
        let (_, counted) = dp.run_counted(PROG_WAN_OUT, &gateway_ping(7), 0);
        assert_eq!(counted, [(Reason::EchoRekeyed, 1)]);
        let (run, counted) = dp.run_counted(PROG_WAN_IN, &reply, 0);
        assert_untouched(&run, &reply, "the gateway's reply");
        assert_eq!(counted, [(Reason::HostEcho, 1)]);
    });
}
