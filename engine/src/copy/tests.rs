//! The copy engine on real files: incremental copies against a block map.

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
