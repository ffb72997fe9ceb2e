//! Headers -> a [`Packet`] of offsets and tuple fields, or a reason to leave
//! the packet alone. Offsets come from the device kind and the IHL, never
//! from fixed header sizes.
use aya_ebpf::programs::{TcContext, XdpContext};
use multihome_common::{
    IPPROTO_DCCP, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, IPPROTO_UDPLITE, Reason,
};

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP_BE: u16 = 0x0800u16.to_be();
const IP_OFFSET_MASK_BE: u16 = 0x1fffu16.to_be();
/// More fragments follow.
pub const IP_MF_BE: u16 = 0x2000u16.to_be();

pub const ICMP_ECHO_REPLY: u8 = 0;
pub const ICMP_DEST_UNREACH: u8 = 3;
pub const ICMP_ECHO: u8 = 8;
pub const ICMP_TIME_EXCEEDED: u8 = 11;
pub const ICMP_PARAMETER_PROB: u8 = 12;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// IPv4 header field offsets from its start.
pub mod ip {
    pub const TOT_LEN: usize = 2;
    pub const ID: usize = 4;
    pub const FRAG_OFF: usize = 6;
    pub const TTL: usize = 8;
    pub const CSUM: usize = 10;
    pub const SADDR: usize = 12;
    pub const DADDR: usize = 16;
    pub const MIN_LEN: usize = 20;
}

/// What kind of L4 header follows, as far as the NAT cares. Field-less on
/// purpose: a variant's payload would be an undefined byte in the others,
/// and LLVM may spill it, which the verifier refuses to read.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum L4 {
    /// TCP; its flags are in [`Packet::tcp_flags`].
    Tcp,
    Udp,
    /// ICMP echo request; `sport_be` holds the identifier.
    EchoRequest,
    /// ICMP echo reply; `dport_be` holds the identifier.
    EchoReply,
    /// ICMP destination unreachable, time exceeded or parameter problem.
    IcmpError,
    /// Any other protocol, translated by address only.
    Other,
    /// The same, with a checksum at [`PSEUDO_CSUM_OFF`] that covers the
    /// pseudo-header (DCCP, UDP-Lite).
    OtherPseudo,
}

/// Where DCCP (RFC 4340 §5.1) and UDP-Lite (RFC 3828 §3.1) keep their
/// checksum, which covers the IPv4 pseudo-header.
pub const PSEUDO_CSUM_OFF: usize = 6;

/// Whether `proto`'s checksum covers the pseudo-header (besides TCP/UDP).
#[inline(always)]
pub fn other_has_pseudo_header(proto: u8) -> bool {
    proto == IPPROTO_DCCP || proto == IPPROTO_UDPLITE
}

#[derive(Clone, Copy)]
pub struct Packet {
    /// Offset of the IPv4 header.
    pub l3: usize,
    /// Offset of the L4 header.
    pub l4: usize,
    pub proto: u8,
    pub l4_kind: L4,
    /// TCP flags; 0 for every other protocol.
    pub tcp_flags: u8,
    pub ttl: u8,
    pub saddr_be: u32,
    pub daddr_be: u32,
    /// TCP/UDP ports; for echo the identifier is in `sport_be` (request) or
    /// `dport_be` (reply) and the other is 0.
    pub sport_be: u16,
    pub dport_be: u16,
    /// IP total length, host order.
    pub tot_len: u16,
    /// The IP flags and fragment offset, as on the wire.
    pub frag_be: u16,
}

/// Packet data as both hooks see it: an skb at TC, a frame at XDP.
pub trait Frame {
    /// Start of the linear data.
    fn data(&self) -> usize;
    /// End of the linear data.
    fn data_end(&self) -> usize;
    /// The whole packet's length, bytes, non-linear data included.
    fn len(&self) -> u32;
    /// Makes the first `len` bytes linear; false when it cannot.
    fn pull(&self, len: u32) -> bool;
}

impl Frame for TcContext {
    #[inline(always)]
    fn data(&self) -> usize {
        TcContext::data(self)
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        TcContext::data_end(self)
    }
    #[inline(always)]
    fn len(&self) -> u32 {
        TcContext::len(self)
    }
    #[inline(always)]
    fn pull(&self, len: u32) -> bool {
        self.pull_data(len).is_ok()
    }
}

