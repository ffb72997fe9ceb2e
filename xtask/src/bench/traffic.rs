//! Load generators the bench runs inside its namespaces, as hidden
//! `cargo xtask bench-tool` subcommands: a raw `AF_PACKET` UDP sender
//! (iperf3 cannot load a gateway with small packets, DESIGN.md §11) and a
//! TCP request/response timer.
use std::{
    ffi::CString,
    io::{Read as _, Write as _},
    mem,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddrV4, TcpListener, TcpStream},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use clap::{Args, Subcommand};

#[derive(Subcommand)]
pub enum Tool {
    /// Send 64-byte UDP datagrams as Ethernet frames, bypassing the qdisc
    Blast(BlastArgs),
    /// Echo every message back (the far end of `rr-client`)
    RrServer {
        #[arg(long)]
        listen: SocketAddrV4,
    },
    /// Time request/response round trips; prints `p50_us p99_us`
    RrClient {
        #[arg(long)]
        server: SocketAddrV4,
        #[arg(long, default_value_t = 20_000)]
        count: usize,
    },
}

pub fn run(tool: Tool) -> Result<()> {
    match tool {
        Tool::Blast(a) => blast(&a),
        Tool::RrServer { listen } => rr_server(listen),
        Tool::RrClient { server, count } => {
            let (p50, p99) = rr_client(server, count)?;
            println!("{p50:.2} {p99:.2}");
            Ok(())
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct BlastArgs {
    /// Interface to send on
    #[arg(long)]
    pub ifname: String,
    /// The next hop's MAC address (aa:bb:cc:dd:ee:ff)
    #[arg(long)]
    pub dst_mac: String,
    /// The sending interface's MAC address
    #[arg(long)]
    pub src_mac: String,
    /// IPv4, or IPv6 for IPv6 frames (then `dst_base` must be IPv6 too)
    #[arg(long)]
    pub src: IpAddr,
    /// Flow `i` goes to `dst_base + (i mod 65536)`
    #[arg(long)]
    pub dst_base: IpAddr,
    #[arg(long, default_value_t = 9)]
    pub dport: u16,
    /// Number of distinct flows; they are sent round robin
    #[arg(long)]
    pub flows: u64,
    /// Stop after this long (fractions allowed)
    #[arg(long, conflicts_with = "once")]
    pub seconds: Option<f64>,
    /// Send each flow exactly once, then stop
    #[arg(long)]
    pub once: bool,
}

const PAYLOAD: usize = 64;
const ETH: usize = 14;
const IP: usize = 20;
const UDP: usize = 8;
const FRAME: usize = ETH + IP + UDP + PAYLOAD;
const IP6: usize = 40;
const FRAME6: usize = ETH + IP6 + UDP + PAYLOAD;
const BATCH: usize = 64;

/// Flow `i`'s destination address and source port: the address walks a
/// /16 first, so every flow is new to the NAT even at a million flows, and
/// the port lies in Linux's default ephemeral range, as a LAN host's would.
pub fn flow(dst_base: Ipv4Addr, i: u64) -> (Ipv4Addr, u16) {
    let addr = u32::from(dst_base).wrapping_add((i & 0xffff) as u32);
    let port = 32768 + ((i >> 16) % 28232) as u16;
    (Ipv4Addr::from(addr), port)
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

fn sum16(data: &[u8]) -> u32 {
    data.chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum()
}

/// Writes one complete frame (IPv4 and UDP checksums computed) into `buf`.
pub fn write_frame(
    buf: &mut [u8; FRAME],
    macs: ([u8; 6], [u8; 6]),
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
) {
    write_eth(buf, macs, 0x0800);
    let ip = &mut buf[ETH..ETH + IP];
    ip.copy_from_slice(&[
        0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ]);
    ip[2..4].copy_from_slice(&((IP + UDP + PAYLOAD) as u16).to_be_bytes());
    ip[12..16].copy_from_slice(&src.octets());
    ip[16..20].copy_from_slice(&dst.octets());
    let c = !fold(sum16(ip));
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let pseudo = sum16(&src.octets()) + sum16(&dst.octets());
    write_udp(&mut buf[ETH + IP..], pseudo, sport, dport);
}

/// The Ethernet header: destination and source MACs, then `ethertype`.
fn write_eth(buf: &mut [u8], macs: ([u8; 6], [u8; 6]), ethertype: u16) {
    buf[0..6].copy_from_slice(&macs.0);
    buf[6..12].copy_from_slice(&macs.1);
    buf[12..14].copy_from_slice(&ethertype.to_be_bytes());
}

/// The UDP datagram at the start of `udp` (header and payload), its
/// checksum over `pseudo` (the addresses' sum) and the rest of the
/// pseudo-header.
fn write_udp(udp: &mut [u8], pseudo: u32, sport: u16, dport: u16) {
    let len = (UDP + PAYLOAD) as u16;
    udp[0..2].copy_from_slice(&sport.to_be_bytes());
    udp[2..4].copy_from_slice(&dport.to_be_bytes());
    udp[4..6].copy_from_slice(&len.to_be_bytes());
    udp[6..8].fill(0);
    for (i, b) in udp[UDP..].iter_mut().enumerate() {
        *b = i as u8;
    }
    let c = match !fold(pseudo + 17 + u32::from(len) + sum16(udp)) {
        0 => 0xffff,
        c => c,
    };
    udp[6..8].copy_from_slice(&c.to_be_bytes());
}

/// Flow `i`'s IPv6 destination (the low 16 bits walk) and source port,
/// as [`flow`].
pub fn flow6(dst_base: Ipv6Addr, i: u64) -> (Ipv6Addr, u16) {
    let addr = u128::from(dst_base).wrapping_add(u128::from(i & 0xffff));
    (Ipv6Addr::from(addr), 32768 + ((i >> 16) % 28232) as u16)
}

/// [`write_frame`] for IPv6 (RFC 8200; the UDP checksum over its
/// pseudo-header).
pub fn write_frame6(
    buf: &mut [u8; FRAME6],
    macs: ([u8; 6], [u8; 6]),
    src: Ipv6Addr,
    dst: Ipv6Addr,
    sport: u16,
    dport: u16,
) {
    write_eth(buf, macs, 0x86dd);
    let len = (UDP + PAYLOAD) as u16;
    let ip = &mut buf[ETH..ETH + IP6];
    ip[..4].copy_from_slice(&[0x60, 0, 0, 0]);
    ip[4..6].copy_from_slice(&len.to_be_bytes());
    ip[6..8].copy_from_slice(&[17, 64]);
    ip[8..24].copy_from_slice(&src.octets());
    ip[24..40].copy_from_slice(&dst.octets());
    let pseudo = sum16(&src.octets()) + sum16(&dst.octets());
    write_udp(&mut buf[ETH + IP6..], pseudo, sport, dport);
}

pub fn parse_mac(text: &str) -> Result<[u8; 6]> {
    let bytes: Vec<u8> = text
        .trim()
        .split(':')
        .map(|p| u8::from_str_radix(p, 16))
        .collect::<Result<_, _>>()
        .with_context(|| format!("bad MAC address {text:?}"))?;
    bytes
        .try_into()
        .map_err(|_| anyhow::anyhow!("bad MAC address {text:?}"))
}

fn packet_socket(ifname: &str) -> Result<(OwnedFd, i32)> {
    let name = CString::new(ifname)?;
    // SAFETY: plain libc calls with valid arguments; the fd is owned below.
    unsafe {
        let ifindex = libc::if_nametoindex(name.as_ptr()) as i32;
        ensure!(ifindex > 0, "no interface {ifname}");
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
        ensure!(
            fd >= 0,
            "AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        );
        let fd = OwnedFd::from_raw_fd(fd);
        let one: libc::c_int = 1;
        let rc = libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_PACKET,
            libc::PACKET_QDISC_BYPASS,
            (&one as *const libc::c_int).cast(),
            mem::size_of::<libc::c_int>() as u32,
        );
        ensure!(
            rc == 0,
            "PACKET_QDISC_BYPASS: {}",
            std::io::Error::last_os_error()
        );
        let mut sll: libc::sockaddr_ll = mem::zeroed();
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = (libc::ETH_P_IP as u16).to_be();
        sll.sll_ifindex = ifindex;
        let rc = libc::bind(
            fd.as_raw_fd(),
            (&sll as *const libc::sockaddr_ll).cast(),
            mem::size_of::<libc::sockaddr_ll>() as u32,
        );
        ensure!(
            rc == 0,
            "bind to {ifname}: {}",
            std::io::Error::last_os_error()
        );
        Ok((fd, ifindex))
    }
}

/// Sends until the time is up (or each flow once); prints the count sent.
fn blast(a: &BlastArgs) -> Result<()> {
    ensure!(a.flows > 0, "--flows must be at least 1");
    ensure!(a.once || a.seconds.is_some(), "give --seconds or --once");
    let macs = (parse_mac(&a.dst_mac)?, parse_mac(&a.src_mac)?);
    match (a.src, a.dst_base) {
        (IpAddr::V4(src), IpAddr::V4(base)) => send_flows(a, |f: &mut [u8; FRAME], i| {
            let (dst, sport) = flow(base, i);
            write_frame(f, macs, src, dst, sport, a.dport);
        }),
        (IpAddr::V6(src), IpAddr::V6(base)) => send_flows(a, |f: &mut [u8; FRAME6], i| {
            let (dst, sport) = flow6(base, i);
            write_frame6(f, macs, src, dst, sport, a.dport);
        }),
        _ => bail!("--src and --dst-base must be of one family"),
    }
}

/// [`blast`]'s loop over frames of `N` bytes, flow `i` written by `write`.
fn send_flows<const N: usize>(a: &BlastArgs, write: impl Fn(&mut [u8; N], u64)) -> Result<()> {
    let (fd, _) = packet_socket(&a.ifname)?;
    let mut frames = [[0u8; N]; BATCH];
    let fixed = a.flows <= BATCH as u64 * 64 && !a.once;
    // Few flows: build them all once and cycle through them.
    let prebuilt: Vec<[u8; N]> = if fixed {
        (0..a.flows)
            .map(|i| {
                let mut f = [0u8; N];
                write(&mut f, i);
                f
            })
            .collect()
    } else {
        Vec::new()
    };
    let deadline = a
        .seconds
        .map(|s| Instant::now() + Duration::from_secs_f64(s));
    let total = if a.once { a.flows } else { u64::MAX };
    let mut next = 0u64;
    let mut sent = 0u64;
    while sent < total && deadline.is_none_or(|d| Instant::now() < d) {
        let n = (total - sent).min(BATCH as u64) as usize;
        for (k, f) in frames.iter_mut().take(n).enumerate() {
            let i = (next + k as u64) % a.flows;
            if fixed {
                *f = prebuilt[i as usize];
            } else {
                write(f, i);
            }
        }
        let done = send_batch(&fd, &mut frames[..n])?;
        next += done as u64;
        sent += done as u64;
    }
    println!("{sent}");
    Ok(())
}

fn send_batch<const N: usize>(fd: &OwnedFd, frames: &mut [[u8; N]]) -> Result<usize> {
    let mut iov: Vec<libc::iovec> = frames
        .iter_mut()
        .map(|f| libc::iovec {
            iov_base: f.as_mut_ptr().cast(),
            iov_len: N,
        })
        .collect();
    let mut msgs: Vec<libc::mmsghdr> = iov
        .iter_mut()
        .map(|v| {
            // SAFETY: an all-zero msghdr is valid; the iovec outlives the call.
            let mut m: libc::mmsghdr = unsafe { mem::zeroed() };
            m.msg_hdr.msg_iov = v;
            m.msg_hdr.msg_iovlen = 1;
            m
        })
        .collect();
    // SAFETY: msgs points at msgs.len() initialised headers.
    let rc = unsafe { libc::sendmmsg(fd.as_raw_fd(), msgs.as_mut_ptr(), msgs.len() as u32, 0) };
    if rc < 0 {
        let e = std::io::Error::last_os_error();
        // A full device queue: try again.
        if matches!(e.raw_os_error(), Some(libc::ENOBUFS | libc::EAGAIN)) {
            return Ok(0);
        }
        bail!("sendmmsg: {e}");
    }
    Ok(rc as usize)
}

const MSG: usize = 64;

fn rr_server(listen: SocketAddrV4) -> Result<()> {
    let l = TcpListener::bind(listen).with_context(|| format!("listening on {listen}"))?;
    for conn in l.incoming() {
        let Ok(mut s) = conn else { continue };
        let _ = s.set_nodelay(true);
        let mut buf = [0u8; MSG];
        while s.read_exact(&mut buf).is_ok() && s.write_all(&buf).is_ok() {}
    }
    Ok(())
}

/// Returns the p50 and p99 round trip in microseconds.
pub fn rr_client(server: SocketAddrV4, count: usize) -> Result<(f64, f64)> {
    let mut s = TcpStream::connect_timeout(&server.into(), Duration::from_secs(3))
        .with_context(|| format!("connecting to {server}"))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    let mut buf = [7u8; MSG];
    let warmup = count / 10;
    let mut rtts = Vec::with_capacity(count);
    for i in 0..warmup + count {
        let t = Instant::now();
        s.write_all(&buf)?;
        s.read_exact(&mut buf).context("reading the echo")?;
        if i >= warmup {
            rtts.push(t.elapsed().as_nanos() as f64 / 1000.0);
        }
    }
    rtts.sort_by(f64::total_cmp);
    let at = |q: f64| rtts[((rtts.len() - 1) as f64 * q).round() as usize];
    Ok((at(0.50), at(0.99)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_checksums_verify_to_zero() {
        let mut f = [0u8; FRAME];
        let (dst, sport) = flow(Ipv4Addr::new(198, 19, 0, 0), 70_000);
        assert_eq!(dst, Ipv4Addr::new(198, 19, 17, 112));
        assert_eq!(sport, 32769);
        write_frame(
            &mut f,
            ([1; 6], [2; 6]),
            Ipv4Addr::new(198, 18, 1, 2),
            dst,
            sport,
            9,
        );
        assert_eq!(
            fold(sum16(&f[ETH..ETH + IP])),
            0xffff,
            "IPv4 header checksum"
        );
        let pseudo = sum16(&[198, 18, 1, 2]) + sum16(&dst.octets()) + 17 + 72;
        assert_eq!(fold(pseudo + sum16(&f[ETH + IP..])), 0xffff, "UDP checksum");
    }

    #[test]
    fn ipv6_frame_checksum_verifies_to_zero() {
        let mut f = [0u8; FRAME6];
        let base: Ipv6Addr = "2001:db8:ff::".parse().expect("v6");
        let (dst, sport) = flow6(base, 70_000);
        assert_eq!(dst, "2001:db8:ff::1170".parse::<Ipv6Addr>().expect("v6"));
        let src: Ipv6Addr = "fd00:1::2".parse().expect("v6");
        write_frame6(&mut f, ([1; 6], [2; 6]), src, dst, sport, 9);
        let pseudo = sum16(&src.octets()) + sum16(&dst.octets()) + 17 + 72;
        assert_eq!(
            fold(pseudo + sum16(&f[ETH + IP6..])),
            0xffff,
            "UDP checksum"
        );
    }

    #[test]
    fn a_million_flows_are_all_distinct() {
        let base = Ipv4Addr::new(198, 19, 0, 0);
        let mut seen = std::collections::HashSet::new();
        for i in 0..1_000_000 {
            assert!(seen.insert(flow(base, i)), "flow {i} repeats");
        }
    }

    #[test]
    fn mac_addresses_parse_and_bad_ones_are_refused() {
        assert_eq!(
            parse_mac("02:00:0a:ff:00:01\n").expect("mac"),
            [2, 0, 10, 255, 0, 1]
        );
        assert!(parse_mac("02:00:0a").is_err());
        assert!(parse_mac("zz:00:00:00:00:00").is_err());
    }
}
