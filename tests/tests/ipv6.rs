//! IPv6 through two uplinks: NPTv6 onto each uplink's prefix, pinned per
//! connection, replies only for existing flows, ICMPv6 errors mapped back.
use std::{
    collections::{BTreeMap, BTreeSet},
    io::ErrorKind,
    net::{Ipv6Addr, SocketAddr, UdpSocket},
    time::Duration,
};

use testbed::*;

/// `config_for` with IPv6: the LAN's ULA mapped onto each uplink's prefix.
fn config6(t: &Topology, weights: [u32; 2], extra: &str) -> String {
    config_for(t, weights, extra)
        .replacen(
            "lan = [",
            &format!("lan_prefixes6 = [\"{LAN6_NET}\"]\nlan = ["),
            1,
        )
        .replacen(
            "name = \"x\"\n",
            &format!(
                "name = \"x\"\ngateway6 = \"{UPLINK_X_GW6}\"\nprefix6 = \"{UPLINK_X_PREFIX6}\"\n"
            ),
            1,
        )
        .replacen(
            "name = \"y\"\n",
            &format!(
                "name = \"y\"\ngateway6 = \"{UPLINK_Y_GW6}\"\nprefix6 = \"{UPLINK_Y_PREFIX6}\"\n"
            ),
            1,
        )
}

fn v6(s: &str) -> Ipv6Addr {
    s.parse().expect("an IPv6 address")
}

fn prefix_of(p: &str) -> Ipv6Addr {
    v6(p.split('/').next().expect("prefix"))
}

/// Whether `a` is in the /64 `prefix`.
fn in64(a: Ipv6Addr, prefix: &str) -> bool {
    a.segments()[..4] == prefix_of(prefix).segments()[..4]
}

/// The one's-complement sum of an address's 16-bit words, zero folded to
/// one form: what NPTv6 must keep (RFC 6296 §3.1).
fn word_sum(a: Ipv6Addr) -> u32 {
    let s: u32 = a.segments().iter().map(|w| u32::from(*w)).sum();
    let s = (s & 0xffff) + (s >> 16);
    ((s & 0xffff) + (s >> 16)) % 0xffff
}

/// A UDP server on `[INET_SERVICE6]:port` in `inet` that answers each
/// datagram with the address it came from, as text.
fn udp6_peer_server(t: &Topology, port: u16) -> std::thread::JoinHandle<()> {
    let sock = t
        .inet
        .run(|| UdpSocket::bind(SocketAddr::new(v6(INET_SERVICE6).into(), port)))
        .expect("bind the IPv6 server");
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((_, from)) = sock.recv_from(&mut buf) {
            let _ = sock.send_to(from.ip().to_string().as_bytes(), from);
        }
    })
}

/// Sends one datagram from each of `ports` on the client to the server
/// and returns, per port, the source address the server saw.
fn seen_sources(t: &Topology, ports: &[u16], server_port: u16) -> BTreeMap<u16, Ipv6Addr> {
    seen_sources_from(&t.client, CLIENT6_ADDR, ports, server_port)
}

/// [`seen_sources`] from the LAN host `host` at `addr`.
fn seen_sources_from(
    host: &NetNs,
    addr: &str,
    ports: &[u16],
    server_port: u16,
) -> BTreeMap<u16, Ipv6Addr> {
    let to = SocketAddr::new(v6(INET_SERVICE6).into(), server_port);
    ports
        .iter()
        .map(|p| {
            let sock = host
                .run(|| UdpSocket::bind(SocketAddr::new(v6(addr).into(), *p)))
                .expect("bind on the client");
            sock.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
            let mut buf = [0u8; 128];
            let mut tries = 0;
            let n = loop {
                sock.send_to(b"who am I?", to).expect("send");
                match sock.recv_from(&mut buf) {
                    Ok((n, _)) => break n,
                    Err(_) if tries < 3 => tries += 1,
                    Err(e) => panic!("no answer to port {p} over IPv6: {e}"),
                }
            };
            let seen = std::str::from_utf8(&buf[..n]).expect("text");
            (*p, v6(seen))
        })
        .collect()
}

/// The second LAN's ULA (gw `lan1`, `client2`), and client2's address.
const LAN1_NET6: &str = "fd00:2::/64";
const CLIENT2_ADDR6: &str = "fd00:2::2";

/// Each LAN interface's own ULA, learned without `lan_prefixes6`, is
/// mapped onto its own subnet of every uplink's prefix: `lan0`'s onto
/// subnet 0, `lan1`'s onto subnet 1 (of a /56 each). Hosts on both LANs
/// get through either uplink, checksum-neutrally, and no ULA reaches an
/// ISP. When `lan1` loses its ULA, only its flows are purged.
#[test]
fn each_lan_interfaces_ula_maps_onto_its_own_subnet_of_every_uplinks_prefix() {
    let t = Topology::two_clients();
    t.add_ipv6();
    let c2 = t.client2();
    enable_ipv6(c2, &[IF_LAN], false);
    enable_ipv6(&t.gw, &[IF_LAN1], true);
    ip6(
        c2,
        &format!("addr add {CLIENT2_ADDR6}/64 dev {IF_LAN} nodad"),
    );
    ip6(c2, "route add default via fd00:2::1");
    ip6(&t.gw, &format!("addr add fd00:2::1/64 dev {IF_LAN1} nodad"));
    for (isp, block, via) in [
        (&t.ispx, "2001:db8:11:100::/56", UPLINK_X_ADDR6),
        (&t.ispy, "2001:db8:22:100::/56", UPLINK_Y_ADDR6),
    ] {
        ip6(isp, &format!("route add {block} via {via}"));
    }
    let config = config6(&t, [1, 1], "")
        .replace(&format!("lan_prefixes6 = [\"{LAN6_NET}\"]\n"), "")
        .replace(UPLINK_X_PREFIX6, "2001:db8:11:100::/56")
        .replace(UPLINK_Y_PREFIX6, "2001:db8:22:100::/56");
    let gw = Gateway::start(&t.gw, &config);
    eventually(Duration::from_secs(10), "both LANs' ULAs learned", || {
        gw.status()["lan_prefixes6"] == serde_json::json!([LAN6_NET, LAN1_NET6])
    });
    let st = gw.status();
    assert_eq!(
        st["uplinks"][0]["prefixes6"],
        serde_json::json!(["2001:db8:11:100::/64", "2001:db8:11:101::/64"]),
        "{st}"
    );
    let _srv = udp6_peer_server(&t, 7000);
    let ports = ports(16);
    let mut seen = BTreeMap::new();
    for (host, addr, subnet) in [(&t.client, CLIENT6_ADDR, 0x100), (c2, CLIENT2_ADDR6, 0x101)] {
        let got = seen_sources_from(host, addr, &ports, 7000);
        let mut isps = BTreeSet::new();
        for (p, s) in &got {
            let w = s.segments();
            assert!(
                w[..2] == [0x2001, 0xdb8] && [0x11, 0x22].contains(&w[2]),
                "port {p}: {addr} seen as {s}, on neither uplink's prefix"
            );
            assert_eq!(
                w[3], subnet,
                "port {p}: {addr} seen as {s}, not on its LAN's subnet"
            );
            assert_eq!(
                word_sum(*s),
                word_sum(v6(addr)),
                "port {p}: {s} is not neutral"
            );
            isps.insert(w[2]);
        }
        assert_eq!(
            isps.len(),
            2,
            "{addr}: one uplink took every connection: {got:?}"
        );
        seen.insert(addr, got);
    }
    assert_eq!(t.ula_sources(), 0, "a ULA source reached an ISP");
    // lan1's ULA goes: its mapping and its flows with it, not lan0's.
    ip6(&t.gw, &format!("addr del fd00:2::1/64 dev {IF_LAN1}"));
    eventually(Duration::from_secs(10), "lan1's ULA forgotten", || {
        gw.status()["lan_prefixes6"] == serde_json::json!([LAN6_NET])
    });
    eventually(Duration::from_secs(5), "lan1's flows purged", || {
        gw.log().contains(&format!(
            "the IPv6 mapping of {LAN1_NET6} changed; purged its"
        ))
    });
    assert!(
        !gw.log().contains(&format!("mapping of {LAN6_NET} changed")),
        "lan0's flows were purged too"
    );
    assert_eq!(
        seen_sources(&t, &ports, 7000),
        seen[CLIENT6_ADDR],
        "a lan0 flow moved"
    );
    assert_eq!(gw.reason("unsolicited"), 0);
}