/// A frame without fragments (the XDP programs do not take multi-buffer
/// frames): all of it is linear.
impl Frame for XdpContext {
    #[inline(always)]
    fn data(&self) -> usize {
        XdpContext::data(self)
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        XdpContext::data_end(self)
    }
    #[inline(always)]
    fn len(&self) -> u32 {
        (XdpContext::data_end(self) - XdpContext::data(self)) as u32
    }
    #[inline(always)]
    fn pull(&self, _len: u32) -> bool {
        false
    }
}

/// A checked pointer `off` bytes into the linear packet data.
#[inline(always)]
pub fn ptr_at<T>(ctx: &impl Frame, off: usize) -> Option<*mut T> {
    let start = ctx.data();
    if start + off + size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some((start + off) as *mut T)
}

/// The first byte of a 16-bit word read as it sits in memory.
#[inline(always)]
pub fn hi(word: u16) -> u8 {
    word.to_ne_bytes()[0]
}

/// The second byte of a 16-bit word read as it sits in memory.
#[inline(always)]
pub fn lo(word: u16) -> u8 {
    word.to_ne_bytes()[1]
}

/// Reads a `T` at `off`, pulling non-linear data in once if needed. Bytes
/// are read as part of a 16-bit word (see [`hi`], [`lo`]): LLVM turns a
/// one-byte bounds check into a form the verifier rejects.
#[inline(always)]
pub fn read<T: Copy>(ctx: &impl Frame, off: usize) -> Result<T, Reason> {
    if let Some(p) = ptr_at::<T>(ctx, off) {
        // SAFETY: bounds checked against data_end.
        return Ok(unsafe { p.read_unaligned() });
    }
    let want = off + size_of::<T>();
    if (ctx.len() as usize) < want || !ctx.pull(want as u32) {
        return Err(Reason::Malformed);
    }
    let p = ptr_at::<T>(ctx, off).ok_or(Reason::Malformed)?;
    // SAFETY: bounds checked against data_end.
    Ok(unsafe { p.read_unaligned() })
}

/// Writes a `T` at `off`, which [`read`] has already made linear.
#[inline(always)]
pub fn write<T>(ctx: &impl Frame, off: usize, v: T) -> Result<(), Reason> {
    let p = ptr_at::<T>(ctx, off).ok_or(Reason::RewriteFailed)?;
    // SAFETY: bounds checked against data_end.
    unsafe { p.write_unaligned(v) };
    Ok(())
}

/// Offset of the IPv4 header, or why there is none. `L2` is false on
/// devices without an Ethernet header (ppp, tun).
#[inline(always)]
pub fn l3_offset<const L2: bool>(ctx: &TcContext) -> Result<usize, Reason> {
    let proto_be = if L2 {
        read::<u16>(ctx, 12)?
    } else {
        // SAFETY: the context pointer is valid for the program's run.
        unsafe { (*ctx.skb.skb).protocol as u16 }
    };
    if proto_be != ETH_P_IP_BE {
        return Err(Reason::NotIpv4);
    }
    Ok(if L2 { ETH_HLEN } else { 0 })
}

pub const ETH_P_IPV6_BE: u16 = 0x86ddu16.to_be();

/// Offset of the IPv6 header, if the packet is IPv6. `L2` as in
/// [`l3_offset`].
#[inline(always)]
pub fn ipv6_offset<const L2: bool>(ctx: &TcContext) -> Option<usize> {
    let proto_be = if L2 {
        read::<u16>(ctx, 12).ok()?
    } else {
        // SAFETY: the context pointer is valid for the program's run.
        unsafe { (*ctx.skb.skb).protocol as u16 }
    };
    (proto_be == ETH_P_IPV6_BE).then_some(if L2 { ETH_HLEN } else { 0 })
}

/// The checked basics of the IPv4 header at `l3`.
struct Ipv4Basics {
    ihl: usize,
    tot_len: u16,
    frag_be: u16,
}

#[inline(always)]
fn ipv4_basics(ctx: &impl Frame, l3: usize) -> Result<Ipv4Basics, Reason> {
    let vihl = hi(read::<u16>(ctx, l3)?);
    let ihl = ((vihl & 0x0f) as usize) * 4;
    if vihl >> 4 != 4 || ihl < ip::MIN_LEN {
        return Err(Reason::Malformed);
    }
    let tot_len = u16::from_be(read::<u16>(ctx, l3 + ip::TOT_LEN)?);
    if (tot_len as usize) < ihl || (ctx.len() as usize) < l3 + tot_len as usize {
        return Err(Reason::Malformed);
    }
    Ok(Ipv4Basics {
        ihl,
        tot_len,
        frag_be: read(ctx, l3 + ip::FRAG_OFF)?,
    })
}

