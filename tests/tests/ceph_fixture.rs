//! The Ceph fixture itself: the two clusters fixtures/test.sh starts (with
//! fixtures/ceph.sh) are up, distinct, and the `RbdImage` helpers round-trip
//! data, snapshots and diffs. Run through fixtures/test.sh: these tests fail
//! (never skip) when the clusters are not running.

use std::path::Path;
use std::process::Command;

use volback_tests::*;

/// `CMD --conf CONF ARGS...` for the `ceph` and `rados` CLIs, bounded so a
/// dead cluster fails the test instead of hanging it.
fn ceph_cli(program: &str, conf: &Path, args: &[&str]) -> String {
    let mut cmd = Command::new("timeout");
    cmd.args(["60", program, "--conf"]).arg(conf).args(args);
    let r = run(cmd).assert_success();
    r.stdout.trim().to_owned()
}

fn pools(conf: &Path) -> Vec<String> {
    ceph_cli("rados", conf, &["lspools"])
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn both_clusters_are_up_with_their_pools_and_distinct() {
    let (a, b) = (ceph_conf('A'), ceph_conf('B'));
    let pools_a = pools(&a);
    for pool in ["rbd", "volumes", "backups"] {
        assert!(
            pools_a.iter().any(|p| p == pool),
            "cluster A lacks pool {pool}: {pools_a:?}"
        );
    }
    let pools_b = pools(&b);
    for pool in ["rbd", "backups"] {
        assert!(
            pools_b.iter().any(|p| p == pool),
            "cluster B lacks pool {pool}: {pools_b:?}"
        );
    }
    assert!(
        !pools_b.iter().any(|p| p == "volumes"),
        "cluster B has A's pools: {pools_b:?}"
    );

    let (fsid_a, fsid_b) = (
        ceph_cli("ceph", &a, &["--connect-timeout", "30", "fsid"]),
        ceph_cli("ceph", &b, &["--connect-timeout", "30", "fsid"]),
    );
    assert_eq!(fsid_a.len(), 36, "not an fsid: {fsid_a:?}");
    assert_ne!(fsid_a, fsid_b, "clusters A and B are the same cluster");

    // An image made in B's pool is not in A's pool of the same name.
    let img = RbdImage::create(&b, "backups", "fixture-where", MIB);
    assert!(rbd_exists(&b, "backups", img.name()));
    assert!(!rbd_exists(&a, "backups", img.name()));
}

#[test]
fn rbd_image_import_export_and_snapshot_round_trip() {
    let conf = ceph_conf('A');
    let scratch = Scratch::new();
    let size = 9 * MIB + 4096; // a partial last object
    let file = scratch.join("data");
    create_random_file(&file, size, 11);
    let original = std::fs::read(&file).unwrap();

    let img = RbdImage::import(&conf, "volumes", "fixture-rt", &file);
    assert_eq!(img.size(), size);
    assert!(
        img.export() == original,
        "export differs from the imported file"
    );

    img.snap_create("before");
    let patch = random_bytes(8192, 12);
    img.write(5 * MIB + 512, &patch);
    img.discard(8 * MIB, MIB);

    let mut expected = original.clone();
    expected[(5 * MIB + 512) as usize..(5 * MIB + 512) as usize + patch.len()]
        .copy_from_slice(&patch);
    expected[(8 * MIB) as usize..(9 * MIB) as usize].fill(0);
    assert!(
        img.export() == expected,
        "head differs from the written data"
    );
    assert!(
        img.export_snap("before") == original,
        "snapshot no longer holds the data at snapshot time"
    );

    // The image was fully written before the snapshot: the diff is exact.
    let changed: Vec<_> = img
        .diff(Some("before"))
        .into_iter()
        .map(|e| e.range)
        .collect();
    assert_eq!(
        changed,
        vec![5 * MIB + 512..5 * MIB + 512 + 8192, 8 * MIB..9 * MIB]
    );

    // Exported to a file, too.
    let out = scratch.join("snap.img");
    rbd_export_to(&conf, &img.snap_spec("before"), &out);
    assert_same(&file, &out, size);
}

#[test]
fn rbd_image_guard_removes_images_with_protected_snapshots() {
    let conf = ceph_conf('A');
    let name;
    {
        let img = RbdImage::create(&conf, "rbd", "fixture-drop", 4 * MIB + 1);
        name = img.name().to_owned();
        assert_eq!(img.size(), 4 * MIB + 1);
        let data = img.fill(5);
        img.snap_create("s1");
        rbd_ok(&conf, ["snap", "protect", &img.snap_spec("s1")]);
        img.snap_create("s2");
        assert_eq!(rbd_snaps(&conf, &img.spec()).len(), 2);
        assert!(img.export_snap("s1") == data);
    }
    assert!(
        !rbd_exists(&conf, "rbd", &name),
        "image {name} survived its guard"
    );

    // A panicking test still removes its image.
    let result = std::panic::catch_unwind(|| {
        let img = RbdImage::create(&conf, "rbd", "fixture-panic", MIB);
        img.snap_create("s");
        panic!("{}", img.name());
    });
    let name = result
        .unwrap_err()
        .downcast::<String>()
        .map(|s| *s)
        .unwrap_or_default();
    assert!(
        name.starts_with("fixture-panic-"),
        "panic payload: {name:?}"
    );
    assert!(
        !rbd_exists(&conf, "rbd", &name),
        "image {name} survived a panic"
    );
}
