//! Tests of change tracking: the extent comparison on synthetic maps, and
//! the driver on a real XFS (reflink) file system made on a loop device in
//! a scratch directory, plus ext4 (no reflink) for the `None` cases. They
//! run as root; the guards unmount and detach even when a test fails.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::*;
use crate::file::FileDriver;
use crate::loopdev::test_support::{Mount, Scratch};
use crate::loopdev::LoopDevice;
use crate::{ExportOptions, ExportTarget, Metadata, VolumeDriver};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const G: u64 = GRANULE;

// ---------------------------------------------------------------------
// The comparison, on synthetic extent maps.

fn ext(logical: u64, physical: u64, length: u64, flags: u32) -> Extent {
    Extent {
        logical,
        physical,
        length,
        flags,
    }
}

fn compare(a: &[Extent], b: &[Extent], size: u64) -> Option<Vec<ChangedRange>> {
    Some(diff(&segments(a, size)?, &segments(b, size)?, size))
}

fn r(offset: u64, len: u64) -> ChangedRange {
    ChangedRange { offset, len }
}

#[test]
fn same_map_is_unchanged() {
    let m = [
        ext(0, 100 * G, 8 * G, FIEMAP_EXTENT_SHARED),
        ext(
            16 * G,
            500 * G,
            4 * G,
            FIEMAP_EXTENT_SHARED | FIEMAP_EXTENT_LAST,
        ),
    ];
    assert_eq!(compare(&m, &m, 64 * G), Some(vec![]));
    assert_eq!(compare(&[], &[], 64 * G), Some(vec![]), "all holes");
    assert_eq!(compare(&[], &[], 0), Some(vec![]), "empty file");
}

#[test]
fn same_addresses_split_differently_are_unchanged() {
    // One extent in A, three in B (and a MERGED flag), same blocks.
    let a = [ext(0, 100 * G, 8 * G, 0)];
    let b = [
        ext(0, 100 * G, 2 * G, FIEMAP_EXTENT_SHARED),
        ext(2 * G, 102 * G, 5 * G, FIEMAP_EXTENT_MERGED),
        ext(7 * G, 107 * G, G, FIEMAP_EXTENT_LAST),
    ];
    assert_eq!(compare(&a, &b, 8 * G), Some(vec![]));
    assert_eq!(compare(&b, &a, 8 * G), Some(vec![]));
}

#[test]
fn moved_blocks_are_changed() {
    let a = [ext(0, 100 * G, 8 * G, 0)];
    // Block 3 rewritten (copy-on-write elsewhere); block 5 at an address
    // that is right for another offset only.
    let b = [
        ext(0, 100 * G, 3 * G, 0),
        ext(3 * G, 900 * G, G, 0),
        ext(4 * G, 104 * G, G, 0),
        ext(5 * G, 104 * G, G, 0),
        ext(6 * G, 106 * G, 2 * G, 0),
    ];
    assert_eq!(compare(&a, &b, 8 * G), Some(vec![r(3 * G, G), r(5 * G, G)]));
}

#[test]
fn holes_against_data_and_unwritten() {
    let a = [
        ext(0, 100 * G, 2 * G, 0),
        ext(4 * G, 200 * G, 2 * G, FIEMAP_EXTENT_UNWRITTEN),
        ext(8 * G, 300 * G, 2 * G, FIEMAP_EXTENT_UNWRITTEN),
        ext(12 * G, 400 * G, 2 * G, FIEMAP_EXTENT_UNWRITTEN),
    ];
    let b = [
        // [0, 2G) became a hole; [2G, 4G) hole in both.
        // Unwritten in both at the same blocks: unchanged.
        ext(4 * G, 200 * G, 2 * G, FIEMAP_EXTENT_UNWRITTEN),
        // Same blocks, but written in B only: changed.
        ext(8 * G, 300 * G, 2 * G, 0),
        // [12G, 14G) unwritten in A, hole in B: both zeroes, but
        // conservatively changed.
    ];
    assert_eq!(
        compare(&a, &b, 16 * G),
        Some(vec![r(0, 2 * G), r(8 * G, 2 * G), r(12 * G, 2 * G)])
    );
}

