//! Tests of the file driver. They run as root (loop devices, bind mounts) in
//! scratch directories under /var/tmp; the scratch guard detaches any loop
//! device left on its files, so a failing test leaves none behind.

use std::fs::File;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use super::*;
use crate::loopdev::test_support::{Mount, Scratch};

const MIB: u64 = 1024 * 1024;

struct Fixture {
    driver: FileDriver,
    dir: PathBuf,
    // Last: dropped after everything that may hold a device.
    _scratch: Scratch,
}

fn fixture() -> Fixture {
    let scratch = Scratch::new();
    let dir = scratch.mkdir("pool");
    let driver = FileDriver::new("test", BTreeMap::from([("p".to_string(), dir.clone())])).unwrap();
    Fixture {
        driver,
        dir,
        _scratch: scratch,
    }
}

fn meta(pairs: &[(&str, &str)]) -> Metadata {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn write_at(path: &Path, offset: u64, data: &[u8]) {
    let f = File::options().write(true).open(path).unwrap();
    f.write_all_at(data, offset).unwrap();
    f.sync_all().unwrap();
}

fn read_all(path: &Path, len: u64) -> Vec<u8> {
    let mut buf = vec![0u8; len as usize];
    File::open(path)
        .unwrap()
        .read_exact_at(&mut buf, 0)
        .unwrap();
    buf
}

/// Whether two files have the same first `len` bytes (read in chunks: the
/// sparse volumes are large).
fn same_content(a: &Path, b: &Path, len: u64) -> bool {
    let (fa, fb) = (File::open(a).unwrap(), File::open(b).unwrap());
    let (mut ba, mut bb) = (vec![0u8; MIB as usize], vec![0u8; MIB as usize]);
    let mut pos = 0;
    while pos < len {
        let n = (len - pos).min(MIB) as usize;
        fa.read_exact_at(&mut ba[..n], pos).unwrap();
        fb.read_exact_at(&mut bb[..n], pos).unwrap();
        if ba[..n] != bb[..n] {
            return false;
        }
        pos += n as u64;
    }
    true
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks() * 512
}

fn export_path(info: &ConnectionInfo) -> PathBuf {
    assert_eq!(info.connector, "local");
    PathBuf::from(&info.properties["path"])
}

#[test]
fn new_validates_pools() {
    let scratch = Scratch::new();
    let missing = scratch.join("missing");
    let e = FileDriver::new(
        "bk",
        BTreeMap::from([("gold".to_string(), missing.clone())]),
    )
    .unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("bk") && msg.contains("gold") && msg.contains(missing.to_str().unwrap()),
        "{msg}"
    );

    let file = scratch.join("plain");
    File::create(&file).unwrap();
    let e =
        FileDriver::new("bk", BTreeMap::from([("gold".to_string(), file.clone())])).unwrap_err();
    assert_eq!(e.kind, DriverErrorKind::InvalidArgument);
    let msg = e.to_string();
    assert!(
        msg.contains("gold") && msg.contains("not a directory"),
        "{msg}"
    );

    let e = FileDriver::new("bk", BTreeMap::new()).unwrap_err();
    assert_eq!(e.kind, DriverErrorKind::InvalidArgument);
}

#[test]
fn create_get_list_delete() {
    let fx = fixture();
    let d = &fx.driver;
    assert_eq!(d.kind(), "file");
    let m = meta(&[("owner", "alice")]);
    let v = d.create_volume("p", "v1", "first", 8 * MIB, &m).unwrap();
    assert_eq!(
        v,
        VolumeInfo {
            id: "v1".into(),
            name: "first".into(),
            pool: "p".into(),
            size: 8 * MIB,
            metadata: m.clone()
        }
    );
    let img = fx.dir.join("volume-v1.img");
    assert_eq!(std::fs::metadata(&img).unwrap().len(), 8 * MIB);
    assert!(allocated(&img) < 64 * 1024, "created sparse");
    assert_eq!(d.get_volume("p", "v1").unwrap(), v);
    let side: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fx.dir.join("volume-v1.json")).unwrap()).unwrap();
    assert_eq!(side["id"], "v1");
    assert_eq!(side["size"], 8 * MIB);
    assert!(side["created"].as_u64().unwrap() > 1_600_000_000);

    d.create_volume("p", "v2", "second", MIB, &Metadata::new())
        .unwrap();
    let ids: Vec<String> = d
        .list_volumes("p")
        .unwrap()
        .into_iter()
        .map(|v| v.id)
        .collect();
    assert_eq!(ids, ["v1", "v2"]);

    let e = d
        .create_volume("p", "v1", "again", MIB, &Metadata::new())
        .unwrap_err();
    assert_eq!(e.kind, DriverErrorKind::AlreadyExists);

    d.delete_volume("p", "v1").unwrap();
    assert!(!img.exists() && !fx.dir.join("volume-v1.json").exists());
    d.delete_volume("p", "v1").unwrap(); // idempotent
    let ids: Vec<String> = d
        .list_volumes("p")
        .unwrap()
        .into_iter()
        .map(|v| v.id)
        .collect();
    assert_eq!(ids, ["v2"]);
    // No temporary files left behind by the atomic sidecar writes.
    let names: Vec<String> = std::fs::read_dir(&fx.dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(names.iter().all(|n| !n.starts_with('.')), "{names:?}");
}

