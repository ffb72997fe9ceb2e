//! Fairness when the connection map fills: a LAN host flooding new flows
//! is held to its quota, its own established download never stalls, and
//! another host's new connections keep working.
use std::time::{Duration, Instant};

use testbed::*;

const TRICKLE_PORT: &str = "7000";

fn py(args: &[&str]) -> Vec<String> {
    let mut v = vec![PYTHON.to_owned(), "-u".to_owned(), script("flood.py")];
    v.extend(args.iter().map(|s| s.to_string()));
    v
}

fn refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// One host floods new flows; `offloads`: checksum offload on, the real
/// case.
fn flooding_host_held_to_its_quota(offloads: bool) {
    let t = Topology::two_clients();
    if offloads {
        t.enable_checksum_offloads();
    }
    let gw = Gateway::start(
        &t.gw,
        &config_for(
            &t,
            [1, 1],
            "[nat]\nmax_flows = 4096\nmax_flows_per_host = 256\n",
        ),
    );
    let srv = tcp_echo_server(&t.inet, INET_SERVICE, 0);
    let inet = INET_SERVICE.to_string();
    let client = CLIENT_ADDR.to_string();

    // The flooding host's own download: 1 MB/s for the whole test.
    let trickle = t.inet.spawn(&refs(&py(&[
        "trickle",
        &inet,
        TRICKLE_PORT,
        "1000000",
        "12",
    ])));
    std::thread::sleep(Duration::from_millis(500));
    let watch = t
        .client
        .spawn(&refs(&py(&["watch", &inet, TRICKLE_PORT, "10"])));
    std::thread::sleep(Duration::from_millis(1000));

    // The flood, and meanwhile the other host's new connections.
    let flood = t.client.spawn(&refs(&py(&["udp", &client, &inet, "6"])));
    let start = Instant::now();
    let mut tries = 0;
    while start.elapsed() < Duration::from_secs(6) {
        tries += 1;
        let back = tcp_request(t.client2(), srv.addr(), b"still here")
            .unwrap_or_else(|e| panic!("host 2's connection {tries} failed during the flood: {e}"));
        assert_eq!(back, b"still here");
        std::thread::sleep(Duration::from_millis(200));
    }
    flood.wait_timeout(Duration::from_secs(10));
    watch.wait_timeout(Duration::from_secs(15));
    drop(trickle);

    let sent: u64 = flood.log().trim().parse().expect("flood count");
    let watched = watch.log();
    let mut it = watched
        .split_whitespace()
        .map(|n| n.parse::<u64>().expect("number"));
    let (bytes, worst_gap_ms) = (it.next().expect("bytes"), it.next().expect("gap"));
    let status = gw.status();
    eprintln!(
        "flood: {sent} datagrams; download {bytes} B, longest gap {worst_gap_ms} ms; \
         {tries} connections of host 2; top hosts {}",
        status["top_hosts"]
    );
    assert!(
        sent > 10_000,
        "the flood was too weak to prove anything: {sent}"
    );
    assert!(
        worst_gap_ms < 1000,
        "the download stalled for {worst_gap_ms} ms"
    );
    assert!(bytes >= 5_000_000, "the download got only {bytes} bytes");
    let top = &status["top_hosts"][0];
    assert_eq!(top["address"], client, "{status}");
    assert!(top["refused"].as_u64().expect("refused") > 0);
    assert!(top["flows"].as_u64().expect("flows") <= 256 + 16, "{top}");
    assert!(gw.reason("host_quota") > 0);
}

#[test]
fn a_flooding_host_is_held_to_its_quota_and_nobody_else_notices() {
    flooding_host_held_to_its_quota(false);
}

#[test]
fn the_quota_holds_with_checksum_offload_on_too() {
    flooding_host_held_to_its_quota(true);
}
