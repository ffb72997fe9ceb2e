//! Whole-map reads with `BPF_MAP_LOOKUP_BATCH`: one syscall per few thousand
//! entries, where `HashMap::iter` makes two per entry. Kernels without it
//! get `iter`.
use std::{
    io,
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd},
    sync::atomic::{AtomicBool, Ordering},
};

use anyhow::anyhow;
use aya::{
    Pod,
    maps::{HashMap, IterableMap as _, MapData},
};

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
/// The kernel's internal "not supported", which the bpf syscall lets out.
const ENOTSUPP: i32 = 524;
/// Entries asked for per call.
const BATCH: usize = 4096;
/// A bucket bigger than the batch (ENOSPC) grows the batch up to this.
const MAX_BATCH: usize = 1 << 20;
/// Calls in a row that may fail on a contended bucket lock.
const MAX_RETRIES: u32 = 16;

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// The buffers of one call.
struct Batch {
    /// Where to resume, from the previous call; `None` starts the walk.
    resume: Option<Vec<u8>>,
    /// Where the kernel writes the next resume token.
    next: Vec<u8>,
    keys: Vec<u8>,
    values: Vec<u8>,
    /// In: room, in entries. Out: entries written.
    count: u32,
}

/// `BPF_MAP_LOOKUP_ELEM`'s part of `union bpf_attr`.
#[repr(C)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// The first 32-bit word of element 0 of an array map, whatever its value
/// size: how an older layout's `SETTINGS` tells its version.
pub fn first_word(map: &aya::maps::MapData) -> io::Result<u32> {
    let size = map.info().map_err(io::Error::other)?.value_size() as usize;
    if size < 4 {
        return Err(io::Error::other(format!(
            "values of {size} bytes hold no word"
        )));
    }
    let key = 0u32;
    let mut value = vec![0u8; size];
    let attr = ElemAttr {
        map_fd: map.fd().as_fd().as_raw_fd() as u32,
        _pad: 0,
        key: &raw const key as u64,
        value: value.as_mut_ptr() as u64,
        flags: 0,
    };
    // SAFETY: `key` and `value` outlive the call and `value` holds the
    // map's value size, all the kernel writes.
    let r = unsafe { libc::syscall(libc::SYS_bpf, 1, &raw const attr, size_of::<ElemAttr>()) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(u32::from_ne_bytes([value[0], value[1], value[2], value[3]]))
}

/// Why a walk stopped short.
enum Stop {
    /// No batch lookup for this map; nothing was visited.
    Unsupported(io::Error),
    Failed(anyhow::Error),
}

fn lookup_batch(fd: BorrowedFd<'_>, b: &mut Batch) -> io::Result<()> {
    let mut attr = BatchAttr {
        in_batch: b.resume.as_ref().map_or(0, |t| t.as_ptr() as u64),
        out_batch: b.next.as_mut_ptr() as u64,
        keys: b.keys.as_mut_ptr() as u64,
        values: b.values.as_mut_ptr() as u64,
        count: b.count,
        map_fd: fd.as_raw_fd() as u32,
        ..Default::default()
    };
    // SAFETY: the buffers outlive the call; `walk` sizes them for `count`
    // entries of the map's key and value sizes (aya checked those against
    // K and V) and the token for at least a key, and the kernel writes no
    // more than that.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_LOOKUP_BATCH,
            &raw mut attr,
            size_of::<BatchAttr>(),
        )
    };
    let err = (r < 0).then(io::Error::last_os_error);
    b.count = attr.count;
    err.map_or(Ok(()), Err)
}

/// The walk itself, over raw bytes, with the syscall passed in: `lookup`
/// fills `keys` and `values` with up to `count` entries and sets `count`.
/// ENOENT ends the walk (its `count` entries still count); ENOSPC, a bucket
/// bigger than the batch, grows the batch; a busy bucket lock is retried
/// from where the kernel stopped.
fn walk(
    key_size: usize,
    value_size: usize,
    mut size: usize,
    mut lookup: impl FnMut(&mut Batch) -> io::Result<()>,
    mut visit: impl FnMut(&[u8], &[u8]),
) -> Result<(), Stop> {
    assert!(key_size > 0 && value_size > 0 && size > 0);
    let mut b = Batch {
        resume: None,
        next: vec![0; key_size.max(8)],
        keys: Vec::new(),
        values: Vec::new(),
        count: 0,
    };
    let mut retries = 0;
    loop {
        b.keys.resize(size * key_size, 0);
        b.values.resize(size * value_size, 0);
        b.count = size as u32;
        let res = lookup(&mut b);
        let errno = match &res {
            Ok(()) => 0,
            Err(e) => e.raw_os_error().unwrap_or(-1),
        };
        match errno {
            0 | libc::ENOENT | libc::EBUSY | libc::EAGAIN | libc::EDEADLK | libc::ETIMEDOUT => {
                let n = b.count as usize;
                if n > size {
                    return Err(Stop::Failed(anyhow!(
                        "BPF_MAP_LOOKUP_BATCH returned {n} entries for room for {size}"
                    )));
                }
                let keys = b.keys.chunks_exact(key_size);
                for (k, v) in keys.zip(b.values.chunks_exact(value_size)).take(n) {
                    visit(k, v);
                }
                match errno {
                    0 => retries = 0,
                    libc::ENOENT => return Ok(()),
                    _ if retries < MAX_RETRIES => retries += 1,
                    _ => return Err(failed(res)),
                }
                b.resume
                    .get_or_insert_with(|| vec![0; b.next.len()])
                    .copy_from_slice(&b.next);
            }
            libc::ENOSPC if size < MAX_BATCH => size = (size * 4).min(MAX_BATCH),
            libc::EINVAL | libc::EOPNOTSUPP | ENOTSUPP if b.resume.is_none() => {
                return Err(Stop::Unsupported(
                    res.err()
                        .unwrap_or_else(|| io::Error::from(io::ErrorKind::Unsupported)),
                ));
            }
            _ => return Err(failed(res)),
        }
    }
}

