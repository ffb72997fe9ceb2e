//! Where the XDP fast path runs (`xdp = "auto" | "native" | "off"`) and
//! which devices it may redirect to.
use std::collections::{BTreeMap, HashMap};

use anyhow::Context as _;
use futures::TryStreamExt as _;
use rtnetlink::packet_route::tc::TcAttribute;

use crate::{config::XdpMode, netinfo::Snapshot};

/// Drivers whose native XDP runs on the frames of their receive rings,
/// before any skb: there, XDP saves the skb and pays (DESIGN.md §11,
/// BENCHMARKS.md). veth and tun are left out on purpose: they hand XDP an
/// skb turned into a frame and back, which costs more than TC.
const PAYING_DRIVERS: &[&str] = &[
    "atlantic",
    "bnxt_en",
    "dpaa2-eth",
    "ena",
    "enetc",
    "fec",
    "hv_netvsc",
    "i40e",
    "ice",
    "igb",
    "igc",
    "ixgbe",
    "ixgbevf",
    "mlx4_en",
    "mlx5_core",
    "mvneta",
    "mvpp2",
    "nfp",
    "qede",
    "sfc",
    "stmmac",
    "virtio_net",
];

/// What the daemon does with XDP on one interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Placement {
    /// Attach in native mode (failing loudly if the driver cannot).
    Attach,
    /// Leave it to TC, for this reason.
    Skip(String),
}

/// Where XDP goes under `mode` on an interface with `driver` (ethtool's
/// name; None if unknown) and an Ethernet header unless `l3`.
pub fn place(mode: XdpMode, l3: bool, driver: Option<&str>) -> Placement {
    let skip = |why: &str| Placement::Skip(why.to_owned());
    match mode {
        XdpMode::Off => skip("xdp = \"off\""),
        _ if l3 => skip("no Ethernet header"),
        XdpMode::Native => Placement::Attach,
        XdpMode::Auto => match driver {
            Some(d) if PAYING_DRIVERS.contains(&d) => Placement::Attach,
            Some("veth") => {
                skip("veth: XDP there costs more than TC (set xdp = \"native\" to force it)")
            }
            Some(d) => Placement::Skip(format!(
                "driver {d} is not known to run XDP natively on raw frames"
            )),
            None => skip("driver unknown"),
        },
    }
}

/// Drops the placements (name -> index and placement) of interfaces that
/// are gone or came back with another index: a gone one's old index may
/// be another device's next.
pub fn forget_gone<P>(placed: &mut BTreeMap<String, (u32, P)>, snap: &Snapshot) {
    placed.retain(|name, (index, _)| snap.get(name).is_some_and(|i| i.index == *index));
}

/// Queueing disciplines that shape nothing: the kernel's defaults. An XDP
/// redirect skips the qdisc, so a device with any other one (htb, tbf,
/// cake, netem, ...) takes its packets through TC and the stack.
const PLAIN_QDISCS: &[&str] = &["noqueue", "pfifo_fast", "fq_codel", "mq"];

/// Whether XDP may redirect to a device whose egress qdiscs are `kinds`;
/// Err names the one in the way.
pub fn redirect_allowed(kinds: &[String]) -> Result<(), String> {
    match kinds.iter().find(|k| !PLAIN_QDISCS.contains(&k.as_str())) {
        Some(k) => Err(format!("qdisc {k} would be bypassed")),
        None => Ok(()),
    }
}

/// Every device's egress qdisc kinds (the ingress and clsact hooks left
/// out), by ifindex.
pub async fn qdiscs(handle: &rtnetlink::Handle) -> anyhow::Result<HashMap<u32, Vec<String>>> {
    let mut found: HashMap<u32, Vec<String>> = HashMap::new();
    let mut dump = handle.qdisc().get().execute();
    while let Some(msg) = dump.try_next().await.context("listing qdiscs")? {
        for a in &msg.attributes {
            if let TcAttribute::Kind(k) = a
                && k != "ingress"
                && k != "clsact"
            {
                found
                    .entry(msg.header.index as u32)
                    .or_default()
                    .push(k.clone());
            }
        }
    }
    Ok(found)
}

