//! Incremental backups through the `volback` CLI (run as root; build the
//! binary with the fail points:
//! `cargo build --workspace --bins --features volback-engine/failpoints`).
//!
//! Chains with hash-map change tracking on ext4 pools, driver (FIEMAP)
//! change tracking on a source pool on XFS, the cases that force a full
//! backup, a damaged restore point, retention over an incremental chain,
//! and an incremental that dies half way through its copy.
//!
//! Every test gets its own scratch directory holding the pools, the
//! configuration and the catalog. Guards detach what a test attached and
//! unmount what it mounted, also when it fails; [`with_scratch`] checks
//! afterwards that no loop device still refers to the scratch directory.

use std::collections::BTreeSet;
use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use volback_tests::*;

const GOLD: &str = "primary:gold";
const SILVER: &str = "primary:silver";
const VAULT: &str = "backup:vault";

/// The map block size of most tests: small, so that the expected
/// `bytes_written` of a hash-map incremental is exact.
const MAP_BLOCK: u64 = 64 * KIB;
const MAP64: &str = "  map_block_size: 64K\n";

const DAY: u64 = 86_400;
const HOUR: u64 = 3_600;

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// Pools and catalog in the scratch directory, `backup_extra` appended to
/// the configuration's `backup:` section.
fn installation(s: &Scratch, backup_extra: &str) -> Installation {
    Installation::create(s.path(), "volback.yaml", "catalog.db", backup_extra)
}

/// `backup create VOLUME [extra...] --json`, with `FAILPOINTS` if given;
/// not run yet.
fn backup_command(
    inst: &Installation,
    volume: &str,
    extra: &[&str],
    failpoints: Option<&str>,
) -> Command {
    let mut args = vec!["backup", "create", volume];
    args.extend_from_slice(extra);
    args.push("--json");
    let mut cmd = inst.command(args);
    if let Some(fp) = failpoints {
        cmd.env("FAILPOINTS", fp);
    }
    cmd
}

fn parse_json(r: &Run) -> Value {
    serde_json::from_str(r.stdout.trim())
        .unwrap_or_else(|e| panic!("stdout is not one JSON document ({e})\n{}", r.describe()))
}

/// `backup create VOLUME [extra...] --json`, asserting success.
fn backup(inst: &Installation, volume: &str, extra: &[&str]) -> Value {
    parse_json(&run(backup_command(inst, volume, extra, None)).assert_success())
}

/// As [`backup`], with its `created_at` set through the fail point.
fn backup_at(inst: &Installation, volume: &str, extra: &[&str], created_at: u64) -> Value {
    let fp = format!("backup_created_at=return({created_at})");
    let b = parse_json(&run(backup_command(inst, volume, extra, Some(&fp))).assert_success());
    assert_eq!(
        json_u64(&b, "created_at"),
        created_at,
        "the backup_created_at fail point was not applied (is the binary built with \
         --features volback-engine/failpoints?): {b}"
    );
    b
}

fn id(b: &Value) -> String {
    json_str(b, "id").to_owned()
}

/// A nullable string field.
fn opt_str<'a>(b: &'a Value, field: &str) -> Option<&'a str> {
    match b.get(field) {
        Some(Value::Null) => None,
        Some(v) => Some(
            v.as_str()
                .unwrap_or_else(|| panic!("field {field:?} is not a string or null in {b}")),
        ),
        None => panic!("field {field:?} missing from {b}"),
    }
}

/// Asserts that `b` is an incremental on `parent` with this change
/// tracking, written into the parent's destination volume, and a restore
/// point of its own.
fn assert_incremental(b: &Value, parent: &Value, tracking: &str) {
    assert_eq!(json_str(b, "state"), "available", "{b}");
    assert_eq!(json_str(b, "mode"), "incremental", "{b}");
    assert_eq!(json_str(b, "change_tracking"), tracking, "{b}");
    assert_eq!(opt_str(b, "parent_id"), Some(json_str(parent, "id")), "{b}");
    assert_eq!(opt_str(b, "note"), None, "an incremental has no note: {b}");
    assert_eq!(
        json_str(b, "target_volume_id"),
        json_str(parent, "target_volume_id"),
        "an incremental writes into its parent's destination volume: {b}"
    );
    let snap = opt_str(b, "target_snapshot_id").expect("an incremental has a restore point");
    assert_ne!(
        Some(snap),
        opt_str(parent, "target_snapshot_id"),
        "an incremental has a restore point of its own: {b}"
    );
}

/// Asserts that `b` is a full backup onto a new destination volume (not the
/// one of `other`, if given) whose note contains every one of `note_has`.
fn assert_forced_full(b: &Value, other: Option<&Value>, note_has: &[&str]) {
    assert_eq!(json_str(b, "state"), "available", "{b}");
    assert_eq!(json_str(b, "mode"), "full", "{b}");
    assert_eq!(json_str(b, "change_tracking"), "full", "{b}");
    assert_eq!(opt_str(b, "parent_id"), None, "{b}");
    let note = opt_str(b, "note").unwrap_or_else(|| panic!("a forced full has a note: {b}"));
    for part in note_has {
        assert!(
            note.contains(part),
            "the note should mention {part:?}: {note:?}\n{b}"
        );
    }
    if let Some(other) = other {
        assert_ne!(
            json_str(b, "target_volume_id"),
            json_str(other, "target_volume_id"),
            "a full backup gets a new destination volume: {b}"
        );
    }
}

/// Writes regions into a volume's image and syncs it.
fn change(img: &Path, regions: &[Region]) {
    let f = OpenOptions::new()
        .write(true)
        .open(img)
        .unwrap_or_else(|e| panic!("opening {}: {e}", img.display()));
    write_regions(&f, regions);
    f.sync_all()
        .unwrap_or_else(|e| panic!("syncing {}: {e}", img.display()));
}

