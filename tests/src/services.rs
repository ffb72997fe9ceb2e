//! Traffic endpoints living in namespaces: TCP/UDP servers (stopped on drop)
//! and bounded-time clients, plus an in-process ICMP ping.
//!
//! Sockets are created while the calling thread is inside the namespace
//! ([`NetNs::enter`]) and keep that namespace afterwards.

use std::io::{self, Read, Write};
use std::net::{
    IpAddr, Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket,
};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::netns::NetNs;
use crate::tun::poll_readable;

/// Connect/read/write timeout used by the clients.
pub const IO_TIMEOUT: Duration = Duration::from_secs(3);
/// Upper bound for a whole client exchange.
pub const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(30);
/// A server connection idle this long is closed.
const SERVER_IDLE: Duration = Duration::from_secs(30);
const TICK: Duration = Duration::from_millis(100);

/// What a server answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Echo the data back.
    Echo,
    /// Answer with the peer address it sees, as text `ip:port\n`.
    ReportPeer,
}

type Peers = Arc<Mutex<Vec<SocketAddrV4>>>;

fn v4(a: SocketAddr) -> SocketAddrV4 {
    match a {
        SocketAddr::V4(a) => a,
        SocketAddr::V6(a) => panic!("unexpected IPv6 peer {a}"),
    }
}

fn push_peer(peers: &Peers, p: SocketAddrV4) {
    peers.lock().unwrap_or_else(|e| e.into_inner()).push(p);
}