fn failed(res: io::Result<()>) -> Stop {
    Stop::Failed(match res {
        Ok(()) => anyhow!("BPF_MAP_LOOKUP_BATCH failed"),
        Err(e) => anyhow::Error::new(e).context("BPF_MAP_LOOKUP_BATCH"),
    })
}

/// Reads a `T` from the start of `bytes`.
fn decode<T: Pod>(bytes: &[u8]) -> T {
    assert!(bytes.len() >= size_of::<T>());
    // SAFETY: the length is checked, and a `Pod` takes any bytes.
    unsafe { bytes.as_ptr().cast::<T>().read_unaligned() }
}

/// Set once batch lookups turned out unsupported.
static NO_BATCH: AtomicBool = AtomicBool::new(false);

/// Calls `visit` on every entry of `map`. Entries added or removed meanwhile
/// may or may not be seen.
pub fn for_each<K: Pod, V: Pod>(
    map: &HashMap<MapData, K, V>,
    mut visit: impl FnMut(K, V),
) -> anyhow::Result<()> {
    if !NO_BATCH.load(Ordering::Relaxed) {
        let fd = map.map().fd().as_fd();
        let walked = walk(
            size_of::<K>(),
            size_of::<V>(),
            BATCH,
            |b| lookup_batch(fd, b),
            |k, v| visit(decode(k), decode(v)),
        );
        match walked {
            Ok(()) => return Ok(()),
            Err(Stop::Failed(e)) => return Err(e),
            Err(Stop::Unsupported(e)) => {
                if !NO_BATCH.swap(true, Ordering::Relaxed) {
                    log::warn!(
                        "BPF_MAP_LOOKUP_BATCH unavailable ({e}); reading maps one entry at a time"
                    );
                }
            }
        }
    }
    for entry in map.iter() {
        // An entry removed between finding its key and reading it.
        let Ok((k, v)) = entry else { continue };
        visit(k, v);
    }
    Ok(())
}

/// Every entry of `map`.
pub fn collect<K: Pod, V: Pod>(map: &HashMap<MapData, K, V>) -> anyhow::Result<Vec<(K, V)>> {
    let mut all = Vec::new();
    for_each(map, |k, v| all.push((k, v)))?;
    Ok(all)
}

/// A new kernel hash map. Panics without the rights to make one: these
/// tests need root (CAP_BPF), and must not pass without running.
#[cfg(test)]
pub fn test_map(key_size: u32, value_size: u32, max_entries: u32) -> MapData {
    test_map_of(1, key_size, value_size, max_entries) // BPF_MAP_TYPE_HASH
}