/// Deallocates a range of a volume's image (it then reads as zeroes).
fn punch_hole(img: &Path, offset: u64, len: u64) {
    let f = OpenOptions::new()
        .write(true)
        .open(img)
        .unwrap_or_else(|e| panic!("opening {}: {e}", img.display()));
    // SAFETY: fallocate on a descriptor we own; no memory is passed.
    let r = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    assert_eq!(
        r,
        0,
        "punching a hole at {offset}+{len} in {}: {}",
        img.display(),
        std::io::Error::last_os_error()
    );
    f.sync_all()
        .unwrap_or_else(|e| panic!("syncing {}: {e}", img.display()));
}

/// Keeps a copy of a volume's image (holes stay holes): the source as it
/// was when a backup was taken.
fn record_copy(img: &Path, to: &Path) {
    let mut cmd = Command::new("cp");
    cmd.arg("--sparse=always").arg(img).arg(to);
    let r = run(cmd);
    assert!(r.success(), "copying the source\n{}", r.describe());
}

/// Bytes of the distinct `block`-sized blocks of a `size`-byte volume that
/// the (offset, len) ranges touch; the last, partial block counts as its
/// length.
fn changed_block_bytes(ranges: &[(u64, u64)], block: u64, size: u64) -> u64 {
    let mut blocks = BTreeSet::new();
    for &(offset, len) in ranges {
        assert!(len > 0 && offset + len <= size);
        blocks.extend(offset / block..(offset + len).div_ceil(block));
    }
    blocks.iter().map(|b| block.min(size - b * block)).sum()
}

fn ranges_of(regions: &[Region]) -> Vec<(u64, u64)> {
    regions.iter().map(|r| (r.offset, r.len)).collect()
}

/// Restores `backup` to a new volume on silver; returns its image.
fn restore_new(inst: &Installation, backup: &str, name: &str) -> PathBuf {
    let v = inst.json(["restore", backup, "--to", SILVER, "--name", name, "--json"]);
    assert_eq!(json_str(&v, "pool"), "silver", "{v}");
    inst.volume_img(SILVER, json_str(&v, "volume"))
}

/// Restores `backup` to a new volume and asserts it equals `expected` (the
/// source as it was at that backup), size included.
fn assert_restores(inst: &Installation, backup: &str, expected: &Path, name: &str) {
    let img = restore_new(inst, backup, name);
    let size = file_size(expected);
    assert_eq!(
        file_size(&img),
        size,
        "restore of {backup} ({name}) has the wrong size"
    );
    assert_same(expected, &img, size);
}

/// The ids of the `<kind>-<id>.img` files in a pool directory.
fn ids_in(inst: &Installation, pool: &str, kind: &str) -> BTreeSet<String> {
    let prefix = format!("{kind}-");
    dir_entries(inst.pool_dir(pool))
        .into_iter()
        .filter_map(|n| {
            n.strip_prefix(&prefix)
                .and_then(|n| n.strip_suffix(".img"))
                .map(str::to_owned)
        })
        .collect()
}

/// Every volume or snapshot file (image or sidecar) in a pool directory.
fn object_files(inst: &Installation, pool: &str) -> Vec<String> {
    dir_entries(inst.pool_dir(pool))
        .into_iter()
        .filter(|n| n.starts_with("volume-") || n.starts_with("snapshot-"))
        .collect()
}

fn set_of<I: IntoIterator<Item = S>, S: Into<String>>(items: I) -> BTreeSet<String> {
    items.into_iter().map(Into::into).collect()
}

fn backup_ids(inst: &Installation) -> BTreeSet<String> {
    inst.backups().iter().map(id).collect()
}

fn delete_backup(inst: &Installation, id: &str) {
    inst.ok(["backup", "delete", id]);
}

/// Grows or shrinks a file-driver volume behind volback's back (the driver
/// has no resize): the image's length and the sidecar's `size`.
fn resize_volume(inst: &Installation, pool: &str, volume: &str, size: u64) {
    let img = inst.volume_img(pool, volume);
    OpenOptions::new()
        .write(true)
        .open(&img)
        .and_then(|f| f.set_len(size))
        .unwrap_or_else(|e| panic!("resizing {}: {e}", img.display()));
    let sidecar = inst.volume_json(pool, volume);
    let text = std::fs::read_to_string(&sidecar)
        .unwrap_or_else(|e| panic!("reading {}: {e}", sidecar.display()));
    let mut v: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("parsing {}: {e}", sidecar.display()));
    assert!(
        v.get("size").is_some(),
        "no size in {}: {v}",
        sidecar.display()
    );
    v["size"] = size.into();
    std::fs::write(&sidecar, format!("{v:#}\n"))
        .unwrap_or_else(|e| panic!("writing {}: {e}", sidecar.display()));
}

/// An XFS file system (with reflinks) on a loop device over a sparse file,
/// mounted on `dir`. Drop unmounts it, then detaches the device.
struct XfsMount {
    dir: PathBuf,
    // Dropped after Drop::drop has unmounted.
    _dev: LoopDevice,
}

impl XfsMount {
    fn new(image: &Path, size: u64, dir: &Path) -> XfsMount {
        create_sparse_file(image, size);
        let dev = LoopDevice::attach(image, false);
        let r = run({
            let mut cmd = Command::new("mkfs.xfs");
            cmd.args(["-q", "-f", "-m", "reflink=1"]).arg(dev.path());
            cmd
        });
        assert!(r.success(), "mkfs.xfs failed\n{}", r.describe());
        std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        let r = run({
            let mut cmd = Command::new("mount");
            cmd.args(["-t", "xfs"]).arg(dev.path()).arg(dir);
            cmd
        });
        assert!(r.success(), "mounting XFS failed\n{}", r.describe());
        XfsMount {
            dir: dir.to_path_buf(),
            _dev: dev,
        }
    }
}

