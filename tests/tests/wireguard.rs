//! A WireGuard tunnel through the gateway (userspace wireguard-go: this
//! kernel has no WireGuard module) carries on from the other uplink when
//! its uplink's upstream dies: its UDP flow moves at its next packet, and
//! the peer follows the new address (WireGuard roaming).
use std::{
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    time::{Duration, Instant},
};

use testbed::*;

/// The name of this process's WireGuard interface `side`: unique, since
/// wireguard-go's control sockets live in one directory for every
/// namespace.
fn wg_name(side: char) -> String {
    format!("wg{}{side}", std::process::id() % 100_000)
}

/// A WireGuard interface `name` in `ns` with address `addr`/24, driven
/// by wireguard-go.
fn wg_up(ns: &NetNs, name: &str, addr: &str, key: &str) -> Proc {
    let proc = ns.spawn_env(&["wireguard-go", "-f", name], &[("LOG_LEVEL", "error")]);
    eventually(
        Duration::from_secs(5),
        "the WireGuard interface exists",
        || ns.try_exec(&["ip", "link", "show", name]).status.success(),
    );
    let key_file = std::env::temp_dir().join(format!("{}-wg.key", ns.name()));
    std::fs::write(&key_file, key).expect("write the key");
    ns.exec(&[
        "wg",
        "set",
        name,
        "private-key",
        key_file.to_str().expect("utf-8"),
        "listen-port",
        "51820",
    ]);
    let _ = std::fs::remove_file(&key_file);
    ns.exec(&["ip", "addr", "add", &format!("{addr}/24"), "dev", name]);
    ns.exec(&["ip", "link", "set", name, "up"]);
    proc
}

fn wg(ns: &NetNs, args: &[&str]) -> String {
    let out = ns.exec(args);
    String::from_utf8(out.stdout)
        .expect("utf-8")
        .trim()
        .to_string()
}

/// Whether a datagram through the tunnel from `sock` comes back from
/// the server on the tunnel's far end.
fn through(sock: &UdpSocket, server: SocketAddrV4) -> bool {
    udp_seen_from(sock, server).is_ok()
}

#[test]
fn a_wireguard_tunnel_resumes_from_the_other_uplink_when_its_upstream_dies() {
    let t = Topology::standard();
    // x takes every new flow while it is usable; probes every 200 ms.
    let health = "[uplink.health]\ntargets = [\"198.19.0.10\"]\ninterval_ms = 200\n\
                  timeout_ms = 150\ndown_after = 2\nup_after = 2\nconfirm_ms = 300\n";
    let config = config_for(&t, [1, 0], "").replacen(
        "\n\n[[uplink]]\nname = \"y\"",
        &format!("\n{health}\n[[uplink]]\nname = \"y\""),
        1,
    );
    let gw = Gateway::start(&t.gw, &config);
    let (client_key, server_key) = (
        wg(&t.client, &["wg", "genkey"]),
        wg(&t.inet, &["wg", "genkey"]),
    );
    let pubkey = |ns: &NetNs, key: &str| {
        let out = ns.exec(&["sh", "-c", &format!("echo {key} | wg pubkey")]);
        String::from_utf8(out.stdout)
            .expect("utf-8")
            .trim()
            .to_string()
    };
    let (client_pub, server_pub) = (pubkey(&t.client, &client_key), pubkey(&t.inet, &server_key));
    let (wgc, wgs) = (wg_name('c'), wg_name('s'));
    let _client = wg_up(&t.client, &wgc, "198.18.200.1", &client_key);
    let _server = wg_up(&t.inet, &wgs, "198.18.200.2", &server_key);
    t.inet.exec(&[
        "wg",
        "set",
        &wgs,
        "peer",
        &client_pub,
        "allowed-ips",
        "198.18.200.1/32",
    ]);
    t.client.exec(&[
        "wg",
        "set",
        &wgc,
        "peer",
        &server_pub,
        "endpoint",
        &format!("{INET_SERVICE}:51820"),
        "allowed-ips",
        "198.18.200.2/32",
        "persistent-keepalive",
        "1",
    ]);
    // A UDP service on the server's tunnel address, asked from the
    // client's tunnel address.
    let far = udp_peer_server(&t.inet, Ipv4Addr::new(198, 18, 200, 2), 0);
    let sock = t
        .client
        .run(|| UdpSocket::bind((Ipv4Addr::new(198, 18, 200, 1), 0)))
        .expect("bind in the tunnel");
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !through(&sock, far.addr()) {
        if Instant::now() > deadline {
            let show = |ns: &NetNs| {
                String::from_utf8_lossy(&ns.try_exec(&["wg", "show"]).stdout).into_owned()
            };
            panic!(
                "the tunnel never carried a datagram:\nclient: {}\nserver: {}\nflows: {:?}",
                show(&t.client),
                show(&t.inet),
                gw.conns()
            );
        }
    }
    assert!(
        gw.conns()
            .iter()
            .any(|c| c["dport"] == 51820 && c["uplink"] == "x"),
        "{:?}",
        gw.conns()
    );

    t.ispx.exec(&[
        "iptables", "-w", "-I", "FORWARD", "-i", IF_CORE, "-j", "DROP",
    ]);
    eventually(Duration::from_secs(5), "x's outage acted on", || {
        gw.log().contains("uplink x: down for")
    });
    let acted = Instant::now();
    eventually(
        Duration::from_millis(1500),
        "the tunnel carries datagrams again",
        || through(&sock, far.addr()),
    );
    eprintln!("tunnel back {:?} after on_down acted", acted.elapsed());
    assert!(
        gw.conns()
            .iter()
            .any(|c| c["dport"] == 51820 && c["uplink"] == "y"),
        "{:?}",
        gw.conns()
    );
    assert_eq!(t.spoofed_drops(), 0);
}
