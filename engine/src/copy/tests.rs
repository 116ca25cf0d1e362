//! The copy engine on real files: incremental copies against a block map.

use std::ops::DerefMut;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use volback_connectors::local::{LocalDevice, LocalOptions};
use volback_connectors::BlockDevice;

use super::*;

const MB: u64 = 1 << 20;

fn open(path: &Path, writable: bool) -> Box<dyn BlockDevice> {
    Box::new(
        LocalDevice::open(
            path,
            &LocalOptions {
                writable,
                queue_depth: 8,
                ..Default::default()
            },
        )
        .unwrap(),
    )
}

fn fill(path: &Path, offset: u64, len: usize, seed: u8) {
    let data: Vec<u8> = (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect();
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .write_all_at(&data, offset)
        .unwrap();
}

fn run(src: &Path, dst: &Path, plan: Option<MapPlan>, dest_zero: bool) -> CopyReport {
    let opts = CopyOptions {
        block_size: MB,
        queue_depth: 8,
        block_map: plan,
        destination_is_zero: dest_zero,
        verify: true,
        ..Default::default()
    };
    copy(open(src, false), open(dst, true), &opts, &mut |_| {})
        .unwrap()
        .report
}

fn map_plan(
    parent: Option<Arc<BlockMap>>,
    compare: bool,
    only: Option<Vec<(u64, u64)>>,
) -> Option<MapPlan> {
    Some(MapPlan {
        block: 64 << 10,
        parent,
        compare_parent: compare,
        only,
    })
}

#[test]
fn incremental_copies_write_only_what_changed() {
    let dir = tempfile::Builder::new()
        .prefix("volback-engine-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let (src, dst) = (dir.path().join("src"), dir.path().join("dst"));
    let size = 16 * MB + 12345;
    std::fs::File::create(&src).unwrap().set_len(size).unwrap();
    std::fs::File::create(&dst).unwrap().set_len(size).unwrap();
    fill(&src, 0, 3 * MB as usize, 1);
    fill(&src, 10 * MB, MB as usize, 2);
    fill(&src, size - 1000, 1000, 3);

    // Full copy with a map.
    let full = run(&src, &dst, map_plan(None, false, None), true);
    let map1 = Arc::new(full.block_map.clone().unwrap());
    assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());

    // Changes: an overwrite inside data, new data in a hole, data turned to zeroes.
    fill(&src, MB + 4096, 8192, 9);
    fill(&src, 6 * MB, 100_000, 8);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&src)
        .unwrap()
        .write_all_at(&vec![0u8; 65536], 10 * MB)
        .unwrap();

    // Hash-map incremental: reads everything, writes only changed 64 KiB blocks.
    let inc = run(&src, &dst, map_plan(Some(map1.clone()), true, None), false);
    assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
    // One block for the 8 KiB overwrite, two for the 100 000 bytes (they
    // straddle a block boundary), one zeroed block.
    assert_eq!(inc.bytes_written, 3 * 65536, "{inc:?}");
    assert_eq!(inc.bytes_zeroed, 65536, "{inc:?}");
    let map2 = Arc::new(inc.block_map.clone().unwrap());
    assert_ne!(map1.checksum(), map2.checksum());

    // Driver-tracked incremental: only the ranges said to change are read.
    fill(&src, 12 * MB, 4096, 7);
    let only = vec![(12 * MB, 4096)];
    let tracked = run(
        &src,
        &dst,
        map_plan(Some(map2.clone()), false, Some(only)),
        false,
    );
    assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
    assert_eq!(
        tracked.bytes_read, 65536,
        "only the changed block is read: {tracked:?}"
    );
    assert_eq!(tracked.bytes_written, 65536, "{tracked:?}");
    // Its map equals a full map of the source.
    let fresh = run(
        &src,
        &dir.path().join("fresh").tap_create(size),
        map_plan(None, false, None),
        true,
    );
    assert_eq!(tracked.block_map.unwrap(), fresh.block_map.unwrap());
}