impl Drop for XfsMount {
    fn drop(&mut self) {
        for attempt in 0..10u64 {
            if attempt > 0 {
                std::thread::sleep(Duration::from_millis(50 * attempt));
            }
            if attempt == 3 {
                // Loop devices volback left on images in the file system
                // keep it busy (a failing test; a passing one asserts there
                // are none).
                let n = detach_loop_devices_under(&self.dir);
                if n > 0 {
                    eprintln!(
                        "warning: detached {n} loop device(s) left on files in {}",
                        self.dir.display()
                    );
                }
            }
            match Command::new("umount").arg(&self.dir).output() {
                Ok(out) if out.status.success() => return,
                _ => {}
            }
        }
        let _ = Command::new("umount").arg("-l").arg(&self.dir).output();
        eprintln!("warning: {} was unmounted lazily", self.dir.display());
    }
}

// ---------------------------------------------------------------------------
// 1. A hash-map chain on ext4
// ---------------------------------------------------------------------------

/// One step of a chain: what changes before the backup.
struct Step {
    what: &'static str,
    regions: Vec<Region>,
    /// Ranges deallocated (punched) after the regions are written.
    punches: Vec<(u64, u64)>,
}

#[test]
fn hash_map_chain_writes_only_changed_blocks_and_every_backup_restores() {
    with_scratch(|s| {
        let _sweep = LoopSweeper::new(s.path());
        let inst = installation(s, MAP64);
        // A partial last map block: 40 MiB + 20 KiB.
        let size = 40 * MIB + 20 * KIB;
        let vol = inst.create_volume(GOLD, "chain", size);
        let img = inst.volume_img(GOLD, &vol);
        change(
            &img,
            &[
                Region::random(0, 8 * MIB, 1),
                Region::random(16 * MIB, 8 * MIB, 2),
                Region::random(32 * MIB, 4 * MIB, 3),
                Region::random(40 * MIB + 4 * KIB, 8 * KIB, 4),
            ],
        );

        let b0 = backup(&inst, &vol, &[]);
        assert_eq!(json_str(&b0, "state"), "available", "{b0}");
        assert_eq!(json_str(&b0, "mode"), "full", "{b0}");
        assert_eq!(json_str(&b0, "change_tracking"), "full", "{b0}");
        assert_eq!(
            opt_str(&b0, "note"),
            None,
            "a requested full has no note: {b0}"
        );
        assert_eq!(json_u64(&b0, "map_block_size"), MAP_BLOCK, "{b0}");
        assert_eq!(json_u64(&b0, "volume_size"), size, "{b0}");
        assert!(
            json_str(&b0, "checksum").starts_with("map-xxh3-128:65536:"),
            "{b0}"
        );
        assert!(opt_str(&b0, "target_snapshot_id").is_some(), "{b0}");
        assert_eq!(
            opt_str(&b0, "source_snapshot_id"),
            None,
            "no source snapshot is kept without driver change tracking: {b0}"
        );
        let copy0 = s.join("source-at-b0.img");
        record_copy(&img, &copy0);
        let mut points = vec![(b0.clone(), copy0)];

        let steps = [
            Step {
                what: "overwrites",
                regions: vec![
                    // Inside block 1.
                    Region::random(100 * KIB, 5000, 11),
                    // Straddling blocks 15 and 16.
                    Region::random(MIB - 10, 20, 12),
                    // Blocks 272..=275, the last one partly.
                    Region::random(17 * MIB, 200 * KIB, 13),
                    // In the partial last block.
                    Region::random(40 * MIB + 16 * KIB, 2 * KIB, 14),
                ],
                punches: vec![],
            },
            Step {
                what: "new data in holes",
                regions: vec![
                    // Blocks 160..=162 of the hole [8, 16) MiB, unaligned.
                    Region::random(10 * MIB + 4 * KIB, 128 * KIB, 21),
                    // Exactly block 416 of the hole [24, 32) MiB.
                    Region::random(26 * MIB, 64 * KIB, 22),
                    // 1 KiB in a hole of the partial last block.
                    Region::random(40 * MIB + 13 * KIB, KIB, 23),
                ],
                punches: vec![],
            },
            Step {
                what: "data turned to zeroes",
                regions: vec![
                    // Written zeroes over blocks 32..=35.
                    Region::zeros(2 * MIB, 256 * KIB),
                    // Written zeroes over part of block 528.
                    Region::zeros(33 * MIB + 10 * KIB, 10 * KIB),
                ],
                // Blocks 320 and 321 deallocated.
                punches: vec![(20 * MIB, 128 * KIB)],
            },
        ];
        for (i, step) in steps.iter().enumerate() {
            let n = i + 1;
            change(&img, &step.regions);
            for &(offset, len) in &step.punches {
                punch_hole(&img, offset, len);
            }
            let mut changed = ranges_of(&step.regions);
            changed.extend(&step.punches);
            let expected = changed_block_bytes(&changed, MAP_BLOCK, size);

            let b = backup(&inst, &vol, &["--incremental"]);
            let parent = &points.last().expect("b0").0;
            assert_incremental(&b, parent, "hash-map");
            assert_eq!(json_u64(&b, "volume_size"), size, "{b}");
            assert_eq!(json_u64(&b, "map_block_size"), MAP_BLOCK, "{b}");
            assert_eq!(
                json_u64(&b, "bytes_written"),
                expected,
                "B{n} ({}): bytes_written should be the {} changed map blocks ({expected} bytes)\n{b}",
                step.what,
                expected.div_ceil(MAP_BLOCK)
            );
            assert_ne!(
                json_str(&b, "checksum"),
                json_str(parent, "checksum"),
                "B{n}: the data changed, so must the checksum: {b}"
            );
            let copy = s.join(format!("source-at-b{n}.img"));
            record_copy(&img, &copy);
            points.push((b, copy));
        }

        // Every backup restores to the source as it was then.
        for (i, (b, copy)) in points.iter().enumerate() {
            assert_restores(&inst, json_str(b, "id"), copy, &format!("b{i}"));
        }

        // The chain's backups are independent restore points: delete a
        // middle one and the oldest.
        let ids: Vec<String> = points.iter().map(|(b, _)| id(b)).collect();
        let target_volume = json_str(&b0, "target_volume_id").to_owned();
        delete_backup(&inst, &ids[1]);
        delete_backup(&inst, &ids[0]);
        assert_eq!(backup_ids(&inst), set_of([&ids[2], &ids[3]]));
        for (i, (b, copy)) in points.iter().enumerate().skip(2) {
            inst.ok(["backup", "verify", json_str(b, "id")]);
            assert_restores(&inst, json_str(b, "id"), copy, &format!("b{i}-again"));
        }
        assert_eq!(
            ids_in(&inst, VAULT, "volume"),
            set_of([target_volume.as_str()]),
            "the destination volume stays while backups use it"
        );
        assert_eq!(
            ids_in(&inst, VAULT, "snapshot"),
            points[2..]
                .iter()
                .map(|(b, _)| opt_str(b, "target_snapshot_id").unwrap().to_owned())
                .collect(),
            "the deleted backups' restore points are gone, the others stay"
        );

        delete_backup(&inst, &ids[3]);
        delete_backup(&inst, &ids[2]);
        assert!(inst.backups().is_empty());
        assert_eq!(
            object_files(&inst, VAULT),
            Vec::<String>::new(),
            "deleting the last backup removes the destination volume and every snapshot"
        );
    });
}

