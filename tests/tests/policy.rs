//! Policies on real traffic: each rule field sends flows to its policy,
//! tiers fail over and come back, the sticky modes stick, a reload swaps
//! the rules without touching a live flow, and `explain` agrees with the
//! uplink a connection actually takes.
use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    time::{Duration, Instant},
};

use testbed::*;

/// Policies "onx" (x only) and "ony" (y only), then `extra`.
fn with_policies(t: &Topology, extra: &str) -> String {
    config_for(
        t,
        [1, 1],
        &format!(
            "[[policy]]\nname = \"onx\"\ntiers = [[\"x\"]]\n\n\
             [[policy]]\nname = \"ony\"\ntiers = [[\"y\"]]\n\n{extra}"
        ),
    )
}

/// One policy `name` over x and y with `keys` (balance and the like), and
/// one rule `rule` sending flows to it.
fn one_policy(t: &Topology, name: &str, keys: &str, rule: &str) -> String {
    config_for(
        t,
        [1, 1],
        &format!(
            "[[policy]]\nname = \"{name}\"\ntiers = [[\"x\", \"y\"]]\n{keys}\n\
             [[rule]]\n{rule}policy = \"{name}\"\n"
        ),
    )
}

/// Probes of x every 200 ms, down after 3 lost, up after 2.
const PROBES: &str = "\n[uplink.health]\ntargets = [\"198.19.0.10\"]\ninterval_ms = 200\n\
                      timeout_ms = 150\ndown_after = 3\nup_after = 2\n";

/// The config with `health` under uplink x, then `extra`.
fn with_x_health(t: &Topology, health: &str, extra: &str) -> String {
    let mut config = String::new();
    for part in config_for(t, [1, 1], "").split_inclusive("\n\n") {
        config += part;
        if part.contains("name = \"x\"") {
            config += health;
        }
    }
    config + extra
}

/// A new UDP socket from the client, with TOS `tos`: the address the
/// server sees it from.
fn udp_nat(t: &Topology, dst: SocketAddrV4, tos: u8) -> (UdpSocket, SocketAddrV4) {
    let s = t
        .client
        .run(|| UdpSocket::bind((CLIENT_ADDR, fresh_port())))
        .expect("bind");
    socket2::SockRef::from(&s)
        .set_tos_v4(u32::from(tos))
        .expect("IP_TOS");
    let seen = udp_seen_from(&s, dst).expect("UDP exchange");
    (s, seen)
}