#[test]
fn uncertain_flags_are_changed() {
    for flag in [
        FIEMAP_EXTENT_UNKNOWN,
        0x4 | FIEMAP_EXTENT_UNKNOWN, // DELALLOC
        0x8,                         // ENCODED
        0x80,                        // DATA_ENCRYPTED
        0x100,                       // NOT_ALIGNED
        0x200 | 0x100,               // DATA_INLINE
        0x400 | 0x100,               // DATA_TAIL
        0x8000,                      // unknown to this code
    ] {
        let a = [ext(0, 100 * G, 4 * G, 0)];
        let b = [ext(0, 100 * G, 4 * G, flag)];
        assert_eq!(
            compare(&a, &b, 4 * G),
            Some(vec![r(0, 4 * G)]),
            "flag {flag:#x}"
        );
        assert_eq!(
            compare(&b, &b, 4 * G),
            Some(vec![r(0, 4 * G)]),
            "flag {flag:#x} in both"
        );
    }
}

#[test]
fn ranges_are_rounded_merged_and_clamped() {
    // Byte-granular extents (as if the file system had tiny blocks).
    let size = 10 * KIB; // a multiple of 512, not of 4096
    let a = [ext(0, 1_000_000, size, 0)];
    let b = [
        ext(0, 1_000_000, 5000, 0),
        ext(5000, 7, 1, 0), // one byte moved
        ext(5001, 1_005_001, size - 5001, FIEMAP_EXTENT_LAST),
    ];
    assert_eq!(compare(&a, &b, size), Some(vec![r(G, G)]));
    // Changes in neighbouring granules merge; the last is clamped.
    let b = [
        ext(0, 1_000_000, 4000, 0),
        ext(4000, 7, 200, 0),
        ext(4200, 1_004_200, 4000, 0),
        ext(8200, 9, size - 8200, 0),
    ];
    assert_eq!(compare(&a, &b, size), Some(vec![r(0, size)]));
    let c = [ext(0, 1_000_000, 9000, 0), ext(9000, 5, size - 9000, 0)];
    assert_eq!(compare(&a, &c, size), Some(vec![r(2 * G, size - 2 * G)]));
}

#[test]
fn extents_past_the_end_are_ignored() {
    let size = 8 * G;
    let a = [
        ext(0, 100 * G, 10 * G, 0),
        ext(20 * G, 5 * G, G, FIEMAP_EXTENT_LAST),
    ];
    let b = [ext(0, 100 * G, 8 * G, 0), ext(9 * G, 1, G, 0x2)];
    assert_eq!(compare(&a, &b, size), Some(vec![]));
    // A trailing hole in one file against data in the other.
    let c = [ext(0, 100 * G, 6 * G, 0)];
    assert_eq!(compare(&a, &c, size), Some(vec![r(6 * G, 2 * G)]));
}

#[test]
fn malformed_maps_are_untracked() {
    let overlapping = [ext(0, 100 * G, 4 * G, 0), ext(2 * G, 300 * G, 4 * G, 0)];
    let unsorted = [ext(4 * G, 100 * G, G, 0), ext(0, 300 * G, G, 0)];
    let fine = [ext(0, 100 * G, 8 * G, 0)];
    assert_eq!(compare(&overlapping, &fine, 8 * G), None);
    assert_eq!(compare(&fine, &unsorted, 8 * G), None);
    let wraps = [ext(u64::MAX - 10, 0, 100, 0)];
    assert_eq!(compare(&wraps, &fine, 8 * G), None);
}

#[test]
fn physical_overflow_is_changed() {
    let a = [ext(0, u64::MAX - G + 1, 2 * G, 0)];
    assert_eq!(compare(&a, &a, 2 * G), Some(vec![r(0, 2 * G)]));
}

// ---------------------------------------------------------------------
// The driver on real file systems.