// ---------------------------------------------------------------------------
// 2. Driver change tracking on XFS
// ---------------------------------------------------------------------------

#[test]
fn driver_change_tracking_on_xfs_reads_only_what_changed() {
    with_scratch(|s| {
        let _sweep = LoopSweeper::new(s.path());
        // The source pools (primary/gold, primary/silver) on XFS; the vault
        // and the catalog on ext4.
        let xfs = XfsMount::new(&s.join("xfs.img"), 512 * MIB, &s.join("primary"));
        let inst = installation(s, MAP64);
        let size = 64 * MIB;
        let vol = inst.create_volume(GOLD, "tracked", size);
        let img = inst.volume_img(GOLD, &vol);
        change(
            &img,
            &[
                Region::random(0, 24 * MIB, 1),
                Region::random(40 * MIB, 8 * MIB, 2),
            ],
        );

        // --incremental without any backup yet: a full, saying why.
        let b0 = backup(&inst, &vol, &["--incremental"]);
        assert_forced_full(&b0, None, &["no available backup"]);
        let snap0 = opt_str(&b0, "source_snapshot_id")
            .unwrap_or_else(|| panic!("a source on XFS keeps a snapshot for tracking: {b0}"))
            .to_owned();
        assert_eq!(ids_in(&inst, GOLD, "snapshot"), set_of([snap0.as_str()]));
        let copy0 = s.join("source-at-b0.img");
        record_copy(&img, &copy0);

        // 2 MiB changed: overwrites (one not 64 KiB-aligned) and new data in
        // a hole.
        let changes = [
            Region::random(3 * MIB + 4 * KIB, MIB, 11),
            Region::random(44 * MIB, 512 * KIB, 12),
            Region::random(60 * MIB, 512 * KIB, 13),
        ];
        change(&img, &changes);
        let changed = changed_block_bytes(&ranges_of(&changes), MAP_BLOCK, size);
        let bound = changed + 4 * MAP_BLOCK;

        let b1 = backup(&inst, &vol, &["--incremental"]);
        assert_incremental(&b1, &b0, "driver");
        let read = json_u64(&b1, "bytes_read");
        let written = json_u64(&b1, "bytes_written");
        assert!(
            (2 * MIB..=bound).contains(&read),
            "B1 should read the 2 MiB changed, rounded to map blocks ({changed} bytes) and at \
             most 4 blocks more ({bound}), not {read} of the {size}-byte volume\n{b1}"
        );
        assert!(
            (2 * MIB..=bound).contains(&written),
            "B1 wrote {written} bytes for 2 MiB changed (bound {bound})\n{b1}"
        );
        let snap1 = opt_str(&b1, "source_snapshot_id")
            .unwrap_or_else(|| panic!("B1 keeps its source snapshot: {b1}"))
            .to_owned();
        assert_ne!(snap0, snap1);
        assert_eq!(
            ids_in(&inst, GOLD, "snapshot"),
            set_of([snap1.as_str()]),
            "after the incremental only its own source snapshot remains"
        );
        assert_eq!(
            opt_str(&inst.show_backup(&id(&b0)), "source_snapshot_id"),
            None,
            "the parent forgets the source snapshot that was deleted"
        );
        let copy1 = s.join("source-at-b1.img");
        record_copy(&img, &copy1);

        // A 4 KiB change: one map block read.
        let tiny = [Region::random(10 * MIB + 8 * KIB, 4 * KIB, 21)];
        change(&img, &tiny);
        let b2 = backup(&inst, &vol, &["--incremental"]);
        assert_incremental(&b2, &b1, "driver");
        assert!(
            json_u64(&b2, "bytes_read") <= 2 * MAP_BLOCK,
            "a 4 KiB change should read one map block\n{b2}"
        );
        assert!(json_u64(&b2, "bytes_read") >= 4 * KIB, "{b2}");
        let copy2 = s.join("source-at-b2.img");
        record_copy(&img, &copy2);
        assert_eq!(ids_in(&inst, GOLD, "snapshot").len(), 1);

        assert_restores(&inst, &id(&b0), &copy0, "b0");
        assert_restores(&inst, &id(&b1), &copy1, "b1");
        assert_restores(&inst, &id(&b2), &copy2, "b2");
        inst.ok(["backup", "verify", &id(&b1)]);

        for b in [&b1, &b0, &b2] {
            delete_backup(&inst, &id(b));
        }
        assert!(inst.backups().is_empty());
        assert_eq!(
            ids_in(&inst, GOLD, "snapshot"),
            BTreeSet::new(),
            "no source snapshot is left once every backup is deleted"
        );
        assert_eq!(object_files(&inst, VAULT), Vec::<String>::new());
        assert_no_loop_devices(&xfs.dir);
    });
}

