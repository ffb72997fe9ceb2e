//! Smoke tests of the test bed itself: real packets, no daemon.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;

use testbed::*;

fn netns_list() -> String {
    let out = std::process::Command::new("ip")
        .args(["netns", "list"])
        .env("PATH", host::child_path())
        .output()
        .expect("run ip netns list");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn standard_topology_isp_routes_reach_inet_from_uplink_addresses() {
    let t = Topology::standard();
    // The gw has no route to the internet until someone installs one.
    assert!(
        !ping(&t.gw, INET_SERVICE, 1),
        "gw must start without a default route"
    );
    route(&t.gw, &format!("{INET_NET} via {UPLINK_X_GW}"));
    assert!(
        ping_from(&t.gw, UPLINK_X_ADDR, INET_SERVICE, 3),
        "ping -I wanx -> service"
    );
    // Replies to uplink Y's address come back through ISP Y (policy needed to
    // send them out of wany, so only check ISP Y's own reachability here).
    assert!(
        ping_from(&t.gw, UPLINK_Y_ADDR, UPLINK_Y_GW, 3),
        "ping wany -> ispy"
    );

    let srv = tcp_peer_server(&t.inet, INET_SERVICE, 0);
    let seen = tcp_seen_as(&t.gw, Some(UPLINK_X_ADDR), srv.addr()).expect("tcp via ispx");
    assert_eq!(*seen.ip(), UPLINK_X_ADDR);
    assert_eq!(srv.peers(), vec![seen]);

    let echo = tcp_echo_server(&t.inet, INET_SERVICE2, 0);
    let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let back = tcp_request_from(&t.gw, Some(UPLINK_X_ADDR), echo.addr(), &payload).expect("echo");
    assert_eq!(back, payload);

    let udp = udp_peer_server(&t.inet, INET_SERVICE, 0);
    let seen = udp_seen_as(&t.gw, Some(UPLINK_X_ADDR), udp.addr()).expect("udp via ispx");
    assert_eq!(*seen.ip(), UPLINK_X_ADDR);

    // Same through ISP Y once the route points there.
    route_replace(&t.gw, &format!("{INET_NET} via {UPLINK_Y_GW}"));
    let seen = tcp_seen_as(&t.gw, Some(UPLINK_Y_ADDR), srv.addr()).expect("tcp via ispy");
    assert_eq!(*seen.ip(), UPLINK_Y_ADDR);
    assert_eq!(
        t.spoofed_drops(),
        0,
        "legit traffic must not hit anti-spoofing"
    );
}

#[test]
fn isp_drops_and_counts_spoofed_sources() {
    let t = Topology::standard();
    // Client reaches the gw itself.
    assert!(ping(&t.client, GW_LAN, 2));
    // Plain routing without NAT: the client's source leaks to the ISP.
    route(&t.gw, &format!("default via {UPLINK_X_GW}"));
    assert_eq!(t.spoofed_drops(), 0);
    let before = link_counters(&t.ispx, IF_CUST).rx_packets;
    assert!(
        !ping(&t.client, INET_SERVICE, 3),
        "un-NATed client traffic must be dropped"
    );
    let drops = t.spoofed_drops_at(Isp::X);
    assert!(
        drops >= 3,
        "ispx counted {drops} spoofed drops, expected >= 3"
    );
    assert_eq!(t.spoofed_drops_at(Isp::Y), 0);
    assert!(link_counters(&t.ispx, IF_CUST).rx_packets >= before + 3);

    // UDP and TCP from the client die the same way.
    let udp = udp_echo_server(&t.inet, INET_SERVICE, 0);
    assert!(udp_request(&t.client, udp.addr(), b"x").is_err());
    assert!(udp.peers().is_empty(), "inet must never see the LAN source");
    assert!(t.spoofed_drops() >= drops + 3);
}

#[test]
fn tun_uplink_carries_packets_both_ways() {
    let t = Topology::tun_uplink();
    let relay = t.tun_relay.as_ref().expect("tun topology has a relay");
    assert!(
        t.gw.exec_stdout(&["ip", "-o", "link", "show", IF_WANX])
            .contains("link/none")
    );
    assert!(ping(&t.gw, UPLINK_X_GW, 2), "gw -> ispx over the TUN link");
    route(&t.gw, &format!("{INET_NET} via {UPLINK_X_GW}"));
    assert!(ping_from(&t.gw, UPLINK_X_ADDR, INET_SERVICE, 2));
    let echo = tcp_echo_server(&t.inet, INET_SERVICE, 0);
    let payload: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 256) as u8).collect();
    let back = tcp_request_from(&t.gw, Some(UPLINK_X_ADDR), echo.addr(), &payload).expect("echo");
    assert_eq!(back, payload);
    assert!(
        relay.a_to_b() > 200 && relay.b_to_a() > 200,
        "relay counts {} / {}",
        relay.a_to_b(),
        relay.b_to_a()
    );
    // Uplink Y is still a plain veth.
    assert!(ping(&t.gw, UPLINK_Y_GW, 1));
    // Spoofed source over the TUN is dropped and counted.
    route(&t.gw, &format!("default via {UPLINK_X_GW}"));
    assert!(!ping(&t.client, INET_SERVICE, 2));
    assert!(t.spoofed_drops_at(Isp::X) >= 2);
}