/// A background server; stops (and joins its threads) on drop.
#[derive(Debug)]
pub struct Server {
    addr: SocketAddrV4,
    stop: Arc<AtomicBool>,
    peers: Peers,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    /// The bound address (with the real port when 0 was asked for).
    pub fn addr(&self) -> SocketAddrV4 {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Peer addresses seen so far (one per TCP connection / UDP datagram).
    pub fn peers(&self) -> Vec<SocketAddrV4> {
        self.peers.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// TCP echo server on `addr:port` (port 0 = any) in `ns`.
pub fn tcp_echo_server(ns: &NetNs, addr: Ipv4Addr, port: u16) -> Server {
    tcp_server(ns, addr, port, Mode::Echo)
}

/// TCP server that sends `ip:port\n` of the peer it sees, then closes.
pub fn tcp_peer_server(ns: &NetNs, addr: Ipv4Addr, port: u16) -> Server {
    tcp_server(ns, addr, port, Mode::ReportPeer)
}

pub fn tcp_server(ns: &NetNs, addr: Ipv4Addr, port: u16, mode: Mode) -> Server {
    let listener = ns
        .run(|| TcpListener::bind((addr, port)))
        .unwrap_or_else(|e| panic!("[netns {}] bind tcp {addr}:{port}: {e}", ns.name()));
    let local = v4(listener.local_addr().expect("local_addr"));
    let stop = Arc::new(AtomicBool::new(false));
    let peers = Peers::default();
    let (s, p) = (stop.clone(), peers.clone());
    let thread = std::thread::Builder::new()
        .name(format!("tcp-{mode:?}-{local}"))
        .spawn(move || accept_loop(&listener, mode, &s, &p))
        .expect("spawn server thread");
    Server {
        addr: local,
        stop,
        peers,
        thread: Some(thread),
    }
}

fn accept_loop(listener: &TcpListener, mode: Mode, stop: &Arc<AtomicBool>, peers: &Peers) {
    let mut conns = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        if !poll_readable(listener.as_raw_fd(), TICK.as_millis() as i32) {
            continue;
        }
        let Ok((stream, peer)) = listener.accept() else {
            continue;
        };
        push_peer(peers, v4(peer));
        let stop = stop.clone();
        conns.push(std::thread::spawn(move || {
            let _ = serve_tcp(stream, v4(peer), mode, &stop);
        }));
        conns.retain(|c: &JoinHandle<()>| !c.is_finished());
    }
    for c in conns {
        let _ = c.join();
    }
}

fn serve_tcp(
    mut s: TcpStream,
    peer: SocketAddrV4,
    mode: Mode,
    stop: &AtomicBool,
) -> io::Result<()> {
    s.set_nonblocking(false)?;
    s.set_read_timeout(Some(TICK))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    if mode == Mode::ReportPeer {
        s.write_all(format!("{peer}\n").as_bytes())?;
        s.shutdown(Shutdown::Write)?;
    }
    let mut buf = vec![0u8; 65536];
    let mut idle = Instant::now();
    while !stop.load(Ordering::Relaxed) && idle.elapsed() < SERVER_IDLE {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                idle = Instant::now();
                if mode == Mode::Echo {
                    s.write_all(&buf[..n])?;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// UDP echo server on `addr:port` in `ns`; records each datagram's source.
pub fn udp_echo_server(ns: &NetNs, addr: Ipv4Addr, port: u16) -> Server {
    udp_server(ns, addr, port, Mode::Echo)
}

/// UDP server answering each datagram with the source `ip:port\n` it saw.
pub fn udp_peer_server(ns: &NetNs, addr: Ipv4Addr, port: u16) -> Server {
    udp_server(ns, addr, port, Mode::ReportPeer)
}

pub fn udp_server(ns: &NetNs, addr: Ipv4Addr, port: u16, mode: Mode) -> Server {
    let sock = ns
        .run(|| UdpSocket::bind((addr, port)))
        .unwrap_or_else(|e| panic!("[netns {}] bind udp {addr}:{port}: {e}", ns.name()));
    let local = v4(sock.local_addr().expect("local_addr"));
    sock.set_read_timeout(Some(TICK)).expect("set_read_timeout");
    let stop = Arc::new(AtomicBool::new(false));
    let peers = Peers::default();
    let (s, p) = (stop.clone(), peers.clone());
    let thread = std::thread::Builder::new()
        .name(format!("udp-{mode:?}-{local}"))
        .spawn(move || {
            let mut buf = vec![0u8; 65536];
            while !s.load(Ordering::Relaxed) {
                let Ok((n, peer)) = sock.recv_from(&mut buf) else {
                    continue;
                };
                let peer = v4(peer);
                push_peer(&p, peer);
                let _ = match mode {
                    Mode::Echo => sock.send_to(&buf[..n], peer),
                    Mode::ReportPeer => sock.send_to(format!("{peer}\n").as_bytes(), peer),
                };
            }
        })
        .expect("spawn server thread");
    Server {
        addr: local,
        stop,
        peers,
        thread: Some(thread),
    }
}

/// Connects from `ns` (optionally bound to source `src`) with [`IO_TIMEOUT`]
/// for connect, reads and writes.
pub fn tcp_connect(ns: &NetNs, src: Option<Ipv4Addr>, dst: SocketAddrV4) -> io::Result<TcpStream> {
    tcp_connect_from(ns, src.map(|a| SocketAddrV4::new(a, 0)), dst)
}

/// [`tcp_connect`] from a given source address and port.
pub fn tcp_connect_from(
    ns: &NetNs,
    src: Option<SocketAddrV4>,
    dst: SocketAddrV4,
) -> io::Result<TcpStream> {
    let sock = ns.run(|| Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)))?;
    if let Some(src) = src {
        sock.bind(&SockAddr::from(src))?;
    }
    sock.connect_timeout(&SockAddr::from(dst), IO_TIMEOUT)?;
    let s: TcpStream = sock.into();
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(s)
}

/// Sends `payload`, half-closes, and returns everything the server sent
/// back until it closed. Writing runs on a helper thread so large echoes
/// cannot deadlock.
pub fn tcp_request_from(
    ns: &NetNs,
    src: Option<Ipv4Addr>,
    dst: SocketAddrV4,
    payload: &[u8],
) -> io::Result<Vec<u8>> {
    let mut s = tcp_connect(ns, src, dst)?;
    let mut w = s.try_clone()?;
    let data = payload.to_vec();
    let writer = std::thread::spawn(move || -> io::Result<()> {
        w.write_all(&data)?;
        w.shutdown(Shutdown::Write)
    });
    let deadline = Instant::now() + EXCHANGE_TIMEOUT;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 65536];
    let res = loop {
        if Instant::now() > deadline {
            break Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "tcp exchange took too long",
            ));
        }
        match s.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) => break Err(e),
        }
    };
    if res.is_err() {
        let _ = s.shutdown(Shutdown::Both); // unblocks the writer
    }
    let wres = writer
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("writer panicked")));
    res?;
    wres?;
    Ok(out)
}