// ---------------------------------------------------------------------------
// 3. Forced full backups
// ---------------------------------------------------------------------------

#[test]
fn changed_map_block_size_forces_a_full_backup() {
    with_scratch(|s| {
        let _sweep = LoopSweeper::new(s.path());
        let inst = installation(s, MAP64);
        let size = 8 * MIB;
        let vol = inst.create_volume(GOLD, "blocks", size);
        let img = inst.volume_img(GOLD, &vol);
        change(&img, &[Region::random(0, 6 * MIB, 1)]);
        let b0 = backup(&inst, &vol, &[]);

        change(&img, &[Region::random(MIB, 4 * KIB, 2)]);
        let big = inst.sibling("big-blocks.yaml", "catalog.db", "  map_block_size: 128K\n");
        let b1 = backup(&big, &vol, &["--incremental"]);
        assert_forced_full(&b1, Some(&b0), &["block size", "65536", "131072"]);
        assert_eq!(json_u64(&b1, "map_block_size"), 128 * KIB, "{b1}");
        let copy1 = s.join("source-at-b1.img");
        record_copy(&img, &copy1);

        // With the new size kept, the next one builds on it.
        change(&img, &[Region::random(5 * MIB, 4 * KIB, 3)]);
        let b2 = backup(&big, &vol, &["--incremental"]);
        assert_incremental(&b2, &b1, "hash-map");
        assert_eq!(json_u64(&b2, "bytes_written"), 128 * KIB, "{b2}");
        let copy2 = s.join("source-at-b2.img");
        record_copy(&img, &copy2);

        assert_restores(&inst, &id(&b1), &copy1, "b1");
        assert_restores(&inst, &id(&b2), &copy2, "b2");
    });
}

#[test]
fn parent_in_error_state_or_deleted() {
    with_scratch(|s| {
        let _sweep = LoopSweeper::new(s.path());
        let inst = installation(s, MAP64);
        let size = 8 * MIB;
        let vol = inst.create_volume(GOLD, "parents", size);
        let img = inst.volume_img(GOLD, &vol);
        change(&img, &[Region::random(0, 6 * MIB, 1)]);
        let good = backup(&inst, &vol, &[]);

        // A backup that died at its start: in state error after recovery.
        let r = run(backup_command(
            &inst,
            &vol,
            &[],
            Some("backup_start=return"),
        ));
        assert_eq!(
            r.status().signal(),
            Some(libc::SIGABRT),
            "expected an abort at the fail point backup_start\n{}",
            r.describe()
        );
        inst.ok(["recover"]);
        let failed: Vec<Value> = inst
            .backups()
            .into_iter()
            .filter(|b| json_str(b, "state") == "error")
            .collect();
        assert_eq!(failed.len(), 1, "one backup in state error: {failed:?}");
        let failed_id = id(&failed[0]);

        // --parent an error backup: a full backup that says why.
        change(&img, &[Region::random(MIB, 4 * KIB, 2)]);
        let b = backup(&inst, &vol, &["--parent", &failed_id]);
        assert_forced_full(&b, Some(&good), &[failed_id.as_str(), "error"]);
        let copy = s.join("source-at-b.img");
        record_copy(&img, &copy);
        assert_restores(&inst, &id(&b), &copy, "b");

        // --parent a deleted backup: a clear error, and nothing created.
        let gone = backup(&inst, &vol, &[]);
        let gone_id = id(&gone);
        delete_backup(&inst, &gone_id);
        let before_ids = backup_ids(&inst);
        let before_vault = object_files(&inst, VAULT);
        let r = run(backup_command(&inst, &vol, &["--parent", &gone_id], None)).assert_failure();
        assert!(
            r.stderr.contains(&gone_id),
            "the error should name the missing parent\n{}",
            r.describe()
        );
        assert_eq!(backup_ids(&inst), before_ids, "no backup record was added");
        assert_eq!(
            object_files(&inst, VAULT),
            before_vault,
            "nothing was created"
        );
    });
}