#[test]
fn shared_nic_each_isp_accepts_only_its_customer_address() {
    let t = Topology::shared_nic();
    let srv = udp_peer_server(&t.inet, INET_SERVICE, 0);
    for (isp, gw_addr, ok_src, bad_src) in [
        (Isp::X, SHARED_X_GW, SHARED_X_ADDR, SHARED_Y_ADDR),
        (Isp::Y, SHARED_Y_GW, SHARED_Y_ADDR, SHARED_X_ADDR),
    ] {
        route_replace(&t.gw, &format!("{INET_NET} via {gw_addr}"));
        let seen = udp_seen_as(&t.gw, Some(ok_src), srv.addr()).expect("own address accepted");
        assert_eq!(*seen.ip(), ok_src);
        assert!(ping_from(&t.gw, ok_src, INET_SERVICE, 1));
        let before = t.spoofed_drops_at(isp);
        assert!(
            !ping_from(&t.gw, bad_src, INET_SERVICE, 2),
            "{isp:?} must drop {bad_src}"
        );
        assert!(t.spoofed_drops_at(isp) >= before + 2);
    }
    assert_eq!(t.uplinks()[0].ifname, t.uplinks()[1].ifname);
}

#[test]
fn two_clients_reach_the_gw_on_separate_lans() {
    let t = Topology::two_clients();
    assert!(ping(&t.client, GW_LAN, 1));
    assert!(ping(t.client2(), GW_LAN1, 1));
    // gw forwards between its LANs (no NAT needed for that).
    let srv = tcp_peer_server(&t.client, CLIENT_ADDR, 0);
    let seen = tcp_seen_as(t.client2(), None, srv.addr()).expect("lan1 -> lan0");
    assert_eq!(*seen.ip(), CLIENT2_ADDR);
}

#[test]
fn mtu_and_sysctl_helpers_apply_inside_the_namespace() {
    let t = Topology::standard();
    assert_eq!(t.gw.sysctl_get("net.ipv4.ip_forward"), "1");
    assert_eq!(t.inet.sysctl_get("net.ipv4.ip_forward"), "0");
    t.set_uplink_mtu(Isp::X, 1400);
    assert!(
        t.gw.exec_stdout(&["ip", "link", "show", IF_WANX])
            .contains("mtu 1400")
    );
    assert!(
        t.ispx
            .exec_stdout(&["ip", "link", "show", IF_CUST])
            .contains("mtu 1400")
    );
    let feats = t.gw.exec_stdout(&["ethtool", "-k", IF_WANX]);
    assert!(feats.contains("tx-checksumming: off"), "{feats}");
    assert!(feats.contains("rx-checksumming: off"), "{feats}");
    // A socket created while entered stays in that namespace.
    let sock = {
        let _in = t.inet.enter();
        std::net::UdpSocket::bind((INET_SERVICE, 0)).expect("bind service address inside inet")
    };
    assert!(
        std::net::UdpSocket::bind((INET_SERVICE, 0)).is_err(),
        "thread left the netns"
    );
    drop(sock);
}

#[test]
fn namespaces_are_removed_on_drop_even_after_panic() {
    let mut names = Vec::new();
    let mut pid = 0;
    let res = catch_unwind(AssertUnwindSafe(|| {
        let t = Topology::tun_uplink();
        for ns in [&t.client, &t.gw, &t.ispx, &t.ispy, &t.inet] {
            names.push(ns.name().to_string());
        }
        let p = t.inet.spawn(&["sleep", "300"]);
        pid = p.pid();
        std::mem::forget(p); // only the NetNs drop can kill it now
        assert!(Path::new(&format!("/proc/{pid}")).exists());
        panic!("deliberate panic");
    }));
    assert!(res.is_err());
    assert_eq!(names.len(), 5);
    let list = netns_list();
    for n in &names {
        assert!(
            !Path::new("/run/netns").join(n).exists(),
            "{n} still exists"
        );
        assert!(
            !list.lines().any(|l| l.split_whitespace().next() == Some(n)),
            "{n} listed"
        );
    }
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "spawned process {pid} survived"
    );
}

#[test]
fn pin_dir_is_unique_and_removed() {
    let path = {
        let a = unique_pin_dir("smoke");
        let b = unique_pin_dir("smoke");
        assert_ne!(a.path(), b.path());
        assert!(a.path().starts_with("/sys/fs/bpf") && a.path().is_dir());
        std::fs::create_dir(a.path().join("sub")).expect("mkdir in bpffs");
        a.path().to_path_buf()
    };
    assert!(!path.exists());
}

#[test]
fn exec_is_bounded_and_reports_failures() {
    let ns = NetNs::new("ex");
    let start = std::time::Instant::now();
    let out = ns.try_exec_timeout(
        &["sh", "-c", "sleep 60 & sleep 60"],
        std::time::Duration::from_millis(300),
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("killed after"));
    assert!(start.elapsed() < std::time::Duration::from_secs(10));

    let err = catch_unwind(AssertUnwindSafe(|| {
        ns.exec(&["ip", "link", "set", "nosuchif", "up"]);
    }))
    .expect_err("exec of a failing command must panic");
    let msg = err.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(msg.contains("nosuchif") && msg.contains("stderr"), "{msg}");

    let p = ns.spawn(&["sh", "-c", "echo started; exec sleep 60"]);
    assert!(p.is_running());
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert!(p.log().contains("started"));
    p.signal(libc::SIGTERM);
    assert!(p.wait_timeout(std::time::Duration::from_secs(5)).is_some());
}
