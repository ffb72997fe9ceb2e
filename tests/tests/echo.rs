//! The gateway's own pings and the LAN's share the uplink addresses: no
//! helper finds ping sockets, and Linux ping sockets may use any echo
//! identifier, so replies must never be handed to the wrong one.
use std::time::Duration;

use testbed::*;

const ID: &str = "4242";
const COUNT: &str = "10";

fn allow_ping_sockets(ns: &NetNs) {
    // The kernel reads it back tab-separated.
    ns.sysctl("net.ipv4.ping_group_range", "0\t2147483647");
}

fn ping_cmd(src: &str) -> Vec<String> {
    [
        PYTHON,
        "-u",
        &script("ping_id.py"),
        src,
        &INET_SERVICE.to_string(),
        ID,
        COUNT,
        "0.2",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn answered(out: &str) -> u32 {
    out.trim()
        .parse()
        .unwrap_or_else(|_| panic!("ping_id printed {out:?}"))
}

/// A LAN host and the gateway ping one target with one id, each side
/// starting first once; `offloads`: checksum offload on, the real case.
fn both_pingers_get_every_reply(offloads: bool) {
    let t = Topology::standard();
    if offloads {
        t.enable_checksum_offloads();
    }
    allow_ping_sockets(&t.client);
    allow_ping_sockets(&t.gw);
    // Every LAN flow on x, whose address the gateway pings from too.
    let gw = Gateway::start(&t.gw, &config_for(&t, [1, 0], ""));
    for first in ["lan", "gateway"] {
        let gw_cmd = ping_cmd(&UPLINK_X_ADDR.to_string());
        let lan_cmd = ping_cmd(&CLIENT_ADDR.to_string());
        let (gw_cmd, lan_cmd): (Vec<&str>, Vec<&str>) = (
            gw_cmd.iter().map(String::as_str).collect(),
            lan_cmd.iter().map(String::as_str).collect(),
        );
        let (own, lan) = if first == "lan" {
            let lan = t.client.spawn(&lan_cmd);
            std::thread::sleep(Duration::from_millis(300));
            let own = t.gw.exec_stdout(&gw_cmd);
            (own, lan)
        } else {
            let own = t.gw.spawn(&gw_cmd);
            std::thread::sleep(Duration::from_millis(300));
            let lan_out = t.client.exec_stdout(&lan_cmd);
            own.wait_timeout(Duration::from_secs(10));
            assert_eq!(answered(&lan_out), 10, "the LAN host ({first} first)");
            assert_eq!(answered(&own.log()), 10, "the gateway ({first} first)");
            continue;
        };
        lan.wait_timeout(Duration::from_secs(10));
        assert_eq!(answered(&own), 10, "the gateway ({first} first)");
        assert_eq!(answered(&lan.log()), 10, "the LAN host ({first} first)");
    }
    assert!(gw.reason("host_echo") >= 20, "{}", gw.status()["drops"]);
    assert_eq!(t.foreign_sources(), 0);
}

#[test]
fn a_lan_host_and_the_gateway_pinging_one_target_with_one_id_both_get_every_reply() {
    both_pingers_get_every_reply(false);
}

#[test]
fn both_get_every_reply_with_checksum_offload_on_too() {
    both_pingers_get_every_reply(true);
}