/// A client port no earlier socket of this process used: a new socket on
/// a port whose flow is still pinned would reuse that flow, and its uplink.
fn fresh_port() -> u16 {
    static NEXT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(30_000);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// `multihome explain --json` for a flow from the client.
fn explain(
    gw: &Gateway,
    sport: Option<u16>,
    dst: Ipv4Addr,
    proto: &str,
    dport: u16,
    dscp: u8,
) -> serde_json::Value {
    let mut args = vec![
        "explain".to_string(),
        "--json".into(),
        "--src".into(),
        CLIENT_ADDR.to_string(),
        "--dst".into(),
        dst.to_string(),
        "--proto".into(),
        proto.into(),
        "--dport".into(),
        dport.to_string(),
        "--dscp".into(),
        dscp.to_string(),
    ];
    if let Some(p) = sport {
        args.extend(["--sport".into(), p.to_string()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = gw.cli(&args);
    check_output("multihome explain", &out);
    serde_json::from_slice(&out.stdout).expect("explain prints JSON")
}

fn check_output(what: &str, out: &std::process::Output) {
    assert!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn uplink_of(seen: &SocketAddrV4) -> &'static str {
    match *seen.ip() {
        UPLINK_X_ADDR => "x",
        UPLINK_Y_ADDR => "y",
        other => panic!("seen from {other}, not an uplink address"),
    }
}

#[test]
fn each_rule_field_sends_flows_to_its_policy_and_the_first_match_wins() {
    let t = Topology::standard();
    let dir = std::env::temp_dir().join(format!("mh-policy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join("service2.txt");
    std::fs::write(&file, format!("# the second service\n{INET_SERVICE2}/32\n"))
        .expect("prefix file");
    let rules = format!(
        "[[rule]]\nproto = \"udp\"\ndport = [\"9999\"]\npolicy = \"main\"\n\n\
         [[rule]]\nproto = \"tcp\"\ndport = [\"7000\"]\npolicy = \"unreachable\"\n\n\
         [[rule]]\nproto = \"udp\"\ndport = [\"5060\", \"10000-10010\"]\npolicy = \"onx\"\n\n\
         [[rule]]\nsrc = [\"{LAN_NET}\"]\ndst = [\"@file:{}\"]\npolicy = \"ony\"\n\n\
         [[rule]]\ndscp = 46\npolicy = \"ony\"\n\n\
         [[rule]]\nsrc = [\"@lan0\"]\npolicy = \"onx\"\n",
        file.display()
    );
    let gw = Gateway::start(&t.gw, &with_policies(&t, &rules));
    let sip = udp_peer_server(&t.inet, INET_SERVICE, 5060);
    let media = udp_peer_server(&t.inet, INET_SERVICE, 10005);
    let other = udp_peer_server(&t.inet, INET_SERVICE, 9000);
    let service2 = udp_peer_server(&t.inet, INET_SERVICE2, 5060);
    for _ in 0..8 {
        // Port and range (rule 3), before the destination file (rule 4).
        assert_eq!(uplink_of(&udp_nat(&t, sip.addr(), 0).1), "x");
        assert_eq!(uplink_of(&udp_nat(&t, media.addr(), 0).1), "x");
        assert_eq!(uplink_of(&udp_nat(&t, service2.addr(), 0).1), "x");
        // DSCP EF (rule 5), else the LAN interface's subnet (rule 6).
        assert_eq!(uplink_of(&udp_nat(&t, other.addr(), 46 << 2).1), "y");
        assert_eq!(uplink_of(&udp_nat(&t, other.addr(), 0).1), "x");
    }
    // The destination file (rule 4) for what rule 3 leaves.
    let tcp2 = tcp_peer_server(&t.inet, INET_SERVICE2, 0);
    for _ in 0..8 {
        let seen = tcp_seen_as(&t.client, None, tcp2.addr()).expect("TCP");
        assert_eq!(uplink_of(&seen), "y");
    }
    // `unreachable`: refused at once with ICMP administratively
    // prohibited, not left to time out; nothing reaches the ISPs.
    let started = Instant::now();
    let err = tcp_connect(&t.client, None, SocketAddrV4::new(INET_SERVICE, 7000))
        .expect_err("a refused flow cannot connect");
    assert_eq!(err.raw_os_error(), Some(libc::EHOSTUNREACH), "{err}");
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(gw.reason("policy_refused") > 0);

    // `main`: not translated; the kernel routes it out an uplink with its
    // LAN source, where the egress guard drops it. Nothing foreign leaves.
    let main = t
        .client
        .run(|| UdpSocket::bind((CLIENT_ADDR, 0)))
        .expect("bind");
    for _ in 0..5 {
        main.send_to(b"?", SocketAddrV4::new(INET_SERVICE, 9999))
            .expect("send");
    }
    eventually(
        Duration::from_secs(2),
        "the guard drops `main` flows",
        || gw.reason("foreign_source") >= 5,
    );
    assert!(gw.reason("policy_main") >= 5);
    assert_eq!(t.foreign_sources(), 0, "a LAN source reached an ISP");

    // `explain` names the same rules, with their lines.
    let e = explain(&gw, None, INET_SERVICE, "udp", 5060, 0);
    assert_eq!(e["policy"], "onx");
    assert_eq!(e["rule"]["number"], 3);
    let config = std::fs::read_to_string(gw.config_path()).expect("config");
    let line = e["rule"]["line"].as_u64().expect("line") as usize;
    assert_eq!(config.lines().nth(line - 1), Some("[[rule]]"));
    assert_eq!(
        explain(&gw, None, INET_SERVICE2, "tcp", 80, 0)["policy"],
        "ony"
    );
    assert_eq!(
        explain(&gw, None, INET_SERVICE, "udp", 9000, 46)["policy"],
        "ony"
    );
    assert_eq!(
        explain(&gw, None, INET_SERVICE, "tcp", 7000, 0)["action"],
        "unreachable"
    );
    assert_eq!(t.spoofed_drops(), 0);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_tier_one_uplink_going_down_moves_new_flows_to_tier_two_and_they_come_back() {
    let t = Topology::standard();
    let config = with_x_health(
        &t,
        PROBES,
        "\n[[policy]]\nname = \"steady\"\ntiers = [[\"x\"], [\"y\"]]\n\n\
         [[rule]]\nproto = \"udp\"\npolicy = \"steady\"\n",
    );
    let gw = Gateway::start(&t.gw, &config);
    let srv = udp_peer_server(&t.inet, INET_SERVICE, 0);
    for _ in 0..10 {
        assert_eq!(uplink_of(&udp_nat(&t, srv.addr(), 0).1), "x", "tier 1");
    }
    let e = explain(&gw, Some(40000), INET_SERVICE, "udp", srv.port(), 0);
    assert_eq!(e["tier"], 1);
    assert_eq!(e["uplink"], "x");

    let upstream = ["FORWARD", "-i", IF_CORE, "-j", "DROP"];
    t.ispx
        .exec(&[&["iptables", "-w", "-I"][..], &upstream].concat());
    // 3 probe rounds of 200 ms, then the refresh.
    eventually(Duration::from_secs(3), "new flows on tier 2", || {
        udp_nat(&t, srv.addr(), 0).1.ip() == &UPLINK_Y_ADDR
    });
    for _ in 0..10 {
        assert_eq!(uplink_of(&udp_nat(&t, srv.addr(), 0).1), "y", "tier 2");
    }
    let e = explain(&gw, Some(40000), INET_SERVICE, "udp", srv.port(), 0);
    assert_eq!(e["tier"], 2);
    assert_eq!(e["candidates"][0]["uplink"], "y");

    t.ispx
        .exec(&[&["iptables", "-w", "-D"][..], &upstream].concat());
    eventually(Duration::from_secs(5), "tier 1 back", || {
        udp_nat(&t, srv.addr(), 0).1.ip() == &UPLINK_X_ADDR
    });
    for _ in 0..10 {
        assert_eq!(
            uplink_of(&udp_nat(&t, srv.addr(), 0).1),
            "x",
            "tier 1 again"
        );
    }
}

#[test]
fn source_balance_keeps_a_hosts_connections_on_one_uplink_until_it_idles_for_sticky_s() {
    let t = Topology::standard();
    let gw = Gateway::start(
        &t.gw,
        &one_policy(&t, "sticky", "balance = \"source\"\nsticky_s = 2\n", ""),
    );
    let srv = tcp_peer_server(&t.inet, INET_SERVICE, 0);
    // A new TCP connection from `host`: the uplink it left by.
    let connect = |host: Ipv4Addr| {
        // Ports of their own: a tuple whose closed flow is still held
        // (`tcp_closing`) keeps that flow's uplink (DATAPATH.md).
        let from = SocketAddrV4::new(host, fresh_port());
        let mut c = tcp_connect_from(&t.client, Some(from), srv.addr()).expect("connect");
        let mut seen = String::new();
        c.read_to_string(&mut seen).expect("peer");
        uplink_of(&seen.trim().parse().expect("address"))
    };
    let mut rounds = Vec::new();
    // Each round: 100 connections, then 30, stick to one uplink; after 2 s
    // idle the next round makes a new choice (a new record), which may
    // differ.
    for n in [100, 30, 30, 30] {
        let started = Instant::now();
        let used: std::collections::BTreeSet<_> = (0..n).map(|_| connect(CLIENT_ADDR)).collect();
        assert_eq!(used.len(), 1, "one host, one uplink: {used:?}");
        let out = gw.cli(&["conns", "--affinity", "--json"]);
        check_output("conns --affinity", &out);
        let rows: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
        assert_eq!(rows.as_array().expect("rows").len(), 1, "{rows}");
        assert_eq!(rows[0]["policy"], "sticky");
        let e = explain(&gw, Some(50000), INET_SERVICE, "tcp", srv.port(), 0);
        assert_eq!(e["affinity"]["live"], true, "{e}");
        assert_eq!(e["uplink"], *used.iter().next().expect("one"));
        // Made in this round, not kept from the last.
        let age = rows[0]["age_s"].as_u64().expect("age");
        rounds.push((age, started.elapsed().as_secs() + 1));
        std::thread::sleep(Duration::from_millis(2600));
        let e = explain(&gw, Some(50000), INET_SERVICE, "tcp", srv.port(), 0);
        assert_eq!(e["affinity"]["live"], false, "expired after sticky_s: {e}");
    }
    // Every round made its own record: none is older than its round.
    assert!(rounds.iter().all(|(age, round)| age <= round), "{rounds:?}");

    // Twenty hosts: each keeps one uplink, and by their 1:1 weights the
    // hosts spread over both.
    let mut per_host = std::collections::BTreeSet::new();
    for k in 100..120 {
        let host = Ipv4Addr::new(198, 18, 1, k);
        t.client
            .exec(&["ip", "addr", "add", &format!("{host}/24"), "dev", IF_LAN]);
        let used: std::collections::BTreeSet<_> = (0..5).map(|_| connect(host)).collect();
        assert_eq!(used.len(), 1, "{host}: one uplink, got {used:?}");
        per_host.extend(used);
    }
    assert_eq!(per_host.len(), 2, "20 hosts on one uplink");
}

#[test]
fn site_balance_keeps_one_uplink_per_destination_site_and_spreads_sites() {
    let t = Topology::standard();
    // Twenty sites, a /24 each.
    let sites: Vec<Ipv4Addr> = (40..60).map(|k| Ipv4Addr::new(198, 19, k, 10)).collect();
    for a in &sites {
        t.inet
            .exec(&["ip", "addr", "add", &format!("{a}/32"), "dev", "lo"]);
    }
    let gw = Gateway::start(
        &t.gw,
        &one_policy(
            &t,
            "banks",
            "balance = \"site\"\n",
            "dst = [\"198.19.0.0/16\"]\n",
        ),
    );
    // 50 connections to one /24 (two servers in it) keep one uplink.
    let a = udp_peer_server(&t.inet, INET_SERVICE, 0);
    let b = udp_peer_server(&t.inet, INET_SERVICE2, 0);
    let mut used = std::collections::BTreeSet::new();
    for i in 0..50 {
        let srv = if i % 2 == 0 { a.addr() } else { b.addr() };
        used.insert(uplink_of(&udp_nat(&t, srv, 0).1));
    }
    assert_eq!(used.len(), 1, "one site, one uplink: {used:?}");
    let e = explain(&gw, None, INET_SERVICE2, "udp", b.port(), 0);
    assert_eq!(e["uplink"], *used.iter().next().expect("one"));
    // Many sites spread over both.
    let mut per_site = std::collections::BTreeSet::new();
    for s in &sites {
        let srv = udp_peer_server(&t.inet, *s, 0);
        per_site.insert(uplink_of(&udp_nat(&t, srv.addr(), 0).1));
    }
    assert_eq!(per_site.len(), 2, "20 sites on one uplink: {per_site:?}");
}

#[test]
fn hash_balance_sends_every_connection_between_two_hosts_one_way_as_explain_says() {
    let t = Topology::standard();
    let gw = Gateway::start(&t.gw, &one_policy(&t, "pcc", "balance = \"hash\"\n", ""));
    for dst in [INET_SERVICE, INET_SERVICE2] {
        let srv = udp_peer_server(&t.inet, dst, 0);
        let want = explain(&gw, None, dst, "udp", srv.port(), 0)["uplink"].clone();
        for _ in 0..20 {
            assert_eq!(want, uplink_of(&udp_nat(&t, srv.addr(), 0).1), "{dst}");
        }
    }
}

#[test]
fn connection_balance_places_each_flow_where_explain_says() {
    let t = Topology::standard();
    let gw = Gateway::start(&t.gw, &config_for(&t, [1, 1], ""));
    let srv = udp_peer_server(&t.inet, INET_SERVICE, 0);
    let mut both = std::collections::BTreeSet::new();
    for _ in 0..20 {
        let (s, seen) = udp_nat(&t, srv.addr(), 0);
        let sport = s.local_addr().expect("local").port();
        let e = explain(&gw, Some(sport), INET_SERVICE, "udp", srv.port(), 0);
        assert_eq!(e["policy"], "balanced");
        assert_eq!(e["uplink"], uplink_of(&seen), "{e}");
        both.insert(uplink_of(&seen));
    }
    assert_eq!(both.len(), 2);
}

#[test]
fn a_reload_swaps_the_rules_without_touching_live_flows_and_a_bad_file_is_refused() {
    let t = Topology::standard();
    let gw = Gateway::start(&t.gw, &with_policies(&t, "[[rule]]\npolicy = \"onx\"\n"));
    let tcp = tcp_echo_server(&t.inet, INET_SERVICE, 0);
    let udp = udp_peer_server(&t.inet, INET_SERVICE, 0);
    let mut conn = tcp_connect(&t.client, None, tcp.addr()).expect("connect");
    let (sock, before) = udp_nat(&t, udp.addr(), 0);
    assert_eq!(uplink_of(&before), "x");

    // Everything to y from now on.
    write_config(
        gw.config_path(),
        with_policies(&t, "[[rule]]\npolicy = \"ony\"\n"),
    )
    .expect("config");
    let out = gw.cli(&["reload"]);
    check_output("multihome reload", &out);
    for i in 0..200u32 {
        let msg = i.to_be_bytes();
        conn.write_all(&msg).expect("the TCP stream goes on");
        let mut back = [0u8; 4];
        conn.read_exact(&mut back).expect("echo");
        assert_eq!(back, msg);
        assert_eq!(
            udp_seen_from(&sock, udp.addr()).expect("UDP goes on"),
            before
        );
    }
    for _ in 0..10 {
        assert_eq!(
            uplink_of(&udp_nat(&t, udp.addr(), 0).1),
            "y",
            "new flows: new rules"
        );
    }

    // A missing prefix file: refused, the running rules stay.
    write_config(
        gw.config_path(),
        with_policies(
            &t,
            "[[rule]]\ndst = [\"@file:/nonexistent/mh\"]\npolicy = \"onx\"\n",
        ),
    )
    .expect("config");
    let out = gw.cli(&["reload"]);
    assert!(!out.status.success(), "a bad file must be refused");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/mh"), "{err}");
    for _ in 0..10 {
        assert_eq!(
            uplink_of(&udp_nat(&t, udp.addr(), 0).1),
            "y",
            "old rules stay"
        );
    }
    assert_eq!(udp_seen_from(&sock, udp.addr()).expect("UDP"), before);
}

#[test]
fn a_policy_a_reload_removes_leaves_its_flows_running_under_balanced_and_a_restart_keeps_ids() {
    let t = Topology::standard();
    let only = |name: &str| {
        config_for(
            &t,
            [1, 1],
            &format!(
                "[[policy]]\nname = \"{name}\"\ntiers = [[\"{}\"]]\n\n[[rule]]\nproto = \"udp\"\npolicy = \"{name}\"\n",
                if name == "onx" { "x" } else { "y" }
            ),
        )
    };
    let gw = Gateway::start_with_pin(
        &t.gw,
        &only("onx"),
        unique_pin_dir("pol"),
        &["--keep-on-exit"],
    );
    let udp = udp_peer_server(&t.inet, INET_SERVICE, 0);
    let (sock, before) = udp_nat(&t, udp.addr(), 0);
    assert_eq!(uplink_of(&before), "x");
    let policy_of = |gw: &Gateway, port: u16| {
        gw.conns()
            .iter()
            .find(|c| c["sport"] == port)
            .map(|c| c["policy"].as_str().expect("policy").to_string())
    };
    let port = sock.local_addr().expect("local").port();
    assert_eq!(policy_of(&gw, port).as_deref(), Some("onx"));

    write_config(gw.config_path(), only("ony")).expect("config");
    check_output("multihome reload", &gw.cli(&["reload"]));
    assert_eq!(udp_seen_from(&sock, udp.addr()).expect("UDP"), before);
    assert_eq!(policy_of(&gw, port).as_deref(), Some("balanced"));
    let (s2, seen) = udp_nat(&t, udp.addr(), 0);
    assert_eq!(uplink_of(&seen), "y");
    let port2 = s2.local_addr().expect("local").port();
    assert_eq!(policy_of(&gw, port2).as_deref(), Some("ony"));

    // A restart adopts the maps: policy ids are kept by name. A new
    // affinity map size remakes that map only.
    let config = only("ony") + "\n[nat]\nmax_affinities = 1024\n";
    let cfg_path = gw.config_path().to_owned();
    let pin = gw.stop();
    write_config(&cfg_path, &config).expect("config");
    let gw = Gateway::start_with_pin(&t.gw, &config, pin, &[]);
    assert_eq!(policy_of(&gw, port2).as_deref(), Some("ony"));
    assert_eq!(udp_seen_from(&s2, udp.addr()).expect("UDP"), seen);
    assert!(
        gw.log().contains("AFFINITY: made afresh for 1024 entries"),
        "{}",
        gw.log()
    );
    let _ = std::fs::remove_file(&cfg_path);
}

#[test]
fn endpoint_balance_gives_a_socket_one_public_address_and_port_for_every_remote() {
    let t = Topology::standard();
    let gw = Gateway::start(
        &t.gw,
        &(one_policy(&t, "p2p", "balance = \"endpoint\"\n", "proto = \"udp\"\n")
            + "\n[timeouts]\nudp = 2\n"),
    );
    let a = udp_peer_server(&t.inet, INET_SERVICE, 0);
    let b = udp_peer_server(&t.inet, INET_SERVICE2, 0);
    let mut uplinks = std::collections::BTreeSet::new();
    let mut last = None;
    // RFC 5780-style: one socket, two servers, 20 sockets in a row.
    for _ in 0..20 {
        let s = t
            .client
            .run(|| UdpSocket::bind((CLIENT_ADDR, fresh_port())))
            .expect("bind");
        let seen_a = udp_seen_from(&s, a.addr()).expect("UDP to a");
        let seen_b = udp_seen_from(&s, b.addr()).expect("UDP to b");
        assert_eq!(seen_a, seen_b, "one public mapping for both remotes");
        uplinks.insert(uplink_of(&seen_a));
        last = Some((s, seen_a));
    }
    assert_eq!(uplinks.len(), 2, "sockets spread over both uplinks");

    let (s, seen) = last.expect("a socket");
    let sport = s.local_addr().expect("local").port();
    let e = explain(&gw, Some(sport), INET_SERVICE, "udp", 4242, 0);
    assert_eq!(e["endpoint"]["nat_port"], seen.port(), "{e}");
    assert_eq!(e["uplink"], uplink_of(&seen), "{e}");
    let out = gw.cli(&["conns", "--affinity", "--json"]);
    check_output("conns --affinity", &out);
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(rows.as_array().expect("rows").len(), 20, "{rows}");

    // The records go with their last flow (UDP idles out in 2 s here).
    eventually(Duration::from_secs(60), "endpoint records reaped", || {
        let out = gw.cli(&["conns", "--affinity", "--json"]);
        serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .is_ok_and(|v| v.as_array().is_some_and(Vec::is_empty))
    });
}

#[test]
fn an_endpoints_public_port_is_reserved_so_another_hosts_flow_never_takes_it() {
    let t = Topology::two_clients();
    let config = config_for(
        &t,
        [1, 1],
        &format!(
            "[[policy]]\nname = \"p2p\"\ntiers = [[\"x\"]]\nbalance = \"endpoint\"\n\n\
             [[policy]]\nname = \"onx\"\ntiers = [[\"x\"]]\n\n\
             [[rule]]\nsrc = [\"{CLIENT_ADDR}/32\"]\nproto = \"udp\"\npolicy = \"p2p\"\n\n\
             [[rule]]\nsrc = [\"{CLIENT2_ADDR}/32\"]\npolicy = \"onx\"\n\n\
             [timeouts]\nudp = 2\n"
        ),
    );
    let gw = Gateway::start(&t.gw, &config);
    let a = udp_peer_server(&t.inet, INET_SERVICE, 0);
    let b = udp_peer_server(&t.inet, INET_SERVICE2, 0);
    let port = fresh_port();
    let endpoint = t
        .client
        .run(|| UdpSocket::bind((CLIENT_ADDR, port)))
        .expect("bind");
    let other = t
        .client2()
        .run(|| UdpSocket::bind((CLIENT2_ADDR, port)))
        .expect("bind");

    // The endpoint's first flow keeps its LAN port, which its record holds.
    let mapping = udp_seen_from(&endpoint, a.addr()).expect("UDP to a");
    assert_eq!(mapping, SocketAddrV4::new(UPLINK_X_ADDR, port));
    // Another host on the same LAN port, to a remote the endpoint has not
    // reached yet: the port is free towards it, but reserved.
    let seen = udp_seen_from(&other, b.addr()).expect("UDP from client2 to b");
    assert_eq!(*seen.ip(), UPLINK_X_ADDR);
    assert_ne!(seen.port(), port, "client2 was given the endpoint's port");
    // So the endpoint reaches that remote from its one mapping.
    assert_eq!(
        udp_seen_from(&endpoint, b.addr()).expect("UDP to b"),
        mapping
    );
    assert_eq!(gw.reason("endpoint_remapped"), 0);

    // The reservation lives with the record: once the endpoint's flows
    // idle out and the record is reaped, the port is anyone's.
    drop(endpoint);
    eventually(Duration::from_secs(60), "endpoint record reaped", || {
        let out = gw.cli(&["conns", "--affinity", "--json"]);
        serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .is_ok_and(|v| v.as_array().is_some_and(Vec::is_empty))
    });
    let seen = udp_seen_from(&other, a.addr()).expect("UDP from client2 to a");
    assert_eq!(seen, SocketAddrV4::new(UPLINK_X_ADDR, port));
}

#[test]
fn an_interface_rule_follows_a_subnet_added_to_its_interface_without_a_reload() {
    let t = Topology::two_clients();
    let gw = Gateway::start(
        &t.gw,
        &with_policies(&t, "[[rule]]\nsrc = [\"@lan1\"]\npolicy = \"ony\"\n"),
    );
    let server = udp_peer_server(&t.inet, INET_SERVICE, 0);
    let from = |addr: Ipv4Addr| {
        let s = t
            .client2()
            .run(|| UdpSocket::bind((addr, fresh_port())))
            .expect("bind");
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .expect("timeout");
        udp_seen_from(&s, server.addr())
            .ok()
            .map(|seen| uplink_of(&seen))
    };
    for _ in 0..5 {
        assert_eq!(from(CLIENT2_ADDR), Some("y"));
    }

    // A second subnet on lan1, as an operator adds one: its hosts are
    // lan1's, and the rule takes them at once.
    let added = Ipv4Addr::new(198, 18, 3, 2);
    t.gw.exec(&["ip", "addr", "add", "198.18.3.1/24", "dev", IF_LAN1]);
    t.client2()
        .exec(&["ip", "addr", "add", "198.18.3.2/24", "dev", IF_LAN]);
    eventually(
        Duration::from_secs(10),
        "the new subnet is translated",
        || from(added).is_some(),
    );
    for _ in 0..10 {
        assert_eq!(
            from(added),
            Some("y"),
            "a host of the new subnet under the rule"
        );
    }
    assert!(gw.log().contains("rules rewritten"), "{}", gw.log());
}

#[test]
fn a_policys_own_on_down_and_on_up_override_the_uplinks_for_its_flows_only() {
    let t = Topology::standard();
    // x keeps its flows through an outage and leaves them where they are
    // after; the voip policy's flows move at once and come back.
    let config = with_x_health(
        &t,
        &format!("{PROBES}on_down = \"keep\"\non_up = \"stay\"\n"),
        "\n[[policy]]\nname = \"voip\"\ntiers = [[\"x\"], [\"y\"]]\non_down = \"purge\"\non_up = \"return\"\n\n\
         [[rule]]\nproto = \"udp\"\npolicy = \"voip\"\n",
    );
    let gw = Gateway::start(&t.gw, &config);
    let udp = udp_peer_server(&t.inet, INET_SERVICE, 0);
    let (sock, before) = udp_nat(&t, udp.addr(), 0);
    assert_eq!(uplink_of(&before), "x", "tier 1");
    // A TCP session under `balanced`, pinned to x.
    let tcp = tcp_echo_server(&t.inet, INET_SERVICE, 0);
    let mut on_x = Vec::new();
    while on_x.is_empty() {
        let from = SocketAddrV4::new(CLIENT_ADDR, fresh_port());
        let c = tcp_connect_from(&t.client, Some(from), tcp.addr()).expect("connect");
        let on = gw
            .conns()
            .iter()
            .any(|f| f["sport"] == from.port() && f["uplink"] == "x");
        if on {
            on_x.push((c, from.port()));
        }
    }

    let upstream = ["FORWARD", "-i", IF_CORE, "-j", "DROP"];
    t.ispx
        .exec(&[&["iptables", "-w", "-I"][..], &upstream].concat());
    eventually(Duration::from_secs(5), "x's outage acted on", || {
        gw.log().contains("uplink x: down for")
    });
    // voip's flow moves on its next packet (its policy's `purge`).
    let moved = udp_seen_from(&sock, udp.addr()).expect("the UDP flow moves");
    assert_eq!(uplink_of(&moved), "y");
    // The TCP session stays on x (the uplink's `keep`): not moved, not reset.
    let port = on_x[0].1;
    let _ = on_x[0].0.write_all(b"still there?");
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        gw.conns()
            .iter()
            .any(|f| f["sport"] == port && f["uplink"] == "x"),
        "the balanced TCP flow was kept on x"
    );
    assert_eq!(gw.reason("tcp_reset"), 0);

    t.ispx
        .exec(&[&["iptables", "-w", "-D"][..], &upstream].concat());
    // voip's `return`: its failed-over flow comes back to x.
    eventually(Duration::from_secs(8), "the voip flow back on x", || {
        udp_seen_from(&sock, udp.addr()).is_ok_and(|p| uplink_of(&p) == "x")
    });
    assert!(gw.log().contains("moved back failed-over"));
}

/// A non-TCP flow whose uplink is drained with `--reset` moves at its
/// next packet; when its policy has nowhere to move it (`last_resort =
/// "unreachable"`), that packet is answered with ICMP administratively
/// prohibited instead, so the application learns at once.
#[test]
fn a_udp_flow_its_policy_cannot_move_gets_icmp_prohibited_when_its_uplink_is_reset() {
    let t = Topology::standard();
    let gw = Gateway::start(
        &t.gw,
        &config_for(
            &t,
            [1, 1],
            "[[policy]]\nname = \"onlyx\"\ntiers = [[\"x\"]]\nlast_resort = \"unreachable\"\n\n\
             [[rule]]\nproto = \"udp\"\npolicy = \"onlyx\"\n",
        ),
    );
    let srv = udp_peer_server(&t.inet, INET_SERVICE, 0);
    let s = t
        .client
        .run(|| UdpSocket::bind((CLIENT_ADDR, fresh_port())))
        .expect("bind");
    s.connect(srv.addr()).expect("connect");
    assert_eq!(uplink_of(&udp_seen_from(&s, srv.addr()).expect("UDP")), "x");
    let out = gw.cli(&["uplink", "drain", "x", "--reset"]);
    check_output("uplink drain x --reset", &out);
    // The datagram that finds its flow reset is refused; the error comes
    // back to the connected socket.
    let started = Instant::now();
    let mut refused = None;
    while refused.is_none() && started.elapsed() < Duration::from_secs(3) {
        let _ = s.send(b"?");
        let mut buf = [0u8; 64];
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        if let Err(e) = s.recv(&mut buf)
            && e.raw_os_error() == Some(libc::EHOSTUNREACH)
        {
            refused = Some(started.elapsed());
        }
    }
    let after = refused.expect("ICMP administratively prohibited came back");
    assert!(after < Duration::from_secs(1), "{after:?}");
    assert!(gw.reason("policy_refused") > 0);
    assert_eq!(t.foreign_sources(), 0);
}
