//! `cargo xtask demo` (and `run` without arguments): the seed's topology in
//! network namespaces (a LAN client, a gateway with two uplinks, two ISPs
//! that drop spoofed sources, a server behind both), the gateway running
//! in it, some traffic, and what to try next. Everything is removed on
//! exit.
use std::time::{Duration, Instant};

use anyhow::Result;
use testbed::{
    Gateway, IF_WANX, INET_SERVICE, Topology, UPLINK_X_ADDR, config_for, tcp_peer_server,
    tcp_seen_as, udp_peer_server, udp_seen_as,
};

pub struct Options {
    /// Stop after this long instead of waiting for Ctrl-C.
    pub seconds: Option<u64>,
}

pub fn run(bin: &std::path::Path, opts: Options) -> Result<()> {
    crate::util::catch_stop_signals();
    // SAFETY: single-threaded at this point.
    unsafe { std::env::set_var("MULTIHOME_BIN", bin) };
    println!("building the demo topology in network namespaces...");
    let t = Topology::standard();
    let tcp = tcp_peer_server(&t.inet, INET_SERVICE, 8000);
    let udp = udp_peer_server(&t.inet, INET_SERVICE, 8001);
    let config = config_for(&t, [1, 2], "");
    let gw = Gateway::start(&t.gw, &config);
    let pin = gw.pin_dir().display().to_string();
    let b = bin.display();
    let intro = format!(
        "=== multihome demo ===\n\
         client {client} (198.18.1.2) -> gateway {gwns} -> ISP X {ispx} / ISP Y {ispy} -> server {inet} ({INET_SERVICE})\n\
         uplink x has weight 1, uplink y weight 2; the client keeps opening new flows.\n\
         Try, in another terminal:\n\
         \x20 ip -n {gwns} link set {IF_WANX} down        # kill uplink x: new flows go to y\n\
         \x20 ip -n {gwns} link set {IF_WANX} up\n\
         \x20 ip -n {gwns} addr replace 198.18.11.2/24 dev {IF_WANX}   # renumber uplink x\n\
         \x20 {b} uplink set-weight --pin-dir {pin} y 5\n\
         \x20 {b} conns --pin-dir {pin}\n\
         \x20 bpftool map dump pinned {pin}/CONN_FWD\n\
         Ctrl-C stops the demo and removes everything.\n",
        client = t.client.name(),
        gwns = t.gw.name(),
        ispx = t.ispx.name(),
        ispy = t.ispy.name(),
        inet = t.inet.name(),
    );
    println!("{intro}\nconfig:\n{config}");
    let started = Instant::now();
    let running = || {
        !crate::util::stopping()
            && opts
                .seconds
                .is_none_or(|s| started.elapsed() < Duration::from_secs(s))
    };
    std::thread::scope(|scope| {
        // The client opens new flows all along, so that top has rates to show.
        scope.spawn(|| {
            while running() {
                for _ in 0..10 {
                    let _ = udp_seen_as(&t.client, None, udp.addr());
                    let _ = tcp_seen_as(&t.client, None, tcp.addr());
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        while running() {
            // One screen of `multihome top` (a second of measuring), then
            // the way to play with it.
            let top = gw.cli(&["top", "--iterations", "1"]);
            print!("{}", String::from_utf8_lossy(&top.stdout));
            println!("\n{intro}");
        }
    });
    println!("\nstopping: removing the gateway, namespaces and pins...");
    let spoofed = t.spoofed_drops();
    drop(gw);
    drop(t);
    println!("done (the ISPs dropped {spoofed} spoofed packets; {UPLINK_X_ADDR} is uplink x).");
    Ok(())
}