/// Gives the client another address on the LAN: another IPv6 host.
fn another_lan_address(t: &Topology, addr: &str) {
    ip6(&t.client, &format!("addr add {addr}/64 dev {IF_LAN} nodad"));
}

fn ports(n: u16) -> Vec<u16> {
    (0..n).map(|i| 41000 + i).collect()
}

/// Each new connection leaves by one uplink with the client's address
/// mapped onto that uplink's prefix, checksum-neutrally; both uplinks
/// carry some; the same connection keeps its uplink; no ULA source
/// reaches an ISP.
fn ipv6_connections_spread_by_npt_and_keep_their_uplink(offloads: bool) {
    let t = Topology::standard();
    t.add_ipv6();
    if offloads {
        t.enable_checksum_offloads();
    }
    let gw = Gateway::start(&t.gw, &config6(&t, [1, 1], ""));
    let _srv = udp6_peer_server(&t, 7000);
    let ports = ports(24);
    let first = seen_sources(&t, &ports, 7000);
    let client = v6(CLIENT6_ADDR);
    let mut prefixes = BTreeSet::new();
    for (p, seen) in &first {
        let x = in64(*seen, UPLINK_X_PREFIX6);
        let y = in64(*seen, UPLINK_Y_PREFIX6);
        assert!(
            x || y,
            "port {p}: source {seen} is on neither uplink's prefix"
        );
        prefixes.insert(x);
        assert_eq!(
            word_sum(*seen),
            word_sum(client),
            "port {p}: {seen} is not a checksum-neutral mapping of {client}"
        );
        assert_ne!(
            seen.segments()[4..],
            [0u16; 4],
            "port {p}: the host's identifier was lost"
        );
    }
    assert_eq!(
        prefixes.len(),
        2,
        "one uplink took every connection: {first:?}"
    );
    let again = seen_sources(&t, &ports, 7000);
    assert_eq!(first, again, "a connection changed its uplink");
    assert_eq!(t.ula_sources(), 0, "a ULA source reached an ISP");
    assert_eq!(gw.reason("unsolicited"), 0);
    // `conns` and `status` show the flows as the remote sees them.
    let conns = gw.conns();
    for (p, seen) in &first {
        let c = conns
            .iter()
            .find(|c| c["src"] == CLIENT6_ADDR && c["sport"] == *p)
            .unwrap_or_else(|| panic!("port {p} missing from conns: {conns:?}"));
        assert_eq!(c["nat_addr"], seen.to_string(), "{c}");
        assert_eq!(c["nat_port"], *p, "{c}");
        assert_eq!(c["dst"], INET_SERVICE6, "{c}");
    }
    let st = gw.status();
    assert_eq!(st["lan_prefixes6"][0], LAN6_NET, "{st}");
    assert_eq!(st["uplinks"][0]["prefix6"], UPLINK_X_PREFIX6, "{st}");
    assert_eq!(st["uplinks"][1]["prefix6"], UPLINK_Y_PREFIX6, "{st}");
    assert_eq!(st["flows6"], ports.len(), "{st}");
}

#[test]
fn ipv6_connections_spread_by_npt_and_keep_their_uplink_offloads_off() {
    ipv6_connections_spread_by_npt_and_keep_their_uplink(false);
}

#[test]
fn ipv6_connections_spread_by_npt_and_keep_their_uplink_offloads_on() {
    ipv6_connections_spread_by_npt_and_keep_their_uplink(true);
}

/// RFC 6092 simple security: a datagram from the internet to the client's
/// mapped address passes only as a reply of an existing flow.
#[test]
fn unsolicited_ipv6_to_a_mapped_address_is_dropped_and_replies_pass() {
    let t = Topology::standard();
    t.add_ipv6();
    let gw = Gateway::start(&t.gw, &config6(&t, [1, 0], ""));
    let _srv = udp6_peer_server(&t, 7000);
    let mapped = seen_sources(&t, &[42000], 7000)[&42000];
    assert!(in64(mapped, UPLINK_X_PREFIX6), "weight 0 on y: {mapped}");
    let listener = t
        .client
        .run(|| UdpSocket::bind(SocketAddr::new(v6(CLIENT6_ADDR).into(), 42001)))
        .expect("bind");
    listener
        .set_read_timeout(Some(Duration::from_millis(500)))
        .expect("timeout");
    let before = gw.reason("unsolicited");
    t.inet.run(|| {
        let s = UdpSocket::bind(SocketAddr::new(v6(INET_SERVICE6).into(), 0)).expect("bind");
        for _ in 0..3 {
            s.send_to(b"knock", SocketAddr::new(mapped.into(), 42001))
                .expect("send");
        }
    });
    eventually(
        Duration::from_secs(3),
        "the gateway counts the unsolicited datagrams",
        || gw.reason("unsolicited") >= before + 3,
    );
    let mut buf = [0u8; 64];
    match listener.recv_from(&mut buf) {
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
        other => panic!("an unsolicited datagram reached the client: {other:?}"),
    }
}

/// A port unreachable from the server comes back as an ICMPv6 error to
/// the client's mapped address, quoting the mapped source: the gateway
/// maps both back, so the client's connected socket sees the refusal.
#[test]
fn an_icmpv6_error_about_a_mapped_packet_reaches_the_client() {
    let t = Topology::standard();
    t.add_ipv6();
    let _gw = Gateway::start(&t.gw, &config6(&t, [1, 1], ""));
    let sock = t
        .client
        .run(|| UdpSocket::bind(SocketAddr::new(v6(CLIENT6_ADDR).into(), 0)))
        .expect("bind");
    sock.connect(SocketAddr::new(v6(INET_SERVICE6).into(), 9))
        .expect("connect");
    sock.set_read_timeout(Some(Duration::from_secs(1)))
        .expect("timeout");
    let mut refused = false;
    for _ in 0..5 {
        sock.send(b"anyone?").expect("send");
        let mut buf = [0u8; 16];
        match sock.recv(&mut buf) {
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                refused = true;
                break;
            }
            _ => {}
        }
    }
    assert!(refused, "the port unreachable never reached the client");
    assert_eq!(t.ula_sources(), 0, "a ULA source reached an ISP");
}

/// A TCP server on `[INET_SERVICE6]:port` that reads one connection to
/// its end and answers with the byte count and the peer's address.
fn tcp6_sink(t: &Topology, port: u16) -> std::thread::JoinHandle<()> {
    use std::io::{Read as _, Write as _};
    let listener = t
        .inet
        .run(|| std::net::TcpListener::bind(SocketAddr::new(v6(INET_SERVICE6).into(), port)))
        .expect("bind the IPv6 TCP server");
    std::thread::spawn(move || {
        if let Ok((mut s, peer)) = listener.accept() {
            let _ = s.set_read_timeout(Some(IO_TIMEOUT));
            let mut total = 0usize;
            let mut buf = vec![0u8; 65536];
            // The client half-closes after its data.
            while let Ok(n @ 1..) = s.read(&mut buf) {
                total += n;
            }
            let _ = s.write_all(format!("{total} {}", peer.ip()).as_bytes());
        }
    })
}