/// `ifname`'s driver as ethtool names it (`ETHTOOL_GDRVINFO`).
pub fn driver(ifname: &str) -> Option<String> {
    const ETHTOOL_GDRVINFO: u32 = 3;
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    /// `struct ethtool_drvinfo` (uapi `ethtool.h`).
    #[repr(C)]
    struct DrvInfo {
        cmd: u32,
        driver: [u8; 32],
        rest: [u8; 32 * 4 + 12 + 4 * 5],
    }
    let mut info = DrvInfo {
        cmd: ETHTOOL_GDRVINFO,
        driver: [0; 32],
        rest: [0; 32 * 4 + 12 + 4 * 5],
    };
    let name = ifname.as_bytes();
    if name.len() >= libc::IFNAMSIZ {
        return None;
    }
    // SAFETY: plain C structs, zero is valid; the socket is closed below.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(name) {
        *d = *s as libc::c_char;
    }
    req.ifr_ifru.ifru_data = (&mut info as *mut DrvInfo).cast();
    // SAFETY: a datagram socket for the ioctl, closed right after.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: `req` points at `info`, both alive for the call.
    let ret = unsafe { libc::ioctl(fd, SIOCETHTOOL, &mut req) };
    // SAFETY: `fd` is ours.
    unsafe { libc::close(fd) };
    if ret != 0 {
        return None;
    }
    let end = info.driver.iter().position(|b| *b == 0).unwrap_or(32);
    Some(String::from_utf8_lossy(&info.driver[..end]).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_attaches_on_drivers_that_run_xdp_on_raw_frames_only() {
        for d in ["i40e", "ice", "mlx5_core", "virtio_net", "bnxt_en"] {
            assert_eq!(
                place(XdpMode::Auto, false, Some(d)),
                Placement::Attach,
                "{d}"
            );
        }
        for d in [
            Some("veth"),
            Some("tun"),
            Some("bridge"),
            Some("8021q"),
            None,
        ] {
            assert!(
                matches!(place(XdpMode::Auto, false, d), Placement::Skip(_)),
                "{d:?}"
            );
        }
    }

    #[test]
    fn native_attaches_everywhere_with_an_ethernet_header_and_off_nowhere() {
        assert_eq!(
            place(XdpMode::Native, false, Some("veth")),
            Placement::Attach
        );
        assert_eq!(place(XdpMode::Native, false, None), Placement::Attach);
        assert!(matches!(
            place(XdpMode::Native, true, Some("tun")),
            Placement::Skip(_)
        ));
        assert!(matches!(
            place(XdpMode::Auto, true, Some("i40e")),
            Placement::Skip(_)
        ));
        assert!(matches!(
            place(XdpMode::Off, false, Some("i40e")),
            Placement::Skip(_)
        ));
    }

    #[test]
    fn a_shaping_qdisc_keeps_redirects_off_the_device() {
        let kinds = |k: &[&str]| k.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(redirect_allowed(&[]).is_ok());
        assert!(redirect_allowed(&kinds(&["mq", "fq_codel", "fq_codel"])).is_ok());
        assert!(redirect_allowed(&kinds(&["noqueue"])).is_ok());
        let err = redirect_allowed(&kinds(&["htb", "fq_codel"])).expect_err("htb shapes");
        assert!(err.contains("htb"), "{err}");
        assert!(redirect_allowed(&kinds(&["mq", "tbf"])).is_err());
        assert!(redirect_allowed(&kinds(&["cake"])).is_err());
    }

    #[test]
    fn placements_of_gone_or_renumbered_interfaces_are_forgotten() {
        let iface = |name: &str, index| crate::netinfo::Interface {
            index,
            name: name.into(),
            up: true,
            mtu: 1500,
            l3: false,
            mac: None,
            addrs: Vec::new(),
        };
        let snap: Snapshot = [iface("lan0", 4), iface("wanx", 9)]
            .into_iter()
            .map(|i| (i.name.clone(), i))
            .collect();
        let mut placed: BTreeMap<String, (u32, ())> = [
            ("lan0".to_string(), (4, ())),
            ("wanx".to_string(), (5, ())),
            ("wany".to_string(), (6, ())),
        ]
        .into();
        forget_gone(&mut placed, &snap);
        assert_eq!(placed, [("lan0".to_string(), (4, ()))].into());
    }

    #[test]
    fn a_missing_or_overlong_interface_has_no_driver() {
        assert_eq!(driver("mh-no-such-if0"), None);
        assert_eq!(driver("a-name-longer-than-ifnamsiz"), None);
    }
}
