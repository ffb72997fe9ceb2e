//! TUN devices and a userspace relay joining two of them into an L3 link.

use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;

use crate::netns::NetNs;

#[repr(C)]
struct IfReqFlags {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Creates TUN device `name` (IFF_TUN | IFF_NO_PI) in `ns` and returns its
/// fd; the device exists while the fd is open. `/dev/net/tun` is opened and
/// configured while the current thread is inside `ns`.
pub fn create_tun(ns: &NetNs, name: &str) -> OwnedFd {
    assert!(
        name.len() < libc::IFNAMSIZ,
        "interface name too long: {name}"
    );
    let _in = ns.enter();
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .unwrap_or_else(|e| panic!("cannot open /dev/net/tun (is the tun module available?): {e}"));
    let mut req = IfReqFlags {
        name: [0; libc::IFNAMSIZ],
        flags: (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads/writes a struct ifreq; IfReqFlags has its layout.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) };
    if rc != 0 {
        panic!(
            "[netns {}] TUNSETIFF {name}: {}",
            ns.name(),
            std::io::Error::last_os_error()
        );
    }
    file.into()
}

/// Waits up to `timeout_ms` for `fd` to become readable.
pub(crate) fn poll_readable(fd: RawFd, timeout_ms: i32) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
    n > 0 && pfd.revents & libc::POLLIN != 0
}

/// Copies packets between two TUN fds in both directions (one thread each)
/// until dropped; dropping stops and joins the threads and closes the fds,
/// which removes the devices.
#[derive(Debug)]
pub struct TunRelay {
    stop: Arc<AtomicBool>,
    counts: Arc<[AtomicU64; 2]>,
    threads: Vec<JoinHandle<()>>,
}

impl TunRelay {
    pub fn start(a: OwnedFd, b: OwnedFd) -> TunRelay {
        let stop = Arc::new(AtomicBool::new(false));
        let counts = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
        let a = Arc::new(a);
        let b = Arc::new(b);
        let threads = [(a.clone(), b.clone(), 0), (b, a, 1)]
            .into_iter()
            .map(|(src, dst, dir)| {
                let stop = stop.clone();
                let counts = counts.clone();
                std::thread::Builder::new()
                    .name(format!("tun-relay-{dir}"))
                    .spawn(move || relay(&src, &dst, &stop, &counts[dir]))
                    .expect("spawn tun relay thread")
            })
            .collect();
        TunRelay {
            stop,
            counts,
            threads,
        }
    }

    /// Packets copied from `a` to `b` so far.
    pub fn a_to_b(&self) -> u64 {
        self.counts[0].load(Ordering::Relaxed)
    }

    /// Packets copied from `b` to `a` so far.
    pub fn b_to_a(&self) -> u64 {
        self.counts[1].load(Ordering::Relaxed)
    }
}

fn relay(src: &OwnedFd, dst: &OwnedFd, stop: &AtomicBool, count: &AtomicU64) {
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::Relaxed) {
        if !poll_readable(src.as_raw_fd(), 50) {
            continue;
        }
        loop {
            // SAFETY: buf is valid for buf.len() bytes.
            let n = unsafe { libc::read(src.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                break; // EAGAIN (drained) or error
            }
            // A failed write (device down, ...) drops the packet like a wire would.
            // SAFETY: the first n bytes of buf were just filled.
            let w = unsafe { libc::write(dst.as_raw_fd(), buf.as_ptr().cast(), n as usize) };
            if w == n {
                count.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

impl Drop for TunRelay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