/// Sends `len` bytes over TCP from the client to the sink and returns
/// its answer: the bytes it counted and the source it saw.
fn tcp6_send(t: &Topology, port: u16, len: usize) -> (usize, Ipv6Addr) {
    use std::io::{Read as _, Write as _};
    let mut s = t
        .client
        .run(|| {
            std::net::TcpStream::connect_timeout(
                &SocketAddr::new(v6(INET_SERVICE6).into(), port),
                IO_TIMEOUT,
            )
        })
        .expect("TCP connect over IPv6");
    s.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    s.set_write_timeout(Some(IO_TIMEOUT)).expect("timeout");
    let data: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
    s.write_all(&data).expect("send over IPv6");
    s.shutdown(std::net::Shutdown::Write).expect("half-close");
    let mut answer = String::new();
    s.read_to_string(&mut answer).expect("the sink's answer");
    let (n, addr) = answer.split_once(' ').expect("count and address");
    (n.parse().expect("a count"), v6(addr))
}

/// Bulk TCP through uplinks whose MTU is smaller than the LAN's: the
/// gateway's Packet Too Big reaches the client, which shrinks its
/// segments, and every byte arrives with its checksums intact (offloads
/// off, so a wrong checksum would be dropped by the receiver).
#[test]
fn bulk_tcp_over_ipv6_finds_the_smaller_path_mtu_of_its_uplink() {
    let t = Topology::standard();
    t.add_ipv6();
    t.set_uplink_mtu(Isp::X, 1400);
    t.set_uplink_mtu(Isp::Y, 1400);
    let _gw = Gateway::start(&t.gw, &config6(&t, [1, 1], ""));
    let sink = tcp6_sink(&t, 7100);
    let len = 2 << 20;
    let (got, seen) = tcp6_send(&t, 7100, len);
    sink.join().expect("sink");
    assert_eq!(got, len, "bytes lost over IPv6");
    assert!(
        in64(seen, UPLINK_X_PREFIX6) || in64(seen, UPLINK_Y_PREFIX6),
        "source {seen} is on neither uplink's prefix"
    );
    assert_eq!(t.ula_sources(), 0, "a ULA source reached an ISP");
}

/// Probes take uplink x down: new IPv6 connections avoid it, and a UDP
/// flow pinned there moves to y with its next datagram (`on_down`'s
/// default for UDP), counted as evacuated.
#[test]
fn an_uplink_down_by_probe_takes_no_new_ipv6_flows_and_its_udp_flows_move() {
    let t = Topology::standard();
    t.add_ipv6();
    let health = "[uplink.health]\ntargets = [\"198.19.0.10\"]\ninterval_ms = 200\n\
                  timeout_ms = 150\ndown_after = 2\nup_after = 1\n";
    let config = config6(&t, [1, 1], "").replacen(
        "\n[[uplink]]\nname = \"y\"",
        &format!("{health}\n[[uplink]]\nname = \"y\""),
        1,
    );
    let gw = Gateway::start(&t.gw, &config);
    let _srv = udp6_peer_server(&t, 7000);
    let before = seen_sources(&t, &ports(16), 7000);
    let on_x: Vec<u16> = before
        .iter()
        .filter(|(_, a)| in64(**a, UPLINK_X_PREFIX6))
        .map(|(p, _)| *p)
        .collect();
    assert!(!on_x.is_empty(), "no flow on x: {before:?}");
    link_down(&t.ispx, IF_CORE);
    eventually(
        Duration::from_secs(8),
        "x down and its flows set to move",
        || gw.log().contains("uplink x: down for"),
    );
    let after = seen_sources(&t, &on_x, 7000);
    for (p, a) in &after {
        assert!(in64(*a, UPLINK_Y_PREFIX6), "port {p} stayed on x: {a}");
    }
    assert!(gw.reason("evacuated") >= on_x.len() as u64);
    let fresh = seen_sources(&t, &(43000..43016).collect::<Vec<_>>(), 7000);
    assert!(
        fresh.values().all(|a| in64(*a, UPLINK_Y_PREFIX6)),
        "a new connection went to the down uplink: {fresh:?}"
    );
}