#[test]
fn grown_or_shrunk_volume_forces_a_full_backup() {
    with_scratch(|s| {
        let _sweep = LoopSweeper::new(s.path());
        let inst = installation(s, MAP64);
        let vol = inst.create_volume(GOLD, "growing", 8 * MIB);
        let img = inst.volume_img(GOLD, &vol);
        change(&img, &[Region::random(0, 8 * MIB, 1)]);
        let b0 = backup(&inst, &vol, &[]);

        // Grown to 12 MiB, with data in the new part.
        resize_volume(&inst, GOLD, &vol, 12 * MIB);
        change(&img, &[Region::random(9 * MIB, MIB, 2)]);
        let b1 = backup(&inst, &vol, &["--incremental"]);
        assert_forced_full(&b1, Some(&b0), &["grew"]);
        assert_eq!(json_u64(&b1, "volume_size"), 12 * MIB, "{b1}");
        let copy1 = s.join("source-at-b1.img");
        record_copy(&img, &copy1);

        // Shrunk to 10 MiB.
        resize_volume(&inst, GOLD, &vol, 10 * MIB);
        let b2 = backup(&inst, &vol, &["--incremental"]);
        assert_forced_full(&b2, Some(&b1), &["shrank"]);
        assert_eq!(json_u64(&b2, "volume_size"), 10 * MIB, "{b2}");
        let copy2 = s.join("source-at-b2.img");
        record_copy(&img, &copy2);

        assert_restores(&inst, &id(&b1), &copy1, "b1");
        assert_restores(&inst, &id(&b2), &copy2, "b2");
    });
}

// ---------------------------------------------------------------------------
// 4. A damaged restore point
// ---------------------------------------------------------------------------

#[test]
fn verify_and_restore_catch_a_corrupted_restore_point() {
    with_scratch(|s| {
        let _sweep = LoopSweeper::new(s.path());
        let inst = installation(s, MAP64);
        let size = 8 * MIB;
        let vol = inst.create_volume(GOLD, "damaged", size);
        let img = inst.volume_img(GOLD, &vol);
        change(&img, &[Region::random(0, size, 1)]);
        let b0 = backup(&inst, &vol, &[]);
        let copy0 = s.join("source-at-b0.img");
        record_copy(&img, &copy0);
        change(&img, &[Region::random(2 * MIB, 4 * KIB, 2)]);
        let b1 = backup(&inst, &vol, &["--incremental"]);
        assert_incremental(&b1, &b0, "hash-map");
        inst.ok(["backup", "verify", &id(&b1)]);

        // Flip a byte in block 5 of B1's restore point.
        let snap = opt_str(&b1, "target_snapshot_id").expect("restore point");
        let snap_img = inst.pool_dir(VAULT).join(format!("snapshot-{snap}.img"));
        let at = 5 * MAP_BLOCK + 1234;
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&snap_img)
            .unwrap_or_else(|e| panic!("opening {}: {e}", snap_img.display()));
        let mut byte = [0u8; 1];
        f.read_exact_at(&mut byte, at)
            .expect("reading the restore point");
        f.write_all_at(&[byte[0] ^ 0xFF], at)
            .expect("corrupting the restore point");
        f.sync_all().expect("syncing the restore point");
        drop(f);

        let r = inst.err(["backup", "verify", &id(&b1)]);
        assert!(r.stderr.contains("damaged"), "{}", r.describe());
        let block_offset = (5 * MAP_BLOCK).to_string();
        assert!(
            r.stderr.contains(&block_offset),
            "verify should name the damaged block's offset {block_offset}\n{}",
            r.describe()
        );

        let silver_before = dir_entries(inst.pool_dir(SILVER));
        let r = inst.err([
            "restore",
            &id(&b1),
            "--to",
            SILVER,
            "--name",
            "bad",
            "--json",
        ]);
        assert!(r.stderr.contains("damaged"), "{}", r.describe());
        assert!(r.stderr.contains(&block_offset), "{}", r.describe());
        assert_eq!(
            dir_entries(inst.pool_dir(SILVER)),
            silver_before,
            "a failed restore leaves no volume behind"
        );
        assert_eq!(
            json_str(&inst.show_backup(&id(&b1)), "state"),
            "available",
            "a failed restore leaves the backup as it was"
        );

        // The other restore point of the chain is intact.
        inst.ok(["backup", "verify", &id(&b0)]);
        assert_restores(&inst, &id(&b0), &copy0, "b0");
    });
}

// ---------------------------------------------------------------------------
// 5. Retention over an incremental chain
// ---------------------------------------------------------------------------

/// The ids the retention rules keep, computed independently of volback:
/// the `last` newest; the newest of each of the `daily` most recent UTC
/// days with a backup; the newest of each of the `weekly` most recent ISO
/// weeks (Monday to Sunday, UTC) with a backup.
fn expected_kept(
    backups: &[(String, u64)],
    last: usize,
    daily: usize,
    weekly: usize,
) -> BTreeSet<String> {
    let mut newest_first = backups.to_vec();
    newest_first.sort_by_key(|b| std::cmp::Reverse(b.1));
    let mut keep: BTreeSet<String> = newest_first
        .iter()
        .take(last)
        .map(|b| b.0.clone())
        .collect();
    let day: fn(u64) -> u64 = |t| t / DAY;
    // 1970-01-01 was a Thursday: weekday (Monday = 0) is (day + 3) % 7.
    let monday: fn(u64) -> u64 = |t| {
        let d = t / DAY;
        d - (d + 3) % 7
    };
    for (bucket, count) in [(day, daily), (monday, weekly)] {
        let mut seen = Vec::new();
        for (id, t) in &newest_first {
            if seen.len() == count {
                break;
            }
            if !seen.contains(&bucket(*t)) {
                seen.push(bucket(*t));
                keep.insert(id.clone());
            }
        }
    }
    keep
}

