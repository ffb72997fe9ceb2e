//! Provoked challenge ACKs: a TCP connection whose LAN host only receives
//! (a download, a quiet SSH session) sends nothing the datapath could
//! answer with an RST once its uplink is gone. A SYN on the connection's
//! tuple, as if from the remote, makes the host answer with an ACK that
//! carries the sequence number it expects (RFC 5961 §4.2; RFC 9293
//! §3.10.7.4 for an unacceptable segment). That ACK is a LAN packet of the
//! flow, which the datapath then turns into the remote's RST. The daemon
//! sends the SYNs: BPF programs cannot send on their own.
use std::{
    io,
    net::Ipv4Addr,
    os::fd::{FromRawFd as _, OwnedFd},
};

use anyhow::Context as _;
use multihome_common::{
    FLOW_FIN_IN, FLOW_FIN_OUT, FLOW_RST, FLOW_RST_IN, FLOW_SEEN_REPLY, FlowFwd, FlowKey,
    IPPROTO_TCP,
};

use crate::{maps::Maps, mapwalk};

/// TCP header flags.
const SYN: u8 = 0x02;

/// Sends a SYN to the LAN host of every answered, open TCP flow that
/// `doomed` picks, from the flow's remote. Returns how many went out. The
/// flows' uplink must already be published as down, so that the ACKs the
/// SYNs provoke are answered with RSTs.
///
/// # Errors
/// Reading the connection map, or opening the raw socket (needs
/// CAP_NET_RAW); a SYN that cannot be sent is skipped.
pub fn provoke(
    maps: &Maps,
    mut doomed: impl FnMut(&FlowKey, &FlowFwd) -> bool,
) -> anyhow::Result<usize> {
    let closed = FLOW_FIN_OUT | FLOW_FIN_IN | FLOW_RST | FLOW_RST_IN;
    let mut targets = Vec::new();
    mapwalk::for_each(&maps.fwd()?, |k, f| {
        if k.proto == IPPROTO_TCP
            && f.flags & FLOW_SEEN_REPLY != 0
            && f.flags & closed == 0
            && doomed(&k, &f)
        {
            targets.push(k);
        }
    })
    .context("reading CONN_FWD")?;
    if targets.is_empty() {
        return Ok(0);
    }
    let sock = raw_socket().context("opening a raw socket for challenge SYNs")?;
    let sent = targets
        .iter()
        .filter(|k| crate::health::send_to(&sock, &syn_for(k), host(k)).is_ok())
        .count();
    Ok(sent)
}

fn host(k: &FlowKey) -> Ipv4Addr {
    Ipv4Addr::from(u32::from_be(k.saddr_be))
}

/// The SYN the remote of flow `k` would send to its LAN host: IPv4 header
/// (its checksum left to the kernel) and a 20-byte TCP header.
fn syn_for(k: &FlowKey) -> [u8; 40] {
    let mut p = [0u8; 40];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&40u16.to_be_bytes());
    p[6] = 0x40; // DF
    p[8] = 64;
    p[9] = IPPROTO_TCP;
    p[12..16].copy_from_slice(&k.daddr_be.to_ne_bytes());
    p[16..20].copy_from_slice(&k.saddr_be.to_ne_bytes());
    let tcp = &mut p[20..];
    tcp[0..2].copy_from_slice(&k.dport_be.to_ne_bytes());
    tcp[2..4].copy_from_slice(&k.sport_be.to_ne_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = SYN;
    tcp[14..16].copy_from_slice(&1024u16.to_be_bytes());
    let mut pseudo = Vec::with_capacity(32);
    pseudo.extend_from_slice(&k.daddr_be.to_ne_bytes());
    pseudo.extend_from_slice(&k.saddr_be.to_ne_bytes());
    pseudo.extend_from_slice(&[0, IPPROTO_TCP, 0, 20]);
    pseudo.extend_from_slice(tcp);
    let sum = crate::health::checksum(&pseudo);
    p[36..38].copy_from_slice(&sum.to_be_bytes());
    p
}

/// A raw IPv4 socket that sends whole packets (`IPPROTO_RAW` implies
/// `IP_HDRINCL`).
fn raw_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the fd is owned right below.
    let fd = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::IPPROTO_RAW,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_syn_comes_from_the_remote_to_the_lan_host_with_a_valid_checksum() {
        let k = FlowKey {
            saddr_be: u32::from(Ipv4Addr::new(198, 18, 1, 2)).to_be(),
            daddr_be: u32::from(Ipv4Addr::new(198, 19, 0, 10)).to_be(),
            sport_be: 40000u16.to_be(),
            dport_be: 443u16.to_be(),
            proto: IPPROTO_TCP,
            _pad0: 0,
            _pad1: 0,
        };
        let p = syn_for(&k);
        assert_eq!(&p[12..16], &[198, 19, 0, 10], "from the remote");
        assert_eq!(&p[16..20], &[198, 18, 1, 2], "to the LAN host");
        assert_eq!(u16::from_be_bytes([p[20], p[21]]), 443);
        assert_eq!(u16::from_be_bytes([p[22], p[23]]), 40000);
        assert_eq!(p[33], SYN);
        // The sum over pseudo-header and segment, checksum included, is 0.
        let mut all = Vec::new();
        all.extend_from_slice(&p[12..20]);
        all.extend_from_slice(&[0, IPPROTO_TCP, 0, 20]);
        all.extend_from_slice(&p[20..]);
        assert_eq!(crate::health::checksum(&all), 0);
        assert_eq!(host(&k), Ipv4Addr::new(198, 18, 1, 2));
    }
}