/// A TCP echo server on `[INET_SERVICE6]:port` for one connection.
fn tcp6_echo(t: &Topology, port: u16) -> std::thread::JoinHandle<()> {
    use std::io::{Read as _, Write as _};
    let listener = t
        .inet
        .run(|| std::net::TcpListener::bind(SocketAddr::new(v6(INET_SERVICE6).into(), port)))
        .expect("bind the IPv6 echo server");
    std::thread::spawn(move || {
        if let Ok((mut s, _)) = listener.accept() {
            let mut buf = [0u8; 1024];
            while let Ok(n @ 1..) = s.read(&mut buf) {
                if s.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    })
}

/// An IPv6 TCP connection and the UDP flows keep their uplinks across a
/// restart (the maps are adopted); a reload that changes x's prefix
/// purges x's IPv6 flows once it is published, and they come back on the
/// new prefix, while y's keep theirs; the same change made while the
/// daemon was stopped does the same at start.
#[test]
fn ipv6_flows_survive_a_restart_and_a_changed_prefix_moves_only_its_uplinks() {
    use std::io::{Read as _, Write as _};
    let t = Topology::standard();
    t.add_ipv6();
    let new_x = "2001:db8:11:200::/64";
    ip6(&t.ispx, &format!("route add {new_x} via {UPLINK_X_ADDR6}"));
    let config = config6(&t, [1, 1], "");
    let gw = Gateway::start_with_pin(&t.gw, &config, unique_pin_dir("r6"), &["--keep-on-exit"]);
    let _udp = udp6_peer_server(&t, 7000);
    let _echo = tcp6_echo(&t, 7200);
    let mut conn = t
        .client
        .run(|| {
            std::net::TcpStream::connect_timeout(
                &SocketAddr::new(v6(INET_SERVICE6).into(), 7200),
                IO_TIMEOUT,
            )
        })
        .expect("TCP over IPv6");
    conn.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    let mut echo = |round: &str| {
        conn.write_all(round.as_bytes()).expect("write");
        let mut buf = vec![0u8; round.len()];
        conn.read_exact(&mut buf)
            .unwrap_or_else(|e| panic!("{round}: the IPv6 connection broke: {e}"));
    };
    echo("before");
    let ports = ports(16);
    let first = seen_sources(&t, &ports, 7000);
    let pin = gw.stop();
    echo("stopped");
    let gw = Gateway::start_with_pin(&t.gw, &config, pin, &["--keep-on-exit"]);
    echo("restarted");
    assert_eq!(
        seen_sources(&t, &ports, 7000),
        first,
        "a flow moved on restart"
    );

    let on_x = first
        .values()
        .filter(|a| in64(**a, UPLINK_X_PREFIX6))
        .count() as u64;
    let made_on_x = || {
        gw.status()["uplinks"][0]["new_flows"]
            .as_u64()
            .expect("count")
    };
    let made_before = made_on_x();
    let changed = config.replace(UPLINK_X_PREFIX6, new_x);
    write_config(gw.config_path(), &changed).expect("new prefix");
    gw.signal(libc::SIGHUP);
    eventually(Duration::from_secs(5), "x's new prefix published", || {
        gw.status()["uplinks"][0]["prefix6"] == new_x
    });
    // `status` may answer between the publication and the purge that
    // follows it: a flow it has not removed yet would keep its entry.
    eventually(Duration::from_secs(5), "x's IPv6 flows purged", || {
        gw.log().contains("changed; purged its")
    });
    let after = seen_sources(&t, &ports, 7000);
    for (p, before) in &first {
        let now = after[p];
        if in64(*before, UPLINK_Y_PREFIX6) {
            assert_eq!(now, *before, "port {p}: y's flow moved");
        } else {
            assert!(in64(now, new_x), "port {p}: x's flow is at {now}");
        }
    }
    assert_eq!(
        made_on_x() - made_before,
        on_x,
        "x's flows were not purged and made anew"
    );
    // The same change back, made while the daemon is stopped.
    let pin = gw.stop();
    let gw = Gateway::start_with_pin(&t.gw, &config, pin, &[]);
    let restarted = seen_sources(&t, &ports, 7000);
    assert_eq!(restarted, first, "the old prefix's mappings are not back");
    assert!(gw.log().contains("changed; purged its"), "{}", gw.log());
    assert_eq!(t.ula_sources(), 0, "a ULA source reached an ISP");
}

/// An upgrade from layout 11, the previous release, whose `UPLINKS6`
/// held one entry per uplink: the map is made afresh and written at
/// start, and the IPv6 flows kept in `CONN6` go on with their mappings.
#[test]
fn an_upgrade_from_layout_11_keeps_live_ipv6_flows() {
    let t = Topology::standard();
    t.add_ipv6();
    let config = config6(&t, [1, 1], "");
    let gw = Gateway::start_with_pin(&t.gw, &config, unique_pin_dir("u6"), &["--keep-on-exit"]);
    let _udp = udp6_peer_server(&t, 7000);
    let ports = ports(8);
    let first = seen_sources(&t, &ports, 7000);
    let flows = gw.status()["flows6"].clone();
    let cfg_path = gw.config_path().to_owned();
    let pin = gw.stop();
    write_config(&cfg_path, &config).expect("write the config again");
    let dir = pin.path().to_str().expect("utf-8").to_owned();
    // Layout 11: one 40-byte entry per uplink, no MAPPED6.
    pin_old_map(&t.gw, &dir, "UPLINKS6", "array", 40);
    std::fs::remove_file(format!("{dir}/MAPPED6")).expect("unpin a new map");
    pin_old_settings(&t.gw, &dir, 11, 32);
    let gw = Gateway::start_with_pin(&t.gw, &config, pin, &[]);
    assert!(
        gw.log().contains("adopting maps of layout version 11"),
        "{}",
        gw.log()
    );
    assert_eq!(gw.status()["flows6"], flows, "IPv6 flows were lost");
    assert_eq!(seen_sources(&t, &ports, 7000), first, "a flow moved");
    assert_eq!(gw.status()["flows6"], flows, "the flows were made anew");
    assert_eq!(t.ula_sources(), 0, "a ULA source reached an ISP");
    let _ = std::fs::remove_file(&cfg_path);
}

/// traceroute's second hop: a datagram sent with hop limit 2 leaves the
/// gateway mapped, expires at the ISP's router, whose Time Exceeded to
/// the mapped address comes back to the client (IPV6_RECVERR reports it
/// as EHOSTUNREACH); with hop limit 1 the gateway itself answers.
#[test]
fn ipv6_traceroute_sees_the_gateway_and_the_isp_router_beyond_it() {
    use std::os::fd::AsRawFd;
    let t = Topology::standard();
    t.add_ipv6();
    let gw = Gateway::start(&t.gw, &config6(&t, [1, 1], ""));
    let probe = |hops: i32| -> Option<i32> {
        let sock = t
            .client
            .run(|| UdpSocket::bind(SocketAddr::new(v6(CLIENT6_ADDR).into(), 0)))
            .expect("bind");
        sock.connect(SocketAddr::new(v6(INET_SERVICE6).into(), 33434))
            .expect("connect");
        sock.set_read_timeout(Some(Duration::from_secs(1)))
            .expect("timeout");
        let on: i32 = 1;
        for (opt, v) in [(libc::IPV6_UNICAST_HOPS, hops), (libc::IPV6_RECVERR, on)] {
            // SAFETY: a valid socket and an int option.
            let r = unsafe {
                libc::setsockopt(
                    sock.as_raw_fd(),
                    libc::IPPROTO_IPV6,
                    opt,
                    (&v as *const i32).cast(),
                    size_of::<i32>() as libc::socklen_t,
                )
            };
            assert_eq!(r, 0, "setsockopt {opt}");
        }
        for _ in 0..3 {
            sock.send(b"trace").expect("send");
            let mut buf = [0u8; 16];
            if let Err(e) = sock.recv(&mut buf)
                && let Some(code) = e.raw_os_error().filter(|c| *c != libc::EAGAIN)
            {
                return Some(code);
            }
        }
        None
    };
    assert_eq!(probe(1), Some(libc::EHOSTUNREACH), "the gateway's hop");
    assert_eq!(probe(2), Some(libc::EHOSTUNREACH), "the ISP router's hop");
    assert_eq!(probe(64), Some(libc::ECONNREFUSED), "the destination");
    assert_eq!(gw.reason("unsolicited"), 0);
    assert_eq!(t.ula_sources(), 0, "a ULA source reached an ISP");
}

/// Rules that name no address apply to IPv6: a port rule sends UDP to
/// port 7000 over y alone, an `unreachable` rule refuses TCP to port 7300
/// at once with ICMPv6 administratively prohibited, and a rule with an
/// IPv4 source prefix leaves IPv6 to `balanced`.
#[test]
fn ipv6_flows_follow_the_rules_that_name_no_address() {
    let t = Topology::standard();
    t.add_ipv6();
    let rules = "[[policy]]\nname = \"ony\"\ntiers = [[\"y\"]]\n\n\
                 [[policy]]\nname = \"onx\"\ntiers = [[\"x\"]]\n\n\
                 [[rule]]\nsrc = [\"198.18.1.0/24\"]\npolicy = \"onx\"\n\n\
                 [[rule]]\nproto = \"udp\"\ndport = [7000]\npolicy = \"ony\"\n\n\
                 [[rule]]\nproto = \"tcp\"\ndport = [7300]\npolicy = \"unreachable\"\n";
    let gw = Gateway::start(&t.gw, &config6(&t, [1, 1], rules));
    let _srv = udp6_peer_server(&t, 7000);
    let _other = udp6_peer_server(&t, 7001);
    let on_y = seen_sources(&t, &ports(12), 7000);
    assert!(
        on_y.values().all(|a| in64(*a, UPLINK_Y_PREFIX6)),
        "the port rule's policy holds y only: {on_y:?}"
    );
    let balanced = seen_sources(&t, &ports(24), 7001);
    assert!(
        balanced.values().any(|a| in64(*a, UPLINK_X_PREFIX6))
            && balanced.values().any(|a| in64(*a, UPLINK_Y_PREFIX6)),
        "the IPv4 source rule must not catch IPv6: {balanced:?}"
    );
    // `explain` names the uplink each of those flows took, and the rules.
    let explain = |sport: Option<u16>, proto: &str, dport: u16| {
        let (sport, dport) = (sport.map(|p| p.to_string()), dport.to_string());
        let mut args = vec!["explain", "--src", CLIENT6_ADDR, "--dst", INET_SERVICE6];
        args.extend(["--proto", proto, "--dport", &dport, "--json"]);
        if let Some(p) = &sport {
            args.extend(["--sport", p]);
        }
        let out = gw.cli(&args);
        assert!(out.status.success(), "explain failed: {out:?}");
        serde_json::from_slice::<serde_json::Value>(&out.stdout).expect("JSON")
    };
    for (port, seen) in &balanced {
        let e = explain(Some(*port), "udp", 7001);
        let want = if in64(*seen, UPLINK_X_PREFIX6) {
            "x"
        } else {
            "y"
        };
        assert_eq!(e["uplink"], want, "port {port} left by {seen}: {e}");
        assert_eq!(e["rule"], serde_json::Value::Null, "{e}");
    }
    let e = explain(Some(41000), "udp", 7000);
    assert_eq!(
        (&e["rule"]["number"], &e["policy"]),
        (&2.into(), &"ony".into()),
        "{e}"
    );
    assert_eq!(e["uplink"], "y", "{e}");
    assert_eq!(explain(None, "tcp", 7300)["action"], "unreachable");
    let started = std::time::Instant::now();
    let err = t
        .client
        .run(|| {
            std::net::TcpStream::connect_timeout(
                &SocketAddr::new(v6(INET_SERVICE6).into(), 7300),
                Duration::from_secs(5),
            )
        })
        .expect_err("a refused flow cannot connect");
    assert_eq!(err.raw_os_error(), Some(libc::EACCES), "{err}");
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(gw.reason("policy_refused") > 0);
    let conns = gw.conns();
    assert!(
        conns
            .iter()
            .any(|c| c["dport"] == 7000 && c["policy"] == "ony"),
        "{conns:?}"
    );
    assert_eq!(t.ula_sources(), 0, "a ULA source reached an ISP");
}

/// `allow_inbound6` opens a port to the LAN through every uplink's
/// prefix: a datagram from outside to either mapped address reaches the
/// client's server, whose answer leaves by the uplink it came in by, from
/// the address it was sent to. Other ports stay closed.
#[test]
fn an_allowed_inbound_ipv6_port_is_reachable_through_each_uplink_and_answers_from_it() {
    let t = Topology::standard();
    t.add_ipv6();
    let config =
        config6(&t, [1, 1], "").replacen("lan = [", "allow_inbound6 = [\"udp/42002\"]\nlan = [", 1);
    let gw = Gateway::start(&t.gw, &config);
    let _srv = udp6_peer_server(&t, 7000);
    let seen = seen_sources(&t, &ports(24), 7000);
    let on = |prefix: &str| {
        *seen
            .values()
            .find(|a| in64(**a, prefix))
            .unwrap_or_else(|| panic!("no flow on {prefix}: {seen:?}"))
    };
    let (mapped_x, mapped_y) = (on(UPLINK_X_PREFIX6), on(UPLINK_Y_PREFIX6));
    let server = t
        .client
        .run(|| UdpSocket::bind(SocketAddr::new(v6(CLIENT6_ADDR).into(), 42002)))
        .expect("bind the LAN server");
    server
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        while let Ok((n, from)) = server.recv_from(&mut buf) {
            let _ = server.send_to(&buf[..n], from);
        }
    });
    let outside = || {
        let s = t
            .inet
            .run(|| UdpSocket::bind(SocketAddr::new(v6(INET_SERVICE6).into(), 0)))
            .expect("bind outside");
        s.set_read_timeout(Some(Duration::from_secs(1)))
            .expect("timeout");
        s
    };
    // One remote socket per address: the same remote port to both would
    // be one tuple inside, and the second uplink's copy is refused.
    for mapped in [mapped_x, mapped_y] {
        let remote = outside();
        let to = SocketAddr::new(mapped.into(), 42002);
        let mut answered = None;
        for _ in 0..3 {
            remote.send_to(b"hello", to).expect("send");
            let mut buf = [0u8; 64];
            if let Ok((_, from)) = remote.recv_from(&mut buf) {
                answered = Some(from);
                break;
            }
        }
        assert_eq!(answered, Some(to), "no answer from {to}, or from elsewhere");
    }
    assert_eq!(gw.reason("inbound_allowed"), 2);
    let before = gw.reason("unsolicited");
    outside()
        .send_to(b"closed?", SocketAddr::new(mapped_x.into(), 42003))
        .expect("send");
    eventually(Duration::from_secs(2), "another port stays closed", || {
        gw.reason("unsolicited") > before
    });
    assert_eq!(t.ula_sources(), 0, "a ULA source reached an ISP");
}