#[test]
fn prune_keeps_last_daily_and_weekly_and_kept_backups_restore() {
    with_scratch(|s| {
        let _sweep = LoopSweeper::new(s.path());
        let inst = installation(s, MAP64);
        let size = 4 * MIB;
        let vol = inst.create_volume(GOLD, "retained", size);
        let img = inst.volume_img(GOLD, &vol);
        change(&img, &[Region::random(0, 3 * MIB, 1)]);

        // Monday 2024-01-01 00:00 UTC.
        let monday = 1_704_067_200;
        assert_eq!((monday / DAY + 3) % 7, 0, "a Monday");
        let times = [
            monday + 10 * HOUR,            // b0: week 1, Monday
            monday + 2 * DAY + 9 * HOUR,   // b1: week 1, Wednesday
            monday + 2 * DAY + 18 * HOUR,  // b2: week 1, Wednesday, later
            monday + 8 * DAY + 8 * HOUR,   // b3: week 2, Tuesday
            monday + 10 * DAY + 7 * HOUR,  // b4: week 2, Thursday
            monday + 10 * DAY + 20 * HOUR, // b5: week 2, Thursday, later
        ];
        let mut points: Vec<(Value, PathBuf)> = Vec::new();
        for (i, &t) in times.iter().enumerate() {
            if i > 0 {
                change(
                    &img,
                    &[Region::random(
                        i as u64 * 256 * KIB + 4 * KIB,
                        8 * KIB,
                        10 + i as u64,
                    )],
                );
            }
            let b = backup_at(&inst, &vol, &["--incremental"], t);
            if let Some((parent, _)) = points.last() {
                assert_incremental(&b, parent, "hash-map");
            }
            let copy = s.join(format!("source-at-b{i}.img"));
            record_copy(&img, &copy);
            points.push((b, copy));
        }
        let ids: Vec<String> = points.iter().map(|(b, _)| id(b)).collect();
        let all: BTreeSet<String> = ids.iter().cloned().collect();
        let stamped: Vec<(String, u64)> = ids.iter().cloned().zip(times).collect();
        let keep = expected_kept(&stamped, 1, 2, 2);
        assert_eq!(
            keep,
            set_of([&ids[2], &ids[3], &ids[5]]),
            "the test's own expectation: b5 (last, day, week 2), b3 (day), b2 (week 1)"
        );
        let delete: BTreeSet<String> = all.difference(&keep).cloned().collect();

        let prune = |dry: bool| -> (BTreeSet<String>, BTreeSet<String>) {
            let mut args = vec![
                "backup",
                "prune",
                vol.as_str(),
                "--keep-last",
                "1",
                "--keep-daily",
                "2",
                "--keep-weekly",
                "2",
                "--json",
            ];
            if dry {
                args.push("--dry-run");
            }
            let v = inst.json(args);
            let list = |f: &str| -> BTreeSet<String> {
                v[f].as_array()
                    .unwrap_or_else(|| panic!("{f} is not an array: {v}"))
                    .iter()
                    .map(|x| x.as_str().expect("an id").to_owned())
                    .collect()
            };
            (list("kept"), list("deleted"))
        };

        let (kept, deleted) = prune(true);
        assert_eq!((&kept, &deleted), (&keep, &delete), "dry run");
        assert_eq!(backup_ids(&inst), all, "a dry run deletes nothing");

        let (kept, deleted) = prune(false);
        assert_eq!((&kept, &deleted), (&keep, &delete));
        assert_eq!(backup_ids(&inst), keep);
        let snapshots: BTreeSet<String> = points
            .iter()
            .filter(|(b, _)| keep.contains(json_str(b, "id")))
            .map(|(b, _)| opt_str(b, "target_snapshot_id").unwrap().to_owned())
            .collect();
        assert_eq!(ids_in(&inst, VAULT, "snapshot"), snapshots);

        // The kept ones are complete restore points, their parents gone.
        for (i, (b, copy)) in points.iter().enumerate() {
            if keep.contains(json_str(b, "id")) {
                inst.ok(["backup", "verify", json_str(b, "id")]);
                assert_restores(&inst, json_str(b, "id"), copy, &format!("b{i}"));
            }
        }

        // And the chain goes on from the newest.
        change(&img, &[Region::random(3 * MIB + 4 * KIB, 4 * KIB, 99)]);
        let next = backup(&inst, &vol, &["--incremental"]);
        assert_incremental(&next, &points[5].0, "hash-map");
        assert_eq!(json_u64(&next, "bytes_written"), MAP_BLOCK, "{next}");
        let copy = s.join("source-at-next.img");
        record_copy(&img, &copy);
        assert_restores(&inst, &id(&next), &copy, "next");
    });
}

// ---------------------------------------------------------------------------
// 6. An interrupted incremental
// ---------------------------------------------------------------------------