#[test]
fn invalid_arguments() {
    let fx = fixture();
    let d = &fx.driver;
    for size in [0, 1000, MIB + 1] {
        let e = d
            .create_volume("p", "v", "n", size, &Metadata::new())
            .unwrap_err();
        assert_eq!(e.kind, DriverErrorKind::InvalidArgument, "size {size}");
    }
    for id in ["", "../x", "a/b", ".hidden", "x y", "\u{e9}"] {
        let e = d
            .create_volume("p", id, "n", MIB, &Metadata::new())
            .unwrap_err();
        assert_eq!(e.kind, DriverErrorKind::InvalidArgument, "id {id:?}");
    }
    let e = d
        .create_volume("nope", "v", "n", MIB, &Metadata::new())
        .unwrap_err();
    assert_eq!(e.kind, DriverErrorKind::NotFound);
    assert!(e.to_string().contains("nope"), "{e}");
    assert!(
        std::fs::read_dir(&fx.dir).unwrap().next().is_none(),
        "nothing created"
    );
}

#[test]
fn too_big_is_no_space() {
    let fx = fixture();
    let free = fx.driver.pools().unwrap()[0].free_bytes;
    let size = (free / 512 + 1024) * 512;
    let e = fx
        .driver
        .create_volume("p", "huge", "n", size, &Metadata::new())
        .unwrap_err();
    assert_eq!(e.kind, DriverErrorKind::NoSpace);
    let msg = e.to_string();
    assert!(
        msg.contains("'p'") && msg.contains(&size.to_string()) && msg.contains("free"),
        "{msg}"
    );
    assert!(!fx.dir.join("volume-huge.img").exists());
}

#[test]
fn unknown_volume_is_not_found() {
    let fx = fixture();
    let e = fx.driver.get_volume("p", "ghost-42").unwrap_err();
    assert_eq!(e.kind, DriverErrorKind::NotFound);
    let msg = e.to_string();
    assert!(msg.contains("ghost-42") && msg.contains("'p'"), "{msg}");
    let e = fx.driver.create_snapshot("p", "ghost-42", "s").unwrap_err();
    assert_eq!(e.kind, DriverErrorKind::NotFound);
    let e = fx
        .driver
        .export(
            "p",
            &ExportTarget::Volume("ghost-42".into()),
            ExportOptions::default(),
        )
        .unwrap_err();
    assert_eq!(e.kind, DriverErrorKind::NotFound);
    fx.driver
        .unexport("p", &ExportTarget::Volume("ghost-42".into()))
        .unwrap();
    assert!(!fx.driver.in_use("p", "ghost-42").unwrap());
    fx.driver.delete_snapshot("p", "ghost-42").unwrap();
}

#[test]
fn list_skips_orphans() {
    let fx = fixture();
    let d = &fx.driver;
    d.create_volume("p", "good", "n", MIB, &Metadata::new())
        .unwrap();
    File::create(fx.dir.join("volume-noside.img")).unwrap();
    std::fs::copy(
        fx.dir.join("volume-good.json"),
        fx.dir.join("volume-noimg.json"),
    )
    .unwrap();
    std::fs::write(fx.dir.join("volume-bad.json"), "{not json").unwrap();
    File::create(fx.dir.join("volume-bad.img")).unwrap();
    File::create(fx.dir.join(".volume-tmp.json.tmp")).unwrap();
    let ids: Vec<String> = d
        .list_volumes("p")
        .unwrap()
        .into_iter()
        .map(|v| v.id)
        .collect();
    assert_eq!(ids, ["good"]);
    // An unfinished create is cleaned up by deleting its id.
    d.delete_volume("p", "noside").unwrap();
    assert!(!fx.dir.join("volume-noside.img").exists());
}

