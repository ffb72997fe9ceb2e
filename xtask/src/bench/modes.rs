//! Setting the gateway up in each [`Mode`]. Every mode starts from the
//! freshly built [`Net`]: addresses and connected routes only.
use testbed::{Gateway, NetNs, route};

use super::{
    results::Mode,
    topo::{LAN6, Net, X_ADDR, X_GW, X_GW6, X_PREFIX6, Y_ADDR, Y_GW, Y_GW6, Y_PREFIX6, nft},
};

/// Flows the multihome map holds: 2^21, a power of two, so the hash has
/// one bucket per entry (its memory per flow is what the scale test
/// reports), and large enough that 1M live flows stay under the reaper's
/// crowded mark (nine tenths), past which it evicts flows that never saw
/// a reply: the bench's sink answers none.
pub const MAX_FLOWS: u64 = 1 << 21;

/// Keeps the mode running; for multihome, the daemon.
pub struct Running<'a> {
    pub gateway: Option<Gateway<'a>>,
}

pub fn start(mode: Mode, net: &Net) -> Running<'_> {
    let gw = &net.gw;
    if net.ipv6 {
        start6(mode, net);
    }
    match mode {
        Mode::Plain => route(gw, &format!("default via {X_GW} dev wanx")),
        Mode::Seed => {
            seed_routing(gw);
            seed_iptables(gw);
        }
        Mode::Nft => {
            seed_routing(gw);
            seed_nft(gw);
        }
        Mode::Multihome | Mode::MultihomeXdp => {
            if mode == Mode::MultihomeXdp {
                net.enable_gro();
            }
            let mut config = multihome_config(mode);
            if net.ipv6 {
                config = with_ipv6(&config);
            }
            return Running {
                gateway: Some(Gateway::start(gw, &config)),
            };
        }
    }
    Running { gateway: None }
}

/// multihome's config with `rules` policy rules: all but the last match
/// no bench packet (TCP to other prefixes and ports), the last sends the
/// bench's UDP to a policy over both uplinks, so that every new flow
/// does every lookup and the first match is the last rule.
pub fn multihome_config_with_rules(mode: Mode, rules: usize) -> String {
    let mut c = multihome_config(mode);
    if rules == 0 {
        return c;
    }
    c += "\n[[policy]]\nname = \"bench\"\ntiers = [[\"x\", \"y\"]]\n";
    for i in 0..rules - 1 {
        c += &format!(
            "\n[[rule]]\ndst = [\"198.19.{}.0/24\"]\nproto = \"tcp\"\ndport = [\"{}\"]\npolicy = \"bench\"\n",
            100 + i % 100,
            1000 + i
        );
    }
    c + "\n[[rule]]\nproto = \"udp\"\npolicy = \"bench\"\n"
}