/// An uplink without `gateway6` uses the router its ISP announces by
/// router advertisement: the daemon keeps RAs accepted with forwarding on
/// (`accept_ra = 2`), and puts the learned router in the uplink's table.
#[test]
fn an_uplink_without_gateway6_takes_the_router_its_isp_advertises() {
    let t = Topology::standard();
    t.add_ipv6();
    let config =
        config6(&t, [1, 0], "").replacen(&format!("gateway6 = \"{UPLINK_X_GW6}\"\n"), "", 1);
    assert!(!config.contains(UPLINK_X_GW6), "{config}");
    let _gw = Gateway::start(&t.gw, &config);
    eventually(Duration::from_secs(3), "accept_ra = 2 on wanx", || {
        t.gw.sysctl_get(&format!("net.ipv6.conf.{IF_WANX}.accept_ra")) == "2"
    });
    let link_local = t
        .ispx
        .exec_stdout(&[
            "ip", "-6", "-o", "addr", "show", "dev", IF_CUST, "scope", "link",
        ])
        .split_whitespace()
        .nth(3)
        .and_then(|a| a.split('/').next())
        .map(str::to_owned)
        .expect("ispx has a link-local address");
    scapy(
        &t.ispx,
        &format!(
            "sendp(Ether(dst='33:33:00:00:00:01')/IPv6(src='{link_local}', dst='ff02::1', \
             hlim=255)/ICMPv6ND_RA(routerlifetime=1800), iface='{IF_CUST}', count=3, inter=0.1)"
        ),
        Duration::from_secs(20),
    );
    let _srv = udp6_peer_server(&t, 7000);
    let table = "100";
    eventually(
        Duration::from_secs(5),
        "the learned router in x's table",
        || {
            t.gw.exec_stdout(&["ip", "-6", "route", "show", "table", table])
                .contains(&format!("default via {link_local}"))
        },
    );
    let seen = seen_sources(&t, &ports(4), 7000);
    assert!(
        seen.values().all(|a| in64(*a, UPLINK_X_PREFIX6)),
        "{seen:?}"
    );
}

/// `allow_inbound6` naming a LAN host lets a ping from outside reach it
/// through its mapped address, and the echo reply back out; without the
/// entry the same ping is dropped.
#[test]
fn an_allowed_host_answers_a_ping_from_outside_through_its_mapped_address() {
    let t = Topology::standard();
    t.add_ipv6();
    let config = config6(&t, [1, 0], "");
    let gw = Gateway::start(&t.gw, &config);
    let _srv = udp6_peer_server(&t, 7000);
    let mapped = seen_sources(&t, &[42100], 7000)[&42100];
    let ping = |id: u16| {
        scapy(
            &t.inet,
            &format!(
                "r = sr1(IPv6(src='{INET_SERVICE6}', dst='{mapped}')/ICMPv6EchoRequest(id={id}, \
                 seq=1), timeout=2, retry=2)\n\
                 print('reply from', r[IPv6].src if r else None)"
            ),
            Duration::from_secs(20),
        )
    };
    assert!(ping(7).contains("reply from None"), "a ping got in unasked");
    assert!(gw.reason("unsolicited") > 0);
    write_config(
        gw.config_path(),
        config.replacen(
            "lan = [",
            &format!("allow_inbound6 = [\"{CLIENT6_ADDR}/128\"]\nlan = ["),
            1,
        ),
    )
    .expect("config");
    gw.signal(libc::SIGHUP);
    eventually(Duration::from_secs(5), "the reload", || {
        gw.log().contains("config reloaded")
    });
    let answer = ping(8);
    assert!(answer.contains(&format!("reply from {mapped}")), "{answer}");
    assert_eq!(t.ula_sources(), 0, "a ULA source reached an ISP");
}