/// A file driver with one pool "p" on a fresh XFS (reflink=1) made on a
/// loop device over a file in a scratch directory. Fields drop in order:
/// the driver, then the mount (unmounted), the loop device (detached), and
/// last the scratch directory (which detaches anything left on its files).
struct XfsPool {
    driver: FileDriver,
    dir: PathBuf,
    _mount: Mount,
    _dev: LoopDevice,
    _scratch: Scratch,
}

/// Needs mkfs.xfs (xfsprogs, which fixtures/test.sh installs): a missing
/// tool fails the test.
fn xfs_pool() -> XfsPool {
    let Some(mkfs) = ["/usr/sbin/mkfs.xfs", "/sbin/mkfs.xfs"]
        .into_iter()
        .find(|p| Path::new(p).exists())
    else {
        panic!("mkfs.xfs not installed: apt-get install xfsprogs (fixtures/test.sh does)");
    };
    let scratch = Scratch::new();
    let fs_img = scratch.join("xfs.img");
    File::create(&fs_img).unwrap().set_len(512 * MIB).unwrap();
    let dev = LoopDevice::attach(&fs_img, false, false).unwrap();
    let out = std::process::Command::new(mkfs)
        .args(["-q", "-m", "reflink=1"])
        .arg(dev.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "mkfs.xfs: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mnt = scratch.mkdir("mnt");
    let mount = Mount::fs(dev.path(), &mnt, "xfs");
    let dir = mnt.join("pool");
    std::fs::create_dir(&dir).unwrap();
    let driver = FileDriver::new("test", BTreeMap::from([("p".to_string(), dir.clone())])).unwrap();
    XfsPool {
        driver,
        dir,
        _mount: mount,
        _dev: dev,
        _scratch: scratch,
    }
}

/// Writes through the file and fsyncs, so the data is in the file (and its
/// extents allocated) before the next snapshot.
fn write_at(path: &Path, offset: u64, data: &[u8]) {
    let f = File::options().write(true).open(path).unwrap();
    f.write_all_at(data, offset).unwrap();
    f.sync_all().unwrap();
}

fn fallocate(path: &Path, mode: libc::c_int, offset: u64, len: u64) {
    let f = File::options().write(true).open(path).unwrap();
    // SAFETY: fallocate on a descriptor we own.
    let rc = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            mode,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    assert_eq!(
        rc,
        0,
        "fallocate({mode:#x}, {offset}, {len}): {}",
        std::io::Error::last_os_error()
    );
    f.sync_all().unwrap();
}

fn punch_hole(path: &Path, offset: u64, len: u64) {
    fallocate(
        path,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        offset,
        len,
    );
}

fn read_all(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng(seed);
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        v.extend_from_slice(&rng.next().to_le_bytes());
    }
    v.truncate(len);
    v
}

/// SplitMix64: a small seeded PRNG, enough for reproducible test data.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A length from 1 byte to 2 MiB, as often small as large (uniform
    /// within a random power of two).
    fn len(&mut self) -> u64 {
        let bits = self.range(0, 21);
        self.range(1, 1 << bits)
    }

    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}

fn covered(ranges: &[ChangedRange], off: u64) -> bool {
    let i = ranges.partition_point(|r| r.offset + r.len <= off);
    i < ranges.len() && ranges[i].offset <= off
}

fn overlaps(ranges: &[ChangedRange], lo: u64, hi: u64) -> bool {
    ranges
        .iter()
        .any(|r| r.offset < hi && lo < r.offset + r.len)
}

fn total(ranges: &[ChangedRange]) -> u64 {
    ranges.iter().map(|r| r.len).sum()
}

/// Sorted, disjoint, not touching, inside the volume, on 4 KiB boundaries
/// (the end may be the volume's end).
fn assert_well_formed(ranges: &[ChangedRange], size: u64) {
    let mut prev_end = None;
    for r in ranges {
        assert!(r.len > 0, "empty range in {ranges:?}");
        assert!(r.offset + r.len <= size, "{r:?} past the end {size}");
        assert_eq!(r.offset % G, 0, "{r:?} not aligned");
        assert!(
            (r.offset + r.len) % G == 0 || r.offset + r.len == size,
            "{r:?} not aligned"
        );
        if let Some(end) = prev_end {
            assert!(r.offset > end, "unsorted or touching ranges: {ranges:?}");
        }
        prev_end = Some(r.offset + r.len);
    }
}