/// Parses the IPv4 header at `l3` and the L4 header after it.
#[inline(always)]
pub fn parse_ipv4(ctx: &impl Frame, l3: usize) -> Result<Packet, Reason> {
    let Ipv4Basics {
        ihl,
        tot_len,
        frag_be,
    } = ipv4_basics(ctx, l3)?;
    if frag_be & IP_OFFSET_MASK_BE != 0 {
        return Err(Reason::Fragment);
    }
    let ttl_proto: u16 = read(ctx, l3 + ip::TTL)?;
    let (ttl, proto) = (hi(ttl_proto), lo(ttl_proto));
    let saddr_be: u32 = read(ctx, l3 + ip::SADDR)?;
    let daddr_be: u32 = read(ctx, l3 + ip::DADDR)?;
    let l4 = l3 + ihl;
    let l4_len = tot_len as usize - ihl;

    let mut tcp_flags = 0;
    let (l4_kind, sport_be, dport_be) = match proto {
        IPPROTO_TCP => {
            if l4_len < 20 {
                return Err(Reason::Malformed);
            }
            tcp_flags = lo(read::<u16>(ctx, l4 + 12)?);
            (L4::Tcp, read(ctx, l4)?, read(ctx, l4 + 2)?)
        }
        IPPROTO_UDP => {
            if l4_len < 8 {
                return Err(Reason::Malformed);
            }
            (L4::Udp, read(ctx, l4)?, read(ctx, l4 + 2)?)
        }
        IPPROTO_ICMP => {
            if l4_len < 8 {
                return Err(Reason::Malformed);
            }
            let kind = hi(read::<u16>(ctx, l4)?);
            let id: u16 = read(ctx, l4 + 4)?;
            match kind {
                ICMP_ECHO => (L4::EchoRequest, id, 0),
                ICMP_ECHO_REPLY => (L4::EchoReply, 0, id),
                ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETER_PROB => {
                    (L4::IcmpError, 0, 0)
                }
                _ => return Err(Reason::UnsupportedProto),
            }
        }
        _ => {
            if !other_has_pseudo_header(proto) {
                (L4::Other, 0, 0)
            } else if l4_len < PSEUDO_CSUM_OFF + 2 {
                return Err(Reason::Malformed);
            } else {
                (L4::OtherPseudo, 0, 0)
            }
        }
    };
    Ok(Packet {
        l3,
        l4,
        proto,
        l4_kind,
        tcp_flags,
        ttl,
        saddr_be,
        daddr_be,
        sport_be,
        dport_be,
        tot_len,
        frag_be,
    })
}

/// Parses a non-first fragment's IPv4 header: it carries no L4 header, so
/// the packet is described as one translated by address only.
#[inline(always)]
pub fn parse_fragment(ctx: &TcContext, l3: usize) -> Result<Packet, Reason> {
    let Ipv4Basics {
        ihl,
        tot_len,
        frag_be,
    } = ipv4_basics(ctx, l3)?;
    let ttl_proto: u16 = read(ctx, l3 + ip::TTL)?;
    Ok(Packet {
        l3,
        l4: l3 + ihl,
        proto: lo(ttl_proto),
        l4_kind: L4::Other,
        tcp_flags: 0,
        ttl: hi(ttl_proto),
        saddr_be: read(ctx, l3 + ip::SADDR)?,
        daddr_be: read(ctx, l3 + ip::DADDR)?,
        sport_be: 0,
        dport_be: 0,
        tot_len,
        frag_be,
    })
}

/// A well-formed IPv4 non-first fragment, which carries no L4 header.
#[inline(always)]
pub fn is_later_fragment(ctx: &TcContext, l3: usize) -> Result<bool, Reason> {
    Ok(ipv4_basics(ctx, l3)?.frag_be & IP_OFFSET_MASK_BE != 0)
}

impl Packet {
    /// Offset of the L4 checksum field, and whether it is UDP's (where 0
    /// means "no checksum").
    #[inline(always)]
    pub fn l4_csum(&self) -> (usize, bool) {
        match self.l4_kind {
            L4::Tcp => (self.l4 + 16, false),
            L4::Udp => (self.l4 + 6, true),
            L4::EchoRequest | L4::EchoReply | L4::IcmpError => (self.l4 + 2, false),
            L4::Other | L4::OtherPseudo => (self.l4 + PSEUDO_CSUM_OFF, false),
        }
    }