/// Once a flow's first packets have resolved its next hops, its packets
/// take the redirect both ways (mapped, hop limit decremented) rather
/// than the kernel's forwarding path: the uplink's slow-path count stays
/// put while its packet counts grow.
#[test]
fn established_ipv6_flows_are_redirected_both_ways_past_the_kernels_forwarding() {
    let t = Topology::standard();
    t.add_ipv6();
    let gw = Gateway::start(&t.gw, &config6(&t, [1, 0], ""));
    let _srv = udp6_peer_server(&t, 7000);
    let first = seen_sources(&t, &[42200], 7000);
    let x = |key: &str| gw.status()["uplinks"][0][key].as_u64().expect("counter");
    let (slow, tx, rx) = (x("slow_path"), x("tx_packets"), x("rx_packets"));
    let sock = t
        .client
        .run(|| UdpSocket::bind(SocketAddr::new(v6(CLIENT6_ADDR).into(), 42200)))
        .expect("bind");
    sock.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    let to = SocketAddr::new(v6(INET_SERVICE6).into(), 7000);
    for _ in 0..20 {
        sock.send_to(b"again", to).expect("send");
        let mut buf = [0u8; 64];
        let (n, _) = sock.recv_from(&mut buf).expect("an answer");
        assert_eq!(
            v6(std::str::from_utf8(&buf[..n]).expect("text")),
            first[&42200]
        );
    }
    assert_eq!(x("tx_packets") - tx, 20);
    assert_eq!(x("rx_packets") - rx, 20);
    assert_eq!(
        x("slow_path"),
        slow,
        "established packets took the kernel's path"
    );
}

/// A dual-stack client talks both families at once through the same
/// gateway: each server sees the family it was asked in, IPv4 from an
/// uplink's address, IPv6 from an uplink's prefix, and `conns` lists
/// both.
#[test]
fn a_dual_stack_client_reaches_both_families_at_once_each_translated_its_way() {
    let t = Topology::standard();
    t.add_ipv6();
    let gw = Gateway::start(&t.gw, &config6(&t, [1, 1], ""));
    let v4 = udp_peer_server(&t.inet, INET_SERVICE, 0);
    let _v6 = udp6_peer_server(&t, 7000);
    let uplink_addrs = [UPLINK_X_ADDR, UPLINK_Y_ADDR];
    let (seen4, seen6) = std::thread::scope(|s| {
        let four = s.spawn(|| {
            (0..8)
                .map(|_| *udp_seen_as(&t.client, None, v4.addr()).expect("IPv4").ip())
                .collect::<Vec<_>>()
        });
        let six = s.spawn(|| seen_sources(&t, &ports(8), 7000));
        (four.join().expect("IPv4"), six.join().expect("IPv6"))
    });
    assert!(
        seen4.iter().all(|a| uplink_addrs.contains(a)),
        "an IPv4 flow left untranslated: {seen4:?}"
    );
    assert!(
        seen6
            .values()
            .all(|a| in64(*a, UPLINK_X_PREFIX6) || in64(*a, UPLINK_Y_PREFIX6)),
        "{seen6:?}"
    );
    let conns = gw.conns();
    let v6_flows = conns.iter().filter(|c| c["src"] == CLIENT6_ADDR).count();
    let v4_flows = conns
        .iter()
        .filter(|c| c["src"] == CLIENT_ADDR.to_string())
        .count();
    assert_eq!(v6_flows, 8, "{conns:?}");
    assert!(v4_flows >= 1, "{conns:?}");
    assert_eq!(t.foreign_sources() + t.ula_sources(), 0);
}