#[test]
fn snapshot_is_point_in_time() {
    let fx = fixture();
    let d = &fx.driver;
    let size = 4 * MIB;
    d.create_volume("p", "v", "n", size, &Metadata::new())
        .unwrap();
    let img = fx.dir.join("volume-v.img");
    let before = pattern(MIB as usize, 1);
    write_at(&img, MIB, &before);
    let s = d.create_snapshot("p", "v", "s1").unwrap();
    assert_eq!(
        s,
        SnapshotInfo {
            id: "s1".into(),
            volume_id: "v".into(),
            pool: "p".into(),
            size
        }
    );
    write_at(&img, MIB, &pattern(MIB as usize, 2));
    write_at(&img, 0, b"later");

    let snap = read_all(&fx.dir.join("snapshot-s1.img"), size);
    assert_eq!(&snap[MIB as usize..2 * MIB as usize], &before[..]);
    assert!(snap[..MIB as usize].iter().all(|&b| b == 0));
    assert_eq!(
        d.create_snapshot("p", "v", "s1").unwrap_err().kind,
        DriverErrorKind::AlreadyExists
    );

    // Snapshots outlive their volume.
    d.delete_volume("p", "v").unwrap();
    let v2 = d
        .create_volume_from_snapshot("p", "s1", "v2", "restored")
        .unwrap();
    assert_eq!(v2.size, size);
    assert_eq!(d.get_volume("p", "v2").unwrap(), v2);
    assert_eq!(read_all(&fx.dir.join("volume-v2.img"), size), snap);
    let e = d
        .create_volume_from_snapshot("p", "s1", "v2", "again")
        .unwrap_err();
    assert_eq!(e.kind, DriverErrorKind::AlreadyExists);
    assert_eq!(
        d.create_volume_from_snapshot("p", "nosnap", "v3", "x")
            .unwrap_err()
            .kind,
        DriverErrorKind::NotFound
    );

    d.delete_snapshot("p", "s1").unwrap();
    d.delete_snapshot("p", "s1").unwrap();
    assert!(!fx.dir.join("snapshot-s1.img").exists() && !fx.dir.join("snapshot-s1.json").exists());
}

#[test]
fn snapshot_of_sparse_volume_stays_sparse() {
    let fx = fixture();
    let d = &fx.driver;
    let size = 64 * MIB;
    d.create_volume("p", "v", "n", size, &Metadata::new())
        .unwrap();
    let img = fx.dir.join("volume-v.img");
    write_at(&img, 3 * MIB, &pattern(64 * 1024, 3));
    write_at(&img, size - 4096, &pattern(4096, 4));
    d.create_snapshot("p", "v", "s").unwrap();
    let snap = fx.dir.join("snapshot-s.img");
    assert_eq!(std::fs::metadata(&snap).unwrap().len(), size);
    assert!(
        allocated(&snap) <= MIB,
        "snapshot allocates {} bytes",
        allocated(&snap)
    );
    assert!(same_content(&snap, &img, size));
    let v2 = d.create_volume_from_snapshot("p", "s", "v2", "n").unwrap();
    let img2 = fx.dir.join("volume-v2.img");
    assert_eq!(v2.size, size);
    assert!(
        allocated(&img2) <= MIB,
        "clone allocates {} bytes",
        allocated(&img2)
    );
    assert!(same_content(&img2, &img, size));
}

#[test]
fn pool_identity_follows_the_directory() {
    let scratch = Scratch::new();
    let a = scratch.mkdir("a");
    let b = scratch.mkdir("b");
    let link = scratch.join("link");
    std::os::unix::fs::symlink(&a, &link).unwrap();
    let mnt = scratch.mkdir("mnt");
    let _bind = Mount::bind(&a, &mnt);
    let pools = BTreeMap::from([
        ("a".to_string(), a.clone()),
        ("a2".to_string(), a.join("..").join("a").join(".")),
        ("link".to_string(), link),
        ("bind".to_string(), mnt),
        ("b".to_string(), b),
    ]);
    let d = FileDriver::new("t", pools).unwrap();
    let id = |p: &str| d.pool_identity(p).unwrap();
    assert!(id("a").0.starts_with("file:dev="), "{}", id("a"));
    assert_eq!(id("a"), id("a2"));
    assert_eq!(id("a"), id("link"));
    assert_eq!(id("a"), id("bind"));
    assert_ne!(id("a"), id("b"));

    let infos = d.pools().unwrap();
    assert_eq!(infos.len(), 5);
    for p in &infos {
        assert_eq!(p.identity, id(&p.name));
        assert!(
            p.capacity_bytes > 0 && p.free_bytes <= p.capacity_bytes,
            "{p:?}"
        );
    }
}

#[test]
fn export_as_file() {
    let fx = fixture();
    let d = &fx.driver;
    d.create_volume("p", "v", "n", MIB, &Metadata::new())
        .unwrap();
    let info = d
        .export(
            "p",
            &ExportTarget::Volume("v".into()),
            ExportOptions::default(),
        )
        .unwrap();
    assert_eq!(export_path(&info), fx.dir.join("volume-v.img"));
    assert!(!info.read_only);
    let ro = ExportOptions {
        loop_device: false,
        read_only: true,
    };
    assert!(
        d.export("p", &ExportTarget::Volume("v".into()), ro)
            .unwrap()
            .read_only
    );
    d.create_snapshot("p", "v", "s").unwrap();
    let info = d
        .export(
            "p",
            &ExportTarget::Snapshot("s".into()),
            ExportOptions::default(),
        )
        .unwrap();
    assert!(info.read_only, "snapshots are always read-only");
    assert_eq!(export_path(&info), fx.dir.join("snapshot-s.img"));
    assert!(!d.in_use("p", "v").unwrap());
    d.unexport("p", &ExportTarget::Volume("v".into())).unwrap();
}