    #[inline(always)]
    pub fn has_pseudo_header(&self) -> bool {
        matches!(self.l4_kind, L4::Tcp | L4::Udp | L4::OtherPseudo)
    }

    /// Translated by address only (no ports).
    #[inline(always)]
    pub fn portless(&self) -> bool {
        matches!(self.l4_kind, L4::Other | L4::OtherPseudo)
    }

    #[inline(always)]
    pub fn tcp_flags(&self) -> u8 {
        self.tcp_flags
    }
}

/// Offsets in the IPv6 header (RFC 8200 §3).
pub mod ip6 {
    pub const PAYLOAD_LEN: usize = 4;
    /// Next header, then hop limit.
    pub const NEXT_HOP: usize = 6;
    pub const SADDR: usize = 8;
    pub const DADDR: usize = 24;
    pub const LEN: usize = 40;
}

pub const IPPROTO_ICMPV6: u8 = 58;
const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_DSTOPTS: u8 = 60;
/// Extension headers walked before giving up (the packet passes as
/// malformed, and the egress guard still sees it).
const MAX_EXT_HEADERS: usize = 4;

pub const ICMPV6_DEST_UNREACH: u8 = 1;
pub const ICMPV6_PARAM_PROB: u8 = 4;
pub const ICMPV6_ECHO_REQUEST: u8 = 128;
pub const ICMPV6_ECHO_REPLY: u8 = 129;

/// Not a fragment.
pub const FRAG6_NONE: u8 = 0;
/// The first fragment: its L4 header is here.
pub const FRAG6_FIRST: u8 = 1;
/// A later fragment: no L4 header.
pub const FRAG6_LATER: u8 = 2;

/// An IPv6 packet as the NPTv6 stages see it.
#[derive(Clone, Copy)]
pub struct Packet6 {
    /// Offset of the L4 header, past the extension headers.
    pub l4: usize,
    pub proto: u8,
    pub l4_kind: L4,
    pub tcp_flags: u8,
    /// The traffic class's top six bits (RFC 2474).
    pub dscp: u8,
    pub hop_limit: u8,
    /// The IPv6 payload length, bytes (the packet is 40 bytes more).
    pub payload_len: u16,
    /// `FRAG6_*`.
    pub frag: u8,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    /// As in [`Packet`]: ports, or the echo identifier.
    pub sport_be: u16,
    pub dport_be: u16,
}

/// Reads a `T` at `off` with `bpf_skb_load_bytes` (any offset, linear or
/// not).
#[inline(always)]
pub fn load<T: Copy>(ctx: &TcContext, off: usize) -> Result<T, Reason> {
    ctx.load::<T>(off).map_err(|_| Reason::Malformed)
}

/// The start of the L4 header at `l4`: read in place when no extension
/// header came before it (a constant offset), else through the helper.
#[inline(always)]
fn l4_head<T: Copy>(ctx: &TcContext, l3: usize, l4: usize) -> Result<T, Reason> {
    if l4 == l3 + ip6::LEN {
        read(ctx, l3 + ip6::LEN)
    } else {
        load(ctx, l4)
    }
}

/// Writes `v` at `off`: in place when that part of the packet is linear
/// (no helper call), else with `bpf_skb_store_bytes`. `off` must be
/// bounded for the verifier (a constant, in practice).
#[inline(always)]
pub fn put<T: Copy>(ctx: &TcContext, off: usize, v: T) -> Result<(), Reason> {
    match ptr_at::<T>(ctx, off) {
        Some(p) => {
            // SAFETY: bounds checked against data_end by `ptr_at`.
            unsafe { p.write_unaligned(v) };
            Ok(())
        }
        None => store(ctx, off, &v),
    }
}

/// Writes `v` at `off` with `bpf_skb_store_bytes`.
#[inline(always)]
pub fn store<T>(ctx: &TcContext, off: usize, v: &T) -> Result<(), Reason> {
    ctx.store(off, v, 0).map_err(|_| Reason::RewriteFailed)
}

/// Parses the IPv6 header at `l3`, walks its extension headers (RFC 8200
/// §4) and reads the L4 header's ports, flags or ICMPv6 type. Reads go
/// through `bpf_skb_load_bytes`: offsets past extension headers vary, and
/// LLVM turns a varying bounds check into arithmetic on `data_end`, which
/// the verifier refuses.
#[inline(always)]
pub fn parse_ipv6(ctx: &TcContext, l3: usize) -> Result<Packet6, Reason> {
    // Not zeroed first: LLVM would call its byte-loop memset.
    let mut pkt = core::mem::MaybeUninit::<Packet6>::uninit();
    parse_ipv6_into(ctx, l3, &mut pkt)?;
    // SAFETY: `parse_ipv6_into` wrote it whole before returning Ok.
    Ok(unsafe { pkt.assume_init() })
}