/// Rewrites the running daemon's config with `rules` rules and reloads it.
pub fn reload(gw: &Gateway, mode: Mode, rules: usize) -> anyhow::Result<()> {
    std::fs::write(gw.config_path(), multihome_config_with_rules(mode, rules))?;
    let out = gw.cli(&["reload"]);
    if !out.status.success() {
        anyhow::bail!(
            "multihome reload: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// multihome's config for `mode`: XDP as configured by default, or
/// forced native.
pub fn multihome_config(mode: Mode) -> String {
    let xdp = if mode == Mode::MultihomeXdp {
        "native"
    } else {
        "auto"
    };
    format!(
        "xdp = \"{xdp}\"\nlan = [\"lan0\"]\n\
         \n[[uplink]]\nname = \"x\"\ninterface = \"wanx\"\ngateway = \"{X_GW}\"\nweight = 1\n\
         \n[[uplink]]\nname = \"y\"\ninterface = \"wany\"\ngateway = \"{Y_GW}\"\nweight = 1\n\
         \n[nat]\nmax_flows = {MAX_FLOWS}\nmax_flows_per_host = {MAX_FLOWS}\n"
    )
}

/// The IPv6 side of `mode` in an IPv6 [`Net`]: plain routing's default
/// route, or the seed recipe in nftables with `snat prefix` (NPTv6's
/// stateful twin: conntrack maps the LAN prefix onto the uplink's); the
/// seed's iptables recipe is IPv4 only, and multihome's config says it
/// all ([`with_ipv6`]).
fn start6(mode: Mode, net: &Net) {
    let gw = &net.gw;
    match mode {
        Mode::Plain => testbed::ip6(gw, &format!("route add default via {X_GW6} dev wanx")),
        Mode::Nft => {
            testbed::ip6(
                gw,
                &format!("route add table 1 default via {X_GW6} dev wanx"),
            );
            testbed::ip6(
                gw,
                &format!("route add table 2 default via {Y_GW6} dev wany"),
            );
            testbed::ip6(
                gw,
                &format!(
                    "route add default nexthop via {X_GW6} dev wanx nexthop via {Y_GW6} dev wany"
                ),
            );
            testbed::ip6(gw, "rule add fwmark 1 lookup 1");
            testbed::ip6(gw, "rule add fwmark 2 lookup 2");
            nft(
                gw,
                &seed_ruleset(
                    "ip6",
                    &format!("snat ip6 prefix to {X_PREFIX6}"),
                    &format!("snat ip6 prefix to {Y_PREFIX6}"),
                ),
            );
        }
        Mode::Seed | Mode::Multihome | Mode::MultihomeXdp => {}
    }
}

/// `config` with IPv6: the LAN's ULA mapped onto both uplinks' prefixes.
fn with_ipv6(config: &str) -> String {
    config
        .replacen(
            "lan = [",
            &format!("lan_prefixes6 = [\"{LAN6}\"]\nlan = ["),
            1,
        )
        .replacen(
            "name = \"x\"\n",
            &format!("name = \"x\"\nprefix6 = \"{X_PREFIX6}\"\ngateway6 = \"{X_GW6}\"\n"),
            1,
        )
        .replacen(
            "name = \"y\"\n",
            &format!("name = \"y\"\nprefix6 = \"{Y_PREFIX6}\"\ngateway6 = \"{Y_GW6}\"\n"),
            1,
        )
}

fn ip(ns: &NetNs, args: &str) {
    let mut cmd = vec!["ip"];
    cmd.extend(args.split_whitespace());
    ns.exec(&cmd);
}

/// The seed's rules and routes (section 4.2.5, routers instead of PPP),
/// plus the one fix it needs to work at all: without
/// `lookup main suppress_prefixlength 0` first, replies restored to mark
/// 1 or 2 follow that uplink's default route back out instead of to the
/// LAN. It takes priority 0 because the recipe's fwmark rules, added
/// without a priority, get 0 from the kernel (one below the first rule
/// after `local`). The seed's second fwmark rule reads
/// `fwmark 1 lookup 2`, a typo kept as written: mark-2 packets then use
/// the multipath route, which hashes them onto the same uplink again.
fn seed_routing(gw: &NetNs) {
    ip(gw, "rule add prio 0 lookup main suppress_prefixlength 0");
    ip(gw, &format!("rule add prio 1 from {X_ADDR} lookup 1"));
    ip(gw, &format!("rule add prio 2 from {Y_ADDR} lookup 2"));
    ip(
        gw,
        &format!("route add table 1 default via {X_GW} dev wanx"),
    );
    ip(
        gw,
        &format!("route add table 2 default via {Y_GW} dev wany"),
    );
    ip(
        gw,
        &format!("route add default nexthop via {X_GW} dev wanx nexthop via {Y_GW} dev wany"),
    );
    ip(gw, "rule add fwmark 1 lookup 1");
    ip(gw, "rule add fwmark 1 lookup 2");
}

fn seed_iptables(gw: &NetNs) {
    let rules = [
        "-t mangle -A POSTROUTING -o wanx -m state --state NEW -j MARK --set-mark 1".to_string(),
        "-t mangle -A POSTROUTING -o wany -m state --state NEW -j MARK --set-mark 2".to_string(),
        "-t mangle -A POSTROUTING -m state --state NEW -j CONNMARK --save-mark".to_string(),
        "-t mangle -A PREROUTING -j CONNMARK --restore-mark".to_string(),
        format!("-t nat -A POSTROUTING -m mark --mark 1 -j SNAT --to-source {X_ADDR}"),
        format!("-t nat -A POSTROUTING -m mark --mark 2 -j SNAT --to-source {Y_ADDR}"),
    ];
    for rule in rules {
        let mut cmd = vec!["iptables", "-w"];
        cmd.extend(rule.split_whitespace());
        gw.exec(&cmd);
    }
}

/// The same recipe in nftables: ct mark instead of CONNMARK.
fn seed_nft(gw: &NetNs) {
    let (x, y) = (format!("snat to {X_ADDR}"), format!("snat to {Y_ADDR}"));
    nft(gw, &seed_ruleset("ip", &x, &y));
}

/// The seed recipe as an nftables table of `family`: new connections
/// marked by their uplink, the mark kept in conntrack, and each mark's
/// packets given `snat_x` or `snat_y`.
fn seed_ruleset(family: &str, snat_x: &str, snat_y: &str) -> String {
    format!(
        "table {family} seed {{\n\
         chain pre {{ type filter hook prerouting priority mangle; meta mark set ct mark; }}\n\
         chain post {{ type filter hook postrouting priority mangle;\n\
           ct state new oifname \"wanx\" meta mark set 1\n\
           ct state new oifname \"wany\" meta mark set 2\n\
           ct state new ct mark set meta mark\n\
         }}\n\
         chain nat {{ type nat hook postrouting priority srcnat;\n\
           meta mark 1 {snat_x}\n\
           meta mark 2 {snat_y}\n\
         }}\n\
         }}\n"
    )
}