/// The daemon installs each IPv6 uplink's rules (from its prefix, its
/// mark, unreachable behind them) and table route, tagged `proto 77`,
/// keeps the route out while the link is down, and removes everything on
/// exit.
#[test]
fn ipv6_rules_and_routes_follow_the_links_and_go_with_the_daemon() {
    let t = Topology::standard();
    t.add_ipv6();
    // As a statically configured router keeps them (the kernel flushes
    // IPv6 addresses on link down otherwise).
    t.gw.sysctl(&format!("net.ipv6.conf.{IF_WANX}.keep_addr_on_down"), "1");
    let gw = Gateway::start(&t.gw, &config6(&t, [1, 1], ""));
    let ours = |what: &[&str]| {
        let mut cmd = vec!["ip", "-6"];
        cmd.extend(what);
        t.gw.exec_stdout(&cmd)
            .lines()
            .filter(|l| l.contains("proto 77"))
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    let rules = ours(&["rule"]);
    assert_eq!(rules.len(), 6, "{rules:#?}");
    for needle in [
        format!("from {UPLINK_X_PREFIX6} lookup 100"),
        "lookup 101".into(),
        "unreachable".into(),
    ] {
        assert!(
            rules.iter().any(|r| r.contains(&needle)),
            "{needle}: {rules:#?}"
        );
    }
    let routes = || ours(&["route", "show", "table", "all"]);
    assert_eq!(routes().len(), 2, "{:#?}", routes());
    link_down(&t.gw, IF_WANX);
    eventually(
        Duration::from_secs(3),
        "x's route gone with its link",
        || routes().len() == 1,
    );
    link_up(&t.gw, IF_WANX);
    eventually(Duration::from_secs(3), "x's route back", || {
        routes().len() == 2
    });
    drop(gw);
    assert_eq!(ours(&["rule"]), Vec::<String>::new());
    assert_eq!(routes(), Vec::<String>::new());
}

/// An ISP that keeps the uplink's prefix on-link asks for each mapped
/// address by neighbour solicitation: without `ndp_proxy` nobody answers
/// and the replies never come; with it (a reload) the gateway answers for
/// its LAN hosts' mapped addresses and the flow works. The entries stay
/// with `--keep-on-exit` and go with `cleanup`.
#[test]
fn ndp_proxy_answers_for_mapped_addresses_on_a_prefix_the_isp_keeps_on_link() {
    let t = Topology::standard();
    t.add_ipv6();
    ip6(
        &t.ispx,
        &format!("route replace {UPLINK_X_PREFIX6} dev {IF_CUST}"),
    );
    let config = config6(&t, [1, 0], "");
    let gw = Gateway::start_with_pin(&t.gw, &config, unique_pin_dir("np"), &["--keep-on-exit"]);
    let _srv = udp6_peer_server(&t, 7000);
    let sock = t
        .client
        .run(|| UdpSocket::bind(SocketAddr::new(v6(CLIENT6_ADDR).into(), 42300)))
        .expect("bind");
    sock.set_read_timeout(Some(Duration::from_millis(1500)))
        .expect("timeout");
    let to = SocketAddr::new(v6(INET_SERVICE6).into(), 7000);
    sock.send_to(b"on-link?", to).expect("send");
    let mut buf = [0u8; 64];
    assert!(
        sock.recv_from(&mut buf).is_err(),
        "an answer came back without the NDP proxy"
    );
    write_config(
        gw.config_path(),
        config.replacen("name = \"x\"\n", "name = \"x\"\nndp_proxy = true\n", 1),
    )
    .expect("config");
    gw.signal(libc::SIGHUP);
    let proxies = || {
        t.gw.exec_stdout(&["ip", "-6", "neigh", "show", "proxy"])
            .lines()
            .filter(|l| l.contains(IF_WANX))
            .count()
    };
    eventually(
        Duration::from_secs(5),
        "a proxy entry for the client",
        || proxies() == 1,
    );
    let seen = seen_sources(&t, &[42301], 7000)[&42301];
    assert!(in64(seen, UPLINK_X_PREFIX6), "{seen}");
    assert_eq!(
        t.gw.sysctl_get(&format!("net.ipv6.conf.{IF_WANX}.proxy_ndp")),
        "1"
    );
    // Kept with the datapath on exit, removed by `cleanup`.
    let pin = gw.stop();
    assert_eq!(proxies(), 1, "--keep-on-exit must keep answering");
    let bin = multihome_bin();
    let dir = pin.path().to_str().expect("utf-8").to_owned();
    let out =
        t.gw.try_exec(&[bin.to_str().expect("utf-8"), "cleanup", "--pin-dir", &dir]);
    assert!(out.status.success(), "cleanup failed: {out:?}");
    assert_eq!(proxies(), 0, "cleanup left NDP proxy entries");
    assert!(
        !t.gw.exec_stdout(&["ip", "-6", "rule"]).contains("proto 77"),
        "cleanup left IPv6 rules"
    );
}

/// An uplink without `prefix6` learns it from the prefix its ISP
/// delegates (Kea as the ISP's DHCPv6 server, dhcpcd on the gateway,
/// which installs an unreachable route for it), and the LAN's internal
/// prefix is its interface's ULA (no `lan_prefixes6`): the LAN is mapped
/// onto the delegation's first /64 once it appears; when the ISP delegates
/// another (a rebind after its pool changed) the old prefix's flows go
/// and new ones take the new prefix; when dhcpcd stops and withdraws it,
/// the uplink takes no IPv6 flows. The ISP routes its pool to the
/// gateway (Kea installs no routes).
#[test]
fn a_delegated_prefix_is_learned_followed_when_it_changes_and_dropped_when_withdrawn() {
    let t = Topology::standard();
    t.add_ipv6();
    let (first, second) = ("2001:db8:11:f000::/52", "2001:db8:11:e000::/52");
    ip6(
        &t.ispx,
        &format!("route add 2001:db8:11:e000::/51 via {UPLINK_X_ADDR6}"),
    );
    let link = "2001:db8:11::/64";
    let kea = Kea6::start(&t.ispx, IF_CUST, link, first, 56);
    let config =
        config6(&t, [1, 1], "").replacen(&format!("prefix6 = \"{UPLINK_X_PREFIX6}\"\n"), "", 1);
    assert!(!config.contains(UPLINK_X_PREFIX6), "{config}");
    let gw = Gateway::start(&t.gw, &config);
    let _srv = udp6_peer_server(&t, 7000);
    let x_prefix = || {
        gw.status()["uplinks"][0]["prefix6"]
            .as_str()
            .map(str::to_owned)
    };
    assert_eq!(x_prefix(), None, "x has a prefix before any delegation");
    let before = seen_sources(&t, &ports(8), 7000);
    assert!(
        before.values().all(|a| in64(*a, UPLINK_Y_PREFIX6)),
        "IPv6 left by x with no prefix: {before:?}"
    );

    let mut dhcpcd = Dhcpcd::start(&t.gw, IF_WANX);
    let learned = |p: &str| {
        let want = p.replace("::/52", "::/64");
        eventually(Duration::from_secs(20), &format!("x learns {want}"), || {
            x_prefix().as_deref() == Some(want.as_str())
        });
        let st = gw.status();
        assert_eq!(
            st["uplinks"][0]["delegated6"].as_str(),
            Some(p.replace("::/52", "::/56").as_str()),
            "{st}"
        );
        want
    };
    let spread = |prefix: &str, ports: &[u16]| {
        let seen = seen_sources(&t, ports, 7000);
        assert!(
            seen.values()
                .all(|a| in64(*a, prefix) || in64(*a, UPLINK_Y_PREFIX6)),
            "a source in neither {prefix} nor y's: {seen:?}"
        );
        assert!(
            seen.values().any(|a| in64(*a, prefix)),
            "no flow took x's learned {prefix}: {seen:?}"
        );
        seen
    };
    let x1 = learned(first);
    eventually(Duration::from_secs(5), "x's from rule", || {
        t.gw.exec_stdout(&["ip", "-6", "rule"])
            .contains(&format!("from {x1}"))
    });
    let ports1: Vec<u16> = (42400..42416).collect();
    let seen1 = spread(&x1, &ports1);

    // The ISP's pool changes; a rebind gets a prefix from the new one.
    drop(kea);
    let _kea = Kea6::start(&t.ispx, IF_CUST, link, second, 56);
    dhcpcd.rebind(&t.gw);
    let x2 = learned(second);
    let again = seen_sources(&t, &ports1, 7000);
    for (p, was) in &seen1 {
        let now = again[p];
        assert!(!in64(now, &x1), "port {p} kept the old prefix: {now}");
        if in64(*was, UPLINK_Y_PREFIX6) {
            assert_eq!(now, *was, "port {p}: y's flow moved");
        }
    }
    spread(&x2, &(42420..42436).collect::<Vec<_>>());

    // Withdrawn: x takes no IPv6 flows.
    dhcpcd.stop();
    eventually(Duration::from_secs(10), "x's prefix dropped", || {
        x_prefix().is_none()
    });
    let after = seen_sources(&t, &(42440..42448).collect::<Vec<_>>(), 7000);
    assert!(
        after.values().all(|a| in64(*a, UPLINK_Y_PREFIX6)),
        "IPv6 left by x after the withdrawal: {after:?}"
    );
    assert!(gw.log().contains("learned prefix6"), "{}", gw.log());
    assert_eq!(t.ula_sources(), 0, "a ULA source reached an ISP");
}

/// Native XDP carries established IPv6 (NPTv6) both ways: after each
/// flow's first packets, UDP datagrams and their replies and a TCP
/// stream's data and ACKs take the XDP path (`status` counts them), with
/// every answer right and no ULA at the ISPs (offloads off: a wrong
/// checksum would be dropped).
#[test]
fn native_xdp_carries_established_ipv6_both_ways_under_nptv6() {
    let t = Topology::standard();
    t.add_ipv6();
    t.enable_gro();
    let config = format!("xdp = \"native\"\n{}", config6(&t, [1, 1], ""));
    let gw = Gateway::start(&t.gw, &config);
    let _srv = udp6_peer_server(&t, 7000);
    let sock = t
        .client
        .run(|| UdpSocket::bind(SocketAddr::new(v6(CLIENT6_ADDR).into(), 41700)))
        .expect("bind on the client");
    sock.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    let to = SocketAddr::new(v6(INET_SERVICE6).into(), 7000);
    let mut seen = BTreeSet::new();
    let mut exchange = |count: usize| {
        for i in 0..count {
            sock.send_to(b"who am I?", to).expect("send");
            let mut buf = [0u8; 128];
            let (n, _) = sock
                .recv_from(&mut buf)
                .unwrap_or_else(|e| panic!("datagram {i}: no answer: {e}"));
            seen.insert(v6(std::str::from_utf8(&buf[..n]).expect("text")));
        }
    };
    exchange(50);
    let sink = tcp6_sink(&t, 7100);
    let len = 1 << 20;
    let (got, _) = tcp6_send(&t, 7100, len);
    sink.join().expect("sink");
    assert_eq!(got, len, "bytes lost through the IPv6 XDP path");
    // Replies take XDP once the daemon has cached the LAN host's next
    // hop (it follows the neighbour table), which under load may come
    // after the first exchange: more datagrams until then.
    let xdp = || {
        let st = gw.status();
        let sum = |field: &str| -> u64 {
            (0..2)
                .map(|i| st["uplinks"][i][field].as_u64().expect(field))
                .sum()
        };
        (sum("xdp_tx_packets"), sum("xdp_rx_packets"), st)
    };
    eventually(Duration::from_secs(10), "replies on the XDP path", || {
        exchange(10);
        let (tx, rx, _) = xdp();
        tx >= 49 && rx >= 49
    });
    let (tx, rx, st) = xdp();
    assert!(tx >= 49 && rx >= 49, "XDP out {tx}, in {rx}: {st:#}");
    assert_eq!(seen.len(), 1, "one flow, one mapped source: {seen:?}");
    assert_eq!(t.ula_sources(), 0, "a ULA source reached an ISP");
}

/// NAT66 (`mode6 = "nat66"`) on y, whose ISP gives it one address: two
/// LAN hosts' datagrams from the same port reach the server from y's
/// address with two ports; a TCP stream crosses a smaller MTU beyond the
/// ISP's router, whose Packet Too Big to y's address and port is mapped
/// back to the client (offloads off: a wrong checksum would drop it); a
/// ping works; a LAN host's Port Unreachable reaches the remote;
/// `conns` shows the address and port; no ULA leaves.
#[test]
fn nat66_translates_lan_hosts_onto_the_uplinks_one_address_with_ports_of_its_own() {
    let t = Topology::standard();
    t.add_ipv6();
    let second = "fd00:1::3";
    another_lan_address(&t, second);
    let config = config6(&t, [0, 1], "").replacen(
        &format!("prefix6 = \"{UPLINK_Y_PREFIX6}\"\n"),
        "mode6 = \"nat66\"\n",
        1,
    );
    assert!(
        config.contains("nat66") && !config.contains(UPLINK_Y_PREFIX6),
        "{config}"
    );
    let gw = Gateway::start(&t.gw, &config);
    let y_addr = v6(UPLINK_Y_ADDR6);
    eventually(Duration::from_secs(5), "y's NAT66 address", || {
        gw.status()["uplinks"][1]["prefix6"] == format!("{y_addr}/128")
    });
    // A server that answers with the address and port it saw.
    let sock = t
        .inet
        .run(|| UdpSocket::bind(SocketAddr::new(v6(INET_SERVICE6).into(), 7400)))
        .expect("bind");
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let _srv = std::thread::spawn(move || {
        let mut buf = [0u8; 256];
        while let Ok((_, from)) = sock.recv_from(&mut buf) {
            let _ = sock.send_to(from.to_string().as_bytes(), from);
        }
    });
    let seen_from = |src: &str| -> SocketAddr {
        let s = t
            .client
            .run(|| UdpSocket::bind(SocketAddr::new(v6(src).into(), 41500)))
            .expect("bind on the client");
        s.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
        let to = SocketAddr::new(v6(INET_SERVICE6).into(), 7400);
        let mut buf = [0u8; 256];
        for _ in 0..3 {
            s.send_to(b"who?", to).expect("send");
            if let Ok((n, _)) = s.recv_from(&mut buf) {
                return std::str::from_utf8(&buf[..n])
                    .expect("text")
                    .parse()
                    .expect("an address and port");
            }
        }
        panic!("no answer to {src} through NAT66");
    };
    let (a, b) = (seen_from(CLIENT6_ADDR), seen_from(second));
    assert_eq!((a.ip(), b.ip()), (y_addr.into(), y_addr.into()), "{a} {b}");
    assert_ne!(a.port(), b.port(), "two LAN hosts share a NAT66 port");
    let conns = gw.conns();
    assert!(
        conns.iter().any(|c| c["dport"] == 7400
            && c["nat_addr"] == UPLINK_Y_ADDR6
            && c["nat_port"] == a.port()),
        "{conns:?}"
    );
    // Bulk TCP through a 1400-byte link beyond the ISP's router (its
    // far end keeps 1500, so the server's MSS does not shrink the
    // segments: only the Packet Too Big can).
    set_mtu(&t.ispy, IF_CORE, 1400);
    let sink = tcp6_sink(&t, 7100);
    let len = 1 << 20;
    let (got, seen) = tcp6_send(&t, 7100, len);
    sink.join().expect("sink");
    assert_eq!((got, seen), (len, y_addr), "bytes lost through NAT66");
    let ping = scapy(
        &t.client,
        &format!(
            "r = sr1(IPv6(src='{CLIENT6_ADDR}', dst='{INET_SERVICE6}')/ICMPv6EchoRequest(id=4321, \
             seq=1), timeout=2, retry=2)\n\
             print('reply', r[ICMPv6EchoReply].id if r else None)"
        ),
        Duration::from_secs(20),
    );
    assert!(ping.contains("reply 4321"), "ping through NAT66: {ping}");
    // A datagram from the server to a port the LAN host closed: the
    // host's Port Unreachable is mapped onto y's address and port, and
    // the server's connected socket hears the refusal.
    let remote = t
        .inet
        .run(|| UdpSocket::bind(SocketAddr::new(v6(INET_SERVICE6).into(), 7401)))
        .expect("bind");
    remote
        .set_read_timeout(Some(Duration::from_secs(1)))
        .expect("timeout");
    let lan = t
        .client
        .run(|| UdpSocket::bind(SocketAddr::new(v6(CLIENT6_ADDR).into(), 41600)))
        .expect("bind on the client");
    lan.send_to(b"open", SocketAddr::new(v6(INET_SERVICE6).into(), 7401))
        .expect("send");
    let (_, mapped) = remote
        .recv_from(&mut [0u8; 64])
        .expect("the LAN host's datagram");
    remote.connect(mapped).expect("connect");
    drop(lan);
    let refused = (0..5).any(|_| {
        let _ = remote.send(b"anyone?");
        matches!(
            remote.recv(&mut [0u8; 64]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused
        )
    });
    assert!(refused, "no Port Unreachable came back through NAT66");
    assert_eq!(t.ula_sources(), 0, "a ULA source reached an ISP");
}

/// `max_flows_per_host` holds an IPv6 host too: of its datagrams from
/// eight ports, four flows are made and the rest refused (`host_quota`),
/// while another of its addresses is a host of its own; `status` lists it
/// with its refusals and the flows the reaper counts.
#[test]
fn an_ipv6_host_is_held_to_max_flows_per_host() {
    let t = Topology::standard();
    t.add_ipv6();
    let other = "fd00:1::4";
    another_lan_address(&t, other);
    // `[nat]` after the top-level keys and the uplinks.
    let config = format!(
        "{}\n[nat]\nmax_flows_per_host = 4\n",
        config6(&t, [1, 1], "")
    );
    let gw = Gateway::start(&t.gw, &config);
    let _srv = udp6_peer_server(&t, 7000);
    let to = SocketAddr::new(v6(INET_SERVICE6).into(), 7000);
    let answered = |src: &str, port: u16| {
        let s = t
            .client
            .run(|| UdpSocket::bind(SocketAddr::new(v6(src).into(), port)))
            .expect("bind");
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .expect("timeout");
        s.send_to(b"?", to).expect("send");
        s.recv_from(&mut [0u8; 64]).is_ok()
    };
    let got: Vec<bool> = (42600..42608).map(|p| answered(CLIENT6_ADDR, p)).collect();
    assert_eq!(
        got.iter().filter(|a| **a).count(),
        4,
        "answered per port: {got:?}"
    );
    assert!(answered(other, 42600), "another address is another host");
    assert!(gw.reason("host_quota") >= 4);
    eventually(Duration::from_secs(5), "the host in top_hosts", || {
        let st = gw.status();
        st["top_hosts"].as_array().is_some_and(|hs| {
            hs.iter().any(|h| {
                h["address"] == CLIENT6_ADDR && h["flows"] == 4 && h["refused"].as_u64() >= Some(4)
            })
        })
    });
}