/// [`parse_ipv6`]'s work, as a subprogram of its own: its buffers stay
/// out of its callers' frames. (It fills `out` rather than returning the
/// packet: the BTF of a `Result` holding a struct is refused.)
#[inline(never)]
fn parse_ipv6_into(
    ctx: &TcContext,
    l3: usize,
    out: &mut core::mem::MaybeUninit<Packet6>,
) -> Result<(), Reason> {
    // Bounded for the verifier: the header is read in place.
    if l3 > ETH_HLEN {
        return Err(Reason::Malformed);
    }
    let h: [u8; ip6::LEN] = read(ctx, l3)?;
    if h[0] >> 4 != 6 {
        return Err(Reason::Malformed);
    }
    // Version (4 bits), then the traffic class (8 bits).
    let dscp = ((h[0] & 0x0f) << 4 | h[1] >> 4) >> 2;
    let payload = u16::from_be_bytes([h[ip6::PAYLOAD_LEN], h[ip6::PAYLOAD_LEN + 1]]) as usize;
    if (ctx.len() as usize) < l3 + ip6::LEN + payload {
        return Err(Reason::Malformed);
    }
    let (mut proto, hop_limit) = (h[6], h[7]);
    let mut l4 = l3 + ip6::LEN;
    let mut frag = FRAG6_NONE;
    for _ in 0..MAX_EXT_HEADERS {
        match proto {
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS => {
                let h: u16 = load(ctx, l4)?;
                proto = hi(h);
                l4 += (lo(h) as usize + 1) * 8;
            }
            IPPROTO_FRAGMENT => {
                proto = hi(load::<u16>(ctx, l4)?);
                let off_be: u16 = load(ctx, l4 + 2)?;
                frag = if u16::from_be(off_be) & !7 != 0 {
                    FRAG6_LATER
                } else {
                    FRAG6_FIRST
                };
                l4 += 8;
            }
            _ => break,
        }
    }
    if matches!(
        proto,
        IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS | IPPROTO_FRAGMENT
    ) {
        return Err(Reason::Malformed);
    }
    let mut pkt = Packet6 {
        l4,
        proto,
        l4_kind: L4::Other,
        tcp_flags: 0,
        dscp,
        hop_limit,
        payload_len: payload as u16,
        frag,
        saddr: h[ip6::SADDR..ip6::SADDR + 16]
            .try_into()
            .unwrap_or_default(),
        daddr: h[ip6::DADDR..ip6::DADDR + 16]
            .try_into()
            .unwrap_or_default(),
        sport_be: 0,
        dport_be: 0,
    };
    if frag == FRAG6_LATER {
        out.write(pkt);
        return Ok(());
    }
    match proto {
        IPPROTO_TCP => {
            let t: [u8; 14] = l4_head(ctx, l3, l4)?;
            pkt.l4_kind = L4::Tcp;
            pkt.tcp_flags = t[13];
            pkt.sport_be = u16::from_ne_bytes([t[0], t[1]]);
            pkt.dport_be = u16::from_ne_bytes([t[2], t[3]]);
        }
        IPPROTO_UDP => {
            let u: [u8; 4] = l4_head(ctx, l3, l4)?;
            pkt.l4_kind = L4::Udp;
            pkt.sport_be = u16::from_ne_bytes([u[0], u[1]]);
            pkt.dport_be = u16::from_ne_bytes([u[2], u[3]]);
        }
        IPPROTO_ICMPV6 => {
            let i: [u8; 6] = l4_head(ctx, l3, l4)?;
            let kind = i[0];
            let id = u16::from_ne_bytes([i[4], i[5]]);
            match kind {
                ICMPV6_ECHO_REQUEST => {
                    pkt.l4_kind = L4::EchoRequest;
                    pkt.sport_be = id;
                }
                ICMPV6_ECHO_REPLY => {
                    pkt.l4_kind = L4::EchoReply;
                    pkt.dport_be = id;
                }
                ICMPV6_DEST_UNREACH..=ICMPV6_PARAM_PROB => pkt.l4_kind = L4::IcmpError,
                _ => {}
            }
        }
        _ => {}
    }
    out.write(pkt);
    Ok(())
}