#[test]
fn interrupted_incremental_forces_a_full_onto_a_new_volume() {
    with_scratch(|s| {
        let _sweep = LoopSweeper::new(s.path());
        let inst = installation(s, MAP64);
        // Same pools, catalog and map blocks; reads at 4 MiB/s, 1 MiB at a
        // time and at most 2 in flight, so that the copy advances steadily:
        // reading the 14 MiB of data lasts about 3.5 s and the fail point
        // (half of the 16 MiB volume handled) fires after about 2 s. (With
        // the default 32 x 4 MiB queue, every read of so small a volume is
        // issued, throttled, before any completes, and progress jumps from
        // 0 to all done at the end.)
        let slow = inst.sibling(
            "slow.yaml",
            "catalog.db",
            "  map_block_size: 64K\n  bwlimit: 4M\n  copy: { block_size: 1M, queue_depth: 2 }\n",
        );
        let size = 16 * MIB;
        let vol = inst.create_volume(GOLD, "crashing", size);
        let img = inst.volume_img(GOLD, &vol);
        change(&img, &[Region::random(0, 14 * MIB, 1)]);
        let b0 = backup(&inst, &vol, &[]);
        let copy0 = s.join("source-at-b0.img");
        record_copy(&img, &copy0);
        change(&img, &[Region::random(5 * MIB, 64 * KIB, 2)]);
        let b1 = backup(&inst, &vol, &["--incremental"]);
        assert_incremental(&b1, &b0, "hash-map");
        let copy1 = s.join("source-at-b1.img");
        record_copy(&img, &copy1);

        // Changes early and late in the volume: the first is written before
        // the crash, the last not.
        change(
            &img,
            &[
                Region::random(64 * KIB, 64 * KIB, 3),
                Region::random(13 * MIB, 128 * KIB, 4),
            ],
        );
        let r = run(backup_command(
            &slow,
            &vol,
            &["--incremental"],
            Some("copy_half_done=return"),
        ));
        assert_eq!(
            r.status().signal(),
            Some(libc::SIGABRT),
            "expected an abort at the fail point copy_half_done (is the binary built with \
             --features volback-engine/failpoints?)\n{}",
            r.describe()
        );
        assert!(r.stderr.contains("copy_half_done"), "{}", r.describe());
        assert!(
            r.elapsed >= Duration::from_secs(1),
            "the copy should have run for a while before the fail point\n{}",
            r.describe()
        );

        let rec = inst.json(["recover", "--json"]);
        let marked: Vec<String> = rec["backups_marked_error"]
            .as_array()
            .unwrap_or_else(|| panic!("backups_marked_error is not an array: {rec}"))
            .iter()
            .map(|x| x.as_str().expect("an id").to_owned())
            .collect();
        assert_eq!(
            marked.len(),
            1,
            "recovery marks the interrupted backup: {rec}"
        );
        let crashed = inst.show_backup(&marked[0]);
        assert_eq!(json_str(&crashed, "state"), "error", "{crashed}");
        assert_eq!(json_str(&crashed, "mode"), "incremental", "{crashed}");
        assert_eq!(opt_str(&crashed, "parent_id"), Some(json_str(&b1, "id")));
        assert_no_loop_devices(s.path());
        // The chain's volume now holds part of the crashed copy (the early
        // change, written about 2 s before the crash, not the late one,
        // read about 1 s after it), so it matches no backup any more.
        let chain_volume = inst.volume_img(VAULT, json_str(&b1, "target_volume_id"));
        assert_same_in(&img, &chain_volume, 64 * KIB..128 * KIB);
        assert_same_in(&copy1, &chain_volume, 13 * MIB..13 * MIB + 128 * KIB);

        // So the next
        // incremental is a full onto a new volume.
        let b2 = backup(&inst, &vol, &["--incremental"]);
        assert_forced_full(&b2, Some(&b0), &["no longer matches"]);
        let copy2 = s.join("source-at-b2.img");
        record_copy(&img, &copy2);
        assert_restores(&inst, &id(&b2), &copy2, "b2");

        // The earlier restore points are intact.
        for (b, copy, name) in [(&b0, &copy0, "b0"), (&b1, &copy1, "b1")] {
            inst.ok(["backup", "verify", &id(b)]);
            assert_restores(&inst, &id(b), copy, name);
        }

        // The new chain goes on incrementally.
        change(&img, &[Region::random(15 * MIB, 4 * KIB, 5)]);
        let b3 = backup(&inst, &vol, &["--incremental"]);
        assert_incremental(&b3, &b2, "hash-map");
        assert_eq!(json_u64(&b3, "bytes_written"), MAP_BLOCK, "{b3}");
        let copy3 = s.join("source-at-b3.img");
        record_copy(&img, &copy3);
        assert_restores(&inst, &id(&b3), &copy3, "b3");

        // Deleting everything, the error backup included, leaves nothing.
        for b in [&b0, &b1, &crashed, &b2, &b3] {
            delete_backup(&inst, &id(b));
        }
        assert!(inst.backups().is_empty());
        assert_eq!(object_files(&inst, VAULT), Vec::<String>::new());
    });
}

#[test]
fn verification_of_an_incremental_catches_a_corrupted_write() {
    with_scratch(|s| {
        let _sweep = LoopSweeper::new(s.path());
        // Verification on (it is also the default), 64 KiB map blocks.
        let inst = installation(s, &format!("{MAP64}  copy: {{ verify: true }}\n"));
        let size = 16 * MIB;
        let vol = inst.create_volume(GOLD, "verified", size);
        let img = inst.volume_img(GOLD, &vol);
        change(&img, &[Region::random(0, 8 * MIB, 1)]);
        let b0 = backup(&inst, &vol, &[]);
        // One changed block; the fail point flips a byte of the data written
        // there, after the source's map was computed from the true data.
        change(&img, &[Region::random(3 * MIB, 4096, 2)]);
        let offset = 3 * MIB + 100;
        let fp = format!("copy_corrupt_write=return({offset})");
        let r = run(backup_command(&inst, &vol, &["--incremental"], Some(&fp)));
        assert!(
            !r.status().success(),
            "a corrupted incremental must fail\n{}",
            r.describe()
        );
        assert!(
            r.stderr.contains("does not match the block map")
                && r.stderr.contains(&(3 * MIB).to_string()),
            "the error names the map mismatch and the block\n{}",
            r.describe()
        );
        // It is not available, and its chain is not trusted any more: the
        // next backup is a full one onto a new volume, and it restores.
        let list: Value =
            serde_json::from_str(&inst.ok(["backup", "list", "--json"]).stdout).unwrap();
        let states: Vec<&str> = list
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["state"].as_str().unwrap())
            .collect();
        assert_eq!(
            states.iter().filter(|s| **s == "available").count(),
            1,
            "{list}"
        );
        let b2 = backup(&inst, &vol, &["--incremental"]);
        assert_forced_full(&b2, Some(&b0), &["no longer matches"]);
        let expected = s.join("source-now.img");
        record_copy(&img, &expected);
        assert_restores(&inst, &id(&b2), &expected, "after-corruption");
    });
}