#[test]
fn an_incremental_reads_back_exactly_what_it_wrote() {
    let mut parent = BlockMap::new(65536, 65536 * 4 + 100);
    parent.hashes = vec![1, 2, 3, 4, 5];
    let mut new = parent.clone();
    new.hashes[1] = 9;
    new.hashes[4] = 8;
    // Blocks whose hash changed (the last one is short) ...
    assert_eq!(
        written_blocks(&parent, &new, None),
        vec![(65536, 65536), (262144, 100)]
    );
    // ... and, for driver-tracked copies, the ranges it was told to copy.
    let only = [(131072, 4096)];
    assert_eq!(
        written_blocks(&parent, &new, Some(&only)),
        vec![(131072, 4096), (65536, 65536), (262144, 100)]
    );
}

trait TapCreate {
    fn tap_create(self, size: u64) -> Self;
}

impl TapCreate for std::path::PathBuf {
    fn tap_create(self, size: u64) -> Self {
        std::fs::File::create(&self).unwrap().set_len(size).unwrap();
        self
    }
}

#[test]
fn discarded_reads_share_memory_and_report_what_they_read() {
    let dir = tempfile::Builder::new()
        .prefix("volback-discard-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let path = dir.path().join("src.img");
    let size = 8 * MB + 4096 * 3;
    std::fs::File::create(&path).unwrap().set_len(size).unwrap();
    fill(&path, 0, size as usize, 7);
    let mut dev = open(&path, false);
    assert!(dev.discards_reads());
    // Mixed sizes in flight at once: the shared memory grows (4 KiB, then
    // 1 MiB, then 3 MiB) while smaller discarded reads still use the old
    // one; an ordinary read in between must get its own data.
    let reqs: Vec<(u64, usize, bool)> = vec![
        (0, 4096, true),
        (4096, MB as usize, true),
        (2 * MB, 3 * MB as usize, true),
        (MB + 4096, 4096 * 5, false),
        (5 * MB, 3 * MB as usize + 4096 * 3, true),
    ];
    for (i, &(offset, len, discard)) in reqs.iter().enumerate() {
        let op = if discard {
            IoOp::ReadDiscard { offset, len }
        } else {
            IoOp::Read {
                offset,
                len,
                buf: AlignedBuf::new(len),
            }
        };
        dev.submit(i as u64, op).unwrap();
    }
    let mut out = Vec::new();
    dev.reap(reqs.len(), &mut out).unwrap();
    assert_eq!(out.len(), reqs.len());
    let want = std::fs::read(&path).unwrap();
    for c in out {
        let (offset, len, discard) = reqs[c.tag as usize];
        assert_eq!(c.result.unwrap(), len as u64, "request {}", c.tag);
        match c.buf {
            volback_connectors::Returned::None => assert!(discard),
            volback_connectors::Returned::Read(b) => {
                assert!(!discard);
                assert!(b.as_slice()[..len] == want[offset as usize..offset as usize + len]);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    // Past the end: refused, naming the range.
    let err = dev
        .submit(
            0,
            IoOp::ReadDiscard {
                offset: size - 4096,
                len: 8192,
            },
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("past the end"), "{err}");

    // A read without a checksum discards; with one it reads into buffers.
    let opts = CopyOptions {
        block_size: MB,
        queue_depth: 4,
        sparse: SparseMode::Never,
        ..Default::default()
    };
    let mut counted = Counting::new(dev.as_mut(), None);
    let plain = read_device(&mut counted, &opts, false, &mut |_| {}).unwrap();
    assert_eq!(plain.bytes_read, size);
    assert_eq!(plain.digest, None);
    assert_eq!((counted.reads, counted.discards), (0, 9));
    let mut counted = Counting::new(dev.as_mut(), None);
    let hashed = read_device(&mut counted, &opts, true, &mut |_| {}).unwrap();
    assert_eq!(hashed.bytes_read, size);
    assert_eq!((counted.reads, counted.discards), (9, 0));
    let mut other = open(&path, false);
    let again = read_device(other.as_mut(), &opts, true, &mut |_| {}).unwrap();
    assert!(hashed.digest.is_some() && hashed.digest == again.digest);
}

/// A device (borrowed or owned) that counts the reads it is asked for, by
/// kind, and with a `cap` says it takes at most that many bytes per read
/// (and fails the test on a longer one).
struct Counting<D> {
    dev: D,
    reads: usize,
    discards: usize,
    cap: Option<u64>,
    longest: usize,
}

impl<D> Counting<D> {
    fn new(dev: D, cap: Option<u64>) -> Self {
        Self {
            dev,
            reads: 0,
            discards: 0,
            cap,
            longest: 0,
        }
    }
}

impl<D: DerefMut<Target = dyn BlockDevice> + Send> BlockDevice for Counting<D> {
    fn name(&self) -> &str {
        self.dev.name()
    }
    fn size(&self) -> u64 {
        self.dev.size()
    }
    fn logical_block_size(&self) -> u32 {
        self.dev.logical_block_size()
    }
    fn max_in_flight(&self) -> usize {
        self.dev.max_in_flight()
    }
    fn in_flight(&self) -> usize {
        self.dev.in_flight()
    }
    fn submit(&mut self, tag: u64, op: IoOp) -> Result<(), volback_connectors::DeviceError> {
        let len = match &op {
            IoOp::Read { len, .. } => {
                self.reads += 1;
                *len
            }
            IoOp::ReadDiscard { len, .. } => {
                self.discards += 1;
                *len
            }
            _ => 0,
        };
        self.longest = self.longest.max(len);
        if let Some(cap) = self.cap {
            assert!(len as u64 <= cap, "a read of {len} bytes");
        }
        self.dev.submit(tag, op)
    }
    fn reap(
        &mut self,
        min: usize,
        out: &mut Vec<volback_connectors::Completion>,
    ) -> Result<(), volback_connectors::DeviceError> {
        self.dev.reap(min, out)
    }
    fn discards_reads(&self) -> bool {
        self.dev.discards_reads()
    }
    fn max_read_size(&self) -> Option<u64> {
        self.cap
    }
}

#[test]
fn reads_fit_a_source_that_splits_larger_ones() {
    let dir = tempfile::Builder::new()
        .prefix("volback-fit-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let (src, dst) = (dir.path().join("src"), dir.path().join("dst"));
    let size = 6 * MB + 8192;
    for p in [&src, &dst] {
        std::fs::File::create(p).unwrap().set_len(size).unwrap();
    }
    fill(&src, 0, size as usize, 5);
    let opts = CopyOptions {
        block_size: 4 * MB,
        queue_depth: 4,
        verify: true,
        ..Default::default()
    };
    // A source that takes at most 1 MiB + 100 bytes per request gets reads
    // of 1 MiB (the largest multiple of the 4 KiB grid that fits).
    let mut dev = open(&src, false);
    let mut counted = Counting::new(dev.as_mut(), Some(MB + 100));
    let r = read_device(&mut counted, &opts, true, &mut |_| {}).unwrap();
    assert_eq!(r.bytes_read, size);
    assert_eq!((counted.longest, counted.reads), (MB as usize, 7));
    // A copy too (the source asserts every read fits), and the data arrives
    // whole.
    let report = copy(
        Box::new(Counting::new(open(&src, false), Some(MB))),
        open(&dst, true),
        &opts,
        &mut |_| {},
    )
    .unwrap()
    .report;
    assert_eq!(report.bytes_read, size);
    assert!(std::fs::read(&src).unwrap() == std::fs::read(&dst).unwrap());
    // Without a cap the block size stands.
    let mut counted = Counting::new(dev.as_mut(), None);
    read_device(&mut counted, &opts, true, &mut |_| {}).unwrap();
    assert_eq!(counted.longest, 4 * MB as usize);
}
