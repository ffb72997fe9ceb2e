//! Packet builders for byte-exact datapath tests: Ethernet, IPv4 (with
//! options), TCP, UDP and ICMP, every checksum computed from scratch over
//! the bytes being built (RFC 1071), never incrementally. A test describes
//! a packet as an [`Ipv4`] value, changes the fields a translation should
//! change, and compares the program's output with [`Ipv4::frame`] of the
//! changed value.
use std::fmt::Write as _;
use std::net::Ipv4Addr;

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_IPV6: u16 = 0x86dd;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_GRE: u8 = 47;

/// "Don't fragment", as it sits in the flags/offset word.
pub const IP_DF: u16 = 0x4000;
/// "More fragments".
pub const IP_MF: u16 = 0x2000;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;

pub const ICMP_ECHO_REPLY: u8 = 0;
pub const ICMP_DEST_UNREACH: u8 = 3;
pub const ICMP_ECHO: u8 = 8;
pub const ICMP_TIME_EXCEEDED: u8 = 11;
pub const ICMP_PARAMETER_PROB: u8 = 12;
pub const ICMP_TIMESTAMP: u8 = 13;

/// The one's complement sum of `data` as big-endian 16-bit words, an odd
/// last byte padded with a zero byte (RFC 1071 section 4.1), with the
/// carries folded back in. Not complemented.
pub fn ones_complement_sum(data: &[u8]) -> u16 {
    let mut sum: u64 = 0;
    let mut words = data.chunks_exact(2);
    for w in &mut words {
        sum += u64::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [last] = words.remainder() {
        sum += u64::from(u16::from_be_bytes([*last, 0]));
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// The Internet checksum of `data` (RFC 1071): the one's complement of its
/// one's complement sum. Over data that includes a correct checksum field
/// it is 0.
pub fn internet_checksum(data: &[u8]) -> u16 {
    !ones_complement_sum(data)
}

/// The TCP/UDP pseudo-header: source, destination, zero, protocol, length.
pub fn pseudo_header(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, len: usize) -> [u8; 12] {
    let len = u16::try_from(len).expect("L4 length fits 16 bits");
    let mut h = [0u8; 12];
    h[0..4].copy_from_slice(&src.octets());
    h[4..8].copy_from_slice(&dst.octets());
    h[9] = proto;
    h[10..12].copy_from_slice(&len.to_be_bytes());
    h
}

/// The checksum of a whole TCP segment or UDP datagram (its checksum
/// field zero) with its pseudo-header.
pub fn l4_checksum(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, segment: &[u8]) -> u16 {
    let mut buf = pseudo_header(src, dst, proto, segment.len()).to_vec();
    buf.extend_from_slice(segment);
    internet_checksum(&buf)
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tcp {
    pub sport: u16,
    pub dport: u16,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub window: u16,
    pub urgent: u16,
    /// TCP option bytes, a multiple of 4 long.
    pub options: Vec<u8>,
    pub payload: Vec<u8>,
}

impl Tcp {
    pub fn new(sport: u16, dport: u16, flags: u8, payload: &[u8]) -> Self {
        Tcp {
            sport,
            dport,
            seq: 0x1122_3344,
            ack: if flags & TCP_ACK != 0 { 0x5566_7788 } else { 0 },
            flags,
            window: 64_240,
            urgent: 0,
            options: Vec::new(),
            payload: payload.to_vec(),
        }
    }

    fn bytes(&self, src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
        assert!(
            self.options.len().is_multiple_of(4) && self.options.len() <= 40,
            "TCP options must be a multiple of 4 bytes, at most 40"
        );
        let doff = (20 + self.options.len()) / 4;
        let mut b = Vec::with_capacity(doff * 4 + self.payload.len());
        b.extend_from_slice(&self.sport.to_be_bytes());
        b.extend_from_slice(&self.dport.to_be_bytes());
        b.extend_from_slice(&self.seq.to_be_bytes());
        b.extend_from_slice(&self.ack.to_be_bytes());
        b.push((doff as u8) << 4);
        b.push(self.flags);
        b.extend_from_slice(&self.window.to_be_bytes());
        b.extend_from_slice(&[0, 0]);
        b.extend_from_slice(&self.urgent.to_be_bytes());
        b.extend_from_slice(&self.options);
        b.extend_from_slice(&self.payload);
        let c = l4_checksum(src, dst, IPPROTO_TCP, &b);
        b[16..18].copy_from_slice(&c.to_be_bytes());
        b
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Udp {
    pub sport: u16,
    pub dport: u16,
    pub payload: Vec<u8>,
    /// False: the checksum field is 0 ("no checksum", RFC 768).
    pub checksum: bool,
}

impl Udp {
    pub fn new(sport: u16, dport: u16, payload: &[u8]) -> Self {
        Udp {
            sport,
            dport,
            payload: payload.to_vec(),
            checksum: true,
        }
    }

    fn bytes(&self, src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
        let len = u16::try_from(8 + self.payload.len()).expect("UDP length fits 16 bits");
        let mut b = Vec::with_capacity(len as usize);
        b.extend_from_slice(&self.sport.to_be_bytes());
        b.extend_from_slice(&self.dport.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(&[0, 0]);
        b.extend_from_slice(&self.payload);
        if self.checksum {
            let c = match l4_checksum(src, dst, IPPROTO_UDP, &b) {
                // A computed 0 is sent as all ones (RFC 768).
                0 => 0xffff,
                c => c,
            };
            b[6..8].copy_from_slice(&c.to_be_bytes());
        }
        b
    }
}

/// Any ICMP message: type, code, the second header word ("rest": echo
/// identifier and sequence, next-hop MTU, pointer, or unused) and body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Icmp {
    pub kind: u8,
    pub code: u8,
    pub rest: [u8; 4],
    pub body: Vec<u8>,
}

impl Icmp {
    fn echo(kind: u8, id: u16, seq: u16, payload: &[u8]) -> Self {
        let mut rest = [0u8; 4];
        rest[..2].copy_from_slice(&id.to_be_bytes());
        rest[2..].copy_from_slice(&seq.to_be_bytes());
        Icmp {
            kind,
            code: 0,
            rest,
            body: payload.to_vec(),
        }
    }

    pub fn echo_request(id: u16, seq: u16, payload: &[u8]) -> Self {
        Self::echo(ICMP_ECHO, id, seq, payload)
    }

    pub fn echo_reply(id: u16, seq: u16, payload: &[u8]) -> Self {
        Self::echo(ICMP_ECHO_REPLY, id, seq, payload)
    }

    /// An error quoting `quoted` (the start of the offending IP packet).
    pub fn error(kind: u8, code: u8, rest: [u8; 4], quoted: &[u8]) -> Self {
        Icmp {
            kind,
            code,
            rest,
            body: quoted.to_vec(),
        }
    }

    /// The echo identifier.
    pub fn id(&self) -> u16 {
        u16::from_be_bytes([self.rest[0], self.rest[1]])
    }

    pub fn set_id(&mut self, id: u16) {
        self.rest[..2].copy_from_slice(&id.to_be_bytes());
    }

    fn bytes(&self) -> Vec<u8> {
        let mut b = vec![self.kind, self.code, 0, 0];
        b.extend_from_slice(&self.rest);
        b.extend_from_slice(&self.body);
        let c = internet_checksum(&b);
        b[2..4].copy_from_slice(&c.to_be_bytes());
        b
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Payload {
    Tcp(Tcp),
    Udp(Udp),
    Icmp(Icmp),
    /// Any protocol number with bytes used as they are (a later fragment, an
    /// unsupported protocol, a cut header).
    Raw {
        proto: u8,
        bytes: Vec<u8>,
    },
}

/// An IPv4 packet. [`Ipv4::bytes`] lays it out with IHL and total length
/// taken from the contents and every checksum computed from scratch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ipv4 {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub tos: u8,
    pub id: u16,
    /// Flags and fragment offset (in 8-byte units) as on the wire.
    pub frag: u16,
    pub ttl: u8,
    /// Option bytes, a multiple of 4 long, at most 40.
    pub options: Vec<u8>,
    pub payload: Payload,
}

impl Ipv4 {
    pub fn new(src: Ipv4Addr, dst: Ipv4Addr, payload: Payload) -> Self {
        Ipv4 {
            src,
            dst,
            tos: 0,
            id: 0x3b1c,
            frag: IP_DF,
            ttl: 64,
            options: Vec::new(),
            payload,
        }
    }

    pub fn tcp(src: Ipv4Addr, dst: Ipv4Addr, tcp: Tcp) -> Self {
        Self::new(src, dst, Payload::Tcp(tcp))
    }

    pub fn udp(src: Ipv4Addr, dst: Ipv4Addr, udp: Udp) -> Self {
        Self::new(src, dst, Payload::Udp(udp))
    }

    pub fn icmp(src: Ipv4Addr, dst: Ipv4Addr, icmp: Icmp) -> Self {
        Self::new(src, dst, Payload::Icmp(icmp))
    }

    pub fn proto(&self) -> u8 {
        match &self.payload {
            Payload::Tcp(_) => IPPROTO_TCP,
            Payload::Udp(_) => IPPROTO_UDP,
            Payload::Icmp(_) => IPPROTO_ICMP,
            Payload::Raw { proto, .. } => *proto,
        }
    }

    /// Header length in bytes (IHL * 4).
    pub fn header_len(&self) -> usize {
        20 + self.options.len()
    }

    /// The TCP/UDP source port, or the ICMP echo identifier.
    pub fn sport(&self) -> u16 {
        match &self.payload {
            Payload::Tcp(t) => t.sport,
            Payload::Udp(u) => u.sport,
            Payload::Icmp(i) => i.id(),
            Payload::Raw { .. } => panic!("a raw payload has no ports"),
        }
    }

    /// The TCP/UDP destination port, or the ICMP echo identifier.
    pub fn dport(&self) -> u16 {
        match &self.payload {
            Payload::Tcp(t) => t.dport,
            Payload::Udp(u) => u.dport,
            Payload::Icmp(i) => i.id(),
            Payload::Raw { .. } => panic!("a raw payload has no ports"),
        }
    }

    /// Sets the TCP/UDP source port, or the ICMP echo identifier.
    pub fn set_sport(&mut self, port: u16) {
        match &mut self.payload {
            Payload::Tcp(t) => t.sport = port,
            Payload::Udp(u) => u.sport = port,
            Payload::Icmp(i) => i.set_id(port),
            Payload::Raw { .. } => panic!("a raw payload has no ports"),
        }
    }

    /// Sets the TCP/UDP destination port, or the ICMP echo identifier.
    pub fn set_dport(&mut self, port: u16) {
        match &mut self.payload {
            Payload::Tcp(t) => t.dport = port,
            Payload::Udp(u) => u.dport = port,
            Payload::Icmp(i) => i.set_id(port),
            Payload::Raw { .. } => panic!("a raw payload has no ports"),
        }
    }

    /// The packet with its source address and port (echo identifier)
    /// replaced: what SNAT must produce.
    pub fn with_source(&self, addr: Ipv4Addr, port: u16) -> Self {
        let mut p = self.clone();
        p.src = addr;
        p.set_sport(port);
        p
    }

    /// The packet with its destination address and port (echo identifier)
    /// replaced: what the reverse translation must produce.
    pub fn with_destination(&self, addr: Ipv4Addr, port: u16) -> Self {
        let mut p = self.clone();
        p.dst = addr;
        p.set_dport(port);
        p
    }

    /// The L4 bytes, checksums included.
    pub fn l4_bytes(&self) -> Vec<u8> {
        match &self.payload {
            Payload::Tcp(t) => t.bytes(self.src, self.dst),
            Payload::Udp(u) => u.bytes(self.src, self.dst),
            Payload::Icmp(i) => i.bytes(),
            Payload::Raw { bytes, .. } => bytes.clone(),
        }
    }

    /// The whole packet, IP header first.
    pub fn bytes(&self) -> Vec<u8> {
        assert!(
            self.options.len().is_multiple_of(4) && self.options.len() <= 40,
            "IP options must be a multiple of 4 bytes, at most 40"
        );
        let l4 = self.l4_bytes();
        let hlen = self.header_len();
        let tot_len = u16::try_from(hlen + l4.len()).expect("IPv4 total length fits 16 bits");
        let mut b = Vec::with_capacity(tot_len as usize);
        b.push(0x40 | (hlen / 4) as u8);
        b.push(self.tos);
        b.extend_from_slice(&tot_len.to_be_bytes());
        b.extend_from_slice(&self.id.to_be_bytes());
        b.extend_from_slice(&self.frag.to_be_bytes());
        b.push(self.ttl);
        b.push(self.proto());
        b.extend_from_slice(&[0, 0]);
        b.extend_from_slice(&self.src.octets());
        b.extend_from_slice(&self.dst.octets());
        b.extend_from_slice(&self.options);
        let c = internet_checksum(&b);
        b[10..12].copy_from_slice(&c.to_be_bytes());
        b.extend_from_slice(&l4);
        b
    }

    /// The packet in an Ethernet frame between two fixed addresses.
    pub fn frame(&self) -> Vec<u8> {
        ethernet(MAC_GW, MAC_A, ETH_P_IP, &self.bytes())
    }
}

pub const IPPROTO_ICMPV6: u8 = 58;
pub const ICMPV6_DEST_UNREACH: u8 = 1;
pub const ICMPV6_PACKET_TOO_BIG: u8 = 2;
pub const ICMPV6_ECHO_REQUEST: u8 = 128;

/// An IPv6 packet (RFC 8200) without extension headers: `l4` is a whole
/// TCP segment, UDP datagram or ICMPv6 message whose checksum field (at
/// `checksum_at` in it) is computed here over the IPv6 pseudo-header
/// (RFC 8200 §8.1) from scratch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ipv6 {
    pub src: std::net::Ipv6Addr,
    pub dst: std::net::Ipv6Addr,
    pub next: u8,
    pub hop_limit: u8,
    /// A hop-by-hop options header (8 bytes, a PadN option) before `l4`.
    pub hop_by_hop: bool,
    pub l4: Vec<u8>,
}

impl Ipv6 {
    /// A UDP datagram, its checksum computed.
    pub fn udp(src: &str, dst: &str, sport: u16, dport: u16, payload: &[u8]) -> Self {
        let mut l4 = Vec::new();
        l4.extend_from_slice(&sport.to_be_bytes());
        l4.extend_from_slice(&dport.to_be_bytes());
        l4.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        l4.extend_from_slice(&[0, 0]);
        l4.extend_from_slice(payload);
        Self::new(src, dst, IPPROTO_UDP, l4)
    }

    /// A TCP segment with `flags` and no options.
    pub fn tcp(src: &str, dst: &str, sport: u16, dport: u16, flags: u8) -> Self {
        let mut l4 = Vec::new();
        l4.extend_from_slice(&sport.to_be_bytes());
        l4.extend_from_slice(&dport.to_be_bytes());
        l4.extend_from_slice(&0x1234_5678u32.to_be_bytes());
        l4.extend_from_slice(&0u32.to_be_bytes());
        l4.extend_from_slice(&[0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
        l4.extend_from_slice(b"payload");
        Self::new(src, dst, IPPROTO_TCP, l4)
    }

    /// An ICMPv6 message: type, code, the 4 bytes after the checksum, body.
    pub fn icmp(src: &str, dst: &str, kind: u8, code: u8, rest: [u8; 4], body: &[u8]) -> Self {
        let mut l4 = vec![kind, code, 0, 0];
        l4.extend_from_slice(&rest);
        l4.extend_from_slice(body);
        Self::new(src, dst, IPPROTO_ICMPV6, l4)
    }

    fn new(src: &str, dst: &str, next: u8, l4: Vec<u8>) -> Self {
        let mut p = Ipv6 {
            src: src.parse().expect("IPv6 source"),
            dst: dst.parse().expect("IPv6 destination"),
            next,
            hop_limit: 64,
            hop_by_hop: false,
            l4,
        };
        p.refresh_checksum();
        p
    }

    /// Where the L4 checksum sits in `l4`.
    pub fn checksum_at(&self) -> usize {
        match self.next {
            IPPROTO_TCP => 16,
            IPPROTO_UDP => 6,
            _ => 2,
        }
    }

    pub fn checksum(&self) -> u16 {
        let at = self.checksum_at();
        u16::from_be_bytes([self.l4[at], self.l4[at + 1]])
    }

    /// The L4 checksum over the pseudo-header and `l4`, recomputed.
    pub fn refresh_checksum(&mut self) {
        let at = self.checksum_at();
        self.l4[at..at + 2].copy_from_slice(&[0, 0]);
        let mut buf = Vec::new();
        buf.extend_from_slice(&self.src.octets());
        buf.extend_from_slice(&self.dst.octets());
        buf.extend_from_slice(&(self.l4.len() as u32).to_be_bytes());
        buf.extend_from_slice(&[0, 0, 0, self.next]);
        buf.extend_from_slice(&self.l4);
        let c = internet_checksum(&buf);
        // UDP sends a computed 0 as 0xffff (RFC 8200 §8.1).
        let c = if c == 0 && self.next == IPPROTO_UDP {
            0xffff
        } else {
            c
        };
        self.l4[at..at + 2].copy_from_slice(&c.to_be_bytes());
    }

    pub fn bytes(&self) -> Vec<u8> {
        let ext = if self.hop_by_hop { 8 } else { 0 };
        let mut b = vec![0x60, 0, 0, 0];
        b.extend_from_slice(&((ext + self.l4.len()) as u16).to_be_bytes());
        let next = if self.hop_by_hop { 0 } else { self.next };
        b.extend_from_slice(&[next, self.hop_limit]);
        b.extend_from_slice(&self.src.octets());
        b.extend_from_slice(&self.dst.octets());
        if self.hop_by_hop {
            // Next header, length 0 (8 bytes), PadN of 4.
            b.extend_from_slice(&[self.next, 0, 1, 4, 0, 0, 0, 0]);
        }
        b.extend_from_slice(&self.l4);
        b
    }

    /// The packet in an Ethernet frame to the gateway.
    pub fn frame(&self) -> Vec<u8> {
        ethernet(MAC_GW, MAC_A, ETH_P_IPV6, &self.bytes())
    }
}

/// A locally administered MAC address: the sender of every frame.
pub const MAC_A: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x0b, 0x01];
/// Another host's MAC: a frame to it is `PACKET_OTHERHOST` at the gateway.
pub const MAC_B: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x0b, 0xfe];
/// The gateway's MAC as `BPF_PROG_TEST_RUN` sees it: the loopback
/// device's, all zeros, so the kernel classifies frames to it as
/// `PACKET_HOST`, as a LAN host's frames to its gateway are.
pub const MAC_GW: [u8; 6] = [0; 6];

pub fn ethernet(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(ETH_HLEN + payload.len());
    b.extend_from_slice(&dst);
    b.extend_from_slice(&src);
    b.extend_from_slice(&ethertype.to_be_bytes());
    b.extend_from_slice(payload);
    b
}

/// IP option bytes `len` long: a Router Alert option (RFC 2113) followed by
/// NOPs. `len` is a multiple of 4 from 4 to 40.
pub fn router_alert_and_nops(len: usize) -> Vec<u8> {
    assert!(
        (4..=40).contains(&len) && len.is_multiple_of(4),
        "bad option length {len}"
    );
    let mut o = vec![0x94, 0x04, 0x00, 0x00];
    o.resize(len, 0x01);
    o
}

/// Recomputes the IPv4 header checksum of the packet at `l3` in `frame`
/// after a test has edited header fields.
pub fn refresh_ip_checksum(frame: &mut [u8], l3: usize) {
    let ihl = usize::from(frame[l3] & 0x0f) * 4;
    let end = (l3 + ihl.max(20)).min(frame.len());
    frame[l3 + 10] = 0;
    frame[l3 + 11] = 0;
    let c = internet_checksum(&frame[l3..end]);
    frame[l3 + 10..l3 + 12].copy_from_slice(&c.to_be_bytes());
}

/// Where two byte strings differ, for assertion messages: the lengths, and
/// each differing offset with both bytes (at most 32 of them), plus hex
/// dumps of both.
pub fn describe_difference(expected: &[u8], got: &[u8]) -> String {
    let mut s = String::new();
    if expected.len() != got.len() {
        let _ = writeln!(
            s,
            "length: expected {} bytes, got {}",
            expected.len(),
            got.len()
        );
    }
    let diffs: Vec<usize> = (0..expected.len().min(got.len()))
        .filter(|&i| expected[i] != got[i])
        .collect();
    for &i in diffs.iter().take(32) {
        let _ = writeln!(
            s,
            "  offset {i:4} (0x{i:03x}): expected {:02x}, got {:02x}",
            expected[i], got[i]
        );
    }
    if diffs.len() > 32 {
        let _ = writeln!(s, "  ... {} differing bytes in all", diffs.len());
    }
    let _ = writeln!(s, "expected: {}", hex(expected));
    let _ = write!(s, "got:      {}", hex(got));
    s
}

pub fn hex(b: &[u8]) -> String {
    let mut s = String::with_capacity(b.len() * 3);
    for (i, x) in b.iter().enumerate() {
        if i > 0 && i % 2 == 0 {
            s.push(' ');
        }
        let _ = write!(s, "{x:02x}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_matches_the_rfc1071_worked_example() {
        // RFC 1071 section 3: the words 0001 f203 f4f5 f6f7 sum to ddf2.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(ones_complement_sum(&data), 0xddf2);
        assert_eq!(internet_checksum(&data), 0x220d);
    }

    #[test]
    fn checksum_matches_a_hand_verified_ipv4_header() {
        // 192.168.0.1 -> 192.168.0.199, UDP, TTL 64, DF, total length 115:
        // the checksum is b861.
        let mut h = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(internet_checksum(&h), 0xb861);
        h[10..12].copy_from_slice(&0xb861u16.to_be_bytes());
        assert_eq!(internet_checksum(&h), 0, "a correct header verifies to 0");
    }

    #[test]
    fn checksum_matches_a_hand_verified_udp_datagram() {
        // 10.0.0.1:1 -> 10.0.0.2:2, empty payload. Pseudo-header and header
        // words: 0a00 0001 0a00 0002 0011 0008 0001 0002 0008 0000 = 1427.
        let seg = [0x00, 0x01, 0x00, 0x02, 0x00, 0x08, 0x00, 0x00];
        let (a, b) = (Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2));
        assert_eq!(l4_checksum(a, b, IPPROTO_UDP, &seg), 0xebd8);
        let p = Ipv4::udp(a, b, Udp::new(1, 2, &[]));
        assert_eq!(
            p.l4_bytes(),
            [0x00, 0x01, 0x00, 0x02, 0x00, 0x08, 0xeb, 0xd8]
        );
    }

    #[test]
    fn checksum_pads_an_odd_trailing_byte_with_zero() {
        assert_eq!(ones_complement_sum(&[0x01]), 0x0100);
        assert_eq!(internet_checksum(&[0x01]), 0xfeff);
        assert_eq!(
            ones_complement_sum(&[0xab, 0xcd, 0xef]),
            ones_complement_sum(&[0xab, 0xcd, 0xef, 0x00])
        );
    }

    #[test]
    fn checksum_folds_every_carry() {
        // ffff + ffff + 0002 = 2_0000, which folds to 0002 (ffff is a
        // one's complement zero); ff00 + 0201 = 1_0101 folds to 0102.
        assert_eq!(
            ones_complement_sum(&[0xff, 0xff, 0xff, 0xff, 0x00, 0x02]),
            0x0002
        );
        assert_eq!(ones_complement_sum(&[0xff, 0x00, 0x02, 0x01]), 0x0102);
        // 64 Ki words of 0xffff still fold to 0xffff ("negative zero").
        assert_eq!(ones_complement_sum(&vec![0xff; 1 << 17]), 0xffff);
    }

    fn verify(p: &Ipv4) {
        let b = p.bytes();
        let hlen = p.header_len();
        assert_eq!(usize::from(b[0] & 0x0f) * 4, hlen);
        assert_eq!(usize::from(u16::from_be_bytes([b[2], b[3]])), b.len());
        assert_eq!(internet_checksum(&b[..hlen]), 0, "IP header checksum");
        let l4 = &b[hlen..];
        match p.proto() {
            IPPROTO_TCP | IPPROTO_UDP => {
                let mut buf = pseudo_header(p.src, p.dst, p.proto(), l4.len()).to_vec();
                buf.extend_from_slice(l4);
                assert_eq!(internet_checksum(&buf), 0, "L4 checksum");
            }
            IPPROTO_ICMP => assert_eq!(internet_checksum(l4), 0, "ICMP checksum"),
            _ => {}
        }
    }

    #[test]
    fn built_packets_verify_to_zero_with_and_without_options() {
        let (a, b) = (Ipv4Addr::new(198, 18, 1, 2), Ipv4Addr::new(198, 19, 0, 10));
        let mut packets = vec![
            Ipv4::tcp(a, b, Tcp::new(40000, 443, TCP_SYN, b"")),
            Ipv4::tcp(a, b, Tcp::new(40000, 443, TCP_ACK | TCP_PSH, b"odd")),
            Ipv4::udp(a, b, Udp::new(40001, 53, b"query")),
            Ipv4::icmp(a, b, Icmp::echo_request(0x1234, 7, b"ping!")),
        ];
        let quoted = packets[0].bytes();
        packets.push(Ipv4::icmp(
            b,
            a,
            Icmp::error(ICMP_DEST_UNREACH, 3, [0; 4], &quoted),
        ));
        for p in packets.clone() {
            verify(&p);
            for len in (4..=40).step_by(4) {
                let mut q = p.clone();
                q.options = router_alert_and_nops(len);
                verify(&q);
            }
        }
    }

    #[test]
    fn udp_without_checksum_keeps_zero_and_a_computed_zero_is_sent_as_ffff() {
        let (a, b) = (Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2));
        let mut u = Udp::new(1, 2, &[]);
        u.checksum = false;
        assert_eq!(Ipv4::udp(a, b, u).l4_bytes()[6..8], [0, 0]);
        // 10.0.0.1:1 -> 10.0.0.2:2 with a 2-byte payload: the other words
        // (0a00 0001 0a00 0002 0011 000a 0001 0002 000a) sum to 142b, so
        // the payload ebd4 makes the sum ffff and the computed checksum 0.
        let p = Ipv4::udp(a, b, Udp::new(1, 2, &[0xeb, 0xd4]));
        assert_eq!(p.l4_bytes()[6..8], [0xff, 0xff]);
    }
}