/// Every byte where the two snapshots differ lies inside a range.
fn assert_covers(a: &[u8], b: &[u8], ranges: &[ChangedRange], what: &str) {
    assert_eq!(a.len(), b.len());
    for (chunk, (ca, cb)) in a.chunks(G as usize).zip(b.chunks(G as usize)).enumerate() {
        if ca == cb {
            continue;
        }
        for i in 0..ca.len() {
            let off = chunk as u64 * G + i as u64;
            if ca[i] != cb[i] {
                assert!(
                    covered(ranges, off),
                    "{what}: byte {off} differs but is outside {ranges:?}"
                );
            }
        }
    }
}

fn changes(d: &FileDriver, from: &str, to: &str) -> Vec<ChangedRange> {
    d.changed_ranges("p", from, to)
        .unwrap()
        .unwrap_or_else(|| panic!("no change tracking between {from} and {to}"))
}

fn sidecar(dir: &Path, snapshot: &str) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join(format!("snapshot-{snapshot}.json"))).unwrap())
        .unwrap()
}

#[test]
fn xfs_changes_cover_every_modification() {
    let px = xfs_pool();
    let d = &px.driver;
    assert!(d.supports_change_tracking("p").unwrap());
    assert!(d.supports_change_tracking("p").unwrap(), "cached answer");
    let size = 64 * MIB;
    d.create_volume("p", "v", "n", size, &Metadata::new())
        .unwrap();
    let img = px.dir.join("volume-v.img");
    // Data in [0, 24M), [40M, 48M) and [60M, 64M); holes elsewhere.
    for (i, (lo, hi)) in [(0, 24), (40, 48), (60, 64)].into_iter().enumerate() {
        write_at(
            &img,
            lo * MIB,
            &pattern(((hi - lo) * MIB) as usize, i as u64),
        );
    }
    d.create_snapshot("p", "v", "a").unwrap();

    // (offset, len) of every modification.
    let mods: Vec<(u64, u64)> = vec![
        (3 * G, G),            // aligned 4 KiB blocks
        (8 * MIB + 5 * G, G),  //
        (5 * MIB + 1000, 100), // inside one block
        (6 * MIB + 4000, G),   // straddling two blocks
        (16 * MIB, MIB),       // 1 MiB
        (30 * MIB, 64 * KIB),  // into a hole
        (42 * MIB, 256 * KIB), // punched out of data
    ];
    for (i, &(off, len)) in mods.iter().enumerate() {
        if off == 42 * MIB {
            punch_hole(&img, off, len);
        } else {
            write_at(&img, off, &pattern(len as usize, 100 + i as u64));
        }
    }
    d.create_snapshot("p", "v", "b").unwrap();
    assert_eq!(sidecar(&px.dir, "a")["reflinked"], true);
    assert_eq!(sidecar(&px.dir, "b")["reflinked"], true);

    let ranges = changes(d, "a", "b");
    assert_well_formed(&ranges, size);
    let (sa, sb) = (
        read_all(&px.dir.join("snapshot-a.img")),
        read_all(&px.dir.join("snapshot-b.img")),
    );
    assert_covers(&sa, &sb, &ranges, "a to b");
    for &(off, len) in &mods {
        for byte in [off, off + len - 1] {
            assert!(
                covered(&ranges, byte),
                "modified byte {byte} not reported: {ranges:?}"
            );
        }
    }
    let modified: u64 = mods.iter().map(|m| m.1).sum();
    assert!(
        total(&ranges) < 4 * modified + 64 * KIB,
        "{} bytes reported for {modified} modified: {ranges:?}",
        total(&ranges)
    );
    // Untouched data and holes far from any modification.
    for (lo, hi) in [
        (20 * MIB, 24 * MIB),
        (34 * MIB, 40 * MIB),
        (44 * MIB, 48 * MIB),
        (50 * MIB, 64 * MIB),
    ] {
        assert!(
            !overlaps(&ranges, lo, hi),
            "[{lo}, {hi}) reported: {ranges:?}"
        );
    }
    // The comparison is symmetric.
    assert_eq!(changes(d, "b", "a"), ranges);
    // No probe files left in the pool.
    let hidden: Vec<_> = std::fs::read_dir(&px.dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().starts_with('.'))
        .collect();
    assert!(hidden.is_empty(), "{hidden:?}");
}