#[test]
fn export_through_loop_device() {
    let fx = fixture();
    let d = &fx.driver;
    let size = 4 * MIB;
    d.create_volume("p", "v", "n", size, &Metadata::new())
        .unwrap();
    let img = fx.dir.join("volume-v.img");
    let data = pattern(size as usize, 7);
    write_at(&img, 0, &data);

    let target = ExportTarget::Volume("v".into());
    let opts = ExportOptions {
        loop_device: true,
        read_only: false,
    };
    let info = d.export("p", &target, opts).unwrap();
    let dev = export_path(&info);
    assert!(!info.read_only);
    assert!(
        std::fs::metadata(&dev)
            .unwrap()
            .file_type()
            .is_block_device(),
        "{}",
        dev.display()
    );
    assert_eq!(loopdev::find_attached(&img).unwrap(), vec![dev.clone()]);
    assert!(
        read_all(&dev, size) == data,
        "the device reads the volume's data"
    );
    let st = loopdev::status(&dev).unwrap().unwrap();
    assert!(st.direct_io && !st.read_only, "{st:?}");

    assert!(d.in_use("p", "v").unwrap());
    let e = d.delete_volume("p", "v").unwrap_err();
    assert_eq!(e.kind, DriverErrorKind::Busy);
    assert!(e.to_string().contains(dev.to_str().unwrap()), "{e}");
    assert!(img.exists());

    d.unexport("p", &target).unwrap();
    assert!(loopdev::find_attached(&img).unwrap().is_empty());
    assert!(!d.in_use("p", "v").unwrap());
    d.unexport("p", &target).unwrap(); // idempotent
    d.delete_volume("p", "v").unwrap();
}

#[test]
fn snapshot_flushes_loop_device_writes() {
    let fx = fixture();
    let d = &fx.driver;
    let size = 4 * MIB;
    d.create_volume("p", "v", "n", size, &Metadata::new())
        .unwrap();
    let target = ExportTarget::Volume("v".into());
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
    let dev = export_path(&info);
    // A buffered write, not synced, through a descriptor kept open (the
    // last close of a block device would sync it): it sits in the loop
    // device's page cache, not yet in the image file.
    let data = pattern(MIB as usize, 9);
    let writer = File::options().write(true).open(&dev).unwrap();
    writer.write_all_at(&data, MIB).unwrap();
    d.create_snapshot("p", "v", "s").unwrap();
    drop(writer);
    let snap = read_all(&fx.dir.join("snapshot-s.img"), size);
    assert_eq!(&snap[MIB as usize..2 * MIB as usize], &data[..]);
    d.unexport("p", &target).unwrap();
}

#[test]
fn snapshot_export_through_loop_is_read_only() {
    let fx = fixture();
    let d = &fx.driver;
    d.create_volume("p", "v", "n", MIB, &Metadata::new())
        .unwrap();
    write_at(&fx.dir.join("volume-v.img"), 0, b"snapshot me");
    d.create_snapshot("p", "v", "s").unwrap();
    let target = ExportTarget::Snapshot("s".into());
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
    assert!(info.read_only);
    let dev = export_path(&info);
    assert!(loopdev::status(&dev).unwrap().unwrap().read_only);
    assert_eq!(&read_all(&dev, 11)[..], b"snapshot me");
    assert_eq!(
        d.delete_snapshot("p", "s").unwrap_err().kind,
        DriverErrorKind::Busy
    );
    d.unexport("p", &target).unwrap();
    d.delete_snapshot("p", "s").unwrap();
}

#[test]
fn unexport_detaches_every_export() {
    let fx = fixture();
    let d = &fx.driver;
    d.create_volume("p", "v", "n", MIB, &Metadata::new())
        .unwrap();
    let target = ExportTarget::Volume("v".into());
    let opts = ExportOptions {
        loop_device: true,
        read_only: true,
    };
    let a = export_path(&d.export("p", &target, opts).unwrap());
    let b = export_path(&d.export("p", &target, opts).unwrap());
    assert_ne!(a, b);
    assert_eq!(
        loopdev::find_attached(&fx.dir.join("volume-v.img"))
            .unwrap()
            .len(),
        2
    );
    d.unexport("p", &target).unwrap();
    assert!(!d.in_use("p", "v").unwrap());
}