/// [`tcp_request_from`] with the default source address.
pub fn tcp_request(ns: &NetNs, dst: SocketAddrV4, payload: &[u8]) -> io::Result<Vec<u8>> {
    tcp_request_from(ns, None, dst, payload)
}

/// Asks a [`tcp_peer_server`] which address this connection arrived from.
pub fn tcp_seen_as(
    ns: &NetNs,
    src: Option<Ipv4Addr>,
    dst: SocketAddrV4,
) -> io::Result<SocketAddrV4> {
    parse_peer(&tcp_request_from(ns, src, dst, b"")?)
}

fn parse_peer(reply: &[u8]) -> io::Result<SocketAddrV4> {
    let text = String::from_utf8_lossy(reply);
    text.trim().parse().map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("bad peer reply {text:?}: {e}"),
        )
    })
}

/// Sends one datagram from `ns` (optionally from `src`) and waits for one
/// reply; up to 3 attempts, 1 s each.
pub fn udp_request_from(
    ns: &NetNs,
    src: Option<Ipv4Addr>,
    dst: SocketAddrV4,
    payload: &[u8],
) -> io::Result<Vec<u8>> {
    let sock = ns.run(|| UdpSocket::bind((src.unwrap_or(Ipv4Addr::UNSPECIFIED), 0)))?;
    udp_exchange(&sock, dst, payload)
}