#[test]
fn xfs_identical_snapshots_have_no_changes() {
    let px = xfs_pool();
    let d = &px.driver;
    let size = 32 * MIB;
    d.create_volume("p", "v", "n", size, &Metadata::new())
        .unwrap();
    let img = px.dir.join("volume-v.img");
    write_at(&img, 0, &pattern((8 * MIB) as usize, 1));
    write_at(&img, 20 * MIB + 123, &pattern(MIB as usize, 2));
    fallocate(&img, 0, 28 * MIB, MIB); // unwritten extent
    d.create_snapshot("p", "v", "a").unwrap();
    d.create_snapshot("p", "v", "b").unwrap();
    assert_eq!(changes(d, "a", "b"), vec![]);
    assert_eq!(changes(d, "a", "a"), vec![]);
    // Reading the volume (or exporting the snapshots) changes nothing.
    let _ = read_all(&img);
    d.create_snapshot("p", "v", "c").unwrap();
    assert_eq!(changes(d, "a", "c"), vec![]);
}

/// Random writes, punches, preallocations and zeroings between snapshots,
/// some through a loop device; every differing byte must be reported.
#[test]
fn xfs_random_modifications_are_covered() {
    let px = xfs_pool();
    let d = &px.driver;
    for iter in 0..8u64 {
        let mut rng = Rng(0x5EED_0000 + iter);
        // Not always a multiple of 4 KiB: the last ranges are clamped.
        let size = 16 * MIB + 512 * rng.range(0, 7);
        let vol = format!("v{iter}");
        d.create_volume("p", &vol, "n", size, &Metadata::new())
            .unwrap();
        let img = px.dir.join(format!("volume-{vol}.img"));
        for _ in 0..rng.range(0, 20) {
            let len = rng.len().min(size);
            let off = rng.range(0, size - len);
            write_at(&img, off, &pattern(len as usize, rng.next()));
        }
        let snap = |gen: u64| format!("{vol}-s{gen}");
        d.create_snapshot("p", &vol, &snap(0)).unwrap();
        let mut touched_since_0 = 0;
        for gen in 1..=3u64 {
            let through_loop = gen == 2;
            let target = ExportTarget::Volume(vol.clone());
            let dev = through_loop.then(|| {
                let info = d
                    .export(
                        "p",
                        &target,
                        ExportOptions {
                            loop_device: true,
                            read_only: false,
                        },
                    )
                    .unwrap();
                File::options()
                    .write(true)
                    .open(&info.properties["path"])
                    .unwrap()
            });
            let mut touched = 0;
            for _ in 0..rng.range(1, 24) {
                let len = rng.len().min(size);
                let off = rng.range(0, size - len);
                touched += (off + len).div_ceil(G) * G - off / G * G;
                match (&dev, rng.range(0, 9)) {
                    // Unsynced writes to the device: the snapshot flushes.
                    (Some(dev), _) => dev
                        .write_all_at(&pattern(len as usize, rng.next()), off)
                        .unwrap(),
                    (None, 0..=5) => write_at(&img, off, &pattern(len as usize, rng.next())),
                    (None, 6 | 7) => punch_hole(&img, off, len),
                    (None, 8) => fallocate(&img, libc::FALLOC_FL_KEEP_SIZE, off, len),
                    (None, _) => fallocate(
                        &img,
                        libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
                        off,
                        len,
                    ),
                }
            }
            touched_since_0 += touched;
            d.create_snapshot("p", &vol, &snap(gen)).unwrap();
            drop(dev);
            if through_loop {
                d.unexport("p", &target).unwrap();
            }
            let prev = read_all(&px.dir.join(format!("snapshot-{}.img", snap(gen - 1))));
            let first = read_all(&px.dir.join(format!("snapshot-{}.img", snap(0))));
            let now = read_all(&px.dir.join(format!("snapshot-{}.img", snap(gen))));
            assert_eq!(now, read_all(&img), "snapshot {} is the volume", snap(gen));
            for (from, data, bound) in [
                (snap(gen - 1), &prev, touched),
                (snap(0), &first, touched_since_0),
            ] {
                let what = format!("iteration {iter}: {from} to {}", snap(gen));
                let ranges = changes(d, &from, &snap(gen));
                assert_well_formed(&ranges, size);
                assert_covers(data, &now, &ranges, &what);
                assert!(
                    total(&ranges) <= 4 * bound + 64 * KIB,
                    "{what}: {} bytes reported for {bound} touched",
                    total(&ranges)
                );
            }
        }
    }
}

