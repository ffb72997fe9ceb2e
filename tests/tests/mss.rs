//! TCP MSS clamping through a PMTU black hole beyond an uplink, and the
//! `auto` default on an uplink without Ethernet (a PPPoE-like MTU of 1492).
use std::time::Duration;

use testbed::*;

/// `config_for`, with `line` added to uplink `name`'s table.
fn with_uplink_key(config: &str, name: &str, line: &str) -> String {
    let at = format!("name = {name:?}\n");
    assert!(config.contains(&at), "no uplink {name} in {config}");
    config.replacen(&at, &format!("{at}{line}\n"), 1)
}

/// A black hole beyond ISP x: its link towards the internet carries 1400
/// bytes, and it sends no "fragmentation needed". The internet host's own
/// link stays at 1500, so it advertises a full MSS itself.
fn black_hole_beyond_x(t: &Topology) {
    set_mtu(&t.ispx, IF_CORE, 1400);
    t.ispx.exec(&[
        "iptables",
        "-w",
        "-A",
        "OUTPUT",
        "-p",
        "icmp",
        "--icmp-type",
        "fragmentation-needed",
        "-j",
        "DROP",
    ]);
}

fn upload_through_x(clamp: &str, offloads: bool) -> Result<(), String> {
    let t = Topology::standard();
    if offloads {
        t.enable_checksum_offloads();
    }
    black_hole_beyond_x(&t);
    let config = with_uplink_key(
        &config_for(&t, [1, 0], ""),
        "x",
        &format!("mss_clamp = {clamp}"),
    );
    let _gw = Gateway::start(&t.gw, &config);
    let srv = tcp_echo_server(&t.inet, INET_SERVICE, 0);
    let payload: Vec<u8> = (0..20u32 << 20).map(|i| (i * 13 + i / 509) as u8).collect();
    let back = tcp_request(&t.client, srv.addr(), &payload).map_err(|e| e.to_string())?;
    if back != payload {
        return Err(format!("{} bytes came back changed", back.len()));
    }
    assert_eq!(t.foreign_sources(), 0);
    Ok(())
}

#[test]
fn a_20_mb_upload_through_a_pmtu_black_hole_completes_with_mss_clamp_1360() {
    upload_through_x("1360", false).expect("the clamped upload");
}

#[test]
fn the_clamped_upload_completes_with_checksum_offload_on_too() {
    upload_through_x("1360", true).expect("the clamped upload, offloads on");
}

#[test]
fn the_same_upload_stalls_without_clamping_so_the_black_hole_is_real() {
    assert!(
        upload_through_x("\"off\"", false).is_err(),
        "the test topology has no black hole: the clamping test proves nothing"
    );
}

/// The MSS option of the first SYN (or SYN-ACK) tcpdump sees on `ifname`.
fn capture_mss(ns: &NetNs, ifname: &str, syn_ack: bool) -> Proc {
    let filter = if syn_ack {
        "tcp[tcpflags] & (tcp-syn|tcp-ack) == (tcp-syn|tcp-ack)"
    } else {
        "tcp[tcpflags] & (tcp-syn|tcp-ack) == tcp-syn"
    };
    let p = ns.spawn(&["tcpdump", "-lnv", "-i", ifname, "-c", "1", filter]);
    std::thread::sleep(Duration::from_millis(800));
    p
}

fn mss_in(p: &Proc) -> u32 {
    p.wait_timeout(Duration::from_secs(10));
    let log = p.log();
    let at = log
        .find("mss ")
        .unwrap_or_else(|| panic!("no MSS option in:\n{log}"));
    log[at + 4..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no MSS value in:\n{log}"))
}

#[test]
fn auto_clamps_to_the_mtu_of_an_uplink_without_ethernet_and_ethernet_uplinks_are_left_alone() {
    let t = Topology::tun_uplink();
    t.set_uplink_mtu(Isp::X, 1492);
    // Weight 0 on y: every flow takes the TUN uplink x, default "auto".
    let gw = Gateway::start(&t.gw, &config_for(&t, [1, 0], ""));
    let srv = tcp_echo_server(&t.inet, INET_SERVICE, 0);
    let syn = capture_mss(&t.ispx, IF_CUST, false);
    let syn_ack = capture_mss(&t.client, IF_LAN, true);
    assert_eq!(
        tcp_request(&t.client, srv.addr(), b"x").expect("via x"),
        b"x"
    );
    assert_eq!(mss_in(&syn), 1452, "the SYN leaving the 1492-byte uplink");
    assert_eq!(mss_in(&syn_ack), 1452, "the SYN-ACK reaching the LAN host");
    drop(gw);

    // The Ethernet uplink y, by default unclamped.
    let gw = Gateway::start(&t.gw, &config_for(&t, [0, 1], ""));
    let syn = capture_mss(&t.ispy, IF_CUST, false);
    assert_eq!(
        tcp_request(&t.client, srv.addr(), b"y").expect("via y"),
        b"y"
    );
    assert_eq!(
        mss_in(&syn),
        1460,
        "an Ethernet uplink is not clamped by default"
    );
    drop(gw);
}