/// Sends `payload` from `sock` to `dst` and waits for one reply; up to 3
/// attempts, 1 s each. `sock` is connected to `dst`.
pub fn udp_exchange(sock: &UdpSocket, dst: SocketAddrV4, payload: &[u8]) -> io::Result<Vec<u8>> {
    sock.connect(dst)?;
    sock.set_read_timeout(Some(Duration::from_secs(1)))?;
    let mut buf = vec![0u8; 65536];
    let mut last = io::Error::new(io::ErrorKind::TimedOut, "no udp reply");
    for _ in 0..3 {
        sock.send(payload)?;
        match sock.recv(&mut buf) {
            Ok(n) => return Ok(buf[..n].to_vec()),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// [`udp_request_from`] with the default source address.
pub fn udp_request(ns: &NetNs, dst: SocketAddrV4, payload: &[u8]) -> io::Result<Vec<u8>> {
    udp_request_from(ns, None, dst, payload)
}

/// Asks a [`udp_peer_server`] which source address the datagram came from.
pub fn udp_seen_as(
    ns: &NetNs,
    src: Option<Ipv4Addr>,
    dst: SocketAddrV4,
) -> io::Result<SocketAddrV4> {
    parse_peer(&udp_request_from(ns, src, dst, b"?")?)
}

/// [`udp_seen_as`] from a socket the caller bound (to a chosen port).
pub fn udp_seen_from(sock: &UdpSocket, dst: SocketAddrV4) -> io::Result<SocketAddrV4> {
    parse_peer(&udp_exchange(sock, dst, b"?")?)
}

/// Result of [`ping_stats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PingStats {
    pub sent: u32,
    pub received: u32,
}

/// Sends `count` ICMP echo requests from `ns` to `dst`; true if at least one
/// reply came back (like `ping -c`). Each probe waits up to 1 s.
pub fn ping(ns: &NetNs, dst: Ipv4Addr, count: u32) -> bool {
    ping_stats(ns, None, dst, count, Duration::from_secs(1)).received > 0
}

/// [`ping`] with source address `src` (like `ping -I src`).
pub fn ping_from(ns: &NetNs, src: Ipv4Addr, dst: Ipv4Addr, count: u32) -> bool {
    ping_stats(ns, Some(src), dst, count, Duration::from_secs(1)).received > 0
}

/// In-process ping over a raw ICMP socket (no `ping` binary needed).
/// Probes that cannot be sent (e.g. no route) count as lost.
pub fn ping_stats(
    ns: &NetNs,
    src: Option<Ipv4Addr>,
    dst: Ipv4Addr,
    count: u32,
    wait: Duration,
) -> PingStats {
    static IDS: AtomicU16 = AtomicU16::new(0);
    let sock = ns
        .run(|| Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4)))
        .unwrap_or_else(|e| panic!("[netns {}] raw ICMP socket: {e}", ns.name()));
    if let Some(src) = src {
        sock.bind(&SockAddr::from(SocketAddrV4::new(src, 0)))
            .unwrap_or_else(|e| panic!("[netns {}] bind ICMP socket to {src}: {e}", ns.name()));
    }
    let id = (std::process::id() as u16)
        .wrapping_mul(31)
        .wrapping_add(IDS.fetch_add(1, Ordering::Relaxed));
    let to = SockAddr::from(SocketAddrV4::new(dst, 0));
    let mut stats = PingStats {
        sent: 0,
        received: 0,
    };
    let mut buf = [0u8; 2048];
    for seq in 0..count {
        let seq = seq as u16;
        if sock.send_to(&echo_request(id, seq), &to).is_err() {
            continue;
        }
        stats.sent += 1;
        let deadline = Instant::now() + wait;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            if !poll_readable(sock.as_raw_fd(), left.as_millis().max(1) as i32) {
                break;
            }
            let Ok(n) = (&sock).read(&mut buf) else { break };
            if is_echo_reply(&buf[..n], dst, id, seq) {
                stats.received += 1;
                break;
            }
        }
    }
    stats
}

fn echo_request(id: u16, seq: u16) -> Vec<u8> {
    let mut p = vec![8u8, 0, 0, 0];
    p.extend_from_slice(&id.to_be_bytes());
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(b"multihome-testbed-ping!!");
    let c = inet_checksum(&p);
    p[2..4].copy_from_slice(&c.to_be_bytes());
    p
}

fn is_echo_reply(pkt: &[u8], from: Ipv4Addr, id: u16, seq: u16) -> bool {
    if pkt.len() < 20 || pkt[0] >> 4 != 4 || pkt[9] != 1 {
        return false;
    }
    let ihl = usize::from(pkt[0] & 0x0f) * 4;
    let src = IpAddr::from([pkt[12], pkt[13], pkt[14], pkt[15]]);
    let Some(icmp) = pkt.get(ihl..) else {
        return false;
    };
    icmp.len() >= 8
        && src == IpAddr::V4(from)
        && icmp[0] == 0
        && icmp[4..6] == id.to_be_bytes()
        && icmp[6..8] == seq.to_be_bytes()
}

/// RFC 1071 Internet checksum.
pub fn inet_checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_request_checksums_to_zero() {
        let p = echo_request(0x1234, 7);
        assert_eq!(inet_checksum(&p), 0);
    }

    #[test]
    fn parses_peer_replies() {
        let p = parse_peer(b"198.18.11.1:4321\n").expect("parse");
        assert_eq!(p, SocketAddrV4::new(Ipv4Addr::new(198, 18, 11, 1), 4321));
        assert!(parse_peer(b"junk").is_err());
    }
}