#[test]
fn ext4_has_no_change_tracking() {
    let scratch = Scratch::new();
    let dir = scratch.mkdir("pool");
    // SAFETY: statfs fills the struct we own from a valid C string.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    let c = std::ffi::CString::new(dir.to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::statfs(c.as_ptr(), &mut st) }, 0);
    assert_eq!(
        st.f_type as u64 & 0xFFFF_FFFF,
        0xEF53,
        "this test expects /var/tmp on ext4"
    );
    let d = FileDriver::new("test", BTreeMap::from([("p".to_string(), dir.clone())])).unwrap();
    assert!(!d.supports_change_tracking("p").unwrap());
    d.create_volume("p", "v", "n", 8 * MIB, &Metadata::new())
        .unwrap();
    let img = dir.join("volume-v.img");
    write_at(&img, 0, &pattern(MIB as usize, 1));
    d.create_snapshot("p", "v", "a").unwrap();
    write_at(&img, 4 * MIB, &pattern(MIB as usize, 2));
    d.create_snapshot("p", "v", "b").unwrap();
    assert_eq!(sidecar(&dir, "a")["reflinked"], false);
    assert_eq!(d.changed_ranges("p", "a", "b").unwrap(), None);
    assert_eq!(d.changed_ranges("p", "a", "a").unwrap(), None);
    let e = d.changed_ranges("p", "a", "nosuch").unwrap_err();
    assert_eq!(e.kind, crate::DriverErrorKind::NotFound);
}

#[test]
fn xfs_untracked_pairs() {
    let px = xfs_pool();
    let d = &px.driver;
    for v in ["v1", "v2"] {
        d.create_volume("p", v, "n", 8 * MIB, &Metadata::new())
            .unwrap();
        write_at(
            &px.dir.join(format!("volume-{v}.img")),
            0,
            &pattern(MIB as usize, 1),
        );
    }
    d.create_snapshot("p", "v1", "s1").unwrap();
    d.create_snapshot("p", "v2", "s2").unwrap();
    // Snapshots of different volumes.
    assert_eq!(d.changed_ranges("p", "s1", "s2").unwrap(), None);

    // A sidecar written before `reflinked` existed reads as not reflinked.
    d.create_snapshot("p", "v1", "old").unwrap();
    let json = px.dir.join("snapshot-old.json");
    let mut side = sidecar(&px.dir, "old");
    side.as_object_mut().unwrap().remove("reflinked").unwrap();
    std::fs::write(&json, serde_json::to_vec(&side).unwrap()).unwrap();
    assert_eq!(d.changed_ranges("p", "old", "s1").unwrap(), None);
    assert_eq!(d.changed_ranges("p", "s1", "old").unwrap(), None);
    // It still works as a snapshot.
    d.create_volume_from_snapshot("p", "old", "v3", "n")
        .unwrap();

    // An image whose length disagrees with its sidecar.
    d.create_snapshot("p", "v1", "s1b").unwrap();
    assert_eq!(changes(d, "s1", "s1b"), vec![]);
    File::options()
        .write(true)
        .open(px.dir.join("snapshot-s1b.img"))
        .unwrap()
        .set_len(4 * MIB)
        .unwrap();
    assert_eq!(d.changed_ranges("p", "s1", "s1b").unwrap(), None);
}