/// [`test_map`] of another `BPF_MAP_TYPE_*` (2: an array).
#[cfg(test)]
pub fn test_map_of(map_type: u32, key_size: u32, value_size: u32, max_entries: u32) -> MapData {
    use std::os::fd::{FromRawFd as _, OwnedFd};

    #[repr(C)]
    struct CreateAttr {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
    }
    let attr = CreateAttr {
        map_type,
        key_size,
        value_size,
        max_entries,
    };
    // SAFETY: BPF_MAP_CREATE only reads `attr`.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, 0, &raw const attr, size_of_val(&attr)) };
    assert!(
        fd >= 0,
        "cannot create a BPF map ({}): run the tests as root",
        io::Error::last_os_error()
    );
    // SAFETY: a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    MapData::from_fd(fd).expect("map info")
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use aya::maps::Map;

    use super::*;

    /// A fake kernel: a hash map as buckets of (key, value) byte pairs,
    /// walked by bucket index like the real one.
    struct Fake {
        buckets: Vec<Vec<(u32, u32)>>,
        calls: usize,
        /// errno returned on the call with this index, after filling.
        fail_at: Option<(usize, i32)>,
    }

    impl Fake {
        fn new(buckets: Vec<Vec<(u32, u32)>>) -> Self {
            Self {
                buckets,
                calls: 0,
                fail_at: None,
            }
        }

        fn lookup(&mut self, b: &mut Batch) -> io::Result<()> {
            let call = self.calls;
            self.calls += 1;
            let room = b.count as usize;
            let mut bucket = b.resume.as_ref().map_or(0, |t| decode::<u32>(t) as usize);
            let mut total = 0;
            let mut ret = Ok(());
            loop {
                if let Some((at, errno)) = self.fail_at
                    && at == call
                    && total > 0
                {
                    ret = Err(io::Error::from_raw_os_error(errno));
                    break;
                }
                if bucket >= self.buckets.len() {
                    ret = Err(io::Error::from_raw_os_error(libc::ENOENT));
                    break;
                }
                let entries = &self.buckets[bucket];
                if entries.len() > room - total {
                    if total == 0 {
                        ret = Err(io::Error::from_raw_os_error(libc::ENOSPC));
                    }
                    break;
                }
                for (k, v) in entries {
                    b.keys[total * 4..][..4].copy_from_slice(&k.to_ne_bytes());
                    b.values[total * 4..][..4].copy_from_slice(&v.to_ne_bytes());
                    total += 1;
                }
                bucket += 1;
            }
            b.next[..4].copy_from_slice(&(bucket as u32).to_ne_bytes());
            b.count = total as u32;
            ret
        }
    }

    fn run(fake: &mut Fake, size: usize) -> Result<Vec<(u32, u32)>, Stop> {
        let mut seen = Vec::new();
        walk(
            4,
            4,
            size,
            |b| fake.lookup(b),
            |k, v| seen.push((decode(k), decode(v))),
        )?;
        Ok(seen)
    }

    fn buckets(n: u32, per_bucket: u32) -> Vec<Vec<(u32, u32)>> {
        (0..n)
            .map(|b| (0..per_bucket).map(|i| (b * 100 + i, b + i)).collect())
            .collect()
    }

    fn flat(b: &[Vec<(u32, u32)>]) -> Vec<(u32, u32)> {
        b.iter().flatten().copied().collect()
    }

    #[test]
    fn visits_every_entry_once_and_keeps_the_last_batch() {
        let b = buckets(10, 3);
        for size in [3, 4, 7, 30, 100] {
            let seen = run(&mut Fake::new(b.clone()), size).ok().expect("walk");
            assert_eq!(seen, flat(&b), "batch of {size}");
        }
    }

    #[test]
    fn empty_map_visits_nothing() {
        let seen = run(&mut Fake::new(vec![vec![]; 4]), 8).ok().expect("walk");
        assert!(seen.is_empty());
    }

    #[test]
    fn a_bucket_bigger_than_the_batch_grows_it() {
        let mut b = buckets(3, 1);
        b[1] = (0..10).map(|i| (500 + i, i)).collect();
        let seen = run(&mut Fake::new(b.clone()), 1).ok().expect("walk");
        assert_eq!(seen, flat(&b));
    }

    #[test]
    fn a_busy_bucket_resumes_where_the_kernel_stopped() {
        let b = buckets(10, 2);
        let mut fake = Fake::new(b.clone());
        fake.fail_at = Some((1, libc::EBUSY));
        let seen = run(&mut fake, 6).ok().expect("walk");
        assert_eq!(seen, flat(&b));
    }

    #[test]
    fn unsupported_only_before_the_first_entry() {
        let mut calls = 0;
        let r = walk(
            4,
            4,
            8,
            |_| {
                calls += 1;
                Err(io::Error::from_raw_os_error(libc::EINVAL))
            },
            |_, _| panic!("nothing to visit"),
        );
        assert!(matches!(r, Err(Stop::Unsupported(_))));
        assert_eq!(calls, 1);

        let mut fake = Fake::new(buckets(10, 2));
        fake.fail_at = Some((1, libc::EINVAL));
        assert!(matches!(run(&mut fake, 4), Err(Stop::Failed(_))));
    }

    #[test]
    fn more_entries_than_room_is_an_error() {
        let r = walk(
            4,
            4,
            2,
            |b| {
                b.count = 3;
                Ok(())
            },
            |_, _| {},
        );
        assert!(matches!(r, Err(Stop::Failed(_))));
    }

    fn kernel_map(max: u32) -> HashMap<MapData, u64, u32> {
        HashMap::try_from(Map::HashMap(test_map(8, 4, max))).expect("hash map")
    }

    #[test]
    fn kernel_walk_matches_iter() {
        let mut map = kernel_map(20_000);
        let read = |map: &HashMap<MapData, u64, u32>, size| {
            let mut seen = BTreeMap::new();
            let walked = walk(
                8,
                4,
                size,
                |b| lookup_batch(map.map().fd().as_fd(), b),
                |k, v| assert!(seen.insert(decode::<u64>(k), decode::<u32>(v)).is_none()),
            );
            assert!(walked.is_ok());
            seen
        };
        assert!(read(&map, 16).is_empty());
        for i in 0..15_000u64 {
            map.insert(i * 7919, i as u32, 0).expect("insert");
        }
        let want: BTreeMap<u64, u32> = map.iter().map(|e| e.expect("entry")).collect();
        assert_eq!(want.len(), 15_000);
        for size in [1, 5, 4096, 100_000] {
            assert_eq!(read(&map, size), want, "batch of {size}");
        }
        let mut all = collect(&map).expect("collect");
        all.sort_unstable();
        assert_eq!(all, want.into_iter().collect::<Vec<_>>());
    }
}
