//! Hairpinning (RFC 4787 REQ-9): a LAN host reaches another LAN host at
//! its public mapping, sees the other's public mapping as the source, and
//! the answers come back the same way, as P2P applications expect after a
//! STUN exchange.
use std::net::{SocketAddrV4, UdpSocket};

use testbed::*;

fn bound(ns: &NetNs, addr: SocketAddrV4) -> UdpSocket {
    let s = ns.run(|| UdpSocket::bind(addr)).expect("bind");
    s.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    s
}

/// The public mapping `sock` has towards `srv` (a `udp_peer_server`), as a
/// STUN exchange tells it; the socket stays unconnected, as a P2P
/// application's must to hear from its peers.
fn public_mapping(sock: &UdpSocket, srv: SocketAddrV4) -> SocketAddrV4 {
    let mut buf = [0u8; 64];
    for _ in 0..3 {
        sock.send_to(b"?", srv).expect("send to the server");
        if let Ok((n, _)) = sock.recv_from(&mut buf) {
            let text = std::str::from_utf8(&buf[..n]).expect("text");
            return text.trim().parse().expect("ip:port");
        }
    }
    panic!("no answer from the server");
}

fn hairpin_between_two_lan_hosts(offloads: bool) {
    let t = Topology::two_clients();
    if offloads {
        t.enable_checksum_offloads();
    }
    let gw = Gateway::start(&t.gw, &config_for(&t, [1, 0], ""));
    let srv = udp_peer_server(&t.inet, INET_SERVICE, 0);
    let a = bound(&t.client, SocketAddrV4::new(CLIENT_ADDR, 6000));
    let b = bound(t.client2(), SocketAddrV4::new(CLIENT2_ADDR, 5000));
    // Each learns its public mapping, as from a STUN server.
    let a_public = public_mapping(&a, srv.addr());
    let b_public = public_mapping(&b, srv.addr());
    assert_eq!(*b_public.ip(), UPLINK_X_ADDR);

    let mut buf = [0u8; 64];
    for round in 0..3 {
        a.send_to(b"hello B", b_public).expect("A sends");
        let (n, from) = b
            .recv_from(&mut buf)
            .unwrap_or_else(|e| panic!("round {round}: B got nothing from A: {e}"));
        assert_eq!(&buf[..n], b"hello B");
        assert_eq!(
            from,
            std::net::SocketAddr::V4(a_public),
            "B must see A's public mapping"
        );
        b.send_to(b"hello A", from).expect("B answers");
        let (n, from) = a
            .recv_from(&mut buf)
            .unwrap_or_else(|e| panic!("round {round}: A got no answer: {e}"));
        assert_eq!(&buf[..n], b"hello A");
        assert_eq!(
            from,
            std::net::SocketAddr::V4(b_public),
            "A must see B's public mapping"
        );
    }
    assert!(gw.reason("hairpinned") >= 6, "{}", gw.status()["drops"]);
    assert_eq!(t.foreign_sources(), 0);
}

#[test]
fn two_lan_hosts_reach_each_other_through_their_public_mappings_offloads_off() {
    hairpin_between_two_lan_hosts(false);
}

#[test]
fn two_lan_hosts_reach_each_other_through_their_public_mappings_offloads_on() {
    hairpin_between_two_lan_hosts(true);
}
